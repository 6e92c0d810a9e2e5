//! The HTTP/1.1 path of cleartext connections, built for held polls.
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

use crate::config::LimitsConfig;
use crate::hub::{Batch, ParkId, Parked, Topic};
use crate::service::{ConnInfo, Drain, Handler, HeldPoll, NoBody, Step};
use crate::upstream::Body;

/// First read buffer for a request head; doubled as needed up to `max_header_bytes`.
const HEAD_BUFFER: usize = 512;
const STATUS_OK: &[u8] = b"HTTP/1.1 200 OK\r\n";

/// A connection's socket, shared with the topic its poll is parked on.
pub struct Socket<P> {
    stream: TcpStream,
    slot: Mutex<Slot<P>>,
    /// Signalled when the slot needs the connection (not after an answer written in full).
    attention: Notify,
}

/// Where a connection's poll stands.
enum Slot<P> {
    Idle,
    Parked {
        ticket: u64,
        poll: P,
        /// The connection holds the client's next request already and no longer watches the
        /// socket: an answer written in place must wake it.
        pipelined: bool,
    },
    /// The topic changed otherwise: the poll looks again.
    Woken(P),
    /// The publisher wrote the whole answer.
    Answered,
    /// The publisher wrote the whole answer, which closes the connection (the server drains).
    Closing,
    /// The publisher wrote the start of the answer (or none of it): the rest, and whether the
    /// connection closes after it.
    Unwritten(Vec<u8>, bool),
    /// The publisher's write failed: the connection is done.
    Broken,
}

impl<P: HeldPoll> Socket<P> {
    /// Read readiness, registered in the socket itself (only the connection's task waits
    /// for it), so the waiting future is a reference.
    fn read_ready(&self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(|cx| self.stream.poll_read_ready(cx))
    }

    fn write_ready(&self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(|cx| self.stream.poll_write_ready(cx))
    }

    fn lock(&self) -> MutexGuard<'_, Slot<P>> {
        self.slot.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes the slot's poll if it is parked for `ticket`.
    fn take_parked(slot: &mut Slot<P>, ticket: u64) -> Option<P> {
        match mem::replace(slot, Slot::Idle) {
            Slot::Parked {
                ticket: t, poll, ..
            } if t == ticket => Some(poll),
            other => {
                *slot = other;
                None
            }
        }
    }
}

impl<P: HeldPoll> Parked for Socket<P> {
    fn deliver(&self, ticket: u64, batch: &Arc<Batch>) {
        let mut slot = self.lock();
        let pipelined = matches!(
            *slot,
            Slot::Parked {
                pipelined: true,
                ..
            }
        );
        let Some(poll) = Socket::take_parked(&mut slot, ticket) else {
            return;
        };
        let tail = batch
            .encoded
            .get_or_init(|| batch_tail(&poll.batch_answer(batch), batch));
        let mut own = HeaderMap::new();
        poll.own_headers(&mut own);
        let mut extra = Vec::new();
        header_lines(&own, &mut extra);
        // While the server drains, the connection closes after its answer (as hyper's do).
        let close = poll.draining();
        if close {
            extra.extend_from_slice(b"connection: close\r\n");
        }
        let written = with_date(|date| write_now(&self.stream, &[STATUS_OK, date, &extra, tail]));
        let answered = written.is_ok();
        *slot = match written {
            Ok(None) if close => Slot::Closing,
            Ok(None) => Slot::Answered,
            Ok(Some(rest)) => Slot::Unwritten(rest, close),
            Err(_) => Slot::Broken,
        };
        if pipelined || close || !matches!(*slot, Slot::Answered) {
            self.attention.notify_one();
        }
        drop(slot);
        if answered {
            poll.delivered(batch);
        } else {
            // Not answered: dropped, the poll counts as its client gone.
            drop(poll);
        }
    }

