//! The proxy against the platform as PLATFORM.md documents it: its token codes for both kinds
//! of app, the answers that are never a rejection, every shape a rejection can travel in, the
//! token endpoints no client may make the proxy call, and `expires_in` values no platform
//! should send. No config here sets `invalid_codes`: the defaults are what is tested.

mod support;

use std::collections::VecDeque;
use std::io::Read;
use std::path::Path;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use cx_proxy::sandbox::{AnswerShape, ExpiresIn, SandboxOptions};
use http::{Method, Request};
use http_body_util::BodyExt;
use support::*;

/// The demo app on every path and the sandbox's demo corp as a corp-service app under `/corp`.
fn both() -> EnvBuilder {
    EnvBuilder::new().apps(&both_apps())
}

fn both_apps() -> String {
    format!(
        "{}{}",
        default_app(Path::new("{dir}")),
        corp_app("corp", Some("/corp"))
    )
}

/// The token fetches the sandbox saw for the app, or for the corp.
fn fetches(env: &Env, corp: bool) -> u64 {
    if corp {
        env.sandbox.corp_token_fetches(CORP)
    } else {
        env.sandbox.token_fetches(APP_KEY)
    }
}

fn metrics(env: &Env) -> String {
    env.proxy.proxy.metrics().render()
}

