//! The running gateway: shared state ([`App`]), the config snapshot swapped
//! whole on reload, and [`Gateway`] which binds the listeners, starts the
//! background tasks and shuts down gracefully.

use crate::auth::KeyCache;
use crate::config::{Config, RateLimitMode};
use crate::context::RequestId;
use crate::keys::{KeyEvent, SharedStore, StoreError};
use crate::metrics::Metrics;
use crate::proxy::Pools;
use crate::ratelimit::{RateLimitError, RateLimiter};
use arc_swap::ArcSwap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// One config version with everything compiled from it. A request loads the
/// snapshot once and uses only that, so it is served by exactly one version.
#[derive(Debug)]
pub struct Snapshot {
    /// The validated config (routes, plans, key kinds …).
    pub config: Arc<Config>,
    /// Upstream pools (kept across reloads while an upstream is unchanged).
    pub pools: Pools,
    /// 1 at start, +1 per applied reload.
    pub version: u64,
}

/// Makes request ids: a random per-process prefix and a counter, so no
/// randomness is drawn per request.
#[derive(Debug)]
pub struct RequestIds {
    prefix: String,
    next: AtomicU64,
}

impl Default for RequestIds {
    fn default() -> Self {
        let mut prefix = String::with_capacity(12);
        crate::keys::format::push_random_base62(&mut prefix, 10);
        RequestIds {
            prefix,
            next: AtomicU64::new(1),
        }
    }
}

impl RequestIds {
    /// A new request id, e.g. `Xy3k9QpLm2-00000000002a`.
    pub fn next(&self) -> RequestId {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        // Written by hand: `format!` showed in the per-request profile.
        let mut id = IdBytes {
            buf: [0; ID_MAX],
            len: 0,
        };
        let p = self.prefix.len().min(ID_MAX - 13);
        id.buf[..p].copy_from_slice(&self.prefix.as_bytes()[..p]);
        id.buf[p] = b'-';
        for (i, b) in id.buf[p + 1..p + 13].iter_mut().enumerate() {
            *b = b"0123456789abcdef"[((n >> (44 - 4 * i)) & 0xf) as usize];
        }
        id.len = p + 13;
        // An owned buffer behind `Bytes`: one allocation, and the id's two
        // copies (upstream request, response) share it by a count. Bytes
        // copied from a slice would allocate again when first shared.
        RequestId::made(bytes::Bytes::from_owner(id))
    }
}

/// Longest request id the gateway makes (prefix, dash, 12 hex digits).
const ID_MAX: usize = 32;

/// The bytes of a request id the gateway made.
struct IdBytes {
    buf: [u8; ID_MAX],
    len: usize,
}

