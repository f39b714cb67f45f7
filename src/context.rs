//! Types shared along the request path: the response body type and the
//! per-request context that each stage fills in and that logging and
//! metrics only read.

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

/// Body of every response the public listener sends: streamed from the
/// upstream, or a small body the gateway made itself.
pub type ResponseBody = Either<UpstreamBody, Full<Bytes>>;

/// An upstream's response body on its way to the client. Counts the bytes
/// passed on, so that a body the upstream cuts short (closed before its
/// `Content-Length`, a bad chunk) is logged as cut: the access line,
/// written when the head goes out, cannot know.
pub struct UpstreamBody {
    inner: Incoming,
    sent: u64,
    /// What a cut is reported with; taken by the first error.
    about: Option<CutReport>,
}

/// Who a cut body belongs to, for its warning.
struct CutReport {
    request_id: RequestId,
    route: Option<Arc<str>>,
    upstream: Option<Arc<str>>,
    promised: Option<u64>,
}

impl UpstreamBody {
    /// The upstream's body, passed through.
    pub fn new(inner: Incoming) -> Self {
        UpstreamBody {
            inner,
            sent: 0,
            about: None,
        }
    }

    /// Names the request, route and upstream a cut is reported under, and
    /// the length the upstream promised (its `Content-Length`, if any).
    /// Takes them from the request's context, which is done with them: no
    /// copy, not even a reference count.
    pub fn report_cut_as(&mut self, ctx: &mut RequestCtx, promised: Option<u64>) {
        self.about = Some(CutReport {
            request_id: std::mem::replace(&mut ctx.request_id, RequestId::unknown()),
            route: ctx.route.take(),
            upstream: ctx.upstream.take(),
            promised,
        });
    }

    #[cold]
    fn cut(&mut self, e: &hyper::Error) {
        // Once per body: hyper stops polling after an error anyway.
        let Some(about) = self.about.take() else {
            return;
        };
        // An upstream dying mid-body under load cuts every answer it was
        // streaming: summarised like the other per-request warnings.
        static REPEATS: crate::logging::Repeats = crate::logging::Repeats::new(|suppressed| {
            tracing::warn!(suppressed, "upstream body cut short: repeats summarised")
        });
        if let Some(suppressed) = REPEATS.admit() {
            tracing::warn!(
                request_id = %about.request_id,
                route = about.route.as_deref().unwrap_or("none"),
                upstream = about.upstream.as_deref().unwrap_or("-"),
                bytes_sent = self.sent,
                bytes_promised = about.promised,
                error = %e,
                suppressed,
                "upstream body cut short; the client got an incomplete answer"
            );
        }
    }
}

impl hyper::body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let Some(data) = frame.data_ref() {
                    self.sent += data.len() as u64;
                }
            }
            std::task::Poll::Ready(Some(Err(e))) => self.cut(e),
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for UpstreamBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamBody")
            .field("sent", &self.sent)
            .finish()
    }
}

/// Told by a request's body when the client's last body byte has been read,
/// so that the connection knows the request is over on the wire (see
/// [`RequestBody`]). `seq` is the request's number on its connection.
pub trait BodyEnded: Send + Sync {
    /// The body of request `seq` has been read to its end.
    fn body_ended(&self, seq: u64);
}

/// A request's body as the stages see it: the client's bytes as hyper
/// decodes them, which tells its connection once they have all been read.
/// An HTTP/1.1 connection may set its parser aside between requests
/// (`listener`), and only hyper knows where a body ends: until then the
/// request is not over, even when its response is.
pub struct RequestBody {
    inner: Incoming,
    end: Option<(Arc<dyn BodyEnded>, u64)>,
}

impl RequestBody {
    /// The client's body; `end` (the connection and the request's number on
    /// it) is told when it has been read to its end.
    pub fn new(inner: Incoming, end: Option<(Arc<dyn BodyEnded>, u64)>) -> Self {
        RequestBody { inner, end }
    }

    fn ended(&mut self) {
        if let Some((conn, seq)) = self.end.take() {
            conn.body_ended(seq);
        }
    }
}

impl hyper::body::Body for RequestBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let r = std::pin::Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            std::task::Poll::Ready(None) => self.ended(),
            std::task::Poll::Ready(Some(Ok(_))) if self.inner.is_end_stream() => self.ended(),
            _ => {}
        }
        r
    }
    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

impl std::fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RequestBody")
    }
}

