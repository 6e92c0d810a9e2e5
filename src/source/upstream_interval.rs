//! The `upstream-interval` source: a plain REST resource as a topic. One `GET path` per topic
//! every `interval` (the shortest gap: jitter only lengthens it), conditional on the last
//! answer (`If-None-Match` with its `ETag`, else `If-Modified-Since` with its
//! `Last-Modified`). `304` is nothing new; a `200` whose body differs from the last one
//! (compared by SHA-256, whatever the validators say) is one message, the body its payload and
//! its `Content-Type` kept. The upstream's `Cache-Control: max-age` (less its `Age`),
//! `Retry-After` and the route's `interval_header` (seconds, GitHub's `X-Poll-Interval`)
//! stretch the gap, up to [`STRETCH_MAX`], never below `interval`. Errors back off and count
//! toward `upstream_grace` as for every source.
//!
//! In cluster mode each message's resume point is the body's hash (and its `ETag`), so a new
//! owner of the topic's source asks conditionally and does not publish the same body again.

use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use tokio::time::Instant;

use super::backoff::Backoff;
use super::feed::{Ended, Feed};
use crate::metrics::GaugeGuard;

/// The upstream may stretch the interval up to this (or the interval, if longer).
pub const STRETCH_MAX: Duration = Duration::from_secs(300);
/// Jitter adds up to this fraction of the gap.
const JITTER: f64 = 0.1;

pub struct IntervalSource {
    /// Path and query on the upstream, rendered from the route's template.
    pub path: String,
    pub interval: Duration,
    pub interval_header: Option<HeaderName>,
    /// Cluster mode: the previous owner's last resume point ([`Last::resume_point`]).
    pub resume_from: Option<String>,
    pub feed: Feed,
}

/// What the source knows of the resource's last representation.
#[derive(Debug, Default, PartialEq)]
struct Last {
    /// SHA-256 of the last body, hex.
    hash: Option<String>,
    etag: Option<HeaderValue>,
    last_modified: Option<HeaderValue>,
    /// The last body was over `max_message_bytes` (a gap was recorded for it).
    oversized: bool,
}

impl Last {
    /// `<hash>` or `<hash> <etag>` (an entity tag has no spaces).
    fn resume_point(&self) -> Option<String> {
        let hash = self.hash.as_ref()?;
        Some(match self.etag.as_ref().and_then(|e| e.to_str().ok()) {
            Some(etag) => format!("{hash} {etag}"),
            None => hash.clone(),
        })
    }

    fn from_resume_point(point: &str) -> Last {
        let (hash, etag) = point.split_once(' ').unwrap_or((point, ""));
        Last {
            hash: Some(hash.to_owned()).filter(|h| !h.is_empty()),
            etag: HeaderValue::from_str(etag).ok().filter(|e| !e.is_empty()),
            ..Last::default()
        }
    }
}

impl IntervalSource {
    /// Runs until the topic is retired.
    pub async fn run(self) {
        let _open = GaugeGuard::new(self.feed.poll_metrics.subscriptions_active.clone());
        let mut backoff = Backoff::default();
        let mut last = self
            .resume_from
            .as_deref()
            .map(Last::from_resume_point)
            .unwrap_or_default();
        loop {
            let started = Instant::now();
            let wait = match self.fetch(&mut last).await {
                Ok(gap) => {
                    backoff.reset();
                    gap
                }
                Err(Ended::Retired) => return,
                Err(Ended::Reconnect) => {
                    if !self.feed.pause(backoff.next(None)).await {
                        return;
                    }
                    continue;
                }
            };
            tokio::select! {
                () = self.feed.topic.retired() => return,
                () = tokio::time::sleep_until(started + wait) => {}
            }
        }
    }

    /// One conditional request; the gap to wait from its start to the next one.
    async fn fetch(&self, last: &mut Last) -> Result<Duration, Ended> {
        let Ok(path) = self.path.parse() else {
            tracing::error!(path = %self.path, "source path is not a valid URI path");
            return Err(Ended::Retired);
        };
        let mut req = Request::builder()
            .method(Method::GET)
            .uri(self.feed.upstream.uri_for(&path));
        if let Some(etag) = &last.etag {
            req = req.header(header::IF_NONE_MATCH, etag);
        } else if let Some(date) = &last.last_modified {
            req = req.header(header::IF_MODIFIED_SINCE, date);
        }
        let req = req
            .body(Empty::new().map_err(|never| match never {}).boxed())
            .map_err(|_| Ended::Reconnect)?;
        let usable = |s: StatusCode| s == StatusCode::OK || s == StatusCode::NOT_MODIFIED;
        let response = self.feed.request(req, usable).await?;
        let gap = gap(
            self.interval,
            response.headers(),
            self.interval_header.as_ref(),
        );
        let gap = gap + gap.mul_f64(JITTER * fastrand::f64());
        if response.status() == StatusCode::NOT_MODIFIED {
            self.feed.healthy();
            return Ok(gap);
        }
        let headers = response.headers().clone();
        let limit = self.feed.max_message_bytes;
        let body = tokio::select! {
            () = self.feed.topic.retired() => return Err(Ended::Retired),
            b = Limited::new(response.into_body(), limit).collect() => b,
        };
        let body = match body {
            Ok(b) => b.to_bytes(),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                // The upstream works; its resource is too large to be a message.
                self.feed.healthy();
                if !last.oversized {
                    // One gap for the change to an oversized representation, not one a poll.
                    *last = Last {
                        oversized: true,
                        ..Last::default()
                    };
                    self.feed.deliver(None, None, "", None).await?;
                }
                return Ok(gap);
            }
            Err(e) => {
                tracing::warn!(error = %e, "upstream resource unreadable; retrying");
                self.feed.unusable();
                return Err(Ended::Reconnect);
            }
        };
        self.feed.healthy();
        let hash = sha256_hex(&body);
        let validators = (
            headers.get(header::ETAG).cloned(),
            headers.get(header::LAST_MODIFIED).cloned(),
        );
        if last.hash.as_deref() != Some(hash.as_str()) {
            let next = Last {
                hash: Some(hash),
                etag: validators.0.clone(),
                last_modified: validators.1.clone(),
                oversized: false,
            };
            let content_type = headers
                .get(header::CONTENT_TYPE)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("application/octet-stream");
            let resume = next.resume_point();
            self.feed
                .deliver(None, Some(body), content_type, resume.as_deref())
                .await?;
            *last = next;
        } else {
            (last.etag, last.last_modified) = validators;
        }
        Ok(gap)
    }
}

