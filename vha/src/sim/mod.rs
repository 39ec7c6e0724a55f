//! A deterministic, seeded simulator: N host agents, the [`MemStore`], a lossy network, all on
//! virtual time.
//!
//! It injects host crashes, process pauses, symmetric and one-way partitions, message delay and
//! loss, host-to-store partitions, whole-store outages and clock drift, and after every step
//! checks the two HA invariants:
//! 1. **safety**: no VM runs on two hosts at once — counting hosts that do not yet know they were
//!    fenced (partitioned or paused hosts still count as running their VMs);
//! 2. **liveness**: once the cluster is quiet (no partition, outage or pause in force), every
//!    protected VM that is down is running again within [`SimConfig::restart_bound_ms`] of the
//!    last fault change (a crash counts), whenever capacity exists for it.
//!
//! A violation carries the seed and the last lines of the trace. Paused hosts model a stuck
//! agent: like Proxmox nodes they have a hardware watchdog that resets them at their lease
//! deadline (the agent's own watchdog cannot run while it is paused).
//!
//! Store calls take no virtual time (a host either reaches the store or not); heartbeats are
//! delayed and lost by the network model.

mod faults;
mod netstore;
mod rng;
mod schedule;

pub use netstore::HostStore;
pub use rng::SplitMix64;
pub use schedule::{Fault, Schedule, run_random, run_seeds};

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

use crate::agent::{Action, DecisionKind, Event, HaConfig, HostAgent};
use crate::model::{HostId, HostSpec, Keys, Priority, VmId, VmSpec};
use crate::restart::{self, AdmissionPolicy, WorstFit};
use crate::store::MemStore;
use crate::view::ClusterView;

/// Simulator settings.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Number of hosts.
    pub hosts: usize,
    /// Number of VMs to power on (admission control may refuse some).
    pub vms: usize,
    /// Agent settings.
    pub ha: HaConfig,
    /// Admission control policy for power-ons.
    pub policy: AdmissionPolicy,
    /// Virtual time per step in ms.
    pub step_ms: u64,
    /// Liveness bound (see the module docs).
    pub restart_bound_ms: u64,
    /// Probability that a power fence fails.
    pub fence_failure: f64,
    /// Host CPU capacity in MHz.
    pub host_cpu_mhz: u64,
    /// Host memory in MiB.
    pub host_mem_mib: u64,
    /// How many trace lines a violation report keeps (the last ones).
    pub trace_lines: usize,
    /// Actual clock rate error of the hosts (default: the watchdog's `max_drift`). Setting it
    /// above the configured bound breaks the watchdog's assumption; tests use it to show the
    /// checker catches the resulting double runs.
    pub actual_drift: Option<f64>,
}

impl Default for SimConfig {
    fn default() -> Self {
        let ha = HaConfig::default();
        let bound = 3 * ha.lease_ttl_ms + 1500;
        Self {
            hosts: 4,
            vms: 8,
            ha,
            policy: AdmissionPolicy::HostFailuresTolerated { hosts: 1 },
            step_ms: 10,
            restart_bound_ms: bound,
            fence_failure: 0.2,
            host_cpu_mhz: 8000,
            host_mem_mib: 16384,
            trace_lines: 40,
            actual_drift: None,
        }
    }
}

/// An invariant violation.
#[derive(Debug, Clone)]
pub struct Violation {
    /// Seed of the run.
    pub seed: u64,
    /// Virtual time of the violation.
    pub at_ms: u64,
    /// What broke.
    pub what: String,
    /// The last trace lines.
    pub trace: Vec<String>,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "seed={} t={}ms: {}", self.seed, self.at_ms, self.what)?;
        writeln!(
            f,
            "replay: VHA_SIM_SEED={} cargo test -p vha --test sim replay_seed -- --nocapture",
            self.seed
        )?;
        for l in &self.trace {
            writeln!(f, "  {l}")?;
        }
        Ok(())
    }
}

impl std::error::Error for Violation {}

/// Counters of one run.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Steps simulated.
    pub steps: u64,
    /// VMs powered on at the start.
    pub vms_powered_on: usize,
    /// Restarts begun by coordinators.
    pub restarts: u64,
    /// Power fences requested.
    pub fences: u64,
    /// Self-fences (watchdog, isolation, lease lost).
    pub self_fences: u64,
    /// Hardware watchdog resets of paused hosts.
    pub hw_resets: u64,
    /// Host crashes injected (and fences carried out).
    pub crashes: u64,
    /// Longest time a protected VM was down (ms).
    pub max_down_ms: u64,
}

