//! API keys: the record, the secret format, and the [`KeyStore`] trait with
//! its two backends (`sqlite` for one node, `redis` for many).
//!
//! Only the SHA-256 digest of a secret is ever stored; lookups go by digest.
//! Nothing here ever logs a secret. `auth` sits in front of this with a local
//! cache, so the request path never touches a store on a cached key.

pub mod format;
pub mod redis;
pub mod sqlite;

pub use format::{KeyFormat, ParsedKey, digest_of};

use crate::time::Timestamp;
use futures_util::future::BoxFuture;
use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

/// SHA-256 digest of a secret key.
pub type Digest = [u8; 32];

/// `live` or `test`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    /// Production traffic.
    Live,
    /// Test traffic: goes to an upstream's `test_targets` when set.
    Test,
}

impl Environment {
    /// `"live"` or `"test"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Environment::Live => "live",
            Environment::Test => "test",
        }
    }

    /// Parses `live` / `test`.
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "live" => Some(Environment::Live),
            "test" => Some(Environment::Test),
            _ => None,
        }
    }
}

/// `active` or `disabled`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyStatus {
    /// The key authenticates.
    Active,
    /// The key exists but is refused with `API_KEY_INACTIVE`.
    Disabled,
}

/// A key as stored and as shown by the admin API. Never holds the secret or
/// its digest.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KeyRecord {
    /// `key_…`, not secret.
    pub id: String,
    /// The workspace (tenant) the key belongs to.
    pub workspace: String,
    /// A human name.
    #[serde(default)]
    pub name: String,
    /// Kind name from `[key_kinds.*]`, e.g. `secret` or `public`.
    pub kind: String,
    /// `live` or `test`.
    pub environment: Environment,
    /// The secret's prefix, e.g. `sk_live_`.
    pub prefix: String,
    /// Last four characters of the secret, to tell keys apart.
    pub last4: String,
    /// Permissions held (`*` and `prefix.*` wildcards allowed).
    #[serde(default)]
    pub permissions: Vec<String>,
    /// Plan name from `[plans.*]`; none means `[plans.default]`.
    #[serde(default)]
    pub plan: Option<String>,
    /// `active` or `disabled`.
    pub status: KeyStatus,
    /// Creation time.
    pub created_at: Timestamp,
    /// Expiry, if any.
    #[serde(default)]
    pub expires_at: Option<Timestamp>,
    /// Last time the key authenticated a request (batched, approximate).
    #[serde(default)]
    pub last_used_at: Option<Timestamp>,
    /// CIDRs the key may be used from; empty means anywhere.
    #[serde(default)]
    pub allowed_ips: Vec<IpNet>,
    /// Hosts the key may be used from (checked against `Origin`/`Referer`); empty means any.
    #[serde(default)]
    pub allowed_origins: Vec<String>,
    /// Route names the key may call; empty means any.
    #[serde(default)]
    pub allowed_routes: Vec<String>,
    /// Free-form JSON object.
    #[serde(default)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
}

/// One page of a listing.
#[derive(Clone, Debug, Default)]
pub struct KeyPage {
    /// Records in id order.
    pub data: Vec<KeyRecord>,
    /// Opaque cursor for the next page, if there is one.
    pub next_cursor: Option<String>,
}

/// A change another writer made, seen by a store's watcher.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KeyEvent {
    /// This key id changed (patched, rotated, revoked): drop it from caches.
    Changed(String),
    /// Changes may have been missed (reconnect, external write): drop everything.
    Flush,
}

