//! Property tests over pollmux's public API, for the code that meets untrusted text: the config
//! loader (operators' files), the router's parameter validation (clients' paths), the URLs built
//! from parameters for upstream requests, topic templates (publishers' topics), and the NDJSON
//! decoder's JSON pointer (upstreams' bodies).
//!
//! Case counts are modest so the suite stays fast; `PROPTEST_CASES` overrides them all. Failing
//! cases are saved under `proptest-regressions/integration/` and replayed first on every run.
//! The cursor decoder, the ring buffer and the SSE and NDJSON decoders have their properties next
//! to their code (`src/hub/`, `src/source/`); they are not repeated here.

use std::path::Path;
use std::sync::LazyLock;

use http::uri::PathAndQuery;
use pollmux::config::{
    AuthConfig, Config, ConfigErrors, RouteConfig, RouteKind, SourceConfig, TopicTemplate,
    percent_encode,
};
use pollmux::gateway::router::{Matched, Router, percent_decode, valid_param};
use pollmux::source::ndjson::Decoder;
use pollmux::upstream::Upstream;
use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use serde_json::Value;

/// `cases` unless `PROPTEST_CASES` asks for another count; failures persisted under the
/// repository's `proptest-regressions/` (proptest's default would pick `tests/`, because
/// `tests/integration/` has a `main.rs`).
fn config(cases: u32) -> ProptestConfig {
    let mut config = if std::env::var_os("PROPTEST_CASES").is_some() {
        ProptestConfig::default()
    } else {
        ProptestConfig::with_cases(cases)
    };
    config.failure_persistence = Some(Box::new(FileFailurePersistence::Direct(
        "proptest-regressions/integration/properties.txt",
    )));
    config
}

/// Any text: every `char` (controls included; `any::<String>()` leaves them out), up to `max`.
fn any_text(max: usize) -> impl Strategy<Value = String> {
    prop::collection::vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

fn load(text: &str) -> Result<Config, ConfigErrors> {
    Config::from_toml(text, Path::new("."))
}

// ---------------------------------------------------------------------------------------------
// 1. The config loader: any text gives a config or located errors, never a panic.

/// Every file in `config/`: the starting points of the mutations.
const CONFIG_FILES: &[(&str, &str)] = &[
    ("default.toml", include_str!("../../config/default.toml")),
    ("collapse.toml", include_str!("../../config/collapse.toml")),
    ("proxy.toml", include_str!("../../config/proxy.toml")),
    (
        "upstream-poll.toml",
        include_str!("../../config/upstream-poll.toml"),
    ),
    (
        "upstream-interval.toml",
        include_str!("../../config/upstream-interval.toml"),
    ),
    (
        "couchdb-changes.toml",
        include_str!("../../config/couchdb-changes.toml"),
    ),
    (
        "upstream-sse.toml",
        include_str!("../../config/upstream-sse.toml"),
    ),
    (
        "upstream-ndjson.toml",
        include_str!("../../config/upstream-ndjson.toml"),
    ),
    (
        "cluster-a.toml",
        include_str!("../../config/cluster-a.toml"),
    ),
    (
        "cluster-b.toml",
        include_str!("../../config/cluster-b.toml"),
    ),
];

/// Lines a mutation may insert: keys that exist, keys that do not, wrong types, bad values,
/// sections, duplicates and half-written syntax.
const INSERTED_LINES: &[&str] = &[
    "colour = 5",
    "[routes.extra]",
    "[routes.topics]",
    "[listeners.public]",
    "[[routes]]",
    "[admin",
    "path = \"/extra/{id}\"",
    "path = \"/topics/{topic}\"",
    "path = \"/x/{*rest}/y\"",
    "path = \"{id}\"",
    "path = \"/{a}/{a}\"",
    "path = \"/{1id}\"",
    "kind = \"collapse\"",
    "kind = \"proxy\"",
    "kind = \"poll\"",
    "kind = 7",
    "source.type = \"publish\"",
    "source = { type = \"upstream-sse\", upstream = \"nope\", path = \"/s/{id}\" }",
    "source = { type = \"upstream-poll\", upstream = \"orders\", path = \"s\" }",
    "auth = \"public\"",
    "auth = { hook = { upstream = \"orders\", path = \"/can/{zz}\" } }",
    "auth = { jwt = {} }",
    "topic = \"{id}:{id}\"",
    "topic = \"{\"",
    "topic = \"}\"",
    "topic = \"\"",
    "params.id = \"(\"",
    "params.id = \"\"",
    "params.nope = \".+\"",
    "hold = \"3 parsecs\"",
    "hold = \"0s\"",
    "max_hold = \"1ns\"",
    "max_batch = 0",
    "max_batch = -1",
    "max_batch = 18446744073709551616",
    "linger = 1e400",
    "buffer = { messages = 0, bytes = 0, age = \"0s\" }",
    "on_gap = \"resume\"",
    "start = \"middle\"",
    "cursor.query = \"\"",
    "next_cursor.json = \"version\"",
    "next_cursor.header = \"bad header\"",
    "share = \"private\"",
    "vary = [\"authorization\", \"\\u0000\"]",
    "address = \"127.0.0.1:99999\"",
    "address = \"[::1]:0\"",
    "address = \"${POLLMUX_PROPERTY_UNSET}\"",
    "address = \"${POLLMUX_PROPERTY_UNSET:-127.0.0.1:0}\"",
    "address = \"${\"",
    "url = \"ftp://x\"",
    "url = \"http://\"",
    "url = \"http://[::1\"",
    "headers = { \"bad name\" = \"v\" }",
    "max_connections = 0",
    "trusted_proxies = [\"10.0.0.0/33\"]",
    "tls.cert_file = \"missing.pem\"",
    "drain_window = \"1h\"",
    "key = \"\"\"",
    "key = '''unterminated",
    "é = 1",
    "a.b.c.d.e = { f = [1, {g = 2}] }",
    "= value",
    "\"\" = 1",
];

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR one byte (the result is made UTF-8 again, lossily).
    FlipByte { at: prop::sample::Index, mask: u8 },
    /// Keep only a prefix.
    Truncate { at: prop::sample::Index },
    /// Insert a line at a line boundary.
    InsertLine {
        at: prop::sample::Index,
        line: &'static str,
    },
    /// Delete one line.
    DeleteLine { at: prop::sample::Index },
    /// Insert one character anywhere.
    InsertChar { at: prop::sample::Index, c: char },
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        1 => (any::<prop::sample::Index>(), 1u8..=255)
            .prop_map(|(at, mask)| Mutation::FlipByte { at, mask }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::Truncate { at }),
        3 => (any::<prop::sample::Index>(), prop::sample::select(INSERTED_LINES))
            .prop_map(|(at, line)| Mutation::InsertLine { at, line }),
        1 => any::<prop::sample::Index>().prop_map(|at| Mutation::DeleteLine { at }),
        1 => (any::<prop::sample::Index>(), any::<char>())
            .prop_map(|(at, c)| Mutation::InsertChar { at, c }),
    ]
}

