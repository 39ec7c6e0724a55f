//! `EtcdStore`: the [`ClusterStore`] on a real etcd v3 cluster (feature `etcd`).
//!
//! A synchronous facade over the async `etcd-client`: the store owns a small tokio runtime
//! (one worker thread) and blocks on each request, with a per-request timeout so a partitioned
//! host sees [`StoreError::Unavailable`] quickly. Watches run as background tasks that buffer
//! events until [`ClusterStore::poll_watch`] drains them.
//!
//! etcd counts lease TTLs in whole seconds: `grant_lease` rounds up, and etcd raises TTLs below
//! its minimum (1.5 x election timeout) to that minimum.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{
    Client, Compare as ECompare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, PutOptions,
    Txn as ETxn, TxnOp as ETxnOp, TxnOpResponse, WatchOptions,
};

use super::{
    ClusterStore, Compare, KeyValue, LeaseId, Revision, StoreError, Txn, TxnOp, TxnResponse, WatchEvent,
    WatchId,
};

#[derive(Debug)]
struct WatchSlot {
    events: Arc<Mutex<Vec<WatchEvent>>>,
    task: tokio::task::JoinHandle<()>,
}

/// A [`ClusterStore`] backed by etcd.
pub struct EtcdStore {
    rt: tokio::runtime::Runtime,
    client: Client,
    timeout: Duration,
    watches: Mutex<BTreeMap<u64, WatchSlot>>,
    next_watch: Mutex<u64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("timeout", &self.timeout).finish_non_exhaustive()
    }
}

fn map_err(e: etcd_client::Error, lease: Option<LeaseId>) -> StoreError {
    use etcd_client::Error as E;
    match e {
        E::GRpcStatus(s) => {
            let msg = s.message().to_string();
            if msg.contains("lease not found") {
                return StoreError::LeaseNotFound(lease.unwrap_or(LeaseId(0)));
            }
            // tonic is not re-exported; classify the status code by name.
            match format!("{:?}", s.code()).as_str() {
                "Unavailable" | "DeadlineExceeded" | "Cancelled" => StoreError::Unavailable(msg),
                "InvalidArgument" => StoreError::Invalid(msg),
                code => StoreError::Backend(format!("{code}: {msg}")),
            }
        }
        E::TransportError(t) => StoreError::Unavailable(t.to_string()),
        E::IoError(io) => StoreError::Unavailable(io.to_string()),
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => {
            StoreError::LeaseNotFound(lease.unwrap_or(LeaseId(0)))
        }
        other => StoreError::Backend(other.to_string()),
    }
}

fn rev(r: i64) -> Revision {
    r.max(0) as Revision
}

fn conv_kv(kv: &etcd_client::KeyValue) -> KeyValue {
    KeyValue {
        key: String::from_utf8_lossy(kv.key()).into_owned(),
        value: kv.value().to_vec(),
        create_revision: rev(kv.create_revision()),
        mod_revision: rev(kv.mod_revision()),
        version: rev(kv.version()),
        lease: (kv.lease() != 0).then_some(LeaseId(kv.lease())),
    }
}

fn check_key(key: &str) -> Result<(), StoreError> {
    if key.is_empty() {
        return Err(StoreError::Invalid("empty key".into()));
    }
    Ok(())
}

impl EtcdStore {
    /// Connects to etcd at `endpoints` (e.g. `["http://127.0.0.1:2379"]`); every request
    /// gives up after `timeout`.
    pub fn connect(endpoints: &[String], timeout: Duration) -> Result<Self, StoreError> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .map_err(|e| StoreError::Backend(format!("tokio runtime: {e}")))?;
        let opts = ConnectOptions::new().with_timeout(timeout).with_connect_timeout(timeout);
        let client = rt
            .block_on(async {
                tokio::time::timeout(timeout * 2, Client::connect(endpoints, Some(opts))).await
            })
            .map_err(|_| StoreError::Unavailable("connect timed out".into()))?
            .map_err(|e| map_err(e, None))?;
        let store =
            Self { rt, client, timeout, watches: Mutex::new(BTreeMap::new()), next_watch: Mutex::new(0) };
        store.revision()?;
        Ok(store)
    }

    fn run<T>(
        &self,
        lease: Option<LeaseId>,
        f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, StoreError> {
        self.rt
            .block_on(async { tokio::time::timeout(self.timeout, f).await })
            .map_err(|_| StoreError::Unavailable("request timed out".into()))?
            .map_err(|e| map_err(e, lease))
    }

    fn client(&self) -> Client {
        self.client.clone()
    }
}

fn conv_cmp(c: &Compare) -> ECompare {
    match c {
        Compare::ModRevision { key, revision } => {
            ECompare::mod_revision(key.as_str(), CompareOp::Equal, *revision as i64)
        }
        Compare::CreateRevision { key, revision } => {
            ECompare::create_revision(key.as_str(), CompareOp::Equal, *revision as i64)
        }
        Compare::Value { key, value } => ECompare::value(key.as_str(), CompareOp::Equal, value.clone()),
    }
}

fn conv_op(op: &TxnOp) -> ETxnOp {
    match op {
        TxnOp::Put { key, value, lease } => {
            ETxnOp::put(key.as_str(), value.clone(), lease.map(|l| PutOptions::new().with_lease(l.0)))
        }
        TxnOp::Delete { key } => ETxnOp::delete(key.as_str(), None),
        TxnOp::Get { key } => ETxnOp::get(key.as_str(), None),
    }
}

