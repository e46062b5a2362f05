//! Log output: text or JSON lines on stderr, level from `--log-level`, else `RUST_LOG`, else
//! `info`; and the buffer those lines go through.
//!
//! At the default level every proxied request writes an access-log line. Written straight to
//! stderr that is one `write(2)` per request, in the request's path (measured on the bench:
//! +2.6 to 7.7 µs of CPU per request). Instead each thread appends its lines to a buffer of
//! its own, and a flusher thread writes the buffers out, in order, every
//! [`FLUSH_EVERY`] or as soon as one holds [`FLUSH_AT`] bytes, so a request never waits for
//! stderr. Only the flusher writes. When stderr is stuck (a full pipe nobody reads, a
//! stalled journald) the flusher waits, a thread's buffer stops at [`BACKLOG`], and lines
//! past it are dropped and counted (`cx_proxy_log_lines_dropped_total`, and a warning once
//! stderr takes lines again): requests go on, memory stays bounded. Lines a write refused
//! (the reader gone, a full disk) are counted the same way. [`flush`] has the
//! flusher write everything now and waits for it, at most [`FLUSH_WAIT`]; the binary calls
//! it before it exits, and the commands' own messages call it first, so nothing is lost or
//! reordered on SIGTERM while stderr takes lines, and a stuck one cannot hold the exit. A
//! process killed with SIGKILL loses at most the last [`FLUSH_EVERY`] of lines.
//!
//! Hand-written rather than `tracing-appender`'s non-blocking writer: that one allocates a
//! `Vec` per line and wakes its writer thread through a channel for each.

use std::fmt::Display;
use std::io::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock, PoisonError};
use std::time::Duration;

use tracing_subscriber::EnvFilter;

mod access;
mod civil;

pub use access::AccessLine;

/// Set once `--log-format json` is installed: the commands' own messages go out as log
/// events too, so every line on stderr is JSON (SPEC section 2).
static JSON: AtomicBool = AtomicBool::new(false);

/// Set once [`init`] has installed this crate's logger (its buffer and layout in force).
static INSTALLED: AtomicBool = AtomicBool::new(false);

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global subscriber. `level` is a tracing filter (`debug`, `cx_proxy=trace`, …).
pub fn init(format: LogFormat, level: Option<&str>) -> Result<(), String> {
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l:?}: {e}"))?,
        None => EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(|| Buffered)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))?;
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    INSTALLED.store(true, Ordering::Relaxed);
    start_flusher();
    // A panic's message goes straight to stderr: the lines logged before it go first.
    let report = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        // Never waits: the panicking thread may hold a buffer's lock.
        write_all_buffers(true);
        report(info);
    }));
    Ok(())
}

/// Longest a log line waits in its thread's buffer.
pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
/// A buffer holding this many bytes is written out at once (by the flusher).
pub const FLUSH_AT: usize = 32 * 1024;
/// A thread's buffer holds at most this many bytes; lines past it are dropped and counted.
pub const BACKLOG: usize = 1024 * 1024;
/// Longest [`flush`] waits for the flusher (stderr may be stuck).
pub const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// One thread's lines not yet written.
#[derive(Default)]
struct Pending {
    lines: Mutex<Vec<u8>>,
    /// Held while the lines taken from `lines` are written, so two writes of one buffer
    /// never pass each other.
    writing: Mutex<()>,
}

impl Pending {
    /// Writes what the buffer holds to stderr (`spare`: an empty buffer to leave in its
    /// place); with `busy_skips`, a buffer another thread (or this one) holds is left.
    fn write_out(&self, spare: &mut Vec<u8>, busy_skips: bool) {
        let Some(_turn) = lock(&self.writing, busy_skips) else {
            return;
        };
        {
            let Some(mut lines) = lock(&self.lines, busy_skips) else {
                return;
            };
            if lines.is_empty() {
                return;
            }
            std::mem::swap(&mut *lines, spare);
        }
        // A refused write (the reader gone, a full disk) loses the lines: counted, and
        // reported once stderr takes lines again (there is nowhere else to report it).
        let failed = std::io::stderr().lock().write_all(spare).is_err();
        if failed {
            let lines = memchr::memchr_iter(b'\n', spare).count().max(1);
            BUFFERS.dropped.fetch_add(lines as u64, Ordering::Relaxed);
        }
        BUFFERS.refusing.store(failed, Ordering::Relaxed);
        spare.clear();
    }
}

