//! Descriptor chains, validated before any device touches them.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use vcore::GuestMemory;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// How the guest broke the split-queue protocol.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The available index moved more than a queue size past the device's position.
    #[error("available index {avail} is {pending} entries ahead of {next_avail} (queue size {size})")]
    AvailJump {
        /// The guest's available index.
        avail: u16,
        /// The device's next available position.
        next_avail: u16,
        /// How far ahead.
        pending: u16,
        /// Queue size.
        size: u16,
    },
    /// A ring or descriptor table could not be read (its address is outside guest memory).
    #[error("queue ring access failed: {0}")]
    Ring(String),
    /// The head index in the available ring is out of range.
    #[error("bad descriptor chain head")]
    BadHead,
    /// The chain does not end: a loop, an out-of-range `next`, or an unreadable descriptor.
    #[error("descriptor chain from head {head} does not terminate within the queue size")]
    Unterminated {
        /// The chain's head.
        head: u16,
    },
    /// A buffer lies (partly) outside guest memory.
    #[error("descriptor buffer {addr:#x}+{len:#x} is outside guest memory")]
    OutOfMemory {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u32,
    },
    /// A device-readable buffer follows a device-writable one.
    #[error("readable descriptor after a writable one in the chain from head {head}")]
    Order {
        /// The chain's head.
        head: u16,
    },
    /// The chain's buffers do not have the shape the device type requires.
    #[error("malformed request: {0}")]
    Malformed(&'static str),
    /// Guest memory access failed inside a validated buffer (should not happen).
    #[error("guest memory access: {0}")]
    Memory(String),
    /// The used ring could not be written.
    #[error("writing the used ring: {0}")]
    Used(String),
}

/// One buffer of a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Desc {
    /// Guest-physical address.
    pub addr: u64,
    /// Length in bytes.
    pub len: u32,
    /// Device-writable (else device-readable).
    pub write: bool,
}

/// A validated descriptor chain: every buffer lies inside guest memory, readable ones first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    /// Head index (what goes into the used ring).
    pub head: u16,
    /// The buffers in chain order.
    pub descs: Vec<Desc>,
}

/// A list of guest buffers `(address, length)` with byte-granular splitting.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Segs(pub Vec<(u64, u32)>);

impl Segs {
    /// Total length in bytes.
    pub fn len(&self) -> u64 {
        self.0.iter().map(|&(_, l)| u64::from(l)).sum()
    }
    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Splits after `n` bytes: `(first n bytes, rest)`.
    pub fn split_at(&self, n: u64) -> (Segs, Segs) {
        let (mut a, mut b) = (Vec::new(), Vec::new());
        let mut left = n;
        for &(addr, len) in &self.0 {
            let l = u64::from(len);
            if left >= l {
                a.push((addr, len));
                left -= l;
            } else if left > 0 {
                a.push((addr, left as u32));
                b.push((addr + left, len - left as u32));
                left = 0;
            } else {
                b.push((addr, len));
            }
        }
        (Segs(a), Segs(b))
    }
    /// Splits off the last `n` bytes: `(rest, last n bytes)`.
    pub fn split_last(&self, n: u64) -> (Segs, Segs) {
        self.split_at(self.len().saturating_sub(n))
    }
    /// Reads up to `max` bytes from the buffers.
    pub fn read(&self, mem: &GuestMemory, max: usize) -> Result<Vec<u8>, vm_memory::GuestMemoryError> {
        let mut out = Vec::new();
        for &(addr, len) in &self.0 {
            let n = (len as usize).min(max - out.len());
            let start = out.len();
            out.resize(start + n, 0);
            mem.read_slice(&mut out[start..], GuestAddress(addr))?;
            if out.len() == max {
                break;
            }
        }
        Ok(out)
    }
    /// Writes `data` into the buffers; returns how many bytes fit.
    pub fn write(&self, mem: &GuestMemory, data: &[u8]) -> Result<usize, vm_memory::GuestMemoryError> {
        let mut done = 0;
        for &(addr, len) in &self.0 {
            if done == data.len() {
                break;
            }
            let n = (len as usize).min(data.len() - done);
            mem.write_slice(&data[done..done + n], GuestAddress(addr))?;
            done += n;
        }
        Ok(done)
    }
}

impl Chain {
    /// The device-readable buffers.
    pub fn readable(&self) -> Segs {
        Segs(self.descs.iter().filter(|d| !d.write).map(|d| (d.addr, d.len)).collect())
    }
    /// The device-writable buffers.
    pub fn writable(&self) -> Segs {
        Segs(self.descs.iter().filter(|d| d.write).map(|d| (d.addr, d.len)).collect())
    }
}

