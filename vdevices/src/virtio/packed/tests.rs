//! The packed ring against a model driver that follows the virtio 1.1 rules (and Linux's
//! `virtqueue_add_packed`: every descriptor of a chain carries the buffer ID, the head's flags
//! are written last).

use std::collections::{HashMap, VecDeque};

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress};

use super::*;

const RING: u64 = 0x1000;
const DRIVER_EVENT: u64 = 0x3000;
const DEVICE_EVENT: u64 = 0x3004;
const MEM: u64 = 0x10_0000;

fn memory() -> GuestMemory {
    GuestMemory::from_ranges(&[(GuestAddress(0), MEM as usize)]).unwrap()
}

/// The driver's side of one packed ring.
struct Driver {
    size: u16,
    next: u16,
    wrap: bool,
    used_next: u16,
    used_wrap: bool,
    free: u16,
    slots: HashMap<u16, u16>,
    next_id: u16,
}

impl Driver {
    fn new(size: u16) -> Self {
        Driver {
            size,
            next: 0,
            wrap: true,
            used_next: 0,
            used_wrap: true,
            free: size,
            slots: HashMap::new(),
            next_id: 0,
        }
    }

    /// Makes `bufs` (address, length, device-writable) available as one chain; its buffer ID.
    fn post(&mut self, mem: &GuestMemory, bufs: &[Buf]) -> u16 {
        assert!(bufs.len() as u16 <= self.free);
        let id = self.next_id;
        self.next_id = (self.next_id + 1) % 1000;
        let head = self.next;
        let mut head_flags = 0;
        for (k, &(addr, len, write)) in bufs.iter().enumerate() {
            let at = RING + 16 * u64::from(self.next);
            let mut flags = if self.wrap { DESC_F_AVAIL } else { DESC_F_USED };
            if write {
                flags |= DESC_F_WRITE;
            }
            if k + 1 < bufs.len() {
                flags |= DESC_F_NEXT;
            }
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(id, GuestAddress(at + 12)).unwrap();
            if k == 0 {
                head_flags = flags;
            } else {
                mem.write_obj(flags, GuestAddress(at + 14)).unwrap();
            }
            self.next += 1;
            if self.next == self.size {
                (self.next, self.wrap) = (0, !self.wrap);
            }
        }
        mem.store(head_flags, GuestAddress(RING + 16 * u64::from(head) + 14), Ordering::Release).unwrap();
        self.free -= bufs.len() as u16;
        self.slots.insert(id, bufs.len() as u16);
        id
    }

    /// The next used buffer: its ID and the length the device wrote.
    fn reap(&mut self, mem: &GuestMemory) -> Option<(u16, u32)> {
        let at = RING + 16 * u64::from(self.used_next);
        let flags: u16 = mem.load(GuestAddress(at + 14), Ordering::Acquire).unwrap();
        let used =
            (flags & DESC_F_AVAIL != 0) == self.used_wrap && (flags & DESC_F_USED != 0) == self.used_wrap;
        if !used {
            return None;
        }
        let id: u16 = mem.read_obj(GuestAddress(at + 12)).unwrap();
        let len: u32 = mem.read_obj(GuestAddress(at + 8)).unwrap();
        let n = self.slots.remove(&id).expect("a used ID the driver had posted");
        self.free += n;
        let next = self.used_next + n;
        if next >= self.size {
            (self.used_next, self.used_wrap) = (next - self.size, !self.used_wrap);
        } else {
            self.used_next = next;
        }
        Some((id, len))
    }
}

fn ring(size: u16, event_idx: bool) -> PackedRing {
    PackedRing::new(size, RING, DRIVER_EVENT, DEVICE_EVENT, event_idx)
}

/// A buffer as the driver posts it: address, length, device-writable.
type Buf = (u64, u32, bool);

/// A chain of `n` buffers: a readable one, then writable ones, at addresses derived from `seed`.
fn bufs(n: usize, seed: u64) -> Vec<Buf> {
    (0..n).map(|k| (0x8000 + (seed % 64) * 0x1000 + 0x100 * k as u64, 16 + k as u32, k > 0)).collect()
}

#[test]
fn chains_go_round_a_small_ring_many_times() {
    let mem = memory();
    let (mut d, mut r) = (Driver::new(4), ring(4, false));
    assert!(r.is_valid(&mem));
    for round in 0..20u64 {
        let b = bufs(1 + (round % 3) as usize, round);
        let id = d.post(&mem, &b);
        let c = r.pop(&mem).unwrap().expect("a chain");
        assert_eq!(c.head, id);
        assert_eq!(c.descs.iter().map(|x| (x.addr, x.len, x.write)).collect::<Vec<_>>(), b);
        assert_eq!(r.pop(&mem).unwrap(), None);
        r.add_used(&mem, id, 7, c.descs.len() as u16).unwrap();
        assert_eq!(d.reap(&mem), Some((id, 7)));
        assert_eq!(d.reap(&mem), None);
    }
}

