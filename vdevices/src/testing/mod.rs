//! A virtio driver that plays the guest through the real transport (feature `test-utils`).
//!
//! [`Driver`] talks to an [`MmioTransport`] only through a `vcore` [`Bus`] (the path a vCPU's
//! MMIO exit takes): it negotiates features through the registers, lays out split queues in guest
//! memory, writes descriptor chains and the available ring, notifies through `QueueNotify`, and
//! waits for the interrupt on the transport's irqfd and for the used ring. It can also write any
//! garbage into the queues, to test that bad guests only break their own device.
//!
//! After [`Driver::set_packed`] it speaks packed virtqueues instead (virtio 1.1,
//! `VIRTIO_F_RING_PACKED`, see `packed.rs`): the same methods post, kick, reap and wait with
//! the same meaning, and only the helpers that write split-ring structures verbatim refuse.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use vcore::{Bus, GuestMemory};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::virtio::mmio::{INT_CONFIG, INT_VRING, MmioTransport, reg, status};
use crate::virtio::packed::VIRTIO_F_RING_PACKED;

/// Where the harness maps the transport on its bus.
pub const BASE: u64 = 0xd000_0000;
/// Where queue rings start in guest memory (0x4000 per queue).
pub const QUEUE_AREA: u64 = 0x10_0000;
/// Where data buffers start in guest memory.
pub const BUFFER_AREA: u64 = 0x20_0000;
/// Descriptor flag: another descriptor follows.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: device-writable buffer.
pub const DESC_F_WRITE: u16 = 2;

