//! The contract between connections (`server`) and what answers their requests (`gateway`,
//! `admin`): a [`Handler`] takes a request with what is known of its connection and returns
//! its answer, or, for a long-poll, a [`HeldPoll`] that the connection itself waits on.
//!
//! Neither side knows the other: the server drives any `Handler`, the gateway is one. So the
//! server never names a route, a CORS rule or a problem type, and the gateway never names a
//! socket.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, Response};

use tokio_util::sync::{CancellationToken, WaitForCancellationFuture};

use crate::hub::{Batch, Topic};
use crate::upstream::{Body, BoxError};

/// The server's drain: one value, begun once on shutdown and passed down to everything that
/// must answer it (as mini-redis passes its `Shutdown`). Accept loops stop, idle connections
/// close, held polls answer within `drain_window`, collapse waiters get 503, and `/readyz`
/// says "draining". Clones are the same drain.
#[derive(Clone, Debug, Default)]
pub struct Drain(CancellationToken);

impl Drain {
    /// Begins the drain (again is a no-op).
    pub fn begin(&self) {
        self.0.cancel();
    }

    /// Whether the drain has begun (a cheap load, for code that checks before it waits).
    pub fn is_draining(&self) -> bool {
        self.0.is_cancelled()
    }

    /// Resolves once the drain has begun.
    pub fn begun(&self) -> WaitForCancellationFuture<'_> {
        self.0.cancelled()
    }
}

/// What the handler knows of the connection a request came on.
#[derive(Debug, Clone, Copy)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// Whether the client connected over TLS (sets `X-Forwarded-Proto`).
    pub tls: bool,
}

/// A client request's body: hyper's, or none at all (a request read without hyper).
pub trait ClientBody:
    hyper::body::Body<Data = Bytes, Error: Into<BoxError>> + Send + Sync + 'static
{
}

impl<B> ClientBody for B
where
    B: hyper::body::Body<Data = Bytes> + Send + Sync + 'static,
    B::Error: Into<BoxError>,
{
}

/// The body of a request read without hyper: it has none.
pub type NoBody = http_body_util::Empty<Bytes>;

/// A request handler served on a listener.
pub trait Handler: Send + Sync + 'static {
    /// Whether cleartext HTTP/1.1 connections take the held-poll path (`server::h1`) first.
    const HOLDS_POLLS: bool = false;

    /// A poll this handler prepares for the connection to wait on.
    type Held: HeldPoll;

    /// The returned future is what hyper keeps while a request is pending (for a held poll,
    /// for its whole hold): implementations do their synchronous work before returning it and
    /// move into it only what the wait needs, never the request.
    fn call<B: ClientBody>(
        self: &Arc<Self>,
        req: Request<B>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send + 'static + use<Self, B>;

    /// A plain HTTP/1.1 GET that a connection may serve without hyper (see `server::h1`):
    /// `Some` when it is for a route that holds polls, prepared as `call` would; `None`, with
    /// nothing done, leaves it to hyper.
    fn prepare_held(
        self: &Arc<Self>,
        req: Request<NoBody>,
        conn: ConnInfo,
    ) -> Option<Step<Self::Held>> {
        let _ = (req, conn);
        None
    }
}

/// A request after its synchronous part: answered, or what is left to await.
pub enum Step<P> {
    Done(Response<Body>),
    /// A proxied request, a collapse waiter, or a poll waiting for its authorization.
    Pending(Pin<Box<dyn Future<Output = Response<Body>> + Send>>),
    /// A poll that passed every check and waits on its topic.
    Poll(P),
}

/// A poll that passed every check, as the connection that waits for it sees it: it looks for
/// an answer, parks with its topic until the topic changes, answers at its deadline, and when
/// the topic's publisher writes a batch into the socket itself, says what that answer carries
/// and counts it. Every answer it returns is already counted in the route's metrics.
pub trait HeldPoll: Send + 'static {
    /// The answer if there is one now, else the topic generation to park at
    /// (see [`Topic::park`]).
    fn look(&mut self) -> Result<Response<Body>, u64>;

    /// When the poll must answer with [`HeldPoll::expire`].
    fn deadline(&self) -> tokio::time::Instant;

    /// The answer at the deadline.
    fn expire(&mut self) -> Response<Body>;

    /// The topic to park with.
    fn topic(&self) -> &Arc<Topic>;

    /// The answer every reader of `batch` gets, the same whichever poll is asked, before what
    /// only this poll's answer carries ([`HeldPoll::own_headers`]): the connection path asks
    /// the first poll it writes `batch` to, and encodes it once for all of them.
    fn batch_answer(&self, batch: &Batch) -> Response<Body>;

    /// Headers only this poll's answer carries (those for its client's origin).
    fn own_headers(&self, headers: &mut HeaderMap);

    /// Whether the server drains (answers then close their HTTP/1.1 connections).
    fn draining(&self) -> bool;

    /// Counts the poll as answered with `batch`, written by its topic's publisher.
    fn delivered(self, batch: &Batch)
    where
        Self: Sized;
}

/// The held polls of a handler that holds none (`Handler::HOLDS_POLLS` false): there is no
/// such value.
pub enum NoHeldPolls {}

impl HeldPoll for NoHeldPolls {
    fn look(&mut self) -> Result<Response<Body>, u64> {
        match *self {}
    }

    fn deadline(&self) -> tokio::time::Instant {
        match *self {}
    }

    fn expire(&mut self) -> Response<Body> {
        match *self {}
    }

    fn topic(&self) -> &Arc<Topic> {
        match *self {}
    }

    fn batch_answer(&self, _: &Batch) -> Response<Body> {
        match *self {}
    }

    fn own_headers(&self, _: &mut HeaderMap) {
        match *self {}
    }

    fn draining(&self) -> bool {
        match *self {}
    }

    fn delivered(self, _: &Batch) {
        match self {}
    }
}
