//! vsched benchmarks: one DRS pass on 64 hosts / 8,000 VMs (goal < 10 ms) and on
//! 10,000 hosts / 200,000 VMs (goal < 1 s); initial placement of 200,000 VMs on 10,000 hosts
//! (goal < 1 s).
//!
//! `cargo bench --bench drs` (short measurement: 10 samples, a few seconds per case).
// criterion_group! generates an undocumented function.
#![allow(missing_docs)]

use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use vsched::model::VmId;
use vsched::sim::ClusterGen;
use vsched::{BalanceConfig, History, place_batch, plan_pass};

fn cluster(hosts: usize, vms: usize, unplaced: bool) -> vsched::Cluster {
    ClusterGen { seed: 42, hosts, vms, skew: 1.0, rules: hosts / 4, unplaced, ..ClusterGen::default() }
        .build()
}

fn passes(c: &mut Criterion) {
    let cfg = BalanceConfig { threshold: 5, ..BalanceConfig::default() };
    let history = History::new(cfg.no_return_passes);
    let mut g = c.benchmark_group("drs_pass");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    for (hosts, vms) in [(64, 8_000), (10_000, 200_000)] {
        let cl = cluster(hosts, vms, false);
        let plan = plan_pass(&cl, &cfg, &history).unwrap();
        eprintln!(
            "pass {hosts} hosts / {vms} VMs: {} moves, imbalance {:.4} -> {:.4}",
            plan.moves.len(),
            plan.imbalance_before,
            plan.imbalance_after
        );
        g.bench_function(format!("{hosts}_hosts_{vms}_vms"), |b| {
            b.iter(|| black_box(plan_pass(black_box(&cl), &cfg, &history).unwrap()))
        });
    }
    g.finish();
}

fn placement(c: &mut Criterion) {
    let mut g = c.benchmark_group("drs_place");
    g.sample_size(10).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(3));
    let cl = cluster(10_000, 200_000, true);
    let all: Vec<VmId> = (0..cl.vms.len() as u32).map(VmId).collect();
    let p = place_batch(&cl, &all).unwrap();
    eprintln!("place 200000 VMs on 10000 hosts: {} placed, {} failed", p.placed.len(), p.failed.len());
    g.bench_function("200000_vms_on_10000_hosts", |b| {
        b.iter(|| black_box(place_batch(black_box(&cl), &all).unwrap()))
    });
    g.finish();
}

criterion_group!(benches, passes, placement);
criterion_main!(benches);
