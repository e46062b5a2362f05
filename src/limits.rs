//! Call limits kept at the gateway (SPEC section 4.9, PLATFORM.md section 3): at most `n`
//! calls in *any* sliding window of length `per`, with memory that does not grow with `n`.
//!
//! A [`Window`] counts calls per slot of `per / SLOTS` (rounded up) in a ring of
//! `SLOTS + 1` counters. A call at time `t` is admitted when the calls of the current slot
//! and the `SLOTS` before it, which cover `[t - per, t]` and a little more, number fewer
//! than `n`. Counting that little more is what makes the limit hold for every window, not
//! only for windows aligned to slots: the price is that a full window frees up to one slot
//! (5 %) later than an exact log of call times would. An exact log would need `n`
//! timestamps per rule (100,000 for a 100,000-an-hour rule); this needs 21 counters.
//!
//! A full window says when its oldest counted slot leaves the ring, which is when a call can
//! next be admitted: the wait of `max_wait_ms` and the `Retry-After` of a 429.
//!
//! With `[token.store]` the windows are counted cluster-wide in its Redis, in the same slot
//! scheme, by one Lua script per call (`TokenStore::take_slot`). When the store is
//! unreachable each instance counts alone in its own windows, which record the calls it
//! admitted through the store too, so a failover starts from what this instance spent.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::auth::store::{self, TokenStore};
use crate::config::{AppConfig, LimitsConfig};
use crate::platform::{self, Rate};

/// Path segments a rule may have (more: the rule matches no path).
const MAX_SEGMENTS: usize = 16;

/// Slots per window.
pub const SLOTS: u32 = 20;
const RING: usize = SLOTS as usize + 1;

/// One rule's window for one app.
#[derive(Debug, Clone)]
pub struct Window {
    n: u32,
    slot: Duration,
    /// Calls per slot; slot number `s` lives at `s % RING`.
    counts: [u32; RING],
    /// The newest slot number the ring has been moved to.
    head: u64,
    /// Slot 0 starts here.
    origin: Instant,
}

impl Window {
    /// An empty window for `rate`, its slots counted from `origin`.
    pub fn new(rate: Rate, origin: Instant) -> Self {
        let per = rate.per.max(Duration::from_millis(SLOTS.into()));
        // Rounded up, so that SLOTS slots span at least `per`.
        let nanos = per.as_nanos().div_ceil(u128::from(SLOTS));
        let slot = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        Window {
            n: rate.n,
            slot,
            counts: [0; RING],
            head: 0,
            origin,
        }
    }

    /// The rule's `n`.
    pub fn limit(&self) -> u32 {
        self.n
    }

    /// The length of one slot (`per / SLOTS`, rounded up).
    pub fn slot_length(&self) -> Duration {
        self.slot
    }

    fn slot_of(&self, t: Instant) -> u64 {
        let since = t.saturating_duration_since(self.origin).as_nanos();
        u64::try_from(since / self.slot.as_nanos().max(1)).unwrap_or(u64::MAX)
    }

    fn start_of(&self, slot: u64) -> Instant {
        let nanos = u128::from(slot) * self.slot.as_nanos();
        self.origin + Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
    }

    /// Moves the ring to slot `s`, emptying the slots it passes.
    fn advance(&mut self, s: u64) {
        if s <= self.head {
            return;
        }
        let steps = (s - self.head).min(RING as u64);
        for i in 1..=steps {
            self.counts[((self.head + i) % RING as u64) as usize] = 0;
        }
        self.head = s;
    }

    /// Calls counted now (in the ring as of `now`).
    pub fn used(&mut self, now: Instant) -> u32 {
        self.advance(self.slot_of(now));
        self.counts.iter().sum()
    }

    /// Counts a call at `now` that was admitted elsewhere (by the shared window).
    pub fn record(&mut self, now: Instant) {
        let s = self.slot_of(now).max(self.head);
        self.advance(s);
        let c = &mut self.counts[(s % RING as u64) as usize];
        *c = c.saturating_add(1);
    }

    /// Counts a call at `now` if the window has room; else how long until it has.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        let s = self.slot_of(now).max(self.head);
        self.advance(s);
        let total: u32 = self.counts.iter().sum();
        if total < self.n {
            self.counts[(s % RING as u64) as usize] += 1;
            return Ok(());
        }
        // Oldest first: the slot at ring position s + 1 + j is slot s - SLOTS + j, which
        // leaves the ring when slot s + j + 1 starts.
        let mut left = total;
        for j in 0..RING as u64 {
            left -= self.counts[((s + 1 + j) % RING as u64) as usize];
            if left < self.n {
                return Err(self.start_of(s + j + 1).saturating_duration_since(now));
            }
        }
        // n = 0: never.
        Err(Duration::MAX)
    }
}

