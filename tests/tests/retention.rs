//! Retention against the real gateway, simulator and broker: with a short retention and a size
//! cap, a long run keeps the database under the cap, loses no acknowledged reading, and never
//! deletes a window that is still waiting in the outbox during a broker outage.

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use e2e::mqtt::{Broker, Subscriber, agg_messages, latest, mqtt_config};
use e2e::{
    KillOnDrop, TestGateway, admin_get, counter, metric, provision, read_report, serial, sim,
    stats, wait_until,
};

/// The size cap of the run.
const CAP: u64 = 3 << 20;

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Windows in the outbox whose row in `aggregates` is gone (must stay 0), the outbox's agg
/// rows and the age of the oldest, ms.
fn unsent_without_window(db: &Path) -> anyhow::Result<(i64, i64, i64)> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)?;
    conn.busy_timeout(Duration::from_secs(10))?;
    let missing: i64 = conn.query_row(
        "SELECT count(*) FROM outbox o WHERE o.kind = 'agg' AND NOT EXISTS (\
         SELECT 1 FROM aggregates a WHERE a.device = json_extract(o.payload, '$.device') \
         AND a.window_ms = json_extract(o.payload, '$.window_ms') \
         AND a.start_ms = json_extract(o.payload, '$.window_start_ms') \
         AND a.sensor = json_extract(o.payload, '$.sensor'))",
        [],
        |r| r.get(0),
    )?;
    let (rows, oldest): (i64, Option<i64>) = conn.query_row(
        "SELECT count(*), min(created_ms) FROM outbox WHERE kind = 'agg'",
        [],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let now = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)?
        .as_millis() as i64;
    Ok((missing, rows, oldest.map_or(0, |o| now - o)))
}

