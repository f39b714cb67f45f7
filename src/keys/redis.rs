//! Redis key store: shared by many gateway instances, on one Redis node
//! (`redis://host:port/db`, `rediss://…`) or a Redis Cluster
//! (`redis+cluster://h1:p1,h2:p2`).
//!
//! Layout (hash tags keep a key's record and its digest set in one slot):
//!
//! | key | type | holds |
//! |---|---|---|
//! | `pc:key:{<id>}` | string | the record's JSON |
//! | `pc:keydigs:{<id>}` | set | hex digests of the key's secrets (current and in grace) |
//! | `pc:dig:<hex digest>` | string | the key id; old secrets in grace carry a PEXPIRE |
//! | `pc:ws:{<workspace>}` | sorted set | ids of the workspace, score 0 (lexicographic) |
//! | `pc:ids` | sorted set | all ids, score 0 |
//!
//! A digest authenticates only while its record exists, so a digest left
//! dangling by an interrupted write never lets anything in.
//!
//! Writes: on one node every write is one MULTI/EXEC (rotate is one Lua
//! script, because it must read the old digests and change them in the same
//! atomic step). A cluster cannot run a transaction across slots, so there
//! the same commands run one after the other, in an order where every prefix
//! is safe (see each method). After each write the key id is PUBLISHed on
//! [`CHANNEL`] so other instances drop it from their caches.

use super::*;
use crate::time::Timestamp;
use ::redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use ::redis::cluster::ClusterClientBuilder;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{Cmd, FromRedisValue, Pipeline, RedisError, RedisFuture, RedisResult, Script, Value};
use futures_util::StreamExt;
use std::future::Future;
use tokio::sync::mpsc::UnboundedSender;

/// Pub/sub channel carrying the id of every changed key.
pub const CHANNEL: &str = "portcullis:keys";

/// Sorted set of every key id.
const IDS_KEY: &str = "pc:ids";
/// Prefix of the digest → id strings.
const DIGEST_PREFIX: &str = "pc:dig:";
/// Written (with a short expiry) by the readiness check.
const READY_KEY: &str = "pc:ready";

/// First and longest wait between resubscribe attempts of the watcher.
const WATCH_BACKOFF_MIN: Duration = Duration::from_millis(100);
const WATCH_BACKOFF_MAX: Duration = Duration::from_secs(1);
/// How often the watcher pings its subscription, to notice a dead peer that
/// never closed the TCP connection.
const WATCH_PING_EVERY: Duration = Duration::from_secs(5);
/// Records touched at once by `touch`.
const TOUCH_CONCURRENCY: usize = 32;

/// One-node rotation, atomically: refuse an unknown id or a taken digest,
/// end or shorten the grace of every old digest, store the record and the
/// new digest, and publish. Old digest keys are not declared in KEYS because
/// they come from the set; that is fine on one node (scripts only have to
/// declare keys for cluster routing, and this script never runs on a cluster).
///
/// KEYS: record, digest set, new digest. ARGV: record JSON, id, new digest
/// hex, grace ms (0: remove at once), digest key prefix, channel.
const ROTATE_LUA: &str = r"
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('EXISTS', KEYS[3]) == 1 then return -1 end
local grace = tonumber(ARGV[4])
for _, hex in ipairs(redis.call('SMEMBERS', KEYS[2])) do
  local k = ARGV[5] .. hex
  if grace <= 0 then
    redis.call('DEL', k)
    redis.call('SREM', KEYS[2], hex)
  else
    local ttl = redis.call('PTTL', k)
    if ttl == -2 then
      redis.call('SREM', KEYS[2], hex)
    elseif ttl == -1 or ttl > grace then
      redis.call('PEXPIRE', k, grace)
    end
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('PUBLISH', ARGV[6], ARGV[2])
return 1
";

/// Starts (or shortens, never extends) the grace period of one old digest.
/// One key, so it routes on a cluster. Returns 0 when the digest is gone.
///
/// KEYS: digest. ARGV: grace ms.
const SHORTEN_LUA: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl == -2 then return 0 end
if ttl == -1 or ttl > tonumber(ARGV[1]) then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return 1
";

