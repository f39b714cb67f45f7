//! portcullis: an API gateway that authenticates every request's API key,
//! checks route permissions and rate limits, and forwards what it allows.
//!
//! The modules follow the request path, in order:
//! `listener` → `guard` → `router` → `auth` (+ `keys` store backends) →
//! `ratelimit` → `proxy`, all driven by `pipeline`, which is the one place
//! that turns errors into responses and writes the access log.
//! `admin` serves the operator API, `config` parses and compiles the TOML
//! file, `metrics` holds the Prometheus registry.
#![forbid(unsafe_code)]

pub mod admin;
pub mod auth;
pub mod cli;
pub mod config;
pub mod context;
pub mod demo;
pub mod error;
pub mod guard;
pub mod keys;
pub mod listener;
pub mod logging;
pub mod metrics;
pub mod pipeline;
pub mod proxy;
pub mod ratelimit;
pub mod reload;
pub mod router;
pub mod server;
pub mod time;
