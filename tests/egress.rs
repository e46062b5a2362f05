//! The platform reached through a real forward proxy (Debian's tinyproxy, HTTP CONNECT):
//! `upstream.proxy`, `HTTPS_PROXY` / `NO_PROXY` as curl reads them, `proxy = ""`, a proxy that
//! wants credentials and one that refuses the tunnel (SPEC section 3 `[upstream] proxy`).
//!
//! Each test starts its own tinyproxy on a free loopback port. Without tinyproxy on the PATH
//! these tests say so and pass, unless `CI` or `CX_REQUIRE_REDIS` is set (`.ci/run` sets the
//! latter and installs tinyproxy), which makes that a failure.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use cx_proxy::config::SecretReader;
use cx_proxy::{Config, ProxyHandle};
use support::*;

const USER: &str = "cx";
const PASSWORD: &str = "pr0xy-s3cret";

struct TinyProxy {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl TinyProxy {
    /// Starts tinyproxy on a free port with `extra` config lines, or `None` (with a note)
    /// if it is not installed.
    fn start(extra: &str) -> Option<TinyProxy> {
        if Command::new("tinyproxy").arg("-v").output().is_err() {
            assert!(
                std::env::var_os("CI").is_none() && std::env::var_os("CX_REQUIRE_REDIS").is_none(),
                "tinyproxy is required under CI but not installed (apt-get install tinyproxy)"
            );
            eprintln!("SKIPPED: tinyproxy is not installed (apt-get install tinyproxy)");
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = unused_addr().port();
        let log = dir.path().join("tinyproxy.log");
        let conf = dir.path().join("tinyproxy.conf");
        std::fs::write(
            &conf,
            format!(
                "Port {port}\nListen 127.0.0.1\nTimeout 30\nLogFile \"{}\"\nLogLevel Info\nMaxClients 50\nAllow 127.0.0.1\n{extra}\n",
                log.display()
            ),
        )
        .unwrap();
        let child = Command::new("tinyproxy")
            .arg("-d")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("tinyproxy starts");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "tinyproxy did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(TinyProxy {
            child,
            port,
            log,
            _dir: dir,
        })
    }

