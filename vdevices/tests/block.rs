//! virtio-blk through the harness against a real image file.
mod common;

use std::time::Duration;

use common::{blk_hdr, rig, temp_image};
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
    r.driver.notify(0);
    let file = std::fs::read(&path).unwrap();
    for (i, p) in pending.iter().enumerate() {
        let c = r.driver.wait(p, Duration::from_secs(5)).unwrap();
        assert_eq!(c.data[0], file[i * 4096..(i + 1) * 4096]);
    }
    assert_eq!(r.driver.used_idx(0).unwrap(), 32);
    assert!(!r.driver.saw_double_completion());
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
}
