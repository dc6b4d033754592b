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
    /// Gateway config file. Without one the bench writes a config whose session limits
    /// (`control.max_sessions`, `control.max_sessions_per_ip`) fit `--devices`.
    #[arg(long)]
    config: Option<std::path::PathBuf>,
    /// Simulator processes to split the fleet over (each device holds a UDP and a TCP socket,
    /// so one process runs out of files first). Default: one per 8,000 devices.
    #[arg(long)]
    sims: Option<u32>,
    /// How long to hold the sessions while sampling the gateway's RSS.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    hold: Duration,
    /// Readings per second each device also sends over UDP (one per datagram). Telemetry
    /// costs the gateway memory of its own (aggregation windows per device, the writer), which
    /// grows with the hold and is measured by ingest-bench's many-small-flows case; raise this
    /// to see both together.
    #[arg(long, default_value_t = 0.2)]
    telemetry_rate: f64,
}

/// Splits a fleet file into `n` files of consecutive devices.
fn split_fleet(fleet: &std::path::Path, n: u32) -> anyhow::Result<Vec<std::path::PathBuf>> {
    use device_sim::fleet::FleetFile;
    let all = FleetFile::load(fleet)?;
    let per = all.devices.len().div_ceil(n.max(1) as usize).max(1);
    let mut out = Vec::new();
    for (i, chunk) in all.devices.chunks(per).enumerate() {
        let part = FleetFile {
            version: all.version,
            devices: chunk.to_vec(),
        };
        let path = fleet.with_file_name(format!("fleet-{i}.json"));
        part.save(&path)?;
        out.push(path);
    }
    Ok(out)
}

/// Devices the gateway has marked online, read straight from its database (cheap enough to
/// poll while 20,000 sessions connect, unlike a `gateway devices list` process per poll).
fn online_now(db: &std::path::Path) -> anyhow::Result<usize> {
    let conn = rusqlite::Connection::open_with_flags(
        db,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(5))?;
    let n: i64 = conn.query_row("SELECT count(*) FROM devices WHERE online = 1", [], |r| {
        r.get(0)
    })?;
    Ok(usize::try_from(n).unwrap_or(0))
}

/// The pace of RSS sampling while sessions are held (a sampling interval, not a wait for a
/// condition).
#[allow(clippy::disallowed_methods)]
fn sample_pause() {
    std::thread::sleep(Duration::from_millis(250));
}

/// The gateway's limit on open files (each session holds one).
fn open_files_limit(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/limits"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .context("Max open files")?;
    let soft = line
        .trim_start_matches("Max open files")
        .split_whitespace()
        .next()
        .context("limit")?;
    Ok(soft.parse().unwrap_or(u64::MAX))
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
    let config = match &args.config {
        Some(c) => c.clone(),
        None => {
            let path = dir.path().join("bench.toml");
            let limit = args.devices + 100;
            std::fs::write(
                &path,
                format!("[control]\nmax_sessions = {limit}\nmax_sessions_per_ip = {limit}\n"),
            )?;
            path
        }
    };
    let config = Some(config.display().to_string());
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
        Ok(online_now(&db).is_ok())
    })?;
    let files_limit = open_files_limit(gw.child.id())?;
    // Beyond the sessions the gateway holds its database, listeners and runtime (~40 files).
    anyhow::ensure!(
        u64::from(args.devices) + 40 <= files_limit,
        "the gateway may open {files_limit} files on this host, too few for {} sessions \
         (one file each, plus ~40): raise its open-file limit (ulimit -n / LimitNOFILE)",
        args.devices
    );
    let idle = rss_kib(gw.child.id())?;
    let sims = args.sims.unwrap_or(args.devices.div_ceil(8000)).max(1);
    let mut children = Vec::new();
    for (i, part) in split_fleet(&fleet, sims)?.iter().enumerate() {
        let mut cmd = sim(gw.udp, part);
        cmd.args(["--rate", &args.telemetry_rate.to_string()])
            .args(["--batch", "1", "--duration", "3600s"])
            .args(["--control", &gw.control.to_string(), "--ca"])
            .arg(dir.path().join("certs/ca.pem"))
            .arg("--files-dir")
            .arg(dir.path().join(format!("sim-files-{i}")))
            .stdout(std::process::Stdio::null());
        children.push(KillOnDrop(cmd.spawn()?));
    }
    let t0 = SystemTime::now();
    let n = args.devices as usize;
    wait_until(Duration::from_secs(600), "all devices online", || {
        Ok(online_now(&db)? == n)
    })?;
    let connect_s = t0.elapsed()?.as_secs_f64();
    // Hold the sessions (heartbeats flowing) and keep the largest RSS seen and the last one
    // (after the storm, once the gateway has returned the handshakes' freed memory).
    let mut held = rss_kib(gw.child.id())?;
    let mut last = held;
    let hold_until = SystemTime::now() + args.hold;
    while SystemTime::now() < hold_until {
        sample_pause();
        last = rss_kib(gw.child.id())?;
        held = held.max(last);
    }
    anyhow::ensure!(online_now(&db)? == n, "sessions were lost while held");
    let per_session_kib = (held.saturating_sub(idle)) as f64 / n as f64;
    let settled_kib = (last.saturating_sub(idle)) as f64 / n as f64;
    println!(
        "control-bench: {n} devices over {sims} simulator process(es), TLS 1.3, loopback, {} readings/s per device over UDP; gateway open-file limit {files_limit}",
        args.telemetry_rate
    );
    println!(
        "sessions: {n} authenticated in {connect_s:.1} s; gateway RSS idle {:.1} MiB, holding {n} sessions for {}: largest sample {:.1} MiB ({per_session_kib:.1} KiB per session = {:.0} sessions per GiB), last sample {:.1} MiB ({settled_kib:.1} KiB per session), peak {:.1} MiB",
        idle as f64 / 1024.0,
        humantime::format_duration(args.hold),
        held as f64 / 1024.0,
        1024.0 * 1024.0 / per_session_kib.max(0.001),
        last as f64 / 1024.0,
        proc_peak_mib(gw.child.id())?,
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
    for mut child in children {
        signal(child.id(), "INT")?;
        child.0.wait()?;
    }
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
