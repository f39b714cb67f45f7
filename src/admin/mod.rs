//! The admin listener: key management API, `/metrics`, `/healthz`, `/readyz`.
//!
//! `/healthz` and `/readyz` answer without a token (probes carry none);
//! everything else needs `Authorization: Bearer <[admin] token>`, compared
//! in constant time. With no token configured every other request is 401.
//! Every answer carries `X-Request-Id`; errors are the JSON of DESIGN.md.

pub mod api;
pub mod http;
pub mod ops;
pub mod self_service;

use self::api::Actor;
use self::http::{
    ApiError, Reply, json_response, parse_json, parse_list_query, plausible_id, read_body,
};
use crate::context::ResponseBody;
use crate::server::App;
use ::http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use sha2::{Digest as _, Sha256};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;
use subtle::ConstantTimeEq;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

/// Open admin connections at most (the admin listener is for operators and probes).
const MAX_CONNECTIONS: usize = 256;
/// Longest admin token read from a request.
const MAX_TOKEN_LEN: usize = 1024;
/// Content type of `/metrics` (the text is OpenMetrics, which ends in `# EOF`).
const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves the admin listener until shutdown: stops accepting at once, then
/// lets open requests finish within `[server] shutdown_grace`.
pub async fn serve(
    l: TcpListener,
    app: Arc<App>,
    tls: Option<crate::listener::TlsReloader>,
    mut shutdown: watch::Receiver<bool>,
) {
    let grace = app.snapshot().config.server.shutdown_grace;
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let graceful = GracefulShutdown::new();
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let (tcp, peer) = tokio::select! {
            r = l.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    static REPEATS: crate::logging::Repeats =
                        crate::logging::Repeats::new(|suppressed| {
                            tracing::warn!(target: "portcullis::admin", suppressed, "admin accept failed: repeats summarised")
                        });
                    if let Some(suppressed) = REPEATS.admit() {
                        tracing::warn!(target: "portcullis::admin", error = %e, suppressed, "admin accept failed");
                    }
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(crate::listener::TlsReloader::acceptor);
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                None => serve_connection(tcp, peer, app, watcher).await,
                Some(acceptor) => {
                    let timeout = app.snapshot().config.server.header_read_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => serve_connection(stream, peer, app, watcher).await,
                        Ok(Err(e)) => {
                            tracing::debug!(target: "portcullis::admin", %peer, error = %e, "admin TLS handshake failed")
                        }
                        Err(_) => {
                            tracing::debug!(target: "portcullis::admin", %peer, "admin TLS handshake timed out")
                        }
                    }
                }
            }
        });
    }
    drop(l);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(target: "portcullis::admin", "shutdown grace period over; closing the remaining admin connections");
    }
}

