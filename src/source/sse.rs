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
    /// The stream's last event id in force: what a reconnect resumes from.
    last_id: Option<String>,
    /// The event being read carries an `id:` field of its own.
    own_id: bool,
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
            own_id: false,
            retry_ms: None,
            max_line,
            max_event,
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
            "id" if !value.contains('\0') => {
                self.last_id = Some(value.to_owned());
                self.own_id = true;
            }
            "retry" if !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit()) => {
                self.retry_ms = value.parse().ok();
            }
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<Event>) {
        let event = self.event.take();
        let own_id = std::mem::take(&mut self.own_id);
        if !self.has_data {
            return;
        }
        self.has_data = false;
        let data = std::mem::take(&mut self.data);
        out.push(Event {
            // Only an event's own `id:` identifies it. The id in force (`last_id`) is where a
            // reconnect resumes, but events after it without one are other messages: given
            // its id, the topic would drop them as repeats.
            id: own_id
                .then(|| self.last_id.clone())
                .flatten()
                .filter(|id| !id.is_empty()),
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
                    id: None,
                    event: None,
                    data: Some("only".into())
                },
            ]
        );
        let mut d = Decoder::new(1024, 4096);
        d.feed(stream, &mut Vec::new()).unwrap();
        assert_eq!(d.last_id(), Some("2"));
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
