//! The token lifecycle per app: fetched before anyone asks, refreshed in the background ahead
//! of expiry, replaced once when the platform rejects it, and never fetched more often than
//! `max_fetches_per_minute`.
//!
//! Two paths fetch, and one gate per app keeps them to one fetch in flight:
//! - the *refresher*, one task per app, fetches at startup and again whenever the current token
//!   reaches its `refresh_at`, retrying failures with jittered backoff; requests keep using the
//!   current token meanwhile, so none waits on a refresh;
//! - a request finding no usable token (first use with the refresher still fetching, an expiry
//!   the refresher could not prevent, a rejection) joins moka's single-flight load, whose
//!   result, success or error, all waiting requests share.
//!
//! Whoever takes the gate second looks at the cache again before fetching, so a token that
//! just arrived is used rather than fetched anew.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use super::store::{self, StoredToken, TokenStore};
use super::{fetch, Token, TokenCache, TokenError};
use crate::clock::SharedClock;
use crate::config::{AppConfig, Inject, TokenConfig};
use crate::metrics::{FetchReason, Metrics};
use crate::upstream::Upstream;

/// Size of the fetch-cap window.
const WINDOW: Duration = Duration::from_secs(60);
/// Most rejected tokens remembered per app. Each is kept until it expires (a store that
/// could not be written while tokens turned over can hold one several generations old, and
/// two instances on a platform that revokes the previous token on every fetch reject each
/// other's); the fetch cap bounds how many a lifetime can see (6 a minute for 2 hours is
/// 720), so this bound is only a guard.
const REJECTED_KEPT: usize = 1024;

/// How often an instance waiting on another's fetch looks at the shared store.
const STORE_POLL: Duration = Duration::from_millis(50);
/// First and largest pause between failed background fetches.
const BACKOFF: (Duration, Duration) = (Duration::from_secs(1), Duration::from_secs(60));

/// What a fetch is for, passed down the shared-store path.
struct Want<'a> {
    reason: FetchReason,
    /// The token being replaced (due for refresh), if any.
    replacing: Option<&'a Arc<Token>>,
    /// Whether a token must not be used (it is `replacing` or was rejected).
    stale: &'a (dyn Fn(&Token) -> bool + Sync),
    /// Fetch anew whatever is cached or stored.
    force: bool,
}

/// One app's token state beside the cache.
#[derive(Debug)]
struct AppTokens {
    config: AppConfig,
    key: Arc<str>,
    /// Held while a fetch is in flight: one fetch per app at a time (shared with the
    /// previous configuration's manager across a reload).
    gate: Arc<tokio::sync::Mutex<()>>,
    /// Start times of the fetches in the last `WINDOW` (shared across a reload too).
    window: Arc<Mutex<VecDeque<Instant>>>,
    /// Why the last fetch failed, until one succeeds (for `/readyz`).
    last_error: Mutex<Option<String>>,
    had_token: AtomicBool,
    /// Wakes the refresher early (forced refresh, shutdown).
    wake: Notify,
    /// Tokens this instance saw rejected and not yet expired, newest last (at most
    /// `REJECTED_KEPT`): none of them is adopted again, whatever the shared store holds.
    rejected: Mutex<std::collections::VecDeque<Arc<Token>>>,
    /// Key prefix in the shared store.
    store_key: String,
}

