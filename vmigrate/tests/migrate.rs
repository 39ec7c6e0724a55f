//! Live migration of the dirtier guest: in-process, over TCP, to and from a file.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{dest_vm, dump, source_vm, wait_until};
use vcore::guest::{DirtierConfig, Pattern, read_progress};
use vcore::{DirtyTracking, RunState, VmConfig};
use vmigrate::transport::{DEFAULT_PEER_TIMEOUT, channel_pair, tcp_accept, tcp_accept_streams, tcp_connect};
use vmigrate::{ConvergencePolicy, Destination, Source, save_snapshot};

/// The dirtier writing random pages of a 4096-page working set, `pps` pages a second.
fn random_4096_at(pps: u64) -> DirtierConfig {
    DirtierConfig { ws_pages: 4096, pattern: Pattern::Random, pages_per_sec: pps, ..Default::default() }
}

fn migrate_in_process(
    cfg: VmConfig,
    d: DirtierConfig,
    policy: ConvergencePolicy,
) -> vmigrate::MigrationStats {
    migrate_over_channels(cfg, d, policy, 0)
}

/// Migrates in-process over channels: a main stream and `streams` data streams.
fn migrate_over_channels(
    cfg: VmConfig,
    d: DirtierConfig,
    policy: ConvergencePolicy,
    streams: usize,
) -> vmigrate::MigrationStats {
    let src = source_vm(&cfg, d);
    let dst = dest_vm(&cfg);
    let (a, b) = channel_pair(2, DEFAULT_PEER_TIMEOUT);
    let (data_a, data_b): (Vec<_>, Vec<_>) =
        (0..streams).map(|_| channel_pair(2, DEFAULT_PEER_TIMEOUT)).unzip();
    let arrived = Arc::new(Mutex::new(Vec::new()));
    let (stats, received) = std::thread::scope(|s| {
        let recv = s.spawn(|| {
            let arrived = arrived.clone();
            Destination::new(&dst)
                .on_restored(move |vm| *arrived.lock().unwrap() = dump(vm))
                .run_streams(b, data_b)
        });
        let stats = Source::new(&src, policy).run_streams(a, data_a).expect("migration succeeds");
        (stats, recv.join().unwrap().expect("destination succeeds"))
    });
    assert_eq!((stats.data_streams, received.data_streams), (streams, streams));
    assert_eq!(
        (received.normal_pages + received.torn_pages, received.zero_pages),
        (stats.normal_pages, stats.zero_pages),
        "the destination received every page the source sent (torn ones, which the guest wrote while \
         they were sent live, are counted apart, and arrived again)"
    );
    assert!(received.torn_pages <= stats.live_pages, "only live pages arrive torn");
    // The source is frozen at its pause: what arrived equals it, byte for byte.
    assert_eq!(src.run_state(), RunState::Stopped);
    assert!(dump(&src) == *arrived.lock().unwrap(), "destination memory equals the source at pause");
    let at_pause = read_progress(src.memory());
    d.check_memory(src.memory(), &at_pause).unwrap();
    // The guest keeps running on the destination, continuing its own sequence.
    assert_eq!(dst.run_state(), RunState::Running);
    assert!(wait_until(Duration::from_secs(20), || read_progress(dst.memory()).pages_written
        > at_pause.pages_written + 1000));
    dst.pause().unwrap();
    d.check_memory(dst.memory(), &read_progress(dst.memory())).unwrap();
    // Stats are consistent.
    let first = stats.iterations[0];
    let total_pages: u64 = src.slots().iter().map(|s| s.pages()).sum();
    assert_eq!(first.normal_pages + first.zero_pages, total_pages, "iteration 0 sends every page");
    let later_dirty: u64 = stats.iterations[1..].iter().map(|i| i.dirty_pages).sum();
    let later_sent: u64 = stats.iterations[1..].iter().map(|i| i.normal_pages + i.zero_pages).sum();
    assert!(later_sent >= later_dirty, "pages sent >= pages dirtied after the first pass");
    assert!(stats.downtime > Duration::ZERO && stats.downtime < stats.total);
    assert!(stats.zero_pages > 0, "untouched memory travels as zero runs");
    eprintln!(
        "{:?} {} pps: {} iterations, downtime {:?}, {} MiB sent, final {} pages",
        d.pattern,
        d.pages_per_sec,
        stats.iterations.len(),
        stats.downtime,
        stats.bytes_sent >> 20,
        stats.final_pages
    );
    stats
}

