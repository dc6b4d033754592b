//! Control-channel benchmark with the real binaries on loopback: memory per TLS session,
//! command round trips with thousands of live sessions, and file-transfer throughput.
//!
//! Run: `cargo run --release -p e2e --bin control-bench -- [--devices 2000]`

use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use e2e::*;

#[derive(Debug, Parser)]
struct Args {
    /// Simulated devices holding sessions.
    #[arg(long, default_value_t = 2000)]
    devices: u32,
    /// Devices that receive the file.
    #[arg(long, default_value_t = 100)]
    file_devices: u32,
    /// File size in MiB.
    #[arg(long, default_value_t = 5)]
    file_mib: usize,
    /// Gateway config file (e.g. to raise `control.max_sessions` past 10,000).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

fn quantile(sorted: &[i64], q: f64) -> i64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() - 1) as f64 * q).round() as usize]
}

fn main() -> anyhow::Result<()> {
    use rand::{RngCore, SeedableRng};
    let args = Args::parse();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let fleet = provision(dir.path(), &db, args.devices)?;
    let config = args.config.as_ref().map(|c| c.display().to_string());
    let extra: Vec<&str> = match &config {
        Some(c) => vec!["--config", c],
        None => vec![],
    };
    let gw = TestGateway::start(&db, &extra)?;
    let p = |p: &std::path::Path| p.to_str().map(str::to_owned).context("utf-8 path");
    let admin = gw.admin.to_string();
    let dbs = p(&db)?;
    // Let the gateway settle before the idle reading.
    wait_until(Duration::from_secs(10), "gateway healthy", || {
        Ok(gateway(&["devices", "list", "--format", "json", "--db", &dbs]).is_ok())
    })?;
    let idle = rss_kib(gw.child.id())?;
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args(["--rate", "0.2", "--batch", "1", "--duration", "3600s"])
        .args(["--control", &gw.control.to_string(), "--ca"])
        .arg(dir.path().join("certs/ca.pem"))
        .arg("--files-dir")
        .arg(dir.path().join("sim-files"))
        .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    let t0 = SystemTime::now();
    let n = args.devices as usize;
    wait_until(Duration::from_secs(300), "all devices online", || {
        Ok(online_count(&db)? == n)
    })?;
    let connect_s = t0.elapsed()?.as_secs_f64();
    let held = rss_kib(gw.child.id())?;
    let per_session_kib = (held.saturating_sub(idle)) as f64 / n as f64;
    println!("control-bench: {n} devices, TLS 1.3, loopback");
    println!(
        "sessions: {n} authenticated in {connect_s:.1} s; gateway RSS idle {:.1} MiB, with sessions {:.1} MiB; {per_session_kib:.1} KiB per session = {:.0} sessions per GiB",
        idle as f64 / 1024.0,
        held as f64 / 1024.0,
        1024.0 * 1024.0 / per_session_kib.max(0.001)
    );

    // Command round trips: one ping to every device at once, timed by the gateway's own
    // created/acknowledged timestamps.
    let out = gateway(&[
        "commands", "send", "--all", "ping", "--admin", &admin, "--db", &dbs,
    ])?;
    println!("{}", out.lines().next().unwrap_or(""));
    let rows = || -> anyhow::Result<Vec<serde_json::Value>> {
        let out = gateway(&[
            "commands", "list", "--limit", "100000", "--format", "json", "--admin", &admin, "--db",
            &dbs,
        ])?;
        Ok(serde_json::from_str(&out)?)
    };
    wait_until(Duration::from_secs(120), "every ping acknowledged", || {
        Ok(rows()?.iter().all(|r| r["status"] == "acknowledged"))
    })?;
    let mut rtt: Vec<i64> = rows()?
        .iter()
        .map(|r| r["updated_ms"].as_i64().unwrap_or(0) - r["created_ms"].as_i64().unwrap_or(0))
        .collect();
    rtt.sort_unstable();
    println!(
        "commands: {} pings to all devices at once: round trip (queued -> acknowledged) p50 {} ms, p99 {} ms, max {} ms",
        rtt.len(),
        quantile(&rtt, 0.5),
        quantile(&rtt, 0.99),
        rtt.last().copied().unwrap_or(0)
    );

    // File transfer throughput.
    let mut data = vec![0u8; args.file_mib << 20];
    rand::rngs::SmallRng::seed_from_u64(1).fill_bytes(&mut data);
    let file = dir.path().join("fw.bin");
    std::fs::write(&file, &data)?;
    let t0 = SystemTime::now();
    for d in 1..=args.file_devices {
        gateway(&[
            "files",
            "send",
            "--device",
            &d.to_string(),
            &p(&file)?,
            "--admin",
            &admin,
            "--db",
            &dbs,
        ])?;
    }
    wait_until(Duration::from_secs(600), "every transfer done", || {
        let out = gateway(&[
            "files", "status", "--format", "json", "--admin", &admin, "--db", &dbs,
        ])?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
        Ok(rows.len() == args.file_devices as usize && rows.iter().all(|r| r["status"] == "done"))
    })?;
    let secs = t0.elapsed()?.as_secs_f64();
    let mib = (args.file_mib * args.file_devices as usize) as f64;
    println!(
        "files: {} MiB to {} devices ({mib:.0} MiB) in {secs:.1} s = {:.0} MiB/s, peak RSS {:.1} MiB",
        args.file_mib,
        args.file_devices,
        mib / secs,
        proc_peak_mib(gw.child.id())?
    );
    signal(child.id(), "INT")?;
    child.wait()?;
    gw.stop()?;
    Ok(())
}

fn proc_peak_mib(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = s
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .context("VmHWM")?
        .split_whitespace()
        .next()
        .context("value")?
        .parse()?;
    Ok(kib / 1024.0)
}
