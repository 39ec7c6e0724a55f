//! Initial placement: constraints hold for every placed VM; failures name the constraint.

mod common;

use common::{arb_params, cases, where_is};
use proptest::prelude::*;
use vsched::ledger::{HostReject, Ledger};
use vsched::model::{Cluster, Host, HostId, HostState, Resources, VmId, VmSpec};
use vsched::rules::{Enforcement, Rule, RuleKind, must_violations};
use vsched::sim::ClusterGen;
use vsched::{PlacementError, entitlement, place_batch, place_one};

fn unplaced(p: &common::Params) -> Cluster {
    ClusterGen {
        seed: p.seed,
        hosts: p.hosts,
        vms: p.vms,
        mem_util: p.mem_util,
        skew: p.skew,
        pools: p.pools,
        rules: p.rules,
        unplaced: true,
    }
    .build()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    /// Every placed VM fits (reservations and wanted load within capacity), sits on a
    /// powered-on host and breaks no must-rule; every failure names a constraint per host.
    #[test]
    fn batch_placement_is_safe(p in arb_params(8, 60)) {
        let mut c = unplaced(&p);
        let all: Vec<VmId> = (0..c.vms.len() as u32).map(VmId).collect();
        let out = place_batch(&c, &all).unwrap();
        prop_assert_eq!(out.placed.len() + out.failed.len(), c.vms.len());
        out.apply(&mut c);
        prop_assert_eq!(must_violations(&c, &where_is(&c)), 0);
        let mut res = vec![Resources::default(); c.hosts.len()];
        let mut load = vec![Resources::default(); c.hosts.len()];
        for v in &c.vms {
            if let Some(h) = v.host {
                prop_assert_eq!(c.hosts[h.idx()].state, HostState::On);
                res[h.idx()].cpu_mhz += v.reservation.cpu_mhz;
                res[h.idx()].mem_mib += v.reservation.mem_mib;
                load[h.idx()].cpu_mhz += v.wanted().cpu_mhz;
                load[h.idx()].mem_mib += v.wanted().mem_mib;
            }
        }
        for (h, host) in c.hosts.iter().enumerate() {
            prop_assert!(res[h].fits_in(host.capacity()));
            prop_assert!(load[h].fits_in(host.capacity()));
        }
        for e in &out.failed {
            match e {
                PlacementError::NoHost { why, .. } => {
                    prop_assert_eq!(why.by_host.iter().map(|x| x.1).sum::<usize>()
                        + why.by_rule.iter().map(|x| x.1).sum::<usize>(), c.hosts.len());
                }
                PlacementError::Admission { why, .. } => prop_assert!(why.contains("reservations")),
                other => prop_assert!(false, "unexpected {other}"),
            }
        }
        // Deterministic.
        let again = place_batch(&unplaced(&p), &all).unwrap();
        prop_assert_eq!(again.placed, out.placed);
    }
}

#[test]
fn error_names_the_constraint() {
    let mut c = Cluster::new();
    c.add_host(Host::new("small", 10_000, 4096));
    c.add_host(Host::new("big", 10_000, 65536));
    let mut sleeping = Host::new("zzz", 100_000, 1 << 20);
    sleeping.state = HostState::Standby;
    c.add_host(sleeping);
    let mut v = VmSpec::new("db", Resources::new(2000, 8192));
    v.reservation = Resources::new(0, 8192);
    let db = c.add_vm(v);
    c.add_rule(Rule::new(
        "db-not-on-big",
        Enforcement::Must,
        RuleKind::VmHost { vms: vec![db], hosts: vec![HostId(1)], run_on: false },
    ));
    let err = place_one(&c, db).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("memory reservations would exceed host memory"), "{msg}");
    assert!(msg.contains("rule 'db-not-on-big'"), "{msg}");
    assert!(msg.contains("host not powered on"), "{msg}");
    match err {
        PlacementError::NoHost { why, .. } => {
            assert_eq!(why.by_host, vec![(HostReject::NotOn, 1), (HostReject::MemReservation, 1)]);
            assert_eq!(why.by_rule, vec![("db-not-on-big".to_string(), 1)]);
        }
        other => panic!("{other}"),
    }
}