#[test]
fn bad_chains_are_errors() {
    let mem = memory();
    // Every descriptor available and chained: no end within the ring.
    let mut d = Driver::new(4);
    d.post(&mem, &[(0x8000, 16, false); 4]);
    for i in 0..4 {
        let at = RING + 16 * i + 14;
        let f: u16 = mem.read_obj(GuestAddress(at)).unwrap();
        mem.write_obj(f | DESC_F_NEXT, GuestAddress(at)).unwrap();
    }
    assert_eq!(ring(4, false).pop(&mem), Err(ChainError::Unterminated { head: 0 }));
    // Indirect, out of memory, readable after writable.
    for (b, want) in [
        (vec![(0x8000, 16, false)], "indirect"),
        (vec![(MEM - 8, 16, false)], "memory"),
        (vec![(0x8000, 16, true), (0x9000, 16, false)], "order"),
    ] {
        let mem = memory();
        Driver::new(8).post(&mem, &b);
        if want == "indirect" {
            let f: u16 = mem.read_obj(GuestAddress(RING + 14)).unwrap();
            mem.write_obj(f | DESC_F_INDIRECT, GuestAddress(RING + 14)).unwrap();
        }
        let got = ring(8, false).pop(&mem);
        match want {
            "indirect" => assert!(matches!(got, Err(ChainError::Malformed(_))), "{got:?}"),
            "memory" => assert!(matches!(got, Err(ChainError::OutOfMemory { .. })), "{got:?}"),
            _ => assert_eq!(got, Err(ChainError::Order { head: 0 })),
        }
    }
    // A chain that runs into a descriptor the driver has not made available.
    let mem = memory();
    Driver::new(8).post(&mem, &[(0x8000, 16, false), (0x9000, 16, true)]);
    mem.write_obj(0u16, GuestAddress(RING + 16 + 14)).unwrap();
    assert!(matches!(ring(8, false).pop(&mem), Err(ChainError::Malformed(_))));
    // A ring outside memory is invalid, and popping from it is an error, not a panic.
    let r = PackedRing::new(8, MEM - 16, DRIVER_EVENT, DEVICE_EVENT, false);
    assert!(!r.is_valid(&mem));
    assert!(PackedRing::new(8, MEM, DRIVER_EVENT, DEVICE_EVENT, false).pop(&mem).is_err());
}

#[test]
fn event_suppression_both_ways() {
    let mem = memory();
    let (mut d, mut r) = (Driver::new(8), ring(8, true));
    let use_one = |d: &mut Driver, r: &mut PackedRing| {
        let id = d.post(&mem, &bufs(1, 0));
        let c = r.pop(&mem).unwrap().unwrap();
        r.add_used(&mem, id, 0, c.descs.len() as u16).unwrap();
        d.reap(&mem).unwrap();
    };
    // The driver's structure: never, always, then at a given descriptor.
    mem.write_obj(EVENT_DISABLE, GuestAddress(DRIVER_EVENT + 2)).unwrap();
    use_one(&mut d, &mut r);
    assert!(!r.needs_notification(&mem).unwrap());
    mem.write_obj(EVENT_ENABLE, GuestAddress(DRIVER_EVENT + 2)).unwrap();
    use_one(&mut d, &mut r);
    assert!(r.needs_notification(&mem).unwrap());
    // Notify once descriptor 4 (wrap 1) is used: the used index is at 2 now.
    mem.write_obj(4u16 | 1 << 15, GuestAddress(DRIVER_EVENT)).unwrap();
    mem.write_obj(EVENT_DESC, GuestAddress(DRIVER_EVENT + 2)).unwrap();
    use_one(&mut d, &mut r); // used index 3
    assert!(!r.needs_notification(&mem).unwrap());
    use_one(&mut d, &mut r); // 4
    assert!(!r.needs_notification(&mem).unwrap());
    use_one(&mut d, &mut r); // 5: descriptor 4 was used
    assert!(r.needs_notification(&mem).unwrap());
    // The device's structure: where it wants the next notification.
    assert!(!r.enable_notification(&mem).unwrap());
    let off_wrap: u16 = mem.read_obj(GuestAddress(DEVICE_EVENT)).unwrap();
    let flags: u16 = mem.read_obj(GuestAddress(DEVICE_EVENT + 2)).unwrap();
    assert_eq!((off_wrap, flags), (5 | 1 << 15, EVENT_DESC));
    d.post(&mem, &bufs(1, 0));
    assert!(r.enable_notification(&mem).unwrap(), "a buffer made available meanwhile");
    r.disable_notification(&mem).unwrap();
    assert_eq!(mem.read_obj::<u16>(GuestAddress(DEVICE_EVENT + 2)).unwrap(), EVENT_DISABLE);
}

