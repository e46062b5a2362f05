//! The binary as an operator runs it: `check`, `run` (logs, SIGTERM), `demo`.

mod support;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cx_proxy::sandbox::SandboxOptions;
use support::*;

/// A child process stopped (SIGKILL) when dropped, so a failed assertion leaves none behind.
struct KillOnDrop(Child);

impl std::ops::Deref for KillOnDrop {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A child process whose output is collected as it arrives.
struct Proc {
    child: KillOnDrop,
    stdout: Arc<Mutex<String>>,
    stderr: Arc<Mutex<String>>,
}

fn collect(r: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let b = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(r).lines().map_while(Result::ok) {
            let mut b = b.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}

impl Proc {
    fn spawn(cmd: &mut Command) -> Proc {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stdout = collect(child.stdout.take().unwrap());
        let stderr = collect(child.stderr.take().unwrap());
        Proc {
            child: KillOnDrop(child),
            stdout,
            stderr,
        }
    }

    /// Waits (at most 20 s) until `find` extracts something from stdout or stderr.
    async fn wait_for<T>(&self, what: &str, find: impl Fn(&str, &str) -> Option<T>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let found = find(&self.stdout.lock().unwrap(), &self.stderr.lock().unwrap());
            if let Some(v) = found {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; stderr:\n{}",
                self.stderr.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(ok.success());
    }

    fn sigterm(&self) {
        self.signal("TERM");
    }

    /// Waits (at most 20 s) for the exit status, killing the child if it does not stop.
    async fn wait(&mut self) -> std::process::ExitStatus {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                // Let the reader threads drain the pipes.
                tokio::time::sleep(Duration::from_millis(50)).await;
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "process did not exit; stderr:\n{}",
                    self.stderr.lock().unwrap()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// [`default_app`] with its secret read from the environment variable `secret_var`.
fn env_secret_app(secret_var: &str) -> String {
    format!(
        "[[app]]\nname = \"default\"\napp_key = \"{APP_KEY}\"\ncorp_id = {CORP_ID}\ncorp_secret_env = \"{secret_var}\"\nprefix = \"/\"\n"
    )
}

/// The address in the JSON log line `cx-proxy listening`.
fn listening(_out: &str, err: &str) -> Option<String> {
    err.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == "cx-proxy listening")
        .and_then(|v| v["listen"].as_str().map(str::to_owned))
}

#[test]
fn check_names_every_bad_key_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        r#"
[server]
listen = "127.0.0.1:8080"
max_body = 5

[upstream]
url = "https//service.cheng-xun.cn"

[[app]]
name = "default"
app_key = "ak-123"
corp_id = 10001
corp_secret_env = "CX_TEST_UNSET_SECRET_VAR"
"#,
    )
    .unwrap();
    let out = Command::new(bin())
        .args(["check", "-c"])
        .arg(&path)
        .env_remove("CX_TEST_UNSET_SECRET_VAR")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    let file = path.display().to_string();
    assert!(
        err.contains(&format!("{file}: server.max_body: unknown key")),
        "{err}"
    );
    assert!(err.contains(&format!("{file}: upstream.url: ")), "{err}");
    assert!(
        err.contains(&format!(
            "{file}: app[0].corp_secret_env: environment variable CX_TEST_UNSET_SECRET_VAR is not set"
        )),
        "{err}"
    );
}

#[test]
fn check_prints_the_effective_config_with_secrets_masked() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        "[[app]]\nname = \"default\"\napp_key = \"ak-123\"\ncorp_id = 10001\ncorp_secret_env = \"CX_TEST_CHECK_SECRET\"\nprefix = \"/\"\n",
    )
    .unwrap();
    let out = Command::new(bin())
        .arg("check")
        .env("CX_PROXY_CONFIG", &path)
        .env("CX_TEST_CHECK_SECRET", "very-secret-corp-value")
        .output()
        .unwrap();
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("corp_secret = \"***\""), "{stdout}");
    assert!(
        stdout.contains("url = \"https://service.cheng-xun.cn\""),
        "{stdout}"
    );
    assert!(
        !stdout.contains("very-secret-corp-value") && !stderr.contains("very-secret-corp-value")
    );
}

#[cfg(unix)]
#[test]
fn check_raises_the_open_files_limit_and_warns_when_the_hard_one_is_too_low() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("proxy.toml");
    let check = |workers: u32, ulimit: &str| {
        std::fs::write(
            &path,
            format!(
                "[server]\nworkers = {workers}\n[[app]]\nname = \"default\"\napp_key = \"ak\"\n\
                 corp_id = 1\ncorp_secret = \"s\"\nprefix = \"/\"\n"
            ),
        )
        .unwrap();
        let out = Command::new("sh")
            .arg("-c")
            .arg(format!("ulimit {ulimit} && exec \"$0\" check -c \"$1\""))
            .arg(bin())
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(0), "{stderr}");
        stderr
    };
    // 500 workers take ~1,500 descriptors of their own: a hard limit of 1024 is too low.
    let low = check(500, "-n 1024");
    assert!(
        low.contains("the open-files limit is 1024") && low.contains("LimitNOFILE="),
        "{low}"
    );
    // One worker fits; and a low soft limit under a higher hard one is raised, not warned
    // (one worker needs ~515: a soft limit of 256 would warn if it were kept).
    assert!(!check(1, "-n 1024").contains("open-files"));
    assert!(!check(1, "-Sn 256").contains("open-files"));
}

