//! Checking a callback before anything is kept (PLATFORM.md section 4, SPEC section 8.2):
//! the four query parameters, the HMAC-SHA256 signature over the baseString, `corpid` and
//! `timestamp`. The nonce is checked against the queue (it remembers them).

use std::collections::BTreeMap;
use std::time::Duration;

use ring::hmac;
use subtle::ConstantTimeEq;

use crate::wire;

/// The parameters the platform adds to the callback URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Signed {
    /// `corpid`: the corp the callback is about.
    pub corpid: String,
    /// `timestamp`, as sent (seconds, or milliseconds when 13 digits).
    pub timestamp: String,
    /// `nonce`: with the signature, what makes a callback unique.
    pub nonce: String,
    /// `signature`: hex HMAC-SHA256 of the baseString.
    pub signature: String,
}

impl Signed {
    /// Reads the four parameters from a query string. `Err` names what is missing, empty or
    /// given twice (a 400 `bad_request`).
    pub fn from_query(query: Option<&str>) -> Result<Self, String> {
        let pairs: Vec<_> = wire::query_pairs(query.unwrap_or("")).collect();
        let one = |name: &str| -> Result<String, String> {
            let mut values = pairs.iter().filter(|(k, _)| k == name).map(|(_, v)| v);
            match (values.next(), values.next()) {
                (Some(v), None) if !v.is_empty() => Ok(v.clone().into_owned()),
                (Some(_), Some(_)) => Err(format!("query parameter {name} is given twice")),
                _ => Err(format!("query parameter {name} is missing")),
            }
        };
        Ok(Signed {
            corpid: one("corpid")?,
            timestamp: one("timestamp")?,
            nonce: one("nonce")?,
            signature: one("signature")?,
        })
    }
}

/// Why a callback was refused (the `reason` label and the 401's `err_msg`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// The signature does not match the route's key.
    Signature,
    /// `corpid` is not the route's app's `corp_id`.
    Corpid,
    /// `timestamp` is not a number or further than `max_skew_s` from now.
    Timestamp,
    /// The nonce was seen within the skew window with another signature.
    Nonce,
}

impl Rejection {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Rejection::Signature => "signature",
            Rejection::Corpid => "corpid",
            Rejection::Timestamp => "timestamp",
            Rejection::Nonce => "nonce",
        }
    }

    /// What the sender is told.
    pub fn message(self) -> &'static str {
        match self {
            Rejection::Signature => {
                "signature does not match (HMAC-SHA256 of the baseString with the route's key)"
            }
            Rejection::Corpid => "corpid is not the corp this callback URL belongs to",
            Rejection::Timestamp => "timestamp is missing, not a number or too far from now",
            Rejection::Nonce => "nonce was already used with another signature",
        }
    }
}

/// A callback body's top-level members as the signature reads them: name and the text
/// signed for it, in body order. Strings are their value (unescaped); numbers, booleans,
/// objects and arrays their JSON text as sent, with the whitespace between tokens removed
/// (so the receiver's bytes, not a re-serialisation that sorts members or rewrites numbers,
/// are what is checked); null members are left out. `Err` for a body that is not a JSON
/// object, or one that names a member twice (which member a receiver reads would be
/// anyone's guess).
pub fn members(body: &[u8]) -> Result<Vec<(String, String)>, &'static str> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    use serde_json::value::RawValue;
    struct Members;
    impl<'de> Visitor<'de> for Members {
        type Value = Vec<(String, Box<RawValue>)>;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut out: Self::Value = Vec::new();
            while let Some((k, v)) = map.next_entry::<String, Box<RawValue>>()? {
                if out.iter().any(|(seen, _)| *seen == k) {
                    return Err(serde::de::Error::custom("duplicate member"));
                }
                out.push((k, v));
            }
            Ok(out)
        }
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let raw = de
        .deserialize_map(Members)
        .and_then(|m| de.end().map(|()| m))
        .map_err(|e| {
            if e.to_string().starts_with("duplicate member") {
                "the callback body names a member twice"
            } else {
                "the callback body is not a JSON object"
            }
        })?;
    let mut out = Vec::with_capacity(raw.len());
    for (k, v) in raw {
        let text = v.get();
        if text == "null" {
            continue;
        }
        let value = if text.starts_with('"') {
            serde_json::from_str::<String>(text)
                .map_err(|_| "the callback body is not a JSON object")?
        } else {
            compact(text)
        };
        out.push((k, value));
    }
    Ok(out)
}

/// JSON text without the whitespace between tokens (strings kept as they are).
fn compact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let (mut in_string, mut escaped) = (false, false);
    for c in text.chars() {
        if in_string {
            out.push(c);
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_string = false,
                _ => {}
            }
        } else if c == '"' {
            in_string = true;
            out.push(c);
        } else if !c.is_ascii_whitespace() {
            out.push(c);
        }
    }
    out
}

