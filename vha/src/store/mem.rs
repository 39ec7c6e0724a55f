//! `MemStore`: the embedded, deterministic store driven by virtual time.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};

use super::{
    ClusterStore, Compare, KeyValue, LeaseId, Revision, StoreError, Txn, TxnOp, TxnResponse, WatchEvent,
    WatchId,
};

/// How many past events are kept for watches that start at an older revision.
const HISTORY_LIMIT: usize = 4096;

#[derive(Debug)]
struct Lease {
    ttl_ms: u64,
    expires_at_ms: u64,
    keys: BTreeSet<String>,
}

#[derive(Debug)]
struct Watch {
    prefix: String,
    pending: Vec<WatchEvent>,
}

#[derive(Debug, Default)]
struct Inner {
    now_ms: u64,
    revision: Revision,
    kv: BTreeMap<String, KeyValue>,
    leases: BTreeMap<i64, Lease>,
    next_lease: i64,
    watches: BTreeMap<u64, Watch>,
    next_watch: u64,
    history: std::collections::VecDeque<WatchEvent>,
    unavailable: bool,
}

/// In-memory [`ClusterStore`] with etcd semantics and a virtual clock.
///
/// Time only moves when the owner calls [`MemStore::advance_to`], so a simulator controls lease
/// expiry exactly; a real-time server calls it from a timer. [`MemStore::set_available`] models a
/// store outage: every operation fails with [`StoreError::Unavailable`], no lease expires, and when
/// the store comes back every lease is renewed for its full TTL (what etcd does on leader change).
#[derive(Debug, Default)]
pub struct MemStore {
    inner: Mutex<Inner>,
}

impl MemStore {
    /// An empty store at virtual time 0 and revision 0.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the maps half-updated in a way that
        // matters more than losing the store; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn live(&self) -> Result<MutexGuard<'_, Inner>, StoreError> {
        let g = self.lock();
        if g.unavailable {
            return Err(StoreError::Unavailable("store outage".into()));
        }
        Ok(g)
    }

    /// Current virtual time in milliseconds.
    pub fn now_ms(&self) -> u64 {
        self.lock().now_ms
    }

    /// Moves virtual time forward to `now_ms` (never backwards) and expires due leases,
    /// deleting their keys. Returns the leases that expired.
    pub fn advance_to(&self, now_ms: u64) -> Vec<LeaseId> {
        let mut g = self.lock();
        g.now_ms = g.now_ms.max(now_ms);
        if g.unavailable {
            return Vec::new();
        }
        let now = g.now_ms;
        let due: Vec<i64> =
            g.leases.iter().filter(|(_, l)| l.expires_at_ms <= now).map(|(id, _)| *id).collect();
        for id in &due {
            g.remove_lease(*id);
        }
        due.into_iter().map(LeaseId).collect()
    }

    /// Starts (`false`) or ends (`true`) a store outage.
    pub fn set_available(&self, available: bool) {
        let mut g = self.lock();
        if available && g.unavailable {
            let now = g.now_ms;
            for l in g.leases.values_mut() {
                l.expires_at_ms = now + l.ttl_ms;
            }
        }
        g.unavailable = !available;
    }

    /// Whether the store is currently serving requests.
    pub fn is_available(&self) -> bool {
        !self.lock().unavailable
    }
}

impl Inner {
    fn emit(&mut self, ev: WatchEvent) {
        for w in self.watches.values_mut() {
            if ev.key().starts_with(&w.prefix) {
                w.pending.push(ev.clone());
            }
        }
        self.history.push_back(ev);
        if self.history.len() > HISTORY_LIMIT {
            self.history.pop_front();
        }
    }

    fn apply_put(&mut self, rev: Revision, key: &str, value: Vec<u8>, lease: Option<LeaseId>) {
        let (create_revision, version, old_lease) = match self.kv.get(key) {
            Some(kv) => (kv.create_revision, kv.version + 1, kv.lease),
            None => (rev, 1, None),
        };
        if let Some(old) = old_lease
            && let Some(l) = self.leases.get_mut(&old.0)
        {
            l.keys.remove(key);
        }
        if let Some(new) = lease
            && let Some(l) = self.leases.get_mut(&new.0)
        {
            l.keys.insert(key.to_string());
        }
        let kv = KeyValue { key: key.to_string(), value, create_revision, mod_revision: rev, version, lease };
        self.kv.insert(key.to_string(), kv.clone());
        self.emit(WatchEvent::Put(kv));
    }

