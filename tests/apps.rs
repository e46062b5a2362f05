//! One proxy, several apps: routing by header and prefix, per-app tokens, and the
//! organisation-service apps whose token request has its own parameters.

mod support;

use bytes::Bytes;
use cx_proxy::sandbox::{ParamApp, SandboxApp, SandboxOptions};
use http::Request;
use http_body_util::Full;
use support::*;

fn three_apps() -> SandboxOptions {
    SandboxOptions {
        apps: vec![
            SandboxApp::demo(),
            SandboxApp {
                app_key: "second-app".into(),
                corp_id: "corp-two".into(),
                secret: "second-secret".into(),
            },
            "third-app:3:third-secret".parse().unwrap(),
        ],
        param_apps: vec![
            "corp-42@/api/org/v1/access-tokens?suite_key=sk-1&corp_id=42&permanent_code=perm-42"
                .parse::<ParamApp>()
                .unwrap(),
        ],
        ..Default::default()
    }
}

const APPS: &str = r#"
[[app]]
name = "first"
app_key = "demo-app"
corp_id = 10001
corp_secret_file = "{dir}/corp_secret"
prefix = "/"

[[app]]
name = "second"
app_key = "second-app"
corp_id = "corp-two"
corp_secret_file = "{dir}/second_secret"
prefix = "/second"

[[app]]
name = "corp-42"
prefix = "/corp42"
token_path = "/api/org/v1/access-tokens"
[app.token_params]
suite_key = "sk-1"
corp_id = 42
permanent_code_file = "{dir}/perm_42"

[[app]]
name = "hidden"
app_key = "third-app"
corp_id = 3
corp_secret_file = "{dir}/third_secret"
"#;

async fn start() -> Env {
    EnvBuilder::new()
        .sandbox(three_apps())
        .file("second_secret", "second-secret")
        .file("third_secret", "third-secret\n")
        .file("perm_42", "perm-42")
        .apps(APPS)
        .start()
        .await
}

async fn get_as(env: &Env, path: &str, app: Option<&str>) -> Answer {
    let mut b = Request::builder().uri(env.url(path));
    if let Some(app) = app {
        b = b.header("x-cx-app", app);
    }
    send(&client(false), b.body(Full::new(Bytes::new())).unwrap()).await
}

#[tokio::test]
async fn apps_are_chosen_by_header_or_longest_prefix_and_never_share_tokens() {
    let env = start().await;
    env.ready().await;
    let cases = [
        ("/api/a", None, "demo-app", "/api/a"),
        ("/second/api/b", None, "second-app", "/api/b"),
        ("/api/second/c", None, "demo-app", "/api/second/c"),
        ("/api/d", Some("second"), "second-app", "/api/d"),
        ("/second/api/e", Some("second"), "second-app", "/api/e"),
        ("/api/f", Some("hidden"), "third-app", "/api/f"),
        ("/corp42/api/g", None, "corp-42", "/api/g"),
    ];
    for (path, header, app_key, forwarded) in cases {
        let a = get_as(&env, path, header).await;
        assert_eq!(a.json()["err_code"], 0, "{path}: {}", a.text());
        let r = env.sandbox.recorded().pop().unwrap();
        assert_eq!(r.token_app.as_deref(), Some(app_key), "{path} {header:?}");
        assert_eq!(r.path, forwarded);
    }
    let a = get_as(&env, "/api/x", Some("nope")).await;
    assert_proxy_error(&a, 404, "no_route");
}

#[tokio::test]
async fn an_app_with_token_params_fetches_with_exactly_those_parameters() {
    let env = start().await;
    env.ready().await;
    let org: Vec<_> = env
        .sandbox
        .token_requests()
        .into_iter()
        .filter(|(path, _)| path == "/api/org/v1/access-tokens")
        .collect();
    assert_eq!(org.len(), 1);
    let params: Vec<(&str, &str)> = org[0]
        .1
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        params,
        vec![
            ("corp_id", "42"),
            ("permanent_code", "perm-42"),
            ("suite_key", "sk-1")
        ]
    );
    assert_eq!(env.sandbox.token_fetches("corp-42"), 1);
}
