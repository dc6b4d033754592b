//! One simulated device as a state machine: it generates batches from its sensor model (or takes
//! them from a recording being replayed), seals them with its key and sequence counter, passes
//! each transmission through the fault injector (whose probabilities may follow a schedule)
//! and (with acks on) keeps what the gateway has not acknowledged for retransmission, a bounded
//! number of times. It does no I/O: what it wants sent goes into an [`Out`] list that its
//! group (`group.rs`) sends, and the group decides when it is time to send or retransmit.
//!
//! Emits: nothing; its outcome is its [`DeviceReport`].

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::{Ack, Batch, Cipher, DeviceId, Flags, Header, Millis, Reading, SensorId, Seq};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::model::{SensorModel, SensorSpec};
use crate::replay::Queue;
use crate::report::{DeviceReport, Progress};
use crate::scenario::{FaultWindow, faults_at};
use crate::{Faults, SentReading};

/// How many past datagrams a device keeps for replay faults.
const REPLAY_HISTORY: usize = 512;

/// How long a replaying device waits before trying again when its sequence lease ran out.
const LEASE_RETRY: Duration = Duration::from_millis(100);

/// Datagrams to send, in order.
pub(crate) type Out = Vec<Vec<u8>>;

/// What a device needs to run.
pub(crate) struct DeviceSpec {
    pub id: DeviceId,
    pub cipher: Cipher,
    pub first_seq: u64,
    pub seed: u64,
    /// The next sequence number, shared with the fleet-file checkpointer.
    pub next_seq: Arc<AtomicU64>,
    /// First sequence number not yet leased in the fleet file: never used.
    pub seq_limit: Arc<AtomicU64>,
    /// Recorded readings to send instead of the sensor model's.
    pub replay: Option<Queue>,
}

/// Timing and behaviour shared by every device of a group.
#[derive(Clone)]
pub(crate) struct Behaviour {
    /// The group's name in the report (scenarios).
    pub group: Option<Arc<str>>,
    pub period: Duration,
    pub batch: usize,
    /// Sensors and their models.
    pub sensors: Arc<[SensorSpec]>,
    pub ack: bool,
    pub retries: u32,
    pub ack_timeout: Duration,
    /// Fault probabilities outside the schedule's windows.
    pub faults: Faults,
    /// Fault windows, by time since `start`.
    pub schedule: Arc<[FaultWindow]>,
    /// When the run started (the schedule's origin).
    pub start: Instant,
    /// Replay: most datagrams a device keeps waiting for an ack before it sends more.
    pub window: usize,
    pub keep_readings: bool,
    pub progress: Arc<Progress>,
    pub control: Option<crate::control::ControlTarget>,
    pub seed: u64,
    /// Asks for the fleet file to be written now (a rotated key); None without a fleet file.
    pub persist_keys: Option<Arc<tokio::sync::Notify>>,
}

struct Pending {
    bytes: Vec<u8>,
    /// The key install count it was sealed under (see [`crate::keys::KeyRing`]).
    sealed_under: u64,
    readings: u64,
    first_sent: Instant,
    tries: u32,
}

/// What a due retransmission did.
pub(crate) enum Retransmit {
    /// Sent again: wait for the ack until `ack_timeout` from now; `tries` so far.
    Again(u32),
    /// Retries exhausted: given up, counted as unacked.
    GaveUp,
    /// Already acknowledged or rescheduled since: nothing to do.
    Stale,
}

/// What a device does after a send.
pub(crate) enum Next {
    /// Send again at this time.
    At(Instant),
    /// Replay: too many datagrams wait for an ack; ask again when one settles.
    Blocked,
    /// Replay: everything is sent.
    Done,
}

/// Where readings come from.
enum Source {
    /// A sensor model with its own random stream, so the signal a seed gives does not depend
    /// on how many fault draws or retransmissions came before.
    Model(SensorModel, SmallRng),
    /// Recorded readings.
    Replay(Queue),
}

