//! End-to-end acceptance tests of ingest: the real `gateway` and `device-sim` binaries on
//! loopback, a real SQLite file, results read back through `gateway query` and `gateway stats`.

use std::net::UdpSocket;
use std::time::Duration;

use anyhow::Context;
use e2e::*;
use proto::{Batch, DeviceId, DeviceKey, Flags, Header, Millis, Reading, SensorId, Seq};

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// 200 devices for 5 s with acks: the database holds exactly what was sent, values equal.
#[test]
fn fleet_with_acks_is_stored_exactly() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 200)?;
    let gw = TestGateway::start(&db, &[])?;
    let report = dir.path().join("report.json");
    let log = dir.path().join("sent.csv");
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args([
        "--devices",
        "200",
        "--rate",
        "40",
        "--batch",
        "16",
        "--duration",
        "5s",
    ])
    .args(["--ack", "--seed", "7", "--report", path(&report)])
    .args(["--readings-log", path(&log)]);
    run_sim(cmd)?;
    gw.stop()?;

    let report = read_report(&report)?;
    assert_eq!(report.devices.len(), 200);
    assert!(report.readings_sent >= 39_000, "{}", report.summary());
    assert_eq!(report.unacked, 0, "{}", report.summary());
    assert_eq!(report.readings_acked, report.readings_sent);
    let sent = read_sent(&log)?;
    assert_eq!(sent.len() as u64, report.readings_sent);
    let stored = query_all(&db)?;
    assert_eq!(stored.len(), sent.len(), "stored vs sent count");
    for (key, s) in &sent {
        assert_eq!(stored.get(key), Some(&s.val), "reading {key:?}");
    }
    // The per-device report agrees with the database's per-device counts.
    let stats = stats(&db)?;
    let devices = stats["devices"].as_array().context("devices")?;
    for d in &report.devices {
        let row = devices
            .iter()
            .find(|r| r["id"].as_u64() == Some(u64::from(d.id)))
            .context("device row")?;
        assert_eq!(
            row["readings"].as_u64(),
            Some(d.readings_sent),
            "device {}",
            d.id
        );
        assert_eq!(row["datagrams"].as_u64(), Some(d.datagrams_sent));
        assert_eq!(row["lost"].as_u64(), Some(0));
    }
    assert_eq!(counter(&stats, "readings_committed"), report.readings_sent);
    Ok(())
}

/// Loss, duplication, reordering and corruption: every acked reading stored, nothing duplicated
/// or corrupted, and the drop counters account for the injected faults. The devices share
/// sockets in uneven groups (7 per socket), so acks are told apart by device.
#[test]
fn faults_are_survived_and_accounted() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 100)?;
    let gw = TestGateway::start(&db, &[])?;
    let report = dir.path().join("report.json");
    let log = dir.path().join("sent.csv");
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args([
        "--rate",
        "100",
        "--batch",
        "16",
        "--duration",
        "5s",
        "--seed",
        "11",
        "--devices-per-socket",
        "7",
    ])
    .args([
        "--loss",
        "0.05",
        "--dup",
        "0.05",
        "--reorder",
        "0.1",
        "--corrupt",
        "0.01",
    ])
    .args(["--ack", "--ack-timeout", "300ms", "--retries", "8"])
    .args(["--report", path(&report), "--readings-log", path(&log)]);
    run_sim(cmd)?;
    gw.stop()?;

    let report = read_report(&report)?;
    let f = &report.faults;
    assert!(
        f.corrupted > 10 && f.duplicated > 50 && f.lost > 50,
        "{}",
        report.summary()
    );
    let sent = read_sent(&log)?;
    let stored = query_all(&db)?;
    // Every stored reading is one that was sent, unchanged: nothing corrupted got in.
    for (key, val) in &stored {
        let s = sent
            .get(key)
            .with_context(|| format!("stored {key:?} never sent"))?;
        assert_eq!(&s.val, val, "reading {key:?}");
    }
    // Every acknowledged reading is stored.
    let acked = sent.values().filter(|s| s.acked).count() as u64;
    assert_eq!(acked, report.readings_acked);
    for (key, _) in sent.iter().filter(|(_, s)| s.acked) {
        assert!(stored.contains_key(key), "acked reading {key:?} missing");
    }
    assert!(report.readings_acked > report.readings_sent * 9 / 10);

    let stats = stats(&db)?;
    let auth_failures: u64 = [
        "drop_too_short",
        "drop_bad_version",
        "drop_bad_header",
        "drop_unknown_device",
        "drop_bad_tag",
        "drop_bad_payload",
    ]
    .iter()
    .map(|n| counter(&stats, n))
    .sum();
    assert_eq!(
        auth_failures, f.corrupted,
        "each corrupted datagram is one counted drop"
    );
    assert_eq!(counter(&stats, "drop_queue_full"), 0);
    let dups = counter(&stats, "drop_duplicate") + counter(&stats, "drop_replay");
    assert!(
        dups >= f.duplicated && dups <= f.duplicated + report.retransmissions,
        "duplicates {dups} vs injected {} + retransmissions {}",
        f.duplicated,
        report.retransmissions
    );
    assert_eq!(
        counter(&stats, "datagrams_received"),
        counter(&stats, "datagrams_accepted") + auth_failures + dups,
        "every received datagram is accepted or counted as a drop"
    );
    Ok(())
}