/// What `/readyz` reports for one app.
#[derive(Debug, Clone, serde::Serialize)]
pub struct AppStatus {
    /// App name.
    pub app: String,
    /// Whether it holds a usable token.
    pub ready: bool,
    /// Seconds until the token expires.
    pub seconds_left: u64,
    /// Why not ready, if known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

/// Owns every app's token.
#[derive(Debug)]
pub struct TokenManager {
    apps: Vec<Arc<AppTokens>>,
    cache: TokenCache,
    upstream: Arc<Upstream>,
    inject: Inject,
    refresh_ahead: Duration,
    max_per_minute: u32,
    metrics: Arc<Metrics>,
    stopped: AtomicBool,
    store: Option<Arc<TokenStore>>,
    store_config: Option<crate::config::StoreConfig>,
}

impl TokenManager {
    /// A manager for `apps` (no task is started until [`TokenManager::start`]). With
    /// `previous` (a reload), every app whose settings did not change shares the previous
    /// manager's fetch gate and fetch-cap window, so neither limit resets across a reload.
    pub fn new(
        apps: &[AppConfig],
        token: &TokenConfig,
        upstream: Arc<Upstream>,
        clock: SharedClock,
        metrics: Arc<Metrics>,
        previous: Option<&TokenManager>,
    ) -> Self {
        let store = token.store.as_ref().and_then(|cfg| {
            // Reuse the previous connection when the store did not change.
            if let Some(prev) = previous.and_then(|p| p.store.clone()) {
                if previous.is_some_and(|p| p.store_config.as_ref() == Some(cfg)) {
                    return Some(prev);
                }
            }
            let lease = cfg
                .lease
                .unwrap_or(upstream.timeout() * 2 + Duration::from_secs(5));
            match TokenStore::new(&cfg.redis_url, lease, metrics.clone()) {
                Ok(s) => Some(Arc::new(s)),
                Err(e) => {
                    tracing::error!(error = %e, "token store disabled");
                    None
                }
            }
        });
        TokenManager {
            store_config: token.store.clone(),
            apps: apps
                .iter()
                .map(|a| {
                    let prev = previous.and_then(|p| p.apps.iter().find(|o| o.config.same_app(a)));
                    Arc::new(AppTokens {
                        key: Arc::from(a.name.as_str()),
                        config: a.clone(),
                        gate: prev.map_or_else(Default::default, |p| p.gate.clone()),
                        window: prev.map_or_else(Default::default, |p| p.window.clone()),
                        last_error: Mutex::new(prev.and_then(|p| lock(&p.last_error).clone())),
                        had_token: AtomicBool::new(
                            prev.is_some_and(|p| p.had_token.load(Ordering::Relaxed)),
                        ),
                        wake: Notify::new(),
                        rejected: Mutex::new(std::collections::VecDeque::new()),
                        store_key: store::app_key(a),
                    })
                })
                .collect(),
            cache: TokenCache::new(clock),
            upstream,
            inject: token.inject.clone(),
            refresh_ahead: token.refresh_ahead,
            max_per_minute: token.max_fetches_per_minute,
            metrics,
            stopped: AtomicBool::new(false),
            store,
        }
    }

    /// Starts one background refresher per app; they end when the manager is dropped or
    /// [`TokenManager::stop`] is called.
    pub fn start(self: &Arc<Self>) {
        for (idx, app) in self.apps.iter().enumerate() {
            tokio::spawn(refresher(Arc::downgrade(self), app.clone(), idx));
        }
    }

    /// Takes over the cached tokens of the previous configuration's manager for every app
    /// that is the same app ([`AppConfig::same_app`]; the manager was built with `previous` =
    /// `old`), rendered for this configuration's injection.
    pub async fn adopt_tokens(&self, old: &TokenManager) {
        for app in &self.apps {
            if let Some(prev) = old.apps.iter().find(|o| o.config.same_app(&app.config)) {
                if let Some(t) = old.cache.peek(&prev.key).await {
                    let t = if self.inject == old.inject {
                        Some(t)
                    } else {
                        t.rendered_for(&self.inject).ok().map(Arc::new)
                    };
                    if let Some(t) = t {
                        self.cache.insert(&app.key, t).await;
                    }
                }
            }
        }
    }

    /// Ends the refreshers.
    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        for app in &self.apps {
            app.wake.notify_one();
        }
    }

    /// The app's cached token if usable, without waiting or fetching.
    pub fn cached(&self, idx: usize) -> Option<Arc<Token>> {
        self.cache.cached(&self.apps[idx].key)
    }

    /// The app's usable token, fetching (once, shared) if there is none.
    pub async fn token(&self, idx: usize) -> Result<Arc<Token>, Arc<TokenError>> {
        let app = &self.apps[idx];
        let reason = if app.had_token.load(Ordering::Relaxed) {
            FetchReason::Expired
        } else {
            FetchReason::FirstUse
        };
        self.token_for(idx, reason).await
    }

