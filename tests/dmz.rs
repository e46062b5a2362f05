//! The gateway in a DMZ: TLS and client identity in, every limit holding, bad input refused
//! without harm, and the configuration reloaded without dropping anything.

mod support;

use std::sync::Arc;
use std::time::Duration;

use cx_proxy::sandbox::ca::TestCa;
use cx_proxy::sandbox::SandboxOptions;
use http::Method;
use support::*;

/// Writes a CA-issued server certificate and key for the proxy port into `dir`.
/// Writes the proxy's certificate and the clients' CA into `dir`; sets them in `[server]`.
fn proxy_tls(env: EnvBuilder, dir: &std::path::Path, ca: &TestCa, mtls: bool) -> EnvBuilder {
    let issued = ca.server_cert().unwrap();
    std::fs::write(dir.join("proxy.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.join("proxy-key.pem"), &issued.key_pem).unwrap();
    std::fs::write(dir.join("clients.pem"), ca.pem()).unwrap();
    let file = |name: &str| dir.join(name).display().to_string();
    let env = env
        .set("server.tls_cert", file("proxy.pem"))
        .set("server.tls_key", file("proxy-key.pem"));
    if mtls {
        env.set("server.client_ca", file("clients.pem"))
    } else {
        env
    }
}

async fn tls_env(mtls: bool, extra: &str) -> (Env, TestCa) {
    let ca = TestCa::new("test clients and proxy CA").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let env = proxy_tls(EnvBuilder::new().extra(extra), dir.path(), &ca, mtls)
        .start()
        .await;
    // Keep the TLS files alive as long as the env.
    std::mem::forget(dir);
    (env, ca)
}

#[tokio::test]
async fn https_inbound_with_a_generated_certificate() {
    let (env, ca) = tls_env(false, "").await;
    let url = format!("https://localhost:{}/api/x?q=1", env.proxy.addr.port());
    let a = send(&tls_client(ca.pem(), None), request(Method::GET, &url, "")).await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    assert_eq!(a.json()["data"]["query"], "q=1");
    // Plain HTTP on the TLS port is not served.
    let out = raw_exchange(env.proxy.addr, b"GET /api/x HTTP/1.1\r\nHost: a\r\n\r\n").await;
    assert!(!out.contains("200 OK"), "{out}");
}

#[tokio::test]
async fn mtls_refuses_a_client_without_a_certificate_and_admits_a_signed_one() {
    let (env, ca) = tls_env(true, "").await;
    let url = format!("https://localhost:{}/api/x", env.proxy.addr.port());
    let no_cert = tls_client(ca.pem(), None)
        .request(request(Method::GET, &url, ""))
        .await;
    assert!(
        no_cert.is_err(),
        "a client without a certificate got an answer"
    );
    let stranger_ca = TestCa::new("someone else").unwrap();
    let foreign = stranger_ca.client_cert("billing.internal").unwrap();
    let foreign_cert = tls_client(ca.pem(), Some(&foreign))
        .request(request(Method::GET, &url, ""))
        .await;
    assert!(
        foreign_cert.is_err(),
        "a certificate from another CA was accepted"
    );
    let mine = ca.client_cert("billing.internal").unwrap();
    let a = send(
        &tls_client(ca.pem(), Some(&mine)),
        request(Method::GET, &url, ""),
    )
    .await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    assert!(env.sandbox.recorded().len() == 1);
}

#[tokio::test]
async fn clients_are_identified_by_certificate_name_and_held_to_their_grants() {
    let clients = r#"
[[client]]
name = "billing"
cert_names = ["billing.internal"]
apps = ["default"]
paths = ["/api/apps/v1/robot/"]
"#;
    let (env, ca) = tls_env(true, clients).await;
    let base = format!("https://localhost:{}", env.proxy.addr.port());
    let billing = tls_client(ca.pem(), Some(&ca.client_cert("billing.internal").unwrap()));
    let a = send(
        &billing,
        request(
            Method::GET,
            &format!("{base}/api/apps/v1/robot/chats/c-1"),
            "",
        ),
    )
    .await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    for path in [
        "/api/todo/v1/tasks",
        "/api/apps/v1/robot/../../../todo/v1/tasks",
        "/api/apps/v1/robot/%2e%2e/%2E%2E/%2e%2e/todo/v1/tasks",
    ] {
        let a = send(&billing, request(Method::GET, &format!("{base}{path}"), "")).await;
        assert_proxy_error(&a, 403, "forbidden");
    }
    // A valid certificate with a name no client has: not identified.
    let other = tls_client(
        ca.pem(),
        Some(&ca.client_cert("intruder.internal").unwrap()),
    );
    let a = send(
        &other,
        request(
            Method::GET,
            &format!("{base}/api/apps/v1/robot/chats/c-1"),
            "",
        ),
    )
    .await;
    assert_proxy_error(&a, 403, "forbidden");
    assert_eq!(
        env.sandbox.recorded().len(),
        1,
        "only the granted call reached the platform"
    );
}

#[tokio::test]
async fn clients_outside_allow_or_their_grants_get_403() {
    let env = EnvBuilder::new()
        .set("server.allow", vec!["10.0.0.0/8"])
        .start()
        .await;
    assert_proxy_error(&get(&env.url("/api/x")).await, 403, "forbidden");

    let second_app = format!(
        "{}{}{}",
        default_app(std::path::Path::new("{dir}")),
        corp_app("other", None),
        r#"
[[client]]
name = "ops"
networks = ["127.0.0.1/32", "::1"]
apps = ["default"]
paths = ["/api/apps/v1/robot/"]
"#
    );
    let env = EnvBuilder::new().apps(&second_app).start().await;
    assert_eq!(
        get(&env.url("/api/apps/v1/robot/chats/c-1")).await.json()["err_code"],
        0
    );
    assert_proxy_error(
        &get(&env.url("/api/apps/v1/to-do/t-1")).await,
        403,
        "forbidden",
    );
    assert_proxy_error(
        &get(&env.url("/api/apps/v1/robot/%2e%2e/%2e%2e/%2e%2e/apps/v1/to-do/t-1")).await,
        403,
        "forbidden",
    );
    let a = get_with(
        &env.url("/api/apps/v1/robot/chats/c-1"),
        &[("x-cx-app", "other")],
    )
    .await;
    assert_proxy_error(&a, 403, "forbidden");
    assert_metrics(
        &env.proxy,
        "cx_proxy_client_requests_total{client=\"ops\"} 4",
        true,
    );
}

#[tokio::test]
async fn oversized_bodies_get_413_declared_or_chunked() {
    let env = EnvBuilder::new()
        .set("server.max_body_bytes", 1000)
        .start()
        .await;
    env.ready().await;
    let a = send(
        &client(false),
        request(Method::POST, &env.url("/api/x"), vec![b'x'; 1001]),
    )
    .await;
    assert_proxy_error(&a, 413, "payload_too_large");
    // Chunked, no length: refused once the limit is passed while streaming.
    let chunk = "x".repeat(600);
    let raw = format!(
        "POST /api/upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let out = raw_exchange(env.proxy.addr, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 413"), "{out}");
    assert!(out.contains("payload_too_large"), "{out}");
    // A chunked body under the limit goes through.
    let raw = format!(
        "POST /api/upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n258\r\n{chunk}\r\n0\r\n\r\n"
    );
    let out = raw_exchange(env.proxy.addr, raw.as_bytes()).await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains("\"body_len\":600"), "{out}");
}

