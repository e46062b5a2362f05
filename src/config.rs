//! `proxy.toml`: the validated configuration, where its secrets come from, and `check`'s
//! rendering of it.
//!
//! Two layers: [`file`] reads the text into serde structs that hold each default once and
//! collect every unknown key and wrong type with its key path; [`validate`] turns those into
//! the types below in one pass that gathers every problem as `file: key: what is wrong`
//! (SPEC section 3). Secrets are read through a [`SecretReader`], which tests replace. `check`
//! prints the effective configuration by serialising a [`Config`]; a [`Secret`] serialises
//! as `***`.

mod file;
mod validate;

use std::fmt::{self, Display};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use ipnet::IpNet;
use serde::ser::{SerializeMap, Serializer};
use serde::Serialize;

use crate::platform::{self, AppKind};
use crate::secret::Secret;

/// The platform's production endpoint.
pub const DEFAULT_UPSTREAM: &str = "https://service.cheng-xun.cn";
/// The documented token endpoint of self-built apps (`[token] path` by default).
pub const DEFAULT_TOKEN_PATH: &str = platform::APP_TOKEN_PATH;

/// A validated configuration.
#[derive(Debug, Clone, Serialize)]
pub struct Config {
    /// Where it was read from (for messages).
    #[serde(skip)]
    pub source: String,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[admin]`; `None` disables the admin listener.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminConfig>,
    /// `[upstream]`.
    pub upstream: UpstreamConfig,
    /// `[token]`.
    pub token: TokenConfig,
    /// `[[app]]`, in file order.
    #[serde(rename = "app")]
    pub apps: Vec<AppConfig>,
    /// `[[client]]`, in file order.
    #[serde(rename = "client", skip_serializing_if = "Vec::is_empty")]
    pub clients: Vec<ClientConfig>,
    /// `[callbacks]`; `None` disables the callback relay.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub callbacks: Option<CallbacksConfig>,
    /// `[[callback]]`, in file order (none without `[callbacks]`).
    #[serde(rename = "callback", skip_serializing_if = "Vec::is_empty")]
    pub routes: Vec<CallbackRoute>,
    /// `[limits]`.
    pub limits: LimitsConfig,
}

/// `[limits]`: the platform's documented call rates, kept per app (SPEC section 4.9).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitsConfig {
    /// Whether calls are held to the rules at all.
    pub enabled: bool,
    /// How long a call may wait for a free slot before it gets 429.
    #[serde(rename = "max_wait_ms", serialize_with = "millis")]
    pub max_wait: Duration,
    /// How much longer than its rule's period a counted call holds its place: the
    /// platform counts calls as they arrive (PLATFORM.md section 3 does not say how), and a
    /// call admitted while a connection was being opened may arrive after one admitted
    /// later. 0 counts exactly the period.
    #[serde(rename = "margin_ms", serialize_with = "millis")]
    pub margin: Duration,
    /// `[[limits.rule]]`: rules added to the built-in table, or replacing the built-in rule
    /// with the same method and path pattern.
    #[serde(rename = "rule", skip_serializing_if = "Vec::is_empty")]
    pub rules: Vec<LimitRule>,
}

/// One call-rate rule: at most `rate.n` calls of `method` to paths matching `path` in any
/// window of `rate.per`, per app.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LimitRule {
    /// HTTP method (upper case).
    pub method: String,
    /// Path pattern as forwarded; a `{x}` segment matches any one segment.
    pub path: String,
    /// The rate.
    #[serde(serialize_with = "rate_text")]
    pub rate: platform::Rate,
}

impl LimitRule {
    /// `N/s`, `N/min`, `N/h` or `N/d` as a rate; `None` if it is not one.
    pub fn parse_rate(text: &str) -> Option<platform::Rate> {
        let (n, unit) = text.trim().split_once('/')?;
        let per = match unit.trim() {
            "s" => 1,
            "min" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return None,
        };
        let n = n.trim().parse::<u32>().ok().filter(|n| *n > 0)?;
        Some(platform::Rate {
            n,
            per: Duration::from_secs(per),
        })
    }
}

fn rate_text<S: Serializer>(r: &platform::Rate, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(r)
}

/// `[server]`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerConfig {
    /// Where legacy apps connect.
    pub listen: SocketAddr,
    /// Inbound TLS, when both files are given.
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Client networks; anyone else gets 403.
    pub allow: Vec<IpNet>,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// How long in-flight requests may run on after SIGTERM.
    #[serde(rename = "shutdown_grace_s", serialize_with = "secs")]
    pub shutdown_grace: Duration,
    /// Requests in flight at once; more get 503 `overloaded`.
    pub max_concurrent_requests: usize,
    /// Threads serving the proxy port, each with its own runtime and listener: 0 = one per
    /// core (see [`ServerConfig::worker_threads`]); 1 by default.
    pub workers: usize,
}

impl ServerConfig {
    /// How many threads serve the proxy port: `workers`, or with 0 one per core the process
    /// may run on (1 when that cannot be read).
    pub fn worker_threads(&self) -> usize {
        match self.workers {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            n => n,
        }
    }
}

impl Config {
    /// About how many file descriptors serving this config takes before its first client:
    /// per worker a listening socket and its runtime's epoll and wake-up descriptors, the
    /// upstream pool's ceiling (`upstream.max_connections`, shared by the workers), and 256
    /// for the admin and callback ports, Redis, the queue, the log and the first clients.
    pub fn open_files_needed(&self) -> u64 {
        let workers = self.server.worker_threads() as u64;
        workers
            .saturating_mul(3)
            .saturating_add(self.upstream.max_connections as u64)
            .saturating_add(256)
    }
}

/// Inbound TLS material.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    #[serde(rename = "tls_cert")]
    pub cert: PathBuf,
    /// Private key (PEM).
    #[serde(rename = "tls_key")]
    pub key: PathBuf,
    /// CA whose certificates clients must present (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_ca: Option<PathBuf>,
}

/// `[admin]`.
#[derive(Debug, Clone, Serialize)]
pub struct AdminConfig {
    /// Where the admin endpoints listen.
    pub listen: SocketAddr,
    /// Who may use them (SPEC section 3): loopback unless the file says otherwise,
    /// independent of `server.allow` (a remote Prometheus need not be allowed to proxy).
    pub allow: Vec<IpNet>,
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpstreamConfig {
    /// The URL as written.
    pub url: String,
    /// Always `https`.
    #[serde(skip)]
    pub scheme: Scheme,
    /// Host and port of the platform.
    #[serde(skip)]
    pub authority: Authority,
    /// Path prefix of the upstream URL without a trailing slash (usually empty).
    #[serde(skip)]
    pub base_path: String,
    /// Extra trusted root, added to the system's.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
    /// The HTTP CONNECT proxy the platform is reached through, if any.
    #[serde(serialize_with = "egress", skip_serializing_if = "Option::is_none")]
    pub proxy: Option<EgressProxy>,
    /// How `proxy` was chosen, for `check` (`upstream.proxy`, the environment variable that
    /// named it, or why the connection goes direct).
    #[serde(skip)]
    pub proxy_source: String,
    /// TCP connect timeout (to the proxy, when there is one; the tunnel's setup counts too).
    #[serde(rename = "connect_timeout_ms", serialize_with = "millis")]
    pub connect_timeout: Duration,
    /// Whole upstream exchange.
    #[serde(rename = "timeout_ms", serialize_with = "millis")]
    pub timeout: Duration,
    /// Upstream exchanges in flight at once (on HTTP/1.1, connections); more wait their turn.
    pub max_connections: usize,
}

/// An HTTP CONNECT proxy on the way to the platform (SPEC section 3 `upstream.proxy`): TLS
/// to the platform runs inside the tunnel, so the proxy sees only the platform's host and
/// port.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressProxy {
    /// The proxy's host and port (a missing port is 1080, as curl takes it).
    pub authority: Authority,
    /// The user of the URL's userinfo as written (percent-encoded), shown by `check`.
    pub user: Option<String>,
    /// Whether the userinfo has a password (shown as `***`).
    pub password: bool,
    /// `Proxy-Authorization` (Basic, RFC 9110 section 11.7.1 and RFC 7617) from the URL's
    /// userinfo: a secret, marked sensitive.
    pub authorization: Option<http::HeaderValue>,
}

impl Display for EgressProxy {
    /// `http://[user:***@]host:port`: the password never shows.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.user {
            Some(user) if self.password => write!(f, "http://{user}:***@{}", self.authority),
            Some(user) => write!(f, "http://{user}@{}", self.authority),
            None => write!(f, "http://{}", self.authority),
        }
    }
}

