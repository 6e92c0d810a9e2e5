//! CORS on poll routes over real sockets (docs/protocol.md 1.6): credentialed requests with the
//! exact origin reflected, the `Authorization` preflight, the wildcard, and refusals a browser
//! can read.

use http::{HeaderMap, Request};

use crate::common::*;

/// A poll route with `route` added to its keys.
fn config(route: &str) -> TestConfig {
    let news = r#"
path = "/news/{channel}"
kind = "poll"
source.type = "publish"
hold = "60s"
max_hold = "60s"
"#;
    TestConfig::new().route("news", &format!("{news}{route}"))
}

const APP: &str = "https://app.example";

async fn preflight(gw: &Gateway, origin: &str, headers: &str) -> (u16, HeaderMap) {
    let req = Request::options("/news/a")
        .header("host", "t")
        .header("origin", origin)
        .header("access-control-request-method", "GET")
        .header("access-control-request-headers", headers)
        .body(full(""))
        .unwrap();
    let resp = send(gw.addr(), req).await;
    (resp.status().as_u16(), resp.headers().clone())
}

async fn poll(gw: &Gateway, origin: &str, authorization: Option<&str>) -> (u16, HeaderMap) {
    let mut req = Request::get("/news/a?timeout=0")
        .header("host", "t")
        .header("origin", origin);
    if let Some(a) = authorization {
        req = req.header("authorization", a);
    }
    let resp = send(gw.addr(), req.body(full("")).unwrap()).await;
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    body_bytes(resp).await;
    (status, headers)
}

#[tokio::test]
async fn credentialed_polls_get_their_exact_origin_and_allow_credentials() {
    let route =
        format!("auth = \"public\"\ncors = {{ origins = [\"{APP}\"], credentials = true }}");
    let gw = Gateway::start(&config(&route).toml()).await;
    let (status, h) = preflight(&gw, APP, "authorization").await;
    assert_eq!(status, 204);
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["access-control-allow-methods"], "GET");
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    assert!(
        allowed
            .split(", ")
            .any(|a| a.eq_ignore_ascii_case("authorization")),
        "{allowed}"
    );
    assert_eq!(h["access-control-max-age"], "600");
    assert_eq!(h["vary"], "Origin");

    let (status, h) = poll(&gw, APP, Some("Bearer t")).await;
    assert_eq!(status, 200);
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["vary"], "Origin");

    // Another origin gets nothing to read, credentials or not.
    let (status, h) = poll(&gw, "https://evil.example", Some("Bearer t")).await;
    assert_eq!(status, 403);
    assert!(h.get("access-control-allow-origin").is_none());
    assert!(h.get("access-control-allow-credentials").is_none());
    let (status, h) = preflight(&gw, "https://evil.example", "authorization").await;
    assert_eq!(status, 403);
    assert!(h.get("access-control-allow-origin").is_none());
    assert!(h.get("access-control-allow-headers").is_none());
}

#[tokio::test]
async fn without_credentials_the_answer_does_not_allow_them() {
    let route = format!("auth = \"public\"\ncors.origins = [\"{APP}\"]");
    let gw = Gateway::start(&config(&route).toml()).await;
    let (status, h) = poll(&gw, APP, None).await;
    assert_eq!(status, 200);
    assert_eq!(h["access-control-allow-origin"], APP);
    assert!(h.get("access-control-allow-credentials").is_none());
    // `Authorization` is allowed in preflights all the same: a bearer token is no cookie.
    let (_, h) = preflight(&gw, APP, "authorization").await;
    let allowed = h["access-control-allow-headers"].to_str().unwrap();
    assert_eq!(allowed, "Authorization, Last-Event-ID");
}

#[tokio::test]
async fn a_wildcard_lets_any_origin_read_without_credentials() {
    let gw = Gateway::start(&config("auth = \"public\"\ncors.origins = [\"*\"]").toml()).await;
    for origin in [APP, "http://localhost:5173"] {
        let (status, h) = poll(&gw, origin, None).await;
        assert_eq!(status, 200);
        assert_eq!(h["access-control-allow-origin"], "*");
        assert!(h.get("vary").is_none(), "the answer is the same for all");
        assert!(h.get("access-control-allow-credentials").is_none());
    }
    let (status, h) = preflight(&gw, APP, "authorization").await;
    assert_eq!(status, 204);
    assert_eq!(h["access-control-allow-origin"], "*");
}

/// A hook's refusal reaches the page with its CORS headers, so the page can react (sign in)
/// instead of seeing a network error; the preflight allows the hook's credential headers.
#[tokio::test]
async fn refusals_and_hook_headers_are_readable_cross_origin() {
    let hook = Upstream::start(|_req| async { text_response(401, "no") }).await;
    let route = format!(
        "cors = {{ origins = [\"{APP}\"], credentials = true }}\n\
         auth = {{ hook = {{ upstream = \"auth\", path = \"/check\", headers = [\"authorization\", \"x-api-key\", \"cookie\"] }} }}"
    );
    let gw = Gateway::start(&config(&route).upstream("auth", &hook.url()).toml()).await;
    let (_, h) = preflight(&gw, APP, "x-api-key").await;
    assert_eq!(
        h["access-control-allow-headers"],
        "Authorization, Last-Event-ID, x-api-key"
    );
    let (status, h) = poll(&gw, APP, Some("Bearer wrong")).await;
    assert_eq!(status, 401);
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-credentials"], "true");
}

/// A poll held on the cleartext HTTP/1.1 path and answered in place by the publisher carries
/// the same credentialed CORS headers as one answered at once.
#[tokio::test]
async fn a_held_poll_answered_in_place_allows_credentials() {
    let route =
        format!("auth = \"public\"\ncors = {{ origins = [\"{APP}\"], credentials = true }}");
    let gw = Gateway::start(&config(&route).toml()).await;
    let addr = gw.addr();
    let held = tokio::spawn(async move {
        let req = Request::get("/news/held?timeout=50")
            .header("host", "t")
            .header("origin", APP)
            .header("authorization", "Bearer t")
            .body(full(""))
            .unwrap();
        let resp = send(addr, req).await;
        let headers = resp.headers().clone();
        (headers, body_json(resp).await)
    });
    eventually("the poll is held", || async {
        gw.metric(r#"pollmux_polls_active{route="news"}"#).await == 1.0
    })
    .await;
    publish(gw.admin, "news/held", "text/plain", "hi").await;
    let (h, body) = held.await.unwrap();
    assert_eq!(body["messages"][0]["data"], "hi");
    assert_eq!(h["access-control-allow-origin"], APP);
    assert_eq!(h["access-control-allow-credentials"], "true");
    assert_eq!(h["vary"], "Origin");
}
