//! Shared helpers for portcullis' integration tests. Everything here is
//! real: real sockets, real hyper servers, real TLS; no mocks.
//!
//! Use it with `mod common;` from any file in `tests/`. The pieces:
//!
//! - **Gateways**: [`start_gateway`] runs one in-process (127.0.0.1:0 for
//!   both listeners); [`spawn_gateway_process`] runs the real binary (for
//!   signals and captured logs); [`gateway_toml`] writes the `[server]`
//!   section the tests share.
//! - **Upstreams** (hyper, in-process): [`EchoUpstream`] (records every
//!   request, answers JSON), [`SseUpstream`] (events with delays, the test
//!   ends the stream), [`SlowUpstream`] (sleeps before answering),
//!   [`RawUpstream`] (raw TCP: writes whatever bytes you give it, e.g.
//!   garbage), [`WsEchoUpstream`] (WebSocket echo), [`BlackholeUpstream`]
//!   (connects hang: for connect timeouts).
//! - **TLS**: [`TestCerts`] (rcgen self-signed for localhost/127.0.0.1,
//!   written to PEM files) and rustls client configs that trust it.
//! - **Clients**: [`TestClient`] (hyper-util legacy client over
//!   hyper-rustls: HTTP/1.1 or HTTP/2, plain or TLS), [`raw_request`] (raw
//!   bytes on a TCP socket, read until close or a short timeout),
//!   [`tls_connect`] (a bare rustls connection, to inspect ALPN/version).
//! - **Misc**: [`free_port`], [`eventually`], [`run_cli`].
//!
//! Tests that use in-process servers should run on a multi-threaded runtime:
//! `#[tokio::test(flavor = "multi_thread", worker_threads = 2)]`.
#![allow(dead_code)]

pub mod faults;
pub mod redis;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Version};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use portcullis::server::{App, Gateway};
use rustls_pki_types::{CertificateDer, ServerName};
use std::convert::Infallible;
use std::future::Future;
use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, watch};
use tokio::task::JoinHandle;

/// Path of the `portcullis` binary built for these tests.
pub const BIN: &str = env!("CARGO_BIN_EXE_portcullis");

// ───────────────────────────── small utilities ─────────────────────────────

/// A loopback TCP port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

/// Polls `check` every 20 ms until it returns true; panics naming `what`
/// after `timeout`.
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let start = Instant::now();
    loop {
        if check().await {
            return;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Runs the `portcullis` binary with `args` to completion (stdin closed,
/// `RUST_LOG` cleared) and returns its output.
pub fn run_cli<I, S>(args: I) -> std::process::Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(BIN)
        .args(args)
        .env_remove("RUST_LOG")
        .env_remove("PORTCULLIS_CONFIG")
        .stdin(Stdio::null())
        .output()
        .expect("run the portcullis binary")
}

// ─────────────────────────────────── TLS ───────────────────────────────────

/// A self-signed certificate for `localhost` and `127.0.0.1`, written as PEM
/// files (`cert.pem`, `key.pem`) in its own temp dir.
pub struct TestCerts {
    /// Keeps the files alive.
    pub dir: tempfile::TempDir,
    /// The certificate (PEM).
    pub cert_path: PathBuf,
    /// The private key (PEM).
    pub key_path: PathBuf,
    /// The certificate (DER), for client trust stores.
    pub cert_der: CertificateDer<'static>,
}

impl TestCerts {
    /// Generates a fresh certificate and key.
    pub fn generate() -> Self {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_string(),
            "127.0.0.1".to_string(),
        ])
        .expect("rcgen self-signed certificate");
        let dir = tempfile::tempdir().expect("temp dir for certificates");
        let cert_path = dir.path().join("cert.pem");
        let key_path = dir.path().join("key.pem");
        std::fs::write(&cert_path, ck.cert.pem()).expect("write cert.pem");
        std::fs::write(&key_path, ck.signing_key.serialize_pem()).expect("write key.pem");
        let cert_der = ck.cert.der().clone();
        TestCerts {
            dir,
            cert_path,
            key_path,
            cert_der,
        }
    }

    /// The `[server.tls]` table naming these files (put it after `[server]`'s keys).
    pub fn server_tls_toml(&self) -> String {
        format!(
            "[server.tls]\ncert = {:?}\nkey = {:?}\n",
            self.cert_path.display().to_string(),
            self.key_path.display().to_string()
        )
    }

    /// A rustls client config (ring) that trusts only this certificate.
    /// `versions` empty means TLS 1.2 and 1.3; `alpn` as offered.
    pub fn client_config(
        &self,
        versions: &[&'static rustls::SupportedProtocolVersion],
        alpn: &[&[u8]],
    ) -> rustls::ClientConfig {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(self.cert_der.clone())
            .expect("trust the test certificate");
        let versions: &[&'static rustls::SupportedProtocolVersion] = if versions.is_empty() {
            &[&rustls::version::TLS13, &rustls::version::TLS12]
        } else {
            versions
        };
        let mut cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_protocol_versions(versions)
        .expect("protocol versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        cfg
    }
}

/// A bare TLS connection to `addr` (server name `localhost`) with the given
/// client config: inspect `get_ref().1.alpn_protocol()` / `protocol_version()`,
/// or hand it to [`raw_exchange`].
pub async fn tls_connect(
    addr: SocketAddr,
    cfg: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let connector = tokio_rustls::TlsConnector::from(Arc::new(cfg));
    connector
        .connect(ServerName::try_from("localhost").expect("server name"), tcp)
        .await
}

// ──────────────────────────────── gateways ─────────────────────────────────

/// The `[server]` section the tests share: `listen = "127.0.0.1:0"`, any
/// `extra` keys (e.g. `shutdown_grace = "1s"`), then `[server.tls]` when
/// `certs` is given.
pub fn gateway_toml(certs: Option<&TestCerts>, extra: &str) -> String {
    let tls = certs.map(TestCerts::server_tls_toml).unwrap_or_default();
    format!("[server]\nlisten = \"127.0.0.1:0\"\n{extra}\n{tls}\n")
}

/// Completes a test config: adds `[admin] listen = "127.0.0.1:0"` when there
/// is no `[admin]` table and a SQLite store in the config's directory when
/// there is no `[store]` table. (A test that writes its own `[admin]` must
/// set `listen` itself.)
fn complete_config(toml: &str) -> String {
    let has = |table: &str| toml.lines().any(|l| l.trim() == table);
    let mut text = toml.to_string();
    if !text.ends_with('\n') {
        text.push('\n');
    }
    if !has("[admin]") {
        text.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    }
    if !has("[store]") {
        text.push_str("\n[store]\nurl = \"sqlite://keys.db\"\n");
    }
    text
}

/// A gateway running in this process.
pub struct TestGateway {
    /// Public listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Whether the public listener speaks TLS.
    pub tls: bool,
    /// The config file (in [`TestGateway::dir`]).
    pub config_path: PathBuf,
    /// The temp dir holding the config and the SQLite store.
    pub dir: tempfile::TempDir,
    gateway: Option<Gateway>,
}

impl TestGateway {
    /// `http(s)://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.addr.port())
    }

    /// `http://ADMIN{path}`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.admin_addr)
    }

    /// The running gateway's shared state (key cache, metrics, config …).
    pub fn app(&self) -> &Arc<App> {
        &self.gateway.as_ref().expect("gateway running").app
    }

    /// Shuts the gateway down gracefully and waits for it.
    pub async fn shutdown(mut self) {
        if let Some(g) = self.gateway.take() {
            g.shutdown().await;
        }
    }
}

