//! The answers of a poll route: a batch, the empty answer, and its problems.

use bytes::Bytes;
use http::Response;
use http::StatusCode;
use http::header::{self, HeaderValue};
use http_body_util::{BodyExt, Full};

use crate::hub::cursor::Cursor;
use crate::hub::{Batch, TooManyTopics};
use crate::metrics::Outcome;
use crate::problem::Problem;
use crate::upstream::Body;

pub(super) const POLL_CURSOR: &str = "poll-cursor";
const POLL_GAP: &str = "poll-gap";

/// The 503 for a topic that cannot be made.
pub fn rejected_full(full: TooManyTopics) -> (Response<Body>, Outcome) {
    match full {
        TooManyTopics::Route => rejected(
            Problem::TooManyTopics,
            "the route has reached its max_topics",
            None,
        ),
        TooManyTopics::Memory => rejected(
            Problem::Overloaded,
            "the topics' buffers have reached max_buffered_bytes",
            None,
        ),
        TooManyTopics::Retired => rejected(
            Problem::Overloaded,
            "the route was just reloaded; poll again",
            None,
        ),
    }
}

pub(super) fn rejected(
    problem: Problem,
    detail: &str,
    extra: Option<&[(&str, &str)]>,
) -> (Response<Body>, Outcome) {
    let resp = problem.response_with(Some(detail), extra.unwrap_or_default());
    (resp, problem.outcome())
}

/// The answer with a batch of messages (without CORS headers).
pub fn batch_response(batch: &Batch) -> Response<Body> {
    // Shares the batch's bytes: every waiter's header is a reference count, not a copy.
    let cursor =
        HeaderValue::from_maybe_shared(batch.cursor.clone()).expect("cursors are URL-safe ASCII");
    poll_response(batch.body.clone(), cursor, batch.gap, false)
}

pub(super) fn empty_response(at: &Cursor, close: bool) -> Response<Body> {
    let cursor = at.encode();
    let body = format!("{{\"cursor\":\"{cursor}\",\"messages\":[],\"more\":false}}");
    let header = HeaderValue::from_str(&cursor).expect("cursors are URL-safe ASCII");
    poll_response(Bytes::from(body), header, false, close)
}

pub(super) fn poll_response(
    body: Bytes,
    cursor: HeaderValue,
    gap: bool,
    close: bool,
) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).map_err(|never| match never {}).boxed());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(POLL_CURSOR, cursor);
    if gap {
        h.insert(POLL_GAP, HeaderValue::from_static("1"));
    }
    if close {
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}
