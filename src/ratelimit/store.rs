//! The Redis side of the rate limiter: connection (single node through a
//! `ConnectionManager`, or Redis Cluster), state key names, and the two Lua
//! scripts. Every script reads the clock with Redis `TIME`, so all gateway
//! instances share one clock for the windows.
//!
//! State of one (limit, subject) is a hash `{w, c, p}` (window index,
//! current count, previous count) under
//! `pc:rl:{<key_id>}:<scope>:<requests>:<per_ms>[:<route>]`, or
//! `pc:rl:{ws:<workspace>}:workspace:<requests>:<per_ms>` for workspace
//! limits; it expires `2 × per` after its last increment. The hash tag puts
//! all of a key's limits in one cluster slot, and a workspace's in another.

use super::table::{KeyView, LimitId};
use super::window::WindowState;
use crate::config::Scope;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{Script, ScriptInvocation};
use std::fmt::Write as _;
use std::time::Duration;

/// Checks every limit passed and, only if all admit, counts one request in
/// each. KEYS: the state hashes. ARGV per key: `requests, per_ms,
/// delta_window, delta_curr, delta_prev`: the caller's admits not yet in
/// Redis (hybrid mode; zeros otherwise), added first whatever the outcome.
/// Returns `{now_ms, admitted (0|1), then w, c, p per key}`: the state after
/// counting when admitted, else as read (rolled to now, deltas added).
const CHECK_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local n = #KEYS
local ws, cs, ps, pers, chg = {}, {}, {}, {}, {}
local ok = 1
for i = 1, n do
  local req = tonumber(ARGV[5 * i - 4])
  local per = tonumber(ARGV[5 * i - 3])
  local dw = tonumber(ARGV[5 * i - 2])
  local dc = tonumber(ARGV[5 * i - 1])
  local dp = tonumber(ARGV[5 * i])
  local w = math.floor(now / per)
  local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
  local sw = tonumber(h[1])
  local c = tonumber(h[2]) or 0
  local p = tonumber(h[3]) or 0
  if sw == nil then
    c, p = 0, 0
  elseif sw >= w then
    w = sw
  elseif sw == w - 1 then
    p, c = c, 0
  else
    c, p = 0, 0
  end
  chg[i] = false
  if dw >= w then
    c, p = c + dc, p + dp
    chg[i] = dc > 0 or dp > 0
  elseif dw == w - 1 then
    p = p + dc
    chg[i] = dc > 0
  end
  local e = now - w * per
  if e < 0 then e = 0 end
  if p * (per - e) + (c + 1) * per > req * per then ok = 0 end
  ws[i], cs[i], ps[i], pers[i] = w, c, p, per
end
for i = 1, n do
  if ok == 1 then cs[i] = cs[i] + 1 end
  if ok == 1 or chg[i] then
    redis.call('HSET', KEYS[i], 'w', string.format('%d', ws[i]), 'c', string.format('%d', cs[i]),
      'p', string.format('%d', ps[i]))
    redis.call('PEXPIRE', KEYS[i], string.format('%d', 2 * pers[i]))
  end