async fn serve_connection<I>(io: I, peer: SocketAddr, app: Arc<App>, watcher: Watcher)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let timeout = {
        let s = app.snapshot();
        s.config
            .server
            .header_read_timeout
            .min(s.config.server.keepalive_timeout)
    };
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout)
        .keep_alive(true);
    builder.http2().timer(TokioTimer::new());
    let service = service_fn(move |req| {
        let app = app.clone();
        async move { Ok::<_, Infallible>(handle(req, &app, peer).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(conn.into_owned()).await {
        tracing::debug!(target: "portcullis::admin", %peer, error = %e, "admin connection ended with an error");
    }
}

/// Answers one admin request: never fails, errors become JSON.
pub async fn handle(req: Request<Incoming>, app: &App, peer: SocketAddr) -> Response<ResponseBody> {
    let start = Instant::now();
    let request_id = app.ids.next();
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let mut resp = match Box::pin(route(req, app, request_id.as_str(), peer)).await {
        Ok(r) => r,
        Err(e) => e.to_response(request_id.as_str()),
    };
    resp.headers_mut()
        .insert(crate::context::names::X_REQUEST_ID, request_id.header());
    tracing::debug!(
        target: "portcullis::admin",
        request_id = %request_id,
        method = %method,
        path = %path,
        status = resp.status().as_u16(),
        latency_ms = start.elapsed().as_secs_f64() * 1000.0,
        peer = %peer.ip(),
    );
    resp
}

fn allow(m: &Method, allowed: &[Method], header: &'static str) -> Result<(), ApiError> {
    if allowed.contains(m) {
        Ok(())
    } else {
        Err(ApiError::method_not_allowed(header))
    }
}

async fn route(
    req: Request<Incoming>,
    app: &App,
    request_id: &str,
    peer: SocketAddr,
) -> Result<Response<ResponseBody>, ApiError> {
    let method = req.method().clone();
    match req.uri().path() {
        "/healthz" => {
            allow(&method, &[Method::GET, Method::HEAD], "GET, HEAD")?;
            return Ok(Reply::ok(serde_json::json!({ "status": "ok" })).to_response());
        }
        "/readyz" => {
            allow(&method, &[Method::GET, Method::HEAD], "GET, HEAD")?;
            return Ok(readyz(app).await);
        }
        _ => {}
    }
    let snap = app.snapshot();
    check_token(req.headers(), snap.config.admin.token.as_deref())?;
    let cfg = &snap.config;
    let actor = Actor {
        kind: "admin",
        key_id: None,
        request_id,
        peer: peer.ip(),
    };

    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.strip_prefix('/').unwrap_or(&path).split('/').collect();
    let reply = match segments.as_slice() {
        ["metrics"] => {
            allow(&method, &[Method::GET, Method::HEAD], "GET, HEAD")?;
            let text = app.metrics.render(&app.metrics_snapshot());
            let mut resp = Response::new(crate::context::full_body(text));
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static(METRICS_CONTENT_TYPE),
            );
            return Ok(resp);
        }
        ["admin", "v1", "keys"] => match method {
            Method::GET => {
                let q = parse_list_query(req.uri().query(), true)?;
                api::list(app, q.workspace.as_deref(), &q, &actor).await?
            }
            Method::POST => {
                let (parts, body) = req.into_parts();
                let bytes = read_body(&parts.headers, body).await?;
                api::create(app, cfg, parse_json(&bytes, false)?, &actor).await?
            }
            _ => return Err(ApiError::method_not_allowed("GET, POST")),
        },
        ["admin", "v1", "keys", id] => {
            allow(
                &method,
                &[Method::GET, Method::PATCH, Method::DELETE],
                "GET, PATCH, DELETE",
            )?;
            if !plausible_id(id) {
                return Err(ApiError::no_such_key());
            }
            match method {
                Method::GET => {
                    let rec = api::fetch(app, id, &actor)
                        .await?
                        .ok_or_else(ApiError::no_such_key)?;
                    Reply::ok(http::record_json(&rec, None))
                }
                Method::PATCH => {
                    let (parts, body) = req.into_parts();
                    let bytes = read_body(&parts.headers, body).await?;
                    api::patch(app, cfg, id, parse_json(&bytes, false)?, &actor).await?
                }
                _ => {
                    let rec = api::fetch(app, id, &actor)
                        .await?
                        .ok_or_else(ApiError::no_such_key)?;
                    api::revoke(app, &rec, &actor).await?
                }
            }
        }
        ["admin", "v1", "keys", id, "rotate"] => {
            allow(&method, &[Method::POST], "POST")?;
            if !plausible_id(id) {
                return Err(ApiError::no_such_key());
            }
            let (parts, body) = req.into_parts();
            let bytes = read_body(&parts.headers, body).await?;
            let grace = api::parse_grace(&parse_json(&bytes, true)?)?;
            api::rotate(app, cfg, id, grace, &actor).await?
        }
        _ => return Err(ApiError::no_such_path()),
    };
    Ok(reply.to_response())
}

/// 200 when a config is loaded and the store answers, and accepts a write,
/// within its timeout; else 503. The body says which check failed, and
/// whether the key cache's circuit breaker is holding lookups off.
async fn readyz(app: &App) -> Response<ResponseBody> {
    let snap = app.snapshot();
    let store = match tokio::time::timeout(snap.config.store.timeout, app.keys.store().ready())
        .await
    {
        Ok(Ok(())) => "ok",
        Ok(Err(e)) => {
            tracing::debug!(target: "portcullis::admin", error = %e, "readiness: key store check failed");
            match e {
                crate::keys::StoreError::ReadOnly(_) => "read_only",
                crate::keys::StoreError::Timeout => "timeout",
                _ => "unavailable",
            }
        }
        Err(_) => "timeout",
    };
    let ready = store == "ok";
    let breaker = if app.keys.breaker().is_open() {
        "open"
    } else {
        "closed"
    };
    let body = serde_json::json!({
        "status": if ready { "ready" } else { "unavailable" },
        "checks": {
            "config": "ok",
            "config_version": snap.version,
            "store": store,
            "store_breaker": breaker,
        },
    });
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    json_response(status, bytes::Bytes::from(body.to_string()))
}

/// Checks `Authorization: Bearer <token>` against the configured admin token
/// in constant time (both sides hashed first, so length leaks nothing either).
fn check_token(h: &HeaderMap, token: Option<&str>) -> Result<(), ApiError> {
    let unauthorized = |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "ADMIN_UNAUTHORIZED", m);
    let Some(expected) = token else {
        return Err(unauthorized(
            "the admin API is disabled: no [admin] token is configured",
        ));
    };
    let mut values = h.get_all(header::AUTHORIZATION).iter();
    let presented = match (values.next(), values.next()) {
        (Some(v), None) => v
            .to_str()
            .ok()
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim()),
        _ => None,
    };
    let Some(presented) = presented else {
        return Err(unauthorized(
            "an admin token is required: send Authorization: Bearer <admin token>",
        ));
    };
    if presented.len() > MAX_TOKEN_LEN {
        return Err(unauthorized("the admin token is invalid"));
    }
    let a = Sha256::digest(presented.as_bytes());
    let b = Sha256::digest(expected.as_bytes());
    if bool::from(a.as_slice().ct_eq(b.as_slice())) {
        Ok(())
    } else {
        Err(unauthorized("the admin token is invalid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admin_token() {
        let mut h = HeaderMap::new();
        assert_eq!(check_token(&h, Some("t0k")).unwrap_err().status, 401);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer t0k"),
        );
        assert!(check_token(&h, Some("t0k")).is_ok());
        assert!(check_token(&h, Some("t0K")).is_err());
        assert!(check_token(&h, Some("t0k0")).is_err());
        let e = check_token(&h, None).unwrap_err();
        assert!(e.message.contains("no [admin] token"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic t0k"));
        assert!(check_token(&h, Some("t0k")).is_err());
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("bearer   t0k "),
        );
        assert!(check_token(&h, Some("t0k")).is_ok());
    }
}
