//! Stage one: accept connections (plain or rustls TLS 1.2/1.3 with ALPN h2
//! and http/1.1), apply connection-level limits, and hand each request to
//! the pipeline. Never looks inside a request; stops accepting on shutdown
//! and lets open connections finish within the grace period.

use crate::config::TlsFiles;
use crate::context::ConnInfo;
use crate::server::App;
use arc_swap::ArcSwap;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// A TLS config that can be re-read from its files (certificate rotation):
/// new handshakes use the new certificate, open connections keep theirs.
#[derive(Clone)]
pub struct TlsReloader {
    files: Arc<ArcSwap<TlsFiles>>,
    config: Arc<ArcSwap<ServerConfig>>,
}

/// Loads a certificate chain and key into a rustls server config (TLS 1.2
/// and 1.3 only, ALPN h2 then http/1.1).
pub fn load_tls(files: &TlsFiles) -> Result<ServerConfig, String> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    if certs.is_empty() {
        return Err(format!("{}: no certificate found", files.cert.display()));
    }
    let key = PrivateKeyDer::from_pem_file(&files.key)
        .map_err(|e| format!("{}: {e}", files.key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut cfg = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| e.to_string())?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("{}: {e}", files.cert.display()))?;
    cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(cfg)
}

impl TlsReloader {
    /// Loads the files once.
    pub fn new(files: &TlsFiles) -> Result<Self, String> {
        let cfg = load_tls(files)?;
        Ok(TlsReloader {
            files: Arc::new(ArcSwap::from_pointee(files.clone())),
            config: Arc::new(ArcSwap::from_pointee(cfg)),
        })
    }

    /// Re-reads the certificate and key (possibly from new paths). On error
    /// the old ones stay in use.
    pub fn reload(&self, files: &TlsFiles) -> Result<(), String> {
        let cfg = load_tls(files)?;
        self.config.store(Arc::new(cfg));
        self.files.store(Arc::new(files.clone()));
        Ok(())
    }

    /// The files in use.
    pub fn files(&self) -> Arc<TlsFiles> {
        self.files.load_full()
    }

    pub(crate) fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }
}

/// Serves the public listener until `shutdown` turns true, then drains.
pub async fn serve_public(
    listener: TcpListener,
    app: Arc<App>,
    tls: Option<TlsReloader>,
    mut shutdown: watch::Receiver<bool>,
) {
    let grace = app.snapshot().config.server.shutdown_grace;
    // One cap for all workers.
    let slots = app.conn_slots.clone();
    let graceful = GracefulShutdown::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = shutdown.changed() => break,
        };
        // At the connection cap (shared by all workers), this worker waits
        // for a slot before serving or accepting more; the kernel queue holds
        // the rest. Accepting first keeps an idle worker from holding a slot.
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            _ = shutdown.changed() => break,
        };
        let _ = tcp.set_nodelay(true);
        let app = app.clone();
        let watcher = graceful.watcher();
        let acceptor = tls.as_ref().map(TlsReloader::acceptor);
        tokio::spawn(async move {
            let _permit = permit;
            app.metrics.open_connections.inc();
            let conn = ConnInfo {
                peer,
                tls: acceptor.is_some(),
                framing_conflict: false,
            };
            match acceptor {
                None => serve_connection(tcp, conn, app.clone(), watcher).await,
                Some(acceptor) => {
                    let timeout = app.snapshot().config.server.header_read_timeout;
                    match tokio::time::timeout(timeout, acceptor.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, conn, app.clone(), watcher).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            app.metrics.open_connections.dec();
        });
    }
    drop(listener);
    if tokio::time::timeout(grace, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
    }
}

