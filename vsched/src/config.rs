//! Balancer configuration, the migration threshold levels and the migration cost model.

use serde::{Deserialize, Serialize};

use crate::model::VmSpec;

/// How a DRS pass behaves. Config is data: serde with defaults; [`BalanceConfig::validate`]
/// returns a typed error.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BalanceConfig {
    /// Migration threshold, 1 (conservative: only mandatory moves such as rule fixes and
    /// maintenance) to 5 (aggressive). See [`target_imbalance`] and [`min_goodness`].
    pub threshold: u8,
    /// Cap on load-balancing moves per pass (mandatory moves are not capped).
    pub max_moves_per_pass: usize,
    /// Hosts considered as sources (most loaded) and as destinations (least loaded) for each
    /// greedy step. Clusters with at most twice this many hosts are searched exhaustively.
    pub candidate_hosts: usize,
    /// Migration network bandwidth per migration, MiB/s.
    pub link_mib_s: f64,
    /// A VM whose dirty rate exceeds this fraction of the link would not converge: it is not a
    /// load-balancing candidate.
    pub max_dirty_fraction: f64,
    /// How long a gain is expected to last, seconds (the benefit side of cost-benefit).
    pub benefit_horizon_s: f64,
    /// Base cost of a migration per second of migration time, in goodness units.
    pub cost_rate: f64,
    /// A VM moved for balancing is not moved again for balancing for this many passes.
    pub hold_passes: u64,
    /// A VM is not moved back, for balancing, to a host it left within this many passes.
    pub no_return_passes: u64,
    /// Once balancing starts (imbalance above the target), it continues until the imbalance is
    /// below `target * stop_fraction`: a dead band that keeps clusters hovering at the threshold
    /// from moving VMs every pass.
    pub stop_fraction: f64,
    /// At most this many concurrent migrations touch one host (as source or destination).
    pub max_concurrent_per_host: usize,
    /// At most this many concurrent migrations in the cluster.
    pub max_concurrent_per_cluster: usize,
}

impl Default for BalanceConfig {
    fn default() -> Self {
        BalanceConfig {
            threshold: 3,
            max_moves_per_pass: 32,
            candidate_hosts: 8,
            link_mib_s: 1250.0,
            max_dirty_fraction: 0.8,
            benefit_horizon_s: 1800.0,
            cost_rate: 1e-3,
            hold_passes: 3,
            no_return_passes: 24,
            stop_fraction: 0.75,
            max_concurrent_per_host: 2,
            max_concurrent_per_cluster: 8,
        }
    }
}

/// A bad configuration value.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    /// Threshold outside 1..=5.
    #[error("threshold {0} is outside 1..=5")]
    Threshold(u8),
    /// A value that must be positive is not.
    #[error("{0} must be positive and finite")]
    NotPositive(&'static str),
    /// A fraction outside (0, 1].
    #[error("{0} must be in (0, 1]")]
    Fraction(&'static str),
    /// JSON did not parse.
    #[error("parsing config JSON: {0}")]
    Json(String),
}

impl BalanceConfig {
    /// Checks every value.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=5).contains(&self.threshold) {
            return Err(ConfigError::Threshold(self.threshold));
        }
        for (name, v) in [("link_mib_s", self.link_mib_s), ("benefit_horizon_s", self.benefit_horizon_s)] {
            if !(v.is_finite() && v > 0.0) {
                return Err(ConfigError::NotPositive(name));
            }
        }
        if !(self.cost_rate.is_finite() && self.cost_rate >= 0.0) {
            return Err(ConfigError::NotPositive("cost_rate"));
        }
        for (name, v) in
            [("max_dirty_fraction", self.max_dirty_fraction), ("stop_fraction", self.stop_fraction)]
        {
            if !(v > 0.0 && v <= 1.0) {
                return Err(ConfigError::Fraction(name));
            }
        }
        for (name, v) in [
            ("candidate_hosts", self.candidate_hosts),
            ("max_concurrent_per_host", self.max_concurrent_per_host),
            ("max_concurrent_per_cluster", self.max_concurrent_per_cluster),
        ] {
            if v == 0 {
                return Err(ConfigError::NotPositive(name));
            }
        }
        Ok(())
    }

    /// Parses JSON and validates.
    pub fn from_json(s: &str) -> Result<Self, ConfigError> {
        let c: BalanceConfig = serde_json::from_str(s).map_err(|e| ConfigError::Json(e.to_string()))?;
        c.validate()?;
        Ok(c)
    }

    /// Estimated migration time of `vm` in seconds, or `None` if pre-copy would not converge
    /// (dirty rate above `max_dirty_fraction` of the link). Pre-copy resends dirtied pages: a
    /// geometric series whose sum is `memory / (link - dirty)`.
    pub fn migration_s(&self, vm: &VmSpec) -> Option<f64> {
        if vm.dirty_mib_s >= self.max_dirty_fraction * self.link_mib_s {
            return None;
        }
        Some(vm.size.mem_mib as f64 / (self.link_mib_s - vm.dirty_mib_s))
    }
}

/// Imbalance above which a pass starts load balancing, per threshold level (`None` for level 1:
/// mandatory moves only).
pub fn target_imbalance(level: u8) -> Option<f64> {
    match level {
        0 | 1 => None,
        2 => Some(0.20),
        3 => Some(0.10),
        4 => Some(0.05),
        _ => Some(0.02),
    }
}

/// Smallest goodness (reduction of the sum of squared deviations of normalized host loads,
/// averaged over CPU and memory) a load-balancing move needs at a threshold level.
pub fn min_goodness(level: u8) -> f64 {
    match level {
        0..=2 => 0.02,
        3 => 0.005,
        4 => 0.001,
        _ => 0.0002,
    }
}

/// Priority of a load-balancing move with this goodness: the lowest level (2..=5) that would
/// take it. Mandatory moves have priority 1. A level includes moves of priority `<=` level.
pub fn priority_of(goodness: f64) -> u8 {
    (2..=5).find(|&l| goodness >= min_goodness(l)).unwrap_or(5)
}
