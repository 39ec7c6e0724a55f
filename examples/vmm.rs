//! A small VMM on vinfra: boots a Linux kernel with virtio devices described in ACPI, or, with no
//! flags, runs the built-in `virtio_rng` guest that drives a virtio-rng device by itself.
//! `--migrate-after N` live-migrates that VM, with its devices, to a second VM once the guest
//! has made N requests; the guest finishes its loop there.
//!
//! `cargo run --release --example vmm` (no flags needed; `--help` lists them).
//! Linux: `bash scripts/guest-assets.sh && cargo run --release --example vmm -- --kernel
//! assets/guest/vmlinux --initramfs assets/guest/initramfs.cpio.gz --disk assets/guest/disk.ext4`

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use vinfra::vcore::guest::{EXIT_PORT, ExitPort};
use vinfra::vcore::{Snapshot, Vm, VmBuilder, VmConfig};
use vinfra::vdevices::guest::VirtioRng;
use vinfra::vdevices::legacy::{
    COM1_GSI, COM1_PORT, IrqLine, LegacySerial, SERIAL_PORTS, SerialIo, SerialSnapshot,
};
use vinfra::vdevices::machine::{DEFAULT_CMDLINE, LinuxConfig, LinuxMachine, SharedOut};
use vinfra::vdevices::set::{restore_device, section};
use vinfra::vdevices::virtio::block::BlockConfig;
use vinfra::vdevices::virtio::rng::Rng;
use vinfra::vdevices::{DeviceSet, DeviceState, EventLoop, MmioTransport};
use vinfra::vmigrate::transport::{DEFAULT_PEER_TIMEOUT, channel_pair};
use vinfra::vmigrate::{ConvergencePolicy, Destination, Source};

/// Boot a Linux kernel with virtio-blk/net/console/rng over virtio-mmio (ACPI-described), COM1
/// and an i8042; with no --kernel, run the built-in guest that drives virtio-rng from CPL 3.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Kernel to boot (ELF vmlinux or bzImage). Without it the built-in virtio_rng guest runs.
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Initramfs for the kernel.
    #[arg(long, requires = "kernel")]
    initramfs: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = DEFAULT_CMDLINE, requires = "kernel")]
    cmdline: String,
    /// Raw disk image served as virtio-blk (/dev/vda).
    #[arg(long, requires = "kernel")]
    disk: Option<PathBuf>,
    /// Serve the disk read-only.
    #[arg(long, requires = "disk")]
    read_only: bool,
    /// Tap interface for virtio-net (created if missing; needs CAP_NET_ADMIN).
    #[arg(long, requires = "kernel")]
    net_tap: Option<String>,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Built-in guest: virtio-rng requests to make.
    #[arg(long, default_value_t = 2000)]
    iterations: u64,
    /// Built-in guest: live-migrate the VM with its devices (virtio-rng, COM1) to a second VM in
    /// this process once the guest has made this many requests.
    #[arg(long, conflicts_with = "kernel")]
    migrate_after: Option<u64>,
    /// Linux: stop after this many seconds (or at a guest reset, or when the init script ends).
    #[arg(long, default_value_t = 60)]
    timeout_s: u64,
    /// Print the summary as one JSON object on stdout (guest console goes to stderr).
    #[arg(long)]
    json: bool,
}

#[derive(Serialize, Default)]
struct Summary {
    mode: &'static str,
    memory_mib: u64,
    vcpus: u8,
    vm_create_ms: f64,
    first_console_byte_ms: Option<f64>,
    run_ms: f64,
    console_bytes: u64,
    requests: Option<u64>,
    notify_to_used_us_mean: Option<f64>,
    notify_to_used_us_min: Option<f64>,
    notify_to_used_us_max: Option<f64>,
    mmio_exits: u64,
    pio_exits: u64,
    devices: Vec<DeviceSummary>,
    guest_reset: bool,
    init_done: Option<bool>,
    migration: Option<MigrationSummary>,
}

#[derive(Serialize)]
struct MigrationSummary {
    after_requests: u64,
    total_ms: f64,
    downtime_ms: f64,
    device_sections: usize,
}

#[derive(Serialize)]
struct DeviceSummary {
    name: &'static str,
    base: String,
    gsi: u32,
    status: u32,
    notifications: u64,
    interrupts: u64,
}

