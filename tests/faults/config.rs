//! The config file, caught half-written or replaced, never applies partly.
//! A change applies once the file has settled; SIGHUP applies at once;
//! writing a temporary file and renaming it over the config is the safe way.

use crate::common::*;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

const ADMIN_TOKEN: &str = "faults-admin-token-c0nf1g";

/// An `auth = "none"` GET route `/NAME` to `echo`.
fn route(name: &str) -> String {
    format!(
        "\n[[routes]]\nname = \"{name}\"\nmethods = [\"GET\"]\npath = \"/{name}\"\nupstream = \"echo\"\nauth = \"none\"\n"
    )
}

/// Eight routes `/r0` … `/r7` to `echo`: most of the file's prefixes are
/// valid configs that lack `/r7`.
fn config(upstream: &str) -> String {
    let routes: String = (0..8).map(|i| route(&format!("r{i}"))).collect();
    gateway_toml(
        None,
        &format!(
            "\n[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{ADMIN_TOKEN}\"\n\n[upstreams.echo]\ntargets = [\"{upstream}\"]\n{routes}"
        ),
    )
}

/// GETs `url` every 20 ms until stopped; returns every status (0: no answer).
fn steady_load(url: String, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Vec<u16>> {
    tokio::spawn(async move {
        let c = TestClient::h1(None);
        let mut codes = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let req = http::Request::get(&url).body(empty()).expect("request");
            codes.push(c.try_send(req).await.map_or(0, |r| r.status.as_u16()));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        codes
    })
}

/// Polls `url` until it answers `status`; panics after `timeout`.
async fn wait_for_status(url: &str, status: u16, timeout: Duration) {
    let c = TestClient::h1(None);
    eventually(&format!("{url} answers {status}"), timeout, || {
        let req = http::Request::get(url).body(empty()).expect("request");
        let c = &c;
        async move { c.try_send(req).await.is_ok_and(|r| r.status == status) }
    })
    .await;
}

/// The count of applied reloads, from `/metrics`.
async fn reloads_applied(admin: std::net::SocketAddr) -> u64 {
    let r = TestClient::h1(None)
        .get_with(
            &format!("http://{admin}/metrics"),
            &[("authorization", &format!("Bearer {ADMIN_TOKEN}"))],
        )
        .await;
    r.text()
        .lines()
        .find(|l| l.starts_with("portcullis_config_reloads_total{result=\"ok\"}"))
        .and_then(|l| l.rsplit(' ').next()?.parse().ok())
        .unwrap_or(0)
}

/// Rewrites `path` in place, as an editor saving over it or a slow copy
/// would: truncated, then one line every `pause`.
fn write_slowly_in_place(path: &Path, text: &str, pause: Duration) {
    let mut f = std::fs::File::create(path).expect("truncate the config");
    for line in text.split_inclusive('\n') {
        f.write_all(line.as_bytes()).expect("write a line");
        f.flush().expect("flush");
        std::thread::sleep(pause);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_rewritten_in_place_line_by_line_never_applies_half_written() {
    let up = EchoUpstream::start().await;
    let gw = start_gateway(&config(&up.url())).await;
    let before = std::fs::read_to_string(&gw.config_path).expect("read the config");
    let after = format!("{before}{}", route("r8"));
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(gw.url("/r7"), stop.clone());

    let path = gw.config_path.clone();
    tokio::task::spawn_blocking(move || {
        write_slowly_in_place(&path, &after, Duration::from_millis(40))
    })
    .await
    .expect("writer");
    // The whole new version applies once the file holds still.
    wait_for_status(&gw.url("/r8"), 200, Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    let codes = load.await.expect("load");

    let refused: Vec<u16> = codes.iter().copied().filter(|&c| c != 200).collect();
    assert!(codes.len() > 50, "only {} requests made", codes.len());
    assert!(
        refused.is_empty(),
        "{} of {} requests to /r7 were not 200 while the config was being written: {refused:?}",
        refused.len(),
        codes.len()
    );
    assert_eq!(
        reloads_applied(gw.admin_addr).await,
        1,
        "only the finished file is applied, once"
    );
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_replaced_by_rename_applies_whole() {
    let up = EchoUpstream::start().await;
    let gw = start_gateway(&config(&up.url())).await;
    let before = std::fs::read_to_string(&gw.config_path).expect("read the config");
    let stop = Arc::new(AtomicBool::new(false));
    let load = steady_load(gw.url("/r7"), stop.clone());

    let tmp = gw.config_path.with_extension("toml.tmp");
    write_slowly_in_place(
        &tmp,
        &format!("{before}{}", route("r8")),
        Duration::from_millis(10),
    );
    std::fs::rename(&tmp, &gw.config_path).expect("rename over the config");
    wait_for_status(&gw.url("/r8"), 200, Duration::from_secs(10)).await;
    stop.store(true, Ordering::SeqCst);
    let codes = load.await.expect("load");
    assert!(
        codes.iter().all(|&c| c == 200),
        "every request to /r7 is 200 across the rename: {codes:?}"
    );
    assert_eq!(reloads_applied(gw.admin_addr).await, 1);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_keeps_changing_applies_only_on_sighup_and_then_at_once() {
    let up = EchoUpstream::start().await;
    let gw = spawn_gateway_process(&config(&up.url()));
    let before = std::fs::read_to_string(&gw.config_path).expect("read the config");
    let next = format!("{before}{}", route("r8"));

    // A writer that never lets the file settle: the new version, then a
    // comment line appended every 20 ms.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (path, stop) = (gw.config_path.clone(), stop.clone());
        std::thread::spawn(move || {
            let mut f = std::fs::File::create(&path).expect("truncate the config");
            f.write_all(next.as_bytes()).expect("write");
            let mut n = 0;
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                n += 1;
                writeln!(f, "# still writing {n}").expect("append");
            }
        })
    };

    // For a good while the new route is not there: the file never settled.
    let c = TestClient::h1(None);
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            c.get(&gw.url("/r8")).await.status,
            404,
            "a file still being written was applied"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // SIGHUP: the operator says the file is complete; it applies at once.
    gw.signal("HUP");
    wait_for_status(&gw.url("/r8"), 200, Duration::from_secs(3)).await;
    stop.store(true, Ordering::SeqCst);
    writer.join().expect("writer");
    assert_eq!(c.get(&gw.url("/r7")).await.status, 200);
}
