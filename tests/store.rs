//! One behavioural suite for every key store backend, run against a real
//! SQLite file, a real redis-server and a real 3-master Redis Cluster, plus
//! the backend-specific checks: durability, change watching, crash recovery.

#[path = "common/redis.rs"]
mod redis_support;

use portcullis::keys::redis::RedisStore;
use portcullis::keys::sqlite::SqliteStore;
use portcullis::keys::{
    Digest, Environment, KeyEvent, KeyRecord, KeyStatus, SharedStore, StoreError, digest_of,
    new_key_id,
};
use portcullis::time::Timestamp;
use redis_support::{RedisCluster, RedisServer};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

const TIMEOUT: Duration = Duration::from_secs(3);

fn record(workspace: &str) -> KeyRecord {
    let mut metadata = serde_json::Map::new();
    metadata.insert("team".into(), serde_json::json!("billing"));
    KeyRecord {
        id: new_key_id(),
        workspace: workspace.to_string(),
        name: "test key".into(),
        kind: "secret".into(),
        environment: Environment::Test,
        prefix: "sk_test_".into(),
        last4: "abcd".into(),
        permissions: vec!["sms.send".into(), "keys.*".into()],
        plan: Some("pro".into()),
        status: KeyStatus::Active,
        created_at: Timestamp(1_795_000_000),
        expires_at: None,
        last_used_at: None,
        allowed_ips: vec!["10.0.0.0/8".parse().unwrap()],
        allowed_origins: vec!["app.example.com".into()],
        allowed_routes: Vec::new(),
        metadata,
    }
}

/// A fresh random secret's digest (the store never sees secrets).
fn digest() -> Digest {
    digest_of(&format!("sk_test_{}", new_key_id()))
}

async fn list_all(store: &SharedStore, workspace: Option<&str>, page: usize) -> Vec<String> {
    let mut ids = Vec::new();
    let mut cursor: Option<String> = None;
    for _ in 0..1000 {
        let p = store
            .list(workspace, page, cursor.as_deref())
            .await
            .unwrap();
        assert!(p.data.len() <= page);
        ids.extend(p.data.iter().map(|r| r.id.clone()));
        match p.next_cursor {
            Some(c) => cursor = Some(c),
            None => return ids,
        }
    }
    panic!("pagination did not end");
}

