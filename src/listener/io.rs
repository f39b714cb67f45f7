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
    /// Set once a request line with a raw `#` was seen on this connection
    /// (hyper's URI parser drops a fragment without a trace).
    pub target_fragment: AtomicBool,
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
    /// The highest request number whose body has been read to its end (or
    /// that had none). Equal to `requests` when no body is left to read.
    body_done: AtomicU64,
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

    /// Whether every request body started on this connection has been read
    /// to its end, as hyper decoded it. A response can be over while its
    /// request's body is still arriving (an upstream that answers early).
    pub fn bodies_read(&self) -> bool {
        self.body_done.load(Ordering::Relaxed) == self.requests.load(Ordering::Relaxed)
    }

    /// Whether the connection is between messages: every request read to
    /// its end and every response written and flushed. Only then may
    /// hyper's state be set aside without changing what the bytes mean.
    pub fn between_messages(&self) -> bool {
        !self.busy() && self.bodies_read()
    }

    /// Whether hyper is, as far as its IO shows, waiting for the next
    /// request: between messages, and its last read found no bytes.
    pub fn waiting(&self) -> bool {
        self.between_messages() && self.read_blocked.load(Ordering::Relaxed)
    }

    /// Marks a request as started and returns its number on the connection;
    /// the guard marks it finished when dropped (with the response body, or
    /// with the request if it is abandoned). A request without a body is
    /// read to its end already; one with a body is when
    /// [`BodyEnded::body_ended`] is told so.
    pub fn start_request(self: &Arc<Self>, has_body: bool) -> (InFlight, u64) {
        let seq = self.requests.fetch_add(1, Ordering::Relaxed) + 1;
        if !has_body {
            self.body_done.fetch_max(seq, Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        (InFlight(self.clone()), seq)
    }
}

impl crate::context::BodyEnded for ConnShared {
    fn body_ended(&self, seq: u64) {
        // A maximum: a late word about an earlier request changes nothing.
        self.body_done.fetch_max(seq, Ordering::Relaxed);
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
            if me.sniffer.fragment {
                me.shared.target_fragment.store(true, Ordering::Relaxed);
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
///
/// Bodies are skipped by the framing their head gave (a length, or chunks
/// and trailers), so that body bytes which look like header lines are not
/// taken for the next head. When the framing cannot be followed (a value
/// too long to keep), every line is read as a possible header line again,
/// which errs towards refusing.
#[derive(Default)]
pub struct FramingSniffer {
    line: Line,
    line_len: usize,
    /// The current line cannot be a framing header or a blank line (its
    /// first byte says so): its bytes are not kept.
    skipping: bool,
    /// A line longer than `line` was cut: its value is not known.
    cut: bool,
    /// What the current head said so far.
    head: HeadSeen,
    /// What the bytes after the current head are.
    body: Body,
    /// Bytes of [`H2_PREFACE_START`] the stream began with so far, or
    /// [`PREFACE_RULED_OUT`].
    preface: u8,
    done: bool,
    /// The current line is a request line (a head's first line).
    request_line: bool,
    /// A request line held a raw `#`.
    pub fragment: bool,
}

/// The start of the HTTP/2 connection preface, enough to tell it from any
/// HTTP/1 request line.
const H2_PREFACE_START: &[u8] = b"PRI * HTTP/2.0";
/// [`FramingSniffer::preface`] once the stream is known not to be HTTP/2.
const PREFACE_RULED_OUT: u8 = u8::MAX;

/// Bytes of a line kept: enough for `Content-Length:` with any value, and
/// for a chunk size.
const LINE_KEPT: usize = 48;

/// The start of the current line.
struct Line([u8; LINE_KEPT]);

impl Default for Line {
    fn default() -> Self {
        Line([0; LINE_KEPT])
    }
}

/// What a request head has said about its framing so far.
#[derive(Default)]
struct HeadSeen {
    /// It has a non-blank line (blank lines before a request line are not
    /// a head's end).
    started: bool,
    /// `Content-Length` lines seen.
    cls: u8,
    /// The `Content-Length`, when it could be read.
    cl: Option<u64>,
    /// `Transfer-Encoding` seen: whether its last one ends in `chunked`.
    te_chunked: Option<bool>,
}

impl HeadSeen {
    fn in_conflict(&self) -> bool {
        (self.cls > 0 && self.te_chunked.is_some()) || self.cls > 1
    }

    /// What follows the head once it ended.
    fn body(&self) -> Body {
        match (self.te_chunked, self.cl) {
            (Some(true), _) => Body::ChunkSize,
            // hyper refuses a request whose last coding is not chunked:
            // nothing to follow.
            (Some(false), _) => Body::Head,
            (None, Some(n)) if n > 0 => Body::Bytes(n),
            (None, _) => Body::Head,
        }
    }
}

/// Where the sniffer is in the bytes that follow a head.
#[derive(Default, Clone, Copy, PartialEq, Eq, Debug)]
enum Body {
    /// Reading header lines (or a request line).
    #[default]
    Head,
    /// Skipping this many body bytes.
    Bytes(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping a chunk's data and its CRLF.
    ChunkData(u64),
    /// Reading trailer lines, up to the blank line ending the message.
    Trailers,
}

/// Whether a line (the bytes from its start) is `Content-Length:` or
/// `Transfer-Encoding:`, by its first byte before its name.
fn is_framing_line(line: &[u8]) -> bool {
    let starts =
        |name: &[u8]| line.len() >= name.len() && line[..name.len()].eq_ignore_ascii_case(name);
    match line.first() {
        Some(b'c' | b'C') => starts(b"content-length:"),
        Some(b't' | b'T') => starts(b"transfer-encoding:"),
        _ => false,
    }
}

fn parse_u64(b: &[u8], radix: u32) -> Option<u64> {
    let s = std::str::from_utf8(b).ok()?;
    u64::from_str_radix(s, radix).ok()
}

impl FramingSniffer {
    /// A line ended: true if the head it belongs to is now in conflict.
    fn end_line(&mut self) -> bool {
        let line = &self.line.0[..self.line_len];
        let cut = std::mem::take(&mut self.cut);
        self.line_len = 0;
        let blank = line.is_empty() || line == b"\r";
        match self.body {
            Body::ChunkSize => {
                let size = line
                    .split(|b| *b == b';' || *b == b'\r')
                    .next()
                    .unwrap_or(&[]);
                self.body = match parse_u64(size.trim_ascii(), 16) {
                    Some(0) => Body::Trailers,
                    Some(n) if !cut || size.len() < line.len() => {
                        Body::ChunkData(n.saturating_add(2))
                    }
                    // Lost: read lines as header lines from here.
                    _ => Body::Head,
                };
                return false;
            }
            Body::Trailers => {
                if blank {
                    self.body = Body::Head;
                }
                return false;
            }
            Body::Bytes(_) | Body::ChunkData(_) => return false,
            Body::Head => {}
        }
        if blank {
            let head = std::mem::take(&mut self.head);
            if head.started {
                // A head ended; its body follows.
                self.body = head.body();
            }
            return false;
        }
        let head = &mut self.head;
        head.started = true;
        if line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
            head.cls = head.cls.saturating_add(1);
            head.cl = if cut {
                None
            } else {
                parse_u64(line[15..].trim_ascii(), 10)
            };
        } else if line.len() >= 18 && line[..18].eq_ignore_ascii_case(b"transfer-encoding:") {
            let v = line[18..].trim_ascii();
            head.te_chunked =
                Some(!cut && v.len() >= 7 && v[v.len() - 7..].eq_ignore_ascii_case(b"chunked"));
        }
        head.in_conflict()
    }

    /// The common read, checked in one sweep: at the start of a head, whole
    /// heads (ending in a blank line) none of whose lines is a framing
    /// header. Such heads have no body, so the sniffer is at the start of a
    /// head again afterwards, as it was.
    fn whole_heads_without_framing(&self, bytes: &[u8]) -> bool {
        self.line_len == 0
            && !self.skipping
            && self.body == Body::Head
            && !self.head.started
            && bytes.ends_with(b"\r\n\r\n")
            && memchr::memchr(b'#', bytes).is_none()
            && !is_framing_line(bytes)
            && memchr::memchr_iter(b'\n', &bytes[..bytes.len() - 1])
                .all(|i| !is_framing_line(&bytes[i + 1..]))
    }

    /// Feeds the next bytes read; true once a conflicting head was seen.
    pub fn scan(&mut self, bytes: &[u8]) -> bool {
        if self.done {
            return false;
        }
        if self.preface != PREFACE_RULED_OUT && !bytes.is_empty() {
            // HTTP/2 (prior knowledge or ALPN) has no such framing: stop
            // looking once its preface is seen, however its bytes were cut
            // into reads. Until then the bytes are read as HTTP/1 too, which
            // is what they are if the preface is ruled out.
            let matched = usize::from(self.preface);
            let want = &H2_PREFACE_START[matched..];
            let n = want.len().min(bytes.len());
            if bytes[..n] == want[..n] {
                self.preface += n as u8;
                if usize::from(self.preface) == H2_PREFACE_START.len() {
                    self.done = true;
                    return false;
                }
            } else {
                self.preface = PREFACE_RULED_OUT;
            }
        }
        if self.whole_heads_without_framing(bytes) {
            return false;
        }
        let mut rest = bytes;
        loop {
            if let Body::Bytes(n) | Body::ChunkData(n) = self.body {
                let skip = usize::try_from(n).unwrap_or(usize::MAX).min(rest.len());
                rest = &rest[skip..];
                let left = n - skip as u64;
                self.body = match (self.body, left) {
                    (Body::Bytes(_), 0) => Body::Head,
                    (Body::ChunkData(_), 0) => Body::ChunkSize,
                    (Body::Bytes(_), _) => Body::Bytes(left),
                    _ => Body::ChunkData(left),
                };
                if rest.is_empty() {
                    return false;
                }
            }
            // Only each line's first bytes matter: jump from newline to newline.
            let (part, next) = match memchr::memchr(b'\n', rest) {
                Some(i) => (&rest[..i], Some(&rest[i + 1..])),
                None => (rest, None),
            };
            if self.request_line && memchr::memchr(b'#', part).is_some() {
                self.fragment = true;
            }
            if !self.skipping {
                if self.line_len == 0
                    && self.body == Body::Head
                    && part
                        .first()
                        .is_some_and(|b| !matches!(b, b'c' | b'C' | b't' | b'T' | b'\r'))
                {
                    // The request line, `Host:` and most others.
                    if !self.head.started {
                        self.request_line = true;
                        self.fragment |= memchr::memchr(b'#', part).is_some();
                    }
                    self.skipping = true;
                    self.head.started = true;
                } else {
                    let room = LINE_KEPT - self.line_len;
                    let take = part.len().min(room);
                    self.cut |= take < part.len();
                    self.line.0[self.line_len..self.line_len + take].copy_from_slice(&part[..take]);
                    self.line_len += take;
                }
            }
            let Some(next) = next else { break };
            self.request_line = false;
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
    fn sniffer_sweeps_whole_plain_heads_and_still_sees_framing_after_them() {
        let mut s = FramingSniffer::default();
        let plain = b"GET /a HTTP/1.1\r\nHost: a\r\nCookie: x\r\nTE: gzip\r\n\r\n";
        assert!(s.whole_heads_without_framing(plain));
        assert!(!s.scan(plain));
        let two = b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n";
        assert!(!s.scan(two));
        let framed = b"POST / HTTP/1.1\r\nHost: a\r\ncontent-length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(!s.whole_heads_without_framing(framed));
        assert!(s.scan(framed));
    }

    #[test]
    fn sniffer_does_not_sweep_the_rest_of_a_head_it_is_in() {
        let mut s = FramingSniffer::default();
        assert!(!s.scan(b"POST / HTTP/1.1\r\nContent-Length: 40\r\n"));
        // The head's end: its Content-Length says 40 body bytes follow.
        let rest = b"Host: a\r\n\r\n";
        assert!(!s.whole_heads_without_framing(rest));
        assert!(!s.scan(rest));
        // A body that reads like a conflicting head is skipped, not read.
        assert!(!s.scan(b"Content-Length: 1\r\nContent-Length: 2\r\n"));
    }

    #[test]
    fn sniffer_sees_a_raw_fragment_in_a_request_line_only() {
        let mut s = FramingSniffer::default();
        assert!(!s.scan(b"GET /a HTTP/1.1\r\nCookie: x#y\r\n\r\n"));
        assert!(!s.fragment, "a # in a header value is no fragment");
        let mut s = FramingSniffer::default();
        let body = "{\"#\":1}";
        s.scan(
            format!(
                "POST /a HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        );
        assert!(!s.fragment, "nor in a body");
        for req in [
            &b"GET /a#b HTTP/1.1\r\nHost: a\r\n\r\n"[..],
            b"GET /a?q#x HTTP/1.1\r\n\r\n",
        ] {
            for cut in 0..req.len() {
                let mut s = FramingSniffer::default();
                s.scan(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
                s.scan(&req[..cut]);
                s.scan(&req[cut..]);
                assert!(s.fragment, "cut at {cut}");
            }
        }
    }

    #[test]
    fn sniffer_knows_an_http2_preface_cut_into_reads() {
        let stream = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nContent-Length: 2\r\n";
        for cut in 0..stream.len() {
            let mut s = FramingSniffer::default();
            assert!(
                !s.scan(&stream[..cut]) && !s.scan(&stream[cut..]),
                "cut at {cut}"
            );
        }
        let mut s = FramingSniffer::default();
        s.scan(b"PRI");
        assert!(s.scan(b"NT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"));
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

    #[test]
    fn sniffer_skips_a_body_of_known_length_that_looks_like_headers() {
        let mut s = FramingSniffer::default();
        let body = "Content-Length: 1\nContent-Length: 2\nTransfer-Encoding: x\n";
        let req = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        // Split in every place: the framing is followed across reads.
        for cut in 0..req.len() {
            let mut s2 = FramingSniffer::default();
            assert!(!s2.scan(&req.as_bytes()[..cut]), "cut at {cut}");
            assert!(!s2.scan(&req.as_bytes()[cut..]), "cut at {cut}");
        }
        assert!(!s.scan(req.as_bytes()));
        // The next head is read as a head again.
        assert!(s.scan(b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx"));
    }

    #[test]
    fn sniffer_skips_chunks_and_trailers() {
        let chunk = "Content-Length: 1\r\nContent-Length: 2\r\n";
        let req = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n\
             {:x};ext=1\r\n{chunk}\r\n0\r\nContent-Length: 9\r\nContent-Length: 9\r\n\r\n",
            chunk.len()
        );
        for cut in 0..req.len() {
            let mut s = FramingSniffer::default();
            assert!(!s.scan(&req.as_bytes()[..cut]), "cut at {cut}");
            assert!(!s.scan(&req.as_bytes()[cut..]), "cut at {cut}");
            assert_eq!(s.body, Body::Head, "cut at {cut}");
        }
        let mut s = FramingSniffer::default();
        assert!(!s.scan(req.as_bytes()));
        assert!(
            s.scan(b"GET / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
        );
    }

    #[test]
    fn sniffer_reads_lines_again_when_it_loses_the_framing() {
        // A length it cannot keep: the body is read as header lines, as
        // before bodies were followed (refusing rather than missing).
        let long = format!("Content-Length: {}5\r\n", " ".repeat(60));
        let mut s = FramingSniffer::default();
        assert!(
            s.scan(
                format!("POST / HTTP/1.1\r\n{long}\r\nContent-Length: 1\r\nContent-Length: 1\r\n")
                    .as_bytes()
            )
        );
    }
}
