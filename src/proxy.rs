//! The request path: from a client's request to the upstream's streamed answer.
//!
//! [`Proxy::handle`] never fails: every refusal becomes the JSON error of SPEC section 5
//! through [`ProxyError::into_response`], and every request gets one access-log line and
//! one count in the metrics.
//!
//! Two things look at bodies, both bounded: a request body of at most 1 MiB with a declared
//! length is read first so it can be sent again, and a JSON response of at most 64 KiB is read
//! to see whether the platform rejected the token (then the token is dropped and the request
//! replayed once). Everything else streams.

pub mod probe;
mod rewrite;

use std::borrow::Cow;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, CONTENT_LENGTH, CONTENT_TYPE};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request, Response, Version};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use prometheus::IntCounter;
use subtle::ConstantTimeEq;

pub use rewrite::{
    normalize_path, path_problem, sanitize_request_headers, strip_hop_by_hop,
    token_behind_semicolon, upstream_target, Redacted, QUERY_VALUE, X_CX_APP,
};

use crate::auth::{Injection, Token, TokenManager};
use crate::clock::{SharedClock, SystemClock};
use crate::config::{Config, Inject};
use crate::error::{ErrorKind, ProxyError, StartupError};
use crate::limits::Limiter;
use crate::metrics::{FetchReason, Metrics};
use crate::server::Peer;
use crate::upstream::{Body, BodyTooLarge};
use crate::upstream::{Upstream, UpstreamError};

/// Request bodies up to this size (with a declared length) are kept for one replay.
pub const REPLAY_BODY_MAX: u64 = 1024 * 1024;

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct Proxy {
    /// The configuration in force; an app's index in `config.apps` is its index everywhere
    /// (token manager, metrics, access log).
    config: Config,
    /// Indexes of the apps with a prefix, longest prefix first.
    by_prefix: Vec<usize>,
    upstream: Arc<Upstream>,
    tokens: Arc<TokenManager>,
    metrics: Arc<Metrics>,
    /// `cx_proxy_client_requests_total` per `[[client]]`, by index: resolved once here so a
    /// request does not hash the client's name into the counter family.
    client_requests: Vec<IntCounter>,
    clock: SharedClock,
    /// The query parameter stripped from client requests (and, in query mode, injected).
    token_param: String,
    /// The header stripped from client requests and, in header mode, injected.
    token_header: Option<HeaderName>,
    /// Every token endpoint path (`token.path`, the corp-service one, each app's
    /// `token_path`), deduplicated: requests to them (in any spelling a server could serve,
    /// [`crate::platform::same_path`]) are answered locally when they name a configured app
    /// (SPEC section 4.3).
    token_paths: Vec<String>,
    /// The call limits in force (SPEC section 4.9).
    limiter: Arc<Limiter>,
}

/// What the access-log line and the metrics report beyond the request itself.
#[derive(Default)]
struct Access {
    app: Option<usize>,
    client: Option<usize>,
    upstream: Option<Duration>,
}

/// A request after routing: what the later phases need of it.
///
/// The request's parts and body stay with the phase driver and are lent to each phase, so
/// nothing large moves between phases.
struct Routed {
    /// Its declared body length.
    declared: Option<u64>,
    /// The app's index.
    app: usize,
    /// The path with dot segments resolved, when that changed it (else the URI's path is it).
    normalized: Option<String>,
    /// How many bytes of the path the app's prefix takes (stripped before forwarding).
    skip: usize,
}

impl Routed {
    /// The path as sent, dot segments resolved: what grants are judged on.
    fn full_path<'a>(&'a self, parts: &'a Parts) -> &'a str {
        self.normalized.as_deref().unwrap_or(parts.uri.path())
    }

    /// The path as forwarded, the app's prefix stripped.
    fn path<'a>(&'a self, parts: &'a Parts) -> &'a str {
        forwarded_path(self.full_path(parts), self.skip)
    }
}

/// `full_path` without its first `skip` bytes (the app's prefix), never empty.
fn forwarded_path(full_path: &str, skip: usize) -> &str {
    match &full_path[skip..] {
        "" => "/",
        rest => rest,
    }
}

/// A request body as forwarded: kept whole so it can be sent again after a rejection, or
/// streamed, once.
enum ReplayBody {
    Kept(Bytes),
    Streamed(Option<Body>),
}

