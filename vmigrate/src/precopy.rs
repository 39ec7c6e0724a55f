//! The pre-copy engine (source side) and its [`ConvergencePolicy`].
//!
//! 1. Handshake (`Hello` → `HelloAck`), start dirty tracking.
//! 2. Iteration 0 sends all memory (zero pages as runs; pages the host never allocated are not
//!    even read); each later iteration re-sends what got dirty, while the predicted downtime
//!    (dirty bytes / measured bandwidth) exceeds the limit. An iteration ends with
//!    `IterationEnd`; from protocol version 5 (without data streams) the source then waits for
//!    the destination's `IterationApplied`, so that the measurement covers applying the pages.
//!    Auto-converge throttles the vCPUs when the dirty rate outruns the link; stall detection
//!    and a total timeout each end in the strategy the caller picked.
//! 3. Pause the vCPUs, then the devices ([`DeviceSections`]); send the rest, the vCPU/VM state
//!    and device sections, `Complete`; wait for `Ready`.
//! 4. **Point of no return**: send `Commit`, wait for `Started`.
//!
//! Before the point of no return, any error, a cancel, a dead peer or a timeout turns dirty
//! logging off, removes the throttle and resumes the source VM and its devices (if they were
//! paused); its memory was only read. If the connection fails after `Commit` was handed to the transport, the source
//! cannot know whether the destination started the guest: it returns
//! [`MigrationError::CommitUncertain`] and leaves the VM **paused**, never resumed; the caller
//! (for example HA, through its fencing tokens) must decide. After `Started` the source VM is
//! shut down, so it can never run again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vcore::{DeviceSections, Vm};

use crate::dirty::{DirtyBitmap, DirtyTracker, empty_maps, trackers_for};
pub use crate::error::MigrationError;
use crate::error::expect_frame;
use crate::stats::{Iteration, MigrationStats, Progress};
use crate::stream::{
    APPLIED_VERSION, COMPRESSION_VERSION, FrameReader, FrameWriter, Hello, LIVE_PAGES_VERSION, Layout,
    Message, PAGE, PROTOCOL_VERSIONS, StreamError,
};
use crate::streams::{Encoding, Out, Senders, Tally, check_streams};
use crate::transport::Transport;

/// What to do when pre-copy stalls or runs out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// Give up; the source keeps running.
    Cancel,
    /// Pause and switch over anyway, accepting the predicted downtime (reported first).
    SwitchOver,
}

/// When pre-copy may stop iterating, and how hard it may push.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConvergencePolicy {
    /// Switch over once the predicted downtime is at most this.
    pub downtime_limit_ms: u64,
    /// Most pre-copy iterations (the full pass included) before giving up.
    pub max_iterations: u32,
    /// Bytes per second the migration may use; `None` = no limit.
    pub bandwidth_limit_bps: Option<u64>,
    /// Throttle vCPUs when the dirty rate outruns the link for two iterations.
    pub auto_converge: bool,
    /// First throttle, percent.
    pub throttle_initial: u8,
    /// Throttle increment per further iteration, percent.
    pub throttle_step: u8,
    /// Highest throttle, percent.
    pub throttle_max: u8,
    /// Iterations without a smaller remaining dirty set that count as a stall.
    pub stall_iterations: u32,
    /// What a stall leads to.
    pub on_stall: Strategy,
    /// Total time allowed for pre-copy, `None` = unlimited.
    pub timeout_ms: Option<u64>,
    /// What the timeout leads to.
    pub on_timeout: Strategy,
    /// LZ4-compress page frames that shrink by at least an eighth (when the destination speaks
    /// protocol version 2). For slow links; off by default, since on a fast link the
    /// compression costs more time than the bytes it saves.
    pub compress: bool,
    /// Send long stretches of data pages straight out of guest memory, without copying them
    /// first (when the destination speaks protocol version 4; see
    /// [`FrameWriter::set_live`]). On by default; a page the guest writes while it is sent is
    /// sent again.
    pub zero_copy: bool,
}

impl Default for ConvergencePolicy {
    fn default() -> Self {
        ConvergencePolicy {
            downtime_limit_ms: 300,
            max_iterations: 30,
            bandwidth_limit_bps: None,
            auto_converge: true,
            throttle_initial: 20,
            throttle_step: 10,
            throttle_max: 99,
            stall_iterations: 5,
            on_stall: Strategy::Cancel,
            timeout_ms: None,
            on_timeout: Strategy::Cancel,
            compress: false,
            zero_copy: true,
        }
    }
}

