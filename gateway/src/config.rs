//! The gateway's settings: one typed tree, read from an optional TOML file, then overridden by
//! environment variables and flags (that merge happens in `cli`, at the edge). No I/O here
//! beyond reading the file.

use std::net::SocketAddr;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Everything `gateway serve` needs.
#[derive(Debug, Clone, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// UDP telemetry ingest.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// SQLite storage.
    #[serde(default)]
    pub store: StoreConfig,
    /// TCP control sessions.
    #[serde(default)]
    pub control: ControlConfig,
    /// The operator HTTP API.
    #[serde(default)]
    pub admin: AdminConfig,
    /// Windowed aggregation of readings.
    #[serde(default)]
    pub aggregate: AggregateConfig,
    /// Forwarding of aggregates to an MQTT broker.
    #[serde(default)]
    pub mqtt: MqttConfig,
    /// Process-level settings.
    #[serde(default)]
    pub service: ServiceConfig,
    /// How long data is kept and how large the database may grow.
    #[serde(default)]
    pub retention: RetentionConfig,
}

/// Retention settings: enforced by a background task every `interval`, in small batches.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionConfig {
    /// How long raw readings are kept, by their device timestamp. Default: forever.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub readings: Option<Duration>,
    /// How long aggregate windows of every tier are kept, by window start. Default: forever.
    #[serde(
        default,
        with = "humantime_serde",
        skip_serializing_if = "Option::is_none"
    )]
    pub aggregates: Option<Duration>,
    /// Per tier (window length → how long), overriding `aggregates`.
    #[serde(default)]
    pub tiers: std::collections::BTreeMap<String, humantime_serde::Serde<Duration>>,
    /// Largest database file, bytes. Retention works below it by an eighth of it plus twice
    /// the most the database rose by between recent runs (never below half of it): past that line the oldest raw
    /// readings are deleted, then the oldest sent aggregate windows, down to 90 % of the line.
    /// Default: no cap.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_db_size: Option<ByteSize>,
    /// How often the policy is enforced. Default 1m.
    #[serde(default = "default_retention_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Rows deleted per statement (each statement is one short write transaction). Default 2000.
    #[serde(default = "default_retention_batch")]
    pub batch: u32,
}

fn default_retention_interval() -> Duration {
    Duration::from_secs(60)
}

fn default_retention_batch() -> u32 {
    2_000
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            readings: None,
            aggregates: None,
            tiers: Default::default(),
            max_db_size: None,
            interval: default_retention_interval(),
            batch: default_retention_batch(),
        }
    }
}

impl RetentionConfig {
    /// How long windows of `window` are kept.
    pub fn keep_aggregates(&self, window: Duration) -> Option<Duration> {
        self.tiers
            .iter()
            .find(|(k, _)| humantime::parse_duration(k).ok() == Some(window))
            .map(|(_, v)| **v)
            .or(self.aggregates)
    }

    /// Whether anything is to be enforced.
    pub fn active(&self) -> bool {
        self.readings.is_some()
            || self.aggregates.is_some()
            || !self.tiers.is_empty()
            || self.max_db_size.is_some()
    }
}

/// A size in bytes, written `10GiB`, `512MiB`, `800MB`, `1.5GB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} is not a size (e.g. 512MiB, 10GiB)"))?;
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KB" | "kB" => 1_000,
            "KiB" => 1 << 10,
            "MB" => 1_000_000,
            "MiB" => 1 << 20,
            "GB" => 1_000_000_000,
            "GiB" => 1 << 30,
            "TB" => 1_000_000_000_000,
            "TiB" => 1 << 40,
            u => {
                return Err(format!(
                    "{s:?}: unknown unit {u:?} (B, KB, KiB, MB, MiB, GB, GiB, TB, TiB)"
                ));
            }
        };
        Ok(ByteSize((n * mult as f64) as u64))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        if b >= 1 << 30 && b.is_multiple_of(1 << 20) {
            write!(f, "{}MiB", b >> 20)
        } else if b >= 1 << 20 && b.is_multiple_of(1 << 10) {
            write!(f, "{}KiB", b >> 10)
        } else {
            write!(f, "{b}")
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            N(u64),
            S(String),
        }
        match Raw::deserialize(d)? {
            Raw::N(n) => Ok(ByteSize(n)),
            Raw::S(s) => s.parse().map_err(serde::de::Error::custom),
        }
    }
}

/// What to do with a reading that arrives after its window closed.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LateReadings {
    /// Re-emit the window's aggregate, corrected, with the next revision number.
    #[default]
    Revise,
    /// Count the reading as dropped from aggregation (it is still stored as a raw reading).
    Drop,
}

