//! Shared helpers for vcore's KVM integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use vcore::guest::{self, Console, ExitPort, MmioProbe};
use vcore::{Vm, VmBuilder, VmConfig};

/// Returns early from a test when KVM is missing (and not required).
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !vcore::testing::kvm_available(concat!(file!(), ":", line!())) {
            return;
        }
    };
}

/// The standard devices of the built-in guests, attached to `vm`.
pub struct Devices {
    pub console: Arc<Console>,
    pub exit: Arc<ExitPort>,
    pub probe: Arc<MmioProbe>,
}

pub const PROBE_ANSWER: u32 = 0x600d_cafe;

pub fn attach(vm: &Vm) -> Devices {
    let d = Devices {
        console: Arc::new(Console::new()),
        exit: Arc::new(ExitPort::new()),
        probe: Arc::new(MmioProbe::new(PROBE_ANSWER)),
    };
    vm.pio_bus().insert(guest::CONSOLE_PORT.into(), 1, d.console.clone()).unwrap();
    vm.pio_bus().insert(guest::EXIT_PORT.into(), 4, d.exit.clone()).unwrap();
    vm.mmio_bus().insert(guest::MMIO_PROBE_ADDR, 0x1000, d.probe.clone()).unwrap();
    d
}

pub fn dirtier_vm(cfg: VmConfig, d: guest::DirtierConfig) -> Vm {
    VmBuilder::new(cfg).payload(guest::Dirtier(d)).build().expect("build dirtier VM")
}

pub use vcore::testing::wait_until;
