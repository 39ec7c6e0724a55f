//! The driver's packed queues against the device's [`PackedRing`], in process (the transport
//! does not offer packed rings yet), and [`Driver`]'s packed paths over a transport whose
//! device offers `VIRTIO_F_RING_PACKED` (set up through the registers; nothing serves it).

use std::collections::VecDeque;
use std::time::Duration;

use proptest::prelude::*;
use vcore::{GuestMemory, Snapshot};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::MmioTransport;
use crate::testing::{DESC_F_WRITE, guest_memory, guest_view};
use crate::virtio::packed::{PackedRing, VIRTIO_F_RING_PACKED};
use crate::virtio::rng::Rng;
use crate::virtio::{DeviceError, DeviceState, QueueCtx, VIRTIO_F_RING_EVENT_IDX, VirtioDevice};

const BASE: u64 = 0x1_0000;
const BUFS: u64 = 0x8_0000;

/// A driver queue and the device's ring over the same (1 MiB) memory.
struct Pair {
    mem: GuestMemory,
    g: GuestView,
    d: PackedQueue,
    r: PackedRing,
}

fn pair(size: u16, event_idx: bool) -> Pair {
    let mem = guest_memory(1);
    let g = guest_view(&mem).unwrap();
    let (ring, de, ve) = PackedQueue::layout(BASE, size).unwrap();
    Pair {
        d: PackedQueue::new(size, ring, de, ve, event_idx),
        r: PackedRing::new(size, ring, de, ve, event_idx),
        g,
        mem,
    }
}

/// A buffer as [`PackedQueue::post`] takes it: address, length, flags.
type Buf = (u64, u32, u16);

/// A chain of `n` buffers: a readable one, then writable ones, at addresses from `seed`.
fn bufs(n: usize, seed: u64) -> Vec<Buf> {
    (0..n)
        .map(|k| {
            (
                BUFS + (seed % 64) * 0x1000 + 0x100 * k as u64,
                16 + k as u32,
                if k > 0 { DESC_F_WRITE } else { 0 },
            )
        })
        .collect()
}

impl Pair {
    /// The device pops one chain: its ID and descriptor count; checks it is `want`.
    fn pop(&mut self, want: &[Buf]) -> (u16, u16) {
        let c = self.r.pop(&self.mem).unwrap().expect("a chain");
        let got: Vec<_> =
            c.descs.iter().map(|x| (x.addr, x.len, if x.write { DESC_F_WRITE } else { 0 })).collect();
        assert_eq!(got, want);
        (c.head, c.descs.len() as u16)
    }
}

#[test]
fn chains_go_round_a_small_ring_many_times() {
    for size in [4u16, 5, 8] {
        let mut p = pair(size, false);
        assert!(p.r.is_valid(&p.mem));
        for round in 0..100u64 {
            let b = bufs(1 + (round % 3) as usize, round);
            let id = p.d.post(&p.g, &b).unwrap();
            assert!(id < size);
            let (got, slots) = p.pop(&b);
            assert_eq!(got, id);
            assert_eq!(p.r.pop(&p.mem).unwrap(), None);
            assert!(!p.d.has_used(&p.g).unwrap());
            p.r.add_used(&p.mem, id, round as u32, slots).unwrap();
            assert!(p.d.has_used(&p.g).unwrap());
            assert_eq!(p.d.pop_used(&p.g).unwrap(), Some((id, round as u32)));
            assert_eq!(p.d.pop_used(&p.g).unwrap(), None);
            assert_eq!(p.d.free_descs, size);
        }
    }
}