/// Compare-and-set of one record: `touch` rewrites a record only if nobody
/// changed it since it was read, so it never undoes a concurrent update
/// (e.g. re-enabling a key an operator just disabled).
///
/// KEYS: record. ARGV: JSON as read, new JSON.
const CAS_LUA: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2])
  return 1
end
return 0
";

fn record_key(id: &str) -> String {
    format!("pc:key:{{{id}}}")
}

fn digests_key(id: &str) -> String {
    format!("pc:keydigs:{{{id}}}")
}

fn workspace_key(workspace: &str) -> String {
    format!("pc:ws:{{{workspace}}}")
}

fn hex(digest: &Digest) -> String {
    use std::fmt::Write;
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

fn digest_key_hex(hex: &str) -> String {
    format!("{DIGEST_PREFIX}{hex}")
}

/// The connection: one node behind a reconnecting manager, or a cluster.
#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Single(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipeline: &'a Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Single(c) => c.req_packed_commands(pipeline, offset, count),
            Conn::Cluster(c) => c.req_packed_commands(pipeline, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Single(c) => c.get_db(),
            Conn::Cluster(c) => c.get_db(),
        }
    }
}

/// Redis-backed key store (one node or a cluster).
pub struct RedisStore {
    conn: Conn,
    /// Where the watcher subscribes: the node, or every cluster node to try
    /// in turn. Holds credentials: never log.
    pubsub: Vec<::redis::Client>,
    /// The URL without its password, for messages.
    redacted: String,
    timeout: Duration,
    rotate_script: Script,
    shorten_script: Script,
    cas_script: Script,
}

/// Maps a Redis error. Redis error texts carry no command arguments, so no
/// digest or password ends up in a message.
fn redis_err(e: RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else if matches!(e.code(), Some("OOM" | "READONLY")) {
        StoreError::ReadOnly(format!("redis: {e}"))
    } else {
        StoreError::Unavailable(format!("redis: {e}"))
    }
}

fn encode(record: &KeyRecord) -> StoreResult<String> {
    serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode key {}: {e}", record.id)))
}

fn decode(id: &str, json: &str) -> StoreResult<KeyRecord> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("key {id}: {e}")))
}

/// `redis+cluster://[user:pass@]h1:p1,h2:p2[/…]` → `redis://[user:pass@]h:p`
/// per node.
fn cluster_node_urls(rest: &str) -> StoreResult<Vec<String>> {
    let (auth, hosts) = match rest.rfind('@') {
        Some(at) => (&rest[..=at], &rest[at + 1..]),
        None => ("", rest),
    };
    // A trailing `/0` or `?…` means nothing on a cluster (one database).
    let hosts = hosts.split(['/', '?']).next().unwrap_or("");
    let nodes: Vec<String> = hosts
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(|h| format!("redis://{auth}{h}"))
        .collect();
    if nodes.is_empty() {
        return Err(StoreError::Config(
            "redis+cluster:// URL names no node (want redis+cluster://h1:p1,h2:p2)".into(),
        ));
    }
    Ok(nodes)
}

