//! `gateway`: parses the command line, sets up logging and the runtime, and dispatches to the
//! library. No logic lives here.

use anyhow::Context;
use clap::Parser;
use gateway::cli::{Cli, Command, ConfigCommand, LogFormat};

fn main() -> anyhow::Result<()> {
    match run() {
        // `gateway query ... | head` closes stdout early: that is not a failure.
        Err(e) if is_broken_pipe(&e) => Ok(()),
        other => other,
    }
}

fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

fn run() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let serving = matches!(cli.command, None | Some(Command::Serve(_)));
    init_tracing(cli.log_format, if serving { "info" } else { "warn" });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        match cli.command {
            None => serve(cli.serve).await,
            Some(Command::Serve(args)) => serve(args).await,
            Some(Command::Devices(cmd)) => gateway::cli::devices(cmd).await,
            Some(Command::Query(cmd)) => gateway::cli::query(cmd).await,
            Some(Command::Stats(args)) => gateway::cli::stats(args).await,
            Some(Command::Aggregates(cmd)) => gateway::cli::aggregates(cmd).await,
            Some(Command::Db(cmd)) => gateway::cli::db(cmd).await,
            Some(Command::Demo(args)) => gateway::demo::run(args).await,
            Some(Command::Config(ConfigCommand::Check(args))) => gateway::cli::config_check(&args),
            Some(Command::Config(ConfigCommand::Default)) => {
                print!("{}", gateway::cli::DEFAULT_CONFIG);
                Ok(())
            }
            Some(Command::Certs(cmd)) => gateway::cli::certs(cmd),
            Some(Command::Files(cmd)) => {
                tokio::task::spawn_blocking(move || gateway::cli::files(cmd)).await?
            }
            Some(Command::Commands(cmd)) => {
                // A blocking HTTP client: keep it off the runtime's workers.
                tokio::task::spawn_blocking(move || gateway::cli::commands(cmd)).await?
            }
        }
    })
}

async fn serve(args: gateway::cli::ServeArgs) -> anyhow::Result<()> {
    // Installed before anything else: SIGHUP's default action would end the process, and
    // systemd may send it as soon as the unit is up.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("installing signal handlers")?;
    let cfg = args.resolve()?;
    let gw = gateway::Gateway::start(&cfg).await?;
    // Tests and scripts read this line to learn the bound address (with port 0).
    println!(
        "gateway listening on udp://{} control {}://{} admin http://{}",
        gw.udp_addr,
        if gw.control_tls { "tls" } else { "tcp" },
        gw.control_addr,
        gw.admin_addr
    );
    // Type=notify: ready once every listener is bound and the database is open.
    let notifier = std::sync::Arc::new(gateway::notify::Notifier::from_env());
    notifier.send(&format!(
        "READY=1\nSTATUS=serving telemetry on {}, admin on {}",
        gw.udp_addr, gw.admin_addr
    ));
    let watchdog_stop = tokio_util::sync::CancellationToken::new();
    if let Some(period) = notifier.watchdog_period() {
        tokio::spawn(gateway::notify::watchdog(
            notifier.clone(),
            period,
            // The writer goes round at least every stats interval when idle.
            gateway::notify::writer_alive(
                gw.counters.clone(),
                period * 2 + cfg.service.stats_interval,
            ),
            watchdog_stop.clone(),
        ));
    }
    // SIGHUP re-reads the configuration until SIGTERM or SIGINT (one that came during the
    // start is served now).
    let stop = gateway::signal::shutdown();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            done = &mut stop => {
                done.context("installing signal handlers")?;
                break;
            }
            _ = hangup.recv() => {
                tracing::info!("SIGHUP received, reloading the configuration");
                match args.resolve().and_then(|new| Ok(gw.reload(&new)?)) {
                    Ok(_) => {}
                    Err(error) => tracing::error!(
                        error = %format!("{error:#}"),
                        "reload: the configuration is invalid; the running one is kept"
                    ),
                }
            }
        }
    }
    notifier.send("STOPPING=1");
    watchdog_stop.cancel();
    tokio::select! {
        done = gw.stop() => {
            if !done {
                anyhow::bail!("shutdown did not finish within the grace period");
            }
        }
        // A second signal means: stop now, do not wait for the grace period.
        _ = gateway::signal::shutdown() => {
            tracing::warn!("second signal: exiting without waiting");
            std::process::exit(130);
        }
    }
    Ok(())
}

fn init_tracing(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_level.into());
    let builder = tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(filter);
    match format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
