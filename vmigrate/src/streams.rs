//! Data streams: one migration's pages over several connections at once (QEMU's multifd).
//!
//! The main stream keeps the handshake, the iteration marks, the state sections and the
//! commit; with data streams it carries no page at all. Guest-physical memory is cut into
//! [`PARTITION`]-sized pieces and piece `i` always travels on data stream `i % n`, so the
//! copies of one page, iteration after iteration, arrive in order on one stream and the
//! receiver can apply each stream as it comes, with no barrier between streams.
//!
//! Each data stream starts with `StreamHello { index, count }` and ends with `Complete`
//! after the last page of the final pass. The destination restores state only after every
//! data stream has ended. A data stream that fails closes its connection, so that the other
//! side's next write to it fails, and the source then aborts the whole migration (the source
//! VM keeps running).
//!
//! On the source, one thread per data stream copies pages out of guest memory, checksums
//! and sends them; the engine's thread scans the dirty bitmaps and hands out page runs. On the
//! destination, one thread per data stream reads and writes pages into guest memory.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};
use std::thread::Scope;

use vcore::{GuestMemory, Vm};

use crate::precopy::MigrationError;
use crate::receive::{Fresh, ReceiveStats, Torn, take_pages};
use crate::stream::{
    FrameReader, FrameWriter, Layout, MAX_DATA_STREAMS, Message, PAGE, SEND_BUFFER, STREAMS_VERSION,
    StreamError,
};
use crate::transport::Transport;

/// Bytes of guest-physical address space per partition: the unit of the stream assignment.
pub const PARTITION: u64 = 1 << 20;

/// The data stream (of `count`) that carries the page at `gpa`.
pub fn stream_of(gpa: u64, count: usize) -> usize {
    ((gpa / PARTITION) % count.max(1) as u64) as usize
}

/// `pages` pages from page-aligned `gpa`, cut at partition boundaries: `(stream, gpa, pages)`
/// pieces in address order, for `count` streams.
pub fn split(gpa: u64, pages: u64, count: usize) -> impl Iterator<Item = (usize, u64, u64)> {
    let end = gpa + pages * PAGE as u64;
    let mut at = gpa;
    std::iter::from_fn(move || {
        if at >= end {
            return None;
        }
        let next = (at / PARTITION + 1).saturating_mul(PARTITION).min(end);
        let piece = (stream_of(at, count), at, (next - at) / PAGE as u64);
        at = next;
        Some(piece)
    })
}

/// Checks that `count` data streams can be used with the negotiated protocol `version`
/// (`peer` names the other side in the error).
pub(crate) fn check_streams(count: usize, version: u16, peer: &str) -> Result<(), MigrationError> {
    if count > usize::from(MAX_DATA_STREAMS) {
        return Err(MigrationError::Incompatible(format!(
            "{count} data streams, at most {MAX_DATA_STREAMS}"
        )));
    }
    if count > 0 && version < STREAMS_VERSION {
        return Err(MigrationError::Incompatible(format!(
            "data streams need protocol version {STREAMS_VERSION}; the {peer} speaks at most {version}"
        )));
    }
    Ok(())
}

/// What one or all data streams sent so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Tally {
    pub bytes: u64,
    pub normal: u64,
    pub zero: u64,
    pub compressed: u64,
    pub live: u64,
}

/// How senders encode pages: LZ4 ([`FrameWriter::set_compress`]), or live, without a copy
/// ([`FrameWriter::set_live`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Encoding {
    pub compress: bool,
    pub live: bool,
}

impl Encoding {
    /// A writer over `t` set up for this encoding.
    pub fn writer<W: std::io::Write>(self, t: W, flush_at: usize) -> FrameWriter<W> {
        let mut w = FrameWriter::new(t, flush_at);
        w.set_compress(self.compress);
        w.set_live(self.live);
        w
    }
}

impl std::ops::Sub for Tally {
    type Output = Tally;
    /// What was sent between two tallies (`self` the later).
    fn sub(self, o: Tally) -> Tally {
        Tally {
            bytes: self.bytes - o.bytes,
            normal: self.normal - o.normal,
            zero: self.zero - o.zero,
            compressed: self.compressed - o.compressed,
            live: self.live - o.live,
        }
    }
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, o: Tally) -> Tally {
        Tally {
            bytes: self.bytes + o.bytes,
            normal: self.normal + o.normal,
            zero: self.zero + o.zero,
            compressed: self.compressed + o.compressed,
            live: self.live + o.live,
        }
    }
}

enum Job {
    /// Send `pages` pages from `gpa` (inside one slot and one partition).
    Pages { gpa: u64, pages: u64 },
    /// Flush, then report the tally.
    Sync,
    /// Send `Complete`, flush, report the tally and stop.
    End,
}

/// Jobs queued per sender thread before the engine waits (each is at most one partition, 1 MiB).
/// Small, so that the engine's bandwidth limit, applied as it hands out jobs, holds within a few
/// MiB per stream.
const JOB_DEPTH: usize = 4;