/// `mutex`'s guard, poisoned or not; with `busy_skips`, `None` rather than waiting for a
/// holder (the panic hook: the holder may be the panicking thread itself).
fn lock<T>(mutex: &Mutex<T>, busy_skips: bool) -> Option<std::sync::MutexGuard<'_, T>> {
    match mutex.try_lock() {
        Ok(guard) => Some(guard),
        Err(std::sync::TryLockError::Poisoned(p)) => Some(p.into_inner()),
        Err(std::sync::TryLockError::WouldBlock) if busy_skips => None,
        Err(std::sync::TryLockError::WouldBlock) => {
            Some(mutex.lock().unwrap_or_else(PoisonError::into_inner))
        }
    }
}

/// Every thread's buffer, and the flusher.
struct Buffers {
    all: Mutex<Vec<Arc<Pending>>>,
    flusher: OnceLock<std::thread::Thread>,
    /// A buffer reached [`FLUSH_AT`] and the flusher has been woken for it.
    woken: AtomicBool,
    /// Flushes asked for ([`flush`]), and the last asked for that the flusher has done.
    asked: AtomicU64,
    done: Mutex<u64>,
    done_cv: Condvar,
    /// Lines dropped since the start (a full buffer), and how many of them were reported.
    dropped: AtomicU64,
    reported: AtomicU64,
    /// A [`flush`] gave up waiting for the flusher, which has not finished a round since.
    stuck: AtomicBool,
    /// The last write to stderr failed.
    refusing: AtomicBool,
}

static BUFFERS: Buffers = Buffers {
    all: Mutex::new(Vec::new()),
    flusher: OnceLock::new(),
    woken: AtomicBool::new(false),
    asked: AtomicU64::new(0),
    done: Mutex::new(0),
    done_cv: Condvar::new(),
    dropped: AtomicU64::new(0),
    reported: AtomicU64::new(0),
    stuck: AtomicBool::new(false),
    refusing: AtomicBool::new(false),
};

/// Log lines dropped since the start because stderr did not take them: stuck, closed or
/// full (`cx_proxy_log_lines_dropped_total`).
pub fn dropped_lines() -> u64 {
    BUFFERS.dropped.load(Ordering::Relaxed)
}

thread_local! {
    static PENDING: Arc<Pending> = {
        let pending = Arc::<Pending>::default();
        BUFFERS
            .all
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(pending.clone());
        pending
    };
}

/// Has every thread's buffered log lines written to stderr now, and waits for that (at
/// most [`FLUSH_WAIT`]: a stuck stderr holds the flusher, not the caller).
pub fn flush() {
    let flusher = match BUFFERS.flusher.get() {
        Some(f) if f.id() != std::thread::current().id() => f,
        _ => return write_all_buffers(false),
    };
    let ticket = BUFFERS.asked.fetch_add(1, Ordering::AcqRel) + 1;
    flusher.unpark();
    // A flusher that kept the last caller waiting is still stuck: nobody waits again until
    // it finishes a round.
    if BUFFERS.stuck.load(Ordering::Relaxed) {
        return;
    }
    let done = BUFFERS.done.lock().unwrap_or_else(PoisonError::into_inner);
    let (done, waited) = BUFFERS
        .done_cv
        .wait_timeout_while(done, FLUSH_WAIT, |done| *done < ticket)
        .unwrap_or_else(PoisonError::into_inner);
    drop(done);
    if waited.timed_out() {
        BUFFERS.stuck.store(true, Ordering::Relaxed);
    }
}

/// [`flush`]; with `busy_skips`, buffers whose locks are held are left (the panic hook).
fn write_all_buffers(busy_skips: bool) {
    let all: Vec<Arc<Pending>> = {
        let Some(mut all) = lock(&BUFFERS.all, busy_skips) else {
            return;
        };
        let snapshot = all.clone();
        // Held by the list and the snapshot only: its thread has ended. Its lines are
        // written below, one last time.
        all.retain(|p| Arc::strong_count(p) > 2);
        snapshot
    };
    let mut spare = Vec::new();
    for pending in all {
        pending.write_out(&mut spare, busy_skips);
    }
}

/// Starts the thread that writes the buffers out (once).
fn start_flusher() {
    if BUFFERS.flusher.get().is_some() {
        return;
    }
    let spawned = std::thread::Builder::new()
        .name("cx-proxy-log".into())
        .spawn(|| loop {
            std::thread::park_timeout(FLUSH_EVERY);
            BUFFERS.woken.store(false, Ordering::Relaxed);
            let asked = BUFFERS.asked.load(Ordering::Acquire);
            write_all_buffers(false);
            report_dropped();
            *BUFFERS.done.lock().unwrap_or_else(PoisonError::into_inner) = asked;
            BUFFERS.stuck.store(false, Ordering::Relaxed);
            BUFFERS.done_cv.notify_all();
        });
    match spawned {
        Ok(handle) => {
            let _ = BUFFERS.flusher.set(handle.thread().clone());
        }
        // Lines still go out: each thread writes its own at BACKLOG, and at exit.
        Err(e) => eprintln!("cx-proxy: cannot start the log writer thread: {e}"),
    }
}

