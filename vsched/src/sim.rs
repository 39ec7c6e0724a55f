//! Seeded generators for tests, examples and benches: a tiny PRNG (splitmix64, stable across
//! versions) and a random-cluster builder with skewed demand, a pool tree and rules.

use crate::entitlement;
use crate::ledger::Ledger;
use crate::model::{Cluster, Host, HostId, Pool, PoolId, Resources, Shares, VmId, VmSpec};
use crate::rules::{Enforcement, Rule, RuleIndex, RuleKind};

/// splitmix64: a small, fast, seeded generator whose output never changes across versions.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }
    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `[0, 1)`.
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
    /// Uniform in `[0, n)` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        ((self.next_u64() as u128 * n as u128) >> 64) as u64
    }
}

/// Parameters of a generated cluster.
#[derive(Debug, Clone)]
pub struct ClusterGen {
    /// Seed.
    pub seed: u64,
    /// Number of hosts.
    pub hosts: usize,
    /// Number of VMs.
    pub vms: usize,
    /// Target mean memory utilization of the VMs' configured size (0..1).
    pub mem_util: f64,
    /// Skew of the initial placement: 0 = uniform, 1 = strongly favours low host ids.
    pub skew: f64,
    /// Add a pool tree (prod/dev/test).
    pub pools: bool,
    /// Number of rules to add (mixed kinds, roughly half must).
    pub rules: usize,
    /// Leave VMs unplaced (for placement benches).
    pub unplaced: bool,
}

impl Default for ClusterGen {
    fn default() -> Self {
        ClusterGen {
            seed: 1,
            hosts: 16,
            vms: 400,
            mem_util: 0.55,
            skew: 0.6,
            pools: true,
            rules: 12,
            unplaced: false,
        }
    }
}

const CORE_MHZ: u64 = 2400;

impl ClusterGen {
    /// Builds the cluster. The initial placement breaks no must-rule and respects capacity and
    /// reservations; it is skewed towards low host ids when `skew > 0`.
    pub fn build(&self) -> Cluster {
        let mut rng = SplitMix64::new(self.seed);
        let mut c = Cluster::new();
        let host_types = [(32u64, 256 * 1024u64), (48, 384 * 1024), (64, 512 * 1024)];
        let mut mem_total = 0u64;
        for i in 0..self.hosts {
            let (cores, mem) = host_types[rng.below(3) as usize];
            mem_total += mem;
            c.add_host(Host::new(format!("esx{i:03}"), cores * CORE_MHZ, mem));
        }
        let pools: Vec<PoolId> = if self.pools {
            let mk = |c: &mut Cluster, name: &str, parent, shares: u32, res_gib: u64| {
                let mut p = Pool::child(name, parent);
                p.shares = Shares { cpu: shares, mem: shares };
                p.reservation = Resources::new(0, res_gib * 1024);
                c.add_pool(p)
            };
            let prod = mk(&mut c, "prod", PoolId::ROOT, 4000, 0);
            let dev = mk(&mut c, "dev", PoolId::ROOT, 2000, 0);
            let test = mk(&mut c, "test", PoolId::ROOT, 1000, 0);
            let web = mk(&mut c, "prod/web", prod, 2000, 0);
            let db = mk(&mut c, "prod/db", prod, 2000, 0);
            vec![web, db, dev, test, PoolId::ROOT]
        } else {
            vec![PoolId::ROOT]
        };
        let per_host = (self.vms as f64 / self.hosts.max(1) as f64).max(1.0);
        let mean_mem = mem_total as f64 / self.hosts.max(1) as f64 * self.mem_util / per_host;
        for i in 0..self.vms {
            // Log-uniform size between mean/4 and 2.5*mean, rounded to 256 MiB.
            let f = 0.25 * 10f64.powf(rng.f64() * 1.0);
            let mem = ((mean_mem * f / 256.0).round() as u64).max(1) * 256;
            let vcpus = (1u64 << rng.below(4)).min(((mem / 2048).max(1)).next_power_of_two());
            let size = Resources::new(vcpus * CORE_MHZ, mem);
            let mut v = VmSpec::new(format!("vm{i:05}"), size);
            let busy = rng.f64().powf(2.0);
            v.demand = Resources::new(
                (size.cpu_mhz as f64 * (0.05 + 0.9 * busy)) as u64,
                (size.mem_mib as f64 * (0.3 + 0.6 * rng.f64())) as u64,
            );
            if rng.below(10) == 0 {
                v.reservation = Resources::new(size.cpu_mhz / 4, size.mem_mib / 2);
            }
            v.pool = pools[rng.below(pools.len() as u64) as usize];
            v.dirty_mib_s = (rng.f64().powi(3) * 400.0).round();
            c.add_vm(v);
        }
        self.add_rules(&mut c, &mut rng);
        if !self.unplaced {
            self.place(&mut c, &mut rng);
        }
        c
    }

