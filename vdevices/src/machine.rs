//! A whole Linux-capable machine in one call: a `vcore` VM booting a kernel with ACPI tables,
//! COM1 (16550) and an i8042 on the port bus, and virtio-mmio devices (rng always; block, net
//! and console when asked) served by one event loop.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vcore::boot::linux::LinuxBoot;
use vcore::{Vm, VmBuilder, VmConfig};

use crate::acpi::{AcpiConfig, LinuxAcpiBoot, VirtioMmioDevice};
use crate::legacy::{COM1_GSI, COM1_PORT, I8042, I8042_PORT, I8042_PORTS, IrqLine, LegacySerial, ResetFlag};
use crate::legacy::{SERIAL_PORTS, SerialIo};
use crate::virtio::block::{Block, BlockConfig};
use crate::virtio::console::{Console, ConsoleIo};
use crate::virtio::net::{Net, Tap};
use crate::virtio::rng::Rng;
use crate::{EventLoop, MmioTransport, VirtioDevice};

/// First virtio-mmio window; device `i` sits at `VIRTIO_BASE + i * 0x1000`.
pub const VIRTIO_BASE: u64 = 0xd000_0000;
/// GSI of the first virtio device; device `i` uses `VIRTIO_GSI + i`.
pub const VIRTIO_GSI: u32 = 5;
/// The default kernel command line.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 earlyprintk=serial,ttyS0,115200 reboot=k panic=1";

/// What to boot and attach.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LinuxConfig {
    /// Memory in MiB.
    pub mem_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs.
    #[serde(default)]
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// Disk image for virtio-blk.
    #[serde(default)]
    pub disk: Option<BlockConfig>,
    /// Tap interface for virtio-net.
    #[serde(default)]
    pub net_tap: Option<String>,
    /// Add a virtio-console writing to the same output as COM1.
    #[serde(default)]
    pub virtio_console: bool,
}

/// Errors of assembling the machine.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] vcore::VmError),
    /// A device could not be created.
    #[error("creating {what}: {reason}")]
    Device {
        /// Which device.
        what: &'static str,
        /// Why.
        reason: String,
    },
    /// A transport could not be attached.
    #[error(transparent)]
    Transport(#[from] crate::TransportError),
    /// The port bus refused a device.
    #[error(transparent)]
    Bus(#[from] vcore::BusError),
    /// The event loop failed.
    #[error(transparent)]
    Events(#[from] crate::EventLoopError),
}

fn dev_err(what: &'static str) -> impl FnOnce(String) -> MachineError {
    move |reason| MachineError::Device { what, reason }
}

/// A writer shared by several devices.
#[derive(Clone)]
pub struct SharedOut(Arc<Mutex<Box<dyn Write + Send>>>);

impl SharedOut {
    /// Wraps `w`.
    pub fn new(w: Box<dyn Write + Send>) -> Self {
        SharedOut(Arc::new(Mutex::new(w)))
    }
}

impl std::fmt::Debug for SharedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SharedOut")
    }
}

impl Write for SharedOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).flush()
    }
}

/// The assembled machine (not started: call `vm.start()`).
#[derive(Debug)]
pub struct LinuxMachine {
    /// The VM.
    pub vm: Vm,
    /// COM1.
    pub serial: LegacySerial,
    /// Set when the guest resets through the i8042.
    pub reset: Arc<ResetFlag>,
    /// The virtio devices: name, transport, window, GSI.
    pub virtio: Vec<(&'static str, MmioTransport, VirtioMmioDevice)>,
    /// The loop serving them.
    pub events: EventLoop,
}

impl LinuxMachine {
    /// Builds the VM and every device; console output goes to `out`.
    pub fn build(cfg: &LinuxConfig, out: SharedOut) -> Result<Self, MachineError> {
        let mut devices: Vec<(&'static str, Box<dyn VirtioDevice>)> = vec![("rng", Box::new(Rng::new()))];
        if let Some(d) = &cfg.disk {
            devices.push((
                "block",
                Box::new(Block::new(d.clone()).map_err(|e| dev_err("virtio-blk")(e.to_string()))?),
            ));
        }
        if let Some(t) = &cfg.net_tap {
            let tap = Tap::open(t).map_err(|e| dev_err("virtio-net")(e.to_string()))?;
            devices.push(("net", Box::new(Net::new(tap, [0x52, 0x54, 0x00, 0x12, 0x34, 0x56]))));
        }
        if cfg.virtio_console {
            let c = Console::new(ConsoleIo { input: None, output: Box::new(out.clone()) })
                .map_err(|e| dev_err("virtio-console")(e.to_string()))?;
            devices.push(("console", Box::new(c)));
        }
        let windows: Vec<VirtioMmioDevice> = (0..devices.len())
            .map(|i| VirtioMmioDevice { base: VIRTIO_BASE + 0x1000 * i as u64, gsi: VIRTIO_GSI + i as u32 })
            .collect();
        let payload = LinuxAcpiBoot {
            linux: LinuxBoot {
                kernel: cfg.kernel.clone(),
                initramfs: cfg.initramfs.clone(),
                cmdline: cfg.cmdline.clone(),
            },
            acpi: AcpiConfig { vcpus: cfg.vcpus, virtio: windows.clone(), com1: true },
        };
        let vm =
            VmBuilder::new(VmConfig { mem_mib: cfg.mem_mib, vcpus: cfg.vcpus.into(), ..Default::default() })
                .payload(payload)
                .build()?;
        let irq = IrqLine::new().map_err(|e| dev_err("COM1 interrupt")(e.to_string()))?;
        vm.vm_fd().register_irqfd(irq.evt(), COM1_GSI).map_err(|e| dev_err("COM1 irqfd")(e.to_string()))?;
        let serial = LegacySerial::new(SerialIo { irq, input: None, output: Box::new(out) })
            .map_err(|e| dev_err("COM1")(e.to_string()))?;
        vm.pio_bus().insert(COM1_PORT.into(), SERIAL_PORTS, Arc::new(serial.clone()))?;
        let i8042 = Arc::new(I8042::new());
        let reset = i8042.reset_flag();
        vm.pio_bus().insert(I8042_PORT.into(), I8042_PORTS, i8042)?;
        let events = EventLoop::start()?;
        let mut virtio = Vec::new();
        for ((name, dev), w) in devices.into_iter().zip(windows) {
            let t = MmioTransport::new(vm.memory().clone(), dev)?;
            t.attach(&vm, w.base, w.gsi)?;
            events.add(Arc::new(t.clone()))?;
            virtio.push((name, t, w));
        }
        Ok(LinuxMachine { vm, serial, reset, virtio, events })
    }
}
