//! The callback relay (SPEC section 8): the sandbox sends callbacks as the platform does, the
//! relay checks and keeps them, a test receiver takes them.

mod support;

use std::time::Duration;

use cx_proxy::relay::verify::{base_string, members, sign, Signed};
use cx_proxy::sandbox::callbacks::CallbackSend;
use cx_proxy::sandbox::receiver::Receiver;
use http::Method;
use serde_json::{json, Value};
use support::*;

const KEY: &str = "the-callback-key";

struct Relay {
    env: Env,
    receiver: Receiver,
}

impl Relay {
    /// The callback URL registered on the platform.
    fn url(&self) -> String {
        format!(
            "http://{}/cx/callback",
            self.env.proxy.callbacks_addr.expect("callbacks listener")
        )
    }

    fn send(&self, body: Value) -> CallbackSend {
        CallbackSend {
            url: self.url(),
            key: KEY.into(),
            corpid: json!(10001),
            body: body.as_object().cloned().unwrap_or_default(),
            test: false,
        }
    }

    async fn admin_json(&self, method: Method, path: &str) -> Value {
        send(
            &client(false),
            request(method, &self.env.admin_url(path), Vec::new()),
        )
        .await
        .json()
    }
}

/// A proxy with a relay on route `contacts` (path `/cx/callback`, app `default`) to a fresh
/// receiver; `table` adds lines to `[callbacks]`.
async fn relay(table: &str) -> Relay {
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    let extra = format!(
        "[callbacks]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]\nqueue = \"{{dir}}/queue.db\"\n{table}\n\n\
         [[callback]]\nname = \"contacts\"\npath = \"/cx/callback\"\napp = \"default\"\n\
         key_file = \"{{dir}}/cb_key\"\ndeliver_to = \"{}\"\n",
        receiver.url("/events")
    );
    let env = EnvBuilder::new()
        .admin()
        .file("cb_key", KEY)
        .extra(&extra)
        .start()
        .await;
    Relay { env, receiver }
}