/// Descriptor flag: the chain goes on at `next`.
const F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
const F_WRITE: u16 = 2;
/// Descriptor flag: the buffer is an indirect descriptor table.
const F_INDIRECT: u16 = 4;

/// Validates the chain at the next available position of `queue` and advances past it.
///
/// `Ok(None)` when the ring is empty (or the queue not ready).
#[cfg(test)]
fn pop_chain(queue: &mut Queue, mem: &GuestMemory) -> Result<Option<Chain>, ChainError> {
    pop_seen(queue, mem, &mut None)
}

/// Copies `N` bytes of guest memory at `addr` with one region lookup and one copy (the generic
/// `Bytes` path walks a slice iterator); `None` when they are not all inside guest memory.
pub(crate) fn read_array<const N: usize>(mem: &GuestMemory, addr: u64) -> Option<[u8; N]> {
    let slice = mem.get_slice(GuestAddress(addr), N).ok()?;
    let mut out = [0u8; N];
    slice.copy_to(&mut out[..]);
    Some(out)
}

/// [`pop_chain`], reading the guest's avail index only when `seen` (the index read last time,
/// kept by the caller across pops) says the ring is used up: with many chains pending, the
/// device reads that cache line, which the driver keeps writing, once per batch instead of once
/// per chain. The descriptor table is read directly (one region lookup per chain, not one per
/// descriptor as `virtio-queue`'s iterator does); indirect descriptors are refused (no device
/// offers `VIRTIO_F_INDIRECT_DESC`).
pub(crate) fn pop_seen(
    queue: &mut Queue,
    mem: &GuestMemory,
    seen: &mut Option<Wrapping<u16>>,
) -> Result<Option<Chain>, ChainError> {
    if !queue.ready() {
        return Ok(None);
    }
    let next = Wrapping(queue.next_avail());
    let size = queue.size();
    let avail = match *seen {
        Some(a) if a != next => a,
        _ => {
            let a = queue.avail_idx(mem, Ordering::Acquire).map_err(|e| ChainError::Ring(e.to_string()))?;
            *seen = Some(a);
            a
        }
    };
    let pending = (avail - next).0;
    if pending == 0 {
        return Ok(None);
    }
    if pending > size {
        return Err(ChainError::AvailJump { avail: avail.0, next_avail: next.0, pending, size });
    }
    // The ring entry was written before the index the Acquire load above read (or, with a
    // cached index, before the one an earlier pop read).
    let slot = queue.avail_ring() + 4 + 2 * u64::from(next.0 % size);
    let head = read_array::<2>(mem, slot).map(u16::from_le_bytes);
    let head = head.ok_or_else(|| ChainError::Ring(format!("avail ring entry at {slot:#x}")))?;
    if head >= size {
        return Err(ChainError::BadHead);
    }
    let base = queue.desc_table();
    // One mapping for the whole table; a table that spans two adjacent memory regions (no one
    // mapping holds it) is read descriptor by descriptor instead.
    let table = mem.get_slice(GuestAddress(base), 16 * usize::from(size)).ok();
    // Most requests are header + data + status: one allocation, no regrowth.
    let mut descs = Vec::with_capacity(4);
    let mut seen_write = false;
    let mut i = head;
    loop {
        // A chain longer than the table has a loop.
        if descs.len() == usize::from(size) {
            return Err(ChainError::Unterminated { head });
        }
        let at = 16 * usize::from(i);
        let raw = match &table {
            Some(t) => t.subslice(at, 16).ok().map(|d| {
                let mut raw = [0u8; 16];
                d.copy_to(&mut raw[..]);
                raw
            }),
            // The table is 16-aligned (virtio-queue refuses anything else), so no descriptor
            // spans two regions.
            None => read_array::<16>(mem, base + at as u64),
        };
        let raw = raw.ok_or_else(|| ChainError::Ring(format!("descriptor {i} of the table at {base:#x}")))?;
        let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, f0, f1, n0, n1] = raw;
        let flags = u16::from_le_bytes([f0, f1]);
        let desc = Desc {
            addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
            len: u32::from_le_bytes([l0, l1, l2, l3]),
            write: flags & F_WRITE != 0,
        };
        if flags & F_INDIRECT != 0 {
            return Err(ChainError::Malformed("indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered)"));
        }
        if !mem.check_range(GuestAddress(desc.addr), desc.len as usize) {
            return Err(ChainError::OutOfMemory { addr: desc.addr, len: desc.len });
        }
        if !desc.write && seen_write {
            return Err(ChainError::Order { head });
        }
        seen_write |= desc.write;
        descs.push(desc);
        if flags & F_NEXT == 0 {
            break;
        }
        i = u16::from_le_bytes([n0, n1]);
        if i >= size {
            return Err(ChainError::Unterminated { head });
        }
    }
    queue.set_next_avail(next.0.wrapping_add(1));
    Ok(Some(Chain { head, descs }))
}

