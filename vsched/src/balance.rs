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

use crate::config::{BalanceConfig, min_goodness, priority_of, target_imbalance};
use crate::entitlement;
use crate::ledger::{Constraint, Ledger};
use crate::model::{Cluster, HostId, HostState, VmId};
use crate::placement::{Rejections, rejections};
use crate::rules::{self, RuleIndex, RuleKind};
use crate::waves::{Hop, plan_waves};

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

/// What the balancer remembers between passes (hysteresis).
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
}

impl History {
    /// A history that keeps moves for `window` passes.
    pub fn new(window: u64) -> Self {
        History {
            window,
            ..History::default()
        }
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
        self.last.get(&vm).is_some_and(|v| {
            v.iter()
                .any(|&(p, from)| from == host && p + passes > self.pass)
        })
    }
}

/// Evacuations of at most this many VMs fall back to an exact search when the greedy order
/// leaves VMs behind.
pub const EXACT_EVACUATION_VMS: usize = 12;
/// Node budget of that exact search.
pub const EXACT_EVACUATION_NODES: usize = 200_000;

/// Working state of one pass.
pub(crate) struct Planner<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) cfg: &'a BalanceConfig,
    pub(crate) ledger: Ledger,
    pub(crate) rules: RuleIndex,
    pub(crate) moved: Vec<bool>,
    pub(crate) moves: Vec<Move>,
    pub(crate) blocked: Vec<Blocked>,
}

impl<'a> Planner<'a> {
    pub(crate) fn new(cluster: &'a Cluster, cfg: &'a BalanceConfig) -> Self {
        let ent = entitlement::compute(cluster);
        Planner {
            cluster,
            cfg,
            ledger: Ledger::new(cluster, &ent),
            rules: RuleIndex::new(cluster),
            moved: vec![false; cluster.vms.len()],
            moves: Vec::new(),
            blocked: Vec::new(),
        }
    }

    /// Best destination for a mandatory move of `vm`: passes capacity, admission and every
    /// must-rule (except `exempt`), prefers hosts keeping should-rules (all of them when
    /// `strict_should`), then the smallest increase of squared deviations.
    fn best_dest(&self, vm: VmId, exempt: Option<usize>, strict_should: bool) -> Option<HostId> {
        let mut best: Option<(bool, f64, HostId)> = None;
        let (cl, l, r) = (self.cluster, &self.ledger, &self.rules);
        let mo = l.moments();
        for h in 0..cl.hosts.len() {
            let hid = HostId(h as u32);
            if l.fits(vm, l.load[vm.idx()], hid).is_err() {
                continue;
            }
            let mut breaks_should = false;
            let mut ok = true;
            for &ri in r.rules_of(vm) {
                let ri = ri as usize;
                if Some(ri) == exempt || r.allows(cl, ri, vm, hid, &l.where_is, &l.on) {
                    continue;
                }
                if cl.rules[ri].is_must() || strict_should {
                    ok = false;
                    break;
                }
                breaks_should = true;
            }
            if !ok {
                continue;
            }
            let key = (breaks_should, -mo.goodness(l.move_delta(vm, hid)), hid);
            if best.is_none_or(|b| {
                (key.0, key.1).partial_cmp(&(b.0, b.1)) == Some(std::cmp::Ordering::Less)
            }) {
                best = Some(key);
            }
        }
        best.map(|b| b.2)
    }

    fn goodness(&self, vm: VmId, to: HostId) -> f64 {
        self.ledger
            .moments()
            .goodness(self.ledger.move_delta(vm, to))
    }

    fn push_move(&mut self, vm: VmId, to: HostId, reason: Reason, goodness: f64, cost: f64) {
        let from = self.ledger.where_is[vm.idx()].expect("moved VM is placed");
        let before = self.ledger.imbalance();
        self.ledger.apply(vm, to);
        let after = self.ledger.imbalance();
        self.moved[vm.idx()] = true;
        let mandatory = reason.is_mandatory();
        self.moves.push(Move {
            vm,
            from,
            to,
            priority: if mandatory { 1 } else { priority_of(goodness) },
            reason,
            expected: Expected {
                imbalance_before: before,
                imbalance_after: after,
                goodness,
                migration_s: self.cfg.migration_s(&self.cluster.vms[vm.idx()]),
                cost,
                benefit: goodness * self.cfg.benefit_horizon_s,
            },
        });
    }

