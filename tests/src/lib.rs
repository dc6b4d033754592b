//! Helpers for end-to-end tests and benchmarks: build and locate the real `gateway` and
//! `device-sim` binaries, run them on loopback with a temporary database, and read back what
//! they stored and reported. Waiting is always on a condition with a deadline.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

pub mod flood;
pub mod impair;
pub mod mqtt;
pub mod webdriver;

use anyhow::{Context, bail};
use proto::{Ack, Batch, DeviceId, DeviceKey, Flags, Header, Millis, Reading, SensorId, Seq};
use std::net::UdpSocket;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Serialises tests that put load on the machine, so they do not starve each other.
pub fn serial() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// The directory of the running executable's profile (`target/debug` or `target/release`).
fn profile_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    dir
}

/// Where a test leaves a file for people to look at (`target/test-artifacts/NAME`).
///
/// # Errors
/// When the directory cannot be created.
pub fn artifact(name: &str) -> anyhow::Result<PathBuf> {
    let mut dir = profile_dir();
    dir.pop();
    dir.push("test-artifacts");
    std::fs::create_dir_all(&dir)?;
    Ok(dir.join(name))
}

/// Path of a workspace binary, built once per test process with the same profile.
pub fn bin(name: &str) -> PathBuf {
    static BUILT: OnceLock<()> = OnceLock::new();
    let dir = profile_dir();
    BUILT.get_or_init(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args([
            "build",
            "--quiet",
            "-p",
            "gateway",
            "-p",
            "device-sim",
            "--bins",
        ]);
        if dir.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("running cargo build");
        assert!(status.success(), "building the binaries failed");
    });
    dir.join(name)
}

/// Polls `cond` until it holds or `timeout` passes.
///
/// # Errors
/// When the deadline passes first; `what` says what was awaited.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut() -> anyhow::Result<bool>,
) -> anyhow::Result<()> {
    let deadline = std::time::SystemTime::now() + timeout;
    loop {
        if cond()? {
            return Ok(());
        }
        if std::time::SystemTime::now() > deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        poll_pause();
    }
}

/// The pause between two checks of a deadline-bounded condition; the only place tests pause.
#[allow(clippy::disallowed_methods)]
fn poll_pause() {
    std::thread::sleep(Duration::from_millis(20));
}

