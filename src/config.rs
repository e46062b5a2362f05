//! `proxy.toml`: parsing, validation, secret sources and the `check` rendering.
//!
//! The file is read into a `toml::Table` and walked key by key rather than deserialised
//! straight into structs, so that one pass reports *every* problem (unknown keys, wrong types,
//! missing secrets, bad URLs) as `file: key: what is wrong`, not just the first one serde
//! trips over. The result is a fully validated [`Config`]: everything the proxy needs at run
//! time is already parsed (addresses, URIs, header names, secrets read from their sources).

use std::collections::HashSet;
use std::fmt::{self, Display, Write as _};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::Uri;
use ipnet::IpNet;
use toml::{Table, Value};

use crate::platform::{self, AppKind};
use crate::secret::Secret;

/// The platform's production endpoint.
pub const DEFAULT_UPSTREAM: &str = "https://service.cheng-xun.cn";
/// The documented token endpoint of self-built apps (`[token] path` by default).
pub const DEFAULT_TOKEN_PATH: &str = platform::APP_TOKEN_PATH;

/// The keys of an `[[app]]` that carry its token request's credentials.
const CREDENTIAL_KEYS: [&str; 8] = [
    "app_key",
    "corp_id",
    "corp_secret",
    "corp_secret_env",
    "corp_secret_file",
    "corp_authorization",
    "corp_authorization_env",
    "corp_authorization_file",
];

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where it was read from (for messages).
    pub source: String,
    /// `[server]`.
    pub server: ServerConfig,
    /// `[admin]`; `None` disables the admin listener.
    pub admin: Option<AdminConfig>,
    /// `[upstream]`.
    pub upstream: UpstreamConfig,
    /// `[token]`.
    pub token: TokenConfig,
    /// `[[app]]`, in file order.
    pub apps: Vec<AppConfig>,
    /// `[[client]]`, in file order.
    pub clients: Vec<ClientConfig>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Where legacy apps connect.
    pub listen: SocketAddr,
    /// Inbound TLS, when both files are given.
    pub tls: Option<TlsFiles>,
    /// Client networks; anyone else gets 403.
    pub allow: Vec<IpNet>,
    /// Largest request body accepted.
    pub max_body_bytes: u64,
    /// How long in-flight requests may run on after SIGTERM.
    pub shutdown_grace: Duration,
    /// Requests in flight at once; more get 503 `overloaded`.
    pub max_concurrent_requests: usize,
    /// Runtime worker threads: 0 = one per core, 1 = a single-threaded runtime.
    pub workers: usize,
}

/// Inbound TLS material.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    /// Certificate chain (PEM).
    pub cert: PathBuf,
    /// Private key (PEM).
    pub key: PathBuf,
    /// CA whose certificates clients must present (mTLS).
    pub client_ca: Option<PathBuf>,
}

/// `[admin]`.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where the admin endpoints listen.
    pub listen: SocketAddr,
}

/// `[upstream]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpstreamConfig {
    /// The URL as written.
    pub url: String,
    /// Always `https`.
    pub scheme: Scheme,
    /// Host and port of the platform.
    pub authority: Authority,
    /// Path prefix of the upstream URL without a trailing slash (usually empty).
    pub base_path: String,
    /// Extra trusted root, added to the system's.
    pub ca_file: Option<PathBuf>,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Whole upstream exchange.
    pub timeout: Duration,
    /// Upstream exchanges in flight at once (on HTTP/1.1, connections); more wait their turn.
    pub max_connections: usize,
}

/// How the token travels on forwarded calls.
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

/// `[token]`.
#[derive(Debug, Clone)]
pub struct TokenConfig {
    /// Token endpoint path.
    pub path: String,
    /// Refresh this long before expiry.
    pub refresh_ahead: Duration,
    /// How the token is injected.
    pub inject: Inject,
    /// `err_code`s meaning "token rejected" for every app, when set; else each app's kind
    /// decides (see [`AppConfig::invalid_codes`]).
    pub invalid_codes: Option<Vec<i64>>,
    /// Fetch cap per app in any 60 s window.
    pub max_fetches_per_minute: u32,
    /// Shared store, for scale-out.
    pub store: Option<StoreConfig>,
}

/// `[token.store]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Redis URL (may carry a password, so kept secret).
    pub redis_url: Secret,
    /// Fetch lease lifetime; default 2 × `upstream.timeout_ms` + 5 s, longer than any fetch.
    pub lease: Option<Duration>,
}

/// A query parameter value of a token request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParamValue {
    /// Sent as written.
    Plain(String),
    /// Read from an environment variable or file; printed as `***`.
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

/// How an app's token is requested.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credentials {
    /// The documented `app_key` / `corp_id` / `corp_secret` query.
    Standard {
        /// `app_key`.
        app_key: String,
        /// `corp_id`, as written (number or string).
        corp_id: String,
        /// `corp_secret`.
        corp_secret: Secret,
        /// Where the secret came from.
        source: SecretSource,
    },
    /// An organisation-service app: `corp_id`, the permanent `corp_secret` and, when set,
    /// `corp_authorization`.
    Corp {
        /// `corp_id`, as written (number or string).
        corp_id: String,
        /// The permanent `corp_secret`.
        corp_secret: Secret,
        /// Where the secret came from.
        source: SecretSource,
        /// `corp_authorization`, sent when set (a secret too).
        authorization: Option<(Secret, SecretSource)>,
    },
    /// `[app.token_params]`: these parameters instead.
    Params(Vec<(String, ParamValue)>),
}

impl Credentials {
    /// Every secret value in these credentials.
    pub fn secrets(&self) -> Vec<&Secret> {
        self.secret_params().into_iter().map(|(_, s)| s).collect()
    }

