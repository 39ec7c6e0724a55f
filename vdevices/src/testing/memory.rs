//! Guest memory for harness tests, and the guest's own view of it.

use vcore::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::HarnessError;

/// Guest memory as the guest sees it: the same mappings without the VMM's dirty bitmap. Under
/// KVM the guest's own writes are KVM's to track (dirty log or ring); the bitmap records only
/// what the VMM writes (device DMA). The harness plays the guest, so its ring and buffer
/// accesses go through this view: they neither pay for the bitmap nor contend with the device
/// thread on its words.
pub type GuestView = vm_memory::GuestMemoryMmap<()>;

/// A [`GuestView`] of `mem`. It does not own the mappings: it must not outlive `mem` (the
/// [`Driver`] keeps both).
pub(super) fn guest_view(mem: &GuestMemory) -> Result<GuestView, HarnessError> {
    use vm_memory::{GuestMemoryRegion, GuestRegionMmap, MmapRegion};
    let mut regions = Vec::new();
    for r in mem.iter() {
        let len = usize::try_from(r.len()).map_err(|_| HarnessError::Exhausted("address space"))?;
        // SAFETY: `r.as_ptr()` is the start of a live, page-aligned mapping of `len` bytes
        // owned by `mem`'s region; the raw region built here never unmaps it (not owned), and
        // the Driver holds a clone of `mem` (keeping the mapping alive) for as long as it holds
        // this view.
        let m = unsafe {
            MmapRegion::<()>::build_raw(
                r.as_ptr(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_ANONYMOUS | libc::MAP_PRIVATE,
            )
        }
        .map_err(|e| std::io::Error::other(e.to_string()))?;
        regions
            .push(GuestRegionMmap::new(m, r.start_addr()).ok_or(HarnessError::Exhausted("address space"))?);
    }
    vm_memory::GuestMemoryMmap::from_regions(regions).map_err(|e| std::io::Error::other(e.to_string()).into())
}

/// Guest memory for harness tests: `mib` MiB from address 0.
pub fn guest_memory(mib: usize) -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), mib << 20)])
        .unwrap_or_else(|e| panic!("{mib} MiB of memory: {e}"))
}

/// Copies every byte of `from` into `to` (same layout): moving guest RAM to a "new VM".
pub fn copy_memory(from: &GuestMemory, to: &GuestMemory) -> Result<(), HarnessError> {
    use vm_memory::GuestMemoryRegion;
    for r in from.iter() {
        let mut buf = vec![0u8; r.len() as usize];
        from.read_slice(&mut buf, r.start_addr())?;
        to.write_slice(&buf, r.start_addr())?;
    }
    Ok(())
}
