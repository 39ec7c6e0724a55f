//! Dirty-page tracking: one [`DirtyBitmap`] type and the [`DirtyTracker`] sources that fill it.
//!
//! Sources: KVM's dirty log ([`KvmDirtyLog`], with manual protection and chunked
//! `KVM_CLEAR_DIRTY_LOG` where the host has it), KVM's per-vCPU dirty rings ([`KvmDirtyRing`]),
//! and the VMM's own per-region `AtomicBitmap` of writes devices make ([`VmmBitmap`]). All bitmap
//! work is word-at-a-time.

use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex};

use vcore::Vm;
use vm_memory::GuestMemoryBackend;

use crate::sys::{self, DirtyRing};

/// One bit per guest page of a memory slot.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DirtyBitmap {
    words: Vec<u64>,
    pages: u64,
}

impl DirtyBitmap {
    /// An all-clean bitmap of `pages` pages.
    pub fn new(pages: u64) -> Self {
        DirtyBitmap { words: vec![0; pages.div_ceil(64) as usize], pages }
    }

    /// An all-dirty bitmap of `pages` pages.
    pub fn all_set(pages: u64) -> Self {
        let mut b = DirtyBitmap { words: vec![u64::MAX; pages.div_ceil(64) as usize], pages };
        b.trim();
        b
    }

    /// A bitmap from KVM-style words (bit `i % 64` of word `i / 64` is page `i`).
    pub fn from_words(mut words: Vec<u64>, pages: u64) -> Self {
        words.resize(pages.div_ceil(64) as usize, 0);
        let mut b = DirtyBitmap { words, pages };
        b.trim();
        b
    }

    fn trim(&mut self) {
        let tail = self.pages % 64;
        if tail != 0
            && let Some(last) = self.words.last_mut()
        {
            *last &= (1u64 << tail) - 1;
        }
    }

    /// Pages covered.
    pub fn pages(&self) -> u64 {
        self.pages
    }

    /// The words.
    pub fn words(&self) -> &[u64] {
        &self.words
    }

    /// Marks page `page` dirty (ignored past the end).
    pub fn set(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] |= 1 << (page % 64);
        }
    }

    /// Marks page `page` clean (ignored past the end).
    pub fn unset(&mut self, page: u64) {
        if page < self.pages {
            self.words[(page / 64) as usize] &= !(1 << (page % 64));
        }
    }

    /// Whether page `page` is dirty.
    pub fn is_set(&self, page: u64) -> bool {
        page < self.pages && self.words[(page / 64) as usize] & (1 << (page % 64)) != 0
    }

    /// ORs `other` (same size, or shorter) into this bitmap.
    pub fn merge(&mut self, other: &DirtyBitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
        self.trim();
    }

    /// ORs raw words into this bitmap.
    pub fn merge_words(&mut self, words: &[u64]) {
        for (a, b) in self.words.iter_mut().zip(words) {
            *a |= *b;
        }
        self.trim();
    }

    /// Number of dirty pages.
    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    /// Whether no page is dirty.
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Clears every bit.
    pub fn clear(&mut self) {
        self.words.fill(0);
    }

    /// Iterates maximal runs of dirty pages as `(first_page, count)`.
    pub fn runs(&self) -> Runs<'_> {
        Runs { words: &self.words, pages: self.pages, next: 0 }
    }
}

/// Iterator over runs of set bits; skips clean words whole.
#[derive(Debug)]
pub struct Runs<'a> {
    words: &'a [u64],
    pages: u64,
    next: u64,
}

impl Runs<'_> {
    /// First set bit at or after `from`.
    fn next_bit(&self, from: u64, set: bool) -> u64 {
        let mut i = from;
        while i < self.pages {
            let w = self.words[(i / 64) as usize];
            let w = if set { w } else { !w };
            let masked = w & (u64::MAX << (i % 64));
            if masked != 0 {
                return ((i / 64) * 64 + u64::from(masked.trailing_zeros())).min(self.pages);
            }
            i = (i / 64 + 1) * 64;
        }
        self.pages
    }
}

