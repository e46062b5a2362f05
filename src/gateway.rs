//! The running gateway: the configuration in force (what SIGHUP replaces), the listeners it
//! is served on (the proxy port and the admin port, each through [`crate::server::serve`]),
//! and [`ProxyHandle`], a whole proxy on a background task (tests, `demo`).
//!
//! Every request loads the current [`Proxy`] from an `ArcSwap` (no lock), so a reload applies
//! to every request that starts after it, on old connections too, while in-flight requests
//! finish on the state they started with. Unchanged apps keep their cached tokens, their
//! fetch gate and their fetch-cap window (see [`Proxy::reloaded`]). The listening addresses,
//! and whether the proxy port speaks TLS, are fixed at startup.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::Service;
use rustls::ServerConfig;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch, Semaphore};
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::error::{ErrorKind, ProxyError, StartupError};
use crate::proxy::Proxy;
use crate::relay::{Relay, Settings};
use crate::server::{serve, Peer, Serving};
use crate::upstream::Body;

/// The swappable state shared by every connection.
#[derive(Debug)]
pub struct Gateway {
    current: ArcSwap<Proxy>,
    /// The proxy port's TLS config, replaced on reload (new handshakes use the new one).
    tls: Option<Arc<ArcSwap<ServerConfig>>>,
    /// The file SIGHUP reads again.
    config_path: Option<PathBuf>,
    /// The callback relay, when `[callbacks]` is configured; it outlives reloads.
    relay: Option<Arc<Relay>>,
    /// The callback port's TLS config, replaced on reload.
    callbacks_tls: Option<Arc<ArcSwap<ServerConfig>>>,
}

/// The relay's settings in `config`, if it has `[callbacks]`.
fn relay_settings(config: &Config) -> Option<Settings> {
    config.callbacks.as_ref().map(|table| Settings {
        table: table.clone(),
        routes: config.routes.clone(),
    })
}

impl Gateway {
    /// Wraps a built proxy; loads its TLS material if configured.
    pub fn new(proxy: Arc<Proxy>, config_path: Option<PathBuf>) -> Result<Arc<Self>, StartupError> {
        let tls = match &proxy.config().server.tls {
            Some(files) => Some(Arc::new(ArcSwap::new(
                crate::tls::server_config_from_files(files)?,
            ))),
            None => None,
        };
        let callbacks_tls = match proxy
            .config()
            .callbacks
            .as_ref()
            .and_then(|c| c.tls.as_ref())
        {
            Some(files) => Some(Arc::new(ArcSwap::new(
                crate::tls::server_config_from_files(files)?,
            ))),
            None => None,
        };
        let relay = relay_settings(proxy.config()).map(Relay::new);
        Ok(Arc::new(Gateway {
            current: ArcSwap::new(proxy),
            tls,
            config_path,
            relay,
            callbacks_tls,
        }))
    }

    /// The proxy in force now.
    pub fn proxy(&self) -> Arc<Proxy> {
        self.current.load_full()
    }

    /// The callback relay, if configured.
    pub fn relay(&self) -> Option<&Arc<Relay>> {
        self.relay.as_ref()
    }

    /// The TLS config source of the proxy port, if it speaks TLS.
    pub fn tls(&self) -> Option<Arc<ArcSwap<ServerConfig>>> {
        self.tls.clone()
    }

    /// Reads the config file again and applies it; on any problem the running config stays
    /// and the problems are returned (`file: key: what is wrong`).
    pub async fn reload(&self) -> Result<(), Vec<String>> {
        let Some(path) = &self.config_path else {
            return Err(vec!["no config file to reload".into()]);
        };
        let loaded = Config::load(path).map_err(|e| e.problems)?;
        for w in &loaded.warnings {
            tracing::warn!("{w}");
        }
        self.apply(loaded.config).await
    }

