//! The platform's side of callbacks (PLATFORM.md section 4, SPEC section 7): a signed
//! `POST URL?corpid=&timestamp=&nonce=&signature=` with a JSON body, sent up to three times
//! one second apart while the answer is not 200, with the same nonce and signature each time.

use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use ring::rand::SecureRandom;
use serde_json::{Map, Value};

use crate::relay::verify::{base_string, members, sign, Signed};

/// Attempts per callback (PLATFORM.md section 4: "three times in all").
pub const ATTEMPTS: usize = 3;
/// The pause between attempts.
pub const PAUSE: Duration = Duration::from_secs(1);
/// How long one attempt waits for an answer.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);

/// `POST /__sandbox/callbacks/send`: one callback to send.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct CallbackSend {
    /// Where to (`http` or `https`).
    pub url: String,
    /// The Key set beside the URL, which signs the callback.
    pub key: String,
    /// `corpid`, a string or a number.
    pub corpid: Value,
    /// The JSON body (ignored for the address test).
    #[serde(default)]
    pub body: Map<String, Value>,
    /// Sends the address-test request instead (`{"event_type":"callback_url_test"}`: the
    /// real test body is not in our copy of the documentation).
    #[serde(default)]
    pub test: bool,
}

/// Sends `cb` as the platform does; the status of each attempt (0: no answer). Trusts the
/// system's roots and `extra_ca_pem` for an `https` URL.
pub async fn send(cb: &CallbackSend, extra_ca_pem: Option<&str>) -> Result<Vec<u16>, String> {
    let body = if cb.test {
        let mut m = Map::new();
        m.insert("event_type".into(), Value::from("callback_url_test"));
        m
    } else {
        cb.body.clone()
    };
    let corpid = match &cb.corpid {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let mut nonce = [0u8; 8];
    ring::rand::SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| "no randomness for the nonce".to_owned())?;
    let timestamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut signed = Signed {
        corpid,
        timestamp: timestamp.to_string(),
        nonce: crate::wire::hex(&nonce),
        signature: String::new(),
    };
    // Signed over the body's text as sent, as the relay reads it.
    let text = Value::Object(body).to_string();
    let members = members(text.as_bytes()).map_err(str::to_owned)?;
    signed.signature = sign(cb.key.as_bytes(), &base_string(&members, &signed));
    let query: String = url_query(&signed);
    let sep = if cb.url.contains('?') { '&' } else { '?' };
    let uri = format!("{}{sep}{query}", cb.url);
    let body = Bytes::from(text);

    let mut roots = crate::tls::upstream_roots(None).map_err(|e| e.to_string())?;
    if let Some(pem) = extra_ca_pem {
        for cert in crate::tls::parse_certs(pem.as_bytes()).map_err(|e| e.to_string())? {
            roots.add(cert).map_err(|e| e.to_string())?;
        }
    }
    let client = crate::relay::deliver::http_client(roots)?;

    let mut attempts = Vec::with_capacity(ATTEMPTS);
    for i in 0..ATTEMPTS {
        if i > 0 {
            tokio::time::sleep(PAUSE).await;
        }
        let req = Request::builder()
            .method(Method::POST)
            .uri(&uri)
            .header(CONTENT_TYPE, "application/json; charset=utf-8")
            .body(Full::new(body.clone()))
            .map_err(|e| format!("{e}"))?;
        let status = match tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(req)).await {
            Ok(Ok(resp)) => resp.status().as_u16(),
            _ => 0,
        };
        attempts.push(status);
        if status == StatusCode::OK.as_u16() {
            break;
        }
    }
    Ok(attempts)
}

/// `corpid=…&timestamp=…&nonce=…&signature=…`, each value percent-encoded.
fn url_query(s: &Signed) -> String {
    let enc = |v: &str| {
        percent_encoding::utf8_percent_encode(v, percent_encoding::NON_ALPHANUMERIC).to_string()
    };
    format!(
        "corpid={}&timestamp={}&nonce={}&signature={}",
        enc(&s.corpid),
        enc(&s.timestamp),
        enc(&s.nonce),
        enc(&s.signature)
    )
}
