//! A real Mosquitto broker per test (on a free port, with persistence so that a stop and a
//! start keep the subscriber's queued messages), a subscriber that records everything, and an
//! independent recomputation of aggregates from stored readings.

use std::collections::BTreeMap;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use serde::Deserialize;

use crate::{Key, Val, config_file, poll_pause, query_all, signal, wait_until};

/// The Mosquitto binary, or an error saying how to install it.
///
/// # Errors
/// When it is not installed.
pub fn mosquitto_bin() -> anyhow::Result<PathBuf> {
    for dir in std::env::var("PATH")
        .unwrap_or_default()
        .split(':')
        .chain(["/usr/sbin", "/usr/local/sbin"])
    {
        let p = Path::new(dir).join("mosquitto");
        if p.is_file() {
            return Ok(p);
        }
    }
    bail!("mosquitto is not installed (apt-get install -y mosquitto); the MQTT tests need it")
}

/// A Mosquitto process of the test's own.
pub struct Broker {
    /// Its port on 127.0.0.1.
    pub port: u16,
    /// A second, TLS listener: its port and the folder of `gateway certs init` files.
    pub tls: Option<(u16, PathBuf)>,
    dir: PathBuf,
    child: Option<Child>,
}

impl Broker {
    /// Starts a broker with its files in `dir`.
    ///
    /// # Errors
    /// When Mosquitto is missing or does not listen within 10 s.
    pub fn start(dir: &Path) -> anyhow::Result<Broker> {
        Self::start_with(dir, None)
    }

    /// Starts a broker with a plain listener and a TLS listener using `server.pem` and
    /// `server.key` of a `gateway certs init` folder; the TLS listener takes user `gateway`
    /// with password `s3cret` only.
    ///
    /// # Errors
    /// As [`Broker::start`].
    pub fn start_tls(dir: &Path, certs: &Path) -> anyhow::Result<Broker> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        Self::start_with(dir, Some((port, certs.to_owned())))
    }

    fn start_with(dir: &Path, tls: Option<(u16, PathBuf)>) -> anyhow::Result<Broker> {
        let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let mut b = Broker {
            port,
            tls,
            dir: dir.to_owned(),
            child: None,
        };
        b.resume()?;
        Ok(b)
    }

    /// `host:port` for `gateway serve --mqtt`.
    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Starts it again after [`Broker::stop`] (same port, same persistent sessions).
    ///
    /// # Errors
    /// When it does not listen within 10 s.
    pub fn resume(&mut self) -> anyhow::Result<()> {
        let conf = self.dir.join("mosquitto.conf");
        // Run as ourselves: as root Mosquitto would switch to its own user, which cannot read
        // the test's files.
        let user = Command::new("id")
            .arg("-un")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|u| u.trim().to_owned())
            .filter(|u| !u.is_empty())
            .unwrap_or_else(|| "root".into());
        let mut text = format!(
            "user {user}\nper_listener_settings true\npersistence true\n\
             persistence_location {dir}/\nautosave_interval 1\nmax_queued_messages 0\n\
             max_queued_bytes 0\n\
             max_inflight_messages 100\nlog_dest file {dir}/mosquitto.log\n\
             listener {port} 127.0.0.1\nallow_anonymous true\n",
            port = self.port,
            dir = self.dir.display()
        );
        if let Some((port, certs)) = &self.tls {
            // The TLS listener also wants a password: user "gateway", password "s3cret".
            let passwords = self.dir.join("passwords");
            std::fs::write(&passwords, "gateway:s3cret\n")?;
            let status = Command::new("mosquitto_passwd")
                .arg("-U")
                .arg(&passwords)
                .status()
                .context("running mosquitto_passwd")?;
            if !status.success() {
                bail!("mosquitto_passwd failed");
            }
            text.push_str(&format!(
                "listener {port} 127.0.0.1\ncertfile {c}/server.pem\nkeyfile {c}/server.key\n\
                 allow_anonymous false\npassword_file {p}\n",
                c = certs.display(),
                p = passwords.display()
            ));
        }
        std::fs::write(&conf, text)?;
        let child = Command::new(mosquitto_bin()?)
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto")?;
        self.child = Some(child);
        let ports = [Some(self.port), self.tls.as_ref().map(|t| t.0)];
        wait_until(Duration::from_secs(10), "mosquitto listening", || {
            Ok(ports
                .iter()
                .flatten()
                .all(|p| TcpStream::connect(("127.0.0.1", *p)).is_ok()))
        })
    }

    /// Kills it with SIGKILL (a crash: nothing is saved) and waits for the exit.
    ///
    /// # Errors
    /// When the signal cannot be sent.
    pub fn kill(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Freezes it with SIGSTOP (`false`) or lets it go on with SIGCONT (`true`): while frozen its
    /// connections stay open and the kernel still completes new TCP handshakes, but nothing is
    /// answered, as behind a network blackhole.
    ///
    /// # Errors
    /// When it is not running or the signal cannot be sent.
    pub fn run_frozen(&mut self, go_on: bool) -> anyhow::Result<()> {
        let child = self.child.as_ref().context("broker not running")?;
        signal(child.id(), if go_on { "CONT" } else { "STOP" })
    }

    /// Stops it with SIGTERM (it saves its persistent sessions) and waits for the exit.
    ///
    /// # Errors
    /// When it does not exit within 10 s.
    pub fn stop(&mut self) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            signal(child.id(), "TERM")?;
            wait_until(Duration::from_secs(10), "mosquitto exit", || {
                Ok(child.try_wait()?.is_some())
            })?;
        }
        Ok(())
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A message as received: topic and payload.
pub type Message = (String, Vec<u8>);

