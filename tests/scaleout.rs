//! Several proxy instances sharing one token through a real redis-server, against the
//! sandbox in `reissue = "new"` mode (a new fetch invalidates the previous token, so any
//! uncoordinated fetch shows up as rejections).
//!
//! Each test starts its own redis-server on a free loopback port (so it can stop and
//! restart it). Without redis-server on the PATH these tests say so and pass, unless
//! `CX_REQUIRE_REDIS=1` (set by `.ci/run`, which installs it) makes that a failure.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cx_proxy::sandbox::{Reissue, Sandbox, SandboxOptions};
use cx_proxy::ProxyHandle;
use http::Method;
use support::*;

struct Redis {
    child: Option<Child>,
    port: u16,
}

impl Redis {
    /// Starts redis-server on a free port, or `None` (with a note) if it is not installed.
    fn start() -> Option<Redis> {
        if Command::new("redis-server")
            .arg("--version")
            .output()
            .is_err()
        {
            assert!(
                std::env::var_os("CX_REQUIRE_REDIS").is_none(),
                "redis-server is required (CX_REQUIRE_REDIS is set) but not installed"
            );
            eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
            return None;
        }
        let mut r = Redis {
            child: None,
            port: unused_addr().port(),
        };
        r.restart();
        Some(r)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// (Re)starts the server on the same port and waits until it accepts connections.
    fn restart(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "redis-server did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the server we started, by PID.
    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("running").id().to_string();
        let ok = Command::new("kill")
            .args([&format!("-{signal}"), &pid])
            .status()
            .expect("kill runs");
        assert!(ok.success());
    }

    /// Stops the server (only the one we started, by PID).
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A sandbox and `n` proxies sharing tokens through `redis`.
async fn cluster(
    redis: &Redis,
    n: usize,
    store_extra: &str,
    opts: SandboxOptions,
) -> (Sandbox, Vec<ProxyHandle>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(
        dir.path(),
        SandboxOptions {
            reissue: Reissue::New,
            ..opts
        },
    )
    .await;
    // Slow enough that the instances' start-up fetches overlap.
    sandbox.set_token_delay(Duration::from_millis(300));
    let text = cluster_text(redis, &sandbox, dir.path(), store_extra);
    let mut proxies = Vec::new();
    for _ in 0..n {
        proxies.push(ProxyHandle::start(config(&text)).await.unwrap());
    }
    (sandbox, proxies, dir)
}

/// The config of a cluster's instance: the store at `redis`, `store_extra` after it.
fn cluster_text(
    redis: &Redis,
    sandbox: &Sandbox,
    dir: &std::path::Path,
    store_extra: &str,
) -> String {
    let extra = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n[token.store]\nredis_url = \"{}\"\n{store_extra}\n{}",
        redis.url(),
        default_app(dir)
    );
    config_text(sandbox, dir, &extra)
}

/// Sends `total` GETs spread over the proxies, all at once; returns the answers.
async fn spread(proxies: &[ProxyHandle], total: usize, path: &str) -> Vec<Answer> {
    let c = client(false);
    let urls: Vec<Arc<String>> = proxies
        .iter()
        .map(|p| Arc::new(format!("http://{}{path}", p.addr)))
        .collect();
    let tasks: Vec<_> = (0..total)
        .map(|i| {
            let (c, url) = (c.clone(), urls[i % urls.len()].clone());
            tokio::spawn(async move { send(&c, request(Method::GET, &url, "")).await })
        })
        .collect();
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

fn all_ok(answers: &[Answer]) {
    for a in answers {
        assert_eq!(a.status, 200, "{}", a.text());
        assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    }
}

#[tokio::test]
async fn three_instances_and_300_first_requests_make_one_fetch() {
    let Some(redis) = Redis::start() else { return };
    let (sandbox, proxies, _dir) = cluster(&redis, 3, "", SandboxOptions::default()).await;
    let answers = spread(&proxies, 300, "/api/apps/v1/sso/user?oauth_code=c1").await;
    all_ok(&answers);
    assert_eq!(
        sandbox.token_fetches(APP_KEY),
        1,
        "one fetch for the whole cluster"
    );
    let tokens: std::collections::HashSet<_> =
        sandbox.recorded().into_iter().map(|r| r.token).collect();
    assert_eq!(tokens.len(), 1, "every instance used the same token");
}

#[tokio::test]
async fn a_revoked_token_moves_all_instances_to_one_new_token_with_one_fetch() {
    let Some(redis) = Redis::start() else { return };
    let (sandbox, proxies, _dir) = cluster(&redis, 3, "", SandboxOptions::default()).await;
    all_ok(&spread(&proxies, 30, "/api/a").await);
    let before = sandbox.token_fetches(APP_KEY);
    sandbox.revoke_all();
    let answers = spread(&proxies, 90, "/api/b").await;
    all_ok(&answers);
    assert_eq!(
        sandbox.token_fetches(APP_KEY),
        before + 1,
        "one fetch cluster-wide"
    );
    // After the replays every instance sends the same, new token.
    all_ok(&spread(&proxies, 30, "/api/c").await);
    let last: std::collections::HashSet<_> = sandbox
        .recorded()
        .iter()
        .rev()
        .take(30)
        .map(|r| r.token.clone())
        .collect();
    assert_eq!(last.len(), 1);
}

#[tokio::test]
async fn an_older_fetch_that_finishes_last_never_replaces_a_newer_token() {
    let Some(redis) = Redis::start() else { return };
    // A lease shorter than the slow fetch, so that two fetches overlap.
    let (sandbox, proxies, _dir) =
        cluster(&redis, 3, "lease_ms = 300", SandboxOptions::default()).await;
    sandbox.set_token_delay(Duration::ZERO);
    for p in &proxies {
        wait_ready(p).await;
    }
    // A starts a fetch that the platform answers 1.5 s after issuing (its token is the older).
    sandbox.set_token_answer_delay(Duration::from_millis(1500));
    let a = proxies[0].proxy.tokens().clone();
    let slow = tokio::spawn(async move {
        a.force_refresh(0)
            .await
            .map(|t| t.secret().expose().to_owned())
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    // B fetches after A's lease ran out; its token is issued later and stored first.
    sandbox.set_token_answer_delay(Duration::ZERO);
    let b_token = proxies[1]
        .proxy
        .tokens()
        .force_refresh(0)
        .await
        .unwrap()
        .secret()
        .expose()
        .to_owned();
    let a_result = slow.await.unwrap().unwrap();
    assert_ne!(a_result, "", "A finished");
    // A got the older token back from the platform, but adopted B's newer one from the store.
    let a_now = proxies[0].proxy.tokens().status().await;
    assert!(a_now[0].ready);
    // A and B hold B's token: their next calls go through on the first try. (C still holds
    // the start-up token, which both fetches superseded: its call is replayed once.)
    for (i, p) in proxies.iter().enumerate() {
        let seen_before = sandbox.recorded().len();
        let answer = get(&format!("http://{}/api/after", p.addr)).await;
        assert_eq!(answer.json()["err_code"], 0, "{}", answer.text());
        let seen = sandbox.recorded();
        assert_eq!(
            seen.last().unwrap().token.as_deref(),
            Some(b_token.as_str()),
            "instance {i}"
        );
        if i < 2 {
            assert_eq!(
                seen.len(),
                seen_before + 1,
                "instance {i} sent B's token at once"
            );
        }
    }
}

#[tokio::test]
async fn with_redis_down_requests_keep_succeeding_and_sharing_resumes_when_it_returns() {
    let Some(mut redis) = Redis::start() else {
        return;
    };
    let (sandbox, proxies, _dir) = cluster(&redis, 3, "", SandboxOptions::default()).await;
    all_ok(&spread(&proxies, 30, "/api/a").await);
    assert_eq!(sandbox.token_fetches(APP_KEY), 1);

    redis.stop();
    all_ok(&spread(&proxies, 30, "/api/b").await);
    let ready = get(&format!("http://{}/readyz", proxies[0].admin_addr.unwrap())).await;
    assert_eq!(ready.status, 200, "tokens are held: still ready");
    assert_eq!(ready.json()["token_store"]["up"], false, "{}", ready.text());
    let metrics = get(&format!(
        "http://{}/metrics",
        proxies[0].admin_addr.unwrap()
    ))
    .await
    .text();
    assert!(metrics.contains("cx_proxy_token_store_up 0"), "{metrics}");
    // A rejected token is replaced by a local fetch while the store is down.
    sandbox.revoke_all();
    let fetched = sandbox.token_fetches(APP_KEY);
    all_ok(&spread(&proxies[..1], 10, "/api/c").await);
    assert_eq!(
        sandbox.token_fetches(APP_KEY),
        fetched + 1,
        "fetched locally"
    );

    redis.restart();
    // Once the store answers again, the instances share: one fetch for a cluster-wide revoke.
    for p in &proxies {
        let admin = format!("http://{}", p.admin_addr.unwrap());
        await_store_state(&admin, "up").await;
    }
    let before = sandbox.token_fetches(APP_KEY);
    sandbox.revoke_all();
    all_ok(&spread(&proxies, 90, "/api/d").await);
    assert_eq!(sandbox.token_fetches(APP_KEY), before + 1, "sharing again");
}

#[tokio::test]
async fn instances_share_callback_nonces_so_a_retry_elsewhere_is_not_kept_twice() {
    use cx_proxy::relay::verify::{base_string, members, sign, Signed};
    use cx_proxy::sandbox::receiver::Receiver;
    let Some(redis) = Redis::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    std::fs::write(dir.path().join("cb_key"), "k").unwrap();
    let mut proxies = Vec::new();
    for i in 0..2 {
        let extra = format!(
            "[token.store]\nredis_url = \"{}\"\n[callbacks]\nlisten = \"127.0.0.1:0\"\nallow = [\"127.0.0.1\"]\n\
             queue = \"{d}/q{i}.db\"\n[[callback]]\nname = \"contacts\"\npath = \"/cb\"\napp = \"default\"\n\
             key_file = \"{d}/cb_key\"\ndeliver_to = \"{}\"\n{}",
            redis.url(),
            receiver.url("/events"),
            default_app(dir.path()),
            d = dir.path().display(),
        );
        proxies.push(
            ProxyHandle::start(config(&config_text(&sandbox, dir.path(), &extra)))
                .await
                .unwrap(),
        );
    }
    // One timestamp for every post: the platform's retry of a callback is the same signed
    // request (a second boundary between two posts must not make it another one).
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .to_string();
    let post = |p: &ProxyHandle, body: &serde_json::Value, nonce: &str| {
        let mut s = Signed {
            corpid: "10001".into(),
            timestamp: timestamp.clone(),
            nonce: nonce.into(),
            signature: String::new(),
        };
        s.signature = sign(
            b"k",
            &base_string(&members(body.to_string().as_bytes()).unwrap(), &s),
        );
        let url = format!(
            "http://{}/cb?corpid={}&timestamp={}&nonce={}&signature={}",
            p.callbacks_addr.unwrap(),
            s.corpid,
            s.timestamp,
            s.nonce,
            s.signature
        );
        let body = body.to_string();
        async move { send(&client(false), request(Method::POST, &url, body)).await }
    };
    let body = serde_json::json!({"event_type": "user_add", "seq": 1});
    let first = post(&proxies[0], &body, "shared-1").await;
    assert_eq!(first.status, 200, "{}", first.text());
    // The platform's retry lands on the other instance: acknowledged, not kept again.
    let retry = post(&proxies[1], &body, "shared-1").await;
    assert_eq!(retry.status, 200, "{}", retry.text());
    assert_eq!(
        first.headers.get("x-cx-callback-id"),
        retry.headers.get("x-cx-callback-id")
    );
    // The nonce with another signature, on the other instance: a replay.
    let other = serde_json::json!({"event_type": "user_delete"});
    let replay = post(&proxies[1], &other, "shared-1").await;
    assert_proxy_error(&replay, 401, "callback_rejected");
    assert_eq!(receiver.wait_for(1, Duration::from_secs(10)).await, 1);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        receiver.received().len(),
        1,
        "delivered once, by the instance that kept it"
    );
}

#[tokio::test]
async fn the_shared_window_holds_across_instances_with_other_margins_and_a_reload() {
    let Some(redis) = Redis::start() else { return };
    let rules = |margin: u32| {
        format!(
            "[limits]\nmax_wait_ms = 0\nmargin_ms = {margin}\n[[limits.rule]]\nmethod = \"GET\"\n\
             path = \"/api/apps/v1/margin\"\nrate = \"5/s\"\n"
        )
    };
    let (sandbox, proxies, dir) = cluster(&redis, 2, &rules(0), SandboxOptions::default()).await;
    all_ok(&spread(&proxies, 2, "/api/warm").await);
    all_ok(&spread(&proxies[..1], 5, "/api/apps/v1/margin").await);
    // The second instance now counts with a margin of its own (slots were numbered by the
    // margin before: it saw an empty window and passed five more, and the platform said 49001).
    proxies[1]
        .gateway
        .apply(config(&cluster_text(
            &redis,
            &sandbox,
            dir.path(),
            &rules(1000),
        )))
        .await
        .unwrap();
    for a in spread(&proxies[1..], 5, "/api/apps/v1/margin").await {
        assert_proxy_error(&a, 429, "rate_limited");
    }
    assert_eq!(
        sandbox
            .recorded()
            .iter()
            .filter(|r| r.path == "/api/apps/v1/margin")
            .count(),
        5
    );
}

#[tokio::test]
async fn call_limits_hold_across_instances_and_each_instance_counts_alone_without_redis() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let rules = "[limits]\nmax_wait_ms = 1500\n\
                 [[limits.rule]]\nmethod = \"GET\"\npath = \"/api/apps/v1/minute\"\nrate = \"6/min\"\n\
                 [[limits.rule]]\nmethod = \"GET\"\npath = \"/api/apps/v1/second\"\nrate = \"5/s\"\n\
                 [[limits.rule]]\nmethod = \"GET\"\npath = \"/api/apps/v1/alone\"\nrate = \"4/min\"\n";
    let (sandbox, proxies, _dir) = cluster(&redis, 3, rules, SandboxOptions::default()).await;
    let seen = |path: &str| sandbox.recorded().iter().filter(|r| r.path == path).count();
    all_ok(&spread(&proxies, 3, "/api/warm").await);

    // 30 calls spread over three instances: six pass in the minute, wherever they land.
    let answers = spread(&proxies, 30, "/api/apps/v1/minute").await;
    let passed = answers.iter().filter(|a| a.status == 200).count();
    assert_eq!(passed, 6, "the cluster admits the rule's 6");
    for a in answers.iter().filter(|a| a.status != 200) {
        assert_proxy_error(a, 429, "rate_limited");
    }
    assert_eq!(seen("/api/apps/v1/minute"), 6);

    // 10 calls over three instances under 5/s: each instance alone would pass its share at
    // once; shared, the second five wait for the first five's second to pass.
    let started = Instant::now();
    let answers = spread(&proxies, 10, "/api/apps/v1/second").await;
    let took = started.elapsed();
    all_ok(&answers);
    assert!(took >= Duration::from_millis(900), "spread over {took:?}");

    // Redis paused (it accepts connections and answers nothing, the worst way to fail):
    // every instance keeps serving, holds the whole limit alone, and its calls do not queue
    // behind the store's timeouts (max_wait_ms is 1.5 s and these windows are full for a
    // minute, so every answer is due at once).
    redis.signal("STOP");
    let started = Instant::now();
    let answers = spread(&proxies, 30, "/api/apps/v1/alone").await;
    let took = started.elapsed();
    assert_eq!(answers.iter().filter(|a| a.status == 200).count(), 12);
    assert_eq!(seen("/api/apps/v1/alone"), 12, "4 per instance");
    assert!(
        took < Duration::from_secs(3),
        "30 calls took {took:?} with the store paused"
    );
    let ready = get(&format!("http://{}/readyz", proxies[0].admin_addr.unwrap())).await;
    let store = &ready.json()["token_store"];
    assert_eq!(store["up"], false, "{}", ready.text());
    assert!(
        store["detail"]
            .as_str()
            .unwrap()
            .contains("call limits per instance"),
        "{store}"
    );

    // Back: sharing resumes, and an instance's own window still holds what it passed
    // alone, so it does not pass another 4 on top of those within the minute.
    redis.signal("CONT");
    await_store_state(&format!("http://{}", proxies[0].admin_addr.unwrap()), "up").await;
    let answers = spread(&proxies[..1], 5, "/api/apps/v1/alone").await;
    for a in &answers {
        assert_proxy_error(a, 429, "rate_limited");
    }
    assert_eq!(seen("/api/apps/v1/alone"), 12);
}

/// Waits up to 10 s for the `/readyz` of the admin port at `admin` (`http://host:port`) to
/// show the token store in `state` (`up`, `refusing_writes`, `down`).
async fn await_store_state(admin: &str, state: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let r = get(&format!("{admin}/readyz")).await;
        if r.json()["token_store"]["state"] == state {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the store never reached {state}: {}",
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `CONFIG SET key value` on the test's redis-server.
async fn redis_config(redis: &Redis, key: &str, value: &str) {
    let client = redis::Client::open(redis.url()).unwrap();
    let mut c = client.get_multiplexed_async_connection().await.unwrap();
    let () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query_async(&mut c)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_store_that_refuses_writes_is_degraded_and_a_token_seen_rejected_is_never_adopted() {
    let Some(redis) = Redis::start() else {
        return;
    };
    let (sandbox, proxies, _dir) = cluster(
        &redis,
        2,
        "[token]\nmax_fetches_per_minute = 30",
        SandboxOptions::default(),
    )
    .await;
    all_ok(&spread(&proxies, 10, "/api/a").await);
    let admin = format!("http://{}", proxies[0].admin_addr.unwrap());

    // Redis out of memory: reads still work, every write is refused.
    redis_config(&redis, "maxmemory-policy", "noeviction").await;
    redis_config(&redis, "maxmemory", "1").await;
    sandbox.revoke_all();
    // The rejected token is replaced by a local fetch (it cannot be stored).
    all_ok(&spread(&proxies[..1], 10, "/api/b").await);
    let ready = get(&format!("{admin}/readyz")).await;
    let store = &ready.json()["token_store"];
    assert_eq!(store["state"], "refusing_writes", "{}", ready.text());
    assert_eq!(store["up"], false);
    // The server's own words: out of memory.
    assert!(
        store["error"].as_str().unwrap_or("").contains("OOM"),
        "{}",
        ready.text()
    );
    let metrics = get(&format!("{admin}/metrics")).await.text();
    assert!(metrics.contains("cx_proxy_token_store_up 0"), "{metrics}");
    // Revocation after revocation while the store still offers the first token: every one
    // this instance saw rejected stays refused, however many (the fetch cap is raised so
    // twelve fetches fit in the minute).
    for round in 0..12 {
        sandbox.revoke_all();
        let a = get(&format!("http://{}/api/r{round}", proxies[0].addr)).await;
        assert_eq!(a.status, 200, "round {round}: {}", a.text());
        assert_eq!(a.json()["err_code"], 0, "round {round}: {}", a.text());
    }

    // Redis takes writes again; the readiness probe finds out.
    redis_config(&redis, "maxmemory", "0").await;
    await_store_state(&admin, "up").await;
    // The platform revokes every token. The store still holds the first one, which this
    // instance saw rejected: it is not adopted; a new one is fetched and shared.
    let fetches = sandbox.token_fetches(APP_KEY);
    sandbox.revoke_all();
    all_ok(&spread(&proxies[..1], 10, "/api/c").await);
    assert_eq!(sandbox.token_fetches(APP_KEY), fetches + 1);
    all_ok(&spread(&proxies, 10, "/api/d").await);
}