/// HTTP/1.1 and HTTP/2 on one connection, with the limits of `[server]`.
async fn serve_connection<I>(
    io: I,
    conn: ConnInfo,
    app: Arc<App>,
    watcher: hyper_util::server::graceful::Watcher,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let s = app.snapshot();
    let cfg = &s.config.server;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        // hyper starts this clock when the connection goes idle, so it bounds
        // both a slow request head and an idle keep-alive connection.
        .header_read_timeout(cfg.header_read_timeout.min(cfg.keepalive_timeout))
        .max_buf_size(cfg.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(cfg.http2_max_concurrent_streams)
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(cfg.keepalive_timeout / 2)
        .keep_alive_timeout(cfg.header_read_timeout);
    drop(s);
    let io = FramingSniffer::new(io);
    let conflict = io.flag.clone();
    let svc_app = app.clone();
    let service = service_fn(move |req| {
        let app = svc_app.clone();
        let conn = ConnInfo {
            framing_conflict: conflict.load(Ordering::Relaxed),
            ..conn
        };
        async move { Ok::<_, Infallible>(crate::pipeline::handle(req, conn, &app).await) }
    });
    let fut = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    if let Err(e) = watcher.watch(fut.into_owned()).await {
        tracing::debug!(peer = %conn.peer, error = %e, "connection ended with an error");
    }
}

/// Watches the bytes of an HTTP/1 connection for a request head carrying both
/// `Content-Length` and `Transfer-Encoding`, or `Content-Length` twice. hyper
/// resolves those silently (it drops or merges `Content-Length`), but a
/// gateway must refuse them: a server behind another proxy could frame the
/// same bytes differently.
pub struct FramingSniffer<T> {
    inner: T,
    /// Set once a conflicting head was seen on this connection.
    pub flag: Arc<AtomicBool>,
    line: [u8; 20],
    line_len: usize,
    saw_cl: u8,
    saw_te: bool,
    started: bool,
    done: bool,
}

impl<T> FramingSniffer<T> {
    /// Wraps a connection.
    pub fn new(inner: T) -> Self {
        FramingSniffer {
            inner,
            flag: Arc::new(AtomicBool::new(false)),
            line: [0; 20],
            line_len: 0,
            saw_cl: 0,
            saw_te: false,
            started: false,
            done: false,
        }
    }

    fn scan(&mut self, bytes: &[u8]) {
        if !self.started && !bytes.is_empty() {
            self.started = true;
            // HTTP/2 (prior knowledge or ALPN) has no such framing: stop looking.
            if bytes.starts_with(b"PRI * HTTP/2.0") {
                self.done = true;
                return;
            }
        }
        for &b in bytes {
            if b == b'\n' {
                let line = &self.line[..self.line_len];
                let blank = line.is_empty() || line == b"\r";
                if blank {
                    self.saw_cl = 0;
                    self.saw_te = false;
                } else if line.len() >= 15 && line[..15].eq_ignore_ascii_case(b"content-length:") {
                    self.saw_cl = self.saw_cl.saturating_add(1);
                } else if line.len() >= 18 && line[..18].eq_ignore_ascii_case(b"transfer-encoding:")
                {
                    self.saw_te = true;
                }
                if (self.saw_cl > 0 && self.saw_te) || self.saw_cl > 1 {
                    self.flag.store(true, Ordering::Relaxed);
                    self.done = true;
                    return;
                }
                self.line_len = 0;
            } else if self.line_len < self.line.len() {
                self.line[self.line_len] = b;
                self.line_len += 1;
            }
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FramingSniffer<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if !self.done && matches!(r, Poll::Ready(Ok(()))) {
            let me = &mut *self;
            me.scan(&buf.filled()[before..]);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FramingSniffer<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sniffer_flags_content_length_with_transfer_encoding_across_reads() {
        let mut s = FramingSniffer::new(());
        s.scan(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Len");
        s.scan(b"gth: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert!(s.flag.load(Ordering::Relaxed));
    }

    #[test]
    fn sniffer_flags_two_content_lengths() {
        let mut s = FramingSniffer::new(());
        s.scan(
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\ncontent-length: 5\r\n\r\nhello",
        );
        assert!(s.flag.load(Ordering::Relaxed));
    }

    #[test]
    fn sniffer_ignores_separate_requests_and_http2() {
        let mut s = FramingSniffer::new(());
        s.scan(b"POST / HTTP/1.1\r\nContent-Length: 0\r\n\r\nPOST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n");
        assert!(!s.flag.load(Ordering::Relaxed));
        let mut s = FramingSniffer::new(());
        s.scan(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\nContent-Length: 1\r\nTransfer-Encoding: x\r\n");
        assert!(!s.flag.load(Ordering::Relaxed));
    }
}
