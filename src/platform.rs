//! What the Cheng-Xun platform documents, in one place: its token endpoints, its error codes
//! and its API families with their documented call rates (`PLATFORM.md` sections 1-3).
//!
//! The proxy reads the token codes and endpoints from here; the sandbox reads all of it to
//! behave as the platform does. Nothing here is guessed silently: where the documentation is
//! silent or cut off, the entry says so and the proxy makes it configurable.

use std::time::Duration;

/// The self-built app (组织自建应用) token endpoint: `GET ?app_key=&corp_id=&corp_secret=`.
pub const APP_TOKEN_PATH: &str = "/api/apps/v1/access-tokens";
/// The organisation-service (组织服务) token endpoint: `GET ?corp_id=&corp_secret=` (with
/// the permanent `corp_secret`).
pub const CORP_TOKEN_PATH: &str = "/api/corp-service/v1/access-tokens";
/// The one-time exchange of a 24-hour `temp_corp_secret` for the permanent `corp_secret`:
/// `GET ?corp_id=&corp_authorization=&temp_corp_secret=`.
pub const CORP_SECRETS_PATH: &str = "/api/corp-service/v1/corp-secrets";
/// Paths under this prefix are organisation-service APIs (their own error codes).
pub const CORP_SERVICE_PREFIX: &str = "/api/corp-service/";
/// The documented `User-Agent` default.
pub const USER_AGENT: &str = "CX";
/// What a token answer without `expires_in` is taken to mean ("usually 2 hours").
pub const DEFAULT_EXPIRES_IN_S: u64 = 7200;
/// The longest token lifetime believed (SPEC section 4.5): anything longer is clamped.
pub const MAX_EXPIRES_IN_S: u64 = 30 * 86_400;

/// The platform's `err_code` values (PLATFORM.md section 2).
pub mod code {
    /// Success.
    pub const SUCCESS: i64 = 0;
    /// Invalid request (both kinds).
    pub const INVALID_REQUEST: i64 = 40000;
    /// Organisation service: invalid authentication (bad credentials); never a reason to
    /// fetch a new token and replay.
    pub const BAD_CREDENTIALS: i64 = 40001;
    /// Organisation service: the access token is invalid.
    pub const CORP_TOKEN_INVALID: i64 = 40004;
    /// Organisation service: the access token has expired.
    pub const CORP_TOKEN_EXPIRED: i64 = 40005;
    /// Organisation service: the pre-authorisation (temporary) code has expired.
    pub const TEMP_SECRET_EXPIRED: i64 = 40006;
    /// Organisation service: the permanent code already exists (the temporary one was used).
    pub const PERMANENT_CODE_EXISTS: i64 = 40007;
    /// Organisation service: no permission to read contacts.
    pub const NO_CONTACTS_READ: i64 = 40008;
    /// Organisation service: no permission to write contacts.
    pub const NO_CONTACTS_WRITE: i64 = 40009;
    /// Self-built app: the token is invalid or expired (also: app disabled or deleted, org
    /// disabled).
    pub const TOKEN_REJECTED: i64 = 49000;
    /// Self-built app: call rate exceeded.
    pub const RATE_LIMITED: i64 = 49001;
    /// Server error.
    pub const SERVER_ERROR: i64 = 50000;
    /// Encryption failure.
    pub const ENCRYPTION_FAILED: i64 = 50001;
    /// Organisation id invalid.
    pub const ORG_INVALID: i64 = 50100;
    /// Organisation disabled.
    pub const ORG_DISABLED: i64 = 50101;
    /// Contacts: nothing new since that version.
    pub const NOTHING_NEW: i64 = 50701;
    /// Contacts: too many changes, do a full sync.
    pub const TOO_MANY_CHANGES: i64 = 50702;
    /// Organisation service: bad update parameters.
    pub const BAD_UPDATE: i64 = 50790;
    /// Organisation service: call rate exceeded.
    pub const CORP_RATE_LIMITED: i64 = 55001;

    /// Every documented non-zero code: the label values `/metrics` counts answers by (any
    /// other code is counted as `other`, so the label set stays bounded).
    pub const DOCUMENTED: [i64; 18] = [
        INVALID_REQUEST,
        BAD_CREDENTIALS,
        CORP_TOKEN_INVALID,
        CORP_TOKEN_EXPIRED,
        TEMP_SECRET_EXPIRED,
        PERMANENT_CODE_EXISTS,
        NO_CONTACTS_READ,
        NO_CONTACTS_WRITE,
        TOKEN_REJECTED,
        RATE_LIMITED,
        SERVER_ERROR,
        ENCRYPTION_FAILED,
        ORG_INVALID,
        ORG_DISABLED,
        NOTHING_NEW,
        TOO_MANY_CHANGES,
        BAD_UPDATE,
        CORP_RATE_LIMITED,
    ];

