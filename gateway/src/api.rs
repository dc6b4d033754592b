//! Query endpoints of the operator API: stored readings and aggregate windows as JSON, NDJSON
//! or CSV, optionally downsampled, streamed.
//!
//! - `GET /api/v1/readings?device=&sensor=&from=&to=|since=&step=&limit=&format=`
//! - `GET /api/v1/aggregates?window=&device=&sensor=&from=&to=|since=&step=&limit=&format=`
//! - `GET /api/v1/openapi.json`: the OpenAPI description of the whole API (no token).
//!
//! A query runs on its own task that encodes rows into 64 KiB chunks and hands them to the
//! response through a channel of four chunks: a slow client holds the query back instead of
//! letting the result pile up, and a client that goes away ends the query. A client that takes
//! nothing for `admin.stall_timeout` (30 s) is dropped, and at most [`MAX_STREAMS`] queries stream at once (503 past
//! that), so readers never hold every database connection. A response holds at
//! most `limit` rows (default and ceiling `admin.max_points`); a database error after the first
//! chunk aborts the response, so a client never mistakes a cut result for a whole one.

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use futures_util::{StreamExt, TryStreamExt};
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::admin::{AdminState, error};
use crate::rows::{Downsampler, Encoder, Format, Row, StatsRow};
use crate::store::query::{AggregatesFilter, ReadingRow, ReadingsFilter};
use crate::store::{Store, now_ms};

/// The OpenAPI description served at `/api/v1/openapi.json`.
pub const OPENAPI: &str = include_str!("../openapi.json");

/// Encoded bytes handed to the response at a time.
const CHUNK: usize = 64 * 1024;
/// A client that takes no chunk for this long is dropped: a stalled reader must not hold a
/// database connection and its read snapshot (which holds WAL checkpoints back) for ever.
/// Queries streaming at once (of the six database connections; the writer holds one).
pub const MAX_STREAMS: usize = 3;

/// Query parameters of `/api/v1/readings` and `/api/v1/aggregates`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeriesParams {
    /// Only this device.
    pub device: Option<u32>,
    /// Only this sensor.
    pub sensor: Option<u16>,
    /// At or after this time: ms since the epoch or RFC 3339.
    pub from: Option<String>,
    /// Before this time: ms since the epoch or RFC 3339.
    pub to: Option<String>,
    /// The last period before now, e.g. `15m` (instead of `from`/`to`).
    pub since: Option<String>,
    /// Downsample into buckets of this length, e.g. `1m`.
    pub step: Option<String>,
    /// Aggregates only: the window tier, e.g. `10s` (default: the shortest configured).
    pub window: Option<String>,
    /// At most this many rows (default and ceiling: `admin.max_points`).
    pub limit: Option<u64>,
    /// `json` (default), `ndjson` or `csv`.
    pub format: Option<String>,
}

/// Validated parameters.
#[derive(Debug, Clone, PartialEq)]
struct Series {
    device: Option<u32>,
    sensor: Option<u16>,
    from_ms: Option<i64>,
    to_ms: Option<i64>,
    step_ms: Option<u64>,
    window_ms: Option<u64>,
    limit: u64,
    format: Format,
}

fn parse_time(name: &str, s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    let t = humantime::parse_rfc3339_weak(s).map_err(|e| {
        format!(
            "{name}={s:?}: {e} (give ms since the epoch or RFC 3339, e.g. 2026-11-25T10:00:00Z)"
        )
    })?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}

fn parse_duration(name: &str, s: &str) -> Result<u64, String> {
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("{name}={s:?}: {e} (e.g. 10s, 5m, 1h)"))?;
    let ms = u64::try_from(d.as_millis()).unwrap_or(u64::MAX);
    if ms == 0 {
        return Err(format!("{name} must be at least 1ms"));
    }
    Ok(ms)
}

