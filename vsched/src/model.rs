//! The cluster model: hosts, VMs, resource pools and rules, as plain serde data.
//!
//! Everything is indexed: a [`HostId`], [`VmId`] or [`PoolId`] is the position of the item in
//! the cluster's vectors. That keeps the scheduler data-oriented (flat vectors, no maps in the hot
//! paths) and makes JSON snapshots small and stable. [`Cluster::from_json`] parses and validates a
//! snapshot; [`Cluster::validate`] checks a cluster built in code.

use serde::{Deserialize, Serialize};

use crate::rules::{Rule, RuleKind};

/// Index of a host in [`Cluster::hosts`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct HostId(pub u32);

/// Index of a VM in [`Cluster::vms`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct VmId(pub u32);

/// Index of a resource pool in [`Cluster::pools`]. Pool 0 is the root (the cluster itself).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PoolId(pub u32);

impl HostId {
    /// The index as `usize`.
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}
impl VmId {
    /// The index as `usize`.
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}
impl PoolId {
    /// The root pool.
    pub const ROOT: PoolId = PoolId(0);
    /// The index as `usize`.
    pub fn idx(self) -> usize {
        self.0 as usize
    }
}

impl std::fmt::Display for HostId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "host#{}", self.0)
    }
}
impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "vm#{}", self.0)
    }
}

/// An amount of CPU (MHz) and memory (MiB).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    /// CPU in MHz.
    pub cpu_mhz: u64,
    /// Memory in MiB.
    pub mem_mib: u64,
}

impl Resources {
    /// A new amount.
    pub const fn new(cpu_mhz: u64, mem_mib: u64) -> Self {
        Resources { cpu_mhz, mem_mib }
    }
    /// Component-wise `self <= other`.
    pub fn fits_in(self, other: Resources) -> bool {
        self.cpu_mhz <= other.cpu_mhz && self.mem_mib <= other.mem_mib
    }
}

/// Relative priority when resources are contended (VMware's "shares").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shares {
    /// CPU shares (at least 1).
    pub cpu: u32,
    /// Memory shares (at least 1).
    pub mem: u32,
}

impl Default for Shares {
    fn default() -> Self {
        Shares { cpu: 1000, mem: 1000 }
    }
}

/// Power and maintenance state of a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum HostState {
    /// Powered on, accepts VMs.
    #[default]
    On,
    /// Powered down by power management; runs nothing, can be woken.
    Standby,
    /// Being evacuated or serviced; accepts no VMs, its VMs must move.
    Maintenance,
}

/// One physical server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    /// Human-readable name.
    pub name: String,
    /// Total CPU capacity in MHz available to VMs.
    pub cpu_mhz: u64,
    /// Total memory in MiB available to VMs.
    pub mem_mib: u64,
    /// Power / maintenance state.
    #[serde(default)]
    pub state: HostState,
}

impl Host {
    /// A powered-on host.
    pub fn new(name: impl Into<String>, cpu_mhz: u64, mem_mib: u64) -> Self {
        Host { name: name.into(), cpu_mhz, mem_mib, state: HostState::On }
    }
    /// Capacity as [`Resources`].
    pub fn capacity(&self) -> Resources {
        Resources::new(self.cpu_mhz, self.mem_mib)
    }
}

/// One virtual machine and what it asks of the cluster.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// Human-readable name.
    pub name: String,
    /// Configured size: vCPUs times core speed (MHz) and configured memory (MiB). Demand and
    /// entitlement never exceed it.
    pub size: Resources,
    /// Current demand (measured CPU MHz and active memory MiB).
    pub demand: Resources,
    /// Guaranteed minimum.
    #[serde(default)]
    pub reservation: Resources,
    /// Maximum; `None` means the size is the limit.
    #[serde(default)]
    pub limit: Option<Resources>,
    /// Relative priority under contention.
    #[serde(default)]
    pub shares: Shares,
    /// Resource pool the VM belongs to.
    #[serde(default = "root_pool")]
    pub pool: PoolId,
    /// Host the VM runs on; `None` when not placed (powered off or waiting for placement).
    #[serde(default)]
    pub host: Option<HostId>,
    /// Measured memory dirty rate in MiB/s (from a migration dirty-rate probe); drives the cost
    /// of moving the VM.
    #[serde(default)]
    pub dirty_mib_s: f64,
}

