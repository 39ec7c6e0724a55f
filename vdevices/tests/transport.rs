//! The virtio-mmio transport's I/O path: notification suppression (EVENT_IDX), interrupts
//! raised while the device is still working, and the interrupt registers staying reachable
//! while the device thread holds the transport.
mod common;

use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::rig;
use vcore::Snapshot;
use vdevices::virtio::mmio::{INT_VRING, reg};
use vdevices::virtio::rng::RngState;
use vdevices::virtio::{
    DeviceError, DeviceState, QueueCtx, VIRTIO_F_RING_EVENT_IDX, VIRTIO_F_VERSION_1, VirtioDevice,
};

/// Completes every chain it finds one at a time, interrupting after each; then, if it served
/// any, waits for the test's go-ahead before it returns (holding the transport meanwhile).
#[derive(Debug)]
struct Stepper {
    started: Sender<()>,
    go: Arc<Mutex<Receiver<()>>>,
}

impl Stepper {
    /// A stepper nobody drives (for tests that only need a device of another kind).
    fn idle() -> Self {
        let (started, _) = channel();
        let (_, go) = channel();
        Stepper { started, go: Arc::new(Mutex::new(go)) }
    }
}

impl VirtioDevice for Stepper {
    fn device_type(&self) -> u32 {
        42 // not a real virtio device type
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        let mut served = false;
        while let Some(chain) = ctx.pop(queue).map_err(DeviceError::chain(queue))? {
            ctx.add_used(queue, chain.head, 0).map_err(DeviceError::chain(queue))?;
            ctx.signal_used(queue);
            served = true;
        }
        // A notification for work already served finds nothing (the kick raced the re-arm).
        if !served {
            return Ok(());
        }
        let _ = self.started.send(());
        let _ = self.go.lock().unwrap().recv_timeout(Duration::from_secs(10));
        Ok(())
    }
    fn state(&self) -> DeviceState {
        DeviceState::Rng(RngState { bytes_served: 0 })
    }
}

#[test]
fn interrupts_reach_the_driver_while_the_device_still_works() {
    let (started_tx, started) = channel();
    let (go, go_rx) = channel();
    let mut r = rig(Box::new(Stepper { started: started_tx, go: Arc::new(Mutex::new(go_rx)) }));
    let acked = r.driver.init(u64::MAX, 16).unwrap();
    assert!(acked & VIRTIO_F_RING_EVENT_IDX != 0, "the transport offers EVENT_IDX for any device");
    let buf = r.driver.alloc(16).unwrap();
    let head = r.driver.post_raw(0, &[(buf, 16, 0)]).unwrap();
    assert!(r.driver.kick(0).unwrap(), "the first request notifies");
    started.recv_timeout(Duration::from_secs(5)).expect("the device serves");

    // The device is still inside its serve, holding the transport. The completion and its
    // interrupt are already out, and the interrupt registers answer without waiting for it.
    assert_eq!(r.driver.used_idx(0).unwrap(), 1);
    let (tx, rx) = channel();
    let t = r.driver.transport().clone();
    let reader = std::thread::spawn(move || {
        let bus = vcore::Bus::new();
        bus.insert(0x1000, vdevices::virtio::mmio::MMIO_SIZE, Arc::new(t)).unwrap();
        let mut b = [0u8; 4];
        bus.read(0x1000 + reg::INTERRUPT_STATUS, &mut b);
        bus.write(0x1000 + reg::INTERRUPT_ACK, &b);
        tx.send(u32::from_le_bytes(b)).unwrap();
    });
    let status = rx.recv_timeout(Duration::from_secs(2)).expect("InterruptStatus blocked behind the device");
    assert_eq!(status & INT_VRING, INT_VRING);
    reader.join().unwrap();
    assert_eq!(r.driver.transport().irq_evt().read().unwrap(), 1, "one interrupt, raised mid-serve");

    // While the device works, a new request does not notify: avail_event still points at it
    // being served (the device will look again before it sleeps).
    let head2 = r.driver.post_raw(0, &[(buf, 16, 0)]).unwrap();
    assert!(!r.driver.kick(0).unwrap(), "no kick while the device has not re-armed");
    go.send(()).unwrap();
    // The transport re-arms, sees the new entry and serves it without a notification.
    started.recv_timeout(Duration::from_secs(5)).expect("served without a kick");
    go.send(()).unwrap();
    r.driver.wait_head(0, head, Duration::from_secs(5)).unwrap();
    r.driver.wait_head(0, head2, Duration::from_secs(5)).unwrap();

    // Re-armed and idle (avail_event moved past both): the next request notifies again.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while r.driver.avail_event(0).unwrap() != 2 {
        assert!(std::time::Instant::now() < deadline, "the device never re-armed");
        std::thread::sleep(Duration::from_millis(1));
    }
    let head3 = r.driver.post_raw(0, &[(buf, 16, 0)]).unwrap();
    assert!(r.driver.kick(0).unwrap(), "an idle, re-armed device asks for a notification");
    started.recv_timeout(Duration::from_secs(5)).unwrap();
    go.send(()).unwrap();
    r.driver.wait_head(0, head3, Duration::from_secs(5)).unwrap();
    assert_eq!(r.driver.kicks(), 2);
    assert!(r.driver.transport().broken().is_none());
}

