//! The one pooled client to the platform.
//!
//! A small pool of hyper client connections over tokio-rustls, shared by the forwarding path
//! and the token fetcher. ALPN picks the protocol per connection: h2 is multiplexed (one
//! shared sender, cloned per request), http/1.1 connections are kept alive and reused
//! last-in first-out, so a light load stays on a few warm connections. Verification is never
//! off: the roots are the system's plus `upstream.ca_file`.
//!
//! Why not hyper-util's pooled client: on the hot path it spawns a task per HTTP/1 exchange
//! to watch the connection become ready again, keys a mutex-guarded map by scheme and
//! authority, and moves a large future per request; with one destination none of that is
//! needed. Here an HTTP/1 connection goes back to the pool from the response body itself,
//! the moment its last byte is read ([`Lease`]).
//!
//! The pool sizes itself. Up to [`OPEN_AT_ONCE`] (16) HTTP/1 connections are opened as
//! exchanges find none idle. Past that, an exchange that finds every connection busy queues
//! for one (first come, first served: a connection that comes back goes to the longest
//! waiting) and opens one more only after [`GROW_AFTER`] (50 ms per 16 open), and at most as
//! many at once as are open; so a fast upstream is served by a few warm connections and a
//! slow one gets as many as its latency needs (a wait for a busy connection there lasts a
//! whole exchange). Measured on the bench (loopback, CPU-bound): waiting before the first
//! connections kept the pool at 2-3 and cost 45 % of throughput at 32 clients; a fixed
//! 20 ms wait at any size grew it to ~200 at 256 clients, a fixed 100 ms kept it at 3; as
//! built, 16-17 connections at 32 and at 256 clients. Idle connections are reused most
//! recently used first and closed after [`IDLE_MAX`] unused, so the surplus of a
//! burst goes away. `max_connections` is the ceiling, not the working size: a semaphore of
//! exchanges in flight, and a connection is only opened by an exchange holding a permit.
//!
//! h2 multiplexes every app's calls onto one connection; another is opened only when every
//! open one carries [`H2_STREAMS`] exchanges. Once the upstream has been seen to speak h2, a
//! lost h2 connection is replaced by one exchange while the others wait for it, so a
//! dropped connection does not turn into a reconnect storm against the platform.
//!
//! Each serving worker (see `server.workers`) has a pool of its own, chosen by the thread an
//! exchange runs on ([`set_worker`]): a connection is driven by the runtime that opened it,
//! so a request never wakes another core to reach the platform. The `max_connections`
//! ceiling is shared.

mod body;

pub use body::{Body, BodyTooLarge};

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::header::HOST;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use crate::config::{EgressProxy, UpstreamConfig};
use crate::error::{chain, ErrorKind, ProxyError, StartupError};
use crate::tls;

/// An idle HTTP/1 connection older than this is closed rather than reused: servers commonly
/// drop idle keep-alive connections after 60 s, and a request written into one that is
/// being closed cannot be safely retried.
const IDLE_MAX: Duration = Duration::from_secs(50);
/// How often a request is moved to another connection when the pooled one turned out to be
/// closed before the request was written (always safe: nothing was sent).
const STALE_RETRIES: usize = 3;
/// Header fields an upstream answer may have (hyper's default, 100, is below what some
/// servers behind gateways send).
const MAX_RESPONSE_HEADERS: usize = 512;
/// Bytes an upstream answer's head may take (hyper's default read buffer ceiling).
const MAX_RESPONSE_HEAD_BYTES: usize = 400 * 1024;
/// TCP keep-alive probes on upstream connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
/// HTTP/2 keep-alive pings on upstream connections.
const H2_KEEPALIVE: Duration = Duration::from_secs(30);
/// HTTP/1 connections a pool opens on demand, as many as exchanges find none idle; past
/// this many, an exchange waits for a busy one first (see [`GROW_AFTER`]).
pub const OPEN_AT_ONCE: usize = 16;
/// How long an exchange that finds every HTTP/1 connection busy waits for one to come back
/// before it opens another, per [`OPEN_AT_ONCE`] connections open.
pub const GROW_AFTER: Duration = Duration::from_millis(50);
/// Exchanges in flight on one h2 connection before another is opened: the least RFC 9113
/// section 6.5.2 recommends a server allow (hyper does not say what the server's
/// `SETTINGS_MAX_CONCURRENT_STREAMS` is; past it, streams wait in hyper for a free one).
pub const H2_STREAMS: usize = 100;

