//! The operator interface: a small HTTP API on loopback, guarded by a bearer token, through which
//! the CLI talks to a running gateway. `/healthz` is open; everything else needs the token.
//!
//! - `GET /healthz`: `ok` while the gateway serves; 503 with the reason while the database
//!   cannot be written.
//! - `GET /metrics`: Prometheus text format.
//! - `GET /api/v1/devices`: devices with counts and presence.
//! - `POST /api/v1/commands`: queue a command for one device or all (JSON, see [`SendCommand`]).
//! - `GET /api/v1/commands?device=ID&limit=N`: commands with status and result, newest first.
//! - `GET|PUT /api/v1/devices/{id}/config`: desired and reported configuration.
//! - `POST /api/v1/files?name=N&device=ID|all=true`: the body is a file to send to devices.
//! - `GET /api/v1/transfers?file=ID`: file transfers with their progress.
//! - `POST /api/v1/devices/{id}/revoke`: revoke a device at once (see [`Revoked`]).
//! - `POST /api/v1/devices/{id}/rotate-key`: give a device a new key over its TLS session.
//! - `GET /readyz`: readiness (see [`Readiness`]), no token.
//! - `GET /api/v1/readings`, `/api/v1/aggregates`, `/api/v1/openapi.json`: see [`crate::api`].
//!
//! `gateway/openapi.json` describes all of it; a test keeps it and the router in step.
//!
//! Emits: `warn` for rejected tokens (rate-limited by nature: each is one request).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use axum::extract::{Path, Query, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use proto::DeviceId;
use proto::control::{Command, GatewayMsg};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::control::{ControlCounters, Outbound, Registry};
use crate::events::Counters;
use crate::store::Store;
use crate::store::config::ConfigJson;

/// What the API handlers share.
pub struct AdminState {
    /// The database.
    pub store: Store,
    /// Live control sessions.
    pub sessions: Registry,
    /// Ingest and writer counters.
    pub counters: Arc<Counters>,
    /// Control counters.
    pub control: Arc<ControlCounters>,
    /// The bearer token.
    pub token: String,
    /// Where files for devices are kept.
    pub files_dir: std::path::PathBuf,
    /// Largest accepted file.
    pub max_file_size: u64,
    /// Revocations and key changes for the ingest task.
    pub device_changes: tokio::sync::mpsc::Sender<crate::ingest::DeviceChange>,
    /// Whether the control listener runs TLS (keys are only ever sent inside it).
    pub control_tls: bool,
    /// The outbox size past which the gateway reports itself not ready (90 % of its bound;
    /// None without MQTT forwarding).
    pub outbox_high_water: Option<u64>,
    /// Configured aggregate window lengths, ms, shortest first.
    pub aggregate_windows: Vec<u64>,
    /// Most rows in one query response (`admin.max_points`; a reload may change it).
    pub max_points: Arc<std::sync::atomic::AtomicU64>,
    /// How long a streamed query waits for a client that takes nothing (`admin.stall_timeout`).
    pub stall_timeout: std::time::Duration,
    /// Slots of queries streaming at once ([`crate::api::MAX_STREAMS`]).
    pub query_slots: Arc<tokio::sync::Semaphore>,
}

/// What `GET /readyz` answers (200 when `ready`, 503 otherwise).
#[derive(Debug, Serialize, Deserialize)]
pub struct Readiness {
    /// Whether the gateway accepts and keeps everything it is sent.
    pub ready: bool,
    /// `writable`, or why commits fail (nothing is acknowledged then).
    pub database: String,
    /// `connected`, `disconnected` or `disabled`; a disconnected broker alone does not make the
    /// gateway unready (the outbox keeps the aggregates), an outbox past its high-water mark
    /// does.
    pub broker: String,
    /// Rows in the outbox.
    pub outbox_rows: u64,
    /// Rows past which the gateway is not ready (90 % of `mqtt.outbox_max_rows`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub outbox_high_water: Option<u64>,
}