    /// Applies a new configuration (see [`Gateway::reload`]).
    pub async fn apply(&self, config: Config) -> Result<(), Vec<String>> {
        let old = self.proxy();
        let file = config.source.clone();
        let tls = reload_tls(
            &file,
            "server",
            self.tls.is_some(),
            config.server.tls.as_ref(),
        )?;
        if config.server.listen != old.config().server.listen {
            tracing::warn!("{file}: server.listen: a new address needs a restart; still listening on the old one");
        }
        if config.server.worker_threads() != old.config().server.worker_threads() {
            tracing::warn!(
                "{file}: server.workers: another number of workers needs a restart; still {}",
                old.config().server.worker_threads()
            );
        }
        if config.admin.as_ref().map(|a| a.listen) != old.config().admin.as_ref().map(|a| a.listen)
        {
            tracing::warn!("{file}: admin.listen: a new admin address needs a restart");
        }
        let callbacks_tls = match (&self.relay, &config.callbacks) {
            (Some(_), Some(table)) => {
                let was = old.config().callbacks.as_ref();
                if was.map(|w| &w.queue) != Some(&table.queue) {
                    // Taken on the next restart, it would leave the old file's events behind.
                    return Err(vec![format!(
                        "{file}: callbacks.queue: the queue file cannot change on reload (its \
                         events would be left behind); move the file and restart"
                    )]);
                }
                if was.map(|w| w.listen) != Some(table.listen) {
                    tracing::warn!("{file}: callbacks.listen: a new address needs a restart; still listening on the old one");
                }
                reload_tls(
                    &file,
                    "callbacks",
                    self.callbacks_tls.is_some(),
                    table.tls.as_ref(),
                )?
            }
            (None, None) => None,
            _ => {
                return Err(vec![format!(
                    "{file}: callbacks: adding or removing the callback relay needs a restart"
                )])
            }
        };
        let new = Proxy::reloaded(config, &old)
            .await
            .map_err(|e| vec![format!("{file}: {e}")])?;
        new.tokens().start();
        self.current.store(new);
        if let (Some(slot), Some(cfg)) = (&self.tls, tls) {
            slot.store(cfg);
        }
        if let (Some(slot), Some(cfg)) = (&self.callbacks_tls, callbacks_tls) {
            slot.store(cfg);
        }
        if let (Some(relay), Some(settings)) = (&self.relay, relay_settings(self.proxy().config()))
        {
            relay.apply(settings);
        }
        old.tokens().stop();
        Ok(())
    }
}

/// Callbacks being received at once on the callback listener; more get 503 `overloaded`.
pub const CALLBACKS_IN_FLIGHT: usize = 512;

/// A listener's TLS config read anew for a reload: TLS stays on or off as at startup
/// (`serving`); `None` when off. `Err` is `file: {table}.tls_cert: problem`.
fn reload_tls(
    file: &str,
    table: &str,
    serving: bool,
    files: Option<&crate::config::TlsFiles>,
) -> Result<Option<Arc<ServerConfig>>, Vec<String>> {
    match (serving, files) {
        (true, Some(files)) => crate::tls::server_config_from_files(files)
            .map(Some)
            .map_err(|e| vec![format!("{file}: {table}.tls_cert: {e}")]),
        (false, None) => Ok(None),
        _ => Err(vec![format!(
            "{file}: {table}.tls_cert: switching TLS on or off needs a restart"
        )]),
    }
}

impl crate::admin::Reloader for Gateway {
    fn reload(
        &self,
    ) -> std::pin::Pin<Box<dyn Future<Output = Result<(), Vec<String>>> + Send + '_>> {
        Box::pin(Gateway::reload(self))
    }
}

/// What a listener serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The proxy port, where legacy apps connect (`[server]`).
    Proxy,
    /// The admin endpoints (`[admin]`).
    Admin,
    /// The platform's callbacks (`[callbacks]`).
    Callbacks,
}

impl Role {
    /// Its name in logs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Proxy => "listen",
            Role::Admin => "admin",
            Role::Callbacks => "callbacks",
        }
    }
}

/// The bound sockets of a gateway, one per configured role, the proxy port first; or, served
/// per core, the proxy port's group of sockets, one per worker thread.
#[derive(Debug)]
pub struct Listeners {
    bound: Vec<(Role, TcpListener)>,
    /// The proxy port's sockets when each worker thread serves its own (see
    /// [`Listeners::bind_per_core`]); empty when the proxy port is in `bound`.
    per_core: Vec<std::net::TcpListener>,
}