proptest! {
    /// Whatever the guest writes into the ring and its event structure, popping, marking used
    /// and deciding on interrupts never panic, and an accepted chain is no longer than the ring,
    /// inside memory and ordered.
    #[test]
    fn any_ring_is_handled_safely(
        size in 1u16..9,
        descs in proptest::collection::vec((any::<u64>(), any::<u32>(), any::<u16>(), any::<u16>()), 8),
        small in any::<bool>(),
        event in any::<(u16, u16)>(),
    ) {
        let mem = memory();
        for (i, &(addr, len, id, flags)) in descs.iter().enumerate() {
            let (addr, len) = if small { (addr % (MEM + 0x1000), len % 0x2000) } else { (addr, len) };
            let at = RING + 16 * i as u64;
            mem.write_obj(addr, GuestAddress(at)).unwrap();
            mem.write_obj(len, GuestAddress(at + 8)).unwrap();
            mem.write_obj(id, GuestAddress(at + 12)).unwrap();
            mem.write_obj(flags, GuestAddress(at + 14)).unwrap();
        }
        mem.write_obj(event.0, GuestAddress(DRIVER_EVENT)).unwrap();
        mem.write_obj(event.1, GuestAddress(DRIVER_EVENT + 2)).unwrap();
        let mut r = ring(size, event.1 & 1 == 0);
        for _ in 0..10 {
            match r.pop(&mem) {
                Ok(Some(c)) => {
                    prop_assert!(!c.descs.is_empty() && c.descs.len() <= usize::from(size));
                    for d in &c.descs {
                        prop_assert!(mem.check_range(GuestAddress(d.addr), d.len as usize));
                    }
                    let first_w = c.descs.iter().position(|d| d.write).unwrap_or(c.descs.len());
                    prop_assert!(c.descs[first_w..].iter().all(|d| d.write));
                    r.add_used(&mem, c.head, 1, c.descs.len() as u16).unwrap();
                    let _ = r.needs_notification(&mem);
                }
                Ok(None) | Err(_) => break,
            }
        }
        let _ = r.enable_notification(&mem);
    }

    /// Any interleaving of posts, pops, completions in any order and reaps, over rings small
    /// enough to wrap many times: the device sees every chain once, in order, and the driver
    /// sees every completion once, in completion order, with its length.
    #[test]
    fn any_interleaving_round_trips(
        size in prop_oneof![Just(2u16), Just(3), Just(4), Just(8)],
        ops in proptest::collection::vec((0u8..4, 1usize..4, any::<u8>()), 1..400),
    ) {
        let mem = memory();
        let (mut d, mut r) = (Driver::new(size), ring(size, false));
        let mut posted: VecDeque<(u16, Vec<Buf>)> = VecDeque::new();
        let mut in_device: Vec<(u16, u16)> = Vec::new();
        let mut completed: VecDeque<(u16, u32)> = VecDeque::new();
        for (op, n, pick) in ops {
            match op {
                0 if n as u16 <= d.free => {
                    let b = bufs(n, u64::from(pick));
                    let id = d.post(&mem, &b);
                    posted.push_back((id, b));
                }
                1 => match r.pop(&mem).unwrap() {
                    Some(c) => {
                        let (id, b) = posted.pop_front().expect("the device saw a chain nobody posted");
                        prop_assert_eq!(c.head, id);
                        prop_assert_eq!(c.descs.iter().map(|x| (x.addr, x.len, x.write)).collect::<Vec<_>>(), b);
                        in_device.push((id, c.descs.len() as u16));
                    }
                    None => prop_assert!(posted.is_empty(), "a posted chain was not seen"),
                },
                2 if !in_device.is_empty() => {
                    let (id, slots) = in_device.remove(usize::from(pick) % in_device.len());
                    r.add_used(&mem, id, u32::from(id) * 3, slots).unwrap();
                    completed.push_back((id, u32::from(id) * 3));
                }
                3 => {
                    let got = d.reap(&mem);
                    prop_assert_eq!(got, completed.pop_front());
                }
                _ => {}
            }
        }
    }
}
