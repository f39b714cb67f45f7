//! The rate limiter against real Redis servers started here, each on a free
//! loopback port in its own temporary directory (killed on drop). These
//! tests need `redis-server` (and `redis-cli` for the cluster test) on the
//! PATH; they fail, never skip, without them.

use portcullis::config::{Limit, OnStoreError, RateLimitMode, RateLimitSettings, Scope};
use portcullis::ratelimit::{Decision, LimitRequest, RateLimiter, hybrid_overadmission_bound};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------- harness

fn port_is_free(p: u16) -> bool {
    TcpListener::bind(("127.0.0.1", p)).is_ok()
}

/// A free loopback port (and, for cluster nodes, its bus port + 10000 too).
fn free_port(cluster: bool) -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let p = l.local_addr().expect("local_addr").port();
        drop(l);
        if !cluster || (p < 55_000 && port_is_free(p + 10_000)) {
            return p;
        }
    }
    panic!("no free loopback port found");
}

fn ping(port: u16) -> bool {
    let Ok(mut s) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
    if s.write_all(b"PING\r\n").is_err() {
        return false;
    }
    let mut buf = [0u8; 64];
    matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
}

/// One `redis-server` process.
struct RedisServer {
    port: u16,
    dir: tempfile::TempDir,
    cluster: bool,
    child: Option<Child>,
}

impl RedisServer {
    fn start() -> Self {
        Self::start_with(false)
    }

