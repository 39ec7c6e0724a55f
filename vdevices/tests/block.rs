//! virtio-blk through the harness against a real image file.
mod common;

use std::time::Duration;

use common::{blk_hdr, rig, settle, temp_image};
use vdevices::testing::DESC_F_WRITE;
use vdevices::virtio::VIRTIO_F_VERSION_1;
use vdevices::virtio::block::{Block, BlockConfig, F_DISCARD, F_FLUSH, F_RO, req, req_status};

fn block(name: &str, read_only: bool) -> (std::path::PathBuf, Box<Block>) {
    let path = temp_image(name, 1 << 20);
    let cfg = BlockConfig { path: path.clone(), read_only, id: "vinfra-disk-0".into() };
    (path, Box::new(Block::new(cfg).unwrap()))
}

#[test]
fn reads_writes_flushes_ids_and_discards() {
    let (path, dev) = block("rw.img", false);
    let mut r = rig(dev);
    let acked = r.driver.init(u64::MAX, 64).unwrap();
    assert!(acked & VIRTIO_F_VERSION_1 != 0 && acked & F_FLUSH != 0 && acked & F_DISCARD != 0);
    assert_eq!(acked & F_RO, 0);
    let cap = u64::from_le_bytes(r.driver.read_config(0, 8).try_into().unwrap());
    assert_eq!(cap, 2048);

    // Read sector 3 and compare with the file.
    let file = std::fs::read(&path).unwrap();
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 3)], &[512, 1]).unwrap();
    assert_eq!(c.len, 513);
    assert_eq!(c.data[1], [req_status::OK]);
    assert_eq!(c.data[0], file[3 * 512..4 * 512]);

    // Write 4 KiB split over two buffers at sector 10, read it back, check the file.
    let a: Vec<u8> = (0..1536).map(|i| (i * 7) as u8).collect();
    let b: Vec<u8> = (0..2560).map(|i| (i * 13 + 1) as u8).collect();
    let c = r.driver.request(0, &[&blk_hdr(req::OUT, 10), &a, &b], &[1]).unwrap();
    assert_eq!((c.len, c.data[0][0]), (1, req_status::OK));
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 10)], &[4096, 1]).unwrap();
    assert_eq!(c.data[1], [req_status::OK]);
    assert_eq!(c.data[0][..1536], a[..]);
    assert_eq!(c.data[0][1536..], b[..]);
    let file = std::fs::read(&path).unwrap();
    assert_eq!(file[10 * 512..10 * 512 + 1536], a[..]);

    let c = r.driver.request(0, &[&blk_hdr(req::FLUSH, 0)], &[1]).unwrap();
    assert_eq!(c.data[0], [req_status::OK]);

    let c = r.driver.request(0, &[&blk_hdr(req::GET_ID, 0)], &[20, 1]).unwrap();
    assert_eq!(&c.data[0][..13], b"vinfra-disk-0");
    assert_eq!(c.data[0][13..], [0u8; 7]);
    assert_eq!(c.data[1], [req_status::OK]);

    // Discard sectors 10..18: they read back as zeros, the file keeps its size.
    let mut seg = 10u64.to_le_bytes().to_vec();
    seg.extend_from_slice(&8u32.to_le_bytes());
    seg.extend_from_slice(&0u32.to_le_bytes());
    let c = r.driver.request(0, &[&blk_hdr(req::DISCARD, 0), &seg], &[1]).unwrap();
    assert_eq!(c.data[0], [req_status::OK]);
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 10)], &[4096, 1]).unwrap();
    assert!(c.data[0].iter().all(|&x| x == 0));
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 1 << 20);

    // Past the end, and an unknown type.
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 2047)], &[1024, 1]).unwrap();
    assert_eq!(c.data[1], [req_status::IOERR]);
    let c = r.driver.request(0, &[&blk_hdr(99, 0)], &[1]).unwrap();
    assert_eq!(c.data[0], [req_status::UNSUPP]);
    assert!(r.driver.transport().broken().is_none());
    assert!(r.driver.interrupts() > 0);
    let _ = std::fs::remove_file(path);
}

