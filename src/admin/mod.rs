//! The admin listener: key management API, `/metrics`, `/healthz`, `/readyz`.
//! (stub — being written)
pub mod ops;
pub mod self_service;

use crate::server::App;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// Serves the admin listener until shutdown.
pub async fn serve(_l: TcpListener, _app: Arc<App>, _tls: Option<crate::listener::TlsReloader>, mut shutdown: watch::Receiver<bool>) {
    let _ = shutdown.changed().await;
}