impl RedisStore {
    /// Connects to the Redis node or cluster named by `url`. Fails with
    /// `Unavailable` if it cannot connect within `timeout` (the gateway does
    /// not start on an unreachable store), `Config` on a malformed URL.
    pub async fn open(url: &str, timeout: Duration) -> StoreResult<Self> {
        let redacted = redact_url(url);
        let bad_url =
            |e: RedisError| StoreError::Config(format!("invalid Redis URL {redacted}: {e}"));
        let (conn, pubsub) = if let Some(rest) = url.strip_prefix("redis+cluster://") {
            let nodes = cluster_node_urls(rest)?;
            let clients = nodes
                .iter()
                .map(|u| ::redis::Client::open(u.as_str()))
                .collect::<RedisResult<Vec<_>>>()
                .map_err(bad_url)?;
            let client = ClusterClientBuilder::new(nodes)
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(bad_url)?;
            let conn = connect(&redacted, timeout, client.get_async_connection()).await?;
            (Conn::Cluster(conn), clients)
        } else {
            let client = ::redis::Client::open(url).map_err(bad_url)?;
            let config = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_max_delay(Duration::from_secs(1));
            let conn = connect(
                &redacted,
                timeout,
                client.get_connection_manager_with_config(config),
            )
            .await?;
            (Conn::Single(conn), vec![client])
        };
        Ok(RedisStore {
            conn,
            pubsub,
            redacted,
            timeout,
            rotate_script: Script::new(ROTATE_LUA),
            shorten_script: Script::new(SHORTEN_LUA),
            cas_script: Script::new(CAS_LUA),
        })
    }

    fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    /// Bounds a whole store call by the timeout. On a cluster a write cut
    /// short stops between two of its ordered steps, which is a safe state
    /// by construction; on one node MULTI/EXEC either ran or did not.
    async fn bounded<T>(&self, f: impl Future<Output = StoreResult<T>>) -> StoreResult<T> {
        tokio::time::timeout(self.timeout, f)
            .await
            .unwrap_or(Err(StoreError::Timeout))
    }

    async fn query<T: FromRedisValue>(&self, cmd: &Cmd) -> StoreResult<T> {
        let mut conn = self.conn.clone();
        cmd.query_async(&mut conn).await.map_err(redis_err)
    }

    /// Runs commands as one MULTI/EXEC (one node only).
    async fn transaction(&self, cmds: Vec<Cmd>) -> StoreResult<Vec<Value>> {
        let mut pipe = ::redis::pipe();
        pipe.atomic();
        for c in cmds {
            pipe.add_command(c);
        }
        let mut conn = self.conn.clone();
        pipe.query_async(&mut conn).await.map_err(redis_err)
    }

    /// Runs commands one after the other, in order (cluster).
    async fn in_order(&self, cmds: Vec<Cmd>) -> StoreResult<()> {
        for c in cmds {
            self.query::<Value>(&c).await?;
        }
        Ok(())
    }

    /// Cluster writes publish after the fact: the write already happened, so
    /// a failed publish is logged, not returned (the cache TTL is the backstop).
    async fn publish_after(&self, id: &str) {
        if let Err(e) = self
            .query::<Value>(::redis::cmd("PUBLISH").arg(CHANNEL).arg(id))
            .await
        {
            tracing::warn!(key_id = %id, error = %e, "key changed but the change could not be published; other instances see it after their cache TTL");
        }
    }

    async fn get_json(&self, id: &str) -> StoreResult<Option<String>> {
        self.query(::redis::cmd("GET").arg(record_key(id))).await
    }

    /// Index changes when a record moves to another workspace (normally
    /// never: workspaces are fixed at creation).
    fn reindex(id: &str, old: Option<&KeyRecord>, new: &KeyRecord) -> Vec<Cmd> {
        match old {
            Some(old) if old.workspace == new.workspace => Vec::new(),
            _ => {
                let mut cmds = Vec::new();
                if let Some(old) = old {
                    cmds.push(
                        ::redis::cmd("ZREM")
                            .arg(workspace_key(&old.workspace))
                            .arg(id)
                            .clone(),
                    );
                }
                cmds.push(
                    ::redis::cmd("ZADD")
                        .arg(workspace_key(&new.workspace))
                        .arg(0)
                        .arg(id)
                        .clone(),
                );
                cmds.push(::redis::cmd("ZADD").arg(IDS_KEY).arg(0).arg(id).clone());
                cmds
            }
        }
    }

