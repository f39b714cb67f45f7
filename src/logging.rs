//! Log output: `tracing-subscriber`, human-readable by default or one JSON
//! object per line. `RUST_LOG` wins over the config's level; otherwise a
//! reload applies a new `[log] level` live. Access lines use the target
//! `portcullis::access`, so they can be filtered on their own. Warnings
//! that a fault repeats per request or per connection go through
//! [`repeats`], which summarises them.
//!
//! Lines are written by a thread of their own (`tracing-appender`'s
//! non-blocking writer, buffered): a request formats its access line and
//! queues it, it never waits for a `write` to stdout. The queue is bounded
//! ([`QUEUED_LINES`]); when stdout cannot keep up, lines are dropped and
//! counted ([`dropped_lines`], `portcullis_log_lines_dropped_total`) rather
//! than stalling requests.

pub mod repeats;

pub use repeats::Repeats;

use crate::config::LogFormat;
use std::io::{BufWriter, Stdout};
use std::sync::OnceLock;
use tracing_appender::non_blocking::{ErrorCounter, NonBlockingBuilder, WorkerGuard};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Lines that may wait for the writer thread; past this, new lines are
/// dropped (and counted). About 2.5 MiB of 300-byte access lines, 200 ms
/// of a stalled stdout at 40,000 requests per second.
pub const QUEUED_LINES: usize = 8_192;

static DROPPED: OnceLock<ErrorCounter> = OnceLock::new();

/// Lines dropped because the queue to stdout was full.
pub fn dropped_lines() -> u64 {
    DROPPED.get().map_or(0, |c| c.dropped_lines() as u64)
}

/// Keeps the writer thread; dropping it writes out the queued lines. Hold it
/// until the process has logged its last line.
#[must_use = "dropping the guard stops the log writer"]
pub struct LogGuard(#[allow(dead_code)] Option<WorkerGuard>);

/// Installs the global subscriber (once; later calls are ignored and return
/// an empty guard).
pub fn init(format: LogFormat, level: &str) -> LogGuard {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    // Buffered: the writer thread flushes once per batch it drains.
    let (writer, guard) = NonBlockingBuilder::default()
        .lossy(true)
        .buffered_lines_limit(QUEUED_LINES)
        .thread_name("portcullis-log")
        .finish(BufWriter::<Stdout>::new(std::io::stdout()));
    let dropped = writer.error_counter();
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(writer),
            )
            .try_init(),
        LogFormat::Human => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(writer))
            .try_init(),
    };
    if installed.is_err() {
        return LogGuard(None);
    }
    let _ = DROPPED.set(dropped);
    if !from_env {
        let _ = LEVEL.set(handle);
    }
    LogGuard(Some(guard))
}

/// Applies a new `[log] level` (ignored when `RUST_LOG` set the filter).
/// `Err` names a directive that does not parse.
pub fn set_level(level: &str) -> Result<(), String> {
    let Some(handle) = LEVEL.get() else {
        return Ok(());
    };
    let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level {level:?}: {e}"))?;
    handle.reload(filter).map_err(|e| e.to_string())
}
