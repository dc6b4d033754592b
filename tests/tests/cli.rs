//! The command line as an operator uses it: devices and keys, query filters and formats,
//! errors, config check, and the demo.

use std::process::{Command, Stdio};

use anyhow::Context;
use e2e::*;

fn path(p: &std::path::Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn gateway_err(args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin("gateway")).args(args).output()?;
    assert!(!out.status.success(), "gateway {args:?} should fail");
    Ok(String::from_utf8(out.stderr)?)
}

#[test]
fn devices_add_list_and_provision() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let out = gateway(&[
        "devices",
        "add",
        "--id",
        "42",
        "--name",
        "boiler",
        "--db",
        path(&db),
    ])?;
    let key = out
        .lines()
        .find_map(|l| l.strip_prefix("key "))
        .context("key printed")?;
    assert_eq!(key.len(), 64);
    assert!(key.parse::<proto::DeviceKey>().is_ok());
    let err = gateway_err(&["devices", "add", "--id", "42", "--db", path(&db)])?;
    assert!(err.contains("device 42 already exists"), "{err}");

    let fleet = dir.path().join("fleet.json");
    gateway(&[
        "devices",
        "provision",
        "--count",
        "3",
        "--out",
        path(&fleet),
        "--db",
        path(&db),
    ])?;
    let f = device_sim::fleet::FleetFile::load(&fleet)?;
    let ids: Vec<u32> = f.devices.iter().map(|d| d.id).collect();
    assert_eq!(ids, [43, 44, 45], "ids continue after the highest");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&fleet)?.permissions().mode() & 0o777,
        0o600
    );
    let err = gateway_err(&[
        "devices",
        "provision",
        "--count",
        "1",
        "--out",
        path(&fleet),
        "--db",
        path(&db),
    ])?;
    assert!(err.contains("--force"), "{err}");

    let list = gateway(&["devices", "list", "--format", "json", "--db", path(&db)])?;
    let list: serde_json::Value = serde_json::from_str(&list)?;
    let list = list.as_array().context("array")?;
    assert_eq!(list.len(), 4);
    assert_eq!(list[0]["name"], "boiler");
    let text = gateway(&["devices", "list", "--db", path(&db)])?;
    assert!(
        !text.contains(key) && !serde_json::to_string(&list)?.contains(key),
        "keys never listed"
    );
    Ok(())
}

#[test]
fn verbs_on_a_missing_database_fail_clearly() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("nope.db");
    for verb in [
        &["query", "readings"][..],
        &["stats"][..],
        &["devices", "list"][..],
    ] {
        let mut args = verb.to_vec();
        args.extend(["--db", path(&db)]);
        let err = gateway_err(&args)?;
        assert!(err.contains("no database at"), "{verb:?}: {err}");
    }
    assert!(!db.exists(), "a read verb must not create the database");
    Ok(())
}

