//! Control sessions end to end: thousands of TLS sessions, presence, and hostile clients.

use std::time::Duration;

use anyhow::Context;

use e2e::ControlClient as Client;
use e2e::*;
use proto::control::{DenyReason, DeviceMsg, GatewayMsg, MAX_FRAME, auth_proof, encode_frame};
use proto::{DeviceId, DeviceKey};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// 2,000 devices hold TLS sessions; all show online; killing the simulator turns them offline
/// within heartbeat × missed heartbeats (plus the presence writer's moment).
#[test]
fn two_thousand_sessions_online_then_offline() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2000)?;
    let cfg = config_file(
        dir.path(),
        "[control]\nheartbeat = \"1s\"\nmissed_heartbeats = 2\n",
    )?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let ca = dir.path().join("certs/ca.pem");
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args(["--rate", "1", "--batch", "1", "--duration", "120s"])
        .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
        .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    wait_until(Duration::from_secs(90), "2000 devices online", || {
        Ok(online_count(&db)? == 2000)
    })?;
    child.kill()?;
    child.wait()?;
    let t0 = std::time::SystemTime::now();
    wait_until(Duration::from_secs(20), "all devices offline", || {
        Ok(online_count(&db)? == 0)
    })?;
    let took = t0.elapsed()?;
    // A killed process closes its sockets, so most sessions end at once; a session whose close
    // was lost ends by missed heartbeats (2 s).
    assert!(took < Duration::from_secs(5), "offline after {took:?}");
    gw.stop()?;
    Ok(())
}

/// Closed (EOF or reset) within `within`.
async fn closed_within(stream: &mut tokio::net::TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => {}
        }
    }
}

#[test]
fn hostile_clients_are_refused_and_cost_little() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let cfg = config_file(dir.path(), "[control]\nhandshake_timeout = \"2s\"\n")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let ca = dir.path().join("certs/ca.pem");
    let fleet = device_sim::fleet::FleetFile::load(&fleet)?;
    let dev = &fleet.devices[0];
    let (id, key) = (dev.device_id(), dev.device_key()?);
    let addr = gw.control;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let idle_rss = rss_kib(gw.child.id())?;
    rt.block_on(async {
        // A legitimate session, and what an eavesdropper inside it would have seen.
        let mut c = Client::connect(addr, &ca).await?;
        let nonce = [5u8; 16];
        let mut recorded = [0u8; 32];
        let welcome = c
            .handshake(id, nonce, |server, binding| {
                recorded = auth_proof(&key, id, &nonce, &server, &binding);
                recorded
            })
            .await?;
        assert!(
            matches!(welcome, Some(GatewayMsg::Welcome { .. })),
            "{welcome:?}"
        );

        // Replaying the recorded proof in a new session fails: new nonce, new TLS binding.
        let mut r = Client::connect(addr, &ca).await?;
        let answer = r.handshake(id, nonce, |_, _| recorded).await?;
        assert_eq!(
            answer,
            Some(GatewayMsg::Denied {
                reason: DenyReason::AuthFailed
            })
        );
        // A wrong key fails the same way, and so does an unknown device.
        let wrong = DeviceKey([9; 32]);
        let mut w = Client::connect(addr, &ca).await?;
        let answer = w
            .handshake(id, nonce, |s, b| auth_proof(&wrong, id, &nonce, &s, &b))
            .await?;
        assert!(matches!(answer, Some(GatewayMsg::Denied { .. })));
        let mut u = Client::connect(addr, &ca).await?;
        let stranger = DeviceId(4242);
        let answer = u
            .handshake(stranger, nonce, |s, b| {
                auth_proof(&key, stranger, &nonce, &s, &b)
            })
            .await?;
        assert!(matches!(answer, Some(GatewayMsg::Denied { .. })));

        // Plain TCP speaking the protocol to the TLS listener: closed, never answered.
        let mut plain = tokio::net::TcpStream::connect(addr).await?;
        let mut hello = Vec::new();
        encode_frame(
            &DeviceMsg::Hello {
                device: id,
                client_nonce: nonce,
            },
            MAX_FRAME,
            &mut hello,
        )?;
        plain.write_all(&hello).await?;
        assert!(
            closed_within(&mut plain, Duration::from_secs(3)).await,
            "plain TCP not closed"
        );

        // A 4 GiB length prefix after a good TLS handshake: closed at once.
        let mut big = Client::connect(addr, &ca).await?;
        big.tls.write_all(&[0xff, 0xff, 0xff, 0xff]).await?;
        big.tls.flush().await?;
        let t = tokio::time::timeout(Duration::from_secs(2), big.recv()).await;
        assert!(
            matches!(t, Ok(Ok(None)) | Ok(Err(_))),
            "4 GiB prefix not closed: {t:?}"
        );

        // 500 connections that never start their handshake, and 100 that send a real
        // ClientHello and then stall (the server has answered; it waits for their Finished).
        let mut stalled = Vec::new();
        for _ in 0..500 {
            stalled.push(tokio::net::TcpStream::connect(addr).await?);
        }
        let config = device_sim::control::tls_client(&ca).map_err(anyhow::Error::msg)?;
        for _ in 0..100 {
            let name = rustls::pki_types::ServerName::try_from("localhost")?;
            let mut conn = rustls::ClientConnection::new(config.clone(), name)?;
            let mut hello = Vec::new();
            conn.write_tls(&mut hello)?;
            let mut tcp = tokio::net::TcpStream::connect(addr).await?;
            tcp.write_all(&hello).await?;
            stalled.push(tcp);
        }
        // A legitimate device still gets in quickly.
        let t0 = tokio::time::Instant::now();
        let mut late = Client::connect(addr, &ca).await?;
        let dev2 = &fleet.devices[1];
        let (id2, key2) = (dev2.device_id(), dev2.device_key()?);
        let ok = late
            .handshake(id2, nonce, |s, b| auth_proof(&key2, id2, &nonce, &s, &b))
            .await?;
        let took = t0.elapsed();
        assert!(matches!(ok, Some(GatewayMsg::Welcome { .. })), "{ok:?}");
        assert!(
            took < Duration::from_secs(1),
            "legitimate handshake took {took:?}"
        );
        // Every stalled connection is closed by the handshake timeout (2 s).
        for s in &mut stalled {
            assert!(
                closed_within(s, Duration::from_secs(5)).await,
                "stalled connection kept"
            );
        }
        anyhow::Ok(())
    })?;
    let rss = rss_kib(gw.child.id())?;
    assert!(
        rss < idle_rss + 50 * 1024,
        "RSS grew from {idle_rss} KiB to {rss} KiB"
    );
    gw.stop()?;
    Ok(())
}

