//! The gateway's own process: SIGTERM with requests in flight, too few file descriptors.

use crate::common::faults::*;
use crate::common::*;
use bytes::Bytes;
use std::process::Command;
use std::time::{Duration, Instant};
use tokio::net::TcpStream;

/// A config whose `/v1/open/*rest` route (no key) goes to `upstream`.
fn open_config(server_extra: &str, upstream: &str) -> String {
    keyed_config(
        server_extra,
        "url = \"sqlite://keys.db\"",
        "[log]\nlevel = \"warn\"",
        upstream,
        "request_timeout = \"30s\"",
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_every_request_in_flight_finish_whole_refuses_new_connections_and_exits_0() {
    const GRACE: Duration = Duration::from_secs(10);
    let up = DelayedEchoUpstream::start(Duration::from_millis(1500)).await;
    let mut gw = tokio::task::block_in_place(|| {
        spawn_gateway_process(&open_config("shutdown_grace = \"10s\"", &up.url()))
    });
    let post_body = Bytes::from(
        (0..100 * 1024)
            .map(|i| b"POST body "[i % 10])
            .collect::<Vec<u8>>(),
    );
    // Eight requests, each on its own connection: seven GETs with large
    // answers and a POST whose body comes back.
    let mut in_flight = Vec::new();
    for i in 0..8 {
        let url = gw.url(&format!("/v1/open/r{i}"));
        let post_body = post_body.clone();
        in_flight.push(tokio::spawn(async move {
            let client = TestClient::h1(None);
            let r = if i == 0 {
                client.send(post_with(&url, &[], post_body)).await
            } else {
                client.get(&url).await
            };
            (i, r)
        }));
    }
    eventually(
        "all eight requests to reach the upstream",
        Duration::from_secs(10),
        || async { up.arrived() == 8 },
    )
    .await;
    let signalled = Instant::now();
    gw.signal("TERM");
    let addr = gw.addr;
    eventually(
        "the listener to refuse new connections",
        Duration::from_secs(2),
        || async move { TcpStream::connect(addr).await.is_err() },
    )
    .await;
    let expected_get = DelayedEchoUpstream::body_for_get();
    for task in in_flight {
        let (i, r) = tokio::time::timeout(GRACE, task)
            .await
            .expect("a request in flight finished within the grace")
            .expect("the request task");
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
        let expected = if i == 0 { &post_body } else { &expected_get };
        assert!(
            r.body == *expected,
            "request {i}: body of {} bytes, expected {}",
            r.body.len(),
            expected.len()
        );
    }
    let status = tokio::task::block_in_place(|| gw.wait_exit(GRACE));
    let took = signalled.elapsed();
    assert_eq!(status.code(), Some(0), "{}", gw.output());
    assert!(
        took < GRACE,
        "exited {took:?} after SIGTERM: not within the {GRACE:?} grace"
    );
}

/// Lowers the open-files limit (soft and hard) of a running process with
/// `prlimit(1)` from util-linux.
fn limit_open_files(pid: u32, n: usize) {
    let out = Command::new("prlimit")
        .arg("--pid")
        .arg(pid.to_string())
        .arg(format!("--nofile={n}:{n}"))
        .output()
        .expect("run prlimit (util-linux)");
    assert!(
        out.status.success(),
        "prlimit --nofile={n}:{n} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_file_descriptors_the_gateway_does_not_spin_and_serves_again_once_they_free_up() {
    let echo = EchoUpstream::start().await;
    let mut gw =
        tokio::task::block_in_place(|| spawn_gateway_process(&open_config("", &echo.url())));
    let pid = gw.child.id();
    let client = TestClient::h1(None);
    let r = client.get(&gw.url("/v1/open/warm")).await;
    assert_eq!(r.status, 200, "{}", r.text());
    drop(client);

    // Room for a handful more descriptors, then three times as many
    // connections: the kernel completes them all, the gateway cannot
    // accept them all.
    let limit = open_fds(Some(pid)) + 8;
    limit_open_files(pid, limit);
    let mut conns = Vec::new();
    for _ in 0..24 {
        conns.push(
            TcpStream::connect(gw.addr)
                .await
                .expect("the kernel completes the connection"),
        );
    }
    eventually(
        "the gateway to run out of file descriptors",
        Duration::from_secs(10),
        || async { open_fds(Some(pid)) >= limit - 1 },
    )
    .await;

    // Saturated: measured over two seconds, the gateway must not spin on
    // EMFILE (a spinning accept loop burns a whole core).
    let cpu_before = cpu_time(pid);
    let window = Instant::now();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let used = cpu_time(pid).saturating_sub(cpu_before);
    let elapsed = window.elapsed();
    println!("out of fds: {used:?} of CPU over {elapsed:?}");
    assert!(
        used < elapsed / 4,
        "the gateway used {used:?} of CPU over {elapsed:?} while out of file descriptors"
    );
    assert!(
        gw.child.try_wait().expect("try_wait").is_none(),
        "still running"
    );

    // The connections close: the gateway serves again.
    drop(conns);
    let url = gw.url("/v1/open/again");
    eventually(
        "a request to be served once descriptors are free",
        Duration::from_secs(10),
        || async {
            let client = TestClient::h1(None);
            let req = http::Request::get(&url).body(empty()).expect("request");
            matches!(
                tokio::time::timeout(Duration::from_secs(2), client.try_send(req)).await,
                Ok(Ok(r)) if r.status == 200
            )
        },
    )
    .await;
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "{}", gw.output());
}
