//! Aggregates and MQTT store-and-forward end to end: the real gateway and simulator, a real
//! Mosquitto of each test's own (stopped and started to make outages), a recording subscriber.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use e2e::mqtt::{
    Broker, GW, Subscriber, agg_messages, assert_all_delivered, duplicates, expected_windows,
    latest, mqtt_config, recompute,
};
use e2e::*;

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// The `backlog_below` of the gateway's last "MQTT connected" log line: rows below it were
/// backlog at that connection.
fn last_backlog_bound(log: &Path) -> anyhow::Result<i64> {
    let text = std::fs::read_to_string(log)?;
    let line = text
        .lines()
        .rfind(|l| l.contains("MQTT connected"))
        .context("no connect line")?;
    // Drop colour escapes, then read the number after "backlog_below=".
    let mut plain = String::new();
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            plain.push(c);
        }
    }
    let rest = plain
        .split("backlog_below=")
        .nth(1)
        .context("no backlog_below")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    Ok(digits.parse()?)
}

fn sim_fleet(gw: &TestGateway, fleet: &Path, args: &[&str]) -> std::process::Command {
    let mut cmd = sim(gw.udp, fleet);
    cmd.args(args).arg("--ack").stdout(Stdio::null());
    cmd
}

#[test]
fn aggregates_at_the_subscriber_equal_a_recomputation_and_rebuild_agrees() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 20)?;
    let cfg = mqtt_config(dir.path(), &broker, "")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    run_sim(sim_fleet(
        &gw,
        &fleet,
        &["--rate", "20", "--batch", "4", "--duration", "6s"],
    ))?;
    assert_all_delivered(&sub, &db, Duration::from_secs(30))?;
    let aggs = agg_messages(&sub.messages())?;
    assert_eq!(duplicates(&aggs), 0, "no outage, no duplicates");
    // The retained status says online.
    let status = sub
        .messages()
        .into_iter()
        .rfind(|(t, _)| t == &format!("gateway/v1/{GW}/status"))
        .context("status message")?;
    let status: serde_json::Value = serde_json::from_slice(&status.1)?;
    assert_eq!(status["online"], true);
    wait_until(Duration::from_secs(10), "outbox drained", || {
        Ok(counter(&stats(&db)?, "outbox_rows") == 0)
    })?;
    gw.stop()?;
    // The stored aggregates equal a rebuild from the readings.
    let out = gateway(&[
        "aggregates",
        "rebuild",
        "--since",
        "0",
        "--format",
        "json",
        "--config",
        path(&cfg),
        "--db",
        path(&db),
    ])?;
    let report: serde_json::Value = serde_json::from_str(&out)?;
    assert_eq!(report["differing"], 0, "{report}");
    assert_eq!(report["missing"], 0, "{report}");
    assert_eq!(report["without_readings"], 0, "{report}");
    assert_eq!(
        report["identical"].as_u64(),
        Some(latest(&aggs).len() as u64),
        "{report}"
    );
    Ok(())
}