/// The token: the configured one, or the one in `file` (created with mode 0600 when missing).
///
/// # Errors
/// When the file cannot be read or written.
pub fn load_or_create_token(
    configured: Option<&str>,
    file: &std::path::Path,
) -> std::io::Result<String> {
    if let Some(t) = configured {
        return Ok(t.to_owned());
    }
    if let Ok(t) = std::fs::read_to_string(file) {
        let t = t.trim();
        if !t.is_empty() {
            return Ok(t.to_owned());
        }
    }
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 24];
    rand::rng().fill_bytes(&mut bytes);
    let token = hex::encode(bytes);
    if let Some(dir) = file.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(file)?;
    f.write_all(token.as_bytes())?;
    f.sync_all()?;
    Ok(token)
}

/// A command as the API takes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "kebab-case", deny_unknown_fields)]
pub enum CommandSpec {
    /// `{"type":"ping"}`
    Ping,
    /// `{"type":"set-interval","millis":500}`
    SetInterval {
        /// Milliseconds between datagrams.
        millis: u32,
    },
    /// `{"type":"reboot"}`
    Reboot,
    /// `{"type":"set-config","pairs":[["k","v"]]}`
    SetConfig {
        /// Key/value pairs.
        pairs: Vec<(String, String)>,
    },
    /// `{"type":"custom","hex":"00ff"}`
    Custom {
        /// Payload as hex.
        hex: String,
    },
}

impl CommandSpec {
    /// The protocol command.
    ///
    /// # Errors
    /// A message for an invalid payload.
    pub fn to_command(&self) -> Result<Command, String> {
        Ok(match self {
            CommandSpec::Ping => Command::Ping,
            CommandSpec::SetInterval { millis } if *millis > 0 => {
                Command::SetInterval { millis: *millis }
            }
            CommandSpec::SetInterval { .. } => return Err("millis must be positive".into()),
            CommandSpec::Reboot => Command::Reboot,
            CommandSpec::SetConfig { pairs } => Command::SetConfig {
                pairs: pairs.clone(),
            },
            CommandSpec::Custom { hex } => Command::Custom {
                payload: hex::decode(hex).map_err(|_| "custom payload is not hex".to_owned())?,
            },
        })
    }
}

/// Body of `POST /api/v1/commands`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendCommand {
    /// Target device; omit with `all`.
    #[serde(default)]
    pub device: Option<u32>,
    /// Every provisioned device.
    #[serde(default)]
    pub all: bool,
    /// The command.
    pub command: CommandSpec,
    /// How long an undelivered command stays queued, seconds (default one day).
    #[serde(default)]
    pub ttl_s: Option<u64>,
}

/// One queued command in the answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Queued {
    /// Device.
    pub device: u32,
    /// Command id.
    pub id: u64,
    /// Whether the device was online and the command went straight to its session.
    pub online: bool,
}

pub(crate) fn error(status: StatusCode, msg: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": msg.into() }))).into_response()
}

async fn auth(State(state): State<Arc<AdminState>>, req: Request, next: Next) -> Response {
    let ok = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .is_some_and(|t| constant_time_eq(t.as_bytes(), state.token.as_bytes()));
    if !ok {
        tracing::warn!("admin request with a missing or wrong token");
        return error(StatusCode::UNAUTHORIZED, "missing or wrong bearer token");
    }
    next.run(req).await
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Readiness for a load balancer or an orchestrator: the database takes commits and the outbox
/// is below its high-water mark (past it, the oldest aggregates would soon be dropped). No token:
/// like `/healthz` it says nothing secret.
async fn readyz(State(state): State<Arc<AdminState>>) -> Response {
    let failing = state
        .counters
        .store_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let outbox_rows = state.store.outbox().rows.load(Relaxed).max(0) as u64;
    let broker = broker_state(&state);
    let below = state.outbox_high_water.is_none_or(|hw| outbox_rows < hw);
    let r = Readiness {
        ready: failing.is_none() && below,
        database: failing.unwrap_or_else(|| "writable".into()),
        broker: broker.into(),
        outbox_rows,
        outbox_high_water: state.outbox_high_water,
    };
    let status = if r.ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(r)).into_response()
}

/// What `GET /api/v1/stats` answers: the counters of `/metrics` as one JSON object, for the
/// dashboard and scripts.
#[derive(Debug, Serialize, Deserialize)]
pub struct StatsView {
    /// Gateway clock, ms since the epoch.
    pub now_ms: i64,
    /// Version of the gateway.
    pub version: String,
    /// `connected`, `disconnected` or `disabled`.
    pub broker: String,
    /// Configured aggregate window lengths, ms, shortest first.
    pub aggregate_windows_ms: Vec<u64>,
    /// Every counter and gauge by name (`readings_committed`, `drop_bad_tag`, `outbox_rows`...);
    /// durations in the unit their name ends with.
    pub counters: std::collections::BTreeMap<String, u64>,
}

