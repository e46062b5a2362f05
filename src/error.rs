//! Errors: the proxy's own answers (SPEC section 5) and startup failures.
//!
//! A leaf: it knows the error kinds, their statuses and codes, and the body's text; the
//! response itself is made in one place, `ProxyError::into_response` (in [`crate::upstream::Body`]'s module,
//! beside the body type), so the status, the `{"err_code","err_msg"}` body and the
//! `x-cx-proxy-error` header cannot drift apart. Codes sit in the 990xxx range so clients can tell them from the platform's own.

use std::borrow::Cow;
use std::fmt;

use http::StatusCode;

/// Header naming the kind of a proxy-made error response.
pub const ERROR_HEADER: &str = "x-cx-proxy-error";

/// What went wrong, as a client of the proxy sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorKind {
    /// No app matches the request.
    NoRoute,
    /// The client is not allowed.
    Forbidden,
    /// Malformed or absolute-form target, bad header.
    BadRequest,
    /// `CONNECT` and the like.
    MethodNotAllowed,
    /// Body over `max_body_bytes`.
    PayloadTooLarge,
    /// Token request naming a configured app with the wrong secret.
    BadCredentials,
    /// The access token could not be fetched.
    TokenUnavailable,
    /// Connect or TLS failure to the upstream.
    UpstreamUnreachable,
    /// `upstream.timeout_ms` exceeded.
    UpstreamTimeout,
    /// Concurrency limit reached.
    Overloaded,
    /// A `[limits]` window is full past `max_wait_ms` (`Retry-After` set).
    RateLimited,
    /// Callback listener: bad signature, corpid, timestamp or a replayed nonce.
    CallbackRejected,
    /// Callback listener: the event could not be stored durably, so it is not acknowledged.
    CallbackUnavailable,
}

impl ErrorKind {
    /// Every kind, in the order the README lists them.
    pub const ALL: [ErrorKind; 13] = [
        ErrorKind::BadRequest,
        ErrorKind::BadCredentials,
        ErrorKind::Forbidden,
        ErrorKind::NoRoute,
        ErrorKind::MethodNotAllowed,
        ErrorKind::PayloadTooLarge,
        ErrorKind::TokenUnavailable,
        ErrorKind::UpstreamUnreachable,
        ErrorKind::Overloaded,
        ErrorKind::UpstreamTimeout,
        ErrorKind::RateLimited,
        ErrorKind::CallbackRejected,
        ErrorKind::CallbackUnavailable,
    ];

    /// The name sent in `x-cx-proxy-error`.
    pub fn name(self) -> &'static str {
        match self {
            ErrorKind::NoRoute => "no_route",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::MethodNotAllowed => "method_not_allowed",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::BadCredentials => "bad_credentials",
            ErrorKind::TokenUnavailable => "token_unavailable",
            ErrorKind::UpstreamUnreachable => "upstream_unreachable",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::CallbackRejected => "callback_rejected",
            ErrorKind::CallbackUnavailable => "callback_unavailable",
        }
    }

    /// The HTTP status.
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::BadCredentials | ErrorKind::CallbackRejected => StatusCode::UNAUTHORIZED,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::TokenUnavailable | ErrorKind::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::Overloaded | ErrorKind::CallbackUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
        }
    }

    /// The `err_code` in the body: 990 followed by the status, except `token_unavailable`
    /// (990510), which would otherwise share 990502 with `upstream_unreachable`, and the
    /// callback kinds (990460, 990463; SPEC section 5).
    pub fn code(self) -> u32 {
        match self {
            ErrorKind::NoRoute => 990_404,
            ErrorKind::Forbidden => 990_403,
            ErrorKind::BadRequest => 990_400,
            ErrorKind::MethodNotAllowed => 990_405,
            ErrorKind::PayloadTooLarge => 990_413,
            ErrorKind::BadCredentials => 990_401,
            ErrorKind::TokenUnavailable => 990_510,
            ErrorKind::UpstreamUnreachable => 990_502,
            ErrorKind::UpstreamTimeout => 990_504,
            ErrorKind::Overloaded => 990_503,
            ErrorKind::RateLimited => 990_429,
            ErrorKind::CallbackRejected => 990_460,
            ErrorKind::CallbackUnavailable => 990_463,
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An answer the proxy makes itself instead of forwarding.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProxyError {
    /// The kind, deciding status, code and header.
    pub kind: ErrorKind,
    /// Human-readable cause; never carries a secret.
    pub message: Cow<'static, str>,
    /// When to try again (`Retry-After`, whole seconds rounded up), for `rate_limited`.
    pub retry_after: Option<std::time::Duration>,
}

impl ProxyError {
    /// A new error.
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        ProxyError {
            kind,
            message: message.into(),
            retry_after: None,
        }
    }

    /// `Retry-After` in whole seconds (RFC 9110 section 10.2.3), rounded up so that a
    /// client that waits it finds the slot free; at least 1.
    pub fn retry_after_secs(&self) -> Option<u64> {
        self.retry_after
            .map(|after| (after.as_secs() + u64::from(after.subsec_nanos() > 0)).max(1))
    }

    /// The JSON body of SPEC section 5.
    pub fn body_json(&self) -> Vec<u8> {
        crate::wire::error_body(i64::from(self.kind.code()), &self.message)
    }
}

impl fmt::Display for ProxyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.message)
    }
}

impl std::error::Error for ProxyError {}

/// Failure to start: bad config, unusable certificates, a port in use.
#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    /// The configuration was refused; each line is `file: key: what is wrong`.
    #[error("{}", .0.join("\n"))]
    Config(Vec<String>),
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS material could not be used.
    #[error("{0}")]
    Tls(String),
    /// Anything else at startup.
    #[error("{0}")]
    Other(String),
}

/// Renders an error and its sources as one line: `a: b: c`.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.ends_with(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_follow_the_status_except_token_unavailable_and_callbacks() {
        for kind in ErrorKind::ALL {
            match kind {
                ErrorKind::TokenUnavailable => assert_eq!(kind.code(), 990_510),
                ErrorKind::CallbackRejected => assert_eq!(kind.code(), 990_460),
                ErrorKind::CallbackUnavailable => assert_eq!(kind.code(), 990_463),
                other => assert_eq!(other.code(), 990_000 + u32::from(other.status().as_u16())),
            }
        }
    }

    #[test]
    fn codes_are_distinct_and_in_range() {
        let mut codes: Vec<u32> = ErrorKind::ALL.iter().map(|k| k.code()).collect();
        assert!(codes.iter().all(|c| (990_000..991_000).contains(c)));
        codes.sort_unstable();
        codes.dedup();
        assert_eq!(codes.len(), ErrorKind::ALL.len());
    }
}
