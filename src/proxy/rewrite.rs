//! Pure rewrites of what crosses the proxy: headers in both directions, the request target,
//! and the redacted form of a target for logs. No I/O, no allocation beyond the new target.

use std::borrow::Cow;
use std::fmt;

use http::header::{self, HeaderMap, HeaderName};
use percent_encoding::percent_decode_str;

pub use crate::wire::QUERY_VALUE;

/// Header a client uses to pick an app by name; never forwarded.
pub const X_CX_APP: HeaderName = HeaderName::from_static("x-cx-app");

/// Hop-by-hop headers (RFC 9110 §7.6.1), plus `Proxy-Connection` (pre-standard but still
/// sent) and `Expect` (already answered by our own server side).
const HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::EXPECT,
];

/// Headers that would tell the platform about the inside of the network.
const FORWARDING: [HeaderName; 6] = [
    HeaderName::from_static("forwarded"),
    HeaderName::from_static("x-forwarded-for"),
    HeaderName::from_static("x-forwarded-host"),
    HeaderName::from_static("x-forwarded-proto"),
    HeaderName::from_static("x-forwarded-port"),
    HeaderName::from_static("x-real-ip"),
];

/// Removes every header `drop` selects, plus every header a `Connection` header names. The
/// names are scanned once and only the matches are removed: most requests carry a handful of
/// headers and need one or two removals, not a lookup per name on the lists.
fn strip(headers: &mut HeaderMap, drop: impl Fn(&HeaderName) -> bool) {
    // A few matches fit on the stack; only an unusual request spills to the heap.
    let mut found: [Option<HeaderName>; 8] = Default::default();
    let mut n = 0;
    let mut spill: Vec<HeaderName> = Vec::new();
    let mut connection = false;
    for name in headers.keys() {
        if drop(name) {
            connection |= name == header::CONNECTION;
            if n < found.len() {
                found[n] = Some(name.clone());
                n += 1;
            } else {
                spill.push(name.clone());
            }
        }
    }
    if connection {
        for v in headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            // `keep-alive` and `close`, nearly every Connection header's whole value, name
            // nothing the scan above has not already taken (`keep-alive` is hop-by-hop).
            spill.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|n| {
                        !n.eq_ignore_ascii_case("keep-alive") && !n.eq_ignore_ascii_case("close")
                    })
                    .filter_map(|n| HeaderName::from_bytes(n.as_bytes()).ok()),
            );
        }
    }
    for name in found.into_iter().flatten().chain(spill) {
        headers.remove(name);
    }
}

fn is_hop_by_hop(name: &HeaderName) -> bool {
    HOP_BY_HOP.contains(name)
}

/// Removes the hop-by-hop headers and every header the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    strip(headers, is_hop_by_hop);
}

/// Prepares a client's headers for the upstream: hop-by-hop and forwarding headers, `Host`,
/// our own routing header and the client's copy of the token header all go.
pub fn sanitize_request_headers(headers: &mut HeaderMap, token_header: Option<&HeaderName>) {
    strip(headers, |name| {
        name == header::HOST
            || is_hop_by_hop(name)
            || FORWARDING.contains(name)
            || name == X_CX_APP
            || token_header == Some(name)
    });
}

/// Whether a raw query key names `name`, also when percent-encoded (`access%5Ftoken`).
fn key_is(raw: &str, name: &str) -> bool {
    if raw.as_bytes().contains(&b'%') || raw.as_bytes().contains(&b'+') {
        let decoded = percent_decode_str(&raw.replace('+', " "))
            .decode_utf8_lossy()
            .into_owned();
        decoded == name
    } else {
        raw == name
    }
}

