//! The file as written: serde structs per section, each default in one place (`Default`),
//! read so that a wrong type or an unknown key anywhere is reported with its key path and
//! the rest of the file is still read.
//!
//! Values stay as written here (strings, `i64`); [`super::validate`] turns them into the
//! run-time types and says what is wrong with them.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;

use serde::de::{self, DeserializeOwned, Deserializer, Visitor};
use serde::Deserialize;
use toml::{Table, Value};

use crate::platform;

/// The whole file.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct File {
    pub server: Server,
    pub admin: Option<Admin>,
    pub upstream: Upstream,
    pub token: Token,
    pub app: Vec<App>,
    pub client: Vec<Client>,
    pub callbacks: Option<Callbacks>,
    pub callback: Vec<Callback>,
    pub limits: Limits,
}

/// Only `[upstream]` (`cx-proxy corp-secret`); the rest of the file is not looked at.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct UpstreamOnly {
    pub upstream: Upstream,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct Server {
    pub listen: Parsed<SocketAddr>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub client_ca: Option<String>,
    pub allow: Vec<String>,
    pub max_body_bytes: Int<0, { i64::MAX }>,
    pub shutdown_grace_s: Int<0, 86_400>,
    pub max_concurrent_requests: Int<1, 1_000_000>,
    pub workers: Int<0, 1024>,
}

