//! Ingest benchmark: the real `gateway` and `device-sim` binaries on loopback, stepping the
//! offered load up to find the highest rate at which every reading is committed and acked.
//!
//! For each rate: a fresh database, `--devices` provisioned devices, `device-sim --ack` for
//! `--duration`, then the gateway's counters (committed readings, drops, receive-to-commit
//! latency p50/p99), its peak RSS (VmHWM) and CPU time, and the simulator's report.
//!
//! Run: `cargo run --release -p e2e --bin ingest-bench -- [--rates 100000,200000] [--devices 1000]`

use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use e2e::*;

#[derive(Debug, Parser)]
struct Args {
    /// Offered loads to try, total readings per second, comma-separated.
    #[arg(long, value_delimiter = ',', default_values_t = [100_000u64, 150_000, 200_000, 250_000, 300_000])]
    rates: Vec<u64>,
    /// Simulated devices.
    #[arg(long, default_value_t = 1000)]
    devices: u32,
    /// Readings per datagram.
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// Seconds of load per rate.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Gateway durability setting.
    #[arg(long, default_value = "normal")]
    durability: String,
    /// Gateway config file (e.g. one with `[aggregate] enabled = false`).
    #[arg(long)]
    config: Option<std::path::PathBuf>,
}

struct Row {
    rate: u64,
    sent: u64,
    committed: u64,
    acked: u64,
    unacked: u64,
    retx: u64,
    drops: u64,
    elapsed: f64,
    p50_ms: f64,
    p99_ms: f64,
    rss_mib: f64,
    cpu_cores: f64,
}

fn proc_status_kib(pid: u32, field: &str) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = s
        .lines()
        .find(|l| l.starts_with(field))
        .with_context(|| format!("{field} in /proc status"))?;
    Ok(line.split_whitespace().nth(1).context("value")?.parse()?)
}

/// utime + stime of a process, seconds (assumes the usual 100 ticks per second).
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let after = s.rsplit(')').next().context("stat")?;
    let f: Vec<&str> = after.split_whitespace().collect();
    let ticks: u64 =
        f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?;
    Ok(ticks as f64 / 100.0)
}

fn run_one(args: &Args, rate: u64) -> anyhow::Result<Row> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("bench.db");
    let fleet = provision(dir.path(), &db, args.devices)?;
    let mut extra = vec!["--durability".to_owned(), args.durability.clone()];
    if let Some(cfg) = &args.config {
        extra.push("--config".into());
        extra.push(cfg.display().to_string());
    }
    let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
    let gw = TestGateway::start(&db, &extra)?;
    let report = dir.path().join("report.json");
    let per_device = rate as f64 / f64::from(args.devices);
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args(["--rate", &per_device.to_string()])
        .args(["--batch", &args.batch.to_string()])
        .args(["--duration", &format!("{}ms", args.duration.as_millis())])
        .args(["--ack", "--report"])
        .arg(&report)
        .stdout(std::process::Stdio::null());
    let cpu0 = cpu_seconds(gw.child.id())?;
    let t0 = std::time::SystemTime::now();
    run_sim(cmd)?;
    let elapsed = t0.elapsed()?.as_secs_f64();
    let cpu = cpu_seconds(gw.child.id())? - cpu0;
    let rss = proc_status_kib(gw.child.id(), "VmHWM:")?;
    gw.stop()?;
    let r = read_report(&report)?;
    let s = stats(&db)?;
    let drops = s["counters"]
        .as_object()
        .context("counters")?
        .iter()
        .filter(|(k, _)| k.starts_with("drop_"))
        .map(|(_, v)| v.as_u64().unwrap_or(0))
        .sum();
    Ok(Row {
        rate,
        sent: r.readings_sent,
        committed: counter(&s, "readings_committed"),
        acked: r.readings_acked,
        unacked: r.unacked,
        retx: r.retransmissions,
        drops,
        elapsed: r.elapsed_s,
        p50_ms: counter(&s, "commit_latency_p50_us") as f64 / 1000.0,
        p99_ms: counter(&s, "commit_latency_p99_us") as f64 / 1000.0,
        rss_mib: rss as f64 / 1024.0,
        cpu_cores: cpu / elapsed,
    })
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    println!(
        "ingest-bench: {} devices, {} readings/datagram, {:?} per rate, acks on, durability {}",
        args.devices, args.batch, args.duration, args.durability
    );
    println!(
        "| offered readings/s | committed readings/s | datagrams/s | sent | committed | acked | unacked | retransmits | drops | p50 ms | p99 ms | gateway RSS MiB | gateway CPU cores | sustained |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|:---:|");
    let mut best = None;
    for &rate in &args.rates {
        let r = run_one(&args, rate)?;
        // Sustained: everything committed and acked on the first transmission, nothing dropped.
        let zero_loss = r.committed == r.sent
            && r.acked == r.sent
            && r.unacked == 0
            && r.retx == 0
            && r.drops == 0;
        let secs = args.duration.as_secs_f64();
        println!(
            "| {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {:.2} | {:.2} | {:.1} | {:.2} | {} |",
            r.rate,
            r.committed as f64 / secs,
            r.committed as f64 / secs / args.batch as f64,
            r.sent,
            r.committed,
            r.acked,
            r.unacked,
            r.retx,
            r.drops,
            r.p50_ms,
            r.p99_ms,
            r.rss_mib,
            r.cpu_cores,
            if zero_loss { "yes" } else { "no" }
        );
        let _ = r.elapsed;
        if zero_loss {
            best = Some(r.rate);
        }
    }
    match best {
        Some(b) => {
            println!(
                "highest sustained rate (all committed and acked, no retransmission): {b} readings/s"
            )
        }
        None => println!("no rate tried was sustained"),
    }
    Ok(())
}
