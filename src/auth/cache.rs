//! One token per app in a moka cache, fetched by a single request however many wait.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use moka::future::Cache;
use moka::ops::compute::Op;
use moka::Expiry;

use super::{Token, TokenError};
use crate::clock::SharedClock;

/// Lets moka drop an entry once its token's lifetime is over (our own check against the
/// injectable clock stays authoritative; this only frees memory).
struct TokenExpiry;

impl Expiry<Arc<str>, Arc<Token>> for TokenExpiry {
    fn expire_after_create(
        &self,
        _key: &Arc<str>,
        value: &Arc<Token>,
        _now: Instant,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }

    // moka's default keeps the *old* entry's deadline on update, which would evict a freshly
    // refreshed token when its predecessor expires.
    fn expire_after_update(
        &self,
        _key: &Arc<str>,
        value: &Arc<Token>,
        _now: Instant,
        _current: Option<Duration>,
    ) -> Option<Duration> {
        Some(value.lifetime)
    }
}

/// The per-app token cache.
///
/// moka holds the tokens, expires them and makes concurrent misses share one fetch. In front
/// of it sits `hot`, a copy-on-write map of the tokens moka was given, read without a lock or
/// a future on every request: a moka `get` is an async call whose future the request would
/// carry and move. `hot` only ever learns a token where moka is written (never from a read,
/// which could bring back a token just dropped), and loses it where moka does.
#[derive(Clone)]
pub struct TokenCache {
    cache: Cache<Arc<str>, Arc<Token>>,
    hot: Arc<ArcSwap<HashMap<Arc<str>, Arc<Token>>>>,
    clock: SharedClock,
}

impl std::fmt::Debug for TokenCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenCache")
            .field("entries", &self.cache.entry_count())
            .finish()
    }
}

impl TokenCache {
    /// An empty cache judging expiry by `clock`.
    pub fn new(clock: SharedClock) -> Self {
        TokenCache {
            cache: Cache::builder()
                .max_capacity(100_000)
                .expire_after(TokenExpiry)
                .build(),
            hot: Arc::default(),
            clock,
        }
    }

    /// The app's token if the hot copy holds a usable one: no lock, no await.
    pub fn cached(&self, app: &str) -> Option<Arc<Token>> {
        self.hot
            .load()
            .get(app)
            .filter(|t| t.usable_at(self.clock.now()))
            .cloned()
    }

    fn set_hot(&self, app: &Arc<str>, token: &Arc<Token>) {
        self.hot.rcu(|map| {
            let mut map = HashMap::clone(map);
            map.insert(app.clone(), token.clone());
            map
        });
    }

    fn drop_hot(&self, app: &str, stale: &Token) {
        self.hot.rcu(|map| {
            let mut map = HashMap::clone(map);
            if map.get(app).is_some_and(|t| t.secret() == stale.secret()) {
                map.remove(app);
            }
            map
        });
    }

    /// The clock expiry is judged by.
    pub fn clock(&self) -> &SharedClock {
        &self.clock
    }

    /// Stores `token` as the app's current token.
    pub async fn insert(&self, app: &Arc<str>, token: Arc<Token>) {
        self.set_hot(app, &token);
        self.cache.insert(app.clone(), token).await;
    }

    /// The app's cached token if it is still usable, without fetching.
    pub async fn peek(&self, app: &Arc<str>) -> Option<Arc<Token>> {
        self.cache
            .get(app)
            .await
            .filter(|t| t.usable_at(self.clock.now()))
    }

    /// The app's token: the cached one while usable, else one fetched by `fetch`. Concurrent
    /// callers for the same app share one fetch and its result, success or failure.
    pub async fn get<F, Fut>(&self, app: &Arc<str>, fetch: F) -> Result<Arc<Token>, Arc<TokenError>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<Token>, TokenError>>,
    {
        if let Some(t) = self.cached(app) {
            return Ok(t);
        }
        // Boxed: the fetch and moka's single-flight machinery are many KiB of future state
        // that a request with a cached token should not carry.
        Box::pin(self.get_slow(app, fetch)).await
    }

    async fn get_slow<F, Fut>(
        &self,
        app: &Arc<str>,
        fetch: F,
    ) -> Result<Arc<Token>, Arc<TokenError>>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Arc<Token>, TokenError>>,
    {
        if let Some(t) = self.cache.get(app).await {
            if t.usable_at(self.clock.now()) {
                return Ok(t);
            }
            self.remove_if_current(app, &t).await;
        }
        let fetched = async {
            let token = fetch().await?;
            self.set_hot(app, &token);
            Ok::<_, TokenError>(token)
        };
        let token = self.cache.try_get_with_by_ref(app, fetched).await?;
        if token.usable_at(self.clock.now()) {
            Ok(token)
        } else {
            // Another caller's token aged out between its insert and our read (only possible
            // with a clock moved by hand); never hand out an expired token.
            self.remove_if_current(app, &token).await;
            Err(Arc::new(TokenError::BadAnswer(
                "token expired before use".into(),
            )))
        }
    }