fn validate(p: SeriesParams, max_points: u64, now: i64) -> Result<Series, String> {
    let format = match p.format.as_deref() {
        None => Format::Json,
        Some(f) => {
            Format::parse(f).ok_or_else(|| format!("format={f:?}: expected json, ndjson or csv"))?
        }
    };
    let (from_ms, to_ms) = match (&p.since, &p.from, &p.to) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => {
            return Err("give either since or from/to, not both".into());
        }
        (Some(s), None, None) => {
            let d = parse_duration("since", s)?;
            (
                Some(now.saturating_sub(i64::try_from(d).unwrap_or(i64::MAX))),
                None,
            )
        }
        (None, from, to) => (
            from.as_deref().map(|s| parse_time("from", s)).transpose()?,
            to.as_deref().map(|s| parse_time("to", s)).transpose()?,
        ),
    };
    if let (Some(f), Some(t)) = (from_ms, to_ms)
        && f >= t
    {
        return Err("from must be before to".into());
    }
    let limit = p.limit.unwrap_or(max_points);
    if limit > max_points {
        return Err(format!(
            "limit={limit} is above the most points per response ({max_points}, admin.max_points): \
             ask for a shorter range or a larger step"
        ));
    }
    Ok(Series {
        device: p.device,
        sensor: p.sensor,
        from_ms,
        to_ms,
        step_ms: p
            .step
            .as_deref()
            .map(|s| parse_duration("step", s))
            .transpose()?,
        window_ms: p
            .window
            .as_deref()
            .map(|s| parse_duration("window", s))
            .transpose()?,
        limit,
        format,
    })
}

/// The parameters, or what is wrong with them (answered with 400).
fn series(
    state: &AdminState,
    q: Result<Query<SeriesParams>, QueryRejection>,
) -> Result<Series, String> {
    let Query(p) = q.map_err(|e| e.body_text())?;
    validate(
        p,
        state.max_points.load(std::sync::atomic::Ordering::Relaxed),
        now_ms(),
    )
}

/// Rows encoded so far, flushed in chunks to the response. `false` once the client is gone.
struct Sink {
    enc: Encoder,
    /// How long a client may take nothing before the response is dropped.
    stall: std::time::Duration,
    /// Set when the response must end as an error (no last chunk): a stalled client or a
    /// failed query. Read by the body once the channel is drained.
    cut: Arc<std::sync::atomic::AtomicBool>,
    tx: mpsc::Sender<Result<Bytes, std::io::Error>>,
    /// Held while the query runs: one of [`MAX_STREAMS`].
    _slot: tokio::sync::OwnedSemaphorePermit,
}

impl Sink {
    async fn row(&mut self, r: &impl Row) -> bool {
        self.enc.row(r);
        if self.enc.buf.len() >= CHUNK {
            return self.flush().await;
        }
        true
    }

    /// Whether the client is still there (checked between rows that produce no output, e.g.
    /// while downsampling).
    fn open(&self) -> bool {
        !self.tx.is_closed()
    }

    async fn flush(&mut self) -> bool {
        let chunk = Bytes::from(std::mem::replace(
            &mut self.enc.buf,
            Vec::with_capacity(CHUNK + 1024),
        ));
        match tokio::time::timeout(self.stall, self.tx.send(Ok(chunk))).await {
            Ok(sent) => sent.is_ok(),
            Err(_) => {
                tracing::warn!(
                    stall = ?self.stall,
                    "query client took nothing for admin.stall_timeout; response dropped"
                );
                self.cut.store(true, std::sync::atomic::Ordering::Release);
                false
            }
        }
    }

    async fn finish(mut self) {
        self.enc.finish();
        self.flush().await;
    }

    async fn fail(self, e: impl std::fmt::Display) {
        tracing::warn!(error = %e, "query failed while streaming; response aborted");
        self.cut.store(true, std::sync::atomic::Ordering::Release);
        let _ = tokio::time::timeout(
            self.stall,
            self.tx.send(Err(std::io::Error::other(e.to_string()))),
        )
        .await;
    }
}

/// A streamed response whose rows `produce` writes into its sink; 503 when [`MAX_STREAMS`]
/// queries already stream.
fn streamed<R: Row, F, Fut>(state: &AdminState, format: Format, produce: F) -> Response
where
    F: FnOnce(Sink) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let Ok(slot) = state.query_slots.clone().try_acquire_owned() else {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("{MAX_STREAMS} queries are streaming already; try again when one ends"),
        );
    };
    let (tx, rx) = mpsc::channel(4);
    let cut = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = Sink {
        enc: Encoder::new::<R>(format),
        stall: state.stall_timeout,
        cut: cut.clone(),
        tx,
        _slot: slot,
    };
    tokio::spawn(produce(sink));
    // A response that was cut ends with an error, so the connection is closed without the
    // last chunk: a client can never take a part for the whole.
    let body = futures_util::stream::unfold(Some(rx), move |rx| {
        let cut = cut.clone();
        async move {
            let mut rx = rx?;
            match rx.recv().await {
                Some(chunk) => Some((chunk, Some(rx))),
                None if cut.load(std::sync::atomic::Ordering::Acquire) => Some((
                    Err(std::io::Error::other("response cut: query dropped")),
                    None,
                )),
                None => None,
            }
        }
    });
    (
        [(header::CONTENT_TYPE, format.content_type())],
        Body::from_stream(body),
    )
        .into_response()
}

