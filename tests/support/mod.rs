//! Shared test support: a sandbox upstream, a proxy in front of it, and a plain HTTP client.
//!
//! Everything listens on 127.0.0.1 with port 0; nothing is shared between tests.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use cx_proxy::clock::SharedClock;
use cx_proxy::sandbox::{Sandbox, SandboxOptions};
use cx_proxy::{Config, Proxy, ProxyHandle};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;

/// The sandbox's demo corp (organisation service) and its permanent secret.
pub const CORP: &str = "20002";
pub const CORP_SECRET: &str = "demo-corp-secret";

/// The demo app's credentials, known to the default sandbox.
pub const APP_KEY: &str = "demo-app";
pub const CORP_ID: &str = "10001";
pub const SECRET: &str = "demo-secret";

/// A sandbox, a proxy in front of it, and the directory holding the CA and secrets.
pub struct Env {
    pub sandbox: Sandbox,
    pub proxy: ProxyHandle,
    pub dir: TempDir,
}

impl Env {
    /// The proxy's base URL.
    pub fn base(&self) -> String {
        format!("http://{}", self.proxy.addr)
    }

    /// `http://proxy` + `path`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base())
    }
}

/// Starts a sandbox with `opts` (listen and state_dir are filled in).
pub async fn sandbox(dir: &Path, opts: SandboxOptions) -> Sandbox {
    Sandbox::start(SandboxOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        state_dir: Some(dir.to_path_buf()),
        ..opts
    })
    .await
    .expect("sandbox starts")
}

/// A proxy config pointing at `sandbox` (its CA trusted), `extra` appended (whole tables;
/// change single keys with [`set`]). The demo app's secret is written to a file in `dir`.
pub fn config_text(sandbox: &Sandbox, dir: &Path, extra: &str) -> String {
    let secret = dir.join("corp_secret");
    std::fs::write(&secret, SECRET).unwrap();
    std::fs::write(dir.join("corp_secret_20002"), CORP_SECRET).unwrap();
    format!(
        r#"
[server]
listen = "127.0.0.1:0"

[upstream]
url = "{url}"
ca_file = "{ca}"
timeout_ms = 5000

{extra}
"#,
        url = sandbox.url(),
        ca = dir.join("ca.pem").display(),
    )
}

/// The usual single app, routed by prefix `/`.
pub fn default_app(dir: &Path) -> String {
    format!(
        r#"
[[app]]
name = "default"
app_key = "{APP_KEY}"
corp_id = {CORP_ID}
corp_secret_file = "{}"
prefix = "/"
"#,
        dir.join("corp_secret").display()
    )
}

/// The sandbox's demo corp as a `kind = "corp-service"` `[[app]]` named `name`, under `prefix`
/// if given; its secret is the file [`config_text`] writes (`{dir}` is the temp dir, as in
/// [`EnvBuilder::apps`]).
pub fn corp_app(name: &str, prefix: Option<&str>) -> String {
    let prefix = prefix.map_or(String::new(), |p| format!("prefix = \"{p}\"\n"));
    format!(
        "\n[[app]]\nname = \"{name}\"\nkind = \"corp-service\"\ncorp_id = {CORP}\ncorp_secret_file = \"{{dir}}/corp_secret_20002\"\n{prefix}"
    )
}

/// GET `url` with extra request headers.
pub async fn get_with(url: &str, headers: &[(&str, &str)]) -> Answer {
    let mut b = Request::builder().uri(url);
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    send(&client(false), b.body(Full::new(Bytes::new())).unwrap()).await
}

/// `text` with `key` (dotted: `upstream.timeout_ms`; a number picks an array's element:
/// `app.0.prefix`) set to `value`, tables created as needed: configs are edited by key, not
/// by splicing text.
pub fn set(text: &str, key: &str, value: impl Into<toml::Value>) -> String {
    let mut root = toml::Value::Table(text.parse().unwrap_or_else(|e| panic!("{e}\n{text}")));
    let (path, last) = key.rsplit_once('.').map_or(("", key), |(p, l)| (p, l));
    let mut at = &mut root;
    for part in path.split('.').filter(|p| !p.is_empty()) {
        at = match part.parse::<usize>() {
            Ok(i) => &mut at.as_array_mut().expect("an array")[i],
            Err(_) => at
                .as_table_mut()
                .expect("a table")
                .entry(part)
                .or_insert_with(|| toml::Value::Table(Default::default())),
        };
    }
    at.as_table_mut()
        .expect("a table")
        .insert(last.to_owned(), value.into());
    toml::to_string(&root).unwrap()
}

/// Parses config text or panics with every problem.
pub fn config(text: &str) -> Config {
    match Config::from_toml(text, "test.toml", None) {
        Ok(l) => l.config,
        Err(e) => panic!("bad test config:\n{e}\n---\n{text}"),
    }
}

