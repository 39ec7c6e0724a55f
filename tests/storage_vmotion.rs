//! Storage vMotion end to end (no KVM needed): a virtio-blk device, served by the event loop,
//! takes writes from the driver harness (playing the guest) while a `DiskMirror` copies its
//! image to another file. The mirror becomes ready while writes go on, more writes follow, and
//! then the two files are equal byte for byte. Then the device switches to the copy between two
//! requests, and later writes land there only.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use vinfra::vcore::Snapshot;
use vinfra::vcore::vm_memory::{Bytes, GuestAddress};
use vinfra::vdevices::testing::{DESC_F_WRITE, Driver, guest_memory};
use vinfra::vdevices::virtio::block::{Block, BlockConfig, req};
use vinfra::vdevices::{DeviceState, EventLoop, MmioTransport};
use vinfra::vmigrate::DiskMirror;

const IMAGE: u64 = 128 << 20;
const T: Duration = Duration::from_secs(10);

fn temp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vinfra-storage-{}-{name}", std::process::id()))
}

/// splitmix64: reproducible offsets, lengths and contents.
fn next(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A block device on `src` whose writes `DiskMirror` (blocks of `block_size`) mirrors to
/// `dst`, served by an event loop and driven by the harness.
fn mirrored_disk(src: &Path, dst: &Path, block_size: u32) -> (DiskMirror, EventLoop, Driver) {
    let mirror = DiskMirror::new(src, dst, block_size).unwrap();
    let block = Block::new(BlockConfig { path: src.to_path_buf(), read_only: false, id: String::new() })
        .unwrap()
        .with_write_observer(mirror.observer());
    let mem = guest_memory(64);
    let t = MmioTransport::new(mem.clone(), Box::new(block)).unwrap();
    let events = EventLoop::start().unwrap();
    events.add(Arc::new(t.clone())).unwrap();
    let mut d = Driver::new(mem, t).unwrap();
    d.init(u64::MAX, 256).unwrap();
    (mirror, events, d)
}

/// Moves the device to the copy `dst` between two requests, once the mirror is in sync.
fn switch_to_copy(t: &MmioTransport, mirror: &DiskMirror, dst: &Path) {
    t.replace_device(|state| {
        mirror.check().map_err(|e| vinfra::vcore::StateError::Device {
            device: "mirror".into(),
            reason: e.to_string(),
        })?;
        let DeviceState::Block(mut b) = state else { unreachable!("a block device") };
        b.config.path = dst.to_path_buf();
        Ok(Box::new(Block::restore((), &b)?))
    })
    .unwrap();
}

/// Posts one guest write of `len` bytes of `fill` at byte `offset` (not notified); returns its
/// head.
fn post_write(d: &mut Driver, bufs: (u64, u64, u64), offset: u64, len: u32, fill: u8) -> u16 {
    let (h, data, st) = bufs;
    let mut hdr = req::OUT.to_le_bytes().to_vec();
    hdr.extend_from_slice(&[0; 4]);
    hdr.extend_from_slice(&(offset / 512).to_le_bytes());
    d.mem().write_slice(&hdr, GuestAddress(h)).unwrap();
    d.mem().write_slice(&vec![fill; len as usize], GuestAddress(data)).unwrap();
    d.post_raw(0, &[(h, 16, 0), (data, len, 0), (st, 1, DESC_F_WRITE)]).unwrap()
}

/// Waits for write `head` and checks its status.
fn wait_write(d: &mut Driver, head: u16, status: u64) {
    d.wait_head(0, head, T).unwrap();
    assert_eq!(d.mem().read_obj::<u8>(GuestAddress(status)).unwrap(), 0, "write OK");
}

/// One guest write of `len` bytes of `fill` at byte `offset`, through the real device.
fn write(d: &mut Driver, bufs: (u64, u64, u64), offset: u64, len: u32, fill: u8) {
    let head = post_write(d, bufs, offset, len, fill);
    d.kick(0).unwrap();
    wait_write(d, head, bufs.2);
}

#[test]
fn a_disk_mirrored_while_the_guest_writes_ends_equal() {
    let (src, dst) = (temp("src.img"), temp("dst.img"));
    let mut f = File::create(&src).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 13 + i / 4096) as u8).collect();
    for _ in 0..IMAGE >> 20 {
        f.write_all(&chunk).unwrap();
    }
    drop(f);
    // Small blocks: the copy takes long enough for many guest writes to race it.
    let (mirror, events, mut d) = mirrored_disk(&src, &dst, 16 << 10);
    let bufs = (d.alloc(16).unwrap(), d.alloc(256 << 10).unwrap(), d.alloc(1).unwrap());

    let mut x = 7u64;
    let (mut before_ready, mut after_ready) = (0u32, 0u32);
    let stats = std::thread::scope(|s| {
        let copier = s.spawn(|| mirror.run(4, |_, _| {}).unwrap());
        // Writes during the bulk copy and the dirty passes, then 300 more once it is ready.
        while after_ready < 300 {
            let sectors = IMAGE / 512;
            let len = ((next(&mut x) % 64 + 1) * 4096) as u32;
            let offset = (next(&mut x) % (sectors - u64::from(len) / 512)) * 512;
            write(&mut d, bufs, offset, len, next(&mut x) as u8);
            if mirror.is_ready() { after_ready += 1 } else { before_ready += 1 }
        }
        copier.join().unwrap()
    });
    mirror.check().unwrap();
    let (a, b) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    eprintln!("{before_ready} writes before ready, {after_ready} after; {stats:?}");
    assert!(before_ready >= 10, "writes raced the copy: {before_ready}");
    assert!(stats.blocks_copied >= IMAGE / (16 << 10), "{stats:?}");
    assert!(mirror.writes_mirrored() >= u64::from(after_ready), "{}", mirror.writes_mirrored());
    let first_diff = a.iter().zip(&b).position(|(x, y)| x != y);
    assert!(a.len() == b.len() && first_diff.is_none(), "images differ at {first_diff:?}");

    // Switch-over: the device moves to the copy between two requests. The guest goes on
    // writing and reading; everything lands in the copy, the source is not touched again.
    let t = d.transport().clone();
    let before = t.save();
    switch_to_copy(&t, &mirror, &dst);
    let DeviceState::Block(after) = t.save().device else { unreachable!() };
    assert_eq!(after.config.path, dst);
    assert_eq!(t.save().queues, before.queues, "the guest's queues are untouched");
    let mut written = Vec::new();
    for _ in 0..50 {
        let len = ((next(&mut x) % 16 + 1) * 4096) as u32;
        let offset = (next(&mut x) % (IMAGE / 512 - u64::from(len) / 512)) * 512;
        let fill = next(&mut x) as u8;
        write(&mut d, bufs, offset, len, fill);
        written.push((offset, len, fill));
    }
    let writes_mirrored = mirror.writes_mirrored();
    drop(events);
    let (a2, b2) = (std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    assert!(a2 == a, "the source image is not written after the switch");
    let mut expect = b;
    for (offset, len, fill) in written {
        expect[offset as usize..(offset + u64::from(len)) as usize].fill(fill);
    }
    assert!(b2 == expect, "every write after the switch is in the copy");
    assert!(mirror.writes_mirrored() == writes_mirrored, "the mirror no longer sees writes");
}

