//! The socket a cleartext HTTP/1.1 connection shares with the topic its poll is parked on: the
//! slot that says where the poll stands, parking and waking, and the publisher's write of an
//! answer straight into the socket ([`Parked::deliver`]).

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