#[test]
fn a_long_run_stays_under_the_cap_and_keeps_unsent_windows() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start(dir.path())?;
    let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 50)?;
    // Raw readings 15 s, 1 s windows 20 s, 5 s windows 40 s, 3 MiB in all.
    let cfg = mqtt_config(
        dir.path(),
        &broker,
        "backlog_rate = 5000\n\n[retention]\nreadings = \"15s\"\naggregates = \"40s\"\n\
         tiers = { \"1s\" = \"20s\" }\nmax_db_size = \"3MiB\"\ninterval = \"1s\"\nbatch = 500\n",
    )?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let token = dir.path().join("admin.token");
    let report = dir.path().join("report.json");
    // 50 devices × 400 readings/s = 20,000 readings/s for 60 s: ~16 MiB of readings unpruned.
    let mut fleet_run = KillOnDrop(
        sim(gw.udp, &fleet)
            .args([
                "--rate",
                "400",
                "--batch",
                "16",
                "--duration",
                "60s",
                "--ack",
            ])
            .arg("--report")
            .arg(&report)
            .stdout(Stdio::null())
            .spawn()?,
    );
    let size = || std::fs::metadata(&db).map(|m| m.len()).unwrap_or(0);
    let mut largest = 0u64;
    let pruned = |largest: &mut u64| -> anyhow::Result<u64> {
        let (_, text) = admin_get(gw.admin, &token, "/metrics")?;
        if metric(&text, "gateway_retention_readings_deleted_total") > 0 {
            *largest = (*largest).max(size());
        }
        Ok(metric(&text, "gateway_retention_readings_deleted_total"))
    };
    wait_until(
        Duration::from_secs(30),
        "retention deleting readings",
        || Ok(pruned(&mut largest)? > 0),
    )?;
    wait_until(Duration::from_secs(20), "aggregates flowing", || {
        Ok(agg_messages(&sub.messages())?.len() > 1_000)
    })?;

    // A broker outage longer than the 1 s tier's retention: its unsent windows must stay.
    broker.stop()?;
    let down = SystemTime::now();
    let (_, text) = admin_get(gw.admin, &token, "/metrics")?;
    let deleted_before = metric(&text, "gateway_retention_aggregates_deleted_total");
    wait_until(Duration::from_secs(40), "an outage of 28 s", || {
        pruned(&mut largest)?;
        let (missing, _, _) = unsent_without_window(&db)?;
        assert_eq!(missing, 0, "an unsent window was deleted");
        Ok(down.elapsed().unwrap_or_default() >= Duration::from_secs(28))
    })?;
    let (missing, rows, oldest_ms) = unsent_without_window(&db)?;
    let (_, text) = admin_get(gw.admin, &token, "/metrics")?;
    let deleted_during =
        metric(&text, "gateway_retention_aggregates_deleted_total") - deleted_before;
    eprintln!(
        "outage: {rows} windows waiting, oldest {oldest_ms} ms, {deleted_during} sent windows \
         deleted meanwhile, {missing} unsent deleted"
    );
    assert_eq!(missing, 0);
    assert!(
        oldest_ms > 20_000,
        "the outbox never held a window past the tier's retention"
    );
    assert!(
        deleted_during > 0,
        "retention deleted no sent window during the outage"
    );
    broker.resume()?;

    wait_until(Duration::from_secs(60), "simulator done", || {
        pruned(&mut largest)?;
        Ok(fleet_run.try_wait()?.is_some())
    })?;
    assert!(fleet_run.wait()?.success());
    let r = read_report(&report)?;
    assert_eq!(
        r.unacked, 0,
        "acknowledged readings: every one was committed"
    );
    assert_eq!(r.readings_acked, r.readings_sent);

    // Every window the gateway closed reached the subscriber, none dropped from the outbox.
    wait_until(Duration::from_secs(60), "outbox drained", || {
        let (_, text) = admin_get(gw.admin, &token, "/metrics")?;
        Ok(metric(&text, "gateway_outbox_rows") == 0)
    })?;
    let s = stats(&db)?;
    let (_, text) = admin_get(gw.admin, &token, "/metrics")?;
    let closed = metric(&text, "gateway_aggregates_closed_total");
    wait_until(
        Duration::from_secs(30),
        "every window at the subscriber",
        || Ok(latest(&agg_messages(&sub.messages())?).len() as u64 >= closed),
    )
    .with_context(|| format!("{closed} windows closed"))?;
    assert_eq!(counter(&s, "outbox_dropped"), 0);

    // Every reading ages out (kept 15 s): the counter must reach exactly what was sent, never
    // pass it, and nothing may be left behind.
    let deleted = || -> anyhow::Result<u64> {
        let (_, text) = admin_get(gw.admin, &token, "/metrics")?;
        let n = metric(&text, "gateway_retention_readings_deleted_total");
        assert!(
            n <= r.readings_sent,
            "{n} readings counted as deleted, {} sent: one was counted twice",
            r.readings_sent
        );
        Ok(n)
    };
    let aged_out = wait_until(Duration::from_secs(60), "every reading aged out", || {
        Ok(deleted()? == r.readings_sent)
    });
    let stored = e2e::query_all(&db)?.len() as u64;
    let readings_deleted = deleted()?;
    eprintln!(
        "RESULT retention: {} readings sent and acked, {readings_deleted} deleted by retention, \
         {stored} left; largest database file {:.2} MiB (cap {:.0} MiB); {closed} windows all \
         delivered",
        r.readings_sent,
        largest as f64 / 1048576.0,
        CAP as f64 / 1048576.0
    );
    if aged_out.is_err() {
        let out = std::process::Command::new(e2e::bin("gateway"))
            .args(["db", "status", "--db"])
            .arg(&db)
            .output()?;
        eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    }
    aged_out?;
    assert_eq!(stored, 0, "readings past their retention were left");
    assert!(
        largest <= CAP,
        "database file reached {largest} bytes, cap {CAP}"
    );
    gw.stop()?;
    Ok(())
}
