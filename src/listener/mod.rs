//! Stage one: accept connections (plain or rustls TLS 1.2/1.3 with ALPN h2
//! and http/1.1), apply connection-level limits, and hand each request to
//! the pipeline. Never looks inside a request; stops accepting on shutdown
//! and lets open connections finish within the grace period.

mod conn;
mod io;

/// The HTTP/1 framing-conflict detector under every plain connection, public
/// only so that the fuzz targets can drive it.
#[doc(hidden)]
pub use io::FramingSniffer;

use crate::config::TlsFiles;
use crate::context::ConnInfo;
use crate::server::App;
use arc_swap::ArcSwap;
use rustls::ServerConfig;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::sync::Arc;
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
    // Each connection holds a receiver: turning this true asks them to finish,
    // and the sender sees them all gone when they have.
    let (stop, _) = watch::channel(false);
    loop {
        let (tcp, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning,
                    // and say so once per interval rather than 20 times a second.
                    static REPEATS: crate::logging::Repeats =
                        crate::logging::Repeats::new(|suppressed| {
                            tracing::warn!(suppressed, "accept failed: repeats summarised")
                        });
                    if let Some(suppressed) = REPEATS.admit() {
                        tracing::warn!(error = %e, suppressed, "accept failed");
                    }
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
        let open = Open::new(permit, app.clone());
        let conn_stop = stop.subscribe();
        let conn = ConnInfo {
            peer,
            tls: tls.is_some(),
            framing_conflict: false,
            target_fragment: false,
        };
        // Two kinds of task, so that a plain connection's task is not sized
        // for TLS state it never has.
        match tls.as_ref().map(TlsReloader::acceptor) {
            None => {
                tokio::spawn(async move {
                    conn::serve(tcp, None, conn, open.app.clone(), conn_stop).await;
                    drop(open);
                });
            }
            Some(acceptor) => {
                tokio::spawn(async move {
                    let timeout = open.app.snapshot().config.server.header_read_timeout;
                    // Boxed: a handshake's state is large and over once connected.
                    match tokio::time::timeout(timeout, Box::pin(acceptor.accept(tcp))).await {
                        Ok(Ok(stream)) => {
                            // ALPN decides; without it, look at the first bytes.
                            let h2 = stream.get_ref().1.alpn_protocol().map(|p| p == b"h2");
                            conn::serve(stream, h2, conn, open.app.clone(), conn_stop).await
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(open);
                });
            }
        }
        // One accept per turn, like nginx without `multi_accept`: the work
        // already accepted runs before the next connection is taken, so a
        // burst of connections queues in the kernel (which costs nothing
        // here) rather than as half-served requests in the gateway.
        tokio::task::yield_now().await;
    }
    drop(listener);
    let _ = stop.send(true);
    if tokio::time::timeout(grace, stop.closed()).await.is_err() {
        tracing::warn!("shutdown grace period over; closing the remaining connections");
    }
}

/// An open public connection: holds its slot under the connection cap and
/// counts in the open-connections gauge until dropped.
struct Open {
    app: Arc<App>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl Open {
    fn new(permit: tokio::sync::OwnedSemaphorePermit, app: Arc<App>) -> Self {
        app.metrics.open_connections.inc();
        Open {
            app,
            _permit: permit,
        }
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.app.metrics.open_connections.dec();
    }
}
