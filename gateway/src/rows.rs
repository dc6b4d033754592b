//! Rows of query results and their encodings (CSV, JSON, NDJSON), shared by `gateway query` and
//! the HTTP API, and the downsampling of a time-ordered series into fixed buckets (pure).
//!
//! Encoders write into a byte buffer the caller drains when it likes (the HTTP API sends it in
//! chunks, the CLI writes it to stdout), so a result of any size is never held whole.

use std::collections::BTreeMap;
use std::io::Write;

use serde::Serialize;

use crate::aggregate::window::{Stats, aggregated, window_start};
use crate::store::query::ReadingRow;

/// How rows are encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON array of objects.
    Json,
    /// One JSON object per line.
    Ndjson,
}

impl Format {
    /// `csv`, `json` or `ndjson`.
    pub fn parse(s: &str) -> Option<Format> {
        match s {
            "csv" => Some(Format::Csv),
            "json" => Some(Format::Json),
            "ndjson" => Some(Format::Ndjson),
            _ => None,
        }
    }

    /// The HTTP content type.
    pub fn content_type(self) -> &'static str {
        match self {
            Format::Csv => "text/csv; charset=utf-8",
            Format::Json => "application/json",
            Format::Ndjson => "application/x-ndjson",
        }
    }
}

/// A row that can be encoded.
pub trait Row {
    /// The CSV header line, without the newline.
    const CSV_HEADER: &'static str;
    /// Appends the row as one CSV line, without the newline.
    fn csv(&self, out: &mut Vec<u8>);
    /// Appends the row as one JSON object.
    fn json(&self, out: &mut Vec<u8>);
}

/// `NaN` for a missing value (what devices send when a sensor fails).
fn value_text(v: Option<f64>) -> String {
    v.map_or_else(|| "NaN".into(), |v| v.to_string())
}

fn json_into(out: &mut Vec<u8>, v: &impl Serialize) {
    // Serialising these plain structs into a Vec cannot fail.
    if serde_json::to_writer(&mut *out, v).is_err() {
        out.extend_from_slice(b"null");
    }
}

impl Row for ReadingRow {
    const CSV_HEADER: &'static str = "device,sensor,time,ts_ms,value,seq,idx";

    fn csv(&self, out: &mut Vec<u8>) {
        let _ = write!(
            out,
            "{},{},{},{},{},{},{}",
            self.device,
            self.sensor,
            crate::cli::format_ms(self.ts_ms),
            self.ts_ms,
            value_text(self.value),
            self.seq,
            self.idx
        );
    }

    fn json(&self, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct J {
            device: u32,
            sensor: u16,
            time: String,
            ts_ms: i64,
            value: Option<f64>,
            seq: u64,
            idx: u32,
        }
        json_into(
            out,
            &J {
                device: self.device,
                sensor: self.sensor,
                time: crate::cli::format_ms(self.ts_ms),
                ts_ms: self.ts_ms,
                value: self.value,
                seq: self.seq,
                idx: self.idx,
            },
        );
    }
}

/// One stored aggregate window, or one downsampling bucket (then `window_ms` is the step and
/// `revision` is absent).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StatsRow {
    /// Device.
    pub device: u32,
    /// Sensor.
    pub sensor: u16,
    /// Window (or step) length, ms.
    pub window_ms: u64,
    /// Start of the window, ms since the epoch (device clock).
    pub start_ms: i64,
    /// Readings in the window.
    pub count: u64,
    /// Smallest value.
    pub min: f64,
    /// Largest value.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub stddev: f64,
    /// Value of the latest reading.
    pub last: f64,
    /// Revision of a stored window (0, then one more per correction by late readings).
    pub revision: Option<u32>,
}

impl StatsRow {
    /// The row of `stats` for a window.
    pub fn new(device: u32, sensor: u16, window_ms: u64, start_ms: i64, stats: &Stats) -> Self {
        Self {
            device,
            sensor,
            window_ms,
            start_ms,
            count: stats.count,
            min: stats.min,
            max: stats.max,
            mean: stats.mean,
            stddev: stats.stddev(),
            last: stats.last,
            revision: None,
        }
    }
}

impl Row for StatsRow {
    const CSV_HEADER: &'static str =
        "device,sensor,window_ms,time,start_ms,count,min,max,mean,stddev,last,revision";

    fn csv(&self, out: &mut Vec<u8>) {
        let _ = write!(
            out,
            "{},{},{},{},{},{},{},{},{},{},{},{}",
            self.device,
            self.sensor,
            self.window_ms,
            crate::cli::format_ms(self.start_ms),
            self.start_ms,
            self.count,
            self.min,
            self.max,
            self.mean,
            self.stddev,
            self.last,
            self.revision.map(|r| r.to_string()).unwrap_or_default()
        );
    }

