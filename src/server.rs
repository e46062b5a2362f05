//! Accept loops: one task per connection, HTTP/1.1 and HTTP/2 (h2c or ALPN), optional TLS and
//! mTLS, limits, graceful shutdown.
//!
//! [`serve`] is generic over the service so the proxy, the admin port and the sandbox share
//! it. It takes a pre-bound listener (tests bind `127.0.0.1:0`) and a shutdown future; on
//! shutdown it stops accepting, lets in-flight requests finish for up to `grace`, then
//! returns. The TLS handshake runs inside the connection's task, under a timeout, so a slow
//! handshake never stalls the accept loop.

use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use rustls::ServerConfig;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::BoxError;

mod target;

pub use target::EscapeTargets;

/// Who is on the other end of a connection.
#[derive(Debug, Clone, Default)]
pub struct Peer {
    /// The client's address.
    pub addr: Option<SocketAddr>,
    /// DNS names (SAN) of its verified client certificate (mTLS only).
    pub cert_names: Option<Arc<[String]>>,
}

impl std::fmt::Display for Peer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.addr {
            Some(a) => write!(f, "{a}"),
            None => f.write_str("-"),
        }
    }
}

impl Peer {
    /// A peer known by address only.
    pub fn from_addr(addr: SocketAddr) -> Self {
        Peer {
            addr: Some(addr),
            cert_names: None,
        }
    }

    /// The client's address, IPv4-mapped IPv6 as IPv4.
    pub fn ip(&self) -> Option<IpAddr> {
        self.addr.map(|a| a.ip().to_canonical())
    }
}

/// Longest a TLS handshake may take before the connection is dropped.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request head; on HTTP/1 also how long a keep-alive
/// connection may sit idle between requests.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most header fields in one HTTP/1 request (more: 431).
pub const MAX_HEADERS: usize = 100;
/// Largest request head in bytes (larger: 431 on HTTP/1, refused on HTTP/2).
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// HTTP/2 keep-alive ping interval; a peer that does not answer within the same time is
/// dropped.
pub const H2_KEEPALIVE: Duration = Duration::from_secs(60);
/// First and largest pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Pending connections a listening socket may queue (tokio's own default).
const LISTEN_BACKLOG: i32 = 1024;

/// Raises this process's soft limit of open files to its hard limit (nginx's
/// `worker_rlimit_nofile`, and what Go's runtime does at start: the soft default is often
/// 1024, the hard one far higher), and returns a warning when even that is below `need`
/// descriptors. Unix only; elsewhere `None`.
pub fn raise_open_files_limit(need: u64) -> Option<String> {
    #[cfg(unix)]
    {
        use rustix::process::{getrlimit, setrlimit, Resource};
        let mut limit = getrlimit(Resource::Nofile);
        if limit.current.is_some() && limit.current != limit.maximum {
            let raised = rustix::process::Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            };
            // Refused (macOS caps the soft limit below an unlimited hard one): kept as is.
            if setrlimit(Resource::Nofile, raised).is_ok() {
                let before = limit.current;
                limit = getrlimit(Resource::Nofile);
                tracing::debug!(?before, now = ?limit.current, "open-files limit raised");
            }
        }
        match limit.current {
            Some(have) if have < need => Some(format!(
                "the open-files limit is {have}, below the ~{need} descriptors this config may \
                 use (its workers and upstream.max_connections, and room for clients); \
                 past it new connections fail with \"Too many open files\": raise it \
                 (LimitNOFILE= in a systemd unit, ulimit -n in a shell)"
            )),
            _ => None,
        }
    }
    #[cfg(not(unix))]
    {
        let _ = need;
        None
    }
}

