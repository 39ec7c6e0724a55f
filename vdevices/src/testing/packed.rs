//! Packed virtqueues on the driver side (virtio 1.1, `VIRTIO_F_RING_PACKED`), following
//! Linux's `virtio_ring.c`: the counterpart of [`crate::virtio::packed::PackedRing`].
//!
//! One ring of 16-byte descriptors replaces the split ring's three structures. The driver makes
//! a chain available by writing its descriptors at its avail position with `AVAIL`/`USED` set
//! from its avail wrap counter, every descriptor carrying the chain's buffer ID, and the head's
//! flags last (release): the device sees nothing of a chain before all of it. The device marks
//! a buffer used by writing one descriptor (ID, length, flags) at its own used position, which
//! then moves on by as many descriptors as the chain took; so the driver remembers each ID's
//! descriptor count. Buffer IDs come from a free list of `0..size`, most recently freed first
//! (Linux's `free_head` list), so they stay below the queue size like split heads do.
//!
//! Each side has an event suppression structure (`off_wrap`, `flags`): the driver reads the
//! device's to decide on kicks and writes its own to ask for interrupts.

use std::sync::atomic::{Ordering, fence};

use vm_memory::{Bytes, GuestAddress};

use super::{Driver, GuestView, HarnessError};
use crate::virtio::packed::{
    DESC_F_AVAIL, DESC_F_NEXT, DESC_F_USED, EVENT_DESC, EVENT_DISABLE, EVENT_ENABLE,
};

/// Where the driver event suppression structure sits in a queue's 0x4000-byte area; the
/// descriptor ring before it takes at most this much (768 descriptors).
const DRIVER_EVENT_OFFSET: u64 = 0x3000;
/// Where the device event suppression structure sits: a cache line of its own, as the device
/// writes it while the driver writes its own.
const DEVICE_EVENT_OFFSET: u64 = 0x3040;

/// `vring_need_event`: whether moving from `old` to `new` passed `event`.
fn need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// One packed virtqueue as the driver sees it.
#[derive(Debug, Clone)]
pub(super) struct PackedQueue {
    /// Descriptors in the ring.
    size: u16,
    /// Guest address of the descriptor ring.
    pub(super) ring: u64,
    /// Guest address of the driver event suppression structure (written here).
    driver_event: u64,
    /// Guest address of the device event suppression structure (read here).
    device_event: u64,
    /// Whether `VIRTIO_F_RING_EVENT_IDX` was negotiated.
    event_idx: bool,
    /// Where the next chain goes, and the avail wrap counter.
    next_avail: u16,
    avail_wrap: bool,
    /// Where the device marks the next buffer used, and the used wrap counter.
    next_used: u16,
    used_wrap: bool,
    /// Descriptors not in flight.
    free_descs: u16,
    /// Buffer IDs not in flight; the last one goes out next.
    free_ids: Vec<u16>,
    /// Descriptors each buffer ID in flight took in the ring (0: not in flight).
    slots: Vec<u16>,
    /// Descriptors made available since the last kick (Linux's `num_added`).
    added: u16,
    /// The flags last written to the driver event structure (Linux's `event_flags_shadow`):
    /// rewriting them unchanged would only take the cache line from the device.
    event_flags: u16,
}

impl PackedQueue {
    /// Where a queue of `size` descriptors in the area at `base` puts its descriptor ring, driver
    /// event structure and device event structure; `None` when the ring does not fit.
    pub(super) fn layout(base: u64, size: u16) -> Option<(u64, u64, u64)> {
        (16 * u64::from(size) <= DRIVER_EVENT_OFFSET).then_some((
            base,
            base + DRIVER_EVENT_OFFSET,
            base + DEVICE_EVENT_OFFSET,
        ))
    }

    /// A queue over zeroed memory, as the driver hands it to the device: both wrap counters
    /// at 1, every ID free, interrupts enabled (flags 0).
    pub(super) fn new(size: u16, ring: u64, driver_event: u64, device_event: u64, event_idx: bool) -> Self {
        PackedQueue {
            size,
            ring,
            driver_event,
            device_event,
            event_idx,
            next_avail: 0,
            avail_wrap: true,
            next_used: 0,
            used_wrap: true,
            free_descs: size,
            free_ids: (0..size).rev().collect(),
            slots: vec![0; usize::from(size)],
            added: 0,
            event_flags: EVENT_ENABLE,
        }
    }

    /// Guest address of byte `at` of descriptor `i`.
    fn desc_addr(&self, i: u16, at: u64) -> GuestAddress {
        GuestAddress(self.ring + 16 * u64::from(i) + at)
    }