/// Why an upstream exchange failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// No response head within `timeout_ms`.
    #[error("no answer from the upstream within {0} ms")]
    Timeout(u128),
    /// Connect, TLS or protocol failure.
    #[error("{0}")]
    Unreachable(String),
    /// A reused connection closed after the request was written and before a complete
    /// answer head (the upstream had closed it while idle; hyper cannot tell whether part of
    /// a head had come): safe to send again only if the method is idempotent (RFC 9110
    /// section 9.2.2).
    #[error("the upstream closed a reused connection before a complete answer head (it had likely closed it while idle)")]
    Dropped,
}

impl From<UpstreamError> for ProxyError {
    fn from(e: UpstreamError) -> Self {
        match e {
            UpstreamError::Timeout(_) => ProxyError::new(ErrorKind::UpstreamTimeout, e.to_string()),
            UpstreamError::Unreachable(_) | UpstreamError::Dropped => {
                ProxyError::new(ErrorKind::UpstreamUnreachable, e.to_string())
            }
        }
    }
}

/// The platform, as reached through the pool.
#[derive(Debug)]
pub struct Upstream {
    tls: Arc<ClientConfig>,
    /// Host (brackets removed) and port to connect to.
    host: String,
    port: u16,
    server_name: ServerName<'static>,
    authority: Authority,
    /// `Host` for HTTP/1 requests (the default port left out).
    host_header: HeaderValue,
    base_path: String,
    timeout: Duration,
    connect_timeout: Duration,
    /// The HTTP CONNECT proxy on the way, if any (`upstream.proxy`, `HTTPS_PROXY`).
    proxy: Option<EgressProxy>,
    /// One permit per upstream exchange in flight (`max_connections`).
    slots: Arc<Semaphore>,
    /// One pool per serving worker, plus one (index 0) for every other thread.
    pools: Box<[Arc<Pool>]>,
}

thread_local! {
    /// The serving worker this thread is (1-based), 0 for any other thread.
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Marks the calling thread as serving worker `i` (1-based; 0: not a worker), so exchanges
/// made on it use that worker's own pool of upstream connections.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
}

/// Idle HTTP/1 senders and the shared HTTP/2 senders.
#[derive(Debug, Default)]
pub struct Pool {
    idle: Mutex<Vec<(http1::SendRequest<Body>, Instant)>>,
    /// HTTP/1 connections being opened or open (idle or busy), counted down when one
    /// closes.
    open: Arc<AtomicUsize>,
    /// Connections being opened (TCP, TLS, handshake), of either protocol.
    connecting: Arc<AtomicUsize>,
    /// Exchanges waiting for a busy HTTP/1 connection, first come first served: a
    /// connection that comes back goes to the first of them still waiting, not to `idle`.
    waiting: Mutex<VecDeque<oneshot::Sender<http1::SendRequest<Body>>>>,
    /// h2 connections, each with its exchanges in flight.
    h2: Mutex<Vec<(http2::SendRequest<Body>, Arc<AtomicUsize>)>>,
    /// The upstream has answered ALPN with h2 before: when its connection is gone, one
    /// exchange reconnects and the others wait for it (`h2_connecting`) instead of every
    /// exchange in flight opening a connection of its own.
    h2_seen: AtomicBool,
    h2_connecting: tokio::sync::Mutex<()>,
}