/// How the token travels on forwarded calls (`inject`, with `param` or `header` and
/// `header_format`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inject {
    /// As a query parameter.
    Query {
        /// Parameter name, `access_token` by default.
        param: String,
    },
    /// As a header.
    Header {
        /// Header name.
        name: HeaderName,
        /// Text before `{token}` in `header_format`.
        prefix: String,
        /// Text after `{token}`.
        suffix: String,
    },
}

impl Serialize for Inject {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut m = s.serialize_map(None)?;
        match self {
            Inject::Query { param } => {
                m.serialize_entry("inject", "query")?;
                m.serialize_entry("param", param)?;
            }
            Inject::Header {
                name,
                prefix,
                suffix,
            } => {
                m.serialize_entry("inject", "header")?;
                m.serialize_entry("header", name.as_str())?;
                m.serialize_entry("header_format", &format!("{prefix}{{token}}{suffix}"))?;
            }
        }
        m.end()
    }
}

/// `[token]`.
#[derive(Debug, Clone, Serialize)]
pub struct TokenConfig {
    /// Token endpoint path.
    pub path: String,
    /// Refresh this long before expiry.
    #[serde(rename = "refresh_ahead_s", serialize_with = "secs")]
    pub refresh_ahead: Duration,
    /// How the token is injected.
    #[serde(flatten)]
    pub inject: Inject,
    /// `err_code`s meaning "token rejected" for every app, when set; else each app's kind
    /// decides (see [`AppConfig::invalid_codes`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub invalid_codes: Option<Vec<i64>>,
    /// Fetch cap per app in any 60 s window.
    pub max_fetches_per_minute: u32,
    /// Shared store, for scale-out.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<StoreConfig>,
}

