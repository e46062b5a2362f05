//! Delivery (SPEC section 8.4): one task per route takes the oldest pending event, sends it
//! to `deliver_to` as the original request plus `X-CX-Callback-Id` and `X-CX-Verified: 1`,
//! and only on a 200 lets it go. Anything else is tried again with jittered backoff (1 s
//! doubling up to 5 min) until `retry_for_s` after arrival, then dead-lettered, which
//! unblocks the events behind it.

use std::sync::{Arc, Weak};
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::Full;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::Notify;

use super::queue::{now_ms, Event};
use super::Relay;
use crate::config::CallbackRoute;

/// First and largest pause between attempts of one event.
pub const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(300));
/// How often an idle task looks at the queue anyway (events committed by another route's
/// wake-up race, clock changes).
const IDLE_POLL: Duration = Duration::from_secs(5);

/// A pooled HTTP/1.1 client for `http` and `https` URLs.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// A client for `route`'s receiver: `http`, or `https` verified against the system's roots
/// plus the route's `ca_file`.
fn client(route: &CallbackRoute) -> Result<HttpClient, String> {
    let roots = crate::tls::upstream_roots(route.ca_file.as_deref()).map_err(|e| e.to_string())?;
    http_client(roots)
}

/// A pooled HTTP/1.1 client for `http` URLs and `https` ones verified against `roots` (the
/// relay's receivers; the sandbox's callback sender).
pub fn http_client(roots: rustls::RootCertStore) -> Result<HttpClient, String> {
    let tls = crate::tls::client_config(roots).map_err(|e| e.to_string())?;
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    Ok(Client::builder(TokioExecutor::new()).build(https))
}

/// The pause before attempt `attempts + 1`: `BACKOFF.0` doubled per attempt, capped at
/// `BACKOFF.1`, then a random 50-100 % of it so that receivers coming back are not hit by
/// every route at once.
pub fn backoff(attempts: u32) -> Duration {
    let full = BACKOFF
        .0
        .saturating_mul(1u32 << attempts.min(16))
        .min(BACKOFF.1);
    let mut byte = [0u8; 1];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut byte);
    full / 2 + full / 2 * u32::from(byte[0]) / 255
}

/// Delivers `route`'s events until the route is removed or the relay stops.
pub async fn run(relay: Weak<Relay>, route: String, wake: Arc<Notify>) {
    let mut client_for: Option<(CallbackRoute, HttpClient)> = None;
    loop {
        let Some(r) = relay.upgrade() else { return };
        if r.stopped() || !r.owns(&route, &wake) {
            return;
        }
        let settings = r.settings();
        let Some(cfg) = settings.routes.iter().find(|c| c.name == route).cloned() else {
            return;
        };
        let pause = match r.queue().next(&route).await {
            Err(e) => {
                tracing::warn!(route, error = %e, "callback queue unreadable; delivery waits");
                BACKOFF.0
            }
            Ok(None) => {
                update_gauges(&r, &route).await;
                IDLE_POLL
            }
            Ok(Some(ev)) if ev.next_at > now_ms() => {
                Duration::from_millis(u64::try_from(ev.next_at - now_ms()).unwrap_or(0))
            }
            Ok(Some(ev)) => {
                if client_for.as_ref().is_none_or(|(c, _)| c != &cfg) {
                    match client(&cfg) {
                        Ok(c) => client_for = Some((cfg.clone(), c)),
                        Err(e) => {
                            tracing::error!(route, error = %e, "callback receiver client");
                            client_for = None;
                        }
                    }
                }
                let outcome = match &client_for {
                    Some((_, c)) => attempt(c, &cfg, &ev, settings.table.deliver_timeout).await,
                    None => Err("no client for the receiver (see the log)".into()),
                };
                let recorded = settle(&r, &route, &ev, outcome, settings.table.retry_for).await;
                update_gauges(&r, &route).await;
                // An outcome the queue could not record leaves the event as it was: wait
                // before it is tried again rather than spin on a failing disk.
                if recorded {
                    Duration::ZERO
                } else {
                    BACKOFF.0
                }
            }
        };
        drop(r);
        if !pause.is_zero() {
            let _ = tokio::time::timeout(pause, wake.notified()).await;
        }
    }
}

/// One attempt: `Ok` when the receiver answered 200.
async fn attempt(
    client: &HttpClient,
    route: &CallbackRoute,
    ev: &Event,
    timeout: Duration,
) -> Result<(), String> {
    let uri: Uri = if ev.query.is_empty() {
        route.deliver_to.parse()
    } else {
        format!("{}?{}", route.deliver_to, ev.query).parse()
    }
    .map_err(|e| format!("bad receiver URL: {e}"))?;
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header("x-cx-callback-id", &ev.callback_id)
        .header("x-cx-verified", "1");
    if let Some(ct) = ev
        .content_type
        .as_deref()
        .and_then(|v| HeaderValue::from_str(v).ok())
    {
        req = req.header(CONTENT_TYPE, ct);
    }
    let req = req
        .body(Full::new(Bytes::from(ev.body.clone())))
        .map_err(|e| e.to_string())?;
    match tokio::time::timeout(timeout, client.request(req)).await {
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
        Ok(Err(e)) => Err(format!("receiver unreachable: {e}")),
        Ok(Ok(resp)) if resp.status() == StatusCode::OK => Ok(()),
        Ok(Ok(resp)) => Err(format!("receiver answered {}", resp.status().as_u16())),
    }
}

/// Records an attempt's outcome in the queue and the metrics; false if the queue could not.
async fn settle(
    relay: &Relay,
    route: &str,
    ev: &Event,
    outcome: Result<(), String>,
    retry_for: Duration,
) -> bool {
    let done = match outcome {
        Ok(()) => {
            relay.metrics().delivery(route, "delivered");
            tracing::info!(target: "cx_proxy::callback", route, callback_id = %ev.callback_id, attempts = ev.attempts + 1, "delivered");
            relay.queue().delivered(ev.id).await
        }
        Err(why) => {
            let now = now_ms();
            let deadline = ev
                .since
                .saturating_add(i64::try_from(retry_for.as_millis()).unwrap_or(i64::MAX));
            let dead = now >= deadline;
            let pause = i64::try_from(backoff(ev.attempts).as_millis()).unwrap_or(i64::MAX);
            relay
                .metrics()
                .delivery(route, if dead { "dead_lettered" } else { "failed" });
            tracing::warn!(target: "cx_proxy::callback", route, callback_id = %ev.callback_id, attempts = ev.attempts + 1, dead, error = %why, "delivery failed");
            relay.queue().failed(ev.id, now + pause, why, dead).await
        }
    };
    match done {
        Ok(()) => true,
        Err(e) => {
            // The event stays as it was: delivered again (at least once), or tried again.
            tracing::warn!(route, error = %e, "delivery outcome not recorded");
            false
        }
    }
}

async fn update_gauges(relay: &Relay, route: &str) {
    if let Ok(s) = relay.queue().stats(route).await {
        let age = s
            .oldest_pending
            .map_or(0, |t| u64::try_from(now_ms() - t).unwrap_or(0));
        relay
            .metrics()
            .queue(route, s.pending, Duration::from_millis(age), s.dead);
    }
}
