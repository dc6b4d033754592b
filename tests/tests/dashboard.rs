//! The dashboard in headless Chromium against the real gateway and simulator: the overview
//! shows the fleet and its ingest, a click on a device draws its readings and aggregates,
//! the charts follow new data live and hold exactly what the API returns for the same range,
//! and a screenshot with the charts is left in `target/test-artifacts/dashboard.png`.

use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use e2e::webdriver::Browser;
use e2e::{
    KillOnDrop, TestGateway, artifact, http, provision, read_report, serial, sim, wait_until,
};
use serde_json::{Value, json};

/// Facts of the charts in one section (`readings-charts` or `aggregate-charts`), by sensor:
/// buckets drawn, readings they hold, latest point's time.
const CHART_FACTS: &str = "
    return [...document.querySelectorAll('#' + arguments[0] + ' .chart-box')].map((b) => {
      const svg = b.querySelector('svg.plot');
      const path = b.querySelector('path.line');
      return {
        sensor: Number(b.dataset.sensor),
        rows: Number(b.dataset.rows),
        readings: Number(b.dataset.readings),
        points: svg ? Number(svg.dataset.points) : 0,
        last: svg && svg.dataset.lastTs ? Number(svg.dataset.lastTs) : null,
        drawn: path ? path.getAttribute('d').split(/[ML]/).filter((s) => s).length : 0,
      };
    });";

fn text(b: &Browser, id: &str) -> anyhow::Result<String> {
    Ok(b.eval(
        "const e = document.getElementById(arguments[0]); return e ? e.textContent : '';",
        json!([id]),
    )?
    .as_str()
    .unwrap_or_default()
    .to_owned())
}

fn number(s: &str) -> f64 {
    s.replace(',', "").trim().parse().unwrap_or(f64::NAN)
}

/// What the API answers for the query behind the charts, grouped by sensor:
/// (sensor, buckets, readings, latest bucket's middle).
fn api_facts(
    gw: &TestGateway,
    token: &str,
    path: &str,
    step: u64,
) -> anyhow::Result<Vec<(u64, u64, u64, f64)>> {
    let (code, _, body) = http(gw.admin, "GET", path, Some(token))?;
    anyhow::ensure!(code == 200, "{path}: {code} {body}");
    let rows: Vec<Value> = serde_json::from_str(&body)?;
    let mut by: std::collections::BTreeMap<u64, (u64, u64, f64)> = Default::default();
    for r in &rows {
        let e = by
            .entry(r["sensor"].as_u64().context("sensor")?)
            .or_insert((0, 0, f64::MIN));
        e.0 += 1;
        e.1 += r["count"].as_u64().context("count")?;
        e.2 =
            e.2.max(r["start_ms"].as_f64().context("start")? + step as f64 / 2.0);
    }
    Ok(by.into_iter().map(|(s, (n, c, l))| (s, n, c, l)).collect())
}

fn chart_facts(b: &Browser, section: &str) -> anyhow::Result<Vec<(u64, u64, u64, f64)>> {
    let v = b.eval(CHART_FACTS, json!([section]))?;
    let mut out = Vec::new();
    for c in v.as_array().context("charts")? {
        let n = c["rows"].as_u64().unwrap_or(0);
        // Each bucket is drawn (a point of the line), and the chart says as much.
        assert_eq!(c["points"].as_u64(), Some(n), "{section}: {c}");
        assert_eq!(c["drawn"].as_u64(), Some(n), "{section}: {c}");
        out.push((
            c["sensor"].as_u64().context("sensor")?,
            n,
            c["readings"].as_u64().unwrap_or(0),
            c["last"].as_f64().unwrap_or(f64::NAN),
        ));
    }
    Ok(out)
}

