//! The admin listener (SPEC section 6), on its own address:
//!
//! | endpoint | answers |
//! | --- | --- |
//! | `GET /healthz` | 200 while serving |
//! | `GET /readyz` | 200 when every app holds a usable token, else 503 naming the app and why |
//! | `GET /metrics` | Prometheus text |
//! | `POST /tokens/{app}/refresh` | fetches a new token now; answers its expiry, never the token |
//! | `GET /callbacks` | each callback route's queue: pending, dead letters, oldest age |
//! | `POST /callbacks/{name}/redeliver` | puts the route's dead letters back in its queue |
//! | `POST /reload` | reads the config file again, as `SIGHUP` does; 200, or 422 with the problems |
//!
//! It obeys its own `admin.allow` (loopback by default), not `server.allow`: forcing
//! refreshes spends the platform quota, and a remote Prometheus need not be allowed to
//! proxy calls.

use std::future::Future;
use std::pin::Pin;

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::error::{ErrorKind, ProxyError};
use crate::proxy::Proxy;
use crate::relay::Relay;
use crate::server::Peer;
use crate::upstream::Body;

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// The `{name}` of `{prefix}{name}{suffix}`, if `path` is that with a non-empty name
/// (`/callbacks/redeliver` is not: prefix and suffix would overlap).
fn named<'p>(path: &'p str, prefix: &str, suffix: &str) -> Option<&'p str> {
    path.strip_prefix(prefix)?
        .strip_suffix(suffix)
        .filter(|n| !n.is_empty())
}

/// What `POST /reload` runs: the gateway's reload (as SIGHUP), which lives above this
/// module; `Err` holds the problems as `file: key: what is wrong`.
pub trait Reloader: Send + Sync {
    /// Reads the config file again and applies it.
    fn reload(&self) -> Pin<Box<dyn Future<Output = Result<(), Vec<String>>> + Send + '_>>;
}

