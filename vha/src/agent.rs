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

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use crate::detector::{IsolationDetector, IsolationResponse, PhiConfig, PhiDetector};
use crate::fence::{self, FenceError, Watchdog, WatchdogConfig};
use crate::model::{HostId, HostSpec, Keys, VmId, VmRecord};
use crate::restart::{Placement, host_views, orphans};
use crate::store::{ClusterStore, Compare, LeaseId, Revision, StoreError, Txn, TxnOp};
use crate::view::ClusterView;

/// Settings of a host agent. The defaults detect a dead host in well under a second on a LAN
/// and begin its VMs' restart right after a confirmed fence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HaConfig {
    /// Heartbeat period in ms.
    pub heartbeat_interval_ms: u64,
    /// Phi accrual settings (threshold 8 by default).
    pub phi: PhiConfig,
    /// Lease TTL in ms (etcd rounds up to whole seconds).
    pub lease_ttl_ms: u64,
    /// Lease renewal period in ms.
    pub keepalive_interval_ms: u64,
    /// Period of store reads (VM assignments, membership, coordinator duties) in ms.
    pub reconcile_interval_ms: u64,
    /// Silence on both channels (peers and store) after which a host declares itself isolated.
    pub isolation_timeout_ms: u64,
    /// What an isolated host does with its VMs.
    pub isolation_response: IsolationResponse,
    /// Self-fencing margins.
    pub watchdog: WatchdogConfig,
    /// Whether the coordinator may power-fence a silent host (otherwise it waits for the host's
    /// lease to expire, which the watchdog makes safe).
    pub power_fencing: bool,
    /// At most this many hosts are power-fenced at once. When more hosts fall silent together,
    /// it is treated as a network event: hosts still holding their store lease are not fenced.
    pub max_concurrent_fences: usize,
    /// A silent host is fenced only after being suspected this long, so that hosts falling
    /// silent together (a switch blip) are seen together and recognized as a network event.
    pub fence_settle_ms: u64,
    /// A fence request without an answer after this long counts as failed.
    pub fence_timeout_ms: u64,
    /// A member that never sent a heartbeat is suspected after this long.
    pub first_heartbeat_grace_ms: u64,
}

impl Default for HaConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 200,
            phi: PhiConfig::default(),
            lease_ttl_ms: 2000,
            keepalive_interval_ms: 400,
            reconcile_interval_ms: 100,
            isolation_timeout_ms: 1000,
            isolation_response: IsolationResponse::PowerOff,
            watchdog: WatchdogConfig::default(),
            power_fencing: true,
            max_concurrent_fences: 1,
            fence_settle_ms: 300,
            fence_timeout_ms: 3000,
            first_heartbeat_grace_ms: 2000,
        }
    }
}

/// Errors of the agent module.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AgentError {
    /// A setting is out of range.
    #[error("invalid HA setting {field}: {reason}")]
    Invalid {
        /// The offending field.
        field: &'static str,
        /// Why.
        reason: &'static str,
    },
    /// The detector settings are invalid.
    #[error(transparent)]
    Detector(#[from] crate::detector::DetectorError),
    /// The watchdog settings are invalid.
    #[error(transparent)]
    Watchdog(#[from] FenceError),
}

impl HaConfig {
    /// Checks every field.
    pub fn validate(&self) -> Result<(), AgentError> {
        let bad = |field, reason| Err(AgentError::Invalid { field, reason });
        self.phi.validate()?;
        Watchdog::new(self.watchdog.clone(), self.lease_ttl_ms)?;
        if self.heartbeat_interval_ms == 0 {
            return bad("heartbeat_interval_ms", "must be > 0");
        }
        if self.reconcile_interval_ms == 0 {
            return bad("reconcile_interval_ms", "must be > 0");
        }
        if self.keepalive_interval_ms == 0 || self.keepalive_interval_ms * 3 > self.lease_ttl_ms {
            return bad(
                "keepalive_interval_ms",
                "must be > 0 and at most a third of the lease TTL",
            );
        }
        if self.isolation_timeout_ms == 0 {
            return bad("isolation_timeout_ms", "must be > 0");
        }
        if self.max_concurrent_fences == 0 && self.power_fencing {
            return bad(
                "max_concurrent_fences",
                "must be >= 1 when power fencing is on",
            );
        }
        Ok(())
    }
}

/// Why a VM was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The lease could not be renewed before the watchdog deadline.
    Watchdog,
    /// The store says the lease is gone.
    LeaseLost,
    /// Host isolation response: power off.
    IsolationPowerOff,
    /// Host isolation response: clean shutdown.
    IsolationShutdown,
    /// The VM was assigned to another host (or deleted).
    Reassigned,
}

/// Input to the agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A heartbeat from a peer arrived.
    Heartbeat {
        /// Sender.
        from: HostId,
    },
    /// A fence requested by [`Action::Fence`] finished.
    FenceDone {
        /// The fenced host.
        host: HostId,
        /// `Ok` if the host is confirmed off, else the agent's error text.
        result: Result<(), String>,
    },
}