#[test]
fn a_60s_broker_outage_under_load_loses_no_aggregate() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start(dir.path())?;
    let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 50)?;
    let cfg = mqtt_config(dir.path(), &broker, "backlog_rate = 5000\n")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let mut sim = KillOnDrop(
        sim_fleet(
            &gw,
            &fleet,
            &["--rate", "16", "--batch", "8", "--duration", "80s"],
        )
        .spawn()?,
    );
    wait_until(Duration::from_secs(20), "aggregates flowing", || {
        Ok(agg_messages(&sub.messages())?.len() > 500)
    })?;
    broker.stop()?;
    let down = SystemTime::now();
    let mut backlog = 0;
    // The outage lasts 60 s; meanwhile the outbox must only grow.
    wait_until(Duration::from_secs(70), "60 s of outage", || {
        let rows = counter(&stats(&db)?, "outbox_rows");
        assert!(rows + 50 >= backlog, "outbox shrank during the outage");
        backlog = backlog.max(rows);
        Ok(down.elapsed().unwrap_or_default() >= Duration::from_secs(60))
    })?;
    let s = stats(&db)?;
    assert_eq!(counter(&s, "mqtt_connected"), 0);
    assert!(backlog > 5_000, "backlog {backlog}");
    assert!(counter(&s, "outbox_oldest_age_ms") > 50_000);
    let before = agg_messages(&sub.messages())?.len();
    broker.resume()?;
    wait_until(Duration::from_secs(60), "simulator done", || {
        Ok(sim.try_wait()?.is_some())
    })?;
    assert!(sim.wait()?.success());
    assert_all_delivered(&sub, &db, Duration::from_secs(60))?;
    let aggs = agg_messages(&sub.messages())?;
    // After the outage: live aggregates (created after the reconnect) do not wait for the
    // backlog, and the backlog arrives oldest first.
    let live_from = last_backlog_bound(&db.with_extension("log"))?;
    let after = &aggs[before..];
    let backlog: Vec<i64> = after
        .iter()
        .map(|a| a.seq)
        .filter(|s| *s < live_from)
        .collect();
    let first_live = after
        .iter()
        .position(|a| a.seq >= live_from)
        .context("live aggregates after the outage")?;
    let last_backlog = after
        .iter()
        .rposition(|a| a.seq < live_from)
        .context("backlog after the outage")?;
    assert!(
        first_live < last_backlog,
        "live aggregates waited for the backlog ({first_live} vs {last_backlog})"
    );
    let mut sorted = backlog.clone();
    sorted.sort_unstable();
    sorted.dedup();
    let mut firsts = backlog.clone();
    let mut seen = BTreeSet::new();
    firsts.retain(|s| seen.insert(*s));
    assert_eq!(firsts, sorted, "backlog not oldest first");
    let dups = duplicates(&aggs);
    assert!(
        dups <= 100,
        "{dups} duplicates, more than the in-flight limit"
    );
    let s = stats(&db)?;
    assert_eq!(counter(&s, "outbox_dropped"), 0);
    assert!(counter(&s, "mqtt_connects") >= 2);
    gw.stop()?;
    Ok(())
}

#[test]
fn sigkill_with_a_full_outbox_then_restart_delivers_everything() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start(dir.path())?;
    let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
    broker.stop()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 30)?;
    let cfg = mqtt_config(dir.path(), &broker, "")?;
    let mut gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    run_sim(sim_fleet(
        &gw,
        &fleet,
        &["--rate", "20", "--batch", "4", "--duration", "5s"],
    ))?;
    wait_until(Duration::from_secs(10), "outbox filled", || {
        Ok(counter(&stats(&db)?, "outbox_rows") > 400)
    })?;
    gw.signal("KILL")?;
    gw.wait_exit(Duration::from_secs(5))?;
    broker.resume()?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    assert_all_delivered(&sub, &db, Duration::from_secs(30))?;
    gw.stop()?;
    Ok(())
}

#[test]
fn late_readings_join_within_lateness_and_revise_or_count_beyond_it() -> anyhow::Result<()> {
    let _serial = serial();
    for policy in ["revise", "drop"] {
        let dir = tempfile::tempdir()?;
        let broker = Broker::start(dir.path())?;
        let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
        let db = dir.path().join("gw.db");
        let fleet = provision(dir.path(), &db, 1)?;
        let cfg = mqtt_config(dir.path(), &broker, "")?;
        let cfg_text = std::fs::read_to_string(&cfg)?.replace(
            "idle = \"2s\"",
            &format!("idle = \"1h\"\nlate = \"{policy}\""),
        );
        std::fs::write(&cfg, cfg_text)?;
        let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
        let dev = RawDevice::new(&fleet, 0, gw.udp)?;
        let t0: u64 = 1_800_000_000_000; // a multiple of 5 s
        let mut seq = 0;
        let mut send = |readings: &[(u16, u64, f64)]| -> anyhow::Result<()> {
            seq += 1;
            dev.send_acked(&dev.datagram_of(seq, readings), seq)
        };
        // Window [t0, t0+1s): two readings; then the watermark moves to t0+1.3 s and a reading
        // 0.4 s late (within 500 ms of lateness) still joins it.
        send(&[(1, t0 + 100, 1.0), (1, t0 + 900, 3.0)])?;
        send(&[(1, t0 + 1_300, 10.0)])?;
        send(&[(1, t0 + 950, 5.0)])?;
        // Watermark past t0 + 1.5 s: [t0, t0+1s) closes with three readings.
        send(&[(1, t0 + 1_600, 20.0)])?;
        let key = (dev.id.0, 1_000, t0 as i64, 1);
        wait_until(Duration::from_secs(10), "first window published", || {
            Ok(latest(&agg_messages(&sub.messages())?).contains_key(&key))
        })?;
        let first = latest(&agg_messages(&sub.messages())?)[&key].clone();
        assert_eq!((first.count, first.revision), (3, 0), "{first:?}");
        assert_eq!(
            (first.min, first.max, first.mean, first.last),
            (1.0, 5.0, 3.0, 5.0)
        );
        // Beyond the lateness: revised, or counted as dropped.
        send(&[(1, t0 + 500, 7.0)])?;
        match policy {
            "revise" => {
                wait_until(Duration::from_secs(10), "revision published", || {
                    Ok(latest(&agg_messages(&sub.messages())?)[&key].revision == 1)
                })?;
                let rev = latest(&agg_messages(&sub.messages())?)[&key].clone();
                assert_eq!((rev.count, rev.max, rev.mean), (4, 7.0, 4.0), "{rev:?}");
                assert_eq!(rev.last, 5.0, "last is by timestamp: t0+950 beats t0+500");
                assert!(rev.seq > first.seq);
            }
            _ => {
                wait_until(Duration::from_secs(10), "late reading counted", || {
                    Ok(counter(&stats(&db)?, "aggregate_late_dropped") >= 1)
                })?;
                let s = stats(&db)?;
                // One reading: too late for its 1 s window, in time for its 5 s one.
                assert_eq!(counter(&s, "aggregate_late_dropped"), 1);
                assert_eq!(counter(&s, "aggregates_revised"), 0);
            }
        }
        // Either way the raw reading is stored.
        assert_eq!(query_all(&db)?.len(), 6);
        gw.stop()?;
    }
    Ok(())
}