/// The baseString of PLATFORM.md section 4: the body's [`members`] and `corpid`,
/// `timestamp`, `nonce` from the URL (which win over body members of the same name),
/// leaving out empty values, sorted by name in byte order, `name=value` joined by `&`
/// (SPEC section 8.2 fixes the reading where the documentation is silent).
pub fn base_string(members: &[(String, String)], signed: &Signed) -> String {
    let mut all: BTreeMap<&str, &str> = members
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    all.insert("corpid", &signed.corpid);
    all.insert("timestamp", &signed.timestamp);
    all.insert("nonce", &signed.nonce);
    let mut out = String::new();
    for (k, v) in all.iter().filter(|(_, v)| !v.is_empty()) {
        if !out.is_empty() {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// The signature the platform sends for `base` under `key`: lowercase hex HMAC-SHA256.
pub fn sign(key: &[u8], base: &str) -> String {
    let key = hmac::Key::new(hmac::HMAC_SHA256, key);
    wire::hex(hmac::sign(&key, base.as_bytes()).as_ref())
}

/// Checks a callback's signature, `corpid` and `timestamp` (not the nonce: the queue knows
/// which were seen). The signature is compared in constant time, hex in either case.
pub fn check(
    members: &[(String, String)],
    signed: &Signed,
    key: &[u8],
    corp_id: &str,
    now_unix: Duration,
    max_skew: Duration,
) -> Result<(), Rejection> {
    let expected = sign(key, &base_string(members, signed));
    let given = signed.signature.to_ascii_lowercase();
    if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        return Err(Rejection::Signature);
    }
    if signed.corpid != corp_id {
        return Err(Rejection::Corpid);
    }
    if !signed.timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Rejection::Timestamp);
    }
    let ts = signed
        .timestamp
        .parse::<u64>()
        .map_err(|_| Rejection::Timestamp)?;
    let at = if signed.timestamp.len() == 13 {
        Duration::from_millis(ts)
    } else {
        Duration::from_secs(ts)
    };
    if at.abs_diff(now_unix) > max_skew {
        return Err(Rejection::Timestamp);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed() -> Signed {
        Signed {
            corpid: "10001".into(),
            timestamp: "1700000000".into(),
            nonce: "n1".into(),
            signature: String::new(),
        }
    }

    #[test]
    fn base_string_takes_the_body_as_sent() {
        let body =
            br#"{"event_type":"user_add","b":null,"c":"","n":1.10,"big":123456789012345678901234,
            "t":true,"o":{"z":[1, "y"],"a":2},"s":"a\"b","corpid":"body-loses"}"#;
        let m = members(body).unwrap();
        assert_eq!(
            base_string(&m, &signed()),
            r#"big=123456789012345678901234&corpid=10001&event_type=user_add&n=1.10&nonce=n1&o={"z":[1,"y"],"a":2}&s=a"b&t=true&timestamp=1700000000"#
        );
        assert!(members(br#"{"a":1,"a":2}"#).unwrap_err().contains("twice"));
        assert!(members(b"[1]").unwrap_err().contains("not a JSON object"));
        assert!(members(b"{} x").is_err());
    }

    #[test]
    fn check_takes_either_hex_case_and_names_what_failed() {
        let body = Vec::new();
        let mut s = signed();
        s.signature = sign(b"k", &base_string(&body, &s)).to_uppercase();
        let now = Duration::from_secs(1_700_000_100);
        let skew = Duration::from_secs(300);
        assert_eq!(check(&body, &s, b"k", "10001", now, skew), Ok(()));
        assert_eq!(
            check(&body, &s, b"other", "10001", now, skew),
            Err(Rejection::Signature)
        );
        assert_eq!(
            check(&body, &s, b"k", "10002", now, skew),
            Err(Rejection::Corpid)
        );
        let later = Duration::from_secs(1_700_000_400);
        assert_eq!(
            check(&body, &s, b"k", "10001", later, skew),
            Err(Rejection::Timestamp)
        );
        // Milliseconds when 13 digits; digits only.
        s.timestamp = "1700000000000".into();
        s.signature = sign(b"k", &base_string(&body, &s));
        assert_eq!(check(&body, &s, b"k", "10001", now, skew), Ok(()));
        s.timestamp = "+1700000000".into();
        s.signature = sign(b"k", &base_string(&body, &s));
        assert_eq!(
            check(&body, &s, b"k", "10001", now, skew),
            Err(Rejection::Timestamp)
        );
    }

    #[test]
    fn the_four_parameters_are_required_once() {
        let q = "corpid=1&timestamp=2&nonce=3&signature=ab";
        assert!(Signed::from_query(Some(q)).is_ok());
        assert!(Signed::from_query(Some("corpid=1&timestamp=2&nonce=3"))
            .unwrap_err()
            .contains("signature is missing"));
        assert!(Signed::from_query(Some(&format!("{q}&nonce=4")))
            .unwrap_err()
            .contains("nonce is given twice"));
    }
}
