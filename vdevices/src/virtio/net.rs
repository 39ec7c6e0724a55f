//! virtio-net over a Linux tap with a virtio-net header on every frame.
//!
//! Offloads are negotiated honestly: the device offers checksum and TSO offload in both
//! directions because the tap implements them (`IFF_VNET_HDR`), and at activation it tells the
//! tap (`TUNSETOFFLOAD`) exactly which partial frames the guest accepted (`GUEST_CSUM`,
//! `GUEST_TSO4/6`), so the kernel finishes every other frame before handing it over.
//!
//! With mergeable receive buffers (`MRG_RXBUF`), a frame fills as many receive chains as it
//! needs; if the ring holds too few, the device puts them back and waits for the driver to post
//! more, so a frame is never split across a refill it cannot see.

use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};

use serde::{Deserialize, Serialize};
use vcore::{Snapshot, StateError};

use super::chain::Segs;
use super::{ChainError, DeviceError, DeviceState, QueueCtx, TYPE_NET, VIRTIO_F_VERSION_1, VirtioDevice};

/// Receive queue.
pub const RX_QUEUE: usize = 0;
/// Transmit queue.
pub const TX_QUEUE: usize = 1;
/// Bytes of the virtio-net header (virtio 1.x: with `num_buffers`).
pub const HDR_LEN: usize = 12;
/// Largest frame plus header moved in one go (64 KiB TSO frame, Ethernet header, virtio header).
pub const MAX_FRAME: usize = 65_550 + HDR_LEN;

/// `VIRTIO_NET_F_CSUM`: the device takes partially checksummed frames.
pub const F_CSUM: u64 = 1 << 0;
/// `VIRTIO_NET_F_GUEST_CSUM`: the guest takes partially checksummed frames.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// `VIRTIO_NET_F_MAC`.
pub const F_MAC: u64 = 1 << 5;
/// `VIRTIO_NET_F_GUEST_TSO4`.
pub const F_GUEST_TSO4: u64 = 1 << 7;
/// `VIRTIO_NET_F_GUEST_TSO6`.
pub const F_GUEST_TSO6: u64 = 1 << 8;
/// `VIRTIO_NET_F_HOST_TSO4`.
pub const F_HOST_TSO4: u64 = 1 << 11;
/// `VIRTIO_NET_F_HOST_TSO6`.
pub const F_HOST_TSO6: u64 = 1 << 12;
/// `VIRTIO_NET_F_MRG_RXBUF`: a received frame may span several receive buffers (chains), the
/// count in the header's `num_buffers`. Linux then posts page-sized buffers instead of 64 KiB
/// ones for TSO frames.
pub const F_MRG_RXBUF: u64 = 1 << 15;

const TUN_F_CSUM: u32 = 1;
const TUN_F_TSO4: u32 = 2;
const TUN_F_TSO6: u32 = 4;

/// Errors of opening a tap.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The tap could not be opened or configured.
    #[error("opening tap {name}")]
    Tap {
        /// Interface name.
        name: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An open tap interface (non-blocking, with virtio-net headers).
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens tap `name` in the calling thread's network namespace, creating it if needed
    /// (needs `CAP_NET_ADMIN`).
    pub fn open(name: &str) -> Result<Tap, NetError> {
        let (file, name) =
            crate::sys::open_tap(name).map_err(|source| NetError::Tap { name: name.to_string(), source })?;
        Ok(Tap { file, name })
    }
    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
    /// Another handle to the same tap queue (for restoring into a new VM).
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap { file: self.file.try_clone()?, name: self.name.clone() })
    }
}

/// Frame counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetStats {
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Bytes the guest sent (without headers).
    pub tx_bytes: u64,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Bytes delivered to the guest (without headers).
    pub rx_bytes: u64,
    /// Frames dropped (too big for the guest's buffer, or the tap refused them).
    pub dropped: u64,
}

/// Saved state of [`Net`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// MAC address.
    pub mac: [u8; 6],
    /// Features the guest acknowledged (re-applied to the tap).
    pub acked: u64,
    /// A frame read from the tap and not yet delivered.
    pub rx_pending: Option<Vec<u8>>,
    /// Counters.
    pub stats: NetStats,
}