/// Writes `toml` (completed as described in [`complete_config`]) to a fresh
/// temp dir, loads it with `config::load` and starts the gateway in-process.
/// Panics with the config error (file:line:col) if the config is refused.
pub async fn start_gateway(toml: &str) -> TestGateway {
    let dir = tempfile::tempdir().expect("temp dir for the gateway");
    start_gateway_in(dir, toml).await
}

/// [`start_gateway`] with a directory of your own (relative paths in the
/// config, e.g. the SQLite store, resolve against it).
pub async fn start_gateway_in(dir: tempfile::TempDir, toml: &str) -> TestGateway {
    let config_path = dir.path().join("portcullis.toml");
    let text = complete_config(toml);
    std::fs::write(&config_path, &text).expect("write the config");
    let cfg = portcullis::config::load(&config_path)
        .unwrap_or_else(|e| panic!("config refused:\n{e}\n--- config ---\n{text}"));
    let tls = cfg.server.tls.is_some();
    let gateway = Gateway::start(cfg)
        .await
        .unwrap_or_else(|e| panic!("gateway did not start: {e}"));
    TestGateway {
        addr: gateway.addr,
        admin_addr: gateway.admin_addr,
        tls,
        config_path,
        dir,
        gateway: Some(gateway),
    }
}

/// A gateway running as a child process of the real binary
/// (`portcullis serve --config FILE`), stdout and stderr captured.
/// Killed on drop if still running.
pub struct GatewayProcess {
    /// The process.
    pub child: Child,
    /// Public listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin_addr: SocketAddr,
    /// Whether the public listener speaks TLS.
    pub tls: bool,
    /// The config file.
    pub config_path: PathBuf,
    /// The temp dir holding the config and the SQLite store.
    pub dir: tempfile::TempDir,
    stdout: Arc<Mutex<Vec<u8>>>,
    stderr: Arc<Mutex<Vec<u8>>>,
    readers: Vec<std::thread::JoinHandle<()>>,
    /// Stdout not read yet ([`spawn_gateway_process_unread`]).
    unread: Option<std::process::ChildStdout>,
}