/// The value of one metric line (0 when absent).
fn metric(env: &Env, series: &str) -> f64 {
    metrics(env)
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test]
async fn revoked_and_expired_tokens_of_both_kinds_are_replayed_once_with_the_body_intact() {
    // Tokens live 1 s at the platform but are announced as 7200 s, so only the platform
    // knows when one has expired (as with a token cut short on its side).
    let env = both()
        .sandbox(SandboxOptions {
            expires_in: Duration::from_secs(1),
            ..Default::default()
        })
        .prepare(|s| s.set_expires_in_field(ExpiresIn::Raw("7200".into())))
        .start()
        .await;
    env.ready().await;
    let cases = [
        (
            false,
            "default",
            "/api/apps/v1/robot/staffs/message?x=1",
            "/api/apps/v1/robot/staffs/message",
            ["49000", "49000"],
        ),
        (
            true,
            "corp",
            "/corp/api/corp-service/v1/address-book/changes?x=1",
            "/api/corp-service/v1/address-book/changes",
            ["40004", "40005"],
        ),
    ];
    for (corp, app, path, forwarded, codes) in cases {
        let body = format!(r#"{{"staff_ids":["s1"],"text":"for {app}"}}"#);
        let url = env.url(path);
        let a = send(&client(false), request(Method::POST, &url, body.clone())).await;
        assert_eq!(a.json()["err_code"], 0, "{}", a.text());
        let replays = format!("cx_proxy_replays_total{{app=\"{app}\"}}");
        for (make_dead, status, code) in [
            ("revoked", "unknown", codes[0]),
            ("expired", "expired", codes[1]),
        ] {
            let before = fetches(&env, corp);
            let replayed = metric(&env, &replays);
            match make_dead {
                "revoked" => assert!(env.sandbox.revoke_all() > 0),
                _ => tokio::time::sleep(Duration::from_millis(1100)).await,
            }
            let a = send(&client(false), request(Method::POST, &url, body.clone())).await;
            assert_eq!(a.status, 200);
            assert_eq!(
                a.json()["err_code"],
                0,
                "{app} {make_dead}: the client sees only the replay: {}",
                a.text()
            );
            assert_eq!(
                fetches(&env, corp),
                before + 1,
                "{app} {make_dead}: one fetch"
            );
            let seen = env.sandbox.recorded();
            let (dead, replay) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
            assert_eq!(dead.token_status, status, "{app} {make_dead}");
            assert_eq!(replay.token_status, "valid", "{app} {make_dead}");
            for r in [dead, replay] {
                assert_eq!(r.method, Method::POST);
                assert_eq!(r.path, forwarded);
                assert_eq!(r.query, "x=1");
                assert_eq!(r.body_sha256, sha256(body.as_bytes()), "{app}: body intact");
            }
            assert_eq!(
                metric(&env, &replays),
                replayed + 1.0,
                "{app} {make_dead}: one replay"
            );
            assert!(
                metric(
                    &env,
                    &format!("cx_proxy_platform_errors_total{{app=\"{app}\",code=\"{code}\"}}")
                ) >= 1.0,
                "{app} {make_dead}: {code} counted\n{}",
                metrics(&env)
            );
        }
    }
}

#[tokio::test]
async fn rate_limits_and_bad_credentials_reach_the_client_unchanged_with_no_fetch_or_replay() {
    // The gateway's own limits off: the platform's 49001 is what this is about.
    let env = both().set("limits.enabled", false).start().await;
    env.ready().await;
    let (app_fetches, corp_fetches) = (fetches(&env, false), fetches(&env, true));
    let seen = env.sandbox.recorded().len();

    // A real documented limit: card templates, 10 an hour per app.
    let url = env.url("/api/apps/v1/card/templates");
    for _ in 0..10 {
        assert_eq!(get(&url).await.json()["err_code"], 0);
    }
    let a = get(&url).await;
    assert_eq!(a.status, 200);
    assert!(a.headers.get("x-cx-proxy-error").is_none());
    assert_eq!(a.json()["err_code"], 49001, "{}", a.text());

    // The organisation service's own codes on one of its APIs.
    let url = env.url("/corp/api/corp-service/v1/address-book");
    for (code, msg) in [
        (55001, "rate limit exceeded"),
        (40001, "invalid authentication"),
    ] {
        env.sandbox.answer_next(1, code, msg);
        let a = get(&url).await;
        assert_eq!(a.status, 200);
        assert!(a.headers.get("x-cx-proxy-error").is_none());
        assert_eq!(
            a.json(),
            serde_json::json!({"err_code": code, "err_msg": msg})
        );
    }

    // A self-built app's token on an organisation-service API: the platform's 40004, shown
    // as it is (not a rejection for this app, so no fetch).
    let a = get_with(
        &env.url("/api/corp-service/v1/address-book"),
        &[("x-cx-app", "default")],
    )
    .await;
    assert_eq!(a.json()["err_code"], 40004);

    assert_eq!(fetches(&env, false), app_fetches, "no fetch for 49001");
    assert_eq!(
        fetches(&env, true),
        corp_fetches,
        "no fetch for 55001 or 40001"
    );
    assert_eq!(
        env.sandbox.recorded().len(),
        seen + 14,
        "each call reached the platform once: no replay"
    );
    for series in [
        "cx_proxy_platform_errors_total{app=\"default\",code=\"49001\"} 1",
        "cx_proxy_platform_errors_total{app=\"corp\",code=\"55001\"} 1",
        "cx_proxy_platform_errors_total{app=\"corp\",code=\"40001\"} 1",
        "cx_proxy_replays_total{app=\"default\"} 0",
        "cx_proxy_replays_total{app=\"corp\"} 0",
    ] {
        assert_metrics(&env.proxy, series, true);
    }
}

/// Decodes a body by its `Content-Encoding`, as a client that asked for it would.
fn decoded(a: &Answer) -> serde_json::Value {
    let coding = a
        .headers
        .get("content-encoding")
        .map(|v| v.to_str().unwrap().to_owned());
    let mut out = Vec::new();
    match coding.as_deref() {
        None => out = a.body.to_vec(),
        Some("gzip") => {
            flate2::read::GzDecoder::new(&a.body[..])
                .read_to_end(&mut out)
                .unwrap();
        }
        Some("deflate") => {
            flate2::read::ZlibDecoder::new(&a.body[..])
                .read_to_end(&mut out)
                .unwrap();
        }
        Some("br") => {
            brotli::Decompressor::new(&a.body[..], 4096)
                .read_to_end(&mut out)
                .unwrap();
        }
        Some(other) => panic!("unexpected coding {other}"),
    }
    serde_json::from_slice(&out).unwrap()
}

#[tokio::test]
async fn a_rejection_is_seen_whatever_its_encoding_type_or_framing() {
    // One fetch per shape: more than the default cap of 6 a minute.
    let env = EnvBuilder::new()
        .set("token.max_fetches_per_minute", 20)
        .start()
        .await;
    env.ready().await;
    let shapes = [
        ("gzip", Some("gzip"), None, false),
        ("deflate", Some("deflate"), None, false),
        ("br", Some("br"), None, false),
        ("text/plain", None, Some("text/plain; charset=utf-8"), false),
        ("chunked", None, None, true),
        ("gzip, chunked, untyped", Some("gzip"), Some(""), true),
    ];
    for (i, (name, encoding, content_type, chunked)) in shapes.into_iter().enumerate() {
        env.sandbox.shape_answers(AnswerShape {
            encoding: encoding.map(str::to_owned),
            content_type: content_type.map(str::to_owned),
            chunked,
        });
        let before = fetches(&env, false);
        env.sandbox.revoke_all();
        let a = get_with(
            &env.url("/api/apps/v1/sso/user?oauth_code=shape"),
            &[("accept-encoding", "gzip, deflate, br")],
        )
        .await;
        assert_eq!(a.status, 200, "{name}");
        assert_eq!(
            a.headers
                .get("content-encoding")
                .map(|v| v.to_str().unwrap()),
            encoding,
            "{name}: the client gets the platform's bytes"
        );
        assert_eq!(decoded(&a)["err_code"], 0, "{name}: replayed");
        assert_eq!(fetches(&env, false), before + 1, "{name}: one fetch");
        assert_eq!(
            metric(&env, "cx_proxy_replays_total{app=\"default\"}"),
            (i + 1) as f64,
            "{name}: one replay"
        );
        let seen = env.sandbox.recorded();
        assert_eq!(seen[seen.len() - 2].token_status, "unknown", "{name}");
    }
}

/// A request body fed by the test, chunk by chunk (no declared length).
struct Fed(tokio::sync::mpsc::Receiver<Bytes>);

impl http_body::Body for Fed {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        self.0
            .poll_recv(cx)
            .map(|c| c.map(|b| Ok(http_body::Frame::data(b))))
    }
}

