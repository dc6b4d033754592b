//! `device-sim`: plays a fleet file against a gateway and reports what was sent and acked.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use device_sim::fleet::FleetFile;
use device_sim::{Faults, Progress, SimConfig};
use tokio_util::sync::CancellationToken;

/// Simulates a fleet of sensor devices sending authenticated telemetry to a gateway.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Gateway UDP address.
    #[arg(long, default_value = "127.0.0.1:4780")]
    gateway: SocketAddr,
    /// Fleet file written by `gateway devices provision`; sequence counters are written back.
    #[arg(long)]
    fleet: PathBuf,
    /// Play only the first N devices of the fleet.
    #[arg(long)]
    devices: Option<usize>,
    /// Readings per second per device.
    #[arg(long, default_value_t = 10.0)]
    rate: f64,
    /// Readings per datagram (1..=50).
    #[arg(long, default_value_t = 16)]
    batch: usize,
    /// How long to send, e.g. 30s or 5m; 0 sends until Ctrl-C.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Ask for acks and retransmit unacknowledged datagrams.
    #[arg(long)]
    ack: bool,
    /// Retransmissions per datagram before giving up.
    #[arg(long, default_value_t = 5)]
    retries: u32,
    /// How long to wait for an ack before retransmitting.
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    ack_timeout: Duration,
    /// Seed for signals, faults and timing.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Probability that a transmission is lost.
    #[arg(long, default_value_t = 0.0)]
    loss: f64,
    /// Probability that a transmission is duplicated.
    #[arg(long, default_value_t = 0.0)]
    dup: f64,
    /// Probability that a transmission is held back and sent after the next one.
    #[arg(long, default_value_t = 0.0)]
    reorder: f64,
    /// Probability that a transmission has one bit flipped.
    #[arg(long, default_value_t = 0.0)]
    corrupt: f64,
    /// Probability, per datagram, of also replaying an old datagram.
    #[arg(long, default_value_t = 0.0)]
    replay: f64,
    /// Gateway control address: each device holds a control session (TLS unless
    /// --control-plain).
    #[arg(long)]
    control: Option<SocketAddr>,
    /// CA certificate that signed the gateway's control certificate (e.g. certs/ca.pem).
    #[arg(long, requires = "control")]
    ca: Option<PathBuf>,
    /// Name to verify in the gateway's certificate.
    #[arg(long, default_value = "localhost")]
    server_name: String,
    /// Where files received over control sessions are stored (a folder per device inside).
    #[arg(long, default_value = "sim-files")]
    files_dir: PathBuf,
    /// Use plain TCP for control sessions (only against a gateway with control.tls = false).
    #[arg(long, requires = "control")]
    control_plain: bool,
    /// Devices sharing one UDP socket and task. 1 (the default) gives every device its own
    /// address, as a real fleet has; larger groups cost the simulator less per datagram.
    #[arg(long, default_value_t = 1)]
    devices_per_socket: usize,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write every generated reading as CSV here (device,seq,idx,sensor,ts_ms,value,acked).
    #[arg(long)]
    readings_log: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let args = Args::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(args))
}

async fn run(args: Args) -> anyhow::Result<()> {
    let fleet = FleetFile::load(&args.fleet)?;
    // One socket per group of devices (and one per control session): raise the open-file
    // limit as far as allowed.
    let devices = args
        .devices
        .unwrap_or(fleet.devices.len())
        .min(fleet.devices.len()) as u64;
    let per_socket = args.devices_per_socket.max(1) as u64;
    let sockets = devices.div_ceil(per_socket) + if args.control.is_some() { devices } else { 0 };
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit != 0 && limit < sockets + 32 {
        anyhow::bail!(
            "{devices} devices need about {} open files but the limit is {limit} (ulimit -n)",
            sockets + 32
        );
    }
    let cfg = SimConfig {
        gateway: args.gateway,
        devices: args.devices,
        rate: args.rate,
        batch: args.batch,
        duration: (!args.duration.is_zero()).then_some(args.duration),
        ack: args.ack,
        retries: args.retries,
        ack_timeout: args.ack_timeout,
        seed: args.seed,
        faults: Faults {
            loss: args.loss,
            dup: args.dup,
            reorder: args.reorder,
            corrupt: args.corrupt,
            replay: args.replay,
        },
        devices_per_socket: args.devices_per_socket,
        keep_readings: args.readings_log.is_some(),
        fleet_path: Some(args.fleet.clone()),
        control: match args.control {
            None => None,
            Some(addr) => Some(device_sim::control::ControlTarget {
                addr,
                files_dir: args.files_dir.clone(),
                tls: if args.control_plain {
                    None
                } else {
                    let ca = args
                        .ca
                        .as_deref()
                        .context("--control needs --ca (or --control-plain)")?;
                    let config = device_sim::control::tls_client(ca).map_err(anyhow::Error::msg)?;
                    let name = rustls::pki_types::ServerName::try_from(args.server_name.clone())
                        .context("--server-name")?;
                    Some((config, name))
                },
            }),
        },
    };
    let progress = Arc::new(Progress::default());
    let cancel = CancellationToken::new();
    let stop = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            stop.cancel();
        }
    });
    let bar = progress_bar(&cfg, progress.clone());
    let outcome = device_sim::run(&cfg, fleet, progress, cancel.clone()).await;
    bar.abort();
    let outcome = outcome?;
    let report = &outcome.report;
    print!("{}", report.summary());
    if let Some(path) = &args.report {
        let json = serde_json::to_vec_pretty(report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.readings_log {
        let file =
            std::fs::File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = std::io::BufWriter::new(file);
        writeln!(w, "device,seq,idx,sensor,ts_ms,value,acked")?;
        for r in &outcome.readings {
            writeln!(
                w,
                "{},{},{},{},{},{},{}",
                r.device, r.seq, r.idx, r.sensor, r.ts_ms, r.value, r.acked
            )?;
        }
        w.flush()?;
    }
    Ok(())
}

/// A progress bar on a terminal (indicatif hides it otherwise), updated twice a second.
fn progress_bar(cfg: &SimConfig, progress: Arc<Progress>) -> tokio::task::JoinHandle<()> {
    let bar = match cfg.duration {
        Some(d) => indicatif::ProgressBar::new(d.as_secs().max(1)),
        None => indicatif::ProgressBar::new_spinner(),
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template("{elapsed_precise} [{bar:30}] {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let ack = cfg.ack;
    tokio::spawn(async move {
        let start = tokio::time::Instant::now();
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tick.tick().await;
            let (_, readings, _, acked) = progress.get();
            let secs = start.elapsed().as_secs_f64().max(1e-3);
            bar.set_position(start.elapsed().as_secs());
            bar.set_message(if ack {
                format!(
                    "{readings} readings sent ({:.0}/s), {acked} acked",
                    readings as f64 / secs
                )
            } else {
                format!("{readings} readings sent ({:.0}/s)", readings as f64 / secs)
            });
        }
    })
}
