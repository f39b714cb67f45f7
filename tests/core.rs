//! The "Gateway core" issue, end to end: config, listener (plain and TLS,
//! HTTP/1.1 and HTTP/2), request guard (raw bytes on a socket), router,
//! forwarding (streaming, trailers, WebSocket, hop-by-hop headers,
//! timeouts), JSON errors, graceful shutdown and the access log.
//!
//! In-process gateways ([`common::start_gateway`]) for most tests; the real
//! binary for signals, `check-config` and captured logs.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::{SinkExt, StreamExt};
use http::{Method, Request};
use http_body_util::BodyExt;
use portcullis::config::{self, ConfigError};
use std::path::Path;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;

// ───────────────────────────────── helpers ─────────────────────────────────

/// A gateway config with one route, `/v1/slow`, to `slow` (no key).
fn slow_config(server_extra: &str, upstream_extra: &str, slow: &SlowUpstream) -> String {
    format!(
        "{}\n[upstreams.slow]\ntargets = [\"{}\"]\n{upstream_extra}\n[[routes]]\nname = \"slow\"\npath = \"/v1/slow\"\nupstream = \"slow\"\nauth = \"none\"\n",
        gateway_toml(None, server_extra),
        slow.url()
    )
}

/// `[server]` (+ TLS) and one `echo` upstream behind `/v1/echo/*rest` (auth none).
fn echo_config(certs: Option<&TestCerts>, server_extra: &str, echo: &EchoUpstream) -> String {
    format!(
        r#"{server}
[upstreams.echo]
targets = ["{echo}"]

[[routes]]
name = "echo"
path = "/v1/echo/*rest"
upstream = "echo"
auth = "none"
"#,
        server = gateway_toml(certs, server_extra),
        echo = echo.url()
    )
}

/// A catch-all route (`/*rest`) to `echo`: anything the guard lets through
/// reaches the upstream, so "the upstream saw nothing" means "refused".
fn catch_all_config(echo: &EchoUpstream) -> String {
    format!(
        r#"{server}
[upstreams.echo]
targets = ["{echo}"]

[[routes]]
name = "all"
path = "/*rest"
upstream = "echo"
auth = "none"
"#,
        server = gateway_toml(None, ""),
        echo = echo.url()
    )
}

/// Sends `bytes` raw and asserts the guard's answer: 400, connection closed,
/// nothing forwarded.
async fn assert_rejected(gw: &TestGateway, echo: &EchoUpstream, bytes: &[u8]) -> RawReply {
    let r = raw_request(gw.addr, bytes).await;
    let shown = String::from_utf8_lossy(bytes);
    assert_eq!(
        r.status(),
        Some(400),
        "request {shown:?} got:\n{}",
        r.text()
    );
    assert!(
        r.closed,
        "the connection must be closed after a 400 for {shown:?}"
    );
    // Give a (wrongly) forwarded request time to reach the upstream.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(
        echo.count(),
        0,
        "the upstream must see nothing for {shown:?}; it saw {:?}",
        echo.requests()
    );
    r
}

/// Asserts a raw reply carries the gateway's JSON error with `code`.
fn assert_raw_json_error(r: &RawReply, code: &str) {
    let v: serde_json::Value = serde_json::from_str(r.body().trim())
        .unwrap_or_else(|e| panic!("JSON error body expected ({e}):\n{}", r.text()));
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(
        v["error"]["request_id"]
            .as_str()
            .is_some_and(|s| !s.is_empty()),
        "{v}"
    );
}

fn post(url: &str, b: impl Into<Bytes>) -> Request<ReqBody> {
    Request::post(url).body(body(b)).expect("request")
}

fn parse_err(text: &str) -> ConfigError {
    parse_err_env(text, |_| None)
}

fn parse_err_env(text: &str, env: impl Fn(&str) -> Option<String>) -> ConfigError {
    match config::parse(Path::new("/etc/portcullis/test.toml"), text, env) {
        Ok(_) => panic!("config accepted, expected an error:\n{text}"),
        Err(e) => e,
    }
}

/// 1-based (line, column) of the first occurrence of `needle` in `text`.
fn pos_of(text: &str, needle: &str) -> (usize, usize) {
    let off = text
        .find(needle)
        .unwrap_or_else(|| panic!("{needle:?} not in config"));
    let before = &text[..off];
    let line = before.matches('\n').count() + 1;
    let col = off - before.rfind('\n').map_or(0, |i| i + 1) + 1;
    (line, col)
}

/// Asserts the config error has a diagnostic at `needle`'s position whose
/// message contains `msg`, printed as `file:line:col: …`.
fn assert_diag_at(e: &ConfigError, text: &str, needle: &str, msg: &str) {
    let (line, col) = pos_of(text, needle);
    let found = e.diagnostics.iter().find(|d| d.message.contains(msg));
    let d = found.unwrap_or_else(|| panic!("no diagnostic mentioning {msg:?}: {e}"));
    assert_eq!(
        (d.line, d.col),
        (line, col),
        "position of {msg:?} (at {needle:?}); all: {e}"
    );
    let shown = e.to_string();
    assert!(
        shown.contains(&format!("/etc/portcullis/test.toml:{line}:{col}: ")),
        "printed form: {shown}"
    );
}

const BASE: &str = r#"[server]
listen = "127.0.0.1:0"

[upstreams.sms]
targets = ["http://127.0.0.1:7001"]

[[routes]]
name = "sms.send"
methods = ["POST"]
path = "/v1/sms/send"
upstream = "sms"
"#;

// ───────────────────────────────── config ──────────────────────────────────

#[test]
fn config_accepts_server_tls_upstreams_and_routes_with_auth_none() {
    let certs = TestCerts::generate();
    let text = format!(
        r#"[server]
listen = "127.0.0.1:8443"
max_body_bytes = 1234
http2_max_concurrent_streams = 7
{tls}
[upstreams.sms]
targets = ["http://10.0.0.5:7001", "https://10.0.0.6:7001/"]
test_targets = ["http://10.0.0.9:7001"]

[[routes]]
name = "health"
methods = ["GET"]
path = "/health"
upstream = "sms"
auth = "none"

[[routes]]
name = "sms.read"
path = "/v1/sms/{{id}}"
upstream = "sms"
permissions = ["sms.read"]
max_body_bytes = 10
websocket = true
"#,
        tls = certs.server_tls_toml()
    );
    let cfg =
        config::parse(Path::new("/x/p.toml"), &text, |_| None).unwrap_or_else(|e| panic!("{e}"));
    let tls = cfg.server.tls.as_ref().expect("[server.tls]");
    assert_eq!(tls.cert, certs.cert_path);
    assert_eq!(tls.key, certs.key_path);
    assert_eq!(cfg.server.listen.to_string(), "127.0.0.1:8443");
    assert_eq!(cfg.server.http2_max_concurrent_streams, 7);
    let up = &cfg.upstreams["sms"];
    assert_eq!(up.targets.len(), 2);
    assert_eq!(up.test_targets.len(), 1);
    assert_eq!(cfg.routes.len(), 2);
    assert_eq!(cfg.routes[0].auth, config::AuthMode::None);
    assert_eq!(
        cfg.routes[1].auth,
        config::AuthMode::Key,
        "auth defaults to key"
    );
    assert_eq!(
        cfg.routes[1].key_kinds,
        vec!["secret".to_string()],
        "key_kinds defaults to secret"
    );
    assert_eq!(cfg.routes[0].max_body_bytes, 1234, "server default applies");
    assert_eq!(cfg.routes[1].max_body_bytes, 10, "per-route override");
    assert!(cfg.routes[1].websocket);
    assert!(cfg.routes[1].methods.is_none(), "no methods means any");
}

#[test]
fn config_interpolates_env_vars_in_strings() {
    let text = BASE.replace("http://127.0.0.1:7001", "${SMS_URL}");
    let env = |k: &str| (k == "SMS_URL").then(|| "http://10.1.2.3:7001".to_string());
    let cfg = config::parse(Path::new("/x/p.toml"), &text, env).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        cfg.upstreams["sms"].targets[0].to_string(),
        "http://10.1.2.3:7001/"
    );

    // An unset variable is an error at the `$`.
    let e = parse_err(&text);
    let (line, col) = pos_of(&text, "${SMS_URL}");
    assert_eq!(
        (e.diagnostics[0].line, e.diagnostics[0].col),
        (line, col),
        "{e}"
    );
    assert!(e.to_string().contains("SMS_URL"), "{e}");
}

#[test]
fn config_error_columns_refer_to_the_file_as_written_after_interpolation() {
    // The interpolated value is longer than `${SMS_URL}`: a later error on
    // the same line must still point at the column in the file.
    let text = BASE.replace(
        r#"["http://127.0.0.1:7001"]"#,
        r#"["${SMS_URL}", "ftp://10.0.0.1:21"]"#,
    );
    let e = parse_err_env(&text, |k| {
        (k == "SMS_URL").then(|| "http://some-long-host.example.internal:7001".to_string())
    });
    assert_diag_at(&e, &text, "\"ftp://", "http:// or https://");
}

