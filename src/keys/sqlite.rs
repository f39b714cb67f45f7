//! SQLite key store: the embedded default for a single node.
//!
//! One database file in WAL mode with `synchronous=FULL`, so a write returns
//! only after its commit is on disk. All SQLite work is blocking, so it runs on
//! tokio's blocking pool, and every call is bounded by the store timeout.
//! Writes (and listings) go through one connection behind a `std::sync::Mutex`;
//! key lookups, the hot path of a cold cache, through [`READERS`] read-only
//! connections of their own: in WAL mode readers wait neither for each other
//! nor for a write (an fsync, or another process's transaction), so misses
//! after a restart proceed in parallel.
//!
//! Layout (schema version 1, kept in `PRAGMA user_version`):
//!
//! - `keys(id PRIMARY KEY, workspace, record)`: `record` is the JSON of a
//!   [`KeyRecord`]; `workspace` is copied out of it for the listing index.
//! - `digests(digest PRIMARY KEY, key_id, expires_at)`: `expires_at` is NULL
//!   for a key's current secret, or the Unix second at which an old secret's
//!   rotation grace ends.
//!
//! Other processes (the `portcullis keys` CLI) may write the same file; the
//! watcher notices their commits through `PRAGMA data_version`.

use super::*;
use crate::time::Timestamp;
use rusqlite::{Connection, ErrorCode, OpenFlags, OptionalExtension, TransactionBehavior, params};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, PoisonError, TryLockError, Weak};
use std::time::{SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc::UnboundedSender;

/// The schema this code writes; `open` migrates older files up to it.
const SCHEMA_VERSION: i64 = 1;

/// How often the watcher asks SQLite whether another connection committed.
const WATCH_INTERVAL: Duration = Duration::from_millis(200);

/// Version 0 (a new, empty file) to version 1.
const SCHEMA_V1: &str = "
CREATE TABLE IF NOT EXISTS keys (
    id        TEXT PRIMARY KEY NOT NULL,
    workspace TEXT NOT NULL,
    record    TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_workspace_id ON keys(workspace, id);
CREATE TABLE IF NOT EXISTS digests (
    digest     BLOB PRIMARY KEY NOT NULL,
    key_id     TEXT NOT NULL,
    expires_at INTEGER
);
CREATE INDEX IF NOT EXISTS digests_key_id ON digests(key_id);
CREATE INDEX IF NOT EXISTS digests_expires_at ON digests(expires_at) WHERE expires_at IS NOT NULL;
";

/// Read-only connections for lookups: one per CPU a lookup may run on and a
/// few more, so a reader blocked on disk does not hold up the others.
pub const READERS: usize = 4;

/// SQLite-backed key store (one file, one node).
pub struct SqliteStore {
    /// The read-write connection. Shared with the watcher, which polls
    /// `data_version` on it (see [`KeyStore::watch`]).
    conn: Arc<Mutex<Connection>>,
    /// Read-only connections for lookups (empty when the file is not in WAL
    /// mode: readers would then block the writer).
    readers: Arc<[Mutex<Connection>]>,
    /// Where the next lookup starts looking for a free reader.
    next_reader: AtomicUsize,
    /// Bound on every call, and SQLite's busy timeout.
    timeout: Duration,
}

impl SqliteStore {
    /// Opens (creating it and its parent directories if missing) the database
    /// at `path`, switches it to WAL with full fsync, and creates or migrates
    /// the schema. Blocking: call it at startup, not on a hot path.
    pub fn open(path: &str, timeout: Duration) -> StoreResult<Self> {
        if path.is_empty() {
            return Err(StoreError::Config("sqlite:// URL needs a file path".into()));
        }
        let file = Path::new(path);
        if let Some(parent) = file.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                StoreError::Unavailable(format!(
                    "cannot create directory {}: {e}",
                    parent.display()
                ))
            })?;
        }
        let flags = OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX;
        let mut conn = Connection::open_with_flags(file, flags)
            .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", file.display())))?;
        configure(&conn, timeout).map_err(|e| {
            StoreError::Unavailable(format!("cannot configure {}: {e}", file.display()))
        })?;
        migrate(&mut conn)?;
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .map_err(db_err)?;
        let readers = if mode.eq_ignore_ascii_case("wal") {
            (0..READERS)
                .map(|_| open_reader(file, timeout).map(Mutex::new))
                .collect::<StoreResult<Vec<_>>>()?
        } else {
            Vec::new()
        };
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
            readers: readers.into(),
            next_reader: AtomicUsize::new(0),
            timeout,
        })
    }

    /// Runs the read-only `f` on a free reader connection (or, when all are
    /// busy, waits for one; without readers, on the read-write connection),
    /// on the blocking pool, bounded by the store timeout.
    async fn read<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> StoreResult<T> + Send + 'static,
    {
        if self.readers.is_empty() {
            return self.run(move |c| f(c)).await;
        }
        let readers = Arc::clone(&self.readers);
        let first = self.next_reader.fetch_add(1, Ordering::Relaxed);
        let job = tokio::task::spawn_blocking(move || {
            let n = readers.len();
            for i in 0..n {
                match readers[(first + i) % n].try_lock() {
                    Ok(c) => return f(&c),
                    // Reads leave nothing half-done behind a poisoned lock.
                    Err(TryLockError::Poisoned(p)) => return f(&p.into_inner()),
                    Err(TryLockError::WouldBlock) => {}
                }
            }
            let c = readers[first % n]
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            f(&c)
        });
        bounded(self.timeout, job).await
    }

    /// Runs `f` on the connection on the blocking pool, bounded by the store
    /// timeout. On timeout the work itself cannot be cancelled; it finishes
    /// (or rolls back) in the background while the caller gets `Timeout`.
    async fn run<T, F>(&self, f: F) -> StoreResult<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> StoreResult<T> + Send + 'static,
    {
        let conn = Arc::clone(&self.conn);
        let job = tokio::task::spawn_blocking(move || {
            // A panic inside a transaction rolls it back on unwind, so the
            // connection behind a poisoned lock is still consistent.
            let mut guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut guard)
        });
        bounded(self.timeout, job).await
    }
}

