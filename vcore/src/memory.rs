//! Guest memory: `vm-memory` regions with a dirty bitmap, one KVM memory slot per region.
//!
//! Every write the VMM makes through [`GuestMemory`] (for example device DMA) is recorded in the
//! region's [`AtomicBitmap`], next to KVM's own dirty log of the guest's writes.

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::config::{PAGE_SIZE, RamRange};

/// The guest's RAM: mmapped regions whose VMM-side writes are tracked per page.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// One guest RAM region as registered with KVM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemSlot {
    /// KVM slot number.
    pub slot: u32,
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// Host virtual address of the mapping.
    pub host_addr: u64,
    /// Whether `KVM_MEM_LOG_DIRTY_PAGES` is set on the slot.
    pub dirty_log: bool,
}

impl MemSlot {
    /// Number of guest pages in the slot.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }

    /// Whether the slot holds guest-physical address `gpa`.
    pub fn contains(&self, gpa: u64) -> bool {
        gpa >= self.guest_addr && gpa - self.guest_addr < self.size
    }
}

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The anonymous mappings could not be created.
    #[error("mapping {size_mib} MiB of guest memory")]
    Mmap {
        /// Total size asked for.
        size_mib: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// The kernel refused transparent huge pages for guest memory (`MADV_HUGEPAGE`; a kernel
    /// without `CONFIG_TRANSPARENT_HUGEPAGE`, or THP set to `never`).
    #[error("advising transparent huge pages for guest memory")]
    HugePages(#[source] std::io::Error),
    /// Guest memory could not be allocated up front (`MADV_POPULATE_WRITE`: out of memory).
    #[error("allocating guest memory up front")]
    Prealloc(#[source] std::io::Error),
}

/// Allocates anonymous guest memory for `ranges` (already validated), with dirty bitmaps.
pub fn create_guest_memory(ranges: &[RamRange]) -> Result<GuestMemory, MemoryError> {
    let raw: Vec<(GuestAddress, usize)> =
        ranges.iter().map(|r| (GuestAddress(r.guest_addr), r.size as usize)).collect();
    GuestMemory::from_ranges(&raw).map_err(|source| MemoryError::Mmap {
        size_mib: ranges.iter().map(|r| r.size).sum::<u64>() >> 20,
        source,
    })
}

/// Asks the kernel to back every region of `mem` with transparent huge pages
/// (`madvise(MADV_HUGEPAGE)`). Call it before the memory is touched.
pub fn advise_huge_pages(mem: &GuestMemory) -> Result<(), MemoryError> {
    for r in mem.iter() {
        // SAFETY: the range is exactly one mapping the region owns and keeps alive while `mem`
        // lives; MADV_HUGEPAGE changes how the kernel backs it, never its contents.
        let rc = unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
        if rc != 0 {
            return Err(MemoryError::HugePages(std::io::Error::last_os_error()));
        }
    }
    Ok(())
}

/// Allocates every page of `mem` now (`madvise(MADV_POPULATE_WRITE)`, Linux 5.14), so that
/// no first write faults later. On an older kernel (`EINVAL`) it writes a zero into each page
/// itself, which leaves the contents as they were: zero.
pub fn prealloc(mem: &GuestMemory) -> Result<(), MemoryError> {
    for r in mem.iter() {
        let (ptr, len) = (r.as_ptr(), r.len() as usize);
        if populate_range(mem, r.start_addr().0, len).map_err(MemoryError::Prealloc)? {
            continue;
        }
        for off in (0..len).step_by(PAGE_SIZE as usize) {
            let p = ptr.wrapping_add(off);
            // SAFETY: `p` is inside the mapping, which is readable.
            let byte = unsafe { p.read_volatile() };
            // SAFETY: `p` is inside the mapping, which is writable; writing back the byte that
            // is there changes nothing but allocates the page.
            unsafe { p.write_volatile(byte) };
        }
    }
    Ok(())
}

/// Allocates the pages of `[gpa, gpa + len)` (inside one region, page-aligned) now, with one
/// `madvise(MADV_POPULATE_WRITE)` instead of a page fault per page as they are first written:
/// what a migration destination does before it writes a run of pages into a VM that never ran
/// (on kvm-pvm a fault costs ~1.3 µs a page; the kernel fills a range far faster). Contents stay
/// as they were. `Ok(false)`, having done nothing, on a kernel without it (`EINVAL`, before
/// Linux 5.14).
pub fn populate_range(mem: &GuestMemory, gpa: u64, len: usize) -> std::io::Result<bool> {
    let slice = mem
        .get_slice(GuestAddress(gpa), len)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e.to_string()))?;
    let ptr = slice.ptr_guard_mut().as_ptr();
    if !(ptr as usize).is_multiple_of(PAGE_SIZE as usize) {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "unaligned guest range"));
    }
    // SAFETY: `[ptr, ptr + len)` lies inside one mapping of `mem` (checked by `get_slice`),
    // page-aligned; MADV_POPULATE_WRITE allocates pages and never changes their contents.
    let rc = unsafe { libc::madvise(ptr.cast(), len, libc::MADV_POPULATE_WRITE) };
    if rc == 0 {
        return Ok(true);
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EINVAL) { Ok(false) } else { Err(err) }
}