/// Binds `n` listening sockets to one address and port, one per serving worker, each to be
/// served by its own runtime.
///
/// On Linux they share the port through `SO_REUSEPORT`, and the kernel spreads new
/// connections across them (nginx's `reuseport`), so no two workers wake for the same
/// connection; any process of the same user that sets `SO_REUSEPORT` could join the group
/// (run the service as a user of its own). Elsewhere (macOS and the BSDs do not spread
/// connections that way) one socket is cloned and every worker accepts from it. A port
/// already in use, by any process, another cx-proxy included, is refused as a plain bind
/// would refuse it: a plain socket is bound to it first and closed before the group is
/// bound.
///
/// The sockets are non-blocking, ready for `tokio::net::TcpListener::from_std` on the
/// runtime that serves each.
pub fn bind_group(addr: SocketAddr, n: usize) -> std::io::Result<Vec<std::net::TcpListener>> {
    use socket2::{Domain, Socket, Type};
    let n = n.max(1);
    let socket = || -> std::io::Result<Socket> {
        let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
        // As std and tokio do: a restart binds while old connections sit in TIME_WAIT.
        #[cfg(unix)]
        s.set_reuse_address(true)?;
        Ok(s)
    };
    // The plain bind that refuses a port in use; with port 0 it also picks the port.
    // Two instances started at the same moment could both pass it before either binds its
    // group: the first to hold the port's lock wins (Linux).
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let lock = match addr.port() {
        0 => None,
        _ => Some(port_lock(addr)?),
    };
    let probe = socket()?;
    probe.bind(&addr.into())?;
    let addr = probe
        .local_addr()?
        .as_socket()
        .ok_or_else(|| std::io::Error::other("bound to a non-IP address"))?;
    drop(probe);
    let listen = |s: Socket| -> std::io::Result<std::net::TcpListener> {
        s.listen(LISTEN_BACKLOG)?;
        s.set_nonblocking(true)?;
        Ok(s.into())
    };
    #[cfg(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    ))]
    {
        let group = (0..n)
            .map(|_| {
                let s = socket()?;
                s.set_reuse_port(true)?;
                s.bind(&addr.into())?;
                listen(s)
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        // Held as long as the process lives: a later instance finds the port in use anyway.
        std::mem::forget(lock);
        Ok(group)
    }
    #[cfg(not(all(
        unix,
        not(any(target_os = "solaris", target_os = "illumos", target_os = "cygwin"))
    )))]
    {
        let s = socket()?;
        s.bind(&addr.into())?;
        let first = listen(s)?;
        let mut group = Vec::with_capacity(n);
        for _ in 1..n {
            group.push(first.try_clone()?);
        }
        group.push(first);
        Ok(group)
    }
}

/// An abstract Unix socket named after `addr`, held by the one process serving it: a second
/// cx-proxy binding the same address at the same moment gets `AddrInUse`.
#[cfg(any(target_os = "linux", target_os = "android"))]
fn port_lock(addr: SocketAddr) -> std::io::Result<std::os::unix::net::UnixListener> {
    #[cfg(target_os = "android")]
    use std::os::android::net::SocketAddrExt;
    #[cfg(target_os = "linux")]
    use std::os::linux::net::SocketAddrExt;
    let name = format!("cx-proxy listen {addr}");
    let at = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixListener::bind_addr(&at)
}