    fn wake(&self, ticket: u64) {
        let mut slot = self.lock();
        if let Some(poll) = Socket::take_parked(&mut slot, ticket) {
            *slot = Slot::Woken(poll);
            self.attention.notify_one();
        }
    }
}

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
        if !matches!(written, Ok(Keep::Open)) {
            return End::Closed;
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
                    return Head::Closed;
                }
            }
            () = tokio::time::sleep_until(deadline) => return Head::Closed,
            () = drain.begun(), if buf.is_empty() => return Head::Closed,
        }
        let spare = if buf.is_empty() {
            HEAD_BUFFER
        } else {
            buf.len()
        };
        buf.reserve(spare);
        match socket.stream.try_read_buf(buf) {
            Ok(0) => return Head::Closed,
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Head::Closed,
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
                return Held::Closed;
            }
            Woke::Answered => return Held::Written,
            Woke::Closing | Woke::Broken => return Held::Closed,
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

/// The slot's poll after a look at its topic.
enum Park {
    Answer(Response<Body>),
    /// The topic changed meanwhile: look again.
    Again,
    /// Parked until the deadline.
    Parked(ParkedAt, Instant),
    /// The slot held no poll to look at.
    Lost,
}

/// A poll's place in its topic's parked list, given up when dropped (a no-op once a change
/// took it), however the wait ends. (A weak reference: an answered connection waiting for its
/// client's next request does not keep a removed topic's buffer alive.)
struct ParkedAt {
    topic: std::sync::Weak<Topic>,
    id: ParkId,
}

impl Drop for ParkedAt {
    fn drop(&mut self) {
        if let Some(topic) = self.topic.upgrade() {
            topic.unpark(self.id);
        }
    }
}

/// Clears the socket's slot when the connection ends, however it ends: a poll left there
/// would keep its subscription (and the socket would keep its topic) alive.
struct ClearSlot<P: HeldPoll>(Arc<Socket<P>>);

impl<P: HeldPoll> Drop for ClearSlot<P> {
    fn drop(&mut self) {
        let poll = mem::replace(&mut *self.0.lock(), Slot::Idle);
        drop(poll);
    }
}

impl<P: HeldPoll> Socket<P> {
    fn start(&self, step: Step<P>) -> Then {
        match step {
            Step::Done(resp) => Then::Answer(Box::pin(std::future::ready(resp))),
            Step::Pending(pending) => Then::Answer(pending),
            Step::Poll(poll) => {
                *self.lock() = Slot::Woken(poll);
                Then::Hold
            }
        }
    }

    /// Looks at the topic for the slot's poll (which must be `Woken`), and parks it there
    /// when there is nothing to answer yet.
    fn park(self: &Arc<Self>, ticket: &mut u64, pipelined: bool) -> Park {
        let mut poll = match mem::replace(&mut *self.lock(), Slot::Idle) {
            Slot::Woken(poll) => poll,
            // Nothing else is ever left for this look; should it be, the connection ends.
            _ => return Park::Lost,
        };
        let generation = match poll.look() {
            Ok(resp) => return Park::Answer(resp),
            Err(generation) => generation,
        };
        let deadline = poll.deadline();
        let topic = poll.topic().clone();
        *ticket += 1;
        *self.lock() = Slot::Parked {
            ticket: *ticket,
            poll,
            pipelined,
        };
        match topic.park(generation, self.clone(), *ticket) {
            Some(id) => {
                let topic = Arc::downgrade(&topic);
                Park::Parked(ParkedAt { topic, id }, deadline)
            }
            None => {
                let mut slot = self.lock();
                if let Some(poll) = Socket::take_parked(&mut slot, *ticket) {
                    *slot = Slot::Woken(poll);
                }
                Park::Again
            }
        }
    }
}

/// Why a parked poll's connection woke up.
enum Woke<P> {
    /// The topic changed otherwise: the poll (in the slot, `Woken`) looks again.
    Again,
    /// The hold (or the drain's moment) is over: the poll, taken back.
    Expired(P),
    /// The client closed: the poll, taken back.
    Gone(P),
    Answered,
    Closing,
    Unwritten(Vec<u8>, bool),
    Broken,
}

