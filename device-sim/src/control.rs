//! A simulated device's control session: connect (TLS 1.3 trusting the given CA, or plain TCP),
//! authenticate with the challenge-response, keep heartbeats, obey commands, and reconnect with
//! exponential backoff and jitter when the session drops.
//!
//! Emits: nothing; its outcome is counted in the device's report and in [`ControlProgress`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use proto::control::{
    Command, CommandOutcome, DeviceConfig, DeviceMsg, GatewayMsg, MAX_FRAME, TLS_EXPORTER_LABEL,
    TransferId, auth_proof, decode_frame, encode_frame, rotation_proof,
};
use proto::{DeviceId, DeviceKey};
use rand::rngs::SmallRng;
use rand::{Rng, RngCore, SeedableRng};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How devices reach the gateway's control listener.
#[derive(Clone)]
pub struct ControlTarget {
    /// Listener address.
    pub addr: SocketAddr,
    /// TLS client settings and the name to verify; None for plain TCP.
    pub tls: Option<(Arc<rustls::ClientConfig>, ServerName<'static>)>,
    /// Where received files go (a folder per device inside).
    pub files_dir: PathBuf,
}

impl std::fmt::Debug for ControlTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlTarget")
            .field("addr", &self.addr)
            .field("tls", &self.tls.is_some())
            .finish()
    }
}

/// A TLS 1.3 client configuration trusting the CA certificates in `ca` (PEM).
///
/// # Errors
/// A message when the file is unreadable or holds no certificate.
pub fn tls_client(ca: &Path) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
    for c in certs {
        let c = c.map_err(|e| format!("{}: {e}", ca.display()))?;
        roots.add(c).map_err(|e| format!("{}: {e}", ca.display()))?;
    }
    if roots.is_empty() {
        return Err(format!("{}: no CA certificate", ca.display()));
    }
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .map_err(|e| e.to_string())?
    .with_root_certificates(roots)
    .with_no_client_auth();
    Ok(Arc::new(config))
}

/// A device's running configuration, changed by commands and config pushes, read by its
/// telemetry loop.
#[derive(Debug)]
pub struct LiveConfig {
    /// Microseconds between datagrams (the protocol speaks milliseconds; a simulated rate
    /// needs finer periods to be offered exactly).
    pub period_us: AtomicU64,
    /// Readings per datagram.
    pub batch: AtomicU64,
    /// Bit `i` set when sensor `i + 1` is on (sensors 1..=64).
    pub sensors: AtomicU64,
}

impl LiveConfig {
    /// A configuration with all four model sensors on.
    pub fn new(period: std::time::Duration, batch: u64) -> Self {
        Self {
            period_us: AtomicU64::new((period.as_micros() as u64).max(1)),
            batch: AtomicU64::new(batch),
            sensors: AtomicU64::new(0b1111),
        }
    }

    /// A configuration with the given sensors on (ids outside 1..=64 are left out; none
    /// left: the four model sensors).
    pub fn with_sensors(
        period: std::time::Duration,
        batch: u64,
        sensors: impl IntoIterator<Item = u16>,
    ) -> Self {
        let c = Self::new(period, batch);
        let mask = sensors
            .into_iter()
            .filter(|s| (1..=64).contains(s))
            .fold(0u64, |m, s| m | 1 << (s - 1));
        if mask != 0 {
            c.sensors.store(mask, Relaxed);
        }
        c
    }

    /// The enabled sensor ids, ascending.
    pub fn sensor_ids(&self) -> Vec<u16> {
        let mask = self.sensors.load(Relaxed);
        (0..64u16)
            .filter(|i| mask & (1 << i) != 0)
            .map(|i| i + 1)
            .collect()
    }

    fn report(&self) -> DeviceConfig {
        DeviceConfig {
            interval_ms: (self.period_us.load(Relaxed) / 1000).clamp(1, u64::from(u32::MAX)) as u32,
            batch: self.batch.load(Relaxed).min(u64::from(u16::MAX)) as u16,
            sensors: self.sensor_ids(),
        }
    }