impl ReplayBody {
    /// A body with a declared length of at most [`REPLAY_BODY_MAX`] is read first, so it can
    /// be sent twice. One without a declared length streams under the size limit, with a
    /// flag (returned) that says the limit broke the exchange off: over HTTP/2 hyper resets
    /// the stream and the error it returns no longer carries the body's error as a source,
    /// so the cause cannot be read from the error chain.
    async fn new(
        body: Incoming,
        declared: Option<u64>,
        max: u64,
        timeout: Duration,
    ) -> Result<(Self, Option<Arc<AtomicBool>>), ProxyError> {
        Ok(match declared {
            Some(n) if n <= REPLAY_BODY_MAX => {
                (ReplayBody::Kept(read_whole(body, timeout).await?), None)
            }
            None if http_body::Body::is_end_stream(&body) => (ReplayBody::Kept(Bytes::new()), None),
            Some(_) => (ReplayBody::Streamed(Some(Body::Incoming(body))), None),
            None => {
                let flag = Arc::new(AtomicBool::new(false));
                let limited = Body::Limited {
                    inner: body,
                    remaining: max,
                    tripped: flag.clone(),
                };
                (ReplayBody::Streamed(Some(limited)), Some(flag))
            }
        })
    }

    /// Whether it can be sent again.
    fn replayable(&self) -> bool {
        matches!(self, ReplayBody::Kept(_))
    }

    /// The body for the next attempt: a kept one each time, a streamed one once.
    fn next(&mut self) -> Body {
        match self {
            ReplayBody::Kept(b) => Body::full(b.clone()),
            ReplayBody::Streamed(s) => s.take().unwrap_or(Body::Empty),
        }
    }
}

/// Which attempt of an exchange this is: a replay is never replayed.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Attempt {
    First,
    Replay,
}

/// Why a request asks for its app's token.
#[derive(Clone, Copy)]
enum Need {
    /// To send a call: any usable token.
    Current,
    /// To replay a call the platform rejected: the rejected token is gone, a fetch counts as
    /// `rejected`.
    Replacement,
}

impl Proxy {
    /// Builds the shared state with the system clock.
    pub fn new(config: Config) -> Result<Arc<Self>, StartupError> {
        Self::with_clock(config, Arc::new(SystemClock))
    }

    /// Builds the shared state judging token expiry by `clock` (tests move it).
    pub fn with_clock(config: Config, clock: SharedClock) -> Result<Arc<Self>, StartupError> {
        let upstream = Arc::new(Upstream::new(
            &config.upstream,
            config.server.worker_threads(),
        )?);
        let names: Vec<&str> = config.apps.iter().map(|a| a.name.as_str()).collect();
        let metrics = Arc::new(Metrics::new(&names));
        Ok(Arc::new(Self::build(
            config, clock, upstream, metrics, None, None,
        )))
    }

    /// The proxy for a reloaded `config`: the upstream pool and the metrics are kept when
    /// their settings did not change, and every unchanged app keeps its token, fetch gate and
    /// fetch-cap window.
    pub async fn reloaded(config: Config, old: &Proxy) -> Result<Arc<Self>, StartupError> {
        let upstream = if config.upstream == old.config.upstream {
            old.upstream.clone()
        } else {
            // One pool per worker thread running (a new count needs a restart).
            Arc::new(Upstream::new(&config.upstream, old.upstream.workers())?)
        };
        let names: Vec<&str> = config.apps.iter().map(|a| a.name.as_str()).collect();
        // Kept for the same apps and the same presence of a token store (whose gauge is
        // registered only when there is one).
        let metrics = if names
            .iter()
            .copied()
            .eq(old.config.apps.iter().map(|a| a.name.as_str()))
            && config.token.store.is_some() == old.config.token.store.is_some()
        {
            old.metrics.clone()
        } else {
            Arc::new(Metrics::new(&names))
        };
        let proxy = Self::build(
            config,
            old.clock.clone(),
            upstream,
            metrics,
            Some(&old.tokens),
            Some(&old.limiter),
        );
        proxy.tokens.adopt_tokens(&old.tokens).await;
        Ok(Arc::new(proxy))
    }

