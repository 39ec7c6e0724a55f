//! Entitlements: how much CPU and memory each running VM is entitled to.
//!
//! Each resource is divided independently, top-down along the pool tree, as VMware DRS does:
//! the capacity of the powered-on hosts goes to the root pool; every pool hands its allocation to
//! its children (child pools and VMs) by *water-filling*: each child first gets its reservation,
//! then the rest is shared in proportion to shares, and no child gets more than it wants (its
//! demand, capped by its limit and size; for a pool, the sum of what its children want, capped by
//! the pool's limit). Entitlements depend on demand, not on which host a VM runs on, so a
//! candidate move never changes them: balancing just moves fixed numbers between hosts.
//!
//! Guarantees (property-tested): the sum over VMs never exceeds the capacity; a VM never gets
//! less than its reservation when reservations are admitted (they fit in the capacity) and never
//! more than its limit, size or (unless reserved) demand.

use crate::model::{Cluster, Resources, VmId};

/// Entitlements of every VM and pool (zero for VMs that are not placed).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Entitlements {
    /// Per VM, indexed by [`VmId`].
    pub vm: Vec<Resources>,
    /// Per pool, indexed by [`crate::model::PoolId`].
    pub pool: Vec<Resources>,
    /// The capacity that was divided (powered-on hosts).
    pub capacity: Resources,
    /// What the root pool must guarantee: VM reservations and pool reservations, aggregated up
    /// the tree (a pool reserves the larger of its own reservation and its children's sum).
    /// Reservations are *admitted* when this fits in `capacity`.
    pub reserved: Resources,
}

impl Entitlements {
    /// Entitlement of `vm`.
    pub fn of(&self, vm: VmId) -> Resources {
        self.vm[vm.idx()]
    }
}

/// One child of a pool in the water-fill: reservation, upper bound, shares.
#[derive(Debug, Clone, Copy)]
struct Claim {
    res: u64,
    upper: u64,
    shares: u64,
}