/// A QoS 1 subscriber with a persistent session, recording every message; it reconnects
/// across broker restarts.
pub struct Subscriber {
    messages: Arc<Mutex<Vec<Message>>>,
    connected: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    client: rumqttc::Client,
}

impl Subscriber {
    /// Subscribes to `filter` on `broker` as `client_id` and waits until the subscription is
    /// acknowledged.
    ///
    /// # Errors
    /// When it cannot subscribe within 10 s.
    pub fn start(broker: &Broker, client_id: &str, filter: &str) -> anyhow::Result<Subscriber> {
        let mut opts = rumqttc::MqttOptions::new(client_id, "127.0.0.1", broker.port);
        opts.set_clean_session(false);
        opts.set_keep_alive(Duration::from_secs(5));
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = rumqttc::Client::new(opts, 1024);
        let messages = Arc::new(Mutex::new(Vec::new()));
        let connected = Arc::new(AtomicBool::new(false));
        let subscribed = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (m, c, s, st, cl, f) = (
            messages.clone(),
            connected.clone(),
            subscribed.clone(),
            stop.clone(),
            client.clone(),
            filter.to_owned(),
        );
        let thread = std::thread::spawn(move || {
            for ev in conn.iter() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                match ev {
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::ConnAck(_))) => {
                        c.store(true, Ordering::Relaxed);
                        let _ = cl.try_subscribe(f.clone(), rumqttc::QoS::AtLeastOnce);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_))) => {
                        s.store(true, Ordering::Relaxed);
                    }
                    Ok(rumqttc::Event::Incoming(rumqttc::Packet::Publish(p))) => {
                        m.lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push((p.topic.clone(), p.payload.to_vec()));
                    }
                    Ok(_) => {}
                    Err(_) => {
                        c.store(false, Ordering::Relaxed);
                        // Broker down: try again shortly.
                        poll_pause();
                    }
                }
            }
        });
        wait_until(Duration::from_secs(10), "subscription", || {
            Ok(subscribed.load(Ordering::Relaxed))
        })?;
        Ok(Subscriber {
            messages,
            connected,
            stop,
            thread: Some(thread),
            client,
        })
    }

    /// Everything received so far.
    pub fn messages(&self) -> Vec<Message> {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// How many messages it received.
    pub fn count(&self) -> usize {
        self.messages
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }

    /// Whether it is connected now.
    pub fn connected(&self) -> bool {
        self.connected.load(Ordering::Relaxed)
    }
}

