//! Storage vMotion: mirroring a running VM's disk image to another file.
//!
//! A [`DiskMirror`] copies the source image block by block while the guest keeps writing to
//! it. The disk device reports every write it made (offset and length, after the bytes reached
//! the source file) through the [`DiskMirror::observer`] callback; `vdevices`' block device takes
//! it as its write observer, and `vmigrate` never depends on `vdevices`.
//!
//! 1. **Bulk copy**: every block is copied once; a write to a block during this phase marks it
//!    dirty again.
//! 2. **Dirty passes**: dirty blocks are copied again, until few remain (or a pass limit).
//! 3. **Synchronous mirroring**: from the switch on, the observer copies each written range to
//!    the destination itself before the device completes the request (QEMU's
//!    `copy-mode=write-blocking`); the blocks still dirty are copied once more. When none is
//!    left, the mirror is *ready*: the destination equals the source, and stays equal for as long
//!    as the observer stays installed.
//!
//! One lock orders every copy of the copier and of the observer, and the switch to synchronous
//! mode happens under it: a write either marked its blocks dirty before the switch (and they
//! are copied after it) or is copied by the observer itself after it. Copies read the source
//! file after the device's write reached it, so a copy is never older than a completed write.
//!
//! The copier's copies are written behind ([`MirrorTarget::write_behind`]: a remote target keeps
//! a window of them in flight) and settled at the end of each pass, so a pass, and readiness,
//! count only blocks the destination has. The observer's copies are synchronous
//! ([`MirrorTarget::write_at`]). Both go to the target in the order the lock gives them, and the
//! target lands them in that order, so no copy overtakes a newer one of the same block.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::dirty::DirtyBitmap;

mod remote;
pub use remote::{REMOTE_WINDOW_BYTES, REMOTE_WINDOW_FRAMES, RemoteImage, RemoteStats, serve_image};

/// Errors of a disk mirror.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// Opening, reading or writing an image failed.
    #[error("{what} {path}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// The image.
        path: String,
        /// The error.
        #[source]
        source: std::io::Error,
    },
    /// The block size is 0, not a multiple of 512, or above 16 MiB.
    #[error("block size {0} must be a multiple of 512 between 512 and 16 MiB")]
    BlockSize(u32),
    /// The target's size differs from the source image's.
    #[error("the target holds {target_size} bytes, the source image {source_size}")]
    SizeMismatch {
        /// Source image size.
        source_size: u64,
        /// Target size.
        target_size: u64,
    },
    /// The remote side broke the session (a corrupt frame, an unexpected message, a closed
    /// connection).
    #[error("remote image: {0}")]
    Remote(String),
    /// The image host ended the session with an `Abort` (a write out of bounds, a full disk).
    #[error("the image host {peer} aborted the session: {reason}")]
    Refused {
        /// The image host.
        peer: String,
        /// Its reason.
        reason: String,
    },
    /// The image host acknowledged another byte count than the writes sent up to then add
    /// up to: a write was lost, duplicated or reordered.
    #[error("the image host {peer} acknowledged {acked} bytes written where {expected} were due")]
    AckMismatch {
        /// The image host.
        peer: String,
        /// Bytes sent up to the write acknowledged.
        expected: u64,
        /// Bytes the acknowledgement carried.
        acked: u64,
    },
    /// The observer failed to mirror a guest write (the first such error).
    #[error("mirroring a guest write of {len} bytes at {offset}")]
    Mirror {
        /// Offset of the write.
        offset: u64,
        /// Its length.
        len: u64,
        /// The error.
        #[source]
        source: std::io::Error,
    },
}

/// Maps an I/O error met while doing `what` to `path`.
fn io_err(what: &'static str, path: impl std::fmt::Display) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_string();
    move |source| StorageError::Io { what, path, source }
}

/// Maps an error a [`MirrorTarget`] met while doing `what`: the [`StorageError`] it carries if
/// any (a [`RemoteImage`]'s refusal, for example), else an I/O error on `path`.
fn target_err(what: &'static str, path: &str) -> impl FnOnce(std::io::Error) -> StorageError {
    let path = path.to_string();
    move |e| match e.downcast::<StorageError>() {
        Ok(e) => e,
        Err(source) => StorageError::Io { what, path, source },
    }
}

/// `e`'s message followed by those of its causes (an error a target wraps keeps its own).
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut msg = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        msg = format!("{msg}: {c}");
        cause = c.source();
    }
    msg
}

/// What a disk mirror did.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct MirrorStats {
    /// Image size in bytes.
    pub size: u64,
    /// Blocks copied by the copier (the bulk copy included).
    pub blocks_copied: u64,
    /// Guest writes the observer mirrored synchronously.
    pub writes_mirrored: u64,
    /// Passes over dirty blocks after the bulk copy.
    pub dirty_passes: u32,
    /// Time until the mirror was ready.
    pub time_to_ready: Duration,
}

