//! Save every device mid-I/O, restore into new memory and new transports, finish the I/O:
//! nothing lost, nothing done twice.
mod common;

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::Duration;

use common::{Sink, blk_hdr, temp_image};
use vcore::Snapshot;
use vdevices::testing::{Driver, copy_memory, guest_memory};
use vdevices::virtio::balloon::Balloon;
use vdevices::virtio::block::{Block, BlockConfig, req, req_status};
use vdevices::virtio::console::{Console, ConsoleIo};
use vdevices::virtio::mmio::INT_VRING;
use vdevices::virtio::rng::Rng;
use vdevices::{DeviceState, EventLoop, MmioTransport, TransportState};

const SPAN: u64 = 8 << 20;
const T: Duration = Duration::from_secs(5);

fn sector_data(sector: u64) -> Vec<u8> {
    (0..512u64).map(|i| (sector * 31 + i) as u8).collect()
}

#[test]
fn save_mid_io_restore_and_complete() {
    let path = temp_image("state.img", 1 << 20);
    let mem = guest_memory(64);
    let (host, dev_side) = UnixStream::pair().unwrap();
    let dev_side2 = dev_side.try_clone().unwrap();
    let sink = Sink::default();
    let blk = MmioTransport::new(
        mem.clone(),
        Box::new(Block::new(BlockConfig { path: path.clone(), read_only: false, id: "s".into() }).unwrap()),
    )
    .unwrap();
    let rng = MmioTransport::new(mem.clone(), Box::new(Rng::new())).unwrap();
    let con = MmioTransport::new(
        mem.clone(),
        Box::new(
            Console::new(ConsoleIo { input: Some(dev_side.into()), output: Box::new(sink.clone()) }).unwrap(),
        ),
    )
    .unwrap();
    let (balloon, _handle) = Balloon::new();
    let bal = MmioTransport::new(mem.clone(), Box::new(balloon)).unwrap();
    let events = EventLoop::start().unwrap();
    let ids: Vec<_> =
        [&blk, &rng, &con, &bal].iter().map(|t| events.add(Arc::new((*t).clone())).unwrap()).collect();
    let mut db = Driver::new_in(mem.clone(), blk.clone(), 0, SPAN).unwrap();
    let mut dr = Driver::new_in(mem.clone(), rng.clone(), 1, SPAN).unwrap();
    let mut dc = Driver::new_in(mem.clone(), con.clone(), 2, SPAN).unwrap();
    db.init(u64::MAX, 64).unwrap();
    dr.init(u64::MAX, 16).unwrap();
    dc.init(u64::MAX, 16).unwrap();
    let mut dbal = Driver::new_in(mem.clone(), bal.clone(), 3, SPAN).unwrap();
    dbal.init(u64::MAX, 16).unwrap();
    let pfns = |p: &[u32]| p.iter().flat_map(|x| x.to_le_bytes()).collect::<Vec<u8>>();
    dbal.request(0, &[&pfns(&[0x3000, 0x3001])], &[]).unwrap();

    // Some I/O completes before the save.
    let c = db.request(0, &[&blk_hdr(req::OUT, 1), &sector_data(1)], &[1]).unwrap();
    assert_eq!(c.data[0], [req_status::OK]);
    assert_eq!(dr.request(0, &[], &[16]).unwrap().len, 16);
    dc.request(1, &[b"before "], &[]).unwrap();
    // One more completes, but the guest has not taken the interrupt yet when the VM is saved.
    let done_unseen = db.post(0, &[&blk_hdr(req::OUT, 2), &sector_data(2)], &[1]).unwrap();
    db.kick(0).unwrap();
    let deadline = std::time::Instant::now() + T;
    while db.used_idx(0).unwrap() != 2 {
        assert!(std::time::Instant::now() < deadline, "second write never completed");
        std::thread::sleep(Duration::from_millis(1));
    }

    // Quiesce the devices (the VM is paused), then put requests in flight: posted and notified,
    // not served.
    for id in ids {
        events.remove(id).unwrap();
    }
    drop(events);
    let writes: Vec<_> =
        (20..28u64).map(|s| db.post(0, &[&blk_hdr(req::OUT, s), &sector_data(s)], &[1]).unwrap()).collect();
    let reads: Vec<_> = (1..3u64).map(|s| db.post(0, &[&blk_hdr(req::IN, s)], &[512, 1]).unwrap()).collect();
    db.kick(0).unwrap();
    let rng_req = dr.post(0, &[], &[32]).unwrap();
    dr.kick(0).unwrap();
    let tx = dc.post(1, &[b"after"], &[]).unwrap();
    let rx = dc.post(0, &[], &[16]).unwrap();
    dc.kick(1).unwrap();
    dc.kick(0).unwrap();
    (&host).write_all(b"typed").unwrap();
    let inflate = dbal.post(0, &[&pfns(&[0x3002, 0x3003, 0x3004])], &[]).unwrap();
    dbal.kick(0).unwrap();
    let deflate = dbal.post(1, &[&pfns(&[0x3000])], &[]).unwrap();
    dbal.kick(1).unwrap();

    // Save, through bytes.
    let states: Vec<TransportState> = [&blk, &rng, &con, &bal]
        .iter()
        .map(|t| {
            let bytes = t.save().to_bytes();
            TransportState::from_bytes(&bytes).unwrap()
        })
        .collect();
    assert_eq!(states[0].interrupt_status & INT_VRING, INT_VRING, "pending interrupt saved");
    assert_eq!(states[0].queues[0].next_used, 2);
    let file_at_save = std::fs::read(&path).unwrap();
    assert_eq!(file_at_save[20 * 512..21 * 512], temp_image_sector(20)[..], "in-flight write not yet done");
    drop((blk, rng, con, bal));

    // Restore into a new VM: new memory with the old contents, new devices and transports.
    let mem2 = guest_memory(64);
    copy_memory(&mem, &mem2).unwrap();
    drop(mem);
    let restore = |s: &TransportState| -> MmioTransport {
        let device: Box<dyn vdevices::VirtioDevice> = match &s.device {
            DeviceState::Block(b) => Box::new(Block::restore((), b).unwrap()),
            DeviceState::Rng(r) => Box::new(Rng::restore((), r).unwrap()),
            DeviceState::Net(_) => unreachable!("no net device in this test"),
            DeviceState::Balloon(b) => Box::new(Balloon::restore((), b).unwrap()),
            DeviceState::Console(c) => Box::new(
                Console::restore(
                    ConsoleIo {
                        input: dev_side2.try_clone().map(Into::into).ok(),
                        output: Box::new(sink.clone()),
                    },
                    c,
                )
                .unwrap(),
            ),
        };
        MmioTransport::restore(vdevices::virtio::mmio::TransportArgs { mem: mem2.clone(), device }, s)
            .unwrap()
    };
    let blk2 = restore(&states[0]);
    let rng2 = restore(&states[1]);
    let con2 = restore(&states[2]);
    let bal2 = restore(&states[3]);
    let mut db = db.reattach(mem2.clone(), blk2.clone()).unwrap();
    let mut dr = dr.reattach(mem2.clone(), rng2.clone()).unwrap();
    let mut dc = dc.reattach(mem2.clone(), con2.clone()).unwrap();
    let mut dbal = dbal.reattach(mem2.clone(), bal2.clone()).unwrap();

    // The interrupt pending at save time is raised on the new VM before any new work.
    assert_eq!(db.wait_interrupt(T) & INT_VRING, INT_VRING);
    db.wait(&done_unseen, T).unwrap();

    let events = EventLoop::start().unwrap();
    for t in [&blk2, &rng2, &con2, &bal2] {
        events.add(Arc::new(t.clone())).unwrap();
    }
    for w in &writes {
        assert_eq!(db.wait(w, T).unwrap().data[0], [req_status::OK]);
    }
    for (i, r) in reads.iter().enumerate() {
        let c = db.wait(r, T).unwrap();
        assert_eq!(c.data[0], sector_data(i as u64 + 1));
    }
    assert_eq!(dr.wait(&rng_req, T).unwrap().len, 32);
    dc.wait(&tx, T).unwrap();
    let c = dc.wait(&rx, T).unwrap();
    assert_eq!(&c.data[0][..c.len as usize], b"typed");

    // Nothing lost, nothing twice: every request completed once, in the rings and the backends.
    assert_eq!(db.used_idx(0).unwrap(), 2 + 8 + 2);
    assert!(!db.saw_double_completion() && !dr.saw_double_completion() && !dc.saw_double_completion());
    let file = std::fs::read(&path).unwrap();
    for s in (1..3).chain(20..28u64) {
        assert_eq!(file[s as usize * 512..(s as usize + 1) * 512], sector_data(s)[..], "sector {s}");
    }
    let DeviceState::Block(b) = blk2.save().device else { panic!("not a block device") };
    assert_eq!(b.stats.writes, 10, "each write executed exactly once across the save");
    assert_eq!(b.stats.reads, 2);
    let DeviceState::Rng(r) = rng2.save().device else { panic!("not rng") };
    assert_eq!(r.bytes_served, 48);
    assert_eq!(sink.bytes(), b"before after");
    dbal.wait(&inflate, T).unwrap();
    dbal.wait(&deflate, T).unwrap();
    assert!(!dbal.saw_double_completion());
    let DeviceState::Balloon(b) = bal2.save().device else { panic!("not a balloon") };
    assert_eq!(b.inflated, vec![0x3001, 0x3002, 0x3003, 0x3004], "inflate and deflate each applied once");
    let _ = std::fs::remove_file(path);
}

