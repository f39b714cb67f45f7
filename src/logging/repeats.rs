//! Repeated warnings, summarised: under a fault the same warning can come
//! once per request or per accepted connection, thousands a second. Each
//! such call site owns a static [`Repeats`]; the first occurrence in an
//! interval ([`INTERVAL`]) is logged in full, later ones in the interval are
//! only counted, and the next line logged carries `suppressed = N`, the
//! number not logged since the previous line.
//!
//! A count left pending when the fault ends is not lost: a background tick
//! (one thread, started with the first suppressed occurrence, waking every
//! [`TICK`]) writes a summary line for each site whose interval is over, and
//! [`flush_all`] writes what remains at shutdown. A tick rather than waiting
//! for the next occurrence because after a fault there may be none, and the
//! operator needs the final count while the incident is still being read.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Within one interval a site logs at most one line of its own.
pub const INTERVAL: Duration = Duration::from_secs(10);

/// How often the background tick looks for pending counts.
pub const TICK: Duration = Duration::from_secs(1);

/// `start_ms` before the first occurrence.
const NEVER: u64 = u64::MAX;

/// One call site's repeated warning. Lock-free: an occurrence costs a clock
/// read and one or two atomic operations.
pub struct Repeats {
    /// When the current interval began, in ms since [`origin`] ([`NEVER`] before the first).
    start_ms: AtomicU64,
    /// Occurrences counted but not logged since the last line.
    suppressed: AtomicU64,
    /// Whether the tick knows this site (set once, on its first suppression).
    registered: AtomicBool,
    /// Writes the summary line for `n` occurrences not logged one by one
    /// (the site's own target and message).
    summary: fn(u64),
}

impl Repeats {
    /// A site whose pending count is written by `summary` (called with the
    /// count, never 0) when the tick or shutdown finds it pending.
    pub const fn new(summary: fn(u64)) -> Self {
        Repeats {
            start_ms: AtomicU64::new(NEVER),
            suppressed: AtomicU64::new(0),
            registered: AtomicBool::new(false),
            summary,
        }
    }

    /// One occurrence. `Some(n)`: log it in full with `suppressed = n` (the
    /// occurrences not logged since the previous line); `None`: counted only.
    pub fn admit(&'static self) -> Option<u64> {
        let admitted = self.admit_at(now_ms());
        if admitted.is_none() && !self.registered.load(Ordering::Relaxed) {
            self.register();
        }
        admitted
    }

    fn admit_at(&self, now: u64) -> Option<u64> {
        let start = self.start_ms.load(Ordering::Acquire);
        if (start == NEVER || now.saturating_sub(start) >= interval_ms())
            && self
                .start_ms
                .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::AcqRel));
        }
        // Inside the interval, or another thread opened the new one first.
        self.suppressed.fetch_add(1, Ordering::AcqRel);
        None
    }

    /// The pending count, taken, when the interval is over (`force`: at
    /// once); a new interval starts, so that the summary line counts as the
    /// interval's line.
    fn take_pending(&self, now: u64, force: bool) -> Option<u64> {
        if self.suppressed.load(Ordering::Acquire) == 0 {
            return None;
        }
        let start = self.start_ms.load(Ordering::Acquire);
        if !force && start != NEVER && now.saturating_sub(start) < interval_ms() {
            return None;
        }
        if self
            .start_ms
            .compare_exchange(start, now, Ordering::AcqRel, Ordering::Acquire)
            .is_err()
        {
            // An occurrence opened the interval and carries the count.
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::AcqRel)).filter(|&n| n > 0)
    }

    fn flush(&self, now: u64, force: bool) {
        if let Some(n) = self.take_pending(now, force) {
            (self.summary)(n);
        }
    }

    /// Makes the site known to the tick, and starts the tick (once).
    #[cold]
    fn register(&'static self) {
        if self.registered.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Ok(mut sites) = sites().lock() {
            sites.push(self);
        }
        TICKER.get_or_init(|| {
            std::thread::Builder::new()
                .name("log-repeats".into())
                .spawn(|| {
                    loop {
                        std::thread::sleep(TICK);
                        flush_due(false);
                    }
                })
                .is_ok()
        });
    }
}

impl std::fmt::Debug for Repeats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Repeats")
            .field("suppressed", &self.suppressed.load(Ordering::Relaxed))
            .finish()
    }
}

/// Writes every pending count now (at shutdown: nothing counted is lost).
pub fn flush_all() {
    flush_due(true);
}

fn flush_due(force: bool) {
    let now = now_ms();
    // Copied out: a summary line must not be written under the lock.
    let list: Vec<&'static Repeats> = match sites().lock() {
        Ok(s) => s.clone(),
        Err(_) => return,
    };
    for site in list {
        site.flush(now, force);
    }
}

static TICKER: OnceLock<bool> = OnceLock::new();

fn sites() -> &'static Mutex<Vec<&'static Repeats>> {
    static SITES: OnceLock<Mutex<Vec<&'static Repeats>>> = OnceLock::new();
    SITES.get_or_init(|| Mutex::new(Vec::new()))
}

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

fn now_ms() -> u64 {
    u64::try_from(origin().elapsed().as_millis()).unwrap_or(u64::MAX - 1)
}

fn interval_ms() -> u64 {
    INTERVAL.as_millis() as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn quiet(_: u64) {}

    #[test]
    fn first_is_logged_then_counted_then_the_next_interval_carries_the_count() {
        let r = Repeats::new(quiet);
        let i = interval_ms();
        assert_eq!(r.admit_at(5), Some(0));
        for t in 6..106 {
            assert_eq!(r.admit_at(t), None);
        }
        assert_eq!(r.admit_at(5 + i - 1), None);
        assert_eq!(r.admit_at(5 + i), Some(101));
        assert_eq!(r.admit_at(5 + i + 1), None);
    }

    #[test]
    fn the_tick_writes_a_pending_count_once_the_interval_is_over() {
        let r = Repeats::new(quiet);
        let i = interval_ms();
        assert_eq!(r.take_pending(0, false), None, "nothing pending");
        assert_eq!(r.admit_at(0), Some(0));
        r.admit_at(1);
        r.admit_at(2);
        assert_eq!(r.take_pending(i - 1, false), None, "interval not over");
        assert_eq!(r.take_pending(i, false), Some(2));
        assert_eq!(r.take_pending(i + 1, false), None, "taken once");
        // The summary line opened an interval: the next one is counted.
        assert_eq!(r.admit_at(i + 2), None);
        assert_eq!(r.take_pending(i + 3, true), Some(1), "shutdown forces");
    }

    #[test]
    fn under_contention_every_occurrence_is_logged_or_counted() {
        static SITE: Repeats = Repeats::new(quiet);
        let logged = Arc::new(AtomicU64::new(0));
        let counted = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let (logged, counted) = (logged.clone(), counted.clone());
                std::thread::spawn(move || {
                    for n in 0..10_000u64 {
                        // Time jumps forward now and then: new intervals open under contention.
                        if let Some(s) = SITE.admit_at(n / 2_500 * interval_ms()) {
                            logged.fetch_add(1, Ordering::Relaxed);
                            counted.fetch_add(s, Ordering::Relaxed);
                        }
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("thread");
        }
        let rest = SITE.take_pending(u64::MAX - 1, true).unwrap_or(0);
        let logged = logged.load(Ordering::Relaxed);
        assert!(logged <= 4, "at most one line per interval: {logged}");
        assert_eq!(logged + counted.load(Ordering::Relaxed) + rest, 40_000);
    }
}
