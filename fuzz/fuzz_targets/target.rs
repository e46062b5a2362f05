//! Request targets as the proxy reads them: the query rewrite, its redacted log form, path
//! normalisation and refusal, the token-behind-`;` check, the token-path and limit-rule
//! matching, and the read-side escaping of raw target bytes.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

fn limiter() -> &'static cx_proxy::limits::Limiter {
    static L: OnceLock<cx_proxy::limits::Limiter> = OnceLock::new();
    L.get_or_init(|| {
        let config = cx_proxy::Config::from_toml(
            "[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\n",
            "f.toml",
            None,
        )
        .expect("config")
        .config;
        cx_proxy::limits::Limiter::new(&config.limits, &config.apps, None, None)
    })
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes as a connection's read side: escaping only grows what it reads.
    let mut out = Vec::new();
    runtime().block_on(async {
        cx_proxy::server::EscapeTargets::new(data)
            .read_to_end(&mut out)
            .await
            .expect("reads")
    });
    assert!(out.len() >= data.len());
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let (path, query) = match text.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (text, None),
    };
    let target = cx_proxy::proxy::upstream_target("/base", path, query, "access_token", Some("access_token=T"));
    assert!(target.ends_with("access_token=T"));
    // The query as logged never shows a token-like value (the path is shown as it is).
    let shown = cx_proxy::proxy::Redacted::new(path, query, "access_token").to_string();
    let query_shown = shown.split_once('?').map_or("", |(_, q)| q);
    assert!(!query_shown.contains("access_token=T"), "{shown}");
    let normalized = cx_proxy::proxy::normalize_path(path);
    assert!(!normalized.contains("/../"), "{normalized}");
    let _ = cx_proxy::proxy::path_problem(path);
    let _ = cx_proxy::proxy::token_behind_semicolon(query.unwrap_or(""), "access_token");
    let _ = cx_proxy::platform::same_path(path, "/api/apps/v1/access-tokens");
    for m in [http::Method::GET, http::Method::HEAD, http::Method::POST] {
        let _ = limiter().rule_for(&m, path);
    }
});