#[test]
fn a_full_outbox_drops_the_oldest_aggregates_and_keeps_every_reading() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let mut broker = Broker::start(dir.path())?;
    let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
    broker.stop()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 20)?;
    let cfg = mqtt_config(dir.path(), &broker, "outbox_max_rows = 100\n")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let log = dir.path().join("sent.csv");
    let mut cmd = sim_fleet(
        &gw,
        &fleet,
        &["--rate", "20", "--batch", "4", "--duration", "5s"],
    );
    cmd.arg("--readings-log").arg(&log);
    run_sim(cmd)?;
    // Every window closes (idle) and the cap holds.
    let expected = expected_windows(&db)?;
    assert!(expected.len() > 300);
    wait_until(Duration::from_secs(15), "every window closed", || {
        let s = stats(&db)?;
        Ok(counter(&s, "aggregates_closed") == expected.len() as u64)
    })?;
    let s = stats(&db)?;
    assert_eq!(counter(&s, "outbox_rows"), 100);
    // Past 90 % of its bound the gateway says it is not ready, and why.
    let token = dir.path().join("admin.token");
    let (code, ready) = admin_get(gw.admin, &token, "/readyz")?;
    assert!(
        code == 503
            && ready.contains("\"outbox_rows\":100")
            && ready.contains("\"outbox_high_water\":90")
            && ready.contains("\"broker\":\"disconnected\""),
        "{code} {ready}"
    );
    assert_eq!(
        counter(&s, "outbox_dropped"),
        expected.len() as u64 - 100,
        "every aggregate beyond the cap counted"
    );
    // Raw readings untouched.
    let sent = read_sent(&log)?;
    let stored = query_all(&db)?;
    assert_eq!(stored.len(), sent.len());
    assert!(
        sent.iter()
            .all(|(k, s)| s.acked && stored.get(k) == Some(&s.val))
    );
    // What is left is the newest 100, and it is delivered once the broker is back.
    broker.resume()?;
    wait_until(Duration::from_secs(20), "100 aggregates delivered", || {
        Ok(agg_messages(&sub.messages())?.len() >= 100)
    })?;
    let seqs: BTreeSet<i64> = agg_messages(&sub.messages())?
        .iter()
        .map(|a| a.seq)
        .collect();
    let top = *seqs.last().context("seqs")?;
    assert_eq!(seqs, (top - 99..=top).collect(), "the oldest were dropped");
    wait_until(
        Duration::from_secs(10),
        "ready once the outbox drained",
        || {
            let (code, ready) = admin_get(gw.admin, &token, "/readyz")?;
            Ok(code == 200 && ready.contains("\"broker\":\"connected\""))
        },
    )?;
    gw.stop()?;
    Ok(())
}

