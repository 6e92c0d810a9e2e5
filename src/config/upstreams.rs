//! `[upstreams.NAME]`: base URL, timeouts, pool, pollmux's own headers and CA file; and how a
//! route, source or hook names an upstream and the path it requests there.

use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use rustls::pki_types::CertificateDer;

use super::{TopicTemplate, Validator, raw, tls};

/// Upstream TCP (and TLS) connect timeout.
pub const UPSTREAM_CONNECT_TIMEOUT_DEFAULT: Duration = Duration::from_secs(2);
/// Time an upstream may take to send response headers before the client gets 504.
pub const UPSTREAM_TIMEOUT_DEFAULT: Duration = Duration::from_secs(30);
/// Idle pooled upstream connections are closed after this.
pub const UPSTREAM_POOL_IDLE_TIMEOUT_DEFAULT: Duration = Duration::from_secs(90);
/// Idle pooled connections kept per upstream host.
pub const UPSTREAM_POOL_MAX_IDLE_DEFAULT: usize = 64;

#[derive(Debug, Clone, PartialEq)]
pub struct UpstreamConfig {
    pub name: String,
    /// `http` or `https` base URL; its path, if any, prefixes every upstream path.
    pub url: Uri,
    pub connect_timeout: Duration,
    pub timeout: Duration,
    pub pool_idle_timeout: Duration,
    pub pool_max_idle_per_host: usize,
    /// pollmux's own headers (credentials) added to every request to this upstream.
    pub headers: Vec<(HeaderName, HeaderValue)>,
    /// CA certificates trusted for this upstream instead of the system's (`ca_file`).
    pub ca_certs: Option<Arc<Vec<CertificateDer<'static>>>>,
}

impl Validator<'_, '_> {
    pub(super) fn upstream(&mut self, name: String, raw: raw::Upstream) -> Option<UpstreamConfig> {
        let n = name.as_str();
        let path = ["upstreams", n, "url"];
        let url = match raw.url.0.parse::<Uri>() {
            Ok(u) => {
                let scheme_ok = matches!(u.scheme_str(), Some("http" | "https"));
                if !scheme_ok || u.authority().is_none() {
                    self.err(&path, "must be an absolute http:// or https:// URL");
                    None
                } else if u.query().is_some() {
                    self.err(&path, "must not have a query");
                    None
                } else {
                    Some(u)
                }
            }
            Err(e) => {
                self.err(&path, format!("invalid URL {:?}: {e}", raw.url.0));
                None
            }
        };
        let mut headers = Vec::new();
        for (key, value) in &raw.headers {
            let hpath = ["upstreams", name.as_str(), "headers", key.as_str()];
            match (
                HeaderName::try_from(key.as_str()),
                HeaderValue::try_from(value.0.as_str()),
            ) {
                (Ok(k), Ok(mut v)) => {
                    v.set_sensitive(true);
                    headers.push((k, v));
                }
                (Err(_), _) => self.err(&hpath, "invalid header name"),
                (_, Err(_)) => self.err(&hpath, "invalid header value"),
            }
        }
        let ca_certs = raw.ca_file.and_then(|f| {
            let file = self.base_dir.join(&f.0);
            match tls::load_certs(&file) {
                Ok(certs) => Some(Arc::new(certs)),
                Err(e) => {
                    self.err(&["upstreams", n, "ca_file"], e.to_string());
                    None
                }
            }
        });
        Some(UpstreamConfig {
            url: url?,
            ca_certs,
            connect_timeout: raw
                .connect_timeout
                .map_or(UPSTREAM_CONNECT_TIMEOUT_DEFAULT, |d| d.0),
            timeout: raw.timeout.map_or(UPSTREAM_TIMEOUT_DEFAULT, |d| d.0),
            pool_idle_timeout: raw
                .pool_idle_timeout
                .map_or(UPSTREAM_POOL_IDLE_TIMEOUT_DEFAULT, |d| d.0),
            pool_max_idle_per_host: raw
                .pool_max_idle_per_host
                .map_or(UPSTREAM_POOL_MAX_IDLE_DEFAULT, |n| n as usize),
            headers,
            name,
        })
    }

    /// The index of the upstream a route or source names at `at` (required for `what`).
    pub(super) fn upstream_ref(
        &mut self,
        at: &[&str],
        what: &str,
        name: Option<raw::Str>,
        upstreams: &[UpstreamConfig],
    ) -> Option<usize> {
        let Some(name) = name else {
            self.err(at, format!("required for {what}"));
            return None;
        };
        let found = upstreams.iter().position(|u| u.name == name.0);
        if found.is_none() && !self.declared_upstreams.contains(&name.0) {
            self.err(at, format!("no upstream named {:?} in [upstreams]", name.0));
        }
        found
    }

    /// A path template of a request pollmux makes (a source's, a hook's), over `allowed`
    /// parameters only.
    pub(super) fn upstream_path(
        &mut self,
        at: &[&str],
        kind: &str,
        path: Option<raw::Str>,
        allowed: &[String],
    ) -> Option<TopicTemplate> {
        let at = at.to_vec();
        let Some(path) = path else {
            self.err(&at, format!("required for type = {kind:?}"));
            return None;
        };
        if !path.0.starts_with('/') {
            self.err(&at, "must start with /");
            return None;
        }
        match TopicTemplate::parse_path(&path.0, allowed) {
            Ok(t) => Some(t),
            Err(e) => {
                self.err(&at, format!("{e} (the topic's parameters only)"));
                None
            }
        }
    }
}
