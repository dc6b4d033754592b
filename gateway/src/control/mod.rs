//! The TCP control server: accepts device sessions (TLS 1.3 by default), authenticates them
//! with the challenge-response of `proto::control`, keeps one live session per device, answers
//! heartbeats and reports presence. Commands, configuration and files ride on the same sessions.
//!
//! Limits: a global session semaphore, a per-source-address count, a per-source-address budget
//! of failed connections ([`crate::limit`]), a deadline on TLS handshake
//! plus authentication together, a read deadline of `heartbeat × missed_heartbeats` afterwards,
//! and a maximum frame size checked on the length prefix before the body is buffered. A
//! connection over a limit is closed at once; one connection's slowness never delays another
//! (each runs in its own task).
//!
//! Emits: `debug` per session start and end, `warn` for accept errors.

pub mod presence;
pub mod queue;
pub mod session;
pub mod tls;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use proto::DeviceId;
use proto::control::GatewayMsg;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ControlConfig;
use crate::control::presence::Presence;
use crate::limit::AuthLimiter;
use crate::store::Store;

/// Counters of the control server.
#[derive(Debug, Default)]
pub struct ControlCounters {
    /// Sessions that authenticated.
    pub sessions_authenticated: AtomicU64,
    /// Connections closed for a limit (sessions, per address).
    pub rejected_busy: AtomicU64,
    /// Connections that failed TLS, timed out or sent bad frames before authenticating.
    pub rejected_handshake: AtomicU64,
    /// Authentications that failed (unknown device or wrong proof).
    pub rejected_auth: AtomicU64,
    /// Connections closed at accept because their source is limited for failed connections.
    pub rejected_limited: AtomicU64,
    /// Sessions replaced by a newer one of the same device.
    pub sessions_replaced: AtomicU64,
    /// Accepted connections that have ended, at any stage (handshake, authentication, session).
    pub connections_closed: AtomicU64,
    /// Connections admitted past the accept checks (each ends in `connections_closed`).
    pub connections_accepted: AtomicU64,
}

/// A live, authenticated session as the rest of the gateway sees it.
#[derive(Debug, Clone)]
pub struct SessionHandle {
    /// Unique per gateway run, to tell a session from its replacement.
    pub session: u64,
    /// Work for the session: messages to send, or a nudge to look for files.
    pub tx: queue::QueueSender,
    /// Ends the session.
    pub cancel: CancellationToken,
}

/// What the rest of the gateway hands a live session (through its [`queue`]).
#[derive(Debug, Clone)]
pub enum Outbound {
    /// Send this message.
    Msg(Box<GatewayMsg>),
    /// A file transfer was queued for the device: start it if idle.
    FilesPending,
    /// A key rotation was started for the device: send it the pending key.
    KeyPending,
}

/// Live sessions by device. A plain mutex: it is never held across an await.
pub type Registry = Arc<Mutex<HashMap<DeviceId, SessionHandle>>>;

/// Shared state of the control server and its sessions.
pub(crate) struct Shared {
    pub cfg: ControlConfig,
    pub store: Store,
    pub registry: Registry,
    pub presence: mpsc::Sender<Presence>,
    pub counters: Arc<ControlCounters>,
    pub per_ip: Mutex<HashMap<IpAddr, usize>>,
    pub next_session: AtomicU64,
    /// Database steps of session starts (key lookup, owed commands, configuration, files) wait
    /// here before they build their query. When thousands of devices connect at once, the
    /// waiting sessions then hold a few bytes each instead of a prepared query queued on the
    /// pool, which bounds the memory of a reconnect storm (glibc keeps a burst's freed memory).
    /// Never held while waiting for the device, so a slow device cannot hold it.
    pub start_gate: Semaphore,
    /// Failed connections per source address (None: no limit).
    pub auth_limit: Option<Mutex<AuthLimiter>>,
    /// Key changes for the ingest task (a confirmed rotation).
    pub device_changes: mpsc::Sender<crate::ingest::DeviceChange>,
}

impl Shared {
    /// Counts a connection from `ip` that failed before authenticating (TLS, timeout, frames,
    /// proof) against its source's budget.
    pub(crate) fn auth_failed(&self, ip: IpAddr) {
        if let Some(limit) = &self.auth_limit {
            let limited = limit
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .failed(ip, tokio::time::Instant::now());
            if limited {
                tracing::debug!(source = %ip, "source limited for failed connections");
            }
        }
    }

    fn is_limited(&self, ip: IpAddr) -> bool {
        self.auth_limit.as_ref().is_some_and(|limit| {
            limit
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_limited(ip, tokio::time::Instant::now())
        })
    }
}

/// Session-start database steps in flight at once (the read pool has a few connections).
const START_GATE: usize = 8;

/// Releases a per-address slot when a connection ends.
struct IpSlot<'a> {
    shared: &'a Shared,
    ip: IpAddr,
}

impl Drop for IpSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// The accept loop.
pub struct ControlServer {
    listener: TcpListener,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shared: Arc<Shared>,
    limit: Arc<Semaphore>,
}

