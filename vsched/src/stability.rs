//! How long a balancing gain is expected to last: per-VM demand history.
//!
//! Each observation folds a VM's normalized demand (the mean of CPU and memory demand over its
//! size) into an exponentially weighted mean and mean absolute change. A VM whose demand barely
//! moves keeps its gain for the whole configured horizon; one whose demand swings by a large
//! fraction of its level pass after pass gets a proportionally shorter horizon, so only large
//! gains justify moving it.

use serde::{Deserialize, Serialize};

use crate::model::{Cluster, VmId};

/// Weight of the newest observation.
pub const ALPHA: f64 = 0.3;
/// How strongly relative variability shortens the horizon.
pub const SENSITIVITY: f64 = 4.0;
/// The horizon never drops below this fraction.
pub const MIN_STABILITY: f64 = 0.05;

/// Exponentially weighted demand level and variability per VM.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DemandTracker {
    /// EWMA of normalized demand, per VM.
    pub mean: Vec<f64>,
    /// EWMA of the absolute change of normalized demand, per VM.
    pub dev: Vec<f64>,
    /// Observations folded in, per VM.
    pub samples: Vec<u32>,
}

fn level(c: &Cluster, v: usize) -> f64 {
    let vm = &c.vms[v];
    let cpu = vm.demand.cpu_mhz as f64 / vm.size.cpu_mhz.max(1) as f64;
    let mem = vm.demand.mem_mib as f64 / vm.size.mem_mib.max(1) as f64;
    0.5 * (cpu + mem)
}

impl DemandTracker {
    /// Folds the cluster's current demand in (VMs added since the last call start fresh).
    pub fn observe(&mut self, cluster: &Cluster) {
        let n = cluster.vms.len();
        self.mean.resize(n, 0.0);
        self.dev.resize(n, 0.0);
        self.samples.resize(n, 0);
        for v in 0..n {
            let x = level(cluster, v);
            if self.samples[v] == 0 {
                self.mean[v] = x;
            } else {
                let change = (x - self.mean[v]).abs();
                self.dev[v] = (1.0 - ALPHA) * self.dev[v] + ALPHA * change;
                self.mean[v] = (1.0 - ALPHA) * self.mean[v] + ALPHA * x;
            }
            self.samples[v] = self.samples[v].saturating_add(1);
        }
    }

    /// Fraction of the configured horizon a gain from moving `vm` is expected to last, in
    /// `[MIN_STABILITY, 1]` (1 for a VM never observed).
    pub fn stability(&self, vm: VmId) -> f64 {
        let v = vm.idx();
        if self.samples.get(v).copied().unwrap_or(0) < 2 {
            return 1.0;
        }
        let rel = self.dev[v] / self.mean[v].max(0.01);
        (1.0 / (1.0 + SENSITIVITY * rel)).max(MIN_STABILITY)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Resources, VmSpec};

    #[test]
    fn steady_demand_is_stable_swinging_demand_is_not() {
        let mut c = Cluster::new();
        c.add_vm(VmSpec::new("steady", Resources::new(1000, 1000)));
        c.add_vm(VmSpec::new("swing", Resources::new(1000, 1000)));
        let mut t = DemandTracker::default();
        assert_eq!(t.stability(VmId(0)), 1.0);
        for i in 0..20 {
            c.vms[0].demand = Resources::new(500, 500);
            let hi = if i % 2 == 0 { 900 } else { 100 };
            c.vms[1].demand = Resources::new(hi, hi);
            t.observe(&c);
        }
        assert!(t.stability(VmId(0)) > 0.99);
        assert!(t.stability(VmId(1)) < 0.3, "{}", t.stability(VmId(1)));
        assert_eq!(t.stability(VmId(7)), 1.0);
    }
}
