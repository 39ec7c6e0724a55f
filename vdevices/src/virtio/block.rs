//! virtio-blk over a raw image file: read, write, flush, get-id, discard; optionally read-only.
//!
//! Reads and writes move data with `preadv`/`pwritev` straight between the image and guest
//! memory (no bounce buffer, no seek). Within one queue notification, consecutive reads (or
//! writes) of adjacent sectors are merged into one such call, as QEMU's
//! `virtio_blk_submit_multireq` does; each request still gets its own status and used-ring entry,
//! and a merged call that fails or comes up short is redone request by request.

mod batch;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use vcore::{GuestMemory, Snapshot, StateError};

use batch::{Batch, Done, MAX_MERGE_REQS, rebase};

use super::{
    Chain, ChainError, DeviceError, DeviceState, QueueCtx, Segs, TYPE_BLOCK, VIRTIO_F_RING_EVENT_IDX,
    VIRTIO_F_VERSION_1, VirtioDevice,
};

/// Sector size of the virtio-blk protocol.
pub const SECTOR_SIZE: u64 = 512;
/// Length of the device id returned by `GET_ID`.
pub const ID_BYTES: usize = 20;

/// `VIRTIO_BLK_F_SEG_MAX`.
pub const F_SEG_MAX: u64 = 1 << 2;
/// `VIRTIO_BLK_F_RO`.
pub const F_RO: u64 = 1 << 5;
/// `VIRTIO_BLK_F_BLK_SIZE`.
pub const F_BLK_SIZE: u64 = 1 << 6;
/// `VIRTIO_BLK_F_FLUSH`.
pub const F_FLUSH: u64 = 1 << 9;
/// `VIRTIO_BLK_F_DISCARD`.
pub const F_DISCARD: u64 = 1 << 13;

/// Request types.
#[allow(missing_docs)]
pub mod req {
    pub const IN: u32 = 0;
    pub const OUT: u32 = 1;
    pub const FLUSH: u32 = 4;
    pub const GET_ID: u32 = 8;
    pub const DISCARD: u32 = 11;
}

/// Request status byte values.
#[allow(missing_docs)]
pub mod req_status {
    pub const OK: u8 = 0;
    pub const IOERR: u8 = 1;
    pub const UNSUPP: u8 = 2;
}

const QUEUE_SIZE: u16 = 256;
const SEG_MAX: u32 = 128;
const MAX_DISCARD_SEG: u32 = 32;

/// Errors of opening a block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The image could not be opened.
    #[error("opening disk image {path}")]
    Open {
        /// The image.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The id is longer than [`ID_BYTES`].
    #[error("block device id {0:?} is longer than {ID_BYTES} bytes")]
    IdTooLong(String),
}

/// What a block device serves.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockConfig {
    /// Raw disk image.
    pub path: PathBuf,
    /// Refuse writes and discards (and tell the guest with `VIRTIO_BLK_F_RO`).
    #[serde(default)]
    pub read_only: bool,
    /// Device id returned by `GET_ID` (at most 20 bytes).
    #[serde(default)]
    pub id: String,
}

/// Request counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockStats {
    /// Read requests completed.
    pub reads: u64,
    /// Write requests completed.
    pub writes: u64,
    /// Flushes completed.
    pub flushes: u64,
    /// Discard requests completed.
    pub discards: u64,
    /// Requests completed with an error status.
    pub errors: u64,
    /// Bytes read from the image.
    pub bytes_read: u64,
    /// Bytes written to the image.
    pub bytes_written: u64,
    /// Reads and writes served by an I/O merged with adjacent requests of the same notification.
    #[serde(default)]
    pub merged: u64,
}

/// Saved state of [`Block`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {
    /// The backend configuration.
    pub config: BlockConfig,
    /// Capacity in sectors seen by the guest.
    pub capacity_sectors: u64,
    /// Counters.
    pub stats: BlockStats,
}

