//! The upstream side: one pooled HTTP client per configured upstream (HTTP/1.1 and h2 by ALPN,
//! plain or TLS), shared by every route that names it.
//!
//! Callers build requests only from config and validated values; [`Upstream::send`] adds the
//! upstream's own configured headers (pollmux's credential) and enforces the response timeout.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::uri::{PathAndQuery, Uri};
use http::{Request, Response};
use http_body_util::combinators::BoxBody;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::UpstreamConfig;

pub mod outage;

/// Error type of every body pollmux sends or relays.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
/// The one body type of requests and responses inside pollmux.
pub type Body = BoxBody<Bytes, BoxError>;

/// Why an upstream request produced no response.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// No connection could be made (refused, unreachable, TLS failure).
    #[error("cannot connect to upstream: {0}")]
    Connect(BoxError),
    /// Connect or response head took longer than configured.
    #[error("upstream did not answer in time")]
    Timeout,
    /// The connection broke or the upstream spoke something that is not HTTP.
    #[error("upstream request failed: {0}")]
    Failed(BoxError),
}

/// One configured upstream and its connection pool.
pub struct Upstream {
    pub config: UpstreamConfig,
    client: Client<HttpsConnector<HttpConnector>, Body>,
    /// What the sources of its topics share while it fails.
    pub outage: outage::Outage,
}

impl Upstream {
    pub fn new(config: UpstreamConfig) -> Upstream {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(config.connect_timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_tls(&config))
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(config.pool_idle_timeout)
            .pool_max_idle_per_host(config.pool_max_idle_per_host)
            .build(connector);
        Upstream {
            config,
            client,
            outage: outage::Outage::default(),
        }
    }

    /// The absolute URI of `path_and_query` on this upstream: the upstream URL's own path, if
    /// any, prefixes it. Scheme and authority always come from config.
    pub fn uri_for(&self, path_and_query: &PathAndQuery) -> Uri {
        let base = self.config.url.path().trim_end_matches('/');
        let pq = if base.is_empty() {
            path_and_query.clone()
        } else {
            format!("{base}{path_and_query}")
                .parse()
                .unwrap_or_else(|_| path_and_query.clone())
        };
        let mut parts = self.config.url.clone().into_parts();
        parts.path_and_query = Some(pq);
        Uri::from_parts(parts).expect("scheme and authority come from a validated URL")
    }

    /// Sends `req` with the upstream's configured headers, waiting at most the configured
    /// timeout for the response head.
    pub async fn send(&self, mut req: Request<Body>) -> Result<Response<Incoming>, UpstreamError> {
        for (name, value) in &self.config.headers {
            req.headers_mut().insert(name.clone(), value.clone());
        }
        send_with_timeout(&self.client, req, self.config.timeout).await
    }
}

async fn send_with_timeout(
    client: &Client<HttpsConnector<HttpConnector>, Body>,
    req: Request<Body>,
    timeout: Duration,
) -> Result<Response<Incoming>, UpstreamError> {
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(UpstreamError::Timeout),
        Ok(Ok(resp)) => Ok(resp),
        Ok(Err(e)) if e.is_connect() => {
            if is_timeout(&e) {
                Err(UpstreamError::Timeout)
            } else {
                Err(UpstreamError::Connect(e.into()))
            }
        }
        Ok(Err(e)) => Err(UpstreamError::Failed(e.into())),
    }
}

/// Whether an error's chain contains a timed-out I/O error (the connector's connect timeout).
fn is_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>()
            && io.kind() == std::io::ErrorKind::TimedOut
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Client TLS: the configured CA file if any, else the system's roots.
fn client_tls(config: &UpstreamConfig) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    match &config.ca_certs {
        Some(certs) => {
            roots.add_parsable_certificates(certs.iter().cloned());
        }
        None => {
            let native = rustls_native_certs::load_native_certs();
            if native.certs.is_empty() && config.url.scheme_str() == Some("https") {
                tracing::warn!(
                    upstream = %config.name,
                    "no system CA certificates found; set ca_file for this upstream"
                );
            }
            roots.add_parsable_certificates(native.certs);
        }
    }
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("the aws-lc-rs provider supports the default protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    fn upstream(url: &str) -> Upstream {
        let text =
            format!("[listeners.p]\naddress = \"127.0.0.1:0\"\n[upstreams.u]\nurl = \"{url}\"\n");
        let config = Config::from_toml(&text, std::path::Path::new(".")).unwrap();
        Upstream::new(config.upstreams[0].clone())
    }

    #[tokio::test]
    async fn uri_keeps_scheme_and_authority_from_config() {
        let u = upstream("http://10.0.0.1:3000");
        let pq: PathAndQuery = "/a/b?c=d".parse().unwrap();
        assert_eq!(u.uri_for(&pq), "http://10.0.0.1:3000/a/b?c=d");
        let u = upstream("https://api.example/base/");
        assert_eq!(u.uri_for(&pq), "https://api.example/base/a/b?c=d");
    }
}
