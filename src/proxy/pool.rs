//! Keep-alive connections to one upstream target, one pool per worker.
//!
//! Built on hyper's connection API rather than hyper-util's pooled client:
//! that client races a fresh connect against every wait for an idle
//! connection (a burst of requests became a burst of thousands of connects)
//! and spawns a task per request to return its connection. Here a request
//! takes a ready connection or opens one, and hands it back as soon as the
//! response head is in; a connection is ready again once hyper has finished
//! its response.

use super::ForwardBody;
use futures_util::FutureExt;
use futures_util::future::Either as EitherFuture;
use hyper::body::Incoming;
use hyper::client::conn::http1::{self, SendRequest};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};
use tower_service::Service;

/// Why a request got no response from the upstream.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be opened (refused, unreachable, TLS, timeout).
    #[error("connect: {0}")]
    Connect(String),
    /// The connection failed while the request or response was on it.
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// What hyper answers for a request handed over: the response, or the
/// error with the request when it was never sent.
type HandedOver =
    Result<http::Response<Incoming>, hyper::client::conn::TrySendError<http::Request<ForwardBody>>>;

/// The connector for http and https upstreams (TCP, then rustls with the
/// webpki roots for https).
pub type Connector = HttpsConnector<HttpConnector>;

/// Builds the connector for an upstream.
pub fn connector(connect_timeout: Duration) -> Connector {
    let mut http = HttpConnector::new();
    http.enforce_http(false);
    http.set_nodelay(true);
    http.set_connect_timeout(Some(connect_timeout));
    hyper_rustls::HttpsConnectorBuilder::new()
        .with_webpki_roots()
        .https_or_http()
        .enable_http1()
        .wrap_connector(http)
}

/// Connections a pool keeps before any load asked for more.
pub const BASE_ROOM: usize = 32;

/// How much a pool's room grows per sweep (per second) while connections
/// are being turned away for want of it.
pub const ROOM_GROWTH: usize = 64;

/// One worker's connections to one target.
///
/// The pool keeps at most `room` connections. Room starts at [`BASE_ROOM`]
/// and grows by up to [`ROOM_GROWTH`] a second while returned connections
/// are turned away for want of it (a sustained load above it), up to
/// `pool_max_idle`; it shrinks back, not below the base, as connections go
/// idle for `pool_idle_timeout`. A sustained load so ends with a pool its
/// size, churning nothing, while a one-off burst (shorter than a sweep) does
/// not leave hundreds of idle connections, each holding hyper's buffers.
pub struct TargetPool {
    target: http::Uri,
    conns: Mutex<Vec<Pooled>>,
    room: AtomicUsize,
    turned_away: AtomicUsize,
}

struct Pooled {
    tx: SendRequest<ForwardBody>,
    used: Instant,
}

/// Limits a pool works within (from the upstream's config).
#[derive(Clone, Copy)]
pub struct PoolLimits {
    /// Connect (TCP + TLS) timeout.
    pub connect_timeout: Duration,
    /// A connection unused this long is closed rather than reused.
    pub idle_timeout: Duration,
    /// Connections kept per worker and target.
    pub max_kept: usize,
}

impl TargetPool {
    /// An empty pool for `target` (scheme and authority).
    pub fn new(target: http::Uri) -> Self {
        TargetPool {
            target,
            conns: Mutex::new(Vec::new()),
            room: AtomicUsize::new(BASE_ROOM),
            turned_away: AtomicUsize::new(0),
        }
    }

