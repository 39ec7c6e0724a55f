//! VM configuration: what a [`crate::Vm`] looks like, as plain serde data.
//!
//! A [`VmConfig`] is validated by [`VmConfig::validate`] (called by the builder), which returns a
//! typed [`ConfigError`] instead of letting KVM fail later with an opaque errno.

use serde::{Deserialize, Serialize};

/// Start of the 32-bit MMIO hole: RAM above this guest-physical address is moved above 4 GiB.
pub const MMIO_HOLE_START: u64 = 0xC000_0000;
/// End of the 32-bit MMIO hole (4 GiB): where high RAM starts.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Guest page size used for memory layout, dirty tracking and the built-in guests.
pub const PAGE_SIZE: u64 = 4096;
/// Largest guest memory the builder accepts (the identity map of the built-in guests covers it).
pub const MAX_MEM_MIB: u64 = 64 * 1024;
/// Most vCPUs vcore supports (8-bit xAPIC ids).
pub const MAX_VCPUS: u16 = 255;
/// Default number of entries of each vCPU's KVM dirty ring.
pub const DEFAULT_DIRTY_RING_ENTRIES: u32 = 4096;

/// How KVM tracks the pages the guest writes (needed by live migration).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum DirtyTracking {
    /// No tracking by KVM (the VMM's own writes are still tracked by the memory bitmap).
    #[default]
    None,
    /// `KVM_GET_DIRTY_LOG` bitmaps per memory slot, with manual protection
    /// (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`) when the host supports it.
    Log,
    /// Per-vCPU KVM dirty rings (`KVM_CAP_DIRTY_LOG_RING`); enabled before any vCPU exists.
    Ring {
        /// Entries per vCPU ring: a power of two; each entry is 16 bytes.
        entries: u32,
    },
}

/// Configuration of one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// Guest RAM in MiB.
    pub mem_mib: u64,
    /// Number of vCPUs (at most 255: vcore gives vCPUs 8-bit xAPIC ids; KVM may allow fewer).
    #[serde(default = "default_vcpus")]
    pub vcpus: u16,
    /// Dirty page tracking mode.
    #[serde(default)]
    pub dirty_tracking: DirtyTracking,
    /// Back guest RAM with transparent huge pages (`madvise(MADV_HUGEPAGE)`, as QEMU does for
    /// its RAM blocks). Fewer page faults on first touch and on reads of untouched memory, and
    /// 2 MiB mappings for the guest; KVM splits them while dirty logging is on. Off by default:
    /// on kvm-pvm it made migrations of a writing guest slower (see the README).
    #[serde(default)]
    pub huge_pages: bool,
    /// Allocate all guest RAM when the VM is built (`MADV_POPULATE_WRITE`, QEMU's
    /// `-mem-prealloc`), so that no first touch of a page faults later: for a migration
    /// destination, which otherwise takes one page fault per page it receives. Costs the whole
    /// memory size up front, and the build takes as long as the faults would.
    #[serde(default)]
    pub prealloc: bool,
}

fn default_vcpus() -> u16 {
    1
}

impl Default for VmConfig {
    fn default() -> Self {
        VmConfig {
            mem_mib: 128,
            vcpus: 1,
            dirty_tracking: DirtyTracking::None,
            huge_pages: false,
            prealloc: false,
        }
    }
}

/// A contiguous range of guest RAM; each one becomes one KVM memory slot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RamRange {
    /// Guest-physical start address.
    pub guest_addr: u64,
    /// Size in bytes.
    pub size: u64,
}

impl RamRange {
    /// One past the last byte of the range.
    pub fn end(&self) -> u64 {
        self.guest_addr + self.size
    }
}