/// Cancels a running migration from any thread.
#[derive(Debug, Clone, Default)]
pub struct MigrationHandle {
    cancelled: Arc<AtomicBool>,
}

impl MigrationHandle {
    /// A handle nobody cancelled yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// Asks the migration to stop; the source keeps running (unless past the point of no return).
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::SeqCst);
    }
    /// Whether [`MigrationHandle::cancel`] was called.
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// CPU features of the guest's CPUID as KVM offers them on this host.
pub fn host_cpu_features(vm: &Vm) -> crate::stream::CpuFeatures {
    let mut f = crate::stream::CpuFeatures::default();
    let Ok(cpuid) = vcore::cpu::supported_cpuid(vm.kvm()) else { return f };
    for e in cpuid.as_slice() {
        match (e.function, e.index) {
            (0, _) => {
                f.vendor[..4].copy_from_slice(&e.ebx.to_le_bytes());
                f.vendor[4..8].copy_from_slice(&e.edx.to_le_bytes());
                f.vendor[8..].copy_from_slice(&e.ecx.to_le_bytes());
            }
            (1, _) => (f.bits[0], f.bits[1]) = (e.ecx & !(1 << 27), e.edx), // OSXSAVE mirrors CR4
            (7, 0) => (f.bits[2], f.bits[3], f.bits[4]) = (e.ebx, e.ecx, e.edx),
            _ => {}
        }
    }
    f
}

/// The handshake describing `vm`: our version window, its layout, vCPUs and CPU features.
pub fn hello_for(vm: &Vm) -> Hello {
    Hello {
        min_version: PROTOCOL_VERSIONS.0,
        max_version: PROTOCOL_VERSIONS.1,
        vcpus: u16::from(vm.vcpu_count()),
        layout: Layout::of(vm),
        cpu: host_cpu_features(vm),
    }
}

/// Pages per `before_send` chunk (128 MiB): how much memory is re-protected at a time.
const CHUNK_PAGES: u64 = 32768;
/// Flush the send buffer at this size.
const FLUSH_BYTES: usize = crate::stream::SEND_BUFFER;

/// The source side of a live migration.
pub struct Source<'a> {
    vm: &'a Vm,
    policy: ConvergencePolicy,
    handle: MigrationHandle,
    devices: Option<Box<dyn DeviceSections + 'a>>,
    devices_paused: bool,
    progress: Box<dyn FnMut(&Progress) + 'a>,
    trackers: Vec<Box<dyn DirtyTracker>>,
}

impl std::fmt::Debug for Source<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source").field("policy", &self.policy).finish_non_exhaustive()
    }
}

impl<'a> Source<'a> {
    /// Migrates `vm` (running) under `policy`.
    pub fn new(vm: &'a Vm, policy: ConvergencePolicy) -> Self {
        Source {
            vm,
            policy,
            handle: MigrationHandle::new(),
            devices: None,
            devices_paused: false,
            progress: Box::new(|_| {}),
            trackers: trackers_for(vm),
        }
    }

    /// Uses `handle` for cancellation.
    pub fn handle(mut self, handle: MigrationHandle) -> Self {
        self.handle = handle;
        self
    }

    /// The VM's devices: paused and saved right after the vCPUs (see [`DeviceSections`]),
    /// resumed with the VM if the migration fails before the point of no return.
    pub fn devices(mut self, devices: impl DeviceSections + 'a) -> Self {
        self.devices = Some(Box::new(devices));
        self
    }

    /// Receives progress events.
    pub fn progress(mut self, f: impl FnMut(&Progress) + 'a) -> Self {
        self.progress = Box::new(f);
        self
    }

    /// Runs the migration over `transport`. On success the destination runs the guest and the
    /// source VM is shut down.
    pub fn run<T: Transport>(self, transport: T) -> Result<MigrationStats, MigrationError> {
        self.run_streams(transport, Vec::<T>::new())
    }

