//! Dirty-page migration benchmarks: bitmap work, page encode/decode against memcpy, and
//! end-to-end migration of a 256 MiB guest (idle and dirtying) in-process and over loopback TCP,
//! next to raw TCP throughput of a socket pair. KVM parts print one SKIP line without /dev/kvm.
#![allow(missing_docs)] // criterion_group! generates undocumented items

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use vinfra::vcore::config::RamRange;
use vinfra::vcore::guest::{Dirtier, DirtierConfig, MIN_WS_START, Pattern, read_progress};
use vinfra::vcore::memory::create_guest_memory;
use vinfra::vcore::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vinfra::vcore::{DirtyTracking, Vm, VmBuilder, VmConfig};
use vinfra::vmigrate::dirty::{DirtyBitmap, DirtyTracker, KvmDirtyLog, VmmBitmap, empty_maps};
use vinfra::vmigrate::receive::apply_memory;
use vinfra::vmigrate::stream::{Crc32c, FrameReader, FrameWriter, Layout, SEND_BUFFER, is_zero};
use vinfra::vmigrate::transport::{
    DEFAULT_PEER_TIMEOUT, channel_pair, tcp_accept, tcp_accept_streams, tcp_connect, tcp_connect_streams,
};
use vinfra::vmigrate::{ConvergencePolicy, Destination, Source};

const MIB: usize = 1 << 20;

fn bitmaps(c: &mut Criterion) {
    let mut g = c.benchmark_group("bitmap");
    for gib in [1u64, 16] {
        let pages = (gib << 30) / 4096;
        let mut a = DirtyBitmap::new(pages);
        let mut b = DirtyBitmap::new(pages);
        for p in (0..pages).step_by(97) {
            b.set(p);
        }
        g.bench_function(BenchmarkId::new("merge_count_runs", format!("{gib}GiB")), |bench| {
            bench.iter(|| {
                a.clear();
                a.merge(&b);
                let runs = a.runs().count();
                (a.count(), runs)
            })
        });
        if vinfra::vcore::testing::kvm_available("benches/dirty_page_migration bitmap") {
            let vm = VmBuilder::new(VmConfig { mem_mib: gib << 10, ..Default::default() }).build().unwrap();
            let mut log = KvmDirtyLog::default();
            log.start(&vm).unwrap();
            let mut vmm = VmmBitmap;
            let mut maps = empty_maps(&vm);
            g.bench_function(BenchmarkId::new("kvm_log_and_vmm_fetch", format!("{gib}GiB")), |bench| {
                bench.iter(|| {
                    for m in maps.iter_mut() {
                        m.clear();
                    }
                    log.fetch(&vm, &mut maps).unwrap();
                    vmm.fetch(&vm, &mut maps).unwrap();
                    maps.iter().map(DirtyBitmap::count).sum::<u64>()
                })
            });
            log.stop(&vm).unwrap();
        }
    }
    g.finish();
}

fn encode_decode(c: &mut Criterion) {
    let size = 64 * MIB;
    let mut data = vec![0u8; size];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for w in data.chunks_exact_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        w.copy_from_slice(&x.to_le_bytes());
    }
    let zeros = vec![0u8; size];
    let mut g = c.benchmark_group("pages_64MiB");
    g.throughput(Throughput::Bytes(size as u64));
    let mut dst = vec![0u8; size];
    g.bench_function("memcpy", |b| b.iter(|| dst.copy_from_slice(&data)));
    g.bench_function("zero_scan", |b| b.iter(|| zeros.chunks_exact(4096).all(is_zero)));
    g.bench_function("crc32c", |b| {
        b.iter(|| {
            let mut c = Crc32c::new();
            c.update(&data);
            c.finish()
        })
    });
    // Encoding proper, as the pre-copy engine does it: each page of guest memory checked for
    // zeros where it lies, data pages copied out of it into frames, frames checksummed. The
    // transport's own copy is measured by the TCP group.
    let src = create_guest_memory(&[RamRange { guest_addr: 0, size: size as u64 }]).unwrap();
    src.write_slice(&data, GuestAddress(0)).unwrap();
    let run = src.get_slice(GuestAddress(0), size).unwrap();
    let encode = |out: &mut dyn Write| {
        let mut w = FrameWriter::new(out, SEND_BUFFER);
        w.guest_pages(0, &run).unwrap();
        w.flush().unwrap();
    };
    g.bench_function("encode", |b| b.iter(|| encode(&mut std::io::sink())));
    let mut sink = Vec::with_capacity(size + MIB);
    g.bench_function("encode_into_vec", |b| {
        b.iter(|| {
            sink.clear();
            encode(&mut sink)
        })
    });
    let mem = create_guest_memory(&[RamRange { guest_addr: 0, size: size as u64 }]).unwrap();
    let layout = Layout { regions: vec![(0, size as u64)] };
    g.bench_function("decode_apply", |b| {
        b.iter(|| {
            let mut r = FrameReader::new(sink.as_slice());
            while let Ok(m) = r.read_frame() {
                apply_memory(&mem, &layout, &m, None).unwrap();
            }
        })
    });
    g.finish();
}

