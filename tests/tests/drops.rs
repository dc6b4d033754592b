//! Each drop reason, one datagram at a time, against the real gateway: the right counter moves,
//! nothing is stored, and only authentic datagrams are ever answered.

use std::net::UdpSocket;
use std::time::Duration;

use anyhow::Context;
use e2e::*;
use proto::{
    Ack, Batch, DeviceId, DeviceKey, Flags, Header, Millis, Reading, SensorId, Seq, seal_payload,
};

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Sends `datagram` from a fresh socket, then an acked probe from `probe` (which proves the
/// gateway handled the first), and returns whether the fresh socket got any answer.
fn send_and_sync(
    gw: std::net::SocketAddr,
    datagram: &[u8],
    probe: &RawDevice,
    probe_seq: &mut u64,
) -> anyhow::Result<bool> {
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.send_to(datagram, gw)?;
    probe.send_acked(&probe.datagram(*probe_seq, 0), *probe_seq)?;
    *probe_seq += 1;
    s.set_nonblocking(true)?;
    let mut buf = [0u8; 64];
    Ok(s.recv_from(&mut buf).is_ok())
}

#[test]
fn every_drop_reason_is_counted() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    let probe = RawDevice::new(&fleet, 1, gw.udp)?;
    let dev = RawDevice::new(&fleet, 0, gw.udp)?;
    let mut pseq = 0;
    let good = dev.datagram(10, 2);
    let cipher = dev.key.cipher();
    let header = |seq| Header {
        flags: Flags(0),
        device: dev.id,
        seq: Seq(seq),
    };

    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        ("drop_too_short", vec![1u8; 10]),
        ("drop_too_long", vec![1u8; proto::MAX_DATAGRAM + 1]),
    ];
    let mut v2 = good.clone();
    v2[0] = 2;
    cases.push(("drop_bad_version", v2));
    let mut flags = good.clone();
    flags[1] = 0x02;
    cases.push(("drop_bad_header", flags));
    let stranger = Header {
        device: DeviceId(999),
        ..header(1)
    };
    cases.push((
        "drop_unknown_device",
        Batch::default().seal(&stranger, &cipher)?.0,
    ));
    cases.push((
        "drop_bad_tag",
        Batch::default()
            .seal(&header(11), &DeviceKey([7; 32]).cipher())?
            .0,
    ));
    cases.push((
        "drop_bad_payload",
        seal_payload(&header(12), b"\x05\x01", &cipher),
    ));
    let far_future = Batch {
        readings: vec![Reading {
            sensor: SensorId(1),
            ts: Millis(u64::MAX),
            value: 1.0,
        }],
    };
    cases.push(("drop_bad_payload", far_future.seal(&header(13), &cipher)?.0));
    for (counter_name, datagram) in &cases {
        let answered = send_and_sync(gw.udp, datagram, &probe, &mut pseq)?;
        assert!(!answered, "{counter_name}: the gateway answered");
    }

    // Accepted, then the same datagram again (duplicate, re-acked), then an old one (replay).
    dev.send_acked(&good, 10)?;
    dev.send_acked(&good, 10)?;
    dev.send_acked(&dev.datagram(500, 1), 500)?;
    dev.socket.send(&dev.datagram(10, 2))?;
    probe.send_acked(&probe.datagram(pseq, 0), pseq)?;
    // A NaN value is stored as NULL and read back as NaN.
    let nan = Batch {
        readings: vec![Reading {
            sensor: SensorId(3),
            ts: Millis(1_764_000_000_000),
            value: f64::NAN,
        }],
    };
    let h = Header {
        flags: Flags(Flags::ACK_REQUESTED),
        ..header(501)
    };
    dev.send_acked(&nan.seal(&h, &cipher)?.0, 501)?;
    gw.stop()?;

    let s = stats(&db)?;
    let mut expected = std::collections::BTreeMap::new();
    for (name, _) in &cases {
        *expected.entry(*name).or_insert(0u64) += 1;
    }
    expected.insert("drop_duplicate", 1);
    expected.insert("drop_replay", 1);
    for (name, n) in &expected {
        assert_eq!(counter(&s, name), *n, "{name}");
    }
    assert_eq!(counter(&s, "drop_queue_full"), 0);
    let stored = query_all(&db)?;
    assert_eq!(
        stored.len(),
        4,
        "two readings of seq 10, one of 500, the NaN"
    );
    assert_eq!(
        stored.get(&(dev.id.0, 501, 0)).map(|v| v.2.as_str()),
        Some("NaN")
    );
    let devices = s["devices"].as_array().context("devices")?;
    let d0 = devices
        .iter()
        .find(|d| d["id"].as_u64() == Some(u64::from(dev.id.0)))
        .context("device row")?;
    // bad tag, two bad payloads, duplicate, replay: all named this device.
    assert_eq!(d0["rejected"].as_u64(), Some(5));
    assert_eq!(d0["datagrams"].as_u64(), Some(3));
    // Sequences 10..=501 with three committed: 489 lost.
    assert_eq!(d0["lost"].as_u64(), Some(489));
    Ok(())
}

