//! The rejection probe (SPEC section 4.6): reads a small platform answer to learn its
//! `err_code`, so the proxy can tell a rejected token from any other answer.
//!
//! What is probed is what the platform's answers look like however they travel: JSON,
//! `text/*` or untyped; with or without a declared length; plain or compressed with gzip,
//! deflate or br (the client's `Accept-Encoding` is forwarded, so the platform may compress).
//! A compressed answer is decoded for the probe only: the client gets the platform's bytes.
//! An answer without a declared length is held up to [`CHECK_RESPONSE_MAX`]; if it ends within
//! them it is probed, else it streams on from where it was, with no byte lost or reordered.
//! Anything else (other types, larger declared lengths, other codings) streams untouched.
//!
//! The common case, a length-declared plain JSON answer, costs what it did before this probe
//! knew about encodings: one read of the body and a parser-free look at its first bytes.

use std::collections::VecDeque;
use std::io::Read;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{HeaderMap, CONTENT_ENCODING, CONTENT_TYPE};
use http::Response;
use http_body::Body as _;

use super::{declared_length, Chunks};
use crate::error::{ErrorKind, ProxyError};
use crate::upstream::Body;
use crate::wire::err_code;

/// Answers up to this size (declared, or held while undeclared) are checked for a rejected
/// token.
pub const CHECK_RESPONSE_MAX: u64 = 64 * 1024;
/// A compressed answer is decoded up to this many bytes for the probe; a larger one (a
/// decompression bomb, or simply not an error answer) is not a rejection.
const DECODED_MAX: u64 = 1024 * 1024;

/// How an answer's body is encoded (`Content-Encoding`, RFC 9110 section 8.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Coding {
    Identity,
    Gzip,
    Deflate,
    Br,
}

/// Whether an answer with these headers is one the probe reads, and how it is encoded.
/// `None`: it streams untouched.
fn probed_coding(headers: &HeaderMap) -> Option<Coding> {
    let typed = headers.get(CONTENT_TYPE).is_none_or(|ct| {
        let ct = ct.as_bytes();
        ct.trim_ascii().is_empty()
            || ct
                .get(..5)
                .is_some_and(|t| t.eq_ignore_ascii_case(b"text/"))
            || ct.windows(4).any(|w| w.eq_ignore_ascii_case(b"json"))
    });
    if !typed {
        return None;
    }
    let Some(ce) = headers.get(CONTENT_ENCODING) else {
        return Some(Coding::Identity);
    };
    // One coding only: a stack of them (`gzip, br`) is not something the platform sends.
    let ce = ce.to_str().ok()?.trim();
    if ce.eq_ignore_ascii_case("gzip") || ce.eq_ignore_ascii_case("x-gzip") {
        Some(Coding::Gzip)
    } else if ce.eq_ignore_ascii_case("deflate") {
        Some(Coding::Deflate)
    } else if ce.eq_ignore_ascii_case("br") {
        Some(Coding::Br)
    } else if ce.is_empty() || ce.eq_ignore_ascii_case("identity") {
        Some(Coding::Identity)
    } else {
        None
    }
}

