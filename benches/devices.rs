//! Device benchmarks through the virtio driver harness (real transport, real queues in guest
//! memory, the event-loop thread, irqfd waits) against the same backends used directly, and
//! through the built-in CPL-3 guest on KVM.
//!
//! `cargo bench --bench devices`. virtio-net needs root, `ip` and /dev/net/tun (skipped
//! otherwise); the guest bench needs /dev/kvm.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use vinfra::vcore::guest::{EXIT_PORT, ExitPort};
use vinfra::vcore::vm_memory::{Bytes, GuestAddress};
use vinfra::vcore::{VmBuilder, VmConfig};
use vinfra::vdevices::guest::VirtioRng;
use vinfra::vdevices::testing::{DESC_F_WRITE, Driver, guest_memory};
use vinfra::vdevices::virtio::block::{Block, BlockConfig, req};
use vinfra::vdevices::virtio::net::{HDR_LEN, Net, RX_QUEUE, TX_QUEUE};
use vinfra::vdevices::virtio::rng::Rng;
use vinfra::vdevices::{EventLoop, MmioTransport, VirtioDevice};

const IMAGE: u64 = 64 << 20;
const T: Duration = Duration::from_secs(10);

fn rig(device: Box<dyn VirtioDevice>, queue: u16) -> (EventLoop, Driver) {
    let mem = guest_memory(64);
    let t = MmioTransport::new(mem.clone(), device).unwrap();
    let events = EventLoop::start().unwrap();
    events.add(Arc::new(t.clone())).unwrap();
    let mut d = Driver::new(mem, t).unwrap();
    d.init(u64::MAX, queue).unwrap();
    (events, d)
}

/// [`rig`] with packed rings offered and negotiated.
fn packed_rig(device: Box<dyn VirtioDevice>, queue: u16) -> (EventLoop, Driver) {
    let mem = guest_memory(64);
    let t = MmioTransport::new(mem.clone(), device).unwrap();
    t.offer_packed(true);
    let events = EventLoop::start().unwrap();
    events.add(Arc::new(t.clone())).unwrap();
    let mut d = Driver::new(mem, t).unwrap();
    d.set_packed(true);
    d.init(u64::MAX, queue).unwrap();
    (events, d)
}

fn image() -> PathBuf {
    let p = std::env::temp_dir().join(format!("vinfra-bench-{}.img", std::process::id()));
    let mut f = File::create(&p).unwrap();
    let chunk: Vec<u8> = (0..1 << 20).map(|i| (i * 7) as u8).collect();
    for _ in 0..IMAGE >> 20 {
        f.write_all(&chunk).unwrap();
    }
    p
}

/// A virtio-blk request header (no allocation: the bench writes one per request).
fn hdr(kind: u32, sector: u64) -> [u8; 16] {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&kind.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    h
}

/// Buffers of `qd` block requests, allocated once in guest memory and reused (a guest driver
/// does not re-allocate or clear its buffers per request). Laid out as Linux's virtio-blk
/// does: data on pages of their own, each request's header and status byte together in a
/// cache line of its own (its per-request struct), so that no two requests share a line.
struct BlkSlots {
    slots: Vec<(u64, u64, u64)>, // header, data, status
}

impl BlkSlots {
    fn new(d: &mut Driver, qd: usize, len: u32) -> Self {
        d.reset_buffers();
        let slots = (0..qd)
            .map(|_| {
                let hdr = d.alloc_aligned(64, 64).unwrap();
                (hdr, d.alloc_aligned(u64::from(len), 4096).unwrap(), hdr + 16)
            })
            .collect();
        BlkSlots { slots }
    }
}

/// `qd` requests of `len` bytes each, posted at once, one notify, all completions awaited.
fn blk_batch(d: &mut Driver, s: &BlkSlots, pos: &mut u64, kind: u32, len: u32) {
    let mut heads = Vec::with_capacity(s.slots.len());
    for &(h, data, st) in &s.slots {
        d.guest().write_slice(&hdr(kind, *pos / 512), GuestAddress(h)).unwrap();
        let data_flags = if kind == req::OUT { 0 } else { DESC_F_WRITE };
        heads.push(d.post_raw(0, &[(h, 16, 0), (data, len, data_flags), (st, 1, DESC_F_WRITE)]).unwrap());
        *pos = (*pos + u64::from(len)) % IMAGE;
    }
    d.notify(0);
    for (&head, &(_, _, st)) in heads.iter().zip(&s.slots) {
        d.wait_head(0, head, T).unwrap();
        assert_eq!(d.guest().read_obj::<u8>(GuestAddress(st)).unwrap(), 0, "status OK");
    }
}