/// A blocking-pool job's result, or `Timeout` after `timeout` (the job
/// itself cannot be cancelled and finishes in the background).
async fn bounded<T>(
    timeout: Duration,
    job: tokio::task::JoinHandle<StoreResult<T>>,
) -> StoreResult<T> {
    match tokio::time::timeout(timeout, job).await {
        Err(_) => Err(StoreError::Timeout),
        Ok(Err(e)) => Err(StoreError::Unavailable(format!(
            "sqlite worker failed: {e}"
        ))),
        Ok(Ok(result)) => result,
    }
}

/// A read-only connection to `file` (already in WAL mode, schema in place).
fn open_reader(file: &Path, timeout: Duration) -> StoreResult<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(file, flags)
        .map_err(|e| StoreError::Unavailable(format!("cannot open {}: {e}", file.display())))?;
    conn.busy_timeout(timeout).map_err(db_err)?;
    Ok(conn)
}

/// Pragmas that hold per connection.
fn configure(conn: &Connection, timeout: Duration) -> rusqlite::Result<()> {
    conn.busy_timeout(timeout)?;
    // journal_mode answers with the mode now in force; WAL can be refused
    // (e.g. on some network filesystems), and then durability claims change.
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        tracing::warn!(journal_mode = %mode, "SQLite refused WAL mode; continuing with this journal mode");
    }
    // FULL: the WAL is fsynced at every commit, so a write that returned
    // survives power loss (NORMAL would only survive a process crash).
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "OFF")?;
    Ok(())
}

/// Creates or upgrades the schema, inside one IMMEDIATE transaction so two
/// processes opening a new file at once do not both migrate it.
fn migrate(conn: &mut Connection) -> StoreResult<()> {
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(db_err)?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(db_err)?;
    if version > SCHEMA_VERSION {
        return Err(StoreError::Config(format!(
            "database schema version {version} is newer than this build supports ({SCHEMA_VERSION}); upgrade portcullis"
        )));
    }
    if version < 1 {
        tx.execute_batch(SCHEMA_V1).map_err(db_err)?;
    }
    // Later versions add `if version < N { … }` steps here, in order.
    if version != SCHEMA_VERSION {
        tx.pragma_update(None, "user_version", SCHEMA_VERSION)
            .map_err(db_err)?;
    }
    tx.commit().map_err(db_err)
}

/// Maps a SQLite error. Messages carry table and column names at most, never
/// bound values, so no digest ends up in an error.
fn db_err(e: rusqlite::Error) -> StoreError {
    match e.sqlite_error_code() {
        Some(ErrorCode::ConstraintViolation) => StoreError::Conflict(format!("sqlite: {e}")),
        _ => StoreError::Unavailable(format!("sqlite: {e}")),
    }
}

