//! The local cache of key records in front of the store. A cached key costs
//! no store round trip; concurrent misses for one digest share one lookup;
//! while the store is down, keys seen recently keep working for
//! `stale_if_error`, and a circuit breaker ([`Breaker`]) spares them the
//! store's timeout while it stalls. Invalidated by key id on every change (admin writes,
//! Redis pub/sub, SQLite `data_version`), with the TTL as a backstop.

use super::breaker::Breaker;
use crate::config::Cache as CacheSettings;
use crate::context::AuthedKey;
use crate::keys::{Digest, SharedStore, StoreError};
use crate::time::Timestamp;
use dashmap::DashMap;
use foldhash::fast::RandomState;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};
use tokio::sync::OnceCell;

/// A cached lookup. The digest is the map's key and is not repeated here:
/// the map has compared it already, so a second, constant-time comparison
/// would add nothing (a digest is not a secret: it cannot be reversed).
#[derive(Clone)]
enum Entry {
    Found { record: Arc<AuthedKey>, at: Instant },
    Missing { at: Instant },
}

/// Frees the breaker's probe slot when a probing request is dropped before
/// its lookup reported (a client that went away mid-lookup).
struct ProbeGuard<'a>(&'a Breaker);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        self.0.probe_abandoned();
    }
}

type Lookup = Result<Option<Arc<AuthedKey>>, Arc<StoreError>>;

/// Counters read by `/metrics`.
#[derive(Debug, Default)]
pub struct CacheStats {
    /// Answered from the cache.
    pub hits: AtomicU64,
    /// Needed a store lookup.
    pub misses: AtomicU64,
    /// Served a stale entry because the store failed.
    pub stale: AtomicU64,
    /// Store lookups actually made (after single-flight).
    pub lookups: AtomicU64,
    /// Store lookups that failed.
    pub errors: AtomicU64,
    /// Total store lookup time, microseconds.
    pub lookup_micros: AtomicU64,
}

/// The key cache, shared by all requests.
pub struct KeyCache {
    store: SharedStore,
    // foldhash, randomly seeded: SipHash showed in the keyed path's profile.
    entries: DashMap<Digest, Entry, RandomState>,
    inflight: DashMap<Digest, Arc<OnceCell<Lookup>>, RandomState>,
    /// Bumped by every invalidation, so a lookup that started before an
    /// invalidation cannot put a stale record back.
    generation: AtomicU64,
    /// Keys used since the last `last_used_at` write, each once (its
    /// `queued` flag), with the time in its own `noted_at`.
    used: Mutex<Vec<Arc<AuthedKey>>>,
    breaker: Arc<Breaker>,
    /// Hit/miss/stale counters.
    pub stats: CacheStats,
}

impl KeyCache {
    /// A cache in front of `store`.
    pub fn new(store: SharedStore) -> Self {
        KeyCache {
            store,
            entries: DashMap::default(),
            inflight: DashMap::default(),
            generation: AtomicU64::new(0),
            used: Mutex::default(),
            breaker: Arc::default(),
            stats: CacheStats::default(),
        }
    }

    /// The store behind the cache.
    pub fn store(&self) -> &SharedStore {
        &self.store
    }

    /// The record for a digest: from the cache when fresh, else from the store
    /// (one lookup however many requests wait for it). `Err` only when the
    /// store failed (or the breaker holds it off) and no usable stale entry
    /// exists.
    pub async fn get(
        &self,
        digest: &Digest,
        s: &CacheSettings,
    ) -> Result<Option<Arc<AuthedKey>>, Arc<StoreError>> {
        let now = Instant::now();
        let mut stale = None;
        if let Some(e) = self.entries.get(digest) {
            match &*e {
                Entry::Found { record, at } => {
                    let age = now.saturating_duration_since(*at);
                    if age < s.ttl {
                        self.stats.hits.fetch_add(1, Ordering::Relaxed);
                        return Ok(Some(record.clone()));
                    }
                    if age < s.ttl + s.stale_if_error {
                        stale = Some(record.clone());
                    }
                }
                Entry::Missing { at } if now.saturating_duration_since(*at) < s.negative_ttl => {
                    self.stats.hits.fetch_add(1, Ordering::Relaxed);
                    return Ok(None);
                }
                Entry::Missing { .. } => {}
            }
        }
        self.stats.misses.fetch_add(1, Ordering::Relaxed);
        let mut probe = None;
        if self.breaker.is_open() {
            if !self.breaker.try_probe() {
                return self.stale_or(stale, self.breaker.open_error());
            }
            if let Some(rec) = stale {
                // The probe runs on its own: this request has its answer.
                self.probe_in_background(*digest);
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                return Ok(Some(rec));
            }
            // No stale record: this request's own lookup is the probe.
            probe = Some(ProbeGuard(&self.breaker));
        }
        let generation = self.generation.load(Ordering::Acquire);
        let cell = self
            .inflight
            .entry(*digest)
            .or_insert_with(|| Arc::new(OnceCell::new()))
            .clone();
        let result = cell
            .get_or_init(|| async {
                self.stats.lookups.fetch_add(1, Ordering::Relaxed);
                let t = Instant::now();
                let r = self.store.lookup(digest).await;
                self.stats
                    .lookup_micros
                    .fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                match r {
                    Ok(rec) => {
                        self.breaker.succeeded();
                        let rec = rec.map(|r| Arc::new(AuthedKey::new(r)));
                        if self.generation.load(Ordering::Acquire) == generation {
                            let entry = match &rec {
                                Some(r) => Entry::Found {
                                    record: r.clone(),
                                    at: Instant::now(),
                                },
                                None => Entry::Missing { at: Instant::now() },
                            };
                            self.entries.insert(*digest, entry);
                        }
                        Ok(rec)
                    }
                    Err(e) => {
                        self.stats.errors.fetch_add(1, Ordering::Relaxed);
                        self.breaker.failed(&e);
                        Err(Arc::new(e))
                    }
                }
            })
            .await
            .clone();
        self.inflight
            .remove_if(digest, |_, c| Arc::ptr_eq(c, &cell));
        drop(probe);
        match result {
            Err(e) => self.stale_or(stale, e),
            ok => ok,
        }
    }

