//! The DRS driver: automation levels, approvals, stale approvals, failures, power management.

use vsched::balance::Reason;
use vsched::dpm::{DpmConfig, PowerAction};
use vsched::drs::{Action, RecordingMigrator};
use vsched::maintenance::enter_maintenance;
use vsched::model::{Cluster, HostId, HostState, VmId};
use vsched::rules::must_violations;
use vsched::sim::ClusterGen;
use vsched::{Automation, BalanceConfig, Drs, DrsConfig, DrsError, imbalance};

fn skewed() -> Cluster {
    ClusterGen { skew: 1.0, ..Default::default() }.build()
}

fn drs(automation: Automation) -> Drs {
    Drs::new(DrsConfig {
        automation,
        balance: BalanceConfig { threshold: 4, ..BalanceConfig::default() },
        ..DrsConfig::default()
    })
    .unwrap()
}

#[test]
fn full_automation_executes_and_balances() {
    let mut c = skewed();
    let before = imbalance(&c);
    let mut d = drs(Automation::Full);
    let mut m = RecordingMigrator::default();
    let r = d.pass(&mut c, &mut m).unwrap();
    assert!(!r.executed.is_empty());
    assert_eq!(m.migrations.len(), r.executed.len());
    for mv in &r.executed {
        assert_eq!(c.vms[mv.vm.idx()].host, Some(mv.to));
    }
    assert!(imbalance(&c) < before);
    assert_eq!(must_violations(&c, &c.vms.iter().map(|v| v.host).collect::<Vec<_>>()), 0);
    assert!(d.pending().next().is_none());
}

#[test]
fn failed_migration_leaves_vm_in_place() {
    let mut c = skewed();
    let mut d = drs(Automation::Full);
    let plan = d.dry_run(&c).unwrap().0;
    let victim = plan.moves[0].vm;
    let from = plan.moves[0].from;
    let mut m = RecordingMigrator { fail: vec![victim], ..Default::default() };
    let r = d.pass(&mut c, &mut m).unwrap();
    assert_eq!(c.vms[victim.idx()].host, Some(from));
    assert!(r.failed.iter().any(|(mv, why)| mv.vm == victim && why.contains("injected")));
}

#[test]
fn manual_mode_approves_by_id_and_refuses_stale() {
    let mut c = skewed();
    let snapshot = c.clone();
    let mut d = drs(Automation::Manual);
    let mut m = RecordingMigrator::default();
    let r = d.pass(&mut c, &mut m).unwrap();
    assert_eq!(c, snapshot, "manual mode changes nothing by itself");
    assert!(m.migrations.is_empty());
    assert!(r.pending.len() >= 3);
    let recs: Vec<_> = d.pending().cloned().collect();
    // Approve the first.
    d.approve(recs[0].id, &mut c, &mut m).unwrap();
    let Action::Migrate(mv) = &recs[0].action else { panic!() };
    assert_eq!(c.vms[mv.vm.idx()].host, Some(mv.to));
    // Approving twice: no longer pending.
    assert!(matches!(d.approve(recs[0].id, &mut c, &mut m), Err(DrsError::UnknownRecommendation(_))));
    // Make the second stale: move its VM elsewhere behind DRS's back.
    let Action::Migrate(mv2) = &recs[1].action else { panic!() };
    let elsewhere = (0..c.hosts.len() as u32).map(HostId).find(|&h| h != mv2.from && h != mv2.to).unwrap();
    c.vms[mv2.vm.idx()].host = Some(elsewhere);
    let err = d.approve(recs[1].id, &mut c, &mut m).unwrap_err();
    assert!(matches!(err, DrsError::Stale { .. }), "{err}");
    assert!(err.to_string().contains("is stale"), "{err}");
    // Make the third stale: its destination goes into maintenance.
    let Action::Migrate(mv3) = &recs[2].action else { panic!() };
    c.hosts[mv3.to.idx()].state = HostState::Maintenance;
    let err = d.approve(recs[2].id, &mut c, &mut m).unwrap_err();
    assert!(err.to_string().contains("not powered on"), "{err}");
    // Reject one; a new pass supersedes the rest.
    if let Some(r3) = recs.get(3) {
        d.reject(r3.id).unwrap();
        assert!(d.reject(r3.id).is_err());
    }
    let last = recs.last().unwrap().id;
    d.pass(&mut c, &mut m).unwrap();
    assert!(d.pending().all(|r| r.id > last));
}

#[test]
fn placement_follows_automation_level() {
    let mut c = ClusterGen { vms: 50, ..Default::default() }.build();
    c.vms[3].host = None;
    let mut manual = drs(Automation::Manual);
    let (host, id) = manual.place(&mut c, VmId(3)).unwrap();
    assert!(c.vms[3].host.is_none());
    let id = id.unwrap();
    manual.approve(id, &mut c, &mut RecordingMigrator::default()).unwrap();
    assert_eq!(c.vms[3].host, Some(host));
    c.vms[3].host = None;
    let mut partial = drs(Automation::Partial);
    let (host, id) = partial.place(&mut c, VmId(3)).unwrap();
    assert!(id.is_none());
    assert_eq!(c.vms[3].host, Some(host));
}

