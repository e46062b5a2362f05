//! The upstream connection pool: HTTP/1 connections are reused, also after answers without a
//! body, stay within `max_connections`, and one the upstream closed while idle is replaced
//! without the client noticing; an h2 upstream multiplexes calls on one connection, and when
//! it cuts that connection a burst of calls opens one new one.

mod support;

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use cx_proxy::sandbox::ca::TestCa;
use cx_proxy::sandbox::SandboxOptions;
use http::{Method, Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use support::*;

/// Asserts every answer is 200.
fn all_ok(answers: &[Answer]) {
    for a in answers {
        assert_eq!(a.status, 200, "{}", a.text());
    }
}
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;

fn h1_sandbox() -> SandboxOptions {
    SandboxOptions {
        h1_only: true,
        ..Default::default()
    }
}

#[tokio::test]
async fn http1_connections_are_reused_also_after_answers_without_a_body() {
    // With no rejection codes to look for, the proxy never reads a body itself.
    let env = EnvBuilder::new()
        .sandbox(h1_sandbox())
        .set("token.invalid_codes", toml::Value::Array(Vec::new()))
        .start()
        .await;
    let client = client(false);
    for i in 0..30 {
        // HEAD answers carry a length but no body: nothing reads them, yet the connection
        // must go back to the pool.
        let method = if i % 2 == 0 {
            Method::HEAD
        } else {
            Method::GET
        };
        let a = send(&client, request(method, &env.url("/api/robot/groups"), "")).await;
        assert_eq!(a.status, 200, "{}", a.text());
    }
    // The token fetch and all 30 calls, one after another: one connection.
    assert_eq!(env.sandbox.connections_accepted(), 1);
}

#[tokio::test]
async fn concurrent_calls_open_no_more_than_max_connections() {
    let env = EnvBuilder::new()
        .sandbox(h1_sandbox())
        .set("upstream.max_connections", 3)
        .start()
        .await;
    assert_eq!(get(&env.url("/api/warm")).await.status, 200);
    env.sandbox.set_api_delay(Duration::from_millis(50));
    all_ok(&get_concurrently(&env.url("/api/x"), 40).await);
    let opened = env.sandbox.connections_accepted();
    assert!(
        (1..=3).contains(&opened),
        "{opened} upstream connections for max_connections = 3"
    );
}

#[tokio::test]
async fn a_slow_upstream_gets_the_connections_its_latency_needs_and_no_more() {
    let env = EnvBuilder::new().sandbox(h1_sandbox()).start().await;
    assert_eq!(get(&env.url("/api/warm")).await.status, 200);
    // 24 calls at once to an upstream that takes 300 ms each: one connection would take
    // 7.2 s; the pool grows (waiting 20 ms before each step, doubling) to serve them in a
    // few rounds.
    env.sandbox.set_api_delay(Duration::from_millis(300));
    let started = std::time::Instant::now();
    all_ok(&get_concurrently(&env.url("/api/x"), 24).await);
    let took = started.elapsed();
    let opened = env.sandbox.connections_accepted();
    assert!(
        took < Duration::from_millis(2500),
        "24 calls of 300 ms took {took:?} on {opened} connections"
    );
    // Never more connections than calls in flight (the warm-up's one included).
    assert!((4..=25).contains(&opened), "{opened} connections");
}

#[tokio::test]
async fn a_fast_upstream_is_served_by_fewer_connections_than_clients() {
    let env = EnvBuilder::new().sandbox(h1_sandbox()).start().await;
    assert_eq!(get(&env.url("/api/warm")).await.status, 200);
    // 64 clients at once, five times over, to an upstream that answers at once: a call
    // waits for a busy connection rather than opening one of its own (the pool used to open
    // one per call in flight).
    for _ in 0..5 {
        all_ok(&get_concurrently(&env.url("/api/x"), 64).await);
    }
    let opened = env.sandbox.connections_accepted();
    assert!(opened < 64, "{opened} connections for 64 clients");
}

#[tokio::test]
async fn an_h2_upstream_gets_a_second_connection_only_past_100_streams() {
    let env = EnvBuilder::new().start().await;
    assert_eq!(get(&env.url("/api/warm")).await.status, 200);
    env.sandbox.set_api_delay(Duration::from_millis(300));
    all_ok(&get_concurrently(&env.url("/api/x"), 90).await);
    assert_eq!(env.sandbox.connections_accepted(), 1, "90 streams on one");
    all_ok(&get_concurrently(&env.url("/api/x"), 150).await);
    assert_eq!(env.sandbox.connections_accepted(), 2, "150 streams on two");
}

/// How the test upstream drops connections.
#[derive(Clone, Copy)]
enum Closing {
    /// HTTP/1.1, closed after this long without a request (no `Connection: close` warning),
    /// like servers' keep-alive timeouts.
    Http1Idle(Duration),
    /// h2, cut this long after it was accepted, whatever is in flight.
    H2After(Duration),
}

/// An HTTPS upstream that drops connections as `closing` says, answers every request with
/// the platform's success JSON and counts connections.
async fn closing_upstream(
    dir: &std::path::Path,
    closing: Closing,
) -> (std::net::SocketAddr, Arc<AtomicU64>) {
    let ca = TestCa::new("pool test CA").unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let mut tls = (*ca.server_config().unwrap()).clone();
    tls.alpn_protocols = match closing {
        Closing::Http1Idle(_) => vec![b"http/1.1".to_vec()],
        Closing::H2After(_) => vec![b"h2".to_vec()],
    };
    let acceptor = TlsAcceptor::from(Arc::new(tls));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicU64::new(0));
    let count = accepted.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let service = hyper::service::service_fn(|req: Request<Incoming>| async move {
                    let body = if req.uri().path().ends_with("/access-tokens") {
                        r#"{"err_code":0,"err_msg":"success","access_token":"tok-1","expires_in":7200}"#
                    } else {
                        r#"{"err_code":0,"err_msg":"success","data":{}}"#
                    };
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(
                        body.as_bytes(),
                    ))))
                });
                match closing {
                    Closing::Http1Idle(idle) => {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(idle)
                            .serve_connection(TokioIo::new(tls), service)
                            .await;
                    }
                    Closing::H2After(after) => {
                        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                            .serve_connection(TokioIo::new(tls), service);
                        let _ = tokio::time::timeout(after, conn).await;
                    }
                }
            });
        }
    });
    (addr, accepted)
}