impl Pool {
    fn put(&self, mut sender: http1::SendRequest<Body>) {
        if sender.is_closed() {
            return;
        }
        if let Ok(mut waiting) = self.waiting.lock() {
            while let Some(waiter) = waiting.pop_front() {
                // A waiter that gave up hands the connection back.
                match waiter.send(sender) {
                    Ok(()) => return,
                    Err(back) => sender = back,
                }
            }
        }
        if let Ok(mut idle) = self.idle.lock() {
            idle.push((sender, Instant::now()));
        }
    }

    /// The most recently used idle connection that is still open and young enough.
    fn take(&self) -> Option<http1::SendRequest<Body>> {
        let mut idle = self.idle.lock().ok()?;
        while let Some((sender, since)) = idle.pop() {
            if !sender.is_closed() && since.elapsed() < IDLE_MAX {
                return Some(sender);
            }
        }
        None
    }

    /// An idle connection; else, with fewer than [`OPEN_AT_ONCE`] open, `None` (open one
    /// now); else the first busy one to come back within [`Pool::grow_after`], or `None`
    /// once waited that long.
    async fn take_or_wait(&self) -> Option<http1::SendRequest<Body>> {
        if let Some(sender) = self.take() {
            return Some(sender);
        }
        if self.open.load(Ordering::Relaxed) < OPEN_AT_ONCE || self.h2_seen.load(Ordering::Relaxed)
        {
            return None;
        }
        let (tx, mut rx) = oneshot::channel();
        {
            let mut waiting = self.waiting.lock().ok()?;
            // One put back since the look above (a worker's pool is only used from its own
            // thread, but pool 0 is shared).
            if let Some(sender) = self.take() {
                return Some(sender);
            }
            waiting.push_back(tx);
        }
        loop {
            match tokio::time::timeout(self.grow_after(), &mut rx).await {
                Ok(Ok(sender)) => return Some(sender),
                // The pool is going away, or the upstream turned out to speak h2.
                Ok(Err(_)) => return None,
                // Waited long enough: one more connection, unless as many are being opened
                // as are open already (the pool at most doubles per connect, so a burst
                // of clients does not open one connection each). Still in line otherwise.
                Err(_) => {
                    let connecting = self.connecting.load(Ordering::Relaxed);
                    let open = self.open.load(Ordering::Relaxed).saturating_sub(connecting);
                    if connecting < open.max(1) {
                        // A connection handed over as the wait ended is kept, not lost.
                        rx.close();
                        return rx.try_recv().ok();
                    }
                }
            }
        }
    }

    /// How long an exchange waits for a busy connection before it opens one more:
    /// [`GROW_AFTER`] per [`OPEN_AT_ONCE`] connections open. A fast upstream on a busy
    /// machine then settles on a few dozen connections instead of one per client (the
    /// wait there is the machine's queue, which more connections do not shorten).
    fn grow_after(&self) -> Duration {
        let open = self.open.load(Ordering::Relaxed) / OPEN_AT_ONCE;
        GROW_AFTER.saturating_mul(u32::try_from(open.max(1)).unwrap_or(u32::MAX))
    }

    /// Wakes every exchange waiting for an HTTP/1 connection (the upstream speaks h2).
    fn release_waiting(&self) {
        if let Ok(mut waiting) = self.waiting.lock() {
            waiting.clear();
        }
    }

    /// An h2 connection with room for one more exchange, counted in.
    fn shared_h2(&self) -> Option<(http2::SendRequest<Body>, Counted)> {
        self.least_loaded_h2(H2_STREAMS)
    }

    /// The open h2 connection with the fewest exchanges in flight, counted in, if those are
    /// fewer than `below`.
    fn least_loaded_h2(&self, below: usize) -> Option<(http2::SendRequest<Body>, Counted)> {
        let mut h2 = self.h2.lock().ok()?;
        h2.retain(|(s, _)| !s.is_closed());
        h2.iter()
            .map(|(s, streams)| (s, streams, streams.load(Ordering::Relaxed)))
            .filter(|&(_, _, n)| n < below)
            .min_by_key(|&(_, _, n)| n)
            .map(|(s, streams, _)| (s.clone(), Counted::count(streams)))
    }