/// The next command on the session, if one comes within 2 s (Err on timeout).
async fn next_command(
    c: &mut Client,
) -> Result<
    anyhow::Result<Option<(proto::control::CommandId, proto::control::Command)>>,
    tokio::time::error::Elapsed,
> {
    let fut = async {
        loop {
            match c.recv().await? {
                Some(GatewayMsg::Command { id, command }) => return Ok(Some((id, command))),
                Some(_) => {}
                None => return Ok(None),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), fut).await
}

/// A command the device never answered is sent again, with the same id, on its next session;
/// once answered it is not sent again.
#[test]
fn unanswered_commands_are_resent_with_the_same_id() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 1)?;
    let gw = TestGateway::start(&db, &[])?;
    let ca = dir.path().join("certs/ca.pem");
    let fleet = device_sim::fleet::FleetFile::load(&fleet)?;
    let (id, key) = (fleet.devices[0].device_id(), fleet.devices[0].device_key()?);
    let admin = gw.admin.to_string();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nonce = [1u8; 16];
    let connect = || async {
        let mut c = Client::connect(gw.control, &ca).await?;
        let w = c
            .handshake(id, nonce, |s, b| auth_proof(&key, id, &nonce, &s, &b))
            .await?;
        anyhow::ensure!(matches!(w, Some(GatewayMsg::Welcome { .. })), "{w:?}");
        anyhow::Ok(c)
    };
    rt.block_on(async {
        let mut c = connect().await?;
        let out = gateway(&[
            "commands",
            "send",
            "--device",
            "1",
            "reboot",
            "--admin",
            &admin,
            "--db",
            path(&db),
        ])?;
        anyhow::ensure!(out.contains("1 sent to online devices"), "{out}");
        let (first, command) = next_command(&mut c).await??.expect("a command");
        assert_eq!(command, proto::control::Command::Reboot);
        drop(c); // cut the session without answering
        let mut c = connect().await?;
        let (again, _) = next_command(&mut c).await??.expect("the command again");
        assert_eq!(again, first, "resent with the same id");
        c.send(&DeviceMsg::CommandResult {
            id: again,
            outcome: proto::control::CommandOutcome::Done,
            detail: String::new(),
        })
        .await?;
        // A heartbeat round trip proves the gateway handled the answer before we leave.
        c.send(&DeviceMsg::Heartbeat).await?;
        while !matches!(c.recv().await?, Some(GatewayMsg::HeartbeatAck) | None) {}
        drop(c);
        let mut c = connect().await?;
        assert!(
            next_command(&mut c).await.is_err(),
            "an answered command is not resent"
        );
        anyhow::Ok(())
    })?;
    let out = gateway(&[
        "commands",
        "list",
        "--format",
        "json",
        "--admin",
        &admin,
        "--db",
        path(&db),
    ])?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert_eq!(rows.len(), 1);
    assert_eq!(rows[0]["status"], "acknowledged");
    gw.stop()?;
    Ok(())
}