impl ControlServer {
    /// A server on a bound `listener`; `tls` None serves plain TCP. Confirmed key rotations
    /// are told to the ingest task through `device_changes`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        listener: TcpListener,
        tls: Option<Arc<rustls::ServerConfig>>,
        cfg: ControlConfig,
        store: Store,
        presence: mpsc::Sender<Presence>,
        counters: Arc<ControlCounters>,
        registry: Registry,
        device_changes: mpsc::Sender<crate::ingest::DeviceChange>,
    ) -> Self {
        let limit = Arc::new(Semaphore::new(cfg.max_sessions.get()));
        let auth_limit =
            crate::limit::from_settings(cfg.auth_failures_per_s, cfg.auth_failures_burst)
                .map(Mutex::new);
        Self {
            listener,
            acceptor: tls.map(tokio_rustls::TlsAcceptor::from),
            shared: Arc::new(Shared {
                cfg,
                store,
                registry,
                presence,
                counters,
                per_ip: Mutex::new(HashMap::new()),
                next_session: AtomicU64::new(1),
                start_gate: Semaphore::new(START_GATE),
                auth_limit,
                device_changes,
            }),
            limit,
        }
    }

    /// Accepts until `cancel` fires; sessions run as tracked tasks with child tokens.
    pub async fn run(self, cancel: CancellationToken, tracker: TaskTracker) {
        let mut sweep = tokio::time::interval(std::time::Duration::from_secs(1));
        sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                _ = sweep.tick() => {
                    if let Some(limit) = &self.shared.auth_limit {
                        limit
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .sweep(tokio::time::Instant::now());
                    }
                    continue;
                }
                r = self.listener.accept() => match r {
                    Ok(x) => x,
                    Err(error) => {
                        // Per-connection errors (e.g. the peer reset before accept, or too many
                        // open files for a moment) never stop the listener.
                        tracing::warn!(%error, "accept failed");
                        continue;
                    }
                },
            };
            // A limited source costs an accept and a close: no TLS, no task, no slot.
            if self.shared.is_limited(peer.ip()) {
                self.shared.counters.rejected_limited.fetch_add(1, Relaxed);
                continue;
            }
            let Ok(permit) = self.limit.clone().try_acquire_owned() else {
                self.shared.counters.rejected_busy.fetch_add(1, Relaxed);
                continue; // dropping the stream closes it
            };
            {
                let mut map = self.shared.per_ip.lock().unwrap_or_else(|e| e.into_inner());
                let n = map.entry(peer.ip()).or_insert(0);
                if *n >= self.shared.cfg.max_sessions_per_ip.get() {
                    self.shared.counters.rejected_busy.fetch_add(1, Relaxed);
                    continue;
                }
                *n += 1;
            }
            let _ = stream.set_nodelay(true);
            self.shared
                .counters
                .connections_accepted
                .fetch_add(1, Relaxed);
            let shared = self.shared.clone();
            let acceptor = self.acceptor.clone();
            let session_cancel = cancel.child_token();
            tracker.spawn(async move {
                let _slot = IpSlot {
                    shared: &shared,
                    ip: peer.ip(),
                };
                session::serve(stream, peer, acceptor, &shared, session_cancel).await;
                shared.counters.connections_closed.fetch_add(1, Relaxed);
                drop(permit);
            });
        }
    }
}

/// Connections the kernel queues for accept. When thousands of devices reconnect at once (the
/// gateway restarted), a short queue overflows and the kernel drops their SYNs, which the
/// devices only retry after 1, 3, 7, 15 s...; the kernel caps this at `net.core.somaxconn`.
const LISTEN_BACKLOG: i32 = 4096;

/// Binds the control listener.
///
/// # Errors
/// When the address cannot be bound.
pub async fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    TcpListener::from_std(socket.into())
}

/// Whether `command` fits one control frame; a command that does not could never be
/// delivered (and would end every session of its device).
pub fn command_fits(command: &proto::control::Command) -> bool {
    let probe = GatewayMsg::Command {
        id: proto::control::CommandId(u64::MAX),
        command: command.clone(),
    };
    proto::control::encode_frame(&probe, proto::control::MAX_FRAME, &mut Vec::new()).is_ok()
}

/// Queues `command` for `devices` (stored first, so nothing is lost) and hands it at once to
/// the sessions of those online. Returns (device, id, handed to a live session).
///
/// # Errors
/// Driver errors.
pub async fn queue_command(
    store: &Store,
    sessions: &Registry,
    devices: &[DeviceId],
    command: &proto::control::Command,
    ttl_ms: i64,
    origin: Option<(&str, Option<&str>)>,
) -> Result<Vec<(DeviceId, proto::control::CommandId, bool)>, crate::store::StoreError> {
    let queued = store
        .enqueue_commands_from(
            devices,
            command,
            ttl_ms,
            origin.map(|o| o.0),
            origin.and_then(|o| o.1),
        )
        .await?;
    let mut out = Vec::with_capacity(queued.len());
    for (device, id) in queued {
        let handle = sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&device)
            .cloned();
        // Online: hand it to the session now. Offline or a full session queue: it stays queued
        // and the device gets it when it (re)connects.
        let online = handle.is_some_and(|h| {
            h.tx.try_send(Outbound::Msg(Box::new(GatewayMsg::Command {
                id,
                command: command.clone(),
            })))
            .is_ok()
        });
        out.push((device, id, online));
    }
    Ok(out)
}