    fn apply_delete(&mut self, rev: Revision, key: &str) -> bool {
        match self.kv.remove(key) {
            Some(kv) => {
                if let Some(l) = kv.lease.and_then(|l| self.leases.get_mut(&l.0)) {
                    l.keys.remove(key);
                }
                self.emit(WatchEvent::Delete { key: key.to_string(), mod_revision: rev });
                true
            }
            None => false,
        }
    }

    fn remove_lease(&mut self, id: i64) {
        if let Some(l) = self.leases.remove(&id)
            && !l.keys.is_empty()
        {
            self.revision += 1;
            let rev = self.revision;
            for k in l.keys {
                if let Some(kv) = self.kv.remove(&k) {
                    debug_assert_eq!(kv.lease, Some(LeaseId(id)));
                    self.emit(WatchEvent::Delete { key: k, mod_revision: rev });
                }
            }
        }
    }

    fn check_lease(&self, lease: Option<LeaseId>) -> Result<(), StoreError> {
        match lease {
            Some(l) if !self.leases.contains_key(&l.0) => Err(StoreError::LeaseNotFound(l)),
            _ => Ok(()),
        }
    }

    fn holds(&self, c: &Compare) -> bool {
        match c {
            Compare::ModRevision { key, revision } => {
                self.kv.get(key).map_or(0, |kv| kv.mod_revision) == *revision
            }
            Compare::CreateRevision { key, revision } => {
                self.kv.get(key).map_or(0, |kv| kv.create_revision) == *revision
            }
            Compare::Value { key, value } => self.kv.get(key).is_some_and(|kv| kv.value == *value),
        }
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    Ok(())
}

impl ClusterStore for MemStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        Ok(self.live()?.kv.get(key).cloned())
    }

    fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let g = self.live()?;
        let kvs =
            g.kv.range(prefix.to_string()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(_, v)| v.clone())
                .collect();
        Ok((kvs, g.revision))
    }

    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let mut g = self.live()?;
        g.check_lease(lease)?;
        g.revision += 1;
        let rev = g.revision;
        g.apply_put(rev, key, value, lease);
        Ok(rev)
    }

    fn delete(&self, key: &str) -> Result<(Revision, bool), StoreError> {
        check_key(key)?;
        let mut g = self.live()?;
        if !g.kv.contains_key(key) {
            return Ok((g.revision, false));
        }
        g.revision += 1;
        let rev = g.revision;
        let existed = g.apply_delete(rev, key);
        Ok((rev, existed))
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        let mut g = self.live()?;
        for c in &txn.compares {
            let key = match c {
                Compare::ModRevision { key, .. }
                | Compare::CreateRevision { key, .. }
                | Compare::Value { key, .. } => key,
            };
            check_key(key)?;
        }
        let succeeded = txn.compares.iter().all(|c| g.holds(c));
        let ops = if succeeded { txn.success } else { txn.failure };
        for op in &ops {
            match op {
                TxnOp::Put { key, lease, .. } => {
                    check_key(key)?;
                    g.check_lease(*lease)?;
                }
                TxnOp::Delete { key } | TxnOp::Get { key } => check_key(key)?,
            }
        }
        let writes = ops.iter().any(|op| match op {
            TxnOp::Put { .. } => true,
            TxnOp::Delete { key } => g.kv.contains_key(key),
            TxnOp::Get { .. } => false,
        });
        if writes {
            g.revision += 1;
        }
        let rev = g.revision;
        let mut gets = Vec::new();
        for op in ops {
            match op {
                TxnOp::Put { key, value, lease } => g.apply_put(rev, &key, value, lease),
                TxnOp::Delete { key } => {
                    g.apply_delete(rev, &key);
                }
                TxnOp::Get { key } => gets.push(g.kv.get(&key).cloned()),
            }
        }
        Ok(TxnResponse { succeeded, revision: rev, gets })
    }

    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        if ttl_ms == 0 {
            return Err(StoreError::Invalid("lease TTL must be > 0".into()));
        }
        let mut g = self.live()?;
        g.next_lease += 1;
        let id = g.next_lease;
        let expires_at_ms = g.now_ms + ttl_ms;
        g.leases.insert(id, Lease { ttl_ms, expires_at_ms, keys: BTreeSet::new() });
        Ok(LeaseId(id))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<u64, StoreError> {
        let mut g = self.live()?;
        let now = g.now_ms;
        let l = g.leases.get_mut(&lease.0).ok_or(StoreError::LeaseNotFound(lease))?;
        l.expires_at_ms = now + l.ttl_ms;
        Ok(l.ttl_ms)
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut g = self.live()?;
        if !g.leases.contains_key(&lease.0) {
            return Err(StoreError::LeaseNotFound(lease));
        }
        g.remove_lease(lease.0);
        Ok(())
    }

    fn lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        Ok(self.live()?.leases.contains_key(&lease.0))
    }

    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchId, StoreError> {
        let mut g = self.live()?;
        let mut pending = Vec::new();
        if from_revision != 0 && from_revision <= g.revision {
            let oldest = g.history.front().map_or(g.revision + 1, |e| e.revision());
            if from_revision < oldest {
                return Err(StoreError::Compacted { requested: from_revision, oldest });
            }
            pending.extend(
                g.history
                    .iter()
                    .filter(|e| e.revision() >= from_revision && e.key().starts_with(prefix))
                    .cloned(),
            );
        }
        g.next_watch += 1;
        let id = g.next_watch;
        g.watches.insert(id, Watch { prefix: prefix.to_string(), pending });
        Ok(WatchId(id))
    }

    fn poll_watch(&self, watch: WatchId) -> Result<Vec<WatchEvent>, StoreError> {
        let mut g = self.live()?;
        let w = g.watches.get_mut(&watch.0).ok_or(StoreError::WatchNotFound(watch))?;
        Ok(std::mem::take(&mut w.pending))
    }

    fn cancel_watch(&self, watch: WatchId) -> Result<(), StoreError> {
        let mut g = self.live()?;
        g.watches.remove(&watch.0).map(|_| ()).ok_or(StoreError::WatchNotFound(watch))
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        Ok(self.live()?.revision)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Op {
        Put(u8),
        Delete(u8),
        Cas(u8, bool),
        Advance(u16),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0u8..4).prop_map(Op::Put),
            (0u8..4).prop_map(Op::Delete),
            (0u8..4, any::<bool>()).prop_map(|(k, b)| Op::Cas(k, b)),
            (0u16..700).prop_map(Op::Advance),
        ]
    }

    proptest! {
        /// Against a plain map model: values match, revisions only grow, CAS with the current
        /// mod revision succeeds and with a stale one fails, leased keys vanish at expiry.
        #[test]
        fn memstore_matches_model(ops in proptest::collection::vec(op(), 1..60)) {
            let s = MemStore::new();
            let mut model: BTreeMap<String, (Vec<u8>, u64)> = BTreeMap::new();
            let mut last_rev = 0;
            let lease = s.grant_lease(1000).unwrap();
            let mut lease_deadline = 1000u64;
            for (i, op) in ops.into_iter().enumerate() {
                let val = vec![i as u8];
                match op {
                    Op::Put(k) => {
                        let key = format!("k{k}");
                        let leased = k == 3 && s.lease_alive(lease).unwrap();
                        let rev = s.put(&key, val.clone(), leased.then_some(lease)).unwrap();
                        prop_assert!(rev > last_rev);
                        last_rev = rev;
                        model.insert(key, (val, rev));
                    }
                    Op::Delete(k) => {
                        let key = format!("k{k}");
                        let (rev, existed) = s.delete(&key).unwrap();
                        prop_assert_eq!(existed, model.remove(&key).is_some());
                        prop_assert!(rev >= last_rev);
                        last_rev = rev;
                    }
                    Op::Cas(k, fresh) => {
                        let key = format!("k{k}");
                        let cur = model.get(&key).map_or(0, |(_, r)| *r);
                        let token = if fresh { cur } else { cur + 1 };
                        let r = s.txn(Txn::new().when(Compare::mod_rev(&key, token)).and_then(
                            TxnOp::Put { key: key.clone(), value: val.clone(), lease: None })).unwrap();
                        prop_assert_eq!(r.succeeded, fresh);
                        if fresh {
                            prop_assert!(r.revision > last_rev);
                            last_rev = r.revision;
                            model.insert(key, (val, r.revision));
                        }
                    }
                    Op::Advance(ms) => {
                        let now = s.now_ms() + ms as u64;
                        s.advance_to(now);
                        if now >= lease_deadline {
                            lease_deadline = u64::MAX;
                            if let Some(kv) = s.get("k3").unwrap() {
                                prop_assert!(kv.lease.is_none());
                            }
                            // Leased key k3 vanished (if it was leased) – resync the model.
                            if s.get("k3").unwrap().is_none() {
                                model.remove("k3");
                            }
                            last_rev = s.revision().unwrap();
                        }
                    }
                }
                let (kvs, _) = s.get_prefix("k").unwrap();
                let got: Vec<_> = kvs.iter().map(|kv| (kv.key.clone(), kv.value.clone())).collect();
                let want: Vec<_> = model.iter().map(|(k, (v, _))| (k.clone(), v.clone())).collect();
                prop_assert_eq!(got, want);
            }
        }
    }
}