#[tokio::test]
async fn a_connection_the_upstream_closed_while_idle_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, accepted) =
        closing_upstream(dir.path(), Closing::Http1Idle(Duration::from_millis(100))).await;
    let proxy = proxy_for(dir.path(), addr).await;
    let url = format!("http://{}/api/x", proxy.addr);
    for round in 0..3 {
        let a = get(&url).await;
        assert_eq!(a.status, 200, "round {round}: {}", a.text());
        assert_eq!(a.json()["err_code"], 0);
        // Long enough for the upstream to drop the idle connection.
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    assert!(
        accepted.load(Ordering::SeqCst) >= 3,
        "each round needed a fresh connection"
    );
    assert_metrics(&proxy, "cx_proxy_upstream_errors_total{", false);
}

#[tokio::test]
async fn when_an_h2_upstream_drops_its_connection_one_reconnect_serves_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, accepted) =
        closing_upstream(dir.path(), Closing::H2After(Duration::from_millis(300))).await;
    let proxy = proxy_for(dir.path(), addr).await;
    let url = format!("http://{}/api/x", proxy.addr);
    assert_eq!(get(&url).await.status, 200);
    // The upstream has cut that connection; 30 calls arrive at once.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let before = accepted.load(Ordering::SeqCst);
    all_ok(&get_concurrently(&url, 30).await);
    assert_eq!(
        accepted.load(Ordering::SeqCst) - before,
        1,
        "one new connection for the whole burst"
    );
}

/// A proxy with the default app in front of the test upstream at `addr` (CA in `dir`).
async fn proxy_for(dir: &std::path::Path, addr: std::net::SocketAddr) -> cx_proxy::ProxyHandle {
    std::fs::write(dir.join("corp_secret"), SECRET).unwrap();
    let text = format!(
        r#"
[server]
listen = "127.0.0.1:0"

[upstream]
url = "https://127.0.0.1:{port}"
ca_file = "{ca}"
timeout_ms = 5000
{app}"#,
        port = addr.port(),
        ca = dir.join("ca.pem").display(),
        app = default_app(dir),
    );
    cx_proxy::ProxyHandle::start(config(&text)).await.unwrap()
}

#[tokio::test]
async fn an_h2_upstream_carries_concurrent_calls_on_one_connection() {
    let env = EnvBuilder::new().start().await;
    assert_eq!(get(&env.url("/api/warm")).await.status, 200);
    env.sandbox.set_api_delay(Duration::from_millis(50));
    all_ok(&get_concurrently(&env.url("/api/x"), 40).await);
    // The sandbox speaks h2: the token fetch and 40 overlapping calls share one connection.
    assert_eq!(env.sandbox.connections_accepted(), 1);
}
