//! The MQTT forwarder: publishes the outbox to the broker at QoS 1 and relays commands from
//! the broker to devices.
//!
//! Delivery: a row leaves the outbox only when the broker acknowledged its publish (the
//! writer deletes it and confirms). Each connection starts afresh (a new client, clean
//! session): rows published but unacknowledged when it dropped are simply read again from the
//! outbox, so after an outage at most `max_inflight` messages are sent twice, with the same
//! `seq`. Before reconnecting, the forwarder waits until every acknowledged row is deleted.
//!
//! Order after an outage: rows created after the connection came up are live and go first;
//! older rows (the backlog) drain oldest-first at most `backlog_rate` per second.
//!
//! Reconnects back off exponentially from `reconnect_min` to `reconnect_max` with jitter
//! (a random delay between half and all of the step), so a fleet of gateways does not
//! reconnect in step.
//!
//! Emits: `info` on connect, `warn` when a connection fails or is lost (with the next delay),
//! `warn` for a rejected command.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use proto::DeviceId;
use rand::Rng;
use rumqttc::{
    AsyncClient, Event, EventLoop, LastWill, MqttOptions, Outgoing, Packet, QoS, TlsConfiguration,
    Transport,
};
use serde::Deserialize;
use thiserror::Error;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{Instant, MissedTickBehavior};
use tokio_util::sync::CancellationToken;

use crate::admin::CommandSpec;
use crate::config::MqttConfig;
use crate::control::Registry;
use crate::events::Counters;
use crate::store::commands::ORIGIN_MQTT;
use crate::store::outbox::{Cursors, KIND_CMD_RESULT, OutboxRow};
use crate::store::writer::Item;
use crate::store::{Store, now_ms};

/// Broker connection state, for metrics and `gateway stats`.
#[derive(Debug, Default)]
pub struct MqttState {
    /// Connected to the broker now.
    pub connected: AtomicBool,
    /// Publishes awaiting acknowledgement.
    pub inflight: AtomicU64,
}

/// Why a connection ended.
#[derive(Debug, Error)]
enum SessionError {
    #[error("{0}")]
    Connection(Box<rumqttc::ConnectionError>),
    #[error("{0}")]
    Client(#[from] rumqttc::ClientError),
    #[error("no answer to CONNECT within {0:?}")]
    ConnectTimeout(Duration),
    #[error("outbox: {0}")]
    Store(#[from] crate::store::StoreError),
}

impl From<rumqttc::ConnectionError> for SessionError {
    fn from(e: rumqttc::ConnectionError) -> Self {
        SessionError::Connection(Box::new(e))
    }
}

/// A TLS client configuration could not be built.
#[derive(Debug, Error)]
#[error("mqtt TLS: {path}: {reason}")]
pub struct TlsSetupError {
    path: String,
    reason: String,
}

/// A command as published on `<prefix>/v1/<gateway-id>/cmd/<device-id>`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CloudCommand {
    /// Echoed in the result, so the sender can match it.
    #[serde(default)]
    request_id: Option<String>,
    command: CommandSpec,
    /// How long an undelivered command stays queued, seconds (default one day).
    #[serde(default)]
    ttl_s: Option<u64>,
}

/// The forwarder task.
pub struct Forwarder {
    cfg: MqttConfig,
    gateway_id: String,
    /// `<prefix>/v1/<gateway-id>/`
    base: String,
    store: Store,
    writer: mpsc::Sender<Item>,
    counters: Arc<Counters>,
    sessions: Registry,
    state: Arc<MqttState>,
    tls: Option<TlsConfiguration>,
}

/// The topic prefix of a gateway: `<prefix>/v1/<gateway-id>/`.
pub fn topic_base(prefix: &str, gateway_id: &str) -> String {
    format!("{prefix}/v1/{gateway_id}/")
}

/// The published form of an outbox payload: `seq` and `gateway` first, then the stored fields.
pub fn render(seq: i64, gateway: &str, payload: &str) -> String {
    let gw = serde_json::to_string(gateway).unwrap_or_else(|_| "\"\"".into());
    match payload.strip_prefix('{') {
        Some(rest) if rest.trim_start() != "}" => {
            format!("{{\"seq\":{seq},\"gateway\":{gw},{rest}")
        }
        _ => format!("{{\"seq\":{seq},\"gateway\":{gw}}}"),
    }
}

/// Loads the TLS client configuration of the broker connection.
///
/// # Errors
/// Unreadable or invalid PEM files.
pub fn tls_config(cfg: &MqttConfig) -> Result<Option<TlsConfiguration>, TlsSetupError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    if !cfg.tls {
        return Ok(None);
    }
    let err = |p: &std::path::Path, e: &dyn std::fmt::Display| TlsSetupError {
        path: p.display().to_string(),
        reason: e.to_string(),
    };
    let Some(ca) = &cfg.ca else {
        return Err(TlsSetupError {
            path: "mqtt.ca".into(),
            reason: "required with mqtt.tls".into(),
        });
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(|e| err(ca, &e))? {
        roots
            .add(cert.map_err(|e| err(ca, &e))?)
            .map_err(|e| err(ca, &e))?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::control::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| err(ca, &e))?
        .with_root_certificates(roots);
    let config = match (&cfg.client_cert, &cfg.client_key) {
        (Some(cert), Some(key)) => {
            let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
                .map_err(|e| err(cert, &e))?
                .collect::<Result<_, _>>()
                .map_err(|e| err(cert, &e))?;
            let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| err(key, &e))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| err(cert, &e))?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Some(TlsConfiguration::Rustls(Arc::new(config))))
}