    /// Adds a new h2 connection, unless another with room was added meanwhile (the first
    /// exchanges after a start each open one before any knows the upstream speaks h2): that
    /// one then carries this exchange only and closes after it. Returns the exchange's count.
    fn add_h2(&self, sender: &http2::SendRequest<Body>) -> Counted {
        self.h2_seen.store(true, Ordering::Relaxed);
        let streams = Arc::new(AtomicUsize::new(0));
        let stream = Counted::count(&streams);
        if let Ok(mut h2) = self.h2.lock() {
            h2.retain(|(s, _)| !s.is_closed());
            let room = h2
                .iter()
                .any(|(_, n)| n.load(Ordering::Relaxed) < H2_STREAMS);
            if !room {
                h2.push((sender.clone(), streams));
            }
        }
        // Exchanges waiting for an HTTP/1 connection to come back take this one instead.
        self.release_waiting();
        stream
    }
}

/// What an upstream response body holds until it is read to the end or dropped: the
/// exchange's `max_connections` slot and, on HTTP/1, the connection, which goes back to the
/// pool only if the body was read to its end (otherwise hyper closes it).
#[derive(Debug)]
pub struct Lease {
    permit: Option<OwnedSemaphorePermit>,
    conn: Option<(http1::SendRequest<Body>, Arc<Pool>)>,
    /// The h2 stream's place in its connection's count.
    stream: Option<Counted>,
}

impl Lease {
    /// The body was read to its end: the connection may serve the next exchange.
    pub fn finish(&mut self) {
        if let Some((sender, pool)) = self.conn.take() {
            pool.put(sender);
        }
        self.permit = None;
        self.stream = None;
    }
}

enum Conn {
    H1(http1::SendRequest<Body>),
    H2(http2::SendRequest<Body>, Counted),
}

impl Upstream {
    /// Builds the pools, one per serving worker of `workers` plus one for other threads (no
    /// connection is opened yet).
    pub fn new(cfg: &UpstreamConfig, workers: usize) -> Result<Self, StartupError> {
        let roots = tls::upstream_roots(cfg.ca_file.as_deref())?;
        let mut config: ClientConfig = tls::client_config(roots)?;
        config.alpn_protocols = tls::ALPN.iter().map(|p| p.to_vec()).collect();
        let host = cfg
            .authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let server_name = ServerName::try_from(host.clone())
            .map_err(|e| StartupError::Tls(format!("upstream host {host:?}: {e}")))?;
        let port = cfg.authority.port_u16().unwrap_or(443);
        let host_header = match cfg.authority.port_u16() {
            Some(443) => HeaderValue::from_str(cfg.authority.host()),
            _ => HeaderValue::from_str(cfg.authority.as_str()),
        }
        .map_err(|e| StartupError::Other(format!("upstream host: {e}")))?;
        Ok(Upstream {
            tls: Arc::new(config),
            host,
            port,
            server_name,
            authority: cfg.authority.clone(),
            host_header,
            base_path: cfg.base_path.clone(),
            timeout: cfg.timeout,
            connect_timeout: cfg.connect_timeout,
            proxy: cfg.proxy.clone(),
            slots: Arc::new(Semaphore::new(cfg.max_connections)),
            pools: (0..=workers).map(|_| Arc::default()).collect(),
        })
    }

    /// How many serving workers the pools were made for.
    pub fn workers(&self) -> usize {
        self.pools.len() - 1
    }

    /// The calling thread's pool.
    fn pool(&self) -> &Arc<Pool> {
        let i = WORKER.with(Cell::get);
        // A worker index past the pools (none is made that way) shares the first.
        self.pools.get(i).unwrap_or(&self.pools[0])
    }

    /// The upstream's path prefix (empty unless `upstream.url` has a path).
    pub fn base_path(&self) -> &str {
        &self.base_path
    }

    /// The whole-exchange timeout.
    pub fn timeout(&self) -> Duration {
        self.timeout
    }