    /// The token request's parameters that name the app (nothing secret), in order: what a
    /// legacy token request must carry for the proxy to answer it.
    pub fn naming(&self) -> Vec<(&str, &str)> {
        match self {
            Credentials::Standard {
                app_key, corp_id, ..
            } => vec![("app_key", app_key), ("corp_id", corp_id)],
            Credentials::Corp { corp_id, .. } => vec![("corp_id", corp_id)],
            Credentials::Params(params) => params
                .iter()
                .filter_map(|(k, v)| match v {
                    ParamValue::Plain(v) => Some((k.as_str(), v.as_str())),
                    ParamValue::Secret(..) => None,
                })
                .collect(),
        }
    }

    /// The token request's secret parameters, by name.
    pub fn secret_params(&self) -> Vec<(&str, &Secret)> {
        match self {
            Credentials::Standard { corp_secret, .. } => vec![("corp_secret", corp_secret)],
            Credentials::Corp {
                corp_secret,
                authorization,
                ..
            } => {
                let mut v = vec![("corp_secret", corp_secret)];
                if let Some((a, _)) = authorization {
                    v.push(("corp_authorization", a));
                }
                v
            }
            Credentials::Params(params) => params
                .iter()
                .filter_map(|(k, v)| match v {
                    ParamValue::Secret(s, _) => Some((k.as_str(), s)),
                    ParamValue::Plain(_) => None,
                })
                .collect(),
        }
    }

    /// The token request's query parameters, in order.
    pub fn query_pairs(&self) -> Vec<(&str, &str)> {
        match self {
            Credentials::Standard {
                app_key,
                corp_id,
                corp_secret,
                ..
            } => vec![
                ("app_key", app_key),
                ("corp_id", corp_id),
                ("corp_secret", corp_secret.expose()),
            ],
            Credentials::Corp { corp_id, .. } => {
                let mut v = vec![("corp_id", corp_id.as_str())];
                v.extend(
                    self.secret_params()
                        .into_iter()
                        .map(|(k, s)| (k, s.expose())),
                );
                v
            }
            Credentials::Params(params) => params
                .iter()
                .map(|(k, v)| (k.as_str(), v.expose()))
                .collect(),
        }
    }
}

/// `[[app]]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// Unique name, used by `X-CX-App`, logs and metrics.
    pub name: String,
    /// Path prefix selecting this app; `None` = only by `X-CX-App`.
    pub prefix: Option<String>,
    /// Which token flow the app uses (`kind`).
    pub kind: AppKind,
    /// Token endpoint path for this app.
    pub token_path: String,
    /// What the token request sends.
    pub credentials: Credentials,
    /// `err_code`s meaning "token rejected" for this app: its own `invalid_codes`, else
    /// `[token] invalid_codes`, else its kind's documented codes (49000 for apps; 40004 and
    /// 40005 for corp-service apps; PLATFORM.md section 2).
    pub invalid_codes: Vec<i64>,
}

impl AppConfig {
    /// What identifies this app's token at the platform: a hash (16 hex digits) of its token
    /// path and its non-secret credentials, never of a secret. Instances sharing a token store
    /// share the token of apps with one fingerprint; a reload keeps the token, fetch gate and
    /// fetch-cap window of an app whose name and fingerprint are unchanged
    /// ([`AppConfig::same_app`]).
    pub fn fingerprint(&self) -> String {
        let app = self;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        ctx.update(app.token_path.as_bytes());
        match &app.credentials {
            Credentials::Standard {
                app_key, corp_id, ..
            } => {
                for part in ["std", app_key.as_str(), corp_id.as_str()] {
                    ctx.update(b"\0");
                    ctx.update(part.as_bytes());
                }
            }
            Credentials::Corp { corp_id, .. } => {
                for part in ["corp", corp_id.as_str()] {
                    ctx.update(b"\0");
                    ctx.update(part.as_bytes());
                }
            }
            Credentials::Params(params) => {
                for (k, v) in params {
                    ctx.update(b"\0");
                    ctx.update(k.as_bytes());
                    ctx.update(b"=");
                    // A secret parameter counts by name only.
                    if let ParamValue::Plain(v) = v {
                        ctx.update(v.as_bytes());
                    }
                }
            }
        }
        let digest = ctx.finish();
        crate::wire::hex(&digest.as_ref()[..8])
    }

    /// Whether `other` is this app as far as its token goes: the one rule of what survives a
    /// reload. Its prefix, grants or `invalid_codes` may change; a rotated secret asks the
    /// platform for nothing new either (force a refresh for that).
    pub fn same_app(&self, other: &AppConfig) -> bool {
        self.name == other.name && self.fingerprint() == other.fingerprint()
    }
}

