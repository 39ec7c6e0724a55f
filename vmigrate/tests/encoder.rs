//! The page encoder (`FrameWriter::guest_pages`) against a model (no KVM needed): any mix of
//! zero and data pages decodes to the same memory, zero pages travel only as `ZeroPages` runs,
//! data frames hold consecutive data pages, and the counts add up.

use proptest::prelude::*;
use vcore::config::RamRange;
use vcore::memory::create_guest_memory;
use vcore::vm_memory::{Address, Bytes, GuestAddress, VolatileSlice};
use vmigrate::receive::apply_memory;
use vmigrate::stream::{
    FrameReader, FrameWriter, HOLE_CHECK_PAGES, LIVE_MIN_PAGES, Layout, MAX_PAGES_PER_FRAME, Message, PAGE,
    is_zero,
};

const BASE: u64 = 1 << 20;
const SIZE: u64 = 4 << 20;

/// A page: zero, or zero except one byte (so the zero check must look at every byte).
fn page_strategy() -> impl Strategy<Value = Option<(usize, u8)>> {
    prop_oneof![2 => Just(None), 3 => (0..PAGE, 1u8..=255).prop_map(Some)]
}

proptest! {
    #[test]
    fn pages_round_trip_through_the_encoder(
        pages in proptest::collection::vec(page_strategy(), 0..500),
        first in 0u64..64,
        flush_at in prop_oneof![Just(0usize), Just(64 << 10), Just(1 << 20)],
        compress in any::<bool>(),
        live in any::<bool>(),
        lead in prop_oneof![Just(0usize), 1usize..400],
    ) {
        // A leading stretch of `lead` data pages: long enough, often, to go live.
        let pages: Vec<_> = (0..lead).map(|i| Some((i % PAGE, (i % 255) as u8 + 1))).chain(pages).collect();
        let mut bytes = vec![0u8; pages.len() * PAGE];
        for (i, p) in pages.iter().enumerate() {
            if let Some((at, v)) = p {
                bytes[i * PAGE + at] = *v;
            }
        }
        let gpa = BASE + first * PAGE as u64;
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, flush_at);
        w.set_compress(compress);
        w.set_live(live);
        let mut model = bytes.clone();
        let (normal, zero) = w.guest_pages(gpa, &VolatileSlice::from(&mut model[..])).unwrap();
        w.flush().unwrap();
        // Pages of one non-zero byte compress far more than an eighth: all of them go compressed.
        prop_assert_eq!(w.compressed_pages, if compress { normal } else { 0 });
        // Live frames only without compression, for stretches of at least LIVE_MIN_PAGES.
        let live_max = if live && !compress { normal } else { 0 };
        prop_assert!(w.live_pages <= live_max, "{} live pages", w.live_pages);
        if live && !compress && lead >= LIVE_MIN_PAGES {
            prop_assert!(w.live_pages >= LIVE_MIN_PAGES as u64, "a long stretch goes live");
        }
        drop(w);
        let data_pages = pages.iter().filter(|p| p.is_some()).count() as u64;
        prop_assert_eq!(normal, data_pages);
        prop_assert_eq!(zero, pages.len() as u64 - data_pages);

        // Decode into memory full of garbage: zero runs must clear it.
        let mem = create_guest_memory(&[RamRange { guest_addr: BASE, size: SIZE }]).unwrap();
        mem.write_slice(&vec![0xcc; SIZE as usize], GuestAddress(BASE)).unwrap();
        let layout = Layout { regions: vec![(BASE, SIZE)] };
        let mut r = FrameReader::new(out.as_slice());
        let (mut sent_normal, mut sent_zero) = (0u64, 0u64);
        while let Ok(m) = r.read_frame() {
            if let Message::Pages { data, .. } = &m {
                prop_assert!(data.len() / PAGE <= MAX_PAGES_PER_FRAME);
                prop_assert!(data.chunks(PAGE).all(|p| !is_zero(p)), "a zero page inside a data frame");
            }
            if let Message::LivePages { data, .. } = &m {
                prop_assert!(data.len() / PAGE >= LIVE_MIN_PAGES && data.len() / PAGE <= MAX_PAGES_PER_FRAME);
                prop_assert!(data.chunks(PAGE).all(|p| !is_zero(p)), "a zero page inside a live frame");
            }
            if let Message::CompressedPages { count, data, .. } = &m {
                let pages = lz4_flex::block::decompress(data, *count as usize * PAGE).unwrap();
                prop_assert!(pages.chunks(PAGE).all(|p| !is_zero(p)), "a zero page inside a compressed frame");
            }
            let (n, z) = apply_memory(&mem, &layout, &m, None).unwrap();
            sent_normal += n;
            sent_zero += z;
        }
        prop_assert_eq!((sent_normal, sent_zero), (normal, zero));
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, GuestAddress(gpa)).unwrap();
        prop_assert!(back == bytes, "decoded memory differs");
        // The same stream decoded straight into guest memory.
        let direct = create_guest_memory(&[RamRange { guest_addr: BASE, size: SIZE }]).unwrap();
        direct.write_slice(&vec![0xcc; SIZE as usize], GuestAddress(BASE)).unwrap();
        let mut r = FrameReader::new(out.as_slice());
        loop {
            match r.read_frame_into(&direct, &layout) {
                Ok(Message::PagesWritten { torn, .. }) => {
                    prop_assert!(torn.iter().all(|&w| w == 0), "torn pages from memory nobody wrote");
                }
                Ok(m) => {
                    apply_memory(&direct, &layout, &m, None).unwrap();
                }
                Err(_) => break,
            }
        }
        direct.read_slice(&mut back, GuestAddress(gpa)).unwrap();
        prop_assert!(back == bytes, "memory decoded in place differs");
        // Nothing around the run was touched.
        let mut before = vec![0u8; (gpa - BASE) as usize];
        mem.read_slice(&mut before, GuestAddress(BASE)).unwrap();
        prop_assert!(before.iter().all(|&b| b == 0xcc));
    }
}