/// `[token.store]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StoreConfig {
    /// Redis URL (may carry a password, so kept secret).
    pub redis_url: Secret,
    /// Fetch lease lifetime; default 2 × `upstream.timeout_ms` + 5 s, longer than any fetch.
    #[serde(
        rename = "lease_ms",
        skip_serializing_if = "Option::is_none",
        serialize_with = "opt_millis"
    )]
    pub lease: Option<Duration>,
}

/// A query parameter value of a token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamValue {
    /// Sent as written.
    Plain(String),
    /// Read from an environment variable, a file or the config file; printed as `***`.
    Secret(Secret, SecretSource),
}

impl ParamValue {
    /// The value to send.
    pub fn expose(&self) -> &str {
        match self {
            ParamValue::Plain(s) => s,
            ParamValue::Secret(s, _) => s.expose(),
        }
    }
}

/// Where a secret came from (for `check`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretSource {
    /// An environment variable.
    Env(String),
    /// A file.
    File(PathBuf),
    /// Written in the config file.
    Inline,
}

impl Display for SecretSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretSource::Env(name) => write!(f, "env {name}"),
            SecretSource::File(path) => write!(f, "file {}", path.display()),
            SecretSource::Inline => f.write_str("inline"),
        }
    }
}

/// Reads the secrets a config file names: the process's environment and files, or in tests
/// whatever they put in its place.
pub trait SecretReader {
    /// The environment variable `name`, if set.
    fn var(&self, name: &str) -> Option<String>;
    /// The contents of the file at `path`.
    fn read(&self, path: &Path) -> std::io::Result<String>;
}

/// The process's environment and file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct System;

impl SecretReader for System {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read(&self, path: &Path) -> std::io::Result<String> {
        std::fs::read_to_string(path)
    }
}