impl Iterator for Runs<'_> {
    type Item = (u64, u64);
    fn next(&mut self) -> Option<(u64, u64)> {
        let start = self.next_bit(self.next, true);
        if start >= self.pages {
            self.next = self.pages;
            return None;
        }
        let end = self.next_bit(start, false);
        self.next = end;
        Some((start, end - start))
    }
}

/// Errors of dirty tracking.
#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    /// Switching dirty logging on a slot failed.
    #[error("switching dirty logging")]
    Vm(#[from] vcore::VmError),
    /// A dirty-log ioctl failed.
    #[error("{op} on slot {slot}")]
    Ioctl {
        /// The ioctl.
        op: &'static str,
        /// The slot.
        slot: u32,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping a vCPU's dirty ring failed.
    #[error("mapping the dirty ring of vCPU {vcpu}")]
    RingMap {
        /// The vCPU.
        vcpu: u8,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The VM was not built with a dirty ring.
    #[error("the VM has no dirty ring (build it with DirtyTracking::Ring)")]
    NoRing,
    /// The ring reported a slot or offset outside guest memory.
    #[error("dirty ring entry for slot {slot} page {page} is outside guest memory")]
    BadRingEntry {
        /// The slot.
        slot: u32,
        /// The page offset.
        page: u64,
    },
}

/// A source of dirty pages. `fetch` ORs the pages dirtied since the previous fetch into one
/// bitmap per slot; `before_send` is called with each chunk right before its pages are read.
pub trait DirtyTracker: Send {
    /// Begins tracking; pages written from now on are reported.
    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError>;
    /// ORs the pages dirtied since the last fetch into `maps` (one per slot).
    fn fetch(&mut self, vm: &Vm, maps: &mut [DirtyBitmap]) -> Result<(), DirtyError>;
    /// Re-arms tracking for `bits` of `slot` starting at `first_page` (a multiple of 64) before
    /// the engine reads those pages. Only manual-protect dirty logs need it.
    fn before_send(
        &mut self,
        _vm: &Vm,
        _slot: u32,
        _first_page: u64,
        _bits: &[u64],
    ) -> Result<(), DirtyError> {
        Ok(())
    }
    /// Ends tracking (dirty logging off).
    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError>;
}

/// Switches KVM dirty logging of every slot of `vm`.
fn set_logging(vm: &Vm, on: bool) -> Result<(), DirtyError> {
    for s in vm.slots() {
        vm.set_dirty_logging(s.slot, on)?;
    }
    Ok(())
}

/// KVM's dirty log (`KVM_GET_DIRTY_LOG`), with `KVM_CLEAR_DIRTY_LOG` in chunks when the VM has
/// manual protection (so fetching does not write-protect all memory at once).
#[derive(Debug, Default)]
pub struct KvmDirtyLog {
    started: bool,
}

impl DirtyTracker for KvmDirtyLog {
    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        set_logging(vm, true)?;
        self.started = true;
        Ok(())
    }

    fn fetch(&mut self, vm: &Vm, maps: &mut [DirtyBitmap]) -> Result<(), DirtyError> {
        for (s, map) in vm.slots().iter().zip(maps.iter_mut()) {
            let words = vm.dirty_log(s.slot).map_err(|e| match e {
                vcore::VmError::Kvm { op, source } => DirtyError::Ioctl {
                    op,
                    slot: s.slot,
                    source: std::io::Error::from_raw_os_error(source.errno()),
                },
                other => DirtyError::Vm(other),
            })?;
            map.merge_words(&words);
        }
        Ok(())
    }

    fn before_send(&mut self, vm: &Vm, slot: u32, first_page: u64, bits: &[u64]) -> Result<(), DirtyError> {
        if !vm.dirty_log_manual_protect() || bits.iter().all(|&w| w == 0) {
            return Ok(());
        }
        let pages = vm.slots().get(slot as usize).map(|s| s.pages()).unwrap_or(0);
        let num = (bits.len() as u64 * 64).min(pages.saturating_sub(first_page));
        sys::clear_dirty_log(vm.vm_fd(), slot, first_page, num as u32, bits)
            .map_err(|source| DirtyError::Ioctl { op: "KVM_CLEAR_DIRTY_LOG", slot, source })
    }

    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        if self.started {
            set_logging(vm, false)?;
            self.started = false;
        }
        Ok(())
    }
}