/// Divides `cap` among `claims`; returns one amount per claim, `sum <= cap`.
fn water_fill(cap: u64, claims: &[Claim], out: &mut Vec<u64>) {
    out.clear();
    let sum_res: u128 = claims.iter().map(|c| c.res as u128).sum();
    if sum_res >= cap as u128 {
        // Reservations not admitted (or exactly full): scale them down proportionally.
        for c in claims {
            let v = (c.res as u128 * cap as u128).checked_div(sum_res).unwrap_or(0) as u64;
            out.push(v);
        }
        return;
    }
    let sum_up: u128 = claims.iter().map(|c| c.upper as u128).sum();
    if sum_up <= cap as u128 {
        out.extend(claims.iter().map(|c| c.upper));
        return;
    }
    let fill = |lambda: f64| -> f64 {
        claims.iter().map(|c| (lambda * c.shares as f64).clamp(c.res as f64, c.upper as f64)).sum()
    };
    let mut lo = 0.0f64;
    let mut hi = claims.iter().map(|c| c.upper as f64 / c.shares as f64).fold(0.0, f64::max);
    for _ in 0..60 {
        let mid = 0.5 * (lo + hi);
        if fill(mid) <= cap as f64 {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    let mut total: u64 = 0;
    for c in claims {
        let v = ((lo * c.shares as f64).floor() as u64).clamp(c.res, c.upper);
        total += v;
        out.push(v);
    }
    // Float rounding could overshoot by a few units: take them back from the largest non-reserved
    // parts, deterministically.
    let mut i = 0;
    while total > cap && !out.is_empty() {
        let j = i % out.len();
        if out[j] > claims[j].res {
            out[j] -= 1;
            total -= 1;
        }
        i += 1;
    }
}

/// Which resource a divide works on.
#[derive(Debug, Clone, Copy)]
enum Res {
    Cpu,
    Mem,
}

fn get(r: Resources, which: Res) -> u64 {
    match which {
        Res::Cpu => r.cpu_mhz,
        Res::Mem => r.mem_mib,
    }
}

fn set(r: &mut Resources, which: Res, v: u64) {
    match which {
        Res::Cpu => r.cpu_mhz = v,
        Res::Mem => r.mem_mib = v,
    }
}

/// Computes entitlements for every placed VM of a cluster.
///
/// # Panics
/// On a cluster that fails [`Cluster::validate`] (dangling pool or host references); the
/// public entry points of the scheduler validate first.
pub fn compute(cluster: &Cluster) -> Entitlements {
    let capacity = cluster.on_capacity();
    let npools = cluster.pool_count();
    let nvms = cluster.vms.len();
    // Children lists, CSR: child pools and VMs of each pool.
    let mut pool_children: Vec<Vec<u32>> = vec![Vec::new(); npools];
    for (i, p) in cluster.pools.iter().enumerate().skip(1) {
        if let Some(par) = p.parent {
            pool_children[par.idx()].push(i as u32);
        }
    }
    let mut vm_children: Vec<Vec<u32>> = vec![Vec::new(); npools];
    for (i, v) in cluster.vms.iter().enumerate() {
        if v.host.is_some() {
            vm_children[v.pool.idx()].push(i as u32);
        }
    }
    let mut ent = Entitlements {
        vm: vec![Resources::default(); nvms],
        pool: vec![Resources::default(); npools],
        capacity,
        reserved: Resources::default(),
    };
    let mut claims = Vec::new();
    let mut out = Vec::new();
    for which in [Res::Cpu, Res::Mem] {
        // Bottom-up: aggregate reservation and upper bound per pool.
        let mut agg_res = vec![0u64; npools];
        let mut agg_up = vec![0u64; npools];
        for p in (0..npools).rev() {
            let mut r: u64 = 0;
            let mut u: u64 = 0;
            for &v in &vm_children[p] {
                let vm = &cluster.vms[v as usize];
                r += get(vm.reservation, which);
                u += get(vm.wanted(), which);
            }
            for &c in &pool_children[p] {
                r += agg_res[c as usize];
                u += agg_up[c as usize];
            }
            if let Some(pool) = cluster.pools.get(p) {
                r = r.max(get(pool.reservation, which));
                if let Some(l) = pool.limit {
                    u = u.min(get(l, which));
                }
            }
            agg_res[p] = r;
            agg_up[p] = u.max(r);
        }
        set(&mut ent.reserved, which, agg_res[0]);
        // Top-down water-fill.
        let mut alloc = vec![0u64; npools];
        let mut root_cap = get(capacity, which);
        if let Some(l) = cluster.pools.first().and_then(|p| p.limit) {
            root_cap = root_cap.min(get(l, which));
        }
        alloc[0] = root_cap.min(agg_up[0]);
        for p in 0..npools {
            claims.clear();
            for &c in &pool_children[p] {
                let pool = &cluster.pools[c as usize];
                claims.push(Claim {
                    res: agg_res[c as usize],
                    upper: agg_up[c as usize],
                    shares: u64::from(match which {
                        Res::Cpu => pool.shares.cpu,
                        Res::Mem => pool.shares.mem,
                    }),
                });
            }
            for &v in &vm_children[p] {
                let vm = &cluster.vms[v as usize];
                claims.push(Claim {
                    res: get(vm.reservation, which),
                    upper: get(vm.wanted(), which),
                    shares: u64::from(match which {
                        Res::Cpu => vm.shares.cpu,
                        Res::Mem => vm.shares.mem,
                    }),
                });
            }
            water_fill(alloc[p], &claims, &mut out);
            let np = pool_children[p].len();
            for (k, &c) in pool_children[p].iter().enumerate() {
                alloc[c as usize] = out[k];
            }
            for (k, &v) in vm_children[p].iter().enumerate() {
                set(&mut ent.vm[v as usize], which, out[np + k]);
            }
        }
        for (p, a) in alloc.iter().enumerate() {
            set(&mut ent.pool[p], which, *a);
        }
    }
    ent
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Host, HostId, Pool, PoolId, Shares, VmSpec};

    fn vm(demand: u64, res: u64, shares: u32) -> VmSpec {
        let mut v = VmSpec::new("v", Resources::new(10_000, 10_000));
        v.demand = Resources::new(demand, demand);
        v.reservation = Resources::new(res, res);
        v.shares = Shares { cpu: shares, mem: shares };
        v.host = Some(HostId(0));
        v
    }

    #[test]
    fn uncontended_gets_demand() {
        let mut c = Cluster::new();
        c.add_host(Host::new("h", 10_000, 10_000));
        c.add_vm(vm(1000, 0, 1000));
        c.add_vm(vm(2000, 0, 1000));
        let e = compute(&c);
        assert_eq!(e.vm[0], Resources::new(1000, 1000));
        assert_eq!(e.vm[1], Resources::new(2000, 2000));
    }

    #[test]
    fn contended_split_by_shares_with_reservation_floor() {
        let mut c = Cluster::new();
        c.add_host(Host::new("h", 3000, 3000));
        c.add_vm(vm(5000, 0, 2000));
        c.add_vm(vm(5000, 0, 1000));
        c.add_vm(vm(5000, 1500, 1000));
        let e = compute(&c);
        // 3000 = 1500 (reserved) + shares: lambda*2000 + lambda*1000 + max(1500, lambda*1000).
        assert_eq!(e.vm[2].cpu_mhz, 1500);
        assert!(e.vm[0].cpu_mhz >= 999 && e.vm[0].cpu_mhz <= 1000);
        assert!(e.vm[1].cpu_mhz >= 499 && e.vm[1].cpu_mhz <= 500);
    }

    #[test]
    fn pool_limit_caps_children() {
        let mut c = Cluster::new();
        c.add_host(Host::new("h", 10_000, 10_000));
        let mut p = Pool::child("capped", PoolId::ROOT);
        p.limit = Some(Resources::new(1000, 1000));
        let pid = c.add_pool(p);
        let mut a = vm(4000, 0, 1000);
        a.pool = pid;
        let mut b = vm(4000, 0, 1000);
        b.pool = pid;
        c.add_vm(a);
        c.add_vm(b);
        c.add_vm(vm(4000, 0, 1000));
        let e = compute(&c);
        assert_eq!(e.vm[0].cpu_mhz + e.vm[1].cpu_mhz, 1000);
        assert_eq!(e.vm[2].cpu_mhz, 4000);
        assert_eq!(e.pool[pid.idx()].cpu_mhz, 1000);
    }
}
