//! Tumbling event-time windows per device and sensor: count, min, max, mean, last and standard
//! deviation, for several window lengths at once.
//!
//! Pure: no clock, no I/O. Event time is the readings' own timestamps; each device has its own
//! watermark (the latest timestamp it sent), because device clocks differ. A window closes when
//! its device's watermark passes its end plus the allowed lateness, or when the device has been
//! silent (by the caller's `now`) for the idle time. A reading for a window already closed is
//! either folded into a corrected aggregate with the next revision number or counted as
//! dropped, as [`LatePolicy`] says; closed windows are remembered for revisions for
//! `keep_closed_ms` of event time.

use std::collections::{BTreeMap, HashMap};

/// What to do with a reading whose window has already closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LatePolicy {
    /// Re-emit the window's aggregate, corrected, with the next revision number.
    Revise,
    /// Count the reading as dropped (it stays in the raw readings).
    Drop,
}

/// Settings of the aggregator.
#[derive(Debug, Clone)]
pub struct AggregatorConfig {
    /// Window lengths in ms, e.g. `[10_000, 60_000]`.
    pub windows_ms: Vec<u64>,
    /// How far behind a device's latest timestamp a reading may be and still join an open
    /// window, ms.
    pub lateness_ms: u64,
    /// Late readings beyond that.
    pub late: LatePolicy,
    /// A device silent this long (gateway time, ms) has its open windows closed.
    pub idle_ms: u64,
    /// How long closed windows are kept for revisions, ms of event time.
    pub keep_closed_ms: u64,
}

/// Running statistics of one window (Welford's online mean and variance).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stats {
    /// Readings.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Sum of squared differences from the mean.
    m2: f64,
    /// Order key (timestamp, sequence, index) of the latest reading: the largest wins, so
    /// `last` does not depend on arrival order.
    pub last_key: (i64, u64, u16),
    /// Value of the latest reading.
    pub last: f64,
}

impl Stats {
    /// Statistics of one value.
    pub fn new(key: (i64, u64, u16), v: f64) -> Self {
        Self {
            count: 1,
            min: v,
            max: v,
            mean: v,
            m2: 0.0,
            last_key: key,
            last: v,
        }
    }

    fn add(&mut self, key: (i64, u64, u16), v: f64) {
        self.count += 1;
        self.min = self.min.min(v);
        self.max = self.max.max(v);
        let delta = v - self.mean;
        self.mean += delta / self.count as f64;
        self.m2 += delta * (v - self.mean);
        if key >= self.last_key {
            self.last_key = key;
            self.last = v;
        }
    }

    /// Folds `other` in (Chan's parallel combination of mean and variance): the result is
    /// what one window over both sets of readings would hold.
    pub fn merge(&mut self, other: &Stats) {
        if other.count == 0 {
            return;
        }
        if self.count == 0 {
            *self = *other;
            return;
        }
        let n = (self.count + other.count) as f64;
        let delta = other.mean - self.mean;
        let (na, nb) = (self.count as f64, other.count as f64);
        self.mean += delta * nb / n;
        self.m2 += other.m2 + delta * delta * na * nb / n;
        self.count += other.count;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        if other.last_key >= self.last_key {
            self.last_key = other.last_key;
            self.last = other.last;
        }
    }

    /// Statistics as stored (the sum of squares is recovered from the standard deviation).
    pub fn from_parts(
        count: u64,
        min: f64,
        max: f64,
        mean: f64,
        stddev: f64,
        last_key: (i64, u64, u16),
        last: f64,
    ) -> Self {
        Self {
            count,
            min,
            max,
            mean,
            m2: stddev * stddev * count as f64,
            last_key,
            last,
        }
    }

    /// Population standard deviation.
    pub fn stddev(&self) -> f64 {
        if self.count == 0 {
            0.0
        } else {
            (self.m2 / self.count as f64).sqrt()
        }
    }
}

/// A closed window's aggregate.
#[derive(Debug, Clone, PartialEq)]
pub struct Aggregate {
    /// Device.
    pub device: u32,
    /// Sensor.
    pub sensor: u16,
    /// Window length, ms.
    pub window_ms: u64,
    /// Window start (inclusive), ms since the epoch, device clock.
    pub start_ms: i64,
    /// Statistics.
    pub stats: Stats,
    /// 0 for the first emission, then 1, 2, … for corrections by late readings.
    pub revision: u32,
}

