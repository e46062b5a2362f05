//! The platform's wire format (PLATFORM.md sections 1 and 2), in one leaf module that the
//! proxy, the token fetch, the command line and the sandbox all use: how a query is written
//! and read, the `{"err_code","err_msg"}` body, the `err_code` of an answer, the token answer
//! both ways, and hex (how digests and signatures travel).
//!
//! Nothing here does I/O or knows the proxy; it imports nothing from the crate.

use std::borrow::Cow;
use std::fmt::Write as _;

use percent_encoding::{percent_decode_str, AsciiSet, CONTROLS};

/// Characters percent-encoded in a query key or value we write ourselves.
pub const QUERY_VALUE: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'%')
    .add(b'&')
    .add(b'+')
    .add(b'<')
    .add(b'=')
    .add(b'>')
    .add(b'?')
    .add(b'[')
    .add(b']')
    .add(b'\\')
    .add(b'^')
    .add(b'`')
    .add(b'{')
    .add(b'|')
    .add(b'}');

/// The `name=value` pairs of a query, decoded as the platform reads them: split on `&`,
/// `+` is a space, then percent-decoding (invalid UTF-8 replaced). Empty pieces are skipped.
pub fn query_pairs(query: &str) -> impl Iterator<Item = (Cow<'_, str>, Cow<'_, str>)> {
    fn decode(s: &str) -> Cow<'_, str> {
        if s.contains('+') {
            let spaced = s.replace('+', " ");
            Cow::Owned(percent_decode_str(&spaced).decode_utf8_lossy().into_owned())
        } else {
            percent_decode_str(s).decode_utf8_lossy()
        }
    }
    query.split('&').filter(|p| !p.is_empty()).map(|p| {
        let (k, v) = p.split_once('=').unwrap_or((p, ""));
        (decode(k), decode(v))
    })
}

/// The platform's error body, `{"err_code":N,"err_msg":"…"}` (also the proxy's own errors,
/// SPEC section 5, with 990xxx codes).
pub fn error_body(code: i64, msg: &str) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Wire<'a> {
        err_code: i64,
        err_msg: &'a str,
    }
    // Serialising an integer and a str cannot fail.
    serde_json::to_vec(&Wire {
        err_code: code,
        err_msg: msg,
    })
    .unwrap_or_default()
}

/// A successful token answer as the platform words it (`err_msg` is the platform's own
/// `"Susccess"` from the token endpoint, `"success"` from the proxy's local one).
pub fn token_answer(err_msg: &str, access_token: &str, expires_in: u64) -> Vec<u8> {
    #[derive(serde::Serialize)]
    struct Wire<'a> {
        err_code: i64,
        err_msg: &'a str,
        access_token: &'a str,
        expires_in: u64,
    }
    serde_json::to_vec(&Wire {
        err_code: 0,
        err_msg,
        access_token,
        expires_in,
    })
    .unwrap_or_default()
}

/// A token endpoint's answer as read: every member optional, since what is missing or of the
/// wrong type is for the reader to judge (SPEC section 4.5).
#[derive(Debug, Default, serde::Deserialize)]
pub struct TokenAnswer {
    /// `err_code` (a number; a numeric string is read by [`as_code`]).
    #[serde(default)]
    pub err_code: Option<serde_json::Value>,
    /// `err_msg`.
    #[serde(default)]
    pub err_msg: Option<String>,
    /// `access_token`.
    #[serde(default)]
    pub access_token: Option<String>,
    /// `expires_in`, seconds, as sent.
    #[serde(default)]
    pub expires_in: Option<serde_json::Value>,
}

/// An `err_code` value as a number (the platform sends numbers; a numeric string is read too).
pub fn as_code(v: &serde_json::Value) -> Option<i64> {
    match v {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// The `err_code` of a JSON object, if it has one (a number or a numeric string). The
/// platform's answers start with it (`{"err_code":0,...`), which is read without a parser.
pub fn err_code(body: &[u8]) -> Option<i64> {
    // A UTF-8 byte-order mark, as some Windows-era servers send, is not part of the JSON.
    let body = body.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(body);
    if let Some(rest) = body.trim_ascii_start().strip_prefix(b"{\"err_code\":") {
        let rest = rest.trim_ascii_start();
        let end = rest
            .iter()
            .position(|b| !(b.is_ascii_digit() || *b == b'-'))
            .unwrap_or(rest.len());
        if end > 0
            && matches!(
                rest.get(end),
                Some(b',' | b'}' | b' ' | b'\n' | b'\r' | b'\t')
            )
        {
            if let Some(code) = std::str::from_utf8(&rest[..end])
                .ok()
                .and_then(|s| s.parse().ok())
            {
                return Some(code);
            }
        }
    }
    #[derive(serde::Deserialize)]
    struct Probe {
        err_code: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Probe>(body).ok()?.err_code? {
        serde_json::Value::Number(n) => n.as_i64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn err_code_is_read_from_numbers_and_strings_only() {
        assert_eq!(
            err_code(br#"{"err_code":49000,"err_msg":"invalid"}"#),
            Some(49000)
        );
        assert_eq!(
            err_code(br#"{"data":{"x":[1,2]},"err_code":"40005"}"#),
            Some(40005)
        );
        assert_eq!(err_code(br#"{"err_msg":"no code"}"#), None);
        assert_eq!(err_code(b"[1,2]"), None);
        assert_eq!(err_code(b"not json"), None);
        assert_eq!(err_code(br#"{"err_code":0,"err_msg":"success"}"#), Some(0));
        assert_eq!(err_code(br#" {"err_code": -1 }"#), Some(-1));
        assert_eq!(err_code(br#"{"err_code":4x}"#), None);
    }

    #[test]
    fn a_byte_order_mark_does_not_hide_the_code() {
        assert_eq!(err_code(b"\xEF\xBB\xBF{\"err_code\":49000}"), Some(49000));
    }

    #[test]
    fn queries_decode_plus_as_space_then_percent_escapes() {
        let pairs: Vec<(String, String)> =
            query_pairs("a=b+c&&corp_secret=x%2By&flag&k%5F=%E6%A9%99")
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
        assert_eq!(
            pairs,
            [
                ("a", "b c"),
                ("corp_secret", "x+y"),
                ("flag", ""),
                ("k_", "橙")
            ]
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
        );
    }

    #[test]
    fn bodies_are_the_platforms_shape() {
        assert_eq!(
            error_body(49000, "access_token \"x\" expired"),
            br#"{"err_code":49000,"err_msg":"access_token \"x\" expired"}"#
        );
        assert_eq!(
            token_answer("success", "t", 7),
            br#"{"err_code":0,"err_msg":"success","access_token":"t","expires_in":7}"#
        );
        assert_eq!(hex(&[0, 0xab, 0x10]), "00ab10");
    }
}