#[test]
fn version_completions_man_page_and_where_config_flags_go() {
    let run = |args: &[&str]| {
        let out = Command::new(bin())
            .args(args)
            .env_remove("CX_PROXY_CONFIG")
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    // --version: the version, the commit (this test runs in a git checkout) and the date.
    let (code, out, _) = run(&["--version"]);
    assert_eq!(code, Some(0));
    let commit = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    assert!(
        out.starts_with(&format!("cx-proxy {} (commit ", env!("CARGO_PKG_VERSION"))),
        "{out}"
    );
    if !commit.is_empty() {
        assert!(out.contains(&commit), "{out} lacks {commit}");
    }
    let date = out
        .split("built ")
        .nth(1)
        .unwrap_or("")
        .trim_end()
        .trim_end_matches(')');
    assert!(
        date.len() == 10 && date.as_bytes()[4] == b'-' && date.as_bytes()[7] == b'-',
        "{out}"
    );

    // Completion scripts that their shells accept.
    let (code, script, _) = run(&["completions", "bash"]);
    assert_eq!(code, Some(0));
    assert!(script.contains("corp-secret"), "{script}");
    let mut bash = Command::new("bash")
        .arg("-n")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    std::io::Write::write_all(&mut bash.stdin.take().unwrap(), script.as_bytes()).unwrap();
    assert!(bash.wait().unwrap().success(), "bash -n refused the script");
    // And it completes past the first word (`cx-proxy run --<TAB>`, `completions <TAB>`).
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("cx-proxy.bash");
    std::fs::write(&file, &script).unwrap();
    let probe = format!(
        "source '{}'\n\
         COMP_WORDS=(cx-proxy run --); COMP_CWORD=2; _cx__proxy cx-proxy -- run; echo \"run: ${{COMPREPLY[*]}}\"\n\
         COMP_WORDS=(cx-proxy completions ''); COMP_CWORD=2; _cx__proxy cx-proxy '' completions; echo \"shells: ${{COMPREPLY[*]}}\"\n",
        file.display()
    );
    let out = Command::new("bash").arg("-c").arg(&probe).output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(out.contains("run: --config"), "{out}");
    assert!(out.contains("zsh"), "{out}");
    for shell in ["zsh", "fish", "powershell"] {
        let (code, script, _) = run(&["completions", shell]);
        assert_eq!(code, Some(0), "{shell}");
        assert!(script.contains("cx-proxy"), "{shell}");
    }
    let (code, _, err) = run(&["completions", "tcsh"]);
    assert_eq!(code, Some(2), "{err}");

    // The man page renders without warnings (groff; `.ci/run` installs it).
    let (code, page, _) = run(&["manpage"]);
    assert_eq!(code, Some(0));
    assert!(page.contains(".TH cx-proxy 1"), "{page}");
    assert!(
        page.contains("corp\\-secret") || page.contains("corp-secret"),
        "{page}"
    );
    let groff = Command::new("groff")
        .args(["-man", "-Tutf8", "-ww", "-z"])
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    if groff.is_err() {
        assert!(
            std::env::var_os("CI").is_none() && std::env::var_os("CX_REQUIRE_REDIS").is_none(),
            "groff is required under CI but not installed (apt-get install groff-base)"
        );
        eprintln!("SKIPPED: groff is not installed; the man page was not rendered");
    }
    if let Ok(mut groff) = groff {
        std::io::Write::write_all(&mut groff.stdin.take().unwrap(), page.as_bytes()).unwrap();
        let out = groff.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stderr), "", "groff warnings");
        // Every command's own page, as the .deb installs them.
        let dir = tempfile::tempdir().unwrap();
        let (code, _, err) = run(&["manpage", "--dir", dir.path().to_str().unwrap()]);
        assert_eq!(code, Some(0), "{err}");
        for name in [
            "cx-proxy",
            "cx-proxy-run",
            "cx-proxy-check",
            "cx-proxy-corp-secret",
        ] {
            let path = dir.path().join(format!("{name}.1"));
            let out = Command::new("groff")
                .args(["-man", "-Tutf8", "-ww", "-z"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(out.status.success(), "{name}");
            assert_eq!(
                String::from_utf8_lossy(&out.stderr),
                "",
                "{name}: groff warnings"
            );
        }
    }
    assert!(
        page.contains(".SH ENVIRONMENT") && page.contains("CX_PROXY_CONFIG"),
        "{page}"
    );

    // demo and sandbox read no config file, so they take no -c; the commands that do take
    // it before or after their name.
    for cmd in ["demo", "sandbox"] {
        let (code, help, _) = run(&[cmd, "--help"]);
        assert_eq!(code, Some(0));
        assert!(!help.contains("--config"), "{cmd}: {help}");
        let (code, _, err) = run(&[cmd, "-c", "x.toml"]);
        assert_eq!(code, Some(2), "{cmd}: {err}");
        let (code, _, err) = run(&["-c", "x.toml", cmd]);
        assert_eq!(code, Some(2), "{cmd}: {err}");
    }
    for args in [
        &["check", "-c", "nowhere.toml"][..],
        &["-c", "nowhere.toml", "check"],
    ] {
        let (code, _, err) = run(args);
        assert_eq!(code, Some(1), "{args:?}: {err}");
        assert!(
            err.contains("nowhere.toml: cannot read the file"),
            "{args:?}: {err}"
        );
    }
}

#[test]
fn with_json_logs_every_stderr_line_of_a_failed_start_is_json() {
    let dir = tempfile::tempdir().unwrap();
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        "[server]\nlisten_typo = 1\n[[app]]\nname = \"a\"\ncorp_secret = \"inline\"\n",
    )
    .unwrap();
    // A port already taken: a startup error after the config was accepted.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let busy = dir.path().join("busy.toml");
    std::fs::write(
        &busy,
        format!(
            "[server]\nlisten = \"{}\"\n[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"inline\"\n",
            taken.local_addr().unwrap()
        ),
    )
    .unwrap();
    let cases: [(&[&str], &std::path::Path, i32); 4] = [
        (&["run", "-c"], &broken, 64),
        (&["check", "-c"], &broken, 1),
        (&["run", "-c"], &busy, 1),
        (&["--log-level", "x=[", "run", "-c"], &busy, 64),
    ];
    for (args, file, code) in cases {
        let out = Command::new(bin())
            .args(["--log-format", "json"])
            .args(args)
            .arg(file)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(code), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!err.trim().is_empty(), "{args:?}: nothing said");
        for line in err.lines() {
            let v: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("{args:?}: not JSON ({e}): {line}"));
            assert!(v["level"].is_string() && v["message"].is_string(), "{line}");
        }
        assert!(!err.contains("inline"), "a secret in the log: {err}");
    }
}