/// A rule in force: the calls it counts and its rate.
#[derive(Debug, Clone)]
pub struct Rule {
    /// HTTP method.
    pub method: String,
    /// Path pattern as forwarded (`{x}` matches one segment).
    pub pattern: String,
    /// At most `rate.n` calls in any window of `rate.per`.
    pub rate: Rate,
}

impl Rule {
    /// `METHOD pattern`, as metrics and messages name it.
    pub fn label(&self) -> String {
        format!("{} {}", self.method, self.pattern)
    }
}

/// Every rule in force and each app's windows (one generation; a reload builds the next
/// and keeps the windows of unchanged apps and rules).
#[derive(Debug)]
pub struct Limiter {
    enabled: bool,
    max_wait: Duration,
    rules: Vec<Rule>,
    /// By path segment count, then method: the rules that could match. A call matching no
    /// rule costs one split of its path, an index and a short scan; no hashing, no
    /// allocation.
    index: Vec<Vec<(http::Method, Vec<usize>)>>,
    /// Per rule: its pattern's segments, `None` for a `{x}` segment.
    segments: Vec<Vec<Option<Box<[u8]>>>>,
    /// Per app (by index), per rule (by index): the window. Locked only by calls of that
    /// app to that rule.
    windows: Vec<Vec<Arc<Mutex<Window>>>>,
    /// Per app: what makes it the same app across a reload (name and token identity).
    app_keys: Vec<String>,
    /// The shared store that counts windows cluster-wide, if configured.
    store: Option<Arc<TokenStore>>,
    /// Per app, per rule: the window's key in the store (empty without a store).
    shared_keys: Vec<Vec<String>>,
}

/// A call the limits refused: which rule, and when a call could pass.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limited {
    /// The rule's label.
    pub rule: String,
    /// The rule's rate, as written (`10/h`).
    pub rate: String,
    /// How long until the window has room.
    pub retry_after: Duration,
}

impl Limiter {
    /// The built-in table (PLATFORM.md section 3) with the file's rules added or in place of
    /// the built-in ones of the same method and pattern; windows for every app, taken over
    /// from `previous` where the app and the rule are unchanged.
    /// With `store`, windows are counted in it cluster-wide while it answers.
    pub fn new(
        config: &LimitsConfig,
        apps: &[AppConfig],
        previous: Option<&Limiter>,
        store: Option<Arc<TokenStore>>,
    ) -> Self {
        let mut rules: Vec<Rule> = platform::APIS
            .iter()
            .filter_map(|a| {
                a.rate.map(|rate| Rule {
                    method: a.method.to_owned(),
                    pattern: a.path.to_owned(),
                    rate,
                })
            })
            .collect();
        for r in &config.rules {
            match rules
                .iter_mut()
                .find(|b| b.method == r.method && platform::same_pattern(&b.pattern, &r.path))
            {
                Some(b) => b.rate = r.rate,
                None => rules.push(Rule {
                    method: r.method.clone(),
                    pattern: r.path.clone(),
                    rate: r.rate,
                }),
            }
        }
        let mut index: Vec<Vec<(http::Method, Vec<usize>)>> = vec![Vec::new(); MAX_SEGMENTS + 1];
        let segments: Vec<Vec<Option<Box<[u8]>>>> = rules
            .iter()
            .map(|r| {
                r.pattern
                    .split('/')
                    .map(|seg| {
                        let var = seg.starts_with('{') && seg.ends_with('}');
                        (!var).then(|| seg.as_bytes().into())
                    })
                    .collect()
            })
            .collect();
        for (i, r) in rules.iter().enumerate() {
            // Methods are checked when the config is read; one that is not a token cannot
            // be any request's method, so its rule could never match.
            let (Ok(m), Some(by_method)) = (
                http::Method::from_bytes(r.method.as_bytes()),
                index.get_mut(segments[i].len()),
            ) else {
                continue;
            };
            match by_method.iter_mut().find(|(k, _)| *k == m) {
                Some((_, rules)) => rules.push(i),
                None => by_method.push((m, vec![i])),
            }
        }
        let now = Instant::now();
        let app_keys: Vec<String> = apps
            .iter()
            .map(|a| format!("{}\0{}", a.name, a.fingerprint()))
            .collect();
        let windows = app_keys
            .iter()
            .map(|key| {
                rules
                    .iter()
                    .map(|rule| {
                        previous
                            .and_then(|p| p.window_of(key, rule))
                            .unwrap_or_else(|| Arc::new(Mutex::new(Window::new(rule.rate, now))))
                    })
                    .collect()
            })
            .collect();
        // Instances configured alike name a window alike: the app's store prefix (its token
        // identity), the rule with its placeholders unnamed, and the rate (a changed rate
        // starts a new window, as it does locally).
        let shared_keys = match store {
            None => Vec::new(),
            Some(_) => apps
                .iter()
                .map(|a| {
                    let prefix = store::app_key(a);
                    rules
                        .iter()
                        .map(|r| {
                            let pattern: Vec<&str> = r
                                .pattern
                                .split('/')
                                .map(|s| if s.starts_with('{') { "{}" } else { s })
                                .collect();
                            format!(
                                "{prefix}:limit:{} {}:{}",
                                r.method,
                                pattern.join("/"),
                                rate_text(r.rate)
                            )
                        })
                        .collect()
                })
                .collect(),
        };
        Limiter {
            enabled: config.enabled,
            max_wait: config.max_wait,
            rules,
            index,
            segments,
            windows,
            app_keys,
            store,
            shared_keys,
        }
    }

