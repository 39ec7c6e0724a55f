//! Random fault schedules: a seed picks the faults, their hosts, times and durations.

use super::{Sim, SimConfig, SimStats, SplitMix64, Violation};

/// One injected fault.
#[derive(Debug, Clone, PartialEq)]
pub enum Fault {
    /// The host crashes; it reboots after the delay (or at the heal if `None`).
    Crash {
        /// Host index.
        host: usize,
        /// Reboot delay.
        reboot_after_ms: Option<u64>,
    },
    /// The host's agent process stops for a while (its hardware watchdog may reset it).
    Pause {
        /// Host index.
        host: usize,
        /// Duration.
        ms: u64,
    },
    /// Symmetric partition: `side` against every other host.
    Partition {
        /// One side.
        side: Vec<usize>,
        /// Duration.
        ms: u64,
    },
    /// Heartbeats from `from` to `to` are dropped.
    OneWay {
        /// Sender.
        from: usize,
        /// Receiver.
        to: usize,
        /// Duration.
        ms: u64,
    },
    /// The host cannot reach the store.
    StoreCut {
        /// Host index.
        host: usize,
        /// Duration.
        ms: u64,
    },
    /// Nobody can reach the store.
    StoreOutage {
        /// Duration.
        ms: u64,
    },
    /// Heartbeats are lost with this probability.
    Loss {
        /// Loss probability.
        p: f64,
        /// Duration.
        ms: u64,
    },
    /// Heartbeats are delayed by up to `max_ms`.
    Delay {
        /// Maximum delay.
        max_ms: u64,
        /// Duration.
        ms: u64,
    },
}

/// A fault schedule, times relative to the end of the cluster's setup.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    /// Faults with their start times.
    pub faults: Vec<(u64, Fault)>,
    /// When every fault is lifted.
    pub heal_at_ms: u64,
    /// When the run ends.
    pub end_at_ms: u64,
}

impl Schedule {
    /// A random schedule of 1 to 5 faults in the first 8 s, healed at 9 s, ending after the
    /// liveness bound has passed.
    pub fn random(rng: &mut SplitMix64, cfg: &SimConfig) -> Self {
        let n = cfg.hosts;
        let count = rng.range(1, 5);
        let mut faults = Vec::new();
        for _ in 0..count {
            let at = rng.range(200, 8000);
            let ms = rng.range(200, 6000);
            let host = rng.below(n as u64) as usize;
            let f = match rng.below(9) {
                0 | 1 => Fault::Crash {
                    host,
                    reboot_after_ms: if rng.chance(0.5) { Some(rng.range(500, 6000)) } else { None },
                },
                2 => Fault::Pause { host, ms },
                3 => {
                    let mut side: Vec<usize> = (0..n).filter(|_| rng.chance(0.4)).collect();
                    if side.is_empty() {
                        side.push(host);
                    }
                    Fault::Partition { side, ms }
                }
                4 => {
                    let to = (host + 1 + rng.below(n as u64 - 1) as usize) % n;
                    Fault::OneWay { from: host, to, ms }
                }
                5 => Fault::StoreCut { host, ms },
                6 => Fault::StoreOutage { ms: rng.range(200, 4000) },
                7 => Fault::Loss { p: rng.range(10, 90) as f64 / 100.0, ms },
                _ => Fault::Delay { max_ms: rng.range(50, 1500), ms },
            };
            faults.push((at, f));
        }
        faults.sort_by_key(|(t, _)| *t);
        let heal = 9000;
        Self { faults, heal_at_ms: heal, end_at_ms: heal + cfg.restart_bound_ms + 1000 }
    }
}

#[derive(Debug)]
enum Op {
    Start(Fault),
    End(Fault),
    Heal,
}

/// Runs one random schedule derived from `seed`.
pub fn run_random(seed: u64, cfg: &SimConfig) -> Result<SimStats, Violation> {
    let mut sim = Sim::new(seed, cfg.clone())?;
    let mut rng = SplitMix64::new(seed ^ 0x5eed_fa17);
    let sched = Schedule::random(&mut rng, cfg);
    let t0 = sim.now_ms();
    let mut ops: Vec<(u64, Op)> = Vec::new();
    for (at, f) in &sched.faults {
        let end = match f {
            Fault::Crash { .. } => None,
            Fault::Pause { ms, .. }
            | Fault::Partition { ms, .. }
            | Fault::OneWay { ms, .. }
            | Fault::StoreCut { ms, .. }
            | Fault::StoreOutage { ms }
            | Fault::Loss { ms, .. }
            | Fault::Delay { ms, .. } => Some(at + ms),
        };
        ops.push((t0 + at, Op::Start(f.clone())));
        if let Some(e) = end.filter(|e| *e < sched.heal_at_ms) {
            ops.push((t0 + e, Op::End(f.clone())));
        }
    }
    ops.push((t0 + sched.heal_at_ms, Op::Heal));
    ops.sort_by_key(|(t, _)| *t);
    let mut ops = ops.into_iter().peekable();
    let n = cfg.hosts;
    while sim.now_ms() < t0 + sched.end_at_ms {
        while let Some((_, op)) = ops.next_if(|(t, _)| *t <= sim.now_ms()) {
            match op {
                Op::Heal => sim.heal(),
                Op::Start(f) => apply(&mut sim, &f, true, n),
                Op::End(f) => apply(&mut sim, &f, false, n),
            }
        }
        sim.step()?;
    }
    Ok(sim.stats().clone())
}

fn apply(sim: &mut Sim, f: &Fault, on: bool, n: usize) {
    match f {
        Fault::Crash { host, reboot_after_ms } => sim.crash(*host, *reboot_after_ms),
        Fault::Pause { host, .. } => sim.pause(*host, on),
        Fault::Partition { side, .. } => {
            let rest: Vec<usize> = (0..n).filter(|h| !side.contains(h)).collect();
            sim.partition(side, &rest, on);
        }
        Fault::OneWay { from, to, .. } => {
            sim.note(format!("ONE-WAY host-{from} -> host-{to} blocked={on}"));
            sim.block(*from, *to, on);
        }
        Fault::StoreCut { host, .. } => sim.cut_store(*host, on),
        Fault::StoreOutage { .. } => sim.store_outage(on),
        Fault::Loss { p, .. } => {
            sim.note(format!("LOSS {p} {on}"));
            sim.set_loss(on.then_some(*p));
        }
        Fault::Delay { max_ms, .. } => {
            sim.note(format!("DELAY {max_ms} {on}"));
            sim.set_delay(on.then_some(*max_ms));
        }
    }
}

/// Runs the random schedules of every seed in `seeds`; returns summed counters or the first
/// violation.
pub fn run_seeds(seeds: std::ops::Range<u64>, cfg: &SimConfig) -> Result<SimStats, Violation> {
    let mut total = SimStats::default();
    for seed in seeds {
        let s = run_random(seed, cfg)?;
        total.steps += s.steps;
        total.vms_powered_on += s.vms_powered_on;
        total.restarts += s.restarts;
        total.fences += s.fences;
        total.self_fences += s.self_fences;
        total.hw_resets += s.hw_resets;
        total.crashes += s.crashes;
        total.max_down_ms = total.max_down_ms.max(s.max_down_ms);
    }
    Ok(total)
}
