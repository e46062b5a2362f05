//! Call limits kept at the gateway (SPEC section 4.9, PLATFORM.md section 3): at most `n`
//! calls in *any* sliding window of length `per`, with memory that does not grow with `n`.
//!
//! A [`Window`] counts calls per slot of `per / SLOTS` (rounded up) in a ring of
//! `SLOTS + 1` counters, and keeps for each slot the time of its latest call. A call at time
//! `t` is admitted when the calls of the slots whose latest call is within `(t - per, t]`
//! number fewer than `n`. The current slot and the `SLOTS` before it cover that span and a
//! little more; a slot counts whole until its latest call has left the window, which is
//! what makes the limit hold for every window, not only for windows aligned to slots. The
//! price: a call early in a slot is held until the slot's latest call leaves, so a window
//! may free up to one slot (5 %) later than an exact log of call times would; a burst (all
//! its calls at once) frees exactly on time. An exact log would need `n` timestamps per
//! rule (100,000 for a 100,000-an-hour rule); this needs 21 counters and 21 times.
//!
//! A full window says when its oldest counted slot leaves, which is when a call can next
//! be admitted: the wait of `max_wait_ms` and the `Retry-After` of a 429.
//!
//! With `[token.store]` the windows are counted cluster-wide in its Redis, in the same slot
//! scheme, by one Lua script per call (`TokenStore::take_slot`). A call is admitted when both
//! the shared window and this instance's own have room, and counted in both: the shared one
//! holds the cluster to `n`, and the instance's own still holds the calls it passed alone
//! while Redis was unreachable, so sharing that resumes cannot add a second `n` on top.
//! When the store is unreachable each instance counts alone (and so each holds the whole
//! limit); counted calls do not wait on Redis then, a background probe finds it back.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::auth::store::{self, TokenStore};
use crate::config::{AppConfig, LimitsConfig};
use crate::platform::{self, Rate};

use crate::platform::{is_placeholder, MAX_PATTERN_SEGMENTS as MAX_SEGMENTS};

/// Slots per window.
pub const SLOTS: u32 = 20;
const RING: usize = SLOTS as usize + 1;

/// One rule's window for one app.
#[derive(Debug, Clone)]
pub struct Window {
    n: u32,
    /// The rule's period plus the transit margin: how long a counted call holds its place.
    per: Duration,
    /// `limits.margin_ms` (whole milliseconds, as configured), kept to tell a changed
    /// margin on reload.
    margin_ms: u32,
    slot: Duration,
    /// Calls per slot; slot number `s` lives at `s % RING`.
    counts: [u32; RING],
    /// Per slot: its latest call, nanoseconds after `origin` (meaningful where counted).
    latest: [u64; RING],
    /// The newest slot number the ring has been moved to.
    head: u64,
    /// Slot 0 starts here.
    origin: Instant,
}

impl Window {
    /// An empty window for `rate`, its slots counted from `origin`. Each call counted holds
    /// its place for `rate.per` plus `margin` (`limits.margin_ms`): the platform counts a
    /// call when it arrives, and one admitted here while a connection was still being
    /// opened can arrive later than one admitted after it.
    pub fn new(rate: Rate, margin: Duration, origin: Instant) -> Self {
        let per = rate
            .per
            .saturating_add(margin)
            .max(Duration::from_millis(SLOTS.into()));
        // Rounded up, so that SLOTS slots span at least `per`.
        let nanos = per.as_nanos().div_ceil(u128::from(SLOTS));
        let slot = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        Window {
            n: rate.n,
            per,
            margin_ms: u32::try_from(margin.as_millis()).unwrap_or(u32::MAX),
            slot,
            counts: [0; RING],
            latest: [0; RING],
            head: 0,
            origin,
        }
    }

    /// The rule's `n`.
    pub fn limit(&self) -> u32 {
        self.n
    }

    /// Takes a new `n` (a reload changed the rule's count, not its period): the calls
    /// counted stay counted.
    pub fn set_limit(&mut self, n: u32) {
        self.n = n;
    }

