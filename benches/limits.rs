//! The cost the call limits add per request (issue 13): finding the rule (a call no rule
//! counts pays this only), and for a counted call one `Window::try_acquire` under its rule's
//! own mutex, uncontended, without Redis (`counted_call_admitted_local` is both). Run:
//! `cargo bench --bench limits`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use cx_proxy::config::Config;
use cx_proxy::limits::{Limiter, Window};
use cx_proxy::platform::Rate;

fn bench(c: &mut Criterion) {
    let rate = Rate {
        n: u32::MAX,
        per: Duration::from_secs(3600),
    };
    let window = Mutex::new(Window::new(
        rate,
        Duration::from_millis(100),
        Instant::now(),
    ));
    c.bench_function("window_try_acquire_with_room", |b| {
        b.iter(|| {
            let now = Instant::now();
            let mut w = window.lock().unwrap_or_else(|p| p.into_inner());
            std::hint::black_box(w.try_acquire(now)).ok();
        })
    });
    let full = Mutex::new(Window::new(
        Rate {
            n: 0,
            per: Duration::from_secs(1),
        },
        Duration::from_millis(100),
        Instant::now(),
    ));
    c.bench_function("window_try_acquire_full", |b| {
        b.iter(|| {
            let now = Instant::now();
            let mut w = full.lock().unwrap_or_else(|p| p.into_inner());
            std::hint::black_box(w.try_acquire(now)).ok();
        })
    });
}

fn lookup(c: &mut Criterion) {
    let config = Config::from_toml(
        "[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\nprefix = \"/\"\n",
        "bench.toml",
        None,
    )
    .expect("config")
    .config;
    let limiter = Limiter::new(&config.limits, &config.apps, None, None);
    let get = http::Method::GET;
    c.bench_function("rule_for_no_rule", |b| {
        b.iter(|| std::hint::black_box(limiter.rule_for(&get, "/api/apps/v1/robot/groups")))
    });
    c.bench_function("rule_for_built_in_rule", |b| {
        b.iter(|| std::hint::black_box(limiter.rule_for(&get, "/api/apps/v1/robot/chats/c-1")))
    });
    // What a counted call adds before it is forwarded, without Redis: the lookup and a slot
    // taken under the rule's own mutex (a rate high enough never to be full).
    let config = Config::from_toml(
        "[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\n\
         [[limits.rule]]\nmethod = \"GET\"\npath = \"/api/apps/v1/robot/chats/{chat_id}\"\n\
         rate = \"4000000000/s\"\n",
        "bench.toml",
        None,
    )
    .expect("config")
    .config;
    let limiter = Limiter::new(&config.limits, &config.apps, None, None);
    c.bench_function("counted_call_admitted_local", |b| {
        b.iter(|| {
            let rule = limiter
                .rule_for(&get, "/api/apps/v1/robot/chats/c-1")
                .expect("rule");
            std::hint::black_box(limiter.try_admit(0, rule))
        })
    });
}

criterion_group!(benches, bench, lookup);
criterion_main!(benches);