/// Answers one admin request.
pub async fn handle(
    proxy: &Proxy,
    relay: Option<&Relay>,
    reloader: &dyn Reloader,
    peer: &Peer,
    req: Request<Incoming>,
) -> Response<Body> {
    let allowed = proxy.config().admin.as_ref().is_some_and(|a| {
        peer.ip()
            .is_some_and(|ip| a.allow.iter().any(|net| net.contains(&ip)))
    });
    if !allowed {
        let who = peer.ip().map_or("unknown".into(), |ip| ip.to_string());
        tracing::info!(peer = %who, path = req.uri().path(), "admin request refused: not in admin.allow");
        return ProxyError::new(
            ErrorKind::Forbidden,
            format!("client address {who} is not in admin.allow"),
        )
        .into_response();
    }
    let path = req.uri().path();
    // HEAD is answered as GET (RFC 9110 section 9.3.2); server::serve leaves the body out.
    let method = match req.method() {
        &Method::HEAD => &Method::GET,
        m => m,
    };
    match (method, path) {
        (&Method::GET, "/healthz") => json(StatusCode::OK, &json!({"status": "ok"})),
        (&Method::GET, "/readyz") => {
            let apps = proxy.tokens().status().await;
            let ready = apps.iter().all(|a| a.ready);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            // A store that is down does not make the proxy unready (it fetches locally), but
            // the operator sees it.
            let last_error = proxy.tokens().store().and_then(|s| s.last_error());
            let store = proxy.tokens().store_state().map(|state| {
                use crate::auth::store::StoreState;
                let detail = match state {
                    StoreState::Up => "sharing tokens and call limits with other instances",
                    StoreState::RefusingWrites => {
                        "degraded: it refuses writes, so tokens fetched here are not shared and \
                         call limits are counted per instance"
                    }
                    StoreState::Down => {
                        "unreachable: fetching tokens and counting call limits per instance"
                    }
                };
                let mut v =
                    json!({"up": state == StoreState::Up, "state": state.name(), "detail": detail});
                if state != StoreState::Up {
                    v["error"] = json!(last_error);
                }
                v
            });
            // The callback queue, when the relay runs: unreadable makes the gateway unready
            // (callbacks would get 503).
            let (queue_ok, callbacks) = match relay {
                Some(r) => {
                    let (ok, detail) = r.ready().await;
                    (ok, Some(detail))
                }
                None => (true, None),
            };
            let ready = ready && queue_ok;
            let status = if ready {
                status
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json(
                status,
                &json!({"ready": ready, "apps": apps, "token_store": store, "callbacks": callbacks}),
            )
        }
        (&Method::GET, "/metrics") => {
            // Refreshes the seconds-left gauges.
            proxy.tokens().status().await;
            proxy.refresh_limit_gauges();
            let mut text = proxy.metrics().render();
            if let Some(r) = relay {
                text.push_str(&r.metrics().render());
            }
            let mut resp = Response::new(Body::full(text));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::POST, p) if named(p, "/tokens/", "/refresh").is_some() => {
            let name = named(p, "/tokens/", "/refresh").unwrap_or_default();
            let Some(idx) = proxy.tokens().index_of(name) else {
                let shown: String = name.chars().take(64).collect();
                return ProxyError::new(ErrorKind::NoRoute, format!("no app is named {shown:?}"))
                    .into_response();
            };
            match proxy.tokens().force_refresh(idx).await {
                Ok(token) => json(
                    StatusCode::OK,
                    &json!({"app": name, "expires_in": token.lifetime.as_secs()}),
                ),
                Err(e) => ProxyError::from(&e).into_response(),
            }
        }
        // The same reload as SIGHUP (SPEC section 3), for platforms without signals.
        (&Method::POST, "/reload") => match reloader.reload().await {
            Ok(()) => {
                tracing::info!("POST /reload: configuration reloaded");
                let file = proxy.config().source.clone();
                json(StatusCode::OK, &json!({"reloaded": true, "file": file}))
            }
            Err(problems) => {
                for p in &problems {
                    tracing::error!("{p}");
                }
                tracing::error!(
                    "POST /reload: configuration refused; the running one stays in force"
                );
                json(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    &json!({"reloaded": false, "problems": problems}),
                )
            }
        },
        (&Method::GET, "/status") => {
            let tokens = proxy.tokens().status().await;
            let apps: Vec<crate::status::AppView> = tokens
                .into_iter()
                .enumerate()
                .map(|(i, t)| crate::status::AppView {
                    series: proxy.metrics().traffic().series(i),
                    name: t.app,
                    ready: t.ready,
                    seconds_left: t.seconds_left,
                    last_error: t.reason,
                })
                .collect();
            let queues = match relay {
                Some(r) => Some(queue_views(r).await),
                None => None,
            };
            let version = concat!(
                env!("CARGO_PKG_VERSION"),
                " (commit ",
                env!("CX_BUILD_COMMIT"),
                ")"
            );
            let extras = crate::status::Extras {
                platform_errors: proxy.metrics().platform_error_counts(),
                limits: proxy.metrics().window_use(),
            };
            let mut resp = Response::new(Body::full(crate::status::page(
                version,
                &apps,
                &extras,
                queues.as_deref(),
            )));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/html; charset=utf-8"),
            );
            // Nothing on the page may be loaded from elsewhere or run as script.
            resp.headers_mut().insert(
                http::header::CONTENT_SECURITY_POLICY,
                HeaderValue::from_static(
                    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self'",
                ),
            );
            resp
        }
        (&Method::GET, "/callbacks") => match relay {
            Some(r) => match r.status().await {
                Ok(v) => json(StatusCode::OK, &v),
                Err(e) => e.into_response(),
            },
            None => json(StatusCode::OK, &json!({"routes": []})),
        },
        (&Method::POST, p) if named(p, "/callbacks/", "/redeliver").is_some() => {
            let name = named(p, "/callbacks/", "/redeliver").unwrap_or_default();
            let result = match relay {
                Some(r) => r.redeliver(name).await,
                None => Err(ProxyError::new(
                    ErrorKind::NoRoute,
                    "no callback relay is configured",
                )),
            };
            match result {
                Ok(n) => json(StatusCode::OK, &json!({"route": name, "requeued": n})),
                Err(e) => e.into_response(),
            }
        }
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"err_code": ErrorKind::NoRoute.code(), "err_msg": "admin endpoints: /healthz /readyz /metrics /status /callbacks POST /tokens/{app}/refresh POST /callbacks/{name}/redeliver POST /reload"}),
        ),
    }
}

/// Each callback route's queue, from the relay's status (`GET /callbacks`).
async fn queue_views(relay: &Relay) -> Vec<crate::status::QueueView> {
    let Ok(v) = relay.status().await else {
        return Vec::new();
    };
    v["routes"]
        .as_array()
        .map(|routes| {
            routes
                .iter()
                .map(|r| crate::status::QueueView {
                    route: r["name"].as_str().unwrap_or("-").to_owned(),
                    pending: r["pending"].as_u64().unwrap_or(0),
                    dead: r["dead"].as_u64().unwrap_or(0),
                    oldest_pending_s: r["oldest_pending_s"].as_u64().unwrap_or(0),
                })
                .collect()
        })
        .unwrap_or_default()
}
