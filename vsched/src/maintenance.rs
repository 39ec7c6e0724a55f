//! Maintenance mode: evacuate a host, or say exactly which VMs cannot move and why.

use serde::Serialize;

use crate::balance::{Blocked, Move, PassPlan, Planner, Reason};
use crate::config::BalanceConfig;
use crate::model::{Cluster, HostId, HostState};

/// Errors entering maintenance mode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MaintenanceError {
    /// The cluster description is invalid.
    #[error("invalid cluster")]
    Model(#[from] crate::model::ModelError),
    /// No such host.
    #[error("host {0} does not exist")]
    UnknownHost(HostId),
    /// The host is in standby: it runs nothing and needs no evacuation.
    #[error("host {0} is in standby")]
    Standby(HostId),
}

/// The plan that empties a host.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Evacuation {
    /// The host.
    pub host: HostId,
    /// Moves that empty it, in order.
    pub moves: Vec<Move>,
    /// Moves grouped into concurrency-limited waves.
    pub waves: Vec<Vec<usize>>,
    /// VMs that cannot move, each with the constraints that rule out every host.
    pub blocked: Vec<Blocked>,
}

impl Evacuation {
    /// True when every VM can leave the host.
    pub fn complete(&self) -> bool {
        self.blocked.is_empty()
    }
}

/// Puts `host` into maintenance mode (it accepts no new VMs from now on) and plans its
/// evacuation. The moves are not applied; apply them with [`crate::balance::apply_moves`] once
/// migrated. Only this host is evacuated; other hosts' pending work is left to the next pass.
pub fn enter_maintenance(
    cluster: &mut Cluster,
    host: HostId,
    cfg: &BalanceConfig,
) -> Result<Evacuation, MaintenanceError> {
    cluster.validate()?;
    let h = cluster.hosts.get_mut(host.idx()).ok_or(MaintenanceError::UnknownHost(host))?;
    if h.state == HostState::Standby {
        return Err(MaintenanceError::Standby(host));
    }
    h.state = HostState::Maintenance;
    let mut p = Planner::new(cluster, cfg);
    let before = p.ledger.imbalance();
    p.evacuate(host, Reason::Maintenance { host });
    let plan: PassPlan = p.finish(before, before);
    Ok(Evacuation { host, moves: plan.moves, waves: plan.waves, blocked: plan.blocked })
}

/// Takes `host` out of maintenance mode (it accepts VMs again).
pub fn exit_maintenance(cluster: &mut Cluster, host: HostId) -> Result<(), MaintenanceError> {
    let h = cluster.hosts.get_mut(host.idx()).ok_or(MaintenanceError::UnknownHost(host))?;
    if h.state == HostState::Maintenance {
        h.state = HostState::On;
    }
    Ok(())
}