    /// Like [`TokenManager::token`], counting a fetch under `reason`.
    pub async fn token_for(
        &self,
        idx: usize,
        reason: FetchReason,
    ) -> Result<Arc<Token>, Arc<TokenError>> {
        let key = &self.apps[idx].key;
        self.cache
            .get(key, || self.fetch_gated(idx, reason, None, false))
            .await
    }

    /// The platform rejected `token`: drop it if it is still the app's current one (so a
    /// burst of rejections of one token causes one fetch).
    pub async fn reject(&self, idx: usize, token: &Arc<Token>) {
        let app = &self.apps[idx];
        {
            let now = self.cache.clock().now();
            let mut rejected = lock(&app.rejected);
            rejected.retain(|r| r.expires_at > now);
            if !rejected.iter().any(|r| r.secret() == token.secret()) {
                if rejected.len() == REJECTED_KEPT {
                    rejected.pop_front();
                }
                rejected.push_back(token.clone());
            }
        }
        self.metrics.rejection(&app.key);
        self.cache.remove_if_current(&app.key, token).await;
    }

    /// Fetches a new token now, whatever the cache holds (`POST /tokens/{app}/refresh`).
    pub async fn force_refresh(&self, idx: usize) -> Result<Arc<Token>, TokenError> {
        let t = self
            .fetch_gated(idx, FetchReason::Forced, None, true)
            .await?;
        self.apps[idx].wake.notify_one();
        Ok(t)
    }

    /// The shared store, if configured (the callback relay shares nonces through it).
    pub fn store(&self) -> Option<Arc<TokenStore>> {
        self.store.clone()
    }

    /// How the shared token store is (`None`: none configured).
    pub fn store_state(&self) -> Option<store::StoreState> {
        self.store.as_ref().map(|s| s.state())
    }

