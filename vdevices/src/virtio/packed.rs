//! Packed virtqueues (virtio 1.1, `VIRTIO_F_RING_PACKED`), the device side: one ring of
//! descriptors that the driver makes available and the device marks used in place, instead of
//! the split ring's descriptor table, available ring and used ring. A request then touches fewer
//! cache lines that move between the driver's core and the device's.
//!
//! [`PackedRing`] pops validated [`Chain`]s (the same checks as the split ring: every buffer
//! inside guest memory, readable buffers first, no chain longer than the ring, no indirect
//! descriptors), marks buffers used, and implements both event suppression structures (the
//! driver's, read to decide on interrupts; the device's, written to ask for notifications).
//!
//! [`PackedQueue`] adds what the device keeps between serves (the buffers in flight, whose
//! descriptor counts [`PackedRing::add_used`] needs); the transport offers packed rings when
//! asked to ([`super::mmio::MmioTransport::offer_packed`]) and [`super::QueueCtx`] serves them
//! to devices like split ones.

use std::collections::BTreeMap;
use std::sync::atomic::{Ordering, fence};

use serde::{Deserialize, Serialize};
use vcore::GuestMemory;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use super::chain::{Span, ring_bytes};
use super::ctx::need_event;
use super::{Chain, ChainError, Desc};

/// `VIRTIO_F_RING_PACKED`: the driver may use packed virtqueues.
pub const VIRTIO_F_RING_PACKED: u64 = 1 << 34;

/// Descriptor flag: the chain goes on in the next descriptor of the ring.
pub const DESC_F_NEXT: u16 = 1;
/// Descriptor flag: the buffer is device-writable.
pub const DESC_F_WRITE: u16 = 2;
/// Descriptor flag: an indirect table (refused: not offered).
pub const DESC_F_INDIRECT: u16 = 4;
/// Descriptor flag: available (compared with the wrap counter).
pub const DESC_F_AVAIL: u16 = 1 << 7;
/// Descriptor flag: used (compared with the wrap counter).
pub const DESC_F_USED: u16 = 1 << 15;

/// Event suppression: notify (interrupt) on every buffer.
pub const EVENT_ENABLE: u16 = 0;
/// Event suppression: do not notify.
pub const EVENT_DISABLE: u16 = 1;
/// Event suppression: notify when the descriptor at `off_wrap` is reached
/// (`VIRTIO_F_RING_EVENT_IDX`).
pub const EVENT_DESC: u16 = 2;

/// One packed virtqueue as the device sees it. Its fields are its whole state (for snapshots).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedRing {
    /// Descriptors in the ring.
    pub size: u16,
    /// Guest address of the descriptor ring (16-byte descriptors).
    pub ring: u64,
    /// Guest address of the driver event suppression structure (the driver writes it).
    pub driver_event: u64,
    /// Guest address of the device event suppression structure (the device writes it).
    pub device_event: u64,
    /// Whether `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    pub event_idx: bool,
    /// Next descriptor to look at.
    pub next_avail: u16,
    /// Its wrap counter.
    pub avail_wrap: bool,
    /// Next descriptor to mark used.
    pub next_used: u16,
    /// Its wrap counter.
    pub used_wrap: bool,
    /// `next_used` when interrupts were last decided on (`None`: never).
    pub signalled_used: Option<u16>,
    /// Descriptors marked used since then (saturating): a position alone cannot tell a whole
    /// ring's worth of them from none.
    pub used_since: u16,
}

impl PackedRing {
    /// A ring of `size` descriptors at `ring` with its event structures, as a driver sets it up
    /// (both wrap counters start at 1).
    pub fn new(size: u16, ring: u64, driver_event: u64, device_event: u64, event_idx: bool) -> Self {
        PackedRing {
            size,
            ring,
            driver_event,
            device_event,
            event_idx,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            signalled_used: None,
            used_since: 0,
        }
    }

    /// Whether the ring and both event structures lie in guest memory, and the size is usable.
    pub fn is_valid(&self, mem: &GuestMemory) -> bool {
        self.size > 0
            && self.size <= 32768
            && self.ring.is_multiple_of(16)
            && self.driver_event.is_multiple_of(4)
            && self.device_event.is_multiple_of(4)
            && mem.check_range(GuestAddress(self.ring), 16 * usize::from(self.size))
            && mem.check_range(GuestAddress(self.driver_event), 4)
            && mem.check_range(GuestAddress(self.device_event), 4)
    }