fn encode(record: &KeyRecord) -> StoreResult<String> {
    serde_json::to_string(record)
        .map_err(|e| StoreError::Corrupt(format!("cannot encode key {}: {e}", record.id)))
}

fn decode(json: &str) -> StoreResult<KeyRecord> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt(format!("key record: {e}")))
}

/// Current Unix time in milliseconds.
fn now_millis() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis().min(i64::MAX as u128) as i64)
        .unwrap_or(0)
}

/// Current Unix time in whole seconds (floor).
fn now_secs() -> i64 {
    now_millis().div_euclid(1000)
}

/// The Unix second at which a grace period starting now ends, rounded up so
/// an old secret works for at least `grace` (at most a second more), never less.
fn grace_end(grace: Duration) -> i64 {
    let grace_ms = grace.as_millis().min(i64::MAX as u128 / 2) as i64;
    let end_ms = now_millis().saturating_add(grace_ms);
    end_ms.saturating_add(999).div_euclid(1000)
}

/// Whether a digest row with this expiry still authenticates at `now` (seconds).
fn digest_live(expires_at: Option<i64>, now: i64) -> bool {
    expires_at.is_none_or(|end| now < end)
}

impl KeyStore for SqliteStore {
    fn lookup<'a>(&'a self, digest: &'a Digest) -> BoxFuture<'a, StoreResult<Option<KeyRecord>>> {
        let digest = *digest;
        Box::pin(self.read(move |conn| {
            // Read-only: expired grace digests are purged by the next rotate,
            // so the hot path never takes the write lock.
            let row: Option<(String, Option<i64>)> = conn
                .prepare_cached(
                    "SELECT k.record, d.expires_at FROM digests d JOIN keys k ON k.id = d.key_id WHERE d.digest = ?1",
                )
                .and_then(|mut st| st.query_row([&digest[..]], |r| Ok((r.get(0)?, r.get(1)?))).optional())
                .map_err(db_err)?;
            match row {
                Some((json, expires_at)) if digest_live(expires_at, now_secs()) => decode(&json).map(Some),
                _ => Ok(None),
            }
        }))
    }

    fn get<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<Option<KeyRecord>>> {
        let id = id.to_owned();
        Box::pin(self.read(move |conn| {
            let json: Option<String> = conn
                .prepare_cached("SELECT record FROM keys WHERE id = ?1")
                .and_then(|mut st| st.query_row([&id], |r| r.get(0)).optional())
                .map_err(db_err)?;
            json.as_deref().map(decode).transpose()
        }))
    }

