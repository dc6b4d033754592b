//! Commands end to end: through the CLI and admin API to simulated devices and back.

use std::time::Duration;

use anyhow::Context;
use e2e::*;

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn commands(gw: &TestGateway, args: &[&str]) -> anyhow::Result<String> {
    let admin = gw.admin.to_string();
    let mut all = vec!["commands"];
    all.extend_from_slice(args);
    all.extend(["--admin", &admin, "--db", path(&gw.db)]);
    gateway(&all)
}

fn command_rows(gw: &TestGateway, device: u32) -> anyhow::Result<Vec<serde_json::Value>> {
    let out = commands(
        gw,
        &["list", "--device", &device.to_string(), "--format", "json"],
    )?;
    Ok(serde_json::from_str(&out)?)
}

/// Readings stored for `device` with a device timestamp at or after `since_ms`.
fn readings_since(db: &std::path::Path, device: u32, since_ms: i64) -> anyhow::Result<usize> {
    Ok(query_all(db)?
        .iter()
        .filter(|((d, _, _), (_, ts, _))| *d == device && *ts >= since_ms)
        .count())
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

#[test]
fn set_interval_changes_the_rate_of_one_device_only() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 3)?;
    let gw = TestGateway::start(&db, &[])?;
    let ca = dir.path().join("certs/ca.pem");
    let mut cmd = sim(gw.udp, &fleet);
    // 8 readings a second in datagrams of 8: one datagram a second per device.
    cmd.args(["--rate", "8", "--batch", "8", "--duration", "120s"])
        .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
        .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    wait_until(Duration::from_secs(30), "3 devices online", || {
        Ok(online_count(&db)? == 3)
    })?;
    let out = commands(&gw, &["send", "--device", "1", "set-interval", "100"])?;
    assert!(out.contains("1 sent to online devices"), "{out}");
    wait_until(Duration::from_secs(10), "command acknowledged", || {
        Ok(command_rows(&gw, 1)?
            .first()
            .is_some_and(|r| r["status"] == "acknowledged"))
    })?;
    let since = now_ms() + 500;
    // Device 1 now sends a datagram every 100 ms: 80 readings a second.
    wait_until(Duration::from_secs(30), "device 1 at its new rate", || {
        Ok(readings_since(&db, 1, since)? >= 400)
    })?;
    let elapsed_s = (now_ms() - since) as f64 / 1000.0;
    let d1 = readings_since(&db, 1, since)? as f64;
    let d2 = readings_since(&db, 2, since)? as f64;
    let d3 = readings_since(&db, 3, since)? as f64;
    assert!(
        d1 / elapsed_s > 50.0,
        "device 1: {d1} readings in {elapsed_s:.1} s"
    );
    for (d, n) in [(2, d2), (3, d3)] {
        let rate = n / elapsed_s;
        assert!(rate < 16.0, "device {d} changed too: {rate:.1} readings/s");
    }
    signal(child.id(), "INT")?;
    child.wait()?;
    gw.stop()?;
    Ok(())
}

#[test]
fn commands_for_offline_devices_wait_and_are_delivered_once() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    let out = commands(&gw, &["send", "--device", "2", "reboot"])?;
    assert!(out.contains("1 waiting for their device"), "{out}");
    let out = commands(&gw, &["send", "--all", "set-config", "mode=eco", "unit=C"])?;
    assert!(out.contains("queued 2 command(s)"), "{out}");
    assert!(
        command_rows(&gw, 2)?
            .iter()
            .all(|r| r["status"] == "queued")
    );
    let ca = dir.path().join("certs/ca.pem");
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args(["--rate", "1", "--batch", "1", "--duration", "60s"])
        .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
        .args(["--report", path(&dir.path().join("report.json"))])
        .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    wait_until(
        Duration::from_secs(30),
        "queued commands acknowledged",
        || {
            let rows = command_rows(&gw, 2)?;
            Ok(rows.len() == 2 && rows.iter().all(|r| r["status"] == "acknowledged"))
        },
    )?;
    let rows = command_rows(&gw, 2)?;
    assert!(rows.iter().all(|r| r["result"] == "done"), "{rows:?}");
    signal(child.id(), "INT")?;
    child.wait()?;
    let report = read_report(&dir.path().join("report.json"))?;
    let d2 = report
        .devices
        .iter()
        .find(|d| d.id == 2)
        .context("device 2")?;
    assert_eq!(d2.commands, 2, "each command applied exactly once");
    // About 95 KiB of pairs: more than one control frame holds.
    let pairs: Vec<String> = (0..5000)
        .map(|i| format!("key{i:05}=value{i:04}"))
        .collect();
    let mut args = vec!["send", "--device", "1", "set-config"];
    args.extend(pairs.iter().map(String::as_str));
    let err = commands(&gw, &args).unwrap_err();
    assert!(
        err.to_string().contains("larger than a control frame"),
        "{err}"
    );
    let errors = commands(&gw, &["send", "--device", "99", "ping"]).unwrap_err();
    assert!(errors.to_string().contains("no device 99"), "{errors}");
    gw.stop()?;
    Ok(())
}

