//! Hot reload: on a change of the config file (rename or in-place write),
//! of the TLS certificate or key files, or on SIGHUP, parse and
//! validate the file and swap the whole snapshot in. A bad file is logged
//! (file:line:col) and counted; the running config stays.
//!
//! A change applies once the files have settled: two checks, [`POLL`]
//! apart, that see the same content, size and modification time. Many
//! prefixes of a good config are themselves valid (a `[server]` table and
//! no routes yet), so a file read while it is being written must not be
//! applied. SIGHUP applies what is there at once: the operator says the
//! file is complete. Writing a temporary file and renaming it over the
//! config is the safe way to change it either way.

use crate::listener::TlsReloader;
use crate::metrics::ResultLabel;
use crate::server::App;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

/// How often the files are checked for changes. A change applies once two
/// checks in a row see the same files: unchanged for at least this long.
const POLL: Duration = Duration::from_millis(250);

/// What one check sees of one watched file: its content's hash and, when it
/// could be read, its size and modification time. The content decides
/// whether the file changed; all three must hold still for it to settle.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Seen {
    content: u64,
    meta: Option<(u64, Option<std::time::SystemTime>)>,
}

/// What one check sees of every watched file (a missing file hashes its
/// error kind).
async fn fingerprint(paths: &[PathBuf]) -> Vec<Seen> {
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let meta = tokio::fs::metadata(p)
            .await
            .ok()
            .map(|m| (m.len(), m.modified().ok()));
        let content = match tokio::fs::read(p).await {
            Ok(bytes) => crate::config::content_hash(&bytes),
            Err(e) => {
                let mut h = DefaultHasher::new();
                e.kind().hash(&mut h);
                h.finish()
            }
        };
        out.push(Seen { content, meta });
    }
    out
}

/// Whether two checks saw different content in any file.
fn content_differs(a: &[Seen], b: &[Seen]) -> bool {
    a.len() != b.len() || a.iter().zip(b).any(|(x, y)| x.content != y.content)
}

fn watched(app: &App, tls: &Option<TlsReloader>) -> Vec<PathBuf> {
    let s = app.snapshot();
    let mut v = vec![s.config.source.clone()];
    if let Some(t) = tls {
        let f = t.files();
        v.push(f.cert.clone());
        v.push(f.key.clone());
    }
    v
}

/// SIGHUP, registered as early as possible: until a handler exists, SIGHUP
/// kills the process.
#[cfg(unix)]
pub type Hangup = Option<tokio::signal::unix::Signal>;
/// No SIGHUP off Unix.
#[cfg(not(unix))]
pub type Hangup = Option<()>;

/// Registers the SIGHUP handler (call before anything slow at start-up).
pub fn hangup() -> Hangup {
    #[cfg(unix)]
    {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok()
    }
    #[cfg(not(unix))]
    {
        None
    }
}

/// Runs until shutdown, reloading on file changes and SIGHUP.
pub async fn watch(
    app: Arc<App>,
    tls: Option<TlsReloader>,
    hangup: Hangup,
    mut shutdown: watch::Receiver<bool>,
) {
    #[cfg(unix)]
    let mut hup = hangup;
    #[cfg(not(unix))]
    let _ = hangup;
    let mut paths = watched(&app, &tls);
    // What the running config was loaded from: the config as loaded at
    // start, not as it is now, so that a version written between the load
    // and this point still counts as a change.
    let mut applied = fingerprint(&paths).await;
    applied[0].content = app.snapshot().config.source_hash;
    // A change seen by the previous check and not applied yet: it applies
    // when the next check sees exactly the same, so that a file caught
    // half-written (an editor saving in place, a slow copy) never applies.
    let mut pending: Option<Vec<Seen>> = None;
    let mut tick = tokio::time::interval(POLL);
    loop {
        #[cfg(unix)]
        let hup_fut = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hup_fut = std::future::pending::<Option<()>>();
        let forced = tokio::select! {
            _ = tick.tick() => false,
            _ = hup_fut => true,
            _ = shutdown.changed() => return,
        };
        let now = fingerprint(&paths).await;
        if !forced {
            if !content_differs(&now, &applied) {
                pending = None;
                continue;
            }
            if pending.as_ref() != Some(&now) {
                pending = Some(now);
                continue;
            }
        }
        pending = None;
        let source = app.snapshot().config.source.clone();
        reload_once(&app, &tls, &source);
        // Remember what was there before the load, so a write that lands
        // during the reload is seen as a change on the next tick. The TLS
        // file paths may have changed with the config.
        let new_paths = watched(&app, &tls);
        applied = if new_paths == paths {
            now
        } else {
            fingerprint(&new_paths).await
        };
        paths = new_paths;
    }
}

/// Loads, validates and applies the config file once. Returns whether it applied.
pub fn reload_once(app: &App, tls: &Option<TlsReloader>, path: &Path) -> bool {
    let m = &app.metrics;
    let fail = |why: &str| {
        m.reloads
            .get_or_create(&ResultLabel { result: "error" })
            .inc();
        m.last_reload_ok.set(0);
        tracing::error!(file = %path.display(), errors = %why, "config reload refused; the running config stays");
        false
    };
    let config = match crate::config::load(path) {
        Ok(c) => c,
        Err(e) => return fail(&e.to_string()),
    };
    if let (Some(t), Some(files)) = (tls, &config.server.tls)
        && let Err(e) = t.reload(files)
    {
        return fail(&e);
    }
    let level = config.log.level.clone();
    let restart = app.apply(config);
    if let Err(e) = crate::logging::set_level(&level) {
        tracing::warn!(error = %e, "log level not changed");
    }
    m.reloads.get_or_create(&ResultLabel { result: "ok" }).inc();
    m.last_reload_ok.set(1);
    let version = app.snapshot().version;
    if restart.is_empty() {
        tracing::info!(file = %path.display(), version, "config reloaded");
    } else {
        tracing::warn!(file = %path.display(), version, needs_restart = ?restart, "config reloaded; some changes need a restart and were not applied");
    }
    true
}