/// Called with the reason (see [`parse_refusal`]) when hyper's parser refuses a request.
pub type OnRefused = Arc<dyn Fn(&'static str) + Send + Sync>;

/// How [`serve`] runs a listener, beside its service.
#[derive(Clone)]
pub struct Serving {
    /// TLS (and mTLS) for every connection; `None` serves plain HTTP (and h2c).
    pub tls: Option<Arc<ArcSwap<ServerConfig>>>,
    /// How long in-flight requests may finish after shutdown.
    pub grace: Duration,
    /// Hears of every request hyper's parser refused, with the reason of [`parse_refusal`].
    pub refused: Option<OnRefused>,
    /// Sends the service's body on answers to HEAD, as a faulty server does (the sandbox's
    /// `head_bodies` fault). Otherwise no answer to HEAD carries a body on any protocol
    /// (RFC 9110 section 9.3.2; hyper leaves it out on HTTP/1 only, and on HTTP/2 the peer
    /// takes one as a protocol error). Its `Content-Length` stays.
    pub head_bodies: bool,
}

impl Serving {
    /// Plain HTTP, the given grace, nothing told of refusals, no bodies on HEAD.
    pub fn plain(grace: Duration) -> Self {
        Serving {
            tls: None,
            grace,
            refused: None,
            head_bodies: false,
        }
    }
}

/// Serves `listener` until `shutdown` resolves, then drains for up to `serving.grace`.
/// `make_service` is called once per connection, after any TLS handshake.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    make_service: M,
    shutdown: impl Future<Output = ()>,
    serving: Serving,
) where
    M: Fn(Peer) -> S + Clone + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .max_headers(MAX_HEADERS)
        .max_buf_size(MAX_HEAD_BYTES)
        .keep_alive(true)
        // A client that shuts its write side after a complete request (some legacy clients,
        // `nc`) still gets its answer, as nginx gives it.
        .half_close(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE);
    let builder = Arc::new(builder);
    let Serving {
        tls,
        grace,
        refused,
        head_bodies,
    } = serving;
    let graceful = GracefulShutdown::new();
    let mut backoff = ACCEPT_BACKOFF.0;
    tokio::pin!(shutdown);
    loop {
        let (stream, addr) = tokio::select! {
            biased;
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => {
                    backoff = ACCEPT_BACKOFF.0;
                    a
                }
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed; backing off");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(ACCEPT_BACKOFF.1);
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let make_service = make_service.clone();
        let tls = tls.as_ref().map(|t| TlsAcceptor::from(t.load_full()));
        let refused = refused.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let service = HeadSafe::new(make_service(Peer::from_addr(addr)), head_bodies);
                    serve_io(&builder, watcher, EscapeTargets::new(stream), service).await
                }
                Some(acceptor) => {
                    let Some((io, cert_names)) = handshake(acceptor, stream).await else {
                        return;
                    };
                    let peer = Peer {
                        addr: Some(addr),
                        cert_names,
                    };
                    let service = HeadSafe::new(make_service(peer), head_bodies);
                    serve_io(&builder, watcher, EscapeTargets::new(io), service).await
                }
            };
            if let Err(e) = result {
                match e.downcast_ref::<hyper::Error>().and_then(parse_refusal) {
                    // What hyper's parser refused got its bare 400 or 431: said and counted.
                    Some(reason) => {
                        tracing::info!(peer = %addr, reason, error = %e, "request refused by the HTTP parser");
                        if let Some(refused) = &refused {
                            refused(reason);
                        }
                    }
                    None => {
                        tracing::debug!(peer = %addr, error = %e, "connection ended with an error")
                    }
                }
            }
        });
    }
    drop(listener);
    let open = graceful.count();
    if open > 0 {
        tracing::info!(
            connections = open,
            grace_s = grace.as_secs(),
            "draining in-flight requests"
        );
    }
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(grace) => tracing::warn!("grace period over; closing the remaining connections"),
    }
}

/// What kind of request hyper's parser refused, as a metric label: `uri`, `method`,
/// `header`, `version`, `too_large` or `other`; `None` for an error that is no refusal.
pub fn parse_refusal(e: &hyper::Error) -> Option<&'static str> {
    if !e.is_parse() {
        return None;
    }
    if e.is_parse_too_large() {
        return Some("too_large");
    }
    // hyper's parse kinds are not public; their messages are fixed strings.
    let text = e.to_string();
    Some(if text.contains("URI") {
        "uri"
    } else if text.contains("method") {
        "method"
    } else if text.contains("header") {
        "header"
    } else if text.contains("version") {
        "version"
    } else {
        "other"
    })
}

/// Serves one accepted connection, plain or TLS, until it ends or the drain cuts it.
async fn serve_io<I, S, B>(
    builder: &auto::Builder<TokioExecutor>,
    watcher: Watcher,
    io: I,
    service: S,
) -> Result<(), BoxError>
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: Service<Request<Incoming>, Response = Response<B>> + Send + 'static,
    S::Error: Into<BoxError>,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    watcher
        .watch(
            builder
                .serve_connection(TokioIo::new(io), service)
                .into_owned(),
        )
        .await
}

