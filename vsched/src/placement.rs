//! Initial placement of one VM or a batch, honouring capacity, reservations (admission control)
//! and rules.
//!
//! Each VM goes to the least-loaded powered-on host (average of normalized CPU and memory load)
//! that passes capacity, admission control and every must-rule; hosts that also keep every
//! should-rule are preferred. A batch is placed largest first (memory, then CPU, then id), which
//! packs better; hosts sit in a min-heap keyed by load, so a batch costs O(VMs · log hosts) when
//! most VMs fit on the first host tried. A VM that fits nowhere gets a [`PlacementError`] that
//! counts, per constraint, how many hosts it ruled out.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::fmt;

use crate::entitlement;
use crate::ledger::{HostReject, Ledger};
use crate::model::{Cluster, HostId, ModelError, Resources, VmId};
use crate::rules::{RuleIndex, RuleKind};

/// Per-constraint counts of hosts that could not take a VM.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize)]
pub struct Rejections {
    /// Hosts considered.
    pub hosts: usize,
    /// Hosts ruled out by each host-level constraint.
    pub by_host: Vec<(HostReject, usize)>,
    /// Hosts ruled out by each rule (name, count).
    pub by_rule: Vec<(String, usize)>,
}

impl fmt::Display for Rejections {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "of {} hosts:", self.hosts)?;
        let mut first = true;
        for (r, n) in &self.by_host {
            write!(f, "{} {n} ruled out by {r}", if first { "" } else { ";" })?;
            first = false;
        }
        for (r, n) in &self.by_rule {
            write!(f, "{} {n} ruled out by rule '{r}'", if first { "" } else { ";" })?;
            first = false;
        }
        if first {
            write!(f, " no powered-on host")?;
        }
        Ok(())
    }
}

/// Why a VM could not be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlacementError {
    /// The cluster description is invalid.
    #[error("invalid cluster")]
    Model(#[from] ModelError),
    /// The VM id is out of range.
    #[error("vm {0} does not exist")]
    UnknownVm(VmId),
    /// The VM already runs somewhere.
    #[error("vm {vm} is already placed on {host}")]
    AlreadyPlaced {
        /// The VM.
        vm: VmId,
        /// Its host.
        host: HostId,
    },
    /// Admission control at the pool or cluster level refuses the VM's reservation.
    #[error("vm {vm} ({name}) cannot be admitted: {why}")]
    Admission {
        /// The VM.
        vm: VmId,
        /// Its name.
        name: String,
        /// Which pool limit or cluster capacity the reservation would exceed.
        why: String,
    },
    /// No host passes every constraint.
    #[error("vm {vm} ({name}) cannot be placed: {why}")]
    NoHost {
        /// The VM.
        vm: VmId,
        /// Its name.
        name: String,
        /// Which constraints ruled out how many hosts.
        why: Rejections,
    },
}

/// The outcome of a batch placement.
#[derive(Debug, Clone, Default)]
pub struct Placement {
    /// VMs placed, in placement order.
    pub placed: Vec<(VmId, HostId)>,
    /// VMs that could not be placed, with the reason.
    pub failed: Vec<PlacementError>,
}

impl Placement {
    /// Writes the placed VMs' hosts into `cluster`.
    pub fn apply(&self, cluster: &mut Cluster) {
        for &(vm, h) in &self.placed {
            cluster.vms[vm.idx()].host = Some(h);
        }
    }
}

/// Places one unplaced VM; does not modify the cluster.
pub fn place_one(cluster: &Cluster, vm: VmId) -> Result<HostId, PlacementError> {
    let mut p = place_batch(cluster, &[vm])?;
    match p.failed.pop() {
        Some(e) => Err(e),
        None => Ok(p.placed[0].1),
    }
}

fn host_key(l: &Ledger, h: usize) -> u64 {
    let (c, m) = l.norm(h);
    (0.5 * (c + m)).to_bits()
}

