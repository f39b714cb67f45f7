//! Under a fault the logs stay readable and true: repeated warnings are
//! summarised, a cut upstream body is logged as cut.
//!
//! Each test runs the real binary with `--log-format json` and reads its
//! stdout; readiness is a log line or a response, polled with a deadline.

use crate::common::faults::{Admin, keyed_config};
use crate::common::*;
use serde_json::Value;
use std::time::{Duration, Instant};

/// The gateway's JSON log lines so far (other output skipped).
fn events(p: &GatewayProcess) -> Vec<Value> {
    p.stdout()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn message(e: &Value) -> &str {
    e["message"].as_str().unwrap_or_default()
}

/// Polls the log until `done` holds for its events; panics with the output
/// after `timeout`.
async fn wait_log(
    p: &GatewayProcess,
    what: &str,
    timeout: Duration,
    done: impl Fn(&[Value]) -> bool,
) -> Vec<Value> {
    let start = Instant::now();
    loop {
        let ev = events(p);
        if done(&ev) {
            return ev;
        }
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}:\n{}",
            p.output()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `[upstreams.NAME]` and a route `/v1/NAME` to it that needs no key.
fn open_route(name: &str, url: &str) -> String {
    format!(
        "\n[upstreams.{name}]\ntargets = [\"{url}\"]\n\n[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"/v1/{name}\"\nupstream = \"{name}\"\nauth = \"none\"\n"
    )
}

/// A dead upstream (nothing listens on its port) hit a few hundred times:
/// a handful of `upstream failed` lines, not one per request, and once the
/// requests stop the periodic tick writes the count still pending, so that
/// lines logged plus `suppressed` counts equal the 502s the clients got.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_upstream_s_failures_are_summarised_with_their_count() {
    const REQUESTS: usize = 300;
    let dead = format!("http://127.0.0.1:{}", free_port());
    let toml = gateway_toml(None, "") + &open_route("dead", &dead);
    let p = spawn_gateway_process_with(&toml, &["--log-format", "json"]);
    let c = TestClient::h1(None);
    let url = p.url("/v1/dead");

    let mut bad_gateway = 0;
    for _ in 0..REQUESTS {
        let r = c.get(&url).await;
        if r.status.as_u16() == 502 {
            bad_gateway += 1;
        }
    }
    assert_eq!(bad_gateway, REQUESTS, "a closed port answers 502");

    let is_failure = |e: &Value| message(e).starts_with("upstream failed");
    // Each line counts itself when it is a full one (it names a request),
    // plus the occurrences it reports as not logged.
    let total = |ev: &[Value]| -> u64 {
        ev.iter()
            .filter(|e| is_failure(e))
            .map(|e| u64::from(e["request_id"].is_string()) + e["suppressed"].as_u64().unwrap_or(0))
            .sum()
    };
    // The pending count comes with the tick after the 10 s interval.
    let ev = wait_log(
        &p,
        "every 502 logged or counted",
        Duration::from_secs(16),
        |ev| total(ev) >= REQUESTS as u64,
    )
    .await;
    let lines: Vec<&Value> = ev.iter().filter(|e| is_failure(e)).collect();
    assert_eq!(
        total(&ev),
        bad_gateway as u64,
        "lines logged + suppressed must equal the 502s: {lines:#?}"
    );
    assert!(
        lines.len() <= 4,
        "{} `upstream failed` lines for {REQUESTS} failures: not summarised",
        lines.len()
    );
    let full = lines
        .iter()
        .find(|e| e["request_id"].is_string())
        .expect("the first failure is logged in full");
    assert_eq!(full["upstream"], "dead", "{full}");
    assert_eq!(full["level"], "WARN", "{full}");
    assert!(
        lines.iter().any(|e| e["suppressed"].as_u64() > Some(0)),
        "no line carries the count of those not logged: {lines:#?}"
    );
    // Access lines are never summarised: one per request.
    let access = ev
        .iter()
        .filter(|e| e["target"] == "portcullis::access" && e["status"] == 502)
        .count();
    assert_eq!(access, REQUESTS, "one access line per request");
}

/// An upstream that promises 1000 bytes, sends 10 and closes: the access
/// line (written with the head) says 200, and a warning names the upstream,
/// the route and the request with the bytes actually sent and promised.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_upstream_body_is_logged_with_the_bytes_sent() {
    let up = RawUpstream::start(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789").await;
    let toml = gateway_toml(None, "") + &open_route("cutter", &up.url());
    let p = spawn_gateway_process_with(&toml, &["--log-format", "json"]);

    let reply = raw_request(
        p.addr,
        b"GET /v1/cutter HTTP/1.1\r\nHost: gw\r\nX-Request-Id: cut-body-1\r\n\r\n",
    )
    .await;
    assert_eq!(reply.status(), Some(200), "{}", reply.text());
    assert!(reply.closed, "the client's connection must be aborted");
    assert_eq!(reply.body(), "0123456789", "{}", reply.text());

    let is_cut = |e: &Value| message(e).starts_with("upstream body cut short");
    let ev = wait_log(&p, "the cut-body warning", Duration::from_secs(10), |ev| {
        ev.iter().any(is_cut)
    })
    .await;
    let cuts: Vec<&Value> = ev.iter().filter(|e| is_cut(e)).collect();
    assert_eq!(cuts.len(), 1, "one warning per cut body: {cuts:#?}");
    let w = cuts[0];
    assert_eq!(w["level"], "WARN", "{w}");
    assert_eq!(w["upstream"], "cutter", "{w}");
    assert_eq!(w["route"], "cutter", "{w}");
    assert_eq!(w["request_id"], "cut-body-1", "{w}");
    assert_eq!(w["bytes_sent"], 10, "{w}");
    assert_eq!(w["bytes_promised"], 1000, "{w}");

    let access: Vec<&Value> = ev
        .iter()
        .filter(|e| e["target"] == "portcullis::access")
        .collect();
    assert_eq!(access.len(), 1, "{access:#?}");
    assert_eq!(access[0]["request_id"], "cut-body-1");
}

/// A client that leaves while its request waits on the upstream: the access
/// log still gets the request (499, naming the upstream it went to), and
/// its in-flight slot is given back: with `max_in_flight = 1` the next
/// request is served, not refused as overloaded.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_leaves_is_logged_and_frees_its_slot() {
    let slow = SlowUpstream::start(Duration::from_secs(2)).await;
    let echo = EchoUpstream::start().await;
    let toml = gateway_toml(None, "max_in_flight = 1")
        + &open_route("slow", &slow.url())
        + &open_route("echo", &echo.url());
    let p = spawn_gateway_process_with(&toml, &["--log-format", "json"]);

    let mut tcp = tokio::net::TcpStream::connect(p.addr)
        .await
        .expect("connect");
    tokio::io::AsyncWriteExt::write_all(
        &mut tcp,
        b"GET /v1/slow HTTP/1.1\r\nHost: gw\r\nX-Request-Id: left-early-1\r\n\r\n",
    )
    .await
    .expect("send");
    let start = Instant::now();
    while slow.arrived() < 1 {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "never reached the upstream"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(tcp);

    let is_it =
        |e: &Value| e["target"] == "portcullis::access" && e["request_id"] == "left-early-1";
    let ev = wait_log(
        &p,
        "the access line of the abandoned request",
        Duration::from_secs(10),
        |ev| ev.iter().any(is_it),
    )
    .await;
    let line = ev.iter().find(|e| is_it(e)).expect("found above");
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["upstream"], "slow", "{line}");

    let r = TestClient::h1(None).get(&p.url("/v1/echo")).await;
    assert_eq!(r.status.as_u16(), 200, "the slot leaked: {}", r.text());
}

