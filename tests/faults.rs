//! Faults: the gateway keeps its promises when its neighbours misbehave.
//! Each module injects one family of faults into the real gateway (key
//! store, upstreams, the config file, the process itself) and asserts the
//! invariant that must hold while it lasts and after it ends.
//! `docs/operations.md` ("Failure modes") lists each fault with what the
//! gateway does and which metric and log line show it.

mod common;

#[path = "faults/config.rs"]
mod config;

#[path = "faults/store.rs"]
mod store;

#[path = "faults/redis.rs"]
mod redis;

#[path = "faults/upstream.rs"]
mod upstream;

#[path = "faults/process.rs"]
mod process;

#[path = "faults/logs.rs"]
mod logs;

#[path = "faults/framing.rs"]
mod framing;
