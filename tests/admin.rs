//! The admin listener: health, readiness that follows the token, metrics that move, and
//! forced refreshes that never show the token.

mod support;

use std::time::{Duration, Instant};

use http::Method;
use support::*;

fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(series)
            .and_then(|rest| rest.trim().parse().ok())
    })
}

#[tokio::test]
async fn readyz_is_503_while_token_fetches_fail_and_200_after() {
    let env = EnvBuilder::new()
        .admin()
        .set("token.max_fetches_per_minute", 60)
        .prepare(|s| s.fail_token_fetches(1_000, 50002, "platform maintenance"))
        .start()
        .await;
    assert_eq!(get(&env.admin_url("/healthz")).await.status, 200);
    // Wait until the warm-up fetch has failed, then readiness names the app and the cause.
    let deadline = Instant::now() + Duration::from_secs(10);
    let a = loop {
        let a = get(&env.admin_url("/readyz")).await;
        if a.text().contains("50002") || Instant::now() > deadline {
            break a;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(a.status, 503, "{}", a.text());
    let v = a.json();
    assert_eq!(v["ready"], false);
    assert_eq!(v["apps"][0]["app"], "default");
    assert!(
        v["apps"][0]["reason"]
            .as_str()
            .unwrap()
            .contains("platform maintenance"),
        "{v}"
    );

    env.sandbox.fail_token_fetches(0, 0, "");
    // The refresher retries with backoff (1 s, 2 s, ...) and readiness follows.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let a = get(&env.admin_url("/readyz")).await;
        if a.status == 200 {
            assert_eq!(a.json()["apps"][0]["ready"], true);
            break;
        }
        assert!(Instant::now() < deadline, "never ready: {}", a.text());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn metrics_and_forced_refresh_move_as_they_should() {
    let env = EnvBuilder::new().admin().start().await;
    env.ready().await;
    for _ in 0..3 {
        assert_eq!(get(&env.url("/api/x")).await.json()["err_code"], 0);
    }
    let a = send(
        &client(false),
        request(Method::POST, &env.url("/api/y"), "{}"),
    )
    .await;
    assert_eq!(a.json()["err_code"], 0);
    let _ = get(&env.url("/nowhere")).await; // the sandbox's own 404, still a 4xx from upstream

    let text = get(&env.admin_url("/metrics")).await.text();
    let req = |m: &str, c: &str| {
        metric(
            &text,
            &format!(
                "cx_proxy_requests_total{{app=\"default\",method=\"{m}\",status_class=\"{c}\"}}"
            ),
        )
    };
    assert_eq!(req("GET", "2xx"), Some(3.0), "{text}");
    assert_eq!(req("POST", "2xx"), Some(1.0), "{text}");
    assert_eq!(req("GET", "4xx"), Some(1.0), "{text}");
    assert_eq!(
        metric(
            &text,
            "cx_proxy_token_fetches_total{app=\"default\",reason=\"first_use\",result=\"ok\"}"
        ),
        Some(1.0),
        "{text}"
    );
    let left = metric(
        &text,
        "cx_proxy_token_remaining_lifetime_seconds{app=\"default\"}",
    )
    .unwrap();
    assert!(left > 7000.0 && left <= 7200.0, "{left}");
    assert!(metric(&text, "cx_proxy_upstream_seconds_count").unwrap() >= 5.0);
    // Which build answers; the standard process metrics; no store gauge without a store.
    let build = format!(
        "cx_proxy_build_info{{commit=\"{}\",version=\"{}\"}}",
        env!("CX_BUILD_COMMIT"),
        env!("CARGO_PKG_VERSION")
    );
    assert_eq!(metric(&text, &build), Some(1.0), "{text}");
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_start_time_seconds",
    ] {
        assert!(metric(&text, name).is_some(), "{name} missing:\n{text}");
    }
    assert!(!text.contains("token_store_up"), "{text}");
    assert_promtool_clean(&text);

    // A forced refresh: a new token, its expiry reported, the token itself never shown.
    let before = env.sandbox.issued_tokens();
    let a = send(
        &client(false),
        request(Method::POST, &env.admin_url("/tokens/default/refresh"), ""),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["expires_in"], 7200);
    let after = env.sandbox.issued_tokens();
    assert_eq!(after.len(), before.len() + 1);
    for t in &after {
        assert!(!a.text().contains(t.as_str()));
    }
    let text = get(&env.admin_url("/metrics")).await.text();
    assert_eq!(
        metric(
            &text,
            "cx_proxy_token_fetches_total{app=\"default\",reason=\"forced\",result=\"ok\"}"
        ),
        Some(1.0),
        "{text}"
    );
    for t in &after {
        assert!(!text.contains(t.as_str()), "a token in /metrics");
    }
    assert!(!text.contains(SECRET));
    // Requests use the new token.
    assert_eq!(get(&env.url("/api/z")).await.json()["err_code"], 0);
    let last = env.sandbox.recorded().pop().unwrap();
    assert!(!before.contains(last.token.as_ref().unwrap()));

    let a = send(
        &client(false),
        request(Method::POST, &env.admin_url("/tokens/nope/refresh"), ""),
    )
    .await;
    assert_proxy_error(&a, 404, "no_route");
}

#[test]
fn the_shipped_alerting_rules_load_and_use_metrics_the_proxy_exports() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/dist/alerts.yml");
    let rules = std::fs::read_to_string(path).unwrap();
    // Every metric a rule reads is one the README lists (the README lists every metric).
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let mut names = 0;
    for (i, _) in rules.match_indices("cx_proxy_") {
        let name: String = rules[i + "cx_proxy_".len()..]
            .chars()
            .take_while(|c| c.is_ascii_lowercase() || *c == '_')
            .collect();
        assert!(
            readme.contains(&format!("`{name}")),
            "{name} is not a listed metric"
        );
        names += 1;
    }
    assert!(names >= 8, "{names}");
    match std::process::Command::new("promtool")
        .args(["check", "rules", path])
        .output()
    {
        Ok(out) => assert!(
            out.status.success(),
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none() && std::env::var_os("CX_REQUIRE_REDIS").is_none(),
                "promtool is required under CI but not installed (apt-get install prometheus)"
            );
            eprintln!("SKIPPED: promtool is not installed; the rules were not loaded");
        }
    }
}