    fn build(
        config: Config,
        clock: SharedClock,
        upstream: Arc<Upstream>,
        metrics: Arc<Metrics>,
        previous: Option<&TokenManager>,
        previous_limits: Option<&Limiter>,
    ) -> Self {
        let apps = &config.apps;
        let mut by_prefix: Vec<usize> = (0..apps.len())
            .filter(|&i| apps[i].prefix.is_some())
            .collect();
        by_prefix
            .sort_by_key(|&i| std::cmp::Reverse(apps[i].prefix.as_ref().map_or(0, String::len)));
        let (token_param, token_header) = match &config.token.inject {
            Inject::Query { param } => (param.clone(), None),
            Inject::Header { name, .. } => ("access_token".to_owned(), Some(name.clone())),
        };
        let tokens = Arc::new(TokenManager::new(
            &config.apps,
            &config.token,
            upstream.clone(),
            clock.clone(),
            metrics.clone(),
            previous,
        ));
        let limiter = Arc::new(Limiter::new(
            &config.limits,
            &config.apps,
            previous_limits,
            tokens.store(),
        ));
        let mut token_paths: Vec<String> = Vec::new();
        let paths = [config.token.path.as_str(), crate::platform::CORP_TOKEN_PATH]
            .into_iter()
            .chain(config.apps.iter().map(|a| a.token_path.as_str()));
        for p in paths {
            if !token_paths.iter().any(|t| t == p) {
                token_paths.push(p.to_owned());
            }
        }
        let client_requests = config
            .clients
            .iter()
            .map(|c| metrics.client_counter(&c.name))
            .collect();
        Proxy {
            by_prefix,
            upstream,
            tokens,
            metrics,
            client_requests,
            clock,
            token_param,
            token_header,
            token_paths,
            limiter,
            config,
        }
    }