/// A response body the gateway made itself.
pub fn full_body(b: impl Into<Bytes>) -> ResponseBody {
    Either::Right(Full::new(b.into()))
}

/// What the listener knows about a connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    /// The socket peer.
    pub peer: SocketAddr,
    /// Whether the connection is TLS.
    pub tls: bool,
    /// Whether the connection's bytes showed a request head with both
    /// `Content-Length` and `Transfer-Encoding` (hyper hides that conflict).
    pub framing_conflict: bool,
    /// Whether the connection's bytes showed a request line with a raw `#`
    /// (hyper drops a fragment from the target without a trace).
    pub target_fragment: bool,
}

/// A request id: the client's well-formed `X-Request-Id`, or one the gateway
/// made. Held as a header value because it goes upstream and back on every
/// request: a clone shares its bytes instead of copying and re-checking them.
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    /// Longest client-sent id kept.
    const MAX_LEN: usize = 128;

    /// The client's `X-Request-Id` when well-formed (1–128 of `[A-Za-z0-9._-]`).
    pub fn from_client(h: &HeaderMap) -> Option<Self> {
        let v = h.get(names::X_REQUEST_ID)?.as_bytes();
        Self::from_bytes(v)
    }

    /// An id from bytes, when well-formed (1–128 of `[A-Za-z0-9._-]`).
    pub fn from_bytes(v: &[u8]) -> Option<Self> {
        let ok = !v.is_empty()
            && v.len() <= Self::MAX_LEN
            && v.iter()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'));
        if !ok {
            return None;
        }
        // Copied, not sliced: a slice would pin the connection's read buffer.
        HeaderValue::from_bytes(v).ok().map(RequestId)
    }

    /// An id the gateway made of characters it knows are well-formed: not
    /// checked again here (the header value checks its bytes anyway).
    pub fn made(v: bytes::Bytes) -> Self {
        HeaderValue::from_maybe_shared(v).map_or_else(|_| Self::unknown(), RequestId)
    }

    /// The id used if one could not be made (not reached: ids are ASCII).
    pub fn unknown() -> Self {
        RequestId(HeaderValue::from_static("unknown"))
    }

    /// The id as text (always ASCII: only well-formed ids are built).
    pub fn as_str(&self) -> &str {
        self.0.to_str().unwrap_or("")
    }

    /// The id as a header value, sharing its bytes.
    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The identity a request was authenticated as (filled by `auth`).
#[derive(Clone, Debug)]
pub struct Identity {
    /// The key record (shared with the cache; never holds the secret).
    pub key: Arc<AuthedKey>,
}

/// A key as the key cache holds it: only what the request path reads (the
/// checks, the plan, the identity headers, made once per cache fill instead
/// of once per request), in boxed slices rather than growable vectors. The
/// record's name, metadata, prefix and times stay in the store: a cached key
/// costs a few hundred bytes, not the record's ~1.4 KB.
#[derive(Debug)]
pub struct AuthedKey {
    /// `key_…`.
    pub id: Box<str>,
    /// The workspace (tenant).
    pub workspace: Box<str>,
    /// Kind name from `[key_kinds.*]`.
    pub kind: Box<str>,
    /// `live` or `test`.
    pub environment: crate::keys::Environment,
    /// `active` or `disabled`.
    pub status: crate::keys::KeyStatus,
    /// Expiry, if any.
    pub expires_at: Option<crate::time::Timestamp>,
    /// Permissions held (`*` and `prefix.*` wildcards allowed).
    pub permissions: Box<[Box<str>]>,
    /// Plan name; none means `[plans.default]`.
    pub plan: Option<Box<str>>,
    /// CIDRs the key may be used from; empty means anywhere.
    pub allowed_ips: Box<[ipnet::IpNet]>,
    /// Hosts the key may be used from; empty means any.
    pub allowed_origins: Box<[Box<str>]>,
    /// Route names the key may call; empty means any.
    pub allowed_routes: Box<[Box<str>]>,
    /// `X-Key-Id` (none if the id is not a valid header value).
    pub key_id_header: Option<http::HeaderValue>,
    /// `X-Workspace-Id` (likewise).
    pub workspace_header: Option<http::HeaderValue>,
    /// When (Unix seconds) a request by this key was last noted for its
    /// `last_used_at` (see `KeyCache::note_used`).
    pub noted_at: std::sync::atomic::AtomicI64,
    /// Whether the key waits in the cache's queue of keys whose
    /// `last_used_at` is to be written.
    pub queued: std::sync::atomic::AtomicBool,
}

