//! `portcullis demo`: the gateway on an embedded store, in front of two
//! small example services, with demo keys and curl commands that work as
//! pasted. Also the example upstream used by docker-compose.

use crate::admin::ops::{self, NewKey};
use bytes::Bytes;
use http::{Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use tokio::net::TcpListener;

/// Serves a tiny JSON service: `sms` answers sends and reads, `conversations`
/// lists conversations; both echo what identity the gateway forwarded.
pub async fn example_upstream(listener: TcpListener, name: String) {
    let name: &'static str = Box::leak(name.into_boxed_str());
    static COUNTER: AtomicU64 = AtomicU64::new(1);
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            continue;
        };
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| async move {
                let (parts, body) = req.into_parts();
                let body = body
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let key = parts
                    .headers
                    .get("x-key-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                let ws = parts
                    .headers
                    .get("x-workspace-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("-")
                    .to_string();
                let n = COUNTER.fetch_add(1, Ordering::Relaxed);
                let json = match (name, parts.uri.path()) {
                    ("sms", "/v1/sms/send") => {
                        let req: serde_json::Value =
                            serde_json::from_slice(&body).unwrap_or_default();
                        serde_json::json!({"id": format!("msg_{n:06}"), "status": "queued", "to": req.get("to"), "key_id": key, "workspace": ws})
                    }
                    ("conversations", _) => serde_json::json!({"data": [
                        {"id": "conv_001", "with": "+15551230001", "last_message": "See you at 5"},
                        {"id": "conv_002", "with": "+15551230002", "last_message": "Thanks!"}
                    ], "workspace": ws}),
                    (_, p) => {
                        serde_json::json!({"service": name, "path": p, "method": parts.method.as_str(), "key_id": key, "workspace": ws})
                    }
                };
                let mut resp = Response::new(Full::new(Bytes::from(json.to_string())));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    "application/json".parse().expect("static"),
                );
                *resp.status_mut() = StatusCode::OK;
                Ok::<_, Infallible>(resp)
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(tcp), svc)
                .await;
        });
    }
}

async fn bind_local(port: u16) -> std::io::Result<TcpListener> {
    TcpListener::bind(("127.0.0.1", port)).await
}

/// Runs the demo until Ctrl-C.
pub async fn run(port: Option<u16>) -> ExitCode {
    match demo(port).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn demo(port: Option<u16>) -> Result<(), String> {
    let dir = std::env::temp_dir().join(format!("portcullis-demo-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
    let sms = bind_local(0).await.map_err(|e| e.to_string())?;
    let conv = bind_local(0).await.map_err(|e| e.to_string())?;
    let sms_addr = sms.local_addr().map_err(|e| e.to_string())?;
    let conv_addr = conv.local_addr().map_err(|e| e.to_string())?;
    tokio::spawn(example_upstream(sms, "sms".into()));
    tokio::spawn(example_upstream(conv, "conversations".into()));

    // The requested port, else 8080, else any free one.
    let port = match port {
        Some(p) => p,
        None => match std::net::TcpListener::bind(("127.0.0.1", 8080)) {
            Ok(_) => 8080,
            Err(_) => std::net::TcpListener::bind(("127.0.0.1", 0))
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| e.to_string())?,
        },
    };
    let admin_port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| e.to_string())?;
    let text = format!(
        r#"# Written by `portcullis demo`.
[server]
listen = "127.0.0.1:{port}"
[admin]
listen = "127.0.0.1:{admin_port}"
[store]
url = "sqlite://{db}"
[plans.default]
limits = [{{ scope = "key", requests = 60, per = "1m" }}]
[upstreams.sms]
targets = ["http://{sms_addr}"]
[upstreams.conversations]
targets = ["http://{conv_addr}"]
[[routes]]
name = "sms.send"
methods = ["POST"]
path = "/v1/sms/send"
upstream = "sms"
permissions = ["sms.send"]
[[routes]]
name = "sms.read"
methods = ["GET"]
path = "/v1/sms/{{id}}"
upstream = "sms"
permissions = ["sms.read"]
key_kinds = ["secret", "public"]
[[routes]]
name = "conversations.list"
methods = ["GET"]
path = "/v1/conversations"
upstream = "conversations"
permissions = ["conversations.read"]
[[routes]]
name = "billing.balance"
methods = ["GET"]
path = "/v1/billing/balance"
upstream = "sms"
permissions = ["billing.read"]
"#,
        db = dir.join("demo.db").display()
    );
    let cfg_path = dir.join("demo.toml");
    std::fs::write(&cfg_path, text).map_err(|e| e.to_string())?;
    let cfg = crate::config::load(&cfg_path).map_err(|e| e.to_string())?;
    let _log = crate::logging::init(crate::config::LogFormat::Human, "warn");
    let gw = crate::server::Gateway::start(cfg)
        .await
        .map_err(|e| e.to_string())?;
    let snap = gw.app.snapshot();
    let store = gw.app.keys.store().clone();
    let secret = ops::create(
        &store,
        &snap.config,
        NewKey {
            workspace: Some("demo".into()),
            name: Some("demo server key".into()),
            permissions: vec![
                "sms.send".into(),
                "sms.read".into(),
                "conversations.read".into(),
            ],
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let public = ops::create(
        &store,
        &snap.config,
        NewKey {
            workspace: Some("demo".into()),
            name: Some("demo browser key".into()),
            kind: Some("public".into()),
            permissions: vec!["sms.read".into()],
            ..Default::default()
        },
    )
    .await
    .map_err(|e| e.to_string())?;
    let base = format!("http://127.0.0.1:{}", gw.addr.port());
    let (sk, pk) = (secret.1, public.1);
    println!(
        "portcullis demo: gateway on {base} (admin on 127.0.0.1:{admin_port}), store {}",
        dir.join("demo.db").display()
    );
    println!("example services: sms on {sms_addr}, conversations on {conv_addr}");
    println!();
    println!(
        "demo secret key {} ({})  permissions sms.send, sms.read, conversations.read",
        secret.0.id, sk
    );
    println!(
        "demo public key {} ({})  permissions sms.read",
        public.0.id, pk
    );
    println!();
    println!("# send an SMS (200):");
    println!(
        "curl -i -X POST {base}/v1/sms/send -H 'Authorization: Bearer {sk}' -H 'Content-Type: application/json' -d '{{\"to\":\"+15551234567\",\"text\":\"hello\"}}'"
    );
    println!();
    println!("# list conversations (200):");
    println!("curl -i {base}/v1/conversations -H 'Authorization: Bearer {sk}'");
    println!();
    println!("# read a message with the browser (public) key (200):");
    println!("curl -i {base}/v1/sms/msg_000001 -H 'Authorization: Bearer {pk}'");
    println!();
    println!("# refused: the key lacks billing.read (403 FORBIDDEN):");
    println!("curl -i {base}/v1/billing/balance -H 'Authorization: Bearer {sk}'");
    println!();
    println!("Press Ctrl-C to stop.");
    crate::cli::wait_for_signal().await;
    gw.shutdown().await;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}