fn root_pool() -> PoolId {
    PoolId::ROOT
}

impl VmSpec {
    /// A VM of the given size whose demand equals its size, in the root pool, unplaced.
    pub fn new(name: impl Into<String>, size: Resources) -> Self {
        VmSpec {
            name: name.into(),
            size,
            demand: size,
            reservation: Resources::default(),
            limit: None,
            shares: Shares::default(),
            pool: PoolId::ROOT,
            host: None,
            dirty_mib_s: 0.0,
        }
    }
    /// The effective cap: the limit, never above the size.
    pub fn cap(&self) -> Resources {
        match self.limit {
            Some(l) => Resources::new(l.cpu_mhz.min(self.size.cpu_mhz), l.mem_mib.min(self.size.mem_mib)),
            None => self.size,
        }
    }
    /// Demand capped by the limit and size, but never below the reservation: what the VM would
    /// be entitled to on an uncontended cluster.
    pub fn wanted(&self) -> Resources {
        let cap = self.cap();
        Resources::new(
            self.demand.cpu_mhz.min(cap.cpu_mhz).max(self.reservation.cpu_mhz),
            self.demand.mem_mib.min(cap.mem_mib).max(self.reservation.mem_mib),
        )
    }
}

/// A resource pool: a node of the tree that divides capacity among its children.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Human-readable name.
    pub name: String,
    /// Parent pool; `None` only for the root (index 0). A parent's index is always smaller than
    /// its children's, so the tree has no cycles by construction.
    pub parent: Option<PoolId>,
    /// Guaranteed minimum for the pool as a whole (expandable: children's reservations add up).
    #[serde(default)]
    pub reservation: Resources,
    /// Maximum for the pool as a whole.
    #[serde(default)]
    pub limit: Option<Resources>,
    /// Relative priority among siblings.
    #[serde(default)]
    pub shares: Shares,
}

impl Pool {
    /// The root pool.
    pub fn root() -> Self {
        Pool {
            name: "root".into(),
            parent: None,
            reservation: Resources::default(),
            limit: None,
            shares: Shares::default(),
        }
    }
    /// A child pool with default shares and no reservation or limit.
    pub fn child(name: impl Into<String>, parent: PoolId) -> Self {
        Pool { parent: Some(parent), name: name.into(), ..Pool::root() }
    }
}

/// A whole cluster: the unit DRS works on and the JSON snapshot format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Hosts, indexed by [`HostId`].
    pub hosts: Vec<Host>,
    /// VMs, indexed by [`VmId`].
    pub vms: Vec<VmSpec>,
    /// Resource pools, indexed by [`PoolId`]; index 0 is the root. Empty means "root only".
    #[serde(default)]
    pub pools: Vec<Pool>,
    /// Placement rules.
    #[serde(default)]
    pub rules: Vec<Rule>,
}

