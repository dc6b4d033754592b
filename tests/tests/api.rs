//! The HTTP query API against the real gateway: readings and aggregates as CSV, JSON and NDJSON,
//! downsampled and not, checked against what was sent; parameter errors; the OpenAPI document
//! against the routes the gateway serves.

use std::collections::BTreeMap;

use anyhow::Context;
use e2e::{RawDevice, TestGateway, http, provision, serial};

/// Minute-aligned start of the readings.
const BASE: u64 = 1_764_000_000_000;
/// Readings per device: 180 s at 10 per second, sensors 1 and 2 alternating.
const READINGS: u64 = 1_800;

fn value(device: u32, i: u64) -> f64 {
    ((i * 7_919 + u64::from(device) * 13) % 1_001) as f64 / 10.0 - 50.0
}

/// (sensor, ts, value) of reading `i` of `device`.
fn reading(device: u32, i: u64) -> (u16, u64, f64) {
    (1 + (i % 2) as u16, BASE + i * 100, value(device, i))
}

/// Naive statistics grouped by (bucket start, sensor), the order the API answers in.
/// count, min, max, mean, last.
type Naive = (u64, f64, f64, f64, f64);

fn naive(device: u32, step: u64) -> BTreeMap<(u64, u16), Naive> {
    let mut groups: BTreeMap<(u64, u16), Vec<f64>> = BTreeMap::new();
    for i in 0..READINGS {
        let (sensor, ts, v) = reading(device, i);
        groups.entry((ts - ts % step, sensor)).or_default().push(v);
    }
    groups
        .into_iter()
        .map(|(k, vs)| {
            let n = vs.len() as f64;
            let mean = vs.iter().sum::<f64>() / n;
            let min = vs.iter().copied().fold(f64::INFINITY, f64::min);
            let max = vs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let last = *vs.last().unwrap_or(&f64::NAN);
            (k, (vs.len() as u64, min, max, mean, last))
        })
        .collect()
}

fn close(a: f64, b: f64) -> bool {
    (a - b).abs() < 1e-9
}

struct Api {
    gw: TestGateway,
    token: String,
}

impl Api {
    fn get(&self, path: &str) -> anyhow::Result<(u16, String)> {
        let (code, _, body) = http(self.gw.admin, "GET", path, Some(&self.token))?;
        Ok((code, body))
    }

    fn ok(&self, path: &str) -> anyhow::Result<String> {
        let (code, body) = self.get(path)?;
        anyhow::ensure!(code == 200, "{path}: {code} {body}");
        Ok(body)
    }

    fn json(&self, path: &str) -> anyhow::Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&self.ok(path)?)?)
    }
}

/// Checks one downsampled or aggregate row against the naive statistics.
fn check_stats(row: &serde_json::Value, want: &Naive) -> anyhow::Result<()> {
    let f = |k: &str| row[k].as_f64().with_context(|| format!("{k} in {row}"));
    anyhow::ensure!(row["count"].as_u64() == Some(want.0), "{row} vs {want:?}");
    anyhow::ensure!(
        f("min")? == want.1 && f("max")? == want.2,
        "{row} vs {want:?}"
    );
    anyhow::ensure!(close(f("mean")?, want.3), "{row} vs {want:?}");
    anyhow::ensure!(f("last")? == want.4, "{row} vs {want:?}");
    Ok(())
}

