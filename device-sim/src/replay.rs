//! Replay of recorded readings: a CSV file read into per-device queues that devices send
//! instead of a sensor model, paced by the readings' own timestamps (or as fast as acks allow).
//!
//! The CSV needs a header naming its columns; recognised are `device` (or `device_id`),
//! `sensor`, `value`, and the time as `ts_ms` (milliseconds since the Unix epoch) or `time` /
//! `ts` (milliseconds or RFC 3339). Other columns are ignored, so the gateway's own CSV export
//! (`device,sensor,time,ts_ms,value,seq,idx`) and the simulator's `--readings-log` both replay
//! as they are. An empty value or `NaN` is a missing sample.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

/// One recorded reading.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Recorded {
    /// Sensor id.
    pub sensor: u16,
    /// Timestamp as recorded, ms since the Unix epoch.
    pub ts_ms: u64,
    /// Value (NaN when missing).
    pub value: f64,
}

/// A CSV file read into memory: per device id, its readings in time order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recording {
    /// Readings by device id, each list sorted by time (stable: equal times keep file order).
    pub devices: BTreeMap<u32, Vec<Recorded>>,
    /// Readings in all.
    pub readings: u64,
    /// Earliest timestamp.
    pub first_ts: u64,
    /// Latest timestamp.
    pub last_ts: u64,
}

/// What the devices put in the readings' timestamp field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Timestamps {
    /// Move the recording to now: paced, each reading carries the time it is sent at; unpaced,
    /// the last reading carries the start time and the others keep their spacing before it.
    #[default]
    Shift,
    /// Keep the recorded timestamps (loading history; aggregates treat old readings as late).
    Keep,
}

