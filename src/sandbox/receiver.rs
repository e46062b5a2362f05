//! A small internal receiver for relayed callbacks (`demo` and tests): records every request
//! and answers 200, or the status it is told to.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::net::TcpListener;
use tokio::sync::{oneshot, Notify};
use tokio::task::JoinHandle;

use crate::error::StartupError;

/// One request the receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    /// The method.
    pub method: String,
    /// The path.
    pub path: String,
    /// The query string (empty when none).
    pub query: String,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// The body.
    pub body: Bytes,
}

impl Received {
    /// The first value of header `name` (lowercase).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Debug)]
struct State {
    got: Mutex<(Vec<Received>, u16)>,
    arrived: Notify,
}

/// A running receiver.
#[derive(Debug)]
pub struct Receiver {
    addr: SocketAddr,
    state: Arc<State>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Receiver {
    /// Listens on `listen` (port 0 picks one).
    pub async fn start(listen: SocketAddr) -> Result<Self, StartupError> {
        let listener = TcpListener::bind(listen)
            .await
            .map_err(|source| StartupError::Bind {
                addr: listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| StartupError::Bind {
            addr: listen,
            source,
        })?;
        let state = Arc::new(State {
            got: Mutex::new((Vec::new(), 200)),
            arrived: Notify::new(),
        });
        let s = state.clone();
        let make = move |_peer: crate::server::Peer| {
            let s = s.clone();
            hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                let s = s.clone();
                async move {
                    let (parts, body) = req.into_parts();
                    let body = body
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    let status = {
                        let mut got = s.got.lock().unwrap_or_else(PoisonError::into_inner);
                        if got.1 == 200 {
                            got.0.push(Received {
                                method: parts.method.to_string(),
                                path: parts.uri.path().to_owned(),
                                query: parts.uri.query().unwrap_or("").to_owned(),
                                headers: parts
                                    .headers
                                    .iter()
                                    .map(|(k, v)| {
                                        (k.as_str().to_owned(), v.to_str().unwrap_or("").to_owned())
                                    })
                                    .collect(),
                                body,
                            });
                        }
                        got.1
                    };
                    s.arrived.notify_waiters();
                    let mut resp = Response::new(Full::new(Bytes::from_static(b"ok")));
                    *resp.status_mut() =
                        StatusCode::from_u16(status).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
                    Ok::<_, std::convert::Infallible>(resp)
                }
            })
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(crate::server::serve::<_, _, Full<Bytes>>(
            listener,
            make,
            async {
                let _ = stopped.await;
            },
            crate::server::Serving::plain(Duration::from_secs(1)),
        ));
        Ok(Receiver {
            addr,
            state,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where it listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://ADDR{path}`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// What it took (answered 200), in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state
            .got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .0
            .clone()
    }

    /// Answers `status` from now on (not 200: the request is not recorded).
    pub fn answer(&self, status: u16) {
        self.state
            .got
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .1 = status;
    }

    /// Waits until it has taken `n` requests or `timeout` passed; how many it has.
    pub async fn wait_for(&self, n: usize, timeout: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let arrived = self.state.arrived.notified();
            let have = self.received().len();
            if have >= n || tokio::time::Instant::now() >= deadline {
                return have;
            }
            let _ = tokio::time::timeout_at(deadline, arrived).await;
        }
    }

    /// Stops listening.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}
