//! Simulated fleets of sensor devices that speak the gateway's real protocol.
//!
//! [`run`] plays a fleet: each device with its own sensor model, key and sequence counter,
//! sending at a fixed rate from its own UDP socket (or one shared by a group of devices),
//! injecting faults on demand and, with acks on, retransmitting what the gateway has not
//! acknowledged. A [`scenario`] splits the fleet into groups with their own sensors, rates and
//! fault schedules; a [`replay`] sends recorded readings instead of modelled ones, paced by
//! their timestamps. It returns a [`Report`] of what was sent and acknowledged, per device.
//! The `device-sim` binary and `gateway demo` both use it.
//!
//! # Layout
//! - [`fleet`] — the fleet file (devices, keys, sequence counters).
//! - `keys`: a device's keys, shared by its telemetry and its control session (rotation).
//! - [`model`] — sensor signal models (pure, seeded).
//! - [`scenario`] — scenario files: device groups, sensor models, rates, fault schedules.
//! - [`replay`] — recorded readings (CSV) and their pacing.
//! - `device`: one device as a state machine (no I/O).
//! - `group`: devices sharing a socket and a task, and their timers.
//! - [`report`] — the report and live progress.

pub mod control;
pub mod fleet;
mod keys;
pub mod model;
pub mod replay;
pub mod report;
pub mod scenario;

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
use crate::model::SensorSpec;
use crate::replay::{Recording, Timestamps};
pub use crate::report::{DeviceReport, FaultCounts, Progress, Report};
use crate::scenario::DeviceGroup;

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

impl Faults {
    /// Checks that every probability is within 0..=1; the message names the first that is not.
    ///
    /// # Errors
    /// The offending probability.
    pub fn check(&self) -> Result<(), String> {
        for (name, p) in [
            ("loss", self.loss),
            ("dup", self.dup),
            ("reorder", self.reorder),
            ("corrupt", self.corrupt),
            ("replay", self.replay),
        ] {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} = {p} is not a probability (0..=1)"));
            }
        }
        Ok(())
    }
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
    /// Scenario groups, each over the next devices of the fleet; when empty, the fleet (or its
    /// first `devices`) plays `rate`, `batch` and `faults` with the four classic sensors.
    pub groups: Vec<DeviceGroup>,
    /// Send recorded readings instead (`rate`, `faults` and `groups` are then unused; `batch`
    /// is the most readings per datagram).
    pub replay: Option<ReplayConfig>,
}

/// A replay of recorded readings.
#[derive(Debug, Clone)]
pub struct ReplayConfig {
    /// The readings (shared by the devices that play them, never copied).
    pub recording: Arc<Recording>,
    /// Play the recording's devices, in id order, as the fleet's devices in order (otherwise
    /// each recorded device id must be in the fleet).
    pub map_devices: bool,
    /// Recorded time per replayed time (10: ten times faster); 0 sends as fast as acks allow.
    pub speed: f64,
    /// What goes in the timestamp field.
    pub timestamps: Timestamps,
    /// With acks on, most datagrams a device keeps unacknowledged before sending more.
    pub window: usize,
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
            groups: Vec::new(),
            replay: None,
        }
    }
}

/// Checks a group's rate, batch and fault probabilities.
fn check_group(rate: f64, batch: usize, faults: &Faults) -> Result<(), SimError> {
    if !(1..=proto::MAX_READINGS).contains(&batch) {
        return Err(SimError::Invalid(format!(
            "batch must be 1..={}",
            proto::MAX_READINGS
        )));
    }
    if !(rate > 0.0 && rate.is_finite()) {
        return Err(SimError::Invalid("rate must be positive".into()));
    }
    faults.check().map_err(SimError::Invalid)
}

/// The groups a run plays, in fleet order, as (group, recorded device each device plays).
type Plan = Vec<(DeviceGroup, Option<Vec<Option<u32>>>)>;

