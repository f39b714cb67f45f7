//! The ordered request pipeline: guard → router → auth → rate limit →
//! proxy. [`handle`] is the one place where an error becomes a response,
//! where response headers common to all answers are set, and where the
//! access log line and request metrics are written — exactly once per
//! request, on success and on error alike.

use crate::auth::{self, AuthInput};
use crate::config::{AuthMode, Config, Limit, Route};
use crate::context::{
    ConnInfo, RateVerdict, RequestBody, RequestCtx, RequestId, ResponseBody, Seen, full_body, names,
};
use crate::error::{ErrorSource, GatewayError};
use crate::logging::Repeats;
use crate::ratelimit::{Decision, LimitRequest};
use crate::server::{App, Snapshot};
use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, header};
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Handles one request end to end. Never fails: errors become the JSON
/// answers of DESIGN.md.
///
/// An `async` block, not an `async fn`, here and in [`inner`]: an `async
/// fn` keeps a second copy of its by-value arguments (the request) in its
/// future, which hyper stores and moves about. It owns `app` so that the
/// listener can hand this future to hyper as it is, with no wrapper.
#[allow(clippy::manual_async_fn)] // on purpose: see above
pub fn handle(
    req: Request<RequestBody>,
    conn: ConnInfo,
    app: Arc<App>,
) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
    async move {
        let app = &*app;
        let snap = app.current.load_full();
        let seen = crate::guard::scan(req.headers());
        // A client's id goes upstream, into the log and back: never a key.
        let request_id = seen
            .any(Seen::X_REQUEST_ID)
            .then(|| RequestId::from_client(req.headers()))
            .flatten()
            .filter(|id| !snap.config.key_format.carries_key(id.as_str().as_bytes()))
            .unwrap_or_else(|| app.ids.next());
        let mut open = Unanswered {
            ctx: RequestCtx::new(conn, req.method().clone(), request_id, seen),
            app,
            in_flight: false,
            logged: false,
        };
        let Unanswered {
            ctx,
            in_flight,
            logged,
            ..
        } = &mut open;
        let h2 = req.version() == http::Version::HTTP_2;

        let max = snap.config.server.max_in_flight;
        *in_flight = true;
        let result = if app.in_flight.fetch_add(1, Ordering::Relaxed) >= max {
            Err(GatewayError::Overloaded)
        } else {
            // Not boxed: hyper keeps the whole request future in its one
            // box per connection, so a request costs no allocation for it.
            inner(req, ctx, &snap, app).await
        };
        app.in_flight.fetch_sub(1, Ordering::Relaxed);
        *in_flight = false;

        let mut resp = match result {
            Ok(r) => r,
            Err(e) => {
                record_error(&e, ctx, app);
                e.to_response(ctx.request_id.as_str())
            }
        };
        finish(&mut resp, ctx);
        if h2 {
            // Connection-specific headers are illegal in HTTP/2.
            resp.headers_mut().remove(header::CONNECTION);
        }
        let promised = log_and_count(&resp, ctx, app);
        *logged = true;
        if let http_body_util::Either::Left(body) = resp.body_mut() {
            body.report_cut_as(ctx, promised);
        }
        resp
    }
}

/// A request between its arrival and its access line. When the client goes
/// away first, hyper drops the request's future at its `.await`: the drop
/// then gives back the in-flight slot (else it leaks, and enough of them
/// refuse every request as overloaded) and writes the access line with 499
/// (client closed), so that the log still counts what went upstream.
struct Unanswered<'a> {
    ctx: RequestCtx,
    app: &'a App,
    in_flight: bool,
    logged: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if self.in_flight {
            self.app.in_flight.fetch_sub(1, Ordering::Relaxed);
        }
        if !self.logged {
            access(&self.ctx, self.app, CLIENT_CLOSED, None);
        }
    }
}

/// The status logged for a request whose client left before its answer
/// (nginx's convention; never sent).
const CLIENT_CLOSED: u16 = 499;

