//! The callback relay (SPEC section 8): the platform's signed callbacks taken at the edge,
//! checked, committed to a durable queue, then handed to internal receivers one at a time
//! in arrival order, at least once.
//!
//! - [`verify`]: the four query parameters, the signature, `corpid`, `timestamp`;
//! - [`queue`]: the SQLite file, its thread, nonces and dead letters;
//! - [`deliver`]: one task per route, its HTTP client and backoff.
//!
//! A [`Relay`] lives as long as the process: a reload swaps its routes and settings
//! ([`Relay::apply`]) but never its queue, so nothing queued is lost to a reload, and a
//! route that is removed keeps its events on disk until it returns.

pub mod deliver;
pub mod queue;
pub mod verify;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Limited};
use hyper::body::Incoming;
use tokio::sync::Notify;

use crate::auth::store::TokenStore;
use crate::config::{CallbackRoute, CallbacksConfig};
use crate::error::{ErrorKind, ProxyError};
use crate::metrics::CallbackMetrics;
use crate::server::Peer;
use crate::upstream::Body;
use queue::{NewEvent, Queue, Stored};
use verify::Signed;

/// Longest a sender may take to send a callback's body once its head arrived.
pub const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What the relay runs on: the `[callbacks]` table and the routes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// `[callbacks]`.
    pub table: CallbacksConfig,
    /// `[[callback]]`.
    pub routes: Vec<CallbackRoute>,
}

/// The relay: settings in force, the queue, one delivery task per route.
#[derive(Debug)]
pub struct Relay {
    settings: ArcSwap<Settings>,
    queue: Queue,
    metrics: CallbackMetrics,
    /// Per route name: wakes its delivery task (new event, redeliver, reload, stop).
    wakes: Mutex<HashMap<String, Arc<Notify>>>,
    stopped: std::sync::atomic::AtomicBool,
}

impl Relay {
    /// Opens the queue (see [`Queue::open`]); no task runs until [`Relay::start`].
    pub fn new(settings: Settings) -> Arc<Self> {
        let queue = Queue::open(&settings.table.queue);
        Arc::new(Relay {
            settings: ArcSwap::from_pointee(settings),
            queue,
            metrics: CallbackMetrics::new(),
            wakes: Mutex::new(HashMap::new()),
            stopped: std::sync::atomic::AtomicBool::new(false),
        })
    }

    /// The settings in force.
    pub fn settings(&self) -> Arc<Settings> {
        self.settings.load_full()
    }

    /// The queue.
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// The relay's metrics.
    pub fn metrics(&self) -> &CallbackMetrics {
        &self.metrics
    }

    /// Starts a delivery task for every route that has none, and warns about events in the
    /// queue that no route names (a route renamed or removed: they wait for it to return).
    pub fn start(self: &Arc<Self>) {
        let settings = self.settings();
        let relay = Arc::downgrade(self);
        tokio::spawn(async move {
            let Some(relay) = relay.upgrade() else { return };
            for (name, n) in relay.unrouted().await {
                tracing::warn!(
                    route = %name,
                    events = n,
                    "callback queue holds events of a route no [[callback]] names; they are kept until it returns"
                );
            }
        });
        let mut wakes = self.wakes.lock().unwrap_or_else(PoisonError::into_inner);
        for route in &settings.routes {
            if !wakes.contains_key(&route.name) {
                let wake = Arc::new(Notify::new());
                wakes.insert(route.name.clone(), wake.clone());
                tokio::spawn(deliver::run(Arc::downgrade(self), route.name.clone(), wake));
            }
        }
    }

    /// Applies reloaded settings: new routes get a task, removed ones end theirs (their
    /// events stay on disk), changed ones deliver with the new settings from the next attempt.
    /// The queue file and the listener's address stay those of startup.
    pub fn apply(self: &Arc<Self>, settings: Settings) {
        self.settings.store(Arc::new(settings));
        let settings = self.settings();
        let mut wakes = self.wakes.lock().unwrap_or_else(PoisonError::into_inner);
        wakes.retain(|name, wake| {
            let kept = settings.routes.iter().any(|r| &r.name == name);
            if !kept {
                wake.notify_one();
            }
            kept
        });
        drop(wakes);
        self.start();
    }

    /// Ends every delivery task (after its attempt in flight).
    pub fn stop(&self) {
        self.stopped
            .store(true, std::sync::atomic::Ordering::SeqCst);
        for wake in self
            .wakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
        {
            wake.notify_one();
        }
    }

    /// Whether `wake` is still the delivery task of `route` (a route removed and added back
    /// gets a new task; the old one must end rather than deliver beside it).
    fn owns(&self, route: &str, wake: &Arc<Notify>) -> bool {
        self.wakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
            .is_some_and(|w| Arc::ptr_eq(w, wake))
    }

