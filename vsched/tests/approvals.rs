//! The DRS driver as a state machine under random operations (manual automation): passes,
//! approvals, rejections, and changes made behind its back. Approvals never break a must-rule,
//! capacity or a reservation; stale or unknown ids are typed errors, never panics.

mod common;

use common::{arb_params, build, cases, where_is};
use proptest::prelude::*;
use vsched::drs::{Action, RecordingMigrator};
use vsched::model::{HostId, HostState, VmId};
use vsched::rules::must_violations;
use vsched::{Automation, BalanceConfig, Drs, DrsConfig, DrsError, entitlement};

#[derive(Debug, Clone)]
enum Op {
    Pass,
    Approve(usize),
    Reject(usize),
    Move(usize, usize),
    Maintenance(usize),
    Exit(usize),
    Demand(usize, u8),
}

fn arb_op() -> impl Strategy<Value = Op> {
    prop_oneof![
        2 => Just(Op::Pass),
        6 => (0usize..50).prop_map(Op::Approve),
        1 => (0usize..50).prop_map(Op::Reject),
        1 => (0usize..100, 0usize..8).prop_map(|(v, h)| Op::Move(v, h)),
        1 => (0usize..8).prop_map(Op::Maintenance),
        1 => (0usize..8).prop_map(Op::Exit),
        1 => (0usize..100, 0u8..=100).prop_map(|(v, p)| Op::Demand(v, p)),
    ]
}

fn capacity_ok(c: &vsched::Cluster, h: HostId) -> bool {
    let ent = entitlement::compute(c);
    let (mut res, mut load) = ((0u64, 0u64), (0u64, 0u64));
    for (i, v) in c.vms.iter().enumerate() {
        if v.host == Some(h) {
            res.0 += v.reservation.cpu_mhz;
            res.1 += v.reservation.mem_mib;
            load.0 += ent.vm[i].cpu_mhz;
            load.1 += ent.vm[i].mem_mib;
        }
    }
    let host = &c.hosts[h.idx()];
    res.0 <= host.cpu_mhz && res.1 <= host.mem_mib && load.0 <= host.cpu_mhz && load.1 <= host.mem_mib
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(256)))]

    #[test]
    fn manual_mode_state_machine(p in arb_params(6, 30), ops in prop::collection::vec(arb_op(), 1..40)) {
        let mut c = build(&p);
        let mut drs = Drs::new(DrsConfig {
            automation: Automation::Manual,
            balance: BalanceConfig { threshold: 5, ..BalanceConfig::default() },
            ..DrsConfig::default()
        }).unwrap();
        let mut m = RecordingMigrator::default();
        let mut decided: Vec<u64> = Vec::new();
        for op in ops {
            match op {
                Op::Pass => {
                    let before = c.clone();
                    drs.pass(&mut c, &mut m).unwrap();
                    prop_assert_eq!(&c, &before, "manual pass changed the cluster");
                }
                Op::Approve(k) => {
                    let pending: Vec<_> = drs.pending().cloned().collect();
                    if pending.is_empty() {
                        if let Some(&id) = decided.last() {
                            prop_assert!(matches!(drs.approve(id, &mut c, &mut m),
                                Err(DrsError::UnknownRecommendation(_))));
                        }
                        continue;
                    }
                    let rec = &pending[k % pending.len()];
                    let viol_before = must_violations(&c, &where_is(&c));
                    let res = drs.approve(rec.id, &mut c, &mut m);
                    decided.push(rec.id);
                    match (&rec.action, res) {
                        (Action::Migrate(mv), Ok(())) => {
                            prop_assert_eq!(c.vms[mv.vm.idx()].host, Some(mv.to));
                            prop_assert!(capacity_ok(&c, mv.to), "approved move overloads {}", mv.to);
                            let viol_after = must_violations(&c, &where_is(&c));
                            prop_assert!(viol_after <= viol_before, "approval broke a must-rule");
                        }
                        (_, Ok(())) => {}
                        (_, Err(DrsError::Stale { .. })) => {}
                        (_, Err(e)) => prop_assert!(false, "unexpected error {e}"),
                    }
                }
                Op::Reject(k) => {
                    let pending: Vec<_> = drs.pending().map(|r| r.id).collect();
                    if let Some(&id) = pending.get(k % pending.len().max(1)) {
                        drs.reject(id).unwrap();
                        prop_assert!(drs.reject(id).is_err());
                        decided.push(id);
                    }
                }
                Op::Move(v, h) => {
                    if c.vms.is_empty() { continue; }
                    let v = v % c.vms.len();
                    let h = h % c.hosts.len();
                    if c.vms[v].host.is_some() && c.hosts[h].state != HostState::Standby {
                        c.vms[v].host = Some(HostId(h as u32));
                    }
                }
                Op::Maintenance(h) => {
                    let h = h % c.hosts.len();
                    c.hosts[h].state = HostState::Maintenance;
                }
                Op::Exit(h) => {
                    let h = h % c.hosts.len();
                    c.hosts[h].state = HostState::On;
                }
                Op::Demand(v, pct) => {
                    if c.vms.is_empty() { continue; }
                    let v = v % c.vms.len();
                    let s = c.vms[v].size;
                    c.vms[v].demand.cpu_mhz = s.cpu_mhz * pct as u64 / 100;
                }
            }
            c.validate().unwrap();
        }
        let _ = VmId(0);
    }
}

#[test]
fn config_json_garbage_is_an_error() {
    for s in ["", "{", r#"{"threshold": "x"}"#, r#"{"threshold": 0}"#, r#"{"link_mib_s": -1}"#] {
        assert!(BalanceConfig::from_json(s).is_err(), "{s}");
    }
}
