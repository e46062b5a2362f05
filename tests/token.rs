//! The token as clients notice it: fetched once however many ask, never used expired, and a
//! failed fetch explained in the proxy's JSON error.

mod support;

use std::time::Duration;

use cx_proxy::clock::ManualClock;
use cx_proxy::sandbox::SandboxOptions;
use support::*;

#[tokio::test]
async fn sixty_four_concurrent_first_requests_cause_one_token_fetch() {
    let env = env().await;
    // A slow token endpoint makes sure all 64 are waiting while the one fetch runs.
    env.sandbox.set_token_delay(Duration::from_millis(300));
    let url = env.url("/api/apps/v1/sso/user?oauth_code=c1");
    for a in get_concurrently(&url, 64).await {
        assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    }
    assert_eq!(env.sandbox.token_fetches(APP_KEY), 1);
    assert_eq!(env.sandbox.recorded().len(), 64);
}

#[tokio::test]
async fn a_failing_token_endpoint_gives_502_with_the_platforms_code_and_message() {
    // The warm-up fetch at startup and the request's own fetch both fail.
    let env = EnvBuilder::new()
        .prepare(|s| s.fail_token_fetches(2, 50001, "system busy, try later"))
        .start()
        .await;
    let a = get(&env.url("/api/x")).await;
    let v = assert_proxy_error(&a, 502, "token_unavailable");
    assert_eq!(v["err_code"], 990510);
    let msg = v["err_msg"].as_str().unwrap();
    assert!(
        msg.contains("50001") && msg.contains("system busy, try later"),
        "{msg}"
    );
    assert!(
        env.sandbox.recorded().is_empty(),
        "no call went out without a token"
    );
    // Failures are not cached: the next request fetches again and succeeds.
    let a = get(&env.url("/api/x")).await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    assert_eq!(env.sandbox.token_fetches(APP_KEY), 3);
}

#[tokio::test]
async fn a_wrong_secret_is_reported_without_the_secret() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let app = default_app(dir.path());
    let text = config_text(&sandbox, dir.path(), &app);
    std::fs::write(dir.path().join("corp_secret"), "wrong-secret-value").unwrap();
    let proxy = cx_proxy::ProxyHandle::start(config(&text)).await.unwrap();
    let a = get(&format!("http://{}/api/x", proxy.addr)).await;
    let v = assert_proxy_error(&a, 502, "token_unavailable");
    assert!(v["err_msg"].as_str().unwrap().contains("40001"), "{v}");
    assert!(!a.text().contains("wrong-secret-value"));
}

#[tokio::test]
async fn an_expired_token_is_replaced_before_use() {
    let clock = ManualClock::new();
    let env = env_with(
        SandboxOptions {
            expires_in: Duration::from_secs(7200),
            ..Default::default()
        },
        "",
        Some(clock.clone()),
    )
    .await;
    assert_eq!(get(&env.url("/api/x")).await.json()["err_code"], 0);
    assert_eq!(get(&env.url("/api/x")).await.json()["err_code"], 0);
    assert_eq!(env.sandbox.token_fetches(APP_KEY), 1, "cached");
    clock.advance(Duration::from_secs(7201));
    assert_eq!(get(&env.url("/api/x")).await.json()["err_code"], 0);
    assert_eq!(
        env.sandbox.token_fetches(APP_KEY),
        2,
        "refetched after expiry"
    );
    let seen = env.sandbox.recorded();
    assert_ne!(
        seen[1].token, seen[2].token,
        "the expired token was not sent again"
    );
}

#[tokio::test]
async fn a_request_waits_no_longer_than_timeout_ms_for_a_token() {
    // The start-up fetch hangs: the request joins the wait and gets 502 at timeout_ms, not
    // after the refresher's fetch and then its own have both timed out.
    let dir = tempfile::tempdir().unwrap();
    let s = sandbox(dir.path(), SandboxOptions::default()).await;
    s.set_token_delay(Duration::from_secs(10));
    let text = set(
        &config_text(&s, dir.path(), &default_app(dir.path())),
        "upstream.timeout_ms",
        500,
    );
    let proxy = cx_proxy::ProxyHandle::start(config(&text)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = std::time::Instant::now();
    let a = get(&format!("http://{}/api/x", proxy.addr)).await;
    let waited = started.elapsed();
    assert_proxy_error(&a, 502, "token_unavailable");
    assert!(waited < Duration::from_millis(900), "waited {waited:?}");
}