/// Whether each page of `mem`'s only region is allocated (`mincore`).
fn resident(mem: &vcore::GuestMemory) -> Vec<bool> {
    use vcore::vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let r = mem.iter().next().unwrap();
    let mut v = vec![0u8; r.len() as usize / PAGE];
    // SAFETY: the range is one live mapping and `v` has one byte per page of it.
    let rc = unsafe { libc::mincore(r.as_ptr().cast(), r.len() as usize, v.as_mut_ptr()) };
    assert_eq!(rc, 0, "mincore");
    v.iter().map(|&b| b & 1 != 0).collect()
}

/// Pages of `mem`'s only region that are allocated.
fn resident_pages(mem: &vcore::GuestMemory) -> usize {
    resident(mem).iter().filter(|&&r| r).count()
}

/// A page of guest memory for the `guest_range` test.
#[derive(Debug, Clone, Copy)]
enum Page {
    /// Never written: the host has not allocated it.
    Untouched,
    /// Written with zeros: allocated, and zero.
    WrittenZero,
    /// One non-zero byte at an offset.
    Data(usize, u8),
}

fn guest_page_strategy() -> impl Strategy<Value = Page> {
    prop_oneof![
        3 => Just(Page::Untouched),
        1 => Just(Page::WrittenZero),
        2 => (0..PAGE, 1u8..=255).prop_map(|(at, v)| Page::Data(at, v)),
    ]
}