#[test]
fn read_only_refuses_writes() {
    let (path, dev) = block("ro.img", true);
    let before = std::fs::read(&path).unwrap();
    let mut r = rig(dev);
    let acked = r.driver.init(u64::MAX, 16).unwrap();
    assert!(acked & F_RO != 0);
    let c = r.driver.request(0, &[&blk_hdr(req::OUT, 0), &[0x55; 512]], &[1]).unwrap();
    assert_eq!(c.data[0], [req_status::IOERR]);
    let c = r.driver.request(0, &[&blk_hdr(req::IN, 0)], &[512, 1]).unwrap();
    assert_eq!((c.data[0].as_slice(), c.data[1][0]), (&before[..512], req_status::OK));
    assert_eq!(std::fs::read(&path).unwrap(), before);
    let _ = std::fs::remove_file(path);
}

#[test]
fn many_requests_in_flight_complete_once() {
    let (path, dev) = block("many.img", false);
    let mut r = rig(dev);
    r.driver.init(u64::MAX, 128).unwrap();
    let pending: Vec<_> =
        (0..32u64).map(|i| r.driver.post(0, &[&blk_hdr(req::IN, i * 8)], &[4096, 1]).unwrap()).collect();
    r.driver.kick(0).unwrap();
    let file = std::fs::read(&path).unwrap();
    for (i, p) in pending.iter().enumerate() {
        let c = r.driver.wait(p, Duration::from_secs(5)).unwrap();
        assert_eq!(c.data[0], file[i * 4096..(i + 1) * 4096]);
    }
    assert_eq!(r.driver.used_idx(0).unwrap(), 32);
    assert!(!r.driver.saw_double_completion());
    let _ = std::fs::remove_file(path);
}

fn stats(r: &common::Rig) -> vdevices::virtio::block::BlockStats {
    match r.driver.transport().with_device(|d| d.state()) {
        vdevices::virtio::DeviceState::Block(b) => b.stats,
        other => panic!("not a block device: {other:?}"),
    }
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len).map(|i| (seed as usize * 31 + i * 7 + i / 251) as u8).collect()
}

/// Adjacent writes posted together are merged, land in the file, and read back (merged too) into
/// the right guest buffers, whatever the split of each request over its buffers.
#[test]
fn adjacent_requests_merge_and_keep_their_data() {
    let (path, dev) = block("merge.img", false);
    let mut r = rig(dev);
    r.driver.init(u64::MAX, 128).unwrap();
    settle(&r);
    // 8 writes of 4 KiB at sectors 40, 48, ..., 96; odd ones split over two buffers.
    let data: Vec<Vec<u8>> = (0..8).map(|i| pattern(i, 4096)).collect();
    let writes: Vec<_> = (0..8u64)
        .map(|i| {
            let d = &data[i as usize];
            let h = blk_hdr(req::OUT, 40 + 8 * i);
            if i % 2 == 1 {
                r.driver.post(0, &[&h, &d[..1000], &d[1000..]], &[1]).unwrap()
            } else {
                r.driver.post(0, &[&h, d], &[1]).unwrap()
            }
        })
        .collect();
    r.driver.kick(0).unwrap();
    for p in &writes {
        let c = r.driver.wait(p, Duration::from_secs(5)).unwrap();
        assert_eq!((c.len, c.data[0][0]), (1, req_status::OK));
    }
    let file = std::fs::read(&path).unwrap();
    for (i, d) in data.iter().enumerate() {
        let off = (40 + 8 * i) * 512;
        assert_eq!(file[off..off + 4096], d[..], "write {i} in the file");
    }
    assert_eq!(stats(&r).merged, 8, "all 8 writes served by one merged I/O");

    // Read them back: 8 adjacent reads, the buffers split unevenly (header and data apart).
    let reads: Vec<_> = (0..8u64)
        .map(|i| {
            r.driver
                .post(
                    0,
                    &[&blk_hdr(req::IN, 40 + 8 * i)],
                    &[512 * (i as u32 % 3 + 1), 4096 - 512 * (i as u32 % 3 + 1), 1],
                )
                .unwrap()
        })
        .collect();
    r.driver.kick(0).unwrap();
    for (i, p) in reads.iter().enumerate() {
        let c = r.driver.wait(p, Duration::from_secs(5)).unwrap();
        assert_eq!(c.len, 4097);
        assert_eq!(c.data[2], [req_status::OK]);
        assert_eq!([&c.data[0][..], &c.data[1][..]].concat(), data[i], "read {i}");
    }
    let s = stats(&r);
    assert_eq!((s.merged, s.reads, s.writes, s.errors), (16, 8, 8, 0));
    assert!(!r.driver.saw_double_completion());
    let _ = std::fs::remove_file(path);
}