/// `GET /api/v1/readings`
pub async fn readings(
    State(state): State<Arc<AdminState>>,
    q: Result<Query<SeriesParams>, QueryRejection>,
) -> Response {
    let s = match series(&state, q) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    if s.window_ms.is_some() {
        return error(
            StatusCode::BAD_REQUEST,
            "window applies to /api/v1/aggregates; use step to downsample readings",
        );
    }
    let filter = ReadingsFilter {
        device: s.device,
        sensor: s.sensor,
        from_ms: s.from_ms,
        to_ms: s.to_ms,
        limit: None,
    };
    let store = state.store.clone();
    match s.step_ms {
        None => streamed::<ReadingRow, _, _>(&state, s.format, move |sink| {
            raw_readings(store, filter, s.limit, sink)
        }),
        Some(step) => streamed::<StatsRow, _, _>(&state, s.format, move |sink| {
            downsampled_readings(store, filter, step, s.limit, sink)
        }),
    }
}

async fn raw_readings(store: Store, filter: ReadingsFilter, limit: u64, mut sink: Sink) {
    let mut rows = std::pin::pin!(store.readings(&filter).take(limit as usize));
    loop {
        match rows.try_next().await {
            Ok(Some(r)) => {
                if !sink.row(&r).await {
                    return;
                }
            }
            Ok(None) => return sink.finish().await,
            Err(e) => return sink.fail(e).await,
        }
    }
}

async fn downsampled_readings(
    store: Store,
    filter: ReadingsFilter,
    step: u64,
    limit: u64,
    mut sink: Sink,
) {
    let mut rows = std::pin::pin!(store.readings(&filter));
    let mut ds = Downsampler::new(step);
    let mut out = Vec::new();
    loop {
        if !sink.open() {
            return;
        }
        let next = rows.try_next().await;
        match &next {
            Ok(Some(r)) => ds.push_reading(r, &mut out),
            Ok(None) => ds.flush(&mut out),
            Err(e) => return sink.fail(e).await,
        }
        for b in out.drain(..) {
            if sink.enc.rows() >= limit {
                return sink.finish().await;
            }
            if !sink.row(&b).await {
                return;
            }
        }
        if matches!(next, Ok(None)) {
            return sink.finish().await;
        }
    }
}

