//! Self-service (`/v1/api-keys` on the public listener) never lets a key
//! step outside itself: it mints keys of its own kind only, cannot revoke a
//! key holding a permission it lacks, and stops minting at
//! `[self_service] max_keys_per_workspace`. Real gateway, SQLite store,
//! keys made in the gateway's own store as the admin API makes them.

use crate::common::*;
use http::Request;
use portcullis::admin::ops::{self, NewKey};
use portcullis::keys::KeyRecord;
use serde_json::{Value, json};

const WS: &str = "ws_a";

/// Self-service on, an `internal` key kind with a route of its own, and a
/// route for secret and public keys.
fn config(upstream: &str, max_keys: Option<usize>) -> String {
    let cap = max_keys
        .map(|n| format!("max_keys_per_workspace = {n}\n"))
        .unwrap_or_default();
    format!(
        r#"{server}
[self_service]
enabled = true
{cap}
[key_kinds.internal]
prefixes = {{ live = "ik_live_", test = "ik_test_" }}

[upstreams.svc]
targets = ["{upstream}"]

[[routes]]
name = "sms.send"
path = "/v1/sms"
upstream = "svc"
permissions = ["sms.send"]
key_kinds = ["secret", "public"]

[[routes]]
name = "internal"
path = "/v1/internal"
upstream = "svc"
permissions = ["sms.send"]
key_kinds = ["internal"]
"#,
        server = gateway_toml(None, ""),
    )
}

struct Env {
    gw: TestGateway,
    client: TestClient,
    _up: EchoUpstream,
}

impl Env {
    async fn start(max_keys: Option<usize>) -> Env {
        let up = EchoUpstream::start().await;
        let gw = start_gateway(&config(&up.url(), max_keys)).await;
        Env {
            gw,
            client: TestClient::h1(None),
            _up: up,
        }
    }

    /// A live secret key in `workspace` holding `perms`, made in the store.
    async fn key(&self, workspace: &str, perms: &[&str]) -> (KeyRecord, String) {
        let snap = self.gw.app().snapshot();
        let n = NewKey {
            workspace: Some(workspace.into()),
            permissions: perms.iter().map(|p| p.to_string()).collect(),
            ..Default::default()
        };
        ops::create(self.gw.app().keys.store(), &snap.config, n)
            .await
            .expect("create a key")
    }

    /// The ids of every key of `workspace`, read from the store.
    async fn ids(&self, workspace: &str) -> Vec<String> {
        let page = self
            .gw
            .app()
            .keys
            .store()
            .list(Some(workspace), 1000, None)
            .await
            .expect("list the store");
        page.data.into_iter().map(|r| r.id).collect()
    }

    async fn mint(&self, secret: &str, body: Value) -> TestResponse {
        let req = Request::post(self.gw.url("/v1/api-keys"))
            .header("authorization", format!("Bearer {secret}"))
            .header("content-type", "application/json")
            .body(body_of(&body))
            .expect("request");
        self.client.send(req).await
    }

    async fn revoke(&self, secret: &str, id: &str) -> TestResponse {
        let req = Request::delete(self.gw.url(&format!("/v1/api-keys/{id}")))
            .header("authorization", format!("Bearer {secret}"))
            .body(empty())
            .expect("request");
        self.client.send(req).await
    }

    async fn call(&self, path: &str, secret: &str) -> u16 {
        let auth = format!("Bearer {secret}");
        self.client
            .get_with(&self.gw.url(path), &[("authorization", &auth)])
            .await
            .status
            .as_u16()
    }
}

fn body_of(v: &Value) -> ReqBody {
    body(serde_json::to_vec(v).expect("json"))
}