/// Replaces `listen = …` in `[server]` and `[admin]` with the given ports.
fn pin_ports(toml: &str, port: u16, admin_port: u16) -> String {
    let mut section = String::new();
    let mut out = String::new();
    for line in toml.lines() {
        let t = line.trim();
        if t.starts_with('[') {
            section = t.to_string();
        }
        let key = t.split('=').next().unwrap_or("").trim();
        if key == "listen" && section == "[server]" {
            out.push_str(&format!("listen = \"127.0.0.1:{port}\"\n"));
        } else if key == "listen" && section == "[admin]" {
            out.push_str(&format!("listen = \"127.0.0.1:{admin_port}\"\n"));
        } else {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

fn capture(
    mut from: impl Read + Send + 'static,
    into: Arc<Mutex<Vec<u8>>>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => into
                    .lock()
                    .expect("capture lock")
                    .extend_from_slice(&buf[..n]),
            }
        }
    })
}

/// Starts the real binary on `toml` (completed like [`start_gateway`]'s,
/// with the `[server]` and `[admin]` `listen` addresses replaced by free
/// loopback ports) and waits until the public port accepts connections.
/// `RUST_LOG` is cleared, so the config's `[log]` decides.
pub fn spawn_gateway_process(toml: &str) -> GatewayProcess {
    spawn_gateway_process_with(toml, &[])
}

/// [`spawn_gateway_process`] with extra arguments after `serve --config FILE`
/// (e.g. `["--log-format", "json"]`).
pub fn spawn_gateway_process_with(toml: &str, extra_args: &[&str]) -> GatewayProcess {
    spawn(toml, extra_args, true)
}

/// [`spawn_gateway_process`] whose stdout is a pipe nobody reads (a stalled
/// log collector) until [`GatewayProcess::read_stdout`].
pub fn spawn_gateway_process_unread(toml: &str) -> GatewayProcess {
    spawn(toml, &[], false)
}

fn spawn(toml: &str, extra_args: &[&str], read_stdout: bool) -> GatewayProcess {
    let dir = tempfile::tempdir().expect("temp dir for the gateway process");
    let config_path = dir.path().join("portcullis.toml");
    let (port, admin_port) = (free_port(), free_port());
    let text = pin_ports(&complete_config(toml), port, admin_port);
    std::fs::write(&config_path, &text).expect("write the config");
    let tls = text.lines().any(|l| l.trim() == "[server.tls]");
    let mut child = Command::new(BIN)
        .arg("serve")
        .arg("--config")
        .arg(&config_path)
        .args(extra_args)
        .env_remove("RUST_LOG")
        .env_remove("PORTCULLIS_CONFIG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn portcullis serve");
    let stdout = Arc::new(Mutex::new(Vec::new()));
    let stderr = Arc::new(Mutex::new(Vec::new()));
    let mut readers = vec![capture(
        child.stderr.take().expect("stderr piped"),
        stderr.clone(),
    )];
    let mut unread = child.stdout.take();
    if read_stdout && let Some(out) = unread.take() {
        readers.push(capture(out, stdout.clone()));
    }
    let mut p = GatewayProcess {
        child,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin_addr: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        tls,
        config_path,
        dir,
        stdout,
        stderr,
        readers,
        unread,
    };
    p.wait_ready(Duration::from_secs(30));
    p
}

impl GatewayProcess {
    /// Starts reading a stdout left unread so far.
    pub fn read_stdout(&mut self) {
        if let Some(out) = self.unread.take() {
            self.readers.push(capture(out, self.stdout.clone()));
        }
    }

    /// `http(s)://127.0.0.1:PORT{path}`.
    pub fn url(&self, path: &str) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}{path}", self.addr.port())
    }

    /// Polls a TCP connect to the public port; panics with the process
    /// output if it exits first or `timeout` passes.
    pub fn wait_ready(&mut self, timeout: Duration) {
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "portcullis exited during startup ({status}):\n{}",
                    self.output()
                );
            }
            if std::net::TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok()
            {
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "portcullis not listening after {timeout:?}:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Sends a signal (`"TERM"`, `"INT"`, `"HUP"`, …) with `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "kill -{sig} {} failed", self.child.id());
    }

    /// Waits for the process to exit; panics (and kills it) after `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if start.elapsed() > timeout {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "portcullis did not exit within {timeout:?}:\n{}",
                    self.output()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Everything written to stdout so far.
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout.lock().expect("stdout lock")).into_owned()
    }

    /// Everything written to stderr so far.
    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().expect("stderr lock")).into_owned()
    }

    /// stdout and stderr, labelled (for panic messages).
    pub fn output(&self) -> String {
        format!(
            "--- stdout ---\n{}\n--- stderr ---\n{}",
            self.stdout(),
            self.stderr()
        )
    }

    /// After the process exited: waits until its output pipes are drained.
    pub fn join_output(&mut self) {
        for r in self.readers.drain(..) {
            let _ = r.join();
        }
    }
}

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ──────────────────────────────── upstreams ────────────────────────────────