/// What each slice of the fleet plays.
fn plan(cfg: &SimConfig, fleet: &FleetFile) -> Result<Plan, SimError> {
    if let Some(r) = &cfg.replay {
        check_group(1.0, cfg.batch, &Faults::default())?;
        if !(r.speed == 0.0 || (r.speed >= replay::MIN_SPEED && r.speed.is_finite())) {
            return Err(SimError::Invalid(format!(
                "speed must be 0 (unpaced) or a factor of at least {}",
                replay::MIN_SPEED
            )));
        }
        if r.window == 0 {
            return Err(SimError::Invalid("window must be at least 1".into()));
        }
        let ids: Vec<u32> = fleet.devices.iter().map(|d| d.device_id().0).collect();
        let mut plays = r
            .recording
            .assign(&ids, r.map_devices)
            .map_err(SimError::Invalid)?;
        // Only as far as the last device with readings.
        let used = plays.iter().rposition(Option::is_some).map_or(0, |i| i + 1);
        plays.truncate(used);
        let group = DeviceGroup {
            name: String::new(),
            devices: used,
            rate: 1.0,
            batch: cfg.batch,
            sensors: Vec::new(),
            faults: Faults::default(),
            schedule: Vec::new(),
        };
        return Ok(vec![(group, Some(plays))]);
    }
    if cfg.groups.is_empty() {
        check_group(cfg.rate, cfg.batch, &cfg.faults)?;
        let count = cfg
            .devices
            .unwrap_or(fleet.devices.len())
            .min(fleet.devices.len());
        let group = DeviceGroup {
            name: String::new(),
            devices: count,
            rate: cfg.rate,
            batch: cfg.batch,
            sensors: SensorSpec::classic(),
            faults: cfg.faults.clone(),
            schedule: Vec::new(),
        };
        return Ok(vec![(group, None)]);
    }
    let wanted: usize = cfg.groups.iter().map(|g| g.devices).sum();
    if wanted > fleet.devices.len() {
        return Err(SimError::Invalid(format!(
            "the scenario plays {wanted} devices but the fleet file holds {}: provision more \
             (gateway devices provision --count {wanted})",
            fleet.devices.len()
        )));
    }
    for g in &cfg.groups {
        check_group(g.rate, g.batch, &g.faults)
            .map_err(|e| SimError::Invalid(format!("group {:?}: {e}", g.name)))?;
    }
    Ok(cfg.groups.iter().map(|g| (g.clone(), None)).collect())
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
    let plan = plan(cfg, &fleet)?;
    let count: usize = plan.iter().map(|(g, _)| g.devices).sum();
    if count == 0 {
        return Err(SimError::Invalid(if cfg.replay.is_some() {
            "no device of the fleet has recorded readings".into()
        } else {
            "the fleet has no devices".into()
        }));
    }
    if cfg.devices_per_socket == 0 {
        return Err(SimError::Invalid(
            "devices per socket must be at least 1".into(),
        ));
    }
    // Sequence numbers each device leases ahead in the fleet file: a minute of datagrams at
    // its group's rate; a replaying device leases its whole recording (at least one reading
    // per datagram).
    let mut leases = Vec::with_capacity(count);
    for (g, queues) in &plan {
        match queues {
            Some(plays) => {
                let recording = cfg.replay.as_ref().map(|r| &r.recording);
                leases.extend(plays.iter().map(|p| {
                    let n = match (recording, p) {
                        (Some(rec), Some(id)) => rec.device(*id).len(),
                        _ => 0,
                    };
                    n as u64 + 16
                }));
            }
            None => {
                let period = g.batch as f64 / g.rate;
                let lease = (LEASE_SECS / period).ceil() as u64 + 16;
                leases.extend(std::iter::repeat_n(lease, g.devices));
            }
        }
    }
    let progress_handle = progress.clone();
    // Rotated keys are written to the fleet file at once: a device confirms a new key only
    // once it is stored.
    let persist_keys = Arc::new(tokio::sync::Notify::new());
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
    let write_fleet = |fleet: &mut FleetFile, leased: bool| -> Result<(), FleetError> {
        let mut installed = Vec::with_capacity(rings.len());
        let all = fleet
            .devices
            .iter_mut()
            .zip(&counters)
            .zip(&rings)
            .zip(&leases);
        for (((d, c), ring), lease) in all {
            d.next_seq = c.load(Relaxed) + if leased { *lease } else { 0 };
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
            write_fleet(fleet, true)?;
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
    let clock = cfg.replay.as_ref().map(|r| {
        Arc::new(replay::Clock {
            start,
            start_wall_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
            first_ts: r.recording.first_ts,
            last_ts: r.recording.last_ts,
            speed: r.speed,
            timestamps: r.timestamps,
        })
    });
    let mut set = JoinSet::new();
    let mut devices = fleet.devices[..count]
        .iter()
        .zip(&counters)
        .zip(&limits)
        .zip(&rings);
    for (group, queues) in plan {
        let behaviour = Behaviour {
            group: (!group.name.is_empty()).then(|| Arc::from(group.name.as_str())),
            period: Duration::from_secs_f64(group.batch as f64 / group.rate),
            batch: group.batch,
            sensors: group.sensors.into(),
            ack: cfg.ack,
            retries: cfg.retries,
            ack_timeout: cfg.ack_timeout,
            faults: group.faults,
            schedule: group.schedule.into(),
            start,
            window: cfg.replay.as_ref().map_or(usize::MAX, |r| r.window),
            keep_readings: cfg.keep_readings,
            progress: progress.clone(),
            control: cfg.control.clone(),
            seed: cfg.seed,
            persist_keys: cfg.fleet_path.as_ref().map(|_| persist_keys.clone()),
        };
        let mut plays = queues.map(Vec::into_iter);
        let mut members = Vec::with_capacity(cfg.devices_per_socket.min(group.devices));
        for n in 0..group.devices {
            let Some((((d, next_seq), limit), ring)) = devices.next() else {
                break;
            };
            let replay = match (&mut plays, &clock, &cfg.replay) {
                (Some(p), Some(clock), Some(r)) => Some(replay::Queue {
                    recording: r.recording.clone(),
                    plays: p.next().flatten(),
                    next: 0,
                    clock: clock.clone(),
                }),
                _ => None,
            };
            let spec = DeviceSpec {
                id: d.device_id(),
                cipher: d.device_key()?.cipher(),
                first_seq: next_seq.load(Relaxed),
                seed: cfg.seed,
                next_seq: next_seq.clone(),
                seq_limit: limit.clone(),
                replay,
            };
            members.push(Device::new(spec, ring.clone(), behaviour.clone()));
            if members.len() == cfg.devices_per_socket || n + 1 == group.devices {
                let socket = group_socket(bind, cfg.gateway, members.len()).await?;
                let g = Group::new(socket, std::mem::take(&mut members), behaviour.clone());
                set.spawn(g.run(until, cancel.clone()));
            }
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
    write_fleet(&mut fleet, false)?;
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
