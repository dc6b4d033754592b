//! What a run sent and what the gateway acknowledged, per device and in total; the JSON
//! report a checker compares with the gateway's database.

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// Faults injected during a run, by kind.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FaultCounts {
    /// Transmissions not sent (simulated loss).
    pub lost: u64,
    /// Extra copies sent right after a transmission.
    pub duplicated: u64,
    /// Transmissions held back and sent after the next one.
    pub reordered: u64,
    /// Transmissions replaced by a copy with one bit flipped.
    pub corrupted: u64,
    /// Old datagrams sent again verbatim.
    pub replayed: u64,
    /// Datagrams not generated and retransmissions not sent because a fault schedule had the
    /// device silent.
    #[serde(default)]
    pub silenced: u64,
}

impl FaultCounts {
    pub(crate) fn add(&mut self, o: &FaultCounts) {
        self.lost += o.lost;
        self.duplicated += o.duplicated;
        self.reordered += o.reordered;
        self.corrupted += o.corrupted;
        self.replayed += o.replayed;
        self.silenced += o.silenced;
    }
}

/// A file a device received.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct FileReport {
    /// Transfer id.
    pub transfer: u64,
    /// Name it was stored under.
    pub name: String,
    /// Bytes.
    pub size: u64,
    /// SHA-256 the device computed, hex.
    pub sha256: String,
    /// Whether it matched the gateway's.
    pub ok: bool,
    /// Offsets the transfer resumed from after a cut session (empty when never cut).
    pub resumed_from: Vec<u64>,
}

/// One device's part of the report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct DeviceReport {
    /// Device id.
    pub id: u32,
    /// The scenario group it belongs to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Distinct datagrams (sequence numbers) generated.
    pub datagrams_sent: u64,
    /// Distinct datagrams acknowledged.
    pub datagrams_acked: u64,
    /// Readings in the datagrams generated.
    pub readings_sent: u64,
    /// Readings in the datagrams acknowledged.
    pub readings_acked: u64,
    /// First sequence number used in this run (None if nothing was sent).
    pub first_seq: Option<u64>,
    /// Last sequence number used in this run.
    pub last_seq: Option<u64>,
    /// Transmissions after the first for the same datagram.
    pub retransmissions: u64,
    /// Datagrams still unacknowledged when retries ran out or the run ended.
    pub unacked: u64,
    /// Socket send errors (e.g. the gateway is not listening).
    pub send_errors: u64,
    /// Datagrams skipped because the sequence lease in the fleet file could not be renewed.
    #[serde(default)]
    pub lease_waits: u64,
    /// Control sessions authenticated (with `--control`).
    #[serde(default)]
    pub control_sessions: u64,
    /// Control connection attempts or sessions that failed or dropped.
    #[serde(default)]
    pub control_failures: u64,
    /// Commands applied.
    #[serde(default)]
    pub commands: u64,
    /// Files received over the control session.
    #[serde(default)]
    pub files: Vec<FileReport>,
    /// Keys received over the control session, stored and confirmed.
    #[serde(default)]
    pub key_rotations: u64,
    /// Retransmissions sealed again because the key changed after the first transmission.
    #[serde(default)]
    pub resealed: u64,
    /// Faults injected.
    pub faults: FaultCounts,
}

/// The whole report.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Report {
    /// Distinct datagrams generated, all devices.
    pub datagrams_sent: u64,
    /// Distinct datagrams acknowledged.
    pub datagrams_acked: u64,
    /// Readings generated.
    pub readings_sent: u64,
    /// Readings acknowledged.
    pub readings_acked: u64,
    /// Retransmissions.
    pub retransmissions: u64,
    /// Datagrams never acknowledged (with acks on).
    pub unacked: u64,
    /// Socket send errors.
    pub send_errors: u64,
    /// Faults injected.
    pub faults: FaultCounts,
    /// Wall time of the run, seconds.
    pub elapsed_s: f64,
    /// Send-to-ack latency of acknowledged datagrams, from the first transmission (with acks
    /// on and at least one ack).
    #[serde(default)]
    pub ack_latency: Option<Latency>,
    /// Whether acks were requested.
    pub ack: bool,
    /// Totals per scenario group, in fleet order (empty without a scenario).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub groups: Vec<GroupTotals>,
    /// Per device, by id.
    pub devices: Vec<DeviceReport>,
}

impl Report {
    /// Sums per-device reports.
    pub fn from_devices(mut devices: Vec<DeviceReport>, elapsed_s: f64, ack: bool) -> Self {
        devices.sort_by_key(|d| d.id);
        let mut r = Report {
            elapsed_s,
            ack,
            ..Default::default()
        };
        for d in &devices {
            r.datagrams_sent += d.datagrams_sent;
            r.datagrams_acked += d.datagrams_acked;
            r.readings_sent += d.readings_sent;
            r.readings_acked += d.readings_acked;
            r.retransmissions += d.retransmissions;
            r.unacked += d.unacked;
            r.send_errors += d.send_errors;
            r.faults.add(&d.faults);
        }
        r.groups = group_totals(&devices);
        r.devices = devices;
        r
    }