    fn desc_addr(&self, i: u16) -> u64 {
        self.ring + 16 * u64::from(i)
    }

    /// Whether flags say available for wrap counter `wrap`.
    fn is_avail(flags: u16, wrap: bool) -> bool {
        (flags & DESC_F_AVAIL != 0) == wrap && (flags & DESC_F_USED != 0) != wrap
    }

    fn flags_at(&self, mem: &GuestMemory, i: u16) -> Result<u16, ChainError> {
        mem.load::<u16>(GuestAddress(self.desc_addr(i) + 14), Ordering::Acquire)
            .map(u16::from_le)
            .map_err(|e| ChainError::Ring(format!("packed descriptor {i}: {e}")))
    }

    /// The next available chain, validated; `Ok(None)` when the driver has made none available.
    /// The chain's `head` is its buffer ID (from its last descriptor), and `descs.len()` the
    /// descriptors it takes in the ring (pass it to [`PackedRing::add_used`]).
    pub fn pop(&mut self, mem: &GuestMemory) -> Result<Option<Chain>, ChainError> {
        let mut descs = Vec::with_capacity(4);
        Ok(self.pop_into(mem, &mut descs)?.map(|head| Chain { head, descs }))
    }

    /// [`PackedRing::pop`] into `descs` (emptied first, its allocation reused); returns the
    /// chain's buffer ID.
    pub fn pop_into(&mut self, mem: &GuestMemory, descs: &mut Vec<Desc>) -> Result<Option<u16>, ChainError> {
        descs.clear();
        if self.size == 0 || !Self::is_avail(self.flags_at(mem, self.next_avail)?, self.avail_wrap) {
            return Ok(None);
        }
        // The head's flags were read with Acquire: the descriptors the driver wrote before them
        // are visible.
        let (mut i, mut wrap) = (self.next_avail, self.avail_wrap);
        let mut seen_write = false;
        // One mapping for the ring (each descriptor otherwise costs a region lookup); a ring
        // across two adjacent regions is read descriptor by descriptor.
        let ring = mem.get_slice(GuestAddress(self.ring), 16 * usize::from(self.size)).ok();
        let mut region = Span::default();
        let id = loop {
            if descs.len() == usize::from(self.size) {
                return Err(ChainError::Unterminated { head: self.next_avail });
            }
            let raw = ring_bytes::<16>(&ring, 16 * usize::from(i), mem, self.desc_addr(i));
            let raw = raw.ok_or_else(|| ChainError::Ring(format!("packed descriptor {i}")))?;
            let [a0, a1, a2, a3, a4, a5, a6, a7, l0, l1, l2, l3, id0, id1, f0, f1] = raw;
            let flags = u16::from_le_bytes([f0, f1]);
            if !Self::is_avail(flags, wrap) {
                return Err(ChainError::Malformed(
                    "packed chain runs into a descriptor that is not available",
                ));
            }
            if flags & DESC_F_INDIRECT != 0 {
                return Err(ChainError::Malformed(
                    "indirect descriptor (VIRTIO_F_INDIRECT_DESC is not offered)",
                ));
            }
            let desc = Desc {
                addr: u64::from_le_bytes([a0, a1, a2, a3, a4, a5, a6, a7]),
                len: u32::from_le_bytes([l0, l1, l2, l3]),
                write: flags & DESC_F_WRITE != 0,
            };
            if !region.holds(mem, desc.addr, desc.len) {
                return Err(ChainError::OutOfMemory { addr: desc.addr, len: desc.len });
            }
            if !desc.write && seen_write {
                return Err(ChainError::Order { head: self.next_avail });
            }
            seen_write |= desc.write;
            descs.push(desc);
            i += 1;
            if i == self.size {
                (i, wrap) = (0, !wrap);
            }
            if flags & DESC_F_NEXT == 0 {
                break u16::from_le_bytes([id0, id1]);
            }
        };
        (self.next_avail, self.avail_wrap) = (i, wrap);
        // The first buffer (a request header, mostly) is what the device reads next: the
        // driver wrote it on another core.
        if let Some(d) = descs.first() {
            region.prefetch(d.addr);
        }
        Ok(Some(id))
    }

