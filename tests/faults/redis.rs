//! Redis killed, restarted, out of memory, its pub/sub connection cut.

use crate::common::faults::*;
use crate::common::redis::RedisServer;
use crate::common::*;
use futures_util::StreamExt;
use portcullis::keys::Environment;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Starts a redis-server (panics with install instructions if missing).
fn start_redis() -> RedisServer {
    tokio::task::block_in_place(RedisServer::start)
}

/// `url = "…"` and `timeout = "…"` for `[store]`.
fn redis_store(redis: &RedisServer, timeout: &str) -> String {
    format!("url = \"{}\"\ntimeout = \"{timeout}\"", redis.url())
}

/// A well-formed live secret (valid prefix and checksum) that no store holds.
fn forged_secret(gw: &TestGateway) -> String {
    gw.app()
        .snapshot()
        .config
        .key_format
        .generate("secret", Environment::Live)
        .expect("a secret format")
        .0
}

/// The secret with its last character changed: the checksum no longer matches.
fn bad_checksum(secret: &str) -> String {
    let mut s = secret.to_string();
    let last = s.pop().unwrap_or('A');
    s.push(if last == 'A' { 'B' } else { 'A' });
    s
}

/// The error code of a JSON error answer ("" for anything else).
fn code(r: &TestResponse) -> String {
    serde_json::from_slice::<serde_json::Value>(&r.body)
        .ok()
        .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
        .unwrap_or_default()
}

/// A redis-server reply as an integer (`:N`).
fn redis_int(redis: &RedisServer, args: &[&str]) -> i64 {
    let reply = tokio::task::block_in_place(|| redis.command(args))
        .unwrap_or_else(|| panic!("redis answered {args:?}"));
    reply
        .trim()
        .strip_prefix(':')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{args:?}: not an integer reply: {reply}"))
}

/// Subscribers of the key-change channel.
fn key_subscribers(redis: &RedisServer) -> i64 {
    let reply = tokio::task::block_in_place(|| {
        redis.command(&["PUBSUB", "NUMSUB", portcullis::keys::redis::CHANNEL])
    })
    .expect("PUBSUB NUMSUB");
    // `*2 $15 portcullis:keys :N`
    reply
        .lines()
        .last()
        .and_then(|l| l.strip_prefix(':'))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("PUBSUB NUMSUB reply: {reply}"))
}

/// What the steady load sends: one credential per kind of request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cred {
    /// A key used before the fault (cached), then one created after the restart.
    Valid,
    /// A real key never used before the fault (not cached).
    Uncached,
    /// Well-formed, unknown to the store.
    Unknown,
    /// Checksum broken.
    BadChecksum,
    /// No credential at all.
    Missing,
}

/// One answer of the steady load.
#[derive(Debug)]
struct Sent {
    /// The request's number, in its path (`/v1/sms/{cred:?}-{n}`).
    n: u64,
    cred: Cred,
    /// Sent.
    at: Instant,
    /// Answered.
    done: Instant,
    status: u16,
    code: String,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_forwards_nothing_unauthenticated_keeps_the_stale_bound_and_recovers() {
    const TTL: Duration = Duration::from_millis(200);
    const STALE: Duration = Duration::from_secs(1);
    let mut redis = start_redis();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&keyed_config(
        "",
        &redis_store(&redis, "250ms"),
        "[cache]\nttl = \"200ms\"\nstale_if_error = \"1s\"\nnegative_ttl = \"100ms\"",
        &echo.url(),
        "",
    ))
    .await;
    let admin = Admin::new(gw.admin_addr);
    let (cached_id, cached) = admin.create_key("ws_kill", &["sms.read"]).await;
    let (uncached_id, uncached) = admin.create_key("ws_kill", &["sms.read"]).await;
    let creds = Arc::new(Mutex::new(vec![
        (Cred::Valid, bearer(&cached)),
        (Cred::Unknown, bearer(&forged_secret(&gw))),
        (Cred::BadChecksum, bearer(&bad_checksum(&cached))),
        (Cred::Missing, String::new()),
    ]));

