//! The virtio-mmio transport (virtio 1.x, MMIO version 2) as a `vcore` [`BusDevice`].
//!
//! Register accesses come from vCPU threads (or the test harness); queue notifications arrive on
//! one [`EventFd`] per queue — written by KVM through an ioeventfd on `QueueNotify`, or by the
//! transport itself when the write reaches the bus — and are served by the transport's
//! `event-manager` subscriber on the event loop thread. Interrupts go out through one `EventFd`
//! that is an irqfd in a KVM VM and a plain event the harness waits on otherwise.

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU32, Ordering, fence};
use std::sync::{Arc, Mutex, MutexGuard};

use event_manager::{EventOps, EventSet, EventSubscriber, Events};
use kvm_ioctls::IoEventAddress;
use serde::{Deserialize, Serialize};
use vcore::{BusDevice, GuestMemory, Snapshot, StateError};
use virtio_queue::{Queue, QueueState, QueueT};
use vm_memory::{Bytes as _, GuestAddress};
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::ctx::{Irq, Starved};
use super::packed::{PackedQueue, PackedRing, VIRTIO_F_RING_PACKED};
use super::{DeviceError, DeviceState, QueueCtx, VIRTIO_F_VERSION_1, VirtioDevice};

/// Size of one virtio-mmio device's register window.
pub const MMIO_SIZE: u64 = 0x1000;
/// "virt" in little endian.
pub const MMIO_MAGIC: u32 = 0x7472_6976;
/// The MMIO transport version implemented (virtio 1.x).
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest ("VINF").
pub const VENDOR_ID: u32 = 0x464e_4956;

/// Register offsets.
#[allow(missing_docs)]
pub mod reg {
    pub const MAGIC: u64 = 0x000;
    pub const VERSION: u64 = 0x004;
    pub const DEVICE_ID: u64 = 0x008;
    pub const VENDOR_ID: u64 = 0x00c;
    pub const DEVICE_FEATURES: u64 = 0x010;
    pub const DEVICE_FEATURES_SEL: u64 = 0x014;
    pub const DRIVER_FEATURES: u64 = 0x020;
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    pub const QUEUE_SEL: u64 = 0x030;
    pub const QUEUE_NUM_MAX: u64 = 0x034;
    pub const QUEUE_NUM: u64 = 0x038;
    pub const QUEUE_READY: u64 = 0x044;
    pub const QUEUE_NOTIFY: u64 = 0x050;
    pub const INTERRUPT_STATUS: u64 = 0x060;
    pub const INTERRUPT_ACK: u64 = 0x064;
    pub const STATUS: u64 = 0x070;
    pub const QUEUE_DESC_LOW: u64 = 0x080;
    pub const QUEUE_DESC_HIGH: u64 = 0x084;
    pub const QUEUE_DRIVER_LOW: u64 = 0x090;
    pub const QUEUE_DRIVER_HIGH: u64 = 0x094;
    pub const QUEUE_DEVICE_LOW: u64 = 0x0a0;
    pub const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
    pub const CONFIG_GENERATION: u64 = 0x0fc;
    pub const CONFIG: u64 = 0x100;
}

/// Device status bits.
#[allow(missing_docs)]
pub mod status {
    pub const ACKNOWLEDGE: u32 = 1;
    pub const DRIVER: u32 = 2;
    pub const DRIVER_OK: u32 = 4;
    pub const FEATURES_OK: u32 = 8;
    pub const DEVICE_NEEDS_RESET: u32 = 64;
    pub const FAILED: u32 = 128;
}

/// `InterruptStatus` bit: a used buffer was added.
pub const INT_VRING: u32 = 1;
/// `InterruptStatus` bit: the configuration changed (or the device broke).
pub const INT_CONFIG: u32 = 2;

/// Serve rounds of one queue per notification before the event loop gets a turn.
const MAX_ROUNDS: u32 = 16;

/// What one serve left behind, as masks of queues.
#[derive(Debug, Default, Clone, Copy)]
struct Served {
    /// Queues with entries the device has not popped.
    pending: u64,
    /// Queues the device waits on for more buffers, where some arrived after it looked.
    fresh: u64,
}