/// What happened to a pushed reading.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Joined open windows (of every length).
    Open,
    /// Joined at least one closed window, which was re-emitted with a new revision.
    Revised,
    /// Too late for at least one window length and dropped there (by policy or because the
    /// closed window is no longer remembered).
    DroppedLate,
    /// Values that are not finite or beyond ±1e300 are not aggregated (they would make the
    /// statistics NaN); the reading still moves its device's watermark.
    Ignored,
}

/// Largest magnitude that is aggregated: the running sums of squares stay free of NaN.
pub const MAX_AGGREGATED: f64 = 1e300;

/// Whether a value takes part in aggregation.
pub fn aggregated(v: f64) -> bool {
    v.is_finite() && v.abs() <= MAX_AGGREGATED
}

/// One reading as the aggregator takes it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Sample {
    /// Device.
    pub device: u32,
    /// Sensor.
    pub sensor: u16,
    /// Timestamp, ms, device clock.
    pub ts: i64,
    /// Sequence number of its datagram.
    pub seq: u64,
    /// Index in its datagram.
    pub idx: u16,
    /// Value.
    pub value: f64,
}

impl Sample {
    fn key(&self) -> (i64, u64, u16) {
        (self.ts, self.seq, self.idx)
    }
}

/// Key of a window: (length, start, sensor).
type Key = (u64, i64, u16);

#[derive(Debug, Default)]
struct DeviceState {
    /// Latest timestamp seen (event time).
    watermark: Option<i64>,
    /// Gateway time of the latest reading, ms.
    seen_ms: u64,
    open: BTreeMap<Key, Stats>,
    closed: BTreeMap<Key, (Stats, u32)>,
}

/// The aggregator.
#[derive(Debug)]
pub struct Aggregator {
    cfg: AggregatorConfig,
    devices: HashMap<u32, DeviceState>,
}

/// Start of the window of length `len` that holds `ts`.
pub fn window_start(ts: i64, len: u64) -> i64 {
    let len = len as i64;
    ts - ts.rem_euclid(len)
}

/// The watermark at which a window closes: its end plus the allowed lateness.
fn closes_at((len, start, _): Key, lateness_ms: u64) -> i64 {
    start
        .saturating_add(len as i64)
        .saturating_add(lateness_ms as i64)
}

/// Closes the due windows of one device. Closed windows are remembered for revisions only
/// with the revise policy (`keep`); with the drop policy only windows closed early (idle)
/// are remembered, until the watermark passes them, so that a device resuming within such a
/// window cannot open it a second time.
fn close_due(
    device: u32,
    d: &mut DeviceState,
    lateness_ms: u64,
    keep_closed_ms: u64,
    keep: bool,
    idle: bool,
    out: &mut Vec<Aggregate>,
) {
    let Some(wm) = d.watermark else { return };
    let due: Vec<Key> = d
        .open
        .keys()
        .filter(|k| idle || closes_at(**k, lateness_ms) <= wm)
        .copied()
        .collect();
    for key in due {
        if let Some(s) = d.open.remove(&key) {
            out.push(Aggregate {
                device,
                sensor: key.2,
                window_ms: key.0,
                start_ms: key.1,
                stats: s,
                revision: 0,
            });
            if keep || closes_at(key, lateness_ms) > wm {
                d.closed.insert(key, (s, 0));
            }
        }
    }
    if !d.closed.is_empty() {
        let horizon = wm.saturating_sub(keep_closed_ms as i64);
        d.closed.retain(|k, _| {
            if keep {
                k.1.saturating_add(k.0 as i64) > horizon
            } else {
                closes_at(*k, lateness_ms) > wm
            }
        });
    }
}