/// Runs a gateway verb to completion and returns its stdout.
///
/// # Errors
/// When it exits non-zero (stderr included in the error).
pub fn gateway(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin("gateway"))
        .args(args)
        .output()
        .context("running gateway")?;
    if !out.status.success() {
        bail!(
            "gateway {args:?} failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// A `gateway serve` process on a loopback port of its own.
pub struct TestGateway {
    /// The process.
    pub child: Child,
    /// Where it receives telemetry.
    pub udp: SocketAddr,
    /// Where it accepts control sessions.
    pub control: SocketAddr,
    /// Where its admin API listens.
    pub admin: SocketAddr,
    /// Its database.
    pub db: PathBuf,
}

impl TestGateway {
    /// Starts `gateway serve --udp 127.0.0.1:0 --db DB` plus `extra` and waits until it listens.
    ///
    /// # Errors
    /// When it fails to start or does not announce its address within 30 s.
    pub fn start(db: &Path, extra: &[&str]) -> anyhow::Result<TestGateway> {
        Self::start_on(db, "127.0.0.1:0", extra)
    }

    /// As [`TestGateway::start`], with telemetry on `udp` (to restart on the same port).
    ///
    /// # Errors
    /// When it fails to start or does not announce its address within 30 s.
    pub fn start_on(db: &Path, udp: &str, extra: &[&str]) -> anyhow::Result<TestGateway> {
        Self::start_in(None, db, udp, extra)
    }

    /// As [`TestGateway::start_on`], inside the network namespace `netns` when given (run as
    /// `ip netns exec NETNS gateway ...`, which execs: the child is the gateway itself).
    ///
    /// # Errors
    /// When it fails to start or does not announce its address within 30 s.
    pub fn start_in(
        netns: Option<&str>,
        db: &Path,
        udp: &str,
        extra: &[&str],
    ) -> anyhow::Result<TestGateway> {
        Self::start_full(netns, db, udp, extra, &[])
    }

    /// As [`TestGateway::start`], with environment variables set for the gateway.
    ///
    /// # Errors
    /// When it fails to start or does not announce its address within 30 s.
    pub fn start_env(
        db: &Path,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<TestGateway> {
        Self::start_full(None, db, "127.0.0.1:0", extra, env)
    }

    fn start_full(
        netns: Option<&str>,
        db: &Path,
        udp: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<TestGateway> {
        let log = db.with_extension("log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(bin("gateway"));
                c
            }
            None => Command::new(bin("gateway")),
        };
        let mut child = cmd
            .args([
                "serve",
                "--udp",
                udp,
                "--control",
                "127.0.0.1:0",
                "--admin",
                "127.0.0.1:0",
                "--db",
            ])
            .arg(db)
            .args(extra)
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .context("spawning gateway")?;
        let stdout = child.stdout.take().context("gateway stdout")?;
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut lines = BufReader::new(stdout).lines();
            if let Some(Ok(line)) = lines.next() {
                let _ = tx.send(line);
            }
            // Keep draining so the child never blocks on a full pipe.
            for _ in lines {}
        });
        let line = rx
            .recv_timeout(Duration::from_secs(30))
            .context("gateway did not announce its address")?;
        let find = |scheme: &str| -> anyhow::Result<SocketAddr> {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(scheme))
                .with_context(|| format!("no {scheme} address in {line:?}"))?
                .parse()
                .with_context(|| format!("parsing {scheme} address from {line:?}"))
        };
        let udp = find("udp://")?;
        let control = find("tls://").or_else(|_| find("tcp://"))?;
        let admin = find("http://")?;
        Ok(TestGateway {
            child,
            udp,
            control,
            admin,
            db: db.to_owned(),
        })
    }

    /// Sends a signal by name (TERM, KILL, INT).
    ///
    /// # Errors
    /// When `kill` fails.
    pub fn signal(&self, sig: &str) -> anyhow::Result<()> {
        signal(self.child.id(), sig)
    }

    /// Waits for the process to exit, at most `timeout`; returns its exit status.
    ///
    /// # Errors
    /// When it is still running at the deadline.
    pub fn wait_exit(&mut self, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let mut status = None;
        wait_until(timeout, "gateway exit", || {
            status = self.child.try_wait()?;
            Ok(status.is_some())
        })?;
        status.context("exit status")
    }

    /// SIGTERM and wait for a clean exit.
    ///
    /// # Errors
    /// When it does not exit cleanly within 10 s.
    pub fn stop(mut self) -> anyhow::Result<()> {
        self.signal("TERM")?;
        let status = self.wait_exit(Duration::from_secs(10))?;
        if !status.success() {
            bail!("gateway exited with {status}");
        }
        Ok(())
    }
}

