//! The connection loop of the cleartext HTTP/1.1 path, built for held polls: head reading, and
//! holding a poll until its answer.
//!
//! A connection reads its request heads itself (parsed by `httparse`). A plain GET for a poll
//! route is served here; anything else (another route or method, a body, `Upgrade`, `Expect`,
//! `Connection` options, HTTP/1.0, a malformed or oversized head) is handed to hyper with the
//! bytes read so far, and hyper serves the connection from then on with its own checks and
//! errors.
//!
//! Why: a held poll here costs its task and one [`Socket`], not hyper's two 8 KiB buffers per
//! connection; and a waiting poll parks with its topic ([`Parked`]), so the publisher writes
//! the shared, once-encoded answer into every parked socket itself instead of waking one task
//! per client. See docs/BENCHMARKS.md.
//!
//! After an answer written in place, the connection notices it when the client sends its next
//! request (or closes); a client that does neither is closed at the end of the poll's hold plus
//! the header read timeout.

use std::cell::RefCell;
use std::future::Future;
use std::io::{self, IoSlice};
use std::mem;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, ready};
use std::time::{Duration, SystemTime};

use bytes::{BufMut, Bytes};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Version};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::time::Instant;

mod handoff;
mod socket;

use crate::config::LimitsConfig;
use crate::hub::{Batch, ParkId, Parked, Topic};
use crate::service::{ConnInfo, Drain, Handler, HeldPoll, NoBody, Step};
use crate::upstream::Body;

pub use handoff::Handoff;
use socket::*;

/// First read buffer for a request head; doubled as needed up to `max_header_bytes`.
const HEAD_BUFFER: usize = 512;
const STATUS_OK: &[u8] = b"HTTP/1.1 200 OK\r\n";

/// How the connection's own part ended.
pub enum End<P: HeldPoll> {
    Closed,
    /// hyper serves the rest of the connection.
    Hyper(Handoff<P>),
}

/// What a poll's hold ended with.
enum Held {
    Respond(Response<Body>),
    /// Its answer is on the wire.
    Written,
    Closed,
}

/// A response to come: boxed, so the connection's own future does not keep its room.
type Answer = Pin<Box<dyn Future<Output = Response<Body>> + Send>>;

/// What is left of a request once it is prepared.
enum Then {
    Answer(Answer),
    /// The poll waits in the socket's slot.
    Hold,
}

/// Serves `stream` until it closes or a request for hyper arrives.
///
/// Memory: this future is what every connection keeps, so nothing large lives across an
/// `.await` here: a waiting poll is kept in the socket's slot, and responses are written by a
/// boxed future.
pub async fn serve<H: Handler>(
    stream: TcpStream,
    handler: &Arc<H>,
    info: ConnInfo,
    limits: &LimitsConfig,
    drain: &Drain,
) -> End<H::Held> {
    let socket = Arc::new(Socket {
        stream,
        slot: Mutex::new(Slot::Idle),
        attention: Notify::new(),
    });
    let _clear = ClearSlot(socket.clone());
    let mut buf = Vec::new();
    let mut ticket = 0;
    loop {
        let then = match read_head(&socket, &mut buf, limits, drain).await {
            Head::Ours(req, len) => match handler.prepare_held(req, info) {
                Some(step) => {
                    buf.drain(..len);
                    if buf.is_empty() {
                        // Nothing pipelined: a held poll keeps no buffer.
                        buf = Vec::new();
                    }
                    socket.start(step)
                }
                None => return End::Hyper(Handoff::new(socket, buf)),
            },
            Head::Hyper => return End::Hyper(Handoff::new(socket, buf)),
            Head::Closed => return End::Closed,
        };
        let answer = match then {
            Then::Answer(answer) => answer,
            Then::Hold => match hold(&socket, &mut ticket, &mut buf, limits, drain).await {
                Held::Respond(resp) => Box::pin(std::future::ready(resp)),
                Held::Written => continue,
                Held::Closed => return End::Closed,
            },
        };
        let respond = respond(&socket, answer, &mut buf, drain, limits.write_timeout);
        let written = Box::pin(respond).await;
        match written {
            Ok(Keep::Open) => {}
            Ok(Keep::Close) => {
                tracing::debug!("connection closed by the server after its answer (close)");
                return End::Closed;
            }
            Err(e) => {
                tracing::debug!(error = %e, "connection closed: writing the answer failed");
                return End::Closed;
            }
        }
    }
}

