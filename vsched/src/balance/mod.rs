//! One DRS pass: mandatory moves (maintenance evacuation, must-rule fixes, then should-rule
//! fixes), then greedy load balancing.
//!
//! The imbalance is the standard deviation of the powered-on hosts' normalized entitlement
//! (CPU and memory variances averaged). Each greedy step looks at the most and least loaded
//! hosts, scores every (VM, destination) pair by *goodness* (how much the move reduces the sum of
//! squared deviations, an O(1) update of the [`Ledger`]), drops pairs that break capacity,
//! reservations or rules, that would flap (hysteresis), whose VM would not converge, or whose
//! migration costs more than the gain is worth, and takes the best. Nothing is cloned per
//! candidate. The pass is a pure function of (cluster, config, history): a dry run.

use serde::Serialize;

use crate::config::BalanceConfig;
use crate::entitlement;
use crate::ledger::Ledger;
use crate::model::{Cluster, HostId, VmId};
use crate::placement::Rejections;
use crate::rules::RuleIndex;

mod greedy;
mod planner;

pub(crate) use planner::Planner;

/// Why a move is recommended.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum Reason {
    /// Evacuating a host in maintenance mode.
    Maintenance {
        /// The host.
        host: HostId,
    },
    /// Fixing a broken must-rule.
    MustRule {
        /// Rule index.
        rule: usize,
        /// Rule name.
        name: String,
    },
    /// Fixing a broken should-rule.
    ShouldRule {
        /// Rule index.
        rule: usize,
        /// Rule name.
        name: String,
    },
    /// Evacuating a host that power management puts in standby.
    Standby {
        /// The host.
        host: HostId,
    },
    /// Reducing imbalance.
    Balance,
}

impl Reason {
    /// Is this a mandatory move (everything but load balancing)?
    pub fn is_mandatory(&self) -> bool {
        !matches!(self, Reason::Balance)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Reason::Maintenance { host } => write!(f, "evacuate {host} (maintenance)"),
            Reason::MustRule { name, .. } => write!(f, "fix must-rule '{name}'"),
            Reason::ShouldRule { name, .. } => write!(f, "fix should-rule '{name}'"),
            Reason::Standby { host } => write!(f, "evacuate {host} (power management)"),
            Reason::Balance => write!(f, "reduce imbalance"),
        }
    }
}

/// What a move is expected to do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Expected {
    /// Imbalance before this move (after the previous moves of the pass).
    pub imbalance_before: f64,
    /// Imbalance after this move.
    pub imbalance_after: f64,
    /// Reduction of the sum of squared deviations of normalized host loads (may be negative for
    /// mandatory moves).
    pub goodness: f64,
    /// Estimated migration time, seconds; `None` when pre-copy would not converge at the
    /// VM's measured dirty rate (only mandatory moves are recommended for such VMs).
    pub migration_s: Option<f64>,
    /// Cost-benefit: cost of the move in goodness-seconds (0 for mandatory moves).
    pub cost: f64,
    /// Cost-benefit: benefit (goodness × horizon) in goodness-seconds.
    pub benefit: f64,
    /// How long the gain is expected to last, seconds: the configured horizon scaled by the
    /// stability of the VM's demand.
    pub horizon_s: f64,
}

/// One recommended migration.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Move {
    /// The VM.
    pub vm: VmId,
    /// Source host.
    pub from: HostId,
    /// Destination host.
    pub to: HostId,
    /// Belongs with the previous move (a must-affinity group evacuated together): approve and
    /// carry them out as one.
    pub with_previous: bool,
    /// Why.
    pub reason: Reason,
    /// 1 (mandatory) to 5 (smallest gain).
    pub priority: u8,
    /// What it should achieve.
    pub expected: Expected,
}

/// A VM that has to move (maintenance, rule) but cannot, and the constraints that stop it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Blocked {
    /// The VM.
    pub vm: VmId,
    /// Why it has to move.
    pub reason: Reason,
    /// For each host considered, the first constraint that ruled it out (for an affinity fix,
    /// only the host holding the group is considered).
    pub why: Rejections,
}

/// Normalized load of one host after the pass.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct HostLoad {
    /// CPU entitlement / capacity.
    pub cpu: f64,
    /// Memory entitlement / capacity.
    pub mem: f64,
    /// VMs on the host.
    pub vms: usize,
}

