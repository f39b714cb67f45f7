//! The "Operations" issue, end to end with the real binary
//! (`portcullis serve --config FILE`): hot reload under load (good versions
//! apply, bad ones never do, by rename, in-place write and SIGHUP; keep-alive
//! connections and in-flight requests survive), settings that need a
//! restart, upstream pools kept across reloads, TLS certificate rotation,
//! `/metrics` after known traffic, and `--log-format json`.
//!
//! Readiness is always a signal (a port accepting, a log event, a metric, a
//! route answering), polled with a deadline; there are no fixed sleeps.

mod common;

use bytes::Bytes;
use common::*;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::Value;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

// ───────────────────────────────── helpers ─────────────────────────────────

/// The admin token of every config here.
const ADMIN_TOKEN: &str = "ops-admin-token-7Qm2xV9c";

/// How long any awaited condition may take.
const DEADLINE: Duration = Duration::from_secs(10);

/// `[server]` (+ `extra` keys and TLS), `[admin]` with the token, `[store]`.
/// `listen`/`admin_listen` are `127.0.0.1:0` for the first version (the
/// spawner pins free ports) and the pinned addresses for later versions.
fn head(listen: &str, admin_listen: &str, store: &str, server_extra: &str) -> String {
    format!(
        r#"[server]
listen = "{listen}"
{server_extra}

[admin]
listen = "{admin_listen}"
token = "{ADMIN_TOKEN}"

[store]
url = "{store}"
"#
    )
}

/// The first version's head: ports pinned by the spawner, SQLite next to the config.
fn head0(server_extra: &str) -> String {
    head(
        "127.0.0.1:0",
        "127.0.0.1:0",
        "sqlite://keys.db",
        server_extra,
    )
}

/// A later version's head for a running process (same ports, same store).
fn head_of(p: &GatewayProcess, server_extra: &str) -> String {
    head(
        &p.addr.to_string(),
        &p.admin_addr.to_string(),
        "sqlite://keys.db",
        server_extra,
    )
}

/// `[upstreams.NAME]` with one target.
fn upstream(name: &str, url: &str, extra: &str) -> String {
    format!("\n[upstreams.{name}]\ntargets = [\"{url}\"]\n{extra}\n")
}

/// A GET route; `rest` holds extra keys (`auth = "none"`, `permissions = …`).
fn route(name: &str, path: &str, upstream: &str, rest: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\nupstream = \"{upstream}\"\n{rest}\n"
    )
}

/// Replaces the file through a temp file and a rename (what editors and
/// config-management tools do).
fn write_renamed(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp-write");
    std::fs::write(&tmp, text).expect("write the temp file");
    std::fs::rename(&tmp, path).expect("rename over the file");
}

/// Rewrites the file in place (truncate, then write).
fn write_in_place(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write in place");
}

