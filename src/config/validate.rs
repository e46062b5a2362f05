//! The second layer: the file's values turned into the run-time types of [`super`], every
//! problem gathered as `file: key: what is wrong`, secrets read from their sources.

use std::fmt::Display;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::header::HeaderName;
use http::uri::{Authority, Scheme};
use http::Uri;
use ipnet::IpNet;
use toml::Table;

use super::file::{self, File, Scalar, UpstreamOnly};
use super::{
    AdminConfig, AppConfig, CallbackRoute, CallbacksConfig, ClientConfig, Config, ConfigError,
    Credentials, EgressProxy, Inject, LimitRule, LimitsConfig, Loaded, ParamValue, SecretReader,
    SecretSource, ServerConfig, Shape, StoreConfig, System, TlsFiles, TokenConfig, UpstreamConfig,
};
use crate::platform::{self, code, AppKind};
use crate::secret::Secret;

/// Reads and checks a whole file.
/// The admin port's `allow` when the file gives none: this host only.
const LOOPBACK: [&str; 2] = ["127.0.0.1/32", "::1/128"];

pub(super) fn config(
    text: &str,
    name: &str,
    dir: Option<&Path>,
    secrets: &dyn SecretReader,
) -> Result<Loaded, ConfigError> {
    let read = file::read::<File>(parse_table(text, name)?);
    let mut c = Check::new(name, dir, secrets, read.problems, read.refused);
    let f = read.value;
    let server = c.server(f.server);
    let admin = match f.admin {
        None => None,
        Some(a) => {
            let allow = match &a.allow {
                Some(raw) => c.allow_list("admin.allow", raw),
                None => LOOPBACK.iter().filter_map(|n| n.parse().ok()).collect(),
            };
            match a.listen {
                None => c.fail(
                    "admin.listen",
                    "missing: the admin listener needs an address",
                ),
                Some(listen) => Some((listen, allow)),
            }
        }
    };
    let upstream = c.upstream(f.upstream);
    let token = c.token(f.token);
    let apps = c.apps(f.app, token.as_ref());
    let clients = c.clients(f.client);
    let (callbacks, routes) = c.callbacks(f.callbacks, f.callback, &apps);
    let limits = c.limits(f.limits);
    // Two listeners cannot share an address (port 0 picks a free one for each).
    let listens = [
        ("admin.listen", admin.as_ref().map(|a| a.0 .0)),
        ("callbacks.listen", callbacks.as_ref().map(|t| t.listen)),
    ];
    for (i, (key, addr)) in listens.iter().enumerate() {
        let Some(addr) = addr.filter(|a| a.port() != 0) else {
            continue;
        };
        let earlier = std::iter::once(("server.listen", Some(server.listen)))
            .chain(listens[..i].iter().copied())
            .find(|(_, other)| *other == Some(addr));
        if let Some((other, _)) = earlier {
            c.err(key, format!("{addr} is already {other}"));
        }
    }
    match (upstream, token) {
        (Some(upstream), Some(token)) if c.errors.is_empty() => Ok(Loaded {
            config: Config {
                source: name.to_owned(),
                server,
                admin: admin.map(|(listen, allow)| AdminConfig {
                    listen: listen.0,
                    allow,
                }),
                upstream,
                token,
                apps,
                clients,
                callbacks,
                routes,
                limits,
            },
            warnings: c.warnings,
        }),
        _ => Err(ConfigError { problems: c.errors }),
    }
}

/// Reads and checks only `[upstream]`.
pub(super) fn upstream_only(
    text: &str,
    name: &str,
    dir: Option<&Path>,
) -> Result<UpstreamConfig, ConfigError> {
    let mut table = parse_table(text, name)?;
    let only = Table::from_iter(table.remove("upstream").map(|u| ("upstream".to_owned(), u)));
    let read = file::read::<UpstreamOnly>(only);
    let mut c = Check::new(name, dir, &System, read.problems, read.refused);
    match c.upstream(read.value.upstream) {
        Some(u) if c.errors.is_empty() => Ok(u),
        _ => Err(ConfigError { problems: c.errors }),
    }
}

/// The file as a TOML table, or its syntax error as `file: key: line L, column C: what`
/// (the key when the error is on a `key = value` line, else `file: line L, column C: what`).
fn parse_table(text: &str, name: &str) -> Result<Table, ConfigError> {
    text.parse().map_err(|e: toml::de::Error| {
        let message = without_values(e.message().trim());
        // The parser's words for an integer past 64 bits name Rust types, not the problem.
        let message = if message.contains("as i128") || message.contains("value was too large") {
            format!("the number is too large (at most {})", i64::MAX)
        } else {
            message
        };
        let problem = match e.span() {
            None => format!("{name}: syntax: {message}"),
            Some(s) => {
                let before = &text[..s.start.min(text.len())];
                let line = before.matches('\n').count() + 1;
                let col = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
                let at = format!("line {line}, column {col}");
                match key_at(text, line) {
                    Some(key) => format!("{name}: {key}: {at}: {message}"),
                    None => format!("{name}: {at}: {message}"),
                }
            }
        };
        ConfigError {
            problems: vec![problem],
        }
    })
}