/// A second authenticated session of the same device replaces the first, which is told so;
/// the device stays online.
#[test]
fn a_new_session_replaces_the_old_one() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 1)?;
    let gw = TestGateway::start(&db, &[])?;
    let ca = dir.path().join("certs/ca.pem");
    let fleet = device_sim::fleet::FleetFile::load(&fleet)?;
    let (id, key) = (fleet.devices[0].device_id(), fleet.devices[0].device_key()?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let nonce = [2u8; 16];
        let mut old = Client::connect(gw.control, &ca).await?;
        old.handshake(id, nonce, |s, b| auth_proof(&key, id, &nonce, &s, &b))
            .await?;
        let mut new = Client::connect(gw.control, &ca).await?;
        let w = new
            .handshake(id, nonce, |s, b| auth_proof(&key, id, &nonce, &s, &b))
            .await?;
        assert!(matches!(w, Some(GatewayMsg::Welcome { .. })));
        let told = loop {
            match old.recv().await? {
                Some(GatewayMsg::Denied { reason }) => break Some(reason),
                Some(_) => {}
                None => break None,
            }
        };
        assert_eq!(told, Some(DenyReason::Replaced));
        new.send(&DeviceMsg::Heartbeat).await?;
        while !matches!(new.recv().await?, Some(GatewayMsg::HeartbeatAck) | None) {}
        // The old session ending must not mark the device offline while the new one lives.
        wait_until(Duration::from_secs(5), "device online", || {
            Ok(online_count(&db)? == 1)
        })?;
        anyhow::Ok(())
    })?;
    gw.stop()?;
    Ok(())
}

/// Connections past the per-address limit are closed at once; the API wants its token, except
/// for /healthz; /metrics speaks Prometheus.
#[test]
fn session_limits_and_admin_auth() -> anyhow::Result<()> {
    use std::io::{Read, Write};
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    provision(dir.path(), &db, 1)?;
    let cfg = config_file(dir.path(), "[control]\nmax_sessions_per_ip = 5\n")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let mut conns = Vec::new();
        for _ in 0..10 {
            conns.push(tokio::net::TcpStream::connect(gw.control).await?);
        }
        let mut closed = 0;
        for c in &mut conns {
            if closed_within(c, Duration::from_millis(500)).await {
                closed += 1;
            }
        }
        assert_eq!(
            closed, 5,
            "five over the per-address limit are closed at once"
        );
        anyhow::Ok(())
    })?;
    let http = |req: &str| -> anyhow::Result<String> {
        let mut s = std::net::TcpStream::connect(gw.admin)?;
        s.write_all(req.as_bytes())?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    let health = http("GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    assert!(
        health.starts_with("HTTP/1.1 200") && health.ends_with("ok"),
        "{health}"
    );
    let denied = http("GET /api/v1/devices HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
    assert!(denied.starts_with("HTTP/1.1 401"), "{denied}");
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let metrics = http(&format!(
        "GET /metrics HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
    ))?;
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
    assert!(
        metrics.contains("gateway_control_rejected_busy_total 5"),
        "{metrics}"
    );
    let err = gateway(&[
        "commands",
        "list",
        "--token",
        "wrong",
        "--admin",
        &gw.admin.to_string(),
    ])
    .unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(dir.path().join("admin.token"))?
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600);
    gw.stop()?;
    Ok(())
}

