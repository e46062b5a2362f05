//! What the legacy-style examples share: a plain HTTP/1.1 client and the base URL.
//! (Included with `#[path]`; not an example of its own.)

#![allow(dead_code)]

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::TokioExecutor;

/// The base URL the legacy app now uses: the proxy, not the platform.
pub fn base_url() -> String {
    std::env::var("CX_BASE_URL").unwrap_or_else(|_| "http://127.0.0.1:8080".into())
}

/// Sends a request with no credentials at all and prints the platform's answer.
pub async fn call(
    method: http::Method,
    path: &str,
    json: Option<String>,
) -> Result<(), Box<dyn std::error::Error>> {
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::builder()
        .method(method)
        .uri(format!("{}{path}", base_url()));
    if json.is_some() {
        req = req.header("content-type", "application/json");
    }
    let req = req.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
    let resp = client.request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    println!("HTTP {status}\n{}", String::from_utf8_lossy(&body));
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    if v["err_code"] != 0 {
        return Err(format!("platform or proxy error: {v}").into());
    }
    Ok(())
}