    fn list<'a>(
        &'a self,
        workspace: Option<&'a str>,
        limit: usize,
        cursor: Option<&'a str>,
    ) -> BoxFuture<'a, StoreResult<KeyPage>> {
        let workspace = workspace.map(str::to_owned);
        let cursor = cursor.map(str::to_owned);
        // A zero limit would hand out a cursor that never advances.
        let limit = limit.max(1);
        Box::pin(self.run(move |conn| {
            // One row more than asked tells whether another page exists.
            let fetch = i64::try_from(limit)
                .unwrap_or(i64::MAX - 1)
                .saturating_add(1);
            let mut st = conn
                .prepare_cached(
                    "SELECT record FROM keys
                     WHERE (?1 IS NULL OR workspace = ?1) AND (?2 IS NULL OR id > ?2)
                     ORDER BY id LIMIT ?3",
                )
                .map_err(db_err)?;
            let rows = st
                .query_map(params![workspace, cursor, fetch], |r| r.get::<_, String>(0))
                .map_err(db_err)?;
            let mut page = KeyPage::default();
            for row in rows {
                let json = row.map_err(db_err)?;
                if page.data.len() == limit {
                    // The cursor is the last id handed out; `id > cursor`
                    // resumes right after it.
                    page.next_cursor = page.data.last().map(|r| r.id.clone());
                    break;
                }
                page.data.push(decode(&json)?);
            }
            Ok(page)
        }))
    }

    fn create<'a>(
        &'a self,
        record: &'a KeyRecord,
        digest: &'a Digest,
    ) -> BoxFuture<'a, StoreResult<()>> {
        let record = record.clone();
        let digest = *digest;
        Box::pin(self.run(move |conn| {
            let json = encode(&record)?;
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            let id_taken: bool = tx
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM keys WHERE id = ?1)",
                    [&record.id],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if id_taken {
                return Err(StoreError::Conflict(format!(
                    "key id {} already exists",
                    record.id
                )));
            }
            let digest_taken: bool = tx
                .query_row(
                    "SELECT EXISTS(SELECT 1 FROM digests WHERE digest = ?1)",
                    [&digest[..]],
                    |r| r.get(0),
                )
                .map_err(db_err)?;
            if digest_taken {
                return Err(StoreError::Conflict(
                    "a key with this secret already exists".into(),
                ));
            }
            tx.execute(
                "INSERT INTO keys (id, workspace, record) VALUES (?1, ?2, ?3)",
                params![record.id, record.workspace, json],
            )
            .map_err(db_err)?;
            tx.execute(
                "INSERT INTO digests (digest, key_id, expires_at) VALUES (?1, ?2, NULL)",
                params![&digest[..], record.id],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)
        }))
    }

    fn update<'a>(&'a self, record: &'a KeyRecord) -> BoxFuture<'a, StoreResult<bool>> {
        let record = record.clone();
        Box::pin(self.run(move |conn| {
            let json = encode(&record)?;
            let n = conn
                .prepare_cached("UPDATE keys SET workspace = ?2, record = ?3 WHERE id = ?1")
                .and_then(|mut st| st.execute(params![record.id, record.workspace, json]))
                .map_err(db_err)?;
            Ok(n > 0)
        }))
    }

    fn rotate<'a>(
        &'a self,
        record: &'a KeyRecord,
        new_digest: &'a Digest,
        grace: Duration,
    ) -> BoxFuture<'a, StoreResult<bool>> {
        let record = record.clone();
        let new_digest = *new_digest;
        Box::pin(self.run(move |conn| {
            let json = encode(&record)?;
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            let n = tx
                .execute(
                    "UPDATE keys SET workspace = ?2, record = ?3 WHERE id = ?1",
                    params![record.id, record.workspace, json],
                )
                .map_err(db_err)?;
            if n == 0 {
                return Ok(false); // dropping `tx` rolls back (nothing was written)
            }
            // Housekeeping while we hold the write lock anyway: grace
            // periods that have ended, of any key.
            tx.execute("DELETE FROM digests WHERE expires_at IS NOT NULL AND expires_at <= ?1", [now_secs()])
                .map_err(db_err)?;
            if grace.is_zero() {
                tx.execute("DELETE FROM digests WHERE key_id = ?1", [&record.id]).map_err(db_err)?;
            } else {
                // MIN: a second rotation never extends the grace an older
                // secret already had.
                tx.execute(
                    "UPDATE digests SET expires_at = CASE WHEN expires_at IS NULL THEN ?2 ELSE MIN(expires_at, ?2) END
                     WHERE key_id = ?1",
                    params![record.id, grace_end(grace)],
                )
                .map_err(db_err)?;
            }
            let digest_taken: bool = tx
                .query_row("SELECT EXISTS(SELECT 1 FROM digests WHERE digest = ?1)", [&new_digest[..]], |r| r.get(0))
                .map_err(db_err)?;
            if digest_taken {
                return Err(StoreError::Conflict("a key with this secret already exists".into()));
            }
            tx.execute(
                "INSERT INTO digests (digest, key_id, expires_at) VALUES (?1, ?2, NULL)",
                params![&new_digest[..], record.id],
            )
            .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(true)
        }))
    }

    fn delete<'a>(&'a self, id: &'a str) -> BoxFuture<'a, StoreResult<bool>> {
        let id = id.to_owned();
        Box::pin(self.run(move |conn| {
            let tx = conn
                .transaction_with_behavior(TransactionBehavior::Immediate)
                .map_err(db_err)?;
            tx.execute("DELETE FROM digests WHERE key_id = ?1", [&id])
                .map_err(db_err)?;
            let n = tx
                .execute("DELETE FROM keys WHERE id = ?1", [&id])
                .map_err(db_err)?;
            tx.commit().map_err(db_err)?;
            Ok(n > 0)
        }))
    }

    fn touch<'a>(&'a self, used: &'a [(String, Timestamp)]) -> BoxFuture<'a, StoreResult<()>> {
        let used = used.to_vec();
        Box::pin(self.run(move |conn| {
            // IMMEDIATE: the read-modify-write below must not interleave with
            // another process's update of the same record (it would undo it).
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).map_err(db_err)?;
            {
                let mut read = tx.prepare_cached("SELECT record FROM keys WHERE id = ?1").map_err(db_err)?;
                let mut write = tx.prepare_cached("UPDATE keys SET record = ?2 WHERE id = ?1").map_err(db_err)?;
                for (id, at) in &used {
                    let Some(json) = read.query_row([id], |r| r.get::<_, String>(0)).optional().map_err(db_err)? else {
                        continue; // deleted since it was used
                    };
                    let mut record = match decode(&json) {
                        Ok(r) => r,
                        Err(e) => {
                            // `get` reports it; one bad row must not stop the batch.
                            tracing::warn!(key_id = %id, error = %e, "skipping last_used_at of an undecodable key");
                            continue;
                        }
                    };
                    if record.last_used_at.is_some_and(|prev| prev >= *at) {
                        continue; // batches may arrive out of order; never go back
                    }
                    record.last_used_at = Some(*at);
                    write.execute(params![id, encode(&record)?]).map_err(db_err)?;
                }
            }
            tx.commit().map_err(db_err)
        }))
    }

    fn ping(&self) -> BoxFuture<'_, StoreResult<()>> {
        Box::pin(self.run(|conn| conn.query_row("SELECT 1", [], |_| Ok(())).map_err(db_err)))
    }

    /// Polls `PRAGMA data_version` every 200 ms and sends
    /// [`KeyEvent::Flush`] when another connection (the CLI, another
    /// process) committed.
    ///
    /// It polls on the store's own connection on purpose: `data_version`
    /// ignores commits made by the connection that asks, so the gateway's own
    /// writes (touch batches above all, which would otherwise flush the whole
    /// cache every few seconds) are not reported; the gateway invalidates its
    /// cache for those directly. A separate read connection would see them.
    ///
    /// Stops when `tx` is closed or the store is dropped.
    fn watch(&self, tx: UnboundedSender<KeyEvent>) {
        let conn = Arc::downgrade(&self.conn);
        let timeout = self.timeout;
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            tracing::error!(
                "SQLite key store watch() called outside a tokio runtime; external changes will not be seen"
            );
            return;
        };
        rt.spawn(watch_data_version(conn, tx, timeout));
    }
}