/// `GET /api/v1/aggregates`
pub async fn aggregates(
    State(state): State<Arc<AdminState>>,
    q: Result<Query<SeriesParams>, QueryRejection>,
) -> Response {
    let s = match series(&state, q) {
        Ok(s) => s,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let Some(window_ms) = s.window_ms.or(state.aggregate_windows.first().copied()) else {
        return error(StatusCode::BAD_REQUEST, "give window=, e.g. window=10s");
    };
    if let Some(step) = s.step_ms
        && step % window_ms != 0
    {
        return error(
            StatusCode::BAD_REQUEST,
            format!("step={step}ms is not a multiple of the window ({window_ms}ms)"),
        );
    }
    let filter = AggregatesFilter {
        window_ms,
        device: s.device,
        sensor: s.sensor,
        from_ms: s.from_ms,
        to_ms: s.to_ms,
    };
    let store = state.store.clone();
    streamed::<StatsRow, _, _>(&state, s.format, move |sink| {
        stored_aggregates(store, filter, s.step_ms, s.limit, sink)
    })
}

async fn stored_aggregates(
    store: Store,
    filter: AggregatesFilter,
    step: Option<u64>,
    limit: u64,
    mut sink: Sink,
) {
    let mut rows = std::pin::pin!(store.aggregates(&filter));
    let mut ds = step.map(Downsampler::new);
    let mut out = Vec::new();
    loop {
        if !sink.open() {
            return;
        }
        let next = rows.try_next().await;
        match (&next, &mut ds) {
            (Err(e), _) => return sink.fail(e).await,
            (Ok(Some(a)), Some(ds)) => ds.push(a.device, a.sensor, a.start_ms, &a.stats, &mut out),
            (Ok(Some(a)), None) => {
                let mut row = StatsRow::new(a.device, a.sensor, a.window_ms, a.start_ms, &a.stats);
                row.revision = Some(a.revision);
                out.push(row);
            }
            (Ok(None), Some(ds)) => ds.flush(&mut out),
            (Ok(None), None) => {}
        }
        for b in out.drain(..) {
            if sink.enc.rows() >= limit {
                return sink.finish().await;
            }
            if !sink.row(&b).await {
                return;
            }
        }
        if matches!(next, Ok(None)) {
            return sink.finish().await;
        }
    }
}

/// `GET /api/v1/openapi.json`
pub async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(q: &str) -> Result<Series, String> {
        let p: SeriesParams = serde_urlencoded_like(q)?;
        validate(p, 1_000, 10_000_000)
    }

    /// Parses a query string the way axum's `Query` does (through serde).
    fn serde_urlencoded_like(q: &str) -> Result<SeriesParams, String> {
        let uri: axum::http::Uri = format!("/x?{q}").parse().map_err(|e| format!("{e}"))?;
        Query::<SeriesParams>::try_from_uri(&uri)
            .map(|Query(p)| p)
            .map_err(|e| e.body_text())
    }

    #[test]
    fn parameters_are_checked_with_clear_errors() {
        let s = params("device=7&from=2026-11-25T10:00:00Z&to=1795604400001&step=1m&format=csv")
            .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(s.device, Some(7));
        assert_eq!(s.from_ms, Some(1_795_600_800_000));
        assert_eq!(s.to_ms, Some(1_795_604_400_001));
        assert_eq!(s.step_ms, Some(60_000));
        assert_eq!(s.format, Format::Csv);
        assert_eq!(s.limit, 1_000);
        let s = params("since=10s").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((s.from_ms, s.to_ms), (Some(10_000_000 - 10_000), None));
        for (q, needle) in [
            ("format=xml", "expected json, ndjson or csv"),
            ("limit=1001", "most points per response"),
            ("from=yesterday", "RFC 3339"),
            ("from=20&to=10", "from must be before to"),
            ("since=1h&from=5", "either since or from/to"),
            ("step=0s", "at least 1ms"),
            ("step=fast", "e.g. 10s"),
            ("devices=3", "unknown field"),
            ("device=-1", "device"),
        ] {
            match params(q) {
                Ok(s) => panic!("{q} accepted: {s:?}"),
                Err(e) => assert!(e.contains(needle), "{q}: {e}"),
            }
        }
    }

    #[test]
    fn the_openapi_document_lists_every_route_and_parameter() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI).unwrap_or_default();
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..2]), Some("3."));
        let paths = doc["paths"].as_object().cloned().unwrap_or_default();
        // Every route the router declares is described, and nothing else.
        let mut routed = Vec::new();
        {
            let mut rest = include_str!("admin.rs");
            while let Some(i) = rest.find(".route(") {
                rest = rest[i + 7..].trim_start();
                if let Some(p) = rest.strip_prefix('"').and_then(|r| r.split('"').next()) {
                    routed.push(p.to_owned());
                }
            }
        }
        routed.sort();
        routed.dedup();
        let mut described: Vec<String> = paths.keys().cloned().collect();
        described.sort();
        assert_eq!(routed, described);
        // The series endpoints document exactly the parameters the server takes.
        let fields = [
            "device", "sensor", "from", "to", "since", "step", "window", "limit", "format",
        ];
        for (path, skip) in [("/api/v1/readings", "window"), ("/api/v1/aggregates", "")] {
            let mut names: Vec<&str> = doc["paths"][path]["get"]["parameters"]
                .as_array()
                .map(|ps| ps.iter().filter_map(|p| p["name"].as_str()).collect())
                .unwrap_or_default();
            names.sort();
            let mut expected: Vec<&str> = fields.iter().copied().filter(|f| *f != skip).collect();
            expected.sort();
            assert_eq!(names, expected, "{path}");
            for n in names {
                let q = format!("{n}=1");
                // Each documented name is one the server knows (not an unknown field).
                if let Err(e) = serde_urlencoded_like(&q) {
                    assert!(!e.contains("unknown field"), "{path} {n}: {e}");
                }
            }
        }
    }
}
