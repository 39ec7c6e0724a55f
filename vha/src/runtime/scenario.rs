//! Failure scenarios on a process cluster, with the timeline and figures they produce.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::{ClusterHarness, PartitionMechanism, Report, ReportLine, RuntimeError, unix_ms};
use crate::agent::DecisionKind;
use crate::model::{HostId, Priority, VmId};

/// What happens to the victim host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scenario {
    /// `kill -9` the host agent process.
    Kill,
    /// Isolate the host (heartbeats, store and power control); it must fence itself.
    Partition,
    /// `SIGSTOP` the host agent past its lease, then `SIGCONT` it: the zombie must not run or
    /// write for its VMs.
    Stop,
}

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TimelineEntry {
    /// Milliseconds relative to the fault (negative: before).
    pub at_ms: i64,
    /// Host that reported it.
    pub host: HostId,
    /// What happened.
    pub what: String,
}

/// What became of one of the victim's VMs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VmOutcome {
    /// The VM.
    pub vm: VmId,
    /// Its restart priority.
    pub priority: Priority,
    /// New host.
    pub to: Option<HostId>,
    /// When the coordinator reassigned it (ms after the fault).
    pub restart_begun_ms: Option<u64>,
    /// When it ran again (ms after the fault).
    pub running_ms: Option<u64>,
}

/// The result of a scenario.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Outcome {
    /// The scenario.
    pub scenario: Scenario,
    /// The host that failed.
    pub victim: HostId,
    /// Unix time of the fault in ms (timeline entries are relative to it).
    pub fault_unix_ms: u64,
    /// The coordinator at the fault.
    pub coordinator: Option<HostId>,
    /// Events from shortly before the fault on.
    pub timeline: Vec<TimelineEntry>,
    /// The victim's protected VMs.
    pub vms: Vec<VmOutcome>,
    /// Last heartbeat from the victim seen by the coordinator (ms relative to the fault).
    pub last_heartbeat_ms: Option<i64>,
    /// Fault to suspicion by the coordinator.
    pub detection_ms: Option<u64>,
    /// Fault to fence (power fence confirmed, or the victim's self-fence).
    pub fence_ms: Option<u64>,
    /// Fault to first restart begun (host death to restart begun).
    pub first_restart_ms: Option<u64>,
    /// Fault to every protected VM running again.
    pub all_running_ms: Option<u64>,
    /// Shared-state writes the store accepted from a VM's previous host after its new host had
    /// written (split brain at the data level; must be 0).
    pub stale_writes_accepted: u64,
    /// Writes from the victim the store refused for a stale fencing token.
    pub victim_writes_refused: u64,
    /// VMs that ran on two live hosts at once according to the reports (must be 0).
    pub double_runs: u64,
    /// How the partition was made (partition scenario only).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionMechanism>,
}

fn rel(t: u64, t0: u64) -> i64 {
    t as i64 - t0 as i64
}

fn after(t: u64, t0: u64) -> u64 {
    t.saturating_sub(t0)
}

