//! Last stage: forward an admitted request to its upstream and stream the
//! answer back. One pooled keep-alive client per upstream, round-robin over
//! its targets; bodies stream both ways, never buffered. Never retries a
//! request that may have reached the upstream.

pub mod deadline;
pub mod headers;
pub mod pool;

use crate::config::{Route, Upstream};
use crate::context::{RequestBody, RequestCtx, ResponseBody, Seen, UpstreamBody, names};
use crate::error::GatewayError;
use crate::keys::{Environment, KeyFormat};
use futures_util::FutureExt;
use futures_util::future::Either as EitherFuture;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode, Uri, header};
use http_body_util::{Either, Limited};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use pool::{Connector, PoolLimits, SendError, TargetPool};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

/// The request body as forwarded: the client's, capped at the route's size.
pub type ForwardBody = Limited<RequestBody>;

thread_local! {
    /// Which worker event loop this thread runs (0 outside the workers).
    static WORKER: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Marks the current thread as worker `i`: its requests use its own pooled
/// connections, whose tasks live on its own event loop (no cross-thread
/// wake-ups), and its upstream deadlines its own coarse timer table.
pub fn set_worker(i: usize) {
    WORKER.with(|w| w.set(i));
    deadline::enable_on_this_thread();
}

/// Connection pools for one upstream: per worker, one per target.
pub struct UpstreamPool {
    /// The upstream's config (a pool is kept across reloads only while it is unchanged).
    pub config: Upstream,
    connector: Connector,
    limits: PoolLimits,
    /// `[worker][target]`, targets in the order of `targets` then `test_targets`.
    workers: Vec<Vec<TargetPool>>,
    /// `Host` for each target, as in its URL.
    hosts: Vec<HeaderValue>,
    next: AtomicUsize,
}

impl std::fmt::Debug for UpstreamPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamPool")
            .field("name", &self.config.name)
            .finish()
    }
}

impl UpstreamPool {
    /// Pools for an upstream (one set per worker): keep-alive, connect
    /// timeout, idle timeout.
    pub fn new(config: Upstream, workers: usize) -> Self {
        let all: Vec<&Uri> = config.targets.iter().chain(&config.test_targets).collect();
        let workers = (0..workers.max(1))
            .map(|_| all.iter().map(|t| TargetPool::new((*t).clone())).collect())
            .collect();
        let hosts = all
            .iter()
            .map(|t| {
                t.authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                    .unwrap_or_else(|| HeaderValue::from_static("localhost"))
            })
            .collect();
        UpstreamPool {
            connector: pool::connector(config.connect_timeout),
            limits: PoolLimits {
                connect_timeout: config.connect_timeout,
                idle_timeout: config.pool_idle_timeout,
                max_kept: config.pool_max_idle,
            },
            workers,
            hosts,
            next: AtomicUsize::new(0),
            config,
        }
    }

    /// The index of the next target for a request (round-robin).
    fn pick(&self, env: Option<Environment>) -> usize {
        let i = self.next.fetch_add(1, Ordering::Relaxed);
        match env {
            Some(Environment::Test) if !self.config.test_targets.is_empty() => {
                self.config.targets.len() + i % self.config.test_targets.len()
            }
            _ => i % self.config.targets.len(),
        }
    }

    /// Closes, in every worker's pools, the connections idle for
    /// `pool_idle_timeout` or closed by the upstream; returns how many stay
    /// pooled.
    pub fn sweep(&self, now: Instant) -> usize {
        self.workers
            .iter()
            .flatten()
            .map(|t| t.sweep(self.limits.idle_timeout, self.limits.max_kept, now))
            .sum()
    }

    fn target_pool(&self, target: usize) -> &TargetPool {
        let w = WORKER.with(|w| w.get());
        &self.workers[w % self.workers.len()][target]
    }
}

/// What the proxy needs to know about the client side of a request.
pub struct Forwarding<'k> {
    /// The client's address as the gateway believes it (for `X-Forwarded-For`).
    pub xff: HeaderValue,
    /// Whether `Authorization` and `X-API-Key` must be removed whatever
    /// they hold (keyed route).
    pub strip_credentials: bool,
    /// The configured key format: any header value carrying a key is
    /// removed, on every route.
    pub key_format: &'k KeyFormat,
}

/// Forwards the request and returns the upstream's response, streamed.
///
/// Not an `async fn`: the request is rewritten and handed to the pool here,
/// so the returned future (inside every proxied request's) holds no copy of
/// it. The upstream exchange starts when this is called.
pub fn forward<'a>(
    pool: &'a UpstreamPool,
    route: &Route,
    req: Request<RequestBody>,
    fwd: Forwarding<'_>,
    ctx: &'a mut RequestCtx,
) -> impl Future<Output = Result<Response<ResponseBody>, GatewayError>> + Send + 'a {
    // Straight-line, each value built where it ends up: a `Result::map`
    // and a `match` around the response future copied it twice more.
    let (out, target, client_upgrade) = match rewrite(pool, route, req, fwd, ctx) {
        Ok(rewritten) => rewritten,
        Err(e) => return EitherFuture::Left(std::future::ready(Err(e))),
    };
    ctx.upstream = Some(pool.config.name.clone());
    let sent = Instant::now();
    let response = deadline::within(
        deadline::after(sent, pool.config.request_timeout),
        pool.target_pool(target)
            .send(&pool.connector, pool.limits, out, sent),
    );
    // A combinator, not an `async` block: moving the response future
    // out of a captured value would hold it twice.
    EitherFuture::Right(response.map(move |result| {
        ctx.upstream_latency = Some(sent.elapsed());
        answer(result, client_upgrade)
    }))
}

