//! Listeners over real sockets: HTTP/1.1, h2c prior knowledge, TLS with ALPN, size limits,
//! header read timeout, the connection limit, and HTTPS upstreams.

use std::sync::Arc;

use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::common::*;

/// A cleartext listener `public` and an h2c one, `h2c`.
fn plain() -> TestConfig {
    TestConfig::new()
        .listener("h2c", "http2 = true")
        .limits("header_read_timeout = \"500ms\"")
}

#[tokio::test]
async fn h2c_prior_knowledge_and_http1_share_a_listener() {
    let gw = Gateway::start(&plain().toml()).await;
    let addr = gw.addr_of("h2c");
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("h2 handshake");
    tokio::spawn(conn);
    let req = Request::get(format!("http://{addr}/nothing"))
        .body(full(""))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 404);
    let open = r#"pollmux_connections_open{listener="h2c",protocol="http2"}"#;
    assert_eq!(gw.metric(open).await, 1.0);

    let resp = get(addr, "/nothing").await;
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn h2_preface_is_refused_where_http2_is_off() {
    let gw = Gateway::start(&plain().toml()).await;
    let answer = raw_exchange(gw.addr_of("public"), b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").await;
    assert!(!answer.starts_with("HTTP/1.1 2"), "{answer}");
}

#[tokio::test]
async fn oversized_uri_is_414_and_headers_431() {
    let gw = Gateway::start(&plain().toml()).await;
    let long_path = format!("/{}", "a".repeat(9 * 1024));
    let resp = get(gw.addr(), &long_path).await;
    assert_eq!(resp.status(), 414);
    let body = body_json(resp).await;
    assert_eq!(body["type"], "urn:pollmux:problem:uri-too-long");

    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "b".repeat(20 * 1024)
    );
    let answer = raw_exchange(gw.addr(), big.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");

    let mut many = String::from("GET / HTTP/1.1\r\nHost: x\r\n");
    for i in 0..80 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let answer = raw_exchange(gw.addr(), many.as_bytes()).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
}

#[tokio::test]
async fn slow_headers_are_cut_at_the_header_read_timeout() {
    let gw = Gateway::start(&plain().toml()).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    let mut out = Vec::new();
    // The server closes the connection by itself (header_read_timeout = 500ms); WAIT only bounds
    // the test if it does not.
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("connection closed by the server")
        .ok();
    let text = String::from_utf8_lossy(&out);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
}

#[tokio::test]
async fn connections_over_the_limit_get_503_and_others_keep_working() {
    let config = plain().limits("max_connections = 2").toml();
    let gw = Gateway::start(&config).await;
    let addr = gw.addr_of("public");
    let open = r#"pollmux_connections_open{listener="public",protocol="http1"}"#;
    let mut held = Vec::new();
    for _ in 0..2 {
        let stream = TcpStream::connect(addr).await.unwrap();
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .unwrap();
        tokio::spawn(conn);
        let req = Request::get("/x")
            .header("host", "x")
            .body(full(""))
            .unwrap();
        assert_eq!(sender.send_request(req).await.unwrap().status(), 404);
        held.push(sender);
    }
    assert_eq!(gw.metric(open).await, 2.0);
    let resp = get(addr, "/x").await;
    assert_eq!(resp.status(), 503);
    assert_eq!(resp.headers()["retry-after"], "1");
    let body = body_json(resp).await;
    assert_eq!(body["type"], "urn:pollmux:problem:overloaded");
    let rejected = r#"pollmux_connections_rejected_total{listener="public"}"#;
    assert_eq!(gw.metric(rejected).await, 1.0);

    // Existing connections are still served.
    let req = Request::get("/x")
        .header("host", "x")
        .body(full(""))
        .unwrap();
    assert_eq!(held[0].send_request(req).await.unwrap().status(), 404);

    // Closing one frees its place for a new client.
    held.pop();
    eventually("a connection to close", || async {
        gw.metric(open).await <= 1.0
    })
    .await;
    assert_eq!(get(addr, "/x").await.status(), 404);
}

pub struct Pki {
    pub dir: tempfile::TempDir,
    pub cert: CertificateDer<'static>,
}

/// A self-signed certificate for `localhost`: cert.pem and key.pem in a temporary directory.
pub fn pki() -> Pki {
    let key = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), key.cert.pem()).unwrap();
    std::fs::write(dir.path().join("key.pem"), key.signing_key.serialize_pem()).unwrap();
    Pki {
        cert: key.cert.der().clone(),
        dir,
    }
}