/// The byte offset of a char boundary chosen by `at` (the end of the text included).
fn boundary(text: &str, at: &prop::sample::Index) -> usize {
    let boundaries: Vec<usize> = text
        .char_indices()
        .map(|(i, _)| i)
        .chain([text.len()])
        .collect();
    *at.get(&boundaries)
}

fn apply(text: &str, m: &Mutation) -> String {
    match m {
        Mutation::FlipByte { at, mask } => {
            let mut bytes = text.as_bytes().to_vec();
            if !bytes.is_empty() {
                let i = at.index(bytes.len());
                bytes[i] ^= mask;
            }
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Mutation::Truncate { at } => text[..boundary(text, at)].to_owned(),
        Mutation::InsertLine { at, line } => {
            let mut lines: Vec<&str> = text.split('\n').collect();
            let i = at.index(lines.len() + 1);
            lines.insert(i, line);
            lines.join("\n")
        }
        Mutation::DeleteLine { at } => {
            let mut lines: Vec<&str> = text.split('\n').collect();
            let i = at.index(lines.len());
            lines.remove(i);
            lines.join("\n")
        }
        Mutation::InsertChar { at, c } => {
            let mut out = text.to_owned();
            out.insert(boundary(text, at), *c);
            out
        }
    }
}

/// Fragments that make TOML-shaped text, so that arbitrary documents reach validation and not
/// only the TOML parser.
#[rustfmt::skip]
const TOML_TOKENS: &[&str] = &[
    "[", "]", "[[", "]]", "{", "}", "=", ",", ".", "\"", "'", "\"\"\"", "#", "\n", "\r\n", " ",
    "\t", "listeners", "admin", "limits", "shutdown", "upstreams", "routes", "public", "r",
    "address", "\"127.0.0.1:0\"", "\"0.0.0.0:80\"", "path", "\"/t/{topic}\"", "\"/f/{*rest}\"",
    "kind", "\"poll\"", "\"proxy\"", "\"collapse\"", "source", "type", "\"publish\"",
    "\"upstream-sse\"", "upstream", "url", "\"http://127.0.0.1:1\"", "auth", "\"public\"",
    "hook", "topic", "\"{topic}\"", "params", "\"(\"", "hold", "\"5s\"", "\"5 parsecs\"", "0",
    "-1", "1e400", "true", "[]", "{}", "\"${X}\"", "\"${X:-y}\"", "\"$$\"", "é", "\u{0}", "\\",
    "\\u0000", "\"\\ud800\"",
];

/// Table and key names, known and unknown.
#[rustfmt::skip]
const TOML_NAMES: &[&str] = &[
    "listeners", "admin", "limits", "shutdown", "upstreams", "routes", "public", "r", "u",
    "address", "path", "kind", "source", "type", "upstream", "url", "auth", "hook", "topic",
    "params", "rest", "hold", "max_hold", "linger", "buffer", "cursor", "query",
    "next_cursor", "json", "share", "colour", "\"é\"", "\"quoted key\"",
];

/// Values, well and badly typed.
#[rustfmt::skip]
const TOML_VALUES: &[&str] = &[
    "\"127.0.0.1:0\"", "\"0.0.0.0:80\"", "\"/t/{topic}\"", "\"/f/{*rest}\"", "\"/t/{a}/{a}\"",
    "\"poll\"", "\"proxy\"", "\"collapse\"", "\"publish\"", "\"upstream-sse\"",
    "\"upstream-poll\"", "\"u\"", "\"http://127.0.0.1:1\"", "\"public\"", "\"{topic}\"",
    "\"(\"", "\".+\"", "\"5s\"", "\"5 parsecs\"", "\"/version\"", "0", "-1", "1e400", "true",
    "[]", "{}", "{ type = \"publish\" }",
    "{ hook = { upstream = \"u\", path = \"/h/{topic}\" } }", "\"${X}\"", "\"${X:-y}\"",
    "\"$$\"", "\"\\u0000\"", "'literal'", "\"\"\"\n\"\"\"",
];

/// Documents of `[table]` headers and `key = value` lines from the names and values above; one
/// in four also gets a line of token soup.
fn toml_like() -> impl Strategy<Value = String> {
    let sections = prop::sample::select(
        &[
            "listeners",
            "admin",
            "limits",
            "shutdown",
            "upstreams",
            "routes",
            "colour",
        ][..],
    );
    let header = (
        sections,
        prop::collection::vec(prop::sample::select(TOML_NAMES), 0..3),
    )
        .prop_map(|(s, rest)| format!("[{}]", [vec![s], rest].concat().join(".")));
    let key =
        prop::collection::vec(prop::sample::select(TOML_NAMES), 1..3).prop_map(|k| k.join("."));
    let line = prop_oneof![
        1 => header,
        3 => (key, prop::sample::select(TOML_VALUES)).prop_map(|(k, v)| format!("{k} = {v}")),
    ];
    let soup =
        prop::collection::vec(prop::sample::select(TOML_TOKENS), 0..12).prop_map(|t| t.concat());
    (
        prop::collection::vec(line, 0..30),
        prop::option::weighted(0.25, (any::<prop::sample::Index>(), soup)),
    )
        .prop_map(|(mut lines, soup)| {
            if let Some((at, soup)) = soup {
                lines.insert(at.index(lines.len() + 1), soup);
            }
            lines.join("\n")
        })
}

/// The loader's contract: a config (whose routes the router accepts: `Router::new` relies on
/// validation having rejected conflicting templates), or a non-empty list of errors each with a
/// key path or a line and column that lies inside the text.
fn check_loaded(text: &str) -> Result<(), TestCaseError> {
    match load(text) {
        Ok(config) => {
            let _ = Router::new(&config.routes);
        }
        Err(errors) => {
            prop_assert!(!errors.0.is_empty(), "Err without any error for {text:?}");
            let lines: Vec<&str> = text.split('\n').collect();
            for e in &errors.0 {
                prop_assert!(
                    !e.path.is_empty() || e.position.is_some(),
                    "error with neither key path nor position: {e:?} for {text:?}"
                );
                prop_assert!(!e.message.is_empty(), "error without a message: {e:?}");
                if let Some((line, column)) = e.position {
                    prop_assert!(
                        (1..=lines.len()).contains(&line),
                        "line {line} outside the text ({} lines): {e:?} for {text:?}",
                        lines.len()
                    );
                    let width = lines[line - 1].chars().count();
                    prop_assert!(
                        (1..=width + 1).contains(&column),
                        "column {column} outside line {line} ({width} characters): {e:?} for {text:?}"
                    );
                }
            }
            let _ = errors.to_string();
        }
    }
    Ok(())
}

/// The mutations start from every file in `config/` (a new example must be listed here), each
/// valid as it is.
#[test]
fn every_config_file_loads_before_mutation() {
    let mut on_disk: Vec<String> = std::fs::read_dir("config")
        .expect("config/ next to Cargo.toml")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".toml"))
        .collect();
    on_disk.sort();
    let mut listed: Vec<String> = CONFIG_FILES.iter().map(|(n, _)| n.to_string()).collect();
    listed.sort();
    assert_eq!(listed, on_disk, "CONFIG_FILES lists every file in config/");
    for (name, text) in CONFIG_FILES {
        if let Err(e) = load(text) {
            panic!("config/{name}: {e}");
        }
    }
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn config_from_arbitrary_text_is_ok_or_located_errors(text in any_text(400)) {
        check_loaded(&text)?;
    }

    #[test]
    fn config_from_toml_shaped_text_is_ok_or_located_errors(text in toml_like()) {
        check_loaded(&text)?;
    }

    #[test]
    fn config_files_mutated_are_ok_or_located_errors(
        file in prop::sample::select(CONFIG_FILES),
        mutations in prop::collection::vec(mutation(), 1..5),
    ) {
        let text = mutations.iter().fold(file.1.to_owned(), |t, m| apply(&t, m));
        check_loaded(&text)?;
    }
}

