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
//! Decoding never trusts the peer: the magic, the kind, the length bound and the checksum are
//! checked before a payload is parsed, payloads must have exactly their declared size, and
//! guest addresses are checked against the [`Layout`] agreed in the handshake before anything is
//! written to guest memory.

use std::io::{Read, Write};

use vm_memory::Bytes;

use serde::{Deserialize, Serialize};

/// Protocol versions this build speaks (oldest, newest).
pub const PROTOCOL_VERSIONS: (u16, u16) = (1, 1);
/// Frame magic.
pub const MAGIC: [u8; 4] = *b"VMIG";
/// Header size.
pub const HEADER_LEN: usize = 16;
/// Guest page size on the wire.
pub const PAGE: usize = 4096;
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
            _ => return None,
        })
    }

    /// Largest payload accepted for this kind.
    pub fn max_len(self) -> usize {
        match self {
            Kind::Pages => 8 + MAX_PAGES_PER_FRAME * PAGE,
            Kind::CpuState | Kind::Device => 32 << 20,
            Kind::Hello => 4096,
            Kind::Abort => 1024,
            Kind::ZeroPages => 16,
            Kind::IterationEnd | Kind::HelloAck => 4,
            Kind::Complete | Kind::Ready | Kind::Commit | Kind::Started => 0,
        }
    }
}

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
    /// A guest range outside the agreed memory layout.
    #[error("guest range {gpa:#x}+{len:#x} is outside the memory layout")]
    OutOfLayout {
        /// Start.
        gpa: u64,
        /// Length in bytes.
        len: u64,
    },
}

fn malformed(kind: Kind, reason: impl Into<String>) -> StreamError {
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
    /// Pages already written into guest memory by [`FrameReader::read_frame_into`].
    PagesWritten {
        /// First page's guest address.
        gpa: u64,
        /// Pages.
        pages: u64,
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
    /// All sent.
    Complete,
    /// Destination ready.
    Ready,
    /// Point of no return.
    Commit,
    /// Guest running on the destination.
    Started,
}

fn u64_at(b: &[u8], o: usize) -> u64 {
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
                if payload.len() < 8 + PAGE || (payload.len() - 8) % PAGE != 0 {
                    return Err(malformed(
                        kind,
                        format!("{} bytes is not an address and whole pages", payload.len()),
                    ));
                }
                let gpa = u64_at(payload, 0);
                if gpa % PAGE as u64 != 0 {
                    return Err(malformed(kind, format!("unaligned address {gpa:#x}")));
                }
                Message::Pages { gpa, data: &payload[8..] }
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
            Kind::IterationEnd => {
                exact(4)?;
                Message::IterationEnd(u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]))
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

/// Reads frames from a transport, reusing one payload buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes read so far.
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: Vec::new(), bytes: 0 }
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inner
    }

    /// Reads one frame header and checks magic, kind, flags and the length bound.
    fn header(&mut self) -> Result<(Kind, usize, u32, [u8; HEADER_LEN]), StreamError> {
        let mut h = [0u8; HEADER_LEN];
        match self.inner.read_exact(&mut h) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Err(StreamError::Closed),
            r => r?,
        }
        let magic = [h[0], h[1], h[2], h[3]];
        if magic != MAGIC {
            return Err(StreamError::BadMagic(magic));
        }
        let raw_kind = u16::from_le_bytes([h[4], h[5]]);
        let kind = Kind::from_u16(raw_kind).ok_or(StreamError::UnknownKind(raw_kind))?;
        let flags = u16::from_le_bytes([h[6], h[7]]);
        if flags != 0 {
            return Err(StreamError::BadFlags(flags));
        }
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if len > kind.max_len() {
            return Err(StreamError::TooLong { kind, len, max: kind.max_len() });
        }
        let expected = u32::from_le_bytes([h[12], h[13], h[14], h[15]]);
        Ok((kind, len, expected, h))
    }

    fn payload(&mut self, len: usize) -> Result<(), StreamError> {
        self.buf.resize(len, 0);
        match self.inner.read_exact(&mut self.buf) {
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(StreamError::Closed),
            r => Ok(r?),
        }
    }

    /// Reads and verifies the next frame, then parses it.
    pub fn read_frame(&mut self) -> Result<Message<'_>, StreamError> {
        let (kind, len, expected, h) = self.header()?;
        self.payload(len)?;
        let found = crc32c::crc32c_append(crc32c::crc32c(&self.buf), &h[..12]);
        if expected != found {
            return Err(StreamError::Checksum { kind, expected, found });
        }
        self.bytes += (HEADER_LEN + len) as u64;
        Message::parse(kind, &self.buf)
    }
}