/// A default sandbox and a proxy with the default app.
pub async fn env() -> Env {
    EnvBuilder::new().start().await
}

/// Like [`env`] with sandbox options and an optional clock.
pub async fn env_with(opts: SandboxOptions, token_extra: &str, clock: Option<SharedClock>) -> Env {
    let mut b = EnvBuilder::new().sandbox(opts).extra(token_extra);
    b.clock = clock;
    b.start().await
}

/// Something done to the sandbox before the proxy starts.
type Prepare = Box<dyn FnOnce(&Sandbox)>;

/// Builds an [`Env`] step by step.
pub struct EnvBuilder {
    opts: SandboxOptions,
    extra: String,
    apps: Option<String>,
    admin: bool,
    files: Vec<(String, String)>,
    pub clock: Option<SharedClock>,
    prepare: Option<Prepare>,
    edits: Vec<(String, toml::Value)>,
}

impl EnvBuilder {
    pub fn new() -> Self {
        EnvBuilder {
            opts: SandboxOptions::default(),
            extra: String::new(),
            apps: None,
            admin: false,
            files: Vec::new(),
            clock: None,
            prepare: None,
            edits: Vec::new(),
        }
    }

    pub fn sandbox(mut self, opts: SandboxOptions) -> Self {
        self.opts = opts;
        self
    }

    /// Tables placed before the apps (`[token]`, …); `{dir}` is replaced by the temp dir.
    pub fn extra(mut self, text: &str) -> Self {
        self.extra = text.into();
        self
    }

    /// `[[app]]` tables replacing the default app; `{dir}` is replaced by the temp dir.
    pub fn apps(mut self, text: &str) -> Self {
        self.apps = Some(text.into());
        self
    }

    /// A file written into the temp dir before the config is read (secrets).
    pub fn file(mut self, name: &str, content: &str) -> Self {
        self.files.push((name.into(), content.into()));
        self
    }

    /// Also listen on an admin address.
    pub fn admin(mut self) -> Self {
        self.admin = true;
        self
    }

    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Sets one key of the generated config ([`set`]).
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Self {
        self.edits.push((key.into(), value.into()));
        self
    }

    /// Runs on the sandbox before the proxy starts (its warm-up fetch sees the result).
    pub fn prepare(mut self, f: impl FnOnce(&Sandbox) + 'static) -> Self {
        self.prepare = Some(Box::new(f));
        self
    }

    pub async fn start(self) -> Env {
        let dir = tempfile::tempdir().unwrap();
        let sandbox = sandbox(dir.path(), self.opts).await;
        for (name, content) in &self.files {
            std::fs::write(dir.path().join(name), content).unwrap();
        }
        if let Some(f) = self.prepare {
            f(&sandbox);
        }
        let apps = match self.apps {
            Some(a) => a.replace("{dir}", &dir.path().display().to_string()),
            None => default_app(dir.path()),
        };
        let admin = if self.admin {
            "[admin]\nlisten = \"127.0.0.1:0\"\n"
        } else {
            ""
        };
        let extra = self
            .extra
            .replace("{dir}", &dir.path().display().to_string());
        let text = config_text(&sandbox, dir.path(), &format!("{admin}{extra}\n{apps}"));
        let text = self
            .edits
            .into_iter()
            .fold(text, |t, (key, value)| set(&t, &key, value));
        let cfg = config(&text);
        let proxy = match self.clock {
            Some(clock) => ProxyHandle::start_with(Proxy::with_clock(cfg, clock).unwrap())
                .await
                .unwrap(),
            None => ProxyHandle::start(cfg).await.unwrap(),
        };
        Env {
            sandbox,
            proxy,
            dir,
        }
    }
}

impl Default for EnvBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl Env {
    /// `http://admin` + `path`.
    pub fn admin_url(&self, path: &str) -> String {
        format!(
            "http://{}{path}",
            self.proxy.admin_addr.expect("admin configured")
        )
    }

    /// Waits (at most 10 s) until the proxy holds a token for every app.
    pub async fn ready(&self) {
        wait_ready(&self.proxy).await;
    }
}

/// A plain-HTTP client (HTTP/1.1, or h2 prior knowledge with `h2c`).
pub fn client(h2c: bool) -> Client<HttpConnector, Full<Bytes>> {
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2c);
    b.build(HttpConnector::new())
}

