//! SIGHUP: the configuration is read again (file and environment), the settings that can
//! change while running are applied, and every change is logged, with those that wait for a
//! restart named as such. An invalid configuration changes nothing.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::config::Config;
use crate::store::retention::Policy;

/// What the retention task runs with.
#[derive(Debug, Clone)]
pub struct RetentionSettings {
    /// The policy (nothing to do when it enforces nothing).
    pub policy: Policy,
    /// How often it runs.
    pub interval: std::time::Duration,
    /// Whether anything is enforced.
    pub active: bool,
}

impl RetentionSettings {
    /// The retention settings of `cfg`.
    pub fn of(cfg: &Config) -> Self {
        Self {
            policy: Policy::from_config(cfg),
            interval: cfg.retention.interval,
            active: cfg.retention.active(),
        }
    }
}

/// The handles through which running parts take new settings.
#[derive(Debug)]
pub struct Live {
    /// The retention task's settings.
    pub retention: tokio::sync::watch::Sender<RetentionSettings>,
    /// The query API's ceiling of rows per response.
    pub max_points: Arc<AtomicU64>,
}

/// Whether a setting (dotted path) is applied without a restart.
pub fn applies_live(path: &str) -> bool {
    path.starts_with("retention.") || path == "admin.max_points"
}

/// Settings whose values are never logged.
fn secret(path: &str) -> bool {
    matches!(path, "admin.token" | "mqtt.password")
}

/// A setting that differs between two configurations.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    /// Dotted path (`retention.readings`).
    pub path: String,
    /// Old value as TOML (`<unset>` when absent; secrets redacted).
    pub old: String,
    /// New value.
    pub new: String,
    /// Whether it took effect now (else at the next start).
    pub live: bool,
}

fn flatten(prefix: &str, v: &toml::Value, out: &mut Vec<(String, String)>) {
    match v {
        toml::Value::Table(t) => {
            for (k, v) in t {
                let p = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                // A per-tier map is one setting.
                if p == "retention.tiers" {
                    out.push((p, v.to_string()));
                } else {
                    flatten(&p, v, out);
                }
            }
        }
        other => out.push((prefix.to_owned(), other.to_string())),
    }
}

fn settings(cfg: &Config) -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(v) = toml::Value::try_from(cfg) {
        flatten("", &v, &mut out);
    }
    out
}

/// The settings that differ from `old` to `new`.
pub fn diff(old: &Config, new: &Config) -> Vec<Change> {
    let (a, b) = (settings(old), settings(new));
    let get = |list: &[(String, String)], p: &str| {
        list.iter().find(|(k, _)| k == p).map(|(_, v)| v.clone())
    };
    let mut paths: Vec<&String> = a.iter().chain(&b).map(|(k, _)| k).collect();
    paths.sort();
    paths.dedup();
    paths
        .into_iter()
        .filter_map(|p| {
            let (o, n) = (get(&a, p), get(&b, p));
            (o != n).then(|| {
                let show = |v: Option<String>| match v {
                    None => "<unset>".to_owned(),
                    Some(_) if secret(p) => "<redacted>".to_owned(),
                    Some(v) => v,
                };
                Change {
                    path: p.clone(),
                    old: show(o),
                    new: show(n),
                    live: applies_live(p),
                }
            })
        })
        .collect()
}

/// What runs after a reload: `running` with the live settings of `new` (the rest of `new`
/// waits for a restart, so it is not what runs).
pub fn effective(running: &Config, new: &Config) -> Config {
    let mut cfg = running.clone();
    cfg.retention = new.retention.clone();
    cfg.admin.max_points = new.admin.max_points;
    cfg
}

impl Live {
    /// Applies the live settings of `new` to what runs (`running`, updated in place; the other
    /// settings wait for a restart) and logs each change against what runs. A policy that
    /// does not fit what runs (retention against the running aggregate windows) is refused.
    ///
    /// # Errors
    /// The validation error of the settings that would run.
    pub fn apply(
        &self,
        running: &mut Config,
        new: &Config,
    ) -> Result<Vec<Change>, crate::config::ConfigError> {
        let next = effective(running, new);
        next.validate()?;
        let changes = diff(running, new);
        let retention_changed = toml::Value::try_from(&running.retention).ok()
            != toml::Value::try_from(&next.retention).ok();
        if retention_changed {
            self.retention.send_replace(RetentionSettings::of(&next));
        }
        self.max_points.store(next.admin.max_points, Relaxed);
        *running = next;
        for c in &changes {
            if c.live {
                tracing::info!(setting = %c.path, old = %c.old, new = %c.new, "reload: applied");
            } else {
                tracing::warn!(
                    setting = %c.path, old = %c.old, new = %c.new,
                    "reload: changed in the configuration, takes effect after a restart"
                );
            }
        }
        if changes.is_empty() {
            tracing::info!("reload: configuration unchanged");
        }
        Ok(changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_named_classified_and_secrets_hidden() {
        let old = Config::default();
        let mut new = old.clone();
        new.retention.readings = Some(std::time::Duration::from_secs(3600));
        new.admin.max_points = 5;
        new.telemetry.queue = std::num::NonZeroUsize::MIN;
        new.admin.token = Some("hunter2".into());
        let changes = diff(&old, &new);
        let paths: Vec<(&str, bool)> = changes.iter().map(|c| (c.path.as_str(), c.live)).collect();
        assert_eq!(
            paths,
            vec![
                ("admin.max_points", true),
                ("admin.token", false),
                ("retention.readings", true),
                ("telemetry.queue", false),
            ]
        );
        let token = &changes[1];
        assert_eq!(
            (token.old.as_str(), token.new.as_str()),
            ("<unset>", "<redacted>")
        );
        assert_eq!(changes[2].new, "\"1h\"");
        assert!(diff(&old, &old.clone()).is_empty());
        // What runs keeps the restart-only settings: reverting one is no change.
        let running = effective(&old, &new);
        assert_eq!(running.telemetry.queue, old.telemetry.queue);
        assert_eq!(running.admin.max_points, 5);
        assert!(
            diff(&running, &old)
                .iter()
                .all(|c| c.path == "admin.max_points" || c.path == "retention.readings")
        );
    }
}
