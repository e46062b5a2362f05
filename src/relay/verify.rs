//! Checking a callback before anything is kept (PLATFORM.md section 4, SPEC section 8.2):
//! the four query parameters, the HMAC-SHA256 signature over the baseString, `corpid` and
//! `timestamp`. The nonce is checked against the queue (it remembers them).

use std::collections::BTreeMap;
use std::time::Duration;

use ring::hmac;
use serde_json::{Map, Value};
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

/// The baseString of PLATFORM.md section 4: the body's members and `corpid`, `timestamp`,
/// `nonce` from the URL (which win over body members of the same name), leaving out null,
/// `""`; sorted by name in byte order; `name=value` joined by `&`. Strings are written as
/// they are, numbers and booleans as their JSON text, objects and arrays as compact JSON
/// (the documentation is silent on those; SPEC section 8.2 fixes this reading).
pub fn base_string(body: &Map<String, Value>, signed: &Signed) -> String {
    let mut members: BTreeMap<&str, std::borrow::Cow<'_, str>> = BTreeMap::new();
    for (k, v) in body {
        let text = match v {
            Value::Null => continue,
            Value::String(s) => std::borrow::Cow::Borrowed(s.as_str()),
            other => std::borrow::Cow::Owned(other.to_string()),
        };
        members.insert(k, text);
    }
    for (k, v) in [
        ("corpid", &signed.corpid),
        ("timestamp", &signed.timestamp),
        ("nonce", &signed.nonce),
    ] {
        members.insert(k, std::borrow::Cow::Borrowed(v.as_str()));
    }
    let mut out = String::new();
    for (k, v) in members.iter().filter(|(_, v)| !v.is_empty()) {
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
    body: &Map<String, Value>,
    signed: &Signed,
    key: &[u8],
    corp_id: &str,
    now_unix: Duration,
    max_skew: Duration,
) -> Result<(), Rejection> {
    let expected = sign(key, &base_string(body, signed));
    let given = signed.signature.to_ascii_lowercase();
    if !bool::from(expected.as_bytes().ct_eq(given.as_bytes())) {
        return Err(Rejection::Signature);
    }
    if signed.corpid != corp_id {
        return Err(Rejection::Corpid);
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
    fn base_string_sorts_skips_empty_and_writes_json_text() {
        let body: Map<String, Value> = serde_json::from_str(
            r#"{"event_type":"user_add","b":null,"c":"","n":12,"t":true,"o":{"x":[1,"y"]},"corpid":"body-loses"}"#,
        )
        .unwrap();
        assert_eq!(
            base_string(&body, &signed()),
            r#"corpid=10001&event_type=user_add&n=12&nonce=n1&o={"x":[1,"y"]}&t=true&timestamp=1700000000"#
        );
    }

    #[test]
    fn check_takes_either_hex_case_and_names_what_failed() {
        let body = Map::new();
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
        // Milliseconds when 13 digits.
        s.timestamp = "1700000000000".into();
        s.signature = sign(b"k", &base_string(&body, &s));
        assert_eq!(check(&body, &s, b"k", "10001", now, skew), Ok(()));
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
