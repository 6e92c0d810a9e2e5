//! pollmux: a long-polling gateway. It sits in front of existing HTTP APIs, holds many client
//! long-polls, and serves each topic from one upstream subscription, with per-route Prometheus
//! statistics and TOML configuration.
//!
//! # Layout
//!
//! ARCHITECTURE.md is the map: what each module owns, what it must never do, and the layers,
//! which a test checks (a module names only modules of lower layers):
//!
//! - layer 0: [`config`]: TOML -> raw serde structs -> validation -> typed [`config::Config`];
//!   every error with its key path and line:column, all in one pass; [`shrink`] (a swept map
//!   gives its table back).
//! - layer 1: [`hub`] (topics: ordered bounded buffers, cursors, parked readers, idle
//!   eviction; no HTTP), [`metrics`] (the one metrics struct and its registry), [`upstream`]
//!   (pooled upstream HTTP clients), [`per_ip`] (per-client-IP limits).
//! - layer 2: [`auth`] (hooks and JWTs), [`source`] (what feeds a topic from upstream),
//!   [`backplane`] (cluster mode: topics' logs in Redis), [`service`] (the contract between
//!   connections and handlers), [`problem`] (problem+json).
//! - layer 3: [`gateway`] (routes and their kinds: the request service) and [`server`]
//!   (listeners, connections, TLS, HTTP/1.1 and h2, the held-poll path); neither names the other.
//! - layer 4: [`reload`]; layer 5: [`admin`]. This file wires them together.
//!
//! [`Server::bind`] binds every socket (so a test can bind `127.0.0.1:0` and read the ports),
//! then [`Server::serve`] runs until its shutdown future resolves and the drain ends.

#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod backplane;
pub mod config;
pub mod gateway;
pub mod hub;
pub mod metrics;
pub mod per_ip;
pub mod problem;
pub mod reload;
pub mod server;
pub mod service;
pub mod shrink;
pub mod source;
pub mod upstream;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use admin::Admin;
use backplane::Backplane;
use config::{Config, FD_RESERVE};
use gateway::{Current, Gateway, Shared};
use hub::Hub;
use metrics::Metrics;
use per_ip::PerIp;
use reload::Reloader;
use server::{ConnectionLimit, Lifecycle, ListenerSettings};
use service::Drain;

/// How often lingered topics are looked for: the precision of `linger`.
pub const SWEEP_INTERVAL: std::time::Duration = std::time::Duration::from_millis(500);
/// Connections the admin listener serves at once: probes and scrapers, not clients.
pub const ADMIN_MAX_CONNECTIONS: usize = 128;

/// Why pollmux could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot bind listener {listener} to {address}: {source}")]
    Bind {
        listener: String,
        address: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot use the backplane: {0}")]
    Backplane(redis::RedisError),
}

/// A pollmux instance with its sockets bound, ready to serve.
pub struct Server {
    config: Config,
    /// Where a reload reads the configuration; `None`: the embedded default.
    config_path: Option<std::path::PathBuf>,
    /// Reload on SIGHUP (the binary; in-process servers share the signal, so tests use the
    /// admin endpoint).
    reload_on_sighup: bool,
    public: Vec<(Arc<ListenerSettings>, TcpListener)>,
    admin: TcpListener,
    metrics: Arc<Metrics>,
    max_connections: usize,
    /// Why `max_connections` is less than configured, said when serving starts.
    fd_warning: Option<String>,
    hub: Arc<Hub>,
    /// Cluster mode's backplane, not connected yet.
    backplane: Option<Arc<Backplane>>,
}

