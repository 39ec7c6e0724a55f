//! Entitlement invariants over random clusters, and JSON snapshots.

use proptest::prelude::*;
use vsched::model::{Cluster, Host, HostId, Pool, PoolId, Resources, Shares, VmSpec};
use vsched::{entitlement, sim::ClusterGen};

/// A random cluster: 1-6 hosts, up to 30 VMs with random demand/reservation/limit/shares,
/// a random pool tree with random limits and reservations.
fn arb_cluster() -> impl Strategy<Value = Cluster> {
    let host = (1_000u64..50_000, 1_000u64..50_000);
    let vm = (
        (1u64..20_000, 1u64..20_000),
        (0u64..100, 0u64..100, 0u64..100),
        (any::<bool>(), 0u64..100),
        (1u32..5000, 1u32..5000),
        (0usize..8, any::<bool>()),
    );
    let pool = (0usize..8, 1u32..5000, any::<bool>(), 1u64..40_000, 0u64..3000);
    (prop::collection::vec(host, 1..6), prop::collection::vec(vm, 0..30), prop::collection::vec(pool, 0..6))
        .prop_map(|(hosts, vms, pools)| {
            let mut c = Cluster::new();
            for (i, (cpu, mem)) in hosts.iter().enumerate() {
                c.add_host(Host::new(format!("h{i}"), *cpu, *mem));
            }
            for (i, (par, sh, lim, l, r)) in pools.iter().enumerate() {
                let mut p = Pool::child(format!("p{i}"), PoolId((*par % (i + 1)) as u32));
                p.shares = Shares { cpu: *sh, mem: *sh };
                if *lim {
                    p.limit = Some(Resources::new(*l, *l));
                }
                p.reservation = Resources::new((*r).min(*l), (*r).min(*l));
                c.add_pool(p);
            }
            let np = c.pools.len();
            for (i, ((sc, sm), (dp, rp, _), (has_lim, lim_pct), (shc, shm), (pool, placed))) in
                vms.iter().enumerate()
            {
                let size = Resources::new(*sc, *sm);
                let mut v = VmSpec::new(format!("v{i}"), size);
                v.demand = Resources::new(sc * dp / 100, sm * dp / 100);
                let cap = if *has_lim {
                    Resources::new((sc * lim_pct / 100).max(1), (sm * lim_pct / 100).max(1))
                } else {
                    size
                };
                if *has_lim {
                    v.limit = Some(cap);
                }
                v.reservation = Resources::new(cap.cpu_mhz * rp / 100, cap.mem_mib * rp / 100);
                v.shares = Shares { cpu: *shc, mem: *shm };
                v.pool = PoolId((*pool % np) as u32);
                if *placed {
                    v.host = Some(HostId((i % hosts.len()) as u32));
                }
                c.add_vm(v);
            }
            c
        })
}

proptest! {
    #[test]
    fn entitlement_invariants(c in arb_cluster()) {
        c.validate().unwrap();
        let e = entitlement::compute(&c);
        let cap = c.on_capacity();
        let placed: Vec<usize> = (0..c.vms.len()).filter(|&i| c.vms[i].host.is_some()).collect();
        let sum_cpu: u64 = placed.iter().map(|&i| e.vm[i].cpu_mhz).sum();
        let sum_mem: u64 = placed.iter().map(|&i| e.vm[i].mem_mib).sum();
        prop_assert!(sum_cpu <= cap.cpu_mhz, "cpu {sum_cpu} > {}", cap.cpu_mhz);
        prop_assert!(sum_mem <= cap.mem_mib, "mem {sum_mem} > {}", cap.mem_mib);
        let (res_cpu, res_mem) = (e.reserved.cpu_mhz, e.reserved.mem_mib);
        for &i in &placed {
            let v = &c.vms[i];
            let got = e.vm[i];
            prop_assert!(got.fits_in(v.cap()), "vm {i}: {got:?} above limit {:?}", v.cap());
            prop_assert!(got.fits_in(v.wanted()), "vm {i}: {got:?} above demand {:?}", v.wanted());
            if res_cpu <= cap.cpu_mhz {
                prop_assert!(got.cpu_mhz >= v.reservation.cpu_mhz, "vm {i} cpu below reservation");
            }
            if res_mem <= cap.mem_mib {
                prop_assert!(got.mem_mib >= v.reservation.mem_mib, "vm {i} mem below reservation");
            }
        }
        for (i, v) in c.vms.iter().enumerate() {
            if v.host.is_none() {
                prop_assert_eq!(e.vm[i], Resources::default());
            }
        }
    }

    #[test]
    fn json_round_trip(c in arb_cluster()) {
        let back = Cluster::from_json(&c.to_json()).unwrap();
        prop_assert_eq!(back, c);
    }

    #[test]
    fn json_garbage_is_an_error_not_a_panic(s in "\\PC{0,200}") {
        let _ = Cluster::from_json(&s);
    }
}

#[test]
fn unknown_fields_are_refused() {
    let err = Cluster::from_json(r#"{"hosts":[],"vms":[],"colour":"red"}"#).unwrap_err();
    assert!(err.to_string().contains("colour"), "{err}");
    let err = Cluster::from_json(r#"{"hosts":[{"name":"a","cpu_mhz":1,"mem_mib":1,"turbo":true}],"vms":[]}"#)
        .unwrap_err();
    assert!(err.to_string().contains("turbo"), "{err}");
}

#[test]
fn bad_references_are_typed_errors() {
    let mut c = Cluster::new();
    c.add_host(Host::new("a", 1000, 1000));
    let mut v = VmSpec::new("v", Resources::new(100, 100));
    v.host = Some(HostId(7));
    c.add_vm(v);
    let e = Cluster::from_json(&c.to_json()).unwrap_err();
    assert!(matches!(e, vsched::model::ModelError::UnknownHost { host: 7, .. }), "{e}");
}

#[test]
fn generated_cluster_round_trips() {
    let c = ClusterGen::default().build();
    assert_eq!(Cluster::from_json(&c.to_json()).unwrap(), c);
}