/// The network device.
#[derive(Debug)]
pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    acked: u64,
    rx_buf: Vec<u8>,
    rx_pending: Option<usize>,
    /// Receive chains gathered for one frame (kept to reuse the allocation).
    rx_chains: Vec<(u16, Segs)>,
    stats: NetStats,
}

impl Net {
    /// A network card with address `mac` on `tap`.
    pub fn new(tap: Tap, mac: [u8; 6]) -> Self {
        Net {
            tap,
            mac,
            acked: 0,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            rx_chains: Vec::new(),
            stats: NetStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> NetStats {
        self.stats
    }

    fn apply_offloads(&self) -> std::io::Result<()> {
        let mut f = 0;
        if self.acked & F_GUEST_CSUM != 0 {
            f |= TUN_F_CSUM;
            if self.acked & F_GUEST_TSO4 != 0 {
                f |= TUN_F_TSO4;
            }
            if self.acked & F_GUEST_TSO6 != 0 {
                f |= TUN_F_TSO6;
            }
        }
        crate::sys::set_tap_offload(&self.tap.file, f)
    }

    fn rx(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        loop {
            if self.rx_pending.is_none() {
                match self.tap.file.read(&mut self.rx_buf) {
                    Ok(n) if n >= HDR_LEN => self.rx_pending = Some(n),
                    Ok(_) => continue,
                    Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                    Err(_) => return Ok(()), // WouldBlock: nothing more now
                }
            }
            let Some(n) = self.rx_pending else { return Ok(()) };
            if self.acked & F_MRG_RXBUF != 0 {
                if !self.rx_mergeable(ctx, n)? {
                    return Ok(()); // too few buffers: wait for the driver's next refill
                }
                continue;
            }
            let Some(chain) = ctx.pop(RX_QUEUE).map_err(DeviceError::chain(RX_QUEUE))? else { return Ok(()) };
            self.rx_pending = None;
            let out = chain.writable();
            if (out.len() as usize) < n {
                self.stats.dropped += 1;
                ctx.add_used(RX_QUEUE, chain.head, 0).map_err(DeviceError::chain(RX_QUEUE))?;
                continue;
            }
            self.rx_buf[10..12].copy_from_slice(&1u16.to_le_bytes()); // num_buffers
            out.write(ctx.mem(), &self.rx_buf[..n]).map_err(DeviceError::memory(RX_QUEUE))?;
            self.stats.rx_frames += 1;
            self.stats.rx_bytes += (n - HDR_LEN) as u64;
            ctx.add_used(RX_QUEUE, chain.head, n as u32).map_err(DeviceError::chain(RX_QUEUE))?;
            ctx.publish_used(RX_QUEUE);
        }
    }

    /// Delivers the pending `n`-byte frame (header included) into as many receive chains as it
    /// takes. Returns false, with every chain put back, if the ring holds too few.
    fn rx_mergeable(&mut self, ctx: &mut QueueCtx<'_>, n: usize) -> Result<bool, DeviceError> {
        let malformed = |what| DeviceError::Chain { queue: RX_QUEUE, source: ChainError::Malformed(what) };
        let mut chains = std::mem::take(&mut self.rx_chains);
        chains.clear();
        let mut room = 0u64;
        while room < n as u64 {
            match ctx.pop(RX_QUEUE).map_err(DeviceError::chain(RX_QUEUE))? {
                Some(chain) => {
                    let out = chain.writable();
                    if out.is_empty() {
                        return Err(malformed("virtio-net receive buffer with no writable bytes"));
                    }
                    room += out.len();
                    chains.push((chain.head, out));
                }
                None => {
                    ctx.wait_for_buffers(RX_QUEUE);
                    for _ in 0..chains.len() {
                        ctx.unpop(RX_QUEUE);
                    }
                    self.rx_chains = chains;
                    return Ok(false);
                }
            }
        }
        let count = u16::try_from(chains.len()).map_err(|_| malformed("frame in more than 65535 buffers"))?;
        self.rx_buf[10..12].copy_from_slice(&count.to_le_bytes()); // num_buffers
        self.rx_pending = None;
        let mut at = 0;
        for (head, out) in &chains {
            let take = (out.len() as usize).min(n - at);
            out.write(ctx.mem(), &self.rx_buf[at..at + take]).map_err(DeviceError::memory(RX_QUEUE))?;
            ctx.add_used(RX_QUEUE, *head, take as u32).map_err(DeviceError::chain(RX_QUEUE))?;
            at += take;
        }
        ctx.publish_used(RX_QUEUE);
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += (n - HDR_LEN) as u64;
        self.rx_chains = chains;
        Ok(true)
    }

    fn tx(&mut self, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        while let Some(chain) = ctx.pop(TX_QUEUE).map_err(DeviceError::chain(TX_QUEUE))? {
            let frame = chain.readable().read(ctx.mem(), MAX_FRAME).map_err(DeviceError::memory(TX_QUEUE))?;
            if frame.len() < HDR_LEN {
                return Err(DeviceError::Chain {
                    queue: TX_QUEUE,
                    source: ChainError::Malformed("virtio-net frame shorter than its header"),
                });
            }
            // The tap takes the 12-byte header as is (num_buffers is ignored on transmit).
            match self.tap.file.write(&frame) {
                Ok(_) => {
                    self.stats.tx_frames += 1;
                    self.stats.tx_bytes += (frame.len() - HDR_LEN) as u64;
                }
                Err(_) => self.stats.dropped += 1, // a full or downed tap drops, like a cable
            }
            ctx.add_used(TX_QUEUE, chain.head, 0).map_err(DeviceError::chain(TX_QUEUE))?;
        }
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[256, 256]
    }
    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
            | F_MAC
            | F_CSUM
            | F_GUEST_CSUM
            | F_GUEST_TSO4
            | F_GUEST_TSO6
            | F_HOST_TSO4
            | F_HOST_TSO6
            | F_MRG_RXBUF
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut c = [0u8; 12];
        c[..6].copy_from_slice(&self.mac);
        c[8..10].copy_from_slice(&1u16.to_le_bytes()); // max_virtqueue_pairs
        super::read_config_bytes(&c, offset, data);
    }
    fn activate(&mut self, features: u64) -> Result<(), DeviceError> {
        self.acked = features;
        self.apply_offloads().map_err(|source| DeviceError::Backend { what: "TUNSETOFFLOAD".into(), source })
    }
    fn reset(&mut self) {
        self.acked = 0;
        self.rx_pending = None;
    }
    fn process_queue(&mut self, queue: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        match queue {
            TX_QUEUE => self.tx(ctx),
            _ => self.rx(ctx),
        }
    }
    fn backend_fds(&self) -> Vec<RawFd> {
        vec![self.tap.file.as_raw_fd()]
    }
    fn process_backend(&mut self, _index: usize, ctx: &mut QueueCtx<'_>) -> Result<(), DeviceError> {
        self.rx(ctx)
    }
    fn state(&self) -> DeviceState {
        DeviceState::Net(self.save())
    }
}

impl Snapshot for Net {
    type State = NetState;
    type Args = Tap;
    fn save(&self) -> NetState {
        NetState {
            mac: self.mac,
            acked: self.acked,
            rx_pending: self.rx_pending.map(|n| self.rx_buf[..n].to_vec()),
            stats: self.stats,
        }
    }
    fn restore(tap: Tap, s: &NetState) -> Result<Self, StateError> {
        let mut n = Net::new(tap, s.mac);
        n.acked = s.acked;
        n.stats = s.stats;
        if let Some(f) = &s.rx_pending {
            if f.len() > MAX_FRAME {
                return Err(StateError::Device {
                    device: "virtio-net".into(),
                    reason: "pending frame too big".into(),
                });
            }
            n.rx_buf[..f.len()].copy_from_slice(f);
            n.rx_pending = Some(f.len());
        }
        if n.acked != 0 {
            n.apply_offloads()
                .map_err(|e| StateError::Device { device: "virtio-net".into(), reason: e.to_string() })?;
        }
        Ok(n)
    }
}