/// The form of an app's token request (it decides its [`AppConfig::fingerprint`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// The documented `app_key` / `corp_id` / `corp_secret` query of a self-built app.
    Standard,
    /// An organisation-service app: `corp_id`, the permanent `corp_secret` and, when set,
    /// `corp_authorization`.
    Corp,
    /// `[app.token_params]`: these parameters instead, in key order.
    Params,
}

/// What an app's token request sends: query parameters in order, some of them secret.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Credentials {
    /// Which form they take.
    pub shape: Shape,
    /// Name and value of each query parameter, in the order sent.
    pub params: Vec<(String, ParamValue)>,
}

impl Serialize for Credentials {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Params<'a>(&'a [(String, ParamValue)]);
        impl Serialize for Params<'_> {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_map(self.0.iter().map(|(k, v)| (k, v.masked())))
            }
        }
        match self.shape {
            Shape::Params => {
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("token_params", &Params(&self.params))?;
                m.end()
            }
            Shape::Standard | Shape::Corp => Params(&self.params).serialize(s),
        }
    }
}

impl ParamValue {
    /// The value as `check` shows it: secrets as `***`.
    fn masked(&self) -> &str {
        match self {
            ParamValue::Plain(s) => s,
            ParamValue::Secret(..) => "***",
        }
    }
}

impl Credentials {
    /// Every secret value in these credentials.
    pub fn secrets(&self) -> Vec<&Secret> {
        self.secret_params().into_iter().map(|(_, s)| s).collect()
    }

    /// The token request's parameters that name the app (nothing secret), in order: what a
    /// legacy token request must carry for the proxy to answer it.
    pub fn naming<'a>(&'a self) -> Vec<(&'a str, &'a str)> {
        let plain = |(k, v): &'a (String, ParamValue)| match v {
            ParamValue::Plain(v) => Some((k.as_str(), v.as_str())),
            ParamValue::Secret(..) => None,
        };
        self.params.iter().filter_map(plain).collect()
    }

    /// The token request's secret parameters, by name.
    pub fn secret_params<'a>(&'a self) -> Vec<(&'a str, &'a Secret)> {
        let secret = |(k, v): &'a (String, ParamValue)| match v {
            ParamValue::Secret(s, _) => Some((k.as_str(), s)),
            ParamValue::Plain(_) => None,
        };
        self.params.iter().filter_map(secret).collect()
    }

    /// The token request's query parameters, in order.
    pub fn query_pairs(&self) -> Vec<(&str, &str)> {
        self.params
            .iter()
            .map(|(k, v)| (k.as_str(), v.expose()))
            .collect()
    }
}

/// `[[app]]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AppConfig {
    /// Unique name, used by `X-CX-App`, logs and metrics.
    pub name: String,
    /// Path prefix selecting this app; `None` = only by `X-CX-App`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefix: Option<String>,
    /// Which token flow the app uses (`kind`).
    #[serde(serialize_with = "kind")]
    pub kind: AppKind,
    /// Token endpoint path for this app.
    pub token_path: String,
    /// `err_code`s meaning "token rejected" for this app: its own `invalid_codes`, else
    /// `[token] invalid_codes`, else its kind's documented codes (49000 for apps; 40004 and
    /// 40005 for corp-service apps; PLATFORM.md section 2).
    pub invalid_codes: Vec<i64>,
    /// What the token request sends.
    #[serde(flatten)]
    pub credentials: Credentials,
}

impl AppConfig {
    /// What identifies this app's token at the platform: a hash (16 hex digits) of its token
    /// path and its non-secret credentials, never of a secret. Instances sharing a token store
    /// share the token of apps with one fingerprint; a reload keeps the token, fetch gate and
    /// fetch-cap window of an app whose name and fingerprint are unchanged
    /// ([`AppConfig::same_app`]).
    pub fn fingerprint(&self) -> String {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(self.token_path.as_bytes());
        let tag = match self.credentials.shape {
            Shape::Standard => Some("std"),
            Shape::Corp => Some("corp"),
            Shape::Params => None,
        };
        if let Some(tag) = tag {
            for part in
                std::iter::once(tag).chain(self.credentials.naming().into_iter().map(|p| p.1))
            {
                ctx.update(b"\0");
                ctx.update(part.as_bytes());
            }
        } else {
            for (k, v) in &self.credentials.params {
                ctx.update(b"\0");
                ctx.update(k.as_bytes());
                ctx.update(b"=");
                // A secret parameter counts by name only.
                if let ParamValue::Plain(v) = v {
                    ctx.update(v.as_bytes());
                }
            }
        }
        crate::wire::hex(&ctx.finish().as_ref()[..8])
    }