/// Datagrams stored before a restart are all rejected when replayed after it.
#[test]
fn replays_after_restart_are_rejected() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    let dev = RawDevice::new(&fleet, 0, gw.udp)?;
    let sent: Vec<Vec<u8>> = (0..200).map(|s| dev.datagram(s, 3)).collect();
    for (seq, d) in sent.iter().enumerate() {
        dev.send_acked(d, seq as u64)?;
    }
    gw.stop()?;
    let before = query_all(&db)?;
    assert_eq!(before.len(), 600);
    let drops_before = stats(&db)?;

    let gw = TestGateway::start(&db, &[])?;
    let attacker = UdpSocket::bind("127.0.0.1:0")?;
    for d in &sent {
        attacker.send_to(d, gw.udp)?;
    }
    // A fresh datagram from the device is still accepted and acked after the replays, which
    // also proves the gateway processed every replay before it.
    let dev = RawDevice::new(&fleet, 0, gw.udp)?;
    dev.send_acked(&dev.datagram(200, 3), 200)?;
    gw.stop()?;

    let after = query_all(&db)?;
    assert_eq!(after.len(), 603, "only the fresh datagram was stored");
    for (k, v) in &before {
        assert_eq!(after.get(k), Some(v));
    }
    let s = stats(&db)?;
    let rejected = |s: &serde_json::Value| counter(s, "drop_duplicate") + counter(s, "drop_replay");
    assert_eq!(
        rejected(&s) - rejected(&drops_before),
        200,
        "every replay rejected"
    );
    // The window holds 128 sequences below the highest (199): 72..=199 are duplicates, 0..72
    // are older than the window and count as replays.
    assert_eq!(
        counter(&s, "drop_replay") - counter(&drops_before, "drop_replay"),
        72
    );
    assert_eq!(
        counter(&s, "drop_duplicate") - counter(&drops_before, "drop_duplicate"),
        128
    );
    Ok(())
}

/// Random bytes and forged datagrams: no panic, no row, not a byte sent back.
#[test]
fn garbage_and_forgeries_are_dropped_silently() -> anyhow::Result<()> {
    use rand::{Rng, RngCore, SeedableRng};
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 5)?;
    let gw = TestGateway::start(&db, &[])?;
    let probe = RawDevice::new(&fleet, 0, gw.udp)?;
    // The attacker has an address of its own: its failed authentications get it limited
    // (telemetry.auth_failures_*), which must not touch the probe's address.
    let attacker = UdpSocket::bind("127.0.0.2:0")?;
    attacker.set_nonblocking(true)?;
    let mut rng = rand::rngs::SmallRng::seed_from_u64(5);
    let mut probe_seq = 0u64;
    let mut buf = vec![0u8; 1400];
    for i in 0..110_000u32 {
        let len = if i < 100_000 {
            let len = rng.random_range(0..1300);
            rng.fill_bytes(&mut buf[..len]);
            len
        } else {
            // Forged: a valid header for a provisioned device, sealed with a wrong key.
            let wrong = DeviceKey(rng.random());
            let header = Header {
                flags: Flags(Flags::ACK_REQUESTED),
                device: DeviceId(rng.random_range(1..=5)),
                seq: Seq(rng.random_range(0..1_000_000)),
            };
            let batch = Batch {
                readings: vec![
                    Reading {
                        sensor: SensorId(1),
                        ts: Millis(1),
                        value: 1.0
                    };
                    rng.random_range(0..=50)
                ],
            };
            let d = batch.seal(&header, &wrong.cipher())?.0;
            buf[..d.len()].copy_from_slice(&d);
            d.len()
        };
        attacker.send_to(&buf[..len], gw.udp)?;
        if i % 1000 == 999 {
            // Pace the flood: an empty, acked probe proves everything before it was handled.
            probe.send_acked(&probe.datagram(probe_seq, 0), probe_seq)?;
            probe_seq += 1;
        }
    }
    let mut one = [0u8; 2048];
    match attacker.recv_from(&mut one) {
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
        other => panic!("the gateway answered the attacker: {other:?}"),
    }
    gw.stop()?;
    assert!(query_all(&db)?.is_empty(), "no reading may be stored");
    let s = stats(&db)?;
    let drops: u64 = s["counters"]
        .as_object()
        .context("counters")?
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum();
    assert_eq!(drops, 110_000, "every bad datagram counted");
    assert_eq!(counter(&s, "datagrams_accepted"), probe_seq);
    // The forgeries: checked and refused until the attacker's burst of failures (1,000) is
    // spent, then dropped unchecked; the probe, from another address, was never limited.
    let (bad_tag, limited) = (
        counter(&s, "drop_bad_tag"),
        counter(&s, "drop_auth_limited"),
    );
    assert!(bad_tag >= 1000, "bad_tag {bad_tag}");
    assert!(limited > 0, "the attacker was never limited");
    assert!(
        bad_tag + limited >= 10_000,
        "bad_tag {bad_tag} auth_limited {limited}"
    );
    Ok(())
}

