//! The gateway's settings: one typed tree, read from an optional TOML file, then overridden by
//! environment variables and flags (that merge happens in `cli`, at the edge). No I/O here
//! beyond reading the file.

use std::net::SocketAddr;
use std::num::NonZeroUsize;
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
    /// Process-level settings.
    #[serde(default)]
    pub service: ServiceConfig,
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
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 4782))
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            token: None,
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
    /// Most readings committed in one transaction. Larger batches amortise the commit; the
    /// writer never waits to fill one. Default 16,384.
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
    NonZeroUsize::new(16_384).unwrap_or(NonZeroUsize::MIN)
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
    /// A value is out of its bounds.
    #[error("invalid setting {field}: {reason}")]
    Invalid {
        /// Dotted path of the setting.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
}

impl Config {
    /// Reads and validates a TOML file.
    ///
    /// # Errors
    /// [`ConfigError::Read`], [`ConfigError::Parse`], or the errors of [`Config::validate`].
    pub fn from_file(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(source),
        })?;
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
        let cfg: Config = toml::from_str("[store]\ndurability = \"full\"\n").expect("parses");
        assert_eq!(cfg.store.durability, Durability::Full);
        assert!(toml::from_str::<Config>("[store]\ndurability = \"fast\"\n").is_err());
    }
}