/// The query of a callback signed with `key` as the platform signs it.
fn signed_query(key: &str, corpid: &str, ts: u64, nonce: &str, body: &Value) -> String {
    let mut s = Signed {
        corpid: corpid.into(),
        timestamp: ts.to_string(),
        nonce: nonce.into(),
        signature: String::new(),
    };
    let members = members(body.to_string().as_bytes()).unwrap();
    s.signature = sign(key.as_bytes(), &base_string(&members, &s));
    format!(
        "corpid={}&timestamp={}&nonce={}&signature={}",
        s.corpid, s.timestamp, s.nonce, s.signature
    )
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn post(url: &str, body: &Value) -> Answer {
    let mut req = request(Method::POST, url, body.to_string());
    req.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    send(&client(false), req).await
}

#[tokio::test]
async fn a_valid_callback_is_acknowledged_and_delivered_once_as_it_was_sent() {
    let r = relay("").await;
    let body = json!({"event_type": "user_add", "user_ids": ["u1", "u2"], "n": 3});
    let attempts = r
        .env
        .sandbox
        .send_callback(&r.send(body.clone()))
        .await
        .unwrap();
    assert_eq!(attempts, vec![200]);
    assert_eq!(r.receiver.wait_for(1, Duration::from_secs(10)).await, 1);
    let got = &r.receiver.received()[0];
    assert_eq!(got.method, "POST");
    assert_eq!(got.path, "/events");
    let q: Vec<&str> = got
        .query
        .split('&')
        .map(|p| p.split('=').next().unwrap())
        .collect();
    assert_eq!(
        q,
        ["corpid", "timestamp", "nonce", "signature"],
        "{}",
        got.query
    );
    assert_eq!(serde_json::from_slice::<Value>(&got.body).unwrap(), body);
    assert_eq!(got.header("x-cx-verified"), Some("1"));
    assert!(got.header("x-cx-callback-id").unwrap().starts_with("cb-"));
    assert!(got
        .header("content-type")
        .unwrap()
        .starts_with("application/json"));

    // The address-test request likewise.
    let mut test = r.send(json!({}));
    test.test = true;
    assert_eq!(r.env.sandbox.send_callback(&test).await.unwrap(), vec![200]);
    assert_eq!(r.receiver.wait_for(2, Duration::from_secs(10)).await, 2);
    let got = &r.receiver.received()[1];
    assert_eq!(
        serde_json::from_slice::<Value>(&got.body).unwrap(),
        json!({"event_type": "callback_url_test"})
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.receiver.received().len(), 2, "each delivered once");
    // The queue holds contacts data: its owner's only.
    use std::os::unix::fs::PermissionsExt as _;
    let mode = std::fs::metadata(r.env.dir.path().join("queue.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600, "{mode:o}");
}

#[tokio::test]
async fn a_body_is_checked_as_sent_not_as_a_parser_would_rewrite_it() {
    let r = relay("").await;
    // Members out of order, a nested object out of order, numbers a parser would rewrite.
    let text = r#"{"event_type":"user_update","o":{"z":1,"a":[2, 3]},"n":1.10,"big":123456789012345678901234,"e":1e2}"#;
    let mut s = Signed {
        corpid: "10001".into(),
        timestamp: now().to_string(),
        nonce: "as-sent".into(),
        signature: String::new(),
    };
    s.signature = sign(
        KEY.as_bytes(),
        &base_string(&members(text.as_bytes()).unwrap(), &s),
    );
    let url = format!(
        "{}?corpid={}&timestamp={}&nonce={}&signature={}",
        r.url(),
        s.corpid,
        s.timestamp,
        s.nonce,
        s.signature
    );
    let a = send(&client(false), request(Method::POST, &url, text)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(r.receiver.wait_for(1, Duration::from_secs(10)).await, 1);
    assert_eq!(
        &r.receiver.received()[0].body[..],
        text.as_bytes(),
        "delivered byte for byte"
    );
    // A member named twice is refused: which one a receiver reads would be a guess.
    let twice = r#"{"event_type":"a","event_type":"b"}"#;
    let a = send(
        &client(false),
        request(Method::POST, &url.replace("as-sent", "twice"), twice),
    )
    .await;
    let v = assert_proxy_error(&a, 400, "bad_request");
    assert!(v["err_msg"].as_str().unwrap().contains("twice"), "{v}");
}

#[tokio::test]
async fn forged_stale_foreign_and_replayed_callbacks_are_401_and_never_delivered() {
    let r = relay("max_skew_s = 60").await;
    let body = json!({"event_type": "user_add"});
    let url = |q: &str| format!("{}?{q}", r.url());
    let cases = [
        (
            "signature",
            signed_query("wrong-key", "10001", now(), "n1", &body),
        ),
        ("corpid", signed_query(KEY, "10002", now(), "n2", &body)),
        (
            "timestamp",
            signed_query(KEY, "10001", now() - 3600, "n3", &body),
        ),
    ];
    for (reason, q) in &cases {
        let a = post(&url(q), &body).await;
        let v = assert_proxy_error(&a, 401, "callback_rejected");
        assert!(v["err_msg"].as_str().unwrap().contains(reason), "{v}");
        assert!(!a.text().contains(KEY));
    }
    // The same callback twice (a platform retry): acknowledged twice, delivered once.
    let q = signed_query(KEY, "10001", now(), "n4", &body);
    let first = post(&url(&q), &body).await;
    let second = post(&url(&q), &body).await;
    assert_eq!(
        (first.status.as_u16(), second.status.as_u16()),
        (200, 200),
        "{}",
        second.text()
    );
    assert_eq!(
        first.headers.get("x-cx-callback-id"),
        second.headers.get("x-cx-callback-id")
    );
    // The nonce again with another signature (another body): a replay.
    let other = json!({"event_type": "user_delete"});
    let replay = signed_query(KEY, "10001", now(), "n4", &other);
    let a = post(&url(&replay), &other).await;
    let v = assert_proxy_error(&a, 401, "callback_rejected");
    assert!(v["err_msg"].as_str().unwrap().contains("nonce"), "{v}");

    assert_eq!(r.receiver.wait_for(1, Duration::from_secs(10)).await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let got = r.receiver.received();
    assert_eq!(got.len(), 1, "only the genuine callback, once");
    assert!(got[0].query.contains("nonce=n4"));
    let metrics = send(
        &client(false),
        request(Method::GET, &r.env.admin_url("/metrics"), Vec::new()),
    )
    .await
    .text();
    for reason in ["signature", "corpid", "timestamp", "nonce"] {
        assert!(
            metrics.contains(&format!(
                "cx_proxy_callbacks_received_total{{reason=\"{reason}\",result=\"rejected\",route=\"contacts\"}} 1"
            )),
            "{reason}: {metrics}"
        );
    }
    assert!(!metrics.contains(KEY));
    assert_promtool_clean(&metrics);
}

#[tokio::test]
async fn bad_input_gets_a_clear_error_and_nothing_is_kept() {
    let r = relay("max_body_bytes = 200").await;
    let body = json!({"event_type": "user_add"});
    let q = signed_query(KEY, "10001", now(), "b1", &body);
    let base = format!(
        "http://{}",
        r.env.proxy.callbacks_addr.expect("callbacks listener")
    );
    let big = json!({"event_type": "x".repeat(300)});
    let big_q = signed_query(KEY, "10001", now(), "b2", &big);
    assert_proxy_error(
        &post(&format!("{base}/cx/callback?{big_q}"), &big).await,
        413,
        "payload_too_large",
    );
    let a = send(
        &client(false),
        request(Method::POST, &format!("{base}/cx/callback?{q}"), "not json"),
    )
    .await;
    assert_proxy_error(&a, 400, "bad_request");
    let a = post(&format!("{base}/cx/callback?corpid=10001&nonce=b3"), &body).await;
    let v = assert_proxy_error(&a, 400, "bad_request");
    assert!(v["err_msg"].as_str().unwrap().contains("timestamp"), "{v}");
    let a = post(&format!("{base}/cx/callback?{q}&nonce=again"), &body).await;
    let v = assert_proxy_error(&a, 400, "bad_request");
    assert!(v["err_msg"].as_str().unwrap().contains("twice"), "{v}");
    assert_proxy_error(
        &post(&format!("{base}/elsewhere?{q}"), &body).await,
        404,
        "no_route",
    );
    let a = send(
        &client(false),
        request(Method::GET, &format!("{base}/cx/callback?{q}"), Vec::new()),
    )
    .await;
    assert_proxy_error(&a, 405, "method_not_allowed");
    // Nothing of that was kept or delivered; the genuine one still is.
    assert_eq!(
        post(&format!("{base}/cx/callback?{q}"), &body).await.status,
        200
    );
    assert_eq!(r.receiver.wait_for(1, Duration::from_secs(10)).await, 1);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(r.receiver.received().len(), 1);
}

#[tokio::test]
async fn two_hundred_callbacks_twenty_at_a_time_arrive_in_order() {
    let r = relay("").await;
    for batch in 0..10 {
        let calls: Vec<_> = (0..20)
            .map(|i| {
                let n = batch * 20 + i;
                let body = json!({"event_type": "user_add", "seq": n});
                let q = signed_query(KEY, "10001", now(), &format!("seq-{n}"), &body);
                let url = format!("{}?{q}", r.url());
                tokio::spawn(async move { (n, post(&url, &body).await.status) })
            })
            .collect();
        for call in calls {
            let (n, status) = call.await.unwrap();
            assert_eq!(status, 200, "callback {n}");
        }
    }
    assert_eq!(r.receiver.wait_for(200, Duration::from_secs(60)).await, 200);
    let seqs = seqs(&r.receiver);
    // Every batch was acknowledged before the next was sent: batches arrive in order, and
    // each callback once.
    for (i, s) in seqs.iter().enumerate() {
        assert_eq!(*s / 20, i as u64 / 20, "order: {seqs:?}");
    }
    let mut sorted = seqs.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(sorted.len(), 200);
}

/// The `seq` of every body the receiver took, in the order it took them.
fn seqs(receiver: &Receiver) -> Vec<u64> {
    receiver
        .received()
        .iter()
        .map(|g| {
            serde_json::from_slice::<Value>(&g.body).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[tokio::test]
async fn a_receiver_down_for_five_seconds_gets_every_event_after_in_order() {
    let r = relay("").await;
    r.receiver.answer(503);
    for n in 0..5 {
        let attempts = r
            .env
            .sandbox
            .send_callback(&r.send(json!({"event_type": "user_add", "seq": n})))
            .await
            .unwrap();
        assert_eq!(
            attempts,
            vec![200],
            "acknowledged while the receiver is down"
        );
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(r.receiver.received().len(), 0);
    r.receiver.answer(200);
    assert_eq!(r.receiver.wait_for(5, Duration::from_secs(30)).await, 5);
    let seqs = seqs(&r.receiver);
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
}

#[tokio::test]
async fn a_dead_letter_is_shown_and_redelivered_on_request() {
    let r = relay("retry_for_s = 1").await;
    r.receiver.answer(500);
    let attempts = r
        .env
        .sandbox
        .send_callback(&r.send(json!({"event_type": "user_add", "seq": 1})))
        .await
        .unwrap();
    assert_eq!(attempts, vec![200]);
    // Tried at once and after about a second, then dead.
    let mut view = Value::Null;
    for _ in 0..100 {
        view = r.admin_json(Method::GET, "/callbacks").await;
        if view["routes"][0]["dead"] == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let route = &view["routes"][0];
    assert_eq!(route["name"], "contacts");
    assert_eq!(route["dead"], 1, "{view}");
    assert_eq!(route["pending"], 0, "{view}");
    let letter = &route["dead_letters"][0];
    assert!(letter["attempts"].as_u64().unwrap() >= 2, "{view}");
    assert!(
        letter["last_error"].as_str().unwrap().contains("500"),
        "{view}"
    );
    assert!(!view.to_string().contains(KEY));

    // Something behind it is not blocked.
    r.receiver.answer(200);
    r.env
        .sandbox
        .send_callback(&r.send(json!({"event_type": "user_add", "seq": 2})))
        .await
        .unwrap();
    assert_eq!(r.receiver.wait_for(1, Duration::from_secs(10)).await, 1);

    for odd in [
        "/callbacks/redeliver",
        "/callbacks//redeliver",
        "/callbacks/nope/redeliver",
    ] {
        let a = send(
            &client(false),
            request(Method::POST, &r.env.admin_url(odd), Vec::new()),
        )
        .await;
        assert_eq!(a.status, 404, "{odd}: {}", a.text());
    }
    let v = r
        .admin_json(Method::POST, "/callbacks/contacts/redeliver")
        .await;
    assert_eq!(v["requeued"], 1, "{v}");
    assert_eq!(r.receiver.wait_for(2, Duration::from_secs(10)).await, 2);
    let got = r.receiver.received();
    assert_eq!(
        serde_json::from_slice::<Value>(&got[1].body).unwrap()["seq"],
        1
    );
    assert_eq!(
        got[1].header("x-cx-callback-id").unwrap(),
        letter["id"].as_str().unwrap(),
        "the same id as before"
    );
    let v = r.admin_json(Method::GET, "/callbacks").await;
    assert_eq!(v["routes"][0]["dead"], 0, "{v}");
}

#[tokio::test]
async fn a_queue_that_cannot_commit_answers_503_until_it_can() {
    let r = relay("").await;
    // First callback: the file exists and commits.
    let attempts = r
        .env
        .sandbox
        .send_callback(&r.send(json!({"event_type": "user_add", "seq": 1})))
        .await
        .unwrap();
    assert_eq!(attempts, vec![200]);
    // Delivered and let go before the disk turns read-only.
    assert_eq!(r.receiver.wait_for(1, Duration::from_secs(10)).await, 1);
    for _ in 0..100 {
        if r.admin_json(Method::GET, "/callbacks").await["routes"][0]["pending"] == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let db = r.env.dir.path().join("queue.db");
    let files: Vec<_> = ["queue.db", "queue.db-wal"]
        .iter()
        .map(|f| r.env.dir.path().join(f))
        .filter(|p| p.exists())
        .collect();
    assert!(db.exists());
    let chattr = |flag: &str| {
        for f in &files {
            let ok = std::process::Command::new("chattr")
                .arg(flag)
                .arg(f)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            assert!(ok, "chattr {flag} {} (needs root and ext4)", f.display());
        }
    };
    chattr("+i");
    let body = json!({"event_type": "user_add", "seq": 2});
    let q = signed_query(KEY, "10001", now(), "imm-1", &body);
    let a = post(&format!("{}?{q}", r.url()), &body).await;
    let unavailable = a.status.as_u16();
    let text = a.text();
    // The sandbox's own retries succeed once the queue can commit again.
    let cb = r.send(json!({"event_type": "user_add", "seq": 3}));
    let (attempts, ()) = tokio::join!(r.env.sandbox.send_callback(&cb), async {
        tokio::time::sleep(Duration::from_millis(500)).await;
        chattr("-i");
    });
    assert_eq!(unavailable, 503, "{text}");
    assert!(
        text.contains("callback_unavailable") || text.contains("990463"),
        "{text}"
    );
    let attempts = attempts.unwrap();
    assert_eq!(attempts.first(), Some(&503), "{attempts:?}");
    assert_eq!(attempts.last(), Some(&200), "{attempts:?}");
    assert_eq!(r.receiver.wait_for(2, Duration::from_secs(10)).await, 2);
    let seqs = seqs(&r.receiver);
    assert_eq!(seqs, [1, 3], "the refused one was not kept");
}

#[tokio::test]
async fn a_slow_sender_gets_400_and_nothing_is_kept() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let r = relay("").await;
    let body = json!({"event_type": "user_add"});
    let q = signed_query(KEY, "10001", now(), "slow-1", &body);
    let addr = r.env.proxy.callbacks_addr.unwrap();
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let text = body.to_string();
    let head = format!(
        "POST /cx/callback?{q} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        text.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    // Half the body, then nothing.
    s.write_all(&text.as_bytes()[..text.len() / 2])
        .await
        .unwrap();
    let mut out = vec![0u8; 4096];
    let n = tokio::time::timeout(Duration::from_secs(15), s.read(&mut out))
        .await
        .expect("answered within the body timeout")
        .unwrap();
    let answer = String::from_utf8_lossy(&out[..n]);
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(answer.contains("did not arrive within"), "{answer}");
    let v = r.admin_json(Method::GET, "/callbacks").await;
    assert_eq!(v["routes"][0]["pending"], 0, "{v}");
    assert!(r.receiver.received().is_empty());
}

#[tokio::test]
async fn the_listener_speaks_https_with_its_certificate_and_readyz_shows_the_queue() {
    let ca = cx_proxy::sandbox::ca::TestCa::new("callback listener CA").unwrap();
    let issued = ca.server_cert().unwrap();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cb.pem"), &issued.cert_pem).unwrap();
    std::fs::write(dir.path().join("cb-key.pem"), &issued.key_pem).unwrap();
    let r = relay(&format!(
        "tls_cert = \"{0}/cb.pem\"\ntls_key = \"{0}/cb-key.pem\"",
        dir.path().display()
    ))
    .await;
    let mut cb = r.send(json!({"event_type": "user_add"}));
    cb.url = cb.url.replace("http://", "https://");
    // The platform's side trusting the listener's CA.
    let attempts = cx_proxy::sandbox::callbacks::send(&cb, Some(ca.pem()))
        .await
        .unwrap();
    assert_eq!(attempts, vec![200]);
    assert_eq!(r.receiver.wait_for(1, Duration::from_secs(10)).await, 1);
    // Plain HTTP on the TLS port is no callback.
    let plain = r.send(json!({"event_type": "user_add"}));
    let attempts = cx_proxy::sandbox::callbacks::send(&plain, None)
        .await
        .unwrap();
    assert!(attempts.iter().all(|s| *s != 200), "{attempts:?}");
    let ready = r.admin_json(Method::GET, "/readyz").await;
    assert_eq!(
        ready["callbacks"]["routes"][0]["name"], "contacts",
        "{ready}"
    );
    assert_eq!(ready["callbacks"]["routes"][0]["pending"], 0, "{ready}");
}

#[tokio::test]
async fn a_removed_route_keeps_its_events_until_it_returns() {
    let r = relay("").await;
    r.receiver.answer(503);
    for seq in 0..2 {
        let attempts = r
            .env
            .sandbox
            .send_callback(&r.send(json!({"event_type": "user_add", "seq": seq})))
            .await
            .unwrap();
        assert_eq!(attempts, vec![200]);
    }
    let dir = r.env.dir.path();
    let table = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[callbacks]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]\nqueue = \"{}/queue.db\"\n",
        dir.display()
    );
    let route = format!(
        "[[callback]]\nname = \"contacts\"\npath = \"/cx/callback\"\napp = \"default\"\nkey_file = \"{}/cb_key\"\ndeliver_to = \"{}\"\n",
        dir.display(),
        r.receiver.url("/events")
    );
    // Reloaded without the route: its events stay, its path is no longer served.
    let without = config_text(&r.env.sandbox, dir, &format!("{table}{}", default_app(dir)));
    r.env.proxy.gateway.apply(config(&without)).await.unwrap();
    r.receiver.answer(200);
    let a = post(&r.url(), &json!({})).await;
    assert_proxy_error(&a, 404, "no_route");
    let v = r.admin_json(Method::GET, "/callbacks").await;
    assert_eq!(v["unrouted"][0]["name"], "contacts", "{v}");
    assert_eq!(v["unrouted"][0]["events"], 2, "{v}");
    // The queue file itself cannot change on reload: its events would be left behind.
    let moved = without.replace("queue.db", "other.db");
    let refused = r.env.proxy.gateway.apply(config(&moved)).await.unwrap_err();
    assert!(refused[0].contains("callbacks.queue"), "{refused:?}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        r.receiver.received().is_empty(),
        "a removed route delivers nothing"
    );
    // Back again: everything it had, in order.
    let with = config_text(
        &r.env.sandbox,
        dir,
        &format!("{table}{route}{}", default_app(dir)),
    );
    r.env.proxy.gateway.apply(config(&with)).await.unwrap();
    assert_eq!(r.receiver.wait_for(2, Duration::from_secs(10)).await, 2);
    let seqs = seqs(&r.receiver);
    assert_eq!(seqs, [0, 1]);
}