#[test]
fn out_of_order_completions_free_the_right_descriptors() {
    let mut p = pair(8, false);
    for round in 0..10u64 {
        // 1 + 3 + 2 + 2 descriptors: the ring is full.
        let chains: Vec<_> = [1, 3, 2, 2].iter().map(|&n| bufs(n, round)).collect();
        let ids: Vec<u16> = chains.iter().map(|b| p.d.post(&p.g, b).unwrap()).collect();
        assert!(matches!(p.d.post(&p.g, &bufs(1, 0)), Err(HarnessError::Exhausted(_))));
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), 4, "distinct IDs {ids:?}");
        let popped: Vec<_> = chains.iter().map(|b| p.pop(b)).collect();
        assert_eq!(popped.iter().map(|c| c.0).collect::<Vec<_>>(), ids);
        // Completed 3rd, 1st, 4th, 2nd: the driver sees them in that order.
        for k in [2, 0, 3, 1] {
            let (id, slots) = popped[k];
            p.r.add_used(&p.mem, id, 100 + k as u32, slots).unwrap();
        }
        for k in [2, 0, 3, 1] {
            assert_eq!(p.d.pop_used(&p.g).unwrap(), Some((ids[k], 100 + k as u32)));
        }
        assert_eq!(p.d.pop_used(&p.g).unwrap(), None);
        assert_eq!((p.d.free_descs, p.d.free_ids.len()), (8, 8));
    }
    // A chain longer than the ring, an empty one: refused.
    assert!(matches!(p.d.post(&p.g, &bufs(9, 0)), Err(HarnessError::Exhausted(_))));
    assert!(matches!(p.d.post(&p.g, &[]), Err(HarnessError::Exhausted(_))));
}

#[test]
fn an_unknown_used_id_is_an_error_not_a_panic() {
    let mut p = pair(4, false);
    let id = p.d.post(&p.g, &bufs(1, 0)).unwrap();
    p.pop(&bufs(1, 0));
    p.r.add_used(&p.mem, 3000, 0, 1).unwrap();
    assert!(matches!(p.d.pop_used(&p.g), Err(HarnessError::UnknownId(3000))));
    assert!(matches!(p.d.pop_used(&p.g), Err(HarnessError::UnknownId(3000))), "the position stays");
    assert_ne!(id, 3000);
}

#[test]
fn kicks_follow_the_device_event_structure() {
    for event_idx in [false, true] {
        let mut p = pair(4, event_idx);
        // Zeroed: ENABLE. Nothing posted, nothing to say.
        assert!(!p.d.kick_needed(&p.g).unwrap());
        p.d.post(&p.g, &bufs(1, 0)).unwrap();
        assert!(p.d.kick_needed(&p.g).unwrap());
        p.r.disable_notification(&p.mem).unwrap();
        p.d.post(&p.g, &bufs(1, 1)).unwrap();
        assert!(!p.d.kick_needed(&p.g).unwrap(), "DISABLE");
        // The device takes both and completes them, then asks again: the next chain must be
        // heard.
        for k in 0..2 {
            let (id, slots) = p.pop(&bufs(1, k));
            p.r.add_used(&p.mem, id, 0, slots).unwrap();
            assert_eq!(p.d.pop_used(&p.g).unwrap().map(|e| e.0), Some(id));
        }
        assert!(!p.r.enable_notification(&p.mem).unwrap());
        p.d.post(&p.g, &bufs(2, 2)).unwrap();
        assert!(p.d.kick_needed(&p.g).unwrap());
        // The device has not popped: with event indices its event lies behind what follows.
        p.d.post(&p.g, &bufs(1, 3)).unwrap();
        assert_eq!(p.d.kick_needed(&p.g).unwrap(), !event_idx);
    }
}

#[test]
fn kicks_are_sent_exactly_when_the_device_waits_over_many_wraps() {
    // With event indices and a ring of 5, the event's wrap bit disagrees with the driver's
    // every other lap.
    let mut p = pair(5, true);
    let mut in_flight = VecDeque::new();
    for round in 0..200u64 {
        let n = 1 + (round % 3) as usize;
        let b = bufs(n, round);
        let id = p.d.post(&p.g, &b).unwrap();
        // The device went idle after its last pop and asked for a notification (even
        // rounds), or is still busy with notifications left off (odd rounds).
        assert_eq!(p.d.kick_needed(&p.g).unwrap(), round % 2 == 0, "round {round}");
        let (got, slots) = p.pop(&b);
        assert_eq!(got, id);
        if round % 2 == 1 {
            assert!(!p.r.enable_notification(&p.mem).unwrap());
        } else {
            p.r.disable_notification(&p.mem).unwrap();
        }
        in_flight.push_back((id, slots));
        while in_flight.len() > 1 {
            let (id, slots) = in_flight.pop_front().unwrap();
            p.r.add_used(&p.mem, id, 0, slots).unwrap();
            assert_eq!(p.d.pop_used(&p.g).unwrap(), Some((id, 0)));
        }
    }
}

