//! What HTTP/2 connections get on top of hyper's own limits: a stream whose response makes no
//! progress for `write_timeout` is reset (flow control, not the socket, is what stalls an
//! HTTP/2 response), and a connection that floods PING or SETTINGS frames is closed.
//!
//! Send progress: hyper pipes a response body into its stream only while the stream has
//! flow-control capacity, in a task of the stream's own that it spawns through the connection's
//! executor. [`StreamExecutor`] wraps that task in a [`Watched`] future, and the response body
//! in a [`Tracked`] one; the body says when it has handed data over (or is ready to) and is
//! waiting to be asked for more, which hyper does only once the stream has window again. When
//! that wait outlasts the write timeout, the stream's task is dropped: h2 resets the stream
//! (`CANCEL`), and the response body, with the upstream request or the poll behind it, goes.
//! The body never says its end early, so the task lives until its last byte has left h2's send
//! buffer, and a client that never opens its window cannot park a whole answer there.
//!
//! Floods: [`FrameGuard`] follows the frame boundaries of what the client sends (the 9-byte
//! frame headers only; hyper and h2 parse the frames) and counts PING and SETTINGS frames that
//! ask for an answer against a per-connection budget that refills with time, as h2 itself bounds
//! reset streams; over it, the connection ends.

use std::cell::RefCell;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

use crate::upstream::{Body, BoxError};

/// What a stream's body tells the task it runs in.
#[derive(Default)]
struct Watch {
    /// The body has data out (or ready) and waits to be polled again: for stream capacity.
    waiting: AtomicBool,
    /// Counts the body's hand-overs, so a wait that began anew restarts the clock.
    handed: AtomicU64,
}

impl Watch {
    fn wait(&self) {
        self.handed.fetch_add(1, Ordering::Relaxed);
        self.waiting.store(true, Ordering::Relaxed);
    }
}

thread_local! {
    /// The watch of the stream task being polled on this thread, if it is one.
    static CURRENT: RefCell<Option<Arc<Watch>>> = const { RefCell::new(None) };
}

fn current() -> Option<Arc<Watch>> {
    CURRENT.with(|c| c.borrow().clone())
}

/// The executor of an HTTP/2 connection: spawns hyper's stream tasks, each under a watch.
#[derive(Clone)]
pub struct StreamExecutor {
    pub write_timeout: Duration,
}

impl<F> hyper::rt::Executor<F> for StreamExecutor
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        tokio::spawn(Watched {
            inner: Box::pin(fut),
            watch: Arc::default(),
            timeout: self.write_timeout,
            stalled: None,
            armed_at: 0,
        });
    }
}

/// A stream task that ends (its stream reset) once its body has waited for send capacity for
/// the whole write timeout.
struct Watched<F> {
    inner: Pin<Box<F>>,
    watch: Arc<Watch>,
    timeout: Duration,
    /// Running while the body waits; the hand-over it was started for.
    stalled: Option<Pin<Box<Sleep>>>,
    armed_at: u64,
}

impl<F: Future> Future for Watched<F> {
    type Output = ();

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = &mut *self;
        let previous = CURRENT.with(|c| c.replace(Some(this.watch.clone())));
        let done = this.inner.as_mut().poll(cx).is_ready();
        CURRENT.with(|c| *c.borrow_mut() = previous);
        if done {
            return Poll::Ready(());
        }
        if !this.watch.waiting.load(Ordering::Relaxed) {
            this.stalled = None;
            return Poll::Pending;
        }
        let handed = this.watch.handed.load(Ordering::Relaxed);
        let deadline = Instant::now() + this.timeout;
        match &mut this.stalled {
            Some(sleep) if this.armed_at == handed => {}
            Some(sleep) => sleep.as_mut().reset(deadline),
            None => this.stalled = Some(Box::pin(tokio::time::sleep_until(deadline))),
        }
        this.armed_at = handed;
        let Some(sleep) = this.stalled.as_mut() else {
            return Poll::Pending;
        };
        if sleep.as_mut().poll(cx).is_ready() {
            tracing::debug!(
                "HTTP/2 stream reset: the client gave it no window within the write timeout"
            );
            return Poll::Ready(());
        }
        Poll::Pending
    }
}

/// A response body on an HTTP/2 connection: reports its hand-overs to the stream's watch.
pub struct Tracked {
    inner: Body,
    watch: Option<Arc<Watch>>,
    /// Whether the body has yielded a frame: from then on its end is only said by `None`.
    started: bool,
}

impl Tracked {
    /// `inner`, about to be piped into its stream (called in the stream's task).
    pub fn new(inner: Body) -> Tracked {
        let watch = current();
        if let Some(watch) = &watch
            && !inner.is_end_stream()
        {
            // Waiting for the first capacity already.
            watch.wait();
        }
        Tracked {
            inner,
            watch,
            started: false,
        }
    }
}