/// Errors the harness reports.
#[derive(Debug, thiserror::Error)]
pub enum HarnessError {
    /// The device refused the features or the setup.
    #[error("device status {0:#x} after negotiation")]
    Negotiation(u32),
    /// The device has no such queue, or it is too small.
    #[error("queue {0} is missing or too small")]
    Queue(usize),
    /// No completion in time.
    #[error("timed out waiting for {0}")]
    Timeout(&'static str),
    /// Out of descriptors or buffer memory.
    #[error("out of {0}")]
    Exhausted(&'static str),
    /// Packed virtqueues were asked for ([`Driver::set_packed`]) but the device does not offer
    /// `VIRTIO_F_RING_PACKED`.
    #[error("the device does not offer VIRTIO_F_RING_PACKED")]
    PackedNotOffered,
    /// A helper that writes split-ring structures was called on a packed queue.
    #[error("queue {0} is packed: this helper only writes split rings")]
    SplitOnly(usize),
    /// The device marked used a buffer ID that is not in flight (a device bug): the driver
    /// cannot tell how far to move on in a packed ring.
    #[error("the device used buffer ID {0}, which is not in flight")]
    UnknownId(u16),
    /// Guest memory access failed.
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    /// An OS call failed.
    #[error("os: {0}")]
    Os(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
struct DriverQueue {
    size: u16,
    desc: u64,
    avail: u64,
    used: u64,
    free: Vec<u16>,
    avail_idx: u16,
    last_used: u16,
    /// The available index at the last [`Driver::kick`].
    kicked: u16,
    /// The descriptors of each chain in flight, by head (empty when none).
    chains: Vec<Vec<u16>>,
}

/// A request posted by [`Driver::post`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pending {
    /// Queue.
    pub queue: usize,
    /// Chain head (on a packed queue: the chain's buffer ID, below the queue size).
    pub head: u16,
    /// The device-writable buffers, to read back on completion.
    pub in_bufs: Vec<(u64, u32)>,
}

/// A completed request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Completion {
    /// Bytes the device reported written.
    pub len: u32,
    /// Contents of each device-writable buffer.
    pub data: Vec<Vec<u8>>,
}

/// The guest-side driver.
#[derive(Debug)]
pub struct Driver {
    bus: Bus,
    mem: GuestMemory,
    guest: GuestView,
    transport: MmioTransport,
    queues: Vec<DriverQueue>,
    next_buf: u64,
    buf_start: u64,
    buf_end: u64,
    queue_area: u64,
    base: u64,
    done: HashMap<(usize, u16), u32>,
    epoll: Epoll,
    interrupts: u64,
    wait_poll: Duration,
    event_idx: bool,
    kicks: u64,
    /// Whether [`Driver::set_packed`] asked for packed virtqueues.
    packed_wanted: bool,
    /// The queues when `VIRTIO_F_RING_PACKED` was negotiated (`queues` is empty then, and
    /// the other way round): the split paths find no queue and hand over to the packed ones
    /// on that error path only, so split requests pay nothing for them.
    packed: Vec<PackedQueue>,
}

impl Driver {
    /// A driver for `transport` over `mem` (which must hold [`BUFFER_AREA`] and more), with the
    /// whole memory above `BUFFER_AREA` for its buffers.
    pub fn new(mem: GuestMemory, transport: MmioTransport) -> Result<Self, HarnessError> {
        Self::new_in(mem, transport, 0, u64::MAX)
    }

    /// A driver for one of several devices sharing `mem`: device `slot` sits at
    /// `BASE + slot * 0x1000`, its rings at `QUEUE_AREA + slot * 64 KiB` (up to 4 queues, 16 slots) and its buffers in
    /// `[BUFFER_AREA + slot * span, BUFFER_AREA + (slot + 1) * span)`.
    pub fn new_in(
        mem: GuestMemory,
        transport: MmioTransport,
        slot: u64,
        span: u64,
    ) -> Result<Self, HarnessError> {
        let base = BASE + slot * crate::virtio::mmio::MMIO_SIZE;
        let bus = Bus::new();
        bus.insert(base, crate::virtio::mmio::MMIO_SIZE, Arc::new(transport.clone()))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        let epoll = Epoll::new()?;
        epoll.ctl(
            ControlOperation::Add,
            transport.irq_evt().as_raw_fd(),
            EpollEvent::new(EventSet::IN, 0),
        )?;
        Ok(Driver {
            bus,
            guest: guest_view(&mem)?,
            mem,
            transport,
            queues: Vec::new(),
            next_buf: BUFFER_AREA + slot.saturating_mul(span),
            buf_start: BUFFER_AREA + slot.saturating_mul(span),
            buf_end: (BUFFER_AREA + slot.saturating_mul(span)).saturating_add(span),
            queue_area: QUEUE_AREA + slot * 0x1_0000,
            base,
            done: HashMap::new(),
            epoll,
            interrupts: 0,
            wait_poll: Duration::ZERO,
            event_idx: false,
            kicks: 0,
            packed_wanted: false,
            packed: Vec::new(),
        })
    }

    /// Keeps the driver's bookkeeping (rings, free descriptors, pending requests) but talks to a
    /// restored `transport` over restored `mem` from now on: what a guest experiences across a
    /// save and restore.
    pub fn reattach(self, mem: GuestMemory, transport: MmioTransport) -> Result<Self, HarnessError> {
        let mut d = Driver::new(mem, transport)?;
        d.bus = Bus::new();
        d.bus
            .insert(self.base, crate::virtio::mmio::MMIO_SIZE, Arc::new(d.transport.clone()))
            .map_err(|e| std::io::Error::other(e.to_string()))?;
        d.base = self.base;
        d.buf_start = self.buf_start;
        d.buf_end = self.buf_end;
        d.queue_area = self.queue_area;
        d.queues = self.queues;
        d.next_buf = self.next_buf;
        d.done = self.done;
        d.event_idx = self.event_idx;
        d.packed_wanted = self.packed_wanted;
        d.packed = self.packed;
        Ok(d)
    }

    /// The transport under test.
    pub fn transport(&self) -> &MmioTransport {
        &self.transport
    }

    /// Guest memory (the VMM's view: writes through it are marked in its dirty bitmap).
    pub fn mem(&self) -> &GuestMemory {
        &self.mem
    }

    /// Guest memory as the guest sees it (see [`GuestView`]): what the driver itself uses.
    pub fn guest(&self) -> &GuestView {
        &self.guest
    }

    /// Guest address of queue `q`'s used ring (set up by [`Driver::init`]); for a packed queue,
    /// its descriptor ring, where the device marks buffers used.
    pub fn used_ring(&self, q: usize) -> Option<u64> {
        self.queues.get(q).map(|dq| dq.used).or_else(|| self.packed.get(q).map(|pq| pq.ring))
    }

    /// Interrupts seen so far.
    pub fn interrupts(&self) -> u64 {
        self.interrupts
    }

    /// Reads a 32-bit register through the bus.
    pub fn read_reg(&self, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.bus.read(self.base + offset, &mut b);
        u32::from_le_bytes(b)
    }

    /// Writes a 32-bit register through the bus.
    pub fn write_reg(&self, offset: u64, v: u32) {
        self.bus.write(self.base + offset, &v.to_le_bytes());
    }

    /// Reads `len` bytes of device config space.
    pub fn read_config(&self, offset: u64, len: usize) -> Vec<u8> {
        let mut b = vec![0u8; len];
        self.bus.read(self.base + reg::CONFIG + offset, &mut b);
        b
    }

    /// The device features offered.
    pub fn device_features(&self) -> u64 {
        self.write_reg(reg::DEVICE_FEATURES_SEL, 0);
        let lo = self.read_reg(reg::DEVICE_FEATURES);
        self.write_reg(reg::DEVICE_FEATURES_SEL, 1);
        let hi = self.read_reg(reg::DEVICE_FEATURES);
        u64::from(lo) | (u64::from(hi) << 32)
    }

    /// Resets the device and brings it up: acknowledges `offered & wanted` features, sets up
    /// every queue with `queue_size` entries, sets `DRIVER_OK`. Returns the features acked.
    ///
    /// `VIRTIO_F_RING_PACKED` is acknowledged if and only if [`Driver::set_packed`] asked for it
    /// (whatever `wanted` says: callers that pass `u64::MAX` keep split queues), and asking for
    /// it from a device that does not offer it is [`HarnessError::PackedNotOffered`]. A packed
    /// queue takes `16 * size` bytes of ring, at most 0x3000.
    pub fn init(&mut self, wanted: u64, queue_size: u16) -> Result<u64, HarnessError> {
        self.write_reg(reg::STATUS, 0);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE);
        self.write_reg(reg::STATUS, status::ACKNOWLEDGE | status::DRIVER);
        let offered = self.device_features();
        if self.packed_wanted && offered & VIRTIO_F_RING_PACKED == 0 {
            return Err(HarnessError::PackedNotOffered);
        }
        let wanted =
            if self.packed_wanted { wanted | VIRTIO_F_RING_PACKED } else { wanted & !VIRTIO_F_RING_PACKED };
        let features = offered & wanted;
        let packed = features & VIRTIO_F_RING_PACKED != 0;
        self.event_idx = features & crate::virtio::VIRTIO_F_RING_EVENT_IDX != 0;
        self.write_reg(reg::DRIVER_FEATURES_SEL, 0);
        self.write_reg(reg::DRIVER_FEATURES, features as u32);
        self.write_reg(reg::DRIVER_FEATURES_SEL, 1);
        self.write_reg(reg::DRIVER_FEATURES, (features >> 32) as u32);
        let st = status::ACKNOWLEDGE | status::DRIVER | status::FEATURES_OK;
        self.write_reg(reg::STATUS, st);
        if self.read_reg(reg::STATUS) & status::FEATURES_OK == 0 {
            return Err(HarnessError::Negotiation(self.read_reg(reg::STATUS)));
        }
        self.queues.clear();
        self.packed.clear();
        for q in 0.. {
            self.write_reg(reg::QUEUE_SEL, q);
            let max = self.read_reg(reg::QUEUE_NUM_MAX) as u16;
            if max == 0 {
                break;
            }
            let size = queue_size.min(max);
            let base = self.queue_area + 0x4000 * u64::from(q);
            // Split: descriptor table, available ring, used ring. Packed: the descriptor ring,
            // then the driver's and the device's event suppression structures.
            let (desc, driver, device) = if packed {
                PackedQueue::layout(base, size).ok_or(HarnessError::Queue(q as usize))?
            } else {
                (base, base + 0x1000, base + 0x2000)
            };
            self.guest.write_slice(&[0u8; 0x4000], GuestAddress(base))?;
            self.write_reg(reg::QUEUE_NUM, u32::from(size));
            for (lo, hi, addr) in [
                (reg::QUEUE_DESC_LOW, reg::QUEUE_DESC_HIGH, desc),
                (reg::QUEUE_DRIVER_LOW, reg::QUEUE_DRIVER_HIGH, driver),
                (reg::QUEUE_DEVICE_LOW, reg::QUEUE_DEVICE_HIGH, device),
            ] {
                self.write_reg(lo, addr as u32);
                self.write_reg(hi, (addr >> 32) as u32);
            }
            self.write_reg(reg::QUEUE_READY, 1);
            if packed {
                self.packed.push(PackedQueue::new(size, desc, driver, device, self.event_idx));
            } else {
                self.queues.push(DriverQueue {
                    size,
                    desc,
                    avail: driver,
                    used: device,
                    free: (0..size).rev().collect(),
                    avail_idx: 0,
                    last_used: 0,
                    kicked: 0,
                    chains: vec![Vec::new(); usize::from(size)],
                });
            }
        }
        self.write_reg(reg::STATUS, st | status::DRIVER_OK);
        let s = self.read_reg(reg::STATUS);
        if s & status::DRIVER_OK == 0 || s & status::DEVICE_NEEDS_RESET != 0 {
            return Err(HarnessError::Negotiation(s));
        }
        Ok(features)
    }

    /// Allocates `len` bytes of buffer memory (16-byte aligned).
    pub fn alloc(&mut self, len: u64) -> Result<u64, HarnessError> {
        let addr = self.next_buf;
        let end = addr.checked_add(len.max(1)).ok_or(HarnessError::Exhausted("buffer memory"))?;
        if end > self.buf_end || !self.mem.address_in_range(GuestAddress(end - 1)) {
            return Err(HarnessError::Exhausted("buffer memory"));
        }
        self.next_buf = (end + 15) & !15;
        Ok(addr)
    }

    /// Allocates `len` bytes of buffer memory aligned to `align` (a power of two), as a guest
    /// driver places page-sized data buffers on pages and per-request headers on cache lines
    /// of their own.
    pub fn alloc_aligned(&mut self, len: u64, align: u64) -> Result<u64, HarnessError> {
        if !align.is_power_of_two() {
            return Err(HarnessError::Exhausted("a power-of-two alignment"));
        }
        let start = self.next_buf.checked_add(align - 1).ok_or(HarnessError::Exhausted("buffer memory"))?
            & !(align - 1);
        let saved = self.next_buf;
        self.next_buf = start;
        self.alloc(len).inspect_err(|_| self.next_buf = saved)
    }

    /// Forgets every buffer allocation (only when nothing is in flight).
    pub fn reset_buffers(&mut self) {
        self.next_buf = self.buf_start;
    }

    /// Writes descriptor `i` of queue `q` verbatim (for bad-guest tests). Split queues only:
    /// [`HarnessError::SplitOnly`] on a packed queue.
    pub fn write_desc(
        &self,
        q: usize,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) -> Result<(), HarnessError> {
        let Some(dq) = self.queues.get(q) else { return Err(self.not_split(q)) };
        // One 16-byte store, as a guest writes a descriptor (not four accesses).
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.guest.write_slice(&d, GuestAddress(dq.desc + 16 * u64::from(i)))?;
        Ok(())
    }

    /// Writes `head` into the next available slot and publishes it (for bad-guest tests).
    /// Split queues only: [`HarnessError::SplitOnly`] on a packed queue.
    pub fn publish(&mut self, q: usize, head: u16) -> Result<(), HarnessError> {
        let Some(dq) = self.queues.get_mut(q) else { return Err(self.not_split(q)) };
        let slot = dq.avail_idx % dq.size;
        self.guest.write_obj(head, GuestAddress(dq.avail + 4 + 2 * u64::from(slot)))?;
        dq.avail_idx = dq.avail_idx.wrapping_add(1);
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        self.guest.write_obj(dq.avail_idx, GuestAddress(dq.avail + 2))?;
        Ok(())
    }

    /// Sets the available index to any value (for bad-guest tests). Split queues only:
    /// [`HarnessError::SplitOnly`] on a packed queue.
    pub fn set_avail_idx(&mut self, q: usize, idx: u16) -> Result<(), HarnessError> {
        let Some(dq) = self.queues.get_mut(q) else { return Err(self.not_split(q)) };
        dq.avail_idx = idx;
        self.guest.write_obj(idx, GuestAddress(dq.avail + 2))?;
        Ok(())
    }

    /// Posts a chain of device-readable buffers with `out` contents followed by device-writable
    /// buffers of `in_lens` bytes; publishes it in the available ring (no notification).
    pub fn post(&mut self, q: usize, out: &[&[u8]], in_lens: &[u32]) -> Result<Pending, HarnessError> {
        let mut bufs = Vec::new();
        for o in out {
            let a = self.alloc(o.len() as u64)?;
            self.guest.write_slice(o, GuestAddress(a))?;
            bufs.push((a, o.len() as u32, 0u16));
        }
        let mut in_bufs = Vec::new();
        for &l in in_lens {
            let a = self.alloc(u64::from(l))?;
            self.guest.write_slice(&vec![0xaa; l as usize], GuestAddress(a))?;
            bufs.push((a, l, DESC_F_WRITE));
            in_bufs.push((a, l));
        }
        let head = self.post_raw(q, &bufs)?;
        Ok(Pending { queue: q, head, in_bufs })
    }

    /// Posts a chain of `(addr, len, flags)` buffers already in memory; returns its head. On a
    /// packed queue it returns the chain's buffer ID instead (below the queue size, like a
    /// head, so tables indexed by head work unchanged), and `flags` keep their meaning
    /// ([`DESC_F_WRITE`]; the driver sets the chaining and availability bits).
    pub fn post_raw(&mut self, q: usize, bufs: &[(u64, u32, u16)]) -> Result<u16, HarnessError> {
        let Some(dq) = self.queues.get_mut(q) else { return self.post_raw_packed(q, bufs) };
        if bufs.is_empty() || dq.free.len() < bufs.len() {
            return Err(HarnessError::Exhausted("descriptors"));
        }
        // The chain's descriptor list reuses the allocation of the head's previous chain.
        let head = *dq.free.last().ok_or(HarnessError::Exhausted("descriptors"))?;
        let mut idx = std::mem::take(&mut dq.chains[usize::from(head)]);
        idx.clear();
        idx.extend((0..bufs.len()).filter_map(|_| dq.free.pop()));
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let last = k + 1 == bufs.len();
            let flags = if last { flags } else { flags | DESC_F_NEXT };
            let next = if last { 0 } else { idx[k + 1] };
            self.write_desc(q, idx[k], addr, len, flags, next)?;
        }
        if let Some(dq) = self.queues.get_mut(q) {
            dq.chains[usize::from(head)] = idx;
        }
        self.publish(q, head)?;
        Ok(head)
    }