    fn json(&self, out: &mut Vec<u8>) {
        #[derive(Serialize)]
        struct Rest {
            start_ms: i64,
            count: u64,
            min: f64,
            max: f64,
            mean: f64,
            stddev: f64,
            last: f64,
            #[serde(skip_serializing_if = "Option::is_none")]
            revision: Option<u32>,
        }
        #[derive(Serialize)]
        struct Out {
            device: u32,
            sensor: u16,
            window_ms: u64,
            time: String,
            #[serde(flatten)]
            rest: Rest,
        }
        json_into(
            out,
            &Out {
                device: self.device,
                sensor: self.sensor,
                window_ms: self.window_ms,
                time: crate::cli::format_ms(self.start_ms),
                rest: Rest {
                    start_ms: self.start_ms,
                    count: self.count,
                    min: self.min,
                    max: self.max,
                    mean: self.mean,
                    stddev: self.stddev,
                    last: self.last,
                    revision: self.revision,
                },
            },
        );
    }
}

/// Encodes rows of one kind into a buffer: header, rows, trailer.
#[derive(Debug)]
pub struct Encoder {
    format: Format,
    rows: u64,
    /// Encoded bytes not yet taken.
    pub buf: Vec<u8>,
}

impl Encoder {
    /// An encoder that has written the opening (CSV header, `[`).
    pub fn new<R: Row>(format: Format) -> Self {
        let mut buf = Vec::with_capacity(64 * 1024);
        match format {
            Format::Csv => {
                buf.extend_from_slice(R::CSV_HEADER.as_bytes());
                buf.push(b'\n');
            }
            Format::Json => buf.push(b'['),
            Format::Ndjson => {}
        }
        Self {
            format,
            rows: 0,
            buf,
        }
    }

    /// Appends one row.
    pub fn row(&mut self, r: &impl Row) {
        match self.format {
            Format::Csv => {
                r.csv(&mut self.buf);
                self.buf.push(b'\n');
            }
            Format::Json => {
                if self.rows > 0 {
                    self.buf.push(b',');
                }
                self.buf.push(b'\n');
                r.json(&mut self.buf);
            }
            Format::Ndjson => {
                r.json(&mut self.buf);
                self.buf.push(b'\n');
            }
        }
        self.rows += 1;
    }

    /// Rows appended so far.
    pub fn rows(&self) -> u64 {
        self.rows
    }

    /// Writes the closing (`]` for JSON).
    pub fn finish(&mut self) {
        if self.format == Format::Json {
            self.buf.extend_from_slice(b"\n]\n");
        }
    }
}

/// Folds a series ordered by device then time into buckets of `step` ms per device and sensor,
/// aligned to multiples of `step` since the epoch. Buckets come out ordered by device, bucket
/// start, sensor; memory holds one bucket per sensor of the current device.
#[derive(Debug)]
pub struct Downsampler {
    step: u64,
    current: Option<(u32, i64)>,
    open: BTreeMap<u16, Stats>,
}

impl Downsampler {
    /// Buckets of `step` ms (at least 1).
    pub fn new(step: u64) -> Self {
        Self {
            step: step.max(1),
            current: None,
            open: BTreeMap::new(),
        }
    }

    /// Takes the statistics of a reading or a window that starts at `ts`; closed buckets go to
    /// `out`.
    pub fn push(
        &mut self,
        device: u32,
        sensor: u16,
        ts: i64,
        stats: &Stats,
        out: &mut Vec<StatsRow>,
    ) {
        let start = window_start(ts, self.step);
        if self.current != Some((device, start)) {
            self.flush(out);
            self.current = Some((device, start));
        }
        self.open
            .entry(sensor)
            .and_modify(|s| s.merge(stats))
            .or_insert(*stats);
    }

    /// Takes one reading; readings without an aggregatable value (NaN, ±inf) are skipped.
    pub fn push_reading(&mut self, r: &ReadingRow, out: &mut Vec<StatsRow>) {
        if let Some(v) = r.value.filter(|v| aggregated(*v)) {
            let stats = Stats::new((r.ts_ms, r.seq, r.idx as u16), v);
            self.push(r.device, r.sensor, r.ts_ms, &stats, out);
        }
    }