fn field(r: &TestResponse) -> Value {
    r.json()["error"]["field"].clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_another_kind_of_key_is_refused() {
    let env = Env::start(None).await;
    let (_, secret) = env.key(WS, &["keys.write", "sms.send"]).await;
    let before = env.ids(WS).await;

    // A public key would work from any browser origin; an internal key
    // would open a route the caller cannot call.
    for kind in ["public", "internal", "no_such_kind"] {
        let r = env
            .mint(&secret, json!({"kind": kind, "permissions": ["sms.send"]}))
            .await;
        r.assert_error(403, "FORBIDDEN");
        assert_eq!(field(&r), "kind", "{kind}: {}", r.text());
        let msg = r.json()["error"]["message"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            msg.contains("kind") && msg.contains("secret"),
            "{kind}: {msg}"
        );
        assert!(!r.text().contains(&secret), "no secret in an error body");
    }
    assert_eq!(env.ids(WS).await, before, "a refused create writes nothing");

    // The caller's own kind, named or implied, is accepted.
    for body in [
        json!({"kind": "secret", "permissions": ["sms.send"]}),
        json!({"permissions": ["sms.send"]}),
    ] {
        let r = env.mint(&secret, body.clone()).await;
        assert_eq!(r.status, 201, "{body}: {}", r.text());
        let made = r.json();
        assert_eq!(made["kind"], "secret", "{made}");
        let new_secret = made["secret"].as_str().expect("secret").to_string();
        assert!(new_secret.starts_with("sk_live_"), "a secret key's prefix");
        assert_eq!(env.call("/v1/sms", &new_secret).await, 200);
        assert_eq!(
            env.call("/v1/internal", &new_secret).await,
            403,
            "a secret key stays off internal routes"
        );
    }
    assert_eq!(env.ids(WS).await.len(), before.len() + 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn revoking_a_key_that_holds_more_is_refused() {
    let env = Env::start(None).await;
    let (_, secret) = env.key(WS, &["keys.write", "sms.*"]).await;
    let (stronger, stronger_secret) = env.key(WS, &["sms.send", "billing.read"]).await;
    let (admin_like, _) = env.key(WS, &["*"]).await;
    let (weaker, weaker_secret) = env.key(WS, &["sms.send"]).await;
    let (elsewhere, elsewhere_secret) = env.key("ws_b", &["sms.send"]).await;

    for target in [&stronger, &admin_like] {
        let r = env.revoke(&secret, &target.id).await;
        r.assert_error(403, "FORBIDDEN");
        assert!(
            r.json()["error"]["message"]
                .as_str()
                .is_some_and(|m| m.contains("does not hold")),
            "{}",
            r.text()
        );
        assert!(
            env.ids(WS).await.contains(&target.id),
            "the refused revoke deleted nothing"
        );
    }
    assert_eq!(
        env.call("/v1/sms", &stronger_secret).await,
        200,
        "the stronger key still works"
    );

    // Another workspace's key stays invisible.
    env.revoke(&secret, &elsewhere.id)
        .await
        .assert_error(404, "NOT_FOUND");
    assert_eq!(env.call("/v1/sms", &elsewhere_secret).await, 200);

    // A key holding nothing the caller lacks is revoked at once.
    let r = env.revoke(&secret, &weaker.id).await;
    assert_eq!(r.status, 204, "{}", r.text());
    assert!(!env.ids(WS).await.contains(&weaker.id));
    assert_eq!(env.call("/v1/sms", &weaker_secret).await, 401);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn minting_stops_at_the_workspace_cap() {
    let env = Env::start(Some(3)).await;
    let (_, secret) = env.key(WS, &["keys.write", "sms.send"]).await;
    // Other workspaces' keys do not count.
    for _ in 0..4 {
        env.key("ws_b", &["sms.send"]).await;
    }

    let mut made = Vec::new();
    for _ in 0..2 {
        let r = env
            .mint(&secret, json!({"permissions": ["sms.send"]}))
            .await;
        assert_eq!(r.status, 201, "{}", r.text());
        made.push(r.json()["id"].as_str().expect("id").to_string());
    }
    let full = env.ids(WS).await;
    assert_eq!(full.len(), 3);

    let r = env
        .mint(&secret, json!({"permissions": ["sms.send"]}))
        .await;
    r.assert_error(409, "KEY_LIMIT_REACHED");
    assert!(
        r.json()["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains('3')),
        "the message names the cap: {}",
        r.text()
    );
    assert_eq!(env.ids(WS).await, full, "nothing written past the cap");

    // Revoking one frees a place.
    assert_eq!(env.revoke(&secret, &made[0]).await.status, 204);
    let r = env
        .mint(&secret, json!({"permissions": ["sms.send"]}))
        .await;
    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(env.ids(WS).await.len(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_mints_do_not_overshoot_the_cap() {
    let env = Env::start(Some(5)).await;
    let (_, secret) = env.key(WS, &["keys.write", "sms.send"]).await;
    let tries = 12;
    let answers = futures_util::future::join_all(
        (0..tries).map(|_| env.mint(&secret, json!({"permissions": ["sms.send"]}))),
    )
    .await;
    let created = answers.iter().filter(|r| r.status == 201).count();
    let refused = answers
        .iter()
        .filter(|r| r.status == 409 && r.json()["error"]["code"] == "KEY_LIMIT_REACHED")
        .count();
    assert_eq!((created, refused), (4, tries - 4));
    assert_eq!(env.ids(WS).await.len(), 5, "exactly the cap, never more");
}
