//! The pass's working state and its mandatory moves: maintenance evacuation and rule fixes.

use super::{
    Blocked, EXACT_EVACUATION_NODES, EXACT_EVACUATION_VMS, Expected, HostLoad, Move, PassPlan, Reason,
};
use crate::config::{BalanceConfig, priority_of, target_imbalance};
use crate::entitlement;
use crate::ledger::HostReject;
use crate::ledger::Ledger;
use crate::model::{Cluster, HostId, HostState, Resources, VmId};
use crate::placement::{Rejections, bump, rejections};
use crate::rules::{self, RuleIndex, RuleKind};
use crate::waves::{Hop, plan_waves};

/// Working state of one pass.
pub(crate) struct Planner<'a> {
    pub(crate) cluster: &'a Cluster,
    pub(crate) cfg: &'a BalanceConfig,
    pub(crate) ledger: Ledger,
    pub(crate) rules: RuleIndex,
    pub(crate) moved: Vec<bool>,
    pub(crate) moves: Vec<Move>,
    pub(crate) blocked: Vec<Blocked>,
    /// Per VM, how long a gain is expected to last (seconds).
    pub(crate) horizon: Vec<f64>,
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
            horizon: vec![cfg.benefit_horizon_s; cluster.vms.len()],
        }
    }

    /// Scales each VM's benefit horizon by the stability of its demand.
    pub(crate) fn use_stability(&mut self, demand: &crate::stability::DemandTracker) {
        for (v, h) in self.horizon.iter_mut().enumerate() {
            *h = self.cfg.benefit_horizon_s * demand.stability(VmId(v as u32));
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
            if best.is_none_or(|b| (key.0, key.1).partial_cmp(&(b.0, b.1)) == Some(std::cmp::Ordering::Less))
            {
                best = Some(key);
            }
        }
        best.map(|b| b.2)
    }

    fn goodness(&self, vm: VmId, to: HostId) -> f64 {
        self.ledger.moments().goodness(self.ledger.move_delta(vm, to))
    }

    pub(super) fn push_move(&mut self, vm: VmId, to: HostId, reason: Reason, goodness: f64, cost: f64) {
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
            with_previous: false,
            priority: if mandatory { 1 } else { priority_of(goodness) },
            reason,
            expected: Expected {
                imbalance_before: before,
                imbalance_after: after,
                goodness,
                migration_s: self.cfg.migration_s(&self.cluster.vms[vm.idx()]),
                cost,
                benefit: goodness * self.horizon[vm.idx()],
                horizon_s: self.horizon[vm.idx()],
            },
        });
    }

    fn block(&mut self, vm: VmId, reason: Reason) {
        let should = matches!(reason, Reason::ShouldRule { .. });
        let why = rejections(self.cluster, &self.rules, &self.ledger, vm, self.ledger.load[vm.idx()], should);
        self.blocked.push(Blocked { vm, reason, why });
    }

    /// Records that `vm` cannot join its affinity group on `target`, and why.
    fn block_affinity(&mut self, vm: VmId, reason: Reason, target: HostId, rule: usize) {
        let l = &self.ledger;
        let mut why = Rejections { hosts: 1, ..Rejections::default() };
        match l.fits(vm, l.load[vm.idx()], target) {
            Err(r) => why.by_host.push((r, 1)),
            Ok(()) => {
                let broken = self.rules.rules_of(vm).iter().map(|&o| o as usize).find(|&o| {
                    o != rule
                        && self.cluster.rules[o].is_must()
                        && !self.rules.allows(self.cluster, o, vm, target, &l.where_is, &l.on)
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
            let group: Vec<VmId> = self
                .affinity_group_on(vm, host)
                .into_iter()
                .filter(|g| *g == vm || !handled.contains(&g.0))
                .collect();
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
            // Emit must-affinity groups together (every order of moves out of one host into
            // a feasible final state is feasible, so regrouping is safe).
            let mut emitted = vec![false; found.len()];
            for i in 0..found.len() {
                if emitted[i] {
                    continue;
                }
                let group = self.affinity_group_on(found[i].0, host);
                let mut first = true;
                for j in i..found.len() {
                    if !emitted[j] && (j == i || group.contains(&found[j].0)) {
                        emitted[j] = true;
                        let (vm, to) = found[j];
                        let g = self.goodness(vm, to);
                        self.push_move(vm, to, reason.clone(), g, 0.0);
                        if !first && let Some(m) = self.moves.last_mut() {
                            m.with_previous = true;
                        }
                        first = false;
                    }
                }
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

    /// Moves a must-affinity group off `host` together, to the best host that takes the whole
    /// group (combined capacity and reservations, every member's must-rules), or blocks every
    /// member with the per-host reasons for the group.
    fn evacuate_group(&mut self, group: &[VmId], host: HostId, reason: &Reason) {
        let mo = self.ledger.moments();
        let (load, res) = self.group_totals(group);
        let mut cands: Vec<(f64, HostId)> = Vec::new();
        let mut why = Rejections { hosts: self.cluster.hosts.len(), ..Rejections::default() };
        for h in (0..self.cluster.hosts.len() as u32).map(HostId) {
            let fit = if h == host { Err(HostReject::SameHost) } else { self.ledger.fits_load(load, res, h) };
            if let Err(r) = fit {
                bump(&mut why.by_host, r);
                continue;
            }
            if let Some(ri) = self.group_broken_rule(group, host, h, false) {
                bump(&mut why.by_rule, self.cluster.rules[ri].name.clone());
                continue;
            }
            cands.push((-mo.goodness(self.ledger.load_delta(load, Some(host), h)), h));
        }
        cands.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        if let Some(&(_, h)) = cands.first() {
            for (i, &vm) in group.iter().enumerate() {
                let g = self.goodness(vm, h);
                self.push_move(vm, h, reason.clone(), g, 0.0);
                if i > 0
                    && let Some(m) = self.moves.last_mut()
                {
                    m.with_previous = true;
                }
            }
            return;
        }
        why.by_host.sort();
        why.by_rule.sort();
        for &vm in group {
            self.blocked.push(Blocked { vm, reason: reason.clone(), why: why.clone() });
        }
    }

    /// Combined load and reservation of a group.
    pub(super) fn group_totals(&self, group: &[VmId]) -> (Resources, Resources) {
        group.iter().fold((Resources::default(), Resources::default()), |(l, r), v| {
            let (a, b) = (self.ledger.load[v.idx()], self.ledger.res[v.idx()]);
            (
                Resources::new(l.cpu_mhz + a.cpu_mhz, l.mem_mib + a.mem_mib),
                Resources::new(r.cpu_mhz + b.cpu_mhz, r.mem_mib + b.mem_mib),
            )
        })
    }

    /// With every member of `group` moved from `from` to `to`, the first rule (must, or also
    /// should with `include_should`) a member would break. Applies and undoes the moves.
    pub(super) fn group_broken_rule(
        &mut self,
        group: &[VmId],
        from: HostId,
        to: HostId,
        include_should: bool,
    ) -> Option<usize> {
        for &vm in group {
            self.ledger.apply(vm, to);
        }
        let broken = group.iter().find_map(|&vm| {
            self.rules.first_broken(
                self.cluster,
                vm,
                to,
                &self.ledger.where_is,
                &self.ledger.on,
                include_should,
            )
        });
        for &vm in group {
            self.ledger.apply(vm, from);
        }
        broken
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
            if self.ledger.check_move(self.cluster, &self.rules, vm, hid, false).is_ok() {
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
                Reason::MustRule { rule: ri, name: rule.name.clone() }
            } else {
                Reason::ShouldRule { rule: ri, name: rule.name.clone() }
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

    /// Packs the pass's result: waves, loads after, imbalance figures.
    pub(crate) fn finish(self, before: f64, after_mandatory: f64) -> PassPlan {
        let hops: Vec<Hop> = self.moves.iter().map(|m| Hop { vm: m.vm, from: m.from, to: m.to }).collect();
        let waves = plan_waves(&hops, self.cfg.max_concurrent_per_host, self.cfg.max_concurrent_per_cluster);
        let hosts_after = (0..self.cluster.hosts.len())
            .map(|h| {
                let (cpu, mem) = self.ledger.norm(h);
                HostLoad { cpu, mem, vms: self.ledger.host_vms[h].len() }
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