/// Serves every connection on `listener` with `svc_fn` (HTTP/1.1 and h2c,
/// upgrades allowed) until the returned task is aborted.
fn serve_hyper<F, Fut, B>(listener: TcpListener, conns: Arc<AtomicU64>, svc_fn: F) -> JoinHandle<()>
where
    F: Fn(Request<Incoming>, u64) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<B>> + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let conn_id = conns.fetch_add(1, Ordering::SeqCst) + 1;
            let f = svc_fn.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let f = f.clone();
                    async move { Ok::<_, Infallible>(f(req, conn_id).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection_with_upgrades(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    })
}

async fn bind_loopback() -> (TcpListener, SocketAddr) {
    // A backlog of 1024, as the gateway's own listener has: tokio's `bind`
    // gives 128, and a burst of a few hundred upstream connects then loses
    // SYNs (retried after 1 s, past the default connect timeout).
    let sock = tokio::net::TcpSocket::new_v4().expect("an upstream socket");
    sock.bind(SocketAddr::from(([127, 0, 0, 1], 0)))
        .expect("bind an upstream");
    let l = sock.listen(1024).expect("listen on an upstream");
    let a = l.local_addr().expect("upstream addr");
    (l, a)
}

/// One request as an upstream received it.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// Method.
    pub method: Method,
    /// Path and query, exactly as received.
    pub path_and_query: String,
    /// HTTP version of the upstream connection.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Which upstream connection it came on (1, 2, … in accept order).
    pub conn: u64,
}

impl Recorded {
    /// A header as text, if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

#[derive(Default)]
struct EchoState {
    requests: Mutex<Vec<Recorded>>,
    arrived: Notify,
}

/// An upstream that records every request and answers `200` with JSON
/// `{"upstream", "method", "path", "headers": {name: value}, "body", "conn"}`.
///
/// Special paths (anywhere under the route): a path containing
/// `/trailers` answers a chunked body `hello` with the trailer
/// `x-checksum: abc123` (and `Trailer: x-checksum`); `/hop-headers` adds
/// hop-by-hop headers to its answer (`Connection: x-resp-hop`,
/// `x-resp-hop`, `Keep-Alive`, `Proxy-Authenticate`) plus
/// `x-end-to-end: kept`; `/status/NNN` answers with status NNN. Every body
/// data frame is also sent, as it arrives, to [`EchoUpstream::next_chunk`].
pub struct EchoUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Its name, echoed as `"upstream"`.
    pub name: String,
    state: Arc<EchoState>,
    conns: Arc<AtomicU64>,
    chunks: tokio::sync::Mutex<mpsc::UnboundedReceiver<Bytes>>,
    task: JoinHandle<()>,
}

type RespBody = BoxBody<Bytes, Infallible>;

fn full(b: impl Into<Bytes>) -> RespBody {
    Full::new(b.into()).boxed()
}

impl EchoUpstream {
    /// Starts one named `echo`.
    pub async fn start() -> Self {
        Self::start_named("echo").await
    }

    /// Starts one with a name of your own (to tell upstreams apart).
    pub async fn start_named(name: &str) -> Self {
        let (listener, addr) = bind_loopback().await;
        let state = Arc::new(EchoState::default());
        let conns = Arc::new(AtomicU64::new(0));
        let (chunk_tx, chunk_rx) = mpsc::unbounded_channel();
        let st = state.clone();
        let nm = name.to_string();
        let task = serve_hyper(
            listener,
            conns.clone(),
            move |req: Request<Incoming>, conn| {
                let st = st.clone();
                let nm = nm.clone();
                let chunk_tx = chunk_tx.clone();
                async move { echo_answer(req, conn, &st, &nm, &chunk_tx).await }
            },
        );
        EchoUpstream {
            addr,
            name: name.to_string(),
            state,
            conns,
            chunks: tokio::sync::Mutex::new(chunk_rx),
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for `targets`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.state.requests.lock().expect("requests lock").clone()
    }

    /// How many requests were received.
    pub fn count(&self) -> usize {
        self.state.requests.lock().expect("requests lock").len()
    }

    /// The last request received; panics if none.
    pub fn last(&self) -> Recorded {
        self.requests()
            .pop()
            .expect("the upstream received no request")
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }

    /// Waits until at least `n` requests were received (5 s at most).
    pub async fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.count() < n {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "upstream {} got {} requests, expected {n}",
                self.name,
                self.count()
            );
            let _ = tokio::time::timeout(
                left.min(Duration::from_millis(100)),
                self.state.arrived.notified(),
            )
            .await;
        }
    }

    /// The next request-body data frame received (any request), or `None`
    /// after `timeout`.
    pub async fn next_chunk(&self, timeout: Duration) -> Option<Bytes> {
        tokio::time::timeout(timeout, self.chunks.lock().await.recv())
            .await
            .ok()
            .flatten()
    }
}