/// What `temp_image` put in `sector` originally.
fn temp_image_sector(sector: usize) -> Vec<u8> {
    (sector * 512..(sector + 1) * 512).map(|i| (i / 512) as u8 ^ (i as u8)).collect()
}

#[test]
fn restore_refuses_mismatched_state() {
    let mem = guest_memory(16);
    let rng = MmioTransport::new(mem.clone(), Box::new(Rng::new())).unwrap();
    let mut s = rng.save();
    s.queues.push(s.queues[0]);
    let err = MmioTransport::restore(
        vdevices::virtio::mmio::TransportArgs { mem: mem.clone(), device: Box::new(Rng::new()) },
        &s,
    );
    assert!(err.is_err());
    let mut s = rng.save();
    s.queues[0].size = 3; // not a power of two
    let err = MmioTransport::restore(
        vdevices::virtio::mmio::TransportArgs { mem, device: Box::new(Rng::new()) },
        &s,
    );
    assert!(err.is_err());
}

#[test]
fn encoded_state_is_versioned_and_checked() {
    use vcore::StateError;
    use vdevices::virtio::mmio::DEVICE_STATE_VERSION;

    let mem = guest_memory(16);
    let rng = MmioTransport::new(mem, Box::new(Rng::new())).unwrap();
    let good = rng.save().to_bytes();
    assert_eq!(TransportState::from_bytes(&good).unwrap(), rng.save());
    let flip = |at: usize| {
        let mut b = good.clone();
        b[at] ^= 0x40;
        b
    };
    assert!(matches!(TransportState::from_bytes(&flip(0)), Err(StateError::BadMagic { .. })));
    // A newer minor version, or another major one, is refused before anything is decoded.
    let mut newer = good.clone();
    newer[10..12].copy_from_slice(&(DEVICE_STATE_VERSION.1 + 1).to_le_bytes());
    assert!(matches!(TransportState::from_bytes(&newer), Err(StateError::Version { .. })));
    assert!(matches!(TransportState::from_bytes(&flip(8)), Err(StateError::Version { .. })));
    assert!(matches!(TransportState::from_bytes(&good[..good.len() - 1]), Err(StateError::Length { .. })));
    assert!(matches!(TransportState::from_bytes(&flip(good.len() - 1)), Err(StateError::Checksum { .. })));
    // A VM snapshot is not device state.
    let vm_like = vcore::state::VM_SNAPSHOT.encode(&rng.save());
    assert!(matches!(TransportState::from_bytes(&vm_like), Err(StateError::BadMagic { .. })));
}

