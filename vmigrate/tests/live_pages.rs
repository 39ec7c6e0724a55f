//! Live pages (`LivePages`, protocol version 4): pages sent straight out of a running guest's
//! memory may arrive torn (the guest wrote them while they were sent). Each torn page must
//! arrive again, intact, before the end, or the stream is refused; damage to a frame's address
//! or page checksums is a checksum error at once. Checked through the public restore path, with
//! snapshot files spliced by hand around a real VM's snapshot.

mod common;

use common::{dest_vm, dump, source_vm};
use vcore::guest::DirtierConfig;
use vcore::{RunState, VmConfig};
use vmigrate::stream::{FrameReader, FrameWriter, HEADER_LEN, Kind, Message, PAGE, page_crc};
use vmigrate::{Destination, MigrationError, StreamError, save_snapshot};

/// A snapshot of a running dirtier, as its frames (each encoded alone), and the source's memory.
fn snapshot(name: &str) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let cfg = VmConfig { mem_mib: 32, ..Default::default() };
    let d = DirtierConfig { ws_pages: 512, pages_per_sec: 5_000, ..Default::default() };
    let src = source_vm(&cfg, d);
    let path = std::env::temp_dir().join(format!("vinfra-live-{name}-{}.snap", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    save_snapshot(&src, &mut f, None).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    let mut frames = Vec::new();
    let mut r = FrameReader::new(bytes.as_slice());
    loop {
        match r.read_frame() {
            Ok(m) => frames.push(encode(&m)),
            Err(StreamError::Closed) => break,
            Err(e) => panic!("reading the snapshot back: {e}"),
        }
    }
    (frames, dump(&src))
}

fn encode(m: &Message<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = FrameWriter::new(&mut out, 0);
    w.message(m).unwrap();
    w.flush().unwrap();
    drop(w);
    out
}

/// The first data page of the snapshot: its address and contents.
fn first_data_page(frames: &[Vec<u8>]) -> (u64, Vec<u8>) {
    frames
        .iter()
        .find_map(|f| match FrameReader::new(f.as_slice()).read_frame().unwrap() {
            Message::Pages { gpa, data } => Some((gpa, data[..PAGE].to_vec())),
            _ => None,
        })
        .expect("a data page")
}

/// A `LivePages` frame of one page; `torn` makes its page checksum wrong.
fn live_frame(gpa: u64, page: &[u8], torn: bool) -> Vec<u8> {
    let sum = page_crc(page) ^ u32::from(torn);
    encode(&Message::LivePages { gpa, sums: &sum.to_le_bytes(), data: page })
}

/// Index of the `CpuState` frame (pages come before it).
fn state_at(frames: &[Vec<u8>]) -> usize {
    frames
        .iter()
        .position(|f| matches!(FrameReader::new(f.as_slice()).read_frame(), Ok(Message::CpuState(_))))
        .expect("a CpuState frame")
}

/// Restores `frames` into a fresh VM; the result and the VM's memory.
fn restore(
    name: &str,
    frames: &[Vec<u8>],
) -> (Result<vmigrate::ReceiveStats, MigrationError>, Vec<Vec<u8>>, RunState) {
    let dst = dest_vm(&VmConfig { mem_mib: 32, ..Default::default() });
    let path = std::env::temp_dir().join(format!("vinfra-live-{name}-{}.spliced", std::process::id()));
    std::fs::write(&path, frames.concat()).unwrap();
    let mut f = std::fs::File::open(&path).unwrap();
    let res = Destination::new(&dst).restore_file(&mut f);
    std::fs::remove_file(&path).unwrap();
    (res, dump(&dst), dst.run_state())
}

#[test]
fn a_torn_page_that_arrives_again_is_restored() {
    require_kvm!();
    let (mut frames, src) = snapshot("again");
    let (gpa, page) = first_data_page(&frames);
    // Torn right after the handshake; the snapshot's own frames bring the page again, intact.
    frames.insert(1, live_frame(gpa, &page, true));
    let (res, mem, _) = restore("again", &frames);
    let stats = res.expect("restores");
    assert_eq!(stats.torn_pages, 1);
    assert!(mem == src, "memory equals the source's");
}

#[test]
fn a_torn_page_that_never_arrives_again_is_refused() {
    require_kvm!();
    let (mut frames, _) = snapshot("never");
    let (gpa, page) = first_data_page(&frames);
    // Torn after the last pages: nothing sends it again.
    let at = state_at(&frames);
    frames.insert(at, live_frame(gpa, &page, true));
    let (res, _, state) = restore("never", &frames);
    assert!(
        matches!(res, Err(MigrationError::Stream(StreamError::Torn { pages: 1, first })) if first == gpa),
        "{res:?}"
    );
    assert_eq!(state, RunState::Created, "nothing was restored");
}

#[test]
fn an_intact_live_page_is_taken() {
    require_kvm!();
    let (mut frames, src) = snapshot("intact");
    let (gpa, page) = first_data_page(&frames);
    let at = state_at(&frames);
    frames.insert(at, live_frame(gpa, &page, false));
    let (res, mem, _) = restore("intact", &frames);
    assert_eq!(res.expect("restores").torn_pages, 0);
    assert!(mem == src);
}

#[test]
fn a_byte_flipped_in_a_live_page_on_the_way_is_caught() {
    require_kvm!();
    let (mut frames, _) = snapshot("flip-data");
    let (gpa, page) = first_data_page(&frames);
    let mut f = live_frame(gpa, &page, false);
    let last = f.len() - 1;
    f[last] ^= 0x40; // in the page
    let at = state_at(&frames);
    frames.insert(at, f);
    let (res, _, state) = restore("flip-data", &frames);
    assert!(matches!(res, Err(MigrationError::Stream(StreamError::Torn { pages: 1, .. }))), "{res:?}");
    assert_eq!(state, RunState::Created);
}

#[test]
fn damage_to_a_live_frame_address_or_checksums_is_a_checksum_error() {
    require_kvm!();
    let (frames, _) = snapshot("flip-head");
    let (gpa, page) = first_data_page(&frames);
    for offset in [HEADER_LEN + 1, HEADER_LEN + 9] {
        // The address, then the page checksum: both are covered by the header checksum.
        let mut spliced = frames.clone();
        let mut f = live_frame(gpa, &page, false);
        f[offset] ^= 0x01;
        spliced.insert(1, f);
        let (res, _, state) = restore("flip-head", &spliced);
        assert!(
            matches!(res, Err(MigrationError::Stream(StreamError::Checksum { kind: Kind::LivePages, .. }))),
            "offset {offset}: {res:?}"
        );
        assert_eq!(state, RunState::Created);
    }
}