#[test]
fn idle_ish_sequential_guest_migrates_in_process() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 2048, pages_per_sec: 2_000, ..Default::default() };
    migrate_in_process(VmConfig { mem_mib: 128, ..Default::default() }, d, ConvergencePolicy::default());
}

#[test]
fn random_dirtier_at_a_high_rate_migrates() {
    require_kvm!();
    let d = DirtierConfig {
        ws_pages: 8192,
        pattern: Pattern::Random,
        pages_per_sec: 200_000,
        seed: 11,
        ..Default::default()
    };
    migrate_in_process(
        VmConfig { mem_mib: 128, vcpus: 2, ..Default::default() },
        d,
        ConvergencePolicy::default(),
    );
}

#[test]
fn hot_cold_flat_out_migrates_with_the_dirty_ring() {
    require_kvm!();
    let d = DirtierConfig {
        ws_pages: 4096,
        pattern: Pattern::HotCold { hot_pages: 128, hot_percent: 95 },
        ..Default::default()
    };
    let cfg = VmConfig {
        mem_mib: 64,
        dirty_tracking: DirtyTracking::Ring { entries: 65536 },
        ..Default::default()
    };
    migrate_in_process(cfg, d, ConvergencePolicy::default());
}

#[test]
fn manual_protect_dirty_log_migrates() {
    require_kvm!();
    let d = random_4096_at(50_000);
    let cfg = VmConfig { mem_mib: 64, dirty_tracking: DirtyTracking::Log, ..Default::default() };
    migrate_in_process(cfg, d, ConvergencePolicy::default());
}

#[test]
fn pages_spread_over_data_streams_arrive_in_order() {
    require_kvm!();
    // Flat out over a small working set: the same pages are sent again in every iteration, so
    // a copy overtaking a newer one of the same page would show as a memory mismatch.
    let d =
        DirtierConfig { ws_pages: 2048, pattern: Pattern::Random, pages_per_sec: 0, ..Default::default() };
    // Several passes: a limit no pass meets, then a forced switch-over.
    let policy = ConvergencePolicy {
        downtime_limit_ms: 0,
        stall_iterations: 4,
        on_stall: vmigrate::Strategy::SwitchOver,
        timeout_ms: Some(2_000),
        on_timeout: vmigrate::Strategy::SwitchOver,
        ..Default::default()
    };
    // Memory allocated up front on both sides (the destination's zero pages are then known
    // zero without being read, as for untouched memory).
    let cfg = VmConfig { mem_mib: 64, prealloc: true, ..Default::default() };
    let stats = migrate_over_channels(cfg, d, policy, 3);
    // How many passes depends on how much CPU the guest gets; one at least resends pages.
    let resent: u64 = stats.iterations[1..].iter().map(|i| i.normal_pages).sum::<u64>() + stats.final_pages;
    assert!(resent > 0, "pages were sent again: {:?}", stats.iterations);
}

#[test]
fn huge_page_guest_migrates() {
    require_kvm!();
    let d = random_4096_at(50_000);
    // Both sides on transparent huge pages: KVM splits the source's mappings for dirty logging.
    let cfg = VmConfig { mem_mib: 64, huge_pages: true, ..Default::default() };
    migrate_in_process(cfg, d, ConvergencePolicy::default());
}

