//! DRS pass invariants over random clusters (proptest prints the parameters, seed included, on
//! failure). `PROPTEST_CASES=N` runs a long mode.

mod common;

use common::{Params, arb_params, build, cases, where_is};
use proptest::prelude::*;
use vsched::balance::{self, Reason, Stale, apply_moves, check_move, plan_pass};
use vsched::drs::RecordingMigrator;
use vsched::ledger::{self, Ledger};
use vsched::maintenance::enter_maintenance;
use vsched::model::{Cluster, HostId, Resources, VmId};
use vsched::rules::{RuleIndex, must_violations};
use vsched::{Automation, BalanceConfig, Drs, DrsConfig, History, entitlement};

fn cfg(threshold: u8) -> BalanceConfig {
    BalanceConfig { threshold, ..BalanceConfig::default() }
}

/// Applies a plan move by move (a must-affinity group as a whole), checking each against the
/// cluster as it then stands.
fn apply_checked(c: &mut Cluster, plan: &vsched::PassPlan) -> Result<(), String> {
    let moves = &plan.moves;
    let mut i = 0;
    while i < moves.len() {
        let mut j = i + 1;
        while j < moves.len() && moves[j].with_previous {
            j += 1;
        }
        if j - i > 1 {
            balance::check_group(c, &moves[i..j])
                .map_err(|e| format!("group {:?} breaks a constraint: {e}", &moves[i..j]))?;
        } else {
            let m = &moves[i];
            match check_move(c, m.vm, m.from, m.to) {
                Ok(()) => {}
                Err(Stale::Rule(name)) if matches!(&m.reason, Reason::MustRule { name: n, .. } if *n == name) =>
                    {}
                Err(e) => return Err(format!("move {i} {m:?} breaks a constraint: {e}")),
            }
        }
        for m in &moves[i..j] {
            c.vms[m.vm.idx()].host = Some(m.to);
        }
        i = j;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    /// No recommendation breaks a must-rule, capacity or a reservation; must-rule violations
    /// only go down, and to zero when nothing is blocked.
    #[test]
    fn pass_is_safe(p in arb_params(7, 40), level in 1u8..=5) {
        let c0 = build(&p);
        let plan = plan_pass(&c0, &cfg(level), &History::default()).unwrap();
        let mut c = c0.clone();
        apply_checked(&mut c, &plan).map_err(TestCaseError::fail)?;
        let before = must_violations(&c0, &where_is(&c0));
        let after = must_violations(&c, &where_is(&c));
        prop_assert!(after <= before, "must violations {before} -> {after}");
        if plan.blocked.is_empty() {
            prop_assert_eq!(after, 0);
        }
        for b in &plan.blocked {
            prop_assert_eq!(b.why.by_host.iter().map(|x| x.1).sum::<usize>()
                + b.why.by_rule.iter().map(|x| x.1).sum::<usize>(), b.why.hosts,
                "every host is accounted for in {:?}", b);
        }
    }

    /// Load balancing never raises the imbalance, and the plan's figures match the cluster
    /// after applying it.
    #[test]
    fn balancing_never_raises_imbalance(p in arb_params(7, 40), level in 2u8..=5) {
        let c0 = build(&p);
        let plan = plan_pass(&c0, &cfg(level), &History::default()).unwrap();
        prop_assert!(plan.imbalance_after <= plan.imbalance_after_mandatory + 1e-12,
            "{} > {}", plan.imbalance_after, plan.imbalance_after_mandatory);
        if plan.moves.iter().all(|m| m.reason == Reason::Balance) {
            prop_assert!(plan.imbalance_after <= plan.imbalance_before + 1e-12);
        }
        // Each balancing unit (one VM, or a must-affinity group moving together) lowers the
        // imbalance and is worth its cost.
        let ms = &plan.moves;
        let mut i = 0;
        while i < ms.len() {
            let mut j = i + 1;
            while j < ms.len() && ms[j].with_previous {
                j += 1;
            }
            if ms[i].reason == Reason::Balance {
                prop_assert!(ms[j - 1].expected.imbalance_after < ms[i].expected.imbalance_before);
                prop_assert!(ms[i].expected.benefit > ms[i].expected.cost);
            }
            i = j;
        }
        let mut c = c0.clone();
        apply_moves(&mut c, &plan.moves);
        let measured = ledger::imbalance(&c);
        prop_assert!((measured - plan.imbalance_after).abs() < 1e-9,
            "plan says {}, cluster has {}", plan.imbalance_after, measured);
        prop_assert!(plan.moves.iter().filter(|m| m.reason == Reason::Balance && !m.with_previous).count()
            <= cfg(level).max_moves_per_pass);
    }

    /// Same input, same output (also through a JSON snapshot).
    #[test]
    fn pass_is_deterministic(p in arb_params(7, 40), level in 1u8..=5) {
        let c = build(&p);
        let a = plan_pass(&c, &cfg(level), &History::default()).unwrap();
        let b = plan_pass(&c, &cfg(level), &History::default()).unwrap();
        prop_assert_eq!(&a, &b);
        let c2 = Cluster::from_json(&c.to_json()).unwrap();
        prop_assert_eq!(&a, &plan_pass(&c2, &cfg(level), &History::default()).unwrap());
    }

    /// Waves respect the concurrency limits and keep every move after the moves it needs.
    #[test]
    fn waves_respect_limits(p in arb_params(7, 40), per_host in 1usize..4, per_cluster in 1usize..6) {
        let c = build(&p);
        let cfg = BalanceConfig {
            threshold: 5,
            max_concurrent_per_host: per_host,
            max_concurrent_per_cluster: per_cluster,
            ..BalanceConfig::default()
        };
        let plan = plan_pass(&c, &cfg, &History::default()).unwrap();
        let mut seen = vec![false; plan.moves.len()];
        let mut wave_of = vec![0; plan.moves.len()];
        for (w, wave) in plan.waves.iter().enumerate() {
            prop_assert!(wave.len() <= per_cluster);
            for &i in wave {
                prop_assert!(!seen[i]);
                seen[i] = true;
                wave_of[i] = w;
            }
            for h in 0..c.hosts.len() {
                let h = HostId(h as u32);
                let n = wave.iter().filter(|&&i| plan.moves[i].from == h || plan.moves[i].to == h).count();
                prop_assert!(n <= per_host);
            }
        }
        prop_assert!(seen.iter().all(|&s| s));
        for (i, m) in plan.moves.iter().enumerate() {
            for (j, e) in plan.moves[..i].iter().enumerate() {
                if e.vm == m.vm || e.from == m.to {
                    prop_assert!(wave_of[j] < wave_of[i]);
                }
            }
        }
    }

    /// Evacuation empties the host whenever an exhaustive search says capacity and must-rules
    /// allow it; otherwise it names, per blocked VM, the constraint ruling out each host.
    #[test]
    fn evacuation_empties_host_when_possible(p in arb_params(6, 24), h in 0usize..6) {
        let mut p: Params = p;
        p.maintenance = None;
        let mut c = build(&p);
        let host = HostId((h % c.hosts.len()) as u32);
        let on_host = c.vms_on(host);
        let mut probe = c.clone();
        probe.hosts[host.idx()].state = vsched::HostState::Maintenance;
        // Exhaustive search only where it is cheap (<= 6 VMs on the host).
        let feasible = (on_host.len() <= 6).then(|| exhaustive_evacuation(&probe, &on_host));
        let evac = enter_maintenance(&mut c, host, &BalanceConfig::default()).unwrap();
        match feasible {
            Some(true) => prop_assert!(evac.complete(), "feasible but blocked: {:?}", evac.blocked),
            Some(false) => prop_assert!(!evac.complete()),
            None => {}
        }
        for b in &evac.blocked {
            prop_assert_eq!(b.why.by_host.iter().map(|x| x.1).sum::<usize>()
                + b.why.by_rule.iter().map(|x| x.1).sum::<usize>(), b.why.hosts);
        }
        let mut after = c.clone();
        apply_checked(&mut after, &vsched::PassPlan {
            moves: evac.moves.clone(), waves: vec![], blocked: vec![], imbalance_before: 0.0,
            imbalance_after_mandatory: 0.0, imbalance_after: 0.0, target: None, hosts_after: vec![],
        }).map_err(TestCaseError::fail)?;
        prop_assert_eq!(after.vms_on(host).len(), evac.blocked.len());
    }

    /// Demand oscillating around the threshold never makes a VM move back to a host it left.
    #[test]
    fn oscillating_demand_does_not_flap(p in arb_params(6, 40), period in 1usize..4, frac in 0.1f64..0.5) {
        let mut p: Params = p;
        p.maintenance = None;
        p.scramble = 0;
        let mut c = build(&p);
        let mut drs = Drs::new(DrsConfig {
            automation: Automation::Full,
            balance: cfg(3),
            ..DrsConfig::default()
        }).unwrap();
        let mut rng = vsched::sim::SplitMix64::new(p.seed);
        let osc: Vec<usize> = (0..c.vms.len()).filter(|_| rng.f64() < frac).collect();
        let base: Vec<Resources> = c.vms.iter().map(|v| v.demand).collect();
        let mut m = RecordingMigrator::default();
        let mut trail: Vec<Vec<HostId>> = c.vms.iter().map(|v| v.host.into_iter().collect()).collect();
        for pass in 0..20 {
            let high = (pass / period) % 2 == 0;
            for &v in &osc {
                let s = c.vms[v].size;
                c.vms[v].demand = if high { s } else { base[v] };
            }
            let r = drs.pass(&mut c, &mut m).unwrap();
            for mv in &r.executed {
                let t = &mut trail[mv.vm.idx()];
                prop_assert!(!t.contains(&mv.to),
                    "pass {pass}: {} moves back to {} (trail {:?}) reason {:?} all {:?}", mv.vm, mv.to, t, mv.reason, r.executed);
                t.push(mv.to);
            }
        }
    }
}

/// Exhaustive search: can every VM in `vms` leave its host (capacity, reservations, must-rules)?
fn exhaustive_evacuation(c: &Cluster, vms: &[VmId]) -> bool {
    let ent = entitlement::compute(c);
    let mut l = Ledger::new(c, &ent);
    let rules = RuleIndex::new(c);
    fn go(c: &Cluster, l: &mut Ledger, r: &RuleIndex, vms: &[VmId]) -> bool {
        let Some((&vm, rest)) = vms.split_first() else {
            return true;
        };
        let src = l.where_is[vm.idx()].unwrap();
        for h in 0..c.hosts.len() {
            let h = HostId(h as u32);
            if l.check_move(c, r, vm, h, false).is_ok() {
                l.apply(vm, h);
                if go(c, l, r, rest) {
                    return true;
                }
                l.apply(vm, src);
            }
        }
        false
    }
    go(c, &mut l, &rules, vms)
}

#[test]
fn threshold_one_only_mandatory() {
    let c = vsched::sim::ClusterGen { skew: 1.0, ..Default::default() }.build();
    let plan = plan_pass(&c, &cfg(1), &History::default()).unwrap();
    assert!(plan.moves.iter().all(|m| m.reason.is_mandatory()));
    let plan5 = plan_pass(&c, &cfg(5), &History::default()).unwrap();
    assert!(plan5.moves.iter().any(|m| m.reason == Reason::Balance));
    assert!(plan5.imbalance_after < plan.imbalance_after);
}

#[test]
fn move_cap_is_honoured() {
    let c = vsched::sim::ClusterGen { skew: 1.0, ..Default::default() }.build();
    let cfg = BalanceConfig { threshold: 5, max_moves_per_pass: 3, ..BalanceConfig::default() };
    let plan = plan_pass(&c, &cfg, &History::default()).unwrap();
    assert_eq!(plan.moves.iter().filter(|m| m.reason == Reason::Balance).count(), 3);
}

#[test]
fn non_converging_vm_is_not_a_candidate() {
    let mut c = vsched::sim::ClusterGen { skew: 1.0, rules: 0, ..Default::default() }.build();
    let cfg = BalanceConfig { threshold: 5, ..BalanceConfig::default() };
    let plan = plan_pass(&c, &cfg, &History::default()).unwrap();
    let first = plan.moves.iter().find(|m| m.reason == Reason::Balance).unwrap().vm;
    c.vms[first.idx()].dirty_mib_s = cfg.link_mib_s; // dirties faster than the link
    let plan = plan_pass(&c, &cfg, &History::default()).unwrap();
    assert!(plan.moves.iter().all(|m| m.vm != first));
}

#[test]
fn cost_grows_with_memory_and_dirty_rate() {
    let cfg = BalanceConfig::default();
    let mut v = vsched::VmSpec::new("v", Resources::new(1000, 4096));
    let t0 = cfg.migration_s(&v).unwrap();
    v.dirty_mib_s = 500.0;
    let t1 = cfg.migration_s(&v).unwrap();
    v.size.mem_mib = 16384;
    let t2 = cfg.migration_s(&v).unwrap();
    assert!(t0 < t1 && t1 < t2);
    v.dirty_mib_s = 1100.0;
    assert_eq!(cfg.migration_s(&v), None);
}

#[test]
fn hysteresis_holds_recently_moved_vms() {
    let c = vsched::sim::ClusterGen { skew: 1.0, ..Default::default() }.build();
    let cfg = cfg(5);
    let plan = plan_pass(&c, &cfg, &History::default()).unwrap();
    let mut h = History::new(cfg.no_return_passes);
    h.record(&plan.moves);
    let moved: Vec<VmId> = plan.moves.iter().map(|m| m.vm).collect();
    let plan2 = plan_pass(&c, &cfg, &h).unwrap();
    for m in plan2.moves.iter().filter(|m| m.reason == Reason::Balance) {
        assert!(!moved.contains(&m.vm), "{} moved again within hold_passes", m.vm);
    }
    let _ = balance::EXACT_EVACUATION_VMS;
}

#[test]
fn unstable_demand_shortens_the_benefit_horizon() {
    let c = vsched::sim::ClusterGen { skew: 1.0, rules: 0, ..Default::default() }.build();
    let cfg = BalanceConfig { threshold: 5, ..BalanceConfig::default() };
    let plan = plan_pass(&c, &cfg, &History::new(24)).unwrap();
    let first = plan.moves.iter().find(|m| m.reason == Reason::Balance).unwrap().clone();
    assert_eq!(first.expected.horizon_s, cfg.benefit_horizon_s);
    // A horizon for which this move is worth it only if the VM's demand is stable.
    let cfg = BalanceConfig { benefit_horizon_s: 2.0 * first.expected.cost / first.expected.goodness, ..cfg };
    let stable = plan_pass(&c, &cfg, &History::new(24)).unwrap();
    assert!(stable.moves.iter().any(|m| m.vm == first.vm));
    let mut h = History::new(24);
    let n = c.vms.len();
    h.demand.mean = vec![0.5; n];
    h.demand.dev = vec![0.0; n];
    h.demand.samples = vec![10; n];
    h.demand.mean[first.vm.idx()] = 0.1;
    h.demand.dev[first.vm.idx()] = 1.0;
    let unstable = plan_pass(&c, &cfg, &h).unwrap();
    assert!(unstable.moves.iter().all(|m| m.vm != first.vm));
}

#[test]
fn must_affinity_groups_balance_as_a_unit() {
    use vsched::model::{Host, Resources, VmSpec};
    let mut c = Cluster::new();
    for i in 0..3 {
        c.add_host(Host::new(format!("h{i}"), 100_000, 100_000));
    }
    let mut ids = Vec::new();
    for i in 0..6 {
        let mut v = VmSpec::new(format!("v{i}"), Resources::new(10_000, 10_000));
        v.host = Some(HostId(0));
        ids.push(c.add_vm(v));
    }
    c.add_rule(vsched::Rule::new(
        "pair",
        vsched::Enforcement::Must,
        vsched::RuleKind::VmAffinity { vms: vec![ids[0], ids[1]] },
    ));
    c.add_rule(vsched::Rule::new(
        "pair2",
        vsched::Enforcement::Must,
        vsched::RuleKind::VmAffinity { vms: vec![ids[2], ids[3]] },
    ));
    c.add_rule(vsched::Rule::new(
        "pair3",
        vsched::Enforcement::Must,
        vsched::RuleKind::VmAffinity { vms: vec![ids[4], ids[5]] },
    ));
    let plan = plan_pass(&c, &cfg(5), &History::new(24)).unwrap();
    assert!(plan.moves.len() >= 4, "{:?}", plan.moves);
    assert!(plan.moves.iter().any(|m| m.with_previous));
    let mut after = c.clone();
    apply_checked(&mut after, &plan).unwrap();
    assert_eq!(must_violations(&after, &where_is(&after)), 0);
    assert!(ledger::imbalance(&after) < 0.05, "{}", ledger::imbalance(&after));
    // Full automation carries the groups out.
    let mut d = Drs::new(DrsConfig { automation: Automation::Full, balance: cfg(5), ..DrsConfig::default() })
        .unwrap();
    let r = d.pass(&mut c, &mut RecordingMigrator::default()).unwrap();
    assert!(r.failed.is_empty(), "{:?}", r.failed);
    assert_eq!(must_violations(&c, &where_is(&c)), 0);
    assert_eq!(c, after);
}