    fn block(&mut self, vm: VmId, reason: Reason) {
        let should = matches!(reason, Reason::ShouldRule { .. });
        let why = rejections(
            self.cluster,
            &self.rules,
            &self.ledger,
            vm,
            self.ledger.load[vm.idx()],
            should,
        );
        self.blocked.push(Blocked { vm, reason, why });
    }

    /// Records that `vm` cannot join its affinity group on `target`, and why.
    fn block_affinity(&mut self, vm: VmId, reason: Reason, target: HostId, rule: usize) {
        let l = &self.ledger;
        let mut why = Rejections {
            hosts: 1,
            ..Rejections::default()
        };
        match l.fits(vm, l.load[vm.idx()], target) {
            Err(r) => why.by_host.push((r, 1)),
            Ok(()) => {
                let broken = self
                    .rules
                    .rules_of(vm)
                    .iter()
                    .map(|&o| o as usize)
                    .find(|&o| {
                        o != rule
                            && self.cluster.rules[o].is_must()
                            && !self
                                .rules
                                .allows(self.cluster, o, vm, target, &l.where_is, &l.on)
                    });
                if let Some(o) = broken {
                    why.by_rule.push((self.cluster.rules[o].name.clone(), 1));
                }
            }
        }
        self.blocked.push(Blocked { vm, reason, why });
    }

    /// Moves every VM off `host` (largest memory first, each to the best host) or records why
    /// it cannot. When the greedy order leaves VMs behind and at most [`EXACT_EVACUATION_VMS`]
    /// VMs are involved, an exact search (bounded backtracking) looks for a complete evacuation
    /// before giving up.
    pub(crate) fn evacuate(&mut self, host: HostId, reason: Reason) {
        let mut vms: Vec<u32> = self.ledger.host_vms[host.idx()].clone();
        vms.sort_by_key(|&v| (std::cmp::Reverse(self.ledger.load[v as usize].mem_mib), v));
        let (m0, b0) = (self.moves.len(), self.blocked.len());
        let mut handled: Vec<u32> = Vec::new();
        for &v in &vms {
            if handled.contains(&v) {
                continue;
            }
            let vm = VmId(v);
            let group = self.affinity_group_on(vm, host);
            if group.len() > 1 {
                handled.extend(group.iter().map(|g| g.0));
                self.evacuate_group(&group, host, &reason);
                continue;
            }
            match self.best_dest(vm, None, false) {
                Some(to) => {
                    let g = self.goodness(vm, to);
                    self.push_move(vm, to, reason.clone(), g, 0.0);
                }
                None => self.block(vm, reason.clone()),
            }
        }
        if self.blocked.len() == b0 || vms.len() > EXACT_EVACUATION_VMS {
            return;
        }
        // Undo the greedy attempt and search exhaustively.
        let greedy: Vec<(VmId, HostId)> = self.moves[m0..].iter().map(|m| (m.vm, m.to)).collect();
        for m in self.moves[m0..].iter().rev() {
            self.ledger.apply(m.vm, m.from);
            self.moved[m.vm.idx()] = false;
        }
        let saved_moves = self.moves.split_off(m0);
        let saved_blocked = self.blocked.split_off(b0);
        let order: Vec<VmId> = vms.iter().map(|&v| VmId(v)).collect();
        let mut found = Vec::new();
        let mut budget = EXACT_EVACUATION_NODES;
        if self.search(&order, host, &mut found, &mut budget) {
            for &(vm, _) in &found {
                self.ledger.apply(vm, host);
            }
            for (vm, to) in found {
                let g = self.goodness(vm, to);
                self.push_move(vm, to, reason.clone(), g, 0.0);
            }
        } else {
            for (vm, to) in greedy {
                self.ledger.apply(vm, to);
                self.moved[vm.idx()] = true;
            }
            self.moves.extend(saved_moves);
            self.blocked.extend(saved_blocked);
        }
    }