/// Builds the upstream's path and query: `base` + `path`, then the client's query without any
/// `drop` parameter, then `inject` (an already-encoded `name=value` pair) if any.
pub fn upstream_target(
    base: &str,
    path: &str,
    query: Option<&str>,
    drop: &str,
    inject: Option<&str>,
) -> String {
    let mut out = String::with_capacity(
        base.len() + path.len() + query.map_or(0, str::len) + inject.map_or(0, str::len) + 2,
    );
    out.push_str(base);
    out.push_str(path);
    let mut first = true;
    if let Some(query) = query {
        for pair in query.split('&') {
            if pair.is_empty() {
                continue;
            }
            let key = pair.split_once('=').map_or(pair, |(k, _)| k);
            if key_is(key, drop) {
                continue;
            }
            out.push(if first { '?' } else { '&' });
            first = false;
            out.push_str(pair);
        }
    }
    if let Some(pair) = inject {
        out.push(if first { '?' } else { '&' });
        out.push_str(pair);
    }
    out
}

/// How many leading bytes of `path` an app prefix takes, matching on segment boundaries;
/// `None` if the prefix does not match. What is left (or `/` if nothing) is forwarded.
pub fn prefix_len(path: &str, prefix: &str) -> Option<usize> {
    if prefix == "/" {
        return Some(0);
    }
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(prefix.len())
}

/// A path segment that is `.` or `..`, also percent-encoded (`%2e`, `.%2E`, …).
fn dot_segment(seg: &str) -> Option<bool> {
    let b = seg.as_bytes();
    let is_dot = |i: usize| -> Option<usize> {
        match b.get(i)? {
            b'.' => Some(1),
            b'%' if b.get(i + 1) == Some(&b'2') && matches!(b.get(i + 2), Some(b'e' | b'E')) => {
                Some(3)
            }
            _ => None,
        }
    };
    let first = is_dot(0)?;
    if first == b.len() {
        return Some(false);
    }
    let second = is_dot(first)?;
    (first + second == b.len()).then_some(true)
}

/// Resolves dot segments (RFC 3986 §5.2.4), percent-encoded ones too, so that `../` and
/// `%2e%2e` cannot climb out of an app prefix or a client's path grant. Borrows when there is
/// nothing to resolve (the usual case), so the hot path does not allocate.
pub fn normalize_path(path: &str) -> Cow<'_, str> {
    let has_encoded_dot = path
        .as_bytes()
        .windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'2' && (w[2] | 0x20) == b'e');
    if !path.contains("/.") && !has_encoded_dot {
        return Cow::Borrowed(path);
    }
    let mut out: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in path.split('/').skip(1) {
        trailing_slash = false;
        match dot_segment(seg) {
            Some(false) => trailing_slash = true,
            Some(true) => {
                out.pop();
                trailing_slash = true;
            }
            None => out.push(seg),
        }
    }
    let mut s = String::with_capacity(path.len());
    for seg in &out {
        s.push('/');
        s.push_str(seg);
    }
    if trailing_slash || s.is_empty() {
        s.push('/');
    }
    Cow::Owned(s)
}

/// Whether a query key carries something secret and must be masked in logs: the token
/// parameter, or a (percent-decoded) name holding `token`, `secret`, `pass`, `code`, `sign`
/// or `auth` (`corp_authorization`).
fn sensitive_key(raw: &str, extra: &str) -> bool {
    const WORDS: [&str; 6] = ["token", "secret", "pass", "code", "sign", "auth"];
    if key_is(raw, extra) {
        return true;
    }
    // The usual key is plain: judged where it is, without a decoded copy (every access-log
    // line goes through here).
    if !raw.contains('%') {
        return holds_word(raw.as_bytes(), &WORDS);
    }
    let key = percent_decode_str(raw)
        .decode_utf8_lossy()
        .to_ascii_lowercase();
    WORDS.iter().any(|s| key.contains(s))
}

/// Whether `key` holds one of `words` (lower case), in any letter case: one pass that looks
/// closer only where a word's first letter stands.
fn holds_word(key: &[u8], words: &[&str]) -> bool {
    let firsts = words
        .iter()
        .fold(0u32, |m, w| m | w.bytes().next().map_or(0, letter_bit));
    (0..key.len()).any(|i| {
        firsts & letter_bit(key[i]) != 0
            && words.iter().any(|w| {
                key[i..]
                    .get(..w.len())
                    .is_some_and(|at| at.eq_ignore_ascii_case(w.as_bytes()))
            })
    })
}

