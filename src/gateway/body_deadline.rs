//! `limits.body_read_timeout`: a request body that must have arrived whole by a deadline. A
//! deadline for the whole body, not a timeout per read, which a client sending a byte every few
//! seconds would never trip.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http_body::{Body as HttpBody, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::time::{Instant, Sleep};

use crate::upstream::BoxError;

/// The error a body that missed its deadline ends with.
#[derive(Debug, thiserror::Error)]
#[error("the request body did not arrive within body_read_timeout")]
pub struct BodyTimedOut;

/// `inner`, failing with [`BodyTimedOut`] if it has not ended by its deadline; a frame read
/// ahead (see [`Deadline::first_frame`]) comes first.
pub struct Deadline<B> {
    inner: B,
    /// Until the body has ended.
    sleep: Option<Pin<Box<Sleep>>>,
    ahead: Option<Frame<Bytes>>,
    /// Set when the deadline passed: the request is the client's fault (408), not the
    /// upstream's.
    expired: Arc<AtomicBool>,
}

impl<B> Deadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub fn new(inner: B, deadline: Instant) -> Deadline<B> {
        let sleep = (!inner.is_end_stream()).then(|| Box::pin(tokio::time::sleep_until(deadline)));
        Deadline {
            inner,
            sleep,
            ahead: None,
            expired: Arc::default(),
        }
    }

    /// The flag that tells a missed deadline apart from other failures of the body.
    pub fn expired(&self) -> Arc<AtomicBool> {
        self.expired.clone()
    }

    /// Waits until the body has a first frame (or ends) and keeps it to yield first: an
    /// upstream request need not be opened for a client that sends a head and nothing else.
    pub async fn first_frame(&mut self) -> Result<(), BoxError> {
        if self.inner.is_end_stream() || self.ahead.is_some() {
            return Ok(());
        }
        match self.frame().await {
            Some(Ok(frame)) => self.ahead = Some(frame),
            Some(Err(e)) => return Err(e),
            None => {}
        }
        Ok(())
    }
}

impl<B> HttpBody for Deadline<B>
where
    B: HttpBody<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if let Some(frame) = this.ahead.take() {
            return Poll::Ready(Some(Ok(frame)));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(None) => {
                this.sleep = None;
                Poll::Ready(None)
            }
            Poll::Ready(Some(frame)) => Poll::Ready(Some(frame.map_err(Into::into))),
            Poll::Pending => {
                let passed = this
                    .sleep
                    .as_mut()
                    .is_some_and(|sleep| sleep.as_mut().poll(cx).is_ready());
                if !passed {
                    return Poll::Pending;
                }
                this.sleep = None;
                this.expired.store(true, Ordering::Release);
                Poll::Ready(Some(Err(BodyTimedOut.into())))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.ahead.is_none() && self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(data) = self.ahead.as_ref().and_then(Frame::data_ref) {
            let len = data.remaining() as u64;
            if let Some(upper) = hint.upper() {
                hint.set_upper(upper + len);
            }
            hint.set_lower(hint.lower() + len);
        }
        hint
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use std::convert::Infallible;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn a_body_that_trickles_past_its_deadline_fails_at_the_deadline() {
        let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(1);
        let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
            let chunk = rx.recv().await?;
            Some((Ok::<_, Infallible>(Frame::data(chunk)), rx))
        });
        let start = Instant::now();
        let mut body = Deadline::new(
            StreamBody::new(Box::pin(chunks)),
            start + Duration::from_secs(60),
        );
        let expired = body.expired();
        // A byte every 7 s: each read is quick, the whole body is not.
        let sender = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(7)).await;
                if tx.send(Bytes::from_static(b"x")).await.is_err() {
                    return;
                }
            }
        });
        body.first_frame().await.unwrap();
        let mut read = 0;
        let failed = loop {
            match body.frame().await {
                Some(Ok(_)) => read += 1,
                Some(Err(e)) => break e,
                None => panic!("the body ended"),
            }
        };
        assert!(failed.is::<BodyTimedOut>(), "{failed}");
        assert!(expired.load(Ordering::Acquire));
        assert_eq!(start.elapsed(), Duration::from_secs(60));
        // After the one read ahead (7 s), those of 14 s to 56 s were yielded.
        assert_eq!(read, 8);
        sender.abort();
    }

    #[tokio::test(start_paused = true)]
    async fn a_whole_body_keeps_no_timer_and_its_read_ahead_frame_comes_first() {
        let full = http_body_util::Full::new(Bytes::from_static(b"hello"));
        let mut body = Deadline::new(full, Instant::now() + Duration::from_secs(1));
        body.first_frame().await.unwrap();
        assert_eq!(body.size_hint().exact(), Some(5));
        let bytes = body.collect().await.unwrap().to_bytes();
        assert_eq!(bytes, "hello");
        let empty = Deadline::new(http_body_util::Empty::<Bytes>::new(), Instant::now());
        assert!(empty.sleep.is_none() && empty.is_end_stream());
    }
}