#[test]
fn interrupts_are_asked_for_again_after_reaping() {
    for event_idx in [false, true] {
        let mut p = pair(4, event_idx);
        let complete = |p: &mut Pair, k: u64| {
            let b = bufs(1 + (k % 2) as usize, k);
            let id = p.d.post(&p.g, &b).unwrap();
            let (_, slots) = p.pop(&b);
            p.r.add_used(&p.mem, id, 0, slots).unwrap();
            p.r.needs_notification(&p.mem).unwrap()
        };
        // Zeroed structure: ENABLE, an interrupt for every buffer.
        assert!(complete(&mut p, 0));
        for k in 1..60 {
            // Reaped and re-enabled: the next buffer interrupts, across every wrap.
            while p.d.pop_used(&p.g).unwrap().is_some() {}
            p.d.enable_interrupts(&p.g).unwrap();
            assert!(complete(&mut p, k), "round {k}");
            // Not reaped yet: with event indices, no second interrupt; except that the device
            // decides from ring positions alone, so when its used position wraps it cannot tell
            // the event was passed already and interrupts anyway (spurious, not lost).
            let before = p.r.next_used;
            let irq = complete(&mut p, k + 100);
            assert!(irq || event_idx, "round {k}");
            if p.r.next_used > before {
                assert_eq!(irq, !event_idx, "round {k}");
            }
        }
        let flags: u16 = p.g.read_obj(GuestAddress(p.d.driver_event + 2)).unwrap();
        assert_eq!(flags, if event_idx { EVENT_DESC } else { EVENT_ENABLE });
        if event_idx {
            let off_wrap: u16 = p.g.read_obj(GuestAddress(p.d.driver_event)).unwrap();
            assert_eq!(off_wrap, p.d.next_used | u16::from(p.d.used_wrap) << 15);
        }
    }
}

/// When the buffers used since the device's last interrupt decision take exactly the ring's
/// size (here one chain as long as the ring), its used position is back where it was; the
/// interrupt the driver asked for must still be sent (`PackedRing::used_since` counts them).
#[test]
fn device_interrupts_for_a_chain_that_fills_the_ring() {
    let mut p = pair(2, true);
    let (id, slots) = {
        let id = p.d.post(&p.g, &bufs(1, 0)).unwrap();
        (id, p.pop(&bufs(1, 0)).1)
    };
    p.r.add_used(&p.mem, id, 0, slots).unwrap();
    assert!(p.r.needs_notification(&p.mem).unwrap());
    assert!(p.d.pop_used(&p.g).unwrap().is_some());
    p.d.enable_interrupts(&p.g).unwrap();
    let id = p.d.post(&p.g, &bufs(2, 1)).unwrap();
    let (_, slots) = p.pop(&bufs(2, 1));
    p.r.add_used(&p.mem, id, 0, slots).unwrap();
    assert!(p.r.needs_notification(&p.mem).unwrap(), "the driver waits for this interrupt");
}

/// An entropy device that also offers packed rings (never served: no event loop).
#[derive(Debug, Default)]
struct OffersPacked(Rng);

impl VirtioDevice for OffersPacked {
    fn device_type(&self) -> u32 {
        self.0.device_type()
    }
    fn queue_max_sizes(&self) -> &[u16] {
        self.0.queue_max_sizes()
    }
    fn features(&self) -> u64 {
        self.0.features() | VIRTIO_F_RING_PACKED
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        self.0.read_config(offset, data);
    }
    fn process_queue(&mut self, _queue: usize, _ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }
    fn state(&self) -> DeviceState {
        self.0.state()
    }
}

fn driver(device: Box<dyn VirtioDevice>) -> Driver {
    let mem = guest_memory(16);
    let transport = MmioTransport::new(mem.clone(), device).unwrap();
    Driver::new(mem, transport).unwrap()
}