/// Runs a fleet with acks against `gw` until `stop_gateway` has been applied to the gateway;
/// returns the readings the simulator logged.
fn load_then(
    dir: &std::path::Path,
    gw: &mut TestGateway,
    fleet: &std::path::Path,
    stop_gateway: &str,
) -> anyhow::Result<(std::collections::BTreeMap<Key, Sent>, Duration)> {
    let log = dir.join("sent.csv");
    let mut cmd = sim(gw.udp, fleet);
    cmd.args([
        "--rate",
        "200",
        "--batch",
        "16",
        "--duration",
        "60s",
        "--ack",
    ])
    .args(["--readings-log", path(&log)])
    .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    let db = gw.db.clone();
    wait_until(
        Duration::from_secs(30),
        "readings committed under load",
        || Ok(counter(&stats(&db)?, "readings_committed") > 20_000),
    )?;
    let t0 = std::time::SystemTime::now();
    gw.signal(stop_gateway)?;
    gw.wait_exit(Duration::from_secs(10))?;
    let took = t0.elapsed()?;
    signal(child.id(), "INT")?;
    let status = child.wait()?;
    assert!(status.success(), "device-sim exit {status}");
    Ok((read_sent(&log)?, took))
}

/// SIGTERM under load: exits within 5 s and every acknowledged reading is stored.
#[test]
fn sigterm_under_load_keeps_every_acked_reading() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 200)?;
    let mut gw = TestGateway::start(&db, &[])?;
    let (sent, took) = load_then(dir.path(), &mut gw, &fleet, "TERM")?;
    assert!(gw.child.try_wait()?.is_some_and(|s| s.success()));
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let stored = query_all(&db)?;
    // A clean shutdown writes its final counters: they agree with the rows.
    assert_eq!(
        counter(&stats(&db)?, "readings_committed"),
        stored.len() as u64
    );
    let acked: Vec<_> = sent.iter().filter(|(_, s)| s.acked).collect();
    assert!(acked.len() > 20_000);
    for (key, s) in acked {
        assert_eq!(stored.get(key), Some(&s.val), "acked reading {key:?}");
    }
    Ok(())
}

/// SIGKILL under load and restart: every acknowledged reading is stored and the database is
/// intact.
#[test]
fn sigkill_under_load_keeps_every_acked_reading() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 200)?;
    let mut gw = TestGateway::start(&db, &[])?;
    let (sent, _) = load_then(dir.path(), &mut gw, &fleet, "KILL")?;
    // Restart on the same file: recovery must succeed.
    let gw = TestGateway::start(&db, &[])?;
    gw.stop()?;
    let stored = query_all(&db)?;
    let acked: Vec<_> = sent.iter().filter(|(_, s)| s.acked).collect();
    assert!(acked.len() > 20_000);
    for (key, s) in acked {
        assert_eq!(stored.get(key), Some(&s.val), "acked reading {key:?}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let check = rt.block_on(async {
        let store =
            gateway::store::Store::open(&gateway::store::OpenOptions::cli(&db, false)).await?;
        let r = store.integrity_check().await;
        store.close().await;
        r
    })?;
    assert_eq!(check, "ok");
    Ok(())
}