/// The source's sender threads, one per data stream.
pub(crate) struct Senders {
    jobs: Vec<SyncSender<Job>>,
    replies: Receiver<(usize, Result<Tally, StreamError>)>,
    /// Bytes all sender threads have written so far (for the bandwidth limit).
    bytes: std::sync::Arc<AtomicU64>,
}

impl Senders {
    /// Starts one sender thread per transport in `data`, on `scope`.
    pub fn start<'scope, 'env, D: Transport + 'scope>(
        scope: &'scope Scope<'scope, 'env>,
        mem: &'scope GuestMemory,
        data: Vec<D>,
        enc: Encoding,
    ) -> Senders {
        let count = data.len() as u16;
        let (reply_tx, replies) = sync_channel(data.len());
        let bytes = std::sync::Arc::new(AtomicU64::new(0));
        let jobs = data
            .into_iter()
            .enumerate()
            .map(|(index, t)| {
                let (tx, rx) = sync_channel(JOB_DEPTH);
                let (reply, bytes) = (reply_tx.clone(), bytes.clone());
                std::thread::Builder::new()
                    .name(format!("vmigrate-send-{index}"))
                    .spawn_scoped(scope, move || {
                        send_stream(mem, t, index as u16, count, enc, &rx, &reply, &bytes)
                    })
                    .expect("spawning a sender thread");
                tx
            })
            .collect();
        Senders { jobs, replies, bytes }
    }

    /// Bytes written by all streams so far.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Queues `pages` pages from `gpa` (inside one slot), split at partition boundaries.
    pub fn pages(&self, gpa: u64, pages: u64) -> Result<(), MigrationError> {
        for (s, gpa, pages) in split(gpa, pages, self.jobs.len()) {
            if self.jobs[s].send(Job::Pages { gpa, pages }).is_err() {
                return Err(self.failure());
            }
        }
        Ok(())
    }

    /// Waits until every stream has sent what it was given; the totals so far.
    pub fn sync(&self) -> Result<Tally, MigrationError> {
        self.round(|| Job::Sync)
    }

    /// Ends every stream with `Complete`; the final totals.
    pub fn end(&self) -> Result<Tally, MigrationError> {
        self.round(|| Job::End)
    }

    fn round(&self, job: impl Fn() -> Job) -> Result<Tally, MigrationError> {
        for tx in &self.jobs {
            if tx.send(job()).is_err() {
                return Err(self.failure());
            }
        }
        let mut total = Tally::default();
        for _ in 0..self.jobs.len() {
            match self.replies.recv() {
                Ok((_, Ok(t))) => total = total + t,
                Ok((_, Err(e))) => return Err(e.into()),
                Err(_) => return Err(self.failure()),
            }
        }
        Ok(total)
    }

    /// The error of a sender thread that stopped.
    fn failure(&self) -> MigrationError {
        match self.replies.try_recv() {
            Ok((_, Err(e))) => e.into(),
            _ => MigrationError::Stream(StreamError::Closed),
        }
    }
}

/// Where the engine's pages go: the main stream's writer, or the data streams' senders.
pub(crate) struct Out<'s, W: std::io::Write> {
    pub main: FrameWriter<W>,
    pub streams: Option<&'s Senders>,
    /// Pages written on the main stream (without data streams).
    pub main_pages: Tally,
}

impl<W: std::io::Write> Out<'_, W> {
    /// Sends `pages` pages of guest memory from `gpa` (inside one slot).
    pub fn pages(&mut self, vm: &Vm, gpa: u64, pages: u64) -> Result<(), MigrationError> {
        if let Some(s) = self.streams {
            return s.pages(gpa, pages);
        }
        let (n, z) = self.main.guest_range(vm.memory(), gpa, pages as usize * PAGE)?;
        self.main_pages.normal += n;
        self.main_pages.zero += z;
        Ok(())
    }

    /// Bytes handed to the transports so far.
    pub fn bytes(&self) -> u64 {
        self.main.bytes + self.streams.map_or(0, Senders::bytes)
    }

    /// Flushes every stream; what all of them sent so far.
    pub fn sync(&mut self, end_streams: bool) -> Result<Tally, MigrationError> {
        let pages = match self.streams {
            Some(s) if end_streams => s.end()?,
            Some(s) => s.sync()?,
            None => Tally {
                compressed: self.main.compressed_pages,
                live: self.main.live_pages,
                ..self.main_pages
            },
        };
        self.main.flush()?;
        Ok(Tally { bytes: pages.bytes + self.main.bytes, ..pages })
    }
}

