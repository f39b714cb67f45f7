//! No gateway key leaves the gateway, whatever its spelling, and the smaller
//! forwarding holes stay shut: the host forwarded is a host, only WebSocket
//! upgrades cross, `allowed_routes` means one thing, and a trusted proxy's
//! malformed `X-Forwarded-For` is refused. Raw sockets where a client
//! library would normalise the headers under test.

use crate::common::*;
use http::Request;
use portcullis::admin::ops::{self, NewKey};
use portcullis::keys::Environment;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// A route without auth, a keyed route, a WebSocket route to the echo
/// upstream, and a WebSocket route to `raw` (a canned 101), with
/// self-service on.
fn config(server_extra: &str, echo: &EchoUpstream, raw: &RawUpstream) -> String {
    format!(
        r#"{server}
[self_service]
enabled = true

[upstreams.echo]
targets = ["{echo}"]

[upstreams.raw]
targets = ["{raw}"]

[[routes]]
name = "open"
path = "/v1/open/*rest"
upstream = "echo"
auth = "none"

[[routes]]
name = "keyed"
path = "/v1/keyed/*rest"
upstream = "echo"
permissions = ["echo.read"]

[[routes]]
name = "ws"
path = "/v1/ws"
upstream = "echo"
auth = "none"
websocket = true

[[routes]]
name = "ws101"
path = "/v1/ws101"
upstream = "raw"
auth = "none"
websocket = true
"#,
        server = gateway_toml(None, server_extra),
        echo = echo.url(),
        raw = raw.url(),
    )
}

/// A 101 to a protocol that is not WebSocket.
const H2C_101: &[u8] =
    b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n";

struct Env {
    gw: TestGateway,
    echo: EchoUpstream,
    raw: RawUpstream,
}

impl Env {
    async fn start() -> Env {
        Env::start_with("").await
    }

    async fn start_with(server_extra: &str) -> Env {
        let echo = EchoUpstream::start().await;
        let raw = RawUpstream::start(H2C_101).await;
        let gw = start_gateway(&config(server_extra, &echo, &raw)).await;
        Env { gw, echo, raw }
    }

    /// A key in the gateway's store.
    async fn key(&self, n: NewKey) -> String {
        let snap = self.gw.app().snapshot();
        let n = NewKey {
            workspace: Some("ws_sec".into()),
            ..n
        };
        ops::create(self.gw.app().keys.store(), &snap.config, n)
            .await
            .expect("create a key")
            .1
    }

    /// A well-formed key (prefix, length, checksum) that no store holds.
    fn forged(&self) -> String {
        let snap = self.gw.app().snapshot();
        snap.config
            .key_format
            .generate("secret", Environment::Live)
            .expect("a secret live rule")
            .0
    }

    /// Sends `head` (a request head, blank line included) on a fresh
    /// connection and returns the first response, read to the end of its
    /// `Content-Length` body.
    async fn send_raw(&self, head: &str) -> String {
        let mut tcp = TcpStream::connect(self.gw.addr).await.expect("connect");
        tcp.write_all(head.as_bytes()).await.expect("write");
        read_one_response(&mut tcp).await
    }

    /// Asserts that no upstream request so far carried `key` anywhere in
    /// its target or in any header value.
    fn assert_never_forwarded(&self, key: &str) {
        let seen = self.echo.requests();
        assert!(!seen.is_empty(), "nothing reached the upstream");
        for r in seen {
            assert!(!r.path_and_query.contains(key), "{}", r.path_and_query);
            for (name, value) in &r.headers {
                assert!(
                    !String::from_utf8_lossy(value.as_bytes()).contains(key),
                    "the key reached the upstream in {name}: {:?}",
                    r.headers
                );
            }
        }
    }
}

fn status(response: &str) -> u16 {
    response
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"))
}