    async fn do_create(&self, record: &KeyRecord, digest: &Digest) -> StoreResult<()> {
        let id = record.id.as_str();
        let json = encode(record)?;
        let dhex = hex(digest);
        let dkey = digest_key_hex(&dhex);
        let conflict_id = || StoreError::Conflict(format!("key id {id} already exists"));
        let conflict_digest =
            || StoreError::Conflict("a key with this secret already exists".into());
        let indexes = vec![
            ::redis::cmd("SADD").arg(digests_key(id)).arg(&dhex).clone(),
            ::redis::cmd("ZADD")
                .arg(workspace_key(&record.workspace))
                .arg(0)
                .arg(id)
                .clone(),
            ::redis::cmd("ZADD").arg(IDS_KEY).arg(0).arg(id).clone(),
        ];
        if self.is_cluster() {
            // Record first (NX claims the id), then the indexes, then the
            // digest last: until that last step the key cannot authenticate,
            // and if the digest is taken everything before is undone.
            let claimed: Option<String> = self
                .query(::redis::cmd("SET").arg(record_key(id)).arg(&json).arg("NX"))
                .await?;
            if claimed.is_none() {
                return Err(conflict_id());
            }
            self.in_order(indexes).await?;
            let set: Option<String> = self
                .query(::redis::cmd("SET").arg(&dkey).arg(id).arg("NX"))
                .await?;
            if set.is_none() {
                self.in_order(vec![
                    ::redis::cmd("ZREM").arg(IDS_KEY).arg(id).clone(),
                    ::redis::cmd("ZREM")
                        .arg(workspace_key(&record.workspace))
                        .arg(id)
                        .clone(),
                    ::redis::cmd("DEL")
                        .arg(record_key(id))
                        .arg(digests_key(id))
                        .clone(),
                ])
                .await?;
                return Err(conflict_digest());
            }
            self.publish_after(id).await;
            Ok(())
        } else {
            // MULTI cannot branch on SET NX, so check first. Ids and secrets
            // are random (≥ 120 bits), so only a retried create can collide,
            // never two racing ones.
            let (id_taken, digest_taken): (bool, bool) = {
                let mut pipe = ::redis::pipe();
                pipe.exists(record_key(id)).exists(&dkey);
                let mut conn = self.conn.clone();
                pipe.query_async(&mut conn).await.map_err(redis_err)?
            };
            if id_taken {
                return Err(conflict_id());
            }
            if digest_taken {
                return Err(conflict_digest());
            }
            let mut cmds = vec![::redis::cmd("SET").arg(record_key(id)).arg(&json).clone()];
            cmds.extend(indexes);
            cmds.push(::redis::cmd("SET").arg(&dkey).arg(id).clone());
            cmds.push(::redis::cmd("PUBLISH").arg(CHANNEL).arg(id).clone());
            self.transaction(cmds).await.map(drop)
        }
    }

    async fn do_update(&self, record: &KeyRecord) -> StoreResult<bool> {
        let id = record.id.as_str();
        let json = encode(record)?;
        let Some(old_json) = self.get_json(id).await? else {
            return Ok(false);
        };
        // An undecodable old record still gets replaced; only its old
        // workspace index entry cannot be removed.
        let old = decode(id, &old_json).ok();
        let reindex = Self::reindex(id, old.as_ref(), record);
        // XX: never resurrects a key deleted since the read above.
        let set = ::redis::cmd("SET")
            .arg(record_key(id))
            .arg(&json)
            .arg("XX")
            .clone();
        if self.is_cluster() {
            let done: Option<String> = self.query(&set).await?;
            if done.is_none() {
                return Ok(false);
            }
            self.in_order(reindex).await?;
            self.publish_after(id).await;
            Ok(true)
        } else {
            let mut cmds = vec![set];
            cmds.extend(reindex);
            cmds.push(::redis::cmd("PUBLISH").arg(CHANNEL).arg(id).clone());
            let out = self.transaction(cmds).await?;
            Ok(!matches!(out.first(), None | Some(Value::Nil)))
        }
    }