/// The behaviour every backend must have.
async fn suite(store: SharedStore) {
    store.ping().await.unwrap();

    // create / lookup / get
    let mut r1 = record("ws-a");
    let d1 = digest();
    store.create(&r1, &d1).await.unwrap();
    assert_eq!(store.lookup(&d1).await.unwrap().as_ref(), Some(&r1));
    assert_eq!(store.get(&r1.id).await.unwrap().as_ref(), Some(&r1));
    assert_eq!(store.lookup(&digest()).await.unwrap(), None);
    assert_eq!(store.get("key_doesnotexist").await.unwrap(), None);

    // duplicates: same id, same digest; nothing half-written afterwards
    assert!(matches!(
        store.create(&r1, &d1).await,
        Err(StoreError::Conflict(_))
    ));
    assert!(matches!(
        store.create(&r1, &digest()).await,
        Err(StoreError::Conflict(_))
    ));
    let other = record("ws-a");
    assert!(matches!(
        store.create(&other, &d1).await,
        Err(StoreError::Conflict(_))
    ));
    assert_eq!(store.get(&other.id).await.unwrap(), None);
    assert_eq!(store.lookup(&d1).await.unwrap().as_ref(), Some(&r1));
    assert!(!list_all(&store, Some("ws-a"), 10).await.contains(&other.id));

    // list: workspace filter, cursor pagination visits each key once, in order
    let mut listed: Vec<KeyRecord> = Vec::new();
    for _ in 0..5 {
        let r = record("ws-list");
        store.create(&r, &digest()).await.unwrap();
        listed.push(r);
    }
    let mut want: Vec<String> = listed.iter().map(|r| r.id.clone()).collect();
    want.sort();
    let mut pages = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let p = store
            .list(Some("ws-list"), 2, cursor.as_deref())
            .await
            .unwrap();
        pages.push(p.data.len());
        for r in &p.data {
            assert_eq!(r.workspace, "ws-list");
        }
        cursor = p.next_cursor.clone();
        if cursor.is_none() {
            break;
        }
        assert!(pages.len() < 10, "pagination did not end");
    }
    assert_eq!(pages, vec![2, 2, 1]);
    assert_eq!(list_all(&store, Some("ws-list"), 2).await, want);
    // next_cursor only when more rows exist
    assert!(
        store
            .list(Some("ws-list"), 5, None)
            .await
            .unwrap()
            .next_cursor
            .is_none()
    );
    assert!(
        store
            .list(Some("ws-list"), 4, None)
            .await
            .unwrap()
            .next_cursor
            .is_some()
    );
    let full = store.list(Some("ws-list"), 5, None).await.unwrap();
    assert_eq!(
        full.data.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        want
    );
    assert_eq!(
        full.data.iter().find(|r| r.id == listed[0].id),
        Some(&listed[0])
    );
    // no filter: everything, once each, in id order
    let everything = list_all(&store, None, 2).await;
    let mut all_want: Vec<String> = want.clone();
    all_want.push(r1.id.clone());
    all_want.sort();
    assert_eq!(everything, all_want);
    assert!(
        store
            .list(Some("ws-empty"), 10, None)
            .await
            .unwrap()
            .data
            .is_empty()
    );

    // update
    r1.name = "renamed".into();
    r1.status = KeyStatus::Disabled;
    r1.permissions = vec!["*".into()];
    assert!(store.update(&r1).await.unwrap());
    assert_eq!(store.get(&r1.id).await.unwrap().as_ref(), Some(&r1));
    assert_eq!(store.lookup(&d1).await.unwrap().as_ref(), Some(&r1));
    let unknown = record("ws-a");
    assert!(!store.update(&unknown).await.unwrap());
    assert_eq!(store.get(&unknown.id).await.unwrap(), None);

    // rotate, no grace: the old secret stops at once, same id
    let d2 = digest();
    r1.last4 = "wxyz".into();
    assert!(store.rotate(&r1, &d2, Duration::ZERO).await.unwrap());
    assert_eq!(store.lookup(&d1).await.unwrap(), None);
    let found = store.lookup(&d2).await.unwrap().unwrap();
    assert_eq!(found.id, r1.id);
    assert_eq!(found.last4, "wxyz");
    assert!(
        !store
            .rotate(&unknown, &digest(), Duration::ZERO)
            .await
            .unwrap()
    );
    assert_eq!(store.get(&unknown.id).await.unwrap(), None);

    // rotate with a 1 s grace: both work, then only the new one
    let d3 = digest();
    r1.last4 = "3333".into();
    let rotated_at = Instant::now();
    assert!(
        store
            .rotate(&r1, &d3, Duration::from_secs(1))
            .await
            .unwrap()
    );
    assert_eq!(
        store.lookup(&d2).await.unwrap().map(|r| r.id),
        Some(r1.id.clone()),
        "old secret works in grace"
    );
    assert_eq!(store.lookup(&d3).await.unwrap().as_ref(), Some(&r1));
    loop {
        if store.lookup(&d2).await.unwrap().is_none() {
            break;
        }
        assert!(
            rotated_at.elapsed() < Duration::from_secs(5),
            "old secret still works long after its grace"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        rotated_at.elapsed() >= Duration::from_millis(900),
        "grace cut short: {:?}",
        rotated_at.elapsed()
    );
    assert_eq!(store.lookup(&d3).await.unwrap().as_ref(), Some(&r1));

    // touch: sets last_used_at, skips unknown ids, never goes back
    let t = Timestamp(1_795_000_500);
    store
        .touch(&[(r1.id.clone(), t), ("key_unknown".into(), t)])
        .await
        .unwrap();
    assert_eq!(
        store.get(&r1.id).await.unwrap().unwrap().last_used_at,
        Some(t)
    );
    store
        .touch(&[(r1.id.clone(), Timestamp(t.0 - 100))])
        .await
        .unwrap();
    assert_eq!(
        store.get(&r1.id).await.unwrap().unwrap().last_used_at,
        Some(t)
    );
    assert_eq!(store.get("key_unknown").await.unwrap(), None);
    store.touch(&[]).await.unwrap();
    r1.last_used_at = Some(t);

    // delete
    assert!(store.delete(&r1.id).await.unwrap());
    assert_eq!(store.lookup(&d3).await.unwrap(), None);
    assert_eq!(store.lookup(&d2).await.unwrap(), None);
    assert_eq!(store.get(&r1.id).await.unwrap(), None);
    assert!(!list_all(&store, None, 3).await.contains(&r1.id));
    assert!(!list_all(&store, Some("ws-a"), 3).await.contains(&r1.id));
    assert!(!store.delete(&r1.id).await.unwrap());
    // the others are untouched
    assert_eq!(list_all(&store, Some("ws-list"), 10).await, want);

    store.ping().await.unwrap();
}