/// Sends `data` as a chunked body to the sandbox's JSON echo through the proxy, in pieces of
/// `piece` bytes; the first `first` bytes go before the rest, and the rest only once the
/// answer has delivered `wait_for` bytes. Returns what came back.
async fn echo_through(
    env: &Env,
    data: &[u8],
    first: usize,
    piece: usize,
    wait_for: usize,
) -> Vec<u8> {
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(4);
    let mut sender = {
        let stream = tokio::net::TcpStream::connect(env.proxy.addr)
            .await
            .unwrap();
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Fed>(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        sender
    };
    let req = Request::builder()
        .method(Method::POST)
        .uri("/api/apps/v1/robot/staffs/message?sandbox_echo=json")
        .header("host", "proxy")
        .header("content-type", "application/json")
        .body(Fed(rx))
        .unwrap();
    let mut pieces: VecDeque<Bytes> = data[first..]
        .chunks(piece)
        .map(Bytes::copy_from_slice)
        .collect();
    tx.send(Bytes::copy_from_slice(&data[..first]))
        .await
        .unwrap();
    let resp = tokio::spawn(async move { sender.send_request(req).await });
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("the answer's head arrives before the request body ends")
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut body = resp.into_body();
    let mut got = Vec::with_capacity(data.len());
    // Nothing more is sent until the proxy has passed the first bytes on: an answer held
    // whole would stop here.
    while got.len() < wait_for {
        let frame = tokio::time::timeout(Duration::from_secs(10), body.frame())
            .await
            .expect("the first bytes stream on")
            .unwrap()
            .unwrap();
        if let Some(d) = frame.data_ref() {
            got.extend_from_slice(d);
        }
    }
    let feed = tokio::spawn(async move {
        while let Some(p) = pieces.pop_front() {
            tx.send(p).await.unwrap();
        }
    });
    while let Some(frame) = body.frame().await {
        if let Some(d) = frame.unwrap().data_ref() {
            got.extend_from_slice(d);
        }
    }
    feed.await.unwrap();
    got
}

#[tokio::test]
async fn large_chunked_answers_stream_on_intact_after_the_hold() {
    let env = env().await;
    env.ready().await;
    let small = noise(200 * 1024);
    let hold = 64 * 1024 + 1;
    let got = echo_through(&env, &small, 70 * 1024, 16 * 1024, hold).await;
    assert_eq!(sha256(&got), sha256(&small), "200 KiB intact");
    let large = noise(5 * 1024 * 1024);
    let got = echo_through(&env, &large, 70 * 1024, 64 * 1024, hold).await;
    assert_eq!(got.len(), large.len());
    assert_eq!(sha256(&got), sha256(&large), "5 MB intact");
    assert_metrics(
        &env.proxy,
        "cx_proxy_replays_total{app=\"default\"} 0",
        true,
    );
}

#[tokio::test]
async fn an_answer_slower_than_timeout_ms_streams_on_instead_of_failing() {
    // The head comes at once; the body's first kilobyte, then nothing for longer than
    // timeout_ms: held for the probe until then, after which it streams on unprobed.
    let env = EnvBuilder::new()
        .set("upstream.timeout_ms", 500)
        .start()
        .await;
    env.ready().await;
    let data = noise(4 * 1024);
    let got = echo_through(&env, &data, 1024, 1024, 1024).await;
    assert_eq!(
        sha256(&got),
        sha256(&data),
        "intact, and the client got no 504"
    );
}

#[tokio::test]
async fn no_client_can_make_the_proxy_fetch_through_a_token_endpoint() {
    let env = both().start().await;
    env.ready().await;
    let (app_fetches, corp_fetches) = (fetches(&env, false), fetches(&env, true));
    let seen = env.sandbox.requests_seen();
    let app_url = env.url(&format!(
        "/api/apps/v1/access-tokens?app_key={APP_KEY}&corp_id=10001&corp_secret={SECRET}"
    ));
    let corp_url =
        env.url("/api/corp-service/v1/access-tokens?corp_id=20002&corp_secret=demo-corp-secret");
    for url in [&app_url, &corp_url] {
        for method in [Method::POST, Method::PUT] {
            for _ in 0..8 {
                let a = send(&client(false), request(method.clone(), url, "")).await;
                assert_proxy_error(&a, 405, "method_not_allowed");
            }
        }
        let a = send(&client(false), request(Method::HEAD, url, "")).await;
        assert_eq!(a.status, 405);
        assert!(a.body.is_empty(), "an answer to HEAD has no body");
    }
    // Spellings a lenient server would still serve as the token endpoint.
    for spelled in [
        "/api//apps/v1/access-tokens",
        "/api/apps/v1/access-tokens/",
        "/api/apps/v1/%61ccess-tokens",
    ] {
        let url = env.url(&format!(
            "{spelled}?app_key={APP_KEY}&corp_id=10001&corp_secret={SECRET}"
        ));
        let a = send(&client(false), request(Method::POST, &url, "")).await;
        assert_proxy_error(&a, 405, "method_not_allowed");
    }
    assert_eq!(fetches(&env, false), app_fetches, "no platform fetch");
    assert_eq!(fetches(&env, true), corp_fetches, "no platform fetch");
    assert_eq!(env.sandbox.requests_seen(), seen, "nothing was forwarded");

    // GET is answered from the cache, for the corp-service app too (on the path as
    // forwarded, whichever app the route picked).
    let issued = env.sandbox.issued_tokens();
    let v = get(&corp_url).await.json();
    assert_eq!(v["err_code"], 0, "{v}");
    assert!(issued.iter().any(|t| v["access_token"] == t.as_str()));
    let v = get(&env
        .url("/corp/api/corp-service/v1/access-tokens?corp_id=20002&corp_secret=demo-corp-secret"))
    .await
    .json();
    assert_eq!(v["err_code"], 0, "{v}");
    let a =
        get(&env.url("/api/corp-service/v1/access-tokens?corp_id=20002&corp_secret=guess")).await;
    assert_proxy_error(&a, 401, "bad_credentials");
    assert_eq!(fetches(&env, true), corp_fetches);
}

#[tokio::test]
async fn odd_expires_in_values_never_stop_the_proxy() {
    let env = EnvBuilder::new()
        .set("token.max_fetches_per_minute", 100)
        .start()
        .await;
    env.ready().await;
    let token_url = env.url(&format!(
        "/api/apps/v1/access-tokens?app_key={APP_KEY}&corp_id=10001&corp_secret={SECRET}"
    ));
    let cases = [
        ("0", None),
        ("-5", None),
        ("9223372036854775807", Some(30 * 86_400)),
        ("1e300", Some(30 * 86_400)),
        ("absent", Some(7200)),
    ];
    for (raw, lifetime) in cases {
        env.sandbox.set_expires_in_field(match raw {
            "absent" => ExpiresIn::Absent,
            raw => ExpiresIn::Raw(raw.to_owned()),
        });
        env.sandbox.revoke_all();
        let a = get(&env.url("/api/apps/v1/sso/user?oauth_code=x")).await;
        match lifetime {
            Some(secs) => {
                assert_eq!(a.json()["err_code"], 0, "{raw}: {}", a.text());
                let left = get(&token_url).await.json()["expires_in"].as_u64().unwrap();
                assert!(left <= secs && left + 60 > secs, "{raw}: {left} s left");
            }
            None => {
                let v = assert_proxy_error(&a, 502, "token_unavailable");
                assert!(
                    v["err_msg"].as_str().unwrap().contains("expires_in"),
                    "{raw}: {v}"
                );
            }
        }
        // Whatever came before, a sane answer gets the proxy going again.
        env.sandbox.set_expires_in_field(ExpiresIn::Lifetime);
        env.sandbox.revoke_all();
        let a = get(&env.url("/api/apps/v1/sso/user?oauth_code=y")).await;
        assert_eq!(a.json()["err_code"], 0, "after {raw}: {}", a.text());
    }
}

#[tokio::test]
async fn a_client_gets_only_the_tokens_of_apps_it_is_granted() {
    let clients = format!(
        "{}\n[[client]]\nname = \"billing\"\nnetworks = [\"127.0.0.1/32\", \"::1\"]\napps = [\"default\"]\n",
        both_apps()
    );
    let env = EnvBuilder::new().apps(&clients).start().await;
    env.ready().await;
    let own = get(&env.url(&format!(
        "/api/apps/v1/access-tokens?app_key={APP_KEY}&corp_id=10001&corp_secret={SECRET}"
    )))
    .await;
    assert_eq!(own.json()["err_code"], 0, "{}", own.text());
    // Routed to "default" by its prefix, but naming the corp-service app.
    let other =
        get(&env
            .url("/api/corp-service/v1/access-tokens?corp_id=20002&corp_secret=demo-corp-secret"))
        .await;
    let v = assert_proxy_error(&other, 403, "forbidden");
    assert!(!other.text().contains("access_token"), "{v}");
}
