//! The socket a cleartext HTTP/1.1 connection shares with the topic its poll is parked on, and
//! everything written onto it: the slot that says where the poll stands, parking and waking,
//! the publisher's write of an answer straight into the socket ([`Parked::deliver`]), the
//! connection's own writes under the write timeout, and the HTTP/1.1 encoding of answers.

use super::*;

/// A connection's socket, shared with the topic its poll is parked on.
pub struct Socket<P> {
    pub(super) stream: TcpStream,
    pub(super) slot: Mutex<Slot<P>>,
    /// Signalled when the slot needs the connection (not after an answer written in full).
    pub(super) attention: Notify,
}

/// Where a connection's poll stands.
pub(super) enum Slot<P> {
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
    pub(super) fn read_ready(&self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(|cx| self.stream.poll_read_ready(cx))
    }

    pub(super) fn write_ready(&self) -> impl Future<Output = io::Result<()>> + '_ {
        std::future::poll_fn(|cx| self.stream.poll_write_ready(cx))
    }

    pub(super) fn lock(&self) -> MutexGuard<'_, Slot<P>> {
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

/// The slot's poll after a look at its topic.
pub(super) enum Park {
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
pub(super) struct ParkedAt {
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
pub(super) struct ClearSlot<P: HeldPoll>(pub(super) Arc<Socket<P>>);

impl<P: HeldPoll> Drop for ClearSlot<P> {
    fn drop(&mut self) {
        let poll = mem::replace(&mut *self.0.lock(), Slot::Idle);
        drop(poll);
    }
}

impl<P: HeldPoll> Socket<P> {
    pub(super) fn start(&self, step: Step<P>) -> Then {
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
    pub(super) fn park(self: &Arc<Self>, ticket: &mut u64, pipelined: bool) -> Park {
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
pub(super) enum Woke<P> {
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
pub(super) async fn wait_parked<P: HeldPoll>(
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
pub(super) fn write_now(stream: &TcpStream, parts: &[&[u8]; 4]) -> io::Result<Option<Vec<u8>>> {
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
pub(super) async fn write_all<P: HeldPoll>(
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
pub(super) enum Keep {
    Open,
    Close,
}

/// Awaits and writes a response; it closes the connection when it says so or the server drains.
/// While the answer is awaited (an authorization decision, then a poll's whole hold), the
/// client is watched: if it closes, the answer is dropped (its poll counts as its client gone).
pub(super) async fn respond<P: HeldPoll>(
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
pub(super) fn batch_tail(resp: &Response<Body>, batch: &Batch) -> Bytes {
    let mut out = Vec::with_capacity(160 + batch.body.len());
    header_lines(resp.headers(), &mut out);
    content_length(batch.body.len(), &mut out);
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(&batch.body);
    out.into()
}

pub(super) fn header_lines(headers: &HeaderMap, out: &mut Vec<u8>) {
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
pub(super) fn with_date<R>(f: impl FnOnce(&[u8]) -> R) -> R {
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
