//! The request path: from a client's request to the upstream's streamed answer.
//!
//! [`Proxy::handle`] never fails: every refusal becomes the JSON error of SPEC section 5
//! through [`ProxyError::into_response`], and every request gets one access-log line.

mod rewrite;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderName, CONTENT_LENGTH};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, Version};
use hyper::body::Incoming;

pub use rewrite::{
    sanitize_request_headers, strip_hop_by_hop, upstream_target, Redacted, QUERY_VALUE, X_CX_APP,
};

use crate::auth::{self, Injection, Token, TokenCache};
use crate::body::Body;
use crate::clock::{SharedClock, SystemClock};
use crate::config::{AppConfig, Config, Inject};
use crate::error::{ErrorKind, ProxyError, StartupError};
use crate::upstream::Upstream;

/// One configured app, ready for routing.
#[derive(Debug)]
struct App {
    config: AppConfig,
    /// Cache key; shared so lookups clone a pointer, not a string.
    key: Arc<str>,
}

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    config: Config,
    apps: Vec<App>,
    /// Indexes into `apps` of the apps with a prefix, longest prefix first.
    by_prefix: Vec<usize>,
    upstream: Upstream,
    tokens: TokenCache,
    /// The query parameter stripped from client requests (and, in query mode, injected).
    token_param: String,
    /// The header stripped from client requests and, in header mode, injected.
    token_header: Option<HeaderName>,
}

/// What the access-log line reports beyond the request itself.
#[derive(Default)]
struct Access<'a> {
    app: Option<&'a str>,
    upstream: Option<Duration>,
}