    /// Index of the app named `name`.
    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.apps.iter().position(|a| &*a.key == name)
    }

    /// Readiness of every app.
    pub async fn status(&self) -> Vec<AppStatus> {
        if let Some(store) = &self.store {
            store.ping().await;
        }
        let now = self.cache.clock().now();
        let mut out = Vec::with_capacity(self.apps.len());
        for app in &self.apps {
            let token = self.cache.peek(&app.key).await;
            let seconds_left = token.as_ref().map_or(0, |t| t.remaining(now).as_secs());
            self.metrics.set_seconds_left(
                &app.key,
                token
                    .as_ref()
                    .map_or(0.0, |t| t.remaining(now).as_secs_f64()),
            );
            let reason = match &token {
                Some(_) => None,
                None => Some(
                    lock(&app.last_error)
                        .clone()
                        .unwrap_or_else(|| "no token fetched yet".to_owned()),
                ),
            };
            out.push(AppStatus {
                app: app.key.to_string(),
                ready: token.is_some(),
                seconds_left,
                reason,
            });
        }
        out
    }

    /// Fetches under the app's gate. Unless `force`, a usable token that is neither
    /// `replacing` nor one this instance saw rejected, and not yet due, is returned as is (someone else
    /// fetched while we waited). With a shared store, a token another instance stored is
    /// adopted the same way, and only the holder of the store's lease fetches. The new token
    /// is cached before the gate opens, so the next holder sees it.
    async fn fetch_gated(
        &self,
        idx: usize,
        reason: FetchReason,
        replacing: Option<&Arc<Token>>,
        force: bool,
    ) -> Result<Arc<Token>, TokenError> {
        let app = &self.apps[idx];
        let _gate = app.gate.lock().await;
        let rejected: Vec<Arc<Token>> = lock(&app.rejected).iter().cloned().collect();
        let stale = |t: &Token| {
            replacing.is_some_and(|r| r.secret() == t.secret())
                || rejected.iter().any(|r| r.secret() == t.secret())
        };
        if !force {
            if let Some(t) = self.cache.peek(&app.key).await {
                if !stale(&t) && !t.due_at(self.cache.clock().now()) {
                    return Ok(t);
                }
            }
        }
        if let Some(store) = &self.store {
            let want = Want {
                reason,
                replacing,
                stale: &stale,
                force,
            };
            if let Some(result) = self.via_store(app, store, &want).await {
                return result;
            }
        }
        self.fetch_here(app, reason, replacing).await
    }

    /// Fetches from the platform (under the cap) and caches the token.
    async fn fetch_here(
        &self,
        app: &AppTokens,
        reason: FetchReason,
        replacing: Option<&Arc<Token>>,
    ) -> Result<Arc<Token>, TokenError> {
        let clock = self.cache.clock().clone();
        if let Err(e) = self.take_fetch_slot(app, clock.now()) {
            self.metrics.token_fetch(&app.key, reason, "rate_limited");
            tracing::warn!(app = %app.key, reason = reason.as_str(), error = %e, "token fetch refused");
            return Err(e);
        }
        let started = store::now_us();
        match fetch(
            &self.upstream,
            &app.config,
            &self.inject,
            self.refresh_ahead,
            &*clock,
        )
        .await
        {
            Ok(mut token) => {
                token.version = started;
                // Platforms that hand out the same token until it expires are asked again
                // only when it has expired, not in a loop ahead of expiry.
                if replacing.is_some_and(|r| r.secret() == token.secret()) {
                    token.refresh_at = token.expires_at;
                }
                self.metrics.token_fetch(&app.key, reason, "ok");
                tracing::info!(app = %app.key, reason = reason.as_str(), expires_in_s = token.lifetime.as_secs(), "fetched a new access token");
                Ok(self.install(app, token).await)
            }
            Err(e) => {
                *lock(&app.last_error) = Some(e.to_string());
                self.metrics.token_fetch(&app.key, reason, "error");
                tracing::warn!(app = %app.key, reason = reason.as_str(), error = %e, "token fetch failed");
                Err(e)
            }
        }
    }

    /// Makes `token` the app's current one.
    async fn install(&self, app: &AppTokens, token: Token) -> Arc<Token> {
        let token = Arc::new(token);
        self.cache.insert(&app.key, token.clone()).await;
        app.had_token.store(true, Ordering::Relaxed);
        *lock(&app.last_error) = None;
        token
    }

    /// A stored token this instance may use: usable, not stale, and (when replacing a due
    /// token) not itself due.
    fn adoptable(
        &self,
        stored: Option<StoredToken>,
        replacing: Option<&Arc<Token>>,
        stale: &(dyn Fn(&Token) -> bool + Sync),
    ) -> Option<Token> {
        let s = stored?;
        let remaining = s.remaining();
        if remaining < Duration::from_secs(1) {
            return None;
        }
        let now = self.cache.clock().now();
        let t = Token::adopted(
            s.token,
            Duration::from_secs(s.lifetime_s),
            remaining,
            now,
            &self.inject,
            self.refresh_ahead,
            s.version,
        )
        .ok()?;
        let fresh_enough = replacing.is_none() || !t.due_at(now);
        (!stale(&t) && fresh_enough).then_some(t)
    }

    /// Reads the app's stored token and installs it if this instance may use it.
    async fn adopt_stored(
        &self,
        app: &AppTokens,
        store: &TokenStore,
        want: &Want<'_>,
    ) -> Result<Option<Arc<Token>>, store::StoreError> {
        let stored = store.get(&app.store_key).await?;
        let Some(t) = self.adoptable(stored, want.replacing, want.stale) else {
            return Ok(None);
        };
        self.metrics
            .token_fetch(&app.key, want.reason, "from_store");
        tracing::debug!(app = %app.key, "using the token another instance stored");
        Ok(Some(self.install(app, t).await))
    }

    /// The shared-store path. `None`: the store is unavailable, fetch locally.
    async fn via_store(
        &self,
        app: &AppTokens,
        store: &TokenStore,
        want: &Want<'_>,
    ) -> Option<Result<Arc<Token>, TokenError>> {
        let deadline = tokio::time::Instant::now() + self.upstream.timeout();
        loop {
            if !want.force {
                if let Some(t) = self.adopt_stored(app, store, want).await.ok()? {
                    return Some(Ok(t));
                }
            }
            if store.try_lease(&app.store_key).await.ok()? {
                let result = self.fetch_with_lease(app, store, want).await;
                store.release(&app.store_key).await;
                return Some(result);
            }
            if tokio::time::Instant::now() >= deadline {
                return Some(Err(TokenError::Elsewhere(
                    self.upstream.timeout().as_millis(),
                )));
            }
            // Another instance is fetching: look again shortly.
            tokio::time::sleep(STORE_POLL).await;
        }
    }

    /// Holding the cluster-wide lease: look once more, then fetch and share the token.
    async fn fetch_with_lease(
        &self,
        app: &AppTokens,
        store: &TokenStore,
        want: &Want<'_>,
    ) -> Result<Arc<Token>, TokenError> {
        if !want.force {
            if let Ok(Some(t)) = self.adopt_stored(app, store, want).await {
                return Ok(t);
            }
        }
        let token = self.fetch_here(app, want.reason, want.replacing).await?;
        let shared = StoredToken {
            token: token.secret().expose().to_owned(),
            version: token.version,
            expires_at_ms: store::now_ms()
                + token.remaining(self.cache.clock().now()).as_millis() as u64,
            lifetime_s: token.lifetime.as_secs(),
        };
        match store.put(&app.store_key, &shared).await {
            // A fetch that started later stored its token first: that one is newer.
            Ok(winner) if winner.token != shared.token => {
                tracing::info!(app = %app.key, "a newer token was already stored; using it");
                match self.adoptable(Some(winner), None, &|_| false) {
                    Some(t) => Ok(self.install(app, t).await),
                    None => Ok(token),
                }
            }
            _ => Ok(token),
        }
    }

    /// Counts a fetch against the app's cap, or says how long until one is allowed.
    fn take_fetch_slot(&self, app: &AppTokens, now: Instant) -> Result<(), TokenError> {
        let mut window = lock(&app.window);
        while window
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) >= WINDOW)
        {
            window.pop_front();
        }
        if window.len() >= self.max_per_minute as usize {
            let oldest = window.front().copied().unwrap_or(now);
            let retry = WINDOW.saturating_sub(now.saturating_duration_since(oldest));
            return Err(TokenError::RateLimited {
                limit: self.max_per_minute,
                retry_in_s: retry.as_secs().max(1),
            });
        }
        window.push_back(now);
        Ok(())
    }
}