impl Server {
    /// Raises the file-descriptor limit and binds every listener.
    pub async fn bind(config: Config) -> Result<Server, StartError> {
        let (max_connections, fd_warning) =
            public_connections(config.limits.max_connections, raise_fd_limit());
        let mut public = Vec::with_capacity(config.listeners.len());
        for l in &config.listeners {
            let listener = bind(&l.name, l.address).await?;
            let settings = Arc::new(ListenerSettings::new(l, &config.limits));
            public.push((settings, listener));
        }
        let admin = bind("admin", config.admin.address).await?;
        let metrics = Arc::new(Metrics::new(&config));
        let hub = Arc::new(Hub::with_budget(config.limits.max_buffered_bytes));
        let backplane = match &config.cluster.redis {
            None => None,
            Some(_) => Some(
                Backplane::new(&config.cluster, hub.clone(), metrics.clone())
                    .map_err(StartError::Backplane)?,
            ),
        };
        Ok(Server {
            hub,
            backplane,
            max_connections: usize::try_from(max_connections).unwrap_or(usize::MAX),
            fd_warning,
            config,
            config_path: None,
            reload_on_sighup: false,
            public,
            admin,
            metrics,
        })
    }

    /// Reloads re-read `path` (the file the configuration came from).
    pub fn config_path(mut self, path: Option<std::path::PathBuf>) -> Server {
        self.config_path = path;
        self
    }

    /// Reloads on SIGHUP.
    pub fn reload_on_sighup(mut self) -> Server {
        self.reload_on_sighup = true;
        self
    }

    /// Bound addresses of the public listeners, by name.
    pub fn listener_addrs(&self) -> Vec<(String, SocketAddr)> {
        self.public
            .iter()
            .filter_map(|(s, l)| Some((s.name.clone(), l.local_addr().ok()?)))
            .collect()
    }

    /// Bound address of the admin listener.
    pub fn admin_addr(&self) -> SocketAddr {
        self.admin
            .local_addr()
            .expect("a bound listener has an address")
    }

    /// Serves until `shutdown` resolves, then drains: stops accepting, marks `/readyz` 503, lets
    /// in-flight requests finish within `[shutdown] timeout`, and returns.
    pub async fn serve(self, shutdown: impl Future<Output = ()>) {
        let Server {
            config,
            config_path,
            reload_on_sighup,
            public,
            admin,
            metrics,
            max_connections,
            fd_warning,
            hub,
            backplane,
        } = self;
        for (settings, listener) in &public {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(listener = %settings.name, address = %addr, tls = settings.tls.is_some(), "listening");
            }
        }
        if let Ok(addr) = admin.local_addr() {
            tracing::info!(listener = "admin", address = %addr, "listening");
        }
        if let Some(warning) = fd_warning {
            tracing::warn!("{warning}");
        }
        tracing::info!(
            max_connections,
            routes = config.routes.len(),
            "pollmux started"
        );

        // The one drain of the public side: listeners, connections, held polls and `/readyz`.
        let lifecycle = Lifecycle::default();
        let per_ip = Arc::new(PerIp::new(
            config.limits.max_connections_per_ip,
            config.limits.new_connections_per_ip_per_second,
        ));
        hub.fan_out_on(tokio::runtime::Handle::current());
        if let Some(b) = &backplane {
            b.start();
        }
        let shared = Arc::new(Shared::new(
            hub,
            per_ip.clone(),
            lifecycle.drain.clone(),
            backplane,
        ));
        let gateway = Arc::new(Gateway::new(&config, &metrics, shared.clone(), None));
        let current = Arc::new(Current::new(gateway));
        let limit = Arc::new(ConnectionLimit::with_per_ip(
            max_connections,
            per_ip,
            config.limits.trusted_proxies.clone(),
        ));
        tokio::spawn(sweep_task(
            current.clone(),
            metrics.clone(),
            lifecycle.drain.clone(),
        ));
        let reloader = Arc::new(Reloader::new(
            config_path,
            config.clone(),
            current.clone(),
            shared,
            metrics.clone(),
            public.iter().map(|(s, _)| s.clone()).collect(),
        ));
        if reload_on_sighup {
            tokio::spawn(reload_on_hangup(reloader.clone(), lifecycle.drain.clone()));
        }
        for (settings, listener) in public {
            tokio::spawn(server::accept_loop(
                listener,
                settings,
                current.clone(),
                limit.clone(),
                metrics.clone(),
                lifecycle.clone(),
            ));
        }
        // The admin listener answers probes until the very end, so `/readyz` can say "draining":
        // its own drain comes after the public one's connections are done.
        let admin_lifecycle = Lifecycle::default();
        let admin_settings = Arc::new(ListenerSettings {
            name: "admin".into(),
            http2: false,
            tls: None,
            limits: config.limits.clone(),
        });
        let admin_handler = Arc::new(Admin {
            metrics: metrics.clone(),
            public_drain: lifecycle.drain.clone(),
            gateway: current.clone(),
            reloader: config.admin.reload.then(|| reloader.clone()),
            publish_token: config.admin.publish_token.clone(),
        });
        let (admin_metrics, admin_tokens) = (metrics.clone(), admin_lifecycle.clone());
        spawn_admin_thread(admin, move |listener| {
            server::accept_loop(
                listener,
                admin_settings,
                admin_handler,
                Arc::new(ConnectionLimit::new(ADMIN_MAX_CONNECTIONS)),
                admin_metrics,
                admin_tokens,
            )
        });

