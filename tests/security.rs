//! Security: one spelling per request, one answer per request, no key
//! leaves the gateway. Each module is one class of attack, tried against
//! the real gateway with real upstreams on loopback.

mod common;

#[path = "security/paths.rs"]
mod paths;

#[path = "security/framing.rs"]
mod framing;

#[path = "security/credentials.rs"]
mod credentials;

#[path = "security/self_service.rs"]
mod self_service;

#[path = "security/answers.rs"]
mod answers;