/// Places a batch of unplaced VMs (largest first); does not modify the cluster. The cluster is
/// validated first; per-VM failures are listed in the result.
pub fn place_batch(cluster: &Cluster, vms: &[VmId]) -> Result<Placement, ModelError> {
    cluster.validate()?;
    let ent = entitlement::compute(cluster);
    let mut ledger = Ledger::new(cluster, &ent);
    let rules = RuleIndex::new(cluster);
    let mut out = Placement::default();
    let mut order: Vec<VmId> = Vec::with_capacity(vms.len());
    for &v in vms {
        match cluster.vms.get(v.idx()) {
            None => out.failed.push(PlacementError::UnknownVm(v)),
            Some(spec) => match spec.host {
                Some(h) => out.failed.push(PlacementError::AlreadyPlaced { vm: v, host: h }),
                None => order.push(v),
            },
        }
    }
    order.sort_by_key(|v| {
        let s = &cluster.vms[v.idx()];
        let w = s.wanted();
        (Reverse(w.mem_mib.max(s.reservation.mem_mib)), Reverse(w.cpu_mhz), *v)
    });
    order.dedup();
    let nh = cluster.hosts.len();
    let mut keys: Vec<u64> = (0..nh).map(|h| host_key(&ledger, h)).collect();
    let mut heap: BinaryHeap<Reverse<(u64, u32)>> =
        (0..nh).filter(|&h| ledger.on[h]).map(|h| Reverse((keys[h], h as u32))).collect();
    let mut popped: Vec<Reverse<(u64, u32)>> = Vec::new();
    let mut admission = Admission::new(cluster);
    for vm in order {
        let load = cluster.vms[vm.idx()].wanted();
        if let Err(why) = admission.check(cluster, vm, false) {
            out.failed.push(PlacementError::Admission { vm, name: cluster.vms[vm.idx()].name.clone(), why });
            continue;
        }
        let chosen = match restricted_hosts(cluster, &rules, &ledger, vm) {
            Some(cands) => best_of(cluster, &rules, &ledger, vm, load, &cands),
            None => {
                // Heap path: least-loaded first; stale entries (key changed) are dropped.
                let mut fallback: Option<u32> = None;
                let mut found = None;
                while let Some(Reverse((k, h))) = heap.pop() {
                    if keys[h as usize] != k {
                        continue;
                    }
                    popped.push(Reverse((k, h)));
                    let hid = HostId(h);
                    if ledger.fits(vm, load, hid).is_err()
                        || rules.first_broken(cluster, vm, hid, &ledger.where_is, &ledger.on, false).is_some()
                    {
                        continue;
                    }
                    if rules.first_broken(cluster, vm, hid, &ledger.where_is, &ledger.on, true).is_none() {
                        found = Some(hid);
                        break;
                    }
                    if fallback.is_none() {
                        fallback = Some(h);
                    }
                }
                heap.extend(popped.drain(..));
                found.or(fallback.map(HostId))
            }
        };
        match chosen {
            Some(h) => {
                ledger.place(vm, load, h);
                let _ = admission.check(cluster, vm, true);
                keys[h.idx()] = host_key(&ledger, h.idx());
                heap.push(Reverse((keys[h.idx()], h.0)));
                out.placed.push((vm, h));
            }
            None => out.failed.push(PlacementError::NoHost {
                vm,
                name: cluster.vms[vm.idx()].name.clone(),
                why: rejections(cluster, &rules, &ledger, vm, load, false),
            }),
        }
    }
    Ok(out)
}

/// Pool- and cluster-level admission control: reservations aggregate up the pool tree (a pool
/// reserves the larger of its own reservation and its children's sum) and must stay within
/// every pool's limit and, at the root, within the powered-on capacity.
#[derive(Debug)]
struct Admission {
    agg: Vec<Resources>,
    child_sum: Vec<Resources>,
    cap: Resources,
}

fn rmax(a: Resources, b: Resources) -> Resources {
    Resources::new(a.cpu_mhz.max(b.cpu_mhz), a.mem_mib.max(b.mem_mib))
}

impl Admission {
    fn new(cluster: &Cluster) -> Self {
        let np = cluster.pool_count();
        let mut child_sum = vec![Resources::default(); np];
        for v in cluster.vms.iter().filter(|v| v.host.is_some()) {
            let c = &mut child_sum[v.pool.idx()];
            c.cpu_mhz += v.reservation.cpu_mhz;
            c.mem_mib += v.reservation.mem_mib;
        }
        let mut agg = vec![Resources::default(); np];
        for p in (0..np).rev() {
            let own = cluster.pools.get(p).map(|x| x.reservation).unwrap_or_default();
            agg[p] = rmax(own, child_sum[p]);
            if let Some(par) = cluster.pools.get(p).and_then(|x| x.parent) {
                let c = &mut child_sum[par.idx()];
                c.cpu_mhz += agg[p].cpu_mhz;
                c.mem_mib += agg[p].mem_mib;
            }
        }
        Admission { agg, child_sum, cap: cluster.on_capacity() }
    }

