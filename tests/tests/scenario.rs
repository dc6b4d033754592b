//! The simulator for people: scenario files (device groups with their own sensors, rates and
//! fault schedules) played against the real gateway, the same scenario giving the same signals
//! again, and `device-sim replay` of a CSV export of one gateway into another, checked reading
//! by reading.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use e2e::{
    TestGateway, gateway, provision, query_all, read_report, read_sent, run_sim, serial, sim,
};

/// Two groups over five devices: meters (a counter and a bounded random walk, 20 readings/s)
/// and weather stations (the classic sensors, one in ten humidity samples missing, 40/s) that
/// fall silent from 1 s to 2 s and lose every transmission from 2 s to 2.5 s.
const SCENARIO: &str = r#"
duration = "4s"
ack = true
retries = 20
ack_timeout = "200ms"

[[group]]
name = "meters"
devices = 2
rate = 20.0
batch = 5

[[group.sensor]]
id = 1
model = "counter"
step = 1

[[group.sensor]]
id = 7
model = "random_walk"
start = 50
step = 2
min = 40
max = 60

[[group]]
name = "weather"
devices = 3
rate = 40.0
batch = 10

[[group.sensor]]
id = 1
model = "temperature"

[[group.sensor]]
id = 2
model = "humidity"
missing = 0.1

[[group.fault]]
from = "1s"
until = "2s"
silent = true

[[group.fault]]
from = "2s"
until = "2500ms"
loss = 1.0
"#;

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// Largest gap between consecutive stored timestamps of each device, ms.
fn largest_gaps(stored: &BTreeMap<e2e::Key, e2e::Val>) -> BTreeMap<u32, i64> {
    let mut times: BTreeMap<u32, Vec<i64>> = BTreeMap::new();
    for (&(device, _, _), &(_, ts, _)) in stored {
        times.entry(device).or_default().push(ts);
    }
    times
        .into_iter()
        .map(|(d, mut ts)| {
            ts.sort_unstable();
            let gap = ts.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
            (d, gap)
        })
        .collect()
}

