//! Restart planning: admission control (vSphere's three policies), restart priorities and
//! placement through the [`Placement`] trait (which `vsched` can implement).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{HostId, HostSpec, Keys, VmId, VmRecord, VmSpec};
use crate::store::{ClusterStore, Compare, Revision, StoreError, Txn, TxnOp};
use crate::view::ClusterView;

/// How much capacity HA keeps free for restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum AdmissionPolicy {
    /// No reservation: every power-on that fits is admitted.
    Disabled,
    /// The cluster must be able to lose this many of its largest hosts and still hold every VM.
    HostFailuresTolerated {
        /// Number of host failures to survive.
        hosts: u32,
    },
    /// Keep this percentage of total CPU and memory free.
    Percentage {
        /// Percent of CPU reserved for failover.
        cpu_pct: u8,
        /// Percent of memory reserved for failover.
        mem_pct: u8,
    },
    /// Hosts marked `failover` run no VMs except restarted ones; the rest must hold every VM.
    DedicatedFailoverHosts,
}

impl Default for AdmissionPolicy {
    fn default() -> Self {
        AdmissionPolicy::HostFailuresTolerated { hosts: 1 }
    }
}

/// Errors of admission control, placement and power-on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestartError {
    /// Admission control refused the power-on.
    #[error("{vm}: admission control ({policy}): {reason}")]
    Admission {
        /// The VM.
        vm: VmId,
        /// The policy's name.
        policy: &'static str,
        /// Why.
        reason: String,
    },
    /// No host can take the VM.
    #[error("{vm}: no host has room ({cpu_mhz} MHz, {mem_mib} MiB)")]
    NoCapacity {
        /// The VM.
        vm: VmId,
        /// CPU it needs.
        cpu_mhz: u64,
        /// Memory it needs.
        mem_mib: u64,
    },
    /// A record with this id exists already.
    #[error("{0} already exists")]
    Exists(VmId),
    /// Invalid policy settings.
    #[error("invalid admission policy: {0}")]
    InvalidPolicy(&'static str),
    /// The store failed.
    #[error("store: {0}")]
    Store(#[from] StoreError),
    /// A record could not be encoded.
    #[error("encoding record: {0}")]
    Encode(String),
}

/// A candidate host with what is already committed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostView {
    /// The host.
    pub spec: HostSpec,
    /// CPU already reserved by its VMs.
    pub used_cpu_mhz: u64,
    /// Memory already reserved by its VMs.
    pub used_mem_mib: u64,
}

impl HostView {
    /// Whether `vm` fits in what is left.
    pub fn fits(&self, vm: &VmSpec) -> bool {
        self.used_cpu_mhz + vm.cpu_mhz <= self.spec.cpu_mhz
            && self.used_mem_mib + vm.mem_mib <= self.spec.mem_mib
    }
    /// Free memory in MiB.
    pub fn free_mem_mib(&self) -> u64 {
        self.spec.mem_mib.saturating_sub(self.used_mem_mib)
    }
}

/// Chooses a host for a VM. `vsched` implements this with its rules and balance model.
pub trait Placement {
    /// Picks a host from `hosts` for `vm`, or `None` if none fits. `restart` is true for HA
    /// restarts (which may use dedicated failover hosts) and false for power-ons.
    fn place(&mut self, vm: &VmSpec, hosts: &[HostView], restart: bool) -> Option<HostId>;
}

/// Built-in placement: the fitting host with the most free memory (ties: lowest id). Restarts
/// prefer dedicated failover hosts; power-ons never use them.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorstFit;

impl Placement for WorstFit {
    fn place(&mut self, vm: &VmSpec, hosts: &[HostView], restart: bool) -> Option<HostId> {
        hosts
            .iter()
            .filter(|h| h.fits(vm) && (restart || !h.spec.failover))
            .max_by_key(|h| (restart && h.spec.failover, h.free_mem_mib(), std::cmp::Reverse(h.spec.id)))
            .map(|h| h.spec.id)
    }
}