    /// `vm` and the members of its must-affinity rules that are also on `host`, by id.
    fn affinity_group_on(&self, vm: VmId, host: HostId) -> Vec<VmId> {
        let mut g = vec![vm];
        for &ri in self.rules.rules_of(vm) {
            let r = &self.cluster.rules[ri as usize];
            if let (true, RuleKind::VmAffinity { vms }) = (r.is_must(), &r.kind) {
                for &o in vms {
                    if self.ledger.where_is[o.idx()] == Some(host) && !g.contains(&o) {
                        g.push(o);
                    }
                }
            }
        }
        g.sort_unstable();
        g
    }

    /// Moves a must-affinity group off `host` together, to the best host that takes all of
    /// its members, or blocks them all.
    fn evacuate_group(&mut self, group: &[VmId], host: HostId, reason: &Reason) {
        let mo = self.ledger.moments();
        let first = group[0];
        let mut cands: Vec<(f64, HostId)> = (0..self.cluster.hosts.len() as u32)
            .map(HostId)
            .filter(|&h| {
                self.ledger
                    .check_move(self.cluster, &self.rules, first, h, false)
                    .is_ok()
            })
            .map(|h| (-mo.goodness(self.ledger.move_delta(first, h)), h))
            .collect();
        cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (_, h) in cands {
            let mut applied = 0;
            for &vm in group {
                if self
                    .ledger
                    .check_move(self.cluster, &self.rules, vm, h, false)
                    .is_err()
                {
                    break;
                }
                self.ledger.apply(vm, h);
                applied += 1;
            }
            for &vm in &group[..applied] {
                self.ledger.apply(vm, host);
            }
            if applied == group.len() {
                for &vm in group {
                    let g = self.goodness(vm, h);
                    self.push_move(vm, h, reason.clone(), g, 0.0);
                }
                return;
            }
        }
        for &vm in group {
            self.block(vm, reason.clone());
        }
    }

    /// Depth-first search for destinations of `order` (all on `src`); leaves them applied in the
    /// ledger and listed in `found` on success.
    fn search(
        &mut self,
        order: &[VmId],
        src: HostId,
        found: &mut Vec<(VmId, HostId)>,
        budget: &mut usize,
    ) -> bool {
        let Some((&vm, rest)) = order.split_first() else {
            return true;
        };
        let mut cands: Vec<(f64, HostId)> = Vec::new();
        let mo = self.ledger.moments();
        for h in 0..self.cluster.hosts.len() {
            let hid = HostId(h as u32);
            if self
                .ledger
                .check_move(self.cluster, &self.rules, vm, hid, false)
                .is_ok()
            {
                cands.push((-mo.goodness(self.ledger.move_delta(vm, hid)), hid));
            }
        }
        cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        for (_, h) in cands {
            if *budget == 0 {
                return false;
            }
            *budget -= 1;
            self.ledger.apply(vm, h);
            found.push((vm, h));
            if self.search(rest, src, found, budget) {
                return true;
            }
            found.pop();
            self.ledger.apply(vm, src);
        }
        false
    }

    pub(crate) fn evacuate_maintenance(&mut self) {
        for (h, host) in self.cluster.hosts.iter().enumerate() {
            if host.state == HostState::Maintenance {
                let hid = HostId(h as u32);
                self.evacuate(hid, Reason::Maintenance { host: hid });
            }
        }
    }