    /// Sets the call-limit window gauges from the windows now (for a scrape).
    pub fn refresh_limit_gauges(&self) {
        let rules = self.limiter.rules();
        let windows: Vec<(&str, String, u32, u32)> = self
            .limiter
            .in_use()
            .into_iter()
            .map(|(a, r, limit, used)| {
                (
                    self.config.apps[a].name.as_str(),
                    rules[r].label(),
                    limit,
                    used,
                )
            })
            .collect();
        self.metrics.limit_windows(&windows);
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The token manager (admin endpoints, tests).
    pub fn tokens(&self) -> &Arc<TokenManager> {
        &self.tokens
    }

    /// The metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// Whether `peer` is inside `server.allow`.
    pub fn allowed(&self, peer: &Peer) -> Result<(), ProxyError> {
        match peer.ip() {
            Some(ip) if self.config.server.allow.iter().any(|net| net.contains(&ip)) => Ok(()),
            Some(ip) => Err(ProxyError::new(
                ErrorKind::Forbidden,
                format!("client address {ip} is not allowed"),
            )),
            None => Err(ProxyError::new(
                ErrorKind::Forbidden,
                "client address unknown",
            )),
        }
    }

    /// The first `[[client]]` whose networks hold the peer's address or whose `cert_names` hold
    /// a DNS name of its certificate. `Ok(None)` when no clients are configured.
    fn identify(&self, peer: &Peer) -> Result<Option<usize>, ProxyError> {
        if self.config.clients.is_empty() {
            return Ok(None);
        }
        let ip = peer.ip();
        let names = peer.cert_names.as_deref().unwrap_or(&[]);
        self.config
            .clients
            .iter()
            .position(|c| {
                ip.is_some_and(|ip| c.networks.iter().any(|n| n.contains(&ip)))
                    || names
                        .iter()
                        .any(|n| c.cert_names.iter().any(|g| g.eq_ignore_ascii_case(n)))
            })
            .map(Some)
            .ok_or_else(|| {
                ProxyError::new(
                    ErrorKind::Forbidden,
                    "this client is not identified by any [[client]]",
                )
            })
    }

    /// Answers one request; never fails.
    pub async fn handle(&self, peer: &Peer, mut req: Request<Incoming>) -> Response<Body> {
        let started = Instant::now();
        let method = req.method().clone();
        // The request id (SPEC section 3): the client's, else a new one; sent upstream, sent
        // back, and on the access-log line.
        // Marked never-indexed (RFC 7541 section 7.1.3) both ways: a value used once would
        // only churn an h2 connection's HPACK table, and every later header's lookup then
        // walked a chain of stale ids (~4k instructions a request on the shared upstream
        // connection).
        let mut request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(id) if usable_request_id(id) => id.clone(),
            _ => new_request_id(),
        };
        request_id.set_sensitive(true);
        // One id everywhere: it replaces any the client sent (a second one is not sent on).
        req.headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        // The access log's fields are only gathered when it is on.
        let logged =
            tracing::enabled!(target: "cx_proxy::access", tracing::Level::INFO).then(|| {
                // A shared handle on the header's bytes, cut to 200 characters when logged.
                let agent = req.headers().get(http::header::USER_AGENT).cloned();
                (req.uri().clone(), req.version(), agent)
            });
        let mut access = Access::default();
        // The one rescue: every refusal on the way becomes the answer of SPEC section 5 here,
        // and its kind and cause go on the access-log line.
        let mut refused = None;
        let resp = match self.forward(peer, req, &mut access).await {
            Ok(resp) => resp,
            Err(e) => {
                tracing::debug!(kind = e.kind.name(), msg = %e.message, "request refused");
                let resp = e.to_response();
                refused = Some(e);
                resp
            }
        };
        let mut resp = resp;
        resp.headers_mut()
            .insert(X_REQUEST_ID.clone(), request_id.clone());
        // An answer to HEAD leaves its body behind in server::serve, whoever wrote it.
        let total = started.elapsed();
        let status = resp.status().as_u16();
        self.metrics
            .request(access.app, status, &method, total, access.upstream);
        if let Some(counter) = access.client.and_then(|i| self.client_requests.get(i)) {
            counter.inc();
        }
        let client = access.client.map(|i| self.config.clients[i].name.as_str());
        if let Some((uri, version, agent)) = logged {
            let bytes = resp
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok());
            let path = Redacted::new(uri.path(), uri.query(), &self.token_param);
            crate::logging::access(&crate::logging::AccessLine {
                request_id: request_id.to_str().unwrap_or("-"),
                peer: peer.addr,
                client: client.unwrap_or("-"),
                app: access
                    .app
                    .map_or("-", |i| self.config.apps[i].name.as_str()),
                method: method.as_str(),
                path: &path,
                protocol: version,
                user_agent: agent
                    .as_ref()
                    // UTF-8 agents too (`to_str` takes visible ASCII only).
                    .and_then(|v| std::str::from_utf8(v.as_bytes()).ok())
                    .map_or("-", |v| {
                        v.char_indices().nth(200).map_or(v, |(at, _)| &v[..at])
                    }),
                status,
                bytes,
                total,
                upstream: access.upstream,
                error: refused.as_ref().map(|e| e.kind.name()),
                cause: refused.as_ref().map(|e| &*e.message),
            });
        }
        resp
    }

    /// The request path, phase by phase (pingora's shape): admit → route and authorise →
    /// local token endpoint → call limits → the exchange, with one replay.
    async fn forward(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
        access: &mut Access,
    ) -> Result<Response<Body>, ProxyError> {
        let declared = self.admit(peer, &req, access)?;
        let (mut parts, body) = req.into_parts();
        let routed = self.route_request(&mut parts, declared, access)?;
        if let Some(endpoint) = self
            .token_paths
            .iter()
            .find(|p| crate::platform::same_path(routed.path(&parts), p))
        {
            // A server that splits on `;` would read parameters the proxy never judged (a
            // secret behind `corp_id=1;`): the proxy answers or forwards only what it read.
            if parts.uri.query().is_some_and(|q| q.contains(';')) {
                return Err(ProxyError::new(
                    ErrorKind::BadRequest,
                    "a token request's query holds a ';': a server that splits on it would \
                     read parameters the proxy did not; separate them with '&'",
                ));
            }
            return self
                .token_request(endpoint, &routed, &mut parts, body, access)
                .await;
        }
        if let Some(rule) = self.limiter.rule_for(&parts.method, routed.path(&parts)) {
            if self.limiter.shared() || !self.limiter.try_admit(routed.app, rule) {
                // Boxed, and only here: the wait's timer and the store's call would
                // otherwise enlarge every request's future, also of the calls no rule counts.
                Box::pin(self.limit(routed.app, rule)).await?;
            }
        }
        self.exchange(&routed, &mut parts, body, access).await
    }

    /// Limits: a call counted by a `[limits]` rule whose window is full waits for room up
    /// to `max_wait_ms`, else 429 `rate_limited` with `Retry-After` (SPEC section 4.9).
    async fn limit(&self, app: usize, rule: usize) -> Result<(), ProxyError> {
        let Err(limited) = self.limiter.admit(app, rule).await else {
            return Ok(());
        };
        self.metrics
            .rate_limited(&self.config.apps[app].name, &limited.rule);
        let mut e = ProxyError::new(ErrorKind::RateLimited, "");
        e.retry_after = Some(limited.retry_after);
        e.message = format!(
            "app {}: {} allows {} (PLATFORM.md section 3 or [limits]); the window is full, \
             retry after {} s",
            self.config.apps[app].name,
            limited.rule,
            limited.rate,
            e.retry_after_secs().unwrap_or(1)
        )
        .into();
        Err(e)
    }

    /// Admission: the client's address and identity, the method, the target's form and the
    /// declared body length. Returns the declared length.
    fn admit(
        &self,
        peer: &Peer,
        req: &Request<Incoming>,
        access: &mut Access,
    ) -> Result<Option<u64>, ProxyError> {
        self.allowed(peer)?;
        access.client = self.identify(peer)?;
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
        let declared = declared_length(req.headers())?;
        let max = self.config.server.max_body_bytes;
        if let Some(n) = declared.filter(|&n| n > max) {
            return Err(ProxyError::new(
                ErrorKind::PayloadTooLarge,
                format!("request body of {n} bytes is over the limit of {max}"),
            ));
        }
        Ok(declared)
    }

    /// Routing and authorisation: the app, the client's grant for it and the path, and the
    /// request headers as they may leave.
    fn route_request(
        &self,
        parts: &mut Parts,
        declared: Option<u64>,
        access: &mut Access,
    ) -> Result<Routed, ProxyError> {
        if let Some(why) = path_problem(parts.uri.path()) {
            return Err(ProxyError::new(ErrorKind::BadRequest, why));
        }
        if let Some(query) = parts.uri.query() {
            if token_behind_semicolon(query, &self.token_param) {
                return Err(ProxyError::new(
                    ErrorKind::BadRequest,
                    format!(
                        "the query names {} behind a ';': the proxy injects the token, and a \
                         server that splits on ';' would read the client's",
                        self.token_param
                    ),
                ));
            }
        }
        // Owned only when resolving dot segments changed the path.
        let normalized = match normalize_path(parts.uri.path()) {
            Cow::Borrowed(_) => None,
            Cow::Owned(p) => Some(p),
        };
        let full_path = normalized.as_deref().unwrap_or(parts.uri.path());
        let (app, skip) = self.route(full_path, &parts.headers)?;
        access.app = Some(app);
        if let Some(c) = access.client {
            self.check_grant(c, app, full_path)?;
        }
        sanitize_request_headers(&mut parts.headers, self.token_header.as_ref());
        Ok(Routed {
            declared,
            app,
            normalized,
            skip,
        })
    }

    /// A request to a token endpoint: answered here when it names a configured app, else
    /// forwarded unchanged with the client's own credentials.
    async fn token_request(
        &self,
        endpoint: &str,
        routed: &Routed,
        parts: &mut Parts,
        body: Incoming,
        access: &mut Access,
    ) -> Result<Response<Body>, ProxyError> {
        let params: Vec<_> = crate::wire::query_pairs(parts.uri.query().unwrap_or("")).collect();
        if let Some(idx) = self.named_app(endpoint, &params) {
            return self
                .local_token(
                    idx,
                    &parts.method,
                    &params,
                    access.client,
                    routed.full_path(parts),
                )
                .await;
        }
        let base = self.upstream.base_path();
        let path = routed.path(parts);
        let target = match parts.uri.query() {
            Some(q) => format!("{base}{path}?{q}"),
            None => format!("{base}{path}"),
        };
        let headers = std::mem::take(&mut parts.headers);
        let req = self.upstream_request(parts, headers, target, None, Body::Incoming(body))?;
        self.send(req, access).await
    }

    /// The exchange: the app's token injected, the call sent, the answer probed; a rejected
    /// token is dropped and the call replayed once with a new one (SPEC section 4.6).
    async fn exchange(
        &self,
        routed: &Routed,
        parts: &mut Parts,
        body: Incoming,
        access: &mut Access,
    ) -> Result<Response<Body>, ProxyError> {
        let max = self.config.server.max_body_bytes;
        let app = routed.app;
        let (mut body, tripped) =
            ReplayBody::new(body, routed.declared, max, self.upstream.timeout()).await?;
        let mut token = self.token(app, Need::Current).await?;
        let mut attempt = Attempt::First;
        // A GET, HEAD or OPTIONS that a reused connection dropped before any answer is sent
        // once more on a fresh one (SPEC section 4.4); other methods only if none of their
        // bytes were written, which the pool already does.
        let mut resendable = matches!(parts.method, Method::GET | Method::HEAD | Method::OPTIONS);
        loop {
            let out = body.next();
            // The last attempt takes the headers; an earlier one sends them and keeps a copy
            // for the replay. (The map sent is the one hyper reuses to parse the answer, and
            // the answer's goes on to the client: a copy's exact capacity would make both
            // grow, a reallocation each.)
            let headers = if body.replayable() && attempt == Attempt::First {
                let copy = parts.headers.clone();
                std::mem::replace(&mut parts.headers, copy)
            } else {
                std::mem::take(&mut parts.headers)
            };
            let target = self.target(routed.path(parts), parts.uri.query(), Some(&token));
            let req = self.upstream_request(parts, headers, target, Some(&token), out)?;
            let will_resend = resendable && body.replayable();
            let resp = match self.send_once(req, access, will_resend).await {
                Err(_) if tripped.as_ref().is_some_and(|t| t.load(Ordering::SeqCst)) => {
                    return Err(ProxyError::new(
                        ErrorKind::PayloadTooLarge,
                        format!("request body is over the limit of {max} bytes ({BodyTooLarge})"),
                    ))
                }
                Err(UpstreamError::Dropped) if will_resend => {
                    tracing::debug!("a reused upstream connection was closed: sending again");
                    resendable = false;
                    continue;
                }
                other => other?,
            };
            // An answer to HEAD has no body to probe (one that comes anyway is dropped).
            if parts.method == Method::HEAD {
                return Ok(resp);
            }
            let (resp, rejected) = self.check_rejection(resp, app).await?;
            if !rejected {
                return Ok(resp);
            }
            let name = &self.config.apps[app].name;
            let will_replay = body.replayable() && attempt == Attempt::First;
            tracing::info!(app = %name, replay = will_replay, "the platform rejected the token");
            self.tokens.reject(app, &token).await;
            if !will_replay {
                return Ok(resp);
            }
            attempt = Attempt::Replay;
            self.metrics.replay(name);
            token = self.token(app, Need::Replacement).await?;
        }
    }

    /// The app's token for a request, waited for no longer than `upstream.timeout_ms`
    /// (a fetch in flight elsewhere could otherwise hold a request past it).
    async fn token(&self, idx: usize, need: Need) -> Result<Arc<Token>, ProxyError> {
        // The token cache answers from its hot copy first either way (a rejected token has
        // already left it); asking here too spares a cached request the timer.
        if let Some(t) = self.tokens.cached(idx) {
            return Ok(t);
        }
        let wait = async {
            match need {
                Need::Replacement => self.tokens.token_for(idx, FetchReason::Rejected).await,
                Need::Current => self.tokens.token(idx).await,
            }
        };
        match tokio::time::timeout(self.upstream.timeout(), wait).await {
            Ok(result) => result.map_err(|e| ProxyError::from(&*e)),
            Err(_) => Err(ProxyError::new(
                ErrorKind::TokenUnavailable,
                format!(
                    "no access token within {} ms (a fetch is still in flight)",
                    self.upstream.timeout().as_millis()
                ),
            )),
        }
    }

    /// The upstream's path and query for `path`, the client's token dropped and ours added.
    fn target(&self, path: &str, query: Option<&str>, token: Option<&Token>) -> String {
        let inject = match token.map(Token::injection) {
            Some(Injection::Query(pair)) => Some(&**pair),
            _ => None,
        };
        upstream_target(
            self.upstream.base_path(),
            path,
            query,
            &self.token_param,
            inject,
        )
    }

    fn upstream_request(
        &self,
        parts: &Parts,
        mut headers: HeaderMap,
        target: String,
        token: Option<&Token>,
        body: Body,
    ) -> Result<Request<Body>, ProxyError> {
        let pq = PathAndQuery::from_maybe_shared(Bytes::from(target)).map_err(|_| {
            ProxyError::new(ErrorKind::BadRequest, "the request target is not valid")
        })?;
        if let (Some(name), Some(Injection::Header(value))) =
            (&self.token_header, token.map(Token::injection))
        {
            headers.insert(name.clone(), value.clone());
        }
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.uri_mut() = self.upstream.uri(pq);
        // The pool picks h2 or http/1.1 per connection; hyper wants the request marked 1.1.
        *req.version_mut() = Version::HTTP_11;
        *req.headers_mut() = headers;
        Ok(req)
    }

    async fn send(
        &self,
        req: Request<Body>,
        access: &mut Access,
    ) -> Result<Response<Body>, ProxyError> {
        self.send_once(req, access, false)
            .await
            .map_err(ProxyError::from)
    }

    /// [`Proxy::send`] that leaves a [`UpstreamError::Dropped`] to the caller uncounted
    /// when `will_resend` (it is not an error the client sees).
    async fn send_once(
        &self,
        req: Request<Body>,
        access: &mut Access,
        will_resend: bool,
    ) -> Result<Response<Body>, UpstreamError> {
        let sent = Instant::now();
        let resp = self.upstream.send(req).await;
        access.upstream = Some(sent.elapsed());
        let resp = resp.inspect_err(|e| match e {
            UpstreamError::Timeout(_) => self.metrics.upstream_error("timeout"),
            UpstreamError::Dropped if will_resend => {}
            UpstreamError::Unreachable(_) | UpstreamError::Dropped => {
                self.metrics.upstream_error("unreachable")
            }
        })?;
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        Ok(Response::from_parts(parts, body))
    }

    /// Probes a response (see [`probe`]) for an `err_code`: counts a non-zero one, and says
    /// whether it is one of the app's `invalid_codes`. Returns the response, re-assembled
    /// or resumed if read.
    async fn check_rejection(
        &self,
        resp: Response<Body>,
        idx: usize,
    ) -> Result<(Response<Body>, bool), ProxyError> {
        // An answer that breaks off while probed is an upstream error like one that never
        // came.
        let (resp, code) = probe::probe(resp, self.upstream.timeout())
            .await
            .inspect_err(|e| {
                self.metrics.upstream_error(match e.kind {
                    ErrorKind::UpstreamTimeout => "timeout",
                    _ => "unreachable",
                })
            })?;
        let Some(code) = code.filter(|&c| c != crate::platform::code::SUCCESS) else {
            return Ok((resp, false));
        };
        self.metrics
            .platform_error(&self.config.apps[idx].name, code);
        Ok((resp, self.config.apps[idx].invalid_codes.contains(&code)))
    }

    /// The configured app a token-endpoint request names: one whose token is asked for at
    /// `path` and whose non-secret parameters (`app_key` and `corp_id` for a self-built app,
    /// `corp_id` for a corp-service app, the plain `token_params` for any other) the query
    /// carries, with the same values.
    fn named_app(&self, path: &str, params: &[(Cow<'_, str>, Cow<'_, str>)]) -> Option<usize> {
        self.config.apps.iter().position(|a| {
            let naming = a.credentials.naming();
            a.token_path == path
                && !naming.is_empty()
                && naming
                    .iter()
                    .all(|(k, v)| params.iter().any(|(pk, pv)| pk == k && pv == v))
        })
    }

    /// Answers a request to a token endpoint that names configured app `idx` from the cache
    /// (SPEC section 4.3). The app's secret must match (compared in constant time;
    /// `corp_authorization` is not asked for), else 401; a method other than GET is 405, so
    /// no client can make the proxy fetch (and, on a platform that reissues, invalidate) the
    /// app's token; an identified client must be granted the app, else 403.
    async fn local_token(
        &self,
        idx: usize,
        method: &Method,
        params: &[(Cow<'_, str>, Cow<'_, str>)],
        client: Option<usize>,
        full_path: &str,
    ) -> Result<Response<Body>, ProxyError> {
        if let Some(c) = client {
            self.check_grant(c, idx, full_path)?;
        }
        let given = |name: &str| {
            params
                .iter()
                .find(|(k, _)| k == name)
                .map(|(_, v)| v.as_ref())
        };
        let app = &self.config.apps[idx];
        if method != Method::GET {
            return Err(ProxyError::new(
                ErrorKind::MethodNotAllowed,
                format!(
                    "{method} to the token endpoint naming app {}: the token is fetched with \
                     GET, and only by the proxy",
                    app.name
                ),
            ));
        }
        let proven = app
            .credentials
            .secret_params()
            .into_iter()
            .filter(|(k, _)| *k != "corp_authorization")
            .all(|(k, secret)| {
                let g = given(k).unwrap_or("");
                bool::from(secret.expose().as_bytes().ct_eq(g.as_bytes()))
            });
        if !proven {
            return Err(ProxyError::new(
                ErrorKind::BadCredentials,
                format!(
                    "the secret does not match the one configured for app {}",
                    app.name
                ),
            ));
        }
        let token = self.token(idx, Need::Current).await?;
        let body = crate::wire::token_answer(
            "success",
            token.secret().expose(),
            token.remaining(self.clock.now()).as_secs(),
        );
        let mut resp = Response::new(Body::full(body));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        Ok(resp)
    }

    /// Picks the app: by `X-CX-App` if present, else by the longest matching prefix.
    /// Returns the app's index and how many bytes of the path its prefix takes (stripped
    /// before forwarding).
    fn route(&self, path: &str, headers: &HeaderMap) -> Result<(usize, usize), ProxyError> {
        if let Some(v) = headers.get(X_CX_APP) {
            let name = v.to_str().unwrap_or("");
            let idx = self
                .config
                .apps
                .iter()
                .position(|a| a.name == name)
                .ok_or_else(|| {
                    let shown: String = name.chars().take(64).collect();
                    ProxyError::new(
                        ErrorKind::NoRoute,
                        format!("no app is named {shown:?} (X-CX-App)"),
                    )
                })?;
            let skip = self.config.apps[idx]
                .prefix
                .as_deref()
                .and_then(|p| rewrite::prefix_len(path, p))
                .unwrap_or(0);
            return Ok((idx, skip));
        }
        for &i in &self.by_prefix {
            if let Some(skip) = self.config.apps[i]
                .prefix
                .as_deref()
                .and_then(|p| rewrite::prefix_len(path, p))
            {
                return Ok((i, skip));
            }
        }
        Err(ProxyError::new(
            ErrorKind::NoRoute,
            "no app's prefix matches this path, and no X-CX-App header was sent",
        ))
    }
}