proptest! {
    /// `guest_range` over vcore's memory, where pages the host never allocated are zero pages
    /// found in its page tables: the stream decodes to the same memory, the counts add up, and
    /// encoding leaves those pages unallocated (it did not read them).
    #[test]
    fn guest_range_sends_untouched_pages_as_zero_without_reading_them(
        pages in proptest::collection::vec(guest_page_strategy(), 1..600),
        first in 0u64..64,
        live in any::<bool>(),
    ) {
        let mem = create_guest_memory(&[RamRange { guest_addr: BASE, size: SIZE }]).unwrap();
        let gpa = BASE + first * PAGE as u64;
        let mut bytes = vec![0u8; pages.len() * PAGE];
        for (i, p) in pages.iter().enumerate() {
            let at = GuestAddress(gpa + (i * PAGE) as u64);
            match *p {
                Page::Untouched => {}
                Page::WrittenZero => mem.write_slice(&[0], at).unwrap(),
                Page::Data(off, v) => {
                    mem.write_slice(&[v], at.unchecked_add(off as u64)).unwrap();
                    bytes[i * PAGE + off] = v;
                }
            }
        }
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 1 << 20);
        w.set_live(live);
        let (normal, zero) = w.guest_range(&mem, gpa, bytes.len()).unwrap();
        w.flush().unwrap();
        drop(w);
        let data_pages = pages.iter().filter(|p| matches!(p, Page::Data(..))).count() as u64;
        prop_assert_eq!((normal, zero), (data_pages, pages.len() as u64 - data_pages));
        let first_page = (gpa - BASE) as usize / PAGE;
        let res = resident(&mem);
        for (i, p) in pages.iter().enumerate() {
            if matches!(p, Page::Untouched) && pages.len() >= HOLE_CHECK_PAGES {
                prop_assert!(!res[first_page + i], "page {} of the range was faulted in", i);
            }
        }

        let back_mem = create_guest_memory(&[RamRange { guest_addr: BASE, size: SIZE }]).unwrap();
        back_mem.write_slice(&vec![0xcc; SIZE as usize], GuestAddress(BASE)).unwrap();
        let layout = Layout { regions: vec![(BASE, SIZE)] };
        let mut r = FrameReader::new(out.as_slice());
        while let Ok(m) = r.read_frame() {
            apply_memory(&back_mem, &layout, &m, None).unwrap();
        }
        let mut back = vec![0u8; bytes.len()];
        back_mem.read_slice(&mut back, GuestAddress(gpa)).unwrap();
        prop_assert!(back == bytes, "decoded memory differs");
    }
}

/// A destination that never ran allocates each run of pages in one call before reading it in
/// (`FrameReader::set_populate`): memory ends equal, and zero pages stay unallocated.
#[test]
fn populating_runs_allocates_only_data_pages() {
    // 64 data pages, 64 zero pages, 32 data pages, copied and live.
    let mut bytes = vec![0u8; 160 * PAGE];
    for p in (0..64).chain(128..160) {
        bytes[p * PAGE + p % PAGE] = p as u8 | 1;
    }
    for live in [false, true] {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 1 << 20);
        w.set_live(live);
        let mut model = bytes.clone();
        w.guest_pages(BASE, &VolatileSlice::from(&mut model[..])).unwrap();
        w.flush().unwrap();
        drop(w);
        let mem = create_guest_memory(&[RamRange { guest_addr: BASE, size: SIZE }]).unwrap();
        let layout = Layout { regions: vec![(BASE, SIZE)] };
        let mut r = FrameReader::new(out.as_slice());
        r.set_populate(true);
        while let Ok(m) = r.read_frame_into(&mem, &layout) {
            // Zero pages of a VM that never ran are left alone (as the receiver does).
            if !matches!(m, Message::ZeroPages { .. }) {
                apply_memory(&mem, &layout, &m, None).unwrap();
            }
        }
        // Only the 96 data pages are allocated.
        assert_eq!(resident_pages(&mem), 96, "live: {live}");
        let mut back = vec![0u8; bytes.len()];
        mem.read_slice(&mut back, GuestAddress(BASE)).unwrap();
        assert!(back == bytes, "memory equal (live: {live})");
    }
}
