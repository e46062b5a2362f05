//! A token endpoint's answer: a token and a lifetime, or an error; never a panic, and the
//! app's secret never in an error's text.
#![no_main]
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

fn app() -> &'static cx_proxy::config::AppConfig {
    static APP: OnceLock<cx_proxy::config::AppConfig> = OnceLock::new();
    APP.get_or_init(|| {
        cx_proxy::Config::from_toml(
            "[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s3cr3t-value\"\n",
            "f.toml",
            None,
        )
        .expect("config")
        .config
        .apps
        .remove(0)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&s, body)) = data.split_first() else {
        return;
    };
    let status = http::StatusCode::from_u16(200 + u16::from(s % 4) * 100).expect("status");
    let scrub = |t: &str| t.replace("s3cr3t-value", "***");
    match cx_proxy::auth::token_answer(status, body, app(), &scrub) {
        Ok((token, lifetime)) => {
            assert!(!token.is_empty());
            assert!(lifetime.as_secs() >= 1);
        }
        Err(e) => assert!(!e.to_string().contains("s3cr3t-value")),
    }
});