// ---------------------------------------------------------------------------------------------
// 2. Path parameters through the router: whatever the path, a matched value is safe.

/// Routes whose patterns accept anything (`.+`), so the router's own safety rules are all that
/// stands between a path and the value; plus one with the default pattern.
const ROUTER_CONFIG: &str = r#"
[listeners.p]
address = "127.0.0.1:0"
[upstreams.u]
url = "http://127.0.0.1:1"
[routes.t]
path = "/t/{topic}"
params.topic = ".+"
kind = "poll"
source.type = "publish"
auth = "public"
[routes.d]
path = "/d/{topic}"
kind = "poll"
source.type = "publish"
auth = "public"
[routes.o]
path = "/o/{a}/x/{b}"
params.a = ".*"
kind = "proxy"
upstream = "u"
[routes.f]
path = "/f/{*rest}"
params.rest = ".+"
kind = "proxy"
upstream = "u"
"#;

static ROUTES: LazyLock<(Vec<RouteConfig>, Router)> = LazyLock::new(|| {
    let config = load(ROUTER_CONFIG).unwrap_or_else(|e| panic!("{e}"));
    let router = Router::new(&config.routes);
    (config.routes, router)
});

fn route_index(name: &str) -> usize {
    ROUTES
        .0
        .iter()
        .position(|r| r.name == name)
        .expect("configured route")
}