/// Waits until the parked poll is answered, woken, over, or its client gone. Bytes the client
/// sends meanwhile (its next request, pipelined) are kept in `buf`.
async fn wait_parked<P: HeldPoll>(
    socket: &Socket<P>,
    ticket: u64,
    deadline: Instant,
    buf: &mut Vec<u8>,
    drain: &Drain,
) -> Woke<P> {
    let sleep = tokio::time::sleep_until(deadline);
    let mut sleep = std::pin::pin!(sleep);
    let mut reading = buf.is_empty();
    let mut drained = drain.is_draining();
    loop {
        let (mut expired, mut gone) = (false, false);
        tokio::select! {
            () = socket.attention.notified() => {}
            () = sleep.as_mut() => expired = true,
            r = socket.read_ready(), if reading => {
                gone = r.is_err();
                if !gone {
                    buf.reserve(HEAD_BUFFER);
                    match socket.stream.try_read_buf(buf) {
                        Ok(0) => gone = true,
                        Ok(_) => {
                            reading = false;
                            if let Slot::Parked { pipelined, .. } = &mut *socket.lock() {
                                *pipelined = true;
                            }
                        }
                        Err(e) => gone = e.kind() != io::ErrorKind::WouldBlock,
                    }
                }
            }
            // The drain answers parked polls through their topics; this only ends a
            // connection whose answer was written in place meanwhile.
            () = drain.begun(), if !drained => drained = true,
        }
        let mut slot = socket.lock();
        if let Slot::Parked { .. } = &*slot {
            // Taken back under the lock, so a publisher holding the topic's list finds it gone.
            if gone || expired {
                return match (Socket::take_parked(&mut slot, ticket), gone) {
                    (Some(poll), true) => Woke::Gone(poll),
                    (Some(poll), false) => Woke::Expired(poll),
                    // Parked under another ticket: not this wait's poll.
                    (None, _) => Woke::Broken,
                };
            }
            continue;
        }
        if let Slot::Woken(_) = &*slot {
            return Woke::Again;
        }
        return match mem::replace(&mut *slot, Slot::Idle) {
            Slot::Answered => Woke::Answered,
            Slot::Closing => Woke::Closing,
            Slot::Unwritten(rest, close) => Woke::Unwritten(rest, close),
            _ => Woke::Broken,
        };
    }
}

/// Writes `parts` now if the socket takes them: `None` when all was written, else the rest.
///
/// Written to the socket directly, past tokio's readiness bookkeeping (which costs a cache miss
/// per socket in a fan-out): a full socket only means that the connection's own next wait for
/// write readiness returns once at once, finds the socket still full, and waits properly.
fn write_now(stream: &TcpStream, parts: &[&[u8]; 4]) -> io::Result<Option<Vec<u8>>> {
    let slices = parts.map(IoSlice::new);
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let written = match socket2::SockRef::from(stream).send_vectored(&slices) {
        Ok(n) => n,
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Err(e) => return Err(e),
    };
    if written == total {
        return Ok(None);
    }
    Ok(Some(parts.concat().split_off(written)))
}