    /// Runs the migration with its pages spread over the `data` streams (see [`crate::streams`]);
    /// `main` carries the rest. The destination must take as many data streams, in the same
    /// order ([`crate::transport::tcp_connect_streams`] and
    /// [`crate::transport::tcp_accept_streams`] make and take them so), and speak protocol
    /// version 3. With no data streams this is [`Source::run`].
    pub fn run_streams<T: Transport, D: Transport>(
        mut self,
        mut main: T,
        data: Vec<D>,
    ) -> Result<MigrationStats, MigrationError> {
        let mut stats = MigrationStats::default();
        let mut paused = false;
        let result = self.precopy_and_handover(&mut main, data, &mut stats, &mut paused);
        let committed = matches!(result, Ok(()) | Err(MigrationError::CommitUncertain(_)));
        for t in &mut self.trackers {
            let _ = t.stop(self.vm);
        }
        self.vm.set_throttle(0);
        match result {
            Ok(()) => {
                self.vm.shutdown();
                (self.progress)(&Progress::Done);
                Ok(stats)
            }
            Err(e) => {
                if !committed {
                    let mut w = FrameWriter::new(&mut main, 0);
                    let _ = w.message(&Message::Abort(e.to_string()));
                    if paused {
                        if self.devices_paused
                            && let Some(d) = self.devices.as_mut()
                        {
                            d.resume();
                        }
                        let _ = self.vm.resume();
                    }
                }
                main.close();
                Err(e)
            }
        }
    }

    fn check(&self, start: Instant) -> Result<(), MigrationError> {
        if self.handle.is_cancelled() {
            return Err(MigrationError::Cancelled);
        }
        if let Some(ms) = self.policy.timeout_ms
            && self.policy.on_timeout == Strategy::Cancel
            && start.elapsed() > Duration::from_millis(ms)
        {
            return Err(MigrationError::TimedOut { elapsed_ms: start.elapsed().as_millis() as u64 });
        }
        Ok(())
    }

    fn fetch(&mut self, maps: &mut [DirtyBitmap]) -> Result<(), MigrationError> {
        for t in &mut self.trackers {
            t.fetch(self.vm, maps)?;
        }
        Ok(())
    }

    /// Sends every page set in `maps`.
    fn send_maps<W: std::io::Write>(
        &mut self,
        out: &mut Out<'_, W>,
        maps: &[DirtyBitmap],
        iteration: u32,
        start: Instant,
    ) -> Result<(), MigrationError> {
        let slots = self.vm.slots();
        let total: u64 = maps.iter().map(DirtyBitmap::count).sum();
        let (mut done, t0, bytes0) = (0u64, Instant::now(), out.bytes());
        for (slot, map) in slots.iter().zip(maps) {
            let words = map.words();
            let mut first = 0u64;
            while first < map.pages() {
                let n = CHUNK_PAGES.min(map.pages() - first);
                let chunk = &words[(first / 64) as usize..(first + n).div_ceil(64) as usize];
                if chunk.iter().any(|&x| x != 0) {
                    for t in &mut self.trackers {
                        t.before_send(self.vm, slot.slot, first, chunk)?;
                    }
                    for (s, c) in DirtyBitmap::from_words(chunk.to_vec(), n).runs() {
                        let gpa = slot.guest_addr + (first + s) * PAGE as u64;
                        out.pages(self.vm, gpa, c)?;
                        done += c;
                        self.limit_bandwidth(out.bytes() - bytes0, t0);
                    }
                    self.check(start)?;
                    (self.progress)(&Progress::Pages { iteration, done, total });
                }
                first += n;
            }
        }
        Ok(())
    }

    fn limit_bandwidth(&self, bytes: u64, since: Instant) {
        if let Some(limit) = self.policy.bandwidth_limit_bps.filter(|&l| l > 0) {
            let due = Duration::from_secs_f64(bytes as f64 / limit as f64);
            if let Some(wait) = due.checked_sub(since.elapsed()) {
                std::thread::sleep(wait);
            }
        }
    }

