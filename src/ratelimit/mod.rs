//! Rate limiting: sliding-window counters per (limit, subject).
//!
//! Where it sits: after `auth` (the request has a key id, a workspace and a
//! matched route, and the key's plan limits are known) and before `proxy`.
//! The pipeline calls [`RateLimiter::check`] once per keyed request with the
//! plan's limits followed by the route's, puts the [`Decision`]'s verdict in
//! the `X-RateLimit-*` headers and answers 429 with `Retry-After` on
//! [`Decision::Refused`].
//!
//! What it must never do:
//! - count a refused request (all limits admit and are counted together, or
//!   nothing is counted);
//! - hold a lock across an `.await`, or wait on Redis longer than
//!   `rate_limit.timeout` per call;
//! - make more than one Redis round trip for a request on a single Redis node
//!   (on a cluster, two when key and workspace limits live in different
//!   slots, and a third to refund the first when the second refuses), or any
//!   while a refusal is remembered or while Redis is known to be down (it
//!   re-tries Redis at most every [`PROBE_EVERY`]);
//! - decide with the instance clock in mode `redis` (the Lua script reads
//!   Redis `TIME`);
//! - panic on anything Redis answers, or see, log or store a key secret (it
//!   only gets key ids).
//!
//! Modes (`[rate_limit] mode`):
//! - `local`: in-process counters in a sharded table (`table.rs`); one node.
//! - `redis`: exact across instances, one Lua script call per request that
//!   checks all limits and counts them only if all admit.
//! - `hybrid`: decisions in process against the last global counts read from
//!   Redis plus this instance's unsynced admits; a background task pushes the
//!   local admits every `sync_interval` and reads the global counts back; a
//!   (limit, subject) whose estimate would pass `exact_threshold × requests`
//!   is decided by the exact `redis` path. See [`hybrid_overadmission_bound`].
//!
//! Headers ([`RateVerdict`], for the tightest limit: smallest remaining
//! after this decision, then latest reset):
//! - `X-RateLimit-Limit`: that limit's `requests`;
//! - `X-RateLimit-Remaining`: `floor(requests − estimate)` after counting
//!   this request, 0 on refusal;
//! - `X-RateLimit-Reset`: whole seconds (rounded up, at least 1) until
//!   `Remaining` would grow by one if no request came: with 0 remaining,
//!   until a request would be admitted again;
//! - `Retry-After` (refusals): the latest `Reset` among the refusing limits.
//!
//! The window arithmetic is in [`window`] (pure functions of `now_ms`).

mod store;
mod table;
pub mod window;

use crate::config::{Limit, OnStoreError, RateLimitMode, RateLimitSettings, Scope};
use crate::context::RateVerdict;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use store::{Backend, Delta, StoreError, slot_group, state_key};
use table::{KeyRef, LimitId, Table};
use window::{Eval, WindowState, ceil_secs, evaluate};

/// While Redis is failing, how often one request (or the hybrid sync task)
/// tries it again; the others use `on_store_error` without waiting.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Hybrid mode: the most state hashes pushed in one script call (single node).
const FLUSH_CHUNK: usize = 256;

/// Limits handled without a heap allocation per request.
const INLINE_LIMITS: usize = 8;

/// Why a [`RateLimiter`] could not be built. Redis being unreachable is not
/// one of them: the limiter then starts with `on_store_error` in force and
/// connects when Redis comes up.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// Mode `redis` or `hybrid` without a Redis URL.
    #[error("rate_limit.mode {0} needs a redis:// or redis+cluster:// store URL")]
    MissingRedisUrl(&'static str),
    /// The Redis URL is malformed or of an unsupported kind (the URL itself
    /// is not repeated: it may carry a password).
    #[error("rate limiter: {0}")]
    InvalidRedisUrl(String),
}

/// One request to decide.
#[derive(Clone, Copy, Debug)]
pub struct LimitRequest<'a> {
    /// The key's id (subject of `key` limits; rotation keeps it).
    pub key_id: &'a str,
    /// The key's workspace (subject of `workspace` limits).
    pub workspace: &'a str,
    /// The matched route's name (with the key id, subject of `route` limits).
    pub route: &'a str,
    /// The key's plan limits followed by the route's limits. A limit listed
    /// twice (same scope, requests and per) counts once.
    pub limits: &'a [Limit],
}

/// What [`RateLimiter::check`] decided.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No limit applies (or Redis failed with `on_store_error = "allow"`): no headers.
    Unlimited,
    /// Admitted and counted against every limit; the verdict is the
    /// tightest limit's (smallest remaining, then latest reset).
    Allowed(RateVerdict),
    /// Refused: nothing was counted. `retry_after_secs ≥ 1`; `scope` and
    /// `verdict` (remaining 0) are those of the refusing limit with the
    /// latest reset.
    Refused {
        /// Headers for the refusing limit.
        verdict: RateVerdict,
        /// `Retry-After`: whole seconds until every refusing limit would admit.
        retry_after_secs: u64,
        /// The refusing limit's scope.
        scope: Scope,
    },
}