pin_project_lite::pin_project! {
    /// A service's body, or nothing in its place on an answer to HEAD (the body is held,
    /// never polled, and dropped with the answer).
    pub struct Headless<B> {
        #[pin]
        body: B,
        dropped: bool,
    }
}

impl<B: http_body::Body> http_body::Body for Headless<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<B::Data>, B::Error>>> {
        let this = self.project();
        if *this.dropped {
            return std::task::Poll::Ready(None);
        }
        this.body.poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.dropped || self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        if self.dropped {
            return http_body::SizeHint::with_exact(0);
        }
        self.body.size_hint()
    }
}

/// A service whose answers to HEAD go out without their body (see [`Serving::head_bodies`]).
struct HeadSafe<S> {
    inner: S,
    keep_bodies: bool,
}

impl<S> HeadSafe<S> {
    fn new(inner: S, keep_bodies: bool) -> Self {
        HeadSafe { inner, keep_bodies }
    }
}

impl<S, B> Service<Request<Incoming>> for HeadSafe<S>
where
    S: Service<Request<Incoming>, Response = Response<B>>,
{
    type Response = Response<Headless<B>>;
    type Error = S::Error;
    type Future = HeadSafeFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let head = req.method() == http::Method::HEAD && !self.keep_bodies;
        HeadSafeFuture {
            inner: self.inner.call(req),
            head,
        }
    }
}

pin_project_lite::pin_project! {
    /// The answer of a [`HeadSafe`] service.
    struct HeadSafeFuture<F> {
        #[pin]
        inner: F,
        head: bool,
    }
}

impl<F, B, E> Future for HeadSafeFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<Headless<B>>, E>;

    fn poll(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Self::Output> {
        let this = self.project();
        let head = *this.head;
        this.inner.poll(cx).map(|answer| {
            answer.map(|resp| {
                resp.map(|body| Headless {
                    body,
                    dropped: head,
                })
            })
        })
    }
}

type TlsIo = tokio_rustls::server::TlsStream<TcpStream>;

/// Runs the handshake; returns the stream and, with a verified client certificate, its DNS
/// names (SAN; the CN does not count).
async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
) -> Option<(TlsIo, Option<Arc<[String]>>)> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => {
            let names = s
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|chain| chain.first())
                .and_then(|cert| webpki::EndEntityCert::try_from(cert).ok())
                .map(|cert| {
                    cert.valid_dns_names()
                        .map(str::to_owned)
                        .collect::<Vec<_>>()
                        .into()
                });
            Some((s, names))
        }
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[cfg(any(target_os = "linux", target_os = "android"))]
    fn a_group_shares_one_port_and_every_socket_accepts() {
        let group = bind_group("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        assert_eq!(group.len(), 3);
        let port = group[0].local_addr().unwrap().port();
        assert!(group.iter().all(|s| s.local_addr().unwrap().port() == port));
        // The kernel spreads connections by their address hash: with enough of them, each
        // socket gets some (a bounded number of tries).
        let mut seen = [false; 3];
        let mut clients = Vec::new();
        for _ in 0..200 {
            clients.push(std::net::TcpStream::connect(("127.0.0.1", port)).unwrap());
            for (i, s) in group.iter().enumerate() {
                if s.accept().is_ok() {
                    seen[i] = true;
                }
            }
            if seen.iter().all(|&s| s) {
                break;
            }
        }
        assert_eq!(
            seen, [true; 3],
            "a socket of the group never got a connection"
        );
    }

    #[test]
    fn a_port_in_use_is_refused_even_by_a_group_like_ours() {
        let plain = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let err = bind_group(plain.local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        // A second cx-proxy on the same port would share it silently through
        // SO_REUSEPORT; it is refused as a plain bind is.
        let ours = bind_group("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let err = bind_group(ours[0].local_addr().unwrap(), 2).unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        // Two starting at the same moment: the port's lock refuses the second even before
        // either has bound its group.
        #[cfg(target_os = "linux")]
        {
            let free = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            let addr = free.local_addr().unwrap();
            drop(free);
            let _first = port_lock(addr).unwrap();
            let err = bind_group(addr, 2).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        }
    }
}