/// What a store call can run into.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or answered with an error.
    #[error("key store unavailable: {0}")]
    Unavailable(String),
    /// The call did not finish within the store timeout.
    #[error("key store call timed out")]
    Timeout,
    /// A stored record could not be decoded.
    #[error("corrupt record in key store: {0}")]
    Corrupt(String),
    /// The id or digest already exists.
    #[error("conflict: {0}")]
    Conflict(String),
    /// The store answers but refuses writes (Redis out of memory or a
    /// read-only replica). Reads still work.
    #[error("key store refuses writes: {0}")]
    ReadOnly(String),
    /// Not asked: the store failed recently and has not answered since
    /// (the key cache's circuit breaker is open).
    #[error("key store failing; not asked until it answers again")]
    CircuitOpen,
    /// The store URL or options are invalid.
    #[error("invalid store configuration: {0}")]
    Config(String),
}

/// Result of a store call.
pub type StoreResult<T> = Result<T, StoreError>;

/// A key store backend. Every call is bounded by the store's timeout; every
/// write returns only once the store holds it durably.
pub trait KeyStore: Send + Sync + 'static {
    /// The record whose current (or still-in-grace) secret has this digest.
    fn lookup<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<Option<KeyRecord>>>;
    /// The record with this id.
    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<KeyRecord>>>;
    /// Records in id order, optionally of one workspace, after `cursor`.
    fn list<'a>(
        &'a self,
        workspace: Option<&'a str>,
        limit: usize,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, StoreResult<KeyPage>>;
    /// Stores a new record with the digest of its secret.
    fn create<'a>(
        &'a self,
        record: &'a KeyRecord,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<()>>;
    /// Replaces an existing record (same id). `false` when the id is unknown.
    fn update<'a>(&'a self, record: &'a KeyRecord) -> BoxFuture<'a, StoreResult<bool>>;
    /// Gives the key a new secret: `record` carries the new `last4`; the
    /// old digests keep working for `grace` (zero: removed at once).
    /// `false` when the id is unknown.
    fn rotate<'a>(
        &'a self,
        record: &'a KeyRecord,
        new_digest: &'a Digest,
        grace: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>>;
    /// Deletes the key and all its digests. `false` when the id is unknown.
    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<bool>>;
    /// Records `last_used_at` for a batch of keys (unknown ids are skipped).
    fn touch<'a>(&'a self, used: &'a [(String, Timestamp)]) -> BoxFuture<'a, StoreResult<()>>;
    /// Checks the store answers.
    fn ping(&self) -> BoxFuture<'_, StoreResult<()>>;
    /// Checks the store answers and accepts writes (readiness). By default
    /// the same as [`KeyStore::ping`].
    fn ready(&self) -> BoxFuture<'_, StoreResult<()>> {
        self.ping()
    }
    /// Starts watching for changes made by other writers (other gateway
    /// instances, the CLI) and sends them on `tx` until it is closed.
    fn watch(&self, tx: tokio::sync::mpsc::UnboundedSender<KeyEvent>);
}

/// A shared handle on the configured store.
pub type SharedStore = Arc<dyn KeyStore>;

/// Opens the store named by a URL: `sqlite://path`, `redis://…`,
/// `redis+cluster://h1:p1,h2:p2`.
pub async fn open(url: &str, timeout: Duration) -> StoreResult<SharedStore> {
    if let Some(path) = url.strip_prefix("sqlite://") {
        Ok(Arc::new(sqlite::SqliteStore::open(path, timeout)?))
    } else if url.starts_with("redis://")
        || url.starts_with("rediss://")
        || url.starts_with("redis+cluster://")
    {
        Ok(Arc::new(redis::RedisStore::open(url, timeout).await?))
    } else {
        Err(StoreError::Config(format!(
            "unsupported store URL scheme in {:?}: use sqlite://, redis:// or redis+cluster://",
            redact_url(url)
        )))
    }
}

/// A store URL with any password replaced by `***`, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***@{}", &url[..s], &url[at + 1..]),
        _ => url.to_string(),
    }
}

/// A new key id: `key_` and 20 base62 characters (not secret).
pub fn new_key_id() -> String {
    let mut s = String::with_capacity(24);
    s.push_str("key_");
    format::push_random_base62(&mut s, 20);
    s
}