/// Pieces of hostile paths: encoded and raw separators and dot segments, NUL, CR LF, C1 controls,
/// invalid UTF-8 escapes, overlong encodings, broken escapes, double encoding, backslashes.
#[rustfmt::skip]
const PATH_PIECES: &[&str] = &[
    "a", "Z9", "é", "-", "_", "~", ".", "..", "...", "%2e", "%2E", "%2e%2e", ".%2e", "%2F",
    "%2f", "/", "//", "%00", "%0d%0a", "%0A", "%09", "%1b", "%7f", "%7F", "%c2%85", "%C2%9F",
    "%e2%80%a8", "%ff", "%fe%ff", "%c0%ae", "%c0%af", "%e0%80%ae", "%C3%A9", "%C3", "%", "%2",
    "%zz", "%%32%65", "%252e%252e", "%255c", "\\", "%5c", "%5C", "?", "#", " ", "%20", "+", "{",
    "}", "*", ":", "%3A", "@", ";", "%ef%bb%bf", "%f0%9f%98%80", "%ed%a0%80",
];

fn hostile_path() -> impl Strategy<Value = String> {
    let benign = prop::sample::select(
        &[
            "a", "Z9", "é", "-", "_", "~", "%41", "%C3%A9", "%20", ":", "@", "+",
        ][..],
    );
    let piece = prop_oneof![
        6 => benign.prop_map(str::to_owned),
        3 => prop::sample::select(PATH_PIECES).prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ];
    let prefix = prop_oneof![
        4 => prop::sample::select(&["/t/", "/d/", "/f/", "/f/a/", "/o/a/x/"][..]),
        1 => prop::sample::select(&["/o/", "/", "", "/t", "//t/", "/T/"][..]),
    ];
    let suffix = prop_oneof![
        6 => Just(""),
        1 => prop::sample::select(&["/", "/x/b", "/x/%2e%2e", "?q=1"][..]),
    ];
    (prefix, prop::collection::vec(piece, 0..6), suffix)
        .prop_map(|(p, pieces, s)| format!("{p}{}{s}", pieces.concat()))
}

/// Every matched parameter satisfies the router's safety rules and its route's pattern.
fn check_matched(path: &str, m: &Matched) -> Result<(), TestCaseError> {
    let route = &ROUTES.0[m.route];
    prop_assert_eq!(m.params.len(), route.params.len());
    for ((name, value), p) in m.params.iter().zip(&route.params) {
        prop_assert_eq!(name, &p.name);
        prop_assert!(!value.is_empty(), "empty {name} from {path:?}");
        prop_assert!(
            !value.chars().any(|c| c.is_control() || c == '\\'),
            "control character or backslash in {name} = {value:?} from {path:?}"
        );
        prop_assert!(
            p.tail || !value.contains('/'),
            "/ in the non-tail {name} = {value:?} from {path:?}"
        );
        prop_assert!(
            value.split('/').all(|seg| seg != "." && seg != ".."),
            "dot segment in {name} = {value:?} from {path:?}"
        );
        prop_assert!(
            p.pattern.is_match(value),
            "{name} = {value:?} fails its pattern"
        );
    }
    // Single-parameter routes: the value is the raw rest of the path, decoded exactly once.
    if let Some(raw) = ["/t/", "/d/", "/f/"]
        .iter()
        .find_map(|prefix| path.strip_prefix(prefix))
    {
        let decoded = percent_decode(raw);
        prop_assert_eq!(Some(&m.params[0].1), decoded.as_ref());
    }
    Ok(())
}

