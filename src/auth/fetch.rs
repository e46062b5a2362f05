//! Fetching a token from the platform's token endpoint.

use std::fmt::Write as _;
use std::time::Duration;

use bytes::Bytes;
use http::header::{ACCEPT, USER_AGENT};
use http::uri::PathAndQuery;
use http::{HeaderValue, Method, Request};
use http_body_util::{BodyExt, Limited};

use super::Token;
use crate::body::Body;
use crate::clock::Clock;
use crate::config::{AppConfig, Inject};
use crate::error::{ErrorKind, ProxyError};
use crate::proxy::QUERY_VALUE;
use crate::upstream::{Upstream, UpstreamError};

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
            _ => ErrorKind::TokenUnavailable,
        };
        ProxyError::new(kind, e.to_string())
    }
}

#[derive(serde::Deserialize)]
struct Answer {
    #[serde(default)]
    err_code: Option<serde_json::Value>,
    #[serde(default)]
    err_msg: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
}

fn as_i64(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Fetches a new token for `app` from the upstream.
pub async fn fetch(
    upstream: &Upstream,
    app: &AppConfig,
    inject: &Inject,
    refresh_ahead: Duration,
    clock: &dyn Clock,
) -> Result<Token, TokenError> {
    let mut pq = String::with_capacity(128);
    pq.push_str(upstream.base_path());
    pq.push_str(&app.token_path);
    for (i, (k, v)) in app.credentials.query_pairs().into_iter().enumerate() {
        pq.push(if i == 0 { '?' } else { '&' });
        let _ = write!(
            pq,
            "{}={}",
            percent_encoding::utf8_percent_encode(k, QUERY_VALUE),
            percent_encoding::utf8_percent_encode(v, QUERY_VALUE)
        );
    }
    let pq = PathAndQuery::from_maybe_shared(Bytes::from(pq)).map_err(|_| {
        TokenError::BadAnswer("token_path does not form a valid request target".into())
    })?;
    let mut req = Request::new(Body::Empty);
    *req.method_mut() = Method::GET;
    *req.uri_mut() = upstream.uri(pq);
    req.headers_mut()
        .insert(USER_AGENT, HeaderValue::from_static("CX"));
    req.headers_mut()
        .insert(ACCEPT, HeaderValue::from_static("application/json"));

    let scrub = |text: &str| {
        app.credentials
            .secrets()
            .iter()
            .fold(text.to_owned(), |t, s| s.scrub(&t))
    };
    let deadline = tokio::time::Instant::now() + upstream.timeout();
    let resp = upstream.send(req).await.map_err(|e| match e {
        UpstreamError::Timeout(ms) => TokenError::Timeout(ms),
        UpstreamError::Unreachable(m) => TokenError::Unreachable(scrub(&m)),
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
    let answer: Answer = match serde_json::from_slice(&body) {
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
        .map_or(Some(0), as_i64)
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
    let expires_in = answer
        .expires_in
        .as_ref()
        .map_or(Some(7200), as_i64)
        .unwrap_or(-1);
    if expires_in <= 0 {
        return Err(TokenError::BadAnswer(format!(
            "expires_in {expires_in} is not a lifetime"
        )));
    }
    Token::new(
        token,
        Duration::from_secs(expires_in as u64),
        clock.now(),
        inject,
        refresh_ahead,
    )
}