/// `[[client]]`.
#[derive(Debug, Clone)]
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
    pub paths: Option<Vec<String>>,
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
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Loaded, ConfigError> {
        let name = path.display().to_string();
        match std::fs::read_to_string(path) {
            Ok(text) => Self::from_toml(&text, &name, path.parent()),
            Err(e) => Err(ConfigError {
                problems: vec![format!("{name}: cannot read the file: {e}")],
            }),
        }
    }

    /// Reads only the `[upstream]` table of a config file (`cx-proxy corp-secret`, which runs
    /// before the corp's `[[app]]` can read the secret it is about to write).
    pub fn load_upstream(path: &Path) -> Result<UpstreamConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            problems: vec![format!("{name}: cannot read the file: {e}")],
        })?;
        let mut table = parse_table(&text, &name)?;
        let mut p = Parser {
            file: name,
            dir: path.parent().map(Path::to_path_buf),
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        let upstream = table
            .remove("upstream")
            .unwrap_or(Value::Table(Table::new()));
        let mut root = Section::new("", Table::from_iter([("upstream".to_owned(), upstream)]));
        let upstream = p.upstream(&mut root);
        match upstream {
            Some(u) if p.errors.is_empty() => Ok(u),
            _ => Err(ConfigError { problems: p.errors }),
        }
    }

    /// Validates TOML text; `name` prefixes messages, relative paths resolve against `dir`.
    pub fn from_toml(text: &str, name: &str, dir: Option<&Path>) -> Result<Loaded, ConfigError> {
        let mut p = Parser {
            file: name.to_owned(),
            dir: dir.map(Path::to_path_buf),
            errors: Vec::new(),
            warnings: Vec::new(),
        };
        let table = parse_table(text, name)?;
        let config = p.config(table);
        if p.errors.is_empty() {
            if let Some(config) = config {
                return Ok(Loaded {
                    config,
                    warnings: p.warnings,
                });
            }
        }
        Err(ConfigError { problems: p.errors })
    }

    /// The effective configuration as TOML, secrets shown as `***` (for `check`).
    pub fn render(&self) -> String {
        let mut o = String::new();
        let q = |s: &str| Value::String(s.to_owned()).to_string();
        let list = |v: Vec<String>| {
            format!(
                "[{}]",
                v.iter().map(|s| q(s)).collect::<Vec<_>>().join(", ")
            )
        };
        let s = &self.server;
        let _ = writeln!(o, "# effective configuration of {}", self.source);
        let _ = writeln!(o, "[server]\nlisten = {}", q(&s.listen.to_string()));
        if let Some(tls) = &s.tls {
            let _ = writeln!(
                o,
                "tls_cert = {}\ntls_key = {}",
                q(&tls.cert.display().to_string()),
                q(&tls.key.display().to_string())
            );
            if let Some(ca) = &tls.client_ca {
                let _ = writeln!(o, "client_ca = {}", q(&ca.display().to_string()));
            }
        }
        let _ = writeln!(
            o,
            "allow = {}",
            list(s.allow.iter().map(ToString::to_string).collect())
        );
        let _ = writeln!(o, "max_body_bytes = {}", s.max_body_bytes);
        let _ = writeln!(o, "shutdown_grace_s = {}", s.shutdown_grace.as_secs());
        let _ = writeln!(o, "max_concurrent_requests = {}", s.max_concurrent_requests);
        let _ = writeln!(o, "workers = {}", s.workers);
        if let Some(admin) = &self.admin {
            let _ = writeln!(o, "\n[admin]\nlisten = {}", q(&admin.listen.to_string()));
        }
        let u = &self.upstream;
        let _ = writeln!(o, "\n[upstream]\nurl = {}", q(&u.url));
        if let Some(ca) = &u.ca_file {
            let _ = writeln!(o, "ca_file = {}", q(&ca.display().to_string()));
        }
        let _ = writeln!(o, "connect_timeout_ms = {}", u.connect_timeout.as_millis());
        let _ = writeln!(o, "timeout_ms = {}", u.timeout.as_millis());
        let _ = writeln!(o, "max_connections = {}", u.max_connections);
        let t = &self.token;
        let _ = writeln!(o, "\n[token]\npath = {}", q(&t.path));
        let _ = writeln!(o, "refresh_ahead_s = {}", t.refresh_ahead.as_secs());
        match &t.inject {
            Inject::Query { param } => {
                let _ = writeln!(o, "inject = \"query\"\nparam = {}", q(param));
            }
            Inject::Header {
                name,
                prefix,
                suffix,
            } => {
                let _ = writeln!(o, "inject = \"header\"\nheader = {}", q(name.as_str()));
                let _ = writeln!(
                    o,
                    "header_format = {}",
                    q(&format!("{prefix}{{token}}{suffix}"))
                );
            }
        }
        let codes = |c: &[i64]| {
            let c: Vec<String> = c.iter().map(ToString::to_string).collect();
            format!("[{}]", c.join(", "))
        };
        if let Some(c) = &t.invalid_codes {
            let _ = writeln!(o, "invalid_codes = {}", codes(c));
        }
        let _ = writeln!(o, "max_fetches_per_minute = {}", t.max_fetches_per_minute);
        if let Some(store) = &t.store {
            let _ = writeln!(o, "\n[token.store]\nredis_url = \"***\"");
            if let Some(lease) = store.lease {
                let _ = writeln!(o, "lease_ms = {}", lease.as_millis());
            }
        }
        for app in &self.apps {
            let _ = writeln!(o, "\n[[app]]\nname = {}", q(&app.name));
            if let Some(prefix) = &app.prefix {
                let _ = writeln!(o, "prefix = {}", q(prefix));
            }
            let _ = writeln!(o, "kind = {}", q(app.kind.as_str()));
            let _ = writeln!(o, "token_path = {}", q(&app.token_path));
            let _ = writeln!(
                o,
                "invalid_codes = {}   # in force for this app",
                codes(&app.invalid_codes)
            );
            match &app.credentials {
                Credentials::Standard {
                    app_key,
                    corp_id,
                    source,
                    ..
                } => {
                    let _ = writeln!(o, "app_key = {}\ncorp_id = {}", q(app_key), q(corp_id));
                    let _ = writeln!(o, "corp_secret = \"***\"   # {source}");
                }
                Credentials::Corp {
                    corp_id,
                    source,
                    authorization,
                    ..
                } => {
                    let _ = writeln!(o, "corp_id = {}", q(corp_id));
                    let _ = writeln!(o, "corp_secret = \"***\"   # {source}");
                    if let Some((_, source)) = authorization {
                        let _ = writeln!(o, "corp_authorization = \"***\"   # {source}");
                    }
                }
                Credentials::Params(params) => {
                    let _ = writeln!(o, "[app.token_params]");
                    for (k, v) in params {
                        match v {
                            ParamValue::Plain(s) => {
                                let _ = writeln!(o, "{k} = {}", q(s));
                            }
                            ParamValue::Secret(_, source) => {
                                let _ = writeln!(o, "{k} = \"***\"   # {source}");
                            }
                        }
                    }
                }
            }
        }
        for c in &self.clients {
            let _ = writeln!(o, "\n[[client]]\nname = {}", q(&c.name));
            let _ = writeln!(
                o,
                "networks = {}",
                list(c.networks.iter().map(ToString::to_string).collect())
            );
            let _ = writeln!(o, "cert_names = {}", list(c.cert_names.clone()));
            let _ = writeln!(o, "apps = {}", list(c.apps.clone()));
            if let Some(paths) = &c.paths {
                let _ = writeln!(o, "paths = {}", list(paths.clone()));
            }
        }
        o
    }
}

