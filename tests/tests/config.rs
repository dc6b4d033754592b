//! Configuration from the outside: environment overrides on top of the file (with clear errors
//! for bad ones) and SIGHUP reloads of the real gateway.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{TestGateway, bin, http, metric, serial, wait_until};

fn path(p: &Path) -> &str {
    p.to_str().unwrap_or_default()
}

/// `gateway config check --config FILE` with `env`: (success, stdout, stderr).
fn check(file: &Path, env: &[(&str, &str)]) -> anyhow::Result<(bool, String, String)> {
    let out = Command::new(bin("gateway"))
        .args(["config", "check", "--config", path(file)])
        .envs(env.iter().copied())
        .output()?;
    Ok((
        out.status.success(),
        String::from_utf8(out.stdout)?,
        String::from_utf8(out.stderr)?,
    ))
}

/// The status of a readings query asking for `limit` rows.
fn limit_status(gw: &TestGateway, token: &str, limit: u64) -> anyhow::Result<(u16, String)> {
    let (code, _, body) = http(
        gw.admin,
        "GET",
        &format!("/api/v1/readings?since=1m&limit={limit}&format=csv"),
        Some(token),
    )?;
    Ok((code, body))
}

#[test]
fn environment_overrides_the_file_and_bad_overrides_are_named() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(
        &file,
        "[retention]\nreadings = \"1d\"\n\n[admin]\nmax_points = 1000\n",
    )?;
    let (ok, out, err) = check(
        &file,
        &[
            ("GATEWAY__RETENTION__READINGS", "2d"),
            ("GATEWAY__MQTT__PORT", "1999"),
            (
                "gateway__aggregate__windows",
                "not a gateway variable: lower case",
            ),
            ("GATEWAY__AGGREGATE__WINDOWS", "[\"10s\", \"1m\", \"1h\"]"),
        ],
    )?;
    assert!(ok, "{err}");
    assert!(out.contains("readings = \"2days\""), "{out}");
    assert!(out.contains("port = 1999"), "{out}");
    assert!(out.contains("\"1h\""), "{out}");
    assert!(
        out.contains("max_points = 1000"),
        "the file's own value stays: {out}"
    );

    // A variable that names no setting, and a value a setting does not take: both named.
    let (ok, _, err) = check(&file, &[("GATEWAY__RETENTION__READINGZ", "1d")])?;
    assert!(!ok);
    assert!(
        err.contains("GATEWAY__RETENTION__READINGZ") && err.contains("readingz"),
        "{err}"
    );
    let (ok, _, err) = check(&file, &[("GATEWAY__RETENTION__READINGS", "soon")])?;
    assert!(!ok);
    assert!(err.contains("GATEWAY__RETENTION__READINGS"), "{err}");
    let (ok, _, err) = check(&file, &[("GATEWAY__RETENTION", "3")])?;
    assert!(!ok, "a section replaced by a number");
    assert!(err.contains("GATEWAY__RETENTION"), "{err}");
    let (ok, _, err) = check(&file, &[("GATEWAY__ADMIN____X", "1")])?;
    assert!(!ok);
    assert!(err.contains("double underscores"), "{err}");

    // The running gateway takes them too.
    let db = dir.path().join("gw.db");
    let gw = TestGateway::start_env(
        &db,
        &["--config", path(&file)],
        &[("GATEWAY__ADMIN__MAX_POINTS", "500")],
    )?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let (code, body) = limit_status(&gw, token.trim(), 600)?;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("(500, admin.max_points)"), "{body}");
    assert_eq!(limit_status(&gw, token.trim(), 500)?.0, 200);
    gw.stop()?;
    Ok(())
}

#[test]
fn sighup_applies_what_it_can_and_names_what_waits_for_a_restart() -> anyhow::Result<()> {
    let _serial = serial();
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("gateway.toml");
    std::fs::write(&file, "[admin]\nmax_points = 1000\n")?;
    let db = dir.path().join("gw.db");
    let mut gw = TestGateway::start(&db, &["--config", path(&file)])?;
    let token = std::fs::read_to_string(dir.path().join("admin.token"))?;
    let token = token.trim();
    let log = db.with_extension("log");
    let log_has =
        |what: &str| -> anyhow::Result<bool> { Ok(std::fs::read_to_string(&log)?.contains(what)) };
    assert_eq!(limit_status(&gw, token, 1500)?.0, 400);
    let runs = || -> anyhow::Result<u64> {
        let (_, _, text) = http(gw.admin, "GET", "/metrics", Some(token))?;
        Ok(metric(&text, "gateway_retention_runs_total"))
    };
    assert_eq!(runs()?, 0, "no retention configured yet");

    std::fs::write(
        &file,
        "[admin]\nmax_points = 2000\n\n[retention]\nreadings = \"1h\"\ninterval = \"1s\"\n\n\
         [telemetry]\nqueue = 1234\n",
    )?;
    gw.signal("HUP")?;
    wait_until(Duration::from_secs(20), "the new max_points", || {
        Ok(limit_status(&gw, token, 1500)?.0 == 200)
    })?;
    wait_until(Duration::from_secs(20), "retention running", || {
        Ok(runs()? > 0)
    })?;
    wait_until(Duration::from_secs(10), "the changes logged", || {
        Ok(log_has("admin.max_points")?
            && log_has("retention.readings")?
            && log_has("telemetry.queue")?
            && log_has("takes effect after a restart")?)
    })?;
    let text = std::fs::read_to_string(&log)?;
    let queue_line = text
        .lines()
        .find(|l| l.contains("telemetry.queue"))
        .unwrap_or_default();
    assert!(
        queue_line.contains("after a restart"),
        "a restart-only setting logged as applied: {queue_line}"
    );

    // An invalid file changes nothing, and says so.
    std::fs::write(&file, "[admin]\nmax_pointz = 1\n")?;
    gw.signal("HUP")?;
    wait_until(Duration::from_secs(20), "the invalid file reported", || {
        Ok(log_has("the running one is kept")? && log_has("max_pointz")?)
    })?;
    assert_eq!(limit_status(&gw, token, 1500)?.0, 200);
    assert!(
        gw.child.try_wait()?.is_none(),
        "the gateway exited on a bad reload"
    );
    gw.stop()?;
    Ok(())
}