/// Monotonic counters for metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateLimitStats {
    /// Redis calls made (scripts and pings).
    pub redis_calls: u64,
    /// Redis calls that failed or timed out.
    pub redis_errors: u64,
    /// Of those, the ones that hit `rate_limit.timeout`.
    pub redis_timeouts: u64,
    /// Switches to the `on_store_error` fallback.
    pub fallback_entered: u64,
    /// Recoveries from the fallback.
    pub fallback_recovered: u64,
    /// Refusals answered from the refusal memo, without Redis.
    pub memo_refusals: u64,
    /// Hybrid: decisions made in process.
    pub hybrid_local: u64,
    /// Hybrid: decisions sent to the exact Redis path.
    pub hybrid_exact: u64,
    /// Hybrid: batches of local admits pushed to Redis.
    pub hybrid_flushes: u64,
}

#[derive(Debug, Default)]
struct Counters {
    redis_calls: AtomicU64,
    redis_errors: AtomicU64,
    redis_timeouts: AtomicU64,
    fallback_entered: AtomicU64,
    fallback_recovered: AtomicU64,
    memo_refusals: AtomicU64,
    hybrid_local: AtomicU64,
    hybrid_exact: AtomicU64,
    hybrid_flushes: AtomicU64,
}

fn inc(c: &AtomicU64) {
    c.fetch_add(1, Ordering::Relaxed);
}

/// The worst-case over-admission of mode `hybrid` for one (limit, subject):
/// with `instances` gateways, the estimate over all of them never exceeds
/// `requests` by more than `instances × ⌈exact_threshold × requests⌉`.
///
/// Why: an instance decides in process only while its view (the global
/// counts it last read from Redis, which only grow within a window, plus
/// its own unsynced admits) stays at or below `exact_threshold × requests`
/// after the admit, so it never holds more admits that Redis does not know
/// of than that. Once a push or an exact call has shown it the global
/// count, it refuses in process or goes exact. The exact path adds the
/// instance's unsynced admits to Redis in the same script call and admits
/// only while the estimate in Redis plus one is at most `requests`. So the
/// true count exceeds `requests` by at most what the other instances hold
/// unsynced.
///
/// In practice an instance holds unsynced only what it admitted since its
/// last push, i.e. its admits during one `sync_interval` (plus one Redis
/// round trip), which is usually far less. `tests/ratelimit_redis.rs`
/// measures both a burst (all requests within one interval: about
/// `(instances − 1) × exact_threshold × requests` over) and a paced load.
pub fn hybrid_overadmission_bound(requests: u64, exact_threshold: f64, instances: u64) -> u64 {
    let per_instance = (exact_threshold.clamp(0.0, 1.0) * requests as f64).ceil() as u64;
    instances.saturating_mul(per_instance)
}

/// The instance clock: milliseconds since the Unix epoch, read once at
/// start and advanced by a monotonic clock (never steps back).
#[derive(Debug)]
struct Clock {
    base: Instant,
    base_ms: u64,
}

impl Clock {
    fn new() -> Self {
        let base_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        Clock {
            base: Instant::now(),
            base_ms,
        }
    }

    fn now_ms(&self) -> u64 {
        self.base_ms
            .saturating_add(u64::try_from(self.base.elapsed().as_millis()).unwrap_or(u64::MAX))
    }
}

/// Decides whether requests are within their rate limits. `Send + Sync`;
/// share it through an `Arc`. In mode `hybrid` it runs a background task
/// that ends when the limiter is dropped.
pub struct RateLimiter {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("mode", &self.inner.settings.mode)
            .field("on_store_error", &self.inner.settings.on_store_error)
            .field("fallback_active", &self.fallback_active())
            .finish()
    }
}

struct Inner {
    settings: RateLimitSettings,
    clock: Clock,
    table: Table,
    redis: Option<Backend>,
    fallback: AtomicBool,
    next_probe_ms: AtomicU64,
    /// Redis `TIME` minus the instance clock, as last seen (hybrid decisions
    /// and the local fallback use the instance clock plus this).
    offset_ms: AtomicI64,
    stats: Counters,
}

/// Per-limit scratch of one decision.
#[derive(Clone, Copy, Debug)]
struct Slot {
    id: LimitId,
    shard: usize,
    eval: Eval,
    memo_ms: u64,
}

impl Default for Slot {
    fn default() -> Self {
        Slot {
            id: LimitId {
                scope: Scope::Key,
                requests: 0,
                per_ms: 1,
            },
            shard: 0,
            eval: Eval::default(),
            memo_ms: 0,
        }
    }
}

/// Which in-process counters a decision uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Counter {
    /// `Entry::local`.
    Local,
    /// `Entry::view()`, counting into `Entry::pending`; `exact_above`: hand
    /// the decision to Redis when a limit would pass the threshold.
    Hybrid { exact_above: bool },
}

enum Step {
    Done(Decision),
    /// Hand the decision to Redis, with the unsynced admits taken out of
    /// `pending` (into `inflight`), one per distinct limit.
    Exact(Vec<WindowState>),
}