    /// Sends `req` (at `now`) on a ready pooled connection, or on a new one. A request
    /// is retried (once, on a new connection) only when hyper hands it back
    /// unsent: a pooled connection the upstream had just closed.
    ///
    /// Not an `async fn`: on a pooled connection the request is handed to
    /// hyper here, so the returned future holds no request (an `async fn`
    /// would keep its `req` argument for its whole life, in the future of
    /// every proxied request).
    pub fn send<'a>(
        &'a self,
        connector: &'a Connector,
        limits: PoolLimits,
        req: http::Request<ForwardBody>,
        now: Instant,
    ) -> impl Future<Output = Result<http::Response<Incoming>, SendError>> + Send + 'a {
        // Combinators, not an `async` block: the block kept the pending
        // exchange twice (as captured, and as awaited).
        match self.take_ready(limits.idle_timeout, now) {
            Some(tx) => EitherFuture::Left(self.hand_over(tx, req, limits.max_kept, now).then(
                move |sent| match sent {
                    Ok(r) => EitherFuture::Left(std::future::ready(Ok(r))),
                    Err(mut e) => match e.take_message() {
                        Some(unsent) => EitherFuture::Right(Box::pin(
                            self.send_on_new(connector, limits, unsent, now),
                        )),
                        None => EitherFuture::Left(std::future::ready(Err(SendError::Http(
                            e.into_error(),
                        )))),
                    },
                },
            )),
            // Boxed: connecting is the rare case.
            None => EitherFuture::Right(Box::pin(self.send_on_new(connector, limits, req, now))),
        }
    }

    /// Sends `req` on a newly opened connection (none was ready, or the
    /// ready one had just been closed by the upstream).
    async fn send_on_new(
        &self,
        connector: &Connector,
        limits: PoolLimits,
        req: http::Request<ForwardBody>,
        now: Instant,
    ) -> Result<http::Response<Incoming>, SendError> {
        let tx = self.connect(connector, limits.connect_timeout).await?;
        let response = self.hand_over(tx, req, limits.max_kept, now);
        response.await.map_err(|e| SendError::Http(e.into_error()))
    }

    /// Gives `req` to hyper on `tx`, and `tx` back to the pool once the
    /// response head is in: busy until hyper finishes this exchange, then
    /// ready for the next request. A connection whose answer framed its body
    /// two ways is not put back: which framing the upstream meant is
    /// unknown, so what follows on it cannot be trusted to be the next answer.
    // The error is hyper's own, and carries the unsent request back by design.
    #[allow(clippy::result_large_err)]
    fn hand_over<'a>(
        &'a self,
        mut tx: SendRequest<ForwardBody>,
        req: http::Request<ForwardBody>,
        max_kept: usize,
        now: Instant,
    ) -> impl Future<Output = HandedOver> + Send + 'a {
        tx.try_send_request(req).map(move |response| {
            if !matches!(&response, Ok(r) if super::headers::contradictory_framing(r.headers())) {
                self.put_back(tx, max_kept, now);
            }
            response
        })
    }

    /// The most recently used ready connection, dropping closed and stale ones.
    ///
    /// The pool is a stack (most recently used last) and stays in that
    /// order, so the connections a smaller load no longer needs sink to the
    /// bottom, go unused, and are closed by [`TargetPool::sweep`] once idle
    /// for `idle_timeout`: the pool follows the recent load, not the cap.
    fn take_ready(&self, idle_timeout: Duration, now: Instant) -> Option<SendRequest<ForwardBody>> {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let mut i = conns.len();
        while i > 0 {
            i -= 1;
            let c = &conns[i];
            if c.tx.is_closed() || now.duration_since(c.used) >= idle_timeout {
                // Dropping the sender closes the connection once it is idle.
                conns.remove(i);
            } else if c.tx.is_ready() {
                return Some(conns.remove(i).tx);
            }
        }
        None
    }

    /// Closes the connections idle for `idle_timeout` or closed by the
    /// upstream, resizes the pool's room to the load (see [`TargetPool`]),
    /// and returns how many connections stay pooled.
    pub fn sweep(&self, idle_timeout: Duration, max_kept: usize, now: Instant) -> usize {
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        let before = conns.len();
        conns.retain(|c| !c.tx.is_closed() && now.duration_since(c.used) < idle_timeout);
        // Only connections gone idle (or closed) give room back: one in use
        // is out of the stack, so the stack's size says nothing of the load.
        let gone = before - conns.len();
        let wanted = self.turned_away.swap(0, Ordering::Relaxed);
        let room = self.room.load(Ordering::Relaxed);
        let room = if wanted > 0 {
            room + wanted.min(ROOM_GROWTH)
        } else {
            room.saturating_sub(gone).max(BASE_ROOM)
        };
        self.room.store(room.min(max_kept), Ordering::Relaxed);
        conns.len()
    }

    fn put_back(&self, tx: SendRequest<ForwardBody>, max_kept: usize, now: Instant) {
        let room = self.room.load(Ordering::Relaxed).min(max_kept);
        let mut conns = self.conns.lock().unwrap_or_else(PoisonError::into_inner);
        if conns.len() < room {
            conns.push(Pooled { tx, used: now });
        } else {
            // Dropped: the connection closes after this exchange; the next
            // sweep makes room if this keeps happening.
            self.turned_away.fetch_add(1, Ordering::Relaxed);
        }
    }

    async fn connect(
        &self,
        connector: &Connector,
        timeout: Duration,
    ) -> Result<SendRequest<ForwardBody>, SendError> {
        let mut c = connector.clone();
        let io = tokio::time::timeout(timeout, async {
            std::future::poll_fn(|cx| c.poll_ready(cx)).await?;
            c.call(self.target.clone()).await
        })
        .await
        .map_err(|_| SendError::Connect("timed out".into()))?
        .map_err(|e| SendError::Connect(with_causes(&*e)))?;
        let (tx, conn) = http1::Builder::new()
            // As the listener: one contiguous write per request.
            .writev(false)
            .handshake(io)
            .await
            .map_err(|e| SendError::Connect(with_causes(&e)))?;
        tokio::spawn(async move {
            if let Err(e) = conn.with_upgrades().await {
                tracing::debug!(error = %e, "upstream connection ended with an error");
            }
        });
        Ok(tx)
    }
}

/// An error and its causes, `a: b: c`: the connector's own message ("tcp
/// connect error") says nothing an operator can act on without the OS error.
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_connect_error_names_its_os_cause() {
        #[derive(Debug, thiserror::Error)]
        #[error("tcp connect error")]
        struct Outer(#[source] std::io::Error);
        let e = Outer(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        assert_eq!(
            super::with_causes(&e),
            format!(
                "tcp connect error: {}",
                std::io::Error::from(std::io::ErrorKind::ConnectionRefused)
            )
        );
    }
}
