//! Helpers for the fault suite (`tests/faults.rs`): a keyed gateway config
//! with an admin token, an admin API client, process figures read from
//! `/proc` (RSS, CPU time, open file descriptors), signals by pid, and
//! upstreams that misbehave in ways the plain ones in `common` do not
//! (silent, garbage on one connection only, slow with large bodies).

use super::{ReqBody, RespBody, TestClient, TestResponse, bind_loopback, body, empty, full};
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::task::JoinHandle;

/// The admin token of [`keyed_config`].
pub const ADMIN_TOKEN: &str = "fault-suite-admin-token";

/// A gateway config with an admin token and three routes to `upstream`:
/// `GET /v1/sms/{id}` (key with `sms.read`), `POST /v1/sms/send` (key with
/// `sms.send`) and `/v1/open/*rest` (no key). `store` is the `[store]`
/// body (e.g. `url = "redis://…"\ntimeout = "300ms"`); `extra` any further
/// tables (`[cache]`, `[rate_limit]`, `[plans.default]` …); `upstream_extra`
/// keys of `[upstreams.sms]` (timeouts).
pub fn keyed_config(
    server_extra: &str,
    store: &str,
    extra: &str,
    upstream: &str,
    upstream_extra: &str,
) -> String {
    format!(
        r#"{server}
[admin]
listen = "127.0.0.1:0"
token = "{ADMIN_TOKEN}"

[store]
{store}

{extra}

[upstreams.sms]
targets = ["{upstream}"]
{upstream_extra}

[[routes]]
name = "sms.read"
methods = ["GET"]
path = "/v1/sms/{{id}}"
upstream = "sms"
permissions = ["sms.read"]

[[routes]]
name = "sms.send"
methods = ["POST"]
path = "/v1/sms/send"
upstream = "sms"
permissions = ["sms.send"]

[[routes]]
name = "open"
path = "/v1/open/*rest"
upstream = "sms"
auth = "none"
"#,
        server = super::gateway_toml(None, server_extra)
    )
}

/// `Bearer <secret>`.
pub fn bearer(secret: &str) -> String {
    format!("Bearer {secret}")
}

/// A client of one gateway's admin API (token [`ADMIN_TOKEN`]).
pub struct Admin {
    client: TestClient,
    base: String,
}

impl Admin {
    /// For the admin listener at `addr`.
    pub fn new(addr: SocketAddr) -> Self {
        Admin {
            client: TestClient::h1(None),
            base: format!("http://{addr}"),
        }
    }

    /// `method path` with an optional JSON body.
    pub async fn call(
        &self,
        method: &str,
        path: &str,
        json: Option<serde_json::Value>,
    ) -> TestResponse {
        let b = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("authorization", bearer(ADMIN_TOKEN));
        let req = match json {
            Some(v) => b
                .header("content-type", "application/json")
                .body(body(v.to_string())),
            None => b.body(empty()),
        };
        self.client.send(req.expect("admin request")).await
    }

    /// `POST /admin/v1/keys`.
    pub async fn create(&self, json: serde_json::Value) -> TestResponse {
        self.call("POST", "/admin/v1/keys", Some(json)).await
    }

    /// Creates a key in `workspace` holding `perms`; panics unless 201.
    /// Returns `(id, secret)`.
    pub async fn create_key(&self, workspace: &str, perms: &[&str]) -> (String, String) {
        let r = self
            .create(serde_json::json!({ "workspace": workspace, "permissions": perms }))
            .await;
        assert_eq!(r.status, 201, "create a key: {}", r.text());
        let v = r.json();
        let field = |f: &str| {
            v[f].as_str()
                .unwrap_or_else(|| panic!("no {f} in {v}"))
                .to_string()
        };
        (field("id"), field("secret"))
    }

    /// `DELETE /admin/v1/keys/{id}`.
    pub async fn revoke(&self, id: &str) -> TestResponse {
        self.call("DELETE", &format!("/admin/v1/keys/{id}"), None)
            .await
    }
}

/// A POST with a body and headers, ready for [`TestClient::send`].
pub fn post_with(url: &str, headers: &[(&str, &str)], b: impl Into<Bytes>) -> Request<ReqBody> {
    let mut r = Request::post(url);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(body(b)).expect("request")
}

// ─────────────────────────── processes and /proc ───────────────────────────

/// The pid of a running `redis-server`, from `INFO server`.
pub fn redis_pid(redis: &super::redis::RedisServer) -> u32 {
    let info = redis
        .command(&["INFO", "server"])
        .expect("INFO server answered");
    info.lines()
        .find_map(|l| l.strip_prefix("process_id:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no process_id in INFO server:\n{info}"))
}

/// Sends `sig` (`"STOP"`, `"CONT"`, `"TERM"` …) to `pid` with `kill(1)`.
pub fn signal_pid(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .is_ok_and(|s| s.success());
    assert!(ok, "kill -{sig} {pid} failed");
}

/// Resident memory of `pid` in KiB (`VmRSS` of `/proc/PID/status`).
pub fn rss_kib(pid: u32) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("read /proc/PID/status");
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in /proc/{pid}/status"))
}