/// Runs `scenario` on a cluster whose VMs are running: picks a victim (not the coordinator, with
/// the most VMs), injects the fault, waits until its protected VMs run elsewhere and returns
/// the outcome.
pub fn run_scenario(h: &mut ClusterHarness, scenario: Scenario) -> Result<Outcome, RuntimeError> {
    h.collect_for(1000);
    let coordinator = h.coordinator();
    let running = h.running();
    let victim = match (scenario, h.netns_host()) {
        // The host in its own network namespace, which started after the coordinator's election.
        (Scenario::Partition, Some(v)) if Some(v) != coordinator => v,
        _ => (0..h.hosts() as u32)
            .map(HostId)
            .filter(|x| Some(*x) != coordinator)
            .max_by_key(|x| (running.values().filter(|hs| hs.contains(x)).count(), std::cmp::Reverse(*x)))
            .ok_or(RuntimeError::Config("no victim".into()))?,
    };
    let prio: BTreeMap<VmId, Priority> = h.vms().iter().map(|v| (v.id, v.priority)).collect();
    let lost: Vec<VmId> = running
        .iter()
        .filter(|(vm, hs)| hs.contains(&victim) && prio.get(vm).is_some_and(|p| *p != Priority::Disabled))
        .map(|(vm, _)| *vm)
        .collect();
    let t0 = unix_ms();
    match scenario {
        Scenario::Kill => h.kill(victim)?,
        Scenario::Partition => h.partition(victim, true)?,
        Scenario::Stop => h.signal(victim, "STOP")?,
    }
    let start_idx = h.reports.len();
    let restarted = |rs: &[ReportLine]| {
        lost.iter().all(|vm| {
            rs[start_idx..]
                .iter()
                .any(|r| r.host != victim && matches!(r.report, Report::Started { vm: v, .. } if v == *vm))
        })
    };
    h.wait_until(30_000, "the victim's VMs to run elsewhere", |rs| restarted(rs))?;
    let mut woke_at = None;
    match scenario {
        Scenario::Kill => h.collect_for(500),
        Scenario::Partition => {
            h.wait_until(10_000, "the isolated host to fence itself", |rs| {
                rs.iter().any(|r| {
                    r.host == victim
                        && matches!(&r.report, Report::Decision(d) if d.kind == DecisionKind::SelfFence)
                })
            })?;
            h.collect_for(500);
        }
        Scenario::Stop => {
            h.collect_for(500);
            woke_at = Some(unix_ms());
            h.signal(victim, "CONT")?;
            h.collect_for(2000);
        }
    }
    let mut out = summarize(h, scenario, victim, coordinator, t0, &lost, &prio);
    if scenario == Scenario::Partition {
        out.partition = Some(h.partition_mechanism(victim));
    }
    if let Some(w) = woke_at {
        out.timeline.push(TimelineEntry {
            at_ms: rel(w, t0),
            host: victim,
            what: "SIGCONT: the zombie wakes up".into(),
        });
        out.timeline.sort_by_key(|e| e.at_ms);
    }
    Ok(out)
}