/// Writes all of `bufs`; a write blocked for `timeout` fails.
async fn write_all<P: HeldPoll>(
    socket: &Socket<P>,
    bufs: &mut [IoSlice<'_>],
    timeout: Duration,
) -> io::Result<()> {
    let mut bufs = bufs;
    IoSlice::advance_slices(&mut bufs, 0);
    while !bufs.is_empty() {
        match socket.stream.try_write_vectored(bufs) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut bufs, n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                tokio::time::timeout(timeout, socket.write_ready())
                    .await
                    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))??;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Whether a connection goes on after a response.
enum Keep {
    Open,
    Close,
}

/// Awaits and writes a response; it closes the connection when it says so or the server drains.
/// While the answer is awaited (an authorization decision, then a poll's whole hold), the
/// client is watched: if it closes, the answer is dropped (its poll counts as its client gone).
async fn respond<P: HeldPoll>(
    socket: &Socket<P>,
    answer: Answer,
    buf: &mut Vec<u8>,
    drain: &Drain,
    timeout: Duration,
) -> io::Result<Keep> {
    let mut answer = answer;
    let mut reading = buf.is_empty();
    let resp = loop {
        tokio::select! {
            resp = &mut answer => break resp,
            r = socket.read_ready(), if reading => {
                let gone = match r {
                    Err(_) => true,
                    Ok(()) => {
                        buf.reserve(HEAD_BUFFER);
                        match socket.stream.try_read_buf(buf) {
                            Ok(0) => true,
                            // The client's next request, pipelined: kept for later.
                            Ok(_) => {
                                reading = false;
                                false
                            }
                            Err(e) => e.kind() != io::ErrorKind::WouldBlock,
                        }
                    }
                };
                if gone {
                    return Ok(Keep::Close);
                }
            }
        }
    };
    let close = drain.is_draining() || says_close(resp.headers());
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.map_err(io::Error::other)?.to_bytes();
    let mut head = Vec::with_capacity(256);
    head.extend_from_slice(b"HTTP/1.1 ");
    head.extend_from_slice(parts.status.as_str().as_bytes());
    head.put_u8(b' ');
    head.extend_from_slice(parts.status.canonical_reason().unwrap_or("").as_bytes());
    head.extend_from_slice(b"\r\n");
    with_date(|date| head.extend_from_slice(date));
    header_lines(&parts.headers, &mut head);
    if close && !parts.headers.contains_key(header::CONNECTION) {
        head.extend_from_slice(b"connection: close\r\n");
    }
    // Statuses without a body (RFC 9110 6.4.1): none is written, whatever the response held.
    let no_body = parts.status == StatusCode::NO_CONTENT
        || parts.status == StatusCode::NOT_MODIFIED
        || parts.status.is_informational();
    let body = if no_body { Bytes::new() } else { body };
    if !no_body {
        content_length(body.len(), &mut head);
    }
    head.extend_from_slice(b"\r\n");
    let bufs = &mut [IoSlice::new(&head), IoSlice::new(&body)];
    write_all(socket, bufs, timeout).await?;
    Ok(if close { Keep::Close } else { Keep::Open })
}

/// Whether a response closes its connection (`close` among its `Connection` options).
fn says_close(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.as_bytes()
            .split(|&b| b == b',')
            .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"close"))
    })
}

/// A batch's answer after its status and date lines: headers, then the body.
fn batch_tail(resp: &Response<Body>, batch: &Batch) -> Bytes {
    let mut out = Vec::with_capacity(160 + batch.body.len());
    header_lines(resp.headers(), &mut out);
    content_length(batch.body.len(), &mut out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&batch.body);
    out.into()
}

fn header_lines(headers: &HeaderMap, out: &mut Vec<u8>) {
    for (name, value) in headers {
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

fn content_length(len: usize, out: &mut Vec<u8>) {
    out.extend_from_slice(b"content-length: ");
    out.extend_from_slice(len.to_string().as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Calls `f` with this second's `date` header line (formatted once per second and thread).
fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
    thread_local! {
        static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    DATE.with_borrow_mut(|(at, line)| {
        if *at != second {
            *at = second;
            line.clear();
            line.extend_from_slice(b"date: ");
            line.extend_from_slice(httpdate::fmt_http_date(now).as_bytes());
            line.extend_from_slice(b"\r\n");
        }
        f(line)
    })
}

/// The connection, handed to hyper: the bytes read so far come first.
pub struct Handoff<P: HeldPoll> {
    socket: Arc<Socket<P>>,
    read: Bytes,
}

impl<P: HeldPoll> Handoff<P> {
    fn new(socket: Arc<Socket<P>>, read: Vec<u8>) -> Handoff<P> {
        Handoff {
            socket,
            read: read.into(),
        }
    }

    fn stream(&self) -> &TcpStream {
        &self.socket.stream
    }
}

impl<P: HeldPoll> AsyncRead for Handoff<P> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.read.is_empty() {
            let n = self.read.len().min(buf.remaining());
            buf.put_slice(&self.read.split_to(n));
            return Poll::Ready(Ok(()));
        }
        loop {
            ready!(self.stream().poll_read_ready(cx))?;
            match self.stream().try_read_buf(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r.map(drop)),
            }
        }
    }
}

impl<P: HeldPoll> AsyncWrite for Handoff<P> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream().poll_write_ready(cx))?;
            match self.stream().try_write(buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        loop {
            ready!(self.stream().poll_write_ready(cx))?;
            match self.stream().try_write_vectored(bufs) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                r => return Poll::Ready(r),
            }
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        let sock = socket2::SockRef::from(self.stream());
        Poll::Ready(sock.shutdown(std::net::Shutdown::Write))
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