/// The key a `key = value` line (1-based `line`) sets, with its table as the problems of a
/// well-formed file name it (`limits.margin_ms`, `app[1].corp_id`); `None` for any other
/// line. Read from the raw lines: the file did not parse.
fn key_at(text: &str, line: usize) -> Option<String> {
    let bare = |k: &str| {
        let k = k.trim();
        (!k.is_empty()
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.')))
        .then(|| k.to_owned())
    };
    let lines: Vec<&str> = text.lines().collect();
    // A line inside a multi-line string is no key line (and may hold a secret).
    let above = lines.get(..line.checked_sub(1)?)?;
    let odd = |quotes: &str| {
        above
            .iter()
            .map(|l| l.matches(quotes).count())
            .sum::<usize>()
            % 2
            == 1
    };
    if odd("\"\"\"") || odd("'''") {
        return None;
    }
    let (key, _) = lines.get(line - 1)?.split_once('=')?;
    let key = bare(key)?;
    let mut table = None;
    let mut arrays: Vec<(String, usize)> = Vec::new();
    for l in above {
        // A header's name holds no `#`: what follows one is a comment.
        let l = l.split('#').next().unwrap_or_default().trim();
        if let Some(name) = l.strip_prefix("[[").and_then(|r| r.strip_suffix("]]")) {
            let name = bare(name)?;
            let n = match arrays.iter_mut().find(|(a, _)| *a == name) {
                Some((_, n)) => {
                    *n += 1;
                    *n
                }
                None => {
                    arrays.push((name.clone(), 0));
                    0
                }
            };
            table = Some(format!("{name}[{n}]"));
        } else if let Some(name) = l.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
            table = Some(bare(name)?);
        }
    }
    Some(match table {
        Some(t) => format!("{t}.{key}"),
        None => key,
    })
}

/// A TOML parser message with every `quoted` value left out (the value may be a secret).
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, part) in message.split('`').enumerate() {
        out.push_str(if i % 2 == 0 { part } else { "…" });
    }
    out
}

struct Check<'a> {
    /// Every well-formed `[[app]]` name, also of apps refused for other reasons (so a
    /// client or callback naming one is not a second problem).
    app_names: Vec<String>,
    file: &'a str,
    dir: Option<&'a Path>,
    secrets: &'a dyn SecretReader,
    errors: Vec<String>,
    warnings: Vec<String>,
    /// Keys whose value the first layer refused: their default stands in, unremarked.
    refused: Vec<String>,
}

impl<'a> Check<'a> {
    fn new(
        file: &'a str,
        dir: Option<&'a Path>,
        secrets: &'a dyn SecretReader,
        problems: Vec<(String, String)>,
        refused: Vec<String>,
    ) -> Self {
        let errors = problems
            .into_iter()
            .map(|(k, what)| format!("{file}: {k}: {what}"))
            .collect();
        Check {
            app_names: Vec::new(),
            file,
            dir,
            secrets,
            errors,
            warnings: Vec::new(),
            refused,
        }
    }

    fn err(&mut self, key: &str, what: impl Display) {
        // `corp_secret` is not missing when `corp_secret_env` was refused for its type.
        let refused = |r: &String| {
            r == key
                || r.strip_prefix(key)
                    .is_some_and(|rest| rest == "_env" || rest == "_file")
        };
        let line = format!("{}: {key}: {what}", self.file);
        // One problem found from two places (a code in [token] for two apps) shows once.
        if !self.refused.iter().any(refused) && !self.errors.contains(&line) {
            self.errors.push(line);
        }
    }

