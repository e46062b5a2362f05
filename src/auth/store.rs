//! The shared token store on Redis (`[token.store]`), for several proxy instances.
//!
//! Per app, keyed by a fingerprint of its non-secret credentials (so instances configured
//! alike share, and differently configured ones cannot collide):
//!
//! - `cx-proxy:{fp}:token` holds `{"token","version","expires_at_ms","lifetime_s"}`, expiring
//!   with the token. `version` is the wall-clock time (µs) at which the fetch that produced the
//!   token *started*; a Lua script stores a token only over an older version, so a slow fetch
//!   that finishes last can never replace the newer token of a fetch that started after it.
//! - `cx-proxy:{fp}:lease` is the fetch lease (`SET NX PX`), held by one instance at a time.
//!   Its time to live is longer than the longest possible fetch (the fetch is bounded by
//!   `upstream.timeout_ms`), so a slow fetch cannot outlive its lease.
//!
//! Instances learn a new token by reading the store when they need one: when their token is
//! due for refresh, when the platform rejects it, and while another instance holds the lease
//! (polled every 50 ms). Tokens change a few times a day, so reading on those occasions is
//! prompt enough without a pub/sub connection per instance; a rejected token is replaced
//! within one request's replay.
//!
//! Every call is bounded by a short timeout. The first failure marks the store down (logged
//! once, shown in `/readyz` and `cx_proxy_token_store_up`); the manager then fetches locally,
//! and the next successful call marks it up again.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use redis::aio::ConnectionManager;
use redis::AsyncCommands;

use crate::config::AppConfig;
use crate::metrics::Metrics;
use crate::secret::Secret;

/// Longest a single Redis call may take before the store counts as down.
const CALL_TIMEOUT: Duration = Duration::from_millis(500);

/// After a failed connect, how long before anyone connects again.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(1);

/// Stores a token unless the stored one is at least as new; returns what is stored after.
const PUT_SCRIPT: &str = r#"
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, c = pcall(cjson.decode, cur)
  if ok and tonumber(c.version) and tonumber(c.version) >= tonumber(ARGV[2]) then
    return cur
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return ARGV[1]
"#;

/// Deletes the lease only if we still hold it.
const RELEASE_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// Takes a slot in one call-limit window shared by all instances (SPEC section 4.9), in
/// the scheme of [`crate::limits::Window`]: a hash holding per slot its calls (`n:SLOT`) and
/// its latest call's time (`t:SLOT`, µs), slots numbered on the Redis server's clock (so
/// the instances' clocks need not agree). A slot counts while its latest call is within the
/// window. Fields of slots that left the ring are deleted when a new slot opens, so the
/// hash holds at most a ring's slots however large the limit; the key expires with them.
///
/// KEYS[1] the window; ARGV: n, window length (µs), slot length (µs), slots per window.
/// Returns `{admitted, wait_us, counted}`: `{1, 0, calls now}` or `{0, µs until room,
/// calls now}` (`wait_us` -1 when nothing will ever leave).
const SLOT_SCRIPT: &str = r#"
local n = tonumber(ARGV[1])
local per = tonumber(ARGV[2])
local slot = tonumber(ARGV[3])
local slots = tonumber(ARGV[4])
local keep = tonumber(ARGV[5])
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local s = math.floor(now / slot)
local fields = {}
for i = 0, slots do
  local name = string.format('%.0f', s - slots + i)
  fields[2 * i + 1] = 'n:' .. name
  fields[2 * i + 2] = 't:' .. name
