//! The sensor gateway: authenticated UDP telemetry from devices, persisted to SQLite.
//!
//! [`Gateway::start`] binds the sockets, opens the store and spawns the tasks; the caller
//! decides when to stop (a signal in `main`, a token in tests) and awaits [`Gateway::stop`].
//!
//! # Layout
//! - [`config`] — the typed settings tree and its validation.
//! - [`control`] — TCP control sessions: TLS, authentication, heartbeats, presence.
//! - [`ingest`] — the UDP listener: size, header, device, tag, payload and replay checks.
//! - [`replay`] — the per-device sliding replay window (pure).
//! - [`store`] — SQLite: schema, devices and keys, the batched [`store::writer`], queries.
//! - [`events`] — counters and drop reasons, the names `gateway stats` shows.
//! - [`aggregate`] — windowed aggregation (the pure state machine so far).
//! - [`admin`] — the operator HTTP API (health, metrics, devices, commands).
//! - [`api`] — its query endpoints (readings, aggregates) and OpenAPI document.
//! - [`rows`] — query rows, their CSV/JSON/NDJSON encodings and downsampling (pure).
//! - [`cli`] — the command line verbs; `main.rs` only dispatches to them.
//! - [`demo`] — `gateway demo`, a gateway and a simulated fleet in one process.
//! - [`signal`] — SIGINT/SIGTERM.
//! - [`notify`] — readiness, watchdog and stopping notifications for systemd (`Type=notify`).
//!
//! # Shutdown
//! The sources (ingest and the control listener with its sessions) and the checkpoint helper
//! watch the cancellation token. When it stops it drops the queue's
//! sender; the writer then commits everything queued, sends the owed acks, persists the
//! counters and exits. [`Gateway::stop`] waits for that, bounded by the grace period.

pub mod admin;
pub mod aggregate;
pub mod api;
pub mod cli;
pub mod config;
pub mod control;
pub mod dashboard;
pub mod demo;
pub mod events;
pub mod ingest;
pub mod limit;
pub mod memory;
pub mod mqtt;
pub mod notify;
pub mod reload;
pub mod replay;
pub mod rows;
pub mod signal;
pub mod store;

use std::net::SocketAddr;
use std::sync::Arc;

use thiserror::Error;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::aggregate::window::Aggregator;
use crate::config::Config;
use crate::events::Counters;
use crate::store::writer::{OutboxLimits, Writer, WriterConfig};
use crate::store::{OpenOptions, Store, StoreError};