        shutdown.await;
        tracing::info!(timeout = ?config.shutdown.timeout, "shutting down: draining connections");
        metrics.draining.set(1);
        current.get().begin_drain();
        lifecycle.tasks.close();
        if tokio::time::timeout(config.shutdown.timeout, lifecycle.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                open = lifecycle.tasks.len(),
                "shutdown timeout reached with connections still open; closing them"
            );
        }
        admin_lifecycle.drain.begin();
        tracing::info!("shutdown complete");
    }
}

/// Binds and serves `config` (read from `path`, which reloads re-read; SIGHUP reloads) until
/// `shutdown` resolves and the drain ends.
pub async fn run(
    config: Config,
    path: Option<std::path::PathBuf>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartError> {
    Server::bind(config)
        .await?
        .config_path(path)
        .reload_on_sighup()
        .serve(shutdown)
        .await;
    Ok(())
}

/// Runs the admin listener on a thread and runtime of its own: publishes, probes and scrapes are
/// then never queued behind a fan-out's thousands of woken polls on the main runtime (measured:
/// the publish-to-answer latency of many topics published back to back depends on it), and
/// `/healthz` stays responsive under load. Ends when the admin accept loop does.
fn spawn_admin_thread<F, Fut>(listener: TcpListener, admin_loop: F)
where
    F: FnOnce(TcpListener) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    // The socket moves to the admin runtime's own I/O driver.
    let listener = match listener.into_std() {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(error = %e, "cannot hand the admin listener to its thread");
            return;
        }
    };
    let spawned = std::thread::Builder::new()
        .name("pollmux-admin".into())
        .spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            let result = runtime.and_then(|rt| {
                rt.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    admin_loop(listener).await;
                    Ok(())
                })
            });
            if let Err(e) = result {
                tracing::error!(error = %e, "the admin listener stopped");
            }
        });
    if let Err(e) = spawned {
        tracing::error!(error = %e, "cannot start the admin thread");
    }
}

/// Reloads the configuration on every SIGHUP until the server stops accepting.
async fn reload_on_hangup(reloader: Arc<Reloader>, drain: Drain) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hangup = match signal(SignalKind::hangup()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGHUP; reload with POST /-/reload");
            return;
        }
    };
    loop {
        tokio::select! {
            () = drain.begun() => return,
            received = hangup.recv() => {
                if received.is_none() {
                    return;
                }
                tracing::info!("SIGHUP: reloading the configuration");
                let reloader = reloader.clone();
                // Errors are logged and counted by the reloader itself.
                let _ = tokio::task::spawn_blocking(move || reloader.reload()).await;
            }
        }
    }
}

