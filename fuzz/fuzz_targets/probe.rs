//! The `err_code` probe: the parser-free look at a body, and the whole probe over a body
//! sent plain or compressed, declared or not. Never a panic; the client gets the bytes
//! exactly as they came.
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use libfuzzer_sys::fuzz_target;

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = cx_proxy::wire::err_code(data);
    let Some((&how, body)) = data.split_first() else {
        return;
    };
    let coding = ["identity", "gzip", "deflate", "br"][usize::from(how & 3)];
    let mut resp = http::Response::new(cx_proxy::upstream::Body::full(Bytes::copy_from_slice(body)));
    resp.headers_mut()
        .insert(http::header::CONTENT_ENCODING, http::HeaderValue::from_static(coding));
    if how & 4 != 0 {
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
    }
    runtime().block_on(async {
        if let Ok((resp, _code)) =
            cx_proxy::proxy::probe::probe(resp, Duration::from_secs(1)).await
        {
            use http_body_util::BodyExt;
            let got = resp.into_body().collect().await.expect("body").to_bytes();
            assert_eq!(&got[..], body, "the client gets the bytes as they came");
        }
    });
});