    fn url(&self, credentials: Option<(&str, &str)>) -> String {
        match credentials {
            Some((u, p)) => format!("http://{u}:{p}@127.0.0.1:{}", self.port),
            None => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// The CONNECT requests the proxy has logged, as `host:port`.
    fn connects(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.split("): CONNECT ").nth(1))
            .filter_map(|rest| rest.split_whitespace().next())
            .map(str::to_owned)
            .collect()
    }
}

impl Drop for TinyProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An environment of variables given here, files from the real file system.
struct Vars(HashMap<&'static str, String>);

impl SecretReader for Vars {
    fn var(&self, name: &str) -> Option<String> {
        self.0.get(name).cloned()
    }

    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// A proxy for the sandbox's default app, `upstream_extra` added to `[upstream]`, the
/// environment `vars`; started and ready.
async fn start(
    sandbox: &cx_proxy::sandbox::Sandbox,
    dir: &Path,
    upstream_extra: &str,
    vars: &[(&'static str, String)],
) -> (ProxyHandle, Config) {
    let text = config_text(sandbox, dir, &default_app(dir)).replace(
        "timeout_ms = 5000\n",
        &format!("timeout_ms = 5000\n{upstream_extra}\n"),
    );
    let vars = Vars(vars.iter().cloned().collect());
    let cfg = match Config::from_toml_with(&text, "p.toml", None, &vars) {
        Ok(l) => l.config,
        Err(e) => panic!("{e}\n{text}"),
    };
    (ProxyHandle::start(cfg.clone()).await.unwrap(), cfg)
}

#[tokio::test]
async fn calls_and_token_fetches_go_through_the_configured_proxy_with_its_credentials() {
    let Some(tp) = TinyProxy::start(&format!("BasicAuth {USER} {PASSWORD}")) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Default::default()).await;
    let platform = sb.addr().to_string();
    let setting = format!("proxy = \"{}\"", tp.url(Some((USER, PASSWORD))));
    let (proxy, cfg) = start(&sb, dir.path(), &setting, &[]).await;
    wait_ready(&proxy).await;
    let a = get(&format!("http://{}/api/apps/v1/robot/chats", proxy.addr)).await;
    assert_eq!(a.status, 200, "{}", a.text());
    // The proxy saw only the platform's host and port (TLS runs inside the tunnel).
    let seen = tp.connects();
    assert!(!seen.is_empty(), "nothing went through the proxy");
    assert!(
        seen.iter().all(|c| *c == platform),
        "{seen:?} vs {platform}"
    );
    assert_eq!(sb.token_fetches(APP_KEY), 1);
    // `check` shows the proxy with its user and without its password.
    let shown = cfg.render();
    assert!(
        shown.contains(&format!(
            "proxy = \"http://{USER}:***@127.0.0.1:{}\"",
            tp.port
        )),
        "{shown}"
    );
    assert!(shown.contains("# upstream.proxy: from the file"), "{shown}");
    assert!(!shown.contains(PASSWORD), "{shown}");
    proxy.shutdown().await.unwrap();

    // Wrong credentials: the tunnel is refused (tinyproxy says 401 where RFC 9110 has 407),
    // said in the JSON 502, the password nowhere in it.
    let setting = format!("proxy = \"{}\"", tp.url(Some((USER, "wrong-pass"))));
    let (proxy, _) = start(&sb, dir.path(), &setting, &[]).await;
    let a = get(&format!("http://{}/api/apps/v1/robot/chats", proxy.addr)).await;
    let body = assert_proxy_error(&a, 502, "upstream_unreachable");
    let msg = body["err_msg"].as_str().unwrap();
    assert!(msg.contains("it wants other credentials"), "{msg}");
    assert!(msg.contains(&format!("127.0.0.1:{}", tp.port)), "{msg}");
    assert!(!a.text().contains("wrong-pass"), "{}", a.text());
    proxy.shutdown().await.unwrap();
}

#[tokio::test]
async fn https_proxy_is_used_unless_no_proxy_names_the_host_or_the_file_says_direct() {
    let Some(tp) = TinyProxy::start("") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Default::default()).await;
    let chats = |p: &ProxyHandle| format!("http://{}/api/apps/v1/robot/chats", p.addr);

    // HTTPS_PROXY (no scheme, as curl takes it): through the proxy.
    let vars = [("HTTPS_PROXY", format!("127.0.0.1:{}", tp.port))];
    let (proxy, cfg) = start(&sb, dir.path(), "", &vars).await;
    assert_eq!(get(&chats(&proxy)).await.status, 200);
    let through = tp.connects().len();
    assert!(through > 0, "HTTPS_PROXY was not used");
    assert!(
        cfg.render().contains("# upstream.proxy: from HTTPS_PROXY"),
        "{}",
        cfg.render()
    );
    proxy.shutdown().await.unwrap();

    // The lower-case spelling wins, as in curl; ALL_PROXY is the fallback.
    let vars = [
        ("https_proxy", format!("http://127.0.0.1:{}", tp.port)),
        ("HTTPS_PROXY", "http://127.0.0.1:9".to_owned()),
    ];
    let (proxy, _) = start(&sb, dir.path(), "", &vars).await;
    assert_eq!(get(&chats(&proxy)).await.status, 200);
    proxy.shutdown().await.unwrap();
    let vars = [("ALL_PROXY", format!("http://127.0.0.1:{}", tp.port))];
    let (proxy, _) = start(&sb, dir.path(), "", &vars).await;
    assert_eq!(get(&chats(&proxy)).await.status, 200);
    proxy.shutdown().await.unwrap();
    let through = tp.connects().len();

    // NO_PROXY naming the platform's host (or a network holding it): direct.
    for no in ["127.0.0.1", "localhost,127.0.0.0/8", "*"] {
        let vars = [
            ("HTTPS_PROXY", format!("http://127.0.0.1:{}", tp.port)),
            ("NO_PROXY", no.to_owned()),
        ];
        let (proxy, cfg) = start(&sb, dir.path(), "", &vars).await;
        assert_eq!(get(&chats(&proxy)).await.status, 200, "NO_PROXY={no}");
        assert!(
            cfg.render().contains("is in NO_PROXY: direct"),
            "{}",
            cfg.render()
        );
        proxy.shutdown().await.unwrap();
    }
    // `proxy = ""` in the file: direct whatever the environment says.
    let vars = [("HTTPS_PROXY", format!("http://127.0.0.1:{}", tp.port))];
    let (proxy, _) = start(&sb, dir.path(), "proxy = \"\"", &vars).await;
    assert_eq!(get(&chats(&proxy)).await.status, 200);
    proxy.shutdown().await.unwrap();
    assert_eq!(
        tp.connects().len(),
        through,
        "a direct call went through the proxy"
    );
}

#[tokio::test]
async fn a_proxy_that_refuses_the_tunnel_or_is_not_there_gives_the_json_502() {
    // This proxy tunnels only to port 1.
    let Some(tp) = TinyProxy::start("ConnectPort 1") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Default::default()).await;
    let (proxy, _) = start(
        &sb,
        dir.path(),
        &format!("proxy = \"{}\"", tp.url(None)),
        &[],
    )
    .await;
    let a = get(&format!("http://{}/api/apps/v1/robot/chats", proxy.addr)).await;
    let body = assert_proxy_error(&a, 502, "upstream_unreachable");
    let msg = body["err_msg"].as_str().unwrap();
    assert!(msg.contains("refused CONNECT"), "{msg}");
    assert!(msg.contains("403"), "{msg}");
    assert_eq!(sb.token_fetches(APP_KEY), 0);
    proxy.shutdown().await.unwrap();

    // Nothing listening where the proxy should be.
    let gone = unused_addr();
    let setting = format!("proxy = \"http://{USER}:{PASSWORD}@{gone}\"");
    let (proxy, _) = start(&sb, dir.path(), &setting, &[]).await;
    let a = get(&format!("http://{}/api/apps/v1/robot/chats", proxy.addr)).await;
    let body = assert_proxy_error(&a, 502, "upstream_unreachable");
    let msg = body["err_msg"].as_str().unwrap();
    assert!(msg.contains("cannot reach the proxy"), "{msg}");
    assert!(!a.text().contains(PASSWORD));
    proxy.shutdown().await.unwrap();
}

#[test]
fn proxy_urls_that_cannot_work_are_refused_by_check() {
    let load = |proxy: &str, vars: &[(&'static str, &str)]| {
        let text = format!(
            "[upstream]\nproxy = {proxy}\n[[app]]\nname = \"a\"\napp_key = \"k\"\ncorp_id = 1\ncorp_secret = \"s\"\n"
        );
        let text = if proxy.is_empty() {
            text.replace("proxy = \n", "")
        } else {
            text
        };
        let vars = Vars(vars.iter().map(|(k, v)| (*k, v.to_string())).collect());
        match Config::from_toml_with(&text, "p.toml", None, &vars) {
            Ok(_) => String::new(),
            Err(e) => e.to_string(),
        }
    };
    let e = load("\"socks5://u:hidden@127.0.0.1:1080\"", &[]);
    assert!(
        e.contains("p.toml: upstream.proxy: socks5:// proxies are not supported"),
        "{e}"
    );
    assert!(!e.contains("hidden"), "{e}");
    let e = load("\"https://127.0.0.1:3128\"", &[]);
    assert!(e.contains("https:// proxies are not supported"), "{e}");
    let e = load("\"http://\"", &[]);
    assert!(e.contains("p.toml: upstream.proxy: "), "{e}");
    // From the environment: the variable is named.
    let e = load("", &[("HTTPS_PROXY", "socks5h://u:hidden@127.0.0.1:1080")]);
    assert!(
        e.contains("upstream.proxy (from HTTPS_PROXY): socks5h://"),
        "{e}"
    );
    assert!(!e.contains("hidden"), "{e}");
    // A raw '@' in the password: refused, no piece of it repeated (it would have been sent
    // as the proxy's address, and shown in errors).
    let e = load("\"http://alice:Sup3r@S3cret.pw@127.0.0.1:3128\"", &[]);
    assert!(e.contains("raw '@': write it as %40"), "{e}");
    assert!(!e.contains("S3cret") && !e.contains("Sup3r"), "{e}");
    let e = load(
        "",
        &[("HTTPS_PROXY", "http://svc:Winter@2026!@127.0.0.1:3128")],
    );
    assert!(
        e.contains("upstream.proxy (from HTTPS_PROXY): the user or password holds a raw '@'"),
        "{e}"
    );
    assert!(!e.contains("Winter") && !e.contains("2026!"), "{e}");
    // An unusable proxy beside a NO_PROXY that does not name the host is still judged.
    let e = load(
        "",
        &[
            ("HTTPS_PROXY", "ftp://127.0.0.1:21"),
            ("NO_PROXY", "example.com"),
        ],
    );
    assert!(
        e.contains("upstream.proxy (from HTTPS_PROXY): is not a usable proxy URL"),
        "{e}"
    );
    // No port: curl's 1080.
    assert_eq!(load("\"http://127.0.0.1\"", &[]), "");
}

#[tokio::test]
async fn a_silent_proxy_is_given_up_at_connect_timeout_and_its_connection_closed() {
    use tokio::io::AsyncReadExt;
    // A "proxy" that accepts and reads the CONNECT, then never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let at = silent.local_addr().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sb = sandbox(dir.path(), Default::default()).await;
    let setting = format!("proxy = \"http://{at}\"\nconnect_timeout_ms = 300");
    let (proxy, _) = start(&sb, dir.path(), &setting, &[]).await;
    let (mut conn, _) = silent.accept().await.unwrap();
    let mut head = [0u8; 512];
    let n = conn.read(&mut head).await.unwrap();
    assert!(head[..n].starts_with(b"CONNECT "), "{:?}", &head[..n]);
    let a = get(&format!("http://{}/api/apps/v1/robot/chats", proxy.addr)).await;
    let body = assert_proxy_error(&a, 502, "upstream_unreachable");
    assert!(
        body["err_msg"]
            .as_str()
            .unwrap()
            .contains("no tunnel within 300 ms"),
        "{body}"
    );
    // The abandoned tunnel's socket is closed, not left waiting on the proxy.
    let closed = tokio::time::timeout(Duration::from_secs(5), conn.read(&mut head)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    proxy.shutdown().await.unwrap();
}
