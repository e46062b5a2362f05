//! The offline Cheng-Xun emulator (SPEC section 7): `cx-proxy sandbox`, half of `cx-proxy
//! demo`, and the upstream of the integration tests.
//!
//! It speaks HTTPS with a CA generated at startup (written to `DIR/ca.pem`), issues random
//! tokens at the token endpoint, checks them on every other `/api/...` path, and answers
//! `200 {"err_code":0,"err_msg":"success","data":{method, path, query, body_len,
//! body_sha256}}`. Faults are injected through `/__sandbox/` control endpoints or the same
//! methods on [`Sandbox`] (tests):
//!
//! | endpoint | does |
//! | --- | --- |
//! | `GET /__sandbox/stats` | token fetches per app, requests seen, tokens issued |
//! | `GET /__sandbox/requests` | the last API requests as received (token removed) |
//! | `POST /__sandbox/revoke` | invalidates every token issued so far |
//! | `POST /__sandbox/fail-token-fetches?n=N[&code=C&msg=M]` | the next N token fetches fail |
//! | `POST /__sandbox/delay?token_ms=T&token_answer_ms=L&api_ms=A` | delays token answers (before / after issuing) and API answers |
//! | `POST /__sandbox/quota?n=N` | daily token quota per app (0 = none); resets the count |
//! | `POST /__sandbox/reject-tokens?on=1` | every API call answers 40014 until `on=0` |
//!
//! An API call with `sandbox_echo=1` in its query answers with its own request body, streamed
//! (to test large bodies in both directions).

pub mod ca;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderName, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use ring::rand::SecureRandom;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::body::Body;
use crate::config::DEFAULT_TOKEN_PATH;
use crate::error::StartupError;

/// Recorded API requests kept for inspection.
const RECORD_LIMIT: usize = 1000;

/// An app the sandbox knows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxApp {
    /// `app_key`.
    pub app_key: String,
    /// `corp_id`.
    pub corp_id: String,
    /// `corp_secret`.
    pub secret: String,
}

impl SandboxApp {
    /// The demo app, `demo-app:10001:demo-secret`.
    pub fn demo() -> Self {
        SandboxApp {
            app_key: "demo-app".into(),
            corp_id: "10001".into(),
            secret: "demo-secret".into(),
        }
    }
}

impl FromStr for SandboxApp {
    type Err = String;

    /// `KEY:CORP_ID:SECRET` (the secret may itself contain `:`).
    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.splitn(3, ':');
        match (it.next(), it.next(), it.next()) {
            (Some(k), Some(c), Some(sec)) if !k.is_empty() && !c.is_empty() && !sec.is_empty() => {
                Ok(SandboxApp {
                    app_key: k.into(),
                    corp_id: c.into(),
                    secret: sec.into(),
                })
            }
            _ => Err(format!("{s:?} is not KEY:CORP_ID:SECRET")),
        }
    }
}

/// An app whose token request carries its own parameters (an organisation-service app):
/// `NAME@PATH?k=v&k2=v2`. A fetch at `PATH` with exactly these parameters gets a token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamApp {
    /// Name the fetches are counted under.
    pub name: String,
    /// Token endpoint path.
    pub token_path: String,
    /// The exact query parameters expected (decoded).
    pub params: BTreeMap<String, String>,
}

impl FromStr for ParamApp {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not NAME@/path?key=value&...");
        let (name, rest) = s.split_once('@').ok_or_else(bad)?;
        let (path, query) = rest.split_once('?').ok_or_else(bad)?;
        if name.is_empty() || !path.starts_with('/') {
            return Err(bad());
        }
        Ok(ParamApp {
            name: name.into(),
            token_path: path.into(),
            params: query_pairs(Some(query)).into_iter().collect(),
        })
    }
}

/// How a new fetch treats the previous token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Reissue {
    /// A new token each time; the previous one stays valid for `overlap`.
    New,
    /// The same token until it expires.
    Same,
}