/// With `VIRTIO_F_RING_EVENT_IDX`, moves `avail_event` to `seen` (the avail index a waiting
/// device saw), so the driver notifies on the next buffer it adds; then tells whether one was
/// added already (its notification may have been suppressed by the old `avail_event`).
fn buffers_since(queue: &Queue, mem: &GuestMemory, seen: u16) -> Result<bool, String> {
    if queue.event_idx_enabled() {
        let at = queue
            .used_ring()
            .checked_add(4 + 8 * u64::from(queue.size()))
            .ok_or_else(|| "used ring address overflows".to_string())?;
        mem.store(seen.to_le(), GuestAddress(at), Ordering::SeqCst).map_err(|e| e.to_string())?;
    }
    fence(Ordering::SeqCst);
    let now = queue.avail_idx(mem, Ordering::Acquire).map_err(|e| e.to_string())?;
    Ok(now.0 != seen)
}

/// Event data of backend fds starts here (queue events use the queue index).
const BACKEND_DATA: u32 = 0x1_0000;

/// Errors of creating, attaching and restoring a transport.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// An event fd could not be created.
    #[error("creating an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The device could not be placed on the MMIO bus.
    #[error("placing the device on the MMIO bus")]
    Bus(#[from] vcore::BusError),
    /// Registering the ioeventfd or irqfd with KVM failed.
    #[error("registering {what} with KVM")]
    Kvm {
        /// Which registration.
        what: &'static str,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Counters of one transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TransportStats {
    /// Queue notifications served.
    pub notifications: u64,
    /// Interrupts raised.
    pub interrupts: u64,
}

#[derive(Debug)]
struct Inner {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    queues: Vec<Queue>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    config_generation: u32,
    activated: bool,
    /// Host-side pause (see [`MmioTransport::pause`]); not part of the device state.
    paused: bool,
    broken: Option<String>,
    stats: TransportStats,
    /// Whether `VIRTIO_F_RING_PACKED` is offered ([`MmioTransport::offer_packed`]).
    offer_packed: bool,
    /// The packed rings, built at `DRIVER_OK` when the driver negotiated them.
    packed: Option<Vec<PackedQueue>>,
    /// Queues the device waits on for more buffers (see [`MmioTransport::rearm`]).
    starved: Vec<Starved>,
}

#[derive(Debug)]
struct Shared {
    inner: Mutex<Inner>,
    /// `InterruptStatus`, outside the lock: the driver's interrupt handler reads and
    /// acknowledges it while the device thread may hold the lock for a long batch of I/O.
    interrupt_status: AtomicU32,
    queue_evts: Vec<EventFd>,
    irq_evt: EventFd,
}

/// A virtio device behind virtio-mmio registers. Cheap to clone (all clones are one device).
#[derive(Debug, Clone)]
pub struct MmioTransport {
    shared: Arc<Shared>,
}

fn eventfd() -> Result<EventFd, TransportError> {
    EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)
}

