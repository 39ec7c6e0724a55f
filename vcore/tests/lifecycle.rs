//! Pause/resume with several vCPUs, save/restore into a fresh VM, and typed errors on bad input.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::{dirtier_vm, wait_until};
use vcore::guest::{DirtierConfig, Hello, Pattern, read_progress, tick_addr};
use vcore::vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};
use vcore::{ConfigError, RunState, StateError, Vm, VmBuilder, VmConfig, VmError, VmSnapshot};

fn ticks(vm: &Vm) -> Vec<u64> {
    (1..vm.vcpu_count()).map(|i| vm.memory().read_obj::<u64>(GuestAddress(tick_addr(i))).unwrap()).collect()
}

fn pause_resume_many(vcpus: u8) {
    let d = DirtierConfig { ws_pages: 256, ..Default::default() };
    let vm = dirtier_vm(VmConfig { mem_mib: 32, vcpus: vcpus.into(), ..Default::default() }, d);
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || ticks(&vm).iter().all(|&t| t > 0)));
    let mut worst = Duration::ZERO;
    for i in 0..1000 {
        let t = Instant::now();
        vm.pause().unwrap();
        worst = worst.max(t.elapsed());
        assert_eq!(vm.run_state(), RunState::Paused, "round {i}");
        vm.resume().unwrap();
    }
    eprintln!("{vcpus} vCPUs: 1000 pause/resume rounds, worst pause {worst:?}");
    // No vCPU lost or stuck: every one still makes progress after the last resume.
    let before = (read_progress(vm.memory()).pages_written, ticks(&vm));
    assert!(wait_until(Duration::from_secs(20), || {
        let now = ticks(&vm);
        read_progress(vm.memory()).pages_written > before.0 && now.iter().zip(&before.1).all(|(a, b)| a > b)
    }));
    assert!(vm.next_event(Duration::ZERO).is_none());
}

#[test]
fn pause_resume_1000_times_with_2_vcpus() {
    require_kvm!();
    pause_resume_many(2);
}

#[test]
fn pause_resume_1000_times_with_4_vcpus() {
    require_kvm!();
    pause_resume_many(4);
}

fn copy_memory(from: &Vm, to: &Vm) {
    for region in from.memory().iter() {
        let mut buf = vec![0u8; region.len() as usize];
        from.memory().read_slice(&mut buf, region.start_addr()).unwrap();
        to.memory().write_slice(&buf, region.start_addr()).unwrap();
    }
}

#[test]
fn restore_into_a_fresh_vm_continues_the_dirtier() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 1024, pattern: Pattern::Random, seed: 3, ..Default::default() };
    let cfg = VmConfig { mem_mib: 32, vcpus: 2, ..Default::default() };
    let src = dirtier_vm(cfg.clone(), d);
    src.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(src.memory()).pages_written > 5000));
    src.pause().unwrap();
    let saved = read_progress(src.memory());
    let bytes = src.save_state().unwrap().to_bytes();
    let snap = VmSnapshot::from_bytes(&bytes).unwrap();
    assert!(snap.vcpus[0].msrs.len() > 10, "MSRs saved: {}", snap.vcpus[0].msrs.len());

    let dst = VmBuilder::new(cfg).build().unwrap();
    copy_memory(&src, &dst);
    src.shutdown();
    dst.restore_state(&snap).unwrap();
    d.check_memory(dst.memory(), &saved).unwrap();
    dst.start().unwrap();
    assert!(
        wait_until(Duration::from_secs(20), || read_progress(dst.memory()).pages_written
            > saved.pages_written + 5000),
        "restored guest does not run: {:?}",
        dst.next_event(Duration::ZERO)
    );
    dst.pause().unwrap();
    let after = read_progress(dst.memory());
    assert!(after.generations >= saved.generations);
    // The replay from the seed matches: the guest continued its own sequence, not a new one.
    d.check_memory(dst.memory(), &after).unwrap();
}

