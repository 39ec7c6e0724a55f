//! Scripted simulator scenarios: each asserts a concrete outcome, and prints its seed on failure.
use vha::detector::IsolationResponse;
use vha::sim::{Sim, SimConfig};
use vha::{HostId, VmId};

fn owners(sim: &Sim) -> Vec<(VmId, Vec<HostId>)> {
    sim.vms().iter().map(|v| (v.id, sim.running_on(v.id))).collect()
}

fn vms_on(sim: &Sim, h: u32) -> Vec<VmId> {
    sim.vms().iter().filter(|v| sim.running_on(v.id) == vec![HostId(h)]).map(|v| v.id).collect()
}

#[test]
fn crashed_host_vms_restart_within_three_seconds() {
    for seed in 0..20 {
        let mut sim = Sim::new(seed, SimConfig::default()).unwrap_or_else(|v| panic!("{v}"));
        let coord = sim.coordinator().expect("a coordinator");
        let victim =
            (0..4).find(|h| *h != coord.0 && !vms_on(&sim, *h).is_empty()).expect("some host runs VMs");
        let lost: Vec<VmId> = vms_on(&sim, victim)
            .into_iter()
            .filter(|v| sim.vms().iter().any(|s| s.id == *v && s.protected()))
            .collect();
        sim.crash(victim as usize, None);
        let t0 = sim.now_ms();
        let mut restarted_at = None;
        while sim.now_ms() < t0 + 10_000 {
            sim.step().unwrap_or_else(|v| panic!("{v}"));
            if restarted_at.is_none() && lost.iter().all(|v| sim.running_on(*v).len() == 1) {
                restarted_at = Some(sim.now_ms() - t0);
            }
        }
        let took =
            restarted_at.unwrap_or_else(|| panic!("seed={seed}: {lost:?} not restarted: {:?}", sim.trace()));
        assert!(took < 3000, "seed={seed}: restart took {took} ms\n{:?}", sim.trace());
        assert!(sim.stats().fences >= 1, "seed={seed}: a single dead host is power-fenced");
    }
}

#[test]
fn isolated_host_fences_itself_and_vms_move() {
    for seed in 0..10 {
        // Its power control is behind the same partition.
        let cfg = SimConfig { fence_failure: 1.0, ..SimConfig::default() };
        let mut sim = Sim::new(seed, cfg).unwrap_or_else(|v| panic!("{v}"));
        let victim = (0..4).find(|h| !vms_on(&sim, *h).is_empty()).unwrap() as usize;
        let others: Vec<usize> = (0..4).filter(|h| *h != victim).collect();
        sim.partition(&[victim], &others, true);
        sim.cut_store(victim, true);
        sim.run_for(8000).unwrap_or_else(|v| panic!("{v}"));
        assert!(vms_on(&sim, victim as u32).is_empty(), "seed={seed}: isolated host stopped its VMs");
        assert!(sim.stats().self_fences >= 1, "seed={seed}");
        for (vm, on) in owners(&sim) {
            let prot = sim.vms().iter().any(|s| s.id == vm && s.protected());
            if prot {
                assert_eq!(on.len(), 1, "seed={seed}: {vm} runs once: {:?}", sim.trace());
            }
        }
    }
}

#[test]
fn switch_blip_is_a_network_event_not_a_fence_storm() {
    for seed in 0..10 {
        let mut cfg = SimConfig::default();
        cfg.ha.isolation_response = IsolationResponse::LeaveRunning;
        let mut sim = Sim::new(seed, cfg).unwrap_or_else(|v| panic!("{v}"));
        let before = owners(&sim);
        // Every host loses every other host for 5 s, but all keep the store.
        for a in 0..4 {
            for b in 0..4 {
                if a != b {
                    sim.block(a, b, true);
                }
            }
        }
        sim.run_for(5000).unwrap_or_else(|v| panic!("{v}"));
        assert_eq!(sim.stats().fences, 0, "seed={seed}: no host fenced: {:?}", sim.trace());
        assert_eq!(owners(&sim), before, "seed={seed}: VMs untouched: {:#?}", sim.trace());
        sim.heal();
        sim.run_for(3000).unwrap_or_else(|v| panic!("{v}"));
        assert_eq!(owners(&sim), before, "seed={seed}: {:#?}", sim.trace());
    }
}

#[test]
fn paused_host_is_reset_by_its_watchdog_before_restart() {
    let cfg = SimConfig { fence_failure: 1.0, ..SimConfig::default() };
    let mut sim = Sim::new(3, cfg).unwrap_or_else(|v| panic!("{v}"));
    let victim = (0..4).find(|h| !vms_on(&sim, *h).is_empty()).unwrap() as usize;
    sim.pause(victim, true);
    sim.run_for(6000).unwrap_or_else(|v| panic!("{v}"));
    assert_eq!(sim.stats().hw_resets, 1, "{:?}", sim.trace());
    sim.heal();
    sim.run_for(5000).unwrap_or_else(|v| panic!("{v}"));
}

#[test]
fn checker_catches_drift_beyond_the_watchdog_bound() {
    // Configure no drift margin, then let clocks run 8 % slow/fast: a partitioned host's
    // watchdog fires after its lease expired, and the checker must notice the double run.
    let mut caught = 0;
    for seed in 0..30 {
        let mut cfg = SimConfig::default();
        cfg.ha.watchdog.max_drift = 0.0;
        cfg.ha.watchdog.guard_ms = 0;
        cfg.ha.isolation_response = IsolationResponse::LeaveRunning;
        cfg.fence_failure = 1.0;
        cfg.actual_drift = Some(0.15);
        let Ok(mut sim) = Sim::new(seed, cfg) else {
            continue;
        };
        let victim = (0..4).find(|h| !vms_on(&sim, *h).is_empty()).unwrap() as usize;
        let others: Vec<usize> = (0..4).filter(|h| *h != victim).collect();
        sim.partition(&[victim], &others, true);
        sim.cut_store(victim, true);
        if let Err(v) = sim.run_for(6000) {
            assert!(v.what.contains("SAFETY"), "{v}");
            if caught == 0 {
                eprintln!("expected violation caught (report format):\n{v}");
            }
            caught += 1;
        }
    }
    assert!(caught > 0, "the safety checker never fired on a broken watchdog");
}

#[test]
fn two_host_split_brain_is_not_fenced() {
    for seed in 0..10 {
        let cfg = SimConfig { hosts: 2, vms: 4, ..SimConfig::default() };
        let mut sim = Sim::new(seed, cfg).unwrap_or_else(|v| panic!("{v}"));
        let before = owners(&sim);
        // The heartbeat network splits; both hosts still reach the store.
        sim.partition(&[0], &[1], true);
        sim.run_for(6000).unwrap_or_else(|v| panic!("{v}"));
        assert_eq!(sim.stats().fences, 0, "seed={seed}: {:#?}", sim.trace());
        assert_eq!(owners(&sim), before, "seed={seed}: VMs untouched: {:#?}", sim.trace());
    }
}

#[test]
fn checker_catches_a_missed_restart_bound() {
    // Promise an impossible 300 ms restart bound: the liveness check must fire after a crash.
    let cfg = SimConfig { restart_bound_ms: 300, ..SimConfig::default() };
    let mut sim = Sim::new(5, cfg).unwrap_or_else(|v| panic!("{v}"));
    let victim = (0..4).find(|h| !vms_on(&sim, *h).is_empty()).unwrap() as usize;
    sim.crash(victim, None);
    let err = sim.run_for(5000).expect_err("the bound cannot be met");
    assert!(err.what.contains("LIVENESS"), "{err}");
}
