//! File transfer end to end: a 5 MiB file to 100 simulated devices over TLS, with every
//! session cut halfway (the simulator is killed) and resumed by a new one.

use std::time::Duration;

use anyhow::Context;
use e2e::*;

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn transfers(gw: &TestGateway) -> anyhow::Result<Vec<serde_json::Value>> {
    let admin = gw.admin.to_string();
    let out = gateway(&[
        "files",
        "status",
        "--format",
        "json",
        "--admin",
        &admin,
        "--db",
        path(&gw.db),
    ])?;
    Ok(serde_json::from_str(&out)?)
}

#[test]
fn five_mib_to_a_hundred_devices_survives_cut_sessions() -> anyhow::Result<()> {
    use rand::{RngCore, SeedableRng};
    use sha2::Digest;
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 100)?;
    let cfg = config_file(dir.path(), "[control]\nheartbeat = \"1s\"\n")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let ca = dir.path().join("certs/ca.pem");
    let files_dir = dir.path().join("sim-files");
    let report = dir.path().join("report.json");
    let start_sim = || -> anyhow::Result<KillOnDrop> {
        let mut cmd = sim(gw.udp, &fleet);
        cmd.args(["--rate", "1", "--batch", "1", "--duration", "600s"])
            .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
            .args(["--files-dir", path(&files_dir), "--report", path(&report)])
            .stdout(std::process::Stdio::null());
        Ok(KillOnDrop(cmd.spawn()?))
    };
    let mut first = start_sim()?;
    wait_until(Duration::from_secs(60), "100 devices online", || {
        Ok(online_count(&db)? == 100)
    })?;

    let mut data = vec![0u8; 5 << 20];
    rand::rngs::SmallRng::seed_from_u64(3).fill_bytes(&mut data);
    let sha = hex::encode(sha2::Sha256::digest(&data));
    // A name with a space: stored on the devices under its sanitised form.
    let firmware = dir.path().join("firmware v2.bin");
    std::fs::write(&firmware, &data)?;
    let admin = gw.admin.to_string();
    let out = gateway(&[
        "files",
        "send",
        "--all",
        path(&firmware),
        "--admin",
        &admin,
        "--db",
        path(&db),
    ])?;
    assert!(out.contains("queued for 100 device(s)"), "{out}");
    assert!(out.contains(&sha), "{out}");

    // Cut every session once the devices are part-way through.
    let total = 100 * data.len() as i64;
    wait_until(Duration::from_secs(120), "40% confirmed", || {
        let confirmed: i64 = transfers(&gw)?
            .iter()
            .map(|t| t["acked_offset"].as_i64().unwrap_or(0))
            .sum();
        Ok(confirmed * 10 >= total * 4)
    })?;
    first.kill()?;
    first.wait()?;
    let rows = transfers(&gw)?;
    assert!(
        rows.iter().any(|t| t["status"] == "sending"),
        "the cut must leave transfers unfinished: {rows:?}"
    );

    let mut second = start_sim()?;
    wait_until(Duration::from_secs(180), "every transfer done", || {
        let rows = transfers(&gw)?;
        assert!(rows.iter().all(|t| t["status"] != "failed"), "{rows:?}");
        Ok(rows.len() == 100 && rows.iter().all(|t| t["status"] == "done"))
    })?;
    signal(second.id(), "INT")?;
    assert!(second.wait()?.success());

    // Every device holds the file, intact, under its sanitised name.
    for d in 1..=100 {
        let stored = files_dir.join(d.to_string()).join("firmware_v2.bin");
        let bytes = std::fs::read(&stored).with_context(|| format!("{}", stored.display()))?;
        assert_eq!(hex::encode(sha2::Sha256::digest(&bytes)), sha, "device {d}");
    }
    // The second run resumed the cut transfers from where the devices had stopped.
    let report = read_report(&report)?;
    let resumed: Vec<u64> = report
        .devices
        .iter()
        .flat_map(|d| d.files.iter())
        .filter(|f| f.ok && f.sha256 == sha)
        .flat_map(|f| f.resumed_from.iter().copied())
        .collect();
    assert!(
        resumed.iter().filter(|o| **o > 0).count() >= 50,
        "most transfers resumed part-way: {resumed:?}"
    );
    gw.stop()?;
    Ok(())
}