    /// Makes `bufs` (`(addr, len, flags)`, flags as in a split descriptor) available as one
    /// chain, as Linux's `virtqueue_add_packed` does; returns its buffer ID.
    pub(super) fn post(&mut self, g: &GuestView, bufs: &[(u64, u32, u16)]) -> Result<u16, HarnessError> {
        if bufs.is_empty() || bufs.len() > usize::from(self.free_descs) {
            return Err(HarnessError::Exhausted("descriptors"));
        }
        let id = self.free_ids.pop().ok_or(HarnessError::Exhausted("buffer IDs"))?;
        let (head, mut i, mut wrap) = (self.next_avail, self.next_avail, self.avail_wrap);
        let mut head_flags = 0;
        for (k, &(addr, len, flags)) in bufs.iter().enumerate() {
            let mut flags = flags & !(DESC_F_AVAIL | DESC_F_USED);
            flags |= if wrap { DESC_F_AVAIL } else { DESC_F_USED };
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&id.to_le_bytes());
            d[14..].copy_from_slice(&flags.to_le_bytes());
            if k == 0 {
                // All but the flags: the device must not see the head available yet.
                head_flags = flags;
                g.write_slice(&d[..14], self.desc_addr(i, 0))?;
            } else {
                g.write_slice(&d, self.desc_addr(i, 0))?;
            }
            i += 1;
            if i == self.size {
                (i, wrap) = (0, !wrap);
            }
        }
        // The head's flags last, released: a device that sees them sees the whole chain.
        fence(Ordering::Release);
        g.store(head_flags.to_le(), self.desc_addr(head, 14), Ordering::Release)?;
        (self.next_avail, self.avail_wrap) = (i, wrap);
        self.free_descs -= bufs.len() as u16;
        self.slots[usize::from(id)] = bufs.len() as u16;
        self.added = self.added.wrapping_add(bufs.len() as u16);
        Ok(id)
    }

    /// Whether the chains made available since the last call need a notification, as Linux's
    /// `virtqueue_kick_prepare_packed` decides from the device event structure: never when it
    /// says `DISABLE`; with `DESC` (and `VIRTIO_F_RING_EVENT_IDX`) when they passed the
    /// descriptor at its `off_wrap`; otherwise whenever there are any (Linux kicks even with
    /// none, which a device cannot tell from a spurious notification; the split path here
    /// does not, and neither does this).
    pub(super) fn kick_needed(&mut self, g: &GuestView) -> Result<bool, HarnessError> {
        // The head flags must be visible before the device's suppression state is read.
        fence(Ordering::SeqCst);
        let (new, added) = (self.next_avail, std::mem::take(&mut self.added));
        let old = new.wrapping_sub(added);
        // One load, as Linux snapshots both fields: they belong together.
        let event = u32::from_le(g.load::<u32>(GuestAddress(self.device_event), Ordering::Acquire)?);
        let (off_wrap, flags) = (event as u16, (event >> 16) as u16);
        Ok(match flags {
            EVENT_DISABLE => false,
            EVENT_DESC if self.event_idx => {
                // Positions count within the ring: an event of the other lap lies one ring
                // size back.
                let mut off = off_wrap & 0x7fff;
                if (off_wrap >> 15 == 1) != self.avail_wrap {
                    off = off.wrapping_sub(self.size);
                }
                need_event(off, new, old)
            }
            _ => added != 0,
        })
    }

    /// Whether the device has marked a buffer used at the driver's used position (the flags
    /// are read with acquire: the ID and length written before them are visible).
    pub(super) fn has_used(&self, g: &GuestView) -> Result<bool, HarnessError> {
        let flags = u16::from_le(g.load::<u16>(self.desc_addr(self.next_used, 14), Ordering::Acquire)?);
        let (avail, used) = (flags & DESC_F_AVAIL != 0, flags & DESC_F_USED != 0);
        Ok(avail == used && used == self.used_wrap)
    }

    /// Takes the buffer used at the driver's used position, if any: its ID and the length the
    /// device wrote. Its descriptors and ID are free again. An ID not in flight is
    /// [`HarnessError::UnknownId`], and the position stays (there is no telling how far to go).
    pub(super) fn pop_used(&mut self, g: &GuestView) -> Result<Option<(u16, u32)>, HarnessError> {
        if !self.has_used(g)? {
            return Ok(None);
        }
        let mut e = [0u8; 6];
        g.read_slice(&mut e, self.desc_addr(self.next_used, 8))?;
        let len = u32::from_le_bytes([e[0], e[1], e[2], e[3]]);
        let id = u16::from_le_bytes([e[4], e[5]]);
        let n = self.slots.get(usize::from(id)).copied().unwrap_or(0);
        if n == 0 {
            return Err(HarnessError::UnknownId(id));
        }
        self.slots[usize::from(id)] = 0;
        self.free_ids.push(id);
        self.free_descs += n;
        let next = u32::from(self.next_used) + u32::from(n);
        if next >= u32::from(self.size) {
            (self.next_used, self.used_wrap) = ((next - u32::from(self.size)) as u16, !self.used_wrap);
        } else {
            self.next_used = next as u16;
        }
        Ok(Some((id, len)))
    }

    /// Asks for an interrupt on the next used buffer, as Linux's `virtqueue_enable_cb_prepare`
    /// does: with `VIRTIO_F_RING_EVENT_IDX`, for the descriptor at the used position (its
    /// `off_wrap` carries the used wrap counter in bit 15), flags `DESC`; otherwise flags
    /// `ENABLE`. The caller looks at the ring again afterwards (after a full fence) if it
    /// must not miss a buffer the device used before it could see this.
    pub(super) fn enable_interrupts(&mut self, g: &GuestView) -> Result<(), HarnessError> {
        let flags = if self.event_idx {
            let off_wrap = self.next_used | (u16::from(self.used_wrap) << 15);
            g.store(off_wrap.to_le(), GuestAddress(self.driver_event), Ordering::Relaxed)?;
            EVENT_DESC
        } else {
            EVENT_ENABLE
        };
        if flags != self.event_flags {
            g.store(flags.to_le(), GuestAddress(self.driver_event + 2), Ordering::Release)?;
            self.event_flags = flags;
        }
        Ok(())
    }
}

