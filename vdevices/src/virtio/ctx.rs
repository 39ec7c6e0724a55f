//! What a device sees of its queues while it serves them ([`QueueCtx`]), and how its used
//! entries reach the driver.
//!
//! Used entries are written as the device completes requests, but the used index is published
//! once per batch ([`QueueCtx::signal_used`], or when the device returns): the driver polls that
//! index, so every store to it moves its cache line to the device's core and back. Writes the
//! device makes to the rings and, through [`QueueCtx::write_deferred`], to small buffers such as
//! status bytes are marked in the VMM's dirty bitmap when they are published, all at once: each
//! mark is a locked instruction, which waits for every store before it to reach the cache, so
//! one mark per store made the device wait for each of the driver's cache lines in turn.
//!
//! A page is marked after it is written and before the device returns to the event loop, which
//! is all migration needs: a pass that read the page before the mark sends it again after, and
//! the last pass runs with the device paused.

use std::num::Wrapping;
use std::sync::atomic::{Ordering, fence};

use vcore::GuestMemory;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::chain::{Chain, ChainError, Rings, pop_into};
use super::packed::{PackedPos, PackedQueue};

/// How many queues a [`QueueCtx`] tracks with fixed-size state (the avail index read last, the
/// used index last signalled). Queues past these work, only less efficiently (see the fields).
const TRACKED: usize = 8;

/// How many [`QueueCtx::write_deferred`] writes wait for their mark before they are marked.
const MARKS: usize = 32;

/// What a device sees of its queues while serving them.
#[derive(Debug)]
pub struct QueueCtx<'a> {
    mem: &'a GuestMemory,
    queues: &'a mut [Queue],
    used: u64,
    irq: Irq<'a>,
    /// Queues whose buffers were too few, with where the device had seen the ring end.
    starved: Vec<Starved>,
    /// The packed rings, when the driver negotiated `VIRTIO_F_RING_PACKED` (then `queues` only
    /// hold the registers).
    packed: Option<&'a mut [PackedQueue]>,
    /// Chains popped from packed rings in this serve: queue, buffer ID, where the ring stood
    /// (for [`QueueCtx::unpop`]).
    packed_popped: Vec<(usize, u16, PackedPos)>,
    /// Queues the device took a chain from.
    popped: u64,
    /// What popping keeps per queue (see [`pop_into`]); queues past the 8th start afresh
    /// every time.
    rings: [Rings<'a>; TRACKED],
    /// Per queue, the used index when the driver's `used_event` was last checked (the Linux
    /// driver's `num_added` logic); queues past the 8th interrupt for every batch.
    told: [Wrapping<u16>; TRACKED],
    /// Queues with used entries written but the used index not yet published.
    unpublished: u64,
    /// Guest ranges written by [`QueueCtx::write_deferred`] and not marked dirty yet.
    marks: [(u64, u32); MARKS],
    /// How many of `marks` are in use.
    n_marks: usize,
}

/// A queue the device waits on for more buffers ([`QueueCtx::wait_for_buffers`]): where it saw
/// the ring end (a split ring's avail index; a packed ring's first unavailable descriptor and
/// its wrap counter).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Starved {
    /// The queue.
    pub q: usize,
    /// Avail index (split) or descriptor position (packed).
    pub at: u16,
    /// The wrap counter at `at` (packed only).
    pub wrap: bool,
}

/// The transport's interrupt, for [`QueueCtx::signal_used`].
#[derive(Debug)]
pub(crate) struct Irq<'a> {
    /// The transport's `InterruptStatus`.
    pub status: &'a std::sync::atomic::AtomicU32,
    /// The irqfd.
    pub evt: &'a vmm_sys_util::eventfd::EventFd,
    /// The transport's interrupt counter.
    pub raised: &'a mut u64,
}

impl Irq<'_> {
    /// Sets `bits` in `InterruptStatus`, counts the interrupt and signals the irqfd.
    pub(crate) fn raise(&mut self, bits: u32) {
        self.status.fetch_or(bits, Ordering::AcqRel);
        *self.raised += 1;
        // A full eventfd counter only means the interrupt is already pending.
        let _ = self.evt.write(1);
    }
}

pub(super) use crate::sys::unmarked;

/// Marks `len` bytes at `addr` dirty in the VMM's bitmap (nothing outside guest memory).
pub(super) fn mark(mem: &GuestMemory, addr: u64, len: usize) {
    if let Ok(s) = mem.get_slice(GuestAddress(addr), len) {
        s.bitmap().mark_dirty(0, len);
    }
}

