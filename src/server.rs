//! Accept loops: one task per connection, HTTP/1.1 and HTTP/2 (h2c or ALPN), optional TLS,
//! graceful shutdown.
//!
//! [`serve`] is generic over the service so the proxy and the sandbox share it. It takes a
//! pre-bound listener (tests bind `127.0.0.1:0`) and a shutdown future; on shutdown it stops
//! accepting, lets in-flight requests finish for up to `grace`, then returns.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_rustls::TlsAcceptor;

use crate::body::Body;
use crate::config::Config;
use crate::error::StartupError;
use crate::proxy::Proxy;
use crate::BoxError;

/// Longest a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest a client may take to send a request head.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// First and largest pause after a failed `accept` (e.g. out of file descriptors).
const ACCEPT_BACKOFF: (Duration, Duration) = (Duration::from_millis(10), Duration::from_secs(1));

/// Serves `listener` until `shutdown` resolves, then drains for up to `grace`.
pub async fn serve<M, S, B>(
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    make_service: M,
    shutdown: impl Future<Output = ()>,
    grace: Duration,
) where
    M: Fn(SocketAddr) -> S,
    S: Service<Request<Incoming>, Response = Response<B>, Error = Infallible> + Send + 'static,
    S::Future: Send + 'static,
    B: http_body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<BoxError>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_READ_TIMEOUT)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let builder = Arc::new(builder);
    let graceful = GracefulShutdown::new();
    let mut backoff = ACCEPT_BACKOFF.0;
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
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
        let service = make_service(peer);
        let watcher = graceful.watcher();
        let builder = builder.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            let result = match tls {
                None => {
                    watcher
                        .watch(
                            builder
                                .serve_connection(TokioIo::new(stream), service)
                                .into_owned(),
                        )
                        .await
                }
                Some(acceptor) => match handshake(acceptor, stream).await {
                    Some(io) => {
                        watcher
                            .watch(
                                builder
                                    .serve_connection(TokioIo::new(io), service)
                                    .into_owned(),
                            )
                            .await
                    }
                    None => return,
                },
            };
            if let Err(e) = result {
                tracing::debug!(peer = %peer, error = %e, "connection ended with an error");
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

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
        Ok(Ok(s)) => Some(s),
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

/// Runs the proxy (and its admin listener and token refreshers) until `shutdown` resolves,
/// then drains in-flight requests for up to `server.shutdown_grace_s`.
pub async fn run(
    proxy: Arc<Proxy>,
    listeners: Listeners,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), StartupError> {
    let tls = match &proxy.config().server.tls {
        Some(files) => Some(TlsAcceptor::from(crate::tls::server_config_from_files(
            files,
        )?)),
        None => None,
    };
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
    proxy.tokens().start();
    let grace = proxy.config().server.shutdown_grace;
    let admin = listeners.admin.map(|listener| {
        let p = proxy.clone();
        let make = move |peer: SocketAddr| {
            let p = p.clone();
            hyper::service::service_fn(move |req| {
                let p = p.clone();
                async move { Ok::<_, Infallible>(crate::admin::handle(&p, peer, req).await) }
            })
        };
        tokio::spawn(serve::<_, _, Body>(listener, None, make, stopped(), grace))
    });
    let p = proxy.clone();
    let make = move |peer: SocketAddr| {
        let p = p.clone();
        hyper::service::service_fn(move |req| {
            let p = p.clone();
            async move { Ok::<_, Infallible>(p.handle(peer, req).await) }
        })
    };
    serve::<_, _, Body>(listeners.proxy, tls, make, stopped(), grace).await;
    if let Some(admin) = admin {
        let _ = admin.await;
    }
    proxy.tokens().stop();
    Ok(())
}

/// A proxy running on a background task (tests, `demo`).
#[derive(Debug)]
pub struct ProxyHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where the admin endpoints listen, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// The shared state (its config, its caches).
    pub proxy: Arc<Proxy>,
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
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(proxy.clone(), listeners, async {
            let _ = stopped.await;
        }));
        Ok(ProxyHandle {
            addr,
            admin_addr,
            proxy,
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
