//! Live configuration reload (docs/operations.md): SIGHUP or `POST /-/reload` re-reads the
//! configuration, validates it whole, and swaps the gateway atomically, or logs every error and
//! keeps the running one.
//!
//! Unchanged routes keep their state (topics, cursors, sources, stored answers, cached
//! authorization decisions); requests in progress finish on the gateway they started on. A
//! removed or changed poll route's topics are retired: their held polls get their normal empty
//! answer now, and the next poll gets 404 (removed) or starts a new topic incarnation (changed:
//! old cursors get 410). TLS certificates are re-read. Listener addresses, the admin listener and
//! connection-level limits take effect at the next restart; pollmux says so in the log.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use crate::config::{Config, ConfigErrors};
use crate::gateway::{Current, Gateway, Shared};
use crate::metrics::Metrics;
use crate::server::ListenerSettings;

/// What a successful reload changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// Routes whose state was not kept (removed or changed).
    pub replaced: Vec<String>,
}

/// Re-reads the configuration and swaps the gateway.
pub struct Reloader {
    /// The configuration file; `None`: the embedded default.
    path: Option<PathBuf>,
    current: Arc<Current>,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
    listeners: Vec<Arc<ListenerSettings>>,
    /// The configuration in force; also serializes reloads.
    running: Mutex<Config>,
}

impl Reloader {
    pub fn new(
        path: Option<PathBuf>,
        running: Config,
        current: Arc<Current>,
        shared: Arc<Shared>,
        metrics: Arc<Metrics>,
        listeners: Vec<Arc<ListenerSettings>>,
    ) -> Reloader {
        Reloader {
            path,
            current,
            shared,
            metrics,
            listeners,
            running: Mutex::new(running),
        }
    }

    /// Reads, validates and applies the configuration. Blocking (file reads, TLS material):
    /// call it from a blocking task.
    pub fn reload(&self) -> Result<Reloaded, ConfigErrors> {
        let mut running = self.running.lock().unwrap_or_else(|e| e.into_inner());
        let loaded = match &self.path {
            Some(path) => Config::from_file(path),
            None => Ok(Config::default_config()),
        };
        let mut config = match loaded {
            Ok(config) => config,
            Err(errors) => {
                for e in &errors.0 {
                    tracing::error!(error = %e, "reload refused: the configuration is invalid; the running one is kept");
                }
                self.count(false);
                return Err(errors);
            }
        };
        for what in restart_only_changes(&running, &config) {
            tracing::warn!("reload: {what} changed; that takes effect when pollmux is restarted");
        }
        // The accept loop's per-IP limits read the trusted proxies of the start; requests must
        // see the same list.
        config.limits.trusted_proxies = running.limits.trusted_proxies.clone();
        self.metrics.precreate(&config);
        let previous = self.current.get();
        let next = Arc::new(Gateway::new(
            &config,
            &self.metrics,
            self.shared.clone(),
            Some(&previous),
        ));
        self.current.replace(next.clone());
        let replaced = previous.retire_replaced(&next);
        for settings in &self.listeners {
            if let Some(listener) = config.listeners.iter().find(|l| l.name == settings.name) {
                settings.set_tls(listener);
            }
        }
        tracing::info!(
            routes = config.routes.len(),
            replaced = ?replaced,
            "configuration reloaded"
        );
        *running = config;
        self.count(true);
        Ok(Reloaded { replaced })
    }

    fn count(&self, ok: bool) {
        let result = if ok { "success" } else { "failure" };
        self.metrics
            .config_reloads
            .with_label_values(&[result])
            .inc();
        self.metrics
            .config_last_reload_successful
            .set(i64::from(ok));
    }
}

/// The settings a reload cannot apply that differ between `old` and `new`.
fn restart_only_changes(old: &Config, new: &Config) -> Vec<&'static str> {
    let listeners = |c: &Config| -> Vec<String> {
        c.listeners
            .iter()
            .map(|l| format!("{} {} {} {}", l.name, l.address, l.http2, l.tls.is_some()))
            .collect()
    };
    let connection_limits = |c: &Config| {
        let l = &c.limits;
        (
            l.max_connections,
            l.header_read_timeout,
            l.tls_handshake_timeout,
            l.max_header_bytes,
            l.max_headers,
            l.write_timeout,
            l.max_buffered_bytes,
            l.max_connections_per_ip,
            l.new_connections_per_ip_per_second,
            l.http2_max_concurrent_streams,
            l.http2_keep_alive_interval,
        )
    };
    let mut changed = Vec::new();
    if listeners(old) != listeners(new) {
        changed.push("[listeners] (addresses, http2, TLS on or off)");
    }
    if old.admin.address != new.admin.address
        || old.admin.publish_token != new.admin.publish_token
        || old.admin.reload != new.admin.reload
    {
        changed.push("[admin]");
    }
    if connection_limits(old) != connection_limits(new) {
        changed.push("[limits] of connections (max_connections, max_buffered_bytes, per-IP limits, timeouts, header sizes, HTTP/2)");
    }
    if old.limits.trusted_proxies != new.limits.trusted_proxies {
        changed.push("[limits] trusted_proxies");
    }
    if old.cluster != new.cluster {
        changed.push("[cluster] (the backplane, node_id, lease_ttl, backplane_grace)");
    }
    if old.shutdown.timeout != new.shutdown.timeout {
        changed.push("[shutdown] timeout");
    }
    changed
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reload cannot apply is named, and only that: the backplane among it.
    #[test]
    fn restart_only_settings_are_named() {
        let parse = |extra: &str| {
            let text = format!("[listeners.p]\naddress = \"127.0.0.1:0\"\n{extra}");
            Config::from_toml(&text, std::path::Path::new(".")).unwrap()
        };
        let single = parse("");
        assert!(restart_only_changes(&single, &parse("")).is_empty());
        let cluster = parse(
            "[cluster]\nbackplane = \"redis\"\n[cluster.redis]\nurl = \"redis://127.0.0.1:1\"\n",
        );
        let changed = restart_only_changes(&single, &cluster);
        assert_eq!(changed.len(), 1, "{changed:?}");
        assert!(changed[0].starts_with("[cluster]"));
        assert!(restart_only_changes(&cluster, &cluster.clone()).is_empty());
    }
}