/// A response, read whole.
#[derive(Debug)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends a request and reads the whole answer.
pub async fn send<C>(client: &Client<C, Full<Bytes>>, req: Request<Full<Bytes>>) -> Answer
where
    C: hyper_util::client::legacy::connect::Connect + Clone + Send + Sync + 'static,
{
    let resp = client.request(req).await.expect("proxy answers");
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.expect("body reads").to_bytes();
    Answer {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// `method url` with `body`.
pub fn request(method: Method, url: &str, body: impl Into<Bytes>) -> Request<Full<Bytes>> {
    Request::builder()
        .method(method)
        .uri(url)
        .body(Full::new(body.into()))
        .unwrap()
}

/// GET `url`.
pub async fn get(url: &str) -> Answer {
    send(&client(false), request(Method::GET, url, Bytes::new())).await
}

/// Asserts an answer is the proxy's own error of `kind`, and returns its body.
pub fn assert_proxy_error(a: &Answer, status: u16, kind: &str) -> serde_json::Value {
    assert_eq!(a.status.as_u16(), status, "{}", a.text());
    assert_eq!(a.headers["x-cx-proxy-error"], kind, "{}", a.text());
    assert_eq!(a.headers["content-type"], "application/json");
    let v = a.json();
    assert!(v["err_code"].as_u64().unwrap() / 1000 == 990, "{v}");
    assert!(v["err_msg"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
    v
}

/// SHA-256 of `data`, hex.
pub fn sha256(data: &[u8]) -> String {
    cx_proxy::sandbox::hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

/// `n` bytes that do not compress or repeat in an obvious way.
pub fn noise(n: usize) -> Vec<u8> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

/// Path of the built `cx-proxy` binary.
pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_cx-proxy"))
}

/// Keeps a value alive in an `Arc` for spawned tasks.
pub fn shared<T>(v: T) -> Arc<T> {
    Arc::new(v)
}

/// An address nothing listens on (bound then released).
pub fn unused_addr() -> SocketAddr {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap()
}

/// An HTTPS client trusting `ca_pem`, presenting `client_cert` if given (mTLS).
pub fn tls_client(
    ca_pem: &str,
    client_cert: Option<&cx_proxy::sandbox::ca::Issued>,
) -> Client<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in cx_proxy::tls::parse_certs(ca_pem.as_bytes()).unwrap() {
        roots.add(cert).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(cx_proxy::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match client_cert {
        Some(c) => builder
            .with_client_auth_cert(c.chain.clone(), c.key.clone_key())
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    let https = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only()
        .enable_http1()
        .enable_http2()
        .build();
    Client::builder(TokioExecutor::new()).build(https)
}

/// Writes raw bytes on a fresh connection and reads until the server closes it or 5 s pass.
pub async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let _ = s.write_all(bytes).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

/// `n` GETs of `url` sent at once (each on its own connection); their answers in order.
pub async fn get_concurrently(url: &str, n: usize) -> Vec<Answer> {
    let c = client(false);
    let tasks: Vec<_> = (0..n)
        .map(|_| {
            let (c, url) = (c.clone(), url.to_owned());
            tokio::spawn(async move { send(&c, request(Method::GET, &url, Bytes::new())).await })
        })
        .collect();
    let mut out = Vec::with_capacity(n);
    for t in tasks {
        out.push(t.await.expect("request task"));
    }
    out
}

/// One HTTP/1.1 connection to `addr`, kept open for as many requests as the test sends.
pub async fn kept_open_connection(
    addr: impl tokio::net::ToSocketAddrs,
) -> hyper::client::conn::http1::SendRequest<Full<Bytes>> {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake::<_, Full<Bytes>>(
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    sender
}

/// A GET of `path` for [`kept_open_connection`] (origin-form, any `Host`).
pub fn get_on_connection(path: &str) -> Request<Full<Bytes>> {
    Request::builder()
        .uri(path)
        .header("host", "proxy")
        .body(Full::new(Bytes::new()))
        .unwrap()
}

/// Asserts that the proxy's /metrics text has (or has not) `needle`.
pub fn assert_metrics(proxy: &ProxyHandle, needle: &str, present: bool) {
    let metrics = proxy.proxy.metrics().render();
    assert_eq!(metrics.contains(needle), present, "{needle}:\n{metrics}");
}

/// Waits until every app of `proxy` has a token (10 s at most, then panics with why not).
pub async fn wait_ready(proxy: &ProxyHandle) {
    for _ in 0..500 {
        if proxy.proxy.tokens().status().await.iter().all(|a| a.ready) {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    panic!(
        "the proxy never became ready: {:?}",
        proxy.proxy.tokens().status().await
    );
}

/// `promtool check metrics` (Debian's prometheus package; `.ci/run` installs it) finds no
/// problem in `text`. Without promtool this says so and passes, unless under CI.
pub fn assert_promtool_clean(text: &str) {
    use std::io::Write as _;
    let child = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let Ok(mut child) = child else {
        assert!(
            std::env::var_os("CI").is_none() && std::env::var_os("CX_REQUIRE_REDIS").is_none(),
            "promtool is required under CI but not installed (apt-get install prometheus)"
        );
        eprintln!("SKIPPED: promtool is not installed; the metrics were not linted");
        return;
    };
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && said.trim().is_empty(),
        "promtool: {said}\n{text}"
    );
}