impl Drop for EchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn echo_answer(
    req: Request<Incoming>,
    conn: u64,
    st: &EchoState,
    name: &str,
    chunk_tx: &mpsc::UnboundedSender<Bytes>,
) -> Response<RespBody> {
    let (parts, mut body) = req.into_parts();
    let mut collected = Vec::new();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else { break };
        if let Ok(data) = frame.into_data() {
            let _ = chunk_tx.send(data.clone());
            collected.extend_from_slice(&data);
        }
    }
    let path_and_query = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str().to_string())
        .unwrap_or_default();
    let path = parts.uri.path().to_string();
    let rec = Recorded {
        method: parts.method.clone(),
        path_and_query: path_and_query.clone(),
        version: parts.version,
        headers: parts.headers.clone(),
        body: Bytes::from(collected),
        conn,
    };
    st.requests.lock().expect("requests lock").push(rec.clone());
    st.arrived.notify_waiters();

    if path.contains("/trailers") {
        let mut trailers = HeaderMap::new();
        trailers.insert("x-checksum", HeaderValue::from_static("abc123"));
        let frames = futures_util::stream::iter(vec![
            Ok::<_, Infallible>(Frame::data(Bytes::from_static(b"hello"))),
            Ok(Frame::trailers(trailers)),
        ]);
        let mut resp = Response::new(StreamBody::new(frames).boxed());
        resp.headers_mut().insert(
            http::header::TRAILER,
            HeaderValue::from_static("x-checksum"),
        );
        return resp;
    }

    let mut headers = serde_json::Map::new();
    for (k, v) in &parts.headers {
        headers.insert(
            k.as_str().to_string(),
            String::from_utf8_lossy(v.as_bytes()).into_owned().into(),
        );
    }
    let json = serde_json::json!({
        "upstream": name,
        "method": parts.method.as_str(),
        "path": path_and_query,
        "headers": headers,
        "body": String::from_utf8_lossy(&rec.body),
        "conn": conn,
    });
    let mut resp = Response::new(full(json.to_string()));
    let h = resp.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    if path.contains("/hop-headers") {
        h.insert(
            http::header::CONNECTION,
            HeaderValue::from_static("x-resp-hop"),
        );
        h.insert("x-resp-hop", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(
            http::header::PROXY_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"up\""),
        );
        h.insert("x-end-to-end", HeaderValue::from_static("kept"));
    }
    if let Some(code) = path
        .split("/status/")
        .nth(1)
        .and_then(|s| s.get(..3))
        .and_then(|s| s.parse::<u16>().ok())
    {
        *resp.status_mut() = StatusCode::from_u16(code).unwrap_or(StatusCode::OK);
    }
    resp
}

/// An upstream answering `text/event-stream`: `data: tick N` every
/// `interval` (the first at once) until the test calls
/// [`SseUpstream::finish`], then `data: done` and the end of the stream.
pub struct SseUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    finish: watch::Sender<bool>,
    finished: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl SseUpstream {
    /// Starts it.
    pub async fn start(interval: Duration) -> Self {
        let (listener, addr) = bind_loopback().await;
        let (finish, finish_rx) = watch::channel(false);
        let finished = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicUsize::new(0));
        let (fin, snt) = (finished.clone(), sent.clone());
        let task = serve_hyper(listener, Arc::new(AtomicU64::new(0)), move |_req, _conn| {
            let (rx, fin, snt) = (finish_rx.clone(), fin.clone(), snt.clone());
            async move {
                // State: (next tick number, finish signal, done?).
                let events =
                    futures_util::stream::unfold((1u64, rx, false), move |(n, mut rx, done)| {
                        let (fin, snt) = (fin.clone(), snt.clone());
                        async move {
                            if done {
                                fin.store(true, Ordering::SeqCst);
                                return None;
                            }
                            if n > 1 && !*rx.borrow() {
                                tokio::select! {
                                    _ = tokio::time::sleep(interval) => {}
                                    _ = rx.changed() => {}
                                }
                            }
                            if *rx.borrow() {
                                let frame = Frame::data(Bytes::from_static(b"data: done\n\n"));
                                return Some((Ok::<_, Infallible>(frame), (n, rx, true)));
                            }
                            snt.fetch_add(1, Ordering::SeqCst);
                            let frame =
                                Frame::data(Bytes::from(format!("id: {n}\ndata: tick {n}\n\n")));
                            Some((Ok(frame), (n + 1, rx, false)))
                        }
                    });
                let mut resp = Response::new(StreamBody::new(events).boxed());
                resp.headers_mut().insert(
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("text/event-stream"),
                );
                resp.headers_mut().insert(
                    http::header::CACHE_CONTROL,
                    HeaderValue::from_static("no-cache"),
                );
                resp
            }
        });
        SseUpstream {
            addr,
            finish,
            finished,
            sent,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Ends every open stream (after one last `data: done`).
    pub fn finish(&self) {
        let _ = self.finish.send(true);
    }

    /// Whether a stream has ended (its last frame was produced).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::SeqCst)
    }

    /// How many `tick` events were produced so far.
    pub fn ticks_sent(&self) -> usize {
        self.sent.load(Ordering::SeqCst)
    }
}