#[test]
fn readings_and_aggregates_over_http_are_what_was_sent() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    let mut ids = Vec::new();
    for index in 0..2 {
        let d = RawDevice::new(&fleet, index, gw.udp)?;
        let id = d.id.0;
        let all: Vec<_> = (0..READINGS).map(|i| reading(id, i)).collect();
        for (seq, chunk) in all.chunks(50).enumerate() {
            d.send_acked(&d.datagram_of(seq as u64, chunk), seq as u64)?;
        }
        ids.push(id);
    }
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let api = Api {
        gw,
        token: token.trim().to_owned(),
    };
    let d = ids[0];

    // Raw readings, three encodings, equal to what was sent (the device filter holds).
    let csv = api.ok(&format!("/api/v1/readings?device={d}&format=csv"))?;
    let mut lines = csv.lines();
    assert_eq!(lines.next(), Some("device,sensor,time,ts_ms,value,seq,idx"));
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    assert_eq!(rows.len() as u64, READINGS);
    for (i, r) in rows.iter().enumerate() {
        let (sensor, ts, v) = reading(d, i as u64);
        assert_eq!(r[0], d.to_string());
        assert_eq!((r[1].parse::<u16>()?, r[3].parse::<u64>()?), (sensor, ts));
        assert_eq!(r[4].parse::<f64>()?, v, "{r:?}");
    }
    let json = api.json(&format!("/api/v1/readings?device={d}"))?;
    let nd = api.ok(&format!("/api/v1/readings?device={d}&format=ndjson"))?;
    let nd: Vec<serde_json::Value> = nd
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(json, nd);
    assert_eq!(json.len() as u64, READINGS);
    assert_eq!(json[17]["ts_ms"].as_u64(), Some(reading(d, 17).1));
    assert_eq!(json[17]["value"].as_f64(), Some(reading(d, 17).2));
    let both = api.json("/api/v1/readings?format=json")?;
    assert_eq!(both.len() as u64, 2 * READINGS);

    // Time range and sensor filters, RFC 3339 and ms.
    let from = humantime::format_rfc3339_millis(
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(BASE + 60_000),
    );
    let part = api.json(&format!(
        "/api/v1/readings?device={d}&sensor=2&from={from}&to={}",
        BASE + 70_000
    ))?;
    assert_eq!(part.len(), 50);
    assert!(part.iter().all(|r| r["sensor"] == 2));

    // Downsampled readings equal a naive grouping.
    let want = naive(d, 60_000);
    let got = api.json(&format!("/api/v1/readings?device={d}&step=1m"))?;
    assert_eq!(got.len(), want.len());
    for (row, ((start, sensor), w)) in got.iter().zip(&want) {
        assert_eq!(row["sensor"].as_u64(), Some(u64::from(*sensor)));
        assert_eq!(row["start_ms"].as_u64(), Some(*start));
        assert_eq!(row["window_ms"].as_u64(), Some(60_000));
        check_stats(row, w).context("readings step=1m")?;
    }

    // Stored 10 s windows: every one returned equals the naive window; all closed ones are
    // there (the newest reading closes windows ending 5 s before it).
    let want10 = naive(d, 10_000);
    let closed = |start: u64, len: u64| start + len + 5_000 <= BASE + (READINGS - 1) * 100;
    let got = api.json(&format!("/api/v1/aggregates?device={d}&window=10s"))?;
    let expected_closed = want10.keys().filter(|(s, _)| closed(*s, 10_000)).count();
    assert!(
        got.len() >= expected_closed,
        "{} < {expected_closed}",
        got.len()
    );
    for row in &got {
        let key = (
            row["start_ms"].as_u64().context("start")?,
            row["sensor"].as_u64().context("sensor")? as u16,
        );
        check_stats(row, &want10[&key]).context("aggregates 10s")?;
        assert_eq!(row["revision"].as_u64(), Some(0));
    }
    // Merged into minutes: the minutes whose 10 s windows are all closed equal the naive minute.
    let got = api.json(&format!("/api/v1/aggregates?device={d}&window=10s&step=1m"))?;
    let mut checked = 0;
    for row in &got {
        let start = row["start_ms"].as_u64().context("start")?;
        if closed(start, 60_000) {
            let key = (start, row["sensor"].as_u64().context("sensor")? as u16);
            check_stats(row, &want[&key]).context("aggregates 10s merged into 1m")?;
            assert!(row.get("revision").is_none());
            checked += 1;
        }
    }
    assert_eq!(checked, 4, "two closed minutes × two sensors: {got:?}");
    let csv = api.ok(&format!(
        "/api/v1/aggregates?device={d}&window=1m&format=csv"
    ))?;
    assert_eq!(
        csv.lines().next(),
        Some("device,sensor,window_ms,time,start_ms,count,min,max,mean,stddev,last,revision")
    );

    // Limits and errors: clear 400s, a cap on points, the token.
    assert_eq!(api.json("/api/v1/readings?limit=7")?.len(), 7);
    // The limit counts output rows, also downsampled ones and windows.
    let buckets = api.json(&format!("/api/v1/readings?device={d}&step=10s&limit=5"))?;
    assert_eq!(buckets.len(), 5);
    assert_eq!(buckets[4]["start_ms"].as_u64(), Some(BASE + 20_000));
    assert_eq!(
        api.json(&format!(
            "/api/v1/aggregates?device={d}&window=10s&step=1m&limit=3"
        ))?
        .len(),
        3
    );
    assert_eq!(api.json("/api/v1/aggregates?window=10s&limit=4")?.len(), 4);
    for (path, needle) in [
        ("/api/v1/readings?limit=1000001", "admin.max_points"),
        ("/api/v1/readings?format=xml", "json, ndjson or csv"),
        ("/api/v1/readings?window=10s", "aggregates"),
        ("/api/v1/readings?from=noon", "RFC 3339"),
        ("/api/v1/readings?colour=red", "unknown field"),
        ("/api/v1/aggregates?window=10s&step=15s", "multiple"),
    ] {
        let (code, body) = api.get(path)?;
        assert_eq!(code, 400, "{path}: {body}");
        let err: serde_json::Value = serde_json::from_str(&body)?;
        let msg = err["error"].as_str().unwrap_or_default();
        assert!(msg.contains(needle), "{path}: {msg}");
    }
    let (code, _, _) = http(api.gw.admin, "GET", "/api/v1/readings", None)?;
    assert_eq!(code, 401);
    let (code, _, _) = http(api.gw.admin, "GET", "/api/v1/readings", Some("wrong"))?;
    assert_eq!(code, 401);
    api.gw.stop()?;
    Ok(())
}