    /// Closes the open buckets.
    pub fn flush(&mut self, out: &mut Vec<StatsRow>) {
        if let Some((device, start)) = self.current.take() {
            for (sensor, stats) in std::mem::take(&mut self.open) {
                out.push(StatsRow::new(device, sensor, self.step, start, &stats));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reading(device: u32, sensor: u16, ts_ms: i64, value: f64) -> ReadingRow {
        ReadingRow {
            device,
            sensor,
            ts_ms,
            value: Some(value),
            seq: ts_ms as u64,
            idx: 0,
        }
    }

    #[test]
    fn downsampling_matches_a_naive_grouping() {
        // Two devices, three sensors, uneven timestamps, a NaN; compare with group-by.
        let mut rows = Vec::new();
        for device in [3u32, 7] {
            for i in 0..500i64 {
                let ts = 1_000_000 + i * 37 + (i % 5) * 3;
                let sensor = (i % 3) as u16;
                let v = ((i * 7919) % 101) as f64 - 50.0;
                rows.push(reading(device, sensor, ts, v));
            }
        }
        rows[10].value = None;
        let step = 1_000u64;
        let mut ds = Downsampler::new(step);
        let mut out = Vec::new();
        for r in &rows {
            ds.push_reading(r, &mut out);
        }
        ds.flush(&mut out);

        let mut naive: BTreeMap<(u32, i64, u16), Vec<f64>> = BTreeMap::new();
        for r in &rows {
            if let Some(v) = r.value {
                naive
                    .entry((r.device, window_start(r.ts_ms, step), r.sensor))
                    .or_default()
                    .push(v);
            }
        }
        assert_eq!(out.len(), naive.len());
        for (row, ((device, start, sensor), vs)) in out.iter().zip(&naive) {
            assert_eq!(
                (row.device, row.start_ms, row.sensor),
                (*device, *start, *sensor)
            );
            let n = vs.len() as f64;
            let mean = vs.iter().sum::<f64>() / n;
            let var = vs.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            assert_eq!(row.count, vs.len() as u64);
            assert_eq!(row.min, vs.iter().cloned().fold(f64::INFINITY, f64::min));
            assert_eq!(
                row.max,
                vs.iter().cloned().fold(f64::NEG_INFINITY, f64::max)
            );
            assert!((row.mean - mean).abs() < 1e-9, "{row:?} mean {mean}");
            assert!(
                (row.stddev - var.sqrt()).abs() < 1e-9,
                "{row:?} sd {}",
                var.sqrt()
            );
            assert_eq!(row.last, *vs.last().unwrap_or(&f64::NAN));
            assert_eq!(row.window_ms, step);
        }
    }

    #[test]
    fn merged_windows_equal_one_window_over_all_readings() {
        let values: Vec<f64> = (0..97)
            .map(|i| ((i * 31) % 17) as f64 * 0.5 - 3.0)
            .collect();
        let whole = values.iter().enumerate().skip(1).fold(
            Stats::new((0, 0, 0), values[0]),
            |mut s, (i, v)| {
                s.merge(&Stats::new((i as i64, 0, 0), *v));
                s
            },
        );
        for split in [1usize, 13, 50, 96] {
            let part = |r: std::ops::Range<usize>| {
                r.clone().skip(1).fold(
                    Stats::new((r.start as i64, 0, 0), values[r.start]),
                    |mut s, i| {
                        s.merge(&Stats::new((i as i64, 0, 0), values[i]));
                        s
                    },
                )
            };
            let mut a = part(0..split);
            a.merge(&part(split..values.len()));
            assert_eq!(a.count, whole.count);
            assert!((a.mean - whole.mean).abs() < 1e-12);
            assert!((a.stddev() - whole.stddev()).abs() < 1e-12);
            assert_eq!((a.min, a.max, a.last), (whole.min, whole.max, whole.last));
        }
    }

    #[test]
    fn encodings_have_one_header_and_valid_json() {
        let rows = [
            reading(1, 2, 1_764_000_000_000, 1.5),
            reading(1, 3, 1_764_000_000_001, -2.0),
        ];
        let mut csv = Encoder::new::<ReadingRow>(Format::Csv);
        let mut json = Encoder::new::<ReadingRow>(Format::Json);
        let mut nd = Encoder::new::<ReadingRow>(Format::Ndjson);
        for r in &rows {
            csv.row(r);
            json.row(r);
            nd.row(r);
        }
        for e in [&mut csv, &mut json, &mut nd] {
            e.finish();
        }
        let csv = String::from_utf8(csv.buf).unwrap_or_default();
        assert_eq!(csv.lines().count(), 3);
        assert_eq!(csv.lines().next(), Some(ReadingRow::CSV_HEADER));
        assert!(csv.contains("1,2,2025-11-24T16:00:00.000Z,1764000000000,1.5,1764000000000,0"));
        let parsed: Vec<serde_json::Value> = serde_json::from_slice(&json.buf).unwrap_or_default();
        assert_eq!(parsed.len(), 2);
        assert_eq!(parsed[1]["value"], -2.0);
        let lines: Vec<serde_json::Value> = nd
            .buf
            .split(|b| *b == b'\n')
            .filter(|l| !l.is_empty())
            .filter_map(|l| serde_json::from_slice(l).ok())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["sensor"], 2);
        // An empty result is still a valid document.
        let mut empty = Encoder::new::<StatsRow>(Format::Json);
        empty.finish();
        let parsed: Vec<serde_json::Value> =
            serde_json::from_slice(&empty.buf).unwrap_or(vec![serde_json::Value::Null]);
        assert!(parsed.is_empty());
    }
}