/// A mix in one notification: adjacent runs, gaps, reads after writes of the same sectors (they
/// see the new data: ring order is kept), and one request past the end, which alone fails.
#[test]
fn mixed_batch_keeps_order_and_fails_only_the_bad_request() {
    let (path, dev) = block("mix.img", false);
    let mut r = rig(dev);
    r.driver.init(u64::MAX, 128).unwrap();
    settle(&r);
    let before = std::fs::read(&path).unwrap();
    let new = pattern(9, 2048);
    let ps = [
        r.driver.post(0, &[&blk_hdr(req::IN, 0)], &[1024, 1]).unwrap(), // sectors 0..2
        r.driver.post(0, &[&blk_hdr(req::IN, 2)], &[1024, 1]).unwrap(), // 2..4, adjacent
        r.driver.post(0, &[&blk_hdr(req::IN, 2040)], &[8192, 1]).unwrap(), // past the end (2048)
        r.driver.post(0, &[&blk_hdr(req::IN, 4)], &[512, 1]).unwrap(),  // 4..5
        r.driver.post(0, &[&blk_hdr(req::IN, 6)], &[512, 1]).unwrap(),  // 6..7, a gap
        r.driver.post(0, &[&blk_hdr(req::OUT, 1), &new], &[1]).unwrap(), // writes 1..5
        r.driver.post(0, &[&blk_hdr(req::IN, 0)], &[1024, 1]).unwrap(), // sees the write
        r.driver.post(0, &[&blk_hdr(req::IN, 2)], &[2048, 1]).unwrap(),
    ];
    r.driver.kick(0).unwrap();
    let c: Vec<_> = ps.iter().map(|p| r.driver.wait(p, Duration::from_secs(5)).unwrap()).collect();
    let st: Vec<u8> = c.iter().map(|c| c.data.last().unwrap()[0]).collect();
    use req_status::{IOERR, OK};
    assert_eq!(st, [OK, OK, IOERR, OK, OK, OK, OK, OK]);
    assert_eq!((c[2].len, c[5].len), (1, 1));
    assert_eq!(c[0].data[0], before[..1024]);
    assert_eq!(c[1].data[0], before[1024..2048]);
    assert_eq!(c[3].data[0], before[2048..2560]);
    assert_eq!(c[4].data[0], before[3072..3584]);
    let mut model = before.clone();
    model[512..2560].copy_from_slice(&new);
    assert_eq!(c[6].data[0], model[..1024]);
    assert_eq!(c[7].data[0], model[1024..3072]);
    assert_eq!(std::fs::read(&path).unwrap(), model);
    let s = stats(&r);
    assert_eq!((s.errors, s.reads, s.writes), (1, 6, 1));
    assert_eq!(s.merged, 4, "0+2 and 6+7 merged; 4, 6 and the write alone");
    let _ = std::fs::remove_file(path);
}