/// Windowed aggregation settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregateConfig {
    /// Compute aggregates at all. Default true.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Tumbling window lengths, by the readings' own timestamps. Default `["10s", "1m"]`.
    #[serde(default = "default_windows", with = "humantime_list")]
    pub windows: Vec<Duration>,
    /// How far behind a device's newest timestamp a reading may be and still join its window
    /// before the window closes. Default 5s.
    #[serde(default = "default_lateness", with = "humantime_serde")]
    pub lateness: Duration,
    /// Readings later than that: `revise` or `drop`. Default `revise`.
    #[serde(default)]
    pub late: LateReadings,
    /// A device silent this long (gateway clock) has its open windows closed. Default 1m.
    #[serde(default = "default_idle", with = "humantime_serde")]
    pub idle: Duration,
    /// How long closed windows are kept in memory for revisions, by event time (only with
    /// `late = "revise"`; about 100 bytes per window, device and sensor). Default 2m.
    #[serde(default = "default_keep_closed", with = "humantime_serde")]
    pub keep_closed: Duration,
}

fn default_windows() -> Vec<Duration> {
    vec![Duration::from_secs(10), Duration::from_secs(60)]
}
fn default_lateness() -> Duration {
    Duration::from_secs(5)
}
fn default_idle() -> Duration {
    Duration::from_secs(60)
}
fn default_keep_closed() -> Duration {
    Duration::from_secs(120)
}

impl Default for AggregateConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            windows: default_windows(),
            lateness: default_lateness(),
            late: LateReadings::default(),
            idle: default_idle(),
            keep_closed: default_keep_closed(),
        }
    }
}

/// A list of humantime durations in TOML (`["10s", "1m"]`).
mod humantime_list {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(v: &[Duration], s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(v.iter().map(|d| humantime::format_duration(*d).to_string()))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
        let v = Vec::<String>::deserialize(d)?;
        v.iter()
            .map(|s| humantime::parse_duration(s).map_err(serde::de::Error::custom))
            .collect()
    }
}

/// MQTT forwarding settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MqttConfig {
    /// Forward to a broker. Default false: aggregates are only stored.
    #[serde(default)]
    pub enabled: bool,
    /// Broker host. Default `127.0.0.1`.
    #[serde(default = "default_mqtt_host")]
    pub host: String,
    /// Broker port. Default 1883 (8883 is usual with TLS).
    #[serde(default = "default_mqtt_port")]
    pub port: u16,
    /// Client id. Default: the gateway id.
    #[serde(default)]
    pub client_id: Option<String>,
    /// Username, when the broker wants one.
    #[serde(default)]
    pub username: Option<String>,
    /// Password.
    #[serde(default)]
    pub password: Option<String>,
    /// Connect with TLS, verifying the broker against `ca`. Default false.
    #[serde(default)]
    pub tls: bool,
    /// CA certificate (PEM) that signed the broker's certificate.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// Client certificate (PEM) for brokers that authenticate clients by certificate.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// First topic level(s). Default `gateway`.
    #[serde(default = "default_prefix")]
    pub topic_prefix: String,
    /// Keep-alive interval. Default 30s.
    #[serde(default = "default_keep_alive", with = "humantime_serde")]
    pub keep_alive: Duration,
    /// Publishes awaiting the broker's acknowledgement at once. Default 100.
    #[serde(default = "default_inflight")]
    pub max_inflight: u16,
    /// After an outage, the backlog drains oldest-first at most this many messages a second
    /// (live aggregates go first). Default 1,000.
    #[serde(default = "default_backlog_rate")]
    pub backlog_rate: u32,
    /// Most messages kept for the broker; beyond it the oldest aggregates are dropped (counted
    /// and logged; raw readings are never touched). Default 1,000,000.
    #[serde(default = "default_outbox_rows")]
    pub outbox_max_rows: u64,
    /// Most payload bytes kept for the broker. Default 256 MiB.
    #[serde(default = "default_outbox_bytes")]
    pub outbox_max_bytes: u64,
    /// First reconnect delay; it doubles (with jitter) up to `reconnect_max`. Default 500ms.
    #[serde(default = "default_reconnect_min", with = "humantime_serde")]
    pub reconnect_min: Duration,
    /// Longest reconnect delay. Default 30s.
    #[serde(default = "default_reconnect_max", with = "humantime_serde")]
    pub reconnect_max: Duration,
}