/// A virtio block device.
#[derive(Debug)]
pub struct Block {
    config: BlockConfig,
    file: File,
    capacity_sectors: u64,
    stats: BlockStats,
    /// Reads or writes parsed but not yet served (empty between notifications).
    batch: Batch,
    /// Chains popped ahead of parsing (see `serve_queue`), kept to reuse their buffer lists.
    ahead: Vec<Chain>,
    /// Told of every write and discard once it reached the file, before the guest sees it done.
    observer: Observer,
}

/// Called with `(offset, length)` in bytes after each write or discard reached the image file,
/// before the request completes: a disk mirror (Storage vMotion) hooks in here.
pub type WriteObserver = dyn Fn(u64, u64) + Send + Sync;

/// The optional [`WriteObserver`] of a [`Block`].
#[derive(Clone, Default)]
struct Observer(Option<std::sync::Arc<WriteObserver>>);

impl Observer {
    fn wrote(&self, offset: u64, len: u64) {
        if let Some(f) = &self.0 {
            f(offset, len);
        }
    }
}

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() { "Observer(set)" } else { "Observer(none)" })
    }
}

impl Block {
    /// Opens the image of `config`.
    pub fn new(config: BlockConfig) -> Result<Self, BlockError> {
        if config.id.len() > ID_BYTES {
            return Err(BlockError::IdTooLong(config.id.clone()));
        }
        let open_err = |source| BlockError::Open { path: config.path.clone(), source };
        let file =
            OpenOptions::new().read(true).write(!config.read_only).open(&config.path).map_err(open_err)?;
        let len = file.metadata().map_err(open_err)?.len();
        Ok(Block {
            capacity_sectors: len / SECTOR_SIZE,
            config,
            file,
            stats: BlockStats::default(),
            batch: Batch::default(),
            ahead: Vec::new(),
            observer: Observer::default(),
        })
    }

    /// Installs `observer`, told of every write and discard (see [`WriteObserver`]).
    pub fn with_write_observer(mut self, observer: std::sync::Arc<WriteObserver>) -> Self {
        self.observer = Observer(Some(observer));
        self
    }

    /// Counters.
    pub fn stats(&self) -> BlockStats {
        self.stats
    }

