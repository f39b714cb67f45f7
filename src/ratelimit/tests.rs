//! Local-mode decisions with an injected clock, the refusal memo, and the
//! fallback with an unreachable Redis.

use super::*;
use std::time::Duration;

const SEC: u64 = 1000;
/// A multiple of every window used here.
const T0: u64 = 2_592_000_000 * 700;

fn settings(mode: RateLimitMode, on_store_error: OnStoreError) -> RateLimitSettings {
    RateLimitSettings {
        mode,
        on_store_error,
        sync_interval: Duration::from_millis(50),
        exact_threshold: 0.8,
        timeout: Duration::from_millis(100),
    }
}

fn lim(scope: Scope, requests: u64, secs: u64) -> Limit {
    Limit {
        scope,
        requests,
        per: Duration::from_secs(secs),
    }
}

fn req<'a>(
    key_id: &'a str,
    workspace: &'a str,
    route: &'a str,
    limits: &'a [Limit],
) -> LimitRequest<'a> {
    LimitRequest {
        key_id,
        workspace,
        route,
        limits,
    }
}

async fn local() -> RateLimiter {
    match RateLimiter::new(settings(RateLimitMode::Local, OnStoreError::Local), None).await {
        Ok(l) => l,
        Err(e) => panic!("local limiter: {e}"),
    }
}

/// A local decision at `now_ms`.
fn at(l: &RateLimiter, r: &LimitRequest<'_>, now_ms: u64) -> Decision {
    match l
        .inner
        .decide_here(r, now_ms, now_ms, Counter::Local, false)
    {
        Step::Done(d) => d,
        Step::Exact(_) => panic!("local mode asked for Redis"),
    }
}

fn allowed(d: Decision) -> RateVerdict {
    match d {
        Decision::Allowed(v) => v,
        other => panic!("expected Allowed, got {other:?}"),
    }
}

fn refused(d: Decision) -> (RateVerdict, u64, Scope) {
    match d {
        Decision::Refused {
            verdict,
            retry_after_secs,
            scope,
        } => (verdict, retry_after_secs, scope),
        other => panic!("expected Refused, got {other:?}"),
    }
}

#[tokio::test]
async fn no_limits_means_unlimited() {
    let l = local().await;
    assert_eq!(
        l.check(&req("key_1", "ws", "r", &[])).await,
        Decision::Unlimited
    );
}

#[tokio::test]
async fn admits_exactly_the_limit_with_headers() {
    let l = local().await;
    let limits = [lim(Scope::Key, 5, 1)];
    let r = req("key_1", "ws", "r", &limits);
    let now = T0 + 300;
    for i in 0..5u64 {
        let v = allowed(at(&l, &r, now));
        assert_eq!((v.limit, v.remaining), (5, 4 - i));
        assert!(v.reset_secs >= 1);
    }
    let (v, retry, scope) = refused(at(&l, &r, now));
    assert_eq!((v.limit, v.remaining, scope), (5, 0, Scope::Key));
    // 700 ms to the boundary, then 200 ms until 5 × (1 − f) ≤ 4.
    assert_eq!((v.reset_secs, retry), (1, 1));
    assert!(matches!(at(&l, &r, now + 899), Decision::Refused { .. }));
    let v = allowed(at(&l, &r, now + 900));
    assert_eq!(v.remaining, 0);
    // The real clock path admits too (another key: fresh counters).
    let r2 = req("key_2", "ws", "r", &limits);
    assert!(matches!(l.check(&r2).await, Decision::Allowed(_)));
}

#[tokio::test]
async fn a_refused_request_consumes_nothing_across_two_limits() {
    let l = local().await;
    // key: 3 per minute; route: 2 per minute on each route.
    let limits = [lim(Scope::Key, 3, 60), lim(Scope::Route, 2, 60)];
    let a = req("key_1", "ws", "route.a", &limits);
    let b = req("key_1", "ws", "route.b", &limits);
    let now = T0 + 10 * SEC;
    allowed(at(&l, &a, now));
    let v = allowed(at(&l, &a, now));
    // Tightest: the route limit (0 left) rather than the key limit (1 left).
    assert_eq!((v.limit, v.remaining), (2, 0));
    // Refused by the route limit, many times: the key limit must not count them.
    for _ in 0..10 {
        let (v, _, scope) = refused(at(&l, &a, now));
        assert_eq!((scope, v.limit), (Scope::Route, 2));
    }
    // So the key still has exactly one request left, usable on another route.
    let v = allowed(at(&l, &b, now));
    assert_eq!((v.limit, v.remaining), (3, 0));
    let (v, retry, scope) = refused(at(&l, &b, now));
    assert_eq!((scope, v.limit, v.remaining), (Scope::Key, 3, 0));
    // 50 s to the boundary, then a third of a minute: 70 s.
    assert_eq!(retry, 70);
    assert_eq!(v.reset_secs, 70);
}

