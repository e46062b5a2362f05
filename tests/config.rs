//! `proxy.toml` as `check` and `run` read it: defaults, every problem at once as
//! `file: key: what is wrong`, secrets never shown, what makes two apps one.

use cx_proxy::config::{Config, ConfigError, Inject, Loaded, SecretReader, DEFAULT_TOKEN_PATH};
use cx_proxy::platform::{self, AppKind};

fn load(text: &str) -> Result<Loaded, ConfigError> {
    Config::from_toml(text, "proxy.toml", None)
}

const MINIMAL: &str = r#"
[[app]]
name = "default"
app_key = "ak"
corp_id = 10001
corp_secret = "s3cret"
prefix = "/"
"#;

#[test]
fn minimal_file_gets_the_documented_defaults() {
    let loaded = load(MINIMAL).unwrap();
    let c = loaded.config;
    assert_eq!(c.server.listen, "127.0.0.1:8080".parse().unwrap());
    assert_eq!(c.upstream.authority.as_str(), "service.cheng-xun.cn");
    assert_eq!(c.token.path, DEFAULT_TOKEN_PATH);
    assert_eq!(
        c.token.inject,
        Inject::Query {
            param: "access_token".into()
        }
    );
    assert_eq!(c.token.invalid_codes, None);
    assert_eq!(c.apps[0].kind, AppKind::App);
    assert_eq!(c.apps[0].invalid_codes, vec![49000]);
    assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
    assert!(c.admin.is_none());
    assert_eq!(c.apps[0].credentials.naming()[1], ("corp_id", "10001"));
    assert_eq!(loaded.warnings.len(), 1, "inline secret warns");
    assert!(loaded.warnings[0].starts_with("proxy.toml: app[0].corp_secret: "));
}

#[test]
fn every_problem_is_reported_at_once() {
    let err = load(
        r#"
[server]
lisen = "127.0.0.1:1"
[upstream]
url = "http//nope"
[token]
inject = "cookie"
[[app]]
name = "a"
app_key = "k"
corp_id = 1
corp_secret_env = "CX_TEST_SURELY_UNSET_VAR"
"#,
    )
    .unwrap_err();
    let all = err.problems.join("\n");
    assert!(
        all.contains("proxy.toml: server.lisen: unknown key"),
        "{all}"
    );
    assert!(all.contains("proxy.toml: upstream.url: "), "{all}");
    assert!(all.contains("proxy.toml: token.inject: "), "{all}");
    assert!(
        all.contains("proxy.toml: app[0].corp_secret_env: environment variable CX_TEST_SURELY_UNSET_VAR is not set"),
        "{all}"
    );
}

#[test]
fn upstream_must_be_https() {
    let err = load(&format!(
        "[upstream]\nurl = \"http://example.com\"\n{MINIMAL}"
    ))
    .unwrap_err();
    assert!(err.problems[0].contains("upstream.url"), "{err}");
    assert!(err.problems[0].contains("https"), "{err}");
}

#[test]
fn syntax_errors_give_a_line() {
    let err = load("[server\nlisten = 1").unwrap_err();
    assert!(err.problems[0].starts_with("proxy.toml: line 1"), "{err}");
}

#[test]
fn a_number_too_large_names_its_key_and_the_limit() {
    // The parser refuses these before any key is read; the key comes from the line.
    let err = load(&format!(
        "{MINIMAL}\n[limits]   # the call limits\nmargin_ms = 99999999999999999999\n"
    ))
    .unwrap_err();
    let problem = &err.problems[0];
    assert!(
        problem.starts_with("proxy.toml: limits.margin_ms: line ")
            && problem.ends_with("the number is too large (at most 9223372036854775807)"),
        "{err}"
    );
    let err = load(&format!(
        "{MINIMAL}\n[[app]]\nname = \"b\"\napp_key = \"k2\"\ncorp_id = 9223372036854775808\n"
    ))
    .unwrap_err();
    assert!(
        err.problems[0].starts_with("proxy.toml: app[1].corp_id: line "),
        "{err}"
    );
    // A line of a multi-line string is not taken for a key (it may be a secret's).
    let err = load("[[app]]\ncorp_secret = \"\"\"\nab12=cd\\q\n\"\"\"\n").unwrap_err();
    assert!(!err.problems[0].contains("ab12"), "{err}");
}