impl Drop for SseUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An upstream that sleeps `delay` before answering `200 slow done`, and
/// counts arrivals and the most requests it had in flight at once.
pub struct SlowUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    arrived: Arc<AtomicUsize>,
    completed: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
    conns: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl SlowUpstream {
    /// Starts it.
    pub async fn start(delay: Duration) -> Self {
        let (listener, addr) = bind_loopback().await;
        let arrived = Arc::new(AtomicUsize::new(0));
        let completed = Arc::new(AtomicUsize::new(0));
        let in_flight = Arc::new(AtomicUsize::new(0));
        let max_in_flight = Arc::new(AtomicUsize::new(0));
        let (a, c, i, m) = (
            arrived.clone(),
            completed.clone(),
            in_flight,
            max_in_flight.clone(),
        );
        let conns = Arc::new(AtomicU64::new(0));
        let task = serve_hyper(
            listener,
            conns.clone(),
            move |req: Request<Incoming>, _conn| {
                let (a, c, i, m) = (a.clone(), c.clone(), i.clone(), m.clone());
                async move {
                    let _ = req.into_body().collect().await;
                    a.fetch_add(1, Ordering::SeqCst);
                    let now = i.fetch_add(1, Ordering::SeqCst) + 1;
                    m.fetch_max(now, Ordering::SeqCst);
                    tokio::time::sleep(delay).await;
                    i.fetch_sub(1, Ordering::SeqCst);
                    c.fetch_add(1, Ordering::SeqCst);
                    Response::new(full("slow done"))
                }
            },
        );
        SlowUpstream {
            addr,
            arrived,
            completed,
            max_in_flight,
            conns,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests received (before the sleep).
    pub fn arrived(&self) -> usize {
        self.arrived.load(Ordering::SeqCst)
    }

    /// Requests answered (after the sleep).
    pub fn completed(&self) -> usize {
        self.completed.load(Ordering::SeqCst)
    }

    /// The most requests in flight at once.
    pub fn max_in_flight(&self) -> usize {
        self.max_in_flight.load(Ordering::SeqCst)
    }

    /// How many TCP connections were accepted.
    pub fn connections(&self) -> u64 {
        self.conns.load(Ordering::SeqCst)
    }
}

impl Drop for SlowUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A raw TCP upstream: on each connection it reads a request head (up to
/// `\r\n\r\n`), counts it, writes `reply` verbatim (garbage, a truncated
/// response, or nothing) and closes the connection.
pub struct RawUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    requests: Arc<AtomicUsize>,
    connections: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl RawUpstream {
    /// Starts it.
    pub async fn start(reply: &'static [u8]) -> Self {
        let (listener, addr) = bind_loopback().await;
        let requests = Arc::new(AtomicUsize::new(0));
        let connections = Arc::new(AtomicUsize::new(0));
        let (r, c) = (requests.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((mut tcp, _)) = listener.accept().await else {
                    continue;
                };
                c.fetch_add(1, Ordering::SeqCst);
                let r = r.clone();
                tokio::spawn(async move {
                    let mut head = Vec::new();
                    let mut buf = [0u8; 4096];
                    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                        match tcp.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => head.extend_from_slice(&buf[..n]),
                        }
                    }
                    r.fetch_add(1, Ordering::SeqCst);
                    let _ = tcp.write_all(reply).await;
                    let _ = tcp.shutdown().await;
                });
            }
        });
        RawUpstream {
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

    /// Request heads received.
    pub fn requests(&self) -> usize {
        self.requests.load(Ordering::SeqCst)
    }

    /// Connections accepted.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::SeqCst)
    }
}

impl Drop for RawUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A loopback port whose accept queue is full and never drained: new
/// connections to it hang (the kernel drops their SYNs), which is how a
/// blackholed upstream looks. Lives until dropped.
pub struct BlackholeUpstream {
    /// Where it "listens".
    pub addr: SocketAddr,
    _listener: TcpListener,
    _fillers: Vec<TcpStream>,
}