    /// Whether the first layer refused `key` or anything under it.
    fn refused_at(&self, key: &str) -> bool {
        self.refused.iter().any(|r| {
            r.strip_prefix(key)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['.', '[']))
        })
    }

    fn fail<T>(&mut self, key: &str, what: impl Display) -> Option<T> {
        self.err(key, what);
        None
    }

    fn warn(&mut self, key: &str, what: impl Display) {
        self.warnings.push(format!("{}: {key}: {what}", self.file));
    }

    /// A path as written, relative to the config file's folder, made absolute (so `check`
    /// prints where it really is).
    fn path(&self, p: &str) -> PathBuf {
        let p = PathBuf::from(p);
        let p = match self.dir {
            Some(dir) if p.is_relative() && !dir.as_os_str().is_empty() => dir.join(p),
            _ => p,
        };
        std::path::absolute(&p).unwrap_or(p)
    }

    fn file_path(&mut self, key: &str, p: Option<String>) -> Option<PathBuf> {
        let p = self.path(&p?);
        if let Err(e) = std::fs::metadata(&p) {
            self.err(key, format!("cannot read {}: {e}", p.display()));
        }
        Some(p)
    }

    /// A listener's `allow`: networks, at least one (an empty list would refuse everyone).
    fn allow_list(&mut self, key: &str, raw: &[String]) -> Vec<IpNet> {
        if raw.is_empty() && !self.refused_at(key) {
            self.err(
                key,
                "is empty: nobody could connect; list the networks allowed (0.0.0.0/0 and ::/0 for all)",
            );
        }
        self.networks(key, raw)
    }

    fn networks(&mut self, key: &str, raw: &[String]) -> Vec<IpNet> {
        let mut out = Vec::with_capacity(raw.len());
        for (i, n) in raw.iter().enumerate() {
            // A bare address means that one host.
            let net = n.parse().or_else(|_| n.parse::<IpAddr>().map(IpNet::from));
            match net {
                // Clients are compared as IPv4 when they come IPv4-mapped (`::ffff:a.b.c.d`),
                // so a mapped network is taken as the IPv4 one it holds.
                Ok(IpNet::V6(v6))
                    if v6.prefix_len() >= 96 && v6.addr().to_ipv4_mapped().is_some() =>
                {
                    let v4 = v6.addr().to_ipv4_mapped().map(|a| {
                        ipnet::Ipv4Net::new(a, v6.prefix_len() - 96).map(|n| IpNet::V4(n.trunc()))
                    });
                    match v4 {
                        Some(Ok(net)) => out.push(net),
                        _ => out.push(IpNet::V6(v6)),
                    }
                }
                Ok(net) => out.push(net),
                Err(_) => self.err(
                    &format!("{key}[{i}]"),
                    format!("{n:?} is not a network (CIDR such as 10.0.0.0/8)"),
                ),
            }
        }
        out
    }

    /// An `invalid_codes` list: none of them a code that never means "token rejected".
    fn codes(&mut self, key: &str, codes: &[i64]) {
        for (i, c) in codes.iter().enumerate() {
            if code::NEVER_REJECTION.contains(c) {
                self.err(
                    &format!("{key}[{i}]"),
                    format!(
                        "{c} is never a token rejection (success or the platform's rate \
                         limit: a new token would not help)"
                    ),
                );
            }
        }
    }

    /// A secret given as `{base}_env`, `{base}_file` or `{base}` (inline), at most one.
    fn secret(
        &mut self,
        at: &str,
        base: &str,
        [env, file, inline]: [Option<String>; 3],
        required: bool,
    ) -> Option<ParamValue> {
        let key = format!("{at}.{base}");
        for (given, suffix) in [(&env, "_env"), (&file, "_file")] {
            if given.as_deref() == Some("") {
                return self.fail(&format!("{key}{suffix}"), "is empty");
            }
        }
        match (env, file, inline) {
            (Some(var), None, None) => self.secret_from(&format!("{key}_env"), Err(var)),
            (None, Some(path), None) => self.secret_from(&format!("{key}_file"), Ok(path)),
            (None, None, Some(v)) if v.is_empty() => {
                self.err(&key, "is empty");
                None
            }
            (None, None, Some(v)) => {
                let what =
                    format!("secret written in the config file; prefer {base}_env or {base}_file");
                self.warn(&key, what);
                Some(ParamValue::Secret(Secret::new(v), SecretSource::Inline))
            }
            (None, None, None) => {
                if required {
                    self.err(
                        &key,
                        format!("missing: set {base}_env, {base}_file or {base}"),
                    );
                }
                None
            }
            _ => {
                self.err(
                    &key,
                    format!("give only one of {base}_env, {base}_file, {base}"),
                );
                None
            }
        }
    }

    /// A secret from a file (`Ok(path)`) or an environment variable (`Err(name)`).
    fn secret_from(&mut self, key: &str, from: Result<String, String>) -> Option<ParamValue> {
        let (read, source) = match from {
            Ok(path) => {
                let path = self.path(&path);
                let read = self
                    .secrets
                    .read(&path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()));
                (read, SecretSource::File(path))
            }
            Err(var) => {
                let read = self
                    .secrets
                    .var(&var)
                    .ok_or(format!("environment variable {var} is not set"));
                (read, SecretSource::Env(var))
            }
        };
        let value = match read {
            Ok(v) => v.trim_end_matches(['\r', '\n']).to_owned(),
            Err(what) => {
                self.err(key, what);
                return None;
            }
        };
        if value.is_empty() {
            match &source {
                SecretSource::Env(var) => {
                    self.err(key, format!("environment variable {var} is empty"))
                }
                other => self.err(
                    key,
                    format!("{} is empty", other.to_string().trim_start_matches("file ")),
                ),
            }
            return None;
        }
        Some(ParamValue::Secret(Secret::new(value), source))
    }

    /// `tls_cert` and `tls_key` of table `at` (with `client_ca`, for mTLS): both or none.
    fn tls(&mut self, at: &str, [cert, key, ca]: [Option<String>; 3]) -> Option<TlsFiles> {
        let cert = self.file_path(&format!("{at}.tls_cert"), cert);
        let key = self.file_path(&format!("{at}.tls_key"), key);
        let client_ca = self.file_path(&format!("{at}.client_ca"), ca);
        match (cert, key) {
            (Some(cert), Some(key)) => Some(TlsFiles {
                cert,
                key,
                client_ca,
            }),
            (Some(_), None) => self.fail(
                &format!("{at}.tls_key"),
                "missing: tls_cert is set, so tls_key must be too",
            ),
            (None, Some(_)) => self.fail(
                &format!("{at}.tls_cert"),
                "missing: tls_key is set, so tls_cert must be too",
            ),
            (None, None) if client_ca.is_some() => self.fail(
                &format!("{at}.client_ca"),
                "needs tls_cert and tls_key (mTLS runs over TLS)",
            ),
            (None, None) => None,
        }
    }

    fn server(&mut self, s: file::Server) -> ServerConfig {
        let tls = self.tls("server", [s.tls_cert, s.tls_key, s.client_ca]);
        ServerConfig {
            listen: s.listen.0,
            tls,
            allow: self.allow_list("server.allow", &s.allow),
            max_body_bytes: s.max_body_bytes.get(),
            shutdown_grace: Duration::from_secs(s.shutdown_grace_s.get()),
            max_concurrent_requests: s.max_concurrent_requests.get(),
            workers: s.workers.get(),
        }
    }

    fn upstream(&mut self, u: file::Upstream) -> Option<UpstreamConfig> {
        let ca_file = self.file_path("upstream.ca_file", u.ca_file);
        let (scheme, authority, base_path) = match parse_upstream_url(&u.url) {
            Ok(parts) => parts,
            Err(what) => return self.fail("upstream.url", format!("{:?} {what}", u.url)),
        };
        let (proxy, proxy_source) = self.egress(u.proxy, &authority);
        Some(UpstreamConfig {
            url: u.url,
            scheme,
            authority,
            base_path,
            ca_file,
            proxy,
            proxy_source,
            connect_timeout: Duration::from_millis(u.connect_timeout_ms.get()),
            timeout: Duration::from_millis(u.timeout_ms.get()),
            max_connections: u.max_connections.get(),
        })
    }

    /// The egress proxy for the platform at `platform` and how it was chosen: `upstream.proxy`
    /// when the key is there (`""`: direct), else `https_proxy` / `HTTPS_PROXY` / `all_proxy`
    /// / `ALL_PROXY` unless `no_proxy` / `NO_PROXY` names the host, as curl reads them.
    fn egress(
        &mut self,
        configured: Option<String>,
        platform: &Authority,
    ) -> (Option<EgressProxy>, String) {
        let first = |names: &[&'static str]| {
            names.iter().find_map(|&n| {
                self.secrets
                    .var(n)
                    .filter(|v| !v.is_empty())
                    .map(|v| (n, v))
            })
        };
        let (key, url) = match configured {
            Some(url) if url.is_empty() => {
                return (None, "none (upstream.proxy = \"\": direct)".into())
            }
            Some(url) => ("upstream.proxy", url),
            None => match first(&["https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"]) {
                None => {
                    return (
                        None,
                        "none (direct; no upstream.proxy, no HTTPS_PROXY)".into(),
                    )
                }
                Some((name, url)) => {
                    let no = first(&["no_proxy", "NO_PROXY"]);
                    let dst: http::Uri = match format!("https://{platform}/").parse() {
                        Ok(u) => u,
                        Err(_) => return (None, "none".into()),
                    };
                    // Whether NO_PROXY names the host, asked with a proxy that surely parses
                    // (the one given is judged below, with its own message).
                    let matcher = hyper_util::client::proxy::matcher::Matcher::builder()
                        .https("http://proxy.invalid:1")
                        .no(no.as_ref().map_or(String::new(), |(_, v)| v.clone()))
                        .build();
                    // curl's `*` (every host) covers addresses too, unlike the matcher's.
                    let every = no
                        .as_ref()
                        .is_some_and(|(_, v)| v.split(',').any(|h| h.trim() == "*"));
                    if every || matcher.intercept(&dst).is_none() {
                        if let Some((no_name, _)) = no {
                            let host = platform.host();
                            return (None, format!("none ({host} is in {no_name}: direct)"));
                        }
                    }
                    (name, url)
                }
            },
        };
        match parse_egress(&url) {
            Ok(p) => {
                let source = if key == "upstream.proxy" {
                    if p.password {
                        self.warn(
                            "upstream.proxy",
                            "a password written in the config file; prefer HTTPS_PROXY in the \
                             service's environment (e.g. /etc/cx-proxy/env, mode 0600)",
                        );
                    }
                    "from the file".to_owned()
                } else {
                    format!("from {key}")
                };
                (Some(p), source)
            }
            Err(what) => {
                // The URL may hold a password: only its scheme and host are repeated.
                let key = if key == "upstream.proxy" {
                    key.to_owned()
                } else {
                    format!("upstream.proxy (from {key})")
                };
                self.err(&key, what);
                (None, String::new())
            }
        }
    }

    fn token(&mut self, t: file::Token) -> Option<TokenConfig> {
        if !t.path.starts_with('/') {
            self.err("token.path", format!("{:?} must start with /", t.path));
        }
        if let Some(codes) = &t.invalid_codes {
            self.codes("token.invalid_codes", codes);
        }
        let store = t.store.and_then(|st| match st.redis_url {
            Some(u) if u.starts_with("redis://") || u.starts_with("rediss://") => {
                Some(StoreConfig {
                    redis_url: Secret::new(u),
                    lease: st.lease_ms.map(|ms| Duration::from_millis(ms.get())),
                })
            }
            Some(_) => self.fail(
                "token.store.redis_url",
                "must start with redis:// or rediss://",
            ),
            None => self.fail("token.store.redis_url", "missing"),
        });
        let inject = match t.inject.as_str() {
            "query" => {
                let p = &t.param;
                if p.is_empty() || p.contains(['&', '=', '#', ' ']) {
                    self.err(
                        "token.param",
                        format!("{p:?} is not a usable query parameter name"),
                    );
                }
                Inject::Query { param: t.param }
            }
            "header" => {
                let name = HeaderName::from_bytes(t.header.as_bytes());
                if name.is_err() {
                    self.err(
                        "token.header",
                        format!("{:?} is not a valid header name", t.header),
                    );
                }
                let split = t.header_format.split_once("{token}");
                if split.is_none() {
                    self.err(
                        "token.header_format",
                        format!("{:?} must contain {{token}}", t.header_format),
                    );
                }
                let ((prefix, suffix), name) = split.zip(name.ok())?;
                Inject::Header {
                    name,
                    prefix: prefix.to_owned(),
                    suffix: suffix.to_owned(),
                }
            }
            other => {
                return self.fail(
                    "token.inject",
                    format!("{other:?} is not \"query\" or \"header\""),
                )
            }
        };
        Some(TokenConfig {
            refresh_ahead: Duration::from_secs(t.refresh_ahead_s.get()),
            max_fetches_per_minute: t.max_fetches_per_minute.get(),
            path: t.path,
            inject,
            invalid_codes: t.invalid_codes,
            store,
        })
    }

    fn apps(&mut self, raw: Vec<file::App>, token: Option<&TokenConfig>) -> Vec<AppConfig> {
        if raw.is_empty() {
            self.err("app", "missing: configure at least one [[app]]");
        }
        let mut apps: Vec<AppConfig> = Vec::with_capacity(raw.len());
        let (mut names, mut prefixes) = (Vec::new(), Vec::new());
        for (i, mut a) in raw.into_iter().enumerate() {
            let at = format!("app[{i}]");
            let name_key = format!("{at}.name");
            let name = self.name(&name_key, a.name.take(), names.iter(), "app");
            names.extend(name.clone());
            self.app_names.extend(name.clone());
            let prefix = a.prefix.take().map(|p| {
                let p = if p.len() > 1 {
                    p.trim_end_matches('/').to_owned()
                } else {
                    p
                };
                let bad = !p.starts_with('/')
                    || p.contains(['?', '#'])
                    || p.split('/').any(|seg| seg == ".." || seg == ".");
                if bad {
                    self.err(
                        &format!("{at}.prefix"),
                        format!(
                            "{p:?} must be a path starting with /, without ?, # or dot segments"
                        ),
                    );
                } else if prefixes.contains(&p) {
                    self.err(
                        &format!("{at}.prefix"),
                        format!("{p:?} is used by another app"),
                    );
                }
                prefixes.push(p.clone());
                p
            });
            if let Some(tp) = a.token_path.as_ref().filter(|tp| !tp.starts_with('/')) {
                self.err(
                    &format!("{at}.token_path"),
                    format!("{tp:?} must start with /"),
                );
            }
            if let Some(codes) = &a.invalid_codes {
                self.codes(&format!("{at}.invalid_codes"), codes);
            }
            let kind = match a.kind.as_deref() {
                None | Some("app") => Some(AppKind::App),
                Some("corp-service") => Some(AppKind::CorpService),
                Some(other) => {
                    let what = format!("{other:?} is not \"app\" or \"corp-service\"");
                    self.err(&format!("{at}.kind"), what);
                    None
                }
            };
            // With the kind unknown, which credentials belong is unknown too: no more complaint.
            // A kind or token_params refused for its type leaves unknown which credentials
            // belong: no more complaint about them.
            let unsure = self.refused_at(&format!("{at}.kind"))
                || self.refused_at(&format!("{at}.token_params"));
            let credentials = kind
                .filter(|_| !unsure)
                .and_then(|kind| self.credentials(&at, kind, &mut a));
            let kind = kind.unwrap_or_default();
            let invalid_codes = a
                .invalid_codes
                .clone()
                .or_else(|| token.and_then(|t| t.invalid_codes.clone()))
                .unwrap_or_else(|| kind.invalid_codes().to_vec());
            if kind == AppKind::CorpService && invalid_codes.contains(&code::BAD_CREDENTIALS) {
                let key = match a.invalid_codes {
                    Some(_) => format!("{at}.invalid_codes"),
                    None => "token.invalid_codes".to_owned(),
                };
                self.err(
                    &key,
                    "40001 means bad credentials on organisation-service APIs, never a rejected \
                     token: replaying on it would fetch in a loop",
                );
            }
            let (Some(name), Some(credentials)) = (name, credentials) else {
                continue;
            };
            let token_path = a.token_path.unwrap_or_else(|| match kind {
                AppKind::App => token
                    .map_or(super::DEFAULT_TOKEN_PATH, |t| &t.path)
                    .to_owned(),
                AppKind::CorpService => platform::CORP_TOKEN_PATH.to_owned(),
            });
            // The same request in any order of its parameters, at any spelling of its path a
            // lenient server would serve (a trailing `/`, letter case), whatever its secret.
            let twin = apps.iter().find(|o| {
                platform::same_path(&o.token_path, &token_path)
                    && same_identity(&o.credentials, &credentials)
            });
            if let Some(other) = twin {
                let what = format!(
                    "app {name:?} has the same credentials as app {:?}: each fetch would \
                     invalidate the other's token",
                    other.name
                );
                self.err(&name_key, what);
            }
            apps.push(AppConfig {
                name,
                prefix,
                kind,
                token_path,
                invalid_codes,
                credentials,
            });
        }
        apps
    }

    /// The token request's parameters of app `at`, taken out of `a`.
    fn credentials(&mut self, at: &str, kind: AppKind, a: &mut file::App) -> Option<Credentials> {
        if let Some(params) = a.token_params.take() {
            let given = [
                ("app_key", a.app_key.is_some()),
                ("corp_id", a.corp_id.is_some()),
                ("corp_secret", a.corp_secret.is_some()),
                ("corp_secret_env", a.corp_secret_env.is_some()),
                ("corp_secret_file", a.corp_secret_file.is_some()),
                ("corp_authorization", a.corp_authorization.is_some()),
                ("corp_authorization_env", a.corp_authorization_env.is_some()),
                (
                    "corp_authorization_file",
                    a.corp_authorization_file.is_some(),
                ),
            ];
            for (k, _) in given.iter().filter(|g| g.1) {
                self.err(
                    &format!("{at}.{k}"),
                    "not allowed with token_params (which replace it)",
                );
            }
            return self.token_params(&format!("{at}.token_params"), params);
        }
        let app_key = match (kind, a.app_key.take()) {
            (AppKind::App, None) => {
                self.err(&format!("{at}.app_key"), "missing");
                None
            }
            (AppKind::App, Some(k)) if k.is_empty() => {
                self.fail(&format!("{at}.app_key"), "is empty")
            }
            (AppKind::App, app_key) => app_key,
            (AppKind::CorpService, Some(_)) => {
                self.err(
                    &format!("{at}.app_key"),
                    "not used by kind = \"corp-service\" apps (their token is asked for with \
                     corp_id and corp_secret)",
                );
                None
            }
            (AppKind::CorpService, None) => None,
        };
        let corp_id = match a.corp_id.take() {
            Some(Scalar(v)) if v.is_empty() => {
                self.err(&format!("{at}.corp_id"), "is empty");
                None
            }
            None => {
                self.err(&format!("{at}.corp_id"), "missing");
                None
            }
            Some(Scalar(v)) => Some(v),
        };
        let corp_secret = [
            a.corp_secret_env.take(),
            a.corp_secret_file.take(),
            a.corp_secret.take(),
        ];
        let secret = self.secret(at, "corp_secret", corp_secret, true);
        let plain = |k: &str, v: String| (k.to_owned(), ParamValue::Plain(v));
        let params = match kind {
            AppKind::App => vec![
                plain("app_key", app_key?),
                plain("corp_id", corp_id?),
                ("corp_secret".into(), secret?),
            ],
            AppKind::CorpService => {
                let auth = [
                    a.corp_authorization_env.take(),
                    a.corp_authorization_file.take(),
                    a.corp_authorization.take(),
                ];
                let auth = self.secret(at, "corp_authorization", auth, false);
                let mut p = vec![plain("corp_id", corp_id?), ("corp_secret".into(), secret?)];
                p.extend(auth.map(|a| ("corp_authorization".to_owned(), a)));
                p
            }
        };
        let shape = match kind {
            AppKind::App => Shape::Standard,
            AppKind::CorpService => Shape::Corp,
        };
        Some(Credentials { shape, params })
    }

    /// `[app.token_params]`: a name ending in `_env` or `_file` reads a secret and is sent
    /// without the suffix.
    fn token_params(
        &mut self,
        at: &str,
        raw: std::collections::BTreeMap<String, Scalar>,
    ) -> Option<Credentials> {
        if raw.is_empty() {
            if !self.refused_at(at) {
                self.err(at, "is empty: give the token request's parameters");
            }
            return None;
        }
        let mut params: Vec<(String, ParamValue)> = Vec::with_capacity(raw.len());
        let mut ok = true;
        for (k, Scalar(text)) in raw {
            let key = format!("{at}.{}", file::key(&k));
            let (name, value) = if let Some(name) = k.strip_suffix("_env") {
                (name, self.secret_from(&key, Err(text)))
            } else if let Some(name) = k.strip_suffix("_file") {
                (name, self.secret_from(&key, Ok(text)))
            } else {
                (k.as_str(), Some(ParamValue::Plain(text)))
            };
            if name.is_empty() {
                self.err(&key, "is not a parameter name");
                ok = false;
            } else if params.iter().any(|(n, _)| n == name) {
                let what = format!("sends {name}, which another key of the table sends too");
                self.err(&key, what);
                ok = false;
            } else {
                match value {
                    Some(v) => params.push((name.to_owned(), v)),
                    None => ok = false,
                }
            }
        }
        ok.then_some(Credentials {
            shape: Shape::Params,
            params,
        })
    }

    /// `[callbacks]` and its `[[callback]]` routes (SPEC section 3).
    fn callbacks(
        &mut self,
        table: Option<file::Callbacks>,
        raw: Vec<file::Callback>,
        apps: &[AppConfig],
    ) -> (Option<CallbacksConfig>, Vec<CallbackRoute>) {
        let present = table.is_some();
        let callbacks = table.and_then(|t| {
            let queue = self.path(&t.queue);
            if t.queue.is_empty() {
                self.err(
                    "callbacks.queue",
                    "is empty: name the queue's database file",
                );
            } else if queue.is_dir() {
                self.err(
                    "callbacks.queue",
                    format!("{} is a folder: name a file in it", queue.display()),
                );
            } else if let Some(folder) = queue.parent().filter(|d| !d.is_dir()) {
                let what = format!(
                    "{}: the folder does not exist (the queue file is created in it)",
                    folder.display()
                );
                self.err("callbacks.queue", what);
            }
            let tls = self.tls("callbacks", [t.tls_cert, t.tls_key, None]);
            let listen = match t.listen {
                Some(listen) => listen.0,
                None => {
                    return self.fail(
                        "callbacks.listen",
                        "missing: the callback listener needs an address",
                    )
                }
            };
            Some(CallbacksConfig {
                listen,
                tls,
                allow: self.allow_list("callbacks.allow", &t.allow),
                queue,
                max_skew: Duration::from_secs(t.max_skew_s.get()),
                max_body_bytes: t.max_body_bytes.get(),
                deliver_timeout: Duration::from_millis(t.deliver_timeout_ms.get()),
                retry_for: Duration::from_secs(t.retry_for_s.get()),
            })
        });
        if !present && !raw.is_empty() {
            self.err(
                "callback",
                "needs a [callbacks] table with the listener's address",
            );
        }
        let mut routes: Vec<CallbackRoute> = Vec::with_capacity(raw.len());
        let (mut names, mut paths) = (Vec::new(), Vec::new());
        for (i, r) in raw.into_iter().enumerate() {
            let at = format!("callback[{i}]");
            let name = self.name(&format!("{at}.name"), r.name, names.iter(), "callback");
            names.extend(name.clone());
            let path = match r.path {
                Some(p) if !p.starts_with('/') || p.contains(['?', '#']) => self.fail(
                    &format!("{at}.path"),
                    format!("{p:?} must be a path starting with /"),
                ),
                Some(p) if paths.contains(&p) => self.fail(
                    &format!("{at}.path"),
                    format!("{p:?} is used by another callback"),
                ),
                Some(p) => Some(p),
                None => self.fail(&format!("{at}.path"), "missing"),
            };
            paths.extend(path.clone());
            let app = match r.app {
                None => self.fail(&format!("{at}.app"), "missing"),
                // An app refused for another reason is not a second problem here.
                Some(a) if self.app_names.contains(&a) && !apps.iter().any(|app| app.name == a) => {
                    None
                }
                Some(a) => match apps.iter().find(|app| app.name == a) {
                    None => self.fail(&format!("{at}.app"), format!("no [[app]] is named {a:?}")),
                    Some(app) => match app
                        .credentials
                        .naming()
                        .into_iter()
                        .find(|(k, _)| *k == "corp_id")
                    {
                        Some((_, corp_id)) => Some((a, corp_id.to_owned())),
                        None => self.fail(
                            &format!("{at}.app"),
                            format!(
                                "app {a:?} has no corp_id to check the callbacks' corpid against"
                            ),
                        ),
                    },
                },
            };
            let key = self.secret(&at, "key", [r.key_env, r.key_file, r.key], true);
            let deliver_to = match r.deliver_to.as_deref().map(|u| (u, u.parse::<http::Uri>())) {
                None => self.fail(&format!("{at}.deliver_to"), "missing"),
                Some((u, Ok(uri)))
                    if matches!(uri.scheme_str(), Some("http" | "https"))
                        && uri.host().is_some_and(|h| !h.is_empty())
                        && usable_port(&uri)
                        && !u.contains(['#', '@'])
                        && uri.query().is_none() =>
                {
                    Some(u.to_owned())
                }
                // Not echoed: it might carry a password.
                Some(_) => self.fail(
                    &format!("{at}.deliver_to"),
                    "is not an http:// or https:// URL (host, optional port and path; no user, \
                     query or fragment)",
                ),
            };
            let ca_file = self.file_path(&format!("{at}.ca_file"), r.ca_file);
            if let (Some(name), Some(path), Some((app, corp_id)), Some(key), Some(deliver_to)) =
                (name, path, app, key, deliver_to)
            {
                routes.push(CallbackRoute {
                    name,
                    path,
                    app,
                    corp_id,
                    key,
                    deliver_to,
                    ca_file,
                });
            }
        }
        (callbacks, routes)
    }

    /// `[limits]` and its rules.
    fn limits(&mut self, l: file::Limits) -> LimitsConfig {
        let mut rules: Vec<LimitRule> = Vec::with_capacity(l.rule.len());
        for (i, r) in l.rule.into_iter().enumerate() {
            let at = format!("limits.rule[{i}]");
            let method = match r.method {
                Some(m) if m.eq_ignore_ascii_case("CONNECT") => self.fail(
                    &format!("{at}.method"),
                    "CONNECT is never forwarded (the proxy answers it 405), so the rule would \
                     count nothing",
                ),
                Some(m) if !m.is_empty() && m.bytes().all(|b| b.is_ascii_alphabetic()) => {
                    Some(m.to_ascii_uppercase())
                }
                Some(m) => self.fail(
                    &format!("{at}.method"),
                    format!("{m:?} is not an HTTP method"),
                ),
                None => self.fail(&format!("{at}.method"), "missing"),
            };
            let path = match r.path.map(|p| (pattern_problem(&p), p)) {
                Some((None, p)) => {
                    // A trailing `/` is matched either way (as a lenient server reads paths).
                    let trimmed = if p.len() > 1 {
                        p.trim_end_matches('/')
                    } else {
                        &p
                    };
                    Some(trimmed.to_owned())
                }
                Some((Some(why), p)) => self.fail(&format!("{at}.path"), format!("{p:?} {why}")),
                None => self.fail(&format!("{at}.path"), "missing"),
            };
            let rate = match r.rate.as_deref().map(|t| (t, LimitRule::parse_rate(t))) {
                Some((_, Some(rate))) => Some(rate),
                Some((t, None)) => self.fail(
                    &format!("{at}.rate"),
                    format!("{t:?} is not N/s, N/min, N/h or N/d with N at least 1"),
                ),
                None => self.fail(&format!("{at}.rate"), "missing"),
            };
            let (Some(method), Some(path), Some(rate)) = (method, path, rate) else {
                continue;
            };
            let same = |o: &LimitRule| o.method == method && platform::same_pattern(&o.path, &path);
            if rules.iter().any(same) {
                self.err(
                    &format!("{at}.path"),
                    "another rule has this method and path pattern",
                );
                continue;
            }
            rules.push(LimitRule { method, path, rate });
        }
        LimitsConfig {
            enabled: l.enabled,
            max_wait: Duration::from_millis(l.max_wait_ms.get()),
            margin: Duration::from_millis(l.margin_ms.get()),
            rules,
        }
    }

    /// A name (of an app or a callback): present, letters, digits, `-`, `_` or `.`, unique
    /// among `taken`.
    fn name<'n>(
        &mut self,
        key: &str,
        name: Option<String>,
        mut taken: impl Iterator<Item = &'n String>,
        what: &str,
    ) -> Option<String> {
        match name {
            None => self.fail(key, "missing"),
            Some(n)
                if n.is_empty()
                    || !n
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) =>
            {
                self.fail(
                    key,
                    format!("{n:?} must be non-empty letters, digits, '-', '_' or '.'"),
                )
            }
            Some(n) if taken.any(|t| *t == n) => {
                self.fail(key, format!("{n:?} is used by another {what}"))
            }
            Some(n) => Some(n),
        }
    }

    fn clients(&mut self, raw: Vec<file::Client>) -> Vec<ClientConfig> {
        let mut out = Vec::new();
        for (i, c) in raw.into_iter().enumerate() {
            let at = format!("client[{i}]");
            let taken: Vec<String> = out.iter().map(|c: &ClientConfig| c.name.clone()).collect();
            let name = self.name(&format!("{at}.name"), c.name, taken.iter(), "client");
            let networks = self.networks(&format!("{at}.networks"), &c.networks);
            let unsure = self.refused_at(&format!("{at}.networks"))
                || self.refused_at(&format!("{at}.cert_names"));
            if c.networks.is_empty() && c.cert_names.is_empty() && !unsure {
                self.err(&at, "needs networks or cert_names to identify the client");
            }
            for (j, n) in c.cert_names.iter().enumerate() {
                if n.is_empty() || n.contains(|ch: char| ch.is_whitespace() || ch.is_control()) {
                    self.err(
                        &format!("{at}.cert_names[{j}]"),
                        format!("{n:?} is not a DNS name"),
                    );
                }
            }
            if c.apps.is_empty() && !self.refused_at(&format!("{at}.apps")) {
                self.err(
                    &format!("{at}.apps"),
                    "grants no app: name the apps this client may use",
                );
            }
            for (j, a) in c.apps.iter().enumerate() {
                if !self.app_names.contains(a) {
                    self.err(
                        &format!("{at}.apps[{j}]"),
                        format!("no [[app]] is named {a:?}"),
                    );
                }
            }
            if c.paths.as_ref().is_some_and(Vec::is_empty) {
                self.err(
                    &format!("{at}.paths"),
                    "grants no path: list path prefixes, or leave paths out for every path",
                );
            }
            for (j, p) in c.paths.iter().flatten().enumerate() {
                if !p.starts_with('/') {
                    self.err(
                        &format!("{at}.paths[{j}]"),
                        format!("{p:?} must start with /"),
                    );
                }
            }
            if let Some(name) = name {
                out.push(ClientConfig {
                    name,
                    networks,
                    cert_names: c.cert_names,
                    apps: c.apps,
                    paths: c.paths,
                });
            }
        }
        out
    }
}