/// 1-based line and column of the first `needle` in `text`.
fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let off = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in the text"));
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = off - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Creates a key with `portcullis keys create … --json` against the config's
/// store; returns (id, secret).
async fn create_key(
    config: &Path,
    workspace: &str,
    permissions: &str,
    plan: Option<&str>,
) -> (String, String) {
    let mut args: Vec<String> = vec![
        "keys".into(),
        "create".into(),
        "--workspace".into(),
        workspace.into(),
        "--permissions".into(),
        permissions.into(),
        "--json".into(),
        "--config".into(),
        config.display().to_string(),
    ];
    if let Some(plan) = plan {
        args.extend(["--plan".to_string(), plan.to_string()]);
    }
    let out = tokio::task::spawn_blocking(move || run_cli(&args))
        .await
        .expect("keys create task");
    assert!(
        out.status.success(),
        "keys create failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).expect("keys create --json prints JSON");
    let id = v["id"].as_str().expect("id").to_string();
    let secret = v["secret"].as_str().expect("secret").to_string();
    (id, secret)
}

/// `GET url` with an optional bearer key.
async fn get(c: &TestClient, url: &str, key: Option<&str>) -> TestResponse {
    match key {
        Some(k) => {
            c.get_with(url, &[("authorization", &format!("Bearer {k}"))])
                .await
        }
        None => c.get(url).await,
    }
}

/// Polls `GET url` until it answers `status`.
async fn wait_status(c: &TestClient, url: &str, key: Option<&str>, status: u16) {
    let start = Instant::now();
    loop {
        let r = get(c, url, key).await;
        if r.status.as_u16() == status {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "GET {url} still answers {} (wanted {status}): {}",
            r.status,
            r.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ─────────────────────────── keep-alive connections ────────────────────────

/// One client connection held open by the test (no pool: if the gateway
/// drops it, the next request fails).
enum Conn {
    H1(hyper::client::conn::http1::SendRequest<Empty<Bytes>>),
    H2(
        hyper::client::conn::http2::SendRequest<Empty<Bytes>>,
        SocketAddr,
    ),
}

impl Conn {
    async fn h1_over<I>(io: I) -> Conn
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
            .await
            .expect("HTTP/1.1 handshake");
        tokio::spawn(conn);
        Conn::H1(send)
    }

    async fn h1(addr: SocketAddr) -> Conn {
        Conn::h1_over(TcpStream::connect(addr).await.expect("connect")).await
    }

    /// HTTP/2 with prior knowledge.
    async fn h2(addr: SocketAddr) -> Conn {
        let tcp = TcpStream::connect(addr).await.expect("connect");
        let (send, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tcp))
                .await
                .expect("HTTP/2 handshake");
        tokio::spawn(conn);
        Conn::H2(send, addr)
    }

    fn is_closed(&self) -> bool {
        match self {
            Conn::H1(s) => s.is_closed(),
            Conn::H2(s, _) => s.is_closed(),
        }
    }

    /// `GET path` on this connection; the status and the whole body.
    async fn get(&mut self, path: &str) -> Result<(StatusCode, Bytes), String> {
        let resp = match self {
            Conn::H1(s) => {
                s.ready()
                    .await
                    .map_err(|e| format!("connection lost: {e}"))?;
                let req = Request::get(path)
                    .header("host", "localhost")
                    .body(Empty::new())
                    .expect("request");
                s.send_request(req).await
            }
            Conn::H2(s, addr) => {
                s.ready()
                    .await
                    .map_err(|e| format!("connection lost: {e}"))?;
                let req = Request::get(format!("http://{addr}{path}"))
                    .body(Empty::new())
                    .expect("request");
                s.send_request(req).await
            }
        }
        .map_err(|e| format!("request failed: {e}"))?;
        let status = resp.status();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("body failed: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
}

/// A client hammering `path` on one keep-alive connection until `stop`;
/// returns every failure (a non-200 or a lost connection).
struct LoadWorker {
    ok: Arc<AtomicUsize>,
    task: JoinHandle<Vec<String>>,
}

impl LoadWorker {
    fn start(mut conn: Conn, path: &'static str, stop: Arc<AtomicBool>) -> LoadWorker {
        let ok = Arc::new(AtomicUsize::new(0));
        let n = ok.clone();
        let task = tokio::spawn(async move {
            let mut fails = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match conn.get(path).await {
                    Ok((s, _)) if s == StatusCode::OK => {
                        n.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok((s, body)) => fails.push(format!("{s}: {}", String::from_utf8_lossy(&body))),
                    Err(e) => {
                        fails.push(e);
                        return fails;
                    }
                }
                tokio::time::sleep(Duration::from_millis(3)).await;
            }
            if conn.is_closed() {
                fails.push("the keep-alive connection was closed".into());
            }
            fails
        });
        LoadWorker { ok, task }
    }

    fn ok(&self) -> usize {
        self.ok.load(Ordering::SeqCst)
    }
}

// ───────────────────────────────── logs ────────────────────────────────────

/// Every complete stdout line of a `--log-format json` process that parses
/// as JSON (a line being written may not yet).
fn json_events(p: &GatewayProcess) -> Vec<Value> {
    p.stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn message(ev: &Value) -> &str {
    ev["message"].as_str().unwrap_or("")
}

/// Reload outcomes (`config reloaded…` / `config reload refused…`) so far.
fn reload_events(p: &GatewayProcess) -> Vec<Value> {
    json_events(p)
        .into_iter()
        .filter(|e| message(e).starts_with("config reload"))
        .collect()
}

/// Waits for a reload event, after the first `seen` ones, that matches
/// `want`; panics with the events since (and the output) at the deadline.
async fn wait_reload(
    p: &GatewayProcess,
    seen: usize,
    what: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let evs = reload_events(p);
        if let Some(e) = evs.iter().skip(seen).find(|e| want(e)) {
            return e.clone();
        }
        assert!(
            start.elapsed() < DEADLINE,
            "no reload event: {what}; events since: {:#?}\n{}",
            &evs[seen.min(evs.len())..],
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn applied(e: &Value) -> bool {
    message(e).starts_with("config reloaded")
}

fn refused(e: &Value) -> bool {
    message(e).starts_with("config reload refused")
}

fn errors_of(e: &Value) -> &str {
    e["errors"].as_str().unwrap_or("")
}

// ──────────────────────────────── metrics ──────────────────────────────────

/// `GET /metrics` on the admin listener with the admin token.
async fn scrape(c: &TestClient, admin: SocketAddr) -> String {
    let r = c
        .get_with(
            &format!("http://{admin}/metrics"),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await;
    assert_eq!(r.status, 200, "/metrics: {}", r.text());
    r.text()
}

/// The labels of one sample line, `name{a="x",b="y"}`, unescaped.
fn parse_labels(s: &str) -> Option<BTreeMap<String, String>> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while !rest.is_empty() {
        let (name, after) = rest.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        out.insert(name.trim_start_matches(',').to_string(), value);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Some(out)
}

/// Every sample: (name, labels, value).
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let value: f64 = value.parse().ok()?;
            let (name, labels) = match series.split_once('{') {
                Some((n, l)) => (n, parse_labels(l.strip_suffix('}')?)?),
                None => (series, BTreeMap::new()),
            };
            Some((name.to_string(), labels, value))
        })
        .collect()
}

/// The value of the sample `name` with exactly `labels`, if exported.
fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let want: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    samples(text)
        .into_iter()
        .find(|(n, l, _)| n == name && *l == want)
        .map(|(_, _, v)| v)
}

/// Polls the process's `/metrics` until `check` holds for it.
async fn wait_metrics(
    c: &TestClient,
    p: &GatewayProcess,
    what: &str,
    check: impl Fn(&str) -> bool,
) -> String {
    let start = Instant::now();
    loop {
        let text = scrape(c, p.admin_addr).await;
        if check(&text) {
            return text;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "metrics never showed {what}:\n{text}\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn version_is(v: f64) -> impl Fn(&str) -> bool {
    move |t| metric(t, "portcullis_config_version", &[]) == Some(v)
}

/// Makes sure the reload task is running before a test edits the file soon
/// after start-up: a SIGHUP reload (config_version + 1). (A file written
/// before the reload task's first fingerprint is never loaded; see
/// `a_config_written_while_the_gateway_starts_is_loaded`.)
async fn reload_task_running(c: &TestClient, p: &GatewayProcess) {
    let text = scrape(c, p.admin_addr).await;
    let v = metric(&text, "portcullis_config_version", &[]).expect("config_version");
    p.signal("HUP");
    wait_metrics(c, p, "the SIGHUP reload", version_is(v + 1.0)).await;
}

// ─────────────────────────────── hot reload ────────────────────────────────

/// Routes of the hot-reload test: `a` and `slow` (no key), `secure` (needs
/// `perm`), `limited` (`limit` requests a minute per key), then `extra`.
fn reload_body(echo: &str, slow: &str, perm: &str, limit: u64, extra: &[&str]) -> String {
    let mut s = upstream("echo", echo, "") + &upstream("slow", slow, "");
    s += &route("a", "/v1/a", "echo", "auth = \"none\"");
    s += &route("slow", "/v1/slow", "slow", "auth = \"none\"");
    s += &route(
        "secure",
        "/v1/secure",
        "echo",
        &format!("permissions = [\"{perm}\"]"),
    );
    s += &route(
        "limited",
        "/v1/limited",
        "echo",
        &format!(
            "permissions = [\"sms.read\"]\nlimits = [{{ scope = \"key\", requests = {limit}, per = \"1m\" }}]"
        ),
    );
    for name in extra {
        s += &route(name, &format!("/v1/{name}"), "echo", "auth = \"none\"");
    }
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_reload_under_load_applies_good_versions_and_never_bad_ones() {
    let echo = EchoUpstream::start().await;
    let slow = SlowUpstream::start(Duration::from_millis(2500)).await;
    let body = |perm: &str, limit: u64, extra: &[&str]| {
        reload_body(&echo.url(), &slow.url(), perm, limit, extra)
    };

    let p = spawn_gateway_process_with(
        &(head0("") + &body("sms.send", 2, &[])),
        &["--log-format", "json"],
    );
    let path = p.config_path.clone();
    let file = path.display().to_string();
    let c = TestClient::h1(None);
    let (_, key) = create_key(&path, "ws_ops", "sms.read", None).await;

    // Version 1: no route b, the key lacks sms.send, 2 requests a minute on `limited`.
    get(&c, &p.url("/v1/b"), None)
        .await
        .assert_error(404, "NOT_FOUND");
    get(&c, &p.url("/v1/secure"), Some(&key))
        .await
        .assert_error(403, "FORBIDDEN");
    for _ in 0..2 {
        assert_eq!(get(&c, &p.url("/v1/limited"), Some(&key)).await.status, 200);
    }
    get(&c, &p.url("/v1/limited"), Some(&key))
        .await
        .assert_error(429, "RATE_LIMITED");

    // Load: four keep-alive connections (three HTTP/1.1, one HTTP/2) for the whole test.
    let stop = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for i in 0..4 {
        let conn = if i == 3 {
            Conn::h2(p.addr).await
        } else {
            Conn::h1(p.addr).await
        };
        workers.push(LoadWorker::start(conn, "/v1/a", stop.clone()));
    }
    // A slow request in flight across the first reload.
    let mut slow_conn = Conn::h1(p.addr).await;
    let in_flight = tokio::spawn(async move { slow_conn.get("/v1/slow").await });
    eventually(
        "the slow request reaching the upstream",
        DEADLINE,
        || async { slow.arrived() == 1 },
    )
    .await;
    eventually("load flowing", DEADLINE, || async {
        workers.iter().all(|w| w.ok() >= 5)
    })
    .await;

    // 1. Good version, write-then-rename: route b added.
    let mut seen = reload_events(&p).len();
    write_renamed(&path, &(head_of(&p, "") + &body("sms.send", 2, &["b"])));
    let e = wait_reload(&p, seen, "v2 (route b, by rename) applied", applied).await;
    assert_eq!(e["version"], 2, "{e}");
    assert_eq!(get(&c, &p.url("/v1/b"), None).await.status, 200);
    assert_eq!(
        slow.completed(),
        0,
        "the slow request should still be in flight after the reload"
    );
    let (status, body_bytes) = in_flight
        .await
        .expect("slow request task")
        .expect("the in-flight request survives the reload");
    assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body_bytes));
    assert_eq!(&body_bytes[..], b"slow done");
    let load_at_v2: Vec<usize> = workers.iter().map(LoadWorker::ok).collect();

    // The next version adds route c; every bad variant of it must be refused.
    let v3 = head_of(&p, "") + &body("sms.read", 100, &["b", "c"]);

    // 2. Truncated file, written in place (a half-finished write).
    seen = reload_events(&p).len();
    let cut = v3.find("\"/v1/c\"").expect("route c path") + 4;
    let truncated = &v3[..cut];
    write_in_place(&path, truncated);
    let (line, _) = pos_of(&v3, "\"/v1/c\"");
    let e = wait_reload(&p, seen, "the truncated file refused", |e| {
        refused(e) && errors_of(e).contains(&format!("{file}:{line}:"))
    })
    .await;
    assert!(errors_of(&e).contains(&file), "{e}");

    // 3. Invalid TOML, by rename.
    seen = reload_events(&p).len();
    let broken = v3.replacen("[[routes]]\nname = \"c\"", "[[routes]\nname = \"c\"", 1);
    assert_ne!(broken, v3);
    write_renamed(&path, &broken);
    let (line, _) = pos_of(&broken, "[[routes]\n");
    let e = wait_reload(&p, seen, "invalid TOML refused", |e| {
        refused(e) && errors_of(e).contains(&format!("{file}:{line}:"))
    })
    .await;
    assert_eq!(e["level"], "ERROR", "{e}");

    // 4. A route to an unknown upstream, in place (with otherwise good changes).
    seen = reload_events(&p).len();
    let ghost = v3.replacen(
        "path = \"/v1/c\"\nupstream = \"echo\"",
        "path = \"/v1/c\"\nupstream = \"ghost\"",
        1,
    );
    assert_ne!(ghost, v3);
    write_in_place(&path, &ghost);
    let (line, col) = pos_of(&ghost, "\"ghost\"");
    let e = wait_reload(&p, seen, "the unknown upstream refused", |e| {
        refused(e) && errors_of(e).contains(&format!("{file}:{line}:{col}:"))
    })
    .await;
    assert!(errors_of(&e).contains("ghost"), "{e}");

    // None of the bad versions took effect, not even in part.
    let m = scrape(&c, p.admin_addr).await;
    assert_eq!(
        metric(&m, "portcullis_config_version", &[]),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "portcullis_config_last_reload_success", &[]),
        Some(0.0)
    );
    assert!(
        metric(
            &m,
            "portcullis_config_reloads_total",
            &[("result", "error")]
        )
        .unwrap_or(0.0)
            >= 3.0
    );
    get(&c, &p.url("/v1/c"), None)
        .await
        .assert_error(404, "NOT_FOUND");
    assert_eq!(get(&c, &p.url("/v1/b"), None).await.status, 200);
    get(&c, &p.url("/v1/secure"), Some(&key))
        .await
        .assert_error(403, "FORBIDDEN");
    get(&c, &p.url("/v1/limited"), Some(&key))
        .await
        .assert_error(429, "RATE_LIMITED");

    // 5. The good version, in place: route added, permission and limit changed.
    seen = reload_events(&p).len();
    write_in_place(&path, &v3);
    let e = wait_reload(&p, seen, "v3 (in place) applied", applied).await;
    assert_eq!(e["version"], 3, "{e}");
    assert_eq!(get(&c, &p.url("/v1/c"), None).await.status, 200);
    let r = get(&c, &p.url("/v1/secure"), Some(&key)).await;
    assert_eq!(r.status, 200, "permission change applied: {}", r.text());
    let r = get(&c, &p.url("/v1/limited"), Some(&key)).await;
    assert_eq!(r.status, 200, "limit change applied: {}", r.text());
    assert_eq!(r.header("x-ratelimit-limit"), Some("100"));

    // 6. SIGHUP alone (file unchanged) reloads.
    seen = reload_events(&p).len();
    p.signal("HUP");
    let e = wait_reload(&p, seen, "the SIGHUP reload applied", applied).await;
    assert_eq!(e["version"], 4, "{e}");

    // 7. In-place edit then SIGHUP (what an operator does): d added, c removed.
    seen = reload_events(&p).len();
    write_in_place(
        &path,
        &(head_of(&p, "") + &body("sms.read", 100, &["b", "d"])),
    );
    p.signal("HUP");
    wait_reload(&p, seen, "the edit + SIGHUP applied", applied).await;
    wait_status(&c, &p.url("/v1/d"), None, 200).await;
    get(&c, &p.url("/v1/c"), None)
        .await
        .assert_error(404, "NOT_FOUND");

    // The load never saw a failure, and each connection served requests
    // before and after all the reloads.
    eventually("load flowing after the reloads", DEADLINE, || async {
        workers
            .iter()
            .zip(&load_at_v2)
            .all(|(w, before)| w.ok() > before + 5)
    })
    .await;
    stop.store(true, Ordering::SeqCst);
    let mut total = 0;
    for (i, w) in workers.into_iter().enumerate() {
        let ok = w.ok();
        let fails = w.task.await.expect("load worker");
        assert!(
            fails.is_empty(),
            "load connection {i}: {} failures: {fails:?}",
            fails.len()
        );
        total += ok;
    }
    assert!(total > 100, "only {total} requests under load");
    let m = scrape(&c, p.admin_addr).await;
    assert_eq!(
        metric(&m, "portcullis_config_last_reload_success", &[]),
        Some(1.0),
        "{m}"
    );
    assert!(
        metric(&m, "portcullis_config_reloads_total", &[("result", "ok")]).unwrap_or(0.0) >= 4.0
    );
    assert!(metric(&m, "portcullis_config_version", &[]).unwrap_or(0.0) >= 5.0);
}

// ───────────────────────────── restart-only ────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_needing_a_restart_are_reported_and_the_rest_applies() {
    let echo = EchoUpstream::start().await;
    let body = |extra: &[&str]| {
        let mut s = upstream("echo", &echo.url(), "");
        s += &route("a", "/v1/a", "echo", "auth = \"none\"");
        s += &route(
            "secure",
            "/v1/secure",
            "echo",
            "permissions = [\"sms.read\"]",
        );
        for name in extra {
            s += &route(name, &format!("/v1/{name}"), "echo", "auth = \"none\"");
        }
        s
    };
    let p = spawn_gateway_process_with(&(head0("") + &body(&[])), &["--log-format", "json"]);
    let c = TestClient::h1(None);
    let (_, key) = create_key(&p.config_path, "ws_restart", "sms.read", None).await;
    assert_eq!(get(&c, &p.url("/v1/secure"), Some(&key)).await.status, 200);

    // New listen and admin addresses, another store, and a new route.
    let new_port = free_port();
    let new_admin = free_port();
    let text = head(
        &format!("127.0.0.1:{new_port}"),
        &format!("127.0.0.1:{new_admin}"),
        "sqlite://other.db",
        "",
    ) + &body(&["b"]);
    let seen = reload_events(&p).len();
    write_renamed(&p.config_path, &text);
    let e = wait_reload(&p, seen, "the reload with restart-only changes", |_| true).await;
    assert!(applied(&e), "the rest of the config must still apply: {e}");
    assert_eq!(e["level"], "WARN", "{e}");
    let needs = e["needs_restart"].as_str().unwrap_or_default();
    for setting in ["server.listen", "admin.listen", "store"] {
        assert!(needs.contains(setting), "{setting} not reported in {e}");
    }
    assert!(message(&e).contains("restart"), "{e}");

    // The rest applied; the old listeners and the old store stay.
    assert_eq!(get(&c, &p.url("/v1/b"), None).await.status, 200);
    let r = get(&c, &p.url("/v1/secure"), Some(&key)).await;
    assert_eq!(r.status, 200, "the key store was switched: {}", r.text());
    assert!(
        TcpStream::connect(("127.0.0.1", new_port)).await.is_err(),
        "the new listen address must not be bound before a restart"
    );
    let m = scrape(&c, p.admin_addr).await;
    assert_eq!(
        metric(&m, "portcullis_config_version", &[]),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "portcullis_config_last_reload_success", &[]),
        Some(1.0)
    );
    assert!(
        !p.dir.path().join("other.db").exists(),
        "the new store must not be opened before a restart"
    );
}

// ─────────────────────────────── upstream pool ─────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_keeps_pools_of_unchanged_upstreams() {
    let kept = EchoUpstream::start_named("kept").await;
    let changed = EchoUpstream::start_named("changed").await;
    let body = |timeout: &str, extra: &[&str]| {
        let mut s = upstream("kept", &kept.url(), "");
        s += &upstream(
            "changed",
            &changed.url(),
            &format!("request_timeout = \"{timeout}\""),
        );
        s += &route("k", "/v1/k", "kept", "auth = \"none\"");
        s += &route("ch", "/v1/ch", "changed", "auth = \"none\"");
        for name in extra {
            s += &route(name, &format!("/v1/{name}"), "kept", "auth = \"none\"");
        }
        s
    };
    let p = spawn_gateway_process_with(&(head0("") + &body("30s", &[])), &["--log-format", "json"]);
    let c = TestClient::h1(None);
    for _ in 0..3 {
        assert_eq!(get(&c, &p.url("/v1/k"), None).await.status, 200);
        assert_eq!(get(&c, &p.url("/v1/ch"), None).await.status, 200);
    }
    reload_task_running(&c, &p).await;
    // The upstream connections (numbered in accept order) used so far.
    let kept_before = kept.connections();
    let changed_before = changed.connections();

    // Routes change; upstream `kept` does not; `changed` gets a new timeout.
    let seen = reload_events(&p).len();
    write_renamed(&p.config_path, &(head_of(&p, "") + &body("20s", &["k2"])));
    wait_reload(&p, seen, "the route-only reload applied", applied).await;
    assert_eq!(get(&c, &p.url("/v1/k"), None).await.status, 200);
    assert_eq!(get(&c, &p.url("/v1/ch"), None).await.status, 200);
    let first_kept = kept.last().conn;
    let first_changed = changed.last().conn;
    assert!(
        first_kept <= kept_before,
        "the pool of an unchanged upstream is kept across a reload: the first request \
         after it came on new connection {first_kept} (connections before: {kept_before})"
    );
    assert!(
        first_changed > changed_before,
        "a changed upstream gets a new pool: the first request after the reload came on \
         old connection {first_changed} (connections before: {changed_before})"
    );
    assert_eq!(get(&c, &p.url("/v1/k2"), None).await.status, 200);
    assert_eq!(kept.last().path_and_query, "/v1/k2");
}

// ────────────────────────────────── TLS ────────────────────────────────────

/// A self-signed certificate for localhost with its own CN and serial: (cert PEM, key PEM, cert DER).
fn make_cert(cn: &str, serial: u64) -> (String, String, Vec<u8>) {
    let mut params =
        rcgen::CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
            .expect("certificate params");
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, cn);
    params.distinguished_name = dn;
    params.serial_number = Some(rcgen::SerialNumber::from(serial));
    let key = rcgen::KeyPair::generate().expect("key pair");
    let cert = params.self_signed(&key).expect("self-signed certificate");
    (cert.pem(), key.serialize_pem(), cert.der().to_vec())
}

