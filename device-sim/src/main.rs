//! `device-sim`: plays a fleet file against a gateway and reports what was sent and acked.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use device_sim::fleet::FleetFile;
use device_sim::replay::{Recording, Timestamps};
use device_sim::scenario::Scenario;
use device_sim::{Faults, Progress, ReplayConfig, SimConfig};
use tokio_util::sync::CancellationToken;

/// Simulates a fleet of sensor devices sending authenticated telemetry to a gateway.
///
/// Without a subcommand it plays the fleet file: every device with the same rate and faults,
/// or groups of devices as a scenario file describes them (--scenario).
#[derive(Debug, Parser)]
#[command(
    version,
    about,
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    play: Args,
}

#[derive(Debug, clap::Subcommand)]
enum Cmd {
    /// Sends the readings of a CSV file (e.g. the gateway's own CSV export) as the fleet's
    /// devices, paced by their timestamps.
    Replay(ReplayArgs),
}

impl Common {
    fn fleet(&self) -> anyhow::Result<&std::path::Path> {
        self.fleet.as_deref().context("--fleet is required")
    }
}

/// Settings of every run.
#[derive(Debug, clap::Args)]
struct Common {
    /// Gateway UDP address.
    #[arg(long, default_value = "127.0.0.1:4780")]
    gateway: SocketAddr,
    /// Fleet file written by `gateway devices provision`; sequence counters are written back.
    // An Option only so that the top level parses when a subcommand is given; clap requires it.
    #[arg(long, required = true)]
    fleet: Option<PathBuf>,
    /// Ask for acks and retransmit unacknowledged datagrams.
    #[arg(long)]
    ack: bool,
    /// Retransmissions per datagram before giving up [default: 5].
    #[arg(long)]
    retries: Option<u32>,
    /// How long to wait for an ack before retransmitting [default: 1s].
    #[arg(long, value_parser = humantime::parse_duration)]
    ack_timeout: Option<Duration>,
    /// Devices sharing one UDP socket and task. 1 (the default) gives every device its own
    /// address, as a real fleet has; larger groups cost the simulator less per datagram.
    #[arg(long)]
    devices_per_socket: Option<usize>,
    /// Write the JSON report here.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Write every generated reading as CSV here (device,seq,idx,sensor,ts_ms,value,acked).
    #[arg(long)]
    readings_log: Option<PathBuf>,
}

#[derive(Debug, clap::Args)]
struct Args {
    #[command(flatten)]
    common: Common,
    /// Scenario file (TOML): device groups with their sensors, rates and fault schedules.
    /// Its run settings (seed, duration, ack, ...) apply unless given here.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Play only the first N devices of the fleet.
    #[arg(long)]
    devices: Option<usize>,
    /// Readings per second per device [default: 10].
    #[arg(long)]
    rate: Option<f64>,
    /// Readings per datagram, 1..=50 [default: 16].
    #[arg(long)]
    batch: Option<usize>,
    /// How long to send, e.g. 30s or 5m; 0 sends until Ctrl-C [default: 10s].
    #[arg(long, value_parser = humantime::parse_duration)]
    duration: Option<Duration>,
    /// Seed for signals, faults and timing [default: 1].
    #[arg(long)]
    seed: Option<u64>,
    /// Probability that a transmission is lost.
    #[arg(long)]
    loss: Option<f64>,
    /// Probability that a transmission is duplicated.
    #[arg(long)]
    dup: Option<f64>,
    /// Probability that a transmission is held back and sent after the next one.
    #[arg(long)]
    reorder: Option<f64>,
    /// Probability that a transmission has one bit flipped.
    #[arg(long)]
    corrupt: Option<f64>,
    /// Probability, per datagram, of also replaying an old datagram.
    #[arg(long)]
    replay: Option<f64>,
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
}