/// Reads `resp` when it is an answer the probe looks at (see the module doc) and returns it
/// with its `err_code`, if it has one. The body the client gets is the platform's, byte for
/// byte: re-assembled when it was read whole, or the held part followed by the rest of the
/// stream. The read is bounded by `timeout`; an answer slower than that is not probed but
/// streamed on (its head came in time, so it is no `upstream_timeout`).
///
/// # Errors
/// `upstream_unreachable` when the body breaks off while it is read.
pub async fn probe(
    resp: Response<Body>,
    timeout: Duration,
) -> Result<(Response<Body>, Option<i64>), ProxyError> {
    if resp.body().is_end_stream() {
        return Ok((resp, None));
    }
    let Some(coding) = probed_coding(resp.headers()) else {
        return Ok((resp, None));
    };
    let declared = declared_length(resp.headers()).ok().flatten();
    // A declared length over the hold streams at once; an undeclared one is held.
    if declared.is_some_and(|n| n == 0 || n > CHECK_RESPONSE_MAX) {
        return Ok((resp, None));
    }
    let (parts, mut body) = resp.into_parts();
    let mut held = Chunks::default();
    let broke_off = |e: crate::BoxError| {
        ProxyError::new(
            ErrorKind::UpstreamUnreachable,
            format!("upstream response broke off: {e}"),
        )
    };
    // A small answer has usually arrived whole with its head: what is ready now is read
    // without arming a timer.
    let ready = std::future::poll_fn(|cx| Poll::Ready(hold_ready(&mut held, &mut body, cx)))
        .await
        .map_err(broke_off)?;
    // The chunks read stay in `held` whatever happens to the read: an answer slower than
    // `timeout` streams on, unprobed, from where it was (its head arrived in time).
    let ended = match ready {
        Some(ended) => ended,
        None => match tokio::time::timeout(timeout, hold(&mut held, &mut body)).await {
            Ok(read) => read.map_err(broke_off)?,
            Err(_) => {
                tracing::debug!(
                    held_bytes = held.len(),
                    "answer not probed: its body is slower than timeout_ms; streaming it on"
                );
                false
            }
        },
    };
    if !ended {
        let body = Body::Held {
            held: VecDeque::from([held.into_bytes()]),
            rest: Box::new(body),
        };
        return Ok((Response::from_parts(parts, body), None));
    }
    let bytes = held.into_bytes();
    let code = match coding {
        Coding::Identity => err_code(&bytes),
        coded => decode(coded, &bytes).and_then(|plain| err_code(&plain)),
    };
    Ok((Response::from_parts(parts, Body::full(bytes)), code))
}

/// Reads `body` into `held` until it ends (`true`) or passes [`CHECK_RESPONSE_MAX`]
/// (`false`). Cancel-safe: every chunk read is in `held` before the next await.
async fn hold(held: &mut Chunks, body: &mut Body) -> Result<bool, crate::BoxError> {
    std::future::poll_fn(|cx| match hold_ready(held, body, cx) {
        Ok(Some(ended)) => Poll::Ready(Ok(ended)),
        Ok(None) => Poll::Pending,
        Err(e) => Poll::Ready(Err(e)),
    })
    .await
}

/// Takes every frame `body` has ready into `held`: `Some(true)` when it ended, `Some(false)`
/// when it passed [`CHECK_RESPONSE_MAX`], `None` when it has nothing more ready (`cx` is
/// woken).
fn hold_ready(
    held: &mut Chunks,
    body: &mut Body,
    cx: &mut Context<'_>,
) -> Result<Option<bool>, crate::BoxError> {
    loop {
        let frame = match Pin::new(&mut *body).poll_frame(cx) {
            Poll::Pending => return Ok(None),
            Poll::Ready(None) => return Ok(Some(true)),
            Poll::Ready(Some(frame)) => frame?,
        };
        // Trailers are not something the platform sends; like a collected body, they are
        // not kept.
        if let Ok(data) = frame.into_data() {
            held.push(data);
        }
        if held.len() > CHECK_RESPONSE_MAX && !body.is_end_stream() {
            return Ok(Some(false));
        }
    }
}