/// Raw TCP over a fresh loopback pair, the receiver acknowledging each `size` bytes (as the
/// page rows do). A hot sender repeats one 1 MiB chunk, which stays in cache; otherwise it sends
/// `size` bytes from a `size`-byte source, reading memory as a migration source must. A hot
/// receiver reads into one 4 MiB buffer; otherwise into a `size`-byte destination.
fn raw_tcp_row(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    name: &str,
    size: usize,
    (hot_src, hot_dst): (bool, bool),
) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = tcp_accept(&listener, DEFAULT_PEER_TIMEOUT).unwrap();
        let mut ack = s.try_clone().unwrap();
        let mut buf = vec![0u8; if hot_dst { 4 * MIB } else { size }];
        let mut got = 0usize;
        loop {
            let at = if hot_dst { 0 } else { got };
            let end = (at + 4 * MIB).min(buf.len());
            match s.read(&mut buf[at..end]) {
                Ok(n) if n > 0 => got += n,
                _ => break,
            }
            if got == size {
                got = 0;
                ack.write_all(&[1]).unwrap();
            }
        }
    });
    // The sockets vmigrate's transport makes (same buffer sizes, no delay).
    let mut s = tcp_connect(addr, DEFAULT_PEER_TIMEOUT).unwrap();
    let mut back = s.try_clone().unwrap();
    let src: Vec<u8> = (0..if hot_src { SEND_BUFFER } else { size }).map(|i| (i % 251) as u8 | 1).collect();
    g.bench_function(name, |b| {
        b.iter(|| {
            for i in 0..size / SEND_BUFFER {
                let at = if hot_src { 0 } else { i * SEND_BUFFER };
                s.write_all(&src[at..at + SEND_BUFFER]).unwrap();
            }
            let mut one = [0u8];
            back.read_exact(&mut one).unwrap();
        })
    });
    drop(s);
    drop(back);
    reader.join().unwrap();
}

fn raw_tcp(c: &mut Criterion) {
    let size = 64 * MIB;
    let mut g = c.benchmark_group("tcp_loopback");
    g.throughput(Throughput::Bytes(size as u64));
    raw_tcp_row(&mut g, "raw_64MiB_hot_buffers", size, (true, true));
    raw_tcp_row(&mut g, "raw_64MiB_memory_to_memory", size, (false, false));
    // What reading the source's memory alone costs raw TCP: the hot row, but the sender sends
    // the 64 MiB from memory, as any migration source must.
    raw_tcp_row(&mut g, "raw_64MiB_memory_to_hot_buffer", size, (false, true));

    // The same 64 MiB as migration pages: encoded, sent, decoded and written into guest memory
    // by a receiver thread, over a fresh loopback socket pair. Live (the engine's default: the
    // socket reads the pages where they lie) and copied into the send buffer first; and live
    // between two guest memories on transparent huge pages (`VmConfig::huge_pages`), where
    // reading and writing guest memory takes a TLB miss per 2 MiB instead of per 4 KiB.
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8 | 1).collect();
    let guest = |huge: bool| {
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size: size as u64 }]).unwrap();
        if huge && let Err(e) = vinfra::vcore::memory::advise_huge_pages(&mem) {
            eprintln!("no transparent huge pages ({e}): the huge-page row uses small pages");
        }
        mem.write_slice(&data, GuestAddress(0)).unwrap();
        mem
    };
    let src = guest(false);
    for (name, live, huge) in [
        ("pages_64MiB_encode_send_decode_apply", true, false),
        ("pages_64MiB_copied_encode_send_decode_apply", false, false),
        ("pages_64MiB_huge_pages_encode_send_decode_apply", true, true),
    ] {
        // Allocated for its row only, so that it does not change what the other rows find in cache.
        let huge_src = huge.then(|| guest(true));
        let run = huge_src.as_ref().unwrap_or(&src).get_slice(GuestAddress(0), size).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let mut s = tcp_connect(addr, DEFAULT_PEER_TIMEOUT).unwrap();
        let conn = tcp_accept(&listener, DEFAULT_PEER_TIMEOUT).unwrap();
        let receiver = page_receiver(conn, size as u64, huge);
        let mut back = s.try_clone().unwrap();
        g.bench_function(name, |b| {
            b.iter(|| {
                let mut w = FrameWriter::new(&mut s, SEND_BUFFER);
                w.set_live(live);
                w.guest_pages(0, &run).unwrap();
                w.message(&vinfra::vmigrate::stream::Message::Complete).unwrap();
                w.flush().unwrap();
                let mut one = [0u8];
                back.read_exact(&mut one).unwrap();
            })
        });
        drop(s);
        drop(back);
        receiver.join().unwrap();
    }
    pages_over_streams(&mut g, 2, &src, size as u64);
    g.finish();
}