/// A value the router must accept on a `.+` route, stated independently of its code.
fn safe_segment(v: &str) -> bool {
    !v.is_empty()
        && !v.chars().any(|c| c.is_control() || c == '\\' || c == '/')
        && v != "."
        && v != ".."
}

fn value_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        3 => prop::sample::select(&[
            "a", "é", ".", "..", "/", "\\", "%", "%2e", "%2F", "?", "#", "&", "=", " ", "+", ":",
            "@", "{", "}", "\u{0}", "\n", "\u{85}", "\u{2028}", "\u{feff}", "😀", "~", "-",
        ][..])
        .prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn router_never_yields_an_unsafe_parameter(path in hostile_path()) {
        let (routes, router) = &*ROUTES;
        if let Ok(m) = router.resolve(routes, &path) {
            check_matched(&path, &m)?;
        }
    }

    #[test]
    fn router_never_panics_on_arbitrary_text(path in any_text(64)) {
        let (routes, router) = &*ROUTES;
        if let Ok(m) = router.resolve(routes, &path) {
            check_matched(&path, &m)?;
        }
    }

    /// Completeness: any safe value, percent-encoded by pollmux's own encoder, comes back intact
    /// (single segment on a `.+` route; as a tail, with its `/` encoded or not).
    #[test]
    fn router_accepts_every_safe_value_once_encoded(
        value in value_text(),
        segments in prop::collection::vec(value_text(), 1..4),
    ) {
        let (routes, router) = &*ROUTES;
        if safe_segment(&value) {
            let path = format!("/t/{}", percent_encode(&value));
            let m = router.resolve(routes, &path);
            prop_assert_eq!(
                m,
                Ok(Matched { route: route_index("t"), params: vec![("topic".into(), value.clone())] }),
                "{:?}", path
            );
        }
        if segments.iter().all(|s| safe_segment(s)) {
            let tail = segments.join("/");
            for path in [
                format!("/f/{}", percent_encode(&tail)),
                format!("/f/{}", segments.iter().map(|s| percent_encode(s)).collect::<Vec<_>>().join("/")),
            ] {
                let m = router.resolve(routes, &path);
                prop_assert_eq!(
                    m,
                    Ok(Matched { route: route_index("f"), params: vec![("rest".into(), tail.clone())] }),
                    "{:?}", path
                );
            }
        }
    }

    #[test]
    fn percent_encoding_round_trips(value in any_text(32), text in any_text(32)) {
        let encoded = percent_encode(&value);
        let mut bytes = encoded.bytes();
        while let Some(b) = bytes.next() {
            if b == b'%' {
                let hex: Vec<u8> = bytes.by_ref().take(2).collect();
                prop_assert!(
                    hex.len() == 2 && hex.iter().all(|h| h.is_ascii_digit() || (b'A'..=b'F').contains(h)),
                    "bad escape in {encoded:?}"
                );
            } else {
                prop_assert!(
                    b.is_ascii_alphanumeric() || b"-._~".contains(&b),
                    "reserved byte {b:#x} left in {encoded:?}"
                );
            }
        }
        prop_assert_eq!(percent_decode(&encoded), Some(value));
        if let Some(decoded) = percent_decode(&text) {
            prop_assert_eq!(percent_decode(&percent_encode(&decoded)), Some(decoded));
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 3. Upstream URLs built from parameters: scheme and authority from config, values confined to
//    their own segment or query value.

/// Upstream base URLs: with and without a port, a path, a trailing slash, IPv6.
const UPSTREAM_URLS: &[&str] = &[
    "http://127.0.0.1:3000",
    "http://127.0.0.1:3000/",
    "https://api.example:8443/base/",
    "http://[::1]:9000/pre/fix",
    "http://api.example",
    "https://api.example/v1/",
];

fn url_config(url: &str) -> String {
    format!(
        r#"
[listeners.p]
address = "127.0.0.1:0"
[upstreams.u]
url = "{url}"
[routes.s]
path = "/s/{{region}}/{{id}}"
params.region = ".+"
params.id = ".+"
topic = "{{region}}:{{id}}"
kind = "poll"
source = {{ type = "upstream-sse", upstream = "u", path = "/internal/{{region}}/orders/{{id}}/stream?since=0" }}
auth = {{ hook = {{ upstream = "u", path = "/can-read/{{region}}/{{id}}" }} }}
[routes.p]
path = "/p/{{id}}"
params.id = ".+"
kind = "poll"
source = {{ type = "upstream-poll", upstream = "u", path = "/feed/{{id}}?cursor={{cursor}}" }}
auth = "public"
"#
    )
}

/// One upstream per base URL, with the routes' templates. Built once: an `Upstream` loads the
/// system's CA certificates.
struct Site {
    upstream: Upstream,
    /// Route `s`'s parameters (`region`, `id`), with their patterns.
    params: Vec<pollmux::config::Param>,
    source: TopicTemplate,
    hook: TopicTemplate,
    poll_source: TopicTemplate,
}

/// The poll route `name` of `routes`.
fn poll_route<'a>(routes: &'a [RouteConfig], name: &str) -> &'a pollmux::config::PollConfig {
    match &routes
        .iter()
        .find(|r| r.name == name)
        .expect("configured")
        .kind
    {
        RouteKind::Poll(p) => p,
        _ => panic!("route {name} is a poll route"),
    }
}

