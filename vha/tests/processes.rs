//! Real processes on loopback: host agents are re-executions of this test binary (selected by
//! an environment variable), the embedded store is served by the test process.
//!
//! - kill -9 a host agent: its protected VMs run elsewhere, never twice;
//! - SIGSTOP one past its lease with power fencing off: its VMs restart elsewhere after the
//!   lease expires, and when the zombie wakes it fences itself; the store refuses its writes.
//! - isolate a host: it fences itself and its VMs restart elsewhere; emulated with a flag file,
//!   and for real in a network namespace whose veth link goes down (needs root and `ip`; skips
//!   otherwise unless `VINFRA_REQUIRE_NETNS=1`).
use std::io::Write;
use std::process::Command;

use vha::agent::DecisionKind;
use vha::runtime::{
    ClusterHarness, HarnessConfig, HostRunConfig, Outcome, PartitionMechanism, Report, Scenario, run_host,
    run_scenario,
};

const ENV: &str = "VHA_TEST_HOST_CONFIG";

/// Not a test: the entry point of a host agent child process.
#[test]
fn host_agent_entry() {
    let Ok(cfg) = std::env::var(ENV) else { return };
    let cfg: HostRunConfig = serde_json::from_str(&cfg).expect("host config");
    let mut out = std::io::stdout();
    let r = run_host(cfg, &mut |line| {
        // The parent is gone (its end of the pipe closed): stop instead of running orphaned.
        if writeln!(out, "{}", serde_json::to_string(&line).unwrap_or_default())
            .and_then(|_| out.flush())
            .is_err()
        {
            std::process::exit(1);
        }
    });
    panic!("host agent ended: {r:?}");
}

fn spawn(hc: &HostRunConfig) -> Command {
    let mut c = Command::new(std::env::current_exe().expect("test binary"));
    c.args(["host_agent_entry", "--exact", "--nocapture", "--test-threads=1"]);
    c.env(ENV, serde_json::to_string(hc).expect("encode config"));
    c
}

fn cluster(cfg: HarnessConfig) -> ClusterHarness {
    let mut h = ClusterHarness::start(cfg, &spawn).expect("start cluster");
    h.power_on_all().expect("power on");
    h
}

fn check_safe(o: &Outcome) {
    let text = serde_json::to_string_pretty(o).unwrap_or_default();
    assert_eq!(o.double_runs, 0, "a VM ran on two hosts: {text}");
    assert_eq!(o.stale_writes_accepted, 0, "a fenced host wrote shared state: {text}");
    assert!(!o.vms.is_empty(), "the victim ran protected VMs: {text}");
    for v in &o.vms {
        assert!(v.running_ms.is_some() && v.to != Some(o.victim), "{:?} restarted elsewhere: {text}", v.vm);
    }
    eprintln!(
        "{:?}: detection {:?} ms, fence {:?} ms, first restart begun {:?} ms, all running {:?} ms",
        o.scenario, o.detection_ms, o.fence_ms, o.first_restart_ms, o.all_running_ms
    );
}

#[test]
fn kill9_host_agent_vms_restart_elsewhere() {
    let mut h = cluster(HarnessConfig::default());
    let o = run_scenario(&mut h, Scenario::Kill).expect("scenario");
    check_safe(&o);
    assert!(
        o.fence_ms.is_some(),
        "the dead host was fenced: {}",
        serde_json::to_string_pretty(&o).unwrap_or_default()
    );
}

