//! An incremental, limit-checked `text/event-stream` decoder (WHATWG HTML, "server-sent events"):
//! CR, LF and CRLF line ends (a CRLF split across chunks counts once), `data:` lines joined by
//! `\n`, `id:`, `event:`, `retry:`, comments. Bytes arrive in arbitrary chunks; events come out
//! exactly as if the stream had been decoded whole.

/// One dispatched event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    /// The event's own non-empty `id:`, which identifies it; an event without one has `None`
    /// (the stream's id in force, for resuming, is [`Decoder::last_id`]).
    pub id: Option<String>,
    pub event: Option<String>,
    /// The data, or `None` for an event whose data exceeded the limit (it was skipped; the
    /// stream goes on, and the source records a gap).
    pub data: Option<String>,
}

/// Why a stream cannot be decoded further; the source reconnects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("the stream is not UTF-8")]
    NotUtf8,
}

#[derive(Debug)]
pub struct Decoder {
    line: Vec<u8>,
    /// The current line went over the limit: its bytes are dropped and its event is oversized.
    line_too_long: bool,
    /// The previous chunk ended in CR: an LF starting the next one belongs to it.
    after_cr: bool,
    data: String,
    has_data: bool,
    /// The current event's data went over the limit: it is being skipped.
    oversized: bool,
    event: Option<String>,
    /// The stream's last event id in force (set when an event is dispatched): what a reconnect
    /// resumes from. An empty `id:` clears it.
    last_id: Option<String>,
    /// The `id:` of the event being read, until it is dispatched: `Some("")` clears.
    pending_id: Option<String>,
    /// Events dispatched without an id of their own since `last_id` was set.
    since_id: u64,
    retry_ms: Option<u64>,
    max_line: usize,
    max_event: usize,
}

impl Decoder {
    pub fn new(max_line: usize, max_event: usize) -> Decoder {
        Decoder {
            line: Vec::new(),
            line_too_long: false,
            after_cr: false,
            data: String::new(),
            has_data: false,
            oversized: false,
            event: None,
            last_id: None,
            pending_id: None,
            since_id: 0,
            retry_ms: None,
            max_line,
            max_event,
        }
    }

    /// A decoder for a stream resumed after `last_id` (the `Last-Event-ID` it was asked with):
    /// events without an id of their own get the same ids as when the stream first sent them.
    pub fn resuming(max_line: usize, max_event: usize, last_id: Option<String>) -> Decoder {
        Decoder {
            last_id,
            ..Decoder::new(max_line, max_event)
        }
    }

    /// The id to resume from (`Last-Event-ID`).
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    /// The reconnection delay the stream asked for (`retry:`), in milliseconds.
    pub fn retry_ms(&self) -> Option<u64> {
        self.retry_ms
    }

