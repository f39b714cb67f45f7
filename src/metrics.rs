//! Prometheus metrics, served as text on the admin listener's `/metrics`.
//! Labels are bounded: route and upstream names from the config, status
//! codes, error codes — never a raw path, query or key.

use foldhash::fast::RandomState;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt::Write as _;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::thread::LocalKey;

/// Labels of a finished request.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Route name, or `none` when no route matched.
    pub route: Arc<str>,
    /// HTTP method (standard methods only; others are `other`).
    pub method: &'static str,
    /// Response status.
    pub status: u16,
}

/// A route name label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    /// Route name.
    pub route: Arc<str>,
}

/// An upstream name label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    /// Upstream name.
    pub upstream: Arc<str>,
}

/// An upstream failure.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamErrorLabels {
    /// Upstream name.
    pub upstream: Arc<str>,
    /// `unavailable` (refused, reset, malformed) or `timeout`.
    pub kind: &'static str,
}

/// An error code label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabel {
    /// Stable error code, e.g. `INVALID_API_KEY`.
    pub code: &'static str,
}

/// A limit scope label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ScopeLabel {
    /// `key`, `workspace` or `route`.
    pub scope: &'static str,
}

/// A reload outcome label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    /// `ok` or `error`.
    pub result: &'static str,
}

/// This thread's handles to labelled metrics, by registry and a key that
/// stands for the label set. A cached handle keeps the name `Arc`s of its
/// key alive, so a key made of their addresses cannot be reused by another
/// name while it is cached.
type Handles<K, M> = Cache<(u64, K), M, Pin>;

/// A thread's cache of values by key, each with what it pins.
type Cache<K, M, P> = RefCell<HashMap<K, (M, P), RandomState>>;

/// What a cached handle holds on to so that its key stays unique.
type Pin = Option<Arc<str>>;

