//! Which pages of private anonymous guest memory the host never allocated, from
//! `/proc/self/pagemap`.
//!
//! Such a page reads as zeros, so the encoder sends it as a zero page without reading it. A read
//! would cost a page fault that maps the shared zero page, and the guest's next write to the page
//! would then cost a copy and a TLB flush on every CPU. In a guest that has touched a quarter of
//! its memory, the first pass of a migration skips the other three quarters this way.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::OnceLock;

use crate::dirty::DirtyBitmap;

/// Bit 63 of a pagemap entry: a page is mapped.
const PRESENT: u64 = 1 << 63;
/// Bit 62: the page is swapped out (or in transit: migration entries count as swapped).
const SWAPPED: u64 = 1 << 62;
/// Entries read per `pread`.
const BATCH: usize = 512;

/// The host page the entries describe; pagemap has one entry per host page.
const PAGE: usize = crate::stream::PAGE;

fn pagemap() -> Option<&'static File> {
    static FILE: OnceLock<Option<File>> = OnceLock::new();
    FILE.get_or_init(|| {
        (crate::sys::host_page_size() == PAGE).then(|| File::open("/proc/self/pagemap").ok()).flatten()
    })
    .as_ref()
}

/// Whether `region` is private anonymous memory, where a page the host never allocated reads
/// as zeros. A file's pages (even mapped privately) and shared memory may hold data the mapping
/// has not faulted in yet.
pub(crate) fn region_is_anonymous<B: vm_memory::bitmap::Bitmap>(
    region: &vm_memory::GuestRegionMmap<B>,
) -> bool {
    let want = libc::MAP_ANONYMOUS | libc::MAP_PRIVATE;
    region.file_offset().is_none() && region.flags() & (want | libc::MAP_SHARED) == want
}

/// The pages of the `pages` pages at host address `addr` (page-aligned) with nothing behind
/// them, neither mapped nor swapped out: one bit per page, set for such a hole. Only meaningful
/// for private anonymous memory ([`region_is_anonymous`]), where a hole reads as zeros. `None`
/// when the host cannot say (no procfs, another page size, an unaligned address).
///
/// The answer describes a moment of the call: a page the guest writes afterwards is dirty and
/// sent again, as for any page the encoder reads.
pub(crate) fn holes(addr: usize, pages: usize) -> Option<DirtyBitmap> {
    let file = pagemap()?;
    if !addr.is_multiple_of(PAGE) {
        return None;
    }
    let mut holes = DirtyBitmap::new(pages as u64);
    let mut raw = [0u8; 8 * BATCH];
    let mut done = 0;
    while done < pages {
        let n = (pages - done).min(BATCH);
        let at = ((addr / PAGE + done) * 8) as u64;
        file.read_exact_at(&mut raw[..8 * n], at).ok()?;
        for (k, e) in raw[..8 * n].chunks_exact(8).enumerate() {
            let e = u64::from_ne_bytes(e.try_into().expect("8 bytes"));
            if e & (PRESENT | SWAPPED) == 0 {
                holes.set((done + k) as u64);
            }
        }
        done += n;
    }
    Some(holes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn holes_follow_what_the_host_allocated() {
        let pages = 300;
        let mem = vcore::memory::create_guest_memory(&[vcore::config::RamRange {
            guest_addr: 0,
            size: (pages * PAGE) as u64,
        }])
        .unwrap();
        let region = mem.find_region(GuestAddress(0)).unwrap();
        assert!(region_is_anonymous(region));
        let addr = mem.get_slice(GuestAddress(0), PAGE).unwrap().ptr_guard().as_ptr() as usize;
        let Some(h) = holes(addr, pages) else {
            eprintln!("skipping: /proc/self/pagemap is not readable here");
            return;
        };
        assert_eq!(h.count(), pages as u64, "fresh memory is all holes");
        // Written pages are allocated, zeros included; a page only read maps the zero page.
        mem.write_slice(&[1], GuestAddress(3 * PAGE as u64)).unwrap();
        mem.write_slice(&[0], GuestAddress(200 * PAGE as u64)).unwrap();
        let mut b = [0u8];
        mem.read_slice(&mut b, GuestAddress(299 * PAGE as u64)).unwrap();
        let h = holes(addr, pages).unwrap();
        let filled: Vec<u64> = (0..pages as u64).filter(|&i| !h.is_set(i)).collect();
        assert_eq!(filled, [3, 200, 299]);
        // Bits past `pages` stay clear.
        assert_eq!(h.pages(), pages as u64);
        assert_eq!(h.words().len(), pages.div_ceil(64));
        assert_eq!(h.words()[h.words().len() - 1] >> (pages % 64), 0);
    }

    #[test]
    fn file_backed_memory_is_not_anonymous() {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        std::io::Write::write_all(&mut f, &[7u8; 2 * PAGE]).unwrap();
        let fo = vm_memory::FileOffset::new(f, 0);
        let mem =
            vcore::GuestMemory::from_ranges_with_files([(GuestAddress(0), 2 * PAGE, Some(fo))]).unwrap();
        assert!(!region_is_anonymous(mem.find_region(GuestAddress(0)).unwrap()));
    }
}
