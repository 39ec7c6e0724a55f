//! virtio-balloon (traditional): inflate returns guest pages to the host (`MADV_DONTNEED`),
//! deflate gives them back, the stats queue reports the guest's memory statistics, and free page
//! reporting (`VIRTIO_BALLOON_F_PAGE_REPORTING`) lets the guest hand back free memory as it
//! frees it, so those pages read as zeros (which a migration sends as zero pages).
//!
//! The embedder steers it through a [`BalloonHandle`]: set the target, ask for fresh statistics.
//! After `set_target`, call [`crate::MmioTransport::config_changed`] so the guest is told; after
//! `request_stats`, call [`crate::MmioTransport::process_queue`] with [`STATS_QUEUE`].

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use vcore::{GuestMemory, Snapshot, StateError};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{DeviceError, DeviceState, QueueCtx, TYPE_BALLOON, VIRTIO_F_VERSION_1, VirtioDevice};

/// Inflate queue.
pub const INFLATE_QUEUE: usize = 0;
/// Deflate queue.
pub const DEFLATE_QUEUE: usize = 1;
/// Statistics queue.
pub const STATS_QUEUE: usize = 2;
/// `VIRTIO_BALLOON_F_STATS_VQ`.
pub const F_STATS_VQ: u64 = 1 << 1;
/// `VIRTIO_BALLOON_F_PAGE_REPORTING`.
pub const F_PAGE_REPORTING: u64 = 1 << 5;
/// Free page reporting queue when `VIRTIO_BALLOON_F_STATS_VQ` is also negotiated (else 2).
pub const REPORTING_QUEUE: usize = 3;
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
    /// Features the guest acknowledged (they number the optional queues).
    #[serde(default)]
    pub acked: u64,
    /// Bytes of free memory reported.
    #[serde(default)]
    pub reported_bytes: u64,
}

/// The balloon device.
#[derive(Debug)]
pub struct Balloon {
    handle: BalloonHandle,
    actual_pages: u32,
    inflated: BTreeSet<u32>,
    stats_head: Option<u16>,
    bad_pfns: u64,
    stats_q: Option<usize>,
    report_q: Option<usize>,
    reported_bytes: u64,
    acked: u64,
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
            stats_q: Some(STATS_QUEUE),
            report_q: None,
            reported_bytes: 0,
            acked: 0,
        };
        (b, handle)
    }

    /// Bytes of free memory the guest reported (and the host discarded).
    pub fn reported_bytes(&self) -> u64 {
        self.reported_bytes
    }

    /// Pages currently in the balloon.
    pub fn inflated_pages(&self) -> usize {
        self.inflated.len()
    }

    fn pfns(ctx: &mut QueueCtx<'_>, q: usize) -> Result<Option<(u16, Vec<u32>)>, DeviceError> {
        let Some(chain) = ctx.pop(q).map_err(DeviceError::chain(q))? else { return Ok(None) };
        let bytes =
            chain.readable().read(ctx.mem(), 4 * MAX_PFNS_PER_CHAIN).map_err(DeviceError::memory(q))?;
        let pfns = bytes.chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        Ok(Some((chain.head, pfns)))
    }
}

/// Gives the host page behind guest page `pfn` back to the kernel; false if it is not guest RAM.
fn discard_page(mem: &GuestMemory, pfn: u32) -> bool {
    discard_range(mem, u64::from(pfn) * PAGE_SIZE, PAGE_SIZE)
}

/// Discards the whole pages inside `[addr, addr + len)`; false if the range is not guest RAM.
fn discard_range(mem: &GuestMemory, addr: u64, len: u64) -> bool {
    let start = addr.div_ceil(PAGE_SIZE) * PAGE_SIZE;
    let Some(end) = addr.checked_add(len).map(|e| e / PAGE_SIZE * PAGE_SIZE) else { return false };
    if !mem.check_range(GuestAddress(addr), len as usize) {
        return false;
    }
    let mut a = start;
    while a < end {
        // One region at a time: a range may span regions (a slice may not).
        let chunk = match mem.get_slice(GuestAddress(a), (end - a) as usize) {
            Ok(s) => s,
            Err(_) => match mem.get_slice(GuestAddress(a), PAGE_SIZE as usize) {
                Ok(s) => s,
                Err(_) => return false,
            },
        };
        if crate::sys::discard(chunk.ptr_guard_mut().as_ptr(), chunk.len()).is_err() {
            return false;
        }
        a += chunk.len() as u64;
    }
    true
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256, 16, 32]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | F_STATS_VQ | F_PAGE_REPORTING
    }
    fn activate(&mut self, features: u64) -> Result<(), DeviceError> {
        // Optional queues are numbered after the ones present: stats, then reporting.
        self.acked = features;
        self.stats_q = (features & F_STATS_VQ != 0).then_some(STATS_QUEUE);
        let next = if self.stats_q.is_some() { STATS_QUEUE + 1 } else { STATS_QUEUE };
        self.report_q = (features & F_PAGE_REPORTING != 0).then_some(next);
        Ok(())
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
        self.acked = 0;
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
            q if Some(q) == self.report_q => {
                // Each device-writable buffer is a range of free guest memory.
                while let Some(chain) = ctx.pop(q).map_err(DeviceError::chain(q))? {
                    for d in &chain.descs {
                        if discard_range(ctx.mem(), d.addr, u64::from(d.len)) {
                            self.reported_bytes += u64::from(d.len);
                        }
                    }
                    ctx.add_used(q, chain.head, 0).map_err(DeviceError::chain(q))?;
                }
            }
            q if Some(q) == self.stats_q => {
                let want = std::mem::take(&mut self.handle.lock().want_stats);
                if want && let Some(head) = self.stats_head.take() {
                    ctx.add_used(STATS_QUEUE, head, 0).map_err(DeviceError::chain(STATS_QUEUE))?;
                }
                while let Some(chain) = ctx.pop(STATS_QUEUE).map_err(DeviceError::chain(STATS_QUEUE))? {
                    let bytes =
                        chain.readable().read(ctx.mem(), 10 * 64).map_err(DeviceError::memory(queue))?;
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
            acked: self.acked,
            reported_bytes: self.reported_bytes,
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
        b.reported_bytes = s.reported_bytes;
        if s.acked != 0 {
            b.activate(s.acked)
                .map_err(|e| StateError::Device { device: "virtio-balloon".into(), reason: e.to_string() })?;
        }
        Ok(b)
    }
}

impl Balloon {
    /// The embedder's handle of this balloon.
    pub fn handle(&self) -> BalloonHandle {
        self.handle.clone()
    }
}