/// Locks a std mutex, shrugging off poisoning: the guarded values stay meaningful.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A pause of `base` ± 25 %, so instances and apps do not retry in lockstep.
fn jitter(base: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let frac = f64::from(nanos % 1000) / 1000.0; // 0..1
    base.mul_f64(0.75 + frac * 0.5)
}

/// Keeps one app's token fresh: fetch when there is none or it is due, then sleep until the
/// next `refresh_at`; on failure retry with jittered exponential backoff (or when the fetch cap
/// frees a slot). Holds the manager only weakly, so dropping the proxy ends it.
async fn refresher(manager: Weak<TokenManager>, app: Arc<AppTokens>, idx: usize) {
    let mut backoff = BACKOFF.0;
    loop {
        let pause = {
            let Some(m) = manager.upgrade() else { return };
            if m.stopped.load(Ordering::SeqCst) {
                return;
            }
            let now = m.cache.clock().now();
            let current = m.cache.peek(&app.key).await;
            match current {
                Some(t) if !t.due_at(now) => {
                    backoff = BACKOFF.0;
                    t.refresh_at - now
                }
                current => {
                    let reason = match (&current, app.had_token.load(Ordering::Relaxed)) {
                        (Some(_), _) => FetchReason::AheadOfExpiry,
                        (None, true) => FetchReason::Expired,
                        (None, false) => FetchReason::FirstUse,
                    };
                    match m.fetch_gated(idx, reason, current.as_ref(), false).await {
                        Ok(_) => continue,
                        Err(TokenError::RateLimited { retry_in_s, .. }) => {
                            Duration::from_secs(retry_in_s)
                        }
                        Err(_) => {
                            let pause = jitter(backoff);
                            backoff = (backoff * 2).min(BACKOFF.1);
                            pause
                        }
                    }
                }
            }
        };
        tokio::select! {
            () = tokio::time::sleep(pause) => {}
            () = app.wake.notified() => {}
        }
    }
}