#[test]
fn config_parses_human_durations() {
    let text = format!(
        "{}shutdown_grace = \"1m 30s\"\nheader_read_timeout = \"250ms\"\n{}",
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        &BASE[BASE.find("\n[upstreams").unwrap()..].replace(
            "targets = [\"http://127.0.0.1:7001\"]",
            "targets = [\"http://127.0.0.1:7001\"]\nconnect_timeout = \"250ms\"\nrequest_timeout = \"1d\""
        )
    );
    let cfg = config::parse(Path::new("/x/p.toml"), &text, |_| None)
        .unwrap_or_else(|e| panic!("{e}\n{text}"));
    assert_eq!(cfg.server.shutdown_grace, Duration::from_secs(90));
    assert_eq!(cfg.server.header_read_timeout, Duration::from_millis(250));
    assert_eq!(
        cfg.upstreams["sms"].connect_timeout,
        Duration::from_millis(250)
    );
    assert_eq!(
        cfg.upstreams["sms"].request_timeout,
        Duration::from_secs(86400)
    );

    let bad = BASE.replace(
        "targets = [",
        "connect_timeout = \"5 parsecs\"\ntargets = [",
    );
    let e = parse_err(&bad);
    let (line, _) = pos_of(&bad, "connect_timeout");
    assert_eq!(e.diagnostics[0].line, line, "{e}");
}

#[test]
fn config_rejects_unknown_keys_with_line_and_column() {
    let text = BASE.replace(
        "upstream = \"sms\"",
        "upstream = \"sms\"\nupstraem_timeout = \"1s\"",
    );
    let e = parse_err(&text);
    let (line, col) = pos_of(&text, "upstraem_timeout");
    assert_eq!(
        (e.diagnostics[0].line, e.diagnostics[0].col),
        (line, col),
        "{e}"
    );
    assert!(e.to_string().contains("upstraem_timeout"), "{e}");

    let text = BASE.replace("[server]\n", "[server]\nlisten_port = 1\n");
    let e = parse_err(&text);
    assert_eq!(e.diagnostics[0].line, 2, "{e}");
}

#[test]
fn config_rejects_a_route_to_an_unknown_upstream() {
    let text = BASE.replace("upstream = \"sms\"", "upstream = \"smss\"");
    assert_diag_at(&parse_err(&text), &text, "\"smss\"", "not defined");
}

#[test]
fn config_rejects_duplicate_method_and_path() {
    let text = format!(
        "{BASE}\n[[routes]]\nname = \"sms.send2\"\nmethods = [\"POST\"]\npath = \"/v1/sms/send\" # again\nupstream = \"sms\"\n"
    );
    assert_diag_at(
        &parse_err(&text),
        &text,
        "\"/v1/sms/send\" # again",
        "POST /v1/sms/send",
    );
}

#[test]
fn config_rejects_malformed_path_patterns() {
    for bad in ["/v1/{id", "v1/sms", "/v1/*rest/more", "/v1//x", "/v1/{i-d}"] {
        let text = BASE.replace("\"/v1/sms/send\"", &format!("{bad:?}"));
        let e = parse_err(&text);
        let (line, col) = pos_of(&text, &format!("{bad:?}"));
        assert_eq!(
            (e.diagnostics[0].line, e.diagnostics[0].col),
            (line, col),
            "{bad}: {e}"
        );
    }
}

#[test]
fn config_rejects_non_http_upstream_urls() {
    for bad in [
        "ftp://127.0.0.1:21",
        "127.0.0.1:7001",
        "http://127.0.0.1:7001/path",
    ] {
        let text = BASE.replace("\"http://127.0.0.1:7001\"", &format!("{bad:?}"));
        let e = parse_err(&text);
        let (line, col) = pos_of(&text, &format!("{bad:?}"));
        assert_eq!(
            (e.diagnostics[0].line, e.diagnostics[0].col),
            (line, col),
            "{bad}: {e}"
        );
        assert!(e.to_string().contains("upstream sms"), "{e}");
    }
}

#[test]
fn config_rejects_missing_cert_files() {
    let text = BASE.replace(
        "listen = \"127.0.0.1:0\"\n",
        "listen = \"127.0.0.1:0\"\n[server.tls]\ncert = \"/nonexistent/cert.pem\"\nkey = \"/nonexistent/key.pem\"\n",
    );
    let e = parse_err(&text);
    assert_diag_at(&e, &text, "\"/nonexistent/cert.pem\"", "does not exist");
    assert_diag_at(&e, &text, "\"/nonexistent/key.pem\"", "key file");
}

