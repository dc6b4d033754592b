//! Windowed aggregation of readings. [`window`] is the pure state machine (no tokio, no I/O,
//! time passed in); the writer feeds it and stores what it emits (see `store::writer`), and
//! this module renders aggregates for the outbox.

pub mod window;

use serde::Serialize;

use crate::config::{AggregateConfig, LateReadings};
use window::{Aggregate, AggregatorConfig, LatePolicy};

/// The aggregator's settings from the gateway's.
pub fn aggregator_config(cfg: &AggregateConfig) -> AggregatorConfig {
    AggregatorConfig {
        windows_ms: cfg.windows.iter().map(|w| w.as_millis() as u64).collect(),
        lateness_ms: cfg.lateness.as_millis() as u64,
        late: match cfg.late {
            LateReadings::Revise => LatePolicy::Revise,
            LateReadings::Drop => LatePolicy::Drop,
        },
        idle_ms: cfg.idle.as_millis() as u64,
        keep_closed_ms: cfg.keep_closed.as_millis() as u64,
    }
}

/// An aggregate as published (without `seq` and `gateway`, which the forwarder adds).
#[derive(Debug, Serialize)]
struct Payload {
    device: u32,
    sensor: u16,
    window_start_ms: i64,
    window_ms: u64,
    revision: u32,
    count: u64,
    min: f64,
    max: f64,
    mean: f64,
    stddev: f64,
    last: f64,
    last_ts_ms: i64,
}

/// The outbox topic (relative to `<prefix>/v1/<gateway-id>/`) and JSON payload of `a`.
pub fn outbox_message(a: &Aggregate) -> (String, String) {
    let p = Payload {
        device: a.device,
        sensor: a.sensor,
        window_start_ms: a.start_ms,
        window_ms: a.window_ms,
        revision: a.revision,
        count: a.stats.count,
        min: a.stats.min,
        max: a.stats.max,
        mean: a.stats.mean,
        stddev: a.stats.stddev(),
        last: a.stats.last,
        last_ts_ms: a.stats.last_key.0,
    };
    // Serialising plain numbers cannot fail; infinities become null.
    let json = serde_json::to_string(&p).unwrap_or_else(|_| "{}".into());
    (format!("agg/{}", a.device), json)
}
