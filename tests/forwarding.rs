//! What reaches the platform: every method, path, query and body intact, the proxy's token
//! injected, the client's credentials and hop-by-hop headers gone.

mod support;

use bytes::Bytes;
use http::{Method, Request};
use http_body_util::Full;
use support::*;

fn only_token(env: &Env) -> String {
    let tokens = env.sandbox.issued_tokens();
    assert_eq!(tokens.len(), 1, "one token issued");
    tokens[0].clone()
}

#[tokio::test]
async fn every_method_path_query_and_body_arrives_intact_with_the_token() {
    let env = env().await;
    let c = client(false);
    let cases = [
        (
            Method::GET,
            "/api/apps/v1/robot/chats",
            "page_count=30&page_index=0&name=%E6%A9%99%E8%AE%AF&q=a%26b",
            "",
        ),
        (
            Method::POST,
            "/api/apps/message/v1/push",
            "",
            r#"{"type":"text","recipients":["s1"],"message":{"content":"你好"}}"#,
        ),
        (Method::PUT, "/api/apps/v1/to-do/42", "x=1", "put body"),
        (Method::PATCH, "/api/apps/v1/card/templates/7", "", "patch"),
        (Method::DELETE, "/api/apps/v1/to-read/42", "hard=true", ""),
        (Method::OPTIONS, "/api/apps/address-book/v1.0/all", "", ""),
    ];
    let n = cases.len();
    for (method, path, query, body) in cases {
        let target = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{query}")
        };
        let a = send(&c, request(method.clone(), &env.url(&target), body)).await;
        assert_eq!(a.status, 200, "{method} {target}: {}", a.text());
        let v = a.json();
        assert_eq!(v["err_code"], 0, "{v}");
        assert_eq!(v["data"]["method"], method.as_str());
        assert_eq!(v["data"]["path"], path);
        assert_eq!(v["data"]["query"], query);
        assert_eq!(v["data"]["body_sha256"], sha256(body.as_bytes()));
    }
    let token = only_token(&env);
    let seen = env.sandbox.recorded();
    assert_eq!(seen.len(), n);
    for r in seen {
        assert_eq!(
            r.token.as_deref(),
            Some(token.as_str()),
            "{} {}",
            r.method,
            r.path
        );
        assert_eq!(r.token_status, "valid");
    }
}

#[tokio::test]
async fn a_client_supplied_access_token_is_replaced() {
    let env = env().await;
    let a = get(&env.url("/api/x?access_token=forged&a=1&access%5Ftoken=forged2")).await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    let r = &env.sandbox.recorded()[0];
    assert_eq!(r.token.as_deref(), Some(only_token(&env).as_str()));
    assert_eq!(r.query, "a=1");
}

#[tokio::test]
async fn header_injection_replaces_the_clients_header() {
    let env = EnvBuilder::new()
        .set("token.inject", "header")
        .set("token.header", "Authorization")
        .set("token.header_format", "Bearer {token}")
        .start()
        .await;
    let req = Request::builder()
        .uri(env.url("/api/x?access_token=forged&b=2"))
        .header("authorization", "Bearer forged")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&client(false), req).await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    let r = &env.sandbox.recorded()[0];
    let token = only_token(&env);
    assert_eq!(
        r.headers["authorization"],
        format!("Bearer {token}").as_str()
    );
    assert_eq!(r.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(r.query, "b=2", "no token in the query in header mode");
}

#[tokio::test]
async fn hop_by_hop_forwarding_and_host_headers_never_reach_the_platform() {
    let env = env().await;
    let req = Request::builder()
        .uri(env.url("/api/x"))
        .header("host", "evil.example")
        .header("connection", "x-hop-secret")
        .header("x-hop-secret", "internal")
        .header("proxy-authorization", "Basic abc")
        .header("x-forwarded-for", "10.9.8.7")
        .header("forwarded", "for=10.9.8.7")
        .header("x-cx-app", "default")
        .header("x-custom", "kept")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let a = send(&client(false), req).await;
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    let r = &env.sandbox.recorded()[0];
    assert_eq!(
        r.authority,
        env.sandbox.addr().to_string(),
        "Host never changes the destination"
    );
    for h in [
        "x-hop-secret",
        "proxy-authorization",
        "x-forwarded-for",
        "forwarded",
        "x-cx-app",
        "connection",
    ] {
        assert!(
            !r.headers.contains_key(h),
            "{h} reached the platform: {:?}",
            r.headers
        );
    }
    assert_eq!(r.headers["x-custom"], "kept");
}

