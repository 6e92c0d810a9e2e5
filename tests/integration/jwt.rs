//! JWT authorization: every malformed, forged or out-of-date token is 401 with
//! `Bearer error="invalid_token"`; a token reads only the topics it lists; a hold ends when its
//! token expires.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use http::Request;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::json;

use crate::common::*;

struct Keys {
    private_pem: String,
    public_pem: String,
    dir: tempfile::TempDir,
}

fn rsa_keys() -> Keys {
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_RSA_SHA256).unwrap();
    let keys = Keys {
        private_pem: pair.serialize_pem(),
        public_pem: pair.public_key_pem(),
        dir: tempfile::tempdir().unwrap(),
    };
    std::fs::write(keys.dir.path().join("jwt.pem"), &keys.public_pem).unwrap();
    keys
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that pass, for topics `orders:*` and `news`.
fn good_claims() -> serde_json::Value {
    json!({
        "iss": "https://id.example",
        "aud": "pollmux",
        "exp": now() + 600,
        "sub": "user-1",
        "topics": ["orders:*", "news"],
    })
}

fn sign(keys: &Keys, kid: Option<&str>, claims: &serde_json::Value) -> String {
    let mut header = Header::new(Algorithm::RS256);
    header.kid = kid.map(str::to_owned);
    let key = EncodingKey::from_rsa_pem(keys.private_pem.as_bytes()).unwrap();
    jsonwebtoken::encode(&header, claims, &key).unwrap()
}

fn config(auth: &str) -> String {
    let orders = format!(
        r#"
path = "/orders/{{id}}"
topic = "orders:{{id}}"
kind = "poll"
source.type = "publish"
auth = {{ jwt = {{ issuer = "https://id.example", audience = "pollmux", {auth}, leeway = "0s" }} }}
hold = "55s"
max_hold = "55s"
"#
    );
    TestConfig::new().route("orders", &orders).toml()
}

async fn poll(
    conn: &mut Conn,
    path: &str,
    token: Option<&str>,
) -> (u16, http::HeaderMap, serde_json::Value) {
    let mut req = Request::get(path).header("host", "t");
    if let Some(t) = token {
        req = req.header("authorization", format!("Bearer {t}"));
    }
    let resp = conn.send(req.body(full("")).unwrap()).await;
    let (status, headers) = (resp.status().as_u16(), resp.headers().clone());
    (status, headers, body_json(resp).await)
}