    async fn do_rotate(
        &self,
        record: &KeyRecord,
        new_digest: &Digest,
        grace: Duration,
    ) -> StoreResult<bool> {
        let id = record.id.as_str();
        let json = encode(record)?;
        let new_hex = hex(new_digest);
        let new_key = digest_key_hex(&new_hex);
        // Redis expiries are milliseconds; a sub-millisecond grace is one.
        let grace_ms: u64 = if grace.is_zero() {
            0
        } else {
            grace.as_millis().clamp(1, u64::MAX as u128) as u64
        };
        let Some(old_json) = self.get_json(id).await? else {
            return Ok(false);
        };
        let old = decode(id, &old_json).ok();
        let reindex = Self::reindex(id, old.as_ref(), record);
        let mut conn = self.conn.clone();
        if !self.is_cluster() {
            let outcome: i64 = self
                .rotate_script
                .key(record_key(id))
                .key(digests_key(id))
                .key(&new_key)
                .arg(&json)
                .arg(id)
                .arg(&new_hex)
                .arg(grace_ms)
                .arg(DIGEST_PREFIX)
                .arg(CHANNEL)
                .invoke_async(&mut conn)
                .await
                .map_err(redis_err)?;
            match outcome {
                0 => return Ok(false),
                -1 => {
                    return Err(StoreError::Conflict(
                        "a key with this secret already exists".into(),
                    ));
                }
                _ => {}
            }
            if !reindex.is_empty() {
                self.transaction(reindex).await?;
            }
            return Ok(true);
        }
        // Cluster order: the record (XX: never resurrects a deleted key),
        // then the new secret, then the old secrets end or start their
        // grace. The new secret works before the old ones stop, so there is
        // never a moment with no working secret; a rotation cut short leaves
        // the old secret working too, and the caller, who got an error,
        // retries.
        let done: Option<String> = self
            .query(::redis::cmd("SET").arg(record_key(id)).arg(&json).arg("XX"))
            .await?;
        if done.is_none() {
            return Ok(false);
        }
        let set: Option<String> = self
            .query(::redis::cmd("SET").arg(&new_key).arg(id).arg("NX"))
            .await?;
        if set.is_none() {
            return Err(StoreError::Conflict(
                "a key with this secret already exists".into(),
            ));
        }
        self.query::<Value>(::redis::cmd("SADD").arg(digests_key(id)).arg(&new_hex))
            .await?;
        let members: Vec<String> = self
            .query(::redis::cmd("SMEMBERS").arg(digests_key(id)))
            .await?;
        for old_hex in members.iter().filter(|h| **h != new_hex) {
            let old_key = digest_key_hex(old_hex);
            let gone = if grace_ms == 0 {
                self.query::<Value>(::redis::cmd("DEL").arg(&old_key))
                    .await?;
                true
            } else {
                let alive: i64 = self
                    .shorten_script
                    .key(&old_key)
                    .arg(grace_ms)
                    .invoke_async(&mut conn)
                    .await
                    .map_err(redis_err)?;
                alive == 0
            };
            if gone {
                self.query::<Value>(::redis::cmd("SREM").arg(digests_key(id)).arg(old_hex))
                    .await?;
            }
        }
        self.in_order(reindex).await?;
        self.publish_after(id).await;
        Ok(true)
    }

    async fn do_delete(&self, id: &str) -> StoreResult<bool> {
        let old_json = self.get_json(id).await?;
        let members: Vec<String> = self
            .query(::redis::cmd("SMEMBERS").arg(digests_key(id)))
            .await?;
        let old = old_json.as_deref().and_then(|j| decode(id, j).ok());
        // Digests first, so the key stops authenticating before anything
        // else goes; then the record and its digest set (one slot); then
        // the indexes. Runs even when the record is already gone, to clean
        // up after an interrupted delete.
        let mut cmds: Vec<Cmd> = members
            .iter()
            .map(|h| ::redis::cmd("DEL").arg(digest_key_hex(h)).clone())
            .collect();
        cmds.push(
            ::redis::cmd("DEL")
                .arg(record_key(id))
                .arg(digests_key(id))
                .clone(),
        );
        if let Some(old) = &old {
            cmds.push(
                ::redis::cmd("ZREM")
                    .arg(workspace_key(&old.workspace))
                    .arg(id)
                    .clone(),
            );
        }
        cmds.push(::redis::cmd("ZREM").arg(IDS_KEY).arg(id).clone());
        if self.is_cluster() {
            self.in_order(cmds).await?;
            self.publish_after(id).await;
        } else {
            cmds.push(::redis::cmd("PUBLISH").arg(CHANNEL).arg(id).clone());
            self.transaction(cmds).await?;
        }
        Ok(old_json.is_some())
    }

