//! Greedy load balancing: the best (unit, destination) pair per step, with cost-benefit and
//! hysteresis. A unit is one VM, or a must-affinity group that sits on one host and moves as a
//! whole.

use super::{History, Planner, Reason};
use crate::config::{min_goodness, target_imbalance};
use crate::model::{HostId, Resources, VmId};
use crate::rules::RuleKind;

/// A must-affinity group that may move as one unit.
#[derive(Debug)]
struct Group {
    vms: Vec<VmId>,
    res: Resources,
    mig_s: f64,
}

impl Planner<'_> {
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
                    && history.last_pass(vm).is_none_or(|p| p + cfg.hold_passes <= history.pass)
            })
            .collect();
        let mut groups = self.movable_groups(history, &mig);
        let on_hosts: Vec<u32> = (0..cl.hosts.len() as u32).filter(|&h| self.ledger.on[h as usize]).collect();
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
            // (goodness, cost, vm, dest, group), best = highest goodness, then lowest ids.
            let mut best: Option<(f64, f64, u32, u32, Option<usize>)> = None;
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
                        if best.is_some_and(|b| good < b.0 || (good == b.0 && (v, d) > (b.2, b.3))) {
                            continue;
                        }
                        if self.ledger.check_move(cl, &self.rules, vm, to, true).is_err() {
                            continue;
                        }
                        if history.left_recently(vm, to, cfg.no_return_passes) {
                            continue;
                        }
                        let dual = -m.goodness(self.ledger.dual_delta(vm, to));
                        let cost = t * (dual.max(0.0) + cfg.cost_rate);
                        if good * self.horizon[v as usize] <= cost {
                            continue;
                        }
                        best = Some((good, cost, v, d, None));
                    }
                }
            }
            for (gi, g) in groups.iter().enumerate() {
                let Some(s) = self.ledger.where_is[g.vms[0].idx()] else {
                    continue;
                };
                if !sources.contains(&s.0) {
                    continue;
                }
                let (load, _) = self.group_totals(&g.vms);
                let v = g.vms[0].0;
                for &d in &dests {
                    if d == s.0 {
                        continue;
                    }
                    let to = HostId(d);
                    let good = m.goodness(self.ledger.load_delta(load, Some(s), to));
                    if good < min_good
                        || best.is_some_and(|b| good < b.0 || (good == b.0 && (v, d) > (b.2, b.3)))
                    {
                        continue;
                    }
                    if self.ledger.fits_load(load, g.res, to).is_err()
                        || g.vms.iter().any(|&vm| history.left_recently(vm, to, cfg.no_return_passes))
                        || self.group_broken_rule(&g.vms, s, to, true).is_some()
                    {
                        continue;
                    }
                    let dual = -m.goodness(self.ledger.dual_load_delta(load, to));
                    let cost = g.mig_s * (dual.max(0.0) + cfg.cost_rate);
                    let horizon = g.vms.iter().map(|v| self.horizon[v.idx()]).fold(f64::INFINITY, f64::min);
                    if good * horizon <= cost {
                        continue;
                    }
                    best = Some((good, cost, v, d, Some(gi)));
                }
            }
            let Some((good, cost, v, d, group)) = best else {
                break;
            };
            match group {
                None => {
                    self.push_move(VmId(v), HostId(d), Reason::Balance, good, cost);
                    eligible[v as usize] = false;
                }
                Some(gi) => {
                    let g = groups.swap_remove(gi);
                    let first = self.moves.len();
                    for (i, &vm) in g.vms.iter().enumerate() {
                        let (gd, c) = if i == 0 { (good, cost) } else { (0.0, 0.0) };
                        self.push_move(vm, HostId(d), Reason::Balance, gd, c);
                        eligible[vm.idx()] = false;
                    }
                    let priority = self.moves[first].priority;
                    for m in &mut self.moves[first + 1..] {
                        m.with_previous = true;
                        m.priority = priority;
                    }
                }
            }
            sigma = self.ledger.imbalance();
            made += 1;
        }
        made
    }

    /// Must-affinity groups whose members all sit on one powered-on host and could each move
    /// (not moved this pass, converging, not held by hysteresis). VMs in more than one
    /// must-affinity rule are left alone.
    fn movable_groups(&self, history: &History, mig: &[Option<f64>]) -> Vec<Group> {
        let cl = self.cluster;
        let cfg = self.cfg;
        let mut out = Vec::new();
        for r in &cl.rules {
            let RuleKind::VmAffinity { vms } = &r.kind else {
                continue;
            };
            if !r.is_must() {
                continue;
            }
            let Some(h) = self.ledger.where_is[vms[0].idx()] else {
                continue;
            };
            let ok = self.ledger.on[h.idx()]
                && vms.iter().all(|&vm| {
                    let v = vm.idx();
                    self.ledger.where_is[v] == Some(h)
                        && !self.moved[v]
                        && mig[v].is_some()
                        && history.last_pass(vm).is_none_or(|p| p + cfg.hold_passes <= history.pass)
                        && self.rules.rules_of(vm).iter().all(|&o| {
                            let o = &cl.rules[o as usize];
                            o.name == r.name
                                || !(o.is_must() && matches!(o.kind, RuleKind::VmAffinity { .. }))
                        })
                });
            if !ok {
                continue;
            }
            let mut sorted = vms.clone();
            sorted.sort_unstable();
            out.push(Group {
                res: sorted.iter().fold(Resources::default(), |a, v| {
                    let r = self.ledger.res[v.idx()];
                    Resources::new(a.cpu_mhz + r.cpu_mhz, a.mem_mib + r.mem_mib)
                }),
                mig_s: sorted.iter().map(|v| mig[v.idx()].unwrap_or(0.0)).sum(),
                vms: sorted,
            });
        }
        out
    }
}