impl HttpBody for Tracked {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(watch) = &this.watch {
            watch.waiting.store(false, Ordering::Relaxed);
        }
        let poll = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(_))) = &poll {
            this.started = true;
            if let Some(watch) = &this.watch {
                watch.wait();
            }
        }
        poll
    }

    fn is_end_stream(&self) -> bool {
        // Said up front only for an empty body: after data, the end waits for the window.
        !self.started && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// PING and SETTINGS frames (each asks for an answer) a connection may send at once...
const FLOOD_BURST: f64 = 100.0;
/// ...and per second after that.
const FLOOD_RATE: f64 = 10.0;

const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;
const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;
const ACK: u8 = 0x1;

/// A budget of frames that refills at [`FLOOD_RATE`] up to [`FLOOD_BURST`].
struct Budget {
    left: f64,
    at: Instant,
}

impl Budget {
    fn new() -> Budget {
        Budget {
            left: FLOOD_BURST,
            at: Instant::now(),
        }
    }

    fn take(&mut self) -> bool {
        let now = Instant::now();
        let refill = now.saturating_duration_since(self.at).as_secs_f64() * FLOOD_RATE;
        self.left = (self.left + refill).min(FLOOD_BURST);
        self.at = now;
        if self.left < 1.0 {
            return false;
        }
        self.left -= 1.0;
        true
    }
}

/// Where the reader is in the client's byte stream.
struct Frames {
    /// Preface bytes still to pass.
    preface: usize,
    header: [u8; FRAME_HEADER_LEN],
    /// Bytes of the current frame header seen.
    have: usize,
    /// Payload bytes of the current frame still to pass.
    payload: usize,
    pings: Budget,
    settings: Budget,
}

impl Frames {
    fn new() -> Frames {
        Frames {
            preface: PREFACE_LEN,
            header: [0; FRAME_HEADER_LEN],
            have: 0,
            payload: 0,
            pings: Budget::new(),
            settings: Budget::new(),
        }
    }

    /// Follows `bytes` (the next ones the client sent); an error once a budget is spent.
    fn scan(&mut self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            let skip = if self.preface > 0 {
                &mut self.preface
            } else {
                &mut self.payload
            };
            if *skip > 0 {
                let n = (*skip).min(bytes.len());
                *skip -= n;
                bytes = &bytes[n..];
                continue;
            }
            let n = (FRAME_HEADER_LEN - self.have).min(bytes.len());
            self.header[self.have..self.have + n].copy_from_slice(&bytes[..n]);
            self.have += n;
            bytes = &bytes[n..];
            if self.have == FRAME_HEADER_LEN {
                self.have = 0;
                self.frame()?;
            }
        }
        Ok(())
    }

    /// A whole frame header has been read.
    fn frame(&mut self) -> io::Result<()> {
        let h = &self.header;
        self.payload = usize::from(h[0]) << 16 | usize::from(h[1]) << 8 | usize::from(h[2]);
        let (kind, flags) = (h[3], h[4]);
        let allowed = match kind {
            _ if flags & ACK != 0 => true,
            PING => self.pings.take(),
            SETTINGS => self.settings.take(),
            _ => true,
        };
        if allowed {
            return Ok(());
        }
        let what = if kind == PING { "PING" } else { "SETTINGS" };
        tracing::debug!(frame = what, "HTTP/2 connection closed: frame flood");
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("more {what} frames than the per-connection budget"),
        ))
    }
}

/// An HTTP/2 connection's I/O that ends the connection on a PING or SETTINGS flood.
pub struct FrameGuard<S> {
    inner: S,
    frames: Box<Frames>,
}

impl<S> FrameGuard<S> {
    pub fn new(inner: S) -> FrameGuard<S> {
        FrameGuard {
            inner,
            frames: Box::new(Frames::new()),
        }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for FrameGuard<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        let before = buf.filled().len();
        let poll = Pin::new(&mut this.inner).poll_read(cx, buf);
        if let Poll::Ready(Ok(())) = poll {
            this.frames.scan(&buf.filled()[before..])?;
        }
        poll
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for FrameGuard<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, payload: &[u8]) -> Vec<u8> {
        let len = payload.len();
        let mut f = vec![
            (len >> 16) as u8,
            (len >> 8) as u8,
            len as u8,
            kind,
            flags,
            0,
            0,
            0,
            0,
        ];
        f.extend_from_slice(payload);
        f
    }

    #[tokio::test(start_paused = true)]
    async fn pings_beyond_the_budget_end_the_connection_and_the_budget_refills() {
        let ping = frame(PING, 0, &[7; 8]);
        let started = || {
            let mut frames = Frames::new();
            frames.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
            for _ in 0..100 {
                frames.scan(&ping).unwrap();
            }
            frames
        };
        let mut frames = started();
        // Acks and other frames are not counted; a payload that looks like a PING is skipped.
        for _ in 0..1000 {
            frames.scan(&frame(PING, ACK, &[0; 8])).unwrap();
            frames.scan(&frame(0x0, 0, &ping)).unwrap();
        }
        assert!(frames.scan(&ping).is_err());
        let mut frames = started();
        tokio::time::advance(Duration::from_secs(1)).await;
        // Ten per second come back (here sent a byte at a time).
        for _ in 0..10 {
            for b in &ping {
                frames.scan(std::slice::from_ref(b)).unwrap();
            }
        }
        assert!(frames.scan(&ping).is_err());
    }

    #[tokio::test(start_paused = true)]
    async fn settings_have_their_own_budget() {
        let mut frames = Frames::new();
        frames.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
        for _ in 0..100 {
            frames.scan(&frame(PING, 0, &[0; 8])).unwrap();
            frames.scan(&frame(SETTINGS, 0, &[])).unwrap();
        }
        frames.scan(&frame(SETTINGS, ACK, &[])).unwrap();
        assert!(frames.scan(&frame(SETTINGS, 0, &[])).is_err());
    }
}
