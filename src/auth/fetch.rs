//! Fetching a token from the platform's token endpoint.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Limited};

use super::Token;
use crate::clock::Clock;
use crate::config::{AppConfig, Inject};
use crate::error::{ErrorKind, ProxyError};
use crate::platform;
use crate::upstream::Body;
use crate::upstream::{Upstream, UpstreamError};
use crate::wire::{as_code, TokenAnswer, QUERY_VALUE};

/// Largest token answer read.
const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// Why no token could be had. Messages never carry a secret: the platform's `err_msg` is
/// scrubbed of the app's secrets before it is kept.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// The platform answered with a non-zero `err_code`.
    #[error("the platform refused the token request: err_code {code}, err_msg {msg:?}")]
    Platform {
        /// Platform's `err_code`.
        code: i64,
        /// Platform's `err_msg`, scrubbed.
        msg: String,
    },
    /// Not a 2xx, and no platform error in the body.
    #[error("the token endpoint answered HTTP {0}")]
    Status(u16),
    /// Unreadable answer.
    #[error("the token endpoint's answer is unusable: {0}")]
    BadAnswer(String),
    /// The upstream could not be reached (connect, TLS).
    #[error("token fetch failed: {0}")]
    Unreachable(String),
    /// No answer in time.
    #[error("token fetch timed out after {0} ms")]
    Timeout(u128),
    /// Another instance holds the shared fetch lease and stored nothing in time.
    #[error("another proxy instance is fetching the token and stored none within {0} ms")]
    Elsewhere(u128),
    /// The per-app fetch cap was reached; no request was sent.
    #[error("the token fetch limit of {limit} per minute for this app was reached; retry in {retry_in_s} s")]
    RateLimited {
        /// `max_fetches_per_minute`.
        limit: u32,
        /// Seconds until the window frees a slot.
        retry_in_s: u64,
    },
}

impl From<&TokenError> for ProxyError {
    fn from(e: &TokenError) -> Self {
        let kind = match e {
            TokenError::Unreachable(_) => ErrorKind::UpstreamUnreachable,
            TokenError::Platform { .. }
            | TokenError::Status(_)
            | TokenError::BadAnswer(_)
            | TokenError::Timeout(_)
            | TokenError::Elsewhere(_)
            | TokenError::RateLimited { .. } => ErrorKind::TokenUnavailable,
        };
        ProxyError::new(kind, e.to_string())
    }
}

/// The token's lifetime from the answer's `expires_in` (SPEC section 4.5): missing is the
/// documented "usually 2 hours" (with a warning), zero or negative fails the fetch, over 30
/// days (or past what an integer holds) is clamped to 30 days. Never a panic.
fn lifetime(
    expires_in: Option<&serde_json::Value>,
    app: &AppConfig,
) -> Result<Duration, TokenError> {
    let Some(v) = expires_in else {
        tracing::warn!(
            app = %app.name,
            assumed_s = platform::DEFAULT_EXPIRES_IN_S,
            "the token answer has no expires_in; taking the documented two hours"
        );
        return Ok(Duration::from_secs(platform::DEFAULT_EXPIRES_IN_S));
    };
    let secs = match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| !s.is_nan())
    .ok_or_else(|| TokenError::BadAnswer(format!("expires_in {v} is not a number")))?;
    if secs < 1.0 {
        return Err(TokenError::BadAnswer(format!(
            "expires_in {v} is not a lifetime"
        )));
    }
    if secs > platform::MAX_EXPIRES_IN_S as f64 {
        tracing::warn!(
            app = %app.name,
            expires_in = %v,
            clamped_s = platform::MAX_EXPIRES_IN_S,
            "the token answer's expires_in is over 30 days; clamped"
        );
        return Ok(Duration::from_secs(platform::MAX_EXPIRES_IN_S));
    }
    Ok(Duration::from_secs(secs as u64))
}