    pub(crate) fn fix_rules(&mut self, must: bool) {
        for ri in 0..self.cluster.rules.len() {
            let rule = &self.cluster.rules[ri];
            if rule.is_must() != must {
                continue;
            }
            let reason = if must {
                Reason::MustRule {
                    rule: ri,
                    name: rule.name.clone(),
                }
            } else {
                Reason::ShouldRule {
                    rule: ri,
                    name: rule.name.clone(),
                }
            };
            let movers = rules::movers(self.cluster, &self.rules, ri, &self.ledger.where_is);
            let target = match &rule.kind {
                RuleKind::VmAffinity { vms } => rules::affinity_target(vms, &self.ledger.where_is),
                _ => None,
            };
            for vm in movers {
                let dest = match target {
                    Some(t) => {
                        let ok = self.ledger.fits(vm, self.ledger.load[vm.idx()], t).is_ok()
                            && self.rules.rules_of(vm).iter().all(|&o| {
                                let o = o as usize;
                                o == ri
                                    || !self.cluster.rules[o].is_must()
                                    || self.rules.allows(
                                        self.cluster,
                                        o,
                                        vm,
                                        t,
                                        &self.ledger.where_is,
                                        &self.ledger.on,
                                    )
                            });
                        ok.then_some(t)
                    }
                    None => self.best_dest(vm, None, !must),
                };
                match (dest, target) {
                    (Some(to), _) => {
                        let g = self.goodness(vm, to);
                        self.push_move(vm, to, reason.clone(), g, 0.0);
                    }
                    (None, Some(t)) => self.block_affinity(vm, reason.clone(), t, ri),
                    (None, None) => self.block(vm, reason.clone()),
                }
            }
        }
    }

    /// Greedy load balancing; returns the number of moves made.
    pub(crate) fn balance(&mut self, history: &History) -> usize {
        let cfg = self.cfg;
        let Some(target) = target_imbalance(cfg.threshold) else {
            return 0;
        };
        let min_good = min_goodness(cfg.threshold);
        let mut sigma = self.ledger.imbalance();
        if sigma <= target {
            return 0;
        }
        let stop = target * cfg.stop_fraction;
        let cl = self.cluster;
        // Per-VM eligibility and migration time, computed once.
        let mig: Vec<Option<f64>> = cl.vms.iter().map(|v| cfg.migration_s(v)).collect();
        let mut eligible: Vec<bool> = (0..cl.vms.len())
            .map(|v| {
                let vm = VmId(v as u32);
                !self.moved[v]
                    && mig[v].is_some()
                    && self.ledger.where_is[v].is_some_and(|h| self.ledger.on[h.idx()])
                    && !self.rules.in_must_affinity(cl, vm)
                    && history
                        .last_pass(vm)
                        .is_none_or(|p| p + cfg.hold_passes <= history.pass)
            })
            .collect();
        let on_hosts: Vec<u32> = (0..cl.hosts.len() as u32)
            .filter(|&h| self.ledger.on[h as usize])
            .collect();
        let k = cfg.candidate_hosts;
        let mut keyed: Vec<(f64, u32)> = Vec::with_capacity(on_hosts.len());
        let mut made = 0;
        while made < cfg.max_moves_per_pass && sigma > stop {
            let m = self.ledger.moments();
            let (mc, mm) = (m.s1c / m.n, m.s1m / m.n);
            keyed.clear();
            keyed.extend(on_hosts.iter().map(|&h| {
                let (c, me) = self.ledger.norm(h as usize);
                ((c - mc) + (me - mm), h)
            }));
            let cmp = |a: &(f64, u32), b: &(f64, u32)| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1));
            let (sources, dests): (Vec<u32>, Vec<u32>) = if keyed.len() <= 2 * k {
                let all: Vec<u32> = keyed.iter().map(|x| x.1).collect();
                (all.clone(), all)
            } else {
                let n = keyed.len();
                keyed.select_nth_unstable_by(n - k, cmp);
                let src = keyed[n - k..].iter().map(|x| x.1).collect();
                keyed[..n - k].select_nth_unstable_by(k - 1, cmp);
                let dst = keyed[..k].iter().map(|x| x.1).collect();
                (src, dst)
            };
            // (goodness, cost, vm, dest), best = highest goodness, then lowest ids.
            let mut best: Option<(f64, f64, u32, u32)> = None;
            for &s in &sources {
                for &v in &self.ledger.host_vms[s as usize] {
                    if !eligible[v as usize] {
                        continue;
                    }
                    let vm = VmId(v);
                    let t = mig[v as usize].unwrap_or(f64::INFINITY);
                    for &d in &dests {
                        if d == s {
                            continue;
                        }
                        let to = HostId(d);
                        let good = m.goodness(self.ledger.move_delta(vm, to));
                        if good < min_good {
                            continue;
                        }
                        if best.is_some_and(|b| good < b.0 || (good == b.0 && (v, d) > (b.2, b.3)))
                        {
                            continue;
                        }
                        if self
                            .ledger
                            .check_move(cl, &self.rules, vm, to, true)
                            .is_err()
                        {
                            continue;
                        }
                        if history.left_recently(vm, to, cfg.no_return_passes) {
                            continue;
                        }
                        let dual = -m.goodness(self.ledger.dual_delta(vm, to));
                        let cost = t * (dual.max(0.0) + cfg.cost_rate);
                        if good * cfg.benefit_horizon_s <= cost {
                            continue;
                        }
                        best = Some((good, cost, v, d));
                    }
                }
            }
            let Some((good, cost, v, d)) = best else {
                break;
            };
            self.push_move(VmId(v), HostId(d), Reason::Balance, good, cost);
            eligible[v as usize] = false;
            sigma = self.ledger.imbalance();
            made += 1;
        }
        made
    }

    pub(crate) fn finish(self, before: f64, after_mandatory: f64) -> PassPlan {
        let hops: Vec<Hop> = self
            .moves
            .iter()
            .map(|m| Hop {
                vm: m.vm,
                from: m.from,
                to: m.to,
            })
            .collect();
        let waves = plan_waves(
            &hops,
            self.cfg.max_concurrent_per_host,
            self.cfg.max_concurrent_per_cluster,
        );
        let hosts_after = (0..self.cluster.hosts.len())
            .map(|h| {
                let (cpu, mem) = self.ledger.norm(h);
                HostLoad {
                    cpu,
                    mem,
                    vms: self.ledger.host_vms[h].len(),
                }
            })
            .collect();
        PassPlan {
            imbalance_after: self.ledger.imbalance(),
            moves: self.moves,
            waves,
            blocked: self.blocked,
            imbalance_before: before,
            imbalance_after_mandatory: after_mandatory,
            target: target_imbalance(self.cfg.threshold),
            hosts_after,
        }
    }
}