#[test]
fn devices_added_while_serving_are_picked_up() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    provision(dir.path(), &db, 1)?;
    let gw = TestGateway::start(&db, &[])?;
    let out = gateway(&["devices", "add", "--id", "77", "--db", path(&db)])?;
    let key: DeviceKey = out
        .lines()
        .find_map(|l| l.strip_prefix("key "))
        .context("key line")?
        .parse()?;
    let s = UdpSocket::bind("127.0.0.1:0")?;
    s.connect(gw.udp)?;
    s.set_read_timeout(Some(Duration::from_millis(300)))?;
    let h = Header {
        flags: Flags(Flags::ACK_REQUESTED),
        device: DeviceId(77),
        seq: Seq(0),
    };
    let d = Batch::default().seal(&h, &key.cipher())?.0;
    let mut buf = [0u8; 64];
    wait_until(
        Duration::from_secs(10),
        "ack from a newly added device",
        || {
            s.send(&d)?;
            Ok(match s.recv(&mut buf) {
                Ok(n) => Ack::open(&buf[..n], &key.cipher()).is_ok(),
                Err(_) => false,
            })
        },
    )?;
    gw.stop()?;
    assert!(counter(&stats(&db)?, "drop_unknown_device") >= 1);
    Ok(())
}

#[test]
fn a_full_queue_drops_and_counts_without_losing_acked_readings() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 1)?;
    let gw = TestGateway::start(&db, &["--queue", "1"])?;
    let dev = RawDevice::new(&fleet, 0, gw.udp)?;
    let n = 3000u64;
    for seq in 0..n {
        dev.socket.send(&dev.datagram(seq, 16))?;
    }
    // Collect acks until the gateway has gone quiet for a while.
    dev.socket
        .set_read_timeout(Some(Duration::from_millis(500)))?;
    let cipher = dev.key.cipher();
    let mut acked = std::collections::BTreeSet::new();
    let mut buf = [0u8; 64];
    while let Ok(len) = dev.socket.recv(&mut buf) {
        acked.insert(Ack::open(&buf[..len], &cipher)?.seq.0);
    }
    gw.stop()?;
    let s = stats(&db)?;
    let accepted = counter(&s, "datagrams_accepted");
    let full = counter(&s, "drop_queue_full");
    assert!(full > 0, "a one-slot queue under a burst must overflow");
    assert_eq!(accepted + full, counter(&s, "datagrams_received"));
    assert_eq!(
        acked.len() as u64,
        accepted,
        "every accepted datagram acked"
    );
    let stored = query_all(&db)?;
    assert_eq!(stored.len() as u64, accepted * 16);
    for seq in &acked {
        assert!(
            stored.contains_key(&(dev.id.0, *seq, 0)),
            "acked {seq} stored"
        );
    }
    Ok(())
}

/// Datagrams the kernel drops unread because the socket's receive buffer is full (here: the
/// gateway is stopped while a burst arrives) are counted as `drop_kernel`, so every datagram
/// sent is either received or counted, and what was received is stored.
#[test]
fn kernel_drops_of_a_full_socket_buffer_are_counted() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 1)?;
    let cfg = dir.path().join("gw.toml");
    std::fs::write(&cfg, "[telemetry]\nrecv_buffer = 65536\n")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let dev = RawDevice::new(&fleet, 0, gw.udp)?;
    let n = 3000u64;
    let datagrams: Vec<Vec<u8>> = (0..n).map(|seq| dev.datagram(seq, 16)).collect();
    gw.signal("STOP")?;
    let sent = datagrams
        .iter()
        .try_for_each(|d| dev.socket.send(d).map(|_| ()));
    gw.signal("CONT")?;
    sent?;
    wait_until(
        Duration::from_secs(20),
        "every datagram received or counted as a kernel drop",
        || {
            let s = stats(&db)?;
            Ok(counter(&s, "datagrams_received") + counter(&s, "drop_kernel") == n)
        },
    )?;
    let s = stats(&db)?;
    let (received, kernel) = (
        counter(&s, "datagrams_received"),
        counter(&s, "drop_kernel"),
    );
    assert!(
        kernel > 0 && received > 0,
        "a 64 KiB buffer holds part of a 3,000-datagram burst: received {received}, kernel drops {kernel}"
    );
    wait_until(Duration::from_secs(20), "received readings stored", || {
        Ok(counter(&stats(&db)?, "readings_committed") == 16 * received)
    })?;
    Ok(())
}
