//! Descriptor chains, validated before any device touches them.

use std::num::Wrapping;
use std::sync::atomic::Ordering;

use vcore::GuestMemory;
use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::MS;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice};

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
    pop_seen(queue, mem, &mut Rings::default())
}

/// Copies `N` bytes of guest memory at `addr` with one region lookup and one copy (the generic
/// `Bytes` path walks a slice iterator); `None` when they are not all inside guest memory.
pub(crate) fn read_array<const N: usize>(mem: &GuestMemory, addr: u64) -> Option<[u8; N]> {
    let slice = mem.get_slice(GuestAddress(addr), N).ok()?;
    let mut out = [0u8; N];
    slice.copy_to(&mut out[..]);
    Some(out)
}

/// A host view of part of guest memory.
pub(super) type GuestSlice<'a> = VolatileSlice<'a, MS<'a, GuestMemory>>;

/// What [`pop_into`] keeps between the pops of one queue while a device serves it (the queue's
/// addresses cannot change meanwhile: the driver writes them under the lock the device holds).
#[derive(Debug, Default)]
pub(super) struct Rings<'a> {
    /// The avail index read last.
    pub seen: Option<Wrapping<u16>>,
    /// Whether `table` and `avail` were looked up.
    mapped: bool,
    /// The descriptor table, mapped once; `None` if no one mapping holds it (it spans two
    /// adjacent memory regions: then each descriptor is looked up on its own).
    table: Option<GuestSlice<'a>>,
    /// The avail ring's entries, likewise.
    avail: Option<GuestSlice<'a>>,
    /// The region of the last buffer checked.
    region: Span,
}

/// The memory region that held the last buffer checked, as guest addresses `[start, end)`
/// mapped at host address `host`: buffers of one chain, or of a batch, are mostly in one
/// region, and need no lookup.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Span {
    start: u64,
    end: u64,
    host: usize,
}

impl Span {
    /// Whether the `len` bytes at `addr` are all guest memory; remembers the region that holds
    /// `addr` when it had to look.
    pub(super) fn holds(&mut self, mem: &GuestMemory, addr: u64, len: u32) -> bool {
        let end = addr.checked_add(u64::from(len));
        if end.is_some_and(|end| addr >= self.start && end <= self.end) {
            return true;
        }
        if !mem.check_range(GuestAddress(addr), len as usize) {
            return false;
        }
        if let Some(r) = mem.find_region(GuestAddress(addr)) {
            let start = r.start_addr().0;
            *self = Span { start, end: start + r.len(), host: r.as_ptr() as usize };
        }
        true
    }

    /// Prefetches the cache line of guest address `addr` if it is in this region (see
    /// [`crate::sys::prefetch`]).
    pub(super) fn prefetch(&self, addr: u64) {
        if addr >= self.start && addr < self.end {
            crate::sys::prefetch(self.host + (addr - self.start) as usize);
        }
    }
}

impl<'a> Rings<'a> {
    /// Maps `queue`'s descriptor table and avail entries, once.
    fn map(&mut self, queue: &Queue, mem: &'a GuestMemory) {
        if !self.mapped {
            let size = usize::from(queue.size());
            self.table = mem.get_slice(GuestAddress(queue.desc_table()), 16 * size).ok();
            self.avail = mem.get_slice(GuestAddress(queue.avail_ring() + 4), 2 * size).ok();
            self.mapped = true;
        }
    }
}

/// `N` bytes at offset `at` of `ring` (mapped), or at guest address `addr` (not mapped).
pub(super) fn ring_bytes<const N: usize>(
    ring: &Option<GuestSlice<'_>>,
    at: usize,
    mem: &GuestMemory,
    addr: u64,
) -> Option<[u8; N]> {
    match ring {
        Some(r) => r.subslice(at, N).ok().map(|s| {
            let mut raw = [0u8; N];
            s.copy_to(&mut raw[..]);
            raw
        }),
        None => read_array::<N>(mem, addr),
    }
}

/// Prefetches the first descriptor of up to 16 chains published between `next` and `avail`:
/// the driver wrote them on another core, and walking the chains one by one would wait for
/// each line in turn.
fn prefetch_heads(queue: &Queue, mem: &GuestMemory, rings: &Rings<'_>, next: Wrapping<u16>, pending: u16) {
    let size = queue.size();
    for k in 0..pending.min(16) {
        let slot = next.0.wrapping_add(k) % size;
        let entry = ring_bytes::<2>(
            &rings.avail,
            2 * usize::from(slot),
            mem,
            queue.avail_ring() + 4 + 2 * u64::from(slot),
        );
        if let (Some(head), Some(table)) = (entry.map(u16::from_le_bytes).filter(|&h| h < size), &rings.table)
        {
            crate::sys::prefetch(table.ptr_guard().as_ptr() as usize + 16 * usize::from(head));
        }
    }
}

/// [`pop_chain`] with what `rings` keeps between pops.
#[cfg(test)]
fn pop_seen<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    rings: &mut Rings<'a>,
) -> Result<Option<Chain>, ChainError> {
    let mut descs = Vec::with_capacity(4);
    Ok(pop_into(queue, mem, rings, &mut descs)?.map(|head| Chain { head, descs }))
}