    // Steady load: one client per kind of credential, each in a loop, so
    // that a slow answer of one kind leaves the others' pace alone.
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(Mutex::new(Vec::<Sent>::new()));
    let numbers = Arc::new(AtomicU64::new(0));
    let mut load = Vec::new();
    for cred in [
        Cred::Valid,
        Cred::Uncached,
        Cred::Unknown,
        Cred::BadChecksum,
        Cred::Missing,
    ] {
        let (stop, sent, creds, numbers) =
            (stop.clone(), sent.clone(), creds.clone(), numbers.clone());
        let base = gw.url("/v1/sms/");
        load.push(tokio::spawn(async move {
            let client = TestClient::h1(None);
            while !stop.load(Ordering::SeqCst) {
                // Pacing, so the load leaves the machine some room.
                tokio::time::sleep(Duration::from_millis(10)).await;
                let auth = creds
                    .lock()
                    .expect("creds")
                    .iter()
                    .find(|c| c.0 == cred)
                    .map(|c| c.1.clone());
                let Some(auth) = auth else { continue };
                let n = numbers.fetch_add(1, Ordering::SeqCst);
                let url = format!("{base}{cred:?}-{n}");
                let headers: Vec<(&str, &str)> = if auth.is_empty() {
                    vec![]
                } else {
                    vec![("authorization", auth.as_str())]
                };
                let at = Instant::now();
                let r = client.get_with(&url, &headers).await;
                sent.lock().expect("sent").push(Sent {
                    n,
                    cred,
                    at,
                    done: Instant::now(),
                    status: r.status.as_u16(),
                    code: code(&r),
                });
            }
        }));
    }
    let valid_answers = |status: u16, after: Instant| {
        sent.lock()
            .expect("sent")
            .iter()
            .filter(|s| s.cred == Cred::Valid && s.at >= after && s.status == status)
            .count()
    };
    let t0 = Instant::now();
    eventually(
        "the cached key to be served",
        Duration::from_secs(10),
        || async { valid_answers(200, t0) >= 3 },
    )
    .await;

    // Kill: a cached key works for ttl + stale_if_error after its last
    // lookup, then is refused; everything else is refused all along.
    let before_kill = Instant::now();
    tokio::task::block_in_place(|| redis.kill9());
    let killed = Instant::now();
    // The last lookup of the cached key finished before the kill: past this
    // (plus scheduling slack) it must be refused.
    let refused_from = killed + TTL + STALE + Duration::from_millis(150);
    // Only now: used before, it would be cached.
    creds
        .lock()
        .expect("creds")
        .push((Cred::Uncached, bearer(&uncached)));
    eventually(
        "the cached key to be refused past its stale bound",
        Duration::from_secs(10),
        || async { valid_answers(503, refused_from) >= 3 },
    )
    .await;

