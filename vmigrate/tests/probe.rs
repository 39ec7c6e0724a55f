//! The dirty-rate probe against the dirtier guest, whose rate is known (real KVM).

mod common;

use std::time::Duration;

use common::wait_until;
use vcore::guest::{Dirtier, DirtierConfig, Pattern, read_progress};
use vcore::{DirtyTracking, VmBuilder, VmConfig};
use vmigrate::probe_dirty_rate;

/// Runs the dirtier at `pps` (sequential over 32,768 pages: no page twice within a probe) and
/// probes for 400 ms.
fn probe(tracking: DirtyTracking, pps: u64) -> vmigrate::DirtyRate {
    let cfg = VmConfig { mem_mib: 256, dirty_tracking: tracking, ..Default::default() };
    let d = DirtierConfig {
        ws_pages: 32768,
        pattern: Pattern::Sequential,
        pages_per_sec: pps,
        ..Default::default()
    };
    let vm = VmBuilder::new(cfg).payload(Dirtier(d)).build().unwrap();
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > 0));
    let rate = probe_dirty_rate(&vm, Duration::from_millis(400)).unwrap();
    assert!(vm.slots().iter().all(|s| !s.dirty_log), "tracking is off after the probe");
    let before = read_progress(vm.memory()).pages_written;
    assert!(
        wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > before),
        "the guest runs on"
    );
    eprintln!("{tracking:?} at {pps} pages/s: {rate:?}");
    rate
}

#[test]
fn the_probe_measures_the_dirtiers_rate_with_the_dirty_log() {
    require_kvm!();
    let r = probe(DirtyTracking::None, 5_000);
    assert!((2_500.0..7_500.0).contains(&r.pages_per_sec), "{r:?}");
    let mib = r.pages_per_sec * 4096.0 / (1 << 20) as f64;
    assert!((r.mib_per_sec - mib).abs() < 1e-9);
}

#[test]
fn the_probe_measures_the_dirtiers_rate_with_dirty_rings() {
    require_kvm!();
    let r = probe(DirtyTracking::Ring { entries: 4096 }, 5_000);
    assert!((2_500.0..7_500.0).contains(&r.pages_per_sec), "{r:?}");
}

#[test]
fn an_idle_guest_probes_near_zero() {
    require_kvm!();
    // One page a second, plus the guest's own progress page.
    let r = probe(DirtyTracking::None, 1);
    assert!(r.pages <= 16, "{r:?}");
}
