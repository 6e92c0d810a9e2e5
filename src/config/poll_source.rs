//! A poll route's `source`: what feeds its topics (publish, an upstream long-poll, stream or
//! plain resource polled on an interval) and how each kind starts, resumes and paces itself.

use std::time::Duration;

use http::HeaderName;

use super::routes::{plain_name, topic_param_names};
use super::{TopicTemplate, UpstreamConfig, Validator, raw};

/// An upstream stream silent this long is reconnected (servers usually send keep-alive
/// comments every 15 to 30 s).
pub const SOURCE_IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(60);
/// JSON pointer of an NDJSON message's upstream id, unless the route names one.
pub const ID_POINTER_DEFAULT: &str = "/id";
/// Query parameter carrying the last upstream id on an NDJSON reconnect, unless named.
pub const RESUME_PARAM_DEFAULT: &str = "last_id";
/// `upstream-poll`: the shortest gap between the starts of two requests when the last one
/// brought nothing new, so an endpoint that answers at once is not asked in a busy loop.
pub const MIN_INTERVAL_DEFAULT: Duration = Duration::from_secs(1);
/// `upstream-interval`: how often the resource is asked, unless the route says.
pub const INTERVAL_DEFAULT: Duration = Duration::from_secs(5);

/// What feeds a poll route's topics.
#[derive(Debug, Clone, PartialEq)]
pub enum SourceConfig {
    /// The backend publishes through the admin listener (`POST /publish/<route>/<topic>`).
    Publish,
    /// One long-poll in flight per topic to `upstreams[upstream]` at `path` (which may use
    /// `{cursor}`, the upstream's position).
    UpstreamPoll {
        upstream: usize,
        path: TopicTemplate,
        id_pointer: String,
        /// Where the array of messages is in an object answer; `None`: the answer is the array.
        items_pointer: Option<String>,
        /// Where an object answer names the position to continue from; `None`: the last
        /// message's id.
        next_pointer: Option<String>,
        /// The shortest gap between request starts after an answer with nothing new.
        min_interval: Duration,
        /// The `{cursor}` of the first request, when there is nothing to resume from.
        initial_cursor: Option<InitialCursor>,
    },
    /// One streaming subscription per topic to `upstreams[upstream]` at `path`.
    UpstreamStream {
        format: StreamFormat,
        upstream: usize,
        /// Path (and query) template over the topic's parameters.
        path: TopicTemplate,
        /// A stream silent this long is treated as dead and reconnected.
        idle_timeout: Duration,
    },
    /// A plain resource asked every `interval`, conditionally: each new representation is a
    /// message.
    UpstreamInterval {
        upstream: usize,
        path: TopicTemplate,
        /// The shortest gap between two requests; the upstream may only stretch it.
        interval: Duration,
        /// A header in which the upstream asks for a longer interval, in seconds (GitHub's
        /// `X-Poll-Interval`).
        interval_header: Option<HeaderName>,
    },
}

/// The wire format of a streaming source and how it resumes.
#[derive(Debug, Clone, PartialEq)]
pub enum StreamFormat {
    /// `text/event-stream`; resumes with `Last-Event-ID`.
    Sse {
        /// Each event's data is JSON, embedded as such (else text).
        json: bool,
    },
    /// One JSON value per line; the id at `id_pointer`; resumes with `?<resume_param>=<id>`.
    Ndjson {
        id_pointer: String,
        resume_param: String,
        /// The resume parameter of the first request, when there is nothing to resume from.
        initial_cursor: Option<InitialCursor>,
    },
}

/// Where a source with nothing to resume from starts (an upstream that reads an empty cursor
/// as "from the beginning" would otherwise send its whole history).
#[derive(Debug, Clone, PartialEq)]
pub enum InitialCursor {
    /// Put as is where the cursor goes (`"now"`).
    Literal(String),
    /// Read from the upstream: `GET path`, the JSON value at `pointer`.
    Bootstrap {
        path: TopicTemplate,
        pointer: String,
    },
}