#[derive(Debug)]
struct SimHost {
    spec: HostSpec,
    agent: Option<HostAgent>,
    rate: f64,
    offset_ms: u64,
    running: BTreeSet<VmId>,
    cut: u32,
    paused: bool,
    reboot_at: Option<u64>,
}

impl SimHost {
    fn local(&self, now: u64) -> u64 {
        self.offset_ms + (now as f64 * self.rate) as u64
    }
    fn up(&self) -> bool {
        self.agent.is_some()
    }
}

#[derive(Debug)]
struct Msg {
    at: u64,
    to: usize,
    ev: Event,
}

/// The simulator (see the module docs).
#[derive(Debug)]
pub struct Sim {
    seed: u64,
    cfg: SimConfig,
    rng: SplitMix64,
    now: u64,
    store: MemStore,
    keys: Keys,
    hosts: Vec<SimHost>,
    inflight: Vec<Msg>,
    blocked: BTreeMap<(usize, usize), u32>,
    loss: Vec<f64>,
    delays: Vec<u64>,
    outages: u32,
    trace: VecDeque<String>,
    vms: Vec<VmSpec>,
    down_since: BTreeMap<VmId, u64>,
    last_fault_change: u64,
    stats: SimStats,
    out: Vec<Action>,
}

impl Sim {
    /// Builds a cluster from `seed`: hosts with drifting clocks join, VMs are powered on through
    /// admission control, and the simulation runs until they all run.
    pub fn new(seed: u64, cfg: SimConfig) -> Result<Self, Violation> {
        let mut rng = SplitMix64::new(seed);
        let max_drift = cfg.actual_drift.unwrap_or(cfg.ha.watchdog.max_drift);
        let hosts = (0..cfg.hosts)
            .map(|i| SimHost {
                spec: HostSpec {
                    id: HostId(i as u32),
                    cpu_mhz: cfg.host_cpu_mhz,
                    mem_mib: cfg.host_mem_mib,
                    failover: matches!(cfg.policy, AdmissionPolicy::DedicatedFailoverHosts)
                        && i + 1 == cfg.hosts,
                    addr: String::new(),
                    pid: 0,
                },
                agent: None,
                rate: 1.0 + max_drift * rng.signed_unit(),
                offset_ms: rng.below(1_000_000),
                running: BTreeSet::new(),
                cut: 0,
                paused: false,
                reboot_at: Some(0),
            })
            .collect();
        let mut sim = Self {
            seed,
            rng,
            now: 0,
            store: MemStore::new(),
            keys: Keys::default(),
            hosts,
            inflight: Vec::new(),
            blocked: BTreeMap::new(),
            loss: Vec::new(),
            delays: Vec::new(),
            outages: 0,
            trace: VecDeque::new(),
            vms: Vec::new(),
            down_since: BTreeMap::new(),
            last_fault_change: 0,
            stats: SimStats::default(),
            out: Vec::new(),
            cfg,
        };
        sim.run_for(500)?;
        let prios = [Priority::High, Priority::Medium, Priority::Low, Priority::Disabled];
        for v in 0..sim.cfg.vms {
            let spec = VmSpec {
                id: VmId(v as u32),
                cpu_mhz: 500 + 250 * sim.rng.below(8),
                mem_mib: 1024 * (1 + sim.rng.below(4)),
                priority: prios[sim.rng.below(4) as usize],
            };
            match restart::power_on(&sim.store, &sim.keys, &sim.cfg.policy, &mut WorstFit, spec.clone()) {
                Ok((h, t)) => {
                    sim.note(format!("power on {} on {h} token {t}", spec.id));
                    sim.vms.push(spec);
                }
                Err(e) => sim.note(format!("power on refused: {e}")),
            }
        }
        sim.stats.vms_powered_on = sim.vms.len();
        sim.last_fault_change = sim.now;
        sim.run_for(500)?;
        Ok(sim)
    }

