//! Placement rules: VM-VM affinity and anti-affinity, VM-host groups, each either *must*
//! (never broken by a recommendation) or *should* (kept when possible, fixed when cheap).
//!
//! [`RuleIndex`] turns the rule list into flat per-VM lists so that checking a candidate move
//! costs O(rules of that VM × rule size), independent of the cluster size.

use serde::{Deserialize, Serialize};

use crate::model::{Cluster, HostId, VmId};

/// How strictly a rule is enforced.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Enforcement {
    /// Never broken by a recommendation; violations are fixed first.
    Must,
    /// Kept when possible; placement breaks it only when nothing else fits.
    Should,
}

/// What a rule constrains.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum RuleKind {
    /// All listed VMs run on the same host.
    VmAffinity {
        /// The VMs (at least two).
        vms: Vec<VmId>,
    },
    /// No two listed VMs run on the same host.
    VmAntiAffinity {
        /// The VMs (at least two).
        vms: Vec<VmId>,
    },
    /// The listed VMs run on (`run_on = true`) or off (`false`) the listed host group.
    VmHost {
        /// The VM group.
        vms: Vec<VmId>,
        /// The host group.
        hosts: Vec<HostId>,
        /// `true`: run on one of `hosts`; `false`: run on none of them.
        run_on: bool,
    },
}

/// A named placement rule.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    /// Name used in errors and recommendations.
    pub name: String,
    /// Must or should.
    pub enforcement: Enforcement,
    /// The constraint.
    pub kind: RuleKind,
}

impl Rule {
    /// A rule.
    pub fn new(name: impl Into<String>, enforcement: Enforcement, kind: RuleKind) -> Self {
        Rule { name: name.into(), enforcement, kind }
    }
    /// The VMs the rule names.
    pub fn vms(&self) -> &[VmId] {
        match &self.kind {
            RuleKind::VmAffinity { vms }
            | RuleKind::VmAntiAffinity { vms }
            | RuleKind::VmHost { vms, .. } => vms,
        }
    }
    /// Is this a must-rule?
    pub fn is_must(&self) -> bool {
        self.enforcement == Enforcement::Must
    }
}

/// A rule that the current placement breaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Index of the rule in [`Cluster::rules`].
    pub rule: usize,
    /// The rule's name.
    pub name: String,
    /// Must or should.
    pub enforcement: Enforcement,
    /// The VMs that would have to move to fix it (for affinity: the VMs away from the host
    /// holding most members; for anti-affinity: all but the first VM sharing a host).
    pub vms: Vec<VmId>,
}

/// Per-VM lists of rule indices, built once per pass.
#[derive(Debug, Clone, Default)]
pub struct RuleIndex {
    start: Vec<u32>,
    rules: Vec<u32>,
    host_sets: Vec<Vec<bool>>,
}

impl RuleIndex {
    /// Indexes `cluster`'s rules (cluster must be valid).
    pub fn new(cluster: &Cluster) -> Self {
        let n = cluster.vms.len();
        let mut count = vec![0u32; n + 1];
        for r in &cluster.rules {
            for v in r.vms() {
                count[v.idx() + 1] += 1;
            }
        }
        for i in 0..n {
            count[i + 1] += count[i];
        }
        let mut fill = count.clone();
        let mut rules = vec![0u32; count[n] as usize];
        for (ri, r) in cluster.rules.iter().enumerate() {
            for v in r.vms() {
                rules[fill[v.idx()] as usize] = ri as u32;
                fill[v.idx()] += 1;
            }
        }
        let host_sets = cluster
            .rules
            .iter()
            .map(|r| match &r.kind {
                RuleKind::VmHost { hosts, .. } => {
                    let mut s = vec![false; cluster.hosts.len()];
                    for h in hosts {
                        s[h.idx()] = true;
                    }
                    s
                }
                _ => Vec::new(),
            })
            .collect();
        RuleIndex { start: count, rules, host_sets }
    }

    /// Rule indices that name `vm`.
    pub fn rules_of(&self, vm: VmId) -> &[u32] {
        let i = vm.idx();
        if i + 1 >= self.start.len() {
            return &[];
        }
        &self.rules[self.start[i] as usize..self.start[i + 1] as usize]
    }

    /// Does any must-affinity rule name `vm`? Such VMs move only to fix rules.
    pub fn in_must_affinity(&self, cluster: &Cluster, vm: VmId) -> bool {
        self.rules_of(vm).iter().any(|&r| {
            let r = &cluster.rules[r as usize];
            r.is_must() && matches!(r.kind, RuleKind::VmAffinity { .. })
        })
    }

