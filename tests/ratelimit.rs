//! Rate limiting end to end: the real `portcullis` binary (`serve --config
//! FILE`, one child process per gateway) in front of a real upstream (hyper,
//! in this process), with the embedded SQLite store, a real `redis-server`,
//! or a real 3-master Redis Cluster. Keys are made with the real CLI
//! (`portcullis keys create … --json`). Clients are plain blocking HTTP/1.1
//! on std sockets, one connection per request, from as many threads as a
//! test wants concurrency.
//!
//! The Redis tests need `redis-server` (and `redis-cli` for the cluster) on
//! the PATH; without them they panic with install instructions, never skip.
//!
//! A note on the sliding-window arithmetic these tests assert against (see
//! `src/ratelimit/window.rs`): windows are aligned to multiples of `per`, and
//! the estimate is `prev × (1 − elapsed/per) + curr`. So requests made at the
//! start of a window still weigh on the next one: after a full burst, a
//! request is admitted again at most `per + per/requests` later, which is
//! the upper bound the tests use for `Retry-After` (never "≤ per").

#[path = "common/redis.rs"]
mod redis_support;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::ratelimit::hybrid_overadmission_bound;
use redis_support::{RedisCluster, RedisServer};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The gateway binary under test.
const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

/// How long a client waits for one answer before calling it a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a gateway may take to answer `/healthz` after spawning.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// What the limiter logs when it enters / leaves the `on_store_error`
/// fallback (`src/ratelimit/mod.rs`, `redis_failed` / `redis_ok`).
const LOG_FALLBACK_ENTERED: &str = "Redis failed; using the on_store_error fallback";
const LOG_FALLBACK_LEFT: &str = "Redis answers again; leaving the on_store_error fallback";

/// The path every test calls (route `sms.read`, `GET /v1/sms/{id}`).
const READ: &str = "/v1/sms/1";

// ───────────────────────────────── upstream ─────────────────────────────────

/// A real HTTP upstream (hyper, HTTP/1.1 and h2c) on its own Tokio runtime.
/// Counts every request it receives; answers `200 {"ok":true}`, or the
/// status named by a `status=NNN` query parameter (e.g. `?status=500`).
struct Upstream {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    rt: Option<tokio::runtime::Runtime>,
}

impl Upstream {
    fn start() -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("upstream runtime");
        let listener = rt
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("bind the upstream");
        let addr = listener.local_addr().expect("upstream address");
        let hits = Arc::new(AtomicUsize::new(0));
        let counter = hits.clone();
        rt.spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let counter = counter.clone();
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        counter.fetch_add(1, Ordering::SeqCst);
                        let status = requested_status(req.uri().query());
                        async move {
                            let mut resp =
                                Response::new(Full::new(Bytes::from_static(b"{\"ok\":true}")));
                            *resp.status_mut() = status;
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            hits,
            rt: Some(rt),
        }
    }

    /// `http://127.0.0.1:PORT`, for `targets`.
    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received so far.
    fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The status asked for with `status=NNN` in the query, else 200.
fn requested_status(query: Option<&str>) -> StatusCode {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("status="))
        .and_then(|s| s.parse::<u16>().ok())
        .and_then(|s| StatusCode::from_u16(s).ok())
        .unwrap_or(StatusCode::OK)
}

// ────────────────────────────────── client ──────────────────────────────────

/// One HTTP answer.
#[derive(Debug)]
struct Resp {
    status: u16,
    /// Header names lowercased, in order.
    headers: Vec<(String, String)>,
    body: String,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// A header that must be present and a whole number.
    fn num(&self, name: &str) -> u64 {
        let v = self
            .header(name)
            .unwrap_or_else(|| panic!("no {name} header on {self:?}"));
        v.parse()
            .unwrap_or_else(|_| panic!("{name}: {v:?} is not a number"))
    }

    /// `error.code` of a JSON error body.
    fn code(&self) -> String {
        serde_json::from_str::<serde_json::Value>(&self.body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_string))
            .unwrap_or_else(|| panic!("not a JSON error body: {:?}", self.body))
    }
}

