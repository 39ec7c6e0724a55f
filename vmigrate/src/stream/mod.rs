//! The migration wire format: versioned, framed, checksummed.
//!
//! Every frame is a 16-byte header and a payload, all little endian:
//!
//! | offset | field |
//! |---|---|
//! | 0 | magic `"VMIG"` |
//! | 4 | kind (`u16`, see [`Kind`]) |
//! | 6 | flags (`u16`, 0) |
//! | 8 | payload length (`u32`, at most [`Kind::max_len`]) |
//! | 12 | CRC32C of the payload followed by header bytes 0..12 |
//!
//! (Payload first: the checksum of a finished payload is extended by the header once the length
//! is known.)
//!
//! One kind is checksummed in two parts: [`Kind::LivePages`] (protocol version 4) carries pages
//! sent straight out of a running guest's memory, without a copy, so the guest may write a page
//! while the kernel copies it into the socket. Its payload is the address, a CRC32C per page,
//! then the pages; the header checksum covers the address and the page checksums, which must be
//! intact. A page whose own checksum does not match is *torn*, not the stream corrupt: it was
//! written while it was sent, so it is dirty and is sent again in a later pass. The receiver
//! keeps every torn page unverified until it arrives intact, and refuses the stream if one is
//! still torn at the end. A page damaged on the way is caught the same way: nothing sends it
//! again.
//!
//! Decoding never trusts the peer: the magic, the kind, the length bound and the checksum are
//! checked before a payload is parsed, payloads must have exactly their declared size, and
//! guest addresses are checked against the [`Layout`] agreed in the handshake before anything is
//! written to guest memory.

use serde::{Deserialize, Serialize};

/// Protocol versions this build speaks (oldest, newest).
pub const PROTOCOL_VERSIONS: (u16, u16) = (1, 5);
/// The first version with [`Kind::CompressedPages`].
pub const COMPRESSION_VERSION: u16 = 2;
/// The first version with data streams ([`Kind::StreamHello`]).
pub const STREAMS_VERSION: u16 = 3;
/// The first version with [`Kind::LivePages`].
pub const LIVE_PAGES_VERSION: u16 = 4;
/// The first version in which the destination answers each [`Kind::IterationEnd`] of a live
/// migration without data streams with [`Kind::IterationApplied`].
pub const APPLIED_VERSION: u16 = 5;
/// Most data streams of one migration.
pub const MAX_DATA_STREAMS: u16 = 64;
/// Most bytes in one `DiskWrite` frame (a disk mirror's largest block).
pub const MAX_DISK_WRITE: usize = 16 << 20;
/// Frame magic.
pub const MAGIC: [u8; 4] = *b"VMIG";
/// Header size.
pub const HEADER_LEN: usize = 16;
/// Guest page size on the wire.
pub const PAGE: usize = 4096;
/// How many bytes the pre-copy engine buffers before handing them to the transport. Small
/// enough to stay in a core's L2 cache between the copy out of guest memory and the kernel's
/// copy into the socket (measured here: 1 MiB sends pages 10 % faster than 4 MiB).
pub const SEND_BUFFER: usize = 1 << 20;
/// Most pages in one `Pages` frame.
pub const MAX_PAGES_PER_FRAME: usize = 256;

