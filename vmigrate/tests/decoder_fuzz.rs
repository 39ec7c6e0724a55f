//! The wire decoder under arbitrary and mutated streams (no KVM needed): it never panics and
//! never writes outside the agreed layout. Long mode: `PROPTEST_CASES=200000 cargo test --release
//! -p vmigrate --test decoder_fuzz`.

use proptest::prelude::*;
use vcore::GuestMemory;
use vcore::config::RamRange;
use vcore::memory::create_guest_memory;
use vcore::vm_memory::{Bytes, GuestAddress};
use vmigrate::receive::apply_memory;
use vmigrate::stream::{
    CpuFeatures, FrameReader, FrameWriter, Hello, LIVE_MIN_PAGES, Layout, Message, PAGE, page_crc,
};

const IN: (u64, u64) = (0, 1 << 20);
const OUT: (u64, u64) = (16 << 20, 1 << 20);

fn memory() -> GuestMemory {
    let mem = create_guest_memory(&[
        RamRange { guest_addr: IN.0, size: IN.1 },
        RamRange { guest_addr: OUT.0, size: OUT.1 },
    ])
    .unwrap();
    mem.write_slice(&vec![0xab; OUT.1 as usize], GuestAddress(OUT.0)).unwrap();
    mem
}

fn layout() -> Layout {
    Layout { regions: vec![IN] }
}

/// Decodes `bytes` frame by frame, applying page frames; stops at the first error. Runs both
/// decoders (parse then apply, and straight into guest memory); they must agree on the count.
fn decode_all(mem: &GuestMemory, bytes: &[u8]) -> usize {
    let mut r = FrameReader::new(bytes);
    let mut frames = 0;
    while let Ok(msg) = r.read_frame() {
        let _ = apply_memory(mem, &layout(), &msg, None);
        frames += 1;
    }
    let mut direct = FrameReader::new(bytes);
    let mut direct_frames = 0;
    while let Ok(msg) = direct.read_frame_into(mem, &layout()) {
        let _ = apply_memory(mem, &layout(), &msg, None);
        direct_frames += 1;
    }
    // The direct decoder also stops at a page frame outside the layout; otherwise they agree.
    assert!(direct_frames <= frames, "{frames} vs {direct_frames}");
    frames
}

fn outside_untouched(mem: &GuestMemory) -> bool {
    let mut b = vec![0u8; OUT.1 as usize];
    mem.read_slice(&mut b, GuestAddress(OUT.0)).unwrap();
    b.iter().all(|&x| x == 0xab)
}

fn valid_stream(pages: &[(u64, u8)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = FrameWriter::new(&mut out, 1 << 20);
    // Pages of one repeated byte compress: the stream carries CompressedPages frames too.
    w.set_compress(pages.len().is_multiple_of(2));
    let hello =
        Hello { min_version: 1, max_version: 1, vcpus: 1, layout: layout(), cpu: CpuFeatures::default() };
    w.message(&Message::Hello(hello)).unwrap();
    for &(page, fill) in pages {
        let gpa = (page % (IN.1 / PAGE as u64)) * PAGE as u64;
        let mut page = [fill; PAGE];
        w.guest_pages(gpa, &vm_memory::VolatileSlice::from(&mut page[..])).unwrap();
    }
    // A stretch sent live (protocol version 4): a `LivePages` frame.
    w.set_compress(false);
    w.set_live(true);
    let fill = pages.first().map_or(1, |p| p.1 | 1);
    let mut run = vec![fill; LIVE_MIN_PAGES * PAGE];
    w.guest_pages(16 * PAGE as u64, &vm_memory::VolatileSlice::from(&mut run[..])).unwrap();
    w.message(&Message::CpuState(b"state")).unwrap();
    w.message(&Message::Device { name: "dev".into(), data: b"abc" }).unwrap();
    w.message(&Message::Complete).unwrap();
    w.flush().unwrap();
    drop(w);
    out
}

#[test]
fn a_valid_stream_decodes_and_lands_in_place() {
    let mem = memory();
    let bytes = valid_stream(&[(3, 7), (4, 0), (9, 1)]);
    // Hello, Pages, ZeroPages, Pages, LivePages, CpuState, Device, Complete
    assert_eq!(decode_all(&mem, &bytes), 8);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(3 * PAGE as u64)).unwrap(), 7);
    assert_eq!(mem.read_obj::<u8>(GuestAddress((16 + LIVE_MIN_PAGES as u64) * PAGE as u64 - 1)).unwrap(), 7);
    assert_eq!(mem.read_obj::<u8>(GuestAddress(9 * PAGE as u64 + 4095)).unwrap(), 1);
    assert!(outside_untouched(&mem));
}