/// What the exact path learnt from Redis.
struct Exact {
    ids: Vec<LimitId>,
    states: Vec<WindowState>,
    nows: Vec<u64>,
    /// Whether the state of each limit is known (a limit in a slot that was
    /// not asked is not).
    known: Vec<bool>,
    /// Whether each limit may be named as the refusing one.
    candidate: Vec<bool>,
    admitted: bool,
}

fn key<'r>(id: LimitId, req: &LimitRequest<'r>) -> KeyRef<'r> {
    KeyRef::new(id, req.key_id, req.workspace, req.route)
}

fn verdict(s: &Slot) -> RateVerdict {
    RateVerdict {
        limit: s.id.requests,
        remaining: s.eval.remaining,
        reset_secs: ceil_secs(s.eval.reset_ms),
    }
}

/// The tightest limit: smallest remaining, then latest reset.
fn tightest(slots: &[Slot]) -> Option<&Slot> {
    slots.iter().min_by(|a, b| {
        a.eval
            .remaining
            .cmp(&b.eval.remaining)
            .then(b.eval.reset_ms.cmp(&a.eval.reset_ms))
    })
}

/// A refusal by the slot with the latest `wait_ms` among those `refusing`.
fn refusal(
    slots: &[Slot],
    refusing: impl Fn(&Slot) -> bool,
    wait_ms: impl Fn(&Slot) -> u64,
) -> Decision {
    let worst = slots
        .iter()
        .filter(|s| refusing(s))
        .max_by_key(|s| wait_ms(s))
        .or_else(|| slots.first());
    match worst {
        Some(s) => {
            let secs = ceil_secs(wait_ms(s));
            Decision::Refused {
                verdict: RateVerdict {
                    limit: s.id.requests,
                    remaining: 0,
                    reset_secs: secs,
                },
                retry_after_secs: secs,
                scope: s.id.scope,
            }
        }
        None => Decision::Unlimited,
    }
}

impl RateLimiter {
    /// Builds the limiter. Mode `local` needs no Redis. Modes `redis` and
    /// `hybrid` prepare a connection to `redis_url` (`redis://…` through a
    /// reconnecting `ConnectionManager`, `redis+cluster://h1:p1,h2:p2`
    /// through a cluster connection) and try it once, bounded by
    /// `max(timeout, 500ms)`: if Redis does not answer, the limiter still
    /// starts, with the `on_store_error` fallback in force, and re-tries
    /// Redis at most every [`PROBE_EVERY`]. Must be called inside a Tokio
    /// runtime (mode `hybrid` spawns its sync task).
    pub async fn new(
        settings: RateLimitSettings,
        redis_url: Option<&str>,
    ) -> Result<Self, RateLimitError> {
        let redis = match settings.mode {
            RateLimitMode::Local => None,
            mode => {
                let name = if mode == RateLimitMode::Redis {
                    "redis"
                } else {
                    "hybrid"
                };
                let url = redis_url.ok_or(RateLimitError::MissingRedisUrl(name))?;
                Some(
                    Backend::open(url, settings.timeout)
                        .map_err(|e| RateLimitError::InvalidRedisUrl(e.0))?,
                )
            }
        };
        let inner = Arc::new(Inner {
            settings,
            clock: Clock::new(),
            table: Table::default(),
            redis,
            fallback: AtomicBool::new(false),
            next_probe_ms: AtomicU64::new(0),
            offset_ms: AtomicI64::new(0),
            stats: Counters::default(),
        });
        if let Some(backend) = &inner.redis {
            let warm = settings.timeout.max(Duration::from_millis(500));
            inner.stats.redis_calls.fetch_add(1, Ordering::Relaxed);
            let res = match tokio::time::timeout(warm, backend.ping()).await {
                Ok(r) => r,
                Err(_) => Err(StoreError::Timeout(warm)),
            };
            if let Err(e) = res {
                inc(&inner.stats.redis_errors);
                inner.redis_failed(&e, inner.clock.now_ms());
            }
        }
        if settings.mode == RateLimitMode::Hybrid {
            tokio::spawn(sync_task(Arc::downgrade(&inner)));
        }
        Ok(RateLimiter { inner })
    }

    /// Decides one request: admits and counts it against every applicable
    /// limit, or refuses it counting nothing.
    pub async fn check(&self, req: &LimitRequest<'_>) -> Decision {
        if req.limits.is_empty() {
            return Decision::Unlimited;
        }
        let inner = &self.inner;
        match inner.settings.mode {
            RateLimitMode::Local => {
                let now = inner.clock.now_ms();
                match inner.decide_here(req, now, now, Counter::Local, false) {
                    Step::Done(d) => d,
                    // Not reached: Counter::Local never asks for Redis.
                    Step::Exact(_) => inner.deny(req),
                }
            }
            RateLimitMode::Redis => inner.check_redis(req).await,
            RateLimitMode::Hybrid => inner.check_hybrid(req).await,
        }
    }

    /// Whether Redis is currently failing and the `on_store_error` fallback is in use.
    pub fn fallback_active(&self) -> bool {
        self.inner.fallback.load(Ordering::Acquire)
    }

