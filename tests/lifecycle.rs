//! Key lifecycle through the real binary: the admin API (every endpoint,
//! status and validation error), two gateway processes sharing one Redis
//! (patch, rotation and revocation reach the other instance within a
//! second, also after a Redis restart), durability of admin writes on Redis
//! (AOF, `kill -9`) and SQLite (`kill -9` of the gateway), self-service
//! isolation, and the audit log.
//!
//! Everything runs as real processes on loopback: `redis-server` (must be on
//! PATH — the tests panic rather than skip without it), the binary's hidden
//! `example-upstream` service, and `portcullis serve --config FILE`.

use serde_json::{Value, json};
use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const TOKEN: &str = "lifecycle-admin-token";
const BIN: &str = env!("CARGO_BIN_EXE_portcullis");
/// How long a process may take to become ready.
const READY: Duration = Duration::from_secs(30);

// ---------------------------------------------------------------- processes

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .expect("bind an ephemeral port")
        .local_addr()
        .expect("addr")
        .port()
}

/// A child process killed (SIGKILL) and reaped on drop.
struct Proc(Option<Child>);

impl Proc {
    fn kill9(&mut self) {
        if let Some(mut c) = self.0.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn exited(&mut self) -> bool {
        self.0
            .as_mut()
            .is_none_or(|c| matches!(c.try_wait(), Ok(Some(_))))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// A real redis-server with AOF (`appendfsync always`) in its own dir.
struct Redis {
    port: u16,
    dir: tempfile::TempDir,
    proc: Proc,
}

impl Redis {
    fn start() -> Redis {
        let ok = Command::new("redis-server")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        assert!(
            ok,
            "redis-server not found on PATH: these tests need a real Redis (apt-get install -y redis-server)"
        );
        let mut r = Redis {
            port: free_port(),
            dir: tempfile::tempdir().expect("tempdir"),
            proc: Proc(None),
        };
        r.spawn();
        r
    }

    /// (Re)starts the server on the same port and dir; returns once it answers PING.
    fn spawn(&mut self) {
        let log = File::create(self.dir.path().join("redis.log")).expect("redis log");
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes",
            ])
            .args(["--appendfsync", "always", "--daemonize", "no", "--dir"])
            .arg(self.dir.path())
            .stdout(Stdio::from(log))
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.proc = Proc(Some(child));
        let end = Instant::now() + READY;
        while Instant::now() < end {
            assert!(
                !self.proc.exited(),
                "redis-server exited at start; see {}",
                self.dir.path().join("redis.log").display()
            );
            if self.ping() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} never answered PING", self.port);
    }

    fn ping(&self) -> bool {
        let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        if s.write_all(b"PING\r\n").is_err() {
            return false;
        }
        let mut buf = [0u8; 64];
        matches!(s.read(&mut buf), Ok(n) if buf[..n].starts_with(b"+PONG"))
    }

    fn kill9(&mut self) {
        self.proc.kill9();
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }
}

/// The binary's example upstream (answers every path with a JSON echo).
struct Upstream {
    port: u16,
    _proc: Proc,
}

impl Upstream {
    fn start() -> Upstream {
        let port = free_port();
        let child = Command::new(BIN)
            .args([
                "example-upstream",
                "--listen",
                &format!("127.0.0.1:{port}"),
                "--name",
                "sms",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn example-upstream");
        let mut proc = Proc(Some(child));
        let end = Instant::now() + READY;
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                !proc.exited() && Instant::now() < end,
                "example upstream did not start on port {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Upstream { port, _proc: proc }
    }
}

/// A `portcullis serve` process with its config and log in `dir`.
struct Gateway {
    port: u16,
    admin: u16,
    cfg: PathBuf,
    log: PathBuf,
    proc: Proc,
}

fn config_text(port: u16, admin: u16, store_url: &str, upstream: u16) -> String {
    format!(
        r#"[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin}"
token = "${{PORTCULLIS_ADMIN_TOKEN}}"
[store]
url = "{store_url}"
[cache]
ttl = "60s"
[self_service]
enabled = true
[upstreams.sms]
targets = ["http://127.0.0.1:{upstream}"]
[[routes]]
name = "sms.read"
methods = ["GET"]
path = "/v1/sms/{{id}}"
upstream = "sms"
permissions = ["sms.read"]
[[routes]]
name = "balance"
methods = ["GET"]
path = "/v1/balance"
upstream = "sms"
permissions = ["balance.read"]
"#
    )
}

impl Gateway {
    fn start(dir: &Path, name: &str, store_url: &str, upstream: &Upstream) -> Gateway {
        let (port, admin) = (free_port(), free_port());
        let cfg = dir.join(format!("{name}.toml"));
        std::fs::write(&cfg, config_text(port, admin, store_url, upstream.port))
            .expect("write config");
        let mut g = Gateway {
            port,
            admin,
            cfg,
            log: dir.join(format!("{name}.log")),
            proc: Proc(None),
        };
        g.spawn();
        g
    }

    /// Starts the process (again) and waits for the admin `/healthz`.
    fn spawn(&mut self) {
        let log = File::options()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("gateway log");
        let err = log.try_clone().expect("clone log");
        let child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(&self.cfg)
            .env("PORTCULLIS_ADMIN_TOKEN", TOKEN)
            .env_remove("RUST_LOG")
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err))
            .spawn()
            .expect("spawn portcullis serve");
        self.proc = Proc(Some(child));
        let end = Instant::now() + READY;
        loop {
            assert!(
                !self.proc.exited(),
                "the gateway exited at start:\n{}",
                self.log_text()
            );
            if http(self.admin, "GET", "/healthz", &[], None).is_ok_and(|r| r.status == 200) {
                return;
            }
            assert!(
                Instant::now() < end,
                "the gateway never answered /healthz:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    fn kill9(&mut self) {
        self.proc.kill9();
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// An admin call with the token.
    fn admin(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let b = body.map(|v| v.to_string());
        admin_raw(
            self.admin,
            method,
            path,
            Some(TOKEN),
            b.as_deref().map(str::as_bytes),
        )
    }

    fn create(&self, body: Value) -> Value {
        let r = self.admin("POST", "/admin/v1/keys", Some(body));
        assert_eq!(r.status, 201, "create: {}", r.text());
        r.json()
    }

    /// Status of `GET path` on the public listener with a key.
    fn call(&self, path: &str, secret: &str) -> u16 {
        let auth = format!("Bearer {secret}");
        http(self.port, "GET", path, &[("Authorization", &auth)], None)
            .map(|r| r.status)
            .unwrap_or(0)
    }

    /// Every id of a workspace, walking the pages.
    fn list_all(&self, workspace: &str, limit: usize) -> Result<Vec<String>, String> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..1000 {
            let mut q = format!("/admin/v1/keys?workspace={workspace}&limit={limit}");
            if let Some(c) = &cursor {
                q.push_str(&format!("&cursor={c}"));
            }
            let r =
                admin_try(self.admin, "GET", &q, Some(TOKEN), None).map_err(|e| e.to_string())?;
            if r.status != 200 {
                return Err(format!("{} {}", r.status, r.text()));
            }
            let j = r.json();
            ids.extend(
                j["data"]
                    .as_array()
                    .expect("data")
                    .iter()
                    .map(|k| k["id"].as_str().expect("id").to_string()),
            );
            match j["next_cursor"].as_str() {
                Some(c) => cursor = Some(c.to_string()),
                None => return Ok(ids),
            }
        }
        Err("pagination never ended".into())
    }
}

// ---------------------------------------------------------------- HTTP client

/// A response: status, headers (lower-case names), body.
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// `error.code` of an error body.
    fn code(&self) -> String {
        self.json()["error"]["code"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }

    /// `error.message` of an error body.
    fn message(&self) -> String {
        self.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string()
    }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size = std::str::from_utf8(&b[..eol])
            .ok()
            .and_then(|s| usize::from_str_radix(s.split(';').next()?.trim(), 16).ok());
        let Some(size) = size else { return out };
        if size == 0 || b.len() < eol + 2 + size {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[(eol + 4 + size).min(b.len())..];
    }
}

fn parse_response(raw: &[u8]) -> std::io::Result<Resp> {
    let bad = || std::io::Error::new(std::io::ErrorKind::InvalidData, "malformed HTTP response");
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(bad)?;
    let head = std::str::from_utf8(&raw[..end]).map_err(|_| bad())?;
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(bad)?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let rest = &raw[end + 4..];
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    let body = if chunked {
        dechunk(rest)
    } else {
        let len = headers
            .iter()
            .find(|(k, _)| k == "content-length")
            .and_then(|(_, v)| v.parse().ok());
        rest[..len.unwrap_or(rest.len()).min(rest.len())].to_vec()
    };
    Ok(Resp {
        status,
        headers,
        body,
    })
}

/// One request on a fresh connection (`Connection: close`).
fn http(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(15)))?;
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if let Some(b) = body {
        req.push_str(&format!("Content-Length: {}\r\n", b.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    s.write_all(&bytes)?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    parse_response(&raw)
}

fn admin_try(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> std::io::Result<Resp> {
    let auth = token.map(|t| format!("Bearer {t}"));
    let mut h: Vec<(&str, &str)> = Vec::new();
    if let Some(a) = &auth {
        h.push(("Authorization", a));
    }
    if body.is_some() {
        h.push(("Content-Type", "application/json"));
    }
    http(port, method, path, &h, body)
}

fn admin_raw(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&[u8]>,
) -> Resp {
    admin_try(port, method, path, token, body)
        .unwrap_or_else(|e| panic!("{method} {path} on the admin port: {e}"))
}

/// Polls `GET path` with a key until it answers `want`; the time taken.
fn wait_status(
    g: &Gateway,
    path: &str,
    secret: &str,
    want: u16,
    limit: Duration,
) -> Option<Duration> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if g.call(path, secret) == want {
            return Some(t0.elapsed());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    None
}

/// Returns once `b` hears key changes published through `a`: `/healthz`
/// answers before the key-change subscription is up, and a subscription
/// that completes late flushes the cache, which would blur what a test
/// measures. A probe key is cached on `b`, patched through `a`, and `b`
/// must see the patch (its cache TTL is 60 s, so only an invalidation can
/// make it).
fn wait_until_subscribed(a: &Gateway, b: &Gateway) {
    let k = a.create(json!({"workspace": "ws_probe", "permissions": ["sms.read"]}));
    let (id, secret) = (s(&k, "id"), s(&k, "secret"));
    assert_eq!(b.call("/v1/balance", &secret), 403);
    let r = a.admin(
        "PATCH",
        &format!("/admin/v1/keys/{id}"),
        Some(json!({"permissions": ["sms.read", "balance.read"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    wait_status(b, "/v1/balance", &secret, 200, Duration::from_secs(10))
        .expect("the other instance never heard a key change");
    assert_eq!(
        a.admin("DELETE", &format!("/admin/v1/keys/{id}"), None)
            .status,
        204
    );
}

/// `portcullis_key_cache_hits_total` of a gateway.
fn cache_hits(g: &Gateway) -> f64 {
    let text = g.admin("GET", "/metrics", None).text();
    text.lines()
        .find_map(|l| l.strip_prefix("portcullis_key_cache_hits_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no cache hit counter in /metrics:\n{text}"))
}

fn s(v: &Value, field: &str) -> String {
    v[field]
        .as_str()
        .unwrap_or_else(|| panic!("no string {field} in {v}"))
        .to_string()
}

// ---------------------------------------------------------------- tests

#[test]
fn admin_api_endpoints_statuses_and_validation() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start();
    let up = Upstream::start();
    let g = Gateway::start(dir.path(), "a", &redis.url(), &up);

    // probes without a token
    let r = http(g.admin, "GET", "/healthz", &[], None).expect("healthz");
    assert_eq!((r.status, r.json()["status"].as_str()), (200, Some("ok")));
    let r = http(g.admin, "GET", "/readyz", &[], None).expect("readyz");
    assert_eq!(r.status, 200, "{}", r.text());

    // token checks: none, wrong; the request id is echoed in header and body
    let body = json!({"workspace": "ws_admin", "permissions": ["sms.read"]}).to_string();
    let r = admin_raw(
        g.admin,
        "POST",
        "/admin/v1/keys",
        None,
        Some(body.as_bytes()),
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "ADMIN_UNAUTHORIZED"),
        "{}",
        r.text()
    );
    let rid = r.header("x-request-id").expect("x-request-id").to_string();
    assert_eq!(r.json()["error"]["request_id"].as_str(), Some(rid.as_str()));
    let r = admin_raw(
        g.admin,
        "POST",
        "/admin/v1/keys",
        Some("wrong-token"),
        Some(body.as_bytes()),
    );
    assert_eq!(r.status, 401, "{}", r.text());
    let r = admin_raw(g.admin, "GET", "/metrics", Some(&format!("{TOKEN}x")), None);
    assert_eq!(r.status, 401);
    let r = admin_raw(
        g.admin,
        "GET",
        "/admin/v1/keys?workspace=ws_admin",
        None,
        None,
    );
    assert_eq!(r.status, 401);

    // create
    let r = g.admin(
        "POST",
        "/admin/v1/keys",
        Some(json!({"workspace": "ws_admin", "name": "first", "permissions": ["sms.read"]})),
    );
    assert_eq!(r.status, 201, "{}", r.text());
    assert!(r.header("x-request-id").is_some());
    let k = r.json();
    let (id, secret) = (s(&k, "id"), s(&k, "secret"));
    assert!(
        id.starts_with("key_") && secret.starts_with("sk_live_"),
        "{k}"
    );
    assert_eq!(k["workspace"], "ws_admin");
    assert_eq!(k["last4"].as_str(), Some(&secret[secret.len() - 4..]));
    assert!(k.get("digest").is_none());
    assert_eq!(g.call("/v1/sms/1", &secret), 200);

    // validation: 400 naming the field, nothing written
    let count = || g.list_all("ws_admin", 500).expect("list").len();
    let before = count();
    let past = "2001-01-01T00:00:00Z";
    let cases: Vec<(Value, &str)> = vec![
        (json!({"name": "no workspace"}), "workspace"),
        (json!({"workspace": "  "}), "workspace"),
        (
            json!({"workspace": "ws_admin", "allowed_ips": ["10.0.0.0/33"]}),
            "allowed_ips",
        ),
        (json!({"workspace": "ws_admin", "kind": "platinum"}), "kind"),
        (
            json!({"workspace": "ws_admin", "environment": "staging"}),
            "environment",
        ),
        (
            json!({"workspace": "ws_admin", "expires_at": past}),
            "expires_at",
        ),
        (
            json!({"workspace": "ws_admin", "expires_in": "soon"}),
            "expires_in",
        ),
        (
            json!({"workspace": "ws_admin", "permissions": ["sms..send"]}),
            "permissions",
        ),
        (
            json!({"workspace": "ws_admin", "permissions": ["sms send"]}),
            "permissions",
        ),
        (
            json!({"workspace": "ws_admin", "permissions": "sms.read"}),
            "permissions",
        ),
        (json!({"workspace": "ws_admin", "plan": "nope"}), "plan"),
        (
            json!({"workspace": "ws_admin", "allowed_origins": ["http://exa mple.com"]}),
            "allowed_origins",
        ),
        (
            json!({"workspace": "ws_admin", "metadata": [1, 2]}),
            "metadata",
        ),
        (json!({"workspace": "ws_admin", "colour": "red"}), "colour"),
    ];
    for (body, field) in &cases {
        let r = g.admin("POST", "/admin/v1/keys", Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert_eq!(r.code(), "BAD_REQUEST", "{body}");
        assert!(
            r.message().contains(field),
            "{body}: message {:?} does not name {field}",
            r.message()
        );
    }
    for raw in [&b"{not json"[..], b"[1,2]", b"", b"\"str\""] {
        let r = admin_raw(g.admin, "POST", "/admin/v1/keys", Some(TOKEN), Some(raw));
        assert_eq!(
            (r.status, r.code().as_str()),
            (400, "BAD_REQUEST"),
            "{:?}: {}",
            String::from_utf8_lossy(raw),
            r.text()
        );
    }
    // oversized body: 413 on the declared length, without reading it
    {
        let mut sock = TcpStream::connect(("127.0.0.1", g.admin)).expect("connect");
        sock.set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let head = format!(
            "POST /admin/v1/keys HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
            200 * 1024
        );
        sock.write_all(head.as_bytes()).expect("write");
        let mut raw = Vec::new();
        let _ = sock.read_to_end(&mut raw);
        let r = parse_response(&raw).expect("413 response");
        assert_eq!(
            (r.status, r.code().as_str()),
            (413, "PAYLOAD_TOO_LARGE"),
            "{}",
            r.text()
        );
    }
    // a body just over 64 KiB that is sent in full is refused too
    let big = json!({"workspace": "ws_admin", "name": "x".repeat(70 * 1024)}).to_string();
    let r = admin_raw(
        g.admin,
        "POST",
        "/admin/v1/keys",
        Some(TOKEN),
        Some(big.as_bytes()),
    );
    assert_eq!(r.status, 413, "{}", r.text());
    assert_eq!(count(), before, "a refused create wrote something");

    // list: no secret, no digest
    let r = g.admin("GET", "/admin/v1/keys?workspace=ws_admin", None);
    assert_eq!(r.status, 200);
    assert!(!r.text().contains(&secret), "a listing shows a secret");
    let j = r.json();
    assert!(j.get("next_cursor").is_some(), "{j}");
    for rec in j["data"].as_array().expect("data") {
        for f in ["secret", "digest", "hash", "secret_hash", "key_hash"] {
            assert!(rec.get(f).is_none(), "listing carries {f}: {rec}");
        }
        assert_eq!(rec["workspace"], "ws_admin");
    }
    for bad in ["limit=0", "limit=501", "limit=ten", "limit=-1"] {
        let r = g.admin(
            "GET",
            &format!("/admin/v1/keys?workspace=ws_admin&{bad}"),
            None,
        );
        assert_eq!(r.status, 400, "{bad}");
        assert!(r.message().contains("limit"), "{bad}: {}", r.message());
    }
    let r = g.admin("GET", "/admin/v1/keys?workspce=ws_admin", None);
    assert_eq!(r.status, 400, "a misspelt filter must not list everything");

    // cursor pagination: 5 keys, pages of 2
    let mut made: Vec<String> = (0..5)
        .map(|i| {
            s(
                &g.create(json!({"workspace": "ws_page", "name": format!("p{i}")})),
                "id",
            )
        })
        .collect();
    let mut seen = Vec::new();
    let mut cursor: Option<String> = None;
    let mut pages = 0;
    loop {
        let q = match &cursor {
            None => "/admin/v1/keys?workspace=ws_page&limit=2".to_string(),
            Some(c) => format!("/admin/v1/keys?workspace=ws_page&limit=2&cursor={c}"),
        };
        let j = g.admin("GET", &q, None).json();
        let page = j["data"].as_array().expect("data");
        assert!(page.len() <= 2);
        seen.extend(page.iter().map(|k| s(k, "id")));
        pages += 1;
        assert!(pages <= 4, "pagination does not end");
        match j["next_cursor"].as_str() {
            Some(c) => cursor = Some(c.to_string()),
            None => break,
        }
    }
    assert_eq!(pages, 3, "5 keys in pages of 2");
    made.sort();
    assert_eq!(seen, made, "every key once, in id order");

    // get, unknown id
    let r = g.admin("GET", &format!("/admin/v1/keys/{id}"), None);
    assert_eq!(
        (r.status, r.json()["id"].as_str()),
        (200, Some(id.as_str()))
    );
    assert!(r.json().get("secret").is_none());
    for unknown in ["key_doesnotexist", "key_%2e%2e", "..", "key_"] {
        let r = g.admin("GET", &format!("/admin/v1/keys/{unknown}"), None);
        assert_eq!(
            (r.status, r.code().as_str()),
            (404, "NOT_FOUND"),
            "{unknown}"
        );
    }
    for (method, path) in [
        ("PATCH", "/admin/v1/keys/key_nope"),
        ("DELETE", "/admin/v1/keys/key_nope"),
        ("POST", "/admin/v1/keys/key_nope/rotate"),
    ] {
        let body = (method != "DELETE").then(|| json!({}));
        let r = g.admin(method, path, body);
        assert_eq!(r.status, 404, "{method} {path}: {}", r.text());
    }

    // patch: name + disable, then enable; bad values are 400 and change nothing
    let r = g.admin(
        "PATCH",
        &format!("/admin/v1/keys/{id}"),
        Some(json!({"name": "renamed", "status": "disabled"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        (r.json()["name"].as_str(), r.json()["status"].as_str()),
        (Some("renamed"), Some("disabled"))
    );
    assert!(r.json().get("secret").is_none());
    let auth = format!("Bearer {secret}");
    let r = http(
        g.port,
        "GET",
        "/v1/sms/1",
        &[("Authorization", &auth)],
        None,
    )
    .expect("call");
    assert_eq!(
        (r.status, r.code().as_str()),
        (401, "API_KEY_INACTIVE"),
        "a patch applies at once on the same instance"
    );
    for (body, field) in [
        (json!({"status": "paused"}), "status"),
        (json!({"permissions": ["bad perm"]}), "permissions"),
        (json!({"allowed_ips": ["nope"]}), "allowed_ips"),
        (json!({"expires_at": past}), "expires_at"),
        (json!({"workspace": "other"}), "workspace"),
    ] {
        let r = g.admin("PATCH", &format!("/admin/v1/keys/{id}"), Some(body.clone()));
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        assert!(r.message().contains(field), "{body}: {}", r.message());
    }
    let r = g.admin(
        "PATCH",
        &format!("/admin/v1/keys/{id}"),
        Some(json!({"status": "active", "plan": null, "metadata": {"team": "x"}})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(
        g.admin("GET", &format!("/admin/v1/keys/{id}"), None).json()["status"],
        "active"
    );
    assert_eq!(g.call("/v1/sms/1", &secret), 200);

    // rotate: same id, new secret; the old one stops at once; bad grace is 400
    let r = g.admin(
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        Some(json!({"grace": "forever"})),
    );
    assert_eq!(r.status, 400);
    assert!(r.message().contains("grace"));
    let r = g.admin(
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        Some(json!({"grace": "0s"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let new_secret = s(&r.json(), "secret");
    assert_eq!(s(&r.json(), "id"), id);
    assert_ne!(new_secret, secret);
    assert_eq!(g.call("/v1/sms/1", &secret), 401);
    assert_eq!(g.call("/v1/sms/1", &new_secret), 200);
    // rotation without a body; with a grace period the previous secret keeps working
    let r = admin_raw(
        g.admin,
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        Some(TOKEN),
        None,
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let third = s(&r.json(), "secret");
    let r = g.admin(
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        Some(json!({"grace": "1h"})),
    );
    let fourth = s(&r.json(), "secret");
    assert_eq!(
        g.call("/v1/sms/1", &third),
        200,
        "old secret within its grace period"
    );
    assert_eq!(g.call("/v1/sms/1", &fourth), 200);

    // revoke: 204, then gone everywhere
    let r = g.admin("DELETE", &format!("/admin/v1/keys/{id}"), None);
    assert_eq!((r.status, r.body.len()), (204, 0));
    assert_eq!(g.call("/v1/sms/1", &fourth), 401);
    assert_eq!(
        g.call("/v1/sms/1", &third),
        401,
        "revocation ends the grace period too"
    );
    assert_eq!(
        g.admin("GET", &format!("/admin/v1/keys/{id}"), None).status,
        404
    );
    assert_eq!(
        g.admin("DELETE", &format!("/admin/v1/keys/{id}"), None)
            .status,
        404
    );

    // routing: 404 JSON, 405 with Allow
    let r = g.admin("GET", "/admin/v1/nothing", None);
    assert_eq!((r.status, r.code().as_str()), (404, "NOT_FOUND"));
    let r = g.admin("PUT", "/admin/v1/keys", None);
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, POST")));
    let r = g.admin(
        "POST",
        &format!("/admin/v1/keys/{}", made[0]),
        Some(json!({})),
    );
    assert_eq!(
        (r.status, r.header("allow")),
        (405, Some("GET, PATCH, DELETE"))
    );
    let r = g.admin("GET", &format!("/admin/v1/keys/{}/rotate", made[0]), None);
    assert_eq!((r.status, r.header("allow")), (405, Some("POST")));

    // metrics
    let r = g.admin("GET", "/metrics", None);
    assert_eq!(r.status, 200);
    assert!(
        r.text().contains("# TYPE") && r.text().contains("portcullis_"),
        "{}",
        r.text()
    );
    assert!(
        r.header("content-type")
            .is_some_and(|c| c.contains("openmetrics") || c.starts_with("text/plain"))
    );

    // the admin API is not served on the public listener
    let auth = format!("Bearer {TOKEN}");
    let r = http(
        g.port,
        "GET",
        "/admin/v1/keys",
        &[("Authorization", &auth)],
        None,
    )
    .expect("public");
    assert!(matches!(r.status, 401 | 404), "{}", r.status);
    assert!(!r.text().contains("key_"), "{}", r.text());
    let r = http(g.port, "GET", "/metrics", &[], None).expect("public");
    assert_eq!(r.status, 404);

    // audit: one line per write, with the key id and never a secret
    let log = g.log_text();
    let audit: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("portcullis::audit"))
        .collect();
    let for_key = |action: &str| {
        audit
            .iter()
            .filter(|l| l.contains(&id) && l.contains(&format!("action=\"{action}\"")))
            .count()
    };
    assert_eq!(for_key("create"), 1, "{audit:#?}");
    assert_eq!(for_key("patch"), 2, "{audit:#?}");
    assert_eq!(for_key("rotate"), 3, "{audit:#?}");
    assert_eq!(for_key("revoke"), 1, "{audit:#?}");
    assert_eq!(
        audit.len(),
        1 + 5 + 2 + 3 + 1,
        "exactly one audit line per successful write: {audit:#?}"
    );
    for sec in [&secret, &new_secret, &third, &fourth] {
        assert!(!log.contains(sec.as_str()), "a secret reached the log");
    }
}

#[test]
fn two_instances_see_patch_rotate_and_revoke_within_a_second() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start();
    let up = Upstream::start();
    let a = Gateway::start(dir.path(), "a", &redis.url(), &up);
    let b = Gateway::start(dir.path(), "b", &redis.url(), &up);
    wait_until_subscribed(&a, &b);
    wait_until_subscribed(&b, &a);
    let limit = Duration::from_secs(1);

    // patch: a permission added through A takes effect on B
    let k = a.create(json!({"workspace": "ws_two", "permissions": ["sms.read"]}));
    let (id, secret) = (s(&k, "id"), s(&k, "secret"));
    for g in [&a, &b] {
        assert_eq!(g.call("/v1/sms/1", &secret), 200);
        assert_eq!(g.call("/v1/balance", &secret), 403);
    }
    let r = a.admin(
        "PATCH",
        &format!("/admin/v1/keys/{id}"),
        Some(json!({"permissions": ["sms.read", "balance.read"]})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let t = wait_status(&b, "/v1/balance", &secret, 200, Duration::from_secs(3))
        .expect("patch never reached B");
    println!("patch reached the other instance in {} ms", t.as_millis());
    assert!(t <= limit, "patch took {t:?} to reach B");

    // rotate: old secret refused on both, new accepted on both, same id
    for g in [&a, &b] {
        assert_eq!(g.call("/v1/sms/1", &secret), 200);
    }
    let r = a.admin(
        "POST",
        &format!("/admin/v1/keys/{id}/rotate"),
        Some(json!({"grace": "0s"})),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(s(&r.json(), "id"), id);
    let new = s(&r.json(), "secret");
    let t = wait_status(&b, "/v1/sms/1", &secret, 401, Duration::from_secs(3))
        .expect("rotation never reached B");
    println!(
        "rotation reached the other instance in {} ms",
        t.as_millis()
    );
    assert!(t <= limit, "rotation took {t:?} to reach B");
    assert_eq!(a.call("/v1/sms/1", &secret), 401);
    for g in [&a, &b] {
        assert_eq!(g.call("/v1/sms/1", &new), 200);
    }

    // revoke through A: B refuses within a second
    let k = a.create(json!({"workspace": "ws_two", "permissions": ["sms.read"]}));
    let (rid, rsecret) = (s(&k, "id"), s(&k, "secret"));
    for g in [&a, &b] {
        assert_eq!(g.call("/v1/sms/1", &rsecret), 200, "warm the cache");
    }
    let hits = cache_hits(&b);
    assert_eq!(b.call("/v1/sms/1", &rsecret), 200);
    assert!(
        cache_hits(&b) > hits,
        "B answers the key from its cache (so only an invalidation can stop it)"
    );
    let r = a.admin("DELETE", &format!("/admin/v1/keys/{rid}"), None);
    assert_eq!(r.status, 204);
    let t = wait_status(&b, "/v1/sms/1", &rsecret, 401, Duration::from_secs(3))
        .expect("revocation never reached B");
    println!(
        "revocation reached the other instance in {} ms",
        t.as_millis()
    );
    assert!(t <= limit, "revocation took {t:?} to reach B");
    assert_eq!(a.call("/v1/sms/1", &rsecret), 401);

    // and the other way round: a change through B reaches A
    let k = b.create(json!({"workspace": "ws_two", "permissions": ["sms.read"]}));
    let (bid, bsecret) = (s(&k, "id"), s(&k, "secret"));
    assert_eq!(a.call("/v1/sms/1", &bsecret), 200);
    assert_eq!(
        b.admin("DELETE", &format!("/admin/v1/keys/{bid}"), None)
            .status,
        204
    );
    let t = wait_status(&a, "/v1/sms/1", &bsecret, 401, Duration::from_secs(3))
        .expect("revocation never reached A");
    println!("revocation through B reached A in {} ms", t.as_millis());
    assert!(t <= limit);
}

#[test]
fn revocation_after_a_redis_restart_reaches_the_other_instance() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start();
    let up = Upstream::start();
    let a = Gateway::start(dir.path(), "a", &redis.url(), &up);
    let b = Gateway::start(dir.path(), "b", &redis.url(), &up);
    wait_until_subscribed(&a, &b);
    wait_until_subscribed(&b, &a);

    let k = a.create(json!({"workspace": "ws_restart", "permissions": ["sms.read"]}));
    let (id, secret) = (s(&k, "id"), s(&k, "secret"));
    for g in [&a, &b] {
        assert_eq!(g.call("/v1/sms/1", &secret), 200, "warm the cache");
    }

    // Redis down: not ready, but alive; cached keys keep working
    redis.kill9();
    let t0 = Instant::now();
    loop {
        let r = http(b.admin, "GET", "/readyz", &[], None).expect("readyz");
        if r.status == 503 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "/readyz never turned 503 with Redis down: {}",
            r.text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(
        http(b.admin, "GET", "/healthz", &[], None)
            .expect("healthz")
            .status,
        200
    );
    let r = a.admin(
        "POST",
        "/admin/v1/keys",
        Some(json!({"workspace": "ws_restart"})),
    );
    assert_eq!(
        (r.status, r.code().as_str()),
        (503, "STORE_UNAVAILABLE"),
        "{}",
        r.text()
    );
    assert_eq!(
        b.call("/v1/sms/1", &secret),
        200,
        "a cached key works while the store is down"
    );

    redis.spawn();
    let mut status = 0;
    let mut attempts = 0;
    while status != 204 {
        assert!(
            attempts < 20,
            "revoke never succeeded after the Redis restart (last status {status})"
        );
        if attempts > 0 {
            std::thread::sleep(Duration::from_millis(250));
        }
        attempts += 1;
        status = a
            .admin("DELETE", &format!("/admin/v1/keys/{id}"), None)
            .status;
    }
    let t = wait_status(&b, "/v1/sms/1", &secret, 401, Duration::from_secs(5))
        .expect("revocation never reached B");
    println!(
        "after a Redis restart, revocation (admin attempt {attempts}) reached the other instance in {} ms",
        t.as_millis()
    );
    assert!(
        t <= Duration::from_millis(1500),
        "revocation took {t:?} to reach B after the restart"
    );
    assert_eq!(a.call("/v1/sms/1", &secret), 401);
    assert_eq!(
        http(b.admin, "GET", "/readyz", &[], None)
            .expect("readyz")
            .status,
        200
    );
}

#[test]
fn admin_writes_survive_kill9_of_redis() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut redis = Redis::start();
    let up = Upstream::start();
    let g = Gateway::start(dir.path(), "a", &redis.url(), &up);
    let mut ids: Vec<String> = (0..500)
        .map(|i| {
            s(
                &g.create(json!({"workspace": "ws_durable", "name": format!("k{i}")})),
                "id",
            )
        })
        .collect();
    redis.kill9();
    redis.spawn();
    let t0 = Instant::now();
    let mut listed = loop {
        match g.list_all("ws_durable", 500) {
            Ok(l) => break l,
            Err(e) => assert!(
                t0.elapsed() < Duration::from_secs(15),
                "listing never worked after the restart: {e}"
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    ids.sort();
    listed.sort();
    assert_eq!(listed.len(), 500);
    assert_eq!(listed, ids, "every acknowledged write survived kill -9");
}

#[test]
fn admin_writes_survive_kill9_of_the_gateway_on_sqlite() {
    let dir = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start();
    let url = format!("sqlite://{}", dir.path().join("keys.db").display());
    let mut g = Gateway::start(dir.path(), "a", &url, &up);
    let mut ids: Vec<String> = (0..500)
        .map(|i| {
            s(
                &g.create(json!({"workspace": "ws_sqlite", "name": format!("k{i}")})),
                "id",
            )
        })
        .collect();
    let last = g.create(json!({"workspace": "ws_sqlite", "permissions": ["sms.read"]}));
    ids.push(s(&last, "id"));
    g.kill9();
    g.spawn();
    let mut listed = g.list_all("ws_sqlite", 200).expect("list after restart");
    ids.sort();
    listed.sort();
    assert_eq!(listed.len(), 501);
    assert_eq!(listed, ids, "every acknowledged write survived kill -9");
    assert_eq!(
        g.call("/v1/sms/1", &s(&last, "secret")),
        200,
        "the last key works after the restart"
    );
}

#[test]
fn self_service_is_confined_to_its_workspace() {
    let dir = tempfile::tempdir().expect("tempdir");
    let redis = Redis::start();
    let up = Upstream::start();
    let g = Gateway::start(dir.path(), "a", &redis.url(), &up);

    let sa = g.create(
        json!({"workspace": "ws_a", "permissions": ["keys.read", "keys.write", "sms.read"]}),
    );
    let (sa_id, sa_secret) = (s(&sa, "id"), s(&sa, "secret"));
    let other_a = g.create(json!({"workspace": "ws_a", "name": "sibling"}));
    let kb = g.create(json!({"workspace": "ws_b", "permissions": ["sms.read", "keys.write"]}));
    let (kb_id, kb_secret) = (s(&kb, "id"), s(&kb, "secret"));
    let auth = format!("Bearer {sa_secret}");
    let h: &[(&str, &str)] = &[
        ("Authorization", &auth),
        ("Content-Type", "application/json"),
    ];

    // list: only ws_a, no secrets, request id and caller in the access log
    let r = http(g.port, "GET", "/v1/api-keys", h, None).expect("list");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(r.header("x-request-id").is_some());
    let listed = r.json()["data"].as_array().expect("data").clone();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed
            .iter()
            .all(|k| k["workspace"] == "ws_a" && k.get("secret").is_none())
    );
    assert!(!r.text().contains(&kb_id) && !r.text().contains(&sa_secret));
    let r = http(g.port, "GET", "/v1/api-keys?limit=1", h, None).expect("page");
    assert_eq!(r.json()["data"].as_array().map(Vec::len), Some(1));
    assert!(r.json()["next_cursor"].is_string());
    let r = http(g.port, "GET", "/v1/api-keys?workspace=ws_b", h, None).expect("list other");
    assert_eq!(r.status, 400, "no workspace parameter in self-service");

    // create within held permissions: 201 in ws_a
    let body = json!({"name": "child", "permissions": ["sms.read"]}).to_string();
    let r = http(g.port, "POST", "/v1/api-keys", h, Some(body.as_bytes())).expect("create");
    assert_eq!(r.status, 201, "{}", r.text());
    let child = r.json();
    assert_eq!(child["workspace"], "ws_a");
    let child_secret = s(&child, "secret");
    assert_eq!(g.call("/v1/sms/1", &child_secret), 200);
    // the body's workspace cannot move it elsewhere
    let body = json!({"workspace": "ws_b", "permissions": ["sms.read"]}).to_string();
    let r =
        http(g.port, "POST", "/v1/api-keys", h, Some(body.as_bytes())).expect("create elsewhere");
    assert_eq!(r.status, 403, "{}", r.text());

    // cannot grant what it lacks: 403 naming the permission
    for perms in [
        json!(["balance.read"]),
        json!(["sms.read", "sms.*"]),
        json!(["*"]),
    ] {
        let body = json!({"name": "escalate", "permissions": perms}).to_string();
        let r = http(g.port, "POST", "/v1/api-keys", h, Some(body.as_bytes())).expect("escalate");
        assert_eq!(
            (r.status, r.code().as_str()),
            (403, "FORBIDDEN"),
            "{perms}: {}",
            r.text()
        );
    }
    let r = http(
        g.port,
        "POST",
        "/v1/api-keys",
        h,
        Some(
            json!({"permissions": ["balance.read"]})
                .to_string()
                .as_bytes(),
        ),
    )
    .expect("x");
    assert!(r.message().contains("balance.read"), "{}", r.message());
    let r = http(g.port, "POST", "/v1/api-keys", h, Some(b"{not json")).expect("bad json");
    assert_eq!(r.status, 400);
    let r = http(
        g.port,
        "POST",
        "/v1/api-keys",
        h,
        Some(json!({"allowed_ips": ["300.1.1.1"]}).to_string().as_bytes()),
    )
    .expect("x");
    assert_eq!(r.status, 400);
    assert!(r.message().contains("allowed_ips"));

    // delete: another workspace's key is 404, own key 204
    let r =
        http(g.port, "DELETE", &format!("/v1/api-keys/{kb_id}"), h, None).expect("delete other");
    assert_eq!(
        (r.status, r.code().as_str()),
        (404, "NOT_FOUND"),
        "{}",
        r.text()
    );
    assert_eq!(
        g.call("/v1/sms/1", &kb_secret),
        200,
        "ws_b's key still works"
    );
    let r =
        http(g.port, "DELETE", "/v1/api-keys/key_doesnotexist", h, None).expect("delete unknown");
    assert_eq!(r.status, 404);
    let r = http(
        g.port,
        "DELETE",
        &format!("/v1/api-keys/{}", s(&child, "id")),
        h,
        None,
    )
    .expect("delete own");
    assert_eq!(r.status, 204, "{}", r.text());
    assert_eq!(g.call("/v1/sms/1", &child_secret), 401, "revoked at once");
    let r = http(g.port, "PUT", "/v1/api-keys", h, None).expect("put");
    assert_eq!((r.status, r.header("allow")), (405, Some("GET, POST")));

    // a key without keys.read: 403 naming the permission; without a key: 401
    let kbauth = format!("Bearer {kb_secret}");
    let r = http(
        g.port,
        "GET",
        "/v1/api-keys",
        &[("Authorization", &kbauth)],
        None,
    )
    .expect("list without keys.read");
    assert_eq!((r.status, r.code().as_str()), (403, "FORBIDDEN"));
    assert!(r.message().contains("keys.read"), "{}", r.message());
    let r = http(g.port, "GET", "/v1/api-keys", &[], None).expect("no key");
    assert_eq!((r.status, r.code().as_str()), (401, "MISSING_API_KEY"));
    // a key with keys.read only cannot write
    let ro = g.create(json!({"workspace": "ws_a", "permissions": ["keys.read", "sms.read"]}));
    let roauth = format!("Bearer {}", s(&ro, "secret"));
    let r = http(
        g.port,
        "DELETE",
        &format!("/v1/api-keys/{}", s(&other_a, "id")),
        &[("Authorization", &roauth)],
        None,
    )
    .expect("x");
    assert_eq!(r.status, 403);
    assert!(r.message().contains("keys.write"));

    // audit: self-service writes name the actor key and the target, never a secret
    let log = g.log_text();
    let child_id = s(&child, "id");
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("portcullis::audit") && l.contains(&child_id))
        .collect();
    assert_eq!(lines.len(), 2, "create and revoke of the child: {lines:#?}");
    assert!(
        lines
            .iter()
            .all(|l| l.contains("actor=\"key\"") && l.contains(&sa_id) && l.contains("ws_a")),
        "{lines:#?}"
    );
    for sec in [&sa_secret, &kb_secret, &child_secret] {
        assert!(!log.contains(sec.as_str()), "a secret reached the log");
    }
    assert!(log.lines().any(|l| l.contains("portcullis::access")
        && l.contains("route=self_service")
        && l.contains(&sa_id)));
}