/// The page at `url` as headless Chromium renders it (its DOM, serialised), or `None` (with a
/// note) when Chromium is not installed, which fails under CI.
fn rendered_dom(url: &str) -> Option<String> {
    let profile = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--virtual-time-budget=2000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg("--dump-dom")
        .arg(url)
        .output();
    match out {
        Ok(out) => {
            assert!(
                out.status.success(),
                "chromium failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            Some(String::from_utf8_lossy(&out.stdout).into_owned())
        }
        Err(_) => {
            assert!(
                std::env::var_os("CI").is_none() && std::env::var_os("CX_REQUIRE_REDIS").is_none(),
                "chromium is required under CI but not installed (apt-get install chromium)"
            );
            eprintln!("SKIPPED: chromium is not installed; the status page was not rendered");
            None
        }
    }
}

#[tokio::test]
async fn the_status_page_in_a_real_browser_names_every_app_its_token_and_a_chart_and_escapes_err_msg(
) {
    // Two apps: one served, one whose token fetches the platform refuses with an err_msg
    // that holds markup.
    let env = EnvBuilder::new()
        .admin()
        .sandbox(cx_proxy::sandbox::SandboxOptions {
            apps: vec![
                cx_proxy::sandbox::SandboxApp::demo(),
                "other-app:2:other-secret".parse().unwrap(),
            ],
            ..Default::default()
        })
        .file("other_secret", "wrong-secret")
        .apps(&format!(
            "{}\n[[app]]\nname = \"other\"\napp_key = \"other-app\"\ncorp_id = 2\ncorp_secret_file = \"{{dir}}/other_secret\"\nprefix = \"/other\"\n",
            "[[app]]\nname = \"default\"\napp_key = \"demo-app\"\ncorp_id = 10001\ncorp_secret_file = \"{dir}/corp_secret\"\nprefix = \"/\"\n"
        ))
        .start()
        .await;
    for _ in 0..50 {
        if env.proxy.proxy.tokens().status().await[0].ready {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    env.sandbox.fail_token_fetches(
        1000,
        40001,
        "<script>document.title='owned'</script>bad secret",
    );
    for _ in 0..4 {
        let _ = get(&env.url("/api/apps/v1/robot/chats")).await;
        let _ = get(&env.url("/other/api/apps/v1/robot/chats")).await;
    }
    let url = env.admin_url("/status");
    let served = get(&url).await;
    assert_eq!(served.status, 200);
    assert!(served.headers["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/html"));
    assert!(!served.text().contains("wrong-secret") && !served.text().contains("demo-secret"));
    let dom = match tokio::task::spawn_blocking(move || rendered_dom(&url))
        .await
        .unwrap()
    {
        Some(dom) => dom,
        None => return,
    };
    // Every app named, in its own row, with its token state.
    for (app, state) in [("default", "ready"), ("other", "no usable token")] {
        let row = dom
            .split(&format!("data-app=\"{app}\""))
            .nth(1)
            .and_then(|rest| rest.split("</tr>").next())
            .unwrap_or_else(|| panic!("no row for {app}:\n{dom}"));
        assert!(row.contains(state), "{app}: {row}");
        // A chart drawn: an SVG with its two lines.
        assert!(
            row.contains("<svg") && row.matches("<polyline").count() == 2,
            "{app}: {row}"
        );
    }
    // The platform's err_msg is shown as text: escaped in the DOM, never a script element,
    // never run (the title is the page's own).
    assert!(
        dom.contains("&lt;script&gt;document.title='owned'&lt;/script&gt;bad secret"),
        "{dom}"
    );
    assert!(!dom.contains("<script"), "{dom}");
    assert!(dom.contains("<title>cx-proxy status</title>"), "{dom}");
}