fn sqlite_path(dir: &tempfile::TempDir) -> String {
    // A nested path: open creates the missing parent directories.
    dir.path()
        .join("nested/data/keys.db")
        .to_str()
        .unwrap()
        .to_string()
}

/// The next event within `within`, or None.
async fn next_event(rx: &mut UnboundedReceiver<KeyEvent>, within: Duration) -> Option<KeyEvent> {
    tokio::time::timeout(within, rx.recv()).await.ok().flatten()
}

/// Waits (bounded) for a specific event, skipping others.
async fn expect_event(rx: &mut UnboundedReceiver<KeyEvent>, want: &KeyEvent, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match next_event(rx, left).await {
            Some(ev) if &ev == want => return,
            Some(_) => continue,
            None => panic!("no {want:?} within {within:?}"),
        }
    }
}

/// Empties what already arrived, waiting briefly for stragglers.
async fn drain(rx: &mut UnboundedReceiver<KeyEvent>) {
    while next_event(rx, Duration::from_millis(300)).await.is_some() {}
}

#[tokio::test]
async fn sqlite_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store: SharedStore = Arc::new(SqliteStore::open(&sqlite_path(&dir), TIMEOUT).unwrap());
    suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_suite() {
    let server = RedisServer::start();
    let store = portcullis::keys::open(&server.url(), TIMEOUT)
        .await
        .unwrap();
    suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_suite() {
    let mut cluster = RedisCluster::start();
    let store = portcullis::keys::open(&cluster.url(), TIMEOUT)
        .await
        .unwrap();
    suite(store).await;
    // The keys really are spread over the masters (hash tags per key id),
    // so the suite exercised cross-slot writes.
    let holding = cluster
        .nodes()
        .iter()
        .filter(|n| n.command(&["DBSIZE"]).is_some_and(|r| r.trim() != ":0"))
        .count();
    assert!(holding >= 2, "keys all landed on {holding} node(s)");
}

#[tokio::test]
async fn sqlite_data_survives_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = sqlite_path(&dir);
    let r = record("ws");
    let d = digest();
    {
        let store = SqliteStore::open(&path, TIMEOUT).unwrap();
        portcullis::keys::KeyStore::create(&store, &r, &d)
            .await
            .unwrap();
    }
    let store: SharedStore = portcullis::keys::open(&format!("sqlite://{path}"), TIMEOUT)
        .await
        .unwrap();
    assert_eq!(store.get(&r.id).await.unwrap().as_ref(), Some(&r));
    assert_eq!(store.lookup(&d).await.unwrap().as_ref(), Some(&r));
}