    fn precopy_and_handover<T: Transport, D: Transport>(
        &mut self,
        transport: &mut T,
        data: Vec<D>,
        stats: &mut MigrationStats,
        paused: &mut bool,
    ) -> Result<(), MigrationError> {
        let start = Instant::now();
        let vm = self.vm;
        let mut w = FrameWriter::new(&mut *transport, FLUSH_BYTES);
        w.message(&Message::Hello(hello_for(vm)))?;
        w.flush()?;
        let mut total_bytes = w.bytes;
        drop(w);
        let version = expect_frame(&mut FrameReader::new(&mut *transport), "HelloAck", |m| match m {
            Message::HelloAck(v) => Ok(v),
            m => Err(m),
        })?;
        check_streams(data.len(), version, "destination")?;
        for t in &mut self.trackers {
            t.start(vm)?;
        }
        stats.setup = start.elapsed();
        let total_pages: u64 = vm.slots().iter().map(|s| s.pages()).sum();
        (self.progress)(&Progress::Setup { total_pages });

        stats.data_streams = data.len();
        let enc = Encoding {
            compress: self.policy.compress && version >= COMPRESSION_VERSION,
            live: self.policy.zero_copy && version >= LIVE_PAGES_VERSION,
        };
        let main = enc.writer(&mut *transport, FLUSH_BYTES);
        let (pause_at, sent) = if data.is_empty() {
            let mut out = Out { main, streams: None, main_pages: Tally::default() };
            let acked = version >= APPLIED_VERSION;
            self.stream_memory(&mut out, acked, stats, paused, start)?
        } else {
            std::thread::scope(|s| {
                let senders = Senders::start(s, vm.memory(), data, enc);
                let mut out = Out { main, streams: Some(&senders), main_pages: Tally::default() };
                // On an error the senders go first: their threads then see their queues close,
                // close their streams and end, and the scope can join them.
                let r = self.stream_memory(&mut out, false, stats, paused, start);
                drop(out);
                drop(senders);
                r
            })?
        };
        stats.compressed_pages = sent.compressed;
        stats.live_pages = sent.live;
        total_bytes += sent.bytes;
        expect_frame(&mut FrameReader::new(&mut *transport), "Ready", |m| match m {
            Message::Ready => Ok(()),
            m => Err(m),
        })?;
        self.check(start)?;
        let handover_at = Instant::now();

        // Point of no return: from here the source never resumes.
        let mut w = FrameWriter::new(&mut *transport, 0);
        w.message(&Message::Commit).map_err(MigrationError::CommitUncertain)?;
        total_bytes += w.bytes;
        drop(w);
        match FrameReader::new(&mut *transport).read_frame() {
            Ok(Message::Started) => {}
            Ok(other) => {
                let msg = format!("{other:?} instead of Started");
                return Err(MigrationError::CommitUncertain(StreamError::Io(std::io::Error::other(msg))));
            }
            Err(e) => return Err(MigrationError::CommitUncertain(e)),
        }
        stats.downtime = pause_at.elapsed();
        stats.handover = handover_at.elapsed();
        stats.total = start.elapsed();
        stats.bytes_sent = total_bytes;
        stats.throughput_bps = stats.bytes_sent as f64 / stats.total.as_secs_f64().max(1e-9);
        Ok(())
    }

