//! Migration statistics, as a final struct and as progress events.

use std::time::{Duration, Instant};

use serde::Serialize;
use vcore::Vm;

use crate::dirty::{DirtyBitmap, DirtyError, DirtyTracker, empty_maps, trackers_for};

/// One pre-copy iteration.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Default)]
pub struct Iteration {
    /// Iteration number (0 is the full pass).
    pub index: u32,
    /// Pages found dirty at its start (all pages for iteration 0).
    pub dirty_pages: u64,
    /// Pages sent with contents.
    pub normal_pages: u64,
    /// Pages sent as zero runs.
    pub zero_pages: u64,
    /// Bytes handed to the transport.
    pub bytes: u64,
    /// How long it took.
    pub duration: Duration,
    /// Measured throughput, bytes per second.
    pub bandwidth_bps: f64,
    /// Guest dirty rate measured over it, pages per second.
    pub dirty_rate_pps: f64,
    /// vCPU throttle in force, percent.
    pub throttle_percent: u8,
    /// Downtime predicted from what remains dirty after it.
    pub expected_downtime: Duration,
}

/// What a migration did, for users and scripts.
#[derive(Debug, Clone, PartialEq, Serialize, Default)]
pub struct MigrationStats {
    /// From start to the destination's `Started`.
    pub total: Duration,
    /// Handshake and dirty-tracking start.
    pub setup: Duration,
    /// From the source's pause until the destination reported the guest running.
    pub downtime: Duration,
    /// Part of the downtime spent pausing the vCPUs.
    pub pause_latency: Duration,
    /// Part of the downtime spent sending the last dirty pages and saving vCPU/VM state.
    pub final_copy: Duration,
    /// Part of the downtime from `Commit` to `Started` (the destination starting the guest).
    pub handover: Duration,
    /// Bytes sent (frames, headers included).
    pub bytes_sent: u64,
    /// Pages sent with contents (all iterations and the final copy).
    pub normal_pages: u64,
    /// Pages sent as zero runs.
    pub zero_pages: u64,
    /// Data pages sent LZ4-compressed ([`ConvergencePolicy::compress`](crate::ConvergencePolicy)).
    pub compressed_pages: u64,
    /// Data pages sent straight out of guest memory, without a copy (`LivePages` frames).
    pub live_pages: u64,
    /// Pre-copy iterations, in order.
    pub iterations: Vec<Iteration>,
    /// Pages sent during the stop-and-copy phase.
    pub final_pages: u64,
    /// Average throughput over the whole migration, bytes per second.
    pub throughput_bps: f64,
    /// Highest vCPU throttle applied, percent.
    pub max_throttle_percent: u8,
    /// Whether the switch-over happened because a stall or timeout strategy forced it.
    pub forced_switchover: bool,
    /// Data streams that carried the pages (0: the main stream carried them).
    pub data_streams: usize,
}

/// Progress reported while migrating.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub enum Progress {
    /// The handshake succeeded and tracking started.
    Setup {
        /// Pages of guest memory.
        total_pages: u64,
    },
    /// Some pages of the current iteration were sent.
    Pages {
        /// Iteration.
        iteration: u32,
        /// Pages done in it so far.
        done: u64,
        /// Pages in it.
        total: u64,
    },
    /// An iteration finished.
    IterationDone(Iteration),
    /// The vCPU throttle changed.
    Throttle {
        /// New value, percent.
        percent: u8,
    },
    /// A stall or the timeout forces the switch-over; this downtime is expected.
    ForcingSwitchover {
        /// Why.
        reason: String,
        /// Predicted downtime.
        expected_downtime: Duration,
    },
    /// The source paused the VM for the final copy.
    Paused {
        /// Pages left to send.
        remaining_pages: u64,
    },
    /// The destination runs the guest.
    Done,
}

/// What a dirty-rate probe saw: how fast the guest dirties memory, measured without migrating.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct DirtyRate {
    /// How long the probe sampled.
    pub duration: Duration,
    /// Distinct pages dirtied during it (by the vCPUs and by devices).
    pub pages: u64,
    /// Distinct pages dirtied per second.
    pub pages_per_sec: f64,
    /// The same in MiB/s: what `vsched`'s `VmSpec::dirty_mib_s` takes for its migration cost.
    pub mib_per_sec: f64,
}

/// Samples how fast `vm` dirties its memory, without migrating (like QEMU's `calc-dirty-rate`):
/// starts the trackers a migration would use, clears what they report at once (with
/// initially-all-set dirty logs that is every page), waits `duration`, and counts the distinct
/// pages dirtied meanwhile. Tracking is stopped again whatever happens; the guest runs on
/// throughout. A page written many times counts once, as it would cost one resend.
pub fn probe_dirty_rate(vm: &Vm, duration: Duration) -> Result<DirtyRate, DirtyError> {
    let mut trackers = trackers_for(vm);
    let result = sample(vm, &mut trackers, duration);
    let mut stopped = Ok(());
    for t in &mut trackers {
        let r = t.stop(vm);
        if stopped.is_ok() {
            stopped = r;
        }
    }
    let rate = result?;
    stopped.map(|()| rate)
}

fn sample(
    vm: &Vm,
    trackers: &mut [Box<dyn DirtyTracker>],
    duration: Duration,
) -> Result<DirtyRate, DirtyError> {
    for t in trackers.iter_mut() {
        t.start(vm)?;
    }
    // The baseline: take what is reported now and re-arm it, as a pre-copy pass would.
    let mut maps = empty_maps(vm);
    for t in trackers.iter_mut() {
        t.fetch(vm, &mut maps)?;
    }
    for (slot, map) in vm.slots().iter().zip(&maps) {
        for t in trackers.iter_mut() {
            rearm(t.as_mut(), vm, slot.slot, map)?;
        }
    }
    let start = Instant::now();
    std::thread::sleep(duration);
    let mut maps = empty_maps(vm);
    for t in trackers.iter_mut() {
        t.fetch(vm, &mut maps)?;
    }
    let elapsed = start.elapsed().max(Duration::from_micros(1));
    let pages: u64 = maps.iter().map(DirtyBitmap::count).sum();
    let pages_per_sec = pages as f64 / elapsed.as_secs_f64();
    Ok(DirtyRate {
        duration: elapsed,
        pages,
        pages_per_sec,
        mib_per_sec: pages_per_sec * crate::stream::PAGE as f64 / (1 << 20) as f64,
    })
}

/// Re-arms `map`'s pages of `slot` in chunks of 128 MiB (what a pre-copy pass does before
/// reading them).
fn rearm(t: &mut dyn DirtyTracker, vm: &Vm, slot: u32, map: &DirtyBitmap) -> Result<(), DirtyError> {
    const CHUNK_WORDS: usize = 32768 / 64;
    for (i, words) in map.words().chunks(CHUNK_WORDS).enumerate() {
        t.before_send(vm, slot, (i * CHUNK_WORDS * 64) as u64, words)?;
    }
    Ok(())
}