/// A TLS client trusting only `pki`'s certificate.
pub fn client_tls(pki: &Pki, alpn: &[&[u8]]) -> tokio_rustls::TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(pki.cert.clone()).unwrap();
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    tokio_rustls::TlsConnector::from(Arc::new(config))
}

/// A TLS listener `secure` with [`pki`]'s certificate, for a gateway started in its directory.
pub fn tls_config() -> TestConfig {
    TestConfig::with_listener(
        "secure",
        "tls.cert_file = \"cert.pem\"\ntls.key_file = \"key.pem\"",
    )
}

#[tokio::test]
async fn tls_listener_picks_h2_or_http1_by_alpn() {
    let pki = pki();
    let gw = Gateway::start_in(&tls_config().toml(), pki.dir.path()).await;
    let addr = gw.addr();
    let name = ServerName::try_from("localhost").unwrap();

    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = client_tls(&pki, &[b"h2", b"http/1.1"])
        .connect(name.clone(), tcp)
        .await
        .expect("TLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .unwrap();
    tokio::spawn(conn);
    let req = Request::get("https://localhost/none")
        .body(full(""))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), 404);

    let tcp = TcpStream::connect(addr).await.unwrap();
    let tls = client_tls(&pki, &[b"http/1.1"])
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
        .await
        .unwrap();
    tokio::spawn(conn);
    let req = Request::get("/none")
        .header("host", "localhost")
        .body(full(""))
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_11);
    assert_eq!(resp.status(), 404);

    let h2 = r#"pollmux_connections_open{listener="secure",protocol="http2"}"#;
    let h1 = r#"pollmux_connections_open{listener="secure",protocol="http1"}"#;
    assert_eq!(gw.metric(h2).await, 1.0);
    assert_eq!(gw.metric(h1).await, 1.0);
}