#[test]
fn a_scenario_plays_its_groups_sensors_and_fault_schedule() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 6)?;
    let scenario = dir.path().join("scenario.toml");
    std::fs::write(&scenario, SCENARIO)?;
    let gw = TestGateway::start(&db, &[])?;

    let run = |name: &str, seed: u64| -> anyhow::Result<(device_sim::Report, std::path::PathBuf)> {
        let report = dir.path().join(format!("{name}.json"));
        let log = dir.path().join(format!("{name}.csv"));
        let mut cmd = sim(gw.udp, &fleet);
        cmd.args(["--scenario", path(&scenario), "--seed", &seed.to_string()])
            .args(["--report", path(&report), "--readings-log", path(&log)]);
        run_sim(cmd)?;
        Ok((read_report(&report)?, log))
    };
    let (report, log) = run("first", 5)?;

    // Everything generated was acknowledged and is stored, exactly.
    anyhow::ensure!(
        report.readings_sent > 0 && report.unacked == 0,
        "{report:?}"
    );
    anyhow::ensure!(report.readings_acked == report.readings_sent);
    let sent = read_sent(&log)?;
    let stored = query_all(&db)?;
    anyhow::ensure!(sent.len() as u64 == report.readings_sent);
    for (key, s) in &sent {
        anyhow::ensure!(
            stored.get(key) == Some(&s.val),
            "{key:?}: sent {s:?}, stored {:?}",
            stored.get(key)
        );
    }

    // Groups take the fleet in order; the sixth device plays no part.
    let groups: Vec<_> = report
        .devices
        .iter()
        .map(|d| d.group.clone().unwrap_or_default())
        .collect();
    anyhow::ensure!(
        groups == ["meters", "meters", "weather", "weather", "weather"],
        "{groups:?}"
    );
    let totals = &report.groups;
    anyhow::ensure!(
        totals.len() == 2 && totals[0].devices == 2 && totals[1].devices == 3,
        "{totals:?}"
    );
    let ids: Vec<u32> = report.devices.iter().map(|d| d.id).collect();
    let (meters, weather) = ids.split_at(2);

    // Each group sends its own sensors with its own models.
    for &m in meters {
        let mut counter = Vec::new();
        for (
            &(d, _, _),
            e2e::Sent {
                val: (sensor, _, value),
                ..
            },
        ) in &sent
        {
            if d != m {
                continue;
            }
            match sensor {
                1 => counter.push(value.parse::<f64>()?),
                7 => {
                    let v: f64 = value.parse()?;
                    anyhow::ensure!((40.0..=60.0).contains(&v), "walk of {m} at {v}");
                }
                s => anyhow::bail!("meter {m} sent sensor {s}"),
            }
        }
        // The counter counts 0, 1, 2, ... in sequence order: nothing skipped or repeated.
        let want: Vec<f64> = (0..counter.len()).map(|i| i as f64).collect();
        anyhow::ensure!(
            !counter.is_empty() && counter == want,
            "counter of {m}: {counter:?}"
        );
    }
    let mut missing = 0;
    let mut humidity = 0;
    for (
        &(d, _, _),
        e2e::Sent {
            val: (sensor, _, value),
            ..
        },
    ) in &sent
    {
        if weather.contains(&d) {
            anyhow::ensure!(matches!(sensor, 1 | 2), "weather {d} sent sensor {sensor}");
            if *sensor == 2 {
                humidity += 1;
                missing += usize::from(value == "NaN");
            } else {
                anyhow::ensure!(value != "NaN", "temperature missing");
            }
        }
    }
    // One in ten humidity samples is missing (about 180 samples): a fair draw stays within
    // 3..25 %.
    anyhow::ensure!(
        humidity >= 120 && missing * 100 > humidity * 3 && missing * 100 < humidity * 25,
        "{missing} of {humidity} humidity samples missing"
    );

    // The schedule: weather stations fell silent for a second (a gap of at least 1 s less one
    // datagram period in their timestamps, and datagrams not generated); meters never did.
    let gaps = largest_gaps(&stored);
    for &w in weather {
        let r = report
            .devices
            .iter()
            .find(|d| d.id == w)
            .context("report")?;
        anyhow::ensure!(gaps[&w] >= 700, "weather {w}: largest gap {} ms", gaps[&w]);
        anyhow::ensure!(r.faults.silenced >= 2, "weather {w}: {:?}", r.faults);
        // Then half a second of total loss, recovered by retransmission.
        anyhow::ensure!(
            r.faults.lost >= 1 && r.retransmissions >= 1,
            "weather {w}: {r:?}"
        );
    }
    for &m in meters {
        let r = report
            .devices
            .iter()
            .find(|d| d.id == m)
            .context("report")?;
        anyhow::ensure!(
            r.faults == device_sim::FaultCounts::default(),
            "meter {m}: {:?}",
            r.faults
        );
    }

    // The same scenario and seed give the same signals again; another seed does not.
    let walks = |log: &Path| -> anyhow::Result<BTreeMap<u32, Vec<String>>> {
        let mut out: BTreeMap<u32, Vec<String>> = BTreeMap::new();
        for (&(d, _, _), s) in &read_sent(log)? {
            if meters.contains(&d) && s.val.0 == 7 {
                out.entry(d).or_default().push(s.val.2.clone());
            }
        }
        Ok(out)
    };
    let first = walks(&log)?;
    let (_, again) = run("again", 5)?;
    let (_, other) = run("other", 6)?;
    let (again, other) = (walks(&again)?, walks(&other)?);
    for &m in meters {
        let n = first[&m].len().min(again[&m].len()).min(other[&m].len());
        anyhow::ensure!(n >= 20, "only {n} walk samples of {m}");
        anyhow::ensure!(
            first[&m][..n] == again[&m][..n],
            "seed 5 twice differs for {m}"
        );
        anyhow::ensure!(
            first[&m][..n] != other[&m][..n],
            "seeds 5 and 6 agree for {m}"
        );
    }
    gw.stop()
}

