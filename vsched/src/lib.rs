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
//!
//! ```
//! use vsched::drs::RecordingMigrator;
//! use vsched::{Automation, Cluster, Drs, DrsConfig, Enforcement, Host, Resources, Rule,
//!              RuleKind, VmSpec, place_batch};
//!
//! let mut c = Cluster::new();
//! for i in 0..3 {
//!     c.add_host(Host::new(format!("esx{i}"), 64_000, 256 * 1024));
//! }
//! let vms: Vec<_> = (0..12)
//!     .map(|i| c.add_vm(VmSpec::new(format!("vm{i}"), Resources::new(4_000, 16 * 1024))))
//!     .collect();
//! c.add_rule(Rule::new("db-apart", Enforcement::Must,
//!                      RuleKind::VmAntiAffinity { vms: vec![vms[0], vms[1]] }));
//! // Initial placement honours capacity, reservations and rules.
//! let placed = place_batch(&c, &vms).expect("valid cluster");
//! assert!(placed.failed.is_empty());
//! placed.apply(&mut c);
//! assert_ne!(c.vms[0].host, c.vms[1].host);
//!
//! // Manual automation: a pass yields recommendations that a person approves by id.
//! let mut drs = Drs::new(DrsConfig { automation: Automation::Manual, ..Default::default() })?;
//! let mut migrator = RecordingMigrator::default();
//! let report = drs.pass(&mut c, &mut migrator)?;
//! for id in report.pending {
//!     drs.approve(id, &mut c, &mut migrator)?;
//! }
//! # Ok::<(), vsched::DrsError>(())
//! ```
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
