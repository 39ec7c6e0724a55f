//! The ledger: flat per-host accounting of entitlements and reservations plus the VM-to-host
//! assignment, updated in place by each move.
//!
//! A pass builds one ledger (O(VMs + hosts)) and then evaluates candidate moves in O(1) each
//! against it; nothing is cloned per candidate. The imbalance metric lives here too.

use crate::entitlement::Entitlements;
use crate::model::{Cluster, HostId, HostState, Resources, VmId};
use crate::rules::RuleIndex;

/// Why a host cannot take a VM (the constraint that failed).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum HostReject {
    /// The host is not powered on (standby or maintenance).
    NotOn,
    /// CPU reservations would exceed the host's CPU (admission control).
    CpuReservation,
    /// Memory reservations would exceed the host's memory (admission control).
    MemReservation,
    /// CPU entitlements would exceed the host's CPU.
    CpuCapacity,
    /// Memory entitlements would exceed the host's memory.
    MemCapacity,
    /// The VM is already there.
    SameHost,
}

impl std::fmt::Display for HostReject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HostReject::NotOn => "host not powered on",
            HostReject::CpuReservation => "CPU reservations would exceed host CPU",
            HostReject::MemReservation => "memory reservations would exceed host memory",
            HostReject::CpuCapacity => "CPU entitlements would exceed host CPU",
            HostReject::MemCapacity => "memory entitlements would exceed host memory",
            HostReject::SameHost => "already on that host",
        })
    }
}

/// Per-host accounting and the assignment.
#[derive(Debug, Clone)]
pub struct Ledger {
    /// Host of each VM.
    pub where_is: Vec<Option<HostId>>,
    /// Load of each VM: its entitlement (or, for VMs being placed, what it wants).
    pub load: Vec<Resources>,
    /// Reservation of each VM.
    pub res: Vec<Resources>,
    /// Sum of loads per host.
    pub host_load: Vec<Resources>,
    /// Sum of reservations per host.
    pub host_res: Vec<Resources>,
    /// Capacity per host.
    pub cap: Vec<Resources>,
    /// 1 / capacity, per host (CPU, memory).
    pub inv_cap: Vec<(f64, f64)>,
    /// Is the host powered on (a valid destination and part of the metric)?
    pub on: Vec<bool>,
    /// VMs on each host (unordered).
    pub host_vms: Vec<Vec<u32>>,
    pos: Vec<u32>,
    n_on: usize,
}

impl Ledger {
    /// Builds the ledger from the cluster and its entitlements.
    ///
    /// # Panics
    /// On a cluster that fails [`Cluster::validate`].
    pub fn new(cluster: &Cluster, ent: &Entitlements) -> Self {
        let nh = cluster.hosts.len();
        let mut l = Ledger {
            where_is: cluster.vms.iter().map(|v| v.host).collect(),
            load: ent.vm.clone(),
            res: cluster.vms.iter().map(|v| v.reservation).collect(),
            host_load: vec![Resources::default(); nh],
            host_res: vec![Resources::default(); nh],
            cap: cluster.hosts.iter().map(|h| h.capacity()).collect(),
            inv_cap: cluster.hosts.iter().map(|h| (1.0 / h.cpu_mhz as f64, 1.0 / h.mem_mib as f64)).collect(),
            on: cluster.hosts.iter().map(|h| h.state == HostState::On).collect(),
            host_vms: vec![Vec::new(); nh],
            pos: vec![0; cluster.vms.len()],
            n_on: 0,
        };
        l.n_on = l.on.iter().filter(|&&o| o).count();
        for v in 0..cluster.vms.len() {
            if let Some(h) = l.where_is[v] {
                l.attach(VmId(v as u32), h);
            }
        }
        l
    }

    fn attach(&mut self, vm: VmId, h: HostId) {
        let (v, hi) = (vm.idx(), h.idx());
        self.where_is[v] = Some(h);
        add(&mut self.host_load[hi], self.load[v]);
        add(&mut self.host_res[hi], self.res[v]);
        self.pos[v] = self.host_vms[hi].len() as u32;
        self.host_vms[hi].push(vm.0);
    }

    fn detach(&mut self, vm: VmId) {
        let v = vm.idx();
        let Some(h) = self.where_is[v] else { return };
        let hi = h.idx();
        sub(&mut self.host_load[hi], self.load[v]);
        sub(&mut self.host_res[hi], self.res[v]);
        let p = self.pos[v] as usize;
        self.host_vms[hi].swap_remove(p);
        if let Some(&moved) = self.host_vms[hi].get(p) {
            self.pos[moved as usize] = p as u32;
        }
        self.where_is[v] = None;
    }

