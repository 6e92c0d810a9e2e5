//! An incremental, limit-checked NDJSON decoder: one JSON value per LF-terminated line (a
//! trailing CR is dropped, blank lines are skipped), its upstream id read by JSON pointer.
//! Bytes arrive in arbitrary chunks; lines come out exactly as if decoded whole.

use bytes::Bytes;

/// One decoded line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// The value at the id pointer (strings as they are, numbers in decimal).
    pub id: Option<String>,
    /// The JSON text, or `None` for a line over the limit (skipped; the source records a gap).
    pub json: Option<Bytes>,
}

/// A line that is not JSON: the source reconnects and resumes.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a line of the stream is not JSON")]
pub struct Malformed;

#[derive(Debug)]
pub struct Decoder {
    line: Vec<u8>,
    /// The current line went over the limit: its bytes are dropped.
    too_long: bool,
    max_line: usize,
    id_pointer: String,
    last_id: Option<String>,
}

impl Decoder {
    pub fn new(max_line: usize, id_pointer: &str) -> Decoder {
        Decoder {
            line: Vec::new(),
            too_long: false,
            max_line,
            id_pointer: id_pointer.to_owned(),
            last_id: None,
        }
    }

    /// The id of the last line that had one (the resume point).
    pub fn last_id(&self) -> Option<&str> {
        self.last_id.as_deref()
    }

    pub fn feed(&mut self, chunk: &[u8], out: &mut Vec<Line>) -> Result<(), Malformed> {
        for &b in chunk {
            if b != b'\n' {
                if self.line.len() >= self.max_line {
                    self.too_long = true;
                } else {
                    self.line.push(b);
                }
                continue;
            }
            let mut line = std::mem::take(&mut self.line);
            if std::mem::take(&mut self.too_long) {
                out.push(Line {
                    id: None,
                    json: None,
                });
                continue;
            }
            if line.last() == Some(&b'\r') {
                line.pop();
            }
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let value: serde_json::Value = serde_json::from_slice(&line).map_err(|_| Malformed)?;
            let id = value.pointer(&self.id_pointer).and_then(|v| match v {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Number(n) => Some(n.to_string()),
                _ => None,
            });
            if id.is_some() {
                self.last_id.clone_from(&id);
            }
            out.push(Line {
                id,
                json: Some(Bytes::from(line)),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode(chunks: &[&[u8]]) -> Result<Vec<Line>, Malformed> {
        let mut d = Decoder::new(64, "/id");
        let mut out = Vec::new();
        for c in chunks {
            d.feed(c, &mut out)?;
        }
        Ok(out)
    }

    #[test]
    fn lines_ids_and_limits() {
        let lines = decode(&[b"{\"id\":1,\"v\":\"a\"}\r\n\n{\"id\":\"x\"}\n{\"v\":2}\n"]).unwrap();
        let ids: Vec<Option<&str>> = lines.iter().map(|l| l.id.as_deref()).collect();
        assert_eq!(ids, [Some("1"), Some("x"), None]);
        assert_eq!(
            lines[0].json.as_deref(),
            Some(&b"{\"id\":1,\"v\":\"a\"}"[..])
        );
        let mut long = vec![b'1'; 100];
        long.extend_from_slice(b"\n{\"id\":2}\n");
        let lines = decode(&[&long]).unwrap();
        assert_eq!(lines[0].json, None);
        assert_eq!(lines[1].id.as_deref(), Some("2"));
        assert_eq!(decode(&[b"{broken\n"]), Err(Malformed));
        // An unterminated line is not a message yet.
        assert!(decode(&[b"{\"id\":3}"]).unwrap().is_empty());
    }

    fn stream() -> impl Strategy<Value = Vec<u8>> {
        let line = prop_oneof![
            (0u32..1000).prop_map(|i| format!("{{\"id\":{i},\"v\":\"x\"}}")),
            "[a-z]{0,8}".prop_map(|s| format!("{{\"id\":\"{s}\"}}")),
            Just(String::new()),
        ];
        let end = prop_oneof![Just("\n"), Just("\r\n")];
        proptest::collection::vec((line, end), 0..30).prop_map(|lines| {
            lines
                .into_iter()
                .flat_map(|(l, e)| format!("{l}{e}").into_bytes())
                .collect()
        })
    }

    proptest! {
        #[test]
        fn any_chunking_gives_the_same_lines(bytes in stream(), cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..10)) {
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