async fn stats(State(state): State<Arc<AdminState>>) -> Response {
    let mut counters: std::collections::BTreeMap<String, u64> = state
        .counters
        .snapshot()
        .into_iter()
        .map(|(name, value, _)| (name.to_owned(), value))
        .collect();
    for (name, _, value, _) in control_series(&state) {
        counters.insert(name.to_owned(), value);
    }
    if let Ok(c) = state.store.command_counts().await {
        counters.extend(c.into_iter().map(|(s, n)| (format!("commands_{s}"), n)));
    }
    if let Ok(c) = state.store.transfer_counts().await {
        counters.extend(c.into_iter().map(|(s, n)| (format!("transfers_{s}"), n)));
    }
    Json(StatsView {
        now_ms: crate::store::now_ms(),
        version: env!("CARGO_PKG_VERSION").into(),
        broker: broker_state(&state).into(),
        aggregate_windows_ms: state.aggregate_windows.clone(),
        counters,
    })
    .into_response()
}

fn broker_state(state: &AdminState) -> &'static str {
    match state.outbox_high_water {
        None => "disabled",
        Some(_) if state.counters.mqtt_connected.load(Relaxed) == 1 => "connected",
        Some(_) => "disconnected",
    }
}

/// `ok`, or 503 with the reason while the database cannot be written (disk full, read-only,
/// deleted): nothing is acknowledged then.
async fn healthz(State(state): State<Arc<AdminState>>) -> Response {
    let failing = state
        .counters
        .store_error
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    match failing {
        None => "ok".into_response(),
        Some(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("database not writable, nothing is acknowledged: {e}"),
        )
            .into_response(),
    }
}

async fn devices(State(state): State<Arc<AdminState>>) -> Response {
    match state.store.list_devices().await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// What `POST /api/v1/devices/{id}/revoke` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct Revoked {
    /// The device.
    pub device: u32,
    /// Whether a live control session was closed.
    pub session_closed: bool,
}

