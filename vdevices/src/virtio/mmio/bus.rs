//! The register window: what a vCPU's MMIO access (or the harness) reads and writes.

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
