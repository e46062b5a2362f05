//! Property tests for what a hostile client controls: the request target and the config
//! file an operator might get wrong; and for the call limit's promise (never more than `n`
//! in any window). proptest shrinks any failure to a minimal input.

use cx_proxy::config::Config;
use cx_proxy::proxy::{normalize_path, upstream_target, Redacted};
use proptest::prelude::*;

const TOKEN_PAIR: &str = "access_token=INJECTED";

/// Query keys a client might use to sneak its own token past the proxy.
fn key() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("access_token".to_owned()),
        Just("access%5Ftoken".to_owned()),
        Just("access%5ftoken".to_owned()),
        Just("%61ccess_token".to_owned()),
        "[a-z_%0-9]{0,12}",
    ]
}

fn query() -> impl Strategy<Value = String> {
    prop::collection::vec((key(), "[a-zA-Z0-9%=&_.-]{0,10}", any::<bool>()), 0..8).prop_map(
        |pairs| {
            pairs
                .into_iter()
                .map(|(k, v, with_eq)| if with_eq { format!("{k}={v}FORGED") } else { k })
                .collect::<Vec<_>>()
                .join("&")
        },
    )
}

fn path() -> impl Strategy<Value = String> {
    prop::collection::vec(
        prop_oneof![
            Just(".".to_owned()),
            Just("..".to_owned()),
            Just("%2e%2e".to_owned()),
            Just("%2E.".to_owned()),
            Just(".%2e".to_owned()),
            Just(String::new()),
            "[a-z0-9._%-]{1,8}",
        ],
        0..10,
    )
    .prop_map(|segs| format!("/{}", segs.join("/")))
}

fn decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s)
        .decode_utf8_lossy()
        .into_owned()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn the_only_token_upstream_is_the_injected_one(path in path(), q in query()) {
        let target = upstream_target("", &path, Some(&q), "access_token", Some(TOKEN_PAIR));
        let (_, query) = target.split_once('?').expect("a query with our token");
        let tokens: Vec<&str> = query
            .split('&')
            .filter(|p| decode(p.split_once('=').map_or(p, |(k, _)| k)) == "access_token")
            .collect();
        prop_assert_eq!(tokens, vec![TOKEN_PAIR]);
        // Everything else the client sent survives in order.
        let kept: Vec<&str> = q.split('&').filter(|p| !p.is_empty())
            .filter(|p| decode(p.split_once('=').map_or(p, |(k, _)| k)) != "access_token")
            .collect();
        let mut expected = kept.join("&");
        if !expected.is_empty() { expected.push('&'); }
        expected.push_str(TOKEN_PAIR);
        prop_assert_eq!(query, expected);
    }

    #[test]
    fn resolved_paths_never_climb(path in path()) {
        let once = normalize_path(&path).into_owned();
        prop_assert!(once.starts_with('/'));
        for seg in once.split('/') {
            let d = decode(seg);
            prop_assert!(d != ".." && d != ".", "{} -> {}", path, once);
        }
        prop_assert_eq!(normalize_path(&once).into_owned(), once.clone(), "idempotent");
    }

    #[test]
    fn logged_targets_never_show_token_values(q in query()) {
        let shown = Redacted::new("/p", Some(&q), "access_token").to_string();
        let query = shown.strip_prefix("/p").unwrap_or("").trim_start_matches('?');
        for pair in query.split('&') {
            if let Some((k, v)) = pair.split_once('=') {
                if decode(k) == "access_token" {
                    prop_assert_eq!(v, "***", "{}", shown);
                }
            }
        }
    }

    #[test]
    fn the_config_parser_never_panics_and_always_names_the_file(text in "[\\[\\]a-z_=\"0-9 .:/\n{}]{0,200}") {
        match Config::from_toml(&text, "p.toml", None) {
            Ok(_) => {}
            Err(e) => {
                prop_assert!(!e.problems.is_empty());
                for p in e.problems {
                    prop_assert!(p.starts_with("p.toml: "), "{}", p);
                }
            }
        }
    }

    #[test]
    fn mutated_valid_configs_are_accepted_or_explained(
        key in "[a-z_]{1,16}",
        value in prop_oneof![Just("1".to_owned()), Just("\"x\"".to_owned()), Just("[]".to_owned()), Just("true".to_owned())],
        table in prop_oneof![Just("server"), Just("upstream"), Just("token"), Just("admin")],
    ) {
        let text = format!(
            "[{table}]\n{key} = {value}\n\n[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\nprefix = \"/\"\n"
        );
        if let Err(e) = Config::from_toml(&text, "p.toml", None) {
            prop_assert!(e.problems.iter().all(|p| p.starts_with("p.toml: ")), "{:?}", e.problems);
            prop_assert!(e.problems.iter().all(|p| !p.contains("\"s\"")), "no secret in messages");
        }
    }

    #[test]
    fn a_window_never_admits_more_than_n_in_any_span_and_its_wait_is_honest(
        n in 1u32..12,
        per_ms in 20u64..5_000,
        margin_ms in 0u64..200,
        gaps in prop::collection::vec(0u64..400, 1..300),
    ) {
        use cx_proxy::limits::Window;
        use cx_proxy::platform::Rate;
        use std::time::{Duration, Instant};
        let t0 = Instant::now();
        let per = Duration::from_millis(per_ms);
        let margin = Duration::from_millis(margin_ms);
        let mut w = Window::new(Rate { n, per }, margin, t0);
        let mut at = t0;
        let mut admitted: Vec<Instant> = Vec::new();
        for gap in gaps {
            at += Duration::from_millis(gap);
            match w.try_acquire(at) {
                Ok(()) => admitted.push(at),
                Err(wait) => {
                    // Told to wait `wait`: a call then (and nothing else meanwhile) passes.
                    let mut later = w.clone();
                    prop_assert!(later.try_acquire(at + wait).is_ok(), "wait {:?} at {:?}", wait, at - t0);
                }
            }
        }
        // Every span of length `per` plus the margin (ending at an admitted call) holds at
        // most n: calls that reach the platform up to the margin late still keep its limit.
        for (i, end) in admitted.iter().enumerate() {
            let inside = admitted[..=i]
                .iter()
                .filter(|t| end.duration_since(**t) < per + margin)
                .count();
            prop_assert!(inside <= n as usize, "{} calls within {:?}", inside, per);
        }
    }
}