fn sha256_hex(body: &Bytes) -> String {
    let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, body);
    digest.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// The gap before the next request: `interval`, stretched by what the upstream asks for
/// (`Cache-Control: max-age` less `Age`, `Retry-After` in seconds, `interval_header` in
/// seconds) up to [`STRETCH_MAX`] (or `interval`, if longer).
fn gap(interval: Duration, headers: &HeaderMap, interval_header: Option<&HeaderName>) -> Duration {
    let text = |name: &HeaderName| headers.get(name).and_then(|v| v.to_str().ok());
    let secs = |v: &str| v.trim().parse::<u64>().ok().map(Duration::from_secs);
    let max_age = text(&header::CACHE_CONTROL).and_then(|cc| {
        cc.split(',').find_map(|directive| {
            let (name, value) = directive.trim().split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("max-age")
                .then(|| secs(value.trim_matches('"')))?
        })
    });
    let age = text(&header::AGE).and_then(secs).unwrap_or_default();
    let asked = [
        max_age.map(|m| m.saturating_sub(age)),
        text(&header::RETRY_AFTER).and_then(secs),
        interval_header.and_then(text).and_then(secs),
    ];
    let stretched = asked.into_iter().flatten().max().unwrap_or_default();
    stretched.min(STRETCH_MAX).max(interval)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (name, value) in pairs {
            h.append(*name, HeaderValue::from_static(value));
        }
        h
    }

    #[test]
    fn the_upstream_stretches_the_interval_and_never_shrinks_it() {
        let s = Duration::from_secs;
        let poll = HeaderName::from_static("x-poll-interval");
        let at = |pairs: &[(&'static str, &'static str)]| gap(s(5), &headers(pairs), Some(&poll));
        assert_eq!(at(&[]), s(5));
        assert_eq!(at(&[("x-poll-interval", "60")]), s(60));
        assert_eq!(
            at(&[("x-poll-interval", "1")]),
            s(5),
            "never below the interval"
        );
        assert_eq!(at(&[("cache-control", "private, max-age=30")]), s(30));
        assert_eq!(at(&[("cache-control", "max-age=30"), ("age", "25")]), s(5));
        assert_eq!(at(&[("cache-control", "max-age=30"), ("age", "12")]), s(18));
        assert_eq!(
            at(&[("retry-after", "20"), ("x-poll-interval", "10")]),
            s(20)
        );
        assert_eq!(at(&[("x-poll-interval", "86400")]), STRETCH_MAX, "bounded");
        // Hostile or odd values are ignored.
        for odd in ["-1", "abc", "1e9", "", "99999999999999999999999"] {
            let mut h = HeaderMap::new();
            h.insert("x-poll-interval", HeaderValue::from_str(odd).unwrap());
            h.insert(
                "cache-control",
                HeaderValue::from_str(&format!("max-age={odd}")).unwrap(),
            );
            assert_eq!(gap(s(5), &h, Some(&poll)), s(5), "{odd:?}");
        }
        // No header named: only the standard ones count.
        assert_eq!(
            gap(s(5), &headers(&[("x-poll-interval", "60")]), None),
            s(5)
        );
    }

    #[test]
    fn a_resume_point_carries_the_hash_and_the_entity_tag() {
        let last = Last {
            hash: Some("ab12".into()),
            etag: Some(HeaderValue::from_static("W/\"v7\"")),
            ..Last::default()
        };
        let point = last.resume_point().unwrap();
        assert_eq!(point, "ab12 W/\"v7\"");
        assert_eq!(Last::from_resume_point(&point), last);
        let bare = Last::from_resume_point("ab12");
        assert_eq!((bare.hash.as_deref(), bare.etag), (Some("ab12"), None));
        // Whatever a backplane hands back, no panic and no validator made up.
        for odd in ["", " ", "x \u{7f}bad", "   \"e\""] {
            let last = Last::from_resume_point(odd);
            assert!(last.etag.as_ref().is_none_or(|e| !e.is_empty()), "{odd:?}");
        }
        assert_eq!(Last::default().resume_point(), None);
        assert_eq!(sha256_hex(&Bytes::from_static(b"abc")).len(), 64);
    }
}