#[test]
fn bad_input_gives_typed_errors() {
    require_kvm!();
    let zero = VmBuilder::new(VmConfig { mem_mib: 0, ..Default::default() }).build();
    assert!(matches!(zero, Err(VmError::Config(ConfigError::ZeroMemory { .. }))));
    let many = VmBuilder::new(VmConfig { vcpus: 1000, ..Default::default() }).build();
    assert!(matches!(many, Err(VmError::Config(ConfigError::TooManyVcpus { .. }))), "{many:?}");
    let not_kernel = std::env::temp_dir().join(format!("vcore-notkernel-{}", std::process::id()));
    std::fs::write(&not_kernel, vec![0x5au8; 8192]).unwrap();
    let k = VmBuilder::new(VmConfig::default()).kernel(&not_kernel, "console=ttyS0", None).build();
    assert!(matches!(k, Err(VmError::Boot(vcore::BootError::NotAKernel { .. }))), "{k:?}");
    let _ = std::fs::remove_file(not_kernel);
    let ws = DirtierConfig { ws_pages: 1 << 30, ..Default::default() };
    let big = VmBuilder::new(VmConfig::default()).payload(vcore::guest::Dirtier(ws)).build();
    assert!(matches!(big, Err(VmError::Boot(vcore::BootError::Invalid(_)))), "{big:?}");

    // Overlapping devices.
    let vm = VmBuilder::new(VmConfig { mem_mib: 16, ..Default::default() }).payload(Hello).build().unwrap();
    let c = std::sync::Arc::new(vcore::guest::Console::new());
    vm.pio_bus().insert(0x3f8, 8, c.clone()).unwrap();
    assert!(matches!(vm.pio_bus().insert(0x3fc, 8, c), Err(vcore::BusError::Overlap { .. })));

    // Wrong run state.
    assert!(matches!(vm.resume(), Err(VmError::BadRunState { .. })));

    // Corrupt and mismatched saved state.
    let good = vm.save_state().unwrap().to_bytes();
    let mut flipped = good.clone();
    let last = flipped.len() - 1;
    flipped[last] ^= 0x40;
    assert!(matches!(VmSnapshot::from_bytes(&flipped), Err(StateError::Checksum { .. })));
    assert!(matches!(VmSnapshot::from_bytes(&good[..good.len() - 3]), Err(StateError::Length { .. })));
    assert!(matches!(
        VmSnapshot::from_bytes(b"garbage!garbage!garbage!garbage!"),
        Err(StateError::BadMagic { .. })
    ));
    let mut version = good.clone();
    version[8] = 9;
    assert!(matches!(VmSnapshot::from_bytes(&version), Err(StateError::Version { .. })));
    let other = VmBuilder::new(VmConfig { mem_mib: 16, vcpus: 2, ..Default::default() }).build().unwrap();
    let snap = VmSnapshot::from_bytes(&good).unwrap();
    assert!(matches!(other.restore_state(&snap), Err(VmError::State(StateError::Mismatch { .. }))));
    let mut bad_msr = snap.clone();
    bad_msr.vcpus[0].msrs.push((0xdead_beef, 1));
    let fresh = VmBuilder::new(VmConfig { mem_mib: 16, ..Default::default() }).build().unwrap();
    let err = fresh.restore_state(&bad_msr).unwrap_err();
    assert!(err.to_string().contains("0xdeadbeef"), "the refused MSR is named: {err}");
}

#[test]
fn throttle_slows_the_guest_and_lifts() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 256, ..Default::default() };
    let vm = dirtier_vm(VmConfig { mem_mib: 32, ..Default::default() }, d);
    vm.start().unwrap();
    assert!(wait_until(Duration::from_secs(20), || read_progress(vm.memory()).pages_written > 0));
    let rate = |vm: &Vm| {
        let a = read_progress(vm.memory()).pages_written;
        std::thread::sleep(Duration::from_millis(300));
        read_progress(vm.memory()).pages_written - a
    };
    let free = rate(&vm);
    vm.set_throttle(90);
    std::thread::sleep(Duration::from_millis(50));
    let slowed = rate(&vm);
    let sleeps = vm.vcpu_stats(0).unwrap().throttled.load(Ordering::Relaxed);
    vm.set_throttle(0);
    std::thread::sleep(Duration::from_millis(50));
    let again = rate(&vm);
    eprintln!(
        "pages per 300 ms: free {free}, throttled 90% {slowed}, after {again}; {sleeps} throttle sleeps"
    );
    assert!(sleeps > 5);
    assert!(slowed * 3 < free, "90% throttle must cut the rate well below a third");
    assert!(again * 3 > free, "lifting the throttle restores the rate");
}
