//! virtio-balloon (traditional): inflate returns guest pages to the host (`MADV_DONTNEED`),
//! deflate gives them back, the stats queue reports the guest's memory statistics.
//!
//! The embedder steers it through a [`BalloonHandle`]: set the target, ask for fresh statistics.
//! After `set_target`, call [`crate::MmioTransport::config_changed`] so the guest is told; after
//! `request_stats`, call [`crate::MmioTransport::process_queue`] with [`STATS_QUEUE`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vcore::{GuestMemory, Snapshot, StateError};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{ChainError, DeviceError, DeviceState, QueueCtx, TYPE_BALLOON, VIRTIO_F_VERSION_1, VirtioDevice};

/// Inflate queue.
pub const INFLATE_QUEUE: usize = 0;
/// Deflate queue.
pub const DEFLATE_QUEUE: usize = 1;
/// Statistics queue.
pub const STATS_QUEUE: usize = 2;
/// `VIRTIO_BALLOON_F_STATS_VQ`.
pub const F_STATS_VQ: u64 = 1 << 1;
/// Balloon page size (always 4 KiB).
pub const PAGE_SIZE: u64 = 4096;
const MAX_PFNS_PER_CHAIN: usize = 4096;

#[derive(Debug, Default)]
struct Control {
    target_pages: u32,
    changed: bool,
    want_stats: bool,
    stats: Vec<(u16, u64)>,
    stats_updates: u64,
}

/// The embedder's side of a balloon.
#[derive(Debug, Clone, Default)]
pub struct BalloonHandle(Arc<Mutex<Control>>);

impl BalloonHandle {
    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
    /// Asks the guest to hold `pages` 4 KiB pages in the balloon.
    pub fn set_target(&self, pages: u32) {
        let mut c = self.lock();
        c.target_pages = pages;
        c.changed = true;
    }
    /// The current target.
    pub fn target(&self) -> u32 {
        self.lock().target_pages
    }
    /// Asks the guest for fresh statistics (served on the next stats-queue run).
    pub fn request_stats(&self) {
        self.lock().want_stats = true;
    }
    /// The last statistics: `(tag, value)` pairs as the guest sent them.
    pub fn stats(&self) -> Vec<(u16, u64)> {
        self.lock().stats.clone()
    }
    /// How many statistics buffers the guest has sent.
    pub fn stats_updates(&self) -> u64 {
        self.lock().stats_updates
    }
}

/// Saved state of [`Balloon`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct BalloonState {
    /// Target in pages.
    pub target_pages: u32,
    /// `actual` as the guest last wrote it.
    pub actual_pages: u32,
    /// Page frame numbers currently in the balloon.
    pub inflated: Vec<u32>,
    /// The statistics buffer the device holds, if any (its head index).
    pub stats_head: Option<u16>,
    /// Last statistics.
    pub stats: Vec<(u16, u64)>,
    /// PFNs the guest gave that were outside its memory (ignored).
    pub bad_pfns: u64,
}

/// The balloon device.
#[derive(Debug)]
pub struct Balloon {
    handle: BalloonHandle,
    actual_pages: u32,
    inflated: BTreeSet<u32>,
    stats_head: Option<u16>,
    bad_pfns: u64,
}

impl Balloon {
    /// A balloon with target 0; steer it with the returned handle.
    pub fn new() -> (Self, BalloonHandle) {
        let handle = BalloonHandle::default();
        let b = Balloon {
            handle: handle.clone(),
            actual_pages: 0,
            inflated: BTreeSet::new(),
            stats_head: None,
            bad_pfns: 0,
        };
        (b, handle)
    }

    /// Pages currently in the balloon.
    pub fn inflated_pages(&self) -> usize {
        self.inflated.len()
    }

    fn pfns(ctx: &mut QueueCtx<'_>, q: usize) -> Result<Option<(u16, Vec<u32>)>, DeviceError> {
        let Some(chain) = ctx.pop(q).map_err(DeviceError::chain(q))? else { return Ok(None) };
        let bytes = chain
            .readable()
            .read(ctx.mem(), 4 * MAX_PFNS_PER_CHAIN)
            .map_err(|e| DeviceError::Chain { queue: q, source: ChainError::Memory(e.to_string()) })?;
        let pfns = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Some((chain.head, pfns)))
    }
}

