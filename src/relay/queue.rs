//! The durable queue: one SQLite database file (WAL, `synchronous = FULL`), owned by one
//! thread.
//!
//! SQLite because an operator can open the file with standard tools (`sqlite3
//! cx-callbacks.db 'select * from events'`), it commits durably with one fsync per
//! transaction in WAL mode, and `rusqlite` (bundled) is well kept; the relay's own code is
//! only the schema and the statements below. One thread owns the connection and takes jobs
//! from a channel; the callbacks that arrive while a commit is on disk are committed together
//! in the next transaction (group commit), so one fsync acknowledges many. A failed
//! statement drops the connection; the next job opens it again, so a disk that comes back
//! (a full disk emptied, an immutable file made writable) needs no restart.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use tokio::sync::oneshot;

/// The most jobs committed in one transaction.
const BATCH: usize = 256;

/// A verified callback to keep.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// The `[[callback]]` route's name.
    pub route: String,
    /// The nonce and signature: a repeat of both is the platform's retry.
    pub nonce: String,
    /// See `nonce`.
    pub signature: String,
    /// The original query string (with its signature), for delivery.
    pub query: String,
    /// The original `Content-Type`, if any.
    pub content_type: Option<String>,
    /// The original body.
    pub body: Vec<u8>,
    /// How long a nonce is remembered: twice the skew window, since a timestamp may be that
    /// far ahead of now as well as behind.
    pub remember: Duration,
}

/// What storing a callback did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    /// Kept (committed) under this `X-CX-Callback-Id`.
    New(String),
    /// The same nonce and signature were kept before: acknowledged, not kept twice.
    Repeat(String),
    /// The nonce was seen with another signature within the window: refused.
    Replay,
}

/// A kept event, as delivery needs it.
#[derive(Debug, Clone)]
pub struct Event {
    /// Row id (arrival order within the file).
    pub id: i64,
    /// `X-CX-Callback-Id`.
    pub callback_id: String,
    /// The original query string.
    pub query: String,
    /// The original `Content-Type`.
    pub content_type: Option<String>,
    /// The original body.
    pub body: Vec<u8>,
    /// Delivery attempts so far.
    pub attempts: u32,
    /// Not to be tried before (Unix ms).
    pub next_at: i64,
    /// Retried until `since + retry_for` (Unix ms; arrival, or the last redeliver).
    pub since: i64,
}

/// One dead-lettered event (`GET /callbacks`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DeadLetter {
    /// `X-CX-Callback-Id`.
    pub id: String,
    /// Arrival, Unix seconds.
    pub received_at: i64,
    /// Delivery attempts made.
    pub attempts: u32,
    /// Why the last attempt failed.
    pub last_error: Option<String>,
}

/// A route's queue at a glance.
#[derive(Debug, Clone, Default)]
pub struct RouteStats {
    /// Events waiting for delivery.
    pub pending: u64,
    /// Dead-lettered events.
    pub dead: u64,
    /// Arrival of the oldest pending event (Unix ms).
    pub oldest_pending: Option<i64>,
    /// The dead letters, oldest first (at most 100).
    pub dead_letters: Vec<DeadLetter>,
}

/// The queue could not do what was asked (the disk, the file, or the queue's thread).
#[derive(Debug, Clone, thiserror::Error)]
#[error("callback queue {path}: {message}")]
pub struct QueueError {
    path: String,
    message: String,
}

type Reply<T> = oneshot::Sender<Result<T, QueueError>>;

enum Job {
    Store(NewEvent, Reply<Stored>),
    Next(String, Reply<Option<Event>>),
    Delivered(i64, Reply<()>),
    Failed {
        id: i64,
        next_at: i64,
        error: String,
        dead: bool,
        reply: Reply<()>,
    },
    Redeliver(String, Reply<usize>),
    Stats(String, Reply<RouteStats>),
    Routes(Reply<Vec<(String, u64)>>),
}

/// The handle to the queue's thread; cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct Queue {
    tx: mpsc::Sender<Job>,
    path: PathBuf,
}

/// Now, Unix milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