#[test]
fn init_negotiates_packed_only_when_asked_and_offered() {
    // Not asked: split, even with every bit wanted.
    let mut d = driver(Box::<OffersPacked>::default());
    let f = d.init(u64::MAX, 8).unwrap();
    assert_eq!(f & VIRTIO_F_RING_PACKED, 0);
    assert!(!d.is_packed());
    assert!(d.used_idx(0).is_ok());
    // Asked but not offered: an error.
    let mut d = driver(Box::new(Rng::new()));
    d.set_packed(true);
    assert!(matches!(d.init(u64::MAX, 8), Err(HarnessError::PackedNotOffered)));
    // Asked and offered: packed, with the layout in the queue registers.
    let mut d = driver(Box::<OffersPacked>::default());
    d.set_packed(true);
    let f = d.init(VIRTIO_F_RING_EVENT_IDX | crate::virtio::VIRTIO_F_VERSION_1, 8).unwrap();
    assert_ne!(f & VIRTIO_F_RING_PACKED, 0);
    assert!(d.is_packed() && d.transport().activated());
    let q = d.transport().save().queues[0];
    let (ring, de, ve) = PackedQueue::layout(crate::testing::QUEUE_AREA, 8).unwrap();
    assert_eq!((q.size, q.ready, q.desc_table, q.avail_ring, q.used_ring), (8, true, ring, de, ve));
    assert_eq!((ring % 16, de % 4, ve % 4), (0, 0, 0));
    assert_eq!(d.used_ring(0), Some(ring));
    // Split-only helpers refuse.
    assert!(matches!(d.write_desc(0, 0, 0, 0, 0, 0), Err(HarnessError::SplitOnly(0))));
    assert!(matches!(d.publish(0, 0), Err(HarnessError::SplitOnly(0))));
    assert!(matches!(d.set_avail_idx(0, 0), Err(HarnessError::SplitOnly(0))));
    assert!(matches!(d.avail_event(0), Err(HarnessError::SplitOnly(0))));
    assert!(matches!(d.used_idx(0), Err(HarnessError::SplitOnly(0))));
    assert!(matches!(d.used_idx(1), Err(HarnessError::Queue(1))));
}

#[test]
fn driver_methods_work_on_packed_queues() {
    let mut d = driver(Box::<OffersPacked>::default());
    d.set_packed(true);
    d.init(u64::MAX, 4).unwrap();
    let mem = d.mem().clone();
    let (ring, de, ve) = PackedQueue::layout(crate::testing::QUEUE_AREA, 4).unwrap();
    let mut r = PackedRing::new(4, ring, de, ve, true);
    for round in 0..20u32 {
        // post / kick / device / wait, with the data coming back.
        let p = d.post(0, &[b"hdr"], &[8, 4]).unwrap();
        assert!(p.head < 4);
        assert!(d.kick(0).unwrap(), "round {round}: the device asked for a notification");
        let c = r.pop(&mem).unwrap().unwrap();
        assert_eq!(c.head, p.head);
        assert!(!r.enable_notification(&mem).unwrap());
        mem.write_slice(&round.to_le_bytes(), GuestAddress(c.descs[1].addr)).unwrap();
        r.add_used(&mem, c.head, 12, c.descs.len() as u16).unwrap();
        assert!(d.has_used(0).unwrap());
        d.wait_used(0, Duration::from_secs(1)).unwrap();
        let done = d.wait(&p, Duration::from_secs(1)).unwrap();
        assert_eq!(done.len, 12);
        assert_eq!(done.data[0][..4], round.to_le_bytes());
        assert!(!d.has_used(0).unwrap());
        // post_raw / reap, two at a time, completed in reverse.
        let a = d.post_raw(0, &[(0x30_0000, 16, DESC_F_WRITE)]).unwrap();
        let b = d.post_raw(0, &[(0x30_1000, 16, 0), (0x30_2000, 16, DESC_F_WRITE)]).unwrap();
        assert!(d.kick(0).unwrap());
        let (ca, cb) = (r.pop(&mem).unwrap().unwrap(), r.pop(&mem).unwrap().unwrap());
        assert_eq!((ca.head, cb.head), (a, b));
        assert!(!r.enable_notification(&mem).unwrap());
        r.add_used(&mem, b, 2, 2).unwrap();
        r.add_used(&mem, a, 1, 1).unwrap();
        let mut out = Vec::new();
        assert_eq!(d.reap(0, &mut out).unwrap(), 2);
        assert_eq!(out, [(b, 2), (a, 1)]);
        assert_eq!(d.reap(0, &mut out).unwrap(), 0);
    }
    assert_eq!(d.kicks(), 40);
    assert!(!d.saw_double_completion());
    assert!(matches!(d.wait_used(0, Duration::from_millis(10)), Err(HarnessError::Timeout(_))));
    // A device that uses an ID twice.
    let id = d.post_raw(0, &[(0x30_0000, 16, DESC_F_WRITE)]).unwrap();
    let c = r.pop(&mem).unwrap().unwrap();
    r.add_used(&mem, c.head, 0, 1).unwrap();
    r.add_used(&mem, c.head, 0, 1).unwrap();
    assert!(matches!(d.wait_head(0, id, Duration::from_secs(1)), Err(HarnessError::UnknownId(_))));
    assert!(d.saw_double_completion());
}