    fn add_rules(&self, c: &mut Cluster, rng: &mut SplitMix64) {
        let n = c.vms.len() as u64;
        let nh = c.hosts.len() as u64;
        if n < 4 || nh < 2 {
            return;
        }
        let mut used = vec![false; c.vms.len()];
        let mut pick = |rng: &mut SplitMix64, k: usize| -> Vec<VmId> {
            let mut out = Vec::new();
            for _ in 0..k * 8 {
                if out.len() == k {
                    break;
                }
                let v = rng.below(n) as usize;
                if !used[v] {
                    used[v] = true;
                    out.push(VmId(v as u32));
                }
            }
            out
        };
        for i in 0..self.rules {
            let must = i % 2 == 0;
            let enforcement = if must { Enforcement::Must } else { Enforcement::Should };
            let kind = match i % 3 {
                0 => {
                    let k = (2 + rng.below(3) as usize).min(nh as usize);
                    let vms = pick(rng, k);
                    if vms.len() < 2 {
                        continue;
                    }
                    RuleKind::VmAntiAffinity { vms }
                }
                1 => {
                    let vms = pick(rng, 2);
                    if vms.len() < 2 {
                        continue;
                    }
                    RuleKind::VmAffinity { vms }
                }
                _ => {
                    let k = 1 + rng.below(4) as usize;
                    let vms = pick(rng, k);
                    if vms.is_empty() {
                        continue;
                    }
                    let half = (nh / 2).max(1);
                    let start = rng.below(nh - half + 1);
                    let hosts = (start..start + half).map(|h| HostId(h as u32)).collect();
                    RuleKind::VmHost { vms, hosts, run_on: rng.below(3) != 0 }
                }
            };
            c.add_rule(Rule::new(format!("rule{i}"), enforcement, kind));
        }
    }

    fn place(&self, c: &mut Cluster, rng: &mut SplitMix64) {
        let ent = entitlement::compute(c);
        let mut ledger = Ledger::new(c, &ent);
        let rules = RuleIndex::new(c);
        let nh = c.hosts.len() as u64;
        if nh == 0 {
            return;
        }
        for v in 0..c.vms.len() {
            let vm = VmId(v as u32);
            let load = c.vms[v].wanted();
            let ok = |ledger: &Ledger, h: HostId| {
                ledger.fits(vm, load, h).is_ok()
                    && rules.first_broken(c, vm, h, &ledger.where_is, &ledger.on, false).is_none()
            };
            let mut chosen = None;
            for _ in 0..12 {
                // Skewed pick: u^(1+4*skew) concentrates on low ids.
                let u = rng.f64().powf(1.0 + 4.0 * self.skew);
                let h = HostId(((u * nh as f64) as u64).min(nh - 1) as u32);
                if ok(&ledger, h) {
                    chosen = Some(h);
                    break;
                }
            }
            if chosen.is_none() {
                chosen = (0..nh as u32).map(HostId).find(|&h| ok(&ledger, h));
            }
            if let Some(h) = chosen {
                ledger.place(vm, load, h);
                c.vms[v].host = Some(h);
            }
        }
    }
}