/// Frame kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[repr(u16)]
pub enum Kind {
    /// Source → destination: versions, memory layout, vCPUs, CPU features.
    Hello = 1,
    /// Destination → source: handshake accepted, with the chosen version.
    HelloAck = 2,
    /// Either way: refusal or abort with a reason; the session ends.
    Abort = 3,
    /// A run of guest pages with their contents.
    Pages = 4,
    /// A run of all-zero guest pages.
    ZeroPages = 5,
    /// vCPU and VM state (a `vcore::VmSnapshot` encoding).
    CpuState = 6,
    /// One device's state: a name and opaque bytes.
    Device = 7,
    /// Source → destination: end of one pre-copy iteration.
    IterationEnd = 8,
    /// Source → destination: everything was sent; restore and answer `Ready`.
    Complete = 9,
    /// Destination → source: state restored, waiting for `Commit`.
    Ready = 10,
    /// Source → destination: the point of no return; start the guest.
    Commit = 11,
    /// Destination → source: the guest runs.
    Started = 12,
    /// A run of guest pages, LZ4-compressed (protocol version 2).
    CompressedPages = 13,
    /// Source → destination, first frame of a data stream: its index and the stream count
    /// (protocol version 3).
    StreamHello = 14,
    /// Disk mirror session, mirror → image host: the image size in bytes.
    DiskHello = 15,
    /// Disk mirror session: bytes to write at an offset.
    DiskWrite = 16,
    /// Disk mirror session, image host → mirror: bytes written so far (after `DiskHello`,
    /// each `DiskWrite`, and `Complete`, which also makes them durable).
    DiskAck = 17,
    /// A run of guest pages sent from a running guest's memory without a copy, with a checksum
    /// of its own for the data (protocol version 4; see the module documentation).
    LivePages = 18,
    /// Destination → source: every frame up to `IterationEnd(n)` is applied (protocol version
    /// 5; live migrations without data streams).
    IterationApplied = 19,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        use Kind::*;
        Some(match v {
            1 => Hello,
            2 => HelloAck,
            3 => Abort,
            4 => Pages,
            5 => ZeroPages,
            6 => CpuState,
            7 => Device,
            8 => IterationEnd,
            9 => Complete,
            10 => Ready,
            11 => Commit,
            12 => Started,
            13 => CompressedPages,
            14 => StreamHello,
            15 => DiskHello,
            16 => DiskWrite,
            17 => DiskAck,
            18 => LivePages,
            19 => IterationApplied,
            _ => return None,
        })
    }

    /// Largest payload accepted for this kind.
    pub fn max_len(self) -> usize {
        match self {
            Kind::Pages => 8 + MAX_PAGES_PER_FRAME * PAGE,
            Kind::LivePages => 8 + MAX_PAGES_PER_FRAME * (4 + PAGE),
            // Only sent when smaller than the pages themselves.
            Kind::CompressedPages => 12 + MAX_PAGES_PER_FRAME * PAGE,
            Kind::CpuState | Kind::Device => 32 << 20,
            Kind::Hello => 4096,
            Kind::Abort => 1024,
            Kind::ZeroPages => 16,
            Kind::IterationEnd | Kind::IterationApplied | Kind::HelloAck | Kind::StreamHello => 4,
            Kind::DiskHello | Kind::DiskAck => 8,
            Kind::DiskWrite => 8 + MAX_DISK_WRITE,
            Kind::Complete | Kind::Ready | Kind::Commit | Kind::Started => 0,
        }
    }
}

/// The pages of a [`Kind::LivePages`] payload of `len` bytes (an address, a CRC32C per page,
/// the pages), if `len` has that shape.
pub fn live_pages(len: usize) -> Option<usize> {
    let n = len.checked_sub(8)? / (4 + PAGE);
    (n > 0 && len == 8 + n * (4 + PAGE)).then_some(n)
}

/// The bytes of a [`Kind::LivePages`] payload of `pages` pages before the pages: the address
/// and the page checksums, which the frame's header checksum covers.
pub fn live_head(pages: usize) -> usize {
    8 + 4 * pages
}

/// The header checksum of a frame of `kind` with `payload`: the whole payload, or for
/// [`Kind::LivePages`] the address and the page checksums.
pub fn header_crc(kind: Kind, payload: &[u8], header: &[u8]) -> u32 {
    match kind {
        Kind::LivePages => {
            let head = live_pages(payload.len()).map_or(payload.len(), live_head);
            frame_crc(&payload[..head], header)
        }
        _ => frame_crc(payload, header),
    }
}

/// The CRC32C of one page.
pub fn page_crc(page: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(page);
    c.finish()
}

/// Which pages of a frame arrived torn: bit `i % 64` of word `i / 64` is page `i`.
pub type TornMask = [u64; MAX_PAGES_PER_FRAME / 64];