/// The identity headers the gateway sets for the upstream, in the order of
/// the values `rewrite` makes.
const IDENTITY_HEADERS: [HeaderName; 3] = [
    names::X_KEY_ID,
    names::X_WORKSPACE_ID,
    names::X_KEY_ENVIRONMENT,
];

/// The request as it goes upstream (origin-form target, hop-by-hop headers
/// out, forwarding and identity headers set), the target it goes to, and the
/// client side of a WebSocket upgrade.
fn rewrite(
    pool: &UpstreamPool,
    route: &Route,
    mut req: Request<RequestBody>,
    fwd: Forwarding<'_>,
    ctx: &RequestCtx,
) -> Result<
    (
        Request<ForwardBody>,
        usize,
        Option<hyper::upgrade::OnUpgrade>,
    ),
    GatewayError,
> {
    let env = ctx.identity.as_ref().map(|i| i.key.environment);
    let target = pool.pick(env);
    // Only a WebSocket upgrade crosses: any other protocol (`h2c` …) is
    // hop-by-hop and removed, and the request goes as a plain one.
    let upgrade =
        route.websocket && ctx.seen.any(Seen::UPGRADE) && headers::names_websocket(req.headers());

    // Origin-form on the upstream connection: the canonical path + the
    // query. Most requests arrive that way already: their target is kept.
    let uri = if req.uri().scheme().is_none()
        && req.uri().authority().is_none()
        && req.uri().path() == ctx.path
    {
        None
    } else {
        let query = req.uri().query();
        let mut pq = String::with_capacity(ctx.path.len() + 1 + query.map_or(0, str::len));
        pq.push_str(&ctx.path);
        if let Some(q) = query {
            pq.push('?');
            pq.push_str(q);
        }
        // From `Bytes`: `str::parse` would copy the string once more.
        let uri = Uri::from_maybe_shared(bytes::Bytes::from(pq))
            .map_err(|_| GatewayError::BadRequest("malformed request target"))?;
        Some(uri)
    };
    // HTTP/2 names the host in the target (`:authority`), not in `Host`.
    let target_host = req
        .uri()
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok());
    let client_upgrade = upgrade.then(|| hyper::upgrade::on(&mut req));

    let seen = ctx.seen;
    let h = req.headers_mut();
    // Removals only for names the guard saw: each is a hash lookup, and
    // most requests carry none of them.
    let wants_trailers =
        seen.any(Seen::HOP_BY_HOP | Seen::UPGRADE) && headers::strip_hop_by_hop(h, upgrade);
    if upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
    if wants_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if fwd.strip_credentials {
        if seen.any(Seen::AUTHORIZATION) {
            h.remove(header::AUTHORIZATION);
        }
        if seen.any(Seen::X_API_KEY) {
            h.remove(names::X_API_KEY);
        }
    }
    // Before `Host` moves to X-Forwarded-Host and the gateway's own headers
    // go in: only what the client sent is scanned.
    headers::strip_keys(h, fwd.key_format);
    // The upstream sees its own name; X-Forwarded-Host carries the client's.
    let original_host = h
        .insert(header::HOST, pool.hosts[target].clone())
        .or(target_host);
    h.insert(names::X_FORWARDED_FOR, fwd.xff);
    h.insert(
        names::X_FORWARDED_PROTO,
        HeaderValue::from_static(if ctx.conn.tls { "https" } else { "http" }),
    );
    match original_host {
        Some(v) => {
            h.insert(names::X_FORWARDED_HOST, v);
        }
        None if seen.any(Seen::X_FORWARDED_HOST) => {
            h.remove(names::X_FORWARDED_HOST);
        }
        None => {}
    }
    h.insert(names::X_REQUEST_ID, ctx.request_id.header());
    // Identity headers: always ours, never the client's (an insert replaces
    // every value the client sent under the name).
    if let Some(id) = ctx.identity.as_ref() {
        let values = [
            id.key.key_id_header.clone(),
            id.key.workspace_header.clone(),
            Some(HeaderValue::from_static(id.key.environment.as_str())),
        ];
        for (name, value) in IDENTITY_HEADERS.into_iter().zip(values) {
            match value {
                Some(v) => h.insert(name, v),
                None => h.remove(name),
            };
        }
    } else if seen.any(Seen::IDENTITY) {
        for name in IDENTITY_HEADERS {
            h.remove(name);
        }
    }

    let (mut head, body) = req.into_parts();
    if let Some(uri) = uri {
        head.uri = uri;
    }
    if head.version == http::Version::HTTP_2 {
        head.version = http::Version::HTTP_11;
    }
    let limit = usize::try_from(route.max_body_bytes).unwrap_or(usize::MAX);
    let out = Request::from_parts(head, Limited::new(body, limit));
    Ok((out, target, client_upgrade))
}