/// CPU time `pid` has used (user + system), from `/proc/PID/stat`.
pub fn cpu_time(pid: u32) -> Duration {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("read /proc/PID/stat");
    // Fields after the command name (which may hold spaces) start at state.
    let rest = &s[s.rfind(')').expect("comm in /proc/PID/stat") + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the whole line: 12 and 13 here.
    let ticks: u64 = f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime");
    Duration::from_millis(ticks * 1000 / clock_ticks())
}

/// `sysconf(_SC_CLK_TCK)`, via `getconf` (100 on Linux unless told otherwise).
fn clock_ticks() -> u64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .filter(|&t| t > 0)
        .unwrap_or(100)
}

/// Open file descriptors of `pid` (`None`: this process).
pub fn open_fds(pid: Option<u32>) -> usize {
    let dir = match pid {
        Some(p) => format!("/proc/{p}/fd"),
        None => "/proc/self/fd".to_string(),
    };
    std::fs::read_dir(dir)
        .expect("list the fd directory")
        .count()
}

// ──────────────────────────────── upstreams ────────────────────────────────

/// An upstream that accepts connections and reads what comes, but never
/// answers (a stopped service). Counts connections and request lines
/// starting with `GET ` or `POST `; holds every connection open until dropped.
pub struct SilentUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SilentUpstream {
    /// Starts it.
    pub async fn start() -> Self {
        let (listener, addr) = bind_loopback().await;
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                held.spawn(async move {
                    let mut seen = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => seen.extend_from_slice(&buf[..n]),
                        }
                        r.fetch_add(count_request_lines(&seen), Ordering::SeqCst);
                        // Counted: keep only an unfinished line's start.
                        let keep = seen.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
                        seen.drain(..keep);
                    }
                });
            }
        });
        SilentUpstream {
            addr,
            requests,
            connections,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Request lines received (`GET …` or `POST …`).
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for SilentUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Complete lines of `bytes` that start a GET or POST request.
fn count_request_lines(bytes: &[u8]) -> usize {
    let end = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    bytes[..end]
        .split(|&b| b == b'\n')
        .filter(|l| l.starts_with(b"GET /") || l.starts_with(b"POST /"))
        .count()
}

/// An upstream whose first connection answers every request with
/// `garbage` and stays open, while every later connection answers
/// `200 ok` (keep-alive) to each request: a gateway that pooled the bad
/// connection would keep getting garbage.
pub struct GarbageOnceUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    connections: Arc<AtomicUsize>,
    good: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl GarbageOnceUpstream {
    /// Starts it.
    pub async fn start(garbage: &'static [u8]) -> Self {
        let (listener, addr) = bind_loopback().await;
        let connections = Arc::new(AtomicUsize::new(0));
        let good = Arc::new(AtomicUsize::new(0));
        let (c, g) = (connections.clone(), good.clone());
        let task = tokio::spawn(async move {
            let mut held = tokio::task::JoinSet::new();
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                let first = c.fetch_add(1, Ordering::SeqCst) == 0;
                let g = g.clone();
                held.spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    loop {
                        // The gateway's requests here have no body.
                        while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                            head.drain(..end + 4);
                            let reply: &[u8] = if first {
                                garbage
                            } else {
                                g.fetch_add(1, Ordering::SeqCst);
                                b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                            };
                            if tcp.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                });
            }
        });
        GarbageOnceUpstream {
            addr,
            connections,
            good,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }

    /// Valid answers given (on the later connections).
    pub fn good_answers(&self) -> usize {
        self.good.load(Ordering::SeqCst)
    }
}

impl Drop for GarbageOnceUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that reads the whole request, counts it, waits `delay`,
/// then answers `200` with the request body echoed, or with
/// [`DelayedEchoUpstream::body_for_get`] when the request had none: large
/// answers, so that a cut one shows.
pub struct DelayedEchoUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    arrived: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl DelayedEchoUpstream {
    /// Starts it.
    pub async fn start(delay: Duration) -> Self {
        let (listener, addr) = bind_loopback().await;
        let arrived = Arc::new(AtomicUsize::new(0));
        let a = arrived.clone();
        let task = super::serve_hyper(
            listener,
            Arc::new(std::sync::atomic::AtomicU64::new(0)),
            move |req: Request<Incoming>, _conn| {
                let a = a.clone();
                async move {
                    let got = req
                        .into_body()
                        .collect()
                        .await
                        .map(|b| b.to_bytes())
                        .unwrap_or_default();
                    a.fetch_add(1, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    let answer = if got.is_empty() {
                        Self::body_for_get()
                    } else {
                        got
                    };
                    Response::new(full(answer)) as Response<RespBody>
                }
            },
        );
        DelayedEchoUpstream {
            addr,
            arrived,
            task,
        }
    }

    /// What a request without a body gets: 256 KiB of a known pattern.
    pub fn body_for_get() -> Bytes {
        Bytes::from(
            (0..256 * 1024)
                .map(|i| b"0123456789abcdef"[i % 16])
                .collect::<Vec<u8>>(),
        )
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received whole (before the delay).
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }
}

impl Drop for DelayedEchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
