//! Tiny built-in 64-bit guests, written here as commented assembly.
//!
//! They are assembled by rustc's own assembler (`global_asm!`) into a read-only section of the
//! host binary and copied into guest memory at [`CODE_ADDR`]: no external tool, no committed
//! binary. They start directly in 64-bit mode from builder-set state (see [`crate::boot`]) and
//! work at CPL 3 with IOPL 3: they never execute `hlt` and signal through port writes. On
//! software KVM (kvm-pvm) CPL-3 code runs natively while CPL-0 code is emulated.
//!
//! - [`Hello`]: prints a line to [`CONSOLE_PORT`], talks to an MMIO device, reports done on
//!   [`EXIT_PORT`].
//! - [`Dirtier`]: dirties pages in a pattern and at a rate, for migration tests and benches.
//! - [`PioLoop`]: one port write per loop iteration, to measure the PIO exit round trip.
//!
//! vCPUs other than vCPU 0 increment their tick counter at [`tick_addr`], so a test can see every
//! vCPU make progress.

/// The code every built-in guest runs on vCPUs other than 0: count ticks at `tick_addr(vcpu)`.
/// `$label` names the entry label (unique per guest); the vCPU index is in RDI.
macro_rules! ap_ticker_asm {
    ($label:literal) => {
        concat!(
            $label,
            ":\n",
            "    lea rbx, [rdi*8 + 0x6200]\n", // TICKS + 8 * vCPU
            $label,
            "_loop:\n",
            "    inc qword ptr [rbx]\n",
            "    pause\n",
            "    jmp ",
            $label,
            "_loop\n",
        )
    };
}

mod dirtier;
mod hello;
mod pio_loop;

use std::sync::{Condvar, Mutex};
use std::time::Duration;

pub use dirtier::{
    Dirtier, DirtierConfig, DirtierProgress, MIN_WS_START, PageMismatch, Pattern, read_progress,
};
pub use hello::Hello;
pub use pio_loop::PioLoop;

use crate::boot::{self, BootError, BootInfo, BootPayload, Cpl, EntryPoint};
use crate::bus::BusDevice;
use crate::memory::GuestMemory;

/// Port the guests print to (COM1's data register, so a 16550 there shows it too).
pub const CONSOLE_PORT: u16 = 0x3f8;
/// Port [`PioLoop`] writes its counter to.
pub const PIO_LOOP_PORT: u16 = 0x80;
/// Port a guest writes a 32-bit code to when it is done (like QEMU's isa-debug-exit).
pub const EXIT_PORT: u16 = 0xf4;
/// Port a guest writes a 32-bit count of microseconds to when it has nothing to do until then:
/// the VMM parks the vCPU thread that long (at most 100 ms), waking it early for a pause. A
/// CPL-3 guest cannot `hlt`; this is its idle, so that a guest waiting on the clock leaves the
/// host CPU to others. Handled by every vCPU loop (see [`crate::Vm`]).
pub const IDLE_PORT: u16 = 0xf5;
/// MMIO address `hello` writes to and reads from (in the 32-bit hole, outside RAM).
pub const MMIO_PROBE_ADDR: u64 = 0xD000_0000;
/// Config page of the built-in guests.
pub const CONFIG_ADDR: u64 = 0x6000;
/// Where guest code is loaded.
pub const CODE_ADDR: u64 = 0x10_0000;
/// Stack top of vCPU 0; vCPU `n` uses `STACK_TOP - n * STACK_STRIDE`.
pub const STACK_TOP: u64 = 0x6000;
/// Distance between vCPU stacks.
pub const STACK_STRIDE: u64 = 0x200;
/// Most vCPUs the built-in guests support (stacks and tick slots).
pub const MAX_VCPUS: u8 = 16;
/// What `hello` prints.
pub const HELLO_MESSAGE: &str = "Hello from the vinfra guest at CPL 3\n";

/// Address of vCPU `vcpu`'s tick counter (`u64`), for vCPUs other than 0.
pub fn tick_addr(vcpu: u8) -> u64 {
    CONFIG_ADDR + 0x200 + 8 * u64::from(vcpu)
}

/// A built-in guest: machine code plus the content of its config page.
pub trait BuiltinGuest: std::fmt::Debug + Send + Sync {
    /// Short name.
    fn name(&self) -> &'static str;
    /// Machine code, loaded at [`CODE_ADDR`].
    fn code(&self) -> &'static [u8];
    /// Bytes for the start of the config page (validated parameters); none by default.
    fn config_page(&self, _info: &BootInfo) -> Result<Vec<u8>, BootError> {
        Ok(Vec::new())
    }
}