    /// Drops `stale` if it is still the app's cached token (a newer one is left alone).
    /// Compared by value: the same token may have been installed twice (from the store).
    pub async fn remove_if_current(&self, app: &Arc<str>, stale: &Arc<Token>) {
        self.drop_hot(app, stale);
        self.cache
            .entry_by_ref(app)
            .and_compute_with(|cur| {
                let op = match cur {
                    Some(e) if e.value().secret() == stale.secret() => Op::Remove,
                    _ => Op::Nop,
                };
                std::future::ready(op)
            })
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::config::Inject;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn token(clock: &ManualClock, secs: u64, value: &str) -> Token {
        // Refresh timing is the manager's business; the cache only judges expiry.
        use crate::clock::Clock;
        Token::new(
            value.into(),
            Duration::from_secs(secs),
            clock.now(),
            &Inject::Query {
                param: "access_token".into(),
            },
            Duration::ZERO,
        )
        .unwrap()
    }

    #[tokio::test]
    async fn concurrent_misses_share_one_fetch() {
        let clock = ManualClock::new();
        let cache = TokenCache::new(clock.clone());
        let fetches = Arc::new(AtomicUsize::new(0));
        let app: Arc<str> = Arc::from("a");
        let mut tasks = Vec::new();
        for _ in 0..32 {
            let (cache, fetches, clock, app) =
                (cache.clone(), fetches.clone(), clock.clone(), app.clone());
            tasks.push(tokio::spawn(async move {
                cache
                    .get(&app, || async {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        Ok(Arc::new(token(&clock, 60, "t1")))
                    })
                    .await
                    .map(|t| t.secret().expose().to_owned())
            }));
        }
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "t1");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn an_expired_token_is_never_returned() {
        let clock = ManualClock::new();
        let cache = TokenCache::new(clock.clone());
        let app: Arc<str> = Arc::from("a");
        let t1 = cache
            .get(&app, || async { Ok(Arc::new(token(&clock, 60, "t1"))) })
            .await
            .unwrap();
        assert_eq!(t1.secret().expose(), "t1");
        clock.advance(Duration::from_secs(61));
        assert!(cache.peek(&app).await.is_none());
        let t2 = cache
            .get(&app, || async { Ok(Arc::new(token(&clock, 60, "t2"))) })
            .await
            .unwrap();
        assert_eq!(t2.secret().expose(), "t2");
    }

    #[tokio::test]
    async fn failures_are_shared_and_not_cached() {
        let clock = ManualClock::new();
        let cache = TokenCache::new(clock.clone());
        let app: Arc<str> = Arc::from("a");
        let err = cache
            .get(&app, || async {
                Err(TokenError::Platform {
                    code: 40001,
                    msg: "bad".into(),
                })
            })
            .await
            .unwrap_err();
        assert_eq!(
            *err,
            TokenError::Platform {
                code: 40001,
                msg: "bad".into()
            }
        );
        let ok = cache
            .get(&app, || async { Ok(Arc::new(token(&clock, 60, "t"))) })
            .await;
        assert!(ok.is_ok());
    }

    #[tokio::test]
    async fn a_replaced_token_lives_its_own_lifetime() {
        // Regression: the replacement inherited the old entry's eviction time.
        let clock = ManualClock::new();
        let cache = TokenCache::new(clock.clone());
        let app: Arc<str> = Arc::from("a");
        cache.insert(&app, Arc::new(token(&clock, 1, "old"))).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        cache.insert(&app, Arc::new(token(&clock, 60, "new"))).await;
        tokio::time::sleep(Duration::from_millis(600)).await;
        let t = cache
            .peek(&app)
            .await
            .expect("the new token is still cached");
        assert_eq!(t.secret().expose(), "new");
    }

    #[tokio::test]
    async fn remove_if_current_leaves_a_newer_token() {
        let clock = ManualClock::new();
        let cache = TokenCache::new(clock.clone());
        let app: Arc<str> = Arc::from("a");
        let old = cache
            .get(&app, || async { Ok(Arc::new(token(&clock, 60, "old"))) })
            .await
            .unwrap();
        cache.remove_if_current(&app, &old).await;
        let new = cache
            .get(&app, || async { Ok(Arc::new(token(&clock, 60, "new"))) })
            .await
            .unwrap();
        cache.remove_if_current(&app, &old).await;
        assert!(Arc::ptr_eq(&cache.peek(&app).await.unwrap(), &new));
    }
}