/// `GET path?params` at the platform with the documented headers; the status and the body
/// (at most 64 KiB), read within `upstream.timeout_ms`. Errors are scrubbed with `scrub`.
async fn get(
    upstream: &Upstream,
    path: &str,
    params: &[(&str, &str)],
    scrub: &(dyn Fn(&str) -> String + Sync),
) -> Result<(http::StatusCode, Bytes), TokenError> {
    let mut pq = String::with_capacity(128);
    pq.push_str(upstream.base_path());
    pq.push_str(path);
    for (i, (k, v)) in params.iter().enumerate() {
        pq.push(if i == 0 { '?' } else { '&' });
        let _ = write!(
            pq,
            "{}={}",
            percent_encoding::utf8_percent_encode(k, QUERY_VALUE),
            percent_encoding::utf8_percent_encode(v, QUERY_VALUE)
        );
    }
    let pq = PathAndQuery::from_maybe_shared(Bytes::from(pq)).map_err(|_| {
        TokenError::BadAnswer("the path does not form a valid request target".into())
    })?;
    let mut req = Request::new(Body::Empty);
    *req.method_mut() = Method::GET;
    *req.uri_mut() = upstream.uri(pq);
    req.headers_mut()
        .insert(USER_AGENT, HeaderValue::from_static(platform::USER_AGENT));
    req.headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/json"));
    let deadline = tokio::time::Instant::now() + upstream.timeout();
    let resp = upstream.send(req).await.map_err(|e| match e {
        UpstreamError::Timeout(ms) => TokenError::Timeout(ms),
        UpstreamError::Unreachable(m) => TokenError::Unreachable(scrub(&m)),
        e @ UpstreamError::Dropped => TokenError::Unreachable(e.to_string()),
    })?;
    let status = resp.status();
    let body = tokio::time::timeout_at(
        deadline,
        Limited::new(resp.into_body(), MAX_ANSWER_BYTES).collect(),
    )
    .await
    .map_err(|_| TokenError::Timeout(upstream.timeout().as_millis()))?
    .map_err(|e| TokenError::BadAnswer(format!("cannot read the body: {e}")))?
    .to_bytes();
    Ok((status, body))
}

/// `GET path?params` at the platform, its answer as JSON (`cx-proxy corp-secret`). The
/// error text carries no parameter value.
///
/// # Errors
/// The upstream could not be reached or timed out, or the answer is not JSON.
pub async fn platform_get(
    upstream: &Upstream,
    path: &str,
    params: &[(&str, &str)],
) -> Result<serde_json::Value, String> {
    let scrub = |text: &str| {
        params.iter().fold(text.to_owned(), |t, (_, v)| {
            if v.is_empty() {
                t
            } else {
                t.replace(v, "***")
            }
        })
    };
    let (status, body) = get(upstream, path, params, &scrub)
        .await
        .map_err(|e| match e {
            TokenError::Unreachable(m) => format!("cannot reach the platform: {m}"),
            TokenError::Timeout(ms) => format!("no answer from the platform within {ms} ms"),
            other => other.to_string(),
        })?;
    serde_json::from_slice(&body).map_err(|_| {
        format!(
            "the platform answered HTTP {} without the documented JSON",
            status.as_u16()
        )
    })
}

/// Reads a token endpoint's answer (PLATFORM.md section 2): the token and its lifetime, or
/// why there is none (the platform's code and message, scrubbed with `scrub`; a bad status;
/// an answer that is not the documented JSON). Never a panic, whatever the bytes.
pub fn token_answer(
    status: http::StatusCode,
    body: &[u8],
    app: &AppConfig,
    scrub: &(dyn Fn(&str) -> String + Sync),
) -> Result<(String, Duration), TokenError> {
    let answer: TokenAnswer = match serde_json::from_slice(body) {
        Ok(a) => a,
        Err(_) if !status.is_success() => return Err(TokenError::Status(status.as_u16())),
        Err(e) => {
            return Err(TokenError::BadAnswer(format!(
                "not the documented JSON: {e}"
            )))
        }
    };
    let code = answer
        .err_code
        .as_ref()
        .map_or(Some(0), as_code)
        .unwrap_or(-1);
    if code != 0 {
        return Err(TokenError::Platform {
            code,
            msg: scrub(answer.err_msg.as_deref().unwrap_or("")),
        });
    }
    if !status.is_success() {
        return Err(TokenError::Status(status.as_u16()));
    }
    let token = answer
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| TokenError::BadAnswer("no access_token in the answer".into()))?;
    let lifetime = lifetime(answer.expires_in.as_ref(), app)?;
    Ok((token, lifetime))
}

/// Fetches a new token for `app` from the upstream.
pub async fn fetch(
    upstream: &Upstream,
    app: &AppConfig,
    inject: &Inject,
    refresh_ahead: Duration,
    clock: &dyn Clock,
) -> Result<Token, TokenError> {
    let scrub = |text: &str| {
        app.credentials
            .secrets()
            .iter()
            .fold(text.to_owned(), |t, s| s.scrub(&t))
    };
    let (status, body) = get(
        upstream,
        &app.token_path,
        &app.credentials.query_pairs(),
        &scrub,
    )
    .await?;
    let (token, lifetime) = token_answer(status, &body, app, &scrub)?;
    Token::new(token, lifetime, clock.now(), inject, refresh_ahead)
}