/// State of one connection.
struct Conn {
    client: AsyncClient,
    /// What each publish handed to the client is, in order: an outbox row or a status message.
    fifo: VecDeque<Option<i64>>,
    /// Packet id → outbox seq, for publishes on the wire.
    inflight: HashMap<u16, i64>,
    /// Acknowledged, not yet handed to the writer for deletion.
    acked: Vec<i64>,
    /// Which outbox rows to read next (live and backlog).
    cursors: Cursors,
    tokens: f64,
    refilled: Instant,
}

impl Forwarder {
    /// A forwarder for `cfg`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: MqttConfig,
        gateway_id: String,
        store: Store,
        writer: mpsc::Sender<Item>,
        counters: Arc<Counters>,
        sessions: Registry,
        state: Arc<MqttState>,
        tls: Option<TlsConfiguration>,
    ) -> Self {
        let base = topic_base(&cfg.topic_prefix, &gateway_id);
        Self {
            cfg,
            gateway_id,
            base,
            store,
            writer,
            counters,
            sessions,
            state,
            tls,
        }
    }

    /// Connects, forwards and reconnects until `cancel`.
    pub async fn run(self, cancel: CancellationToken) {
        let mut step = self.cfg.reconnect_min;
        let mut pending: Vec<oneshot::Receiver<()>> = Vec::new();
        loop {
            let started = Instant::now();
            let result = self.session(&cancel, &mut pending).await;
            self.state.connected.store(false, Relaxed);
            self.counters.mqtt_connected.store(0, Relaxed);
            self.state.inflight.store(0, Relaxed);
            // Everything acknowledged must be deleted before rows are read again.
            for rx in pending.drain(..) {
                let _ = rx.await;
            }
            if cancel.is_cancelled() {
                return;
            }
            // A connection that lasted resets the backoff.
            if started.elapsed() > self.cfg.reconnect_max {
                step = self.cfg.reconnect_min;
            }
            let delay = step.mul_f64(rand::rng().random_range(0.5..=1.0));
            match result {
                Ok(()) => {}
                Err(error) => {
                    tracing::warn!(%error, retry_in = ?delay, broker = %self.cfg.host, "MQTT connection failed or lost")
                }
            }
            step = (step * 2).min(self.cfg.reconnect_max);
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    fn options(&self) -> MqttOptions {
        let client_id = self
            .cfg
            .client_id
            .clone()
            .unwrap_or_else(|| self.gateway_id.clone());
        let mut o = MqttOptions::new(client_id, self.cfg.host.clone(), self.cfg.port);
        o.set_keep_alive(self.cfg.keep_alive);
        // A persistent session: commands published while the gateway is away wait at the
        // broker. Our own unacknowledged publishes are not taken from the session but re-read
        // from the outbox (each connection uses a fresh client).
        o.set_clean_session(false);
        o.set_manual_acks(true);
        // Packet ids wrap at the client's in-flight bound; a larger bound than ours keeps ids
        // from colliding when the broker acknowledges out of order.
        o.set_inflight(self.cfg.max_inflight.saturating_mul(4).max(16));
        o.set_request_channel_capacity(usize::from(self.cfg.max_inflight) * 2 + 16);
        o.set_max_packet_size(1 << 20, 1 << 20);
        o.set_last_will(LastWill::new(
            format!("{}status", self.base),
            self.status_payload(false),
            QoS::AtLeastOnce,
            true,
        ));
        if let Some(user) = &self.cfg.username {
            o.set_credentials(user.clone(), self.cfg.password.clone().unwrap_or_default());
        }
        if let Some(tls) = &self.tls {
            o.set_transport(Transport::Tls(tls.clone()));
        }
        o
    }

    fn status_payload(&self, online: bool) -> String {
        serde_json::json!({
            "gateway": self.gateway_id,
            "online": online,
            "ts_ms": now_ms(),
        })
        .to_string()
    }

    async fn connect(&self) -> Result<(AsyncClient, EventLoop), SessionError> {
        let (client, mut el) =
            AsyncClient::new(self.options(), usize::from(self.cfg.max_inflight) * 2 + 16);
        let limit = Duration::from_secs(10);
        let deadline = Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, el.poll()).await {
                Ok(Ok(Event::Incoming(Packet::ConnAck(_)))) => return Ok((client, el)),
                Ok(Ok(_)) => {}
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(SessionError::ConnectTimeout(limit)),
            }
        }
    }

    async fn session(
        &self,
        cancel: &CancellationToken,
        pending: &mut Vec<oneshot::Receiver<()>>,
    ) -> Result<(), SessionError> {
        let (client, mut el) = tokio::select! {
            _ = cancel.cancelled() => return Ok(()),
            r = self.connect() => r?,
        };
        self.state.connected.store(true, Relaxed);
        self.counters.mqtt_connected.store(1, Relaxed);
        self.counters.mqtt_connects.fetch_add(1, Relaxed);
        let cursors = Cursors::new(self.store.outbox_last_seq().await?);
        tracing::info!(broker = %self.cfg.host, port = self.cfg.port, backlog_below = cursors.live_from, "MQTT connected");
        let mut c = Conn {
            client,
            fifo: VecDeque::new(),
            inflight: HashMap::new(),
            acked: Vec::new(),
            cursors,
            tokens: 0.0,
            refilled: Instant::now(),
        };
        c.client.try_publish(
            format!("{}status", self.base),
            QoS::AtLeastOnce,
            true,
            self.status_payload(true),
        )?;
        c.fifo.push_back(None);
        c.client
            .try_subscribe(format!("{}cmd/+", self.base), QoS::AtLeastOnce)?;
        let result = self.pump(&mut c, &mut el, cancel, pending).await;
        // Whatever ended the connection, acknowledged rows go to the writer before anything
        // is read again.
        self.hand_over(&mut c, pending).await;
        result
    }

    /// The connection's loop: fill the window, handle events, hand over acknowledgements.
    async fn pump(
        &self,
        c: &mut Conn,
        el: &mut EventLoop,
        cancel: &CancellationToken,
        pending: &mut Vec<oneshot::Receiver<()>>,
    ) -> Result<(), SessionError> {
        let mut tick = tokio::time::interval(Duration::from_millis(50));
        tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
        loop {
            self.fill(c).await?;
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    self.goodbye(c, el, pending).await;
                    return Ok(());
                }
                ev = el.poll() => match ev {
                    Ok(Event::Outgoing(Outgoing::Publish(pkid))) => {
                        if let Some(Some(seq)) = c.fifo.pop_front() {
                            c.inflight.insert(pkid, seq);
                        }
                    }
                    Ok(Event::Incoming(Packet::PubAck(ack))) => {
                        if let Some(seq) = c.inflight.remove(&ack.pkid) {
                            c.acked.push(seq);
                            self.counters.mqtt_published.fetch_add(1, Relaxed);
                            if c.acked.len() >= 256 {
                                self.hand_over(c, pending).await;
                            }
                        }
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        self.command(&p).await;
                        // Acknowledged only once the command is stored.
                        c.client.try_ack(&p)?;
                    }
                    Ok(_) => {}
                    Err(e) => return Err(e.into()),
                },
                _ = self.store.outbox().added.notified() => c.cursors.wake(),
                _ = tick.tick() => {
                    c.cursors.wake();
                    self.hand_over(c, pending).await;
                }
            }
            self.state
                .inflight
                .store((c.inflight.len() + c.fifo.len()) as u64, Relaxed);
        }
    }

    /// Hands acknowledged rows to the writer for deletion.
    async fn hand_over(&self, c: &mut Conn, pending: &mut Vec<oneshot::Receiver<()>>) {
        if c.acked.is_empty() {
            return;
        }
        let (tx, rx) = oneshot::channel();
        let seqs = std::mem::take(&mut c.acked);
        if self
            .writer
            .send(Item::Delivered { seqs, done: tx })
            .await
            .is_ok()
        {
            pending.push(rx);
        }
        // Keep only the unanswered ones.
        pending.retain_mut(|rx| matches!(rx.try_recv(), Err(oneshot::error::TryRecvError::Empty)));
    }

    /// Publishes what fits in the in-flight window: live rows first, then the backlog within
    /// its rate.
    async fn fill(&self, c: &mut Conn) -> Result<(), SessionError> {
        let max = usize::from(self.cfg.max_inflight);
        let busy = |c: &Conn| c.inflight.len() + c.fifo.len();
        // Refill in chunks, not one query per acknowledgement.
        if max - busy(c).min(max) < (max / 4).max(1) {
            return Ok(());
        }
        let room = max - busy(c).min(max);
        if let Some(read) = c.cursors.live_read(room) {
            let rows = self
                .store
                .outbox_after(read.after, read.before, read.limit)
                .await?;
            c.cursors
                .live_done(read, rows.len(), rows.last().map(|r| r.seq));
            self.publish(c, rows)?;
        }
        if !c.cursors.backlog_done() {
            let now = Instant::now();
            let rate = f64::from(self.cfg.backlog_rate);
            c.tokens = (c.tokens + rate * now.duration_since(c.refilled).as_secs_f64())
                .min((rate / 10.0).max(1.0));
            c.refilled = now;
            let room = (max - busy(c).min(max)).min(c.tokens as usize);
            if let Some(read) = c.cursors.backlog_read(room) {
                let rows = self
                    .store
                    .outbox_after(read.after, read.before, read.limit)
                    .await?;
                c.cursors
                    .backlog_done_reading(read, rows.len(), rows.last().map(|r| r.seq));
                c.tokens -= rows.len() as f64;
                self.publish(c, rows)?;
            }
        }
        Ok(())
    }

    fn publish(&self, c: &mut Conn, rows: Vec<OutboxRow>) -> Result<(), SessionError> {
        for r in rows {
            let payload = render(r.seq, &self.gateway_id, &r.payload);
            c.client.try_publish(
                format!("{}{}", self.base, r.topic),
                QoS::AtLeastOnce,
                false,
                payload,
            )?;
            c.fifo.push_back(Some(r.seq));
        }
        Ok(())
    }

    /// On shutdown: hand over what was acknowledged, publish the retained offline status and
    /// disconnect, waiting briefly for the broker.
    async fn goodbye(
        &self,
        c: &mut Conn,
        el: &mut EventLoop,
        pending: &mut Vec<oneshot::Receiver<()>>,
    ) {
        let _ = c.client.try_publish(
            format!("{}status", self.base),
            QoS::AtLeastOnce,
            true,
            self.status_payload(false),
        );
        let _ = c.client.try_disconnect();
        let deadline = Instant::now() + Duration::from_millis(500);
        while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, el.poll()).await {
            match ev {
                Event::Outgoing(Outgoing::Publish(pkid)) => {
                    if let Some(Some(seq)) = c.fifo.pop_front() {
                        c.inflight.insert(pkid, seq);
                    }
                }
                Event::Incoming(Packet::PubAck(ack)) => {
                    if let Some(seq) = c.inflight.remove(&ack.pkid) {
                        c.acked.push(seq);
                    }
                }
                Event::Outgoing(Outgoing::Disconnect) => break,
                _ => {}
            }
        }
        self.hand_over(c, pending).await;
    }

    /// A command from the broker: stored and relayed to the device, or answered `rejected`.
    async fn command(&self, p: &rumqttc::Publish) {
        self.counters.mqtt_commands.fetch_add(1, Relaxed);
        let device = p
            .topic
            .strip_prefix(&self.base)
            .and_then(|t| t.strip_prefix("cmd/"))
            .and_then(|d| d.parse::<u32>().ok());
        // The request id is echoed even when the rest of the command is invalid.
        let value: Result<serde_json::Value, String> =
            serde_json::from_slice(&p.payload).map_err(|e| format!("invalid JSON: {e}"));
        let request_id = value
            .as_ref()
            .ok()
            .and_then(|v| v.get("request_id"))
            .and_then(|r| r.as_str())
            .map(str::to_owned);
        let parsed: Result<CloudCommand, String> = value
            .and_then(|v| serde_json::from_value(v).map_err(|e| format!("invalid command: {e}")));
        let result = match (device, parsed) {
            // A retained command would run again at every reconnect.
            _ if p.retain => Err("retained commands are not accepted".to_owned()),
            (None, _) => Err("topic does not name a device id".to_owned()),
            (Some(_), Err(e)) => Err(e),
            (Some(d), Ok(cmd)) => self.relay(DeviceId(d), cmd).await,
        };
        if let Err(reason) = result {
            tracing::warn!(topic = %p.topic, %reason, "command from the broker rejected");
            let payload = serde_json::json!({
                "device": device,
                "command_id": null,
                "request_id": request_id,
                "status": "rejected",
                "detail": reason,
            })
            .to_string();
            let topic = format!(
                "cmd-result/{}",
                device.map_or("unknown".into(), |d| d.to_string())
            );
            if let Err(error) = self
                .store
                .outbox_insert(KIND_CMD_RESULT, &topic, &payload)
                .await
            {
                tracing::warn!(%error, "could not queue a command result");
            }
        }
    }

    async fn relay(&self, device: DeviceId, cmd: CloudCommand) -> Result<(), String> {
        let command = cmd.command.to_command()?;
        if !crate::control::command_fits(&command) {
            return Err(format!(
                "command larger than a control frame ({} bytes)",
                proto::control::MAX_FRAME
            ));
        }
        match self.store.device_key(device).await {
            Ok(Some(_)) => {}
            Ok(None) => return Err(format!("no device {}", device.0)),
            Err(e) => return Err(e.to_string()),
        }
        let ttl_ms = cmd
            .ttl_s
            .unwrap_or(86_400)
            .saturating_mul(1000)
            .min(i64::MAX as u64) as i64;
        crate::control::queue_command(
            &self.store,
            &self.sessions,
            &[device],
            &command,
            ttl_ms,
            Some((ORIGIN_MQTT, cmd.request_id.as_deref())),
        )
        .await
        .map(|_| ())
        .map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn render_adds_seq_and_gateway_first() {
        assert_eq!(
            render(7, "gw-1", r#"{"device":3}"#),
            r#"{"seq":7,"gateway":"gw-1","device":3}"#
        );
        assert_eq!(render(1, "g", "{}"), r#"{"seq":1,"gateway":"g"}"#);
        let v: serde_json::Value =
            serde_json::from_str(&render(2, "a\"b", r#"{"x":1}"#)).expect("valid JSON");
        assert_eq!(v["gateway"], "a\"b");
    }
}
