//! The service manager's notification protocol (systemd `Type=notify`): `READY=1` once every
//! listener is bound and the database is open, `WATCHDOG=1` at half the watchdog interval while
//! the writer keeps committing or has nothing to commit, `STOPPING=1` when shutdown begins.
//!
//! The protocol is one datagram per message to the Unix socket named by `$NOTIFY_SOCKET` (a
//! path, or an abstract name written with a leading `@`). Without that variable every call
//! does nothing, so the gateway runs the same outside systemd.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

/// A handle on the notification socket, if the service manager gave one.
#[derive(Debug)]
pub struct Notifier {
    socket: Option<(UnixDatagram, std::os::unix::net::SocketAddr)>,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`; a socket that cannot be reached is logged and ignored.
    pub fn from_env() -> Self {
        let Some(name) = std::env::var_os("NOTIFY_SOCKET") else {
            return Self { socket: None };
        };
        let target = {
            use std::os::unix::ffi::OsStrExt;
            let bytes = name.as_bytes();
            match bytes.strip_prefix(b"@") {
                Some(abstract_name) => {
                    use std::os::linux::net::SocketAddrExt;
                    std::os::unix::net::SocketAddr::from_abstract_name(abstract_name)
                }
                None => std::os::unix::net::SocketAddr::from_pathname(std::path::Path::new(&name)),
            }
        };
        match (UnixDatagram::unbound(), target) {
            (Ok(s), Ok(addr)) => Self {
                socket: Some((s, addr)),
            },
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!(error = %e, "NOTIFY_SOCKET is set but unusable; not notifying");
                Self { socket: None }
            }
        }
    }

    /// Sends one message (e.g. `READY=1`); failures are logged once per call, never fatal.
    pub fn send(&self, msg: &str) {
        if let Some((s, addr)) = &self.socket
            && let Err(error) = s.send_to_addr(msg.as_bytes(), addr)
        {
            tracing::warn!(%error, msg, "service manager notification failed");
        }
    }

    /// Half the watchdog interval the service manager asked for (`$WATCHDOG_USEC`, for this
    /// process when `$WATCHDOG_PID` names it or is absent).
    pub fn watchdog_period(&self) -> Option<Duration> {
        self.socket.as_ref()?;
        if let Some(pid) = std::env::var("WATCHDOG_PID").ok()
            && pid.trim() != std::process::id().to_string()
        {
            return None;
        }
        let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.trim().parse().ok()?;
        (usec > 0).then(|| Duration::from_micros(usec / 2))
    }
}

/// Pings the watchdog every `period` while `alive()` holds, until `cancel` fires.
pub async fn watchdog(
    notifier: std::sync::Arc<Notifier>,
    period: Duration,
    alive: impl Fn() -> bool + Send + 'static,
    cancel: tokio_util::sync::CancellationToken,
) {
    let mut tick = tokio::time::interval(period);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if alive() {
            notifier.send("WATCHDOG=1");
        } else {
            tracing::warn!("writer stalled: watchdog not pinged");
        }
    }
}

/// Whether the writer is going round: it finished a commit or an idle tick within `limit`, or
/// its commits fail for a reason a restart would not cure (disk full, read-only database:
/// `/healthz` reports those, and a restart loop would only add noise).
pub fn writer_alive(
    counters: std::sync::Arc<crate::events::Counters>,
    limit: Duration,
) -> impl Fn() -> bool + Send {
    use std::sync::atomic::Ordering::Relaxed;
    move || {
        let failing = counters
            .store_error
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_some();
        let beat = counters.writer_heartbeat_ms.load(Relaxed);
        let now = crate::store::now_ms().max(0) as u64;
        failing || now.saturating_sub(beat) <= limit.as_millis() as u64
    }
}