    /// The request target for a path-and-query that already includes the base path
    /// (origin-form; [`Upstream::send`] adds scheme and authority where HTTP/2 needs them).
    pub fn uri(&self, path_and_query: PathAndQuery) -> Uri {
        Uri::from(path_and_query)
    }

    /// Sends a request (its URI built by [`Upstream::uri`]) and waits for the response head
    /// within `timeout_ms`.
    /// The response body holds a slot of `max_connections` until it is read or dropped.
    pub async fn send(&self, req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        match tokio::time::timeout(self.timeout, self.exchange(req)).await {
            Ok(result) => result,
            Err(_) => Err(UpstreamError::Timeout(self.timeout.as_millis())),
        }
    }

    async fn exchange(&self, mut req: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        // Waiting for a slot counts against the timeout like the exchange itself. The
        // semaphore is never closed, so a permit always comes.
        let permit = self.slots.clone().acquire_owned().await.ok();
        let mut stale = 0;
        loop {
            let pool = self.pool();
            let h2 = match pool.h2_seen.load(Ordering::Relaxed) {
                true => pool.shared_h2(),
                false => None,
            };
            let (conn, pooled) = match h2 {
                Some((sender, stream)) => (Conn::H2(sender, stream), true),
                None => match pool.take_or_wait().await {
                    Some(sender) => (Conn::H1(sender), true),
                    // Boxed: connecting is rare and its future large.
                    None => Box::pin(self.connect_once()).await?,
                },
            };
            let mut failed = match conn {
                Conn::H1(mut sender) => {
                    // A connection back from the pool may still be finishing its last
                    // exchange; ready() waits for that, or fails if it was closed.
                    if let Err(e) = sender.ready().await {
                        if pooled {
                            continue;
                        }
                        return Err(exchange_failed(&e));
                    }
                    req.headers_mut().insert(HOST, self.host_header.clone());
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            let mut lease = Lease {
                                permit,
                                conn: Some((sender, pool.clone())),
                                stream: None,
                            };
                            // No body to read (HEAD, 204, 304, length 0): nobody will poll
                            // it, so the connection goes back now.
                            if http_body::Body::is_end_stream(resp.body()) {
                                lease.finish();
                            }
                            return Ok(resp.map(|inner| Body::Upstream { inner, lease }));
                        }
                        Err(e) => e,
                    }
                }
                Conn::H2(mut sender, stream) => {
                    *req.uri_mut() = self.absolute(req.uri());
                    match sender.try_send_request(req).await {
                        Ok(resp) => {
                            let lease = Lease {
                                permit,
                                conn: None,
                                stream: Some(stream),
                            };
                            return Ok(resp.map(|inner| Body::Upstream { inner, lease }));
                        }
                        Err(e) => e,
                    }
                }
            };
            match failed.take_message() {
                // Never written, so safe to move to another connection: the pooled one was
                // closed under us.
                Some(back) if pooled && stale < STALE_RETRIES => {
                    stale += 1;
                    req = back;
                }
                _ if pooled && closed_before_answer(failed.error()) => {
                    return Err(UpstreamError::Dropped)
                }
                _ => return Err(exchange_failed(failed.error())),
            }
        }
    }

    fn absolute(&self, origin: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        // `upstream.url` is always https (the config refuses anything else).
        parts.scheme = Some(Scheme::HTTPS);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = origin.path_and_query().cloned();
        // Scheme, authority and path are all present and individually valid.
        Uri::from_parts(parts).unwrap_or_default()
    }

    /// A new connection, or, for an h2 upstream, the one another exchange just opened
    /// (`true`: shared, not opened here).
    async fn connect_once(&self) -> Result<(Conn, bool), UpstreamError> {
        if !self.pool().h2_seen.load(Ordering::Relaxed) {
            return Ok((self.connect().await?, false));
        }
        let _turn = self.pool().h2_connecting.lock().await;
        match self.pool().shared_h2() {
            Some((sender, stream)) => Ok((Conn::H2(sender, stream), true)),
            None => match self.connect().await {
                Ok(conn) => Ok((conn, false)),
                // Another connection could not be had (the platform or a proxy limits
                // them): the least loaded open one takes the exchange, and hyper queues it
                // for a free stream.
                Err(e) => match self.pool().least_loaded_h2(usize::MAX) {
                    Some((sender, stream)) => Ok((Conn::H2(sender, stream), true)),
                    None => Err(e),
                },
            },
        }
    }

    /// Opens a TCP + TLS connection (through the egress proxy's tunnel when there is one)
    /// and starts hyper on it (h2 if the server picked it).
    async fn connect(&self) -> Result<Conn, UpstreamError> {
        // Every failure after the tunnel (TLS, h2) names the proxy too: a TLS-inspecting
        // proxy shows up as a certificate the platform never sent.
        let via = self
            .proxy
            .as_ref()
            .map(|p| format!(" through the proxy {}", p.authority))
            .unwrap_or_default();
        let fail = |what: String| {
            UpstreamError::Unreachable(format!("cannot connect to the upstream{via}: {what}"))
        };
        // Counted from now: exchanges arriving meanwhile wait for it rather than open more.
        let opening = Counted::count(&self.pool().open);
        let _connecting = Counted::count(&self.pool().connecting);
        let tcp = match &self.proxy {
            None => tokio::time::timeout(
                self.connect_timeout,
                TcpStream::connect((self.host.as_str(), self.port)),
            )
            .await
            .map_err(|_| {
                fail(format!(
                    "no TCP connection within {} ms",
                    self.connect_timeout.as_millis()
                ))
            })?
            .map_err(|e| fail(e.to_string()))?,
            Some(proxy) => tokio::time::timeout(self.connect_timeout, self.tunnel(proxy))
                .await
                .map_err(|_| {
                    fail(format!(
                        "no tunnel within {} ms",
                        self.connect_timeout.as_millis()
                    ))
                })?
                .map_err(fail)?,
        };
        let _ = tcp.set_nodelay(true);
        let _ = socket2::SockRef::from(&tcp)
            .set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE));
        let stream = TlsConnector::from(self.tls.clone())
            .connect(self.server_name.clone(), tcp)
            .await
            .map_err(|e| fail(format!("TLS: {}", chain(&e))))?;
        let h2 = stream.get_ref().1.alpn_protocol() == Some(b"h2");
        let io = TokioIo::new(stream);
        if h2 {
            let (sender, conn) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_KEEPALIVE)
                .handshake(io)
                .await
                .map_err(|e| fail(chain(&e)))?;
            drive(conn, None);
            drop(opening);
            let stream = self.pool().add_h2(&sender);
            Ok(Conn::H2(sender, stream))
        } else {
            let (sender, conn) = http1::Builder::new()
                .max_headers(MAX_RESPONSE_HEADERS)
                .max_buf_size(MAX_RESPONSE_HEAD_BYTES)
                .handshake(io)
                .await
                .map_err(|e| fail(chain(&e)))?;
            drive(conn, Some(opening));
            Ok(Conn::H1(sender))
        }
    }
}