/// Lookups run on read-only connections of their own: a write waiting for
/// SQLite's write lock (here held by another process's transaction, as the
/// `portcullis keys` CLI or a slow fsync would) does not hold up cold-cache
/// lookups, which answer while it still waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_lookups_do_not_wait_behind_a_write() {
    let dir = tempfile::tempdir().unwrap();
    let path = sqlite_path(&dir);
    let store: SharedStore = Arc::new(SqliteStore::open(&path, TIMEOUT).unwrap());
    let mut known = Vec::new();
    for _ in 0..8 {
        let (r, d) = (record("ws"), digest());
        store.create(&r, &d).await.unwrap();
        known.push((r, d));
    }
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let write = {
        let store = store.clone();
        tokio::spawn(async move { store.create(&record("ws"), &digest()).await })
    };
    // Nothing signals that the write now waits on the lock; had it not
    // started yet, the assertions below would pass on any build, so this
    // wait can only make the test weaker, never flaky.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lookups = known.iter().map(|(r, d)| {
        let store = store.clone();
        let (id, d) = (r.id.clone(), *d);
        async move { (id, store.lookup(&d).await) }
    });
    let started = Instant::now();
    for (id, found) in futures_util::future::join_all(lookups).await {
        assert_eq!(found.unwrap().map(|r| r.id), Some(id));
    }
    assert!(
        !write.is_finished(),
        "the lookups waited for the write to give up ({:?})",
        started.elapsed()
    );
    other.execute_batch("ROLLBACK").unwrap();
    write
        .await
        .unwrap()
        .expect("the write goes through once the lock is free");
}

#[tokio::test]
async fn sqlite_refuses_a_newer_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keys.db");
    rusqlite::Connection::open(&path)
        .unwrap()
        .pragma_update(None, "user_version", 99)
        .unwrap();
    let err = SqliteStore::open(path.to_str().unwrap(), TIMEOUT)
        .err()
        .unwrap();
    assert!(matches!(err, StoreError::Config(_)), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_watch_sees_other_writers_not_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let path = sqlite_path(&dir);
    let gateway: SharedStore = Arc::new(SqliteStore::open(&path, TIMEOUT).unwrap());
    let (tx, mut rx) = unbounded_channel();
    gateway.watch(tx);

    // Its own writes are not reported (the gateway invalidates directly).
    let own = record("ws");
    gateway.create(&own, &digest()).await.unwrap();
    gateway
        .touch(&[(own.id.clone(), Timestamp::now())])
        .await
        .unwrap();
    assert_eq!(next_event(&mut rx, Duration::from_millis(700)).await, None);

    // A second store on the same file, as the `portcullis keys` CLI would be.
    let cli: SharedStore = Arc::new(SqliteStore::open(&path, TIMEOUT).unwrap());
    let r = record("ws");
    let d = digest();
    let written = Instant::now();
    cli.create(&r, &d).await.unwrap();
    expect_event(&mut rx, &KeyEvent::Flush, Duration::from_secs(1)).await;
    assert!(written.elapsed() < Duration::from_secs(1));
    assert_eq!(gateway.lookup(&d).await.unwrap().as_ref(), Some(&r));

    cli.delete(&r.id).await.unwrap();
    expect_event(&mut rx, &KeyEvent::Flush, Duration::from_secs(1)).await;
    assert_eq!(gateway.lookup(&d).await.unwrap(), None);

    // The watcher stops once the receiver is gone (no panic, no leak to see).
    drop(rx);
    cli.create(&record("ws"), &digest()).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
}

