//! Sliding-window counter arithmetic, as pure functions of an injected
//! clock (`now_ms`, milliseconds since the Unix epoch).
//!
//! Windows are aligned to multiples of `per` since the epoch. The state of
//! one (limit, subject) is `{window index, current count, previous count}`;
//! the estimate of requests in the last `per` is
//! `prev × (1 − elapsed / per) + curr`, and a request is admitted when
//! `estimate + 1 ≤ requests`. All of it is computed exactly in integers,
//! scaled by `per` (so `estimate × per = prev × (per − elapsed) + curr × per`).
//!
//! The Lua script of the Redis path (see `store.rs`) makes the same admission
//! test in Lua numbers (doubles), which are exact while
//! `requests × per_ms < 2^53` (e.g. 3 million requests per 30 days).

/// The counters of one (limit, subject).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WindowState {
    /// Index of the window `curr` counts: `start_ms / per_ms`.
    pub window: u64,
    /// Requests counted in that window.
    pub curr: u64,
    /// Requests counted in the window before it.
    pub prev: u64,
}

/// The index of the window that contains `now_ms`.
pub fn window_index(now_ms: u64, per_ms: u64) -> u64 {
    now_ms / per_ms.max(1)
}

impl WindowState {
    /// Whether it counts nothing.
    pub fn is_empty(&self) -> bool {
        self.curr == 0 && self.prev == 0
    }

    /// The state as seen from window `w`: one window on, `curr` becomes
    /// `prev`; two or more, both are zero. A `w` before the state's own
    /// window (a clock that stepped back) leaves it unchanged.
    pub fn rolled_to(self, w: u64) -> Self {
        if w <= self.window {
            self
        } else if w == self.window + 1 {
            WindowState {
                window: w,
                curr: 0,
                prev: self.curr,
            }
        } else {
            WindowState {
                window: w,
                curr: 0,
                prev: 0,
            }
        }
    }

    /// The state as seen at `now_ms`.
    pub fn at(self, now_ms: u64, per_ms: u64) -> Self {
        self.rolled_to(window_index(now_ms, per_ms))
    }

    /// `self` plus one request in its current window.
    pub fn plus_one(self) -> Self {
        WindowState {
            curr: self.curr.saturating_add(1),
            ..self
        }
    }

    fn aligned(self, other: Self) -> (Self, Self) {
        let w = self.window.max(other.window);
        (self.rolled_to(w), other.rolled_to(w))
    }

    /// Counts of both added, after rolling both to the later window.
    pub fn plus(self, other: Self) -> Self {
        let (a, b) = self.aligned(other);
        WindowState {
            window: a.window,
            curr: a.curr.saturating_add(b.curr),
            prev: a.prev.saturating_add(b.prev),
        }
    }

    /// `other`'s counts taken away (saturating), after rolling both to the later window.
    pub fn minus(self, other: Self) -> Self {
        let (a, b) = self.aligned(other);
        WindowState {
            window: a.window,
            curr: a.curr.saturating_sub(b.curr),
            prev: a.prev.saturating_sub(b.prev),
        }
    }

    /// The larger of each count, after rolling both to the later window.
    /// Counters only grow within a window, so this keeps the newest view of
    /// two reads that may have arrived out of order.
    pub fn max_merge(self, other: Self) -> Self {
        let (a, b) = self.aligned(other);
        WindowState {
            window: a.window,
            curr: a.curr.max(b.curr),
            prev: a.prev.max(b.prev),
        }
    }
}

/// Milliseconds since the start of `state`'s window (0 when the clock is
/// before it), at most `per_ms`.
pub fn elapsed_ms(state: WindowState, per_ms: u64, now_ms: u64) -> u64 {
    let start = state.window.saturating_mul(per_ms);
    now_ms.saturating_sub(start).min(per_ms)
}

/// `estimate × per_ms` for a state already rolled to `now_ms`'s window.
fn scaled_estimate(s: WindowState, per_ms: u64, now_ms: u64) -> u128 {
    let per = per_ms as u128;
    let e = elapsed_ms(s, per_ms, now_ms) as u128;
    s.prev as u128 * (per - e) + s.curr as u128 * per
}

/// The sliding-window estimate at `now_ms` (for logs and tests; decisions
/// use the exact integer form).
pub fn estimate(state: WindowState, per_ms: u64, now_ms: u64) -> f64 {
    let per_ms = per_ms.max(1);
    let s = state.at(now_ms, per_ms);
    scaled_estimate(s, per_ms, now_ms) as f64 / per_ms as f64
}

/// What one limit says about one more request at `now_ms`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Eval {
    /// `estimate + 1 ≤ requests`.
    pub admits: bool,
    /// `floor(requests − estimate)`, 0 when the estimate is past the limit.
    pub remaining: u64,
    /// Milliseconds until `remaining` grows by one with no new requests
    /// (for `remaining == 0`: until one more request would be admitted).
    /// When nothing is counted, until the current window ends.
    pub reset_ms: u64,
    /// `estimate × per_ms + per_ms > threshold`: see [`above_fraction`].
    pub scaled_next: u128,
}

