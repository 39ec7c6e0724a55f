//! The `hello` guest: PIO and MMIO exits reach the buses.

mod common;

use std::time::Duration;

use common::{PROBE_ANSWER, attach};
use vcore::guest::{HELLO_MESSAGE, Hello, MMIO_PROBE_ADDR};
use vcore::{RunState, VmBuilder, VmConfig};

#[test]
fn hello_prints_through_the_pio_bus_and_pokes_mmio() {
    require_kvm!();
    let vm = VmBuilder::new(VmConfig { mem_mib: 32, ..Default::default() }).payload(Hello).build().unwrap();
    let dev = attach(&vm);
    vm.start().unwrap();
    let code = dev.exit.wait(Duration::from_secs(20));
    if code.is_none() {
        panic!("guest not done; event: {:?}", vm.next_event(Duration::ZERO));
    }
    assert_eq!(code, Some(PROBE_ANSWER), "the MMIO read answer comes back through the exit port");
    assert_eq!(String::from_utf8(dev.console.output()).unwrap(), HELLO_MESSAGE);
    assert_eq!(dev.probe.writes(), vec![(0, b"vinfra!!".to_vec())], "MMIO write at {MMIO_PROBE_ADDR:#x}");
    let stats = vm.vcpu_stats(0).unwrap();
    assert!(stats.pio.load(std::sync::atomic::Ordering::Relaxed) >= HELLO_MESSAGE.len() as u64);
    vm.shutdown();
    assert_eq!(vm.run_state(), RunState::Stopped);
}

#[test]
fn pio_loop_exits_reach_the_bus() {
    require_kvm!();
    use vcore::guest::{PIO_LOOP_PORT, PioLoop, WriteCounter};
    let vm = VmBuilder::new(VmConfig { mem_mib: 16, ..Default::default() }).payload(PioLoop).build().unwrap();
    let counter = std::sync::Arc::new(WriteCounter::new());
    vm.pio_bus().insert(PIO_LOOP_PORT.into(), 4, counter.clone()).unwrap();
    vm.start().unwrap();
    assert!(common::wait_until(Duration::from_secs(20), || counter.count() > 1000));
}

#[test]
fn a_triple_fault_is_an_event_not_a_panic() {
    require_kvm!();
    use vcore::VmEvent;
    use vcore::vm_memory::{Bytes, GuestAddress};
    let vm = VmBuilder::new(VmConfig { mem_mib: 16, ..Default::default() }).payload(Hello).build().unwrap();
    // `ud2` as the first instruction: #UD with no IDT escalates to a triple fault.
    vm.memory().write_slice(&[0x0f, 0x0b], GuestAddress(vcore::guest::CODE_ADDR)).unwrap();
    vm.start().unwrap();
    assert_eq!(vm.next_event(Duration::from_secs(20)), Some(VmEvent::TripleFault { vcpu: 0 }));
    vm.pause().unwrap(); // a stopped vCPU counts as paused
    assert!(vm.save_state().is_ok());
    vm.shutdown();
}
