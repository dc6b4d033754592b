//! One control connection: TLS handshake, authentication, then the session loop (heartbeats,
//! outgoing messages) until the device leaves, misses its heartbeats, is replaced by a newer
//! session, or the gateway stops.
//!
//! Emits: `debug` when a session starts and ends.

use std::net::SocketAddr;
use std::sync::atomic::Ordering::Relaxed;

use proto::DeviceId;
use proto::control::{
    CommandOutcome, DenyReason, DeviceMsg, GatewayMsg, MAX_FRAME, TLS_EXPORTER_LABEL, decode_frame,
    encode_frame, verify_proof, verify_rotation,
};
use proto::control::{MAX_CHUNK, TransferId};
use rand::RngCore;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::{Instant, timeout, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::control::presence::Presence;
use crate::control::{Outbound, SessionHandle, Shared};
use crate::store::commands::CommandStatus;
use crate::store::config::ConfigJson;
use crate::store::files::PendingTransfer;

/// Why a connection or session ended.
#[derive(Debug)]
enum End {
    /// The peer closed the connection.
    Closed,
    /// A read or write failed, or a frame was invalid.
    Error,
}

/// Framed reading and writing of control messages over any byte stream.
///
/// Memory: a session spends nearly all its life waiting for a heartbeat, so both buffers start
/// empty, grow only as far as the frames in flight need, and are released once they are empty
/// again and larger than [`KEEP_BUFFER`] (a file chunk, say).
pub(crate) struct Conn<S> {
    io: S,
    buf: Vec<u8>,
    out: Vec<u8>,
    max: usize,
    /// A peer that does not read for this long fails the write (it cannot hang the session).
    write_timeout: std::time::Duration,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    pub(crate) fn new(io: S, max: usize, write_timeout: std::time::Duration) -> Self {
        Self {
            io,
            buf: Vec::new(),
            out: Vec::new(),
            max,
            write_timeout,
        }
    }

    /// Reads the next message; `Ok(None)` when the peer closed cleanly.
    ///
    /// # Cancel safety
    /// Cancel safe: bytes already read stay buffered for the next call.
    async fn read(&mut self) -> Result<Option<DeviceMsg>, End> {
        loop {
            match decode_frame::<DeviceMsg>(&self.buf, self.max) {
                Ok(Some((msg, used))) => {
                    self.buf.drain(..used);
                    if self.buf.is_empty() && self.buf.capacity() > KEEP_BUFFER {
                        self.buf = Vec::new();
                    }
                    return Ok(Some(msg));
                }
                Ok(None) => {}
                Err(_) => return Err(End::Error),
            }
            // Never buffer more than one maximal frame.
            if self.buf.len() > self.max + proto::control::LEN_PREFIX {
                return Err(End::Error);
            }
            // Room for a heartbeat-sized read; a larger frame doubles it as it arrives.
            if self.buf.capacity() - self.buf.len() < READ_ROOM {
                self.buf.reserve(self.buf.len().max(READ_ROOM));
            }
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) if self.buf.is_empty() => return Ok(None),
                Ok(0) => return Err(End::Closed),
                Ok(_) => {}
                Err(_) => return Err(End::Error),
            }
        }
    }

    async fn write(&mut self, msg: &GatewayMsg) -> Result<(), End> {
        self.out.clear();
        encode_frame(msg, MAX_FRAME, &mut self.out).map_err(|_| End::Error)?;
        let io = &mut self.io;
        let out = &self.out;
        let write = async move {
            io.write_all(out).await?;
            io.flush().await
        };
        let r = match timeout(self.write_timeout, write).await {
            Ok(Ok(())) => Ok(()),
            _ => Err(End::Error),
        };
        if self.out.capacity() > KEEP_BUFFER {
            self.out = Vec::new();
        }
        r
    }
}

/// Messages and nudges waiting for one session at most; more are refused (a command then
/// stays queued in the database for the next session).
const SESSION_QUEUE: usize = 64;

/// Free room a read asks for.
const READ_ROOM: usize = 256;
/// Largest buffer a resting session keeps.
const KEEP_BUFFER: usize = 4096;

/// How long a write may wait for a peer that does not read: the session's idle time.
fn write_timeout(shared: &Shared) -> std::time::Duration {
    shared
        .cfg
        .heartbeat
        .saturating_mul(shared.cfg.missed_heartbeats)
}

