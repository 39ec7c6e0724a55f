//! Seeded simulation: thousands of random fault schedules, each checked after every step for
//! "no VM runs twice" and "every protected VM of a failed host restarts within the bound".
//!
//! `VHA_SIM_SCHEDULES=N` sets the number of schedules (default 2000, split over 4 configs);
//! `VHA_SIM_SEED=S VHA_SIM_CONFIG=<name> cargo test -p vha --test sim replay_seed -- --nocapture`
//! replays one seed (a failure prints the exact command).
//! Long run (>= 10,000 schedules, release build):
//! `VHA_SIM_SCHEDULES=10000 cargo test --release -p vha --test sim -- --ignored long_run --nocapture`
use std::time::Instant;

use vha::restart::AdmissionPolicy;
use vha::sim::{SimConfig, run_random, run_seeds};

fn schedules(default: u64) -> u64 {
    std::env::var("VHA_SIM_SCHEDULES").ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The schedule families of the suite; `VHA_SIM_CONFIG=<name>` selects one for `replay_seed`.
fn config(name: &str) -> SimConfig {
    match name {
        "percentage_5_hosts" => SimConfig {
            hosts: 5,
            vms: 10,
            policy: AdmissionPolicy::Percentage { cpu_pct: 25, mem_pct: 25 },
            ..SimConfig::default()
        },
        "dedicated_failover_3_hosts" => SimConfig {
            hosts: 3,
            vms: 6,
            policy: AdmissionPolicy::DedicatedFailoverHosts,
            ..SimConfig::default()
        },
        "no_power_fencing" => {
            let mut cfg = SimConfig::default();
            cfg.ha.power_fencing = false;
            cfg.ha.isolation_response = vha::detector::IsolationResponse::LeaveRunning;
            cfg
        }
        _ => SimConfig::default(),
    }
}

const CONFIGS: [&str; 4] =
    ["host_failures_tolerated", "percentage_5_hosts", "dedicated_failover_3_hosts", "no_power_fencing"];

fn run_part(part: usize) {
    let name = CONFIGS[part];
    let total = schedules(2000);
    let parts = CONFIGS.len() as u64;
    let per = total.div_ceil(parts);
    let p = part as u64;
    let seeds = p * per..((p + 1) * per).min(total);
    let n = seeds.end.saturating_sub(seeds.start);
    let t = Instant::now();
    match run_seeds(seeds, &config(name)) {
        Ok(s) => eprintln!(
            "{name}: {n} schedules in {:.1?}: {} restarts, {} fences, {} self-fences, {} hw resets, max down {} ms",
            t.elapsed(),
            s.restarts,
            s.fences,
            s.self_fences,
            s.hw_resets,
            s.max_down_ms
        ),
        Err(v) => panic!("{v}(config: VHA_SIM_CONFIG={name})"),
    }
}

#[test]
fn schedules_part0_host_failures_tolerated() {
    run_part(0);
}

#[test]
fn schedules_part1_percentage_5_hosts() {
    run_part(1);
}

#[test]
fn schedules_part2_dedicated_failover_3_hosts() {
    run_part(2);
}

#[test]
fn schedules_part3_no_power_fencing() {
    run_part(3);
}

#[test]
fn replay_seed() {
    let Some(seed) = std::env::var("VHA_SIM_SEED").ok().and_then(|v| v.parse().ok()) else {
        return;
    };
    let name = std::env::var("VHA_SIM_CONFIG").unwrap_or_default();
    match run_random(seed, &config(&name)) {
        Ok(s) => eprintln!("seed {seed}: ok {s:?}"),
        Err(v) => panic!("{v}"),
    }
}

#[test]
#[ignore = "long run: VHA_SIM_SCHEDULES=10000 cargo test --release -p vha --test sim -- --ignored long_run"]
fn long_run() {
    let total = schedules(10_000);
    let t = Instant::now();
    let per = total / CONFIGS.len() as u64;
    for (i, name) in CONFIGS.iter().enumerate() {
        // Seeds disjoint from the regular suite's.
        let seeds = 1_000_000 * (i as u64 + 1)..1_000_000 * (i as u64 + 1) + per;
        match run_seeds(seeds, &config(name)) {
            Ok(s) => eprintln!("{name}: {per} schedules: {s:?}"),
            Err(v) => panic!("{v}(config: VHA_SIM_CONFIG={name})"),
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let n = per * CONFIGS.len() as u64;
    eprintln!("{n} schedules, 0 violations, {secs:.1} s, {:.0} schedules/s", n as f64 / secs);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 24, ..Default::default() })]
    /// Invariants hold for any cluster shape, not just the default ones.
    #[test]
    fn invariants_hold_for_any_cluster_shape(
        seed in 0u64..1_000_000, hosts in 2usize..7, vms in 1usize..14, fence_failure in 0.0f64..1.0,
    ) {
        let cfg = SimConfig { hosts, vms, fence_failure, ..SimConfig::default() };
        if let Err(v) = run_random(seed, &cfg) {
            panic!("hosts={hosts} vms={vms} fence_failure={fence_failure}: {v}");
        }
    }
}