impl Queue {
    /// Starts the queue's thread on the database at `path` (created if missing). A file that
    /// cannot be opened now is logged and tried again with every job, so the listener answers
    /// 503 `callback_unavailable` until it can.
    pub fn open(path: &Path) -> Self {
        let (tx, rx) = mpsc::channel();
        let owned = path.to_path_buf();
        let mut conn = match connect(&owned) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(queue = %owned.display(), error = %e, "callback queue cannot be opened; callbacks get 503 until it can");
                None
            }
        };
        let thread_path = owned.clone();
        let spawned = std::thread::Builder::new()
            .name("cx-callback-queue".into())
            .spawn(move || {
                while let Ok(first) = rx.recv() {
                    let mut batch = vec![first];
                    while batch.len() < BATCH {
                        match rx.try_recv() {
                            Ok(job) => batch.push(job),
                            Err(_) => break,
                        }
                    }
                    run(&thread_path, &mut conn, batch);
                }
            });
        if let Err(e) = spawned {
            tracing::error!(error = %e, "callback queue thread did not start");
        }
        Queue { tx, path: owned }
    }

    fn error(&self, message: impl Into<String>) -> QueueError {
        QueueError {
            path: self.path.display().to_string(),
            message: message.into(),
        }
    }

    async fn call<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, QueueError> {
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(job(reply))
            .map_err(|_| self.error("the queue's thread has ended"))?;
        rx.await
            .map_err(|_| self.error("the queue's thread has ended"))?
    }

    /// Commits a verified callback (or finds it was kept before, or is a replay).
    pub async fn store(&self, event: NewEvent) -> Result<Stored, QueueError> {
        self.call(|r| Job::Store(event, r)).await
    }

    /// The oldest pending event of `route`, if any.
    pub async fn next(&self, route: &str) -> Result<Option<Event>, QueueError> {
        self.call(|r| Job::Next(route.to_owned(), r)).await
    }

    /// The receiver took event `id`: it leaves the queue.
    pub async fn delivered(&self, id: i64) -> Result<(), QueueError> {
        self.call(|r| Job::Delivered(id, r)).await
    }

    /// An attempt failed: try again at `next_at` (Unix ms), or dead-letter it.
    pub async fn failed(
        &self,
        id: i64,
        next_at: i64,
        error: String,
        dead: bool,
    ) -> Result<(), QueueError> {
        self.call(|reply| Job::Failed {
            id,
            next_at,
            error,
            dead,
            reply,
        })
        .await
    }

    /// Puts `route`'s dead letters back in the queue; how many.
    pub async fn redeliver(&self, route: &str) -> Result<usize, QueueError> {
        self.call(|r| Job::Redeliver(route.to_owned(), r)).await
    }

    /// Every route with events in the file (pending or dead), and how many.
    pub async fn routes(&self) -> Result<Vec<(String, u64)>, QueueError> {
        self.call(Job::Routes).await
    }

    /// `route`'s queue at a glance.
    pub async fn stats(&self, route: &str) -> Result<RouteStats, QueueError> {
        self.call(|r| Job::Stats(route.to_owned(), r)).await
    }
}

fn connect(path: &Path) -> rusqlite::Result<Connection> {
    // The file holds the callbacks' contacts data: its owner's only. SQLite gives the WAL
    // and shared-memory files the database file's mode.
    let _ = crate::private::file_options()
        .create(true)
        .append(true)
        .open(path);
    let conn = Connection::open(path)?;
    conn.busy_timeout(Duration::from_secs(5))?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    // FULL: a commit is on disk (the WAL fsynced) before the platform hears 200.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS events (
             id INTEGER PRIMARY KEY AUTOINCREMENT,
             route TEXT NOT NULL,
             callback_id TEXT NOT NULL UNIQUE,
             query TEXT NOT NULL,
             content_type TEXT,
             body BLOB NOT NULL,
             received_at INTEGER NOT NULL,   -- Unix ms
             since INTEGER NOT NULL,         -- retry window start, Unix ms
             state INTEGER NOT NULL,         -- 0 pending, 2 dead (delivered rows are deleted)
             attempts INTEGER NOT NULL DEFAULT 0,
             next_at INTEGER NOT NULL,       -- Unix ms
             last_error TEXT
         );
         CREATE INDEX IF NOT EXISTS events_by_route ON events (route, state, id);
         CREATE TABLE IF NOT EXISTS nonces (
             route TEXT NOT NULL,
             nonce TEXT NOT NULL,
             signature TEXT NOT NULL,
             callback_id TEXT NOT NULL,
             seen_at INTEGER NOT NULL,       -- Unix ms
             PRIMARY KEY (route, nonce)
         );",
    )?;
    Ok(conn)
}