    /// The same window under another margin (a reload changed `margin_ms`): a new ring,
    /// with every call the old one still counts placed at `now` under the latest of their
    /// times. That holds them at least as long as before; it may admit fewer, never more.
    pub fn remargin(&self, rate: Rate, margin: Duration, now: Instant) -> Window {
        let mut old = self.clone();
        let at = old.nanos_of(now);
        let s = old.slot_of(now).max(old.head);
        old.advance(s);
        let per = u64::try_from(old.per.as_nanos()).unwrap_or(u64::MAX);
        let live = |i: usize| old.counts[i] > 0 && at.saturating_sub(old.latest[i]) < per;
        let count: u32 = (0..RING).filter(|&i| live(i)).map(|i| old.counts[i]).sum();
        let latest = (0..RING).filter(|&i| live(i)).map(|i| old.latest[i]).max();
        let since = latest.map_or(now, |l| old.origin + Duration::from_nanos(l));
        let mut w = Window::new(rate, margin, since.min(now));
        w.counts[0] = count;
        w
    }

    /// The margin the window was made with.
    pub fn margin(&self) -> Duration {
        Duration::from_millis(self.margin_ms.into())
    }

    fn nanos_of(&self, t: Instant) -> u64 {
        u64::try_from(t.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX)
    }