/// What the device side of a proptest does to a notification flag.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DeviceNotify {
    /// Notifications off.
    Off,
    /// Asked for one with nothing left to pop: the next kick must come.
    Waiting,
    /// Asked for one earlier (and popped since).
    On,
}

proptest! {
    /// Any interleaving of posts (each kicked), pops, completions in any order, reaps and
    /// changes of the device's notification state, over small rings that wrap many times:
    /// the device sees every chain once with its ID, the driver every completion once in
    /// completion order; no ID is in flight twice; a waiting device is always kicked, a
    /// device that turned notifications off never; and a completion after the driver reaped
    /// everything always interrupts.
    #[test]
    fn any_interleaving_round_trips(
        size in prop_oneof![Just(2u16), Just(3), Just(4), Just(5), Just(8)],
        event_idx in any::<bool>(),
        ops in proptest::collection::vec((0u8..6, 1usize..4, any::<u8>()), 1..400),
    ) {
        let mut p = pair(size, event_idx);
        let mut posted: VecDeque<(u16, Vec<Buf>)> = VecDeque::new();
        let mut in_device: Vec<(u16, u16)> = Vec::new();
        let mut completed: VecDeque<(u16, u32)> = VecDeque::new();
        let mut notify = DeviceNotify::On;
        let mut driver_idle = true;
        for (op, n, pick) in ops {
            match op {
                0 if n as u16 <= p.d.free_descs => {
                    let b = bufs(n, u64::from(pick));
                    let id = p.d.post(&p.g, &b).unwrap();
                    prop_assert!(id < size);
                    prop_assert!(posted.iter().all(|c| c.0 != id) && in_device.iter().all(|c| c.0 != id));
                    prop_assert!(completed.iter().all(|c| c.0 != id));
                    posted.push_back((id, b));
                    let kick = p.d.kick_needed(&p.g).unwrap();
                    match notify {
                        DeviceNotify::Off => prop_assert!(!kick),
                        DeviceNotify::Waiting => prop_assert!(kick),
                        DeviceNotify::On => {}
                    }
                    if notify == DeviceNotify::Waiting {
                        notify = DeviceNotify::On;
                    }
                }
                1 => match p.r.pop(&p.mem).unwrap() {
                    Some(c) => {
                        let (id, b) = posted.pop_front().expect("the device saw a chain nobody posted");
                        prop_assert_eq!(c.head, id);
                        let got: Vec<_> =
                            c.descs.iter().map(|x| (x.addr, x.len, if x.write { DESC_F_WRITE } else { 0 })).collect();
                        prop_assert_eq!(got, b);
                        in_device.push((id, c.descs.len() as u16));
                    }
                    None => prop_assert!(posted.is_empty(), "a posted chain was not seen"),
                },
                2 if !in_device.is_empty() => {
                    let (id, slots) = in_device.remove(usize::from(pick) % in_device.len());
                    p.r.add_used(&p.mem, id, u32::from(id) * 3 + 1, slots).unwrap();
                    completed.push_back((id, u32::from(id) * 3 + 1));
                    let irq = p.r.needs_notification(&p.mem).unwrap();
                    if driver_idle {
                        prop_assert!(irq, "an interrupt was lost");
                    }
                    driver_idle = false;
                }
                3 => {
                    let mut got = Vec::new();
                    while let Some(e) = p.d.pop_used(&p.g).unwrap() {
                        got.push(e);
                    }
                    prop_assert_eq!(got, completed.drain(..).collect::<Vec<_>>());
                    p.d.enable_interrupts(&p.g).unwrap();
                    driver_idle = true;
                }
                4 => {
                    let pending = p.r.enable_notification(&p.mem).unwrap();
                    prop_assert_eq!(pending, !posted.is_empty());
                    notify = if pending { DeviceNotify::On } else { DeviceNotify::Waiting };
                }
                5 => {
                    p.r.disable_notification(&p.mem).unwrap();
                    notify = DeviceNotify::Off;
                }
                _ => {}
            }
        }
    }
}