impl Upstream {
    /// A TCP connection to the platform through `proxy`: `CONNECT host:port` (RFC 9110
    /// section 9.3.6) sent and answered through hyper, then the bare socket back for TLS.
    /// `Err` says what went wrong, in words (the proxy's status and reason when it refused).
    async fn tunnel(&self, proxy: &EgressProxy) -> Result<TcpStream, String> {
        let tcp = TcpStream::connect((
            proxy
                .authority
                .host()
                .trim_start_matches('[')
                .trim_end_matches(']'),
            proxy.authority.port_u16().unwrap_or(1080),
        ))
        .await
        .map_err(|e| format!("cannot reach the proxy: {e}"))?;
        let _ = tcp.set_nodelay(true);
        // Title case (`Proxy-Authorization`), as curl sends it: some proxies (tinyproxy
        // among them) look header names up case-sensitively.
        let (mut sender, conn) = http1::Builder::new()
            .title_case_headers(true)
            .handshake::<_, Body>(TokioIo::new(tcp))
            .await
            .map_err(|e| chain(&e))?;
        // The connection's task ends when it hands the socket over. If this future is
        // dropped first (connect_timeout, a refusal), hyper closes the connection once the
        // sender is gone; the guard makes sure the task never outlives this future anyway.
        let _conn = AbortOnDrop(tokio::spawn(conn.with_upgrades()));
        let target = if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        };
        let mut req = Request::connect(target.as_str())
            .header(HOST, target.as_str())
            .body(Body::Empty)
            .map_err(|e| format!("cannot build CONNECT {target}: {e}"))?;
        if let Some(auth) = &proxy.authorization {
            req.headers_mut()
                .insert(http::header::PROXY_AUTHORIZATION, auth.clone());
        }
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| format!("the proxy did not answer CONNECT {target}: {}", chain(&e)))?;
        let status = resp.status();
        if !status.is_success() {
            let hint = match status.as_u16() {
                // 407 by RFC 9110; some proxies (tinyproxy) answer wrong ones with 401.
                401 | 407 => " (it wants other credentials: the user and password of upstream.proxy or HTTPS_PROXY)",
                _ => "",
            };
            return Err(format!(
                "the proxy refused CONNECT {target} with {status}{hint}"
            ));
        }
        let upgraded = hyper::upgrade::on(resp)
            .await
            .map_err(|e| format!("the tunnel did not open: {}", chain(&e)))?;
        let parts = upgraded
            .downcast::<TokioIo<TcpStream>>()
            .map_err(|_| "the tunnel did not open: not a TCP stream".to_owned())?;
        // TLS starts with the client's hello: a proxy that already sent bytes is not a
        // tunnel to a TLS server.
        if !parts.read_buf.is_empty() {
            return Err("the proxy sent data into the tunnel before TLS began".into());
        }
        Ok(parts.io.into_inner())
    }
}

