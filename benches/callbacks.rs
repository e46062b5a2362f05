//! Verified-and-committed callbacks per second and acknowledgement latency (issue 12's
//! headroom figure; the platform sends far fewer). A relay on loopback with its queue on the
//! temp folder's disk (WAL, `synchronous = FULL`), a receiver taking the deliveries at the
//! same time, and `CONCURRENCY` senders posting signed callbacks until `TOTAL` are
//! acknowledged. Each acknowledgement means "committed to disk".
//!
//! Run: `cargo bench --bench callbacks` (bounded: `TOTAL` callbacks, then it stops).
//! Prints callbacks/s and ack latency p50 / p99 / max; the README records a run.

use std::time::{Duration, Instant};

use bytes::Bytes;
use cx_proxy::relay::verify::{base_string, members, sign, Signed};
use cx_proxy::sandbox::receiver::Receiver;
use cx_proxy::sandbox::{Sandbox, SandboxOptions};
use cx_proxy::{Config, ProxyHandle};
use http_body_util::Full;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

const TOTAL: usize = 4000;
const CONCURRENCY: usize = 20;
const KEY: &str = "bench-key";

fn main() {
    // `cargo bench` passes flags such as `--bench`; this harness takes none.
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run());
}

async fn run() {
    let dir = tempfile::tempdir().expect("temp dir");
    let sandbox = Sandbox::start(SandboxOptions {
        state_dir: Some(dir.path().to_path_buf()),
        ..SandboxOptions::default()
    })
    .await
    .expect("sandbox");
    let receiver = Receiver::start("127.0.0.1:0".parse().expect("addr"))
        .await
        .expect("receiver");
    std::fs::write(dir.path().join("secret"), "demo-secret").expect("secret");
    std::fs::write(dir.path().join("key"), KEY).expect("key");
    let d = dir.path().display();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"{}\"\nca_file = \"{d}/ca.pem\"\n\
         [callbacks]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]\nqueue = \"{d}/queue.db\"\n\
         [[callback]]\nname = \"contacts\"\npath = \"/cb\"\napp = \"a\"\nkey_file = \"{d}/key\"\n\
         deliver_to = \"{}\"\n\
         [[app]]\nname = \"a\"\napp_key = \"demo-app\"\ncorp_id = 10001\ncorp_secret_file = \"{d}/secret\"\nprefix = \"/\"\n",
        sandbox.url(),
        receiver.url("/events"),
    );
    let config = Config::from_toml(&text, "bench.toml", None)
        .expect("config")
        .config;
    let proxy = ProxyHandle::start(config).await.expect("proxy");
    let base = format!("http://{}/cb", proxy.callbacks_addr.expect("callbacks"));
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();

    let started = Instant::now();
    let mut tasks = Vec::with_capacity(CONCURRENCY);
    for worker in 0..CONCURRENCY {
        let (client, base) = (client.clone(), base.clone());
        tasks.push(tokio::spawn(async move {
            let mut latencies = Vec::with_capacity(TOTAL / CONCURRENCY);
            for i in 0..TOTAL / CONCURRENCY {
                let body = serde_json::json!({"event_type": "user_add", "user_ids": [format!("u{worker}-{i}")]});
                let mut s = Signed {
                    corpid: "10001".into(),
                    timestamp: now().to_string(),
                    nonce: format!("w{worker}-{i}"),
                    signature: String::new(),
                };
                s.signature = sign(
                    KEY.as_bytes(),
                    &base_string(&members(body.to_string().as_bytes()).expect("object"), &s),
                );
                let uri = format!(
                    "{base}?corpid={}&timestamp={}&nonce={}&signature={}",
                    s.corpid, s.timestamp, s.nonce, s.signature
                );
                let req = http::Request::post(uri)
                    .header("content-type", "application/json")
                    .body(Full::new(Bytes::from(body.to_string())))
                    .expect("request");
                let t = Instant::now();
                let resp = client.request(req).await.expect("answer");
                assert_eq!(resp.status(), 200, "acknowledged");
                latencies.push(t.elapsed());
            }
            latencies
        }));
    }
    let mut latencies = Vec::with_capacity(TOTAL);
    for t in tasks {
        latencies.extend(t.await.expect("sender"));
    }
    let elapsed = started.elapsed();
    latencies.sort();
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    println!(
        "callbacks: {TOTAL} acknowledged (committed) in {:.2} s with {CONCURRENCY} senders: {:.0}/s; \
         ack latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        elapsed.as_secs_f64(),
        TOTAL as f64 / elapsed.as_secs_f64(),
        pct(0.50).as_secs_f64() * 1e3,
        pct(0.99).as_secs_f64() * 1e3,
        latencies[latencies.len() - 1].as_secs_f64() * 1e3,
    );
    let delivered = receiver.wait_for(TOTAL, Duration::from_secs(120)).await;
    println!(
        "callbacks: {delivered} of {TOTAL} delivered to the receiver {:.2} s after the first was sent",
        started.elapsed().as_secs_f64()
    );
    proxy.shutdown().await.expect("shutdown");
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
