//! Poll answers: a `Batch`, encoded once per (topic, position) and shared by every reader there.

use std::sync::{Arc, OnceLock};
use tokio::time::Instant;

use bytes::{BufMut, Bytes, BytesMut};

use super::topic::{State, Topic};

/// A response batch stops growing past about this many bytes (docs/protocol.md 1.3).
pub const BATCH_BYTES_MAX: usize = 1 << 20;
/// What a batch's body starts with: its cursor follows.
const CURSOR_HEAD: &[u8] = b"{\"cursor\":\"";

/// An encoded poll response body, shared by every reader at the same position.
#[derive(Debug)]
pub struct Batch {
    pub body: Bytes,
    /// The cursor the body names (URL-safe ASCII): a slice of `body`, so an answer's
    /// `Poll-Cursor` header shares it rather than copying it.
    pub cursor: Bytes,
    pub messages: usize,
    /// Arrival of the oldest message in the batch (delivery latency).
    pub oldest: Instant,
    pub gap: bool,
    /// The batch's answer as a connection path writes it for parked readers, encoded once by
    /// the first that writes it (opaque to the hub: the server's HTTP/1.1 path keeps its
    /// headers and body there).
    pub encoded: OnceLock<Bytes>,
    from: u64,
    head: u64,
}

impl Topic {
    /// The encoded batch `from+1 ..= to`, from the cache when another reader asked first.
    pub(super) fn encode(
        &self,
        st: &mut State,
        from: u64,
        to: u64,
        more: bool,
        gap: bool,
    ) -> Arc<Batch> {
        let head = st.ring.head();
        if let Some(b) = &st.cache
            && b.from == from
            && b.head == head
            && b.gap == gap
        {
            return b.clone();
        }
        let cursor = self.cursor(st.epoch, to);
        let mut body = BytesMut::with_capacity(64 + cursor.len());
        body.put_slice(CURSOR_HEAD);
        body.put_slice(cursor.as_bytes());
        body.put_slice(b"\",\"messages\":[");
        let mut oldest = None;
        let mut messages = 0;
        for (i, e) in st.ring.entries(from, to).enumerate() {
            if i > 0 {
                body.put_u8(b',');
            }
            body.put_slice(&e.json);
            oldest.get_or_insert(e.arrived);
            messages += 1;
        }
        body.put_slice(if more {
            b"],\"more\":true"
        } else {
            b"],\"more\":false"
        });
        if gap {
            body.put_slice(b",\"gap\":true");
        }
        body.put_u8(b'}');
        let body = body.freeze();
        let batch = Arc::new(Batch {
            cursor: body.slice(CURSOR_HEAD.len()..CURSOR_HEAD.len() + cursor.len()),
            body,
            messages,
            oldest: oldest.unwrap_or_else(Instant::now),
            gap,
            encoded: OnceLock::new(),
            from,
            head,
        });
        st.cache = Some(batch.clone());
        batch
    }
}