/// Runs one batch: every store in one transaction, then the rest one by one.
fn run(path: &Path, conn: &mut Option<Connection>, batch: Vec<Job>) {
    let err = |e: &dyn std::fmt::Display| QueueError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    if conn.is_none() {
        match connect(path) {
            Ok(c) => *conn = Some(c),
            Err(e) => {
                let e = err(&e);
                for job in batch {
                    fail(job, e.clone());
                }
                return;
            }
        }
    }
    let Some(c) = conn.as_mut() else { return };
    let (stores, rest): (Vec<Job>, Vec<Job>) =
        batch.into_iter().partition(|j| matches!(j, Job::Store(..)));
    let mut broken = false;
    if !stores.is_empty() {
        match store_all(c, &stores) {
            Ok(results) => {
                for (job, result) in stores.into_iter().zip(results) {
                    if let Job::Store(_, reply) = job {
                        let _ = reply.send(Ok(result));
                    }
                }
            }
            Err(e) => {
                tracing::error!(queue = %path.display(), error = %e, "callbacks could not be committed");
                broken = true;
                let e = err(&e);
                for job in stores {
                    fail(job, e.clone());
                }
            }
        }
    }
    for job in rest {
        if one(path, c, job) {
            tracing::warn!(queue = %path.display(), "callback queue statement failed");
            broken = true;
        }
    }
    if broken {
        *conn = None;
    }
}

fn fail(job: Job, e: QueueError) {
    match job {
        Job::Store(_, r) => drop(r.send(Err(e))),
        Job::Next(_, r) => drop(r.send(Err(e))),
        Job::Delivered(_, r) | Job::Failed { reply: r, .. } => drop(r.send(Err(e))),
        Job::Redeliver(_, r) => drop(r.send(Err(e))),
        Job::Stats(_, r) => drop(r.send(Err(e))),
        Job::Routes(r) => drop(r.send(Err(e))),
    }
}

