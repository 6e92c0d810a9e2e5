//! How a message's payload appears in a poll response (docs/protocol.md 1.3): JSON media types with a
//! valid JSON body are embedded as `data`; `text/*` and form-encoded bodies
//! (`application/x-www-form-urlencoded`, what `curl -d` sends) in valid UTF-8 become a JSON
//! string in `data`, exactly as sent; anything else is base64 in `data_b64`. Encoded once per message, when it arrives.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;

/// The `{"cursor":…,"id":…,"data"|"data_b64":…}` object of one message.
pub fn encode(cursor: &str, id: Option<&str>, content_type: Option<&str>, payload: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(payload.len() + cursor.len() + 64);
    out.extend_from_slice(b"{\"cursor\":");
    push_json_string(&mut out, cursor);
    out.extend_from_slice(b",\"id\":");
    match id {
        Some(id) => push_json_string(&mut out, id),
        None => out.extend_from_slice(b"null"),
    }
    let essence = content_type
        .and_then(|ct| ct.split(';').next())
        .map(|ct| ct.trim().to_ascii_lowercase())
        .unwrap_or_default();
    let is_json = essence == "application/json" || essence.ends_with("+json");
    if is_json && serde_json::from_slice::<serde::de::IgnoredAny>(payload).is_ok() {
        out.extend_from_slice(b",\"data\":");
        out.extend_from_slice(payload.trim_ascii());
    } else if let (true, Ok(text)) = (is_text(&essence), std::str::from_utf8(payload)) {
        out.extend_from_slice(b",\"data\":");
        push_json_string(&mut out, text);
    } else {
        out.extend_from_slice(b",\"data_b64\":\"");
        out.extend_from_slice(STANDARD.encode(payload).as_bytes());
        out.push(b'"');
    }
    out.push(b'}');
    Bytes::from(out)
}

/// Media types whose bodies are text: `text/*`, and form-encoded bodies, which are ASCII by
/// construction (delivered as sent, not form-decoded).
fn is_text(essence: &str) -> bool {
    essence.starts_with("text/") || essence == "application/x-www-form-urlencoded"
}

fn push_json_string(out: &mut Vec<u8>, s: &str) {
    serde_json::to_writer(out, s).expect("writing a string into a Vec cannot fail");
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    fn decoded(ct: Option<&str>, payload: &[u8]) -> Value {
        serde_json::from_slice(&encode("C", Some("id-1"), ct, payload)).unwrap()
    }

    #[test]
    fn json_is_embedded() {
        let v = decoded(
            Some("application/json; charset=utf-8"),
            b" {\"a\": [1, 2]}\n",
        );
        assert_eq!(
            v,
            json!({"cursor": "C", "id": "id-1", "data": {"a": [1, 2]}})
        );
        let v = decoded(Some("application/vnd.thing+json"), b"42");
        assert_eq!(v["data"], 42);
    }

    #[test]
    fn text_becomes_a_string_and_the_rest_base64() {
        assert_eq!(
            decoded(Some("text/plain"), b"he said \"hi\"\n")["data"],
            "he said \"hi\"\n"
        );
        assert_eq!(
            decoded(Some("application/json"), b"{broken")["data_b64"],
            "e2Jyb2tlbg=="
        );
        assert_eq!(
            decoded(Some("text/plain"), &[0xff, 0xfe])["data_b64"],
            "//4="
        );
        assert_eq!(decoded(None, b"hello")["data_b64"], "aGVsbG8=");
        let v: Value = serde_json::from_slice(&encode("C", None, None, b"")).unwrap();
        assert_eq!(v["id"], Value::Null);
    }

    /// `curl -d hello` sends `application/x-www-form-urlencoded`: a first publish must read back.
    #[test]
    fn form_encoded_bodies_are_text_as_sent() {
        let form = "application/x-www-form-urlencoded";
        assert_eq!(decoded(Some(form), b"hello")["data"], "hello");
        assert_eq!(decoded(Some(form), b"a=1&b=x%20y")["data"], "a=1&b=x%20y");
        assert_eq!(
            decoded(
                Some("Application/X-WWW-Form-URLEncoded; charset=utf-8"),
                b"k=v"
            )["data"],
            "k=v"
        );
        assert_eq!(decoded(Some(form), &[0xff])["data_b64"], "/w==");
    }
}