/// A TLS connection to the gateway; returns it with the leaf certificate the server showed.
async fn tls_to(
    addr: SocketAddr,
    cfg: &rustls::ClientConfig,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let stream = tls_connect(addr, cfg.clone()).await.expect("TLS handshake");
    let leaf = stream
        .get_ref()
        .1
        .peer_certificates()
        .expect("a server certificate")[0]
        .to_vec();
    (stream, leaf)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_certificate_rotation_serves_new_handshakes_and_keeps_open_connections() {
    let echo = EchoUpstream::start().await;
    let certs = tempfile::tempdir().expect("cert dir");
    let cert_path = certs.path().join("cert.pem");
    let key_path = certs.path().join("key.pem");
    let (cert_a, key_a, der_a) = make_cert("portcullis-ops-a", 1001);
    let (cert_b, key_b, der_b) = make_cert("portcullis-ops-b", 2002);
    assert_ne!(der_a, der_b);
    std::fs::write(&cert_path, &cert_a).expect("write cert");
    std::fs::write(&key_path, &key_a).expect("write key");
    let tls = format!(
        "[server.tls]\ncert = {:?}\nkey = {:?}\n",
        cert_path.display().to_string(),
        key_path.display().to_string()
    );
    let body = upstream("echo", &echo.url(), "") + &route("a", "/v1/a", "echo", "auth = \"none\"");
    let p = spawn_gateway_process(&(head0(&tls) + &body));
    assert!(p.tls);

    // The client trusts both certificates; only the leaf shown tells them apart.
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der_a.clone().into()).expect("trust a");
    roots.add(der_b.clone().into()).expect("trust b");
    let mut client = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];

    let (stream, leaf) = tls_to(p.addr, &client).await;
    assert_eq!(leaf, der_a, "the first certificate is served");
    let mut old = Conn::h1_over(stream).await;
    let (s, _) = old.get("/v1/a").await.expect("request before the rotation");
    assert_eq!(s, 200);

    // Rotate: new certificate and key, each written then renamed into place.
    write_renamed(&cert_path, &cert_b);
    write_renamed(&key_path, &key_b);
    let start = Instant::now();
    let fresh = loop {
        let (stream, leaf) = tls_to(p.addr, &client).await;
        if leaf == der_b {
            break stream;
        }
        assert_eq!(leaf, der_a, "a handshake showed neither certificate");
        assert!(
            start.elapsed() < DEADLINE,
            "new handshakes still get the old certificate"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let mut fresh = Conn::h1_over(fresh).await;
    let (s, _) = fresh
        .get("/v1/a")
        .await
        .expect("request on a new connection");
    assert_eq!(s, 200);

    // The connection opened before the rotation still works.
    assert!(
        !old.is_closed(),
        "the old connection was closed by the rotation"
    );
    let (s, _) = old
        .get("/v1/a")
        .await
        .expect("the keep-alive connection from before the rotation still works");
    assert_eq!(s, 200);

    // A broken certificate file is refused; the current certificate stays.
    let c = TestClient::h1(None);
    let before = metric(
        &scrape(&c, p.admin_addr).await,
        "portcullis_config_reloads_total",
        &[("result", "error")],
    )
    .unwrap_or(0.0);
    write_in_place(
        &cert_path,
        "-----BEGIN CERTIFICATE-----\nnot a certificate\n",
    );
    wait_metrics(&c, &p, "the broken certificate refused", |t| {
        metric(t, "portcullis_config_reloads_total", &[("result", "error")]).unwrap_or(0.0) > before
    })
    .await;
    let (_, leaf) = tls_to(p.addr, &client).await;
    assert_eq!(
        leaf, der_b,
        "a broken certificate file must not replace the working one"
    );
}

// ─────────────────────────────── /metrics ──────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_known_traffic_without_raw_paths_or_secrets() {
    let echo = EchoUpstream::start().await;
    let body = |extra: &str| {
        let mut s = String::from(
            "\n[plans.ws]\nlimits = [{ scope = \"workspace\", requests = 1, per = \"1m\" }]\n",
        );
        s += &upstream("echo", &echo.url(), "");
        let perm = "permissions = [\"sms.send\"]";
        s += &route("a", "/v1/a", "echo", perm);
        s += &route("b", "/v1/b", "echo", perm);
        s += &route(
            "limited",
            "/v1/limited",
            "echo",
            &format!("{perm}\nlimits = [{{ scope = \"key\", requests = 1, per = \"1m\" }}]"),
        );
        s += &route(
            "shared",
            "/v1/shared",
            "echo",
            &format!("{perm}\nlimits = [{{ scope = \"route\", requests = 1, per = \"1m\" }}]"),
        );
        s + extra
    };
    let p = spawn_gateway_process(&(head0("") + &body("")));
    let c = TestClient::h1(None);
    let (_, k1) = create_key(&p.config_path, "ws_one", "sms.send", None).await;
    let (_, k2) = create_key(&p.config_path, "ws_two", "sms.send", Some("ws")).await;
    let (_, k3) = create_key(&p.config_path, "ws_three", "sms.read", None).await;
    let bad = format!("sk_live_{}", "Zx9".repeat(12));

    let url = |path: &str| p.url(path);
    for _ in 0..3 {
        assert_eq!(get(&c, &url("/v1/a"), Some(&k1)).await.status, 200);
    }
    for _ in 0..2 {
        get(&c, &url("/nope/secret-path-9f2"), Some(&k1))
            .await
            .assert_error(404, "NOT_FOUND");
    }
    get(&c, &url("/v1/a"), Some(&bad))
        .await
        .assert_error(401, "INVALID_API_KEY");
    get(&c, &url("/v1/a"), Some(&k3))
        .await
        .assert_error(403, "FORBIDDEN");
    get(&c, &url(&format!("/v1/a?api_key={k1}")), None)
        .await
        .assert_error(400, "KEY_IN_QUERY");
    for (path, key) in [("/v1/limited", &k1), ("/v1/b", &k2), ("/v1/shared", &k1)] {
        assert_eq!(get(&c, &url(path), Some(key)).await.status, 200, "{path}");
        get(&c, &url(path), Some(key))
            .await
            .assert_error(429, "RATE_LIMITED");
    }

    // The token guards /metrics; probes need none.
    let r = c.get(&format!("http://{}/metrics", p.admin_addr)).await;
    assert_eq!(r.status, 401, "{}", r.text());
    let r = c
        .get_with(
            &format!("http://{}/metrics", p.admin_addr),
            &[("authorization", "Bearer not-the-token")],
        )
        .await;
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(
        c.get(&format!("http://{}/healthz", p.admin_addr))
            .await
            .status,
        200
    );

    let m = scrape(&c, p.admin_addr).await;
    let req = |route: &str, status: &str| {
        metric(
            &m,
            "portcullis_requests_total",
            &[("route", route), ("method", "GET"), ("status", status)],
        )
    };
    assert_eq!(req("a", "200"), Some(3.0), "{m}");
    assert_eq!(req("none", "404"), Some(2.0), "{m}");
    assert_eq!(req("a", "401"), Some(1.0), "{m}");
    assert_eq!(req("a", "403"), Some(1.0), "{m}");
    assert_eq!(
        req("none", "400"),
        Some(1.0),
        "KEY_IN_QUERY comes before routing: {m}"
    );
    for r in ["limited", "b", "shared"] {
        assert_eq!(req(r, "200"), Some(1.0), "{r}: {m}");
        assert_eq!(req(r, "429"), Some(1.0), "{r}: {m}");
    }
    let refusals = |code: &str| metric(&m, "portcullis_auth_refusals_total", &[("code", code)]);
    assert_eq!(refusals("INVALID_API_KEY"), Some(1.0), "{m}");
    assert_eq!(refusals("FORBIDDEN"), Some(1.0), "{m}");
    let limited = |scope: &str| metric(&m, "portcullis_rate_limited_total", &[("scope", scope)]);
    assert_eq!(limited("key"), Some(1.0), "{m}");
    assert_eq!(limited("workspace"), Some(1.0), "{m}");
    assert_eq!(limited("route"), Some(1.0), "{m}");
    assert_eq!(
        metric(
            &m,
            "portcullis_request_duration_seconds_count",
            &[("route", "a")]
        ),
        Some(5.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "portcullis_upstream_duration_seconds_count",
            &[("upstream", "echo")]
        ),
        Some(6.0),
        "{m}"
    );
    assert!(
        metric(&m, "portcullis_open_connections", &[]).is_some(),
        "{m}"
    );
    assert!(
        metric(&m, "portcullis_key_cache_hits_total", &[]).unwrap_or(0.0) >= 2.0,
        "{m}"
    );
    assert!(
        metric(&m, "portcullis_key_cache_misses_total", &[]).unwrap_or(0.0) >= 1.0,
        "{m}"
    );
    assert_eq!(
        metric(&m, "portcullis_config_version", &[]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "portcullis_config_last_reload_success", &[]),
        Some(1.0),
        "{m}"
    );

    // One good reload, then one bad.
    write_renamed(
        &p.config_path,
        &(head_of(&p, "") + &body(&route("c", "/v1/c", "echo", "auth = \"none\""))),
    );
    wait_metrics(&c, &p, "config_version 2", version_is(2.0)).await;
    write_renamed(&p.config_path, "[server\nlisten = ");
    let m = wait_metrics(&c, &p, "one refused reload", |t| {
        metric(t, "portcullis_config_reloads_total", &[("result", "error")]).is_some()
    })
    .await;
    assert_eq!(
        metric(&m, "portcullis_config_reloads_total", &[("result", "ok")]),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(
            &m,
            "portcullis_config_reloads_total",
            &[("result", "error")]
        ),
        Some(1.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "portcullis_config_version", &[]),
        Some(2.0),
        "{m}"
    );
    assert_eq!(
        metric(&m, "portcullis_config_last_reload_success", &[]),
        Some(0.0),
        "{m}"
    );
    // Reloads keep the request counters.
    assert_eq!(
        metric(
            &m,
            "portcullis_requests_total",
            &[("route", "a"), ("method", "GET"), ("status", "200")]
        ),
        Some(3.0),
        "{m}"
    );

    // Labels are bounded: config names and codes, never a path, query or secret.
    for needle in [
        "/nope",
        "secret-path",
        "/v1/",
        "api_key",
        k1.as_str(),
        k2.as_str(),
        k3.as_str(),
        bad.as_str(),
        ADMIN_TOKEN,
    ] {
        assert!(!m.contains(needle), "{needle:?} appears in /metrics:\n{m}");
    }
    let routes = ["a", "b", "c", "limited", "shared", "none"];
    for (name, labels, _) in samples(&m) {
        if let Some(r) = labels.get("route") {
            assert!(routes.contains(&r.as_str()), "{name}: route label {r:?}");
        }
        for v in labels.values() {
            assert!(
                !v.contains('/') && !v.contains('?'),
                "{name}: label value {v:?}"
            );
        }
    }
}