/// Switches the disk to the copy while the device is serving a batch of writes: whichever
/// side of the switch each write falls on (the source and its mirror, or the copy directly),
/// the copy ends up with all of them, in order.
#[test]
fn the_switch_loses_no_write_in_flight() {
    const SIZE: u64 = 16 << 20;
    let (src, dst) = (temp("race-src.img"), temp("race-dst.img"));
    std::fs::write(&src, (0..SIZE).map(|i| (i / 4096) as u8).collect::<Vec<u8>>()).unwrap();
    let (mirror, events, mut d) = mirrored_disk(&src, &dst, 64 << 10);
    let t = d.transport().clone();
    mirror.run(4, |_, _| {}).unwrap();
    assert!(mirror.is_ready());

    let mut expect = std::fs::read(&src).unwrap();
    let slots: Vec<_> =
        (0..16).map(|_| (d.alloc(16).unwrap(), d.alloc(64 << 10).unwrap(), d.alloc(1).unwrap())).collect();
    let mut x = 99u64;
    for round in 0..20 {
        let mut batch = Vec::new();
        for &bufs in &slots {
            let len = ((next(&mut x) % 16 + 1) * 4096) as u32;
            let offset = (next(&mut x) % (SIZE / 4096 - 16)) * 4096;
            let fill = next(&mut x) as u8;
            batch.push((post_write(&mut d, bufs, offset, len, fill), bufs.2));
            expect[offset as usize..(offset + u64::from(len)) as usize].fill(fill); // ring order
        }
        d.kick(0).unwrap();
        if round == 10 {
            // While the device works through the batch.
            switch_to_copy(&t, &mirror, &dst);
        }
        for (head, st) in batch {
            wait_write(&mut d, head, st);
        }
    }
    mirror.check().unwrap();
    drop(events);
    let copy = std::fs::read(&dst).unwrap();
    let _ = std::fs::remove_file(&src);
    let _ = std::fs::remove_file(&dst);
    assert!(mirror.writes_mirrored() >= 160, "the first ten rounds went through the mirror");
    let first_diff = copy.iter().zip(&expect).position(|(a, b)| a != b);
    assert!(first_diff.is_none(), "the copy differs at {first_diff:?}");
}