end
local got = redis.call('HMGET', KEYS[1], unpack(fields))
local counts, total = {}, 0
for i = 0, slots do
  local c = tonumber(got[2 * i + 1]) or 0
  local last = tonumber(got[2 * i + 2]) or 0
  if c > 0 and now - last < per then
    counts[#counts + 1] = {c, last}
    total = total + c
  end
end
if total < n then
  local cur = fields[2 * slots + 1]
  local fresh = redis.call('HINCRBY', KEYS[1], cur, 1) == 1
  redis.call('HSET', KEYS[1], fields[2 * slots + 2], string.format('%.0f', now))
  if fresh then
    for _, k in ipairs(redis.call('HKEYS', KEYS[1])) do
      if tonumber(string.sub(k, 3)) < s - keep then redis.call('HDEL', KEYS[1], k) end
    end
    redis.call('PEXPIRE', KEYS[1], math.ceil(slot * (keep + 1) / 1000))
  end
  return {1, 0, total + 1}
end
local left = total
for _, c in ipairs(counts) do
  left = left - c[1]
  if left < n then
    return {0, c[2] + per - now, total}
  end
end
return {0, -1, total}
"#;

/// A token as shared between instances.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct StoredToken {
    /// The access token.
    pub token: String,
    /// Start time (µs since the epoch) of the fetch that produced it.
    pub version: u64,
    /// When it expires (ms since the epoch).
    pub expires_at_ms: u64,
    /// The lifetime the platform announced, seconds.
    pub lifetime_s: u64,
}

impl StoredToken {
    /// Time left before expiry.
    pub fn remaining(&self) -> Duration {
        Duration::from_millis(self.expires_at_ms.saturating_sub(now_ms()))
    }
}

/// How the shared store is ([`StoreState::name`] for `/readyz`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StoreState {
    /// Answers and takes writes.
    Up,
    /// Answers reads, refuses writes (out of memory, a read-only replica).
    RefusingWrites,
    /// Does not answer.
    Down,
}

impl StoreState {
    /// `up`, `refusing_writes` or `down`.
    pub fn name(self) -> &'static str {
        match self {
            StoreState::Up => "up",
            StoreState::RefusingWrites => "refusing_writes",
            StoreState::Down => "down",
        }
    }
}

/// Why a store call failed (the store is then treated as down).
#[derive(Debug, thiserror::Error)]
#[error("token store: {0}")]
pub struct StoreError(String);

/// Wall-clock milliseconds since the epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Wall-clock microseconds since the epoch (token versions).
pub fn now_us() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// The store key prefix for an app: its [`AppConfig::fingerprint`], which names its token
/// at the platform and never a secret.
pub fn app_key(app: &AppConfig) -> String {
    format!("cx-proxy:{}", app.fingerprint())
}

/// The key under which instances share a callback nonce (route names are configured, the
/// nonce was signed by the platform's key).
fn nonce_key(route: &str, nonce: &str) -> String {
    format!("cx-proxy:callback:{route}:{nonce}")
}

/// The Redis side of the token lifecycle.
pub struct TokenStore {
    client: redis::Client,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// The last call was answered (see [`TokenStore::reachable`]).
    up: AtomicBool,
    /// The last write was refused by the server (see [`TokenStore::refusing`]).
    refusing_writes: AtomicBool,
    /// Set once the first call has been made (so "down" is not logged before trying).
    tried: AtomicBool,
    /// What the last failed call said (for `/readyz`).
    last_error: std::sync::Mutex<Option<String>>,
    /// When a connect last failed (ms since the epoch; 0: never). For
    /// `RETRY_AFTER_FAILURE` after it nobody connects again, and counted calls do not use
    /// the store until a background probe finds it back.
    failed_at_ms: AtomicU64,
    /// A background probe (see [`TokenStore::probe_if_due`]) is running.
    probing: AtomicBool,
    /// When the last background probe ended (ms since the epoch).
    probed_at_ms: AtomicU64,
    lease: Duration,
    owner: String,
    metrics: Arc<Metrics>,
    put: redis::Script,
    release: redis::Script,
    slot: redis::Script,
}

impl std::fmt::Debug for TokenStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenStore")
            .field("up", &self.up())
            .finish_non_exhaustive()
    }
}

impl TokenStore {
    /// A store at `url` (not connected until first used). `lease` must outlive a fetch.
    pub fn new(url: &Secret, lease: Duration, metrics: Arc<Metrics>) -> Result<Self, StoreError> {
        // The URL may carry a password: never echo it.
        let client = redis::Client::open(url.expose())
            .map_err(|_| StoreError("redis_url is not a usable Redis URL".into()))?;
        // Down until the first call answers; the metric exists from the start.
        metrics.set_store_up(false);
        Ok(TokenStore {
            client,
            conn: tokio::sync::Mutex::new(None),
            up: AtomicBool::new(false),
            refusing_writes: AtomicBool::new(false),
            tried: AtomicBool::new(false),
            last_error: std::sync::Mutex::new(None),
            failed_at_ms: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            probed_at_ms: AtomicU64::new(0),
            lease,
            owner: format!("{}-{}", std::process::id(), now_us()),
            metrics,
            put: redis::Script::new(PUT_SCRIPT),
            release: redis::Script::new(RELEASE_SCRIPT),
            slot: redis::Script::new(SLOT_SCRIPT),
        })
    }