    fn config_space(&self) -> [u8; 48] {
        let mut c = [0u8; 48];
        c[0..8].copy_from_slice(&self.capacity_sectors.to_le_bytes());
        c[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        c[20..24].copy_from_slice(&(SECTOR_SIZE as u32).to_le_bytes());
        c[36..40].copy_from_slice(&u32::MAX.to_le_bytes()); // max_discard_sectors
        c[40..44].copy_from_slice(&MAX_DISCARD_SEG.to_le_bytes());
        c[44..48].copy_from_slice(&1u32.to_le_bytes()); // discard_sector_alignment
        c
    }

    /// Whether `[sector, sector + len bytes)` lies inside the disk.
    fn in_bounds(&self, sector: u64, len: u64) -> bool {
        sector
            .checked_mul(SECTOR_SIZE)
            .and_then(|start| start.checked_add(len))
            .is_some_and(|end| end <= self.capacity_sectors * SECTOR_SIZE)
    }

    /// Executes one request; returns (status, data bytes written to the guest).
    fn execute(&mut self, mem: &GuestMemory, hdr: &[u8], rdata: &Segs, wdata: &Segs) -> (u8, u32) {
        use req_status::*;
        let kind = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes(hdr[8..16].try_into().unwrap_or_default());
        let ro = self.config.read_only;
        match kind {
            req::IN => {
                let len = wdata.len();
                if !self.in_bounds(sector, len) {
                    return (IOERR, 0);
                }
                let segs = wdata.0.iter().copied();
                match crate::sys::read_to_guest(&self.file, sector * SECTOR_SIZE, mem, segs, wdata.0.len()) {
                    Ok(n) if n == len => {
                        self.stats.reads += 1;
                        self.stats.bytes_read += len;
                        (OK, len as u32)
                    }
                    _ => (IOERR, 0),
                }
            }
            req::OUT if !ro => {
                let len = rdata.len();
                if !self.in_bounds(sector, len) {
                    return (IOERR, 0);
                }
                let segs = rdata.0.iter().copied();
                let done =
                    crate::sys::write_from_guest(&self.file, sector * SECTOR_SIZE, mem, segs, rdata.0.len());
                // Even a failed write may have changed part of the range.
                self.observer.wrote(sector * SECTOR_SIZE, len);
                match done {
                    Ok(n) if n == len => {
                        self.stats.writes += 1;
                        self.stats.bytes_written += len;
                        (OK, 0)
                    }
                    _ => (IOERR, 0),
                }
            }
            req::FLUSH => match self.file.sync_data() {
                Ok(()) => {
                    self.stats.flushes += 1;
                    (OK, 0)
                }
                Err(_) => (IOERR, 0),
            },
            req::GET_ID => {
                let mut id = [0u8; ID_BYTES];
                id[..self.config.id.len()].copy_from_slice(self.config.id.as_bytes());
                match wdata.write(mem, &id) {
                    Ok(n) => (OK, n as u32),
                    Err(_) => (IOERR, 0),
                }
            }
            req::DISCARD if !ro => {
                let Ok(segs) = rdata.read(mem, 16 * MAX_DISCARD_SEG as usize) else { return (IOERR, 0) };
                if segs.len() % 16 != 0 || segs.is_empty() || rdata.len() > segs.len() as u64 {
                    return (IOERR, 0);
                }
                for s in segs.chunks_exact(16) {
                    let start = u64::from_le_bytes(s[0..8].try_into().unwrap_or_default());
                    let num = u64::from(u32::from_le_bytes(s[8..12].try_into().unwrap_or_default()));
                    let len = num * SECTOR_SIZE;
                    if !self.in_bounds(start, len) {
                        return (IOERR, 0);
                    }
                    let punched = crate::sys::punch_hole(&self.file, start * SECTOR_SIZE, len);
                    self.observer.wrote(start * SECTOR_SIZE, len);
                    if punched.is_err() {
                        return (IOERR, 0);
                    }
                }
                self.stats.discards += 1;
                (OK, 0)
            }
            req::OUT | req::DISCARD => (IOERR, 0), // read-only device
            _ => (UNSUPP, 0),
        }
    }

    /// Serves one request of any type (the reference path; valid reads and writes take
    /// [`Block::serve_queue`]'s batched path instead).
    fn serve(&mut self, mem: &GuestMemory, chain: &Chain) -> Result<u32, ChainError> {
        let (wdata, status) = chain.writable().split_last(1);
        if status.len() != 1 {
            return Err(ChainError::Malformed("virtio-blk request without a status byte"));
        }
        let readable = chain.readable();
        let (st, n) = match readable.read(mem, 16) {
            Ok(hdr) if hdr.len() == 16 => {
                let (_, rdata) = readable.split_at(16);
                self.execute(mem, &hdr, &rdata, &wdata)
            }
            _ => (req_status::IOERR, 0),
        };
        if st != req_status::OK {
            self.stats.errors += 1;
        }
        status.write(mem, &[st]).map_err(|e| ChainError::Memory(e.to_string()))?;
        Ok(n.saturating_add(1))
    }

    /// Completes the batched requests: their status bytes, counters and used-ring entries.
    fn submit(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<usize, ChainError> {
        let Block { batch, file, stats, observer, .. } = self;
        let mem = ctx.mem();
        batch
            .submit(mem, file, |r, d: Done| {
                if r.write {
                    observer.wrote(r.offset, r.len);
                }
                let st = if d.ok { req_status::OK } else { req_status::IOERR };
                ctx.write_deferred(r.status, &[st])?;
                if !d.ok {
                    stats.errors += 1;
                } else if r.write {
                    stats.writes += 1;
                    stats.bytes_written += d.len;
                } else {
                    stats.reads += 1;
                    stats.bytes_read += d.len;
                }
                stats.merged += u64::from(d.ok && d.merged);
                let n = if d.ok && !r.write { d.len as u32 } else { 0 };
                ctx.add_used(queue, d.head, n.saturating_add(1))
            })
            .inspect(|_| ctx.signal_used(queue))
    }

    /// Serves every available request of `queue`: adjacent reads (or writes) are merged into one
    /// I/O, anything else is served alone, in ring order.
    ///
    /// Chains are popped a batch ahead of parsing, and each one's header is prefetched as it is
    /// popped ([`QueueCtx::pop_into`]): the driver wrote the headers on another core, and
    /// reading them one by one, each right after its chain, waited for every cache line in turn
    /// (measured per request with 32 4 KiB reads in flight: parsing 70–76 ns before, 40 after).
    fn serve_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), ChainError> {
        let capacity = self.capacity_sectors * SECTOR_SIZE;
        let writable = !self.config.read_only;
        let mut ahead = std::mem::take(&mut self.ahead);
        let res = loop {
            let (mut n, mut failed) = (0, None);
            while n < MAX_MERGE_REQS {
                if ahead.len() == n {
                    ahead.push(Chain { head: 0, descs: Vec::with_capacity(4) });
                }
                match ctx.pop_into(queue, &mut ahead[n]) {
                    Ok(true) => n += 1,
                    Ok(false) => break,
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            if let Err(e) = self.serve_chains(queue, ctx, &ahead[..n], capacity, writable) {
                break Err(e);
            }
            if let Some(e) = failed {
                break self.submit(queue, ctx).and(Err(e));
            }
            if n == 0 {
                break self.submit(queue, ctx).map(|_| ());
            }
        };
        self.ahead = ahead;
        res
    }

    /// Parses `chains` in order, batching reads and writes (see [`Batch`]) and serving anything
    /// else one by one.
    fn serve_chains(
        &mut self,
        queue: usize,
        ctx: &mut QueueCtx<'_>,
        chains: &[Chain],
        capacity: u64,
        writable: bool,
    ) -> Result<(), ChainError> {
        for chain in chains {
            match self.batch.parse(ctx.mem(), chain, capacity, writable) {
                Ok(Some(mut r)) => {
                    if !self.batch.accepts(&r) {
                        r = rebase(r, self.submit(queue, ctx)?);
                    }
                    self.batch.push(r);
                }
                Ok(None) => {
                    self.submit(queue, ctx)?;
                    let len = self.serve(ctx.mem(), chain)?;
                    ctx.add_used(queue, chain.head, len)?;
                }
                Err(e) => {
                    self.submit(queue, ctx)?;
                    return Err(e);
                }
            }
        }
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }
    fn features(&self) -> u64 {
        let ro = if self.config.read_only { F_RO } else { F_DISCARD };
        VIRTIO_F_VERSION_1 | VIRTIO_F_RING_EVENT_IDX | F_SEG_MAX | F_BLK_SIZE | F_FLUSH | ro
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&self.config_space(), offset, data);
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        let res = self.serve_queue(queue, ctx);
        self.batch.clear();
        res.map_err(DeviceError::chain(queue))
    }
    fn state(&self) -> DeviceState {
        DeviceState::Block(self.save())
    }
}

impl Snapshot for Block {
    type State = BlockState;
    type Args = ();
    fn save(&self) -> BlockState {
        BlockState { config: self.config.clone(), capacity_sectors: self.capacity_sectors, stats: self.stats }
    }
    /// Reopens the image named in the state; its size must not have changed.
    fn restore(_args: (), s: &BlockState) -> Result<Self, StateError> {
        let bad = |reason: String| StateError::Device { device: "virtio-blk".into(), reason };
        let mut b = Block::new(s.config.clone()).map_err(|e| bad(e.to_string()))?;
        if b.capacity_sectors != s.capacity_sectors {
            return Err(bad(format!(
                "image has {} sectors, saved {}",
                b.capacity_sectors, s.capacity_sectors
            )));
        }
        b.stats = s.stats;
        Ok(b)
    }
}
