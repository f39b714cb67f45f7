//! One spelling per request: the path is canonicalised once, and that form
//! is what is routed, authorised, rate-limited and forwarded. An escaped
//! spelling of a path never reaches a weaker route than the one an upstream
//! will read it as.

use crate::common::*;
use percent_encoding::percent_decode_str;
use portcullis::admin::ops::{self, NewKey};
use portcullis::guard::canonical_path;
use proptest::prelude::*;
use proptest::test_runner::{Config as RunnerConfig, TestRunner};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

/// `/v1/users/admin` needs `admin.read` (upstream `admin`), with a limit of
/// one request a minute; `/v1/users/{id}` needs `users.read` (`one`).
fn users_config(server_extra: &str, admin: &EchoUpstream, one: &EchoUpstream) -> String {
    format!(
        r#"{server}
[upstreams.admin]
targets = ["{admin}"]
[upstreams.one]
targets = ["{one}"]

[[routes]]
name = "users.admin"
path = "/v1/users/admin"
upstream = "admin"
permissions = ["admin.read"]
limits = [{{ scope = "key", requests = 1, per = "1m" }}]

[[routes]]
name = "users.one"
path = "/v1/users/{{id}}"
upstream = "one"
permissions = ["users.read"]
"#,
        server = gateway_toml(None, server_extra),
        admin = admin.url(),
        one = one.url(),
    )
}

/// A gateway on [`users_config`] with its two upstreams.
async fn users_gateway() -> (TestGateway, EchoUpstream, EchoUpstream) {
    let (admin, one) = (
        EchoUpstream::start_named("admin").await,
        EchoUpstream::start_named("one").await,
    );
    let gw = start_gateway(&users_config("", &admin, &one)).await;
    (gw, admin, one)
}

async fn key(gw: &TestGateway, perms: &[&str]) -> String {
    let snap = gw.app().snapshot();
    let n = NewKey {
        workspace: Some("ws_paths".into()),
        permissions: perms.iter().map(|p| p.to_string()).collect(),
        ..Default::default()
    };
    ops::create(gw.app().keys.store(), &snap.config, n)
        .await
        .expect("create a key")
        .1
}