impl BlackholeUpstream {
    /// Binds with a backlog of 0 and fills the queue; panics if connects
    /// still succeed after that.
    pub async fn start() -> Self {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        let listener = socket.listen(0).expect("listen");
        let addr = listener.local_addr().expect("addr");
        let mut fillers = Vec::new();
        for _ in 0..16 {
            match tokio::time::timeout(Duration::from_millis(200), TcpStream::connect(addr)).await {
                Ok(Ok(s)) => fillers.push(s),
                Ok(Err(e)) => panic!("connect to the blackhole failed: {e}"),
                Err(_) => {
                    return BlackholeUpstream {
                        addr,
                        _listener: listener,
                        _fillers: fillers,
                    };
                }
            }
        }
        panic!("the accept queue never filled up");
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// A WebSocket echo server (tokio-tungstenite `accept_async`): echoes text
/// and binary messages back. Records the handshake headers it saw.
pub struct WsEchoUpstream {
    /// Where it listens.
    pub addr: SocketAddr,
    handshakes: Arc<AtomicUsize>,
    task: JoinHandle<()>,
}

impl WsEchoUpstream {
    /// Starts it.
    pub async fn start() -> Self {
        let (listener, addr) = bind_loopback().await;
        let handshakes = Arc::new(AtomicUsize::new(0));
        let h = handshakes.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let h = h.clone();
                tokio::spawn(async move {
                    let Ok(mut ws) = tokio_tungstenite::accept_async(tcp).await else {
                        return;
                    };
                    h.fetch_add(1, Ordering::SeqCst);
                    use futures_util::{SinkExt, StreamExt};
                    while let Some(Ok(msg)) = ws.next().await {
                        if msg.is_close() {
                            return;
                        }
                        if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        WsEchoUpstream {
            addr,
            handshakes,
            task,
        }
    }

    /// `http://127.0.0.1:PORT`, for `targets`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Completed WebSocket handshakes.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for WsEchoUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// ───────────────────────────────── clients ─────────────────────────────────

/// Request body type of [`TestClient`]: a whole body or a stream.
pub type ReqBody = BoxBody<Bytes, std::io::Error>;

/// A whole request body.
pub fn body(b: impl Into<Bytes>) -> ReqBody {
    Full::new(b.into())
        .map_err(|never: Infallible| match never {})
        .boxed()
}

/// An empty request body.
pub fn empty() -> ReqBody {
    body(Bytes::new())
}

/// A streamed request body (chunked on HTTP/1.1): send chunks on the
/// sender; dropping it ends the body.
pub fn channel_body() -> (mpsc::UnboundedSender<Bytes>, ReqBody) {
    let (tx, rx) = mpsc::unbounded_channel::<Bytes>();
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|b| (Ok::<_, std::io::Error>(Frame::data(b)), rx))
    });
    (tx, StreamBody::new(stream).boxed())
}

/// Which HTTP version a [`TestClient`] speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// HTTP/1.1 (over TLS: no ALPN offered).
    Http1,
    /// HTTP/2: prior knowledge in plain text, ALPN `h2` over TLS.
    Http2,
}

/// A response read whole, trailers included.
#[derive(Debug)]
pub struct TestResponse {
    /// Status.
    pub status: StatusCode,
    /// HTTP version the client spoke.
    pub version: Version,
    /// Headers.
    pub headers: HeaderMap,
    /// The whole body.
    pub body: Bytes,
    /// Trailers, if any came.
    pub trailers: Option<HeaderMap>,
}

impl TestResponse {
    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON; panics with the body if it is not JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// A header as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts the gateway's JSON error shape: `status`, `error.code == code`,
    /// a non-empty `message`, and `request_id` equal to `X-Request-Id`.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            self.status.as_u16(),
            status,
            "status; body: {}",
            self.text()
        );
        let v = self.json();
        let e = &v["error"];
        assert_eq!(e["code"], code, "error code in {v}");
        assert!(
            e["message"].as_str().is_some_and(|m| !m.is_empty()),
            "error message in {v}"
        );
        let rid = self
            .header("x-request-id")
            .expect("X-Request-Id on an error");
        assert_eq!(e["request_id"], rid, "request_id matches X-Request-Id");
    }
}

/// Reads a response whole, trailers included.
pub async fn read_response(resp: Response<Incoming>) -> TestResponse {
    let (parts, mut b) = resp.into_parts();
    let mut data = Vec::new();
    let mut trailers = None;
    while let Some(frame) = b.frame().await {
        let frame = frame.expect("read the response body");
        match frame.into_data() {
            Ok(d) => data.extend_from_slice(&d),
            Err(frame) => {
                if let Ok(t) = frame.into_trailers() {
                    trailers = Some(t);
                }
            }
        }
    }
    TestResponse {
        status: parts.status,
        version: parts.version,
        headers: parts.headers,
        body: Bytes::from(data),
        trailers,
    }
}

/// An HTTP client for the gateway: hyper-util's legacy (pooled) client over
/// hyper-rustls, HTTP/1.1 or HTTP/2, trusting the test certificate.
#[derive(Clone)]
pub struct TestClient {
    /// The underlying client, for tests that must see transport errors.
    pub client: Client<HttpsConnector<HttpConnector>, ReqBody>,
}

impl TestClient {
    /// A client for `proto`; `certs` is the certificate to trust for
    /// `https://` URLs (plain `http://` works either way).
    pub fn new(proto: Proto, certs: Option<&TestCerts>) -> Self {
        let tls = match certs {
            Some(c) => c.client_config(&[], &[]),
            None => rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth(),
        };
        let b = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http();
        let (connector, h2) = match proto {
            Proto::Http1 => (b.enable_http1().build(), false),
            Proto::Http2 => (b.enable_http2().build(), true),
        };
        let client = Client::builder(TokioExecutor::new())
            .http2_only(h2)
            .build(connector);
        TestClient { client }
    }