/// A plain TCP connection from `from` (another loopback address) to `to`.
async fn connect_from(
    from: std::net::IpAddr,
    to: std::net::SocketAddr,
) -> anyhow::Result<tokio::net::TcpStream> {
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.bind(std::net::SocketAddr::new(from, 0))?;
    Ok(socket.connect(to).await?)
}

/// A source that fails more connections than its budget is closed at accept, without TLS,
/// until it is back under the rate; a device from another address is not affected and still
/// gets in within a second.
#[test]
fn a_source_failing_too_often_is_limited_and_no_one_else() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 1)?;
    let cfg = config_file(
        dir.path(),
        "[control]\nauth_failures_per_s = 1\nauth_failures_burst = 5\n",
    )?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let ca = dir.path().join("certs/ca.pem");
    let token = dir.path().join("admin.token");
    let fleet = device_sim::fleet::FleetFile::load(&fleet)?;
    let (id, key) = (fleet.devices[0].device_id(), fleet.devices[0].device_key()?);
    let hostile: std::net::IpAddr = [127, 0, 0, 2].into();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        // Twenty connections that speak garbage instead of TLS: each fails its handshake.
        for _ in 0..20 {
            let mut c = connect_from(hostile, gw.control).await?;
            c.write_all(b"GET / HTTP/1.0\r\n\r\n").await?;
            assert!(closed_within(&mut c, Duration::from_secs(3)).await);
        }
        let (_, m) = admin_get(gw.admin, &token, "/metrics")?;
        let failed = metric(&m, "gateway_control_rejected_handshake_total");
        let limited = metric(&m, "gateway_control_rejected_limited_total");
        // Five fail within the burst (plus at most one refilled); the rest never reach TLS.
        assert!((5..=8).contains(&failed), "handshake failures {failed}");
        assert_eq!(failed + limited, 20, "{m}");
        // Still limited: closed at once, before any TLS.
        let mut c = connect_from(hostile, gw.control).await?;
        assert!(closed_within(&mut c, Duration::from_millis(500)).await);
        // A device from another address gets in at once.
        let t0 = tokio::time::Instant::now();
        let mut dev = Client::connect(gw.control, &ca).await?;
        let nonce = [3u8; 16];
        let ok = dev
            .handshake(id, nonce, |s, b| auth_proof(&key, id, &nonce, &s, &b))
            .await?;
        assert!(matches!(ok, Some(GatewayMsg::Welcome { .. })), "{ok:?}");
        assert!(
            t0.elapsed() < Duration::from_secs(1),
            "took {:?}",
            t0.elapsed()
        );
        anyhow::Ok(())
    })?;
    // The limit ends: at 1 failure a second the hostile address is let in again (its TLS
    // handshake is served) within a few seconds of its last failure.
    let config = device_sim::control::tls_client(&ca).map_err(anyhow::Error::msg)?;
    wait_until(
        Duration::from_secs(10),
        "the hostile address let in again",
        || {
            rt.block_on(async {
                let tcp = connect_from(hostile, gw.control).await?;
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await;
                anyhow::Ok(tls.is_ok())
            })
        },
    )?;
    gw.stop()?;
    Ok(())
}