    /// Monotonic counters for metrics.
    pub fn stats(&self) -> RateLimitStats {
        let s = &self.inner.stats;
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        RateLimitStats {
            redis_calls: g(&s.redis_calls),
            redis_errors: g(&s.redis_errors),
            redis_timeouts: g(&s.redis_timeouts),
            fallback_entered: g(&s.fallback_entered),
            fallback_recovered: g(&s.fallback_recovered),
            memo_refusals: g(&s.memo_refusals),
            hybrid_local: g(&s.hybrid_local),
            hybrid_exact: g(&s.hybrid_exact),
            hybrid_flushes: g(&s.hybrid_flushes),
        }
    }

    /// Mode `hybrid`: pushes the local admits not yet in Redis now (the
    /// background task does it every `sync_interval`; call this on shutdown).
    /// Does nothing in the other modes.
    pub async fn flush(&self) {
        if self.inner.settings.mode == RateLimitMode::Hybrid {
            self.inner.flush_hybrid(true).await;
        }
    }

    /// The settings it was built with.
    pub fn settings(&self) -> &RateLimitSettings {
        &self.inner.settings
    }
}

/// Mode `hybrid`: pushes local admits every `sync_interval` (every
/// [`PROBE_EVERY`] while Redis is failing) until the limiter is dropped.
async fn sync_task(weak: Weak<Inner>) {
    loop {
        let pause = match weak.upgrade() {
            Some(inner) if inner.fallback.load(Ordering::Acquire) => PROBE_EVERY,
            Some(inner) => inner.settings.sync_interval.max(Duration::from_millis(1)),
            None => return,
        };
        tokio::time::sleep(pause).await;
        let Some(inner) = weak.upgrade() else { return };
        inner.flush_hybrid(false).await;
    }
}

impl Inner {
    fn with_offset(&self, local_ms: u64) -> u64 {
        local_ms.saturating_add_signed(self.offset_ms.load(Ordering::Relaxed))
    }

    fn learn_offset(&self, redis_ms: u64, local_ms: u64) {
        let off = i64::try_from(redis_ms)
            .unwrap_or(i64::MAX)
            .saturating_sub(i64::try_from(local_ms).unwrap_or(i64::MAX));
        self.offset_ms.store(off, Ordering::Relaxed);
    }

    /// Runs `f` on the request's distinct limits and the mask of their shards.
    fn with_slots<R>(&self, req: &LimitRequest<'_>, f: impl FnOnce(&mut [Slot], u64) -> R) -> R {
        let n = req.limits.len();
        if n <= INLINE_LIMITS {
            let mut buf = [Slot::default(); INLINE_LIMITS];
            self.fill_slots(req, &mut buf[..n], f)
        } else {
            let mut buf = vec![Slot::default(); n];
            self.fill_slots(req, &mut buf, f)
        }
    }

    fn fill_slots<R>(
        &self,
        req: &LimitRequest<'_>,
        buf: &mut [Slot],
        f: impl FnOnce(&mut [Slot], u64) -> R,
    ) -> R {
        let mut m = 0;
        let mut mask = 0u64;
        for l in req.limits {
            let id = LimitId::of(l);
            if buf[..m].iter().any(|s| s.id == id) {
                continue;
            }
            let shard = self.table.shard_of(&key(id, req));
            buf[m] = Slot {
                id,
                shard,
                ..Slot::default()
            };
            mask |= 1 << shard;
            m += 1;
        }
        f(&mut buf[..m], mask)
    }

    /// Decides in process at `now_ms` (window clock); `local_ms` is the
    /// instance clock for the refusal memo.
    fn decide_here(
        &self,
        req: &LimitRequest<'_>,
        now_ms: u64,
        local_ms: u64,
        counter: Counter,
        memo: bool,
    ) -> Step {
        let threshold = self.settings.exact_threshold;
        self.with_slots(req, |slots, mask| {
            let mut locked = self.table.lock(mask);
            let (mut remembered, mut refused, mut exact) = (false, false, false);
            for s in slots.iter_mut() {
                let k = key(s.id, req);
                let e = locked.shard(s.shard).get(&k).copied().unwrap_or_default();
                if memo && e.refused_until > local_ms {
                    s.memo_ms = e.refused_until - local_ms;
                    remembered = true;
                }
                let state = match counter {
                    Counter::Local => e.local,
                    Counter::Hybrid { .. } => e.view(),
                };
                s.eval = evaluate(state, s.id.requests, s.id.per_ms, now_ms);
                refused |= !s.eval.admits;
                if counter == (Counter::Hybrid { exact_above: true }) {
                    exact |= window::above_fraction(&s.eval, s.id.requests, s.id.per_ms, threshold);
                }
            }
            if remembered {
                inc(&self.stats.memo_refusals);
                return Step::Done(refusal(slots, |s| s.memo_ms > 0, |s| s.memo_ms));
            }
            if refused {
                return Step::Done(refusal(slots, |s| !s.eval.admits, |s| s.eval.reset_ms));
            }
            if exact {
                // The exact path adds this instance's unsynced admits to
                // Redis before it checks, so they count in its decision.
                let deltas = slots
                    .iter()
                    .map(|s| {
                        locked.shard(s.shard).update(&key(s.id, req), |e| {
                            let d = e.pending;
                            e.inflight = e.inflight.plus(d);
                            e.pending = WindowState::default();
                            d
                        })
                    })
                    .collect();
                return Step::Exact(deltas);
            }
            for s in slots.iter_mut() {
                let k = key(s.id, req);
                let (per, shard) = (s.id.per_ms, locked.shard(s.shard));
                let (after, enqueue) = shard.update(&k, |e| match counter {
                    Counter::Local => {
                        e.local = e.local.at(now_ms, per).plus_one();
                        (e.local, false)
                    }
                    Counter::Hybrid { .. } => {
                        e.pending = e.pending.at(now_ms, per).plus_one();
                        let enqueue = !e.queued;
                        e.queued = true;
                        (e.view(), enqueue)
                    }
                });
                if enqueue
                    && let Some((owned, _)) = shard.map.get_key_value(&k as &dyn table::KeyView)
                {
                    let owned = owned.clone();
                    shard.dirty.push(owned);
                }
                s.eval = evaluate(after, s.id.requests, per, now_ms);
            }
            locked.sweep(now_ms, local_ms);
            match tightest(slots) {
                Some(s) => Step::Done(Decision::Allowed(verdict(s))),
                None => Step::Done(Decision::Unlimited),
            }
        })
    }