    async fn do_list(
        &self,
        workspace: Option<&str>,
        limit: usize,
        cursor: Option<&str>,
    ) -> StoreResult<KeyPage> {
        // A zero limit would hand out a cursor that never advances.
        let limit = limit.max(1);
        let index = workspace
            .map(workspace_key)
            .unwrap_or_else(|| IDS_KEY.to_string());
        let mut page = KeyPage::default();
        let mut after = cursor.map(str::to_owned);
        // Loops only when ids in the index have no record (a write cut short
        // on a cluster); each round moves `after` forward.
        loop {
            let want = limit - page.data.len();
            let min = after
                .as_ref()
                .map_or_else(|| "-".to_string(), |c| format!("({c}"));
            // One id more than wanted tells whether another page exists.
            let ids: Vec<String> = self
                .query(
                    ::redis::cmd("ZRANGEBYLEX")
                        .arg(&index)
                        .arg(min)
                        .arg("+")
                        .arg("LIMIT")
                        .arg(0)
                        .arg(want + 1),
                )
                .await?;
            let more = ids.len() > want;
            let batch = &ids[..ids.len().min(want)];
            if !batch.is_empty() {
                let mut mget = ::redis::cmd("MGET");
                for id in batch {
                    mget.arg(record_key(id));
                }
                let jsons: Vec<Option<String>> = self.query(&mget).await?;
                for (id, json) in batch.iter().zip(jsons) {
                    if let Some(json) = json {
                        page.data.push(decode(id, &json)?);
                    }
                }
            }
            after = batch.last().cloned().or(after);
            if !more {
                return Ok(page);
            }
            if page.data.len() == limit {
                page.next_cursor = after;
                return Ok(page);
            }
        }
    }

    async fn do_touch(&self, used: &[(String, Timestamp)]) -> StoreResult<()> {
        let results: Vec<StoreResult<()>> = futures_util::stream::iter(used.iter().cloned())
            .map(|(id, at)| async move { self.touch_one(&id, at).await })
            .buffer_unordered(TOUCH_CONCURRENCY)
            .collect()
            .await;
        results.into_iter().collect()
    }

    async fn touch_one(&self, id: &str, at: Timestamp) -> StoreResult<()> {
        let Some(json) = self.get_json(id).await? else {
            return Ok(());
        };
        let mut record = match decode(id, &json) {
            Ok(r) => r,
            Err(e) => {
                // `get` reports it; one bad record must not fail the batch.
                tracing::warn!(key_id = %id, error = %e, "skipping last_used_at of an undecodable key");
                return Ok(());
            }
        };
        if record.last_used_at.is_some_and(|prev| prev >= at) {
            return Ok(()); // batches may arrive out of order; never go back
        }
        record.last_used_at = Some(at);
        let new_json = encode(&record)?;
        let mut conn = self.conn.clone();
        // If the CAS loses to a concurrent write, this use is simply not
        // recorded: last_used_at is approximate, and the next batch will.
        let _swapped: i64 = self
            .cas_script
            .key(record_key(id))
            .arg(&json)
            .arg(&new_json)
            .invoke_async(&mut conn)
            .await
            .map_err(redis_err)?;
        Ok(())
    }
}

/// Connects within `timeout`, naming the store without its password.
async fn connect<T>(
    redacted: &str,
    timeout: Duration,
    f: impl Future<Output = RedisResult<T>>,
) -> StoreResult<T> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(conn)) => Ok(conn),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!(
            "cannot connect to {redacted}: {e}"
        ))),
        Err(_) => Err(StoreError::Unavailable(format!(
            "cannot connect to {redacted}: no answer within {timeout:?}"
        ))),
    }
}

