//! Client mistakes are the client's, and the gateway answers in its own
//! HTTP version whatever its upstream speaks.

use crate::common::*;
use portcullis::metrics::UpstreamErrorLabels;

fn open_route(upstream: &str) -> String {
    format!(
        "{}\n[upstreams.up]\ntargets = [\"{upstream}\"]\n[[routes]]\nname = \"open\"\npath = \"/open/*rest\"\nupstream = \"up\"\nauth = \"none\"\n",
        gateway_toml(None, "")
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_chunked_body_is_the_clients_400_not_an_upstream_failure() {
    let echo = EchoUpstream::start().await;
    let gw = start_gateway(&open_route(&echo.url())).await;
    for (what, body) in [
        (
            "a chunk size that overflows",
            &b"fffffffffffffffff\r\nx\r\n0\r\n\r\n"[..],
        ),
        ("a negative chunk size", b"-1\r\nx\r\n0\r\n\r\n"),
        ("a chunk size that is not hex", b"zz\r\nx\r\n0\r\n\r\n"),
        ("a chunk cut short", b"10\r\nabc\r\nzzzzzzzzzzzzzzzzzzzzz"),
        ("a bare LF after a chunk size", b"3\nabc\r\n0\r\n\r\n"),
    ] {
        let mut req = b"POST /open/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n".to_vec();
        req.extend_from_slice(body);
        let r = raw_request_wait(gw.addr, &req, std::time::Duration::from_secs(2)).await;
        let status = r.status();
        assert!(
            matches!(status, Some(400..=499)),
            "{what}: {status:?} {}",
            r.text()
        );
        if status == Some(400) && !r.body().is_empty() {
            assert!(r.text().contains("BAD_REQUEST"), "{what}: {}", r.text());
        }
    }
    let errors = gw
        .app()
        .metrics
        .upstream_errors
        .get_or_create(&UpstreamErrorLabels {
            upstream: "up".into(),
            kind: "unavailable",
        })
        .get();
    assert_eq!(errors, 0, "client mistakes counted as upstream failures");
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_1_0_upstream_is_answered_to_the_client_in_http_1_1_with_keep_alive() {
    let old = RawUpstream::start(
        b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let gw = start_gateway(&open_route(&old.url())).await;
    let r = raw_request_wait(
        gw.addr,
        b"GET /open/a HTTP/1.1\r\nHost: a\r\n\r\nGET /open/b HTTP/1.1\r\nHost: a\r\n\r\n",
        std::time::Duration::from_secs(1),
    )
    .await;
    let text = r.text();
    assert_eq!(text.matches("HTTP/1.1 200").count(), 2, "{text}");
    assert!(!text.contains("HTTP/1.0"), "{text}");
    assert!(
        !r.closed,
        "the client's keep-alive connection stays open: {text}"
    );
    assert_eq!(old.requests(), 2);
    gw.shutdown().await;
}