#[tokio::test]
async fn absolute_form_targets_are_refused_and_connect_is_405() {
    let env = env().await;
    let out = raw_exchange(
        env.proxy.addr,
        b"GET http://evil.example/api/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.contains("x-cx-proxy-error: bad_request"), "{out}");

    let a = send(&client(false), request(Method::CONNECT, &env.url("/"), "")).await;
    assert_proxy_error(&a, 405, "method_not_allowed");
    assert!(env.sandbox.recorded().is_empty(), "nothing was forwarded");
}

#[tokio::test]
async fn five_megabyte_bodies_stream_both_ways() {
    let env = env().await;
    let body = noise(5 * 1024 * 1024);
    let c = client(false);
    // Request body: the platform hashes what it received.
    let a = send(
        &c,
        request(Method::POST, &env.url("/api/media/v1/upload"), body.clone()),
    )
    .await;
    let v = a.json();
    assert_eq!(v["data"]["body_len"], body.len());
    assert_eq!(v["data"]["body_sha256"], sha256(&body));
    // Response body: the platform echoes it back.
    let a = send(
        &c,
        request(
            Method::POST,
            &env.url("/api/media/v1/echo?sandbox_echo=1"),
            body.clone(),
        ),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.body.len(), body.len());
    assert_eq!(sha256(&a.body), sha256(&body));
}

#[tokio::test]
async fn h2c_clients_are_served() {
    let env = env().await;
    let a = send(
        &client(true),
        request(Method::POST, &env.url("/api/x?y=1"), "h2 body"),
    )
    .await;
    assert_eq!(a.status, 200);
    let v = a.json();
    assert_eq!(v["err_code"], 0, "{v}");
    assert_eq!(v["data"]["query"], "y=1");
    assert_eq!(v["data"]["body_sha256"], sha256(b"h2 body"));
}

#[tokio::test]
async fn unmatched_paths_get_no_route_and_big_declared_bodies_413() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), Default::default()).await;
    let text = config_text(&sandbox, dir.path(), &default_app(dir.path()));
    let text = set(&text, "app.0.prefix", "/only");
    let text = set(&text, "server.max_body_bytes", 1000);
    let proxy = cx_proxy::ProxyHandle::start(config(&text)).await.unwrap();
    let base = format!("http://{}", proxy.addr);

    let a = get(&format!("{base}/api/x")).await;
    assert_proxy_error(&a, 404, "no_route");
    let a = get(&format!("{base}/onlyx/api")).await;
    assert_proxy_error(&a, 404, "no_route");
    let a = get(&format!("{base}/only/api/x")).await;
    assert_eq!(a.json()["data"]["path"], "/api/x", "prefix stripped");

    let a = send(
        &client(false),
        request(
            Method::POST,
            &format!("{base}/only/api/x"),
            vec![b'x'; 1001],
        ),
    )
    .await;
    assert_proxy_error(&a, 413, "payload_too_large");
    assert_eq!(
        sandbox.recorded().len(),
        1,
        "the oversized body was not forwarded"
    );
}

#[tokio::test]
async fn a_request_id_goes_upstream_and_back_the_clients_or_a_new_one() {
    let env = env().await;
    env.ready().await;
    // The client's own id.
    let a = get_with(
        &env.url("/api/apps/v1/robot/chats"),
        &[("x-request-id", "legacy-42")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert_eq!(a.headers["x-request-id"], "legacy-42");
    let seen = env.sandbox.recorded().pop().unwrap();
    assert_eq!(seen.headers["x-request-id"], "legacy-42");
    // Two: the first, usable, is the one id both ways; the second is not sent on.
    let a = get_with(
        &env.url("/api/apps/v1/robot/chats"),
        &[("x-request-id", "first-1"), ("x-request-id", "has space")],
    )
    .await;
    assert_eq!(a.headers["x-request-id"], "first-1");
    let seen = env.sandbox.recorded().pop().unwrap();
    let sent: Vec<_> = seen.headers.get_all("x-request-id").iter().collect();
    assert_eq!(sent, ["first-1"]);
    // None, or one that is no usable id (too long): a new one, the same both ways.
    for sent in [None, Some("x".repeat(300))] {
        let headers: Vec<(&str, &str)> =
            sent.iter().map(|s| ("x-request-id", s.as_str())).collect();
        let a = get_with(&env.url("/api/apps/v1/robot/chats"), &headers).await;
        let id = a.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(id.len(), 16, "{id}");
        assert!(id.bytes().all(|b| b.is_ascii_hexdigit()), "{id}");
        let seen = env.sandbox.recorded().pop().unwrap();
        assert_eq!(seen.headers["x-request-id"], id.as_str());
    }
    // The proxy's own answers carry one too.
    let a = get(&env.url("/api/apps/v1/robot%2Fx")).await;
    assert_eq!(a.status, 400);
    assert_eq!(a.headers["x-request-id"].len(), 16);
}