    /// Whether `other` is this app as far as its token goes: the one rule of what survives a
    /// reload. Its prefix, grants or `invalid_codes` may change; a rotated secret asks the
    /// platform for nothing new either (force a refresh for that).
    pub fn same_app(&self, other: &AppConfig) -> bool {
        self.name == other.name && self.fingerprint() == other.fingerprint()
    }
}

/// `[[client]]`.
#[derive(Debug, Clone, Serialize)]
pub struct ClientConfig {
    /// Name, shown in the access log.
    pub name: String,
    /// Networks identifying the client.
    pub networks: Vec<IpNet>,
    /// Certificate DNS names identifying the client.
    pub cert_names: Vec<String>,
    /// Apps it may use.
    pub apps: Vec<String>,
    /// Path prefixes it may use; `None` = all.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub paths: Option<Vec<String>>,
}

/// `[callbacks]`: where the platform's callbacks arrive and where they are kept until
/// delivered (SPEC sections 3 and 8).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallbacksConfig {
    /// Where the platform's callbacks arrive.
    pub listen: SocketAddr,
    /// HTTPS, when both files are given (the platform requires a valid certificate).
    #[serde(flatten, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsFiles>,
    /// Sender networks; anyone else gets 403.
    pub allow: Vec<IpNet>,
    /// The durable queue: an SQLite database file.
    pub queue: PathBuf,
    /// A callback whose `timestamp` is further than this from now is refused; nonces are
    /// remembered this long.
    #[serde(rename = "max_skew_s", serialize_with = "secs")]
    pub max_skew: Duration,
    /// Largest callback body accepted, in bytes.
    pub max_body_bytes: u64,
    /// A receiver that has not answered by then failed this delivery attempt.
    #[serde(rename = "deliver_timeout_ms", serialize_with = "millis")]
    pub deliver_timeout: Duration,
    /// How long after its arrival an event is retried before it is dead-lettered.
    #[serde(rename = "retry_for_s", serialize_with = "secs")]
    pub retry_for: Duration,
}

/// `[[callback]]`: one route of the relay, from the URL registered on the platform to an
/// internal receiver.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CallbackRoute {
    /// Unique name (admin views, metrics, logs).
    pub name: String,
    /// The path of the URL registered on the platform.
    pub path: String,
    /// The `[[app]]` whose corp sends these callbacks.
    pub app: String,
    /// That app's `corp_id`: a callback's `corpid` must equal it.
    #[serde(skip)]
    pub corp_id: String,
    /// The Key set beside the URL on the platform, which signs the callbacks.
    #[serde(serialize_with = "masked")]
    pub key: ParamValue,
    /// The internal receiver (`http` or `https` URL without a query).
    pub deliver_to: String,
    /// Extra trusted root for an `https` receiver.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ca_file: Option<PathBuf>,
}

/// A successfully loaded configuration and the warnings worth showing.
#[derive(Debug)]
pub struct Loaded {
    /// The configuration.
    pub config: Config,
    /// `file: key: warning` lines.
    pub warnings: Vec<String>,
}

/// A refused configuration: every problem found, each as `file: key: what is wrong`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The problems.
    pub problems: Vec<String>,
}

impl Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.problems.join("\n"))
    }
}

impl std::error::Error for ConfigError {}

