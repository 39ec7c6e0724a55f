//! `RemoteStore`: a [`ClusterStore`] client for [`super::StoreServer`].

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::wire::{Reply, Request};
use crate::store::{
    ClusterStore, KeyValue, LeaseId, Revision, StoreError, Txn, TxnResponse, WatchEvent, WatchId,
};

/// Client of the embedded store server. Every request gives up after the timeout and reports
/// [`StoreError::Unavailable`]; the connection is re-made on the next request. While `blocked`
/// is set (an emulated partition) every request fails at once.
#[derive(Debug)]
pub struct RemoteStore {
    addr: SocketAddr,
    timeout: Duration,
    conn: Mutex<Option<BufReader<TcpStream>>>,
    blocked: Arc<AtomicBool>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl RemoteStore {
    /// A client for the server at `addr`.
    pub fn new(addr: SocketAddr, timeout: Duration, blocked: Arc<AtomicBool>) -> Self {
        Self { addr, timeout, conn: Mutex::new(None), blocked }
    }

    fn call(&self, req: Request) -> Result<Reply, StoreError> {
        if self.blocked.load(Ordering::Relaxed) {
            return Err(StoreError::Unavailable("partitioned from the store".into()));
        }
        let mut g = self.conn.lock().unwrap_or_else(|e| e.into_inner());
        if g.is_none() {
            let s = TcpStream::connect_timeout(&self.addr, self.timeout).map_err(unavailable)?;
            s.set_read_timeout(Some(self.timeout)).map_err(unavailable)?;
            s.set_write_timeout(Some(self.timeout)).map_err(unavailable)?;
            let _ = s.set_nodelay(true);
            *g = Some(BufReader::new(s));
        }
        let result = (|| {
            let r = g.as_mut().ok_or_else(|| unavailable("no connection"))?;
            let mut line = serde_json::to_vec(&req).map_err(|e| StoreError::Invalid(e.to_string()))?;
            line.push(b'\n');
            r.get_mut().write_all(&line).map_err(unavailable)?;
            let mut resp = String::new();
            if r.read_line(&mut resp).map_err(unavailable)? == 0 {
                return Err(unavailable("store server closed the connection"));
            }
            serde_json::from_str::<Result<Reply, StoreError>>(&resp)
                .map_err(|e| StoreError::Backend(format!("bad reply: {e}")))?
        })();
        if matches!(result, Err(StoreError::Unavailable(_)) | Err(StoreError::Backend(_))) {
            *g = None;
        }
        result
    }
}

fn unexpected(r: Reply) -> StoreError {
    StoreError::Backend(format!("unexpected reply {r:?}"))
}

impl ClusterStore for RemoteStore {
    fn get(&self, key: &str) -> Result<Option<KeyValue>, StoreError> {
        match self.call(Request::Get { key: key.into() })? {
            Reply::Kv(kv) => Ok(kv),
            r => Err(unexpected(r)),
        }
    }
    fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, Revision), StoreError> {
        match self.call(Request::GetPrefix { prefix: prefix.into() })? {
            Reply::Kvs(kvs, rev) => Ok((kvs, rev)),
            r => Err(unexpected(r)),
        }
    }
    fn put(&self, key: &str, value: Vec<u8>, lease: Option<LeaseId>) -> Result<Revision, StoreError> {
        match self.call(Request::Put { key: key.into(), value, lease })? {
            Reply::Rev(r) => Ok(r),
            r => Err(unexpected(r)),
        }
    }
    fn delete(&self, key: &str) -> Result<(Revision, bool), StoreError> {
        match self.call(Request::Delete { key: key.into() })? {
            Reply::Deleted(r, e) => Ok((r, e)),
            r => Err(unexpected(r)),
        }
    }
    fn txn(&self, txn: Txn) -> Result<TxnResponse, StoreError> {
        match self.call(Request::Txn(txn))? {
            Reply::Txn(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }
    fn grant_lease(&self, ttl_ms: u64) -> Result<LeaseId, StoreError> {
        match self.call(Request::Grant { ttl_ms })? {
            Reply::Lease(l) => Ok(l),
            r => Err(unexpected(r)),
        }
    }
    fn keep_alive(&self, lease: LeaseId) -> Result<u64, StoreError> {
        match self.call(Request::KeepAlive(lease))? {
            Reply::Ttl(t) => Ok(t),
            r => Err(unexpected(r)),
        }
    }
    fn revoke_lease(&self, lease: LeaseId) -> Result<(), StoreError> {
        match self.call(Request::Revoke(lease))? {
            Reply::Unit => Ok(()),
            r => Err(unexpected(r)),
        }
    }
    fn lease_alive(&self, lease: LeaseId) -> Result<bool, StoreError> {
        match self.call(Request::LeaseAlive(lease))? {
            Reply::Bool(b) => Ok(b),
            r => Err(unexpected(r)),
        }
    }
    fn watch(&self, prefix: &str, from_revision: Revision) -> Result<WatchId, StoreError> {
        match self.call(Request::Watch { prefix: prefix.into(), from: from_revision })? {
            Reply::Watch(w) => Ok(w),
            r => Err(unexpected(r)),
        }
    }
    fn poll_watch(&self, watch: WatchId) -> Result<Vec<WatchEvent>, StoreError> {
        match self.call(Request::PollWatch(watch))? {
            Reply::Events(e) => Ok(e),
            r => Err(unexpected(r)),
        }
    }
    fn cancel_watch(&self, watch: WatchId) -> Result<(), StoreError> {
        match self.call(Request::CancelWatch(watch))? {
            Reply::Unit => Ok(()),
            r => Err(unexpected(r)),
        }
    }
    fn revision(&self) -> Result<Revision, StoreError> {
        match self.call(Request::Revision)? {
            Reply::Rev(r) => Ok(r),
            r => Err(unexpected(r)),
        }
    }
}
