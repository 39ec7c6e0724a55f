//! Reading and verifying frames.

use std::io::Read;

use super::{
    Crc32c, HEADER_LEN, Kind, Layout, MAGIC, MAX_PAGES_PER_FRAME, Message, PAGE, StreamError, TornMask,
    frame_crc, header_crc, live_head, live_pages, malformed, u64_at,
};

/// Bytes of a `Pages` frame read (then checksummed) at a time.
const READ_PIECE: usize = 128 << 10;

/// Reads frames from a transport, reusing one payload buffer.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    /// Bytes read so far.
    pub bytes: u64,
    /// Allocate a run's pages in one call before reading it in ([`FrameReader::set_populate`]).
    populate: bool,
}

impl<R: Read> FrameReader<R> {
    /// Wraps `inner`.
    pub fn new(inner: R) -> Self {
        FrameReader { inner, buf: Vec::new(), bytes: 0, populate: false }
    }

    /// For a destination VM that never ran: before [`FrameReader::read_frame_into`] writes a
    /// run of pages the VMM has not written yet, it allocates them with one
    /// [`vcore::memory::populate_range`] instead of a page fault per page as the socket's data
    /// lands (zero pages, never written, stay unallocated).
    pub fn set_populate(&mut self, on: bool) {
        self.populate = on;
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
        let found = header_crc(kind, &self.buf, &h);
        if expected != found {
            return Err(StreamError::Checksum { kind, expected, found });
        }
        self.bytes += (HEADER_LEN + len) as u64;
        Message::parse(kind, &self.buf)
    }
}

/// Whether the VMM has written the page at `gpa` (its dirty bitmap says so): in a VM that never
/// ran, every other page is untouched, zero and unallocated.
pub(crate) fn vmm_wrote(mem: &vcore::GuestMemory, gpa: u64) -> bool {
    use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
    mem.find_region(vm_memory::GuestAddress(gpa))
        .is_some_and(|r| vm_memory::MmapRegion::bitmap(r).is_addr_set((gpa - r.start_addr().0) as usize))
}

impl<R: crate::transport::PageSource> FrameReader<R> {
    /// Like [`FrameReader::read_frame`], but the contents of a `Pages` or `LivePages` frame are
    /// read straight from the transport into `mem`, once its address is checked against
    /// `layout`, and checksummed there: one copy less. Such a frame comes back as
    /// [`Message::PagesWritten`], which names the live pages whose own checksum failed (torn).
    /// On a checksum error, and for torn pages, guest memory holds unverified bytes:
    /// only use this for a destination VM that does not run while receiving (nothing else
    /// writes its memory) and is discarded when receiving fails.
    pub fn read_frame_into(
        &mut self,
        mem: &vcore::GuestMemory,
        layout: &Layout,
    ) -> Result<Message<'_>, StreamError> {
        let (kind, len, expected, h) = self.header()?;
        let head = match kind {
            Kind::Pages if len >= 8 + PAGE && (len - 8) % PAGE == 0 => 8,
            Kind::Pages => {
                return Err(malformed(kind, format!("{len} bytes is not an address and whole pages")));
            }
            Kind::LivePages => match live_pages(len) {
                Some(n) => live_head(n),
                None => {
                    return Err(malformed(
                        kind,
                        format!("{len} bytes is not an address, page checksums and whole pages"),
                    ));
                }
            },
            _ => {
                self.payload(len)?;
                let found = frame_crc(&self.buf, &h);
                if expected != found {
                    return Err(StreamError::Checksum { kind, expected, found });
                }
                self.bytes += (HEADER_LEN + len) as u64;
                return Message::parse(kind, &self.buf);
            }
        };
        let live = kind == Kind::LivePages;
        self.payload(head)?;
        // The checksum that vouches for the address: the header's, over the whole frame for
        // `Pages`, over the address and the page checksums for `LivePages` (checked before
        // anything is written).
        let mut crc = Crc32c::new();
        crc.update(&self.buf[..head]);
        if live {
            crc.update(&h[..12]);
            let found = crc.finish();
            if expected != found {
                return Err(StreamError::Checksum { kind, expected, found });
            }
        }
        let gpa = u64_at(&self.buf, 0);
        if !gpa.is_multiple_of(PAGE as u64) {
            return Err(malformed(kind, format!("unaligned address {gpa:#x}")));
        }
        let data_len = len - head;
        layout.check(gpa, data_len as u64)?;
        if self.populate && !vmm_wrote(mem, gpa) {
            // A kernel without MADV_POPULATE_WRITE: the pages fault in as before, from now on
            // without asking again. Another failure only costs those faults.
            if let Ok(false) = vcore::memory::populate_range(mem, gpa, data_len) {
                self.populate = false;
            }
        }
        let guest_io = |e: vm_memory::GuestMemoryError| StreamError::Io(std::io::Error::other(e.to_string()));
        // Read and checksummed in pieces: each is checksummed in place right after the
        // kernel copied it in, while it is still in cache.
        let mut torn: TornMask = [0; MAX_PAGES_PER_FRAME / 64];
        let piece = READ_PIECE;
        let mut done = 0;
        while done < data_len {
            let n = (data_len - done).min(piece);
            let at = gpa + done as u64;
            self.inner.read_into_guest(mem, at, n).map_err(|e| match e.kind() {
                std::io::ErrorKind::UnexpectedEof => StreamError::Closed,
                _ => StreamError::Io(e),
            })?;
            if live {
                let sums = &self.buf[8..head];
                crate::sys::guest_page_crcs(mem, at, n, |page_gpa, crc| {
                    let p = ((page_gpa - gpa) / PAGE as u64) as usize;
                    if sums[4 * p..4 * p + 4] != crc.to_le_bytes() {
                        torn[p / 64] |= 1 << (p % 64);
                    }
                })
                .map_err(guest_io)?;
            } else {
                crate::sys::crc32c_guest(mem, at, n, &mut crc).map_err(guest_io)?;
            }
            done += n;
        }
        self.bytes += (HEADER_LEN + len) as u64;
        let pages = (data_len / PAGE) as u64;
        if !live {
            crc.update(&h[..12]);
            let found = crc.finish();
            if expected != found {
                return Err(StreamError::Checksum { kind, expected, found });
            }
        }
        Ok(Message::PagesWritten { gpa, pages, torn })
    }
}
