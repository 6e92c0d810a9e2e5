//! Following the announcements: one connection per node blocks on every firehose stream at
//! once, and each entry is handed to the topic it names. After every (re)connect the node
//! takes the streams' current ends as its positions, then loads every topic it holds again,
//! so what was announced while it was away is read from the topics' logs instead.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;

use bytes::Bytes;
use redis::{RedisError, Value};

use super::link::{self, COMMAND_TIMEOUT};
use super::{Backplane, RETRY_FIRST, RETRY_MAX, arrived_at, jittered, parse_epoch, scripts};
use crate::hub::{NewMessage, Remote, RemoteBody, UpstreamTrouble};

/// How long one read blocks when nothing is announced; a read that has not answered by this
/// plus [`COMMAND_TIMEOUT`] means a dead connection.
const BLOCK: Duration = Duration::from_secs(5);
/// Entries taken per read and stream.
const READ_COUNT: usize = 1000;

impl Backplane {
    /// Reads the announcements for as long as the runtime runs, reconnecting after any failure.
    pub(super) async fn follow(self: Arc<Self>) {
        let streams: Vec<String> = (0..self.config.firehose_shards)
            .map(|k| scripts::firehose(&self.config.prefix, k))
            .collect();
        let mut pause = RETRY_FIRST;
        loop {
            let e = self.read_until_error(&streams, &mut pause).await;
            tracing::warn!(error = %e, "backplane read failed; reconnecting");
            let reconnects = &self.metrics.backplane.reconnects;
            reconnects.with_label_values(&[link::reason(&e)]).inc();
            self.health.failed();
            tokio::time::sleep(jittered(pause)).await;
            pause = (pause * 2).min(RETRY_MAX);
        }
    }

    async fn read_until_error(
        self: &Arc<Self>,
        streams: &[String],
        pause: &mut Duration,
    ) -> RedisError {
        let mut conn = match self.link.open(BLOCK + COMMAND_TIMEOUT).await {
            Ok(c) => c,
            Err(e) => return e,
        };
        let mut ends = redis::pipe();
        for s in streams {
            ends.cmd("XREVRANGE")
                .arg(s)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1);
        }
        let ends: Vec<Value> = match ends.query_async(&mut conn).await {
            Ok(v) => v,
            Err(e) => return e,
        };
        let mut positions: Vec<String> = ends
            .iter()
            .map(|v| match v {
                Value::Array(entries) => entries.first().and_then(entry_id),
                _ => None,
            })
            .map(|id| id.unwrap_or_else(|| "0-0".to_owned()))
            .collect();
        positions.resize(streams.len(), "0-0".to_owned());
        self.health.ok();
        *pause = RETRY_FIRST;
        // What was announced before these positions is in the topics' logs.
        for topic in self.hub.mirrored_topics() {
            self.load(topic);
        }
        loop {
            let mut read = redis::cmd("XREAD");
            read.arg("COUNT")
                .arg(READ_COUNT)
                .arg("BLOCK")
                .arg(BLOCK.as_millis() as u64)
                .arg("STREAMS")
                .arg(streams)
                .arg(&positions);
            let started = Instant::now();
            let reply: Value = match read.query_async(&mut conn).await {
                Ok(v) => v,
                Err(e) => return e,
            };
            let duration = &self.metrics.backplane.command_duration;
            duration
                .with_label_values(&["read"])
                .observe(started.elapsed().as_secs_f64());
            self.health.ok();
            for (stream, entries) in streams_of(reply) {
                let Some(k) = streams.iter().position(|s| s.as_bytes() == stream) else {
                    continue;
                };
                for entry in entries {
                    let Some(id) = entry_id(&entry) else {
                        continue;
                    };
                    positions[k] = id;
                    self.announcement(&entry);
                }
            }
        }
    }

    fn announcement(self: &Arc<Self>, entry: &Value) {
        let fields = entry_fields(entry);
        let text = |name: &str| field(&fields, name).and_then(|v| std::str::from_utf8(v).ok());
        if text("k") == Some("u") {
            if let (Some(route), Some(topic)) = (text("r"), text("t"))
                && let Some(t) = self.hub.find(route, topic)
            {
                t.set_upstream_state(upstream_state(text("uf"), text("uc"), text("ud")));
            }
            return;
        }
        let (Some(route), Some(topic), Some(epoch), Some(seq)) = (
            text("r"),
            text("t"),
            text("e").and_then(parse_epoch),
            text("s").and_then(|s| s.parse::<u64>().ok().filter(|s| *s > 0)),
        ) else {
            tracing::warn!("malformed backplane announcement skipped");
            return;
        };
        if let Some(remote) = remote(seq, &fields) {
            self.announced(route, topic, epoch, remote);
        }
    }
}

/// An upstream state as the backplane records it (`uf`: failing since, the backplane's ms,
/// empty while healthy; `uc`: the last definitive refusal; `ud`: 1 when down) as a topic
/// takes it.
pub(super) fn upstream_state(
    failing_since: Option<&str>,
    refused: Option<&str>,
    down: Option<&str>,
) -> Option<UpstreamTrouble> {
    let since = failing_since?.parse::<u64>().ok()?;
    Some(UpstreamTrouble {
        since: arrived_at(since),
        refused: refused.and_then(|r| r.parse::<u16>().ok()),
        down: down == Some("1"),
    })
}