/// What a device sees of its queues while serving them.
#[derive(Debug)]
pub struct QueueCtx<'a> {
    mem: &'a GuestMemory,
    queues: &'a mut [Queue],
    used: u64,
    irq: Irq<'a>,
    /// Queues whose buffers were too few, with the avail index the device had seen.
    starved: Vec<(usize, u16)>,
    /// The avail index last read, per queue (see [`pop_seen`]); queues past the 8th read it
    /// every time.
    seen: [Option<Wrapping<u16>>; 8],
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
        self.status.fetch_or(bits, std::sync::atomic::Ordering::AcqRel);
        *self.raised += 1;
        // A full eventfd counter only means the interrupt is already pending.
        let _ = self.evt.write(1);
    }
}

impl<'a> QueueCtx<'a> {
    /// A context over `queues` in `mem` that can raise the used-buffer interrupt while the
    /// device works.
    pub(crate) fn with_irq(mem: &'a GuestMemory, queues: &'a mut [Queue], irq: Irq<'a>) -> Self {
        QueueCtx { mem, queues, used: 0, irq, starved: Vec::new(), seen: [None; 8] }
    }
    /// Interrupts the driver now for the used entries added to queue `q` so far, if it asked
    /// for it (`used_event`), instead of when the device has served everything: a driver then
    /// reaps and posts new requests while the device goes on with the rest. The transport
    /// signals what is left when the device returns.
    pub fn signal_used(&mut self, q: usize) {
        if self.used & (1 << q) == 0 {
            return;
        }
        let Some(queue) = self.queues.get_mut(q) else { return };
        // A ring the guest moved out of memory: interrupt anyway, the driver resyncs.
        if queue.needs_notification(self.mem).unwrap_or(true) {
            self.irq.raise(crate::virtio::mmio::INT_VRING);
        }
    }
    /// Guest memory.
    pub fn mem(&self) -> &'a GuestMemory {
        self.mem
    }
    /// The next chain of queue `q`, validated; `Ok(None)` when there is none.
    pub fn pop(&mut self, q: usize) -> Result<Option<Chain>, ChainError> {
        let mut fresh = None;
        let seen = self.seen.get_mut(q).unwrap_or(&mut fresh);
        match self.queues.get_mut(q) {
            Some(queue) => pop_seen(queue, self.mem, seen),
            None => Ok(None),
        }
    }
    /// Says that the device leaves queue `q`'s buffers unused because they are too few for what
    /// it must deliver (a frame that needs more receive buffers than the ring holds). Call it
    /// after popping up to the end of the ring and before putting the chains back
    /// ([`QueueCtx::unpop`]). The transport then asks the driver to notify on the very next
    /// buffer it adds (with `VIRTIO_F_RING_EVENT_IDX`, `avail_event` goes to the avail index the
    /// device saw, not to where it stopped), and serves the queue again if one arrived meanwhile.
    pub fn wait_for_buffers(&mut self, q: usize) {
        if let Some(queue) = self.queues.get(q) {
            self.starved.push((q, queue.next_avail()));
        }
    }
    /// The queues the device is waiting on ([`QueueCtx::wait_for_buffers`]).
    pub(crate) fn starved(&self) -> &[(usize, u16)] {
        &self.starved
    }
    /// Puts the last popped chain of queue `q` back (it will be popped again).
    pub fn unpop(&mut self, q: usize) {
        if let Some(queue) = self.queues.get_mut(q) {
            queue.go_to_previous_position();
        }
    }
    /// Returns chain `head` to the driver with `len` bytes written.
    pub fn add_used(&mut self, q: usize, head: u16, len: u32) -> Result<(), ChainError> {
        let queue = self.queues.get_mut(q).ok_or(ChainError::BadHead)?;
        queue.add_used(self.mem, head, len).map_err(|e| ChainError::Used(e.to_string()))?;
        self.used |= 1 << q;
        Ok(())
    }
    /// Bitmask of queues that got used entries.
    pub(crate) fn used_mask(&self) -> u64 {
        self.used
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const DESC: u64 = 0x1000;
    const AVAIL: u64 = 0x2000;
    const USED: u64 = 0x3000;
    const MEM: u64 = 0x10_0000;

    fn setup(size: u16) -> (GuestMemory, Queue) {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap();
        let mut q = Queue::new(size).unwrap();
        q.set_size(size);
        q.set_desc_table_address(Some(DESC as u32), Some(0));
        q.set_avail_ring_address(Some(AVAIL as u32), Some(0));
        q.set_used_ring_address(Some(USED as u32), Some(0));
        q.set_ready(true);
        (mem, q)
    }

    fn put_desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let a = DESC + 16 * u64::from(i);
        mem.write_obj(addr, GuestAddress(a)).unwrap();
        mem.write_obj(len, GuestAddress(a + 8)).unwrap();
        mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
        mem.write_obj(next, GuestAddress(a + 14)).unwrap();
    }

    fn publish(mem: &GuestMemory, slot: u16, head: u16, idx: u16) {
        mem.write_obj(head, GuestAddress(AVAIL + 4 + 2 * u64::from(slot))).unwrap();
        mem.write_obj(idx, GuestAddress(AVAIL + 2)).unwrap();
    }

    #[test]
    fn good_chain_parses() {
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, 0x8000, 16, 1, 1);
        put_desc(&mem, 1, 0x9000, 512, 2, 0);
        publish(&mem, 0, 0, 1);
        let c = pop_chain(&mut q, &mem).unwrap().unwrap();
        assert_eq!(c.head, 0);
        assert_eq!(c.readable(), Segs(vec![(0x8000, 16)]));
        assert_eq!(c.writable().len(), 512);
        assert_eq!(pop_chain(&mut q, &mem).unwrap(), None);
    }

    #[test]
    fn bad_chains_are_errors() {
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, 0, 16, 1, 0); // loops onto itself
        publish(&mem, 0, 0, 1);
        assert_eq!(pop_chain(&mut q, &mem), Err(ChainError::Unterminated { head: 0 }));
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, MEM - 8, 16, 0, 0); // runs past the end of memory
        publish(&mem, 0, 0, 1);
        assert!(matches!(pop_chain(&mut q, &mem), Err(ChainError::OutOfMemory { .. })));
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, 0x8000, 16, 0, 0);
        publish(&mem, 0, 0, 9); // 9 entries in a ring of 8
        assert!(matches!(pop_chain(&mut q, &mem), Err(ChainError::AvailJump { pending: 9, .. })));
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, 0x8000, 16, 4, 0); // indirect, never offered
        publish(&mem, 0, 0, 1);
        assert!(matches!(pop_chain(&mut q, &mem), Err(ChainError::Malformed(_))));
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, 0x8000, 16, 1, 8); // `next` past the table
        publish(&mem, 0, 0, 1);
        assert_eq!(pop_chain(&mut q, &mem), Err(ChainError::Unterminated { head: 0 }));
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, 0x8000, 16, 0, 0);
        publish(&mem, 0, 8, 1); // head past the table
        assert_eq!(pop_chain(&mut q, &mem), Err(ChainError::BadHead));
        let (mem, mut q) = setup(8);
        put_desc(&mem, 0, 0x8000, 16, 2 | 1, 1);
        put_desc(&mem, 1, 0x9000, 16, 0, 0); // readable after writable
        publish(&mem, 0, 0, 1);
        assert_eq!(pop_chain(&mut q, &mem), Err(ChainError::Order { head: 0 }));
    }

    #[test]
    fn a_table_across_two_adjacent_regions_is_read_descriptor_by_descriptor() {
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x2000), (GuestAddress(0x2000), 0xe000)]).unwrap();
        let mut q = Queue::new(16).unwrap();
        q.set_size(16);
        q.set_desc_table_address(Some(0x1f80), Some(0)); // descriptors 8.. lie in the second region
        q.set_avail_ring_address(Some(0x3000), Some(0));
        q.set_used_ring_address(Some(0x4000), Some(0));
        q.set_ready(true);
        let desc = |i: u64, addr: u64, flags: u16, next: u16| {
            let a = 0x1f80 + 16 * i;
            mem.write_obj(addr, GuestAddress(a)).unwrap();
            mem.write_obj(64u32, GuestAddress(a + 8)).unwrap();
            mem.write_obj(flags, GuestAddress(a + 12)).unwrap();
            mem.write_obj(next, GuestAddress(a + 14)).unwrap();
        };
        desc(7, 0x5000, 1, 9); // first region, chained into the second
        desc(9, 0x6000, 2, 0);
        mem.write_obj(7u16, GuestAddress(0x3004)).unwrap();
        mem.write_obj(1u16, GuestAddress(0x3002)).unwrap();
        let c = pop_chain(&mut q, &mem).unwrap().unwrap();
        assert_eq!(c.head, 7);
        assert_eq!(c.descs.iter().map(|d| d.addr).collect::<Vec<_>>(), [0x5000, 0x6000]);
    }

    #[test]
    fn cached_avail_index_is_reread_when_used_up() {
        let (mem, mut q) = setup(8);
        for i in 0..4 {
            put_desc(&mem, i, 0x8000 + 0x100 * u64::from(i), 16, 0, 0);
        }
        publish(&mem, 0, 0, 1);
        let mut seen = None;
        assert_eq!(pop_seen(&mut q, &mem, &mut seen).unwrap().unwrap().head, 0);
        assert_eq!(seen, Some(Wrapping(1)));
        assert_eq!(pop_seen(&mut q, &mem, &mut seen).unwrap(), None);
        // Two more arrive: the used-up cache is read again, then serves both without a read.
        publish(&mem, 1, 1, 2);
        publish(&mem, 2, 2, 3);
        assert_eq!(pop_seen(&mut q, &mem, &mut seen).unwrap().unwrap().head, 1);
        publish(&mem, 3, 3, 4);
        assert_eq!(pop_seen(&mut q, &mem, &mut seen).unwrap().unwrap().head, 2);
        assert_eq!(seen, Some(Wrapping(3)));
        assert_eq!(pop_seen(&mut q, &mem, &mut seen).unwrap().unwrap().head, 3);
        assert_eq!(pop_seen(&mut q, &mem, &mut seen).unwrap(), None);
    }

    #[test]
    fn segs_split() {
        let s = Segs(vec![(0x100, 10), (0x200, 6)]);
        let (a, b) = s.split_at(12);
        assert_eq!(a, Segs(vec![(0x100, 10), (0x200, 2)]));
        assert_eq!(b, Segs(vec![(0x202, 4)]));
        let (r, last) = s.split_last(1);
        assert_eq!(last, Segs(vec![(0x205, 1)]));
        assert_eq!(r.len(), 15);
    }

    proptest! {
        /// Whatever the guest writes into the descriptor table and ring, parsing never panics,
        /// and an accepted chain is short, inside memory, terminated and ordered.
        #[test]
        fn any_table_parses_safely(
            descs in proptest::collection::vec((any::<u64>(), any::<u32>(), 0u16..8, 0u16..20), 8),
            heads in proptest::collection::vec(0u16..12, 1..4),
            avail in any::<u16>(),
            small in any::<bool>(),
        ) {
            let (mem, mut q) = setup(8);
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                let (addr, len) = if small { (addr % (MEM + 0x1000), len % 0x2000) } else { (addr, len) };
                put_desc(&mem, i as u16, addr, len, flags, next);
            }
            for (slot, &h) in heads.iter().enumerate() {
                publish(&mem, slot as u16, h, avail);
            }
            for _ in 0..10 {
                match pop_chain(&mut q, &mem) {
                    Ok(Some(c)) => {
                        prop_assert!(!c.descs.is_empty() && c.descs.len() <= 8);
                        for d in &c.descs {
                            prop_assert!(mem.check_range(GuestAddress(d.addr), d.len as usize));
                        }
                        let first_w = c.descs.iter().position(|d| d.write).unwrap_or(c.descs.len());
                        prop_assert!(c.descs[first_w..].iter().all(|d| d.write));
                    }
                    Ok(None) | Err(_) => break,
                }
            }
        }

        /// Splitting keeps every byte exactly once, in order.
        #[test]
        fn split_keeps_bytes(lens in proptest::collection::vec(0u32..50, 0..6), at in 0u64..300) {
            let mut addr = 0u64;
            let segs = Segs(lens.iter().map(|&l| { let s = (addr, l); addr += 1000; s }).collect());
            let (a, b) = segs.split_at(at);
            prop_assert_eq!(a.len(), at.min(segs.len()));
            prop_assert_eq!(a.len() + b.len(), segs.len());
        }
    }
}