#[test]
fn the_shipped_proxy_toml_is_valid() {
    let out = Command::new(bin())
        .args([
            "check",
            "-c",
            concat!(env!("CARGO_MANIFEST_DIR"), "/proxy.toml"),
        ])
        .env("CX_CORP_SECRET", "x")
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn debug_logs_never_carry_the_secret_or_a_token_and_sigterm_drains() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let secret_var = "CX_TEST_LOG_SECRET";
    let app = env_secret_app(secret_var);
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        set(
            &config_text(&sandbox, dir.path(), &app),
            "server.shutdown_grace_s",
            10,
        ),
    )
    .unwrap();
    let mut p = Proc::spawn(
        Command::new(bin())
            .args(["--log-level", "debug", "--log-format", "json", "run", "-c"])
            .arg(&path)
            .env(secret_var, SECRET),
    );
    let addr = p.wait_for("the listening line", listening).await;
    let base = format!("http://{addr}");

    // Ordinary calls, a client trying its own token, a header-borne one, and h2c.
    let c = client(false);
    assert_eq!(
        get(&format!("{base}/api/a?x=1")).await.json()["err_code"],
        0
    );
    let req = http::Request::builder()
        .uri(format!(
            "{base}/api/b?access_token=client-held-token-123&corp_secret=client-typed-secret"
        ))
        .header("authorization", "Bearer client-held-token-123")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.json()["err_code"], 0);
    assert_eq!(
        send(
            &client(true),
            request(http::Method::POST, &format!("{base}/api/c"), "{}")
        )
        .await
        .json()["err_code"],
        0
    );

    // A refusal: its kind and cause go on the access line.
    let req = http::Request::builder()
        .uri(format!("{base}/api/d"))
        .header("x-cx-app", "no-such-app")
        .body(http_body_util::Full::new(bytes::Bytes::new()))
        .unwrap();
    assert_eq!(send(&c, req).await.status, 404);

    // SIGTERM while a slow request is in flight: it finishes, then the process exits 0.
    sandbox.set_api_delay(Duration::from_millis(2000));
    let slow = tokio::spawn(async move { get(&format!("{base}/api/slow")).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    p.sigterm();
    let a = slow.await.unwrap();
    assert_eq!(a.status, 200);
    assert_eq!(a.json()["err_code"], 0, "{}", a.text());
    let status = p.wait().await;
    assert_eq!(status.code(), Some(0));

    let logs = p.stderr.lock().unwrap().clone();
    assert!(
        logs.contains("cx_proxy::access"),
        "access lines are logged:\n{logs}"
    );
    let refused = logs
        .lines()
        .find(|l| l.contains("cx_proxy::access") && l.contains("/api/d"))
        .expect("the refused request's access line");
    assert!(
        refused.contains("\"error\":\"no_route\"") && refused.contains("no-such-app"),
        "{refused}"
    );
    assert!(
        logs.contains("\"level\":\"DEBUG\""),
        "debug level was on:\n{logs}"
    );
    let tokens = sandbox.issued_tokens();
    assert!(!tokens.is_empty());
    for secret in tokens.iter().map(String::as_str).chain([
        SECRET,
        "client-held-token-123",
        "client-typed-secret",
    ]) {
        assert!(
            !logs.contains(secret),
            "{secret:?} appears in the logs:\n{logs}"
        );
    }
}

#[tokio::test]
async fn every_access_line_reaches_stderr_by_sigterm_whole() {
    // Lines wait in per-thread buffers (logging.rs): none may be lost or cut at the stop.
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let secret_var = "CX_TEST_LOG_SECRET";
    let app = env_secret_app(secret_var);
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, config_text(&sandbox, dir.path(), &app)).unwrap();
    let mut p = Proc::spawn(
        Command::new(bin())
            .args(["--log-format", "json", "run", "-c"])
            .arg(&path)
            .env(secret_var, SECRET),
    );
    let addr = p.wait_for("the listening line", listening).await;
    let base = format!("http://{addr}");
    const CALLS: usize = 400;
    hammer(&base, "burst", CALLS).await;
    // At once: the lines are still in their buffers (flushed every 100 ms).
    p.sigterm();
    assert_eq!(p.wait().await.code(), Some(0));
    let logs = p.stderr.lock().unwrap().clone();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a whole line ({e}): {l}")))
        .collect();
    let mut seen: Vec<usize> = lines
        .iter()
        .filter(|v| v["target"] == "cx_proxy::access")
        .map(|v| {
            assert_eq!(v["status"], 200, "{v}");
            let path = v["path"].as_str().unwrap();
            path.strip_prefix("/api/burst?n=").unwrap().parse().unwrap()
        })
        .collect();
    // Lines of one worker thread keep their order; two workers' may interleave.
    seen.sort_unstable();
    assert_eq!(seen, (0..CALLS).collect::<Vec<_>>(), "{logs}");
    // The last line is the stop, after every access line.
    assert_eq!(lines.last().unwrap()["message"], "stopped", "{logs}");
}