static SITES: LazyLock<Vec<Site>> = LazyLock::new(|| {
    UPSTREAM_URLS
        .iter()
        .map(|url| {
            let config = load(&url_config(url)).unwrap_or_else(|e| panic!("{url}: {e}"));
            let s = poll_route(&config.routes, "s");
            let SourceConfig::UpstreamStream { path: source, .. } = &s.source else {
                panic!("route s has a stream source")
            };
            let AuthConfig::Hook(hook) = &s.auth else {
                panic!("route s has a hook")
            };
            let SourceConfig::UpstreamPoll {
                path: poll_source, ..
            } = &poll_route(&config.routes, "p").source
            else {
                panic!("route p has an upstream-poll source")
            };
            Site {
                source: source.clone(),
                hook: hook.path.clone(),
                poll_source: poll_source.clone(),
                upstream: Upstream::new(config.upstreams[0].clone()),
                params: config
                    .routes
                    .iter()
                    .find(|r| r.name == "s")
                    .expect("configured")
                    .params
                    .clone(),
            }
        })
        .collect()
});

/// The fixtures load (a failure here is clearer than a poisoned `LazyLock` in a property).
#[test]
fn url_fixtures_load() {
    assert_eq!(SITES.len(), UPSTREAM_URLS.len());
    assert_eq!(ROUTES.0.len(), 4);
}