#[test]
fn a_command_from_the_broker_reaches_the_device_and_its_result_is_published() -> anyhow::Result<()>
{
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let broker = Broker::start(dir.path())?;
    let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let cfg = mqtt_config(dir.path(), &broker, "")?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let ca = dir.path().join("certs/ca.pem");
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args(["--rate", "8", "--batch", "8", "--duration", "120s"])
        .args(["--control", &gw.control.to_string(), "--ca", path(&ca)])
        .stdout(Stdio::null());
    let _sim = KillOnDrop(cmd.spawn()?);
    wait_until(Duration::from_secs(30), "2 devices online", || {
        Ok(online_count(&db)? == 2)
    })?;
    // Online events were published too.
    wait_until(Duration::from_secs(10), "online events", || {
        Ok(sub
            .messages()
            .iter()
            .filter(|(t, p)| t.contains("/event/") && String::from_utf8_lossy(p).contains("online"))
            .count()
            >= 2)
    })?;
    let mut opts = rumqttc::MqttOptions::new("operator", "127.0.0.1", broker.port);
    opts.set_keep_alive(Duration::from_secs(5));
    opts.set_max_packet_size(1 << 20, 1 << 20);
    let (client, mut conn) = rumqttc::Client::new(opts, 16);
    let pump = std::thread::spawn(move || {
        for ev in conn.iter() {
            if ev.is_err() {
                break;
            }
        }
    });
    client.publish(
        format!("gateway/v1/{GW}/cmd/2"),
        rumqttc::QoS::AtLeastOnce,
        false,
        r#"{"request_id":"r-1","command":{"type":"set-interval","millis":250}}"#,
    )?;
    client.publish(
        format!("gateway/v1/{GW}/cmd/2"),
        rumqttc::QoS::AtLeastOnce,
        false,
        r#"{"request_id":"r-2","command":{"type":"launch"}}"#,
    )?;
    client.publish(
        format!("gateway/v1/{GW}/cmd/99"),
        rumqttc::QoS::AtLeastOnce,
        false,
        r#"{"request_id":"r-3","command":{"type":"ping"}}"#,
    )?;
    // Larger than a control frame: could never be delivered.
    let big = "00".repeat(70_000);
    client.publish(
        format!("gateway/v1/{GW}/cmd/2"),
        rumqttc::QoS::AtLeastOnce,
        false,
        format!(r#"{{"request_id":"r-4","command":{{"type":"custom","hex":"{big}"}}}}"#),
    )?;
    // Retained: delivered live once (the broker clears the flag for current subscribers), then
    // offered again, flagged retained, at every subscription: refused there.
    client.publish(
        format!("gateway/v1/{GW}/cmd/2"),
        rumqttc::QoS::AtLeastOnce,
        true,
        r#"{"request_id":"r-5","command":{"type":"ping"}}"#,
    )?;
    let all_results = || -> anyhow::Result<Vec<serde_json::Value>> {
        let mut out = Vec::new();
        for (t, p) in sub.messages() {
            if t.contains("/cmd-result/") {
                out.push(serde_json::from_slice(&p)?);
            }
        }
        Ok(out)
    };
    // The first result of each request.
    let results = || -> anyhow::Result<BTreeMap<String, serde_json::Value>> {
        let mut out = BTreeMap::new();
        for v in all_results()? {
            out.entry(v["request_id"].as_str().unwrap_or("").to_owned())
                .or_insert(v);
        }
        Ok(out)
    };
    wait_until(Duration::from_secs(20), "five results", || {
        Ok(results()?.len() == 5)
    })?;
    let r = results()?;
    assert_eq!(r["r-1"]["status"], "acknowledged", "{}", r["r-1"]);
    assert_eq!(r["r-1"]["device"], 2);
    assert_eq!(r["r-2"]["status"], "rejected", "{}", r["r-2"]);
    assert_eq!(r["r-3"]["status"], "rejected", "{}", r["r-3"]);
    assert_eq!(r["r-4"]["status"], "rejected", "{}", r["r-4"]);
    assert_eq!(r["r-5"]["status"], "acknowledged", "{}", r["r-5"]);
    // The device really applied it: the command is stored as acknowledged for device 2.
    let admin = gw.admin.to_string();
    let out = gateway(&[
        "commands",
        "list",
        "--device",
        "2",
        "--format",
        "json",
        "--admin",
        &admin,
        "--db",
        path(&db),
    ])?;
    let rows: Vec<serde_json::Value> = serde_json::from_str(&out)?;
    assert!(
        rows.iter()
            .any(|c| c["status"] == "acknowledged" && c["summary"] == "set-interval 250")
    );
    let _ = client.disconnect();
    let _ = pump.join();
    gw.stop()?;
    // After a restart the broker offers the retained command again: refused, not run twice.
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    wait_until(Duration::from_secs(20), "retained command refused", || {
        Ok(all_results()?
            .iter()
            .any(|v| v["request_id"] == "r-5" && v["status"] == "rejected"))
    })?;
    // (A result may arrive twice, with the same seq: at least once.)
    let pings: BTreeSet<String> = all_results()?
        .iter()
        .filter(|v| v["request_id"] == "r-5" && v["status"] == "acknowledged")
        .map(|v| v["command_id"].to_string())
        .collect();
    assert_eq!(pings.len(), 1, "the retained command ran once: {pings:?}");
    gw.stop()?;
    Ok(())
}

#[test]
fn forwards_over_tls_to_a_broker_verified_by_its_ca() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let certs = dir.path().join("broker-certs");
    gateway(&[
        "certs",
        "init",
        "--dir",
        path(&certs),
        "--hosts",
        "127.0.0.1,localhost",
    ])?;
    let broker = Broker::start_tls(dir.path(), &certs)?;
    let (tls_port, _) = broker.tls.clone().context("tls listener")?;
    let sub = Subscriber::start(&broker, "checker", "gateway/#")?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 3)?;
    // A CA that did not sign the broker's certificate: no connection, nothing lost.
    let other = dir.path().join("other-certs");
    gateway(&["certs", "init", "--dir", path(&other)])?;
    let tls_cfg = |ca: &Path, password: &str| {
        format!(
            "[service]\nid = \"{GW}\"\n\n[aggregate]\nwindows = [\"1s\"]\nlateness = \"500ms\"\n\
             idle = \"2s\"\n\n[mqtt]\nenabled = true\nhost = \"127.0.0.1\"\nport = {tls_port}\n\
             tls = true\nca = \"{}\"\nusername = \"gateway\"\npassword = \"{password}\"\n\
             reconnect_min = \"200ms\"\nreconnect_max = \"1s\"\n",
            ca.display()
        )
    };
    let cfg = config_file(dir.path(), &tls_cfg(&other.join("ca.pem"), "s3cret"))?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    run_sim(sim_fleet(
        &gw,
        &fleet,
        &["--rate", "8", "--batch", "4", "--duration", "3s"],
    ))?;
    wait_until(Duration::from_secs(10), "aggregates waiting", || {
        let s = stats(&db)?;
        Ok(counter(&s, "outbox_rows") > 0 && counter(&s, "aggregates_closed") > 0)
    })?;
    let s = stats(&db)?;
    assert_eq!(
        counter(&s, "mqtt_connects"),
        0,
        "an unverified broker must be refused"
    );
    assert!(agg_messages(&sub.messages())?.is_empty());
    gw.stop()?;
    // The right CA but a wrong password: refused by the broker, nothing lost.
    let cfg = config_file(dir.path(), &tls_cfg(&certs.join("ca.pem"), "wrong"))?;
    let log = db.with_extension("log");
    let failures = |log: &Path| -> anyhow::Result<usize> {
        Ok(std::fs::read_to_string(log)?
            .matches("MQTT connection failed or lost")
            .count())
    };
    let base = failures(&log)?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    wait_until(Duration::from_secs(10), "connection refused", || {
        Ok(failures(&log)? >= base + 3)
    })?;
    assert_eq!(counter(&stats(&db)?, "mqtt_connects"), 0);
    assert!(agg_messages(&sub.messages())?.is_empty());
    gw.stop()?;
    // The right CA and password: everything stored is delivered.
    let cfg = config_file(dir.path(), &tls_cfg(&certs.join("ca.pem"), "s3cret"))?;
    let gw = TestGateway::start(&db, &["--config", path(&cfg)])?;
    let expected = recompute(&query_all(&db)?, &[1_000]);
    wait_until(Duration::from_secs(20), "every window over TLS", || {
        let got = latest(&agg_messages(&sub.messages())?);
        Ok(expected.keys().all(|k| got.contains_key(k)))
    })?;
    assert!(counter(&stats(&db)?, "mqtt_connects") >= 1);
    gw.stop()?;
    Ok(())
}
