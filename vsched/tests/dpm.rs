//! Power management under random demand (full automation): never below the minimum of
//! powered-on hosts, standby hosts run nothing, must-rules hold, a standby only after the
//! required streak of low-utilization passes, and no host is put in standby and woken again
//! while demand stays the same.

mod common;

use common::{cases, where_is};
use proptest::prelude::*;
use vsched::dpm::{DpmConfig, PowerAction, utilization};
use vsched::drs::RecordingMigrator;
use vsched::model::HostState;
use vsched::rules::must_violations;
use vsched::sim::ClusterGen;
use vsched::{Automation, Drs, DrsConfig};

proptest! {
    #![proptest_config(ProptestConfig::with_cases(cases(128)))]

    #[test]
    fn dpm_invariants(
        seed in any::<u64>(),
        hosts in 3usize..8,
        vms in 5usize..40,
        levels in prop::collection::vec(5u64..100, 1..6),
        hold in 2usize..6,
    ) {
        let mut c = ClusterGen { seed, hosts, vms, mem_util: 0.6, rules: 2, ..Default::default() }.build();
        let sizes: Vec<_> = c.vms.iter().map(|v| v.size).collect();
        let dpm = DpmConfig { enabled: true, ..DpmConfig::default() };
        let mut d = Drs::new(DrsConfig {
            automation: Automation::Full,
            dpm: dpm.clone(),
            ..DrsConfig::default()
        }).unwrap();
        let mut m = RecordingMigrator::default();
        let mut low_streak = 0u32;
        let mut pass = 0;
        for pct in levels {
            // Demand held at one level for `hold` passes.
            for (v, s) in c.vms.iter_mut().zip(&sizes) {
                v.demand.cpu_mhz = s.cpu_mhz * pct / 100;
                v.demand.mem_mib = s.mem_mib * pct / 100;
                v.reservation = Default::default();
            }
            let mut acted_this_level: Vec<(vsched::HostId, PowerAction)> = Vec::new();
            for _ in 0..hold {
                let u = utilization(&c);
                low_streak = if u < dpm.low_util { low_streak + 1 } else { 0 };
                let r = d.pass(&mut c, &mut m).unwrap();
                pass += 1;
                if let Some(p) = &r.power {
                    if p.action == PowerAction::Standby && c.hosts[p.host.idx()].state == HostState::Standby {
                        prop_assert!(low_streak >= dpm.standby_after_passes, "pass {pass}: standby after {low_streak} low passes");
                        low_streak = 0;
                    }
                    if c.hosts[p.host.idx()].state == match p.action {
                        PowerAction::Standby => HostState::Standby,
                        PowerAction::Wake => HostState::On,
                    } {
                        let opposite = match p.action {
                            PowerAction::Standby => PowerAction::Wake,
                            PowerAction::Wake => PowerAction::Standby,
                        };
                        prop_assert!(!acted_this_level.contains(&(p.host, opposite)),
                            "pass {pass}: {} flapped at constant demand", p.host);
                        acted_this_level.push((p.host, p.action));
                    }
                }
                let on = c.hosts.iter().filter(|h| h.state == HostState::On).count();
                prop_assert!(on >= dpm.min_hosts_on.min(hosts));
                for (h, host) in c.hosts.iter().enumerate() {
                    if host.state == HostState::Standby {
                        prop_assert!(c.vms_on(vsched::HostId(h as u32)).is_empty());
                    }
                }
                prop_assert_eq!(must_violations(&c, &where_is(&c)), 0);
            }
        }
    }
}