    /// Seed of this run.
    pub fn seed(&self) -> u64 {
        self.seed
    }
    /// Virtual time in ms.
    pub fn now_ms(&self) -> u64 {
        self.now
    }
    /// Counters so far.
    pub fn stats(&self) -> &SimStats {
        &self.stats
    }
    /// The VMs that were powered on.
    pub fn vms(&self) -> &[VmSpec] {
        &self.vms
    }
    /// The shared store.
    pub fn store(&self) -> &MemStore {
        &self.store
    }
    /// Hosts currently running `vm` (including hosts that do not know they were fenced).
    pub fn running_on(&self, vm: VmId) -> Vec<HostId> {
        self.hosts.iter().filter(|h| h.up() && h.running.contains(&vm)).map(|h| h.spec.id).collect()
    }
    /// The host that believes it is the coordinator (the first, if several do).
    pub fn coordinator(&self) -> Option<HostId> {
        self.hosts.iter().filter_map(|h| h.agent.as_ref()).find(|a| a.is_coordinator()).map(|a| a.id())
    }
    /// Whether a host is up (not crashed).
    pub fn host_up(&self, h: HostId) -> bool {
        self.hosts.get(h.0 as usize).is_some_and(|x| x.up())
    }
    /// The trace so far (last lines).
    pub fn trace(&self) -> Vec<String> {
        self.trace.iter().cloned().collect()
    }

    /// Appends a line to the trace.
    pub fn note(&mut self, line: String) {
        self.trace.push_back(format!("{:>6} {line}", self.now));
        while self.trace.len() > self.cfg.trace_lines {
            self.trace.pop_front();
        }
    }

    fn violation(&self, what: String) -> Violation {
        Violation { seed: self.seed, at_ms: self.now, what, trace: self.trace() }
    }

    fn fault_changed(&mut self) {
        self.last_fault_change = self.now;
    }

    /// Whether any partition, loss, outage, store cut or pause is in force.
    pub fn faults_active(&self) -> bool {
        !self.blocked.is_empty()
            || !self.loss.is_empty()
            || self.outages > 0
            || self.hosts.iter().any(|h| h.cut > 0 || h.paused)
    }

    /// Runs for `ms` of virtual time, checking the invariants after every step.
    pub fn run_for(&mut self, ms: u64) -> Result<(), Violation> {
        let end = self.now + ms;
        while self.now < end {
            self.step()?;
        }
        Ok(())
    }

    /// One step: time passes, messages arrive, agents tick, invariants are checked.
    pub fn step(&mut self) -> Result<(), Violation> {
        self.now += self.cfg.step_ms;
        self.stats.steps += 1;
        let now = self.now;
        self.store.advance_to(now);
        for i in 0..self.hosts.len() {
            if !self.hosts[i].up() && self.hosts[i].reboot_at.is_some_and(|t| t <= now) {
                self.boot(i);
            }
        }
        self.deliver();
        // Paused hosts: the hardware watchdog resets them at their lease deadline.
        for i in 0..self.hosts.len() {
            let h = &self.hosts[i];
            let due = h.paused
                && h.agent.as_ref().and_then(|a| a.watchdog_deadline_ms()).is_some_and(|d| h.local(now) >= d);
            if due {
                self.stats.hw_resets += 1;
                self.note(format!("HW-WATCHDOG resets paused host-{i}"));
                self.crash(i, Some(1000));
            }
        }
        let n = self.hosts.len();
        let start = self.rng.below(n as u64) as usize;
        for k in 0..n {
            let i = (start + k) % n;
            self.tick_host(i);
        }
        self.check()
    }

    fn boot(&mut self, i: usize) {
        let now = self.now;
        let local = self.hosts[i].local(now);
        let spec = self.hosts[i].spec.clone();
        match HostAgent::new(self.cfg.ha.clone(), spec, self.keys.clone(), local) {
            Ok(a) => {
                let h = &mut self.hosts[i];
                h.agent = Some(a);
                h.reboot_at = None;
                h.running.clear();
                h.paused = false;
                self.note(format!("BOOT host-{i}"));
            }
            Err(e) => self.note(format!("boot host-{i} failed: {e}")),
        }
    }

    fn deliver(&mut self) {
        let now = self.now;
        let mut i = 0;
        while i < self.inflight.len() {
            if self.inflight[i].at <= now {
                let m = self.inflight.swap_remove(i);
                let h = &mut self.hosts[m.to];
                let local = h.local(now);
                if let (Some(a), false) = (h.agent.as_mut(), h.paused) {
                    a.handle(local, m.ev);
                }
            } else {
                i += 1;
            }
        }
    }

    fn tick_host(&mut self, i: usize) {
        let now = self.now;
        let h = &mut self.hosts[i];
        if h.paused {
            return;
        }
        let local = h.local(now);
        let Some(agent) = h.agent.as_mut() else {
            return;
        };
        let hs = HostStore { store: &self.store, cut: h.cut > 0 };
        let mut out = std::mem::take(&mut self.out);
        agent.tick(local, &hs, &mut WorstFit, &mut out);
        for a in out.drain(..) {
            self.apply(i, a);
        }
        self.out = out;
    }