async fn get(gw: &TestGateway, target: &str, secret: &str) -> RawReply {
    raw_request(
        gw.addr,
        format!(
            "GET {target} HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer {secret}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_escaped_spelling_is_authorised_as_the_route_it_decodes_to() {
    let (gw, admin, one) = users_gateway().await;
    let reader = key(&gw, &["users.read"]).await;
    for target in [
        "/v1/users/%61dmin",
        "/v1/users/%61%64%6d%69%6E",
        "/v1/users/ad%6Din",
        "/v1/users/x/../%61dmin",
    ] {
        let r = get(&gw, target, &reader).await;
        assert_eq!(r.status(), Some(403), "{target}: {}", r.text());
        assert!(r.text().contains("admin.read"), "{target}: {}", r.text());
    }
    assert_eq!(admin.count() + one.count(), 0, "nothing was forwarded");

    // HTTP/2 (TLS, ALPN) reads the same path the same way.
    let certs = TestCerts::generate();
    let tls_gw = start_gateway(&users_config(&certs.server_tls_toml(), &admin, &one)).await;
    let reader2 = key(&tls_gw, &["users.read"]).await;
    let h2 = TestClient::h2(Some(&certs));
    let auth = format!("Bearer {reader2}");
    let r = h2
        .get_with(
            &tls_gw.url("/v1/users/%61dmin"),
            &[("authorization", auth.as_str())],
        )
        .await;
    assert_eq!(r.version, http::Version::HTTP_2);
    r.assert_error(403, "FORBIDDEN");
    assert_eq!(admin.count() + one.count(), 0, "nothing was forwarded");

    // What is allowed goes upstream in the spelling it was authorised in.
    let r = get(&gw, "/v1/users/%62o%62%3a%7e", &reader).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(one.last().path_and_query, "/v1/users/bob%3A~");
    tls_gw.shutdown().await;
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_route_limit_counts_every_spelling_of_its_path() {
    let (gw, admin, one) = users_gateway().await;
    let boss = key(&gw, &["admin.read", "users.read"]).await;
    assert_eq!(get(&gw, "/v1/users/admin", &boss).await.status(), Some(200));
    let r = get(&gw, "/v1/users/%61dmin", &boss).await;
    assert_eq!(r.status(), Some(429), "{}", r.text());
    assert_eq!(admin.count(), 1);
    assert_eq!(one.count(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_parameters_are_refused_unless_allowed() {
    let (gw, admin, one) = users_gateway().await;
    let reader = key(&gw, &["users.read"]).await;
    for target in [
        "/v1/users/admin;x=1",
        "/v1/users/admin;",
        "/v1/users;v=2/admin",
    ] {
        let r = get(&gw, target, &reader).await;
        assert_eq!(r.status(), Some(400), "{target}: {}", r.text());
        assert!(r.text().contains("BAD_REQUEST"), "{target}");
    }
    // An escaped `;` is data, not a parameter.
    let r = get(&gw, "/v1/users/admin%3bx", &reader).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(one.last().path_and_query, "/v1/users/admin%3Bx");
    assert_eq!(admin.count(), 0);
    assert_eq!(one.count(), 1);
    gw.shutdown().await;

    // Allowed: matched with the parameters in place; `..;` still refused.
    let gw = start_gateway(&users_config("allow_path_parameters = true", &admin, &one)).await;
    let reader = key(&gw, &["users.read"]).await;
    let r = get(&gw, "/v1/users/admin;x=1", &reader).await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(one.last().path_and_query, "/v1/users/admin;x=1");
    let r = get(&gw, "/v1/users/x/..;/admin", &reader).await;
    assert_eq!(r.status(), Some(400), "{}", r.text());
    assert_eq!(admin.count(), 0);
    gw.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raw_fragment_in_the_target_is_refused() {
    let (gw, admin, one) = users_gateway().await;
    let reader = key(&gw, &["users.read", "admin.read"]).await;
    for target in ["/v1/users/bob#x", "/v1/users/bob?q=1#/../admin"] {
        let r = get(&gw, target, &reader).await;
        assert_eq!(r.status(), Some(400), "{target}: {}", r.text());
        assert!(r.text().contains("fragment"), "{target}: {}", r.text());
    }
    // A `#` elsewhere in the head is no fragment.
    let r = raw_request(
        gw.addr,
        format!(
            "GET /v1/users/bob HTTP/1.1\r\nHost: a\r\nCookie: a=#b\r\nAuthorization: Bearer {reader}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(r.status(), Some(200), "{}", r.text());
    assert_eq!(admin.count(), 0);
    assert_eq!(one.count(), 1);
    gw.shutdown().await;
}

#[test]
fn route_paths_hold_only_unreserved_characters() {
    for bad in ["/v1/a@b", "/v1/a:b", "/v1/a;b", "/v1/caf\u{e9}"] {
        let text = format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n[upstreams.u]\ntargets = [\"http://127.0.0.1:1\"]\n[[routes]]\nname = \"r\"\npath = \"{bad}\"\nupstream = \"u\"\nauth = \"none\"\n"
        );
        let e = portcullis::config::parse(Path::new("/etc/portcullis/t.toml"), &text, |_| None)
            .expect_err(bad);
        assert!(
            e.to_string().contains("may hold only letters"),
            "{bad}: {e}"
        );
    }
}

// ─────────────────────────── the differential test ───────────────────────────

/// Decodes every escape, as an upstream framework does (Python's
/// `urllib.parse.unquote`, Go's `PathUnescape`, …).
fn decoded(path: &str) -> String {
    percent_decode_str(path).decode_utf8_lossy().into_owned()
}

/// The route an upstream would pick for a fully decoded path, written
/// without the gateway's router: the routes of [`differential_config`].
fn route_of_decoded(path: &str) -> Option<&'static str> {
    let segs: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    match segs.as_slice() {
        ["v1", "users", "admin"] => Some("admin"),
        ["v1", "users", "me~x"] => Some("tilde"),
        ["v1", "users", id, "keys"] if !id.is_empty() => Some("keys"),
        ["v1", "users", id] if !id.is_empty() => Some("one"),
        ["v1", "files", rest @ ..] if !rest.join("/").is_empty() => Some("files"),
        ["v1", "a-b_c.d"] => Some("dots"),
        _ => None,
    }
}

const ROUTES: [(&str, &str); 6] = [
    ("admin", "/v1/users/admin"),
    ("tilde", "/v1/users/me~x"),
    ("keys", "/v1/users/{id}/keys"),
    ("one", "/v1/users/{id}"),
    ("files", "/v1/files/*rest"),
    ("dots", "/v1/a-b_c.d"),
];

fn differential_config(ups: &[EchoUpstream]) -> String {
    let mut text = gateway_toml(None, "");
    for ((name, path), up) in ROUTES.iter().zip(ups) {
        text.push_str(&format!(
            "[upstreams.{name}]\ntargets = [\"{}\"]\n[[routes]]\nname = \"{name}\"\npath = \"{path}\"\nupstream = \"{name}\"\nauth = \"none\"\n",
            up.url()
        ));
    }
    text
}

/// Targets shaped like the routes, spelled every which way: escapes of any
/// character in either case, dot segments, `//`, `;`, `#`, case changes,
/// unicode, encoded `/` and `.`.
fn targets() -> impl Strategy<Value = String> {
    let base = prop::sample::select(vec![
        "/v1/users/admin",
        "/v1/users/me~x",
        "/v1/users/bob/keys",
        "/v1/users/bob",
        "/v1/files/a/b.txt",
        "/v1/a-b_c.d",
        "/v1/users/admin/keys",
    ]);
    let piece = prop::sample::select(vec![
        "%2f", "%2F", "%2e", "%2E", "%00", "%5c", ";", ";x=1", "#", "//", "/./", "/../", "/..",
        "é", "%c3%a9", "{", "@", ":", "%3a", "%7e", "~", "+", "%20", "%25", "%", "%4", "%zz", "?q",
        "%3B", "A", "..", ".", "%41",
    ]);
    let edits = prop::collection::vec((any::<prop::sample::Index>(), 0u8..6, piece), 0..4);
    (base, edits).prop_map(|(base, edits)| {
        let mut chars: Vec<String> = base.chars().map(String::from).collect();
        for (at, how, piece) in edits {
            let i = at.index(chars.len());
            let c = chars[i].clone();
            match how {
                // An escape of the character, in lower or upper case hex.
                0 | 1 if c.len() == 1 && c != "/" => {
                    let b = c.as_bytes()[0];
                    chars[i] = if how == 0 {
                        format!("%{b:02x}")
                    } else {
                        format!("%{b:02X}")
                    };
                }
                2 => chars[i] = c.to_uppercase(),
                _ => chars.insert(i, piece.to_string()),
            }
        }
        chars.concat()
    })
}

/// Sends `GET target` on a fresh connection: the status and body.
fn send(addr: std::net::SocketAddr, target: &str) -> (u16, String) {
    let mut s = std::net::TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).ok();
    s.write_all(
        format!("GET {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .expect("send");
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out).into_owned();
    let status = text
        .get(9..12)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status for {target:?}: {text:?}"));
    let body = text.split_once("\r\n\r\n").map_or("", |x| x.1).to_string();
    (status, body)
}

#[test]
fn the_gateway_routes_as_an_independent_decoder_reads_the_forwarded_path() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let (gw, ups) = rt.block_on(async {
        let mut ups = Vec::new();
        for (name, _) in ROUTES {
            ups.push(EchoUpstream::start_named(name).await);
        }
        (start_gateway(&differential_config(&ups)).await, ups)
    });
    let forwarded_total = || ups.iter().map(EchoUpstream::count).sum::<usize>();
    let seen = Mutex::new(std::collections::BTreeMap::<String, usize>::new());
    let mut runner = TestRunner::new(RunnerConfig {
        cases: 400,
        failure_persistence: None,
        ..RunnerConfig::default()
    });
    let result = runner.run(&targets(), |target| {
        let before = forwarded_total();
        let (status, body) = send(gw.addr, &target);
        let forwarded = forwarded_total() - before;
        let path = target.split('?').next().unwrap_or("");
        let outcome = match status {
            200 => {
                let v: serde_json::Value = serde_json::from_str(&body).expect("echo JSON");
                let (up, fwd) = (v["upstream"].as_str(), v["path"].as_str());
                let (Some(up), Some(fwd)) = (up, fwd) else {
                    panic!("echo body without upstream/path: {body}")
                };
                let fwd_path = fwd.split('?').next().unwrap_or("");
                prop_assert_eq!(forwarded, 1);
                prop_assert_eq!(
                    route_of_decoded(&decoded(fwd_path)),
                    Some(up),
                    "{:?} was routed to {} and forwarded as {:?}",
                    target,
                    up,
                    fwd_path
                );
                let again = canonical_path(fwd_path, false).ok();
                prop_assert_eq!(
                    again.as_deref(),
                    Some(fwd_path),
                    "the forwarded path is canonical"
                );
                up.to_string()
            }
            404 => {
                prop_assert_eq!(forwarded, 0);
                let canon = canonical_path(path, false);
                let canon = canon
                    .as_deref()
                    .unwrap_or_else(|_| panic!("{target:?}: 404 for a path the guard refuses"));
                prop_assert_eq!(
                    route_of_decoded(&decoded(canon)),
                    None,
                    "{:?} was not routed",
                    target
                );
                "404".to_string()
            }
            400 => {
                prop_assert_eq!(forwarded, 0, "{:?} refused yet forwarded", target);
                "400".to_string()
            }
            s => panic!("{target:?}: unexpected status {s}: {body}"),
        };
        *seen.lock().unwrap().entry(outcome).or_default() += 1;
        Ok(())
    });
    let seen = seen.into_inner().unwrap();
    rt.block_on(gw.shutdown());
    if let Err(e) = result {
        panic!("{e}");
    }
    // Not vacuous: every route was reached and some spellings were refused.
    for (name, _) in ROUTES {
        assert!(
            seen.get(name).copied().unwrap_or(0) > 0,
            "{name} never reached: {seen:?}"
        );
    }
    assert!(seen.get("400").copied().unwrap_or(0) > 20, "{seen:?}");
}

/// A reference for dot segments and `//` (RFC 3986 §5.2.4, on whole
/// segments), written apart from the gateway's.
fn resolve(path: &str) -> Option<String> {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = path.split('/').skip(1).collect();
    for seg in &segs {
        match *seg {
            "" | "." => {}
            ".." => {
                out.pop()?;
            }
            s => out.push(s),
        }
    }
    let trailing = matches!(segs.last(), Some(&"") | Some(&".") | Some(&".."));
    let mut s = format!("/{}", out.join("/"));
    if trailing && s != "/" {
        s.push('/');
    }
    Some(s)
}

proptest! {
    #![proptest_config(RunnerConfig { cases: 3000, failure_persistence: None, ..RunnerConfig::default() })]

    /// Canonicalising twice changes nothing, the result holds only what a
    /// canonical path may hold, and a decoder reads in it exactly what it
    /// reads in the original (after dot segments).
    #[test]
    fn canonical_form_is_a_fixed_point_that_decodes_like_the_original(target in targets()) {
        let path = target.split('?').next().unwrap_or("");
        if let Ok(c) = canonical_path(path, false) {
            prop_assert_eq!(canonical_path(&c, false).ok(), Some(c.clone()));
            prop_assert!(c.starts_with('/') && !c.contains("//"), "{}", c);
            prop_assert!(!c.split('/').any(|s| s == "." || s == ".."), "{}", c);
            prop_assert!(c.bytes().all(|b| b.is_ascii_graphic() && b != b';' && b != b'#'), "{}", c);
            for (i, _) in c.match_indices('%') {
                let hex = &c[i + 1..i + 3];
                prop_assert!(hex.bytes().all(|b| b.is_ascii_digit() || b.is_ascii_uppercase()), "{}", c);
                let b = u8::from_str_radix(hex, 16).unwrap_or(0);
                prop_assert!(!(b.is_ascii_alphanumeric() || b"-._~".contains(&b)), "{} keeps an unreserved escape", c);
            }
            let want = resolve(&decoded(path));
            prop_assert_eq!(Some(decoded(&c)), want, "{:?} → {:?}", path, c);
        }
    }
}
