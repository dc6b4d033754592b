//! The command line: verbs, their flags and environment variables, and how results are
//! printed. Settings are merged here, at the edge: defaults < TOML file < environment < flags.

use std::io::{self, IsTerminal, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use device_sim::fleet::{FleetDevice, FleetFile};
use futures_util::TryStreamExt;

use crate::config::{Config, Durability, default_db};
use crate::rows::{Encoder, Format};
use crate::store::query::{ReadingRow, ReadingsFilter};
use crate::store::{DeviceRow, OpenOptions, Store};
use proto::DeviceId;

/// Edge gateway for sensor telemetry: authenticated UDP in, SQLite on disk.
#[derive(Debug, Parser)]
#[command(version, about, args_conflicts_with_subcommands = true)]
pub struct Cli {
    /// Log format on stderr.
    #[arg(
        long,
        global = true,
        env = "GATEWAY_LOG_FORMAT",
        default_value = "human"
    )]
    pub log_format: LogFormat,
    /// What to do; `serve` when omitted.
    #[command(subcommand)]
    pub command: Option<Command>,
    /// Settings of `serve` when no verb is given.
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Log output format.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Human,
    /// One JSON object per line.
    Json,
}

/// The verbs.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Receive telemetry and store it (the default verb).
    Serve(ServeArgs),
    /// Manage devices and their keys.
    #[command(subcommand)]
    Devices(DevicesCommand),
    /// Query stored data.
    #[command(subcommand)]
    Query(QueryCommand),
    /// Per-device received, lost and rejected counts, and the gateway's counters.
    Stats(StatsArgs),
    /// Run a gateway and a simulated fleet on loopback and show live figures.
    Demo(DemoArgs),
    /// Check configuration.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// TLS certificates for control sessions.
    #[command(subcommand)]
    Certs(CertsCommand),
    /// Commands to devices, through the running gateway's admin API.
    #[command(subcommand)]
    Commands(CommandsCommand),
    /// Files to devices (firmware, config files), through the running gateway's admin API.
    #[command(subcommand)]
    Files(FilesCommand),
    /// Windowed aggregates.
    #[command(subcommand)]
    Aggregates(AggregatesCommand),
    /// The database: sizes, retention, vacuum.
    #[command(subcommand)]
    Db(DbCommand),
}

/// `gateway db ...`
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum DbCommand {
    /// Sizes, what is stored (readings, windows per tier, outbox) and the vacuum mode.
    Status {
        #[command(flatten)]
        db: DbArg,
        /// Output format.
        #[arg(long, default_value = "table")]
        format: ListFormat,
    },
    /// Apply the configuration's [retention] policy once (the running gateway also does it
    /// every retention.interval).
    Prune(ServeArgs),
    /// Rewrite the database so its free pages go back to the disk. Run it with the gateway
    /// stopped; needs free disk as large as the database.
    Vacuum {
        #[command(flatten)]
        db: DbArg,
    },
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1024.0 * 1024.0))
}

/// `gateway db ...`
///
/// # Errors
/// Database errors, an invalid configuration, a busy database for `vacuum`.
pub async fn db(cmd: DbCommand) -> anyhow::Result<()> {
    match cmd {
        DbCommand::Status { db, format } => {
            let store = Store::open(&OpenOptions::cli(&db.db, false)).await?;
            let st = store.db_status(&db.db).await?;
            store.close().await;
            match format {
                ListFormat::Json => println!("{}", serde_json::to_string_pretty(&st)?),
                ListFormat::Table => {
                    println!("database    {}", db.db.display());
                    println!(
                        "file        {} ({} in use, {} free), WAL {}, auto_vacuum {}",
                        mib(st.file_bytes),
                        mib(st.used_bytes),
                        mib(st.free_bytes),
                        mib(st.wal_bytes),
                        st.auto_vacuum
                    );
                    let range = |a: Option<i64>, b: Option<i64>| match (a, b) {
                        (Some(a), Some(b)) => format!("{} .. {}", format_ms(a), format_ms(b)),
                        _ => "-".into(),
                    };
                    println!(
                        "readings    {} ({})",
                        st.readings,
                        range(st.readings_from_ms, st.readings_to_ms)
                    );
                    for (w, n, lo, hi) in &st.aggregates {
                        println!(
                            "windows {:<4}{n} ({})",
                            humantime::format_duration(Duration::from_millis(*w as u64))
                                .to_string(),
                            range(*lo, *hi)
                        );
                    }
                    println!("outbox      {} rows", st.outbox_rows);
                }
            }
        }
        DbCommand::Prune(args) => {
            let cfg = args.resolve()?;
            if !cfg.retention.active() {
                bail!(
                    "nothing to enforce: set retention.readings, retention.aggregates, \
                     retention.tiers or retention.max_db_size (see gateway config default)"
                );
            }
            let store = Store::open(&OpenOptions::cli(&cfg.store.path, false)).await?;
            let mut policy = crate::store::retention::Policy::from_config(&cfg);
            policy.cap_budget = None;
            eprintln!("pruning {} ...", cfg.store.path.display());
            let r = store.prune(&policy, crate::store::now_ms()).await?;
            store.close().await;
            println!(
                "deleted {} readings ({} blocks) and {} windows; kept {} unsent windows; \
                 gave back {} pages; in use {} -> {}{}",
                r.readings,
                r.blocks,
                r.aggregates,
                r.kept_unsent,
                r.pages_freed,
                mib(r.used_before),
                mib(r.used_after),
                if r.cap_unmet {
                    " (still above retention.max_db_size: what is left may not be deleted)"
                } else {
                    ""
                }
            );
        }
        DbCommand::Vacuum { db } => {
            let store = Store::open(&OpenOptions::cli(&db.db, false)).await?;
            eprintln!(
                "vacuuming {} (rewrites the whole file) ...",
                db.db.display()
            );
            let (before, after) = store
                .vacuum_full()
                .await
                .context("vacuum (is the gateway still running?)")?;
            store.close().await;
            println!("{} -> {}", mib(before), mib(after));
        }
    }
    Ok(())
}

