//! The fault-injection and attack suite (SECURITY.md, "Verification"): the real `gateway` and
//! `device-sim` binaries on loopback, each case checked against the simulator's record of what
//! was acknowledged. Run alone with `cargo test -p e2e --test faults -- --nocapture`; every case
//! prints one `RESULT` line with its counts.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use anyhow::Context;
use e2e::flood::Flooder;
use e2e::*;
use rand::{Rng, SeedableRng};

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Every acknowledged reading is stored with the value sent, and nothing is stored that the
/// simulator did not send. Returns (acknowledged, stored).
fn check_acked_stored(
    sent: &BTreeMap<Key, Sent>,
    stored: &BTreeMap<Key, Val>,
) -> anyhow::Result<(usize, usize)> {
    let mut acked = 0;
    for (key, s) in sent {
        if s.acked {
            acked += 1;
            anyhow::ensure!(
                stored.get(key) == Some(&s.val),
                "acknowledged reading {key:?} stored as {:?}, sent {:?}",
                stored.get(key),
                s.val
            );
        }
    }
    for (key, val) in stored {
        let s = sent
            .get(key)
            .with_context(|| format!("stored reading {key:?} was never sent"))?;
        anyhow::ensure!(
            &s.val == val,
            "reading {key:?} stored as {val:?}, sent {s:?}"
        );
    }
    Ok((acked, stored.len()))
}

/// A flood of random, oversized, truncated, forged and replayed datagrams from one address, as
/// fast as one thread sends, alongside a fleet with acks: nothing of it is stored or accepted,
/// not one byte goes back to the attacker, and the fleet's acknowledged readings stay at least
/// 95 % of what the same fleet gets acknowledged without the flood.
#[test]
fn a_flood_from_one_address_gets_nothing_and_does_not_slow_the_fleet() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 50)?;
    let mut gw = TestGateway::start(&db, &[])?;
    let run = |tag: &str| -> anyhow::Result<(device_sim::Report, BTreeMap<Key, Sent>)> {
        let report = dir.path().join(format!("{tag}.json"));
        let log = dir.path().join(format!("{tag}.csv"));
        let mut cmd = sim(gw.udp, &fleet);
        cmd.args([
            "--ack",
            "--rate",
            "2000",
            "--batch",
            "20",
            "--duration",
            "4s",
        ])
        .args(["--seed", if tag == "base" { "1" } else { "2" }])
        .args(["--report", path(&report), "--readings-log", path(&log)])
        .stdout(std::process::Stdio::null());
        run_sim(cmd)?;
        Ok((read_report(&report)?, read_sent(&log)?))
    };
    let (base, mut sent) = run("base")?;

    // The attacker: its own address, replays of sequences the base run used long ago.
    let flooder = Flooder::start(&fleet, &base, gw.udp)?;
    let during = run("flood");
    let outcome = flooder.stop()?;
    let (during, during_sent) = during?;
    let (counts, flood_secs, answered) = (&outcome.counts, outcome.secs, outcome.answered);
    let flood_sent = counts.total();
    gw.signal("TERM")?;
    gw.wait_exit(Duration::from_secs(10))?;
    let s = stats(&db)?;
    sent.extend(during_sent);
    let stored = query_all(&db)?;
    let (acked, stored_n) = check_acked_stored(&sent, &stored)?;
    let ratio = during.readings_acked as f64 / base.readings_acked.max(1) as f64;
    println!(
        "RESULT flood: {flood_sent} hostile datagrams in {flood_secs:.1} s (random {}, oversized \
         {}, truncated {}, forged {}, replayed {}); answered {answered} bytes; drops: bad_tag {}, \
         auth_limited {}, replay {}, too_long {}, too_short {}, kernel {}; fleet acked {} \
         readings without the flood, {} with it ({ratio:.3}); first-time acks {} / {}; \
         {acked} acked readings all stored, {stored_n} stored, none foreign",
        counts.random.load(Relaxed),
        counts.oversized.load(Relaxed),
        counts.truncated.load(Relaxed),
        counts.forged.load(Relaxed),
        counts.replayed.load(Relaxed),
        counter(&s, "drop_bad_tag"),
        counter(&s, "drop_auth_limited"),
        counter(&s, "drop_replay"),
        counter(&s, "drop_too_long"),
        counter(&s, "drop_too_short"),
        counter(&s, "drop_kernel"),
        base.readings_acked,
        during.readings_acked,
        base.datagrams_acked.saturating_sub(base.retransmissions),
        during
            .datagrams_acked
            .saturating_sub(during.retransmissions),
    );
    assert_eq!(answered, 0, "the gateway answered the attacker");
    assert!(
        flood_sent as f64 / flood_secs > 50_000.0,
        "the flood was too slow to mean anything: {flood_sent} in {flood_secs} s"
    );
    assert!(
        counter(&s, "drop_auth_limited") > flood_sent / 2,
        "the attacker's address was not limited"
    );
    assert!(
        ratio >= 0.95,
        "goodput under the flood {ratio:.3} of the goodput without it"
    );
    Ok(())
}