/// `gateway devices revoke ID` through the running gateway: the device's live session is closed,
/// a new one is denied, its datagrams are dropped as `revoked` and never acked, while another
/// device carries on; after a restart the revocation still holds.
#[test]
fn a_revoked_device_is_refused_at_once_and_after_a_restart() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet_path = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    let ca = dir.path().join("certs/ca.pem");
    let fleet = device_sim::fleet::FleetFile::load(&fleet_path)?;
    let (id, key) = (fleet.devices[0].device_id(), fleet.devices[0].device_key()?);
    let revoked = RawDevice::new(&fleet_path, 0, gw.udp)?;
    let other = RawDevice::new(&fleet_path, 1, gw.udp)?;
    revoked.send_acked(&revoked.datagram(0, 3), 0)?;
    other.send_acked(&other.datagram(0, 3), 0)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nonce = [7u8; 16];
    let mut session = rt.block_on(async {
        let mut c = Client::connect(gw.control, &ca).await?;
        let ok = c
            .handshake(id, nonce, |s, b| auth_proof(&key, id, &nonce, &s, &b))
            .await?;
        anyhow::ensure!(matches!(ok, Some(GatewayMsg::Welcome { .. })), "{ok:?}");
        anyhow::Ok(c)
    })?;
    let out = gateway(&[
        "devices",
        "revoke",
        &id.0.to_string(),
        "--admin",
        &gw.admin.to_string(),
        "--db",
        path(&db),
    ])?;
    assert!(out.contains("live session was closed"), "{out}");
    rt.block_on(async {
        // The live session ends (what was in flight before the close may still arrive).
        let end = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match session.recv().await {
                    Ok(Some(_)) => continue,
                    other => return other,
                }
            }
        })
        .await;
        assert!(
            matches!(end, Ok(Ok(None)) | Ok(Err(_))),
            "session not closed: {end:?}"
        );
        let mut again = Client::connect(gw.control, &ca).await?;
        let answer = again
            .handshake(id, nonce, |s, b| auth_proof(&key, id, &nonce, &s, &b))
            .await?;
        assert_eq!(
            answer,
            Some(GatewayMsg::Denied {
                reason: DenyReason::AuthFailed
            })
        );
        anyhow::Ok(())
    })?;
    // Datagrams of the revoked device are not acked; the other device's still are.
    revoked
        .socket
        .set_read_timeout(Some(Duration::from_millis(300)))?;
    assert!(revoked.send_acked(&revoked.datagram(1, 3), 1).is_err());
    other.send_acked(&other.datagram(1, 3), 1)?;
    gw.stop()?;
    let s = stats(&db)?;
    assert_eq!(counter(&s, "drop_revoked"), 1);
    // After a restart it is still refused.
    let gw = TestGateway::start(&db, &[])?;
    let revoked = RawDevice::new(&fleet_path, 0, gw.udp)?;
    revoked
        .socket
        .set_read_timeout(Some(Duration::from_millis(300)))?;
    assert!(revoked.send_acked(&revoked.datagram(2, 3), 2).is_err());
    let other = RawDevice::new(&fleet_path, 1, gw.udp)?;
    other.send_acked(&other.datagram(2, 3), 2)?;
    gw.stop()?;
    let s = stats(&db)?;
    assert_eq!(
        counter(&s, "drop_revoked"),
        2,
        "counters persist across runs"
    );
    let stored = query_all(&db)?;
    let of = |d: u32| stored.keys().filter(|k| k.0 == d).count();
    assert_eq!(of(id.0), 3, "only the datagram before the revocation");
    assert_eq!(of(fleet.devices[1].id), 9);
    let list = gateway(&["devices", "list", "--db", path(&db)])?;
    assert!(list.contains("revoked"), "{list}");
    // Revoking an unknown device is an error, not a silent success.
    let err = gateway(&["devices", "revoke", "999", "--db", path(&db)]).unwrap_err();
    assert!(err.to_string().contains("no device 999"), "{err}");
    Ok(())
}