    /// The stale record when there is one (counted), else the store's error.
    fn stale_or(&self, stale: Option<Arc<AuthedKey>>, e: Arc<StoreError>) -> Lookup {
        match stale {
            Some(rec) => {
                self.stats.stale.fetch_add(1, Ordering::Relaxed);
                Ok(Some(rec))
            }
            None => Err(e),
        }
    }

    /// Checks, off any request, whether the store answers again: one lookup
    /// whose outcome closes the breaker or backs it off. Its record is not
    /// kept (a later lookup, with the breaker closed, fetches it anew).
    fn probe_in_background(&self, digest: Digest) {
        let (store, breaker) = (self.store.clone(), self.breaker.clone());
        tokio::spawn(async move {
            match store.lookup(&digest).await {
                Ok(_) => breaker.succeeded(),
                Err(e) => breaker.failed(&e),
            }
        });
    }

    /// The key store's circuit breaker.
    pub fn breaker(&self) -> &Breaker {
        &self.breaker
    }

    /// Drops every cached digest of a key id (it was changed or revoked).
    pub fn invalidate(&self, id: &str) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries
            .retain(|_, e| !matches!(e, Entry::Found { record, .. } if *record.id == *id));
    }

    /// Forgets the entries no request can use any more: found keys past
    /// `ttl + stale_if_error`, missing ones past `negative_ttl`. Without it a
    /// key used once, or a stream of made-up keys, would stay in memory for
    /// the life of the process. Returns how many entries stay.
    pub fn sweep(&self, s: &CacheSettings, now: Instant) -> usize {
        let found_for = s.ttl + s.stale_if_error;
        self.entries.retain(|_, e| match e {
            Entry::Found { at, .. } => now.saturating_duration_since(*at) < found_for,
            Entry::Missing { at } => now.saturating_duration_since(*at) < s.negative_ttl,
        });
        self.entries.len()
    }

    /// Keys (and known-missing digests) held now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is cached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Drops everything (changes may have been missed).
    pub fn flush(&self) {
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.entries.clear();
    }

    /// Notes that a key authenticated a request; written to the store in
    /// batches by [`KeyCache::flush_last_used`], never per request. The key's
    /// own clock moves at most once a second (`last_used_at` has whole
    /// seconds), and the key joins the queue once per batch.
    pub fn note_used(&self, key: &Arc<AuthedKey>) {
        let now = Timestamp::now().0;
        if key.noted_at.swap(now, Ordering::Relaxed) == now {
            return;
        }
        if !key.queued.swap(true, Ordering::AcqRel) {
            self.used
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .push(key.clone());
        }
    }

    /// Writes the `last_used_at` of keys used since the last call: at most one
    /// write per key per call.
    pub async fn flush_last_used(&self) -> Result<usize, StoreError> {
        let queued = std::mem::take(&mut *self.used.lock().unwrap_or_else(PoisonError::into_inner));
        if queued.is_empty() {
            return Ok(0);
        }
        let batch: Vec<(String, Timestamp)> = queued
            .iter()
            .map(|k| {
                // Unqueued before its time is read: a use after this read
                // queues the key again for the next batch.
                k.queued.store(false, Ordering::Release);
                (
                    k.id.to_string(),
                    Timestamp(k.noted_at.load(Ordering::Acquire)),
                )
            })
            .collect();
        self.store.touch(&batch).await?;
        Ok(batch.len())
    }

    /// Runs the `last_used_at` writer until the process ends.
    pub fn spawn_last_used_writer(self: &Arc<Self>, every: Duration) {
        let me = Arc::downgrade(self);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let Some(c) = me.upgrade() else { return };
                if let Err(e) = c.flush_last_used().await {
                    tracing::warn!(error = %e, "could not record last_used_at");
                }
            }
        });
    }
}