/// The queue numbers set in `mask`, lowest first.
fn bits(mut mask: u64) -> impl Iterator<Item = usize> {
    std::iter::from_fn(move || {
        (mask != 0).then(|| {
            let q = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            q
        })
    })
}

/// Linux's `vring_need_event`: whether moving the used (or available) index from `old` to
/// `new` passed `event`, the index the other side asked to hear about.
pub(super) fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The bytes of `queue`'s used ring: flags, index, the entries and `avail_event`.
fn used_ring_len(queue: &Queue) -> usize {
    6 + 8 * usize::from(queue.size())
}

impl<'a> QueueCtx<'a> {
    /// A context over `queues` in `mem` that can raise the used-buffer interrupt while the
    /// device works.
    pub(crate) fn with_irq(
        mem: &'a GuestMemory,
        queues: &'a mut [Queue],
        packed: Option<&'a mut [PackedQueue]>,
        irq: Irq<'a>,
    ) -> Self {
        let mut told = [Wrapping(0); TRACKED];
        for (t, q) in told.iter_mut().zip(queues.iter()) {
            *t = Wrapping(q.next_used());
        }
        QueueCtx {
            mem,
            queues,
            used: 0,
            irq,
            starved: Vec::new(),
            packed,
            packed_popped: Vec::new(),
            popped: 0,
            rings: std::array::from_fn(|_| Rings::default()),
            told,
            unpublished: 0,
            marks: [(0, 0); MARKS],
            n_marks: 0,
        }
    }
    /// Publishes the used entries added to queue `q` so far and interrupts the driver for them
    /// now, if it asked for it (`used_event`), instead of when the device has served
    /// everything: a driver then reaps and posts new requests while the device goes on with the
    /// rest. The transport publishes and signals what is left when the device returns.
    pub fn signal_used(&mut self, q: usize) {
        self.publish_used(q);
        if self.needs_notification(q) {
            self.irq.raise(crate::virtio::mmio::INT_VRING);
        }
    }
    /// Guest memory.
    pub fn mem(&self) -> &'a GuestMemory {
        self.mem
    }
    /// The next chain of queue `q`, validated; `Ok(None)` when there is none.
    pub fn pop(&mut self, q: usize) -> Result<Option<Chain>, ChainError> {
        let mut chain = Chain { head: 0, descs: Vec::with_capacity(4) };
        Ok(self.pop_into(q, &mut chain)?.then_some(chain))
    }
    /// [`QueueCtx::pop`] into `chain`, reusing its buffer list: `Ok(false)` (and `chain`
    /// emptied) when there is none.
    pub fn pop_into(&mut self, q: usize, chain: &mut Chain) -> Result<bool, ChainError> {
        if self.packed.is_some() {
            return self.pop_packed(q, chain);
        }
        let mut fresh = Rings::default();
        let rings = self.rings.get_mut(q).unwrap_or(&mut fresh);
        let head = match self.queues.get_mut(q) {
            Some(queue) => pop_into(queue, self.mem, rings, &mut chain.descs)?,
            None => {
                chain.descs.clear();
                None
            }
        };
        chain.head = head.unwrap_or(0);
        if head.is_some() {
            self.popped |= 1 << q;
        }
        Ok(head.is_some())
    }
    /// [`QueueCtx::pop_into`] on a packed ring: the chain's `head` is its buffer ID.
    fn pop_packed(&mut self, q: usize, chain: &mut Chain) -> Result<bool, ChainError> {
        let p = self.packed.as_deref_mut().and_then(|p| p.get_mut(q));
        let Some(p) = p.filter(|_| self.queues.get(q).is_some_and(|x| x.ready())) else {
            chain.descs.clear();
            return Ok(false);
        };
        let Some(before) = p.pop(self.mem, chain)? else { return Ok(false) };
        self.packed_popped.push((q, chain.head, before));
        self.popped |= 1 << q;
        Ok(true)
    }
    /// Says that the device leaves queue `q`'s buffers unused because they are too few for what
    /// it must deliver (a frame that needs more receive buffers than the ring holds). Call it
    /// after popping up to the end of the ring and before putting the chains back
    /// ([`QueueCtx::unpop`]). The transport then asks the driver to notify on the very next
    /// buffer it adds (with `VIRTIO_F_RING_EVENT_IDX`, `avail_event` goes to the avail index the
    /// device saw, not to where it stopped), and serves the queue again if one arrived meanwhile.
    pub fn wait_for_buffers(&mut self, q: usize) {
        if let Some(p) = self.packed.as_deref().and_then(|p| p.get(q)) {
            self.starved.push(Starved { q, at: p.ring.next_avail, wrap: p.ring.avail_wrap });
        } else if let Some(queue) = self.queues.get(q) {
            self.starved.push(Starved { q, at: queue.next_avail(), wrap: false });
        }
    }
    /// The queues the device is waiting on ([`QueueCtx::wait_for_buffers`]).
    pub(crate) fn starved(&self) -> &[Starved] {
        &self.starved
    }
    /// Puts the last popped chain of queue `q` back (it will be popped again).
    pub fn unpop(&mut self, q: usize) {
        if let Some(p) = self.packed.as_deref_mut() {
            let Some(k) = self.packed_popped.iter().rposition(|&(pq, _, _)| pq == q) else { return };
            let (_, id, before) = self.packed_popped.remove(k);
            if let Some(pq) = p.get_mut(q) {
                pq.unpop(id, before);
            }
        } else if let Some(queue) = self.queues.get_mut(q) {
            queue.go_to_previous_position();
        }
    }
    /// Returns chain `head` to the driver with `len` bytes written. The driver sees it once the
    /// used index is published ([`QueueCtx::signal_used`], or when the device returns).
    pub fn add_used(&mut self, q: usize, head: u16, len: u32) -> Result<(), ChainError> {
        let mem = self.mem;
        if let Some(p) = self.packed.as_deref_mut() {
            // A packed ring's used descriptor is visible to the driver at once; the ring is
            // marked dirty when published, as a split ring is.
            p.get_mut(q).ok_or(ChainError::BadHead)?.complete(mem, head, len)?;
            self.used |= 1 << q;
            self.unpublished |= 1 << q;
            return Ok(());
        }
        let queue = self.queues.get_mut(q).ok_or(ChainError::BadHead)?;
        if head >= queue.size() {
            return Err(ChainError::BadHead);
        }
        let next = queue.next_used();
        let at = queue.used_ring() + 4 + 8 * u64::from(next % queue.size());
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        unmarked(mem, at, 8)
            .and_then(|s| s.write_slice(&elem, 0).ok())
            .ok_or_else(|| ChainError::Used(format!("used ring entry at {at:#x} is outside guest memory")))?;
        queue.set_next_used(next.wrapping_add(1));
        self.used |= 1 << q;
        self.unpublished |= 1 << q;
        Ok(())
    }
    /// Writes `data` (a status byte, a short header) into guest memory at once and marks it in
    /// the VMM's dirty bitmap later, with the ring (see the module documentation).
    pub fn write_deferred(&mut self, addr: u64, data: &[u8]) -> Result<(), ChainError> {
        let len = u32::try_from(data.len()).map_err(|_| ChainError::OutOfMemory { addr, len: u32::MAX })?;
        unmarked(self.mem, addr, data.len())
            .and_then(|s| s.write_slice(data, 0).ok())
            .ok_or(ChainError::OutOfMemory { addr, len })?;
        let page = |a: u64| a / vcore::config::PAGE_SIZE;
        // Consecutive status bytes often share a page: one mark does for both.
        if let Some(&(last, n)) = self.marks[..self.n_marks].last()
            && page(last) == page(addr)
            && page(last + u64::from(n.max(1)) - 1) == page(addr + u64::from(len.max(1)) - 1)
        {
            return Ok(());
        }
        if self.n_marks == MARKS {
            self.flush_marks();
        }
        self.marks[self.n_marks] = (addr, len);
        self.n_marks += 1;
        Ok(())
    }
    /// Marks what [`QueueCtx::write_deferred`] wrote.
    fn flush_marks(&mut self) {
        for &(addr, len) in &self.marks[..self.n_marks] {
            mark(self.mem, addr, len as usize);
        }
        self.n_marks = 0;
    }
    /// Makes the used entries added to queue `q` so far visible to the driver now (stores the
    /// used index, marks the ring and the deferred writes dirty), without an interrupt: for a
    /// device that completes one buffer at a time while it keeps working, such as a received
    /// frame, so that a driver polling the ring takes each at once. The interrupt follows when
    /// the device returns, or at [`QueueCtx::signal_used`].
    pub fn publish_used(&mut self, q: usize) {
        if self.unpublished & (1 << q) == 0 {
            return;
        }
        self.unpublished &= !(1 << q);
        if let Some(p) = self.packed.as_deref().and_then(|p| p.get(q)) {
            mark(self.mem, p.ring.ring, 16 * usize::from(p.ring.size));
        } else if let Some(queue) = self.queues.get(q) {
            // The entries (and the buffers they describe) were written before: the Release
            // store orders them before the index. A ring outside memory was refused by
            // `add_used` already.
            if let Some(s) = unmarked(self.mem, queue.used_ring() + 2, 2) {
                let _ = s.store(queue.next_used().to_le(), 0, Ordering::Release);
            }
            mark(self.mem, queue.used_ring(), used_ring_len(queue));
        }
        self.flush_marks();
    }
    /// Publishes every queue's used entries ([`QueueCtx::signal_used`] without the interrupt).
    fn publish_all(&mut self) {
        for q in bits(self.unpublished) {
            self.publish_used(q);
        }
        self.flush_marks();
    }
    /// What the transport does when the device returns: publishes every queue's used entries
    /// and says whether a driver wants the used-buffer interrupt for them.
    pub(crate) fn finish(&mut self) -> bool {
        self.publish_all();
        // Every queue is asked (no short cut), so that each one's last decision moves on.
        bits(self.used).fold(false, |notify, q| self.needs_notification(q) | notify)
    }
    /// Whether the driver wants an interrupt for the used entries queue `q` published since
    /// this was last asked: with `VIRTIO_F_RING_EVENT_IDX`, when its `used_event` lies among
    /// them (as Linux's `virtqueue_kick_prepare` decides on the other side); without it, always
    /// when there are any.
    fn needs_notification(&mut self, q: usize) -> bool {
        if let Some(p) = self.packed.as_deref_mut() {
            // Nothing used since the last decision (`used_since`), nothing to tell. A driver
            // event structure outside memory: interrupt anyway, the driver resyncs.
            return p.get_mut(q).is_some_and(|p| {
                p.ring.used_since > 0 && p.ring.needs_notification(self.mem).unwrap_or(true)
            });
        }
        let Some(queue) = self.queues.get(q) else { return false };
        let now = Wrapping(queue.next_used());
        let Some(told) = self.told.get_mut(q) else { return true };
        let old = std::mem::replace(told, now);
        if now == old {
            return false;
        }
        if !queue.event_idx_enabled() {
            return true;
        }
        // The index store before must be visible before `used_event` is read, or the driver
        // could move `used_event` past it unseen and wait forever.
        fence(Ordering::SeqCst);
        let at = queue.avail_ring() + 4 + 2 * u64::from(queue.size());
        match self.mem.load::<u16>(GuestAddress(at), Ordering::Acquire) {
            Ok(event) => need_event(u16::from_le(event), now.0, old.0),
            // A ring the guest moved out of memory: interrupt anyway, the driver resyncs.
            Err(_) => true,
        }
    }
    /// Bitmask of queues the device took chains from (put back or not).
    pub(crate) fn popped_mask(&self) -> u64 {
        self.popped
    }
    /// Bitmask of queues that got used entries.
    #[cfg(test)]
    fn used_mask(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::atomic::AtomicU32;
    use vm_memory::GuestMemoryRegion;
    use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const SIZE: u16 = 8;

    fn setup(event_idx: bool, used: u64) -> (GuestMemory, Vec<Queue>) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let mut q = Queue::new(SIZE).unwrap();
        q.set_size(SIZE);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        q.set_event_idx(event_idx);
        q.set_ready(true);
        (mem, vec![q])
    }

    fn used_idx(mem: &GuestMemory) -> u16 {
        mem.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn set_used_event(mem: &GuestMemory, v: u16) {
        mem.write_obj(v, GuestAddress(AVAIL + 4 + 2 * u64::from(SIZE))).unwrap();
    }

    fn dirty(mem: &GuestMemory, addr: u64) -> bool {
        let r = mem.find_region(GuestAddress(addr)).unwrap();
        r.bitmap().dirty_at((addr - r.start_addr().0) as usize)
    }

    /// Interrupts signalled since the last call.
    fn interrupts(evt: &EventFd) -> u64 {
        evt.read().unwrap_or(0)
    }

    #[test]
    fn used_entries_are_published_and_marked_once_per_batch() {
        let (mem, mut queues) = setup(true, USED);
        let (status, evt, mut raised) = (AtomicU32::new(0), EventFd::new(EFD_NONBLOCK).unwrap(), 0);
        let irq = Irq { status: &status, evt: &evt, raised: &mut raised };
        let mut ctx = QueueCtx::with_irq(&mem, &mut queues, None, irq);
        ctx.add_used(0, 3, 100).unwrap();
        ctx.add_used(0, 5, 200).unwrap();
        ctx.write_deferred(0x9000, &[7]).unwrap();
        // Written, but neither visible to the driver (the index) nor marked yet.
        let entry = |i: u64| -> (u32, u32) {
            let at = USED + 4 + 8 * i;
            (mem.read_obj(GuestAddress(at)).unwrap(), mem.read_obj(GuestAddress(at + 4)).unwrap())
        };
        assert_eq!((entry(0), entry(1)), ((3, 100), (5, 200)));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x9000)).unwrap(), 7);
        assert_eq!(used_idx(&mem), 0);
        assert!(!dirty(&mem, USED) && !dirty(&mem, 0x9000));
        // `used_event` 0: the driver wants an interrupt once entry 0 is used.
        ctx.signal_used(0);
        assert_eq!(used_idx(&mem), 2);
        assert!(dirty(&mem, USED) && dirty(&mem, 0x9000));
        assert_eq!(interrupts(&evt), 1);
        // Nothing new since: no interrupt, whatever `used_event` says.
        ctx.signal_used(0);
        assert_eq!(interrupts(&evt), 0);
        // One more, but the driver asked about entry 0 only, which it was told of.
        ctx.add_used(0, 1, 0).unwrap();
        ctx.publish_all();
        assert_eq!(used_idx(&mem), 3);
        assert!(!ctx.needs_notification(0));
        assert_eq!(ctx.used_mask(), 1);
    }

    #[test]
    fn bad_used_entries_are_refused() {
        let (mem, mut queues) = setup(false, USED);
        let (status, evt, mut raised) = (AtomicU32::new(0), EventFd::new(EFD_NONBLOCK).unwrap(), 0);
        let irq = Irq { status: &status, evt: &evt, raised: &mut raised };
        let mut ctx = QueueCtx::with_irq(&mem, &mut queues, None, irq);
        assert_eq!(ctx.add_used(0, SIZE, 0), Err(ChainError::BadHead));
        assert_eq!(ctx.add_used(1, 0, 0), Err(ChainError::BadHead));
        assert!(ctx.write_deferred(0x10_0000 - 1, &[1, 2]).is_err());
        assert_eq!(ctx.used_mask(), 0);
        // A used ring the guest placed outside memory.
        let (mem, mut queues) = setup(false, 0x20_0000);
        let irq = Irq { status: &status, evt: &evt, raised: &mut raised };
        let mut ctx = QueueCtx::with_irq(&mem, &mut queues, None, irq);
        assert!(matches!(ctx.add_used(0, 0, 0), Err(ChainError::Used(_))));
    }

    proptest! {
        /// The used index in memory is what the device added, every entry lands in its slot,
        /// and interrupts come exactly when Linux's `vring_need_event` says the driver asked
        /// (with `VIRTIO_F_RING_EVENT_IDX`) or whenever there is something new (without).
        #[test]
        fn interrupts_follow_used_event(
            steps in proptest::collection::vec((0u16..5, 0u16..8, any::<bool>()), 1..40),
            event_idx in any::<bool>(),
        ) {
            let (mem, mut queues) = setup(event_idx, USED);
            let (status, evt, mut raised) = (AtomicU32::new(0), EventFd::new(EFD_NONBLOCK).unwrap(), 0);
            let irq = Irq { status: &status, evt: &evt, raised: &mut raised };
            let mut ctx = QueueCtx::with_irq(&mem, &mut queues, None, irq);
            let (mut added, mut told) = (Wrapping(0u16), Wrapping(0u16));
            for (n, ahead, signal) in steps {
                // The driver points `used_event` somewhere around what it has seen.
                let event = told + Wrapping(ahead) - Wrapping(2);
                set_used_event(&mem, event.0);
                for _ in 0..n {
                    let head = added.0 % SIZE;
                    ctx.add_used(0, head, u32::from(added.0)).unwrap();
                    added += Wrapping(1);
                }
                let want = added != told
                    && (!event_idx || added - event - Wrapping(1) < added - told);
                let got = if signal {
                    ctx.signal_used(0);
                    interrupts(&evt) == 1
                } else {
                    ctx.publish_all();
                    ctx.needs_notification(0)
                };
                prop_assert_eq!(got, want);
                told = added;
                prop_assert_eq!(used_idx(&mem), added.0);
                let last = added - Wrapping(1);
                if n > 0 {
                    let at = USED + 4 + 8 * u64::from(last.0 % SIZE);
                    prop_assert_eq!(mem.read_obj::<u32>(GuestAddress(at)).unwrap(), u32::from(last.0 % SIZE));
                    prop_assert_eq!(mem.read_obj::<u32>(GuestAddress(at + 4)).unwrap(), u32::from(last.0));
                }
            }
        }
    }
}