    /// Marks buffer `id` used with `len` bytes written; it took `slots` descriptors in the ring
    /// (its chain's length). The descriptor's flags are written last, with release ordering, so
    /// a driver that sees them sees the ID and length.
    pub fn add_used(&mut self, mem: &GuestMemory, id: u16, len: u32, slots: u16) -> Result<(), ChainError> {
        self.add_used_unmarked(mem, id, len, slots)?;
        super::ctx::mark(mem, self.ring, 16 * usize::from(self.size));
        Ok(())
    }

    /// [`PackedRing::add_used`] without marking the ring in the VMM's dirty bitmap: the caller
    /// marks it (`QueueCtx` does once per batch, see its module documentation).
    pub(crate) fn add_used_unmarked(
        &mut self,
        mem: &GuestMemory,
        id: u16,
        len: u32,
        slots: u16,
    ) -> Result<(), ChainError> {
        if slots == 0 || slots > self.size {
            return Err(ChainError::Used(format!(
                "a buffer of {slots} descriptors in a ring of {}",
                self.size
            )));
        }
        let at = self.desc_addr(self.next_used);
        let desc = super::ctx::unmarked(mem, at, 16)
            .ok_or_else(|| ChainError::Used(format!("used descriptor at {at:#x} is outside guest memory")))?;
        let used = |e: vm_memory::VolatileMemoryError| ChainError::Used(e.to_string());
        let mut head = [0u8; 6];
        head[..4].copy_from_slice(&len.to_le_bytes());
        head[4..].copy_from_slice(&id.to_le_bytes());
        desc.write_slice(&head, 8).map_err(used)?;
        let mut flags = if self.used_wrap { DESC_F_AVAIL | DESC_F_USED } else { 0 };
        if len > 0 {
            flags |= DESC_F_WRITE;
        }
        fence(Ordering::Release);
        desc.store(flags.to_le(), 14, Ordering::Release).map_err(used)?;
        self.used_since = self.used_since.saturating_add(slots);
        let next = u32::from(self.next_used) + u32::from(slots);
        if next >= u32::from(self.size) {
            self.next_used = (next - u32::from(self.size)) as u16;
            self.used_wrap = !self.used_wrap;
        } else {
            self.next_used = next as u16;
        }
        Ok(())
    }

    /// Whether the driver wants an interrupt for the buffers marked used since the last call
    /// (its event suppression structure: always, never, or once a given descriptor is used).
    pub fn needs_notification(&mut self, mem: &GuestMemory) -> Result<bool, ChainError> {
        fence(Ordering::SeqCst);
        let ring = |e: vm_memory::GuestMemoryError| ChainError::Ring(format!("driver event structure: {e}"));
        let off_wrap =
            u16::from_le(mem.load::<u16>(GuestAddress(self.driver_event), Ordering::Acquire).map_err(ring)?);
        let flags = u16::from_le(
            mem.load::<u16>(GuestAddress(self.driver_event + 2), Ordering::Acquire).map_err(ring)?,
        );
        let new = self.next_used;
        let old = self.signalled_used.replace(new);
        let used = std::mem::take(&mut self.used_since);
        Ok(match flags {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx => match old {
                None => true,
                // A whole ring or more since the last decision passed every position.
                Some(_) if used >= self.size => true,
                Some(old) => {
                    let mut off = off_wrap & 0x7fff;
                    if (off_wrap >> 15 == 1) != self.used_wrap {
                        off = off.wrapping_sub(self.size);
                    }
                    need_event(off, new, old)
                }
            },
            _ => true,
        })
    }

    /// Asks the driver to notify for the next buffer it makes available (with event indices:
    /// for the one at `next_avail`); returns whether one is available already (made available
    /// while notifications were off).
    pub fn enable_notification(&mut self, mem: &GuestMemory) -> Result<bool, ChainError> {
        let (off_wrap, flags) = if self.event_idx {
            (self.next_avail | (u16::from(self.avail_wrap) << 15), EVENT_DESC)
        } else {
            (0, EVENT_ENABLE)
        };
        self.write_device_event(mem, off_wrap, flags)?;
        fence(Ordering::SeqCst);
        Ok(Self::is_avail(self.flags_at(mem, self.next_avail)?, self.avail_wrap))
    }

