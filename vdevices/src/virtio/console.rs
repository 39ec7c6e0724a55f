//! virtio-console (one port, no multiport): guest output to a writer, host input from an fd.

use std::collections::VecDeque;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use serde::{Deserialize, Serialize};
use vcore::{Snapshot, StateError};

use super::{DeviceError, DeviceState, QueueCtx, TYPE_CONSOLE, VIRTIO_F_VERSION_1, VirtioDevice};

/// Receive queue (host to guest).
pub const RX_QUEUE: usize = 0;
/// Transmit queue (guest to host).
pub const TX_QUEUE: usize = 1;
/// Most input bytes buffered while the guest posts no receive buffers.
pub const MAX_PENDING_INPUT: usize = 64 << 10;
const MAX_TX_CHAIN: usize = 64 << 10;

/// Where the console's bytes go and come from.
pub struct ConsoleIo {
    /// Host input (a pipe, pty or socket); set non-blocking by the device.
    pub input: Option<OwnedFd>,
    /// Guest output.
    pub output: Box<dyn Write + Send>,
}

impl std::fmt::Debug for ConsoleIo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleIo").field("input", &self.input).finish_non_exhaustive()
    }
}

/// Saved state of [`Console`].
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsoleState {
    /// Input read from the host but not yet delivered to the guest.
    pub pending_input: Vec<u8>,
    /// Bytes delivered to the guest.
    pub bytes_in: u64,
    /// Bytes the guest wrote.
    pub bytes_out: u64,
}

/// The console device.
#[derive(Debug)]
pub struct Console {
    input: Option<File>,
    output: ConsoleOutput,
    pending: VecDeque<u8>,
    bytes_in: u64,
    bytes_out: u64,
}

struct ConsoleOutput(Box<dyn Write + Send>);

impl std::fmt::Debug for ConsoleOutput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConsoleOutput")
    }
}

impl Console {
    /// A console over `io`.
    pub fn new(io: ConsoleIo) -> std::io::Result<Self> {
        let input = match io.input {
            Some(fd) => {
                crate::sys::set_nonblocking(fd.as_raw_fd())?;
                Some(File::from(fd))
            }
            None => None,
        };
        Ok(Console {
            input,
            output: ConsoleOutput(io.output),
            pending: VecDeque::new(),
            bytes_in: 0,
            bytes_out: 0,
        })
    }

    fn fill_pending(&mut self) {
        let Some(input) = &mut self.input else { return };
        let mut buf = [0u8; 4096];
        while self.pending.len() < MAX_PENDING_INPUT {
            let room = buf.len().min(MAX_PENDING_INPUT - self.pending.len());
            match input.read(&mut buf[..room]) {
                Ok(0) => break,
                Ok(n) => self.pending.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => break, // WouldBlock, or a broken input: nothing more now
            }
        }
    }

    fn deliver(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        loop {
            self.fill_pending();
            if self.pending.is_empty() {
                return Ok(());
            }
            let Some(chain) = ctx.pop(RX_QUEUE).map_err(DeviceError::chain(RX_QUEUE))? else { return Ok(()) };
            let out = chain.writable();
            let n = (out.len() as usize).min(self.pending.len());
            let data: Vec<u8> = self.pending.drain(..n).collect();
            out.write(ctx.mem(), &data).map_err(DeviceError::memory(RX_QUEUE))?;
            self.bytes_in += n as u64;
            ctx.add_used(RX_QUEUE, chain.head, n as u32).map_err(DeviceError::chain(RX_QUEUE))?;
        }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // cols, rows, max_nr_ports, emerg_wr: only max_nr_ports = 1 is meaningful here.
        let mut c = [0u8; 12];
        c[4..8].copy_from_slice(&1u32.to_le_bytes());
        super::read_config_bytes(&c, offset, data);
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        if queue == RX_QUEUE {
            return self.deliver(ctx);
        }
        while let Some(chain) = ctx.pop(TX_QUEUE).map_err(DeviceError::chain(TX_QUEUE))? {
            let data = chain.readable().read(ctx.mem(), MAX_TX_CHAIN).map_err(DeviceError::memory(queue))?;
            // A host writer that fails loses console output, like a disconnected serial line.
            let _ = self.output.0.write_all(&data).and_then(|()| self.output.0.flush());
            self.bytes_out += data.len() as u64;
            ctx.add_used(TX_QUEUE, chain.head, 0).map_err(DeviceError::chain(TX_QUEUE))?;
        }
        Ok(())
    }
    fn backend_fds(&self) -> Vec<RawFd> {
        self.input.iter().map(|f| f.as_raw_fd()).collect()
    }
    fn process_backend(&mut self, _index: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        self.deliver(ctx)
    }
    fn state(&self) -> DeviceState {
        DeviceState::Console(self.save())
    }
}

impl Snapshot for Console {
    type State = ConsoleState;
    type Args = ConsoleIo;
    fn save(&self) -> ConsoleState {
        ConsoleState {
            pending_input: self.pending.iter().copied().collect(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
        }
    }
    fn restore(io: ConsoleIo, s: &ConsoleState) -> Result<Self, StateError> {
        let mut c = Console::new(io)
            .map_err(|e| StateError::Device { device: "virtio-console".into(), reason: e.to_string() })?;
        c.pending = s.pending_input.iter().copied().collect();
        c.bytes_in = s.bytes_in;
        c.bytes_out = s.bytes_out;
        Ok(c)
    }
}