    /// The refusal memo alone (modes `redis` and `hybrid`, before Redis).
    fn remembered_refusal(&self, req: &LimitRequest<'_>, local_ms: u64) -> Option<Decision> {
        self.with_slots(req, |slots, mask| {
            let mut locked = self.table.lock(mask);
            let mut any = false;
            for s in slots.iter_mut() {
                let until = locked
                    .shard(s.shard)
                    .get(&key(s.id, req))
                    .map_or(0, |e| e.refused_until);
                if until > local_ms {
                    s.memo_ms = until - local_ms;
                    any = true;
                }
            }
            any.then(|| {
                inc(&self.stats.memo_refusals);
                refusal(slots, |s| s.memo_ms > 0, |s| s.memo_ms)
            })
        })
    }

    /// `on_store_error = "deny"`: refused for 1 s, named after the limit with the fewest requests.
    fn deny(&self, req: &LimitRequest<'_>) -> Decision {
        match req.limits.iter().min_by_key(|l| l.requests) {
            Some(l) => Decision::Refused {
                verdict: RateVerdict {
                    limit: l.requests,
                    remaining: 0,
                    reset_secs: 1,
                },
                retry_after_secs: 1,
                scope: l.scope,
            },
            None => Decision::Unlimited,
        }
    }

    /// The `on_store_error` decision while Redis is failing.
    ///
    /// `local` enforces the full limit in this instance alone (with N
    /// instances, up to N × the limit may pass during an outage); in mode
    /// `redis` those counts are not pushed to Redis afterwards, in mode
    /// `hybrid` they are (they are ordinary unsynced admits). `deny` refuses
    /// with `Retry-After: 1` (the pipeline can tell this refusal from a
    /// limit's by `fallback_active()`, e.g. to answer 503 instead of 429);
    /// `allow` admits without counting and without headers
    /// ([`Decision::Unlimited`]), since nothing is known.
    fn on_store_error(&self, req: &LimitRequest<'_>, local_ms: u64) -> Decision {
        match self.settings.on_store_error {
            OnStoreError::Deny => self.deny(req),
            OnStoreError::Allow => Decision::Unlimited,
            OnStoreError::Local => {
                let counter = match self.settings.mode {
                    RateLimitMode::Hybrid => Counter::Hybrid { exact_above: false },
                    _ => Counter::Local,
                };
                match self.decide_here(req, self.with_offset(local_ms), local_ms, counter, true) {
                    Step::Done(d) => d,
                    Step::Exact(_) => self.deny(req), // not reached: exact_above is false
                }
            }
        }
    }

    fn redis_ok(&self) {
        if self.fallback.swap(false, Ordering::AcqRel) {
            inc(&self.stats.fallback_recovered);
            tracing::info!(
                mode = ?self.settings.mode,
                "rate limiter: Redis answers again; leaving the on_store_error fallback"
            );
        }
    }

    fn redis_failed(&self, e: &StoreError, local_ms: u64) {
        self.next_probe_ms.store(
            local_ms.saturating_add(PROBE_EVERY.as_millis() as u64),
            Ordering::Release,
        );
        if !self.fallback.swap(true, Ordering::AcqRel) {
            inc(&self.stats.fallback_entered);
            tracing::warn!(
                error = %e,
                mode = ?self.settings.mode,
                on_store_error = ?self.settings.on_store_error,
                "rate limiter: Redis failed; using the on_store_error fallback until it answers again"
            );
        }
    }