/// Errors of encoding and decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The transport failed (or the peer went away).
    #[error("transport I/O")]
    Io(#[from] std::io::Error),
    /// The stream ended cleanly where a frame was expected.
    #[error("the peer closed the stream")]
    Closed,
    /// The frame does not start with the magic.
    #[error("bad frame magic {0:02x?}")]
    BadMagic([u8; 4]),
    /// Unknown frame kind.
    #[error("unknown frame kind {0}")]
    UnknownKind(u16),
    /// Nonzero flags (reserved).
    #[error("reserved frame flags {0:#x} set")]
    BadFlags(u16),
    /// Length beyond the kind's bound.
    #[error("{kind:?} frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The kind.
        kind: Kind,
        /// Declared length.
        len: usize,
        /// Its bound.
        max: usize,
    },
    /// Checksum mismatch: the stream is corrupt.
    #[error("{kind:?} frame checksum mismatch (header {expected:#010x}, computed {found:#010x})")]
    Checksum {
        /// The kind.
        kind: Kind,
        /// Checksum in the header.
        expected: u32,
        /// Checksum computed.
        found: u32,
    },
    /// The payload does not have the shape its kind requires.
    #[error("malformed {kind:?} payload: {reason}")]
    Malformed {
        /// The kind.
        kind: Kind,
        /// What is wrong.
        reason: String,
    },
    /// Pages that arrived torn (their data checksum did not match) and were not sent again
    /// before the end of the stream: the data is corrupt.
    #[error("{pages} pages arrived with a bad checksum and were never sent again (the first at {first:#x})")]
    Torn {
        /// How many pages are still torn.
        pages: u64,
        /// The lowest such guest address.
        first: u64,
    },
    /// A guest range outside the agreed memory layout.
    #[error("guest range {gpa:#x}+{len:#x} is outside the memory layout")]
    OutOfLayout {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

pub(crate) fn malformed(kind: Kind, reason: impl Into<String>) -> StreamError {
    StreamError::Malformed { kind, reason: reason.into() }
}

/// The guest memory layout both sides agree on: `(guest address, size)` per slot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Regions in slot order.
    pub regions: Vec<(u64, u64)>,
}

impl Layout {
    /// The layout of `vm`'s memory slots.
    pub fn of(vm: &vcore::Vm) -> Layout {
        Layout { regions: vm.slots().iter().map(|s| (s.guest_addr, s.size)).collect() }
    }

    /// Checks that `[gpa, gpa + len)` lies inside one region.
    pub fn check(&self, gpa: u64, len: u64) -> Result<(), StreamError> {
        let end = gpa.checked_add(len).ok_or(StreamError::OutOfLayout { gpa, len })?;
        if len > 0 && self.regions.iter().any(|&(start, size)| gpa >= start && end <= start + size) {
            Ok(())
        } else {
            Err(StreamError::OutOfLayout { gpa, len })
        }
    }
}

/// CPU features the source's guest may rely on; the destination must offer all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct CpuFeatures {
    /// CPUID vendor string.
    pub vendor: [u8; 12],
    /// CPUID.1:ECX, CPUID.1:EDX, CPUID.7.0:EBX, CPUID.7.0:ECX, CPUID.7.0:EDX.
    pub bits: [u32; 5],
}

impl CpuFeatures {
    /// Feature bits the other side has and we lack, as `(register index, bits)`.
    pub fn missing_from(&self, other: &CpuFeatures) -> Vec<(usize, u32)> {
        self.bits
            .iter()
            .zip(other.bits.iter())
            .enumerate()
            .filter_map(|(i, (mine, theirs))| {
                let miss = mine & !theirs;
                (miss != 0).then_some((i, miss))
            })
            .collect()
    }
}

/// The handshake a source sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Oldest protocol version the source speaks.
    pub min_version: u16,
    /// Newest protocol version the source speaks.
    pub max_version: u16,
    /// vCPU count.
    pub vcpus: u16,
    /// Memory layout.
    pub layout: Layout,
    /// CPU features the guest was given.
    pub cpu: CpuFeatures,
}

