//! vsched: deciding where VMs run in a cluster (DRS).
//!
//! A sans-I/O core after VMware DRS (Gulati et al., VMware Technical Journal 2012): no clock, no
//! sockets, no threads. A [`model::Cluster`] snapshot goes in; entitlements, placements and
//! recommendations come out. Knows nothing of KVM: approved moves leave through the
//! [`Migrator`] trait.
//!
//! - [`model`]: hosts, VMs, resource pools, serde JSON snapshots.
//! - [`entitlement`]: reservations first, then shares, capped by demand and limit, along the pool
//!   tree.
//! - [`rules`]: VM-VM affinity / anti-affinity, VM-host must / should.
//! - [`placement`]: initial placement of one VM or a batch.
//! - [`ledger`]: flat per-host accounting and the imbalance metric.
//! - [`balance`]: one DRS pass: mandatory moves, then greedy balancing with cost-benefit.
//! - [`maintenance`]: evacuate a host or say which VMs cannot move and why.
//! - [`dpm`]: power management (standby / wake with hysteresis).
//! - [`drs`]: automation levels, approvals by id, the `Migrator` trait.
//! - [`config`]: threshold levels, limits and the migration cost model.
//! - [`waves`]: concurrency-limited migration waves.
//! - [`stability`]: per-VM demand history; how long a gain is expected to last.
//! - [`sim`]: seeded PRNG and random clusters for tests, examples and benches.
#![deny(missing_docs, missing_debug_implementations)]

pub mod balance;
pub mod config;
pub mod dpm;
pub mod drs;
pub mod entitlement;
pub mod ledger;
pub mod maintenance;
pub mod model;
pub mod placement;
pub mod rules;
pub mod sim;
pub mod stability;
pub mod waves;

pub use balance::{History, Move, PassPlan, Reason, plan_pass};
pub use config::BalanceConfig;
pub use drs::{Automation, Drs, DrsConfig, DrsError, Migrator, Recommendation};
pub use entitlement::Entitlements;
pub use ledger::{Ledger, imbalance};
pub use model::{Cluster, Host, HostId, HostState, Pool, PoolId, Resources, Shares, VmId, VmSpec};
pub use placement::{Placement, PlacementError, place_batch, place_one};
pub use rules::{Enforcement, Rule, RuleKind};