/// Serves one accepted connection to its end.
pub(crate) async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: Option<tokio_rustls::TlsAcceptor>,
    shared: &Shared,
    cancel: CancellationToken,
) {
    let deadline = Instant::now() + shared.cfg.handshake_timeout;
    match acceptor {
        Some(acceptor) => {
            // The TLS state is boxed and the handshake runs in its own (boxed) future: inline,
            // the state would also be laid out in this future beside the session's, and every
            // idle session keeps this future for its whole life.
            let Some((tls, binding)) = Box::pin(tls_accept(
                stream, peer, acceptor, deadline, shared, &cancel,
            ))
            .await
            else {
                return;
            };
            session(
                Conn::new(tls, MAX_FRAME, write_timeout(shared)),
                peer,
                &binding,
                deadline,
                shared,
                cancel,
            )
            .await;
        }
        None => {
            session(
                Conn::new(stream, MAX_FRAME, write_timeout(shared)),
                peer,
                &[],
                deadline,
                shared,
                cancel,
            )
            .await
        }
    }
}

/// The TLS handshake and the session binding (exported keying material); None when it failed
/// or timed out (counted) or the gateway is stopping.
async fn tls_accept(
    stream: TcpStream,
    peer: SocketAddr,
    acceptor: tokio_rustls::TlsAcceptor,
    deadline: Instant,
    shared: &Shared,
    cancel: &CancellationToken,
) -> Option<(Box<tokio_rustls::server::TlsStream<TcpStream>>, [u8; 32])> {
    let failed = || {
        shared.counters.rejected_handshake.fetch_add(1, Relaxed);
        shared.auth_failed(peer.ip());
        None
    };
    // First the whole ClientHello, which costs us nothing but a read buffer; a connection that
    // never sends one holds no handshake slot.
    let hello = rustls::server::Acceptor::default();
    let start = tokio::select! {
        _ = cancel.cancelled() => return None,
        r = timeout_at(deadline, tokio_rustls::LazyConfigAcceptor::new(hello, stream)) => match r {
            Ok(Ok(start)) => start,
            _ => return failed(),
        },
    };
    // Then the expensive part: rustls answers the ClientHello (key exchange, certificate
    // signature) synchronously, right here, before the first await. What follows is waiting
    // for the client's Finished, which holds nothing shared: a client that stalls after its
    // ClientHello costs one signature and its connection until the deadline, and cannot hold
    // up anyone else's handshake.
    let accept = start.into_stream(acceptor.config().clone());
    let tls = tokio::select! {
        _ = cancel.cancelled() => return None,
        r = timeout_at(deadline, accept) => match r {
            Ok(Ok(tls)) => tls,
            _ => return failed(),
        },
    };
    let mut binding = [0u8; 32];
    if tls
        .get_ref()
        .1
        .export_keying_material(&mut binding, TLS_EXPORTER_LABEL, None)
        .is_err()
    {
        return failed();
    }
    Some((Box::new(tls), binding))
}

/// Runs one database step of a session start once the start gate lets it (see
/// [`Shared::start_gate`]).
async fn gated<T>(shared: &Shared, step: impl std::future::Future<Output = T>) -> T {
    let _gate = shared.start_gate.acquire().await;
    step.await
}

/// The device proved that it holds the rotated key of `version`: stored as its key, and the
/// ingest task told to refuse the old one.
async fn confirm_rotation(shared: &Shared, device: DeviceId, version: u32, key: &proto::DeviceKey) {
    match Box::pin(shared.store.confirm_rotation(device, version)).await {
        Ok(true) => {
            let _ = shared
                .device_changes
                .send(crate::ingest::DeviceChange::KeyConfirmed(
                    device,
                    key.clone(),
                ))
                .await;
            tracing::info!(device = device.0, version, "device confirmed its new key");
        }
        // Already confirmed (a resent answer), or a newer rotation replaced it.
        Ok(false) => {}
        // Stays pending: both keys keep working and the next session confirms it.
        Err(error) => tracing::warn!(device = device.0, %error, "could not store a confirmed key"),
    }
}

/// Sends the device its pending rotated key, if one waits and the session runs over TLS (a
/// key is never sent in the clear). Returns the rotation now in flight, and false when the
/// write failed.
async fn offer_key<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    device: DeviceId,
    binding: &[u8],
    shared: &Shared,
) -> (Option<(u32, proto::DeviceKey)>, bool) {
    if binding.is_empty() {
        return (None, true);
    }
    let Ok(Some(keys)) = Box::pin(gated(shared, shared.store.device_keys(device))).await else {
        return (None, true);
    };
    let Some(next) = keys.next else {
        return (None, true);
    };
    let version = keys.version.saturating_add(1);
    let ok = conn
        .write(&GatewayMsg::RotateKey {
            version,
            key: next.0,
        })
        .await
        .is_ok();
    (Some((version, next)), ok)
}

