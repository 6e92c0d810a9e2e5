//! `[limits]` and `[shutdown]`: the bounds on connections, requests, messages and buffered bytes,
//! and the drain timing, with their defaults.

use std::time::Duration;

use ipnet::IpNet;

use super::{Validator, raw};

/// Header read timeout: long enough for a slow mobile client, short enough to shed slowloris.
/// On HTTP/1 it also bounds how long an idle keep-alive connection waits for its next request.
pub const HEADER_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// TLS handshake timeout, for the same reason.
pub const TLS_HANDSHAKE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(10);
/// Header block limit; hyper answers 431 above it. hyper requires at least 8 KiB.
pub const MAX_HEADER_BYTES_DEFAULT: usize = 16 * 1024;
const MAX_HEADER_BYTES_MIN: usize = 8 * 1024;
/// Header count limit; hyper answers 431 above it.
pub const MAX_HEADERS_DEFAULT: usize = 64;
/// Request-target limit; pollmux answers 414 above it.
pub const MAX_URI_BYTES_DEFAULT: usize = 8 * 1024;
/// Polls one credential may hold on one topic at once: the protocol asks for one; a few more
/// absorb retries racing a poll that has not ended yet.
pub const MAX_POLLS_PER_CLIENT_DEFAULT: usize = 4;
/// A client that reads nothing of a response for this long is disconnected, so it cannot pin
/// a response's memory forever.
pub const WRITE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Message payload buffered over all topics (each topic also has its own `buffer` bound):
/// beyond it new topics are refused with 503 rather than the process running out of memory.
pub const MAX_BUFFERED_BYTES_DEFAULT: usize = 1024 * 1024 * 1024;
/// Connections one client IP may hold: generous for offices behind one NAT address, far
/// below what exhausts the server.
pub const MAX_CONNECTIONS_PER_IP_DEFAULT: usize = 1024;
/// New connections per second per client IP: off unless set. A rate that fits one client is
/// far too low for thousands behind one carrier-grade NAT address, so only the operator can
/// pick it (docs/configuration.md); the concurrent limit protects capacity meanwhile.
pub const NEW_CONNECTIONS_PER_IP_PER_SECOND_DEFAULT: usize = 0;
/// Concurrent streams per HTTP/2 connection: many polls per client, but bounded.
pub const HTTP2_MAX_CONCURRENT_STREAMS_DEFAULT: usize = 256;
/// HTTP/2 keep-alive ping interval (and the time a ping may take): finds dead connections
/// behind NATs and load balancers that drop idle flows.
pub const HTTP2_KEEP_ALIVE_INTERVAL_DEFAULT: Duration = Duration::from_secs(30);
/// Time a request's whole body may take to arrive after its head: a deadline, not a per-read
/// timeout, which a client sending a byte every few seconds would never trip.
pub const BODY_READ_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// Largest message payload: publishes above it get 413, source messages above it become gaps.
pub const MAX_MESSAGE_BYTES_DEFAULT: usize = 1024 * 1024;

/// File descriptors kept back from public connections whatever `max_connections` says: for the
/// admin listener's connections (128), the over-limit 503 answers (64), upstream and Redis
/// connections, the listeners and the process's own files (the rest).
pub const FD_RESERVE: u64 = 512;
/// Time between SIGTERM and the last held poll being answered (answers are spread over it).
pub const DRAIN_WINDOW_DEFAULT: Duration = Duration::from_secs(5);
/// Time after SIGTERM by which pollmux exits, whatever is still in flight.
pub const SHUTDOWN_TIMEOUT_DEFAULT: Duration = Duration::from_secs(15);

