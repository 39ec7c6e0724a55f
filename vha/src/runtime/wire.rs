//! The embedded store's wire protocol: one JSON request per line, one JSON response per line.

use serde::{Deserialize, Serialize};

use crate::store::{
    ClusterStore, KeyValue, LeaseId, Revision, StoreError, Txn, TxnResponse, WatchEvent, WatchId,
};

/// A store request (one per [`ClusterStore`] method).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Request {
    Get { key: String },
    GetPrefix { prefix: String },
    Put { key: String, value: Vec<u8>, lease: Option<LeaseId> },
    Delete { key: String },
    Txn(Txn),
    Grant { ttl_ms: u64 },
    KeepAlive(LeaseId),
    Revoke(LeaseId),
    LeaseAlive(LeaseId),
    Watch { prefix: String, from: Revision },
    PollWatch(WatchId),
    CancelWatch(WatchId),
    Revision,
}

/// A successful store reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub enum Reply {
    Kv(Option<KeyValue>),
    Kvs(Vec<KeyValue>, Revision),
    Rev(Revision),
    Deleted(Revision, bool),
    Txn(TxnResponse),
    Lease(LeaseId),
    Ttl(u64),
    Unit,
    Bool(bool),
    Watch(WatchId),
    Events(Vec<WatchEvent>),
}

/// Carries out a request on a local store.
pub fn serve(store: &dyn ClusterStore, req: Request) -> Result<Reply, StoreError> {
    Ok(match req {
        Request::Get { key } => Reply::Kv(store.get(&key)?),
        Request::GetPrefix { prefix } => {
            let (kvs, rev) = store.get_prefix(&prefix)?;
            Reply::Kvs(kvs, rev)
        }
        Request::Put { key, value, lease } => Reply::Rev(store.put(&key, value, lease)?),
        Request::Delete { key } => {
            let (rev, existed) = store.delete(&key)?;
            Reply::Deleted(rev, existed)
        }
        Request::Txn(t) => Reply::Txn(store.txn(t)?),
        Request::Grant { ttl_ms } => Reply::Lease(store.grant_lease(ttl_ms)?),
        Request::KeepAlive(l) => Reply::Ttl(store.keep_alive(l)?),
        Request::Revoke(l) => {
            store.revoke_lease(l)?;
            Reply::Unit
        }
        Request::LeaseAlive(l) => Reply::Bool(store.lease_alive(l)?),
        Request::Watch { prefix, from } => Reply::Watch(store.watch(&prefix, from)?),
        Request::PollWatch(w) => Reply::Events(store.poll_watch(w)?),
        Request::CancelWatch(w) => {
            store.cancel_watch(w)?;
            Reply::Unit
        }
        Request::Revision => Reply::Rev(store.revision()?),
    })
}