/// A thread that decodes the pages arriving on `conn` into a `size`-byte guest memory of its own
/// (on transparent huge pages if `huge`) and answers each `Complete` with one byte; it ends when
/// the connection closes.
fn page_receiver(conn: std::net::TcpStream, size: u64, huge: bool) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size }]).unwrap();
        if huge {
            let _ = vinfra::vcore::memory::advise_huge_pages(&mem); // the sender reports a failure
        }
        let layout = Layout { regions: vec![(0, size)] };
        let mut ack = conn.try_clone().unwrap();
        let mut r = FrameReader::new(conn);
        loop {
            match r.read_frame_into(&mem, &layout) {
                Ok(vinfra::vmigrate::stream::Message::Complete) => ack.write_all(&[1]).unwrap(),
                Ok(m) => {
                    apply_memory(&mem, &layout, &m, None).unwrap();
                }
                Err(_) => break,
            }
        }
    })
}

/// The 64 MiB of `src` as pages over `n` loopback connections at once, as the engine's data
/// streams carry them: 1 MiB partitions, partition `i` on connection `i % n`, a sending and a
/// receiving thread per connection, each receiver writing into its own copy of guest memory.
fn pages_over_streams(
    g: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    n: usize,
    src: &vinfra::vcore::GuestMemory,
    size: u64,
) {
    use vinfra::vmigrate::stream::Message;
    use vinfra::vmigrate::streams::split;
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let receivers: Vec<_> = (0..n)
        .map(|_| {
            let s = tcp_connect(addr, DEFAULT_PEER_TIMEOUT).unwrap();
            let thread = page_receiver(tcp_accept(&listener, DEFAULT_PEER_TIMEOUT).unwrap(), size, false);
            let back = s.try_clone().unwrap();
            (s, back, thread)
        })
        .collect();
    let (mut conns, rest): (Vec<_>, Vec<_>) = receivers.into_iter().map(|(s, b, t)| (s, (b, t))).unzip();
    let pieces: Vec<Vec<(u64, u64)>> =
        (0..n).map(|k| split(0, size / 4096, n).filter(|p| p.0 == k).map(|p| (p.1, p.2)).collect()).collect();
    g.bench_function(format!("pages_64MiB_{n}_streams_encode_send_decode_apply"), |b| {
        b.iter(|| {
            std::thread::scope(|sc| {
                for (conn, mine) in conns.iter_mut().zip(&pieces) {
                    sc.spawn(move || {
                        let mut w = FrameWriter::new(conn, SEND_BUFFER);
                        w.set_live(true);
                        for &(gpa, pages) in mine {
                            w.guest_range(src, gpa, pages as usize * 4096).unwrap();
                        }
                        w.message(&Message::Complete).unwrap();
                        w.flush().unwrap();
                    });
                }
            });
            for (back, _) in &rest {
                let mut one = [0u8];
                (&*back).read_exact(&mut one).unwrap();
            }
        })
    });
    drop(conns);
    for (back, t) in rest {
        drop(back);
        t.join().unwrap();
    }
}