#[test]
fn the_openapi_document_describes_the_served_api() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    provision(dir.path(), &db, 1)?;
    let gw = TestGateway::start(&db, &[])?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    // Served without a token.
    let (code, _, body) = http(gw.admin, "GET", "/api/v1/openapi.json", None)?;
    assert_eq!(code, 200);
    let doc: serde_json::Value = serde_json::from_str(&body)?;
    let paths = doc["paths"].as_object().context("paths")?;
    let mut operations = 0;
    for (path, ops) in paths {
        // A device that does not exist: nothing is changed by the probes.
        let concrete = path.replace("{id}", "4294967295");
        for (method, op) in ops.as_object().context("operations")? {
            let method = method.to_ascii_uppercase();
            let (code, head, body) = http(gw.admin, &method, &concrete, Some(token.trim()))?;
            // The route exists with this method: not the router's 405, not its empty 404.
            assert_ne!(code, 405, "{method} {path}");
            assert!(
                code != 404 || !body.is_empty(),
                "{method} {path}: no such route"
            );
            // Every status the gateway answered with is one the document lists.
            let listed = op["responses"].get(code.to_string()).is_some();
            assert!(
                listed,
                "{method} {path} answered {code}, not documented: {head}\n{body}"
            );
            // Open operations say so; the others refuse a missing token.
            let open = op["security"].as_array().is_some_and(|s| s.is_empty());
            let (anon, _, _) = http(gw.admin, &method, &concrete, None)?;
            assert_eq!(
                anon == 401,
                !open,
                "{method} {path}: {anon} without a token"
            );
            operations += 1;
        }
    }
    assert!(operations >= 15, "{operations} operations");
    gw.stop()?;
    Ok(())
}