impl Drop for TestGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A child process killed when dropped, so a failing test never leaves a simulator running.
pub struct KillOnDrop(pub Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Sends signal `sig` (TERM, KILL, INT) to `pid` with the `kill` command.
///
/// # Errors
/// When `kill` fails.
pub fn signal(pid: u32, sig: &str) -> anyhow::Result<()> {
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()?;
    if !status.success() {
        bail!("kill -{sig} {pid} failed");
    }
    Ok(())
}

/// Provisions `count` devices into `db` and returns the fleet file path.
///
/// # Errors
/// When provisioning fails.
pub fn provision(dir: &Path, db: &Path, count: u32) -> anyhow::Result<PathBuf> {
    let fleet = dir.join("fleet.json");
    gateway(&[
        "devices",
        "provision",
        "--count",
        &count.to_string(),
        "--out",
        fleet.to_str().context("path")?,
        "--db",
        db.to_str().context("path")?,
    ])?;
    Ok(fleet)
}

/// A `device-sim` command with `--gateway` and `--fleet` set.
pub fn sim(gateway: SocketAddr, fleet: &Path) -> Command {
    let mut cmd = Command::new(bin("device-sim"));
    cmd.arg("--gateway")
        .arg(gateway.to_string())
        .arg("--fleet")
        .arg(fleet);
    cmd
}

/// Runs a simulator command to completion.
///
/// # Errors
/// When it exits non-zero.
pub fn run_sim(mut cmd: Command) -> anyhow::Result<()> {
    let out = cmd.output().context("running device-sim")?;
    if !out.status.success() {
        bail!(
            "device-sim failed: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// Key of a reading: (device, seq, idx).
pub type Key = (u32, u64, u32);
/// What is stored or sent for a reading: (sensor, ts_ms, value as text).
pub type Val = (u16, i64, String);

/// A reading as the simulator logged it.
#[derive(Debug, Clone, PartialEq)]
pub struct Sent {
    /// Sensor, time, value.
    pub val: Val,
    /// Whether its datagram was acknowledged.
    pub acked: bool,
}

fn field<'a>(it: &mut impl Iterator<Item = &'a str>, line: &str) -> anyhow::Result<&'a str> {
    it.next().with_context(|| format!("short line {line:?}"))
}

/// Normalises a value to the form both sides print (shortest round-trip f64, NaN as NaN).
fn norm(v: &str) -> anyhow::Result<String> {
    if v == "NaN" {
        return Ok(v.into());
    }
    Ok(v.parse::<f64>()
        .with_context(|| format!("value {v:?}"))?
        .to_string())
}

/// Parses the simulator's `--readings-log` CSV.
///
/// # Errors
/// On a malformed file.
pub fn read_sent(path: &Path) -> anyhow::Result<BTreeMap<Key, Sent>> {
    let text = std::fs::read_to_string(path)?;
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let mut it = line.split(',');
        let device = field(&mut it, line)?.parse()?;
        let seq = field(&mut it, line)?.parse()?;
        let idx = field(&mut it, line)?.parse()?;
        let sensor = field(&mut it, line)?.parse()?;
        let ts = field(&mut it, line)?.parse()?;
        let value = norm(field(&mut it, line)?)?;
        let acked = field(&mut it, line)? == "true";
        out.insert(
            (device, seq, idx),
            Sent {
                val: (sensor, ts, value),
                acked,
            },
        );
    }
    Ok(out)
}

/// Every stored reading, through `gateway query readings --format csv`. Fails on a duplicate key.
///
/// # Errors
/// When the query fails, the output is malformed, or a key appears twice.
pub fn query_all(db: &Path) -> anyhow::Result<BTreeMap<Key, Val>> {
    let csv = gateway(&[
        "query",
        "readings",
        "--format",
        "csv",
        "--db",
        db.to_str().context("path")?,
    ])?;
    let mut out = BTreeMap::new();
    let mut lines = csv.lines();
    let header = lines.next().context("csv header")?;
    if header != "device,sensor,time,ts_ms,value,seq,idx" {
        bail!("unexpected csv header {header:?}");
    }
    for line in lines {
        let mut it = line.split(',');
        let device = field(&mut it, line)?.parse()?;
        let sensor = field(&mut it, line)?.parse()?;
        let _time = field(&mut it, line)?;
        let ts = field(&mut it, line)?.parse()?;
        let value = norm(field(&mut it, line)?)?;
        let seq = field(&mut it, line)?.parse()?;
        let idx = field(&mut it, line)?.parse()?;
        if out
            .insert((device, seq, idx), (sensor, ts, value))
            .is_some()
        {
            bail!("duplicate stored reading {device}/{seq}/{idx}");
        }
    }
    Ok(out)
}

/// `gateway stats --format json` as JSON.
///
/// # Errors
/// When the verb fails or prints something else.
pub fn stats(db: &Path) -> anyhow::Result<serde_json::Value> {
    let out = gateway(&[
        "stats",
        "--format",
        "json",
        "--db",
        db.to_str().context("path")?,
    ])?;
    Ok(serde_json::from_str(&out)?)
}

/// A counter from `stats` output (0 when absent).
pub fn counter(stats: &serde_json::Value, name: &str) -> u64 {
    stats["counters"][name].as_u64().unwrap_or(0)
}

/// The simulator's JSON report.
///
/// # Errors
/// When it cannot be read or parsed.
pub fn read_report(path: &Path) -> anyhow::Result<device_sim::Report> {
    Ok(serde_json::from_slice(&std::fs::read(path)?)?)
}

/// A client speaking the protocol directly, for replay and forgery tests.
pub struct RawDevice {
    /// Device id.
    pub id: DeviceId,
    /// Its key.
    pub key: DeviceKey,
    /// A socket connected to the gateway.
    pub socket: UdpSocket,
}

impl RawDevice {
    /// Device `index` of the fleet file, talking to `gw`.
    ///
    /// # Errors
    /// Unreadable fleet or socket errors.
    pub fn new(
        fleet: &std::path::Path,
        index: usize,
        gw: std::net::SocketAddr,
    ) -> anyhow::Result<Self> {
        let fleet = device_sim::fleet::FleetFile::load(fleet)?;
        let d = &fleet.devices[index];
        let socket = UdpSocket::bind("127.0.0.1:0")?;
        socket.connect(gw)?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        Ok(Self {
            id: d.device_id(),
            key: d.device_key()?,
            socket,
        })
    }

    /// A sealed datagram with `readings` readings, ack requested; values derive from `seq`.
    pub fn datagram(&self, seq: u64, readings: usize) -> Vec<u8> {
        let readings: Vec<(u16, u64, f64)> = (0..readings)
            .map(|i| {
                (
                    1,
                    1_764_000_000_000 + seq * 100 + i as u64,
                    seq as f64 + i as f64 / 10.0,
                )
            })
            .collect();
        self.datagram_of(seq, &readings)
    }

    /// A sealed datagram of the given (sensor, ts_ms, value) readings, ack requested.
    pub fn datagram_of(&self, seq: u64, readings: &[(u16, u64, f64)]) -> Vec<u8> {
        let batch = Batch {
            readings: readings
                .iter()
                .map(|&(sensor, ts, value)| Reading {
                    sensor: SensorId(sensor),
                    ts: Millis(ts),
                    value,
                })
                .collect(),
        };
        let header = Header {
            flags: Flags(Flags::ACK_REQUESTED),
            device: self.id,
            seq: Seq(seq),
        };
        batch
            .seal(&header, &self.key.cipher())
            .expect("in limits")
            .0
    }

    /// Sends and waits for the ack of exactly this sequence number.
    /// # Errors
    /// No ack within the socket timeout.
    pub fn send_acked(&self, datagram: &[u8], seq: u64) -> anyhow::Result<()> {
        self.socket.send(datagram)?;
        let cipher = self.key.cipher();
        let mut buf = [0u8; 64];
        loop {
            let n = self.socket.recv(&mut buf).context("waiting for ack")?;
            let ack = Ack::open(&buf[..n], &cipher)?;
            if ack.seq.0 == seq {
                return Ok(());
            }
        }
    }
}

/// Writes a config file with `toml` into `dir` and returns its path.
///
/// # Errors
/// When the file cannot be written.
pub fn config_file(dir: &Path, toml: &str) -> anyhow::Result<PathBuf> {
    let path = dir.join("gateway.toml");
    std::fs::write(&path, toml)?;
    Ok(path)
}

/// Resident set size of a process, KiB.
///
/// # Errors
/// When /proc cannot be read.
pub fn rss_kib(pid: u32) -> anyhow::Result<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .context("VmRSS")?
        .split_whitespace()
        .next()
        .context("value")?
        .parse()
        .context("number")
}