/// How the sandbox behaves.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    /// Where to listen (port 0 picks one).
    pub listen: SocketAddr,
    /// Where `ca.pem` is written, if anywhere.
    pub state_dir: Option<PathBuf>,
    /// Known apps.
    pub apps: Vec<SandboxApp>,
    /// Known apps with their own token parameters.
    pub param_apps: Vec<ParamApp>,
    /// Lifetime of issued tokens.
    pub expires_in: Duration,
    /// Reissue mode.
    pub reissue: Reissue,
    /// With `Reissue::New`, how long the previous token stays valid.
    pub overlap: Duration,
    /// Token path.
    pub token_path: String,
    /// Header checked for the token when the query has none (`Bearer ` prefix optional).
    pub token_header: HeaderName,
    /// Successful fetches allowed per app (0 = unlimited) before `45009`.
    pub daily_quota: u32,
    /// Offer only HTTP/1.1 by ALPN (like an upstream without HTTP/2).
    pub h1_only: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir: None,
            apps: vec![SandboxApp::demo()],
            param_apps: Vec::new(),
            expires_in: Duration::from_secs(7200),
            reissue: Reissue::New,
            overlap: Duration::ZERO,
            token_path: DEFAULT_TOKEN_PATH.into(),
            token_header: http::header::AUTHORIZATION,
            daily_quota: 0,
            h1_only: false,
        }
    }
}

/// An API request as the sandbox received it.
#[derive(Debug, Clone)]
pub struct Recorded {
    /// Method.
    pub method: Method,
    /// Path.
    pub path: String,
    /// Authority the request named (`:authority` or `Host`).
    pub authority: String,
    /// HTTP version it arrived with.
    pub version: http::Version,
    /// Query without `access_token`.
    pub query: String,
    /// Headers as received.
    pub headers: HeaderMap,
    /// Body length (0 in echo mode, where the body is not read by the sandbox).
    pub body_len: u64,
    /// Body SHA-256, hex.
    pub body_sha256: String,
    /// The token presented, if any (`query` or header).
    pub token: Option<String>,
    /// The app the presented token was issued to, if the sandbox issued it.
    pub token_app: Option<String>,
    /// `valid`, `missing`, `unknown` or `expired`.
    pub token_status: &'static str,
}

#[derive(Debug)]
struct Issued {
    app_key: String,
    expires_at: Instant,
    /// Revoked or superseded: invalid from this instant.
    invalid_from: Option<Instant>,
}

#[derive(Debug, Default)]
struct State {
    tokens: HashMap<String, Issued>,
    current: HashMap<String, String>,
    fetches: BTreeMap<String, u64>,
    issued: BTreeMap<String, u32>,
    quota: u32,
    fail_next: u32,
    fail_code: i64,
    fail_msg: String,
    token_delay: Duration,
    token_answer_delay: Duration,
    api_delay: Duration,
    requests: u64,
    reject_all: bool,
    recorded: VecDeque<Recorded>,
    token_requests: VecDeque<(String, BTreeMap<String, String>)>,
}