    // Restart: without restarting the gateway, a key created now works.
    let restarting = Instant::now();
    tokio::task::block_in_place(|| redis.restart());
    let mut created = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while created.is_none() {
        let r = admin
            .create(serde_json::json!({"workspace": "ws_kill", "permissions": ["sms.read"]}))
            .await;
        match r.status.as_u16() {
            201 => {
                let v = r.json();
                created = Some((
                    v["id"].as_str().expect("id").to_string(),
                    v["secret"].as_str().expect("secret").to_string(),
                ));
            }
            503 => assert_eq!(code(&r), "STORE_UNAVAILABLE", "{}", r.text()),
            s => panic!("creating a key after the restart: {s} {}", r.text()),
        }
        assert!(
            Instant::now() < deadline,
            "no key could be created within 10 s of the restart"
        );
        if created.is_none() {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    let (new_id, new_secret) = created.expect("created");
    creds.lock().expect("creds")[0] = (Cred::Valid, bearer(&new_secret));
    let recovered = Instant::now();
    eventually(
        "the key created after the restart to authenticate",
        Duration::from_secs(10),
        || async { valid_answers(200, recovered) >= 3 },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    for task in load {
        task.await.expect("a load task");
    }

    let sent = std::mem::take(&mut *sent.lock().expect("sent"));
    let outage: Vec<&Sent> = sent
        .iter()
        .filter(|s| s.at >= killed && s.done < restarting)
        .collect();
    // Under load, the last lookup of the cached key came at most a TTL and
    // a pace before the kill: it is served for STALE after the kill, less that.
    let served_until = before_kill + STALE - Duration::from_millis(350);
    let (mut early, mut late) = (0, 0);
    for s in &outage {
        match s.cred {
            Cred::Valid if s.at < served_until => {
                early += 1;
                assert_eq!(
                    s.status,
                    200,
                    "cached key {:?} after the kill, within its stale bound: {} {}",
                    s.at - killed,
                    s.status,
                    s.code
                );
            }
            Cred::Valid if s.at >= refused_from => {
                late += 1;
                assert_eq!(
                    (s.status, s.code.as_str()),
                    (503, "AUTH_UNAVAILABLE"),
                    "cached key {:?} after the kill, past ttl + stale_if_error",
                    s.at - killed
                );
            }
            Cred::Valid => assert!(s.status == 200 || s.status == 503, "{s:?}"),
            Cred::Uncached => assert_eq!(
                (s.status, s.code.as_str()),
                (503, "AUTH_UNAVAILABLE"),
                "an uncached key while the store is down"
            ),
            Cred::Unknown => assert!(
                (s.status, s.code.as_str()) == (503, "AUTH_UNAVAILABLE")
                    || (s.status, s.code.as_str()) == (401, "INVALID_API_KEY"),
                "an unknown key while the store is down: {s:?}"
            ),
            Cred::BadChecksum => assert_eq!(
                (s.status, s.code.as_str()),
                (401, "INVALID_API_KEY"),
                "a forged checksum needs no store"
            ),
            Cred::Missing => assert_eq!((s.status, s.code.as_str()), (401, "MISSING_API_KEY")),
        }
    }
    println!(
        "cached key during the outage: {early} answers within the stale bound, {late} past it"
    );
    assert!(
        early >= 3 && late >= 3,
        "too few requests on each side of the stale bound ({early} before, {late} after)"
    );
    assert!(
        outage.iter().any(|s| s.cred == Cred::Uncached),
        "the uncached key was tried during the outage"
    );

    // Nothing reached the upstream without a valid identity, in any phase;
    // the key first tried during the outage only once Redis was back.
    let forwarded = echo.requests();
    for r in &forwarded {
        let id = r.header("x-key-id").unwrap_or("");
        let (cred, n) = r
            .path_and_query
            .strip_prefix("/v1/sms/")
            .and_then(|p| p.split_once('-'))
            .unwrap_or_else(|| panic!("unexpected path forwarded: {}", r.path_and_query));
        let n: u64 = n.parse().expect("request number");
        let s = sent
            .iter()
            .find(|s| s.n == n)
            .expect("every forwarded request was sent");
        let valid = match cred {
            "Valid" => id == cached_id || id == new_id,
            "Uncached" => id == uncached_id && s.at >= restarting,
            _ => false,
        };
        assert!(
            valid,
            "forwarded without a valid identity: {} (x-key-id {id:?}, sent {:?} after the kill)",
            r.path_and_query,
            s.at.saturating_duration_since(killed)
        );
        assert!(r.header("authorization").is_none(), "credential forwarded");
    }
    let ok = sent.iter().filter(|s| s.status == 200).count();
    assert_eq!(forwarded.len(), ok, "every 200, and only those, forwarded");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_stopped_answers_every_request_within_the_store_timeout_with_flat_memory_and_recovers()
 {
    const STORE_TIMEOUT: Duration = Duration::from_millis(300);
    // Generous for a loaded 2-core machine; the point is "bounded", not "fast".
    const MARGIN: Duration = Duration::from_secs(2);
    let redis = start_redis();
    let echo = EchoUpstream::start().await;
    let mut gw = tokio::task::block_in_place(|| {
        spawn_gateway_process(&keyed_config(
            "",
            &redis_store(&redis, "300ms"),
            "[cache]\nttl = \"100ms\"\nstale_if_error = \"1m\"",
            &echo.url(),
            "",
        ))
    });
    let pid = gw.child.id();
    let admin = Admin::new(gw.admin_addr);
    let (_, cached) = admin.create_key("ws_stop", &["sms.read"]).await;
    let mut uncached = Vec::new();
    for _ in 0..20 {
        uncached.push(admin.create_key("ws_stop", &["sms.read"]).await.1);
    }
    let (_, later) = admin.create_key("ws_stop", &["sms.read"]).await;
    let client = TestClient::h1(None);
    let base = gw.url("/v1/sms/");
    let cached_auth = bearer(&cached);
    let uncached_auth: Vec<String> = uncached.iter().map(|s| bearer(s)).collect();

    // `n` requests, 40 at a time: the cached key, and in turn with it (when
    // `mix`) the uncached ones. Checks each status and that each answer
    // came within the store timeout; returns the slowest.
    let round = |n: usize, mix: bool| {
        let (client, base, cached_auth, uncached_auth) =
            (&client, &base, &cached_auth, &uncached_auth);
        async move {
            let answers: Vec<(bool, u16, String, Duration)> = futures_util::stream::iter(0..n)
                .map(|i| async move {
                    let is_cached = !mix || i % 2 == 0;
                    let auth = if is_cached {
                        cached_auth
                    } else {
                        &uncached_auth[i / 2 % uncached_auth.len()]
                    };
                    let t = Instant::now();
                    let r = client
                        .get_with(&format!("{base}m{i}"), &[("authorization", auth)])
                        .await;
                    (is_cached, r.status.as_u16(), code(&r), t.elapsed())
                })
                .buffer_unordered(40)
                .collect()
                .await;
            for (is_cached, status, code, took) in &answers {
                if *is_cached {
                    assert_eq!(*status, 200, "the cached key: {code}");
                } else {
                    assert_eq!(
                        (*status, code.as_str()),
                        (503, "AUTH_UNAVAILABLE"),
                        "an uncached key while Redis is stopped"
                    );
                }
                assert!(
                    *took <= STORE_TIMEOUT + MARGIN,
                    "answered after {took:?}: the store timeout is {STORE_TIMEOUT:?}"
                );
            }
            answers.iter().map(|a| a.3).max().unwrap_or_default()
        }
    };
    // Warm up (connections, allocator) with the cached key only: the
    // others must stay uncached.
    round(200, false).await;

    let redis_pid = tokio::task::block_in_place(|| redis_pid(&redis));
    signal_pid(redis_pid, "STOP");
    let slowest_warm = round(200, true).await;
    let rss_before = rss_kib(pid);
    let slowest = round(400, true).await;
    let rss_after = rss_kib(pid);
    signal_pid(redis_pid, "CONT");
    println!(
        "stalled store: slowest answers {slowest_warm:?} / {slowest:?}; gateway RSS {rss_before} KiB -> {rss_after} KiB"
    );
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "gateway memory grew from {rss_before} KiB to {rss_after} KiB over 400 stalled requests"
    );

    // After SIGCONT, uncached keys authenticate again.
    let later_auth = bearer(&later);
    eventually(
        "an uncached key to authenticate after SIGCONT",
        Duration::from_secs(10),
        || async {
            client
                .get_with(&format!("{base}after"), &[("authorization", &later_auth)])
                .await
                .status
                == 200
        },
    )
    .await;
    let r = client
        .get_with(
            &format!("{base}after"),
            &[("authorization", &uncached_auth[0])],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "{}", gw.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_out_of_memory_refuses_key_creation_with_503_and_still_enforces_limits() {
    let redis = start_redis();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&keyed_config(
        "",
        &redis_store(&redis, "500ms"),
        "[cache]\nttl = \"200ms\"\n\n[rate_limit]\nmode = \"redis\"\non_store_error = \"local\"\n\n\
         [plans.default]\nlimits = [{ scope = \"key\", requests = 5, per = \"1m\" }]",
        &echo.url(),
        "",
    ))
    .await;
    let admin = Admin::new(gw.admin_addr);
    let (_, cached) = admin.create_key("ws_oom", &["sms.read"]).await;
    // Never used before the rotation below: every check of it asks the store.
    let (other_id, other) = admin.create_key("ws_oom", &["sms.read"]).await;
    let auth = bearer(&cached);
    let client = TestClient::h1(None);
    let r = client
        .get_with(&gw.url("/v1/sms/warm"), &[("authorization", &auth)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.header("x-ratelimit-limit"), Some("5"));

    // Out of memory: every write refused, reads still answered.
    let set = |args: &[&str]| {
        let reply = tokio::task::block_in_place(|| redis.command(args)).expect("CONFIG SET");
        assert!(reply.starts_with("+OK"), "{args:?}: {reply}");
    };
    set(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    set(&["CONFIG", "SET", "maxmemory", "1"]);
    let probe = tokio::task::block_in_place(|| redis.command(&["SET", "oom-probe", "x"]))
        .expect("SET answered");
    assert!(probe.starts_with("-OOM"), "Redis refuses writes: {probe}");

    let keys_before = redis_int(&redis, &["DBSIZE"]);
    let r = admin
        .create(serde_json::json!({"workspace": "ws_oom_new", "permissions": ["sms.read"]}))
        .await;
    r.assert_error(503, "STORE_UNAVAILABLE");
    assert_eq!(
        redis_int(&redis, &["DBSIZE"]),
        keys_before,
        "nothing half-written by the refused create"
    );
    let list = admin
        .call("GET", "/admin/v1/keys?workspace=ws_oom_new", None)
        .await;
    assert_eq!(list.status, 200, "{}", list.text());
    assert_eq!(list.json()["data"], serde_json::json!([]), "no key listed");

    // A rotation either happens whole (new secret works, old refused) or
    // not at all (503, old secret works): never a key with neither.
    let r = admin
        .call(
            "POST",
            &format!("/admin/v1/keys/{other_id}/rotate"),
            Some(serde_json::json!({"grace": "0s"})),
        )
        .await;
    let status_with = |secret: String| {
        let (client, url) = (&client, gw.url("/v1/sms/rotated"));
        async move {
            client
                .get_with(&url, &[("authorization", &bearer(&secret))])
                .await
                .status
        }
    };
    match r.status.as_u16() {
        200 => {
            let new = r.json()["secret"].as_str().expect("new secret").to_string();
            assert_eq!(status_with(new).await, 200, "the new secret works");
            assert_eq!(
                status_with(other.clone()).await,
                401,
                "the old one is refused"
            );
        }
        503 => {
            r.assert_error(503, "STORE_UNAVAILABLE");
            assert_eq!(
                status_with(other.clone()).await,
                200,
                "the old secret still works"
            );
        }
        s => panic!("rotation under OOM: {s} {}", r.text()),
    }
    println!("rotation under OOM answered {}", r.status);

    // The cached key still authenticates, and its plan limit still yields
    // 429s (the limiter's local fallback): at most the limit gets through.
    let mut statuses = Vec::new();
    for i in 0..12 {
        let r = client
            .get_with(
                &gw.url(&format!("/v1/sms/oom{i}")),
                &[("authorization", &auth)],
            )
            .await;
        match r.status.as_u16() {
            200 => {}
            429 => r.assert_error(429, "RATE_LIMITED"),
            s => panic!("request {i} under OOM: {s} {}", r.text()),
        }
        statuses.push(r.status.as_u16());
    }
    assert!(
        gw.app().limiter.fallback_active(),
        "the limiter runs on its on_store_error fallback"
    );
    let ok = statuses.iter().filter(|&&s| s == 200).count();
    assert!(
        (1..=5).contains(&ok),
        "the cached key authenticates and at most the limit (5) is admitted: {statuses:?}"
    );
    assert!(
        statuses.contains(&429),
        "the limit is enforced: {statuses:?}"
    );
    assert!(
        statuses.ends_with(&[429, 429, 429]),
        "once limited, it stays limited: {statuses:?}"
    );

    // Memory back: writes work again.
    set(&["CONFIG", "SET", "maxmemory", "0"]);
    let r = admin
        .create(serde_json::json!({"workspace": "ws_oom_new", "permissions": ["sms.read"]}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pubsub_cut_during_a_revocation_the_other_instance_refuses_the_key_within_a_second() {
    let redis = start_redis();
    let echo = EchoUpstream::start().await;
    // A long TTL: only the key-change subscription can drop a cached key.
    let config = keyed_config(
        "",
        &redis_store(&redis, "500ms"),
        "[cache]\nttl = \"60s\"",
        &echo.url(),
        "",
    );
    let a = start_gateway(&config).await;
    let b = start_gateway(&config).await;
    eventually(
        "both instances to subscribe to key changes",
        Duration::from_secs(10),
        || async { key_subscribers(&redis) == 2 },
    )
    .await;
    let admin_a = Admin::new(a.admin_addr);
    let client = TestClient::h1(None);
    let (id, secret) = admin_a.create_key("ws_pubsub", &["sms.read"]).await;
    let auth = bearer(&secret);
    for i in 0..2 {
        let r = client
            .get_with(
                &b.url(&format!("/v1/sms/b{i}")),
                &[("authorization", &auth)],
            )
            .await;
        assert_eq!(r.status, 200, "cached on B: {}", r.text());
    }

    // Cut every pub/sub connection, and revoke through A right then: B
    // misses the message, resubscribes (100 ms backoff) and flushes.
    let killed = redis_int(&redis, &["CLIENT", "KILL", "TYPE", "pubsub"]);
    assert!(killed >= 2, "both subscriptions cut (killed {killed})");
    let r = admin_a.revoke(&id).await;
    assert_eq!(r.status, 204, "{}", r.text());
    let revoked = Instant::now();
    let missed = key_subscribers(&redis) < 2;
    loop {
        let r = client
            .get_with(&b.url("/v1/sms/after"), &[("authorization", &auth)])
            .await;
        if r.status == 401 {
            assert_eq!(code(&r), "INVALID_API_KEY");
            break;
        }
        assert_eq!(r.status, 200, "{}", r.text());
        assert!(
            revoked.elapsed() <= Duration::from_secs(1),
            "B still accepts the revoked key {:?} after the revocation",
            revoked.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    println!(
        "B refused the revoked key {:?} after the revocation (publish missed by B: {missed})",
        revoked.elapsed()
    );
    eventually(
        "both instances to resubscribe",
        Duration::from_secs(5),
        || async { key_subscribers(&redis) == 2 },
    )
    .await;
    a.shutdown().await;
    b.shutdown().await;
}