    fn stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn wake(&self, route: &str) {
        if let Some(w) = self
            .wakes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(route)
        {
            w.notify_one();
        }
    }

    /// Answers one request on the callback listener (SPEC section 8, steps 1 to 3). With
    /// `store` (`[token.store]`), nonces are shared with the other instances.
    pub async fn handle(
        &self,
        peer: &Peer,
        req: Request<Incoming>,
        store: Option<&TokenStore>,
    ) -> Response<Body> {
        let settings = self.settings();
        let route = settings.routes.iter().find(|r| r.path == req.uri().path());
        let name = route.map_or("-", |r| r.name.as_str());
        let (result, reason, resp) = match self.accept(&settings, route, peer, req, store).await {
            Ok(Stored::New(id)) => ("accepted", "", ok(&id)),
            Ok(Stored::Repeat(id)) => ("repeat", "", ok(&id)),
            Ok(Stored::Replay) => {
                let r = verify::Rejection::Nonce;
                let e = ProxyError::new(ErrorKind::CallbackRejected, r.message());
                ("rejected", r.as_str(), e.into_response())
            }
            Err(Refused::Rejected(r)) => {
                let e = ProxyError::new(ErrorKind::CallbackRejected, r.message());
                ("rejected", r.as_str(), e.into_response())
            }
            Err(Refused::Unavailable(e)) => ("unavailable", "", e.into_response()),
            Err(Refused::Input(e)) => ("refused", e.kind.name(), e.into_response()),
        };
        self.metrics.received(name, result, reason);
        tracing::info!(
            target: "cx_proxy::callback",
            peer = %peer,
            route = name,
            result,
            reason,
            status = resp.status().as_u16(),
            callback_id = resp
                .headers()
                .get("x-cx-callback-id")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("-"),
            "callback"
        );
        if result == "accepted" {
            self.wake(name);
        }
        resp
    }