#[test]
fn sigstopped_zombie_wakes_and_does_not_run_its_vms() {
    let mut cfg = HarnessConfig::default();
    cfg.ha.power_fencing = false; // restart only after the zombie's lease expired
    let mut h = cluster(cfg);
    let o = run_scenario(&mut h, Scenario::Stop).expect("scenario");
    check_safe(&o);
    let woke = o.timeline.iter().find(|e| e.what.starts_with("SIGCONT")).map(|e| e.at_ms);
    let woke = woke.expect("zombie woken");
    let restart = o.first_restart_ms.expect("restart") as i64;
    assert!(restart < woke, "restarted while the zombie slept");
    // After waking, the zombie's first act is its watchdog self-fence; it never starts or
    // writes for its old VMs again.
    let victim = o.victim;
    let self_fenced = h.reports.iter().any(|r| {
        r.host == victim && matches!(&r.report, Report::Decision(d) if d.kind == DecisionKind::SelfFence)
    });
    assert!(self_fenced, "zombie fenced itself on waking");
    let lost: Vec<_> = o.vms.iter().map(|v| v.vm).collect();
    let restart_unix = o.fault_unix_ms + restart as u64;
    let zombie_writes = h
        .reports
        .iter()
        .filter(|r| r.host == victim && r.unix_ms > restart_unix)
        .filter(|r| matches!(r.report, Report::SharedWrite { ok: true, vm, .. } if lost.contains(&vm)))
        .count();
    assert_eq!(zombie_writes, 0, "the store accepted a write from the zombie after the restart");
    let zombie_starts = h
        .reports
        .iter()
        .filter(|r| r.host == victim && r.unix_ms > restart_unix)
        .filter(|r| matches!(r.report, Report::Started { vm, .. } if lost.contains(&vm)))
        .count();
    assert_eq!(zombie_starts, 0, "the zombie started one of its old VMs again");
    assert_eq!(o.stale_writes_accepted, 0);
}

#[test]
fn isolated_host_fences_itself() {
    let mut h = cluster(HarnessConfig::default());
    let o = run_scenario(&mut h, Scenario::Partition).expect("scenario");
    check_safe(&o);
    assert_eq!(o.partition, Some(PartitionMechanism::FlagFile));
    assert!(o.fence_ms.is_some(), "isolated host fenced itself");
}

#[test]
fn host_in_netns_fences_itself_when_its_link_goes_down() {
    let h = ClusterHarness::start(HarnessConfig { netns_host: true, ..HarnessConfig::default() }, &spawn)
        .expect("start cluster");
    if let Some(why) = h.netns_unavailable() {
        if std::env::var("VINFRA_REQUIRE_NETNS").as_deref() == Ok("1") {
            panic!("VINFRA_REQUIRE_NETNS=1 but no network namespace: {why}");
        }
        eprintln!("SKIP: no network namespace for a real partition ({why})");
        return;
    }
    let mut h = h;
    let ns_host = h.netns_host().expect("a host in the namespace");
    h.power_on_all().expect("power on");
    let o = run_scenario(&mut h, Scenario::Partition).expect("scenario");
    check_safe(&o);
    let text = serde_json::to_string_pretty(&o).unwrap_or_default();
    assert_eq!(o.victim, ns_host, "{text}");
    assert_eq!(o.partition, Some(PartitionMechanism::Netns), "{text}");
    let self_fenced = h.reports.iter().any(|r| {
        r.host == ns_host
            && r.unix_ms >= o.fault_unix_ms
            && matches!(&r.report, Report::Decision(d) if d.kind == DecisionKind::SelfFence)
    });
    assert!(self_fenced, "the cut-off host fenced itself: {text}");
    // Nothing emulated: no flag file exists, and the victim was a full member before the fault
    // (it ran VMs and wrote their shared state across the veth link).
    let wrote_before = h.reports.iter().any(|r| {
        r.host == ns_host
            && r.unix_ms < o.fault_unix_ms
            && matches!(r.report, Report::SharedWrite { ok: true, .. })
    });
    assert!(wrote_before, "the namespaced host reached the store before the fault: {text}");
}

/// The same kill -9 scenario with etcd as the store (feature `etcd`; skips without etcd unless
/// `VINFRA_REQUIRE_ETCD=1`).
#[cfg(feature = "etcd")]
#[test]
fn kill9_host_agent_with_etcd() {
    let eps = std::env::var("VINFRA_ETCD_ENDPOINTS").unwrap_or_else(|_| "http://127.0.0.1:2379".to_string());
    let eps: Vec<String> = eps.split(',').map(|s| s.trim().to_string()).collect();
    if let Err(e) = vha::store::EtcdStore::connect(&eps, std::time::Duration::from_secs(2)) {
        if std::env::var("VINFRA_REQUIRE_ETCD").as_deref() == Ok("1") {
            panic!("VINFRA_REQUIRE_ETCD=1 but etcd at {eps:?} is unreachable: {e}");
        }
        eprintln!("SKIP: no etcd at {eps:?} ({e})");
        return;
    }
    let mut h = cluster(HarnessConfig { etcd: Some(eps), ..HarnessConfig::default() });
    let o = run_scenario(&mut h, Scenario::Kill).expect("scenario");
    check_safe(&o);
}