/// Authenticates; returns the device or None (already counted and answered).
async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
    conn: &mut Conn<S>,
    peer: SocketAddr,
    binding: &[u8],
    shared: &Shared,
) -> Option<DeviceId> {
    let Ok(Some(DeviceMsg::Hello {
        device,
        client_nonce,
    })) = conn.read().await
    else {
        shared.counters.rejected_handshake.fetch_add(1, Relaxed);
        shared.auth_failed(peer.ip());
        return None;
    };
    let mut server_nonce = [0u8; 32];
    rand::rng().fill_bytes(&mut server_nonce);
    conn.write(&GatewayMsg::Challenge { server_nonce })
        .await
        .ok()?;
    let Ok(Some(DeviceMsg::Auth { proof })) = conn.read().await else {
        shared.counters.rejected_handshake.fetch_add(1, Relaxed);
        shared.auth_failed(peer.ip());
        return None;
    };
    let keys = gated(shared, shared.store.device_keys(device))
        .await
        .ok()
        .flatten();
    let verify = |key| verify_proof(key, device, &client_nonce, &server_nonce, binding, &proof);
    let ok = match &keys {
        None => false,
        Some(k) if verify(&k.key) => true,
        // Authenticating with a pending rotated key proves the device holds it (its
        // `KeyRotated` answer was lost): the rotation is confirmed now.
        Some(k) => match &k.next {
            Some(next) if verify(next) => {
                confirm_rotation(shared, device, k.version.saturating_add(1), next).await;
                true
            }
            _ => false,
        },
    };
    if !ok {
        shared.counters.rejected_auth.fetch_add(1, Relaxed);
        shared.auth_failed(peer.ip());
        let _ = conn
            .write(&GatewayMsg::Denied {
                reason: DenyReason::AuthFailed,
            })
            .await;
        return None;
    }
    Some(device)
}

