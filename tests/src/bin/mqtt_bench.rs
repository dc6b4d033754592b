//! MQTT forwarding benchmark: how fast the real gateway drains its outbox to a local Mosquitto
//! at QoS 1, every message acknowledged by the broker and received by a subscriber.
//!
//! Each run: a fresh database whose outbox holds `--aggregates` aggregates (as after an
//! outage), a Mosquitto of its own with a QoS 1 subscriber, then `gateway serve` with MQTT
//! on and the backlog rate unbounded; the clock runs from the gateway's start until the
//! subscriber holds every message. Also reports the drain time of one hour of the demo fleet's
//! aggregates (100 devices, 4 sensors, 10 s and 1 min windows: 168,000 aggregates) at the
//! measured rate and at the default backlog rate.
//!
//! Run: `cargo run --release -p e2e --bin mqtt-bench -- [--aggregates 200000] [--runs 3]`

use std::time::{Duration, SystemTime};

use anyhow::Context;
use clap::Parser;
use e2e::mqtt::{Broker, Subscriber};
use e2e::*;
use gateway::aggregate::window::{Aggregate, Stats};
use gateway::store::{OpenOptions, Store};

#[derive(Debug, Parser)]
struct Args {
    /// Aggregates in the outbox at start.
    #[arg(long, default_value_t = 200_000)]
    aggregates: u64,
    /// Runs (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// The gateway's `mqtt.max_inflight`.
    #[arg(long, default_value_t = 100)]
    inflight: u16,
}

/// Aggregates of the demo fleet in one hour: 100 devices x 4 sensors x (360 + 60) windows.
const DEMO_HOUR: u64 = 100 * 4 * (360 + 60);

async fn fill(db: &std::path::Path, n: u64) -> anyhow::Result<()> {
    let store = Store::open(&OpenOptions::cli(db, true)).await?;
    let mut batch = Vec::with_capacity(10_000);
    for i in 0..n {
        batch.push(Aggregate {
            device: (i % 100) as u32 + 1,
            sensor: ((i / 100) % 4) as u16 + 1,
            window_ms: 10_000,
            start_ms: 1_800_000_000_000 + (i / 400) as i64 * 10_000,
            stats: Stats::from_parts(20, 20.5, 23.25, 21.875, 0.75, (0, i, 0), 22.5),
            revision: 0,
        });
        if batch.len() == 10_000 {
            store.store_aggregates(&batch, true).await?;
            batch.clear();
        }
    }
    store.store_aggregates(&batch, true).await?;
    store.close().await;
    Ok(())
}

fn run(args: &Args, rt: &tokio::runtime::Runtime) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    // Devices so that the gateway starts as it would in the field.
    provision(dir.path(), &db, 100)?;
    rt.block_on(fill(&db, args.aggregates))?;
    let broker = Broker::start(dir.path())?;
    let sub = Subscriber::start(&broker, "bench-sub", "gateway/+/+/agg/#")?;
    let cfg = config_file(
        dir.path(),
        &format!(
            "[service]\nid = \"bench\"\n\n[mqtt]\nenabled = true\nport = {}\n\
             backlog_rate = 4000000000\nmax_inflight = {}\n",
            broker.port, args.inflight
        ),
    )?;
    let start = SystemTime::now();
    let gw = TestGateway::start(&db, &["--config", cfg.to_str().context("path")?])?;
    let n = args.aggregates as usize;
    wait_until(Duration::from_secs(600), "every aggregate received", || {
        Ok(sub.count() >= n)
    })?;
    let secs = start.elapsed()?.as_secs_f64();
    gw.stop()?;
    Ok(args.aggregates as f64 / secs)
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut rates = Vec::new();
    for i in 0..args.runs {
        let r = run(&args, &rt)?;
        eprintln!("run {}: {:.0} aggregates/s", i + 1, r);
        rates.push(r);
    }
    rates.sort_by(f64::total_cmp);
    let median = rates[rates.len() / 2];
    println!(
        "forwarded at QoS 1 to a local Mosquitto: median {median:.0} aggregates/s over {} runs \
         of {} (min {:.0}, max {:.0}), max_inflight {}",
        args.runs,
        args.aggregates,
        rates[0],
        rates[rates.len() - 1],
        args.inflight
    );
    println!(
        "one hour of the demo fleet ({DEMO_HOUR} aggregates): {:.1} s at that rate, {:.0} s at \
         the default backlog_rate of 1000/s",
        DEMO_HOUR as f64 / median,
        DEMO_HOUR as f64 / 1000.0
    );
    Ok(())
}
