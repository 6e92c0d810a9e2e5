//! HTTP/2 clients that stall or flood: a stream the client gives no window is reset at the
//! write timeout, with the upstream request (or the poll) behind it; PING and SETTINGS floods
//! end their connection. Over real sockets, against the real gateway.

use std::convert::Infallible;

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, StreamBody};
use hyper::body::Frame;
use hyper_util::rt::{TokioExecutor, TokioIo};
use pollmux::upstream::{Body, BoxError};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::mpsc;

use crate::common::*;
use crate::listeners::read_frame;

/// An h2c listener, a proxy route to `upstream` and a poll route, with a 1 s write timeout.
fn config(upstream: &str) -> String {
    TestConfig::new()
        .listener("h2c", "http2 = true")
        .limits("write_timeout = \"1s\"")
        .upstream("api", upstream)
        .route("api", "path = \"/api/{*rest}\"\nkind = \"proxy\"\nupstream = \"api\"\n")
        .route(
            "news",
            "path = \"/news/{topic}\"\nkind = \"poll\"\nauth = \"public\"\nsource = { type = \"publish\" }\n",
        )
        .toml()
}

/// An HTTP/2 client over h2c whose streams start with `window` bytes of receive window.
async fn client(gw: &Gateway, window: u32) -> hyper::client::conn::http2::SendRequest<Body> {
    let stream = TcpStream::connect(gw.addr_of("h2c")).await.unwrap();
    let (sender, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .initial_stream_window_size(window)
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2 handshake");
    // The connection task answers the server's PINGs: the client is alive, only stalled.
    tokio::spawn(conn);
    sender
}

/// An upstream that streams 16 KiB chunks for as long as it is read: 64 of them for
/// `/api/1m`, else 4,096 (64 MiB, more than the sockets on the way buffer); it says on
/// `released` when its response body is dropped before its end.
async fn endless_upstream() -> (Upstream, mpsc::UnboundedReceiver<()>) {
    let (released_tx, released) = mpsc::unbounded_channel();
    let upstream = Upstream::start(move |req: Request<hyper::body::Incoming>| {
        let released_tx = released_tx.clone();
        let chunks = if req.uri().path() == "/api/1m" {
            64
        } else {
            4096
        };
        async move {
            let (tx, rx) = mpsc::channel::<Bytes>(1);
            tokio::spawn(async move {
                for _ in 0..chunks {
                    if tx.send(Bytes::from(vec![b'x'; 16 * 1024])).await.is_err() {
                        let _ = released_tx.send(());
                        return;
                    }
                }
            });
            let chunks = futures_util::stream::unfold(rx, |mut rx| async move {
                let chunk = rx.recv().await?;
                Some((Ok::<_, BoxError>(Frame::data(chunk)), rx))
            });
            http::Response::new(BodyExt::boxed(StreamBody::new(chunks)))
        }
    })
    .await;
    (upstream, released)
}

#[tokio::test]
async fn a_proxied_stream_without_window_is_reset_and_its_upstream_request_released() {
    let (upstream, mut released) = endless_upstream().await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    let mut stalled = client(&gw, 0).await;
    let req = Request::get("/api/big").body(full("")).unwrap();
    let resp = tokio::time::timeout(WAIT, stalled.send_request(req))
        .await
        .expect("response head")
        .expect("response");
    assert_eq!(resp.status(), 200);
    // No window: no byte of the body can come; the stream is reset at the write timeout.
    let mut body = resp.into_body();
    let frame = tokio::time::timeout(WAIT, body.frame())
        .await
        .expect("the stalled stream was not reset");
    assert!(
        matches!(frame, Some(Err(_))),
        "a stream with no window ended without a reset"
    );
    tokio::time::timeout(WAIT, released.recv())
        .await
        .expect("the upstream request was not released");
    // A client that opens its window gets the whole answer, window after window.
    let mut reading = client(&gw, 65_535).await;
    let req = Request::get("/api/1m").body(full("")).unwrap();
    let resp = reading.send_request(req).await.unwrap();
    let bytes = tokio::time::timeout(WAIT, resp.into_body().collect())
        .await
        .expect("whole body")
        .unwrap()
        .to_bytes();
    assert_eq!(bytes.len(), 64 * 16 * 1024);
}

#[tokio::test]
async fn a_poll_answer_without_window_is_reset() {
    let (upstream, _released) = endless_upstream().await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    let mut stalled = client(&gw, 0).await;
    let held = tokio::spawn(async move {
        let req = Request::get("/news/a").body(full("")).unwrap();
        let resp = stalled.send_request(req).await.expect("response");
        let status = resp.status();
        let frame = tokio::time::timeout(WAIT, resp.into_body().frame()).await;
        (status, frame.map(|f| matches!(f, Some(Err(_)))))
    });
    let held_polls = r#"pollmux_polls_active{route="news"}"#;
    eventually("the poll to be held", || async {
        gw.metric(held_polls).await == 1.0
    })
    .await;
    let (status, _) = publish(gw.admin, "news/a", "text/plain", "hello").await;
    assert_eq!(status, 202);
    let (status, reset) = tokio::time::timeout(WAIT, held).await.unwrap().unwrap();
    assert_eq!(status, 200);
    assert_eq!(
        reset,
        Ok(true),
        "the unread answer was not reset at the write timeout"
    );
}

const SETTINGS: u8 = 0x4;
const PING: u8 = 0x6;

/// Sends the preface, then `count` frames of `kind` at once; returns how many answers (ACKs of
/// that kind) came before the connection ended, and whether it ended.
async fn flood(gw: &Gateway, kind: u8, count: usize) -> (usize, bool) {
    let mut stream = TcpStream::connect(gw.addr_of("h2c")).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    let payload: &[u8] = if kind == PING { &[1; 8] } else { &[] };
    for _ in 0..count {
        out.extend_from_slice(&[0, 0, payload.len() as u8, kind, 0, 0, 0, 0, 0]);
        out.extend_from_slice(payload);
    }
    let (mut read, mut write) = stream.split();
    let writer = async {
        // The server may close before it has read all of it.
        let _ = write.write_all(&out).await;
        std::future::pending::<Infallible>().await
    };
    let reader = async {
        let mut acks = 0;
        while let Some((k, flags, _)) = read_frame(&mut read).await {
            acks += usize::from(k == kind && flags & 0x1 != 0);
        }
        acks
    };
    tokio::select! {
        _ = writer => unreachable!(),
        acks = tokio::time::timeout(WAIT, reader) => match acks {
            Ok(acks) => (acks, true),
            Err(_) => (count, false),
        },
    }
}

#[tokio::test]
async fn ping_and_settings_floods_end_their_connection() {
    let (upstream, _released) = endless_upstream().await;
    let gw = Gateway::start(&config(&upstream.url())).await;
    for kind in [PING, SETTINGS] {
        let (acks, closed) = flood(&gw, kind, 20_000).await;
        assert!(closed, "a flood of frame type {kind} kept its connection");
        assert!(
            acks < 1_000,
            "{acks} answers to a flood of frame type {kind}"
        );
    }
    // A client that pings now and then is served as before.
    let mut normal = client(&gw, 65_535).await;
    let req = Request::get("/api/small").body(full("")).unwrap();
    assert_eq!(normal.send_request(req).await.unwrap().status(), 200);
}