    /// A human summary, a few lines.
    pub fn summary(&self) -> String {
        let rate = |n: u64| n as f64 / self.elapsed_s.max(1e-9);
        let mut s = format!(
            "devices {}  elapsed {:.1}s\n\
             sent   {} datagrams, {} readings ({:.0} readings/s)\n",
            self.devices.len(),
            self.elapsed_s,
            self.datagrams_sent,
            self.readings_sent,
            rate(self.readings_sent),
        );
        if self.ack {
            s.push_str(&format!(
                "acked  {} datagrams, {} readings; {} retransmissions, {} unacked\n",
                self.datagrams_acked, self.readings_acked, self.retransmissions, self.unacked
            ));
            if let Some(l) = &self.ack_latency {
                s.push_str(&format!(
                    "ack latency p50 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms\n",
                    l.p50_us as f64 / 1e3,
                    l.p99_us as f64 / 1e3,
                    l.p999_us as f64 / 1e3,
                    l.max_us as f64 / 1e3
                ));
            }
        }
        let f = &self.faults;
        if *f != FaultCounts::default() {
            s.push_str(&format!(
                "faults lost {} duplicated {} reordered {} corrupted {} replayed {} silenced {}\n",
                f.lost, f.duplicated, f.reordered, f.corrupted, f.replayed, f.silenced
            ));
        }
        for g in &self.groups {
            s.push_str(&format!(
                "group {}: {} devices, {} readings sent",
                g.name, g.devices, g.readings_sent
            ));
            if self.ack {
                s.push_str(&format!(", {} acked", g.readings_acked));
            }
            s.push('\n');
        }
        if self.send_errors > 0 {
            s.push_str(&format!("send errors {}\n", self.send_errors));
        }
        s
    }
}

/// Totals of one scenario group.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct GroupTotals {
    /// Group name.
    pub name: String,
    /// Devices.
    pub devices: u64,
    /// Readings generated.
    pub readings_sent: u64,
    /// Readings acknowledged.
    pub readings_acked: u64,
}

/// Totals per scenario group, in order of first device id (empty without a scenario).
fn group_totals(devices: &[DeviceReport]) -> Vec<GroupTotals> {
    let mut out: Vec<GroupTotals> = Vec::new();
    for d in devices {
        let Some(name) = &d.group else { continue };
        let i = match out.iter().position(|g| &g.name == name) {
            Some(i) => i,
            None => {
                out.push(GroupTotals {
                    name: name.clone(),
                    ..Default::default()
                });
                out.len() - 1
            }
        };
        out[i].devices += 1;
        out[i].readings_sent += d.readings_sent;
        out[i].readings_acked += d.readings_acked;
    }
    out
}

/// A latency distribution, microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Latency {
    /// Samples.
    pub count: u64,
    /// Median.
    pub p50_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

impl Latency {
    /// Summary of a histogram; None when it is empty.
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| Latency {
            count: h.len(),
            p50_us: h.value_at_quantile(0.5),
            p99_us: h.value_at_quantile(0.99),
            p999_us: h.value_at_quantile(0.999),
            max_us: h.max(),
        })
    }
}

/// A histogram for latencies from 1 µs to 10 min at 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    // Constant bounds that hdrhistogram accepts.
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// Live totals for progress displays, updated by the device tasks.
#[derive(Debug, Default)]
pub struct Progress {
    /// Control sessions.
    pub control: crate::control::ControlProgress,
    /// Datagrams generated.
    pub datagrams_sent: AtomicU64,
    /// Readings generated.
    pub readings_sent: AtomicU64,
    /// Datagrams acknowledged.
    pub datagrams_acked: AtomicU64,
    /// Readings acknowledged.
    pub readings_acked: AtomicU64,
    /// Send-to-ack latency of every acknowledged datagram, µs (None until the first ack).
    pub ack_latency: Mutex<Option<Histogram<u64>>>,
}

impl Progress {
    /// Records one send-to-ack latency.
    pub fn ack_latency(&self, us: u64) {
        if let Ok(mut h) = self.ack_latency.lock() {
            let _ = h
                .get_or_insert_with(latency_histogram)
                .record(us.clamp(1, 600_000_000));
        }
    }

    /// Summary of the send-to-ack latencies so far.
    pub fn ack_latency_summary(&self) -> Option<Latency> {
        self.ack_latency.lock().ok()?.as_ref().and_then(Latency::of)
    }

    /// (datagrams sent, readings sent, datagrams acked, readings acked).
    pub fn get(&self) -> (u64, u64, u64, u64) {
        (
            self.datagrams_sent.load(Relaxed),
            self.readings_sent.load(Relaxed),
            self.datagrams_acked.load(Relaxed),
            self.readings_acked.load(Relaxed),
        )
    }
}