/// `gateway devices rotate-key` under load with acks: one device rotated while offline (it gets
/// the key when it connects), one while its session is live. Every acked reading is stored,
/// nothing is left unacked across the switch, the simulator's fleet file holds the new keys,
/// the old keys are refused on both channels, and the new ones work after a restart.
#[test]
fn a_rotated_key_replaces_the_old_one_without_losing_an_acked_reading() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet_path = provision(dir.path(), &db, 3)?;
    // Device 3's sequence numbers below 100 are left for this test's own datagrams.
    let mut fleet = device_sim::fleet::FleetFile::load(&fleet_path)?;
    fleet.devices[2].next_seq = 100;
    fleet.save(&fleet_path)?;
    let original = dir.path().join("original-fleet.json");
    std::fs::copy(&fleet_path, &original)?;
    let gw = TestGateway::start(&db, &[])?;
    let ca = dir.path().join("certs/ca.pem");
    let admin = gw.admin.to_string();
    let rotate = |id: &str, wait: Option<&str>| {
        let mut args = vec![
            "devices",
            "rotate-key",
            id,
            "--admin",
            &admin,
            "--db",
            path(&db),
        ];
        if let Some(w) = wait {
            args.extend(["--wait", w]);
        }
        gateway(&args)
    };
    // Device 3 is offline: the rotation waits for it, and its old key still works meanwhile.
    let out = rotate("3", None)?;
    assert!(out.contains("key version 2 made"), "{out}");
    assert!(out.contains("sent when the device connects"), "{out}");
    let old3 = RawDevice::new(&original, 2, gw.udp)?;
    old3.send_acked(&old3.datagram(1, 2), 1)?;
    // Asking again resumes the same rotation instead of making another key.
    let out = rotate("3", None)?;
    assert!(out.contains("already pending"), "{out}");
    let list = gateway(&["devices", "list", "--db", path(&db)])?;
    assert!(list.contains("v1+"), "{list}");

    let report = dir.path().join("report.json");
    let mut cmd = sim(gw.udp, &fleet_path);
    cmd.args([
        "--rate",
        "400",
        "--batch",
        "10",
        "--duration",
        "6s",
        "--ack",
    ])
    .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
    .args(["--report", path(&report)])
    .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    let version = |id: u32| -> anyhow::Result<Option<u64>> {
        let (_, body) = admin_get(gw.admin, &dir.path().join("admin.token"), "/api/v1/devices")?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body)?;
        Ok(rows
            .iter()
            .find(|r| r["id"] == id)
            .and_then(|r| r["key_version"].as_u64()))
    };
    wait_until(Duration::from_secs(10), "device 3 confirms its key", || {
        Ok(version(3)? == Some(2))
    })?;
    wait_until(Duration::from_secs(10), "device 1 online", || {
        Ok(online_count(&db)? == 3)
    })?;
    // Device 1 is live and sending: rotated mid-stream.
    let out = rotate("1", Some("10s"))?;
    assert!(out.contains("sent to its live session"), "{out}");
    assert!(out.contains("confirmed key version 2"), "{out}");
    let status = child.wait()?;
    assert!(status.success(), "device-sim: {status}");
    let r = read_report(&report)?;
    for d in &r.devices {
        assert_eq!(d.unacked, 0, "device {}: {d:?}", d.id);
        assert_eq!(d.readings_acked, d.readings_sent, "device {}", d.id);
        let expected = if d.id == 2 { 0 } else { 1 };
        assert_eq!(d.key_rotations, expected, "device {}: {d:?}", d.id);
    }
    assert!(r.readings_acked > 3 * 2000, "{r:?}");

    // The fleet file (the devices' storage) holds the new keys of devices 1 and 3 only.
    let before = device_sim::fleet::FleetFile::load(&original)?;
    let after = device_sim::fleet::FleetFile::load(&fleet_path)?;
    for i in 0..3 {
        assert_eq!(
            before.devices[i].key == after.devices[i].key,
            i == 1,
            "device {}",
            i + 1
        );
    }
    // Old keys are refused on both channels; the new ones work. Device 1's next sequence
    // numbers are used here, so the restarted simulator starts past them.
    let mut after = after;
    after.devices[0].next_seq += 10;
    after.save(&fleet_path)?;
    let old1 = RawDevice::new(&original, 0, gw.udp)?;
    old1.socket
        .set_read_timeout(Some(Duration::from_millis(300)))?;
    let seq = r
        .devices
        .iter()
        .find(|d| d.id == 1)
        .context("1")?
        .last_seq
        .context("seq")?
        + 1;
    assert!(old1.send_acked(&old1.datagram(seq, 2), seq).is_err());
    let new1 = RawDevice::new(&fleet_path, 0, gw.udp)?;
    new1.send_acked(&new1.datagram(seq + 1, 2), seq + 1)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (id, old_key, new_key) = (old1.id, old1.key.clone(), new1.key.clone());
    rt.block_on(async {
        let nonce = [9u8; 16];
        let mut c = Client::connect(gw.control, &ca).await?;
        let answer = c
            .handshake(id, nonce, |s, b| auth_proof(&old_key, id, &nonce, &s, &b))
            .await?;
        assert_eq!(
            answer,
            Some(GatewayMsg::Denied {
                reason: DenyReason::AuthFailed
            })
        );
        let mut c = Client::connect(gw.control, &ca).await?;
        let answer = c
            .handshake(id, nonce, |s, b| auth_proof(&new_key, id, &nonce, &s, &b))
            .await?;
        assert!(
            matches!(answer, Some(GatewayMsg::Welcome { .. })),
            "{answer:?}"
        );
        anyhow::Ok(())
    })?;
    gw.stop()?;
    // Every acked reading is stored, once.
    let stored = query_all(&db)?;
    for d in &r.devices {
        let (first, last) = (d.first_seq.context("first")?, d.last_seq.context("last")?);
        let n = stored
            .keys()
            .filter(|k| k.0 == d.id && (first..=last).contains(&k.1))
            .count() as u64;
        assert_eq!(n, d.readings_acked, "device {}", d.id);
    }
    assert!(
        counter(&stats(&db)?, "drop_bad_tag") >= 1,
        "the old key's datagram"
    );
    let list = gateway(&["devices", "list", "--db", path(&db)])?;
    assert!(!list.contains("v1+") && list.contains("v2"), "{list}");

    // After a restart the simulator's stored keys work on both channels.
    let gw = TestGateway::start(&db, &[])?;
    let mut cmd = sim(gw.udp, &fleet_path);
    cmd.args(["--rate", "50", "--batch", "10", "--duration", "2s", "--ack"])
        .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
        .args(["--report", path(&report)])
        .stdout(std::process::Stdio::null());
    run_sim(cmd)?;
    let r = read_report(&report)?;
    assert_eq!(r.readings_acked, r.readings_sent, "{r:?}");
    assert!(r.devices.iter().all(|d| d.control_sessions >= 1), "{r:?}");
    gw.stop()?;
    Ok(())
}