/// The straight run of stages; any `?` ends the request with that error.
#[allow(clippy::manual_async_fn)] // on purpose: see `handle`
fn inner<'a>(
    req: Request<RequestBody>,
    ctx: &'a mut RequestCtx,
    snap: &'a Arc<Snapshot>,
    app: &'a App,
) -> impl Future<Output = Result<Response<ResponseBody>, GatewayError>> + Send + 'a {
    async move {
        let cfg = &snap.config;
        ctx.path =
            crate::guard::check(&req, ctx.seen, &ctx.conn, cfg.server.allow_path_parameters)?;
        auth::check_query(req.uri().query(), cfg)?;

        if cfg.self_service && crate::admin::self_service::handles(&ctx.path) {
            let client_ip = client_ip(req.headers(), ctx.conn, cfg)?;
            // Boxed: a rare path whose future would otherwise size every request's.
            return Box::pin(crate::admin::self_service::handle(
                req, ctx, cfg, app, client_ip,
            ))
            .await;
        }
        if let Some(resp) = preflight(&req, &ctx.path, cfg) {
            return Ok(resp);
        }

        let route: &Route = cfg.router.at(req.method(), &ctx.path)?;
        ctx.route = Some(route.name.clone());
        let client_ip = client_ip(req.headers(), ctx.conn, cfg)?;

        if route.auth == AuthMode::Key {
            let input = AuthInput {
                headers: req.headers(),
                seen: ctx.seen,
                client_ip,
                route,
            };
            let identity = auth::authenticate(&input, cfg, &app.keys).await?;
            if route.allows_public() {
                ctx.cors_origin = req.headers().get(header::ORIGIN).cloned();
            }
            ctx.identity = Some(identity);
            rate_limit(ctx, route, cfg, app).await?;
        }

        if ctx.seen.any(Seen::CONTENT_LENGTH)
            && let Some(len) = content_length(req.headers())
            && len > route.max_body_bytes
        {
            return Err(GatewayError::PayloadTooLarge);
        }
        let pool = snap.pools.get(&route.upstream).ok_or_else(|| {
            GatewayError::Internal(format!("no pool for upstream {}", route.upstream))
        })?;
        let xff = forwarded_for(req.headers(), ctx.conn, cfg);
        // A keyed route's credential headers go whatever they hold; on every
        // route the proxy also removes any header carrying a gateway key, so
        // other credentials (e.g. Basic) pass only on routes without auth.
        let fwd = crate::proxy::Forwarding {
            xff,
            strip_credentials: route.auth == AuthMode::Key,
            key_format: &cfg.key_format,
        };
        crate::proxy::forward(pool, route, req, fwd, ctx).await
    }
}

async fn rate_limit(
    ctx: &mut RequestCtx,
    route: &Route,
    cfg: &Config,
    app: &App,
) -> Result<(), GatewayError> {
    let Some(identity) = &ctx.identity else {
        return Ok(());
    };
    let key = &identity.key;
    let plan = cfg.plan_limits(key.plan.as_deref());
    let limits_buf;
    let limits = if route.limits.is_empty() {
        plan
    } else {
        limits_buf = [plan, &route.limits[..]].concat();
        &limits_buf[..]
    };
    enforce_limits(ctx, app, &route.name, limits).await
}

/// Checks and counts `limits` for the authenticated key on `route`: fills
/// the verdict for the `X-RateLimit-*` headers, or refuses with 429. Used by
/// keyed routes and the self-service endpoints alike.
pub async fn enforce_limits(
    ctx: &mut RequestCtx,
    app: &App,
    route: &str,
    limits: &[Limit],
) -> Result<(), GatewayError> {
    let Some(identity) = &ctx.identity else {
        return Ok(());
    };
    if limits.is_empty() {
        return Ok(());
    }
    let key = &identity.key;
    let req = LimitRequest {
        key_id: &key.id,
        workspace: &key.workspace,
        route,
        limits,
    };
    match app.limiter.check(&req).await {
        Decision::Unlimited => Ok(()),
        Decision::Allowed(v) => {
            ctx.rate = Some(v);
            Ok(())
        }
        Decision::Refused {
            verdict,
            retry_after_secs,
            scope,
        } => {
            ctx.rate = Some(verdict);
            app.metrics
                .rate_limited
                .get_or_create(&crate::metrics::ScopeLabel {
                    scope: scope.as_str(),
                })
                .inc();
            Err(GatewayError::RateLimited {
                retry_after: retry_after_secs.max(1),
            })
        }
    }
}