    fn start_with(cluster: bool) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut s = RedisServer {
            port: free_port(cluster),
            dir,
            cluster,
            child: None,
        };
        s.spawn();
        s
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &port,
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(self.dir.path())
        .args(["--logfile", "redis.log"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        if self.cluster {
            cmd.args(["--cluster-enabled", "yes", "--cluster-node-timeout", "2000"])
                .args(["--cluster-config-file", &format!("nodes-{port}.conf")]);
        }
        let child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => panic!(
                "cannot start redis-server ({e}): these tests need a real Redis; \
                 install it (apt-get install -y redis-server) so that `redis-server` is on the PATH"
            ),
        };
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !ping(self.port) {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(|c| c.try_wait()) {
                let log =
                    std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
                panic!(
                    "redis-server on port {} exited ({status}):\n{log}",
                    self.port
                );
            }
            assert!(
                Instant::now() < deadline,
                "redis-server on port {} did not answer PING",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while ping(self.port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three cluster masters, slots assigned, `cluster_state:ok` everywhere.
struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    fn start() -> Self {
        let nodes: Vec<RedisServer> = (0..3).map(|_| RedisServer::start_with(true)).collect();
        let mut cmd = Command::new("redis-cli");
        cmd.arg("--cluster").arg("create");
        for n in &nodes {
            cmd.arg(format!("127.0.0.1:{}", n.port));
        }
        cmd.args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null());
        let out = match cmd.output() {
            Ok(o) => o,
            Err(e) => panic!(
                "cannot run redis-cli ({e}): the cluster test needs redis-cli (package redis-tools)"
            ),
        };
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        for n in &nodes {
            loop {
                let info = Command::new("redis-cli")
                    .args(["-p", &n.port.to_string(), "cluster", "info"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                if info.contains("cluster_state:ok") {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "cluster node {} never reached cluster_state:ok:\n{info}",
                    n.port
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        RedisCluster { nodes }
    }

    fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }

    fn node_urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }
}

// ---------------------------------------------------------------- helpers

fn settings(
    mode: RateLimitMode,
    on_store_error: OnStoreError,
    timeout: Duration,
) -> RateLimitSettings {
    RateLimitSettings {
        mode,
        on_store_error,
        sync_interval: Duration::from_millis(50),
        exact_threshold: 0.8,
        timeout,
    }
}

async fn limiter(s: RateLimitSettings, url: &str) -> Arc<RateLimiter> {
    match RateLimiter::new(s, Some(url)).await {
        Ok(l) => Arc::new(l),
        Err(e) => panic!("RateLimiter::new: {e}"),
    }
}

fn lim(scope: Scope, requests: u64, secs: u64) -> Limit {
    Limit {
        scope,
        requests,
        per: Duration::from_secs(secs),
    }
}

fn req<'a>(key_id: &'a str, workspace: &'a str, limits: &'a [Limit]) -> LimitRequest<'a> {
    LimitRequest {
        key_id,
        workspace,
        route: "sms.send",
        limits,
    }
}

/// Runs `n` checks concurrently, alternating between `instances`.
async fn concurrent(
    instances: &[Arc<RateLimiter>],
    n: usize,
    key_id: &str,
    ws: &str,
    limits: &[Limit],
) -> Vec<Decision> {
    let limits: Arc<[Limit]> = Arc::from(limits);
    let mut tasks = Vec::new();
    for i in 0..n {
        let l = instances[i % instances.len()].clone();
        let (limits, key_id, ws) = (limits.clone(), key_id.to_string(), ws.to_string());
        tasks.push(tokio::spawn(async move {
            l.check(&req(&key_id, &ws, &limits)).await
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.expect("check task"));
    }
    out
}

fn admitted(ds: &[Decision]) -> usize {
    ds.iter()
        .filter(|d| matches!(d, Decision::Allowed(_)))
        .count()
}

async fn hget(url: &str, key: &str, field: &str) -> Option<i64> {
    let client = redis::Client::open(url).expect("redis url");
    let mut con = client
        .get_multiplexed_async_connection()
        .await
        .expect("connect to redis");
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut con)
        .await
        .expect("HGET")
}

async fn cluster_hget(urls: &[String], key: &str, field: &str) -> Option<i64> {
    let client = redis::cluster::ClusterClient::new(urls.to_vec()).expect("cluster client");
    let mut con = client
        .get_async_connection()
        .await
        .expect("connect to the cluster");
    redis::cmd("HGET")
        .arg(key)
        .arg(field)
        .query_async(&mut con)
        .await
        .expect("HGET")
}

async fn wait_until(what: &str, limit: Duration, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mode_is_exact_across_two_instances_and_remembers_refusals() {
    let server = RedisServer::start();
    let s = settings(
        RateLimitMode::Redis,
        OnStoreError::Deny,
        Duration::from_secs(2),
    );
    let a = limiter(s, &server.url()).await;
    let b = limiter(s, &server.url()).await;
    assert!(!a.fallback_active() && !b.fallback_active());
    let limits = [lim(Scope::Key, 5, 3600), lim(Scope::Workspace, 1000, 3600)];

    let ds = concurrent(
        &[a.clone(), b.clone()],
        40,
        "key_exact",
        "ws_exact",
        &limits,
    )
    .await;
    assert_eq!(admitted(&ds), 5, "{ds:?}");
    let mut remaining: Vec<u64> = ds
        .iter()
        .filter_map(|d| {
            if let Decision::Allowed(v) = d {
                Some(v.remaining)
            } else {
                None
            }
        })
        .collect();
    remaining.sort_unstable();
    assert_eq!(remaining, [0, 1, 2, 3, 4]);
    for d in &ds {
        if let Decision::Refused {
            verdict,
            retry_after_secs,
            scope,
        } = d
        {
            assert_eq!(
                (verdict.limit, verdict.remaining, *scope),
                (5, 0, Scope::Key)
            );
            assert!(*retry_after_secs >= 1 && *retry_after_secs == verdict.reset_secs);
        }
    }
    // A refused request counted nothing, not even against the workspace limit.
    let ws_key = "pc:rl:{ws:ws_exact}:workspace:1000:3600000";
    assert_eq!(hget(&server.url(), ws_key, "c").await, Some(5));
    assert_eq!(
        hget(&server.url(), "pc:rl:{key_exact}:key:5:3600000", "c").await,
        Some(5)
    );

    // Once each instance has seen a refusal, hammering costs no Redis call.
    for l in [&a, &b] {
        assert!(matches!(
            l.check(&req("key_exact", "ws_exact", &limits)).await,
            Decision::Refused { .. }
        ));
    }
    let calls = a.stats().redis_calls + b.stats().redis_calls;
    let ds = concurrent(
        &[a.clone(), b.clone()],
        200,
        "key_exact",
        "ws_exact",
        &limits,
    )
    .await;
    assert_eq!(admitted(&ds), 0);
    assert_eq!(
        a.stats().redis_calls + b.stats().redis_calls,
        calls,
        "memoised refusals must not call Redis"
    );
    assert!(a.stats().memo_refusals + b.stats().memo_refusals >= 200);
    assert_eq!(a.stats().redis_errors + b.stats().redis_errors, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_mode_workspace_limit_spans_keys() {
    let server = RedisServer::start();
    let s = settings(
        RateLimitMode::Redis,
        OnStoreError::Deny,
        Duration::from_secs(2),
    );
    let a = limiter(s, &server.url()).await;
    let b = limiter(s, &server.url()).await;
    let limits = [lim(Scope::Key, 10, 3600), lim(Scope::Workspace, 3, 3600)];
    for (l, k) in [(&a, "key_1"), (&b, "key_2"), (&a, "key_3")] {
        assert!(matches!(
            l.check(&req(k, "acme", &limits)).await,
            Decision::Allowed(_)
        ));
    }
    match b.check(&req("key_4", "acme", &limits)).await {
        Decision::Refused { scope, verdict, .. } => {
            assert_eq!((scope, verdict.limit), (Scope::Workspace, 3))
        }
        other => panic!("expected a workspace refusal, got {other:?}"),
    }
    // key_4's own counter was not touched by the refused request.
    assert_eq!(
        hget(&server.url(), "pc:rl:{key_4}:key:10:3600000", "c").await,
        None
    );
    // Another workspace is independent.
    assert!(matches!(
        a.check(&req("key_4", "other", &limits)).await,
        Decision::Allowed(_)
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_mode_is_exact_and_refunds_cross_slot_refusals() {
    let cluster = RedisCluster::start();
    let s = settings(
        RateLimitMode::Redis,
        OnStoreError::Deny,
        Duration::from_secs(2),
    );
    let a = limiter(s, &cluster.url()).await;
    let b = limiter(s, &cluster.url()).await;
    let limits = [
        lim(Scope::Key, 5, 3600),
        lim(Scope::Route, 50, 3600),
        lim(Scope::Workspace, 1000, 3600),
    ];
    let ds = concurrent(&[a.clone(), b.clone()], 40, "key_c", "ws_c", &limits).await;
    assert_eq!(admitted(&ds), 5, "{ds:?}");
    assert_eq!(a.stats().redis_errors + b.stats().redis_errors, 0);
    let urls = cluster.node_urls();
    assert_eq!(
        cluster_hget(&urls, "pc:rl:{ws:ws_c}:workspace:1000:3600000", "c").await,
        Some(5)
    );

    // Workspace limit 3 across 4 keys: the 4th key is counted in its slot,
    // refused by the workspace slot, and refunded.
    let limits = [lim(Scope::Key, 10, 3600), lim(Scope::Workspace, 3, 3600)];
    for k in ["k1", "k2", "k3"] {
        assert!(matches!(
            a.check(&req(k, "acme", &limits)).await,
            Decision::Allowed(_)
        ));
    }
    match b.check(&req("k4", "acme", &limits)).await {
        Decision::Refused { scope, .. } => assert_eq!(scope, Scope::Workspace),
        other => panic!("expected a workspace refusal, got {other:?}"),
    }
    assert_eq!(
        cluster_hget(&urls, "pc:rl:{k4}:key:10:3600000", "c")
            .await
            .unwrap_or(0),
        0,
        "refunded"
    );
    assert_eq!(
        cluster_hget(&urls, "pc:rl:{k1}:key:10:3600000", "c").await,
        Some(1)
    );
}

/// Two hybrid instances; `clients` clients per instance send `each` requests
/// with `pause` between them. Returns the number admitted, after checking
/// that every admit reached Redis.
async fn hybrid_run(
    server: &RedisServer,
    key_id: &str,
    clients: usize,
    each: usize,
    pause: Duration,
) -> (u64, u64) {
    let s = settings(
        RateLimitMode::Hybrid,
        OnStoreError::Deny,
        Duration::from_secs(2),
    );
    let a = limiter(s, &server.url()).await;
    let b = limiter(s, &server.url()).await;
    let requests = 100;
    let limits: Arc<[Limit]> = Arc::from([lim(Scope::Key, requests, 3600)]);
    let mut tasks = Vec::new();
    for i in 0..2 * clients {
        let l = if i % 2 == 0 { a.clone() } else { b.clone() };
        let (limits, key_id) = (limits.clone(), key_id.to_string());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            for _ in 0..each {
                if matches!(
                    l.check(&req(&key_id, "ws_h", &limits)).await,
                    Decision::Allowed(_)
                ) {
                    n += 1;
                }
                if pause.is_zero() {
                    tokio::task::yield_now().await;
                } else {
                    tokio::time::sleep(pause).await;
                }
            }
            n
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("client task");
    }
    a.flush().await;
    b.flush().await;
    let bound = hybrid_overadmission_bound(requests, s.exact_threshold, 2);
    println!(
        "hybrid ({key_id}): {} requests ({clients} clients per instance, {pause:?} apart), limit {requests}: \
         admitted {total}, over-admission {} (stated bound {bound}); stats a={:?} b={:?}",
        2 * clients * each,
        total.saturating_sub(requests),
        a.stats(),
        b.stats()
    );
    assert!(!a.fallback_active() && !b.fallback_active());
    assert!(a.stats().hybrid_local > 0 && b.stats().hybrid_local > 0);
    // Every admit reached Redis: local ones by the pushes or with an exact
    // call, the others by the exact path.
    let key = format!("pc:rl:{{{key_id}}}:key:100:3600000");
    let c = hget(&server.url(), &key, "c").await.unwrap_or(0);
    let p = hget(&server.url(), &key, "p").await.unwrap_or(0);
    assert_eq!(
        u64::try_from(c + p).unwrap_or(0),
        total,
        "Redis holds every admit"
    );
    (total, bound)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hybrid_mode_stays_within_the_stated_bound() {
    let server = RedisServer::start();
    // A burst: 640 requests within about one sync interval (the worst case).
    let (total, bound) = hybrid_run(&server, "key_burst", 8, 40, Duration::ZERO).await;
    assert!(total >= 100, "hybrid must not under-admit: {total}");
    assert!(
        total - 100 <= bound,
        "over-admission {} exceeds the stated bound {bound}",
        total - 100
    );
    // Paced over several sync intervals: pushes keep the views fresh.
    let (total, bound) = hybrid_run(&server, "key_paced", 4, 40, Duration::from_millis(5)).await;
    assert!(total >= 100, "hybrid must not under-admit: {total}");
    assert!(
        total - 100 <= bound,
        "over-admission {} exceeds the stated bound {bound}",
        total - 100
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_uses_on_store_error_and_recovers() {
    let mut server = RedisServer::start();
    let url = server.url();
    let t = Duration::from_millis(300);
    let local = limiter(settings(RateLimitMode::Redis, OnStoreError::Local, t), &url).await;
    let deny = limiter(settings(RateLimitMode::Redis, OnStoreError::Deny, t), &url).await;
    let allow = limiter(settings(RateLimitMode::Redis, OnStoreError::Allow, t), &url).await;
    let hybrid = limiter(settings(RateLimitMode::Hybrid, OnStoreError::Deny, t), &url).await;
    let limits = [lim(Scope::Key, 3, 3600)];
    for (l, k) in [
        (&local, "k_local"),
        (&deny, "k_deny"),
        (&allow, "k_allow"),
        (&hybrid, "k_hybrid"),
    ] {
        assert!(
            matches!(l.check(&req(k, "ws", &limits)).await, Decision::Allowed(_)),
            "{k} with Redis up"
        );
    }
    tokio::time::sleep(Duration::from_millis(200)).await; // the hybrid push
    assert_eq!(
        hget(&url, "pc:rl:{k_hybrid}:key:3:3600000", "c").await,
        Some(1)
    );

    server.kill();
    // local: the full limit, enforced in process.
    let mut ds = Vec::new();
    for _ in 0..4 {
        ds.push(local.check(&req("k_local", "ws", &limits)).await);
    }
    assert_eq!(admitted(&ds[..3]), 3, "{ds:?}");
    assert!(matches!(ds[3], Decision::Refused { .. }), "{ds:?}");
    assert!(local.fallback_active());
    // deny: refused for a second.
    match deny.check(&req("k_deny", "ws", &limits)).await {
        Decision::Refused {
            retry_after_secs,
            verdict,
            ..
        } => {
            assert_eq!((retry_after_secs, verdict.remaining), (1, 0))
        }
        other => panic!("deny: {other:?}"),
    }
    assert!(deny.fallback_active());
    // allow: admitted without counting or headers.
    for _ in 0..5 {
        assert_eq!(
            allow.check(&req("k_allow", "ws", &limits)).await,
            Decision::Unlimited
        );
    }
    assert!(allow.fallback_active());
    // hybrid: decides in process until its next push fails, then denies.
    let _ = hybrid.check(&req("k_hybrid", "ws", &limits)).await;
    wait_until(
        "the hybrid push to fail",
        Duration::from_secs(3),
        async || hybrid.fallback_active(),
    )
    .await;
    assert!(matches!(
        hybrid.check(&req("k_hybrid", "ws", &limits)).await,
        Decision::Refused {
            retry_after_secs: 1,
            ..
        }
    ));
    // No request pays for the outage: at most one probe per second each.
    let calls = deny.stats().redis_calls;
    for _ in 0..100 {
        let _ = deny.check(&req("k_deny", "ws", &limits)).await;
    }
    assert!(deny.stats().redis_calls <= calls + 1);

    server.restart();
    for (l, k) in [(&local, "k_local"), (&deny, "k_deny"), (&allow, "k_allow")] {
        wait_until(
            &format!("{k} to use Redis again"),
            Duration::from_secs(6),
            async || {
                let d = l.check(&req(k, "ws", &limits)).await;
                !l.fallback_active() && matches!(d, Decision::Allowed(_))
            },
        )
        .await;
        let st = l.stats();
        assert_eq!(
            (st.fallback_entered, st.fallback_recovered),
            (1, 1),
            "{k}: {st:?}"
        );
        // The restarted Redis is empty: its counter holds just the new decision(s).
        assert!(
            hget(&url, &format!("pc:rl:{{{k}}}:key:3:3600000"), "c")
                .await
                .is_some(),
            "{k} counted in Redis"
        );
    }
    wait_until(
        "hybrid to use Redis again",
        Duration::from_secs(6),
        async || !hybrid.fallback_active(),
    )
    .await;
    assert!(matches!(
        hybrid.check(&req("k_hybrid", "ws", &limits)).await,
        Decision::Allowed(_)
    ));
    // The admit made while Redis was down (before the failure was noticed) was pushed on recovery.
    hybrid.flush().await;
    assert!(
        hget(&url, "pc:rl:{k_hybrid}:key:3:3600000", "c")
            .await
            .unwrap_or(0)
            >= 2
    );
}

#[test]
fn redis_server_is_installed() {
    // The other tests rely on it and must fail, not skip, without it.
    let found = Command::new("redis-server")
        .arg("--version")
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(
        found,
        "redis-server is missing: apt-get install -y redis-server"
    );
}