fn console(json: bool) -> Box<dyn Write + Send> {
    if json { Box::new(std::io::stderr()) } else { Box::new(std::io::stdout()) }
}

fn spinner(json: bool, msg: &str) -> Result<ProgressBar> {
    let bar = ProgressBar::new_spinner().with_message(msg.to_string());
    bar.set_style(ProgressStyle::with_template("{spinner} {msg} [{elapsed}]")?);
    if json {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::stderr());
        bar.enable_steady_tick(Duration::from_millis(100));
    }
    Ok(bar)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// COM1 on `vm`'s port bus, new or restored from `state`.
fn com1(vm: &Vm, json: bool, state: Option<&SerialSnapshot>) -> Result<LegacySerial> {
    let irq = IrqLine::new()?;
    vm.vm_fd().register_irqfd(irq.evt(), COM1_GSI).context("COM1 irqfd")?;
    let io = SerialIo { irq, input: None, output: console(json) };
    let serial = match state {
        None => LegacySerial::new(io)?,
        Some(s) => LegacySerial::restore(io, s)?,
    };
    vm.pio_bus().insert(COM1_PORT.into(), SERIAL_PORTS, Arc::new(serial.clone()))?;
    Ok(serial)
}

fn bytes_served(rng: &MmioTransport) -> u64 {
    match rng.save().device {
        DeviceState::Rng(r) => r.bytes_served,
        _ => 0,
    }
}

