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
use tokio::sync::oneshot;
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

/// Serves the proxy on `listener` until `shutdown` resolves.
pub async fn serve_proxy(
    proxy: Arc<Proxy>,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), StartupError> {
    let tls = match &proxy.config().server.tls {
        Some(files) => Some(TlsAcceptor::from(crate::tls::server_config_from_files(
            files,
        )?)),
        None => None,
    };
    let grace = proxy.config().server.shutdown_grace;
    let make = move |peer: SocketAddr| {
        let proxy = proxy.clone();
        hyper::service::service_fn(move |req| {
            let proxy = proxy.clone();
            async move { Ok::<_, Infallible>(proxy.handle(peer, req).await) }
        })
    };
    serve::<_, _, Body>(listener, tls, make, shutdown, grace).await;
    Ok(())
}

/// A proxy running on a background task (tests, `demo`).
#[derive(Debug)]
pub struct ProxyHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// The shared state (its config, its caches).
    pub proxy: Arc<Proxy>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), StartupError>>,
}

impl ProxyHandle {
    /// Binds `config.server.listen` (port 0 picks a free one) and starts serving.
    pub async fn start(config: Config) -> Result<Self, StartupError> {
        let proxy = Proxy::new(config)?;
        Self::start_with(proxy).await
    }

    /// Starts serving an already-built proxy.
    pub async fn start_with(proxy: Arc<Proxy>) -> Result<Self, StartupError> {
        let listen = proxy.config().server.listen;
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartupError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: listen,
            source,
        })?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(serve_proxy(proxy.clone(), listener, async {
            let _ = stopped.await;
        }));
        Ok(ProxyHandle {
            addr,
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