impl KeyStore for RedisStore {
    fn lookup<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<Option<KeyRecord>>> {
        Box::pin(self.bounded(async move {
            let id: Option<String> = self
                .query(::redis::cmd("GET").arg(digest_key_hex(&hex(digest))))
                .await?;
            let Some(id) = id else { return Ok(None) };
            // No record: created or deleted half-way (cluster); not a key.
            match self.get_json(&id).await? {
                Some(json) => decode(&id, &json).map(Some),
                None => Ok(None),
            }
        }))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<KeyRecord>>> {
        Box::pin(self.bounded(async move {
            self.get_json(id)
                .await?
                .map(|json| decode(id, &json))
                .transpose()
        }))
    }

    fn list<'a>(
        &'a self,
        workspace: Option<&'a str>,
        limit: usize,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, StoreResult<KeyPage>> {
        Box::pin(self.bounded(self.do_list(workspace, limit, cursor)))
    }

    fn create<'a>(
        &'a self,
        record: &'a KeyRecord,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(self.bounded(self.do_create(record, digest)))
    }

    fn update<'a>(&'a self, record: &'a KeyRecord) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(self.bounded(self.do_update(record)))
    }

    fn rotate<'a>(
        &'a self,
        record: &'a KeyRecord,
        new_digest: &'a Digest,
        grace: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(self.bounded(self.do_rotate(record, new_digest, grace)))
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        Box::pin(self.bounded(self.do_delete(id)))
    }

    fn touch<'a>(&'a self, used: &'a [(String, Timestamp)]) -> BoxFuture<'a, StoreResult<()>> {
        Box::pin(self.bounded(self.do_touch(used)))
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(
            self.bounded(async move { self.query::<Value>(&::redis::cmd("PING")).await.map(drop) }),
        )
    }

    /// A write that expires: Redis out of memory (`maxmemory` with
    /// `noeviction`) still answers PING and reads, but refuses this.
    fn ready(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.bounded(async move {
            self.query::<Value>(
                ::redis::cmd("SET")
                    .arg(READY_KEY)
                    .arg(crate::time::Timestamp::now().0)
                    .arg("PX")
                    .arg(10_000),
            )
            .await
            .map(drop)
        }))
    }

    /// Subscribes to [`CHANNEL`] and sends [`KeyEvent::Changed`] for every
    /// published id. After every (re)subscription it sends
    /// [`KeyEvent::Flush`], since changes may have been missed while it was
    /// not subscribed; a broken subscription is retried with backoff
    /// (100 ms doubling to 1 s), on a cluster cycling through the nodes
    /// (PUBLISH reaches every node of a cluster, so any one will do).
    /// Stops when `tx` is closed.
    fn watch(&self, tx: UnboundedSender<KeyEvent>) {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                "Redis key store watch() called outside a tokio runtime; changes by other instances will not be seen"
            );
            return;
        };
        rt.spawn(watch_channel(
            self.pubsub.clone(),
            self.redacted.clone(),
            self.timeout,
            tx,
        ));
    }
}