    /// Applies a pushed configuration; false when it cannot be honoured.
    fn apply(&self, c: &DeviceConfig) -> bool {
        let mask = c
            .sensors
            .iter()
            .filter(|s| (1..=64).contains(*s))
            .fold(0u64, |m, s| m | 1 << (s - 1));
        if c.interval_ms == 0
            || c.batch == 0
            || usize::from(c.batch) > proto::MAX_READINGS
            || mask == 0
        {
            return false;
        }
        self.period_us
            .store(u64::from(c.interval_ms) * 1000, Relaxed);
        self.batch.store(u64::from(c.batch), Relaxed);
        self.sensors.store(mask, Relaxed);
        true
    }
}

/// Live totals of control sessions, for progress displays and tests.
#[derive(Debug, Default)]
pub struct ControlProgress {
    /// Sessions authenticated right now.
    pub online: AtomicU64,
    /// Sessions authenticated in total.
    pub established: AtomicU64,
    /// Commands applied (not counting resends of applied ones).
    pub commands: AtomicU64,
}

/// What one device's control session did.
#[derive(Debug, Default, Clone)]
pub(crate) struct ControlOutcome {
    pub sessions: u64,
    pub failures: u64,
    pub commands: u64,
    pub files: Vec<crate::report::FileReport>,
    pub key_rotations: u64,
}

/// Why a session ended.
enum SessionEnd {
    Cancelled,
    Dropped,
}