/// `GET path` on a fresh connection (`Connection: close`), with
/// `Authorization: Bearer <secret>` when given; the whole answer is read.
fn try_get(addr: SocketAddr, path: &str, secret: Option<&str>) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, ANSWER_TIMEOUT)?;
    s.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    s.set_write_timeout(Some(ANSWER_TIMEOUT))?;
    let auth = secret.map_or(String::new(), |k| format!("Authorization: Bearer {k}\r\n"));
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Connection: close\r\n\r\n"
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw);
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, format!("{text:?}"));
    let (head, body) = text.split_once("\r\n\r\n").ok_or_else(bad)?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(bad)?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(Resp {
        status,
        headers,
        body: body.to_string(),
    })
}

/// [`try_get`] that panics (naming the address and path) on a transport error.
fn get(addr: SocketAddr, path: &str, secret: &str) -> Resp {
    try_get(addr, path, Some(secret))
        .unwrap_or_else(|e| panic!("GET {path} on {addr}: no answer: {e}"))
}

/// Sends `n` requests with `secret` from `threads` threads at once; thread
/// `t` starts on gateway `t % len` and moves to the next gateway after each
/// request, so every gateway gets its share. Returns the statuses.
fn burst(gateways: &[SocketAddr], secret: &str, n: usize, threads: usize) -> Vec<u16> {
    std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let share = n / threads + usize::from(t < n % threads);
                scope.spawn(move || {
                    (0..share)
                        .map(|i| get(gateways[(t + i) % gateways.len()], READ, secret).status)
                        .collect::<Vec<u16>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().expect("client thread"))
            .collect()
    })
}

fn count(statuses: &[u16], status: u16) -> usize {
    statuses.iter().filter(|s| **s == status).count()
}

// ───────────────────────────────── gateways ─────────────────────────────────

/// A loopback port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Everything of a gateway config but `[server]` and `[admin]` (which
/// [`Gw::start`] writes with free ports): the store, `[rate_limit]`'s keys,
/// the `[plans.*]` tables, one upstream `sms`, and the `[[routes]]`
/// (`routes` empty means the one route `sms.read`, `GET /v1/sms/{id}`).
fn config_body(
    store_url: &str,
    rate_limit: &str,
    plans: &str,
    upstream: &Upstream,
    routes: &str,
) -> String {
    let routes = if routes.is_empty() {
        route("sms.read", "/v1/sms/{id}", "")
    } else {
        routes.to_string()
    };
    format!(
        "[store]\nurl = \"{store_url}\"\n\n[rate_limit]\n{rate_limit}\n\n{plans}\n\n\
         [upstreams.sms]\ntargets = [\"{}\"]\n\n{routes}",
        upstream.url()
    )
}

/// One `[[routes]]` table on upstream `sms` needing `sms.read`, with
/// `limits` (TOML array text) when not empty.
fn route(name: &str, path: &str, limits: &str) -> String {
    let limits = if limits.is_empty() {
        String::new()
    } else {
        format!("limits = {limits}\n")
    };
    format!(
        "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\n\
         upstream = \"sms\"\npermissions = [\"sms.read\"]\n{limits}\n"
    )
}

/// `sqlite://` URL of a fresh database file in `dir`.
fn sqlite_url(dir: &Path) -> String {
    format!("sqlite://{}", dir.join("rl.db").display())
}

/// A `portcullis serve` child process. Its stdout and stderr go to a log
/// file next to its config; it is killed on drop.
struct Gw {
    child: Child,
    addr: SocketAddr,
    config: PathBuf,
    log: PathBuf,
}