    /// Notifies queue `q` through the `QueueNotify` register, unconditionally.
    pub fn notify(&self, q: usize) {
        self.write_reg(reg::QUEUE_NOTIFY, q as u32);
    }

    /// Notifies queue `q` only if the device asked for it, as Linux's `virtqueue_kick` does:
    /// with `VIRTIO_F_RING_EVENT_IDX` when the entries published since the last kick pass the
    /// device's `avail_event`, otherwise unless the device set `VRING_USED_F_NO_NOTIFY`.
    /// Returns whether it notified. A device that never re-arms `avail_event` stops hearing
    /// from this driver (and from Linux) after its first request. On a packed queue it reads
    /// the device's event suppression structure instead (see `packed.rs`).
    pub fn kick(&mut self, q: usize) -> Result<bool, HarnessError> {
        let Some(dq) = self.queues.get_mut(q) else { return self.kick_packed(q) };
        // The avail index must be visible before the device's suppression state is read.
        std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
        let (old, new) = (dq.kicked, dq.avail_idx);
        dq.kicked = new;
        let need = if self.event_idx {
            let event = self.avail_event(q)?;
            // vring_need_event(event, new, old)
            new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
        } else {
            let flags: u16 = self.guest.read_obj(GuestAddress(dq.used))?;
            flags & 1 == 0 && new != old
        };
        if need {
            self.kicks += 1;
            self.notify(q);
        }
        Ok(need)
    }

    /// The device's `avail_event` for queue `q` (where it asked to be notified next). Split
    /// queues only: [`HarnessError::SplitOnly`] on a packed queue.
    pub fn avail_event(&self, q: usize) -> Result<u16, HarnessError> {
        let Some(dq) = self.queues.get(q) else { return Err(self.not_split(q)) };
        Ok(self.guest.read_obj(GuestAddress(dq.used + 4 + 8 * u64::from(dq.size)))?)
    }

    /// Notifications [`Driver::kick`] sent so far.
    pub fn kicks(&self) -> u64 {
        self.kicks
    }

    /// The error for a split-only helper called for queue `q`: it is packed, or missing.
    #[cold]
    fn not_split(&self, q: usize) -> HarnessError {
        if q < self.packed.len() { HarnessError::SplitOnly(q) } else { HarnessError::Queue(q) }
    }
}

mod completion;
mod memory;
pub mod netns;
mod packed;

use memory::guest_view;
pub use memory::{GuestView, copy_memory, guest_memory};
use packed::PackedQueue;