/// Errors in a cluster description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ModelError {
    /// The JSON did not parse or had unknown fields.
    #[error("parsing cluster JSON: {0}")]
    Json(String),
    /// A VM names a host that does not exist.
    #[error("vm {vm} ({name}) is on host {host}, but the cluster has {hosts} hosts")]
    UnknownHost {
        /// The VM.
        vm: VmId,
        /// Its name.
        name: String,
        /// The host index it names.
        host: u32,
        /// Number of hosts.
        hosts: usize,
    },
    /// A host with zero CPU or memory.
    #[error("host {host} ({name}) has zero CPU or memory capacity")]
    BadHost {
        /// The host.
        host: HostId,
        /// Its name.
        name: String,
    },
    /// A VM names a pool that does not exist.
    #[error("vm {vm} ({name}) is in pool {pool}, but the cluster has {pools} pools")]
    UnknownPool {
        /// The VM.
        vm: VmId,
        /// Its name.
        name: String,
        /// The pool index it names.
        pool: u32,
        /// Number of pools.
        pools: usize,
    },
    /// A VM runs on a host in standby.
    #[error("vm {vm} ({name}) is on host {host}, which is in standby")]
    OnStandbyHost {
        /// The VM.
        vm: VmId,
        /// Its name.
        name: String,
        /// The host.
        host: HostId,
    },
    /// Reservation above limit or size, or demand above size.
    #[error("vm {vm} ({name}): {what}")]
    BadVm {
        /// The VM.
        vm: VmId,
        /// Its name.
        name: String,
        /// What is wrong.
        what: &'static str,
    },
    /// A pool's parent is missing, or not before it.
    #[error("pool {pool} ({name}): {what}")]
    BadPool {
        /// The pool index.
        pool: u32,
        /// Its name.
        name: String,
        /// What is wrong.
        what: &'static str,
    },
    /// A rule names an unknown VM or host, or has too few members.
    #[error("rule {rule} ({name}): {what}")]
    BadRule {
        /// Index of the rule.
        rule: usize,
        /// Its name.
        name: String,
        /// What is wrong.
        what: String,
    },
    /// Shares of zero.
    #[error("{what} has zero shares")]
    ZeroShares {
        /// Which VM or pool.
        what: String,
    },
}

impl Cluster {
    /// An empty cluster with only the root pool.
    pub fn new() -> Self {
        Cluster { hosts: Vec::new(), vms: Vec::new(), pools: vec![Pool::root()], rules: Vec::new() }
    }

    /// Parses a JSON snapshot and validates it. An empty `pools` list gets the root pool.
    pub fn from_json(s: &str) -> Result<Cluster, ModelError> {
        let mut c: Cluster = serde_json::from_str(s).map_err(|e| ModelError::Json(e.to_string()))?;
        if c.pools.is_empty() {
            c.pools.push(Pool::root());
        }
        c.validate()?;
        Ok(c)
    }