impl<G: BuiltinGuest> BootPayload for G {
    fn load(&self, mem: &GuestMemory, info: &BootInfo) -> Result<EntryPoint, BootError> {
        if info.vcpus > MAX_VCPUS {
            return Err(BootError::Invalid(format!(
                "the built-in guests support at most {MAX_VCPUS} vCPUs, not {}",
                info.vcpus
            )));
        }
        boot::write_long_mode_tables(mem, Cpl::User, info.mem_top)?;
        boot::write(mem, "guest config page", CONFIG_ADDR, &[0u8; 4096])?;
        boot::write(mem, "guest config page", CONFIG_ADDR, &self.config_page(info)?)?;
        boot::write(mem, "guest code", CODE_ADDR, self.code())?;
        Ok(EntryPoint {
            rip: CODE_ADDR,
            cpl: Cpl::User,
            rsi: 0,
            stack_top: STACK_TOP,
            stack_stride: STACK_STRIDE,
            all_vcpus_run: true,
        })
    }
}

/// A port device that collects what the guest prints.
#[derive(Debug, Default)]
pub struct Console {
    out: Mutex<Vec<u8>>,
    cond: Condvar,
}

impl Console {
    /// A console with nothing printed yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Everything printed so far.
    pub fn output(&self) -> Vec<u8> {
        self.out.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits until the output holds `needle` or `timeout` passes; returns whether it does.
    pub fn wait_for(&self, needle: &[u8], timeout: Duration) -> bool {
        let out = self.out.lock().unwrap_or_else(|e| e.into_inner());
        let found = |o: &Vec<u8>| o.windows(needle.len().max(1)).any(|w| w == needle);
        let (out, _) =
            self.cond.wait_timeout_while(out, timeout, |o| !found(o)).unwrap_or_else(|e| e.into_inner());
        found(&out)
    }
}

impl BusDevice for Console {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if offset == 0 {
            self.out.lock().unwrap_or_else(|e| e.into_inner()).extend_from_slice(data);
            self.cond.notify_all();
        }
    }
}

/// A port device that records the code a guest writes when it is done.
#[derive(Debug, Default)]
pub struct ExitPort {
    code: Mutex<Option<u32>>,
    cond: Condvar,
}

impl ExitPort {
    /// A port nobody wrote to yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The code, if the guest is done.
    pub fn code(&self) -> Option<u32> {
        *self.code.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits up to `timeout` for the guest to be done; returns its code.
    pub fn wait(&self, timeout: Duration) -> Option<u32> {
        let code = self.code.lock().unwrap_or_else(|e| e.into_inner());
        let (code, _) =
            self.cond.wait_timeout_while(code, timeout, |c| c.is_none()).unwrap_or_else(|e| e.into_inner());
        *code
    }
}

impl BusDevice for ExitPort {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, data: &[u8]) {
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        *self.code.lock().unwrap_or_else(|e| e.into_inner()) = Some(u32::from_le_bytes(b));
        self.cond.notify_all();
    }
}

/// A port device that counts writes (what [`PioLoop`] needs).
#[derive(Debug, Default)]
pub struct WriteCounter {
    count: std::sync::atomic::AtomicU64,
}

impl WriteCounter {
    /// A counter at 0.
    pub fn new() -> Self {
        Self::default()
    }

    /// Writes seen so far.
    pub fn count(&self) -> u64 {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl BusDevice for WriteCounter {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {
        self.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// An MMIO device that records the guest's writes and answers reads with a fixed value.
#[derive(Debug)]
pub struct MmioProbe {
    answer: u32,
    writes: Mutex<Vec<(u64, Vec<u8>)>>,
}

impl MmioProbe {
    /// A probe that answers every read with `answer` (little endian, repeated as needed).
    pub fn new(answer: u32) -> Self {
        MmioProbe { answer, writes: Mutex::new(Vec::new()) }
    }

    /// The writes seen: offset and bytes.
    pub fn writes(&self) -> Vec<(u64, Vec<u8>)> {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl BusDevice for MmioProbe {
    fn read(&self, _offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = self.answer.to_le_bytes()[i % 4];
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        self.writes.lock().unwrap_or_else(|e| e.into_inner()).push((offset, data.to_vec()));
    }
}
