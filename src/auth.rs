//! The access token: what it is, how it is fetched, and how it is cached.
//!
//! - [`Token`] holds the value pre-rendered for injection (query pair or header value), so the
//!   hot path copies bytes instead of formatting or percent-encoding per request.
//! - [`fetch`] asks the platform's token endpoint (`User-Agent: CX`) and reads its answer.
//! - [`TokenCache`] keeps one token per app in moka with single-flight fetching.
//! - [`TokenManager`] owns the lifecycle: background refresh ahead of expiry, the per-minute
//!   fetch cap, rejected tokens, forced refreshes and readiness.

mod cache;
mod fetch;
mod manager;
pub mod store;

use std::time::{Duration, Instant};

use http::HeaderValue;

pub use cache::TokenCache;
pub use fetch::{fetch, platform_get, token_answer, TokenError};
pub use manager::{AppStatus, TokenManager};

use crate::config::Inject;
use crate::secret::Secret;

/// A token the platform issued for one app.
#[derive(Debug)]
pub struct Token {
    value: Secret,
    injection: Injection,
    /// When it was received (by the proxy's clock).
    pub fetched_at: Instant,
    /// Never used at or after this instant.
    pub expires_at: Instant,
    /// From this instant a background refresh is due.
    pub refresh_at: Instant,
    /// Lifetime the platform announced.
    pub lifetime: Duration,
    /// Start time (µs since the epoch) of the fetch that produced it; orders tokens shared
    /// between instances.
    pub version: u64,
}

/// The token rendered for the configured injection.
#[derive(Debug)]
pub enum Injection {
    /// `param=value`, percent-encoded, ready to append to a query.
    Query(Box<str>),
    /// The header value (marked sensitive so hyper never logs it).
    Header(HeaderValue),
}

impl Token {
    /// Wraps a token received at `now`, rendering it for `inject`.
    pub fn new(
        value: String,
        lifetime: Duration,
        now: Instant,
        inject: &Inject,
        refresh_ahead: Duration,
    ) -> Result<Self, TokenError> {
        let injection = render(&value, inject)?;
        // Defence in depth beside the fetch's own clamp: a lifetime read from a shared store
        // or a platform must never overflow the clock (`Instant + Duration` panics).
        let lifetime = lifetime.min(Duration::from_secs(crate::platform::MAX_EXPIRES_IN_S));
        Ok(Token {
            value: Secret::new(value),
            injection,
            fetched_at: now,
            expires_at: now + lifetime,
            refresh_at: now + lifetime.saturating_sub(refresh_ahead).max(lifetime / 2),
            lifetime,
            version: 0,
        })
    }

    /// A token another instance fetched: `remaining` of its `lifetime` is left.
    pub fn adopted(
        value: String,
        lifetime: Duration,
        remaining: Duration,
        now: Instant,
        inject: &Inject,
        refresh_ahead: Duration,
        version: u64,
    ) -> Result<Self, TokenError> {
        let mut t = Token::new(value, lifetime, now, inject, refresh_ahead)?;
        let lifetime = t.lifetime;
        let issued = (now + remaining.min(lifetime))
            .checked_sub(lifetime)
            .unwrap_or(now);
        t.fetched_at = issued;
        t.expires_at = now + remaining.min(lifetime);
        t.refresh_at = issued + lifetime.saturating_sub(refresh_ahead).max(lifetime / 2);
        t.version = version;
        Ok(t)
    }

    /// The same token rendered for another injection (a reload that changed `[token]
    /// inject` keeps its tokens).
    pub fn rendered_for(&self, inject: &Inject) -> Result<Self, TokenError> {
        Ok(Token {
            value: self.value.clone(),
            injection: render(self.value.expose(), inject)?,
            fetched_at: self.fetched_at,
            expires_at: self.expires_at,
            refresh_at: self.refresh_at,
            lifetime: self.lifetime,
            version: self.version,
        })
    }

    /// The raw token (for the local token endpoint; never for logs).
    pub fn secret(&self) -> &Secret {
        &self.value
    }

    /// The rendered form to inject.
    pub fn injection(&self) -> &Injection {
        &self.injection
    }

    /// Whether the token may still be sent at `now`.
    pub fn usable_at(&self, now: Instant) -> bool {
        now < self.expires_at
    }

    /// Whether a refresh is due at `now`.
    pub fn due_at(&self, now: Instant) -> bool {
        now >= self.refresh_at
    }

    /// Time left at `now`.
    pub fn remaining(&self, now: Instant) -> Duration {
        self.expires_at.saturating_duration_since(now)
    }
}

/// `value` rendered for `inject`: a `param=value` pair percent-encoded for a query, or the
/// header value (marked sensitive).
fn render(value: &str, inject: &Inject) -> Result<Injection, TokenError> {
    Ok(match inject {
        Inject::Query { param } => {
            let mut pair = String::with_capacity(param.len() + 1 + value.len());
            pair.push_str(param);
            pair.push('=');
            pair.extend(percent_encoding::utf8_percent_encode(
                value,
                crate::wire::QUERY_VALUE,
            ));
            Injection::Query(pair.into_boxed_str())
        }
        Inject::Header { prefix, suffix, .. } => {
            let mut v =
                HeaderValue::from_str(&format!("{prefix}{value}{suffix}")).map_err(|_| {
                    TokenError::BadAnswer("access_token is not usable in a header".into())
                })?;
            v.set_sensitive(true);
            Injection::Header(v)
        }
    })
}