impl Proxy {
    /// Builds the shared state with the system clock.
    pub fn new(config: Config) -> Result<Arc<Self>, StartupError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Builds the shared state judging token expiry by `clock` (tests move it).
    pub fn with_clock(config: Config, clock: SharedClock) -> Result<Arc<Self>, StartupError> {
        let upstream = Upstream::new(&config.upstream)?;
        let apps: Vec<App> = config
            .apps
            .iter()
            .map(|a| App {
                key: Arc::from(a.name.as_str()),
                config: a.clone(),
            })
            .collect();
        let mut by_prefix: Vec<usize> = (0..apps.len())
            .filter(|&i| apps[i].config.prefix.is_some())
            .collect();
        by_prefix.sort_by_key(|&i| {
            std::cmp::Reverse(apps[i].config.prefix.as_ref().map_or(0, String::len))
        });
        let (token_param, token_header) = match &config.token.inject {
            Inject::Query { param } => (param.clone(), None),
            Inject::Header { name, .. } => ("access_token".to_owned(), Some(name.clone())),
        };
        Ok(Arc::new(Proxy {
            apps,
            by_prefix,
            upstream,
            tokens: TokenCache::new(clock),
            token_param,
            token_header,
            config,
        }))
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// Answers one request; never fails.
    pub async fn handle(&self, peer: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        let uri = req.uri().clone();
        let mut access = Access::default();
        let resp = match self.forward(peer, req, &mut access).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(kind = e.kind.name(), msg = %e.message, "request refused");
                e.into_response()
            }
        };
        let bytes = resp
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        tracing::info!(
            target: "cx_proxy::access",
            peer = %peer,
            app = access.app.unwrap_or("-"),
            method = %method,
            path = %Redacted::new(uri.path(), uri.query(), &self.token_param),
            status = resp.status().as_u16(),
            bytes = bytes,
            total_ms = started.elapsed().as_secs_f64() * 1000.0,
            upstream_ms = access.upstream.map(|d| d.as_secs_f64() * 1000.0),
        );
        resp
    }

    async fn forward<'a>(
        &'a self,
        peer: SocketAddr,
        req: Request<Incoming>,
        access: &mut Access<'a>,
    ) -> Result<Response<Body>, ProxyError> {
        let ip = peer.ip().to_canonical();
        if !self.config.server.allow.iter().any(|net| net.contains(&ip)) {
            return Err(ProxyError::new(
                ErrorKind::Forbidden,
                format!("client address {ip} is not allowed"),
            ));
        }
        if req.method() == Method::CONNECT {
            return Err(ProxyError::new(
                ErrorKind::MethodNotAllowed,
                "CONNECT is not supported: this is a reverse proxy",
            ));
        }
        // HTTP/1 absolute-form targets are refused outright; h2 always carries an authority,
        // which is ignored like Host: the only destination is upstream.url.
        let uri = req.uri();
        if req.version() < Version::HTTP_2 && (uri.scheme().is_some() || uri.authority().is_some())
        {
            return Err(ProxyError::new(
                ErrorKind::BadRequest,
                "absolute-form request targets are not accepted; send the path only",
            ));
        }
        if !uri.path().starts_with('/') {
            return Err(ProxyError::new(
                ErrorKind::BadRequest,
                "the request target must be a path starting with /",
            ));
        }
        if let Some(len) = req.headers().get(CONTENT_LENGTH) {
            let max = self.config.server.max_body_bytes;
            match len.to_str().ok().and_then(|v| v.parse::<u64>().ok()) {
                Some(n) if n > max => {
                    return Err(ProxyError::new(
                        ErrorKind::PayloadTooLarge,
                        format!("request body of {n} bytes is over the limit of {max}"),
                    ));
                }
                Some(_) => {}
                None => {
                    return Err(ProxyError::new(
                        ErrorKind::BadRequest,
                        "invalid Content-Length",
                    ))
                }
            }
        }

        let (app, skip) = self.route(&req)?;
        access.app = Some(&app.config.name);
        let token = self.token(app).await?;

        let (mut parts, body) = req.into_parts();
        let path = match &parts.uri.path()[skip..] {
            "" => "/",
            rest => rest,
        };
        let inject = match token.injection() {
            Injection::Query(pair) if self.token_header.is_none() => Some(&**pair),
            _ => None,
        };
        let target = upstream_target(
            self.upstream.base_path(),
            path,
            parts.uri.query(),
            &self.token_param,
            inject,
        );
        let pq = PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| {
            ProxyError::new(ErrorKind::BadRequest, "the request target is not valid")
        })?;
        sanitize_request_headers(&mut parts.headers, self.token_header.as_ref());
        if let (Some(name), Injection::Header(value)) = (&self.token_header, token.injection()) {
            parts.headers.insert(name.clone(), value.clone());
        }
        parts.uri = self.upstream.uri(pq);
        // The pool picks h2 or http/1.1 per connection; hyper wants the request marked 1.1.
        parts.version = Version::HTTP_11;
        let upstream_req = Request::from_parts(parts, Body::from(body));

        let sent = Instant::now();
        let resp = self.upstream.send(upstream_req).await;
        access.upstream = Some(sent.elapsed());
        let (mut parts, body) = resp?.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, Body::from(body)))
    }

    /// Picks the app: by `X-CX-App` if present, else by the longest matching prefix.
    /// Returns the app and how many bytes of the path its prefix takes (stripped before
    /// forwarding).
    fn route(&self, req: &Request<Incoming>) -> Result<(&App, usize), ProxyError> {
        let path = req.uri().path();
        if let Some(v) = req.headers().get(X_CX_APP) {
            let name = v.to_str().unwrap_or("");
            let app = self
                .apps
                .iter()
                .find(|a| a.config.name == name)
                .ok_or_else(|| {
                    let shown: String = name.chars().take(64).collect();
                    ProxyError::new(
                        ErrorKind::NoRoute,
                        format!("no app is named {shown:?} (X-CX-App)"),
                    )
                })?;
            let skip = app
                .config
                .prefix
                .as_deref()
                .and_then(|p| rewrite::prefix_len(path, p))
                .unwrap_or(0);
            return Ok((app, skip));
        }
        for &i in &self.by_prefix {
            let app = &self.apps[i];
            if let Some(skip) = app
                .config
                .prefix
                .as_deref()
                .and_then(|p| rewrite::prefix_len(path, p))
            {
                return Ok((app, skip));
            }
        }
        Err(ProxyError::new(
            ErrorKind::NoRoute,
            "no app's prefix matches this path, and no X-CX-App header was sent",
        ))
    }

    async fn token(&self, app: &App) -> Result<Arc<Token>, ProxyError> {
        let fetch = || async {
            let result = auth::fetch(
                &self.upstream,
                &app.config,
                &self.config.token.inject,
                &**self.tokens.clock(),
            )
            .await;
            match &result {
                Ok(t) => {
                    tracing::info!(app = %app.key, expires_in_s = t.lifetime.as_secs(), "fetched a new access token")
                }
                Err(e) => tracing::warn!(app = %app.key, error = %e, "token fetch failed"),
            }
            result
        };
        self.tokens
            .get(&app.key, fetch)
            .await
            .map_err(|e| ProxyError::from(&*e))
    }
}