    /// Takes `vm` off its host (it becomes unplaced), updating all sums.
    pub fn remove(&mut self, vm: VmId) {
        self.detach(vm);
    }

    /// Moves (or places) `vm` onto `to`, updating all sums.
    pub fn apply(&mut self, vm: VmId, to: HostId) {
        self.detach(vm);
        self.attach(vm, to);
    }

    /// Places an unplaced VM with the given load onto `to`.
    pub fn place(&mut self, vm: VmId, load: Resources, to: HostId) {
        self.detach(vm);
        self.load[vm.idx()] = load;
        self.attach(vm, to);
    }

    /// Marks a host powered on or off (as power management plans to), keeping the count.
    pub fn set_on(&mut self, h: HostId, on: bool) {
        let was = std::mem::replace(&mut self.on[h.idx()], on);
        match (was, on) {
            (false, true) => self.n_on += 1,
            (true, false) => self.n_on -= 1,
            _ => {}
        }
    }

    /// Number of powered-on hosts.
    pub fn hosts_on(&self) -> usize {
        self.n_on
    }

    /// Capacity and admission check of `vm` (with load `load`) on `to`, ignoring rules.
    pub fn fits(&self, vm: VmId, load: Resources, to: HostId) -> Result<(), HostReject> {
        let t = to.idx();
        if !self.on[t] {
            return Err(HostReject::NotOn);
        }
        if self.where_is[vm.idx()] == Some(to) {
            return Err(HostReject::SameHost);
        }
        self.fits_load(load, self.res[vm.idx()], to)
    }

    /// Full check of moving `vm` to `to`: capacity, admission and must-rules (plus should-rules
    /// when `strict_should`). Returns the failed constraint.
    pub fn check_move(
        &self,
        cluster: &Cluster,
        rules: &RuleIndex,
        vm: VmId,
        to: HostId,
        strict_should: bool,
    ) -> Result<(), Constraint> {
        self.fits(vm, self.load[vm.idx()], to).map_err(Constraint::Host)?;
        if let Some(r) = rules.first_broken(cluster, vm, to, &self.where_is, &self.on, strict_should) {
            return Err(Constraint::Rule(r));
        }
        Ok(())
    }

    /// Normalized load of host `h`: (CPU, memory) load / capacity.
    pub fn norm(&self, h: usize) -> (f64, f64) {
        let (ic, im) = self.inv_cap[h];
        (self.host_load[h].cpu_mhz as f64 * ic, self.host_load[h].mem_mib as f64 * im)
    }

    /// Sums over powered-on hosts: (Σx_cpu, Σx_cpu², Σx_mem, Σx_mem²).
    pub fn moments(&self) -> Moments {
        let mut m = Moments::default();
        for h in 0..self.on.len() {
            if self.on[h] {
                let (c, me) = self.norm(h);
                m.s1c += c;
                m.s2c += c * c;
                m.s1m += me;
                m.s2m += me * me;
            }
        }
        m.n = self.n_on as f64;
        m
    }

    /// The imbalance: standard deviation of the hosts' normalized entitlement (CPU and memory
    /// variances averaged), over powered-on hosts.
    pub fn imbalance(&self) -> f64 {
        self.moments().sigma(Delta::default())
    }

    /// Change of the moment sums if `vm` moved from its host to `to` (a host that is not
    /// powered on contributes nothing).
    pub fn move_delta(&self, vm: VmId, to: HostId) -> Delta {
        let v = vm.idx();
        self.load_delta(self.load[v], self.where_is[v], to)
    }

    /// Change of the moment sums if `load` moved from `from` to `to`.
    pub fn load_delta(&self, load: Resources, from: Option<HostId>, to: HostId) -> Delta {
        let mut d = Delta::default();
        if let Some(s) = from {
            let s = s.idx();
            if self.on[s] {
                let (xc, xm) = self.norm(s);
                let (ic, im) = self.inv_cap[s];
                let (a, b) = (load.cpu_mhz as f64 * ic, load.mem_mib as f64 * im);
                d.s1c -= a;
                d.s2c += a * a - 2.0 * xc * a;
                d.s1m -= b;
                d.s2m += b * b - 2.0 * xm * b;
            }
        }
        let t = to.idx();
        if self.on[t] {
            d.add_to(self, load, t);
        }
        d
    }

    /// Change of the moment sums if `vm`'s load were *also* counted on `to` (as it is while
    /// migrating): the cost side of cost-benefit.
    pub fn dual_delta(&self, vm: VmId, to: HostId) -> Delta {
        self.dual_load_delta(self.load[vm.idx()], to)
    }