#[test]
fn the_dashboard_shows_the_fleet_and_charts_stored_data_live() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 3)?;
    let gw = TestGateway::start(&db, &[])?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let token = token.trim();
    let report = dir.path().join("report.json");
    let mut fleet_run = KillOnDrop(
        sim(gw.udp, &fleet)
            .args(["--rate", "20", "--batch", "4", "--duration", "45s", "--ack"])
            .arg("--report")
            .arg(&report)
            .stdout(Stdio::null())
            .spawn()?,
    );

    let b = Browser::start(1400, 1500)?;
    let base = format!("http://{}", gw.admin);
    b.goto(&format!("{base}/#token={token}"))?;
    // The overview: three devices, readings arriving.
    wait_until(Duration::from_secs(30), "three devices listed", || {
        let rows = b.eval(
            "return document.querySelectorAll('#devices tr').length;",
            json!([]),
        )?;
        Ok(rows == json!(3) && text(&b, "t-devices")? == "3")
    })?;
    wait_until(Duration::from_secs(30), "an ingest rate", || {
        Ok(number(&text(&b, "t-ingest")?) > 0.0)
    })?;
    // The token left the address bar; the page went to /dashboard/.
    let url = b.eval("return location.href;", json!([]))?;
    let url = url.as_str().unwrap_or_default();
    assert!(url.starts_with(&format!("{base}/dashboard/")), "{url}");
    assert!(
        !url.contains(token),
        "the token stayed in the address: {url}"
    );

    // A device and a range, chosen with clicks.
    let device = b.eval(
        "return Number(document.querySelectorAll('#devices tr')[1].dataset.device);",
        json!([]),
    )?;
    b.click(&format!("#devices tr[data-device=\"{device}\"]"))?;
    b.click("#range option[value=\"300000\"]")?;
    wait_until(
        Duration::from_secs(60),
        "readings and aggregates charted",
        || {
            let r = chart_facts(&b, "readings-charts")?;
            let a = chart_facts(&b, "aggregate-charts")?;
            Ok(!r.is_empty() && r.iter().all(|c| c.1 > 0) && !a.is_empty())
        },
    )?;
    let title = text(&b, "device-title")?;
    assert!(title.starts_with(&format!("Device {device}")), "{title}");

    // Live: the newest point moves on while the fleet sends.
    let first = chart_facts(&b, "readings-charts")?[0].3;
    wait_until(
        Duration::from_secs(20),
        "the chart following new data",
        || Ok(chart_facts(&b, "readings-charts")?[0].3 > first),
    )?;
    assert!(
        fleet_run.try_wait()?.is_none(),
        "the fleet stopped before the live update was seen"
    );

    // Once the fleet is done, a refresh after it holds exactly what the API stores.
    assert!(fleet_run.wait()?.success());
    let r = read_report(&report)?;
    assert_eq!(r.readings_acked, r.readings_sent);
    let ended = e2e_now_ms();
    // Windows may still close after the fleet stops (a page fetch and the test's fetch can
    // straddle one): compare again at each redraw until the page and the API agree.
    let mut last = String::new();
    let mut got = Vec::new();
    let agreed = wait_until(Duration::from_secs(40), "charts equal to the API", || {
        let view = wait_until_view(&b, ended)?;
        let field = |k: &str| view[k].as_str().unwrap_or_default().to_owned();
        let (from, to, step) = (field("from"), field("to"), field("step"));
        let q = format!(
            "/api/v1/readings?device={device}&from={from}&to={to}&step={step}ms&format=json"
        );
        let want = api_facts(&gw, token, &q, step.parse()?)?;
        got = chart_facts(&b, "readings-charts")?;
        let astep = field("astep");
        let qa = format!(
            "/api/v1/aggregates?device={device}&from={from}&to={to}&window={}ms&step={astep}ms\
             &format=json",
            field("window")
        );
        let want_a = api_facts(&gw, token, &qa, astep.parse()?)?;
        let got_a = chart_facts(&b, "aggregate-charts")?;
        // The view must not have been redrawn while we compared.
        let again = wait_until_view(&b, ended)?;
        if again["updated"] != view["updated"] {
            return Ok(false);
        }
        anyhow::ensure!(!want.is_empty(), "no readings stored for {q}");
        last = format!(
            "readings charts {got:?} vs {q} {want:?}; aggregate charts {got_a:?} vs {qa} {want_a:?}"
        );
        Ok(got == want && !want_a.is_empty() && got_a == want_a)
    });
    agreed.with_context(|| last.clone())?;

    // The screenshot shows the charts: the series colours fill many pixels of that section.
    let png = b.screenshot()?;
    let path = artifact("dashboard.png")?;
    std::fs::write(&path, &png)?;
    let rect = b.eval(
        "const r = document.getElementById('readings-charts').getBoundingClientRect(); \
         return [r.left, r.top, r.right, r.bottom, window.devicePixelRatio];",
        json!([]),
    )?;
    let coloured = series_pixels(&png, &rect)?;
    eprintln!(
        "RESULT dashboard: device {device}, {} readings charts, {coloured} series pixels in \
         them; screenshot {}",
        got.len(),
        path.display()
    );
    assert!(
        coloured > 500,
        "the readings charts show little: {coloured} pixels"
    );

    // A wrong token: the page says so and asks for one.
    b.eval("sessionStorage.clear(); return 0;", json!([]))?;
    b.goto(&format!("{base}/dashboard/#token=wrong"))?;
    wait_until(Duration::from_secs(20), "the token refused", || {
        let shown = b.eval(
            "return !document.getElementById('login').hidden;",
            json!([]),
        )?;
        Ok(shown == json!(true) && text(&b, "login-error")?.contains("refused"))
    })?;
    drop(b);
    gw.stop()?;
    Ok(())
}

