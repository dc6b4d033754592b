//! UDP telemetry ingest: reads datagrams, checks size, header, device, tag, payload and replay
//! window, and queues accepted datagrams for the writer on a bounded queue. Every rejected
//! datagram is counted by reason; nothing is answered before authentication.
//!
//! One task owns the socket and the per-device state, so the window check and the enqueue are
//! one step: a datagram is marked seen only once it is queued, and a queue-full drop leaves it
//! unseen for the device's retransmission.
//!
//! Emits: `debug` per drop (via [`Counters::dropped`]), a rate-limited `warn` summary of drops,
//! `info` when devices are reloaded and when it stops.

pub mod kernel_drops;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use proto::{Ack, Batch, Cipher, DecodeError, DeviceId, Header, MAX_DATAGRAM};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::events::{Counters, DropLog, DropReason};
use crate::limit::AuthLimiter;
use crate::replay::{ReplayWindow, Verdict};
use crate::store::writer::{Accepted, Item};
use crate::store::{DeviceState, Store};

/// Datagrams read per wake-up before the task checks its other duties.
const RECV_BURST: usize = 256;
/// Shortest time between two reloads of the device table caused by unknown device ids.
const RELOAD_EVERY: Duration = Duration::from_secs(1);
/// Latest device timestamp accepted: 9999-12-31T23:59:59.999Z, the last RFC 3339 can print.
pub const MAX_TS_MS: u64 = 253_402_300_799_999;
/// Time between summaries of drops in the log.
const DROP_LOG_EVERY: Duration = Duration::from_secs(10);

struct Device {
    cipher: Cipher,
    /// A rotated key the device has not confirmed yet: tried when `cipher` fails.
    next: Option<Cipher>,
    window: ReplayWindow,
    /// Rejected datagrams not yet reported to the writer.
    rejected: u64,
    /// Where its newest accepted datagram came from: duplicates are re-acked only there.
    last_peer: Option<SocketAddr>,
}

impl Device {
    fn new(d: DeviceState) -> Self {
        Self {
            cipher: d.key.cipher(),
            next: d.next_key.as_ref().map(proto::DeviceKey::cipher),
            window: d.window,
            rejected: 0,
            last_peer: None,
        }
    }
}

/// Changes to devices that the ingest task applies at once (sent by the admin API).
#[derive(Debug)]
pub enum DeviceChange {
    /// Refuse the device's datagrams from now on (counted as `revoked`).
    Revoke(DeviceId),
    /// A key rotation started: accept this key beside the current one.
    NextKey(DeviceId, proto::DeviceKey),
    /// The device confirmed its new key: only this key from now on.
    KeyConfirmed(DeviceId, proto::DeviceKey),
}

/// The ingest task.
pub struct Listener {
    socket: Arc<UdpSocket>,
    tx: mpsc::Sender<Item>,
    counters: Arc<Counters>,
    devices: HashMap<DeviceId, Device>,
    store: Store,
    report_every: Duration,
    tracker: TaskTracker,
    limiter: Option<AuthLimiter>,
    /// Revoked devices: their datagrams are dropped without a reload of the device table.
    revoked: std::collections::HashSet<DeviceId>,
    changes: Option<mpsc::Receiver<DeviceChange>>,
    /// When a source was last logged as limited (at most one such line per [`DROP_LOG_EVERY`]).
    limited_logged: Option<tokio::time::Instant>,
}

impl Listener {
    /// A listener on `socket` that knows `devices` and queues into `tx`.
    pub fn new(
        socket: Arc<UdpSocket>,
        tx: mpsc::Sender<Item>,
        counters: Arc<Counters>,
        devices: Vec<DeviceState>,
        store: Store,
        report_every: Duration,
        tracker: TaskTracker,
    ) -> Self {
        let revoked = devices.iter().filter(|d| d.revoked).map(|d| d.id).collect();
        let devices = devices
            .into_iter()
            .filter(|d| !d.revoked)
            .map(|d| (d.id, Device::new(d)))
            .collect();
        Self {
            socket,
            tx,
            counters,
            devices,
            store,
            report_every,
            tracker,
            limiter: None,
            revoked,
            changes: None,
            limited_logged: None,
        }
    }

    /// Takes device changes (revocations) from `rx`.
    pub fn with_changes(mut self, rx: mpsc::Receiver<DeviceChange>) -> Self {
        self.changes = Some(rx);
        self
    }

    fn apply(&mut self, change: DeviceChange) {
        match change {
            DeviceChange::Revoke(id) => {
                self.devices.remove(&id);
                self.revoked.insert(id);
                tracing::info!(device = id.0, "device revoked: its datagrams are refused");
            }
            DeviceChange::NextKey(id, key) => {
                if let Some(d) = self.devices.get_mut(&id) {
                    d.next = Some(key.cipher());
                }
            }
            DeviceChange::KeyConfirmed(id, key) => {
                if let Some(d) = self.devices.get_mut(&id) {
                    d.cipher = key.cipher();
                    d.next = None;
                    tracing::info!(device = id.0, "new key confirmed: the old one is refused");
                }
            }
        }
    }