#[test]
fn snapshot_to_file_and_back() {
    require_kvm!();
    let cfg = VmConfig { mem_mib: 64, ..Default::default() };
    let d = DirtierConfig { ws_pages: 2048, pattern: Pattern::Random, ..Default::default() };
    let src = source_vm(&cfg, d);
    let path = std::env::temp_dir().join(format!("vmigrate-snap-{}", std::process::id()));
    let mut f = std::fs::File::create(&path).unwrap();
    /// A device whose state is three bytes.
    struct Probe(bool);
    impl vmigrate::DeviceSections for Probe {
        fn pause_and_save(&mut self) -> Result<Vec<(String, Vec<u8>)>, String> {
            self.0 = true;
            Ok(vec![("probe".into(), vec![1, 2, 3])])
        }
        fn resume(&mut self) {
            self.0 = false;
        }
    }
    let mut probe = Probe(false);
    let bytes = save_snapshot(&src, &mut f, Some(&mut probe)).unwrap();
    assert!(probe.0, "the device was paused for the snapshot and stays paused");
    assert!(bytes < 64 << 20, "zero pages are not stored: {bytes} bytes");
    let dst = dest_vm(&cfg);
    let mut f = std::fs::File::open(&path).unwrap();
    let mut devices = Vec::new();
    let stats = Destination::new(&dst).devices(|s| {
        devices = s.to_vec();
        Ok(())
    });
    let stats = stats.restore_file(&mut f).unwrap();
    assert_eq!(stats.devices, 1);
    assert_eq!(devices, [("probe".to_string(), vec![1u8, 2, 3])]);
    assert!(dump(&src) == dump(&dst), "restored memory equals the saved memory");
    assert_eq!(dst.run_state(), RunState::Created);
    let saved = read_progress(src.memory());
    dst.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(dst.memory()).pages_written
        > saved.pages_written));
    let _ = std::fs::remove_file(path);
}

/// This test binary, re-run as a destination process: only test `name` runs, and it finds the
/// address in `env` and the VM and guest parameters in two more variables.
fn spawn_child(
    name: &str,
    env: &str,
    addr: &str,
    cfg: &VmConfig,
    d: &DirtierConfig,
) -> std::process::Command {
    let mut c = std::process::Command::new(std::env::current_exe().unwrap());
    c.args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(env, addr)
        .env("VMIGRATE_CHILD_CFG", serde_json::to_string(cfg).unwrap())
        .env("VMIGRATE_CHILD_DIRTIER", serde_json::to_string(d).unwrap());
    c
}

/// Connects to a child destination, waiting up to 5 s for it to listen.
fn connect_to_child(addr: &str) -> std::net::TcpStream {
    let mut conn = None;
    assert!(
        wait_until(Duration::from_secs(5), || {
            conn = tcp_connect(addr, DEFAULT_PEER_TIMEOUT).ok();
            conn.is_some()
        }),
        "connect to the child at {addr}"
    );
    conn.unwrap()
}

/// Child side of the two-process test: runs only when the parent sets the address.
#[test]
fn child_destination() {
    let Ok(addr) = std::env::var("VMIGRATE_CHILD_LISTEN") else { return };
    let cfg: VmConfig = serde_json::from_str(&std::env::var("VMIGRATE_CHILD_CFG").unwrap()).unwrap();
    let d: DirtierConfig = serde_json::from_str(&std::env::var("VMIGRATE_CHILD_DIRTIER").unwrap()).unwrap();
    let streams: usize = std::env::var("VMIGRATE_CHILD_STREAMS").map_or(0, |s| s.parse().unwrap());
    let listener = std::net::TcpListener::bind(&addr).unwrap();
    println!("CHILD LISTENING");
    let (conn, data) = tcp_accept_streams(&listener, streams, DEFAULT_PEER_TIMEOUT).unwrap();
    let dst = dest_vm(&cfg);
    let stats = Destination::new(&dst).run_streams(conn, data).expect("destination");
    assert_eq!(stats.data_streams, streams);
    let p0 = read_progress(dst.memory());
    assert!(wait_until(Duration::from_secs(20), || read_progress(dst.memory()).pages_written
        > p0.pages_written + 1000));
    dst.pause().unwrap();
    let p = read_progress(dst.memory());
    d.check_memory(dst.memory(), &p).unwrap();
    println!("CHILD OK pages={} from={} bytes={}", p.pages_written, p0.pages_written, stats.bytes);
}

#[test]
fn tcp_between_two_processes() {
    tcp_to_a_child(0);
}