/// A log entry (`[id, [field, value, …]]`, id `<seq>-0`) as a topic takes it.
pub(super) fn log_entry(entry: &Value) -> Option<Remote> {
    let id = entry_id(entry)?;
    // Positions start at 1: a 0 is not one of pollmux's entries.
    let seq = id
        .strip_suffix("-0")?
        .parse::<u64>()
        .ok()
        .filter(|s| *s > 0)?;
    remote(seq, &entry_fields(entry))
}

fn remote(seq: u64, fields: &[(&[u8], &[u8])]) -> Option<Remote> {
    let text = |name: &str| field(fields, name).and_then(|v| std::str::from_utf8(v).ok());
    let origin = text("ts")?.parse::<u64>().ok()?;
    let body = if text("g") == Some("1") {
        RemoteBody::Gap
    } else {
        let nonempty = |v: Option<&str>| v.filter(|s| !s.is_empty()).map(str::to_owned);
        RemoteBody::Message(NewMessage {
            id: nonempty(text("m")),
            content_type: nonempty(text("ct")),
            payload: Bytes::copy_from_slice(field(fields, "d")?),
            arrived: arrived_at(origin),
        })
    };
    Some(Remote { seq, origin, body })
}

fn entry_id(entry: &Value) -> Option<String> {
    match entry {
        Value::Array(parts) => match parts.first()? {
            Value::BulkString(id) => String::from_utf8(id.clone()).ok(),
            Value::SimpleString(id) => Some(id.clone()),
            _ => None,
        },
        _ => None,
    }
}

fn entry_fields(entry: &Value) -> Vec<(&[u8], &[u8])> {
    let Value::Array(parts) = entry else {
        return Vec::new();
    };
    let Some(Value::Array(flat)) = parts.get(1) else {
        return Vec::new();
    };
    flat.chunks_exact(2)
        .filter_map(|kv| match kv {
            [Value::BulkString(k), Value::BulkString(v)] => Some((&k[..], &v[..])),
            _ => None,
        })
        .collect()
}

fn field<'a>(fields: &[(&[u8], &'a [u8])], name: &str) -> Option<&'a [u8]> {
    fields
        .iter()
        .find(|(k, _)| *k == name.as_bytes())
        .map(|(_, v)| *v)
}

/// An `XREAD` reply's streams and their entries (RESP2 arrays or RESP3 maps; nil: none).
fn streams_of(reply: Value) -> Vec<(Vec<u8>, Vec<Value>)> {
    let pairs: Vec<(Value, Value)> = match reply {
        Value::Array(streams) => streams
            .into_iter()
            .filter_map(|s| match s {
                Value::Array(mut kv) if kv.len() == 2 => {
                    let entries = kv.pop()?;
                    Some((kv.pop()?, entries))
                }
                _ => None,
            })
            .collect(),
        Value::Map(kv) => kv,
        _ => Vec::new(),
    };
    pairs
        .into_iter()
        .filter_map(|(name, entries)| match (name, entries) {
            (Value::BulkString(n), Value::Array(e)) => Some((n, e)),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bulk(s: &str) -> Value {
        Value::BulkString(s.as_bytes().to_vec())
    }

    fn entry(id: &str, fields: &[(&str, &str)]) -> Value {
        let flat = fields
            .iter()
            .flat_map(|(k, v)| [bulk(k), bulk(v)])
            .collect();
        Value::Array(vec![bulk(id), Value::Array(flat)])
    }

    #[test]
    fn log_entries_and_gaps_are_read_and_garbage_is_not() {
        let m = log_entry(&entry(
            "7-0",
            &[
                ("d", "hi"),
                ("ct", "text/plain"),
                ("m", ""),
                ("ts", "1700000000000"),
            ],
        ))
        .unwrap();
        assert_eq!((m.seq, m.origin), (7, 1_700_000_000_000));
        let RemoteBody::Message(NewMessage {
            id,
            content_type,
            payload,
            ..
        }) = m.body
        else {
            panic!("a message");
        };
        assert_eq!(
            (id, content_type.as_deref(), &payload[..]),
            (None, Some("text/plain"), &b"hi"[..])
        );
        let g = log_entry(&entry("8-0", &[("g", "1"), ("ts", "5")])).unwrap();
        assert!(matches!(g.body, RemoteBody::Gap));
        for bad in [
            entry("8-1", &[("d", "x"), ("ts", "5")]),
            entry("x-0", &[("d", "x"), ("ts", "5")]),
            entry("0-0", &[("d", "x"), ("ts", "5")]),
            entry("9-0", &[("d", "x")]),
            entry("9-0", &[("ts", "5")]),
            bulk("9-0"),
            Value::Nil,
        ] {
            assert!(log_entry(&bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn read_replies_in_both_protocols() {
        let entries = Value::Array(vec![entry("1-1", &[("r", "a")])]);
        let resp2 = Value::Array(vec![Value::Array(vec![bulk("pm:fh:0"), entries.clone()])]);
        let resp3 = Value::Map(vec![(bulk("pm:fh:0"), entries)]);
        for reply in [resp2, resp3] {
            let streams = streams_of(reply);
            assert_eq!(streams.len(), 1);
            assert_eq!(streams[0].0, b"pm:fh:0");
            assert_eq!(entry_id(&streams[0].1[0]).as_deref(), Some("1-1"));
        }
        assert!(streams_of(Value::Nil).is_empty());
    }
}