/// Whether two token requests name the same app at the platform: the same parameter names,
/// and the same values but for secrets (read from a secret source, or named like one), whose
/// value does not change whose token a fetch replaces.
fn same_identity(a: &Credentials, b: &Credentials) -> bool {
    fn params(c: &Credentials) -> Vec<(&str, Option<&str>)> {
        let mut p: Vec<(&str, Option<&str>)> = c
            .params
            .iter()
            .map(|(k, v)| match v {
                ParamValue::Plain(v) if !k.to_ascii_lowercase().contains("secret") => {
                    (k.as_str(), Some(v.as_str()))
                }
                _ => (k.as_str(), None),
            })
            .collect();
        p.sort();
        p
    }
    let (a, b) = (params(a), params(b));
    a.len() == b.len()
        && a.iter()
            .zip(&b)
            .all(|((ka, va), (kb, vb))| ka == kb && (va.is_none() || vb.is_none() || va == vb))
}

/// Whether a URL's port, if it has one, is one a connection can go to (1 to 65535).
fn usable_port(uri: &Uri) -> bool {
    let Some(authority) = uri.authority() else {
        return false;
    };
    match authority.as_str().rsplit_once(':') {
        // An IPv6 literal's colons are inside brackets.
        Some((_, port)) if !port.ends_with(']') => port.parse::<u16>().is_ok_and(|p| p > 0),
        _ => true,
    }
}

