//! Serving one connection: HTTP/2 by hyper for its whole life; HTTP/1.1 in
//! hyper sessions that end whenever the connection goes idle.
//!
//! An idle HTTP/1.1 connection is *parked*: hyper's state (an 8–16 KiB read
//! buffer, write buffer, dispatcher) is dropped and the task waits for the
//! socket to become readable with no buffer at all, then starts a fresh
//! session. That keeps an idle keep-alive connection at a few hundred bytes,
//! as nginx does, instead of tens of KiB.

use super::io::{ConnIo, ConnShared, InFlight, Socket};
use crate::context::{BodyEnded, ConnInfo, RequestBody, ResponseBody};
use crate::server::App;
use bytes::Bytes;
use futures_util::FutureExt;
use http::Request;
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tokio::time::Instant;

/// How often a busy HTTP/1.1 connection checks whether it went idle. A
/// connection is parked after one to two ticks without traffic.
const TICK: Duration = Duration::from_millis(100);

/// HTTP/1.1 sessions (across all workers) that may stay open between
/// requests until a tick finds them idle. Beyond this, a session is parked
/// the moment it waits for its next request, so a crowd of mostly idle
/// connections never holds a crowd of hyper buffers at once, unless its
/// connection is busy: its next request came within a tick of its last
/// parking. A busy connection is rebuilt once, not after every response.
const WARM_SESSIONS: usize = 128;

/// HTTP/1.1 sessions open now.
static SESSIONS: AtomicUsize = AtomicUsize::new(0);

/// One open HTTP/1.1 session, counted in [`SESSIONS`].
struct Session;