/// Revokes a device at once: stored first (so a restart keeps it), then its datagrams are
/// refused by the ingest task and its live session, if any, is closed.
async fn revoke_device(State(state): State<Arc<AdminState>>, Path(id): Path<u32>) -> Response {
    let device = DeviceId(id);
    match state.store.revoke_device(device).await {
        Ok(true) => {}
        Ok(false) => return error(StatusCode::NOT_FOUND, format!("no device {id}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    if state
        .device_changes
        .send(crate::ingest::DeviceChange::Revoke(device))
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is stopping; the revocation is stored and holds at the next start",
        );
    }
    let session = state
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(&device);
    let session_closed = session.is_some_and(|s| {
        s.cancel.cancel();
        true
    });
    tracing::warn!(device = id, session_closed, "device revoked");
    Json(Revoked {
        device: id,
        session_closed,
    })
    .into_response()
}

/// What `POST /api/v1/devices/{id}/rotate-key` answers.
#[derive(Debug, Serialize, Deserialize)]
pub struct RotationStarted {
    /// The device.
    pub device: u32,
    /// The version the new key gets once the device confirms it.
    pub version: u32,
    /// A rotation already waited and is resumed (its key is sent again, not replaced).
    pub resumed: bool,
    /// Handed to the device's live session now; otherwise it is sent when the device connects.
    pub delivered: bool,
}

/// Starts a key rotation: the new key is stored as pending (so it survives a restart), the
/// ingest task accepts it beside the old one, and the device's live session sends it. The old
/// key is refused once the device confirms (see `control::session`).
async fn rotate_key(State(state): State<Arc<AdminState>>, Path(id): Path<u32>) -> Response {
    if !state.control_tls {
        return error(
            StatusCode::CONFLICT,
            "the control listener runs without TLS: keys are never sent in the clear",
        );
    }
    let device = DeviceId(id);
    let (version, key, resumed) = match state.store.start_rotation(device).await {
        Ok(crate::store::Rotation::Pending {
            version,
            key,
            resumed,
        }) => (version, key, resumed),
        Ok(crate::store::Rotation::NoDevice) => {
            return error(StatusCode::NOT_FOUND, format!("no device {id}"));
        }
        Ok(crate::store::Rotation::Revoked) => {
            return error(StatusCode::CONFLICT, format!("device {id} is revoked"));
        }
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    if state
        .device_changes
        .send(crate::ingest::DeviceChange::NextKey(device, key))
        .await
        .is_err()
    {
        return error(
            StatusCode::SERVICE_UNAVAILABLE,
            "the gateway is stopping; the rotation is stored and resumes at the next start",
        );
    }
    let handle = state
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&device)
        .cloned();
    let delivered =
        handle.is_some_and(|h| h.tx.try_send(crate::control::Outbound::KeyPending).is_ok());
    tracing::info!(
        device = id,
        version,
        resumed,
        delivered,
        "key rotation started"
    );
    Json(RotationStarted {
        device: id,
        version,
        resumed,
        delivered,
    })
    .into_response()
}

/// The devices a request names: one existing device, or all of them.
async fn targets(
    state: &AdminState,
    device: Option<u32>,
    all: bool,
) -> Result<Vec<DeviceId>, Response> {
    let internal =
        |e: crate::store::StoreError| error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    match (device, all) {
        (Some(d), false) => match state.store.device_key(DeviceId(d)).await {
            Ok(Some(_)) => Ok(vec![DeviceId(d)]),
            Ok(None) => Err(error(StatusCode::NOT_FOUND, format!("no device {d}"))),
            Err(e) => Err(internal(e)),
        },
        (None, true) => state.store.device_ids().await.map_err(internal),
        _ => Err(error(StatusCode::BAD_REQUEST, "give either device or all")),
    }
}

async fn send_command(
    State(state): State<Arc<AdminState>>,
    Json(req): Json<SendCommand>,
) -> Response {
    let command = match req.command.to_command() {
        Ok(c) => c,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    // It must fit one control frame, or no session could ever deliver it.
    if !crate::control::command_fits(&command) {
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "command larger than a control frame ({} bytes)",
                proto::control::MAX_FRAME
            ),
        );
    }
    let targets = match targets(&state, req.device, req.all).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let ttl_ms = req
        .ttl_s
        .unwrap_or(86_400)
        .saturating_mul(1000)
        .min(i64::MAX as u64) as i64;
    let queued = match crate::control::queue_command(
        &state.store,
        &state.sessions,
        &targets,
        &command,
        ttl_ms,
        None,
    )
    .await
    {
        Ok(q) => q,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    let out: Vec<Queued> = queued
        .into_iter()
        .map(|(device, id, online)| Queued {
            device: device.0,
            id: id.0,
            online,
        })
        .collect();
    (StatusCode::CREATED, Json(out)).into_response()
}

async fn get_config(State(state): State<Arc<AdminState>>, Path(id): Path<u32>) -> Response {
    match state.store.device_key(DeviceId(id)).await {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no device {id}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    match state.store.device_config(DeviceId(id)).await {
        Ok(pair) => Json(pair).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

async fn put_config(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<u32>,
    Json(config): Json<ConfigJson>,
) -> Response {
    if let Err(e) = config.validate() {
        return error(StatusCode::BAD_REQUEST, e);
    }
    match state.store.device_key(DeviceId(id)).await {
        Ok(Some(_)) => {}
        Ok(None) => return error(StatusCode::NOT_FOUND, format!("no device {id}")),
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
    if let Err(e) = state.store.set_desired_config(DeviceId(id), &config).await {
        return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
    }
    let handle = state
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&DeviceId(id))
        .cloned();
    // Online: push it now. Otherwise the session sends it when the device connects.
    let online = handle.is_some_and(|h| {
        h.tx.try_send(Outbound::Msg(Box::new(GatewayMsg::Config {
            config: (&config).into(),
        })))
        .is_ok()
    });
    Json(serde_json::json!({ "device": id, "online": online })).into_response()
}

/// Query of `POST /api/v1/files`.
#[derive(Debug, Deserialize)]
struct FileQuery {
    name: String,
    device: Option<u32>,
    #[serde(default)]
    all: bool,
}

/// Answer of `POST /api/v1/files`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileQueued {
    /// File id.
    pub file: i64,
    /// Sanitised name.
    pub name: String,
    /// Size in bytes.
    pub size: u64,
    /// SHA-256, hex.
    pub sha256: String,
    /// Transfers created.
    pub transfers: usize,
}

async fn send_file(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<FileQuery>,
    body: axum::body::Bytes,
) -> Response {
    use sha2::Digest;
    if body.len() as u64 > state.max_file_size {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "larger than control.max_file_size ({})",
                state.max_file_size
            ),
        );
    }
    let targets = match targets(&state, q.device, q.all).await {
        Ok(t) => t,
        Err(r) => return r,
    };
    let name = crate::store::files::sanitize_name(&q.name);
    let sha: [u8; 32] = sha2::Sha256::digest(&body).into();
    // Content-addressed: the same bytes are kept once.
    let path = state.files_dir.join(hex::encode(sha));
    let mut nonce = [0u8; 8];
    rand::rng().fill_bytes(&mut nonce);
    let tmp = state
        .files_dir
        .join(format!("{}.{}.tmp", hex::encode(sha), hex::encode(nonce)));
    let write = async {
        tokio::fs::create_dir_all(&state.files_dir).await?;
        tokio::fs::write(&tmp, &body).await?;
        tokio::fs::rename(&tmp, &path).await
    };
    if let Err(e) = write.await {
        return error(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("storing the file: {e}"),
        );
    }
    let (file, transfers) = match state
        .store
        .add_file(&name, body.len() as u64, &sha, &path, &targets)
        .await
    {
        Ok(x) => x,
        Err(e) => return error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    };
    for (device, _) in &transfers {
        let handle = state
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(device)
            .cloned();
        if let Some(h) = handle {
            // Full queue: the session also looks for transfers whenever one ends or it starts.
            let _ = h.tx.try_send(Outbound::FilesPending);
        }
    }
    let answer = FileQueued {
        file,
        name,
        size: body.len() as u64,
        sha256: hex::encode(sha),
        transfers: transfers.len(),
    };
    (StatusCode::CREATED, Json(answer)).into_response()
}

/// Query of `GET /api/v1/transfers`.
#[derive(Debug, Deserialize)]
struct TransferQuery {
    file: Option<i64>,
    limit: Option<i64>,
}

async fn list_transfers(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<TransferQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(1000).clamp(1, 100_000);
    match state.store.list_transfers(q.file, limit).await {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Query of `GET /api/v1/commands`.
#[derive(Debug, Deserialize)]
struct ListQuery {
    device: Option<u32>,
    limit: Option<i64>,
}

async fn list_commands(
    State(state): State<Arc<AdminState>>,
    Query(q): Query<ListQuery>,
) -> Response {
    let limit = q.limit.unwrap_or(100).clamp(1, 100_000);
    match state
        .store
        .list_commands(q.device.map(DeviceId), limit)
        .await
    {
        Ok(rows) => Json(rows).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// The control listener's series: (name, help, value, gauge).
fn control_series(state: &AdminState) -> Vec<(&'static str, &'static str, u64, bool)> {
    let c = &state.control;
    let mut out: Vec<(&'static str, &'static str, u64, bool)> = [
        (
            "control_sessions_authenticated",
            "Control sessions that authenticated.",
            &c.sessions_authenticated,
        ),
        (
            "control_rejected_busy",
            "Control connections closed for a session limit.",
            &c.rejected_busy,
        ),
        (
            "control_rejected_limited",
            "Control connections closed at accept: source limited for failed connections.",
            &c.rejected_limited,
        ),
        (
            "control_rejected_handshake",
            "Control connections that failed TLS, timed out or sent bad frames.",
            &c.rejected_handshake,
        ),
        (
            "control_rejected_auth",
            "Control authentications that failed.",
            &c.rejected_auth,
        ),
        (
            "control_sessions_replaced",
            "Control sessions replaced by a newer one of the same device.",
            &c.sessions_replaced,
        ),
        (
            "control_connections_closed",
            "Accepted control connections that have ended.",
            &c.connections_closed,
        ),
        (
            "control_connections_accepted",
            "Control connections admitted past the accept checks.",
            &c.connections_accepted,
        ),
    ]
    .into_iter()
    .map(|(name, help, v)| (name, help, v.load(Relaxed), false))
    .collect();
    let online = state
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .len();
    out.push((
        "control_sessions_online",
        "Control sessions live now.",
        online as u64,
        true,
    ));
    // Open connections not (yet) in a live session: TLS handshake, authentication, or a session
    // just replaced or ending.
    let open = c
        .connections_accepted
        .load(Relaxed)
        .saturating_sub(c.connections_closed.load(Relaxed));
    out.push((
        "control_connections_handshaking",
        "Open control connections without a live session (handshake or authentication).",
        open.saturating_sub(online as u64),
        true,
    ));
    out
}

async fn metrics(State(state): State<Arc<AdminState>>) -> Response {
    let mut out = String::new();
    // Prometheus names spell units out: the counters' `_us` and `_ms` become `_seconds`.
    let mut push = |name: &str, help: &str, value: u64, gauge: bool| {
        let (base, value) = if let Some(b) = name.strip_suffix("_us") {
            (format!("{b}_seconds"), value as f64 / 1e6)
        } else if let Some(b) = name.strip_suffix("_ms") {
            (format!("{b}_seconds"), value as f64 / 1e3)
        } else {
            (name.to_owned(), value as f64)
        };
        let (metric, kind) = if gauge {
            (format!("gateway_{base}"), "gauge")
        } else {
            (format!("gateway_{base}_total"), "counter")
        };
        out.push_str(&format!(
            "# HELP {metric} {help}\n# TYPE {metric} {kind}\n{metric} {value}\n"
        ));
    };
    for (name, value, gauge) in state.counters.snapshot() {
        push(name, crate::events::help(name), value, gauge);
    }
    for (name, help, value, gauge) in control_series(&state) {
        push(name, help, value, gauge);
    }
    // Commands and transfers by status, read from the database at each scrape.
    for (metric, help, counts) in [
        (
            "gateway_commands",
            "Stored commands by status.",
            state.store.command_counts().await,
        ),
        (
            "gateway_transfers",
            "File transfers by status.",
            state.store.transfer_counts().await,
        ),
    ] {
        match counts {
            Ok(counts) => {
                out.push_str(&format!("# HELP {metric} {help}\n# TYPE {metric} gauge\n"));
                for (status, n) in counts {
                    out.push_str(&format!("{metric}{{status=\"{status}\"}} {n}\n"));
                }
            }
            Err(e) => tracing::warn!(error = %e, metric, "metrics: could not count"),
        }
    }
    state.counters.commit_latency.render(
        crate::events::LATENCY_BOUNDS,
        "gateway_commit_latency_seconds",
        "Receive-to-commit latency of committed datagrams.",
        &mut out,
    );
    state.counters.batch_readings.render(
        crate::events::BATCH_BOUNDS,
        "gateway_batch_readings",
        "Readings per committed transaction.",
        &mut out,
    );
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response()
}

/// The router.
pub fn router(state: Arc<AdminState>) -> Router {
    let api = Router::new()
        .route("/metrics", get(metrics))
        .route("/api/v1/devices", get(devices))
        .route("/api/v1/stats", get(stats))
        .route("/api/v1/commands", post(send_command).get(list_commands))
        .route(
            "/api/v1/devices/{id}/config",
            get(get_config).put(put_config),
        )
        .route("/api/v1/devices/{id}/revoke", post(revoke_device))
        .route("/api/v1/devices/{id}/rotate-key", post(rotate_key))
        .route("/api/v1/files", post(send_file))
        .route("/api/v1/transfers", get(list_transfers))
        .route("/api/v1/readings", get(crate::api::readings))
        .route("/api/v1/aggregates", get(crate::api::aggregates))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    let limit = usize::try_from(state.max_file_size)
        .unwrap_or(usize::MAX)
        .saturating_add(1);
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/api/v1/openapi.json", get(crate::api::openapi))
        .route("/", get(crate::dashboard::root))
        .route("/dashboard/", get(crate::dashboard::index))
        .route("/dashboard/{file}", get(crate::dashboard::file))
        .merge(api)
        .layer(axum::extract::DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// Serves the API on `listener` until `cancel` fires.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AdminState>,
    cancel: CancellationToken,
) {
    let app = router(state);
    if let Err(error) = axum::serve(listener, app)
        .with_graceful_shutdown(async move { cancel.cancelled().await })
        .await
    {
        tracing::warn!(%error, "admin API stopped with an error");
    }
}

/// Binds the admin listener.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    tokio::net::TcpListener::bind(addr).await
}