#[derive(Debug, clap::Args)]
struct ReplayArgs {
    /// The CSV file: a header naming device, sensor, value and ts_ms (or time), one reading
    /// per line.
    csv: PathBuf,
    #[command(flatten)]
    common: Common,
    /// Replay speed: 1 keeps the recorded pace, 60 plays an hour in a minute, 0 sends as fast
    /// as acks allow (use with --ack).
    #[arg(long, default_value_t = 1.0)]
    speed: f64,
    /// Timestamps sent: `shift` moves the recording to now (readings look live), `keep` sends
    /// the recorded ones (loading history).
    #[arg(long, value_enum, default_value_t = StampArg::Shift)]
    timestamps: StampArg,
    /// Most readings per datagram (1..=50); readings due together share datagrams.
    #[arg(long, default_value_t = 50)]
    batch: usize,
    /// With --ack, most datagrams a device keeps unacknowledged before it sends more.
    #[arg(long, default_value_t = 64)]
    window: usize,
    /// Play the recording's devices, in id order, as the fleet's devices in order (by default
    /// each recorded device id must be in the fleet file).
    #[arg(long)]
    map_devices: bool,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum StampArg {
    Shift,
    Keep,
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .init();
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        match cli.cmd {
            Some(Cmd::Replay(args)) => replay(args).await,
            None => play(cli.play).await,
        }
    })
}

/// Plays the fleet, as one group or as a scenario describes it.
async fn play(args: Args) -> anyhow::Result<()> {
    let fleet = FleetFile::load(args.common.fleet()?)?;
    let mut cfg = SimConfig::new(args.common.gateway);
    if let Some(path) = &args.scenario {
        // Group settings live in the scenario; a flag for them would be ambiguous.
        let per_group = [
            ("--devices", args.devices.is_some()),
            ("--rate", args.rate.is_some()),
            ("--batch", args.batch.is_some()),
            ("--loss", args.loss.is_some()),
            ("--dup", args.dup.is_some()),
            ("--reorder", args.reorder.is_some()),
            ("--corrupt", args.corrupt.is_some()),
            ("--replay", args.replay.is_some()),
        ];
        if let Some((flag, _)) = per_group.iter().find(|(_, given)| *given) {
            anyhow::bail!("{flag} is set per group in the scenario file, not with --scenario");
        }
        let scenario = Scenario::load(path).map_err(anyhow::Error::msg)?;
        if scenario.devices() > fleet.devices.len() {
            anyhow::bail!(
                "{} plays {} devices but {} holds {}: provision more (gateway devices \
                 provision --count {})",
                path.display(),
                scenario.devices(),
                args.common.fleet()?.display(),
                fleet.devices.len(),
                scenario.devices()
            );
        }
        cfg.seed = scenario.seed.unwrap_or(cfg.seed);
        cfg.duration = scenario.duration.or(cfg.duration);
        cfg.ack = scenario.ack.unwrap_or(cfg.ack);
        cfg.retries = scenario.retries.unwrap_or(cfg.retries);
        cfg.ack_timeout = scenario.ack_timeout.unwrap_or(cfg.ack_timeout);
        cfg.devices_per_socket = scenario
            .devices_per_socket
            .unwrap_or(cfg.devices_per_socket);
        cfg.groups = scenario.groups;
    }
    cfg.devices = args.devices;
    cfg.rate = args.rate.unwrap_or(cfg.rate);
    cfg.batch = args.batch.unwrap_or(cfg.batch);
    cfg.seed = args.seed.unwrap_or(cfg.seed);
    cfg.duration = args.duration.or(cfg.duration);
    cfg.faults = Faults {
        loss: args.loss.unwrap_or(0.0),
        dup: args.dup.unwrap_or(0.0),
        reorder: args.reorder.unwrap_or(0.0),
        corrupt: args.corrupt.unwrap_or(0.0),
        replay: args.replay.unwrap_or(0.0),
    };
    cfg.control = match args.control {
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
    };
    let devices = if cfg.groups.is_empty() {
        args.devices.unwrap_or(fleet.devices.len())
    } else {
        cfg.groups.iter().map(|g| g.devices).sum()
    };
    execute(cfg, &args.common, fleet, devices).await
}

