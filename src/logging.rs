//! Log output: `tracing-subscriber`, human-readable by default or one JSON
//! object per line. `RUST_LOG` wins over the config's level; otherwise a
//! reload applies a new `[log] level` live. Access lines use the target
//! `portcullis::access`, so they can be filtered on their own. Warnings
//! that a fault repeats per request or per connection go through
//! [`repeats`], which summarises them.

pub mod repeats;

pub use repeats::Repeats;

use crate::config::LogFormat;
use std::sync::OnceLock;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Registry, fmt, reload};

static LEVEL: OnceLock<reload::Handle<EnvFilter, Registry>> = OnceLock::new();

/// Installs the global subscriber (once; later calls are ignored).
pub fn init(format: LogFormat, level: &str) {
    let from_env = std::env::var_os("RUST_LOG").is_some();
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let (filter, handle) = reload::Layer::new(filter);
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout());
    let registry = tracing_subscriber::registry().with(filter);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(false)
                    .with_writer(std::io::stdout),
            )
            .try_init(),
        LogFormat::Human => registry
            .with(fmt::layer().with_ansi(ansi).with_writer(std::io::stdout))
            .try_init(),
    };
    if installed.is_ok() && !from_env {
        let _ = LEVEL.set(handle);
    }
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