    /// Codes that are never a token rejection, whatever the configuration says: the rate
    /// limits (the token is fine; a new one would not help and would burn the fetch quota).
    pub const NEVER_REJECTION: [i64; 3] = [SUCCESS, RATE_LIMITED, CORP_RATE_LIMITED];
}

/// The two kinds of app the platform issues tokens to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AppKind {
    /// A self-built app (组织自建应用): `app_key`, `corp_id`, `corp_secret`.
    #[default]
    App,
    /// An organisation-service app (组织服务): `corp_id` and the permanent `corp_secret`.
    CorpService,
}

impl AppKind {
    /// The name used in `proxy.toml` (`kind = "..."`).
    pub fn as_str(self) -> &'static str {
        match self {
            AppKind::App => "app",
            AppKind::CorpService => "corp-service",
        }
    }

    /// The token endpoint of this kind.
    pub fn token_path(self) -> &'static str {
        match self {
            AppKind::App => APP_TOKEN_PATH,
            AppKind::CorpService => CORP_TOKEN_PATH,
        }
    }

    /// The codes meaning "this token was rejected" (PLATFORM.md section 2).
    pub fn invalid_codes(self) -> &'static [i64] {
        match self {
            AppKind::App => &[code::TOKEN_REJECTED],
            AppKind::CorpService => &[code::CORP_TOKEN_INVALID, code::CORP_TOKEN_EXPIRED],
        }
    }
}

/// A documented call rate: at most `n` calls in any sliding window of `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Calls allowed per window.
    pub n: u32,
    /// The window's length.
    pub per: Duration,
}

impl std::fmt::Display for Rate {
    /// `N/s`, `N/min`, `N/h` or `N/d` (another period as `N/Ss`), as `[limits]` writes it.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let unit = match self.per.as_secs() {
            1 => "s",
            60 => "min",
            3600 => "h",
            86_400 => "d",
            s => return write!(f, "{}/{s}s", self.n),
        };
        write!(f, "{}/{unit}", self.n)
    }
}

const fn rate(n: u32, per_s: u64) -> Option<Rate> {
    Some(Rate {
        n,
        per: Duration::from_secs(per_s),
    })
}

const S: u64 = 1;
const MIN: u64 = 60;
const H: u64 = 3600;
const D: u64 = 86_400;

/// One documented API: method, path pattern (`{x}` matches one segment), what it does, and
/// its documented rate limit, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Api {
    /// HTTP method.
    pub method: &'static str,
    /// Path under the host, `/api/...`; `{x}` matches one path segment.
    pub path: &'static str,
    /// What it is, in the documentation's words.
    pub name: &'static str,
    /// The documented rate limit (PLATFORM.md section 3), per app.
    pub rate: Option<Rate>,
}

const fn api(method: &'static str, path: &'static str, name: &'static str, r: Option<Rate>) -> Api {
    Api {
        method,
        path,
        name,
        rate: r,
    }
}

