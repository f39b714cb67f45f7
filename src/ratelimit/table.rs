//! The in-process state: one [`Entry`] per (limit, subject), in a fixed
//! number of mutex-protected shards.
//!
//! A decision locks every shard its limits live in, in ascending shard
//! order (so two decisions never deadlock), checks all limits, counts all
//! or none, and unlocks: atomic across limits. No lock is ever held across
//! an `.await`. Lookups borrow the request's strings (no allocation); a key
//! is allocated only when an entry is first created.

use super::window::WindowState;
use crate::config::{Limit, Scope};
use foldhash::fast::RandomState;
use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hash, Hasher};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

/// Number of shards (one bit each in a `u64` mask).
pub const SHARDS: usize = 64;

/// How often a shard drops entries that no longer count anything.
const SWEEP_EVERY_MS: u64 = 30_000;

/// The identity of a limit: two limits differing in any field keep separate state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct LimitId {
    /// What it counts against.
    pub scope: Scope,
    /// Requests per window.
    pub requests: u64,
    /// Window length in milliseconds (≥ 1).
    pub per_ms: u64,
}

impl LimitId {
    /// The identity of a configured limit.
    pub fn of(l: &Limit) -> Self {
        let per_ms = u64::try_from(l.per.as_millis()).unwrap_or(u64::MAX).max(1);
        LimitId {
            scope: l.scope,
            requests: l.requests,
            per_ms,
        }
    }
}

/// The parts of an entry's key: limit identity plus subject. The subject is
/// `(key id, "")` for `key`, `(workspace, "")` for `workspace` and
/// `(key id, route)` for `route`.
pub trait KeyView {
    /// The limit.
    fn id(&self) -> LimitId;
    /// First part of the subject.
    fn a(&self) -> &str;
    /// Second part of the subject (the route, or empty).
    fn b(&self) -> &str;
    /// [`key_hash`] of the three, computed once when the key was made.
    fn hash_value(&self) -> u64;
}

/// Seeds the hash of every entry key in the process: one random seed, so
/// that a key's hash (made once per request and limit) picks both its shard
/// and its place in the shard's map.
static KEY_HASHER: std::sync::LazyLock<RandomState> =
    std::sync::LazyLock::new(RandomState::default);

/// The hash of an entry key.
fn key_hash(id: LimitId, a: &str, b: &str) -> u64 {
    let mut h = KEY_HASHER.build_hasher();
    id.hash(&mut h);
    a.hash(&mut h);
    b.hash(&mut h);
    h.finish()
}

impl Hash for dyn KeyView + '_ {
    fn hash<H: Hasher>(&self, h: &mut H) {
        h.write_u64(self.hash_value());
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, o: &Self) -> bool {
        self.hash_value() == o.hash_value()
            && self.id() == o.id()
            && self.a() == o.a()
            && self.b() == o.b()
    }
}

/// The hasher of the shards' maps: keys arrive hashed ([`KeyView::hash_value`]),
/// so it passes that hash through instead of hashing the key again.
#[derive(Default)]
pub struct PassThrough(u64);