impl Config {
    /// Reads and validates a config file; relative paths in it resolve against its folder.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let (text, name) = read_file(path)?;
        Self::from_toml(&text, &name, path.parent())
    }

    /// Reads only the `[upstream]` table of a config file (`cx-proxy corp-secret`, which runs
    /// before the corp's `[[app]]` can read the secret it is about to write).
    pub fn load_upstream(path: &Path) -> Result<UpstreamConfig, ConfigError> {
        let (text, name) = read_file(path)?;
        validate::upstream_only(&text, &name, path.parent())
    }

    /// Validates TOML text; `name` prefixes messages, relative paths resolve against `dir`.
    pub fn from_toml(text: &str, name: &str, dir: Option<&Path>) -> Result<Loaded, ConfigError> {
        Self::from_toml_with(text, name, dir, &System)
    }

    /// [`Config::from_toml`] with the secrets read through `secrets`.
    pub fn from_toml_with(
        text: &str,
        name: &str,
        dir: Option<&Path>,
        secrets: &dyn SecretReader,
    ) -> Result<Loaded, ConfigError> {
        validate::config(text, name, dir, secrets)
    }

    /// The effective configuration as TOML, secrets shown as `***` and where each came from
    /// as a comment (for `check`).
    pub fn render(&self) -> String {
        // Comments are escaped: a file name with a line break must not add TOML lines.
        let line = |text: String| format!("# {}\n", text.escape_debug());
        let mut out = line(format!("effective configuration of {}", self.source));
        for (i, app) in self.apps.iter().enumerate() {
            for (k, v) in &app.credentials.params {
                if let ParamValue::Secret(_, source) = v {
                    out.push_str(&line(format!("app[{i}].{k}: {source}")));
                }
            }
        }
        for (i, route) in self.routes.iter().enumerate() {
            if let ParamValue::Secret(_, source) = &route.key {
                out.push_str(&line(format!("callback[{i}].key: {source}")));
            }
        }
        out.push_str(&line(format!(
            "upstream.proxy: {}",
            self.upstream.proxy_source
        )));
        match toml::to_string(self) {
            Ok(text) => out.push_str(&text),
            Err(e) => out.push_str(&format!("# cannot be shown as TOML: {e}\n")),
        }
        out.push_str(&self.limits_table());
        out
    }

    /// The call limits in force, as comments: the documented table (PLATFORM.md section 3)
    /// with the file's rules added or in place of built-in ones (SPEC section 4.9).
    fn limits_table(&self) -> String {
        let l = &self.limits;
        if !l.enabled {
            return "\n# call limits: off (limits.enabled = false)\n".into();
        }
        let mut out = String::from(
            "\n# call limits in force, per app (PLATFORM.md section 3 and [[limits.rule]]):\n",
        );
        let file = |method: &str, path: &str| {
            l.rules
                .iter()
                .find(|r| r.method == method && platform::same_pattern(&r.path, path))
        };
        for api in platform::APIS {
            let Some(rate) = api.rate else { continue };
            let line = match file(api.method, api.path) {
                Some(r) => format!(
                    "{} {} {} (file; built in: {rate})",
                    api.method, api.path, r.rate
                ),
                None => format!("{} {} {rate} (built in)", api.method, api.path),
            };
            out.push_str(&format!("#   {}\n", line.escape_debug()));
        }
        for r in &l.rules {
            let built_in = platform::APIS.iter().any(|a| {
                a.rate.is_some() && a.method == r.method && platform::same_pattern(a.path, &r.path)
            });
            if !built_in {
                let line = format!("{} {} {} (file)", r.method, r.path, r.rate);
                out.push_str(&format!("#   {}\n", line.escape_debug()));
            }
        }
        out
    }
}

fn read_file(path: &Path) -> Result<(String, String), ConfigError> {
    let name = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok((text, name)),
        Err(e) => Err(ConfigError {
            problems: vec![format!("{name}: cannot read the file: {e}")],
        }),
    }
}

fn secs<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_secs())
}

fn millis<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.as_millis() as u64)
}

fn opt_millis<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_u64(d.map_or(0, |d| d.as_millis() as u64))
}

fn egress<S: Serializer>(p: &Option<EgressProxy>, s: S) -> Result<S::Ok, S::Error> {
    match p {
        Some(p) => s.collect_str(p),
        None => s.serialize_none(),
    }
}

fn masked<S: Serializer>(v: &ParamValue, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(v.masked())
}

fn kind<S: Serializer>(k: &AppKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}