    /// Limits failed authentications per source address (see [`crate::limit`]).
    pub fn with_auth_limit(mut self, limiter: Option<AuthLimiter>) -> Self {
        self.limiter = limiter;
        self
    }

    /// Counts a failed authentication from `peer` against its source's budget.
    fn auth_failed(&mut self, peer: SocketAddr) {
        let Some(limiter) = self.limiter.as_mut() else {
            return;
        };
        let now = tokio::time::Instant::now();
        if limiter.failed(peer.ip(), now)
            && self
                .limited_logged
                .is_none_or(|t| now.duration_since(t) >= DROP_LOG_EVERY)
        {
            self.limited_logged = Some(now);
            tracing::warn!(
                source = %peer.ip(),
                limited_sources = limiter.limited_sources(),
                "source limited for failed authentications: its datagrams are dropped unchecked"
            );
        }
    }

    /// Runs until `cancel` fires; then returns, dropping its queue sender so the writer drains.
    ///
    /// # Cancel safety
    /// Stops between datagrams; a datagram already read is handled before stopping.
    #[tracing::instrument(name = "ingest", skip_all, fields(addr = ?self.socket.local_addr().ok()))]
    pub async fn run(mut self, cancel: CancellationToken) {
        // One extra byte tells an oversized datagram from a maximal one.
        let mut buf = vec![0u8; MAX_DATAGRAM + 1];
        let mut report = tokio::time::interval(self.report_every);
        report.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut drop_log = DropLog::new(DROP_LOG_EVERY, Instant::now());
        let mut reload_wanted = false;
        let mut last_reload: Option<Instant> = None;
        let (reload_tx, mut reload_rx) = mpsc::channel::<Vec<DeviceState>>(1);
        let mut reloading = false;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => break,
                Some(states) = reload_rx.recv() => {
                    reloading = false;
                    self.add_devices(states);
                }
                Some(change) = async {
                    match self.changes.as_mut() {
                        Some(rx) => rx.recv().await,
                        None => std::future::pending().await,
                    }
                } => self.apply(change),
                _ = report.tick() => {
                    self.report_rejected();
                    if let Some(limiter) = self.limiter.as_mut() {
                        limiter.sweep(tokio::time::Instant::now());
                    }
                    drop_log.maybe_log(&self.counters, Instant::now());
                }
                r = self.socket.recv_from(&mut buf) => {
                    let mut next = Some(r);
                    let mut n = 0;
                    while let Some(r) = next.take() {
                        match r {
                            Ok((len, peer)) => {
                                if self.handle(&mut buf[..len], peer) {
                                    reload_wanted = true;
                                }
                            }
                            Err(error) => {
                                // Errors such as ICMP port unreachable reports are per
                                // datagram; the socket stays usable.
                                tracing::debug!(%error, "recv failed");
                            }
                        }
                        n += 1;
                        if n < RECV_BURST {
                            match self.socket.try_recv_from(&mut buf) {
                                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                                r => next = Some(r),
                            }
                        }
                    }
                }
            }
            if reload_wanted
                && !reloading
                && last_reload.is_none_or(|t| t.elapsed() >= RELOAD_EVERY)
            {
                reload_wanted = false;
                reloading = true;
                last_reload = Some(Instant::now());
                let store = self.store.clone();
                let tx = reload_tx.clone();
                // A short-lived query task, tracked; at most one is in flight.
                self.tracker.spawn(async move {
                    match store.device_states().await {
                        Ok(states) => {
                            let _ = tx.send(states).await;
                        }
                        Err(error) => {
                            tracing::warn!(%error, "device reload failed");
                            let _ = tx.send(Vec::new()).await;
                        }
                    }
                });
            }
        }
        self.report_rejected();
        drop_log.maybe_log(&self.counters, Instant::now() + DROP_LOG_EVERY);
        tracing::info!("ingest stopped");
    }

    /// Learns devices provisioned since start; known devices keep their live state.
    fn add_devices(&mut self, states: Vec<DeviceState>) {
        let mut added = 0;
        for d in states {
            if d.revoked {
                if self.revoked.insert(d.id) {
                    self.devices.remove(&d.id);
                }
                continue;
            }
            self.devices.entry(d.id).or_insert_with(|| {
                added += 1;
                Device::new(d)
            });
        }
        if added > 0 {
            tracing::info!(added, "devices loaded");
        }
    }

    /// Hands per-device rejected counts to the writer; kept for next time if the queue is full.
    fn report_rejected(&mut self) {
        let list: Vec<(DeviceId, u64)> = self
            .devices
            .iter()
            .filter(|(_, d)| d.rejected > 0)
            .map(|(id, d)| (*id, d.rejected))
            .collect();
        if list.is_empty() {
            return;
        }
        if self.tx.try_send(Item::Rejected(list)).is_ok() {
            for d in self.devices.values_mut() {
                d.rejected = 0;
            }
        }
    }

    /// Handles one datagram. Returns true when it named an unknown device (a reload may help).
    fn handle(&mut self, datagram: &mut [u8], peer: SocketAddr) -> bool {
        let received = Instant::now();
        self.counters.datagrams_received.fetch_add(1, Relaxed);
        if let Some(limiter) = self.limiter.as_mut()
            && limiter.is_limited(peer.ip(), received)
        {
            self.counters.dropped(DropReason::AuthLimited);
            return false;
        }
        let header = match Header::peek(datagram) {
            Ok(h) => h,
            Err(e) => {
                self.counters.dropped(DropReason::from(&e));
                return false;
            }
        };
        let Some(device) = self.devices.get_mut(&header.device) else {
            if self.revoked.contains(&header.device) {
                self.counters.dropped(DropReason::Revoked);
                return false;
            }
            self.counters.dropped(DropReason::UnknownDevice);
            return true;
        };
        // While a rotation waits, the new key is tried when the current one fails (opening
        // checks the tag before it decrypts, so a failed attempt leaves the datagram as it was).
        let mut opened = Batch::open(datagram, &device.cipher).map(|(_, b)| (b, false));
        if opened == Err(DecodeError::BadTag)
            && let Some(next) = &device.next
        {
            opened = Batch::open(datagram, next).map(|(_, b)| (b, true));
        }
        let (batch, under_next) = match opened {
            Ok(x) => x,
            Err(e) => {
                device.rejected += 1;
                self.counters.dropped(DropReason::from(&e));
                if e == DecodeError::BadTag {
                    self.auth_failed(peer);
                }
                return false;
            }
        };
        // Timestamps must be printable as RFC 3339 (years up to 9999).
        if batch.readings.iter().any(|r| r.ts.0 > MAX_TS_MS) {
            device.rejected += 1;
            self.counters
                .dropped(DropReason::from(&DecodeError::BadPayload));
            return false;
        }
        // The ack is sealed with the key the datagram came under.
        let ack = || {
            let cipher = match (&device.next, under_next) {
                (Some(next), true) => next,
                _ => &device.cipher,
            };
            header.flags.ack_requested().then(|| {
                Ack {
                    device: header.device,
                    seq: header.seq,
                }
                .seal(cipher)
            })
        };
        match device.window.check(header.seq.0) {
            Verdict::TooOld => {
                device.rejected += 1;
                self.counters.dropped(DropReason::Replay);
                if device.last_peer != Some(peer) {
                    self.auth_failed(peer);
                }
            }
            Verdict::Duplicate => {
                device.rejected += 1;
                self.counters.dropped(DropReason::Duplicate);
                // Re-acked only to where the device's newest datagram came from (or anywhere
                // until it has sent one since the start): a captured datagram replayed from
                // elsewhere gets no answer, and counts as a failed authentication there.
                if device.last_peer.is_some_and(|p| p != peer) {
                    self.auth_failed(peer);
                    return false;
                }
                // The original is committed or queued ahead of this: ack after it commits.
                // If the queue is full the device simply retransmits later.
                if let Some(ack) = ack() {
                    let _ = self.tx.try_send(Item::Reack { peer, ack });
                }
            }
            Verdict::New => {
                let item = Item::Datagram(Accepted {
                    device: header.device,
                    seq: header.seq,
                    peer,
                    ack: ack(),
                    readings: batch.readings,
                    received,
                });
                match self.tx.try_send(item) {
                    Ok(()) => {
                        device.window.mark(header.seq.0);
                        device.last_peer = Some(peer);
                        self.counters.datagrams_accepted.fetch_add(1, Relaxed);
                    }
                    // Closed happens only during shutdown. Either way the datagram is not acked
                    // and stays unseen, so the device's retransmission is accepted later.
                    Err(_) => self.counters.dropped(DropReason::QueueFull),
                }
            }
        }
        false
    }
}

/// Binds the telemetry socket with the requested receive buffer; returns it and the buffer
/// size the kernel granted.
///
/// # Errors
/// Socket creation, option or bind errors.
pub fn bind(addr: SocketAddr, recv_buffer: usize) -> std::io::Result<(UdpSocket, usize)> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps it at net.core.rmem_max; we report what we got.
    let _ = socket.set_recv_buffer_size(recv_buffer);
    let granted = socket.recv_buffer_size().unwrap_or(0);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    let socket = UdpSocket::from_std(socket.into())?;
    Ok((socket, granted))
}