/// A request head read off the connection.
#[expect(
    clippy::large_enum_variant,
    reason = "returned once per request, never kept across an await"
)]
enum Head {
    /// A GET this path serves; its length in the buffer.
    Ours(Request<NoBody>, usize),
    Hyper,
    Closed,
}

/// Reads until the buffer holds a complete request head, within the header read timeout (an
/// idle connection closes then, or at once when the server drains).
async fn read_head<P: HeldPoll>(
    socket: &Socket<P>,
    buf: &mut Vec<u8>,
    limits: &LimitsConfig,
    drain: &Drain,
) -> Head {
    let deadline = Instant::now() + limits.header_read_timeout;
    // Bytes already searched for the end of the head, and the length last parsed: a head
    // arriving in pieces is searched once, and parsed when it may be whole, or when it has
    // doubled (so bytes that are no HTTP at all are handed to hyper, which answers them, early).
    let (mut searched, mut parsed): (usize, usize) = (0, 0);
    loop {
        let from = searched.saturating_sub(3);
        searched = buf.len();
        let ended = buf[from..].windows(2).any(|w| w == b"\n\n")
            || buf[from..].windows(3).any(|w| w == b"\n\r\n");
        if !buf.is_empty() && (ended || buf.len() >= 2 * parsed) {
            parsed = buf.len();
            match parse(buf, limits.max_headers) {
                Some(Head::Ours(_, len)) if len > limits.max_header_bytes => return Head::Hyper,
                Some(head) => return head,
                None => {}
            }
        }
        if buf.len() >= limits.max_header_bytes {
            // hyper answers an oversized head (431).
            return Head::Hyper;
        }
        tokio::select! {
            r = socket.read_ready() => {
                if r.is_err() {
                    tracing::debug!("connection closed: the socket failed");
                    return Head::Closed;
                }
            }
            () = tokio::time::sleep_until(deadline) => {
                tracing::debug!("connection closed by the server: no request head in time");
                return Head::Closed;
            }
            () = drain.begun(), if buf.is_empty() => {
                tracing::debug!("connection closed by the server: draining");
                return Head::Closed;
            }
        }
        let spare = if buf.is_empty() {
            HEAD_BUFFER
        } else {
            buf.len()
        };
        buf.reserve(spare);
        match socket.stream.try_read_buf(buf) {
            Ok(0) => {
                tracing::debug!("connection closed by the client");
                return Head::Closed;
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => {
                tracing::debug!(error = %e, "connection closed: reading failed");
                return Head::Closed;
            }
        }
    }
}

/// Parses the head at the start of `buf`: a GET this path serves, or one for hyper; `None`
/// while it is incomplete.
fn parse(buf: &[u8], max_headers: usize) -> Option<Head> {
    let mut headers = vec![httparse::EMPTY_HEADER; max_headers];
    let mut head = httparse::Request::new(&mut headers);
    let len = match head.parse(buf) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return None,
        Err(_) => return Some(Head::Hyper),
    };
    Some(match request(&head) {
        Some(req) => Head::Ours(req, len),
        None => Head::Hyper,
    })
}