impl Recording {
    /// Reads a CSV file.
    ///
    /// # Errors
    /// A message naming the file, line and column of the first problem.
    pub fn load(path: &Path) -> Result<Recording, String> {
        let file = std::fs::File::open(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
        Recording::parse(std::io::BufReader::new(file))
            .map_err(|e| format!("{}: {e}", path.display()))
    }

    /// Reads CSV text.
    ///
    /// # Errors
    /// The line and column of the first problem.
    pub fn parse(input: impl Read) -> Result<Recording, String> {
        let mut reader = csv::ReaderBuilder::new()
            .trim(csv::Trim::All)
            .comment(Some(b'#'))
            .from_reader(input);
        let headers = reader
            .headers()
            .map_err(|e| format!("header: {e}"))?
            .clone();
        let find = |names: &[&str]| {
            headers
                .iter()
                .position(|h| names.iter().any(|n| h.eq_ignore_ascii_case(n)))
        };
        let device = find(&["device", "device_id"]);
        let sensor = find(&["sensor", "sensor_id"]);
        let value = find(&["value"]);
        // Milliseconds first: exact, where `time` may be rounded for display.
        let time = find(&["ts_ms"]).or_else(|| find(&["time", "ts", "timestamp"]));
        let (Some(device), Some(sensor), Some(value), Some(time)) = (device, sensor, value, time)
        else {
            return Err(format!(
                "the header must name device, sensor, value and a time column (ts_ms, time or \
                 ts); it is {:?}",
                headers.iter().collect::<Vec<_>>().join(",")
            ));
        };
        let mut rec = Recording {
            first_ts: u64::MAX,
            ..Default::default()
        };
        let mut record = csv::StringRecord::new();
        loop {
            match reader.read_record(&mut record) {
                Ok(true) => {}
                Ok(false) => break,
                Err(e) => return Err(e.to_string()),
            }
            let line = record.position().map_or(0, |p| p.line());
            let field = |i: usize, name: &str| {
                record
                    .get(i)
                    .ok_or_else(|| format!("line {line}: no {name} column"))
            };
            let d = field(device, "device")?;
            let d: u32 = d
                .parse()
                .map_err(|_| format!("line {line}: device {d:?} is not a device id"))?;
            let s = field(sensor, "sensor")?;
            let s: u16 = s
                .parse()
                .map_err(|_| format!("line {line}: sensor {s:?} is not a sensor id (0..=65535)"))?;
            let t = field(time, "time")?;
            let ts = parse_time(t).ok_or_else(|| {
                format!("line {line}: time {t:?} is neither milliseconds nor an RFC 3339 time")
            })?;
            if ts > LATEST_TS {
                return Err(format!(
                    "line {line}: time {t} is after the year 9999 in milliseconds: are these \
                     microseconds or nanoseconds?"
                ));
            }
            let v = field(value, "value")?;
            let value = if v.is_empty() || v.eq_ignore_ascii_case("nan") {
                f64::NAN
            } else {
                match v.parse::<f64>() {
                    Ok(x) if x.is_finite() => x,
                    _ => return Err(format!("line {line}: value {v:?} is not a number")),
                }
            };
            rec.first_ts = rec.first_ts.min(ts);
            rec.last_ts = rec.last_ts.max(ts);
            rec.readings += 1;
            rec.devices.entry(d).or_default().push(Recorded {
                sensor: s,
                ts_ms: ts,
                value,
            });
        }
        if rec.readings == 0 {
            return Err("no readings in the file".into());
        }
        for list in rec.devices.values_mut() {
            list.sort_by_key(|r| r.ts_ms);
        }
        Ok(rec)
    }

    /// The recorded device each fleet device (by position in `fleet_ids`) plays, None for
    /// devices the recording does not mention. With `map`, the recording's devices are taken in
    /// ascending id order onto the fleet's devices in order; otherwise each must be in the
    /// fleet.
    ///
    /// # Errors
    /// A recorded device that is not in the fleet, or more devices than the fleet holds.
    pub fn assign(&self, fleet_ids: &[u32], map: bool) -> Result<Vec<Option<u32>>, String> {
        let mut plays = vec![None; fleet_ids.len()];
        if map {
            if self.devices.len() > fleet_ids.len() {
                return Err(format!(
                    "the recording holds {} devices but the fleet only {}: provision more \
                     (gateway devices provision --count {})",
                    self.devices.len(),
                    fleet_ids.len(),
                    self.devices.len()
                ));
            }
            for (p, &id) in plays.iter_mut().zip(self.devices.keys()) {
                *p = Some(id);
            }
            return Ok(plays);
        }
        let position: BTreeMap<u32, usize> =
            fleet_ids.iter().enumerate().map(|(i, &d)| (d, i)).collect();
        for &device in self.devices.keys() {
            let Some(&i) = position.get(&device) else {
                return Err(format!(
                    "device {device} of the recording is not in the fleet file: replay into a \
                     fleet that holds it, or use --map-devices to play the recorded devices \
                     as the fleet's"
                ));
            };
            plays[i] = Some(device);
        }
        Ok(plays)
    }

    /// The readings of recorded device `id`, in time order.
    pub fn device(&self, id: u32) -> &[Recorded] {
        self.devices.get(&id).map_or(&[], Vec::as_slice)
    }
}

/// Milliseconds since the epoch, or an RFC 3339 time.
fn parse_time(t: &str) -> Option<u64> {
    if let Ok(ms) = t.parse::<u64>() {
        return Some(ms);
    }
    let at = humantime::parse_rfc3339_weak(t).ok()?;
    at.duration_since(std::time::UNIX_EPOCH)
        .ok()
        .map(|d| d.as_millis() as u64)
}

/// Latest a reading is ever scheduled after the start (a century).
const LONGEST: Duration = Duration::from_secs(100 * 365 * 86_400);

/// The latest timestamp accepted: the end of year 9999, in ms. Anything later is most likely
/// microseconds or nanoseconds.
const LATEST_TS: u64 = 253_402_300_799_999;

/// The slowest replay speed accepted.
pub const MIN_SPEED: f64 = 1e-3;

/// How a replay is paced, shared by its devices.
#[derive(Debug, Clone)]
pub(crate) struct Clock {
    pub start: Instant,
    /// Wall clock at `start`, ms.
    pub start_wall_ms: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    /// Recorded time per replayed time; 0 sends as fast as acks allow.
    pub speed: f64,
    pub timestamps: Timestamps,
}

impl Clock {
    /// When a reading recorded at `ts` is due.
    pub fn due(&self, ts: u64) -> Instant {
        if self.speed > 0.0 {
            let ms = ts.saturating_sub(self.first_ts) as f64 / self.speed;
            // A slow speed over a long recording can reach millions of years: cap at a century
            // rather than panic.
            let after = Duration::try_from_secs_f64(ms / 1000.0).unwrap_or(LONGEST);
            self.start
                .checked_add(after.min(LONGEST))
                .unwrap_or(self.start)
        } else {
            self.start
        }
    }

    /// The timestamp sent for a reading recorded at `ts`.
    pub fn stamp(&self, ts: u64) -> u64 {
        match self.timestamps {
            Timestamps::Keep => ts,
            Timestamps::Shift if self.speed > 0.0 => self
                .start_wall_ms
                .saturating_add((ts.saturating_sub(self.first_ts) as f64 / self.speed) as u64),
            Timestamps::Shift => self
                .start_wall_ms
                .saturating_sub(self.last_ts.saturating_sub(ts)),
        }
    }
}

/// One device's recorded readings (shared with the whole recording, not copied) and how far
/// it has sent them.
#[derive(Debug)]
pub(crate) struct Queue {
    pub recording: Arc<Recording>,
    /// The recorded device it plays (None: a fleet device the recording does not mention).
    pub plays: Option<u32>,
    pub next: usize,
    pub clock: Arc<Clock>,
}

impl Queue {
    /// The next reading to send.
    pub fn peek(&self) -> Option<Recorded> {
        let id = self.plays?;
        self.recording.device(id).get(self.next).copied()
    }

