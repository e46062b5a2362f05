//! The one pooled client to the platform.
//!
//! A single hyper-util legacy `Client` over hyper-rustls, cloned nowhere and shared by the
//! forwarding path and the token fetcher, so both ride the same pooled TLS connections
//! (ALPN picks h2, multiplexed, or http/1.1 keep-alive). Verification is never off: the
//! roots are the system's plus `upstream.ca_file`.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::body::Body;
use crate::config::UpstreamConfig;
use crate::error::{chain, ErrorKind, ProxyError, StartupError};
use crate::tls;

/// Why an upstream exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No response head within `timeout_ms`.
    #[error("no answer from the upstream within {0} ms")]
    Timeout(u128),
    /// Connect, TLS or protocol failure.
    #[error("{0}")]
    Unreachable(String),
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout(_) => ProxyError::new(ErrorKind::UpstreamTimeout, e.to_string()),
            UpstreamError::Unreachable(_) => {
                ProxyError::new(ErrorKind::UpstreamUnreachable, e.to_string())
            }
        }
    }
}

/// The platform, as reached through the pool.
#[derive(Debug)]
pub struct Upstream {
    client: Client<HttpsConnector<HttpConnector>, Body>,
    scheme: Scheme,
    authority: Authority,
    base_path: String,
    timeout: Duration,
    /// One permit per upstream exchange in flight (`max_connections`).
    slots: Arc<Semaphore>,
}

impl Upstream {
    /// Builds the pool (no connection is opened yet).
    pub fn new(cfg: &UpstreamConfig) -> Result<Self, StartupError> {
        let roots = tls::upstream_roots(cfg.ca_file.as_deref())?;
        let tls = tls::client_config(roots)?;
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(cfg.connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let https = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        let client = Client::builder(TokioExecutor::new())
            .pool_timer(TokioTimer::new())
            .timer(TokioTimer::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .pool_max_idle_per_host(1024)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .build(https);
        Ok(Upstream {
            client,
            scheme: cfg.scheme.clone(),
            authority: cfg.authority.clone(),
            base_path: cfg.base_path.clone(),
            timeout: cfg.timeout,
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
        })
    }

    /// The upstream's path prefix (empty unless `upstream.url` has a path).
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// The whole-exchange timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// An absolute URI on the upstream for a path-and-query that already includes the base path.
    pub fn uri(&self, path_and_query: PathAndQuery) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(path_and_query);
        // Scheme, authority and path are all present and individually valid.
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// Sends a request (its URI built by [`Upstream::uri`]) and waits for the response head
    /// within `timeout_ms`.
    /// The response body holds a slot of `max_connections` until it is read or dropped.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let exchange = async {
            // Waiting for a slot counts against the timeout like the exchange itself.
            let permit = self.slots.clone().acquire_owned().await;
            (self.client.request(req).await, permit)
        };
        match tokio::time::timeout(self.timeout, exchange).await {
            Ok((Ok(resp), Ok(permit))) => Ok(resp.map(|inner| Body::Held { inner, permit })),
            Ok((Ok(resp), Err(_closed))) => Ok(resp.map(Body::Incoming)),
            Ok((Err(e), _)) => Err(UpstreamError::Unreachable(describe(&e))),
            Err(_) => Err(UpstreamError::Timeout(self.timeout.as_millis())),
        }
    }
}

/// A client error as one line naming its root cause (never a URI, so never a token).
fn describe(e: &hyper_util::client::legacy::Error) -> String {
    let what = if e.is_connect() {
        "cannot connect to the upstream"
    } else {
        "upstream exchange failed"
    };
    match std::error::Error::source(e) {
        Some(cause) => format!("{what}: {}", chain(cause)),
        None => what.to_owned(),
    }
}
