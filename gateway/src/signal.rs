//! Process signals: resolves when SIGINT (Ctrl-C) or SIGTERM arrives.

/// Completes on the first SIGINT or SIGTERM.
///
/// # Errors
/// When the signal handlers cannot be installed.
pub async fn shutdown() -> std::io::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received, shutting down"),
        _ = int.recv() => tracing::info!("SIGINT received, shutting down"),
    }
    Ok(())
}
