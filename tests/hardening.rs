//! Cases other reverse proxies and token SDKs got wrong in the field (issue 14), each kind
//! with the example that showed it and a second input of the same kind.

mod support;

use std::net::SocketAddr;

use support::*;

/// Writes `bytes`, shuts the write side (as `nc` and some legacy clients do), reads the
/// answer until the proxy closes or 5 s pass.
async fn half_closed_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    s.shutdown().await.unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_client_that_half_closes_after_a_complete_request_gets_its_answer() {
    let env = EnvBuilder::new().start().await;
    env.ready().await;
    let answer = half_closed_exchange(
        env.proxy.addr,
        b"GET /api/apps/v1/robot/chats HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"err_code\":0"), "{answer}");
    // HTTP/1.0 with a body, and `Connection: close`: the same.
    let answer = half_closed_exchange(
        env.proxy.addr,
        b"POST /api/apps/v1/to-do HTTP/1.0\r\nHost: x\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.0 200"), "{answer}");
    let seen = env.sandbox.recorded();
    assert!(seen.iter().any(|r| r.path == "/api/apps/v1/robot/chats"));
    assert!(seen
        .iter()
        .any(|r| r.path == "/api/apps/v1/to-do" && r.body_len == 2));
}

#[tokio::test]
async fn encoded_slashes_and_backslashes_in_a_path_are_refused() {
    let env = EnvBuilder::new()
        .extra(
            "[[client]]\nname = \"robot-only\"\nnetworks = [\"127.0.0.1/32\"]\napps = [\"default\"]\n\
             paths = [\"/api/apps/v1/robot/\"]\n",
        )
        .start()
        .await;
    env.ready().await;
    for path in [
        "/api/apps/v1/robot%2F..%2F..%2Fv1%2Fto-do",
        "/api/apps/v1/robot%2f..%2f..%2fv1%2fto-do",
        "/api/apps/v1/robot%5C..%5C..%5Cv1%5Cto-do",
        "/api/apps/v1/robot%5c..%5cv1",
    ] {
        let a = get(&env.url(path)).await;
        let v = assert_proxy_error(&a, 400, "bad_request");
        assert!(
            v["err_msg"].as_str().unwrap().contains("slash"),
            "{path}: {v}"
        );
    }
    // Dot segments with a parameter, which Tomcat, Jetty and Spring read as `..`.
    for path in [
        "/api/apps/v1/robot/..;/to-do",
        "/api/apps/v1/robot/%2e%2e;/to-do",
        "/api/apps/v1/robot/x/..;jsessionid=1/..;/to-do",
        "/api/apps/v1/robot/.;x/chats",
    ] {
        let a = get(&env.url(path)).await;
        let v = assert_proxy_error(&a, 400, "bad_request");
        assert!(
            v["err_msg"].as_str().unwrap().contains("dot segment"),
            "{path}: {v}"
        );
    }
    // A parameter elsewhere is the client's business.
    assert_eq!(
        get(&env.url("/api/apps/v1/robot/chats;jsessionid=1"))
            .await
            .status,
        200
    );
    // A raw backslash (no client library sends one; a legacy one may).
    let answer = raw_exchange(
        env.proxy.addr,
        b"GET /api/apps/v1/robot\\..\\..\\v1\\to-do HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("x-cx-proxy-error: bad_request"), "{answer}");
    assert!(env
        .sandbox
        .recorded()
        .iter()
        .all(|r| !r.path.contains("to-do")));
    // An escape of anything else is the client's business.
    assert_eq!(get(&env.url("/api/apps/v1/robot/a%20b")).await.status, 200);
}

#[tokio::test]
async fn a_client_token_behind_a_semicolon_is_refused() {
    let env = EnvBuilder::new().start().await;
    env.ready().await;
    for query in [
        "group_id=1;access_token=EVIL",
        "group_id=1;access%5Ftoken=EVIL2&x=1",
    ] {
        let a = get(&env.url(&format!("/api/apps/v1/robot/chats?{query}"))).await;
        let v = assert_proxy_error(&a, 400, "bad_request");
        assert!(
            v["err_msg"].as_str().unwrap().contains("access_token"),
            "{v}"
        );
    }
    assert!(env
        .sandbox
        .recorded()
        .iter()
        .all(|r| !r.query.contains("EVIL")));
    // A token request with a `;` among its parameters: neither answered nor forwarded.
    let fetches = env.sandbox.token_fetches(APP_KEY);
    for method in [http::Method::GET, http::Method::POST, http::Method::HEAD] {
        let a = send(
            &client(false),
            request(
                method.clone(),
                &env.url("/api/apps/v1/access-tokens?app_key=demo-app&corp_id=10001;corp_secret=demo-secret"),
                "",
            ),
        )
        .await;
        assert_eq!(a.status, 400, "{method}");
        assert_eq!(a.headers["x-cx-proxy-error"], "bad_request", "{method}");
    }
    assert_eq!(env.sandbox.token_fetches(APP_KEY), fetches);
    assert!(env
        .sandbox
        .recorded()
        .iter()
        .all(|r| !r.path.contains("access-tokens")));
    // (The access log masks a token-like name behind any separator: the unit test
    // `rewrite::tests::logs_see_no_secret_values`.)
}

#[tokio::test]
async fn the_admin_port_has_its_own_allow_list_loopback_by_default() {
    // The proxy port closed to this host; the admin port (default: loopback) still open.
    let env = EnvBuilder::new()
        .admin()
        .set("server.allow", vec!["10.0.0.0/8"])
        .start()
        .await;
    assert_proxy_error(&get(&env.url("/api/a")).await, 403, "forbidden");
    assert_eq!(get(&env.admin_url("/healthz")).await.status, 200);
    // And the other way round: the proxy port open, the admin port not.
    let env = EnvBuilder::new()
        .admin()
        .set("admin.allow", vec!["10.0.0.0/8", "fd00::/8"])
        .start()
        .await;
    assert_eq!(get(&env.url("/api/a")).await.status, 200);
    for path in ["/metrics", "/readyz"] {
        let a = get(&env.admin_url(path)).await;
        let v = assert_proxy_error(&a, 403, "forbidden");
        assert!(
            v["err_msg"].as_str().unwrap().contains("admin.allow"),
            "{v}"
        );
    }
    let a = send(
        &client(false),
        request(
            http::Method::POST,
            &env.admin_url("/tokens/default/refresh"),
            "",
        ),
    )
    .await;
    assert_proxy_error(&a, 403, "forbidden");
}

#[test]
fn config_mistakes_check_used_to_let_through_are_refused() {
    let load = |extra: &str| {
        cx_proxy::config::Config::from_toml(
            &format!(
                "[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\n{extra}"
            ),
            "p.toml",
            None,
        )
        .map(drop)
        .unwrap_err()
        .to_string()
    };
    let e = load("[admin]\nallow = [\"127.0.0.1/32\"]\n");
    assert!(e.contains("p.toml: admin.listen: missing"), "{e}");
    let e = load("[admin]\nlisten = \"127.0.0.1:0\"\nallow = [\"everyone\"]\n");
    assert!(
        e.contains("p.toml: admin.allow[0]: \"everyone\" is not a network"),
        "{e}"
    );
    let e = load("[[client]]\nname = \"c\"\nnetworks = [\"127.0.0.1\"]\napps = []\n");
    assert!(e.contains("p.toml: client[0].apps: grants no app"), "{e}");
    let e = load("[[app]]\nname = \"b\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"t\"\nprefix = \"/b\"\n");
    assert!(e.contains("same credentials"), "{e}");
    // The same credentials spelled another way: the token path with a trailing slash, or
    // as token_params in another order.
    let e = load("[[app]]\nname = \"b\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"t\"\nprefix = \"/b\"\ntoken_path = \"/api/apps/v1/access-tokens/\"\n");
    assert!(e.contains("same credentials"), "{e}");
    let e = load("[[app]]\nname = \"b\"\nprefix = \"/b\"\ntoken_path = \"/api/apps/v1/access-tokens\"\n[app.token_params]\ncorp_id = \"1\"\ncorp_secret = \"t\"\napp_key = \"k\"\n");
    assert!(e.contains("same credentials"), "{e}");
    // A client with no path, listeners nobody may reach.
    let e =
        load("[[client]]\nname = \"c\"\nnetworks = [\"127.0.0.1\"]\napps = [\"a\"]\npaths = []\n");
    assert!(e.contains("p.toml: client[0].paths: grants no path"), "{e}");
    for key in ["server", "admin"] {
        let e = load(&format!("[{key}]\nlisten = \"127.0.0.1:0\"\nallow = []\n"));
        assert!(e.contains(&format!("p.toml: {key}.allow: is empty")), "{e}");
    }
}

#[test]
fn an_ipv4_mapped_network_in_an_allow_list_means_the_ipv4_one() {
    let config = cx_proxy::config::Config::from_toml(
        "[admin]\nlisten = \"127.0.0.1:0\"\nallow = [\"::ffff:127.0.0.1/128\", \"::ffff:10.0.0.0/104\"]\n[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\n",
        "p.toml",
        None,
    )
    .unwrap()
    .config;
    let allow: Vec<String> = config
        .admin
        .unwrap()
        .allow
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(allow, ["127.0.0.1/32", "10.0.0.0/8"]);
}

#[tokio::test]
async fn no_answer_to_head_carries_a_body_on_either_protocol() {
    // The upstream misbehaves (a body on HEAD, over h2 to the proxy).
    let env = EnvBuilder::new()
        .admin()
        .sandbox(cx_proxy::sandbox::SandboxOptions {
            head_bodies: true,
            ..Default::default()
        })
        .start()
        .await;
    env.ready().await;
    for h2 in [false, true] {
        let c = client(h2);
        // Forwarded: the sandbox's body is dropped, the answer is whole.
        let a = send(
            &c,
            request(http::Method::HEAD, &env.url("/api/apps/v1/robot/chats"), ""),
        )
        .await;
        assert_eq!(a.status, 200, "h2 {h2}");
        assert!(a.body.is_empty(), "h2 {h2}");
        // The proxy's own answers: no route, a refused path.
        let a = send(
            &c,
            request(http::Method::HEAD, &env.url("/api/apps/v1/robot%2Fx"), ""),
        )
        .await;
        assert_eq!(a.status, 400, "h2 {h2}");
        assert!(a.body.is_empty(), "h2 {h2}");
        assert_eq!(a.headers["x-cx-proxy-error"], "bad_request");
        // The admin port's answers have bodies on GET, none on HEAD.
        for path in ["/metrics", "/healthz", "/nowhere"] {
            let a = send(&c, request(http::Method::HEAD, &env.admin_url(path), "")).await;
            assert!(a.body.is_empty(), "h2 {h2} {path}: {:?}", a.body);
            let g = send(&c, request(http::Method::GET, &env.admin_url(path), "")).await;
            assert_eq!(a.status, g.status, "h2 {h2} {path}");
            assert!(!g.body.is_empty(), "h2 {h2} {path}");
        }
    }
    let metrics = get(&env.admin_url("/metrics")).await.text();
    assert!(!metrics.contains("upstream_errors_total{"), "{metrics}");
}

type Reply = Result<hyper::Response<http_body_util::Full<bytes::Bytes>>, String>;

/// An HTTP/1.1 upstream (its CA written to `dir/ca.pem`) that answers token fetches and
/// leaves every other request to `answer(n, path)`, `n` counting the requests its
/// connection served before (an `Err` closes the connection without an answer). Returns
/// its address and the requests it read, as `METHOD path`.
async fn test_upstream(
    dir: &std::path::Path,
    answer: fn(u32, &str) -> Reply,
) -> (SocketAddr, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    use std::sync::{Arc, Mutex};
    let ca = cx_proxy::sandbox::ca::TestCa::new("test upstream CA").unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let mut tls = (*ca.server_config().unwrap()).clone();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, log) = (acceptor.clone(), log.clone());
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let served = Arc::new(std::sync::atomic::AtomicU32::new(0));
                let service = hyper::service::service_fn(
                    move |req: hyper::Request<hyper::body::Incoming>| {
                        let (served, log) = (served.clone(), log.clone());
                        async move {
                            let path = req.uri().path().to_owned();
                            log.lock().unwrap().push(format!("{} {path}", req.method()));
                            let n = served.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                            if path.ends_with("/access-tokens") {
                                return Ok(json_reply(
                                    r#"{"err_code":0,"err_msg":"success","access_token":"tok-1","expires_in":7200}"#,
                                ));
                            }
                            answer(n, &path)
                        }
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .max_buf_size(1 << 20)
                    .serve_connection(hyper_util::rt::TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, seen)
}

fn json_reply(body: &'static str) -> hyper::Response<http_body_util::Full<bytes::Bytes>> {
    hyper::Response::new(http_body_util::Full::new(bytes::Bytes::from_static(
        body.as_bytes(),
    )))
}

const SUCCESS: &str = r#"{"err_code":0,"err_msg":"success","data":{}}"#;

/// A proxy with the default app in front of the test upstream at `addr` (CA in `dir`).
async fn proxy_before(dir: &std::path::Path, addr: SocketAddr) -> cx_proxy::ProxyHandle {
    std::fs::write(dir.join("corp_secret"), SECRET).unwrap();
    let text = format!(
        "[server]\nlisten = \"127.0.0.1:0\"\n[upstream]\nurl = \"https://127.0.0.1:{}\"\n\
         ca_file = \"{}\"\ntimeout_ms = 5000\nmax_connections = 1\n{}",
        addr.port(),
        dir.join("ca.pem").display(),
        default_app(dir)
    );
    cx_proxy::ProxyHandle::start(config(&text)).await.unwrap()
}

#[tokio::test]
async fn a_reused_connection_closed_before_the_answer_resends_only_what_is_safe() {
    let dir = tempfile::tempdir().unwrap();
    // The first call on a connection is answered; on the next, the connection is closed.
    let (addr, seen) = test_upstream(dir.path(), |n, _| match n {
        0 => Ok(json_reply(SUCCESS)),
        _ => Err("dropped".into()),
    })
    .await;
    let proxy = proxy_before(dir.path(), addr).await;
    let url = |p: &str| format!("http://{}{p}", proxy.addr);
    let c = client(false);
    // Each call after the first finds the pooled connection, which the upstream drops.
    for (method, path) in [
        (http::Method::GET, "/api/one"),
        (http::Method::GET, "/api/two"),
        (http::Method::OPTIONS, "/api/three"),
        (http::Method::HEAD, "/api/four"),
    ] {
        let a = send(&c, request(method.clone(), &url(path), "")).await;
        assert_eq!(a.status, 200, "{method} {path}: {}", a.text());
    }
    let count = |what: &str| seen.lock().unwrap().iter().filter(|s| *s == what).count();
    assert_eq!(count("GET /api/two"), 2, "sent, dropped, sent again");
    assert_eq!(count("OPTIONS /api/three"), 2);
    // Not idempotent, and its bytes were written: never sent twice, the client is told.
    for (method, path) in [
        (http::Method::POST, "/api/five"),
        (http::Method::PUT, "/api/six"),
    ] {
        let a = send(&c, request(method.clone(), &url(path), "{}")).await;
        let v = assert_proxy_error(&a, 502, "upstream_unreachable");
        assert!(
            v["err_msg"]
                .as_str()
                .unwrap()
                .contains("closed a reused connection before a complete answer head"),
            "{v}"
        );
        assert_eq!(count(&format!("{method} {path}")), 1);
        // The next call opens a fresh connection.
        assert_eq!(
            send(&c, request(http::Method::GET, &url("/api/x"), ""))
                .await
                .status,
            200
        );
    }
}

#[tokio::test]
async fn an_upstream_answer_with_many_header_fields_passes_and_too_many_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (addr, _) = test_upstream(dir.path(), |_, path| {
        let n = if path.ends_with("/many") { 120 } else { 600 };
        let mut resp = json_reply(SUCCESS);
        for i in 0..n {
            resp.headers_mut().insert(
                http::HeaderName::try_from(format!("x-field-{i}")).unwrap(),
                http::HeaderValue::from_static("v"),
            );
        }
        Ok(resp)
    })
    .await;
    let proxy = proxy_before(dir.path(), addr).await;
    // (Read raw: hyper's own client stops at 100 fields.)
    let answer = raw_exchange(
        proxy.addr,
        b"GET /api/many HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("x-field-119: v"), "{answer}");
    let a = get(&format!("http://{}/api/too-many", proxy.addr)).await;
    let v = assert_proxy_error(&a, 502, "upstream_unreachable");
    let msg = v["err_msg"].as_str().unwrap();
    assert!(
        msg.contains("response head is over the proxy's limit (512 header fields"),
        "{msg}"
    );
}

#[tokio::test]
async fn raw_bytes_in_a_target_are_forwarded_escaped_and_what_the_parser_refuses_is_counted() {
    let env = EnvBuilder::new().admin().start().await;
    env.ready().await;
    // GBK "张三" in a query, unescaped, as an old Windows system sends it.
    let answer = raw_exchange(
        env.proxy.addr,
        b"GET /api/apps/v1/robot/chats?name=\xd5\xc5\xc8\xfd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // UTF-8 in the path and a quote in the query, on a kept-alive connection's second request.
    let answer = raw_exchange(
        env.proxy.addr,
        "GET /api/a HTTP/1.1\r\nHost: x\r\n\r\nGET /api/名单?q=\"x\" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            .as_bytes(),
    )
    .await;
    assert_eq!(answer.matches("HTTP/1.1 200").count(), 2, "{answer}");
    let seen = env.sandbox.recorded();
    assert!(
        seen.iter()
            .any(|r| r.path == "/api/apps/v1/robot/chats" && r.query == "name=%D5%C5%C8%FD"),
        "{seen:?}"
    );
    assert!(
        seen.iter()
            .any(|r| r.path == "/api/%E5%90%8D%E5%8D%95" && r.query == "q=%22x%22"),
        "{seen:?}"
    );
    // What hyper still refuses (a method that is no token; raw bytes after a body) gets its
    // 400, and is counted by reason.
    let answer = raw_exchange(env.proxy.addr, b"G{T /api/a HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    let answer = raw_exchange(
        env.proxy.addr,
        b"POST /api/a HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}GET /api/\xe5 HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("HTTP/1.1 400"), "{answer}");
    // A body that looks like a request line with raw bytes, then a request: the body is
    // forwarded as sent, and nothing in it is taken for a request (no smuggling).
    let body: &[u8] = b"GET /\xd5\xd5\xd5\xd5\xd5\xd5\xd5\xd5 HTTP/1.1\r\nDELETE /api/apps/v1/to-do/SMUGGLED HTTP/1.1\r\nHost: x\r\nX: aaaaaaaaaaaaaaaa\r\n\r\n";
    for framing in [
        format!("content-LENGTH: {}", body.len()),
        format!("Content-Length: {}", body.len()),
    ] {
        let mut req = format!(
            "POST /api/apps/v1/robot/echo HTTP/1.1\r\nHost: x\r\n{framing}\r\nConnection: close\r\n\r\n"
        )
        .into_bytes();
        req.extend_from_slice(body);
        let answer = raw_exchange(env.proxy.addr, &req).await;
        assert_eq!(answer.matches("HTTP/1.1 ").count(), 1, "{answer}");
    }
    let seen = env.sandbox.recorded();
    assert!(
        !seen.iter().any(|r| r.path.contains("SMUGGLED")),
        "{seen:?}"
    );
    let echoed: Vec<_> = seen
        .iter()
        .filter(|r| r.path == "/api/apps/v1/robot/echo")
        .collect();
    assert_eq!(echoed.len(), 2, "{seen:?}");
    for r in echoed {
        assert_eq!(r.body_sha256, sha256(body), "the body was altered");
    }
    let metrics = get(&env.admin_url("/metrics")).await.text();
    for line in [
        "cx_proxy_http_parse_errors_total{reason=\"method\"} 1",
        "cx_proxy_http_parse_errors_total{reason=\"uri\"} 1",
    ] {
        assert!(metrics.contains(line), "{line} not in\n{metrics}");
    }
}
