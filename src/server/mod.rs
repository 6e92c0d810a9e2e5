//! Listeners: bind, accept, enforce the connection limit, terminate TLS, pick the protocol, and
//! serve each connection with hyper until it ends or the server drains.
//!
//! Protocol choice: TLS listeners use ALPN (h2 or HTTP/1.1). Cleartext listeners speak HTTP/1.1,
//! and with `http2 = true` also h2c with prior knowledge, told apart by peeking at the first bytes
//! (the h2 preface) without consuming them, so each connection runs hyper's own HTTP/1 or HTTP/2
//! connection directly: HTTP/1 clients on an h2c listener pay no more memory than elsewhere.
//!
//! Shutdown: one [`Drain`] ends the accept loops (listeners close) and tells every connection to
//! finish its in-flight requests and close (HTTP/2: GOAWAY). Connection tasks are tracked, so
//! the caller can wait for them with a deadline.

pub(crate) mod conn;
pub mod h1;
mod write_timeout;

use std::io;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{LimitsConfig, ListenerConfig};
use crate::metrics::Metrics;
use crate::per_ip::{IpSlot, OverLimit, PerIp, canonical_ip};
use crate::problem::Problem;
use crate::service::{Drain, Handler};
use ipnet::IpNet;
use tracing::Instrument;

/// Connections over the limit that may be answered 503 at once; beyond this they are closed
/// unanswered, so a flood cannot use the descriptor reserve up.
pub const REJECTING_MAX: usize = 64;
/// First and longest pause of an accept loop after a resource error (EMFILE, ENFILE, ENOMEM):
/// the error repeats until descriptors are freed, so retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accept errors are logged at most this often per listener.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

/// Per-listener settings the connection tasks read.
pub struct ListenerSettings {
    /// The `listener` metric label.
    pub name: String,
    pub http2: bool,
    /// The listener's certificate, replaced by a reload (new connections use the new one).
    pub tls: Option<std::sync::RwLock<tokio_rustls::TlsAcceptor>>,
    pub limits: LimitsConfig,
}

impl ListenerSettings {
    pub fn new(config: &ListenerConfig, limits: &LimitsConfig) -> ListenerSettings {
        ListenerSettings {
            name: config.name.clone(),
            http2: config.http2,
            tls: config
                .tls
                .as_ref()
                .map(|t| tokio_rustls::TlsAcceptor::from(t.server_config.clone()).into()),
            limits: limits.clone(),
        }
    }

    /// The TLS acceptor for a new connection, if the listener speaks TLS.
    pub fn tls_acceptor(&self) -> Option<tokio_rustls::TlsAcceptor> {
        let lock = self.tls.as_ref()?;
        Some(lock.read().unwrap_or_else(|e| e.into_inner()).clone())
    }

    /// Serves new connections with the certificate of `config` (a reload).
    pub fn set_tls(&self, config: &ListenerConfig) {
        if let (Some(lock), Some(tls)) = (&self.tls, &config.tls) {
            *lock.write().unwrap_or_else(|e| e.into_inner()) =
                tokio_rustls::TlsAcceptor::from(tls.server_config.clone());
        }
    }
}

/// The drain and the task tracker shared by all listeners of one server.
#[derive(Clone, Default)]
pub struct Lifecycle {
    pub drain: Drain,
    pub tasks: TaskTracker,
}

/// The connection limits shared by a server's public listeners: in all, and per client IP.
pub struct ConnectionLimit {
    serving: Arc<Semaphore>,
    rejecting: Arc<Semaphore>,
    per_ip: Arc<PerIp>,
    /// Peers exempt from the per-IP limits (their clients are counted per request).
    trusted: Vec<IpNet>,
}

impl ConnectionLimit {
    /// Only the global limit (the admin listener).
    pub fn new(max_connections: usize) -> ConnectionLimit {
        ConnectionLimit::with_per_ip(max_connections, Arc::new(PerIp::new(0, 0)), Vec::new())
    }

    pub fn with_per_ip(
        max_connections: usize,
        per_ip: Arc<PerIp>,
        trusted: Vec<IpNet>,
    ) -> ConnectionLimit {
        ConnectionLimit {
            serving: Arc::new(Semaphore::new(max_connections)),
            rejecting: Arc::new(Semaphore::new(REJECTING_MAX)),
            per_ip,
            trusted,
        }
    }

