//! The agent's inputs, outputs and logged decisions.

use serde::{Deserialize, Serialize};

use crate::model::{HostId, HostSpec, VmId};
use crate::store::Revision;

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
    /// Power-fence a host through the [`FenceAgent`](crate::fence::FenceAgent), then report [`Event::FenceDone`].
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