    /// Asks the driver to notify for every buffer it makes available (for a device that waits
    /// for more buffers than the ring held), and returns whether the descriptor at `at`, the
    /// first the device found unavailable (with wrap counter `wrap`), has become available
    /// meanwhile.
    pub fn notify_on_any(&mut self, mem: &GuestMemory, at: u16, wrap: bool) -> Result<bool, ChainError> {
        self.write_device_event(mem, 0, EVENT_ENABLE)?;
        fence(Ordering::SeqCst);
        if at >= self.size {
            return Ok(false);
        }
        Ok(Self::is_avail(self.flags_at(mem, at)?, wrap))
    }

    /// Asks the driver not to notify.
    pub fn disable_notification(&mut self, mem: &GuestMemory) -> Result<(), ChainError> {
        self.write_device_event(mem, 0, EVENT_DISABLE)
    }

    fn write_device_event(&self, mem: &GuestMemory, off_wrap: u16, flags: u16) -> Result<(), ChainError> {
        let ring = |e: vm_memory::GuestMemoryError| ChainError::Ring(format!("device event structure: {e}"));
        mem.store(off_wrap.to_le(), GuestAddress(self.device_event), Ordering::Relaxed).map_err(ring)?;
        mem.store(flags.to_le(), GuestAddress(self.device_event + 2), Ordering::Release).map_err(ring)
    }
}

/// A packed ring and the buffers in flight on it: their IDs and how many descriptors each
/// takes in the ring (what [`PackedRing::add_used`] needs when the device completes one, maybe
/// serves later). Its fields are its whole state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PackedQueue {
    /// The ring.
    pub ring: PackedRing,
    /// Buffer ID → descriptors it takes, for every buffer popped and not yet used.
    pub in_flight: BTreeMap<u16, u16>,
}

/// Where a ring stood before a pop: `(next_avail, avail_wrap)`, to put the chain back.
pub type PackedPos = (u16, bool);

impl PackedQueue {
    /// A queue over `ring`, nothing in flight.
    pub fn new(ring: PackedRing) -> Self {
        PackedQueue { ring, in_flight: BTreeMap::new() }
    }

    /// The next available chain, into `chain` (see [`PackedRing::pop_into`]), now in flight;
    /// returns where the ring stood before it (`None`, and `chain` emptied, if there is none).
    /// A buffer ID the driver reuses while it is in flight is an error.
    pub fn pop(&mut self, mem: &GuestMemory, chain: &mut Chain) -> Result<Option<PackedPos>, ChainError> {
        let before = (self.ring.next_avail, self.ring.avail_wrap);
        let Some(id) = self.ring.pop_into(mem, &mut chain.descs)? else { return Ok(None) };
        chain.head = id;
        let slots = u16::try_from(chain.descs.len()).unwrap_or(u16::MAX);
        if self.in_flight.insert(id, slots).is_some() {
            return Err(ChainError::Malformed("packed buffer ID reused while in flight"));
        }
        Ok(Some(before))
    }

    /// Puts back the chain with buffer ID `id` that [`PackedQueue::pop`] took at `before`.
    pub fn unpop(&mut self, id: u16, before: PackedPos) {
        self.in_flight.remove(&id);
        (self.ring.next_avail, self.ring.avail_wrap) = before;
    }

    /// Marks buffer `id` used with `len` bytes written; it must be in flight. The ring is not
    /// marked in the VMM's dirty bitmap: `QueueCtx` marks it when it publishes.
    pub(crate) fn complete(&mut self, mem: &GuestMemory, id: u16, len: u32) -> Result<(), ChainError> {
        let slots = self
            .in_flight
            .remove(&id)
            .ok_or_else(|| ChainError::Used(format!("buffer ID {id} is not in flight")))?;
        self.ring.add_used_unmarked(mem, id, len, slots)
    }
}

#[cfg(test)]
mod tests;
