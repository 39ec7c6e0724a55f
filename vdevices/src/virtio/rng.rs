//! virtio-rng: entropy from the host's `getrandom(2)`.

use serde::{Deserialize, Serialize};
use vcore::{Snapshot, StateError};

use super::{DeviceError, DeviceState, QueueCtx, TYPE_RNG, VIRTIO_F_VERSION_1, VirtioDevice};

/// Largest request served in one go; larger buffers get this many bytes.
pub const MAX_REQUEST_BYTES: usize = 64 << 10;

/// The entropy device.
#[derive(Debug, Default)]
pub struct Rng {
    bytes_served: u64,
}

/// Saved state of [`Rng`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RngState {
    /// Random bytes handed to the guest so far.
    pub bytes_served: u64,
}

impl Rng {
    /// A new entropy device.
    pub fn new() -> Self {
        Self::default()
    }
    /// Random bytes handed to the guest so far.
    pub fn bytes_served(&self) -> u64 {
        self.bytes_served
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        while let Some(chain) = ctx.pop(queue).map_err(DeviceError::chain(queue))? {
            let out = chain.writable();
            let n = (out.len() as usize).min(MAX_REQUEST_BYTES);
            let mut buf = vec![0u8; n];
            let written = match getrandom::fill(&mut buf) {
                Ok(()) => out.write(ctx.mem(), &buf).map_err(DeviceError::memory(queue))?,
                // No entropy this time: complete the request empty, the driver asks again.
                Err(_) => 0,
            };
            self.bytes_served += written as u64;
            ctx.add_used(queue, chain.head, written as u32).map_err(DeviceError::chain(queue))?;
        }
        Ok(())
    }
    fn state(&self) -> DeviceState {
        DeviceState::Rng(self.save())
    }
}

impl Snapshot for Rng {
    type State = RngState;
    type Args = ();
    fn save(&self) -> RngState {
        RngState { bytes_served: self.bytes_served }
    }
    fn restore(_args: (), s: &RngState) -> Result<Self, StateError> {
        Ok(Rng { bytes_served: s.bytes_served })
    }
}