/// The result of a pass (nothing is applied: this is also the dry run).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PassPlan {
    /// Recommended moves, in order (mandatory first).
    pub moves: Vec<Move>,
    /// Moves grouped into waves (indices into `moves`) honouring concurrency limits.
    pub waves: Vec<Vec<usize>>,
    /// VMs that must move but cannot.
    pub blocked: Vec<Blocked>,
    /// Imbalance before the pass.
    pub imbalance_before: f64,
    /// Imbalance after the mandatory moves.
    pub imbalance_after_mandatory: f64,
    /// Imbalance after all moves.
    pub imbalance_after: f64,
    /// Target imbalance of the threshold level (`None` at level 1).
    pub target: Option<f64>,
    /// Per host, loads after the pass.
    pub hosts_after: Vec<HostLoad>,
}

/// What the balancer remembers between passes (hysteresis, demand stability). Create it with
/// [`History::new`]`(cfg.no_return_passes)`; [`Drs`](crate::Drs) keeps one for you. The default
/// (window 0) forgets every move at once.
#[derive(Debug, Clone, Default, PartialEq, serde::Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct History {
    /// Number of the pass being planned (incremented by the caller after applying a pass).
    pub pass: u64,
    /// Recent moves per VM, oldest first: (pass, host it left). Entries older than
    /// the no-return window are dropped by [`History::record`].
    pub last: std::collections::BTreeMap<VmId, Vec<(u64, HostId)>>,
    /// How many passes an entry is kept (the config's `no_return_passes`).
    pub window: u64,
    /// Per-VM demand history: how long a gain is expected to last.
    #[serde(default)]
    pub demand: crate::stability::DemandTracker,
}

impl History {
    /// A history that keeps moves for `window` passes.
    pub fn new(window: u64) -> Self {
        History { window, ..History::default() }
    }

    /// Records one balancing move made in pass `pass`.
    pub fn note(&mut self, pass: u64, vm: VmId, from: HostId) {
        self.last.entry(vm).or_default().push((pass, from));
    }

    /// Records the moves of the pass just applied (mandatory ones too: load balancing does not
    /// undo them either) and advances the pass number, forgetting expired entries.
    pub fn record(&mut self, moves: &[Move]) {
        for m in moves {
            self.note(self.pass, m.vm, m.from);
        }
        self.pass += 1;
        let (pass, window) = (self.pass, self.window);
        self.last.retain(|_, v| {
            v.retain(|&(p, _)| p + window > pass);
            !v.is_empty()
        });
    }

    /// Pass of the VM's most recent recorded balancing move.
    pub fn last_pass(&self, vm: VmId) -> Option<u64> {
        self.last.get(&vm).and_then(|v| v.last()).map(|x| x.0)
    }

    /// Did `vm` leave `host` within the last `passes` passes?
    pub fn left_recently(&self, vm: VmId, host: HostId, passes: u64) -> bool {
        self.last.get(&vm).is_some_and(|v| v.iter().any(|&(p, from)| from == host && p + passes > self.pass))
    }
}

/// Evacuations of at most this many VMs fall back to an exact search when the greedy order
/// leaves VMs behind.
pub const EXACT_EVACUATION_VMS: usize = 12;
/// Node budget of that exact search.
pub const EXACT_EVACUATION_NODES: usize = 200_000;

/// Plans one pass: mandatory moves, then load balancing. Pure: the same inputs give the same
/// plan; nothing is applied (a dry run). The cluster is validated first.
pub fn plan_pass(
    cluster: &Cluster,
    cfg: &BalanceConfig,
    history: &History,
) -> Result<PassPlan, crate::model::ModelError> {
    cluster.validate()?;
    let mut p = Planner::new(cluster, cfg);
    p.use_stability(&history.demand);
    let before = p.ledger.imbalance();
    p.evacuate_maintenance();
    p.fix_rules(true);
    p.fix_rules(false);
    let after_mandatory = p.ledger.imbalance();
    p.balance(history);
    Ok(p.finish(before, after_mandatory))
}

/// Applies a plan's moves to the cluster model (what a fully automated pass does once the
/// migrations succeeded).
pub fn apply_moves(cluster: &mut Cluster, moves: &[Move]) {
    for m in moves {
        cluster.vms[m.vm.idx()].host = Some(m.to);
    }
}