/// The failure paths of a rotation: a `KeyRotated` answer with a wrong proof confirms nothing;
/// a device that switched but whose answer was lost (the session dropped) confirms the key by
/// authenticating its next session with it. Until then both keys are accepted on both
/// channels; afterwards only the new one.
#[test]
fn a_rotation_whose_answer_was_lost_is_confirmed_by_the_next_session() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet_path = provision(dir.path(), &db, 1)?;
    let gw = TestGateway::start(&db, &[])?;
    let ca = dir.path().join("certs/ca.pem");
    let token = dir.path().join("admin.token");
    let old = RawDevice::new(&fleet_path, 0, gw.udp)?;
    let (id, old_key) = (old.id, old.key.clone());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let nonce = [4u8; 16];
    let mut session = rt.block_on(async {
        let mut c = Client::connect(gw.control, &ca).await?;
        let ok = c
            .handshake(id, nonce, |s, b| auth_proof(&old_key, id, &nonce, &s, &b))
            .await?;
        anyhow::ensure!(matches!(ok, Some(GatewayMsg::Welcome { .. })), "{ok:?}");
        anyhow::Ok(c)
    })?;
    let out = gateway(&[
        "devices",
        "rotate-key",
        &id.0.to_string(),
        "--admin",
        &gw.admin.to_string(),
        "--db",
        path(&db),
    ])?;
    assert!(out.contains("sent to its live session"), "{out}");
    let new_key = rt.block_on(async {
        let msg = tokio::time::timeout(Duration::from_secs(5), async {
            loop {
                match session.recv().await? {
                    Some(GatewayMsg::RotateKey { version, key }) => {
                        return anyhow::Ok((version, key));
                    }
                    Some(_) => continue,
                    None => anyhow::bail!("session closed"),
                }
            }
        })
        .await??;
        let (version, key) = msg;
        assert_eq!(version, 2);
        // A wrong proof: nothing is confirmed.
        session
            .send(&DeviceMsg::KeyRotated {
                version,
                proof: [0; 32],
            })
            .await?;
        anyhow::Ok(DeviceKey(key))
    })?;
    let key_version = || -> anyhow::Result<(u64, bool)> {
        let (_, body) = admin_get(gw.admin, &token, "/api/v1/devices")?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&body)?;
        let row = rows.first().context("a device")?;
        Ok((
            row["key_version"].as_u64().context("key_version")?,
            row["key_pending"].as_bool().context("key_pending")?,
        ))
    };
    // A heartbeat round trip after the bad answer: it has been handled.
    rt.block_on(async {
        session.send(&DeviceMsg::Heartbeat).await?;
        loop {
            match session.recv().await? {
                Some(GatewayMsg::HeartbeatAck) => return anyhow::Ok(()),
                Some(_) => continue,
                None => anyhow::bail!("session closed"),
            }
        }
    })?;
    assert_eq!(key_version()?, (1, true), "a wrong proof confirmed the key");
    // The session drops before a good answer: both keys work meanwhile.
    drop(session);
    let mut new = RawDevice::new(&fleet_path, 0, gw.udp)?;
    new.key = new_key.clone();
    old.send_acked(&old.datagram(0, 2), 0)?;
    new.send_acked(&new.datagram(1, 2), 1)?;
    old.send_acked(&old.datagram(2, 2), 2)?;
    rt.block_on(async {
        // The next session under the new key is welcomed and confirms the rotation.
        let mut c = Client::connect(gw.control, &ca).await?;
        let ok = c
            .handshake(id, nonce, |s, b| auth_proof(&new_key, id, &nonce, &s, &b))
            .await?;
        anyhow::ensure!(matches!(ok, Some(GatewayMsg::Welcome { .. })), "{ok:?}");
        anyhow::Ok(())
    })?;
    wait_until(Duration::from_secs(5), "the rotation confirmed", || {
        Ok(key_version()? == (2, false))
    })?;
    // Now only the new key: the old one is refused on both channels.
    old.socket
        .set_read_timeout(Some(Duration::from_millis(300)))?;
    assert!(old.send_acked(&old.datagram(3, 2), 3).is_err());
    new.send_acked(&new.datagram(4, 2), 4)?;
    rt.block_on(async {
        let mut c = Client::connect(gw.control, &ca).await?;
        let answer = c
            .handshake(id, nonce, |s, b| auth_proof(&old_key, id, &nonce, &s, &b))
            .await?;
        assert_eq!(
            answer,
            Some(GatewayMsg::Denied {
                reason: DenyReason::AuthFailed
            })
        );
        anyhow::Ok(())
    })?;
    gw.stop()?;
    let stored = query_all(&db)?;
    let seqs: std::collections::BTreeSet<u64> = stored.keys().map(|k| k.1).collect();
    assert_eq!(
        seqs,
        [0, 1, 2, 4].into_iter().collect(),
        "all but the old key's last"
    );
    Ok(())
}