fn default_mqtt_host() -> String {
    "127.0.0.1".into()
}
fn default_mqtt_port() -> u16 {
    1883
}
fn default_prefix() -> String {
    "gateway".into()
}
fn default_keep_alive() -> Duration {
    Duration::from_secs(30)
}
fn default_inflight() -> u16 {
    100
}
fn default_backlog_rate() -> u32 {
    1000
}
fn default_outbox_rows() -> u64 {
    1_000_000
}
fn default_outbox_bytes() -> u64 {
    256 << 20
}
fn default_reconnect_min() -> Duration {
    Duration::from_millis(500)
}
fn default_reconnect_max() -> Duration {
    Duration::from_secs(30)
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            host: default_mqtt_host(),
            port: default_mqtt_port(),
            client_id: None,
            username: None,
            password: None,
            tls: false,
            ca: None,
            client_cert: None,
            client_key: None,
            topic_prefix: default_prefix(),
            keep_alive: default_keep_alive(),
            max_inflight: default_inflight(),
            backlog_rate: default_backlog_rate(),
            outbox_max_rows: default_outbox_rows(),
            outbox_max_bytes: default_outbox_bytes(),
            reconnect_min: default_reconnect_min(),
            reconnect_max: default_reconnect_max(),
        }
    }
}

/// Whether `s` is a valid sequence of MQTT topic levels to publish under: not empty, no
/// wildcards, no NUL, no empty level, at most 32 levels of at most 64 bytes... and no leading
/// `$` (reserved for broker topics).
pub fn valid_topic_levels(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 256
        && !s.starts_with('$')
        && s.split('/').all(|l| {
            !l.is_empty() && !l.contains(['+', '#', '\0']) && l.chars().all(|c| !c.is_control())
        })
}

/// UDP telemetry ingest settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Address the UDP socket binds to. Default `0.0.0.0:4780`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// Datagrams that may wait between the socket and the writer. When full, datagrams are
    /// dropped (counted as `queue_full`, never acked). Default 65,536 (at most about 32 MiB at
    /// 16 readings a datagram, 85 MiB at 50; memory is used only while the writer lags).
    #[serde(default = "default_queue")]
    pub queue: NonZeroUsize,
    /// Kernel receive buffer (SO_RCVBUF) in bytes; bursts beyond it are lost by the kernel.
    /// Default 8 MiB. The kernel may cap it (net.core.rmem_max); the gateway logs what it got.
    #[serde(default = "default_recv_buffer")]
    pub recv_buffer: usize,
    /// Failed authentications (wrong tag; replays from another address than the device's)
    /// allowed per source address and second after the burst; past that the source's datagrams
    /// are dropped unchecked as `auth_limited` until it is back under the rate. 0 turns the
    /// limit off. Default 100.
    #[serde(default = "default_udp_auth_rate")]
    pub auth_failures_per_s: u32,
    /// Failed authentications a source may have at once before the rate applies. Default 1,000.
    #[serde(default = "default_udp_auth_burst")]
    pub auth_failures_burst: NonZeroU32,
}

/// TCP control session settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Address the control listener binds to. Default `0.0.0.0:4781`.
    #[serde(default = "default_control_listen")]
    pub listen: SocketAddr,
    /// Serve sessions over TLS 1.3 (default). Plain TCP only when set to false explicitly.
    #[serde(default = "default_true")]
    pub tls: bool,
    /// Server certificate chain (PEM). Default `certs/server.pem` beside the database; when
    /// that and the key are both missing, the gateway creates a local CA and a server
    /// certificate there on start (as `gateway certs init` does).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// Server private key (PEM). Default `certs/server.key` beside the database.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// Most sessions at once, authenticated or not. Default 10,000.
    #[serde(default = "default_max_sessions")]
    pub max_sessions: NonZeroUsize,
    /// Most sessions from one source address. Default 4,096.
    #[serde(default = "default_max_per_ip")]
    pub max_sessions_per_ip: NonZeroUsize,
    /// Time allowed for the TLS handshake and authentication together. Default 5s.
    #[serde(default = "default_handshake_timeout", with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Heartbeat period devices are told to keep. Default 10s.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat: Duration,
    /// Heartbeats a device may miss before its session is closed and it is offline. Default 3.
    #[serde(default = "default_missed")]
    pub missed_heartbeats: u32,
    /// Largest file `gateway files send` accepts, in bytes. Default 64 MiB.
    #[serde(default = "default_max_file")]
    pub max_file_size: u64,
    /// Failed connections (TLS failures, handshake timeouts, bad frames or proofs before
    /// authentication) allowed per source address and second after the burst; past that the
    /// source's connections are closed at accept until it is back under the rate. 0 turns the
    /// limit off. Default 10.
    #[serde(default = "default_control_auth_rate")]
    pub auth_failures_per_s: u32,
    /// Failed connections a source may have at once before the rate applies. Default 100.
    #[serde(default = "default_control_auth_burst")]
    pub auth_failures_burst: NonZeroU32,
}