impl Hasher for PassThrough {
    fn write(&mut self, bytes: &[u8]) {
        // Not reached (keys write one u64); hashes whatever comes anyway.
        for b in bytes {
            self.0 = (self.0.rotate_left(8) ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    fn finish(&self) -> u64 {
        self.0
    }
}

impl Eq for dyn KeyView + '_ {}

/// An owned entry key (cheap to clone).
#[derive(Clone, Debug)]
pub struct EntryKey {
    /// The limit.
    pub id: LimitId,
    /// First part of the subject.
    pub a: Arc<str>,
    /// Second part of the subject.
    pub b: Arc<str>,
    hash: u64,
}

impl KeyView for EntryKey {
    fn id(&self) -> LimitId {
        self.id
    }
    fn a(&self) -> &str {
        &self.a
    }
    fn b(&self) -> &str {
        &self.b
    }
    fn hash_value(&self) -> u64 {
        self.hash
    }
}

impl<'a> Borrow<dyn KeyView + 'a> for EntryKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl Hash for EntryKey {
    fn hash<H: Hasher>(&self, h: &mut H) {
        (self as &dyn KeyView).hash(h)
    }
}

impl PartialEq for EntryKey {
    fn eq(&self, o: &Self) -> bool {
        (self as &dyn KeyView) == (o as &dyn KeyView)
    }
}

impl Eq for EntryKey {}

/// A borrowed entry key, built per request without allocating.
#[derive(Clone, Copy, Debug)]
pub struct KeyRef<'r> {
    /// The limit.
    pub id: LimitId,
    /// First part of the subject.
    pub a: &'r str,
    /// Second part of the subject.
    pub b: &'r str,
    hash: u64,
}

impl<'r> KeyRef<'r> {
    /// The key of limit `id` for a request by `key_id` in `workspace` on `route`.
    pub fn new(id: LimitId, key_id: &'r str, workspace: &'r str, route: &'r str) -> Self {
        let (a, b) = match id.scope {
            Scope::Key => (key_id, ""),
            Scope::Workspace => (workspace, ""),
            Scope::Route => (key_id, route),
        };
        KeyRef {
            id,
            a,
            b,
            hash: key_hash(id, a, b),
        }
    }

    /// An owned copy.
    pub fn to_owned_key(self) -> EntryKey {
        EntryKey {
            id: self.id,
            a: Arc::from(self.a),
            b: Arc::from(self.b),
            hash: self.hash,
        }
    }
}

impl KeyView for KeyRef<'_> {
    fn id(&self) -> LimitId {
        self.id
    }
    fn a(&self) -> &str {
        self.a
    }
    fn b(&self) -> &str {
        self.b
    }
    fn hash_value(&self) -> u64 {
        self.hash
    }
}

/// Everything one instance keeps about one (limit, subject).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Entry {
    /// Mode `local`, and the `on_store_error = "local"` fallback of mode `redis`.
    pub local: WindowState,
    /// Hybrid: the newest global counters read from Redis.
    pub global: WindowState,
    /// Hybrid: local admits being pushed to Redis right now.
    pub inflight: WindowState,
    /// Hybrid: local admits not yet pushed.
    pub pending: WindowState,
    /// Refusal memo: until when (local clock, ms) this (limit, subject)
    /// refuses without asking Redis; 0 for none.
    pub refused_until: u64,
    /// Hybrid: whether the key is in its shard's `dirty` list.
    pub queued: bool,
}

impl Entry {
    /// Hybrid: what this instance believes the global counters are.
    pub fn view(&self) -> WindowState {
        self.global.plus(self.inflight).plus(self.pending)
    }

    /// Whether the entry can be dropped: nothing it counts affects an
    /// estimate at `now_ms` any more and no refusal is remembered.
    fn idle(&self, per_ms: u64, now_ms: u64, mono_ms: u64) -> bool {
        let w = super::window::window_index(now_ms, per_ms);
        let gone = |s: &WindowState| s.is_empty() || s.window.saturating_add(2) <= w;
        gone(&self.local)
            && gone(&self.global)
            && self.inflight.is_empty()
            && gone(&self.pending)
            && self.refused_until <= mono_ms
    }
}

/// One shard.
#[derive(Debug, Default)]
pub struct Shard {
    /// The entries.
    /// Keyed by their hash, made once per key ([`PassThrough`]): a decision
    /// looks each limit up twice, and hashing the key cost more than the
    /// rest of the lookup.
    pub map: HashMap<EntryKey, Entry, BuildHasherDefault<PassThrough>>,
    /// Hybrid: keys whose `pending` became non-zero since the last flush.
    pub dirty: Vec<EntryKey>,
    next_sweep_ms: u64,
}

impl Shard {
    /// The entry for `k`, if any.
    pub fn get(&self, k: &KeyRef<'_>) -> Option<&Entry> {
        self.map.get(k as &dyn KeyView)
    }

