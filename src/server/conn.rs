//! Accepting and serving client connections: the accept loop (within the connection limits),
//! then per connection the TLS handshake (bounded), protocol choice, and hyper or the
//! held-poll path serving it until it closes or the server drains.

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;

use hyper::rt::{Read, Write};
use hyper::server::conn::{http1, http2};
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tracing::Instrument;

use super::h1;
use super::h2::{FrameGuard, StreamExecutor, Tracked};
use super::write_timeout::WriteTimeout;
use super::{Admission, ConnectionLimit, Lifecycle, ListenerSettings, tune};
use crate::metrics::{GaugeGuard, Metrics, Protocol};
use crate::problem::Problem;
use crate::service::{ConnInfo, Drain, Handler};
use crate::upstream::Body;

/// The HTTP/2 connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// Bytes of the preface that rule out every HTTP/1 request line ("PRI " is no HTTP/1 method a
/// client of ours sends).
const H2_PREFACE_DECISIVE: usize = 4;
/// Pause between peeks while a client's first bytes arrive in pieces (rare); doubles up to the
/// maximum, bounded overall by the header read timeout.
const PEEK_RETRY_MIN: Duration = Duration::from_millis(1);
const PEEK_RETRY_MAX: Duration = Duration::from_millis(100);

pub struct Connection {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub settings: Arc<ListenerSettings>,
    pub metrics: Arc<Metrics>,
    pub drain: Drain,
}

/// First and longest pause of an accept loop after a resource error (EMFILE, ENFILE, ENOMEM):
/// the error repeats until descriptors are freed, so retrying at once would spin.
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(5);
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Accept errors are logged at most this often per listener.
const ACCEPT_ERROR_LOG_INTERVAL: Duration = Duration::from_secs(5);

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
        let conn = Connection {
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

impl Connection {
    /// Serves the connection to its end. The admission permit is held until then.
    pub async fn serve<H: Handler>(self, handler: Arc<H>, admission: Admission) {
        let Connection {
            stream,
            peer,
            settings,
            metrics,
            drain,
        } = self;
        tune(&stream);
        let limits = &settings.limits;
        let info = ConnInfo {
            peer,
            tls: settings.tls.is_some(),
        };
        let refusal = match &admission {
            Admission::Reject(_, problem) => Some(*problem),
            Admission::Serve(..) => None,
        };
        let reject = refusal.is_some();
        let held_path = (H::HOLDS_POLLS && !reject).then(|| handler.clone());
        let service = move |req| {
            // Called here, not inside the async block, so the block never holds the request.
            let call = (!reject).then(|| handler.call(req, info));
            async move {
                let resp = match (call, refusal) {
                    (Some(call), _) => call.await,
                    (None, Some(Problem::TooManyConnections)) => Problem::TooManyConnections
                        .response(Some("too many connections from this address")),
                    (None, _) => Problem::Overloaded.response(Some("max_connections reached")),
                };
                Ok::<_, Infallible>(resp)
            }
        };
        let serving = Serving {
            settings: &settings,
            metrics: &metrics,
            drain: &drain,
            reject,
        };
        // Every connection task is allocated at the size of its largest state, so the TLS and
        // HTTP/2 paths (rustls and h2 state are kilobytes) are boxed: a cleartext HTTP/1.1
        // connection, the held-poll case, pays only for what it uses.
        let serve = async {
            let write_timeout = limits.write_timeout;
            match settings.tls_acceptor() {
                Some(acceptor) => {
                    let stream = WriteTimeout::new(stream, write_timeout);
                    Box::pin(serving.serve_tls(&acceptor, stream, peer, service)).await;
                }
                None => {
                    let protocol = if settings.http2 {
                        match sniff(&stream, limits.header_read_timeout).await {
                            Some(p) => p,
                            None => return,
                        }
                    } else {
                        Protocol::Http1
                    };
                    match held_path {
                        Some(handler) if protocol == Protocol::Http1 => {
                            serving.run_held(stream, &handler, info, service).await;
                        }
                        _ if protocol == Protocol::Http2 => {
                            let io = WriteTimeout::new(stream, write_timeout);
                            let io = TokioIo::new(FrameGuard::new(io));
                            Box::pin(serving.run(io, protocol, service)).await;
                        }
                        _ => {
                            let io = TokioIo::new(WriteTimeout::new(stream, write_timeout));
                            // Boxed: hyper's connection state is only paid for by connections
                            // that use it (held polls take the path above).
                            Box::pin(serving.run(io, protocol, service)).await;
                        }
                    }
                }
            }
        };
        if reject {
            // An over-limit connection gets one answer and no more of our time. (Boxed, so
            // the task does not keep room for `serve` twice.)
            let _ = Box::pin(tokio::time::timeout(limits.header_read_timeout, serve)).await;
        } else {
            serve.await;
        }
        drop(admission);
    }
}

/// What serving one connection needs besides its socket.
struct Serving<'a> {
    settings: &'a ListenerSettings,
    metrics: &'a Metrics,
    drain: &'a Drain,
    reject: bool,
}

