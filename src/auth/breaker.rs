//! The key store's circuit breaker. Closed, every lookup the cache needs
//! goes to the store. A lookup that fails or times out opens it: then
//! stale-cached keys are served at once and uncached keys are refused at
//! once (503 `AUTH_UNAVAILABLE`), instead of each request waiting out the
//! store timeout, while one probe at a time checks whether the store answers
//! again, backing off from [`MIN_BACKOFF`] to [`MAX_BACKOFF`].

use crate::keys::StoreError;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Wait before the first probe after the breaker opens.
pub const MIN_BACKOFF: Duration = Duration::from_millis(100);
/// Longest wait between probes while the store keeps failing.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// Open/closed state, shared by every request (atomics only: the closed
/// state, the usual one, costs one relaxed load per store lookup).
#[derive(Debug)]
pub struct Breaker {
    open: AtomicBool,
    probing: AtomicBool,
    /// Milliseconds since `epoch` before which no probe starts.
    next_probe_ms: AtomicU64,
    backoff_ms: AtomicU64,
    epoch: Instant,
    /// Times the breaker opened.
    pub trips: AtomicU64,
    /// The error refused requests get while it is open (one allocation, shared).
    open_error: Arc<StoreError>,
}

impl Default for Breaker {
    fn default() -> Self {
        Breaker {
            open: AtomicBool::new(false),
            probing: AtomicBool::new(false),
            next_probe_ms: AtomicU64::new(0),
            backoff_ms: AtomicU64::new(MIN_BACKOFF.as_millis() as u64),
            epoch: Instant::now(),
            trips: AtomicU64::new(0),
            open_error: Arc::new(StoreError::CircuitOpen),
        }
    }
}

impl Breaker {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether the store failed recently and has not answered since.
    pub fn is_open(&self) -> bool {
        self.open.load(Ordering::Acquire)
    }

    /// While open: whether this caller may probe the store now (the probe is
    /// due and no other is running). Whoever gets `true` must report the
    /// outcome with [`Breaker::succeeded`] or [`Breaker::failed`].
    pub fn try_probe(&self) -> bool {
        self.now_ms() >= self.next_probe_ms.load(Ordering::Acquire)
            && !self.probing.swap(true, Ordering::AcqRel)
    }

    /// A store call answered (a found key, or a known absence).
    pub fn succeeded(&self) {
        if !self.open.load(Ordering::Relaxed) && !self.probing.load(Ordering::Relaxed) {
            return;
        }
        self.backoff_ms
            .store(MIN_BACKOFF.as_millis() as u64, Ordering::Release);
        self.probing.store(false, Ordering::Release);
        if self.open.swap(false, Ordering::AcqRel) {
            tracing::info!("key store answers again; key lookups resume");
        }
    }

    /// A store call failed or timed out. Errors that say nothing of the
    /// store's health (a corrupt record) leave the breaker as it is.
    pub fn failed(&self, e: &StoreError) {
        if !matches!(e, StoreError::Unavailable(_) | StoreError::Timeout) {
            self.probing.store(false, Ordering::Release);
            return;
        }
        let was_open = self.open.swap(true, Ordering::AcqRel);
        let was_probe = self.probing.load(Ordering::Acquire);
        if !was_open {
            self.trips.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(
                error = %e,
                "key store failing: serving stale-cached keys and refusing uncached ones until it answers again"
            );
        } else if !was_probe {
            // A lookup that began before the breaker opened: it says
            // nothing new, and must not push the next probe back.
            return;
        }
        // Back off only when a probe failed.
        let backoff = if was_probe {
            let b = self.backoff_ms.load(Ordering::Acquire);
            let next = (b * 2).min(MAX_BACKOFF.as_millis() as u64);
            self.backoff_ms.store(next, Ordering::Release);
            next
        } else {
            self.backoff_ms.load(Ordering::Acquire)
        };
        self.next_probe_ms
            .store(self.now_ms() + backoff, Ordering::Release);
        self.probing.store(false, Ordering::Release);
    }

    /// Ends a probe that will report nothing (its request went away
    /// mid-lookup), so that the next one may start.
    pub fn probe_abandoned(&self) {
        self.probing.store(false, Ordering::Release);
    }

    /// The error for a request refused while the breaker is open.
    pub fn open_error(&self) -> Arc<StoreError> {
        self.open_error.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_probe_at_a_time_with_backoff_and_a_success_closes() {
        let b = Breaker::default();
        assert!(!b.is_open());
        b.failed(&StoreError::Timeout);
        b.failed(&StoreError::Unavailable("down".into()));
        assert!(b.is_open());
        assert_eq!(b.trips.load(Ordering::Relaxed), 1, "opened once");
        assert!(!b.try_probe(), "no probe before the first backoff");
        std::thread::sleep(MIN_BACKOFF + Duration::from_millis(20));
        assert!(b.try_probe(), "the probe is due");
        assert!(!b.try_probe(), "one probe at a time");
        b.failed(&StoreError::Timeout);
        assert_eq!(b.backoff_ms.load(Ordering::Relaxed), 200, "backoff doubles");
        assert!(!b.try_probe());
        std::thread::sleep(Duration::from_millis(220));
        assert!(b.try_probe());
        b.succeeded();
        assert!(!b.is_open());
        assert_eq!(b.backoff_ms.load(Ordering::Relaxed), 100, "backoff reset");
    }

    #[test]
    fn a_corrupt_record_does_not_open_it_stragglers_do_not_delay_probes_and_backoff_is_capped() {
        let b = Breaker::default();
        b.failed(&StoreError::Corrupt("x".into()));
        assert!(!b.is_open());
        b.failed(&StoreError::Timeout);
        let due = b.next_probe_ms.load(Ordering::Relaxed);
        b.failed(&StoreError::Timeout);
        assert_eq!(
            b.next_probe_ms.load(Ordering::Relaxed),
            due,
            "a lookup begun before the breaker opened does not push the probe back"
        );
        for _ in 0..10 {
            b.next_probe_ms.store(0, Ordering::Relaxed);
            assert!(b.try_probe());
            b.failed(&StoreError::Timeout);
        }
        assert_eq!(
            b.backoff_ms.load(Ordering::Relaxed),
            MAX_BACKOFF.as_millis() as u64
        );
    }
}