/// The file as a TOML table, or its syntax error with line and column.
fn parse_table(text: &str, name: &str) -> Result<Table, ConfigError> {
    text.parse().map_err(|e: toml::de::Error| {
        let at = e
            .span()
            .map(|s| line_col(text, s.start))
            .map(|(l, c)| format!("line {l}, column {c}"))
            .unwrap_or_else(|| "syntax".into());
        ConfigError {
            problems: vec![format!("{name}: {at}: {}", e.message().trim())],
        }
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, col)
}

// === impl Parser ===

struct Parser {
    file: String,
    dir: Option<PathBuf>,
    errors: Vec<String>,
    warnings: Vec<String>,
}

/// A table being consumed: keys are removed as they are read, what is left is unknown.
struct Section {
    path: String,
    table: Table,
}

impl Section {
    fn new(path: impl Into<String>, table: Table) -> Self {
        Section {
            path: path.into(),
            table,
        }
    }

    fn key(&self, k: &str) -> String {
        if self.path.is_empty() {
            k.to_owned()
        } else {
            format!("{}.{k}", self.path)
        }
    }
}

impl Parser {
    fn err(&mut self, key: &str, what: impl Display) {
        self.errors.push(format!("{}: {key}: {what}", self.file));
    }

    fn warn(&mut self, key: &str, what: impl Display) {
        self.warnings.push(format!("{}: {key}: {what}", self.file));
    }

    fn finish(&mut self, s: Section) {
        let mut keys: Vec<_> = s.table.keys().cloned().collect();
        keys.sort();
        for k in keys {
            let key = s.key(&k);
            self.err(&key, "unknown key");
        }
    }

    fn section(&mut self, parent: &mut Section, k: &str) -> Section {
        let key = parent.key(k);
        match parent.table.remove(k) {
            None => Section::new(key, Table::new()),
            Some(Value::Table(t)) => Section::new(key, t),
            Some(other) => {
                self.err(
                    &key,
                    format!("expected a table, found {}", other.type_str()),
                );
                Section::new(key, Table::new())
            }
        }
    }

    fn string(&mut self, s: &mut Section, k: &str) -> Option<String> {
        match s.table.remove(k)? {
            Value::String(v) => Some(v),
            other => {
                self.err(
                    &s.key(k),
                    format!("expected a string, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn int(&mut self, s: &mut Section, k: &str, min: i64, max: i64) -> Option<i64> {
        match s.table.remove(k)? {
            Value::Integer(v) if (min..=max).contains(&v) => Some(v),
            Value::Integer(v) => {
                self.err(&s.key(k), format!("{v} is out of range ({min}..={max})"));
                None
            }
            other => {
                self.err(
                    &s.key(k),
                    format!("expected an integer, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn strings(&mut self, s: &mut Section, k: &str) -> Option<Vec<String>> {
        let key = s.key(k);
        match s.table.remove(k)? {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, item) in items.into_iter().enumerate() {
                    match item {
                        Value::String(v) => out.push(v),
                        other => self.err(
                            &format!("{key}[{i}]"),
                            format!("expected a string, found {}", other.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                self.err(
                    &key,
                    format!("expected an array of strings, found {}", other.type_str()),
                );
                None
            }
        }
    }

    fn path(&self, p: String) -> PathBuf {
        let p = PathBuf::from(p);
        match &self.dir {
            Some(dir) if p.is_relative() && !dir.as_os_str().is_empty() => dir.join(p),
            _ => p,
        }
    }

    fn file_path(&mut self, s: &mut Section, k: &str) -> Option<PathBuf> {
        let raw = self.string(s, k)?;
        let p = self.path(raw);
        let key = s.key(k);
        if let Err(e) = std::fs::metadata(&p) {
            self.err(&key, format!("cannot read {}: {e}", p.display()));
        }
        Some(p)
    }

    fn addr(&mut self, s: &mut Section, k: &str) -> Option<SocketAddr> {
        let v = self.string(s, k)?;
        match v.parse() {
            Ok(a) => Some(a),
            Err(_) => {
                self.err(&s.key(k), format!("{v:?} is not an IP:port address"));
                None
            }
        }
    }

    fn networks(&mut self, s: &mut Section, k: &str) -> Option<Vec<IpNet>> {
        let key = s.key(k);
        let raw = self.strings(s, k)?;
        let mut out = Vec::with_capacity(raw.len());
        for (i, n) in raw.iter().enumerate() {
            // A bare address means that one host.
            let parsed = n
                .parse::<IpNet>()
                .or_else(|_| n.parse::<std::net::IpAddr>().map(IpNet::from));
            match parsed {
                Ok(net) => out.push(net),
                Err(_) => self.err(
                    &format!("{key}[{i}]"),
                    format!("{n:?} is not a network (CIDR such as 10.0.0.0/8)"),
                ),
            }
        }
        Some(out)
    }

    /// An `invalid_codes` list: integers, none of them a code that never means "token
    /// rejected" (success, the rate limits).
    fn codes(&mut self, s: &mut Section, k: &str) -> Option<Vec<i64>> {
        let key = s.key(k);
        match s.table.remove(k)? {
            Value::Array(items) => {
                let mut out = Vec::with_capacity(items.len());
                for (i, v) in items.into_iter().enumerate() {
                    match v {
                        Value::Integer(c) if platform::code::NEVER_REJECTION.contains(&c) => self
                            .err(
                                &format!("{key}[{i}]"),
                                format!(
                                    "{c} is never a token rejection (success or the platform's \
                                     rate limit: a new token would not help)"
                                ),
                            ),
                        Value::Integer(c) => out.push(c),
                        other => self.err(
                            &format!("{key}[{i}]"),
                            format!("expected an integer, found {}", other.type_str()),
                        ),
                    }
                }
                Some(out)
            }
            other => {
                self.err(
                    &key,
                    format!("expected an array of integers, found {}", other.type_str()),
                );
                None
            }
        }
    }

    /// Reads a secret given as `{base}_env`, `{base}_file` or `{base}` (inline).
    fn secret(
        &mut self,
        s: &mut Section,
        base: &str,
        required: bool,
    ) -> Option<(Secret, SecretSource)> {
        let env_key = format!("{base}_env");
        let file_key = format!("{base}_file");
        let env = self.string(s, &env_key);
        let file = self.string(s, &file_key);
        let inline = self.string(s, base);
        let given = usize::from(env.is_some())
            + usize::from(file.is_some())
            + usize::from(inline.is_some());
        if given > 1 {
            self.err(
                &s.key(base),
                format!("give only one of {base}_env, {base}_file, {base}"),
            );
            return None;
        }
        if let Some(var) = env {
            return self.secret_from_env(&s.key(&env_key), var);
        }
        if let Some(path) = file {
            return self.secret_from_file(&s.key(&file_key), path);
        }
        if let Some(value) = inline {
            if value.is_empty() {
                self.err(&s.key(base), "is empty");
                return None;
            }
            self.warn(
                &s.key(base),
                format!("secret written in the config file; prefer {base}_env or {base}_file"),
            );
            return Some((Secret::new(value), SecretSource::Inline));
        }
        if required {
            self.err(
                &s.key(base),
                format!("missing: set {base}_env, {base}_file or {base}"),
            );
        }
        None
    }

    fn secret_from_env(&mut self, key: &str, var: String) -> Option<(Secret, SecretSource)> {
        match std::env::var(&var) {
            Ok(v) if !v.is_empty() => Some((Secret::new(v), SecretSource::Env(var))),
            Ok(_) => {
                self.err(key, format!("environment variable {var} is empty"));
                None
            }
            Err(_) => {
                self.err(key, format!("environment variable {var} is not set"));
                None
            }
        }
    }

    fn secret_from_file(&mut self, key: &str, path: String) -> Option<(Secret, SecretSource)> {
        let path = self.path(path);
        match std::fs::read_to_string(&path) {
            Ok(v) => {
                let v = v.trim_end_matches(['\r', '\n']);
                if v.is_empty() {
                    self.err(key, format!("{} is empty", path.display()));
                    None
                } else {
                    Some((Secret::new(v), SecretSource::File(path)))
                }
            }
            Err(e) => {
                self.err(key, format!("cannot read {}: {e}", path.display()));
                None
            }
        }
    }

    fn config(&mut self, table: Table) -> Option<Config> {
        let mut root = Section::new("", table);
        let server = self.server(&mut root);
        let admin = self.admin(&mut root);
        let upstream = self.upstream(&mut root);
        let token = self.token(&mut root);
        let apps = self.apps(&mut root, token.as_ref());
        let clients = self.clients(&mut root, &apps);
        self.finish(root);
        Some(Config {
            source: self.file.clone(),
            server: server?,
            admin,
            upstream: upstream?,
            token: token?,
            apps,
            clients,
        })
    }

    fn server(&mut self, root: &mut Section) -> Option<ServerConfig> {
        let mut s = self.section(root, "server");
        let listen = self.addr(&mut s, "listen");
        let cert = self.file_path(&mut s, "tls_cert");
        let key = self.file_path(&mut s, "tls_key");
        let client_ca = self.file_path(&mut s, "client_ca");
        let tls = match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (None, None) => {
                if client_ca.is_some() {
                    self.err(
                        &s.key("client_ca"),
                        "needs tls_cert and tls_key (mTLS runs over TLS)",
                    );
                }
                None
            }
            (Some(_), None) => {
                self.err(
                    &s.key("tls_key"),
                    "missing: tls_cert is set, so tls_key must be too",
                );
                None
            }
            (None, Some(_)) => {
                self.err(
                    &s.key("tls_cert"),
                    "missing: tls_key is set, so tls_cert must be too",
                );
                None
            }
        };
        let allow = self.networks(&mut s, "allow");
        let max_body = self.int(&mut s, "max_body_bytes", 0, i64::MAX);
        let grace = self.int(&mut s, "shutdown_grace_s", 0, 86_400);
        let concurrent = self.int(&mut s, "max_concurrent_requests", 1, 1_000_000);
        let workers = self.int(&mut s, "workers", 0, 1024);
        self.finish(s);
        Some(ServerConfig {
            listen: listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 8080))),
            tls,
            allow: allow.unwrap_or_else(|| {
                vec![
                    IpNet::from(std::net::IpAddr::from([127, 0, 0, 1])),
                    IpNet::from(std::net::IpAddr::from(std::net::Ipv6Addr::LOCALHOST)),
                ]
            }),
            max_body_bytes: max_body.map_or(10 * 1024 * 1024, |v| v as u64),
            shutdown_grace: Duration::from_secs(grace.unwrap_or(30) as u64),
            max_concurrent_requests: concurrent.unwrap_or(10_000) as usize,
            workers: workers.unwrap_or(0) as usize,
        })
    }

    fn admin(&mut self, root: &mut Section) -> Option<AdminConfig> {
        let present = root.table.contains_key("admin");
        let mut s = self.section(root, "admin");
        let listen = self.addr(&mut s, "listen");
        self.finish(s);
        if present {
            listen.map(|listen| AdminConfig { listen })
        } else {
            None
        }
    }

    fn upstream(&mut self, root: &mut Section) -> Option<UpstreamConfig> {
        let mut s = self.section(root, "upstream");
        let url_key = s.key("url");
        let url = self
            .string(&mut s, "url")
            .unwrap_or_else(|| DEFAULT_UPSTREAM.to_owned());
        let ca_file = self.file_path(&mut s, "ca_file");
        let connect = self
            .int(&mut s, "connect_timeout_ms", 1, 600_000)
            .unwrap_or(3000);
        let timeout = self
            .int(&mut s, "timeout_ms", 1, 3_600_000)
            .unwrap_or(30_000);
        let max_connections = self
            .int(&mut s, "max_connections", 1, 100_000)
            .unwrap_or(256);
        self.finish(s);
        let parsed = match parse_upstream_url(&url) {
            Ok(p) => Some(p),
            Err(what) => {
                self.err(&url_key, format!("{url:?} {what}"));
                None
            }
        };
        let (scheme, authority, base_path) = parsed?;
        Some(UpstreamConfig {
            url,
            scheme,
            authority,
            base_path,
            ca_file,
            connect_timeout: Duration::from_millis(connect as u64),
            timeout: Duration::from_millis(timeout as u64),
            max_connections: max_connections as usize,
        })
    }

    fn token(&mut self, root: &mut Section) -> Option<TokenConfig> {
        let mut s = self.section(root, "token");
        let path_key = s.key("path");
        let path = self
            .string(&mut s, "path")
            .unwrap_or_else(|| DEFAULT_TOKEN_PATH.to_owned());
        if !path.starts_with('/') {
            self.err(&path_key, format!("{path:?} must start with /"));
        }
        let refresh_ahead = self
            .int(&mut s, "refresh_ahead_s", 0, 86_400)
            .unwrap_or(300);
        let inject_key = s.key("inject");
        let inject = self
            .string(&mut s, "inject")
            .unwrap_or_else(|| "query".into());
        let param_key = s.key("param");
        let param = self
            .string(&mut s, "param")
            .unwrap_or_else(|| "access_token".into());
        let header_key = s.key("header");
        let header = self
            .string(&mut s, "header")
            .unwrap_or_else(|| "Authorization".into());
        let format_key = s.key("header_format");
        let format = self
            .string(&mut s, "header_format")
            .unwrap_or_else(|| "Bearer {token}".into());
        let invalid_codes = self.codes(&mut s, "invalid_codes");
        let max_fetches = self
            .int(&mut s, "max_fetches_per_minute", 1, 10_000)
            .unwrap_or(6);
        let store = if s.table.contains_key("store") {
            let mut st = self.section(&mut s, "store");
            let url_key = st.key("redis_url");
            let url = self.string(&mut st, "redis_url");
            let lease = self.int(&mut st, "lease_ms", 100, 3_600_000);
            self.finish(st);
            match url {
                Some(u) if u.starts_with("redis://") || u.starts_with("rediss://") => {
                    Some(StoreConfig {
                        redis_url: Secret::new(u),
                        lease: lease.map(|ms| Duration::from_millis(ms as u64)),
                    })
                }
                Some(_) => {
                    self.err(&url_key, "must start with redis:// or rediss://");
                    None
                }
                None => {
                    self.err(&url_key, "missing");
                    None
                }
            }
        } else {
            None
        };
        self.finish(s);
        let inject = match inject.as_str() {
            "query" => {
                if param.is_empty() || param.contains(['&', '=', '#', ' ']) {
                    self.err(
                        &param_key,
                        format!("{param:?} is not a usable query parameter name"),
                    );
                }
                Inject::Query { param }
            }
            "header" => {
                let name = match HeaderName::from_bytes(header.as_bytes()) {
                    Ok(n) => Some(n),
                    Err(_) => {
                        self.err(
                            &header_key,
                            format!("{header:?} is not a valid header name"),
                        );
                        None
                    }
                };
                let split = format.split_once("{token}");
                if split.is_none() {
                    self.err(&format_key, format!("{format:?} must contain {{token}}"));
                }
                match (name, split) {
                    (Some(name), Some((prefix, suffix))) => Inject::Header {
                        name,
                        prefix: prefix.to_owned(),
                        suffix: suffix.to_owned(),
                    },
                    _ => return None,
                }
            }
            other => {
                self.err(
                    &inject_key,
                    format!("{other:?} is not \"query\" or \"header\""),
                );
                return None;
            }
        };
        Some(TokenConfig {
            path,
            refresh_ahead: Duration::from_secs(refresh_ahead as u64),
            inject,
            invalid_codes,
            max_fetches_per_minute: max_fetches as u32,
            store,
        })
    }

    fn tables(&mut self, root: &mut Section, k: &str) -> Vec<Section> {
        match root.table.remove(k) {
            None => Vec::new(),
            Some(Value::Array(items)) => items
                .into_iter()
                .enumerate()
                .filter_map(|(i, v)| match v {
                    Value::Table(t) => Some(Section::new(format!("{k}[{i}]"), t)),
                    other => {
                        self.err(
                            &format!("{k}[{i}]"),
                            format!("expected a table ([[{k}]]), found {}", other.type_str()),
                        );
                        None
                    }
                })
                .collect(),
            Some(other) => {
                self.err(
                    k,
                    format!("expected [[{k}]] tables, found {}", other.type_str()),
                );
                Vec::new()
            }
        }
    }

    fn apps(&mut self, root: &mut Section, token: Option<&TokenConfig>) -> Vec<AppConfig> {
        let sections = self.tables(root, "app");
        if sections.is_empty() {
            self.err("app", "missing: configure at least one [[app]]");
        }
        let mut names = HashSet::new();
        let mut prefixes = HashSet::new();
        let mut apps = Vec::with_capacity(sections.len());
        for mut s in sections {
            let name_key = s.key("name");
            let name = self.string(&mut s, "name");
            match &name {
                None => self.err(&name_key, "missing"),
                Some(n)
                    if n.is_empty()
                        || !n
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
                {
                    self.err(
                        &name_key,
                        format!("{n:?} must be non-empty letters, digits, '-', '_' or '.'"),
                    )
                }
                Some(n) if !names.insert(n.clone()) => {
                    self.err(&name_key, format!("{n:?} is used by another app"))
                }
                Some(_) => {}
            }
            let prefix_key = s.key("prefix");
            let prefix = self.string(&mut s, "prefix").map(|p| {
                let trimmed = if p.len() > 1 {
                    p.trim_end_matches('/').to_owned()
                } else {
                    p
                };
                if !trimmed.starts_with('/')
                    || trimmed.contains(['?', '#'])
                    || trimmed.contains("/../")
                    || trimmed.ends_with("/..")
                {
                    self.err(
                        &prefix_key,
                        format!("{trimmed:?} must be a path starting with /"),
                    );
                }
                if !prefixes.insert(trimmed.clone()) {
                    self.err(&prefix_key, format!("{trimmed:?} is used by another app"));
                }
                trimmed
            });
            let token_path_key = s.key("token_path");
            let token_path = self.string(&mut s, "token_path");
            if let Some(tp) = &token_path {
                if !tp.starts_with('/') {
                    self.err(&token_path_key, format!("{tp:?} must start with /"));
                }
            }
            let kind_key = s.key("kind");
            let (kind, kind_known) = match self.string(&mut s, "kind").as_deref() {
                None | Some("app") => (AppKind::App, true),
                Some("corp-service") => (AppKind::CorpService, true),
                Some(other) => {
                    self.err(
                        &kind_key,
                        format!("{other:?} is not \"app\" or \"corp-service\""),
                    );
                    // Which credentials belong is unknown: take them without more complaint.
                    for k in CREDENTIAL_KEYS {
                        s.table.remove(k);
                    }
                    (AppKind::App, false)
                }
            };
            let codes_key = s.key("invalid_codes");
            let own_codes = self.codes(&mut s, "invalid_codes");
            let credentials = if !kind_known {
                None
            } else if s.table.contains_key("token_params") {
                for k in CREDENTIAL_KEYS {
                    if s.table.remove(k).is_some() {
                        self.err(
                            &s.key(k),
                            "not allowed with token_params (which replace it)",
                        );
                    }
                }
                let params = self.section(&mut s, "token_params");
                self.token_params(params)
            } else {
                let app_key = match kind {
                    AppKind::App => {
                        let app_key = self.string(&mut s, "app_key");
                        if app_key.is_none() {
                            self.err(&s.key("app_key"), "missing");
                        }
                        app_key
                    }
                    AppKind::CorpService => {
                        if s.table.remove("app_key").is_some() {
                            self.err(
                                &s.key("app_key"),
                                "not used by kind = \"corp-service\" apps (their token is \
                                 asked for with corp_id and corp_secret)",
                            );
                        }
                        None
                    }
                };
                let corp_id_key = s.key("corp_id");
                let corp_id = match s.table.remove("corp_id") {
                    Some(Value::String(v)) if !v.is_empty() => Some(v),
                    Some(Value::Integer(v)) => Some(v.to_string()),
                    Some(Value::String(_)) => {
                        self.err(&corp_id_key, "is empty");
                        None
                    }
                    Some(other) => {
                        self.err(
                            &corp_id_key,
                            format!(
                                "expected a number or non-empty string, found {}",
                                other.type_str()
                            ),
                        );
                        None
                    }
                    None => {
                        self.err(&corp_id_key, "missing");
                        None
                    }
                };
                let secret = self.secret(&mut s, "corp_secret", true);
                match kind {
                    AppKind::App => match (app_key, corp_id, secret) {
                        (Some(app_key), Some(corp_id), Some((corp_secret, source))) => {
                            Some(Credentials::Standard {
                                app_key,
                                corp_id,
                                corp_secret,
                                source,
                            })
                        }
                        _ => None,
                    },
                    AppKind::CorpService => {
                        let authorization = self.secret(&mut s, "corp_authorization", false);
                        match (corp_id, secret) {
                            (Some(corp_id), Some((corp_secret, source))) => {
                                Some(Credentials::Corp {
                                    corp_id,
                                    corp_secret,
                                    source,
                                    authorization,
                                })
                            }
                            _ => None,
                        }
                    }
                }
            };
            self.finish(s);
            let own_given = own_codes.is_some();
            let invalid_codes = own_codes
                .or_else(|| token.and_then(|t| t.invalid_codes.clone()))
                .unwrap_or_else(|| kind.invalid_codes().to_vec());
            if kind == AppKind::CorpService
                && invalid_codes.contains(&platform::code::BAD_CREDENTIALS)
            {
                let key = if own_given {
                    codes_key.clone()
                } else {
                    "token.invalid_codes".to_owned()
                };
                self.err(
                    &key,
                    "40001 means bad credentials on organisation-service APIs, never a \
                     rejected token: replaying on it would fetch in a loop",
                );
            }
            if let (Some(name), Some(credentials)) = (name, credentials) {
                let token_path = token_path.unwrap_or_else(|| match kind {
                    AppKind::App => token
                        .map_or(DEFAULT_TOKEN_PATH, |t| t.path.as_str())
                        .to_owned(),
                    AppKind::CorpService => platform::CORP_TOKEN_PATH.to_owned(),
                });
                if let Some(other) = apps.iter().find(|a: &&AppConfig| {
                    a.token_path == token_path && a.credentials.naming() == credentials.naming()
                }) {
                    self.err(
                        &name_key,
                        format!(
                            "app {name:?} has the same credentials as app {:?}: each fetch \
                             would invalidate the other's token",
                            other.name
                        ),
                    );
                }
                apps.push(AppConfig {
                    name,
                    prefix,
                    kind,
                    token_path,
                    credentials,
                    invalid_codes,
                });
            }
        }
        apps
    }

    fn token_params(&mut self, mut s: Section) -> Option<Credentials> {
        let mut keys: Vec<String> = s.table.keys().cloned().collect();
        keys.sort();
        let mut params = Vec::with_capacity(keys.len());
        let mut ok = true;
        for k in keys {
            let key = s.key(&k);
            let Some(v) = s.table.remove(&k) else {
                continue;
            };
            let text = match v {
                Value::String(v) => v,
                Value::Integer(v) => v.to_string(),
                other => {
                    self.err(
                        &key,
                        format!("expected a string or number, found {}", other.type_str()),
                    );
                    ok = false;
                    continue;
                }
            };
            let value = if let Some(name) = k.strip_suffix("_env") {
                self.secret_from_env(&key, text)
                    .map(|(s, src)| (name, ParamValue::Secret(s, src)))
            } else if let Some(name) = k.strip_suffix("_file") {
                self.secret_from_file(&key, text)
                    .map(|(s, src)| (name, ParamValue::Secret(s, src)))
            } else {
                Some((k.as_str(), ParamValue::Plain(text)))
            };
            match value {
                Some((name, v)) => params.push((name.to_owned(), v)),
                None => ok = false,
            }
        }
        if params.is_empty() && ok {
            self.err(&s.path, "is empty: give the token request's parameters");
            ok = false;
        }
        self.finish(s);
        ok.then_some(Credentials::Params(params))
    }

    fn clients(&mut self, root: &mut Section, apps: &[AppConfig]) -> Vec<ClientConfig> {
        let mut out = Vec::new();
        for mut s in self.tables(root, "client") {
            let name_key = s.key("name");
            let name = self.string(&mut s, "name");
            if name.is_none() {
                self.err(&name_key, "missing");
            }
            let networks = self.networks(&mut s, "networks").unwrap_or_default();
            let cert_names = self.strings(&mut s, "cert_names").unwrap_or_default();
            if networks.is_empty() && cert_names.is_empty() {
                self.err(
                    &s.path,
                    "needs networks or cert_names to identify the client",
                );
            }
            let apps_key = s.key("apps");
            let granted = self.strings(&mut s, "apps").unwrap_or_default();
            for (i, a) in granted.iter().enumerate() {
                if !apps.iter().any(|app| &app.name == a) {
                    self.err(
                        &format!("{apps_key}[{i}]"),
                        format!("no [[app]] is named {a:?}"),
                    );
                }
            }
            let paths_key = s.key("paths");
            let paths = self.strings(&mut s, "paths");
            if let Some(paths) = &paths {
                for (i, p) in paths.iter().enumerate() {
                    if !p.starts_with('/') {
                        self.err(
                            &format!("{paths_key}[{i}]"),
                            format!("{p:?} must start with /"),
                        );
                    }
                }
            }
            self.finish(s);
            if let Some(name) = name {
                out.push(ClientConfig {
                    name,
                    networks,
                    cert_names,
                    apps: granted,
                    paths,
                });
            }
        }
        out
    }
}

/// Splits an upstream URL into scheme, authority and base path; `Err` says what is wrong.
fn parse_upstream_url(url: &str) -> Result<(Scheme, Authority, String), &'static str> {
    let uri: Uri = url.parse().map_err(|_| "is not a valid URL")?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or("is not an absolute URL (https://host)")?;
    if scheme != Scheme::HTTPS {
        return Err("must use https:// (the upstream is always reached over TLS)");
    }
    let authority = uri.authority().cloned().ok_or("has no host")?;
    if authority.host().is_empty() || authority.as_str().contains('@') {
        return Err("has no usable host");
    }
    if uri.query().is_some() {
        return Err("must not have a query");
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme, authority, base_path))
}

#[cfg(test)]
mod tests {
    use super::*;

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
        match &c.apps[0].credentials {
            Credentials::Standard { corp_id, .. } => assert_eq!(corp_id, "10001"),
            other => panic!("{other:?}"),
        }
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
}