fn default_udp_auth_rate() -> u32 {
    100
}
fn default_udp_auth_burst() -> NonZeroU32 {
    NonZeroU32::new(1000).unwrap_or(NonZeroU32::MIN)
}
fn default_control_auth_rate() -> u32 {
    10
}
fn default_control_auth_burst() -> NonZeroU32 {
    NonZeroU32::new(100).unwrap_or(NonZeroU32::MIN)
}

fn default_max_file() -> u64 {
    64 << 20
}

fn default_control_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4781))
}
fn default_true() -> bool {
    true
}
fn default_max_sessions() -> NonZeroUsize {
    NonZeroUsize::new(10_000).unwrap_or(NonZeroUsize::MIN)
}
fn default_max_per_ip() -> NonZeroUsize {
    NonZeroUsize::new(4096).unwrap_or(NonZeroUsize::MIN)
}
fn default_handshake_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(10)
}
fn default_missed() -> u32 {
    3
}

/// The file holding the admin token when none is configured: `admin.token` beside `db`.
pub fn token_file(db: &Path) -> PathBuf {
    db.parent()
        .map_or_else(|| PathBuf::from("admin.token"), |p| p.join("admin.token"))
}

impl Config {
    /// The gateway id in force: the setting, else the host name, else `gateway`.
    pub fn gateway_id(&self) -> String {
        if let Some(id) = &self.service.id {
            return id.clone();
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .or_else(|_| std::fs::read_to_string("/etc/hostname"))
            .unwrap_or_default();
        let id: String = host
            .trim()
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
            .take(64)
            .collect();
        if id.is_empty() { "gateway".into() } else { id }
    }

    /// The folder where files for devices are kept: `files/` beside the database.
    pub fn files_dir(&self) -> PathBuf {
        self.store
            .path
            .parent()
            .map_or_else(|| PathBuf::from("files"), |p| p.join("files"))
    }

    /// The folder of default certificates: `certs/` beside the database.
    pub fn certs_dir(&self) -> PathBuf {
        self.store
            .path
            .parent()
            .map_or_else(|| PathBuf::from("certs"), |p| p.join("certs"))
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            listen: default_control_listen(),
            tls: true,
            cert: None,
            key: None,
            max_sessions: default_max_sessions(),
            max_sessions_per_ip: default_max_per_ip(),
            handshake_timeout: default_handshake_timeout(),
            heartbeat: default_heartbeat(),
            missed_heartbeats: default_missed(),
            max_file_size: default_max_file(),
            auth_failures_per_s: default_control_auth_rate(),
            auth_failures_burst: default_control_auth_burst(),
        }
    }
}

/// Operator HTTP API settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the API. Default `127.0.0.1:4782` (loopback only).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Bearer token. Default: the token in `admin.token` beside the database, created (mode
    /// 0600) on first start; the CLI on the same host reads the same file.
    #[serde(default)]
    pub token: Option<String>,
    /// Most rows in one response of `/api/v1/readings` or `/api/v1/aggregates` (a request may
    /// ask for fewer with `limit`). Default 1,000,000.
    #[serde(default = "default_max_points")]
    pub max_points: u64,
    /// A streamed query whose client takes nothing for this long is dropped (its slot freed).
    #[serde(default = "default_stall_timeout", with = "humantime_serde")]
    pub stall_timeout: Duration,
}

fn default_stall_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_max_points() -> u64 {
    1_000_000
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4782))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
            max_points: default_max_points(),
            stall_timeout: default_stall_timeout(),
        }
    }
}

/// How hard a commit is pressed to disk.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// `synchronous=NORMAL` in WAL mode: a committed (and acked) reading survives a crash or kill
    /// of the gateway process; the last transactions before a power loss may be lost.
    #[default]
    Normal,
    /// `synchronous=FULL`: every commit is flushed to stable storage before the ack, so acked
    /// readings also survive power loss. Costs an fsync per transaction.
    Full,
}