/// Removes lingered topics (and updates `pollmux_buffered_bytes`) until the server stops
/// accepting.
async fn sweep_task(current: Arc<Current>, metrics: Arc<Metrics>, drain: Drain) {
    let mut tick = tokio::time::interval(SWEEP_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = drain.begun() => return,
            _ = tick.tick() => {
                let gateway = current.get();
                let removed = gateway.sweep(tokio::time::Instant::now());
                let buffered = i64::try_from(gateway.buffered_bytes()).unwrap_or(i64::MAX);
                metrics.buffered_bytes.set(buffered);
                if removed > 0 {
                    tracing::debug!(removed, "swept lingered topics");
                }
            }
        }
    }
}

async fn bind(listener: &str, address: SocketAddr) -> Result<TcpListener, StartError> {
    TcpListener::bind(address)
        .await
        .map_err(|source| StartError::Bind {
            listener: listener.to_owned(),
            address,
            source,
        })
}

/// Raises the soft file-descriptor limit to the hard one; returns the limit now in force.
pub fn raise_fd_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the file-descriptor limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// Connections the fd limit allows after the reserve (at least half the limit when it is small).
fn default_max_connections(fd_limit: u64) -> u64 {
    fd_limit.saturating_sub(FD_RESERVE).max(fd_limit / 2).max(1)
}

/// The public connections served under `fd_limit`: `configured` (`limits.max_connections`) or
/// its default, never more than the limit allows after the reserve for the admin listener and
/// upstream connections; and the warning to give when `configured` asks for more.
pub fn public_connections(configured: Option<u64>, fd_limit: u64) -> (u64, Option<String>) {
    let allowed = default_max_connections(fd_limit);
    match configured {
        Some(n) if n > allowed => {
            let reserve = fd_limit - allowed;
            let warning = format!(
                "limits.max_connections = {n} is more than the file-descriptor limit ({fd_limit}) \
                 allows after {reserve} kept for the admin listener and upstream connections: \
                 at most {allowed} client connections are served; raise the limit \
                 (ulimit -n, LimitNOFILE=) or lower limits.max_connections"
            );
            (allowed, Some(warning))
        }
        Some(n) => (n, None),
        None => (allowed, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What every open connection (a held poll's included) keeps in its task, besides hyper's
    /// boxed request future and buffers. A regression here is memory per held poll; see
    /// docs/BENCHMARKS.md.
    #[test]
    fn connection_task_stays_small() {
        let config = Config::default_config();
        let (metrics, gw) = Gateway::for_tests(&config);
        let handler = Arc::new(Current::new(gw));
        let size = server::conn::task_size(handler, metrics, &config);
        eprintln!("connection task future: {size} bytes");
        assert!(size <= CONNECTION_TASK_BYTES_MAX, "{size} bytes");
    }

    const CONNECTION_TASK_BYTES_MAX: usize = 1560;

    #[test]
    fn max_connections_keeps_a_reserve() {
        assert_eq!(default_max_connections(20_000), 20_000 - FD_RESERVE);
        assert_eq!(default_max_connections(300), 150);
        assert_eq!(default_max_connections(1), 1);
        // 19,000 held polls fit under a 20,000 limit.
        assert!(default_max_connections(20_000) >= 19_000);
    }

    #[test]
    fn max_connections_above_the_descriptor_limit_is_cut_with_a_warning() {
        assert_eq!(
            public_connections(None, 20_000),
            (20_000 - FD_RESERVE, None)
        );
        assert_eq!(public_connections(Some(19_000), 20_000), (19_000, None));
        let (served, warning) = public_connections(Some(50_000), 20_000);
        assert_eq!(served, 20_000 - FD_RESERVE);
        let warning = warning.expect("a warning");
        assert!(
            warning.contains("limits.max_connections = 50000"),
            "{warning}"
        );
        assert!(warning.contains("(20000)"), "{warning}");
    }
}