/// `qd` block requests kept in flight, as a guest running fio with `iodepth=qd` does: each
/// completion is reposted at the next position at once, and the device is kicked only when it
/// asked (EVENT_IDX), so the device thread works on new requests while the driver reaps.
struct BlkStream {
    slots: BlkSlots,
    by_head: Vec<usize>,
    reaped: Vec<(u16, u32)>,
    pos: u64,
    kind: u32,
    len: u32,
}

impl BlkStream {
    fn start(d: &mut Driver, qd: usize, kind: u32, len: u32) -> Self {
        let slots = BlkSlots::new(d, qd, len);
        let mut s = BlkStream { slots, by_head: vec![0; 256], reaped: Vec::new(), pos: 0, kind, len };
        for i in 0..qd {
            s.post(d, i);
        }
        d.kick(0).unwrap();
        s
    }

    fn post(&mut self, d: &mut Driver, i: usize) {
        let (h, data, st) = self.slots.slots[i];
        d.guest().write_slice(&hdr(self.kind, self.pos / 512), GuestAddress(h)).unwrap();
        let data_flags = if self.kind == req::OUT { 0 } else { DESC_F_WRITE };
        let head = d.post_raw(0, &[(h, 16, 0), (data, self.len, data_flags), (st, 1, DESC_F_WRITE)]).unwrap();
        self.by_head[usize::from(head)] = i;
        self.pos = (self.pos + u64::from(self.len)) % IMAGE;
    }

    /// Completes `n` requests (reposting each), waiting as the driver is set to.
    fn complete(&mut self, d: &mut Driver, n: usize) {
        let mut done = 0;
        while done < n {
            self.reaped.clear();
            if d.reap(0, &mut self.reaped).unwrap() == 0 {
                d.wait_used(0, T).unwrap();
                continue;
            }
            for k in 0..self.reaped.len() {
                let i = self.by_head[usize::from(self.reaped[k].0)];
                let st = self.slots.slots[i].2;
                assert_eq!(d.guest().read_obj::<u8>(GuestAddress(st)).unwrap(), 0, "status OK");
                self.post(d, i);
            }
            done += self.reaped.len();
            d.kick(0).unwrap();
        }
    }

    /// Waits for what is still in flight (nothing is reposted).
    fn drain(mut self, d: &mut Driver) {
        let mut left = self.slots.slots.len();
        while left > 0 {
            self.reaped.clear();
            left -= d.reap(0, &mut self.reaped).unwrap();
            if left > 0 && self.reaped.is_empty() {
                d.wait_used(0, T).unwrap();
            }
        }
    }
}