/// A bit for an ASCII letter in either case (0 for any other byte).
fn letter_bit(b: u8) -> u32 {
    match b.to_ascii_lowercase() {
        l @ b'a'..=b'z' => 1 << (l - b'a'),
        _ => 0,
    }
}

/// Whether a query value holds `name=` for a sensitive name (behind `,`, `|` or any other
/// separator a server might split on).
fn hides_secret(value: &str, extra: &str) -> bool {
    value
        .match_indices('=')
        .any(|(i, _)| sensitive_key(&value[..i], extra))
}

/// Why a path may not be forwarded, if it may not: an encoded slash or backslash (`%2F`,
/// `%5C`), a raw backslash, or a dot segment with a parameter (`..;x`, `%2e%2e;`), which
/// a server that decodes or strips before resolving dot segments (Tomcat, Jetty and Spring
/// drop `;` parameters) could read as a way out of an app prefix or a client's grant
/// (SPEC section 4.2).
pub fn path_problem(path: &str) -> Option<&'static str> {
    let b = path.as_bytes();
    // One scan for the bytes that can start a problem; the usual path has none.
    let at = b
        .iter()
        .position(|&c| c == b'%' || c == b'\\' || c == b';')?;
    let rest = &b[at..];
    if rest.contains(&b'\\') {
        return Some("the path holds a backslash (\\), which a server may read as a slash");
    }
    if rest.contains(&b';') && path.split('/').any(dot_with_parameter) {
        return Some(
            "the path holds a dot segment with a parameter (..;), which a server that drops \
             ;parameters reads as a way up",
        );
    }
    let encoded = rest.windows(3).any(|w| {
        w[0] == b'%'
            && ((w[1] == b'2' && (w[2] | 0x20) == b'f') || (w[1] == b'5' && (w[2] | 0x20) == b'c'))
    });
    encoded.then_some(
        "the path holds an encoded slash or backslash (%2F, %5C), which a server that decodes \
         it could read as a way out of a path",
    )
}

/// Whether a path segment is `.` or `..` (any of them `%2e`) followed by `;` and a
/// parameter.
fn dot_with_parameter(segment: &str) -> bool {
    let Some((name, _)) = segment.split_once(';') else {
        return false;
    };
    let decoded = percent_decode_str(name).collect::<Vec<u8>>();
    decoded == b"." || decoded == b".."
}

/// Whether the query has a `;`-separated piece naming `param` (after percent-decoding): a
/// server that splits on `;` would read the client's token beside ours (SPEC section 4.4).
pub fn token_behind_semicolon(query: &str, param: &str) -> bool {
    if !query.contains(';') {
        return false;
    }
    query.split('&').any(|pair| {
        pair.split(';').skip(1).any(|piece| {
            let key = piece.split_once('=').map_or(piece, |(k, _)| k);
            key_is(key, param) || key_is(key, "access_token")
        })
    })
}

/// A request target for logs: the path, and the query with secret values as `***`.
pub struct Redacted<'a> {
    path: &'a str,
    query: Option<&'a str>,
    param: &'a str,
}

impl<'a> Redacted<'a> {
    /// Masks `param` (the token parameter) and anything that looks like a secret.
    pub fn new(path: &'a str, query: Option<&'a str>, param: &'a str) -> Self {
        Redacted { path, query, param }
    }
}