/// The documented APIs of every family (PLATFORM.md section 1) with their limits (section 3).
/// Paths marked "inferred" in PLATFORM.md are included as inferred; calls whose path the
/// documentation does not give (send to group, change assignees, incremental org changes)
/// are left out.
pub const APIS: &[Api] = &[
    api(
        "GET",
        "/api/apps/v1/sso/user",
        "sso: check a user's oauth_code",
        rate(100_000, H),
    ),
    api(
        "GET",
        "/api/apps/v1/sso/admin",
        "sso: check an admin's oauth_code",
        rate(500, D),
    ),
    api(
        "POST",
        "/api/apps/message/v1/push",
        "message: push",
        rate(10_000, H),
    ),
    api(
        "POST",
        "/api/apps/message/v1/revoke",
        "message: revoke",
        None,
    ),
    api(
        "GET",
        "/api/apps/address-book/v1.0/all",
        "contacts: full export",
        rate(10, H),
    ),
    api(
        "GET",
        "/api/apps/v1/address-book/changes/{version}",
        "contacts: incremental changes",
        rate(1000, H),
    ),
    api(
        "POST",
        "/api/apps/v1/robot/chats",
        "robot: create group",
        rate(50, D),
    ),
    api(
        "GET",
        "/api/apps/v1/robot/chats",
        "robot: list groups",
        rate(5, S),
    ),
    api(
        "GET",
        "/api/apps/v1/robot/chats/{chat_id}",
        "robot: query group",
        rate(10, S),
    ),
    api(
        "PUT",
        "/api/apps/v1/robot/chats/{chat_id}",
        "robot: update group",
        rate(500, D),
    ),
    api(
        "DELETE",
        "/api/apps/v1/robot/chats/{chat_id}",
        "robot: dissolve group",
        rate(50, D),
    ),
    api(
        "POST",
        "/api/apps/v1/robot/chats/{chat_id}/notice",
        "robot: set group notice",
        rate(100, D),
    ),
    api(
        "POST",
        "/api/apps/v1/robot/staffs/message",
        "robot: message staff",
        None,
    ),
    api("POST", "/api/apps/v1/to-do", "to-do: create", rate(100, S)),
    api(
        "PUT",
        "/api/apps/v1/to-do/{id}",
        "to-do: update",
        rate(100, S),
    ),
    api(
        "DELETE",
        "/api/apps/v1/to-do/{id}",
        "to-do: delete",
        rate(100, S),
    ),
    api("POST", "/api/apps/v1/to-read", "to-read: create", None),
    api("PUT", "/api/apps/v1/to-read/{id}", "to-read: update", None),
    api(
        "DELETE",
        "/api/apps/v1/to-read/{id}",
        "to-read: delete",
        None,
    ),
    api(
        "PUT",
        "/api/apps/v1/card/templates",
        "cards: add template",
        rate(10, H),
    ),
    api(
        "GET",
        "/api/apps/v1/card/templates",
        "cards: list templates",
        rate(10, H),
    ),
    api(
        "POST",
        "/api/apps/v1/card/templates/{template_id}",
        "cards: update template",
        rate(10, H),
    ),
    api(
        "DELETE",
        "/api/apps/v1/card/templates/{template_id}",
        "cards: delete template",
        rate(10, H),
    ),
    api(
        "POST",
        "/api/apps/v1/card/set-enterprise-data",
        "cards: set org-level data",
        rate(300, MIN),
    ),
    api(
        "POST",
        "/api/apps/v1/card/batch-set-data",
        "cards: batch set data",
        rate(300, MIN),
    ),
    api(
        "GET",
        "/api/corp-service/v1/address-book",
        "org service: contacts",
        None,
    ),
    api(
        "POST",
        "/api/corp-service/v1/address-book/changes",
        "org service: change contacts",
        None,
    ),
];

/// The documented API `method` + `path` calls, if any (`path` without its query).
pub fn find_api(method: &str, path: &str) -> Option<&'static Api> {
    api_index(method, path).map(|i| &APIS[i])
}

/// The index in [`APIS`] of the documented API `method` + `path` calls, if any.
pub fn api_index(method: &str, path: &str) -> Option<usize> {
    APIS.iter()
        .position(|a| a.method == method && path_matches(a.path, path))
}

/// Whether two path patterns are the same rule: equal segment by segment, where any two
/// `{x}` segments are equal whatever their names.
pub fn same_pattern(a: &str, b: &str) -> bool {
    let var = is_placeholder;
    let (mut x, mut y) = (a.split('/'), b.split('/'));
    loop {
        match (x.next(), y.next()) {
            (None, None) => return true,
            (Some(p), Some(q)) if p == q || (var(p) && var(q)) => {}
            _ => return false,
        }
    }
}

/// Path segments a `[limits]` rule's pattern may have, counting the empty one before the
/// leading `/` (a longer path matches no rule).
pub const MAX_PATTERN_SEGMENTS: usize = 16;

/// Whether a pattern segment is a `{x}` placeholder.
pub fn is_placeholder(segment: &str) -> bool {
    segment.len() > 2 && segment.starts_with('{') && segment.ends_with('}')
}

/// Whether `path` matches `pattern`, where a `{x}` segment matches any one non-empty segment.
pub fn path_matches(pattern: &str, path: &str) -> bool {
    let mut want = pattern.split('/');
    let mut got = path.split('/');
    loop {
        match (want.next(), got.next()) {
            (None, None) => return true,
            (Some(w), Some(g)) if is_placeholder(w) => {
                if g.is_empty() {
                    return false;
                }
            }
            (Some(w), Some(g)) if w == g => {}
            _ => return false,
        }
    }
}