/// A browser's CORS preflight for a route that allows public keys: answered
/// here, without a key (browsers send none on preflight).
fn preflight(
    req: &Request<RequestBody>,
    path: &str,
    cfg: &Config,
) -> Option<Response<ResponseBody>> {
    if req.method() != Method::OPTIONS {
        return None;
    }
    let origin = req.headers().get(header::ORIGIN)?;
    let wanted = req.headers().get(header::ACCESS_CONTROL_REQUEST_METHOD)?;
    let method = Method::from_bytes(wanted.as_bytes()).ok()?;
    let route = cfg.router.at(&method, path).ok()?;
    if !route.allows_public() {
        return None;
    }
    let mut resp = Response::new(full_body(bytes::Bytes::new()));
    *resp.status_mut() = StatusCode::NO_CONTENT;
    let h = resp.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_str(method.as_str()).ok()?,
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, x-api-key, content-type, x-request-id"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    Some(resp)
}

/// Headers every answer gets: the request id, the rate-limit headers on a
/// keyed route, and the CORS echo for an allowed browser origin.
fn finish(resp: &mut Response<ResponseBody>, ctx: &RequestCtx) {
    let h = resp.headers_mut();
    h.insert(names::X_REQUEST_ID, ctx.request_id.header());
    if let Some(RateVerdict {
        limit,
        remaining,
        reset_secs,
    }) = ctx.rate
    {
        h.insert(
            names::X_RATELIMIT_LIMIT,
            remembered(&LAST_LIMIT, limit, HeaderValue::from),
        );
        h.insert(names::X_RATELIMIT_REMAINING, HeaderValue::from(remaining));
        h.insert(
            names::X_RATELIMIT_RESET,
            remembered(&LAST_RESET, reset_secs, HeaderValue::from),
        );
    }
    if let (Some(origin), Some(id)) = (&ctx.cors_origin, &ctx.identity) {
        // Only after auth passed, which checked the origin against the key.
        if &*id.key.kind == "public" {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(
                    "x-request-id, x-ratelimit-limit, x-ratelimit-remaining, x-ratelimit-reset",
                ),
            );
            h.append(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
}

fn record_error(e: &GatewayError, ctx: &RequestCtx, app: &App) {
    let m = &app.metrics;
    match e.status().as_u16() {
        401 | 403 => {
            m.count_refusal(e.code());
        }
        502 | 504 => {
            if let Some(u) = &ctx.upstream {
                let kind = if matches!(e, GatewayError::UpstreamTimeout) {
                    "timeout"
                } else {
                    "unavailable"
                };
                m.upstream_errors
                    .get_or_create(&crate::metrics::UpstreamErrorLabels {
                        upstream: u.clone(),
                        kind,
                    })
                    .inc();
            }
        }
        _ => {}
    }
    match e.source() {
        ErrorSource::Client => {}
        // A dead upstream fails every request sent to it: summarised, and
        // the per-upstream count is in `portcullis_upstream_errors_total`.
        ErrorSource::Upstream => {
            static REPEATS: Repeats = Repeats::new(|suppressed| {
                tracing::warn!(suppressed, "upstream failed: repeats summarised")
            });
            if let Some(suppressed) = REPEATS.admit() {
                tracing::warn!(request_id = %ctx.request_id, upstream = ctx.upstream.as_deref().unwrap_or("-"), error = %e, suppressed, "upstream failed")
            }
        }
        ErrorSource::Internal => {
            static REPEATS: Repeats = Repeats::new(|suppressed| {
                tracing::error!(
                    suppressed,
                    "request failed inside the gateway: repeats summarised"
                )
            });
            if let Some(suppressed) = REPEATS.admit() {
                tracing::error!(request_id = %ctx.request_id, error = %e, suppressed, "request failed inside the gateway")
            }
        }
    }
}

/// Writes the access line and the request metrics; returns the answer's
/// `Content-Length`, if any.
fn log_and_count(resp: &Response<ResponseBody>, ctx: &RequestCtx, app: &App) -> Option<u64> {
    let length = content_length(resp.headers());
    access(ctx, app, resp.status().as_u16(), length);
    length
}

/// The request metrics and the access line of a request answered `status`.
fn access(ctx: &RequestCtx, app: &App, status: u16, length: Option<u64>) {
    static NO_ROUTE: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| Arc::from("none"));
    let elapsed = ctx.start.elapsed();
    let route = ctx.route.as_ref().unwrap_or(&NO_ROUTE);
    let upstream = ctx
        .upstream
        .as_ref()
        .zip(ctx.upstream_latency)
        .map(|(u, t)| (u, t.as_secs_f64()));
    app.metrics
        .observe_request(route, &ctx.method, status, elapsed.as_secs_f64(), upstream);
    let key = ctx.identity.as_ref().map(|i| &*i.key);
    // The path is the canonical path without the query: a query-string
    // credential never reaches the log.
    tracing::info!(
        target: "portcullis::access",
        request_id = %ctx.request_id,
        method = %ctx.method,
        path = %ctx.path,
        route = %route,
        status,
        upstream = ctx.upstream.as_deref().unwrap_or("-"),
        key_id = key.map_or("-", |k| &*k.id),
        workspace = key.map_or("-", |k| &*k.workspace),
        bytes = length.unwrap_or(0),
        latency_ms = elapsed.as_secs_f64() * 1000.0,
        peer = %ctx.conn.peer.ip(),
    );
}

fn content_length(h: &HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

fn trusted(ip: IpAddr, cfg: &Config) -> bool {
    cfg.server.trusted_proxies.iter().any(|n| n.contains(&ip))
}

/// The client address: the socket peer, or — when the peer is a trusted
/// proxy — the right-most `X-Forwarded-For` hop that is not itself trusted
/// (the peer when there is none, or every hop is trusted). Empty hops are
/// skipped. A hop that is not an IP address, met before an untrusted one,
/// is refused with 400: falling back to the peer would check an
/// IP-restricted key against the proxy's address instead of the client's.
pub fn client_ip(h: &HeaderMap, conn: ConnInfo, cfg: &Config) -> Result<IpAddr, GatewayError> {
    let peer = conn.peer.ip();
    if !trusted(peer, cfg) {
        return Ok(peer);
    }
    const MALFORMED: GatewayError =
        GatewayError::BadRequest("malformed X-Forwarded-For from a trusted proxy");
    // Right to left, header lines last first: no list is collected.
    for line in h.get_all(names::X_FORWARDED_FOR).iter().rev() {
        let line = line.to_str().map_err(|_| MALFORMED)?;
        for hop in line.rsplit(',').map(str::trim).filter(|s| !s.is_empty()) {
            match hop.parse::<IpAddr>() {
                Ok(ip) if trusted(ip, cfg) => continue,
                Ok(ip) => return Ok(ip),
                Err(_) => return Err(MALFORMED),
            }
        }
    }
    Ok(peer)
}

/// The `X-Forwarded-For` sent upstream: the peer, appended to the client's
/// list only when the peer is a trusted proxy (else the client's is dropped).
fn forwarded_for(h: &HeaderMap, conn: ConnInfo, cfg: &Config) -> HeaderValue {
    let peer = conn.peer.ip();
    if trusted(peer, cfg) {
        let prior: Vec<&str> = h
            .get_all(names::X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect();
        // A key pasted into the list would go upstream with it.
        if !prior.is_empty()
            && !prior
                .iter()
                .any(|p| cfg.key_format.carries_key(p.as_bytes()))
            && let Ok(v) = HeaderValue::from_str(&format!("{}, {peer}", prior.join(", ")))
        {
            return v;
        }
    }
    peer_header(peer)
}

/// A thread's last header value made, and what it was made from.
type LastValue<K> = std::cell::RefCell<Option<(K, HeaderValue)>>;

thread_local! {
    // A client sends many requests in a row (keep-alive), a key's limit is
    // the same on every request and its reset the same within a second:
    // the value repeated from the last request costs no allocation.
    static LAST_PEER: LastValue<IpAddr> = const { std::cell::RefCell::new(None) };
    static LAST_LIMIT: LastValue<u64> = const { std::cell::RefCell::new(None) };
    static LAST_RESET: LastValue<u64> = const { std::cell::RefCell::new(None) };
}

/// `make(k)`, through this thread's one-entry memo `last`.
fn remembered<K: Copy + PartialEq + 'static>(
    last: &'static std::thread::LocalKey<LastValue<K>>,
    k: K,
    make: fn(K) -> HeaderValue,
) -> HeaderValue {
    last.with(|last| {
        let Ok(mut last) = last.try_borrow_mut() else {
            return make(k);
        };
        match &*last {
            Some((m, v)) if *m == k => v.clone(),
            _ => {
                let v = make(k);
                *last = Some((k, v.clone()));
                v
            }
        }
    })
}

/// [`ip_header`] of the peer, remembered per thread.
fn peer_header(peer: IpAddr) -> HeaderValue {
    remembered(&LAST_PEER, peer, ip_header)
}

/// An address as a header value. IPv4 is written by hand: `Display` for
/// `Ipv4Addr` goes through the formatter, which showed in the profile.
fn ip_header(ip: IpAddr) -> HeaderValue {
    let IpAddr::V4(v4) = ip else {
        return HeaderValue::from_str(&ip.to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
    };
    let mut buf = [0u8; 15];
    let mut n = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            buf[n] = b'.';
            n += 1;
        }
        if octet >= 100 {
            buf[n] = b'0' + octet / 100;
            n += 1;
        }
        if octet >= 10 {
            buf[n] = b'0' + octet / 10 % 10;
            n += 1;
        }
        buf[n] = b'0' + octet % 10;
        n += 1;
    }
    HeaderValue::from_bytes(&buf[..n]).unwrap_or(HeaderValue::from_static("unknown"))
}

#[cfg(test)]
mod tests {
    use super::{LAST_LIMIT, LAST_RESET, ip_header, peer_header, remembered};
    use http::HeaderValue;

    #[test]
    fn the_number_memo_answers_for_the_number_asked() {
        let limit = |n| remembered(&LAST_LIMIT, n, HeaderValue::from);
        let reset = |n| remembered(&LAST_RESET, n, HeaderValue::from);
        for (v, n) in [
            (limit(10), 10),
            (limit(10), 10),
            (reset(10), 10),
            (limit(7), 7),
        ] {
            assert_eq!(v, n.to_string().as_str());
        }
        assert_eq!(reset(u64::MAX), u64::MAX.to_string().as_str());
    }

    #[test]
    fn the_peer_memo_answers_for_the_peer_asked() {
        let a: std::net::IpAddr = "10.0.0.1".parse().unwrap();
        let b: std::net::IpAddr = "10.0.0.2".parse().unwrap();
        assert_eq!(peer_header(a), "10.0.0.1");
        assert_eq!(peer_header(a), "10.0.0.1");
        assert_eq!(peer_header(b), "10.0.0.2");
        assert_eq!(peer_header(a), "10.0.0.1");
    }

    #[test]
    fn addresses_are_written_as_display_writes_them() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.20.255.9",
            "255.255.255.255",
            "::1",
            "2001:db8::7",
        ] {
            let parsed: std::net::IpAddr = ip.parse().unwrap();
            assert_eq!(ip_header(parsed), ip);
        }
    }
}