/// The keys of `source` and which types use them.
const SOURCE_KEYS: [(&str, &[&str]); 12] = [
    ("upstream", &[POLL, SSE, NDJSON, INTERVAL]),
    ("path", &[POLL, SSE, NDJSON, INTERVAL]),
    ("idle_timeout", &[SSE, NDJSON]),
    ("id_pointer", &[POLL, NDJSON]),
    ("resume_param", &[NDJSON]),
    ("items_pointer", &[POLL]),
    ("next_pointer", &[POLL]),
    ("min_interval", &[POLL]),
    ("initial_cursor", &[POLL, NDJSON]),
    ("data", &[SSE]),
    ("interval", &[INTERVAL]),
    ("interval_header", &[INTERVAL]),
];
const PUBLISH: &str = "publish";
const POLL: &str = "upstream-poll";
const SSE: &str = "upstream-sse";
const NDJSON: &str = "upstream-ndjson";
const INTERVAL: &str = "upstream-interval";
const TYPES: [&str; 5] = [PUBLISH, POLL, SSE, NDJSON, INTERVAL];

/// Which keys of `s` are set, in [`SOURCE_KEYS`] order.
fn keys_set(s: &raw::Source) -> [bool; 12] {
    [
        s.upstream.is_some(),
        s.path.is_some(),
        s.idle_timeout.is_some(),
        s.id_pointer.is_some(),
        s.resume_param.is_some(),
        s.items_pointer.is_some(),
        s.next_pointer.is_some(),
        s.min_interval.is_some(),
        s.initial_cursor.is_some(),
        s.data.is_some(),
        s.interval.is_some(),
        s.interval_header.is_some(),
    ]
}

impl Validator<'_, '_> {
    pub(super) fn source(
        &mut self,
        n: &str,
        s: raw::Source,
        topic: Option<&TopicTemplate>,
        upstreams: &[UpstreamConfig],
    ) -> Option<SourceConfig> {
        let at = |key: &'static str| ["routes", n, "source", key];
        let kind = s.kind.0.clone();
        let Some(kind) = TYPES.iter().copied().find(|t| *t == kind) else {
            let known = TYPES.map(|t| format!("{t:?}")).join(", ");
            self.err(
                &at("type"),
                format!("unknown source type {kind:?}: use one of {known}"),
            );
            return None;
        };
        for ((key, used_by), set) in SOURCE_KEYS.iter().zip(keys_set(&s)) {
            if set && !used_by.contains(&kind) {
                let users: Vec<String> = used_by.iter().map(|t| format!("{t:?}")).collect();
                let users = users.join(", ");
                let msg = format!("not used by type = {kind:?} (only by {users})");
                self.err(&at(key), msg);
            }
        }
        if kind == PUBLISH {
            return Some(SourceConfig::Publish);
        }
        let what = format!("type = {kind:?}");
        let upstream = self.upstream_ref(&at("upstream"), &what, s.upstream, upstreams);
        let params = topic_param_names(topic);
        let mut with_cursor = params.clone();
        with_cursor.push("cursor".to_owned());
        let initial_cursor = match s.initial_cursor {
            None => None,
            Some(i) => Some(self.initial_cursor(n, i, &params)?),
        };
        match kind {
            POLL => {
                let path = self.source_path(n, kind, s.path, &with_cursor);
                let id_pointer = self.pointer(n, "id_pointer", s.id_pointer)?;
                let items_pointer = self.optional_pointer(n, "items_pointer", s.items_pointer)?;
                let next_pointer = self.optional_pointer(n, "next_pointer", s.next_pointer)?;
                Some(SourceConfig::UpstreamPoll {
                    upstream: upstream?,
                    path: path?,
                    id_pointer,
                    items_pointer,
                    next_pointer,
                    min_interval: s.min_interval.map_or(MIN_INTERVAL_DEFAULT, |d| d.0),
                    initial_cursor,
                })
            }
            INTERVAL => {
                let path = self.source_path(n, kind, s.path, &params);
                let interval = s.interval.map_or(INTERVAL_DEFAULT, |d| d.0);
                if interval.is_zero() {
                    self.err(&at("interval"), "must be above zero");
                }
                let interval_header = match s.interval_header {
                    None => None,
                    Some(h) => Some(self.header_name(&at("interval_header"), &h.0)?),
                };
                Some(SourceConfig::UpstreamInterval {
                    upstream: upstream?,
                    path: path?,
                    interval,
                    interval_header,
                })
            }
            _ => {
                let format = if kind == SSE {
                    let json = match s.data.as_ref().map(|d| d.0.as_str()) {
                        None | Some("text") => false,
                        Some("json") => true,
                        Some(other) => {
                            let msg = format!("{other:?} is not \"text\" or \"json\"");
                            self.err(&at("data"), msg);
                            false
                        }
                    };
                    StreamFormat::Sse { json }
                } else {
                    let id_pointer = self.pointer(n, "id_pointer", s.id_pointer)?;
                    let resume_param = s
                        .resume_param
                        .map_or(RESUME_PARAM_DEFAULT.to_owned(), |p| p.0);
                    if !plain_name(&resume_param) {
                        self.err(&at("resume_param"), "use letters, digits and -._~ only");
                    }
                    StreamFormat::Ndjson {
                        id_pointer,
                        resume_param,
                        initial_cursor,
                    }
                };
                let path = self.source_path(n, kind, s.path, &params);
                Some(SourceConfig::UpstreamStream {
                    format,
                    upstream: upstream?,
                    path: path?,
                    idle_timeout: s.idle_timeout.map_or(SOURCE_IDLE_TIMEOUT_DEFAULT, |d| d.0),
                })
            }
        }
    }