fn store_all(c: &mut Connection, stores: &[Job]) -> rusqlite::Result<Vec<Stored>> {
    let tx = c.transaction()?;
    let now = now_ms();
    let mut out = Vec::with_capacity(stores.len());
    for job in stores {
        let Job::Store(ev, _) = job else { continue };
        let window = i64::try_from(ev.remember.as_millis()).unwrap_or(i64::MAX);
        let seen: Option<(String, String)> = tx
            .query_row(
                "SELECT signature, callback_id FROM nonces
                 WHERE route = ?1 AND nonce = ?2 AND seen_at >= ?3",
                params![ev.route, ev.nonce, now.saturating_sub(window)],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        let result = match seen {
            Some((sig, id)) if sig.eq_ignore_ascii_case(&ev.signature) => Stored::Repeat(id),
            Some(_) => Stored::Replay,
            None => {
                let id = callback_id(&ev.route, &ev.nonce, &ev.signature);
                tx.execute(
                    "INSERT OR REPLACE INTO nonces (route, nonce, signature, callback_id, seen_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)",
                    params![ev.route, ev.nonce, ev.signature, id, now],
                )?;
                // A callback still queued (pending or dead) is never rewritten: sent again
                // past the nonce window it stays where it was, with its attempts.
                let added = tx.execute(
                    "INSERT OR IGNORE INTO events
                     (route, callback_id, query, content_type, body, received_at, since, state, next_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, 0, ?6)",
                    params![ev.route, id, ev.query, ev.content_type, ev.body, now],
                )?;
                if added == 1 {
                    Stored::New(id)
                } else {
                    Stored::Repeat(id)
                }
            }
        };
        out.push(result);
    }
    // Nonces older than a day past their window are of no use any more.
    tx.execute(
        "DELETE FROM nonces WHERE seen_at < ?1",
        params![now - 86_400_000 * 2],
    )?;
    tx.commit()?;
    Ok(out)
}

/// Runs one job that is not a store; true if its statement failed.
fn one(path: &Path, c: &Connection, job: Job) -> bool {
    fn answer<T>(path: &Path, reply: Reply<T>, result: rusqlite::Result<T>) -> bool {
        let failed = result.is_err();
        let _ = reply.send(result.map_err(|e| QueueError {
            path: path.display().to_string(),
            message: e.to_string(),
        }));
        failed
    }
    match job {
        Job::Store(..) => false,
        Job::Next(route, reply) => {
            let next = c
                .query_row(
                    "SELECT id, callback_id, query, content_type, body, attempts, next_at, since
                     FROM events WHERE route = ?1 AND state = 0 ORDER BY id LIMIT 1",
                    params![route],
                    |r| {
                        Ok(Event {
                            id: r.get(0)?,
                            callback_id: r.get(1)?,
                            query: r.get(2)?,
                            content_type: r.get(3)?,
                            body: r.get(4)?,
                            attempts: r.get(5)?,
                            next_at: r.get(6)?,
                            since: r.get(7)?,
                        })
                    },
                )
                .optional();
            answer(path, reply, next)
        }
        Job::Delivered(id, reply) => {
            let done = c.execute("DELETE FROM events WHERE id = ?1", params![id]);
            answer(path, reply, done.map(drop))
        }
        Job::Failed {
            id,
            next_at,
            error,
            dead,
            reply,
        } => {
            let done = c.execute(
                "UPDATE events SET attempts = attempts + 1, next_at = ?2, last_error = ?3,
                 state = CASE WHEN ?4 THEN 2 ELSE 0 END WHERE id = ?1",
                params![id, next_at, error, dead],
            );
            answer(path, reply, done.map(drop))
        }
        Job::Redeliver(route, reply) => {
            let done = c.execute(
                "UPDATE events SET state = 0, attempts = 0, since = ?2, next_at = ?2
                 WHERE route = ?1 AND state = 2",
                params![route, now_ms()],
            );
            answer(path, reply, done)
        }
        Job::Stats(route, reply) => answer(path, reply, stats(c, &route)),
        Job::Routes(reply) => {
            let routes = c
                .prepare("SELECT route, count(*) FROM events GROUP BY route ORDER BY route")
                .and_then(|mut stmt| {
                    stmt.query_map([], |r| {
                        Ok((
                            r.get::<_, String>(0)?,
                            u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0),
                        ))
                    })?
                    .collect::<rusqlite::Result<Vec<_>>>()
                });
            answer(path, reply, routes)
        }
    }
}

fn stats(c: &Connection, route: &str) -> rusqlite::Result<RouteStats> {
    let (pending, oldest): (i64, Option<i64>) = c.query_row(
        "SELECT count(*), min(received_at) FROM events WHERE route = ?1 AND state = 0",
        params![route],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )?;
    let mut stmt = c.prepare(
        "SELECT callback_id, received_at, attempts, last_error FROM events
         WHERE route = ?1 AND state = 2 ORDER BY id LIMIT 100",
    )?;
    let dead_letters = stmt
        .query_map(params![route], |r| {
            Ok(DeadLetter {
                id: r.get(0)?,
                received_at: r.get::<_, i64>(1)? / 1000,
                attempts: r.get(2)?,
                last_error: r.get(3)?,
            })
        })?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    let dead: i64 = c.query_row(
        "SELECT count(*) FROM events WHERE route = ?1 AND state = 2",
        params![route],
        |r| r.get(0),
    )?;
    Ok(RouteStats {
        pending: u64::try_from(pending).unwrap_or(0),
        dead: u64::try_from(dead).unwrap_or(0),
        oldest_pending: oldest,
        dead_letters,
    })
}

/// `X-CX-Callback-Id`: the same for the same callback (route, nonce, signature), so a
/// receiver can drop a second delivery.
pub fn callback_id(route: &str, nonce: &str, signature: &str) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [route, nonce, &signature.to_ascii_lowercase()] {
        ctx.update(part.as_bytes());
        ctx.update(b"\0");
    }
    format!("cb-{}", crate::wire::hex(&ctx.finish().as_ref()[..12]))
}