impl Listeners {
    /// Binds every configured listener (port 0 picks a free port); all are served on the
    /// runtime that calls [`run`] (tests, `demo`).
    pub async fn bind(config: &Config) -> Result<Self, StartupError> {
        let mut bound = Vec::with_capacity(3);
        let addr = config.server.listen;
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| StartupError::Bind { addr, source })?;
        bound.push((Role::Proxy, listener));
        bound.extend(Self::bind_others(config).await?);
        Ok(Listeners {
            bound,
            per_core: Vec::new(),
        })
    }

    /// Binds the proxy port once per serving worker (`server.workers`, see
    /// [`crate::server::bind_group`]) and the other listeners once; [`run`] serves each of
    /// the proxy port's sockets on a thread of its own with a single-threaded runtime (nginx's
    /// worker model), and the rest on the calling runtime.
    pub async fn bind_per_core(config: &Config) -> Result<Self, StartupError> {
        if let Some(warning) = crate::server::raise_open_files_limit(config.open_files_needed()) {
            tracing::warn!("{warning}");
        }
        let addr = config.server.listen;
        let per_core = crate::server::bind_group(addr, config.server.worker_threads())
            .map_err(|source| StartupError::Bind { addr, source })?;
        Ok(Listeners {
            bound: Self::bind_others(config).await?,
            per_core,
        })
    }

    /// The admin and callback listeners, when configured.
    async fn bind_others(config: &Config) -> Result<Vec<(Role, TcpListener)>, StartupError> {
        let wanted = [
            config.admin.as_ref().map(|a| (Role::Admin, a.listen)),
            config
                .callbacks
                .as_ref()
                .map(|c| (Role::Callbacks, c.listen)),
        ];
        let mut bound = Vec::with_capacity(wanted.len());
        for (role, addr) in wanted.into_iter().flatten() {
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| StartupError::Bind { addr, source })?;
            bound.push((role, listener));
        }
        Ok(bound)
    }

    /// Where the listener of `role` listens, if there is one.
    pub fn addr(&self, role: Role) -> Option<SocketAddr> {
        if role == Role::Proxy {
            if let Some(first) = self.per_core.first() {
                return first.local_addr().ok();
            }
        }
        self.bound
            .iter()
            .find(|(r, _)| *r == role)
            .and_then(|(_, l)| l.local_addr().ok())
    }

    /// How many threads serve the proxy port (0: the runtime that calls [`run`]).
    pub fn workers(&self) -> usize {
        self.per_core.len()
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

/// Makes the proxy port's service for each connection.
fn proxy_service(
    gateway: &Arc<Gateway>,
    limit: &Arc<Semaphore>,
) -> impl Fn(Peer) -> ProxyService + Clone + Send + 'static {
    let (gateway, limit) = (gateway.clone(), limit.clone());
    move |peer: Peer| ProxyService {
        gateway: gateway.clone(),
        peer,
        limit: limit.clone(),
    }
}