impl Redacted<'_> {
    /// Writes `text` split at `seps` (kept), each piece through [`Redacted::piece`].
    fn pieces(&self, f: &mut fmt::Formatter<'_>, text: &str, seps: &[u8]) -> fmt::Result {
        let mut rest = text;
        loop {
            // Separators are ASCII, so `end` is a character boundary.
            let end = rest
                .bytes()
                .position(|b| seps.contains(&b))
                .unwrap_or(rest.len());
            self.piece(f, &rest[..end])?;
            if end == rest.len() {
                return Ok(());
            }
            f.write_str(&rest[end..=end])?;
            rest = &rest[end + 1..];
        }
    }

    /// Writes one `name=value` piece, its value as `***` when the name is sensitive or the
    /// value (decoded) holds a sensitive `name=` behind any separator (`1,access_token=…`,
    /// `1%3Baccess_token%3D…`); a piece whose `=` is itself encoded
    /// (`corp_secret%3D…`) is judged decoded and, if sensitive, shown as `***` whole.
    fn piece(&self, f: &mut fmt::Formatter<'_>, pair: &str) -> fmt::Result {
        let decoded = |t: &str| -> String {
            if t.contains('%') {
                percent_decode_str(t).decode_utf8_lossy().into_owned()
            } else {
                t.to_owned()
            }
        };
        match pair.split_once('=') {
            Some((k, v))
                if sensitive_key(k, self.param)
                    || (v.contains(['=', '%']) && hides_secret(&decoded(v), self.param)) =>
            {
                write!(f, "{k}=***")
            }
            None if pair.contains('%') && hides_secret(&decoded(pair), self.param) => {
                f.write_str("***")
            }
            _ => f.write_str(pair),
        }
    }
}