    /// `initial_cursor`: a literal, or a bootstrap request over the topic's parameters.
    fn initial_cursor(
        &mut self,
        n: &str,
        raw: raw::InitialCursor,
        params: &[String],
    ) -> Option<InitialCursor> {
        match raw {
            raw::InitialCursor::Literal(text) if text.0.is_empty() => {
                let msg = "empty: leave initial_cursor out to start with an empty cursor";
                self.err(&["routes", n, "source", "initial_cursor"], msg);
                None
            }
            raw::InitialCursor::Literal(text) => Some(InitialCursor::Literal(text.0)),
            raw::InitialCursor::Bootstrap(b) => {
                let at = ["routes", n, "source", "initial_cursor", "path"];
                let path = self.upstream_path(&at, "initial_cursor", Some(b.path), params);
                let pointer = self.optional_pointer(n, "initial_cursor.pointer", Some(b.pointer));
                Some(InitialCursor::Bootstrap {
                    path: path?,
                    pointer: pointer??,
                })
            }
        }
    }

    /// A source's path template. It may use only `allowed` parameters (the topic's, and
    /// `cursor` for upstream-poll): two clients of one topic must never ask the upstream
    /// different things.
    fn source_path(
        &mut self,
        n: &str,
        kind: &str,
        path: Option<raw::Str>,
        allowed: &[String],
    ) -> Option<TopicTemplate> {
        self.upstream_path(&["routes", n, "source", "path"], kind, path, allowed)
    }

    /// A JSON pointer key of a source (`/id` when absent for `id_pointer`).
    fn pointer(&mut self, n: &str, key: &str, value: Option<raw::Str>) -> Option<String> {
        let pointer = value.map_or(ID_POINTER_DEFAULT.to_owned(), |p| p.0);
        if pointer.is_empty() || pointer.starts_with('/') {
            Some(pointer)
        } else {
            let at: Vec<&str> = ["routes", n, "source"]
                .into_iter()
                .chain(key.split('.'))
                .collect();
            self.err(&at, "a JSON pointer starts with / (e.g. \"/id\")");
            None
        }
    }

