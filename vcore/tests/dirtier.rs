//! The `dirtier` guest: page contents follow its published progress; pause freezes it.

mod common;

use std::time::Duration;

use common::{dirtier_vm, wait_until};
use vcore::guest::{DirtierConfig, Pattern, read_progress};
use vcore::{DirtyTracking, VmConfig};

fn run_and_check(pattern: Pattern, pages_per_sec: u64) {
    let d = DirtierConfig { ws_pages: 2048, pattern, pages_per_sec, seed: 7, ..Default::default() };
    let vm = dirtier_vm(VmConfig { mem_mib: 64, ..Default::default() }, d);
    vm.start().unwrap();
    let mem = vm.memory();
    assert!(
        wait_until(Duration::from_secs(20), || read_progress(mem).pages_written > 3 * d.ws_pages),
        "dirtier made no progress: {:?} {:?}",
        read_progress(mem),
        vm.next_event(Duration::ZERO)
    );
    vm.pause().unwrap();
    let p1 = read_progress(mem);
    d.check_memory(mem, &p1).unwrap_or_else(|e| panic!("{pattern:?}: {e}"));
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(read_progress(mem), p1, "progress moved while paused");
    vm.resume().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || read_progress(mem).pages_written > p1.pages_written + 1000)
    );
    vm.pause().unwrap();
    let p2 = read_progress(mem);
    d.check_memory(mem, &p2).unwrap_or_else(|e| panic!("{pattern:?} after resume: {e}"));
    assert!(p2.generations >= 3);
}

#[test]
fn sequential_pages_hold_their_generation() {
    require_kvm!();
    run_and_check(Pattern::Sequential, 0);
}

#[test]
fn random_pages_match_the_replayed_sequence() {
    require_kvm!();
    run_and_check(Pattern::Random, 0);
}

#[test]
fn hot_cold_pages_match_the_replayed_sequence() {
    require_kvm!();
    run_and_check(Pattern::HotCold { hot_pages: 64, hot_percent: 90 }, 0);
}

#[test]
fn rate_limited_dirtier_keeps_its_pace() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 1024, pages_per_sec: 20_000, ..Default::default() };
    let vm = dirtier_vm(VmConfig { mem_mib: 32, ..Default::default() }, d);
    if vm.tsc_khz() == 0 {
        eprintln!("SKIP rate test: host reports no TSC frequency");
        return;
    }
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(500));
    vm.pause().unwrap();
    let p = read_progress(vm.memory());
    d.check_memory(vm.memory(), &p).unwrap();
    // 0.5 s at 20,000 pages/s: far fewer than flat out, and more than none.
    assert!(p.pages_written > 1_000 && p.pages_written < 15_000, "pages written: {}", p.pages_written);
}

#[test]
fn a_slow_dirtier_idles_between_writes_and_still_pauses_at_once() {
    require_kvm!();
    // 20 writes a second: 50 ms between writes, spent idle (IDLE_PORT), not spinning.
    let d = DirtierConfig { ws_pages: 64, pages_per_sec: 20, ..Default::default() };
    let vm = dirtier_vm(VmConfig { mem_mib: 32, ..Default::default() }, d);
    if vm.tsc_khz() == 0 {
        eprintln!("SKIP idle test: host reports no TSC frequency");
        return;
    }
    vm.start().unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let t = std::time::Instant::now();
    vm.pause().unwrap();
    let pause = t.elapsed();
    let p = read_progress(vm.memory());
    d.check_memory(vm.memory(), &p).unwrap();
    assert!((10..=30).contains(&p.pages_written), "about 20 pages in a second: {}", p.pages_written);
    let idles = vm.vcpu_stats(0).unwrap().pio.load(std::sync::atomic::Ordering::Relaxed);
    assert!(idles >= p.pages_written / 2, "the guest idled between writes: {idles} port exits");
    // An idling vCPU wakes for the pause: far less than the 50 ms it asked to idle.
    assert!(pause < Duration::from_millis(20), "pause took {pause:?}");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(read_progress(vm.memory()), p, "no write while paused");
    vm.resume().unwrap();
    assert!(wait_until(Duration::from_secs(5), || read_progress(vm.memory()).pages_written > p.pages_written));
}

#[test]
fn kvm_dirty_log_sees_guest_writes_and_can_be_switched() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 512, ..Default::default() };
    // Classic mode (no manual protect): KVM_GET_DIRTY_LOG returns and clears the bitmap.
    let vm = dirtier_vm(VmConfig { mem_mib: 32, ..Default::default() }, d);
    vm.set_dirty_logging(0, true).unwrap();
    assert!(vm.slots()[0].dirty_log);
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > 2048));
    vm.pause().unwrap();
    let log = vm.dirty_log(0).unwrap();
    let first_ws_page = (d.ws_start / 4096) as usize;
    let dirty_in_ws =
        (first_ws_page..first_ws_page + 512).filter(|&p| log[p / 64] & (1 << (p % 64)) != 0).count();
    assert_eq!(dirty_in_ws, 512, "every working-set page is in KVM's dirty log");
    let high = (16 << 20) / 4096..(32 << 20) / 4096; // never touched by the guest
    assert!(high.clone().all(|p| log[p / 64] & (1 << (p % 64)) == 0), "untouched pages are clean");
    assert!(vm.dirty_log(0).unwrap().iter().all(|&w| w == 0), "fetching cleared the log while paused");
    vm.set_dirty_logging(0, false).unwrap();
    assert!(!vm.slots()[0].dirty_log);
    assert!(vm.set_dirty_logging(9, true).is_err());
    vm.resume().unwrap();
    assert!(wait_until(Duration::from_secs(10), || read_progress(vm.memory()).pages_written > 4096));
}

#[test]
fn manual_protect_mode_builds_and_logs() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 256, ..Default::default() };
    let vm =
        dirtier_vm(VmConfig { mem_mib: 32, dirty_tracking: DirtyTracking::Log, ..Default::default() }, d);
    eprintln!("manual dirty-log protect: {}", vm.dirty_log_manual_protect());
    vm.set_dirty_logging(0, true).unwrap();
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > 1000));
    vm.pause().unwrap();
    let log = vm.dirty_log(0).unwrap();
    let p = (d.ws_start / 4096) as usize;
    assert_ne!(log[p / 64] & (1 << (p % 64)), 0);
}

#[test]
fn dirty_ring_mode_builds_and_runs() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 256, ..Default::default() };
    let cfg =
        VmConfig { mem_mib: 32, dirty_tracking: DirtyTracking::Ring { entries: 4096 }, ..Default::default() };
    let vm = dirtier_vm(cfg, d);
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > 1000));
}