/// Errors found in a [`VmConfig`] before any KVM call is made.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The guest has no memory.
    #[error("guest memory must be at least 1 MiB, got {mem_mib} MiB")]
    ZeroMemory {
        /// The configured size.
        mem_mib: u64,
    },
    /// The guest has more memory than vcore supports.
    #[error("guest memory of {mem_mib} MiB exceeds the supported maximum of {max_mib} MiB")]
    TooMuchMemory {
        /// The configured size.
        mem_mib: u64,
        /// The largest accepted size.
        max_mib: u64,
    },
    /// No vCPU.
    #[error("a VM needs at least one vCPU")]
    ZeroVcpus,
    /// More vCPUs than KVM allows on this host.
    #[error(
        "{requested} vCPUs requested but at most {max} are possible (this host's KVM limit, and 255 xAPIC ids)"
    )]
    TooManyVcpus {
        /// The configured count.
        requested: u16,
        /// The lower of `KVM_CAP_MAX_VCPUS` and [`MAX_VCPUS`].
        max: usize,
    },
    /// The dirty ring size is not usable.
    #[error("dirty ring of {entries} entries: must be a power of two between 256 (one page) and 65536")]
    BadDirtyRingSize {
        /// The configured entry count.
        entries: u32,
    },
    /// Explicit RAM ranges overlap.
    #[error("RAM ranges overlap: {a:#x}..{a_end:#x} and {b:#x}..{b_end:#x}")]
    OverlappingRanges {
        /// Start of the first range.
        a: u64,
        /// End of the first range.
        a_end: u64,
        /// Start of the second range.
        b: u64,
        /// End of the second range.
        b_end: u64,
    },
    /// A RAM range is empty, unaligned or wraps around.
    #[error("RAM range at {guest_addr:#x} of {size:#x} bytes is empty, not page aligned or wraps")]
    BadRange {
        /// Start of the range.
        guest_addr: u64,
        /// Size of the range.
        size: u64,
    },
}

impl VmConfig {
    /// Checks the configuration against vcore's limits and `max_vcpus` (the host's KVM limit).
    pub fn validate(&self, max_vcpus: usize) -> Result<(), ConfigError> {
        if self.mem_mib == 0 {
            return Err(ConfigError::ZeroMemory { mem_mib: self.mem_mib });
        }
        if self.mem_mib > MAX_MEM_MIB {
            return Err(ConfigError::TooMuchMemory { mem_mib: self.mem_mib, max_mib: MAX_MEM_MIB });
        }
        if self.vcpus == 0 {
            return Err(ConfigError::ZeroVcpus);
        }
        let max = max_vcpus.min(usize::from(MAX_VCPUS));
        if usize::from(self.vcpus) > max {
            return Err(ConfigError::TooManyVcpus { requested: self.vcpus, max });
        }
        if let DirtyTracking::Ring { entries } = self.dirty_tracking
            && (!entries.is_power_of_two() || !(256..=65536).contains(&entries))
        {
            return Err(ConfigError::BadDirtyRingSize { entries });
        }
        Ok(())
    }

    /// The guest RAM ranges: everything below the 32-bit MMIO hole, the rest above 4 GiB.
    pub fn ram_ranges(&self) -> Vec<RamRange> {
        ram_ranges(self.mem_mib << 20)
    }
}

/// Splits `mem_bytes` of RAM around the 32-bit MMIO hole `[3 GiB, 4 GiB)`.
pub fn ram_ranges(mem_bytes: u64) -> Vec<RamRange> {
    if mem_bytes <= MMIO_HOLE_START {
        return vec![RamRange { guest_addr: 0, size: mem_bytes }];
    }
    vec![
        RamRange { guest_addr: 0, size: MMIO_HOLE_START },
        RamRange { guest_addr: MMIO_HOLE_END, size: mem_bytes - MMIO_HOLE_START },
    ]
}

