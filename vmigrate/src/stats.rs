//! Migration statistics, as a final struct and as progress events.

use std::time::Duration;

use serde::Serialize;

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