/// Plans one pass over a valid cluster: mandatory moves, then load balancing. Pure: the same
/// inputs give the same plan; nothing is applied (a dry run).
pub fn plan_pass(cluster: &Cluster, cfg: &BalanceConfig, history: &History) -> PassPlan {
    let mut p = Planner::new(cluster, cfg);
    let before = p.ledger.imbalance();
    p.evacuate_maintenance();
    p.fix_rules(true);
    p.fix_rules(false);
    let after_mandatory = p.ledger.imbalance();
    p.balance(history);
    p.finish(before, after_mandatory)
}

/// Applies a plan's moves to the cluster model (what a fully automated pass does once the
/// migrations succeeded).
pub fn apply_moves(cluster: &mut Cluster, moves: &[Move]) {
    for m in moves {
        cluster.vms[m.vm.idx()].host = Some(m.to);
    }
}

/// Checks a single move against the current cluster: the VM is on `from`, and moving it to `to`
/// keeps capacity, reservations and must-rules. Returns the failed constraint.
pub fn check_move(cluster: &Cluster, vm: VmId, from: HostId, to: HostId) -> Result<(), Stale> {
    let Some(spec) = cluster.vms.get(vm.idx()) else {
        return Err(Stale::Gone);
    };
    if spec.host != Some(from) {
        return Err(Stale::Moved {
            now: spec.host,
            expected: from,
        });
    }
    if to.idx() >= cluster.hosts.len() {
        return Err(Stale::Gone);
    }
    let ent = entitlement::compute(cluster);
    let ledger = Ledger::new(cluster, &ent);
    let rules = RuleIndex::new(cluster);
    ledger
        .check_move(cluster, &rules, vm, to, false)
        .map_err(|c| match c {
            Constraint::Host(h) => Stale::Host(h),
            Constraint::Rule(r) => Stale::Rule(cluster.rules[r].name.clone()),
        })
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
