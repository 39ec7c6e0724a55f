//! The cluster store: the one piece of shared truth HA relies on.
//!
//! [`ClusterStore`] is a small, synchronous subset of the etcd v3 API: keys with revisions, leases
//! with a TTL and keep-alive (keys attached to a lease vanish when it expires), compare-and-swap
//! transactions, and pull-based watches. [`MemStore`] is the embedded, deterministic backend driven
//! by virtual time; `EtcdStore` (feature `etcd`) is the real distributed one. Both pass the same
//! conformance suite (`conformance::check_store`, feature `test-utils`).

mod mem;
pub use mem::MemStore;

#[cfg(feature = "etcd")]
mod etcd;
#[cfg(feature = "etcd")]
pub use etcd::EtcdStore;

#[cfg(any(test, feature = "test-utils"))]
pub mod conformance;

use serde::{Deserialize, Serialize};

/// A store revision: a cluster-wide counter bumped by every modification. Revisions double as
/// fencing tokens.
pub type Revision = u64;

/// Identifier of a lease granted by the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub i64);

/// One key with its value and metadata, as etcd reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    /// The key.
    pub key: String,
    /// The value bytes.
    pub value: Vec<u8>,
    /// Revision at which the key was created (since its last deletion).
    pub create_revision: Revision,
    /// Revision of the last modification of the key.
    pub mod_revision: Revision,
    /// Number of modifications since creation (1 after the first put).
    pub version: u64,
    /// Lease the key is attached to, if any.
    pub lease: Option<LeaseId>,
}

/// A condition in a transaction. All conditions must hold for the success branch to run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compare {
    /// The key's `mod_revision` equals the value (0 means: the key does not exist).
    ModRevision {
        /// Key to inspect.
        key: String,
        /// Expected modification revision.
        revision: Revision,
    },
    /// The key's `create_revision` equals the value (0 means: the key does not exist).
    CreateRevision {
        /// Key to inspect.
        key: String,
        /// Expected creation revision.
        revision: Revision,
    },
    /// The key exists and holds exactly these bytes.
    Value {
        /// Key to inspect.
        key: String,
        /// Expected value.
        value: Vec<u8>,
    },
}

impl Compare {
    /// The condition "key does not exist".
    pub fn absent(key: impl Into<String>) -> Self {
        Compare::CreateRevision { key: key.into(), revision: 0 }
    }

    /// The condition "key was last modified at `revision`" (a fencing-token check).
    pub fn mod_rev(key: impl Into<String>, revision: Revision) -> Self {
        Compare::ModRevision { key: key.into(), revision }
    }
}

/// One operation inside a transaction branch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    /// Write a key, optionally attached to a lease.
    Put {
        /// Key to write.
        key: String,
        /// Value to store.
        value: Vec<u8>,
        /// Lease to attach the key to.
        lease: Option<LeaseId>,
    },
    /// Delete a key (no-op if absent).
    Delete {
        /// Key to delete.
        key: String,
    },
    /// Read a key; the result appears in [`TxnResponse::gets`].
    Get {
        /// Key to read.
        key: String,
    },
}

/// A compare-and-swap transaction: `if compares { success } else { failure }`, atomically.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    /// Conditions, all of which must hold.
    pub compares: Vec<Compare>,
    /// Operations run when every condition holds.
    pub success: Vec<TxnOp>,
    /// Operations run otherwise.
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// An empty transaction.
    pub fn new() -> Self {
        Self::default()
    }
    /// Adds a condition.
    pub fn when(mut self, c: Compare) -> Self {
        self.compares.push(c);
        self
    }
    /// Adds an operation to the success branch.
    pub fn and_then(mut self, op: TxnOp) -> Self {
        self.success.push(op);
        self
    }
    /// Adds an operation to the failure branch.
    pub fn or_else(mut self, op: TxnOp) -> Self {
        self.failure.push(op);
        self
    }
}

/// Result of a transaction.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxnResponse {
    /// Whether every condition held (the success branch ran).
    pub succeeded: bool,
    /// Store revision after the transaction (the new revision if it wrote anything).
    pub revision: Revision,
    /// Results of the `Get` operations of the branch that ran, in order.
    pub gets: Vec<Option<KeyValue>>,
}

/// A change observed by a watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    /// A key was created or modified.
    Put(KeyValue),
    /// A key was deleted (explicitly or by lease expiry).
    Delete {
        /// The deleted key.
        key: String,
        /// Revision of the deletion.
        mod_revision: Revision,
    },
}

