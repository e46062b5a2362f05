//! The admin listener (SPEC section 6), on its own address:
//!
//! | endpoint | answers |
//! | --- | --- |
//! | `GET /healthz` | 200 while serving |
//! | `GET /readyz` | 200 when every app holds a usable token, else 503 naming the app and why |
//! | `GET /metrics` | Prometheus text |
//! | `POST /tokens/{app}/refresh` | fetches a new token now; answers its expiry, never the token |
//!
//! It obeys `server.allow` like the proxy port: forcing refreshes spends the platform quota.

use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Method, Request, Response, StatusCode};
use hyper::body::Incoming;
use serde_json::json;

use crate::error::{ErrorKind, ProxyError};
use crate::proxy::Proxy;
use crate::server::Peer;
use crate::upstream::Body;

fn json(status: StatusCode, v: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::full(v.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

/// Answers one admin request.
pub async fn handle(proxy: &Proxy, peer: &Peer, req: Request<Incoming>) -> Response<Body> {
    if let Err(e) = proxy.allowed(peer) {
        return e.into_response();
    }
    let path = req.uri().path();
    match (req.method(), path) {
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
            let store = proxy.tokens().store_up().map(|up| {
                json!({"up": up, "detail": if up { "sharing tokens with other instances" } else { "unreachable: fetching tokens locally" }})
            });
            json(
                status,
                &json!({"ready": ready, "apps": apps, "token_store": store}),
            )
        }
        (&Method::GET, "/metrics") => {
            // Refreshes the seconds-left gauges.
            proxy.tokens().status().await;
            let mut resp = Response::new(Body::full(proxy.metrics().render()));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
            );
            resp
        }
        (&Method::POST, p) if p.starts_with("/tokens/") && p.ends_with("/refresh") => {
            let name = &p["/tokens/".len()..p.len() - "/refresh".len()];
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
        _ => json(
            StatusCode::NOT_FOUND,
            &json!({"err_code": ErrorKind::NoRoute.code(), "err_msg": "admin endpoints: /healthz /readyz /metrics POST /tokens/{app}/refresh"}),
        ),
    }
}
