//! The cost a call-limit rule adds to a matching call without Redis (issue 13): one
//! `Window::try_acquire` under its rule's own mutex, uncontended. Run: `cargo bench --bench
//! limits`.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use cx_proxy::limits::Window;
use cx_proxy::platform::Rate;

fn bench(c: &mut Criterion) {
    let rate = Rate {
        n: u32::MAX,
        per: Duration::from_secs(3600),
    };
    let window = Mutex::new(Window::new(rate, Instant::now()));
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

criterion_group!(benches, bench);
criterion_main!(benches);