/// SQLite storage settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Database file; created with its schema when missing. Default `gateway.db`.
    #[serde(default = "default_db")]
    pub path: PathBuf,
    /// Commit durability, see [`Durability`]. Default `normal`.
    #[serde(default)]
    pub durability: Durability,
    /// Most readings committed in one transaction. Larger batches amortise the commit (each
    /// transaction rewrites a page per device it touches); the writer never waits to fill
    /// one, so light load still commits at once. Default 262,144 (16,384 datagrams of 16).
    #[serde(default = "default_batch_readings")]
    pub batch_readings: NonZeroUsize,
    /// How long the writer gathers datagrams before committing a batch that is not full. Larger
    /// transactions cost less CPU per reading but every ack waits longer; measured, a 10ms delay
    /// cut CPU by a quarter and raised the median latency to 60 ms at 200k readings/s.
    /// Default 0 (commit whatever is queued at once).
    #[serde(default = "default_commit_delay", with = "humantime_serde")]
    pub commit_delay: Duration,
    /// SQLite page cache of the writer connection, in KiB. Default 16,384 (16 MiB).
    #[serde(default = "default_cache_kib")]
    pub cache_kib: u32,
}

/// Process-level settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// How long shutdown may take to flush and commit before the process exits anyway.
    /// Default 4s.
    #[serde(default = "default_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// How often counters are written to the database for `gateway stats`. Default 1s.
    #[serde(default = "default_stats_interval", with = "humantime_serde")]
    pub stats_interval: Duration,
    /// This gateway's id: one MQTT topic level and the `gateway` field of every payload.
    /// Default: the host name (letters, digits, `-` and `_` kept), or `gateway`.
    #[serde(default)]
    pub id: Option<String>,
    /// Give freed heap back to the system after a storm of control sessions opening or closing
    /// (glibc only; see `gateway::memory`). Default true.
    #[serde(default = "default_true")]
    pub return_memory: bool,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 4780))
}
fn default_queue() -> NonZeroUsize {
    NonZeroUsize::new(65_536).unwrap_or(NonZeroUsize::MIN)
}
fn default_recv_buffer() -> usize {
    8 << 20
}
/// The database file every verb uses when `--db` is not given.
pub fn default_db() -> PathBuf {
    PathBuf::from("gateway.db")
}
fn default_batch_readings() -> NonZeroUsize {
    NonZeroUsize::new(262_144).unwrap_or(NonZeroUsize::MIN)
}
fn default_commit_delay() -> Duration {
    Duration::ZERO
}
fn default_cache_kib() -> u32 {
    16_384
}
fn default_grace() -> Duration {
    Duration::from_secs(4)
}
fn default_stats_interval() -> Duration {
    Duration::from_secs(1)
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            queue: default_queue(),
            recv_buffer: default_recv_buffer(),
            auth_failures_per_s: default_udp_auth_rate(),
            auth_failures_burst: default_udp_auth_burst(),
        }
    }
}
impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            path: default_db(),
            durability: Durability::default(),
            batch_readings: default_batch_readings(),
            commit_delay: default_commit_delay(),
            cache_kib: default_cache_kib(),
        }
    }
}
impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            shutdown_grace: default_grace(),
            stats_interval: default_stats_interval(),
            id: None,
            return_memory: true,
        }
    }
}

/// A configuration that cannot be used.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this tree (unknown keys are errors).
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// An environment override could not be applied.
    #[error("environment variable {var}: {reason}")]
    Env {
        /// The variable.
        var: String,
        /// Why.
        reason: String,
    },
    /// The settings with their environment overrides do not fit the tree.
    #[error("invalid settings from {source_desc}: {source}")]
    Merged {
        /// Which file and variables.
        source_desc: String,
        /// Why.
        source: Box<toml::de::Error>,
    },
    /// A value is out of its bounds.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// Dotted path of the setting.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "GATEWAY__";