/// The callback a disk device calls after each write: `(offset, length)` in bytes.
pub type WriteObserver = dyn Fn(u64, u64) + Send + Sync;

/// Mirrors a disk image to another file while the guest writes to it (see the module docs).
#[derive(Debug, Clone)]
pub struct DiskMirror {
    inner: Arc<Inner>,
}

/// Where a [`DiskMirror`] writes: a local file, or an image on another host
/// ([`RemoteImage`]).
///
/// Writes land in the order they are made, whichever method makes them: a write never
/// overtakes an earlier one to the same bytes.
pub trait MirrorTarget: Send + Sync + std::fmt::Debug {
    /// Writes all of `data` at byte `offset`; returns once it, and every earlier write, is in
    /// the target (guest writes mirrored synchronously rely on this).
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()>;
    /// Starts writing all of `data` at byte `offset` and may return before it is in the target
    /// (a remote image sends it and waits only when too many writes are in flight). An error
    /// of this write may be reported by a later call instead: [`MirrorTarget::settle`],
    /// [`MirrorTarget::write_at`] or [`MirrorTarget::sync`] report it at the latest. The
    /// default is [`MirrorTarget::write_at`].
    fn write_behind(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.write_at(data, offset)
    }
    /// Returns once every earlier write is in the target, or the error one of them met. The
    /// default returns at once, for targets whose writes are in when they return.
    fn settle(&self) -> std::io::Result<()> {
        Ok(())
    }
    /// Size of the target in bytes (it must equal the source's).
    fn size(&self) -> std::io::Result<u64>;
    /// Makes every write so far durable (settling them first).
    fn sync(&self) -> std::io::Result<()>;
    /// Names the target in errors.
    fn describe(&self) -> String;
}

/// A local image file as a mirror target.
#[derive(Debug)]
pub struct FileTarget {
    file: File,
    path: String,
}

impl FileTarget {
    /// Creates (or truncates) the image at `path`, `size` bytes long.
    pub fn create(path: &Path, size: u64) -> Result<FileTarget, StorageError> {
        let p = path.display();
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)
            .map_err(io_err("creating", &p))?;
        file.set_len(size).map_err(io_err("sizing", &p))?;
        Ok(FileTarget { file, path: p.to_string() })
    }
}

impl MirrorTarget for FileTarget {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        self.file.write_all_at(data, offset)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.len())
    }
    fn sync(&self) -> std::io::Result<()> {
        self.file.sync_all()
    }
    fn describe(&self) -> String {
        self.path.clone()
    }
}

#[derive(Debug)]
struct Inner {
    src: File,
    dst: Box<dyn MirrorTarget>,
    src_path: String,
    dst_path: String,
    size: u64,
    block: u64,
    /// Dirty blocks, the synchronous-mode flag, and the order of all copies.
    state: Mutex<State>,
    ready: AtomicBool,
    writes_mirrored: AtomicU64,
    /// The first write the observer failed to mirror: `(offset, len, error kind, message)`.
    /// Sticky: every later check reports it again.
    failed: Mutex<Option<(u64, u64, std::io::ErrorKind, String)>>,
}

#[derive(Debug)]
struct State {
    dirty: DirtyBitmap,
    sync: bool,
}

impl DiskMirror {
    /// Prepares to mirror the image at `src` into `dst` (created, or truncated, to the source's
    /// size) in blocks of `block_size` bytes.
    pub fn new(src: &Path, dst: &Path, block_size: u32) -> Result<Self, StorageError> {
        Self::check_block_size(block_size)?;
        let size = image_size(src)?;
        Self::to_target(src, Box::new(FileTarget::create(dst, size)?), block_size)
    }

    /// Prepares to mirror the image at `src` into `dst`, which must have the source's size (a
    /// [`RemoteImage`] on another host, for example).
    pub fn to_target(src: &Path, dst: Box<dyn MirrorTarget>, block_size: u32) -> Result<Self, StorageError> {
        Self::check_block_size(block_size)?;
        let (src_path, dst_path) = (src.display().to_string(), dst.describe());
        let src_file = File::open(src).map_err(io_err("opening", &src_path))?;
        let size = src_file.metadata().map_err(io_err("reading the size of", &src_path))?.len();
        let dst_size = dst.size().map_err(target_err("reading the size of", &dst_path))?;
        if dst_size != size {
            return Err(StorageError::SizeMismatch { source_size: size, target_size: dst_size });
        }
        let dst_file = dst;
        let block = u64::from(block_size);
        let blocks = size.div_ceil(block);
        Ok(DiskMirror {
            inner: Arc::new(Inner {
                src: src_file,
                dst: dst_file,
                src_path,
                dst_path,
                size,
                block,
                state: Mutex::new(State { dirty: DirtyBitmap::all_set(blocks), sync: false }),
                ready: AtomicBool::new(false),
                writes_mirrored: AtomicU64::new(0),
                failed: Mutex::new(None),
            }),
        })
    }