    /// Whether `peer` may open one more connection: its slot when per-IP limits apply.
    fn admit_peer(&self, peer: IpAddr) -> Result<Option<IpSlot>, OverLimit> {
        let peer = canonical_ip(peer);
        if !self.per_ip.enabled() || self.trusted.iter().any(|n| n.contains(&peer)) {
            return Ok(None);
        }
        self.per_ip.admit(peer, std::time::Instant::now()).map(Some)
    }
}

/// Accepts connections on `listener` until `lifecycle.drain` begins, serving each with
/// `handler` in its own tracked task. Accept errors are counted, logged (rate-limited) and
/// waited out; they never end the loop.
pub async fn accept_loop<H: Handler>(
    listener: TcpListener,
    settings: Arc<ListenerSettings>,
    handler: Arc<H>,
    limit: Arc<ConnectionLimit>,
    metrics: Arc<Metrics>,
    lifecycle: Lifecycle,
) {
    let accept_errors = metrics.accept_errors.with_label_values(&[&settings.name]);
    let rejected = metrics
        .connections_rejected
        .with_label_values(&[&settings.name]);
    let last_log = Mutex::new(None::<Instant>);
    let mut backoff = ACCEPT_BACKOFF_MIN;
    loop {
        let accepted = tokio::select! {
            biased;
            () = lifecycle.drain.begun() => return,
            r = listener.accept() => r,
        };
        let (stream, peer) = match accepted {
            Ok(s) => {
                backoff = ACCEPT_BACKOFF_MIN;
                s
            }
            Err(e) => {
                accept_errors.inc();
                log_accept_error(&settings.name, &e, &last_log);
                if is_resource_error(&e) {
                    tokio::select! {
                        () = lifecycle.drain.begun() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
                }
                continue;
            }
        };
        let refusal = match limit.admit_peer(peer.ip()) {
            Ok(slot) => match limit.serving.clone().try_acquire_owned() {
                Ok(permit) => Ok(Admission::Serve(permit, slot)),
                Err(_) => Err(Problem::Overloaded),
            },
            Err(_) => Err(Problem::TooManyConnections),
        };
        let admission = match refusal {
            Ok(admission) => admission,
            Err(problem) => {
                rejected.inc();
                match limit.rejecting.clone().try_acquire_owned() {
                    Ok(permit) => Admission::Reject(permit, problem),
                    Err(_) => continue,
                }
            }
        };
        let conn = conn::Connection {
            stream,
            peer,
            settings: settings.clone(),
            metrics: metrics.clone(),
            drain: lifecycle.drain.clone(),
        };
        // One span per connection (debug: free unless asked for); what the connection logs,
        // and the requests it serves, carry its peer, listener and protocol.
        let span = tracing::debug_span!(
            "conn",
            peer = %peer,
            listener = %settings.name,
            protocol = tracing::field::Empty
        );
        let serve = conn.serve(handler.clone(), admission);
        // Disabled (the default level), no span is kept: a held poll's connection pays nothing.
        if span.is_disabled() {
            lifecycle.tasks.spawn(serve);
        } else {
            lifecycle.tasks.spawn(serve.instrument(span));
        }
    }
}

/// Whether a connection is served (holding its place in the limits) or only told why not.
pub enum Admission {
    Serve(OwnedSemaphorePermit, Option<IpSlot>),
    Reject(OwnedSemaphorePermit, Problem),
}

fn is_resource_error(e: &io::Error) -> bool {
    // EMFILE 24, ENFILE 23, ENOBUFS 105, ENOMEM 12 on Linux.
    matches!(e.raw_os_error(), Some(24 | 23 | 105 | 12))
}

fn log_accept_error(listener: &str, e: &io::Error, last_log: &Mutex<Option<Instant>>) {
    let mut last = last_log.lock().unwrap_or_else(|p| p.into_inner());
    let due = last.is_none_or(|t| t.elapsed() >= ACCEPT_ERROR_LOG_INTERVAL);
    if due {
        *last = Some(Instant::now());
        tracing::warn!(listener, error = %e, "accept failed; retrying (logged at most every 5s)");
    }
}

/// `TcpStream` options every accepted connection gets.
fn tune(stream: &TcpStream) {
    // Responses are whole messages; waiting for more bytes only adds latency.
    let _ = stream.set_nodelay(true);
}
