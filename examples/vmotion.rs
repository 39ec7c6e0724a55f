//! Live migration of a running VM (vMotion) with vinfra.
//!
//! With no arguments: a 1 GiB VM running the built-in `dirtier` guest is migrated over loopback
//! TCP to a second VM in this process; then the example proves the result (the destination's
//! memory equals the source's at pause, and the guest keeps running on the destination).
//! Subcommands run the two sides in two processes, or save and restore a snapshot file.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;
use vinfra::vcore::guest::{Dirtier, DirtierConfig, MIN_WS_START, Pattern, read_progress};
use vinfra::vcore::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vinfra::vcore::{DirtyTracking, Vm, VmBuilder, VmConfig};
use vinfra::vmigrate::transport::{DEFAULT_PEER_TIMEOUT, tcp_accept_streams, tcp_connect_streams};
use vinfra::vmigrate::{
    ConvergencePolicy, Destination, MigrationStats, Progress, ReceiveStats, Source, probe_dirty_rate,
};

/// Migrate a running VM (the built-in dirtier guest) and prove nothing was lost.
#[derive(Parser, Debug)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Skip the byte-for-byte check of the destination's memory (it runs inside the downtime,
    /// before the guest may start, and is reported separately).
    #[arg(long, global = true)]
    no_verify: bool,
    /// Print the summary as one JSON object on stdout (nothing else goes to stdout).
    #[arg(long, global = true)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Destination in this process: wait for a source on ADDR, receive, run the guest.
    Listen {
        /// Address to listen on (loopback).
        #[arg(long, default_value = "127.0.0.1:7777")]
        addr: String,
    },
    /// Source in this process: start the guest and migrate it to a listening destination.
    Send {
        /// Destination address.
        #[arg(long, default_value = "127.0.0.1:7777")]
        to: String,
    },
    /// Run the guest for a moment, then save the VM to a snapshot file.
    Save {
        /// Snapshot file.
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Restore a snapshot file into a new VM and run it.
    Restore {
        /// Snapshot file.
        #[arg(long)]
        file: std::path::PathBuf,
    },
}

#[derive(Args, Debug, Clone)]
struct VmArgs {
    /// Guest memory in MiB (both sides must agree).
    #[arg(long, default_value_t = 1024, global = true)]
    mem_mib: u64,
    /// vCPUs (both sides must agree).
    #[arg(long, default_value_t = 1, global = true)]
    vcpus: u16,
    /// Working set the guest dirties, in MiB [default: a quarter of the memory, at most 256].
    #[arg(long, global = true)]
    ws_mib: Option<u64>,
    /// Pages per second the guest dirties; 0 = as fast as it can.
    #[arg(long, default_value_t = 50_000, global = true)]
    rate: u64,
    /// Which pages the guest dirties.
    #[arg(long, value_enum, default_value_t = PatternArg::Random, global = true)]
    pattern: PatternArg,
    /// Track dirty pages with per-vCPU KVM dirty rings of this many entries (a power of two,
    /// 256 to 65536) instead of the KVM dirty log; a vCPU whose ring fills up harvests it.
    #[arg(long, global = true)]
    dirty_ring: Option<u32>,
    /// Back guest memory with transparent huge pages (MADV_HUGEPAGE).
    #[arg(long, global = true)]
    huge_pages: bool,
    /// Allocate all guest memory when a VM is built (MADV_POPULATE_WRITE), so that the
    /// destination takes no page fault per page it receives.
    #[arg(long, global = true)]
    prealloc: bool,
}

#[derive(ValueEnum, Debug, Clone, Copy)]
enum PatternArg {
    Sequential,
    Random,
    Hotcold,
}

#[derive(Args, Debug, Clone)]
struct PolicyArgs {
    /// Switch over once the predicted downtime is at most this many milliseconds.
    #[arg(long, default_value_t = 300, global = true)]
    downtime_ms: u64,
    /// Bandwidth limit in MiB/s (0 = none).
    #[arg(long, default_value_t = 0, global = true)]
    bandwidth_mib: u64,
    /// Do not throttle the vCPUs when the guest dirties faster than the link drains.
    #[arg(long, global = true)]
    no_auto_converge: bool,
    /// Most pre-copy iterations.
    #[arg(long, default_value_t = 30, global = true)]
    max_iterations: u32,
    /// LZ4-compress page frames that shrink by at least an eighth (for slow links, with
    /// --bandwidth-mib).
    #[arg(long, global = true)]
    compress: bool,
    /// Copy every page into the send buffer first instead of sending long stretches straight
    /// out of guest memory (live pages, protocol version 4, the default).
    #[arg(long, global = true)]
    copy_pages: bool,
    /// Send the pages over this many extra TCP connections, each with a thread of its own on
    /// both sides (both sides must agree); 0 = the main connection carries them.
    #[arg(long, default_value_t = 0, global = true, value_parser = clap::value_parser!(u16).range(0..=64))]
    streams: u16,
}

