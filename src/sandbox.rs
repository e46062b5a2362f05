//! The offline Cheng-Xun emulator (SPEC section 7): `cx-proxy sandbox`, half of `cx-proxy
//! demo`, and the upstream of the integration tests. It behaves as `PLATFORM.md` describes
//! the platform ([`crate::platform`] holds those facts):
//!
//! - HTTPS with a CA generated at startup (written to `DIR/ca.pem`).
//! - Both token flows: self-built apps at `GET /api/apps/v1/access-tokens?app_key=&corp_id=&corp_secret=`,
//!   organisation-service corps at `GET /api/corp-service/v1/access-tokens?corp_id=&corp_secret=`
//!   (the permanent secret; `corp_authorization` is accepted and recorded). Answers are
//!   `{"err_code":0,"err_msg":"Susccess","access_token":…,"expires_in":…}` (the platform's
//!   own spelling); wrong credentials are 40001 (the organisation service's documented code; the
//!   self-built app's is cut off in our copy of the documentation).
//! - The one-time exchange at `GET /api/corp-service/v1/corp-secrets?corp_id=&corp_authorization=&temp_corp_secret=`:
//!   the 24-hour `temp_corp_secret` gives the permanent `corp_secret` once (answer field
//!   `corp_secret`, assumed), then 40007; after 24 hours 40006.
//! - Every other `/api/...` path checks the token (query `access_token`, else the configured
//!   header): valid answers `200 {"err_code":0,"err_msg":"success","data":{method, path,
//!   query, body_len, body_sha256, api}}` (`api` names the documented call, or is null);
//!   missing, unknown or revoked is 49000, and on `/api/corp-service/` paths 40004 (40005
//!   when expired). The documented rate limits are enforced per app in sliding windows
//!   (49001, 55001 on `/api/corp-service/`) unless turned off.
//!
//! Faults and shapes are set through `/__sandbox/` control endpoints or the same methods on
//! [`Sandbox`] (tests):
//!
//! | endpoint | does |
//! | --- | --- |
//! | `GET /__sandbox/stats` | token fetches per app (corps as `corp:ID`), requests seen, tokens issued |
//! | `GET /__sandbox/requests` | the last API requests as received (token removed) |
//! | `POST /__sandbox/revoke` | invalidates every token issued so far |
//! | `POST /__sandbox/fail-token-fetches?n=N[&code=C&msg=M]` | the next N token fetches fail |
//! | `POST /__sandbox/delay?token_ms=T&token_answer_ms=L&api_ms=A` | delays token answers (before / after issuing) and API answers |
//! | `POST /__sandbox/quota?n=N` | daily token quota per app (0 = none; past it 49001); resets the count |
//! | `POST /__sandbox/reject-tokens?on=1` | every API call is answered as with a dead token until `on=0` |
//! | `POST /__sandbox/rate-limits?on=0` | turns the documented rate limits off (`on=1`: on again) |
//! | `POST /__sandbox/answers?encoding=E&content_type=T&chunked=1` | shapes API answers: `Content-Encoding` gzip, deflate or br (when the request accepts it), another `Content-Type` (empty: none), no `Content-Length`; no parameters: plain again |
//! | `POST /__sandbox/answer-next?n=N&code=C&msg=M` | the next N API calls with a valid token are answered `{"err_code":C,"err_msg":M}` |
//! | `POST /__sandbox/token-answer?expires_in=RAW` | token answers carry `expires_in` as the JSON text RAW (`absent`: none; empty: the lifetime) |
//! | `POST /__sandbox/temp-secrets/expire` | every `temp_corp_secret` is past its 24 hours |
//! | `POST /__sandbox/callbacks/send` | `{"url","key","corpid","body","test"}`: sends one signed callback as the platform does (up to three attempts one second apart); answers `{"attempts":[status, …]}` |
//!
//! An API call with `sandbox_echo=1` in its query answers with its own request body, streamed
//! as `application/octet-stream` (`sandbox_echo=json`: as `application/json`), to test large
//! bodies in both directions.