#[derive(Debug, Clone, PartialEq)]
pub struct LimitsConfig {
    /// Concurrent client connections over all listeners; `None`: the fd limit minus
    /// [`FD_RESERVE`], computed at start after the limit is raised. A larger value is cut to
    /// that, with a warning (`crate::public_connections`).
    pub max_connections: Option<u64>,
    pub header_read_timeout: Duration,
    pub tls_handshake_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_uri_bytes: usize,
    pub max_message_bytes: usize,
    /// Polls one credential (`Authorization` value) may hold on one topic at once.
    pub max_polls_per_client: usize,
    /// A connection whose client reads nothing of a response for this long is closed.
    pub write_timeout: Duration,
    /// A request's whole body must have arrived this long after its head, else 408.
    pub body_read_timeout: Duration,
    /// Message payload buffered over all topics; beyond it no new topic is made (503).
    pub max_buffered_bytes: usize,
    /// Connections one client IP may have open at once (requests, behind a trusted proxy);
    /// 0: no limit.
    pub max_connections_per_ip: usize,
    /// New connections (requests, behind a trusted proxy) per second per client IP; 0: no limit.
    pub new_connections_per_ip_per_second: u32,
    /// Streams one HTTP/2 connection may have open at once.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2 connections are pinged this often when idle; one not answering within the same
    /// time is closed.
    pub http2_keep_alive_interval: Duration,
    /// Peers whose `X-Forwarded-For` is extended rather than replaced.
    pub trusted_proxies: Vec<IpNet>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ShutdownConfig {
    pub drain_window: Duration,
    pub timeout: Duration,
}

impl Validator<'_, '_> {
    pub(super) fn limits(&mut self, raw: raw::Limits) -> LimitsConfig {
        let mut size = |key: &str, value: Option<u64>, default: usize, min: usize| -> usize {
            let v = value.map_or(default, |v| usize::try_from(v).unwrap_or(usize::MAX));
            if v < min {
                self.err(&["limits", key], format!("must be at least {min}"));
            }
            v
        };
        let max_header_bytes = size(
            "max_header_bytes",
            raw.max_header_bytes,
            MAX_HEADER_BYTES_DEFAULT,
            MAX_HEADER_BYTES_MIN,
        );
        let max_headers = size("max_headers", raw.max_headers, MAX_HEADERS_DEFAULT, 8);
        let max_uri_bytes = size(
            "max_uri_bytes",
            raw.max_uri_bytes,
            MAX_URI_BYTES_DEFAULT,
            256,
        );
        let max_message_bytes = size(
            "max_message_bytes",
            raw.max_message_bytes,
            MAX_MESSAGE_BYTES_DEFAULT,
            1,
        );
        let max_polls_per_client = size(
            "max_polls_per_client",
            raw.max_polls_per_client,
            MAX_POLLS_PER_CLIENT_DEFAULT,
            1,
        );
        let max_buffered_bytes = size(
            "max_buffered_bytes",
            raw.max_buffered_bytes,
            MAX_BUFFERED_BYTES_DEFAULT,
            1,
        );
        let max_connections_per_ip = size(
            "max_connections_per_ip",
            raw.max_connections_per_ip,
            MAX_CONNECTIONS_PER_IP_DEFAULT,
            0,
        );
        let new_connections_per_ip_per_second = size(
            "new_connections_per_ip_per_second",
            raw.new_connections_per_ip_per_second,
            NEW_CONNECTIONS_PER_IP_PER_SECOND_DEFAULT,
            0,
        );
        let http2_max_concurrent_streams = size(
            "http2_max_concurrent_streams",
            raw.http2_max_concurrent_streams,
            HTTP2_MAX_CONCURRENT_STREAMS_DEFAULT,
            1,
        );
        if raw.max_connections == Some(0) {
            self.err(&["limits", "max_connections"], "must be at least 1");
        }
        let mut positive = |key: &str, value: Option<raw::Dur>, default: Duration| {
            let d = value.map_or(default, |d| d.0);
            if d.is_zero() {
                self.err(&["limits", key], "must be above zero");
            }
            d
        };
        let write_timeout = positive("write_timeout", raw.write_timeout, WRITE_TIMEOUT_DEFAULT);
        let body_read_timeout = positive(
            "body_read_timeout",
            raw.body_read_timeout,
            BODY_READ_TIMEOUT_DEFAULT,
        );
        let http2_keep_alive_interval = positive(
            "http2_keep_alive_interval",
            raw.http2_keep_alive_interval,
            HTTP2_KEEP_ALIVE_INTERVAL_DEFAULT,
        );
        let mut trusted_proxies = Vec::new();
        for (i, entry) in raw.trusted_proxies.unwrap_or_default().iter().enumerate() {
            let text = entry.0.trim();
            let parsed = text
                .parse::<IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => trusted_proxies.push(net),
                Err(_) => self.err(
                    &["limits", "trusted_proxies"],
                    format!("entry {i}: {text:?} is not an IP address or CIDR network"),
                ),
            }
        }
        LimitsConfig {
            max_connections: raw.max_connections,
            header_read_timeout: raw
                .header_read_timeout
                .map_or(HEADER_READ_TIMEOUT_DEFAULT, |d| d.0),
            tls_handshake_timeout: raw
                .tls_handshake_timeout
                .map_or(TLS_HANDSHAKE_TIMEOUT_DEFAULT, |d| d.0),
            max_header_bytes,
            max_headers,
            max_uri_bytes,
            max_message_bytes,
            max_polls_per_client,
            write_timeout,
            body_read_timeout,
            max_buffered_bytes,
            max_connections_per_ip,
            new_connections_per_ip_per_second: u32::try_from(new_connections_per_ip_per_second)
                .unwrap_or(u32::MAX),
            http2_max_concurrent_streams: u32::try_from(http2_max_concurrent_streams)
                .unwrap_or(u32::MAX),
            http2_keep_alive_interval,
            trusted_proxies,
        }
    }

    /// `[shutdown]`: the drain window must fit in the timeout.
    pub(super) fn shutdown(&mut self, shutdown: raw::Shutdown) -> ShutdownConfig {
        let shutdown = ShutdownConfig {
            drain_window: shutdown.drain_window.map_or(DRAIN_WINDOW_DEFAULT, |d| d.0),
            timeout: shutdown.timeout.map_or(SHUTDOWN_TIMEOUT_DEFAULT, |d| d.0),
        };
        if shutdown.drain_window > shutdown.timeout {
            self.err(
                &["shutdown", "drain_window"],
                "must not be longer than shutdown.timeout",
            );
        }
        shutdown
    }
}