/// KVM's per-vCPU dirty rings (`KVM_CAP_DIRTY_LOG_RING`): harvest every ring, then
/// `KVM_RESET_DIRTY_RINGS`.
///
/// While it tracks, a vCPU whose ring fills up harvests all rings itself (the tracker installs
/// a [`vcore::DirtyRingFullHandler`]) into a pending map that the next `fetch` takes, so a
/// busy guest never waits for the migration thread.
#[derive(Debug, Default)]
pub struct KvmDirtyRing {
    shared: Option<Arc<RingShared>>,
    started: bool,
}

/// The rings and what was harvested from them between fetches, shared with vCPU threads.
#[derive(Debug)]
struct RingShared {
    state: Mutex<RingState>,
    /// The VM's fd (a duplicate), for `KVM_RESET_DIRTY_RINGS` from a vCPU thread.
    vm_fd: OwnedFd,
}

#[derive(Debug)]
struct RingState {
    rings: Vec<DirtyRing>,
    /// Pages harvested and not fetched yet, per slot.
    pending: Vec<DirtyBitmap>,
    /// The first entry that named no page of the VM.
    bad: Option<DirtyError>,
}

impl RingShared {
    /// Harvests every ring into `pending` and resets the rings; returns the entries harvested.
    fn harvest(&self) -> Result<u64, DirtyError> {
        let mut guard = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let st = &mut *guard;
        let mut n = 0u64;
        for ring in &mut st.rings {
            ring.harvest(|slot, page| {
                n += 1;
                match st.pending.get_mut(slot as usize) {
                    Some(m) if page < m.pages() => m.set(page),
                    _ => {
                        st.bad.get_or_insert(DirtyError::BadRingEntry { slot, page });
                    }
                }
            });
        }
        if n > 0 {
            sys::reset_dirty_rings(&self.vm_fd).map_err(|source| DirtyError::Ioctl {
                op: "KVM_RESET_DIRTY_RINGS",
                slot: 0,
                source,
            })?;
        }
        Ok(n)
    }
}

impl DirtyTracker for KvmDirtyRing {
    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        let entries = vm.dirty_ring_entries().ok_or(DirtyError::NoRing)?;
        let shared = match &self.shared {
            Some(s) => Arc::clone(s),
            None => {
                let mut rings = Vec::new();
                for id in 0..vm.vcpu_count() {
                    let fd = vm.vcpu_raw_fd(id).ok_or(DirtyError::NoRing)?;
                    let ring = DirtyRing::map(fd, entries)
                        .map_err(|source| DirtyError::RingMap { vcpu: id, source })?;
                    rings.push(ring);
                }
                let vm_fd = sys::dup_fd(vm.vm_fd()).map_err(|source| DirtyError::Ioctl {
                    op: "dup(vm fd)",
                    slot: 0,
                    source,
                })?;
                let state = RingState { rings, pending: empty_maps(vm), bad: None };
                let s = Arc::new(RingShared { state: Mutex::new(state), vm_fd });
                self.shared = Some(Arc::clone(&s));
                s
            }
        };
        set_logging(vm, true)?;
        vm.set_dirty_ring_full_handler(Some(Arc::new(move |_vcpu| shared.harvest().is_ok_and(|n| n > 0))));
        self.started = true;
        Ok(())
    }

    fn fetch(&mut self, _vm: &Vm, maps: &mut [DirtyBitmap]) -> Result<(), DirtyError> {
        let Some(shared) = &self.shared else { return Ok(()) };
        shared.harvest()?;
        let mut st = shared.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for (map, pending) in maps.iter_mut().zip(st.pending.iter_mut()) {
            map.merge(pending);
            pending.clear();
        }
        st.bad.take().map_or(Ok(()), Err)
    }

    fn stop(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        if self.started {
            vm.set_dirty_ring_full_handler(None);
            set_logging(vm, false)?;
            self.started = false;
        }
        Ok(())
    }
}