impl Gw {
    /// Writes `<dir>/<name>.toml` (`[server]` and `[admin]` on free loopback
    /// ports, then `body`), starts the binary on it, and waits until the
    /// admin `/healthz` answers 200 (the store is open and the limiter built
    /// by then). Retries with new ports if one was taken meanwhile.
    fn start(dir: &Path, name: &str, body: &str) -> Gw {
        let config = dir.join(format!("{name}.toml"));
        let log = dir.join(format!("{name}.log"));
        for _ in 0..3 {
            let (port, admin_port) = (free_port(), free_port());
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:{port}\"\n\n\
                 [admin]\nlisten = \"127.0.0.1:{admin_port}\"\n\n{body}\n"
            );
            std::fs::write(&config, &text).expect("write the gateway config");
            let out = File::create(&log).expect("create the gateway log");
            let err = out.try_clone().expect("clone the log handle");
            let child = Command::new(BIN)
                .arg("serve")
                .arg("--config")
                .arg(&config)
                .env_remove("RUST_LOG")
                .env_remove("PORTCULLIS_CONFIG")
                .stdin(Stdio::null())
                .stdout(out)
                .stderr(err)
                .spawn()
                .expect("spawn portcullis serve");
            let mut gw = Gw {
                child,
                addr: SocketAddr::from(([127, 0, 0, 1], port)),
                config: config.clone(),
                log: log.clone(),
            };
            let admin = SocketAddr::from(([127, 0, 0, 1], admin_port));
            let start = Instant::now();
            loop {
                if let Ok(Some(status)) = gw.child.try_wait() {
                    let log = gw.log();
                    if log.contains("Address already in use") {
                        break; // a port was taken meanwhile: try new ones
                    }
                    panic!("gateway {name} exited during startup ({status}):\n{log}\n{text}");
                }
                if try_get(admin, "/healthz", None).is_ok_and(|r| r.status == 200) {
                    return gw;
                }
                assert!(
                    start.elapsed() < READY_TIMEOUT,
                    "gateway {name}: /healthz not 200 after {READY_TIMEOUT:?}:\n{}",
                    gw.log()
                );
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        panic!("gateway {name}: no free ports after 3 attempts");
    }

    /// Everything the process has logged so far (stdout and stderr).
    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `GET path` with `secret`.
    fn get(&self, path: &str, secret: &str) -> Resp {
        get(self.addr, path, secret)
    }

    /// `n` sequential `GET /v1/sms/1` with `secret`.
    fn hit(&self, secret: &str, n: usize) -> Vec<Resp> {
        (0..n).map(|_| self.get(READ, secret)).collect()
    }
}

impl Drop for Gw {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn statuses(resps: &[Resp]) -> Vec<u16> {
    resps.iter().map(|r| r.status).collect()
}

// ──────────────────────────────────── keys ──────────────────────────────────

/// A key as `keys create --json` printed it.
struct Key {
    id: String,
    secret: String,
}

/// Runs `portcullis <args> --json --config <config>` and returns its JSON.
fn cli_json(config: &Path, args: &[&str]) -> serde_json::Value {
    let out = Command::new(BIN)
        .args(args)
        .arg("--json")
        .arg("--config")
        .arg(config)
        .env_remove("RUST_LOG")
        .env_remove("PORTCULLIS_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run the portcullis CLI");
    assert!(
        out.status.success(),
        "portcullis {args:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "portcullis {args:?}: not JSON ({e}):\n{}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// `keys create --workspace <workspace> --permissions sms.read [--plan <plan>]`
/// in the store named by `config`.
fn create_key(config: &Path, workspace: &str, plan: Option<&str>) -> Key {
    let mut args = vec![
        "keys",
        "create",
        "--workspace",
        workspace,
        "--permissions",
        "sms.read",
    ];
    if let Some(p) = plan {
        args.extend(["--plan", p]);
    }
    let v = cli_json(config, &args);
    Key {
        id: v["id"].as_str().expect("id in keys create").to_string(),
        secret: v["secret"]
            .as_str()
            .expect("secret in keys create")
            .to_string(),
    }
}

// ───────────────────────────────── local mode ───────────────────────────────

const LOCAL: &str = "mode = \"local\"\non_store_error = \"local\"";
const PLAN_5_PER_MINUTE: &str =
    "[plans.default]\nlimits = [{ scope = \"key\", requests = 5, per = \"1m\" }]";

/// The most seconds a sliding-window counter can make a client wait after a
/// full burst: `per + per / requests` (see the module docs).
fn max_wait_secs(requests: u64, per_secs: u64) -> u64 {
    per_secs + per_secs.div_ceil(requests)
}

#[test]
fn local_mode_admits_exactly_the_plan_limit_then_answers_429_with_headers() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let body = config_body(&sqlite_url(dir.path()), LOCAL, PLAN_5_PER_MINUTE, &up, "");
    let gw = Gw::start(dir.path(), "gw", &body);
    let k = create_key(&gw.config, "ws_a", None);

    let resps = gw.hit(&k.secret, 8);
    assert_eq!(
        statuses(&resps),
        [200, 200, 200, 200, 200, 429, 429, 429],
        "5 admitted, then refused"
    );
    for r in &resps {
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"), "{r:?}");
        assert!(r.num("x-ratelimit-reset") >= 1, "{r:?}");
    }
    let remaining: Vec<u64> = resps
        .iter()
        .map(|r| r.num("x-ratelimit-remaining"))
        .collect();
    assert_eq!(remaining, [4, 3, 2, 1, 0, 0, 0, 0]);
    for r in &resps[5..] {
        assert_eq!(r.code(), "RATE_LIMITED");
        let retry = r.num("retry-after");
        assert!(
            (1..=max_wait_secs(5, 60)).contains(&retry),
            "Retry-After {retry} not within 1..={} s",
            max_wait_secs(5, 60)
        );
        assert_eq!(
            r.num("x-ratelimit-reset"),
            retry,
            "one limit refuses: Reset is its Retry-After"
        );
    }
    assert_eq!(
        up.hits(),
        5,
        "refused requests must never reach the upstream"
    );
}

#[test]
fn rate_limit_headers_are_set_on_upstream_error_answers() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let body = config_body(&sqlite_url(dir.path()), LOCAL, PLAN_5_PER_MINUTE, &up, "");
    let gw = Gw::start(dir.path(), "gw", &body);
    let k = create_key(&gw.config, "ws_a", None);

    for (i, status) in [500u16, 404, 503].into_iter().enumerate() {
        let r = gw.get(&format!("{READ}?status={status}"), &k.secret);
        assert_eq!(r.status, status, "the upstream's status passes through");
        assert_eq!(r.header("x-ratelimit-limit"), Some("5"), "{r:?}");
        assert_eq!(r.num("x-ratelimit-remaining"), 4 - i as u64, "{r:?}");
        assert!(r.num("x-ratelimit-reset") >= 1, "{r:?}");
    }
    assert_eq!(up.hits(), 3);
}

const PLAN_TEAM: &str = "[plans.team]\nlimits = [\
    { scope = \"key\", requests = 100, per = \"1m\" }, \
    { scope = \"workspace\", requests = 8, per = \"1h\" }]";

#[test]
fn workspace_limit_spans_every_key_of_the_workspace() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let plans = format!("{PLAN_5_PER_MINUTE}\n{PLAN_TEAM}");
    let body = config_body(&sqlite_url(dir.path()), LOCAL, &plans, &up, "");
    let gw = Gw::start(dir.path(), "gw", &body);
    let k1 = create_key(&gw.config, "ws_team", Some("team"));
    let k2 = create_key(&gw.config, "ws_team", Some("team"));