/// Gives the host page behind guest page `pfn` back to the kernel; false if it is not guest RAM.
fn discard_page(mem: &GuestMemory, pfn: u32) -> bool {
    let addr = GuestAddress(u64::from(pfn) * PAGE_SIZE);
    if !mem.check_range(addr, PAGE_SIZE as usize) {
        return false;
    }
    match mem.get_slice(addr, PAGE_SIZE as usize) {
        Ok(slice) => crate::sys::discard(slice.ptr_guard_mut().as_ptr(), PAGE_SIZE as usize).is_ok(),
        Err(_) => false,
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 16]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_STATS_VQ
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 8];
        c[0..4].copy_from_slice(&self.handle.target().to_le_bytes());
        c[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        super::read_config_bytes(&c, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        if offset == 4 && data.len() == 4 {
            self.actual_pages = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        }
    }
    fn reset(&mut self) {
        // Pages in the balloon stay discarded; the guest's new driver starts from an empty balloon.
        self.inflated.clear();
        self.actual_pages = 0;
        self.stats_head = None;
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        match queue {
            INFLATE_QUEUE | DEFLATE_QUEUE => {
                while let Some((head, pfns)) = Self::pfns(ctx, queue)? {
                    for pfn in pfns {
                        if queue == INFLATE_QUEUE {
                            if discard_page(ctx.mem(), pfn) {
                                self.inflated.insert(pfn);
                            } else {
                                self.bad_pfns += 1;
                            }
                        } else {
                            self.inflated.remove(&pfn);
                        }
                    }
                    ctx.add_used(queue, head, 0).map_err(DeviceError::chain(queue))?;
                }
            }
            STATS_QUEUE => {
                let want = std::mem::take(&mut self.handle.lock().want_stats);
                if want {
                    if let Some(head) = self.stats_head.take() {
                        ctx.add_used(STATS_QUEUE, head, 0).map_err(DeviceError::chain(STATS_QUEUE))?;
                    }
                }
                while let Some(chain) = ctx.pop(STATS_QUEUE).map_err(DeviceError::chain(STATS_QUEUE))? {
                    let bytes = chain.readable().read(ctx.mem(), 10 * 64).map_err(|e| {
                        DeviceError::Chain { queue, source: ChainError::Memory(e.to_string()) }
                    })?;
                    let stats = bytes
                        .chunks_exact(10)
                        .map(|c| {
                            (
                                u16::from_le_bytes([c[0], c[1]]),
                                u64::from_le_bytes(c[2..10].try_into().unwrap_or_default()),
                            )
                        })
                        .collect();
                    let mut h = self.handle.lock();
                    h.stats = stats;
                    h.stats_updates += 1;
                    drop(h);
                    // Hold the buffer until the embedder asks again; an older one goes back now.
                    if let Some(old) = self.stats_head.replace(chain.head) {
                        ctx.add_used(STATS_QUEUE, old, 0).map_err(DeviceError::chain(STATS_QUEUE))?;
                    }
                }
            }
            _ => {}
        }
        Ok(())
    }
    fn take_config_changed(&mut self) -> bool {
        std::mem::take(&mut self.handle.lock().changed)
    }
    fn state(&self) -> DeviceState {
        DeviceState::Balloon(self.save())
    }
}

impl Snapshot for Balloon {
    type State = BalloonState;
    type Args = ();
    fn save(&self) -> BalloonState {
        let h = self.handle.lock();
        BalloonState {
            target_pages: h.target_pages,
            actual_pages: self.actual_pages,
            inflated: self.inflated.iter().copied().collect(),
            stats_head: self.stats_head,
            stats: h.stats.clone(),
            bad_pfns: self.bad_pfns,
        }
    }
    /// Restores the device; get a new handle with [`Balloon::handle`].
    fn restore(_args: (), s: &BalloonState) -> Result<Self, StateError> {
        let (mut b, h) = Balloon::new();
        {
            let mut c = h.lock();
            c.target_pages = s.target_pages;
            c.stats = s.stats.clone();
        }
        b.actual_pages = s.actual_pages;
        b.inflated = s.inflated.iter().copied().collect();
        b.stats_head = s.stats_head;
        b.bad_pfns = s.bad_pfns;
        Ok(b)
    }
}

impl Balloon {
    /// The embedder's handle of this balloon.
    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }
}