impl Drop for Subscriber {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.client.try_disconnect();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// An aggregate as published.
#[derive(Debug, Clone, Deserialize, PartialEq)]
pub struct AggMsg {
    /// Per-gateway sequence number.
    pub seq: i64,
    /// Gateway id.
    pub gateway: String,
    /// Device.
    pub device: u32,
    /// Sensor.
    pub sensor: u16,
    /// Window start, ms.
    pub window_start_ms: i64,
    /// Window length, ms.
    pub window_ms: u64,
    /// Revision.
    pub revision: u32,
    /// Readings.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub stddev: f64,
    /// Latest value.
    pub last: f64,
    /// Its timestamp.
    pub last_ts_ms: i64,
}

/// Window key: (device, window_ms, start, sensor).
pub type WindowKey = (u32, u64, i64, u16);

/// The aggregate messages among `messages` (topics containing `/agg/`).
///
/// # Errors
/// A payload that does not parse.
pub fn agg_messages(messages: &[Message]) -> anyhow::Result<Vec<AggMsg>> {
    messages
        .iter()
        .filter(|(t, _)| t.contains("/agg/"))
        .map(|(t, p)| serde_json::from_slice(p).with_context(|| format!("payload on {t}")))
        .collect()
}

/// The latest revision of each window among `aggs`.
pub fn latest(aggs: &[AggMsg]) -> BTreeMap<WindowKey, AggMsg> {
    let mut out: BTreeMap<WindowKey, AggMsg> = BTreeMap::new();
    for a in aggs {
        let key = (a.device, a.window_ms, a.window_start_ms, a.sensor);
        if out.get(&key).is_none_or(|b| b.revision <= a.revision) {
            out.insert(key, a.clone());
        }
    }
    out
}

/// Statistics of one window recomputed naively: count, min, max, mean, stddev, last.
#[derive(Debug, Clone)]
pub struct Naive {
    /// Readings.
    pub count: u64,
    /// Smallest.
    pub min: f64,
    /// Largest.
    pub max: f64,
    /// Mean.
    pub mean: f64,
    /// Population standard deviation.
    pub stddev: f64,
    /// Value of the reading with the largest (ts, seq, idx).
    pub last: f64,
}

/// Recomputes every window of the given lengths from stored readings (two passes, sums in
/// a different order than the gateway's running statistics).
pub fn recompute(readings: &BTreeMap<Key, Val>, windows_ms: &[u64]) -> BTreeMap<WindowKey, Naive> {
    /// (ts, seq, idx) and value of one reading.
    type Point = ((i64, u64, u32), f64);
    let mut groups: BTreeMap<WindowKey, Vec<Point>> = BTreeMap::new();
    for (&(device, seq, idx), (sensor, ts, value)) in readings {
        let Ok(v) = value.parse::<f64>() else {
            continue;
        };
        if v.is_nan() {
            continue;
        }
        for &w in windows_ms {
            let start = ts - ts.rem_euclid(w as i64);
            groups
                .entry((device, w, start, *sensor))
                .or_default()
                .push(((*ts, seq, idx), v));
        }
    }
    groups
        .into_iter()
        .map(|(k, vs)| {
            let n = vs.len() as f64;
            let mean = vs.iter().map(|(_, v)| v).sum::<f64>() / n;
            let var = vs.iter().map(|(_, v)| (v - mean).powi(2)).sum::<f64>() / n;
            let last = vs
                .iter()
                .max_by_key(|(key, _)| *key)
                .map_or(f64::NAN, |(_, v)| *v);
            (
                k,
                Naive {
                    count: vs.len() as u64,
                    min: vs.iter().map(|(_, v)| *v).fold(f64::INFINITY, f64::min),
                    max: vs.iter().map(|(_, v)| *v).fold(f64::NEG_INFINITY, f64::max),
                    mean,
                    stddev: var.sqrt(),
                    last,
                },
            )
        })
        .collect()
}

/// Whether a published aggregate matches the naive recomputation (exact count, min, max,
/// last; mean and deviation to 1e-6 relative).
pub fn matches(a: &AggMsg, n: &Naive) -> bool {
    let close = |x: f64, y: f64| (x - y).abs() <= 1e-6 * x.abs().max(y.abs()).max(1.0);
    a.count == n.count
        && a.min == n.min
        && a.max == n.max
        && a.last == n.last
        && close(a.mean, n.mean)
        && close(a.stddev, n.stddev)
}

/// The gateway id the MQTT tests configure.
pub const GW: &str = "gw-test";

/// A config file for a gateway forwarding to `broker`: short windows so that tests see many of
/// them (1 s and 5 s, 500 ms lateness, devices idle after 2 s have their windows closed),
/// reconnects between 200 ms and 2 s, plus `extra` lines in `[mqtt]`.
///
/// # Errors
/// When the file cannot be written.
pub fn mqtt_config(dir: &Path, broker: &Broker, extra: &str) -> anyhow::Result<std::path::PathBuf> {
    config_file(
        dir,
        &format!(
            "[service]\nid = \"{GW}\"\n\n[aggregate]\nwindows = [\"1s\", \"5s\"]\n\
             lateness = \"500ms\"\nidle = \"2s\"\n\n[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\n\
             port = {port}\nreconnect_min = \"200ms\"\nreconnect_max = \"2s\"\n{extra}",
            port = broker.port
        ),
    )
}

/// Windows whose device has been idle long enough to close them: all of them, once the
/// simulator has stopped and the idle time passed.
///
/// # Errors
/// When the database cannot be queried.
pub fn expected_windows(db: &Path) -> anyhow::Result<BTreeMap<WindowKey, Naive>> {
    Ok(recompute(&query_all(db)?, &[1_000, 5_000]))
}

/// Waits until the subscriber holds the latest revision of every window recomputed from the
/// database, then checks each one.
///
/// # Errors
/// When not every window arrives within `timeout`.
pub fn assert_all_delivered(sub: &Subscriber, db: &Path, timeout: Duration) -> anyhow::Result<()> {
    let expected = expected_windows(db)?;
    assert!(!expected.is_empty(), "no readings stored");
    let mut missing = 0;
    let got = wait_until(timeout, "every window at the subscriber", || {
        let got = latest(&agg_messages(&sub.messages())?);
        missing = expected.keys().filter(|k| !got.contains_key(k)).count();
        Ok(missing == 0)
    });
    got.with_context(|| format!("{missing} of {} windows missing", expected.len()))?;
    let got = latest(&agg_messages(&sub.messages())?);
    for (k, n) in &expected {
        let a = &got[k];
        assert!(
            matches(a, n),
            "window {k:?}: published {a:?}, recomputed {n:?}"
        );
        assert_eq!(a.gateway, GW);
    }
    let extra: Vec<_> = got.keys().filter(|k| !expected.contains_key(k)).collect();
    assert!(extra.is_empty(), "windows without readings: {extra:?}");
    Ok(())
}

/// How many messages repeat an earlier one's sequence number (each must be the same message).
pub fn duplicates(aggs: &[AggMsg]) -> usize {
    let mut by_seq: BTreeMap<i64, &AggMsg> = BTreeMap::new();
    let mut dups = 0;
    for a in aggs {
        if let Some(b) = by_seq.insert(a.seq, a) {
            assert_eq!(a, b, "same seq, different content");
            dups += 1;
        }
    }
    dups
}
