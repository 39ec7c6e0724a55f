//! A host's view of the shared store in the simulator: unavailable while the host is cut off.

use crate::store::{
    ClusterStore, KeyValue, LeaseId, MemStore, Revision, StoreError, Txn, TxnResponse, WatchEvent, WatchId,
};

/// The shared [`MemStore`] as one host reaches it; every call fails while `cut` is set.
#[derive(Debug)]
pub struct HostStore<'a> {
    /// The store.
    pub store: &'a MemStore,
    /// Whether this host is partitioned from the store.
    pub cut: bool,
}

impl HostStore<'_> {
    fn up(&self) -> Result<&MemStore, StoreError> {
        if self.cut {
            Err(StoreError::Unavailable("partitioned from the store".into()))
        } else {
            Ok(self.store)
        }
    }
}

impl ClusterStore for HostStore<'_> {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        self.up()?.get(key)
    }
    fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        self.up()?.get_prefix(prefix)
    }
    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        self.up()?.put(key, value, lease)
    }
    fn delete(&self, key: &str) -> Result<(Revision, bool), StoreError> {
        self.up()?.delete(key)
    }
    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        self.up()?.txn(txn)
    }
    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        self.up()?.grant_lease(ttl_ms)
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<u64, StoreError> {
        self.up()?.keep_alive(lease)
    }
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        self.up()?.revoke_lease(lease)
    }
    fn lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        self.up()?.lease_alive(lease)
    }
    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchId, StoreError> {
        self.up()?.watch(prefix, from_revision)
    }
    fn poll_watch(&self, watch: WatchId) -> Result<Vec<WatchEvent>, StoreError> {
        self.up()?.poll_watch(watch)
    }
    fn cancel_watch(&self, watch: WatchId) -> Result<(), StoreError> {
        self.up()?.cancel_watch(watch)
    }
    fn revision(&self) -> Result<Revision, StoreError> {
        self.up()?.revision()
    }
}