    let mut got = statuses(&gw.hit(&k1.secret, 5));
    got.extend(statuses(&gw.hit(&k2.secret, 5)));
    assert_eq!(
        got,
        [200, 200, 200, 200, 200, 200, 200, 200, 429, 429],
        "8 of 10 admitted over two keys of one workspace"
    );

    let k3 = create_key(&gw.config, "ws_team", Some("team"));
    for r in gw.hit(&k3.secret, 2) {
        assert_eq!(
            r.status, 429,
            "a new key does not escape the workspace limit"
        );
        assert_eq!(r.code(), "RATE_LIMITED");
        assert_eq!(
            r.header("x-ratelimit-limit"),
            Some("8"),
            "the headers name the refusing (workspace) limit"
        );
        assert_eq!(r.num("x-ratelimit-remaining"), 0);
    }
    let other = create_key(&gw.config, "ws_other", Some("team"));
    assert_eq!(
        gw.get(READ, &other.secret).status,
        200,
        "other workspaces unaffected"
    );
    assert_eq!(up.hits(), 9);
}

#[test]
fn route_scope_limit_applies_only_to_its_route() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let routes = route(
        "sms.read",
        "/v1/sms/{id}",
        "[{ scope = \"route\", requests = 2, per = \"1m\" }]",
    ) + &route("sms.list", "/v1/sms", "");
    let plan = "[plans.default]\nlimits = [{ scope = \"key\", requests = 100, per = \"1m\" }]";
    let body = config_body(&sqlite_url(dir.path()), LOCAL, plan, &up, &routes);
    let gw = Gw::start(dir.path(), "gw", &body);
    let k = create_key(&gw.config, "ws_a", None);

    let read = gw.hit(&k.secret, 3);
    assert_eq!(statuses(&read), [200, 200, 429], "route limit 2/1m");
    assert_eq!(read[2].code(), "RATE_LIMITED");
    for r in &read {
        assert_eq!(
            r.header("x-ratelimit-limit"),
            Some("2"),
            "tightest limit: the route's"
        );
    }
    for _ in 0..3 {
        let r = gw.get("/v1/sms", &k.secret);
        assert_eq!(r.status, 200, "another route still admits");
        assert_eq!(r.header("x-ratelimit-limit"), Some("100"));
    }
    let k2 = create_key(&gw.config, "ws_a", None);
    assert_eq!(
        gw.get(READ, &k2.secret).status,
        200,
        "a route limit counts per key: another key has its own"
    );
}

