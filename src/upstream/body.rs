//! The one body type the proxy sends and receives. It lives beside the pool because an
//! upstream answer's body holds the pool's [`Lease`] until it is read, and the pool's
//! connections carry this type.
//!
//! An enum rather than a boxed trait object: the hot path forwards an `Incoming` body as it
//! is, and the proxy's own answers are a single `Bytes` chunk, so neither needs an allocation
//! to be type-erased.

use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::Response;
use http_body::{Frame, SizeHint};
use hyper::body::Incoming;

use super::Lease;
use crate::error::{ProxyError, ERROR_HEADER};
use crate::BoxError;

/// A request or response body: nothing, one chunk, or a stream from a peer.
#[derive(Debug, Default)]
pub enum Body {
    /// No body.
    #[default]
    Empty,
    /// One chunk, sent once.
    Full(Option<Bytes>),
    /// Streamed from the other side of the proxy.
    Incoming(Incoming),
    /// Streamed from the upstream, holding its `max_connections` slot (and an HTTP/1
    /// connection) until read to the end, which hands the connection back to the pool, or
    /// dropped.
    Upstream {
        /// The stream.
        inner: Incoming,
        /// The slot and connection.
        lease: Lease,
    },
    /// Streamed, but failing once more than `remaining` bytes arrive (bodies without a
    /// declared length); `tripped` tells the proxy why the upstream exchange broke off.
    Limited {
        /// The stream.
        inner: Incoming,
        /// Bytes still allowed.
        remaining: u64,
        /// Set when the limit was passed.
        tripped: Arc<AtomicBool>,
    },
    /// A stream whose first chunks were read ahead (the rejection probe's hold): those
    /// chunks, then the rest of the stream.
    Held {
        /// Chunks read ahead, in order.
        held: VecDeque<Bytes>,
        /// The stream they came from, going on where they stopped.
        rest: Box<Body>,
    },
}

impl ProxyError {
    /// The response sent to the client: the kind's status, the JSON body of SPEC section 5,
    /// `x-cx-proxy-error`.
    pub fn into_response(self) -> Response<Body> {
        self.to_response()
    }

    /// [`ProxyError::into_response`] without giving the error up (it is logged after).
    pub fn to_response(&self) -> Response<Body> {
        let mut resp = Response::new(Body::full(self.body_json()));
        *resp.status_mut() = self.kind.status();
        let headers = resp.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        headers.insert(ERROR_HEADER, HeaderValue::from_static(self.kind.name()));
        if let Some(secs) = self.retry_after_secs() {
            headers.insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

/// A streamed body passed `max_body_bytes`.
#[derive(Debug, thiserror::Error)]
#[error("request body over the size limit")]
pub struct BodyTooLarge;

impl Body {
    /// A body of one chunk.
    pub fn full(bytes: impl Into<Bytes>) -> Self {
        let bytes = bytes.into();
        if bytes.is_empty() {
            Body::Empty
        } else {
            Body::Full(Some(bytes))
        }
    }
}

impl From<Incoming> for Body {
    fn from(body: Incoming) -> Self {
        Body::Incoming(body)
    }
}

impl http_body::Body for Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            Body::Empty => Poll::Ready(None),
            Body::Full(chunk) => Poll::Ready(chunk.take().map(|b| Ok(Frame::data(b)))),
            Body::Incoming(body) => Pin::new(body)
                .poll_frame(cx)
                .map(|f| f.map(|r| r.map_err(Into::into))),
            Body::Upstream { inner, lease } => {
                let polled = Pin::new(&mut *inner).poll_frame(cx);
                // Released at the last frame rather than at the `None` after it, so the
                // connection is back in the pool before the response is even written out.
                match &polled {
                    Poll::Ready(None) => lease.finish(),
                    Poll::Ready(Some(Ok(_))) if inner.is_end_stream() => lease.finish(),
                    _ => {}
                }
                polled.map(|f| f.map(|r| r.map_err(Into::into)))
            }
            Body::Limited {
                inner,
                remaining,
                tripped,
            } => match Pin::new(inner).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => {
                    let len = frame.data_ref().map_or(0, |d| d.len() as u64);
                    if len > *remaining {
                        tripped.store(true, Ordering::SeqCst);
                        return Poll::Ready(Some(Err(Box::new(BodyTooLarge))));
                    }
                    *remaining -= len;
                    Poll::Ready(Some(Ok(frame)))
                }
                other => other.map(|f| f.map(|r| r.map_err(Into::into))),
            },
            Body::Held { held, rest } => match held.pop_front() {
                Some(chunk) => Poll::Ready(Some(Ok(Frame::data(chunk)))),
                None => Pin::new(&mut **rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Body::Empty => true,
            Body::Full(chunk) => chunk.is_none(),
            Body::Incoming(body)
            | Body::Upstream { inner: body, .. }
            | Body::Limited { inner: body, .. } => body.is_end_stream(),
            Body::Held { held, rest } => held.is_empty() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Body::Empty => SizeHint::with_exact(0),
            Body::Full(chunk) => SizeHint::with_exact(chunk.as_ref().map_or(0, |b| b.len() as u64)),
            Body::Incoming(body)
            | Body::Upstream { inner: body, .. }
            | Body::Limited { inner: body, .. } => body.size_hint(),
            Body::Held { held, rest } => {
                let ahead: u64 = held.iter().map(|b| b.len() as u64).sum();
                let rest = rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(rest.lower() + ahead);
                if let Some(upper) = rest.upper() {
                    hint.set_upper(upper + ahead);
                }
                hint
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use http::StatusCode;

    #[test]
    fn response_has_status_header_and_json_body() {
        let resp = ProxyError::new(ErrorKind::NoRoute, "no app for \"/x\"").into_response();
        assert_eq!(resp.status(), StatusCode::NOT_FOUND);
        assert_eq!(resp.headers()[ERROR_HEADER], "no_route");
        assert_eq!(resp.headers()[CONTENT_TYPE], "application/json");
        let err = ProxyError::new(ErrorKind::NoRoute, "no app for \"/x\"");
        let v: serde_json::Value = serde_json::from_slice(&err.body_json()).unwrap();
        assert_eq!(v["err_code"], 990_404);
        assert_eq!(v["err_msg"], "no app for \"/x\"");
    }
}
