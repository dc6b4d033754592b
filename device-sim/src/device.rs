//! One simulated device: generates batches from its sensor model, seals them with its key and
//! sequence counter, sends them through the fault injector, and (with acks on) retransmits
//! what the gateway has not acknowledged, a bounded number of times.
//!
//! Emits: nothing; its outcome is its [`DeviceReport`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use proto::{Ack, Batch, Cipher, DeviceId, Flags, Header, Millis, Reading, SensorId, Seq};
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use tokio::net::UdpSocket;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::model::SensorModel;
use crate::report::{DeviceReport, Progress};
use crate::{Faults, SentReading};

/// How many past datagrams a device keeps for replay faults.
const REPLAY_HISTORY: usize = 512;

/// What a device needs to run.
pub(crate) struct DeviceSpec {
    pub id: DeviceId,
    pub cipher: Cipher,
    pub first_seq: u64,
    pub seed: u64,
    pub socket: UdpSocket,
    /// The next sequence number, shared with the fleet-file checkpointer.
    pub next_seq: Arc<AtomicU64>,
    /// First sequence number not yet leased in the fleet file: never used.
    pub seq_limit: Arc<AtomicU64>,
}

/// Timing and behaviour shared by every device of a run.
#[derive(Clone)]
pub(crate) struct Behaviour {
    pub period: Duration,
    pub batch: usize,
    pub ack: bool,
    pub retries: u32,
    pub ack_timeout: Duration,
    pub faults: Faults,
    pub keep_readings: bool,
    pub progress: Arc<Progress>,
    pub control: Option<crate::control::ControlTarget>,
    pub seed: u64,
}

struct Pending {
    bytes: Vec<u8>,
    readings: u64,
    first_sent: Instant,
    last_sent: Instant,
    tries: u32,
}

