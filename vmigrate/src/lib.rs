//! vmigrate: moving a running VM between hosts (vMotion).
//!
//! Dirty-page tracking ([`dirty`]), a versioned, framed and checksummed wire protocol
//! ([`stream`]), transports ([`transport`]), and the pre-copy engine ([`precopy`]) with its
//! statistics ([`stats`]).
#![deny(missing_docs, missing_debug_implementations)]

pub mod dirty;
pub mod error;
pub mod precopy;
pub mod receive;
pub mod stats;
pub mod storage;
pub mod stream;
pub mod streams;
pub mod transport;

pub use dirty::{DirtyBitmap, DirtyTracker};
pub use precopy::{ConvergencePolicy, MigrationError, MigrationHandle, Source, Strategy};
pub use receive::{Destination, ReceiveStats, save_snapshot};
pub use stats::{DirtyRate, MigrationStats, Progress, probe_dirty_rate};
pub use storage::{
    DiskMirror, FileTarget, MirrorStats, MirrorTarget, RemoteImage, StorageError, serve_image,
};
pub use stream::StreamError;
pub use vcore::DeviceSections;
mod pagemap;
mod sys;
