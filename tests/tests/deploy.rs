//! What packaging relies on: the systemd unit passes `systemd-analyze verify`, and the real
//! binary speaks the notification protocol of `Type=notify` (ready, watchdog, stopping).

use std::os::unix::net::UnixDatagram;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use e2e::{KillOnDrop, bin, serial, signal};

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() -> anyhow::Result<()> {
    let _serial = serial();
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../deploy/gateway.service"
    ))?;
    assert!(unit.contains("Type=notify") && unit.contains("WatchdogSec="));
    for hardening in [
        "User=gateway",
        "StateDirectory=gateway",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ] {
        assert!(unit.contains(hardening), "{hardening} missing");
    }
    // verify checks that ExecStart's binary exists: point it at the one just built, in a
    // directory of its own named like the installed unit.
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("gateway.service");
    let gateway = bin("gateway");
    std::fs::write(
        &path,
        unit.replace("/usr/bin/gateway", gateway.to_str().context("path")?),
    )?;
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .context("running systemd-analyze (Debian package systemd)")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "systemd-analyze verify: {stderr}");
    // Only lines about this unit matter (the host's own units may have findings of their own).
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("gateway.service"))
        .collect();
    assert!(ours.is_empty(), "findings: {ours:?}");
    Ok(())
}

#[test]
fn the_gateway_notifies_ready_watchdog_and_stopping() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let sock_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&sock_path)?;
    sock.set_read_timeout(Some(Duration::from_secs(30)))?;
    let db = dir.path().join("gw.db");
    let child = KillOnDrop(
        Command::new(bin("gateway"))
            .args(["serve", "--udp", "127.0.0.1:0", "--control", "127.0.0.1:0"])
            .args(["--admin", "127.0.0.1:0", "--db"])
            .arg(&db)
            .env("NOTIFY_SOCKET", &sock_path)
            // A watchdog of 400 ms: pings every 200 ms.
            .env("WATCHDOG_USEC", "400000")
            .env_remove("WATCHDOG_PID")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?,
    );
    let mut buf = [0u8; 512];
    let mut recv = || -> anyhow::Result<String> {
        let n = sock.recv(&mut buf).context("waiting for a notification")?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    };
    let first = recv()?;
    assert!(first.starts_with("READY=1\n"), "{first:?}");
    assert!(
        first.contains("STATUS=serving telemetry on 127.0.0.1:"),
        "{first:?}"
    );
    // The database exists and is open by the time READY is sent.
    assert!(db.exists());
    for _ in 0..3 {
        assert_eq!(recv()?, "WATCHDOG=1");
    }
    signal(child.0.id(), "TERM")?;
    let mut last = String::new();
    // Watchdog pings already on their way may come first.
    for _ in 0..5 {
        last = recv()?;
        if last != "WATCHDOG=1" {
            break;
        }
    }
    assert_eq!(last, "STOPPING=1");
    let mut child = child;
    let status = child.0.wait()?;
    assert!(status.success(), "{status}");
    Ok(())
}