impl Serving<'_> {
    async fn serve_tls<S, F>(
        &self,
        acceptor: &tokio_rustls::TlsAcceptor,
        stream: WriteTimeout<TcpStream>,
        peer: SocketAddr,
        service: S,
    ) where
        S: Fn(http::Request<hyper::body::Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static,
    {
        let handshake = acceptor.accept(stream);
        let timeout = self.settings.limits.tls_handshake_timeout;
        let tls = match tokio::time::timeout(timeout, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::debug!(%peer, "TLS handshake timed out");
                return;
            }
        };
        if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
            let io = TokioIo::new(FrameGuard::new(tls));
            self.run(io, Protocol::Http2, service).await;
        } else {
            self.run(TokioIo::new(tls), Protocol::Http1, service).await;
        }
    }

    /// Serves a cleartext HTTP/1.1 connection on the held-poll path (`h1`), and with hyper
    /// once a request needs it.
    async fn run_held<H, S, F>(
        &self,
        stream: TcpStream,
        handler: &Arc<H>,
        info: ConnInfo,
        service: S,
    ) where
        H: Handler,
        S: Fn(http::Request<hyper::body::Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static,
    {
        let _open = self.open(Protocol::Http1);
        let limits = &self.settings.limits;
        match h1::serve(stream, handler, info, limits, self.drain).await {
            // The held-poll path logged who closed it.
            h1::End::Closed => {}
            h1::End::Hyper(handoff) => {
                let io = TokioIo::new(WriteTimeout::new(handoff, limits.write_timeout));
                // Boxed: hyper's connection state is only paid for by connections that use it.
                Box::pin(self.drive(io, Protocol::Http1, service)).await;
            }
        }
    }

    fn open(&self, protocol: Protocol) -> GaugeGuard {
        tracing::Span::current().record("protocol", tracing::field::display(protocol.label()));
        GaugeGuard::new(
            self.metrics
                .connections_open
                .with_label_values(&[&self.settings.name, protocol.label()]),
        )
    }

    async fn run<I, S, F>(&self, io: I, protocol: Protocol, service: S)
    where
        I: Read + Write + Unpin + Send + 'static,
        S: Fn(http::Request<hyper::body::Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static,
    {
        let _open = self.open(protocol);
        self.drive(io, protocol, service).await;
    }

    /// hyper serving the connection until it ends or the server drains.
    async fn drive<I, S, F>(&self, io: I, protocol: Protocol, service: S)
    where
        I: Read + Write + Unpin + Send + 'static,
        S: Fn(http::Request<hyper::body::Incoming>) -> F + Send + 'static,
        F: Future<Output = Result<http::Response<Body>, Infallible>> + Send + 'static,
    {
        let limits = &self.settings.limits;
        let (result, drained) = match protocol {
            Protocol::Http1 => {
                let service = service_fn(service);
                let conn = http1::Builder::new()
                    .timer(TokioTimer::new())
                    .header_read_timeout(limits.header_read_timeout)
                    .max_header_size(limits.max_header_bytes)
                    .max_headers(limits.max_headers)
                    .keep_alive(!self.reject)
                    .serve_connection(io, service);
                let mut conn = std::pin::pin!(conn);
                tokio::select! {
                    r = conn.as_mut() => (r, false),
                    () = self.drain.begun() => {
                        tracing::debug!("the server drains: closing the connection after its requests");
                        conn.as_mut().graceful_shutdown();
                        (conn.await, true)
                    }
                }
            }
            Protocol::Http2 => {
                // Each response body tells its stream's watch when it waits for the window.
                let service = service_fn(move |req| {
                    let call = service(req);
                    async move { call.await.map(|resp| resp.map(Tracked::new)) }
                });
                let executor = StreamExecutor {
                    write_timeout: limits.write_timeout,
                };
                let conn = http2::Builder::new(executor)
                    .timer(TokioTimer::new())
                    .max_header_list_size(
                        u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX),
                    )
                    .max_concurrent_streams(limits.http2_max_concurrent_streams)
                    .keep_alive_interval(limits.http2_keep_alive_interval)
                    .keep_alive_timeout(limits.http2_keep_alive_interval)
                    .serve_connection(io, service);
                let mut conn = Box::pin(conn);
                tokio::select! {
                    r = conn.as_mut() => (r, false),
                    () = self.drain.begun() => {
                        tracing::debug!("the server drains: GOAWAY, closing after the open streams");
                        conn.as_mut().graceful_shutdown();
                        (conn.await, true)
                    }
                }
            }
        };
        // Who closed it: linkerd2-proxy's question, answered at debug.
        match (result, drained) {
            (Ok(()), true) => tracing::debug!("connection closed by the server: draining"),
            (Ok(()), false) => tracing::debug!("connection closed by the client, or idle"),
            (Err(e), _) => tracing::debug!(error = %e, "connection ended with an error"),
        }
    }
}