proptest! {
    #[test]
    fn arbitrary_bytes_never_panic_or_escape(bytes in proptest::collection::vec(any::<u8>(), 0..8192)) {
        let mem = memory();
        decode_all(&mem, &bytes);
        prop_assert!(outside_untouched(&mem));
    }

    #[test]
    fn arbitrary_frames_with_valid_checksums_never_escape(
        frames in proptest::collection::vec((0u16..20, any::<u64>(), any::<u64>(), 0usize..3), 1..20),
        lz4 in proptest::collection::vec(any::<u8>(), 0..256),
    ) {
        // Well-formed headers and checksums around hostile contents: addresses anywhere.
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 1 << 20);
        for &(kind, a, b, pages) in &frames {
            let mut payload = a.to_le_bytes().to_vec();
            match kind {
                4 => payload.extend(std::iter::repeat_n(0x5a, pages.max(1) * PAGE)),
                // Address, page checksums (right ones, or hostile), pages; its header checksum
                // covers the address and the page checksums only.
                18 => {
                    let n = pages.max(1);
                    let sum = if pages == 2 { page_crc(&[0x5a; PAGE]) } else { b as u32 };
                    let sums: Vec<u8> = std::iter::repeat_n(sum.to_le_bytes(), n).flatten().collect();
                    let data = vec![0x5a; n * PAGE];
                    let _ = w.message(&Message::LivePages { gpa: a, sums: &sums, data: &data });
                    continue;
                }
                5 => payload.extend_from_slice(&(b % 1024).to_le_bytes()),
                // Address, a page count, and a hostile LZ4 block (or a real one of 0x5a pages).
                13 => {
                    payload.extend_from_slice(&((b % 300) as u32).to_le_bytes());
                    if pages == 2 {
                        payload.extend(lz4_flex::block::compress(&vec![0x5a; (b % 300) as usize * PAGE]));
                    } else {
                        payload.extend_from_slice(&lz4);
                    }
                }
                _ => payload.extend_from_slice(&b.to_le_bytes()),
            }
            if let Some(k) = kind_of(kind) { let _ = w.frame(k, &payload[..payload.len().min(k.max_len())]); }
        }
        w.flush().unwrap();
        drop(w);
        let mem = memory();
        decode_all(&mem, &out);
        prop_assert!(outside_untouched(&mem));
    }

    #[test]
    fn mutated_valid_streams_never_panic_or_escape(
        pages in proptest::collection::vec((any::<u64>(), any::<u8>()), 1..8),
        flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        cut in any::<usize>(),
        junk in proptest::collection::vec(any::<u8>(), 0..64),
    ) {
        let mut bytes = valid_stream(&pages);
        for (at, x) in flips {
            let i = at % bytes.len();
            bytes[i] ^= x | 1;
        }
        let at = cut % bytes.len();
        bytes.splice(at..at, junk);
        let mem = memory();
        decode_all(&mem, &bytes);
        prop_assert!(outside_untouched(&mem));
    }
}

fn kind_of(k: u16) -> Option<vmigrate::stream::Kind> {
    use vmigrate::stream::Kind::*;
    [
        Hello,
        HelloAck,
        Abort,
        Pages,
        ZeroPages,
        CpuState,
        Device,
        IterationEnd,
        Complete,
        Ready,
        Commit,
        Started,
        CompressedPages,
        StreamHello,
        DiskHello,
        DiskWrite,
        DiskAck,
        LivePages,
        IterationApplied,
    ]
    .into_iter()
    .find(|x| *x as u16 == k)
}
