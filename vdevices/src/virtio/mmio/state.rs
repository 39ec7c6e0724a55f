//! Saved state of the virtio-mmio transport: registers, features, queues, pending interrupts.

use super::*;

/// Version of encoded device state ([`TransportState::to_bytes`]). Any change to a saved
/// structure of the transport or a device changes the encoding and bumps it; decoding an older
/// version that is still accepted goes through the old structures (see [`vcore::Envelope`]).
///
/// 1.1 added packed rings ([`TransportState::offer_packed`], [`TransportState::packed`]). A
/// state that has neither is still written as 1.0, which 1.0 builds read.
pub const DEVICE_STATE_VERSION: (u16, u16) = (1, 1);

/// The envelope of encoded device state.
pub const DEVICE_STATE: vcore::Envelope =
    vcore::Envelope { magic: *b"VINFRADV", version: DEVICE_STATE_VERSION, max_payload: 16 << 20 };

impl TransportState {
    /// Encodes the state (transport and device) for a snapshot or a migration section:
    /// versioned and checksummed ([`DEVICE_STATE`]); as version 1.0 when packed rings are
    /// neither offered nor in use.
    pub fn to_bytes(&self) -> Vec<u8> {
        if !self.offer_packed && self.packed.is_none() {
            let v1_0 = vcore::Envelope { version: (1, 0), ..DEVICE_STATE };
            return v1_0.encode(&TransportStateV1_0::from(self.clone()));
        }
        DEVICE_STATE.encode(self)
    }

    /// Decodes bytes made by [`TransportState::to_bytes`] (of this version or 1.0); a wrong
    /// kind, an unreadable version, a bad length or checksum, or a payload that does not decode
    /// is a typed error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        let ((_, minor), payload) = DEVICE_STATE.open(bytes)?;
        if minor == 0 {
            return vcore::Envelope::decode_payload::<TransportStateV1_0>(payload).map(Into::into);
        }
        vcore::Envelope::decode_payload(payload)
    }
}

/// [`TransportState`] as version 1.0 encoded it, without packed rings.
#[derive(Serialize, Deserialize)]
struct TransportStateV1_0 {
    status: u32,
    driver_features: u64,
    device_features_sel: u32,
    driver_features_sel: u32,
    queue_sel: u32,
    interrupt_status: u32,
    config_generation: u32,
    activated: bool,
    broken: Option<String>,
    queues: Vec<QueueSnapshot>,
    stats: TransportStats,
    device: DeviceState,
}

impl From<TransportState> for TransportStateV1_0 {
    fn from(s: TransportState) -> Self {
        TransportStateV1_0 {
            status: s.status,
            driver_features: s.driver_features,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            queue_sel: s.queue_sel,
            interrupt_status: s.interrupt_status,
            config_generation: s.config_generation,
            activated: s.activated,
            broken: s.broken,
            queues: s.queues,
            stats: s.stats,
            device: s.device,
        }
    }
}

impl From<TransportStateV1_0> for TransportState {
    fn from(s: TransportStateV1_0) -> Self {
        TransportState {
            status: s.status,
            driver_features: s.driver_features,
            device_features_sel: s.device_features_sel,
            driver_features_sel: s.driver_features_sel,
            queue_sel: s.queue_sel,
            interrupt_status: s.interrupt_status,
            config_generation: s.config_generation,
            activated: s.activated,
            broken: s.broken,
            queues: s.queues,
            stats: s.stats,
            device: s.device,
            offer_packed: false,
            packed: None,
        }
    }
}

/// One queue's saved registers and ring positions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueSnapshot {
    /// Largest size offered.
    pub max_size: u16,
    /// Size chosen by the driver.
    pub size: u16,
    /// `QueueReady`.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available (driver) ring address.
    pub avail_ring: u64,
    /// Used (device) ring address.
    pub used_ring: u64,
    /// Next available entry the device will pop.
    pub next_avail: u16,
    /// Next used entry the device will fill.
    pub next_used: u16,
    /// `VIRTIO_F_RING_EVENT_IDX` in use.
    pub event_idx: bool,
}

/// The saved state of a transport and its device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransportState {
    /// Device status register.
    pub status: u32,
    /// Features the driver acknowledged.
    pub driver_features: u64,
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// Pending interrupt bits.
    pub interrupt_status: u32,
    /// Config generation counter.
    pub config_generation: u32,
    /// Whether the device was serving its queues.
    pub activated: bool,
    /// Why the device was broken, if it was.
    pub broken: Option<String>,
    /// Every queue.
    pub queues: Vec<QueueSnapshot>,
    /// Counters.
    pub stats: TransportStats,
    /// The device behind the transport.
    pub device: DeviceState,
    /// Whether `VIRTIO_F_RING_PACKED` was offered (version 1.1).
    pub offer_packed: bool,
    /// The packed rings, if the driver negotiated them (version 1.1).
    pub packed: Option<Vec<PackedQueue>>,
}

/// What restoring a transport needs: guest memory (already restored) and the device (restored
/// from [`TransportState::device`]).
#[derive(Debug)]
pub struct TransportArgs {
    /// The new VM's guest memory.
    pub mem: GuestMemory,
    /// The restored device.
    pub device: Box<dyn VirtioDevice>,
}

impl Snapshot for MmioTransport {
    type State = TransportState;
    type Args = TransportArgs;