struct Conn<S> {
    io: S,
    buf: Vec<u8>,
    out: Vec<u8>,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    async fn read(&mut self) -> Option<GatewayMsg> {
        loop {
            match decode_frame::<GatewayMsg>(&self.buf, MAX_FRAME) {
                Ok(Some((m, used))) => {
                    self.buf.drain(..used);
                    return Some(m);
                }
                Ok(None) => {}
                Err(_) => return None,
            }
            self.buf.reserve(4096);
            match self.io.read_buf(&mut self.buf).await {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    async fn write(&mut self, m: &DeviceMsg) -> bool {
        self.out.clear();
        if encode_frame(m, MAX_FRAME, &mut self.out).is_err() {
            return false;
        }
        self.io.write_all(&self.out).await.is_ok() && self.io.flush().await.is_ok()
    }
}

/// Runs a device's control session until `cancel`, reconnecting after drops.
#[allow(clippy::too_many_arguments)]
pub(crate) async fn run(
    device: DeviceId,
    keys: Arc<crate::keys::KeyRing>,
    persist: Option<Arc<tokio::sync::Notify>>,
    target: ControlTarget,
    live: Arc<LiveConfig>,
    progress: Arc<crate::Progress>,
    seed: u64,
    cancel: CancellationToken,
) -> ControlOutcome {
    let mut rng = SmallRng::seed_from_u64(seed ^ u64::from(device.0) ^ 0xC0DE);
    let mut outcome = ControlOutcome::default();
    let mut applied = std::collections::HashSet::new();
    let mut sink = FileSink::new(target.files_dir.join(device.0.to_string()));
    let mut backoff = Duration::from_millis(100);
    loop {
        let end = tokio::select! {
            _ = cancel.cancelled() => SessionEnd::Cancelled,
            end = session(device, &keys, persist.as_deref(), &target, &live, &progress.control, &mut outcome, &mut applied, &mut sink, &mut backoff, &cancel) => end,
        };
        if matches!(end, SessionEnd::Cancelled) {
            outcome.files = std::mem::take(&mut sink.done);
            return outcome;
        }
        outcome.failures += 1;
        // Exponential backoff with full jitter, so a restarted gateway is not hit all at once.
        let wait = backoff.mul_f64(rng.random_range(0.5..1.0));
        backoff = (backoff * 2).min(Duration::from_secs(10));
        tokio::select! {
            _ = cancel.cancelled() => {
                outcome.files = std::mem::take(&mut sink.done);
                return outcome;
            }
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn session(
    device: DeviceId,
    keys: &crate::keys::KeyRing,
    persist: Option<&tokio::sync::Notify>,
    target: &ControlTarget,
    live: &LiveConfig,
    progress: &ControlProgress,
    outcome: &mut ControlOutcome,
    applied: &mut std::collections::HashSet<u64>,
    sink: &mut FileSink,
    backoff: &mut Duration,
    cancel: &CancellationToken,
) -> SessionEnd {
    let Ok(tcp) = TcpStream::connect(target.addr).await else {
        return SessionEnd::Dropped;
    };
    let _ = tcp.set_nodelay(true);
    match &target.tls {
        Some((config, name)) => {
            let connector = tokio_rustls::TlsConnector::from(config.clone());
            let Ok(tls) = connector.connect(name.clone(), tcp).await else {
                return SessionEnd::Dropped;
            };
            let mut binding = [0u8; 32];
            if tls
                .get_ref()
                .1
                .export_keying_material(&mut binding, TLS_EXPORTER_LABEL, None)
                .is_err()
            {
                return SessionEnd::Dropped;
            }
            let conn = Conn {
                io: tls,
                buf: Vec::new(),
                out: Vec::new(),
            };
            run_session(
                conn, device, keys, persist, &binding, live, progress, outcome, applied, sink,
                backoff, cancel,
            )
            .await
        }
        None => {
            let conn = Conn {
                io: tcp,
                buf: Vec::new(),
                out: Vec::new(),
            };
            run_session(
                conn,
                device,
                keys,
                persist,
                &[],
                live,
                progress,
                outcome,
                applied,
                sink,
                backoff,
                cancel,
            )
            .await
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    mut conn: Conn<S>,
    device: DeviceId,
    keys: &crate::keys::KeyRing,
    persist: Option<&tokio::sync::Notify>,
    binding: &[u8],
    live: &LiveConfig,
    progress: &ControlProgress,
    outcome: &mut ControlOutcome,
    applied: &mut std::collections::HashSet<u64>,
    sink: &mut FileSink,
    backoff: &mut Duration,
    cancel: &CancellationToken,
) -> SessionEnd {
    let mut client_nonce = [0u8; 16];
    rand::rng().fill_bytes(&mut client_nonce);
    if !conn
        .write(&DeviceMsg::Hello {
            device,
            client_nonce,
        })
        .await
    {
        return SessionEnd::Dropped;
    }
    let Some(GatewayMsg::Challenge { server_nonce }) = conn.read().await else {
        return SessionEnd::Dropped;
    };
    let proof = auth_proof(
        &keys.current(),
        device,
        &client_nonce,
        &server_nonce,
        binding,
    );
    if !conn.write(&DeviceMsg::Auth { proof }).await {
        return SessionEnd::Dropped;
    }
    let Some(GatewayMsg::Welcome { heartbeat_ms }) = conn.read().await else {
        return SessionEnd::Dropped;
    };
    outcome.sessions += 1;
    *backoff = Duration::from_millis(100);
    progress.established.fetch_add(1, Relaxed);
    progress.online.fetch_add(1, Relaxed);
    let mut beat = tokio::time::interval(Duration::from_millis(u64::from(heartbeat_ms.max(100))));
    beat.tick().await;
    // Tell the gateway what runs now.
    if !conn
        .write(&DeviceMsg::ConfigReport {
            config: live.report(),
        })
        .await
    {
        progress.online.fetch_sub(1, Relaxed);
        return SessionEnd::Dropped;
    }
    let end = loop {
        tokio::select! {
            _ = cancel.cancelled() => break SessionEnd::Cancelled,
            _ = beat.tick() => {
                if !conn.write(&DeviceMsg::Heartbeat).await {
                    break SessionEnd::Dropped;
                }
            }
            msg = conn.read() => match msg {
                None | Some(GatewayMsg::Denied { .. }) => break SessionEnd::Dropped,
                Some(GatewayMsg::Command { id, command }) => {
                    let outcome_kind = apply_once(applied, id.0, &command, live);
                    if outcome_kind != CommandOutcome::Duplicate {
                        outcome.commands += 1;
                        progress.commands.fetch_add(1, Relaxed);
                    }
                    let reply = DeviceMsg::CommandResult {
                        id,
                        outcome: outcome_kind,
                        detail: String::new(),
                    };
                    if !conn.write(&reply).await {
                        break SessionEnd::Dropped;
                    }
                }
                Some(GatewayMsg::FileOffer { transfer, name, size, sha256 }) => {
                    let Ok(reply) = sink.offer(transfer, &name, size, sha256).await else {
                        break SessionEnd::Dropped;
                    };
                    if !conn.write(&reply).await {
                        break SessionEnd::Dropped;
                    }
                }
                Some(GatewayMsg::FileChunk { transfer, offset, data }) => {
                    match sink.chunk(transfer, offset, &data).await {
                        Ok(Some(reply)) => {
                            if !conn.write(&reply).await {
                                break SessionEnd::Dropped;
                            }
                        }
                        Ok(None) => {}
                        Err(_) => break SessionEnd::Dropped,
                    }
                }
                // A key only ever comes inside TLS; one sent in the clear is ignored.
                Some(GatewayMsg::RotateKey { version, key }) if !binding.is_empty() => {
                    let key = DeviceKey(key);
                    let before = keys.installed();
                    let n = keys.install(key.clone());
                    // Stored before it is confirmed: a device that loses a key it confirmed
                    // could never authenticate again.
                    if let Some(persist) = persist {
                        persist.notify_one();
                        tokio::select! {
                            _ = cancel.cancelled() => break SessionEnd::Cancelled,
                            _ = keys.wait_saved(n) => {}
                        }
                    }
                    if n != before {
                        outcome.key_rotations += 1;
                    }
                    let proof = rotation_proof(&key, device, version, binding);
                    if !conn.write(&DeviceMsg::KeyRotated { version, proof }).await {
                        break SessionEnd::Dropped;
                    }
                }
                Some(GatewayMsg::Config { config }) => {
                    live.apply(&config);
                    // Report what runs, whether or not the push could be honoured.
                    if !conn.write(&DeviceMsg::ConfigReport { config: live.report() }).await {
                        break SessionEnd::Dropped;
                    }
                }
                Some(_) => {}
            },
        }
    };
    progress.online.fetch_sub(1, Relaxed);
    end
}

/// Applies a command unless its id was applied before (a resend): at most once per id.
fn apply_once(
    applied: &mut std::collections::HashSet<u64>,
    id: u64,
    command: &Command,
    live: &LiveConfig,
) -> CommandOutcome {
    if applied.insert(id) {
        apply(command, live)
    } else {
        CommandOutcome::Duplicate
    }
}

fn apply(command: &Command, live: &LiveConfig) -> CommandOutcome {
    match command {
        Command::SetInterval { millis } if *millis > 0 => {
            live.period_us.store(u64::from(*millis) * 1000, Relaxed);
            CommandOutcome::Done
        }
        Command::SetInterval { .. } => CommandOutcome::Failed,
        Command::Ping | Command::Reboot | Command::SetConfig { .. } | Command::Custom { .. } => {
            CommandOutcome::Done
        }
    }
}

/// A file being received.
struct Receiving {
    transfer: TransferId,
    name: String,
    size: u64,
    sha256: [u8; 32],
    part: PathBuf,
    file: tokio::fs::File,
    /// How far the file stands (decides which chunks are stored).
    at: proto::control::Reassembly,
    resumed_from: Vec<u64>,
}

/// Receives files offered over the session into `dir/<device id>/`, resuming partial ones.
pub(crate) struct FileSink {
    dir: PathBuf,
    current: Option<Receiving>,
    /// Resume offsets seen per transfer (kept across sessions for the report).
    resumes: std::collections::HashMap<u64, Vec<u64>>,
    pub(crate) done: Vec<crate::report::FileReport>,
}

impl FileSink {
    pub(crate) fn new(dir: PathBuf) -> Self {
        Self {
            dir,
            current: None,
            resumes: Default::default(),
            done: Vec::new(),
        }
    }

    /// Answers an offer with the offset to resume from (what a `.part` of the same transfer
    /// already holds).
    async fn offer(
        &mut self,
        transfer: TransferId,
        name: &str,
        size: u64,
        sha256: [u8; 32],
    ) -> std::io::Result<DeviceMsg> {
        use tokio::io::AsyncSeekExt;
        tokio::fs::create_dir_all(&self.dir).await?;
        let name = proto::control::sanitize_name(name);
        let part = self.dir.join(format!("{name}.part"));
        let meta = self.dir.join(format!("{name}.part.meta"));
        let tag = format!("{} {} {}", transfer.0, hex::encode(sha256), size);
        let same = tokio::fs::read_to_string(&meta)
            .await
            .is_ok_and(|m| m == tag);
        let mut file = tokio::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .read(true)
            .truncate(false)
            .open(&part)
            .await?;
        let mut have = if same {
            file.metadata().await?.len().min(size)
        } else {
            0
        };
        if !same {
            file.set_len(0).await?;
            tokio::fs::write(&meta, &tag).await?;
        }
        file.set_len(have).await?;
        file.seek(std::io::SeekFrom::Start(have)).await?;
        if have > size {
            have = 0;
        }
        if have > 0 {
            self.resumes.entry(transfer.0).or_default().push(have);
        }
        self.current = Some(Receiving {
            transfer,
            name,
            size,
            sha256,
            part,
            file,
            at: proto::control::Reassembly::resume(size, have),
            resumed_from: self.resumes.get(&transfer.0).cloned().unwrap_or_default(),
        });
        if have == size {
            return self.finish().await;
        }
        Ok(DeviceMsg::FileAck {
            transfer,
            offset: have,
        })
    }

    /// Stores a chunk that continues the file; answers with what is stored.
    async fn chunk(
        &mut self,
        transfer: TransferId,
        offset: u64,
        data: &[u8],
    ) -> std::io::Result<Option<DeviceMsg>> {
        let Some(r) = self.current.as_mut().filter(|r| r.transfer == transfer) else {
            return Ok(None);
        };
        if r.at.accept(offset, data.len()) {
            r.file.write_all(data).await?;
        }
        if r.at.is_complete() {
            return self.finish().await.map(Some);
        }
        Ok(Some(DeviceMsg::FileAck {
            transfer,
            offset: r.at.have(),
        }))
    }

    /// Checks the SHA-256 of a complete file and moves it into place.
    async fn finish(&mut self) -> std::io::Result<DeviceMsg> {
        use sha2::Digest;
        let Some(mut r) = self.current.take() else {
            return Err(std::io::Error::other("no transfer"));
        };
        r.file.flush().await?;
        let bytes = tokio::fs::read(&r.part).await?;
        let sha: [u8; 32] = sha2::Sha256::digest(&bytes).into();
        let ok = sha == r.sha256;
        if ok {
            tokio::fs::rename(&r.part, self.dir.join(&r.name)).await?;
        } else {
            let _ = tokio::fs::remove_file(&r.part).await;
        }
        let _ = tokio::fs::remove_file(self.dir.join(format!("{}.part.meta", r.name))).await;
        self.done.push(crate::report::FileReport {
            transfer: r.transfer.0,
            name: r.name,
            size: r.size,
            sha256: hex::encode(sha),
            ok,
            resumed_from: r.resumed_from,
        });
        Ok(DeviceMsg::FileDone {
            transfer: r.transfer,
            sha256: sha,
            ok,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resent_command_is_applied_once() {
        let live = LiveConfig::new(Duration::from_secs(1), 16);
        let mut applied = std::collections::HashSet::new();
        let set = |ms| Command::SetInterval { millis: ms };
        assert_eq!(
            apply_once(&mut applied, 7, &set(200), &live),
            CommandOutcome::Done
        );
        live.period_us.store(1_000_000, Relaxed); // the device changed it back on its own
        assert_eq!(
            apply_once(&mut applied, 7, &set(200), &live),
            CommandOutcome::Duplicate
        );
        assert_eq!(
            live.period_us.load(Relaxed),
            1_000_000,
            "the resend changed nothing"
        );
        assert_eq!(
            apply_once(&mut applied, 8, &set(0), &live),
            CommandOutcome::Failed
        );
    }

    #[test]
    fn config_pushes_are_checked() {
        let live = LiveConfig::new(Duration::from_secs(1), 16);
        let ok = DeviceConfig {
            interval_ms: 250,
            batch: 4,
            sensors: vec![2, 3],
        };
        assert!(live.apply(&ok));
        assert_eq!(live.report(), ok);
        for bad in [
            DeviceConfig {
                interval_ms: 0,
                ..ok.clone()
            },
            DeviceConfig {
                batch: 51,
                ..ok.clone()
            },
            DeviceConfig {
                sensors: vec![],
                ..ok.clone()
            },
            DeviceConfig {
                sensors: vec![0, 65],
                ..ok.clone()
            },
        ] {
            assert!(!live.apply(&bad), "{bad:?}");
            assert_eq!(live.report(), ok, "a refused push changes nothing");
        }
    }
}
