//! The host agent: the sans-I/O core that every host runs.
//!
//! Feed it [`Event`]s (heartbeats received, fence results) and call [`HostAgent::tick`] with the
//! host's own clock; it returns [`Action`]s (heartbeats to send, VMs to start or stop, hosts to
//! fence, decisions to log). Its only window on the world is the [`ClusterStore`] passed to
//! `tick` and the [`Placement`] used when it coordinates. It reads no clock, opens no socket and
//! spawns no thread, so the simulator and the real runtime drive exactly the same code.
//!
//! Safety argument (never two runners): a host runs a VM only while (1) the VM's record names it
//! together with its *current* lease and (2) its [`Watchdog`] deadline, computed from the send
//! time of its last successful lease renewal, has not passed. The coordinator reassigns a VM only
//! when the owner's lease is gone from the store: expired (then the owner's watchdog already
//! fired) or revoked after a confirmed power fence. Starts and shared writes are
//! compare-and-swaps on the record's revision (the fencing token).

mod config;
mod coordinator;
mod types;

pub use config::{AgentError, HaConfig};
pub use types::{Action, Decision, DecisionKind, Event, StopReason};

use std::collections::{BTreeMap, BTreeSet};

use crate::detector::{IsolationDetector, IsolationResponse, PhiDetector};
use crate::fence::{self, FenceError, Watchdog};
use crate::model::{HostId, HostSpec, Keys, VmId};
use crate::restart::Placement;
use crate::store::{ClusterStore, LeaseId, Revision, StoreError};
use crate::view::ClusterView;

#[derive(Debug, Clone)]
struct Peer {
    phi: PhiDetector,
    known_since_ms: u64,
    suspected: bool,
    suspected_since_ms: u64,
}

/// A host agent (see the module docs).
#[derive(Debug)]
pub struct HostAgent {
    cfg: HaConfig,
    spec: HostSpec,
    keys: Keys,
    lease: Option<LeaseId>,
    fenced_lease: Option<LeaseId>,
    watchdog: Watchdog,
    iso: IsolationDetector,
    isolated: bool,
    peers: BTreeMap<HostId, Peer>,
    running: BTreeMap<VmId, Revision>,
    view: ClusterView,
    coordinator: Option<Revision>,
    pending_fences: BTreeMap<HostId, (LeaseId, u64)>,
    fence_results: Vec<(HostId, Result<(), String>)>,
    holdoff_logged: BTreeSet<HostId>,
    fence_requested: BTreeSet<HostId>,
    no_capacity_logged: BTreeSet<VmId>,
    store_down_logged: bool,
    next_heartbeat_ms: u64,
    next_keepalive_ms: u64,
    next_reconcile_ms: u64,
}

impl HostAgent {
    /// A new agent for the host described by `spec`, starting at agent time `now_ms`.
    pub fn new(cfg: HaConfig, spec: HostSpec, keys: Keys, now_ms: u64) -> Result<Self, AgentError> {
        cfg.validate()?;
        let watchdog = Watchdog::new(cfg.watchdog.clone(), cfg.lease_ttl_ms)?;
        let iso = IsolationDetector::new(cfg.isolation_timeout_ms, now_ms);
        Ok(Self {
            cfg,
            spec,
            keys,
            lease: None,
            fenced_lease: None,
            watchdog,
            iso,
            isolated: false,
            peers: BTreeMap::new(),
            running: BTreeMap::new(),
            view: ClusterView::default(),
            coordinator: None,
            pending_fences: BTreeMap::new(),
            fence_results: Vec::new(),
            holdoff_logged: BTreeSet::new(),
            fence_requested: BTreeSet::new(),
            no_capacity_logged: BTreeSet::new(),
            store_down_logged: false,
            next_heartbeat_ms: now_ms,
            next_keepalive_ms: now_ms,
            next_reconcile_ms: now_ms,
        })
    }

