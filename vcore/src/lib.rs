//! vcore: one KVM virtual machine on one host, as a library.
//!
//! vcore virtualizes CPU and memory on KVM: it builds a VM from a [`VmConfig`] (memory laid out
//! around the 32-bit MMIO hole, one KVM slot per region, optional KVM dirty log or dirty ring),
//! runs one thread per vCPU that dispatches port I/O and MMIO exits to [`Bus`]es, pauses all
//! vCPUs in microseconds, throttles them for live migration, and saves and restores complete vCPU
//! and VM state. It boots Linux kernels and tiny built-in 64-bit guests.
//!
//! ```no_run
//! use std::sync::Arc;
//! use std::time::Duration;
//! use vcore::guest::{Console, ExitPort, Hello, CONSOLE_PORT, EXIT_PORT};
//! use vcore::{VmBuilder, VmConfig};
//!
//! let vm = VmBuilder::new(VmConfig { mem_mib: 64, ..Default::default() }).payload(Hello).build()?;
//! let console = Arc::new(Console::new());
//! let exit = Arc::new(ExitPort::new());
//! vm.pio_bus().insert(CONSOLE_PORT.into(), 1, console.clone())?;
//! vm.pio_bus().insert(EXIT_PORT.into(), 4, exit.clone())?;
//! vm.start()?;
//! exit.wait(Duration::from_secs(5));
//! print!("{}", String::from_utf8_lossy(&console.output()));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![deny(missing_docs, missing_debug_implementations)]

pub mod boot;
pub mod bus;
pub mod config;
pub mod cpu;
pub mod guest;
pub mod memory;
pub mod state;
mod sys;
pub mod testing;
mod vcpu;
mod vm;

pub use boot::{BootError, BootPayload};
pub use bus::{Bus, BusDevice, BusError};
pub use config::{ConfigError, DirtyTracking, VmConfig};
pub use memory::{GuestMemory, MemSlot};
pub use state::{DeviceSections, Envelope, Snapshot, StateError, VcpuState, VmSnapshot, VmState};
pub use vcpu::{DirtyRingFullHandler, THROTTLE_PERIOD, VcpuStats, VmEvent};
pub use vm::{RunState, Vm, VmBuilder, VmError};
pub use vm_memory;