impl MmioTransport {
    /// Puts `device` behind a new transport over guest memory `mem`.
    pub fn new(mem: GuestMemory, device: Box<dyn VirtioDevice>) -> Result<Self, TransportError> {
        let queues = super::new_queues(device.queue_max_sizes());
        let queue_evts = queues.iter().map(|_| eventfd()).collect::<Result<Vec<_>, _>>()?;
        let inner = Inner {
            device,
            mem,
            queues,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            config_generation: 0,
            activated: false,
            paused: false,
            broken: None,
            stats: TransportStats::default(),
            offer_packed: false,
            packed: None,
            starved: Vec::new(),
        };
        Ok(MmioTransport {
            shared: Arc::new(Shared {
                inner: Mutex::new(inner),
                interrupt_status: AtomicU32::new(0),
                queue_evts,
                irq_evt: eventfd()?,
            }),
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.shared.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The event fd of queue `q`'s notifications (the ioeventfd), if the queue exists.
    pub fn queue_evt(&self, q: usize) -> Option<&EventFd> {
        self.shared.queue_evts.get(q)
    }

    /// The interrupt event fd (the irqfd).
    pub fn irq_evt(&self) -> &EventFd {
        &self.shared.irq_evt
    }

    /// Places the transport on `vm`'s MMIO bus at `base`, notifications through ioeventfds and
    /// interrupts through an irqfd on `gsi`.
    pub fn attach(&self, vm: &vcore::Vm, base: u64, gsi: u32) -> Result<(), TransportError> {
        for (q, evt) in self.shared.queue_evts.iter().enumerate() {
            let addr = IoEventAddress::Mmio(base + reg::QUEUE_NOTIFY);
            vm.vm_fd()
                .register_ioevent(evt, &addr, q as u32)
                .map_err(|source| TransportError::Kvm { what: "the QueueNotify ioeventfd", source })?;
        }
        vm.vm_fd()
            .register_irqfd(&self.shared.irq_evt, gsi)
            .map_err(|source| TransportError::Kvm { what: "the irqfd", source })?;
        vm.mmio_bus().insert(base, MMIO_SIZE, Arc::new(self.clone()))?;
        Ok(())
    }

    /// The device status register.
    pub fn status(&self) -> u32 {
        self.lock().status
    }

    /// Why the device is broken (a guest protocol violation), if it is.
    pub fn broken(&self) -> Option<String> {
        self.lock().broken.clone()
    }

    /// Whether the driver has set `DRIVER_OK` and the device is serving its queues.
    pub fn activated(&self) -> bool {
        self.lock().activated
    }

    /// Counters.
    pub fn stats(&self) -> TransportStats {
        self.lock().stats
    }

    /// The virtio device type behind the transport.
    pub fn device_type(&self) -> u32 {
        self.lock().device.device_type()
    }

    /// Runs `f` on the device (for embedder-side controls such as the balloon target).
    pub fn with_device<R>(&self, f: impl FnOnce(&mut dyn VirtioDevice) -> R) -> R {
        let mut inner = self.lock();
        let r = f(inner.device.as_mut());
        self.after_work(&mut inner, false);
        r
    }

    /// Tells the guest the config space changed, if the device says it did (bumps the config
    /// generation and raises a configuration-change interrupt).
    pub fn config_changed(&self) {
        let mut inner = self.lock();
        self.after_work(&mut inner, false);
    }

    /// Swaps the device behind the transport for the one `make` builds from the current
    /// device's state. It happens between two serves, so no request is in flight (devices serve
    /// synchronously under the transport's lock), and the guest keeps its queues, negotiated
    /// features and pending interrupts: it sees nothing. Storage vMotion switches a disk to its
    /// mirror this way. If `make` fails, or builds a device of another type or queue layout, the
    /// old device stays.
    pub fn replace_device(
        &self,
        make: impl FnOnce(DeviceState) -> Result<Box<dyn VirtioDevice>, StateError>,
    ) -> Result<(), StateError> {
        let mut inner = self.lock();
        let mut new = make(inner.device.state())?;
        let bad = |reason: String| StateError::Device { device: "virtio-mmio".into(), reason };
        if new.device_type() != inner.device.device_type()
            || new.queue_max_sizes() != inner.device.queue_max_sizes()
        {
            return Err(bad("the new device differs in type or queues".into()));
        }
        if inner.driver_features & !(new.features() | super::VIRTIO_F_RING_EVENT_IDX) != 0 {
            return Err(bad("the new device lacks features the driver acknowledged".into()));
        }
        if inner.activated {
            new.activate(inner.driver_features).map_err(|e| bad(e.to_string()))?;
        }
        inner.device = new;
        Ok(())
    }

    /// Stops the device's own work: from when this returns (after any serve in progress), the
    /// device serves nothing and writes nothing into guest memory until
    /// [`MmioTransport::resume`]; notifications that arrive meanwhile are served then. A
    /// migration pauses the devices right after the vCPUs, so that the last memory pass carries
    /// everything they wrote and the state saved afterwards is final.
    pub fn pause(&self) {
        self.lock().paused = true;
    }

    /// Undoes [`MmioTransport::pause`] and serves what arrived meanwhile.
    pub fn resume(&self) {
        self.lock().paused = false;
        self.serve_pending();
    }

    /// Serves work that arrived while nobody served it: the event loop takes the queues (their
    /// events are set); backend fds are edge-triggered, so they are looked at now.
    fn serve_pending(&self) {
        self.kick_queues(u64::MAX);
        let backends = self.lock().device.backend_fds().len();
        for i in 0..backends {
            self.process_backend(i);
        }
    }

    /// Serves queue `q` now, on the calling thread (what the event loop does on a notification).
    pub fn process_queue(&self, q: usize) {
        let mut inner = self.lock();
        inner.stats.notifications += 1;
        for round in 1.. {
            let before = Self::avail_pos(&inner, q);
            let served = self.serve(&mut inner, |dev, ctx| dev.process_queue(q, ctx));
            self.kick_queues(served.fresh & !(1 << q));
            // Requests the driver published while we served did not notify (avail_event was
            // behind them): serve them now. A queue whose device took nothing this round (an rx
            // queue waiting for data) is left for its backend, unless the device waits for more
            // buffers and some arrived.
            let progressed = Self::avail_pos(&inner, q) != before;
            let again = served.fresh & (1 << q) != 0 || (served.pending & (1 << q) != 0 && progressed);
            if !again {
                break;
            }
            // A driver that never lets the queue run dry must not keep the other devices of the
            // event loop waiting: come back through the loop (the eventfd stays set).
            if round == MAX_ROUNDS {
                if let Some(evt) = self.shared.queue_evts.get(q) {
                    let _ = evt.write(1);
                }
                break;
            }
        }
    }

    /// Where the device is in queue `q`'s available buffers (a packed ring's position and wrap
    /// counter, or a split ring's index).
    fn avail_pos(inner: &Inner, q: usize) -> Option<(u16, bool)> {
        match &inner.packed {
            Some(p) => p.get(q).map(|p| (p.ring.next_avail, p.ring.avail_wrap)),
            None => inner.queues.get(q).map(|x| (x.next_avail(), false)),
        }
    }

    /// Offers `VIRTIO_F_RING_PACKED` (virtio 1.1 packed virtqueues) to drivers that negotiate
    /// from now on. Off by default, as in QEMU (`packed=off`): the packed path is verified with
    /// the test driver only, not yet with a Linux guest on hardware KVM.
    pub fn offer_packed(&self, on: bool) {
        self.lock().offer_packed = on;
    }

    /// Serves the device's backend fd number `index` now.
    pub fn process_backend(&self, index: usize) {
        let mut inner = self.lock();
        let served = self.serve(&mut inner, |dev, ctx| dev.process_backend(index, ctx));
        self.kick_queues(served.fresh);
    }

    /// Has the event loop serve the queues in `mask`.
    fn kick_queues(&self, mask: u64) {
        for (q, evt) in self.shared.queue_evts.iter().enumerate() {
            if mask & (1 << q) != 0 {
                let _ = evt.write(1);
            }
        }
    }

    /// Runs `work` on the device, raises the interrupts it calls for and re-arms every ready
    /// queue's notifications.
    fn serve(
        &self,
        inner: &mut Inner,
        work: impl FnOnce(&mut dyn VirtioDevice, &mut QueueCtx<'_>) -> Result<(), DeviceError>,
    ) -> Served {
        if inner.paused || !inner.activated || inner.broken.is_some() {
            return Served::default();
        }
        let Inner { device, mem, queues, stats, packed, .. } = inner;
        let irq = self.irq(stats);
        let mut ctx = QueueCtx::with_irq(mem, queues, packed.as_deref_mut(), irq);
        let res = work(device.as_mut(), &mut ctx);
        let notify = ctx.finish();
        // A queue the device took buffers from without running short again has what it
        // waited for; one it ran short on now waits from where it saw the ring end.
        let popped = ctx.popped_mask();
        let reported = ctx.starved().to_vec();
        inner.starved.retain(|st| popped & (1 << st.q) == 0 && !reported.iter().any(|r| r.q == st.q));
        inner.starved.extend(reported);
        if let Err(e) = res {
            let mut msg = e.to_string();
            let mut src = std::error::Error::source(&e);
            while let Some(s) = src {
                msg.push_str(": ");
                msg.push_str(&s.to_string());
                src = s.source();
            }
            inner.broken = Some(msg);
            inner.status |= status::DEVICE_NEEDS_RESET;
            self.raise(inner, INT_CONFIG);
        }
        self.after_work(inner, notify);
        Self::rearm(inner)
    }

    /// Asks the driver to notify again for what it publishes next: with
    /// `VIRTIO_F_RING_EVENT_IDX` this moves `avail_event` to where the device stopped (without
    /// it, notifications are never suppressed). A driver that honours `avail_event`, as Linux
    /// does, notifies only for entries past it, so a device that skipped this would hear nothing
    /// after its first request. A queue the device waits on for more buffers (`starved`, with
    /// where it saw the ring end) asks for a notification on the very next buffer instead, at
    /// every serve until the device takes buffers from it again: a serve of another queue must
    /// not move its `avail_event` back to where the device stopped, or the driver would not
    /// notify for the buffer the device waits for.
    fn rearm(inner: &mut Inner) -> Served {
        let mut served = Served::default();
        if !inner.activated || inner.broken.is_some() {
            return served;
        }
        let Inner { queues, packed, mem, starved, .. } = inner;
        for (q, queue) in queues.iter_mut().enumerate() {
            if !queue.ready() || starved.iter().any(|st| st.q == q) {
                continue;
            }
            // A ring outside guest memory fails here and again at the next pop, which breaks
            // the device with the reason.
            let more = match packed.as_deref_mut() {
                Some(p) => p.get_mut(q).is_some_and(|p| p.ring.enable_notification(mem).unwrap_or(false)),
                None => queue.enable_notification(mem).unwrap_or(false),
            };
            if more {
                served.pending |= 1 << q;
            }
        }
        for st in starved.iter() {
            let Some(queue) = queues.get(st.q).filter(|x| x.ready()) else { continue };
            let fresh = match packed.as_deref_mut() {
                Some(p) => p
                    .get_mut(st.q)
                    .is_some_and(|p| p.ring.notify_on_any(mem, st.at, st.wrap).unwrap_or(false)),
                None => buffers_since(queue, mem, st.at).unwrap_or(false),
            };
            if fresh {
                served.fresh |= 1 << st.q;
            }
        }
        served
    }

    /// Raises what the device's work calls for: the configuration interrupt if it changed its
    /// configuration, the used-buffer interrupt if `notify` (a queue's driver asked for one).
    fn after_work(&self, inner: &mut Inner, notify: bool) {
        if inner.device.take_config_changed() {
            inner.config_generation = inner.config_generation.wrapping_add(1);
            self.raise(inner, INT_CONFIG);
        }
        if notify {
            self.raise(inner, INT_VRING);
        }
    }

    fn raise(&self, inner: &mut Inner, bits: u32) {
        self.irq(&mut inner.stats).raise(bits);
    }

    /// The interrupt (counted in `stats`), as devices also raise it while they serve.
    fn irq<'a>(&'a self, stats: &'a mut TransportStats) -> Irq<'a> {
        Irq {
            status: &self.shared.interrupt_status,
            evt: &self.shared.irq_evt,
            raised: &mut stats.interrupts,
        }
    }
}

impl EventSubscriber for MmioTransport {
    fn init(&self, ops: &mut EventOps) {
        for (q, evt) in self.shared.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, q as u32, EventSet::IN)) {
                self.lock().broken = Some(format!("watching queue {q}: {e}"));
            }
        }
        let fds = self.lock().device.backend_fds();
        for (i, fd) in fds.into_iter().enumerate() {
            let set = EventSet::IN | EventSet::EDGE_TRIGGERED;
            if let Err(e) = ops.add(Events::with_data_raw(fd, BACKEND_DATA + i as u32, set)) {
                self.lock().broken = Some(format!("watching backend fd {i}: {e}"));
            }
        }
        // Work that arrived while nobody watched (after a restore, say) is served now.
        if self.activated() {
            self.serve_pending();
        }
    }

    fn process(&self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if data >= BACKEND_DATA {
            self.process_backend((data - BACKEND_DATA) as usize);
        } else if let Some(evt) = self.shared.queue_evts.get(data as usize)
            && evt.read().is_ok()
        {
            self.process_queue(data as usize);
        }
    }
}

impl AsRawFd for MmioTransport {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.shared.irq_evt.as_raw_fd()
    }
}

mod bus;
mod state;
pub use state::{DEVICE_STATE, DEVICE_STATE_VERSION, QueueSnapshot, TransportArgs, TransportState};