/// LEB128, as the block format stores sensor and time offset.
fn varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Sends a readings query on a socket with a small receive buffer and returns it unread.
fn open_query(gw: &TestGateway, token: &str, query: &str) -> anyhow::Result<std::net::TcpStream> {
    use std::io::Write;
    let sock = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    sock.set_recv_buffer_size(4096)?;
    sock.connect(&gw.admin.into())?;
    let mut s: std::net::TcpStream = sock.into();
    s.set_read_timeout(Some(std::time::Duration::from_secs(20)))?;
    s.write_all(
        format!(
            "GET {query} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    )?;
    Ok(s)
}

/// The status of a response whose first bytes are in `s`.
fn status_of(s: &mut std::net::TcpStream) -> anyhow::Result<u16> {
    use std::io::Read;
    let mut head = [0u8; 12];
    s.read_exact(&mut head)?;
    std::str::from_utf8(&head[9..12])?.parse().context("status")
}

/// A client that stops reading a long response is dropped after `admin.stall_timeout`: its
/// response ends cut (no last chunk, so it cannot pass for complete) and its query slot is
/// free again, while other queries were answered meanwhile.
#[test]
fn a_stalled_client_is_dropped_and_its_slot_freed() -> anyhow::Result<()> {
    use std::io::Read;
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    provision(dir.path(), &db, 1)?;
    // 200,000 readings of device 1 (about 12 MB of CSV), written straight into the table.
    {
        let conn = rusqlite::Connection::open(&db)?;
        let tx = conn.unchecked_transaction()?;
        {
            let mut st = tx.prepare(
                "INSERT INTO blocks (device, ts_min, seq, idx, ts_max, count, data) \
                 VALUES (1, ?1, ?2, 0, ?3, 50, ?4)",
            )?;
            for b in 0..4_000i64 {
                let ts = 1_600_000_000_000 + b * 50_000;
                let mut data = vec![1u8];
                for i in 0..50u64 {
                    varint(&mut data, 1);
                    varint(&mut data, i * 1_000);
                    data.extend_from_slice(&(i as f64 * 0.5).to_le_bytes());
                }
                st.execute(rusqlite::params![ts, b, ts + 49_000, data])?;
            }
        }
        tx.commit()?;
    }
    let gw = TestGateway::start_env(&db, &[], &[("GATEWAY__ADMIN__STALL_TIMEOUT", "2s")])?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let token = token.trim();
    let all = "/api/v1/readings?device=1&from=0&format=csv";

    let mut stalled = open_query(&gw, token, all)?;
    assert_eq!(status_of(&mut stalled)?, 200);
    // Others are served meanwhile.
    let (code, _, body) = http(
        gw.admin,
        "GET",
        "/api/v1/readings?device=1&from=0&limit=10&format=csv",
        Some(token),
    )?;
    assert_eq!(code, 200);
    assert_eq!(body.lines().count(), 11, "{body}");
    let log = db.with_extension("log");
    e2e::wait_until(
        std::time::Duration::from_secs(20),
        "the stalled query dropped",
        || Ok(std::fs::read_to_string(&log)?.contains("response dropped")),
    )?;
    // What the stalled client gets when it reads at last: a response cut short.
    let mut rest = Vec::new();
    stalled.read_to_end(&mut rest)?;
    assert!(
        rest.len() < 12_000_000 && !rest.ends_with(b"\r\n0\r\n\r\n"),
        "{} bytes, ends {:?}",
        rest.len(),
        String::from_utf8_lossy(&rest[rest.len().saturating_sub(16)..])
    );
    // Its slot is free: three queries stream at once again.
    let mut three = Vec::new();
    for _ in 0..3 {
        three.push(open_query(&gw, token, all)?);
    }
    for s in &mut three {
        assert_eq!(
            status_of(s)?,
            200,
            "a slot is still held by the dropped query"
        );
    }
    drop(three);
    gw.stop()?;
    Ok(())
}