fn summarize(
    h: &ClusterHarness,
    scenario: Scenario,
    victim: HostId,
    coordinator: Option<HostId>,
    t0: u64,
    lost: &[VmId],
    prio: &BTreeMap<VmId, Priority>,
) -> Outcome {
    let mut timeline = vec![TimelineEntry {
        at_ms: 0,
        host: victim,
        what: match scenario {
            Scenario::Kill => "kill -9 (host dies)".into(),
            Scenario::Partition => match h.partition_mechanism(victim) {
                PartitionMechanism::Netns => {
                    "isolated: veth link down (no heartbeats, no store, no power control)".into()
                }
                PartitionMechanism::FlagFile => {
                    "isolated (emulated by a flag file): no heartbeats, no store, no power control".into()
                }
            },
            Scenario::Stop => "SIGSTOP (host agent frozen)".into(),
        },
    }];
    let mut o = Outcome {
        scenario,
        victim,
        fault_unix_ms: t0,
        coordinator,
        timeline: Vec::new(),
        vms: Vec::new(),
        last_heartbeat_ms: None,
        detection_ms: None,
        fence_ms: None,
        first_restart_ms: None,
        all_running_ms: None,
        stale_writes_accepted: 0,
        victim_writes_refused: 0,
        double_runs: 0,
        partition: None,
    };
    let mut vmo: BTreeMap<VmId, VmOutcome> = lost
        .iter()
        .map(|vm| {
            (
                *vm,
                VmOutcome { vm: *vm, priority: prio[vm], to: None, restart_begun_ms: None, running_ms: None },
            )
        })
        .collect();
    for r in h.reports.iter().filter(|r| r.unix_ms + 100 >= t0) {
        let t = r.unix_ms;
        let line = |what: String| TimelineEntry { at_ms: rel(t, t0), host: r.host, what };
        match &r.report {
            Report::Decision(d) => match &d.kind {
                DecisionKind::Suspect { peer, last_heartbeat_ms, .. } if *peer == victim => {
                    if o.detection_ms.is_none() {
                        o.detection_ms = Some(after(t, t0));
                        o.last_heartbeat_ms = last_heartbeat_ms.map(|l| rel(l, t0));
                        if let Some(l) = last_heartbeat_ms {
                            timeline.push(TimelineEntry {
                                at_ms: rel(*l, t0),
                                host: r.host,
                                what: format!("last heartbeat from {victim} received"),
                            });
                        }
                    }
                    timeline.push(line(format!("suspects {victim}: {}", d.reason)));
                }
                DecisionKind::FenceConfirmed { peer } if *peer == victim => {
                    o.fence_ms.get_or_insert(after(t, t0));
                    timeline.push(line(format!("fenced {victim}: {}", d.reason)));
                }
                DecisionKind::SelfFence if r.host == victim => {
                    o.fence_ms.get_or_insert(after(t, t0));
                    timeline.push(line(format!("self-fence: {}", d.reason)));
                }
                DecisionKind::Restart { vm, to, token, .. } => {
                    if let Some(v) = vmo.get_mut(vm) {
                        v.restart_begun_ms.get_or_insert(after(t, t0));
                        v.to = Some(*to);
                    }
                    o.first_restart_ms =
                        Some(o.first_restart_ms.map_or(after(t, t0), |f| f.min(after(t, t0))));
                    timeline.push(line(format!("restart {vm} on {to} (token {token}): {}", d.reason)));
                }
                DecisionKind::Fence { peer } => {
                    timeline.push(line(format!("power-fence {peer} requested: {}", d.reason)));
                }
                DecisionKind::Suspect { .. }
                | DecisionKind::Recovered { .. }
                | DecisionKind::Started { .. }
                | DecisionKind::Stopped { .. } => {}
                DecisionKind::Joined { .. } if t < t0 => {}
                DecisionKind::Elected { .. } if t < t0 => {}
                _ if t >= t0 => timeline.push(line(format!("{:?}: {}", d.kind, d.reason))),
                _ => {}
            },
            Report::Started { vm, token } if t >= t0 => {
                if let Some(v) = vmo.get_mut(vm)
                    && r.host != victim
                {
                    v.running_ms.get_or_insert(after(t, t0));
                }
                timeline.push(line(format!("started {vm} (token {token})")));
            }
            Report::Stopped { vm, reason } if t >= t0 => {
                timeline.push(line(format!("stopped {vm} ({reason:?})")))
            }
            Report::SharedWrite { stale_token: true, .. } if r.host == victim && t >= t0 => {
                o.victim_writes_refused += 1
            }
            _ => {}
        }
    }
    // Data-level split brain: once a VM's new host wrote, no write from another host may land.
    let mut last_writer: BTreeMap<VmId, HostId> = BTreeMap::new();
    let mut retired: BTreeMap<VmId, BTreeSet<HostId>> = BTreeMap::new();
    let mut writes: Vec<&ReportLine> =
        h.reports.iter().filter(|r| matches!(r.report, Report::SharedWrite { ok: true, .. })).collect();
    writes.sort_by_key(|r| r.unix_ms);
    for r in writes {
        let Report::SharedWrite { vm, .. } = r.report else {
            continue;
        };
        if retired.get(&vm).is_some_and(|s| s.contains(&r.host)) {
            o.stale_writes_accepted += 1;
        }
        if let Some(prev) = last_writer.insert(vm, r.host)
            && prev != r.host
        {
            retired.entry(vm).or_default().insert(prev);
        }
    }
    // Double runs among live hosts (a killed host's VMs died with it).
    for (_, hs) in h.running() {
        let live: Vec<_> = hs.iter().filter(|x| !(scenario == Scenario::Kill && **x == victim)).collect();
        if live.len() > 1 {
            o.double_runs += 1;
        }
    }
    o.vms = vmo.into_values().collect();
    o.all_running_ms =
        o.vms.iter().map(|v| v.running_ms).collect::<Option<Vec<_>>>().and_then(|v| v.into_iter().max());
    timeline.sort_by_key(|e| e.at_ms);
    o.timeline = timeline;
    o
}