/// Sends `GET /v1/open/x` with the header lines `headers` (each with `{k}`
/// standing for a forged key) and asserts it was forwarded without the key.
async fn open_route_strips(headers: &str) {
    let env = Env::start().await;
    let key = env.forged();
    let head = format!(
        "GET /v1/open/x HTTP/1.1\r\nHost: gw.test\r\n{}Connection: close\r\n\r\n",
        headers.replace("{k}", &key)
    );
    let r = env.send_raw(&head).await;
    assert_eq!(status(&r), 200, "{r}");
    assert_eq!(env.echo.count(), 1);
    env.assert_never_forwarded(&key);
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_authorization_headers_do_not_carry_a_key_upstream() {
    open_route_strips("Authorization: Basic dXNlcjpwYXNz\r\nAuthorization: Bearer {k}\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_with_a_different_x_api_key_does_not_carry_a_key_upstream() {
    open_route_strips("Authorization: Bearer not-a-gateway-token\r\nX-API-Key: {k}\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bearer_tab_key_does_not_carry_a_key_upstream() {
    open_route_strips("Authorization: Bearer\t{k}\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lower_case_bearer_with_two_spaces_does_not_carry_a_key_upstream() {
    open_route_strips("Authorization: bearer  {k}\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_scheme_does_not_carry_a_key_upstream() {
    open_route_strips("Authorization: Token {k}\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_x_api_keys_do_not_carry_a_key_upstream() {
    open_route_strips("X-API-Key: {k}\r\nX-API-Key: {k}\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_in_a_cookie_or_a_header_of_the_clients_own_does_not_go_upstream() {
    open_route_strips("Cookie: theme=dark; api_key={k}\r\nX-My-Credential: \"{k}\"\r\n").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_as_the_request_id_does_not_go_upstream_or_back() {
    let env = Env::start().await;
    let key = env.forged();
    let r = env
        .send_raw(&format!(
            "GET /v1/open/x HTTP/1.1\r\nHost: gw.test\r\nX-Request-Id: {key}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status(&r), 200, "{r}");
    assert!(!r.contains(&key), "the key came back: {r}");
    env.assert_never_forwarded(&key);
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keyed_route_forwards_no_copy_of_the_key_in_other_headers() {
    let env = Env::start().await;
    let key = env
        .key(NewKey {
            permissions: vec!["echo.read".into()],
            ..Default::default()
        })
        .await;
    let r = env
        .send_raw(&format!(
            "GET /v1/keyed/x HTTP/1.1\r\nHost: gw.test\r\nAuthorization: Bearer {key}\r\n\
             Cookie: k={key}\r\nX-Forwarded-Key: {key}\r\nConnection: close\r\n\r\n"
        ))
        .await;
    assert_eq!(status(&r), 200, "the key is valid: {r}");
    env.assert_never_forwarded(&key);
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn other_authorization_schemes_still_pass_on_a_route_without_auth() {
    let env = Env::start().await;
    let c = TestClient::h1(None);
    for value in ["Basic dXNlcjpwYXNz", "Bearer eyJhbGciOiJIUzI1NiJ9.e30.sig"] {
        let r = c
            .get_with(&env.gw.url("/v1/open/x"), &[("authorization", value)])
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(env.echo.last().header("authorization"), Some(value));
    }
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_host_is_refused_and_never_forwarded() {
    let env = Env::start().await;
    for host in [
        "user:pass@evil.com",
        "evil.com/x",
        "good.test, evil.com",
        "good.test:80x",
    ] {
        let r = raw_request(
            env.gw.addr,
            format!("GET /v1/open/x HTTP/1.1\r\nHost: {host}\r\n\r\n").as_bytes(),
        )
        .await;
        assert_eq!(r.status(), Some(400), "Host {host:?}: {}", r.text());
        assert!(r.body().contains("BAD_REQUEST"), "{}", r.text());
    }
    assert_eq!(env.echo.count(), 0, "an invalid Host was forwarded");
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn x_forwarded_host_only_ever_carries_the_valid_host() {
    let env = Env::start().await;
    let r = env
        .send_raw(
            "GET /v1/open/x HTTP/1.1\r\nHost: good.test:8080\r\n\
             X-Forwarded-Host: user:pass@evil.com\r\nConnection: close\r\n\r\n",
        )
        .await;
    assert_eq!(status(&r), 200, "{r}");
    let seen = env.echo.last();
    let all: Vec<_> = seen.headers.get_all("x-forwarded-host").iter().collect();
    assert_eq!(all, ["good.test:8080"], "{:?}", seen.headers);
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_upgrade_is_not_passed_on_a_websocket_route() {
    let env = Env::start().await;
    let r = env
        .send_raw(
            "GET /v1/ws HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade, HTTP2-Settings\r\n\
             Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n",
        )
        .await;
    assert_eq!(status(&r), 200, "forwarded as a plain request: {r}");
    let seen = env.echo.last();
    for h in ["upgrade", "connection", "http2-settings"] {
        assert_eq!(
            seen.header(h),
            None,
            "{h} went upstream: {:?}",
            seen.headers
        );
    }
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_101_that_is_not_websocket_is_not_spliced() {
    let env = Env::start().await;
    let websocket = "GET /v1/ws101 HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\n\
        Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n\
        Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
    let h2c = "GET /v1/ws101 HTTP/1.1\r\nHost: gw.test\r\nConnection: Upgrade\r\n\
        Upgrade: h2c\r\n\r\n";
    for (what, head) in [("websocket asked, h2c answered", websocket), ("h2c", h2c)] {
        let r = env.send_raw(head).await;
        assert_eq!(status(&r), 502, "{what}: {r}");
        assert!(r.contains("UPSTREAM_UNAVAILABLE"), "{what}: {r}");
    }
    assert_eq!(env.raw.requests(), 2, "both reached the upstream");
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn allowed_routes_are_compared_exactly_in_self_service_as_in_auth() {
    let env = Env::start().await;
    let c = TestClient::h1(None);
    // Auth: a list naming the route in another case does not allow it.
    let other_case = env
        .key(NewKey {
            permissions: vec!["echo.read".into()],
            allowed_routes: vec!["KEYED".into()],
            ..Default::default()
        })
        .await;
    let r = c
        .get_with(
            &env.gw.url("/v1/keyed/x"),
            &[("authorization", &format!("Bearer {other_case}"))],
        )
        .await;
    r.assert_error(403, "FORBIDDEN");
    // Self-service: a key restricted to `keyed` may not mint one for `KEYED`.
    let caller = env
        .key(NewKey {
            permissions: vec!["keys.write".into(), "echo.read".into()],
            allowed_routes: vec!["self_service".into(), "keyed".into()],
            ..Default::default()
        })
        .await;
    let mint = |routes: &str| {
        Request::post(env.gw.url("/v1/api-keys"))
            .header("authorization", format!("Bearer {caller}"))
            .header("content-type", "application/json")
            .body(body(format!(
                r#"{{"permissions":["echo.read"],"allowed_routes":{routes}}}"#
            )))
            .expect("request")
    };
    let r = c.send(mint(r#"["KEYED"]"#)).await;
    assert_eq!(r.status, 403, "{}", r.text());
    let r = c.send(mint(r#"["keyed"]"#)).await;
    assert!(r.status.is_success(), "{}", r.text());
    env.gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_forwarded_for_from_a_trusted_proxy_is_refused() {
    // The test client's 127.0.0.1 is the trusted proxy.
    let env = Env::start_with("trusted_proxies = [\"127.0.0.1/32\"]").await;
    let c = TestClient::h1(None);
    // A key only the proxy's own address may use: an unparseable hop must
    // not make the gateway check it against the proxy.
    let internal = env
        .key(NewKey {
            permissions: vec!["echo.read".into()],
            allowed_ips: vec!["127.0.0.1/32".into()],
            ..Default::default()
        })
        .await;
    let auth = format!("Bearer {internal}");
    for xff in [
        "unknown",
        "203.0.113.7, bogus",
        "203.0.113.7, 127.0.0.1, not-an-ip",
    ] {
        let r = c
            .get_with(
                &env.gw.url("/v1/keyed/x"),
                &[("authorization", &auth), ("x-forwarded-for", xff)],
            )
            .await;
        r.assert_error(400, "BAD_REQUEST");
    }
    assert_eq!(env.echo.count(), 0);
    // Empty hops are skipped; the right-most untrusted address is the client.
    let r = c
        .get_with(
            &env.gw.url("/v1/keyed/x"),
            &[
                ("authorization", &auth),
                ("x-forwarded-for", "203.0.113.7, , 127.0.0.1,"),
            ],
        )
        .await;
    r.assert_error(403, "IP_NOT_ALLOWED");
    let r = c
        .get_with(
            &env.gw.url("/v1/open/x"),
            &[("x-forwarded-for", "bogus, 203.0.113.7")],
        )
        .await;
    assert_eq!(r.status, 200, "hops left of the client are not read");
    env.gw.shutdown().await;
}
