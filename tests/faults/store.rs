//! The key store stalls or refuses writes: the breaker serves stale-cached
//! keys at once, refuses uncached ones at once, and readiness tells the truth.
