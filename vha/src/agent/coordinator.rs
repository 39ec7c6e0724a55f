//! Coordinator duties: election through the store, suspicion, fencing with fence-storm
//! protection, and restarts.

use super::{Action, DecisionKind, HostAgent};
use crate::model::{HostId, VmRecord};
use crate::restart::{Placement, host_views, orphans};
use crate::store::{ClusterStore, Compare, StoreError, Txn, TxnOp};

impl HostAgent {
    pub(super) fn coordinate(
        &mut self,
        now: u64,
        store: &dyn ClusterStore,
        placement: &mut dyn Placement,
        out: &mut Vec<Action>,
    ) {
        let Some(lease) = self.lease else { return };
        let me = self.spec.id;
        // Election / verification through the store.
        let key = self.keys.coordinator();
        match store.get(&key) {
            Ok(Some(kv)) if kv.lease == Some(lease) => {
                if self.coordinator != Some(kv.mod_revision) {
                    self.coordinator = Some(kv.mod_revision);
                    let t = kv.mod_revision;
                    self.log(
                        out,
                        now,
                        DecisionKind::Elected { token: t },
                        "holds the coordinator key".into(),
                    );
                }
            }
            Ok(Some(_)) => {
                if self.coordinator.take().is_some() {
                    self.log(out, now, DecisionKind::SteppedDown, "coordinator key held by another".into());
                }
                return;
            }
            Ok(None) => {
                let txn = Txn::new().when(Compare::absent(&key)).and_then(TxnOp::Put {
                    key: key.clone(),
                    value: me.to_string().into_bytes(),
                    lease: Some(lease),
                });
                match store.txn(txn) {
                    Ok(r) if r.succeeded => {
                        self.coordinator = Some(r.revision);
                        let why = "coordinator key was free".to_string();
                        self.log(out, now, DecisionKind::Elected { token: r.revision }, why);
                    }
                    Ok(_) => return,
                    Err(e) => return self.store_failed(now, &e, out),
                }
            }
            Err(e) => return self.store_failed(now, &e, out),
        }
        let Some(ctoken) = self.coordinator else {
            return;
        };

        // Suspicion transitions, for every live member.
        let members: Vec<HostId> = self.view.members.keys().copied().filter(|h| *h != me).collect();
        let mut silent = Vec::new();
        for h in &members {
            let s = self.silent(*h, now);
            if s {
                silent.push(*h);
            }
            let Some(p) = self.peers.get(h) else { continue };
            if s != p.suspected {
                let (phi, last) = (p.phi.phi(now), p.phi.last_heartbeat_ms());
                if let Some(p) = self.peers.get_mut(h) {
                    p.suspected = s;
                    p.suspected_since_ms = now;
                }
                if s {
                    let why = format!(
                        "phi {:.1} > {} (last heartbeat {} ms ago)",
                        phi.min(999.0),
                        self.cfg.phi.threshold,
                        last.map_or(now, |l| now.saturating_sub(l))
                    );
                    let k = DecisionKind::Suspect { peer: *h, phi: phi.min(999.0), last_heartbeat_ms: last };
                    self.log(out, now, k, why);
                } else {
                    self.holdoff_logged.remove(h);
                    self.fence_requested.remove(h);
                    self.log(out, now, DecisionKind::Recovered { peer: *h }, "heartbeats resumed".into());
                }
            }
        }

        // Fence results: a confirmed fence lets us revoke the victim's lease at once.
        for (h, result) in std::mem::take(&mut self.fence_results) {
            let Some((victim_lease, _)) = self.pending_fences.remove(&h) else {
                continue;
            };
            match result {
                Ok(()) => {
                    match store.revoke_lease(victim_lease) {
                        Ok(()) | Err(StoreError::LeaseNotFound(_)) => {}
                        Err(e) => {
                            // Retry the revoke on the next round.
                            self.pending_fences.insert(h, (victim_lease, now));
                            self.fence_results.push((h, Ok(())));
                            return self.store_failed(now, &e, out);
                        }
                    }
                    let why = format!("power fence confirmed; revoked lease {}", victim_lease.0);
                    self.log(out, now, DecisionKind::FenceConfirmed { peer: h }, why);
                    self.view.members.remove(&h);
                }
                Err(e) => {
                    let why = format!("{e}; waiting for its lease to expire (watchdog)");
                    self.log(out, now, DecisionKind::FenceFailed { peer: h }, why);
                }
            }
        }
        let timeout = self.cfg.fence_timeout_ms;
        let timed_out: Vec<HostId> = self
            .pending_fences
            .iter()
            .filter(|(_, (_, at))| now.saturating_sub(*at) > timeout)
            .map(|(h, _)| *h)
            .collect();
        for h in timed_out {
            self.pending_fences.remove(&h);
            let why = format!("no answer in {timeout} ms; waiting for its lease to expire (watchdog)");
            self.log(out, now, DecisionKind::FenceFailed { peer: h }, why);
        }

        // Fencing decisions, with fence-storm protection: when more hosts are silent than may
        // be fenced at once, every one of them is held off until it is heard again (or its
        // lease expires), even if the others come back first.
        // A coordinator that hears fewer than half of its peers may itself be the cut-off one
        // (always the case to consider in a two-host cluster): it does not power-fence either.
        let heard = members.len() - silent.len();
        let minority = heard * 2 < members.len();
        let storm = silent.len() > self.cfg.max_concurrent_fences;
        for h in &silent {
            let Some(m) = self.view.members.get(h) else {
                continue;
            };
            if self.pending_fences.contains_key(h) || self.fence_requested.contains(h) {
                continue;
            }
            let settled = self
                .peers
                .get(h)
                .is_some_and(|p| now.saturating_sub(p.suspected_since_ms) >= self.cfg.fence_settle_ms);
            if storm || minority || !self.cfg.power_fencing {
                if self.holdoff_logged.insert(*h) {
                    let why = if storm {
                        format!(
                            "{} hosts silent at once (> {}): network event, not fencing; {h} still \
                             holds its store lease, its VMs restart only if the lease expires",
                            silent.len(),
                            self.cfg.max_concurrent_fences
                        )
                    } else if minority {
                        format!(
                            "this coordinator hears only {heard} of {} peers and may be the \
                             isolated one: not fencing; {h}'s VMs restart only if its lease expires",
                            members.len()
                        )
                    } else {
                        "power fencing disabled; waiting for its lease to expire (watchdog)".to_string()
                    };
                    self.log(out, now, DecisionKind::HoldOff { peer: *h }, why);
                }
            } else if settled && !self.holdoff_logged.contains(h) {
                self.fence_requested.insert(*h);
                self.pending_fences.insert(*h, (m.lease, now));
                out.push(Action::Fence { host: m.spec.clone() });
                let why = format!(
                    "suspected for {} ms, {} of {} peers silent (<= {}): power fence before \
                     restarting its VMs",
                    self.cfg.fence_settle_ms,
                    silent.len(),
                    members.len(),
                    self.cfg.max_concurrent_fences
                );
                self.log(out, now, DecisionKind::Fence { peer: *h }, why);
            }
        }

        // Restarts: VMs whose owner's lease is gone.
        let candidates: Vec<HostId> = self
            .view
            .members
            .keys()
            .copied()
            .filter(|h| *h == me || (!silent.contains(h) && !self.pending_fences.contains_key(h)))
            .collect();
        let mut hosts = host_views(&self.view, &candidates);
        for (vm, token) in orphans(&self.view) {
            let Some(entry) = self.view.vms.get(&vm) else {
                continue;
            };
            let spec = entry.record.spec.clone();
            let from = entry.record.owner;
            let Some(to) = placement.place(&spec, &hosts, true) else {
                if self.no_capacity_logged.insert(vm) {
                    let why = format!("no live host has {} MHz / {} MiB free", spec.cpu_mhz, spec.mem_mib);
                    self.log(out, now, DecisionKind::NoCapacity { vm }, why);
                }
                continue;
            };
            let Some(m) = self.view.members.get(&to) else {
                continue;
            };
            let rec = VmRecord {
                spec: spec.clone(),
                owner: Some(to),
                owner_lease: Some(m.lease),
                restarts: entry.record.restarts + 1,
            };
            let Ok(value) = serde_json::to_vec(&rec) else {
                continue;
            };
            let txn = Txn::new()
                .when(Compare::mod_rev(&key, ctoken))
                .when(Compare::mod_rev(self.keys.vm(vm), token))
                .when(Compare::mod_rev(self.keys.host(to), m.mod_revision))
                .and_then(TxnOp::Put { key: self.keys.vm(vm), value, lease: None });
            match store.txn(txn) {
                Ok(r) if r.succeeded => {
                    self.no_capacity_logged.remove(&vm);
                    if let Some(hv) = hosts.iter_mut().find(|x| x.spec.id == to) {
                        hv.used_cpu_mhz += spec.cpu_mhz;
                        hv.used_mem_mib += spec.mem_mib;
                    }
                    let why = match from {
                        Some(f) => format!(
                            "{f}'s lease is gone (expired or revoked after fence); priority {:?}",
                            spec.priority
                        ),
                        None => "unplaced".to_string(),
                    };
                    let k = DecisionKind::Restart { vm, from, to, token: r.revision };
                    self.log(out, now, k, why);
                }
                Ok(_) => {}
                Err(e) => return self.store_failed(now, &e, out),
            }
        }
    }
}
