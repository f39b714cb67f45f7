//! An upstream whose answer frames its body two ways at once (Content-Length
//! and Transfer-Encoding) never reaches the client as a complete-looking,
//! cut answer: it is a 502, and the connection it came on is not reused.

use crate::common::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// A keep-alive upstream that answers every request on a connection with
/// `reply`, and counts connections.
struct KeepAliveRaw {
    url: String,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl KeepAliveRaw {
    async fn start(reply: &'static [u8]) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let connections = Arc::new(AtomicUsize::new(0));
        let c = connections.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut tcp, _)) = listener.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        while let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                            buf.drain(..end + 4);
                            if tcp.write_all(reply).await.is_err() {
                                return;
                            }
                        }
                        match tcp.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                });
            }
        });
        KeepAliveRaw {
            url,
            connections,
            task,
        }
    }
}

impl Drop for KeepAliveRaw {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn config(upstream: &str) -> String {
    gateway_toml(
        None,
        &format!(
            r#"
[upstreams.u]
targets = ["{upstream}"]

[[routes]]
name = "u"
methods = ["GET"]
path = "/u"
upstream = "u"
auth = "none"
"#
        ),
    )
}

const CL_TE: &[u8] = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n";
const TE_CL: &[u8] = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\nb\r\nhello world\r\n0\r\n\r\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_with_content_length_and_transfer_encoding_is_502_never_a_cut_200() {
    for (name, reply) in [("CL then TE", CL_TE), ("TE then CL (empty)", TE_CL)] {
        let up = KeepAliveRaw::start(reply).await;
        let gw = start_gateway(&config(&up.url)).await;
        for proto in [TestClient::h1(None), TestClient::h2(None)] {
            let r = proto.get(&gw.url("/u")).await;
            r.assert_error(502, "UPSTREAM_UNAVAILABLE");
            assert!(!r.text().contains("hell"), "{name}: {}", r.text());
        }
        // Raw bytes too: no Content-Length reaches the client with a 200.
        let raw = raw_request(
            gw.addr,
            b"GET /u HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert_eq!(raw.status(), Some(502), "{name}: {}", raw.text());
        gw.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connection_of_a_contradictory_answer_is_not_reused() {
    let up = KeepAliveRaw::start(CL_TE).await;
    let gw = start_gateway(&config(&up.url)).await;
    let c = TestClient::h1(None);
    for i in 1..=3 {
        c.get(&gw.url("/u"))
            .await
            .assert_error(502, "UPSTREAM_UNAVAILABLE");
        // The upstream keeps its side open: only the gateway's closing
        // makes each request need a connection of its own.
        assert_eq!(up.connections.load(Ordering::SeqCst), i);
    }
    gw.shutdown().await;
}
