//! Upstream TLS: verification is never off.

mod support;

use cx_proxy::sandbox::SandboxOptions;
use support::*;

#[tokio::test]
async fn an_upstream_with_an_untrusted_certificate_gets_nothing() {
    // Trust one sandbox's CA, point at another sandbox (same names, different CA).
    let trusted_dir = tempfile::tempdir().unwrap();
    let _trusted = sandbox(trusted_dir.path(), SandboxOptions::default()).await;
    let other_dir = tempfile::tempdir().unwrap();
    let other = sandbox(other_dir.path(), SandboxOptions::default()).await;
    let text = set(
        &config_text(&other, other_dir.path(), &default_app(other_dir.path())),
        "upstream.ca_file",
        trusted_dir.path().join("ca.pem").display().to_string(),
    );
    let proxy = cx_proxy::ProxyHandle::start(config(&text)).await.unwrap();
    let a = get(&format!("http://{}/api/x", proxy.addr)).await;
    let v = assert_proxy_error(&a, 502, "upstream_unreachable");
    let msg = v["err_msg"].as_str().unwrap().to_lowercase();
    assert!(msg.contains("certificate"), "{msg}");
    assert_eq!(
        other.requests_seen(),
        0,
        "the untrusted upstream received no request"
    );
    assert_eq!(other.token_fetches(APP_KEY), 0);
}

#[tokio::test]
async fn an_upstream_that_is_down_gives_502_upstream_unreachable() {
    let dir = tempfile::tempdir().unwrap();
    let s = sandbox(dir.path(), SandboxOptions::default()).await;
    let down = unused_addr();
    let text = set(
        &config_text(&s, dir.path(), &default_app(dir.path())),
        "upstream.url",
        format!("https://{down}"),
    );
    let proxy = cx_proxy::ProxyHandle::start(config(&text)).await.unwrap();
    let a = get(&format!("http://{}/api/x", proxy.addr)).await;
    assert_proxy_error(&a, 502, "upstream_unreachable");
}