    /// Whether this caller may call Redis now: always when it is healthy;
    /// while failing, one caller per [`PROBE_EVERY`].
    fn may_call_redis(&self, local_ms: u64) -> bool {
        if !self.fallback.load(Ordering::Acquire) {
            return true;
        }
        let next = self.next_probe_ms.load(Ordering::Acquire);
        local_ms >= next
            && self
                .next_probe_ms
                .compare_exchange(
                    next,
                    local_ms.saturating_add(PROBE_EVERY.as_millis() as u64),
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
    }

    /// One Redis call, bounded by `timeout` and counted.
    async fn call<T>(
        &self,
        f: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        inc(&self.stats.redis_calls);
        let r = match tokio::time::timeout(self.settings.timeout, f).await {
            Ok(r) => r,
            Err(_) => {
                inc(&self.stats.redis_timeouts);
                Err(StoreError::Timeout(self.settings.timeout))
            }
        };
        if r.is_err() {
            inc(&self.stats.redis_errors);
        }
        r
    }

    async fn check_redis(&self, req: &LimitRequest<'_>) -> Decision {
        let local_ms = self.clock.now_ms();
        if let Some(d) = self.remembered_refusal(req, local_ms) {
            return d;
        }
        if !self.may_call_redis(local_ms) {
            return self.on_store_error(req, local_ms);
        }
        // Boxed: the Redis call's future is large, and inline it would size
        // the future of every request, in every mode.
        match Box::pin(self.exact(req, &[])).await {
            Ok(x) => {
                self.redis_ok();
                self.finish_exact(req, x, false, self.clock.now_ms())
            }
            Err(e) => {
                let local_ms = self.clock.now_ms();
                self.redis_failed(&e, local_ms);
                self.on_store_error(req, local_ms)
            }
        }
    }

    async fn check_hybrid(&self, req: &LimitRequest<'_>) -> Decision {
        let local_ms = self.clock.now_ms();
        if self.fallback.load(Ordering::Acquire) {
            return self.on_store_error(req, local_ms);
        }
        let now = self.with_offset(local_ms);
        match self.decide_here(
            req,
            now,
            local_ms,
            Counter::Hybrid { exact_above: true },
            true,
        ) {
            Step::Done(d) => {
                inc(&self.stats.hybrid_local);
                d
            }
            Step::Exact(deltas) => {
                inc(&self.stats.hybrid_exact);
                if !self.may_call_redis(local_ms) {
                    self.settle(req, &deltas, &[]);
                    return self.on_store_error(req, local_ms);
                }
                // Boxed, as in `check_redis`: only a key near its limit comes here.
                match Box::pin(self.exact(req, &deltas)).await {
                    Ok(x) => {
                        self.redis_ok();
                        // Learn the global counts (which include the deltas)
                        // before dropping the deltas from `inflight`: a
                        // moment's double count rather than an under-count.
                        let known = x.known.clone();
                        let d = self.finish_exact(req, x, true, self.clock.now_ms());
                        self.settle(req, &deltas, &known);
                        d
                    }
                    Err(e) => {
                        // Deltas sent in a call that did answer (the key slot
                        // of a cluster, before the workspace slot failed) are
                        // pushed again later: an over-count, never an under-count.
                        self.settle(req, &deltas, &[]);
                        let local_ms = self.clock.now_ms();
                        self.redis_failed(&e, local_ms);
                        self.on_store_error(req, local_ms)
                    }
                }
            }
        }
    }

    /// The exact path: the check script, once on a single node. On a
    /// cluster, when the request has both workspace limits and key/route
    /// limits, their state lives in two slots: the key's slot is checked and
    /// counted first, then the workspace's; if the workspace refuses (or
    /// fails), the key's count is refunded. Key first because the brief
    /// over-count before a refund then only affects the key's own concurrent
    /// requests, not the whole workspace; and a workspace that keeps refusing
    /// is soon answered from the refusal memo.
    ///
    /// `deltas` (hybrid) are this instance's unsynced admits per distinct
    /// limit, added to Redis by the same script call.
    async fn exact(
        &self,
        req: &LimitRequest<'_>,
        deltas: &[WindowState],
    ) -> Result<Exact, StoreError> {
        let Some(backend) = &self.redis else {
            return Err(StoreError::Reply("no Redis configured"));
        };
        let mut ids: Vec<LimitId> = Vec::with_capacity(req.limits.len());
        for l in req.limits {
            let id = LimitId::of(l);
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        let n = ids.len();
        let keys: Vec<String> = ids.iter().map(|id| state_key(&key(*id, req))).collect();
        let mut x = Exact {
            states: vec![WindowState::default(); n],
            nows: vec![0; n],
            known: vec![false; n],
            candidate: vec![true; n],
            admitted: false,
            ids,
        };
        let is_ws: Vec<bool> = x
            .ids
            .iter()
            .map(|id| id.scope == Scope::Workspace)
            .collect();
        let split = backend.is_cluster() && is_ws.iter().any(|w| *w) && is_ws.iter().any(|w| !*w);
        let first: Vec<usize> = (0..n).filter(|&i| !split || !is_ws[i]).collect();
        let second: Vec<usize> = (0..n).filter(|&i| split && is_ws[i]).collect();

        let c1 = self
            .check_group(backend, &keys, &x.ids, deltas, &first)
            .await?;
        x.fill(&first, c1.now_ms, &c1.states);
        if !c1.admitted || second.is_empty() {
            for &i in &second {
                x.candidate[i] = false;
            }
            x.admitted = c1.admitted;
            return Ok(x);
        }
        match self
            .check_group(backend, &keys, &x.ids, deltas, &second)
            .await
        {
            Ok(c2) => {
                x.fill(&second, c2.now_ms, &c2.states);
                x.admitted = c2.admitted;
                if !c2.admitted {
                    self.refund(backend, &keys, &x, &first).await;
                    for &i in &first {
                        x.candidate[i] = false;
                        x.states[i].curr = x.states[i].curr.saturating_sub(1);
                    }
                }
                Ok(x)
            }
            Err(e) => {
                self.refund(backend, &keys, &x, &first).await;
                Err(e)
            }
        }
    }

    async fn check_group(
        &self,
        backend: &Backend,
        keys: &[String],
        ids: &[LimitId],
        deltas: &[WindowState],
        idx: &[usize],
    ) -> Result<store::Checked, StoreError> {
        let c = if idx.len() == keys.len() {
            self.call(backend.check(keys, ids, deltas)).await?
        } else {
            let (k, i): (Vec<String>, Vec<LimitId>) =
                idx.iter().map(|&j| (keys[j].clone(), ids[j])).unzip();
            let d: Vec<WindowState> = idx
                .iter()
                .map(|&j| deltas.get(j).copied().unwrap_or_default())
                .collect();
            self.call(backend.check(&k, &i, &d)).await?
        };
        if c.states.len() != idx.len() {
            return Err(StoreError::Reply("check: wrong number of states"));
        }
        Ok(c)
    }

    /// Takes back the request counted in `idx` (best effort: a failed refund
    /// leaves one request too many counted, never too few).
    async fn refund(&self, backend: &Backend, keys: &[String], x: &Exact, idx: &[usize]) {
        let k: Vec<String> = idx.iter().map(|&i| keys[i].clone()).collect();
        let d: Vec<Delta> = idx
            .iter()
            .map(|&i| Delta {
                per_ms: x.ids[i].per_ms,
                window: x.states[i].window,
                curr: -1,
                prev: 0,
            })
            .collect();
        if let Err(e) = self.call(backend.apply(&k, &d)).await {
            tracing::debug!(error = %e, "rate limiter: refund after a cross-slot refusal failed");
        }
    }

    /// Hybrid: after an exact call that carried `deltas` (taken out of
    /// `pending` into `inflight`), drops them from `inflight`, and puts those
    /// whose call did not succeed (`applied[i]` false or missing) back into
    /// `pending` for the next push.
    fn settle(&self, req: &LimitRequest<'_>, deltas: &[WindowState], applied: &[bool]) {
        if deltas.iter().all(WindowState::is_empty) {
            return;
        }
        self.with_slots(req, |slots, mask| {
            let mut locked = self.table.lock(mask);
            for (i, s) in slots.iter().enumerate() {
                let Some(d) = deltas.get(i).copied().filter(|d| !d.is_empty()) else {
                    continue;
                };
                let k = key(s.id, req);
                let shard = locked.shard(s.shard);
                let ok = applied.get(i).copied().unwrap_or(false);
                let enqueue = shard.update(&k, |e| {
                    e.inflight = e.inflight.minus(d);
                    if ok {
                        return false;
                    }
                    e.pending = e.pending.plus(d);
                    !std::mem::replace(&mut e.queued, true)
                });
                if enqueue
                    && let Some((owned, _)) = shard.map.get_key_value(&k as &dyn table::KeyView)
                {
                    let owned = owned.clone();
                    shard.dirty.push(owned);
                }
            }
        });
    }

    /// Turns the exact path's answer into a decision; remembers refusals,
    /// and in mode `hybrid` keeps the global counts it learnt.
    fn finish_exact(
        &self,
        req: &LimitRequest<'_>,
        x: Exact,
        hybrid: bool,
        local_ms: u64,
    ) -> Decision {
        if let Some(i) = x.known.iter().position(|k| *k) {
            self.learn_offset(x.nows[i], local_ms);
        }
        let n = x.ids.len();
        let mut slots = Vec::with_capacity(n);
        let mut mask = 0u64;
        for i in 0..n {
            let id = x.ids[i];
            let shard = self.table.shard_of(&key(id, req));
            mask |= 1 << shard;
            let eval = evaluate(x.states[i], id.requests, id.per_ms, x.nows[i]);
            slots.push(Slot {
                id,
                shard,
                eval,
                memo_ms: 0,
            });
        }
        let refusing: Vec<bool> = (0..n)
            .map(|i| !x.admitted && x.candidate[i] && !slots[i].eval.admits)
            .collect();
        let decision = if x.admitted {
            let known: Vec<Slot> = (0..n).filter(|&i| x.known[i]).map(|i| slots[i]).collect();
            tightest(&known).map_or(Decision::Unlimited, |s| Decision::Allowed(verdict(s)))
        } else if refusing.iter().any(|r| *r) {
            let r: Vec<Slot> = (0..n).filter(|&i| refusing[i]).map(|i| slots[i]).collect();
            refusal(&r, |_| true, |s| s.eval.reset_ms)
        } else {
            // Redis refused where the integer arithmetic here admits (a
            // rounding edge of Lua's doubles): name the candidate with the
            // least room.
            let c: Vec<Slot> = (0..n)
                .filter(|&i| x.candidate[i])
                .map(|i| slots[i])
                .collect();
            let t: Vec<Slot> = tightest(&c).into_iter().copied().collect();
            refusal(&t, |_| true, |s| s.eval.reset_ms.max(1))
        };
        if hybrid || refusing.iter().any(|r| *r) {
            let mut locked = self.table.lock(mask);
            for (i, s) in slots.iter().enumerate() {
                let k = key(s.id, req);
                let remember = refusing[i];
                let learn = hybrid && x.known[i];
                if !remember && !learn {
                    continue;
                }
                let until = local_ms.saturating_add(s.eval.reset_ms);
                let state = x.states[i];
                locked.shard(s.shard).update(&k, |e| {
                    if remember {
                        e.refused_until = e.refused_until.max(until);
                    }
                    if learn {
                        e.global = e.global.max_merge(state);
                    }
                });
            }
        }
        decision
    }

    /// Mode `hybrid`: pushes every entry's unsynced admits (`pending`) to
    /// Redis and reads back the global counts. One script call per slot
    /// group on a cluster (per key id / workspace), per [`FLUSH_CHUNK`]
    /// entries on a single node; all sent at once over the multiplexed
    /// connection, i.e. one pipeline. While Redis is failing it runs at most
    /// every [`PROBE_EVERY`] (a `PING` when there is nothing to push) and is
    /// the hybrid mode's way back out of the fallback.
    async fn flush_hybrid(&self, force: bool) {
        let Some(backend) = &self.redis else { return };
        let local_ms = self.clock.now_ms();
        if !force && !self.may_call_redis(local_ms) {
            return;
        }
        let mut batch: Vec<(table::EntryKey, WindowState)> = Vec::new();
        for i in 0..table::SHARDS {
            let mut sh = self.table.lock_shard(i);
            let dirty = std::mem::take(&mut sh.dirty);
            for k in dirty {
                if let Some(e) = sh.map.get_mut(&k) {
                    e.queued = false;
                    if !e.pending.is_empty() {
                        let d = e.pending;
                        e.inflight = e.inflight.plus(d);
                        e.pending = WindowState::default();
                        batch.push((k, d));
                    }
                }
            }
        }
        if batch.is_empty() {
            if self.fallback.load(Ordering::Acquire) {
                match self.call(backend.ping()).await {
                    Ok(()) => self.redis_ok(),
                    Err(e) => self.redis_failed(&e, self.clock.now_ms()),
                }
            }
            return;
        }
        let groups: Vec<Vec<usize>> = if backend.is_cluster() {
            let mut by_slot: std::collections::HashMap<(bool, &str), Vec<usize>> =
                std::collections::HashMap::new();
            for (i, (k, _)) in batch.iter().enumerate() {
                by_slot.entry(slot_group(k)).or_default().push(i);
            }
            by_slot.into_values().collect()
        } else {
            (0..batch.len())
                .collect::<Vec<_>>()
                .chunks(FLUSH_CHUNK)
                .map(<[usize]>::to_vec)
                .collect()
        };
        let calls = groups.iter().map(|g| {
            let keys: Vec<String> = g.iter().map(|&i| state_key(&batch[i].0)).collect();
            let deltas: Vec<Delta> = g
                .iter()
                .map(|&i| Delta::push(batch[i].0.id.per_ms, batch[i].1))
                .collect();
            async move { self.call(backend.apply(&keys, &deltas)).await }
        });
        let results = futures_util::future::join_all(calls).await;
        inc(&self.stats.hybrid_flushes);
        let local_ms = self.clock.now_ms();
        let mut failure = None;
        for (g, r) in groups.iter().zip(results) {
            let applied = match r {
                Ok(a) if a.states.len() == g.len() => {
                    self.learn_offset(a.now_ms, local_ms);
                    Some(a.states)
                }
                Ok(_) => {
                    failure = Some(StoreError::Reply("apply: wrong number of states"));
                    None
                }
                Err(e) => {
                    failure = Some(e);
                    None
                }
            };
            for (j, &i) in g.iter().enumerate() {
                let (k, d) = &batch[i];
                let mut sh = self.table.lock_shard(self.table.shard_of(k));
                let Some(e) = sh.map.get_mut(k) else { continue };
                e.inflight = e.inflight.minus(*d);
                match applied.as_ref().and_then(|s| s.get(j)) {
                    Some(global) => e.global = e.global.max_merge(*global),
                    None => {
                        e.pending = e.pending.plus(*d);
                        let enqueue = !e.queued;
                        e.queued = true;
                        if enqueue {
                            sh.dirty.push(k.clone());
                        }
                    }
                }
            }
        }
        match failure {
            None => self.redis_ok(),
            Some(e) => self.redis_failed(&e, local_ms),
        }
    }
}

impl Exact {
    fn fill(&mut self, idx: &[usize], now_ms: u64, states: &[WindowState]) {
        for (&i, s) in idx.iter().zip(states) {
            self.states[i] = *s;
            self.nows[i] = now_ms;
            self.known[i] = true;
        }
    }
}

#[cfg(test)]
mod tests;
