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
//!
//! ```
//! use vha::sim::{Sim, SimConfig};
//!
//! // Four simulated hosts with drifting clocks, eight VMs admitted with "1 host failure
//! // tolerated". Crash host 1 for good: its protected VMs come back elsewhere, never twice
//! // (the simulator checks that after every 10 ms step).
//! let mut sim = Sim::new(42, SimConfig::default()).expect("setup");
//! sim.crash(1, None);
//! sim.run_for(5_000).unwrap_or_else(|v| panic!("{v}"));
//! for vm in sim.vms().iter().filter(|v| v.protected()) {
//!     assert_eq!(sim.running_on(vm.id).len(), 1, "{} runs exactly once", vm.id);
//! }
//! ```
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