    /// Change of the moment sums if `load` were also counted on `to`.
    pub fn dual_load_delta(&self, load: Resources, to: HostId) -> Delta {
        let mut d = Delta::default();
        d.add_to(self, load, to.idx());
        d
    }

    /// Capacity and admission check of a combined `load` with reservation `res` arriving on
    /// `to` (a group of VMs moving together), ignoring rules.
    pub fn fits_load(&self, load: Resources, res: Resources, to: HostId) -> Result<(), HostReject> {
        let t = to.idx();
        if !self.on[t] {
            return Err(HostReject::NotOn);
        }
        let (hr, hl, cap) = (self.host_res[t], self.host_load[t], self.cap[t]);
        if hr.cpu_mhz + res.cpu_mhz > cap.cpu_mhz {
            return Err(HostReject::CpuReservation);
        }
        if hr.mem_mib + res.mem_mib > cap.mem_mib {
            return Err(HostReject::MemReservation);
        }
        if hl.cpu_mhz + load.cpu_mhz > cap.cpu_mhz {
            return Err(HostReject::CpuCapacity);
        }
        if hl.mem_mib + load.mem_mib > cap.mem_mib {
            return Err(HostReject::MemCapacity);
        }
        Ok(())
    }
}

/// A change of the moment sums (see [`Moments`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Delta {
    /// Change of Σ x_cpu.
    pub s1c: f64,
    /// Change of Σ x_cpu².
    pub s2c: f64,
    /// Change of Σ x_mem.
    pub s1m: f64,
    /// Change of Σ x_mem².
    pub s2m: f64,
}

impl Delta {
    fn add_to(&mut self, l: &Ledger, load: Resources, t: usize) {
        let (xc, xm) = l.norm(t);
        let (ic, im) = l.inv_cap[t];
        let (a, b) = (load.cpu_mhz as f64 * ic, load.mem_mib as f64 * im);
        self.s1c += a;
        self.s2c += a * a + 2.0 * xc * a;
        self.s1m += b;
        self.s2m += b * b + 2.0 * xm * b;
    }
}

/// The constraint that blocks a move.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Constraint {
    /// A host-level constraint (power, capacity, admission).
    Host(HostReject),
    /// A rule, by index.
    Rule(usize),
}

/// Running sums of normalized loads over powered-on hosts.
#[derive(Debug, Clone, Copy, Default)]
pub struct Moments {
    /// Number of hosts.
    pub n: f64,
    /// Σ x_cpu.
    pub s1c: f64,
    /// Σ x_cpu².
    pub s2c: f64,
    /// Σ x_mem.
    pub s1m: f64,
    /// Σ x_mem².
    pub s2m: f64,
}

impl Moments {
    /// The imbalance after applying `d`.
    pub fn sigma(&self, d: Delta) -> f64 {
        if self.n == 0.0 {
            return 0.0;
        }
        let vc = (self.s2c + d.s2c) / self.n - ((self.s1c + d.s1c) / self.n).powi(2);
        let vm = (self.s2m + d.s2m) / self.n - ((self.s1m + d.s1m) / self.n).powi(2);
        (0.5 * (vc.max(0.0) + vm.max(0.0))).sqrt()
    }

    /// Goodness of a change: the reduction of the sum of squared deviations from the mean,
    /// Σ(x - μ)², averaged over CPU and memory. Positive means more balanced.
    pub fn goodness(&self, d: Delta) -> f64 {
        if self.n == 0.0 {
            return 0.0;
        }
        let ssc = d.s2c - ((self.s1c + d.s1c).powi(2) - self.s1c.powi(2)) / self.n;
        let ssm = d.s2m - ((self.s1m + d.s1m).powi(2) - self.s1m.powi(2)) / self.n;
        -0.5 * (ssc + ssm)
    }
}

fn add(a: &mut Resources, b: Resources) {
    a.cpu_mhz += b.cpu_mhz;
    a.mem_mib += b.mem_mib;
}

fn sub(a: &mut Resources, b: Resources) {
    a.cpu_mhz -= b.cpu_mhz;
    a.mem_mib -= b.mem_mib;
}

/// The imbalance of a cluster as it stands.
///
/// # Panics
/// On a cluster that fails [`Cluster::validate`].
pub fn imbalance(cluster: &Cluster) -> f64 {
    let ent = crate::entitlement::compute(cluster);
    Ledger::new(cluster, &ent).imbalance()
}
