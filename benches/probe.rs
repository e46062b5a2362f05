//! The rejection probe on the answer every forwarded call gets: a 1 KiB JSON body with a
//! declared length, read and checked for its `err_code` (SPEC section 4.6).
//!
//! Run: `cargo bench --bench probe`. Recorded on a 2 vCPU AMD EPYC KVM guest, 2026-12-04,
//! alternating with the probe before it (which read only JSON with a declared length): this
//! probe ~474 and ~564 ns, the one before ~468, 447, 511 and 556 ns. The common case costs
//! what it did.

use std::hint::black_box;
use std::time::Duration;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion};
use cx_proxy::proxy::probe::probe;
use cx_proxy::upstream::Body;
use http::Response;

fn answer(body: &Bytes) -> Response<Body> {
    Response::builder()
        .header("content-type", "application/json; charset=utf-8")
        .header("content-length", body.len())
        .body(Body::full(body.clone()))
        .expect("static response")
}

fn bench(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut text = String::from(r#"{"err_code":0,"err_msg":"success","data":{"items":["#);
    while text.len() < 1000 {
        text.push_str(r#"{"chat_id":"c-0001","name":"group"},"#);
    }
    text.push_str(r#"{}]}}"#);
    let body = Bytes::from(text);
    c.bench_function("probe/plain_json_1k", |b| {
        b.to_async(&rt).iter(|| async {
            let (resp, code) = probe(black_box(answer(&body)), Duration::from_secs(30))
                .await
                .expect("probe");
            black_box((resp, code))
        })
    });
}

criterion_group!(benches, bench);
criterion_main!(benches);
