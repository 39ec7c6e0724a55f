//! vha: keeping VMs alive when hosts fail (HA).
//!
//! Failure and isolation detection, fencing, and restarting VMs elsewhere, never twice.
//! Knows nothing of KVM. The core ([`agent::HostAgent`]) is sans-I/O: events and ticks in,
//! actions out; the world is reached only through small traits: [`ClusterStore`],
//! [`fence::FenceAgent`] and [`restart::Placement`].
//!
//! - [`store`]: the cluster store trait, the embedded [`MemStore`] and the etcd backend.
//! - [`detector`]: phi accrual failure detection and isolation detection.
//! - [`fence`]: fence agents, the lease watchdog, fencing tokens.
//! - [`restart`]: admission control, priorities, placement.
//! - [`agent`]: the host agent tying them together.
//! - [`sim`]: a deterministic simulator checking that no VM ever runs twice.
//! - [`runtime`]: the real-world driver: UDP heartbeats, the store served over TCP or etcd,
//!   host agents as OS processes.
#![deny(missing_docs, missing_debug_implementations)]

pub mod agent;
pub mod detector;
pub mod fence;
pub mod model;
pub mod restart;
pub mod runtime;
pub mod sim;
pub mod store;
pub mod view;

pub use agent::{Action, Decision, DecisionKind, Event, HaConfig, HostAgent, StopReason};
pub use model::{HostId, HostSpec, Keys, Priority, VmId, VmRecord, VmSpec};
pub use restart::{AdmissionPolicy, Placement, WorstFit};
pub use store::{ClusterStore, KeyValue, LeaseId, MemStore, Revision, StoreError, Txn, TxnOp};