    /// This host's id.
    pub fn id(&self) -> HostId {
        self.spec.id
    }
    /// The VMs this host runs, with their fencing tokens.
    pub fn running(&self) -> &BTreeMap<VmId, Revision> {
        &self.running
    }
    /// The current lease, if the host is a member.
    pub fn lease(&self) -> Option<LeaseId> {
        self.lease
    }
    /// Whether this host is the coordinator (as far as it knows).
    pub fn is_coordinator(&self) -> bool {
        self.coordinator.is_some()
    }
    /// The watchdog deadline on the agent clock, if armed.
    pub fn watchdog_deadline_ms(&self) -> Option<u64> {
        self.watchdog.deadline_ms()
    }
    /// The settings.
    pub fn config(&self) -> &HaConfig {
        &self.cfg
    }
    /// Current phi of a peer.
    pub fn phi(&self, peer: HostId, now_ms: u64) -> Option<f64> {
        self.peers.get(&peer).map(|p| p.phi.phi(now_ms))
    }

    fn log(&self, out: &mut Vec<Action>, now: u64, kind: DecisionKind, reason: String) {
        out.push(Action::Log(Decision { at_ms: now, by: self.spec.id, kind, reason }));
    }

    /// Handles an input event.
    pub fn handle(&mut self, now_ms: u64, ev: Event) {
        match ev {
            Event::Heartbeat { from } if from != self.spec.id => {
                let cfg = self.cfg.phi.clone();
                let p = self.peers.entry(from).or_insert_with(|| Peer {
                    phi: PhiDetector::new(cfg),
                    known_since_ms: now_ms,
                    suspected: false,
                    suspected_since_ms: 0,
                });
                if p.phi.suspected(now_ms) {
                    // Back after a failure: forget the gap, or it would slow the next detection.
                    p.phi = PhiDetector::new(self.cfg.phi.clone());
                }
                p.phi.heartbeat(now_ms);
                self.iso.peer_heard(now_ms);
            }
            Event::Heartbeat { .. } => {}
            Event::FenceDone { host, result } => self.fence_results.push((host, result)),
        }
    }

    /// Writes a VM's shared state with this host's fencing token for it. Refused if this host
    /// does not run the VM, its watchdog deadline passed, or the token is stale.
    pub fn write_shared(
        &self,
        now_ms: u64,
        store: &dyn ClusterStore,
        vm: VmId,
        data: Vec<u8>,
    ) -> Result<Revision, FenceError> {
        let Some(&token) = self.running.get(&vm) else {
            return Err(FenceError::StaleToken { vm, token: 0 });
        };
        if self.watchdog.expired(now_ms) || self.lease.is_none() {
            return Err(FenceError::StaleToken { vm, token });
        }
        fence::write_shared(store, &self.keys, vm, token, data)
    }

    fn silent(&self, peer: HostId, now: u64) -> bool {
        match self.peers.get(&peer) {
            None => false,
            Some(p) => match p.phi.last_heartbeat_ms() {
                None => now.saturating_sub(p.known_since_ms) > self.cfg.first_heartbeat_grace_ms,
                Some(_) => p.phi.suspected(now),
            },
        }
    }

    fn self_fence(&mut self, now: u64, why: StopReason, reason: &str, out: &mut Vec<Action>) {
        for (vm, _) in std::mem::take(&mut self.running) {
            out.push(Action::StopVm { vm, reason: why });
            self.log(out, now, DecisionKind::Stopped { vm, why }, reason.to_string());
        }
        self.watchdog.disarm();
        if let Some(l) = self.lease.take() {
            self.fenced_lease = Some(l);
        }
        if self.coordinator.take().is_some() {
            self.log(out, now, DecisionKind::SteppedDown, "self-fenced".into());
        }
        self.log(out, now, DecisionKind::SelfFence, reason.to_string());
    }