    fn save(&self) -> TransportState {
        let inner = self.lock();
        let queues = inner
            .queues
            .iter()
            .map(|q| QueueSnapshot {
                max_size: q.max_size(),
                size: q.size(),
                ready: q.ready(),
                desc_table: q.desc_table(),
                avail_ring: q.avail_ring(),
                used_ring: q.used_ring(),
                next_avail: q.next_avail(),
                next_used: q.next_used(),
                event_idx: q.event_idx_enabled(),
            })
            .collect();
        TransportState {
            status: inner.status,
            driver_features: inner.driver_features,
            device_features_sel: inner.device_features_sel,
            driver_features_sel: inner.driver_features_sel,
            queue_sel: inner.queue_sel,
            interrupt_status: self.shared.interrupt_status.load(Ordering::Acquire),
            config_generation: inner.config_generation,
            activated: inner.activated,
            broken: inner.broken.clone(),
            queues,
            stats: inner.stats,
            device: inner.device.state(),
            offer_packed: inner.offer_packed,
            packed: inner.packed.clone(),
        }
    }

    fn restore(args: TransportArgs, s: &TransportState) -> Result<Self, StateError> {
        let bad = |reason: String| StateError::Device { device: "virtio-mmio".into(), reason };
        let max_sizes = args.device.queue_max_sizes().to_vec();
        if max_sizes.len() != s.queues.len() {
            return Err(bad(format!("{} saved queues, the device has {}", s.queues.len(), max_sizes.len())));
        }
        let t = MmioTransport::new(args.mem, args.device).map_err(|e| bad(e.to_string()))?;
        {
            let mut inner = t.lock();
            for (i, (qs, max)) in s.queues.iter().zip(max_sizes).enumerate() {
                if qs.max_size != max {
                    return Err(bad(format!("queue {i} max size {} saved, {max} here", qs.max_size)));
                }
                let state = QueueState {
                    max_size: qs.max_size,
                    next_avail: qs.next_avail,
                    next_used: qs.next_used,
                    event_idx_enabled: qs.event_idx,
                    size: qs.size,
                    ready: qs.ready,
                    desc_table: qs.desc_table,
                    avail_ring: qs.avail_ring,
                    used_ring: qs.used_ring,
                };
                inner.queues[i] = Queue::try_from(state).map_err(|e| bad(format!("queue {i}: {e}")))?;
            }
            if let Some(p) = &s.packed {
                let negotiated = s.driver_features & VIRTIO_F_RING_PACKED != 0;
                if !negotiated || p.len() != s.queues.len() {
                    return Err(bad(format!("{} packed rings saved for {} queues", p.len(), s.queues.len())));
                }
                for (i, (pq, qs)) in p.iter().zip(&s.queues).enumerate() {
                    if qs.ready && s.activated && !pq.ring.is_valid(&inner.mem) {
                        return Err(bad(format!("packed ring {i} lies outside guest memory")));
                    }
                }
            }
            inner.packed = s.packed.clone();
            inner.offer_packed = s.offer_packed;
            inner.status = s.status;
            inner.driver_features = s.driver_features;
            inner.device_features_sel = s.device_features_sel;
            inner.driver_features_sel = s.driver_features_sel;
            inner.queue_sel = s.queue_sel;
            t.shared.interrupt_status.store(s.interrupt_status, Ordering::Release);
            inner.config_generation = s.config_generation;
            inner.activated = s.activated;
            inner.broken = s.broken.clone();
            inner.stats = s.stats;
            if s.interrupt_status != 0 {
                // The pending interrupt travels with the state: raise it again on the new VM.
                let _ = t.shared.irq_evt.write(1);
            }
        }
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::packed::PackedQueue;
    use crate::virtio::rng::Rng;

    fn transport() -> MmioTransport {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        MmioTransport::new(mem, Box::new(Rng::new())).unwrap()
    }

    fn version(bytes: &[u8]) -> (u16, u16) {
        (u16::from_le_bytes([bytes[8], bytes[9]]), u16::from_le_bytes([bytes[10], bytes[11]]))
    }

    #[test]
    fn state_without_packed_rings_stays_readable_by_1_0() {
        let s = transport().save();
        let bytes = s.to_bytes();
        assert_eq!(version(&bytes), (1, 0));
        assert_eq!(TransportState::from_bytes(&bytes).unwrap(), s);
        // What a 1.0 build reads: its own structure, nothing after it.
        let (_, payload) = DEVICE_STATE.open(&bytes).unwrap();
        let old: TransportStateV1_0 = vcore::Envelope::decode_payload(payload).unwrap();
        assert_eq!(TransportState::from(old), s);
    }

    #[test]
    fn state_with_packed_rings_is_1_1_and_round_trips() {
        let t = transport();
        t.offer_packed(true);
        let mut s = t.save();
        assert!(s.offer_packed);
        let bytes = s.to_bytes();
        assert_eq!(version(&bytes), (1, 1));
        assert_eq!(TransportState::from_bytes(&bytes).unwrap(), s);
        let mut q = PackedQueue::new(crate::virtio::packed::PackedRing::new(8, 0x1000, 0x2000, 0x2004, true));
        q.in_flight.insert(3, 2);
        s.packed = Some(vec![q]);
        assert_eq!(TransportState::from_bytes(&s.to_bytes()).unwrap(), s);
    }

    #[test]
    fn packed_rings_without_the_feature_are_refused() {
        let mut s = transport().save();
        s.packed = Some(vec![PackedQueue::new(crate::virtio::packed::PackedRing::new(
            8, 0x1000, 0x2000, 0x2004, true,
        ))]);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let args = TransportArgs { mem, device: Box::new(Rng::new()) };
        assert!(matches!(MmioTransport::restore(args, &s), Err(StateError::Device { .. })));
    }
}
