//! The real-world driver of the sans-I/O [`HostAgent`](crate::agent::HostAgent): UDP
//! heartbeats, a store over TCP (the embedded [`MemStore`](crate::store::MemStore) served by
//! [`StoreServer`]) or etcd, a process-kill [`FenceAgent`](crate::fence::FenceAgent), and a
//! harness that runs host agents as separate OS processes on loopback, optionally one of them in
//! a network namespace of its own ([`NetnsLink`]) so that a partition cuts a real link.
//!
//! This module does I/O and reads clocks; everything it decides comes from the core.

mod harness;
mod host;
mod netns;
mod remote;
pub mod scenario;
mod server;
pub mod wire;

pub use harness::{ClusterHarness, HarnessConfig};
pub use host::{HostRunConfig, ProcessFenceAgent, run_host};
pub use netns::{NetnsLink, PartitionMechanism};
pub use remote::RemoteStore;
pub use scenario::{Outcome, Scenario, run_scenario};
pub use server::StoreServer;

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::agent::{Decision, StopReason};
use crate::model::{HostId, VmId};
use crate::store::{ClusterStore, Revision, StoreError};

/// Errors of the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// An OS-level operation failed.
    #[error("{what}")]
    Io {
        /// What was being done.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// The agent could not be built.
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    /// A power-on failed.
    #[error(transparent)]
    Restart(#[from] crate::restart::RestartError),
    /// A configuration could not be encoded or decoded.
    #[error("config: {0}")]
    Config(String),
    /// The requested backend is not compiled in.
    #[error("{0}")]
    Unsupported(&'static str),
    /// Waiting for something took too long.
    #[error("timed out after {ms} ms waiting for {what}")]
    Timeout {
        /// What was awaited.
        what: String,
        /// How long.
        ms: u64,
    },
}

/// Where host agents find the cluster store.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum StoreEndpoint {
    /// The embedded store served by [`StoreServer`] at this address.
    Embedded {
        /// `ip:port`.
        addr: String,
    },
    /// An etcd cluster (requires vha's `etcd` feature).
    Etcd {
        /// Client URLs, e.g. `http://127.0.0.1:2379`.
        endpoints: Vec<String>,
    },
}

/// Connects to a store. `blocked` emulates a partition from the store (embedded store only;
/// for etcd the host's own check of its partition flag does the same).
pub fn connect_store(
    ep: &StoreEndpoint,
    timeout: Duration,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> Result<Box<dyn ClusterStore + Send + Sync>, RuntimeError> {
    match ep {
        StoreEndpoint::Embedded { addr } => {
            let a = addr.parse().map_err(|e| RuntimeError::Config(format!("store address {addr}: {e}")))?;
            Ok(Box::new(RemoteStore::new(a, timeout, blocked)))
        }
        #[cfg(feature = "etcd")]
        StoreEndpoint::Etcd { endpoints } => {
            let s = crate::store::EtcdStore::connect(endpoints, timeout)?;
            Ok(Box::new(Blockable { inner: s, blocked }))
        }
        #[cfg(not(feature = "etcd"))]
        StoreEndpoint::Etcd { .. } => {
            Err(RuntimeError::Unsupported("vha was built without the `etcd` feature"))
        }
    }
}

/// Whether this build of vha includes the etcd backend.
pub const ETCD_SUPPORTED: bool = cfg!(feature = "etcd");

#[cfg(feature = "etcd")]
struct Blockable<S> {
    inner: S,
    blocked: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

#[cfg(feature = "etcd")]
impl<S: std::fmt::Debug> std::fmt::Debug for Blockable<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.inner.fmt(f)
    }
}

#[cfg(feature = "etcd")]
impl<S: ClusterStore> Blockable<S> {
    fn up(&self) -> Result<&S, StoreError> {
        if self.blocked.load(std::sync::atomic::Ordering::Relaxed) {
            Err(StoreError::Unavailable("partitioned from the store".into()))
        } else {
            Ok(&self.inner)
        }
    }
}

#[cfg(feature = "etcd")]
impl<S: ClusterStore> ClusterStore for Blockable<S> {
    fn get(&self, key: &str) -> Result<Option<crate::store::KeyValue>, StoreError> {
        self.up()?.get(key)
    }
    fn get_prefix(&self, p: &str) -> Result<(Vec<crate::store::KeyValue>, Revision), StoreError> {
        self.up()?.get_prefix(p)
    }
    fn put(&self, k: &str, v: Vec<u8>, l: Option<crate::store::LeaseId>) -> Result<Revision, StoreError> {
        self.up()?.put(k, v, l)
    }
    fn delete(&self, k: &str) -> Result<(Revision, bool), StoreError> {
        self.up()?.delete(k)
    }
    fn txn(&self, t: crate::store::Txn) -> Result<crate::store::TxnResponse, StoreError> {
        self.up()?.txn(t)
    }
    fn grant_lease(&self, ttl_ms: u64) -> Result<crate::store::LeaseId, StoreError> {
        self.up()?.grant_lease(ttl_ms)
    }
    fn keep_alive(&self, l: crate::store::LeaseId) -> Result<u64, StoreError> {
        self.up()?.keep_alive(l)
    }
    fn revoke_lease(&self, l: crate::store::LeaseId) -> Result<(), StoreError> {
        self.up()?.revoke_lease(l)
    }
    fn lease_alive(&self, l: crate::store::LeaseId) -> Result<bool, StoreError> {
        self.up()?.lease_alive(l)
    }
    fn watch(&self, p: &str, from: Revision) -> Result<crate::store::WatchId, StoreError> {
        self.up()?.watch(p, from)
    }
    fn poll_watch(&self, w: crate::store::WatchId) -> Result<Vec<crate::store::WatchEvent>, StoreError> {
        self.up()?.poll_watch(w)
    }
    fn cancel_watch(&self, w: crate::store::WatchId) -> Result<(), StoreError> {
        self.up()?.cancel_watch(w)
    }
    fn revision(&self) -> Result<Revision, StoreError> {
        self.up()?.revision()
    }
}

/// What a host agent process reports to its parent (one JSON line on stdout each).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "type")]
pub enum Report {
    /// The agent is up.
    Ready {
        /// Its process id.
        pid: u32,
    },
    /// A decision of the agent's core.
    Decision(Decision),
    /// A VM was started.
    Started {
        /// The VM.
        vm: VmId,
        /// Its fencing token.
        token: Revision,
    },
    /// A VM was stopped.
    Stopped {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: StopReason,
    },
    /// A VM wrote its shared state (`ok`) or failed to.
    SharedWrite {
        /// The VM.
        vm: VmId,
        /// Whether the store accepted the write.
        ok: bool,
        /// The store refused it because the VM's fencing token is stale (not a mere outage).
        #[serde(default)]
        stale_token: bool,
    },
    /// The agent stopped with an error.
    Failed {
        /// The error.
        error: String,
    },
}

/// A report with its time (Unix ms, comparable across processes on one machine) and host.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReportLine {
    /// Unix time in ms.
    pub unix_ms: u64,
    /// Reporting host.
    pub host: HostId,
    /// What happened.
    pub report: Report,
}

/// A monotonic clock in Unix milliseconds: Unix time at creation plus monotonic elapsed time,
/// so it never goes backwards and keeps counting while the process is stopped.
#[derive(Debug, Clone, Copy)]
pub struct UnixClock {
    base_ms: u64,
    start: Instant,
}

impl UnixClock {
    /// Starts the clock.
    pub fn new() -> Self {
        Self { base_ms: unix_ms(), start: Instant::now() }
    }
    /// Milliseconds since the Unix epoch (monotonic).
    pub fn now_ms(&self) -> u64 {
        self.base_ms + self.start.elapsed().as_millis() as u64
    }
}

impl Default for UnixClock {
    fn default() -> Self {
        Self::new()
    }
}

/// Wall-clock Unix time in ms.
pub fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Path of the flag file that partitions host `h` (heartbeats, store and power control).
pub fn partition_flag(dir: &std::path::Path, h: HostId) -> PathBuf {
    dir.join(format!("partition-{}", h.0))
}