// ──────────────────────────────── JSON logs ────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_parse_line_by_line_and_never_carry_secrets() {
    let echo = EchoUpstream::start().await;
    let body = upstream("echo", &echo.url(), "")
        + &route("a", "/v1/a", "echo", "permissions = [\"sms.read\"]")
        + &route("open", "/v1/open", "echo", "auth = \"none\"");
    let mut p = spawn_gateway_process_with(&(head0("") + &body), &["--log-format", "json"]);
    let c = TestClient::h1(None);
    let (key_id, secret) = create_key(&p.config_path, "ws_logs", "sms.read", None).await;
    let key_body = secret.strip_prefix("sk_live_").expect("a live secret key");

    let ok = get(&c, &p.url("/v1/a"), Some(&secret)).await;
    assert_eq!(ok.status, 200, "{}", ok.text());
    let rid = ok.header("x-request-id").expect("X-Request-Id").to_string();
    let in_query = c.get(&p.url(&format!("/v1/open?api_key={secret}"))).await;
    in_query.assert_error(400, "KEY_IN_QUERY");
    assert!(
        !in_query.text().contains(key_body),
        "the secret echoed in the error body"
    );
    c.get(&p.url(&format!("/v1/open?x=1&token={secret}")))
        .await
        .assert_error(400, "KEY_IN_QUERY");
    let tampered = format!(
        "{}{}",
        &secret[..secret.len() - 1],
        if secret.ends_with('A') { 'B' } else { 'A' }
    );
    c.get_with(&p.url("/v1/a"), &[("x-api-key", &tampered)])
        .await
        .assert_error(401, "INVALID_API_KEY");
    get(&c, &p.url("/nope"), Some(&secret))
        .await
        .assert_error(404, "NOT_FOUND");
    scrape(&c, p.admin_addr).await;
    assert_eq!(
        echo.count(),
        1,
        "only the good request reached the upstream"
    );

    // Wait for the access lines (5 public requests), then stop the process
    // gracefully so every line is flushed.
    eventually("five access lines", DEADLINE, || async {
        json_events(&p)
            .iter()
            .filter(|e| e["target"] == "portcullis::access")
            .count()
            >= 5
    })
    .await;
    p.signal("TERM");
    let status = p.wait_exit(DEADLINE);
    assert!(status.success(), "{status}\n{}", p.output());
    p.join_output();

    let out = p.stdout();
    let lines: Vec<&str> = out.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.len() >= 6, "{out}");
    let mut events = Vec::new();
    for l in &lines {
        let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"));
        assert!(v.is_object(), "not a JSON object: {l}");
        events.push(v);
    }
    let access: Vec<&Value> = events
        .iter()
        .filter(|e| e["target"] == "portcullis::access")
        .collect();
    let line = access
        .iter()
        .find(|e| e["request_id"] == rid.as_str())
        .unwrap_or_else(|| panic!("no access line for {rid}: {out}"));
    assert_eq!(line["route"], "a", "{line}");
    assert_eq!(line["status"], 200, "{line}");
    assert_eq!(line["method"], "GET", "{line}");
    assert_eq!(line["path"], "/v1/a", "{line}");
    assert_eq!(line["key_id"], key_id.as_str(), "{line}");
    assert!(
        line["latency_ms"].as_f64().is_some_and(|l| l >= 0.0),
        "latency in {line}"
    );
    assert!(
        line["timestamp"].is_string() && line["level"].is_string(),
        "{line}"
    );
    let query_lines: Vec<&&Value> = access.iter().filter(|e| e["status"] == 400).collect();
    assert_eq!(query_lines.len(), 2, "{out}");
    for l in query_lines {
        assert_eq!(l["path"], "/v1/open", "the query string is not logged: {l}");
        assert!(l["request_id"].is_string(), "{l}");
    }
    for e in &access {
        assert!(
            e["request_id"].is_string() && e["route"].is_string() && e["status"].is_u64(),
            "{e}"
        );
        assert!(e["latency_ms"].is_number(), "{e}");
    }

    // No secret, however sent, in any line on either stream.
    let err = p.stderr();
    for (stream, text) in [("stdout", &out), ("stderr", &err)] {
        for needle in [
            secret.as_str(),
            key_body,
            tampered.as_str(),
            &tampered[8..],
            "api_key=",
            ADMIN_TOKEN,
        ] {
            assert!(!text.contains(needle), "{needle:?} in {stream}:\n{text}");
        }
    }
}