    /// Decodes a chunk; complete events are pushed to `out`.
    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        for &b in chunk {
            match b {
                b'\n' if self.after_cr => self.after_cr = false,
                b'\r' | b'\n' => {
                    self.after_cr = b == b'\r';
                    if std::mem::take(&mut self.line_too_long) {
                        // Whatever field it was, the event it belongs to cannot be trusted.
                        self.line.clear();
                        self.oversized = true;
                        self.has_data = true;
                        continue;
                    }
                    let line = std::mem::take(&mut self.line);
                    self.process_line(&line, out)?;
                }
                _ => {
                    self.after_cr = false;
                    if self.line.len() >= self.max_line {
                        self.line_too_long = true;
                    } else {
                        self.line.push(b);
                    }
                }
            }
        }
        Ok(())
    }

    fn process_line(&mut self, line: &[u8], out: &mut Vec<Event>) -> Result<(), SseError> {
        if line.is_empty() {
            self.dispatch(out);
            return Ok(());
        }
        let line = std::str::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.starts_with(':') {
            return Ok(());
        }
        let (field, value) = match line.split_once(':') {
            Some((f, v)) => (f, v.strip_prefix(' ').unwrap_or(v)),
            None => (line, ""),
        };
        match field {
            "data" => {
                if self.oversized || self.data.len() + value.len() + 1 > self.max_event {
                    self.oversized = true;
                    self.data.clear();
                } else {
                    if self.has_data {
                        self.data.push('\n');
                    }
                    self.data.push_str(value);
                }
                self.has_data = true;
            }
            "event" => self.event = Some(value.to_owned()),
            "id" if !value.contains('\0') => self.pending_id = Some(value.to_owned()),
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        let event = self.event.take();
        // The id in force moves when its event is complete: a stream cut inside an event
        // resumes before it, so the event is not lost.
        let own_id = match self.pending_id.take() {
            Some(id) if id.is_empty() => {
                self.last_id = None;
                self.since_id = 0;
                None
            }
            Some(id) => {
                self.last_id = Some(id.clone());
                self.since_id = 0;
                Some(id)
            }
            None => None,
        };
        if !self.has_data {
            return;
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        out.push(Event {
            // An event's own `id:` identifies it. One without is another message than the
            // event whose id is in force (given that id, the topic would drop it as a repeat):
            // it is the n-th after it, `ID#n`, which a resumed stream that sends it again
            // gives it too, so a replay is recognised.
            id: own_id.or_else(|| {
                let last = self.last_id.as_ref()?;
                self.since_id += 1;
                Some(format!("{last}#{}", self.since_id))
            }),
            event,
            data: (!std::mem::take(&mut self.oversized)).then_some(data),
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(chunks: &[&[u8]]) -> Result<Vec<Event>, SseError> {
        let mut d = Decoder::new(1024, 4096);
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn fields_and_line_ends() {
        let stream =
            b": comment\r\nid: 1\r\nevent: update\r\ndata: a\rdata:b\n\ndata: only\n\nid: 2\n\n";
        let events = decode(&[stream]).unwrap();
        assert_eq!(
            events,
            [
                Event {
                    id: Some("1".into()),
                    event: Some("update".into()),
                    data: Some("a\nb".into())
                },
                Event {
                    id: Some("1#1".into()),
                    event: None,
                    data: Some("only".into())
                },
            ]
        );
        let mut d = Decoder::new(1024, 4096);
        d.feed(stream, &mut Vec::new()).unwrap();
        assert_eq!(d.last_id(), Some("2"));
    }

    /// Events without an id of their own are numbered after the id in force, the same way
    /// when a resumed stream sends them again; an empty `id:` clears the id in force; a stream
    /// cut inside an event resumes before it.
    #[test]
    fn ids_of_events_without_one_survive_a_replay() {
        let first = b"id: 1\ndata: a\n\ndata: b\n\ndata: c\n\n";
        let ids = |d: &mut Decoder, bytes: &[u8]| {
            let mut out = Vec::new();
            d.feed(bytes, &mut out).unwrap();
            out.into_iter().map(|e| e.id).collect::<Vec<_>>()
        };
        let mut d = Decoder::new(1024, 4096);
        let some = |s: &str| Some(s.to_owned());
        assert_eq!(ids(&mut d, first), [some("1"), some("1#1"), some("1#2")]);
        // Reconnected with `Last-Event-ID: 1`, the upstream replays b and c.
        let mut resumed = Decoder::resuming(1024, 4096, d.last_id().map(str::to_owned));
        assert_eq!(
            ids(&mut resumed, b"data: b\n\ndata: c\n\n"),
            [some("1#1"), some("1#2")]
        );
        // An empty id clears the id in force: nothing to resume from.
        assert_eq!(ids(&mut d, b"id:\ndata: d\n\n"), [None]);
        assert_eq!(d.last_id(), None);
        // An id whose event has not ended is not in force yet.
        let mut cut = Decoder::new(1024, 4096);
        ids(&mut cut, b"id: 1\ndata: a\n\nid: 2\ndata: b");
        assert_eq!(cut.last_id(), Some("1"));
    }

    #[test]
    fn retry_and_limits() {
        let mut d = Decoder::new(16, 8);
        d.feed(b"retry: 1500\nretry: x\n", &mut Vec::new()).unwrap();
        assert_eq!(d.retry_ms(), Some(1500));
        let mut out = Vec::new();
        let mut long = b"data: ".to_vec();
        long.extend_from_slice(&[b'a'; 40]);
        long.extend_from_slice(b"\n\ndata: next\n\n");
        Decoder::new(16, 64).feed(&long, &mut out).unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].data, None);
        assert_eq!(out[1].data.as_deref(), Some("next"));
        let mut out = Vec::new();
        Decoder::new(64, 8)
            .feed(b"id: 7\ndata: 123456789\n\ndata: ok\n\n", &mut out)
            .unwrap();
        assert_eq!(out.len(), 2);
        assert_eq!(
            (out[0].id.as_deref(), out[0].data.as_deref()),
            (Some("7"), None)
        );
        assert_eq!(out[1].data.as_deref(), Some("ok"));
        assert_eq!(
            Decoder::new(64, 64).feed(b"data: \xff\n", &mut Vec::new()),
            Err(SseError::NotUtf8)
        );
    }

    #[test]
    fn crlf_split_across_chunks_counts_once() {
        let events = decode(&[b"data: x\r", b"\n", b"\r", b"\n"]).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].data.as_deref(), Some("x"));
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            "[a-z ]{0,12}".prop_map(|v| format!("data: {v}")),
            "[0-9]{1,4}".prop_map(|v| format!("id: {v}")),
            "[a-z]{1,6}".prop_map(|v| format!("event: {v}")),
            "[0-9]{1,4}".prop_map(|v| format!("retry: {v}")),
            Just(": keep-alive".to_string()),
            Just(String::new()),
        ];
        let end = prop_oneof![Just("\n"), Just("\r"), Just("\r\n")];
        proptest::collection::vec((line, end), 0..40).prop_map(|lines| {
            lines
                .into_iter()
                .flat_map(|(l, e)| format!("{l}{e}").into_bytes())
                .collect()
        })
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_events(bytes in stream(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
            let whole = decode(&[&bytes]).unwrap();
            let chunks = crate::source::chunks_at(&bytes, &cuts);
            prop_assert_eq!(decode(&chunks).unwrap(), whole);
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&[&bytes]);
        }
    }
}
