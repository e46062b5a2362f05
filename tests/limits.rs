//! The platform's call rates kept at the gateway (SPEC section 4.9): per app, waiting up to
//! `max_wait_ms` for room, else 429 `rate_limited` with `Retry-After`, and the refused call
//! never reaches the platform.

mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use cx_proxy::sandbox::{SandboxApp, SandboxOptions};
use support::*;

/// Calls the sandbox saw on `path`.
fn seen(env: &Env, path: &str) -> usize {
    env.sandbox
        .recorded()
        .iter()
        .filter(|r| r.path == path)
        .count()
}

fn rule(method: &str, path: &str, rate: &str) -> String {
    format!("[[limits.rule]]\nmethod = \"{method}\"\npath = \"{path}\"\nrate = \"{rate}\"\n")
}

#[tokio::test]
async fn a_file_rule_of_three_a_minute_refuses_the_fourth_before_the_platform_sees_it() {
    let env = EnvBuilder::new()
        .admin()
        .extra(&rule("GET", "/api/apps/v1/things/{id}", "3/min"))
        .set("limits.max_wait_ms", 0)
        .start()
        .await;
    for i in 0..3 {
        let a = get(&env.url(&format!("/api/apps/v1/things/{i}"))).await;
        assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    }
    let a = get(&env.url("/api/apps/v1/things/9")).await;
    let v = assert_proxy_error(&a, 429, "rate_limited");
    assert_eq!(v["err_code"], 990429);
    let msg = v["err_msg"].as_str().unwrap();
    assert!(
        msg.contains("GET /api/apps/v1/things/{id}") && msg.contains("3/min"),
        "{msg}"
    );
    let after: u64 = a.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((55..=64).contains(&after), "Retry-After {after}");
    let seen: usize = (0..10)
        .map(|i| seen(&env, &format!("/api/apps/v1/things/{i}")))
        .sum();
    assert_eq!(seen, 3, "the fourth never reached the platform");
    let metrics = get(&env.admin_url("/metrics")).await.text();
    assert_promtool_clean(&metrics);
    for line in [
        "cx_proxy_rate_limited_total{app=\"default\",rule=\"GET /api/apps/v1/things/{id}\"} 1",
        "cx_proxy_limit_window_calls{app=\"default\",limit=\"3\",rule=\"GET /api/apps/v1/things/{id}\"} 3",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
    // Another path is another rule's business (none here): it passes.
    assert_eq!(get(&env.url("/api/apps/v1/other")).await.status, 200);
}

#[tokio::test]
async fn a_burst_waits_for_room_up_to_max_wait_and_is_refused_at_once_without_it() {
    let path = "/api/apps/v1/burst";
    let five_a_second = |max_wait_ms: i64| async move {
        let env = EnvBuilder::new()
            .extra(&rule("GET", path, "5/s"))
            .set("limits.max_wait_ms", max_wait_ms)
            .start()
            .await;
        env.ready().await;
        env
    };
    let env = five_a_second(1500).await;
    let started = Instant::now();
    let answers = get_concurrently(&env.url(path), 8).await;
    let took = started.elapsed();
    for a in &answers {
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert!(took >= Duration::from_millis(600), "spread over {took:?}");

    // At the default max_wait_ms (1 s) a burst of ten passes too: five now, five when the
    // first five are one second old.
    let env = EnvBuilder::new()
        .extra(&rule("GET", path, "5/s"))
        .start()
        .await;
    env.ready().await;
    let started = Instant::now();
    for a in get_concurrently(&env.url(path), 10).await {
        assert_eq!(a.status, 200, "{}", a.text());
    }
    assert!(started.elapsed() >= Duration::from_millis(900));

    let env = five_a_second(0).await;
    let started = Instant::now();
    let answers = get_concurrently(&env.url(path), 8).await;
    let took = started.elapsed();
    let limited = answers.iter().filter(|a| a.status == 429).count();
    assert_eq!(limited, 3, "the excess is refused");
    assert!(took < Duration::from_millis(500), "at once: {took:?}");
}

#[tokio::test]
async fn the_built_in_rule_holds_per_app_and_can_be_turned_off() {
    let export = "/api/apps/address-book/v1.0/all";
    let second = "\n[[app]]\nname = \"second\"\napp_key = \"second-app\"\ncorp_id = 2\n\
                  corp_secret_file = \"{dir}/second_secret\"\nprefix = \"/second\"\n";
    let apps = format!("{}{second}", default_app(Path::new("{dir}")));
    let opts = || SandboxOptions {
        apps: vec![
            SandboxApp::demo(),
            "second-app:2:second-secret".parse().unwrap(),
        ],
        rate_limits: false,
        ..Default::default()
    };
    let env = EnvBuilder::new()
        .sandbox(opts())
        .apps(&apps)
        .file("second_secret", "second-secret")
        .set("limits.max_wait_ms", 0)
        .start()
        .await;
    for _ in 0..10 {
        assert_eq!(get(&env.url(export)).await.status, 200);
    }
    let a = get(&env.url(export)).await;
    assert_proxy_error(&a, 429, "rate_limited");
    // The other app has its own window.
    let b = get(&env.url(&format!("/second{export}"))).await;
    assert_eq!(b.status, 200, "{}", b.text());
    assert_eq!(seen(&env, export), 11);

    let env = EnvBuilder::new()
        .sandbox(opts())
        .apps(&apps)
        .file("second_secret", "second-secret")
        .set("limits.enabled", false)
        .start()
        .await;
    for _ in 0..12 {
        assert_eq!(get(&env.url(export)).await.status, 200);
    }
}

#[tokio::test]
async fn a_hammering_client_never_makes_the_platform_answer_49001() {
    // The sandbox enforces the documented limits; the proxy runs with its defaults.
    let env = EnvBuilder::new().start().await;
    env.ready().await;
    let url = env.url("/api/apps/v1/robot/chats?page_count=30&page_index=0");
    let mut passed = 0;
    for _ in 0..3 {
        for a in get_concurrently(&url, 12).await {
            match a.status.as_u16() {
                200 => {
                    assert_eq!(
                        a.json()["err_code"],
                        0,
                        "the platform refused: {}",
                        a.text()
                    );
                    passed += 1;
                }
                429 => {
                    assert_proxy_error(&a, 429, "rate_limited");
                }
                other => panic!("{other}: {}", a.text()),
            }
        }
    }
    assert!(passed >= 5, "the limit is used, not starved: {passed}");
}

#[tokio::test]
async fn a_reload_keeps_the_windows_of_a_renamed_app_and_a_changed_count() {
    let path = "/api/apps/v1/reloaded";
    let env = EnvBuilder::new()
        .extra(&rule("GET", path, "3/min"))
        .set("limits.max_wait_ms", 0)
        .start()
        .await;
    for _ in 0..3 {
        assert_eq!(get(&env.url(path)).await.status, 200);
    }
    let dir = env.dir.path();
    let reload = |rate: &str| {
        let app = default_app(dir).replace("name = \"default\"", "name = \"renamed\"");
        let text = config_text(
            &env.sandbox,
            dir,
            &format!("{}{app}", rule("GET", path, rate)),
        );
        set(&text, "limits.max_wait_ms", 0)
    };
    // Renamed, and the count raised by one: the three calls still count.
    env.proxy
        .gateway
        .apply(config(&reload("4/min")))
        .await
        .unwrap();
    assert_eq!(get(&env.url(path)).await.status, 200, "the fourth of 4/min");
    assert_proxy_error(&get(&env.url(path)).await, 429, "rate_limited");
    // Another period is another window.
    env.proxy
        .gateway
        .apply(config(&reload("4/h")))
        .await
        .unwrap();
    assert_eq!(get(&env.url(path)).await.status, 200);
    assert_eq!(seen(&env, path), 5);
}
