//! Self-service key endpoints on the public listener. (stub — being written)
use crate::config::Config;
use crate::context::{RequestCtx, ResponseBody};
use crate::error::GatewayError;
use crate::server::App;
use http::{Request, Response};
use hyper::body::Incoming;
use std::net::IpAddr;

/// Whether a canonical path is a self-service path.
pub fn handles(path: &str) -> bool {
    path == "/v1/api-keys" || path.starts_with("/v1/api-keys/")
}

/// Serves a self-service request.
pub async fn handle(_req: Request<Incoming>, _ctx: &mut RequestCtx, _cfg: &Config, _app: &App, _ip: IpAddr) -> Result<Response<ResponseBody>, GatewayError> {
    Err(GatewayError::NotFound)
}