    /// When the next reading is due; None when all are sent.
    pub fn next_due(&self) -> Option<Instant> {
        self.peek().map(|r| self.clock.due(r.ts_ms))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gateway_export_and_the_readings_log_both_read() -> Result<(), String> {
        let export = "device,sensor,time,ts_ms,value,seq,idx\n\
                      7,1,2025-11-24T16:00:00.500Z,1764000000500,21.5,3,0\n\
                      7,2,2025-11-24T16:00:00.000Z,1764000000000,NaN,3,1\n\
                      9,1,2025-11-24T16:00:01.000Z,1764000001000,-3,1,0\n";
        let r = Recording::parse(export.as_bytes())?;
        assert_eq!(r.readings, 3);
        assert_eq!(
            (r.first_ts, r.last_ts),
            (1_764_000_000_000, 1_764_000_001_000)
        );
        let seven = r.device(7);
        // Sorted by time within the device.
        assert_eq!(seven[0].sensor, 2);
        assert!(seven[0].value.is_nan());
        assert_eq!(
            seven[1],
            Recorded {
                sensor: 1,
                ts_ms: 1_764_000_000_500,
                value: 21.5
            }
        );
        let log = "device,seq,idx,sensor,ts_ms,value,acked\n4,0,0,3,1000,1013.25,true\n";
        let r = Recording::parse(log.as_bytes())?;
        assert_eq!(r.device(4)[0].value, 1013.25);
        // RFC 3339 only, with spaces around fields, empty value = missing.
        let plain = "Device, Sensor, Time, Value\n 5 , 1 , 2026-01-01T00:00:00Z , \n";
        let r = Recording::parse(plain.as_bytes())?;
        assert_eq!(r.device(5)[0].ts_ms, 1_767_225_600_000);
        assert!(r.device(5)[0].value.is_nan());
        Ok(())
    }

    #[test]
    fn bad_lines_are_named() {
        let cases = [
            (
                "device,sensor,value\n1,1,1\n",
                "must name device, sensor, value and a time",
            ),
            ("device,sensor,ts_ms,value\n", "no readings"),
            (
                "device,sensor,ts_ms,value\n1,1,5,1\nx,1,5,1\n",
                "line 3: device \"x\"",
            ),
            (
                "device,sensor,ts_ms,value\n1,70000,5,1\n",
                "line 2: sensor \"70000\"",
            ),
            (
                "device,sensor,ts_ms,value\n1,1,yesterday,1\n",
                "line 2: time \"yesterday\"",
            ),
            (
                "device,sensor,ts_ms,value\n1,1,5,hot\n",
                "line 2: value \"hot\"",
            ),
            (
                "device,sensor,ts_ms,value\n1,1,5,inf\n",
                "line 2: value \"inf\"",
            ),
            (
                "device,sensor,ts_ms,value\n1,1,5\n",
                "found record with 3 fields",
            ),
            (
                "device,sensor,ts_ms,value\n1,1,1764000000000000,1\n",
                "line 2: time 1764000000000000 is after the year 9999",
            ),
        ];
        for (text, want) in cases {
            match Recording::parse(text.as_bytes()) {
                Ok(r) => panic!("accepted {text:?}: {r:?}"),
                Err(e) => assert!(e.contains(want), "{text:?}: got {e:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn devices_are_assigned_by_id_or_mapped_in_order() -> Result<(), String> {
        let text = "device,sensor,ts_ms,value\n30,1,5,1\n10,1,6,2\n";
        let r = Recording::parse(text.as_bytes())?;
        assert_eq!(r.assign(&[10, 20, 30], false)?, [Some(10), None, Some(30)]);
        assert_eq!(r.device(30)[0].value, 1.0);
        assert!(r.device(20).is_empty());
        let err = r.assign(&[10, 20], false).err().unwrap_or_default();
        assert!(
            err.contains("device 30 of the recording is not in the fleet"),
            "{err}"
        );
        assert_eq!(r.assign(&[1, 2, 3], true)?, [Some(10), Some(30), None]);
        let err = r.assign(&[1], true).err().unwrap_or_default();
        assert!(
            err.contains("holds 2 devices but the fleet only 1"),
            "{err}"
        );
        Ok(())
    }

    #[test]
    fn the_clock_paces_and_stamps() {
        let start = Instant::now();
        let mut c = Clock {
            start,
            start_wall_ms: 1_000_000,
            first_ts: 5_000,
            last_ts: 65_000,
            speed: 10.0,
            timestamps: Timestamps::Shift,
        };
        assert_eq!(c.due(5_000), start);
        assert_eq!(c.due(65_000), start + Duration::from_secs(6));
        assert_eq!(c.stamp(65_000), 1_006_000);
        // Far beyond any checked speed: saturates, no panic.
        c.speed = 1e-300;
        assert!(c.due(65_000) > start + Duration::from_secs(86_400 * 365));
        assert!(c.stamp(65_000) >= 1_000_000);
        c.speed = 0.0;
        assert_eq!(c.due(65_000), start);
        assert_eq!(c.stamp(65_000), 1_000_000);
        assert_eq!(c.stamp(5_000), 940_000);
        c.timestamps = Timestamps::Keep;
        assert_eq!(c.stamp(5_000), 5_000);
    }
}