impl AuthedKey {
    /// The request path's part of a record found in the store.
    pub fn new(record: crate::keys::KeyRecord) -> Self {
        fn boxed(v: Vec<String>) -> Box<[Box<str>]> {
            v.into_iter().map(String::into_boxed_str).collect()
        }
        AuthedKey {
            key_id_header: http::HeaderValue::from_str(&record.id).ok(),
            workspace_header: http::HeaderValue::from_str(&record.workspace).ok(),
            id: record.id.into_boxed_str(),
            workspace: record.workspace.into_boxed_str(),
            kind: record.kind.into_boxed_str(),
            environment: record.environment,
            status: record.status,
            expires_at: record.expires_at,
            permissions: boxed(record.permissions),
            plan: record.plan.map(String::into_boxed_str),
            allowed_ips: record.allowed_ips.into_boxed_slice(),
            allowed_origins: boxed(record.allowed_origins),
            allowed_routes: boxed(record.allowed_routes),
            noted_at: std::sync::atomic::AtomicI64::new(0),
            queued: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// The rate-limit verdict for the tightest applicable limit (filled by `ratelimit`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RateVerdict {
    /// `X-RateLimit-Limit`.
    pub limit: u64,
    /// `X-RateLimit-Remaining`.
    pub remaining: u64,
    /// `X-RateLimit-Reset`, whole seconds until the window frees a request.
    pub reset_secs: u64,
}

/// Per-request state. Each stage fills its part; the pipeline's logging and
/// metrics only read it.
#[derive(Debug)]
pub struct RequestCtx {
    /// When the request arrived.
    pub start: Instant,
    /// The request id (client's well-formed one, or generated).
    pub request_id: RequestId,
    /// Method, kept for the access log.
    pub method: http::Method,
    /// Canonical path without the query (never logged with the query).
    pub path: String,
    /// The matched route's name.
    pub route: Option<Arc<str>>,
    /// The authenticated key.
    pub identity: Option<Identity>,
    /// The rate-limit verdict for the response headers.
    pub rate: Option<RateVerdict>,
    /// The upstream the request went to.
    pub upstream: Option<Arc<str>>,
    /// Time the upstream took to answer with headers.
    pub upstream_latency: Option<std::time::Duration>,
    /// An allowed `Origin` to echo for CORS.
    pub cors_origin: Option<http::HeaderValue>,
    /// The connection.
    pub conn: ConnInfo,
    /// Which of the request headers the stages act on are present.
    pub seen: Seen,
}

impl RequestCtx {
    /// A fresh context for a request that just arrived.
    pub fn new(conn: ConnInfo, method: http::Method, request_id: RequestId, seen: Seen) -> Self {
        RequestCtx {
            start: Instant::now(),
            request_id,
            seen,
            method,
            path: String::new(),
            route: None,
            identity: None,
            rate: None,
            upstream: None,
            upstream_latency: None,
            cors_origin: None,
            conn,
        }
    }
}

/// The request headers the stages act on that a request carries, found by
/// the guard in one pass over the head. A stage whose header is absent
/// skips its lookup: most requests carry a handful of headers and none of
/// these but `Host`, and each lookup hashes the name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seen(u32);

impl Seen {
    /// `Host`.
    pub const HOST: Seen = Seen(1);
    /// A second `Host`.
    pub const HOST_TWICE: Seen = Seen(1 << 1);
    /// The first `Host` is empty.
    pub const HOST_EMPTY: Seen = Seen(1 << 2);
    /// `Content-Length`.
    pub const CONTENT_LENGTH: Seen = Seen(1 << 3);
    /// A second `Content-Length`.
    pub const CONTENT_LENGTH_TWICE: Seen = Seen(1 << 4);
    /// The first `Content-Length` is not a decimal number.
    pub const CONTENT_LENGTH_MALFORMED: Seen = Seen(1 << 5);
    /// `Transfer-Encoding`.
    pub const TRANSFER_ENCODING: Seen = Seen(1 << 6);
    /// A hop-by-hop header other than `Upgrade` (RFC 9110 §7.6.1, and the
    /// proxy credentials): `Connection`, `Keep-Alive`, `TE`, `Proxy-*`,
    /// `Transfer-Encoding`.
    pub const HOP_BY_HOP: Seen = Seen(1 << 7);
    /// `Upgrade`.
    pub const UPGRADE: Seen = Seen(1 << 8);
    /// `Authorization`.
    pub const AUTHORIZATION: Seen = Seen(1 << 9);
    /// `X-API-Key`.
    pub const X_API_KEY: Seen = Seen(1 << 10);
    /// `X-Request-Id`.
    pub const X_REQUEST_ID: Seen = Seen(1 << 11);
    /// `X-Forwarded-For`.
    pub const X_FORWARDED_FOR: Seen = Seen(1 << 12);
    /// `X-Forwarded-Host`.
    pub const X_FORWARDED_HOST: Seen = Seen(1 << 13);
    /// One of the identity headers the gateway sets (`X-Key-Id`,
    /// `X-Workspace-Id`, `X-Key-Environment`).
    pub const IDENTITY: Seen = Seen(1 << 14);
    /// `Origin`.
    pub const ORIGIN: Seen = Seen(1 << 15);

    /// Whether any of `these` is present.
    pub fn any(self, these: Seen) -> bool {
        self.0 & these.0 != 0
    }
}

impl std::ops::BitOr for Seen {
    type Output = Seen;
    fn bitor(self, other: Seen) -> Seen {
        Seen(self.0 | other.0)
    }
}

impl std::ops::BitOrAssign for Seen {
    fn bitor_assign(&mut self, other: Seen) {
        self.0 |= other.0;
    }
}

/// The hop-by-hop headers, which never cross the gateway (RFC 9110 §7.6.1,
/// plus the proxy credentials meant for us). `Trailer` is end-to-end: hyper
/// only sends the trailers it names, so it must pass. One list for the
/// guard's scan (is any present?) and the proxy's removal (which ones).
pub mod hop_by_hop {
    use http::{HeaderName, header};

    /// Their names.
    pub const NAMES: [HeaderName; 8] = [
        header::TE,
        header::UPGRADE,
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TRANSFER_ENCODING,
        header::PROXY_AUTHENTICATE,
        header::PROXY_AUTHORIZATION,
    ];
    /// The place of `TE` in [`NAMES`].
    pub const TE: usize = 0;
    /// The place of `Upgrade` in [`NAMES`].
    pub const UPGRADE: usize = 1;
    /// The place of `Connection` in [`NAMES`].
    pub const CONNECTION: usize = 2;
    /// The place of `Transfer-Encoding` in [`NAMES`].
    pub const TRANSFER_ENCODING: usize = 5;

    /// Which hop-by-hop header `n` is (its place in [`NAMES`]). By name
    /// length first: this runs for every header of every request and response.
    pub fn index(n: &HeaderName) -> Option<usize> {
        let s = n.as_str();
        let i = match s.len() {
            2 if s == "te" => TE,
            7 if s == "upgrade" => UPGRADE,
            10 if s == "connection" => CONNECTION,
            10 if s == "keep-alive" => 3,
            16 if s == "proxy-connection" => 4,
            17 if s == "transfer-encoding" => TRANSFER_ENCODING,
            18 if s == "proxy-authenticate" => 6,
            19 if s == "proxy-authorization" => 7,
            _ => return None,
        };
        Some(i)
    }
}

/// Header names the gateway reads or sets, built at compile time (a string
/// name would be parsed and validated again on every request).
pub mod names {
    use http::HeaderName;

    /// `X-Request-Id`.
    pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
    /// `X-API-Key`.
    pub const X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");
    /// `X-Forwarded-For`.
    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    /// `X-Forwarded-Proto`.
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    /// `X-Forwarded-Host`.
    pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    /// `X-Key-Id`.
    pub const X_KEY_ID: HeaderName = HeaderName::from_static("x-key-id");
    /// `X-Workspace-Id`.
    pub const X_WORKSPACE_ID: HeaderName = HeaderName::from_static("x-workspace-id");
    /// `X-Key-Environment`.
    pub const X_KEY_ENVIRONMENT: HeaderName = HeaderName::from_static("x-key-environment");
    /// `X-RateLimit-Limit`.
    pub const X_RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("x-ratelimit-limit");
    /// `X-RateLimit-Remaining`.
    pub const X_RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("x-ratelimit-remaining");
    /// `X-RateLimit-Reset`.
    pub const X_RATELIMIT_RESET: HeaderName = HeaderName::from_static("x-ratelimit-reset");
}
