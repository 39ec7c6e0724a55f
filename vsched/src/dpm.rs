//! Distributed power management: put hosts in standby when demand is low, wake them when it
//! rises, with hysteresis.
//!
//! Utilization is the larger of CPU and memory demand (capped by limits, at least the
//! reservation) over the capacity of powered-on hosts. A host goes to standby only after
//! `standby_after_passes` consecutive passes below `low_util`, only if the remaining hosts stay
//! below `target_util` (below `high_util`, so the next pass does not wake it again), and only if
//! all its VMs can be evacuated. A standby host is woken after `wake_after_passes` consecutive
//! passes above `high_util`.

use serde::{Deserialize, Serialize};

use crate::balance::{Planner, Reason};
use crate::model::{Cluster, HostId, HostState};

/// Power management settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DpmConfig {
    /// Recommend power actions at all.
    pub enabled: bool,
    /// Utilization below which hosts may go to standby.
    pub low_util: f64,
    /// Utilization above which a standby host is woken.
    pub high_util: f64,
    /// Utilization the remaining hosts must stay below after a standby.
    pub target_util: f64,
    /// Consecutive low passes before a standby.
    pub standby_after_passes: u32,
    /// Consecutive high passes before a wake-up.
    pub wake_after_passes: u32,
    /// Never go below this many powered-on hosts.
    pub min_hosts_on: usize,
}

impl Default for DpmConfig {
    fn default() -> Self {
        DpmConfig {
            enabled: false,
            low_util: 0.45,
            high_util: 0.81,
            target_util: 0.63,
            standby_after_passes: 3,
            wake_after_passes: 1,
            min_hosts_on: 2,
        }
    }
}

/// A bad power management setting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DpmError {
    /// The utilization levels are not `0 < low < target < high <= 1`.
    #[error("utilization levels must satisfy 0 < low_util < target_util < high_util <= 1")]
    Levels,
}

impl DpmConfig {
    /// Checks the levels.
    pub fn validate(&self) -> Result<(), DpmError> {
        let ok = 0.0 < self.low_util
            && self.low_util < self.target_util
            && self.target_util < self.high_util
            && self.high_util <= 1.0;
        if ok { Ok(()) } else { Err(DpmError::Levels) }
    }
}

/// Streak counters carried between passes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DpmState {
    /// Consecutive passes below `low_util`.
    pub low_streak: u32,
    /// Consecutive passes above `high_util`.
    pub high_streak: u32,
}

/// A power recommendation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PowerAction {
    /// Put the host in standby (after its evacuation moves).
    Standby,
    /// Wake the host from standby.
    Wake,
}

/// A power recommendation with its expected effect.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PowerRec {
    /// The host.
    pub host: HostId,
    /// What to do.
    pub action: PowerAction,
    /// Utilization of powered-on hosts before.
    pub util_before: f64,
    /// Utilization of powered-on hosts after.
    pub util_after: f64,
}

/// Utilization of powered-on hosts: max over CPU and memory of wanted / capacity.
pub fn utilization(cluster: &Cluster) -> f64 {
    let cap = cluster.on_capacity();
    let (mut c, mut m) = (0u64, 0u64);
    for v in cluster.vms.iter().filter(|v| v.host.is_some()) {
        let w = v.wanted();
        c += w.cpu_mhz;
        m += w.mem_mib;
    }
    util(c, m, cap.cpu_mhz, cap.mem_mib)
}

fn util(c: u64, m: u64, cc: u64, cm: u64) -> f64 {
    if cc == 0 || cm == 0 {
        return f64::INFINITY;
    }
    (c as f64 / cc as f64).max(m as f64 / cm as f64)
}

/// Plans at most one power action on top of a planned pass (`planner` holds the state after the
/// pass's moves); updates the streaks. A standby's evacuation moves are appended to the
/// planner's moves with [`Reason::Standby`].
pub(crate) fn plan_power(
    planner: &mut Planner<'_>,
    cfg: &DpmConfig,
    state: &mut DpmState,
) -> Option<PowerRec> {
    if !cfg.enabled {
        return None;
    }
    let cluster = planner.cluster;
    let u = utilization(cluster);
    if u < cfg.low_util {
        state.low_streak += 1;
    } else {
        state.low_streak = 0;
    }
    if u > cfg.high_util {
        state.high_streak += 1;
    } else {
        state.high_streak = 0;
    }
    let cap = cluster.on_capacity();
    let (dc, dm) = cluster.vms.iter().filter(|v| v.host.is_some()).fold((0, 0), |(c, m), v| {
        let w = v.wanted();
        (c + w.cpu_mhz, m + w.mem_mib)
    });
    if state.high_streak >= cfg.wake_after_passes {
        // Wake the largest standby host.
        let best = cluster
            .hosts
            .iter()
            .enumerate()
            .filter(|(_, h)| h.state == HostState::Standby)
            .max_by_key(|(i, h)| (h.mem_mib + h.cpu_mhz, std::cmp::Reverse(*i)))?;
        state.high_streak = 0;
        let h = best.1;
        return Some(PowerRec {
            host: HostId(best.0 as u32),
            action: PowerAction::Wake,
            util_before: u,
            util_after: util(dc, dm, cap.cpu_mhz + h.cpu_mhz, cap.mem_mib + h.mem_mib),
        });
    }
    if state.low_streak < cfg.standby_after_passes {
        return None;
    }
    let on: Vec<usize> = (0..cluster.hosts.len())
        .filter(|&h| cluster.hosts[h].state == HostState::On && planner.ledger.on[h])
        .collect();
    if on.len() <= cfg.min_hosts_on {
        return None;
    }
    // Candidates: fewest VMs, then smallest load, then id; try a few.
    let mut cands: Vec<(usize, u64, usize)> = on
        .iter()
        .map(|&h| {
            let l = planner.ledger.host_load[h];
            (planner.ledger.host_vms[h].len(), l.mem_mib + l.cpu_mhz, h)
        })
        .collect();
    cands.sort_unstable();
    for &(_, _, h) in cands.iter().take(3) {
        let host = &cluster.hosts[h];
        let after = util(dc, dm, cap.cpu_mhz - host.cpu_mhz, cap.mem_mib - host.mem_mib);
        if after >= cfg.target_util {
            continue;
        }
        let hid = HostId(h as u32);
        let (m0, b0) = (planner.moves.len(), planner.blocked.len());
        planner.ledger.set_on(hid, false);
        planner.evacuate(hid, Reason::Standby { host: hid });
        if planner.blocked.len() == b0 {
            state.low_streak = 0;
            return Some(PowerRec {
                host: hid,
                action: PowerAction::Standby,
                util_before: u,
                util_after: after,
            });
        }
        // Could not empty it: undo and try the next candidate.
        for m in planner.moves[m0..].iter().rev() {
            planner.ledger.apply(m.vm, m.from);
            planner.moved[m.vm.idx()] = false;
        }
        planner.moves.truncate(m0);
        planner.blocked.truncate(b0);
        planner.ledger.set_on(hid, true);
    }
    None
}