/// Checks a list of RAM ranges: each non-empty, page aligned, not wrapping, and no two overlapping.
pub fn check_ranges(ranges: &[RamRange]) -> Result<(), ConfigError> {
    for r in ranges {
        let aligned = r.guest_addr % PAGE_SIZE == 0 && r.size % PAGE_SIZE == 0;
        if r.size == 0 || !aligned || r.guest_addr.checked_add(r.size).is_none() {
            return Err(ConfigError::BadRange { guest_addr: r.guest_addr, size: r.size });
        }
    }
    let mut sorted: Vec<RamRange> = ranges.to_vec();
    sorted.sort_by_key(|r| r.guest_addr);
    for w in sorted.windows(2) {
        if w[0].end() > w[1].guest_addr {
            return Err(ConfigError::OverlappingRanges {
                a: w[0].guest_addr,
                a_end: w[0].end(),
                b: w[1].guest_addr,
                b_end: w[1].end(),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn small_guest_is_one_range() {
        let cfg = VmConfig { mem_mib: 256, ..Default::default() };
        assert_eq!(cfg.ram_ranges(), vec![RamRange { guest_addr: 0, size: 256 << 20 }]);
    }

    #[test]
    fn large_guest_skips_the_hole() {
        let r = ram_ranges(8 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[0].end(), MMIO_HOLE_START);
        assert_eq!(r[1].guest_addr, MMIO_HOLE_END);
        assert_eq!(r[0].size + r[1].size, 8 << 30);
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let zero = VmConfig { mem_mib: 0, ..Default::default() };
        assert!(matches!(zero.validate(4), Err(ConfigError::ZeroMemory { .. })));
        let many = VmConfig { vcpus: 9, ..Default::default() };
        assert!(matches!(many.validate(8), Err(ConfigError::TooManyVcpus { .. })));
        let ring = VmConfig { dirty_tracking: DirtyTracking::Ring { entries: 100 }, ..Default::default() };
        assert!(matches!(ring.validate(8), Err(ConfigError::BadDirtyRingSize { .. })));
        let small = VmConfig { dirty_tracking: DirtyTracking::Ring { entries: 128 }, ..Default::default() };
        assert!(matches!(small.validate(8), Err(ConfigError::BadDirtyRingSize { .. })), "below one page");
        let huge = VmConfig { mem_mib: MAX_MEM_MIB + 1, ..Default::default() };
        assert!(matches!(huge.validate(8), Err(ConfigError::TooMuchMemory { .. })));
    }

    #[test]
    fn overlapping_ranges_are_refused() {
        let r = [RamRange { guest_addr: 0, size: 0x2000 }, RamRange { guest_addr: 0x1000, size: 0x1000 }];
        assert!(matches!(check_ranges(&r), Err(ConfigError::OverlappingRanges { .. })));
        let r = [RamRange { guest_addr: 0x1000, size: 0 }];
        assert!(matches!(check_ranges(&r), Err(ConfigError::BadRange { .. })));
    }

    #[test]
    fn config_json_rejects_unknown_fields() {
        let ok: VmConfig =
            serde_json::from_str(r#"{"mem_mib": 64, "dirty_tracking": {"ring": {"entries": 1024}}}"#)
                .unwrap();
        assert_eq!(ok.vcpus, 1);
        assert_eq!(ok.dirty_tracking, DirtyTracking::Ring { entries: 1024 });
        assert!(serde_json::from_str::<VmConfig>(r#"{"mem_mib": 64, "memory": 3}"#).is_err());
    }

    proptest! {
        #[test]
        fn layout_covers_memory_exactly(mib in 1u64..=MAX_MEM_MIB) {
            let ranges = ram_ranges(mib << 20);
            prop_assert_eq!(ranges.iter().map(|r| r.size).sum::<u64>(), mib << 20);
            prop_assert!(check_ranges(&ranges).is_ok());
            for r in &ranges {
                prop_assert!(r.end() <= MMIO_HOLE_START || r.guest_addr >= MMIO_HOLE_END);
            }
        }

        #[test]
        fn check_ranges_agrees_with_pairwise_overlap(
            raw in proptest::collection::vec((0u64..64, 1u64..16), 1..6)
        ) {
            let ranges: Vec<RamRange> = raw.iter()
                .map(|&(a, s)| RamRange { guest_addr: a * PAGE_SIZE, size: s * PAGE_SIZE })
                .collect();
            let overlap = ranges.iter().enumerate().any(|(i, a)| ranges.iter().skip(i + 1)
                .any(|b| a.guest_addr < b.end() && b.guest_addr < a.end()));
            prop_assert_eq!(check_ranges(&ranges).is_err(), overlap);
        }
    }
}