/// A proxy started with its stderr set to `stderr` (so its listening line cannot be read):
/// on ports chosen here, the admin port beside it. Returns the child, the proxy's base URL
/// and the admin port, once the proxy answers.
async fn start_with_stderr(
    dir: &std::path::Path,
    sandbox: &cx_proxy::sandbox::Sandbox,
    level: &str,
    stderr: Stdio,
) -> (KillOnDrop, String, u16) {
    let free = || {
        std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port()
    };
    let (port, admin) = (free(), free());
    let secret_var = "CX_TEST_STUCK_SECRET";
    let text = config_text(
        sandbox,
        dir,
        &format!(
            "[admin]\nlisten = \"127.0.0.1:{admin}\"\n{}",
            env_secret_app(secret_var)
        ),
    );
    let path = dir.join("proxy.toml");
    std::fs::write(
        &path,
        set(&text, "server.listen", format!("127.0.0.1:{port}")),
    )
    .unwrap();
    let child = KillOnDrop(
        Command::new(bin())
            .args(["--log-level", level, "run", "-c"])
            .arg(&path)
            .env(secret_var, SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .unwrap(),
    );
    let base = format!("http://127.0.0.1:{port}");
    let c = client(false);
    let deadline = Instant::now() + Duration::from_secs(20);
    while tokio::time::timeout(
        Duration::from_secs(1),
        c.get(format!("{base}/api/x").parse().unwrap()),
    )
    .await
    .map_or(true, |r| r.is_err())
    {
        assert!(Instant::now() < deadline, "the proxy did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    (child, base, admin)
}

/// `cx_proxy_log_lines_dropped_total` on the admin port.
async fn dropped_lines(admin: u16) -> u64 {
    let metrics = get(&format!("http://127.0.0.1:{admin}/metrics"))
        .await
        .text();
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("cx_proxy_log_lines_dropped_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop count:\n{metrics}"))
}

/// GETs `{base}/api/{what}?n=…` `calls` times in a row; each must be answered (200) within
/// 5 s.
async fn hammer(base: &str, what: &str, calls: usize) {
    let c = client(false);
    for i in 0..calls {
        let req = http::Request::builder()
            .uri(format!("{base}/api/{what}?n={i}"))
            .body(http_body_util::Full::new(bytes::Bytes::new()))
            .unwrap();
        let a = tokio::time::timeout(Duration::from_secs(5), send(&c, req))
            .await
            .unwrap_or_else(|_| panic!("request {i} waited on stderr"));
        assert_eq!(a.status, 200);
    }
}

#[tokio::test]
async fn a_stderr_nobody_reads_holds_no_request_and_no_stop() {
    // A service whose stderr pipe is never read (a wedged log shipper): the access lines
    // fill the pipe, then the thread's 1 MiB buffer; past that they are dropped and
    // counted, and requests and the stop go on. (Before, a request waited on stderr.)
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let (mut child, base, admin) =
        start_with_stderr(dir.path(), &sandbox, "debug", Stdio::piped()).await;
    // Held open and never read.
    let _stderr = child.stderr.take();
    // Debug lines and access lines: several MiB, far past the pipe and the buffer.
    hammer(&base, "stuck", 2000).await;
    let dropped = dropped_lines(admin).await;
    assert!(dropped > 0, "{dropped}");
    // The stop is not held by the stuck pipe either.
    let stopping = Instant::now();
    assert!(Command::new("kill")
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success());
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            assert_eq!(status.code(), Some(0));
            break;
        }
        assert!(
            stopping.elapsed() < Duration::from_secs(30),
            "the stop waited on stderr"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(target_os = "linux")]
#[tokio::test]
async fn lines_a_full_disk_refuses_are_counted_as_dropped() {
    // /dev/full refuses every write (ENOSPC), as a full log disk does.
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let full = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (child, base, admin) =
        start_with_stderr(dir.path(), &sandbox, "info", Stdio::from(full)).await;
    hammer(&base, "full", 50).await;
    // Written out (and refused) within the flusher's 100 ms round.
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut dropped = 0;
    while dropped < 50 {
        assert!(
            Instant::now() < deadline,
            "{dropped} of 50 access lines counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        dropped = dropped_lines(admin).await;
    }
    drop(child);
}

#[tokio::test]
async fn demo_prints_curl_lines_that_all_work_on_documented_paths() {
    let dir = tempfile::tempdir().unwrap();
    // A corporate proxy in the user's environment (here one that is not there): the demo's
    // loopback sandbox is reached directly all the same.
    let mut p = Proc::spawn(
        Command::new(bin())
            .args(["demo", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(dir.path())
            .env("HTTPS_PROXY", format!("http://{}", unused_addr())),
    );
    let lines = p
        .wait_for("the curl lines", |out, _| {
            out.contains("Ctrl-C stops both").then(|| {
                out.lines()
                    .filter_map(|l| l.trim().strip_prefix("curl -s ").map(str::to_owned))
                    .collect::<Vec<_>>()
            })
        })
        .await;
    assert!(lines.len() >= 4, "{lines:?}");
    let mut corp_service = false;
    for line in &lines {
        // `[-X METHOD] 'URL' [-H 'Content-Type: application/json' -d 'BODY']`
        let method = line
            .strip_prefix("-X ")
            .and_then(|r| r.split(' ').next())
            .unwrap_or("GET");
        let url = line.split('\'').nth(1).unwrap();
        let body = line
            .split_once(" -d '")
            .map(|(_, b)| b.trim_end_matches('\'').to_owned())
            .unwrap_or_default();
        let req = http::Request::builder()
            .method(method)
            .uri(url)
            .header("content-type", "application/json")
            .body(http_body_util::Full::new(bytes::Bytes::from(body.clone())))
            .unwrap();
        let a = send(&client(false), req).await;
        let v = a.json();
        assert_eq!(v["err_code"], 0, "{line}: {v}");
        assert_eq!(v["err_msg"], "success", "{line}");
        assert!(
            v["data"]["api"].is_string(),
            "{line} is not a documented call: {v}"
        );
        assert_eq!(v["data"]["method"], method, "{line}");
        assert_eq!(v["data"]["body_sha256"], sha256(body.as_bytes()), "{line}");
        corp_service |= v["data"]["path"]
            .as_str()
            .unwrap()
            .starts_with("/api/corp-service/");
    }
    assert!(corp_service, "one line goes through the corp-service app");
    // The callback line, pasted into a shell as a user would: the sandbox calls back, the
    // relay checks and keeps it, the demo's receiver shows it.
    let callback_line = p
        .stdout
        .lock()
        .unwrap()
        .lines()
        .find_map(|l| {
            l.trim()
                .starts_with("curl -sS --cacert")
                .then(|| l.trim().to_owned())
        })
        .expect("a line that sends a callback");
    let out = Command::new("sh")
        .arg("-c")
        .arg(&callback_line)
        .output()
        .unwrap();
    let answer = String::from_utf8_lossy(&out.stdout);
    assert!(
        answer.contains("\"attempts\":[200]"),
        "{callback_line}: {answer}"
    );
    let arrived = p
        .wait_for("the receiver's line", |out, _| {
            out.lines()
                .find(|l| l.starts_with("receiver: POST /contacts-events?corpid=10001&"))
                .map(str::to_owned)
        })
        .await;
    assert!(
        arrived.contains("X-CX-Verified: 1") && arrived.contains("user_add"),
        "{arrived}"
    );
    for file in ["corp_secret", "corp_secret_20002"] {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir.path().join(file))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{file}: {mode:o}");
    }
    p.sigterm();
    assert_eq!(p.wait().await.code(), Some(0));
}

#[tokio::test]
async fn the_access_log_line_of_a_failed_token_fetch_names_the_kind_the_code_and_the_request() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    // The platform refuses every fetch with an error code it documents.
    sandbox.fail_token_fetches(1000, 40001, "corp_secret mismatch");
    let path = dir.path().join("proxy.toml");
    std::fs::write(
        &path,
        config_text(&sandbox, dir.path(), &default_app(dir.path())),
    )
    .unwrap();
    let mut p = Proc::spawn(
        Command::new(bin())
            .args(["--log-format", "json", "run", "-c"])
            .arg(&path),
    );
    let addr = p.wait_for("the listening line", listening).await;
    let a = get_with(
        &format!("http://{addr}/api/apps/v1/robot/chats"),
        &[
            ("x-request-id", "req-502"),
            ("user-agent", "Java/1.8.0_201"),
        ],
    )
    .await;
    assert_proxy_error(&a, 502, "token_unavailable");
    assert_eq!(a.headers["x-request-id"], "req-502");
    let line = p
        .wait_for("the access-log line", |_, err| {
            err.lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .find(|v| v["target"] == "cx_proxy::access" && v["request_id"] == "req-502")
        })
        .await;
    assert_eq!(line["level"], "INFO", "{line}");
    assert_eq!(line["status"], 502, "{line}");
    assert_eq!(line["error"], "token_unavailable", "{line}");
    assert!(
        line["cause"].as_str().unwrap_or("").contains("40001"),
        "{line}"
    );
    assert_eq!(line["protocol"], "HTTP/1.1", "{line}");
    assert_eq!(line["user_agent"], "Java/1.8.0_201", "{line}");
    p.sigterm();
    assert_eq!(p.wait().await.code(), Some(0));
}

#[tokio::test]
async fn demo_shows_its_admin_port_keeps_its_folder_private_and_removes_it_on_exit() {
    use std::os::unix::fs::PermissionsExt as _;
    let tmp = tempfile::tempdir().unwrap();
    let mut p = Proc::spawn(
        Command::new(bin())
            .args(["demo", "--listen", "127.0.0.1:0"])
            .env("TMPDIR", tmp.path()),
    );
    let (dir, admin) = p
        .wait_for("the demo's lines", |out, _| {
            let dir = out
                .lines()
                .find_map(|l| l.split(", config ").nth(1))?
                .trim()
                .strip_suffix("/proxy.toml")?
                .to_owned();
            let admin = out
                .lines()
                .find_map(|l| l.strip_prefix("cx-proxy demo: admin at "))?
                .split_whitespace()
                .next()?
                .to_owned();
            Some((std::path::PathBuf::from(dir), admin))
        })
        .await;
    assert!(dir.starts_with(tmp.path()), "{}", dir.display());
    let mode = std::fs::metadata(&dir).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "{mode:o}");
    let ready = get(&format!("{admin}/healthz")).await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    p.sigterm();
    assert_eq!(p.wait().await.code(), Some(0));
    assert!(!dir.exists(), "{} is left behind", dir.display());
}

#[tokio::test]
async fn sighup_adds_an_app_and_refuses_a_broken_file_while_a_connection_stays_open() {
    use bytes::Bytes;
    use http_body_util::Full;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(
        dir.path(),
        SandboxOptions {
            apps: vec![
                cx_proxy::sandbox::SandboxApp::demo(),
                "added-app:2:added-secret".parse().unwrap(),
            ],
            ..Default::default()
        },
    )
    .await;
    std::fs::write(dir.path().join("added_secret"), "added-secret").unwrap();
    let path = dir.path().join("proxy.toml");
    let base_text = config_text(&sandbox, dir.path(), &default_app(dir.path()));
    std::fs::write(&path, &base_text).unwrap();
    let mut p = Proc::spawn(
        Command::new(bin())
            .args(["--log-format", "json", "run", "-c"])
            .arg(&path),
    );
    let addr = p.wait_for("the listening line", listening).await;

    let mut conn = kept_open_connection(&addr).await;
    // A GET on the one kept-open connection (it must survive every reload); the status
    // and the app whose token the platform saw.
    async fn on_conn(
        conn: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        sandbox: &cx_proxy::sandbox::Sandbox,
        path: &str,
    ) -> (u16, Option<String>) {
        let req = get_on_connection(path);
        let status = conn
            .send_request(req)
            .await
            .expect("the connection survived")
            .status();
        (
            status.as_u16(),
            sandbox.recorded().pop().and_then(|r| r.token_app),
        )
    }
    assert_eq!(on_conn(&mut conn, &sandbox, "/api/a").await.0, 200);

    // SIGHUP with an added app.
    let added = format!(
        "\n[[app]]\nname = \"added\"\napp_key = \"added-app\"\ncorp_id = 2\ncorp_secret_file = \"{}/added_secret\"\nprefix = \"/added\"\n",
        dir.path().display()
    );
    std::fs::write(&path, format!("{base_text}{added}")).unwrap();
    p.signal("HUP");
    p.wait_for("the reload", |_, err| {
        err.contains("configuration reloaded").then_some(())
    })
    .await;
    assert_eq!(
        on_conn(&mut conn, &sandbox, "/added/api/b").await,
        (200, Some("added-app".to_owned()))
    );

    // SIGHUP with a broken file: refused, logged as file: key: problem, old config kept.
    std::fs::write(
        &path,
        format!("{base_text}{added}\n[server]\nlisten_typo = 1\n"),
    )
    .unwrap();
    p.signal("HUP");
    p.wait_for("the refusal", |_, err| {
        err.contains("configuration refused").then_some(())
    })
    .await;
    let logs = p.stderr.lock().unwrap().clone();
    assert!(logs.contains(&format!("{}: ", path.display())), "{logs}");
    assert_eq!(
        on_conn(&mut conn, &sandbox, "/added/api/c").await,
        (200, Some("added-app".to_owned()))
    );

    p.sigterm();
    assert_eq!(p.wait().await.code(), Some(0));
}

#[tokio::test]
async fn post_reload_on_the_admin_port_applies_a_changed_file_and_refuses_a_broken_one() {
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(
        dir.path(),
        SandboxOptions {
            apps: vec![
                cx_proxy::sandbox::SandboxApp::demo(),
                "added-app:2:added-secret".parse().unwrap(),
            ],
            ..Default::default()
        },
    )
    .await;
    std::fs::write(dir.path().join("added_secret"), "added-secret").unwrap();
    let path = dir.path().join("proxy.toml");
    let admin = unused_addr();
    let base_text = config_text(
        &sandbox,
        dir.path(),
        &format!("[admin]\nlisten = \"{admin}\"\n{}", default_app(dir.path())),
    );
    std::fs::write(&path, &base_text).unwrap();
    let mut p = Proc::spawn(
        Command::new(bin())
            .args(["--log-format", "json", "run", "-c"])
            .arg(&path),
    );
    let addr = p.wait_for("the listening line", listening).await;
    let reload = || async {
        send(
            &client(false),
            request(http::Method::POST, &format!("http://{admin}/reload"), ""),
        )
        .await
    };
    assert_eq!(get(&format!("http://{addr}/api/a")).await.status, 200);
    assert_eq!(
        sandbox.recorded().pop().unwrap().token_app.as_deref(),
        Some(APP_KEY)
    );

    // A changed file: applied, said in the answer and the log.
    let added = format!(
        "\n[[app]]\nname = \"added\"\napp_key = \"added-app\"\ncorp_id = 2\ncorp_secret_file = \"{}/added_secret\"\nprefix = \"/added\"\n",
        dir.path().display()
    );
    std::fs::write(&path, format!("{base_text}{added}")).unwrap();
    let a = reload().await;
    assert_eq!(a.status, 200, "{}", a.text());
    assert_eq!(a.json()["reloaded"], true);
    assert_eq!(get(&format!("http://{addr}/added/api/b")).await.status, 200);
    assert_eq!(
        sandbox.recorded().pop().unwrap().token_app.as_deref(),
        Some("added-app")
    );

    // A broken file: 422 with each problem as file: key: what is wrong; the running config
    // stays.
    std::fs::write(
        &path,
        format!("{base_text}{added}\n[server]\nlisten_typo = 1\n"),
    )
    .unwrap();
    let a = reload().await;
    assert_eq!(a.status, 422, "{}", a.text());
    assert_eq!(a.json()["reloaded"], false);
    let problems = a.json()["problems"].to_string();
    assert!(
        problems.contains(&format!("{}: ", path.display())),
        "{problems}"
    );
    assert!(!problems.contains("added-secret"), "{problems}");
    assert_eq!(get(&format!("http://{addr}/added/api/c")).await.status, 200);
    assert_eq!(
        sandbox.recorded().pop().unwrap().token_app.as_deref(),
        Some("added-app")
    );
    p.wait_for("the refusal in the log", |_, err| {
        err.contains("POST /reload: configuration refused")
            .then_some(())
    })
    .await;

    p.sigterm();
    assert_eq!(p.wait().await.code(), Some(0));
}

#[tokio::test]
async fn corp_secret_exchanges_once_writes_a_private_file_and_never_prints_the_secret() {
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let corp = cx_proxy::sandbox::SandboxCorp::demo();
    let out = dir.path().join("corp-20002");
    // The corp's app already points at the file the exchange is about to write: only
    // [upstream] is read, so that is no obstacle.
    let text = config_text(
        &sandbox,
        dir.path(),
        &format!(
            "[[app]]\nname = \"corp\"\nkind = \"corp-service\"\ncorp_id = 20002\ncorp_secret_file = \"{}\"\n",
            out.display()
        ),
    );
    let config = dir.path().join("proxy.toml");
    std::fs::write(&config, text).unwrap();
    let run = |out: &std::path::Path| {
        let mut cmd = Command::new(bin());
        cmd.args(["corp-secret", "-c"])
            .arg(&config)
            .args(["--corp-id", "20002"])
            .args(["--corp-authorization-env", "CX_TEST_CORP_AUTH"])
            .args(["--temp-secret-env", "CX_TEST_TEMP_SECRET"])
            .arg("--out")
            .arg(out)
            .env("CX_TEST_CORP_AUTH", "auth-code-xyz")
            .env("CX_TEST_TEMP_SECRET", &corp.temp_secret);
        Proc::spawn(&mut cmd)
    };
    let exchanges = || {
        sandbox
            .token_requests()
            .iter()
            .filter(|(p, _)| p == "/api/corp-service/v1/corp-secrets")
            .count()
    };
    let printed = |p: &Proc| format!("{}{}", p.stdout.lock().unwrap(), p.stderr.lock().unwrap());
    let secrets = [
        corp.secret.as_str(),
        corp.temp_secret.as_str(),
        "auth-code-xyz",
    ];

    // A file that cannot be made is found out before the one-time code is spent.
    let mut p = run(&dir.path().join("no-such-folder/corp-20002"));
    assert_eq!(p.wait().await.code(), Some(1));
    assert!(printed(&p).contains("cannot create"), "{}", printed(&p));
    assert_eq!(exchanges(), 0, "the temp secret was not used");

    let mut p = run(&out);
    assert_eq!(p.wait().await.code(), Some(0), "{}", printed(&p));
    assert_eq!(
        std::fs::read_to_string(&out).unwrap().trim_end(),
        corp.secret
    );
    let mode = std::fs::metadata(&out).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "{mode:o}");
    assert!(printed(&p).contains(&out.display().to_string()));
    for s in secrets {
        assert!(!printed(&p).contains(s), "{s:?} printed: {}", printed(&p));
    }
    assert_eq!(exchanges(), 1);

    // An existing file is refused before the exchange: the one-time code is not spent.
    let mut p = run(&out);
    assert_eq!(p.wait().await.code(), Some(1));
    assert!(printed(&p).contains("exists"), "{}", printed(&p));
    assert_eq!(exchanges(), 1);

    // A second exchange: the platform's 40007, with its code and message.
    let again = dir.path().join("again");
    let mut p = run(&again);
    assert_eq!(p.wait().await.code(), Some(1));
    let text = printed(&p);
    assert!(
        text.contains("40007") && text.contains("already exists"),
        "{text}"
    );
    assert!(!again.exists());
    for s in secrets {
        assert!(!text.contains(s), "{s:?} printed: {text}");
    }

    // Past its 24 hours: 40006 (on a sandbox whose corp was never exchanged).
    let dir2 = tempfile::tempdir().unwrap();
    let fresh = support::sandbox(dir2.path(), SandboxOptions::default()).await;
    fresh.expire_temp_secrets();
    std::fs::write(&config, config_text(&fresh, dir2.path(), "")).unwrap();
    let mut p = run(&dir.path().join("late"));
    assert_eq!(p.wait().await.code(), Some(1));
    assert!(printed(&p).contains("40006"), "{}", printed(&p));
}

#[tokio::test]
async fn acknowledged_callbacks_survive_sighup_and_kill_9_and_the_key_never_shows() {
    use cx_proxy::sandbox::callbacks::CallbackSend;
    use cx_proxy::sandbox::receiver::Receiver;
    const KEY: &str = "callback-key-never-shown";
    let dir = tempfile::tempdir().unwrap();
    let sandbox = sandbox(dir.path(), SandboxOptions::default()).await;
    let receiver = Receiver::start("127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    // The receiver is busy: nothing is taken before the crash.
    receiver.answer(503);
    std::fs::write(dir.path().join("cb_key"), KEY).unwrap();
    let (cb, admin) = (unused_addr(), unused_addr());
    let text = config_text(
        &sandbox,
        dir.path(),
        &format!(
            "[admin]\nlisten = \"{admin}\"\n\n[callbacks]\nlisten = \"{cb}\"\nallow = [\"127.0.0.1\"]\n\
             queue = \"queue.db\"\n\n[[callback]]\nname = \"contacts\"\npath = \"/cx/callback\"\n\
             app = \"default\"\nkey_file = \"cb_key\"\ndeliver_to = \"{}\"\n{}",
            receiver.url("/events"),
            default_app(dir.path())
        ),
    );
    let path = dir.path().join("proxy.toml");
    std::fs::write(&path, &text).unwrap();
    let run = || {
        Proc::spawn(
            Command::new(bin())
                .args(["--log-format", "json", "--log-level", "debug", "run", "-c"])
                .arg(&path),
        )
    };
    let callback = |seq: u64| CallbackSend {
        url: format!("http://{cb}/cx/callback"),
        key: KEY.into(),
        corpid: serde_json::json!(10001),
        body: serde_json::json!({"event_type": "user_add", "seq": seq})
            .as_object()
            .cloned()
            .unwrap(),
        test: false,
    };
    let mut first = run();
    first.wait_for("the listening line", listening).await;
    for seq in 0..3 {
        assert_eq!(
            sandbox.send_callback(&callback(seq)).await.unwrap(),
            vec![200]
        );
    }
    // A reload keeps what is queued.
    std::fs::write(
        &path,
        text.replace("[callbacks]", "[callbacks]\ndeliver_timeout_ms = 4000"),
    )
    .unwrap();
    first.signal("HUP");
    first
        .wait_for("the reload", |_, err| {
            err.contains("configuration reloaded").then_some(())
        })
        .await;
    for seq in 3..5 {
        assert_eq!(
            sandbox.send_callback(&callback(seq)).await.unwrap(),
            vec![200]
        );
    }
    let view = get(&format!("http://{admin}/callbacks")).await.json();
    assert_eq!(view["routes"][0]["pending"], 5, "{view}");
    let metrics = get(&format!("http://{admin}/metrics")).await.text();
    assert!(metrics.contains("cx_proxy_callbacks_received_total{reason=\"\",result=\"accepted\",route=\"contacts\"} 5"), "{metrics}");
    first.signal("KILL");
    first.wait().await;
    assert!(receiver.received().is_empty());

    // After the crash, with the receiver back: every acknowledged event, in order.
    receiver.answer(200);
    let mut second = run();
    second.wait_for("the listening line", listening).await;
    assert_eq!(receiver.wait_for(5, Duration::from_secs(30)).await, 5);
    let seqs: Vec<u64> = receiver
        .received()
        .iter()
        .map(|r| {
            serde_json::from_slice::<serde_json::Value>(&r.body).unwrap()["seq"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(seqs, [0, 1, 2, 3, 4]);
    second.sigterm();
    assert_eq!(second.wait().await.code(), Some(0));
    for p in [&first, &second] {
        let logs = format!("{}{}", p.stdout.lock().unwrap(), p.stderr.lock().unwrap());
        assert!(logs.contains("callback"), "the relay logs its work");
        assert!(!logs.contains(KEY), "the callback key reached a log line");
    }
    assert!(!view.to_string().contains(KEY) && !metrics.contains(KEY));
}