#[tokio::test]
async fn retry_after_is_the_latest_among_refusing_limits() {
    let l = local().await;
    let limits = [lim(Scope::Key, 1, 1), lim(Scope::Key, 1, 3600)];
    let r = req("key_1", "ws", "r", &limits);
    allowed(at(&l, &r, T0));
    let (v, retry, _) = refused(at(&l, &r, T0));
    assert_eq!(v.limit, 1);
    assert_eq!(retry, 7200, "the hour limit frees a request two windows on");
}

#[tokio::test]
async fn workspace_limits_are_shared_by_the_workspace_keys() {
    let l = local().await;
    let limits = [lim(Scope::Key, 10, 60), lim(Scope::Workspace, 3, 60)];
    let now = T0 + 5 * SEC;
    allowed(at(&l, &req("key_1", "acme", "r", &limits), now));
    allowed(at(&l, &req("key_2", "acme", "r", &limits), now));
    allowed(at(&l, &req("key_3", "acme", "r", &limits), now));
    let (_, _, scope) = refused(at(&l, &req("key_4", "acme", "r", &limits), now));
    assert_eq!(scope, Scope::Workspace);
    // Another workspace is untouched.
    allowed(at(&l, &req("key_1", "other", "r", &limits), now));
}

#[tokio::test]
async fn limit_identity_includes_requests_and_per_and_duplicates_count_once() {
    let l = local().await;
    // Same subject, two different limits: separate counters.
    let two = [lim(Scope::Key, 2, 60), lim(Scope::Key, 2, 3600)];
    let now = T0 + SEC;
    let v = allowed(at(&l, &req("k", "ws", "r", &two), now));
    assert_eq!(v.remaining, 1);
    // The same limit listed twice (plan and route) counts once.
    let dup = [lim(Scope::Key, 4, 60), lim(Scope::Key, 4, 60)];
    let v = allowed(at(&l, &req("k2", "ws", "r", &dup), now));
    assert_eq!(v.remaining, 3);
}

#[tokio::test]
async fn sliding_window_carries_the_previous_window() {
    let l = local().await;
    let limits = [lim(Scope::Key, 10, 1)];
    let r = req("key_1", "ws", "r", &limits);
    for _ in 0..10 {
        allowed(at(&l, &r, T0 + 900));
    }
    // 25% into the next window the previous 10 weigh 7.5: two more fit.
    allowed(at(&l, &r, T0 + SEC + 250));
    allowed(at(&l, &r, T0 + SEC + 250));
    refused(at(&l, &r, T0 + SEC + 250));
    // Two windows on, everything is forgotten.
    let v = allowed(at(&l, &r, T0 + 3 * SEC));
    assert_eq!(v.remaining, 9);
}

#[tokio::test]
async fn refusal_memo_answers_without_redis_until_the_window_frees_a_request() {
    let l = local().await;
    let limits = [lim(Scope::Key, 5, 1), lim(Scope::Workspace, 100, 60)];
    let r = req("key_1", "ws", "r", &limits);
    let ids = [LimitId::of(&limits[0]), LimitId::of(&limits[1])];
    // What the check script would answer for a refused request: the key
    // limit full (5 in this window, 300 ms in), the workspace limit not.
    let redis_now = T0 + 300;
    let x = Exact {
        ids: ids.to_vec(),
        states: vec![
            WindowState {
                window: redis_now / SEC,
                curr: 5,
                prev: 0,
            },
            WindowState {
                window: redis_now / 60_000,
                curr: 7,
                prev: 0,
            },
        ],
        nows: vec![redis_now; 2],
        known: vec![true; 2],
        candidate: vec![true; 2],
        admitted: false,
    };
    let local_ms = 1_000_000;
    let (v, retry, scope) = refused(l.inner.finish_exact(&r, x, false, local_ms));
    assert_eq!((scope, v.limit, retry), (Scope::Key, 5, 1));
    // Remembered for 900 ms of the local clock.
    let memo = l.inner.remembered_refusal(&r, local_ms + 10).map(refused);
    assert_eq!(memo.map(|m| (m.0.limit, m.2)), Some((5, Scope::Key)));
    assert!(l.inner.remembered_refusal(&r, local_ms + 899).is_some());
    assert!(l.inner.remembered_refusal(&r, local_ms + 900).is_none());
    // Another key is not affected.
    assert!(
        l.inner
            .remembered_refusal(&req("key_2", "ws", "r", &limits), local_ms + 10)
            .is_none()
    );
    assert_eq!(l.stats().memo_refusals, 2);
}

