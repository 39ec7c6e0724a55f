//! virtio devices: the [`VirtioDevice`] trait every device implements, the descriptor-chain
//! parser that stands between the guest's queues and the backends, and the virtio-mmio transport.
//!
//! A device never sees a raw queue: the transport hands it a [`QueueCtx`] whose [`QueueCtx::pop`]
//! returns a validated [`Chain`] (every buffer inside guest memory, no loop, readable buffers
//! before writable ones) or a [`ChainError`]. A `ChainError` means the guest broke the protocol:
//! the transport marks the device broken (`DEVICE_NEEDS_RESET`) and stops serving it until the
//! driver resets it. A request that is well formed but fails (an I/O error, a sector past the end)
//! is completed with an error status instead.

pub mod balloon;
pub mod block;
mod chain;
pub mod console;
mod ctx;
pub mod mmio;
pub mod net;
pub mod packed;
pub mod rng;

use std::os::fd::RawFd;

use serde::{Deserialize, Serialize};
use virtio_queue::Queue;

pub use chain::{Chain, ChainError, Desc, Segs};
pub use ctx::QueueCtx;

/// `VIRTIO_F_INDIRECT_DESC`: the driver may use indirect descriptor tables.
pub const VIRTIO_F_INDIRECT_DESC: u64 = 1 << 28;
/// `VIRTIO_F_RING_EVENT_IDX`: used/avail event suppression.
pub const VIRTIO_F_RING_EVENT_IDX: u64 = 1 << 29;
/// `VIRTIO_F_VERSION_1`: a virtio 1.x (non-legacy) device. Every device offers it.
pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// virtio device type: network card.
pub const TYPE_NET: u32 = 1;
/// virtio device type: block device.
pub const TYPE_BLOCK: u32 = 2;
/// virtio device type: console.
pub const TYPE_CONSOLE: u32 = 3;
/// virtio device type: entropy source.
pub const TYPE_RNG: u32 = 4;
/// virtio device type: memory balloon (traditional).
pub const TYPE_BALLOON: u32 = 5;

/// Errors a device reports while serving its queues.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The guest broke the virtio protocol; the device is now broken until reset.
    #[error("guest protocol violation on queue {queue}")]
    Chain {
        /// The queue.
        queue: usize,
        /// What was wrong.
        #[source]
        source: ChainError,
    },
    /// The backend failed in a way that leaves the device unusable.
    #[error("backend failure: {what}")]
    Backend {
        /// What failed.
        what: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

impl DeviceError {
    /// Wraps a chain error seen on `queue`.
    pub fn chain(queue: usize) -> impl FnOnce(ChainError) -> DeviceError {
        move |source| DeviceError::Chain { queue, source }
    }
    /// Wraps a guest-memory error met reading or writing a chain's buffers on `queue`.
    pub fn memory(queue: usize) -> impl FnOnce(vm_memory::GuestMemoryError) -> DeviceError {
        move |e| DeviceError::Chain { queue, source: ChainError::Memory(e.to_string()) }
    }
}

/// The saved state of one device, whatever its type (what the transport's state carries).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum DeviceState {
    /// virtio-blk.
    Block(block::BlockState),
    /// virtio-rng.
    Rng(rng::RngState),
    /// virtio-console.
    Console(console::ConsoleState),
    /// virtio-net.
    Net(net::NetState),
    /// virtio-balloon.
    Balloon(balloon::BalloonState),
}

/// A virtio device behind a transport: its identity, features, config space and queue work.
///
/// Calls come from the transport with its lock held: from a vCPU thread for config accesses and
/// from the event loop thread for queue and backend work, never concurrently.
pub trait VirtioDevice: Send + std::fmt::Debug {
    /// virtio device type (`TYPE_*`).
    fn device_type(&self) -> u32;
    /// Largest size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits the device offers (including [`VIRTIO_F_VERSION_1`]).
    fn features(&self) -> u64;
    /// Reads the device config space at `offset`; bytes past its end read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the device config space (most devices ignore writes).
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set `DRIVER_OK` with `features` acknowledged.
    fn activate(&mut self, features: u64) -> Result<(), DeviceError> {
        let _ = features;
        Ok(())
    }
    /// The driver reset the device: forget in-flight work and negotiated state.
    fn reset(&mut self) {}
    /// Serves queue `queue` after a notification.
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError>;
    /// File descriptors of the backend to watch (edge-triggered, readable).
    fn backend_fds(&self) -> Vec<RawFd> {
        Vec::new()
    }
    /// A watched backend fd became readable (`index` into [`VirtioDevice::backend_fds`]).
    fn process_backend(&mut self, _index: usize, _ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Whether the config space changed since the last call (the transport then bumps the
    /// config generation and raises a configuration-change interrupt).
    fn take_config_changed(&mut self) -> bool {
        false
    }
    /// The device's saved state.
    fn state(&self) -> DeviceState;
}

/// Copies the `data.len()` bytes of a little-endian config structure at `offset` into `data`.
pub(crate) fn read_config_bytes(config: &[u8], offset: u64, data: &mut [u8]) {
    data.fill(0);
    let Ok(off) = usize::try_from(offset) else { return };
    if off < config.len() {
        let n = data.len().min(config.len() - off);
        data[..n].copy_from_slice(&config[off..off + n]);
    }
}

/// Builds queues of the given maximum sizes (the sizes are device constants, always valid).
pub(crate) fn new_queues(max_sizes: &[u16]) -> Vec<Queue> {
    max_sizes
        .iter()
        .map(|&m| {
            use virtio_queue::QueueT;
            Queue::new(m).unwrap_or_else(|_| Queue::new(256).expect("256 is a valid queue size"))
        })
        .collect()
}