/// Tells h2c prior knowledge from HTTP/1 by peeking at the first bytes. `None`: the client sent
/// nothing usable before the header read timeout, or closed.
async fn sniff(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let decide = async {
        let mut buf = [0u8; H2_PREFACE.len()];
        let mut retry = PEEK_RETRY_MIN;
        loop {
            let n = stream.peek(&mut buf).await.ok()?;
            if n == 0 {
                return None;
            }
            if buf[..n] != H2_PREFACE[..n] {
                return Some(Protocol::Http1);
            }
            if n >= H2_PREFACE_DECISIVE {
                return Some(Protocol::Http2);
            }
            // A prefix of the preface that is too short to decide: wait for more bytes.
            tokio::time::sleep(retry).await;
            retry = (retry * 2).min(PEEK_RETRY_MAX);
        }
    };
    tokio::time::timeout(timeout, decide).await.ok().flatten()
}

/// The size of the future a connection task keeps (for a held poll's connection, all it keeps
/// besides hyper's boxed request future and buffers), served by `handler`; the bound on it is
/// checked in the crate's tests, which know the gateway.
#[cfg(test)]
pub(crate) fn task_size<H: Handler>(
    handler: Arc<H>,
    metrics: Arc<Metrics>,
    config: &crate::config::Config,
) -> usize {
    fn size<F: Future>(_: &F) -> usize {
        std::mem::size_of::<F>()
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let stream = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let peer = stream.peer_addr().unwrap();
        let conn = Connection {
            stream,
            peer,
            settings: Arc::new(ListenerSettings::new(&config.listeners[0], &config.limits)),
            metrics,
            drain: Drain::default(),
        };
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .try_acquire_owned()
            .unwrap();
        size(&conn.serve(handler, Admission::Serve(permit, None)))
    })
}