/// The decoded form of a compressed answer, at most [`DECODED_MAX`] bytes; `None` when it
/// does not decode or is larger.
fn decode(coding: Coding, bytes: &[u8]) -> Option<Vec<u8>> {
    fn read_bounded(r: impl Read) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        r.take(DECODED_MAX + 1).read_to_end(&mut out).ok()?;
        (out.len() as u64 <= DECODED_MAX).then_some(out)
    }
    match coding {
        Coding::Identity => Some(bytes.to_vec()),
        Coding::Gzip => read_bounded(flate2::read::MultiGzDecoder::new(bytes)),
        // RFC 9110 section 8.4.1.2: "deflate" is the zlib format; some servers send raw
        // deflate data instead, so that is tried second.
        Coding::Deflate => read_bounded(flate2::read::ZlibDecoder::new(bytes))
            .or_else(|| read_bounded(flate2::read::DeflateDecoder::new(bytes))),
        Coding::Br => read_bounded(brotli::Decompressor::new(bytes, 4096)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::collect;
    use bytes::Bytes;

    fn answer(headers: &[(&str, &str)], body: Vec<u8>, declared: bool) -> Response<Body> {
        let mut b = Response::builder();
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        if declared {
            b = b.header("content-length", body.len());
        }
        // Chunks of at most 16 KiB whose total is unknown unless declared.
        let chunks: VecDeque<Bytes> = body.chunks(16 * 1024).map(Bytes::copy_from_slice).collect();
        b.body(Body::Held {
            held: chunks,
            rest: Box::new(Body::Empty),
        })
        .unwrap()
    }

    async fn probed(resp: Response<Body>) -> (Bytes, Option<i64>) {
        let (resp, code) = probe(resp, Duration::from_secs(5)).await.unwrap();
        (collect(resp.into_body()).await.unwrap(), code)
    }

    const DEAD: &[u8] = br#"{"err_code":49000,"err_msg":"access_token is invalid"}"#;

    #[tokio::test]
    async fn every_encoding_is_decoded_for_the_probe_only() {
        use std::io::Write as _;
        let gzip = {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(DEAD).unwrap();
            e.finish().unwrap()
        };
        let zlib = {
            let mut e = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(DEAD).unwrap();
            e.finish().unwrap()
        };
        let raw = {
            let mut e = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(DEAD).unwrap();
            e.finish().unwrap()
        };
        let br = {
            let mut out = Vec::new();
            {
                let mut e = brotli::CompressorWriter::new(&mut out, 4096, 5, 22);
                e.write_all(DEAD).unwrap();
            }
            out
        };
        for (coding, bytes) in [
            ("gzip", gzip),
            ("deflate", zlib),
            ("deflate", raw),
            ("br", br),
        ] {
            for declared in [true, false] {
                let resp = answer(
                    &[
                        ("content-type", "application/json"),
                        ("content-encoding", coding),
                    ],
                    bytes.clone(),
                    declared,
                );
                let (body, code) = probed(resp).await;
                assert_eq!(code, Some(49000), "{coding} declared={declared}");
                assert_eq!(
                    &body[..],
                    &bytes[..],
                    "{coding}: the client gets the bytes as sent"
                );
            }
        }
    }

    #[tokio::test]
    async fn types_and_codings_outside_the_platforms_shapes_stream_untouched() {
        for headers in [
            &[("content-type", "application/octet-stream")][..],
            &[("content-type", "image/png")][..],
            &[("content-encoding", "gzip, br")][..],
            &[("content-encoding", "zstd")][..],
        ] {
            let (body, code) = probed(answer(headers, DEAD.to_vec(), true)).await;
            assert_eq!(code, None, "{headers:?}");
            assert_eq!(&body[..], DEAD);
        }
        for headers in [
            &[][..],
            &[("content-type", "")][..],
            &[("content-type", "TEXT/plain; charset=gbk")][..],
            &[("content-type", "application/problem+json")][..],
            &[("content-encoding", "identity")][..],
        ] {
            let (_, code) = probed(answer(headers, DEAD.to_vec(), false)).await;
            assert_eq!(code, Some(49000), "{headers:?}");
        }
    }

    #[tokio::test]
    async fn an_undeclared_body_past_the_hold_streams_on_whole_and_in_order() {
        let mut big = DEAD.to_vec();
        big.extend((0..100_000u32).map(|i| (i % 251) as u8));
        let resp = answer(&[("content-type", "application/json")], big.clone(), false);
        let (resp, code) = probe(resp, Duration::from_secs(5)).await.unwrap();
        assert_eq!(code, None, "not probed: it did not end within the hold");
        assert!(matches!(resp.body(), Body::Held { .. }));
        assert_eq!(&collect(resp.into_body()).await.unwrap()[..], &big[..]);
    }
}