/// SIGKILL of the gateway at 20 random moments under load with acks, each time restarted on the
/// same port while the simulator keeps sending and retransmitting: every acknowledged reading is
/// stored exactly once with the value sent, nothing foreign is stored, the database passes
/// `integrity_check`, and each restart is listening within 5 s of the kill.
#[test]
fn twenty_sigkills_under_load_lose_no_acknowledged_reading() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 100)?;
    let mut gw = TestGateway::start(&db, &[])?;
    let udp = gw.udp.to_string();
    let log = dir.path().join("sent.csv");
    let mut cmd = sim(gw.udp, &fleet);
    cmd.args(["--ack", "--rate", "500", "--batch", "10", "--duration", "0"])
        .args(["--retries", "40", "--ack-timeout", "250ms"])
        .args(["--readings-log", path(&log)])
        .stdout(std::process::Stdio::null());
    let mut child = KillOnDrop(cmd.spawn()?);
    let mut rng = rand::rngs::SmallRng::seed_from_u64(20);
    let mut restarts = Vec::new();
    let mut committed = 0;
    for round in 0..20 {
        // A random moment: after a random number of further committed readings.
        let target = committed + rng.random_range(2_000..40_000);
        wait_until(Duration::from_secs(60), "load before the kill", || {
            committed = counter(&stats(&db)?, "readings_committed");
            Ok(committed >= target)
        })
        .with_context(|| format!("round {round}"))?;
        gw.signal("KILL")?;
        let t0 = tokio::time::Instant::now();
        gw.wait_exit(Duration::from_secs(10))?;
        gw = TestGateway::start_on(&db, &udp, &[])?;
        restarts.push(t0.elapsed());
    }
    // Let the simulator's retransmissions of the last round land, then stop it.
    wait_until(
        Duration::from_secs(60),
        "load after the last restart",
        || Ok(counter(&stats(&db)?, "readings_committed") >= committed + 10_000),
    )?;
    signal(child.id(), "INT")?;
    let status = child.wait()?;
    assert!(status.success(), "device-sim exit {status}");
    gw.stop()?;
    let sent = read_sent(&log)?;
    let stored = query_all(&db)?; // fails on a reading stored twice
    let (acked, stored_n) = check_acked_stored(&sent, &stored)?;
    let integrity = integrity(&db)?;
    restarts.sort();
    let worst = restarts.last().copied().unwrap_or_default();
    println!(
        "RESULT sigkill: 20 kills under load; {} readings sent, {acked} acknowledged, all \
         stored once; {stored_n} stored, none foreign; integrity {}; restart to listening \
         median {:?}, worst {worst:?}",
        sent.len(),
        integrity.trim(),
        restarts[restarts.len() / 2],
    );
    assert!(acked > 100_000, "too little load to mean anything: {acked}");
    assert_eq!(integrity.trim(), "ok");
    assert!(worst < Duration::from_secs(5), "restart took {worst:?}");
    Ok(())
}

/// `PRAGMA integrity_check` of the database, through the gateway's own store.
fn integrity(db: &std::path::Path) -> anyhow::Result<String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let store =
            gateway::store::Store::open(&gateway::store::OpenOptions::cli(db, false)).await?;
        let r = store.integrity_check().await;
        store.close().await;
        Ok(r?)
    })
}