#[test]
fn a_refused_request_consumes_nothing_from_the_other_limits() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let routes = route(
        "sms.read",
        "/v1/sms/{id}",
        "[{ scope = \"route\", requests = 1, per = \"1m\" }]",
    ) + &route("sms.list", "/v1/sms", "");
    let plan = "[plans.default]\nlimits = [{ scope = \"key\", requests = 3, per = \"1m\" }]";
    let body = config_body(&sqlite_url(dir.path()), LOCAL, plan, &up, &routes);
    let gw = Gw::start(dir.path(), "gw", &body);
    let k = create_key(&gw.config, "ws_a", None);

    assert_eq!(gw.get(READ, &k.secret).status, 200);
    let refused = gw.get(READ, &k.secret);
    assert_eq!(refused.status, 429, "route limit 1/1m");
    assert_eq!(
        refused.header("x-ratelimit-limit"),
        Some("1"),
        "refused by the route limit"
    );
    let other: Vec<u16> = (0..2)
        .map(|_| gw.get("/v1/sms", &k.secret).status)
        .collect();
    assert_eq!(
        other,
        [200, 200],
        "the key limit (3) still had 2 left: the refused request was not counted"
    );
    let over = gw.get("/v1/sms", &k.secret);
    assert_eq!(over.status, 429, "now the key limit is used up");
    assert_eq!(over.header("x-ratelimit-limit"), Some("3"));
    assert_eq!(up.hits(), 3);
}

#[test]
fn rotation_keeps_the_key_counters() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let body = config_body(&sqlite_url(dir.path()), LOCAL, PLAN_5_PER_MINUTE, &up, "");
    let gw = Gw::start(dir.path(), "gw", &body);
    let k = create_key(&gw.config, "ws_a", None);

    assert_eq!(
        statuses(&gw.hit(&k.secret, 6)),
        [200, 200, 200, 200, 200, 429]
    );
    let rotated = cli_json(&gw.config, &["keys", "rotate", &k.id]);
    assert_eq!(rotated["id"], k.id.as_str(), "rotation keeps the id");
    let new_secret = rotated["secret"].as_str().expect("new secret");
    assert_ne!(new_secret, k.secret);

    let r = gw.get(READ, new_secret);
    assert_eq!(r.status, 429, "the new secret is still limited: {r:?}");
    assert_eq!(r.code(), "RATE_LIMITED");
    assert_eq!(r.num("x-ratelimit-remaining"), 0);
    assert_eq!(up.hits(), 5);
}

/// Waits until the start of the next `per_ms`-aligned window plus `offset_ms`
/// (windows are aligned to multiples of `per` since the Unix epoch).
fn sleep_to_window_phase(per_ms: u64, offset_ms: u64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64;
    let next = (now / per_ms + 1) * per_ms + offset_ms;
    std::thread::sleep(Duration::from_millis(next - now));
}

#[test]
fn retry_after_is_accurate_on_a_short_window() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let plan = "[plans.default]\nlimits = [{ scope = \"key\", requests = 2, per = \"2s\" }]";
    let body = config_body(&sqlite_url(dir.path()), LOCAL, plan, &up, "");
    let gw = Gw::start(dir.path(), "gw", &body);
    let k = create_key(&gw.config, "ws_a", None);
    // Start the burst in the second half of a 2 s window, where the
    // sliding-window counter frees a request within the window length.
    sleep_to_window_phase(2000, 1100);

    assert_eq!(statuses(&gw.hit(&k.secret, 2)), [200, 200]);
    let refused = gw.get(READ, &k.secret);
    let refused_at = Instant::now();
    assert_eq!(refused.status, 429);
    assert_eq!(refused.code(), "RATE_LIMITED");
    let retry = refused.num("retry-after");
    println!("2 per 2s, burst at +1.1 s into a window: Retry-After {retry}");
    assert!(
        (1..=2).contains(&retry),
        "Retry-After {retry}: a burst late in a window is freed within the window length"
    );

    // Retry-After is rounded up: the true wait is more than `retry - 1` s,
    // so a little before that the limit still refuses (and this refusal,
    // too, counts nothing) …
    if retry > 1 {
        let early = Duration::from_secs(retry - 1) - Duration::from_millis(150);
        std::thread::sleep(early.saturating_sub(refused_at.elapsed()));
        assert_eq!(
            gw.get(READ, &k.secret).status,
            429,
            "refused before Retry-After"
        );
    }
    // … and after Retry-After seconds a request is admitted again.
    std::thread::sleep(Duration::from_secs(retry).saturating_sub(refused_at.elapsed()));
    let again = gw.get(READ, &k.secret);
    assert_eq!(again.status, 200, "admitted after Retry-After: {again:?}");
    assert_eq!(up.hits(), 3);
}

