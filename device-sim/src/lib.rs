//! Simulated fleets of sensor devices that speak the gateway's real protocol.
//!
//! [`run`] plays a fleet: each device with its own sensor model, key and sequence counter,
//! sending at a fixed rate from its own UDP socket (or one shared by a group of devices),
//! injecting faults on demand and, with acks on, retransmitting what the gateway has not
//! acknowledged. It returns a [`Report`] of what was sent and acknowledged, per device. The
//! `device-sim` binary and `gateway demo` both use it.
//!
//! # Layout
//! - [`fleet`] — the fleet file (devices, keys, sequence counters).
//! - `keys`: a device's keys, shared by its telemetry and its control session (rotation).
//! - [`model`] — sensor signal models (pure, seeded).
//! - `device`: one device as a state machine (no I/O).
//! - `group`: devices sharing a socket and a task, and their timers.
//! - [`report`] — the report and live progress.

pub mod control;
pub mod fleet;
mod keys;
pub mod model;
pub mod report;

mod device;
mod group;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use thiserror::Error;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::device::{Behaviour, Device, DeviceSpec};
use crate::fleet::{FleetError, FleetFile};
use crate::group::Group;
pub use crate::report::{DeviceReport, FaultCounts, Progress, Report};

/// Probabilities of faults, each per transmission (replay: per datagram generated).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Faults {
    /// Drop the transmission.
    pub loss: f64,
    /// Send a second copy right after.
    pub dup: f64,
    /// Hold the transmission and send it after the next one.
    pub reorder: f64,
    /// Send a copy with one random bit flipped instead.
    pub corrupt: f64,
    /// Also send an old datagram again verbatim.
    pub replay: f64,
}

/// Settings of a simulation run.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// The gateway's UDP address.
    pub gateway: SocketAddr,
    /// Play only the first N devices of the fleet (all when None).
    pub devices: Option<usize>,
    /// Readings per second per device.
    pub rate: f64,
    /// Readings per datagram, 1..=50.
    pub batch: usize,
    /// How long to send; None sends until cancelled.
    pub duration: Option<Duration>,
    /// Ask for acks and retransmit unacknowledged datagrams.
    pub ack: bool,
    /// Retransmissions per datagram before giving up.
    pub retries: u32,
    /// Time to wait for an ack before retransmitting.
    pub ack_timeout: Duration,
    /// Seed of every random choice (signals, faults, phases).
    pub seed: u64,
    /// Fault probabilities.
    pub faults: Faults,
    /// Keep every generated reading and return it (for checkers; costs memory).
    pub keep_readings: bool,
    /// Fleet file to write sequence counters back to (during and after the run).
    pub fleet_path: Option<PathBuf>,
    /// Hold a control session per device.
    pub control: Option<control::ControlTarget>,
    /// Devices sharing one UDP socket (and one task): 1 gives every device its own address,
    /// as a real fleet has; larger groups cost the simulator less per datagram.
    pub devices_per_socket: usize,
}

impl SimConfig {
    /// A config with the defaults of the `device-sim` binary.
    pub fn new(gateway: SocketAddr) -> Self {
        Self {
            gateway,
            devices: None,
            rate: 10.0,
            batch: 16,
            duration: Some(Duration::from_secs(10)),
            ack: false,
            retries: 5,
            ack_timeout: Duration::from_millis(1000),
            seed: 1,
            faults: Faults::default(),
            keep_readings: false,
            fleet_path: None,
            control: None,
            devices_per_socket: 1,
        }
    }
}

/// One generated reading, as the checker needs it.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct SentReading {
    /// Device id.
    pub device: u32,
    /// Datagram sequence number.
    pub seq: u64,
    /// Position in the datagram.
    pub idx: u32,
    /// Sensor id.
    pub sensor: u16,
    /// Device timestamp, ms.
    pub ts_ms: u64,
    /// Value.
    pub value: f64,
    /// Whether the gateway acknowledged its datagram.
    pub acked: bool,
}