/// The slot table of `mem`: region `i` is slot `i`, with dirty logging off.
pub fn slots_of(mem: &GuestMemory) -> Vec<MemSlot> {
    mem.iter()
        .enumerate()
        .map(|(i, r)| MemSlot {
            slot: i as u32,
            guest_addr: r.start_addr().0,
            size: r.len(),
            host_addr: r.as_ptr() as u64,
            dirty_log: false,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;
    use vm_memory::bitmap::Bitmap;

    #[test]
    fn vmm_writes_are_tracked() {
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size: 1 << 20 }]).unwrap();
        mem.write_obj(0xdead_beefu32, GuestAddress(0x5000)).unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region.bitmap().dirty_at(0x5000));
        assert!(!region.bitmap().dirty_at(0x6000));
        let slots = slots_of(&mem);
        assert_eq!(slots.len(), 1);
        assert_eq!(slots[0].pages(), 256);
        assert!(slots[0].contains(0xfffff) && !slots[0].contains(1 << 20));
    }

    /// Kilobytes of anonymous huge pages in this process's mapping that holds `addr` (the
    /// kernel may have merged it with a neighbour: then theirs count too).
    fn huge_kib_at(addr: u64) -> Option<u64> {
        let smaps = std::fs::read_to_string("/proc/self/smaps").ok()?;
        let mut inside = false;
        for line in smaps.lines() {
            let range = line.split_whitespace().next().and_then(|r| r.split_once('-'));
            if let Some((lo, hi)) = range
                && let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16))
            {
                inside = (lo..hi).contains(&addr);
            } else if inside && line.starts_with("AnonHugePages:") {
                return line.split_whitespace().nth(1)?.parse().ok();
            }
        }
        None
    }

    #[test]
    fn huge_pages_back_guest_memory_when_the_host_has_thp() {
        let thp = std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled");
        if !thp.is_ok_and(|s| s.contains("[always]") || s.contains("[madvise]")) {
            eprintln!("skipped: this host has no transparent huge pages");
            return;
        }
        let size = 16u64 << 20;
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size }]).unwrap();
        advise_huge_pages(&mem).unwrap();
        for page in (0..size).step_by(PAGE_SIZE as usize) {
            mem.write_obj(1u8, GuestAddress(page)).unwrap();
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(size - PAGE_SIZE)).unwrap(), 1);
        let addr = slots_of(&mem)[0].host_addr;
        // At least half: the mapping's ends need not be 2 MiB aligned, and the kernel may fall
        // back to small pages when it has no free huge page.
        let huge = huge_kib_at(addr).expect("the mapping is in smaps");
        assert!(huge >= (size >> 10) / 2, "{huge} KiB of huge pages in {size} bytes");
    }

    /// How many pages of `mem`'s first region are resident (`mincore`), exactly for its range
    /// (smaps would count a neighbouring mapping the kernel merged it with).
    fn resident_pages(mem: &GuestMemory) -> usize {
        let r = mem.iter().next().unwrap();
        let pages = r.len() as usize / PAGE_SIZE as usize;
        let mut v = vec![0u8; pages];
        // SAFETY: the range is one live mapping and `v` has one byte per page of it.
        let rc = unsafe { libc::mincore(r.as_ptr().cast(), r.len() as usize, v.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore");
        v.iter().filter(|&&b| b & 1 != 0).count()
    }

    #[test]
    fn prealloc_allocates_every_page_and_leaves_them_zero() {
        let size = 8u64 << 20;
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size }]).unwrap();
        let pages = (size / PAGE_SIZE) as usize;
        assert_eq!(resident_pages(&mem), 0, "fresh memory is not allocated");
        prealloc(&mem).unwrap();
        assert_eq!(resident_pages(&mem), pages, "every page is allocated");
        let mut page = [1u8; PAGE_SIZE as usize];
        mem.read_slice(&mut page, GuestAddress(size - PAGE_SIZE)).unwrap();
        assert!(page.iter().all(|&b| b == 0));
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(!region.bitmap().dirty_at(0), "no VMM write is recorded");
    }

    #[test]
    fn populate_range_allocates_exactly_the_range() {
        let size = 8u64 << 20;
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size }]).unwrap();
        mem.write_obj(7u8, GuestAddress(0x20_0000)).unwrap();
        let before = resident_pages(&mem);
        if !populate_range(&mem, 0x20_0000, 1 << 20).unwrap() {
            eprintln!("skipped: this kernel has no MADV_POPULATE_WRITE");
            return;
        }
        assert_eq!(resident_pages(&mem), before + 255, "the 256 pages of the range, one already there");
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0000)).unwrap(), 7, "contents kept");
        assert!(populate_range(&mem, size - 0x1000, 0x2000).is_err(), "a range past the end");
    }
}