impl Default for Server {
    fn default() -> Self {
        Server {
            listen: Parsed(SocketAddr::from(([127, 0, 0, 1], 8080))),
            tls_cert: None,
            tls_key: None,
            client_ca: None,
            allow: vec!["127.0.0.1/32".into(), "::1/128".into()],
            max_body_bytes: Int(10 * 1024 * 1024),
            shutdown_grace_s: Int(30),
            max_concurrent_requests: Int(10_000),
            workers: Int(1),
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Admin {
    pub listen: Option<Parsed<SocketAddr>>,
    pub allow: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct Upstream {
    pub url: String,
    pub ca_file: Option<String>,
    pub proxy: Option<String>,
    pub connect_timeout_ms: Int<1, 600_000>,
    pub timeout_ms: Int<1, 3_600_000>,
    pub max_connections: Int<1, 100_000>,
}

impl Default for Upstream {
    fn default() -> Self {
        Upstream {
            url: super::DEFAULT_UPSTREAM.into(),
            ca_file: None,
            proxy: None,
            connect_timeout_ms: Int(3000),
            timeout_ms: Int(30_000),
            max_connections: Int(256),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct Token {
    pub path: String,
    pub refresh_ahead_s: Int<0, 86_400>,
    pub inject: String,
    pub param: String,
    pub header: String,
    pub header_format: String,
    pub invalid_codes: Option<Vec<i64>>,
    pub max_fetches_per_minute: Int<1, 10_000>,
    pub store: Option<Store>,
}

impl Default for Token {
    fn default() -> Self {
        Token {
            path: platform::APP_TOKEN_PATH.into(),
            refresh_ahead_s: Int(300),
            inject: "query".into(),
            param: "access_token".into(),
            header: "Authorization".into(),
            header_format: "Bearer {token}".into(),
            invalid_codes: None,
            max_fetches_per_minute: Int(6),
            store: None,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Store {
    pub redis_url: Option<String>,
    pub lease_ms: Option<Int<100, 3_600_000>>,
}

/// One `[[app]]`. Which credential keys belong depends on `kind`, so all are read here and
/// [`super::validate`] says which are missing or out of place.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct App {
    pub name: Option<String>,
    pub prefix: Option<String>,
    pub kind: Option<String>,
    pub token_path: Option<String>,
    pub invalid_codes: Option<Vec<i64>>,
    pub app_key: Option<String>,
    pub corp_id: Option<Scalar>,
    pub corp_secret: Option<String>,
    pub corp_secret_env: Option<String>,
    pub corp_secret_file: Option<String>,
    pub corp_authorization: Option<String>,
    pub corp_authorization_env: Option<String>,
    pub corp_authorization_file: Option<String>,
    /// In key order, which is the order they are sent in.
    pub token_params: Option<BTreeMap<String, Scalar>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Client {
    pub name: Option<String>,
    pub networks: Vec<String>,
    pub cert_names: Vec<String>,
    pub apps: Vec<String>,
    pub paths: Option<Vec<String>>,
}

/// `[limits]`: the platform's call rates kept at the gateway (SPEC sections 3 and 4.9).
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct Limits {
    pub enabled: bool,
    pub max_wait_ms: Int<0, 600_000>,
    pub margin_ms: Int<0, 60_000>,
    pub rule: Vec<LimitRule>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            enabled: true,
            max_wait_ms: Int(1000),
            margin_ms: Int(100),
            rule: Vec::new(),
        }
    }
}

/// One `[[limits.rule]]`.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct LimitRule {
    pub method: Option<String>,
    pub path: Option<String>,
    pub rate: Option<String>,
}

/// `[callbacks]`: the relay's listener and queue (SPEC section 3 and 8).
#[derive(Debug, Deserialize)]
#[serde(default)]
pub(super) struct Callbacks {
    pub listen: Option<Parsed<SocketAddr>>,
    pub tls_cert: Option<String>,
    pub tls_key: Option<String>,
    pub allow: Vec<String>,
    pub queue: String,
    pub max_skew_s: Int<1, 86_400>,
    pub max_body_bytes: Int<1, { 64 * 1024 * 1024 }>,
    pub deliver_timeout_ms: Int<1, 600_000>,
    pub retry_for_s: Int<1, { 366 * 86_400 }>,
}

impl Default for Callbacks {
    fn default() -> Self {
        Callbacks {
            listen: None,
            tls_cert: None,
            tls_key: None,
            // The platform has no fixed address: the signature is the check.
            allow: vec!["0.0.0.0/0".into(), "::/0".into()],
            queue: "cx-callbacks.db".into(),
            max_skew_s: Int(300),
            max_body_bytes: Int(1024 * 1024),
            deliver_timeout_ms: Int(10_000),
            retry_for_s: Int(7 * 86_400),
        }
    }
}

/// One `[[callback]]` route.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Callback {
    pub name: Option<String>,
    pub path: Option<String>,
    pub app: Option<String>,
    pub key: Option<String>,
    pub key_env: Option<String>,
    pub key_file: Option<String>,
    pub deliver_to: Option<String>,
    pub ca_file: Option<String>,
}

/// A value written as a string or an integer (`corp_id = 10001`), kept as text: the
/// platform gets it as written.
#[derive(Debug)]
pub(super) struct Scalar(pub String);

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string or number")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                Ok(Scalar(v.to_owned()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Ok(Scalar(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// An integer in `MIN..=MAX`.
#[derive(Debug, Clone, Copy)]
pub(super) struct Int<const MIN: i64, const MAX: i64>(pub i64);

impl<const MIN: i64, const MAX: i64> Int<MIN, MAX> {
    /// The value as the run-time type (in range, so it fits).
    pub fn get<T: TryFrom<i64> + Default>(self) -> T {
        T::try_from(self.0).unwrap_or_default()
    }
}

impl<'de, const MIN: i64, const MAX: i64> Deserialize<'de> for Int<MIN, MAX> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match i64::deserialize(d)? {
            v if (MIN..=MAX).contains(&v) => Ok(Int(v)),
            v => Err(de::Error::custom(format!(
                "{v} is out of range ({MIN}..={MAX})"
            ))),
        }
    }
}

/// A value written as a string and parsed from it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Parsed<T>(pub T);

/// What a string must be to parse as `Self`, for the message when it does not.
pub(super) trait FromText: Sized {
    /// Said after the quoted value: `"x" is not an IP:port address`.
    const NOT: &'static str;
    fn parse(s: &str) -> Option<Self>;
}

impl FromText for SocketAddr {
    const NOT: &'static str = "is not an IP:port address";
    fn parse(s: &str) -> Option<Self> {
        s.parse().ok()
    }
}

impl<'de, T: FromText> Deserialize<'de> for Parsed<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        T::parse(&s)
            .map(Parsed)
            .ok_or_else(|| de::Error::custom(format!("{s:?} {}", T::NOT)))
    }
}

/// What reading a file into `T` found: the value (each key serde refused replaced by its
/// default), `key: what is wrong` for each refused key and unknown key, and the refused keys.
pub(super) struct Read<T> {
    pub value: T,
    pub problems: Vec<(String, String)>,
    pub refused: Vec<String>,
}

/// Reads `table` into `T`. A key of the wrong type is reported and removed, and the table
/// read again, so one pass finds every such key (bounded: a table has finitely many keys).
/// Messages name the type found, never the value (it may be a secret).
pub(super) fn read<T: DeserializeOwned + Default>(mut table: Table) -> Read<T> {
    let mut problems = Vec::new();
    let mut refused = Vec::new();
    not_tables(&mut table, &mut problems, &mut refused);
    let mut root = Value::Table(table);
    loop {
        let mut unknown = Vec::new();
        let mut note = |path: serde_ignored::Path<'_>| unknown.push(ignored_key(&path));
        let de = serde_ignored::Deserializer::new(root.clone(), &mut note);
        match serde_path_to_error::deserialize::<_, T>(de) {
            Ok(value) => {
                problems.extend(unknown.into_iter().map(|k| (k, "unknown key".to_owned())));
                return Read {
                    value,
                    problems,
                    refused,
                };
            }
            Err(e) => {
                let segments: Vec<Seg<'_>> = e
                    .path()
                    .iter()
                    .filter_map(|s| match s {
                        serde_path_to_error::Segment::Map { key } => Some(Seg::Key(key)),
                        serde_path_to_error::Segment::Seq { index } => Some(Seg::Index(*index)),
                        _ => None,
                    })
                    .collect();
                let key = key_path(&segments);
                let found = lookup(&root, &segments).map_or("nothing", Value::type_str);
                problems.push((key.clone(), describe(e.inner().message(), found)));
                refused.push(key);
                if !remove(&mut root, &segments) {
                    return Read {
                        value: T::default(),
                        problems,
                        refused,
                    };
                }
            }
        }
    }
}

/// The keys that hold a table, and those that hold an array of tables (`[[app]]`).
const TABLES: [&str; 6] = [
    "server",
    "admin",
    "upstream",
    "token",
    "callbacks",
    "limits",
];
const TABLE_ARRAYS: [&str; 3] = ["app", "client", "callback"];

/// serde reads a struct from an array by position (`server = ["0.0.0.0:1"]` would set
/// `listen`): every value that must be a table and is not is refused here, with its key.
fn not_tables(table: &mut Table, problems: &mut Vec<(String, String)>, refused: &mut Vec<String>) {
    let mut refuse = |key: String, v: &Value, what: &str| {
        problems.push((
            key.clone(),
            format!("expected {what}, found {}", v.type_str()),
        ));
        refused.push(key);
    };
    for k in TABLES {
        if let Some(v) = table.get(k).filter(|v| !v.is_table()) {
            refuse(k.to_owned(), v, "a table");
            table.remove(k);
        }
    }
    if let Some(Value::Table(token)) = table.get_mut("token") {
        if let Some(v) = token.get("store").filter(|v| !v.is_table()) {
            refuse("token.store".to_owned(), v, "a table");
            token.remove("store");
        }
    }
    for k in TABLE_ARRAYS {
        match table.get(k) {
            Some(Value::Array(items)) => {
                if let Some((i, v)) = items.iter().enumerate().find(|(_, v)| !v.is_table()) {
                    refuse(format!("{k}[{i}]"), v, &format!("a table ([[{k}]])"));
                    table.remove(k);
                }
            }
            Some(Value::Table(_)) => {
                let what = format!("[[{k}]] tables");
                refuse(k.to_owned(), &Value::Table(Table::new()), &what);
                table.remove(k);
            }
            Some(v) => {
                refuse(k.to_owned(), v, &format!("[[{k}]] tables"));
                table.remove(k);
            }
            None => {}
        }
    }
}

/// One step of a key path.
enum Seg<'a> {
    Key(&'a str),
    Index(usize),
}

/// `app[0].name`, as messages name keys.
fn key_path(segments: &[Seg<'_>]) -> String {
    let mut out = String::new();
    for s in segments {
        match s {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(&key(k));
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

/// A key as TOML writes it: bare when it can be, else quoted and escaped (so a key holding
/// a dot or a line break cannot pass for another key or another message).
pub(super) fn key(k: &str) -> std::borrow::Cow<'_, str> {
    let bare = !k.is_empty()
        && k.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
    if bare {
        k.into()
    } else {
        format!("{k:?}").into()
    }
}

fn ignored_key(path: &serde_ignored::Path<'_>) -> String {
    let mut segs = Vec::new();
    let mut p = path;
    loop {
        match p {
            serde_ignored::Path::Root => break,
            serde_ignored::Path::Seq { parent, index } => {
                segs.push(Seg::Index(*index));
                p = parent;
            }
            serde_ignored::Path::Map { parent, key } => {
                segs.push(Seg::Key(key));
                p = parent;
            }
            serde_ignored::Path::Some { parent }
            | serde_ignored::Path::NewtypeStruct { parent }
            | serde_ignored::Path::NewtypeVariant { parent } => p = parent,
        }
    }
    segs.reverse();
    key_path(&segs)
}

fn lookup<'a>(root: &'a Value, segments: &[Seg<'_>]) -> Option<&'a Value> {
    segments.iter().try_fold(root, |v, s| match s {
        Seg::Key(k) => v.get(*k),
        Seg::Index(i) => v.get(*i),
    })
}

/// Removes the key a refused value sits under (for an array element, the whole array, so
/// the indices of the other messages stay true). False if there was nothing to remove.
fn remove(root: &mut Value, segments: &[Seg<'_>]) -> bool {
    let Some(at) = segments.iter().rposition(|s| matches!(s, Seg::Key(_))) else {
        return false;
    };
    let Seg::Key(key) = segments[at] else {
        return false;
    };
    let parent = segments[..at].iter().try_fold(root, |v, s| match s {
        Seg::Key(k) => v.get_mut(*k),
        Seg::Index(i) => v.get_mut(*i),
    });
    parent
        .and_then(Value::as_table_mut)
        .is_some_and(|t| t.remove(key).is_some())
}

/// serde's "invalid type: integer `5`, expected a string" as "expected a string, found
/// integer", in the words of TOML and without the value.
fn describe(message: &str, found: &str) -> String {
    let Some((_, expected)) = message.split_once(", expected ") else {
        return message.to_owned();
    };
    let expected = match expected {
        "i64" | "u64" => "an integer",
        "a sequence" => "an array",
        "a boolean" => "a boolean",
        e if e.starts_with("struct ") || e == "a map" => "a table",
        e => e,
    };
    format!("expected {expected}, found {found}")
}