    /// Would `vm` on `host` satisfy rule `ri`, given where the other VMs are (`where_is`) and
    /// which hosts are powered on (`on`)? Affinity counts as satisfied when no other member runs
    /// on a different powered-on host (members on hosts being evacuated will follow).
    pub fn allows(
        &self,
        cluster: &Cluster,
        ri: usize,
        vm: VmId,
        host: HostId,
        where_is: &[Option<HostId>],
        on: &[bool],
    ) -> bool {
        let r = &cluster.rules[ri];
        match &r.kind {
            RuleKind::VmHost { run_on, .. } => self.host_sets[ri][host.idx()] == *run_on,
            RuleKind::VmAntiAffinity { vms } => {
                !vms.iter().any(|&o| o != vm && where_is[o.idx()] == Some(host))
            }
            RuleKind::VmAffinity { vms } => vms.iter().all(|&o| {
                o == vm
                    || where_is[o.idx()]
                        .is_none_or(|h| h == host || !on.get(h.idx()).copied().unwrap_or(true))
            }),
        }
    }

    /// The first rule of `vm` (must-rules only, or all when `include_should`) that `vm` on `host`
    /// would break.
    pub fn first_broken(
        &self,
        cluster: &Cluster,
        vm: VmId,
        host: HostId,
        where_is: &[Option<HostId>],
        on: &[bool],
        include_should: bool,
    ) -> Option<usize> {
        self.rules_of(vm).iter().map(|&r| r as usize).find(|&r| {
            (include_should || cluster.rules[r].is_must()) && !self.allows(cluster, r, vm, host, where_is, on)
        })
    }
}

/// Every rule the placement `where_is` breaks, must-rules first, each in rule order.
pub fn violations(cluster: &Cluster, where_is: &[Option<HostId>]) -> Vec<Violation> {
    let idx = RuleIndex::new(cluster);
    let mut out = Vec::new();
    for pass_must in [true, false] {
        for (ri, r) in cluster.rules.iter().enumerate() {
            if r.is_must() != pass_must {
                continue;
            }
            let vms = movers(cluster, &idx, ri, where_is);
            if !vms.is_empty() {
                out.push(Violation { rule: ri, name: r.name.clone(), enforcement: r.enforcement, vms });
            }
        }
    }
    out
}

/// The VMs that must move to fix rule `ri` under `where_is`, in id order (empty: satisfied).
pub fn movers(cluster: &Cluster, idx: &RuleIndex, ri: usize, where_is: &[Option<HostId>]) -> Vec<VmId> {
    let r = &cluster.rules[ri];
    match &r.kind {
        RuleKind::VmHost { vms, .. } => vms
            .iter()
            .copied()
            .filter(|v| where_is[v.idx()].is_some_and(|h| !idx.allows(cluster, ri, *v, h, where_is, &[])))
            .collect(),
        RuleKind::VmAntiAffinity { vms } => {
            let mut sorted: Vec<VmId> = vms.clone();
            sorted.sort_unstable();
            let mut out = Vec::new();
            for (i, v) in sorted.iter().enumerate() {
                let Some(h) = where_is[v.idx()] else { continue };
                if sorted[..i].iter().any(|o| where_is[o.idx()] == Some(h)) {
                    out.push(*v);
                }
            }
            out
        }
        RuleKind::VmAffinity { vms } => {
            let Some(target) = affinity_target(vms, where_is) else {
                return Vec::new();
            };
            let mut out: Vec<VmId> =
                vms.iter().copied().filter(|v| where_is[v.idx()].is_some_and(|h| h != target)).collect();
            out.sort_unstable();
            out
        }
    }
}

/// The host holding most placed members of an affinity group (ties: lowest host id).
pub fn affinity_target(vms: &[VmId], where_is: &[Option<HostId>]) -> Option<HostId> {
    let mut hosts: Vec<HostId> = vms.iter().filter_map(|v| where_is[v.idx()]).collect();
    hosts.sort_unstable();
    let mut best: Option<(usize, HostId)> = None;
    let mut i = 0;
    while i < hosts.len() {
        let mut j = i;
        while j < hosts.len() && hosts[j] == hosts[i] {
            j += 1;
        }
        if best.is_none_or(|(n, _)| j - i > n) {
            best = Some((j - i, hosts[i]));
        }
        i = j;
    }
    best.map(|(_, h)| h)
}

/// Number of must-rules broken by `where_is`.
pub fn must_violations(cluster: &Cluster, where_is: &[Option<HostId>]) -> usize {
    violations(cluster, where_is).iter().filter(|v| v.enforcement == Enforcement::Must).count()
}