async fn session<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    peer: SocketAddr,
    binding: &[u8],
    deadline: Instant,
    shared: &Shared,
    cancel: CancellationToken,
) {
    let device = tokio::select! {
        _ = cancel.cancelled() => return,
        r = timeout_at(deadline, Box::pin(authenticate(&mut conn, peer, binding, shared))) => match r {
            Ok(Some(device)) => device,
            Ok(None) => return,
            Err(_) => {
                shared.counters.rejected_handshake.fetch_add(1, Relaxed);
                shared.auth_failed(peer.ip());
                return;
            }
        },
    };
    shared.counters.sessions_authenticated.fetch_add(1, Relaxed);
    let session = shared.next_session.fetch_add(1, Relaxed);
    let (tx, mut rx) = crate::control::queue::queue(SESSION_QUEUE);
    let replaced = {
        let mut map = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        map.insert(
            device,
            SessionHandle {
                session,
                tx,
                cancel: cancel.clone(),
            },
        )
    };
    if let Some(old) = replaced {
        shared.counters.sessions_replaced.fetch_add(1, Relaxed);
        old.cancel.cancel();
    }
    let _ = shared.presence.send(Presence::Online(device)).await;
    tracing::debug!(device = device.0, %peer, session, "session started");
    let heartbeat = shared.cfg.heartbeat;
    let idle = write_timeout(shared);
    let mut reason = "closed";
    let welcomed = conn
        .write(&GatewayMsg::Welcome {
            heartbeat_ms: heartbeat.as_millis().min(u128::from(u32::MAX)) as u32,
        })
        .await
        .is_ok();
    // Commands owed to the device (queued while it was away, or sent without an answer).
    let owed = if welcomed {
        Box::pin(gated(shared, shared.store.pending_commands(device)))
            .await
            .unwrap_or_default()
    } else {
        Vec::new()
    };
    let mut delivered = welcomed;
    // The desired configuration, if the operator set one.
    if delivered
        && let Ok(pair) = Box::pin(gated(shared, shared.store.device_config(device))).await
        && let Some(desired) = &pair.desired
        && conn
            .write(&GatewayMsg::Config {
                config: desired.into(),
            })
            .await
            .is_err()
    {
        delivered = false;
    }
    for (id, command) in owed {
        if conn
            .write(&GatewayMsg::Command { id, command })
            .await
            .is_err()
        {
            delivered = false;
            break;
        }
        let _ = Box::pin(shared.store.command_sent(id)).await;
    }
    let mut files = Files::default();
    if delivered && !Box::pin(files.start(&mut conn, device, shared)).await {
        delivered = false;
    }
    // A key rotation waiting for this device.
    let mut rotation = None;
    if delivered {
        let (offered, ok) = offer_key(&mut conn, device, binding, shared).await;
        rotation = offered;
        delivered = ok;
    }
    if !delivered {
        reason = "error";
    } else {
        let mut last_seen = Instant::now();
        // Reset only when a frame arrives: outbound traffic does not keep a silent device alive.
        let mut silent_until = Instant::now() + idle;
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    reason = "shutdown";
                    break;
                }
                out = rx.recv() => {
                    let ok = match out {
                        Outbound::Msg(out) => {
                            let ok = conn.write(&out).await.is_ok();
                            if let (true, GatewayMsg::Command { id, .. }) = (ok, &*out) {
                                let _ = Box::pin(shared.store.command_sent(*id)).await;
                            }
                            ok
                        }
                        Outbound::FilesPending => {
                            Box::pin(files.start(&mut conn, device, shared)).await
                        }
                        Outbound::KeyPending => {
                            let (offered, ok) = offer_key(&mut conn, device, binding, shared).await;
                            if offered.is_some() {
                                rotation = offered;
                            }
                            ok
                        }
                    };
                    if !ok {
                        reason = "error";
                        break;
                    }
                }
                _ = tokio::time::sleep_until(silent_until) => {
                    reason = "timeout";
                    break;
                }
                msg = conn.read() => match msg {
                    Ok(None) | Err(End::Closed) => break,
                    Err(End::Error) => {
                        reason = "error";
                        break;
                    }
                    Ok(Some(msg)) => {
                        silent_until = Instant::now() + idle;
                        if last_seen.elapsed() >= heartbeat {
                            last_seen = Instant::now();
                            let _ = shared.presence.send(Presence::Seen(device)).await;
                        }
                        match msg {
                            DeviceMsg::Heartbeat
                                if conn.write(&GatewayMsg::HeartbeatAck).await.is_err() =>
                            {
                                reason = "error";
                                break;
                            }
                            DeviceMsg::FileAck { transfer, offset }
                                if !Box::pin(files.on_ack(&mut conn, device, shared, transfer, offset)).await =>
                            {
                                reason = "error";
                                break;
                            }
                            DeviceMsg::FileDone { transfer, sha256, ok }
                                if !Box::pin(files.on_done(&mut conn, device, shared, transfer, sha256, ok)).await =>
                            {
                                reason = "error";
                                break;
                            }
                            DeviceMsg::ConfigReport { config } => {
                                // Written in the presence task's next batch: a whole fleet
                                // reporting on connect costs a few transactions.
                                if let Ok(json) = serde_json::to_string(&ConfigJson::from(&config)) {
                                    let _ = shared.presence.send(Presence::Reported(device, json)).await;
                                }
                            }
                            DeviceMsg::CommandResult { id, outcome, detail } => {
                                let (status, what) = match outcome {
                                    CommandOutcome::Done => (CommandStatus::Acknowledged, "done"),
                                    CommandOutcome::Duplicate => {
                                        (CommandStatus::Acknowledged, "duplicate")
                                    }
                                    CommandOutcome::Failed => (CommandStatus::Failed, "failed"),
                                };
                                let text = if detail.is_empty() {
                                    what.to_owned()
                                } else {
                                    format!("{what}: {detail}")
                                };
                                let _ = Box::pin(shared.store.command_answered(device, id, status, &text)).await;
                            }
                            DeviceMsg::KeyRotated { version, proof } => {
                                match rotation.take() {
                                    Some((v, key)) if v == version && verify_rotation(&key, device, version, binding, &proof) => {
                                        confirm_rotation(shared, device, version, &key).await;
                                    }
                                    other => {
                                        // The pending key stays; both keys keep working.
                                        tracing::warn!(device = device.0, version, "key rotation answer does not prove the key sent");
                                        rotation = other;
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                },
            }
        }
    }
    // Remove ourselves and queue the offline event under the registry lock, so a newer
    // session's online event (queued after it takes the lock) always comes after ours.
    let (still_ours, queued) = {
        let mut map = shared.registry.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&device).map(|h| h.session) == Some(session) {
            map.remove(&device);
            let queued = shared
                .presence
                .try_send(Presence::Offline(device, reason))
                .is_ok();
            (true, queued)
        } else {
            (false, false)
        }
    };
    if still_ours {
        if !queued {
            // The presence queue was full: wait for room (ordering is then best effort).
            let _ = shared
                .presence
                .send(Presence::Offline(device, reason))
                .await;
        }
    } else {
        let _ = conn
            .write(&GatewayMsg::Denied {
                reason: DenyReason::Replaced,
            })
            .await;
    }
    tracing::debug!(device = device.0, session, reason, "session ended");
}

/// Bytes of file data in flight, unacknowledged, per session.
const FILE_WINDOW: u64 = 8 * MAX_CHUNK as u64;
/// Confirmed progress is written to the database at least every this many bytes.
const PERSIST_EVERY: u64 = 1 << 20;

/// The file transfer a session is running, if any.
#[derive(Default)]
struct Files {
    /// Boxed: most sessions never receive a file, and this lives in every session's future.
    current: Option<Box<Sending>>,
}

struct Sending {
    t: PendingTransfer,
    file: tokio::fs::File,
    /// None until the device says where to resume.
    next: Option<u64>,
    acked: u64,
    persisted: u64,
}

impl Files {
    /// Starts the device's next transfer when idle. False when the connection failed.
    async fn start<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        device: DeviceId,
        shared: &Shared,
    ) -> bool {
        while self.current.is_none() {
            let Ok(Some(t)) = gated(shared, shared.store.next_transfer(device)).await else {
                return true;
            };
            match tokio::fs::File::open(&t.path).await {
                Ok(file) => {
                    let offer = GatewayMsg::FileOffer {
                        transfer: t.id,
                        name: t.name.clone(),
                        size: t.size,
                        sha256: t.sha256,
                    };
                    self.current = Some(Box::new(Sending {
                        t,
                        file,
                        next: None,
                        acked: 0,
                        persisted: 0,
                    }));
                    return conn.write(&offer).await.is_ok();
                }
                Err(e) => {
                    let detail = format!("gateway cannot read the file: {e}");
                    if shared
                        .store
                        .update_transfer(device, t.id, "failed", 0, Some(&detail))
                        .await
                        .is_err()
                    {
                        // Could not record it: try again on the next session, not in a loop.
                        return true;
                    }
                }
            }
        }
        true
    }

    async fn on_ack<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        device: DeviceId,
        shared: &Shared,
        transfer: TransferId,
        offset: u64,
    ) -> bool {
        let Some(s) = self.current.as_mut().filter(|s| s.t.id == transfer) else {
            return true;
        };
        // A device can confirm neither more than the file nor more than it was sent.
        if offset > s.t.size || s.next.is_some_and(|next| offset > next) {
            return false;
        }
        match s.next {
            // The device's resume point.
            None => {
                s.next = Some(offset);
                let _ = shared
                    .store
                    .update_transfer(device, transfer, "sending", offset, None)
                    .await;
                s.persisted = offset;
            }
            // A lower offset than before: the device lost data; go back to it.
            Some(_) if offset < s.acked => s.next = Some(offset),
            Some(_) => {}
        }
        s.acked = offset;
        if s.acked >= s.persisted + PERSIST_EVERY {
            s.persisted = s.acked;
            let _ = shared
                .store
                .update_transfer(device, transfer, "sending", s.acked, None)
                .await;
        }
        // Send while the window has room.
        let mut buf = vec![0u8; MAX_CHUNK];
        while let Some(next) = s.next {
            if next >= s.t.size || next.saturating_sub(s.acked) >= FILE_WINDOW {
                break;
            }
            let len = (s.t.size - next).min(MAX_CHUNK as u64) as usize;
            use tokio::io::AsyncSeekExt;
            if s.file.seek(std::io::SeekFrom::Start(next)).await.is_err()
                || s.file.read_exact(&mut buf[..len]).await.is_err()
            {
                let _ = shared
                    .store
                    .update_transfer(device, transfer, "failed", s.acked, Some("read error"))
                    .await;
                self.current = None;
                return true;
            }
            let chunk = GatewayMsg::FileChunk {
                transfer,
                offset: next,
                data: buf[..len].to_vec(),
            };
            if conn.write(&chunk).await.is_err() {
                return false;
            }
            s.next = Some(next + len as u64);
        }
        true
    }

    async fn on_done<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Conn<S>,
        device: DeviceId,
        shared: &Shared,
        transfer: TransferId,
        sha256: [u8; 32],
        ok: bool,
    ) -> bool {
        let Some(s) = self.current.take_if(|s| s.t.id == transfer) else {
            return true;
        };
        // Every byte must have been sent in this session, or the device already held the whole
        // file when the offer came (it answered the offer with FileDone).
        let complete = s.next.is_none_or(|next| next == s.t.size);
        let (status, detail) = if ok && sha256 == s.t.sha256 && complete {
            ("done", None)
        } else {
            (
                "failed",
                Some("the device reported a SHA-256 mismatch or was not sent every byte"),
            )
        };
        let _ = shared
            .store
            .update_transfer(device, transfer, status, s.t.size, detail)
            .await;
        self.start(conn, device, shared).await
    }
}