impl Proxy {
    /// Whether client `c` may use app `app` on `path` (as sent, dot segments resolved).
    fn check_grant(&self, c: usize, app: usize, path: &str) -> Result<(), ProxyError> {
        let client = &self.config.clients[c];
        let app_name = self.config.apps[app].name.as_str();
        if !client.apps.iter().any(|a| a == app_name) {
            return Err(ProxyError::new(
                ErrorKind::Forbidden,
                format!("client {} may not use app {app_name}", client.name),
            ));
        }
        if let Some(paths) = &client.paths {
            if !paths.iter().any(|p| path.starts_with(p.as_str())) {
                return Err(ProxyError::new(
                    ErrorKind::Forbidden,
                    format!("client {} may not use this path", client.name),
                ));
            }
        }
        Ok(())
    }
}

/// `Content-Length` as a number; `Err` if present but not a number.
fn declared_length(headers: &HeaderMap) -> Result<Option<u64>, ProxyError> {
    match headers.get(CONTENT_LENGTH) {
        None => Ok(None),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| ProxyError::new(ErrorKind::BadRequest, "invalid Content-Length")),
    }
}

async fn read_whole(body: Incoming, timeout: Duration) -> Result<Bytes, ProxyError> {
    match tokio::time::timeout(timeout, collect(body)).await {
        Ok(Ok(b)) => Ok(b),
        Ok(Err(e)) => Err(ProxyError::new(
            ErrorKind::BadRequest,
            format!("request body broke off: {e}"),
        )),
        Err(_) => Err(ProxyError::new(
            ErrorKind::BadRequest,
            "request body not received in time",
        )),
    }
}