impl Aggregator {
    /// An aggregator with `cfg`. Window lengths of zero are ignored.
    pub fn new(mut cfg: AggregatorConfig) -> Self {
        cfg.windows_ms.retain(|w| *w > 0 && *w <= i64::MAX as u64);
        cfg.windows_ms.sort_unstable();
        cfg.windows_ms.dedup();
        Self {
            cfg,
            devices: HashMap::new(),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &AggregatorConfig {
        &self.cfg
    }

    /// Adds a reading received at gateway time `now_ms`; closed windows it corrects are
    /// appended to `out`.
    pub fn push(&mut self, r: Sample, now_ms: u64, out: &mut Vec<Aggregate>) -> Pushed {
        let cfg = &self.cfg;
        let d = self.devices.entry(r.device).or_default();
        d.seen_ms = d.seen_ms.max(now_ms);
        let wm = d.watermark.map_or(r.ts, |w| w.max(r.ts));
        d.watermark = Some(wm);
        if !aggregated(r.value) {
            return Pushed::Ignored;
        }
        let mut result = Pushed::Open;
        for &len in &cfg.windows_ms {
            let key = (len, window_start(r.ts, len), r.sensor);
            if let Some(s) = d.open.get_mut(&key) {
                s.add(r.key(), r.value);
                continue;
            }
            if let Some((s, rev)) = d.closed.get_mut(&key) {
                match cfg.late {
                    LatePolicy::Revise => {
                        s.add(r.key(), r.value);
                        *rev += 1;
                        out.push(Aggregate {
                            device: r.device,
                            sensor: r.sensor,
                            window_ms: len,
                            start_ms: key.1,
                            stats: *s,
                            revision: *rev,
                        });
                        if result == Pushed::Open {
                            result = Pushed::Revised;
                        }
                    }
                    LatePolicy::Drop => result = Pushed::DroppedLate,
                }
                continue;
            }
            if closes_at(key, cfg.lateness_ms) <= wm {
                // Its window would already have closed and is not remembered (or never
                // existed): too late.
                result = Pushed::DroppedLate;
            } else {
                d.open.insert(key, Stats::new(r.key(), r.value));
            }
        }
        result
    }

    /// Restores a device after a restart: its watermark (newest stored reading) and the
    /// windows already closed (as stored), before its recent readings are replayed with
    /// [`Aggregator::replay`].
    pub fn restore(&mut self, device: u32, watermark: i64, closed: &[Aggregate], now_ms: u64) {
        let d = self.devices.entry(device).or_default();
        d.watermark = Some(d.watermark.map_or(watermark, |w| w.max(watermark)));
        d.seen_ms = d.seen_ms.max(now_ms);
        for a in closed {
            d.closed
                .insert((a.window_ms, a.start_ms, a.sensor), (a.stats, a.revision));
        }
    }

    /// Re-adds a stored reading after [`Aggregator::restore`]: it joins (or opens) windows that
    /// were open when the gateway stopped and is ignored for windows already closed or that
    /// its device's watermark has passed (they were emitted, or it was dropped as late).
    pub fn replay(&mut self, r: Sample) {
        let cfg = &self.cfg;
        let d = self.devices.entry(r.device).or_default();
        let wm = d.watermark.map_or(r.ts, |w| w.max(r.ts));
        d.watermark = Some(wm);
        if !aggregated(r.value) {
            return;
        }
        for &len in &cfg.windows_ms {
            let key = (len, window_start(r.ts, len), r.sensor);
            if let Some(s) = d.open.get_mut(&key) {
                s.add(r.key(), r.value);
            } else if !d.closed.contains_key(&key) && closes_at(key, cfg.lateness_ms) > wm {
                d.open.insert(key, Stats::new(r.key(), r.value));
            }
        }
    }

    /// Closes the windows of `device` whose end plus lateness its watermark has passed,
    /// appending them to `out` (revision 0). Cheap: call it for each device a batch touched.
    pub fn advance_device(&mut self, device: u32, out: &mut Vec<Aggregate>) {
        let cfg = &self.cfg;
        let keep = cfg.late == LatePolicy::Revise;
        if let Some(d) = self.devices.get_mut(&device) {
            close_due(
                device,
                d,
                cfg.lateness_ms,
                cfg.keep_closed_ms,
                keep,
                false,
                out,
            );
        }
    }

    /// Closes due windows of every device, and every open window of devices silent (by the
    /// gateway clock) for the idle time; forgets closed windows older than the keep time.
    /// Closed windows are appended to `out` (revision 0).
    pub fn advance(&mut self, now_ms: u64, out: &mut Vec<Aggregate>) {
        let cfg = &self.cfg;
        let keep = cfg.late == LatePolicy::Revise;
        for (&device, d) in &mut self.devices {
            let idle = now_ms.saturating_sub(d.seen_ms) >= cfg.idle_ms;
            close_due(
                device,
                d,
                cfg.lateness_ms,
                cfg.keep_closed_ms,
                keep,
                idle,
                out,
            );
        }
    }

    /// Closes every open window (shutdown), appending them to `out`.
    pub fn flush(&mut self, out: &mut Vec<Aggregate>) {
        self.advance(u64::MAX, out);
    }

    /// Open windows, all devices (for metrics and tests).
    pub fn open_windows(&self) -> usize {
        self.devices.values().map(|d| d.open.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agg(late: LatePolicy) -> Aggregator {
        Aggregator::new(AggregatorConfig {
            windows_ms: vec![10_000, 60_000],
            lateness_ms: 2_000,
            late,
            idle_ms: 30_000,
            keep_closed_ms: 600_000,
        })
    }

    fn s(device: u32, sensor: u16, ts: i64, value: f64) -> Sample {
        Sample {
            device,
            sensor,
            ts,
            seq: ts as u64,
            idx: 0,
            value,
        }
    }

    #[test]
    fn restore_and_replay_continue_exactly_where_a_crash_left_off() {
        // A reference aggregator runs through; a second one "crashes" at every 37th reading:
        // it is rebuilt from what was stored (the readings so far and the closed windows) and
        // must emit exactly what the reference emits from there on.
        let mut reference = agg(LatePolicy::Revise);
        let mut stored: Vec<Sample> = Vec::new();
        let mut closed: std::collections::BTreeMap<(u32, u64, i64, u16), Aggregate> =
            Default::default();
        let mut live = agg(LatePolicy::Revise);
        let mut rng = 12345u64;
        for i in 0..3_000i64 {
            rng = rng
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let late = (rng >> 33).is_multiple_of(10);
            let device = (rng >> 40) as u32 % 3;
            let ts = i * 300
                - if late {
                    ((rng >> 20) % 20_000) as i64
                } else {
                    0
                };
            let r = Sample {
                device,
                sensor: (rng >> 50) as u16 % 2,
                ts,
                seq: i as u64,
                idx: 0,
                value: ((rng >> 11) % 1000) as f64 / 10.0,
            };
            let (mut o1, mut o2) = (Vec::new(), Vec::new());
            reference.push(r, 0, &mut o1);
            reference.advance_device(device, &mut o1);
            live.push(r, 0, &mut o2);
            live.advance_device(device, &mut o2);
            assert_eq!(o1.len(), o2.len(), "reading {i}");
            for (x, y) in o1.iter().zip(&o2) {
                assert!(same(x, y), "reading {i}: {x:?} vs {y:?}");
            }
            stored.push(r);
            for a in o2 {
                closed.insert((a.device, a.window_ms, a.start_ms, a.sensor), a);
            }
            if i % 37 == 36 {
                live = agg(LatePolicy::Revise);
                for dev in 0..3u32 {
                    let Some(wm) = stored
                        .iter()
                        .filter(|r| r.device == dev)
                        .map(|r| r.ts)
                        .max()
                    else {
                        continue;
                    };
                    let mine: Vec<Aggregate> = closed
                        .values()
                        .filter(|a| a.device == dev)
                        .cloned()
                        .collect();
                    live.restore(dev, wm, &mine, 0);
                }
                let mut sorted = stored.clone();
                sorted.sort_by_key(|r| (r.device, r.ts, r.seq, r.idx));
                for r in sorted {
                    live.replay(r);
                }
            }
        }
        let (mut o1, mut o2) = (Vec::new(), Vec::new());
        reference.flush(&mut o1);
        live.flush(&mut o2);
        o1.sort_by_key(|a| (a.device, a.window_ms, a.start_ms, a.sensor));
        o2.sort_by_key(|a| (a.device, a.window_ms, a.start_ms, a.sensor));
        assert_eq!(o1.len(), o2.len());
        let revisions = closed.values().filter(|a| a.revision > 0).count();
        assert!(
            closed.len() > 500 && revisions > 50,
            "{} windows, {revisions} revised",
            closed.len()
        );
        for (x, y) in o1.iter().zip(&o2) {
            assert!(same(x, y), "{x:?} vs {y:?}");
        }
    }

    /// Equal but for rounding: the sum of squares depends on the order readings were added.
    fn same(x: &Aggregate, y: &Aggregate) -> bool {
        let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * a.abs().max(b.abs()).max(1.0);
        (x.device, x.sensor, x.window_ms, x.start_ms, x.revision)
            == (y.device, y.sensor, y.window_ms, y.start_ms, y.revision)
            && (
                x.stats.count,
                x.stats.min,
                x.stats.max,
                x.stats.last_key,
                x.stats.last,
            ) == (
                y.stats.count,
                y.stats.min,
                y.stats.max,
                y.stats.last_key,
                y.stats.last,
            )
            && close(x.stats.mean, y.stats.mean)
            && close(x.stats.stddev(), y.stats.stddev())
    }

    fn naive(values: &[f64]) -> (f64, f64, f64, f64) {
        let n = values.len() as f64;
        let mean = values.iter().sum::<f64>() / n;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (min, max, mean, var.sqrt())
    }

    #[test]
    fn windows_close_at_watermark_plus_lateness_with_exact_stats() {
        let mut a = agg(LatePolicy::Drop);
        let mut out = Vec::new();
        let values: Vec<f64> = (0..10).map(|i| f64::from(i) * 1.5 - 3.0).collect();
        for (i, v) in values.iter().enumerate() {
            a.push(s(1, 1, 1_000 * i as i64, *v), 0, &mut out);
        }
        a.advance(0, &mut out);
        assert!(out.is_empty(), "window [0,10s) still open");
        // 11.999 s: not yet past 10 s + 2 s of lateness.
        a.push(s(1, 1, 11_999, 100.0), 0, &mut out);
        a.advance(0, &mut out);
        assert!(out.is_empty());
        a.push(s(1, 1, 12_000, 100.0), 0, &mut out);
        a.advance(0, &mut out);
        assert_eq!(out.len(), 1);
        let w = &out[0];
        assert_eq!(
            (w.device, w.sensor, w.window_ms, w.start_ms, w.revision),
            (1, 1, 10_000, 0, 0)
        );
        let (min, max, mean, sd) = naive(&values);
        assert_eq!(w.stats.count, 10);
        assert_eq!((w.stats.min, w.stats.max), (min, max));
        assert!((w.stats.mean - mean).abs() < 1e-12 && (w.stats.stddev() - sd).abs() < 1e-12);
        assert_eq!(w.stats.last, values[9]);
    }

    #[test]
    fn late_readings_within_lateness_join_and_beyond_it_revise_or_drop() {
        for policy in [LatePolicy::Revise, LatePolicy::Drop] {
            let mut a = agg(policy);
            let mut out = Vec::new();
            a.push(s(1, 1, 5_000, 1.0), 0, &mut out);
            a.push(s(1, 1, 11_000, 2.0), 0, &mut out);
            // Within lateness: window [0,10s) is still open at watermark 11 s.
            assert_eq!(a.push(s(1, 1, 9_000, 3.0), 0, &mut out), Pushed::Open);
            a.push(s(1, 1, 13_000, 4.0), 0, &mut out);
            a.advance(0, &mut out);
            let first = out
                .iter()
                .find(|w| w.window_ms == 10_000 && w.start_ms == 0)
                .cloned();
            assert_eq!(first.map(|w| (w.stats.count, w.revision)), Some((2, 0)));
            out.clear();
            // Beyond lateness.
            let r = a.push(s(1, 1, 8_000, 9.0), 0, &mut out);
            match policy {
                LatePolicy::Revise => {
                    assert_eq!(r, Pushed::Revised);
                    assert_eq!(out.len(), 1);
                    assert_eq!(
                        (out[0].stats.count, out[0].revision, out[0].stats.max),
                        (3, 1, 9.0)
                    );
                    assert_eq!(
                        out[0].stats.last, 3.0,
                        "last is by timestamp, 9 s beats 8 s"
                    );
                }
                LatePolicy::Drop => {
                    assert_eq!(r, Pushed::DroppedLate);
                    assert!(out.is_empty());
                }
            }
        }
    }

    #[test]
    fn devices_have_their_own_watermarks_and_idle_devices_close() {
        let mut a = agg(LatePolicy::Drop);
        let mut out = Vec::new();
        a.push(s(1, 1, 1_000, 1.0), 100, &mut out);
        // Device 2's clock is a day ahead: it must not close device 1's windows.
        a.push(s(2, 1, 86_400_000, 1.0), 100, &mut out);
        a.push(s(2, 1, 86_500_000, 1.0), 100, &mut out);
        a.advance(100, &mut out);
        assert!(out.iter().all(|w| w.device == 2));
        out.clear();
        // Device 1 falls silent: after the idle time its windows close anyway.
        a.advance(100 + 29_999, &mut out);
        assert!(out.iter().all(|w| w.device != 1));
        a.advance(100 + 30_000, &mut out);
        assert_eq!(
            out.iter().filter(|w| w.device == 1).count(),
            2,
            "10 s and 1 min"
        );
        assert_eq!(a.open_windows(), 0);
    }

    #[test]
    fn a_window_closed_by_idleness_is_not_opened_twice() {
        for policy in [LatePolicy::Drop, LatePolicy::Revise] {
            let mut a = agg(policy);
            let mut out = Vec::new();
            a.push(s(1, 1, 1_000, 1.0), 0, &mut out);
            a.advance(30_000, &mut out);
            assert_eq!(out.len(), 2, "idle: both windows closed");
            out.clear();
            // The device resumes inside its 1-minute window, which the watermark has not
            // passed: a revision or a counted drop, never a second revision 0.
            let r = a.push(s(1, 1, 20_000, 2.0), 30_000, &mut out);
            a.advance_device(1, &mut out);
            let minute: Vec<_> = out.iter().filter(|w| w.window_ms == 60_000).collect();
            match policy {
                LatePolicy::Drop => {
                    assert_eq!(r, Pushed::DroppedLate);
                    assert!(minute.is_empty());
                }
                LatePolicy::Revise => {
                    assert_eq!(minute.len(), 1);
                    assert_eq!((minute[0].revision, minute[0].stats.count), (1, 2));
                }
            }
        }
    }

    #[test]
    fn several_lengths_sensors_and_nan() {
        let mut a = agg(LatePolicy::Drop);
        let mut out = Vec::new();
        for t in 0..120 {
            a.push(s(7, 1, t * 1_000, 1.0), 0, &mut out);
            a.push(s(7, 2, t * 1_000, 2.0), 0, &mut out);
        }
        for v in [f64::NAN, f64::INFINITY, f64::NEG_INFINITY, 1e308, -1e301] {
            assert_eq!(a.push(s(7, 3, 1, v), 0, &mut out), Pushed::Ignored);
        }
        // Extremes that are aggregated never make the statistics NaN.
        a.push(s(7, 4, 1, 1e300), 0, &mut out);
        a.push(s(7, 4, 2, -1e300), 0, &mut out);
        a.push(s(7, 4, 3, 5.0), 0, &mut out);
        a.flush(&mut out);
        let tens = out.iter().filter(|w| w.window_ms == 10_000).count();
        let mins = out.iter().filter(|w| w.window_ms == 60_000).count();
        assert_eq!((tens, mins), (24, 4));
        assert!(out.iter().all(|w| w.sensor != 3));
        assert!(
            out.iter()
                .filter(|w| w.sensor == 4)
                .all(|w| !w.stats.mean.is_nan()
                    && !w.stats.stddev().is_nan()
                    && w.stats.count == 3)
        );
        let total: u64 = out
            .iter()
            .filter(|w| w.window_ms == 60_000)
            .map(|w| w.stats.count)
            .sum();
        assert_eq!(total, 240);
        // Negative timestamps land in the right window.
        assert_eq!(window_start(-1, 10_000), -10_000);
    }

    /// The aggregator against a naive recomputation: for any arrival order (in order, slightly
    /// late, very late), any cadence of `advance` calls and either late policy, the last
    /// emission of every window holds exactly the statistics of the readings that joined it
    /// (those the aggregator did not report as dropped), computed from scratch; revisions of a
    /// window count up from 0 in emission order, one per revised reading; with the drop
    /// policy every window is emitted once.
    mod model {
        use super::super::*;
        use proptest::prelude::*;
        use std::collections::BTreeMap;

        #[derive(Debug, Clone)]
        struct Arrival {
            device: u32,
            sensor: u16,
            step_ms: i64,
            lag_ms: i64,
            value: f64,
            advance: bool,
        }

        fn arrival() -> impl Strategy<Value = Arrival> {
            let lag = prop_oneof![8 => 0i64..50, 2 => 0i64..6_000];
            (
                1u32..=3,
                1u16..=2,
                0i64..300,
                lag,
                -1e3f64..1e3,
                any::<bool>(),
            )
                .prop_map(|(device, sensor, step_ms, lag_ms, value, advance)| {
                    Arrival {
                        device,
                        sensor,
                        step_ms,
                        lag_ms,
                        value,
                        advance,
                    }
                })
        }

        /// Device, sensor, window start.
        type WindowId = (u32, u16, i64);

        fn close(a: f64, b: f64) -> bool {
            (a - b).abs() <= 1e-9 * (1.0 + a.abs().max(b.abs()))
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(500))]
            #[test]
            fn last_emission_equals_naive_recomputation(
                arrivals in prop::collection::vec(arrival(), 1..300),
                len in prop_oneof![Just(1_000u64), Just(5_000), Just(60_000)],
                lateness in 0u64..3_000,
                revise in any::<bool>(),
            ) {
                let late = if revise { LatePolicy::Revise } else { LatePolicy::Drop };
                let mut a = Aggregator::new(AggregatorConfig {
                    windows_ms: vec![len],
                    lateness_ms: lateness,
                    late,
                    idle_ms: u64::MAX / 2,
                    keep_closed_ms: 1 << 40,
                });
                let mut out = Vec::new();
                // Readings that joined each window: (ts, seq, value).
                let mut joined: BTreeMap<WindowId, Vec<(i64, u64, f64)>> = BTreeMap::new();
                let mut revised: BTreeMap<WindowId, u32> = BTreeMap::new();
                let mut clock = 1_000_000i64;
                for (seq, r) in arrivals.iter().enumerate() {
                    clock += r.step_ms;
                    let ts = clock - r.lag_ms;
                    let sample = Sample {
                        device: r.device,
                        sensor: r.sensor,
                        ts,
                        seq: seq as u64,
                        idx: 0,
                        value: r.value,
                    };
                    let key = (r.device, r.sensor, window_start(ts, len));
                    match a.push(sample, 0, &mut out) {
                        Pushed::Open => joined.entry(key).or_default().push((ts, seq as u64, r.value)),
                        Pushed::Revised => {
                            prop_assert!(revise, "a revision under the drop policy");
                            joined.entry(key).or_default().push((ts, seq as u64, r.value));
                            *revised.entry(key).or_default() += 1;
                        }
                        Pushed::DroppedLate => {}
                        Pushed::Ignored => prop_assert!(false, "finite value ignored"),
                    }
                    if r.advance {
                        a.advance_device(r.device, &mut out);
                    }
                }
                a.flush(&mut out);
                prop_assert_eq!(a.open_windows(), 0);

                let mut emitted: BTreeMap<WindowId, Vec<&Aggregate>> = BTreeMap::new();
                for e in &out {
                    prop_assert_eq!(e.window_ms, len);
                    emitted.entry((e.device, e.sensor, e.start_ms)).or_default().push(e);
                }
                prop_assert_eq!(
                    emitted.keys().collect::<Vec<_>>(),
                    joined.keys().collect::<Vec<_>>(),
                    "every window with a reading is emitted, no other"
                );
                for (key, readings) in &joined {
                    let es = &emitted[key];
                    let revisions: Vec<u32> = es.iter().map(|e| e.revision).collect();
                    let expected: Vec<u32> = (0..=revised.get(key).copied().unwrap_or(0)).collect();
                    prop_assert_eq!(revisions, expected, "window {:?}", key);
                    let last = es[es.len() - 1].stats;
                    let values: Vec<f64> = readings.iter().map(|r| r.2).collect();
                    let (min, max, mean, sd) = super::naive(&values);
                    prop_assert_eq!(last.count, values.len() as u64);
                    prop_assert_eq!((last.min, last.max), (min, max));
                    prop_assert!(close(last.mean, mean), "mean {} vs {}", last.mean, mean);
                    prop_assert!(close(last.stddev(), sd), "sd {} vs {}", last.stddev(), sd);
                    let newest = readings.iter().max_by_key(|r| (r.0, r.1)).map(|r| r.2);
                    prop_assert_eq!(Some(last.last), newest);
                }
            }
        }
    }
}