/// `/metrics` passes Prometheus's own checker (`promtool check metrics`, Debian package
/// `prometheus`): format and naming lints, with traffic, drops and a session behind the numbers.
#[test]
fn metrics_pass_promtool() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet_path = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    let d = RawDevice::new(&fleet_path, 0, gw.udp)?;
    d.send_acked(&d.datagram(0, 3), 0)?;
    d.socket.send(&d.datagram(0, 3))?; // a duplicate
    d.socket.send(b"garbage")?;
    // A command for an offline device, and a control connection stuck before its handshake.
    let admin = gw.admin.to_string();
    let out = gateway(&[
        "commands",
        "send",
        "--device",
        "2",
        "ping",
        "--admin",
        &admin,
        "--db",
        path(&db),
    ])?;
    assert!(out.contains("queued"), "{out}");
    let _stalled = std::net::TcpStream::connect(gw.control)?;
    let token = dir.path().join("admin.token");
    wait_until(
        Duration::from_secs(10),
        "the stalled connection counted",
        || {
            let (_, text) = admin_get(gw.admin, &token, "/metrics")?;
            Ok(metric(&text, "gateway_control_connections_handshaking") == 1)
        },
    )?;
    let (code, text) = admin_get(gw.admin, &token, "/metrics")?;
    assert_eq!(code, 200);
    assert_eq!(
        metric(&text, "gateway_commands{status=\"queued\"}"),
        1,
        "{text}"
    );
    assert!(
        text.contains("gateway_commands{status=\"acknowledged\"} 0"),
        "{text}"
    );
    assert!(
        text.contains("gateway_transfers{status=\"sending\"} 0"),
        "{text}"
    );
    assert_eq!(metric(&text, "gateway_control_sessions_online"), 0);
    assert!(metric(&text, "gateway_writer_queue_capacity") > 0, "{text}");
    assert!(text.contains("gateway_writer_queue_depth "), "{text}");
    // The histograms count what was committed (the acked datagram at least).
    assert!(
        metric(&text, "gateway_commit_latency_seconds_count") >= 1
            && metric(&text, "gateway_batch_readings_count") >= 1
            && text.contains("gateway_commit_latency_seconds_bucket{le=\"+Inf\"}"),
        "{text}"
    );
    let mut child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (install Debian's prometheus package)")?;
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().context("stdin")?;
        stdin.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "promtool: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    gw.stop()?;
    Ok(())
}