pub mod ca;
pub mod callbacks;
pub mod receiver;

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, ACCEPT_ENCODING, CONTENT_ENCODING, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use percent_encoding::percent_decode_str;
use ring::rand::SecureRandom;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::error::StartupError;
use crate::platform::{self, code, CORP_SECRETS_PATH, CORP_SERVICE_PREFIX, CORP_TOKEN_PATH};
use crate::BoxError;

/// Recorded API requests kept for inspection.
const RECORD_LIMIT: usize = 1000;
/// How long a `temp_corp_secret` can be exchanged (PLATFORM.md section 1: 24 hours).
const TEMP_SECRET_LIFETIME: Duration = Duration::from_secs(24 * 3600);

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

/// An app whose token request has another shape (`token_path` + `token_params` in the proxy):
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

/// An organisation-service corp the sandbox knows: its permanent `corp_secret` and the
/// 24-hour `temp_corp_secret` that is exchanged for it once.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxCorp {
    /// `corp_id`.
    pub corp_id: String,
    /// The permanent `corp_secret`.
    pub secret: String,
    /// The temporary secret exchanged at `/api/corp-service/v1/corp-secrets`.
    pub temp_secret: String,
}

impl SandboxCorp {
    /// The demo corp, `20002:demo-corp-secret:demo-temp-secret`.
    pub fn demo() -> Self {
        SandboxCorp {
            corp_id: "20002".into(),
            secret: "demo-corp-secret".into(),
            temp_secret: "demo-temp-secret".into(),
        }
    }

    /// The key its token fetches are counted under (beside the apps' `app_key`s).
    pub fn fetch_key(&self) -> String {
        format!("corp:{}", self.corp_id)
    }
}

impl FromStr for SandboxCorp {
    type Err = String;

    /// `CORP_ID:SECRET[:TEMP_SECRET]`; without a temporary secret it is `temp-CORP_ID`.
    fn from_str(s: &str) -> Result<Self, String> {
        let mut it = s.splitn(3, ':');
        match (it.next(), it.next(), it.next()) {
            (Some(c), Some(sec), temp) if !c.is_empty() && !sec.is_empty() => Ok(SandboxCorp {
                corp_id: c.into(),
                secret: sec.into(),
                temp_secret: temp
                    .filter(|t| !t.is_empty())
                    .map_or_else(|| format!("temp-{c}"), str::to_owned),
            }),
            _ => Err(format!("{s:?} is not CORP_ID:SECRET[:TEMP_SECRET]")),
        }
    }
}

/// How the sandbox shapes its API answers (to show the proxy the forms a platform answer can
/// take on the wire).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AnswerShape {
    /// `Content-Encoding` to apply (`gzip`, `deflate` or `br`) when the request's
    /// `Accept-Encoding` names it.
    pub encoding: Option<String>,
    /// `Content-Type` instead of `application/json` (empty: none at all).
    pub content_type: Option<String>,
    /// Sent without `Content-Length` (chunked on HTTP/1.1), in two pieces.
    pub chunked: bool,
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
    /// Known organisation-service corps.
    pub corps: Vec<SandboxCorp>,
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
    /// Successful fetches allowed per app (0 = unlimited) before `49001`.
    pub daily_quota: u32,
    /// Offer only HTTP/1.1 by ALPN (like an upstream without HTTP/2).
    pub h1_only: bool,
    /// Enforce the documented rate limits (49001 / 55001).
    pub rate_limits: bool,
    /// Answer HEAD with a body anyway, as a misbehaving server does (for tests of the
    /// proxy's side); off, HEAD answers carry none (RFC 9110 section 9.3.2).
    pub head_bodies: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            state_dir: None,
            apps: vec![SandboxApp::demo()],
            corps: vec![SandboxCorp::demo()],
            param_apps: Vec::new(),
            expires_in: Duration::from_secs(7200),
            reissue: Reissue::New,
            overlap: Duration::ZERO,
            token_path: platform::APP_TOKEN_PATH.into(),
            token_header: http::header::AUTHORIZATION,
            daily_quota: 0,
            h1_only: false,
            rate_limits: true,
            head_bodies: false,
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
    /// Rate limits on (starts as `SandboxOptions::rate_limits`).
    rate_limits: bool,
    /// Calls admitted per (app, documented API), in the API's window.
    windows: HashMap<(String, usize), VecDeque<Instant>>,
    /// Corps whose temporary secret was exchanged.
    exchanged: HashSet<String>,
    /// When the temporary secrets were handed out (the sandbox's start, or moved back).
    temp_issued_at: Option<Instant>,
    shape: AnswerShape,
    /// The next N API calls with a valid token answer this code and message instead.
    answer_next: (u32, i64, String),
    /// What token answers carry as `expires_in`, when not the configured lifetime.
    expires_in_field: ExpiresIn,
}