impl<R: crate::transport::PageSource> FrameReader<R> {
    /// Like [`FrameReader::read_frame`], but the contents of a `Pages` frame are read straight
    /// from the transport into `mem`, once its address is checked against `layout`, and
    /// checksummed there: one copy less. A `Pages` frame comes back as
    /// [`Message::PagesWritten`]. On a checksum error those pages hold unverified bytes:
    /// only use this for a destination VM that is discarded when receiving fails.
    pub fn read_frame_into(
        &mut self,
        mem: &vcore::GuestMemory,
        layout: &Layout,
    ) -> Result<Message<'_>, StreamError> {
        let (kind, len, expected, h) = self.header()?;
        if kind != Kind::Pages {
            self.payload(len)?;
            let found = crc32c::crc32c_append(crc32c::crc32c(&self.buf), &h[..12]);
            if expected != found {
                return Err(StreamError::Checksum { kind, expected, found });
            }
            self.bytes += (HEADER_LEN + len) as u64;
            return Message::parse(kind, &self.buf);
        }
        if len < 8 + PAGE || (len - 8) % PAGE != 0 {
            return Err(malformed(kind, format!("{len} bytes is not an address and whole pages")));
        }
        self.payload(8)?;
        let gpa = u64_at(&self.buf, 0);
        if gpa % PAGE as u64 != 0 {
            return Err(malformed(kind, format!("unaligned address {gpa:#x}")));
        }
        let data_len = len - 8;
        layout.check(gpa, data_len as u64)?;
        self.inner.read_into_guest(mem, gpa, data_len).map_err(|e| match e.kind() {
            std::io::ErrorKind::UnexpectedEof => StreamError::Closed,
            _ => StreamError::Io(e),
        })?;
        let mut crc = crc32c::crc32c(&self.buf[..8]);
        let mut chunk = [0u8; 16 * PAGE];
        let mut done = 0;
        while done < data_len {
            let n = (data_len - done).min(chunk.len());
            mem.read_slice(&mut chunk[..n], vm_memory::GuestAddress(gpa + done as u64))
                .map_err(|e| StreamError::Io(std::io::Error::other(e.to_string())))?;
            crc = crc32c::crc32c_append(crc, &chunk[..n]);
            done += n;
        }
        let found = crc32c::crc32c_append(crc, &h[..12]);
        if expected != found {
            return Err(StreamError::Checksum { kind, expected, found });
        }
        self.bytes += (HEADER_LEN + len) as u64;
        Ok(Message::PagesWritten { gpa, pages: (data_len / PAGE) as u64 })
    }
}

/// Writes frames into a large buffer and hands it to the transport in big writes.
#[derive(Debug)]
pub struct FrameWriter<W: Write> {
    inner: W,
    /// Backing store; only `buf[..len]` is live. It never shrinks, so filling a page slot
    /// does not zero it first.
    buf: Vec<u8>,
    len: usize,
    flush_at: usize,
    /// Bytes handed to the transport so far (headers included).
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    /// Wraps `inner`, flushing once `flush_at` bytes are buffered.
    pub fn new(inner: W, flush_at: usize) -> Self {
        let cap = flush_at + Kind::Pages.max_len() + 2 * HEADER_LEN;
        FrameWriter { inner, buf: Vec::with_capacity(cap), len: 0, flush_at, bytes: 0 }
    }

    /// Makes `buf[..len + n]` addressable, zero-filling only beyond the high-water mark.
    fn grow(&mut self, n: usize) -> std::ops::Range<usize> {
        let start = self.len;
        self.len += n;
        if self.buf.len() < self.len {
            self.buf.resize(self.len, 0);
        }
        start..self.len
    }

    fn put(&mut self, bytes: &[u8]) {
        let r = self.grow(bytes.len());
        self.buf[r].copy_from_slice(bytes);
    }