/// A decoded frame.
#[derive(Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Handshake.
    Hello(Hello),
    /// Handshake accepted with this version.
    HelloAck(u16),
    /// Abort with a reason.
    Abort(String),
    /// Pages starting at `gpa`; `data` holds whole pages.
    Pages {
        /// First page's guest address.
        gpa: u64,
        /// Page contents.
        data: &'a [u8],
    },
    /// `count` pages starting at `gpa`, LZ4-compressed (a raw LZ4 block) in `data`.
    CompressedPages {
        /// First page's guest address.
        gpa: u64,
        /// Pages (1 to [`MAX_PAGES_PER_FRAME`]).
        count: u32,
        /// The LZ4 block; it must decompress to exactly `count` pages.
        data: &'a [u8],
    },
    /// Pages sent live ([`Kind::LivePages`]) starting at `gpa`: `sums` holds a CRC32C per page
    /// (little endian), `data` the pages. A page whose checksum does not match is torn.
    LivePages {
        /// First page's guest address.
        gpa: u64,
        /// One CRC32C per page.
        sums: &'a [u8],
        /// Page contents.
        data: &'a [u8],
    },
    /// Pages already written into guest memory by [`FrameReader::read_frame_into`]
    /// (receive-side only).
    PagesWritten {
        /// First page's guest address.
        gpa: u64,
        /// Pages.
        pages: u64,
        /// Those that arrived torn (from a `LivePages` frame): their bytes in guest memory are
        /// not verified, and they must arrive again.
        torn: TornMask,
    },
    /// `count` zero pages from `gpa`.
    ZeroPages {
        /// First page's guest address.
        gpa: u64,
        /// Pages.
        count: u64,
    },
    /// vCPU and VM state bytes.
    CpuState(&'a [u8]),
    /// One device's state.
    Device {
        /// Device name.
        name: String,
        /// Its state.
        data: &'a [u8],
    },
    /// End of iteration `n`.
    IterationEnd(u32),
    /// The destination applied everything up to the end of iteration `n`.
    IterationApplied(u32),
    /// A disk mirror session begins: the image is `size` bytes.
    DiskHello {
        /// Image size in bytes.
        size: u64,
    },
    /// Disk bytes to write at `offset`.
    DiskWrite {
        /// Byte offset in the image.
        offset: u64,
        /// The bytes (1 to [`MAX_DISK_WRITE`]).
        data: &'a [u8],
    },
    /// Bytes of the image written so far.
    DiskAck(u64),
    /// First frame of data stream `index` of `count`.
    StreamHello {
        /// This stream's index, below `count`.
        index: u16,
        /// Data streams of the migration (1 to [`MAX_DATA_STREAMS`]).
        count: u16,
    },
    /// All sent.
    Complete,
    /// Destination ready.
    Ready,
    /// Point of no return.
    Commit,
    /// Guest running on the destination.
    Started,
}

pub(crate) fn u64_at(b: &[u8], o: usize) -> u64 {
    let mut w = [0u8; 8];
    w.copy_from_slice(&b[o..o + 8]);
    u64::from_le_bytes(w)
}