/// Reads a whole (small) body (see [`Chunks`]).
async fn collect<B>(mut body: B) -> Result<Bytes, B::Error>
where
    B: http_body::Body<Data = Bytes> + Unpin,
{
    let mut chunks = Chunks::default();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame?.into_data() {
            chunks.push(data);
        }
    }
    Ok(chunks.into_bytes())
}

/// The chunks of a body read so far. The first is kept apart, so a body that arrives in one
/// chunk, as small ones do, is handed back as it came: no copy, no allocation. Later chunks
/// are joined after it.
#[derive(Default)]
struct Chunks {
    first: Option<Bytes>,
    joined: Option<bytes::BytesMut>,
    len: u64,
}

impl Chunks {
    fn push(&mut self, data: Bytes) {
        self.len += data.len() as u64;
        match (&self.first, &mut self.joined) {
            (None, _) => self.first = Some(data),
            (Some(f), None) => {
                let mut m = bytes::BytesMut::with_capacity(f.len() + data.len());
                m.extend_from_slice(f);
                m.extend_from_slice(&data);
                self.joined = Some(m);
            }
            (Some(_), Some(m)) => m.extend_from_slice(&data),
        }
    }

    /// Bytes read so far.
    fn len(&self) -> u64 {
        self.len
    }

    /// Everything read, as one chunk.
    fn into_bytes(self) -> Bytes {
        self.joined
            .map(bytes::BytesMut::freeze)
            .or(self.first)
            .unwrap_or_default()
    }
}