/// Stdout that stops being read (a stalled log collector) never stalls
/// requests: access lines queue up to a bound, further lines are dropped and
/// counted in `portcullis_log_lines_dropped_total`, and once stdout is read
/// again every request is accounted for, logged or counted as dropped.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_stdout_drops_counted_log_lines_instead_of_stalling_requests() {
    // Past the queue and what the pipe holds (64 KiB, a few hundred lines).
    const REQUESTS: usize = portcullis::logging::QUEUED_LINES + 2_000;
    const CLIENTS: usize = 16;
    let up = EchoUpstream::start().await;
    let toml = keyed_config(
        "",
        "url = \"sqlite://keys.db\"",
        "[log]\nlevel = \"info\"",
        &up.url(),
        "",
    );
    let mut p = spawn_gateway_process_unread(&toml);
    let url = p.url("/v1/open/x");
    let c = TestClient::h1(None);
    let mut tasks = Vec::new();
    for i in 0..CLIENTS {
        let (c, url) = (c.clone(), url.clone());
        tasks.push(tokio::spawn(async move {
            let mut ok = 0;
            for _ in (i..REQUESTS).step_by(CLIENTS) {
                let r = tokio::time::timeout(Duration::from_secs(5), c.get(&url))
                    .await
                    .expect("a request stalled behind the unread stdout");
                ok += usize::from(r.status.as_u16() == 200);
            }
            ok
        }));
    }
    let mut ok = 0;
    for t in tasks {
        ok += t.await.expect("client task");
    }
    assert_eq!(ok, REQUESTS, "every request answered 200");

    let admin = Admin::new(p.admin_addr);
    let dropped = || async {
        let text = admin.call("GET", "/metrics", None).await.text();
        text.lines()
            .find_map(|l| l.strip_prefix("portcullis_log_lines_dropped_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .expect("portcullis_log_lines_dropped_total in /metrics") as usize
    };
    let lost = dropped().await;
    assert!(lost > 0, "the queue is bounded: lines past it are dropped");

    // Read again: the queued lines come out, and logged + dropped = requests.
    p.read_stdout();
    let access = |p: &GatewayProcess| {
        p.stdout()
            .lines()
            .filter(|l| l.contains("portcullis::access") && l.contains("/v1/open/x"))
            .count()
    };
    let start = Instant::now();
    while access(&p) + lost < REQUESTS {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{} access lines + {lost} dropped < {REQUESTS} requests",
            access(&p)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        access(&p) + lost,
        REQUESTS,
        "each request logged or counted once"
    );
    assert_eq!(dropped().await, lost, "nothing dropped once stdout is read");
}
