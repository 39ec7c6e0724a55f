//! The errors of a migration, on either side.

use crate::dirty::DirtyError;
use crate::stream::{FrameReader, Message, StreamError};

/// Errors of a migration. Every variant but [`MigrationError::CommitUncertain`] leaves the source
/// VM running (source side) or the destination VM never started (destination side).
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The stream failed: transport error, dead peer, corrupt frame.
    #[error("migration stream")]
    Stream(#[from] StreamError),
    /// Dirty tracking failed.
    #[error("dirty tracking")]
    Dirty(#[from] DirtyError),
    /// A VM operation failed (pause, state save or restore, start).
    #[error("VM operation")]
    Vm(#[from] vcore::VmError),
    /// The source's devices could not be paused or saved.
    #[error("saving device state: {0}")]
    Devices(String),
    /// The peer refused the handshake or aborted.
    #[error("the peer aborted: {0}")]
    PeerAborted(String),
    /// The two sides cannot migrate this VM (versions, layout, vCPUs, CPU features).
    #[error("incompatible peers: {0}")]
    Incompatible(String),
    /// A message arrived where another was required.
    #[error("protocol violation: expected {expected}, got {got}")]
    Protocol {
        /// What the state machine needed.
        expected: &'static str,
        /// What arrived.
        got: String,
    },
    /// `MigrationHandle::cancel` was called.
    #[error("migration cancelled")]
    Cancelled,
    /// The iteration cap was reached with too much left to send.
    #[error(
        "not converging after {iterations} iterations: {remaining_pages} pages dirty, {expected_downtime_ms} ms expected downtime"
    )]
    NotConverging {
        /// Iterations done.
        iterations: u32,
        /// Pages still dirty.
        remaining_pages: u64,
        /// Downtime a switch-over would cost.
        expected_downtime_ms: u64,
    },
    /// The remaining dirty set stopped shrinking and the policy says cancel.
    #[error("pre-copy stalled at {remaining_pages} dirty pages for {iterations} iterations")]
    Stalled {
        /// Iterations without progress.
        iterations: u32,
        /// Pages still dirty.
        remaining_pages: u64,
    },
    /// The pre-copy timeout passed and the policy says cancel.
    #[error("pre-copy timed out after {elapsed_ms} ms")]
    TimedOut {
        /// Time spent.
        elapsed_ms: u64,
    },
    /// The connection failed after `Commit` was sent: the destination may or may not run the
    /// guest. The source VM stays paused and must not be resumed without outside knowledge.
    #[error("connection lost at commit: the guest may be running on the destination; source left paused")]
    CommitUncertain(#[source] StreamError),
}

/// Reads the peer's next frame on `r` and lets `want` take it (it hands back a frame it does not
/// want). An `Abort` in its place ends the session with the peer's reason; any other frame is a
/// protocol violation naming `expected`.
pub(crate) fn expect_frame<R: std::io::Read, T>(
    r: &mut FrameReader<R>,
    expected: &'static str,
    want: impl FnOnce(Message<'_>) -> Result<T, Message<'_>>,
) -> Result<T, MigrationError> {
    match want(r.read_frame()?) {
        Ok(t) => Ok(t),
        Err(Message::Abort(reason)) => Err(MigrationError::PeerAborted(reason)),
        Err(other) => Err(MigrationError::Protocol { expected, got: format!("{other:?}") }),
    }
}