end
local out = {now, ok}
for i = 1, n do
  out[#out + 1] = ws[i]
  out[#out + 1] = cs[i]
  out[#out + 1] = ps[i]
end
return out
"#;

/// Adds signed deltas to the counters, without checking any limit: the
/// hybrid mode's batched push of local admits, and the refund of a request
/// counted in one cluster slot and refused in another. KEYS: the state
/// hashes. ARGV: `per_ms, delta_window, delta_curr, delta_prev` per key
/// (`delta_curr` counts in window `delta_window`, `delta_prev` in the one
/// before). Returns `{now_ms, then w, c, p per key}` after the change.
const APPLY_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local out = {now}
for i = 1, #KEYS do
  local per = tonumber(ARGV[4 * i - 3])
  local dw = tonumber(ARGV[4 * i - 2])
  local dc = tonumber(ARGV[4 * i - 1])
  local dp = tonumber(ARGV[4 * i])
  local w = math.floor(now / per)
  local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
  local sw = tonumber(h[1])
  local c = tonumber(h[2]) or 0
  local p = tonumber(h[3]) or 0
  if sw == nil then
    c, p = 0, 0
  elseif sw >= w then
    w = sw
  elseif sw == w - 1 then
    p, c = c, 0
  else
    c, p = 0, 0
  end
  local changed = false
  if dw >= w then
    c, p = c + dc, p + dp
    changed = dc ~= 0 or dp ~= 0
  elseif dw == w - 1 then
    p = p + dc
    changed = dc ~= 0
  end
  if c < 0 then c = 0 end
  if p < 0 then p = 0 end
  if changed and (sw ~= nil or c > 0 or p > 0) then
    redis.call('HSET', KEYS[i], 'w', string.format('%d', w), 'c', string.format('%d', c),
      'p', string.format('%d', p))
    if dc > 0 or dp > 0 then
      redis.call('PEXPIRE', KEYS[i], string.format('%d', 2 * per))
    end
  end
  out[#out + 1] = w
  out[#out + 1] = c
  out[#out + 1] = p
end
return out
"#;

/// A failed Redis call.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Redis answered with an error, or the connection failed.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// No answer within `rate_limit.timeout`.
    #[error("redis: no answer within {0:?}")]
    Timeout(Duration),
    /// The script's answer did not have the expected shape.
    #[error("redis: unexpected script reply ({0})")]
    Reply(&'static str),
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(redis::cluster_async::ClusterConnection),
}

/// The connection and the scripts.
pub struct Backend {
    conn: Conn,
    check: Script,
    apply: Script,
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("cluster", &self.is_cluster())
            .finish()
    }
}

/// Why a Redis URL was not accepted (the URL itself is never repeated: it
/// may carry a password).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UrlError(pub String);

/// The node URLs of `redis+cluster://[user:pass@]h1:p1,h2:p2`; a userinfo
/// on the first node applies to every node written without one.
pub fn cluster_nodes(url: &str) -> Result<Vec<String>, UrlError> {
    let rest = url
        .strip_prefix("redis+cluster://")
        .ok_or_else(|| UrlError("a cluster URL starts with redis+cluster://".into()))?;
    let rest = rest.trim_end_matches('/');
    let parts: Vec<&str> = rest
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect();
    if parts.is_empty() {
        return Err(UrlError("redis+cluster:// names no node".into()));
    }
    let userinfo = parts[0].rsplit_once('@').map(|(u, _)| u);
    Ok(parts
        .iter()
        .map(|p| match (p.contains('@'), userinfo) {
            (false, Some(u)) => format!("redis://{u}@{p}"),
            _ => format!("redis://{p}"),
        })
        .collect())
}

impl Backend {
    /// Prepares a connection to `url` without waiting for it: `redis://` and
    /// `rediss://` get a reconnecting `ConnectionManager`,
    /// `redis+cluster://h1:p1,h2:p2` a cluster connection.
    pub fn open(url: &str, timeout: Duration) -> Result<Self, UrlError> {
        let connect_timeout = timeout.max(Duration::from_millis(250));
        let conn = if url.starts_with("redis+cluster://") {
            let nodes = cluster_nodes(url)?;
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(connect_timeout)
                .response_timeout(timeout)
                .retries(1)
                .min_retry_wait(10)
                .max_retry_wait(100)
                .build()
                .map_err(|e| UrlError(format!("cluster URL: {e}")))?;
            let cfg = redis::cluster::ClusterConfig::new()
                .set_connection_timeout(connect_timeout)
                .set_response_timeout(timeout);
            Conn::Cluster(client.get_pending_async_connection_with_config(cfg))
        } else if url.starts_with("redis://")
            || url.starts_with("rediss://")
            || url.starts_with("redis+unix://")
        {
            let client =
                redis::Client::open(url).map_err(|e| UrlError(format!("Redis URL: {e}")))?;
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_min_delay(Duration::from_millis(50))
                .set_max_delay(Duration::from_millis(500));
            let cm = ConnectionManager::new_lazy_with_config(client, cfg)
                .map_err(|e| UrlError(format!("Redis URL: {e}")))?;
            Conn::Single(cm)
        } else {
            return Err(UrlError(
                "the rate limiter needs a redis://, rediss:// or redis+cluster:// URL".into(),
            ));
        };
        Ok(Backend {
            conn,
            check: Script::new(CHECK_LUA),
            apply: Script::new(APPLY_LUA),
        })
    }

    /// Whether this is a Redis Cluster (limits in two slots need two calls).
    pub fn is_cluster(&self) -> bool {
        matches!(self.conn, Conn::Cluster(_))
    }

    async fn invoke(&self, inv: &ScriptInvocation<'_>) -> Result<Vec<i64>, StoreError> {
        Ok(match &self.conn {
            Conn::Single(c) => inv.invoke_async(&mut c.clone()).await?,
            Conn::Cluster(c) => inv.invoke_async(&mut c.clone()).await?,
        })
    }

    /// `PING`.
    pub async fn ping(&self) -> Result<(), StoreError> {
        let cmd = redis::cmd("PING");
        let _: String = match &self.conn {
            Conn::Single(c) => cmd.query_async(&mut c.clone()).await?,
            Conn::Cluster(c) => cmd.query_async(&mut c.clone()).await?,
        };
        Ok(())
    }

    /// Runs the check-and-count script on `keys` (one cluster slot) for
    /// limits `ids`, first adding `deltas` (local admits not yet in Redis,
    /// one per key, or none at all).
    pub async fn check(
        &self,
        keys: &[String],
        ids: &[LimitId],
        deltas: &[WindowState],
    ) -> Result<Checked, StoreError> {
        let mut inv = self.check.prepare_invoke();
        for (i, (k, id)) in keys.iter().zip(ids).enumerate() {
            let d = Delta::push(id.per_ms, deltas.get(i).copied().unwrap_or_default());
            inv.key(k.as_str());
            inv.arg(id.requests)
                .arg(id.per_ms)
                .arg(d.window)
                .arg(d.curr)
                .arg(d.prev);
        }
        let out = self.invoke(&inv).await?;
        if out.len() != 2 + 3 * keys.len() {
            return Err(StoreError::Reply("check: wrong length"));
        }
        let admitted = match out[1] {
            1 => true,
            0 => false,
            _ => return Err(StoreError::Reply("check: admitted is not 0 or 1")),
        };
        Ok(Checked {
            now_ms: nonneg(out[0])?,
            admitted,
            states: states(&out[2..])?,
        })
    }

    /// Runs the apply-deltas script on `keys` (one cluster slot).
    pub async fn apply(&self, keys: &[String], deltas: &[Delta]) -> Result<Applied, StoreError> {
        let mut inv = self.apply.prepare_invoke();
        for (k, d) in keys.iter().zip(deltas) {
            inv.key(k.as_str());
            inv.arg(d.per_ms).arg(d.window).arg(d.curr).arg(d.prev);
        }
        let out = self.invoke(&inv).await?;
        if out.len() != 1 + 3 * keys.len() {
            return Err(StoreError::Reply("apply: wrong length"));
        }
        Ok(Applied {
            now_ms: nonneg(out[0])?,
            states: states(&out[1..])?,
        })
    }
}

fn nonneg(v: i64) -> Result<u64, StoreError> {
    u64::try_from(v).map_err(|_| StoreError::Reply("negative number"))
}

fn states(flat: &[i64]) -> Result<Vec<WindowState>, StoreError> {
    flat.chunks_exact(3)
        .map(|c| {
            Ok(WindowState {
                window: nonneg(c[0])?,
                curr: nonneg(c[1])?,
                prev: nonneg(c[2])?,
            })
        })
        .collect()
}

/// The answer of the check script for one slot.
#[derive(Clone, Debug)]
pub struct Checked {
    /// Redis `TIME`, ms.
    pub now_ms: u64,
    /// Whether every limit admitted (and was counted).
    pub admitted: bool,
    /// Per key: the state after counting (admitted) or as read (refused).
    pub states: Vec<WindowState>,
}

/// The answer of the apply script for one slot.
#[derive(Clone, Debug)]
pub struct Applied {
    /// Redis `TIME`, ms.
    pub now_ms: u64,
    /// Per key: the state after the change.
    pub states: Vec<WindowState>,
}

/// A signed change to one state hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Delta {
    /// The limit's window length.
    pub per_ms: u64,
    /// The window `curr` counts in.
    pub window: u64,
    /// Added to that window's count.
    pub curr: i64,
    /// Added to the count of the window before.
    pub prev: i64,
}

impl Delta {
    /// The push of local admits `s` for a limit of `per_ms`.
    pub fn push(per_ms: u64, s: WindowState) -> Self {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        Delta {
            per_ms,
            window: s.window,
            curr: i(s.curr),
            prev: i(s.prev),
        }
    }
}

/// The Redis key of (limit, subject) `k`.
pub fn state_key(k: &dyn KeyView) -> String {
    let id = k.id();
    let mut s = String::with_capacity(32 + k.a().len() + k.b().len());
    let _ = match id.scope {
        Scope::Key => write!(s, "pc:rl:{{{}}}:key:{}:{}", k.a(), id.requests, id.per_ms),
        Scope::Route => write!(
            s,
            "pc:rl:{{{}}}:route:{}:{}:{}",
            k.a(),
            id.requests,
            id.per_ms,
            k.b()
        ),
        Scope::Workspace => write!(
            s,
            "pc:rl:{{ws:{}}}:workspace:{}:{}",
            k.a(),
            id.requests,
            id.per_ms
        ),
    };
    s
}

/// Which cluster slot group `k` is in: `(true, workspace)` or `(false, key id)`.
pub fn slot_group(k: &dyn KeyView) -> (bool, &str) {
    (k.id().scope == Scope::Workspace, k.a())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ratelimit::table::KeyRef;

    #[test]
    fn key_names_and_hash_tags() {
        let id = |scope| LimitId {
            scope,
            requests: 60,
            per_ms: 60_000,
        };
        assert_eq!(
            state_key(&KeyRef::new(id(Scope::Key), "key_1", "acme", "sms")),
            "pc:rl:{key_1}:key:60:60000"
        );
        assert_eq!(
            state_key(&KeyRef::new(id(Scope::Route), "key_1", "acme", "sms.send")),
            "pc:rl:{key_1}:route:60:60000:sms.send"
        );
        assert_eq!(
            state_key(&KeyRef::new(id(Scope::Workspace), "key_1", "acme", "sms")),
            "pc:rl:{ws:acme}:workspace:60:60000"
        );
    }

    #[test]
    fn cluster_urls() {
        assert_eq!(
            cluster_nodes("redis+cluster://:pw@h1:7000,h2:7001").ok(),
            Some(vec![
                "redis://:pw@h1:7000".to_string(),
                "redis://:pw@h2:7001".to_string()
            ])
        );
        assert_eq!(
            cluster_nodes("redis+cluster://h1:7000").ok(),
            Some(vec!["redis://h1:7000".to_string()])
        );
        assert!(cluster_nodes("redis+cluster://").is_err());
    }
}
