//! Upstreams that stop, die mid-body, refuse, or answer malformed framing.

use crate::common::faults::*;
use crate::common::*;
use futures_util::StreamExt;
use http::Request;
use http_body_util::BodyExt;
use std::time::{Duration, Instant};

/// A gateway whose `/v1/open/*rest` route (no key) goes to `upstream`.
async fn gateway_to(upstream: &str, upstream_extra: &str) -> TestGateway {
    start_gateway(&keyed_config(
        "",
        "url = \"sqlite://keys.db\"",
        "",
        upstream,
        upstream_extra,
    ))
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stopped_upstream_is_504_within_the_route_timeout_and_a_post_is_sent_once() {
    let silent = SilentUpstream::start().await;
    let gw = gateway_to(&silent.url(), "request_timeout = \"500ms\"").await;
    for (n, client) in [(1, TestClient::h1(None)), (2, TestClient::h2(None))] {
        let start = Instant::now();
        let r = client
            .send(post_with(&gw.url("/v1/open/pay"), &[], "charge=100"))
            .await;
        let took = start.elapsed();
        r.assert_error(504, "UPSTREAM_TIMEOUT");
        assert!(
            took >= Duration::from_millis(450) && took < Duration::from_secs(3),
            "504 after {took:?}; the route's request timeout is 500ms"
        );
        // No readiness signal for "nothing more happens": give a retry
        // twice the timeout to show up.
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(
            silent.requests(),
            n,
            "a POST that reached the upstream is never sent again"
        );
        assert_eq!(silent.connections(), n, "no second connection for a retry");
    }
    gw.shutdown().await;
}

/// A head promising 1000 bytes, 10 of them, then the connection closes.
const CUT_LENGTH: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n0123456789";
/// A chunked body with one chunk and no last chunk, then the connection closes.
const CUT_CHUNKED: &[u8] =
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n0123456789\r\n";

/// Over raw HTTP/1.1: a 502, or a response whose framing shows it is cut
/// (fewer bytes than its Content-Length, or no last chunk) on a connection
/// the gateway closes. Never a complete-looking answer.
async fn assert_cut_over_http1(gw: &TestGateway, what: &str) {
    let reply = raw_request(
        gw.addr,
        b"GET /v1/open/cut HTTP/1.1\r\nHost: gateway.test\r\n\r\n",
    )
    .await;
    assert!(
        reply.closed,
        "{what}: the connection must close after a cut body: {:?}",
        reply.text()
    );
    match reply.status() {
        Some(502) => {}
        Some(200) => {
            let body = reply.body();
            if let Some(len) = reply.header("content-length") {
                let len: usize = len.parse().expect("a numeric Content-Length");
                assert!(
                    body.len() < len,
                    "{what}: all {len} promised bytes arrived: {body:?}"
                );
            } else {
                assert!(
                    reply
                        .header("transfer-encoding")
                        .is_some_and(|te| te.eq_ignore_ascii_case("chunked")),
                    "{what}: a close-delimited body cannot show it was cut: {:?}",
                    reply.text()
                );
                assert!(
                    !body.ends_with("0\r\n\r\n"),
                    "{what}: the last chunk was sent: {body:?}"
                );
            }
        }
        other => panic!("{what}: unexpected answer {other:?}: {:?}", reply.text()),
    }
}

/// Over HTTP/2: a 502, or a 200 whose body ends in an error (the stream
/// reset), never a clean end.
async fn assert_cut_over_http2(gw: &TestGateway, what: &str) {
    let client = TestClient::h2(None);
    let resp = match client
        .client
        .request(
            Request::get(gw.url("/v1/open/cut"))
                .body(empty())
                .expect("request"),
        )
        .await
    {
        Ok(resp) => resp,
        // Reset before the head: an abort too.
        Err(_) => return,
    };
    match resp.status().as_u16() {
        502 => read_response(resp)
            .await
            .assert_error(502, "UPSTREAM_UNAVAILABLE"),
        200 => {
            let body = resp.into_body().collect().await;
            assert!(
                body.is_err(),
                "{what}: over h2 the stream must be reset, not ended cleanly: {:?}",
                body.map(|b| b.to_bytes())
            );
        }
        s => panic!("{what}: unexpected status {s}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_killed_mid_body_reaches_the_client_as_an_abort_never_a_complete_answer() {
    for (what, reply) in [
        ("Content-Length 1000, 10 bytes sent", CUT_LENGTH),
        ("chunked without its last chunk", CUT_CHUNKED),
    ] {
        let raw = RawUpstream::start(reply).await;
        let gw = gateway_to(&raw.url(), "").await;
        assert_cut_over_http1(&gw, what).await;
        assert_cut_over_http2(&gw, what).await;
        assert_eq!(
            raw.requests(),
            2,
            "{what}: each request reached the upstream"
        );
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refusing_upstream_is_a_fast_502_and_leaks_no_file_descriptor() {
    let closed = format!("http://127.0.0.1:{}", free_port());
    // The real binary: its descriptors are its own, whatever other tests
    // running in this process open meanwhile.
    let mut gw = tokio::task::block_in_place(|| {
        spawn_gateway_process(&keyed_config(
            "",
            "url = \"sqlite://keys.db\"",
            "",
            &closed,
            "connect_timeout = \"5s\"",
        ))
    });
    let pid = gw.child.id();
    let client = TestClient::h1(None);
    let url = gw.url("/v1/open/x");
    // 8 at a time; returns the slowest answer after checking each is a 502.
    let burst = |n: usize| {
        let (client, url) = (&client, &url);
        async move {
            let took: Vec<Duration> = futures_util::stream::iter(0..n)
                .map(|_| async move {
                    let t = Instant::now();
                    let r = client.get(url).await;
                    r.assert_error(502, "UPSTREAM_UNAVAILABLE");
                    t.elapsed()
                })
                .buffer_unordered(8)
                .collect()
                .await;
            took.into_iter().max().unwrap_or_default()
        }
    };
    // Warm up: the client's connections, the gateway's first allocations.
    burst(50).await;
    let fds_before = open_fds(Some(pid));
    let slowest = burst(300).await;
    assert!(
        slowest < Duration::from_secs(1),
        "a refused connect took {slowest:?} to answer (connect timeout 5s)"
    );
    // Closing a socket may lag its request a little: poll, don't sleep.
    eventually(
        "the gateway's open file descriptors to settle",
        Duration::from_secs(5),
        || async { open_fds(Some(pid)) <= fds_before + 8 },
    )
    .await;
    println!(
        "refused upstream: slowest 502 {slowest:?}; gateway fds {fds_before} -> {}",
        open_fds(Some(pid))
    );
    gw.signal("TERM");
    let status = tokio::task::block_in_place(|| gw.wait_exit(Duration::from_secs(10)));
    assert_eq!(status.code(), Some(0), "{}", gw.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_upstream_answers_are_502_and_do_not_poison_the_pool() {
    for (what, garbage) in [
        ("not HTTP", &b"this is not HTTP at all\r\n\r\n"[..]),
        (
            "bad status line",
            b"HTTP/1.1 2x0 OK\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "bad header",
            b"HTTP/1.1 200 OK\r\nBad Header\r\nContent-Length: 2\r\n\r\nok",
        ),
        (
            "two Content-Lengths",
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nok",
        ),
    ] {
        let raw = RawUpstream::start(garbage).await;
        let gw = gateway_to(&raw.url(), "").await;
        let r = TestClient::h1(None).get(&gw.url("/v1/open/x")).await;
        assert_eq!(r.status, 502, "{what}: {}", r.text());
        r.assert_error(502, "UPSTREAM_UNAVAILABLE");
        gw.shutdown().await;
    }

    // Garbage on the first connection, which the upstream keeps open; good
    // answers on every later one. Had the gateway kept the bad connection,
    // the next requests would get garbage again.
    let up = GarbageOnceUpstream::start(b"HTTP/1.1 2x0 garbage\r\n\r\n").await;
    let gw = gateway_to(&up.url(), "").await;
    let client = TestClient::h1(None);
    client
        .get(&gw.url("/v1/open/first"))
        .await
        .assert_error(502, "UPSTREAM_UNAVAILABLE");
    for i in 0..10 {
        let r = client.get(&gw.url(&format!("/v1/open/next{i}"))).await;
        assert_eq!(r.status, 200, "request {i} after the garbage: {}", r.text());
        assert_eq!(r.text(), "ok");
    }
    assert_eq!(up.good_answers(), 10);
    assert!(up.connections() >= 2, "the bad connection was not reused");
    gw.shutdown().await;
}