// ─────────────────────── a change during a reload ──────────────────────────

/// `n` filler routes (so that loading the file takes a noticeable time).
fn filler_routes(n: usize) -> String {
    (0..n)
        .map(|i| {
            route(
                &format!("filler{i}"),
                &format!("/filler/{i}/{{id}}"),
                "echo",
                "auth = \"none\"",
            )
        })
        .collect()
}

/// A file written while a reload is parsing the previous version must be
/// loaded too (a watcher that fingerprints the file *after* loading it marks
/// such a write as seen without ever loading it). A large file widens the
/// window to a few hundred milliseconds; SIGHUP starts a reload at a known
/// time, and the new version is written halfway through it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_written_during_a_reload_is_not_lost() {
    let echo = EchoUpstream::start().await;
    let body = |extra: &str| {
        upstream("echo", &echo.url(), "")
            + &route("a", "/v1/a", "echo", "auth = \"none\"")
            + &filler_routes(3000)
            + extra
    };
    let p = spawn_gateway_process_with(&(head0("") + &body("")), &["--log-format", "json"]);
    let c = TestClient::h1(None);
    wait_status(&c, &p.url("/v1/a"), None, 200).await;
    reload_task_running(&c, &p).await;

    // How long one reload of this file takes (SIGHUP, file unchanged).
    let seen = reload_events(&p).len();
    let t0 = Instant::now();
    p.signal("HUP");
    wait_reload(&p, seen, "the calibration reload", applied).await;
    let took = t0.elapsed();

    // Another reload, and the new version written while it parses.
    let seen = reload_events(&p).len();
    p.signal("HUP");
    tokio::time::sleep(took / 2).await;
    write_renamed(
        &p.config_path,
        &(head_of(&p, "") + &body(&route("late", "/v1/late", "echo", "auth = \"none\""))),
    );
    wait_reload(&p, seen, "the SIGHUP reload", applied).await;
    let start = Instant::now();
    loop {
        if get(&c, &p.url("/v1/late"), None).await.status == 200 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "a version written during a reload (which took about {took:?}) was never loaded: \
             the watcher fingerprinted the new file after loading the old one; reload events: {:#?}",
            reload_events(&p)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

// ─────────────────────────────── start-up ──────────────────────────────────

/// A gateway process started by hand (no readiness wait), killed on drop.
struct RawProcess {
    child: std::process::Child,
    dir: tempfile::TempDir,
    path: std::path::PathBuf,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Drop for RawProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl RawProcess {
    /// Writes `head + body` (free ports) and starts `portcullis serve` on it.
    fn start(body: &str) -> RawProcess {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("portcullis.toml");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let admin = SocketAddr::from(([127, 0, 0, 1], free_port()));
        std::fs::write(&path, Self::text(addr, admin, body)).expect("write the config");
        let child = std::process::Command::new(BIN)
            .arg("serve")
            .arg("--config")
            .arg(&path)
            .env_remove("RUST_LOG")
            .env_remove("PORTCULLIS_CONFIG")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("stderr")).expect("stderr file"))
            .spawn()
            .expect("spawn portcullis serve");
        RawProcess {
            child,
            dir,
            path,
            addr,
            admin,
        }
    }

    fn text(addr: SocketAddr, admin: SocketAddr, body: &str) -> String {
        head(
            &addr.to_string(),
            &admin.to_string(),
            "sqlite://keys.db",
            "",
        ) + body
    }

    /// Panics if the process has exited.
    fn assert_running(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            let err = std::fs::read_to_string(self.dir.path().join("stderr")).unwrap_or_default();
            panic!("{what}: the gateway exited ({status}): {err}");
        }
    }

    /// Returns as soon as the public port accepts a TCP connection (polled every millisecond).
    async fn wait_listening(&mut self) {
        let start = Instant::now();
        while TcpStream::connect(self.addr).await.is_err() {
            self.assert_running("start-up");
            assert!(start.elapsed() < DEADLINE, "never listened");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    /// `config_version` from `/metrics`, if the admin listener answers.
    async fn version(&self, c: &TestClient) -> Option<f64> {
        let req = Request::get(format!("http://{}/metrics", self.admin))
            .header("authorization", format!("Bearer {ADMIN_TOKEN}"))
            .body(empty())
            .expect("request");
        let r = c.try_send(req).await.ok()?;
        metric(&r.text(), "portcullis_config_version", &[])
    }
}

/// SIGHUP means "reload" from the moment the gateway accepts connections
/// (until a handler is installed, SIGHUP's default action kills the process).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_right_after_start_reloads_instead_of_killing_the_gateway() {
    let echo = EchoUpstream::start().await;
    let body = upstream("echo", &echo.url(), "") + &route("a", "/v1/a", "echo", "auth = \"none\"");
    let c = TestClient::h1(None);
    for attempt in 1..=5 {
        let mut p = RawProcess::start(&body);
        p.wait_listening().await;
        let pid = p.child.id().to_string();
        let hup = std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status();
        assert!(hup.is_ok_and(|s| s.success()), "kill -HUP {pid}");
        // The SIGHUP must reload (config_version 2), not end the process.
        let start = Instant::now();
        while p.version(&c).await != Some(2.0) {
            p.assert_running(&format!("attempt {attempt}: SIGHUP just after start-up"));
            assert!(
                start.elapsed() < DEADLINE,
                "attempt {attempt}: the SIGHUP reload never happened"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let r = get(&c, &format!("http://{}/v1/a", p.addr), None).await;
        assert_eq!(r.status, 200);
    }
}

/// A config written while the gateway starts is loaded. The reload task
/// takes its first fingerprint of the file when it first runs
/// (src/reload.rs `watch`: `let mut last = fingerprint(&paths).await`),
/// which is after the listeners are bound, the store is opened and the
/// workers serve; a version written after `serve` read the file but before
/// that fingerprint becomes the baseline and is never loaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_written_while_the_gateway_starts_is_loaded() {
    let echo = EchoUpstream::start().await;
    let body = |extra: &str| {
        upstream("echo", &echo.url(), "") + &route("a", "/v1/a", "echo", "auth = \"none\"") + extra
    };
    let c = TestClient::h1(None);
    for attempt in 1..=5 {
        let mut p = RawProcess::start(&body(""));
        p.wait_listening().await;
        // The gateway accepts connections: its config was read. A new version now.
        let v2 = RawProcess::text(
            p.addr,
            p.admin,
            &body(&route("b", "/v1/b", "echo", "auth = \"none\"")),
        );
        write_renamed(&p.path, &v2);
        let start = Instant::now();
        loop {
            let r = c
                .try_send(
                    Request::get(format!("http://{}/v1/b", p.addr))
                        .body(empty())
                        .expect("request"),
                )
                .await;
            if r.is_ok_and(|r| r.status == 200) {
                break;
            }
            p.assert_running(&format!("attempt {attempt}"));
            assert!(
                start.elapsed() < Duration::from_secs(3),
                "attempt {attempt}: the version written just after start-up was never \
                 loaded (config_version {:?}): the reload task's baseline fingerprint was \
                 taken after the write",
                p.version(&c).await
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

// ─────────────────── settings read only at start-up ────────────────────────

/// Every setting a reload changes either applies or is reported as needing a
/// restart, never "config reloaded" with a change that silently does
/// nothing: `[server] max_connections` (the shared accept cap) and
/// `[log] level` (the global subscriber's filter).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_read_only_at_start_are_applied_or_reported() {
    let echo = EchoUpstream::start().await;
    let body = |level: &str| {
        format!("\n[log]\nlevel = \"{level}\"\n")
            + &upstream("echo", &echo.url(), "")
            + &route("a", "/v1/a", "echo", "auth = \"none\"")
    };
    let p = spawn_gateway_process_with(
        &(head0("max_connections = 1") + &body("warn")),
        &["--log-format", "json"],
    );
    let c = TestClient::h1(None);
    // The one connection allowed, held open.
    let mut held = Conn::h1(p.addr).await;
    assert_eq!(held.get("/v1/a").await.expect("first connection").0, 200);
    reload_task_running(&c, &p).await;

    write_renamed(
        &p.config_path,
        &(head_of(&p, "max_connections = 10") + &body("info")),
    );
    wait_metrics(&c, &p, "config_version 3", version_is(3.0)).await;
    let reported = |setting: &str| {
        json_events(&p).iter().any(|e| {
            e["needs_restart"]
                .as_str()
                .is_some_and(|n| n.contains(setting))
        })
    };

    let mut problems = Vec::new();
    // max_connections 1 → 10: a second connection is served, or a restart is asked for.
    let second = tokio::time::timeout(Duration::from_secs(2), async {
        let mut conn = Conn::h1(p.addr).await;
        conn.get("/v1/a").await
    })
    .await;
    let served = matches!(second, Ok(Ok((s, _))) if s == StatusCode::OK);
    if !served && !reported("max_connections") {
        problems.push("server.max_connections 1 → 10: not applied (a second connection is never accepted) and not reported as needing a restart");
    }
    // level warn → info: access lines appear, or a restart is asked for.
    assert_eq!(held.get("/v1/a").await.expect("held connection").0, 200);
    let start = Instant::now();
    let mut logged = false;
    while start.elapsed() < Duration::from_secs(2) && !logged {
        logged = json_events(&p)
            .iter()
            .any(|e| e["target"] == "portcullis::access");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    if !logged && !reported("log") {
        problems.push("log.level warn → info: not applied (no access line) and not reported as needing a restart");
    }
    assert!(
        problems.is_empty(),
        "{problems:#?}\nreload events: {:#?}",
        json_events(&p)
            .into_iter()
            .filter(|e| e["message"].as_str().unwrap_or("").contains("reload"))
            .collect::<Vec<_>>()
    );
}