/// Devices `gateway devices list --format json` reports online.
///
/// # Errors
/// When the verb fails.
pub fn online_count(db: &Path) -> anyhow::Result<usize> {
    let out = gateway(&[
        "devices",
        "list",
        "--format",
        "json",
        "--db",
        db.to_str().context("path")?,
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    Ok(v.as_array()
        .context("array")?
        .iter()
        .filter(|d| d["online"] == true)
        .count())
}

/// GET `path` on the admin API with the token in `token_file`: (status code, body).
///
/// # Errors
/// Connection errors, an unreadable token file or a malformed answer.
pub fn admin_get(
    admin: std::net::SocketAddr,
    token_file: &std::path::Path,
    path: &str,
) -> anyhow::Result<(u16, String)> {
    let token = std::fs::read_to_string(token_file)?;
    let (code, _, body) = http(admin, "GET", path, Some(token.trim()))?;
    Ok((code, body))
}

/// One HTTP/1.1 request with an empty body on a fresh connection: (status, headers, body),
/// the body de-chunked. A response cut before its last chunk is an error.
///
/// # Errors
/// Connection errors or a malformed answer.
pub fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> anyhow::Result<(u16, String, String)> {
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    http_request(addr, method, path, &auth, b"")
}

/// One HTTP/1.1 request on a fresh connection with extra header lines (each ending in CRLF)
/// and a body: (status, headers, body), the body de-chunked.
///
/// # Errors
/// Connection errors or a malformed answer.
pub fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    headers: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{headers}Content-Length: {}\r\n\
         Connection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    s.write_all(&req)?;
    // To the end of the stream, or of the Content-Length (some servers keep the connection
    // open after `Connection: close`).
    let mut raw = Vec::new();
    let mut chunk = [0u8; 64 * 1024];
    let mut want: Option<usize> = None;
    loop {
        if want.is_none()
            && let Some(split) = raw.windows(4).position(|w| w == b"\r\n\r\n")
        {
            let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
            want = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok())
                .map(|len: usize| split + 4 + len);
        }
        if want.is_some_and(|w| raw.len() >= w) {
            break;
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&chunk[..n]);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of headers")?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = &raw[split + 4..];
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .context("no status line")?;
    let chunked = head.lines().any(|l| {
        l.to_ascii_lowercase()
            .starts_with("transfer-encoding: chunked")
    });
    if !chunked {
        return Ok((code, head, String::from_utf8(body.to_vec())?));
    }
    let mut out = Vec::new();
    loop {
        let eol = body
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("response cut inside a chunk header")?;
        let len = usize::from_str_radix(std::str::from_utf8(&body[..eol])?.trim(), 16)?;
        body = &body[eol + 2..];
        if len == 0 {
            break;
        }
        if body.len() < len + 2 {
            bail!(
                "response cut inside a chunk ({} of {len} bytes)",
                body.len()
            );
        }
        out.extend_from_slice(&body[..len]);
        body = &body[len + 2..];
    }
    Ok((code, head, String::from_utf8(out)?))
}

/// The value of metric `name` in Prometheus text (0 when absent).
pub fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// A device's side of a TLS control connection, driven by hand (for hostile and protocol
/// tests).
pub struct ControlClient {
    /// The TLS stream.
    pub tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    buf: Vec<u8>,
}

impl ControlClient {
    /// Connects and runs the TLS handshake trusting `ca`, for the name `localhost`.
    ///
    /// # Errors
    /// Connection or TLS errors.
    pub async fn connect(
        addr: std::net::SocketAddr,
        ca: &std::path::Path,
    ) -> anyhow::Result<ControlClient> {
        let config = device_sim::control::tls_client(ca).map_err(anyhow::Error::msg)?;
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let tls = tokio_rustls::TlsConnector::from(config)
            .connect(name, tcp)
            .await?;
        Ok(ControlClient {
            tls,
            buf: Vec::new(),
        })
    }

    /// The session binding (TLS exporter).
    pub fn binding(&self) -> [u8; 32] {
        let mut b = [0u8; 32];
        self.tls
            .get_ref()
            .1
            .export_keying_material(&mut b, proto::control::TLS_EXPORTER_LABEL, None)
            .expect("exporter");
        b
    }

    /// Sends one message.
    ///
    /// # Errors
    /// Write errors.
    pub async fn send(&mut self, m: &proto::control::DeviceMsg) -> anyhow::Result<()> {
        let mut out = Vec::new();
        proto::control::encode_frame(m, proto::control::MAX_FRAME, &mut out)?;
        self.tls.write_all(&out).await?;
        Ok(self.tls.flush().await?)
    }

    /// The next message, or None when the server closed.
    ///
    /// # Errors
    /// Read errors, undecodable frames.
    pub async fn recv(&mut self) -> anyhow::Result<Option<proto::control::GatewayMsg>> {
        loop {
            if let Some((m, used)) = proto::control::decode_frame::<proto::control::GatewayMsg>(
                &self.buf,
                proto::control::MAX_FRAME,
            )? {
                self.buf.drain(..used);
                return Ok(Some(m));
            }
            self.buf.reserve(4096);
            if self.tls.read_buf(&mut self.buf).await? == 0 {
                return Ok(None);
            }
        }
    }

    /// Runs the handshake with `proof_for` computing the proof from the server nonce and the
    /// binding; returns the gateway's answer.
    ///
    /// # Errors
    /// I/O errors, or no challenge.
    pub async fn handshake(
        &mut self,
        device: DeviceId,
        nonce: [u8; 16],
        proof_for: impl FnOnce([u8; 32], [u8; 32]) -> [u8; 32],
    ) -> anyhow::Result<Option<proto::control::GatewayMsg>> {
        self.send(&proto::control::DeviceMsg::Hello {
            device,
            client_nonce: nonce,
        })
        .await?;
        let Some(proto::control::GatewayMsg::Challenge { server_nonce }) = self.recv().await?
        else {
            anyhow::bail!("no challenge");
        };
        let proof = proof_for(server_nonce, self.binding());
        self.send(&proto::control::DeviceMsg::Auth { proof })
            .await?;
        self.recv().await
    }
}