impl ClusterStore for EtcdStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        check_key(key)?;
        let mut c = self.client();
        let r = self.run(None, async move { c.get(key, None).await })?;
        Ok(r.kvs().first().map(conv_kv))
    }

    fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        let mut c = self.client();
        let r = self.run(None, async move { c.get(prefix, Some(GetOptions::new().with_prefix())).await })?;
        let revision = r.header().map_or(0, |h| rev(h.revision()));
        Ok((r.kvs().iter().map(conv_kv).collect(), revision))
    }

    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        check_key(key)?;
        let mut c = self.client();
        let opts = lease.map(|l| PutOptions::new().with_lease(l.0));
        let r = self.run(lease, async move { c.put(key, value, opts).await })?;
        Ok(r.header().map_or(0, |h| rev(h.revision())))
    }

    fn delete(&self, key: &str) -> Result<(Revision, bool), StoreError> {
        check_key(key)?;
        let mut c = self.client();
        let r = self.run(None, async move { c.delete(key, Some(DeleteOptions::new())).await })?;
        Ok((r.header().map_or(0, |h| rev(h.revision())), r.deleted() > 0))
    }

    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        for c in &txn.compares {
            let (Compare::ModRevision { key, .. }
            | Compare::CreateRevision { key, .. }
            | Compare::Value { key, .. }) = c;
            check_key(key)?;
        }
        let lease = txn.success.iter().chain(&txn.failure).find_map(|op| match op {
            TxnOp::Put { lease, .. } => *lease,
            _ => None,
        });
        let etxn = ETxn::new()
            .when(txn.compares.iter().map(conv_cmp).collect::<Vec<_>>())
            .and_then(txn.success.iter().map(conv_op).collect::<Vec<_>>())
            .or_else(txn.failure.iter().map(conv_op).collect::<Vec<_>>());
        let mut c = self.client();
        let r = self.run(lease, async move { c.txn(etxn).await })?;
        let gets = r
            .op_responses()
            .into_iter()
            .filter_map(|op| match op {
                TxnOpResponse::Get(g) => Some(g.kvs().first().map(conv_kv)),
                _ => None,
            })
            .collect();
        Ok(TxnResponse {
            succeeded: r.succeeded(),
            revision: r.header().map_or(0, |h| rev(h.revision())),
            gets,
        })
    }

    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        if ttl_ms == 0 {
            return Err(StoreError::Invalid("lease TTL must be > 0".into()));
        }
        let secs = ttl_ms.div_ceil(1000) as i64;
        let mut c = self.client();
        let r = self.run(None, async move { c.lease_grant(secs, None).await })?;
        Ok(LeaseId(r.id()))
    }

    fn keep_alive(&self, lease: LeaseId) -> Result<u64, StoreError> {
        let mut c = self.client();
        let ttl = self.run(Some(lease), async move {
            let (mut keeper, mut stream) = c.lease_keep_alive(lease.0).await?;
            keeper.keep_alive().await?;
            Ok(stream.message().await?.map_or(0, |m| m.ttl()))
        })?;
        if ttl <= 0 {
            return Err(StoreError::LeaseNotFound(lease));
        }
        Ok(ttl as u64 * 1000)
    }

    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        let mut c = self.client();
        self.run(Some(lease), async move { c.lease_revoke(lease.0).await })?;
        Ok(())
    }

    fn lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        let mut c = self.client();
        let r = self.run(Some(lease), async move { c.lease_time_to_live(lease.0, None).await })?;
        // etcd reports the remaining TTL in whole seconds (0 in the last second), -1 if gone.
        Ok(r.ttl() >= 0)
    }

    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchId, StoreError> {
        let mut opts = WatchOptions::new().with_prefix();
        if from_revision > 0 {
            opts = opts.with_start_revision(from_revision as i64);
        }
        let mut c = self.client();
        let mut stream = self.run(None, async move { c.watch(prefix, Some(opts)).await })?;
        let events = Arc::new(Mutex::new(Vec::new()));
        let sink = events.clone();
        let task = self.rt.spawn(async move {
            while let Ok(Some(resp)) = stream.message().await {
                let mut out = sink.lock().unwrap_or_else(|e| e.into_inner());
                for ev in resp.events() {
                    let Some(kv) = ev.kv() else { continue };
                    out.push(match ev.event_type() {
                        EventType::Put => WatchEvent::Put(conv_kv(kv)),
                        EventType::Delete => WatchEvent::Delete {
                            key: String::from_utf8_lossy(kv.key()).into_owned(),
                            mod_revision: rev(kv.mod_revision()),
                        },
                    });
                }
            }
        });
        let mut next = self.next_watch.lock().unwrap_or_else(|e| e.into_inner());
        *next += 1;
        let id = *next;
        self.watches.lock().unwrap_or_else(|e| e.into_inner()).insert(id, WatchSlot { events, task });
        Ok(WatchId(id))
    }

    fn poll_watch(&self, watch: WatchId) -> Result<Vec<WatchEvent>, StoreError> {
        let w = self.watches.lock().unwrap_or_else(|e| e.into_inner());
        let slot = w.get(&watch.0).ok_or(StoreError::WatchNotFound(watch))?;
        let mut ev = slot.events.lock().unwrap_or_else(|e| e.into_inner());
        Ok(std::mem::take(&mut *ev))
    }

    fn cancel_watch(&self, watch: WatchId) -> Result<(), StoreError> {
        let slot = self
            .watches
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&watch.0)
            .ok_or(StoreError::WatchNotFound(watch))?;
        slot.task.abort();
        Ok(())
    }

    fn revision(&self) -> Result<Revision, StoreError> {
        let mut c = self.client();
        let r = self.run(None, async move { c.get("/", Some(GetOptions::new().with_count_only())).await })?;
        Ok(r.header().map_or(0, |h| rev(h.revision())))
    }
}
