//! Greedy load balancing: the best (VM, destination) pair per step, with cost-benefit and
//! hysteresis.

use super::{History, Planner, Reason};
use crate::config::{min_goodness, target_imbalance};
use crate::model::{HostId, VmId};

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
                        if good * self.horizon[v as usize] <= cost {
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
}
