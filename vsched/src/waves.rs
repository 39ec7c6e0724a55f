//! Ordering moves into waves that respect per-host and per-cluster concurrent migration limits.
//!
//! Moves run concurrently within a wave and waves run one after another. A move waits for every
//! earlier move of the same VM and every earlier move *out of* its destination (it may need the
//! room that move frees), so executing the waves keeps the capacity accounting of the plan.

use crate::model::{HostId, VmId};

/// The parts of a move that wave planning needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Hop {
    /// The VM.
    pub vm: VmId,
    /// Source host.
    pub from: HostId,
    /// Destination host.
    pub to: HostId,
}

/// Splits `hops` (in plan order) into waves of indices: no wave has more than `per_host` moves
/// touching one host or more than `per_cluster` moves in total; dependencies come in earlier
/// waves. Deterministic.
pub fn plan_waves(hops: &[Hop], per_host: usize, per_cluster: usize) -> Vec<Vec<usize>> {
    let per_host = per_host.max(1);
    let per_cluster = per_cluster.max(1);
    let mut waves: Vec<Vec<usize>> = Vec::new();
    // Per wave: host -> count, as a small sorted vec (waves are small).
    let mut counts: Vec<Vec<(HostId, usize)>> = Vec::new();
    let mut wave_of: Vec<usize> = Vec::with_capacity(hops.len());
    let count = |c: &Vec<(HostId, usize)>, h: HostId| c.iter().find(|(x, _)| *x == h).map_or(0, |(_, n)| *n);
    for (i, m) in hops.iter().enumerate() {
        let mut w = 0;
        for (j, e) in hops[..i].iter().enumerate() {
            if e.vm == m.vm || e.from == m.to {
                w = w.max(wave_of[j] + 1);
            }
        }
        loop {
            if w == waves.len() {
                waves.push(Vec::new());
                counts.push(Vec::new());
            }
            let c = &counts[w];
            if waves[w].len() < per_cluster && count(c, m.from) < per_host && count(c, m.to) < per_host {
                break;
            }
            w += 1;
        }
        waves[w].push(i);
        for h in [m.from, m.to] {
            match counts[w].iter_mut().find(|(x, _)| *x == h) {
                Some((_, n)) => *n += 1,
                None => counts[w].push((h, 1)),
            }
        }
        wave_of.push(w);
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(vm: u32, from: u32, to: u32) -> Hop {
        Hop { vm: VmId(vm), from: HostId(from), to: HostId(to) }
    }

    #[test]
    fn limits_and_dependencies() {
        let hops = [hop(0, 0, 1), hop(1, 0, 2), hop(2, 0, 3), hop(3, 1, 0), hop(4, 5, 6)];
        let w = plan_waves(&hops, 2, 8);
        // host 0 takes two moves in wave 0; the third out of 0 waits; the move into 0 waits
        // for the moves out of 0 that precede it.
        assert_eq!(w[0], vec![0, 1, 4]);
        assert!(w[1].contains(&2));
        let wave_of = |i| w.iter().position(|x| x.contains(&i)).unwrap();
        assert!(wave_of(3) > wave_of(2));
        for wave in &w {
            assert!(wave.len() <= 8);
        }
        let w = plan_waves(&hops, 8, 1);
        assert!(w.iter().all(|x| x.len() == 1));
    }
}