/// The watcher loop of [`RedisStore::watch`].
async fn watch_channel(
    clients: Vec<::redis::Client>,
    redacted: String,
    timeout: Duration,
    tx: UnboundedSender<KeyEvent>,
) {
    let mut backoff = WATCH_BACKOFF_MIN;
    let mut node = 0usize;
    let mut healthy = true;
    loop {
        if clients.is_empty() || tx.is_closed() {
            return;
        }
        let client = &clients[node % clients.len()];
        match subscribe(client, timeout).await {
            Ok(pubsub) => {
                if !healthy {
                    tracing::info!(store = %redacted, "key change subscription restored");
                }
                backoff = WATCH_BACKOFF_MIN;
                if tx.send(KeyEvent::Flush).is_err() {
                    return;
                }
                match forward(pubsub, timeout, &tx).await {
                    Forward::ReceiverGone => return,
                    Forward::Broken(why) => {
                        tracing::warn!(store = %redacted, error = %why, "key change subscription lost; resubscribing");
                        healthy = false;
                    }
                }
            }
            Err(e) => {
                // Once per outage, not once per attempt.
                if healthy {
                    tracing::warn!(store = %redacted, error = %e, "cannot subscribe to key changes; retrying");
                }
                healthy = false;
                node = node.wrapping_add(1);
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = tx.closed() => return,
        }
        backoff = (backoff * 2).min(WATCH_BACKOFF_MAX);
    }
}

async fn subscribe(
    client: &::redis::Client,
    timeout: Duration,
) -> RedisResult<::redis::aio::PubSub> {
    let attempt = async {
        let mut pubsub = client.get_async_pubsub().await?;
        pubsub.subscribe(CHANNEL).await?;
        Ok(pubsub)
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(RedisError::from(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "subscribe timed out",
        ))),
    }
}

enum Forward {
    ReceiverGone,
    Broken(String),
}

/// Forwards messages until the subscription breaks or `tx` closes.
async fn forward(
    pubsub: ::redis::aio::PubSub,
    timeout: Duration,
    tx: &UnboundedSender<KeyEvent>,
) -> Forward {
    let (mut sink, mut stream) = pubsub.split();
    let mut ping = tokio::time::interval(WATCH_PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ping.tick().await; // the first tick is immediate; we just subscribed
    loop {
        tokio::select! {
            msg = stream.next() => match msg {
                Some(msg) => match msg.get_payload::<String>() {
                    Ok(id) => {
                        if tx.send(KeyEvent::Changed(id)).is_err() {
                            return Forward::ReceiverGone;
                        }
                    }
                    // Someone else's junk on our channel: drop everything
                    // rather than guess.
                    Err(_) => {
                        if tx.send(KeyEvent::Flush).is_err() {
                            return Forward::ReceiverGone;
                        }
                    }
                },
                None => return Forward::Broken("connection closed".into()),
            },
            _ = ping.tick() => {
                match tokio::time::timeout(timeout, sink.ping::<Value>()).await {
                    Ok(Ok(_)) => {}
                    Ok(Err(e)) => return Forward::Broken(e.to_string()),
                    Err(_) => return Forward::Broken("ping timed out".into()),
                }
            }
            _ = tx.closed() => return Forward::ReceiverGone,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cluster_urls_keep_auth_and_drop_path() {
        assert_eq!(
            cluster_node_urls("u:p@h1:7000,h2:7001/0").unwrap(),
            vec![
                "redis://u:p@h1:7000".to_string(),
                "redis://u:p@h2:7001".to_string()
            ]
        );
        assert_eq!(
            cluster_node_urls("h1:7000").unwrap(),
            vec!["redis://h1:7000".to_string()]
        );
        assert!(matches!(cluster_node_urls(""), Err(StoreError::Config(_))));
    }

    #[test]
    fn record_and_digest_set_share_a_slot() {
        let id = "key_abc";
        let tag = |k: &str| k[k.find('{').unwrap()..=k.find('}').unwrap()].to_string();
        assert_eq!(tag(&record_key(id)), tag(&digests_key(id)));
        assert_eq!(hex(&[0xab; 32]).len(), 64);
    }

    #[tokio::test]
    async fn open_fails_fast_when_nothing_listens() {
        // Port 1 on loopback: nothing listens, connect is refused at once.
        let t = Duration::from_millis(500);
        let started = std::time::Instant::now();
        let err = RedisStore::open("redis://:hunter2@127.0.0.1:1/0", t)
            .await
            .err()
            .unwrap();
        assert!(started.elapsed() < Duration::from_secs(3));
        let msg = err.to_string();
        assert!(matches!(err, StoreError::Unavailable(_)), "{msg}");
        assert!(!msg.contains("hunter2"), "{msg}");
    }
}
