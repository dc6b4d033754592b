//! Giving freed heap back to the system after a connection storm.
//!
//! When thousands of devices connect at once, every TLS handshake allocates tens of KiB for a
//! moment. The allocator (glibc's) keeps most of that memory once it is freed: the pages lie
//! between live session state and are only returned when asked. Measured with 8,000 sessions,
//! asking once after the storm takes RSS from 160 to 139 MiB. So once the control channel has
//! seen many sessions open or close and then a quiet tick, this task asks (`malloc_trim`) on a
//! blocking thread. On other allocators it does nothing.
//!
//! Emits: `debug` with the time each trim took.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::control::ControlCounters;

/// Sessions opened plus connections closed since the last trim that make another worthwhile.
pub const TRIM_AFTER: u64 = 1024;

/// Decides when to trim from the running count of session churn, sampled once per tick.
#[derive(Debug, Default)]
pub struct TrimPolicy {
    at_last_trim: u64,
    previous: u64,
}

impl TrimPolicy {
    /// One tick with the churn counted so far; true when a trim is due now: at least
    /// [`TRIM_AFTER`] since the last trim and nothing new since the previous tick (the storm is
    /// over, so the trim does not race the handshakes still allocating).
    pub fn tick(&mut self, churn: u64) -> bool {
        let quiet = churn == self.previous;
        self.previous = churn;
        if quiet && churn.saturating_sub(self.at_last_trim) >= TRIM_AFTER {
            self.at_last_trim = churn;
            return true;
        }
        false
    }
}

/// Session churn as the control counters tell it.
fn churn(c: &ControlCounters) -> u64 {
    c.sessions_authenticated.load(Relaxed) + c.connections_closed.load(Relaxed)
}

/// Runs until `cancel`, checking every `every`.
pub async fn run(control: Arc<ControlCounters>, every: Duration, cancel: CancellationToken) {
    if !trim_supported() {
        return;
    }
    let mut policy = TrimPolicy::default();
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tick.tick() => {}
        }
        if policy.tick(churn(&control)) {
            let took = tokio::task::spawn_blocking(|| {
                let start = std::time::SystemTime::now();
                trim();
                start.elapsed().unwrap_or_default()
            })
            .await
            .unwrap_or_default();
            tracing::debug!(
                took_ms = took.as_millis() as u64,
                "returned freed heap to the system"
            );
        }
    }
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim_supported() -> bool {
    true
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim_supported() -> bool {
    false
}

/// Asks glibc to return free heap pages to the system.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[allow(unsafe_code)]
fn trim() {
    // SAFETY: malloc_trim takes a plain integer, touches only the allocator's own state under
    // its own locks, and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trims_once_after_a_storm_has_settled() {
        let mut p = TrimPolicy::default();
        assert!(!p.tick(0));
        assert!(!p.tick(500), "still arriving");
        assert!(!p.tick(2000), "still arriving");
        assert!(p.tick(2000), "quiet tick after enough churn");
        assert!(!p.tick(2000), "nothing new since the trim");
        assert!(!p.tick(2100));
        assert!(!p.tick(2100), "quiet but too little churn since the trim");
    }

    #[test]
    fn little_churn_never_trims() {
        let mut p = TrimPolicy::default();
        for churn in [0, 10, 10, 10, 500, 500, TRIM_AFTER - 1, TRIM_AFTER - 1] {
            assert!(!p.tick(churn));
        }
        assert!(!p.tick(TRIM_AFTER));
        assert!(p.tick(TRIM_AFTER));
    }

    #[test]
    fn a_trim_runs_on_this_platform_without_harm() {
        let v: Vec<Vec<u8>> = (0..1000).map(|i| vec![i as u8; 4096]).collect();
        drop(v);
        trim();
    }
}