/// The packed paths of [`Driver`]'s methods: the split paths hand over here when queue `q` is
/// not a split queue. Never inlined, so that the split paths compile as they did before.
impl Driver {
    /// Asks for packed virtqueues (`VIRTIO_F_RING_PACKED`) at the next [`Driver::init`], or
    /// for split ones again: call it before `init`. `init` fails with
    /// [`HarnessError::PackedNotOffered`] if the device does not offer them.
    pub fn set_packed(&mut self, on: bool) {
        self.packed_wanted = on;
    }

    /// Whether the last [`Driver::init`] set up packed queues.
    pub fn is_packed(&self) -> bool {
        !self.packed.is_empty()
    }

    /// [`Driver::post_raw`] on a packed queue.
    #[inline(never)]
    pub(super) fn post_raw_packed(
        &mut self,
        q: usize,
        bufs: &[(u64, u32, u16)],
    ) -> Result<u16, HarnessError> {
        let pq = self.packed.get_mut(q).ok_or(HarnessError::Queue(q))?;
        pq.post(&self.guest, bufs)
    }

    /// [`Driver::kick`] on a packed queue.
    #[inline(never)]
    pub(super) fn kick_packed(&mut self, q: usize) -> Result<bool, HarnessError> {
        let pq = self.packed.get_mut(q).ok_or(HarnessError::Queue(q))?;
        let need = pq.kick_needed(&self.guest)?;
        if need {
            self.kicks += 1;
            self.notify(q);
        }
        Ok(need)
    }

    /// [`Driver::reap`] on a packed queue: every used buffer at the used position, then
    /// interrupts asked for again (as the split path writes `used_event`).
    #[inline(never)]
    pub(super) fn reap_packed(&mut self, q: usize, out: &mut Vec<(u16, u32)>) -> Result<usize, HarnessError> {
        let pq = self.packed.get_mut(q).ok_or(HarnessError::Queue(q))?;
        let mut n = 0;
        while let Some(e) = pq.pop_used(&self.guest)? {
            out.push(e);
            n += 1;
        }
        if n > 0 {
            pq.enable_interrupts(&self.guest)?;
        }
        Ok(n)
    }

    /// [`Driver::collect_used`] on a packed queue. When the ring looks empty it asks for an
    /// interrupt and looks once more, as Linux's `virtqueue_enable_cb` does: a buffer the
    /// device used before it could see the request raised no interrupt. A buffer ID not in
    /// flight counts as a double completion ([`Driver::saw_double_completion`]) and is an error.
    #[inline(never)]
    pub(super) fn collect_used_packed(&mut self, q: usize) -> Result<usize, HarnessError> {
        let pq = self.packed.get_mut(q).ok_or(HarnessError::Queue(q))?;
        let mut n = 0;
        loop {
            match pq.pop_used(&self.guest) {
                Ok(Some((id, len))) => {
                    self.done.insert((q, id), len);
                    n += 1;
                }
                Ok(None) => {
                    pq.enable_interrupts(&self.guest)?;
                    fence(Ordering::SeqCst);
                    if !pq.has_used(&self.guest)? {
                        return Ok(n);
                    }
                }
                Err(e) => {
                    if matches!(e, HarnessError::UnknownId(_)) {
                        self.done.insert((q, u16::MAX), 0);
                    }
                    return Err(e);
                }
            }
        }
    }

    /// [`Driver::has_used`] on a packed queue.
    #[inline(never)]
    pub(super) fn has_used_packed(&self, q: usize) -> Result<bool, HarnessError> {
        self.packed.get(q).ok_or(HarnessError::Queue(q))?.has_used(&self.guest)
    }
}

#[cfg(test)]
mod tests;