    /// Checks (and with `commit`, records) the VM's reservation up its pool chain.
    fn check(&mut self, cluster: &Cluster, vm: VmId, commit: bool) -> Result<(), String> {
        let mut delta = cluster.vms[vm.idx()].reservation;
        let mut p = Some(cluster.vms[vm.idx()].pool);
        let mut writes: Vec<(usize, Resources, Resources)> = Vec::new();
        while let Some(pid) = p {
            if delta == Resources::default() {
                break;
            }
            let i = pid.idx();
            let pool = cluster.pools.get(i);
            let mut child = self.child_sum[i];
            child.cpu_mhz += delta.cpu_mhz;
            child.mem_mib += delta.mem_mib;
            let own = pool.map(|x| x.reservation).unwrap_or_default();
            let agg = rmax(own, child);
            if let Some(l) = pool.and_then(|x| x.limit)
                && !agg.fits_in(l)
            {
                return Err(format!(
                    "reservations in pool '{}' would exceed its limit",
                    pool.map_or("root", |x| x.name.as_str())
                ));
            }
            if i == 0 && !agg.fits_in(self.cap) {
                return Err("reservations would exceed the cluster's powered-on capacity".to_string());
            }
            delta = Resources::new(agg.cpu_mhz - self.agg[i].cpu_mhz, agg.mem_mib - self.agg[i].mem_mib);
            writes.push((i, child, agg));
            p = pool.and_then(|x| x.parent);
        }
        if commit {
            for (i, child, agg) in writes {
                self.child_sum[i] = child;
                self.agg[i] = agg;
            }
        }
        Ok(())
    }
}

/// Hosts a VM is confined to by must-rules (VM-host "run on", or affinity with a placed
/// member), or `None` when it may go anywhere.
fn restricted_hosts(cluster: &Cluster, rules: &RuleIndex, ledger: &Ledger, vm: VmId) -> Option<Vec<HostId>> {
    let mut set: Option<Vec<HostId>> = None;
    for &ri in rules.rules_of(vm) {
        let r = &cluster.rules[ri as usize];
        if !r.is_must() {
            continue;
        }
        let hs: Vec<HostId> = match &r.kind {
            RuleKind::VmHost { hosts, run_on: true, .. } => hosts.clone(),
            RuleKind::VmAffinity { vms } => {
                match vms.iter().filter(|&&o| o != vm).find_map(|o| ledger.where_is[o.idx()]) {
                    Some(h) => vec![h],
                    None => continue,
                }
            }
            _ => continue,
        };
        set = Some(match set {
            None => hs,
            Some(prev) => prev.into_iter().filter(|h| hs.contains(h)).collect(),
        });
    }
    set.map(|mut s| {
        s.sort_unstable();
        s.dedup();
        s
    })
}

fn best_of(
    cluster: &Cluster,
    rules: &RuleIndex,
    ledger: &Ledger,
    vm: VmId,
    load: Resources,
    cands: &[HostId],
) -> Option<HostId> {
    let mut best: Option<(bool, u64, HostId)> = None;
    for &h in cands {
        if ledger.fits(vm, load, h).is_err()
            || rules.first_broken(cluster, vm, h, &ledger.where_is, &ledger.on, false).is_some()
        {
            continue;
        }
        let should_broken = rules.first_broken(cluster, vm, h, &ledger.where_is, &ledger.on, true).is_some();
        let key = (should_broken, host_key(ledger, h.idx()), h);
        if best.is_none_or(|b| key < b) {
            best = Some(key);
        }
    }
    best.map(|b| b.2)
}

/// Counts, for every host, the first constraint that rules it out for `vm`.
pub(crate) fn rejections(
    cluster: &Cluster,
    rules: &RuleIndex,
    ledger: &Ledger,
    vm: VmId,
    load: Resources,
    include_should: bool,
) -> Rejections {
    let mut by_host: Vec<(HostReject, usize)> = Vec::new();
    let mut by_rule: Vec<(usize, usize)> = Vec::new();
    for h in 0..cluster.hosts.len() {
        let hid = HostId(h as u32);
        match ledger.fits(vm, load, hid) {
            Err(r) => bump(&mut by_host, r),
            Ok(()) => {
                if let Some(r) =
                    rules.first_broken(cluster, vm, hid, &ledger.where_is, &ledger.on, include_should)
                {
                    bump(&mut by_rule, r);
                }
            }
        }
    }
    by_host.sort();
    by_rule.sort();
    Rejections {
        hosts: cluster.hosts.len(),
        by_host,
        by_rule: by_rule.into_iter().map(|(r, n)| (cluster.rules[r].name.clone(), n)).collect(),
    }
}

pub(crate) fn bump<K: PartialEq>(v: &mut Vec<(K, usize)>, k: K) {
    match v.iter_mut().find(|(x, _)| *x == k) {
        Some((_, n)) => *n += 1,
        None => v.push((k, 1)),
    }
}
