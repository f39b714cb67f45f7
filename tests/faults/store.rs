//! The key store stalls or refuses writes: the breaker serves stale-cached
//! keys at once, refuses uncached ones at once, probes one at a time until
//! the store answers again, and readiness tells the truth.

use crate::common::redis::RedisServer;
use crate::common::*;
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "faults-admin-token-st0re";
/// Long enough that a request which waited for it cannot pass for one that
/// did not, on a loaded machine.
const STORE_TIMEOUT: Duration = Duration::from_secs(2);

fn config(redis: &str, upstream: &str) -> String {
    gateway_toml(
        None,
        &format!(
            r#"
[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[store]
url = "{redis}"
timeout = "2s"

[cache]
ttl = "300ms"
stale_if_error = "60s"

[rate_limit]
mode = "local"

[upstreams.echo]
targets = ["{upstream}"]

[[routes]]
name = "k"
methods = ["GET"]
path = "/k"
upstream = "echo"
permissions = ["read"]
"#
        ),
    )
}

/// The Redis server process, stopped (SIGSTOP: connections stay open, no
/// answers) until dropped.
struct Stalled(u32);

impl Stalled {
    fn stop(redis: &RedisServer) -> Self {
        let info = redis.command(&["INFO", "server"]).expect("INFO server");
        let pid: u32 = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("process_id in INFO");
        signal(pid, "STOP");
        Stalled(pid)
    }
}

impl Drop for Stalled {
    fn drop(&mut self) {
        signal(self.0, "CONT");
    }
}

fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid}");
}

struct Env {
    gw: TestGateway,
    redis: RedisServer,
    client: TestClient,
    _up: EchoUpstream,
}

impl Env {
    async fn start() -> Env {
        let redis = tokio::task::block_in_place(RedisServer::start);
        let up = EchoUpstream::start().await;
        let gw = start_gateway(&config(&redis.url(), &up.url())).await;
        Env {
            gw,
            redis,
            client: TestClient::h1(None),
            _up: up,
        }
    }

    /// A new key with `read`, made through the admin API.
    async fn key(&self) -> String {
        let req = http::Request::post(self.gw.admin_url("/admin/v1/keys"))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .header("content-type", "application/json")
            .body(body(r#"{"workspace":"w","permissions":["read"]}"#))
            .expect("request");
        let r = self.client.send(req).await;
        assert_eq!(r.status, 201, "create: {}", r.text());
        r.json()["secret"].as_str().expect("secret").to_string()
    }

    /// `GET /k` with `key`; the status and how long it took.
    async fn call(&self, key: &str) -> (u16, Duration) {
        let t = Instant::now();
        let r = self
            .client
            .get_with(
                &self.gw.url("/k"),
                &[("authorization", &format!("Bearer {key}"))],
            )
            .await;
        (r.status.as_u16(), t.elapsed())
    }

    async fn metric(&self, name: &str) -> f64 {
        let r = self
            .client
            .get_with(
                &self.gw.admin_url("/metrics"),
                &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
            )
            .await;
        r.text()
            .lines()
            .find(|l| l.split([' ', '{']).next() == Some(name))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("{name} not in /metrics"))
    }

    async fn readyz(&self) -> (u16, serde_json::Value) {
        let r = self.client.get(&self.gw.admin_url("/readyz")).await;
        (r.status.as_u16(), r.json())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_store_costs_stale_cached_keys_no_waiting_and_uncached_keys_get_503_at_once() {
    let env = Env::start().await;
    let cached = env.key().await;
    let uncached = env.key().await;
    assert_eq!(env.call(&cached).await.0, 200);
    assert_eq!(env.readyz().await.0, 200);

    let stalled = Stalled::stop(&env.redis);
    // Past the cache ttl: the key is only stale-cached now.
    tokio::time::sleep(Duration::from_millis(400)).await;
    let lookups_before = env.metric("portcullis_store_lookups_total").await;

    // The first lookup waits out the store timeout and opens the breaker.
    let (status, _) = env.call(&cached).await;
    assert_eq!(status, 200, "served stale");
    assert_eq!(env.metric("portcullis_store_breaker_open").await, 1.0);

    // Then no request waits for the store.
    let mut slowest = Duration::ZERO;
    for _ in 0..40 {
        let (status, took) = env.call(&cached).await;
        assert_eq!(status, 200, "a stale-cached key keeps answering");
        slowest = slowest.max(took);
    }
    assert!(
        slowest < STORE_TIMEOUT / 2,
        "a stale-cached key waited for the stalled store: {slowest:?}"
    );
    let t = Instant::now();
    let r = env
        .client
        .get_with(
            &env.gw.url("/k"),
            &[("authorization", &format!("Bearer {uncached}"))],
        )
        .await;
    r.assert_error(503, "AUTH_UNAVAILABLE");
    assert!(
        t.elapsed() < STORE_TIMEOUT / 2,
        "an uncached key is refused at once, not after the store timeout: {:?}",
        t.elapsed()
    );
    // Probes, one at a time with backoff, are all the store sees.
    let lookups = env.metric("portcullis_store_lookups_total").await - lookups_before;
    assert!(
        lookups <= 6.0,
        "{lookups} store lookups for 42 requests while the breaker was open"
    );

    // Readiness says so.
    let (status, body) = env.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["store"], "timeout", "{body}");
    assert_eq!(body["checks"]["store_breaker"], "open", "{body}");

    // The store answers again: a probe closes the breaker, and the
    // uncached key authenticates without a restart.
    drop(stalled);
    eventually(
        "the uncached key authenticates after the store recovers",
        Duration::from_secs(10),
        || async { env.call(&uncached).await.0 == 200 },
    )
    .await;
    assert_eq!(env.metric("portcullis_store_breaker_open").await, 0.0);
    assert_eq!(
        env.metric("portcullis_store_breaker_trips_total").await,
        1.0
    );
    assert_eq!(env.readyz().await.0, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_is_503_while_redis_refuses_writes_and_keys_still_authenticate() {
    let env = Env::start().await;
    let key = env.key().await;
    assert_eq!(env.call(&key).await.0, 200);
    assert_eq!(env.readyz().await.0, 200);

    // Out of memory: PING and reads answer, writes are refused.
    env.redis
        .command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let reply = env
        .redis
        .command(&["CONFIG", "SET", "maxmemory", "1"])
        .expect("CONFIG SET");
    assert!(reply.starts_with("+OK"), "{reply}");
    let (status, body) = env.readyz().await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(body["checks"]["store"], "read_only", "{body}");
    tokio::time::sleep(Duration::from_millis(400)).await; // past the cache ttl
    assert_eq!(
        env.call(&key).await.0,
        200,
        "lookups are reads: keys still authenticate"
    );
    assert_eq!(env.metric("portcullis_store_breaker_open").await, 0.0);

    env.redis.command(&["CONFIG", "SET", "maxmemory", "0"]);
    assert_eq!(env.readyz().await.0, 200);
}
