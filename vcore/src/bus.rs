//! I/O buses: the port I/O (PIO) and MMIO address spaces where devices live.
//!
//! A vCPU exit for an I/O port or an MMIO address outside guest RAM is dispatched to the
//! [`BusDevice`] whose range holds the address. Ranges never overlap: inserting one that does is
//! refused with [`BusError::Overlap`].

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

/// A device on a bus. Calls come from vCPU threads, so devices use interior mutability.
pub trait BusDevice: Send + Sync {
    /// The guest reads `data.len()` bytes at `offset` from the start of the device's range.
    fn read(&self, offset: u64, data: &mut [u8]);
    /// The guest writes `data` at `offset` from the start of the device's range.
    fn write(&self, offset: u64, data: &[u8]);
}

/// A half-open address range `[base, base + len)` on a bus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct BusRange {
    /// First address.
    pub base: u64,
    /// Length in bytes (at least 1).
    pub len: u64,
}

impl BusRange {
    /// One past the last address, saturating at `u64::MAX`.
    pub fn end(&self) -> u64 {
        self.base.saturating_add(self.len)
    }

    fn overlaps(&self, other: &BusRange) -> bool {
        self.base < other.end() && other.base < self.end()
    }
}

/// Errors of bus operations.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BusError {
    /// The new range overlaps a registered one.
    #[error("bus range {new_base:#x}+{new_len:#x} overlaps the registered range {base:#x}+{len:#x}")]
    Overlap {
        /// Start of the refused range.
        new_base: u64,
        /// Length of the refused range.
        new_len: u64,
        /// Start of the range already registered.
        base: u64,
        /// Length of the range already registered.
        len: u64,
    },
    /// The range is empty or wraps around the address space.
    #[error("bus range {base:#x}+{len:#x} is empty or wraps around")]
    BadRange {
        /// Start of the refused range.
        base: u64,
        /// Length of the refused range.
        len: u64,
    },
    /// No device is registered at this base address.
    #[error("no device registered at {base:#x}")]
    NotFound {
        /// The address asked for.
        base: u64,
    },
}

type Entry = (BusRange, Arc<dyn BusDevice>);

/// An address space of devices, shared by every vCPU thread of a VM.
#[derive(Default, Clone)]
pub struct Bus {
    devices: Arc<RwLock<BTreeMap<u64, Entry>>>,
}

impl std::fmt::Debug for Bus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        f.debug_list().entries(map.values().map(|(r, _)| r)).finish()
    }
}

impl Bus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `device` on `[base, base + len)`; refuses an empty, wrapping or overlapping range.
    pub fn insert(&self, base: u64, len: u64, device: Arc<dyn BusDevice>) -> Result<(), BusError> {
        if len == 0 || base.checked_add(len - 1).is_none() {
            return Err(BusError::BadRange { base, len });
        }
        let new = BusRange { base, len };
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        // Only the nearest range below and the nearest at or above can overlap.
        let below = map.range(..base).next_back().map(|(_, (r, _))| *r);
        let above = map.range(base..).next().map(|(_, (r, _))| *r);
        if let Some(r) = below.into_iter().chain(above).find(|r| r.overlaps(&new)) {
            return Err(BusError::Overlap { new_base: base, new_len: len, base: r.base, len: r.len });
        }
        map.insert(base, (new, device));
        Ok(())
    }

    /// Removes the device registered at `base`.
    pub fn remove(&self, base: u64) -> Result<Arc<dyn BusDevice>, BusError> {
        let mut map = self.devices.write().unwrap_or_else(|e| e.into_inner());
        map.remove(&base).map(|(_, d)| d).ok_or(BusError::NotFound { base })
    }

    /// The registered ranges, in address order.
    pub fn ranges(&self) -> Vec<BusRange> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        map.values().map(|(r, _)| *r).collect()
    }

    fn find(&self, addr: u64) -> Option<(u64, Arc<dyn BusDevice>)> {
        let map = self.devices.read().unwrap_or_else(|e| e.into_inner());
        let (_, (range, dev)) = map.range(..=addr).next_back()?;
        (addr < range.end()).then(|| (addr - range.base, Arc::clone(dev)))
    }

    /// Dispatches a read; returns false (and fills `data` with `0xff`) if no device holds `addr`.
    pub fn read(&self, addr: u64, data: &mut [u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.read(offset, data);
                true
            }
            None => {
                data.fill(0xff);
                false
            }
        }
    }

    /// Dispatches a write; returns false if no device holds `addr` (the write is dropped).
    pub fn write(&self, addr: u64, data: &[u8]) -> bool {
        match self.find(addr) {
            Some((offset, dev)) => {
                dev.write(offset, data);
                true
            }
            None => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Recorder(Mutex<Vec<(u64, Vec<u8>)>>);
    impl BusDevice for Recorder {
        fn read(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write(&self, offset: u64, data: &[u8]) {
            self.0.lock().unwrap().push((offset, data.to_vec()));
        }
    }

    #[test]
    fn dispatches_by_offset() {
        let bus = Bus::new();
        let dev = Arc::new(Recorder::default());
        bus.insert(0x3f8, 8, dev.clone()).unwrap();
        assert!(bus.write(0x3fa, &[7]));
        assert!(!bus.write(0x400, &[7]));
        let mut b = [0u8; 1];
        assert!(bus.read(0x3f9, &mut b));
        assert_eq!(b, [1]);
        assert!(!bus.read(0x3f7, &mut b));
        assert_eq!(b, [0xff]);
        assert_eq!(dev.0.lock().unwrap().as_slice(), &[(2, vec![7])]);
    }

    #[test]
    fn overlap_is_refused() {
        let bus = Bus::new();
        bus.insert(0x1000, 0x100, Arc::new(Recorder::default())).unwrap();
        let err = bus.insert(0x10ff, 1, Arc::new(Recorder::default())).unwrap_err();
        assert!(matches!(err, BusError::Overlap { base: 0x1000, .. }));
        assert!(bus.insert(0x1100, 1, Arc::new(Recorder::default())).is_ok());
        assert!(matches!(bus.insert(5, 0, Arc::new(Recorder::default())), Err(BusError::BadRange { .. })));
        assert!(matches!(bus.remove(0x2000), Err(BusError::NotFound { .. })));
        bus.remove(0x1000).unwrap();
        assert!(bus.insert(0x1000, 0xff, Arc::new(Recorder::default())).is_ok());
    }

    proptest! {
        /// The bus accepts exactly the ranges that overlap none before them, and every address
        /// resolves to the unique accepted range that holds it.
        #[test]
        fn insert_matches_a_naive_model(ranges in proptest::collection::vec((0u64..200, 1u64..20), 1..30)) {
            let bus = Bus::new();
            let mut accepted: Vec<BusRange> = Vec::new();
            for (base, len) in ranges {
                let r = BusRange { base, len };
                let clash = accepted.iter().any(|a| a.overlaps(&r));
                let res = bus.insert(base, len, Arc::new(Recorder::default()));
                prop_assert_eq!(res.is_err(), clash);
                if !clash { accepted.push(r); }
            }
            for addr in 0..230u64 {
                let mut b = [0u8];
                let held = accepted.iter().find(|a| a.base <= addr && addr < a.end());
                prop_assert_eq!(bus.read(addr, &mut b), held.is_some());
                if let Some(a) = held { prop_assert_eq!(b[0], (addr - a.base) as u8); }
            }
        }
    }
}