#[test]
fn retry_after_is_honoured_after_a_burst_at_the_start_of_a_window() {
    let dir = tempfile::tempdir().unwrap();
    let up = Upstream::start();
    let plan = "[plans.default]\nlimits = [{ scope = \"key\", requests = 2, per = \"2s\" }]";
    let body = config_body(&sqlite_url(dir.path()), LOCAL, plan, &up, "");
    let gw = Gw::start(dir.path(), "gw", &body);
    let k = create_key(&gw.config, "ws_a", None);
    // The worst case of the sliding-window counter: a full burst right at
    // the start of a window weighs fully on the next one, so the wait is
    // `per + per/requests` = 3 s, more than the window. Retry-After must
    // say so (not promise 2 s and refuse again).
    sleep_to_window_phase(2000, 50);

    assert_eq!(statuses(&gw.hit(&k.secret, 2)), [200, 200]);
    let refused = gw.get(READ, &k.secret);
    let refused_at = Instant::now();
    assert_eq!(refused.status, 429);
    let retry = refused.num("retry-after");
    println!("2 per 2s, burst at +0.05 s into a window: Retry-After {retry}");
    assert!(
        (1..=max_wait_secs(2, 2)).contains(&retry),
        "Retry-After {retry} past the sliding-window bound {}",
        max_wait_secs(2, 2)
    );
    std::thread::sleep(Duration::from_secs(retry).saturating_sub(refused_at.elapsed()));
    assert_eq!(
        gw.get(READ, &k.secret).status,
        200,
        "admitted after Retry-After"
    );
}

// ──────────────────────────────── Redis modes ───────────────────────────────

#[test]
fn redis_mode_is_exact_across_two_gateways() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let up = Upstream::start();
    let rl = "mode = \"redis\"\non_store_error = \"local\"";
    let body = config_body(&redis.url(), rl, PLAN_5_PER_MINUTE, &up, "");
    let a = Gw::start(dir.path(), "a", &body);
    let b = Gw::start(dir.path(), "b", &body);
    let k = create_key(&a.config, "ws_x", None);

    let got = burst(&[a.addr, b.addr], &k.secret, 40, 4);
    let (ok, refused) = (count(&got, 200), count(&got, 429));
    println!(
        "redis mode, 2 gateways, 40 concurrent requests, limit 5: {ok} admitted, {refused} refused"
    );
    assert_eq!((ok, refused), (5, 35), "statuses: {got:?}");
    assert_eq!(up.hits(), 5);
}

/// `calls` per command in `INFO commandstats` (e.g. `"evalsha"`), except
/// INFO itself (the measurement's own). Commands that Lua scripts run
/// (`HMGET`, `HSET`, `TIME`, …) are counted too, as Redis counts them.
fn redis_calls(redis: &RedisServer) -> BTreeMap<String, u64> {
    let info = redis
        .command(&["INFO", "commandstats"])
        .expect("INFO commandstats");
    info.lines()
        .filter_map(|l| {
            let (name, stats) = l.strip_prefix("cmdstat_")?.split_once(':')?;
            let calls = stats.split(',').find_map(|f| f.strip_prefix("calls="))?;
            Some((name.to_string(), calls.parse().ok()?))
        })
        .filter(|(name, _)| name != "info")
        .collect()
}

/// `after − before`, per command and in total.
fn calls_delta(
    before: &BTreeMap<String, u64>,
    after: &BTreeMap<String, u64>,
) -> (BTreeMap<String, u64>, u64) {
    let per: BTreeMap<String, u64> = after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .filter(|(_, d)| *d > 0)
        .collect();
    let total = per.values().sum();
    (per, total)
}

const HYBRID: &str = "mode = \"hybrid\"\non_store_error = \"local\"\nsync_interval = \"50ms\"";