/// `X-Request-Id`: the request's id, taken from the client or made here (SPEC section 3).
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Whether a client's request id is kept: 1 to 128 visible ASCII characters (anything else
/// is replaced, so a log line never carries control bytes or a huge value).
fn usable_request_id(id: &HeaderValue) -> bool {
    let b = id.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| (0x21..0x7F).contains(c))
}

/// A new request id: 16 hex digits, a per-process random half and a counter, unique for
/// the process's life (not a secret, only a handle to find a request by).
fn new_request_id() -> HeaderValue {
    use std::sync::atomic::AtomicU64;
    use std::sync::OnceLock;
    static PREFIX: OnceLock<u32> = OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let prefix = *PREFIX.get_or_init(|| {
        let mut b = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
        u32::from_le_bytes(b)
    });
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let id = (u64::from(prefix) << 32) | (n & 0xFFFF_FFFF);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut text = [0u8; 16];
    for (i, slot) in text.iter_mut().enumerate() {
        *slot = HEX[((id >> (60 - 4 * i)) & 15) as usize];
    }
    // 16 hex digits are always a valid header value.
    let mut value =
        HeaderValue::from_bytes(&text).unwrap_or_else(|_| HeaderValue::from_static("-"));
    // Never indexed by HPACK, as in `Proxy::handle`.
    value.set_sensitive(true);
    value
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_request_ids_are_distinct_hex_and_never_indexed() {
        let (a, b) = (new_request_id(), new_request_id());
        assert_ne!(a, b);
        for id in [&a, &b] {
            assert_eq!(id.len(), 16);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit), "{id:?}");
            // HPACK must not index a value used once (see `Proxy::handle`).
            assert!(id.is_sensitive());
        }
    }
}