#[test]
fn check_config_exits_1_naming_file_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let text = BASE.replace("upstream = \"sms\"", "upstream = \"nope\"");
    std::fs::write(&path, &text).unwrap();
    let out = run_cli(["check-config".as_ref(), path.as_os_str()]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stderr: {stderr}");
    let (line, col) = pos_of(&text, "\"nope\"");
    let want = format!("{}:{line}:{col}: ", path.display());
    assert!(
        stderr.contains(&want),
        "expected {want:?} in stderr: {stderr}"
    );

    let good = dir.path().join("good.toml");
    std::fs::write(&good, BASE).unwrap();
    let out = run_cli(["check-config".as_ref(), good.as_os_str()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

// ──────────────────────────────── listener ─────────────────────────────────

async fn forwards_over(certs: Option<&TestCerts>, proto: Proto) {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(certs, "", &echo)).await;
    let client = TestClient::new(proto, certs);
    let r = client.send(post(&gw.url("/v1/echo/a?x=1"), "ping")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    let want = if proto == Proto::Http2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    assert_eq!(r.version, want);
    let seen = echo.last();
    assert_eq!(seen.method, Method::POST);
    assert_eq!(seen.path_and_query, "/v1/echo/a?x=1");
    assert_eq!(&seen.body[..], b"ping");
    assert_eq!(
        seen.header("x-forwarded-proto"),
        Some(if certs.is_some() { "https" } else { "http" })
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_serves_http1_over_plain_http() {
    forwards_over(None, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_serves_http2_over_plain_http() {
    forwards_over(None, Proto::Http2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_serves_http1_over_tls() {
    let certs = TestCerts::generate();
    forwards_over(Some(&certs), Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_serves_http2_over_tls() {
    let certs = TestCerts::generate();
    forwards_over(Some(&certs), Proto::Http2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_negotiates_alpn_h2_then_http11_with_tls_1_2_and_1_3() {
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(Some(&certs), "", &echo)).await;

    let s = tls_connect(gw.addr, certs.client_config(&[], &[b"h2", b"http/1.1"]))
        .await
        .unwrap();
    assert_eq!(
        s.get_ref().1.alpn_protocol(),
        Some(&b"h2"[..]),
        "h2 preferred"
    );
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    let s = tls_connect(
        gw.addr,
        certs.client_config(&[&rustls::version::TLS12], &[b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        s.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let r = raw_exchange(
        s,
        b"GET /v1/echo/tls12 HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n",
        Duration::from_secs(3),
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(echo.last().header("x-forwarded-proto"), Some("https"));
    gw.shutdown().await;
}

/// A TLS 1.1 ClientHello (no supported_versions extension).
fn tls11_client_hello() -> Vec<u8> {
    let mut hello = vec![0x03, 0x02]; // client_version TLS 1.1
    hello.extend_from_slice(&[0x42; 32]); // random
    hello.push(0); // session id
    hello.extend_from_slice(&[0x00, 0x04, 0xc0, 0x13, 0x00, 0x2f]); // 2 cipher suites
    hello.extend_from_slice(&[0x01, 0x00]); // null compression
    let mut hs = vec![0x01, 0x00, (hello.len() >> 8) as u8, hello.len() as u8];
    hs.extend_from_slice(&hello);
    let mut rec = vec![0x16, 0x03, 0x01, (hs.len() >> 8) as u8, hs.len() as u8];
    rec.extend_from_slice(&hs);
    rec
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_refuses_versions_below_1_2() {
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(Some(&certs), "", &echo)).await;
    let r = raw_request(gw.addr, &tls11_client_hello()).await;
    assert!(r.closed, "the handshake must fail");
    // An alert (0x15), never a ServerHello (handshake record 0x16).
    assert_eq!(
        r.bytes.first(),
        Some(&0x15),
        "expected a TLS alert, got {:02x?}",
        r.bytes
    );
    gw.shutdown().await;
}

/// The gateway's gauge of parked (idle, bufferless) client connections.
fn parked(gw: &TestGateway) -> i64 {
    gw.app().metrics.parked_connections.get()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_keepalive_connection_is_parked_and_serves_its_next_request() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /v1/echo/one HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let first = read_one_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    // Idle: the connection gives up its HTTP state and is parked.
    eventually(
        "the idle connection to be parked",
        Duration::from_secs(5),
        || async { parked(&gw) == 1 },
    )
    .await;
    s.write_all(b"GET /v1/echo/two HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let second = read_one_response(&mut s).await;
    assert!(second.starts_with("HTTP/1.1 200"), "{second}");
    assert_eq!(echo.last().path_and_query, "/v1/echo/two");
    assert_eq!(echo.count(), 2);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_head_split_by_a_pause_is_served_whole() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /v1/echo/split HTTP/1.1\r\nHost: a\r\nX-Part: ")
        .await
        .unwrap();
    // Long enough for an idle connection to be parked (one to two 100 ms
    // ticks): the bytes already read must survive it.
    tokio::time::sleep(Duration::from_millis(400)).await;
    s.write_all(b"one\r\n\r\n").await.unwrap();
    let r = read_one_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let seen = echo.last();
    assert_eq!(seen.path_and_query, "/v1/echo/split");
    assert_eq!(
        seen.headers.get("x-part").and_then(|v| v.to_str().ok()),
        Some("one")
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keepalive_timeout_closes_an_idle_connection() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "keepalive_timeout = \"600ms\"", &echo)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    s.write_all(b"GET /v1/echo/ka HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let r = read_one_response(&mut s).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    let idle = Instant::now();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the gateway closes the idle connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "closed without sending anything");
    assert!(
        idle.elapsed() >= Duration::from_millis(400),
        "closed after only {:?}",
        idle.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_idle_connections_are_parked_and_all_serve_again() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    // More connections than the listener keeps warm between requests, so
    // most are parked the moment they go idle.
    let mut conns = Vec::new();
    for i in 0..300 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(format!("GET /v1/echo/a{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let r = read_one_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
        conns.push(s);
    }
    eventually(
        "all idle connections to be parked",
        Duration::from_secs(5),
        || async { parked(&gw) == 300 },
    )
    .await;
    for (i, s) in conns.iter_mut().enumerate() {
        s.write_all(format!("GET /v1/echo/b{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
    }
    for s in conns.iter_mut() {
        let r = read_one_response(s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert_eq!(echo.count(), 600);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crowd_of_connections_with_half_sent_heads_is_served() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    // More open sessions than the listener keeps warm: each one waiting for
    // the rest of its head is parked at once and must keep what it read.
    let mut conns = Vec::new();
    for i in 0..200 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(format!("GET /v1/echo/h{i} HTTP/1.1\r\nHost: a\r\n").as_bytes())
            .await
            .unwrap();
        conns.push(s);
    }
    for s in conns.iter_mut() {
        s.write_all(b"X-Rest: 1\r\n\r\n").await.unwrap();
    }
    for s in conns.iter_mut() {
        let r = read_one_response(s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    assert_eq!(echo.count(), 200);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_busy_connection_in_a_crowd_keeps_its_session_between_requests() {
    let echo = EchoUpstream::start().await;
    let slow = SlowUpstream::start(Duration::from_secs(3)).await;
    let text = format!(
        "{}\n[upstreams.slow]\ntargets = [\"{}\"]\n[[routes]]\nname = \"slow\"\npath = \"/v1/slow\"\nupstream = \"slow\"\nauth = \"none\"\n",
        echo_config(None, "", &echo),
        slow.url()
    );
    let gw = start_gateway(&text).await;
    // A crowd of open sessions, more than the listener keeps warm: each
    // holds a request the slow upstream sits on.
    let mut crowd = Vec::new();
    for _ in 0..150 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(b"GET /v1/slow HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .unwrap();
        crowd.push(s);
    }
    eventually(
        "the crowd's requests to reach the upstream",
        Duration::from_secs(5),
        || async { slow.arrived() == 150 },
    )
    .await;
    // Meanwhile one client sends request after request on its connection:
    // its session is taken apart at most once, not after every response.
    let before = gw.app().metrics.parks.get();
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    for i in 0..20 {
        s.write_all(format!("GET /v1/echo/r{i} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let r = read_one_response(&mut s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    let parks = gw.app().metrics.parks.get() - before;
    assert!(slow.completed() < 150, "the crowd was still in flight");
    assert!(
        parks <= 2,
        "the busy connection was parked {parks} times in 20 requests"
    );
    for s in crowd.iter_mut() {
        let r = read_one_response(s).await;
        assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_closes_a_slow_client() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "header_read_timeout = \"500ms\"", &echo)).await;
    let start = Instant::now();
    let r = raw_request_wait(
        gw.addr,
        b"GET /v1/echo/slow HTTP/1.1\r\nHost: a\r\n",
        Duration::from_secs(5),
    )
    .await;
    assert!(r.closed, "an unfinished request head must be cut off");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        start.elapsed()
    );
    assert_eq!(echo.count(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_request_headers_get_431() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "max_header_bytes = 8192", &echo)).await;
    let big = "a".repeat(20_000);
    let req = format!("GET /v1/echo/x HTTP/1.1\r\nHost: a\r\nX-Big: {big}\r\n\r\n");
    let r = raw_request(gw.addr, req.as_bytes()).await;
    assert_eq!(r.status(), Some(431), "{}", r.text());
    // Headers just under the limit pass.
    let ok = format!(
        "GET /v1/echo/x HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(6000)
    );
    let r2 = raw_request(gw.addr, ok.as_bytes()).await;
    assert_eq!(r2.status(), Some(200), "{}", r2.text());
    assert_eq!(echo.count(), 1, "only the small request is forwarded");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_bodies_get_413_with_per_route_override() {
    let echo = EchoUpstream::start().await;
    let text = format!(
        "{}\n[[routes]]\nname = \"small\"\npath = \"/v1/small/*rest\"\nupstream = \"echo\"\nauth = \"none\"\nmax_body_bytes = 16\n",
        echo_config(None, "max_body_bytes = 64", &echo)
    );
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    c.send(post(&gw.url("/v1/small/a"), vec![b'x'; 32]))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE");
    assert_eq!(
        echo.count(),
        0,
        "a declared oversized body is refused before forwarding"
    );
    let r = c.send(post(&gw.url("/v1/echo/a"), vec![b'x'; 32])).await;
    assert_eq!(r.status, 200, "32 bytes fit the server-wide 64");
    c.send(post(&gw.url("/v1/echo/a"), vec![b'x'; 100]))
        .await
        .assert_error(413, "PAYLOAD_TOO_LARGE");
    let r = c.send(post(&gw.url("/v1/small/a"), vec![b'x'; 16])).await;
    assert_eq!(r.status, 200, "exactly the limit fits");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_chunked_bodies_get_413() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "max_body_bytes = 64", &echo)).await;
    let c = TestClient::h1(None);
    let (tx, b) = channel_body();
    for _ in 0..4 {
        tx.send(Bytes::from(vec![b'y'; 40])).unwrap();
    }
    drop(tx);
    let r = c
        .send(Request::post(gw.url("/v1/echo/chunked")).body(b).unwrap())
        .await;
    r.assert_error(413, "PAYLOAD_TOO_LARGE");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn max_connections_caps_open_connections() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "max_connections = 2", &echo)).await;
    let req = b"GET /v1/echo/c HTTP/1.1\r\nHost: a\r\n\r\n";
    // Two keep-alive connections, each proven served.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut s = TcpStream::connect(gw.addr).await.unwrap();
        s.write_all(req).await.unwrap();
        let mut buf = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{}",
            String::from_utf8_lossy(&buf[..n])
        );
        held.push(s);
    }
    // A third waits: the kernel queues it but the gateway does not serve it.
    let mut third = TcpStream::connect(gw.addr).await.unwrap();
    third.write_all(req).await.unwrap();
    let mut buf = [0u8; 4096];
    let early = tokio::time::timeout(Duration::from_millis(700), third.read(&mut buf)).await;
    assert!(
        early.is_err(),
        "the third connection was served while two were open"
    );
    // Closing one frees a slot.
    drop(held.pop());
    let n = tokio::time::timeout(Duration::from_secs(3), third.read(&mut buf))
        .await
        .expect("served after a slot freed")
        .unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_max_concurrent_streams_is_enforced() {
    let slow = SlowUpstream::start(Duration::from_millis(300)).await;
    let text = slow_config("http2_max_concurrent_streams = 1", "", &slow);
    let gw = start_gateway(&text).await;
    let c = TestClient::h2(None);
    assert_eq!(
        c.get(&gw.url("/v1/slow")).await.status,
        200,
        "warm-up: one h2 connection"
    );
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let (c, url) = (c.clone(), gw.url("/v1/slow"));
        tasks.push(tokio::spawn(async move { c.get(&url).await.status }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    assert_eq!(
        slow.max_in_flight(),
        1,
        "one stream at a time on the connection"
    );
    assert!(
        start.elapsed() >= Duration::from_millis(850),
        "three 300 ms requests ran one after another"
    );
    gw.shutdown().await;
}

// ────────────────────────────────── guard ──────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_content_length_with_transfer_encoding() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    // The classic CL.TE smuggling probe: a second request hidden in the body.
    let smuggle = b"POST /v1/a HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n";
    assert_rejected(&gw, &echo, smuggle).await;
    let te_first = b"POST /v1/a HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n";
    assert_rejected(&gw, &echo, te_first).await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_looks_like_framing_headers_is_not_taken_for_a_head() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    // An uploaded HTTP dump: the body's own lines must not mark the connection.
    let body = "Content-Length: 1\r\nContent-Length: 2\r\nTransfer-Encoding: chunked\r\n";
    let post = format!(
        "POST /v1/upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(post.as_bytes()).await.unwrap();
    let first = read_one_response(&mut s).await;
    assert!(first.starts_with("HTTP/1.1 200"), "the upload: {first}");
    let chunked = format!(
        "POST /v1/upload HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{body}\r\n0\r\n\r\n",
        body.len()
    );
    s.write_all(chunked.as_bytes()).await.unwrap();
    let second = read_one_response(&mut s).await;
    assert!(
        second.starts_with("HTTP/1.1 200"),
        "the chunked upload: {second}"
    );
    s.write_all(b"GET /v1/next HTTP/1.1\r\nHost: a\r\n\r\n")
        .await
        .unwrap();
    let third = read_one_response(&mut s).await;
    assert!(
        third.starts_with("HTTP/1.1 200"),
        "the next request on the connection: {third}"
    );
    assert_eq!(echo.count(), 3);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_two_content_lengths() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    assert_rejected(
        &gw,
        &echo,
        b"POST /v1/a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 7\r\n\r\nhello12",
    )
    .await;
    assert_rejected(
        &gw,
        &echo,
        b"POST /v1/a HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_missing_host_on_http11() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    let r = assert_rejected(&gw, &echo, b"GET /v1/a HTTP/1.1\r\n\r\n").await;
    assert_raw_json_error(&r, "BAD_REQUEST");
    let r = assert_rejected(&gw, &echo, b"GET /v1/a HTTP/1.1\r\nHost: \r\n\r\n").await;
    assert_raw_json_error(&r, "BAD_REQUEST");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_duplicated_host() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    let r = assert_rejected(
        &gw,
        &echo,
        b"GET /v1/a HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n",
    )
    .await;
    assert_raw_json_error(&r, "BAD_REQUEST");
    assert_rejected(
        &gw,
        &echo,
        b"GET /v1/a HTTP/1.1\r\nHost: a.example\r\nHost: a.example\r\n\r\n",
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_absolute_form_targets() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    let r = assert_rejected(
        &gw,
        &echo,
        b"GET http://internal.example/admin HTTP/1.1\r\nHost: internal.example\r\n\r\n",
    )
    .await;
    assert_raw_json_error(&r, "BAD_REQUEST");
    assert_rejected(
        &gw,
        &echo,
        b"GET https://a/v1/a HTTP/1.1\r\nHost: a\r\n\r\n",
    )
    .await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_opaque_and_authority_form_targets() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    for req in [
        &b"GET * HTTP/1.1\r\nHost: a\r\n\r\n"[..],
        b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET mailto:someone@example.com HTTP/1.1\r\nHost: a\r\n\r\n",
        b"CONNECT internal.example:443 HTTP/1.1\r\nHost: internal.example:443\r\n\r\n",
    ] {
        assert_rejected(&gw, &echo, req).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_control_characters_in_the_path() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    for path in [
        &b"/v1/a\x01b"[..],
        b"/v1/a\x7fb",
        b"/v1/a%01b",
        b"/v1/a%7Fb",
        b"/v1/a%0d%0aX-Injected:%201",
    ] {
        let mut req = b"GET ".to_vec();
        req.extend_from_slice(path);
        req.extend_from_slice(b" HTTP/1.1\r\nHost: a\r\n\r\n");
        assert_rejected(&gw, &echo, &req).await;
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_encoded_slash_backslash_nul_and_dot() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    for path in [
        "/v1/a%2Fb",
        "/v1/a%2fb",
        "/v1/a%5Cb",
        "/v1/a%5cb",
        "/v1/a%00b",
        "/v1/%2E%2E/admin",
        "/v1/%2e/x",
        "/v1/a\\b",
    ] {
        let r = assert_rejected(
            &gw,
            &echo,
            format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        )
        .await;
        assert_raw_json_error(&r, "BAD_REQUEST");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_dot_segments_climbing_above_root() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&catch_all_config(&echo)).await;
    for path in [
        "/../etc/passwd",
        "/v1/../../etc/passwd",
        "/./../x",
        "/v1/a/../../../b",
        "/..",
    ] {
        let r = assert_rejected(
            &gw,
            &echo,
            format!("GET {path} HTTP/1.1\r\nHost: a\r\n\r\n").as_bytes(),
        )
        .await;
        assert_raw_json_error(&r, "BAD_REQUEST");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_forwards_one_canonical_path() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let cases = [
        ("/v1//echo/./a/../b/?q=1&r=%2F", "/v1/echo/b/?q=1&r=%2F"),
        ("/v1/x/../echo/z", "/v1/echo/z"),
        ("/v1/echo/a//b///c", "/v1/echo/a/b/c"),
        ("/v1/echo/a/b/..", "/v1/echo/a/"),
        ("/v1/echo/%41b", "/v1/echo/Ab"),
        ("/v1/echo/a%3ab%7e", "/v1/echo/a%3Ab~"),
    ];
    for (sent, forwarded) in cases {
        let r = raw_request(
            gw.addr,
            format!("GET {sent} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status(), Some(200), "{sent}: {}", r.text());
        assert_eq!(echo.last().path_and_query, forwarded, "{sent}");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routing_is_case_sensitive() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let c = TestClient::h1(None);
    c.get(&gw.url("/V1/echo/x"))
        .await
        .assert_error(404, "NOT_FOUND");
    c.get(&gw.url("/v1/ECHO/x"))
        .await
        .assert_error(404, "NOT_FOUND");
    assert_eq!(echo.count(), 0);
    assert_eq!(c.get(&gw.url("/v1/echo/X")).await.status, 200);
    assert_eq!(echo.last().path_and_query, "/v1/echo/X", "case preserved");
    gw.shutdown().await;
}

// ───────────────────────────────── router ──────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_prefers_exact_over_param_over_tail() {
    let ups = [
        EchoUpstream::start_named("exact").await,
        EchoUpstream::start_named("param").await,
        EchoUpstream::start_named("tail").await,
        EchoUpstream::start_named("outer").await,
    ];
    let mut text = gateway_toml(None, "");
    for u in &ups {
        text.push_str(&format!(
            "[upstreams.{}]\ntargets = [\"{}\"]\n",
            u.name,
            u.url()
        ));
    }
    for (name, path) in [
        ("outer", "/v1/*rest"),
        ("tail", "/v1/files/*rest"),
        ("param", "/v1/files/{id}/meta"),
        ("exact", "/v1/files/special/meta"),
    ] {
        text.push_str(&format!(
            "[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"{path}\"\nupstream = \"{name}\"\nauth = \"none\"\n"
        ));
    }
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    for (path, want) in [
        ("/v1/files/special/meta", "exact"),
        ("/v1/files/123/meta", "param"),
        ("/v1/files/123/other", "tail"),
        ("/v1/files/a/b/c", "tail"),
        ("/v1/other/x", "outer"),
    ] {
        let r = c.get(&gw.url(path)).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
        assert_eq!(r.json()["upstream"], want, "{path}");
        assert_eq!(r.json()["path"], path, "{path} forwarded unchanged");
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_answers_404_not_found_for_unknown_paths() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    for client in [TestClient::h1(None), TestClient::h2(None)] {
        let r = client.get(&gw.url("/v2/nothing/here")).await;
        r.assert_error(404, "NOT_FOUND");
        assert_eq!(r.header("content-type"), Some("application/json"));
    }
    assert_eq!(echo.count(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn router_answers_405_with_allow_for_a_wrong_method() {
    let echo = EchoUpstream::start().await;
    let text = format!(
        "{}\n[upstreams.echo]\ntargets = [\"{}\"]\n\
         [[routes]]\nname = \"things.write\"\nmethods = [\"PUT\", \"DELETE\"]\npath = \"/v1/things/{{id}}\"\nupstream = \"echo\"\nauth = \"none\"\n\
         [[routes]]\nname = \"things.create\"\nmethods = [\"POST\"]\npath = \"/v1/things\"\nupstream = \"echo\"\nauth = \"none\"\n",
        gateway_toml(None, ""),
        echo.url()
    );
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    let r = c.get(&gw.url("/v1/things/42")).await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    assert_eq!(r.header("allow"), Some("PUT, DELETE"));
    let r = c.get(&gw.url("/v1/things")).await;
    r.assert_error(405, "METHOD_NOT_ALLOWED");
    assert_eq!(r.header("allow"), Some("POST"));
    assert_eq!(echo.count(), 0);
    let r = c
        .send(
            Request::delete(gw.url("/v1/things/42"))
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    gw.shutdown().await;
}

// ─────────────────────────────── forwarding ────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_passes_method_query_headers_and_body_unchanged() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let c = TestClient::h1(None);
    let req = Request::builder()
        .method("PATCH")
        .uri(gw.url("/v1/echo/items/7?a=1&b=two%20words&a=3"))
        .header("content-type", "application/merge-patch+json")
        .header("x-custom", "v1")
        .header("accept", "application/json")
        .body(body(r#"{"name":"new"}"#))
        .unwrap();
    let r = c.send(req).await;
    assert_eq!(r.status, 200);
    let seen = echo.last();
    assert_eq!(seen.method, Method::PATCH);
    assert_eq!(
        seen.path_and_query,
        "/v1/echo/items/7?a=1&b=two%20words&a=3"
    );
    assert_eq!(
        seen.header("content-type"),
        Some("application/merge-patch+json")
    );
    assert_eq!(seen.header("x-custom"), Some("v1"));
    assert_eq!(seen.header("accept"), Some("application/json"));
    assert_eq!(&seen.body[..], br#"{"name":"new"}"#);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_reuses_a_pooled_keepalive_connection() {
    let echo = EchoUpstream::start().await;
    // One worker: each worker keeps its own pool.
    let gw = start_gateway(&echo_config(None, "workers = 1", &echo)).await;
    let c = TestClient::h1(None);
    for i in 0..5 {
        assert_eq!(c.get(&gw.url(&format!("/v1/echo/{i}"))).await.status, 200);
    }
    // Different client connections share the upstream pool too.
    for i in 0..3 {
        let r = raw_request(
            gw.addr,
            format!("GET /v1/echo/raw{i} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        assert_eq!(r.status(), Some(200));
    }
    assert_eq!(echo.count(), 8);
    assert_eq!(
        echo.connections(),
        1,
        "sequential requests must reuse one upstream connection"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pooled_connection_idle_past_pool_idle_timeout_is_not_reused() {
    let echo = EchoUpstream::start().await;
    let text = echo_config(None, "workers = 1", &echo).replace(
        "[upstreams.echo]",
        "[upstreams.echo]\npool_idle_timeout = \"300ms\"",
    );
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    assert_eq!(c.get(&gw.url("/v1/echo/a")).await.status, 200);
    assert_eq!(c.get(&gw.url("/v1/echo/b")).await.status, 200);
    assert_eq!(echo.connections(), 1, "reused while fresh");
    // Time passing is the point here: nothing to wait on but the clock.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(c.get(&gw.url("/v1/echo/c")).await.status, 200);
    assert_eq!(echo.connections(), 2, "a stale connection is replaced");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_more_than_pool_max_idle_upstream_connections_are_kept() {
    let slow = SlowUpstream::start(Duration::from_millis(200)).await;
    let text = slow_config("workers = 1", "pool_max_idle = 2", &slow);
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    let url = gw.url("/v1/slow");
    let burst = || futures_util::future::join_all((0..6).map(|_| c.get(&url)));
    for r in burst().await {
        assert_eq!(r.status, 200);
    }
    assert_eq!(slow.max_in_flight(), 6, "the six requests overlapped");
    assert_eq!(
        slow.connections(),
        6,
        "one connection per request in flight"
    );
    for r in burst().await {
        assert_eq!(r.status, 200);
    }
    // Two were kept and reused; the other four had closed after their
    // exchange, so four more were opened.
    assert_eq!(slow.connections(), 10);
    gw.shutdown().await;
}

/// The pooled-connections gauge of upstream `name` (set by the pool sweep,
/// every second).
fn pooled(gw: &TestGateway, name: &str) -> i64 {
    gw.app()
        .metrics
        .pooled_connections
        .get_or_create(&portcullis::metrics::UpstreamLabel {
            upstream: name.into(),
        })
        .get()
}

/// A pool keeps 32 connections to begin with; while connections are turned
/// away for want of room, it grows (by up to 64 a second) to the load, so a
/// sustained load ends up churning nothing, while a one-off burst leaves no
/// more than the base behind; once idle, what the load no longer needs is
/// closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_grows_to_a_sustained_load_and_gives_back_what_it_no_longer_needs() {
    let slow = SlowUpstream::start(Duration::from_millis(300)).await;
    let text = slow_config("workers = 1", "pool_idle_timeout = \"3s\"", &slow);
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    let url = gw.url("/v1/slow");
    let burst = || futures_util::future::join_all((0..40).map(|_| c.get(&url)));
    for r in burst().await {
        assert_eq!(r.status, 200);
    }
    assert_eq!(slow.max_in_flight(), 40, "the forty requests overlapped");
    assert_eq!(
        slow.connections(),
        40,
        "one connection per request in flight"
    );
    eventually(
        "the gauge to show the base 32 pooled after a first burst of 40",
        Duration::from_secs(3),
        || async { pooled(&gw, "slow") == 32 },
    )
    .await;
    // The load again: the pool has grown room for it and keeps all 40.
    for r in burst().await {
        assert_eq!(r.status, 200);
    }
    assert_eq!(slow.connections(), 48, "32 reused, 8 opened");
    eventually(
        "the gauge to show forty pooled",
        Duration::from_secs(3),
        || async { pooled(&gw, "slow") == 40 },
    )
    .await;
    // Sustained: every connection is reused, none opened.
    for r in burst().await {
        assert_eq!(r.status, 200);
    }
    assert_eq!(
        slow.connections(),
        48,
        "sustained load churns no connection"
    );
    // Once the load is gone, the pool gives its connections back.
    eventually(
        "the pool to close its idle connections",
        Duration::from_secs(10),
        || async { pooled(&gw, "slow") == 0 },
    )
    .await;
    assert_eq!(c.get(&url).await.status, 200);
    assert_eq!(slow.connections(), 49, "the swept connections were closed");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_round_robins_over_targets() {
    let a = EchoUpstream::start_named("a").await;
    let b = EchoUpstream::start_named("b").await;
    let text = format!(
        "{}\n[upstreams.pair]\ntargets = [\"{}\", \"{}\"]\n[[routes]]\nname = \"pair\"\npath = \"/v1/pair\"\nupstream = \"pair\"\nauth = \"none\"\n",
        gateway_toml(None, ""),
        a.url(),
        b.url()
    );
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    let mut order = Vec::new();
    for _ in 0..6 {
        let r = c.get(&gw.url("/v1/pair")).await;
        assert_eq!(r.status, 200);
        order.push(r.json()["upstream"].as_str().unwrap().to_string());
    }
    assert_eq!(a.count(), 3, "order: {order:?}");
    assert_eq!(b.count(), 3, "order: {order:?}");
    assert!(
        order.windows(2).all(|w| w[0] != w[1]),
        "alternates: {order:?}"
    );
    gw.shutdown().await;
}

/// `[upstreams.up]` with `targets = [target]` and extra keys, route `/v1/up/*rest`.
fn single_upstream_config(target: &str, upstream_extra: &str) -> String {
    format!(
        "{}\n[upstreams.up]\ntargets = [\"{target}\"]\n{upstream_extra}\n[[routes]]\nname = \"up\"\npath = \"/v1/up/*rest\"\nupstream = \"up\"\nauth = \"none\"\n",
        gateway_toml(None, "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_to_a_down_upstream_is_502() {
    let port = free_port();
    let gw = start_gateway(&single_upstream_config(
        &format!("http://127.0.0.1:{port}"),
        "",
    ))
    .await;
    for client in [TestClient::h1(None), TestClient::h2(None)] {
        let r = client.get(&gw.url("/v1/up/x")).await;
        r.assert_error(502, "UPSTREAM_UNAVAILABLE");
        assert!(
            !r.text().contains(&port.to_string()),
            "no upstream detail leaks: {}",
            r.text()
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_connect_timeout_is_502() {
    let hole = BlackholeUpstream::start().await;
    let gw = start_gateway(&single_upstream_config(
        &hole.url(),
        "connect_timeout = \"300ms\"\nrequest_timeout = \"10s\"",
    ))
    .await;
    let start = Instant::now();
    let r = TestClient::h1(None).get(&gw.url("/v1/up/x")).await;
    r.assert_error(502, "UPSTREAM_UNAVAILABLE");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_to_a_too_slow_upstream_is_504() {
    let slow = SlowUpstream::start(Duration::from_secs(5)).await;
    let gw = start_gateway(&single_upstream_config(
        &slow.url(),
        "request_timeout = \"300ms\"",
    ))
    .await;
    let start = Instant::now();
    let r = TestClient::h1(None).get(&gw.url("/v1/up/x")).await;
    r.assert_error(504, "UPSTREAM_TIMEOUT");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(slow.arrived(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_a_malformed_upstream_response_is_502() {
    for garbage in [
        &b"this is not HTTP at all\r\n\r\n"[..],
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\ntruncated",
        b"",
    ] {
        let raw = RawUpstream::start(garbage).await;
        let gw = start_gateway(&single_upstream_config(&raw.url(), "")).await;
        let c = TestClient::h1(None);
        let truncated = garbage.starts_with(b"HTTP/1.1 200 OK\r\nContent-Length: 100");
        let resp = match c
            .client
            .request(Request::get(gw.url("/v1/up/x")).body(empty()).unwrap())
            .await
        {
            Ok(resp) => resp,
            // A body that fails before the first byte was flushed: the gateway
            // aborts the connection instead of sending headers. Only right
            // when the upstream sent good headers and then broke off.
            Err(e) => {
                assert!(truncated, "{:?}: {e:?}", String::from_utf8_lossy(garbage));
                gw.shutdown().await;
                continue;
            }
        };
        if resp.status() == 200 {
            // A truncated body after good headers: the client must see the
            // stream fail, not a clean short body.
            let body = resp.into_body().collect().await;
            assert!(
                body.is_err(),
                "{:?}: a truncated upstream body must not look complete",
                String::from_utf8_lossy(garbage)
            );
        } else {
            let r = read_response(resp).await;
            r.assert_error(502, "UPSTREAM_UNAVAILABLE");
        }
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_does_not_retry_non_idempotent_requests() {
    // The upstream reads the request, then closes without answering.
    let raw = RawUpstream::start(b"").await;
    let gw = start_gateway(&single_upstream_config(&raw.url(), "")).await;
    let c = TestClient::h1(None);
    c.send(post(&gw.url("/v1/up/pay"), "charge=100"))
        .await
        .assert_error(502, "UPSTREAM_UNAVAILABLE");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        raw.requests(),
        1,
        "a POST that reached the upstream must not be sent again"
    );
    assert_eq!(raw.connections(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_streams_sse_event_by_event_over_http1() {
    sse_streams(None, Proto::Http1).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_streams_sse_event_by_event_over_http2_tls() {
    let certs = TestCerts::generate();
    sse_streams(Some(&certs), Proto::Http2).await;
}

async fn sse_streams(certs: Option<&TestCerts>, proto: Proto) {
    let sse = SseUpstream::start(Duration::from_millis(300)).await;
    let text = format!(
        "{}\n[upstreams.sse]\ntargets = [\"{}\"]\n[[routes]]\nname = \"events\"\nmethods = [\"GET\"]\npath = \"/v1/events\"\nupstream = \"sse\"\nauth = \"none\"\n",
        gateway_toml(certs, ""),
        sse.url()
    );
    let gw = start_gateway(&text).await;
    let c = TestClient::new(proto, certs);
    let resp = c
        .send_streaming(
            Request::get(gw.url("/v1/events"))
                .header("accept", "text/event-stream")
                .body(empty())
                .unwrap(),
        )
        .await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut b = resp.into_body();
    let mut seen = String::new();
    let mut next = async |seen: &mut String, want: &str| {
        while !seen.contains(want) {
            let frame = tokio::time::timeout(Duration::from_secs(3), b.frame())
                .await
                .unwrap_or_else(|_| panic!("no {want:?} within 3 s; got {seen:?}"))
                .unwrap_or_else(|| panic!("stream ended before {want:?}; got {seen:?}"))
                .expect("body frame");
            if let Ok(d) = frame.into_data() {
                seen.push_str(&String::from_utf8_lossy(&d));
            }
        }
    };
    next(&mut seen, "data: tick 1\n\n").await;
    assert!(
        !sse.is_finished(),
        "the first event arrived before the upstream finished"
    );
    next(&mut seen, "data: tick 2\n\n").await;
    assert!(!sse.is_finished());
    sse.finish();
    next(&mut seen, "data: done\n\n").await;
    // Then the stream ends cleanly, with no more data.
    let mut rest = Vec::new();
    while let Some(frame) = tokio::time::timeout(Duration::from_secs(3), b.frame())
        .await
        .expect("the stream ends after done")
    {
        if let Ok(d) = frame.expect("clean end of stream").into_data() {
            rest.extend_from_slice(&d);
        }
    }
    assert!(
        rest.is_empty(),
        "nothing after done: {:?}",
        String::from_utf8_lossy(&rest)
    );
    assert!(sse.is_finished());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_streams_request_bodies_to_the_upstream() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let c = TestClient::h1(None);
    let (tx, b) = channel_body();
    let req = Request::post(gw.url("/v1/echo/upload")).body(b).unwrap();
    let pending = tokio::spawn(async move { c.send(req).await });
    tx.send(Bytes::from_static(b"part-one;")).unwrap();
    let first = echo
        .next_chunk(Duration::from_secs(3))
        .await
        .expect("the first chunk reached the upstream while the body is still open");
    assert_eq!(&first[..], b"part-one;");
    assert!(!pending.is_finished());
    tx.send(Bytes::from_static(b"part-two")).unwrap();
    drop(tx);
    let r = pending.await.unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["body"], "part-one;part-two");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_keeps_trailers_over_http2() {
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(Some(&certs), "", &echo)).await;
    // As gRPC clients do: HTTP/2 allows `te: trailers` and nothing else.
    let r = TestClient::h2(Some(&certs))
        .get_with(&gw.url("/v1/echo/trailers"), &[("te", "trailers")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "hello");
    let t = r.trailers.expect("trailers reach an HTTP/2 client");
    assert_eq!(t["x-checksum"], "abc123");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_keeps_trailers_over_http1() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let r = raw_request(
        gw.addr,
        b"GET /v1/echo/trailers HTTP/1.1\r\nHost: a\r\nTE: trailers\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(
        echo.last().header("te"),
        Some("trailers"),
        "TE: trailers is passed on to the upstream"
    );
    assert!(
        r.body().to_ascii_lowercase().contains("x-checksum: abc123"),
        "trailer missing from the chunked body:\n{}",
        r.text()
    );
    gw.shutdown().await;
}

fn websocket_config(certs: Option<&TestCerts>, ws: &WsEchoUpstream, echo: &EchoUpstream) -> String {
    format!(
        "{}\n[upstreams.ws]\ntargets = [\"{}\"]\n[upstreams.echo]\ntargets = [\"{}\"]\n\
         [[routes]]\nname = \"ws\"\npath = \"/v1/ws\"\nupstream = \"ws\"\nauth = \"none\"\nwebsocket = true\n\
         [[routes]]\nname = \"plain\"\npath = \"/v1/plain\"\nupstream = \"echo\"\nauth = \"none\"\n",
        gateway_toml(certs, ""),
        ws.url(),
        echo.url()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_passes_through_a_websocket_route() {
    let ws = WsEchoUpstream::start().await;
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&websocket_config(None, &ws, &echo)).await;
    let (mut sock, resp) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", gw.addr))
        .await
        .expect("WebSocket handshake through the gateway");
    assert_eq!(resp.status(), 101);
    for i in 0..3 {
        sock.send(Message::text(format!("hello {i}")))
            .await
            .unwrap();
        let back = tokio::time::timeout(Duration::from_secs(3), sock.next())
            .await
            .expect("echo")
            .unwrap()
            .unwrap();
        assert_eq!(back, Message::text(format!("hello {i}")));
    }
    sock.send(Message::binary(vec![0u8, 1, 2, 255]))
        .await
        .unwrap();
    let back = tokio::time::timeout(Duration::from_secs(3), sock.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back, Message::binary(vec![0u8, 1, 2, 255]));
    sock.close(None).await.unwrap();
    assert_eq!(ws.handshakes(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_sent_right_behind_the_tls_handshake_is_answered() {
    // The client's Finished and its request leave in one write, so the
    // gateway's last handshake read brings the request too, decrypted
    // inside rustls while the socket has nothing left to read. A listener
    // that waited for the socket would answer nothing until its header
    // timeout closed the connection.
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(
        Some(&certs),
        "header_read_timeout = \"2s\"",
        &echo,
    ))
    .await;
    let cfg = std::sync::Arc::new(certs.client_config(&[&rustls::version::TLS13], &[b"http/1.1"]));
    let addr = gw.addr;
    let head = tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut tcp = std::net::TcpStream::connect(addr).unwrap();
        tcp.set_nodelay(true).unwrap();
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let mut tls = rustls::ClientConnection::new(cfg, name).unwrap();
        while tls.is_handshaking() {
            while tls.wants_write() {
                tls.write_tls(&mut tcp).unwrap();
            }
            if tls.read_tls(&mut tcp).unwrap() == 0 {
                panic!("the gateway closed during the handshake");
            }
            tls.process_new_packets().unwrap();
        }
        // Finished is queued, not sent: the request joins it.
        tls.writer()
            .write_all(b"GET /v1/echo/behind HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap();
        while tls.wants_write() {
            tls.write_tls(&mut tcp).unwrap();
        }
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.reader().read(&mut buf) {
                Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                Ok(_) => break,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if tls.read_tls(&mut tcp).unwrap_or(0) == 0 {
                        break;
                    }
                    tls.process_new_packets().unwrap();
                }
                Err(_) => break,
            }
        }
        head
    })
    .await
    .unwrap();
    assert!(
        head.starts_with(b"HTTP/1.1 200"),
        "{:?}",
        String::from_utf8_lossy(&head)
    );
    assert_eq!(echo.count(), 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_echo_passes_through_over_tls() {
    let certs = TestCerts::generate();
    let ws = WsEchoUpstream::start().await;
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&websocket_config(Some(&certs), &ws, &echo)).await;
    let tls = tls_connect(gw.addr, certs.client_config(&[], &[b"http/1.1"]))
        .await
        .unwrap();
    let (mut sock, _) =
        tokio_tungstenite::client_async(format!("wss://localhost:{}/v1/ws", gw.addr.port()), tls)
            .await
            .expect("wss handshake through the gateway");
    sock.send(Message::text("over tls")).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(3), sock.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back, Message::text("over tls"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_upgrade_is_not_passed_on_other_routes() {
    let ws = WsEchoUpstream::start().await;
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&websocket_config(None, &ws, &echo)).await;
    let res = tokio_tungstenite::connect_async(format!("ws://{}/v1/plain", gw.addr)).await;
    assert!(
        res.is_err(),
        "no upgrade on a route without websocket = true"
    );
    let seen = echo.last();
    assert_eq!(
        seen.header("upgrade"),
        None,
        "Upgrade is hop-by-hop: {:?}",
        seen.headers
    );
    assert_eq!(seen.header("connection"), None);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_removes_hop_by_hop_request_headers() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let req = b"GET /v1/echo/hop HTTP/1.1\r\nHost: a\r\n\
        Connection: keep-alive, X-Custom-Hop, x-other-hop\r\nX-Custom-Hop: secret\r\nX-Other-Hop: 2\r\n\
        Keep-Alive: timeout=5\r\nProxy-Authorization: Basic Zm9vOmJhcg==\r\nProxy-Connection: keep-alive\r\n\
        TE: trailers, deflate\r\nUpgrade: websocket\r\nX-End-To-End: yes\r\n\r\n";
    let r = raw_request_wait(gw.addr, req, Duration::from_millis(500)).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    let seen = echo.last();
    for h in [
        "connection",
        "x-custom-hop",
        "x-other-hop",
        "keep-alive",
        "proxy-authorization",
        "proxy-connection",
        "upgrade",
        "transfer-encoding",
    ] {
        assert_eq!(
            seen.header(h),
            None,
            "{h} must not be forwarded: {:?}",
            seen.headers
        );
    }
    assert!(
        seen.header("te").is_none_or(|te| te == "trailers"),
        "only TE: trailers may be sent on: {:?}",
        seen.header("te")
    );
    assert_eq!(seen.header("x-end-to-end"), Some("yes"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_removes_hop_by_hop_response_headers() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let r = raw_request(
        gw.addr,
        b"GET /v1/echo/hop-headers HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    for h in ["x-resp-hop", "keep-alive", "proxy-authenticate"] {
        assert_eq!(
            r.header(h),
            None,
            "{h} must not reach the client:\n{}",
            r.text()
        );
    }
    assert!(
        r.header("connection")
            .is_none_or(|c| !c.to_ascii_lowercase().contains("x-resp-hop")),
        "{}",
        r.text()
    );
    assert_eq!(r.header("x-end-to-end").as_deref(), Some("kept"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_sets_x_forwarded_headers_over_client_copies() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let req = b"GET /v1/echo/fwd HTTP/1.1\r\nHost: api.example.com\r\n\
        X-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\n\
        X-Key-Id: key_forged\r\nX-Workspace-Id: ws_forged\r\nX-Key-Environment: live\r\nConnection: close\r\n\r\n";
    let r = raw_request(gw.addr, req).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    let seen = echo.last();
    assert_eq!(
        seen.header("x-forwarded-for"),
        Some("127.0.0.1"),
        "the peer, not the client's claim (no trusted proxies)"
    );
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("x-forwarded-host"), Some("api.example.com"));
    assert_eq!(seen.headers.get_all("x-forwarded-for").iter().count(), 1);
    for h in ["x-key-id", "x-workspace-id", "x-key-environment"] {
        assert_eq!(
            seen.header(h),
            None,
            "{h} is the gateway's, never the client's"
        );
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_refuses_a_port_already_in_use() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("second.toml");
    let text = format!(
        "[server]\nlisten = \"{}\"\n[admin]\nlisten = \"127.0.0.1:0\"\n[store]\nurl = \"sqlite://{}/k.db\"\n",
        gw.addr,
        dir.path().display()
    );
    std::fs::write(&path, &text).unwrap();
    let cfg = portcullis::config::load(&path).unwrap();
    match portcullis::server::Gateway::start(cfg).await {
        Err(portcullis::server::StartError::Bind { addr, .. }) => assert_eq!(addr, gw.addr),
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("a second gateway started on a port in use"),
    }
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_never_passes_a_gateway_key_to_a_route_without_auth() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let c = TestClient::h1(None);
    let key = "sk_live_not-a-real-key-but-shaped-like-one";
    let r = c
        .get_with(
            &gw.url("/v1/echo/a"),
            &[("authorization", &format!("Bearer {key}"))],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        echo.last().header("authorization"),
        None,
        "a gateway key is stripped"
    );
    let r = c
        .get_with(&gw.url("/v1/echo/b"), &[("x-api-key", key)])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(echo.last().header("x-api-key"), None);
    let r = c
        .get_with(
            &gw.url("/v1/echo/c"),
            &[("authorization", "Basic dXNlcjpwYXNz")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        echo.last().header("authorization"),
        Some("Basic dXNlcjpwYXNz"),
        "the upstream's own credentials pass on auth = \"none\" routes"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarding_sets_x_forwarded_headers_over_tls_http2() {
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(Some(&certs), "", &echo)).await;
    let r = TestClient::h2(Some(&certs))
        .get_with(
            &gw.url("/v1/echo/fwd"),
            &[
                ("x-forwarded-proto", "http"),
                ("x-forwarded-for", "6.6.6.6"),
            ],
        )
        .await;
    assert_eq!(r.status, 200);
    let seen = echo.last();
    assert_eq!(seen.header("x-forwarded-proto"), Some("https"));
    assert_eq!(seen.header("x-forwarded-for"), Some("127.0.0.1"));
    assert_eq!(
        seen.header("x-forwarded-host"),
        Some(format!("127.0.0.1:{}", gw.addr.port()).as_str())
    );
    assert_eq!(
        seen.version,
        http::Version::HTTP_11,
        "upstreams are spoken to in HTTP/1.1"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_kept_when_well_formed_and_echoed() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let c = TestClient::h1(None);
    let r = c
        .get_with(&gw.url("/v1/echo/id"), &[("x-request-id", "trace-42_A.b")])
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id"), Some("trace-42_A.b"));
    assert_eq!(echo.last().header("x-request-id"), Some("trace-42_A.b"));
    // On errors too.
    let r = c
        .get_with(&gw.url("/nowhere"), &[("x-request-id", "trace-43")])
        .await;
    r.assert_error(404, "NOT_FOUND");
    assert_eq!(r.header("x-request-id"), Some("trace-43"));
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_id_is_generated_when_missing_or_malformed() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(None, "", &echo)).await;
    let c = TestClient::h1(None);
    let too_long = "a".repeat(129);
    let mut ids = Vec::new();
    for bad in [
        None,
        Some("has spaces and !"),
        Some(too_long.as_str()),
        Some("semi;colon"),
    ] {
        let headers: Vec<(&str, &str)> = bad.iter().map(|v| ("x-request-id", *v)).collect();
        let r = c.get_with(&gw.url("/v1/echo/id"), &headers).await;
        assert_eq!(r.status, 200);
        let id = r
            .header("x-request-id")
            .expect("X-Request-Id on the response")
            .to_string();
        assert_ne!(Some(id.as_str()), bad, "a malformed id is replaced");
        assert!(
            !id.is_empty()
                && id.len() <= 128
                && id
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"._-".contains(&c)),
            "{id:?}"
        );
        assert_eq!(
            echo.last().header("x-request-id"),
            Some(id.as_str()),
            "the upstream sees the same id"
        );
        assert_eq!(
            echo.last().headers.get_all("x-request-id").iter().count(),
            1
        );
        ids.push(id);
    }
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 4, "every request gets its own id");
    gw.shutdown().await;
}

// ────────────────────────────────── errors ─────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_json_with_code_message_and_request_id() {
    let echo = EchoUpstream::start().await;
    let text = format!(
        "{}\n[upstreams.down]\ntargets = [\"http://127.0.0.1:{}\"]\n[[routes]]\nname = \"down\"\npath = \"/v1/down\"\nupstream = \"down\"\nauth = \"none\"\n\
         [[routes]]\nname = \"keyed\"\npath = \"/v1/keyed\"\nupstream = \"echo\"\n",
        echo_config(None, "", &echo),
        free_port()
    );
    let gw = start_gateway(&text).await;
    let c = TestClient::h1(None);
    c.get(&gw.url("/nothing"))
        .await
        .assert_error(404, "NOT_FOUND");
    c.send(Request::delete(gw.url("/v1/down")).body(empty()).unwrap())
        .await
        .assert_error(502, "UPSTREAM_UNAVAILABLE");
    let r = c.get(&gw.url("/v1/keyed")).await;
    r.assert_error(401, "MISSING_API_KEY");
    assert_eq!(r.header("www-authenticate"), Some("Bearer"));
    let v = r.json();
    assert_eq!(
        v.as_object().unwrap().len(),
        1,
        "only \"error\" at the top: {v}"
    );
    assert_eq!(
        v["error"].as_object().unwrap().len(),
        3,
        "code, message, request_id: {v}"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_are_the_same_over_plain_and_tls_http1_and_http2() {
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let slow = SlowUpstream::start(Duration::from_secs(5)).await;
    for tls in [None, Some(&certs)] {
        let text = format!(
            "{}\n[upstreams.down]\ntargets = [\"http://127.0.0.1:{}\"]\n[upstreams.slow]\ntargets = [\"{}\"]\nrequest_timeout = \"300ms\"\n\
             [[routes]]\nname = \"down\"\nmethods = [\"GET\"]\npath = \"/v1/down\"\nupstream = \"down\"\nauth = \"none\"\n\
             [[routes]]\nname = \"slow\"\npath = \"/v1/slow\"\nupstream = \"slow\"\nauth = \"none\"\n\
             [[routes]]\nname = \"small\"\npath = \"/v1/small\"\nupstream = \"echo\"\nauth = \"none\"\nmax_body_bytes = 8\n",
            echo_config(tls, "", &echo),
            free_port(),
            slow.url()
        );
        let gw = start_gateway(&text).await;
        for proto in [Proto::Http1, Proto::Http2] {
            let c = TestClient::new(proto, tls);
            let what = format!("tls={} {proto:?}", tls.is_some());
            let r = c.get(&gw.url("/v1/echo/ok")).await;
            assert_eq!(r.status, 200, "{what}");
            c.get(&gw.url("/nope")).await.assert_error(404, "NOT_FOUND");
            let r = c.send(post(&gw.url("/v1/down"), "x")).await;
            r.assert_error(405, "METHOD_NOT_ALLOWED");
            assert_eq!(r.header("allow"), Some("GET"), "{what}");
            c.get(&gw.url("/v1/down"))
                .await
                .assert_error(502, "UPSTREAM_UNAVAILABLE");
            c.get(&gw.url("/v1/slow"))
                .await
                .assert_error(504, "UPSTREAM_TIMEOUT");
            c.send(post(&gw.url("/v1/small"), "more than eight bytes"))
                .await
                .assert_error(413, "PAYLOAD_TOO_LARGE");
            c.get(&gw.url("/v1/echo/a%2Fb"))
                .await
                .assert_error(400, "BAD_REQUEST");
            c.get(&gw.url("/v1/echo/../../../etc/passwd"))
                .await
                .assert_error(400, "BAD_REQUEST");
        }
        gw.shutdown().await;
    }
    assert_eq!(
        echo.requests()
            .iter()
            .filter(|r| r.path_and_query != "/v1/echo/ok")
            .count(),
        0,
        "{:?}",
        echo.requests()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guard_rejects_raw_requests_over_tls_too() {
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let text = catch_all_config(&echo).replace(
        "[server]\nlisten = \"127.0.0.1:0\"\n",
        &gateway_toml(Some(&certs), ""),
    );
    let gw = start_gateway(&text).await;
    for req in [
        &b"GET /v1/a HTTP/1.1\r\n\r\n"[..],
        b"GET /v1/a%2Fb HTTP/1.1\r\nHost: a\r\n\r\n",
        b"GET /../etc/passwd HTTP/1.1\r\nHost: a\r\n\r\n",
        b"POST /v1/a HTTP/1.1\r\nHost: a\r\nContent-Length: 6\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /smuggled HTTP/1.1\r\nHost: a\r\n\r\n",
    ] {
        let tls = tls_connect(gw.addr, certs.client_config(&[], &[b"http/1.1"])).await.unwrap();
        let r = raw_exchange(tls, req, Duration::from_secs(3)).await;
        let shown = String::from_utf8_lossy(req);
        assert_eq!(r.status(), Some(400), "{shown:?}: {}", r.text());
        assert!(r.closed, "closed after {shown:?}");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(echo.count(), 0, "{:?}", echo.requests());
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_read_timeout_also_bounds_the_tls_handshake() {
    let certs = TestCerts::generate();
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(
        Some(&certs),
        "header_read_timeout = \"500ms\"",
        &echo,
    ))
    .await;
    let start = Instant::now();
    // Connect and say nothing.
    let r = raw_request_wait(gw.addr, b"", Duration::from_secs(5)).await;
    assert!(r.closed, "a silent TLS client must be cut off");
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "closed after {:?}",
        start.elapsed()
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_for_is_appended_only_behind_a_trusted_proxy() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&echo_config(
        None,
        "trusted_proxies = [\"127.0.0.1/32\"]",
        &echo,
    ))
    .await;
    let r = TestClient::h1(None)
        .get_with(
            &gw.url("/v1/echo/xff"),
            &[("x-forwarded-for", "203.0.113.7")],
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        echo.last().header("x-forwarded-for"),
        Some("203.0.113.7, 127.0.0.1")
    );
    gw.shutdown().await;
}

// ───────────────────────────────── shutdown ────────────────────────────────

fn slow_process_config(slow: &SlowUpstream, grace: &str) -> String {
    slow_config(
        &format!("shutdown_grace = \"{grace}\""),
        "request_timeout = \"60s\"",
        slow,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_sigterm_finishes_the_request_in_flight_and_exits_0() {
    let slow = SlowUpstream::start(Duration::from_millis(1500)).await;
    let mut gw = spawn_gateway_process(&slow_process_config(&slow, "10s"));
    let url = gw.url("/v1/slow");
    let in_flight = tokio::spawn(async move { TestClient::h1(None).get(&url).await });
    eventually(
        "the request to reach the upstream",
        Duration::from_secs(5),
        || async { slow.arrived() == 1 },
    )
    .await;
    gw.signal("TERM");
    // New connections are refused soon after the signal …
    let addr = gw.addr;
    eventually(
        "the listener to close",
        Duration::from_secs(2),
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    // … while the request in flight completes.
    let r = tokio::time::timeout(Duration::from_secs(5), in_flight)
        .await
        .expect("in-flight request finished")
        .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.text(), "slow done");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(5)));
    assert_eq!(status.code(), Some(0), "{}", gw.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_grace_bounds_how_long_requests_in_flight_may_run() {
    let slow = SlowUpstream::start(Duration::from_secs(30)).await;
    let mut gw = spawn_gateway_process(&slow_process_config(&slow, "1s"));
    let url = gw.url("/v1/slow");
    let in_flight = tokio::spawn(async move {
        TestClient::h1(None)
            .try_send(Request::get(url).body(empty()).unwrap())
            .await
    });
    eventually(
        "the request to reach the upstream",
        Duration::from_secs(5),
        || async { slow.arrived() == 1 },
    )
    .await;
    let start = Instant::now();
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    let took = start.elapsed();
    assert_eq!(status.code(), Some(0), "{}", gw.output());
    assert!(
        took >= Duration::from_millis(900),
        "exited after {took:?}: before the grace period"
    );
    assert!(
        took < Duration::from_secs(4),
        "exited after {took:?}: the grace period is 1s"
    );
    let r = tokio::time::timeout(Duration::from_secs(3), in_flight)
        .await
        .expect("the client sees the end")
        .unwrap();
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.status != 200),
        "the cut request must not look successful"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_on_sigint_exits_0() {
    let echo = EchoUpstream::start().await;
    let mut gw = spawn_gateway_process(&echo_config(None, "", &echo));
    assert_eq!(
        TestClient::h1(None).get(&gw.url("/v1/echo/x")).await.status,
        200
    );
    gw.signal("INT");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "{}", gw.output());
}

// ───────────────────────────────── logging ─────────────────────────────────

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_has_one_line_per_request_with_request_id_and_route() {
    let echo = EchoUpstream::start().await;
    let mut gw =
        spawn_gateway_process_with(&echo_config(None, "", &echo), &["--log-format", "json"]);
    let c = TestClient::h1(None);
    assert_eq!(
        c.get_with(&gw.url("/v1/echo/a?secret=1"), &[("x-request-id", "log-1")])
            .await
            .status,
        200
    );
    assert_eq!(
        c.get_with(&gw.url("/nowhere"), &[("x-request-id", "log-2")])
            .await
            .status,
        404
    );
    let bad = raw_request(
        gw.addr,
        b"GET /../x HTTP/1.1\r\nHost: a\r\nX-Request-Id: log-3\r\n\r\n",
    )
    .await;
    assert_eq!(bad.status(), Some(400));
    let r = c.get_with(&gw.url("/v1/echo/b"), &[]).await;
    let generated = r.header("x-request-id").unwrap().to_string();
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0));
    gw.join_output();

    let stdout = gw.stdout();
    let access: Vec<serde_json::Value> = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["target"] == "portcullis::access")
        .collect();
    assert_eq!(
        access.len(),
        4,
        "one access line per request:\n{}",
        gw.output()
    );
    let by_id = |id: &str| {
        let lines: Vec<&serde_json::Value> =
            access.iter().filter(|v| v["request_id"] == id).collect();
        assert_eq!(lines.len(), 1, "exactly one line for {id}:\n{stdout}");
        lines[0].clone()
    };
    let a = by_id("log-1");
    assert_eq!(a["method"], "GET");
    assert_eq!(a["path"], "/v1/echo/a", "the path without the query");
    assert_eq!(a["route"], "echo");
    assert_eq!(a["status"], 200);
    assert_eq!(a["upstream"], "echo");
    assert!(a["latency_ms"].is_number(), "{a}");
    let b = by_id("log-2");
    assert_eq!(b["status"], 404);
    assert_eq!(b["upstream"], "-");
    assert_eq!(by_id("log-3")["status"], 400);
    assert_eq!(by_id(&generated)["route"], "echo");
    assert!(
        !stdout.contains("secret=1"),
        "the query string is never logged"
    );
}