#[derive(Debug)]
struct Shared {
    opts: SandboxOptions,
    state: Mutex<State>,
    connections: std::sync::atomic::AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // A panic while holding the lock cannot leave the counters inconsistent enough to
        // matter for an emulator; keep serving.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A running sandbox.
#[derive(Debug)]
pub struct Sandbox {
    addr: SocketAddr,
    ca_pem: String,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Sandbox {
    /// Generates the CA, binds, writes `ca.pem` and starts serving.
    pub async fn start(opts: SandboxOptions) -> Result<Sandbox, StartupError> {
        let ca = ca::TestCa::new("cx-proxy sandbox CA")?;
        let mut server_config = ca.server_config()?;
        if opts.h1_only {
            let mut h1 = (*server_config).clone();
            h1.alpn_protocols = vec![b"http/1.1".to_vec()];
            server_config = Arc::new(h1);
        }
        let tls = Arc::new(arc_swap::ArcSwap::new(server_config));
        if let Some(dir) = &opts.state_dir {
            std::fs::create_dir_all(dir)
                .and_then(|()| std::fs::write(dir.join("ca.pem"), ca.pem()))
                .map_err(|e| {
                    StartupError::Other(format!("{}: cannot write ca.pem: {e}", dir.display()))
                })?;
        }
        let listener =
            TcpListener::bind(opts.listen)
                .await
                .map_err(|source| StartupError::Bind {
                    addr: opts.listen,
                    source,
                })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: opts.listen,
            source,
        })?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                quota: opts.daily_quota,
                ..State::default()
            }),
            opts,
            connections: std::sync::atomic::AtomicU64::new(0),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let svc_shared = shared.clone();
        let make = move |_peer: crate::proxy::Peer| {
            let shared = svc_shared.clone();
            shared
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            })
        };
        let task = tokio::spawn(crate::server::serve::<_, _, Body>(
            listener,
            Some(tls),
            make,
            async {
                let _ = stopped.await;
            },
            Duration::from_secs(1),
        ));
        Ok(Sandbox {
            addr,
            ca_pem: ca.pem().to_owned(),
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `https://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("https://{}", self.addr)
    }

    /// The CA certificate (PEM) that signed the sandbox's server certificate.
    pub fn ca_pem(&self) -> &str {
        &self.ca_pem
    }

    /// Token endpoint requests seen for `app_key` (successful or not).
    pub fn token_fetches(&self, app_key: &str) -> u64 {
        self.shared
            .lock()
            .fetches
            .get(app_key)
            .copied()
            .unwrap_or(0)
    }

    /// TLS connections accepted so far.
    pub fn connections_accepted(&self) -> u64 {
        self.shared
            .connections
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Every HTTP request seen, token fetches and API calls (not control endpoints).
    pub fn requests_seen(&self) -> u64 {
        self.shared.lock().requests
    }

    /// The last API requests received, oldest first.
    pub fn recorded(&self) -> Vec<Recorded> {
        self.shared.lock().recorded.iter().cloned().collect()
    }

    /// The last token requests: path and decoded query parameters.
    pub fn token_requests(&self) -> Vec<(String, BTreeMap<String, String>)> {
        self.shared.lock().token_requests.iter().cloned().collect()
    }

    /// While on, every API call is answered `40014` whatever its token.
    pub fn reject_all_tokens(&self, on: bool) {
        self.shared.lock().reject_all = on;
    }

    /// Every token issued so far (valid or not).
    pub fn issued_tokens(&self) -> Vec<String> {
        self.shared.lock().tokens.keys().cloned().collect()
    }

    /// Invalidates every token issued so far; returns how many were still valid.
    pub fn revoke_all(&self) -> usize {
        revoke_all(&mut self.shared.lock())
    }

    /// Makes the next `n` token fetches fail with `code` / `msg`.
    pub fn fail_token_fetches(&self, n: u32, code: i64, msg: &str) {
        let mut st = self.shared.lock();
        st.fail_next = n;
        st.fail_code = code;
        st.fail_msg = msg.to_owned();
    }

    /// Delays every token answer.
    pub fn set_token_delay(&self, d: Duration) {
        self.shared.lock().token_delay = d;
    }

    /// Delays every token answer *after* the token is issued (a superseded token is already
    /// invalid while the fetcher waits).
    pub fn set_token_answer_delay(&self, d: Duration) {
        self.shared.lock().token_answer_delay = d;
    }

    /// Delays every API answer.
    pub fn set_api_delay(&self, d: Duration) {
        self.shared.lock().api_delay = d;
    }

    /// Stops serving and waits for the server task.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

fn revoke_all(st: &mut State) -> usize {
    let now = Instant::now();
    let mut n = 0;
    for t in st.tokens.values_mut() {
        if t.invalid_from.is_none_or(|at| at > now) && t.expires_at > now {
            n += 1;
        }
        t.invalid_from = Some(now);
    }
    st.current.clear();
    n
}

fn json_response(status: StatusCode, value: &serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(Body::full(value.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn platform_error(code: i64, msg: &str) -> Response<Body> {
    json_response(StatusCode::OK, &json!({"err_code": code, "err_msg": msg}))
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

fn random_token() -> String {
    let mut bytes = [0u8; 16];
    // The system RNG failing is not recoverable for a token issuer; fall back to time-based
    // bytes so the emulator keeps answering (its tokens protect nothing real).
    if ring::rand::SystemRandom::new().fill(&mut bytes).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        bytes.copy_from_slice(&nanos.to_le_bytes());
    }
    hex(&bytes)
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

async fn handle(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    if let Some(control) = path.strip_prefix("/__sandbox/") {
        return control_endpoint(shared, req.method(), control, req.uri().query());
    }
    shared.lock().requests += 1;
    if path == shared.opts.token_path || shared.opts.param_apps.iter().any(|a| a.token_path == path)
    {
        return token_endpoint(shared, &path, req.uri().query()).await;
    }
    if path.starts_with("/api/") {
        return api(shared, req).await;
    }
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"err_code": 404, "err_msg": "not found"}),
    )
}

fn control_endpoint(
    shared: &Shared,
    method: &Method,
    what: &str,
    query: Option<&str>,
) -> Response<Body> {
    let params: HashMap<String, String> = query_pairs(query).into_iter().collect();
    let num = |k: &str| params.get(k).and_then(|v| v.parse::<u64>().ok());
    let mut st = shared.lock();
    match (method, what) {
        (&Method::GET, "stats") => json_response(
            StatusCode::OK,
            &json!({
                "token_fetches": st.fetches,
                "tokens_issued": st.issued,
                "requests": st.requests,
            }),
        ),
        (&Method::GET, "requests") => {
            let list: Vec<_> = st
                .recorded
                .iter()
                .map(|r| {
                    json!({"method": r.method.as_str(), "path": r.path, "query": r.query,
                           "body_len": r.body_len, "body_sha256": r.body_sha256, "token_status": r.token_status})
                })
                .collect();
            json_response(StatusCode::OK, &json!({ "requests": list }))
        }
        (&Method::POST, "revoke") => {
            let n = revoke_all(&mut st);
            json_response(StatusCode::OK, &json!({ "revoked": n }))
        }
        (&Method::POST, "fail-token-fetches") => {
            st.fail_next = num("n").unwrap_or(1) as u32;
            st.fail_code = params
                .get("code")
                .and_then(|c| c.parse().ok())
                .unwrap_or(-1);
            st.fail_msg = params
                .get("msg")
                .cloned()
                .unwrap_or_else(|| "system busy".into());
            json_response(StatusCode::OK, &json!({ "fail_next": st.fail_next }))
        }
        (&Method::POST, "delay") => {
            if let Some(ms) = num("token_ms") {
                st.token_delay = Duration::from_millis(ms);
            }
            if let Some(ms) = num("token_answer_ms") {
                st.token_answer_delay = Duration::from_millis(ms);
            }
            if let Some(ms) = num("api_ms") {
                st.api_delay = Duration::from_millis(ms);
            }
            json_response(
                StatusCode::OK,
                &json!({"token_ms": st.token_delay.as_millis() as u64, "api_ms": st.api_delay.as_millis() as u64}),
            )
        }
        (&Method::POST, "reject-tokens") => {
            st.reject_all = num("on").unwrap_or(1) != 0;
            json_response(StatusCode::OK, &json!({ "reject_all": st.reject_all }))
        }
        (&Method::POST, "quota") => {
            st.quota = num("n").unwrap_or(0) as u32;
            st.issued.clear();
            json_response(StatusCode::OK, &json!({ "quota": st.quota }))
        }
        _ => json_response(
            StatusCode::NOT_FOUND,
            &json!({"err_code": 404, "err_msg": "unknown control endpoint"}),
        ),
    }
}

async fn token_endpoint(shared: &Shared, path: &str, query: Option<&str>) -> Response<Body> {
    let params: BTreeMap<String, String> = query_pairs(query).into_iter().collect();
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    let param_app = shared
        .opts
        .param_apps
        .iter()
        .find(|a| a.token_path == path && a.params == params);
    let app_key = match param_app {
        Some(a) => a.name.as_str(),
        None => get("app_key"),
    };
    let delay = {
        let mut st = shared.lock();
        *st.fetches.entry(app_key.to_owned()).or_default() += 1;
        if st.token_requests.len() == RECORD_LIMIT {
            st.token_requests.pop_front();
        }
        st.token_requests
            .push_back((path.to_owned(), params.clone()));
        st.token_delay
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let answer = issue(shared, path, &params, app_key, param_app.is_some());
    // A delay after issuing: the token exists (and superseded ones are invalid) before the
    // fetcher learns it, as on a platform that is slow to answer.
    let late = shared.lock().token_answer_delay;
    if !late.is_zero() {
        tokio::time::sleep(late).await;
    }
    answer
}

fn issue(
    shared: &Shared,
    path: &str,
    params: &BTreeMap<String, String>,
    app_key: &str,
    param_app: bool,
) -> Response<Body> {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    let opts = &shared.opts;
    let mut st = shared.lock();
    if st.fail_next > 0 {
        st.fail_next -= 1;
        let (code, msg) = (st.fail_code, st.fail_msg.clone());
        return platform_error(code, &msg);
    }
    if !param_app {
        if path != opts.token_path {
            return platform_error(40001, "invalid credentials for this token endpoint");
        }
        let Some(app) = opts.apps.iter().find(|a| a.app_key == app_key) else {
            return platform_error(40089, "invalid app_key");
        };
        if app.corp_id != get("corp_id") {
            return platform_error(40013, "invalid corp_id");
        }
        if app.secret != get("corp_secret") {
            return platform_error(40001, "invalid corp_secret");
        }
    }
    let issued = st.issued.get(app_key).copied().unwrap_or(0);
    if st.quota > 0 && issued >= st.quota {
        return platform_error(45009, "api freq out of limit: daily token quota reached");
    }
    *st.issued.entry(app_key.to_owned()).or_default() += 1;
    let now = Instant::now();
    if opts.reissue == Reissue::Same {
        if let Some(tok) = st.current.get(app_key).cloned() {
            if let Some(t) = st.tokens.get(&tok) {
                if t.expires_at > now && t.invalid_from.is_none() {
                    let left = t.expires_at.duration_since(now).as_secs();
                    return token_answer(&tok, left);
                }
            }
        }
    }
    // Superseded tokens stay valid for the overlap (0 = invalid at once).
    if let Some(prev) = st.current.get(app_key).cloned() {
        if let Some(t) = st.tokens.get_mut(&prev) {
            let cut = now + opts.overlap;
            t.invalid_from = Some(t.invalid_from.map_or(cut, |at| at.min(cut)));
        }
    }
    if st.tokens.len() > 10_000 {
        st.tokens
            .retain(|_, t| t.expires_at > now && t.invalid_from.is_none_or(|at| at > now));
    }
    let token = random_token();
    st.tokens.insert(
        token.clone(),
        Issued {
            app_key: app_key.to_owned(),
            expires_at: now + opts.expires_in,
            invalid_from: None,
        },
    );
    st.current.insert(app_key.to_owned(), token.clone());
    token_answer(&token, opts.expires_in.as_secs())
}

fn token_answer(token: &str, expires_in: u64) -> Response<Body> {
    json_response(
        StatusCode::OK,
        &json!({"err_code": 0, "err_msg": "Susccess", "access_token": token, "expires_in": expires_in}),
    )
}

async fn api(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let (parts, body) = req.into_parts();
    let pairs: Vec<&str> = parts
        .uri
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .collect();
    let mut token = None;
    let mut kept = Vec::with_capacity(pairs.len());
    let mut echo = false;
    for p in pairs {
        match p.split_once('=') {
            Some(("access_token", v)) => {
                if token.is_none() {
                    token = Some(percent_decode_str(v).decode_utf8_lossy().into_owned());
                }
            }
            _ => {
                if p == "sandbox_echo=1" {
                    echo = true;
                }
                kept.push(p);
            }
        }
    }
    if token.is_none() {
        token = parts
            .headers
            .get(&shared.opts.token_header)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.strip_prefix("Bearer ").unwrap_or(v).to_owned());
    }
    let now = Instant::now();
    let (status, token_app, delay) = {
        let st = shared.lock();
        let issued = token.as_deref().and_then(|t| st.tokens.get(t));
        let status = match (&token, issued) {
            (None, _) => "missing",
            (Some(_), None) => "unknown",
            (_, Some(t)) if t.invalid_from.is_some_and(|at| at <= now) => "unknown",
            (_, Some(t)) if t.expires_at <= now => "expired",
            _ => "valid",
        };
        let status = if st.reject_all && status == "valid" {
            "unknown"
        } else {
            status
        };
        (status, issued.map(|t| t.app_key.clone()), st.api_delay)
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut recorded = Recorded {
        method: parts.method.clone(),
        path: parts.uri.path().to_owned(),
        authority: parts
            .uri
            .authority()
            .map(|a| a.as_str().to_owned())
            .or_else(|| {
                parts
                    .headers
                    .get(http::header::HOST)
                    .and_then(|h| h.to_str().ok())
                    .map(str::to_owned)
            })
            .unwrap_or_default(),
        version: parts.version,
        query: kept.join("&"),
        headers: parts.headers.clone(),
        body_len: 0,
        body_sha256: String::new(),
        token,
        token_app,
        token_status: status,
    };
    if echo && status == "valid" {
        record(shared, recorded);
        let mut resp = Response::new(Body::Incoming(body));
        resp.headers_mut().insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/octet-stream"),
        );
        return resp;
    }
    // Hash the body as it streams in; it is never held whole.
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut len = 0u64;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(f) => {
                if let Some(data) = f.data_ref() {
                    len += data.len() as u64;
                    ctx.update(data);
                }
            }
            Err(_) => return platform_error(400, "request body broken off"),
        }
    }
    recorded.body_len = len;
    recorded.body_sha256 = hex(ctx.finish().as_ref());
    let answer = match status {
        "valid" => json!({
            "err_code": 0,
            "err_msg": "success",
            "data": {
                "method": recorded.method.as_str(),
                "path": recorded.path,
                "query": recorded.query,
                "body_len": recorded.body_len,
                "body_sha256": recorded.body_sha256,
            }
        }),
        "expired" => json!({"err_code": 42001, "err_msg": "access_token expired"}),
        _ => json!({"err_code": 40014, "err_msg": "invalid access_token"}),
    };
    record(shared, recorded);
    json_response(StatusCode::OK, &answer)
}

fn record(shared: &Shared, r: Recorded) {
    let mut st = shared.lock();
    if st.recorded.len() == RECORD_LIMIT {
        st.recorded.pop_front();
    }
    st.recorded.push_back(r);
}
