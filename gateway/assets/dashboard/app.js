// app.js: the gateway dashboard. Reads the token-protected admin API with the token the
// operator pastes (or the demo's link carries in the URL fragment, which never reaches the
// server), polls the fleet overview every two seconds and redraws the selected device's
// charts as new data arrives. State worth sharing (device, range, window) lives in the
// fragment, the token in this tab's session storage only.
'use strict';

const COLORS = ['#1f6feb', '#d9480f', '#2f9e44', '#ae3ec9', '#e8590c', '#0c8599', '#c2255c', '#5c940d'];
const POLL_MS = 2000;
const RATE_WINDOW_MS = 5 * 60 * 1000;

const $ = (id) => document.getElementById(id);
const state = {
  token: sessionStorage.getItem('gateway-token'),
  device: null,
  range: 900000,
  window: null,
  windows: [],
  devices: [],
  prev: null,        // the previous overview sample, for rates
  rates: [],         // [t, readings/s] over the last five minutes
  nextCharts: 0,     // when the device charts are due for a refresh (ms)
  charting: false,   // a drawing is fetching
  redraw: false,     // another was asked for meanwhile
};

function fragment() {
  return new URLSearchParams(location.hash.replace(/^#/, ''));
}

function saveFragment() {
  const p = new URLSearchParams();
  if (state.device !== null) p.set('device', state.device);
  p.set('range', state.range);
  if (state.window) p.set('window', state.window);
  history.replaceState(null, '', `#${p}`);
}

class AuthError extends Error {}

async function api(path) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${state.token}` } });
  if (r.status === 401) throw new AuthError('the token was refused');
  if (!r.ok) {
    let msg = `${r.status} ${r.statusText}`;
    try { msg = (await r.json()).error || msg; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return r.json();
}

function status(text, bad) {
  const s = $('status');
  s.textContent = text;
  s.classList.toggle('bad', !!bad);
}

function showLogin(message) {
  $('app').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  status('not signed in', true);
}

const fmt = new Intl.NumberFormat('en');
const num = (n) => fmt.format(Math.round(n));

function bytes(n) {
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function age(ms) {
  if (ms === null || ms === undefined) return 'never';
  const s = Math.max(0, (Date.now() - ms) / 1000);
  if (s < 60) return `${Math.round(s)} s ago`;
  if (s < 3600) return `${Math.round(s / 60)} min ago`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h ago`;
  return `${(s / 86400).toFixed(1)} d ago`;
}

function duration(ms) {
  for (const [unit, len] of [['d', 86400000], ['h', 3600000], ['m', 60000], ['s', 1000]]) {
    if (ms >= len && ms % len === 0) return `${ms / len}${unit}`;
  }
  return `${ms}ms`;
}

// The state a device is in, for the list and the overview.
function deviceState(d) {
  if (d.revoked_ms) return 'revoked';
  if (d.online) return 'online';
  if (d.last_seen_ms && Date.now() - d.last_seen_ms < 60000) return 'active';
  return d.last_seen_ms ? 'idle' : 'never';
}

async function pollOverview() {
  const s = await api('/api/v1/stats');
  const c = s.counters;
  const now = s.now_ms;
  if (state.windows.length === 0 && s.aggregate_windows_ms.length) {
    state.windows = s.aggregate_windows_ms;
    const sel = $('window');
    sel.replaceChildren(...state.windows.map((w) => new Option(duration(w), w)));
    if (!state.windows.includes(state.window)) state.window = state.windows[0];
    sel.value = state.window;
  }
  $('gateway-version').textContent = `v${s.version}`;
  const drops = Object.entries(c).filter(([k]) => k.startsWith('drop_'));
  const dropTotal = drops.reduce((a, [, v]) => a + v, 0);
  if (state.prev && now > state.prev.now) {
    const dt = (now - state.prev.now) / 1000;
    const rate = (c.readings_committed - state.prev.readings) / dt;
    state.rates.push([now, rate]);
    $('t-ingest').textContent = num(rate);
    $('t-drops-sub').textContent = `${num((dropTotal - state.prev.drops) / dt)}/s now`;
  }
  state.prev = { now, readings: c.readings_committed, drops: dropTotal };
  state.rates = state.rates.filter(([t]) => t >= now - RATE_WINDOW_MS);
  $('t-drops').textContent = num(dropTotal);
  const worst = drops.filter(([, v]) => v > 0).sort((a, b) => b[1] - a[1]).slice(0, 2);
  if (!state.rates.length || worst.length) {
    $('t-drops-sub').textContent = worst.map(([k, v]) => `${k.slice(5).replace(/_/g, ' ')} ${num(v)}`).join(', ') || 'none';
  }
  $('t-outbox').textContent = num(c.outbox_rows);
  $('t-outbox-sub').textContent = `${s.broker}; oldest ${(c.outbox_oldest_age_ms / 1000).toFixed(1)} s`;
  $('t-db').textContent = bytes(c.db_used_bytes || 0);
  $('t-db-sub').textContent = `${num(c.readings_committed)} readings committed since start`;
  Plot.render($('ingest-chart'), {
    from: now - RATE_WINDOW_MS, to: now, height: 140, title: 'ingest rate',
    series: [{ name: 'readings/s', color: COLORS[0], points: state.rates }],
  });
}

async function pollDevices() {
  state.devices = await api('/api/v1/devices');
  const counts = { online: 0, active: 0 };
  for (const d of state.devices) {
    const st = deviceState(d);
    if (st === 'online') counts.online += 1;
    if (st === 'online' || st === 'active') counts.active += 1;
  }
  $('t-devices').textContent = num(state.devices.length);
  $('t-devices-sub').textContent = `${num(counts.active)} sending in the last minute, ${num(counts.online)} with a control session`;
  renderDeviceList();
}

function renderDeviceList() {
  const q = $('filter').value.trim().toLowerCase();
  const shown = state.devices.filter((d) => !q || String(d.id) === q || d.name.toLowerCase().includes(q));
  const limit = 200;
  const rows = shown.slice(0, limit).map((d) => {
    const tr = document.createElement('tr');
    tr.dataset.device = d.id;
    if (d.id === state.device) tr.classList.add('selected');
    const st = deviceState(d);
    const cells = [d.id, d.name, st, age(d.last_seen_ms), num(d.readings), num(d.lost), num(d.rejected)];
    cells.forEach((v, i) => {
      const td = document.createElement('td');
      td.textContent = v;
      if (i === 2) td.className = `state-${st}`;
      if (i >= 4) td.className = 'num';
      tr.appendChild(td);
    });
    tr.addEventListener('click', () => selectDevice(d.id));
    return tr;
  });
  $('devices').replaceChildren(...rows);
  $('devices-more').textContent = shown.length > limit ? `${shown.length - limit} more: filter to narrow` : '';
}

function selectDevice(id) {
  state.device = id;
  saveFragment();
  renderDeviceList();
  state.nextCharts = 0;
  drawCharts();
}

// One chart per sensor; `rows` are StatsRow objects (downsampled readings or windows).
function chartsBySensor(box, rows, from, to, kind) {
  const by = new Map();
  for (const r of rows) {
    if (!by.has(r.sensor)) by.set(r.sensor, []);
    by.get(r.sensor).push(r);
  }
  const sensors = [...by.keys()].sort((a, b) => a - b);
  if (!sensors.length) {
    const p = document.createElement('p');
    p.className = 'sub';
    p.textContent = 'no data in this range';
    box.replaceChildren(p);
    return 0;
  }
  const existing = new Map([...box.querySelectorAll('.chart-box')].map((e) => [Number(e.dataset.sensor), e]));
  const boxes = sensors.map((sensor, i) => {
    let cb = existing.get(sensor);
    if (!cb) {
      cb = document.createElement('div');
      cb.className = 'chart-box';
      cb.dataset.sensor = sensor;
      cb.dataset.kind = kind;
      const h = document.createElement('h4');
      h.textContent = `sensor ${sensor}`;
      const c = document.createElement('div');
      c.className = 'chart';
      cb.append(h, c);
    }
    const rs = by.get(sensor);
    const half = (r) => r.start_ms + r.window_ms / 2;
    cb.dataset.rows = rs.length;
    cb.dataset.readings = rs.reduce((a, r) => a + r.count, 0);
    Plot.render(cb.querySelector('.chart'), {
      from, to, height: 170, title: `${kind} of sensor ${sensor}`,
      series: [{
        name: `sensor ${sensor}`, color: COLORS[i % COLORS.length],
        points: rs.map((r) => [half(r), r.mean]),
        band: rs.map((r) => [half(r), r.min, r.max]),
      }],
    });
    return cb;
  });
  box.replaceChildren(...boxes);
  return sensors.length;
}

// A round step giving at most about 300 buckets over the range (at least a second).
function stepFor(range, multipleOf) {
  const raw = Math.max(1000, range / 300);
  let step = Plot.timeStep(raw, 1);
  if (multipleOf) step = Math.max(multipleOf, Math.ceil(step / multipleOf) * multipleOf);
  return step;
}

async function drawCharts() {
  if (state.device === null) return;
  if (state.charting) {
    // A choice made while a fetch runs is drawn right after it.
    state.redraw = true;
    return;
  }
  // What this drawing shows, fixed now: the user may choose another device meanwhile.
  const device = state.device, range = state.range, win = state.window;
  const d = state.devices.find((x) => x.id === device);
  $('device-title').textContent = d ? `Device ${d.id} · ${d.name}` : `Device ${device}`;
  state.charting = true;
  state.redraw = false;
  try {
    const to = Date.now(), from = to - range;
    const step = stepFor(range);
    const q = `device=${device}&from=${from}&to=${to}&format=json`;
    const readings = await api(`/api/v1/readings?${q}&step=${step}ms`);
    let windows = [], astep = null;
    if (win) {
      astep = stepFor(range, win);
      windows = await api(`/api/v1/aggregates?${q}&window=${win}ms&step=${astep}ms`);
    }
    if (device !== state.device || range !== state.range || win !== state.window) return;
    chartsBySensor($('readings-charts'), readings, from, to, 'readings');
    chartsBySensor($('aggregate-charts'), windows, from, to, 'aggregates');
    const n = readings.reduce((a, r) => a + r.count, 0);
    $('device-status').textContent = `${num(n)} readings, ${num(windows.length)} windows shown · updated ${new Date().toLocaleTimeString()}`;
    // What is shown, for scripts and tests: the query behind the charts.
    Object.assign($('device-view').dataset, {
      device, from, to, step, window: win || '', astep: astep || '', updated: Date.now(),
    });
    // Refresh about once per bucket, at most every poll.
    state.nextCharts = Date.now() + Math.max(POLL_MS, step);
  } catch (e) {
    if (e instanceof AuthError) throw e;
    $('device-status').textContent = `could not load: ${e.message}`;
  } finally {
    state.charting = false;
    if (state.redraw) {
      state.redraw = false;
      setTimeout(drawCharts, 0);
    }
  }
}

async function tick() {
  try {
    await pollOverview();
    if (!tick.devicesAt || Date.now() >= tick.devicesAt) {
      await pollDevices();
      tick.devicesAt = Date.now() + 5000;
    }
    if ($('live').checked && Date.now() >= state.nextCharts) await drawCharts();
    status(`live · ${new Date().toLocaleTimeString()}`);
  } catch (e) {
    if (e instanceof AuthError) {
      sessionStorage.removeItem('gateway-token');
      showLogin(e.message);
      return;
    }
    status(`gateway unreachable: ${e.message}`, true);
  }
  setTimeout(tick, POLL_MS);
}

function start() {
  $('login').hidden = true;
  $('app').hidden = false;
  tick();
}

function init() {
  const f = fragment();
  if (f.has('token')) {
    state.token = f.get('token');
    sessionStorage.setItem('gateway-token', state.token);
    f.delete('token');
  }
  if (f.has('device')) state.device = Number(f.get('device'));
  if (f.has('range')) state.range = Number(f.get('range')) || state.range;
  if (f.has('window')) state.window = Number(f.get('window')) || null;
  $('range').value = String(state.range);
  saveFragment();
  $('range').addEventListener('change', () => {
    state.range = Number($('range').value);
    saveFragment();
    state.nextCharts = 0;
    drawCharts();
  });
  $('window').addEventListener('change', () => {
    state.window = Number($('window').value);
    saveFragment();
    state.nextCharts = 0;
    drawCharts();
  });
  $('filter').addEventListener('input', renderDeviceList);
  // A link with another token opened in this tab.
  window.addEventListener('hashchange', () => {
    const g = fragment();
    if (!g.has('token')) return;
    state.token = g.get('token');
    sessionStorage.setItem('gateway-token', state.token);
    saveFragment();
    if ($('app').hidden) start();
  });
  $('login').addEventListener('submit', (ev) => {
    ev.preventDefault();
    state.token = $('token').value.trim();
    sessionStorage.setItem('gateway-token', state.token);
    start();
  });
  if (state.token) start(); else showLogin();
}

init();
