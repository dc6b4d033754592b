// plot.js: the dashboard's own small time-series chart. It draws SVG (crisp at any size,
// inspectable in the DOM) with a time axis, a value axis, lines that break at gaps, an
// optional min/max band per series and a hover readout. No dependencies.
'use strict';

const Plot = (() => {
  const NS = 'http://www.w3.org/2000/svg';
  const SECOND = 1000, MINUTE = 60 * SECOND, HOUR = 60 * MINUTE, DAY = 24 * HOUR;
  const TIME_STEPS = [SECOND, 2 * SECOND, 5 * SECOND, 10 * SECOND, 15 * SECOND, 30 * SECOND,
    MINUTE, 2 * MINUTE, 5 * MINUTE, 10 * MINUTE, 15 * MINUTE, 30 * MINUTE,
    HOUR, 2 * HOUR, 3 * HOUR, 6 * HOUR, 12 * HOUR, DAY, 2 * DAY, 7 * DAY, 30 * DAY];

  function node(name, attrs, parent) {
    const e = document.createElementNS(NS, name);
    for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
    if (parent) parent.appendChild(e);
    return e;
  }

  // A round step (1, 2 or 5 times a power of ten) giving about `target` ticks over `span`.
  function valueStep(span, target) {
    const raw = span / Math.max(1, target);
    const pow = Math.pow(10, Math.floor(Math.log10(raw)));
    const m = raw / pow;
    return pow * (m < 1.5 ? 1 : m < 3.5 ? 2 : m < 7.5 ? 5 : 10);
  }

  function timeStep(span, target) {
    const raw = span / Math.max(1, target);
    return TIME_STEPS.find((s) => s >= raw) || TIME_STEPS[TIME_STEPS.length - 1];
  }

  const pad = (n) => String(n).padStart(2, '0');

  function timeLabel(ms, step) {
    const d = new Date(ms);
    if (step >= DAY) return `${d.getMonth() + 1}-${pad(d.getDate())}`;
    if (step >= MINUTE) return `${pad(d.getHours())}:${pad(d.getMinutes())}`;
    return `${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }

  function valueLabel(v, step) {
    const digits = Math.max(0, Math.min(6, -Math.floor(Math.log10(step))));
    return Math.abs(v) >= 1e6 ? v.toExponential(2) : v.toFixed(digits);
  }

  const finite = (v) => typeof v === 'number' && Number.isFinite(v);

  // Draws `opts.series` ([{name, color, points: [[t, v]], band: [[t, lo, hi]]}]) over
  // [opts.from, opts.to] into `box`, replacing what was there. Returns the <svg>.
  function render(box, opts) {
    const width = Math.max(240, box.clientWidth || 600);
    const height = opts.height || 200;
    const m = { left: 56, right: 28, top: 10, bottom: 24 };
    const w = width - m.left - m.right, h = height - m.top - m.bottom;
    const series = opts.series || [];
    let lo = Infinity, hi = -Infinity, count = 0, last = null;
    for (const s of series) {
      for (const [t, v] of s.points) {
        if (!finite(v)) continue;
        lo = Math.min(lo, v); hi = Math.max(hi, v); count += 1;
        if (last === null || t > last) last = t;
      }
      for (const [, a, b] of s.band || []) {
        if (finite(a)) lo = Math.min(lo, a);
        if (finite(b)) hi = Math.max(hi, b);
      }
    }
    const from = opts.from, to = Math.max(opts.to, opts.from + 1);
    if (!finite(lo)) { lo = 0; hi = 1; }
    if (hi - lo < 1e-9) { lo -= 0.5; hi += 0.5; }
    const vstep = valueStep(hi - lo, Math.max(2, Math.floor(h / 40)));
    lo = Math.floor(lo / vstep) * vstep; hi = Math.ceil(hi / vstep) * vstep;
    const x = (t) => m.left + ((t - from) / (to - from)) * w;
    const y = (v) => m.top + h - ((v - lo) / (hi - lo)) * h;

    const svg = node('svg', {
      class: 'plot', width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
      'aria-label': opts.title || 'chart',
      'data-points': count, 'data-last-ts': last === null ? '' : last,
    });
    const grid = node('g', { class: 'grid' }, svg);
    // Counted, not accumulated: a step below the float spacing of the values (readings near
    // 1e16 that differ by units) must not loop for ever.
    const vticks = Math.round((hi - lo) / vstep);
    for (let i = 0; Number.isFinite(vticks) && vticks <= 50 && i <= vticks; i++) {
      const v = lo + i * vstep;
      node('line', { x1: m.left, x2: m.left + w, y1: y(v), y2: y(v) }, grid);
      node('text', { x: m.left - 6, y: y(v) + 4, 'text-anchor': 'end' }, grid)
        .textContent = valueLabel(v, vstep);
    }
    const tstep = timeStep(to - from, Math.max(2, Math.floor(w / 90)));
    const offset = new Date(from).getTimezoneOffset() * MINUTE;
    const t0 = Math.ceil((from - offset) / tstep) * tstep + offset;
    for (let i = 0, t = t0; t <= to && i <= 100; i++, t = t0 + i * tstep) {
      node('line', { x1: x(t), x2: x(t), y1: m.top, y2: m.top + h }, grid);
      node('text', { x: x(t), y: height - 6, 'text-anchor': 'middle' }, grid)
        .textContent = timeLabel(t, tstep);
    }
    const clip = `clip${Math.random().toString(36).slice(2)}`;
    node('rect', { x: m.left, y: m.top, width: w, height: h },
      node('clipPath', { id: clip }, node('defs', {}, svg)));
    const area = node('g', { 'clip-path': `url(#${clip})` }, svg);

    for (const s of series) {
      const band = (s.band || []).filter(([, a, b]) => finite(a) && finite(b));
      if (band.length > 1) {
        const top = band.map(([t, , b]) => `${x(t).toFixed(1)},${y(b).toFixed(1)}`);
        const bottom = band.map(([t, a]) => `${x(t).toFixed(1)},${y(a).toFixed(1)}`).reverse();
        node('polygon', {
          class: 'band', points: top.concat(bottom).join(' '), fill: s.color,
        }, area);
      }
      // A line that breaks where a value is missing or the gap is far wider than usual.
      const pts = s.points;
      const gaps = [];
      for (let i = 1; i < pts.length; i++) gaps.push(pts[i][0] - pts[i - 1][0]);
      gaps.sort((a, b) => a - b);
      const usual = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 0;
      let d = '', pen = false, prev = null;
      for (const [t, v] of pts) {
        if (!finite(v)) { pen = false; continue; }
        const jump = prev !== null && usual > 0 && t - prev > usual * 5;
        d += `${pen && !jump ? 'L' : 'M'}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
        pen = true; prev = t;
      }
      node('path', {
        class: 'line', d, stroke: s.color, 'data-series': s.name, 'data-points': pts.length,
      }, area);
      if (pts.length === 1 && finite(pts[0][1])) {
        node('circle', { cx: x(pts[0][0]), cy: y(pts[0][1]), r: 2.5, fill: s.color }, area);
      }
    }
    if (count === 0) {
      node('text', { class: 'empty', x: m.left + w / 2, y: m.top + h / 2, 'text-anchor': 'middle' },
        svg).textContent = 'no data in this range';
    }

    // Hover: the nearest point of each series at the pointer's time.
    const cursor = node('line', { class: 'cursor', y1: m.top, y2: m.top + h, visibility: 'hidden' }, svg);
    const readout = node('text', { class: 'readout', x: m.left + 4, y: m.top + 12 }, svg);
    svg.addEventListener('mousemove', (ev) => {
      const r = svg.getBoundingClientRect();
      const px = ev.clientX - r.left;
      if (px < m.left || px > m.left + w) return;
      const t = from + ((px - m.left) / w) * (to - from);
      cursor.setAttribute('x1', px); cursor.setAttribute('x2', px);
      cursor.setAttribute('visibility', 'visible');
      const parts = [];
      for (const s of series) {
        let best = null;
        for (const p of s.points) if (best === null || Math.abs(p[0] - t) < Math.abs(best[0] - t)) best = p;
        if (best && finite(best[1])) parts.push(`${s.name} ${best[1].toPrecision(5)}`);
      }
      readout.textContent = `${new Date(t).toLocaleTimeString()}  ${parts.join('  ')}`;
    });
    svg.addEventListener('mouseleave', () => {
      cursor.setAttribute('visibility', 'hidden'); readout.textContent = '';
    });

    box.replaceChildren(svg);
    return svg;
  }

  return { render, valueStep, timeStep };
})();