/// Why a run could not start.
#[derive(Debug, Error)]
pub enum SimError {
    /// A setting is out of range.
    #[error("invalid setting: {0}")]
    Invalid(String),
    /// The fleet file is unusable.
    #[error(transparent)]
    Fleet(#[from] FleetError),
    /// A socket could not be created.
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// The outcome of a run.
#[derive(Debug)]
pub struct Outcome {
    /// What was sent and acknowledged.
    pub report: Report,
    /// Every generated reading, when `keep_readings` was set.
    pub readings: Vec<SentReading>,
    /// The fleet with sequence counters advanced past everything used.
    pub fleet: FleetFile,
}

/// Seconds of sending covered by each sequence lease written to the fleet file.
const LEASE_SECS: f64 = 60.0;

/// Plays `fleet` against the gateway until the duration ends or `cancel` fires.
///
/// Sequence counters are leased: before sending, and every second, the fleet file (when
/// configured) is written with each device's counter advanced by a minute's worth of datagrams,
/// so a simulator that is killed never reuses a sequence number; the final counters are written
/// at the end.
///
/// # Errors
/// [`SimError`] for bad settings, a bad fleet or sockets that cannot be opened.
pub async fn run(
    cfg: &SimConfig,
    mut fleet: FleetFile,
    progress: Arc<Progress>,
    cancel: CancellationToken,
) -> Result<Outcome, SimError> {
    if !(1..=proto::MAX_READINGS).contains(&cfg.batch) {
        return Err(SimError::Invalid(format!(
            "batch must be 1..={}",
            proto::MAX_READINGS
        )));
    }
    if !(cfg.rate > 0.0 && cfg.rate.is_finite()) {
        return Err(SimError::Invalid("rate must be positive".into()));
    }
    for (name, p) in [
        ("loss", cfg.faults.loss),
        ("dup", cfg.faults.dup),
        ("reorder", cfg.faults.reorder),
        ("corrupt", cfg.faults.corrupt),
        ("replay", cfg.faults.replay),
    ] {
        if !(0.0..=1.0).contains(&p) {
            return Err(SimError::Invalid(format!("{name} must be within 0..=1")));
        }
    }
    let count = cfg
        .devices
        .unwrap_or(fleet.devices.len())
        .min(fleet.devices.len());
    if count == 0 {
        return Err(SimError::Invalid("the fleet has no devices".into()));
    }
    if cfg.devices_per_socket == 0 {
        return Err(SimError::Invalid(
            "devices per socket must be at least 1".into(),
        ));
    }
    let period = Duration::from_secs_f64(cfg.batch as f64 / cfg.rate);
    let lease = (LEASE_SECS / period.as_secs_f64()).ceil() as u64 + 16;
    let progress_handle = progress.clone();
    // Rotated keys are written to the fleet file at once: a device confirms a new key only
    // once it is stored.
    let persist_keys = Arc::new(tokio::sync::Notify::new());
    let behaviour = Behaviour {
        period,
        batch: cfg.batch,
        ack: cfg.ack,
        retries: cfg.retries,
        ack_timeout: cfg.ack_timeout,
        faults: cfg.faults.clone(),
        keep_readings: cfg.keep_readings,
        progress,
        control: cfg.control.clone(),
        seed: cfg.seed,
        persist_keys: cfg.fleet_path.as_ref().map(|_| persist_keys.clone()),
    };
    let counters: Vec<Arc<AtomicU64>> = fleet.devices[..count]
        .iter()
        .map(|d| Arc::new(AtomicU64::new(d.next_seq)))
        .collect();
    // A device never uses a sequence number at or past its limit: the limit only moves once a
    // fleet file recording it is safely on disk.
    let limits: Vec<Arc<AtomicU64>> = counters
        .iter()
        .map(|_| {
            Arc::new(AtomicU64::new(if cfg.fleet_path.is_some() {
                0
            } else {
                u64::MAX
            }))
        })
        .collect();
    let rings = fleet.devices[..count]
        .iter()
        .map(|d| Ok(Arc::new(keys::KeyRing::new(d.device_key()?))))
        .collect::<Result<Vec<_>, FleetError>>()?;
    // Writes counters and keys; returns the install count of each key written.
    let write_fleet = |fleet: &mut FleetFile, lease: u64| -> Result<(), FleetError> {
        let mut installed = Vec::with_capacity(rings.len());
        for ((d, c), ring) in fleet.devices.iter_mut().zip(&counters).zip(&rings) {
            d.next_seq = c.load(Relaxed) + lease;
            // The count first: a key installed in between is then only under-reported.
            installed.push(ring.installed());
            d.key = ring.current().to_hex();
        }
        if let Some(path) = &cfg.fleet_path {
            fleet.save(path)?;
        }
        for (ring, n) in rings.iter().zip(installed) {
            ring.mark_saved(n);
        }
        Ok(())
    };
    let save_leased = |fleet: &mut FleetFile| -> Result<(), FleetError> {
        if cfg.fleet_path.is_some() {
            write_fleet(fleet, lease)?;
            for (d, l) in fleet.devices.iter().zip(&limits) {
                l.store(d.next_seq, Relaxed);
            }
        }
        Ok(())
    };
    save_leased(&mut fleet)?;

    let bind: SocketAddr = if cfg.gateway.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, 0))
    };
    let start = Instant::now();
    let until = cfg.duration.map(|d| start + d);
    let mut set = JoinSet::new();
    let mut members = Vec::with_capacity(cfg.devices_per_socket.min(count));
    let devices = fleet.devices[..count].iter().zip(&counters).zip(&limits);
    for (n, (((d, next_seq), limit), ring)) in devices.zip(&rings).enumerate() {
        let spec = DeviceSpec {
            id: d.device_id(),
            cipher: d.device_key()?.cipher(),
            first_seq: next_seq.load(Relaxed),
            seed: cfg.seed,
            next_seq: next_seq.clone(),
            seq_limit: limit.clone(),
        };
        members.push(Device::new(spec, ring.clone(), behaviour.clone()));
        if members.len() == cfg.devices_per_socket || n + 1 == count {
            let socket = group_socket(bind, cfg.gateway, members.len()).await?;
            let group = Group::new(socket, std::mem::take(&mut members), behaviour.clone());
            set.spawn(group.run(until, cancel.clone()));
        }
    }
    let mut reports = Vec::with_capacity(count);
    let mut readings = Vec::new();
    let mut checkpoint = tokio::time::interval(Duration::from_secs(1));
    checkpoint.tick().await;
    loop {
        tokio::select! {
            joined = set.join_next() => match joined {
                Some(Ok(group)) => {
                    for (report, sent) in group {
                        reports.push(report);
                        readings.extend(sent);
                    }
                }
                Some(Err(e)) => tracing::error!(error = %e, "device group task failed"),
                None => break,
            },
            _ = checkpoint.tick() => {
                if let Err(error) = save_leased(&mut fleet) {
                    tracing::warn!(%error, "fleet checkpoint failed");
                }
            }
            _ = persist_keys.notified() => {
                if let Err(error) = save_leased(&mut fleet) {
                    tracing::warn!(%error, "fleet file not written: a rotated key stays unconfirmed");
                }
            }
        }
    }
    write_fleet(&mut fleet, 0)?;
    let mut report = Report::from_devices(reports, start.elapsed().as_secs_f64(), cfg.ack);
    report.ack_latency = progress_handle.ack_latency_summary();
    readings.sort_by_key(|r| (r.device, r.seq, r.idx));
    Ok(Outcome {
        report,
        readings,
        fleet,
    })
}

/// A UDP socket connected to the gateway; a shared one gets a large receive buffer so the
/// acks of its whole group fit while its task is busy sending.
async fn group_socket(
    bind: SocketAddr,
    gateway: SocketAddr,
    members: usize,
) -> std::io::Result<UdpSocket> {
    if members == 1 {
        let socket = UdpSocket::bind(bind).await?;
        socket.connect(gateway).await?;
        return Ok(socket);
    }
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(bind), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps it at net.core.rmem_max.
    let _ = socket.set_recv_buffer_size(group::SHARED_RECV_BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&bind.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    socket.connect(gateway).await?;
    Ok(socket)
}
