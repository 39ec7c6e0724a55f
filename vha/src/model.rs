//! Cluster model shared by every module: ids, VM and host specs, the records kept in the store,
//! and the store key layout.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store::LeaseId;

/// Identifier of a host (a host agent).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct HostId(pub u32);

impl fmt::Display for HostId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "host-{}", self.0)
    }
}

/// Identifier of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VmId(pub u32);

impl fmt::Display for VmId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "vm-{}", self.0)
    }
}

/// Restart priority of a VM (vSphere's levels). `Disabled` VMs are not protected: HA never
/// restarts them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    /// Not protected; never restarted.
    Disabled,
    /// Restarted after every higher priority.
    Low,
    /// The default.
    #[default]
    Medium,
    /// Restarted first.
    High,
}

/// Resources a VM reserves, and how HA treats it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmSpec {
    /// The VM.
    pub id: VmId,
    /// Reserved CPU in MHz.
    pub cpu_mhz: u64,
    /// Reserved memory in MiB.
    pub mem_mib: u64,
    /// Restart priority.
    #[serde(default)]
    pub priority: Priority,
}

impl VmSpec {
    /// Whether HA restarts this VM when its host fails.
    pub fn protected(&self) -> bool {
        self.priority != Priority::Disabled
    }
}

/// A host's capacity and role, published in the store under its lease.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HostSpec {
    /// The host.
    pub id: HostId,
    /// CPU capacity in MHz.
    pub cpu_mhz: u64,
    /// Memory capacity in MiB.
    pub mem_mib: u64,
    /// A dedicated failover host: receives only restarted VMs (admission policy
    /// [`crate::restart::AdmissionPolicy::DedicatedFailoverHosts`]).
    #[serde(default)]
    pub failover: bool,
    /// Where the host's agent listens for heartbeats (runtime only; empty in simulation).
    #[serde(default)]
    pub addr: String,
    /// Operating-system process id of the agent (runtime only), for power fencing.
    #[serde(default)]
    pub pid: u32,
}

/// The store's record of a VM: its spec and who owns it. The record's `mod_revision` is the
/// owner's fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmRecord {
    /// What the VM needs.
    pub spec: VmSpec,
    /// Host that must run it (`None`: powered on but not placed yet).
    pub owner: Option<HostId>,
    /// The owner's lease when the VM was assigned. The assignment is valid only while this
    /// lease lives.
    pub owner_lease: Option<LeaseId>,
    /// How many times HA restarted the VM.
    #[serde(default)]
    pub restarts: u32,
}

/// Store key layout under a cluster prefix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    /// Keys under `prefix` (e.g. `/vha/`).
    pub fn new(prefix: impl Into<String>) -> Self {
        Self { prefix: prefix.into() }
    }
    /// Prefix of the host membership keys.
    pub fn hosts(&self) -> String {
        format!("{}hosts/", self.prefix)
    }
    /// Membership key of one host (attached to its lease).
    pub fn host(&self, h: HostId) -> String {
        format!("{}hosts/{:06}", self.prefix, h.0)
    }
    /// Prefix of the VM records.
    pub fn vms(&self) -> String {
        format!("{}vms/", self.prefix)
    }
    /// Record of one VM.
    pub fn vm(&self, v: VmId) -> String {
        format!("{}vms/{:08}", self.prefix, v.0)
    }
    /// Run marker of a VM, written by the start transaction (attached to the runner's lease).
    pub fn run(&self, v: VmId) -> String {
        format!("{}run/{:08}", self.prefix, v.0)
    }
    /// Shared state of a VM (what its disk would be): written only with a valid fencing token.
    pub fn data(&self, v: VmId) -> String {
        format!("{}data/{:08}", self.prefix, v.0)
    }
    /// The coordinator key (attached to the coordinator's lease).
    pub fn coordinator(&self) -> String {
        format!("{}coordinator", self.prefix)
    }
}

impl Default for Keys {
    fn default() -> Self {
        Self::new("/vha/")
    }
}
