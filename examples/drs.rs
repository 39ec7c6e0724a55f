//! DRS over a simulated day.
//!
//! A generated cluster (16 hosts, 400 VMs, skewed placement, a pool tree, affinity,
//! anti-affinity and VM-host rules) whose demand follows a daily pattern; DRS runs every
//! 5 simulated minutes. Prints imbalance over time (terminal chart), moves per pass, must-rule
//! violations (must stay 0) and a summary table; `--json` prints the summary as one JSON object.
//!
//! ```text
//! cargo run --release --example drs
//! cargo run --release --example drs -- --threshold 5 --dpm
//! cargo run --release --example drs -- --save cluster.json --hours 0
//! cargo run --release --example drs -- --input cluster.json --manual
//! ```

use std::io::{BufRead, Write};
use std::time::Instant;

use anyhow::{Context, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vsched::dpm::{DpmConfig, PowerAction};
use vsched::drs::{Action, MigrateError, Migrator};
use vsched::model::{Cluster, HostId, HostState, Resources, VmId};
use vsched::rules::must_violations;
use vsched::sim::{ClusterGen, SplitMix64};
use vsched::{Automation, BalanceConfig, Drs, DrsConfig, imbalance};

/// DRS (cluster load balancing by live migration) over a simulated day.
#[derive(Debug, Parser)]
#[command(version)]
struct Args {
    /// Start from this cluster snapshot (JSON, as written by --save) instead of a generated one.
    #[arg(long)]
    input: Option<std::path::PathBuf>,
    /// Write the starting cluster to this JSON file.
    #[arg(long)]
    save: Option<std::path::PathBuf>,
    /// Migration threshold: 1 = only mandatory moves (rules, maintenance) .. 5 = aggressive.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=5))]
    threshold: u8,
    /// Manual automation: ask on the terminal to approve each recommendation.
    #[arg(long)]
    manual: bool,
    /// Enable power management (standby / wake recommendations).
    #[arg(long)]
    dpm: bool,
    /// Print the summary as one JSON object on stdout (and nothing else there).
    #[arg(long)]
    json: bool,
    /// Simulated hours.
    #[arg(long, default_value_t = 24)]
    hours: u32,
    /// Simulated minutes between passes.
    #[arg(long, default_value_t = 5)]
    interval_min: u32,
    /// Hosts of the generated cluster.
    #[arg(long, default_value_t = 16)]
    hosts: usize,
    /// VMs of the generated cluster.
    #[arg(long, default_value_t = 400)]
    vms: usize,
    /// Seed of the generated cluster and its demand.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Cap on load-balancing moves per pass.
    #[arg(long, default_value_t = 32)]
    max_moves: usize,
    /// Plan one pass on the starting cluster and print it (moves, reasons, waves, imbalance
    /// after) without applying anything; with --json the plan is the JSON object.
    #[arg(long)]
    dry_run: bool,
}

/// A migrator that only counts (the example has no hypervisors; vmigrate plugs in here).
#[derive(Debug, Default)]
struct SimMigrator {
    migrations: usize,
    power: usize,
}

impl Migrator for SimMigrator {
    fn migrate(&mut self, _vm: VmId, _from: HostId, _to: HostId) -> Result<(), MigrateError> {
        self.migrations += 1;
        Ok(())
    }
    fn set_power(&mut self, _host: HostId, _state: HostState) -> Result<(), MigrateError> {
        self.power += 1;
        Ok(())
    }
}

/// Daily demand: each VM has a base level, a peak hour and some noise.
struct DemandModel {
    base_cpu: Vec<f64>,
    base_mem: Vec<f64>,
    peak_h: Vec<f64>,
    rng: SplitMix64,
}

impl DemandModel {
    fn new(c: &Cluster, seed: u64) -> Self {
        let mut rng = SplitMix64::new(seed ^ 0x5eed);
        let n = c.vms.len();
        let mut peak_h = Vec::with_capacity(n);
        for _ in 0..n {
            // Two populations: office hours (peak ~14:00) and nightly batch (peak ~02:00).
            let batch = rng.below(4) == 0;
            peak_h.push(if batch { 2.0 } else { 14.0 } + 3.0 * (rng.f64() - 0.5));
        }
        DemandModel {
            base_cpu: c.vms.iter().map(|v| v.demand.cpu_mhz as f64 / v.size.cpu_mhz.max(1) as f64).collect(),
            base_mem: c.vms.iter().map(|v| v.demand.mem_mib as f64 / v.size.mem_mib.max(1) as f64).collect(),
            peak_h,
            rng,
        }
    }

    fn apply(&mut self, c: &mut Cluster, hour: f64) {
        for (i, v) in c.vms.iter_mut().enumerate() {
            let phase = (hour - self.peak_h[i]) / 24.0 * std::f64::consts::TAU;
            let diurnal = 0.5 + 0.5 * phase.cos(); // 1 at peak, 0 twelve hours later
            let noise = 0.9 + 0.2 * self.rng.f64();
            let cpu = (self.base_cpu[i] * (0.4 + 1.2 * diurnal) * noise).clamp(0.01, 1.0);
            let mem = (self.base_mem[i] * (0.8 + 0.4 * diurnal)).clamp(0.05, 1.0);
            v.demand =
                Resources::new((v.size.cpu_mhz as f64 * cpu) as u64, (v.size.mem_mib as f64 * mem) as u64);
        }
    }
}

#[derive(Debug, Serialize)]
struct Summary {
    hosts: usize,
    vms: usize,
    passes: usize,
    simulated_hours: u32,
    threshold: u8,
    automation: &'static str,
    imbalance_initial: f64,
    imbalance_mean: f64,
    imbalance_max: f64,
    imbalance_final: f64,
    moves_total: usize,
    moves_balance: usize,
    moves_mandatory: usize,
    moves_max_per_pass: usize,
    waves_max_per_pass: usize,
    rejected_or_stale: usize,
    blocked_max: usize,
    must_violations_max: usize,
    migration_s_total: f64,
    standby: usize,
    wake: usize,
    hosts_on_final: usize,
    plan_us_mean: f64,
    plan_us_max: f64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let mut cluster = match &args.input {
        Some(p) => {
            let s = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            Cluster::from_json(&s).with_context(|| format!("loading {}", p.display()))?
        }
        None => ClusterGen {
            seed: args.seed,
            hosts: args.hosts,
            vms: args.vms,
            skew: 0.7,
            rules: 24,
            ..ClusterGen::default()
        }
        .build(),
    };
    if let Some(p) = &args.save {
        std::fs::write(p, cluster.to_json()).with_context(|| format!("writing {}", p.display()))?;
        if !args.json {
            eprintln!("wrote {}", p.display());
        }
    }
    if args.interval_min == 0 {
        bail!("--interval-min must be at least 1");
    }
    let automation = if args.manual { Automation::Manual } else { Automation::Full };
    let mut drs = Drs::new(DrsConfig {
        automation,
        balance: BalanceConfig {
            threshold: args.threshold,
            max_moves_per_pass: args.max_moves,
            ..BalanceConfig::default()
        },
        dpm: DpmConfig { enabled: args.dpm, ..DpmConfig::default() },
    })?;
    if args.dry_run {
        let (plan, power) = drs.dry_run(&cluster)?;
        if args.json {
            println!("{}", serde_json::to_string(&plan)?);
        } else {
            print_plan(&plan, power.as_ref());
        }
        return Ok(());
    }
    let passes = (args.hours * 60 / args.interval_min) as usize;
    let mut demand = DemandModel::new(&cluster, args.seed);
    let mut migrator = SimMigrator::default();
    let pb = if args.manual || passes == 0 { ProgressBar::hidden() } else { ProgressBar::new(passes as u64) };
    pb.set_style(
        ProgressStyle::with_template("{spinner} simulated day [{bar:40}] {pos}/{len} passes {msg}")?
            .progress_chars("=> "),
    );
    let imbalance_initial = imbalance(&cluster);
    let mut series = Vec::with_capacity(passes);
    let mut moves_series = Vec::with_capacity(passes);
    let mut s = Summary {
        hosts: cluster.hosts.len(),
        vms: cluster.vms.len(),
        passes,
        simulated_hours: args.hours,
        threshold: args.threshold,
        automation: if args.manual { "manual" } else { "full" },
        imbalance_initial,
        imbalance_mean: 0.0,
        imbalance_max: 0.0,
        imbalance_final: imbalance_initial,
        moves_total: 0,
        moves_balance: 0,
        moves_mandatory: 0,
        moves_max_per_pass: 0,
        waves_max_per_pass: 0,
        rejected_or_stale: 0,
        blocked_max: 0,
        must_violations_max: 0,
        migration_s_total: 0.0,
        standby: 0,
        wake: 0,
        hosts_on_final: 0,
        plan_us_mean: 0.0,
        plan_us_max: 0.0,
    };
    let mut approve_all = false;
    let stdin = std::io::stdin();
    let mut plan_us = Vec::with_capacity(passes);
    let mut quit = false;
    for pass in 0..passes {
        if quit {
            break;
        }
        let hour = (pass as u32 * args.interval_min) as f64 / 60.0;
        demand.apply(&mut cluster, hour);
        let t = Instant::now();
        let report = drs.pass(&mut cluster, &mut migrator)?;
        plan_us.push(t.elapsed().as_secs_f64() * 1e6);
        let mut done = report.executed.clone();
        if args.manual {
            let recs: Vec<_> = drs.pending().cloned().collect();
            for rec in recs {
                let answer =
                    if approve_all { Answer::Yes } else { ask(&stdin, &rec.action, hour, &mut approve_all)? };
                if answer == Answer::Quit {
                    quit = true;
                    break;
                }
                if answer == Answer::No {
                    drs.reject(rec.id)?;
                    s.rejected_or_stale += 1;
                    continue;
                }
                match drs.approve(rec.id, &mut cluster, &mut migrator) {
                    Ok(()) => match rec.action {
                        Action::Migrate(m) => done.push(m),
                        Action::MigrateGroup(ms) => done.extend(ms),
                        _ => {}
                    },
                    Err(e) => {
                        eprintln!("  refused: {e}");
                        s.rejected_or_stale += 1;
                    }
                }
            }
        }
        let mandatory = done.iter().filter(|m| m.reason.is_mandatory()).count();
        s.moves_total += done.len();
        s.moves_mandatory += mandatory;
        s.moves_balance += done.len() - mandatory;
        s.moves_max_per_pass = s.moves_max_per_pass.max(done.len());
        s.waves_max_per_pass = s.waves_max_per_pass.max(report.plan.waves.len());
        s.blocked_max = s.blocked_max.max(report.plan.blocked.len());
        s.migration_s_total += done.iter().filter_map(|m| m.expected.migration_s).sum::<f64>();
        if let Some(p) = &report.power
            && cluster.hosts[p.host.idx()].state
                == match p.action {
                    PowerAction::Standby => HostState::Standby,
                    PowerAction::Wake => HostState::On,
                }
        {
            match p.action {
                PowerAction::Standby => s.standby += 1,
                PowerAction::Wake => s.wake += 1,
            }
        }
        let wi: Vec<_> = cluster.vms.iter().map(|v| v.host).collect();
        s.must_violations_max = s.must_violations_max.max(must_violations(&cluster, &wi));
        let imb = imbalance(&cluster);
        series.push(imb);
        moves_series.push(done.len());
        pb.set_message(format!("imbalance {imb:.3}, {} moves", s.moves_total));
        pb.inc(1);
    }
    pb.finish_and_clear();
    s.passes = series.len();
    if !series.is_empty() {
        s.imbalance_mean = series.iter().sum::<f64>() / series.len() as f64;
        s.imbalance_max = series.iter().cloned().fold(0.0, f64::max);
        s.imbalance_final = *series.last().unwrap_or(&imbalance_initial);
        s.plan_us_mean = plan_us.iter().sum::<f64>() / plan_us.len() as f64;
        s.plan_us_max = plan_us.iter().cloned().fold(0.0, f64::max);
    }
    s.hosts_on_final = cluster.hosts.iter().filter(|h| h.state == HostState::On).count();
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    chart(&series, &moves_series, args.interval_min, drs.config());
    table(&s);
    if s.must_violations_max != 0 {
        bail!("must-rule violations after a pass: {}", s.must_violations_max);
    }
    Ok(())
}

#[derive(Debug, PartialEq, Eq)]
enum Answer {
    Yes,
    No,
    Quit,
}

/// Asks whether to approve a recommendation: y / n / a (all from now on) / q (quit; also on
/// end of input).
fn ask(stdin: &std::io::Stdin, action: &Action, hour: f64, approve_all: &mut bool) -> anyhow::Result<Answer> {
    let what = match action {
        Action::Migrate(m) => format!(
            "move {} {} -> {} ({}; imbalance {:.4} -> {:.4}, ~{})",
            m.vm,
            m.from,
            m.to,
            m.reason,
            m.expected.imbalance_before,
            m.expected.imbalance_after,
            m.expected.migration_s.map_or("non-converging".to_string(), |s| format!("{s:.0} s")),
        ),
        Action::MigrateGroup(ms) => format!(
            "move together {} ({})",
            ms.iter().map(|m| format!("{} {} -> {}", m.vm, m.from, m.to)).collect::<Vec<_>>().join(", "),
            ms[0].reason
        ),
        Action::Power(p) => {
            format!("{:?} {} (utilization {:.2} -> {:.2})", p.action, p.host, p.util_before, p.util_after)
        }
        Action::Place { vm, host } => format!("place {vm} on {host}"),
    };
    eprint!("[{:02}:{:02}] {what}  approve? [y/N/a/q] ", hour as u32, (hour.fract() * 60.0) as u32);
    std::io::stderr().flush()?;
    let mut line = String::new();
    if stdin.lock().read_line(&mut line)? == 0 {
        eprintln!("(end of input: stopping)");
        return Ok(Answer::Quit);
    }
    match line.trim() {
        "y" | "Y" => Ok(Answer::Yes),
        "a" | "A" => {
            *approve_all = true;
            Ok(Answer::Yes)
        }
        "q" | "Q" => Ok(Answer::Quit),
        _ => Ok(Answer::No),
    }
}

fn chart(series: &[f64], moves: &[usize], interval_min: u32, cfg: &DrsConfig) {
    if series.is_empty() {
        return;
    }
    const W: usize = 72;
    const H: usize = 10;
    let cols = W.min(series.len());
    let bucket = |i: usize| {
        let a = i * series.len() / cols;
        let b = ((i + 1) * series.len() / cols).max(a + 1);
        (a, b)
    };
    let col_imb: Vec<f64> = (0..cols)
        .map(|i| {
            let (a, b) = bucket(i);
            series[a..b].iter().cloned().fold(0.0, f64::max)
        })
        .collect();
    let col_moves: Vec<usize> = (0..cols)
        .map(|i| {
            let (a, b) = bucket(i);
            moves[a..b].iter().sum()
        })
        .collect();
    let target = vsched::config::target_imbalance(cfg.balance.threshold);
    let top = col_imb.iter().cloned().fold(target.unwrap_or(0.0) * 1.2, f64::max).max(1e-6);
    println!("imbalance (std dev of normalized host entitlement), max per column; '-' / '=' = target");
    for row in (0..H).rev() {
        let lo = top * row as f64 / H as f64;
        let mut line = String::new();
        for &v in &col_imb {
            let t = target.is_some_and(|t| t > lo && t <= lo + top / H as f64 + 1e-12);
            line.push(match (v > lo, t) {
                (true, true) => '=',
                (true, false) => '#',
                (false, true) => '-',
                (false, false) => ' ',
            });
        }
        println!("{:>6.3} |{line}", lo + top / H as f64);
    }
    let sparks = [' ', '.', ':', '|', '#'];
    let mmax = col_moves.iter().cloned().max().unwrap_or(0).max(1);
    let line: String =
        col_moves.iter().map(|&m| if m == 0 { ' ' } else { sparks[(1 + m * 3 / mmax).min(4)] }).collect();
    println!(" moves |{line}  (max {mmax} per column)");
    let hours = series.len() as f64 * interval_min as f64 / 60.0;
    println!("       +{}", "-".repeat(cols));
    println!("        0h{:>width$}", format!("{hours:.0}h"), width = cols.saturating_sub(2).max(3));
}

fn print_plan(plan: &vsched::PassPlan, power: Option<&vsched::dpm::PowerRec>) {
    println!(
        "dry run: {} moves in {} waves, {} blocked; imbalance {:.4} -> {:.4} (after mandatory \
         moves {:.4})",
        plan.moves.len(),
        plan.waves.len(),
        plan.blocked.len(),
        plan.imbalance_before,
        plan.imbalance_after,
        plan.imbalance_after_mandatory
    );
    let wave_of = |i: usize| plan.waves.iter().position(|w| w.contains(&i)).unwrap_or(0);
    println!(
        "{:>4} {:>4} {:>8} {:>17} {:>3} {:>9} {:>8}  reason",
        "#", "wave", "vm", "from -> to", "pri", "gain", "migr"
    );
    for (i, m) in plan.moves.iter().enumerate() {
        println!(
            "{:>4} {:>4} {:>8} {:>17} {:>3} {:>9.5} {:>8}  {}{}",
            i,
            wave_of(i),
            m.vm.to_string(),
            format!("{} -> {}", m.from, m.to),
            m.priority,
            m.expected.imbalance_before - m.expected.imbalance_after,
            m.expected.migration_s.map_or("n/c".to_string(), |s| format!("{s:.0} s")),
            m.reason,
            if m.with_previous { " (with previous)" } else { "" }
        );
    }
    for b in &plan.blocked {
        println!("blocked {} ({}): {}", b.vm, b.reason, b.why);
    }
    if let Some(p) = power {
        println!(
            "power: {:?} {} (utilization {:.2} -> {:.2})",
            p.action, p.host, p.util_before, p.util_after
        );
    }
}

fn table(s: &Summary) {
    let rows: Vec<(&str, String)> = vec![
        ("hosts / VMs", format!("{} / {}", s.hosts, s.vms)),
        ("passes", format!("{} over {} simulated h", s.passes, s.simulated_hours)),
        ("threshold / automation", format!("{} / {}", s.threshold, s.automation)),
        (
            "imbalance initial / mean / max / final",
            format!(
                "{:.4} / {:.4} / {:.4} / {:.4}",
                s.imbalance_initial, s.imbalance_mean, s.imbalance_max, s.imbalance_final
            ),
        ),
        (
            "moves total (balance + mandatory)",
            format!("{} ({} + {})", s.moves_total, s.moves_balance, s.moves_mandatory),
        ),
        ("moves max per pass", s.moves_max_per_pass.to_string()),
        ("waves max per pass", s.waves_max_per_pass.to_string()),
        ("rejected or stale", s.rejected_or_stale.to_string()),
        ("blocked VMs (max per pass)", s.blocked_max.to_string()),
        ("must-rule violations (max)", s.must_violations_max.to_string()),
        ("estimated migration time", format!("{:.0} s", s.migration_s_total)),
        ("power: standby / wake / hosts on", format!("{} / {} / {}", s.standby, s.wake, s.hosts_on_final)),
        ("pass time mean / max", format!("{:.0} us / {:.0} us", s.plan_us_mean, s.plan_us_max)),
    ];
    let w = rows.iter().map(|r| r.0.len()).max().unwrap_or(0);
    println!();
    println!("{:<w$}  value", "summary");
    println!("{}  {}", "-".repeat(w), "-".repeat(28));
    for (k, v) in rows {
        println!("{k:<w$}  {v}");
    }
}