    /// Whether the store is in full use: it answers, and it takes writes.
    pub fn up(&self) -> bool {
        self.reachable() && !self.refusing_writes.load(Ordering::Relaxed)
    }

    /// Whether the last call was answered (successfully or with the server's error).
    fn reachable(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// How the store is, for `/readyz`.
    pub fn state(&self) -> StoreState {
        match (
            self.reachable(),
            self.refusing_writes.load(Ordering::Relaxed),
        ) {
            (false, _) => StoreState::Down,
            (true, true) => StoreState::RefusingWrites,
            (true, false) => StoreState::Up,
        }
    }

    fn mark(&self, ok: bool, why: Option<&str>) {
        let was = self.up.swap(ok, Ordering::Relaxed);
        let first = !self.tried.swap(true, Ordering::Relaxed);
        self.metrics.set_store_up(self.up());
        match (ok, was, first) {
            (true, false, _) => {
                tracing::info!(
                    "token store reachable: sharing tokens and call limits with other instances"
                )
            }
            (false, true, _) | (false, _, true) => tracing::warn!(
                error = why.unwrap_or(""),
                "token store unreachable: fetching tokens and counting call limits per instance \
                 until it returns"
            ),
            _ => {}
        }
    }

    async fn connection(&self) -> Result<ConnectionManager, StoreError> {
        let mut slot = self.conn.lock().await;
        if let Some(c) = slot.as_ref() {
            return Ok(c.clone());
        }
        // Callers that queued here behind a connect that failed do not each try again (a
        // store that does not answer would hold every one of them for the timeout in turn).
        if now_ms().saturating_sub(self.failed_at_ms.load(Ordering::Relaxed))
            < RETRY_AFTER_FAILURE.as_millis() as u64
        {
            return Err(StoreError("unreachable (tried just now)".into()));
        }
        // Our own retry policy (a failed call marks the store down, the next one reconnects):
        // the manager's retries with backoff would turn a refused connection into a wait
        // of the whole timeout.
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_number_of_retries(0)
            .set_connection_timeout(Some(CALL_TIMEOUT));
        let connect = ConnectionManager::new_with_config(self.client.clone(), config);
        let c = match tokio::time::timeout(CALL_TIMEOUT, connect).await {
            Ok(Ok(c)) => c,
            failed => {
                self.failed_at_ms.store(now_ms(), Ordering::Relaxed);
                return Err(StoreError(match failed {
                    Ok(Err(e)) => format!("cannot connect: {:?}", e.kind()),
                    _ => "connect timed out".into(),
                }));
            }
        };
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Runs one call under the timeout, keeping the up/down state. A call that fails on a
    /// pooled connection is tried once more on a fresh one (the old one may have died with a
    /// restarted server).
    async fn call<T, F, Fut>(&self, write: bool, f: F) -> Result<T, StoreError>
    where
        F: Fn(ConnectionManager) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        let mut result = Err(StoreError("not tried".into()));
        // The server answered, with an error (out of memory, read-only replica…): it is
        // reachable, and the connection is fine.
        let mut answered = false;
        for _attempt in 0..2 {
            let had_connection = self.conn.lock().await.is_some();
            result = match self.connection().await {
                Ok(conn) => match tokio::time::timeout(CALL_TIMEOUT, f(conn)).await {
                    Ok(Ok(v)) => Ok(v),
                    Ok(Err(e)) => {
                        answered = matches!(
                            e.kind(),
                            redis::ErrorKind::Server(_) | redis::ErrorKind::Extension
                        );
                        Err(StoreError(redis_error_text(&e)))
                    }
                    Err(_) => Err(StoreError("call timed out".into())),
                },
                Err(e) => Err(e),
            };
            if result.is_ok() || answered {
                break;
            }
            *self.conn.lock().await = None;
            if !had_connection {
                break;
            }
        }
        if let Err(e) = &result {
            if let Ok(mut last) = self.last_error.lock() {
                *last = Some(e.0.clone());
            }
        }
        let reachable = result.is_ok() || answered;
        if reachable != self.reachable() || !self.tried.load(Ordering::Relaxed) {
            self.mark(reachable, result.as_ref().err().map(|e| e.0.as_str()));
        }
        if write && reachable {
            self.refusing(answered, result.as_ref().err().map(|e| e.0.as_str()));
        }
        result
    }

    /// What the last failed call said (the server's error code and message, a timeout,
    /// a refused connection), if one failed.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    /// Records whether the store refuses writes (it answers reads, so it is reachable, but
    /// tokens fetched here cannot be shared); logged once per change.
    fn refusing(&self, refusing: bool, why: Option<&str>) {
        if self.refusing_writes.swap(refusing, Ordering::Relaxed) == refusing {
            return;
        }
        self.metrics.set_store_up(self.up());
        if refusing {
            tracing::warn!(
                error = why.unwrap_or(""),
                "token store refuses writes: tokens fetched here are not shared until it \
                 accepts them again"
            );
        } else {
            tracing::info!("token store accepts writes again");
        }
    }

    /// While the store is down, pings it in the background once its last failure is older
    /// than `RETRY_AFTER_FAILURE`, one ping at a time; callers that must not wait on a down
    /// store (counted calls) go on without it and learn from [`TokenStore::up`] when it is
    /// back.
    pub fn probe_if_due(self: &Arc<Self>) {
        let since = |at: &AtomicU64| now_ms().saturating_sub(at.load(Ordering::Relaxed));
        let pause = RETRY_AFTER_FAILURE.as_millis() as u64;
        if self.up()
            || since(&self.failed_at_ms) < pause
            || since(&self.probed_at_ms) < pause
            || self.probing.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let store = self.clone();
        tokio::spawn(async move {
            store.ping().await;
            store.probed_at_ms.store(now_ms(), Ordering::Relaxed);
            store.probing.store(false, Ordering::Release);
        });
    }

    /// Takes a slot in the shared window `key` of `n` calls per `per`, counted in `slots`
    /// slots of `slot` (see `SLOT_SCRIPT`), the counts of the last `keep` slots kept for
    /// instances that look further back: `Ok(Ok(calls counted))` when admitted,
    /// `Ok(Err(wait))` when the window is full for `wait`.
    pub async fn take_slot(
        &self,
        key: &str,
        n: u32,
        per: Duration,
        (slot, slots, keep): (Duration, u32, u32),
    ) -> Result<Result<u32, Duration>, StoreError> {
        let us = |d: Duration| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let (per_us, slot_us) = (us(per), us(slot));
        let script = &self.slot;
        let (admitted, wait_us, counted): (i64, i64, i64) = self
            .call(true, |mut c| async move {
                script
                    .key(key)
                    .arg(n)
                    .arg(per_us)
                    .arg(slot_us)
                    .arg(slots)
                    .arg(keep.max(slots))
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        Ok(if admitted == 1 {
            Ok(u32::try_from(counted).unwrap_or(u32::MAX))
        } else if wait_us < 0 {
            Err(Duration::MAX)
        } else {
            Err(Duration::from_micros(wait_us.unsigned_abs()))
        })
    }

    /// Checks that the store answers (readiness, metrics, the limits' probe), and while it
    /// refuses writes, whether it takes one again (a short-lived key of this instance's);
    /// updates the state.
    pub async fn ping(&self) -> bool {
        if self.refusing_writes.load(Ordering::Relaxed) {
            let key = format!("cx-proxy:probe:{}", self.owner);
            let r: Result<(), _> = self
                .call(true, |mut c| {
                    let key = key.clone();
                    async move {
                        redis::cmd("SET")
                            .arg(&key)
                            .arg(1)
                            .arg("PX")
                            .arg(1000)
                            .query_async(&mut c)
                            .await
                    }
                })
                .await;
            return r.is_ok();
        }
        let r: Result<String, _> = self
            .call(false, |mut c| async move {
                redis::cmd("PING").query_async(&mut c).await
            })
            .await;
        r.is_ok()
    }

    /// The signature a callback nonce was first kept with by any instance, if it was kept
    /// within its window (the callback relay's cluster-wide replay check, SPEC section 8.2).
    pub async fn callback_nonce(
        &self,
        route: &str,
        nonce: &str,
    ) -> Result<Option<String>, StoreError> {
        let key = nonce_key(route, nonce);
        self.call(false, |mut c| {
            let key = key.clone();
            async move { c.get(&key).await }
        })
        .await
    }

    /// Remembers that a callback with `nonce` and `signature` was kept (for `window`), unless
    /// another instance remembered it first.
    pub async fn remember_callback_nonce(
        &self,
        route: &str,
        nonce: &str,
        signature: &str,
        window: Duration,
    ) -> Result<(), StoreError> {
        let key = nonce_key(route, nonce);
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX).max(1);
        let signature = signature.to_ascii_lowercase();
        self.call(true, |mut c| {
            let (key, signature) = (key.clone(), signature.clone());
            async move {
                redis::cmd("SET")
                    .arg(&key)
                    .arg(&signature)
                    .arg("NX")
                    .arg("PX")
                    .arg(ms)
                    .query_async::<Option<String>>(&mut c)
                    .await
                    .map(drop)
            }
        })
        .await
    }

    /// The app's stored token, if any and readable.
    pub async fn get(&self, key: &str) -> Result<Option<StoredToken>, StoreError> {
        let k = format!("{key}:token");
        let raw: Option<String> = self
            .call(false, |mut c| {
                let k = k.clone();
                async move { c.get(k).await }
            })
            .await?;
        Ok(raw.and_then(|r| serde_json::from_str(&r).ok()))
    }

    /// Stores `t` unless a newer version is stored; returns the token stored afterwards.
    pub async fn put(&self, key: &str, t: &StoredToken) -> Result<StoredToken, StoreError> {
        let k = format!("{key}:token");
        let value = serde_json::to_string(t).map_err(|e| StoreError(e.to_string()))?;
        let ttl_ms = t.remaining().as_millis().max(1) as u64;
        let script = &self.put;
        let stored: String = self
            .call(true, |mut c| {
                let (k, value) = (k.clone(), value.clone());
                async move {
                    script
                        .key(k)
                        .arg(value)
                        .arg(t.version)
                        .arg(ttl_ms)
                        .invoke_async(&mut c)
                        .await
                }
            })
            .await?;
        serde_json::from_str(&stored)
            .map_err(|e| StoreError(format!("unreadable stored token: {e}")))
    }

    /// Takes the app's fetch lease if nobody holds it.
    pub async fn try_lease(&self, key: &str) -> Result<bool, StoreError> {
        let k = format!("{key}:lease");
        let owner = self.owner.clone();
        let ms = self.lease.as_millis() as u64;
        let got: Option<String> = self
            .call(true, |mut c| {
                let (k, owner) = (k.clone(), owner.clone());
                async move {
                    redis::cmd("SET")
                        .arg(k)
                        .arg(owner)
                        .arg("NX")
                        .arg("PX")
                        .arg(ms)
                        .query_async(&mut c)
                        .await
                }
            })
            .await?;
        Ok(got.is_some())
    }

    /// Gives the lease back (only if still ours).
    pub async fn release(&self, key: &str) {
        let k = format!("{key}:lease");
        let owner = self.owner.clone();
        let script = &self.release;
        let _: Result<i64, _> = self
            .call(true, |mut c| {
                let (k, owner) = (k.clone(), owner.clone());
                async move { script.key(k).arg(owner).invoke_async(&mut c).await }
            })
            .await;
    }
}

/// What a Redis error says, for logs and `/readyz`: the server's code and message
/// (`OOM command not allowed when used memory > 'maxmemory'`, `NOPERM …`, `READONLY …`),
/// cut at 160 characters, else the client's kind. Neither holds a key's value.
fn redis_error_text(e: &redis::RedisError) -> String {
    let text = match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        (Some(code), None) => code.to_owned(),
        _ => format!("{:?}: {e}", e.kind()),
    };
    text.chars().take(160).collect()
}