mod fuzz {
    use proptest::prelude::*;
    use vcore::Snapshot;
    use vdevices::MmioTransport;
    use vdevices::TransportState;
    use vdevices::testing::guest_memory;
    use vdevices::virtio::mmio::DEVICE_STATE;
    use vdevices::virtio::rng::Rng;

    fn good() -> Vec<u8> {
        MmioTransport::new(guest_memory(16), Box::new(Rng::new())).unwrap().save().to_bytes()
    }

    proptest! {
        /// Any bytes decode to a state or a typed error, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            let _ = TransportState::from_bytes(&bytes);
        }

        /// A valid encoding with bytes changed anywhere is refused (the header checks or the
        /// checksum catch it), unless the change was a no-op.
        #[test]
        fn mutated_state_is_refused(edits in proptest::collection::vec((any::<usize>(), 1u8..=255), 1..4)) {
            let good = good();
            let mut b = good.clone();
            for (at, x) in edits {
                let i = at % b.len();
                b[i] ^= x;
            }
            prop_assume!(b != good);
            prop_assert!(TransportState::from_bytes(&b).is_err());
        }

        /// A correctly framed payload of garbage (right magic, version, length and checksum) is a
        /// decode error or a state, never a panic: as version 1.1 (packed rings) and as 1.0,
        /// which decodes through its own structure.
        #[test]
        fn framed_garbage_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..400), old in any::<bool>()) {
            let envelope = if old { vcore::Envelope { version: (1, 0), ..DEVICE_STATE } } else { DEVICE_STATE };
            let framed = envelope.encode(&serde_bytes_like(&payload));
            let _ = TransportState::from_bytes(&framed);
        }
    }

    /// Postcard encodes a tuple of bytes as the bytes themselves: lets a test frame raw garbage.
    fn serde_bytes_like(p: &[u8]) -> impl serde::Serialize + '_ {
        struct Raw<'a>(&'a [u8]);
        impl serde::Serialize for Raw<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                use serde::ser::SerializeTuple;
                let mut t = s.serialize_tuple(self.0.len())?;
                for b in self.0 {
                    t.serialize_element(b)?;
                }
                t.end()
            }
        }
        Raw(p)
    }
}
