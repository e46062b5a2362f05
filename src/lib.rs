//! # cx-proxy
//!
//! An authenticating reverse proxy for the Cheng-Xun (橙讯) open platform. Legacy apps point
//! their base URL at it; it forwards every call to the platform over TLS with an access token
//! it fetched, cached and injected itself, so no app holds `corp_secret` or a token again.
//! The contract is `SPEC.md` (shared with the tests written outside this crate).
//!
//! # Layout
//!
//! | module | owns |
//! | --- | --- |
//! | [`cli`] | the command line: `run`, `check`, `sandbox`, `demo`, `corp-secret` |
//! | [`config`] | `proxy.toml`: parsing, validation, secret sources, the `check` rendering |
//! | [`server`] | the generic listener: accept loop, TLS handshake, peer identity, HTTP/1.1 + HTTP/2, limits, graceful shutdown |
//! | [`gateway`] | the running gateway: the configuration in force (swapped on SIGHUP), its listeners, [`ProxyHandle`] |
//! | [`proxy`] | the request path: refuse, route, local token endpoints, inject, rewrite, forward, the rejection probe and replay, access log |
//! | [`auth`] | the token: fetching it and caching it per app (moka, single flight) |
//! | [`upstream`] | the one pooled TLS client to the platform, and the [`Body`](upstream::Body) type that crosses the proxy |
//! | [`admin`], [`metrics`] | `/healthz`, `/readyz`, `/metrics`, forced refreshes |
//! | [`error`] | the proxy's own errors (SPEC section 5): kinds, statuses, codes; startup errors |
//! | [`platform`] | what the platform documents: token endpoints, error codes, APIs and their rate limits |
//! | [`sandbox`] | the offline platform emulator (SPEC section 7) |
//! | [`wire`] | the platform's wire format: query reading and writing, the error body, `err_code`, the token answer, hex |
//! | [`tls`], [`secret`], [`clock`], [`logging`] | support |
//!
//! # Life of a request
//!
//! 1. `server`: accept, spawn a task for the connection, TLS handshake under a timeout if
//!    configured, then hyper-util's auto builder serves HTTP/1.1 or HTTP/2 on it.
//! 2. [`Proxy::handle`]: refuse clients outside `allow` (403), `CONNECT` (405), HTTP/1
//!    absolute-form targets (400), bodies declared over `max_body_bytes` (413).
//! 3. Route: `X-CX-App` by name, else the longest matching `prefix`; none is 404. A token
//!    endpoint naming a configured app is answered from the cache (GET) or refused (405).
//! 4. Token: the app's cached token, or one fetch shared by every waiting request; a failed
//!    fetch answers 502 with the platform's code and message.
//! 5. Rewrite: the client's `access_token` (and the configured header) dropped, ours
//!    injected, hop-by-hop and forwarding headers stripped, `Host` set by the upstream pool.
//! 6. [`upstream`]: forward over a pooled TLS connection (h2 or http/1.1 by ALPN); stream
//!    both bodies; an HTTP/1 connection returns to the pool when its answer is read.
//! 7. [`proxy::probe`]: the answer's `err_code` (JSON, `text/*` or untyped; plain or
//!    compressed; held up to 64 KiB when its length is undeclared); one of the app's
//!    `invalid_codes` drops the token and replays the request once with a new one.
//! 8. One access-log line, query secrets shown as `***`.

//! # Layers
//!
//! Imports run one way (`tests/layers.rs` checks it): leaves ([`wire`], [`platform`],
//! [`error`], [`config`], [`secret`], [`clock`], [`metrics`], [`logging`]) know nothing of the
//! proxy; the engine ([`proxy`], [`auth`], [`upstream`], [`tls`], [`server`]) uses
//! the leaves; the host ([`cli`], [`gateway`], [`admin`], [`sandbox`]) puts it together.

#![forbid(unsafe_code)]
#![deny(missing_docs, rust_2018_idioms)]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod clock;
pub mod config;
pub mod error;
pub mod gateway;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod platform;
pub mod private;
pub mod proxy;
pub mod relay;
pub mod sandbox;
pub mod secret;
pub mod server;
pub mod status;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use config::Config;
pub use error::{ErrorKind, ProxyError, StartupError};
pub use gateway::ProxyHandle;
pub use proxy::Proxy;

/// A boxed error for body streams and other places where callers only report the cause.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;