/// An egress proxy URL (`http://[user[:password]@]host[:port]`, the scheme optional and
/// the userinfo percent-decoded as curl takes them, through hyper-util's proxy matcher; the
/// port 1080 when missing, curl's default); `Err` says what is wrong without repeating the
/// URL, which may hold a password.
fn parse_egress(url: &str) -> Result<EgressProxy, String> {
    const SHAPE: &str = "http://[user:password@]host:port";
    // The URL's authority as written: a raw `@` in the user or password would be split at
    // the first `@`, sending part of the password as the proxy's address (and showing it).
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let written = rest.split(['/', '?', '#']).next().unwrap_or("");
    let userinfo = match written.matches('@').count() {
        0 => None,
        1 => written.split_once('@').map(|(info, _)| info),
        _ => {
            return Err(format!(
                "the user or password holds a raw '@': write it as %40 ({SHAPE})"
            ))
        }
    };
    let dst = http::Uri::from_static("https://platform.invalid/");
    let intercept = hyper_util::client::proxy::matcher::Matcher::builder()
        .https(url)
        .build()
        .intercept(&dst)
        .ok_or_else(|| format!("is not a usable proxy URL ({SHAPE})"))?;
    let uri = intercept.uri();
    if uri.scheme() != Some(&Scheme::HTTP) {
        let scheme = uri.scheme_str().unwrap_or("?");
        return Err(format!(
            "{scheme}:// proxies are not supported: give an HTTP proxy that speaks CONNECT ({SHAPE})"
        ));
    }
    let authority = uri
        .authority()
        .ok_or_else(|| format!("has no host ({SHAPE})"))?;
    let authority: Authority = match authority.port() {
        Some(_) => authority.clone(),
        None => format!("{authority}:1080")
            .parse()
            .map_err(|_| format!("has no usable host and port ({SHAPE})"))?,
    };
    if authority.host().is_empty() || authority.port_u16() == Some(0) {
        return Err(format!("has no usable host and port ({SHAPE})"));
    }
    let authorization = intercept.basic_auth().cloned().map(|mut v| {
        v.set_sensitive(true);
        v
    });
    // The user is shown by `check` as written; the password never is.
    let user = userinfo.map(|info| info.split_once(':').map_or(info, |(u, _)| u).to_owned());
    let password = userinfo.is_some_and(|info| info.contains(':'));
    Ok(EgressProxy {
        authority,
        user,
        password,
        authorization,
    })
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
    if !usable_port(&uri) {
        return Err("has no usable port (1 to 65535)");
    }
    if url.contains('#') {
        return Err("must not have a fragment");
    }
    if uri.query().is_some() {
        return Err("must not have a query");
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    Ok((scheme, authority, base_path))
}

/// Why a `[[limits.rule]]` path pattern could never match a forwarded path, if it could not:
/// it must start with `/`, hold no query, fragment, escape, space or backslash, no `.` or
/// `..` segment (forwarded paths have them resolved) and no empty one, at most
/// `platform::MAX_PATTERN_SEGMENTS` segments, and braces only as a whole `{name}` segment.
fn pattern_problem(p: &str) -> Option<String> {
    if !p.starts_with('/') {
        return Some("must be a path starting with /".into());
    }
    if let Some(c) = p
        .chars()
        .find(|c| !c.is_ascii_graphic() || matches!(c, '?' | '#' | '%' | '\\'))
    {
        return Some(format!(
            "holds {c:?}: a pattern is a plain path (no query, fragment, escape, space or \
             backslash)"
        ));
    }
    let body = p.trim_end_matches('/');
    let segments: Vec<&str> = body.split('/').skip(1).collect();
    if segments.len() + 1 > platform::MAX_PATTERN_SEGMENTS {
        return Some(format!(
            "has {} segments; a rule matches at most {}",
            segments.len(),
            platform::MAX_PATTERN_SEGMENTS - 1
        ));
    }
    for seg in segments {
        match seg {
            "" => return Some("has an empty segment (//)".into()),
            "." | ".." => {
                return Some(format!(
                    "has a {seg:?} segment; forwarded paths have them resolved, so it would \
                     match nothing"
                ))
            }
            _ if platform::is_placeholder(seg) && !seg[1..seg.len() - 1].contains(['{', '}']) => {}
            _ if seg.contains(['{', '}']) => {
                return Some(format!(
                    "has segment {seg:?}: a placeholder is a whole segment, {{name}}"
                ))
            }
            _ => {}
        }
    }
    None
}
