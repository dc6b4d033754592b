//! `gateway demo`: a gateway on loopback with a local database, a provisioned fleet, and the
//! simulated fleet in the same process, with live ingest figures until Ctrl-C or `--duration`.

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use device_sim::fleet::FleetFile;
use device_sim::{Faults, Progress, SimConfig};
use tokio_util::sync::CancellationToken;

use crate::Gateway;
use crate::cli::{DemoArgs, provision};
use crate::config::Config;
use crate::store::{OpenOptions, Store};

/// Runs the demo.
///
/// # Errors
/// Database, socket or fleet file errors.
pub async fn run(args: DemoArgs) -> anyhow::Result<()> {
    let db = args.db.db.clone();
    let store = Store::open(&OpenOptions::cli(&db, true)).await?;
    let fleet = match reusable_fleet(&store, &args).await {
        Some(f) => {
            println!(
                "using {} devices from {}{}",
                f.devices.len(),
                args.fleet.display(),
                if f.devices.len() as u32 != args.devices {
                    " (delete it to provision a different number)"
                } else {
                    ""
                }
            );
            f
        }
        None => {
            let f = provision(&store, args.devices, &args.fleet).await?;
            println!(
                "provisioned {} devices into {}, fleet file {}",
                f.devices.len(),
                db.display(),
                args.fleet.display()
            );
            f
        }
    };
    store.close().await;

    let mut cfg = Config::default();
    cfg.store.path = db.clone();
    cfg.telemetry.listen = "127.0.0.1:0".parse().context("loopback address")?;
    cfg.control.listen = "127.0.0.1:0".parse().context("loopback address")?;
    // The usual API port, so the README's commands work; a free one when it is taken.
    cfg.admin.listen = match std::net::TcpListener::bind(args.admin) {
        Ok(_) => args.admin,
        Err(e) => {
            println!(
                "{} is taken ({e}); the HTTP API gets a free port",
                args.admin
            );
            "127.0.0.1:0".parse().context("loopback address")?
        }
    };
    let gateway = Gateway::start(&cfg).await?;
    println!(
        "gateway listening on udp://{}, database {}",
        gateway.udp_addr,
        db.display()
    );
    let token = crate::config::token_file(&db);
    // The token rides in the fragment, which the browser keeps to itself; the page moves it
    // into the tab's session storage and out of the address bar.
    match std::fs::read_to_string(&token) {
        Ok(t) => println!(
            "dashboard: open http://{}/dashboard/#token={}",
            gateway.admin_addr,
            t.trim()
        ),
        Err(e) => println!(
            "dashboard on http://{}/dashboard/ (token file {}: {e})",
            gateway.admin_addr,
            token.display()
        ),
    }
    println!(
        "HTTP API on http://{} (token in {}), e.g.\n  curl -H \"Authorization: Bearer $(cat {})\" 'http://{}/api/v1/readings?device=1&since=1m&format=csv'",
        gateway.admin_addr,
        token.display(),
        token.display(),
        gateway.admin_addr
    );
    println!(
        "simulating {} devices at {} readings/s each ({} per datagram, acks on); Ctrl-C to stop",
        fleet.devices.len(),
        args.rate,
        args.batch
    );

    let mut sim = SimConfig::new(gateway.udp_addr);
    sim.rate = args.rate;
    sim.batch = args.batch;
    sim.duration = args.duration;
    sim.ack = true;
    sim.faults = Faults::default();
    sim.fleet_path = Some(args.fleet.clone());
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let sim_task = {
        let progress = progress.clone();
        let cancel = cancel.clone();
        tokio::spawn(async move { device_sim::run(&sim, fleet, progress, cancel).await })
    };
    let ctrl_c = cancel.clone();
    let signal = tokio::spawn(async move {
        if crate::signal::shutdown().await.is_ok() {
            ctrl_c.cancel();
        }
    });

    let counters = gateway.counters.clone();
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    let start = tokio::time::Instant::now();
    let mut last = 0u64;
    let mut sim_task = sim_task;
    let outcome = loop {
        tokio::select! {
            r = &mut sim_task => break r,
            _ = tick.tick() => {
                let committed = counters.readings_committed.load(Relaxed);
                let drops: u64 = crate::events::DropReason::ALL.iter().map(|r| counters.drops(*r)).sum();
                let (_, _, _, acked) = progress.get();
                print!(
                    "\r{:>5.0}s  committed {committed:>10} readings  {:>8} readings/s  acked {acked:>10}  dropped {drops:>5}  p99 commit {:>6.1} ms   ",
                    start.elapsed().as_secs_f64(),
                    committed - last,
                    counters.latency_p99_us.load(Relaxed) as f64 / 1000.0,
                );
                let _ = std::io::stdout().flush();
                last = committed;
            }
        }
    };
    signal.abort();
    println!();
    let report = match outcome {
        Ok(Ok(o)) => Some(o.report),
        Ok(Err(e)) => {
            eprintln!("simulator failed: {e}");
            None
        }
        Err(e) => {
            eprintln!("simulator task failed: {e}");
            None
        }
    };
    let counters = gateway.counters.clone();
    gateway.stop().await;
    if let Some(r) = report {
        print!("{}", r.summary());
    }
    println!(
        "gateway committed {} readings in {} transactions; p50 {:.1} ms, p99 {:.1} ms receive-to-commit",
        counters.readings_committed.load(Relaxed),
        counters.transactions.load(Relaxed),
        counters.latency_p50_us.load(Relaxed) as f64 / 1000.0,
        counters.latency_p99_us.load(Relaxed) as f64 / 1000.0,
    );
    let d = db.display();
    println!("\nQuery what was stored:");
    println!("  gateway query readings --db {d} --device 1 --since 10m --limit 20");
    println!("  gateway query readings --db {d} --device 1 --sensor 1 --format csv");
    println!("  gateway stats --db {d}");
    println!("  (from the source tree: cargo run --release -p gateway -- query readings ...)");
    Ok(())
}

/// The demo fleet file, if it exists and every device in it is in the database.
async fn reusable_fleet(store: &Store, args: &DemoArgs) -> Option<FleetFile> {
    let fleet = FleetFile::load(&args.fleet).ok()?;
    let states = store.device_states().await.ok()?;
    let ok = !fleet.devices.is_empty()
        && fleet.devices.iter().all(|d| {
            states
                .iter()
                .any(|s| s.id.0 == d.id && s.key.to_hex() == d.key)
        });
    ok.then_some(fleet)
}
