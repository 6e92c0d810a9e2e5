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
pub use conn::accept_loop;
pub mod h1;
mod h2;
mod write_timeout;

use std::net::IpAddr;
use std::sync::Arc;

use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::task::TaskTracker;

use crate::config::{LimitsConfig, ListenerConfig};
use crate::per_ip::{IpSlot, OverLimit, PerIp, canonical_ip};
use crate::problem::Problem;
use crate::service::Drain;
use ipnet::IpNet;

/// Connections over the limit that may be answered 503 at once; beyond this they are closed
/// unanswered, so a flood cannot use the descriptor reserve up.
pub const REJECTING_MAX: usize = 64;

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
        self.per_ip
            .admit(peer, tokio::time::Instant::now())
            .map(Some)
    }
}

/// Whether a connection is served (holding its place in the limits) or only told why not.
pub enum Admission {
    Serve(OwnedSemaphorePermit, Option<IpSlot>),
    Reject(OwnedSemaphorePermit, Problem),
}

/// `TcpStream` options every accepted connection gets.
fn tune(stream: &TcpStream) {
    // Responses are whole messages; waiting for more bytes only adds latency.
    let _ = stream.set_nodelay(true);
}