#[test]
fn scenario_and_replay_mistakes_are_refused_with_clear_errors() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let gw = "127.0.0.1:9".parse()?;
    let write = |name: &str, text: &str| -> anyhow::Result<std::path::PathBuf> {
        let p = dir.path().join(name);
        std::fs::write(&p, text)?;
        Ok(p)
    };
    let fails = |args: &[&str], want: &str| -> anyhow::Result<()> {
        let mut cmd = sim(gw, &fleet);
        if args.first() == Some(&"replay") {
            cmd = std::process::Command::new(e2e::bin("device-sim"));
            cmd.args(args)
                .args(["--gateway", "127.0.0.1:9", "--fleet", path(&fleet)]);
        } else {
            cmd.args(args);
        }
        let out = cmd.output()?;
        let err = String::from_utf8_lossy(&out.stderr);
        anyhow::ensure!(!out.status.success(), "{args:?} succeeded");
        anyhow::ensure!(err.contains(want), "{args:?}: {err}");
        anyhow::ensure!(!err.contains("panicked"), "{args:?}: {err}");
        Ok(())
    };
    let typo = write(
        "typo.toml",
        "[[group]]\ndevices = 1\n[[group.sensor]]\nid = 1\nmodel = \"sine\"\nmean = 1\namplitude = 1\nperod = \"1m\"\n",
    )?;
    fails(&["--scenario", path(&typo)], "unknown field `perod`")?;
    let big = write("big.toml", "[[group]]\ndevices = 3\n")?;
    fails(&["--scenario", path(&big)], "plays 3 devices but")?;
    let ok = write("ok.toml", "[[group]]\ndevices = 1\n")?;
    fails(
        &["--scenario", path(&ok), "--rate", "5"],
        "--rate is set per group in the scenario",
    )?;
    fails(
        &["--scenario", path(&dir.path().join("none.toml"))],
        "cannot read scenario",
    )?;

    let stranger = write(
        "stranger.csv",
        "device,sensor,ts_ms,value\n4000000000,1,5,1\n",
    )?;
    fails(&["replay", path(&stranger)], "not in the fleet file")?;
    let bad = write(
        "bad.csv",
        "device,sensor,ts_ms,value\n1,1,5,1\n1,1,6,warm\n",
    )?;
    fails(
        &["replay", path(&bad)],
        "line 3: value \"warm\" is not a number",
    )?;
    let crowd = write(
        "crowd.csv",
        "device,sensor,ts_ms,value\n1,1,5,1\n2,1,5,1\n3,1,5,1\n",
    )?;
    fails(
        &["replay", path(&crowd), "--map-devices"],
        "holds 3 devices but the fleet only 2",
    )?;
    fails(
        &["replay", path(&ok)],
        "the header must name device, sensor, value",
    )?;
    let one = write("one.csv", "device,sensor,ts_ms,value\n1,1,5,1\n")?;
    fails(
        &["replay", path(&one), "--map-devices", "--speed=-1"],
        "speed must be 0 (unpaced) or a factor of at least 0.001",
    )?;
    Ok(())
}

/// Readings as (device, sensor, ts_ms, value) in order, from a `gateway query` CSV.
fn readings_of(csv: &str) -> anyhow::Result<Vec<(u32, u16, i64, String)>> {
    let mut out = Vec::new();
    for line in csv.lines().skip(1) {
        let f: Vec<&str> = line.split(',').collect();
        anyhow::ensure!(f.len() == 7, "line {line:?}");
        out.push((f[0].parse()?, f[1].parse()?, f[3].parse()?, f[4].to_owned()));
    }
    out.sort();
    Ok(out)
}

