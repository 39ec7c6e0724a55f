//! virtio-net through the harness against a real tap inside a network namespace this test
//! creates, with a raw packet socket as the other end of the wire. No IP address is configured
//! anywhere (IPv6 is off in the namespace); frames carry loopback addresses only as bytes.
mod common;

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use common::rig;
use vdevices::testing::netns::NetNs;
use vdevices::virtio::net::{F_GUEST_CSUM, F_MAC, F_MRG_RXBUF, HDR_LEN, Net, RX_QUEUE, TX_QUEUE};
use vdevices::virtio::{VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const PEER: [u8; 6] = [0x02, 0, 0, 0, 0, 1];

fn usable() -> bool {
    let root =
        std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    let ip = std::process::Command::new("ip").arg("-V").output().is_ok();
    let tun = std::path::Path::new("/dev/net/tun").exists();
    if !(root && ip && tun) {
        eprintln!("SKIP net tests: need root, the ip tool and /dev/net/tun (root={root} ip={ip} tun={tun})");
    }
    root && ip && tun
}

/// The packet socket, driven through std's datagram socket calls (`recv`/`send` on a bound
/// AF_PACKET socket work like on any datagram socket).
fn wire(fd: OwnedFd) -> UnixDatagram {
    let s = UnixDatagram::from(fd);
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

fn raw_frame(ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = MAC.to_vec();
    f.extend_from_slice(&PEER);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

fn sum16(data: &[u8], mut acc: u32) -> u32 {
    for c in data.chunks(2) {
        acc += u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)]));
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// An IPv4/UDP frame (127.0.0.1 → 127.0.0.2) whose UDP checksum field holds only the
/// pseudo-header sum: what a sender with checksum offload hands over.
fn udp_partial(payload: &[u8]) -> Vec<u8> {
    let udp_len = 8 + payload.len() as u16;
    let mut ip = vec![0x45, 0, 0, 0, 0, 1, 0x40, 0, 64, 17, 0, 0, 127, 0, 0, 1, 127, 0, 0, 2];
    ip[2..4].copy_from_slice(&(20 + udp_len).to_be_bytes());
    let c = !fold(sum16(&ip, 0));
    ip[10..12].copy_from_slice(&c.to_be_bytes());
    let pseudo = sum16(&[127, 0, 0, 1, 127, 0, 0, 2, 0, 17], u32::from(udp_len));
    let mut udp = vec![0x30, 0x39, 0x30, 0x3a];
    udp.extend_from_slice(&udp_len.to_be_bytes());
    udp.extend_from_slice(&fold(pseudo).to_be_bytes());
    udp.extend_from_slice(payload);
    let mut body = ip;
    body.extend_from_slice(&udp);
    raw_frame(0x0800, &body)
}

/// Whether the UDP checksum of `frame` verifies.
fn udp_checksum_ok(frame: &[u8]) -> bool {
    let udp = &frame[34..];
    let pseudo = sum16(&[127, 0, 0, 1, 127, 0, 0, 2, 0, 17], udp.len() as u32);
    fold(sum16(udp, pseudo)) == 0xffff
}

fn vnet_hdr_partial() -> Vec<u8> {
    // flags NEEDS_CSUM, gso none, hdr_len 0, gso_size 0, csum_start 34, csum_offset 6
    let mut h = vec![1u8, 0, 0, 0, 0, 0];
    h.extend_from_slice(&34u16.to_le_bytes());
    h.extend_from_slice(&6u16.to_le_bytes());
    h
}

#[test]
fn frames_cross_the_tap_both_ways_with_honest_checksum_offload() {
    if !usable() {
        return;
    }
    let ns = NetNs::create(&format!("vdnet{}", std::process::id())).unwrap();
    let (tap, sock) = ns.tap_and_socket("vdtap0", true).unwrap();
    let wire = wire(sock);
    let mut r = rig(Box::new(Net::new(tap, MAC)));
    // First without GUEST_CSUM: the kernel must finish checksums before the guest sees frames.
    let acked = r.driver.init(VIRTIO_F_VERSION_1 | F_MAC, 64).unwrap();
    assert_eq!(acked & F_GUEST_CSUM, 0);
    assert_eq!(r.driver.read_config(0, 6), MAC);

    // Guest to wire: the exact bytes arrive.
    let frame = raw_frame(0x88b5, b"hello from the guest, through a real tap");
    r.driver.request(TX_QUEUE, &[&[0u8; HDR_LEN], &frame], &[]).unwrap();
    let mut buf = vec![0u8; 2048];
    let got = loop {
        let n = wire.recv(&mut buf).expect("frame on the wire");
        if buf[10 + 12..10 + 14] == [0x88, 0xb5] {
            break buf[10..n].to_vec();
        }
    };
    assert_eq!(got, frame);

    // Wire to guest, sent with checksum offload: the guest (no GUEST_CSUM) gets a finished,
    // valid UDP checksum, computed by the kernel because the tap was told not to pass it partial.
    let partial = udp_partial(b"checksum me");
    assert!(!udp_checksum_ok(&partial));
    let mut msg = vnet_hdr_partial();
    msg.extend_from_slice(&partial);
    let p = r.driver.post(RX_QUEUE, &[], &[HDR_LEN as u32 + 1514]).unwrap();
    r.driver.kick(RX_QUEUE).unwrap();
    wire.send(&msg).unwrap();
    let c = r.driver.wait(&p, Duration::from_secs(5)).unwrap();
    let rx = &c.data[0][..c.len as usize];
    assert_eq!(u16::from_le_bytes([rx[10], rx[11]]), 1, "num_buffers");
    let f = &rx[HDR_LEN..];
    assert_eq!(f.len(), partial.len());
    assert_eq!(f[..34], partial[..34]);
    assert!(udp_checksum_ok(f), "kernel finished the checksum");
    assert_eq!(rx[0] & 1, 0, "no NEEDS_CSUM handed to a guest that did not ask");

    // Now with GUEST_CSUM: the partial frame reaches the guest as is, flagged NEEDS_CSUM.
    r.driver.init(VIRTIO_F_VERSION_1 | F_MAC | F_GUEST_CSUM, 64).unwrap();
    r.driver.reset_buffers();
    let p = r.driver.post(RX_QUEUE, &[], &[HDR_LEN as u32 + 1514]).unwrap();
    r.driver.kick(RX_QUEUE).unwrap();
    wire.send(&msg).unwrap();
    let c = r.driver.wait(&p, Duration::from_secs(5)).unwrap();
    let rx = &c.data[0][..c.len as usize];
    assert_eq!(rx[0] & 1, 1, "NEEDS_CSUM passed to a guest that accepted it");
    assert_eq!(u16::from_le_bytes([rx[6], rx[7]]), 34, "csum_start");
    assert_eq!(u16::from_le_bytes([rx[8], rx[9]]), 6, "csum_offset");
    assert_eq!(&rx[HDR_LEN..], &partial[..]);

    // Many frames from the guest, all delivered in order.
    r.driver.reset_buffers();
    for i in 0..20u8 {
        let f = raw_frame(0x88b5, &[i; 60]);
        r.driver.request(TX_QUEUE, &[&[0u8; HDR_LEN], &f], &[]).unwrap();
    }
    let mut seen = 0u8;
    while seen < 20 {
        let n = wire.recv(&mut buf).expect("frame on the wire");
        if n == 10 + 74 && buf[22..24] == [0x88, 0xb5] {
            assert_eq!(buf[24], seen);
            seen += 1;
        }
    }

    // More frames than receive buffers: the device uses up the one buffer and keeps the rest in
    // the tap. Each refill must be heard through a kick that honours avail_event (as Linux's
    // virtio-net does), so every frame arrives, in order.
    let acked = r.driver.init(VIRTIO_F_VERSION_1 | F_MAC | VIRTIO_F_RING_EVENT_IDX, 64).unwrap();
    assert!(acked & VIRTIO_F_RING_EVENT_IDX != 0);
    r.driver.reset_buffers();
    for i in 0..5u8 {
        let mut msg = vec![0u8; 10]; // the wire side's own vnet header: nothing to offload
        msg.extend_from_slice(&raw_frame(0x88b5, &[i; 60]));
        wire.send(&msg).unwrap();
    }
    for i in 0..5u8 {
        let p = r.driver.post(RX_QUEUE, &[], &[HDR_LEN as u32 + 1514]).unwrap();
        r.driver.kick(RX_QUEUE).unwrap();
        let c = r.driver.wait(&p, Duration::from_secs(5)).unwrap();
        let rx = &c.data[0][HDR_LEN..c.len as usize];
        assert_eq!((rx.len(), rx[14]), (74, i), "frame {i}");
    }
    assert!(r.driver.transport().broken().is_none());
}

#[test]
fn mergeable_receive_buffers_hold_a_frame_across_several_buffers() {
    mergeable(false);
}

/// The same over packed rings: the device short of buffers puts chains back and asks to hear
/// of the next one (`PackedRing::notify_on_any`).
#[test]
fn mergeable_receive_buffers_on_packed_rings() {
    mergeable(true);
}

fn mergeable(packed: bool) {
    if !usable() {
        return;
    }
    let ns = NetNs::create(&format!("vdmrg{}{}", u8::from(packed), std::process::id())).unwrap();
    let (tap, sock) = ns.tap_and_socket("vdtap2", true).unwrap();
    let wire = wire(sock);
    let mut r = rig(Box::new(Net::new(tap, MAC)));
    r.driver.transport().offer_packed(packed);
    r.driver.set_packed(packed);
    let acked =
        r.driver.init(VIRTIO_F_VERSION_1 | F_MAC | F_MRG_RXBUF | VIRTIO_F_RING_EVENT_IDX, 64).unwrap();
    assert!(acked & F_MRG_RXBUF != 0, "offered");
    assert_eq!(r.driver.is_packed(), packed);

    // A 1,500-byte frame and its header need three 512-byte buffers; the guest posts two.
    let payload: Vec<u8> = (0..1486u32).map(|i| (i % 251) as u8).collect();
    let frame = raw_frame(0x88b5, &payload);
    assert_eq!(frame.len(), 1500);
    let first: Vec<_> = (0..2).map(|_| r.driver.post(RX_QUEUE, &[], &[512]).unwrap()).collect();
    r.driver.kick(RX_QUEUE).unwrap();
    let mut msg = vec![0u8; 10]; // the wire side's own vnet header: nothing to offload
    msg.extend_from_slice(&frame);
    wire.send(&msg).unwrap();
    // Too few buffers: the device puts them back and waits, using none.
    assert!(r.driver.wait(&first[0], Duration::from_millis(300)).is_err(), "no buffer used yet");
    assert!(!r.driver.has_used(RX_QUEUE).unwrap());
    // Another serve meanwhile (of the idle transmit queue) must not undo the device's request
    // to hear of the next receive buffer.
    let served = r.driver.transport().stats().notifications;
    r.driver.notify(TX_QUEUE);
    while r.driver.transport().stats().notifications == served {
        std::thread::sleep(Duration::from_millis(1));
    }

    // The third buffer: the frame fills all three, in order, and says so in num_buffers.
    let third = r.driver.post(RX_QUEUE, &[], &[512]).unwrap();
    r.driver.kick(RX_QUEUE).unwrap();
    let mut got = Vec::new();
    let mut lens = Vec::new();
    for p in first.iter().chain([&third]) {
        let c = r.driver.wait(p, Duration::from_secs(5)).unwrap();
        lens.push(c.len);
        got.extend_from_slice(&c.data[0][..c.len as usize]);
    }
    assert_eq!(lens, [512, 512, (HDR_LEN + 1500 - 1024) as u32]);
    assert_eq!(u16::from_le_bytes([got[10], got[11]]), 3, "num_buffers");
    assert_eq!(&got[HDR_LEN..], &frame[..], "the frame, split across the buffers");

    // A frame that fits one buffer still takes one.
    let small = raw_frame(0x88b5, &[7; 60]);
    let p = r.driver.post(RX_QUEUE, &[], &[2048]).unwrap();
    r.driver.kick(RX_QUEUE).unwrap();
    let mut msg = vec![0u8; 10];
    msg.extend_from_slice(&small);
    wire.send(&msg).unwrap();
    let c = r.driver.wait(&p, Duration::from_secs(5)).unwrap();
    let rx = &c.data[0][..c.len as usize];
    assert_eq!(u16::from_le_bytes([rx[10], rx[11]]), 1, "num_buffers");
    assert_eq!(&rx[HDR_LEN..], &small[..]);
    assert!(r.driver.transport().broken().is_none());

    // A bad guest: a receive "buffer" the device may only read. The device breaks, with the
    // reason, and writes nothing.
    r.driver.post(RX_QUEUE, &[&[0u8; 64]], &[]).unwrap();
    r.driver.kick(RX_QUEUE).unwrap();
    wire.send(&msg).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.driver.transport().broken().is_none() {
        assert!(std::time::Instant::now() < deadline, "the device never noticed");
        std::thread::sleep(Duration::from_millis(5));
    }
    let why = r.driver.transport().broken().unwrap();
    assert!(why.contains("no writable bytes"), "{why}");
}

#[test]
fn pending_frames_survive_save_and_restore() {
    use vcore::Snapshot;
    use vdevices::testing::{Driver, copy_memory, guest_memory};
    use vdevices::virtio::mmio::TransportArgs;
    use vdevices::{DeviceState, EventLoop, MmioTransport};

    if !usable() {
        return;
    }
    let ns = NetNs::create(&format!("vdst{}", std::process::id())).unwrap();
    let (tap, sock) = ns.tap_and_socket("vdtap1", false).unwrap();
    let tap_again = tap.try_clone().unwrap();
    let wire = wire(sock);
    let mem = guest_memory(16);
    let t = MmioTransport::new(mem.clone(), Box::new(Net::new(tap, MAC))).unwrap();
    let events = EventLoop::start().unwrap();
    let id = events.add(std::sync::Arc::new(t.clone())).unwrap();
    let mut d = Driver::new(mem.clone(), t.clone()).unwrap();
    d.init(VIRTIO_F_VERSION_1 | F_MAC, 64).unwrap();

    // A frame arrives while the guest has no receive buffer: the device holds it.
    let inbound = raw_frame(0x88b5, b"arrived before the save");
    wire.send(&inbound).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while !matches!(&t.save().device, DeviceState::Net(n) if n.rx_pending.is_some()) {
        assert!(std::time::Instant::now() < deadline, "frame never read from the tap");
        std::thread::sleep(Duration::from_millis(5));
    }
    // The VM pauses; a transmit is posted and notified but not served yet.
    events.remove(id).unwrap();
    drop(events);
    let outbound = raw_frame(0x88b5, b"sent across the save");
    let tx = d.post(TX_QUEUE, &[&[0u8; HDR_LEN], &outbound], &[]).unwrap();
    d.kick(TX_QUEUE).unwrap();
    let state = t.save();
    drop(t);

    let mem2 = guest_memory(16);
    copy_memory(&mem, &mem2).unwrap();
    let DeviceState::Net(ns_state) = &state.device else { panic!("not net") };
    let dev = Net::restore(tap_again, ns_state).unwrap();
    let t2 =
        MmioTransport::restore(TransportArgs { mem: mem2.clone(), device: Box::new(dev) }, &state).unwrap();
    let mut d = d.reattach(mem2, t2.clone()).unwrap();
    let events = EventLoop::start().unwrap();
    events.add(std::sync::Arc::new(t2.clone())).unwrap();

    d.wait(&tx, Duration::from_secs(5)).unwrap();
    let mut buf = vec![0u8; 2048];
    let got = loop {
        let n = wire.recv(&mut buf).expect("the in-flight frame reaches the wire");
        if buf[12..14] == [0x88, 0xb5] {
            break buf[..n].to_vec();
        }
    };
    assert_eq!(got, outbound);
    let c = d.request(RX_QUEUE, &[], &[HDR_LEN as u32 + 1514]).unwrap();
    assert_eq!(&c.data[0][HDR_LEN..c.len as usize], &inbound[..], "the held frame is delivered");
    let DeviceState::Net(n) = t2.save().device else { panic!("not net") };
    assert_eq!((n.stats.tx_frames, n.stats.rx_frames), (1, 1), "each frame moved exactly once");
}