/// One sender thread: serves jobs until `End`, an error, or the engine dropping its queue.
#[allow(clippy::too_many_arguments)]
fn send_stream<D: Transport>(
    mem: &GuestMemory,
    mut t: D,
    index: u16,
    count: u16,
    enc: Encoding,
    jobs: &Receiver<Job>,
    reply: &SyncSender<(usize, Result<Tally, StreamError>)>,
    bytes: &AtomicU64,
) {
    let mut w = enc.writer(&mut t, SEND_BUFFER);
    let mut tally = Tally::default();
    let result = (|| -> Result<bool, StreamError> {
        w.message(&Message::StreamHello { index, count })?;
        while let Ok(job) = jobs.recv() {
            match job {
                Job::Pages { gpa, pages } => {
                    let before = w.bytes;
                    let (n, z) = w.guest_range(mem, gpa, pages as usize * PAGE)?;
                    tally.normal += n;
                    tally.zero += z;
                    bytes.fetch_add(w.bytes - before, Ordering::Relaxed);
                }
                Job::Sync | Job::End => {
                    let end = matches!(job, Job::End);
                    if end {
                        w.message(&Message::Complete)?;
                    }
                    w.flush()?;
                    tally.bytes = w.bytes;
                    tally.compressed = w.compressed_pages;
                    tally.live = w.live_pages;
                    if reply.send((usize::from(index), Ok(tally))).is_err() || end {
                        return Ok(end);
                    }
                }
            }
        }
        Ok(false) // the engine stopped: the migration failed elsewhere
    })();
    drop(w);
    match result {
        Ok(true) => {}
        Ok(false) => t.close(),
        Err(e) => {
            t.close();
            let _ = reply.send((usize::from(index), Err(e)));
        }
    }
}

/// One receiver thread: applies data stream `index` (of `count`) to `mem` until its
/// `Complete`, knowing what `fresh` says of the VM. A failed stream is closed.
pub(crate) fn receive_stream<D: Transport>(
    mem: &GuestMemory,
    layout: &Layout,
    fresh: Fresh,
    mut t: D,
    index: usize,
    count: usize,
) -> Result<ReceiveStats, MigrationError> {
    let mut stats = ReceiveStats::default();
    let result = (|| {
        let mut r = FrameReader::new(&mut t);
        match r.read_frame()? {
            Message::StreamHello { count: c, .. } if usize::from(c) != count => {
                return Err(MigrationError::Incompatible(format!(
                    "the source sends {c} data streams, the destination takes {count}"
                )));
            }
            Message::StreamHello { index: i, .. } if usize::from(i) != index => {
                return Err(MigrationError::Incompatible(format!(
                    "data stream {i} arrived as stream {index}: connections must be accepted in \
                     the order the source made them"
                )));
            }
            Message::StreamHello { .. } => {}
            other => {
                return Err(MigrationError::Protocol { expected: "StreamHello", got: format!("{other:?}") });
            }
        }
        let mut torn = Torn::default();
        r.set_populate(fresh.populate);
        loop {
            let msg = r.read_frame_into(mem, layout)?;
            match msg {
                Message::Complete => break,
                other => {
                    if !take_pages(mem, layout, &other, fresh, &mut stats, &mut torn)? {
                        return Err(MigrationError::Protocol {
                            expected: "pages on a data stream",
                            got: format!("{other:?}"),
                        });
                    }
                }
            }
        }
        torn.check()?;
        stats.bytes = r.bytes;
        Ok(())
    })();
    match result {
        Ok(()) => Ok(stats),
        Err(e) => {
            t.close();
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{Kind, MAX_DATA_STREAMS};
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn a_run_is_cut_into_whole_partitions_each_on_the_stream_of_its_pages(
            first in 0u64..1 << 20,
            pages in 1u64..4096,
            count in 1usize..9,
        ) {
            let gpa = first * PAGE as u64;
            let mut at = gpa;
            for (s, g, n) in split(gpa, pages, count) {
                prop_assert_eq!(g, at, "pieces are contiguous");
                prop_assert!(n > 0);
                let last = g + (n - 1) * PAGE as u64;
                prop_assert_eq!(g / PARTITION, last / PARTITION, "a piece stays in one partition");
                prop_assert_eq!(s, stream_of(g, count));
                prop_assert!(s < count);
                at = g + n * PAGE as u64;
            }
            prop_assert_eq!(at, gpa + pages * PAGE as u64, "the pieces cover the run exactly");
        }
    }

    #[test]
    fn stream_hello_round_trips_and_bad_ones_are_refused() {
        let mut out = Vec::new();
        let mut w = FrameWriter::new(&mut out, 0);
        w.message(&Message::StreamHello { index: 2, count: 3 }).unwrap();
        drop(w);
        let mut r = FrameReader::new(out.as_slice());
        assert_eq!(r.read_frame().unwrap(), Message::StreamHello { index: 2, count: 3 });
        for (index, count) in [(3u16, 3u16), (0, 0), (0, MAX_DATA_STREAMS + 1)] {
            let mut p = index.to_le_bytes().to_vec();
            p.extend_from_slice(&count.to_le_bytes());
            assert!(
                matches!(Message::parse(Kind::StreamHello, &p), Err(StreamError::Malformed { .. })),
                "stream {index} of {count}"
            );
        }
    }
}
