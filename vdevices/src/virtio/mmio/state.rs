//! Saved state of the virtio-mmio transport: registers, features, queues, pending interrupts.

use super::*;

/// Version of encoded device state ([`TransportState::to_bytes`]). Any change to a saved
/// structure of the transport or a device changes the encoding and bumps it; decoding an older
/// version that is still accepted goes through the old structures (see [`vcore::Envelope`]).
pub const DEVICE_STATE_VERSION: (u16, u16) = (1, 0);

/// The envelope of encoded device state.
pub const DEVICE_STATE: vcore::Envelope =
    vcore::Envelope { magic: *b"VINFRADV", version: DEVICE_STATE_VERSION, max_payload: 16 << 20 };

impl TransportState {
    /// Encodes the state (transport and device) for a snapshot or a migration section:
    /// versioned and checksummed ([`DEVICE_STATE`]).
    pub fn to_bytes(&self) -> Vec<u8> {
        DEVICE_STATE.encode(self)
    }

    /// Decodes bytes made by [`TransportState::to_bytes`]; a wrong kind, an unreadable version,
    /// a bad length or checksum, or a payload that does not decode is a typed error.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        DEVICE_STATE.decode(bytes)
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
