//! vha benchmarks: the failure detector, the embedded store, and simulator throughput.
//!
//! `cargo bench --bench vha`
#![allow(missing_docs)] // criterion's macros generate undocumented items
use criterion::{Criterion, criterion_group, criterion_main};
use std::hint::black_box;
use vha::detector::{PhiConfig, PhiDetector};
use vha::sim::{SimConfig, run_random};
use vha::store::{ClusterStore, Compare, MemStore, Txn, TxnOp};

fn phi(c: &mut Criterion) {
    let mut d = PhiDetector::new(PhiConfig::default());
    for i in 0..200u64 {
        d.heartbeat(i * 200 + (i * 7919) % 40);
    }
    c.bench_function("phi accrual: phi() with a full window", |b| {
        b.iter(|| black_box(d.phi(black_box(40_500))))
    });
}

fn store(c: &mut Criterion) {
    let s = MemStore::new();
    let mut rev = s.put("/vha/vms/00000001", b"owner".to_vec(), None).unwrap_or(0);
    c.bench_function("MemStore: compare-and-swap txn (fencing-token write)", |b| {
        b.iter(|| {
            let r = s
                .txn(Txn::new().when(Compare::mod_rev("/vha/vms/00000001", rev)).and_then(TxnOp::Put {
                    key: "/vha/vms/00000001".into(),
                    value: b"x".to_vec(),
                    lease: None,
                }))
                .unwrap_or_else(|e| panic!("txn: {e}"));
            rev = r.revision;
        })
    });
}

fn sim(c: &mut Criterion) {
    let cfg = SimConfig::default();
    let mut seed = 0u64;
    let mut g = c.benchmark_group("simulator");
    g.sample_size(20);
    g.bench_function("one random fault schedule (4 hosts, 8 VMs, ~18 s virtual)", |b| {
        b.iter(|| {
            seed += 1;
            run_random(seed, &cfg).unwrap_or_else(|v| panic!("{v}"))
        })
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default();
    targets = phi, store, sim
}
criterion_main!(benches);