fn virtio_blk(c: &mut Criterion) {
    let path = image();
    let (_events, mut d) = rig(
        Box::new(
            Block::new(BlockConfig { path: path.clone(), read_only: false, id: String::new() }).unwrap(),
        ),
        256,
    );
    let mut direct = File::options().read(true).write(true).open(&path).unwrap();
    let data = vec![0x5au8; 64 << 10];
    let mut buf = vec![0u8; 64 << 10];
    let mut g = c.benchmark_group("virtio_blk");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    for (name, kind, len, qd) in [
        ("seq_read_64k_qd1", req::IN, 64 << 10, 1),
        ("seq_read_64k_qd32", req::IN, 64 << 10, 32),
        ("seq_write_64k_qd1", req::OUT, 64 << 10, 1),
        ("seq_write_64k_qd32", req::OUT, 64 << 10, 32),
        ("read_4k_qd1", req::IN, 4096, 1),
        ("read_4k_qd32", req::IN, 4096, 32),
    ] {
        g.throughput(Throughput::Bytes(u64::from(len) * qd as u64));
        let slots = BlkSlots::new(&mut d, qd, len);
        let mut pos = 0u64;
        g.bench_function(name, |b| b.iter(|| blk_batch(&mut d, &slots, &mut pos, kind, len)));
    }
    // Streaming: 32 requests always in flight (see `BlkStream`). First a driver thread that
    // sleeps on the interrupt; then one that polls its used ring for up to 200 µs before it
    // sleeps, as a halted vCPU under KVM's default halt polling (`halt_poll_ns`) does. The
    // second is what a guest under hardware KVM sees; the first adds this host's cost of
    // waking a sleeping thread, paid by the device thread for every interrupt.
    for (poll, suffix) in [(Duration::ZERO, ""), (Duration::from_micros(200), "_driver_polls")] {
        d.set_wait_poll(poll);
        for (name, kind, len) in [
            ("stream_read_64k_qd32", req::IN, 64u32 << 10),
            ("stream_write_64k_qd32", req::OUT, 64 << 10),
            ("stream_read_4k_qd32", req::IN, 4096),
        ] {
            g.throughput(Throughput::Bytes(u64::from(len) * 32));
            let mut s = BlkStream::start(&mut d, 32, kind, len);
            g.bench_function(format!("{name}{suffix}"), |b| b.iter(|| s.complete(&mut d, 32)));
            s.drain(&mut d);
        }
    }
    d.set_wait_poll(Duration::ZERO);
    // The same streams over packed rings (virtio 1.1; offered by `MmioTransport::offer_packed`).
    {
        let (_events, mut p) = packed_rig(
            Box::new(
                Block::new(BlockConfig { path: path.clone(), read_only: false, id: String::new() }).unwrap(),
            ),
            256,
        );
        p.set_wait_poll(Duration::from_micros(200));
        for (name, kind, len) in [
            ("stream_read_64k_qd32_driver_polls_packed", req::IN, 64u32 << 10),
            ("stream_read_4k_qd32_driver_polls_packed", req::IN, 4096),
        ] {
            g.throughput(Throughput::Bytes(u64::from(len) * 32));
            let mut s = BlkStream::start(&mut p, 32, kind, len);
            g.bench_function(name, |b| b.iter(|| s.complete(&mut p, 32)));
            s.drain(&mut p);
        }
    }
    // The device path alone: requests served on the bench thread (no event-loop hand-off, no
    // interrupt wait), to separate the device's cost from the thread round trip.
    {
        let t = d.transport().clone();
        for (name, len) in [("seq_read_64k_qd32_inline", 64u32 << 10), ("read_4k_qd32_inline", 4096)] {
            let slots = BlkSlots::new(&mut d, 32, len);
            let mut pos = 0u64;
            g.throughput(Throughput::Bytes(32 * u64::from(len)));
            g.bench_function(name, |b| {
                b.iter(|| {
                    let mut heads = Vec::with_capacity(32);
                    for &(h, data, st) in &slots.slots {
                        d.guest().write_slice(&hdr(req::IN, pos / 512), GuestAddress(h)).unwrap();
                        heads.push(
                            d.post_raw(0, &[(h, 16, 0), (data, len, DESC_F_WRITE), (st, 1, DESC_F_WRITE)])
                                .unwrap(),
                        );
                        pos = (pos + u64::from(len)) % IMAGE;
                    }
                    t.process_queue(0);
                    for h in heads {
                        d.wait_head(0, h, T).unwrap();
                    }
                })
            });
        }
    }
    // The same file, read and written directly (pread/pwrite into a user buffer).
    for (name, len, write) in [
        ("direct_seq_read_64k", 64usize << 10, false),
        ("direct_seq_write_64k", 64 << 10, true),
        ("direct_read_4k", 4096, false),
    ] {
        g.throughput(Throughput::Bytes(len as u64));
        let mut pos = 0u64;
        g.bench_function(name, |b| {
            b.iter(|| {
                if write {
                    direct.write_all_at(&data[..len], pos).unwrap();
                } else {
                    direct.read_exact_at(&mut buf[..len], pos).unwrap();
                }
                pos = (pos + len as u64) % IMAGE;
            })
        });
    }
    // Direct reads into 32 rotating 64 KiB buffers: the same 2 MiB destination working set as
    // the QD32 virtio runs (a single hot buffer stays in cache and flatters the direct path).
    // The same for writes (from 32 source buffers) and for 4 KiB reads (into 32 buffers), so each
    // QD32 virtio row has a like-for-like direct row.
    for (name, len, write) in [
        ("direct_seq_read_64k_x32_buffers", 64usize << 10, false),
        ("direct_seq_write_64k_x32_buffers", 64 << 10, true),
        ("direct_read_4k_x32_buffers", 4096, false),
    ] {
        let mut bufs = vec![vec![0x5au8; len]; 32];
        let mut pos = 0u64;
        g.throughput(Throughput::Bytes(32 * len as u64));
        g.bench_function(name, |b| {
            b.iter(|| {
                for buf in bufs.iter_mut() {
                    if write {
                        direct.write_all_at(buf, pos).unwrap();
                    } else {
                        direct.read_exact_at(buf, pos).unwrap();
                    }
                    pos = (pos + len as u64) % IMAGE;
                }
            })
        });
    }
    g.finish();
    let _ = direct.seek(SeekFrom::Start(0)).and_then(|_| direct.read(&mut buf[..1]));
    let _ = std::fs::remove_file(path);
}

fn virtio_rng(c: &mut Criterion) {
    let (_events, mut d) = rig(Box::new(Rng::new()), 16);
    let mut g = c.benchmark_group("virtio_rng");
    g.sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    // Notify → backend on the event-loop thread → used ring → irqfd → the waiting driver.
    g.bench_function("notify_to_interrupt_64b", |b| {
        let buf = d.alloc(64).unwrap();
        b.iter(|| {
            let head = d.post_raw(0, &[(buf, 64, DESC_F_WRITE)]).unwrap();
            d.notify(0);
            d.wait_head(0, head, T).unwrap();
        })
    });
    g.finish();
}

