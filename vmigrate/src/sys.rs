//! Every `unsafe` operation of vmigrate: dirty-log ioctls kvm-ioctls lacks, and the dirty ring.

use std::os::fd::{AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicU32, Ordering};

use kvm_bindings::{KVM_DIRTY_LOG_PAGE_OFFSET, kvm_clear_dirty_log, kvm_dirty_gfn};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::{ioctl, ioctl_with_ref};
use vmm_sys_util::{ioctl_io_nr, ioctl_iowr_nr};

const KVMIO: u32 = 0xAE;
ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
ioctl_io_nr!(KVM_RESET_DIRTY_RINGS, KVMIO, 0xc7);

const GFN_F_DIRTY: u32 = 1;
const GFN_F_RESET: u32 = 2;

/// `KVM_CLEAR_DIRTY_LOG` for `num_pages` pages of `slot` from `first_page` (a multiple of 64),
/// clearing (and re-protecting) the pages whose bits are set in `bits`.
pub(crate) fn clear_dirty_log(
    vm: &VmFd,
    slot: u32,
    first_page: u64,
    num_pages: u32,
    bits: &[u64],
) -> std::io::Result<()> {
    if (num_pages as usize).div_ceil(64) > bits.len() {
        return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut arg = kvm_clear_dirty_log { slot, num_pages, first_page, ..Default::default() };
    arg.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // SAFETY: `arg` is a valid kvm_clear_dirty_log whose bitmap pointer covers `num_pages` bits
    // (checked above); KVM only reads the bitmap during the call.
    let rc = unsafe { ioctl_with_ref(vm, KVM_CLEAR_DIRTY_LOG(), &arg) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// `KVM_RESET_DIRTY_RINGS`: re-protects the pages of every harvested ring entry.
pub(crate) fn reset_dirty_rings(vm: &impl AsRawFd) -> std::io::Result<()> {
    // SAFETY: an argument-less ioctl on a VM fd we borrow for the call.
    let rc = unsafe { ioctl(vm, KVM_RESET_DIRTY_RINGS()) };
    if rc < 0 { Err(std::io::Error::last_os_error()) } else { Ok(()) }
}

/// One vCPU's mmapped KVM dirty ring.
#[derive(Debug)]
pub(crate) struct DirtyRing {
    base: *mut kvm_dirty_gfn,
    entries: u32,
    fetch: u32,
}

// SAFETY: the mapping is owned by this struct and only accessed through `&mut self`; the kernel
// side synchronizes through the entry flags with acquire/release ordering.
unsafe impl Send for DirtyRing {}

impl DirtyRing {
    /// Maps the ring of the vCPU whose fd is `vcpu_fd` (`entries` must be the ring size the VM
    /// enabled). The fd must stay open for the ring's lifetime (the `Vm` owns it).
    pub(crate) fn map(vcpu_fd: RawFd, entries: u32) -> std::io::Result<Self> {
        let page = host_page_size() as i64;
        let len = entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: a fresh shared mapping of the vCPU fd at KVM's documented ring offset; the
        // result is checked before use and unmapped in Drop.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                vcpu_fd,
                i64::from(KVM_DIRTY_LOG_PAGE_OFFSET) * page,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        Ok(DirtyRing { base: ptr.cast(), entries, fetch: 0 })
    }

    /// Collects every dirty entry in order as `(slot, page)` and marks it for reset.
    pub(crate) fn harvest(&mut self, mut f: impl FnMut(u32, u64)) {
        for _ in 0..self.entries {
            let idx = (self.fetch & (self.entries - 1)) as usize;
            // SAFETY: `idx < entries`, so the entry lies inside the mapping.
            let entry = unsafe { self.base.add(idx) };
            // SAFETY: `entry` is in bounds of the live mapping, so the field address is valid.
            let flags_ptr = unsafe { &raw mut (*entry).flags };
            // SAFETY: `flags_ptr` is an aligned u32 inside the mapping, shared with the kernel only
            // through atomic accesses; it lives as long as `self`.
            let flags = unsafe { AtomicU32::from_ptr(flags_ptr) };
            if flags.load(Ordering::Acquire) & GFN_F_DIRTY == 0 {
                break;
            }
            // SAFETY: the entry is in bounds and published (DIRTY seen with acquire), so reading
            // a copy of it is sound; the kernel does not touch it until we set RESET.
            let gfn = unsafe { std::ptr::read_volatile(entry) };
            f(gfn.slot & 0xffff, gfn.offset);
            flags.store(GFN_F_RESET, Ordering::Release);
            self.fetch = self.fetch.wrapping_add(1);
        }
    }
}

impl Drop for DirtyRing {
    fn drop(&mut self) {
        let len = self.entries as usize * std::mem::size_of::<kvm_dirty_gfn>();
        // SAFETY: `base`/`len` are exactly the mapping created in `map`, unmapped once.
        unsafe { libc::munmap(self.base.cast(), len) };
    }
}

/// Calls `f` with the `len` bytes of guest memory at `gpa`, in place, one piece per memory
/// region they span.
///
/// Only for memory no vCPU or device writes meanwhile (a destination VM that is not running):
/// the bytes are viewed as plain slices.
fn guest_bytes(
    mem: &vcore::GuestMemory,
    gpa: u64,
    len: usize,
    mut f: impl FnMut(&[u8]),
) -> Result<(), vm_memory::GuestMemoryError> {
    use vm_memory::GuestMemoryBackend as _;
    for slice in mem.get_slices(vm_memory::GuestAddress(gpa), len) {
        let slice = slice?;
        let guard = slice.ptr_guard();
        // SAFETY: vm-memory guarantees `slice.len()` mapped bytes at `guard.as_ptr()` while `mem`
        // is borrowed (the guard keeps the pointer valid). The caller guarantees nothing writes
        // this range concurrently, so the shared view does not race.
        f(unsafe { std::slice::from_raw_parts(guard.as_ptr(), slice.len()) });
    }
    Ok(())
}

/// Extends `crc` by `len` bytes of guest memory at `gpa`, read in place (the requirement of
/// [`guest_bytes`] on concurrent writers holds).
pub(crate) fn crc32c_guest(
    mem: &vcore::GuestMemory,
    gpa: u64,
    len: usize,
    crc: &mut crate::stream::Crc32c,
) -> Result<(), vm_memory::GuestMemoryError> {
    guest_bytes(mem, gpa, len, |bytes| crc.update(bytes))
}

/// Calls `page(gpa, crc)` with the CRC32C of each 4 KiB page of the `len` bytes (whole pages)
/// of `mem` from `gpa`: one region lookup for the range, not one per page (the requirement of
/// [`guest_bytes`] on concurrent writers holds).
pub(crate) fn guest_page_crcs(
    mem: &vcore::GuestMemory,
    gpa: u64,
    len: usize,
    mut page: impl FnMut(u64, u32),
) -> Result<(), vm_memory::GuestMemoryError> {
    let mut at = gpa;
    guest_bytes(mem, gpa, len, |bytes| {
        for p in bytes.chunks(crate::stream::PAGE) {
            page(at, crate::stream::page_crc(p));
            at += p.len() as u64;
        }
    })
}

/// Whether the first 4 KiB of `page` read as zeros, checked where they lie in guest memory
/// (volatile reads, 64 bytes at a time, stopping at the first non-zero block).
///
/// The guest may be writing the page meanwhile, so the answer describes some moment of the
/// check: a page written after it is dirty again and will be sent again.
pub(crate) fn guest_page_is_zero<B: vm_memory::bitmap::BitmapSlice>(
    page: &vm_memory::VolatileSlice<'_, B>,
) -> bool {
    const PAGE: usize = crate::stream::PAGE;
    let guard = page.ptr_guard();
    let p = guard.as_ptr().cast::<u64>();
    if page.len() < PAGE || !p.is_aligned() {
        return false;
    }
    for block in 0..PAGE / 64 {
        let mut acc = 0u64;
        for word in 0..8 {
            let w = p.wrapping_add(block * 8 + word);
            // SAFETY: `page` maps at least PAGE bytes at `p` (checked above; the guard keeps the
            // mapping alive) and `p` is 8-byte aligned, so `w` (word < PAGE / 8) is in bounds
            // and aligned. Volatile: the guest may write the page concurrently.
            acc |= unsafe { w.read_volatile() };
        }
        if acc != 0 {
            return false;
        }
    }
    true
}

/// A duplicate of `fd` (for example the VM's, to issue VM ioctls from another thread).
pub(crate) fn dup_fd(fd: &impl AsRawFd) -> std::io::Result<OwnedFd> {
    // SAFETY: `fd` is open for the duration of this borrow, which is all `borrow_raw` needs; the
    // duplicate is a new descriptor we own.
    unsafe { BorrowedFd::borrow_raw(fd.as_raw_fd()) }.try_clone_to_owned()
}

/// The host's page size.
pub(crate) fn host_page_size() -> usize {
    // SAFETY: sysconf has no memory-safety preconditions.
    unsafe { libc::sysconf(libc::_SC_PAGESIZE) as usize }
}