/// The VMM's own writes into guest memory (device DMA), from the regions' `AtomicBitmap`s.
#[derive(Debug, Default)]
pub struct VmmBitmap;

impl DirtyTracker for VmmBitmap {
    fn start(&mut self, vm: &Vm) -> Result<(), DirtyError> {
        for r in vm.memory().iter() {
            vm_memory::MmapRegion::bitmap(r).reset();
        }
        Ok(())
    }

    fn fetch(&mut self, vm: &Vm, maps: &mut [DirtyBitmap]) -> Result<(), DirtyError> {
        for (r, map) in vm.memory().iter().zip(maps.iter_mut()) {
            map.merge_words(&vm_memory::MmapRegion::bitmap(r).get_and_reset());
        }
        Ok(())
    }

    fn stop(&mut self, _vm: &Vm) -> Result<(), DirtyError> {
        Ok(())
    }
}

/// The tracker for `vm`'s configuration: its KVM source (ring or log) plus the VMM bitmap.
pub fn trackers_for(vm: &Vm) -> Vec<Box<dyn DirtyTracker>> {
    let kvm: Box<dyn DirtyTracker> = if vm.dirty_ring_entries().is_some() {
        Box::new(KvmDirtyRing::default())
    } else {
        Box::new(KvmDirtyLog::default())
    };
    vec![kvm, Box::new(VmmBitmap)]
}

/// One empty bitmap per slot of `vm`.
pub fn empty_maps(vm: &Vm) -> Vec<DirtyBitmap> {
    vm.slots().iter().map(|s| DirtyBitmap::new(s.pages())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn model_runs(bits: &[bool]) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < bits.len() {
            if bits[i] {
                let s = i;
                while i < bits.len() && bits[i] {
                    i += 1;
                }
                out.push((s as u64, (i - s) as u64));
            } else {
                i += 1;
            }
        }
        out
    }

    proptest! {
        #[test]
        fn bitmap_matches_a_vec_bool_model(
            pages in 1u64..700,
            sets in proptest::collection::vec(0u64..800, 0..200),
            others in proptest::collection::vec(0u64..800, 0..100),
            unsets in proptest::collection::vec(0u64..800, 0..100),
        ) {
            let mut model = vec![false; pages as usize];
            let mut b = DirtyBitmap::new(pages);
            for &p in &sets { b.set(p); if p < pages { model[p as usize] = true; } }
            let mut o = DirtyBitmap::new(pages);
            for &p in &others { o.set(p); if p < pages { model[p as usize] = true; } }
            b.merge(&o);
            for &p in &unsets { b.unset(p); if p < pages { model[p as usize] = false; } }
            prop_assert_eq!(b.count(), model.iter().filter(|&&x| x).count() as u64);
            for p in 0..pages { prop_assert_eq!(b.is_set(p), model[p as usize]); }
            prop_assert_eq!(b.runs().collect::<Vec<_>>(), model_runs(&model));
            prop_assert_eq!(b.is_empty(), !model.contains(&true));
            let all = DirtyBitmap::all_set(pages);
            prop_assert_eq!(all.count(), pages);
            prop_assert_eq!(all.runs().collect::<Vec<_>>(), vec![(0, pages)]);
            b.clear();
            prop_assert!(b.is_empty());
        }

        #[test]
        fn from_words_ignores_bits_past_the_end(pages in 1u64..300, words in proptest::collection::vec(any::<u64>(), 0..8)) {
            let b = DirtyBitmap::from_words(words, pages);
            prop_assert!(b.count() <= pages);
            prop_assert!(b.runs().all(|(s, n)| s + n <= pages));
        }
    }
}
