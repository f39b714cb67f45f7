//! The byte stream under hyper: counts activity so the serving loop can tell
//! an idle connection from a busy one, replays bytes read before hyper took
//! over, and watches request heads for framing conflicts hyper hides.

use bytes::{Buf, Bytes};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// State one connection's IO, service and serving loop share. Everything is
/// touched from the connection's own task (HTTP/1), so relaxed atomics are
/// only there to make the type `Sync`.
#[derive(Default)]
pub struct ConnShared {
    /// Set once a conflicting request head was seen on this connection.
    pub framing_conflict: AtomicBool,
    /// Bumped by every read that returned bytes and every write.
    activity: AtomicU64,
    /// Bytes were written that a flush has not yet confirmed.
    dirty: AtomicBool,
    /// Requests whose response body is not finished yet.
    in_flight: AtomicU32,
    /// Requests started on this connection.
    requests: AtomicU64,
    /// The last read of the socket found nothing to read.
    read_blocked: AtomicBool,
    /// The last request started had a body (which may still be arriving).
    had_body: AtomicBool,
}

impl ConnShared {
    /// A counter that changes whenever bytes move either way.
    pub fn activity(&self) -> u64 {
        self.activity.load(Ordering::Relaxed)
    }

    /// Requests started so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Whether a request is being served or a response is still unflushed.
    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::Relaxed) > 0 || self.dirty.load(Ordering::Relaxed)
    }

    /// Whether hyper is, as far as its IO shows, waiting for the next
    /// request: nothing in flight, everything flushed, and its last read
    /// found no bytes after a request that had no body to finish reading.
    pub fn waiting(&self) -> bool {
        !self.busy()
            && self.read_blocked.load(Ordering::Relaxed)
            && !self.had_body.load(Ordering::Relaxed)
    }

    /// Marks a request as started; the guard marks it finished when dropped
    /// (with the response body, or with the request if it is abandoned).
    pub fn start_request(self: &Arc<Self>, has_body: bool) -> InFlight {
        self.had_body.store(has_body, Ordering::Relaxed);
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

/// One request in flight on a connection (see [`ConnShared::start_request`]).
pub struct InFlight(Arc<ConnShared>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Readiness of the socket under a stream, awaited without a buffer while a
/// connection is parked.
pub trait Socket: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The TCP socket carrying the stream.
    fn tcp(&self) -> &TcpStream;
    /// Whether bytes are already waiting above the socket, so that its
    /// readiness says nothing.
    fn buffered(&mut self) -> bool {
        false
    }
}

impl Socket for TcpStream {
    fn tcp(&self) -> &TcpStream {
        self
    }
}

impl Socket for tokio_rustls::server::TlsStream<TcpStream> {
    fn tcp(&self) -> &TcpStream {
        self.get_ref().0
    }
    /// The handshake's last read often brings the first request with it:
    /// rustls holds it decrypted while the socket has nothing left to read.
    fn buffered(&mut self) -> bool {
        match self.get_mut().1.process_new_packets() {
            Ok(state) => state.plaintext_bytes_to_read() > 0,
            // Let the session read and report the TLS error.
            Err(_) => true,
        }
    }
}

/// A connection's stream as hyper sees it.
pub struct ConnIo<T> {
    inner: T,
    shared: Arc<ConnShared>,
    /// Bytes already read from `inner` that hyper has not seen yet.
    replay: Bytes,
    sniffer: FramingSniffer,
}

impl<T: Socket> ConnIo<T> {
    /// Wraps a connection's stream.
    pub fn new(inner: T, shared: Arc<ConnShared>) -> Self {
        ConnIo {
            inner,
            shared,
            replay: Bytes::new(),
            sniffer: FramingSniffer::default(),
        }
    }

    /// The wrapped stream.
    pub fn get_mut(&mut self) -> &mut T {
        &mut self.inner
    }

    /// Bytes to hand out before reading the stream again.
    pub fn set_replay(&mut self, bytes: Bytes) {
        self.replay = bytes;
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for ConnIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let me = &mut *self;
        if !me.replay.is_empty() {
            // These bytes went through the sniffer when they were first read.
            let n = me.replay.len().min(buf.remaining());
            buf.put_slice(&me.replay[..n]);
            me.replay.advance(n);
            if me.replay.is_empty() {
                // An emptied `Bytes` still holds its buffer.
                me.replay = Bytes::new();
            }
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut me.inner).poll_read(cx, buf);
        me.shared
            .read_blocked
            .store(r.is_pending(), Ordering::Relaxed);
        if matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            me.shared.activity.fetch_add(1, Ordering::Relaxed);
            if me.sniffer.scan(&buf.filled()[before..]) {
                me.shared.framing_conflict.store(true, Ordering::Relaxed);
            }
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> ConnIo<T> {
    fn wrote(&self, r: &Poll<std::io::Result<usize>>) {
        if matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.shared.activity.fetch_add(1, Ordering::Relaxed);
            self.shared.dirty.store(true, Ordering::Relaxed);
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for ConnIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        r
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        // hyper flushes its own buffer before flushing the stream, so a
        // finished flush means nothing the client is owed sits in hyper.
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        if matches!(r, Poll::Ready(Ok(()))) {
            self.shared.dirty.store(false, Ordering::Relaxed);
        }
        r
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        r
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Watches the bytes of an HTTP/1 connection for a request head carrying both
/// `Content-Length` and `Transfer-Encoding`, or `Content-Length` twice. hyper
/// resolves those silently (it drops or merges `Content-Length`), but a
/// gateway must refuse them: a server behind another proxy could frame the
/// same bytes differently.
#[derive(Default)]
pub struct FramingSniffer {
    line: [u8; 20],
    line_len: usize,
    /// The current line cannot be a framing header or a blank line (its
    /// first byte says so): its bytes are not kept.
    skipping: bool,
    saw_cl: u8,
    saw_te: bool,
    started: bool,
    done: bool,
}

impl FramingSniffer {
    /// A line ended: true if the head it belongs to is now in conflict.
    fn end_line(&mut self) -> bool {
        let line = &self.line[..self.line_len];
        self.line_len = 0;
        if line.is_empty() || line == b"\r" {
            // A blank line ends a head; the next head starts afresh.
            self.saw_cl = 0;
            self.saw_te = false;
        } else if line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            self.saw_cl = self.saw_cl.saturating_add(1);
        } else if line.len() >= 18 && line[..18].eq_ignore_ascii_case(b"transfer-encoding:") {
            self.saw_te = true;
        }
        (self.saw_cl > 0 && self.saw_te) || self.saw_cl > 1
    }

    /// Feeds the next bytes read; true once a conflicting head was seen.
    pub fn scan(&mut self, bytes: &[u8]) -> bool {
        if self.done {
            return false;
        }
        if !self.started && !bytes.is_empty() {
            self.started = true;
            // HTTP/2 (prior knowledge or ALPN) has no such framing: stop looking.
            if bytes.starts_with(b"PRI * HTTP/2.0") {
                self.done = true;
                return false;
            }
        }
        let mut rest = bytes;
        loop {
            // Only each line's first bytes matter: jump from newline to newline.
            let (part, next) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            if !self.skipping {
                if self.line_len == 0
                    && part
                        .first()
                        .is_some_and(|b| !matches!(b, b'c' | b'C' | b't' | b'T' | b'\r'))
                {
                    // The request line, `Host:` and most others.
                    self.skipping = true;
                } else {
                    let room = self.line.len() - self.line_len;
                    let take = part.len().min(room);
                    self.line[self.line_len..self.line_len + take].copy_from_slice(&part[..take]);
                    self.line_len += take;
                }
            }
            let Some(next) = next else { break };
            if self.skipping {
                // Neither blank nor framing: the head's state is unchanged.
                self.skipping = false;
            } else if self.end_line() {
                self.done = true;
                return true;
            }
            rest = next;
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffer_flags_content_length_with_transfer_encoding_across_reads() {
        let mut s = FramingSniffer::default();
        assert!(!s.scan(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Len"));
        assert!(s.scan(b"gth: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"));
    }

    #[test]
    fn sniffer_flags_two_content_lengths() {
        let mut s = FramingSniffer::default();
        assert!(s.scan(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello",
        ));
    }

    #[test]
    fn sniffer_ignores_separate_requests_and_http2() {
        let mut s = FramingSniffer::default();
        assert!(!s.scan(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"));
        let mut s = FramingSniffer::default();
        assert!(!s.scan(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n"
        ));
    }
}
