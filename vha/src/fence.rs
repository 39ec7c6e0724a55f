//! Fencing: making sure a host that lost its right to run VMs stops running them.
//!
//! Three mechanisms, used together:
//! - a [`FenceAgent`] powers a failed host off (a management controller, or in the examples a
//!   process kill) — Pacemaker's rule holds: no confirmed fence, no early failover;
//! - the [`Watchdog`]: a host stops its VMs by itself before its store lease can expire, using only
//!   its own clock, with a margin for clock drift. Once a lease expired in the store, its owner is
//!   therefore known to have stopped;
//! - fencing tokens: a VM record's store revision. Every VM start ([`start_vm`]) and every write
//!   to shared state ([`write_shared`]) is a compare-and-swap on that revision, so a host that
//!   does not yet know it was fenced is refused by the store.

use serde::{Deserialize, Serialize};

use crate::model::{HostSpec, Keys, VmId};
use crate::store::{ClusterStore, Compare, LeaseId, Revision, StoreError, Txn, TxnOp};

/// Errors of the fence module.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FenceError {
    /// The fence agent could not reach the host's power control.
    #[error("fencing {host}: power control unreachable: {reason}")]
    Unreachable {
        /// Host that was to be fenced.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// The fence agent acted but could not confirm the host is off.
    #[error("fencing {host}: not confirmed: {reason}")]
    NotConfirmed {
        /// Host that was to be fenced.
        host: String,
        /// What went wrong.
        reason: String,
    },
    /// A start or write presented a fencing token that is no longer current.
    #[error("{vm}: fencing token {token} is stale (VM reassigned)")]
    StaleToken {
        /// The VM.
        vm: VmId,
        /// The rejected token.
        token: Revision,
    },
    /// The store refused or failed the operation.
    #[error("{vm}: store: {source}")]
    Store {
        /// The VM.
        vm: VmId,
        /// Store error.
        #[source]
        source: StoreError,
    },
    /// A watchdog setting is out of range.
    #[error("invalid watchdog setting: {0}")]
    InvalidWatchdog(&'static str),
}

/// Powers a host off. Implementations must return `Ok` only once the host is known to be off.
pub trait FenceAgent {
    /// Fences `host`.
    fn fence(&mut self, host: &HostSpec) -> Result<(), FenceError>;
}

/// A fence agent that can never fence (clusters that rely on the watchdog alone).
#[derive(Debug, Default, Clone, Copy)]
pub struct NoFenceAgent;

impl FenceAgent for NoFenceAgent {
    fn fence(&mut self, host: &HostSpec) -> Result<(), FenceError> {
        Err(FenceError::Unreachable { host: host.id.to_string(), reason: "no fence agent".into() })
    }
}

/// Watchdog settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WatchdogConfig {
    /// Largest clock rate error between any host and the store, as a fraction (0.01 = 1 %).
    pub max_drift: f64,
    /// Extra margin in ms before the lease's earliest possible expiry. It must cover the
    /// driver's tick period, a blocking store request (keep the store timeout well below it) and
    /// the time to stop VMs.
    pub guard_ms: u64,
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        Self { max_drift: 0.01, guard_ms: 400 }
    }
}

/// Self-fencing deadline derived from lease renewals, on the host's own clock.
///
/// A renewal *sent* at local time `s` makes the store expire the lease no earlier than `ttl`
/// later in store time. With clock rates within `max_drift`, stopping at
/// `s + ttl * (1 - 2 * max_drift) - guard` local time is strictly before that expiry.
#[derive(Debug, Clone, PartialEq)]
pub struct Watchdog {
    cfg: WatchdogConfig,
    ttl_ms: u64,
    deadline_ms: Option<u64>,
}

impl Watchdog {
    /// A watchdog for leases of `ttl_ms`; disarmed until the first renewal.
    pub fn new(cfg: WatchdogConfig, ttl_ms: u64) -> Result<Self, FenceError> {
        if !(0.0..0.2).contains(&cfg.max_drift) {
            return Err(FenceError::InvalidWatchdog("max_drift must be in [0, 0.2)"));
        }
        if cfg.guard_ms >= ttl_ms / 2 {
            return Err(FenceError::InvalidWatchdog("guard_ms must be below half the lease TTL"));
        }
        Ok(Self { cfg, ttl_ms, deadline_ms: None })
    }

    /// Milliseconds of safe operation after a renewal is sent.
    pub fn safe_window_ms(&self) -> u64 {
        let w = (self.ttl_ms as f64 * (1.0 - 2.0 * self.cfg.max_drift)) as u64;
        w.saturating_sub(self.cfg.guard_ms)
    }