#[test]
fn tcp_between_two_processes_with_data_streams() {
    tcp_to_a_child(4);
}

/// Migrates to a destination in a child process over TCP: a main stream and `streams` data
/// streams.
fn tcp_to_a_child(streams: usize) {
    require_kvm!();
    let cfg = VmConfig { mem_mib: 128, ..Default::default() };
    let d = random_4096_at(20_000);
    let port = { std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port() };
    let addr = format!("127.0.0.1:{port}");
    let child = spawn_child("child_destination", "VMIGRATE_CHILD_LISTEN", &addr, &cfg, &d)
        .env("VMIGRATE_CHILD_STREAMS", streams.to_string())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let src = source_vm(&cfg, d);
    let conn = connect_to_child(&addr);
    let data: Vec<_> = (0..streams).map(|_| tcp_connect(&addr, DEFAULT_PEER_TIMEOUT).unwrap()).collect();
    let stats = Source::new(&src, ConvergencePolicy::default()).run_streams(conn, data).expect("migration");
    assert_eq!(stats.data_streams, streams);
    let out = child.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success() && text.contains("CHILD OK"), "child failed: {text}");
    eprintln!("TCP: downtime {:?}, {} MiB, {}", stats.downtime, stats.bytes_sent >> 20, text.trim());
}

/// Child for the kill test: receives until the parent kills it.
#[test]
fn child_destination_to_kill() {
    let Ok(addr) = std::env::var("VMIGRATE_KILL_LISTEN") else { return };
    let cfg: VmConfig = serde_json::from_str(&std::env::var("VMIGRATE_CHILD_CFG").unwrap()).unwrap();
    let listener = std::net::TcpListener::bind(&addr).unwrap();
    let conn = tcp_accept(&listener, DEFAULT_PEER_TIMEOUT).unwrap();
    let dst = dest_vm(&cfg);
    let _ = Destination::new(&dst).run(conn);
    panic!("the parent should have killed this destination before the migration ended");
}

#[test]
fn killing_the_destination_process_leaves_the_source_running() {
    require_kvm!();
    let cfg = VmConfig { mem_mib: 128, ..Default::default() };
    let d = DirtierConfig {
        ws_pages: 8192,
        pattern: Pattern::Random,
        pages_per_sec: 20_000,
        ..Default::default()
    };
    let port = { std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port() };
    let addr = format!("127.0.0.1:{port}");
    let child = spawn_child("child_destination_to_kill", "VMIGRATE_KILL_LISTEN", &addr, &cfg, &d)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let child = Mutex::new(Some(child));
    let src = source_vm(&cfg, d);
    let conn = connect_to_child(&addr);
    // A slow link, and kill -9 of the destination once pages are flowing.
    let policy = ConvergencePolicy { bandwidth_limit_bps: Some(16 << 20), ..Default::default() };
    let res = Source::new(&src, policy)
        .progress(|p| {
            if let vmigrate::Progress::Pages { done, .. } = p
                && *done > 2000
                && let Some(mut c) = child.lock().unwrap().take()
            {
                c.kill().unwrap();
                c.wait().unwrap();
            }
        })
        .run(conn);
    assert!(res.is_err(), "the migration cannot succeed: {res:?}");
    assert!(child.lock().unwrap().is_none(), "the destination was killed mid-migration");
    common::assert_source_alive(&src, &d);
}

/// A flat-out sequential dirtier over 4,096 pages with a 256-entry dirty ring, tracked by a
/// started (not yet running) `KvmDirtyRing`.
fn small_ring_vm() -> (vcore::Vm, vmigrate::dirty::KvmDirtyRing, DirtierConfig) {
    use vmigrate::dirty::{DirtyTracker, KvmDirtyRing};
    let cfg =
        VmConfig { mem_mib: 32, dirty_tracking: DirtyTracking::Ring { entries: 256 }, ..Default::default() };
    let d = DirtierConfig { ws_pages: 4096, ..Default::default() };
    let vm = vcore::VmBuilder::new(cfg).payload(vcore::guest::Dirtier(d)).build().unwrap();
    let mut ring = KvmDirtyRing::default();
    ring.start(&vm).unwrap();
    (vm, ring, d)
}

