//! Accept loops: one task per connection, HTTP/1.1 and HTTP/2 (h2c or ALPN), optional TLS and
//! mTLS, limits, graceful shutdown.
//!
//! [`serve`] is generic over the service so the proxy, the admin port and the sandbox share
//! it. It takes a pre-bound listener (tests bind `127.0.0.1:0`) and a shutdown future; on
//! shutdown it stops accepting, lets in-flight requests finish for up to `grace`, then
//! returns. The TLS handshake runs inside the connection's task, under a timeout, so a slow
//! handshake never stalls the accept loop.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
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
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::config::Config;
use crate::error::{ErrorKind, ProxyError, StartupError};
use crate::gateway::Gateway;
use crate::proxy::{Peer, Proxy};
use crate::upstream::Body;
use crate::BoxError;

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

/// Serves `listener` until `shutdown` resolves, then drains for up to `grace`.
/// `make_service` is called once per connection, after any TLS handshake.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    tls: Option<Arc<ArcSwap<ServerConfig>>>,
    make_service: M,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
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
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(MAX_HEAD_BYTES as u32)
        .keep_alive_interval(H2_KEEPALIVE)
        .keep_alive_timeout(H2_KEEPALIVE);
    let builder = Arc::new(builder);
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
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    let service = make_service(Peer::from_addr(addr));
                    serve_io(&builder, watcher, stream, service).await
                }
                Some(acceptor) => {
                    let Some((io, cert_names)) = handshake(acceptor, stream).await else {
                        return;
                    };
                    let service = make_service(Peer {
                        addr: Some(addr),
                        cert_names,
                    });
                    serve_io(&builder, watcher, io, service).await
                }
            };
            if let Err(e) = result {
                tracing::debug!(peer = %addr, error = %e, "connection ended with an error");
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

/// The bound sockets of a proxy.
#[derive(Debug)]
pub struct Listeners {
    /// Where legacy apps connect.
    pub proxy: TcpListener,
    /// The admin endpoints, if configured.
    pub admin: Option<TcpListener>,
}

impl Listeners {
    /// Binds `server.listen` and `admin.listen` (port 0 picks a free port).
    pub async fn bind(config: &Config) -> Result<Self, StartupError> {
        let bind = |addr: SocketAddr| async move {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartupError::Bind { addr, source })
        };
        let proxy = bind(config.server.listen).await?;
        let admin = match &config.admin {
            Some(a) => Some(bind(a.listen).await?),
            None => None,
        };
        Ok(Listeners { proxy, admin })
    }
}

/// The proxy port's service: the request limit, then the proxy in force.
///
/// Written out rather than stacked from tower layers: the stack cloned itself per request,
/// wrapped the call in a oneshot and a load-shed poll_ready, where one `try_acquire` does.
#[derive(Clone)]
struct ProxyService {
    gateway: Arc<Gateway>,
    peer: Peer,
    limit: Arc<Semaphore>,
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<Body>, Infallible>> + Send>>;

impl Service<Request<Incoming>> for ProxyService {
    type Response = Response<Body>;
    type Error = Infallible;
    type Future = ResponseFuture;

    fn call(&self, req: Request<Incoming>) -> ResponseFuture {
        // Load shedding: past the limit a request is answered 503 at once instead of queueing.
        let Ok(permit) = self.limit.clone().try_acquire_owned() else {
            let resp = ProxyError::new(
                ErrorKind::Overloaded,
                "too many requests in flight; retry shortly",
            )
            .into_response();
            return Box::pin(std::future::ready(Ok(resp)));
        };
        let (gateway, peer) = (self.gateway.clone(), self.peer.clone());
        // Boxed once here: the request's future is a few KiB.
        Box::pin(async move {
            let resp = gateway.proxy().handle(&peer, req).await;
            drop(permit);
            Ok(resp)
        })
    }
}

/// Runs the gateway (proxy port, admin port, token refreshers) until `shutdown` resolves,
/// then drains in-flight requests for up to `server.shutdown_grace_s`.
pub async fn run(
    gateway: Arc<Gateway>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = move || {
        let mut rx = stop_rx.clone();
        async move {
            let _ = rx.wait_for(|stop| *stop).await;
        }
    };
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });
    let first = gateway.proxy();
    first.tokens().start();
    let grace = first.config().server.shutdown_grace;
    // Requests in flight at once (`server.max_concurrent_requests`).
    let limit = Arc::new(Semaphore::new(
        first.config().server.max_concurrent_requests,
    ));
    drop(first);

    let admin =
        listeners.admin.map(|listener| {
            let g = gateway.clone();
            let make = move |peer: Peer| {
                let g = g.clone();
                hyper::service::service_fn(move |req| {
                    let (g, peer) = (g.clone(), peer.clone());
                    async move {
                        Ok::<_, Infallible>(crate::admin::handle(&g.proxy(), &peer, req).await)
                    }
                })
            };
            tokio::spawn(serve::<_, _, Body>(listener, None, make, stopped(), grace))
        });

    let g = gateway.clone();
    let make = move |peer: Peer| ProxyService {
        gateway: g.clone(),
        peer,
        limit: limit.clone(),
    };
    serve::<_, _, Body>(listeners.proxy, gateway.tls(), make, stopped(), grace).await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    gateway.proxy().tokens().stop();
    Ok(())
}

/// A proxy running on a background task (tests, `demo`).
#[derive(Debug)]
pub struct ProxyHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where the admin endpoints listen, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// The proxy as started (see [`ProxyHandle::gateway`] for the one in force).
    pub proxy: Arc<Proxy>,
    /// The swappable state.
    pub gateway: Arc<Gateway>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StartupError>>,
}

impl ProxyHandle {
    /// Binds the configured addresses (port 0 picks a free one) and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartupError> {
        let proxy = Proxy::new(config)?;
        Self::start_with(proxy).await
    }

    /// Starts serving an already-built proxy.
    pub async fn start_with(proxy: Arc<Proxy>) -> Result<Self, StartupError> {
        let listeners = Listeners::bind(proxy.config()).await?;
        let local = |l: &TcpListener| {
            l.local_addr()
                .map_err(|e| StartupError::Other(e.to_string()))
        };
        let addr = local(&listeners.proxy)?;
        let admin_addr = listeners.admin.as_ref().map(local).transpose()?;
        let gateway = Gateway::new(proxy.clone(), None)?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(gateway.clone(), listeners, async {
            let _ = stopped.await;
        }));
        Ok(ProxyHandle {
            addr,
            admin_addr,
            proxy,
            gateway,
            stop: Some(stop),
            task,
        })
    }

    /// Stops accepting, drains, and waits for the server to end.
    pub async fn shutdown(mut self) -> Result<(), StartupError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        (&mut self.task)
            .await
            .map_err(|e| StartupError::Other(format!("server task failed: {e}")))?
    }
}
