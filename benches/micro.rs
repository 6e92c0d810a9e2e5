//! Criterion micro-benchmarks of the hot paths (names carry scenario, scale and payload):
//! the hub's share of a fan-out (readers polling, and readers parked), cursor encoding and
//! decoding, route matching, and the SSE and NDJSON decoders of the upstream sources.
//! Run with `cargo bench --bench micro`; results in docs/BENCHMARKS.md.

use std::hint::black_box;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

use bytes::Bytes;
use criterion::{Criterion, criterion_group, criterion_main};
use pollmux::config::Config;
use pollmux::gateway::router::Router;
use pollmux::hub::cursor::{Cursor, Requested};
use pollmux::hub::ring::BufferLimits;
use pollmux::hub::{Batch, Hub, NewMessage, Parked, Poll, RouteTopics, TopicSettings};

fn route() -> Arc<RouteTopics> {
    let settings = TopicSettings {
        limits: BufferLimits {
            messages: 1000,
            bytes: 8 << 20,
            age: Duration::from_secs(300),
        },
        linger: Duration::from_secs(60),
        max_batch: 100,
        resume_on_gap: false,
        mirrored: false,
    };
    let gauge = prometheus::IntGauge::new("topics", "topics").expect("gauge");
    Arc::new(RouteTopics::new("bench", settings, 100_000, gauge))
}

/// A JSON message arriving now.
fn message(payload: &Bytes) -> NewMessage {
    NewMessage {
        id: None,
        content_type: Some("application/json".into()),
        payload: payload.clone(),
        arrived: Instant::now(),
    }
}

/// One publish of a 256-byte JSON message, then every reader at the previous head reads it:
/// the work the hub does for one message fanned out to `readers` waiters.
fn fanout(c: &mut Criterion) {
    let payload = Bytes::from(format!("{{\"v\":\"{}\"}}", "x".repeat(248)));
    for readers in [10usize, 1_000, 10_000] {
        let hub = Hub::new();
        let r = route();
        let sub = hub.subscribe(&r, "t").expect("topic");
        c.bench_function(&format!("fanout_hub_1topic_{readers}_readers_256b"), |b| {
            b.iter(|| {
                let at = match sub.topic().poll(Requested::Latest, Instant::now()) {
                    Poll::Empty { at, .. } => Requested::At(at),
                    other => panic!("{other:?}"),
                };
                hub.publish(&r, "t", message(&payload)).expect("publish");
                for _ in 0..readers {
                    black_box(sub.topic().poll(at, Instant::now()));
                }
            })
        });
    }
}

/// A parked reader that only counts its answers (the socket write is the kernel's share).
struct Counting(std::sync::atomic::AtomicUsize);

impl Parked for Counting {
    fn deliver(&self, _: u64, batch: &Arc<Batch>) {
        black_box(batch);
        self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn wake(&self, _: u64) {}
}

/// `readers` park at the head, then one publish of a 256-byte JSON message hands each its
/// batch: the hub's share of an in-place fan-out (parking, taking the list, handing out).
fn fanout_parked(c: &mut Criterion) {
    let payload = Bytes::from(format!("{{\"v\":\"{}\"}}", "x".repeat(248)));
    for readers in [10usize, 1_000, 10_000] {
        let hub = Hub::new();
        let r = route();
        let sub = hub.subscribe(&r, "t").expect("topic");
        let parked: Vec<Arc<Counting>> =
            (0..readers).map(|_| Arc::new(Counting(0.into()))).collect();
        c.bench_function(&format!("fanout_hub_1topic_{readers}_parked_256b"), |b| {
            b.iter(|| {
                let generation = match sub.topic().poll(Requested::Latest, Instant::now()) {
                    Poll::Empty { generation, .. } => generation,
                    other => panic!("{other:?}"),
                };
                for (ticket, reader) in parked.iter().enumerate() {
                    let reader: Arc<dyn Parked> = reader.clone();
                    sub.topic().park(generation, reader, ticket as u64);
                }
                hub.publish(&r, "t", message(&payload)).expect("publish");
            })
        });
    }
}

fn cursors(c: &mut Criterion) {
    let cursor = Cursor {
        binding: 0x1234_5678_9abc_def0,
        epoch: 42,
        seq: 1_000_000,
    };
    let text = cursor.encode();
    c.bench_function("cursor_encode", |b| b.iter(|| black_box(cursor).encode()));
    c.bench_function("cursor_decode", |b| {
        b.iter(|| Cursor::decode(black_box(&text)))
    });
}

fn routes(n: usize) -> String {
    let mut text = String::from("[listeners.p]\naddress = \"127.0.0.1:0\"\n");
    for i in 0..n {
        text.push_str(&format!(
            "[routes.r{i}]\npath = \"/api{i}/{{id}}/events\"\nkind = \"poll\"\n\
             source.type = \"publish\"\nauth = \"public\"\nparams.id = \"[0-9]{{1,20}}\"\n"
        ));
    }
    text
}

fn router(c: &mut Criterion) {
    for n in [10usize, 100] {
        let config = Config::from_toml(&routes(n), Path::new(".")).expect("config");
        let router = Router::new(&config.routes);
        let path = format!("/api{}/12345/events", n - 1);
        c.bench_function(&format!("router_match_{n}_routes"), |b| {
            b.iter(|| router.resolve(&config.routes, black_box(&path)))
        });
    }
}

/// 1,000 messages of 256 bytes, fed in 4 KiB chunks as they come off a socket.
fn decoders(c: &mut Criterion) {
    let payload = "x".repeat(240);
    let mut sse = String::new();
    let mut ndjson = String::new();
    for i in 0..1_000 {
        sse.push_str(&format!("id: {i}\ndata: {payload}\n\n"));
        ndjson.push_str(&format!("{{\"id\":{i},\"v\":\"{payload}\"}}\n"));
    }
    c.bench_function("decode_sse_1000_events_256b_4k_chunks", |b| {
        b.iter(|| {
            let mut d = pollmux::source::sse::Decoder::new(1 << 20, 1 << 20);
            let mut out = Vec::with_capacity(1_000);
            for chunk in sse.as_bytes().chunks(4096) {
                d.feed(chunk, &mut out).expect("valid stream");
            }
            black_box(out)
        })
    });
    c.bench_function("decode_ndjson_1000_lines_256b_4k_chunks", |b| {
        b.iter(|| {
            let mut d = pollmux::source::ndjson::Decoder::new(1 << 20, "/id");
            let mut out = Vec::with_capacity(1_000);
            for chunk in ndjson.as_bytes().chunks(4096) {
                d.feed(chunk, &mut out).expect("valid stream");
            }
            black_box(out)
        })
    });
}

criterion_group!(benches, fanout, fanout_parked, cursors, router, decoders);
criterion_main!(benches);