    /// An HTTP/1.1 client.
    pub fn h1(certs: Option<&TestCerts>) -> Self {
        Self::new(Proto::Http1, certs)
    }

    /// An HTTP/2 client.
    pub fn h2(certs: Option<&TestCerts>) -> Self {
        Self::new(Proto::Http2, certs)
    }

    /// Sends a request; returns the response with its body unread
    /// (streaming). Panics if the request fails at the HTTP level.
    pub async fn send_streaming(&self, req: Request<ReqBody>) -> Response<Incoming> {
        let what = format!("{} {}", req.method(), req.uri());
        self.client
            .request(req)
            .await
            .unwrap_or_else(|e| panic!("{what}: {e:?}"))
    }

    /// Sends a request and reads the whole response.
    pub async fn send(&self, req: Request<ReqBody>) -> TestResponse {
        read_response(self.send_streaming(req).await).await
    }

    /// Sends a request; `Err` when it fails at the HTTP level.
    pub async fn try_send(
        &self,
        req: Request<ReqBody>,
    ) -> Result<TestResponse, hyper_util::client::legacy::Error> {
        Ok(read_response(self.client.request(req).await?).await)
    }

    /// `GET url`.
    pub async fn get(&self, url: &str) -> TestResponse {
        self.send(Request::get(url).body(empty()).expect("request"))
            .await
    }

    /// `GET url` with extra headers.
    pub async fn get_with(&self, url: &str, headers: &[(&str, &str)]) -> TestResponse {
        let mut b = Request::get(url);
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        self.send(b.body(empty()).expect("request")).await
    }
}

// ──────────────────────────────── raw bytes ────────────────────────────────

/// What came back on a raw connection.
#[derive(Debug)]
pub struct RawReply {
    /// Every byte read.
    pub bytes: Vec<u8>,
    /// Whether the peer closed the connection (EOF or reset) before the wait ran out.
    pub closed: bool,
}

impl RawReply {
    /// The bytes as text (lossy).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.bytes).into_owned()
    }

    /// The status code of the first response, if one came.
    pub fn status(&self) -> Option<u16> {
        let t = self.text();
        let line = t.lines().next()?;
        let mut it = line.split(' ');
        it.next().filter(|v| v.starts_with("HTTP/"))?;
        it.next()?.parse().ok()
    }

    /// A header of the first response (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        let t = self.text();
        let head = t.split("\r\n\r\n").next()?;
        head.lines().skip(1).find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim()
                .eq_ignore_ascii_case(name)
                .then(|| v.trim().to_string())
        })
    }

    /// The first response's body (everything after the head; chunked
    /// bodies are not decoded).
    pub fn body(&self) -> String {
        let t = self.text();
        t.split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default()
    }
}

/// Writes `bytes` on `stream`, then reads until the peer closes or nothing
/// arrives for `wait`.
pub async fn raw_exchange<S: AsyncRead + AsyncWrite + Unpin>(
    mut stream: S,
    bytes: &[u8],
    wait: Duration,
) -> RawReply {
    // The server may answer (and close) before reading everything we send.
    let _ = stream.write_all(bytes).await;
    let _ = stream.flush().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 16384];
    loop {
        match tokio::time::timeout(wait, stream.read(&mut buf)).await {
            Err(_) => {
                return RawReply {
                    bytes: out,
                    closed: false,
                };
            }
            Ok(Ok(0)) | Ok(Err(_)) => {
                return RawReply {
                    bytes: out,
                    closed: true,
                };
            }
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
        }
    }
}

/// Connects to `addr`, sends `bytes`, reads until close or 3 s of silence.
pub async fn raw_request(addr: SocketAddr, bytes: &[u8]) -> RawReply {
    raw_request_wait(addr, bytes, Duration::from_secs(3)).await
}

/// [`raw_request`] with your own silence timeout.
pub async fn raw_request_wait(addr: SocketAddr, bytes: &[u8], wait: Duration) -> RawReply {
    let tcp = TcpStream::connect(addr)
        .await
        .expect("connect to the gateway");
    raw_exchange(tcp, bytes, wait).await
}

/// The directory of the currently running test binary's package (for
/// fixtures): `CARGO_MANIFEST_DIR`.
pub fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Reads exactly one HTTP/1.1 response with a `Content-Length` body from a
/// kept-alive raw connection and returns its text.
pub async fn read_one_response(stream: &mut TcpStream) -> String {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        if let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&out[..end]).to_ascii_lowercase();
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if out.len() >= end + 4 + len {
                return String::from_utf8_lossy(&out[..end + 4 + len]).into_owned();
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .expect("read the response");
        assert!(
            n > 0,
            "connection closed mid-response: {:?}",
            String::from_utf8_lossy(&out)
        );
        out.extend_from_slice(&buf[..n]);
    }
}