    /// The window this generation keeps for app `key` and an identical rule.
    fn window_of(&self, key: &str, rule: &Rule) -> Option<Arc<Mutex<Window>>> {
        let app = self.app_keys.iter().position(|k| k == key)?;
        let r = self.rules.iter().position(|o| {
            o.method == rule.method
                && o.rate == rule.rate
                && platform::same_pattern(&o.pattern, &rule.pattern)
        })?;
        Some(self.windows[app][r].clone())
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule counting `method` `path` (the path as forwarded), if any.
    pub fn rule_for(&self, method: &http::Method, path: &str) -> Option<usize> {
        if !self.enabled {
            return None;
        }
        // The path split once, without allocating; a path longer than any pattern matches none.
        let mut segs: [&[u8]; MAX_SEGMENTS] = [&[]; MAX_SEGMENTS];
        let mut n = 0;
        for seg in path.as_bytes().split(|&b| b == b'/') {
            *segs.get_mut(n)? = seg;
            n += 1;
        }
        let (_, candidates) = self.index.get(n)?.iter().find(|(m, _)| m == method)?;
        // Last segment first: patterns share their leading `/api/apps/v1`, so a path that
        // no rule counts is told apart at its end.
        candidates.iter().copied().find(|&i| {
            self.segments[i]
                .iter()
                .zip(&segs[..n])
                .rev()
                .all(|(want, got)| match want {
                    Some(literal) => **literal == **got,
                    None => !got.is_empty(),
                })
        })
    }

    /// Whether windows are counted in the shared store now (it is configured, and up or
    /// due for another try): a counted call then goes through [`Limiter::admit`].
    pub fn shared(&self) -> bool {
        self.store.as_ref().is_some_and(|s| s.worth_trying())
    }

    /// Counts a call of app `app` under rule `rule` in this instance's window if it has
    /// room now (the call then needs no await).
    pub fn try_admit(&self, app: usize, rule: usize) -> bool {
        let Some(window) = self.windows.get(app).and_then(|w| w.get(rule)) else {
            return true;
        };
        lock(window).try_acquire(Instant::now()).is_ok()
    }

    /// Counts a call of app `app` under rule `rule`, waiting up to `max_wait_ms` for room;
    /// `Err` when there is none by then (SPEC section 4.9). Counted in the shared store
    /// while it answers, else in this instance's window.
    pub async fn admit(&self, app: usize, rule: usize) -> Result<(), Limited> {
        let Some(window) = self.windows.get(app).and_then(|w| w.get(rule)) else {
            return Ok(());
        };
        let deadline = Instant::now() + self.max_wait;
        loop {
            let wait = match self.take_shared(app, rule, window).await {
                Some(Ok(())) => {
                    lock(window).record(Instant::now());
                    return Ok(());
                }
                Some(Err(wait)) => wait,
                None => match lock(window).try_acquire(Instant::now()) {
                    Ok(()) => return Ok(()),
                    Err(wait) => wait,
                },
            };
            if wait > deadline.saturating_duration_since(Instant::now()) {
                let r = &self.rules[rule];
                return Err(Limited {
                    rule: r.label(),
                    rate: rate_text(r.rate),
                    retry_after: wait,
                });
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// A slot in the shared window, when the store is configured and answers; `None` to
    /// count in this instance's window instead.
    async fn take_shared(
        &self,
        app: usize,
        rule: usize,
        window: &Mutex<Window>,
    ) -> Option<Result<(), Duration>> {
        let store = self.store.as_deref().filter(|s| s.worth_trying())?;
        let key = self.shared_keys.get(app)?.get(rule)?;
        let (n, slot) = {
            let w = lock(window);
            (w.limit(), w.slot_length())
        };
        let taken = store.take_slot(key, n, slot, SLOTS).await.ok()?;
        Some(taken.map(drop))
    }
}

fn lock(window: &Mutex<Window>) -> std::sync::MutexGuard<'_, Window> {
    window.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Limiter {
    /// Every window in use now: `(app index, rule index, limit, calls counted)`.
    pub fn in_use(&self) -> Vec<(usize, usize, u32, u32)> {
        let now = Instant::now();
        let mut out = Vec::new();
        for (a, rules) in self.windows.iter().enumerate() {
            for (r, w) in rules.iter().enumerate() {
                let mut w = lock(w);
                let used = w.used(now);
                if used > 0 {
                    out.push((a, r, w.limit(), used));
                }
            }
        }
        out
    }
}

/// `N/s`, `N/min`, `N/h` or `N/d`.
pub fn rate_text(r: Rate) -> String {
    let unit = match r.per.as_secs() {
        1 => "s",
        60 => "min",
        3600 => "h",
        86_400 => "d",
        _ => return format!("{}/{}s", r.n, r.per.as_secs()),
    };
    format!("{}/{unit}", r.n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(n: u32, per_ms: u64) -> Rate {
        Rate {
            n,
            per: Duration::from_millis(per_ms),
        }
    }

    #[test]
    fn n_calls_pass_then_the_next_waits_for_the_oldest_slot() {
        let t0 = Instant::now();
        let mut w = Window::new(rate(3, 60_000), t0);
        for i in 0..3 {
            assert_eq!(w.try_acquire(t0 + Duration::from_secs(i)), Ok(()));
        }
        let wait = w.try_acquire(t0 + Duration::from_secs(10)).unwrap_err();
        // The first call's slot (0-3 s) leaves at 63 s: 53 s from the refused call.
        assert_eq!(wait, Duration::from_secs(53));
        assert!(w.try_acquire(t0 + Duration::from_secs(63)).is_ok());
        assert_eq!(
            w.used(t0 + Duration::from_secs(63)),
            1,
            "the first three have left"
        );
    }

    #[test]
    fn every_documented_rate_is_found_for_its_calls() {
        let config = crate::config::Config::from_toml(
            "[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\n",
            "t.toml",
            None,
        )
        .unwrap()
        .config;
        let limiter = Limiter::new(&config.limits, &config.apps, None, None);
        for api in platform::APIS.iter().filter(|a| a.rate.is_some()) {
            let path: Vec<&str> = api
                .path
                .split('/')
                .map(|s| if s.starts_with('{') { "x-1" } else { s })
                .collect();
            let path = path.join("/");
            let method = http::Method::from_bytes(api.method.as_bytes()).unwrap();
            let i = limiter
                .rule_for(&method, &path)
                .unwrap_or_else(|| panic!("{path}"));
            let rule = &limiter.rules()[i];
            assert!(platform::path_matches(&rule.pattern, &path), "{path}");
            assert_eq!(rule.method, api.method);
            // An empty segment is not a value for {x}.
            if api.path.contains('{') {
                let empty = path.replace("x-1", "");
                assert_ne!(limiter.rule_for(&method, &empty), Some(i), "{empty}");
            }
        }
    }

    #[test]
    fn memory_does_not_grow_with_the_limit() {
        let t0 = Instant::now();
        let mut w = Window::new(rate(100_000, 3_600_000), t0);
        for i in 0..100_000u64 {
            assert!(w.try_acquire(t0 + Duration::from_micros(i * 10)).is_ok());
        }
        assert!(w.try_acquire(t0 + Duration::from_secs(2)).is_err());
        assert!(std::mem::size_of::<Window>() < 160);
    }
}