#[test]
fn render_never_shows_secrets() {
    let c = load(MINIMAL).unwrap().config;
    let text = c.render();
    assert!(!text.contains("s3cret"), "{text}");
    assert!(text.contains("corp_secret = \"***\""), "{text}");
}

#[test]
fn token_params_read_secrets_and_strip_the_suffix() {
    let dir = std::env::temp_dir().join(format!("cxp-cfg-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("perm"), "perm-code-42\n").unwrap();
    let text = r#"
[[app]]
name = "corp-42"
prefix = "/corp42"
token_path = "/api/org/v1/access-tokens"
[app.token_params]
suite_key = "sk-1"
corp_id = 42
permanent_code_file = "perm"
"#;
    let c = Config::from_toml(text, "p.toml", Some(&dir))
        .unwrap()
        .config;
    let pairs = c.apps[0].credentials.query_pairs();
    assert_eq!(
        pairs,
        vec![
            ("corp_id", "42"),
            ("permanent_code", "perm-code-42"),
            ("suite_key", "sk-1")
        ]
    );
    assert!(!c.render().contains("perm-code-42"));
    std::fs::remove_dir_all(dir).ok();
}

#[test]
fn header_injection_splits_the_format() {
    let c = load(&format!(
        "[token]\ninject = \"header\"\nheader_format = \"Bearer {{token}}\"\n{MINIMAL}"
    ))
    .unwrap()
    .config;
    match c.token.inject {
        Inject::Header {
            name,
            prefix,
            suffix,
        } => {
            assert_eq!(name, http::header::AUTHORIZATION);
            assert_eq!(prefix, "Bearer ");
            assert_eq!(suffix, "");
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn duplicate_app_names_and_prefixes_are_refused() {
    let err = load(&format!("{MINIMAL}{MINIMAL}")).unwrap_err();
    let all = err.problems.join("\n");
    assert!(
        all.contains("app[1].name: \"default\" is used by another app"),
        "{all}"
    );
    assert!(
        all.contains("app[1].prefix: \"/\" is used by another app"),
        "{all}"
    );
}

const CORP: &str = r#"
[[app]]
name = "corp-42"
kind = "corp-service"
corp_id = 42
corp_secret = "perm-42"
corp_authorization = "auth-42"
prefix = "/corp42"
"#;

#[test]
fn invalid_codes_come_from_the_app_then_the_token_table_then_the_kind() {
    let c = load(&format!("{MINIMAL}{CORP}")).unwrap().config;
    assert_eq!(c.apps[0].invalid_codes, vec![49000]);
    assert_eq!(c.apps[1].kind, AppKind::CorpService);
    assert_eq!(c.apps[1].invalid_codes, vec![40004, 40005]);
    assert_eq!(c.apps[1].token_path, platform::CORP_TOKEN_PATH);
    assert_eq!(
        c.apps[1].credentials.query_pairs(),
        vec![
            ("corp_id", "42"),
            ("corp_secret", "perm-42"),
            ("corp_authorization", "auth-42")
        ]
    );

    let c = load(&format!(
        "[token]\ninvalid_codes = [49000, 41000]\n{MINIMAL}{CORP}"
    ))
    .unwrap()
    .config;
    assert_eq!(c.apps[0].invalid_codes, vec![49000, 41000]);
    assert_eq!(c.apps[1].invalid_codes, vec![49000, 41000]);

    let own = CORP.replace("prefix", "invalid_codes = [40004]\nprefix");
    let c = load(&format!("[token]\ninvalid_codes = [41000]\n{MINIMAL}{own}"))
        .unwrap()
        .config;
    assert_eq!(c.apps[0].invalid_codes, vec![41000]);
    assert_eq!(c.apps[1].invalid_codes, vec![40004]);
}

#[test]
fn codes_that_are_never_a_rejection_are_refused_where_they_are_written() {
    let err = load(&format!(
        "[token]\ninvalid_codes = [49000, 49001, 0]\n{MINIMAL}"
    ))
    .unwrap_err();
    let all = err.problems.join("\n");
    assert!(
        all.contains("proxy.toml: token.invalid_codes[1]: 49001 is never"),
        "{all}"
    );
    assert!(
        all.contains("proxy.toml: token.invalid_codes[2]: 0 is never"),
        "{all}"
    );

    let err = load(&format!(
        "[token]\ninvalid_codes = [40001]\n{MINIMAL}{CORP}"
    ))
    .unwrap_err();
    assert!(
        err.problems
            .join("\n")
            .contains("proxy.toml: token.invalid_codes: 40001 means bad credentials"),
        "{err}"
    );
    let own = CORP.replace("prefix", "invalid_codes = [40001, 55001]\nprefix");
    let all = load(&format!("{MINIMAL}{own}"))
        .unwrap_err()
        .problems
        .join("\n");
    assert!(
        all.contains("app[1].invalid_codes[1]: 55001 is never"),
        "{all}"
    );
    assert!(
        all.contains("app[1].invalid_codes: 40001 means bad credentials"),
        "{all}"
    );
}

#[test]
fn corp_service_apps_take_no_app_key_and_kinds_are_checked() {
    let bad = CORP.replace("kind", "app_key = \"ak\"\nkind");
    let all = load(&bad).unwrap_err().problems.join("\n");
    assert!(
        all.contains("app[0].app_key: not used by kind = \"corp-service\""),
        "{all}"
    );
    let all = load(&CORP.replace("corp-service", "isv"))
        .unwrap_err()
        .problems
        .join("\n");
    assert!(all.contains("app[0].kind: \"isv\" is not"), "{all}");
    assert!(
        !all.contains("app_key") && !all.contains("corp_secret"),
        "{all}"
    );
    let all = load(&CORP.replace("corp_id = 42", "corp_id = \"\""))
        .unwrap_err()
        .problems
        .join("\n");
    assert!(all.contains("app[0].corp_id: is empty"), "{all}");
}

#[test]
fn two_apps_with_the_same_credentials_are_refused() {
    let twin = MINIMAL
        .replace("\"default\"", "\"twin\"")
        .replace("\"/\"", "\"/twin\"");
    let all = load(&format!("{MINIMAL}{twin}"))
        .unwrap_err()
        .problems
        .join("\n");
    assert!(
        all.contains("app[1].name: app \"twin\" has the same credentials as app \"default\""),
        "{all}"
    );
    let twin = CORP.replace("corp-42", "corp-42b").replace("/corp42", "/b");
    assert!(load(&format!("{CORP}{twin}")).is_err());
}

#[test]
fn check_shows_the_kind_and_masks_every_corp_secret() {
    let text = load(CORP).unwrap().config.render();
    assert!(text.contains("kind = \"corp-service\""), "{text}");
    assert!(text.contains("invalid_codes = [40004, 40005]"), "{text}");
    assert!(text.contains("corp_authorization = \"***\""), "{text}");
    assert!(
        !text.contains("perm-42") && !text.contains("auth-42"),
        "{text}"
    );
}

#[test]
fn an_app_is_the_same_app_while_its_name_and_token_identity_hold() {
    let a = load(MINIMAL).unwrap().config.apps.remove(0);
    let moved = MINIMAL.replace(
        "prefix = \"/\"",
        "prefix = \"/v2\"\ninvalid_codes = [41000]",
    );
    let b = load(&moved).unwrap().config.apps.remove(0);
    assert!(a.same_app(&b), "prefix and codes do not make another app");
    let rotated = MINIMAL.replace("s3cret", "new-s3cret");
    assert!(a.same_app(&load(&rotated).unwrap().config.apps.remove(0)));
    let renamed = MINIMAL.replace("\"default\"", "\"other\"");
    assert!(!a.same_app(&load(&renamed).unwrap().config.apps.remove(0)));
    let other_key = MINIMAL.replace("app_key = \"ak\"", "app_key = \"ak2\"");
    assert!(!a.same_app(&load(&other_key).unwrap().config.apps.remove(0)));
    assert_eq!(a.fingerprint().len(), 16);
    assert!(!a.fingerprint().contains("s3cret"));
}

#[test]
fn wrong_types_are_all_reported_with_their_key_and_never_their_value() {
    let all = load(&format!(
        "[server]\nlisten = 8080\nallow = [\"10.0.0.0/8\", 7]\nworkers = \"two\"\n\
         [upstream]\ntimeout_ms = -1\n[token]\nstore = 5\n{}",
        MINIMAL.replace("corp_secret = \"s3cret\"", "corp_secret = 987654321")
    ))
    .unwrap_err()
    .problems
    .join("\n");
    for line in [
        "proxy.toml: server.listen: expected a string, found integer",
        "proxy.toml: server.allow[1]: expected a string, found integer",
        "proxy.toml: server.workers: expected an integer, found string",
        "proxy.toml: upstream.timeout_ms: -1 is out of range (1..=3600000)",
        "proxy.toml: token.store: expected a table, found integer",
        "proxy.toml: app[0].corp_secret: expected a string, found integer",
    ] {
        assert!(all.contains(line), "{line:?} not in\n{all}");
    }
    assert!(
        !all.contains("987654321"),
        "a secret's value is never shown: {all}"
    );
    assert!(
        !all.contains("missing"),
        "a refused key is not also missing: {all}"
    );
}

#[test]
fn secrets_are_read_through_the_reader_given() {
    struct Fake;
    impl SecretReader for Fake {
        fn var(&self, name: &str) -> Option<String> {
            (name == "CX_FAKE").then(|| "from-env\n".to_owned())
        }
        fn read(&self, path: &std::path::Path) -> std::io::Result<String> {
            if path.ends_with("auth") {
                Ok(String::new())
            } else {
                Err(std::io::Error::from(std::io::ErrorKind::NotFound))
            }
        }
    }
    let text = CORP.replace("corp_secret = \"perm-42\"", "corp_secret_env = \"CX_FAKE\"");
    let c = Config::from_toml_with(
        &text.replace("corp_authorization = \"auth-42\"\n", ""),
        "p.toml",
        None,
        &Fake,
    )
    .unwrap()
    .config;
    assert_eq!(
        c.apps[0].credentials.query_pairs()[1],
        ("corp_secret", "from-env")
    );
    let text = text.replace(
        "corp_authorization = \"auth-42\"",
        "corp_authorization_file = \"auth\"",
    );
    let all = Config::from_toml_with(&text, "p.toml", None, &Fake)
        .unwrap_err()
        .to_string();
    assert!(
        all.starts_with("p.toml: app[0].corp_authorization_file: /"),
        "{all}"
    );
    assert!(
        all.ends_with("/auth is empty") && all.lines().count() == 1,
        "{all}"
    );
}

#[test]
fn check_prints_a_file_that_reads_back_as_the_same_config() {
    let text = format!(
        "[server]\nallow = [\"10.0.0.0/8\"]\n[token]\ninject = \"header\"\n[token.store]\n\
         redis_url = \"redis://:pw@127.0.0.1/\"\nlease_ms = 9000\n{MINIMAL}{CORP}\n\
         [[client]]\nname = \"billing\"\nnetworks = [\"10.1.2.0/24\"]\napps = [\"default\"]\n"
    );
    let c = load(&text).unwrap().config;
    let shown = c.render();
    assert!(
        !shown.contains("pw@") && !shown.contains("s3cret"),
        "{shown}"
    );
    assert!(shown.contains("# app[0].corp_secret: inline"), "{shown}");
    // With the secrets put back, the printout is a config equal to the first.
    let back = shown
        .replacen("corp_secret = \"***\"", "corp_secret = \"s3cret\"", 1)
        .replacen("corp_secret = \"***\"", "corp_secret = \"perm-42\"", 1)
        .replace(
            "corp_authorization = \"***\"",
            "corp_authorization = \"auth-42\"",
        )
        .replace(
            "redis_url = \"***\"",
            "redis_url = \"redis://:pw@127.0.0.1/\"",
        );
    let again = load(&back).unwrap_or_else(|e| panic!("{e}\n{back}")).config;
    assert_eq!(again.render(), shown);
    assert_eq!(again.apps, c.apps);
}

#[test]
fn what_a_new_operator_got_wrong_is_named_once_at_its_key() {
    let check = |text: &str| -> String {
        match load(text) {
            Ok(_) => String::new(),
            Err(e) => e.problems.join("\n"),
        }
    };
    // A huge number as a secret: the parser's own message would have shown it.
    let all = check(&MINIMAL.replace("\"s3cret\"", "98765432109876543210"));
    assert!(
        !all.contains("98765432109876543210") && !all.is_empty(),
        "{all}"
    );
    // A table written as an array is not read by position.
    let all = check(&format!("server = [\"0.0.0.0:9999\"]\n{MINIMAL}"));
    assert_eq!(all, "proxy.toml: server: expected a table, found array");
    // Quoted keys stay quoted.
    let all = check(&format!("[server]\n\"a.b\" = 1\n{MINIMAL}"));
    assert_eq!(all, "proxy.toml: server.\"a.b\": unknown key");
    // token_params sending one name twice.
    let params = "[[app]]\nname = \"p\"\nprefix = \"/p\"\ntoken_path = \"/t\"\n[app.token_params]\nclient_secret = \"a\"\nclient_secret_env = \"CX_TEST_SURELY_UNSET_VAR\"\n";
    let all = check(params);
    assert!(
        all.contains(
            "app[0].token_params.client_secret_env: sends client_secret, which another key"
        ),
        "{all}"
    );
    // An app refused for its secret is not also missing for the client that names it.
    let broken = MINIMAL.replace(
        "corp_secret = \"s3cret\"",
        "corp_secret_env = \"CX_TEST_SURELY_UNSET_VAR\"",
    );
    let all = check(&format!(
        "{broken}\n[[client]]\nname = \"c\"\nnetworks = [\"10.0.0.0/8\"]\napps = [\"default\"]\n"
    ));
    assert_eq!(all.lines().count(), 1, "{all}");
    // SPEC section 3: a client granted no app, two clients of one name, two listeners on one address.
    let all = check(&format!(
        "[admin]\nlisten = \"127.0.0.1:8080\"\n{MINIMAL}\n[[client]]\nname = \"c\"\nnetworks = [\"10.0.0.0/8\"]\napps = []\n\
         [[client]]\nname = \"c\"\nnetworks = [\"10.0.0.0/8\"]\napps = [\"default\"]\n"
    ));
    for line in [
        "proxy.toml: admin.listen: 127.0.0.1:8080 is already server.listen",
        "proxy.toml: client[0].apps: grants no app",
        "proxy.toml: client[1].name: \"c\" is used by another client",
    ] {
        assert!(all.contains(line), "{line:?} not in\n{all}");
    }
}

#[test]
fn a_callback_queue_must_be_a_file_in_an_existing_folder() {
    let relay = |queue: &str| {
        format!(
            "{MINIMAL}\n[callbacks]\nlisten = \"127.0.0.1:0\"\nqueue = \"{queue}\"\n\
             [[callback]]\nname = \"c\"\npath = \"/cb\"\napp = \"default\"\nkey = \"k\"\n\
             deliver_to = \"http://127.0.0.1:1/x\"\n"
        )
    };
    let dir = std::env::temp_dir();
    let ok = load(&relay(&dir.join("cx-q.db").display().to_string()));
    assert!(ok.is_ok(), "{:?}", ok.err());
    let all = load(&relay("/no/such/folder/q.db"))
        .unwrap_err()
        .to_string();
    assert!(
        all.contains("callbacks.queue: /no/such/folder: the folder does not exist"),
        "{all}"
    );
    let all = load(&relay(&dir.display().to_string()))
        .unwrap_err()
        .to_string();
    assert!(all.contains("is a folder"), "{all}");
}

#[test]
fn limit_rules_read_their_rate_and_refuse_what_is_not_one() {
    let text = format!(
        "{MINIMAL}\n[limits]\nmax_wait_ms = 1500\n[[limits.rule]]\nmethod = \"get\"\n\
         path = \"/api/apps/v1/robot/chats/{{chat_id}}\"\nrate = \"10/s\"\n"
    );
    let loaded = load(&text).unwrap();
    let l = &loaded.config.limits;
    assert!(l.enabled);
    assert_eq!(l.max_wait, std::time::Duration::from_millis(1500));
    assert_eq!(l.rules[0].method, "GET");
    assert_eq!(l.rules[0].rate.n, 10);
    let shown = loaded.config.render();
    assert!(shown.contains("rate = \"10/s\""), "{shown}");
    // The table in force: the built-in rules, the file's one in place of a built-in one.
    assert!(
        shown.contains("#   GET /api/apps/v1/robot/chats/{chat_id} 10/s (file; built in: ")
            && shown.contains("#   GET /api/apps/address-book/v1.0/all 10/h (built in)"),
        "{shown}"
    );
    let bad = format!(
        "{MINIMAL}\n[[limits.rule]]\nmethod = \"GET\"\npath = \"/a/{{x}}\"\nrate = \"0/min\"\n\
         [[limits.rule]]\nmethod = \"GET\"\npath = \"/a/{{x}}\"\nrate = \"3/week\"\n\
         [[limits.rule]]\nmethod = \"GET\"\npath = \"/a/{{y}}\"\nrate = \"3/h\"\n\
         [[limits.rule]]\nmethod = \"GET\"\npath = \"/a/{{z}}\"\nrate = \"4/h\"\n"
    );
    let all = load(&bad).unwrap_err().to_string();
    assert!(
        all.contains("limits.rule[0].rate: \"0/min\" is not N/s"),
        "{all}"
    );
    assert!(all.contains("limits.rule[1].rate: \"3/week\""), "{all}");
    assert!(
        all.contains("limits.rule[3].path: another rule has this method and path pattern"),
        "{all}"
    );
}

#[test]
fn limit_rules_that_could_never_match_are_refused() {
    let rule = |method: &str, path: &str| {
        format!("[[limits.rule]]\nmethod = \"{method}\"\npath = \"{path}\"\nrate = \"1/s\"\n")
    };
    let deep: String = (0..16).map(|i| format!("/s{i}")).collect();
    let bad = [
        rule("GET", "/api/v1/../x"),
        rule("GET", "/api/./x"),
        rule("GET", "/api//x"),
        rule("GET", "/api/a b"),
        rule("GET", "/api/%61"),
        rule("GET", "/api/{x"),
        rule("GET", "/api/pre{x}"),
        rule("GET", &deep),
        rule("CONNECT", "/api/x"),
    ]
    .concat();
    let all = load(&format!("{MINIMAL}\n{bad}")).unwrap_err().to_string();
    for (i, what) in [
        "\"..\" segment",
        "\".\" segment",
        "empty segment",
        "holds ' '",
        "holds '%'",
        "a placeholder is a whole segment",
        "a placeholder is a whole segment",
        "has 16 segments",
    ]
    .iter()
    .enumerate()
    {
        assert!(
            all.contains(&format!("limits.rule[{i}].path: ")) && all.contains(what),
            "{i}: {what} in\n{all}"
        );
    }
    assert!(
        all.contains("limits.rule[8].method: CONNECT is never forwarded"),
        "{all}"
    );
    // A trailing slash is matched either way: kept without it.
    let ok = load(&format!("{MINIMAL}\n{}", rule("GET", "/api/v1/ts/"))).unwrap();
    assert_eq!(ok.config.limits.rules[0].path, "/api/v1/ts");
}