#[tokio::test]
async fn proxy_reaches_an_https_upstream_with_its_ca_file() {
    let pki = pki();
    // The fake upstream serves TLS with the same certificate the gateway trusts via ca_file.
    let server_config = pollmux_tls_server(
        &pki.dir.path().join("cert.pem"),
        &pki.dir.path().join("key.pem"),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(server_config);
    let upstream = tokio::spawn(async move {
        loop {
            let (tcp, _) = listener.accept().await.unwrap();
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, std::convert::Infallible>(text_response(200, "secure upstream"))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    let config = TestConfig::new()
        .upstream_with(
            "secure",
            &format!("https://localhost:{}", up_addr.port()),
            "ca_file = \"cert.pem\"",
        )
        .route(
            "s",
            "path = \"/s\"\nkind = \"proxy\"\nupstream = \"secure\"",
        )
        .toml();
    let gw = Gateway::start_in(&config, pki.dir.path()).await;
    let resp = get(gw.addr(), "/s").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(body_string(resp).await, "secure upstream");
    upstream.abort();
}

fn pollmux_tls_server(cert: &std::path::Path, key: &std::path::Path) -> Arc<rustls::ServerConfig> {
    let config = format!(
        "[listeners.t]\naddress = \"127.0.0.1:0\"\ntls.cert_file = \"{}\"\ntls.key_file = \"{}\"\n",
        cert.display(),
        key.display()
    );
    let parsed = pollmux::config::Config::from_toml(&config, std::path::Path::new("/")).unwrap();
    let mut server = (*parsed.listeners[0].tls.as_ref().unwrap().server_config).clone();
    // This fake upstream speaks HTTP/1.1 only.
    server.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(server)
}

#[tokio::test]
async fn silent_tls_clients_are_cut_at_the_handshake_timeout() {
    let pki = pki();
    let config = tls_config()
        .limits("tls_handshake_timeout = \"300ms\"")
        .toml();
    let gw = Gateway::start_in(&config, pki.dir.path()).await;
    let mut s = TcpStream::connect(gw.addr()).await.unwrap();
    let mut out = Vec::new();
    // The server closes by itself after 300ms; WAIT only bounds the test if it does not.
    let n = tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("connection closed by the server")
        .unwrap_or(0);
    assert_eq!(n, 0, "no bytes for a client that never said hello");
    // The listener still serves a real client.
    let tcp = TcpStream::connect(gw.addr()).await.unwrap();
    let name = ServerName::try_from("localhost").unwrap();
    client_tls(&pki, &[b"http/1.1"])
        .connect(name, tcp)
        .await
        .expect("TLS handshake");
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_header_read_timeout() {
    let gw = Gateway::start(&plain().toml()).await;
    let mut s = TcpStream::connect(gw.addr_of("public")).await.unwrap();
    s.write_all(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    // After its answer the connection idles; the server closes it by itself (500 ms here);
    // WAIT only bounds the test if it does not.
    tokio::time::timeout(WAIT, s.read_to_end(&mut out))
        .await
        .expect("idle connection closed by the server")
        .unwrap();
    let text = String::from_utf8_lossy(&out);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert_eq!(text.matches("HTTP/1.1").count(), 1, "{text}");
}

/// One HTTP/2 frame read off a raw connection: (type, flags, payload).
pub(crate) async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
    stream: &mut R,
) -> Option<(u8, u8, Vec<u8>)> {
    let mut head = [0u8; 9];
    stream.read_exact(&mut head).await.ok()?;
    let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
    let mut payload = vec![0u8; len];
    stream.read_exact(&mut payload).await.ok()?;
    Some((head[3], head[4], payload))
}

#[tokio::test]
async fn http2_announces_its_stream_limit_and_drops_clients_that_ignore_pings() {
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    let config = TestConfig::new()
        .listener("h2c", "http2 = true")
        .limits("http2_max_concurrent_streams = 7\nhttp2_keep_alive_interval = \"200ms\"")
        .toml();
    let gw = Gateway::start(&config).await;
    let mut stream = TcpStream::connect(gw.addr_of("h2c")).await.unwrap();
    // The client preface and an empty SETTINGS frame; the client then goes silent.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await
        .unwrap();
    let (kind, _, payload) = read_frame(&mut stream).await.expect("server SETTINGS");
    assert_eq!(kind, SETTINGS);
    let announced = payload.chunks(6).find_map(|s| {
        (u16::from_be_bytes([s[0], s[1]]) == MAX_CONCURRENT_STREAMS)
            .then(|| u32::from_be_bytes([s[2], s[3], s[4], s[5]]))
    });
    assert_eq!(announced, Some(7));
    // Pings come, go unanswered, and the server closes the connection.
    let mut pinged = false;
    let closed = tokio::time::timeout(WAIT, async {
        while let Some((kind, flags, _)) = read_frame(&mut stream).await {
            // A PING that is not an ACK is the server's keep-alive probe.
            pinged |= kind == PING && flags & 0x1 == 0;
        }
    })
    .await;
    assert!(closed.is_ok(), "the connection was not closed");
    assert!(pinged, "no keep-alive ping was sent");
    let open = r#"pollmux_connections_open{listener="h2c",protocol="http2"}"#;
    eventually("the connection to be gone", || async {
        gw.metric(open).await == 0.0
    })
    .await;
}