#[test]
fn a_full_dirty_ring_holds_the_vcpu_until_harvested() {
    require_kvm!();
    use vmigrate::dirty::{DirtyTracker, empty_maps};
    let (vm, mut ring, _) = small_ring_vm();
    // Without the tracker's handler, nothing harvests on the vCPU thread.
    vm.set_dirty_ring_full_handler(None);
    vm.start().unwrap();
    assert_eq!(vm.next_event(Duration::from_secs(20)), Some(vcore::VmEvent::DirtyRingFull { vcpu: 0 }));
    let stuck = read_progress(vm.memory()).pages_written;
    std::thread::sleep(Duration::from_millis(50));
    assert!(read_progress(vm.memory()).pages_written <= stuck + 1, "the vCPU waits while its ring is full");
    assert_eq!(vm.next_event(Duration::ZERO), None, "reported once, not on every retry");
    let mut maps = empty_maps(&vm);
    ring.fetch(&vm, &mut maps).unwrap();
    let harvested: u64 = maps.iter().map(|m| m.count()).sum();
    assert!(harvested >= 32, "harvested {harvested} pages");
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > stuck + 16));
    ring.stop(&vm).unwrap();
}

#[test]
fn a_full_dirty_ring_is_harvested_by_its_vcpu_and_nothing_is_lost() {
    require_kvm!();
    use vmigrate::dirty::{DirtyTracker, empty_maps};
    // 3,000 pages written once each: over eleven times the ring.
    let (vm, mut ring, d) = small_ring_vm();
    let t0 = std::time::Instant::now();
    vm.start().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written >= 3000),
        "the guest keeps going although its ring filled up: {:?}",
        read_progress(vm.memory())
    );
    vm.pause().unwrap();
    let elapsed = t0.elapsed();
    let written = read_progress(vm.memory()).pages_written;
    assert!(written < 4096, "still in the first pass: {written}");
    let harvests = vm.vcpu_stats(0).unwrap().ring_harvests.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "ring of 256 entries: {written} pages written in {elapsed:?} ({:.0} pages/s), {harvests} harvests on the vCPU",
        written as f64 / elapsed.as_secs_f64()
    );
    assert_eq!(vm.next_event(Duration::ZERO), None, "no DirtyRingFull: the vCPU harvested");
    assert!(harvests >= 10, "{harvests} harvests");
    let mut maps = empty_maps(&vm);
    ring.fetch(&vm, &mut maps).unwrap();
    // Every page the guest wrote is in the harvest, whichever thread harvested it.
    let slot = vm
        .slots()
        .iter()
        .position(|s| s.guest_addr <= d.ws_start && d.ws_start < s.guest_addr + s.size)
        .unwrap();
    let first = (d.ws_start - vm.slots()[slot].guest_addr) / 4096;
    let missing: Vec<u64> = (0..written).filter(|&p| !maps[slot].is_set(first + p)).collect();
    assert!(
        missing.is_empty(),
        "{} of {written} written pages not harvested, first {:?}",
        missing.len(),
        &missing[..missing.len().min(8)]
    );
    ring.stop(&vm).unwrap();
}

#[test]
fn compressed_page_frames_migrate_and_shrink_the_stream() {
    require_kvm!();
    let cfg = VmConfig { mem_mib: 64, ..Default::default() };
    let d = random_4096_at(5_000);
    let policy = ConvergencePolicy { compress: true, ..Default::default() };
    // Memory equal at pause, the guest running on: checked by the helper.
    let stats = migrate_in_process(cfg, d, policy);
    assert!(stats.compressed_pages > 0, "{stats:?}");
    let data = stats.normal_pages * 4096;
    eprintln!(
        "compressed: {} of {} data pages, {} KiB sent for {} KiB of page data",
        stats.compressed_pages,
        stats.normal_pages,
        stats.bytes_sent >> 10,
        data >> 10
    );
    assert!(stats.bytes_sent < data / 2, "{} bytes sent for {data} bytes of pages", stats.bytes_sent);
}