#[test]
fn maintenance_evacuates_or_explains() {
    let mut c = ClusterGen::default().build();
    let evac = enter_maintenance(&mut c, HostId(0), &BalanceConfig::default()).unwrap();
    assert_eq!(c.hosts[0].state, HostState::Maintenance);
    assert!(evac.complete(), "{:?}", evac.blocked);
    vsched::balance::apply_moves(&mut c, &evac.moves);
    assert!(c.vms_on(HostId(0)).is_empty());
    // A cluster that cannot absorb a host: every other host full of reservations.
    let mut tight = ClusterGen { hosts: 3, vms: 30, mem_util: 0.95, ..Default::default() }.build();
    for v in &mut tight.vms {
        v.reservation = v.cap();
    }
    let evac = enter_maintenance(&mut tight, HostId(1), &BalanceConfig::default()).unwrap();
    assert!(!evac.complete());
    for b in &evac.blocked {
        assert!(matches!(b.reason, Reason::Maintenance { .. }));
        assert!(b.why.to_string().contains("ruled out by"), "{}", b.why);
    }
    // A pass also evacuates maintenance hosts, as mandatory moves.
    let mut c = ClusterGen::default().build();
    c.hosts[2].state = HostState::Maintenance;
    let mut d = drs(Automation::Full);
    d.pass(&mut c, &mut RecordingMigrator::default()).unwrap();
    assert!(c.vms_on(HostId(2)).is_empty());
}

#[test]
fn dpm_standby_and_wake_with_hysteresis() {
    let mut c = ClusterGen { hosts: 8, vms: 60, mem_util: 0.75, rules: 0, ..Default::default() }.build();
    for v in &mut c.vms {
        v.demand.cpu_mhz /= 4;
        v.demand.mem_mib = v.size.mem_mib * 3 / 10;
        v.reservation = Default::default();
    }
    let mut d = Drs::new(DrsConfig {
        automation: Automation::Full,
        dpm: DpmConfig { enabled: true, ..DpmConfig::default() },
        ..DrsConfig::default()
    })
    .unwrap();
    let mut m = RecordingMigrator::default();
    // Needs standby_after_passes consecutive low passes.
    let r1 = d.pass(&mut c, &mut m).unwrap();
    assert!(r1.power.is_none());
    let r2 = d.pass(&mut c, &mut m).unwrap();
    assert!(r2.power.is_none());
    let r3 = d.pass(&mut c, &mut m).unwrap();
    let p = r3.power.expect("standby after three low passes");
    assert_eq!(p.action, PowerAction::Standby);
    assert_eq!(c.hosts[p.host.idx()].state, HostState::Standby);
    assert!(c.vms_on(p.host).is_empty());
    assert!(p.util_after < 0.63);
    // The streak restarts: no standby on the very next pass.
    let r4 = d.pass(&mut c, &mut m).unwrap();
    assert!(r4.power.is_none());
    // Demand rises: wake a host.
    for v in &mut c.vms {
        v.demand = v.size;
    }
    let mut woke = false;
    for _ in 0..3 {
        let r = d.pass(&mut c, &mut m).unwrap();
        if let Some(p) = r.power
            && p.action == PowerAction::Wake
        {
            assert_eq!(c.hosts[p.host.idx()].state, HostState::On);
            woke = true;
            break;
        }
    }
    assert!(woke, "utilization {}", vsched::dpm::utilization(&c));
}

#[test]
fn bad_config_is_a_typed_error() {
    let cfg = DrsConfig {
        balance: BalanceConfig { threshold: 9, ..BalanceConfig::default() },
        ..DrsConfig::default()
    };
    assert!(matches!(Drs::new(cfg), Err(DrsError::Config(_))));
    assert!(BalanceConfig::from_json(r#"{"threshold": 3, "bogus": 1}"#).is_err());
    assert_eq!(BalanceConfig::from_json(r#"{"threshold": 2}"#).unwrap().threshold, 2);
}

#[test]
fn invalid_cluster_is_a_typed_error_everywhere() {
    let mut c = ClusterGen::default().build();
    c.vms[0].host = Some(HostId(999));
    let cfg = BalanceConfig::default();
    assert!(vsched::plan_pass(&c, &cfg, &vsched::History::default()).is_err());
    assert!(vsched::place_batch(&c, &[VmId(1)]).is_err());
    assert!(matches!(vsched::place_one(&c, VmId(1)), Err(vsched::PlacementError::Model(_))));
    assert!(matches!(
        enter_maintenance(&mut c.clone(), HostId(0), &cfg),
        Err(vsched::maintenance::MaintenanceError::Model(_))
    ));
    let mut d = drs(Automation::Full);
    assert!(matches!(d.pass(&mut c, &mut RecordingMigrator::default()), Err(DrsError::Model(_))));
    assert!(d.dry_run(&c).is_err());
}