impl Session {
    fn open() -> Self {
        SESSIONS.fetch_add(1, Ordering::Relaxed);
        Session
    }
    fn crowded() -> bool {
        SESSIONS.load(Ordering::Relaxed) > WARM_SESSIONS
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        SESSIONS.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Connection limits from `[server]`, read once per connection.
#[derive(Clone, Copy)]
struct Limits {
    header_read: Duration,
    keepalive: Duration,
    max_header_bytes: usize,
    h2_streams: u32,
}

/// Serves a connection until it closes, or until `stop` turns true and its
/// in-flight requests are answered.
pub async fn serve<I: Socket>(
    io: I,
    h2_alpn: Option<bool>,
    conn: ConnInfo,
    app: Arc<App>,
    mut stop: watch::Receiver<bool>,
) {
    let limits = {
        let s = app.snapshot();
        let c = &s.config.server;
        Limits {
            header_read: c.header_read_timeout,
            keepalive: c.keepalive_timeout,
            max_header_bytes: c.max_header_bytes,
            h2_streams: c.http2_max_concurrent_streams,
        }
    };
    let shared = Arc::new(ConnShared::default());
    let mut io = ConnIo::new(io, shared.clone());

    // The first request head must start within both timeouts.
    let first = Instant::now() + limits.header_read.min(limits.keepalive);
    if !wait_readable(io.get_mut(), first, &mut stop, &app).await {
        return;
    }
    let h2 = match h2_alpn {
        Some(h2) => h2,
        // Shutdown does not wait for a client that sent a byte and stalled.
        None => match tokio::select! {
            biased;
            _ = stop.changed() => None,
            h2 = sniff_h2(&mut io, first) => h2,
        } {
            Some(h2) => h2,
            None => return,
        },
    };
    if h2 {
        // Boxed: hyper's HTTP/2 state would otherwise size every task.
        let service = service(&shared, conn, &app);
        return Box::pin(serve_h2(io, service, limits, conn, stop)).await;
    }

    let mut pace = Pace::default();
    loop {
        // Boxed: the session's state (hyper's buffers, its timer) is freed
        // the moment it parks, so a parked task keeps none of it.
        let session = Box::pin(session(
            io, limits, &shared, &mut stop, &mut pace, conn, &app,
        ));
        let Some((parked_io, partial)) = session.await else {
            return;
        };
        io = parked_io;
        app.metrics.parks.inc();
        let now = Instant::now();
        let deadline = if partial.is_empty() {
            pace.head_since = None;
            if shared.requests() == 0 {
                // Still no first request: its own bound holds.
                first
            } else {
                now + limits.keepalive
            }
        } else {
            // Part of a request head was read (hyper parses whole ones
            // before it waits): replay it to the next session once the rest
            // arrives, on the head's own clock.
            io.set_replay(partial);
            *pace.head_since.get_or_insert(now) + limits.header_read
        };
        if !wait_readable(io.get_mut(), deadline, &mut stop, &app).await {
            return;
        }
        pace.busy = Instant::now() < now + TICK;
    }
}

/// What an HTTP/1.1 connection remembers across its sessions.
#[derive(Default)]
struct Pace {
    /// When the current request head started, if one is pending.
    head_since: Option<Instant>,
    /// Whether the last parking ended within a tick: a client sending request
    /// after request, whose session stays warm when crowded.
    busy: bool,
}

/// Serves HTTP/1.1 requests on `io` with one hyper session until the
/// connection closes (`None`) or goes idle between messages (every request
/// read to its end, every response written and flushed): then the session
/// is taken apart and the stream comes back with any partial request head
/// hyper had read of the next request. Parking never happens inside a
/// message, so a fresh session reads the same requests hyper would have.
/// The builder and service are made here, not kept by the connection, so
/// a parked connection holds neither.
async fn session<I: Socket>(
    io: ConnIo<I>,
    limits: Limits,
    shared: &Arc<ConnShared>,
    stop: &mut watch::Receiver<bool>,
    pace: &mut Pace,
    conn: ConnInfo,
    app: &Arc<App>,
) -> Option<(ConnIo<I>, Bytes)> {
    let mut b = hyper::server::conn::http1::Builder::new();
    // Timeouts are this loop's job (below): hyper's header timer would cost a
    // timer allocation per request.
    b.max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true)
        // One contiguous write of head and body: answers are mostly small,
        // and hyper's vectored queue cost more instructions than the copy.
        .writev(false);
    let mut session = b
        .serve_connection(TokioIo::new(io), service(shared, conn, app))
        .with_upgrades();
    let _counted = Session::open();
    let mut tick = std::pin::pin!(tokio::time::sleep(TICK));
    // Whether the tick holds this task's waker: then it needs no poll until
    // it has fired (a poll per wake-up showed in the per-request profile).
    let mut tick_armed = false;
    let mut seen_activity = shared.activity();
    let mut seen_requests = shared.requests();
    // When bytes last moved, as of the last tick.
    let mut quiet_since = Instant::now();
    let mut draining = false;
    loop {
        tokio::select! {
            biased;
            r = &mut session => {
                if let Err(e) = r {
                    tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
                }
                return None;
            }
            // Polled right after the session, so it sees hyper's latest state.
            _ = std::future::poll_fn(|_| {
                if Session::crowded() && shared.waiting() { Poll::Ready(()) } else { Poll::Pending }
            }), if !draining && !pace.busy => break,
            _ = std::future::poll_fn(|cx| {
                if tick_armed && !tick.is_elapsed() {
                    return Poll::Pending;
                }
                tick_armed = true;
                tick.as_mut().poll(cx)
            }), if !draining => {
                tick_armed = false;
                // Shutdown is seen here, within a tick, rather than by a
                // watch polled on every wake-up of a busy connection.
                if !matches!(stop.has_changed(), Ok(false)) {
                    draining = true;
                    Pin::new(&mut session).graceful_shutdown();
                    continue;
                }
                let now = Instant::now();
                let (activity, requests) = (shared.activity(), shared.requests());
                if activity != seen_activity {
                    quiet_since = now;
                }
                if shared.busy() || requests != seen_requests {
                    pace.head_since = None;
                } else if !shared.bodies_read() {
                    // A request body is still arriving though its response
                    // is over (an upstream that answered early). Only hyper
                    // knows where that body ends, so its state stays: the
                    // connection is not parked, and closes once quiet for
                    // the keep-alive time.
                    pace.head_since = None;
                    if now >= quiet_since + limits.keepalive {
                        tracing::debug!(peer = %conn.peer, "request body stalled");
                        return None;
                    }
                } else if pace.head_since.is_some_and(|t| now >= t + limits.header_read) {
                    // Bytes keep trickling in but no request head completes.
                    tracing::debug!(peer = %conn.peer, "request head timed out");
                    return None;
                } else if activity == seen_activity {
                    // Quiet for a whole tick, between messages: park.
                    break;
                } else {
                    pace.head_since.get_or_insert(now);
                }
                seen_activity = activity;
                seen_requests = requests;
                tick.as_mut().reset(now + TICK);
            }
        }
    }
    let parts = session.into_parts()?;
    // Copied: the slice pins hyper's whole read buffer, even when empty.
    let partial = if parts.read_buf.is_empty() {
        Bytes::new()
    } else {
        Bytes::copy_from_slice(&parts.read_buf)
    };
    Some((parts.io.into_inner(), partial))
}

/// The connection's request handler: runs the pipeline and tracks the
/// request in flight until its response body is finished.
fn service(
    shared: &Arc<ConnShared>,
    conn: ConnInfo,
    app: &Arc<App>,
) -> impl hyper::service::Service<
    Request<Incoming>,
    Response = http::Response<Tracked>,
    Error = Infallible,
    Future = impl Future<Output = Result<http::Response<Tracked>, Infallible>> + Send + 'static,
> + Clone
+ Send
+ 'static {
    let shared = shared.clone();
    let app = app.clone();
    service_fn(move |req: Request<Incoming>| {
        let has_body = !hyper::body::Body::is_end_stream(req.body());
        let (guard, seq) = shared.start_request(has_body);
        // Only a body still to read needs to say when it ends.
        let end = has_body.then(|| (shared.clone() as Arc<dyn BodyEnded>, seq));
        let req = req.map(|body| RequestBody::new(body, end));
        let conn = ConnInfo {
            framing_conflict: shared.framing_conflict.load(Ordering::Relaxed),
            target_fragment: shared.target_fragment.load(Ordering::Relaxed),
            ..conn
        };
        // Not boxed: hyper keeps the request future in a box of its own,
        // one per connection. The pipeline's future is this one itself (a
        // combinator, not an `async` block around it, which would copy it
        // in on first poll).
        crate::pipeline::handle(req, conn, app.clone()).map(move |resp| {
            Ok::<_, Infallible>(resp.map(|body| Tracked {
                body,
                _guard: guard,
            }))
        })
    })
}