    /// Changes the entry for `k`, creating it (allocating its key) first if needed.
    pub fn update<R>(&mut self, k: &KeyRef<'_>, f: impl FnOnce(&mut Entry) -> R) -> R {
        match self.map.get_mut(k as &dyn KeyView) {
            Some(e) => f(e),
            None => {
                let mut e = Entry::default();
                let r = f(&mut e);
                self.map.insert(k.to_owned_key(), e);
                r
            }
        }
    }

    /// Now and then, drops the entries that count nothing any more.
    pub fn maybe_sweep(&mut self, now_ms: u64, mono_ms: u64) {
        if mono_ms < self.next_sweep_ms {
            return;
        }
        self.next_sweep_ms = mono_ms.saturating_add(SWEEP_EVERY_MS);
        self.map
            .retain(|k, e| !e.idle(k.id.per_ms, now_ms, mono_ms));
    }
}

/// The sharded table.
#[derive(Debug)]
pub struct Table {
    shards: Box<[Mutex<Shard>]>,
}

impl Default for Table {
    fn default() -> Self {
        Table {
            shards: (0..SHARDS).map(|_| Mutex::new(Shard::default())).collect(),
        }
    }
}

impl Table {
    /// The shard `k` lives in.
    pub fn shard_of(&self, k: &dyn KeyView) -> usize {
        // Middle bits: the shard's map places keys by the low bits and tags
        // them with the top ones, which must vary within a shard.
        ((k.hash_value() >> 32) % SHARDS as u64) as usize
    }

    fn lock_one(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.shards[i]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Locks the shards whose bits are set in `mask`, in ascending order.
    pub fn lock(&self, mask: u64) -> Locked<'_> {
        let mut locked = Locked {
            table: self,
            guards: Default::default(),
            more: Vec::new(),
        };
        let mut m = mask;
        while m != 0 {
            let i = m.trailing_zeros() as usize;
            locked.push(i, self.lock_one(i));
            m &= m - 1;
        }
        locked
    }

    /// Locks one shard.
    pub fn lock_shard(&self, i: usize) -> MutexGuard<'_, Shard> {
        self.lock_one(i % SHARDS)
    }
}

/// Shards a decision usually locks at most (one per limit): kept inline.
const INLINE_GUARDS: usize = 4;