/// Evaluates `state` (rolled to `now_ms` here) against `requests` per `per_ms`.
pub fn evaluate(state: WindowState, requests: u64, per_ms: u64, now_ms: u64) -> Eval {
    let per_ms = per_ms.max(1);
    let s = state.at(now_ms, per_ms);
    let per = per_ms as u128;
    let est = scaled_estimate(s, per_ms, now_ms);
    let cap = requests as u128 * per;
    let admits = est + per <= cap;
    let remaining = (cap.saturating_sub(est) / per) as u64;
    let reset_ms = reset_ms(s, requests, remaining, per_ms, now_ms);
    Eval {
        admits,
        remaining,
        reset_ms,
        scaled_next: est + per,
    }
}

/// Whether admitting one more request would put the estimate past
/// `fraction × requests` (the hybrid mode's switch to exact decisions).
pub fn above_fraction(ev: &Eval, requests: u64, per_ms: u64, fraction: f64) -> bool {
    ev.scaled_next as f64 > fraction * requests as f64 * per_ms.max(1) as f64
}

/// Milliseconds until `floor(requests − estimate)` first exceeds `remaining`
/// if no request is counted meanwhile; `s` is rolled to `now_ms`.
///
/// With `T = requests − remaining − 1`, it is the first `t` at which the
/// estimate is `≤ T`: within the current window when `curr ≤ T` (the
/// previous window's weight fades linearly), else in the next window, where
/// `curr` has become the fading `prev`.
fn reset_ms(s: WindowState, requests: u64, remaining: u64, per_ms: u64, now_ms: u64) -> u64 {
    let per = per_ms as i128;
    let left = per - elapsed_ms(s, per_ms, now_ms) as i128;
    if remaining >= requests {
        return left.max(0) as u64;
    }
    let target = requests as i128 - remaining as i128 - 1;
    let (c, p) = (s.curr as i128, s.prev as i128);
    let t = if c <= target && p > 0 {
        left - (target - c) * per / p
    } else {
        left + per - target * per / c.max(1)
    };
    t.max(0) as u64
}