    /// The callback to install as the disk device's write observer before [`DiskMirror::run`]
    /// starts, and to keep installed until the VM runs on the destination image.
    pub fn observer(&self) -> Arc<WriteObserver> {
        let inner = Arc::clone(&self.inner);
        Arc::new(move |offset, len| inner.observe(offset, len))
    }

    /// Copies until the destination equals the source and synchronous mirroring keeps it so;
    /// `max_dirty_passes` bounds the passes over dirty blocks before switching to synchronous
    /// mode. `progress` gets `(blocks copied, blocks dirty)` after each pass.
    pub fn run(
        &self,
        max_dirty_passes: u32,
        mut progress: impl FnMut(u64, u64),
    ) -> Result<MirrorStats, StorageError> {
        let start = Instant::now();
        let inner = &self.inner;
        let mut stats = MirrorStats { size: inner.size, ..Default::default() };
        let mut pass = 0u32;
        loop {
            let (copied, left) = inner.copy_dirty()?;
            stats.blocks_copied += copied;
            progress(stats.blocks_copied, left);
            inner.check()?;
            let mut st = inner.lock();
            if st.sync {
                if st.dirty.is_empty() {
                    break;
                }
            } else if pass >= max_dirty_passes || st.dirty.count() <= 16 {
                // From here the observer mirrors writes itself; what is still dirty was written
                // before and is copied by one more pass.
                st.sync = true;
            }
            drop(st);
            pass += 1;
        }
        stats.dirty_passes = pass;
        inner.ready.store(true, Ordering::Release);
        stats.writes_mirrored = inner.writes_mirrored.load(Ordering::Relaxed);
        stats.time_to_ready = start.elapsed();
        Ok(stats)
    }

    /// Guest writes the observer has mirrored synchronously so far.
    pub fn writes_mirrored(&self) -> u64 {
        self.inner.writes_mirrored.load(Ordering::Relaxed)
    }

    /// Whether the destination equals the source (and synchronous mirroring keeps it so).
    pub fn is_ready(&self) -> bool {
        self.inner.ready.load(Ordering::Acquire)
    }

    /// The first error the observer met mirroring a guest write, if any (reported again on every
    /// call): after one, the destination can no longer be trusted.
    pub fn check(&self) -> Result<(), StorageError> {
        self.inner.check()
    }

    /// Makes everything mirrored so far durable on the destination (`fsync` there).
    pub fn sync(&self) -> Result<(), StorageError> {
        let inner = &self.inner;
        let _st = inner.lock();
        inner.dst.sync().map_err(target_err("syncing", &inner.dst_path))
    }

    fn check_block_size(block_size: u32) -> Result<(), StorageError> {
        if block_size == 0 || !block_size.is_multiple_of(512) || block_size > 16 << 20 {
            return Err(StorageError::BlockSize(block_size));
        }
        Ok(())
    }
}

/// The size of the image at `path`.
pub fn image_size(path: &Path) -> Result<u64, StorageError> {
    std::fs::metadata(path).map(|m| m.len()).map_err(io_err("opening", path.display()))
}

impl Inner {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn check(&self) -> Result<(), StorageError> {
        match &*self.failed.lock().unwrap_or_else(PoisonError::into_inner) {
            Some((offset, len, kind, msg)) => Err(StorageError::Mirror {
                offset: *offset,
                len: *len,
                source: std::io::Error::new(*kind, msg.clone()),
            }),
            None => Ok(()),
        }
    }

    /// A guest write of `[offset, offset + len)` reached the source.
    fn observe(&self, offset: u64, len: u64) {
        let end = offset.saturating_add(len).min(self.size);
        if offset >= end {
            return;
        }
        let mut st = self.lock();
        if st.sync {
            // Synchronous: the target has this write (and every bulk copy sent before it) when
            // `write_at` returns, before the device completes the guest's request.
            let copied =
                self.read_source(offset, end - offset).and_then(|buf| self.dst.write_at(&buf, offset));
            if let Err(source) = copied {
                let mut failed = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
                failed.get_or_insert((offset, len, source.kind(), with_causes(&source)));
            }
            self.writes_mirrored.fetch_add(1, Ordering::Relaxed);
        } else {
            for b in offset / self.block..end.div_ceil(self.block) {
                st.dirty.set(b);
            }
        }
    }

