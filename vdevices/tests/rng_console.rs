//! virtio-rng from getrandom and virtio-console over a socket pair, through the harness.
mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use common::{Sink, rig};
use vdevices::virtio::console::{Console, ConsoleIo};
use vdevices::virtio::rng::Rng;

#[test]
fn rng_fills_buffers_with_fresh_entropy() {
    let mut r = rig(Box::new(Rng::new()));
    r.driver.init(u64::MAX, 16).unwrap();
    let a = r.driver.request(0, &[], &[64]).unwrap();
    let b = r.driver.request(0, &[], &[32, 32]).unwrap();
    assert_eq!((a.len, b.len), (64, 64));
    let b: Vec<u8> = b.data.concat();
    assert_ne!(a.data[0], b);
    // 64 random bytes are neither the harness's 0xaa fill nor all zero.
    assert!(a.data[0].iter().any(|&x| x != 0xaa) && a.data[0].iter().any(|&x| x != 0));
}

#[test]
fn console_moves_bytes_both_ways() {
    let (host, dev_side) = UnixStream::pair().unwrap();
    let sink = Sink::default();
    let console =
        Console::new(ConsoleIo { input: Some(dev_side.into()), output: Box::new(sink.clone()) }).unwrap();
    let mut r = rig(Box::new(console));
    r.driver.init(u64::MAX, 16).unwrap();

    // Guest to host.
    let c = r.driver.request(1, &[b"hello ", b"host\n"], &[]).unwrap();
    assert_eq!(c.len, 0);
    assert_eq!(sink.bytes(), b"hello host\n");

    // Host to guest, input before the guest posts a buffer: kept until one arrives.
    (&host).write_all(b"typed early").unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let c = r.driver.request(0, &[], &[64]).unwrap();
    assert_eq!(&c.data[0][..c.len as usize], b"typed early");

    // A buffer waiting, then input.
    let p = r.driver.post(0, &[], &[4]).unwrap();
    r.driver.kick(0).unwrap();
    (&host).write_all(b"abcdef").unwrap();
    let c = r.driver.wait(&p, Duration::from_secs(5)).unwrap();
    assert_eq!(&c.data[0][..], b"abcd");
    let c = r.driver.request(0, &[], &[4]).unwrap();
    assert_eq!(&c.data[0][..c.len as usize], b"ef");
    let mut none = [0u8; 1];
    host.set_nonblocking(true).unwrap();
    assert!((&host).read(&mut none).is_err());
}
