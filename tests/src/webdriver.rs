//! A small W3C WebDriver client over plain HTTP, enough for the dashboard test to drive
//! headless Chromium (Debian's `chromium` and `chromium-driver`): open a page, run a script,
//! click, take a screenshot.

use std::net::{SocketAddr, TcpListener};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, bail};
use serde_json::{Value, json};

use crate::{KillOnDrop, http_request, wait_until};

/// The element key of the W3C protocol.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A headless Chromium session driven through chromedriver; ended on drop.
pub struct Browser {
    addr: SocketAddr,
    session: String,
    _driver: KillOnDrop,
    _profile: tempfile::TempDir,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn find(names: &[&str]) -> Option<std::path::PathBuf> {
    names
        .iter()
        .map(Path::new)
        .find(|p| p.exists())
        .map(Path::to_path_buf)
}

impl Browser {
    /// Starts chromedriver and a headless Chromium with a `width`×`height` window.
    ///
    /// # Errors
    /// When chromium or chromedriver is missing (install Debian's `chromium` and
    /// `chromium-driver`) or does not start.
    pub fn start(width: u32, height: u32) -> anyhow::Result<Self> {
        let chromium = find(&["/usr/bin/chromium", "/usr/bin/chromium-browser"])
            .context("no chromium: apt-get install chromium chromium-driver")?;
        let driver = find(&["/usr/bin/chromedriver"])
            .context("no chromedriver: apt-get install chromium-driver")?;
        let port = free_port()?;
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let child = Command::new(driver)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromedriver")?;
        let driver = KillOnDrop(child);
        wait_until(Duration::from_secs(20), "chromedriver ready", || {
            Ok(http_request(addr, "GET", "/status", "", b"")
                .ok()
                .and_then(|(_, _, b)| serde_json::from_str::<Value>(&b).ok())
                .is_some_and(|v| v["value"]["ready"] == true))
        })?;
        let profile = tempfile::tempdir()?;
        let mut args = vec![
            "--headless=new".to_owned(),
            // Root in CI: Chromium's sandbox needs an unprivileged user.
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            // No network but loopback: nothing in the background that would try to reach out.
            "--disable-background-networking".into(),
            "--disable-component-update".into(),
            "--disable-sync".into(),
            "--disable-quic".into(),
            "--no-first-run".into(),
            format!("--window-size={width},{height}"),
        ];
        args.push(format!("--user-data-dir={}", profile.path().display()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "goog:chromeOptions": {"binary": chromium, "args": args}
        }}});
        let v = call(addr, "POST", "/session", Some(&caps))?;
        let session = v["sessionId"].as_str().context("no session id")?.to_owned();
        Ok(Self {
            addr,
            session,
            _driver: driver,
            _profile: profile,
        })
    }

    fn cmd(&self, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
        call(
            self.addr,
            method,
            &format!("/session/{}{path}", self.session),
            body,
        )
    }

    /// Opens `url`.
    ///
    /// # Errors
    /// WebDriver errors.
    pub fn goto(&self, url: &str) -> anyhow::Result<()> {
        self.cmd("POST", "/url", Some(&json!({ "url": url })))?;
        Ok(())
    }

    /// Runs `script` (a function body; `arguments` holds `args`) and returns its value.
    ///
    /// # Errors
    /// WebDriver errors, a script that throws among them.
    pub fn eval(&self, script: &str, args: Value) -> anyhow::Result<Value> {
        self.cmd(
            "POST",
            "/execute/sync",
            Some(&json!({ "script": script, "args": args })),
        )
    }

    /// Clicks the first element matching `css`.
    ///
    /// # Errors
    /// When nothing matches, or WebDriver errors.
    pub fn click(&self, css: &str) -> anyhow::Result<()> {
        let el = self.cmd(
            "POST",
            "/element",
            Some(&json!({"using": "css selector", "value": css})),
        )?;
        let id = el[ELEMENT].as_str().context("no element id")?.to_owned();
        self.cmd("POST", &format!("/element/{id}/click"), Some(&json!({})))?;
        Ok(())
    }

    /// A PNG of the viewport.
    ///
    /// # Errors
    /// WebDriver errors.
    pub fn screenshot(&self) -> anyhow::Result<Vec<u8>> {
        use base64::Engine;
        let v = self.cmd("GET", "/screenshot", None)?;
        let b64 = v.as_str().context("no screenshot")?;
        Ok(base64::engine::general_purpose::STANDARD.decode(b64)?)
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.cmd("DELETE", "", None);
    }
}

/// One WebDriver command: its `value`, or the error it answered with.
fn call(addr: SocketAddr, method: &str, path: &str, body: Option<&Value>) -> anyhow::Result<Value> {
    let body = body.map(Value::to_string).unwrap_or_default();
    let headers = if body.is_empty() {
        ""
    } else {
        "Content-Type: application/json\r\n"
    };
    let (code, _, text) = http_request(addr, method, path, headers, body.as_bytes())?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{method} {path}: {code} {text}"))?;
    if code != 200 {
        bail!(
            "{method} {path}: {code} {}: {}",
            v["value"]["error"],
            v["value"]["message"]
        );
    }
    Ok(v["value"].clone())
}