    /// The cluster as pretty JSON.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("cluster serializes")
    }

    /// Adds a host and returns its id.
    pub fn add_host(&mut self, host: Host) -> HostId {
        self.hosts.push(host);
        HostId(self.hosts.len() as u32 - 1)
    }

    /// Adds a VM and returns its id.
    pub fn add_vm(&mut self, vm: VmSpec) -> VmId {
        self.vms.push(vm);
        VmId(self.vms.len() as u32 - 1)
    }

    /// Adds a pool and returns its id.
    pub fn add_pool(&mut self, pool: Pool) -> PoolId {
        if self.pools.is_empty() {
            self.pools.push(Pool::root());
        }
        self.pools.push(pool);
        PoolId(self.pools.len() as u32 - 1)
    }

    /// Adds a rule and returns its index.
    pub fn add_rule(&mut self, rule: Rule) -> usize {
        self.rules.push(rule);
        self.rules.len() - 1
    }

    /// Number of pools, counting the implicit root of an empty pool list.
    pub fn pool_count(&self) -> usize {
        self.pools.len().max(1)
    }

    /// Checks every cross-reference and bound; the scheduler assumes a valid cluster.
    pub fn validate(&self) -> Result<(), ModelError> {
        let npools = self.pool_count();
        for (i, p) in self.pools.iter().enumerate() {
            let bad = |what| ModelError::BadPool { pool: i as u32, name: p.name.clone(), what };
            match (i, p.parent) {
                (0, None) => {}
                (0, Some(_)) => return Err(bad("the root pool (index 0) must have no parent")),
                (_, None) => return Err(bad("only the root pool may lack a parent")),
                (_, Some(par)) if par.idx() >= i => {
                    return Err(bad("parent must come before the pool in the list"));
                }
                _ => {}
            }
            if p.shares.cpu == 0 || p.shares.mem == 0 {
                return Err(ModelError::ZeroShares { what: format!("pool {i} ({})", p.name) });
            }
            if p.limit.is_some_and(|l| !p.reservation.fits_in(l)) {
                return Err(bad("reservation above limit"));
            }
        }
        for (i, h) in self.hosts.iter().enumerate() {
            if h.cpu_mhz == 0 || h.mem_mib == 0 {
                return Err(ModelError::BadHost { host: HostId(i as u32), name: h.name.clone() });
            }
        }
        for (i, vm) in self.vms.iter().enumerate() {
            let id = VmId(i as u32);
            let bad = |what| ModelError::BadVm { vm: id, name: vm.name.clone(), what };
            if let Some(h) = vm.host {
                let Some(host) = self.hosts.get(h.idx()) else {
                    return Err(ModelError::UnknownHost {
                        vm: id,
                        name: vm.name.clone(),
                        host: h.0,
                        hosts: self.hosts.len(),
                    });
                };
                if host.state == HostState::Standby {
                    return Err(ModelError::OnStandbyHost { vm: id, name: vm.name.clone(), host: h });
                }
            }
            if vm.pool.idx() >= npools {
                return Err(ModelError::UnknownPool {
                    vm: id,
                    name: vm.name.clone(),
                    pool: vm.pool.0,
                    pools: npools,
                });
            }
            if !vm.reservation.fits_in(vm.cap()) {
                return Err(bad("reservation above limit or size"));
            }
            if !vm.demand.fits_in(vm.size) {
                return Err(bad("demand above size"));
            }
            if !(vm.dirty_mib_s.is_finite() && vm.dirty_mib_s >= 0.0) {
                return Err(bad("dirty rate must be a finite, non-negative number"));
            }
            if vm.shares.cpu == 0 || vm.shares.mem == 0 {
                return Err(ModelError::ZeroShares { what: format!("vm {i} ({})", vm.name) });
            }
        }
        for (i, r) in self.rules.iter().enumerate() {
            let bad = |what: String| ModelError::BadRule { rule: i, name: r.name.clone(), what };
            if let Some(v) = r.vms().iter().find(|v| v.idx() >= self.vms.len()) {
                return Err(bad(format!("names {v}, but the cluster has {} VMs", self.vms.len())));
            }
            let mut seen = r.vms().to_vec();
            seen.sort_unstable();
            seen.dedup();
            if seen.len() != r.vms().len() {
                return Err(bad("lists a VM twice".into()));
            }
            match &r.kind {
                RuleKind::VmAffinity { vms } | RuleKind::VmAntiAffinity { vms } => {
                    if vms.len() < 2 {
                        return Err(bad("a VM-VM rule needs at least two VMs".into()));
                    }
                }
                RuleKind::VmHost { vms, hosts, .. } => {
                    if vms.is_empty() || hosts.is_empty() {
                        return Err(bad("a VM-host rule needs VMs and hosts".into()));
                    }
                    if let Some(h) = hosts.iter().find(|h| h.idx() >= self.hosts.len()) {
                        return Err(bad(format!(
                            "names {h}, but the cluster has {} hosts",
                            self.hosts.len()
                        )));
                    }
                }
            }
        }
        Ok(())
    }

    /// Total capacity of powered-on hosts (hosts that accept VMs).
    pub fn on_capacity(&self) -> Resources {
        self.hosts
            .iter()
            .filter(|h| h.state == HostState::On)
            .fold(Resources::default(), |a, h| Resources::new(a.cpu_mhz + h.cpu_mhz, a.mem_mib + h.mem_mib))
    }

    /// VMs on `host`, in id order.
    pub fn vms_on(&self, host: HostId) -> Vec<VmId> {
        self.vms
            .iter()
            .enumerate()
            .filter(|(_, v)| v.host == Some(host))
            .map(|(i, _)| VmId(i as u32))
            .collect()
    }
}

impl Default for Cluster {
    fn default() -> Self {
        Cluster::new()
    }
}