#[test]
fn rules_steer_placement() {
    let mut c = Cluster::new();
    for i in 0..4 {
        c.add_host(Host::new(format!("h{i}"), 100_000, 100_000));
    }
    let a = c.add_vm(VmSpec::new("a", Resources::new(1000, 1000)));
    let b = c.add_vm(VmSpec::new("b", Resources::new(1000, 1000)));
    let x = c.add_vm(VmSpec::new("x", Resources::new(1000, 1000)));
    let y = c.add_vm(VmSpec::new("y", Resources::new(1000, 1000)));
    c.add_rule(Rule::new("ab-together", Enforcement::Must, RuleKind::VmAffinity { vms: vec![a, b] }));
    c.add_rule(Rule::new("xy-apart", Enforcement::Must, RuleKind::VmAntiAffinity { vms: vec![x, y] }));
    c.add_rule(Rule::new(
        "x-on-3",
        Enforcement::Should,
        RuleKind::VmHost { vms: vec![x], hosts: vec![HostId(3)], run_on: true },
    ));
    let out = place_batch(&c, &[a, b, x, y]).unwrap();
    assert!(out.failed.is_empty());
    out.apply(&mut c);
    assert_eq!(c.vms[a.idx()].host, c.vms[b.idx()].host);
    assert_ne!(c.vms[x.idx()].host, c.vms[y.idx()].host);
    assert_eq!(c.vms[x.idx()].host, Some(HostId(3)));
    // Placing an already placed VM is a typed error.
    assert!(matches!(place_one(&c, a), Err(PlacementError::AlreadyPlaced { .. })));
    assert!(matches!(place_one(&c, VmId(99)), Err(PlacementError::UnknownVm(_))));
}

#[test]
fn least_loaded_host_first() {
    let mut c = Cluster::new();
    c.add_host(Host::new("h0", 10_000, 10_000));
    c.add_host(Host::new("h1", 10_000, 10_000));
    let mut busy = VmSpec::new("busy", Resources::new(5000, 5000));
    busy.host = Some(HostId(0));
    c.add_vm(busy);
    let n = c.add_vm(VmSpec::new("new", Resources::new(1000, 1000)));
    assert_eq!(place_one(&c, n).unwrap(), HostId(1));
    let e = entitlement::compute(&c);
    let _ = Ledger::new(&c, &e);
}

#[test]
fn admission_control_at_pool_and_cluster_level() {
    use vsched::model::{Pool, PoolId};
    let mut c = Cluster::new();
    c.add_host(Host::new("h", 100_000, 100_000));
    let mut capped = Pool::child("capped", PoolId::ROOT);
    capped.limit = Some(Resources::new(10_000, 10_000));
    let capped = c.add_pool(capped);
    let mut roomy = Pool::child("roomy", PoolId::ROOT);
    roomy.reservation = Resources::new(0, 50_000);
    let roomy = c.add_pool(roomy);
    let mk = |pool, res_mem| {
        let mut v = VmSpec::new("v", Resources::new(1000, 8000));
        v.reservation = Resources::new(0, res_mem);
        v.pool = pool;
        v
    };
    let a = c.add_vm(mk(capped, 6000));
    let b = c.add_vm(mk(capped, 6000));
    let out = place_batch(&c, &[a, b]).unwrap();
    assert_eq!(out.placed.len(), 1);
    let msg = out.failed[0].to_string();
    assert!(msg.contains("pool 'capped' would exceed its limit"), "{msg}");
    // The roomy pool already reserves 50,000 MiB: its VMs use that reservation, and the rest
    // of the cluster can only reserve what is left.
    let r1 = c.add_vm(mk(roomy, 8000));
    let big = c.add_vm(mk(PoolId::ROOT, 8000));
    c.vms[big.idx()].size.mem_mib = 60_000;
    c.vms[big.idx()].reservation.mem_mib = 55_000;
    let out = place_batch(&c, &[r1, big]).unwrap();
    assert!(out.placed.iter().any(|p| p.0 == r1));
    let msg = out.failed[0].to_string();
    assert!(msg.contains("cluster's powered-on capacity"), "{msg}");
}