    /// A JSON pointer key without a default: `Some(None)` when absent, `None` when invalid.
    fn optional_pointer(
        &mut self,
        n: &str,
        key: &str,
        value: Option<raw::Str>,
    ) -> Option<Option<String>> {
        match value {
            None => Some(None),
            Some(p) => self.pointer(n, key, Some(p)).map(Some),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::config::{Config, RouteKind, SourceConfig};

    fn source(keys: &str) -> Result<SourceConfig, String> {
        let text = format!(
            "[listeners.p]\naddress = \"127.0.0.1:0\"\n\
             [upstreams.u]\nurl = \"http://127.0.0.1:1\"\n\
             [routes.r]\npath = \"/r/{{db}}\"\nkind = \"poll\"\nauth = \"public\"\n\
             source = {{ {keys} }}\n"
        );
        Config::from_toml(&text, std::path::Path::new("."))
            .map(|c| match &c.routes[0].kind {
                RouteKind::Poll(p) => p.source.clone(),
                _ => unreachable!("a poll route"),
            })
            .map_err(|e| e.to_string())
    }

    #[test]
    fn every_source_type_takes_its_own_keys_and_refuses_the_others() {
        let interval = source(
            "type = \"upstream-interval\", upstream = \"u\", path = \"/orders/{db}\", \
             interval = \"10s\", interval_header = \"X-Poll-Interval\"",
        )
        .unwrap();
        let SourceConfig::UpstreamInterval {
            interval,
            interval_header,
            ..
        } = interval
        else {
            panic!("{interval:?}");
        };
        assert_eq!(interval, std::time::Duration::from_secs(10));
        assert_eq!(interval_header.unwrap(), "x-poll-interval");
        let poll = source(
            "type = \"upstream-poll\", upstream = \"u\", \
             path = \"/{db}/_changes?feed=longpoll&since={cursor}\", items_pointer = \"/results\", \
             id_pointer = \"/seq\", next_pointer = \"/last_seq\", min_interval = \"2s\", \
             initial_cursor = { path = \"/{db}\", pointer = \"/update_seq\" }",
        )
        .unwrap();
        assert!(
            matches!(
                poll,
                SourceConfig::UpstreamPoll {
                    next_pointer: Some(_),
                    initial_cursor: Some(_),
                    ..
                }
            ),
            "{poll:?}"
        );
        let refused = source(
            "type = \"upstream-sse\", upstream = \"u\", path = \"/s/{db}\", interval = \"1s\", \
             next_pointer = \"/x\", data = \"yaml\"",
        )
        .unwrap_err();
        assert!(
            refused.contains("source.interval")
                && refused.contains(
                    "not used by type = \"upstream-sse\" (only by \"upstream-interval\")"
                ),
            "{refused}"
        );
        assert!(refused.contains("source.next_pointer"), "{refused}");
        assert!(
            refused.contains("\"yaml\" is not \"text\" or \"json\""),
            "{refused}"
        );
        let bad = source(
            "type = \"upstream-ndjson\", upstream = \"u\", path = \"/s/{db}\", \
             initial_cursor = { path = \"/{other}\", pointer = \"update_seq\" }",
        )
        .unwrap_err();
        assert!(bad.contains("source.initial_cursor.path"), "{bad}");
        assert!(bad.contains("source.initial_cursor.pointer"), "{bad}");
        let zero = source(
            "type = \"upstream-interval\", upstream = \"u\", path = \"/o/{db}\", interval = \"0s\"",
        )
        .unwrap_err();
        assert!(
            zero.contains("source.interval") && zero.contains("above zero"),
            "{zero}"
        );
        let unknown = source("type = \"upstream-rest\"").unwrap_err();
        assert!(unknown.contains("\"upstream-interval\""), "{unknown}");
    }
}
