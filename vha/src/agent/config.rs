//! Agent settings and their validation.

use serde::{Deserialize, Serialize};

use crate::detector::{IsolationResponse, PhiConfig};
use crate::fence::{FenceError, Watchdog, WatchdogConfig};

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
            return bad("keepalive_interval_ms", "must be > 0 and at most a third of the lease TTL");
        }
        if self.isolation_timeout_ms == 0 {
            return bad("isolation_timeout_ms", "must be > 0");
        }
        if self.max_concurrent_fences == 0 && self.power_fencing {
            return bad("max_concurrent_fences", "must be >= 1 when power fencing is on");
        }
        Ok(())
    }
}