impl AsRef<[u8]> for IdBytes {
    fn as_ref(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

/// What can stop the gateway from starting.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The key store cannot be opened.
    #[error("key store: {0}")]
    Store(#[from] StoreError),
    /// The rate limiter cannot start.
    #[error("rate limiter: {0}")]
    RateLimit(#[from] RateLimitError),
    /// A listener cannot bind.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// TLS files cannot be loaded.
    #[error("TLS: {0}")]
    Tls(String),
}

/// State shared by every connection and request.
pub struct App {
    /// The config snapshot in force.
    pub current: ArcSwap<Snapshot>,
    /// The key cache in front of the store.
    pub keys: Arc<KeyCache>,
    /// The rate limiter.
    pub limiter: Arc<RateLimiter>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Request id source.
    pub ids: RequestIds,
    /// Requests in flight (for load shedding).
    pub in_flight: AtomicUsize,
    /// Open-connection slots (`server.max_connections`), shared by all workers.
    pub conn_slots: Arc<tokio::sync::Semaphore>,
}

impl App {
    /// Opens the store, starts the limiter and the cache's watchers.
    pub async fn new(config: Config) -> Result<Arc<App>, StartError> {
        let store: SharedStore = crate::keys::open(&config.store.url, config.store.timeout).await?;
        let redis_url =
            (config.rate_limit.mode != RateLimitMode::Local).then_some(config.store.url.as_str());
        let limiter = RateLimiter::new(config.rate_limit, redis_url).await?;
        let keys = Arc::new(KeyCache::new(store.clone()));
        keys.spawn_last_used_writer(config.cache.last_used_interval);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        store.watch(tx);
        let weak = Arc::downgrade(&keys);
        tokio::spawn(async move {
            while let Some(ev) = rx.recv().await {
                let Some(k) = weak.upgrade() else { return };
                match ev {
                    KeyEvent::Changed(id) => k.invalidate(&id),
                    KeyEvent::Flush => k.flush(),
                }
            }
        });
        let metrics = Arc::new(Metrics::new());
        metrics.config_version.set(1);
        let pools = Pools::build(config.upstreams.values(), None, config.server.workers);
        let max_connections = config.server.max_connections;
        Ok(Arc::new(App {
            current: ArcSwap::from_pointee(Snapshot {
                config: Arc::new(config),
                pools,
                version: 1,
            }),
            keys,
            limiter: Arc::new(limiter),
            metrics,
            ids: RequestIds::default(),
            in_flight: AtomicUsize::new(0),
            conn_slots: Arc::new(tokio::sync::Semaphore::new(max_connections)),
        }))
    }

    /// The snapshot in force.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.current.load_full()
    }

    /// Swaps in a new config whole. Returns the settings that changed but
    /// only take effect after a restart (they keep their old values).
    pub fn apply(&self, mut config: Config) -> Vec<&'static str> {
        let old = self.current.load();
        let mut restart = Vec::new();
        if config.server.listen != old.config.server.listen {
            restart.push("server.listen");
            config.server.listen = old.config.server.listen;
        }
        if config.server.tls.is_some() != old.config.server.tls.is_some() {
            restart.push("server.tls (on/off)");
            config.server.tls = old.config.server.tls.clone();
        }
        if config.admin.listen != old.config.admin.listen {
            restart.push("admin.listen");
            config.admin.listen = old.config.admin.listen;
        }
        if config.server.max_connections != old.config.server.max_connections {
            restart.push("server.max_connections");
            config.server.max_connections = old.config.server.max_connections;
        }
        if config.server.workers != old.config.server.workers {
            restart.push("server.workers");
            config.server.workers = old.config.server.workers;
        }
        if config.store != old.config.store {
            restart.push("store");
            config.store = old.config.store.clone();
        }
        if config.rate_limit.mode != old.config.rate_limit.mode {
            restart.push("rate_limit.mode");
            config.rate_limit.mode = old.config.rate_limit.mode;
        }
        let pools = Pools::build(
            config.upstreams.values(),
            Some(&old.pools),
            config.server.workers,
        );
        let version = old.version + 1;
        self.current.store(Arc::new(Snapshot {
            config: Arc::new(config),
            pools,
            version,
        }));
        self.metrics.config_version.set(version as i64);
        restart
    }

    /// Values for `/metrics` kept outside the registry.
    pub fn metrics_snapshot(&self) -> crate::metrics::Snapshot {
        use crate::metrics::load;
        let s = &self.keys.stats;
        let rl = self.limiter.stats();
        crate::metrics::Snapshot {
            cache_hits: load(&s.hits),
            cache_misses: load(&s.misses),
            cache_stale: load(&s.stale),
            cache_entries: self.keys.len() as u64,
            store_lookups: load(&s.lookups),
            store_errors: load(&s.errors),
            store_lookup_seconds: load(&s.lookup_micros) as f64 / 1e6,
            store_breaker_open: self.keys.breaker().is_open(),
            store_breaker_trips: load(&self.keys.breaker().trips),
            ratelimit_fallback: self.limiter.fallback_active(),
            ratelimit_redis_calls: rl.redis_calls,
            ratelimit_redis_errors: rl.redis_errors,
        }
    }
}

/// A running gateway: both listeners bound, serving until shut down.
pub struct Gateway {
    /// Shared state.
    pub app: Arc<App>,
    /// The public listener's address (useful with port 0).
    pub addr: SocketAddr,
    /// The admin listener's address.
    pub admin_addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Gateway {
    /// Binds the listeners and starts serving `config`.
    pub async fn start(config: Config) -> Result<Gateway, StartError> {
        let hangup = crate::reload::hangup();
        let listen = config.server.listen;
        let admin_listen = config.admin.listen;
        let tls = match &config.server.tls {
            Some(files) => Some(crate::listener::TlsReloader::new(files).map_err(StartError::Tls)?),
            None => None,
        };
        let admin_tls = match &config.admin.tls {
            Some(files) => Some(crate::listener::TlsReloader::new(files).map_err(StartError::Tls)?),
            None => None,
        };
        let workers = config.server.workers;
        let bind_err = |source| StartError::Bind {
            addr: listen,
            source,
        };
        if listen.port() != 0 {
            // SO_REUSEPORT would let a second gateway share a port that is
            // already taken; a plain bind first keeps "address in use" an error.
            drop(std::net::TcpListener::bind(listen).map_err(bind_err)?);
        }
        let first = reuseport_listener(listen).map_err(bind_err)?;
        let addr = first.local_addr().map_err(bind_err)?;
        let mut publics = vec![first];
        for _ in 1..workers {
            publics.push(reuseport_listener(addr).map_err(bind_err)?);
        }
        let admin = match TcpListener::bind(admin_listen).await {
            Ok(l) => Some(l),
            Err(source) if config.admin.explicit => {
                return Err(StartError::Bind {
                    addr: admin_listen,
                    source,
                });
            }
            Err(e) => {
                tracing::warn!(addr = %admin_listen, error = %e, "no admin listener: the default admin address is taken (set [admin] listen)");
                None
            }
        };
        let admin_addr = match &admin {
            Some(a) => a.local_addr().map_err(|source| StartError::Bind {
                addr: admin_listen,
                source,
            })?,
            None => admin_listen,
        };
        let app = App::new(config).await?;
        let (shutdown, rx) = watch::channel(false);
        let mut tasks = Vec::new();
        let mut threads = Vec::new();
        for (i, l) in publics.into_iter().enumerate() {
            let (app, tls, rx) = (app.clone(), tls.clone(), rx.clone());
            let t = std::thread::Builder::new().name(format!("portcullis-w{i}")).spawn(move || {
                // One single-threaded event loop per worker, as nginx: a
                // request never hops threads, so no cross-thread wake-ups.
                let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!(worker = i, error = %e, "cannot start a worker event loop");
                        return;
                    }
                };
                crate::proxy::set_worker(i);
                rt.block_on(async move {
                    match TcpListener::from_std(l) {
                        Ok(l) => crate::listener::serve_public(l, app, tls, rx).await,
                        Err(e) => tracing::error!(worker = i, error = %e, "cannot register the listener"),
                    }
                });
            });
            match t {
                Ok(t) => threads.push(t),
                Err(e) => tracing::error!(worker = i, error = %e, "cannot start a worker thread"),
            }
        }
        if let Some(admin) = admin {
            tasks.push(tokio::spawn(crate::admin::serve(
                admin,
                app.clone(),
                admin_tls,
                rx.clone(),
            )));
        }
        tasks.push(tokio::spawn(sweep(app.clone(), rx.clone())));
        tasks.push(tokio::spawn(crate::reload::watch(
            app.clone(),
            tls,
            hangup,
            rx,
        )));
        tracing::info!(%addr, %admin_addr, workers, "portcullis listening");
        Ok(Gateway {
            app,
            addr,
            admin_addr,
            shutdown,
            tasks,
            threads,
        })
    }