impl fmt::Display for Redacted<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Path parameters (`/c1;access_token=…`) are masked as query pairs are.
        match self.path.find(';') {
            None => f.write_str(self.path)?,
            Some(at) => {
                f.write_str(&self.path[..at])?;
                for (i, part) in self.path[at..].split('/').enumerate() {
                    if i > 0 {
                        f.write_str("/")?;
                    }
                    match part.split_once(';') {
                        Some((name, params)) => {
                            write!(f, "{name};")?;
                            self.pieces(f, params, b";")?;
                        }
                        None => f.write_str(part)?,
                    }
                }
            }
        }
        let Some(query) = self.query else {
            return Ok(());
        };
        f.write_str("?")?;
        // `;` separates too: some servers split on it, so a secret behind one is a secret.
        self.pieces(f, query, b"&;")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    #[test]
    fn client_token_is_dropped_and_ours_appended() {
        let t = upstream_target(
            "",
            "/api/x",
            Some("a=1&access_token=evil&b=2"),
            "access_token",
            Some("access_token=good"),
        );
        assert_eq!(t, "/api/x?a=1&b=2&access_token=good");
    }

    #[test]
    fn encoded_token_keys_are_dropped_too() {
        let t = upstream_target(
            "",
            "/p",
            Some("access%5Ftoken=evil&access_token=evil2"),
            "access_token",
            Some("access_token=ok"),
        );
        assert_eq!(t, "/p?access_token=ok");
    }

    #[test]
    fn query_order_and_encoding_survive() {
        let t = upstream_target(
            "/base",
            "/p",
            Some("z=%20&&y=a%26b&x"),
            "access_token",
            None,
        );
        assert_eq!(t, "/base/p?z=%20&y=a%26b&x");
    }

    #[test]
    fn no_query_gets_one() {
        assert_eq!(
            upstream_target("", "/p", None, "access_token", Some("access_token=t")),
            "/p?access_token=t"
        );
        assert_eq!(
            upstream_target("", "/p", Some(""), "access_token", None),
            "/p"
        );
    }

    #[test]
    fn prefixes_strip_on_segment_boundaries() {
        assert_eq!(prefix_len("/corp42/api/x", "/corp42"), Some(7));
        assert_eq!(prefix_len("/corp42", "/corp42"), Some(7));
        assert_eq!(prefix_len("/corp420/api", "/corp42"), None);
        assert_eq!(prefix_len("/api", "/"), Some(0));
    }

    #[test]
    fn dot_segments_are_resolved_also_when_encoded() {
        assert_eq!(normalize_path("/api/x"), "/api/x");
        assert!(matches!(normalize_path("/api/x.json"), Cow::Borrowed(_)));
        assert_eq!(normalize_path("/api/robot/../../admin"), "/admin");
        assert_eq!(normalize_path("/api/%2e%2e/%2E%2e/x"), "/x");
        assert_eq!(normalize_path("/api/.%2e/x"), "/x");
        assert_eq!(normalize_path("/a/./b/."), "/a/b/");
        assert_eq!(normalize_path("/.."), "/");
        assert_eq!(normalize_path("/a/..."), "/a/...");
        assert_eq!(normalize_path("/a/%2ex"), "/a/%2ex");
        assert_eq!(normalize_path("/a//b/../c"), "/a//c");
    }

    #[test]
    fn hop_by_hop_and_connection_listed_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret-hop"),
        );
        h.insert("x-secret-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::HOST, HeaderValue::from_static("evil.example"));
        h.insert("x-forwarded-for", HeaderValue::from_static("10.0.0.1"));
        h.insert(X_CX_APP, HeaderValue::from_static("default"));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert("x-keep", HeaderValue::from_static("yes"));
        sanitize_request_headers(&mut h, Some(&header::AUTHORIZATION));
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(h["x-keep"], "yes");
    }

    #[test]
    fn logs_see_no_secret_values() {
        let r = Redacted::new(
            "/p",
            Some("a=1&access_token=tok&corp_secret=s&Permanent_Code=c&b"),
            "access_token",
        );
        assert_eq!(
            r.to_string(),
            "/p?a=1&access_token=***&corp_secret=***&Permanent_Code=***&b"
        );
        let r = Redacted::new(
            "/p",
            Some("corp_id=1;corp_secret=s&corp_authorization=z;x=1&%63orp_secret=t"),
            "access_token",
        );
        assert_eq!(
            r.to_string(),
            "/p?corp_id=1;corp_secret=***&corp_authorization=***;x=1&%63orp_secret=***"
        );
        // Behind any other separator, the value goes too.
        let r = Redacted::new(
            "/p",
            Some("group_id=1,access_token=EVIL&b=2|corp_secret=S&c=x=y"),
            "access_token",
        );
        assert_eq!(r.to_string(), "/p?group_id=***&b=***&c=x=y");
        // Encoded separators and `=` hide nothing either; nor does a path parameter.
        let r = Redacted::new(
            "/c1;access_token=EVILPATH;v=1/d;x=2",
            Some("a=1&corp_secret%3DS1&b=1%3Baccess_token%3DEVIL&%3baccess_token%3dE2&c=%41"),
            "access_token",
        );
        let shown = r.to_string();
        assert_eq!(
            shown,
            "/c1;access_token=***;v=1/d;x=2?a=1&***&b=***&***&c=%41"
        );
        for secret in ["S1", "EVIL", "E2"] {
            assert!(!shown.contains(secret), "{shown}");
        }
    }

    #[test]
    fn sensitive_words_are_found_anywhere_in_any_case() {
        for k in [
            "x_TOKEN",
            "Secret",
            "passwd",
            "zipcode",
            "SIGNATURE",
            "myAuth",
            "tokentoken",
        ] {
            assert!(sensitive_key(k, "access_token"), "{k}");
        }
        for k in [
            "",
            "tok",
            "group_id",
            "toke",
            "secre",
            "cod",
            "id",
            "page_count",
        ] {
            assert!(!sensitive_key(k, "access_token"), "{k}");
        }
    }

    #[test]
    fn slashes_a_server_might_decode_are_problems() {
        for p in [
            "/a%2Fb",
            "/a%2f..",
            "/a%5Cb",
            "/a%5c",
            "/a\\b",
            "/x%20y/%2F",
        ] {
            assert!(path_problem(p).is_some(), "{p}");
        }
        for p in ["/a/b", "/a%20b", "/a%25", "/%2", "/a%2"] {
            assert!(path_problem(p).is_none(), "{p}");
        }
    }

    #[test]
    fn a_token_behind_a_semicolon_is_found_in_any_spelling() {
        assert!(token_behind_semicolon(
            "group_id=1;access_token=E",
            "access_token"
        ));
        assert!(token_behind_semicolon(
            "a=1&b=2;access%5Ftoken=E",
            "access_token"
        ));
        assert!(token_behind_semicolon("a=1;tok=E", "tok"));
        assert!(!token_behind_semicolon(
            "a=1;b=access_token",
            "access_token"
        ));
        assert!(!token_behind_semicolon(
            "access_token=E&a=1",
            "access_token"
        ));
    }
}