    async fn accept(
        &self,
        settings: &Settings,
        route: Option<&CallbackRoute>,
        peer: &Peer,
        req: Request<Incoming>,
        store: Option<&TokenStore>,
    ) -> Result<Stored, Refused> {
        let refuse = |kind, msg: &str| Refused::Input(ProxyError::new(kind, msg.to_owned()));
        let table = &settings.table;
        let allowed = peer
            .ip()
            .is_some_and(|ip| table.allow.iter().any(|n| n.contains(&ip)));
        if !allowed {
            return Err(refuse(
                ErrorKind::Forbidden,
                "this address may not send callbacks ([callbacks] allow)",
            ));
        }
        let Some(route) = route else {
            return Err(refuse(ErrorKind::NoRoute, "no [[callback]] has this path"));
        };
        if req.method() != Method::POST {
            return Err(refuse(
                ErrorKind::MethodNotAllowed,
                "callbacks are sent with POST",
            ));
        }
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > table.max_body_bytes) {
            return Err(refuse(
                ErrorKind::PayloadTooLarge,
                "callback body over [callbacks] max_body_bytes",
            ));
        }
        let signed = Signed::from_query(req.uri().query())
            .map_err(|m| Refused::Input(ProxyError::new(ErrorKind::BadRequest, m)))?;
        let query = req.uri().query().unwrap_or("").to_owned();
        let content_type = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let limit = usize::try_from(table.max_body_bytes).unwrap_or(usize::MAX);
        let body = match tokio::time::timeout(
            BODY_TIMEOUT,
            Limited::new(req.into_body(), limit).collect(),
        )
        .await
        {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) if e.is::<http_body_util::LengthLimitError>() => {
                return Err(refuse(
                    ErrorKind::PayloadTooLarge,
                    "callback body over [callbacks] max_body_bytes",
                ))
            }
            Ok(Err(_)) => {
                return Err(refuse(
                    ErrorKind::BadRequest,
                    "the callback body ended early",
                ))
            }
            Err(_) => {
                return Err(refuse(
                    ErrorKind::BadRequest,
                    format!(
                        "the callback body did not arrive within {} s",
                        BODY_TIMEOUT.as_secs()
                    )
                    .as_str(),
                ))
            }
        };
        let members = verify::members(&body)
            .map_err(|m| Refused::Input(ProxyError::new(ErrorKind::BadRequest, m)))?;
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        verify::check(
            &members,
            &signed,
            route.key.expose().as_bytes(),
            &route.corp_id,
            now,
            table.max_skew,
        )
        .map_err(Refused::Rejected)?;
        // Another instance may have kept this callback (a platform retry that landed
        // elsewhere) or seen its nonce with another signature. An unreachable store leaves
        // this instance's own memory of nonces, as the token store falls back to fetching
        // locally.
        if let Some(store) = store {
            if let Ok(Some(seen)) = store.callback_nonce(&route.name, &signed.nonce).await {
                return Ok(if seen.eq_ignore_ascii_case(&signed.signature) {
                    Stored::Repeat(queue::callback_id(
                        &route.name,
                        &signed.nonce,
                        &signed.signature,
                    ))
                } else {
                    Stored::Replay
                });
            }
        }
        let (nonce, signature) = (signed.nonce.clone(), signed.signature.clone());
        let stored = self
            .queue
            .store(NewEvent {
                route: route.name.clone(),
                nonce: signed.nonce,
                signature: signed.signature,
                query,
                content_type,
                body: body.to_vec(),
                remember: table.max_skew * 2,
            })
            .await
            .map_err(|e| {
                tracing::error!(route = %route.name, error = %e, "callback not stored");
                Refused::Unavailable(ProxyError::new(
                    ErrorKind::CallbackUnavailable,
                    "the callback could not be stored durably; it is not acknowledged, send it again",
                ))
            })?;
        if let (Some(store), Stored::New(_)) = (store, &stored) {
            // Remembered only once committed: a callback this instance failed to keep must
            // not look kept to the instance the platform's retry reaches.
            let window = table.max_skew * 2;
            if let Err(e) = store
                .remember_callback_nonce(&route.name, &nonce, &signature, window)
                .await
            {
                tracing::debug!(error = %e, "callback nonce not shared");
            }
        }
        Ok(stored)
    }

    /// Routes with events in the queue that no `[[callback]]` names now, with their counts.
    async fn unrouted(&self) -> Vec<(String, u64)> {
        let settings = self.settings();
        self.queue
            .routes()
            .await
            .unwrap_or_default()
            .into_iter()
            .filter(|(name, _)| !settings.routes.iter().any(|r| &r.name == name))
            .collect()
    }

    /// `GET /callbacks`: each route's queue (SPEC section 6), and events kept for routes no
    /// longer configured (`unrouted`).
    pub async fn status(&self) -> Result<serde_json::Value, ProxyError> {
        let now = queue::now_ms();
        let mut routes = Vec::new();
        for route in &self.settings().routes {
            let s = self.queue.stats(&route.name).await.map_err(unavailable)?;
            let oldest = s.oldest_pending.map_or(0, |t| (now - t).max(0) / 1000);
            routes.push(serde_json::json!({
                "name": route.name,
                "pending": s.pending,
                "dead": s.dead,
                "oldest_pending_s": oldest,
                "dead_letters": s.dead_letters,
            }));
        }
        let unrouted: Vec<_> = self
            .unrouted()
            .await
            .into_iter()
            .map(|(name, events)| serde_json::json!({"name": name, "events": events}))
            .collect();
        Ok(serde_json::json!({ "routes": routes, "unrouted": unrouted }))
    }

    /// `POST /callbacks/{name}/redeliver`: puts the route's dead letters back in its queue.
    pub async fn redeliver(&self, name: &str) -> Result<usize, ProxyError> {
        if !self.settings().routes.iter().any(|r| r.name == name) {
            let shown: String = name.chars().take(64).collect();
            return Err(ProxyError::new(
                ErrorKind::NoRoute,
                format!("no [[callback]] is named {shown:?}"),
            ));
        }
        let n = self.queue.redeliver(name).await.map_err(unavailable)?;
        self.wake(name);
        Ok(n)
    }

    /// For `/readyz`: whether the queue answers, and each route's depth.
    pub async fn ready(&self) -> (bool, serde_json::Value) {
        match self.status().await {
            Ok(v) => (true, v),
            Err(e) => (false, serde_json::json!({ "error": e.message })),
        }
    }
}

fn unavailable(e: queue::QueueError) -> ProxyError {
    tracing::error!(error = %e, "callback queue");
    ProxyError::new(
        ErrorKind::CallbackUnavailable,
        "the callback queue cannot be read",
    )
}

/// The acknowledgement: `200 {"err_code":0,"err_msg":"success"}` and the event's id.
fn ok(id: &str) -> Response<Body> {
    let mut resp = Response::new(Body::full(Bytes::from(crate::wire::error_body(
        0, "success",
    ))));
    *resp.status_mut() = StatusCode::OK;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    if let Ok(v) = HeaderValue::from_str(id) {
        resp.headers_mut().insert("x-cx-callback-id", v);
    }
    resp
}

/// Why a callback was not acknowledged.
enum Refused {
    /// It failed verification (401).
    Rejected(verify::Rejection),
    /// It could not be stored (503).
    Unavailable(ProxyError),
    /// Bad input: address, path, method, size, shape (SPEC section 8.1).
    Input(ProxyError),
}