/// An update, rotation and delete through store A reach a watcher on store B
/// as `Changed(id)` within a second.
async fn watch_across_instances(url: &str) {
    let a = portcullis::keys::open(url, TIMEOUT).await.unwrap();
    let b = portcullis::keys::open(url, TIMEOUT).await.unwrap();
    let (tx, mut rx) = unbounded_channel();
    b.watch(tx);
    // The first event is the Flush that follows subscribing: from then on
    // nothing is missed.
    assert_eq!(
        next_event(&mut rx, Duration::from_secs(5)).await,
        Some(KeyEvent::Flush)
    );

    let mut r = record("ws-watch");
    a.create(&r, &digest()).await.unwrap();
    drain(&mut rx).await;

    r.name = "changed".into();
    let t = Instant::now();
    assert!(a.update(&r).await.unwrap());
    expect_event(
        &mut rx,
        &KeyEvent::Changed(r.id.clone()),
        Duration::from_secs(1),
    )
    .await;
    assert!(t.elapsed() < Duration::from_secs(1));

    assert!(a.rotate(&r, &digest(), Duration::ZERO).await.unwrap());
    expect_event(
        &mut rx,
        &KeyEvent::Changed(r.id.clone()),
        Duration::from_secs(1),
    )
    .await;

    assert!(a.delete(&r.id).await.unwrap());
    expect_event(
        &mut rx,
        &KeyEvent::Changed(r.id.clone()),
        Duration::from_secs(1),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_watch_across_instances() {
    let server = RedisServer::start();
    watch_across_instances(&server.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_cluster_watch_across_instances() {
    let cluster = RedisCluster::start();
    watch_across_instances(&cluster.url()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_kill9_loses_no_acknowledged_create() {
    let mut server = RedisServer::start();
    let store = portcullis::keys::open(&server.url(), TIMEOUT)
        .await
        .unwrap();
    let (tx, mut rx) = unbounded_channel();
    store.watch(tx);
    assert_eq!(
        next_event(&mut rx, Duration::from_secs(5)).await,
        Some(KeyEvent::Flush)
    );

    let mut created = Vec::new();
    for _ in 0..500 {
        let r = record("ws-crash");
        let d = digest();
        store.create(&r, &d).await.unwrap();
        created.push((r, d));
    }
    server.kill9();
    server.restart();

    // A fresh instance sees every acknowledged write.
    let fresh = portcullis::keys::open(&server.url(), TIMEOUT)
        .await
        .unwrap();
    for (r, d) in &created {
        assert_eq!(fresh.get(&r.id).await.unwrap().as_ref(), Some(r));
        assert_eq!(
            fresh.lookup(d).await.unwrap().map(|x| x.id),
            Some(r.id.clone())
        );
    }
    let mut want: Vec<String> = created.iter().map(|(r, _)| r.id.clone()).collect();
    want.sort();
    assert_eq!(list_all(&fresh, Some("ws-crash"), 100).await, want);

    // The old instance reconnects on its own, and its watcher resubscribes
    // and says changes may have been missed.
    let start = Instant::now();
    while store.ping().await.is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "store did not reconnect"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    expect_event(&mut rx, &KeyEvent::Flush, Duration::from_secs(5)).await;
    let ids: BTreeSet<String> = list_all(&store, Some("ws-crash"), 100)
        .await
        .into_iter()
        .collect();
    assert_eq!(ids.len(), 500);
}

#[tokio::test]
async fn redis_open_is_bounded_and_redacted_when_down() {
    // Nothing listens on the port of a server we stopped.
    let mut server = RedisServer::start();
    let port = server.port();
    server.kill9();
    let url = format!("redis://:s3cret-pw@127.0.0.1:{port}/0");
    let start = Instant::now();
    let err = RedisStore::open(&url, Duration::from_millis(800))
        .await
        .err()
        .unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "open took {:?}",
        start.elapsed()
    );
    assert!(matches!(err, StoreError::Unavailable(_)), "{err}");
    assert!(!err.to_string().contains("s3cret-pw"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_calls_time_out_or_fail_while_down() {
    let mut server = RedisServer::start();
    let store = portcullis::keys::open(&server.url(), Duration::from_millis(500))
        .await
        .unwrap();
    store.ping().await.unwrap();
    server.kill9();
    let start = Instant::now();
    let err = store.get("key_x").await.err().unwrap();
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "call took {:?}",
        start.elapsed()
    );
    assert!(
        matches!(err, StoreError::Unavailable(_) | StoreError::Timeout),
        "{err}"
    );
}