/// Whether `path`, as a client sent it, names the endpoint `canonical` the way a lenient
/// server would read it: percent-escapes decoded, runs of `/` taken as one, a trailing `/`
/// ignored, letters compared without case. (A token endpoint must be recognised in every
/// spelling a platform behind nginx or a Java servlet could still serve.) No allocation.
pub fn same_path(path: &str, canonical: &str) -> bool {
    // Every spelling is at least as long as what it spells (decoding, collapsing and
    // trimming only shorten, but for a trailing `/` of the canonical form), so most paths
    // are told apart by their length alone.
    if path.len() + 1 < canonical.len() {
        return false;
    }
    // Where the bytes first differ must be somewhere a lenient reading could make equal (an
    // escape, a slash, a letter's case, an end); elsewhere the answer is no, without the walk.
    let (p, c) = (path.as_bytes(), canonical.as_bytes());
    let same = p.iter().zip(c).take_while(|(a, b)| a == b).count();
    let could_match = match (p.get(same), c.get(same)) {
        (None, None) => return true,
        (Some(a), Some(b)) => matches!(a, b'%' | b'/') || *b == b'/' || a.eq_ignore_ascii_case(b),
        _ => true,
    };
    if !could_match {
        return false;
    }
    /// Decoded, lower-cased bytes with runs of `/` collapsed.
    fn decoded(p: &str) -> impl Iterator<Item = u8> + '_ {
        let raw = p.as_bytes();
        let mut i = 0;
        let mut last_slash = false;
        std::iter::from_fn(move || loop {
            let &b = raw.get(i)?;
            let escaped = (b == b'%')
                .then(|| raw.get(i + 1..i + 3))
                .flatten()
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok());
            let byte = escaped.unwrap_or(b);
            i += if escaped.is_some() { 3 } else { 1 };
            if byte == b'/' && last_slash {
                continue;
            }
            last_slash = byte == b'/';
            return Some(byte.to_ascii_lowercase());
        })
    }
    /// [`decoded`] without a trailing `/` (a lone `/` stays).
    fn trimmed(p: &str) -> impl Iterator<Item = u8> + '_ {
        let mut it = decoded(p).peekable();
        let mut first = true;
        std::iter::from_fn(move || {
            let b = it.next()?;
            let lone = std::mem::replace(&mut first, false);
            (b != b'/' || lone || it.peek().is_some()).then_some(b)
        })
    }
    trimmed(path).eq(trimmed(canonical))
}

/// The code for "rate limit exceeded" on `path`: 55001 on organisation-service APIs, else 49001.
pub fn rate_limited_code(path: &str) -> i64 {
    if path.starts_with(CORP_SERVICE_PREFIX) {
        code::CORP_RATE_LIMITED
    } else {
        code::RATE_LIMITED
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns_match_one_segment_per_placeholder() {
        assert!(path_matches(
            "/api/apps/v1/robot/chats/{chat_id}",
            "/api/apps/v1/robot/chats/c1"
        ));
        assert!(!path_matches(
            "/api/apps/v1/robot/chats/{chat_id}",
            "/api/apps/v1/robot/chats/"
        ));
        assert!(!path_matches(
            "/api/apps/v1/robot/chats/{chat_id}",
            "/api/apps/v1/robot/chats/a/b"
        ));
        assert!(!path_matches(
            "/api/apps/v1/robot/chats",
            "/api/apps/v1/robot/chats/c1"
        ));
        assert_eq!(
            find_api("GET", "/api/apps/v1/robot/chats").map(|a| a.name),
            Some("robot: list groups")
        );
        assert_eq!(
            find_api("PUT", "/api/apps/v1/card/templates").and_then(|a| a.rate),
            rate(10, H)
        );
        assert!(find_api("POST", "/api/apps/v1/card/templates").is_none());
    }

    #[test]
    fn every_documented_path_is_distinct_per_method() {
        for (i, a) in APIS.iter().enumerate() {
            assert!(a.path.starts_with("/api/"), "{}", a.path);
            for b in &APIS[i + 1..] {
                assert!(a.method != b.method || a.path != b.path, "{a:?}");
            }
        }
    }

    #[test]
    fn endpoints_are_recognised_in_every_spelling_a_server_could_serve() {
        for p in [
            "/api/apps/v1/access-tokens",
            "/api//apps/v1/access-tokens",
            "/api/apps/v1/access-tokens/",
            "/api/apps/v1/%61ccess-tokens",
            "/API/apps/v1/Access-Tokens",
            "//api/apps/v1//access-tokens//",
        ] {
            assert!(same_path(p, APP_TOKEN_PATH), "{p}");
        }
        for p in [
            "/api/apps/v1/access-token",
            "/api/apps/v1/access-tokens/x",
            "/api/apps/v1/robot/chats",
            "/",
            "",
        ] {
            assert!(!same_path(p, APP_TOKEN_PATH), "{p}");
        }
        assert!(same_path("/", "/"));
    }
}