/// A set of locked shards.
pub struct Locked<'t> {
    table: &'t Table,
    // A request has a limit or two: a few slots, not one per shard (which
    // cost a 1 KiB array to fill and drop per decision).
    guards: [Option<(usize, MutexGuard<'t, Shard>)>; INLINE_GUARDS],
    more: Vec<(usize, MutexGuard<'t, Shard>)>,
}

impl<'t> Locked<'t> {
    fn push(&mut self, i: usize, g: MutexGuard<'t, Shard>) {
        match self.guards.iter_mut().find(|s| s.is_none()) {
            Some(slot) => *slot = Some((i, g)),
            None => self.more.push((i, g)),
        }
    }

    /// Shard `i`, which must be in the mask the set was locked with
    /// (otherwise it is locked now, out of order, rather than panicking).
    pub fn shard(&mut self, i: usize) -> &mut Shard {
        let i = i % SHARDS;
        let inline = self
            .guards
            .iter()
            .position(|s| matches!(s, Some((j, _)) if *j == i));
        if let Some(p) = inline
            && let Some((_, g)) = &mut self.guards[p]
        {
            return g;
        }
        let p = match self.more.iter().position(|(j, _)| *j == i) {
            Some(p) => p,
            None => {
                let g = self.table.lock_one(i);
                self.more.push((i, g));
                self.more.len() - 1
            }
        };
        &mut self.more[p].1
    }

    /// Gives every locked shard a chance to sweep.
    pub fn sweep(&mut self, now_ms: u64, mono_ms: u64) {
        for (_, g) in self.guards.iter_mut().flatten().chain(self.more.iter_mut()) {
            g.maybe_sweep(now_ms, mono_ms);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn id(scope: Scope, requests: u64, secs: u64) -> LimitId {
        LimitId::of(&Limit {
            scope,
            requests,
            per: Duration::from_secs(secs),
        })
    }

    #[test]
    fn borrowed_and_owned_keys_agree() {
        let t = Table::default();
        let k = KeyRef::new(id(Scope::Route, 5, 1), "key_1", "ws", "sms.send");
        assert_eq!((k.a, k.b), ("key_1", "sms.send"));
        let owned = k.to_owned_key();
        assert_eq!(t.shard_of(&k), t.shard_of(&owned));
        let mut s = Shard::default();
        s.update(&k, |e| e.local.curr = 3);
        assert_eq!(s.get(&k).map(|e| e.local.curr), Some(3));
        // Same subject, other limit identity or scope: separate state.
        for other in [
            KeyRef::new(id(Scope::Route, 6, 1), "key_1", "ws", "sms.send"),
            KeyRef::new(id(Scope::Route, 5, 2), "key_1", "ws", "sms.send"),
            KeyRef::new(id(Scope::Key, 5, 1), "key_1", "ws", "sms.send"),
            KeyRef::new(id(Scope::Route, 5, 1), "key_1", "ws", "sms.other"),
        ] {
            assert!(s.get(&other).is_none(), "{other:?}");
        }
        // Workspace scope keys on the workspace only.
        let w1 = KeyRef::new(id(Scope::Workspace, 5, 1), "key_1", "ws", "a");
        let w2 = KeyRef::new(id(Scope::Workspace, 5, 1), "key_2", "ws", "b");
        s.update(&w1, |e| e.local.curr = 1);
        assert_eq!(s.get(&w2).map(|e| e.local.curr), Some(1));
    }

    #[test]
    fn sweep_drops_only_idle_entries() {
        let mut s = Shard::default();
        let k1 = KeyRef::new(id(Scope::Key, 5, 1), "old", "ws", "");
        let k2 = KeyRef::new(id(Scope::Key, 5, 1), "new", "ws", "");
        let now = 1_000_000;
        s.update(&k1, |e| {
            e.local = WindowState {
                window: 990,
                curr: 3,
                prev: 0,
            }
        });
        s.update(&k2, |e| {
            e.local = WindowState {
                window: 999,
                curr: 3,
                prev: 0,
            }
        });
        s.maybe_sweep(now, 5);
        assert!(s.get(&k1).is_none());
        assert!(s.get(&k2).is_some());
    }

    #[test]
    fn locking_many_shards_in_order() {
        let t = Table::default();
        let mut l = t.lock(u64::MAX);
        for i in 0..SHARDS {
            assert!(l.shard(i).map.is_empty());
        }
        drop(l);
        let mut l = t.lock(0b101);
        l.shard(0);
        l.shard(2);
    }

    #[test]
    fn each_locked_shard_is_its_own_and_stays_locked_while_held() {
        let t = Table::default();
        let k = KeyRef::new(id(Scope::Key, 5, 1), "key_1", "ws", "");
        let mut l = t.lock(0b1011_0111); // more shards than kept inline
        for i in [0, 1, 2, 4, 5, 7] {
            l.shard(i).update(&k, |e| e.refused_until = i as u64);
        }
        // One not in the mask: locked now, out of order.
        l.shard(9).update(&k, |e| e.refused_until = 9);
        for i in [0, 1, 2, 4, 5, 7, 9] {
            assert_eq!(l.shard(i).get(&k).map(|e| e.refused_until), Some(i as u64));
            assert!(t.shards[i].try_lock().is_err(), "shard {i} is held");
        }
        assert!(t.shards[3].try_lock().is_ok());
        drop(l);
        assert!((0..SHARDS).all(|i| t.shards[i].try_lock().is_ok()));
    }
}