/// Validates the chain at the next available position of `queue`, puts its buffers in `descs`
/// (emptied first) and advances past it; returns its head, `None` if there is none.
///
/// It reads the guest's avail index only when `rings.seen` (the index read last time, kept by
/// the caller across pops) says the ring is used up: with many chains pending, the device reads
/// that cache line, which the driver keeps writing, once per batch instead of once per chain.
/// Then the first descriptors of the chains it announced are prefetched, and each chain's first
/// buffer (a request header, mostly) as the chain is returned. The rings are mapped once per
/// `rings` (not once per descriptor, as `virtio-queue`'s iterator does); indirect descriptors
/// are refused (no device offers `VIRTIO_F_INDIRECT_DESC`).
pub(super) fn pop_into<'a>(
    queue: &mut Queue,
    mem: &'a GuestMemory,
    rings: &mut Rings<'a>,
    descs: &mut Vec<Desc>,
) -> Result<Option<u16>, ChainError> {
    descs.clear();
    if !queue.ready() {
        return Ok(None);
    }
    rings.map(queue, mem);
    let next = Wrapping(queue.next_avail());
    let size = queue.size();
    let (avail, fresh) = match rings.seen {
        Some(a) if a != next => (a, false),
        _ => {
            let a = queue.avail_idx(mem, Ordering::Acquire).map_err(|e| ChainError::Ring(e.to_string()))?;
            rings.seen = Some(a);
            (a, true)
        }
    };
    let pending = (avail - next).0;
    if pending == 0 {
        return Ok(None);
    }
    if pending > size {
        return Err(ChainError::AvailJump { avail: avail.0, next_avail: next.0, pending, size });
    }
    if fresh {
        prefetch_heads(queue, mem, rings, next, pending);
    }
    // The ring entry was written before the index the Acquire load above read (or, with a
    // cached index, before the one an earlier pop read).
    let slot = next.0 % size;
    let addr = queue.avail_ring() + 4 + 2 * u64::from(slot);
    let head = ring_bytes::<2>(&rings.avail, 2 * usize::from(slot), mem, addr).map(u16::from_le_bytes);
    let head = head.ok_or_else(|| ChainError::Ring(format!("avail ring entry at {addr:#x}")))?;
    if head >= size {
        return Err(ChainError::BadHead);
    }
    let base = queue.desc_table();
    let mut seen_write = false;
    let mut i = head;
    loop {
        // A chain longer than the table has a loop.
        if descs.len() == usize::from(size) {
            return Err(ChainError::Unterminated { head });
        }
        // The table is 16-aligned (virtio-queue refuses anything else), so no descriptor spans
        // two regions.
        let at = 16 * usize::from(i);
        let raw = ring_bytes::<16>(&rings.table, at, mem, base + at as u64);
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
        if !rings.region.holds(mem, desc.addr, desc.len) {
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
    if let Some(d) = descs.first() {
        rings.region.prefetch(d.addr);
    }
    Ok(Some(head))
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
    fn buffers_are_checked_in_the_cached_region_and_across_regions() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)])
            .unwrap();
        let (_, mut q) = setup(8);
        let mut rings = Rings::default();
        put_desc(&mem, 0, 0x8000, 16, 0, 0);
        publish(&mem, 0, 0, 1);
        assert!(pop_seen(&mut q, &mem, &mut rings).unwrap().is_some());
        // Across the boundary of the cached region into the next one: still guest memory.
        put_desc(&mem, 1, 0xff00, 0x200, 0, 0);
        publish(&mem, 1, 1, 2);
        assert!(pop_seen(&mut q, &mem, &mut rings).unwrap().is_some());
        // Now the second region is cached; past its end is not memory.
        put_desc(&mem, 2, 0x1ff00, 0x200, 0, 0);
        publish(&mem, 2, 2, 3);
        assert_eq!(
            pop_seen(&mut q, &mem, &mut rings),
            Err(ChainError::OutOfMemory { addr: 0x1ff00, len: 0x200 })
        );
    }

    #[test]
    fn cached_avail_index_is_reread_when_used_up() {
        let (mem, mut q) = setup(8);
        for i in 0..4 {
            put_desc(&mem, i, 0x8000 + 0x100 * u64::from(i), 16, 0, 0);
        }
        publish(&mem, 0, 0, 1);
        let mut rings = Rings::default();
        assert_eq!(pop_seen(&mut q, &mem, &mut rings).unwrap().unwrap().head, 0);
        assert_eq!(rings.seen, Some(Wrapping(1)));
        assert_eq!(pop_seen(&mut q, &mem, &mut rings).unwrap(), None);
        // Two more arrive: the used-up cache is read again, then serves both without a read.
        publish(&mem, 1, 1, 2);
        publish(&mem, 2, 2, 3);
        assert_eq!(pop_seen(&mut q, &mem, &mut rings).unwrap().unwrap().head, 1);
        publish(&mem, 3, 3, 4);
        assert_eq!(pop_seen(&mut q, &mem, &mut rings).unwrap().unwrap().head, 2);
        assert_eq!(rings.seen, Some(Wrapping(3)));
        assert_eq!(pop_seen(&mut q, &mem, &mut rings).unwrap().unwrap().head, 3);
        assert_eq!(pop_seen(&mut q, &mem, &mut rings).unwrap(), None);
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