/// A merged read that comes up short (the image shrank under the device) falls back to one read
/// per request: the requests before the new end succeed with their data, the others fail.
#[test]
fn short_merged_read_falls_back_to_single_requests() {
    let (path, dev) = block("short.img", false);
    let mut r = rig(dev);
    r.driver.init(u64::MAX, 64).unwrap();
    settle(&r);
    let before = std::fs::read(&path).unwrap();
    std::fs::OpenOptions::new().write(true).open(&path).unwrap().set_len((1 << 20) - 8192).unwrap();
    let ps: Vec<_> = (0..4u64)
        .map(|i| r.driver.post(0, &[&blk_hdr(req::IN, 2016 + 8 * i)], &[4096, 1]).unwrap())
        .collect();
    r.driver.kick(0).unwrap();
    let c: Vec<_> = ps.iter().map(|p| r.driver.wait(p, Duration::from_secs(5)).unwrap()).collect();
    let st: Vec<u8> = c.iter().map(|c| c.data[1][0]).collect();
    assert_eq!(st, [req_status::OK, req_status::OK, req_status::IOERR, req_status::IOERR]);
    assert_eq!(c[0].data[0], before[2016 * 512..2024 * 512]);
    assert_eq!(c[1].data[0], before[2024 * 512..2032 * 512]);
    assert_eq!((c[0].len, c[2].len), (4097, 1));
    let s = stats(&r);
    assert_eq!((s.merged, s.reads, s.errors), (0, 2, 2));
    let _ = std::fs::remove_file(path);
}

mod fuzz {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]
        /// Any request header and buffer shape gets a status (OK, IOERR or UNSUPP) and leaves
        /// the device serving: malformed requests fail, they never break the device or the VMM.
        #[test]
        fn any_request_gets_a_status(
            kind in prop_oneof![Just(req::IN), Just(req::OUT), Just(req::FLUSH), Just(req::GET_ID), Just(req::DISCARD), any::<u32>()],
            sector in prop_oneof![0u64..2100, any::<u64>()],
            hdr_len in prop_oneof![Just(16usize), 0usize..40],
            out_len in 0usize..3000,
            in_len in 0u32..3000,
        ) {
            let (path, dev) = block("fuzz.img", false);
            let mut r = rig(dev);
            r.driver.init(u64::MAX, 16).unwrap();
            let mut h = blk_hdr(kind, sector);
            h.resize(hdr_len, 0);
            let out = vec![0x33u8; out_len];
            let mut bufs: Vec<&[u8]> = Vec::new();
            if !h.is_empty() { bufs.push(&h); }
            if out_len > 0 { bufs.push(&out); }
            let mut ins = Vec::new();
            if in_len > 0 { ins.push(in_len); }
            ins.push(1);
            let c = r.driver.request(0, &bufs, &ins).unwrap();
            let status = c.data.last().unwrap()[0];
            prop_assert!([req_status::OK, req_status::IOERR, req_status::UNSUPP].contains(&status));
            prop_assert!(r.driver.transport().broken().is_none());
            let _ = std::fs::remove_file(path);
        }
    }

    /// One request of a random batch: a read or a write of `sectors` sectors at `sector`
    /// (right after the previous request when `adjacent`), its data split at `split`.
    #[derive(Debug, Clone)]
    struct Op {
        write: bool,
        adjacent: bool,
        sector: u64,
        sectors: u64,
        split: usize,
    }

    fn op() -> impl Strategy<Value = Op> {
        (any::<bool>(), prop::bool::weighted(0.7), 0u64..140, 1u64..12, 0usize..4096).prop_map(
            |(write, adjacent, sector, sectors, split)| Op { write, adjacent, sector, sectors, split },
        )
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Random batches of reads and writes, posted together and served (merged where adjacent)
        /// in one notification, give the same statuses, guest buffers and file contents as a plain
        /// in-order model of the disk.
        #[test]
        fn batches_match_a_model(batches in proptest::collection::vec(proptest::collection::vec(op(), 1..12), 1..4)) {
            const SECTORS: u64 = 128;
            let path = temp_image("model.img", (SECTORS * 512) as usize);
            let dev = Block::new(BlockConfig { path: path.clone(), read_only: false, id: String::new() }).unwrap();
            let mut r = rig(Box::new(dev));
            r.driver.init(u64::MAX, 64).unwrap();
            let mut model = std::fs::read(&path).unwrap();
            for (b, ops) in batches.iter().enumerate() {
                r.driver.reset_buffers();
                let mut posted = Vec::new();
                let mut next = 0u64;
                for (i, o) in ops.iter().enumerate() {
                    let sector = if o.adjacent { next } else { o.sector };
                    let len = (o.sectors * 512) as usize;
                    next = sector + o.sectors;
                    let split = o.split.min(len);
                    let p = if o.write {
                        let data = super::pattern((b * 100 + i) as u64, len);
                        let h = blk_hdr(req::OUT, sector);
                        let p = if split == 0 || split == len {
                            r.driver.post(0, &[&h, &data], &[1]).unwrap()
                        } else {
                            r.driver.post(0, &[&h, &data[..split], &data[split..]], &[1]).unwrap()
                        };
                        (p, Some(data))
                    } else if split == 0 || split == len {
                        (r.driver.post(0, &[&blk_hdr(req::IN, sector)], &[len as u32, 1]).unwrap(), None)
                    } else {
                        let lens = [split as u32, (len - split) as u32, 1];
                        (r.driver.post(0, &[&blk_hdr(req::IN, sector)], &lens).unwrap(), None)
                    };
                    posted.push((sector, len, p));
                }
                r.driver.kick(0).unwrap();
                for (sector, len, (p, data)) in &posted {
                    let c = r.driver.wait(p, Duration::from_secs(5)).unwrap();
                    let status = c.data.last().unwrap()[0];
                    let off = (*sector * 512) as usize;
                    let inside = off + len <= model.len();
                    prop_assert_eq!(status, if inside { req_status::OK } else { req_status::IOERR },
                        "batch {} sector {} len {}", b, sector, len);
                    match data {
                        Some(d) if inside => model[off..off + len].copy_from_slice(d),
                        None if inside => {
                            let got: Vec<u8> = c.data[..c.data.len() - 1].concat();
                            prop_assert_eq!(c.len as usize, len + 1);
                            prop_assert!(got == model[off..off + len], "read of sector {} in batch {}", sector, b);
                        }
                        _ => prop_assert_eq!(c.len, 1),
                    }
                }
            }
            prop_assert_eq!(std::fs::read(&path).unwrap(), model);
            prop_assert!(!r.driver.saw_double_completion());
            prop_assert!(r.driver.transport().broken().is_none());
            let _ = std::fs::remove_file(path);
        }
    }
}