fn builtin(args: &Args) -> Result<Summary> {
    let guest = VirtioRng { iterations: args.iterations, ..Default::default() };
    let config = VmConfig { mem_mib: args.memory.max(32), vcpus: args.vcpus.into(), ..Default::default() };
    let t0 = Instant::now();
    let mut vm = VmBuilder::new(config.clone()).payload(guest).build().context("building the VM")?;
    let mut serial = com1(&vm, args.json, None)?;
    let mut exit = Arc::new(ExitPort::new());
    vm.pio_bus().insert(EXIT_PORT.into(), 4, exit.clone())?;
    let mut rng = MmioTransport::new(vm.memory().clone(), Box::new(Rng::new()))?;
    rng.attach(&vm, guest.mmio_base, 5)?;
    // The device thread of whichever VM runs the guest (kept alive to the end).
    let mut _events = EventLoop::start()?;
    _events.add(Arc::new(rng.clone()))?;
    let create = t0.elapsed();
    let bar = spinner(args.json, "virtio_rng guest running")?;
    let t1 = Instant::now();
    vm.start()?;
    let mut migration = None;
    let mut first_byte = None;
    if let Some(after) = args.migrate_after {
        let want = after.min(args.iterations) * u64::from(guest.buf_len);
        while bytes_served(&rng) < want && exit.code().is_none() && t1.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(1));
        }
        if exit.code().is_some() {
            bail!("the guest finished before {after} requests: nothing left to migrate");
        }
        bar.set_message("migrating the VM and its devices");
        first_byte = serial.first_byte_at();
        let after_requests = bytes_served(&rng) / u64::from(guest.buf_len);
        let dst = VmBuilder::new(config).build().context("building the destination VM")?;
        let dst_exit = Arc::new(ExitPort::new());
        dst.pio_bus().insert(EXIT_PORT.into(), 4, dst_exit.clone())?;
        let dst_events = EventLoop::start()?;
        let restored = std::sync::Mutex::new(None);
        let (a, b) = channel_pair(2, DEFAULT_PEER_TIMEOUT);
        let (sent, received) = std::thread::scope(|s| {
            let recv = s.spawn(|| {
                Destination::new(&dst)
                    .devices(|sections| {
                        let restore = || -> Result<(LegacySerial, MmioTransport)> {
                            let serial_state = SerialSnapshot::from_bytes(section(sections, "com1")?)?;
                            let serial = com1(&dst, args.json, Some(&serial_state))?;
                            let rng_section = section(sections, "virtio-rng")?;
                            let t = MmioTransport::from_section(
                                dst.memory().clone(),
                                rng_section,
                                restore_device,
                            )?;
                            t.attach(&dst, guest.mmio_base, 5)?;
                            dst_events.add(Arc::new(t.clone()))?;
                            Ok((serial, t))
                        };
                        let devices = restore().map_err(|e| format!("{e:#}"))?;
                        *restored.lock().unwrap_or_else(|p| p.into_inner()) = Some(devices);
                        Ok(())
                    })
                    .run(b)
            });
            let sent = Source::new(&vm, ConvergencePolicy::default())
                .devices(DeviceSet::new().serial("com1", serial.clone()).virtio("virtio-rng", rng.clone()))
                .run(a);
            (sent, recv.join())
        });
        let stats = sent.context("migration")?;
        received.map_err(|_| anyhow::anyhow!("the destination thread panicked"))?.context("destination")?;
        let (dst_serial, dst_rng) =
            restored.into_inner().unwrap_or_else(|p| p.into_inner()).context("devices restored")?;
        migration = Some(MigrationSummary {
            after_requests,
            total_ms: ms(stats.total),
            downtime_ms: ms(stats.downtime),
            device_sections: 2,
        });
        (vm, serial, exit, rng, _events) = (dst, dst_serial, dst_exit, dst_rng, dst_events);
        bar.set_message("virtio_rng guest running on the destination");
    }
    let code = exit.wait(Duration::from_secs(120));
    let run = t1.elapsed();
    bar.finish_and_clear();
    vm.pause()?;
    let Some(code) = code else {
        bail!("the guest did not finish in 120 s ({:?})", vm.next_event(Duration::ZERO))
    };
    if u64::from(code) != args.iterations {
        bail!("the guest stopped with code {code:#x} after {:?}", VirtioRng::read_result(vm.memory()));
    }
    let r = VirtioRng::read_result(vm.memory())?;
    if bytes_served(&rng) != args.iterations * u64::from(guest.buf_len) {
        bail!("the device served {} bytes for {} requests", bytes_served(&rng), args.iterations);
    }
    let khz = f64::from(vm.tsc_khz().max(1));
    let us = |cycles: u64| cycles as f64 / khz * 1e3;
    let stats = vm.vcpu_stats(0).context("vCPU 0")?;
    let t = rng.stats();
    Ok(Summary {
        mode: if migration.is_some() {
            "builtin virtio_rng guest, migrated"
        } else {
            "builtin virtio_rng guest"
        },
        memory_mib: args.memory.max(32),
        vcpus: args.vcpus,
        vm_create_ms: ms(create),
        first_console_byte_ms: first_byte.or(serial.first_byte_at()).map(|t| ms(t - t1)),
        run_ms: ms(run),
        console_bytes: serial.bytes_out(),
        requests: Some(r.completed),
        notify_to_used_us_mean: Some(us(r.total_cycles) / r.completed.max(1) as f64),
        notify_to_used_us_min: Some(us(r.min_cycles)),
        notify_to_used_us_max: Some(us(r.max_cycles)),
        mmio_exits: stats.mmio.load(std::sync::atomic::Ordering::Relaxed),
        pio_exits: stats.pio.load(std::sync::atomic::Ordering::Relaxed),
        devices: vec![DeviceSummary {
            name: "rng",
            base: format!("{:#x}", guest.mmio_base),
            gsi: 5,
            status: rng.status(),
            notifications: t.notifications,
            interrupts: t.interrupts,
        }],
        guest_reset: false,
        init_done: None,
        migration,
    })
}

/// A writer that also keeps the text, to see how far the guest got.
#[derive(Clone)]
struct Tee(Arc<std::sync::Mutex<Vec<u8>>>, Arc<std::sync::Mutex<Box<dyn Write + Send>>>);

