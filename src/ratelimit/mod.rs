//! PLACEHOLDER written by the lead so the crate compiles while the rate
//! limiter is being written: replace this whole file (keep the API shape).
use crate::config::{Limit, RateLimitSettings, Scope};
use crate::context::RateVerdict;

/// Errors starting the limiter.
#[derive(Debug, thiserror::Error)]
pub enum RateLimitError {
    /// Redis could not be reached.
    #[error("redis: {0}")]
    Redis(String),
}
/// Counters.
#[derive(Debug, Default, Clone, Copy)]
pub struct RateLimitStats {
    /// Calls.
    pub redis_calls: u64,
    /// Errors.
    pub redis_errors: u64,
    /// Switches.
    pub fallback_switches: u64,
}
/// One request's limits.
pub struct LimitRequest<'a> {
    /// Key id.
    pub key_id: &'a str,
    /// Workspace.
    pub workspace: &'a str,
    /// Route.
    pub route: &'a str,
    /// Limits.
    pub limits: &'a [Limit],
}
/// Decision.
pub enum Decision {
    /// No limits.
    Unlimited,
    /// Admitted.
    Allowed(RateVerdict),
    /// Refused.
    Refused {
        /// Verdict.
        verdict: RateVerdict,
        /// Seconds.
        retry_after_secs: u64,
        /// Scope.
        scope: Scope,
    },
}
/// Limiter.
pub struct RateLimiter;
impl RateLimiter {
    /// New.
    pub async fn new(_s: RateLimitSettings, _u: Option<&str>) -> Result<Self, RateLimitError> {
        Ok(RateLimiter)
    }
    /// Check.
    pub async fn check(&self, _r: &LimitRequest<'_>) -> Decision {
        Decision::Unlimited
    }
    /// Fallback.
    pub fn fallback_active(&self) -> bool {
        false
    }
    /// Stats.
    pub fn stats(&self) -> RateLimitStats {
        RateLimitStats::default()
    }
}