pub(crate) struct Device {
    pub(crate) spec: DeviceSpec,
    b: Behaviour,
    /// Phases and faults.
    rng: SmallRng,
    source: Source,
    /// Replay: the last send made no progress (sequence lease); retry shortly.
    stalled: bool,
    /// Replay: waiting for an ack before sending more.
    blocked: bool,
    seq: u64,
    pending: HashMap<u64, Pending>,
    held: Option<Vec<u8>>,
    history: VecDeque<Vec<u8>>,
    pub(crate) report: DeviceReport,
    pub(crate) sent: Vec<SentReading>,
    sample_index: u64,
    /// Period, batch and sensors; commands and config pushes change them.
    pub(crate) live: Arc<crate::control::LiveConfig>,
    /// Keys shared with the control session, which installs rotated ones.
    pub(crate) keys: Arc<crate::keys::KeyRing>,
    /// The key before `spec.cipher`: acks of datagrams sealed before a rotation open with it.
    previous: Option<Cipher>,
    /// The install count `spec.cipher` belongs to.
    installed: u64,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Device {
    pub(crate) fn new(mut spec: DeviceSpec, keys: Arc<crate::keys::KeyRing>, b: Behaviour) -> Self {
        let stream = spec.seed ^ u64::from(spec.id.0).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let rng = SmallRng::seed_from_u64(stream);
        let source = match spec.replay.take() {
            Some(queue) => Source::Replay(queue),
            None => {
                let mut signal = SmallRng::seed_from_u64(stream ^ 0x5167_4E41_4C00_0001);
                let model = SensorModel::with_sensors(&b.sensors, &mut signal);
                Source::Model(model, signal)
            }
        };
        let seq = spec.first_seq;
        let live = Arc::new(crate::control::LiveConfig::with_sensors(
            b.period,
            b.batch as u64,
            b.sensors.iter().map(|s| s.id),
        ));
        let report = DeviceReport {
            id: spec.id.0,
            group: b.group.as_deref().map(str::to_owned),
            ..Default::default()
        };
        Self {
            spec,
            b,
            rng,
            source,
            stalled: false,
            blocked: false,
            seq,
            pending: HashMap::new(),
            held: None,
            history: VecDeque::new(),
            report,
            sent: Vec::new(),
            sample_index: 0,
            live,
            keys,
            previous: None,
            installed: 0,
        }
    }

    /// Takes up a key the control session installed since the last datagram.
    fn refresh_key(&mut self) {
        if self.keys.installed() != self.installed {
            let (current, previous, installed) = self.keys.ciphers();
            self.spec.cipher = current;
            self.previous = previous;
            self.installed = installed;
        }
    }

    /// When to send first: a random offset within one period, so a fleet does not send in
    /// lockstep; a replaying device when its first reading is due (None: it has none).
    pub(crate) fn first_send(&mut self, start: Instant) -> Option<Instant> {
        match &self.source {
            Source::Replay(q) => q.next_due(),
            Source::Model(..) => {
                Some(start + self.b.period.mul_f64(self.rng.random_range(0.0..1.0)))
            }
        }
    }

    /// When to send next, after a send planned for `at` ran at `now`.
    pub(crate) fn next_send(&mut self, at: Instant, now: Instant) -> Next {
        match &self.source {
            Source::Model(..) => {
                // Catch up on a late wake of less than a period; after a longer stall, start
                // again from now rather than sending a burst.
                let period = self.period();
                let mut next = at + period;
                if next + period <= now {
                    next = now + period;
                }
                Next::At(next)
            }
            Source::Replay(q) => {
                let Some(due) = q.next_due() else {
                    return Next::Done;
                };
                if self.seq >= proto::SEQ_LIMIT {
                    // The sequence counter is exhausted: nothing more can ever be sent.
                    return Next::Done;
                }
                if self.stalled {
                    self.stalled = false;
                    return Next::At(now + LEASE_RETRY);
                }
                if self.b.ack && self.pending.len() >= self.b.window {
                    self.blocked = true;
                    return Next::Blocked;
                }
                Next::At(due)
            }
        }
    }

    /// A replaying device that was blocked and may send again now that an ack settled (or a
    /// datagram was given up).
    pub(crate) fn unblocked(&mut self) -> bool {
        if self.blocked && self.pending.len() < self.b.window {
            self.blocked = false;
            return true;
        }
        false
    }

    /// The faults in force now; None while the device is silent.
    fn faults_now(&self, now: Instant) -> Option<Faults> {
        if self.b.schedule.is_empty() {
            return Some(self.b.faults.clone());
        }
        faults_at(&self.b.faults, &self.b.schedule, now - self.b.start).cloned()
    }

    /// The current sending period (control commands may change it).
    pub(crate) fn period(&self) -> Duration {
        Duration::from_micros(self.live.period_us.load(Relaxed).max(1))
    }

    /// Generates, seals and queues the next datagram. Returns its sequence number when it
    /// waits for an ack.
    pub(crate) fn send_next(&mut self, now: Instant, out: &mut Out) -> Option<u64> {
        if self.seq >= self.spec.seq_limit.load(Relaxed) || self.seq >= proto::SEQ_LIMIT {
            // The lease could not be renewed (or the counter is exhausted): skip rather than
            // risk reusing a sequence number after a crash.
            self.report.lease_waits += 1;
            self.stalled = true;
            return None;
        }
        let Some(faults) = self.faults_now(now) else {
            // Silent: as if switched off, nothing is generated.
            self.report.faults.silenced += 1;
            return None;
        };
        self.refresh_key();
        let n = (self.live.batch.load(Relaxed) as usize).clamp(1, proto::MAX_READINGS);
        let readings = match &mut self.source {
            Source::Model(model, signal) => {
                let wall = now_ms();
                let mut sensors = self.live.sensor_ids();
                if sensors.is_empty() {
                    // `LiveConfig` never stores an empty set; stay safe if that ever changes.
                    sensors.push(1);
                }
                let spacing = self.live.period_us.load(Relaxed) as f64 / 1000.0 / n as f64;
                let mut readings = Vec::with_capacity(n);
                for i in 0..n {
                    let back = ((n - 1 - i) as f64 * spacing) as u64;
                    let ts = wall.saturating_sub(back);
                    let sensor = sensors[(self.sample_index % sensors.len() as u64) as usize];
                    self.sample_index += 1;
                    let value = model.sample(sensor, ts, signal);
                    readings.push(Reading {
                        sensor: SensorId(sensor),
                        ts: Millis(ts),
                        value,
                    });
                }
                readings
            }
            Source::Replay(q) => {
                let mut readings = Vec::with_capacity(n);
                while readings.len() < n
                    && let Some(r) = q.peek()
                    && q.clock.due(r.ts_ms) <= now
                {
                    readings.push(Reading {
                        sensor: SensorId(r.sensor),
                        ts: Millis(q.clock.stamp(r.ts_ms)),
                        value: r.value,
                    });
                    q.next += 1;
                }
                if readings.is_empty() {
                    return None;
                }
                readings
            }
        };
        let n = readings.len();
        let seq = self.seq;
        self.seq += 1;
        self.spec.next_seq.store(self.seq, Relaxed);
        let header = Header {
            flags: Flags(if self.b.ack { Flags::ACK_REQUESTED } else { 0 }),
            device: self.spec.id,
            seq: Seq(seq),
        };
        let batch = Batch { readings };
        // The batch is within MAX_READINGS (checked at config time) and seq below SEQ_LIMIT.
        let Ok(sealed) = batch.seal(&header, &self.spec.cipher) else {
            return None;
        };
        if self.b.keep_readings {
            for (idx, r) in batch.readings.iter().enumerate() {
                self.sent.push(SentReading {
                    device: self.spec.id.0,
                    seq,
                    idx: idx as u32,
                    sensor: r.sensor.0,
                    ts_ms: r.ts.0,
                    value: r.value,
                    acked: false,
                });
            }
        }
        self.report.first_seq.get_or_insert(seq);
        self.report.last_seq = Some(seq);
        self.report.datagrams_sent += 1;
        self.report.readings_sent += n as u64;
        self.b.progress.datagrams_sent.fetch_add(1, Relaxed);
        self.b.progress.readings_sent.fetch_add(n as u64, Relaxed);
        let bytes = sealed.0;
        self.transmit(&faults, &bytes, out);
        if faults.replay > 0.0 && !self.history.is_empty() && self.rng.random_bool(faults.replay) {
            let i = self.rng.random_range(0..self.history.len());
            let old = self.history[i].clone();
            self.report.faults.replayed += 1;
            out.push(old);
        }
        if self.b.faults.replay > 0.0 || self.b.schedule.iter().any(|w| w.faults.replay > 0.0) {
            if self.history.len() == REPLAY_HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(bytes.clone());
        }
        if !self.b.ack {
            return None;
        }
        self.pending.insert(
            seq,
            Pending {
                bytes,
                sealed_under: self.installed,
                readings: n as u64,
                first_sent: now,
                tries: 1,
            },
        );
        Some(seq)
    }

    /// The ack timeout of datagram `seq`, scheduled after its `tries`-th transmission, ran out.
    pub(crate) fn retransmit(
        &mut self,
        seq: u64,
        tries: u32,
        now: Instant,
        out: &mut Out,
    ) -> Retransmit {
        self.refresh_key();
        let Some(p) = self.pending.get_mut(&seq) else {
            return Retransmit::Stale;
        };
        if p.tries != tries {
            return Retransmit::Stale;
        }
        if p.tries > self.b.retries {
            // Retries exhausted: give up on this datagram.
            self.pending.remove(&seq);
            self.report.unacked += 1;
            return Retransmit::GaveUp;
        }
        // Sealed under a key the device has since rotated away from: sealed again with the
        // key in use (the gateway refuses the old one once the rotation is confirmed).
        if p.sealed_under != self.installed
            && let Some(previous) = &self.previous
        {
            let mut plain = p.bytes.clone();
            if let Ok((header, batch)) = Batch::open(&mut plain, previous)
                && let Ok(sealed) = batch.seal(&header, &self.spec.cipher)
            {
                p.bytes = sealed.0;
                p.sealed_under = self.installed;
                self.report.resealed += 1;
            }
        }
        p.tries += 1;
        let tries = p.tries;
        let bytes = p.bytes.clone();
        match self.faults_now(now) {
            Some(faults) => {
                self.report.retransmissions += 1;
                self.transmit(&faults, &bytes, out);
            }
            // A silent device sends nothing; the try still counts towards giving up.
            None => self.report.faults.silenced += 1,
        }
        Retransmit::Again(tries)
    }

    /// An ack arrived for this device. Returns whether it settled a pending datagram.
    pub(crate) fn on_ack(&mut self, datagram: &[u8]) -> bool {
        self.refresh_key();
        // Acks come under the key their datagram was sealed with: the old one for datagrams
        // sent before a rotation.
        let opened = Ack::open(datagram, &self.spec.cipher).or_else(|e| match &self.previous {
            Some(previous) => Ack::open(datagram, previous),
            None => Err(e),
        });
        let Ok(ack) = opened else {
            return false;
        };
        if ack.device != self.spec.id {
            return false;
        }
        let Some(p) = self.pending.remove(&ack.seq.0) else {
            return false;
        };
        self.b
            .progress
            .ack_latency(p.first_sent.elapsed().as_micros() as u64);
        self.report.datagrams_acked += 1;
        self.report.readings_acked += p.readings;
        self.b.progress.datagrams_acked.fetch_add(1, Relaxed);
        self.b
            .progress
            .readings_acked
            .fetch_add(p.readings, Relaxed);
        if self.b.keep_readings {
            // Readings of one datagram are consecutive in `sent`; search from the end.
            for r in self.sent.iter_mut().rev() {
                if r.seq == ack.seq.0 {
                    r.acked = true;
                } else if r.seq < ack.seq.0 {
                    break;
                }
            }
        }
        true
    }

    /// One transmission through the fault injector.
    fn transmit(&mut self, f: &Faults, bytes: &[u8], out: &mut Out) {
        if f.corrupt > 0.0 && self.rng.random_bool(f.corrupt) {
            let mut copy = bytes.to_vec();
            let bit = self.rng.random_range(0..copy.len() * 8);
            copy[bit / 8] ^= 1 << (bit % 8);
            self.report.faults.corrupted += 1;
            out.push(copy);
            return;
        }
        if f.loss > 0.0 && self.rng.random_bool(f.loss) {
            self.report.faults.lost += 1;
            return;
        }
        if f.reorder > 0.0 && self.held.is_none() && self.rng.random_bool(f.reorder) {
            self.report.faults.reordered += 1;
            self.held = Some(bytes.to_vec());
            return;
        }
        let dup = f.dup > 0.0 && self.rng.random_bool(f.dup);
        out.push(bytes.to_vec());
        self.flush_held(out);
        if dup {
            self.report.faults.duplicated += 1;
            out.push(bytes.to_vec());
        }
    }

    /// Sends the datagram held back by a reorder fault, if any.
    pub(crate) fn flush_held(&mut self, out: &mut Out) {
        if let Some(h) = self.held.take() {
            out.push(h);
        }
    }

    /// Counts what the run ends with still unacknowledged.
    pub(crate) fn finish(mut self) -> (DeviceReport, Vec<SentReading>) {
        self.report.unacked += self.pending.len() as u64;
        (self.report, self.sent)
    }
}
