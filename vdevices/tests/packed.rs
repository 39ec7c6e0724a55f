//! Packed virtqueues (virtio 1.1) end to end: the transport offers `VIRTIO_F_RING_PACKED`, the
//! test driver negotiates it, and the devices serve requests through packed rings exactly as
//! through split ones.
mod common;

use std::time::Duration;

use common::{Rig, blk_hdr, rig, temp_image};
use vdevices::virtio::block::{Block, BlockConfig, req, req_status};
use vdevices::virtio::packed::VIRTIO_F_RING_PACKED;
use vdevices::virtio::rng::Rng;

const T: Duration = Duration::from_secs(5);

/// A rig whose driver negotiated packed rings of `size` descriptors.
fn packed_rig(device: Box<dyn vdevices::VirtioDevice>, size: u16) -> Rig {
    let mut r = rig(device);
    r.driver.transport().offer_packed(true);
    r.driver.set_packed(true);
    let acked = r.driver.init(u64::MAX, size).unwrap();
    assert!(acked & VIRTIO_F_RING_PACKED != 0, "packed rings negotiated");
    r
}

fn block(name: &str) -> (std::path::PathBuf, Box<Block>) {
    let path = temp_image(name, 1 << 20);
    let cfg = BlockConfig { path: path.clone(), read_only: false, id: String::new() };
    (path, Box::new(Block::new(cfg).unwrap()))
}

#[test]
fn split_rings_stay_the_default() {
    let (path, dev) = block("packed-default.img");
    let mut r = rig(dev);
    // Offered only when asked for; a driver asking for everything still gets split rings.
    assert_eq!(r.driver.device_features() & VIRTIO_F_RING_PACKED, 0);
    let acked = r.driver.init(u64::MAX, 16).unwrap();
    assert_eq!(acked & VIRTIO_F_RING_PACKED, 0);
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 0)], &[512, 1]).unwrap();
    assert_eq!(c.data[1], [req_status::OK]);
    let _ = std::fs::remove_file(path);
}

#[test]
fn block_reads_and_writes_through_a_packed_ring() {
    let (path, dev) = block("packed-rw.img");
    let mut r = packed_rig(dev, 128);
    // 32 reads in flight at once (3 descriptors each), compared with the file.
    let file = std::fs::read(&path).unwrap();
    let pending: Vec<_> =
        (0..32u64).map(|i| r.driver.post(0, &[&blk_hdr(req::IN, i * 8)], &[4096, 1]).unwrap()).collect();
    r.driver.kick(0).unwrap();
    for (i, p) in pending.iter().enumerate() {
        let c = r.driver.wait(p, T).unwrap();
        assert_eq!(c.data[1], [req_status::OK]);
        assert_eq!(c.data[0], file[i * 4096..(i + 1) * 4096], "read {i}");
    }
    // A write split over two buffers, read back.
    let data: Vec<u8> = (0..4096).map(|i| (i * 13 + 5) as u8).collect();
    let c = r.driver.request(0, &[&blk_hdr(req::OUT, 300), &data[..1000], &data[1000..]], &[1]).unwrap();
    assert_eq!(c.data[0], [req_status::OK]);
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 300)], &[4096, 1]).unwrap();
    assert_eq!(c.data[0], data);
    assert_eq!(std::fs::read(&path).unwrap()[300 * 512..300 * 512 + 4096], data[..]);
    assert!(!r.driver.saw_double_completion());
    assert!(r.driver.transport().broken().is_none());
    let _ = std::fs::remove_file(path);
}

/// A ring of 8 descriptors goes round many times (both wrap counters flip again and again),
/// with requests of different lengths so that chains straddle the end of the ring.
#[test]
fn a_small_ring_wraps_many_times() {
    let (path, dev) = block("packed-wrap.img");
    let mut r = packed_rig(dev, 8);
    let file = std::fs::read(&path).unwrap();
    for round in 0..200u64 {
        let sector = (round * 7) % 2000;
        let pieces: &[u32] = if round % 3 == 0 { &[256, 256, 1] } else { &[512, 1] };
        let c = r.driver.request(0, &[&blk_hdr(req::IN, sector)], pieces).unwrap();
        let got: Vec<u8> = c.data[..c.data.len() - 1].concat();
        assert_eq!(got, file[sector as usize * 512..sector as usize * 512 + 512], "round {round}");
        assert_eq!(c.data.last().unwrap(), &[req_status::OK]);
    }
    // Two at a time, so that completions and new chains interleave across the wrap.
    for round in 0..100u64 {
        let a = r.driver.post(0, &[&blk_hdr(req::IN, round)], &[512, 1]).unwrap();
        let b = r.driver.post(0, &[&blk_hdr(req::IN, round + 1)], &[512, 1]).unwrap();
        r.driver.kick(0).unwrap();
        for (p, s) in [(a, round), (b, round + 1)] {
            let c = r.driver.wait(&p, T).unwrap();
            assert_eq!(c.data[0], file[s as usize * 512..s as usize * 512 + 512]);
        }
    }
    assert!(r.driver.transport().broken().is_none());
    let _ = std::fs::remove_file(path);
}

#[test]
fn rng_through_a_packed_ring() {
    let mut r = packed_rig(Box::new(Rng::new()), 16);
    let a = r.driver.request(0, &[], &[64]).unwrap();
    let b = r.driver.request(0, &[], &[64]).unwrap();
    assert_eq!((a.len, b.len), (64, 64));
    assert_ne!(a.data[0], b.data[0], "fresh entropy each time");
    assert!(r.driver.interrupts() > 0);
}

