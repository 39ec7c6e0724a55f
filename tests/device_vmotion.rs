//! vMotion of a VM with a virtio device in use: the built-in CPL-3 guest drives virtio-rng in a
//! loop (one request at a time: post, notify through the ioeventfd, poll the used ring) while
//! the VM migrates. The device is paused right after the vCPUs, its state travels as a
//! versioned section, and the guest finishes its loop on the destination against the restored
//! device: every request completed exactly once.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use vinfra::vcore::guest::{CONSOLE_PORT, Console, EXIT_PORT, ExitPort};
use vinfra::vcore::{RunState, Snapshot, Vm, VmBuilder, VmConfig};
use vinfra::vdevices::guest::VirtioRng;
use vinfra::vdevices::set::{restore_device, section};
use vinfra::vdevices::virtio::rng::Rng;
use vinfra::vdevices::{DeviceSet, DeviceState, EventLoop, MmioTransport};
use vinfra::vmigrate::transport::{DEFAULT_PEER_TIMEOUT, channel_pair};
use vinfra::vmigrate::{ConvergencePolicy, Destination, MigrationError, Source};

const GSI: u32 = 5;

/// The tests run one at a time: each guest spins on its used ring and each device thread polls,
/// and two such VMs migrating at once on a 2-core host starve each other's vCPUs.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}
const SECTION: &str = "virtio-rng@0xd1000000";

/// The guest's loop: long enough to be migrated in the middle of it.
fn guest() -> VirtioRng {
    VirtioRng { iterations: 20_000, buf_len: 64, ..Default::default() }
}

/// A VM with the exit port and COM1 console the guest uses.
fn vm(payload: Option<VirtioRng>) -> (Vm, Arc<ExitPort>, Arc<Console>) {
    let b = VmBuilder::new(VmConfig { mem_mib: 32, vcpus: 1, ..Default::default() });
    let vm = match payload {
        Some(p) => b.payload(p).build(),
        None => b.build(),
    }
    .unwrap();
    let exit = Arc::new(ExitPort::new());
    vm.pio_bus().insert(EXIT_PORT.into(), 4, exit.clone()).unwrap();
    let console = Arc::new(Console::new());
    vm.pio_bus().insert(CONSOLE_PORT.into(), 1, console.clone()).unwrap();
    (vm, exit, console)
}

fn bytes_served(t: &MmioTransport) -> u64 {
    match t.save().device {
        DeviceState::Rng(r) => r.bytes_served,
        other => panic!("not rng: {other:?}"),
    }
}

/// A running source VM with its rng device, mid-loop.
fn running_source() -> (Vm, Arc<ExitPort>, MmioTransport, EventLoop) {
    let cfg = guest();
    let (src, exit, _console) = vm(Some(cfg));
    let t = MmioTransport::new(src.memory().clone(), Box::new(Rng::new())).unwrap();
    t.attach(&src, cfg.mmio_base, GSI).unwrap();
    let events = EventLoop::start().unwrap();
    events.add(Arc::new(t.clone())).unwrap();
    src.start().unwrap();
    let served_some = || bytes_served(&t) >= 500 * u64::from(cfg.buf_len);
    assert!(
        vinfra::vcore::testing::wait_until(Duration::from_secs(20), served_some),
        "guest drives the device"
    );
    (src, exit, t, events)
}

#[test]
fn a_vm_migrates_with_its_device_mid_io() {
    if !vinfra::vcore::testing::kvm_available(concat!(file!(), ":", line!())) {
        return;
    }
    let _serial = serial();
    let cfg = guest();
    let (src, src_exit, src_dev, _src_events) = running_source();
    let (dst, dst_exit, dst_console) = vm(None);
    let dst_events = EventLoop::start().unwrap();
    let restored: Arc<Mutex<Option<MmioTransport>>> = Arc::default();

    let (a, b) = channel_pair(2, DEFAULT_PEER_TIMEOUT);
    let (stats, recv) = std::thread::scope(|s| {
        let recv = s.spawn(|| {
            Destination::new(&dst)
                .devices(|sections| {
                    if sections.len() != 1 {
                        return Err(format!("{} sections", sections.len()));
                    }
                    let bytes = section(sections, SECTION).map_err(|e| e.to_string())?;
                    let t = MmioTransport::from_section(dst.memory().clone(), bytes, restore_device)
                        .map_err(|e| e.to_string())?;
                    t.attach(&dst, cfg.mmio_base, GSI).map_err(|e| e.to_string())?;
                    dst_events.add(Arc::new(t.clone())).map_err(|e| e.to_string())?;
                    *restored.lock().unwrap() = Some(t);
                    Ok(())
                })
                .run(b)
        });
        let stats = Source::new(&src, ConvergencePolicy::default())
            .devices(DeviceSet::new().virtio(SECTION, src_dev.clone()))
            .run(a);
        (stats, recv.join().unwrap())
    });
    let stats = stats.expect("migration succeeds");
    recv.expect("destination succeeds");
    assert_eq!(src.run_state(), RunState::Stopped);
    let at_save = bytes_served(&src_dev);
    assert!(at_save < cfg.iterations * u64::from(cfg.buf_len), "migrated mid-loop");

    // The guest finishes its loop on the destination, through the restored device.
    let code = dst_exit.wait(Duration::from_secs(60)).expect("guest finished on the destination");
    assert_eq!(u64::from(code), cfg.iterations, "every request completed (0xdead: device refused)");
    assert!(src_exit.wait(Duration::ZERO).is_none(), "nothing finished on the source");
    let out = String::from_utf8_lossy(&dst_console.output()).into_owned();
    assert!(out.ends_with("done\n"), "{out:?}");
    let dst_dev = restored.lock().unwrap().clone().expect("device restored");
    // Nothing lost, nothing served twice: the device's byte count continues from the saved
    // state and ends at exactly one buffer per request.
    assert_eq!(bytes_served(&dst_dev), cfg.iterations * u64::from(cfg.buf_len));
    assert!(dst_dev.broken().is_none());
    eprintln!(
        "migrated after {} of {} requests: downtime {:?}, total {:?}",
        at_save / u64::from(cfg.buf_len),
        cfg.iterations,
        stats.downtime,
        stats.total
    );
}

#[test]
fn a_refused_device_leaves_the_source_and_its_device_running() {
    if !vinfra::vcore::testing::kvm_available(concat!(file!(), ":", line!())) {
        return;
    }
    let _serial = serial();
    let cfg = guest();
    let (src, src_exit, src_dev, _src_events) = running_source();
    let (dst, _, _) = vm(None);
    let (a, b) = channel_pair(2, DEFAULT_PEER_TIMEOUT);
    let result = std::thread::scope(|s| {
        let recv = s.spawn(|| Destination::new(&dst).devices(|_| Err("no rng here".into())).run(b));
        let r = Source::new(&src, ConvergencePolicy::default())
            .devices(DeviceSet::new().virtio(SECTION, src_dev.clone()))
            .run(a);
        assert!(recv.join().unwrap().is_err());
        r
    });
    assert!(matches!(result, Err(MigrationError::PeerAborted(_))), "{result:?}");
    // The source VM runs again and so does its device: the guest completes every request.
    assert_eq!(src.run_state(), RunState::Running);
    let code = src_exit.wait(Duration::from_secs(60)).expect("guest finished on the source");
    assert_eq!(u64::from(code), cfg.iterations);
    assert_eq!(bytes_served(&src_dev), cfg.iterations * u64::from(cfg.buf_len));
    assert_eq!(dst.run_state(), RunState::Created, "nothing started on the destination");
}