/// Output of the agent, for its driver to carry out.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send a heartbeat to a peer.
    SendHeartbeat {
        /// Receiver.
        to: HostId,
        /// Where it listens (from its published spec; empty in simulation).
        addr: String,
    },
    /// Start a VM; `token` is its fencing token.
    StartVm {
        /// The VM.
        vm: VmId,
        /// Fencing token the start was claimed with.
        token: Revision,
    },
    /// Stop a VM now.
    StopVm {
        /// The VM.
        vm: VmId,
        /// Why.
        reason: StopReason,
    },
    /// Power-fence a host through the [`fence::FenceAgent`], then report [`Event::FenceDone`].
    Fence {
        /// The host to fence.
        host: HostSpec,
    },
    /// A decision worth recording.
    Log(Decision),
}

/// What was decided.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind")]
pub enum DecisionKind {
    /// Joined the cluster with a new lease.
    Joined {
        /// The lease.
        lease: i64,
    },
    /// Won the coordinator election.
    Elected {
        /// Coordinator token.
        token: Revision,
    },
    /// Lost the coordinator role.
    SteppedDown,
    /// A peer's phi crossed the threshold.
    Suspect {
        /// The peer.
        peer: HostId,
        /// Its phi.
        phi: f64,
        /// Time of its last heartbeat (agent clock), if any.
        last_heartbeat_ms: Option<u64>,
    },
    /// A suspected peer was heard again.
    Recovered {
        /// The peer.
        peer: HostId,
    },
    /// Asked the fence agent to power a peer off.
    Fence {
        /// The peer.
        peer: HostId,
    },
    /// The fence was confirmed and the peer's lease revoked.
    FenceConfirmed {
        /// The peer.
        peer: HostId,
    },
    /// The fence failed; restart waits for lease expiry.
    FenceFailed {
        /// The peer.
        peer: HostId,
    },
    /// Not fencing a silent peer (fence-storm protection or no power fencing).
    HoldOff {
        /// The peer.
        peer: HostId,
    },
    /// This host is isolated.
    Isolated,
    /// Isolation ended.
    IsolationEnded,
    /// This host stopped all its VMs and gave up its lease.
    SelfFence,
    /// A VM was reassigned to a new host (restart begun).
    Restart {
        /// The VM.
        vm: VmId,
        /// Previous owner.
        from: Option<HostId>,
        /// New owner.
        to: HostId,
        /// New fencing token.
        token: Revision,
    },
    /// No host can take an orphaned VM now.
    NoCapacity {
        /// The VM.
        vm: VmId,
    },
    /// This host started a VM.
    Started {
        /// The VM.
        vm: VmId,
        /// Its fencing token.
        token: Revision,
    },
    /// This host stopped a VM.
    Stopped {
        /// The VM.
        vm: VmId,
        /// Why.
        why: StopReason,
    },
    /// The store refused a start (stale token).
    StartRefused {
        /// The VM.
        vm: VmId,
    },
    /// The store stopped answering this host.
    StoreUnreachable,
}