#[test]
fn a_csv_export_replays_into_another_gateway_reading_for_reading() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    // Gateway A stores what a small scenario sends, missing samples included.
    let db_a = dir.path().join("a.db");
    let fleet_a = provision(dir.path(), &db_a, 3)?;
    let scenario = dir.path().join("s.toml");
    std::fs::write(
        &scenario,
        "duration = \"2s\"\nack = true\n[[group]]\ndevices = 3\nrate = 50.0\nbatch = 10\n\
         [[group.sensor]]\nid = 3\nmodel = \"pressure\"\nmissing = 0.2\n\
         [[group.sensor]]\nid = 9\nmodel = \"sine\"\nmean = 0\namplitude = 5\nperiod = \"1s\"\n",
    )?;
    let a = TestGateway::start(&db_a, &[])?;
    let mut cmd = sim(a.udp, &fleet_a);
    cmd.args(["--scenario", path(&scenario)]);
    run_sim(cmd)?;
    a.stop()?;
    let export = gateway(&["query", "readings", "--format", "csv", "--db", path(&db_a)])?;
    let recorded = readings_of(&export)?;
    anyhow::ensure!(recorded.len() > 200, "{} readings", recorded.len());
    anyhow::ensure!(
        recorded.iter().any(|r| r.3 == "NaN"),
        "no missing sample to replay"
    );
    let csv = dir.path().join("export.csv");
    std::fs::write(&csv, &export)?;

    // Gateway B gets the export replayed with its timestamps kept, unpaced, with acks: it
    // stores the same readings, missing samples as missing.
    let sub = dir.path().join("b");
    std::fs::create_dir(&sub)?;
    let db_b = sub.join("b.db");
    // A fourth device the recording does not mention: it plays nothing.
    let fleet_b = provision(&sub, &db_b, 4)?;
    let b = TestGateway::start(&db_b, &[])?;
    let report_path = sub.join("replay.json");
    // Replays the export into B with these flags and returns the report.
    let replay = |flags: &[&str]| -> anyhow::Result<device_sim::Report> {
        let mut cmd = std::process::Command::new(e2e::bin("device-sim"));
        cmd.args(["replay", path(&csv), "--gateway", &b.udp.to_string()])
            .args(["--fleet", path(&fleet_b), "--report", path(&report_path)])
            .args(["--ack", "--map-devices"])
            .args(flags);
        run_sim(cmd)?;
        read_report(&report_path)
    };
    let stored_in_b = || -> anyhow::Result<Vec<(u32, u16, i64, String)>> {
        readings_of(&gateway(&[
            "query",
            "readings",
            "--format",
            "csv",
            "--db",
            path(&db_b),
        ])?)
    };
    let report = replay(&["--speed", "0", "--timestamps", "keep"])?;
    anyhow::ensure!(report.readings_sent == recorded.len() as u64, "{report:?}");
    anyhow::ensure!(
        report.readings_acked == report.readings_sent && report.unacked == 0,
        "{report:?}"
    );
    // A and B provision their own ids; mapped in id order, A's i-th device is B's i-th.
    let ids_a: Vec<u32> = {
        let mut v: Vec<u32> = recorded.iter().map(|r| r.0).collect();
        v.dedup();
        v
    };
    let ids_b: Vec<u32> = device_sim::fleet::FleetFile::load(&fleet_b)?
        .devices
        .iter()
        .map(|d| d.device_id().0)
        .collect();
    let mapped: Vec<_> = recorded
        .iter()
        .map(|(d, s, t, v)| {
            let i = ids_a.iter().position(|x| x == d).unwrap_or(usize::MAX);
            (ids_b.get(i).copied().unwrap_or(0), *s, *t, v.clone())
        })
        .collect();
    let mut mapped = mapped;
    mapped.sort();
    let replayed = stored_in_b()?;
    anyhow::ensure!(
        replayed == mapped,
        "B holds {} readings, A {}",
        replayed.len(),
        mapped.len()
    );

    // Replayed again, paced at 2x with shifted timestamps: B stores a second copy whose times
    // keep the recorded spacing at half the span, and the replay cannot finish sooner than
    // the recorded span over the speed.
    let first = recorded.iter().map(|r| r.2).min().unwrap_or(0);
    let last = recorded.iter().map(|r| r.2).max().unwrap_or(0);
    let report = replay(&["--speed", "2"])?;
    anyhow::ensure!(report.readings_acked == recorded.len() as u64, "{report:?}");
    anyhow::ensure!(
        report.elapsed_s * 1000.0 >= (last - first) as f64 / 2.0,
        "paced replay of {} ms at 2x took {} s",
        last - first,
        report.elapsed_s
    );
    // ... nor take much longer (a generous bound: pacing, not stalling).
    anyhow::ensure!(
        report.elapsed_s * 1000.0 < (last - first) as f64 / 2.0 + 30_000.0,
        "paced replay of {} ms at 2x took {} s",
        last - first,
        report.elapsed_s
    );
    let now: Vec<_> = stored_in_b()?.into_iter().filter(|r| r.2 > last).collect();
    anyhow::ensure!(
        now.len() == recorded.len(),
        "{} shifted readings",
        now.len()
    );
    let base = now.iter().map(|r| r.2).min().unwrap_or(0);
    let mut shifted: Vec<_> = now
        .iter()
        .map(|(d, s, t, v)| (*d, *s, (t - base) * 2, v.clone()))
        .collect();
    let mut want: Vec<_> = mapped
        .iter()
        .map(|(d, s, t, v)| (*d, *s, t - first, v.clone()))
        .collect();
    shifted.sort();
    want.sort();
    for (got, want) in shifted.iter().zip(&want) {
        // Halved then doubled: within a millisecond of rounding.
        anyhow::ensure!(
            got.0 == want.0 && got.1 == want.1 && got.3 == want.3 && (got.2 - want.2).abs() <= 2,
            "{got:?} vs {want:?}"
        );
    }

    // A third time unpaced, one reading per datagram and one datagram in flight per device,
    // all four devices on one socket: devices wait for each ack before sending the next, the
    // one without readings ends at once, and everything arrives.
    let report = replay(&[
        "--speed",
        "0",
        "--batch",
        "1",
        "--window",
        "1",
        "--devices-per-socket",
        "4",
    ])?;
    anyhow::ensure!(
        report.readings_acked == recorded.len() as u64
            && report.datagrams_acked == recorded.len() as u64
            && report.unacked == 0,
        "{report:?}"
    );
    let all = stored_in_b()?;
    anyhow::ensure!(
        all.len() == 3 * recorded.len(),
        "{} readings in B",
        all.len()
    );
    b.stop()
}