/// Save a block device mid-I/O on a packed ring (requests posted and notified, not served),
/// restore into new memory and a new transport, finish: nothing lost, nothing twice.
#[test]
fn packed_state_is_saved_mid_io_and_restored() {
    use std::sync::Arc;
    use vcore::Snapshot;
    use vdevices::testing::{Driver, copy_memory, guest_memory};
    use vdevices::{DeviceState, EventLoop, MmioTransport, TransportState};

    let path = temp_image("packed-state.img", 1 << 20);
    let mem = guest_memory(16);
    let cfg = BlockConfig { path: path.clone(), read_only: false, id: String::new() };
    let blk = MmioTransport::new(mem.clone(), Box::new(Block::new(cfg).unwrap())).unwrap();
    blk.offer_packed(true);
    let events = EventLoop::start().unwrap();
    let id = events.add(Arc::new(blk.clone())).unwrap();
    let mut d = Driver::new(mem.clone(), blk.clone()).unwrap();
    d.set_packed(true);
    assert!(d.init(u64::MAX, 16).unwrap() & VIRTIO_F_RING_PACKED != 0);
    let sector = |s: u64| -> Vec<u8> { (0..512u64).map(|i| (s * 7 + i) as u8).collect() };
    // Some I/O before; then the VM is paused (the device quiesced) with 4 writes in flight.
    for s in 0..5u64 {
        let c = d.request(0, &[&blk_hdr(req::OUT, s), &sector(s)], &[1]).unwrap();
        assert_eq!(c.data[0], [req_status::OK]);
    }
    events.remove(id).unwrap();
    drop(events);
    let writes: Vec<_> =
        (10..14u64).map(|s| d.post(0, &[&blk_hdr(req::OUT, s), &sector(s)], &[1]).unwrap()).collect();
    d.kick(0).unwrap();

    let state = TransportState::from_bytes(&blk.save().to_bytes()).unwrap();
    assert!(state.packed.is_some(), "packed rings saved");
    drop(blk);
    let mem2 = guest_memory(16);
    copy_memory(&mem, &mem2).unwrap();
    let DeviceState::Block(b) = &state.device else { panic!("not a block device") };
    let device = Box::new(Block::restore((), b).unwrap());
    let blk2 =
        MmioTransport::restore(vdevices::virtio::mmio::TransportArgs { mem: mem2.clone(), device }, &state)
            .unwrap();
    let mut d = d.reattach(mem2, blk2.clone()).unwrap();
    let events = EventLoop::start().unwrap();
    events.add(Arc::new(blk2.clone())).unwrap();
    for w in &writes {
        assert_eq!(d.wait(w, T).unwrap().data[0], [req_status::OK]);
    }
    // And the ring goes on after the restore.
    let c = d.request(0, &[&blk_hdr(req::IN, 12)], &[512, 1]).unwrap();
    assert_eq!(c.data[0], sector(12));
    let DeviceState::Block(b) = blk2.save().device else { panic!("not a block device") };
    assert_eq!(b.stats.writes, 9, "each write executed exactly once across the save");
    assert!(!d.saw_double_completion());
    let _ = std::fs::remove_file(path);
}

/// Garbage in a packed ring breaks the device (with the reason), never the VMM; a reset and a
/// new negotiation bring it back.
#[test]
fn bad_packed_rings_break_the_device_not_the_vmm() {
    use vdevices::virtio::packed::DESC_F_NEXT;
    // Each case rewrites part of two freshly posted chains (descriptors 0–2 and 3–5) before the
    // device is notified.
    type Spoil = fn(&vdevices::testing::Driver, u64);
    let cases: [(&str, Spoil); 3] = [
        ("a buffer outside guest memory", |d, ring| {
            use vm_memory::{Bytes, GuestAddress};
            d.guest().write_obj(0xffff_ffff_0000u64, GuestAddress(ring + 16)).unwrap();
        }),
        ("a buffer ID reused while in flight", |d, ring| {
            use vm_memory::{Bytes, GuestAddress};
            let first: u16 = d.guest().read_obj(GuestAddress(ring + 2 * 16 + 12)).unwrap();
            d.guest().write_obj(first, GuestAddress(ring + 5 * 16 + 12)).unwrap();
        }),
        ("a chain that runs into a descriptor not made available", |d, ring| {
            use vm_memory::{Bytes, GuestAddress};
            let at = GuestAddress(ring + 5 * 16 + 14);
            let flags: u16 = d.guest().read_obj(at).unwrap();
            d.guest().write_obj(flags | DESC_F_NEXT, at).unwrap();
        }),
    ];
    for (what, spoil) in cases {
        let (path, dev) = block("packed-bad.img");
        let mut r = packed_rig(dev, 8);
        common::settle(&r);
        let ring = r.driver.used_ring(0).unwrap();
        for s in 0..2u64 {
            r.driver.post(0, &[&blk_hdr(req::IN, s)], &[512, 1]).unwrap();
        }
        spoil(&r.driver, ring);
        r.driver.notify(0);
        assert!(r.driver.wait_broken(T), "{what}: device not marked broken");
        eprintln!("{what}: {}", r.driver.transport().broken().unwrap());
        // Reset and negotiate again: the device serves.
        r.driver.set_packed(true);
        r.driver.init(u64::MAX, 8).unwrap();
        r.driver.reset_buffers();
        let c = r.driver.request(0, &[&blk_hdr(req::IN, 0)], &[512, 1]).unwrap();
        assert_eq!(c.data[1], [req_status::OK], "{what}: recovers after a reset");
        let _ = std::fs::remove_file(path);
    }
}
