//! The token lifecycle as clients notice it: refreshed before expiry with nobody waiting,
//! replaced once when the platform rejects it, and never fetched past the per-minute cap.

mod support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cx_proxy::sandbox::{Reissue, SandboxOptions};
use http::Method;
use support::*;

#[tokio::test]
async fn steady_traffic_across_refreshes_never_fails_and_never_waits_on_a_fetch() {
    const FETCH_DELAY: Duration = Duration::from_millis(2000);
    let env = EnvBuilder::new()
        .sandbox(SandboxOptions {
            expires_in: Duration::from_secs(6),
            reissue: Reissue::New,
            ..Default::default()
        })
        .set("token.refresh_ahead_s", 3)
        .set("token.max_fetches_per_minute", 30)
        .prepare(|s| s.set_token_delay(FETCH_DELAY))
        .start()
        .await;
    env.ready().await;
    let fetches_before = env.sandbox.token_fetches(APP_KEY);
    let failures = Arc::new(AtomicU64::new(0));
    let slowest_us = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs(15);
    let workers: Vec<_> = (0..4)
        .map(|w| {
            let (c, url) = (
                client(false),
                env.url(&format!("/api/apps/v1/sso/user?oauth_code=worker-{w}")),
            );
            let (failures, slowest_us, done) = (failures.clone(), slowest_us.clone(), done.clone());
            tokio::spawn(async move {
                while Instant::now() < until {
                    let t = Instant::now();
                    let a = send(&c, request(Method::POST, &url, "{\"n\":1}")).await;
                    slowest_us.fetch_max(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    if t.elapsed() > Duration::from_millis(300) {
                        eprintln!(
                            "slow: {:?} ending at {:?} before the end",
                            t.elapsed(),
                            until.saturating_duration_since(Instant::now())
                        );
                    }
                    if a.status != 200 || a.json()["err_code"] != 0 {
                        eprintln!("failed: {} {}", a.status, a.text());
                        failures.fetch_add(1, Ordering::Relaxed);
                    }
                    done.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            })
        })
        .collect();
    for w in workers {
        w.await.unwrap();
    }
    let slowest = Duration::from_micros(slowest_us.load(Ordering::Relaxed));
    let fetches = env.sandbox.token_fetches(APP_KEY) - fetches_before;
    eprintln!(
        "{} requests, slowest {slowest:?}, {fetches} background fetches",
        done.load(Ordering::Relaxed)
    );
    assert!(done.load(Ordering::Relaxed) > 100);
    assert_eq!(failures.load(Ordering::Relaxed), 0);
    // A 6 s token cannot serve 15 s of traffic: it was rotated (every ~5 s: 3 s + the delay).
    assert!(
        fetches >= 2,
        "tokens were rotated in the background ({fetches} fetches in 15 s)"
    );
    assert!(
        slowest < FETCH_DELAY / 2,
        "a request waited on a fetch: slowest {slowest:?}"
    );
}

#[tokio::test]
async fn a_revoked_token_is_replaced_through_one_replay_with_the_body_intact() {
    let env = env().await;
    env.ready().await;
    let body = r#"{"staff_ids":["s1"],"msg_type":"text","text":{"content":"replayed once"}}"#;
    let url = env.url("/api/apps/v1/robot/staffs/message?x=1");
    let a = send(&client(false), request(Method::POST, &url, body)).await;
    assert_eq!(a.json()["err_code"], 0);
    let fetches = env.sandbox.token_fetches(APP_KEY);
    assert!(env.sandbox.revoke_all() > 0);

    let a = send(&client(false), request(Method::POST, &url, body)).await;
    assert_eq!(a.status, 200);
    assert_eq!(
        a.json()["err_code"],
        0,
        "the client never sees the rejection: {}",
        a.text()
    );
    assert_eq!(env.sandbox.token_fetches(APP_KEY), fetches + 1);
    let seen = env.sandbox.recorded();
    let (rejected, replay) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
    assert_eq!(rejected.token_status, "unknown");
    assert_eq!(replay.token_status, "valid");
    for r in [rejected, replay] {
        assert_eq!(r.method, Method::POST);
        assert_eq!(r.query, "x=1");
        assert_eq!(
            r.body_sha256,
            sha256(body.as_bytes()),
            "the body arrived intact both times"
        );
    }
    assert_metrics(
        &env.proxy,
        "cx_proxy_replays_total{app=\"default\"} 1",
        true,
    );
}

#[tokio::test]
async fn thirty_two_concurrent_rejections_of_one_token_cause_one_fetch() {
    let env = env().await;
    env.ready().await;
    let fetches = env.sandbox.token_fetches(APP_KEY);
    env.sandbox.revoke_all();
    for a in get_concurrently(&env.url("/api/x"), 32).await {
        assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    }
    assert_eq!(env.sandbox.token_fetches(APP_KEY), fetches + 1);
}

#[tokio::test]
async fn a_platform_rejecting_every_token_cannot_push_fetches_past_the_cap() {
    let env = EnvBuilder::new()
        .set("token.max_fetches_per_minute", 3)
        .start()
        .await;
    env.ready().await;
    env.sandbox.reject_all_tokens(true);
    let mut limited = None;
    for _ in 0..20 {
        let a = get(&env.url("/api/x")).await;
        if a.status == 502 {
            limited = Some(a);
        }
    }
    assert_eq!(
        env.sandbox.token_fetches(APP_KEY),
        3,
        "never more than the cap"
    );
    let a = limited.expect("some request met the cap");
    let v = assert_proxy_error(&a, 502, "token_unavailable");
    assert!(v["err_msg"].as_str().unwrap().contains("limit"), "{v}");
}

#[tokio::test]
async fn legacy_token_requests_are_answered_from_the_cache() {
    let env = env().await;
    env.ready().await;
    let fetches = env.sandbox.token_fetches(APP_KEY);
    let url = env.url(&format!(
        "/api/apps/v1/access-tokens?app_key={APP_KEY}&corp_id={CORP_ID}&corp_secret={SECRET}"
    ));
    let issued = env.sandbox.issued_tokens();
    for _ in 0..50 {
        let a = get(&url).await;
        assert_eq!(a.status, 200);
        let v = a.json();
        assert_eq!(v["err_code"], 0, "{v}");
        assert_eq!(
            v["access_token"],
            issued[0].as_str(),
            "the proxy's own token"
        );
        assert!(v["expires_in"].as_u64().unwrap() > 7000);
    }
    assert_eq!(
        env.sandbox.token_fetches(APP_KEY),
        fetches,
        "no fetch at the platform"
    );

    let wrong = env.url(&format!(
        "/api/apps/v1/access-tokens?app_key={APP_KEY}&corp_id={CORP_ID}&corp_secret=guess"
    ));
    let a = get(&wrong).await;
    let v = assert_proxy_error(&a, 401, "bad_credentials");
    assert!(
        !a.text().contains(SECRET) && !a.text().contains(&issued[0]),
        "{v}"
    );

    // An app the proxy does not know goes to the platform unchanged.
    let other = env.url("/api/apps/v1/access-tokens?app_key=someone-else&corp_id=1&corp_secret=x");
    let a = get(&other).await;
    assert_eq!(a.json()["err_code"], 40001, "{}", a.text());
    assert_eq!(env.sandbox.token_fetches("someone-else"), 1);
}