    /// Advances the agent to `now_ms` (the host's own clock): watchdog, lease, heartbeats,
    /// isolation, VM assignments and, on the coordinator, fencing and restarts.
    pub fn tick(
        &mut self,
        now_ms: u64,
        store: &dyn ClusterStore,
        placement: &mut dyn Placement,
        out: &mut Vec<Action>,
    ) {
        let now = now_ms;
        self.check_watchdog(now, out);
        if now >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now + self.cfg.heartbeat_interval_ms;
            for m in self.view.members.values().filter(|m| m.spec.id != self.spec.id) {
                out.push(Action::SendHeartbeat { to: m.spec.id, addr: m.spec.addr.clone() });
            }
        }
        let mut store_down = false;
        if self.lease.is_none() {
            self.try_join(now, store, out);
        } else if now >= self.next_keepalive_ms {
            store_down = !self.keep_alive(now, store, out);
        }
        self.check_isolation(now, out);
        // With the store down, skip the reads this tick: stacking request timeouts would delay
        // the next watchdog check.
        if now >= self.next_reconcile_ms && self.lease.is_some() && !store_down {
            self.next_reconcile_ms = now + self.cfg.reconcile_interval_ms;
            match self.view.refresh(store, &self.keys) {
                Ok(()) => {
                    self.store_ok(now);
                    self.learn_peers(now);
                    self.reconcile_vms(now, store, out);
                    self.coordinate(now, store, placement, out);
                }
                Err(e) => self.store_failed(now, &e, out),
            }
        }
    }

    fn store_ok(&mut self, now: u64) {
        self.iso.store_ok(now);
        self.store_down_logged = false;
    }

    fn store_failed(&mut self, now: u64, e: &StoreError, out: &mut Vec<Action>) {
        if let StoreError::LeaseNotFound(_) = e {
            self.self_fence(now, StopReason::LeaseLost, "the store says our lease is gone", out);
        } else if !self.store_down_logged {
            self.store_down_logged = true;
            self.log(out, now, DecisionKind::StoreUnreachable, e.to_string());
        }
    }

    fn try_join(&mut self, now: u64, store: &dyn ClusterStore, out: &mut Vec<Action>) {
        if let Some(old) = self.fenced_lease {
            match store.revoke_lease(old) {
                Ok(()) | Err(StoreError::LeaseNotFound(_)) => self.fenced_lease = None,
                Err(e) => return self.store_failed(now, &e, out),
            }
        }
        let lease = match store.grant_lease(self.cfg.lease_ttl_ms) {
            Ok(l) => l,
            Err(e) => return self.store_failed(now, &e, out),
        };
        let value = match serde_json::to_vec(&self.spec) {
            Ok(v) => v,
            Err(_) => return,
        };
        match store.put(&self.keys.host(self.spec.id), value, Some(lease)) {
            Ok(_) => {
                self.store_ok(now);
                self.lease = Some(lease);
                self.watchdog.renewed(now);
                self.next_keepalive_ms = now + self.cfg.keepalive_interval_ms;
                self.next_reconcile_ms = now;
                self.log(out, now, DecisionKind::Joined { lease: lease.0 }, "lease granted".into());
            }
            Err(e) => {
                let _ = store.revoke_lease(lease);
                self.store_failed(now, &e, out);
            }
        }
    }

    /// Renews the lease; false if the store did not answer.
    fn keep_alive(&mut self, now: u64, store: &dyn ClusterStore, out: &mut Vec<Action>) -> bool {
        let Some(lease) = self.lease else { return true };
        self.next_keepalive_ms = now + self.cfg.keepalive_interval_ms;
        match store.keep_alive(lease) {
            Ok(_) => {
                self.watchdog.renewed(now);
                self.store_ok(now);
                true
            }
            Err(e) => {
                let answered = matches!(e, StoreError::LeaseNotFound(_));
                self.store_failed(now, &e, out);
                answered
            }
        }
    }

    /// The watchdog on its own: stops every VM and gives up the lease if the safe deadline has
    /// passed at `now_ms`. [`HostAgent::tick`] starts with it; a real-time driver should also
    /// call it right after `tick` (whose store calls may have blocked) and before VM I/O.
    pub fn check_watchdog(&mut self, now_ms: u64, out: &mut Vec<Action>) {
        if self.watchdog.expired(now_ms) {
            let why = format!(
                "watchdog: lease not renewed by its safe deadline ({} ms late)",
                now_ms - self.watchdog.deadline_ms().unwrap_or(now_ms)
            );
            self.self_fence(now_ms, StopReason::Watchdog, &why, out);
        }
    }

    fn check_isolation(&mut self, now: u64, out: &mut Vec<Action>) {
        let has_peers = self.view.members.keys().any(|h| *h != self.spec.id) || !self.peers.is_empty();
        let isolated = self.iso.isolated(now, has_peers);
        if isolated == self.isolated {
            return;
        }
        self.isolated = isolated;
        if !isolated {
            self.log(out, now, DecisionKind::IsolationEnded, "heard a peer or the store".into());
            return;
        }
        let why = format!(
            "no peer heartbeat and no store answer for {} ms; response: {:?}",
            self.cfg.isolation_timeout_ms, self.cfg.isolation_response
        );
        self.log(out, now, DecisionKind::Isolated, why.clone());
        match self.cfg.isolation_response {
            IsolationResponse::PowerOff if self.lease.is_some() => {
                self.self_fence(now, StopReason::IsolationPowerOff, &why, out)
            }
            IsolationResponse::Shutdown if self.lease.is_some() => {
                self.self_fence(now, StopReason::IsolationShutdown, &why, out)
            }
            _ => {}
        }
    }

    fn learn_peers(&mut self, now: u64) {
        for id in self.view.members.keys() {
            if *id != self.spec.id && !self.peers.contains_key(id) {
                self.peers.insert(
                    *id,
                    Peer {
                        phi: PhiDetector::new(self.cfg.phi.clone()),
                        known_since_ms: now,
                        suspected: false,
                        suspected_since_ms: 0,
                    },
                );
            }
        }
    }

    fn reconcile_vms(&mut self, now: u64, store: &dyn ClusterStore, out: &mut Vec<Action>) {
        let Some(lease) = self.lease else { return };
        let me = self.spec.id;
        let stale: Vec<VmId> = self
            .running
            .iter()
            .filter(|(vm, tok)| {
                self.view.vms.get(vm).is_none_or(|e| {
                    e.record.owner != Some(me) || e.record.owner_lease != Some(lease) || e.token != **tok
                })
            })
            .map(|(vm, _)| *vm)
            .collect();
        for vm in stale {
            self.running.remove(&vm);
            out.push(Action::StopVm { vm, reason: StopReason::Reassigned });
            let why = StopReason::Reassigned;
            self.log(out, now, DecisionKind::Stopped { vm, why }, "record no longer names us".into());
        }
        let mine: Vec<(VmId, Revision)> = self
            .view
            .vms
            .values()
            .filter(|e| e.record.owner == Some(me) && e.record.owner_lease == Some(lease))
            .filter(|e| !self.running.contains_key(&e.record.spec.id))
            .map(|e| (e.record.spec.id, e.token))
            .collect();
        for (vm, token) in mine {
            if self.watchdog.expired(now) {
                return;
            }
            match fence::start_vm(store, &self.keys, vm, token, lease, &me.to_string()) {
                Ok(_) => {
                    self.running.insert(vm, token);
                    out.push(Action::StartVm { vm, token });
                    self.log(out, now, DecisionKind::Started { vm, token }, "assigned to us".into());
                }
                Err(FenceError::StaleToken { .. }) => {
                    self.log(out, now, DecisionKind::StartRefused { vm }, "token stale".into())
                }
                Err(FenceError::Store { source, .. }) => {
                    return self.store_failed(now, &source, out);
                }
                Err(_) => {}
            }
        }
    }
}