fn virtio_net(c: &mut Criterion) {
    let root =
        std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    if !root || !std::path::Path::new("/dev/net/tun").exists() {
        eprintln!("SKIP virtio_net bench: needs root and /dev/net/tun");
        return;
    }
    let ns =
        vinfra::vdevices::testing::netns::NetNs::create(&format!("vdbench{}", std::process::id())).unwrap();
    let (tap, sock) = ns.tap_and_socket("vdbench0", false).unwrap();
    // The other end of the tap, as a remote host would send from it.
    let wire = std::os::unix::net::UnixDatagram::from(sock);
    let (_events, mut d) = rig(Box::new(Net::new(tap, [0x52, 0x54, 0, 0x12, 0x34, 0x56])), 256);
    let mut frame = vec![0u8; HDR_LEN];
    frame.extend_from_slice(&[0xff; 6]);
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1, 0x88, 0xb5]);
    frame.resize(HDR_LEN + 1514, 0x42);
    let buf = d.alloc(frame.len() as u64).unwrap();
    d.guest().write_slice(&frame, GuestAddress(buf)).unwrap();
    let mut g = c.benchmark_group("virtio_net");
    g.sample_size(10).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    // Each direction is reported twice: in bytes and in frames.
    let per_round = |suffix: &str| {
        [
            (suffix.to_string(), Throughput::Bytes(64 * 1514)),
            (format!("{suffix}_frames"), Throughput::Elements(64)),
        ]
    };
    for (name, throughput) in per_round("tx_1514b_x64") {
        g.throughput(throughput);
        g.bench_function(name, |b| {
            b.iter(|| {
                let heads: Vec<_> =
                    (0..64).map(|_| d.post_raw(TX_QUEUE, &[(buf, frame.len() as u32, 0)]).unwrap()).collect();
                d.kick(TX_QUEUE).unwrap();
                for h in heads {
                    d.wait_head(TX_QUEUE, h, T).unwrap();
                }
            })
        });
    }
    // Receive: 64 buffers posted, 64 frames sent into the tap from its other end, all awaited.
    let mut wire_frame = vec![0x52, 0x54, 0, 0x12, 0x34, 0x56, 0x02, 0, 0, 0, 0, 1, 0x88, 0xb5];
    wire_frame.resize(1514, 0x24);
    let rx_len = (HDR_LEN + 1514) as u32;
    let rx_bufs: Vec<u64> = (0..64).map(|_| d.alloc(u64::from(rx_len)).unwrap()).collect();
    for (name, throughput) in per_round("rx_1514b_x64") {
        g.throughput(throughput);
        g.bench_function(name, |b| {
            b.iter(|| {
                let heads: Vec<_> = rx_bufs
                    .iter()
                    .map(|&a| d.post_raw(RX_QUEUE, &[(a, rx_len, DESC_F_WRITE)]).unwrap())
                    .collect();
                d.kick(RX_QUEUE).unwrap();
                for _ in 0..64 {
                    wire.send(&wire_frame).unwrap();
                }
                for h in heads {
                    d.wait_head(RX_QUEUE, h, T).unwrap();
                }
            })
        });
    }
    g.finish();
}

fn guest_exit_to_completion(c: &mut Criterion) {
    if !vinfra::vcore::testing::kvm_available("benches/devices.rs guest") {
        return;
    }
    let mut g = c.benchmark_group("guest");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_millis(200));
    // Per request, measured by the guest's TSC: QueueNotify (ioeventfd) → backend → used ring
    // seen by the polling vCPU.
    g.bench_function("virtio_rng_notify_to_used", |b| {
        b.iter_custom(|iters| {
            let cfg = VirtioRng { iterations: iters.max(1), ..Default::default() };
            let vm = VmBuilder::new(VmConfig { mem_mib: 32, vcpus: 1, ..Default::default() })
                .payload(cfg)
                .build()
                .unwrap();
            let exit = Arc::new(ExitPort::new());
            vm.pio_bus().insert(EXIT_PORT.into(), 4, exit.clone()).unwrap();
            let rng = MmioTransport::new(vm.memory().clone(), Box::new(Rng::new())).unwrap();
            rng.attach(&vm, cfg.mmio_base, 5).unwrap();
            let events = EventLoop::start().unwrap();
            events.add(Arc::new(rng)).unwrap();
            vm.start().unwrap();
            exit.wait(Duration::from_secs(600)).expect("guest finished");
            vm.pause().unwrap();
            let r = VirtioRng::read_result(vm.memory()).unwrap();
            let khz = u64::from(vm.tsc_khz().max(1));
            Duration::from_nanos(r.total_cycles.saturating_mul(1_000_000) / khz)
        })
    });
    g.finish();
}

criterion_group!(benches, virtio_blk, virtio_rng, virtio_net, guest_exit_to_completion);
criterion_main!(benches);
