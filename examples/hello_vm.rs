//! Boots the built-in `hello` guest on KVM, prints its output and timings.
//!
//! `cargo run --release --example hello_vm` (no flags needed; `--help` lists them).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vinfra::vcore::guest::{self, Console, ExitPort, Hello, MmioProbe};
use vinfra::vcore::{BusDevice, VmBuilder, VmConfig};

/// Boot the built-in `hello` guest (64-bit, CPL 3) and report what it printed and how long each
/// step took.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 64)]
    mem_mib: u64,
    /// Number of vCPUs (vCPUs other than 0 count ticks while vCPU 0 says hello).
    #[arg(long, default_value_t = 1)]
    vcpus: u16,
    /// Boot the VM this many times and report the median and worst timings.
    #[arg(long, default_value_t = 1)]
    runs: u32,
    /// Print the summary as one JSON object on stdout (and nothing else there).
    #[arg(long)]
    json: bool,
}

/// A console that remembers when the first byte arrived.
struct TimedConsole {
    inner: Console,
    first: Mutex<Option<Instant>>,
}

impl BusDevice for TimedConsole {
    fn read(&self, offset: u64, data: &mut [u8]) {
        self.inner.read(offset, data);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.first.lock().unwrap().get_or_insert_with(Instant::now);
        self.inner.write(offset, data);
    }
}

struct Run {
    create: Duration,
    first_exit: Duration,
    done: Duration,
    output: String,
    exit_code: u32,
    pio_exits: u64,
    mmio_exits: u64,
}

fn boot_once(args: &Args) -> Result<Run> {
    let t0 = Instant::now();
    let cfg = VmConfig { mem_mib: args.mem_mib, vcpus: args.vcpus, ..Default::default() };
    let vm = VmBuilder::new(cfg).payload(Hello).build().context("building the VM")?;
    let create = t0.elapsed();
    let console = Arc::new(TimedConsole { inner: Console::new(), first: Mutex::new(None) });
    let exit = Arc::new(ExitPort::new());
    vm.pio_bus().insert(guest::CONSOLE_PORT.into(), 1, console.clone())?;
    vm.pio_bus().insert(guest::EXIT_PORT.into(), 4, exit.clone())?;
    vm.mmio_bus().insert(guest::MMIO_PROBE_ADDR, 0x1000, Arc::new(MmioProbe::new(0x600d_cafe)))?;
    let t1 = Instant::now();
    vm.start()?;
    let Some(exit_code) = exit.wait(Duration::from_secs(30)) else {
        bail!("the guest did not finish in 30 s (event: {:?})", vm.next_event(Duration::ZERO));
    };
    let done = t1.elapsed();
    let first_exit = console.first.lock().unwrap().map(|t| t - t1).unwrap_or(done);
    vm.shutdown();
    let stats = vm.vcpu_stats(0).context("vCPU 0")?;
    Ok(Run {
        create,
        first_exit,
        done,
        output: String::from_utf8_lossy(&console.inner.output()).into_owned(),
        exit_code,
        pio_exits: stats.pio.load(std::sync::atomic::Ordering::Relaxed),
        mmio_exits: stats.mmio.load(std::sync::atomic::Ordering::Relaxed),
    })
}

#[derive(Serialize)]
struct Summary {
    guest: &'static str,
    runs: u32,
    mem_mib: u64,
    vcpus: u16,
    output: String,
    exit_code: u32,
    vm_create_us_median: f64,
    first_exit_us_median: f64,
    guest_done_us_median: f64,
    vm_create_us_max: f64,
    first_exit_us_max: f64,
    guest_done_us_max: f64,
    pio_exits: u64,
    mmio_exits: u64,
}

fn median_max(mut v: Vec<Duration>) -> (f64, f64) {
    v.sort();
    let us = |d: Duration| d.as_secs_f64() * 1e6;
    (us(v[v.len() / 2]), us(*v.last().unwrap_or(&Duration::ZERO)))
}

fn main() -> Result<()> {
    let args = Args::parse();
    if args.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let bar = ProgressBar::new(u64::from(args.runs)).with_message("booting hello");
    bar.set_style(ProgressStyle::with_template("{msg} {bar:30} {pos}/{len} [{elapsed}]")?);
    if args.json || args.runs == 1 {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut runs = Vec::new();
    for _ in 0..args.runs {
        runs.push(boot_once(&args)?);
        bar.inc(1);
    }
    bar.finish_and_clear();
    let last = runs.last().context("no run")?;
    let (create_med, create_max) = median_max(runs.iter().map(|r| r.create).collect());
    let (first_med, first_max) = median_max(runs.iter().map(|r| r.first_exit).collect());
    let (done_med, done_max) = median_max(runs.iter().map(|r| r.done).collect());
    let summary = Summary {
        guest: "hello",
        runs: args.runs,
        mem_mib: args.mem_mib,
        vcpus: args.vcpus,
        output: last.output.clone(),
        exit_code: last.exit_code,
        vm_create_us_median: create_med,
        first_exit_us_median: first_med,
        guest_done_us_median: done_med,
        vm_create_us_max: create_max,
        first_exit_us_max: first_max,
        guest_done_us_max: done_max,
        pio_exits: last.pio_exits,
        mmio_exits: last.mmio_exits,
    };
    if args.json {
        println!("{}", serde_json::to_string(&summary)?);
        return Ok(());
    }
    println!("guest output: {}", summary.output.trim_end());
    println!("exit code:    {:#x} (the MMIO probe's answer, read back by the guest)", summary.exit_code);
    println!();
    println!("{:<34} {:>12} {:>12}", format!("hello_vm ({} run(s))", args.runs), "median", "max");
    println!("{:-<60}", "");
    println!("{:<34} {:>9.0} µs {:>9.0} µs", "VM create (KVM VM, memory, vCPUs)", create_med, create_max);
    println!("{:<34} {:>9.0} µs {:>9.0} µs", "start to first exit (console byte)", first_med, first_max);
    println!("{:<34} {:>9.0} µs {:>9.0} µs", "start to guest done", done_med, done_max);
    println!("{:<34} {:>12} {:>12}", "PIO / MMIO exits (vCPU 0)", summary.pio_exits, summary.mmio_exits);
    Ok(())
}