/// The watcher loop of [`SqliteStore::watch`].
async fn watch_data_version(
    conn: Weak<Mutex<Connection>>,
    tx: UnboundedSender<KeyEvent>,
    timeout: Duration,
) {
    let mut last: Option<i64> = None;
    let mut failing = false;
    let mut tick = tokio::time::interval(WATCH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = tx.closed() => return,
        }
        let Some(conn) = conn.upgrade() else { return };
        let job = tokio::task::spawn_blocking(move || {
            let guard = conn.lock().unwrap_or_else(PoisonError::into_inner);
            guard.query_row("PRAGMA data_version", [], |r| r.get::<_, i64>(0))
        });
        match tokio::time::timeout(timeout, job).await {
            Ok(Ok(Ok(version))) => {
                failing = false;
                if last.is_some_and(|prev| prev != version) && tx.send(KeyEvent::Flush).is_err() {
                    return;
                }
                last = Some(version);
            }
            outcome => {
                // The counter is per connection and keeps counting while we
                // fail, so nothing is missed; just say so once.
                if !failing {
                    let why = match outcome {
                        Err(_) => "timed out".to_string(),
                        Ok(Err(e)) => e.to_string(),
                        Ok(Ok(Err(e))) => e.to_string(),
                        Ok(Ok(Ok(_))) => String::new(),
                    };
                    tracing::warn!(error = %why, "SQLite key store watcher cannot read data_version");
                }
                failing = true;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grace_rounds_up_never_down() {
        let now = now_secs();
        let end = grace_end(Duration::from_secs(1));
        assert!(end > now && end <= now + 2, "end {end} now {now}");
        assert!(digest_live(None, now));
        assert!(digest_live(Some(now + 1), now));
        assert!(!digest_live(Some(now), now));
    }

    #[tokio::test]
    async fn schema_is_versioned() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a/b/keys.db");
        let store = SqliteStore::open(path.to_str().unwrap(), Duration::from_secs(2)).unwrap();
        store.ping().await.unwrap();
        let v: i64 = store
            .run(|c| {
                c.query_row("PRAGMA user_version", [], |r| r.get(0))
                    .map_err(db_err)
            })
            .await
            .unwrap();
        assert_eq!(v, SCHEMA_VERSION);
        let mode: String = store
            .run(|c| {
                c.query_row("PRAGMA journal_mode", [], |r| r.get(0))
                    .map_err(db_err)
            })
            .await
            .unwrap();
        assert_eq!(mode, "wal");
    }
}