/// A finished request's handles, by registry, route name address, method,
/// status and upstream name address (0 for none).
type FinishedKey = (u64, usize, &'static str, u16, usize);

/// The metrics one finished request counts in (clones sharing the families'
/// values, as in [`Handles`]).
struct Finished {
    requests: Counter,
    latency: Histogram,
    upstream: Option<Histogram>,
}

/// Handles one thread caches per family before it starts over.
const MAX_HANDLES: usize = 4096;

/// A name `Arc`'s address, as a cache key.
fn addr(a: &Arc<str>) -> usize {
    Arc::as_ptr(a).cast::<u8>() as usize
}

thread_local! {
    // A `Family` lookup takes the family's lock and hashes the labels with
    // SipHash; a request made three, which showed in the per-request profile.
    // A handle is a clone sharing its value with the family's entry, so
    // counting through it counts in the family that `/metrics` renders.
    // Keys are addresses and small numbers: hashing them costs less than
    // hashing names, and no label is built unless the handle is new.
    static FINISHED: Cache<FinishedKey, Finished, [Pin; 2]> = RefCell::default();
    static AUTH_REFUSALS: Handles<&'static str, Counter> = RefCell::default();
}

/// Runs `f` on the metric of `family` for the labels `key` stands for,
/// through this thread's handle cache (`id` tells registries apart: tests
/// run several gateways). `labels` makes the label set and the name to keep,
/// only when the handle is not cached yet.
fn with_handle<K, L, M>(
    cache: &'static LocalKey<Handles<K, M>>,
    id: u64,
    family: &Family<L, M, fn() -> M>,
    key: K,
    labels: impl FnOnce() -> (L, Pin),
    f: impl FnOnce(&M),
) where
    K: Hash + Eq + 'static,
    L: Clone + Hash + Eq + Send + Sync + 'static,
    M: Clone + Send + Sync + 'static,
{
    let make = || {
        let (labels, pin) = labels();
        (family.get_or_create(&labels).clone(), pin)
    };
    cached(cache, (id, key), make, f);
}

/// Runs `f` on this thread's cached value for `key`, made (with what it
/// pins) by `make` and cached when not there yet.
fn cached<K, M, P>(
    cache: &'static LocalKey<Cache<K, M, P>>,
    key: K,
    make: impl FnOnce() -> (M, P),
    f: impl FnOnce(&M),
) where
    K: Hash + Eq + 'static,
    M: 'static,
    P: 'static,
{
    cache.with(|c| {
        let Ok(mut c) = c.try_borrow_mut() else {
            // Not reached (`f` never re-enters); count without the cache.
            return f(&make().0);
        };
        if let Some((m, _)) = c.get(&key) {
            return f(m);
        }
        let (m, pin) = make();
        f(&m);
        if c.len() >= MAX_HANDLES {
            // Each reload brings new name `Arc`s, so new keys: start over
            // now and then rather than keep the old ones forever.
            c.clear();
        }
        c.insert(key, (m, pin));
    })
}

/// Tells registries apart in the per-thread handle caches.
static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// All metrics of one gateway process.
pub struct Metrics {
    registry: Registry,
    id: u64,
    /// Requests by route, method and status.
    pub requests: Family<RequestLabels, Counter>,
    /// Whole-request latency by route.
    pub latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
    /// Upstream latency (until response headers) by upstream.
    pub upstream_latency: Family<UpstreamLabel, Histogram, fn() -> Histogram>,
    /// Upstream failures by upstream and kind.
    pub upstream_errors: Family<UpstreamErrorLabels, Counter>,
    /// Auth refusals by code.
    pub auth_refusals: Family<CodeLabel, Counter>,
    /// Rate-limited requests by scope.
    pub rate_limited: Family<ScopeLabel, Counter>,
    /// Open client connections.
    pub open_connections: Gauge,
    /// Client connections idle and parked (no HTTP state, no buffers).
    pub parked_connections: Gauge,
    /// Times a client connection was parked (its HTTP session taken apart
    /// between requests): about once per idle spell, not per request.
    pub parks: Counter,
    /// Idle keep-alive connections held in the upstream pools, by upstream.
    pub pooled_connections: Family<UpstreamLabel, Gauge>,
    /// Config version in use (1 at start, +1 per applied reload).
    pub config_version: Gauge,
    /// Reloads by result.
    pub reloads: Family<ResultLabel, Counter>,
    /// 1 when the last reload applied, 0 when it was refused.
    pub last_reload_ok: Gauge,
}

/// Values kept elsewhere (cache, limiter) and read at scrape time.
#[derive(Debug, Default, Clone, Copy)]
pub struct Snapshot {
    /// Key cache hits.
    pub cache_hits: u64,
    /// Key cache misses.
    pub cache_misses: u64,
    /// Stale entries served while the store was failing.
    pub cache_stale: u64,
    /// Entries in the key cache (found keys and known-missing digests).
    pub cache_entries: u64,
    /// Store lookups made.
    pub store_lookups: u64,
    /// Store lookups that failed.
    pub store_errors: u64,
    /// Total store lookup time, seconds.
    pub store_lookup_seconds: f64,
    /// Whether the key store's circuit breaker is open.
    pub store_breaker_open: bool,
    /// Times the key store's circuit breaker opened.
    pub store_breaker_trips: u64,
    /// Whether the rate limiter runs on its Redis fallback.
    pub ratelimit_fallback: bool,
    /// Redis rate-limit calls.
    pub ratelimit_redis_calls: u64,
    /// Redis rate-limit errors.
    pub ratelimit_redis_errors: u64,
}

fn method_label(m: &http::Method) -> &'static str {
    match *m {
        http::Method::GET => "GET",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::HEAD => "HEAD",
        http::Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// A fresh registry with every metric registered.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("portcullis");
        fn buckets() -> Histogram {
            Histogram::new(exponential_buckets(0.0001, 2.5, 14))
        }
        let m = Metrics {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            requests: Family::default(),
            latency: Family::new_with_constructor(buckets as fn() -> Histogram),
            upstream_latency: Family::new_with_constructor(buckets as fn() -> Histogram),
            upstream_errors: Family::default(),
            auth_refusals: Family::default(),
            rate_limited: Family::default(),
            open_connections: Gauge::default(),
            parked_connections: Gauge::default(),
            parks: Counter::default(),
            pooled_connections: Family::default(),
            config_version: Gauge::default(),
            reloads: Family::default(),
            last_reload_ok: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests by route, method and status",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Request latency by route",
            m.latency.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Upstream latency until response headers",
            m.upstream_latency.clone(),
        );
        registry.register(
            "upstream_errors",
            "Upstream failures by kind",
            m.upstream_errors.clone(),
        );
        registry.register(
            "auth_refusals",
            "Requests refused by authentication or authorisation, by code",
            m.auth_refusals.clone(),
        );
        registry.register(
            "rate_limited",
            "Requests refused by a rate limit, by scope",
            m.rate_limited.clone(),
        );
        registry.register(
            "open_connections",
            "Open client connections",
            m.open_connections.clone(),
        );
        registry.register(
            "parked_connections",
            "Idle client connections parked without HTTP state or buffers",
            m.parked_connections.clone(),
        );
        registry.register(
            "connection_parks",
            "Times an idle client connection was parked (HTTP session taken apart until its next request)",
            m.parks.clone(),
        );
        registry.register(
            "upstream_pooled_connections",
            "Idle keep-alive connections held in the upstream pools (all workers), by upstream; each holds hyper's buffers (docs/benchmarks.md gives the memory)",
            m.pooled_connections.clone(),
        );
        registry.register(
            "config_version",
            "Config version in use",
            m.config_version.clone(),
        );
        registry.register(
            "config_reloads",
            "Config reloads by result",
            m.reloads.clone(),
        );
        registry.register(
            "config_last_reload_success",
            "1 if the last reload applied",
            m.last_reload_ok.clone(),
        );
        m.last_reload_ok.set(1);
        Metrics { registry, ..m }
    }

    /// Counts a finished request: by route, method and status; its latency
    /// by route; and, when it reached an upstream, the upstream's latency
    /// until response headers. One handle lookup for all three.
    pub fn observe_request(
        &self,
        route: &Arc<str>,
        method: &http::Method,
        status: u16,
        seconds: f64,
        upstream: Option<(&Arc<str>, f64)>,
    ) {
        let method = method_label(method);
        let record = |f: &Finished| {
            f.requests.inc();
            f.latency.observe(seconds);
            if let (Some(h), Some((_, s))) = (&f.upstream, upstream) {
                h.observe(s);
            }
        };
        let handles = || Finished {
            requests: self
                .requests
                .get_or_create(&RequestLabels {
                    route: route.clone(),
                    method,
                    status,
                })
                .clone(),
            latency: self
                .latency
                .get_or_create(&RouteLabel {
                    route: route.clone(),
                })
                .clone(),
            upstream: upstream.map(|(u, _)| {
                self.upstream_latency
                    .get_or_create(&UpstreamLabel {
                        upstream: u.clone(),
                    })
                    .clone()
            }),
        };
        let key = (
            self.id,
            addr(route),
            method,
            status,
            upstream.map_or(0, |(u, _)| addr(u)),
        );
        let make = || {
            let pins = [Some(route.clone()), upstream.map(|(u, _)| u.clone())];
            (handles(), pins)
        };
        cached(&FINISHED, key, make, record);
    }

    /// Counts a request refused by authentication or authorisation.
    pub fn count_refusal(&self, code: &'static str) {
        with_handle(
            &AUTH_REFUSALS,
            self.id,
            &self.auth_refusals,
            code,
            || (CodeLabel { code }, None),
            |c| {
                c.inc();
            },
        );
    }

    /// Prometheus text exposition, with the scrape-time values appended.
    pub fn render(&self, s: &Snapshot) -> String {
        let mut out = String::with_capacity(8192);
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        if out.ends_with("# EOF\n") {
            out.truncate(out.len() - "# EOF\n".len());
        }
        let mut counter = |name: &str, help: &str, v: f64| {
            let _ = write!(
                out,
                "# HELP portcullis_{name} {help}\n# TYPE portcullis_{name} counter\nportcullis_{name}_total {v}\n"
            );
        };
        counter(
            "key_cache_hits",
            "Key lookups answered by the local cache",
            s.cache_hits as f64,
        );
        counter(
            "key_cache_misses",
            "Key lookups that needed the store",
            s.cache_misses as f64,
        );
        counter(
            "key_cache_stale",
            "Stale keys served while the store failed",
            s.cache_stale as f64,
        );
        counter(
            "store_lookups",
            "Key store lookups made",
            s.store_lookups as f64,
        );
        counter(
            "store_errors",
            "Key store lookups that failed",
            s.store_errors as f64,
        );
        counter(
            "store_lookup_seconds",
            "Total time spent in key store lookups",
            s.store_lookup_seconds,
        );
        counter(
            "store_breaker_trips",
            "Times the key store's circuit breaker opened (lookups failing or timing out)",
            s.store_breaker_trips as f64,
        );
        counter(
            "ratelimit_redis_calls",
            "Rate-limit calls to Redis",
            s.ratelimit_redis_calls as f64,
        );
        counter(
            "log_lines_dropped",
            "Log lines dropped because stdout did not keep up (the queue to the log writer was full)",
            crate::logging::dropped_lines() as f64,
        );
        counter(
            "ratelimit_redis_errors",
            "Rate-limit calls to Redis that failed",
            s.ratelimit_redis_errors as f64,
        );
        let _ = write!(
            out,
            "# HELP portcullis_ratelimit_fallback 1 while Redis fails and on_store_error applies\n# TYPE portcullis_ratelimit_fallback gauge\nportcullis_ratelimit_fallback {}\n",
            u8::from(s.ratelimit_fallback)
        );
        let _ = write!(
            out,
            "# HELP portcullis_key_cache_entries Keys (and known-missing digests) held in the local key cache\n# TYPE portcullis_key_cache_entries gauge\nportcullis_key_cache_entries {}\n",
            s.cache_entries
        );
        let _ = write!(
            out,
            "# HELP portcullis_store_breaker_open 1 while the key store fails: stale-cached keys are served, uncached ones refused, one probe at a time\n# TYPE portcullis_store_breaker_open gauge\nportcullis_store_breaker_open {}\n",
            u8::from(s.store_breaker_open)
        );
        out.push_str("# EOF\n");
        out
    }
}

/// Reads an atomic counter.
pub fn load(a: &std::sync::atomic::AtomicU64) -> u64 {
    a.load(Ordering::Relaxed)
}