/// What the device writes into guest memory (read data, status bytes, the used ring) is in the
/// VMM's dirty bitmap once the driver sees the requests completed, and what only the guest wrote
/// (the headers) is not: the guest's own writes are KVM's to track. Migration relies on both.
#[test]
fn device_writes_are_marked_dirty_and_guest_writes_are_not() {
    use vm_memory::bitmap::Bitmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
    let (path, dev) = block("dirty.img", false);
    let mut r = rig(dev);
    r.driver.init(u64::MAX, 64).unwrap();
    let d = &mut r.driver;
    // Header, data and status byte each on a page of their own.
    let reqs: Vec<(u64, u64, u64)> = (0..16)
        .map(|_| {
            let page = |d: &mut vdevices::testing::Driver| d.alloc_aligned(4096, 4096).unwrap();
            (page(d), page(d), page(d))
        })
        .collect();
    for region in d.mem().iter() {
        vm_memory::MmapRegion::bitmap(region).reset();
    }
    let mut heads = Vec::new();
    for (i, &(h, data, st)) in reqs.iter().enumerate() {
        d.guest().write_slice(&blk_hdr(req::IN, i as u64 * 8), GuestAddress(h)).unwrap();
        heads.push(d.post_raw(0, &[(h, 16, 0), (data, 4096, DESC_F_WRITE), (st, 1, DESC_F_WRITE)]).unwrap());
    }
    d.notify(0);
    for head in heads {
        d.wait_head(0, head, Duration::from_secs(10)).unwrap();
    }
    let dirty = |addr: u64| {
        let region = d.mem().find_region(GuestAddress(addr)).unwrap();
        region.bitmap().dirty_at((addr - region.start_addr().0) as usize)
    };
    for &(h, data, st) in &reqs {
        assert!(dirty(data) && dirty(st), "device writes at {data:#x}, {st:#x} are marked");
        assert!(!dirty(h), "the guest's own header at {h:#x} is not");
    }
    assert!(dirty(d.used_ring(0).unwrap()), "the used ring is marked");
    let _ = std::fs::remove_file(path);
}