/// Replays a CSV file of readings.
async fn replay(args: ReplayArgs) -> anyhow::Result<()> {
    let fleet = FleetFile::load(args.common.fleet()?)?;
    eprintln!("reading {}", args.csv.display());
    let recording = Recording::load(&args.csv).map_err(anyhow::Error::msg)?;
    eprintln!(
        "{} readings of {} devices from {} to {} ({} recorded)",
        recording.readings,
        recording.devices.len(),
        humantime::format_rfc3339_millis(at_ms(recording.first_ts)),
        humantime::format_rfc3339_millis(at_ms(recording.last_ts)),
        humantime::format_duration(Duration::from_millis(
            recording.last_ts - recording.first_ts
        )),
    );
    if args.speed > 0.0 {
        let secs = (recording.last_ts - recording.first_ts) as f64 / 1000.0 / args.speed;
        eprintln!(
            "replaying at {}x: about {}",
            args.speed,
            humantime::format_duration(Duration::from_secs(secs.ceil() as u64))
        );
    }
    let mut cfg = SimConfig::new(args.common.gateway);
    cfg.duration = None;
    cfg.batch = args.batch;
    let devices = recording.devices.len();
    if args.speed == 0.0 && !args.common.ack {
        eprintln!(
            "warning: an unpaced replay without --ack sends everything at once; datagrams the \
             gateway's receive buffer cannot hold are lost and not sent again"
        );
    }
    cfg.replay = Some(ReplayConfig {
        recording: Arc::new(recording),
        map_devices: args.map_devices,
        speed: args.speed,
        timestamps: match args.timestamps {
            StampArg::Shift => Timestamps::Shift,
            StampArg::Keep => Timestamps::Keep,
        },
        window: args.window,
    });
    execute(cfg, &args.common, fleet, devices).await
}

fn at_ms(ms: u64) -> std::time::SystemTime {
    std::time::UNIX_EPOCH + Duration::from_millis(ms)
}

/// Runs a configured simulation with the settings every run shares, then writes its outputs.
async fn execute(
    mut cfg: SimConfig,
    common: &Common,
    fleet: FleetFile,
    devices: usize,
) -> anyhow::Result<()> {
    cfg.ack |= common.ack;
    cfg.retries = common.retries.unwrap_or(cfg.retries);
    cfg.ack_timeout = common.ack_timeout.unwrap_or(cfg.ack_timeout);
    cfg.devices_per_socket = common.devices_per_socket.unwrap_or(cfg.devices_per_socket);
    cfg.keep_readings = common.readings_log.is_some();
    cfg.fleet_path = Some(common.fleet()?.to_owned());
    if cfg.duration.is_some_and(|d| d.is_zero()) {
        cfg.duration = None;
    }
    // One socket per group of devices (and one per control session): raise the open-file
    // limit as far as allowed.
    let devices = devices.min(fleet.devices.len()) as u64;
    let per_socket = cfg.devices_per_socket.max(1) as u64;
    let sockets = devices.div_ceil(per_socket) + if cfg.control.is_some() { devices } else { 0 };
    let limit = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    if limit != 0 && limit < sockets + 32 {
        anyhow::bail!(
            "{devices} devices need about {} open files but the limit is {limit} (ulimit -n)",
            sockets + 32
        );
    }
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
    if let Some(path) = &common.report {
        let json = serde_json::to_vec_pretty(report)?;
        std::fs::write(path, json).with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &common.readings_log {
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
    // A replay advances through its readings; a timed run through its duration.
    let total_readings = cfg.replay.as_ref().map(|r| r.recording.readings);
    let bar = match (total_readings, cfg.duration) {
        (Some(n), _) => indicatif::ProgressBar::new(n.max(1)),
        (None, Some(d)) => indicatif::ProgressBar::new(d.as_secs().max(1)),
        (None, None) => indicatif::ProgressBar::new_spinner(),
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
            bar.set_position(if total_readings.is_some() {
                readings
            } else {
                start.elapsed().as_secs()
            });
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