/// The `expires_in` member of the sandbox's token answers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum ExpiresIn {
    /// The configured lifetime, in seconds.
    #[default]
    Lifetime,
    /// This JSON text instead (e.g. `0`, `-5`, `9223372036854775807`, `"7200"`).
    Raw(String),
    /// No `expires_in` member at all.
    Absent,
}

#[derive(Debug)]
struct Shared {
    opts: SandboxOptions,
    /// The CA the sandbox's certificates come from (trusted when it sends callbacks).
    ca_pem: String,
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
        let opts_head_bodies = opts.head_bodies;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                quota: opts.daily_quota,
                rate_limits: opts.rate_limits,
                temp_issued_at: Some(Instant::now()),
                ..State::default()
            }),
            opts,
            ca_pem: ca.pem().to_owned(),
            connections: std::sync::atomic::AtomicU64::new(0),
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let svc_shared = shared.clone();
        let make = move |_peer: crate::server::Peer| {
            let shared = svc_shared.clone();
            shared
                .connections
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            hyper::service::service_fn(move |req| {
                let shared = shared.clone();
                async move { Ok::<_, Infallible>(handle(&shared, req).await) }
            })
        };
        let serving = crate::server::Serving {
            tls: Some(tls),
            head_bodies: opts_head_bodies,
            ..crate::server::Serving::plain(Duration::from_secs(1))
        };
        let task = tokio::spawn(crate::server::serve::<_, _, SandboxBody>(
            listener,
            make,
            async {
                let _ = stopped.await;
            },
            serving,
        ));
        Ok(Sandbox {
            addr,
            ca_pem: ca.pem().to_owned(),
            shared,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Sends one signed callback as the platform does (see [`callbacks::send`]); the status
    /// of each attempt. The sandbox's CA is trusted for an `https` URL.
    pub async fn send_callback(&self, cb: &callbacks::CallbackSend) -> Result<Vec<u16>, String> {
        callbacks::send(cb, Some(&self.shared.ca_pem)).await
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

    /// Token endpoint requests seen for corp `corp_id` (successful or not).
    pub fn corp_token_fetches(&self, corp_id: &str) -> u64 {
        self.token_fetches(&format!("corp:{corp_id}"))
    }

    /// Turns the documented rate limits on or off.
    pub fn set_rate_limits(&self, on: bool) {
        let mut st = self.shared.lock();
        st.rate_limits = on;
        st.windows.clear();
    }

    /// Shapes every API answer from now on.
    pub fn shape_answers(&self, shape: AnswerShape) {
        self.shared.lock().shape = shape;
    }

    /// Answers the next `n` API calls that carry a valid token with `code` and `msg` (the
    /// platform's error answers: rate limits, bad credentials, anything).
    pub fn answer_next(&self, n: u32, code: i64, msg: &str) {
        self.shared.lock().answer_next = (n, code, msg.to_owned());
    }

    /// What token answers carry as `expires_in` from now on.
    pub fn set_expires_in_field(&self, field: ExpiresIn) {
        self.shared.lock().expires_in_field = field;
    }

    /// Moves every `temp_corp_secret` past its 24 hours.
    pub fn expire_temp_secrets(&self) {
        self.shared.lock().temp_issued_at = None;
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

    /// While on, every API call is answered as with a dead token (49000; 40004 on
    /// organisation-service paths) whatever its token.
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

/// What the sandbox answers with: one chunk with its length, chunks without a declared
/// length, or the request's own body streamed back (echo).
#[derive(Debug)]
pub enum SandboxBody {
    /// One chunk (`Content-Length` set by hyper).
    Full(Option<Bytes>),
    /// Chunks sent without a declared length.
    Chunks(VecDeque<Bytes>),
    /// The request body, streamed back.
    Echo(Incoming),
}

impl http_body::Body for SandboxBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, BoxError>>> {
        use std::task::Poll;
        match self.get_mut() {
            SandboxBody::Full(chunk) => {
                Poll::Ready(chunk.take().map(|b| Ok(http_body::Frame::data(b))))
            }
            SandboxBody::Chunks(chunks) => {
                Poll::Ready(chunks.pop_front().map(|b| Ok(http_body::Frame::data(b))))
            }
            SandboxBody::Echo(body) => std::pin::Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            SandboxBody::Full(chunk) => chunk.is_none(),
            SandboxBody::Chunks(chunks) => chunks.is_empty(),
            SandboxBody::Echo(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            SandboxBody::Full(chunk) => {
                http_body::SizeHint::with_exact(chunk.as_ref().map_or(0, |b| b.len() as u64))
            }
            // Unknown on purpose: hyper then sends it chunked (HTTP/1.1) or unsized (h2).
            SandboxBody::Chunks(_) => http_body::SizeHint::new(),
            SandboxBody::Echo(body) => body.size_hint(),
        }
    }
}

type Answer = Response<SandboxBody>;

fn json_response(status: StatusCode, value: &serde_json::Value) -> Answer {
    json_bytes(status, value.to_string().into_bytes())
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Answer {
    let mut resp = Response::new(SandboxBody::Full(Some(Bytes::from(body))));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

fn platform_error(code: i64, msg: &str) -> Answer {
    json_bytes(StatusCode::OK, crate::wire::error_body(code, msg))
}

/// The query's pairs, decoded as the platform reads them.
fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    crate::wire::query_pairs(query.unwrap_or(""))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
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

pub use crate::wire::hex;

async fn handle(shared: &Shared, req: Request<Incoming>) -> Answer {
    let path = req.uri().path().to_owned();
    if path == "/__sandbox/callbacks/send" && req.method() == Method::POST {
        return send_callback(shared, req).await;
    }
    if let Some(control) = path.strip_prefix("/__sandbox/") {
        return control_endpoint(shared, req.method(), control, req.uri().query());
    }
    shared.lock().requests += 1;
    let opts = &shared.opts;
    if path == opts.token_path
        || path == CORP_TOKEN_PATH
        || opts.param_apps.iter().any(|a| a.token_path == path)
    {
        return token_endpoint(shared, &path, req.uri().query()).await;
    }
    if path == CORP_SECRETS_PATH {
        return exchange(shared, req.uri().query());
    }
    if path.starts_with("/api/") {
        return api(shared, req).await;
    }
    json_response(
        StatusCode::NOT_FOUND,
        &json!({"err_code": 404, "err_msg": "not found"}),
    )
}

/// `POST /__sandbox/callbacks/send`: `{"attempts":[status, …]}`.
async fn send_callback(shared: &Shared, req: Request<Incoming>) -> Answer {
    let bad = |msg: String| {
        json_response(
            StatusCode::BAD_REQUEST,
            &json!({"err_code": 400, "err_msg": msg}),
        )
    };
    let body = match http_body_util::Limited::new(req.into_body(), 1024 * 1024)
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => return bad(format!("body: {e}")),
    };
    let cb: callbacks::CallbackSend = match serde_json::from_slice(&body) {
        Ok(cb) => cb,
        Err(e) => return bad(format!("expected {{url, key, corpid, body, test}}: {e}")),
    };
    match callbacks::send(&cb, Some(&shared.ca_pem)).await {
        Ok(attempts) => json_response(StatusCode::OK, &json!({ "attempts": attempts })),
        Err(e) => bad(e),
    }
}

fn control_endpoint(shared: &Shared, method: &Method, what: &str, query: Option<&str>) -> Answer {
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
                .unwrap_or(code::SERVER_ERROR);
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
        (&Method::POST, "rate-limits") => {
            st.rate_limits = num("on").unwrap_or(1) != 0;
            st.windows.clear();
            json_response(StatusCode::OK, &json!({ "rate_limits": st.rate_limits }))
        }
        (&Method::POST, "answers") => {
            st.shape = AnswerShape {
                encoding: params.get("encoding").cloned(),
                content_type: params.get("content_type").cloned(),
                chunked: num("chunked").unwrap_or(0) != 0,
            };
            json_response(
                StatusCode::OK,
                &json!({"encoding": st.shape.encoding, "content_type": st.shape.content_type,
                        "chunked": st.shape.chunked}),
            )
        }
        (&Method::POST, "answer-next") => {
            st.answer_next = (
                num("n").unwrap_or(1) as u32,
                params
                    .get("code")
                    .and_then(|c| c.parse().ok())
                    .unwrap_or(code::SERVER_ERROR),
                params.get("msg").cloned().unwrap_or_else(|| "error".into()),
            );
            json_response(StatusCode::OK, &json!({ "answer_next": st.answer_next.0 }))
        }
        (&Method::POST, "token-answer") => {
            st.expires_in_field = match params.get("expires_in").map(String::as_str) {
                None | Some("") => ExpiresIn::Lifetime,
                Some("absent") => ExpiresIn::Absent,
                Some(raw) => ExpiresIn::Raw(raw.to_owned()),
            };
            json_response(
                StatusCode::OK,
                &json!({ "expires_in": format!("{:?}", st.expires_in_field) }),
            )
        }
        (&Method::POST, "temp-secrets/expire") => {
            st.temp_issued_at = None;
            json_response(StatusCode::OK, &json!({ "expired": true }))
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

/// Who a token request is for, once its credentials are checked.
enum Requester {
    /// Issue a token counted under this key (an `app_key`, `corp:ID` or a param app's name).
    Known(String),
    /// Refuse with this platform error.
    Refused(i64, &'static str),
}

/// Checks a token request's credentials against the known apps, corps and param apps.
fn requester(opts: &SandboxOptions, path: &str, params: &BTreeMap<String, String>) -> Requester {
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    if let Some(a) = opts
        .param_apps
        .iter()
        .find(|a| a.token_path == path && a.params == *params)
    {
        return Requester::Known(a.name.clone());
    }
    if path == CORP_TOKEN_PATH {
        return match opts.corps.iter().find(|c| c.corp_id == get("corp_id")) {
            Some(c) if c.secret == get("corp_secret") => Requester::Known(c.fetch_key()),
            Some(_) => {
                Requester::Refused(code::BAD_CREDENTIALS, "invalid authentication: corp_secret")
            }
            None => Requester::Refused(code::BAD_CREDENTIALS, "invalid authentication: corp_id"),
        };
    }
    if path != opts.token_path {
        return Requester::Refused(
            code::BAD_CREDENTIALS,
            "invalid authentication for this token endpoint",
        );
    }
    match opts.apps.iter().find(|a| a.app_key == get("app_key")) {
        None => Requester::Refused(code::BAD_CREDENTIALS, "invalid authentication: app_key"),
        Some(a) if a.corp_id != get("corp_id") => {
            Requester::Refused(code::BAD_CREDENTIALS, "invalid authentication: corp_id")
        }
        Some(a) if a.secret != get("corp_secret") => {
            Requester::Refused(code::BAD_CREDENTIALS, "invalid authentication: corp_secret")
        }
        Some(a) => Requester::Known(a.app_key.clone()),
    }
}

async fn token_endpoint(shared: &Shared, path: &str, query: Option<&str>) -> Answer {
    let params: BTreeMap<String, String> = query_pairs(query).into_iter().collect();
    let who = requester(&shared.opts, path, &params);
    // Fetches are counted under the key the request names, known or not.
    let counted = match &who {
        Requester::Known(k) => k.clone(),
        Requester::Refused(..) if path == CORP_TOKEN_PATH => {
            format!("corp:{}", params.get("corp_id").map_or("", String::as_str))
        }
        Requester::Refused(..) => params.get("app_key").cloned().unwrap_or_default(),
    };
    let delay = {
        let mut st = shared.lock();
        *st.fetches.entry(counted).or_default() += 1;
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
    let answer = issue(shared, path, who);
    // A delay after issuing: the token exists (and superseded ones are invalid) before the
    // fetcher learns it, as on a platform that is slow to answer.
    let late = shared.lock().token_answer_delay;
    if !late.is_zero() {
        tokio::time::sleep(late).await;
    }
    answer
}

fn issue(shared: &Shared, path: &str, who: Requester) -> Answer {
    let opts = &shared.opts;
    let mut st = shared.lock();
    if st.fail_next > 0 {
        st.fail_next -= 1;
        let (code, msg) = (st.fail_code, st.fail_msg.clone());
        return platform_error(code, &msg);
    }
    let owner = match who {
        Requester::Known(k) => k,
        Requester::Refused(code, msg) => return platform_error(code, msg),
    };
    let issued = st.issued.get(&owner).copied().unwrap_or(0);
    if st.quota > 0 && issued >= st.quota {
        return platform_error(
            platform::rate_limited_code(path),
            "rate limit exceeded: daily token quota reached",
        );
    }
    *st.issued.entry(owner.clone()).or_default() += 1;
    let now = Instant::now();
    if opts.reissue == Reissue::Same {
        if let Some(tok) = st.current.get(&owner).cloned() {
            if let Some(t) = st.tokens.get(&tok) {
                if t.expires_at > now && t.invalid_from.is_none() {
                    let left = t.expires_at.duration_since(now).as_secs();
                    return token_answer(&tok, left, &st.expires_in_field);
                }
            }
        }
    }
    // Superseded tokens stay valid for the overlap (0 = invalid at once).
    if let Some(prev) = st.current.get(&owner).cloned() {
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
            app_key: owner.clone(),
            expires_at: now + opts.expires_in,
            invalid_from: None,
        },
    );
    st.current.insert(owner, token.clone());
    token_answer(&token, opts.expires_in.as_secs(), &st.expires_in_field)
}

fn token_answer(token: &str, expires_in: u64, field: &ExpiresIn) -> Answer {
    // The platform's own spelling of success on this endpoint.
    const MSG: &str = "Susccess";
    match field {
        ExpiresIn::Lifetime => json_bytes(
            StatusCode::OK,
            crate::wire::token_answer(MSG, token, expires_in),
        ),
        ExpiresIn::Absent => json_response(
            StatusCode::OK,
            &json!({"err_code": 0, "err_msg": MSG, "access_token": token}),
        ),
        ExpiresIn::Raw(raw) => {
            // Written into the text as given, so values no JSON library would produce (or
            // round-trip) reach the proxy as a platform could send them.
            let text = json!({"err_code": 0, "err_msg": MSG, "access_token": token}).to_string();
            let body = format!("{},\"expires_in\":{raw}}}", &text[..text.len() - 1]);
            json_bytes(StatusCode::OK, body.into_bytes())
        }
    }
}

/// `GET /api/corp-service/v1/corp-secrets`: the one-time exchange of a corp's temporary
/// secret for its permanent one.
fn exchange(shared: &Shared, query: Option<&str>) -> Answer {
    let params: BTreeMap<String, String> = query_pairs(query).into_iter().collect();
    let get = |k: &str| params.get(k).map(String::as_str).unwrap_or("");
    let mut st = shared.lock();
    if st.token_requests.len() == RECORD_LIMIT {
        st.token_requests.pop_front();
    }
    st.token_requests
        .push_back((CORP_SECRETS_PATH.to_owned(), params.clone()));
    let Some(corp) = shared
        .opts
        .corps
        .iter()
        .find(|c| c.corp_id == get("corp_id"))
    else {
        return platform_error(code::BAD_CREDENTIALS, "invalid authentication: corp_id");
    };
    if get("corp_authorization").is_empty() {
        return platform_error(
            code::INVALID_REQUEST,
            "invalid request: corp_authorization is required",
        );
    }
    if corp.temp_secret != get("temp_corp_secret") {
        return platform_error(
            code::BAD_CREDENTIALS,
            "invalid authentication: temp_corp_secret",
        );
    }
    if st.exchanged.contains(&corp.corp_id) {
        return platform_error(
            code::PERMANENT_CODE_EXISTS,
            "the permanent code already exists",
        );
    }
    if st
        .temp_issued_at
        .is_none_or(|at| at.elapsed() >= TEMP_SECRET_LIFETIME)
    {
        return platform_error(
            code::TEMP_SECRET_EXPIRED,
            "the pre-authorization code has expired",
        );
    }
    st.exchanged.insert(corp.corp_id.clone());
    json_response(
        StatusCode::OK,
        &json!({"err_code": 0, "err_msg": "success", "corp_id": corp.corp_id, "corp_secret": corp.secret}),
    )
}

/// The answer for a dead token on `path`: 49000 for self-built apps' APIs, 40004 (40005 when
/// expired) on organisation-service APIs.
fn dead_token(path: &str, expired: bool) -> serde_json::Value {
    if path.starts_with(CORP_SERVICE_PREFIX) {
        if expired {
            json!({"err_code": code::CORP_TOKEN_EXPIRED, "err_msg": "access_token expired"})
        } else {
            json!({"err_code": code::CORP_TOKEN_INVALID, "err_msg": "invalid access_token"})
        }
    } else {
        json!({"err_code": code::TOKEN_REJECTED, "err_msg": "access_token is invalid or expired"})
    }
}

/// Takes a slot in the documented window of (`owner`, `api`), or says it is full.
fn admit(st: &mut State, owner: &str, api: usize, rate: platform::Rate, now: Instant) -> bool {
    let window = st.windows.entry((owner.to_owned(), api)).or_default();
    while window
        .front()
        .is_some_and(|&t| now.saturating_duration_since(t) >= rate.per)
    {
        window.pop_front();
    }
    if window.len() >= rate.n as usize {
        return false;
    }
    window.push_back(now);
    true
}

async fn api(shared: &Shared, req: Request<Incoming>) -> Answer {
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
    let mut echo = None;
    for p in pairs {
        match p.split_once('=') {
            Some(("access_token", v)) => {
                if token.is_none() {
                    token = Some(percent_decode_str(v).decode_utf8_lossy().into_owned());
                }
            }
            _ => {
                match p {
                    "sandbox_echo=1" => echo = Some("application/octet-stream"),
                    "sandbox_echo=json" => echo = Some("application/json"),
                    _ => {}
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
    let path = parts.uri.path();
    let documented = platform::api_index(parts.method.as_str(), path);
    let now = Instant::now();
    let (status, token_app, delay, limited, injected, shape) = {
        let mut st = shared.lock();
        let issued = token.as_deref().and_then(|t| st.tokens.get(t));
        let status = match (&token, issued) {
            (None, _) => "missing",
            (Some(_), None) => "unknown",
            (_, Some(t)) if t.invalid_from.is_some_and(|at| at <= now) => "unknown",
            (_, Some(t)) if t.expires_at <= now => "expired",
            _ => "valid",
        };
        // A token is good for its own family of APIs only: a self-built app's on the apps'
        // paths, a corp's on the organisation service's (a corp-service app configured as a
        // self-built one shows at once).
        let wrong_family = issued.is_some_and(|t| {
            t.app_key.starts_with("corp:") != path.starts_with(CORP_SERVICE_PREFIX)
        });
        let status = if (st.reject_all || wrong_family) && status == "valid" {
            "unknown"
        } else {
            status
        };
        let owner = issued.map(|t| t.app_key.clone());
        let limited = match (status, &owner, documented) {
            ("valid", Some(owner), Some(i)) if st.rate_limits => platform::APIS[i]
                .rate
                .is_some_and(|rate| !admit(&mut st, owner, i, rate, now)),
            _ => false,
        };
        let injected = (status == "valid" && !limited && st.answer_next.0 > 0).then(|| {
            st.answer_next.0 -= 1;
            (st.answer_next.1, st.answer_next.2.clone())
        });
        (
            status,
            owner,
            st.api_delay,
            limited,
            injected,
            st.shape.clone(),
        )
    };
    if !delay.is_zero() {
        tokio::time::sleep(delay).await;
    }
    let mut recorded = Recorded {
        method: parts.method.clone(),
        path: path.to_owned(),
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
    if let Some(content_type) = echo.filter(|_| status == "valid" && !limited && injected.is_none())
    {
        record(shared, recorded);
        let mut resp = Response::new(SandboxBody::Echo(body));
        resp.headers_mut()
            .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
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
            Err(_) => return platform_error(code::INVALID_REQUEST, "request body broken off"),
        }
    }
    recorded.body_len = len;
    recorded.body_sha256 = hex(ctx.finish().as_ref());
    let answer = match status {
        "valid" if injected.is_some() => {
            let (code, msg) = injected.unwrap_or_default();
            json!({"err_code": code, "err_msg": msg})
        }
        "valid" if limited => json!({
            "err_code": platform::rate_limited_code(path),
            "err_msg": "rate limit exceeded",
        }),
        "valid" => json!({
            "err_code": 0,
            "err_msg": "success",
            "data": {
                "method": recorded.method.as_str(),
                "path": recorded.path,
                "query": recorded.query,
                "body_len": recorded.body_len,
                "body_sha256": recorded.body_sha256,
                "api": documented.map(|i| platform::APIS[i].name),
            }
        }),
        "expired" => dead_token(path, true),
        _ => dead_token(path, false),
    };
    let accepts = parts.headers.get(ACCEPT_ENCODING).cloned();
    record(shared, recorded);
    shaped(
        json_response(StatusCode::OK, &answer),
        &shape,
        accepts.as_ref(),
    )
}

/// Applies `shape` to a JSON answer: another type, a content coding the request accepts,
/// no declared length.
fn shaped(resp: Answer, shape: &AnswerShape, accepts: Option<&HeaderValue>) -> Answer {
    if *shape == AnswerShape::default() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let SandboxBody::Full(Some(mut bytes)) = body else {
        return Response::from_parts(parts, body);
    };
    match shape.content_type.as_deref() {
        None => {}
        // Empty: no Content-Type at all.
        Some("") => {
            parts.headers.remove(CONTENT_TYPE);
        }
        Some(ct) => {
            if let Ok(ct) = HeaderValue::from_str(ct) {
                parts.headers.insert(CONTENT_TYPE, ct);
            }
        }
    }
    let accepted = |coding: &str| {
        accepts
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|c| c.trim().starts_with(coding)))
    };
    if let Some(coding) = shape.encoding.as_deref().filter(|c| accepted(c)) {
        if let Some(encoded) = encode(coding, &bytes) {
            bytes = Bytes::from(encoded);
            if let Ok(v) = HeaderValue::from_str(coding) {
                parts.headers.insert(CONTENT_ENCODING, v);
            }
        }
    }
    let body = if shape.chunked {
        let mid = bytes.len() / 2;
        SandboxBody::Chunks(VecDeque::from([bytes.slice(..mid), bytes.slice(mid..)]))
    } else {
        SandboxBody::Full(Some(bytes))
    };
    Response::from_parts(parts, body)
}

/// `bytes` compressed with `coding` (`gzip`, `deflate` as zlib per RFC 9110 section 8.4.1.2,
/// or `br`); `None` for another coding.
fn encode(coding: &str, bytes: &[u8]) -> Option<Vec<u8>> {
    use std::io::Write as _;
    match coding {
        "gzip" => {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(bytes).ok()?;
            e.finish().ok()
        }
        "deflate" => {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
            e.write_all(bytes).ok()?;
            e.finish().ok()
        }
        "br" => {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                e.write_all(bytes).ok()?;
            }
            Some(out)
        }
        _ => None,
    }
}

fn record(shared: &Shared, r: Recorded) {
    let mut st = shared.lock();
    if st.recorded.len() == RECORD_LIMIT {
        st.recorded.pop_front();
    }
    st.recorded.push_back(r);
}