/// Counts the requests hyper's parser refused in the metrics of the config in force.
fn refused_counter(gateway: &Arc<Gateway>) -> crate::server::OnRefused {
    let gateway = gateway.clone();
    Arc::new(move |reason| gateway.proxy().metrics().http_refused(reason))
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
    if let Some(relay) = gateway.relay() {
        relay.start();
    }
    let grace = first.config().server.shutdown_grace;
    // Requests in flight at once (`server.max_concurrent_requests`).
    let limit = Arc::new(Semaphore::new(
        first.config().server.max_concurrent_requests,
    ));
    drop(first);

    // The proxy port served per core: a thread and a single-threaded runtime per socket.
    let mut workers = Vec::with_capacity(listeners.per_core.len());
    for (i, socket) in listeners.per_core.into_iter().enumerate() {
        let serving = Serving {
            tls: gateway.tls(),
            grace,
            refused: Some(refused_counter(&gateway)),
            head_bodies: false,
        };
        let make = proxy_service(&gateway, &limit);
        let stop = stopped();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StartupError::Other(format!("cannot start a worker's runtime: {e}")))?;
        // Registered with the worker's runtime here, so a failure stops the start.
        let listener = {
            let _in = runtime.enter();
            TcpListener::from_std(socket).map_err(|e| {
                StartupError::Other(format!("a worker cannot serve its socket: {e}"))
            })?
        };
        let worker = std::thread::Builder::new()
            .name(format!("cx-proxy-worker-{}", i + 1))
            .spawn(move || {
                crate::upstream::set_worker(i + 1);
                runtime.block_on(serve::<_, _, Body>(listener, make, stop, serving));
                // Its last lines go out before the main thread logs the stop.
                crate::logging::flush();
            })
            .map_err(|e| StartupError::Other(format!("cannot start a worker thread: {e}")))?;
        workers.push(worker);
    }
    let workers = tokio::task::spawn_blocking(move || {
        for worker in workers {
            if worker.join().is_err() {
                tracing::error!("a worker thread panicked");
            }
        }
    });

    // One serving task per other listener; each role brings its own service.
    let mut serving = Vec::with_capacity(listeners.bound.len());
    for (role, listener) in listeners.bound {
        let g = gateway.clone();
        let base = Serving {
            tls: None,
            grace,
            refused: Some(refused_counter(&gateway)),
            head_bodies: false,
        };
        serving.push(match role {
            Role::Proxy => {
                let make = proxy_service(&gateway, &limit);
                let tls = gateway.tls();
                let serving = Serving { tls, ..base };
                tokio::spawn(serve::<_, _, Body>(listener, make, stopped(), serving))
            }
            Role::Admin => {
                let make = move |peer: Peer| {
                    let g = g.clone();
                    hyper::service::service_fn(move |req| {
                        let (g, peer) = (g.clone(), peer.clone());
                        async move {
                            let relay = g.relay().map(|r| &**r);
                            Ok::<_, Infallible>(
                                crate::admin::handle(&g.proxy(), relay, &*g, &peer, req).await,
                            )
                        }
                    })
                };
                tokio::spawn(serve::<_, _, Body>(listener, make, stopped(), base))
            }
            Role::Callbacks => {
                let tls = gateway.callbacks_tls.clone();
                // The listener faces the internet: a bounded number of callbacks in flight
                // (each may hold a body of up to max_body_bytes for BODY_TIMEOUT); past it,
                // 503 at once, and the platform tries again.
                let in_flight = Arc::new(Semaphore::new(CALLBACKS_IN_FLIGHT));
                let make = move |peer: Peer| {
                    let (g, in_flight) = (g.clone(), in_flight.clone());
                    hyper::service::service_fn(move |req| {
                        let (g, peer, in_flight) = (g.clone(), peer.clone(), in_flight.clone());
                        async move {
                            let Ok(_permit) = in_flight.try_acquire_owned() else {
                                let e = ProxyError::new(
                                    ErrorKind::Overloaded,
                                    "too many callbacks in flight; send it again shortly",
                                );
                                return Ok::<_, Infallible>(e.into_response());
                            };
                            let resp = match g.relay() {
                                Some(relay) => {
                                    let store = g.proxy().tokens().store();
                                    relay.handle(&peer, req, store.as_deref()).await
                                }
                                None => ProxyError::new(ErrorKind::NoRoute, "no callback relay")
                                    .into_response(),
                            };
                            Ok::<_, Infallible>(resp)
                        }
                    })
                };
                let serving = Serving { tls, ..base };
                tokio::spawn(serve::<_, _, Body>(listener, make, stopped(), serving))
            }
        });
    }
    for task in serving {
        let _ = task.await;
    }
    let _ = workers.await;
    gateway.proxy().tokens().stop();
    if let Some(relay) = gateway.relay() {
        relay.stop();
    }
    Ok(())
}

/// A proxy running on a background task (tests, `demo`).
#[derive(Debug)]
pub struct ProxyHandle {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Where the admin endpoints listen, if configured.
    pub admin_addr: Option<SocketAddr>,
    /// Where the platform's callbacks arrive, if configured.
    pub callbacks_addr: Option<SocketAddr>,
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
        let addr = listeners
            .addr(Role::Proxy)
            .ok_or_else(|| StartupError::Other("the proxy listener has no address".into()))?;
        let admin_addr = listeners.addr(Role::Admin);
        let callbacks_addr = listeners.addr(Role::Callbacks);
        let gateway = Gateway::new(proxy.clone(), None)?;
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(run(gateway.clone(), listeners, async {
            let _ = stopped.await;
        }));
        Ok(ProxyHandle {
            addr,
            admin_addr,
            callbacks_addr,
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