/// What one part of a rendered path or query must be.
enum Part<'a> {
    Literal(&'a str),
    Value(&'a str),
}

/// A rendered value: only unreserved characters and `%XX`, decoding to exactly the value.
fn check_value(rendered: &str, value: &str) -> Result<(), TestCaseError> {
    prop_assert!(
        rendered
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~%".contains(&b)),
        "{value:?} rendered as {rendered:?}"
    );
    let decoded = percent_decode(rendered);
    prop_assert_eq!(decoded.as_deref(), Some(value));
    Ok(())
}

/// Builds the upstream URI for `template` rendered with `params` and checks it part by part.
fn check_uri(
    site: &Site,
    template: &TopicTemplate,
    params: &[(String, String)],
    path_parts: &[Part<'_>],
    query_parts: &[(&str, Part<'_>)],
) -> Result<http::Uri, TestCaseError> {
    let rendered = template.render_path(params);
    let pq: PathAndQuery = match rendered.parse() {
        Ok(pq) => pq,
        Err(e) => {
            return Err(TestCaseError::fail(format!(
                "{rendered:?} is no URI path: {e}"
            )));
        }
    };
    let uri = site.upstream.uri_for(&pq);
    let base = &site.upstream.config.url;
    prop_assert_eq!(uri.scheme_str(), base.scheme_str());
    prop_assert_eq!(uri.authority(), base.authority());
    prop_assert_eq!(uri.host(), base.host());
    prop_assert_eq!(uri.port_u16(), base.port_u16());

    let base_path = base.path().trim_end_matches('/');
    let Some(rest) = uri.path().strip_prefix(base_path) else {
        return Err(TestCaseError::fail(format!(
            "{uri} lost the base path {base_path:?}"
        )));
    };
    let segments: Vec<&str> = rest.split('/').collect();
    prop_assert_eq!(segments[0], "", "{} does not start with /", rest);
    prop_assert_eq!(
        segments.len() - 1,
        path_parts.len(),
        "a value added or removed a segment: {}",
        uri
    );
    for (segment, part) in segments[1..].iter().zip(path_parts) {
        match part {
            Part::Literal(l) => prop_assert_eq!(segment, l, "{}", uri),
            Part::Value(v) => check_value(segment, v)?,
        }
    }
    let pairs: Vec<&str> = uri.query().map_or(Vec::new(), |q| q.split('&').collect());
    prop_assert_eq!(
        pairs.len(),
        query_parts.len(),
        "a value added a query parameter: {}",
        uri
    );
    for (pair, (name, part)) in pairs.iter().zip(query_parts) {
        let Some((n, v)) = pair.split_once('=') else {
            return Err(TestCaseError::fail(format!("{pair:?} in {uri}")));
        };
        prop_assert_eq!(n, *name);
        match part {
            Part::Literal(l) => prop_assert_eq!(v, *l),
            Part::Value(value) => check_value(v, value)?,
        }
    }
    Ok(uri)
}

proptest! {
    #![proptest_config(config(256))]

    #[test]
    fn upstream_uris_keep_configured_origin_and_confine_values(
        site in 0..UPSTREAM_URLS.len(),
        region in value_text(),
        id in value_text(),
        cursor in any_text(16),
    ) {
        let site = &SITES[site];
        let params = vec![("region".to_owned(), region.clone()), ("id".to_owned(), id.clone())];
        let source = check_uri(
            site,
            &site.source,
            &params,
            &[
                Part::Literal("internal"),
                Part::Value(&region),
                Part::Literal("orders"),
                Part::Value(&id),
                Part::Literal("stream"),
            ],
            &[("since", Part::Literal("0"))],
        )?;
        let hook = check_uri(
            site,
            &site.hook,
            &params,
            &[Part::Literal("can-read"), Part::Value(&region), Part::Value(&id)],
            &[],
        )?;
        // The cursor of an upstream-poll source is the upstream's own id: unvalidated text.
        let poll_params = vec![("id".to_owned(), id.clone()), ("cursor".to_owned(), cursor.clone())];
        check_uri(
            site,
            &site.poll_source,
            &poll_params,
            &[Part::Literal("feed"), Part::Value(&id)],
            &[("cursor", Part::Value(&cursor))],
        )?;
        // Values the router lets through never make a dot segment the upstream would resolve.
        let valid = params
            .iter()
            .zip(&site.params)
            .all(|((_, v), p)| valid_param(p, v));
        if valid {
            for uri in [&source, &hook] {
                prop_assert!(
                    uri.path().split('/').all(|s| s != "." && s != ".."),
                    "dot segment in {uri}"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 4. Topic templates (the publish path): a topic is matched back only to values that render it.

fn template_text() -> impl Strategy<Value = String> {
    let piece = prop_oneof![
        4 => prop::sample::select(&["{a}", "{b}", "{c}"][..]).prop_map(str::to_owned),
        3 => prop::sample::select(&[
            ":", "/", "orders", "é", ".", "*", "(", ")", "[", "\\", "$", "^", "?", "+", "|", "-",
        ][..])
        .prop_map(str::to_owned),
        1 => prop::sample::select(&["{1x}", "{zz}", "{", "}", "{}", "{a", "a}"][..])
            .prop_map(str::to_owned),
        1 => any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(piece, 0..6).prop_map(|p| p.concat())
}

/// Values for every name a template may use; `None` unless all the used ones are safe.
fn params_for(t: &TopicTemplate, values: &[String]) -> Option<Vec<(String, String)>> {
    let params: Vec<(String, String)> = TEMPLATE_NAMES
        .iter()
        .map(|n| n.to_string())
        .zip(values.iter().cloned())
        .collect();
    let uses: Vec<&str> = t.params().collect();
    params
        .iter()
        .filter(|(n, _)| uses.contains(&n.as_str()))
        .all(|(_, v)| safe_segment(v))
        .then_some(params)
}

const TEMPLATE_NAMES: &[&str] = &["a", "b", "c", "1x"];

proptest! {
    #![proptest_config(config(256))]

    /// What a publish relies on: a topic is matched back only to values that render exactly
    /// it, and every rendering is matched back.
    #[test]
    fn topic_templates_capture_only_what_they_render(
        template in template_text(),
        values in prop::collection::vec(value_text(), 4),
        other in prop::collection::vec(value_text(), 4),
        arbitrary in any_text(16),
        which in 0..3u8,
        edit in (any::<prop::sample::Index>(), any::<char>()),
    ) {
        let names: Vec<String> = TEMPLATE_NAMES.iter().map(|s| s.to_string()).collect();
        let Ok(t) = TopicTemplate::parse(&template, &names) else {
            return Ok(());
        };
        if let Some(params) = params_for(&t, &values) {
            let rendered = t.render(&params);
            prop_assert!(
                t.capture(&rendered).is_some(),
                "template {:?} cannot match its own rendering {:?}", template, rendered
            );
        }
        // Topics a publisher might send: anything, another rendering, a rendering with one
        // character more.
        let topic = match (which, params_for(&t, &other)) {
            (1, Some(p)) => t.render(&p),
            (2, Some(p)) => {
                let mut topic = t.render(&p);
                topic.insert(boundary(&topic, &edit.0), edit.1);
                topic
            }
            _ => arbitrary,
        };
        if let Some(captured) = t.capture(&topic) {
            prop_assert_eq!(t.render(&captured), topic, "template {:?}", template);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 5. JSON pointers: the NDJSON decoder reads a line's upstream id at the route's `id_pointer`.
//    (Collapse `next_cursor.json` and upstream-poll pointers are applied inside non-public
//    types; serde_json's `Value::pointer` is the same call there.)

#[rustfmt::skip]
const KEYS: &[&str] = &[
    "id", "", "a/b", "~", "~0", "~1", "~01", "0", "1", "-", "01", "é", " ", "\u{0}",
];

fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(KEYS).prop_map(str::to_owned),
        1 => ".{0,4}",
    ]
}

fn json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,6}".prop_map(Value::String),
    ];
    leaf.prop_recursive(4, 48, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect())),
        ]
    })
}

/// Pointers as configs might hold them, escaped or not, and broken ones.
fn pointer() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        key(),
        key().prop_map(|k| k.replace('~', "~0").replace('/', "~1")),
        prop::sample::select(&["~", "~2", "~a", "9999999999999999999999", "+1", "-0"][..])
            .prop_map(str::to_owned),
    ];
    prop_oneof![
        4 => prop::collection::vec(token, 0..5).prop_map(|t| t.iter().map(|t| format!("/{t}")).collect()),
        1 => any_text(16),
    ]
}

/// An RFC 6901 pointer down into `value`, choosing a member or element at each step.
fn walk_pointer(value: &Value, walk: &[prop::sample::Index]) -> String {
    let mut pointer = String::new();
    let mut at = value;
    for step in walk {
        match at {
            Value::Object(map) if !map.is_empty() => {
                let (k, v) = map.iter().nth(step.index(map.len())).expect("in range");
                pointer.push('/');
                pointer.push_str(&k.replace('~', "~0").replace('/', "~1"));
                at = v;
            }
            Value::Array(items) if !items.is_empty() => {
                let i = step.index(items.len());
                pointer.push_str(&format!("/{i}"));
                at = &items[i];
            }
            _ => break,
        }
    }
    pointer
}

/// A decoder's one line for `line` (newline appended).
fn decode_line(pointer: &str, line: &str) -> Result<pollmux::source::ndjson::Line, TestCaseError> {
    let mut decoder = Decoder::new(line.len() + 1, pointer);
    let mut out = Vec::new();
    let fed = decoder.feed(format!("{line}\n").as_bytes(), &mut out);
    prop_assert!(fed.is_ok(), "valid JSON rejected: {line:?}");
    prop_assert_eq!(out.len(), 1);
    let decoded = out.remove(0);
    prop_assert_eq!(decoded.json.as_deref(), Some(line.as_bytes()));
    if let Some(id) = &decoded.id {
        prop_assert_eq!(decoder.last_id(), Some(id.as_str()));
    }
    Ok(decoded)
}

proptest! {
    #![proptest_config(config(256))]

    /// Any pointer over any value: no panic, and the id is the pointed-to string or number.
    /// Half the pointers are walks into the value itself, so that they mostly find something.
    #[test]
    fn ndjson_id_pointer_reads_strings_and_numbers(
        value in json(),
        arbitrary in pointer(),
        walk in prop::collection::vec(any::<prop::sample::Index>(), 0..6),
        walked in any::<bool>(),
    ) {
        let pointer = if walked { walk_pointer(&value, &walk) } else { arbitrary };
        let line = serde_json::to_string(&value).unwrap();
        let decoded = decode_line(&pointer, &line)?;
        let parsed: Value = serde_json::from_str(&line).unwrap();
        let expected = match parsed.pointer(&pointer) {
            Some(Value::String(s)) => Some(s.clone()),
            Some(Value::Number(n)) => Some(n.to_string()),
            _ => None,
        };
        prop_assert_eq!(decoded.id, expected);
    }

    /// An id planted at a path of arbitrary keys is found by the RFC 6901 pointer to it.
    #[test]
    fn ndjson_id_pointer_finds_a_planted_id(
        keys in prop::collection::vec(key(), 1..5),
        id in prop_oneof![".{0,8}".prop_map(Value::String), any::<u64>().prop_map(Value::from)],
        noise in json(),
    ) {
        let mut value = id.clone();
        for k in keys.iter().rev() {
            let mut object = serde_json::Map::new();
            object.insert(format!("{k}-noise"), noise.clone());
            object.insert(k.clone(), value);
            value = Value::Object(object);
        }
        let pointer: String = keys
            .iter()
            .map(|k| format!("/{}", k.replace('~', "~0").replace('/', "~1")))
            .collect();
        let line = serde_json::to_string(&value).unwrap();
        let decoded = decode_line(&pointer, &line)?;
        let expected = match id {
            Value::String(s) => s,
            other => other.to_string(),
        };
        prop_assert_eq!(decoded.id, Some(expected), "{} at {:?}", line, pointer);
    }
}
