//! Slow smoke test, ignored by default: boots the uncompressed Debian kernel built by
//! `scripts/guest-assets.sh` (64-bit entry, no decompressor) with `earlyprintk=serial`, every
//! virtio device described in ACPI, and reports how far it got within a time limit.
//!
//! Run: `bash scripts/guest-assets.sh && cargo test --release -p vdevices --test linux_smoke -- --ignored --nocapture`
//! `VINFRA_SMOKE_SECS` sets the limit (default 60). `VINFRA_SMOKE_EXPECT=init` makes the test
//! fail unless the init script finished (for hardware KVM; on kvm-pvm the kernel does not get
//! that far in useful time). `VINFRA_SMOKE_LOG=FILE` saves the whole console output.
use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use vdevices::machine::{DEFAULT_CMDLINE, LinuxConfig, LinuxMachine, SharedOut};
use vdevices::virtio::block::BlockConfig;

#[derive(Clone, Default)]
struct Capture(Arc<Mutex<Vec<u8>>>);

impl Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
#[ignore = "slow: boots Linux; needs scripts/guest-assets.sh"]
fn boot_debian_kernel_and_report_progress() {
    if !vcore::testing::kvm_available(concat!(file!(), ":", line!())) {
        return;
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../assets/guest");
    let kernel = dir.join("vmlinux");
    if !kernel.exists() {
        panic!("{} missing: run scripts/guest-assets.sh first", kernel.display());
    }
    let secs: u64 = std::env::var("VINFRA_SMOKE_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(60);
    let cfg = LinuxConfig {
        mem_mib: 256,
        vcpus: 1,
        kernel,
        initramfs: Some(dir.join("initramfs.cpio.gz")),
        cmdline: DEFAULT_CMDLINE.into(),
        disk: Some(BlockConfig { path: dir.join("disk.ext4"), read_only: true, id: "smoke".into() }),
        net_tap: None,
        virtio_console: true,
    };
    let cap = Capture::default();
    let m = LinuxMachine::build(&cfg, SharedOut::new(Box::new(cap.clone()))).unwrap();
    let t0 = Instant::now();
    m.vm.start().unwrap();
    let milestones = [
        ("first console byte", &b""[..]),
        ("kernel banner", b"Linux version"),
        ("ACPI tables found", b"ACPI: RSDP"),
        ("virtio-mmio probed", b"virtio"),
        ("init started", b"vinfra: init started"),
        ("init done", b"vinfra: init done"),
    ];
    let mut reached: Vec<(&str, f64)> = Vec::new();
    while t0.elapsed() < Duration::from_secs(secs) && reached.len() < milestones.len() && !m.reset.requested()
    {
        let out = cap.0.lock().unwrap().clone();
        for (name, needle) in &milestones[reached.len()..] {
            let hit = if needle.is_empty() {
                !out.is_empty()
            } else {
                out.windows(needle.len()).any(|w| w == *needle)
            };
            if hit && !reached.iter().any(|(n, _)| n == name) {
                reached.push((name, t0.elapsed().as_secs_f64()));
            } else {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = m.vm.pause();
    let out = cap.0.lock().unwrap().clone();
    let text = String::from_utf8_lossy(&out);
    if let Ok(path) = std::env::var("VINFRA_SMOKE_LOG") {
        std::fs::write(&path, &out).unwrap();
    }
    eprintln!("--- linux smoke: {secs} s limit, {} console bytes ---", out.len());
    for (name, t) in &reached {
        eprintln!("reached {name:<22} at {t:>7.2} s");
    }
    for (name, _) in &milestones[reached.len()..] {
        eprintln!("NOT reached {name}");
    }
    eprintln!("--- last console lines ---");
    for line in text.lines().rev().take(15).collect::<Vec<_>>().into_iter().rev() {
        eprintln!("{line}");
    }
    for (name, t, _) in &m.virtio {
        eprintln!("virtio-{name}: status {:#x}, {:?}", t.status(), t.stats());
    }
    if std::env::var("VINFRA_SMOKE_EXPECT").is_ok_and(|v| v == "init") {
        assert!(reached.len() == milestones.len(), "init did not finish within {secs} s");
    }
}
