//! Garbage in the queues breaks the device (or fails the request), never the VMM.
mod common;

use std::time::Duration;

use common::{blk_hdr, rig, temp_image};
use vdevices::testing::{DESC_F_NEXT, DESC_F_WRITE};
use vdevices::virtio::block::{Block, BlockConfig, req, req_status};
use vdevices::virtio::mmio::status;
use vdevices::virtio::rng::Rng;

const MEM: u64 = 16 << 20;

fn block_rig(name: &str) -> (std::path::PathBuf, common::Rig) {
    let path = temp_image(name, 64 << 10);
    let dev = Block::new(BlockConfig { path: path.clone(), read_only: false, id: String::new() }).unwrap();
    let mut r = rig(Box::new(dev));
    r.driver.init(u64::MAX, 8).unwrap();
    (path, r)
}

fn expect_broken(r: &mut common::Rig, what: &str) {
    assert!(r.driver.wait_broken(Duration::from_secs(5)), "{what}: device not marked broken");
    assert!(r.driver.read_reg(0x70) & status::DEVICE_NEEDS_RESET != 0);
    let reason = r.driver.transport().broken().unwrap();
    eprintln!("{what}: {reason}");
}

/// After a reset the device works again: the broken state does not leak.
fn recovers(r: &mut common::Rig) {
    r.driver.init(u64::MAX, 8).unwrap();
    r.driver.reset_buffers();
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 0)], &[512, 1]).unwrap();
    assert_eq!(c.data[1], [req_status::OK]);
}

#[test]
fn descriptor_outside_memory() {
    let (path, mut r) = block_rig("oom.img");
    let before = std::fs::read(&path).unwrap();
    let hdr = r.driver.alloc(16).unwrap();
    r.driver.write_desc(0, 0, hdr, 16, DESC_F_NEXT, 1).unwrap();
    r.driver.write_desc(0, 1, 0xffff_ffff_0000, 512, DESC_F_NEXT, 2).unwrap();
    r.driver.write_desc(0, 2, hdr + 64, 1, DESC_F_WRITE, 0).unwrap();
    r.driver.publish(0, 0).unwrap();
    r.driver.notify(0);
    expect_broken(&mut r, "address outside memory");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    recovers(&mut r);
    let _ = std::fs::remove_file(path);
}

#[test]
fn length_beyond_memory() {
    let (path, mut r) = block_rig("len.img");
    r.driver.write_desc(0, 0, MEM - 4096, 1 << 20, DESC_F_WRITE, 0).unwrap();
    r.driver.publish(0, 0).unwrap();
    r.driver.notify(0);
    expect_broken(&mut r, "length beyond memory");
    recovers(&mut r);
    let _ = std::fs::remove_file(path);
}

#[test]
fn descriptor_loop() {
    let (path, mut r) = block_rig("loop.img");
    let buf = r.driver.alloc(64).unwrap();
    r.driver.write_desc(0, 0, buf, 16, DESC_F_NEXT, 1).unwrap();
    r.driver.write_desc(0, 1, buf + 16, 16, DESC_F_NEXT, 0).unwrap();
    r.driver.publish(0, 0).unwrap();
    r.driver.notify(0);
    expect_broken(&mut r, "descriptor loop");
    recovers(&mut r);
    let _ = std::fs::remove_file(path);
}

#[test]
fn avail_index_jump() {
    let (path, mut r) = block_rig("jump.img");
    r.driver.set_avail_idx(0, 1000).unwrap();
    r.driver.notify(0);
    expect_broken(&mut r, "avail index jump");
    recovers(&mut r);
    let _ = std::fs::remove_file(path);
}

#[test]
fn head_index_out_of_range_and_missing_status() {
    let (path, mut r) = block_rig("head.img");
    r.driver.publish(0, 200).unwrap(); // queue has 8 descriptors
    r.driver.notify(0);
    expect_broken(&mut r, "head out of range");
    recovers(&mut r);
    // A block request with no writable status byte cannot be answered: broken.
    let hdr = r.driver.alloc(16).unwrap();
    r.driver.write_desc(0, 7, hdr, 16, 0, 0).unwrap();
    r.driver.publish(0, 7).unwrap();
    r.driver.notify(0);
    expect_broken(&mut r, "no status byte");
    let _ = std::fs::remove_file(path);
}

#[test]
fn rings_outside_memory_do_not_activate() {
    let mut r = rig(Box::new(Rng::new()));
    r.driver.init(u64::MAX, 8).unwrap();
    // Re-init by hand with the descriptor table past the end of memory.
    let d = &r.driver;
    d.write_reg(0x70, 0);
    d.write_reg(0x70, 1 | 2);
    d.write_reg(0x24, 1);
    d.write_reg(0x20, 1); // VERSION_1
    d.write_reg(0x70, 1 | 2 | 8);
    d.write_reg(0x30, 0);
    d.write_reg(0x38, 8);
    d.write_reg(0x80, 0xffff_0000);
    d.write_reg(0x84, 0x10);
    d.write_reg(0x44, 1);
    d.write_reg(0x70, 1 | 2 | 8 | 4);
    assert!(d.read_reg(0x70) & status::DEVICE_NEEDS_RESET != 0);
    assert!(!d.transport().activated());
    d.notify(0); // nothing is served, nothing panics
}