    fn apply(&mut self, i: usize, a: Action) {
        let now = self.now;
        match a {
            Action::SendHeartbeat { to, .. } => {
                let to = to.0 as usize;
                if to >= self.hosts.len() || self.blocked.contains_key(&(i, to)) {
                    return;
                }
                let loss = self.loss.iter().copied().fold(0.0, f64::max);
                if loss > 0.0 && self.rng.chance(loss) {
                    return;
                }
                let max_delay = self.delays.iter().copied().max().unwrap_or(2);
                let at = now + 1 + self.rng.below(max_delay + 1);
                self.inflight.push(Msg { at, to, ev: Event::Heartbeat { from: HostId(i as u32) } });
            }
            Action::StartVm { vm, token } => {
                self.hosts[i].running.insert(vm);
                self.note(format!("host-{i} START {vm} token {token}"));
            }
            Action::StopVm { vm, reason } => {
                self.hosts[i].running.remove(&vm);
                self.note(format!("host-{i} STOP {vm} ({reason:?})"));
            }
            Action::Fence { host } => {
                self.stats.fences += 1;
                let t = host.id.0 as usize;
                let ok = t < self.hosts.len() && !self.rng.chance(self.cfg.fence_failure);
                if ok {
                    self.note(format!("host-{i} FENCE {} ok", host.id));
                    if self.hosts[t].up() {
                        let reboot = self.rng.range(1000, 4000);
                        self.crash(t, Some(reboot));
                    }
                } else {
                    self.note(format!("host-{i} FENCE {} failed", host.id));
                }
                let result = if ok { Ok(()) } else { Err("power control unreachable".into()) };
                let at = now + self.rng.range(10, 200);
                self.inflight.push(Msg { at, to: i, ev: Event::FenceDone { host: host.id, result } });
            }
            Action::Log(d) => {
                match &d.kind {
                    DecisionKind::Restart { .. } => self.stats.restarts += 1,
                    DecisionKind::SelfFence => self.stats.self_fences += 1,
                    DecisionKind::Started { .. } | DecisionKind::Stopped { .. } => return,
                    _ => {}
                }
                self.note(format!("host-{i} {:?}: {}", d.kind, d.reason));
            }
        }
    }

    fn check(&mut self) -> Result<(), Violation> {
        let now = self.now;
        for i in 0..self.hosts.len() {
            let h = &self.hosts[i];
            if let Some(a) = &h.agent
                && a.running().keys().ne(h.running.iter())
            {
                return Err(self.violation(format!("host-{i}: agent and hypervisor disagree")));
            }
        }
        let mut down = Vec::new();
        for vm in &self.vms {
            let on = self.running_on(vm.id);
            if on.len() > 1 {
                return Err(self.violation(format!("SAFETY: {} runs on {on:?}", vm.id)));
            }
            if vm.protected() && on.is_empty() {
                down.push(vm.id);
            }
        }
        self.down_since.retain(|vm, since| {
            if down.contains(vm) {
                true
            } else {
                self.stats.max_down_ms = self.stats.max_down_ms.max(now - *since);
                false
            }
        });
        for vm in &down {
            self.down_since.entry(*vm).or_insert(now);
        }
        if self.faults_active() {
            return Ok(());
        }
        let overdue: Vec<(VmId, u64)> = self
            .down_since
            .iter()
            .map(|(vm, since)| (*vm, now - (*since).max(self.last_fault_change)))
            .filter(|(_, d)| *d > self.cfg.restart_bound_ms)
            .collect();
        if overdue.is_empty() {
            return Ok(());
        }
        let view = ClusterView::read(&self.store, &self.keys)
            .map_err(|e| self.violation(format!("store unreadable while healthy: {e}")))?;
        let alive: Vec<HostId> = self.hosts.iter().filter(|h| h.up()).map(|h| h.spec.id).collect();
        for (vm, d) in overdue {
            let owned_by_live = view.vms.get(&vm).is_some_and(|e| view.owner_alive(e));
            if owned_by_live || restart::capacity_exists(&view, &alive) {
                return Err(self.violation(format!(
                    "LIVENESS: {vm} down for {d} ms (> {} ms) with capacity available",
                    self.cfg.restart_bound_ms
                )));
            }
        }
        Ok(())
    }
}
