//! Upstream request deadlines on a coarse clock: one timer per worker event
//! loop, not one per request.
//!
//! A tokio timer per request (`tokio::time::timeout`) registers and removes
//! an entry in the runtime's timer wheel under its lock, and showed as ~4%
//! of the instructions of a proxied request. Here a request's deadline is a
//! slot in its worker's table, and one ticker task per worker wakes the
//! requests whose deadline passed, every [`GRAIN`]. A deadline therefore
//! fires up to one grain late, which is nothing next to a request timeout.
//!
//! Only worker threads (single-threaded event loops, marked by
//! [`enable_on_this_thread`]) use the table: its ticker must run on the
//! thread whose table it reads. Anywhere else, tokio's timer does the job.

use std::cell::{Cell, RefCell};
use std::pin::{Pin, pin};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How late a deadline may fire, and how often a busy worker's ticker runs.
pub const GRAIN: Duration = Duration::from_millis(10);

/// The deadline passed before the future finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Elapsed;

/// One pending deadline.
struct Slot {
    at: Instant,
    waker: Waker,
    fired: bool,
}

/// This worker's pending deadlines.
#[derive(Default)]
struct Table {
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    /// Whether a ticker task is running for this table.
    ticking: bool,
}

impl Table {
    /// No slot in use: the ticker may stop.
    fn idle(&self) -> bool {
        self.slots.len() == self.free.len()
    }
}

thread_local! {
    static TABLE: RefCell<Table> = RefCell::default();
    static ENABLED: Cell<bool> = const { Cell::new(false) };
}

/// Marks this thread as a single-threaded event loop: deadlines of the
/// requests it runs use its table. Called once per worker thread.
pub fn enable_on_this_thread() {
    ENABLED.with(|e| e.set(true));
}

/// `start + d`, or about thirty years on when that overflows (as tokio's
/// own timeouts do): a huge configured timeout means "no timeout".
pub fn after(start: Instant, d: Duration) -> Instant {
    start
        .checked_add(d)
        .or_else(|| start.checked_add(Duration::from_secs(86_400 * 365 * 30)))
        .unwrap_or(start)
}

/// Runs `fut` until it finishes or `at` passes.
pub fn within<F: Future>(at: Instant, fut: F) -> Within<F> {
    // Boxed: a `Sleep` is large and cache-line aligned, and this future sits
    // inside every proxied request's.
    let fallback =
        (!ENABLED.with(Cell::get)).then(|| Box::pin(tokio::time::sleep_until(at.into())));
    Within {
        fut,
        fallback,
        at,
        slot: Registration(None),
    }
}

pin_project_lite::pin_project! {
    /// The future of [`within`]. A struct, not an `async fn`: that would
    /// hold `fut` twice (as its argument and as the future it polls), and
    /// this future sits inside every proxied request's.
    pub struct Within<F> {
        #[pin]
        fut: F,
        // Off the worker threads: tokio's timer.
        fallback: Option<Pin<Box<tokio::time::Sleep>>>,
        at: Instant,
        slot: Registration,
    }
}

impl<F: Future> Future for Within<F> {
    type Output = Result<F::Output, Elapsed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(v) = this.fut.poll(cx) {
            return Poll::Ready(Ok(v));
        }
        if let Some(sleep) = this.fallback {
            return sleep.as_mut().poll(cx).map(|()| Err(Elapsed));
        }
        match this.slot.0 {
            // Registered only once the future waits: an answer ready at
            // once costs nothing.
            None => this.slot.0 = Some(register(*this.at, cx.waker())),
            Some(i) if fired_or_rewake(i, cx.waker()) => return Poll::Ready(Err(Elapsed)),
            Some(_) => {}
        }
        Poll::Pending
    }
}

/// A slot of this thread's table, freed on drop (the request finished, or
/// was cancelled because the client went away).
struct Registration(Option<usize>);

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(i) = self.0 {
            TABLE.with(|t| {
                let mut t = t.borrow_mut();
                if let Some(s) = t.slots.get_mut(i) {
                    *s = None;
                    t.free.push(i);
                }
            });
        }
    }
}

fn register(at: Instant, waker: &Waker) -> usize {
    let (i, start_ticker) = TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let slot = Some(Slot {
            at,
            waker: waker.clone(),
            fired: false,
        });
        let i = match t.free.pop() {
            Some(i) => {
                t.slots[i] = slot;
                i
            }
            None => {
                t.slots.push(slot);
                t.slots.len() - 1
            }
        };
        let start = !t.ticking;
        t.ticking = true;
        (i, start)
    });
    if start_ticker {
        // On this thread: a worker's runtime is single-threaded.
        tokio::spawn(ticker());
    }
    i
}