/// A running dirtier; with `fill`, guest memory past the guest's own pages holds data (no zero
/// page) before it starts.
fn source(d: DirtierConfig, cfg: VmConfig, fill: bool) -> Vm {
    let vm = VmBuilder::new(cfg).payload(Dirtier(d)).build().unwrap();
    if fill {
        let chunk: Vec<u8> = (0..MIB).map(|i| (i % 251) as u8 | 1).collect();
        for s in vm.slots() {
            let mut at = s.guest_addr.max(MIN_WS_START);
            while at < s.guest_addr + s.size {
                let n = (s.guest_addr + s.size - at).min(MIB as u64) as usize;
                vm.memory().write_slice(&chunk[..n], GuestAddress(at)).unwrap();
                at += n as u64;
            }
        }
    }
    vm.start().unwrap();
    // Running, and (unless idle) through its working set once.
    let want = if d.pages_per_sec < 100 { 1 } else { d.ws_pages };
    while read_progress(vm.memory()).pages_written < want {
        std::thread::sleep(Duration::from_millis(1));
    }
    vm
}

/// One migration of a source VM made with `cfg` (see [`source`] for `fill`), over TCP with
/// `streams` data streams or in-process; returns (total, downtime).
fn migrate_once(d: DirtierConfig, r: &Row) -> (Duration, Duration) {
    let dst_cfg = VmConfig { dirty_tracking: DirtyTracking::None, ..r.cfg.clone() };
    let src = source(d, r.cfg.clone(), r.fill);
    let dst = VmBuilder::new(dst_cfg).build().unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let streams = r.streams;
    std::thread::scope(|s| {
        let stats = if r.tcp {
            let (listener, dst) = (&listener, &dst);
            let recv = s.spawn(move || {
                let (conn, data) = tcp_accept_streams(listener, streams, DEFAULT_PEER_TIMEOUT).unwrap();
                Destination::new(dst).run_streams(conn, data).unwrap();
            });
            let (conn, data) = tcp_connect_streams(addr, streams, DEFAULT_PEER_TIMEOUT).unwrap();
            let stats = Source::new(&src, ConvergencePolicy::default()).run_streams(conn, data).unwrap();
            recv.join().unwrap();
            stats
        } else {
            let (a, b) = channel_pair(4, DEFAULT_PEER_TIMEOUT);
            let recv = s.spawn(|| Destination::new(&dst).run(b).unwrap());
            let stats = Source::new(&src, ConvergencePolicy::default()).run(a).unwrap();
            recv.join().unwrap();
            stats
        };
        (stats.total, stats.downtime)
    })
}

/// One end-to-end row: the VMs' configuration, the transport, and the source's memory.
struct Row {
    cfg: VmConfig,
    /// Loopback TCP (else in-process channels).
    tcp: bool,
    /// Data streams besides the main TCP connection.
    streams: usize,
    /// Guest memory full of data (see [`source`]).
    fill: bool,
}