    /// Stops accepting, lets in-flight requests finish up to the configured
    /// grace period, and returns when everything has stopped.
    pub async fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = t.await;
        }
        for t in self.threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // Hybrid mode: admits not yet pushed to Redis would otherwise be lost.
        self.app.limiter.flush().await;
    }
}

/// How often the upstream pools are swept of connections idle past their
/// `pool_idle_timeout`, and the key cache of entries past use.
const SWEEP_EVERY: std::time::Duration = std::time::Duration::from_secs(1);

/// Every [`SWEEP_EVERY`] until shutdown: sweeps the upstream pools,
/// keeping the pooled-connections gauge current (a pool grown by a peak of
/// load gives its connections back once the peak is over), and the key
/// cache of entries past use (a walk of ~100,000 entries costs well under
/// a millisecond, one shard locked at a time).
async fn sweep(app: Arc<App>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = every.tick() => {}
        }
        let now = std::time::Instant::now();
        let snapshot = app.snapshot();
        let gauge = &app.metrics.pooled_connections;
        // Upstreams a reload removed leave the gauge with the snapshot.
        gauge.clear();
        for (name, kept) in snapshot.pools.sweep(now) {
            gauge
                .get_or_create(&crate::metrics::UpstreamLabel {
                    upstream: name.clone(),
                })
                .set(kept as i64);
        }
        app.keys.sweep(&snapshot.config.cache, now);
    }
}

/// A listening socket with `SO_REUSEPORT`, so each worker can have its own
/// and the kernel spreads connections across them.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    #[cfg(unix)]
    sock.set_reuseport(true)?;
    sock.bind(addr)?;
    sock.listen(1024)?.into_std()
}

#[cfg(test)]
mod tests {
    use super::RequestIds;
    use crate::context::RequestId;

    #[test]
    fn request_ids_are_prefix_dash_twelve_hex_digits_and_count_up() {
        let ids = RequestIds::default();
        let (a, b) = (ids.next(), ids.next());
        let (prefix, n) = a.as_str().split_once('-').unwrap();
        assert_eq!(prefix.len(), 10);
        assert!(prefix.bytes().all(|c| c.is_ascii_alphanumeric()));
        assert_eq!(n, "000000000001");
        assert_eq!(b.as_str(), format!("{prefix}-000000000002"));
        assert_eq!(b.header(), b.as_str());
    }

    #[test]
    fn only_well_formed_client_ids_are_kept() {
        for ok in ["abc", "A-b_c.9", &"x".repeat(128)] {
            assert_eq!(RequestId::from_bytes(ok.as_bytes()).unwrap().as_str(), ok);
        }
        for bad in ["", "a b", "a/b", "ü", &"x".repeat(129)] {
            assert!(RequestId::from_bytes(bad.as_bytes()).is_none(), "{bad:?}");
        }
    }
}