/// HTTP/2 keeps its hyper state for the connection's life: its streams
/// share one connection and it has its own keep-alive pings.
async fn serve_h2<I, S>(
    io: ConnIo<I>,
    service: S,
    limits: Limits,
    conn: ConnInfo,
    mut stop: watch::Receiver<bool>,
) where
    I: Socket,
    S: hyper::service::HttpService<Incoming, ResBody = Tracked> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut b = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
    b.timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_streams)
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.keepalive / 2)
        .keep_alive_timeout(limits.header_read);
    let session = b.serve_connection(TokioIo::new(io), service);
    tokio::pin!(session);
    let result = tokio::select! {
        r = session.as_mut() => r,
        _ = stop.changed() => {
            session.as_mut().graceful_shutdown();
            session.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
    }
}

/// Waits, holding no buffer, until the stream has bytes (or hung up); false
/// at `deadline` or on shutdown.
async fn wait_readable<I: Socket>(
    io: &mut I,
    deadline: Instant,
    stop: &mut watch::Receiver<bool>,
    app: &App,
) -> bool {
    if *stop.borrow() {
        return false;
    }
    // TLS: the request may already sit decrypted in rustls (see
    // `Socket::buffered`), and then the socket shows nothing to read.
    if io.buffered() {
        return true;
    }
    let io = &*io;
    let gauge = &app.metrics.parked_connections;
    gauge.inc();
    let _parked = Defer(|| {
        gauge.dec();
    });
    tokio::select! {
        biased;
        _ = stop.changed() => false,
        // `poll_read_ready` keeps its waker in the socket's registration,
        // so waiting adds nothing to the task (`readable()` would add 150 B).
        r = std::future::poll_fn(|cx| io.tcp().poll_read_ready(cx)) => r.is_ok(),
        _ = tokio::time::sleep_until(deadline) => false,
    }
}

/// Runs a closure when dropped.
struct Defer<F: FnMut()>(F);

impl<F: FnMut()> Drop for Defer<F> {
    fn drop(&mut self) {
        (self.0)()
    }
}

/// HTTP/2 with prior knowledge starts with this preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the bytes either match or rule out the HTTP/2 preface, and
/// keeps them for hyper. `None` when the client goes away or runs out of time.
async fn sniff_h2<I: Socket>(io: &mut ConnIo<I>, deadline: Instant) -> Option<bool> {
    let mut buf = [0u8; 24];
    let mut n = 0;
    let h2 = loop {
        let read = tokio::time::timeout_at(deadline, io.read(&mut buf[n..])).await;
        match read {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return None,
            Ok(Ok(k)) => n += k,
        }
        if buf[..n] != H2_PREFACE[..n] {
            break false;
        }
        if n == H2_PREFACE.len() {
            break true;
        }
    };
    io.set_replay(Bytes::copy_from_slice(&buf[..n]));
    Some(h2)
}

/// A response body that marks its request finished when dropped, so an
/// HTTP/1.1 connection is never parked while a response is still streaming.
pub struct Tracked {
    body: ResponseBody,
    _guard: InFlight,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = <ResponseBody as Body>::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl std::fmt::Debug for Tracked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracked")
    }
}