impl AdmissionPolicy {
    /// The policy's name as vSphere calls it.
    pub fn name(&self) -> &'static str {
        match self {
            AdmissionPolicy::Disabled => "disabled",
            AdmissionPolicy::HostFailuresTolerated { .. } => "host failures tolerated",
            AdmissionPolicy::Percentage { .. } => "percentage of cluster resources",
            AdmissionPolicy::DedicatedFailoverHosts => "dedicated failover hosts",
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<(), RestartError> {
        match self {
            AdmissionPolicy::Percentage { cpu_pct, mem_pct } if *cpu_pct > 100 || *mem_pct > 100 => {
                Err(RestartError::InvalidPolicy("percentages must be <= 100"))
            }
            _ => Ok(()),
        }
    }

    /// Whether powering on `vm` keeps the failover reservation intact, given the hosts and
    /// what runs on them.
    pub fn admit(&self, hosts: &[HostView], vm: &VmSpec) -> Result<(), RestartError> {
        self.validate()?;
        let used_cpu: u64 = hosts.iter().map(|h| h.used_cpu_mhz).sum::<u64>() + vm.cpu_mhz;
        let used_mem: u64 = hosts.iter().map(|h| h.used_mem_mib).sum::<u64>() + vm.mem_mib;
        let refuse = |reason: String| Err(RestartError::Admission { vm: vm.id, policy: self.name(), reason });
        match self {
            AdmissionPolicy::Disabled => Ok(()),
            AdmissionPolicy::HostFailuresTolerated { hosts: n } => {
                let n = *n as usize;
                if n >= hosts.len() {
                    return refuse(format!("cannot tolerate {n} failures with {} hosts", hosts.len()));
                }
                let mut cpus: Vec<u64> = hosts.iter().map(|h| h.spec.cpu_mhz).collect();
                let mut mems: Vec<u64> = hosts.iter().map(|h| h.spec.mem_mib).collect();
                cpus.sort_unstable_by(|a, b| b.cmp(a));
                mems.sort_unstable_by(|a, b| b.cmp(a));
                let cpu_left: u64 = cpus[n..].iter().sum();
                let mem_left: u64 = mems[n..].iter().sum();
                if used_cpu > cpu_left || used_mem > mem_left {
                    return refuse(format!(
                        "after losing the {n} largest hosts {cpu_left} MHz / {mem_left} MiB remain, \
                         {used_cpu} MHz / {used_mem} MiB needed"
                    ));
                }
                Ok(())
            }
            AdmissionPolicy::Percentage { cpu_pct, mem_pct } => {
                let cpu: u64 = hosts.iter().map(|h| h.spec.cpu_mhz).sum();
                let mem: u64 = hosts.iter().map(|h| h.spec.mem_mib).sum();
                let cpu_ok = used_cpu * 100 <= cpu * (100 - *cpu_pct as u64);
                let mem_ok = used_mem * 100 <= mem * (100 - *mem_pct as u64);
                if !(cpu_ok && mem_ok) {
                    return refuse(format!(
                        "{cpu_pct}% CPU / {mem_pct}% memory reserved; {used_cpu}/{cpu} MHz, \
                         {used_mem}/{mem} MiB would be used"
                    ));
                }
                Ok(())
            }
            AdmissionPolicy::DedicatedFailoverHosts => {
                let (f_cpu, f_mem) = hosts
                    .iter()
                    .filter(|h| h.spec.failover)
                    .fold((0, 0), |(c, m), h| (c + h.spec.cpu_mhz, m + h.spec.mem_mib));
                if f_cpu == 0 {
                    return refuse("no failover host in the cluster".into());
                }
                let (l_cpu, l_mem): (u64, u64) = hosts
                    .iter()
                    .filter(|h| !h.spec.failover)
                    .map(|h| (h.spec.cpu_mhz, h.spec.mem_mib))
                    .max()
                    .unwrap_or((0, 0));
                if l_cpu > f_cpu || l_mem > f_mem {
                    return refuse("failover hosts are smaller than the largest host".into());
                }
                Ok(())
            }
        }
    }
}

/// Builds placement candidates from a cluster view: the given hosts with the resources their
/// live VM assignments reserve.
pub fn host_views(view: &ClusterView, candidates: &[HostId]) -> Vec<HostView> {
    let mut used: BTreeMap<HostId, (u64, u64)> = BTreeMap::new();
    for e in view.vms.values() {
        if let (Some(h), true) = (e.record.owner, view.owner_alive(e)) {
            let u = used.entry(h).or_default();
            u.0 += e.record.spec.cpu_mhz;
            u.1 += e.record.spec.mem_mib;
        }
    }
    candidates
        .iter()
        .filter_map(|h| view.members.get(h))
        .map(|m| {
            let (c, mm) = used.get(&m.spec.id).copied().unwrap_or_default();
            HostView { spec: m.spec.clone(), used_cpu_mhz: c, used_mem_mib: mm }
        })
        .collect()
}

/// VMs whose assignment is dead (owner lease gone) and that HA must restart, highest priority
/// first, then by id. Unprotected VMs are left out.
pub fn orphans(view: &ClusterView) -> Vec<(VmId, Revision)> {
    let mut v: Vec<_> = view
        .vms
        .values()
        .filter(|e| e.record.spec.protected() && !view.owner_alive(e))
        .map(|e| (e.record.spec.priority, e.record.spec.id, e.token))
        .collect();
    v.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
    v.into_iter().map(|(_, id, t)| (id, t)).collect()
}

/// Whether every orphan could be placed on `alive` hosts right now (used by the simulator's
/// liveness check: restarts are owed only when capacity exists).
pub fn capacity_exists(view: &ClusterView, alive: &[HostId]) -> bool {
    let mut hosts = host_views(view, alive);
    let mut p = WorstFit;
    for (id, _) in orphans(view) {
        let spec = &view.vms[&id].record.spec;
        match p.place(spec, &hosts, true) {
            Some(h) => {
                if let Some(hv) = hosts.iter_mut().find(|x| x.spec.id == h) {
                    hv.used_cpu_mhz += spec.cpu_mhz;
                    hv.used_mem_mib += spec.mem_mib;
                }
            }
            None => return false,
        }
    }
    true
}

/// Powers a VM on: admission control, placement, then an atomic create of its record bound to
/// the chosen host's current lease. Returns the host and the VM's first fencing token.
pub fn power_on(
    store: &dyn ClusterStore,
    keys: &Keys,
    policy: &AdmissionPolicy,
    placement: &mut dyn Placement,
    spec: VmSpec,
) -> Result<(HostId, Revision), RestartError> {
    let view = ClusterView::read(store, keys)?;
    if view.vms.contains_key(&spec.id) {
        return Err(RestartError::Exists(spec.id));
    }
    let all: Vec<HostId> = view.members.keys().copied().collect();
    let hosts = host_views(&view, &all);
    policy.admit(&hosts, &spec)?;
    let no_room = || RestartError::NoCapacity { vm: spec.id, cpu_mhz: spec.cpu_mhz, mem_mib: spec.mem_mib };
    let h = placement.place(&spec, &hosts, false).ok_or_else(no_room)?;
    let m = &view.members[&h];
    let rec = VmRecord { spec: spec.clone(), owner: Some(h), owner_lease: Some(m.lease), restarts: 0 };
    let value = serde_json::to_vec(&rec).map_err(|e| RestartError::Encode(e.to_string()))?;
    let r = store.txn(
        Txn::new()
            .when(Compare::absent(keys.vm(spec.id)))
            .when(Compare::mod_rev(keys.host(h), m.mod_revision))
            .and_then(TxnOp::Put { key: keys.vm(spec.id), value, lease: None }),
    )?;
    if !r.succeeded {
        return Err(RestartError::Exists(spec.id));
    }
    Ok((h, r.revision))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(id: u32, cpu: u64, mem: u64, failover: bool, used: (u64, u64)) -> HostView {
        HostView {
            spec: HostSpec {
                id: HostId(id),
                cpu_mhz: cpu,
                mem_mib: mem,
                failover,
                addr: String::new(),
                pid: 0,
            },
            used_cpu_mhz: used.0,
            used_mem_mib: used.1,
        }
    }
    fn vm(id: u32, cpu: u64, mem: u64) -> VmSpec {
        VmSpec { id: VmId(id), cpu_mhz: cpu, mem_mib: mem, priority: Default::default() }
    }

    #[test]
    fn host_failures_tolerated() {
        let p = AdmissionPolicy::HostFailuresTolerated { hosts: 1 };
        let hs = [host(0, 1000, 1000, false, (400, 400)), host(1, 1000, 1000, false, (500, 500))];
        assert!(p.admit(&hs, &vm(1, 100, 100)).is_ok(), "1000 left after losing one, 1000 used");
        assert!(p.admit(&hs, &vm(1, 101, 100)).is_err());
        let p2 = AdmissionPolicy::HostFailuresTolerated { hosts: 2 };
        assert!(p2.admit(&hs, &vm(1, 1, 1)).is_err(), "cannot lose every host");
    }

    #[test]
    fn percentage() {
        let p = AdmissionPolicy::Percentage { cpu_pct: 25, mem_pct: 50 };
        let hs = [host(0, 1000, 1000, false, (0, 0)), host(1, 1000, 1000, false, (0, 900))];
        assert!(p.admit(&hs, &vm(1, 100, 100)).is_ok());
        assert!(p.admit(&hs, &vm(1, 100, 101)).is_err(), "mem would exceed 50%");
        assert!(AdmissionPolicy::Percentage { cpu_pct: 101, mem_pct: 0 }.validate().is_err());
    }

    #[test]
    fn dedicated_failover_hosts() {
        let p = AdmissionPolicy::DedicatedFailoverHosts;
        let hs = [host(0, 1000, 1000, false, (0, 0)), host(1, 1000, 1000, true, (0, 0))];
        assert!(p.admit(&hs, &vm(1, 100, 100)).is_ok());
        let mut w = WorstFit;
        assert_eq!(w.place(&vm(1, 100, 100), &hs, false), Some(HostId(0)), "power-on avoids failover");
        assert_eq!(w.place(&vm(1, 100, 100), &hs, true), Some(HostId(1)), "restart prefers failover");
        let none = [host(0, 1000, 1000, false, (0, 0))];
        assert!(p.admit(&none, &vm(1, 1, 1)).is_err());
    }

    #[test]
    fn worst_fit_picks_most_free_memory() {
        let hs = [host(0, 1000, 1000, false, (0, 600)), host(1, 1000, 1000, false, (0, 200))];
        assert_eq!(WorstFit.place(&vm(1, 10, 10), &hs, true), Some(HostId(1)));
        assert_eq!(WorstFit.place(&vm(1, 10, 900), &hs, true), None);
    }
}