fn device_config(gw: &TestGateway, args: &[&str]) -> anyhow::Result<String> {
    let admin = gw.admin.to_string();
    let mut all = vec!["devices", "config"];
    all.extend_from_slice(args);
    all.extend(["--admin", &admin, "--db", path(&gw.db)]);
    gateway(&all)
}

#[test]
fn pushed_configuration_is_applied_and_reported() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    // Desired before the device ever connected: pushed when it does.
    let out = device_config(
        &gw,
        &[
            "--device",
            "2",
            "--interval-ms",
            "300",
            "--batch",
            "2",
            "--sensors",
            "3",
        ],
    )?;
    assert!(out.contains("when the device connects"), "{out}");
    let ca = dir.path().join("certs/ca.pem");
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args(["--rate", "8", "--batch", "8", "--duration", "120s"])
        .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
        .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    wait_until(Duration::from_secs(30), "device 2 in sync", || {
        Ok(device_config(&gw, &["--device", "2"])?.contains("in sync   yes"))
    })?;
    // Device 1 reported its own configuration on connect; change one field of it.
    wait_until(Duration::from_secs(30), "device 1 reported", || {
        Ok(device_config(&gw, &["--device", "1"])?.contains("reported  interval 1000 ms"))
    })?;
    let out = device_config(&gw, &["--device", "1", "--sensors", "1,2"])?;
    assert!(out.contains("pushed to the online device"), "{out}");
    wait_until(Duration::from_secs(30), "device 1 in sync", || {
        Ok(device_config(&gw, &["--device", "1"])?.contains("in sync   yes"))
    })?;
    let since = now_ms() + 1000;
    wait_until(
        Duration::from_secs(30),
        "readings under the new configuration",
        || Ok(readings_since(&db, 2, since)? >= 8 && readings_since(&db, 1, since)? >= 16),
    )?;
    let stored = query_all(&db)?;
    let recent = |d: u32| {
        stored
            .iter()
            .filter(move |((dev, _, _), (_, ts, _))| *dev == d && *ts >= since)
    };
    assert!(
        recent(2).all(|(_, (sensor, _, _))| *sensor == 3),
        "device 2 only sensor 3"
    );
    assert!(
        recent(2).all(|((_, _, idx), _)| *idx < 2),
        "device 2 batches of 2"
    );
    assert!(recent(1).all(|(_, (sensor, _, _))| *sensor == 1 || *sensor == 2));
    let err = gateway(&[
        "devices",
        "config",
        "--device",
        "1",
        "--batch",
        "99",
        "--admin",
        &gw.admin.to_string(),
        "--db",
        path(&db),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("batch must be"), "{err}");
    signal(child.id(), "INT")?;
    child.wait()?;
    gw.stop()?;
    Ok(())
}

#[test]
fn undelivered_commands_expire() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    provision(dir.path(), &db, 1)?;
    let gw = TestGateway::start(&db, &[])?;
    let out = commands(&gw, &["send", "--device", "1", "--ttl", "1s", "ping"])?;
    assert!(out.contains("1 waiting for their device"), "{out}");
    assert_eq!(command_rows(&gw, 1)?[0]["status"], "queued");
    wait_until(Duration::from_secs(10), "command expired", || {
        Ok(command_rows(&gw, 1)?[0]["status"] == "expired")
    })?;
    gw.stop()?;
    Ok(())
}