    /// Pre-copy iterations, then pause and copy the rest, the vCPU and device state, `Complete`.
    /// Returns when the VM was paused, and what all streams sent.
    ///
    /// With `acked` (protocol version 5, no data streams) an iteration ends when the destination
    /// answers its `IterationEnd` with `IterationApplied`: its duration, and so the measured
    /// bandwidth, the dirty set and the predicted downtime, then include the destination writing
    /// the pages into its memory. Without it, a destination still applying an earlier iteration
    /// when the source pauses adds that backlog to the downtime.
    fn stream_memory<W: std::io::Read + std::io::Write>(
        &mut self,
        out: &mut Out<'_, W>,
        acked: bool,
        stats: &mut MigrationStats,
        paused: &mut bool,
        start: Instant,
    ) -> Result<(Instant, Tally), MigrationError> {
        let vm = self.vm;
        let mut before = Tally::default(); // what was sent by the end of the previous iteration
        let mut to_send: Vec<DirtyBitmap> =
            vm.slots().iter().map(|s| DirtyBitmap::all_set(s.pages())).collect();
        let (mut best_remaining, mut stalled_for, mut outrun, mut throttle) = (u64::MAX, 0u32, 0u32, 0u8);
        let mut index = 0u32;
        loop {
            let t = Instant::now();
            let dirty_pages: u64 = to_send.iter().map(DirtyBitmap::count).sum();
            self.send_maps(out, &to_send, index, start)?;
            out.main.message(&Message::IterationEnd(index))?;
            let now = out.sync(false)?;
            if acked {
                expect_frame(&mut FrameReader::new(out.main.get_mut()), "IterationApplied", |m| match m {
                    Message::IterationApplied(n) if n == index => Ok(()),
                    m => Err(m),
                })?;
            }
            let duration = t.elapsed();
            let sent = now - before;
            let it_bytes = sent.bytes;
            before = now;
            let mut maps = empty_maps(vm);
            self.fetch(&mut maps)?;
            let remaining: u64 = maps.iter().map(DirtyBitmap::count).sum();
            let secs = duration.as_secs_f64().max(1e-6);
            // Measured link rate. After a pass over mostly-zero memory it underestimates the
            // link (time went to scanning, not sending): the error is on the safe side, one more
            // iteration rather than a longer downtime.
            let mut bandwidth = (it_bytes as f64 / secs).max(1.0);
            if let Some(limit) = self.policy.bandwidth_limit_bps.filter(|&l| l > 0) {
                bandwidth = bandwidth.min(limit as f64);
            }
            let dirty_rate = remaining as f64 / secs;
            let expected = Duration::from_secs_f64(remaining as f64 * PAGE as f64 / bandwidth);
            let it = Iteration {
                index,
                dirty_pages,
                normal_pages: sent.normal,
                zero_pages: sent.zero,
                bytes: it_bytes,
                duration,
                bandwidth_bps: bandwidth,
                dirty_rate_pps: dirty_rate,
                throttle_percent: throttle,
                expected_downtime: expected,
            };
            stats.iterations.push(it);
            stats.normal_pages += sent.normal;
            stats.zero_pages += sent.zero;
            (self.progress)(&Progress::IterationDone(it));
            to_send = maps;
            index += 1;

            if expected <= Duration::from_millis(self.policy.downtime_limit_ms) {
                break;
            }
            // A stall: the dirty set stops shrinking although auto-converge has nothing left to try.
            let can_throttle_more = self.policy.auto_converge && throttle < self.policy.throttle_max;
            if remaining < best_remaining {
                (best_remaining, stalled_for) = (remaining, 0);
            } else if !can_throttle_more {
                stalled_for += 1;
            }
            let timed_out =
                self.policy.timeout_ms.is_some_and(|ms| start.elapsed() > Duration::from_millis(ms));
            let forced = if timed_out {
                Some(("pre-copy timeout", self.policy.on_timeout))
            } else if stalled_for >= self.policy.stall_iterations {
                Some(("pre-copy stalled", self.policy.on_stall))
            } else {
                None
            };
            match forced {
                Some((_, Strategy::Cancel)) if timed_out => {
                    return Err(MigrationError::TimedOut { elapsed_ms: start.elapsed().as_millis() as u64 });
                }
                Some((_, Strategy::Cancel)) => {
                    return Err(MigrationError::Stalled {
                        iterations: stalled_for,
                        remaining_pages: remaining,
                    });
                }
                Some((reason, Strategy::SwitchOver)) => {
                    stats.forced_switchover = true;
                    (self.progress)(&Progress::ForcingSwitchover {
                        reason: reason.to_string(),
                        expected_downtime: expected,
                    });
                    break;
                }
                None => {}
            }
            if index >= self.policy.max_iterations {
                return Err(MigrationError::NotConverging {
                    iterations: index,
                    remaining_pages: remaining,
                    expected_downtime_ms: expected.as_millis() as u64,
                });
            }
            // Auto-converge: the guest re-dirtied more than half of what the iteration drained
            // (QEMU's trigger), so the link cannot win on its own.
            if remaining * PAGE as u64 * 2 > it_bytes {
                outrun += 1
            } else {
                outrun = 0
            }
            if self.policy.auto_converge && outrun >= 2 && throttle < self.policy.throttle_max {
                throttle = if throttle == 0 {
                    self.policy.throttle_initial
                } else {
                    throttle.saturating_add(self.policy.throttle_step)
                }
                .min(self.policy.throttle_max);
                vm.set_throttle(throttle);
                stats.max_throttle_percent = throttle;
                (self.progress)(&Progress::Throttle { percent: throttle });
            }
        }

        // Stop and copy.
        self.check(start)?;
        let pause_at = Instant::now();
        vm.pause()?;
        *paused = true;
        stats.pause_latency = pause_at.elapsed();
        // Devices stop before the last pass, so that it carries everything they wrote.
        let sections = match self.devices.as_mut() {
            Some(d) => {
                self.devices_paused = true;
                d.pause_and_save().map_err(MigrationError::Devices)?
            }
            None => Vec::new(),
        };
        self.fetch(&mut to_send)?;
        let remaining_pages = to_send.iter().map(DirtyBitmap::count).sum();
        (self.progress)(&Progress::Paused { remaining_pages });
        self.send_maps(out, &to_send, index, start)?;
        let state = vm.save_state()?.to_bytes();
        out.main.message(&Message::CpuState(&state))?;
        for (name, data) in &sections {
            out.main.message(&Message::Device { name: name.clone(), data })?;
        }
        out.main.message(&Message::Complete)?;
        // The data streams end (`Complete`) before the main stream is flushed.
        let now = out.sync(true)?;
        stats.final_copy = pause_at.elapsed() - stats.pause_latency;
        let last = now - before;
        stats.final_pages = last.normal + last.zero;
        stats.normal_pages += last.normal;
        stats.zero_pages += last.zero;
        Ok((pause_at, now))
    }
}