const INVALID: &str = "Bearer error=\"invalid_token\"";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_and_out_of_date_tokens_are_refused() {
    let keys = rsa_keys();
    let gw = Gateway::start_in(&config("key_file = \"jwt.pem\""), keys.dir.path()).await;
    let mut conn = Conn::open(gw.addr()).await;

    let good = sign(&keys, None, &good_claims());
    let (status, _, _) = poll(&mut conn, "/orders/42?timeout=0", Some(&good)).await;
    assert_eq!(status, 200);

    let b64 = |v: &serde_json::Value| URL_SAFE_NO_PAD.encode(v.to_string());
    let unsigned = format!(
        "{}.{}.",
        b64(&json!({"alg": "none", "typ": "JWT"})),
        b64(&good_claims())
    );
    // HS256 with the RSA public key as the HMAC secret: the classic key-confusion forgery.
    let confused = jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        &good_claims(),
        &EncodingKey::from_secret(keys.public_pem.as_bytes()),
    )
    .unwrap();
    let with = |key: &str, value: serde_json::Value| {
        let mut c = good_claims();
        c[key] = value;
        sign(&keys, None, &c)
    };
    let mut no_exp = good_claims();
    no_exp.as_object_mut().unwrap().remove("exp");
    let other_key = rsa_keys();
    let cases = [
        ("alg none", unsigned),
        ("HS256 signed with the public key", confused),
        ("wrong audience", with("aud", json!("someone-else"))),
        ("wrong issuer", with("iss", json!("https://evil.example"))),
        ("expired", with("exp", json!(now() - 60))),
        ("not yet valid", with("nbf", json!(now() + 600))),
        ("no exp", sign(&keys, None, &no_exp)),
        (
            "signed by another key",
            sign(&other_key, None, &good_claims()),
        ),
        ("garbage", "a.b.c".to_owned()),
    ];
    for (what, token) in cases {
        let (status, headers, body) = poll(&mut conn, "/orders/42?timeout=0", Some(&token)).await;
        assert_eq!(status, 401, "{what}");
        assert_eq!(headers["www-authenticate"], INVALID, "{what}");
        assert_eq!(body["type"], "urn:pollmux:problem:unauthorized", "{what}");
    }
    // No token at all: a plain challenge.
    let (status, headers, _) = poll(&mut conn, "/orders/42?timeout=0", None).await;
    assert_eq!(
        (status, &headers["www-authenticate"]),
        (401, &"Bearer".parse().unwrap())
    );
    // A valid token for other topics only.
    let mut narrow = good_claims();
    narrow["topics"] = json!(["orders:7"]);
    let (status, headers, body) = poll(
        &mut conn,
        "/orders/42?timeout=0",
        Some(&sign(&keys, None, &narrow)),
    )
    .await;
    assert_eq!(status, 403);
    assert_eq!(
        headers["www-authenticate"],
        "Bearer error=\"insufficient_scope\""
    );
    assert_eq!(body["type"], "urn:pollmux:problem:forbidden");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_expiring_mid_hold_ends_the_hold() {
    let keys = rsa_keys();
    let gw = Gateway::start_in(&config("key_file = \"jwt.pem\""), keys.dir.path()).await;
    let mut conn = Conn::open(gw.addr()).await;
    let mut claims = good_claims();
    claims["exp"] = json!(now() + 2);
    let token = sign(&keys, None, &claims);
    // Asked to hold 55 s (longer than the test's response bound), the poll is answered (empty,
    // as a hold ends) when the token expires.
    let (status, _, body) = poll(&mut conn, "/orders/42?timeout=55", Some(&token)).await;
    assert_eq!(status, 200);
    assert_eq!(body["messages"], json!([]));
    // From then on the token is refused.
    eventually("the expired token to be refused", || async {
        let mut conn = Conn::open(gw.addr()).await;
        poll(&mut conn, "/orders/42?timeout=0", Some(&token))
            .await
            .0
            == 401
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_come_from_a_jwks_by_kid() {
    let keys = rsa_keys();
    let encoding = EncodingKey::from_rsa_pem(keys.private_pem.as_bytes()).unwrap();
    let mut jwk = Jwk::from_encoding_key(&encoding, Algorithm::RS256).unwrap();
    jwk.common.key_id = Some("k1".into());
    let jwks = serde_json::to_string(&JwkSet { keys: vec![jwk] }).unwrap();
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = fetches.clone();
    let upstream = Upstream::start(move |_req| {
        counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let jwks = jwks.clone();
        async move { text_response(200, &jwks) }
    })
    .await;
    let auth = format!("jwks_url = \"{}/.well-known/jwks.json\"", upstream.url());
    let gw = Gateway::start(&config(&auth)).await;
    let mut conn = Conn::open(gw.addr()).await;
    let good = sign(&keys, Some("k1"), &good_claims());
    for _ in 0..3 {
        let (status, _, _) = poll(&mut conn, "/orders/42?timeout=0", Some(&good)).await;
        assert_eq!(status, 200);
    }
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the set is cached"
    );
    // An unknown kid asks the key server again at most once per interval, then is refused.
    let unknown = sign(&keys, Some("k2"), &good_claims());
    for _ in 0..3 {
        let (status, headers, _) = poll(&mut conn, "/orders/42?timeout=0", Some(&unknown)).await;
        assert_eq!(
            (status, &headers["www-authenticate"]),
            (401, &INVALID.parse().unwrap())
        );
    }
    assert!(fetches.load(std::sync::atomic::Ordering::SeqCst) <= 2);
}