/// The request of a head this path serves: HTTP/1.1 GET in origin form, without a body, an
/// upgrade, an expectation or connection options.
fn request(head: &httparse::Request<'_, '_>) -> Option<Request<NoBody>> {
    if head.method != Some("GET") || head.version != Some(1) {
        return None;
    }
    let path = head.path.filter(|p| p.starts_with('/'))?;
    let mut req = Request::new(NoBody::new());
    *req.method_mut() = Method::GET;
    *req.version_mut() = Version::HTTP_11;
    *req.uri_mut() = path.parse().ok()?;
    let map = req.headers_mut();
    for h in head.headers.iter() {
        let name = HeaderName::from_bytes(h.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(h.value).ok()?;
        let plain = match name {
            header::TRANSFER_ENCODING | header::UPGRADE | header::EXPECT => false,
            header::CONTENT_LENGTH => value == "0",
            header::CONNECTION => value.as_bytes().eq_ignore_ascii_case(b"keep-alive"),
            _ => true,
        };
        if !plain {
            return None;
        }
        map.append(name, value);
    }
    Some(req)
}

/// Waits for the answer of the poll in the socket's slot, parked with its topic.
async fn hold<P: HeldPoll>(
    socket: &Arc<Socket<P>>,
    ticket: &mut u64,
    buf: &mut Vec<u8>,
    limits: &LimitsConfig,
    drain: &Drain,
) -> Held {
    loop {
        let (parked, deadline) = match socket.park(ticket, !buf.is_empty()) {
            Park::Answer(resp) => return Held::Respond(resp),
            Park::Again => continue,
            Park::Parked(parked, deadline) => (parked, deadline),
            Park::Lost => return Held::Closed,
        };
        let (rest, close) = match wait_parked(socket, *ticket, deadline, buf, drain).await {
            Woke::Again => continue,
            Woke::Expired(mut poll) => {
                drop(parked);
                return Held::Respond(poll.expire());
            }
            Woke::Gone(poll) => {
                drop((parked, poll));
                tracing::debug!("connection closed by the client while its poll was held");
                return Held::Closed;
            }
            Woke::Answered => return Held::Written,
            Woke::Closing => {
                tracing::debug!("connection closed by the server: draining, after its answer");
                return Held::Closed;
            }
            Woke::Broken => {
                tracing::debug!("connection closed: writing the answer failed");
                return Held::Closed;
            }
            Woke::Unwritten(rest, close) => (rest, close),
        };
        let bufs = &mut [IoSlice::new(&rest)];
        // Boxed: rare (the socket was full), and kept out of every connection's future.
        let written = Box::pin(write_all(socket, bufs, limits.write_timeout)).await;
        return if written.is_ok() && !close {
            Held::Written
        } else {
            Held::Closed
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind(head: &str) -> &'static str {
        match parse(head.as_bytes(), 64) {
            Some(Head::Ours(..)) => "ours",
            None => "partial",
            Some(_) => "hyper",
        }
    }

    #[test]
    fn only_plain_http11_gets_without_a_body_are_served_here() {
        let ours = [
            "GET /news/a HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /news/a?cursor=x HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nConnection: Keep-Alive\r\n\r\n",
        ];
        for head in ours {
            assert_eq!(kind(head), "ours", "{head}");
        }
        let hyper = [
            "POST /news/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\nhi",
            "GET /news/a HTTP/1.0\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nContent-Length: 5\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nContent-Length: 00\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nConnection: close\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nConnection: upgrade\r\nUpgrade: websocket\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nExpect: 100-continue\r\n\r\n",
            "GET http://x/news/a HTTP/1.1\r\n\r\n",
            "GET * HTTP/1.1\r\n\r\n",
            "GET /news/a HTTP/1.1\r\nBad Header: x\r\n\r\n",
            "G\0T / HTTP/1.1\r\n\r\n",
        ];
        for head in hyper {
            assert_eq!(kind(head), "hyper", "{head:?}");
        }
        assert_eq!(kind("GET /news/a HTTP/1.1\r\nHost: x\r\n"), "partial");
        let many: String = (0..65).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(kind(&format!("GET / HTTP/1.1\r\n{many}\r\n")), "hyper");
    }

    #[test]
    fn a_served_request_keeps_its_target_and_headers() {
        let head =
            b"GET /news/a?cursor=c HTTP/1.1\r\nHost: x\r\nOrigin: https://o\r\n\r\nGET /next";
        let Some(Head::Ours(req, len)) = parse(head, 64) else {
            panic!("a plain GET");
        };
        assert_eq!(&head[len..], b"GET /next");
        assert_eq!(req.uri().path(), "/news/a");
        assert_eq!(req.uri().query(), Some("cursor=c"));
        assert_eq!(req.headers()["origin"], "https://o");
        assert_eq!(req.headers()["host"], "x");
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = parse(&bytes, 64);
        }

        #[test]
        fn a_served_request_ends_where_its_head_ends(
            path in "/[a-z0-9/]{0,20}",
            values in proptest::collection::vec("[ -~]{0,16}", 0..8),
        ) {
            let mut head = format!("GET {path} HTTP/1.1\r\n");
            for (i, v) in values.iter().enumerate() {
                head.push_str(&format!("X-{i}: {v}\r\n"));
            }
            head.push_str("\r\n");
            let len = head.len();
            head.push_str("rest");
            match parse(head.as_bytes(), 64) {
                Some(Head::Ours(req, at)) => {
                    prop_assert_eq!(at, len);
                    prop_assert_eq!(req.uri().path(), path.as_str());
                    prop_assert_eq!(req.headers().len(), values.len());
                }
                _ => prop_assert!(false, "a plain GET is served here"),
            }
        }
    }
}