impl VmArgs {
    fn config(&self) -> VmConfig {
        let dirty_tracking = match self.dirty_ring {
            Some(entries) => DirtyTracking::Ring { entries },
            None => DirtyTracking::None, // the migration turns the dirty log on per slot
        };
        VmConfig {
            mem_mib: self.mem_mib,
            vcpus: self.vcpus,
            dirty_tracking,
            huge_pages: self.huge_pages,
            prealloc: self.prealloc,
        }
    }
    /// Pages the guest writes in about a second (at most `cap`, at least one).
    fn pages_in_a_second(&self, cap: u64) -> u64 {
        let per_sec = if self.rate == 0 { u64::MAX } else { self.rate };
        cap.min(per_sec).max(1)
    }
    fn ws_mib(&self) -> u64 {
        self.ws_mib.unwrap_or((self.mem_mib / 4).clamp(1, 256))
    }
    fn dirtier(&self) -> DirtierConfig {
        let ws_pages = (self.ws_mib() << 20) / 4096;
        DirtierConfig {
            ws_start: MIN_WS_START,
            ws_pages,
            pattern: match self.pattern {
                PatternArg::Sequential => Pattern::Sequential,
                PatternArg::Random => Pattern::Random,
                PatternArg::Hotcold => {
                    Pattern::HotCold { hot_pages: (ws_pages / 16).max(1), hot_percent: 90 }
                }
            },
            pages_per_sec: self.rate,
            seed: 42,
        }
    }
}

impl PolicyArgs {
    fn policy(&self) -> ConvergencePolicy {
        ConvergencePolicy {
            downtime_limit_ms: self.downtime_ms,
            bandwidth_limit_bps: (self.bandwidth_mib > 0).then_some(self.bandwidth_mib << 20),
            auto_converge: !self.no_auto_converge,
            max_iterations: self.max_iterations,
            compress: self.compress,
            zero_copy: !self.copy_pages,
            ..Default::default()
        }
    }
}