impl Write for Tee {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(b);
        self.1.lock().unwrap_or_else(|e| e.into_inner()).write(b)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.1.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

fn linux(args: &Args, kernel: PathBuf) -> Result<Summary> {
    let cfg = LinuxConfig {
        mem_mib: args.memory,
        vcpus: args.vcpus,
        kernel,
        initramfs: args.initramfs.clone(),
        cmdline: args.cmdline.clone(),
        disk: args.disk.clone().map(|path| BlockConfig {
            path,
            read_only: args.read_only,
            id: "vinfra-vda".into(),
        }),
        net_tap: args.net_tap.clone(),
        virtio_console: true,
    };
    let tee = Tee(Arc::default(), Arc::new(std::sync::Mutex::new(console(args.json))));
    let t0 = Instant::now();
    let m =
        LinuxMachine::build(&cfg, SharedOut::new(Box::new(tee.clone()))).context("building the machine")?;
    let create = t0.elapsed();
    let bar = spinner(args.json, "Linux running")?;
    let t1 = Instant::now();
    m.vm.start()?;
    let done =
        |t: &Tee| t.0.lock().map(|v| v.windows(17).any(|w| w == b"vinfra: init done")).unwrap_or(false);
    while t1.elapsed() < Duration::from_secs(args.timeout_s) && !m.reset.requested() && !done(&tee) {
        if let Some(e) = m.vm.next_event(Duration::from_millis(200)) {
            bar.println(format!("vCPU event: {e:?}"));
            break;
        }
    }
    let run = t1.elapsed();
    bar.finish_and_clear();
    m.vm.pause()?;
    let stats = m.vm.vcpu_stats(0).context("vCPU 0")?;
    Ok(Summary {
        mode: "linux",
        memory_mib: args.memory,
        vcpus: args.vcpus,
        vm_create_ms: ms(create),
        first_console_byte_ms: m.serial.first_byte_at().map(|t| ms(t - t1)),
        run_ms: ms(run),
        console_bytes: m.serial.bytes_out(),
        mmio_exits: stats.mmio.load(std::sync::atomic::Ordering::Relaxed),
        pio_exits: stats.pio.load(std::sync::atomic::Ordering::Relaxed),
        devices: m
            .virtio
            .iter()
            .map(|(name, t, w)| DeviceSummary {
                name,
                base: format!("{:#x}", w.base),
                gsi: w.gsi,
                status: t.status(),
                notifications: t.stats().notifications,
                interrupts: t.stats().interrupts,
            })
            .collect(),
        guest_reset: m.reset.requested(),
        init_done: Some(done(&tee)),
        ..Default::default()
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    let s = match args.kernel.clone() {
        Some(k) => linux(&args, k)?,
        None => builtin(&args)?,
    };
    if args.json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    let opt = |v: Option<f64>, unit: &str| v.map_or("-".to_string(), |v| format!("{v:.1} {unit}"));
    println!();
    println!("vmm: {} ({} MiB, {} vCPU)", s.mode, s.memory_mib, s.vcpus);
    println!("{:-<64}", "");
    println!("{:<40} {:>22}", "VM + devices created", format!("{:.1} ms", s.vm_create_ms));
    println!("{:<40} {:>22}", "start to first console byte (COM1)", opt(s.first_console_byte_ms, "ms"));
    println!("{:<40} {:>22}", "run time", format!("{:.1} ms", s.run_ms));
    println!("{:<40} {:>22}", "console bytes", s.console_bytes);
    if let Some(n) = s.requests {
        println!("{:<40} {:>22}", "virtio-rng requests by the guest", n);
        println!("{:<40} {:>22}", "notify → used ring, mean", opt(s.notify_to_used_us_mean, "µs"));
        println!(
            "{:<40} {:>22}",
            "notify → used ring, min / max",
            format!("{} / {}", opt(s.notify_to_used_us_min, "µs"), opt(s.notify_to_used_us_max, "µs"))
        );
    }
    if let Some(m) = &s.migration {
        println!(
            "{:<40} {:>22}",
            format!("live-migrated after {} requests", m.after_requests),
            format!("{:.1} ms, down {:.2} ms", m.total_ms, m.downtime_ms)
        );
    }
    if let Some(d) = s.init_done {
        println!("{:<40} {:>22}", "initramfs init finished", d);
        println!("{:<40} {:>22}", "guest reset (i8042)", s.guest_reset);
    }
    println!("{:<40} {:>22}", "vCPU 0 MMIO / PIO exits", format!("{} / {}", s.mmio_exits, s.pio_exits));
    for d in &s.devices {
        println!(
            "{:<40} {:>22}",
            format!("virtio-{} @ {} gsi {}", d.name, d.base, d.gsi),
            format!("st {:#x} n {} irq {}", d.status, d.notifications, d.interrupts)
        );
    }
    Ok(())
}