/// Why the gateway could not start.
#[derive(Debug, Error)]
pub enum StartupError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// The database could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// TLS could not be set up for the control listener.
    #[error("control TLS: {0}")]
    Tls(#[from] control::tls::TlsError),
    /// The MQTT TLS files are unusable.
    #[error(transparent)]
    MqttTls(#[from] mqtt::TlsSetupError),
    /// The UDP socket could not be bound.
    #[error("cannot bind UDP {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
}

/// A running gateway.
pub struct Gateway {
    /// Where the telemetry socket is bound (useful with port 0).
    pub udp_addr: SocketAddr,
    /// Where the control listener is bound.
    pub control_addr: SocketAddr,
    /// Whether control sessions use TLS.
    pub control_tls: bool,
    /// Where the admin API is bound.
    pub admin_addr: SocketAddr,
    /// Live control sessions.
    pub sessions: control::Registry,
    /// Control server counters.
    pub control_counters: Arc<control::ControlCounters>,
    /// Live counters.
    pub counters: Arc<Counters>,
    /// The store, for queries while running.
    pub store: Store,
    /// Broker connection state.
    pub mqtt: Arc<mqtt::MqttState>,
    cancel: CancellationToken,
    tracker: TaskTracker,
    grace: std::time::Duration,
    live: reload::Live,
    config: std::sync::Mutex<Config>,
}

impl Gateway {
    /// Opens the store, binds the socket and starts ingest and the writer.
    ///
    /// # Errors
    /// [`StartupError`] for an invalid config, an unusable database or a busy address.
    pub async fn start(cfg: &Config) -> Result<Gateway, StartupError> {
        cfg.validate()?;
        let mqtt_tls = if cfg.mqtt.enabled {
            mqtt::tls_config(&cfg.mqtt)?
        } else {
            None
        };
        let store = Store::open(&OpenOptions {
            path: cfg.store.path.clone(),
            durability: cfg.store.durability,
            // The writer sets its own (larger) cache below; every other connection serves
            // lookups and queries, which the OS page cache serves as well, so each of the pool's
            // connections would otherwise fill up to `cache_kib` as the database grows.
            cache_kib: store::READER_CACHE_KIB.min(cfg.store.cache_kib),
            create: true,
            background_checkpoint: true,
        })
        .await?;
        let devices = store.device_states().await?;
        let addr = cfg.telemetry.listen;
        let (socket, granted) = ingest::bind(addr, cfg.telemetry.recv_buffer)
            .map_err(|source| StartupError::Bind { addr, source })?;
        let udp_addr = socket
            .local_addr()
            .map_err(|source| StartupError::Bind { addr, source })?;
        if granted < cfg.telemetry.recv_buffer {
            tracing::warn!(
                requested = cfg.telemetry.recv_buffer,
                granted,
                "UDP receive buffer smaller than requested; raise net.core.rmem_max"
            );
        }
        let socket = Arc::new(socket);
        let counters = Arc::new(Counters::default());
        let control_tls = if cfg.control.tls {
            Some(control_tls_config(cfg)?)
        } else {
            tracing::warn!("control sessions use plain TCP (control.tls = false)");
            None
        };
        let caddr = cfg.control.listen;
        let control_listener = control::bind(caddr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: caddr,
                source,
            })?;
        let control_addr = control_listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: caddr,
                source,
            })?;
        let (tx, rx) = mpsc::channel(cfg.telemetry.queue.get());
        let cancel = CancellationToken::new();
        let tracker = TaskTracker::new();
        let wal_reset_wanted = Arc::new(std::sync::atomic::AtomicBool::new(false));
        store.outbox_init(cfg.mqtt.enabled).await?;
        // Blocks a previous run left in staging join the clustered table before anything
        // reads per device (the aggregator's restore below).
        let merged = store.merge_staging().await?;
        if merged > 0 {
            tracing::info!(blocks = merged, "merged staged blocks");
        }
        let aggregator = if cfg.aggregate.enabled {
            let mut agg = Aggregator::new(aggregate::aggregator_config(&cfg.aggregate));
            let ids: Vec<u32> = devices.iter().map(|d| d.id.0).collect();
            let replayed = store
                .restore_aggregator(&mut agg, &ids, store::now_ms().max(0) as u64)
                .await?;
            tracing::info!(
                replayed,
                open_windows = agg.open_windows(),
                "aggregation restored"
            );
            Some(agg)
        } else {
            None
        };
        let outbox_limits = cfg.mqtt.enabled.then_some(OutboxLimits {
            max_rows: cfg.mqtt.outbox_max_rows,
            max_bytes: cfg.mqtt.outbox_max_bytes,
        });
        let mut conn = store.pool().acquire().await.map_err(StoreError::from)?;
        // A number from the validated config: no injection possible.
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "PRAGMA cache_size = -{}",
            cfg.store.cache_kib
        )))
        .execute(&mut *conn)
        .await
        .map_err(StoreError::from)?;
        let writer = Writer::new(
            conn,
            rx,
            socket.clone(),
            counters.clone(),
            &devices,
            WriterConfig {
                batch_readings: cfg.store.batch_readings.get(),
                stats_interval: cfg.service.stats_interval,
                commit_delay: cfg.store.commit_delay,
                wal_reset_wanted: wal_reset_wanted.clone(),
                db_file: store::writer::DbFile::of(&cfg.store.path),
            },
            store.clone(),
            aggregator,
            outbox_limits,
        );
        tracing::info!(
            udp = %udp_addr,
            control = %cfg.control.listen,
            db = %cfg.store.path.display(),
            devices = devices.len(),
            durability = ?cfg.store.durability,
            "gateway started"
        );
        let forward_tx = tx.clone();
        match ingest::kernel_drops::KernelDrops::of(&*socket, udp_addr.is_ipv6()) {
            Some(reader) => {
                tracker.spawn(ingest::kernel_drops::watch(
                    reader,
                    counters.clone(),
                    cfg.service.stats_interval,
                    cancel.clone(),
                ));
            }
            None => tracing::info!("this system does not show socket drops: drop_kernel stays 0"),
        }
        let (device_changes, device_changes_rx) = mpsc::channel(64);
        let listener = ingest::Listener::new(
            socket,
            tx,
            counters.clone(),
            devices,
            store.clone(),
            cfg.service.stats_interval,
            tracker.clone(),
        )
        .with_auth_limit(limit::from_settings(
            cfg.telemetry.auth_failures_per_s,
            cfg.telemetry.auth_failures_burst,
        ))
        .with_changes(device_changes_rx);
        tracker.spawn(listener.run(cancel.clone()));
        let (presence_tx, presence_rx) = mpsc::channel(4096);
        tracker.spawn(control::presence::run(store.clone(), presence_rx));
        let sessions = control::Registry::default();
        let control_counters = Arc::new(control::ControlCounters::default());
        let server = control::ControlServer::new(
            control_listener,
            control_tls.clone(),
            cfg.control.clone(),
            store.clone(),
            presence_tx,
            control_counters.clone(),
            sessions.clone(),
            device_changes.clone(),
        );
        tracker.spawn(server.run(cancel.clone(), tracker.clone()));
        if cfg.service.return_memory {
            tracker.spawn(memory::run(
                control_counters.clone(),
                cfg.service.stats_interval,
                cancel.clone(),
            ));
        }
        let token = admin::load_or_create_token(
            cfg.admin.token.as_deref(),
            &config::token_file(&cfg.store.path),
        )
        .map_err(|source| StartupError::Bind {
            addr: cfg.admin.listen,
            source,
        })?;
        let aaddr = cfg.admin.listen;
        let admin_listener = admin::bind(aaddr)
            .await
            .map_err(|source| StartupError::Bind {
                addr: aaddr,
                source,
            })?;
        let admin_addr = admin_listener
            .local_addr()
            .map_err(|source| StartupError::Bind {
                addr: aaddr,
                source,
            })?;
        let max_points = Arc::new(std::sync::atomic::AtomicU64::new(cfg.admin.max_points));
        let admin_state = Arc::new(admin::AdminState {
            store: store.clone(),
            sessions: sessions.clone(),
            counters: counters.clone(),
            control: control_counters.clone(),
            token,
            files_dir: cfg.files_dir(),
            max_file_size: cfg.control.max_file_size,
            device_changes,
            control_tls: control_tls.is_some(),
            outbox_high_water: cfg
                .mqtt
                .enabled
                .then(|| cfg.mqtt.outbox_max_rows.saturating_mul(9) / 10),
            aggregate_windows: {
                let mut w: Vec<u64> = cfg
                    .aggregate
                    .windows
                    .iter()
                    .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
                    .collect();
                w.sort_unstable();
                w
            },
            max_points: max_points.clone(),
            stall_timeout: cfg.admin.stall_timeout,
            query_slots: Arc::new(tokio::sync::Semaphore::new(api::MAX_STREAMS)),
        });
        tracker.spawn(admin::serve(admin_listener, admin_state, cancel.clone()));
        tracker.spawn(store::checkpoint::run(
            store.pool().clone(),
            wal_reset_wanted,
            cancel.clone(),
        ));
        // Always running: a reload may turn retention on.
        let (retention_tx, retention_rx) =
            tokio::sync::watch::channel(reload::RetentionSettings::of(cfg));
        tracker.spawn(store::retention::run(
            store.clone(),
            retention_rx,
            counters.clone(),
            cancel.clone(),
        ));
        let mqtt_state = Arc::new(mqtt::MqttState::default());
        if cfg.mqtt.enabled {
            let forwarder = mqtt::Forwarder::new(
                cfg.mqtt.clone(),
                cfg.gateway_id(),
                store.clone(),
                forward_tx,
                counters.clone(),
                sessions.clone(),
                mqtt_state.clone(),
                mqtt_tls,
            );
            tracker.spawn(forwarder.run(cancel.clone()));
        } else {
            drop(forward_tx);
        }
        tracker.spawn(writer.run());
        Ok(Gateway {
            udp_addr,
            control_addr,
            control_tls: control_tls.is_some(),
            admin_addr,
            sessions,
            control_counters,
            counters,
            store,
            mqtt: mqtt_state,
            cancel,
            tracker,
            grace: cfg.service.shutdown_grace,
            live: reload::Live {
                retention: retention_tx,
                max_points,
            },
            config: std::sync::Mutex::new(cfg.clone()),
        })
    }

    /// Takes a new configuration (SIGHUP): applies what can change while running, logs every
    /// change and which wait for a restart, and returns them.
    ///
    /// # Errors
    /// When the settings that would run are invalid (nothing is changed then).
    pub fn reload(&self, new: &Config) -> Result<Vec<reload::Change>, config::ConfigError> {
        let mut running = self.config.lock().unwrap_or_else(|e| e.into_inner());
        self.live.apply(&mut running, new)
    }

    /// A token that stops the gateway when cancelled.
    pub fn cancel_token(&self) -> CancellationToken {
        self.cancel.clone()
    }

    /// Stops accepting datagrams, commits what is queued and waits for the tasks, at most the
    /// grace period. Returns false if the grace period ran out.
    pub async fn stop(self) -> bool {
        self.cancel.cancel();
        self.tracker.close();
        let done = tokio::time::timeout(self.grace, self.tracker.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(grace = ?self.grace, "shutdown grace period ran out");
        }
        // After a timeout a task may still hold a connection (a writer retrying a failed
        // commit): closing would wait for it forever, so give up after a moment.
        let wait = if done {
            self.grace
        } else {
            std::time::Duration::from_millis(500)
        };
        let _ = tokio::time::timeout(wait, self.store.close()).await;
        done
    }
}

/// The control listener's TLS configuration; creates a local CA and server certificate beside
/// the database when the default files are both missing.
fn control_tls_config(cfg: &Config) -> Result<Arc<rustls::ServerConfig>, StartupError> {
    let dir = cfg.certs_dir();
    let defaults = control::tls::CertFiles::in_dir(&dir);
    let cert = cfg
        .control
        .cert
        .clone()
        .unwrap_or(defaults.server_cert.clone());
    let key = cfg
        .control
        .key
        .clone()
        .unwrap_or(defaults.server_key.clone());
    if cfg.control.cert.is_none() && cfg.control.key.is_none() && !cert.exists() && !key.exists() {
        let files = control::tls::init_certs(&dir, &control::tls::default_hosts())?;
        tracing::info!(
            ca = %files.ca_cert.display(),
            "created a local CA and server certificate for control sessions; give devices the CA"
        );
    }
    Ok(control::tls::server_config(&cert, &key)?)
}