/// Once stderr takes lines again after some were dropped: a warning that says how many
/// (into the flusher's own buffer, written on its next round).
fn report_dropped() {
    // While writes fail, the report would only be lost (and counted) in turn.
    if BUFFERS.refusing.load(Ordering::Relaxed) {
        return;
    }
    let dropped = BUFFERS.dropped.load(Ordering::Relaxed);
    let reported = BUFFERS.reported.swap(dropped, Ordering::Relaxed);
    if dropped > reported {
        tracing::warn!(
            dropped = dropped - reported,
            "log lines dropped: stderr did not take them as fast as they came \
             (cx_proxy_log_lines_dropped_total counts them all)"
        );
    }
}

/// Writes one access-log line (its caller has checked that target `cx_proxy::access` is on
/// at info): into the thread's buffer when this crate's logger is installed, else as a
/// tracing event.
pub fn access(line: &AccessLine<'_>) {
    if !INSTALLED.load(Ordering::Relaxed) {
        return line.event();
    }
    let json = JSON.load(Ordering::Relaxed);
    // Formatted before the buffer's lock is taken: nothing that could panic runs under it.
    let formatted = SCRATCH.try_with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        scratch.clear();
        line.write(json, &mut scratch);
        append(|out| out.extend_from_slice(&scratch));
    });
    if formatted.is_err() {
        let mut own = Vec::new();
        line.write(json, &mut own);
        append(|out| out.extend_from_slice(&own));
    }
}

thread_local! {
    /// Where a thread formats its access lines.
    static SCRATCH: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Lets `write` append to the calling thread's buffer, then has it written out if it is
/// long enough.
fn append(write: impl FnOnce(&mut Vec<u8>)) {
    let mut write = Some(write);
    // A thread logging while it ends, after its buffer is gone, writes directly.
    let buffered = PENDING.try_with(|pending| {
        let flusher = BUFFERS.flusher.get().is_some();
        let held = {
            let mut lines = pending.lines.lock().unwrap_or_else(PoisonError::into_inner);
            match write.take() {
                // Full: stderr is not keeping up; the line is dropped, not waited for.
                Some(_) if flusher && lines.len() >= BACKLOG => {
                    BUFFERS.dropped.fetch_add(1, Ordering::Relaxed);
                }
                Some(write) => write(&mut lines),
                None => {}
            }
            lines.len()
        };
        if !flusher {
            pending.write_out(&mut Vec::new(), false);
        } else if held >= FLUSH_AT && !BUFFERS.woken.swap(true, Ordering::Relaxed) {
            if let Some(flusher) = BUFFERS.flusher.get() {
                flusher.unpark();
            }
        }
    });
    if let (Err(_), Some(write)) = (buffered, write) {
        let mut line = Vec::new();
        write(&mut line);
        let _ = std::io::stderr().lock().write_all(&line);
    }
}

/// The writer of one log line: appends it to the thread's buffer.
struct Buffered;

impl std::io::Write for Buffered {
    fn write(&mut self, line: &[u8]) -> std::io::Result<usize> {
        append(|out| out.extend_from_slice(line));
        Ok(line.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A command's problem on stderr: as written (`file: key: what is wrong`) in text, an
/// `ERROR` event in JSON.
pub fn error(message: impl Display) {
    if JSON.load(Ordering::Relaxed) {
        tracing::error!(target: "cx_proxy::cli", "{message}");
    } else {
        flush();
        eprintln!("{message}");
    }
}

/// A command's warning on stderr: `warning: …` in text, a `WARN` event in JSON.
pub fn warn(message: impl Display) {
    if JSON.load(Ordering::Relaxed) {
        tracing::warn!(target: "cx_proxy::cli", "{message}");
    } else {
        flush();
        eprintln!("warning: {message}");
    }
}

/// A command's note on stderr (`check`'s verdict): as written in text, an `INFO` event in
/// JSON.
pub fn note(message: impl Display) {
    if JSON.load(Ordering::Relaxed) {
        tracing::info!(target: "cx_proxy::cli", "{message}");
    } else {
        flush();
        eprintln!("{message}");
    }
}