/// The client's answer from the upstream's: its response with hop-by-hop
/// headers out, or the upgraded connection spliced to the client's.
fn answer(
    result: Result<Result<Response<Incoming>, SendError>, deadline::Elapsed>,
    client_upgrade: Option<hyper::upgrade::OnUpgrade>,
) -> Result<Response<ResponseBody>, GatewayError> {
    let mut resp = match result {
        Err(_) => return Err(GatewayError::UpstreamTimeout),
        Ok(Err(e)) => return Err(classify(&e)),
        Ok(Ok(r)) => r,
    };

    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // Spliced only when both sides agreed on WebSocket: a 101 to any
        // other protocol would hand the client a tunnel the route never allowed.
        if let Some(client_upgrade) = client_upgrade
            && headers::names_websocket(resp.headers())
        {
            let upstream_upgrade = hyper::upgrade::on(&mut resp);
            tokio::spawn(async move {
                if let (Ok(c), Ok(u)) = (client_upgrade.await, upstream_upgrade.await) {
                    let _ =
                        tokio::io::copy_bidirectional(&mut TokioIo::new(c), &mut TokioIo::new(u))
                            .await;
                }
            });
            let (parts, body) = resp.into_parts();
            return Ok(Response::from_parts(
                parts,
                Either::Left(UpstreamBody::new(body)),
            ));
        }
        return Err(GatewayError::UpstreamUnavailable(
            "unexpected 101 from upstream (only a WebSocket upgrade asked for is spliced)".into(),
        ));
    }
    // Both framings at once (RFC 9112 §6.3): hyper decodes the chunks, but
    // the upstream's Content-Length would go on to the client, which would
    // take a body cut to that length for the whole. Such an answer is a
    // broken or hostile upstream: refused (and its connection not pooled).
    if headers::contradictory_framing(resp.headers()) {
        return Err(GatewayError::UpstreamUnavailable(
            "upstream answered with both Content-Length and Transfer-Encoding".into(),
        ));
    }
    headers::strip_hop_by_hop(resp.headers_mut(), false);
    let (mut parts, body) = resp.into_parts();
    // The client is answered in the gateway's own version (RFC 9110 §6.2),
    // whatever the upstream spoke: an HTTP/1.0 upstream must not turn the
    // client's HTTP/1.1 keep-alive connection into HTTP/1.0.
    parts.version = http::Version::HTTP_11;
    Ok(Response::from_parts(
        parts,
        Either::Left(UpstreamBody::new(body)),
    ))
}

/// Maps a send error. The client's body failing on the way is the client's
/// fault: over the size limit (413), or malformed or cut short (400, e.g. a
/// chunk size that overflows), seen as an error of the client's body inside
/// the upstream exchange's error. Anything else means the upstream refused,
/// reset or spoke garbage.
fn classify(e: &SendError) -> GatewayError {
    let mut src: Option<&(dyn std::error::Error + 'static)> = Some(e);
    let mut depth = 0;
    while let Some(s) = src {
        if s.is::<http_body_util::LengthLimitError>() {
            return GatewayError::PayloadTooLarge;
        }
        // The exchange's own error is the first hyper error (under
        // `SendError`); a hyper error beneath it is the client's body.
        if depth > 1 && s.is::<hyper::Error>() {
            return GatewayError::BadRequest("malformed or incomplete request body");
        }
        depth += 1;
        src = s.source();
    }
    GatewayError::UpstreamUnavailable(e.to_string())
}

/// The pools of one config snapshot, by upstream name.
#[derive(Debug, Default, Clone)]
pub struct Pools {
    // foldhash: every proxied request looks its pool up by name.
    by_name: std::collections::HashMap<Arc<str>, Arc<UpstreamPool>, foldhash::fast::RandomState>,
}

impl Pools {
    /// Pools for `upstreams`, reusing those of `previous` whose config is unchanged.
    pub fn build<'a>(
        upstreams: impl IntoIterator<Item = &'a Upstream>,
        previous: Option<&Pools>,
        workers: usize,
    ) -> Pools {
        let mut by_name = std::collections::HashMap::default();
        for u in upstreams {
            let kept = previous
                .and_then(|p| p.by_name.get(&u.name))
                .filter(|p| p.config == *u)
                .cloned();
            by_name.insert(
                u.name.clone(),
                kept.unwrap_or_else(|| Arc::new(UpstreamPool::new(u.clone(), workers))),
            );
        }
        Pools { by_name }
    }

    /// The pool of an upstream.
    pub fn get(&self, name: &str) -> Option<&Arc<UpstreamPool>> {
        self.by_name.get(name)
    }

    /// Sweeps every upstream's pools ([`UpstreamPool::sweep`]); yields each
    /// upstream's name with the connections it keeps pooled.
    pub fn sweep(&self, now: Instant) -> impl Iterator<Item = (&Arc<str>, usize)> {
        self.by_name
            .iter()
            .map(move |(name, p)| (name, p.sweep(now)))
    }
}