impl Message<'_> {
    /// Parses `payload` of frame `kind` (length already bounded and checksummed).
    pub fn parse(kind: Kind, payload: &[u8]) -> Result<Message<'_>, StreamError> {
        let exact = |n: usize| {
            if payload.len() == n {
                Ok(())
            } else {
                Err(malformed(kind, format!("{} bytes, expected {n}", payload.len())))
            }
        };
        Ok(match kind {
            Kind::Hello => {
                Message::Hello(postcard::from_bytes(payload).map_err(|e| malformed(kind, e.to_string()))?)
            }
            Kind::HelloAck => {
                exact(2)?;
                Message::HelloAck(u16::from_le_bytes([payload[0], payload[1]]))
            }
            Kind::Abort => Message::Abort(String::from_utf8_lossy(payload).into_owned()),
            Kind::Pages => {
                if payload.len() < 8 + PAGE || !(payload.len() - 8).is_multiple_of(PAGE) {
                    return Err(malformed(
                        kind,
                        format!("{} bytes is not an address and whole pages", payload.len()),
                    ));
                }
                let gpa = u64_at(payload, 0);
                if !gpa.is_multiple_of(PAGE as u64) {
                    return Err(malformed(kind, format!("unaligned address {gpa:#x}")));
                }
                Message::Pages { gpa, data: &payload[8..] }
            }
            Kind::LivePages => {
                let Some(n) = live_pages(payload.len()) else {
                    return Err(malformed(
                        kind,
                        format!("{} bytes is not an address, page checksums and whole pages", payload.len()),
                    ));
                };
                let gpa = u64_at(payload, 0);
                if !gpa.is_multiple_of(PAGE as u64) {
                    return Err(malformed(kind, format!("unaligned address {gpa:#x}")));
                }
                let head = live_head(n);
                Message::LivePages { gpa, sums: &payload[8..head], data: &payload[head..] }
            }
            Kind::CompressedPages => {
                if payload.len() < 12 {
                    return Err(malformed(kind, "no address and count"));
                }
                let gpa = u64_at(payload, 0);
                let count = u32::from_le_bytes([payload[8], payload[9], payload[10], payload[11]]);
                if !gpa.is_multiple_of(PAGE as u64) || count == 0 || count as usize > MAX_PAGES_PER_FRAME {
                    return Err(malformed(kind, format!("{count} pages at {gpa:#x}")));
                }
                Message::CompressedPages { gpa, count, data: &payload[12..] }
            }
            Kind::ZeroPages => {
                exact(16)?;
                let (gpa, count) = (u64_at(payload, 0), u64_at(payload, 8));
                if gpa % PAGE as u64 != 0 || count == 0 {
                    return Err(malformed(kind, format!("{count} pages at {gpa:#x}")));
                }
                Message::ZeroPages { gpa, count }
            }
            Kind::CpuState => Message::CpuState(payload),
            Kind::Device => {
                if payload.len() < 2 {
                    return Err(malformed(kind, "no name length"));
                }
                let n = usize::from(u16::from_le_bytes([payload[0], payload[1]]));
                if payload.len() < 2 + n {
                    return Err(malformed(kind, "name longer than the frame"));
                }
                let name =
                    std::str::from_utf8(&payload[2..2 + n]).map_err(|_| malformed(kind, "name not UTF-8"))?;
                Message::Device { name: name.to_string(), data: &payload[2 + n..] }
            }
            Kind::DiskHello => {
                exact(8)?;
                Message::DiskHello { size: u64_at(payload, 0) }
            }
            Kind::DiskAck => {
                exact(8)?;
                Message::DiskAck(u64_at(payload, 0))
            }
            Kind::DiskWrite => {
                if payload.len() < 9 {
                    return Err(malformed(kind, "no offset and data"));
                }
                Message::DiskWrite { offset: u64_at(payload, 0), data: &payload[8..] }
            }
            Kind::StreamHello => {
                exact(4)?;
                let index = u16::from_le_bytes([payload[0], payload[1]]);
                let count = u16::from_le_bytes([payload[2], payload[3]]);
                if count == 0 || count > MAX_DATA_STREAMS || index >= count {
                    return Err(malformed(kind, format!("stream {index} of {count}")));
                }
                Message::StreamHello { index, count }
            }
            Kind::IterationEnd | Kind::IterationApplied => {
                exact(4)?;
                let n = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]);
                if kind == Kind::IterationEnd {
                    Message::IterationEnd(n)
                } else {
                    Message::IterationApplied(n)
                }
            }
            Kind::Complete | Kind::Ready | Kind::Commit | Kind::Started => {
                exact(0)?;
                match kind {
                    Kind::Complete => Message::Complete,
                    Kind::Ready => Message::Ready,
                    Kind::Commit => Message::Commit,
                    _ => Message::Started,
                }
            }
        })
    }
}

mod reader;
mod writer;

pub use reader::FrameReader;
pub(crate) use reader::vmm_wrote;
pub use writer::{FrameWriter, HOLE_CHECK_PAGES, LIVE_MIN_PAGES};

/// Whether `page` is all zeros: 64 bytes at a time (vectorizable), stopping at the first
/// non-zero block, so a data page costs almost nothing to classify.
pub fn is_zero(page: &[u8]) -> bool {
    let blocks = page.chunks_exact(64);
    let tail = blocks.remainder();
    blocks.into_iter().all(|b| {
        b.chunks_exact(8)
            .fold(0u64, |acc, c| acc | u64::from_ne_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
            == 0
    }) && tail.iter().all(|&b| b == 0)
}

/// CRC32C (CRC-32/ISCSI), computed incrementally: the frame checksum.
#[derive(Debug, Clone, Copy)]
pub struct Crc32c(crc_fast::Digest);

impl Default for Crc32c {
    fn default() -> Self {
        Crc32c(crc_fast::Digest::new(crc_fast::CrcAlgorithm::Crc32Iscsi))
    }
}

impl Crc32c {
    /// An empty checksum.
    pub fn new() -> Self {
        Self::default()
    }

    /// Extends the checksum by `bytes`.
    pub fn update(&mut self, bytes: &[u8]) {
        self.0.update(bytes);
    }

    /// The CRC32C of everything so far.
    pub fn finish(&self) -> u32 {
        self.0.finalize() as u32
    }
}

/// The frame checksum: CRC32C of `payload` followed by `header[..12]`.
pub fn frame_crc(payload: &[u8], header: &[u8]) -> u32 {
    let mut c = Crc32c::new();
    c.update(payload);
    c.update(&header[..12]);
    c.finish()
}
