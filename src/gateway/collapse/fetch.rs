//! A collapse route's one upstream request per key: the [`Fetcher`] that sends it with
//! pollmux's credential (and the `vary` headers), reads the answer whole within
//! `max_message_bytes`, and the [`Answer`] every waiter of the key gets, byte for byte.

use super::*;

/// An upstream answer, ready to be written to any number of clients.
#[derive(Debug)]
pub(super) struct Answer {
    pub(super) status: StatusCode,
    pub(super) headers: HeaderMap,
    pub(super) body: Bytes,
    pub(super) outcome: Outcome,
    /// `Cache-Control: private`.
    pub(super) private: bool,
}

impl Answer {
    pub(super) fn response(&self) -> Response<Body> {
        let body = Full::new(self.body.clone())
            .map_err(|never| match never {})
            .boxed();
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.headers_mut() = self.headers.clone();
        resp
    }

    /// pollmux's own answer when the upstream gave none.
    pub(super) fn problem(problem: Problem, detail: Option<&str>) -> Answer {
        let (headers, body) = problem.render(detail, &[]);
        Answer {
            status: problem.status(),
            headers,
            body,
            outcome: problem.outcome(),
            private: false,
        }
    }
}

/// What an upstream request of a collapse route needs.
pub(super) struct Fetcher {
    pub(super) upstream: Arc<Upstream>,
    pub(super) route_metrics: Arc<RouteMetrics>,
    pub(super) metrics: CollapseMetrics,
    /// Largest upstream answer body shared; above it waiters get 502.
    pub(super) max_body: usize,
    pub(super) expose_headers: Vec<HeaderName>,
}

impl Fetcher {
    /// One upstream request for `key`, its answer read whole.
    pub(super) async fn fetch(&self, key: &Key) -> Answer {
        let Ok(target) = PathAndQuery::try_from(key.target.as_str()) else {
            return Answer::problem(
                Problem::InvalidRequest,
                Some("the request target is not valid"),
            );
        };
        let mut req = Request::new(Empty::new().map_err(|never| match never {}).boxed());
        *req.uri_mut() = self.upstream.uri_for(&target);
        for (name, value) in &key.group.vary {
            req.headers_mut().append(name.clone(), value.clone());
        }
        let started = Instant::now();
        let result = self.upstream.send(req).await;
        let class = match &result {
            Ok(resp) => UpstreamResult::Status(resp.status().as_u16()),
            Err(UpstreamError::Timeout) => UpstreamResult::Timeout,
            Err(_) => UpstreamResult::Error,
        };
        self.route_metrics.upstream(class, started.elapsed());
        let resp = match result {
            Ok(resp) => resp,
            Err(UpstreamError::Timeout) => return Answer::problem(Problem::UpstreamTimeout, None),
            Err(e) => {
                tracing::debug!(upstream = %self.upstream.config.name, error = %e, "collapse request failed");
                return Answer::problem(Problem::UpstreamUnavailable, None);
            }
        };
        let (parts, body) = resp.into_parts();
        let read = Limited::new(body, self.max_body).collect();
        let body = match tokio::time::timeout(self.upstream.config.timeout, read).await {
            Ok(Ok(collected)) => collected.to_bytes(),
            Ok(Err(e)) => {
                tracing::debug!(upstream = %self.upstream.config.name, error = %e, "collapse answer body failed");
                let detail = "the upstream answer broke off or exceeded max_message_bytes";
                return Answer::problem(Problem::UpstreamUnavailable, Some(detail));
            }
            Err(_) => return Answer::problem(Problem::UpstreamTimeout, None),
        };
        if parts.headers.contains_key(header::SET_COOKIE) {
            self.metrics.set_cookie_removed.inc();
        }
        let mut headers = HeaderMap::new();
        for name in SHARED_HEADERS.iter().chain(&self.expose_headers) {
            for value in parts.headers.get_all(name) {
                headers.append(name.clone(), value.clone());
            }
        }
        let private = parts
            .headers
            .get_all(header::CACHE_CONTROL)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|d| d.trim().eq_ignore_ascii_case("private"));
        Answer {
            status: parts.status,
            headers,
            body,
            outcome: Outcome::Response,
            private,
        }
    }
}