    fn slot_of(&self, t: Instant) -> u64 {
        self.nanos_of(t)
            / u64::try_from(self.slot.as_nanos())
                .unwrap_or(u64::MAX)
                .max(1)
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

    /// Calls in the window as of `now` (`at` nanoseconds after origin, in slot `s`), and
    /// how long until it has room when it has none.
    fn state(&self, s: u64, at: u64) -> (u32, Option<Duration>) {
        let per = u64::try_from(self.per.as_nanos()).unwrap_or(u64::MAX);
        // Oldest first: ring position s + 1 + j holds slot s - SLOTS + j.
        let slots = (0..RING as u64).map(|j| ((s + 1 + j) % RING as u64) as usize);
        let live = |i: usize| self.counts[i] > 0 && at.saturating_sub(self.latest[i]) < per;
        // The total needs no order: the ring as it lies, branch-free.
        let total: u32 = (0..RING)
            .map(|i| if live(i) { self.counts[i] } else { 0 })
            .sum();
        if total < self.n {
            return (total, None);
        }
        let mut left = total;
        for i in slots.filter(|&i| live(i)) {
            left -= self.counts[i];
            if left < self.n {
                // This slot leaves when its latest call is `per` old.
                return (total, Some(Duration::from_nanos(self.latest[i] + per - at)));
            }
        }
        // n = 0: never.
        (total, Some(Duration::MAX))
    }

    /// Calls counted in the window now.
    pub fn used(&mut self, now: Instant) -> u32 {
        let s = self.slot_of(now).max(self.head);
        self.advance(s);
        self.state(s, self.nanos_of(now)).0
    }

    /// Counts a call at `now`.
    fn count(&mut self, s: u64, at: u64) -> u64 {
        let i = (s % RING as u64) as usize;
        self.counts[i] = self.counts[i].saturating_add(1);
        self.latest[i] = self.latest[i].max(at);
        s
    }

    /// Counts a call at `now` if the window has room; else how long until it has.
    pub fn try_acquire(&mut self, now: Instant) -> Result<(), Duration> {
        self.reserve(now).map(drop)
    }

    /// [`Window::try_acquire`] that names the slot counted, so that the call can be taken
    /// back ([`Window::release`]) if another window refuses it.
    pub fn reserve(&mut self, now: Instant) -> Result<u64, Duration> {
        let s = self.slot_of(now).max(self.head);
        self.advance(s);
        let at = self.nanos_of(now);
        match self.state(s, at) {
            (_, None) => Ok(self.count(s, at)),
            (_, Some(wait)) => Err(wait),
        }
    }

    /// Takes back a call counted in slot `s` by [`Window::reserve`] (if the slot is still in
    /// the ring; its latest time stays, which only holds the slot longer).
    pub fn release(&mut self, s: u64) {
        if s + (RING as u64) > self.head {
            let i = (s % RING as u64) as usize;
            self.counts[i] = self.counts[i].saturating_sub(1);
        }
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
    /// `limits.margin_ms`, also allowed on top of a non-zero `max_wait`.
    margin: Duration,
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
    /// Per app: what makes it the same app across a reload (its identity at the platform).
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
        let built_in = rules.len();
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
                    .map(|seg| (!is_placeholder(seg)).then(|| seg.as_bytes().into()))
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
        // The most specific rule first (fewest `{x}` segments), a file's rule before a
        // built-in one as specific: a file rule for one chat is not hidden by the built-in
        // rule for every chat.
        for by_method in &mut index {
            for (_, candidates) in by_method.iter_mut() {
                candidates.sort_by_key(|&i| {
                    let vars = segments[i].iter().filter(|s| s.is_none()).count();
                    (vars, i < built_in)
                });
            }
        }
        let now = Instant::now();
        // An app's windows belong to its identity at the platform (which counts the calls),
        // not to its name here: a renamed app keeps them.
        let app_keys: Vec<String> = apps.iter().map(|a| a.fingerprint()).collect();
        let windows = app_keys
            .iter()
            .map(|key| {
                rules
                    .iter()
                    .map(|rule| {
                        previous
                            .and_then(|p| p.window_of(key, rule, config.margin, now))
                            .unwrap_or_else(|| {
                                Arc::new(Mutex::new(Window::new(rule.rate, config.margin, now)))
                            })
                    })
                    .collect()
            })
            .collect();
        // Instances configured alike name a window alike: the app's store prefix (its token
        // identity), the rule with its placeholders unnamed, and the period (the count is
        // passed with each call; a changed period starts a new window, as it does locally).
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
                                .map(|s| if is_placeholder(s) { "{}" } else { s })
                                .collect();
                            format!(
                                "{prefix}:limit:{} {}:{}s",
                                r.method,
                                pattern.join("/"),
                                r.rate.per.as_secs()
                            )
                        })
                        .collect()
                })
                .collect(),
        };
        Limiter {
            enabled: config.enabled,
            max_wait: config.max_wait,
            margin: config.margin,
            rules,
            index,
            segments,
            windows,
            app_keys,
            store,
            shared_keys,
        }
    }

    /// The window this generation keeps for app `key` and the same rule over the same
    /// period (a changed count applies to the calls already counted; a changed period
    /// needs other slots, and starts a new window; a changed margin moves the calls
    /// counted into a new ring, see [`Window::remargin`]).
    fn window_of(
        &self,
        key: &str,
        rule: &Rule,
        margin: Duration,
        now: Instant,
    ) -> Option<Arc<Mutex<Window>>> {
        let app = self.app_keys.iter().position(|k| k == key)?;
        let r = self.rules.iter().position(|o| {
            o.method == rule.method
                && o.rate.per == rule.rate.per
                && platform::same_pattern(&o.pattern, &rule.pattern)
        })?;
        let window = self.windows[app][r].clone();
        let mut w = lock(&window);
        if w.margin() != margin {
            *w = w.remargin(rule.rate, margin, now);
        }
        w.set_limit(rule.rate.n);
        drop(w);
        Some(window)
    }

    /// The rules in force.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// The rule counting `method` `path` (the path as forwarded), if any. HEAD is counted
    /// as GET (servers run the GET handler for it). A path is matched in every spelling a
    /// lenient server would still serve, as [`platform::same_path`] reads token paths:
    /// percent-escapes decoded, `//` as `/`, a trailing `/` or a `;parameter` ignored,
    /// letters compared without case.
    pub fn rule_for(&self, method: &http::Method, path: &str) -> Option<usize> {
        if !self.enabled {
            return None;
        }
        let method = if method == http::Method::HEAD {
            &http::Method::GET
        } else {
            method
        };
        let (rule, odd) = self.matching(method, path.as_bytes(), false);
        // The common spelling missed; another is tried only when the path has one (found
        // in the same pass over its bytes, so a call no rule counts allocates nothing).
        match rule {
            Some(rule) => Some(rule),
            None if odd => self.matching(method, &lenient(path.as_bytes()), true).0,
            None => None,
        }
    }

    /// The first candidate (most specific first) whose pattern `path` matches, and whether
    /// `path` is spelt in a way [`lenient`] would change (an escape, a `;`, an upper-case
    /// letter, an empty segment after the first, or more segments than a rule has).
    fn matching(
        &self,
        method: &http::Method,
        path: &[u8],
        any_case: bool,
    ) -> (Option<usize>, bool) {
        // The path split once, without allocating.
        let mut segs: [&[u8]; MAX_SEGMENTS] = [&[]; MAX_SEGMENTS];
        let (mut n, mut start, mut odd) = (0, 0, false);
        for (i, &b) in path.iter().enumerate() {
            if b == b'/' {
                let Some(seg) = segs.get_mut(n) else {
                    return (None, true);
                };
                *seg = &path[start..i];
                odd |= n > 0 && start == i;
                n += 1;
                start = i + 1;
            } else {
                odd |= ODD[usize::from(b)];
            }
        }
        let Some(seg) = segs.get_mut(n) else {
            return (None, true);
        };
        *seg = &path[start..];
        odd |= n > 0 && start == path.len();
        n += 1;
        let Some((_, candidates)) = self
            .index
            .get(n)
            .and_then(|by| by.iter().find(|(m, _)| m == method))
        else {
            return (None, odd);
        };
        // Last segment first: patterns share their leading `/api/apps/v1`, so a path that
        // no rule counts is told apart at its end.
        let rule = candidates.iter().copied().find(|&i| {
            self.segments[i]
                .iter()
                .zip(&segs[..n])
                .rev()
                .all(|(want, got)| match want {
                    Some(literal) if any_case => literal.eq_ignore_ascii_case(got),
                    Some(literal) => **literal == **got,
                    None => !got.is_empty(),
                })
        });
        (rule, odd)
    }

    /// Whether windows are counted in the shared store now (it is configured and up): a
    /// counted call then goes through [`Limiter::admit`]. While it is down, this starts a
    /// background probe now and then, and counted calls do not wait on it.
    pub fn shared(&self) -> bool {
        let Some(store) = &self.store else {
            return false;
        };
        if store.up() {
            return true;
        }
        store.probe_if_due();
        false
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
    /// `Err` when there is none by then (SPEC section 4.9). While the shared store answers,
    /// the call needs room in both its window there and this instance's own.
    pub async fn admit(&self, app: usize, rule: usize) -> Result<(), Limited> {
        let Some(window) = self.windows.get(app).and_then(|w| w.get(rule)) else {
            return Ok(());
        };
        // The margin is the platform's allowance, not the client's wait: a call that would
        // find room within `max_wait_ms` without it still waits for room with it (at `5/s`
        // a burst of ten still passes, its second five 1.1 s later). `0` stays "never wait".
        let allowed = match self.max_wait.is_zero() {
            true => Duration::ZERO,
            false => self.max_wait.saturating_add(self.margin),
        };
        let deadline = Instant::now() + allowed;
        loop {
            // One `now` for the reservation and the deadline: a call told to wait exactly
            // what is left of `max_wait_ms` waits.
            let now = Instant::now();
            let reserved = lock(window).reserve(now);
            let wait = match reserved {
                Err(wait) => wait,
                Ok(slot) => match self.take_shared(app, rule, window).await {
                    None | Some(Ok(())) => return Ok(()),
                    Some(Err(wait)) => {
                        lock(window).release(slot);
                        wait
                    }
                },
            };
            if wait > deadline.saturating_duration_since(now) {
                let r = &self.rules[rule];
                return Err(Limited {
                    rule: r.label(),
                    rate: r.rate.to_string(),
                    retry_after: wait,
                });
            }
            tokio::time::sleep(wait).await;
        }
    }

    /// A slot in the shared window, when the store is configured and up; `None` to count
    /// in this instance's window alone.
    async fn take_shared(
        &self,
        app: usize,
        rule: usize,
        window: &Mutex<Window>,
    ) -> Option<Result<(), Duration>> {
        let store = self.store.as_deref().filter(|s| s.up())?;
        let key = self.shared_keys.get(app)?.get(rule)?;
        let n = lock(window).limit();
        let (per, layout) = shared_layout(self.rules[rule].rate.per, self.margin);
        let taken = store.take_slot(key, n, per, layout).await.ok()?;
        Some(taken.map(drop))
    }
}