#[tokio::test]
async fn garbage_oversized_heads_and_smuggling_neither_crash_nor_desynchronise() {
    let env = env().await;
    env.ready().await;
    let garbage: &[&[u8]] = &[
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage\r\n\r\n",
        b"GET /api/x HTTP/1.1\r\nHost: a\r\nX-Bad\x00Header: 1\r\n\r\n",
        b"\r\n\r\n\r\n",
        b"GET /api/x HTTP/9.9\r\n\r\n",
    ];
    for g in garbage {
        let out = raw_exchange(env.proxy.addr, g).await;
        assert!(!out.contains("200 OK"), "{out}");
    }
    let huge = format!(
        "GET /api/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let out = raw_exchange(env.proxy.addr, huge.as_bytes()).await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");
    let many: String = (0..500).map(|i| format!("X-H{i}: v\r\n")).collect();
    let out = raw_exchange(
        env.proxy.addr,
        format!("GET /api/x HTTP/1.1\r\nHost: a\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert!(out.is_empty() || out.starts_with("HTTP/1.1 431"), "{out}");

    // Content-Length and Transfer-Encoding together: no second request smuggled through.
    let smuggle = b"POST /api/x HTTP/1.1\r\nHost: a\r\nContent-Length: 44\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /api/smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    let out = raw_exchange(env.proxy.addr, smuggle).await;
    // Transfer-Encoding wins and the connection is closed after the answer (RFC 9112 §6.3).
    assert_eq!(out.matches("HTTP/1.1 ").count(), 1, "{out}");
    assert!(out.contains("connection: close"), "{out}");
    assert!(
        env.sandbox
            .recorded()
            .iter()
            .all(|r| r.path != "/api/smuggled"),
        "a smuggled request reached the platform"
    );
    // And the proxy still serves the next client.
    assert_eq!(get(&env.url("/api/after")).await.json()["err_code"], 0);
}

#[tokio::test]
async fn two_hundred_idle_slow_header_sockets_do_not_stop_a_normal_client() {
    use tokio::io::AsyncWriteExt;
    let env = env().await;
    env.ready().await;
    let mut idle = Vec::new();
    for _ in 0..200 {
        let mut s = tokio::net::TcpStream::connect(env.proxy.addr)
            .await
            .unwrap();
        s.write_all(b"GET /api/slow HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            .await
            .unwrap();
        idle.push(s);
    }
    let a = tokio::time::timeout(Duration::from_secs(10), get(&env.url("/api/x")))
        .await
        .expect("served");
    assert_eq!(a.json()["err_code"], 0);
    drop(idle);
}

#[tokio::test]
async fn past_the_concurrency_limit_requests_get_503_overloaded() {
    let env = EnvBuilder::new()
        .set("server.max_concurrent_requests", 2)
        .prepare(|s| s.set_api_delay(Duration::from_millis(700)))
        .start()
        .await;
    env.ready().await;
    let mut ok = 0;
    let mut shed = 0;
    for a in get_concurrently(&env.url("/api/x"), 6).await {
        if a.status == 200 {
            ok += 1;
        } else {
            assert_proxy_error(&a, 503, "overloaded");
            shed += 1;
        }
    }
    assert!(ok >= 2 && shed >= 1, "ok {ok}, shed {shed}");
}

#[tokio::test]
async fn an_upstream_slower_than_timeout_ms_gives_504() {
    let dir = tempfile::tempdir().unwrap();
    let s = sandbox(dir.path(), SandboxOptions::default()).await;
    let text = set(
        &config_text(&s, dir.path(), &default_app(dir.path())),
        "upstream.timeout_ms",
        300,
    );
    let proxy = cx_proxy::ProxyHandle::start(config(&text)).await.unwrap();
    let base = format!("http://{}", proxy.addr);
    assert_eq!(get(&format!("{base}/api/x")).await.json()["err_code"], 0);
    s.set_api_delay(Duration::from_millis(1500));
    assert_proxy_error(
        &get(&format!("{base}/api/x")).await,
        504,
        "upstream_timeout",
    );
}

#[tokio::test]
async fn a_reload_keeps_unchanged_tokens_and_open_connections() {
    let env = EnvBuilder::new()
        .sandbox(SandboxOptions {
            apps: vec![
                cx_proxy::sandbox::SandboxApp::demo(),
                "added-app:2:added-secret".parse().unwrap(),
            ],
            ..Default::default()
        })
        .file("added_secret", "added-secret")
        .start()
        .await;
    env.ready().await;
    let token_before = env.sandbox.issued_tokens();
    // One connection kept open across the reload.
    let mut send_req = kept_open_connection(env.proxy.addr).await;
    let on_conn = get_on_connection;
    let r = send_req.send_request(on_conn("/api/a")).await.unwrap();
    assert_eq!(r.status(), 200);
    let r = send_req
        .send_request(on_conn("/added/api/b"))
        .await
        .unwrap();
    // Before the reload /added belongs to the default app, and the platform has no such path.
    assert_eq!(r.status(), 404);

    let dir = env.dir.path();
    let added = format!(
        "\n[[app]]\nname = \"added\"\napp_key = \"added-app\"\ncorp_id = 2\ncorp_secret_file = \"{}/added_secret\"\nprefix = \"/added\"\n",
        dir.display()
    );
    let text = config_text(&env.sandbox, dir, &format!("{}{added}", default_app(dir)));
    env.proxy.gateway.apply(config(&text)).await.unwrap();

    let r = send_req
        .send_request(on_conn("/added/api/b"))
        .await
        .expect("the same connection");
    assert_eq!(r.status(), 200);
    let last = env.sandbox.recorded().pop().unwrap();
    assert_eq!(
        last.token_app.as_deref(),
        Some("added-app"),
        "the new app serves on the old connection"
    );
    assert_eq!(last.path, "/api/b");
    let r = send_req.send_request(on_conn("/api/c")).await.unwrap();
    assert_eq!(r.status(), 200);
    let last = env.sandbox.recorded().pop().unwrap();
    assert_eq!(
        env.sandbox.token_fetches(APP_KEY),
        1,
        "the unchanged app kept its token"
    );
    assert_eq!(last.token.as_deref(), Some(token_before[0].as_str()));
}

#[tokio::test]
async fn a_reload_that_moves_an_app_and_changes_injection_keeps_its_token() {
    let env = env().await;
    env.ready().await;
    let token = env.sandbox.issued_tokens().remove(0);
    let dir = env.dir.path();
    // The same app (name and credentials) under another prefix, with its own codes, and the
    // token now sent as a header: one app, one token, no fetch.
    let mut text = config_text(&env.sandbox, dir, &default_app(dir));
    for (key, value) in [
        ("app.0.prefix", toml::Value::from("/v2")),
        ("app.0.invalid_codes", toml::Value::from(vec![49000, 41000])),
        ("token.inject", toml::Value::from("header")),
        ("token.header", toml::Value::from("Authorization")),
    ] {
        text = set(&text, key, value);
    }
    env.proxy.gateway.apply(config(&text)).await.unwrap();
    let a = get(&env.url("/v2/api/apps/v1/sso/user?oauth_code=x")).await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    let seen = env.sandbox.recorded().pop().unwrap();
    assert_eq!(seen.token.as_deref(), Some(token.as_str()));
    assert_eq!(
        seen.headers["authorization"],
        format!("Bearer {token}"),
        "the kept token, rendered for the new injection"
    );
    assert_eq!(env.sandbox.token_fetches(APP_KEY), 1, "no fetch");
}

#[tokio::test]
async fn requests_over_upstream_max_connections_wait_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let s = sandbox(
        dir.path(),
        SandboxOptions {
            h1_only: true,
            ..Default::default()
        },
    )
    .await;
    let text = set(
        &config_text(&s, dir.path(), &default_app(dir.path())),
        "upstream.max_connections",
        1,
    );
    let proxy = cx_proxy::ProxyHandle::start(config(&text)).await.unwrap();
    let url = Arc::new(format!("http://{}/api/x", proxy.addr));
    assert_eq!(get(&url).await.json()["err_code"], 0);
    s.set_api_delay(Duration::from_millis(100));
    for a in get_concurrently(&url, 8).await {
        assert_eq!(a.json()["err_code"], 0, "queued, not refused: {}", a.text());
    }
    // One slot: the token fetch and every call went over one pooled connection.
    assert_eq!(s.connections_accepted(), 1);
    assert_metrics(&proxy, "cx_proxy_upstream_errors_total{", false);
}
