//! The floor under portcullis' per-request cost: a bare reverse proxy on the
//! same parts and in the same shape as the gateway (one current-thread tokio
//! worker, hyper's HTTP/1 server with `writev(false)`, keep-alive upstream
//! connections on hyper's client connection API, each driven by its own
//! task), with none of the gateway's work: no guard, routing, auth, limits,
//! header rewriting, request ids, metrics or logs.
//!
//! `bench/bench.py` runs it beside nginx and portcullis, so the share of the
//! cost that is hyper and tokio, and the share that is the gateway, show in
//! one run. It is a measuring stick, not a product: requests go to one
//! upstream as they came, and a failed upstream exchange is a bare 502.
//!
//! ```text
//! cargo run --release --example hyper_floor -- 127.0.0.1:8080 127.0.0.1:8081
//! ```

use http_body_util::{BodyExt, Empty, combinators::BoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::cell::RefCell;
use std::net::SocketAddr;
use std::rc::Rc;
use tokio::net::{TcpListener, TcpStream};

type Body = BoxBody<Bytes, hyper::Error>;

/// Ready upstream connections of the one worker thread.
#[derive(Default)]
struct Pool {
    ready: RefCell<Vec<SendRequest<Incoming>>>,
}

impl Pool {
    async fn send(&self, upstream: SocketAddr, req: Request<Incoming>) -> Response<Body> {
        let taken = {
            let mut ready = self.ready.borrow_mut();
            ready.retain(|tx| !tx.is_closed());
            // Busy ones (an exchange still on them) stay for later.
            ready
                .iter()
                .rposition(SendRequest::is_ready)
                .map(|i| ready.swap_remove(i))
        };
        let tx = match taken {
            Some(tx) => Some(tx),
            None => connect(upstream).await,
        };
        let Some(mut tx) = tx else {
            return bad_gateway();
        };
        let response = tx.try_send_request(req);
        // Back at once, as portcullis does: ready again when hyper is done.
        self.ready.borrow_mut().push(tx);
        match response.await {
            Ok(r) => r.map(BodyExt::boxed),
            Err(_) => bad_gateway(),
        }
    }
}

async fn connect(upstream: SocketAddr) -> Option<SendRequest<Incoming>> {
    let stream = TcpStream::connect(upstream).await.ok()?;
    stream.set_nodelay(true).ok()?;
    let (tx, conn) = hyper::client::conn::http1::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await
        .ok()?;
    tokio::task::spawn_local(async move {
        let _ = conn.await;
    });
    Some(tx)
}

fn bad_gateway() -> Response<Body> {
    let mut r = Response::new(Empty::new().map_err(|never| match never {}).boxed());
    *r.status_mut() = StatusCode::BAD_GATEWAY;
    r
}

fn main() {
    let mut args = std::env::args().skip(1);
    let (Some(listen), Some(upstream)) = (args.next(), args.next()) else {
        eprintln!("usage: hyper_floor LISTEN_ADDR UPSTREAM_ADDR");
        std::process::exit(2);
    };
    let (Ok(listen), Ok(upstream)) = (listen.parse::<SocketAddr>(), upstream.parse()) else {
        eprintln!("hyper_floor: addresses are ip:port");
        std::process::exit(2);
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("hyper_floor: runtime: {e}");
            std::process::exit(1);
        }
    };
    let local = tokio::task::LocalSet::new();
    let served = local.block_on(&rt, serve(listen, upstream));
    if let Err(e) = served {
        eprintln!("hyper_floor: {e}");
        std::process::exit(1);
    }
}

async fn serve(listen: SocketAddr, upstream: SocketAddr) -> std::io::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let pool = Rc::new(Pool::default());
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        let pool = pool.clone();
        tokio::task::spawn_local(async move {
            let service = hyper::service::service_fn(move |mut req: Request<Incoming>| {
                let pool = pool.clone();
                async move {
                    // Origin form is what the upstream expects; hyper keeps
                    // the path and query as the client sent them.
                    let pq = req.uri().path_and_query().cloned();
                    if let Some(pq) = pq {
                        *req.uri_mut() = pq.into();
                    }
                    Ok::<_, std::convert::Infallible>(pool.send(upstream, req).await)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .writev(false)
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}
