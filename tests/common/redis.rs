//! Real Redis servers for integration tests: a single node ([`RedisServer`])
//! and a 3-master cluster ([`RedisCluster`]), each in its own temp dir on
//! free loopback ports, killed on drop.
//!
//! Include it with `#[path = "common/redis.rs"] mod redis_support;` (or as
//! `mod redis;` from `tests/common/mod.rs`). Needs `redis-server` and
//! `redis-cli` on PATH; a test that needs them and cannot find them panics
//! rather than silently skipping.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server may take to answer PING, a cluster to reach `ok`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Panics with install instructions when `bin` is not runnable.
fn require(bin: &str) {
    let ok = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "`{bin}` not found on PATH: these tests need a real Redis \
         (install it: `apt-get install -y redis-server`, or `brew install redis`)"
    );
}

/// A loopback port nothing listens on right now. With `bus`, port + 10000
/// (the cluster bus) is free too.
fn free_port(bus: bool) -> u16 {
    for _ in 0..200 {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
        let port = l.local_addr().expect("local addr").port();
        if !bus {
            return port;
        }
        if port < 55_000 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port found");
}

/// Sends one RESP command and returns the raw reply, or None if the server
/// does not answer (yet).
fn raw_command(port: u16, args: &[&str]) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(500))
            .ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    s.write_all(req.as_bytes()).ok()?;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    // Replies used here are small; read until the first full line, then
    // whatever else is already there (bulk replies).
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
        if let Some(len) = bulk_len(&out) {
            if out.len() >= len {
                break;
            }
        } else if out.ends_with(b"\r\n") {
            break;
        }
    }
    let _ = s.shutdown(Shutdown::Both);
    String::from_utf8(out).ok()
}

/// For a `$<n>\r\n…` bulk reply, the total length it will have.
fn bulk_len(reply: &[u8]) -> Option<usize> {
    if reply.first() != Some(&b'$') {
        return None;
    }
    let end = reply.windows(2).position(|w| w == b"\r\n")?;
    let n: isize = std::str::from_utf8(&reply[1..end]).ok()?.parse().ok()?;
    Some(end + 2 + n.max(0) as usize + 2)
}

/// Polls `check` every 20 ms until it holds, panicking with `what` after
/// `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// One `redis-server` process with AOF on and fsync at every write.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    /// Keeps the directory alive (and removes it at the end) unless borrowed.
    _tmp: Option<tempfile::TempDir>,
    child: Option<Child>,
    extra: Vec<String>,
}

impl RedisServer {
    /// Starts a standalone server and waits until it answers PING.
    pub fn start() -> Self {
        Self::start_with(Vec::new(), false)
    }

    fn start_with(extra: Vec<String>, cluster: bool) -> Self {
        require("redis-server");
        let tmp = tempfile::tempdir().expect("temp dir for redis");
        let dir = tmp.path().to_path_buf();
        // Another process may grab the port between our probe and the
        // server's bind: retry with a new port.
        for _ in 0..5 {
            let mut server = RedisServer {
                port: free_port(cluster),
                dir: dir.clone(),
                _tmp: None,
                child: None,
                extra: extra.clone(),
            };
            if server.spawn_and_wait() {
                server._tmp = Some(tmp);
                return server;
            }
        }
        panic!("redis-server did not start; see logs in {}", dir.display());
    }

    /// Spawns the process; true once it answers PING, false if it exited.
    fn spawn_and_wait(&mut self) -> bool {
        let log = self.dir.join(format!("redis-{}.log", self.port));
        let mut cmd = Command::new("redis-server");
        cmd.arg("--port")
            .arg(self.port.to_string())
            .args(["--bind", "127.0.0.1", "--daemonize", "no", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always"])
            .arg("--dir")
            .arg(&self.dir)
            .arg("--logfile")
            .arg(&log)
            .args(&self.extra)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd.spawn().expect("spawn redis-server");
        self.child = Some(child);
        let start = Instant::now();
        loop {
            if let Some(reply) = raw_command(self.port, &["PING"])
                && reply.starts_with("+PONG")
            {
                return true;
            }
            // Exited (e.g. port taken)?
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(_)) = child.try_wait()
            {
                self.child = None;
                return false;
            }
            if start.elapsed() > READY_TIMEOUT {
                let log = std::fs::read_to_string(&log).unwrap_or_default();
                panic!(
                    "redis-server on port {} not ready after {READY_TIMEOUT:?}; log:\n{log}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The port it listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its data directory (AOF lives here).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// `redis://127.0.0.1:<port>/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Sends a command over a fresh connection and returns the raw RESP reply.
    pub fn command(&self, args: &[&str]) -> Option<String> {
        raw_command(self.port, args)
    }

    /// SIGKILLs the server (no shutdown, no final fsync) and reaps it.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill(); // SIGKILL on Unix
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and directory (it reloads
    /// its AOF) and waits until it answers PING (not LOADING).
    pub fn restart(&mut self) {
        self.kill9();
        assert!(
            self.spawn_and_wait(),
            "redis-server did not restart on port {}",
            self.port
        );
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Three `redis-server` masters joined into a cluster (no replicas).
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Starts three cluster-enabled servers, creates the cluster with
    /// `redis-cli --cluster create`, and waits until every node reports
    /// `cluster_state:ok`.
    pub fn start() -> Self {
        require("redis-server");
        require("redis-cli");
        let cluster_args = || {
            vec![
                "--cluster-enabled".to_string(),
                "yes".to_string(),
                "--cluster-config-file".to_string(),
                "nodes.conf".to_string(),
                "--cluster-node-timeout".to_string(),
                "5000".to_string(),
            ]
        };
        let nodes: Vec<RedisServer> = (0..3)
            .map(|_| RedisServer::start_with(cluster_args(), true))
            .collect();
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        for n in &nodes {
            wait_until(
                &format!("cluster_state:ok on port {}", n.port),
                READY_TIMEOUT,
                || {
                    n.command(&["CLUSTER", "INFO"])
                        .is_some_and(|r| r.contains("cluster_state:ok"))
                },
            );
        }
        RedisCluster { nodes }
    }

    /// The nodes, for killing or inspecting one.
    pub fn nodes(&mut self) -> &mut [RedisServer] {
        &mut self.nodes
    }

    /// `redis+cluster://127.0.0.1:p1,127.0.0.1:p2,127.0.0.1:p3`.
    pub fn url(&self) -> String {
        let hosts: Vec<String> = self
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        format!("redis+cluster://{}", hosts.join(","))
    }
}
