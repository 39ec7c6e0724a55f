//! Shared helpers for vmigrate's KVM tests.
#![allow(dead_code)]

use std::io::{self, Read, Write};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vcore::guest::{Dirtier, DirtierConfig, read_progress};
use vcore::vm_memory::{Bytes, GuestMemoryBackend, GuestMemoryRegion};
use vcore::{Vm, VmBuilder, VmConfig};
use vmigrate::transport::{ChannelTransport, Transport};

/// Returns early from a test when KVM is missing (and not required); otherwise holds a lock
/// until the test ends, so migration tests of one binary do not starve each other's vCPUs on
/// small machines (their outcomes depend on the guest really running).
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !vcore::testing::kvm_available(concat!(file!(), ":", line!())) {
            return;
        }
        let _serial = $crate::common::serial();
    };
}

static SERIAL: Mutex<()> = Mutex::new(());

/// The lock behind `require_kvm!`.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

pub fn source_vm(cfg: &VmConfig, d: DirtierConfig) -> Vm {
    let vm = VmBuilder::new(cfg.clone()).payload(Dirtier(d)).build().expect("source VM");
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > d.ws_pages));
    vm
}

pub fn dest_vm(cfg: &VmConfig) -> Vm {
    VmBuilder::new(cfg.clone()).build().expect("destination VM")
}

pub use vcore::testing::wait_until;

/// All guest memory, region by region.
pub fn dump(vm: &Vm) -> Vec<Vec<u8>> {
    vm.memory()
        .iter()
        .map(|r| {
            let mut b = vec![0u8; r.len() as usize];
            vm.memory().read_slice(&mut b, r.start_addr()).unwrap();
            b
        })
        .collect()
}

/// Asserts the source is running and its memory is consistent with the dirtier's own progress.
pub fn assert_source_alive(vm: &Vm, d: &DirtierConfig) {
    assert_eq!(vm.run_state(), vcore::RunState::Running, "source must keep running");
    assert!(vm.slots().iter().all(|s| !s.dirty_log), "dirty logging must be off");
    assert_eq!(vm.throttle(), 0, "throttle must be lifted");
    let before = read_progress(vm.memory()).pages_written;
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > before + 100));
    vm.pause().unwrap();
    d.check_memory(vm.memory(), &read_progress(vm.memory())).expect("source memory intact");
    vm.resume().unwrap();
}

/// What a faulty wire does.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Fail every write once this many bytes went through.
    CutAfter(u64),
    /// Flip one bit of the byte at this stream offset.
    FlipAt(u64),
    /// After a Commit frame is written, reads see end of stream.
    DropAfterCommit,
}

/// A transport that injects a fault into what the source sends.
pub struct Faulty {
    pub inner: ChannelTransport,
    pub fault: Fault,
    pub written: u64,
    pub committed: Arc<Mutex<bool>>,
}

impl Faulty {
    /// `inner` with `fault` injected into what is written to it.
    pub fn new(inner: ChannelTransport, fault: Fault) -> Self {
        Faulty { inner, fault, written: 0, committed: Arc::new(Mutex::new(false)) }
    }
}

impl Read for Faulty {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if matches!(self.fault, Fault::DropAfterCommit) && *self.committed.lock().unwrap() {
            return Ok(0);
        }
        self.inner.read(buf)
    }
}

impl Write for Faulty {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let start = self.written;
        match self.fault {
            Fault::CutAfter(n) if start + buf.len() as u64 > n => {
                self.inner.close();
                return Err(io::ErrorKind::ConnectionReset.into());
            }
            Fault::FlipAt(at) if (start..start + buf.len() as u64).contains(&at) => {
                let mut copy = buf.to_vec();
                copy[(at - start) as usize] ^= 0x10;
                self.written += buf.len() as u64;
                return self.inner.write(&copy);
            }
            Fault::DropAfterCommit
                if buf.len() >= 6 && buf[..4] == *b"VMIG" && buf[4..6] == 11u16.to_le_bytes() =>
            {
                *self.committed.lock().unwrap() = true;
            }
            _ => {}
        }
        self.written += buf.len() as u64;
        self.inner.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

impl vmigrate::transport::PageSource for Faulty {}

impl Transport for Faulty {
    fn close(&mut self) {
        self.inner.close()
    }
}