#[test]
fn query_filters_and_formats() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    let fleet = provision(dir.path(), &db, 2)?;
    let gw = TestGateway::start(&db, &[])?;
    // Device 1: seqs 0..10 with 3 readings each at 1_764_000_000_000 + seq*100 + i.
    for index in 0..2 {
        let dev = RawDevice::new(&fleet, index, gw.udp)?;
        for seq in 0..10 {
            dev.send_acked(&dev.datagram(seq, 3), seq)?;
        }
    }
    let d = path(&db);
    let csv = gateway(&[
        "query", "readings", "--db", d, "--device", "1", "--format", "csv",
    ])?;
    assert_eq!(csv.lines().count(), 31);
    assert_eq!(
        csv.lines().nth(1),
        Some("1,1,2025-11-24T16:00:00.000Z,1764000000000,0,0,0")
    );
    let ranged = gateway(&[
        "query",
        "readings",
        "--db",
        d,
        "--device",
        "2",
        "--format",
        "ndjson",
        "--from",
        "2025-11-24T16:00:00.200Z",
        "--to",
        "2025-11-24T16:00:00.400Z",
    ])?;
    let rows: Vec<serde_json::Value> = ranged
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(rows.len(), 6, "seqs 2 and 3");
    assert!(rows.iter().all(|r| r["device"] == 2));
    assert_eq!(rows[0]["seq"], 2);
    let json = gateway(&[
        "query", "readings", "--db", d, "--limit", "5", "--format", "json",
    ])?;
    let json: serde_json::Value = serde_json::from_str(&json)?;
    assert_eq!(json.as_array().map(Vec::len), Some(5));
    let sensor = gateway(&[
        "query", "readings", "--db", d, "--sensor", "2", "--format", "csv",
    ])?;
    assert_eq!(sensor.lines().count(), 1, "all readings are sensor 1");
    // The readings are from 2025-11-24, more than 10 minutes ago by any clock running this.
    let recent = gateway(&[
        "query", "readings", "--db", d, "--since", "10m", "--format", "csv",
    ])?;
    assert_eq!(recent.lines().count(), 1);
    let table = gateway(&[
        "query", "readings", "--db", d, "--device", "1", "--limit", "2",
    ])?;
    assert_eq!(table.lines().count(), 3);
    let err = gateway_err(&[
        "query",
        "readings",
        "--db",
        d,
        "--from",
        "2026-11-25T00:00:00Z",
        "--to",
        "2026-11-24T00:00:00Z",
    ])?;
    assert!(err.contains("--from must be before --to"), "{err}");
    let err = gateway_err(&["query", "readings", "--db", d, "--from", "yesterday"])?;
    assert!(err.contains("2026-11-25T10:00:00Z"), "{err}");

    // Reading while the gateway serves, and a reader that closes the pipe early.
    let mut child = Command::new(bin("gateway"))
        .args(["query", "readings", "--db", d, "--format", "csv"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    drop(child.stdout.take());
    let out = child.wait_with_output()?;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    gw.stop()?;
    Ok(())
}

#[test]
fn config_check_accepts_the_example_and_rejects_typos() -> anyhow::Result<()> {
    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/gateway.example.toml");
    let out = gateway(&[
        "config",
        "check",
        "--config",
        path(&example),
        "--udp",
        "127.0.0.1:9999",
    ])?;
    assert!(
        out.contains("listen = \"127.0.0.1:9999\""),
        "flags override the file: {out}"
    );
    let dir = tempfile::tempdir()?;
    // Secrets are validated but never printed.
    let secret = dir.path().join("secret.toml");
    std::fs::write(
        &secret,
        "[admin]\ntoken = \"tok-3f9a-never-shown\"\n[mqtt]\npassword = \"pw-77c1-never-shown\"\n",
    )?;
    let out = gateway(&["config", "check", "--config", path(&secret)])?;
    assert!(
        !out.contains("never-shown") && out.matches("<redacted>").count() == 2,
        "secrets shown: {out}"
    );
    // The annotated default configuration is a valid configuration file.
    let default = gateway(&["config", "default"])?;
    assert!(
        default.contains("[telemetry]") && default.contains("# "),
        "{default}"
    );
    let file = dir.path().join("default.toml");
    std::fs::write(&file, &default)?;
    gateway(&["config", "check", "--config", path(&file)])?;
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "[store]\ndurabilty = \"full\"\n")?;
    let err = gateway_err(&["config", "check", "--config", path(&bad)])?;
    assert!(err.contains("durabilty"), "{err}");
    Ok(())
}

#[test]
fn demo_runs_and_stores_readings() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let run = || -> anyhow::Result<String> {
        let out = Command::new(bin("gateway"))
            .args([
                "demo",
                "--devices",
                "10",
                "--rate",
                "32",
                "--duration",
                "2s",
            ])
            .current_dir(dir.path())
            .output()?;
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?)
    };
    let first = run()?;
    assert!(first.contains("provisioned 10 devices"), "{first}");
    assert!(
        first.contains("gateway query readings --db gateway.db"),
        "{first}"
    );
    // The dashboard link carries the API token (in the fragment, which browsers keep).
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    assert!(
        first.contains(&format!("/dashboard/#token={}", token.trim())),
        "{first}"
    );
    let db = dir.path().join("gateway.db");
    let after_first = query_all(&db)?.len();
    assert!(
        after_first >= 10 * 32,
        "{after_first} readings after 2 s of 10 devices at 32/s"
    );
    let second = run()?;
    assert!(
        second.contains("using 10 devices"),
        "the fleet is reused: {second}"
    );
    let after_second = query_all(&db)?.len();
    assert!(
        after_second > after_first,
        "the second run's readings were accepted, not replays"
    );
    assert_eq!(
        counter(&stats(&db)?, "drop_replay") + counter(&stats(&db)?, "drop_duplicate"),
        0
    );
    Ok(())
}

/// The database holds the device keys: a new one is readable by its owner only, and so are the
/// WAL and shared-memory files SQLite creates beside it.
#[test]
fn a_new_database_is_private_to_its_owner() -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("gw.db");
    gateway(&["devices", "add", "--db", path(&db)])?;
    let mut checked = 0;
    for name in ["gw.db", "gw.db-wal", "gw.db-shm"] {
        let file = dir.path().join(name);
        if !file.exists() {
            continue;
        }
        let mode = std::fs::metadata(&file)?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{name} has mode {mode:o}");
        checked += 1;
    }
    assert!(checked >= 1, "no database file was created");
    Ok(())
}