#[tokio::test]
async fn a_cross_slot_refusal_names_only_the_refusing_slot() {
    let l = local().await;
    let limits = [lim(Scope::Key, 5, 1), lim(Scope::Workspace, 2, 60)];
    let r = req("key_1", "ws", "r", &limits);
    let now = T0 + 300;
    // Key slot admitted and counted its 5th (then refunded: curr back to 4),
    // workspace refused.
    let x = Exact {
        ids: vec![LimitId::of(&limits[0]), LimitId::of(&limits[1])],
        states: vec![
            WindowState {
                window: now / SEC,
                curr: 4,
                prev: 0,
            },
            WindowState {
                window: now / 60_000,
                curr: 2,
                prev: 0,
            },
        ],
        nows: vec![now; 2],
        known: vec![true; 2],
        candidate: vec![false, true],
        admitted: false,
    };
    let (v, _, scope) = refused(l.inner.finish_exact(&r, x, false, 5));
    assert_eq!((scope, v.limit), (Scope::Workspace, 2));
}

#[tokio::test]
async fn unreachable_redis_uses_the_fallback_and_probes_at_most_every_second() {
    // A loopback port with nothing listening: connections are refused at once.
    let port = {
        let l = match std::net::TcpListener::bind("127.0.0.1:0") {
            Ok(l) => l,
            Err(e) => panic!("bind: {e}"),
        };
        match l.local_addr() {
            Ok(a) => a.port(),
            Err(e) => panic!("local_addr: {e}"),
        }
    };
    let url = format!("redis://127.0.0.1:{port}/");
    let limits = [lim(Scope::Key, 2, 60)];
    let r = req("key_1", "ws", "r", &limits);

    let deny = match RateLimiter::new(
        settings(RateLimitMode::Redis, OnStoreError::Deny),
        Some(&url),
    )
    .await
    {
        Ok(l) => l,
        Err(e) => panic!("limiter: {e}"),
    };
    assert!(deny.fallback_active(), "the first ping failed");
    let calls = deny.stats().redis_calls;
    for _ in 0..50 {
        let (v, retry, _) = refused(deny.check(&r).await);
        assert_eq!((v.remaining, retry), (0, 1));
    }
    assert_eq!(
        deny.stats().redis_calls,
        calls,
        "no Redis call within a second of the failure"
    );
    assert_eq!(deny.stats().fallback_entered, 1);

    let allow = match RateLimiter::new(
        settings(RateLimitMode::Redis, OnStoreError::Allow),
        Some(&url),
    )
    .await
    {
        Ok(l) => l,
        Err(e) => panic!("limiter: {e}"),
    };
    for _ in 0..5 {
        assert_eq!(allow.check(&r).await, Decision::Unlimited);
    }

    let local = match RateLimiter::new(
        settings(RateLimitMode::Redis, OnStoreError::Local),
        Some(&url),
    )
    .await
    {
        Ok(l) => l,
        Err(e) => panic!("limiter: {e}"),
    };
    allowed(local.check(&r).await);
    allowed(local.check(&r).await);
    refused(local.check(&r).await);
}

#[tokio::test]
async fn bad_configuration_is_an_error() {
    let s = settings(RateLimitMode::Redis, OnStoreError::Local);
    assert!(matches!(
        RateLimiter::new(s, None).await,
        Err(RateLimitError::MissingRedisUrl("redis"))
    ));
    assert!(matches!(
        RateLimiter::new(s, Some("sqlite://x.db")).await,
        Err(RateLimitError::InvalidRedisUrl(_))
    ));
}

#[test]
fn hybrid_bound() {
    assert_eq!(hybrid_overadmission_bound(100, 0.8, 2), 160);
    assert_eq!(hybrid_overadmission_bound(5, 0.5, 3), 9);
    assert_eq!(hybrid_overadmission_bound(5, 0.0, 3), 0);
}

#[test]
fn limiter_is_send_and_sync() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<RateLimiter>();
    fn assert_send<T: Send>(_: &T) {}
    let s = settings(RateLimitMode::Local, OnStoreError::Local);
    let fut = async move {
        let l = RateLimiter::new(s, None).await;
        if let Ok(l) = l {
            let limits = [lim(Scope::Key, 1, 1)];
            let _ = l.check(&req("k", "w", "r", &limits)).await;
        }
    };
    assert_send(&fut);
}