/// `gateway aggregates ...`
#[derive(Debug, Subcommand)]
pub enum AggregatesCommand {
    /// Recompute windows from the stored readings and compare them with the stored aggregates;
    /// with --write, store corrections as the next revision (and queue them for the broker).
    /// Window settings come from the config file. Best run while the gateway is stopped.
    Rebuild {
        /// Config file with the [aggregate] settings [default: built-in defaults].
        #[arg(long, env = "GATEWAY_CONFIG")]
        config: Option<PathBuf>,
        #[command(flatten)]
        db: DbArg,
        /// Windows starting at or after this: RFC 3339 time, ms since the epoch, or a period
        /// back from now (e.g. 1h).
        #[arg(long, value_parser = parse_since)]
        since: i64,
        /// Store what differs or is missing.
        #[arg(long)]
        write: bool,
        /// Output format.
        #[arg(long, default_value = "table")]
        format: ListFormat,
    },
}

fn parse_since(s: &str) -> Result<i64, String> {
    if let Ok(ms) = s.parse::<i64>() {
        return Ok(ms);
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(crate::store::now_ms().saturating_sub(d.as_millis() as i64));
    }
    let t = parse_time(s)?;
    Ok(t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
}

/// Runs `gateway aggregates ...`.
///
/// # Errors
/// Unusable config or database.
pub async fn aggregates(cmd: AggregatesCommand) -> anyhow::Result<()> {
    match cmd {
        AggregatesCommand::Rebuild {
            config,
            db,
            since,
            write,
            format,
        } => {
            // The same settings the gateway runs with: file, then environment overrides.
            let cfg = Config::from_sources(config.as_deref(), env_overrides())?;
            let store = Store::open(&OpenOptions::cli(&db.db, false)).await?;
            let agg_cfg = crate::aggregate::aggregator_config(&cfg.aggregate);
            let tty = io::stderr().is_terminal();
            let report = store
                .rebuild(&agg_cfg, since, write, cfg.mqtt.enabled, |done, total, r| {
                    if tty && (done % 50 == 0 || done == total) {
                        eprint!(
                            "\rrebuild: {done}/{total} devices, {} windows, {} differ, {} missing",
                            r.recomputed, r.differing, r.missing
                        );
                    }
                })
                .await?;
            if tty {
                eprintln!();
            }
            store.close().await;
            let mut out = io::stdout().lock();
            match format {
                ListFormat::Json => {
                    serde_json::to_writer_pretty(&mut out, &report)?;
                    writeln!(out)?;
                }
                ListFormat::Table => {
                    writeln!(out, "windows recomputed   {}", report.recomputed)?;
                    writeln!(out, "identical            {}", report.identical)?;
                    writeln!(out, "differing            {}", report.differing)?;
                    writeln!(out, "missing              {}", report.missing)?;
                    writeln!(out, "without readings     {}", report.without_readings)?;
                    writeln!(out, "written              {}", report.written)?;
                }
            }
            Ok(())
        }
    }
}

/// The body of a successful answer of the admin API, or an error carrying the gateway's message.
fn answer(mut resp: ureq::http::Response<ureq::Body>) -> anyhow::Result<String> {
    let status = resp.status();
    let text = resp.body_mut().read_to_string()?;
    if !status.is_success() {
        bail!("gateway answered {status}: {text}");
    }
    Ok(text)
}

/// `gateway files ...`
#[derive(Debug, Subcommand)]
pub enum FilesCommand {
    /// Send a file to one device or all; delivered in chunks, resumed after disconnects, and
    /// checked by SHA-256 on the device.
    Send {
        /// Target device.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        device: Option<u32>,
        /// Every device.
        #[arg(long)]
        all: bool,
        /// Name on the device [default: the file's name]; sanitised.
        #[arg(long)]
        name: Option<String>,
        /// Wait and show progress until every transfer has ended.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        admin: AdminArgs,
        /// The file.
        path: PathBuf,
    },
    /// Transfers and their progress, newest first.
    Status {
        /// Only transfers of this file id.
        #[arg(long)]
        file: Option<i64>,
        /// Output format.
        #[arg(long, default_value = "table")]
        format: ListFormat,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn transfers(admin: &AdminArgs, file: Option<i64>) -> anyhow::Result<Vec<serde_json::Value>> {
    let mut url = admin.url("/api/v1/transfers?limit=100000");
    if let Some(f) = file {
        url.push_str(&format!("&file={f}"));
    }
    let text = answer(
        admin
            .agent()
            .get(&url)
            .header("Authorization", &format!("Bearer {}", admin.token()?))
            .call()
            .with_context(|| format!("reaching the gateway at {}", admin.admin))?,
    )?;
    Ok(serde_json::from_str(&text)?)
}

/// The pause between two refreshes of a progress display.
#[allow(clippy::disallowed_methods)]
fn progress_pause() {
    std::thread::sleep(Duration::from_millis(500));
}

/// `gateway files ...`
///
/// # Errors
/// Unreadable file, unreachable gateway, API errors.
pub fn files(cmd: FilesCommand) -> anyhow::Result<()> {
    match cmd {
        FilesCommand::Send {
            device,
            all,
            name,
            wait,
            admin,
            path,
        } => {
            let bytes =
                std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
            let name = crate::store::files::sanitize_name(&name.unwrap_or_else(|| {
                path.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default()
            }));
            let target = match device {
                Some(d) => format!("device={d}"),
                None if all => "all=true".to_owned(),
                None => bail!("give --device or --all"),
            };
            let url = admin.url(&format!("/api/v1/files?name={name}&{target}"));
            let text = answer(
                admin
                    .agent()
                    .post(&url)
                    .header("Authorization", &format!("Bearer {}", admin.token()?))
                    .send(&bytes[..])
                    .with_context(|| format!("reaching the gateway at {}", admin.admin))?,
            )?;
            let q: crate::admin::FileQueued = serde_json::from_str(&text)?;
            println!(
                "file {} ({}, {} bytes, sha256 {}) queued for {} device(s)",
                q.file, q.name, q.size, q.sha256, q.transfers
            );
            if wait {
                loop {
                    let rows = transfers(&admin, Some(q.file))?;
                    let done = rows.iter().filter(|r| r["status"] == "done").count();
                    let failed = rows.iter().filter(|r| r["status"] == "failed").count();
                    let confirmed: i64 = rows
                        .iter()
                        .map(|r| r["acked_offset"].as_i64().unwrap_or(0))
                        .sum();
                    let total = q.size as i64 * rows.len() as i64;
                    eprint!(
                        "\r{done}/{} done, {failed} failed, {:.1} of {:.1} MiB confirmed   ",
                        rows.len(),
                        confirmed as f64 / 1048576.0,
                        total as f64 / 1048576.0
                    );
                    if done + failed == rows.len() {
                        eprintln!();
                        if failed > 0 {
                            bail!("{failed} transfer(s) failed (see gateway files status)");
                        }
                        break;
                    }
                    progress_pause();
                }
            }
        }
        FilesCommand::Status {
            file,
            format,
            admin,
        } => {
            let rows = transfers(&admin, file)?;
            match format {
                ListFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                ListFormat::Table => {
                    println!(
                        "{:>8}  {:>6}  {:<24}  {:>10}  {:<8}  {:>12}  {:>12}  detail",
                        "transfer", "file", "name", "device", "status", "confirmed", "size"
                    );
                    for r in rows {
                        println!(
                            "{:>8}  {:>6}  {:<24}  {:>10}  {:<8}  {:>12}  {:>12}  {}",
                            r["id"],
                            r["file"],
                            r["name"].as_str().unwrap_or(""),
                            r["device"],
                            r["status"].as_str().unwrap_or(""),
                            r["acked_offset"],
                            r["size"],
                            r["detail"].as_str().unwrap_or("")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// How the CLI reaches a running gateway.
#[derive(Debug, Args, Clone)]
pub struct AdminArgs {
    /// Admin API address of the running gateway.
    #[arg(long, env = "GATEWAY_ADMIN", default_value = "127.0.0.1:4782")]
    pub admin: SocketAddr,
    /// Bearer token [default: the admin.token file beside --db].
    #[arg(long, env = "GATEWAY_ADMIN_TOKEN")]
    pub token: Option<String>,
    #[command(flatten)]
    pub db: DbArg,
}

impl AdminArgs {
    fn token(&self) -> anyhow::Result<String> {
        if let Some(t) = &self.token {
            return Ok(t.clone());
        }
        let file = crate::config::token_file(&self.db.db);
        Ok(std::fs::read_to_string(&file)
            .with_context(|| {
                format!(
                    "reading the admin token from {} (pass --token or --db)",
                    file.display()
                )
            })?
            .trim()
            .to_owned())
    }

    fn agent(&self) -> ureq::Agent {
        ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into()
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin)
    }
}

/// Revokes through the running gateway; None when no gateway answers at the admin address.
fn revoke_online(admin: &AdminArgs, id: u32) -> anyhow::Result<Option<crate::admin::Revoked>> {
    let sent = admin
        .agent()
        .post(&admin.url(&format!("/api/v1/devices/{id}/revoke")))
        .header("Authorization", &format!("Bearer {}", admin.token()?))
        .send_empty();
    match sent {
        Err(ureq::Error::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(None),
        Err(ureq::Error::ConnectionFailed) => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reaching the gateway at {}", admin.admin)),
        Ok(resp) => Ok(Some(serde_json::from_str(&answer(resp)?)?)),
    }
}

/// `gateway devices rotate-key`: starts the rotation through the admin API, then, with
/// `wait`, polls the device list until the device confirms.
fn rotate_key(admin: &AdminArgs, id: u32, wait: Option<Duration>) -> anyhow::Result<()> {
    let agent = admin.agent();
    let token = admin.token()?;
    let sent = agent
        .post(&admin.url(&format!("/api/v1/devices/{id}/rotate-key")))
        .header("Authorization", &format!("Bearer {token}"))
        .send_empty();
    let resp = match sent {
        Err(ureq::Error::Io(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            bail!(
                "no gateway answered at {}: a key rotation needs the running gateway to deliver \
                 the key",
                admin.admin
            )
        }
        Err(ureq::Error::ConnectionFailed) => bail!(
            "no gateway answered at {}: a key rotation needs the running gateway to deliver the key",
            admin.admin
        ),
        Err(e) => {
            return Err(e).with_context(|| format!("reaching the gateway at {}", admin.admin));
        }
        Ok(resp) => resp,
    };
    let started: crate::admin::RotationStarted = serde_json::from_str(&answer(resp)?)?;
    println!(
        "device {id}: key version {} {}; {}",
        started.version,
        if started.resumed {
            "was already pending and is sent again"
        } else {
            "made"
        },
        if started.delivered {
            "sent to its live session"
        } else {
            "it is sent when the device connects"
        }
    );
    let Some(wait) = wait else {
        println!("both keys are accepted until the device confirms the new one");
        return Ok(());
    };
    let deadline = std::time::SystemTime::now() + wait;
    loop {
        let resp = agent
            .get(&admin.url("/api/v1/devices"))
            .header("Authorization", &format!("Bearer {token}"))
            .call()
            .with_context(|| format!("reaching the gateway at {}", admin.admin))?;
        let rows: Vec<serde_json::Value> = serde_json::from_str(&answer(resp)?)?;
        let confirmed = rows.iter().any(|r| {
            r["id"].as_u64() == Some(u64::from(id))
                && r["key_version"].as_u64() >= Some(u64::from(started.version))
        });
        if confirmed {
            println!(
                "device {id} confirmed key version {}: the old key is refused",
                started.version
            );
            return Ok(());
        }
        if std::time::SystemTime::now() >= deadline {
            bail!(
                "device {id} has not confirmed key version {} within {}; the rotation stays \
                 pending (both keys are accepted) and completes when the device confirms",
                started.version,
                humantime::format_duration(wait)
            );
        }
        progress_pause();
    }
}

/// `gateway commands ...`
#[derive(Debug, Subcommand)]
pub enum CommandsCommand {
    /// Queue a command for one device or all; online devices get it at once, others when they
    /// connect.
    Send {
        /// Target device.
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        device: Option<u32>,
        /// Every device.
        #[arg(long)]
        all: bool,
        /// How long an undelivered command stays queued.
        #[arg(long, default_value = "1day", value_parser = humantime::parse_duration)]
        ttl: Duration,
        #[command(flatten)]
        admin: AdminArgs,
        /// The command: ping | set-interval MS | reboot | set-config KEY=VALUE... | custom HEX
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Commands with their status and result, newest first.
    List {
        /// Only this device.
        #[arg(long)]
        device: Option<u32>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Output format.
        #[arg(long, default_value = "table")]
        format: ListFormat,
        #[command(flatten)]
        admin: AdminArgs,
    },
}

fn parse_command(words: &[String]) -> anyhow::Result<crate::admin::CommandSpec> {
    use crate::admin::CommandSpec;
    let (verb, rest) = words.split_first().context("missing command")?;
    Ok(match (verb.as_str(), rest) {
        ("ping", []) => CommandSpec::Ping,
        ("reboot", []) => CommandSpec::Reboot,
        ("set-interval", [ms]) => CommandSpec::SetInterval {
            millis: ms.parse().context("set-interval takes milliseconds")?,
        },
        ("set-config", pairs) if !pairs.is_empty() => CommandSpec::SetConfig {
            pairs: pairs
                .iter()
                .map(|p| {
                    p.split_once('=')
                        .map(|(k, v)| (k.to_owned(), v.to_owned()))
                        .with_context(|| format!("{p:?} is not KEY=VALUE"))
                })
                .collect::<anyhow::Result<_>>()?,
        },
        ("custom", [hex]) => CommandSpec::Custom { hex: hex.clone() },
        _ => bail!(
            "unknown command {words:?}: ping | set-interval MS | reboot | set-config KEY=VALUE... | custom HEX"
        ),
    })
}

/// `gateway commands ...`
///
/// # Errors
/// A bad command, an unreachable gateway, or an API error.
pub fn commands(cmd: CommandsCommand) -> anyhow::Result<()> {
    match cmd {
        CommandsCommand::Send {
            device,
            all,
            ttl,
            admin,
            command,
        } => {
            let body = crate::admin::SendCommand {
                device,
                all,
                command: parse_command(&command)?,
                ttl_s: Some(ttl.as_secs()),
            };
            let text = answer(
                admin
                    .agent()
                    .post(&admin.url("/api/v1/commands"))
                    .header("Authorization", &format!("Bearer {}", admin.token()?))
                    .send_json(&body)
                    .with_context(|| format!("reaching the gateway at {}", admin.admin))?,
            )?;
            let queued: Vec<crate::admin::Queued> = serde_json::from_str(&text)?;
            let online = queued.iter().filter(|q| q.online).count();
            println!(
                "queued {} command(s): {} sent to online devices, {} waiting for their device",
                queued.len(),
                online,
                queued.len() - online
            );
            for q in queued.iter().take(20) {
                println!("  command {} for device {}", q.id, q.device);
            }
        }
        CommandsCommand::List {
            device,
            limit,
            format,
            admin,
        } => {
            let mut url = admin.url(&format!("/api/v1/commands?limit={limit}"));
            if let Some(d) = device {
                url.push_str(&format!("&device={d}"));
            }
            let text = answer(
                admin
                    .agent()
                    .get(&url)
                    .header("Authorization", &format!("Bearer {}", admin.token()?))
                    .call()
                    .with_context(|| format!("reaching the gateway at {}", admin.admin))?,
            )?;
            let rows: Vec<serde_json::Value> = serde_json::from_str(&text)?;
            match format {
                ListFormat::Json => println!("{}", serde_json::to_string_pretty(&rows)?),
                ListFormat::Table => {
                    println!(
                        "{:>8}  {:>10}  {:<13}  {:<24}  {:<30}  result",
                        "id", "device", "status", "updated", "command"
                    );
                    for r in rows {
                        println!(
                            "{:>8}  {:>10}  {:<13}  {:<24}  {:<30}  {}",
                            r["id"],
                            r["device"],
                            r["status"].as_str().unwrap_or(""),
                            format_ms(r["updated_ms"].as_i64().unwrap_or(0)),
                            r["summary"].as_str().unwrap_or(""),
                            r["result"].as_str().unwrap_or("")
                        );
                    }
                }
            }
        }
    }
    Ok(())
}

/// `gateway certs ...`
#[derive(Debug, Subcommand)]
pub enum CertsCommand {
    /// Create a local CA and a server certificate (keys with mode 0600).
    Init {
        /// Folder to write ca.pem, ca.key, server.pem and server.key into.
        #[arg(long, default_value = "certs")]
        dir: PathBuf,
        /// Host names and addresses of the server certificate [default: localhost, 127.0.0.1,
        /// ::1 and this host's name].
        #[arg(long, value_delimiter = ',')]
        hosts: Vec<String>,
        /// Replace existing files.
        #[arg(long)]
        force: bool,
    },
}

/// `gateway certs init`
///
/// # Errors
/// Existing files without `--force`, generation or write errors.
pub fn certs(cmd: CertsCommand) -> anyhow::Result<()> {
    let CertsCommand::Init { dir, hosts, force } = cmd;
    let files = crate::control::tls::CertFiles::in_dir(&dir);
    if !force && (files.ca_cert.exists() || files.server_cert.exists()) {
        bail!(
            "{} already holds certificates; pass --force to replace them",
            dir.display()
        );
    }
    let hosts = if hosts.is_empty() {
        crate::control::tls::default_hosts()
    } else {
        hosts
    };
    let files = crate::control::tls::init_certs(&dir, &hosts)?;
    println!(
        "CA certificate      {} (give this to devices)",
        files.ca_cert.display()
    );
    println!(
        "CA key              {} (keep private)",
        files.ca_key.display()
    );
    println!(
        "server certificate  {} for {}",
        files.server_cert.display(),
        hosts.join(", ")
    );
    println!("server key          {}", files.server_key.display());
    Ok(())
}

/// Settings of `serve`; each overrides the config file.
#[derive(Debug, Args, Default)]
pub struct ServeArgs {
    /// TOML config file (see deploy/gateway.example.toml).
    #[arg(long, env = "GATEWAY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Database file [default: gateway.db].
    #[arg(long, env = "GATEWAY_DB")]
    pub db: Option<PathBuf>,
    /// UDP listen address for telemetry [default: 0.0.0.0:4780].
    #[arg(long, env = "GATEWAY_UDP")]
    pub udp: Option<SocketAddr>,
    /// TCP listen address for control sessions [default: 0.0.0.0:4781].
    #[arg(long, env = "GATEWAY_CONTROL")]
    pub control: Option<SocketAddr>,
    /// Listen address of the operator HTTP API [default: 127.0.0.1:4782].
    #[arg(long, env = "GATEWAY_ADMIN")]
    pub admin: Option<SocketAddr>,
    /// Commit durability [default: normal].
    #[arg(long, env = "GATEWAY_DURABILITY")]
    pub durability: Option<Durability>,
    /// Datagrams that may wait for the writer [default: 65536].
    #[arg(long, env = "GATEWAY_QUEUE")]
    pub queue: Option<std::num::NonZeroUsize>,
    /// Forward aggregates to this MQTT broker, HOST:PORT (enables mqtt).
    #[arg(long, env = "GATEWAY_MQTT")]
    pub mqtt: Option<String>,
    /// Gateway id (MQTT topic level) [default: the host name].
    #[arg(long, env = "GATEWAY_ID")]
    pub id: Option<String>,
}

/// The process environment, for [`Config::from_sources`]. Variables that are not UTF-8
/// cannot be overrides; they are skipped, not a panic.
fn env_overrides() -> impl Iterator<Item = (String, String)> {
    std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
}

impl ServeArgs {
    /// The effective configuration: defaults, then the file, then these overrides.
    ///
    /// # Errors
    /// An unreadable or invalid file, or invalid values.
    pub fn resolve(&self) -> anyhow::Result<Config> {
        let mut cfg = Config::from_sources(self.config.as_deref(), env_overrides())?;
        if let Some(db) = &self.db {
            cfg.store.path = db.clone();
        }
        if let Some(udp) = self.udp {
            cfg.telemetry.listen = udp;
        }
        if let Some(c) = self.control {
            cfg.control.listen = c;
        }
        if let Some(a) = self.admin {
            cfg.admin.listen = a;
        }
        if let Some(d) = self.durability {
            cfg.store.durability = d;
        }
        if let Some(q) = self.queue {
            cfg.telemetry.queue = q;
        }
        if let Some(broker) = &self.mqtt {
            let (host, port) = broker
                .rsplit_once(':')
                .and_then(|(h, p)| Some((h, p.parse::<u16>().ok()?)))
                .with_context(|| format!("--mqtt {broker}: expected HOST:PORT"))?;
            cfg.mqtt.enabled = true;
            cfg.mqtt.host = host.to_owned();
            cfg.mqtt.port = port;
        }
        if let Some(id) = &self.id {
            cfg.service.id = Some(id.clone());
        }
        cfg.validate()?;
        Ok(cfg)
    }
}

/// The database flag of every verb that opens it.
#[derive(Debug, Args, Clone)]
pub struct DbArg {
    /// Database file.
    #[arg(long, env = "GATEWAY_DB", default_value_os_t = default_db())]
    pub db: PathBuf,
}

/// `gateway devices ...`
#[derive(Debug, Subcommand)]
pub enum DevicesCommand {
    /// Add one device and print its new key (shown only this once).
    Add {
        /// Device id; the next free one when omitted.
        #[arg(long)]
        id: Option<u32>,
        /// Display name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        db: DbArg,
    },
    /// Create N devices and write the fleet file that device-sim reads (mode 0600).
    Provision {
        /// How many devices.
        #[arg(long)]
        count: u32,
        /// Fleet file to write.
        #[arg(long)]
        out: PathBuf,
        /// Replace the fleet file if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        db: DbArg,
    },
    /// Show a device's desired and reported configuration, or set the desired one (through the
    /// running gateway; pushed at once to an online device, else when it connects).
    Config {
        /// The device.
        #[arg(long)]
        device: u32,
        /// Milliseconds between datagrams.
        #[arg(long)]
        interval_ms: Option<u32>,
        /// Readings per datagram.
        #[arg(long)]
        batch: Option<u16>,
        /// Sensors that are on, e.g. 1,2,4.
        #[arg(long, value_delimiter = ',')]
        sensors: Vec<u16>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Revoke a device at once: its datagrams and control sessions are refused from now on
    /// (its live session is closed); its stored readings stay. Through the running gateway's
    /// admin API; when no gateway answers there, stored in the database and in force from the
    /// gateway's next start (new sessions are refused at once either way).
    Revoke {
        /// The device.
        id: u32,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Rotate a device's key: a new key is sent over its TLS control session (at once when it
    /// is connected, otherwise when it connects) and the old key is refused once the device
    /// confirms; until then both work. Needs the running gateway.
    RotateKey {
        /// The device.
        id: u32,
        /// Wait this long for the device to confirm (e.g. 30s); without it, return at once.
        #[arg(long, value_parser = humantime::parse_duration)]
        wait: Option<Duration>,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// List devices with their counts (keys are never shown).
    List {
        /// Output format.
        #[arg(long, default_value = "table")]
        format: ListFormat,
        #[command(flatten)]
        db: DbArg,
    },
}

/// Output format of lists.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum ListFormat {
    /// Aligned columns.
    Table,
    /// JSON.
    Json,
}

/// Output format of query results.
#[derive(Debug, Clone, Copy, ValueEnum, PartialEq, Eq)]
pub enum RowFormat {
    /// Aligned columns.
    Table,
    /// Comma-separated values with a header line.
    Csv,
    /// One JSON array.
    Json,
    /// One JSON object per line.
    Ndjson,
}

/// `gateway query ...`
#[derive(Debug, Subcommand)]
pub enum QueryCommand {
    /// Stored readings, by device then time.
    Readings(ReadingsArgs),
}

/// Filters and format of `gateway query readings`.
#[derive(Debug, Args)]
pub struct ReadingsArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// Only this device.
    #[arg(long)]
    pub device: Option<u32>,
    /// Only this sensor.
    #[arg(long)]
    pub sensor: Option<u16>,
    /// Only readings from the last period (device clock), e.g. 10m, 2h, 7days.
    #[arg(long, value_parser = humantime::parse_duration, conflicts_with_all = ["from", "to"])]
    pub since: Option<Duration>,
    /// Only readings at or after this time (RFC 3339, e.g. 2026-11-25T10:00:00Z).
    #[arg(long, value_parser = parse_time)]
    pub from: Option<SystemTime>,
    /// Only readings before this time (RFC 3339).
    #[arg(long, value_parser = parse_time)]
    pub to: Option<SystemTime>,
    /// At most this many rows.
    #[arg(long)]
    pub limit: Option<u64>,
    /// Output format.
    #[arg(long, default_value = "table")]
    pub format: RowFormat,
}

/// `gateway stats`
#[derive(Debug, Args)]
pub struct StatsArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// Output format.
    #[arg(long, default_value = "table")]
    pub format: ListFormat,
}

/// `gateway demo`
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub db: DbArg,
    /// Fleet file of the demo devices; reused when it matches the database.
    #[arg(long, default_value = "demo-fleet.json")]
    pub fleet: PathBuf,
    /// Simulated devices.
    #[arg(long, default_value_t = 100)]
    pub devices: u32,
    /// Readings per second per device.
    #[arg(long, default_value_t = 100.0)]
    pub rate: f64,
    /// Readings per datagram.
    #[arg(long, default_value_t = 16)]
    pub batch: usize,
    /// Stop after this long (e.g. 30s); runs until Ctrl-C when omitted.
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<Duration>,
    /// Address of the HTTP API (queries, metrics); a free port when this one is taken.
    #[arg(long, default_value = "127.0.0.1:4782")]
    pub admin: std::net::SocketAddr,
}

/// `gateway config ...`
#[derive(Debug, Subcommand)]
#[allow(clippy::large_enum_variant)] // parsed once per process
pub enum ConfigCommand {
    /// Validate the configuration and print the effective settings as TOML.
    Check(ServeArgs),
    /// Print an annotated configuration file with every setting at its default.
    Default,
}

/// The annotated configuration `gateway config default` prints: every setting, documented, at
/// its default (a unit test keeps it complete and true).
pub const DEFAULT_CONFIG: &str = include_str!("../../deploy/gateway.example.toml");

fn parse_time(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s)
        .map_err(|e| format!("{e} (expected e.g. 2026-11-25T10:00:00Z)"))
}

fn ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// RFC 3339 UTC with milliseconds; the raw number for times RFC 3339 cannot show.
pub fn format_ms(ms: i64) -> String {
    if !(0..=crate::ingest::MAX_TS_MS as i64).contains(&ms) {
        return ms.to_string();
    }
    let t = UNIX_EPOCH + Duration::from_millis(ms as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

/// `gateway devices ...`
///
/// # Errors
/// Database errors, an existing fleet file without `--force`.
pub async fn devices(cmd: DevicesCommand) -> anyhow::Result<()> {
    let mut out = io::stdout().lock();
    match cmd {
        DevicesCommand::Add { id, name, db } => {
            let store = Store::open(&OpenOptions::cli(&db.db, true)).await?;
            let (id, key) = store.add_device(id, name.as_deref()).await?;
            writeln!(out, "device {} added to {}", id.0, db.db.display())?;
            writeln!(out, "key {}", key.to_hex())?;
            writeln!(
                out,
                "Store this key in the device now: it is not shown again."
            )?;
            store.close().await;
        }
        DevicesCommand::Provision {
            count,
            out: path,
            force,
            db,
        } => {
            if count == 0 {
                bail!("--count must be at least 1");
            }
            if path.exists() && !force {
                bail!(
                    "{} exists; pass --force to replace it (its devices stay in the database)",
                    path.display()
                );
            }
            let store = Store::open(&OpenOptions::cli(&db.db, true)).await?;
            let fleet = provision(&store, count, &path).await?;
            store.close().await;
            let first = fleet.devices.first().map_or(0, |d| d.id);
            let last = fleet.devices.last().map_or(0, |d| d.id);
            writeln!(
                out,
                "provisioned {count} devices (ids {first}..={last}) in {}; fleet written to {} (mode 0600)",
                db.db.display(),
                path.display()
            )?;
        }
        DevicesCommand::Config {
            device,
            interval_ms,
            batch,
            sensors,
            admin,
        } => {
            drop(out);
            let set = interval_ms.is_some() || batch.is_some() || !sensors.is_empty();
            tokio::task::spawn_blocking(move || {
                device_config(&admin, device, set.then_some((interval_ms, batch, sensors)))
            })
            .await??;
        }
        DevicesCommand::Revoke { id, admin } => {
            drop(out);
            let db = admin.db.db.clone();
            let online = tokio::task::spawn_blocking(move || revoke_online(&admin, id)).await??;
            match online {
                Some(r) => println!(
                    "device {id} revoked: its datagrams and sessions are refused from now on{}",
                    if r.session_closed {
                        "; its live session was closed"
                    } else {
                        ""
                    }
                ),
                None => {
                    let store = Store::open(&OpenOptions::cli(&db, false)).await?;
                    let found = store.revoke_device(DeviceId(id)).await?;
                    store.close().await;
                    if !found {
                        bail!("no device {id} in {}", db.display());
                    }
                    println!(
                        "no gateway answered at its admin address: device {id} is revoked in {} \
                         (new sessions are refused at once; a running gateway refuses its \
                         datagrams from its next start)",
                        db.display()
                    );
                }
            }
        }
        DevicesCommand::RotateKey { id, wait, admin } => {
            drop(out);
            tokio::task::spawn_blocking(move || rotate_key(&admin, id, wait)).await??;
        }
        DevicesCommand::List { format, db } => {
            let store = Store::open(&OpenOptions::cli(&db.db, false)).await?;
            let rows = store.list_devices().await?;
            store.close().await;
            print_devices(&mut out, &rows, format)?;
        }
    }
    Ok(())
}

type ConfigChange = (Option<u32>, Option<u16>, Vec<u16>);

fn device_config(
    admin: &AdminArgs,
    device: u32,
    change: Option<ConfigChange>,
) -> anyhow::Result<()> {
    use crate::store::config::{ConfigJson, ConfigPair};
    let url = admin.url(&format!("/api/v1/devices/{device}/config"));
    let auth = format!("Bearer {}", admin.token()?);
    let agent = admin.agent();
    let reach = || format!("reaching the gateway at {}", admin.admin);
    let text = answer(
        agent
            .get(&url)
            .header("Authorization", &auth)
            .call()
            .with_context(reach)?,
    )?;
    let pair: ConfigPair = serde_json::from_str(&text)?;
    let show = |c: &Option<ConfigJson>| {
        c.as_ref().map_or_else(
            || "none".to_owned(),
            |c| {
                format!(
                    "interval {} ms, batch {}, sensors {:?}",
                    c.interval_ms, c.batch, c.sensors
                )
            },
        )
    };
    let Some((interval_ms, batch, sensors)) = change else {
        println!("device {device}");
        println!("  desired   {}", show(&pair.desired));
        println!("  reported  {}", show(&pair.reported));
        println!("  in sync   {}", if pair.in_sync { "yes" } else { "no" });
        return Ok(());
    };
    let base = pair.desired.or(pair.reported);
    let config = ConfigJson {
        interval_ms: interval_ms
            .or(base.as_ref().map(|b| b.interval_ms))
            .context("give --interval-ms (nothing known to start from)")?,
        batch: batch
            .or(base.as_ref().map(|b| b.batch))
            .context("give --batch (nothing known to start from)")?,
        sensors: if sensors.is_empty() {
            base.map(|b| b.sensors)
                .context("give --sensors (nothing known to start from)")?
        } else {
            sensors
        },
    };
    let text = answer(
        agent
            .put(&url)
            .header("Authorization", &auth)
            .send_json(&config)
            .with_context(reach)?,
    )?;
    let reply: serde_json::Value = serde_json::from_str(&text)?;
    println!(
        "device {device}: desired configuration set ({}); {}",
        show(&Some(config)),
        if reply["online"] == true {
            "pushed to the online device"
        } else {
            "it will be pushed when the device connects"
        }
    );
    Ok(())
}

/// Creates `count` devices and writes their fleet file.
///
/// # Errors
/// Database and file errors.
pub async fn provision(store: &Store, count: u32, path: &Path) -> anyhow::Result<FleetFile> {
    let devices = store.add_devices(None, count, None).await?;
    let fleet = FleetFile::new(
        devices
            .into_iter()
            .map(|(id, key)| FleetDevice {
                id: id.0,
                name: format!("device-{}", id.0),
                key: key.to_hex(),
                next_seq: 0,
            })
            .collect(),
    );
    fleet
        .save(path)
        .with_context(|| format!("writing fleet file {}", path.display()))?;
    Ok(fleet)
}

fn print_devices(out: &mut impl Write, rows: &[DeviceRow], format: ListFormat) -> io::Result<()> {
    match format {
        ListFormat::Json => {
            serde_json::to_writer_pretty(&mut *out, rows)?;
            writeln!(out)
        }
        ListFormat::Table => {
            writeln!(
                out,
                "{:>10}  {:<20}  {:<7}  {:<4}  {:>10}  {:>12}  {:>8}  {:>8}  {:<24}  {:<24}",
                "id",
                "name",
                "control",
                "key",
                "datagrams",
                "readings",
                "lost",
                "rejected",
                "last datagram",
                "last control frame"
            )?;
            for r in rows {
                writeln!(
                    out,
                    "{:>10}  {:<20}  {:<7}  {:<4}  {:>10}  {:>12}  {:>8}  {:>8}  {:<24}  {:<24}",
                    r.id,
                    r.name,
                    if r.revoked_ms.is_some() {
                        "revoked"
                    } else if r.online {
                        "online"
                    } else {
                        "offline"
                    },
                    format!("v{}{}", r.key_version, if r.key_pending { "+" } else { "" }),
                    r.datagrams,
                    r.readings,
                    r.lost,
                    r.rejected,
                    r.last_seen_ms.map_or_else(|| "never".into(), format_ms),
                    r.control_seen_ms.map_or_else(|| "never".into(), format_ms)
                )?;
            }
            Ok(())
        }
    }
}

/// `gateway query readings`
///
/// # Errors
/// Database errors, bad time ranges, a closed stdout.
pub async fn query(cmd: QueryCommand) -> anyhow::Result<()> {
    let QueryCommand::Readings(args) = cmd;
    let (from_ms, to_ms) = match (args.since, args.from, args.to) {
        (Some(since), _, _) => (Some(ms(SystemTime::now() - since)), None),
        (None, from, to) => (from.map(ms), to.map(ms)),
    };
    if let (Some(f), Some(t)) = (from_ms, to_ms)
        && f >= t
    {
        bail!("--from must be before --to");
    }
    let store = Store::open(&OpenOptions::cli(&args.db.db, false)).await?;
    let filter = ReadingsFilter {
        device: args.device,
        sensor: args.sensor,
        from_ms,
        to_ms,
        limit: args.limit,
    };
    let mut out = io::BufWriter::new(io::stdout().lock());
    let mut rows = std::pin::pin!(store.readings(&filter));
    let format = match args.format {
        RowFormat::Table => {
            writeln!(
                out,
                "{:>10}  {:>6}  {:<24}  {:>14}  {:>10}  {:>3}",
                "device", "sensor", "time", "value", "seq", "idx"
            )?;
            None
        }
        RowFormat::Csv => Some(Format::Csv),
        RowFormat::Json => Some(Format::Json),
        RowFormat::Ndjson => Some(Format::Ndjson),
    };
    let mut enc = format.map(Encoder::new::<ReadingRow>);
    let mut count = 0u64;
    while let Some(r) = rows.try_next().await? {
        match &mut enc {
            Some(enc) => {
                enc.row(&r);
                if enc.buf.len() >= 64 * 1024 {
                    out.write_all(&enc.buf)?;
                    enc.buf.clear();
                }
            }
            None => writeln!(
                out,
                "{:>10}  {:>6}  {:<24}  {:>14}  {:>10}  {:>3}",
                r.device,
                r.sensor,
                format_ms(r.ts_ms),
                r.value.map_or_else(|| "NaN".into(), |v| v.to_string()),
                r.seq,
                r.idx
            )?,
        }
        count += 1;
    }
    if let Some(enc) = &mut enc {
        enc.finish();
        out.write_all(&enc.buf)?;
    }
    out.flush()?;
    if args.format == RowFormat::Table {
        eprintln!("{count} readings");
    }
    Ok(())
}

/// `gateway stats`
///
/// # Errors
/// Database errors.
pub async fn stats(args: StatsArgs) -> anyhow::Result<()> {
    let store = Store::open(&OpenOptions::cli(&args.db.db, false)).await?;
    let counters = store.counters().await?;
    let devices = store.list_devices().await?;
    store.close().await;
    let mut out = io::stdout().lock();
    match args.format {
        ListFormat::Json => {
            let counters: serde_json::Map<String, serde_json::Value> = counters
                .into_iter()
                .map(|(k, v)| (k, serde_json::Value::from(v)))
                .collect();
            serde_json::to_writer_pretty(
                &mut out,
                &serde_json::json!({ "counters": counters, "devices": devices }),
            )?;
            writeln!(out)?;
        }
        ListFormat::Table => {
            writeln!(out, "counters (cumulative; latency of the last run)")?;
            for (k, v) in &counters {
                writeln!(out, "  {k:<28} {v:>14}")?;
            }
            writeln!(out)?;
            print_devices(&mut out, &devices, ListFormat::Table)?;
        }
    }
    Ok(())
}

/// What `config check` prints instead of a secret.
const REDACTED: &str = "<redacted>";

/// `gateway config check`
///
/// # Errors
/// An invalid configuration.
pub fn config_check(args: &ServeArgs) -> anyhow::Result<()> {
    let mut cfg = args.resolve()?;
    // Secrets are checked but not shown: this output ends up in terminals, logs and tickets.
    for secret in [&mut cfg.admin.token, &mut cfg.mqtt.password] {
        if secret.is_some() {
            *secret = Some(REDACTED.to_owned());
        }
    }
    println!("# configuration is valid; effective settings (secrets redacted):");
    print!("{}", toml::to_string_pretty(&cfg)?);
    Ok(())
}