fn e2e_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// The device view's dataset once it was redrawn from a query that ends after `after` (ms).
fn wait_until_view(b: &Browser, after: i64) -> anyhow::Result<Value> {
    let mut view = Value::Null;
    wait_until(
        Duration::from_secs(30),
        "a redraw after the fleet ended",
        || {
            view = b.eval(
                "return Object.assign({}, document.getElementById('device-view').dataset);",
                json!([]),
            )?;
            let to: i64 = view["to"].as_str().unwrap_or("0").parse().unwrap_or(0);
            Ok(to > after)
        },
    )?;
    Ok(view)
}

/// Pixels inside `rect` (CSS px: left, top, right, bottom, device pixel ratio) whose colour is
/// one of the dashboard's series colours.
fn series_pixels(png: &[u8], rect: &Value) -> anyhow::Result<u64> {
    const SERIES: [[u8; 3]; 8] = [
        [0x1f, 0x6f, 0xeb],
        [0xd9, 0x48, 0x0f],
        [0x2f, 0x9e, 0x44],
        [0xae, 0x3e, 0xc9],
        [0xe8, 0x59, 0x0c],
        [0x0c, 0x85, 0x99],
        [0xc2, 0x25, 0x5c],
        [0x5c, 0x94, 0x0d],
    ];
    let mut dec = png::Decoder::new(std::io::Cursor::new(png));
    dec.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = dec.read_info()?;
    let mut buf = vec![0; reader.output_buffer_size().context("image size")?];
    let info = reader.next_frame(&mut buf)?;
    let channels = info.color_type.samples();
    anyhow::ensure!(channels >= 3, "not a colour image");
    let r: Vec<f64> = rect
        .as_array()
        .context("rect")?
        .iter()
        .map(|v| v.as_f64().unwrap_or(0.0))
        .collect();
    let scale = r.get(4).copied().unwrap_or(1.0).max(1.0);
    let clamp = |v: f64, max: u32| ((v * scale).max(0.0) as u32).min(max);
    let (x0, y0) = (clamp(r[0], info.width), clamp(r[1], info.height));
    let (x1, y1) = (clamp(r[2], info.width), clamp(r[3], info.height));
    let mut n = 0;
    for y in y0..y1 {
        for x in x0..x1 {
            let i = (y as usize * info.width as usize + x as usize) * channels;
            let px = &buf[i..i + 3];
            if SERIES.iter().any(|c| {
                c.iter()
                    .zip(px)
                    .all(|(a, b)| (i16::from(*a) - i16::from(*b)).abs() <= 24)
            }) {
                n += 1;
            }
        }
    }
    Ok(n)
}