/// Whole seconds for a header: `ceil(ms / 1000)`, at least 1.
pub fn ceil_secs(ms: u64) -> u64 {
    ms.div_ceil(1000).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: u64 = 1000;
    const DAY: u64 = 86_400 * SEC;
    /// A window boundary for 1 s windows (and for 30-day windows: a multiple of both).
    const T0: u64 = 2_592_000_000 * 700;

    fn st(window: u64, curr: u64, prev: u64) -> WindowState {
        WindowState { window, curr, prev }
    }

    #[test]
    fn fresh_state_admits_up_to_the_limit_in_a_one_second_window() {
        let mut s = WindowState::default();
        let now = T0 + 300;
        for i in 0..5 {
            let ev = evaluate(s, 5, SEC, now);
            assert!(ev.admits, "request {i}");
            s = s.at(now, SEC).plus_one();
            let after = evaluate(s, 5, SEC, now);
            assert_eq!(after.remaining, 4 - i);
        }
        let ev = evaluate(s, 5, SEC, now);
        assert!(!ev.admits);
        assert_eq!(ev.remaining, 0);
        // 5 in the current window, 300 ms in: next window at +700 ms, then
        // 5 × (1 − f) ≤ 4 needs f ≥ 0.2: +200 ms more.
        assert_eq!(ev.reset_ms, 900);
        assert_eq!(ceil_secs(ev.reset_ms), 1);
    }

    #[test]
    fn exactly_at_the_window_boundary_the_previous_window_weighs_fully() {
        let s = st(T0 / SEC - 1, 10, 3);
        let at = s.at(T0, SEC);
        assert_eq!(at, st(T0 / SEC, 0, 10));
        assert_eq!(estimate(s, SEC, T0), 10.0);
        let ev = evaluate(s, 10, SEC, T0);
        assert!(!ev.admits);
        assert_eq!(ev.remaining, 0);
        // Needs 10 × (1 − f) ≤ 9: f ≥ 0.1.
        assert_eq!(ev.reset_ms, 100);
        // One millisecond before the boundary it is still the old window.
        assert_eq!(s.at(T0 - 1, SEC), s);
        assert!((estimate(s, SEC, T0 - 1) - 10.003).abs() < 1e-9);
        // A full window later the previous count is gone.
        assert_eq!(estimate(s, SEC, T0 + SEC), 0.0);
        assert!(evaluate(s, 10, SEC, T0 + 999).admits);
    }

    #[test]
    fn previous_window_weight_fades_linearly() {
        let s = st(T0 / SEC, 0, 10);
        assert_eq!(estimate(s, SEC, T0 + 250), 7.5);
        assert_eq!(estimate(s, SEC, T0 + 500), 5.0);
        let ev = evaluate(s, 10, SEC, T0 + 250);
        assert!(ev.admits);
        assert_eq!(ev.remaining, 2); // floor(10 − 7.5)
        // remaining 3 once the estimate is ≤ 7: f ≥ 0.3.
        assert_eq!(ev.reset_ms, 50);
        let s = st(T0 / SEC, 4, 10);
        let ev = evaluate(s, 12, SEC, T0 + 500); // 5 + 4 = 9
        assert!(ev.admits);
        assert_eq!(ev.remaining, 3);
        let ev = evaluate(s, 9, SEC, T0 + 500);
        assert!(!ev.admits, "estimate 9 + 1 > 9");
        // Estimate ≤ 8 needs 10 × (1 − f) ≤ 4: f ≥ 0.6.
        assert_eq!(ev.reset_ms, 100);
    }

    #[test]
    fn a_refused_request_waits_for_the_next_window_when_curr_alone_is_full() {
        let s = st(T0 / SEC, 5, 0);
        let ev = evaluate(s, 5, SEC, T0);
        assert!(!ev.admits);
        // Rest of this window (1000) + until 5 × (1 − f) ≤ 4 (200).
        assert_eq!(ev.reset_ms, 1200);
        assert_eq!(ceil_secs(ev.reset_ms), 2);
        // And at that moment a request is admitted again.
        assert!(evaluate(s, 5, SEC, T0 + 1200).admits);
        assert!(!evaluate(s, 5, SEC, T0 + 1199).admits);
    }

    #[test]
    fn reset_with_room_left_is_when_remaining_next_grows() {
        let s = st(T0 / SEC, 3, 0);
        let ev = evaluate(s, 10, SEC, T0 + 100);
        assert_eq!(ev.remaining, 7);
        // Remaining 8 when the estimate ≤ 2: next window, 3 × (1 − f) ≤ 2.
        assert_eq!(ev.reset_ms, 900 + 334);
        assert_eq!(evaluate(s, 10, SEC, T0 + 100 + ev.reset_ms).remaining, 8);
        assert_eq!(
            evaluate(s, 10, SEC, T0 + 100 + ev.reset_ms - 1).remaining,
            7
        );
        // Nothing counted: until the window ends.
        let ev = evaluate(WindowState::default(), 10, SEC, T0 + 100);
        assert_eq!((ev.remaining, ev.reset_ms), (10, 900));
    }

    #[test]
    fn thirty_day_window() {
        let per = 30 * DAY;
        let w = T0 / per;
        assert_eq!(T0 % per, 0);
        let s = st(w, 0, 1000);
        assert_eq!(estimate(s, per, T0 + per / 2), 500.0);
        let ev = evaluate(s, 1000, per, T0 + per / 2);
        assert!(ev.admits);
        assert_eq!(ev.remaining, 500);
        let full = st(w, 1000, 0);
        let ev = evaluate(full, 1000, per, T0 + DAY);
        assert!(!ev.admits);
        // 29 days to the boundary, then 1/1000 of 30 days.
        assert_eq!(ev.reset_ms, 29 * DAY + per / 1000);
        assert_eq!(ceil_secs(ev.reset_ms), (29 * DAY + per / 1000) / 1000);
    }

    #[test]
    fn a_gap_of_several_windows_forgets_everything() {
        let s = st(T0 / SEC - 5, 7, 3);
        assert_eq!(s.at(T0 + 10, SEC), st(T0 / SEC, 0, 0));
        assert_eq!(estimate(s, SEC, T0 + 10), 0.0);
        let ev = evaluate(s, 1, SEC, T0 + 10);
        assert!(ev.admits);
        assert_eq!(ev.remaining, 1);
        // Two windows on: prev = 0 as well.
        let s = st(T0 / SEC - 2, 7, 3);
        assert_eq!(s.at(T0, SEC), st(T0 / SEC, 0, 0));
    }

    #[test]
    fn a_clock_behind_the_state_does_not_roll_it_back() {
        let s = st(T0 / SEC, 4, 2);
        assert_eq!(s.at(T0 - 5 * SEC, SEC), s);
        assert_eq!(elapsed_ms(s, SEC, T0 - 5 * SEC), 0);
        assert_eq!(estimate(s, SEC, T0 - 5 * SEC), 6.0);
    }

    #[test]
    fn merging_states_rolls_them_to_the_later_window() {
        let a = st(10, 3, 1);
        let b = st(11, 2, 0);
        assert_eq!(a.plus(b), st(11, 2, 3));
        assert_eq!(a.max_merge(b), st(11, 2, 3));
        assert_eq!(b.minus(a), st(11, 2, 0));
        assert_eq!(st(11, 5, 4).minus(st(11, 2, 9)), st(11, 3, 0));
        assert!(WindowState::default().is_empty());
    }

    #[test]
    fn threshold_fraction() {
        let s = st(T0 / SEC, 7, 0);
        let ev = evaluate(s, 10, SEC, T0);
        assert!(
            !above_fraction(&ev, 10, SEC, 0.8),
            "7 + 1 = 8 is not past 8"
        );
        let ev = evaluate(s.plus_one(), 10, SEC, T0);
        assert!(above_fraction(&ev, 10, SEC, 0.8));
    }
}