fn start_source(args: &VmArgs) -> Result<Vm> {
    let d = args.dirtier();
    let vm = VmBuilder::new(args.config()).payload(Dirtier(d)).build().context("building the source VM")?;
    vm.start()?;
    // Through its working set once (at most 10,000 pages, at most a second of its work), so
    // that there is something to migrate.
    let want = args.pages_in_a_second(d.ws_pages.min(10_000));
    let t = Instant::now();
    while read_progress(vm.memory()).pages_written < want {
        if t.elapsed() > Duration::from_secs(30) {
            bail!("the guest does not run: {:?}", vm.next_event(Duration::ZERO));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    Ok(vm)
}

/// CRC32C of each memory region.
fn memory_digest(vm: &Vm) -> Vec<u32> {
    vm.memory()
        .iter()
        .map(|r| {
            let mut buf = vec![0u8; 4 << 20];
            let mut crc = vinfra::vmigrate::stream::Crc32c::new();
            let mut off = 0;
            while off < r.len() {
                let n = (r.len() - off).min(buf.len() as u64) as usize;
                vinfra::vcore::vm_memory::Bytes::read_slice(
                    vm.memory(),
                    &mut buf[..n],
                    vinfra::vcore::vm_memory::GuestAddress(r.start_addr().0 + off),
                )
                .expect("read guest memory");
                crc.update(&buf[..n]);
                off += n as u64;
            }
            crc.finish()
        })
        .collect()
}

/// Progress bars: one per iteration.
fn progress_printer(quiet: bool) -> impl FnMut(&Progress) {
    let bar: Arc<Mutex<Option<ProgressBar>>> = Arc::new(Mutex::new(None));
    move |p| {
        let mut bar = bar.lock().unwrap();
        match p {
            Progress::Pages { iteration, done, total } => {
                let b = bar.get_or_insert_with(|| {
                    let b = ProgressBar::new(*total);
                    if quiet {
                        b.set_draw_target(ProgressDrawTarget::hidden());
                    }
                    b.set_style(
                        ProgressStyle::with_template(
                            "iteration {msg:>3} {bar:40} {pos}/{len} pages {per_sec}",
                        )
                        .unwrap(),
                    );
                    b.set_message(iteration.to_string());
                    b
                });
                b.set_position(*done);
            }
            Progress::IterationDone(it) => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                if !quiet {
                    eprintln!(
                        "iteration {:>3}: {:>8} dirty, {:>8} sent, {:>7.1} MiB/s, dirty rate {:>8.0} pages/s, throttle {:>2}%, expected downtime {:?}",
                        it.index,
                        it.dirty_pages,
                        it.normal_pages + it.zero_pages,
                        it.bandwidth_bps / (1 << 20) as f64,
                        it.dirty_rate_pps,
                        it.throttle_percent,
                        it.expected_downtime
                    );
                }
            }
            Progress::ForcingSwitchover { reason, expected_downtime } if !quiet => {
                eprintln!("{reason}: switching over anyway, expected downtime {expected_downtime:?}")
            }
            Progress::Paused { remaining_pages } if !quiet => {
                eprintln!("paused; {remaining_pages} pages left to send")
            }
            _ => {}
        }
    }
}

#[derive(Serialize, Default)]
struct Summary {
    mode: &'static str,
    mem_mib: u64,
    vcpus: u16,
    ws_mib: u64,
    rate_pps: u64,
    pattern: String,
    dirty_tracking: String,
    /// Dirty rate measured by `probe_dirty_rate` for 200 ms before migrating (pages/s).
    probed_dirty_pps: Option<f64>,
    total_ms: f64,
    setup_ms: f64,
    downtime_ms: f64,
    verification_ms: f64,
    downtime_without_verification_ms: f64,
    pause_ms: f64,
    final_copy_ms: f64,
    handover_ms: f64,
    iterations: usize,
    bytes_sent: u64,
    normal_pages: u64,
    zero_pages: u64,
    compressed_pages: u64,
    live_pages: u64,
    torn_pages: u64,
    throughput_mib_s: f64,
    max_throttle_percent: u8,
    data_streams: usize,
    memory_equal_at_pause: Option<bool>,
    guest_pages_at_pause: u64,
    guest_pages_on_destination: u64,
    guest_keeps_running: bool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fill(s: &mut Summary, st: &MigrationStats) {
    s.total_ms = ms(st.total);
    s.setup_ms = ms(st.setup);
    s.downtime_ms = ms(st.downtime);
    s.downtime_without_verification_ms = s.downtime_ms;
    s.pause_ms = ms(st.pause_latency);
    s.final_copy_ms = ms(st.final_copy);
    s.handover_ms = ms(st.handover);
    s.iterations = st.iterations.len();
    s.bytes_sent = st.bytes_sent;
    s.normal_pages = st.normal_pages;
    s.zero_pages = st.zero_pages;
    s.compressed_pages = st.compressed_pages;
    s.live_pages = st.live_pages;
    s.throughput_mib_s = st.throughput_bps / (1 << 20) as f64;
    s.max_throttle_percent = st.max_throttle_percent;
    s.data_streams = st.data_streams;
}

fn summary_for(mode: &'static str, a: &VmArgs) -> Summary {
    Summary {
        mode,
        mem_mib: a.mem_mib,
        vcpus: a.vcpus,
        ws_mib: a.ws_mib(),
        rate_pps: a.rate,
        pattern: format!("{:?}", a.pattern).to_lowercase(),
        dirty_tracking: a.dirty_ring.map_or("log".into(), |n| format!("ring of {n} entries per vCPU")),
        ..Default::default()
    }
}

/// Whether the guest on `vm` writes `step` more pages than `from` within 10 s.
fn keeps_running(vm: &Vm, from: u64, step: u64) -> (bool, u64) {
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(10) {
        let now = read_progress(vm.memory()).pages_written;
        if now >= from + step {
            return (true, now);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    (false, read_progress(vm.memory()).pages_written)
}

/// What the source guest dirties, probed for a moment before migrating (as a scheduler would).
fn probe(vm: &Vm) -> Result<f64> {
    Ok(probe_dirty_rate(vm, Duration::from_millis(200)).context("dirty-rate probe")?.pages_per_sec)
}

fn local(cli: &Cli) -> Result<Summary> {
    let src = start_source(&cli.vm)?;
    let probed = probe(&src)?;
    let dst = VmBuilder::new(cli.vm.config()).build().context("building the destination VM")?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?;
    let arrived = Arc::new(Mutex::new((Vec::new(), Duration::ZERO)));
    let verify = !cli.no_verify;
    let streams = usize::from(cli.policy.streams);
    let stats = std::thread::scope(|s| -> Result<(MigrationStats, u64)> {
        let arrived = arrived.clone();
        let dst = &dst;
        let receiver = s.spawn(move || -> Result<ReceiveStats> {
            let (conn, data) = tcp_accept_streams(&listener, streams, DEFAULT_PEER_TIMEOUT)?;
            let record = move |vm: &Vm| {
                if verify {
                    let t = Instant::now();
                    let digest = memory_digest(vm);
                    *arrived.lock().unwrap() = (digest, t.elapsed());
                }
            };
            Ok(Destination::new(dst).on_restored(record).run_streams(conn, data)?)
        });
        let (conn, data) = tcp_connect_streams(addr, streams, DEFAULT_PEER_TIMEOUT)?;
        let stats = Source::new(&src, cli.policy.policy())
            .progress(progress_printer(cli.json))
            .run_streams(conn, data);
        let received = receiver.join().map_err(|_| anyhow::anyhow!("receiver panicked"))?;
        let stats = stats.context("migration")?;
        let received = received.context("destination")?;
        Ok((stats, received.torn_pages))
    })?;
    let (stats, torn) = stats;
    let mut s = summary_for("local", &cli.vm);
    s.probed_dirty_pps = Some(probed);
    fill(&mut s, &stats);
    s.torn_pages = torn;
    let (digest, verification) = arrived.lock().unwrap().clone();
    s.verification_ms = ms(verification);
    s.downtime_without_verification_ms = s.downtime_ms - s.verification_ms;
    s.memory_equal_at_pause = verify.then(|| memory_digest(&src) == digest);
    s.guest_pages_at_pause = read_progress(src.memory()).pages_written;
    (s.guest_keeps_running, s.guest_pages_on_destination) =
        keeps_running(&dst, s.guest_pages_at_pause, cli.vm.pages_in_a_second(1000));
    Ok(s)
}

fn print_table(s: &Summary) {
    let migrating = matches!(s.mode, "local" | "send");
    let receiving = matches!(s.mode, "local" | "listen" | "restore");
    let mut rows: Vec<(&str, String)> = vec![
        (
            "VM",
            format!(
                "{} MiB, {} vCPU(s), dirtier {} over {} MiB at {} pages/s, dirty {}",
                s.mem_mib, s.vcpus, s.pattern, s.ws_mib, s.rate_pps, s.dirty_tracking
            ),
        ),
        ("total time", format!("{:.1} ms", s.total_ms)),
    ];
    if matches!(s.mode, "local" | "send" | "listen") {
        let pages_on = match s.data_streams {
            0 => "the main connection".to_string(),
            n => format!("{n} data streams (connections) besides the main one"),
        };
        rows.push(("pages carried by", pages_on));
    }
    if let Some(pps) = s.probed_dirty_pps {
        rows.push((
            "dirty rate (probe)",
            format!(
                "{pps:.0} pages/s ({:.1} MiB/s), sampled 200 ms before migrating",
                pps * 4096.0 / 1048576.0
            ),
        ));
    }
    if migrating {
        rows.push(("setup", format!("{:.1} ms", s.setup_ms)));
        rows.push((
            "downtime",
            format!(
                "{:.2} ms (pause {:.2}, final copy {:.2}, handover {:.2})",
                s.downtime_without_verification_ms, s.pause_ms, s.final_copy_ms, s.handover_ms
            ),
        ));
        if s.memory_equal_at_pause.is_some() {
            rows.push((
                "+ memory verification",
                format!(
                    "{:.2} ms checking memory before the guest starts (--no-verify skips it)",
                    s.verification_ms
                ),
            ));
        }
        rows.push(("iterations", s.iterations.to_string()));
        rows.push(("throughput", format!("{:.1} MiB/s", s.throughput_mib_s)));
        rows.push(("max throttle", format!("{} %", s.max_throttle_percent)));
    }
    let bytes = format!("{:.1} MiB", s.bytes_sent as f64 / (1 << 20) as f64);
    rows.push(if s.mode == "save" {
        ("snapshot size", bytes)
    } else {
        ("transferred", format!("{bytes}: {} pages with data, {} zero pages", s.normal_pages, s.zero_pages))
    });
    if s.compressed_pages > 0 {
        rows.push(("compressed (LZ4)", format!("{} of the data pages", s.compressed_pages)));
    }
    if s.live_pages > 0 || s.torn_pages > 0 {
        rows.push((
            "sent live (no copy)",
            format!(
                "{} of the data pages; {} arrived torn (written while sent) and came again",
                s.live_pages, s.torn_pages
            ),
        ));
    }
    if let Some(eq) = s.memory_equal_at_pause {
        rows.push(("memory equal at pause", if eq { "yes".into() } else { "NO".into() }));
    }
    if receiving {
        let state = if s.guest_keeps_running { "keeps running" } else { "STOPPED" };
        rows.push((
            "guest progress",
            format!(
                "{} pages at handover, {} now: {state}",
                s.guest_pages_at_pause, s.guest_pages_on_destination
            ),
        ));
    } else {
        rows.push(("guest progress", format!("{} pages written when paused", s.guest_pages_at_pause)));
    }
    println!("\nvmotion ({})", s.mode);
    println!("{:-<100}", "");
    for (k, v) in rows {
        println!("{k:<24} {v}");
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let summary = match &cli.command {
        None => local(&cli)?,
        Some(Command::Send { to }) => {
            let src = start_source(&cli.vm)?;
            let probed = probe(&src)?;
            let (conn, data) =
                tcp_connect_streams(to.as_str(), usize::from(cli.policy.streams), DEFAULT_PEER_TIMEOUT)
                    .with_context(|| format!("connecting to {to}"))?;
            let stats = Source::new(&src, cli.policy.policy())
                .progress(progress_printer(cli.json))
                .run_streams(conn, data)?;
            let mut s = summary_for("send", &cli.vm);
            s.probed_dirty_pps = Some(probed);
            fill(&mut s, &stats);
            s.guest_pages_at_pause = read_progress(src.memory()).pages_written;
            s
        }
        Some(Command::Listen { addr }) => {
            let listener = TcpListener::bind(addr).with_context(|| format!("listening on {addr}"))?;
            if !cli.json {
                eprintln!("waiting for a source on {addr}");
            }
            let dst = VmBuilder::new(cli.vm.config()).build()?;
            let (conn, data) =
                tcp_accept_streams(&listener, usize::from(cli.policy.streams), DEFAULT_PEER_TIMEOUT)?;
            let t = Instant::now();
            let r = Destination::new(&dst).run_streams(conn, data)?;
            let mut s = summary_for("listen", &cli.vm);
            s.total_ms = ms(t.elapsed());
            s.bytes_sent = r.bytes;
            s.normal_pages = r.normal_pages;
            s.zero_pages = r.zero_pages;
            s.torn_pages = r.torn_pages;
            s.data_streams = r.data_streams;
            s.iterations = r.iterations as usize;
            s.guest_pages_at_pause = read_progress(dst.memory()).pages_written;
            (s.guest_keeps_running, s.guest_pages_on_destination) =
                keeps_running(&dst, s.guest_pages_at_pause, cli.vm.pages_in_a_second(1000));
            s
        }
        Some(Command::Save { file }) => {
            let src = start_source(&cli.vm)?;
            let t = Instant::now();
            let mut f = std::fs::File::create(file)?;
            let bytes = vinfra::vmigrate::save_snapshot(&src, &mut f, None)?;
            let mut s = summary_for("save", &cli.vm);
            s.total_ms = ms(t.elapsed());
            s.bytes_sent = bytes;
            s.guest_pages_at_pause = read_progress(src.memory()).pages_written;
            s.memory_equal_at_pause = None;
            s
        }
        Some(Command::Restore { file }) => {
            let dst = VmBuilder::new(cli.vm.config()).build()?;
            let t = Instant::now();
            let mut f = std::fs::File::open(file)?;
            let r = Destination::new(&dst).restore_file(&mut f)?;
            dst.start()?;
            let mut s = summary_for("restore", &cli.vm);
            s.total_ms = ms(t.elapsed());
            s.bytes_sent = r.bytes;
            s.normal_pages = r.normal_pages;
            s.zero_pages = r.zero_pages;
            s.guest_pages_at_pause = read_progress(dst.memory()).pages_written;
            (s.guest_keeps_running, s.guest_pages_on_destination) =
                keeps_running(&dst, s.guest_pages_at_pause, cli.vm.pages_in_a_second(1000));
            s
        }
    };
    if cli.json {
        println!("{}", serde_json::to_string(&summary)?);
    } else {
        print_table(&summary);
    }
    if summary.memory_equal_at_pause == Some(false) {
        bail!("destination memory differs from the source at pause");
    }
    Ok(())
}