#[test]
fn hybrid_mode_overadmits_no_more_than_the_documented_bound() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let up = Upstream::start();
    let plan = "[plans.default]\nlimits = [{ scope = \"key\", requests = 100, per = \"1m\" }]";
    let body = config_body(&redis.url(), HYBRID, plan, &up, "");
    let a = Gw::start(dir.path(), "a", &body);
    let b = Gw::start(dir.path(), "b", &body);
    let k = create_key(&a.config, "ws_h", None);

    // src/ratelimit/mod.rs: over all instances the count never exceeds
    // `requests` by more than `instances × ⌈exact_threshold × requests⌉`
    // (exact_threshold defaults to 0.8): 2 × 80 = 160.
    let bound = hybrid_overadmission_bound(100, 0.8, 2);
    assert_eq!(bound, 2 * (0.8f64 * 100.0).ceil() as u64);

    let got = burst(&[a.addr, b.addr], &k.secret, 300, 6);
    let ok = count(&got, 200) as u64;
    println!(
        "hybrid, 2 gateways, 300 concurrent requests, limit 100: {ok} admitted, \
         over-admission {} (documented bound {bound})",
        ok.saturating_sub(100)
    );
    assert_eq!(
        count(&got, 200) + count(&got, 429),
        300,
        "only 200/429: {got:?}"
    );
    assert!(ok >= 100, "under-admission: {ok} of limit 100");
    assert!(ok <= 100 + bound, "{ok} admitted: past 100 + {bound}");
    assert_eq!(up.hits() as u64, ok);
}

#[test]
fn hybrid_mode_makes_far_fewer_redis_commands_than_requests_below_the_threshold() {
    let dir = tempfile::tempdir().unwrap();
    let redis = RedisServer::start();
    let up = Upstream::start();
    let plan = "[plans.default]\nlimits = [{ scope = \"key\", requests = 100000, per = \"1m\" }]";
    let body = config_body(&redis.url(), HYBRID, plan, &up, "");
    let a = Gw::start(dir.path(), "a", &body);
    let b = Gw::start(dir.path(), "b", &body);
    let k = create_key(&a.config, "ws_h", None);
    // Warm both key caches (and let their first push land) before measuring.
    assert_eq!(a.get(READ, &k.secret).status, 200);
    assert_eq!(b.get(READ, &k.secret).status, 200);
    std::thread::sleep(Duration::from_millis(200));

    let before = redis_calls(&redis);
    let started = Instant::now();
    let got = burst(&[a.addr, b.addr], &k.secret, 2000, 4);
    let took = started.elapsed();
    // Let the last admits be pushed (they are part of the cost).
    std::thread::sleep(Duration::from_millis(200));
    let (per_command, commands) = calls_delta(&before, &redis_calls(&redis));
    let window = started.elapsed();
    let scripts: u64 = ["evalsha", "eval", "script|load"]
        .iter()
        .filter_map(|c| per_command.get(*c))
        .sum();
    let per_request = commands as f64 / 2000.0;
    println!(
        "hybrid, 2 gateways, 2000 requests in {took:?} below the threshold: \
         {commands} Redis commands ({scripts} script calls), {per_request:.4} per request; \
         {per_command:?}"
    );
    assert_eq!(count(&got, 200), 2000);
    // Below the threshold every decision is local: Redis sees one push per
    // gateway per sync interval at most, however many requests there are.
    let intervals = window.as_millis() as u64 / 50 + 2;
    assert!(
        scripts <= 2 * intervals,
        "{scripts} script calls in {window:?}: more than one push per gateway per 50 ms"
    );
    assert!(
        per_request < 1.0,
        "{commands} Redis commands for 2000 requests ({per_request:.3}/request)"
    );
}

/// Sends requests with `secret` (at most one per 100 ms) until the gateway
/// logs that it left the `on_store_error` fallback; panics after 10 s.
fn wait_for_recovery(gw: &Gw, secret: &str) {
    let start = Instant::now();
    while !gw.log().contains(LOG_FALLBACK_LEFT) {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "no recovery logged within 10 s of Redis restarting:\n{}",
            gw.log()
        );
        let _ = gw.get(READ, secret);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Sends `n` requests and checks each was answered quickly; returns them.
fn hit_timed(gw: &Gw, secret: &str, n: usize) -> Vec<Resp> {
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let r = gw.get(READ, secret);
            assert!(
                t.elapsed() < Duration::from_secs(3),
                "answered only after {:?} while Redis is down",
                t.elapsed()
            );
            r
        })
        .collect()
}