fn end_to_end(c: &mut Criterion) {
    if !vinfra::vcore::testing::kvm_available("benches/dirty_page_migration end_to_end") {
        return;
    }
    let mut g = c.benchmark_group("migrate_256MiB");
    g.sample_size(10).measurement_time(Duration::from_secs(8)).warm_up_time(Duration::from_millis(500));
    let idle = DirtierConfig { ws_pages: 16384, pages_per_sec: 1, ..Default::default() };
    let slow = DirtierConfig {
        ws_pages: 16384,
        pattern: Pattern::Random,
        pages_per_sec: 5_000,
        ..Default::default()
    };
    let fast = DirtierConfig {
        ws_pages: 16384,
        pattern: Pattern::Random,
        pages_per_sec: 50_000,
        ..Default::default()
    };
    // The KVM dirty log (the default: the migration turns it on per slot), per-vCPU dirty rings
    // of 4096 entries, transparent huge pages on both VMs.
    let log = VmConfig { mem_mib: 256, ..Default::default() };
    let ring = VmConfig { dirty_tracking: DirtyTracking::Ring { entries: 4096 }, ..log.clone() };
    let huge = VmConfig { huge_pages: true, ..log.clone() };
    // Memory allocated when the VMs are built (before the timed migration).
    let pre = VmConfig { prealloc: true, ..log.clone() };
    let row = |cfg: &VmConfig, tcp, streams, fill| Row { cfg: cfg.clone(), tcp, streams, fill };
    let rows = [
        ("idle", idle, "in_process", row(&log, false, 0, false)),
        ("idle", idle, "tcp", row(&log, true, 0, false)),
        ("idle", idle, "tcp_4_streams", row(&log, true, 4, false)),
        ("idle", idle, "in_process_huge_pages", row(&huge, false, 0, false)),
        ("dirty_5k_pps", slow, "in_process", row(&log, false, 0, false)),
        ("dirty_5k_pps", slow, "tcp", row(&log, true, 0, false)),
        ("dirty_5k_pps", slow, "in_process_huge_pages", row(&huge, false, 0, false)),
        ("dirty_50k_pps", fast, "in_process", row(&log, false, 0, false)),
        ("dirty_50k_pps", fast, "tcp", row(&log, true, 0, false)),
        ("dirty_50k_pps", fast, "tcp_4_streams", row(&log, true, 4, false)),
        ("dirty_50k_pps", fast, "tcp_dirty_ring", row(&ring, true, 0, false)),
        // Every page holds data: the rows to set against raw TCP (last: a group's
        // throughput setting stays, and these count 256 MiB per run).
        ("idle_full", idle, "tcp", row(&log, true, 0, true)),
        ("idle_full", idle, "tcp_2_streams", row(&log, true, 2, true)),
        ("idle_full", idle, "tcp_4_streams", row(&log, true, 4, true)),
        ("idle_full", idle, "tcp_prealloc", row(&pre, true, 0, true)),
        ("idle_full", idle, "tcp_2_streams_prealloc", row(&pre, true, 2, true)),
    ];
    for (name, d, transport, r) in rows {
        let mut downtimes = Vec::new();
        if r.fill {
            g.throughput(Throughput::Bytes(256 << 20));
        }
        g.bench_function(BenchmarkId::new(transport, name), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (t, down) = migrate_once(d, &r);
                    total += t;
                    downtimes.push(down);
                }
                total
            })
        });
        downtimes.sort();
        if let (Some(min), Some(max)) = (downtimes.first(), downtimes.last()) {
            let median = downtimes[downtimes.len() / 2];
            eprintln!(
                "migrate_256MiB/{transport}/{name}: downtime median {median:?} (min {min:?}, max {max:?})"
            );
        }
    }
    g.finish();
}

fn idle_1gib_downtime(c: &mut Criterion) {
    if !vinfra::vcore::testing::kvm_available("benches/dirty_page_migration idle_1GiB") {
        return;
    }
    let mut g = c.benchmark_group("idle_1GiB");
    g.sample_size(10).measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_millis(200));
    g.bench_function("downtime_tcp", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let d = DirtierConfig { ws_pages: 1024, pages_per_sec: 1, ..Default::default() };
                let cfg = VmConfig { mem_mib: 1024, ..Default::default() };
                let src = VmBuilder::new(cfg.clone()).payload(Dirtier(d)).build().unwrap();
                src.start().unwrap();
                let dst = VmBuilder::new(cfg).build().unwrap();
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let addr = listener.local_addr().unwrap();
                let t = Instant::now();
                let stats = std::thread::scope(|s| {
                    let recv = s.spawn(|| {
                        let conn = tcp_accept(&listener, DEFAULT_PEER_TIMEOUT).unwrap();
                        Destination::new(&dst).run(conn).unwrap();
                    });
                    let st = Source::new(&src, ConvergencePolicy::default())
                        .run(tcp_connect(addr, DEFAULT_PEER_TIMEOUT).unwrap())
                        .unwrap();
                    recv.join().unwrap();
                    st
                });
                let _ = t;
                total += stats.downtime;
            }
            total
        })
    });
    g.finish();
}

criterion_group! {
    name = migration;
    config = Criterion::default().sample_size(20).measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_millis(500));
    targets = bitmaps, encode_decode, raw_tcp, end_to_end, idle_1gib_downtime
}
criterion_main!(migration);