/// Whether slot `i` fired; if not, keeps `waker` as the one to wake.
fn fired_or_rewake(i: usize, waker: &Waker) -> bool {
    TABLE.with(|t| {
        let mut t = t.borrow_mut();
        let Some(Some(s)) = t.slots.get_mut(i) else {
            return false;
        };
        if s.fired {
            return true;
        }
        if !s.waker.will_wake(waker) {
            s.waker = waker.clone();
        }
        false
    })
}

/// Wakes the requests whose deadline passed, every grain, while any wait.
async fn ticker() {
    // Cleared however the task ends, so a later deadline starts a new one.
    struct Stopped;
    impl Drop for Stopped {
        fn drop(&mut self) {
            let _ = TABLE.try_with(|t| {
                if let Ok(mut t) = t.try_borrow_mut() {
                    t.ticking = false;
                }
            });
        }
    }
    let _stopped = Stopped;
    let mut sleep = pin!(tokio::time::sleep(GRAIN));
    loop {
        sleep.as_mut().await;
        let now = Instant::now();
        let mut due = Vec::new();
        let idle = TABLE.with(|t| {
            let mut t = t.borrow_mut();
            for s in t.slots.iter_mut().flatten() {
                if !s.fired && s.at <= now {
                    s.fired = true;
                    due.push(s.waker.clone());
                }
            }
            t.idle()
        });
        // Woken outside the borrow: a waker may run code that registers.
        due.into_iter().for_each(Waker::wake);
        if idle {
            return;
        }
        sleep.as_mut().reset((now + GRAIN).into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn worker_runtime() -> tokio::runtime::Runtime {
        enable_on_this_thread();
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime")
    }

    #[test]
    fn a_future_that_finishes_in_time_gives_its_output() {
        worker_runtime().block_on(async {
            let at = Instant::now() + Duration::from_secs(5);
            let r = within(at, async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                7
            })
            .await;
            assert_eq!(r, Ok(7));
        });
        TABLE.with(|t| assert!(t.borrow().idle(), "the slot was freed"));
    }

    #[test]
    fn a_future_past_its_deadline_is_cut_within_a_grain_or_two() {
        worker_runtime().block_on(async {
            let start = Instant::now();
            let r = within(
                start + Duration::from_millis(50),
                std::future::pending::<()>(),
            )
            .await;
            let took = start.elapsed();
            assert_eq!(r, Err(Elapsed));
            assert!(took >= Duration::from_millis(50), "fired early: {took:?}");
            assert!(
                took < Duration::from_millis(50) + 20 * GRAIN,
                "fired late: {took:?}"
            );
        });
    }

    #[test]
    fn the_ticker_stops_when_nothing_waits_and_restarts_for_the_next_deadline() {
        worker_runtime().block_on(async {
            let soon = || Instant::now() + Duration::from_millis(30);
            assert_eq!(
                within(soon(), std::future::pending::<()>()).await,
                Err(Elapsed)
            );
            // Let the ticker see the empty table and end.
            tokio::time::sleep(3 * GRAIN).await;
            TABLE.with(|t| assert!(!t.borrow().ticking, "ticker still running"));
            assert_eq!(
                within(soon(), std::future::pending::<()>()).await,
                Err(Elapsed)
            );
        });
    }

    #[test]
    fn many_deadlines_fire_each_on_its_own_time() {
        worker_runtime().block_on(async {
            let start = Instant::now();
            let waits = (1..=20u64).map(|i| async move {
                let at = start + Duration::from_millis(10 * i);
                let r = within(at, std::future::pending::<()>()).await;
                (r, Instant::now() >= at)
            });
            for (r, on_time) in futures_util::future::join_all(waits).await {
                assert_eq!(r, Err(Elapsed));
                assert!(on_time, "a deadline fired before its time");
            }
        });
        TABLE.with(|t| assert!(t.borrow().idle()));
    }

    #[test]
    fn off_a_worker_thread_tokio_keeps_the_time() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async {
            let r = tokio::spawn(async {
                within(
                    Instant::now() + Duration::from_millis(30),
                    std::future::pending::<()>(),
                )
                .await
            })
            .await
            .expect("task");
            assert_eq!(r, Err(Elapsed));
        });
    }
}