pub(crate) struct Device {
    spec: DeviceSpec,
    b: Behaviour,
    rng: SmallRng,
    model: SensorModel,
    seq: u64,
    pending: BTreeMap<u64, Pending>,
    held: Option<Vec<u8>>,
    history: VecDeque<Vec<u8>>,
    report: DeviceReport,
    sent: Vec<SentReading>,
    sample_index: u64,
    /// Period, batch and sensors; commands and config pushes change them.
    live: Arc<crate::control::LiveConfig>,
    key: proto::DeviceKey,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Device {
    pub(crate) fn new(spec: DeviceSpec, key: proto::DeviceKey, b: Behaviour) -> Self {
        let mut rng = SmallRng::seed_from_u64(
            spec.seed ^ u64::from(spec.id.0).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let model = SensorModel::new(&mut rng);
        let seq = spec.first_seq;
        let live = Arc::new(crate::control::LiveConfig::new(
            b.period.as_millis() as u64,
            b.batch as u64,
        ));
        let report = DeviceReport {
            id: spec.id.0,
            ..Default::default()
        };
        Self {
            spec,
            b,
            rng,
            model,
            seq,
            pending: BTreeMap::new(),
            held: None,
            history: VecDeque::new(),
            report,
            sent: Vec::new(),
            sample_index: 0,
            live,
            key,
        }
    }

    /// Sends until `until` (or cancellation), then waits for outstanding acks (retransmitting)
    /// until they arrive, retries run out, or `cancel` fires.
    pub(crate) async fn run(
        self,
        until: Option<Instant>,
        cancel: CancellationToken,
    ) -> (DeviceReport, Vec<SentReading>) {
        let Some(target) = self.b.control.clone() else {
            return self.run_telemetry(until, cancel).await;
        };
        // The control session lives as long as the telemetry loop.
        let stop_control = cancel.child_token();
        let control = crate::control::run(
            self.spec.id,
            self.key.clone(),
            target,
            self.live.clone(),
            self.b.progress.clone(),
            self.b.seed,
            stop_control.clone(),
        );
        let telemetry = async {
            let r = self.run_telemetry(until, cancel).await;
            stop_control.cancel();
            r
        };
        let ((mut report, sent), c) = tokio::join!(telemetry, control);
        report.control_sessions = c.sessions;
        report.control_failures = c.failures;
        report.commands = c.commands;
        report.files = c.files;
        (report, sent)
    }

    async fn run_telemetry(
        mut self,
        until: Option<Instant>,
        cancel: CancellationToken,
    ) -> (DeviceReport, Vec<SentReading>) {
        let phase = self.rng.random_range(0.0..1.0);
        let start = Instant::now() + self.b.period.mul_f64(phase);
        let mut period = self.live.period_ms.load(Relaxed);
        let mut tick = tokio::time::interval_at(start, Duration::from_millis(period));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut buf = [0u8; 64];
        let mut sending = true;
        loop {
            let retx_at = self.next_retransmit();
            let drain_done = !sending && self.pending.is_empty();
            if drain_done {
                break;
            }
            let stop_at = until.filter(|_| sending);
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                r = self.spec.socket.recv(&mut buf) => {
                    if let Ok(n) = r {
                        self.on_ack(&buf[..n]);
                    }
                }
                _ = sleep_opt(stop_at) => {
                    sending = false;
                    self.flush_held().await;
                }
                _ = tick.tick(), if sending => {
                    self.send_next().await;
                    let now = self.live.period_ms.load(Relaxed);
                    if now != period {
                        period = now;
                        let p = Duration::from_millis(period);
                        tick = tokio::time::interval_at(Instant::now() + p, p);
                        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
                    }
                }
                _ = sleep_opt(retx_at) => self.retransmit_due().await,
            }
        }
        self.flush_held().await;
        self.report.unacked += self.pending.len() as u64;
        (self.report, self.sent)
    }

    fn next_retransmit(&self) -> Option<Instant> {
        if !self.b.ack {
            return None;
        }
        self.pending
            .values()
            .map(|p| p.last_sent + self.b.ack_timeout)
            .min()
    }

    async fn send_next(&mut self) {
        if self.seq >= self.spec.seq_limit.load(Relaxed) || self.seq >= proto::SEQ_LIMIT {
            // The lease could not be renewed (or the counter is exhausted): skip rather than
            // risk reusing a sequence number after a crash.
            self.report.lease_waits += 1;
            return;
        }
        let seq = self.seq;
        self.seq += 1;
        self.spec.next_seq.store(self.seq, Relaxed);
        let now = now_ms();
        let n = (self.live.batch.load(Relaxed) as usize).clamp(1, proto::MAX_READINGS);
        let mut sensors = self.live.sensor_ids();
        if sensors.is_empty() {
            // `LiveConfig` never stores an empty set; stay safe if that ever changes.
            sensors.push(1);
        }
        let spacing = self.live.period_ms.load(Relaxed) as f64 / n as f64;
        let mut readings = Vec::with_capacity(n);
        for i in 0..n {
            let back = ((n - 1 - i) as f64 * spacing) as u64;
            let ts = now.saturating_sub(back);
            let sensor = sensors[(self.sample_index % sensors.len() as u64) as usize];
            self.sample_index += 1;
            let value = self.model.sample(sensor, ts, &mut self.rng);
            readings.push(Reading {
                sensor: SensorId(sensor),
                ts: Millis(ts),
                value,
            });
        }
        let header = Header {
            flags: Flags(if self.b.ack { Flags::ACK_REQUESTED } else { 0 }),
            device: self.spec.id,
            seq: Seq(seq),
        };
        let batch = Batch { readings };
        // The batch is within MAX_READINGS (checked at config time) and seq below SEQ_LIMIT.
        let Ok(sealed) = batch.seal(&header, &self.spec.cipher) else {
            return;
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
        let sent_at = Instant::now();
        self.transmit(&bytes).await;
        if self.b.faults.replay > 0.0
            && !self.history.is_empty()
            && self.rng.random_bool(self.b.faults.replay)
        {
            let i = self.rng.random_range(0..self.history.len());
            let old = self.history[i].clone();
            self.report.faults.replayed += 1;
            self.raw_send(&old).await;
        }
        if self.b.faults.replay > 0.0 {
            if self.history.len() == REPLAY_HISTORY {
                self.history.pop_front();
            }
            self.history.push_back(bytes.clone());
        }
        if self.b.ack {
            self.pending.insert(
                seq,
                Pending {
                    bytes,
                    readings: n as u64,
                    first_sent: sent_at,
                    last_sent: sent_at,
                    tries: 1,
                },
            );
        }
    }

    async fn retransmit_due(&mut self) {
        let now = Instant::now();
        let due: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.last_sent + self.b.ack_timeout <= now)
            .map(|(s, _)| *s)
            .collect();
        for seq in due {
            let Some(p) = self.pending.get_mut(&seq) else {
                continue;
            };
            if p.tries > self.b.retries {
                // Retries exhausted: give up on this datagram.
                self.pending.remove(&seq);
                self.report.unacked += 1;
                continue;
            }
            p.tries += 1;
            p.last_sent = now;
            let bytes = p.bytes.clone();
            self.report.retransmissions += 1;
            self.transmit(&bytes).await;
        }
    }

    fn on_ack(&mut self, datagram: &[u8]) {
        let Ok(ack) = Ack::open(datagram, &self.spec.cipher) else {
            return;
        };
        if ack.device != self.spec.id {
            return;
        }
        if let Some(p) = self.pending.remove(&ack.seq.0) {
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
        }
    }

    /// One transmission through the fault injector.
    async fn transmit(&mut self, bytes: &[u8]) {
        let f = self.b.faults.clone();
        if f.corrupt > 0.0 && self.rng.random_bool(f.corrupt) {
            let mut copy = bytes.to_vec();
            let bit = self.rng.random_range(0..copy.len() * 8);
            copy[bit / 8] ^= 1 << (bit % 8);
            self.report.faults.corrupted += 1;
            self.raw_send(&copy).await;
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
        self.raw_send(bytes).await;
        self.flush_held().await;
        if f.dup > 0.0 && self.rng.random_bool(f.dup) {
            self.report.faults.duplicated += 1;
            self.raw_send(bytes).await;
        }
    }

    async fn flush_held(&mut self) {
        if let Some(h) = self.held.take() {
            self.raw_send(&h).await;
        }
    }

    async fn raw_send(&mut self, bytes: &[u8]) {
        if self.spec.socket.send(bytes).await.is_err() {
            self.report.send_errors += 1;
        }
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
