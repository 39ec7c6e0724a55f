//! The register window: what a vCPU's MMIO access (or the harness) reads and writes, and what
//! writing the status and queue registers does (negotiation, activation, reset).

use super::*;

impl BusDevice for MmioTransport {
    fn read(&self, offset: u64, data: &mut [u8]) {
        if offset == reg::INTERRUPT_STATUS && data.len() == 4 {
            let v = self.shared.interrupt_status.load(Ordering::Acquire);
            data.copy_from_slice(&v.to_le_bytes());
            return;
        }
        let inner = self.lock();
        if offset >= reg::CONFIG {
            inner.device.read_config(offset - reg::CONFIG, data);
            return;
        }
        if data.len() != 4 || !offset.is_multiple_of(4) {
            data.fill(0);
            return;
        }
        let q = inner.queues.get(inner.queue_sel as usize);
        let v: u32 = match offset {
            reg::MAGIC => MMIO_MAGIC,
            reg::VERSION => MMIO_VERSION,
            reg::DEVICE_ID => inner.device.device_type(),
            reg::VENDOR_ID => VENDOR_ID,
            reg::DEVICE_FEATURES => match inner.device_features_sel {
                0 => Self::offered(&inner) as u32,
                1 => (Self::offered(&inner) >> 32) as u32,
                _ => 0,
            },
            reg::QUEUE_NUM_MAX => q.map_or(0, |q| u32::from(q.max_size())),
            reg::QUEUE_READY => q.map_or(0, |q| u32::from(q.ready())),
            reg::STATUS => inner.status,
            reg::CONFIG_GENERATION => inner.config_generation,
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    fn write(&self, offset: u64, data: &[u8]) {
        // The registers of the I/O path do not wait for a device thread that holds the lock.
        if let Ok(bytes) = <[u8; 4]>::try_from(data) {
            let v = u32::from_le_bytes(bytes);
            match offset {
                reg::QUEUE_NOTIFY => {
                    if let Some(evt) = self.shared.queue_evts.get(v as usize) {
                        let _ = evt.write(1);
                    }
                    return;
                }
                reg::INTERRUPT_ACK => {
                    self.shared.interrupt_status.fetch_and(!v, Ordering::AcqRel);
                    return;
                }
                _ => {}
            }
        }
        let mut inner = self.lock();
        if offset >= reg::CONFIG {
            inner.device.write_config(offset - reg::CONFIG, data);
            self.after_work(&mut inner, false);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else { return };
        if !offset.is_multiple_of(4) {
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            reg::DEVICE_FEATURES_SEL => inner.device_features_sel = v,
            reg::DRIVER_FEATURES_SEL => inner.driver_features_sel = v,
            reg::DRIVER_FEATURES => {
                if inner.status & status::FEATURES_OK == 0 {
                    match inner.driver_features_sel {
                        0 => inner.driver_features = (inner.driver_features & !0xffff_ffff) | u64::from(v),
                        1 => {
                            inner.driver_features =
                                (inner.driver_features & 0xffff_ffff) | (u64::from(v) << 32)
                        }
                        _ => {}
                    }
                }
            }
            reg::QUEUE_SEL => inner.queue_sel = v,
            reg::STATUS => self.write_status(&mut inner, v),
            _ => Self::queue_write(&mut inner, offset, v),
        }
    }
}

/// Packed rings over the addresses the driver wrote into `queues` (with a packed ring, the
/// descriptor area is the ring, the driver and device areas its event suppression structures).
fn packed_queues(queues: &[Queue], features: u64) -> Vec<PackedQueue> {
    let event_idx = features & crate::virtio::VIRTIO_F_RING_EVENT_IDX != 0;
    queues
        .iter()
        .map(|q| {
            let size = if q.ready() { q.size() } else { 0 };
            PackedQueue::new(PackedRing::new(size, q.desc_table(), q.avail_ring(), q.used_ring(), event_idx))
        })
        .collect()
}

impl MmioTransport {
    /// The features offered: the device's, plus `VIRTIO_F_RING_EVENT_IDX`, which the transport
    /// implements for every device (used-ring interrupts follow `used_event`, and [`Self::rearm`]
    /// keeps `avail_event` current).
    fn offered(inner: &Inner) -> u64 {
        let packed = if inner.offer_packed { VIRTIO_F_RING_PACKED } else { 0 };
        inner.device.features() | crate::virtio::VIRTIO_F_RING_EVENT_IDX | packed
    }

    fn reset(inner: &mut Inner) {
        inner.device.reset();
        for q in &mut inner.queues {
            q.reset();
        }
        inner.status = 0;
        inner.driver_features = 0;
        inner.device_features_sel = 0;
        inner.driver_features_sel = 0;
        inner.queue_sel = 0;
        inner.activated = false;
        inner.broken = None;
        inner.packed = None;
        inner.starved.clear();
    }

    fn write_status(&self, inner: &mut Inner, value: u32) {
        if value == 0 {
            Self::reset(inner);
            self.shared.interrupt_status.store(0, Ordering::Release);
            return;
        }
        let mut value = value & !status::DEVICE_NEEDS_RESET;
        if value & status::FEATURES_OK != 0 && inner.status & status::FEATURES_OK == 0 {
            let offered = Self::offered(inner);
            let ok = inner.driver_features & !offered == 0 && inner.driver_features & VIRTIO_F_VERSION_1 != 0;
            if !ok {
                value &= !status::FEATURES_OK;
            } else {
                let event_idx = inner.driver_features & crate::virtio::VIRTIO_F_RING_EVENT_IDX != 0;
                for q in &mut inner.queues {
                    q.set_event_idx(event_idx);
                }
            }
        }
        let was_active = inner.activated;
        if value & status::DRIVER_OK != 0 && !inner.activated {
            if inner.driver_features & VIRTIO_F_RING_PACKED != 0 {
                inner.packed = Some(packed_queues(&inner.queues, inner.driver_features));
            }
            let queues_ok = match &inner.packed {
                Some(p) => inner.queues.iter().zip(p).all(|(q, p)| !q.ready() || p.ring.is_valid(&inner.mem)),
                None => inner.queues.iter().all(|q| !q.ready() || q.is_valid(&inner.mem)),
            };
            let features_ok = value & status::FEATURES_OK != 0;
            let res = if queues_ok && features_ok {
                inner.device.activate(inner.driver_features).map_err(|e| e.to_string())
            } else {
                Err("DRIVER_OK without FEATURES_OK or with an invalid queue".to_string())
            };
            match res {
                Ok(()) => inner.activated = true,
                Err(e) => {
                    inner.broken = Some(e);
                    value |= status::DEVICE_NEEDS_RESET;
                }
            }
        }
        inner.status = value | (inner.status & status::DEVICE_NEEDS_RESET);
        if inner.activated && !was_active {
            // Buffers made available before DRIVER_OK are served now.
            for evt in &self.shared.queue_evts {
                let _ = evt.write(1);
            }
        }
    }

    fn queue_write(inner: &mut Inner, offset: u64, v: u32) {
        let setup_allowed = inner.status & status::DRIVER_OK == 0;
        let Some(q) = inner.queues.get_mut(inner.queue_sel as usize) else { return };
        if !setup_allowed && offset != reg::QUEUE_READY {
            return;
        }
        match offset {
            reg::QUEUE_NUM => q.set_size(v as u16),
            reg::QUEUE_READY => q.set_ready(v == 1),
            reg::QUEUE_DESC_LOW => q.set_desc_table_address(Some(v), None),
            reg::QUEUE_DESC_HIGH => q.set_desc_table_address(None, Some(v)),
            reg::QUEUE_DRIVER_LOW => q.set_avail_ring_address(Some(v), None),
            reg::QUEUE_DRIVER_HIGH => q.set_avail_ring_address(None, Some(v)),
            reg::QUEUE_DEVICE_LOW => q.set_used_ring_address(Some(v), None),
            reg::QUEUE_DEVICE_HIGH => q.set_used_ring_address(None, Some(v)),
            _ => {}
        }
    }
}