impl WatchEvent {
    /// The key this event concerns.
    pub fn key(&self) -> &str {
        match self {
            WatchEvent::Put(kv) => &kv.key,
            WatchEvent::Delete { key, .. } => key,
        }
    }
    /// The revision of the change.
    pub fn revision(&self) -> Revision {
        match self {
            WatchEvent::Put(kv) => kv.mod_revision,
            WatchEvent::Delete { mod_revision, .. } => *mod_revision,
        }
    }
}

/// Identifier of a watch created by [`ClusterStore::watch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct WatchId(pub u64);

/// Errors of store operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum StoreError {
    /// The store could not be reached (outage or partition); the operation may not have happened.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The lease does not exist (never granted, revoked or expired).
    #[error("lease {0:?} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    /// The watch does not exist.
    #[error("watch {0:?} not found")]
    WatchNotFound(WatchId),
    /// The requested revision was compacted away.
    #[error("revision {requested} compacted (oldest kept is {oldest})")]
    Compacted {
        /// Revision asked for.
        requested: Revision,
        /// Oldest revision still available.
        oldest: Revision,
    },
    /// The request was malformed (empty key, zero TTL, ...).
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The backend reported an error it could not classify.
    #[error("backend error: {0}")]
    Backend(String),
}

/// The cluster store used by HA: leases, revisions, compare-and-swap, watches.
///
/// Implementations are synchronous and take `&self`, so one store can be shared between threads
/// (behind an `Arc`) or between simulated hosts. Watches are pull-based: [`ClusterStore::poll_watch`]
/// drains the events seen so far without blocking, which suits both a sans-I/O core and a real
/// event loop.
pub trait ClusterStore: std::fmt::Debug {
    /// Reads one key.
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError>;
    /// Reads every key starting with `prefix`, sorted by key, with the revision of the read.
    fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError>;
    /// Writes a key, optionally attached to a lease; returns the new revision.
    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError>;
    /// Deletes a key; returns the store revision afterwards and whether the key existed.
    fn delete(&self, key: &str) -> Result<(Revision, bool), StoreError>;
    /// Runs a compare-and-swap transaction atomically.
    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError>;
    /// Grants a lease of `ttl_ms` milliseconds (backends may round up, e.g. etcd to whole seconds).
    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError>;
    /// Renews a lease for its full TTL; returns the TTL granted in milliseconds.
    fn keep_alive(&self, lease: LeaseId) -> Result<u64, StoreError>;
    /// Revokes a lease, deleting every key attached to it.
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError>;
    /// Whether a lease is currently alive.
    fn lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError>;
    /// Starts watching keys under `prefix` for changes with revision `>= from_revision`
    /// (0 = changes after the current revision).
    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchId, StoreError>;
    /// Drains the events a watch has collected so far (never blocks).
    fn poll_watch(&self, watch: WatchId) -> Result<Vec<WatchEvent>, StoreError>;
    /// Cancels a watch.
    fn cancel_watch(&self, watch: WatchId) -> Result<(), StoreError>;
    /// Current store revision.
    fn revision(&self) -> Result<Revision, StoreError>;
}

/// Implements `ClusterStore` for a pointer type by forwarding every call to the pointee.
macro_rules! forward_cluster_store {
    ($($ptr:ty),*) => {$(
        impl<S: ClusterStore + ?Sized> ClusterStore for $ptr {
            fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
                (**self).get(key)
            }
            fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
                (**self).get_prefix(prefix)
            }
            fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
                (**self).put(key, value, lease)
            }
            fn delete(&self, key: &str) -> Result<(Revision, bool), StoreError> {
                (**self).delete(key)
            }
            fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
                (**self).txn(txn)
            }
            fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
                (**self).grant_lease(ttl_ms)
            }
            fn keep_alive(&self, lease: LeaseId) -> Result<u64, StoreError> {
                (**self).keep_alive(lease)
            }
            fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
                (**self).revoke_lease(lease)
            }
            fn lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
                (**self).lease_alive(lease)
            }
            fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchId, StoreError> {
                (**self).watch(prefix, from_revision)
            }
            fn poll_watch(&self, watch: WatchId) -> Result<Vec<WatchEvent>, StoreError> {
                (**self).poll_watch(watch)
            }
            fn cancel_watch(&self, watch: WatchId) -> Result<(), StoreError> {
                (**self).cancel_watch(watch)
            }
            fn revision(&self) -> Result<Revision, StoreError> {
                (**self).revision()
            }
}
    )*};
}

forward_cluster_store!(&S, std::sync::Arc<S>);