/// Checks a single move against the current cluster: the VM is on `from`, and moving it to `to`
/// keeps capacity, reservations and must-rules (counting group members wherever they are).
/// Returns the failed constraint.
pub fn check_move(cluster: &Cluster, vm: VmId, from: HostId, to: HostId) -> Result<(), Stale> {
    let Some(spec) = cluster.vms.get(vm.idx()) else {
        return Err(Stale::Gone);
    };
    if spec.host != Some(from) {
        return Err(Stale::Moved { now: spec.host, expected: from });
    }
    if to.idx() >= cluster.hosts.len() {
        return Err(Stale::Gone);
    }
    let ent = entitlement::compute(cluster);
    let ledger = Ledger::new(cluster, &ent);
    let rules = RuleIndex::new(cluster);
    ledger.fits(vm, ledger.load[vm.idx()], to).map_err(Stale::Host)?;
    // Strict: members of an affinity group on hosts being evacuated still count (a lone
    // member must not leave them behind).
    match rules.first_broken(cluster, vm, to, &ledger.where_is, &[], false) {
        Some(r) => Err(Stale::Rule(cluster.rules[r].name.clone())),
        None => Ok(()),
    }
}

/// Checks a group of moves carried out together (a must-affinity group): every VM is on its
/// source, and with all of them moved, every destination keeps capacity and reservations and
/// every moved VM keeps its must-rules.
pub fn check_group(cluster: &Cluster, moves: &[Move]) -> Result<(), Stale> {
    let ent = entitlement::compute(cluster);
    let mut ledger = Ledger::new(cluster, &ent);
    let rules = RuleIndex::new(cluster);
    for m in moves {
        let Some(spec) = cluster.vms.get(m.vm.idx()) else {
            return Err(Stale::Gone);
        };
        if spec.host != Some(m.from) {
            return Err(Stale::Moved { now: spec.host, expected: m.from });
        }
        if m.to.idx() >= cluster.hosts.len() {
            return Err(Stale::Gone);
        }
        if !ledger.on[m.to.idx()] {
            return Err(Stale::Host(crate::ledger::HostReject::NotOn));
        }
    }
    for m in moves {
        ledger.apply(m.vm, m.to);
    }
    for m in moves {
        let t = m.to.idx();
        let (r, l, c) = (ledger.host_res[t], ledger.host_load[t], ledger.cap[t]);
        use crate::ledger::HostReject as R;
        let bad = [
            (r.cpu_mhz > c.cpu_mhz, R::CpuReservation),
            (r.mem_mib > c.mem_mib, R::MemReservation),
            (l.cpu_mhz > c.cpu_mhz, R::CpuCapacity),
            (l.mem_mib > c.mem_mib, R::MemCapacity),
        ];
        if let Some((_, why)) = bad.iter().find(|b| b.0) {
            return Err(Stale::Host(*why));
        }
        if let Some(ri) = rules.first_broken(cluster, m.vm, m.to, &ledger.where_is, &[], false) {
            return Err(Stale::Rule(cluster.rules[ri].name.clone()));
        }
    }
    Ok(())
}

/// Does moving `vm` to `to` still fix must-rule `rule` (the VM is among the rule's movers and,
/// for affinity, `to` holds the group)? A fix may "break" the rule it fixes while the group is
/// half moved; this tells such a move from one the cluster has made stale.
pub fn fix_still_needed(cluster: &Cluster, rule: usize, vm: VmId, to: HostId) -> bool {
    if rule >= cluster.rules.len() {
        return false;
    }
    let where_is: Vec<Option<HostId>> = cluster.vms.iter().map(|v| v.host).collect();
    let idx = RuleIndex::new(cluster);
    if !crate::rules::movers(cluster, &idx, rule, &where_is).contains(&vm) {
        return false;
    }
    match &cluster.rules[rule].kind {
        crate::rules::RuleKind::VmAffinity { vms } => {
            crate::rules::affinity_target(vms, &where_is) == Some(to)
        }
        _ => true,
    }
}

/// Why a previously planned move no longer holds.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Stale {
    /// The VM or host no longer exists.
    #[error("the VM or host no longer exists")]
    Gone,
    /// The VM is not on the expected source any more.
    #[error("the VM is now on {now:?}, not on {expected}")]
    Moved {
        /// Where it is now.
        now: Option<HostId>,
        /// Where the recommendation expected it.
        expected: HostId,
    },
    /// The destination no longer passes a host constraint.
    #[error("destination: {0}")]
    Host(crate::ledger::HostReject),
    /// The move would now break a must-rule.
    #[error("it would break must-rule '{0}'")]
    Rule(String),
}
