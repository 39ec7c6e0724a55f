//! Every `unsafe` operation of vcore, each behind a small safe function.

use std::sync::atomic::{Ordering, fence};

use kvm_bindings::{kvm_run, kvm_userspace_memory_region, kvm_xsave};
use kvm_ioctls::{VcpuFd, VmFd};

use crate::memory::{GuestMemory, MemSlot};

/// `KVM_MEM_LOG_DIRTY_PAGES`.
const MEM_LOG_DIRTY_PAGES: u32 = 1;

/// Registers (or re-registers with new flags) `slot` with KVM.
///
/// The mapping `[slot.host_addr, slot.host_addr + slot.size)` must belong to `_mem`, which the
/// caller keeps alive for as long as `vm` exists (the `Vm` owns both and drops the VM fd first).
pub(crate) fn set_memory_slot(
    vm: &VmFd,
    _mem: &GuestMemory,
    slot: &MemSlot,
) -> Result<(), kvm_ioctls::Error> {
    let region = kvm_userspace_memory_region {
        slot: slot.slot,
        flags: if slot.dirty_log { MEM_LOG_DIRTY_PAGES } else { 0 },
        guest_phys_addr: slot.guest_addr,
        memory_size: slot.size,
        userspace_addr: slot.host_addr,
    };
    // SAFETY: `slot` was built from a region of `_mem` (see `memory::slots_of`), a live anonymous
    // mapping of exactly `slot.size` bytes that outlives the VM fd; KVM only accesses guest memory
    // through it, never memory Rust code owns otherwise.
    unsafe { vm.set_user_memory_region(region) }
}

/// A handle to one vCPU's `kvm_run` page that other threads use to kick the vCPU out of `KVM_RUN`.
#[derive(Debug)]
pub(crate) struct KickHandle {
    run: *mut kvm_run,
}

// SAFETY: the pointer targets the vCPU's mmapped `kvm_run` page, which stays mapped as long as the
// `VcpuFd` lives; `VcpuShared` owns both and drops them together. Only the `immediate_exit` byte is
// written, with volatile stores, which KVM reads at entry to `KVM_RUN`.
unsafe impl Send for KickHandle {}
// SAFETY: see `Send`; concurrent volatile byte stores of 0/1 are benign.
unsafe impl Sync for KickHandle {}

impl KickHandle {
    /// Takes the `kvm_run` pointer of `fd`; `fd` must outlive the handle.
    pub(crate) fn new(fd: &mut VcpuFd) -> Self {
        KickHandle { run: fd.get_kvm_run() as *mut kvm_run }
    }

    /// Sets `immediate_exit`, so the next (or current, with a signal) `KVM_RUN` returns `EINTR`.
    pub(crate) fn set_immediate_exit(&self, value: bool) {
        // SAFETY: `self.run` points at the live `kvm_run` page (see the `Send` impl), so the field
        // address is in bounds.
        let field = unsafe { &raw mut (*self.run).immediate_exit };
        // SAFETY: `field` is valid for a byte store; a volatile store races with nothing Rust reads
        // non-volatilely.
        unsafe { std::ptr::write_volatile(field, u8::from(value)) };
        fence(Ordering::SeqCst);
    }
}

/// Calls `KVM_SET_XSAVE` with a legacy 4 KiB `kvm_xsave` (no extended state beyond it).
pub(crate) fn set_xsave_legacy(fd: &VcpuFd, xsave: &kvm_xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: `xsave` is a complete `kvm_xsave` of the legacy size and KVM reads at most that much
    // for `KVM_SET_XSAVE`.
    unsafe { fd.set_xsave(xsave) }
}

/// Calls `KVM_SET_XSAVE` with an extended buffer whose size the caller checked against
/// `KVM_CAP_XSAVE2`.
pub(crate) fn set_xsave_extended(fd: &VcpuFd, xsave: &kvm_bindings::Xsave) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: the caller allocated `xsave` with the FAM length that `KVM_CAP_XSAVE2` reports, so
    // KVM never reads past its end.
    unsafe { fd.set_xsave2(xsave) }
}

/// Calls `KVM_GET_XSAVE2` into a buffer the caller sized from `KVM_CAP_XSAVE2`.
pub(crate) fn get_xsave_extended(
    fd: &VcpuFd,
    xsave: &mut kvm_bindings::Xsave,
) -> Result<(), kvm_ioctls::Error> {
    // SAFETY: `xsave` holds the FAM length `KVM_CAP_XSAVE2` reports, so KVM never writes past it.
    unsafe { fd.get_xsave2(xsave) }
}

/// The bytes between two symbols that `global_asm!` placed in `.rodata` (a built-in guest).
macro_rules! asm_blob {
    ($start:ident, $end:ident) => {{
        unsafe extern "C" {
            static $start: u8;
            static $end: u8;
        }
        let start = &raw const $start;
        let end = &raw const $end;
        let len = end as usize - start as usize;
        // SAFETY: both symbols are labels of one `global_asm!` block in a read-only section, with
        // `$end` after `$start`; the bytes between them are initialized and never written.
        unsafe { std::slice::from_raw_parts(start, len) }
    }};
}

/// Machine code of the built-in `hello` guest (see `guest::hello`).
pub(crate) fn hello_code() -> &'static [u8] {
    asm_blob!(vinfra_guest_hello_start, vinfra_guest_hello_end)
}

/// Machine code of the built-in `dirtier` guest (see `guest::dirtier`).
pub(crate) fn dirtier_code() -> &'static [u8] {
    asm_blob!(vinfra_guest_dirtier_start, vinfra_guest_dirtier_end)
}

/// The real-time signal that kicks vCPU threads out of `KVM_RUN`.
pub(crate) fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Nothing to do: delivering the signal is what interrupts KVM_RUN.
}

/// Installs the (empty) kick handler once per process.
pub(crate) fn install_kick_handler() -> Result<(), vmm_sys_util::errno::Error> {
    static INSTALLED: std::sync::OnceLock<Result<(), vmm_sys_util::errno::Error>> =
        std::sync::OnceLock::new();
    *INSTALLED.get_or_init(|| vmm_sys_util::signal::register_signal_handler(kick_signal(), kick_handler))
}

/// Sends the kick signal to thread `t`.
pub(crate) fn signal_thread(t: libc::pthread_t) {
    // SAFETY: `t` comes from `JoinHandle::as_pthread_t` of a vCPU thread that has not been joined
    // yet (threads are joined only after the last kick), so the id is valid; the signal has a
    // handler installed by `install_kick_handler`, so it cannot kill the process.
    unsafe { libc::pthread_kill(t, kick_signal()) };
}

/// Builds an extended XSAVE buffer of `extra_words` FAM words from saved words.
pub(crate) fn xsave_from_words(
    legacy: &[u32],
    tail: &[u32],
    extra_words: usize,
) -> Option<kvm_bindings::Xsave> {
    let mut x = kvm_bindings::Xsave::new(extra_words).ok()?;
    if tail.len() > extra_words {
        return None;
    }
    // SAFETY: only the fixed-size `region` array is written, never the FAM length, so the
    // wrapper's length stays consistent with its allocation.
    let region = unsafe { &mut x.as_mut_fam_struct().xsave.region };
    if legacy.len() != region.len() {
        return None;
    }
    region.copy_from_slice(legacy);
    x.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    Some(x)
}

/// Machine code of the built-in `pio_loop` guest (see `guest::pio_loop`).
pub(crate) fn pio_loop_code() -> &'static [u8] {
    asm_blob!(vinfra_guest_pio_loop_start, vinfra_guest_pio_loop_end)
}
