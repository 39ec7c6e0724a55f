//! Shared helpers for the integration tests.
#![allow(dead_code)]

use proptest::prelude::*;
use vsched::model::{Cluster, HostId, HostState};
use vsched::sim::{ClusterGen, SplitMix64};

/// Proptest case count: `PROPTEST_CASES` if set (long mode), else the modest default.
pub fn cases(default: u32) -> u32 {
    std::env::var("PROPTEST_CASES").ok().and_then(|s| s.parse().ok()).unwrap_or(default)
}

/// Parameters of a random small cluster, shown by proptest on failure (the seed among them).
#[derive(Debug, Clone)]
pub struct Params {
    pub seed: u64,
    pub hosts: usize,
    pub vms: usize,
    pub mem_util: f64,
    pub skew: f64,
    pub rules: usize,
    pub pools: bool,
    /// VMs thrown on random hosts after placement (may break rules and capacity).
    pub scramble: usize,
    /// Put this host (mod hosts) in maintenance.
    pub maintenance: Option<usize>,
}

pub fn arb_params(max_hosts: usize, max_vms: usize) -> impl Strategy<Value = Params> {
    (
        any::<u64>(),
        2..=max_hosts,
        0..=max_vms,
        0.2f64..0.95,
        0.0f64..1.0,
        0usize..8,
        any::<bool>(),
        0usize..4,
        prop::option::weighted(0.2, 0usize..16),
    )
        .prop_map(|(seed, hosts, vms, mem_util, skew, rules, pools, scramble, maintenance)| Params {
            seed,
            hosts,
            vms,
            mem_util,
            skew,
            rules,
            pools,
            scramble,
            maintenance,
        })
}

pub fn build(p: &Params) -> Cluster {
    let mut c = ClusterGen {
        seed: p.seed,
        hosts: p.hosts,
        vms: p.vms,
        mem_util: p.mem_util,
        skew: p.skew,
        pools: p.pools,
        rules: p.rules,
        unplaced: false,
    }
    .build();
    let mut rng = SplitMix64::new(p.seed ^ 0xdead_beef);
    if !c.vms.is_empty() {
        for _ in 0..p.scramble {
            let v = rng.below(c.vms.len() as u64) as usize;
            c.vms[v].host = Some(HostId(rng.below(c.hosts.len() as u64) as u32));
        }
    }
    if let Some(h) = p.maintenance {
        c.hosts[h % p.hosts].state = HostState::Maintenance;
    }
    c.validate().expect("generated cluster is valid");
    c
}

pub fn where_is(c: &Cluster) -> Vec<Option<HostId>> {
    c.vms.iter().map(|v| v.host).collect()
}
