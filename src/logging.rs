//! Log output: text or JSON lines on stderr, level from `--log-level`, else `RUST_LOG`, else
//! `info`.

use std::fmt::Display;
use std::sync::atomic::{AtomicBool, Ordering};

use tracing_subscriber::EnvFilter;

/// Set once `--log-format json` is installed: the commands' own messages go out as log
/// events too, so every line on stderr is JSON (SPEC section 2).
static JSON: AtomicBool = AtomicBool::new(false);

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
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(true);
    let result = match format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
    result.map_err(|e| format!("cannot install the logger: {e}"))?;
    JSON.store(format == LogFormat::Json, Ordering::Relaxed);
    Ok(())
}

/// A command's problem on stderr: as written (`file: key: what is wrong`) in text, an
/// `ERROR` event in JSON.
pub fn error(message: impl Display) {
    if JSON.load(Ordering::Relaxed) {
        tracing::error!(target: "cx_proxy::cli", "{message}");
    } else {
        eprintln!("{message}");
    }
}

/// A command's warning on stderr: `warning: …` in text, a `WARN` event in JSON.
pub fn warn(message: impl Display) {
    if JSON.load(Ordering::Relaxed) {
        tracing::warn!(target: "cx_proxy::cli", "{message}");
    } else {
        eprintln!("warning: {message}");
    }
}

/// A command's note on stderr (`check`'s verdict): as written in text, an `INFO` event in
/// JSON.
pub fn note(message: impl Display) {
    if JSON.load(Ordering::Relaxed) {
        tracing::info!(target: "cx_proxy::cli", "{message}");
    } else {
        eprintln!("{message}");
    }
}