/// A logged decision: when, by whom, what, and why.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    /// Agent clock at the decision.
    pub at_ms: u64,
    /// Host that decided.
    pub by: HostId,
    /// The decision.
    #[serde(flatten)]
    pub kind: DecisionKind,
    /// Human-readable reason.
    pub reason: String,
}

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
        out.push(Action::Log(Decision {
            at_ms: now,
            by: self.spec.id,
            kind,
            reason,
        }));
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
            self.log(
                out,
                now,
                DecisionKind::Stopped { vm, why },
                reason.to_string(),
            );
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
        if self.watchdog.expired(now) {
            let why = format!(
                "watchdog: lease not renewed by its safe deadline {} ms",
                self.watchdog.deadline_ms().unwrap_or(0)
            );
            self.self_fence(now, StopReason::Watchdog, &why, out);
        }
        if now >= self.next_heartbeat_ms {
            self.next_heartbeat_ms = now + self.cfg.heartbeat_interval_ms;
            for m in self
                .view
                .members
                .values()
                .filter(|m| m.spec.id != self.spec.id)
            {
                out.push(Action::SendHeartbeat {
                    to: m.spec.id,
                    addr: m.spec.addr.clone(),
                });
            }
        }
        if self.lease.is_none() {
            self.try_join(now, store, out);
        } else if now >= self.next_keepalive_ms {
            self.keep_alive(now, store, out);
        }
        self.check_isolation(now, out);
        if now >= self.next_reconcile_ms && self.lease.is_some() {
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
            self.self_fence(
                now,
                StopReason::LeaseLost,
                "the store says our lease is gone",
                out,
            );
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
                self.log(
                    out,
                    now,
                    DecisionKind::Joined { lease: lease.0 },
                    "lease granted".into(),
                );
            }
            Err(e) => {
                let _ = store.revoke_lease(lease);
                self.store_failed(now, &e, out);
            }
        }
    }

    fn keep_alive(&mut self, now: u64, store: &dyn ClusterStore, out: &mut Vec<Action>) {
        let Some(lease) = self.lease else { return };
        self.next_keepalive_ms = now + self.cfg.keepalive_interval_ms;
        match store.keep_alive(lease) {
            Ok(_) => {
                self.watchdog.renewed(now);
                self.store_ok(now);
            }
            Err(e) => self.store_failed(now, &e, out),
        }
    }

    fn check_isolation(&mut self, now: u64, out: &mut Vec<Action>) {
        let has_peers =
            self.view.members.keys().any(|h| *h != self.spec.id) || !self.peers.is_empty();
        let isolated = self.iso.isolated(now, has_peers);
        if isolated == self.isolated {
            return;
        }
        self.isolated = isolated;
        if !isolated {
            self.log(
                out,
                now,
                DecisionKind::IsolationEnded,
                "heard a peer or the store".into(),
            );
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
                    e.record.owner != Some(me)
                        || e.record.owner_lease != Some(lease)
                        || e.token != **tok
                })
            })
            .map(|(vm, _)| *vm)
            .collect();
        for vm in stale {
            self.running.remove(&vm);
            out.push(Action::StopVm {
                vm,
                reason: StopReason::Reassigned,
            });
            let why = StopReason::Reassigned;
            self.log(
                out,
                now,
                DecisionKind::Stopped { vm, why },
                "record no longer names us".into(),
            );
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
                    self.log(
                        out,
                        now,
                        DecisionKind::Started { vm, token },
                        "assigned to us".into(),
                    );
                }
                Err(FenceError::StaleToken { .. }) => self.log(
                    out,
                    now,
                    DecisionKind::StartRefused { vm },
                    "token stale".into(),
                ),
                Err(FenceError::Store { source, .. }) => {
                    return self.store_failed(now, &source, out);
                }
                Err(_) => {}
            }
        }
    }

    fn coordinate(
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
                    self.log(
                        out,
                        now,
                        DecisionKind::SteppedDown,
                        "coordinator key held by another".into(),
                    );
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
        let members: Vec<HostId> = self
            .view
            .members
            .keys()
            .copied()
            .filter(|h| *h != me)
            .collect();
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
                    let k = DecisionKind::Suspect {
                        peer: *h,
                        phi: phi.min(999.0),
                        last_heartbeat_ms: last,
                    };
                    self.log(out, now, k, why);
                } else {
                    self.holdoff_logged.remove(h);
                    self.fence_requested.remove(h);
                    self.log(
                        out,
                        now,
                        DecisionKind::Recovered { peer: *h },
                        "heartbeats resumed".into(),
                    );
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
            let why =
                format!("no answer in {timeout} ms; waiting for its lease to expire (watchdog)");
            self.log(out, now, DecisionKind::FenceFailed { peer: h }, why);
        }

        // Fencing decisions, with fence-storm protection: when more hosts are silent than may
        // be fenced at once, every one of them is held off until it is heard again (or its
        // lease expires), even if the others come back first.
        let storm = silent.len() > self.cfg.max_concurrent_fences;
        for h in &silent {
            let Some(m) = self.view.members.get(h) else {
                continue;
            };
            if self.pending_fences.contains_key(h) || self.fence_requested.contains(h) {
                continue;
            }
            let settled = self.peers.get(h).is_some_and(|p| {
                now.saturating_sub(p.suspected_since_ms) >= self.cfg.fence_settle_ms
            });
            if storm || !self.cfg.power_fencing {
                if self.holdoff_logged.insert(*h) {
                    let why = if storm {
                        format!(
                            "{} hosts silent at once (> {}): network event, not fencing; {h} still \
                             holds its store lease, its VMs restart only if the lease expires",
                            silent.len(),
                            self.cfg.max_concurrent_fences
                        )
                    } else {
                        "power fencing disabled; waiting for its lease to expire (watchdog)"
                            .to_string()
                    };
                    self.log(out, now, DecisionKind::HoldOff { peer: *h }, why);
                }
            } else if settled && !self.holdoff_logged.contains(h) {
                self.fence_requested.insert(*h);
                self.pending_fences.insert(*h, (m.lease, now));
                out.push(Action::Fence {
                    host: m.spec.clone(),
                });
                let why = format!(
                    "the only silent host for {} ms; power fence before restarting its VMs",
                    self.cfg.fence_settle_ms
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
                    let why = format!(
                        "no live host has {} MHz / {} MiB free",
                        spec.cpu_mhz, spec.mem_mib
                    );
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
                .when(Compare::CreateRevision {
                    key: self.keys.host(to),
                    revision: m.create_revision,
                })
                .and_then(TxnOp::Put {
                    key: self.keys.vm(vm),
                    value,
                    lease: None,
                });
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
                    let k = DecisionKind::Restart {
                        vm,
                        from,
                        to,
                        token: r.revision,
                    };
                    self.log(out, now, k, why);
                }
                Ok(_) => {}
                Err(e) => return self.store_failed(now, &e, out),
            }
        }
    }
}