/// Sets `table[section][key]...` from `GATEWAY__SECTION__KEY=raw`.
fn overlay(table: &mut toml::Table, var: &str, raw: &str) -> Result<(), ConfigError> {
    let bad = |reason: &str| ConfigError::Env {
        var: var.to_owned(),
        reason: reason.to_owned(),
    };
    let path: Vec<String> = var[ENV_PREFIX.len()..]
        .split("__")
        .map(str::to_ascii_lowercase)
        .collect();
    if path.iter().any(String::is_empty) {
        return Err(bad(
            "expected GATEWAY__SECTION__KEY (double underscores between the parts)",
        ));
    }
    // A TOML value when it parses as one, else the text as a string; secrets always as the
    // text (a numeric token stays a string).
    let secret = matches!(path.join(".").as_str(), "admin.token" | "mqtt.password");
    let value = if secret {
        toml::Value::String(raw.to_owned())
    } else {
        toml::from_str::<toml::Table>(&format!("v = {raw}"))
            .ok()
            .and_then(|mut t| t.remove("v"))
            .unwrap_or_else(|| toml::Value::String(raw.to_owned()))
    };
    let (last, parents) = path.split_last().ok_or_else(|| bad("names no setting"))?;
    let mut at = table;
    for part in parents {
        let entry = at
            .entry(part.clone())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        at = entry
            .as_table_mut()
            .ok_or_else(|| bad(&format!("{part} is a setting, not a section")))?;
    }
    at.insert(last.clone(), value);
    Ok(())
}

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Parse`], or the errors of [`Config::validate`].
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        Self::from_sources(Some(path), std::iter::empty())
    }

    /// Reads the optional TOML file, then applies environment overrides, then validates.
    ///
    /// An override is a variable `GATEWAY__SECTION__KEY` (sections and keys as in the file,
    /// any case, double underscores between them) whose value is a TOML value (`1884`,
    /// `true`, `["10s", "1m"]`, `{ "1s" = "20s" }`) or else a plain string (`30d`,
    /// `broker.example.net`). Variables with other prefixes are ignored.
    ///
    /// # Errors
    /// Those of [`Config::from_file`], [`ConfigError::Env`] for a variable that names no
    /// setting path, [`ConfigError::Merged`] for a value the setting does not take.
    pub fn from_sources(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let text = match path {
            Some(path) => std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?,
            None => String::new(),
        };
        let parse_error = |source| match path {
            Some(path) => ConfigError::Parse {
                path: path.to_owned(),
                source: Box::new(source),
            },
            None => ConfigError::Merged {
                source_desc: "defaults".into(),
                source: Box::new(source),
            },
        };
        let mut table = toml::from_str::<toml::Table>(&text).map_err(parse_error)?;
        let mut applied = Vec::new();
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (var, raw) in env {
            overlay(&mut table, &var, &raw)?;
            applied.push(var);
        }
        let cfg: Config = if applied.is_empty() {
            // From the text, so errors point at its lines.
            toml::from_str(&text).map_err(parse_error)?
        } else {
            toml::Value::Table(table)
                .try_into()
                .map_err(|source| ConfigError::Merged {
                    source_desc: format!(
                        "{}with {}",
                        path.map(|p| format!("{} ", p.display()))
                            .unwrap_or_default(),
                        applied.join(", ")
                    ),
                    source: Box::new(source),
                })?
        };
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks cross-field rules and bounds.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] naming the first bad setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.telemetry.recv_buffer < 64 * 1024 {
            return Err(ConfigError::Invalid {
                field: "telemetry.recv_buffer",
                reason: "at least 65536 bytes",
            });
        }
        if self.store.batch_readings.get() < proto::MAX_READINGS {
            return Err(ConfigError::Invalid {
                field: "store.batch_readings",
                reason: "at least one full datagram (50 readings)",
            });
        }
        let r = &self.retention;
        if r.batch == 0 {
            return Err(ConfigError::Invalid {
                field: "retention.batch",
                reason: "at least 1",
            });
        }
        if r.interval < Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                field: "retention.interval",
                reason: "at least 1s",
            });
        }
        if r.max_db_size.is_some_and(|b| b.0 < 1 << 20) {
            return Err(ConfigError::Invalid {
                field: "retention.max_db_size",
                reason: "at least 1MiB",
            });
        }
        if r.tiers.keys().any(|k| {
            humantime::parse_duration(k).map_or(true, |w| !self.aggregate.windows.contains(&w))
        }) {
            return Err(ConfigError::Invalid {
                field: "retention.tiers",
                reason: "each key must be one of aggregate.windows, e.g. \"10s\" = \"7d\"",
            });
        }
        // A closed window is remembered for revisions by late readings: keep it that long.
        if self.aggregate.windows.iter().any(|w| {
            r.keep_aggregates(*w)
                .is_some_and(|k| k < *w * 2 + self.aggregate.lateness)
        }) {
            return Err(ConfigError::Invalid {
                field: "retention.aggregates",
                reason: "each tier kept at least twice its window plus the lateness",
            });
        }
        // Open windows are rebuilt from the readings after a restart: keep those.
        let longest = self
            .aggregate
            .windows
            .iter()
            .max()
            .copied()
            .unwrap_or_default();
        if r.readings
            .is_some_and(|k| k < longest * 2 + self.aggregate.lateness)
        {
            return Err(ConfigError::Invalid {
                field: "retention.readings",
                reason: "at least twice the longest aggregate window plus the lateness",
            });
        }
        if self.admin.stall_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "admin.stall_timeout",
                reason: "above zero",
            });
        }
        if self.admin.max_points == 0 {
            return Err(ConfigError::Invalid {
                field: "admin.max_points",
                reason: "at least 1",
            });
        }
        if self.store.path.as_os_str().is_empty() {
            return Err(ConfigError::Invalid {
                field: "store.path",
                reason: "must not be empty",
            });
        }
        if self.store.commit_delay > Duration::from_secs(1) {
            return Err(ConfigError::Invalid {
                field: "store.commit_delay",
                reason: "at most 1s (acks wait for it)",
            });
        }
        if self.control.heartbeat < Duration::from_millis(100)
            || self.control.missed_heartbeats == 0
        {
            return Err(ConfigError::Invalid {
                field: "control.heartbeat",
                reason: "at least 100ms, and missed_heartbeats at least 1",
            });
        }
        if self.control.heartbeat > Duration::from_secs(86_400)
            || self.control.missed_heartbeats > 1000
            || self.control.handshake_timeout > Duration::from_secs(3600)
        {
            return Err(ConfigError::Invalid {
                field: "control",
                reason: "heartbeat at most 1 day, missed_heartbeats at most 1000, \
                         handshake_timeout at most 1h",
            });
        }
        if self.control.handshake_timeout.is_zero() {
            return Err(ConfigError::Invalid {
                field: "control.handshake_timeout",
                reason: "must be positive",
            });
        }
        if !valid_topic_levels(&self.gateway_id()) || self.gateway_id().contains('/') {
            return Err(ConfigError::Invalid {
                field: "service.id",
                reason: "one MQTT topic level: no '/', '+', '#', NUL or leading '$', at most 256 bytes",
            });
        }
        if !valid_topic_levels(&self.mqtt.topic_prefix) {
            return Err(ConfigError::Invalid {
                field: "mqtt.topic_prefix",
                reason: "MQTT topic levels: not empty, no empty level, no '+', '#', NUL or leading '$'",
            });
        }
        let a = &self.aggregate;
        if a.windows.is_empty()
            || a.windows
                .iter()
                .any(|w| *w < Duration::from_secs(1) || *w > Duration::from_secs(86_400))
        {
            return Err(ConfigError::Invalid {
                field: "aggregate.windows",
                reason: "at least one window, each between 1s and 1 day",
            });
        }
        if a.lateness > Duration::from_secs(86_400)
            || a.keep_closed > Duration::from_secs(7 * 86_400)
            || a.idle.is_zero()
        {
            return Err(ConfigError::Invalid {
                field: "aggregate",
                reason: "lateness at most 1 day, keep_closed at most 7 days, idle positive",
            });
        }
        let m = &self.mqtt;
        if m.max_inflight == 0 || m.max_inflight > 10_000 {
            return Err(ConfigError::Invalid {
                field: "mqtt.max_inflight",
                reason: "between 1 and 10000",
            });
        }
        if m.backlog_rate == 0 || m.outbox_max_rows == 0 || m.outbox_max_bytes < 4096 {
            return Err(ConfigError::Invalid {
                field: "mqtt",
                reason: "backlog_rate and outbox_max_rows positive, outbox_max_bytes at least 4096",
            });
        }
        if m.reconnect_min.is_zero()
            || m.reconnect_min > m.reconnect_max
            || m.keep_alive < Duration::from_secs(1)
        {
            return Err(ConfigError::Invalid {
                field: "mqtt.reconnect_min",
                reason: "positive and at most reconnect_max; keep_alive at least 1s",
            });
        }
        if m.client_cert.is_some() != m.client_key.is_some() {
            return Err(ConfigError::Invalid {
                field: "mqtt.client_cert",
                reason: "client_cert and client_key go together",
            });
        }
        if m.tls && m.ca.is_none() {
            return Err(ConfigError::Invalid {
                field: "mqtt.ca",
                reason: "required with mqtt.tls = true",
            });
        }
        if self.service.stats_interval.is_zero() {
            return Err(ConfigError::Invalid {
                field: "service.stats_interval",
                reason: "must be positive",
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_loads_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.example.toml");
        let cfg = Config::from_file(&path).expect("example config is valid");
        // The example documents the defaults: every setting must match.
        assert_eq!(
            toml::to_string(&cfg).expect("serialises"),
            toml::to_string(&Config::default()).expect("serialises")
        );
    }

    /// Every setting the gateway knows appears in the example (`gateway config default`),
    /// table by table, and nothing else does.
    #[test]
    fn the_example_documents_every_setting() {
        let example: toml::Table =
            toml::from_str(crate::cli::DEFAULT_CONFIG).expect("the example is TOML");
        let defaults: toml::Table =
            toml::from_str(&toml::to_string(&Config::default()).expect("serialises"))
                .expect("parses");
        let keys = |t: &toml::Table| -> std::collections::BTreeSet<String> {
            t.iter()
                .flat_map(|(k, v)| match v {
                    toml::Value::Table(inner) => {
                        inner.keys().map(|i| format!("{k}.{i}")).collect::<Vec<_>>()
                    }
                    _ => vec![k.clone()],
                })
                .collect()
        };
        let (documented, known) = (keys(&example), keys(&defaults));
        let missing: Vec<_> = known.difference(&documented).collect();
        assert!(
            missing.is_empty(),
            "settings missing from the example: {missing:?}"
        );
        let unknown: Vec<_> = documented.difference(&known).collect();
        assert!(
            unknown.is_empty(),
            "unknown settings in the example: {unknown:?}"
        );
    }

    #[test]
    fn sizes_parse_with_units() {
        for (text, bytes) in [
            ("512", 512),
            ("10GiB", 10 << 30),
            ("1.5GB", 1_500_000_000),
            ("800 MB", 800_000_000),
            ("3MiB", 3 << 20),
        ] {
            assert_eq!(text.parse::<ByteSize>(), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in ["", "ten", "5 parsecs", "GiB"] {
            assert!(bad.parse::<ByteSize>().is_err(), "{bad}");
        }
        // What `config check` prints reads back the same.
        for b in [ByteSize(3 << 20), ByteSize(10 << 30), ByteSize(12345)] {
            assert_eq!(b.to_string().parse::<ByteSize>(), Ok(b));
        }
    }

    #[test]
    fn unknown_keys_and_bad_values_are_errors() {
        let err = toml::from_str::<Config>("[telemetry]\nlisten = \"0.0.0.0:1\"\nqeue = 5\n");
        assert!(err.is_err());
        let cfg: Config = toml::from_str("[store]\nbatch_readings = 10\n").expect("parses");
        assert!(matches!(
            cfg.validate(),
            Err(ConfigError::Invalid {
                field: "store.batch_readings",
                ..
            })
        ));
        for (toml, field) in [
            ("[mqtt]\ntopic_prefix = \"a/+/b\"\n", "mqtt.topic_prefix"),
            ("[mqtt]\ntopic_prefix = \"a//b\"\n", "mqtt.topic_prefix"),
            ("[mqtt]\ntopic_prefix = \"$SYS\"\n", "mqtt.topic_prefix"),
            ("[service]\nid = \"a/b\"\n", "service.id"),
            ("[retention]\nreadings = \"1m\"\n", "retention.readings"),
            (
                "[retention]\ntiers = { \"10s\" = \"15s\" }\n",
                "retention.aggregates",
            ),
            (
                "[retention]\ntiers = { \"7s\" = \"1d\" }\n",
                "retention.tiers",
            ),
            (
                "[retention]\nmax_db_size = \"100KiB\"\n",
                "retention.max_db_size",
            ),
            ("[retention]\nbatch = 0\n", "retention.batch"),
            ("[retention]\ninterval = \"500ms\"\n", "retention.interval"),
            ("[service]\nid = \"gw#1\"\n", "service.id"),
            ("[aggregate]\nwindows = []\n", "aggregate.windows"),
            ("[aggregate]\nwindows = [\"500ms\"]\n", "aggregate.windows"),
            ("[mqtt]\ntls = true\n", "mqtt.ca"),
            ("[mqtt]\nmax_inflight = 0\n", "mqtt.max_inflight"),
        ] {
            let cfg: Config = toml::from_str(toml).expect("parses");
            match cfg.validate() {
                Err(ConfigError::Invalid { field: f, .. }) => assert_eq!(f, field, "{toml}"),
                other => panic!("{toml}: {other:?}"),
            }
        }
        assert!(toml::from_str::<Config>("[aggregate]\nwindows = [\"soon\"]\n").is_err());
        let cfg: Config =
            toml::from_str("[mqtt]\ntopic_prefix = \"site-1/edge\"\n[service]\nid = \"gw_1\"\n")
                .expect("parses");
        cfg.validate().expect("nested prefix and plain id are fine");
        let cfg: Config = toml::from_str("[store]\ndurability = \"full\"\n").expect("parses");
        assert_eq!(cfg.store.durability, Durability::Full);
        assert!(toml::from_str::<Config>("[store]\ndurability = \"fast\"\n").is_err());
    }
}