    /// The transport.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.inner
    }

    /// Starts a frame of `kind`; the payload is appended by the caller, then `end_frame`.
    fn begin(&mut self, kind: Kind) -> usize {
        let at = self.len;
        self.put(&MAGIC);
        self.put(&(kind as u16).to_le_bytes());
        self.put(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        at
    }

    fn end(&mut self, at: usize) -> Result<(), StreamError> {
        let len = (self.len - at - HEADER_LEN) as u32;
        self.buf[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        // One pass over the whole payload: far faster than page-sized CRC calls.
        let crc = crc32c::crc32c_append(
            crc32c::crc32c(&self.buf[at + HEADER_LEN..self.len]),
            &self.buf[at..at + 12],
        );
        self.buf[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
        if self.len >= self.flush_at {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes one frame with `payload`.
    pub fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), StreamError> {
        let at = self.begin(kind);
        self.put(payload);
        self.end(at)
    }

    /// Writes a message (for everything but page data, which [`FrameWriter::pages`] streams).
    pub fn message(&mut self, m: &Message<'_>) -> Result<(), StreamError> {
        match m {
            Message::Hello(h) => {
                let bytes = postcard::to_stdvec(h).map_err(|e| malformed(Kind::Hello, e.to_string()))?;
                self.frame(Kind::Hello, &bytes)
            }
            Message::HelloAck(v) => self.frame(Kind::HelloAck, &v.to_le_bytes()),
            Message::Abort(r) => {
                let mut r = r.as_bytes();
                r = &r[..r.len().min(Kind::Abort.max_len())];
                self.frame(Kind::Abort, r)
            }
            Message::Pages { gpa, data } => {
                let at = self.begin(Kind::Pages);
                self.put(&gpa.to_le_bytes());
                self.put(data);
                self.end(at)
            }
            Message::ZeroPages { gpa, count } => {
                let mut p = [0u8; 16];
                p[..8].copy_from_slice(&gpa.to_le_bytes());
                p[8..].copy_from_slice(&count.to_le_bytes());
                self.frame(Kind::ZeroPages, &p)
            }
            Message::CpuState(b) => self.frame(Kind::CpuState, b),
            Message::Device { name, data } => {
                let at = self.begin(Kind::Device);
                let n = name.len().min(u16::MAX as usize);
                self.put(&(n as u16).to_le_bytes());
                self.put(&name.as_bytes()[..n]);
                self.put(data);
                self.end(at)
            }
            Message::IterationEnd(n) => self.frame(Kind::IterationEnd, &n.to_le_bytes()),
            Message::PagesWritten { .. } => Err(malformed(Kind::Pages, "PagesWritten is receive-side only")),
            Message::Complete => self.frame(Kind::Complete, &[]),
            Message::Ready => self.frame(Kind::Ready, &[]),
            Message::Commit => self.frame(Kind::Commit, &[]),
            Message::Started => self.frame(Kind::Started, &[]),
        }
    }

    /// Encodes `pages` guest pages from `gpa`, read through `read` (which fills a page buffer):
    /// consecutive non-zero pages become `Pages` frames, zero pages become `ZeroPages` runs.
    /// Each page is copied once, straight into the send buffer. Returns `(normal, zero)` pages.
    pub fn pages(
        &mut self,
        gpa: u64,
        pages: u64,
        mut read: impl FnMut(u64, &mut [u8]) -> Result<(), StreamError>,
    ) -> Result<(u64, u64), StreamError> {
        let (mut normal, mut zero) = (0u64, 0u64);
        let mut open: Option<(usize, usize)> = None; // data frame being filled: (start, pages)
        let mut zero_run: Option<(u64, u64)> = None; // (first address, pages)
        let mut scratch = [0u8; PAGE];
        for i in 0..pages {
            let addr = gpa + i * PAGE as u64;
            let slot = self.grow(PAGE);
            let start = slot.start;
            read(addr, &mut self.buf[slot.clone()])?;
            if is_zero(&self.buf[slot]) {
                self.len = start;
                zero += 1;
                if let Some((at, n)) = open.take() {
                    self.close_pages(at, n)?;
                }
                zero_run = Some(match zero_run {
                    Some((z, c)) => (z, c + 1),
                    None => (addr, 1),
                });
                continue;
            }
            normal += 1;
            match open.as_mut() {
                Some((_, n)) => *n += 1,
                None => {
                    // The page must follow a frame header: move it behind one.
                    scratch.copy_from_slice(&self.buf[start..start + PAGE]);
                    self.len = start;
                    if let Some((z, c)) = zero_run.take() {
                        self.message(&Message::ZeroPages { gpa: z, count: c })?;
                    }
                    let at = self.begin(Kind::Pages);
                    self.put(&addr.to_le_bytes());
                    self.put(&scratch);
                    open = Some((at, 1));
                }
            }
            if let Some((at, MAX_PAGES_PER_FRAME)) = open {
                open = None;
                self.end(at)?;
            }
        }
        if let Some((at, n)) = open.take() {
            self.close_pages(at, n)?;
        }
        if let Some((z, c)) = zero_run {
            self.message(&Message::ZeroPages { gpa: z, count: c })?;
        }
        Ok((normal, zero))
    }

    /// Ends a `Pages` frame, or drops it if it holds no page.
    fn close_pages(&mut self, at: usize, n: usize) -> Result<(), StreamError> {
        if n == 0 {
            self.len = at;
            Ok(())
        } else {
            self.end(at)
        }
    }

    /// Hands everything buffered to the transport and flushes it.
    pub fn flush(&mut self) -> Result<(), StreamError> {
        if self.len > 0 {
            self.inner.write_all(&self.buf[..self.len])?;
            self.bytes += self.len as u64;
            self.len = 0;
        }
        self.inner.flush()?;
        Ok(())
    }
}

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