    /// Copies every block dirty now, each under the lock, then settles the target: when it
    /// returns, every block it copied is in the target. Returns (copied, dirty after).
    ///
    /// The copies are written behind (pipelined). That keeps the order of writes: a block is
    /// read and handed to the target under the lock, so a later guest write to it either marks
    /// it dirty again (and its next copy goes to the target after this one) or, in synchronous
    /// mode, is read and handed to the target by the observer after this copy; the target lands
    /// writes in the order it gets them ([`MirrorTarget`]).
    fn copy_dirty(&self) -> Result<(u64, u64), StorageError> {
        let todo: Vec<u64> = {
            let st = self.lock();
            st.dirty.runs().flat_map(|(first, n)| first..first + n).collect()
        };
        let mut copied = 0;
        let mut buf = Vec::new();
        for b in todo {
            let mut st = self.lock();
            if !st.dirty.is_set(b) {
                continue;
            }
            st.dirty.unset(b);
            let at = b * self.block;
            buf.resize(self.block.min(self.size - at) as usize, 0);
            self.read_source_into(&mut buf, at).map_err(io_err("copying a block from", &self.src_path))?;
            self.dst.write_behind(&buf, at).map_err(target_err("copying a block to", &self.dst_path))?;
            drop(st);
            copied += 1;
        }
        self.dst.settle().map_err(target_err("copying blocks to", &self.dst_path))?;
        Ok((copied, self.lock().dirty.count()))
    }

    /// Reads `[offset, offset + buf.len())` of the source into `buf`.
    fn read_source_into(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.src
            .read_exact_at(buf, offset)
            .map_err(|e| std::io::Error::new(e.kind(), format!("reading {} at {offset}: {e}", self.src_path)))
    }

    /// Reads `[offset, offset + len)` of the source.
    fn read_source(&self, offset: u64, len: u64) -> std::io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len as usize];
        self.read_source_into(&mut buf, offset)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(name: &str, len: usize) -> std::path::PathBuf {
        let p = std::env::temp_dir().join(format!("vmigrate-storage-{}-{name}", std::process::id()));
        std::fs::write(&p, (0..len).map(|i| (i * 7 + i / 999) as u8).collect::<Vec<u8>>()).unwrap();
        p
    }

    #[test]
    fn bad_block_sizes_and_missing_images_are_typed_errors() {
        let src = image("bs-src", 4096);
        let dst = std::env::temp_dir().join(format!("vmigrate-storage-{}-bs-dst", std::process::id()));
        for bs in [0, 100, 513, 32 << 20] {
            assert!(matches!(DiskMirror::new(&src, &dst, bs), Err(StorageError::BlockSize(b)) if b == bs));
        }
        let missing = std::env::temp_dir().join("vmigrate-storage-no-such-image");
        assert!(matches!(
            DiskMirror::new(&missing, &dst, 4096),
            Err(StorageError::Io { what: "opening", .. })
        ));
        let _ = std::fs::remove_file(src);
    }

    #[test]
    fn an_idle_disk_mirrors_exactly_including_a_partial_last_block() {
        let src = image("idle-src", (1 << 20) + 1234);
        let dst = std::env::temp_dir().join(format!("vmigrate-storage-{}-idle-dst", std::process::id()));
        let m = DiskMirror::new(&src, &dst, 64 << 10).unwrap();
        let stats = m.run(3, |_, _| {}).unwrap();
        assert!(m.is_ready());
        assert_eq!(stats.blocks_copied, 17);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        // Once ready, a write reported to the observer is mirrored at once.
        let f = File::options().write(true).open(&src).unwrap();
        f.write_all_at(b"mirrored", 1 << 20).unwrap();
        (m.observer())(1 << 20, 8);
        assert_eq!(m.writes_mirrored(), 1);
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
        let _ = std::fs::remove_file(src);
        let _ = std::fs::remove_file(dst);
    }

    #[test]
    fn a_write_the_observer_cannot_mirror_is_reported_and_stays_reported() {
        let src = image("fail-src", 64 << 10);
        let dst = std::env::temp_dir().join(format!("vmigrate-storage-{}-fail-dst", std::process::id()));
        let m = DiskMirror::new(&src, &dst, 4096).unwrap();
        m.run(0, |_, _| {}).unwrap();
        // The source shrinks under the mirror: the range the device reports can no longer be read.
        File::options().write(true).open(&src).unwrap().set_len(4096).unwrap();
        (m.observer())(8192, 4096);
        for _ in 0..2 {
            assert!(matches!(m.check(), Err(StorageError::Mirror { offset: 8192, len: 4096, .. })));
        }
        let _ = std::fs::remove_file(src);
        let _ = std::fs::remove_file(dst);
    }
}