    /// A lease grant or renewal that was sent at local time `sent_ms` succeeded.
    pub fn renewed(&mut self, sent_ms: u64) {
        let d = sent_ms + self.safe_window_ms();
        self.deadline_ms = Some(self.deadline_ms.map_or(d, |old| old.max(d)));
    }

    /// Disarms the watchdog (the host gave up its lease).
    pub fn disarm(&mut self) {
        self.deadline_ms = None;
    }

    /// The current deadline, if armed.
    pub fn deadline_ms(&self) -> Option<u64> {
        self.deadline_ms
    }

    /// Whether the deadline has passed at `now_ms` (the host must stop its VMs now).
    pub fn expired(&self, now_ms: u64) -> bool {
        self.deadline_ms.is_some_and(|d| now_ms >= d)
    }
}

/// Claims the right to start `vm`: succeeds only if the VM record's revision still equals
/// `token`. Writes the VM's run marker under `lease`. Returns the revision of the claim.
pub fn start_vm(
    store: &dyn ClusterStore,
    keys: &Keys,
    vm: VmId,
    token: Revision,
    lease: LeaseId,
    runner: &str,
) -> Result<Revision, FenceError> {
    let txn = Txn::new().when(Compare::mod_rev(keys.vm(vm), token)).and_then(TxnOp::Put {
        key: keys.run(vm),
        value: format!("{runner} token={token}").into_bytes(),
        lease: Some(lease),
    });
    match store.txn(txn) {
        Ok(r) if r.succeeded => Ok(r.revision),
        Ok(_) => Err(FenceError::StaleToken { vm, token }),
        Err(source) => Err(FenceError::Store { vm, source }),
    }
}

/// Writes a VM's shared state, presenting its fencing token; refused once the VM was reassigned.
pub fn write_shared(
    store: &dyn ClusterStore,
    keys: &Keys,
    vm: VmId,
    token: Revision,
    data: Vec<u8>,
) -> Result<Revision, FenceError> {
    let txn = Txn::new().when(Compare::mod_rev(keys.vm(vm), token)).and_then(TxnOp::Put {
        key: keys.data(vm),
        value: data,
        lease: None,
    });
    match store.txn(txn) {
        Ok(r) if r.succeeded => Ok(r.revision),
        Ok(_) => Err(FenceError::StaleToken { vm, token }),
        Err(source) => Err(FenceError::Store { vm, source }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemStore;
    use proptest::prelude::*;

    #[test]
    fn stale_token_is_refused() {
        let s = MemStore::new();
        let k = Keys::default();
        let l = s.grant_lease(2000).unwrap();
        let t1 = s.put(&k.vm(VmId(1)), b"owner=a".to_vec(), None).unwrap();
        assert!(start_vm(&s, &k, VmId(1), t1, l, "a").is_ok());
        assert!(write_shared(&s, &k, VmId(1), t1, b"x".to_vec()).is_ok());
        let t2 = s.put(&k.vm(VmId(1)), b"owner=b".to_vec(), None).unwrap();
        assert_eq!(
            write_shared(&s, &k, VmId(1), t1, b"y".to_vec()),
            Err(FenceError::StaleToken { vm: VmId(1), token: t1 })
        );
        assert!(matches!(start_vm(&s, &k, VmId(1), t1, l, "a"), Err(FenceError::StaleToken { .. })));
        assert!(write_shared(&s, &k, VmId(1), t2, b"z".to_vec()).is_ok());
    }

    #[test]
    fn watchdog_validation() {
        assert!(Watchdog::new(WatchdogConfig::default(), 2000).is_ok());
        let bad = WatchdogConfig { max_drift: 0.5, ..Default::default() };
        assert!(Watchdog::new(bad, 2000).is_err());
        let bad = WatchdogConfig { guard_ms: 1500, ..Default::default() };
        assert!(Watchdog::new(bad, 2000).is_err());
    }

    proptest! {
        /// For any drift within the bound, the host's deadline (on its clock) falls strictly
        /// before the earliest store expiry (real time).
        #[test]
        fn watchdog_fires_before_lease_expiry(
            ttl in 1000u64..30_000, drift_ppm in -10_000i64..=10_000, sent in 0u64..1_000_000,
        ) {
            let mut w = Watchdog::new(WatchdogConfig::default(), ttl).unwrap();
            w.renewed(sent);
            let rate = 1.0 + drift_ppm as f64 / 1e6;
            // Host clock: local = sent + rate * (real - real_sent). Real time at the deadline:
            let real_elapsed = (w.deadline_ms().unwrap() - sent) as f64 / rate;
            prop_assert!(real_elapsed < ttl as f64, "{real_elapsed} >= {ttl}");
        }
    }
}