#[test]
fn a_paused_transport_serves_nothing_until_resumed() {
    let mut r = rig(Box::new(vdevices::virtio::rng::Rng::new()));
    r.driver.init(u64::MAX, 16).unwrap();
    let first = r.driver.request(0, &[], &[32]).unwrap();
    assert_eq!(first.len, 32);

    r.driver.transport().pause();
    let p = r.driver.post(0, &[], &[32]).unwrap();
    r.driver.kick(0).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(r.driver.used_idx(0).unwrap(), 1, "nothing served (or written) while paused");
    let state = r.driver.transport().save();
    assert_eq!(state.queues[0].next_avail, 1, "the saved state is the paused one");

    r.driver.transport().resume();
    let c = r.driver.wait(&p, Duration::from_secs(5)).unwrap();
    assert_eq!(c.len, 32, "served after resume, from the notification that came while paused");
    assert!(r.driver.transport().broken().is_none());
}

#[test]
fn replace_device_keeps_the_queues_and_refuses_another_kind() {
    let mut r = rig(Box::new(vdevices::virtio::rng::Rng::new()));
    r.driver.init(u64::MAX, 16).unwrap();
    assert_eq!(r.driver.request(0, &[], &[16]).unwrap().len, 16);
    let t = r.driver.transport().clone();
    // Another kind of device is refused and the rng stays.
    let err = t.replace_device(|_| Ok(Box::new(Stepper::idle())));
    assert!(err.is_err());
    assert_eq!(r.driver.request(0, &[], &[16]).unwrap().len, 16);
    // A new rng built from the old one's state takes over, counters and queues carried on.
    t.replace_device(|s| {
        let DeviceState::Rng(rs) = s else { unreachable!("rng") };
        Ok(Box::new(vdevices::virtio::rng::Rng::restore((), &rs)?))
    })
    .unwrap();
    assert_eq!(r.driver.request(0, &[], &[16]).unwrap().len, 16);
    let DeviceState::Rng(rs) = t.save().device else { unreachable!() };
    assert_eq!(rs.bytes_served, 48);
    assert_eq!(t.save().queues[0].next_used, 3);
}

#[test]
fn a_device_set_pauses_saves_and_resumes_its_devices() {
    use vcore::DeviceSections;
    use vdevices::legacy::{IrqLine, LegacySerial, SerialIo, SerialSnapshot};
    use vdevices::set::{restore_device, section};
    use vdevices::testing::guest_memory;

    let mut r = rig(Box::new(vdevices::virtio::rng::Rng::new()));
    r.driver.init(u64::MAX, 16).unwrap();
    assert_eq!(r.driver.request(0, &[], &[8]).unwrap().len, 8);
    let io = SerialIo { irq: IrqLine::new().unwrap(), input: None, output: Box::new(std::io::sink()) };
    let serial = LegacySerial::new(io).unwrap();
    let mut set =
        vdevices::DeviceSet::new().virtio("rng", r.driver.transport().clone()).serial("com1", serial);

    let sections = set.pause_and_save().unwrap();
    assert_eq!(sections.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(), ["rng", "com1"]);
    // Paused: a new request waits.
    let p = r.driver.post(0, &[], &[8]).unwrap();
    r.driver.kick(0).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(r.driver.used_idx(0).unwrap(), 1);
    // The sections rebuild the devices.
    SerialSnapshot::from_bytes(section(&sections, "com1").unwrap()).unwrap();
    let t = vdevices::MmioTransport::from_section(
        guest_memory(16),
        section(&sections, "rng").unwrap(),
        restore_device,
    )
    .unwrap();
    assert_eq!(t.save().queues[0].next_used, 1);
    assert!(section(&sections, "disk").is_err());
    // Resumed: the waiting request is served.
    set.resume();
    assert_eq!(r.driver.wait(&p, Duration::from_secs(5)).unwrap().len, 8);
}