/// A shared window's layout for a rule of period `per` under `margin`: how long a call
/// counts (`per + margin`), and (slot length, slots read, slots kept). The slots are
/// numbered by the period alone, so instances with other margins, and a reload that
/// changes one, count in the same slots; counts are kept for at least two periods, so an
/// instance with a margin up to the period still finds the slots another has passed.
fn shared_layout(per: Duration, margin: Duration) -> (Duration, (Duration, u32, u32)) {
    let base = per.max(Duration::from_millis(SLOTS.into()));
    let nanos = base.as_nanos().div_ceil(u128::from(SLOTS));
    let slot = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX))
        .max(Duration::from_micros(1));
    let live = base.saturating_add(margin);
    let slots = u32::try_from(live.as_nanos().div_ceil(slot.as_nanos())).unwrap_or(u32::MAX);
    (live, (slot, slots, slots.max(2 * SLOTS)))
}

/// Bytes that make a path spelling one [`lenient`] would change: `%`, `;`, `A`-`Z`.
static ODD: [bool; 256] = {
    let mut t = [false; 256];
    t[b'%' as usize] = true;
    t[b';' as usize] = true;
    let mut c = b'A';
    while c <= b'Z' {
        t[c as usize] = true;
        c += 1;
    }
    t
};

/// `path` as a lenient server reads it: percent-escapes decoded (but for `%2F`, which stays
/// inside its segment), runs of `/` as one, `;parameters` of a segment and a trailing `/`
/// dropped. Case is left to the comparison.
fn lenient(path: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(path.len());
    let mut i = 0;
    let mut in_params = false;
    while let Some(&b) = path.get(i) {
        i += 1;
        if b == b'/' {
            in_params = false;
            if out.last() != Some(&b'/') {
                out.push(b'/');
            }
            continue;
        }
        if in_params || b == b';' {
            in_params = true;
            continue;
        }
        let hex = |h: Option<&u8>| h.and_then(|h| (*h as char).to_digit(16));
        match (b, hex(path.get(i)), hex(path.get(i + 1))) {
            (b'%', Some(hi), Some(lo)) if hi * 16 + lo != u32::from(b'/') => {
                out.push((hi * 16 + lo) as u8);
                i += 2;
            }
            _ => out.push(b),
        }
    }
    if out.len() > 1 && out.ends_with(b"/") {
        out.pop();
    }
    out
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
        let mut w = Window::new(rate(3, 60_000), Duration::ZERO, t0);
        for i in 0..3 {
            assert_eq!(w.try_acquire(t0 + Duration::from_secs(i)), Ok(()));
        }
        let wait = w.try_acquire(t0 + Duration::from_secs(10)).unwrap_err();
        // The first slot (0-3 s) holds all three; its latest call (2 s) leaves at 62 s.
        assert_eq!(wait, Duration::from_secs(52));
        assert!(w.try_acquire(t0 + Duration::from_secs(62)).is_ok());
        assert_eq!(
            w.used(t0 + Duration::from_secs(62)),
            1,
            "the first three have left"
        );
    }

    #[test]
    fn a_burst_frees_exactly_one_window_later() {
        let t0 = Instant::now() + Duration::from_millis(37);
        let mut w = Window::new(rate(5, 1000), Duration::ZERO, Instant::now());
        for _ in 0..5 {
            assert!(w.try_acquire(t0).is_ok());
        }
        let asked = t0 + Duration::from_millis(1);
        assert_eq!(w.try_acquire(asked), Err(Duration::from_millis(999)));
        assert!(w.try_acquire(t0 + Duration::from_millis(1000)).is_ok());
    }

    #[test]
    fn a_call_holds_its_place_for_the_period_and_the_margin() {
        let t0 = Instant::now();
        let mut w = Window::new(rate(5, 1000), Duration::from_millis(100), t0);
        for _ in 0..5 {
            assert!(w.try_acquire(t0).is_ok());
        }
        // The platform may have counted the burst up to 100 ms late.
        assert_eq!(
            w.try_acquire(t0 + Duration::from_millis(1000)),
            Err(Duration::from_millis(100))
        );
        assert!(w.try_acquire(t0 + Duration::from_millis(1100)).is_ok());
    }

    #[test]
    fn a_changed_margin_keeps_the_calls_counted() {
        let t0 = Instant::now();
        let mut w = Window::new(rate(3, 60_000), Duration::ZERO, t0);
        for i in 0..3 {
            assert!(w.try_acquire(t0 + Duration::from_secs(i)).is_ok());
        }
        let now = t0 + Duration::from_secs(10);
        let mut moved = w.remargin(rate(3, 60_000), Duration::from_secs(1), now);
        assert_eq!(moved.used(now), 3);
        // Held from the latest call (2 s) for the period and the new margin: 63 s.
        assert_eq!(
            moved.try_acquire(now),
            Err(Duration::from_secs(53)),
            "full until 63 s"
        );
        assert!(moved.try_acquire(t0 + Duration::from_secs(63)).is_ok());
        // Calls that have left are not carried over.
        let later = t0 + Duration::from_secs(70);
        assert_eq!(
            w.remargin(rate(3, 60_000), Duration::ZERO, later)
                .used(later),
            0
        );
    }

    #[test]
    fn a_reserved_call_taken_back_frees_its_place() {
        let t0 = Instant::now();
        let mut w = Window::new(rate(1, 1000), Duration::ZERO, t0);
        let slot = w.reserve(t0).unwrap();
        assert!(w.try_acquire(t0).is_err());
        w.release(slot);
        assert!(w.try_acquire(t0).is_ok());
    }

    fn limiter(rules: &str) -> Limiter {
        let config = crate::config::Config::from_toml(
            &format!(
                "[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\n{rules}"
            ),
            "t.toml",
            None,
        )
        .unwrap()
        .config;
        Limiter::new(&config.limits, &config.apps, None, None)
    }

    #[test]
    fn every_spelling_a_lenient_server_serves_is_counted_and_head_as_get() {
        let l = limiter("");
        let get = http::Method::GET;
        let export = l.rule_for(&get, "/api/apps/address-book/v1.0/all").unwrap();
        for spelling in [
            "/api/apps/address-book/v1.0/all/",
            "/api/apps//address-book/v1.0/all",
            "/api/apps/address-book/v1.0/%61ll",
            "/api/apps/address-book/v1%2E0/all",
            "/api/APPS/address-book/v1.0/all",
            "/api/apps/address-book/v1.0/all;jsessionid=1",
        ] {
            assert_eq!(l.rule_for(&get, spelling), Some(export), "{spelling}");
        }
        assert_eq!(
            l.rule_for(&http::Method::HEAD, "/api/apps/address-book/v1.0/all"),
            Some(export)
        );
        assert_eq!(l.rule_for(&get, "/api/apps/address-book/v1.0/al"), None);
        assert_eq!(
            l.rule_for(&get, "/api/apps/address-book/v1.0/all%2Fx"),
            None
        );
    }

    #[test]
    fn the_most_specific_rule_wins_and_a_file_rule_over_a_built_in_one() {
        let l = limiter(
            "[[limits.rule]]\nmethod = \"GET\"\npath = \"/api/apps/v1/robot/chats/hot\"\nrate = \"1/min\"\n",
        );
        let get = http::Method::GET;
        let hot = l.rule_for(&get, "/api/apps/v1/robot/chats/hot").unwrap();
        assert_eq!(l.rules()[hot].pattern, "/api/apps/v1/robot/chats/hot");
        let other = l.rule_for(&get, "/api/apps/v1/robot/chats/c-1").unwrap();
        assert_eq!(
            l.rules()[other].pattern,
            "/api/apps/v1/robot/chats/{chat_id}"
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
        let mut w = Window::new(rate(100_000, 3_600_000), Duration::ZERO, t0);
        for i in 0..100_000u64 {
            assert!(w.try_acquire(t0 + Duration::from_micros(i * 10)).is_ok());
        }
        assert!(w.try_acquire(t0 + Duration::from_secs(2)).is_err());
        assert!(std::mem::size_of::<Window>() <= 320);
    }
}