#[test]
fn redis_outage_applies_on_store_error_and_limits_come_back_from_redis() {
    let dir = tempfile::tempdir().unwrap();
    let mut redis = RedisServer::start();
    let up = Upstream::start();
    let gw = |name: &str, on_error: &str| {
        // A generous Redis timeout: under a loaded test run the first call
        // (connect + script load) can take longer than the 100 ms default,
        // and `deny` would turn that into a 429 before the outage starts.
        let rl = format!("mode = \"redis\"\non_store_error = \"{on_error}\"\ntimeout = \"1s\"");
        let body = config_body(&redis.url(), &rl, PLAN_5_PER_MINUTE, &up, "");
        Gw::start(dir.path(), name, &body)
    };
    let (local, deny, allow) = (
        gw("local", "local"),
        gw("deny", "deny"),
        gw("allow", "allow"),
    );
    let gws = [&local, &deny, &allow];
    // One key per gateway, used once while Redis is up (so it is cached:
    // authentication keeps working through the outage).
    let keys: Vec<Key> = gws
        .iter()
        .map(|g| create_key(&g.config, "ws_o", None))
        .collect();
    for (g, k) in gws.iter().zip(&keys) {
        assert_eq!(g.get(READ, &k.secret).status, 200);
    }

    redis.kill9();

    // local: the full limit, counted in this instance alone.
    let got = hit_timed(&local, &keys[0].secret, 8);
    assert!(
        got.iter().all(|r| r.status == 200 || r.status == 429),
        "only 200/429 while Redis is down: {:?}",
        statuses(&got)
    );
    assert_eq!(
        statuses(&got),
        [200, 200, 200, 200, 200, 429, 429, 429],
        "on_store_error = local enforces the limit in process"
    );
    // deny: 429 with Retry-After 1.
    for r in hit_timed(&deny, &keys[1].secret, 3) {
        assert_eq!(r.status, 429, "on_store_error = deny: {r:?}");
        assert_eq!(r.code(), "RATE_LIMITED");
        assert_eq!(r.num("retry-after"), 1);
    }
    // allow: admitted, not counted.
    assert_eq!(
        statuses(&hit_timed(&allow, &keys[2].secret, 7)),
        [200; 7],
        "on_store_error = allow"
    );
    for g in gws {
        assert!(
            g.log().contains(LOG_FALLBACK_ENTERED),
            "the switch to the fallback is logged:\n{}",
            g.log()
        );
    }

    redis.restart();
    for (g, k) in gws.iter().zip(&keys) {
        wait_for_recovery(g, &k.secret);
    }
    // Counters are Redis' again: a fresh key gets exactly its limit across
    // all three gateways (a gateway still on its fallback would admit
    // uncounted, refuse everything, or count alone).
    let fresh = create_key(&local.config, "ws_fresh", None);
    let addrs: Vec<SocketAddr> = gws.iter().map(|g| g.addr).collect();
    let got = burst(&addrs, &fresh.secret, 9, 1);
    assert_eq!(count(&got, 200), 5, "limits from Redis again: {got:?}");
    assert_eq!(count(&got, 429), 4, "{got:?}");
}

#[test]
fn redis_cluster_mode_is_exact_for_key_and_workspace_limits() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = RedisCluster::start();
    let up = Upstream::start();
    let rl = "mode = \"redis\"\non_store_error = \"local\"";
    let plans = format!("{PLAN_5_PER_MINUTE}\n{PLAN_TEAM}");
    let body = config_body(&cluster.url(), rl, &plans, &up, "");
    let a = Gw::start(dir.path(), "a", &body);
    let b = Gw::start(dir.path(), "b", &body);

    let k = create_key(&a.config, "ws_c", None);
    let got = burst(&[a.addr, b.addr], &k.secret, 20, 4);
    println!(
        "redis cluster, 2 gateways, 20 concurrent requests, limit 5: {} admitted",
        count(&got, 200)
    );
    assert_eq!((count(&got, 200), count(&got, 429)), (5, 15), "{got:?}");

    // Key and workspace limits live in different slots: both must hold.
    let t1 = create_key(&a.config, "ws_team", Some("team"));
    let t2 = create_key(&a.config, "ws_team", Some("team"));
    let mut got = burst(&[a.addr, b.addr], &t1.secret, 5, 1);
    got.extend(burst(&[b.addr, a.addr], &t2.secret, 5, 1));
    assert_eq!(
        count(&got, 200),
        8,
        "workspace limit 8 over two keys: {got:?}"
    );
    assert_eq!(up.hits(), 13);
}