/// Aborts a task when dropped.
struct AbortOnDrop<T>(tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Runs a client connection on its own task until it closes, counted in `open` meanwhile.
fn drive(
    conn: impl std::future::Future<Output = hyper::Result<()>> + Send + 'static,
    open: Option<Counted>,
) {
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
        drop(open);
    });
}

/// One in a count until dropped: a pool's connections open or being opened, an h2
/// connection's exchanges in flight (dropped with the response body or the failed exchange).
#[derive(Debug)]
struct Counted(Arc<AtomicUsize>);

impl Counted {
    fn count(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Counted(count.clone())
    }
}

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Whether an exchange on a reused connection ended before any answer because the
/// connection went away: EOF before the response head (with or without TLS close_notify),
/// or a reset. (A failed `try_send_request` never saw a response head.)
fn closed_before_answer(e: &hyper::Error) -> bool {
    if e.is_incomplete_message() {
        return true;
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::ConnectionAborted
                    // TLS: the peer closed without close_notify.
                    | std::io::ErrorKind::UnexpectedEof
            );
        }
        source = s.source();
    }
    false
}

/// What a failed exchange says: what happened, in words, then hyper's own chain.
fn exchange_failed(e: &hyper::Error) -> UpstreamError {
    let what = if e.is_parse_too_large() {
        format!(
            "the upstream's response head is over the proxy's limit ({MAX_RESPONSE_HEADERS} \
             header fields, {} KiB)",
            MAX_RESPONSE_HEAD_BYTES / 1024
        )
    } else if e.is_parse_status() {
        "the upstream's response has an invalid status code".to_owned()
    } else if e.is_parse() {
        "the upstream's answer is not valid HTTP".to_owned()
    } else if e.is_incomplete_message() {
        "the upstream closed the connection before its answer was complete".to_owned()
    } else if e.is_timeout() {
        "the upstream did not answer in time".to_owned()
    } else {
        "the upstream exchange failed".to_owned()
    };
    UpstreamError::Unreachable(format!("{what}: {}", chain(e)))
}
