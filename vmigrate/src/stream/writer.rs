//! Encoding frames into large buffers.

use std::io::Write;

use super::{HEADER_LEN, Kind, MAGIC, MAX_PAGES_PER_FRAME, Message, PAGE, StreamError, frame_crc, malformed};

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
    /// LZ4-compress page frames when that saves at least an eighth ([`FrameWriter::set_compress`]).
    compress: bool,
    /// Compression output, reused.
    scratch: Vec<u8>,
    /// Pages sent in `CompressedPages` frames so far.
    pub compressed_pages: u64,
}

impl<W: Write> FrameWriter<W> {
    /// Wraps `inner`, flushing once `flush_at` bytes are buffered.
    pub fn new(inner: W, flush_at: usize) -> Self {
        let cap = flush_at + Kind::Pages.max_len() + 2 * HEADER_LEN;
        FrameWriter {
            inner,
            buf: Vec::with_capacity(cap),
            len: 0,
            flush_at,
            bytes: 0,
            compress: false,
            scratch: Vec::new(),
            compressed_pages: 0,
        }
    }

    /// Sends each frame of pages LZ4-compressed (as `CompressedPages`, protocol version 2)
    /// when that makes it at least an eighth smaller; otherwise as it is. For slow links: on a
    /// fast one the compression costs more time than the bytes it saves.
    pub fn set_compress(&mut self, on: bool) {
        self.compress = on;
    }

    /// Replaces the pages of the `Pages` frame at `at` by their LZ4 block if that is worth it.
    fn try_compress(&mut self, at: usize) {
        let data = at + HEADER_LEN + 8;
        let raw = self.len - data;
        self.scratch.resize(lz4_flex::block::get_maximum_output_size(raw), 0);
        let Ok(n) = lz4_flex::block::compress_into(&self.buf[data..self.len], &mut self.scratch) else {
            return;
        };
        if 4 + n > raw - raw / 8 {
            return;
        }
        self.buf[at + 4..at + 6].copy_from_slice(&(Kind::CompressedPages as u16).to_le_bytes());
        self.buf[data..data + 4].copy_from_slice(&((raw / PAGE) as u32).to_le_bytes());
        self.buf[data + 4..data + 4 + n].copy_from_slice(&self.scratch[..n]);
        self.len = data + 4 + n;
        self.compressed_pages += (raw / PAGE) as u64;
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
        if self.compress && self.buf[at + 4..at + 6] == (Kind::Pages as u16).to_le_bytes() {
            self.try_compress(at);
        }
        let len = (self.len - at - HEADER_LEN) as u32;
        self.buf[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        // One pass over the whole payload: far faster than page-sized CRC calls.
        let crc = frame_crc(&self.buf[at + HEADER_LEN..self.len], &self.buf[at..at + 12]);
        self.buf[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
        if self.len >= self.flush_at {
            self.hand_over()?;
        }
        Ok(())
    }

    /// Writes one frame with `payload`.
    pub fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<(), StreamError> {
        let at = self.begin(kind);
        self.put(payload);
        self.end(at)
    }

    /// Writes a message (for everything but page data, which [`FrameWriter::guest_pages`] streams).
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
            Message::CompressedPages { gpa, count, data } => {
                let at = self.begin(Kind::CompressedPages);
                self.put(&gpa.to_le_bytes());
                self.put(&count.to_le_bytes());
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
            Message::DiskHello { size } => self.frame(Kind::DiskHello, &size.to_le_bytes()),
            Message::DiskAck(n) => self.frame(Kind::DiskAck, &n.to_le_bytes()),
            Message::DiskWrite { offset, data } => {
                let at = self.begin(Kind::DiskWrite);
                self.put(&offset.to_le_bytes());
                self.put(data);
                self.end(at)
            }
            Message::StreamHello { index, count } => {
                let mut p = [0u8; 4];
                p[..2].copy_from_slice(&index.to_le_bytes());
                p[2..].copy_from_slice(&count.to_le_bytes());
                self.frame(Kind::StreamHello, &p)
            }
            Message::PagesWritten { .. } => Err(malformed(Kind::Pages, "PagesWritten is receive-side only")),
            Message::Complete => self.frame(Kind::Complete, &[]),
            Message::Ready => self.frame(Kind::Ready, &[]),
            Message::Commit => self.frame(Kind::Commit, &[]),
            Message::Started => self.frame(Kind::Started, &[]),
        }
    }

    /// Encodes the `len` bytes of `mem` from guest address `gpa` (inside one region) as
    /// [`FrameWriter::guest_pages`] does: one region lookup for the whole range, not one per page.
    pub fn guest_range(
        &mut self,
        mem: &vcore::GuestMemory,
        gpa: u64,
        len: usize,
    ) -> Result<(u64, u64), StreamError> {
        use vm_memory::GuestMemoryBackend as _;
        let run = mem
            .get_slice(vm_memory::GuestAddress(gpa), len)
            .map_err(|e| StreamError::Io(std::io::Error::other(e.to_string())))?;
        self.guest_pages(gpa, &run)
    }

    /// Encodes the pages of `run`, guest memory starting at guest address `gpa` (whole pages;
    /// a tail shorter than a page is ignored): consecutive data pages become `Pages` frames,
    /// zero pages become `ZeroPages` runs. Returns `(normal, zero)` pages.
    ///
    /// Each page is checked for zeros where it lies (a zero page costs one read pass and is
    /// never copied), and each stretch of consecutive data pages is copied once, in one piece,
    /// straight into the send buffer. The guest may keep running: a page that changes after it
    /// was checked or copied is dirty again and sent again, and a frame's checksum always
    /// covers the bytes copied. Any byte slice works as a run too:
    /// `VolatileSlice::from(&mut bytes[..])`.
    pub fn guest_pages<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        gpa: u64,
        run: &vm_memory::VolatileSlice<'_, B>,
    ) -> Result<(u64, u64), StreamError> {
        let io = |e: vm_memory::VolatileMemoryError| StreamError::Io(std::io::Error::other(e.to_string()));
        let pages = run.len() / PAGE;
        let zero_at = |i: usize| run.subslice(i * PAGE, PAGE).map(|p| crate::sys::guest_page_is_zero(&p));
        let (mut normal, mut zero) = (0u64, 0u64);
        let mut open: Option<(usize, usize)> = None; // data frame being filled: (start, pages)
        let mut zero_run: Option<(u64, u64)> = None; // (first address, pages)
        let mut known_zero = false; // page `i` was already found to be zero
        let mut i = 0;
        while i < pages {
            let addr = gpa + (i * PAGE) as u64;
            if std::mem::take(&mut known_zero) || zero_at(i).map_err(io)? {
                zero += 1;
                if let Some((at, n)) = open.take() {
                    self.close_pages(at, n)?;
                }
                zero_run = Some(match zero_run {
                    Some((z, c)) => (z, c + 1),
                    None => (addr, 1),
                });
                i += 1;
                continue;
            }
            let (at, n) = match open.take() {
                Some(frame) => frame,
                None => {
                    if let Some((z, c)) = zero_run.take() {
                        self.message(&Message::ZeroPages { gpa: z, count: c })?;
                    }
                    let at = self.begin(Kind::Pages);
                    self.put(&addr.to_le_bytes());
                    (at, 0)
                }
            };
            // The stretch of data pages from `i` that fits this frame.
            let mut end = i + 1;
            while end < pages && end - i < MAX_PAGES_PER_FRAME - n {
                if zero_at(end).map_err(io)? {
                    known_zero = true;
                    break;
                }
                end += 1;
            }
            let count = end - i;
            let slot = self.grow(count * PAGE);
            run.subslice(i * PAGE, count * PAGE).map_err(io)?.copy_to(&mut self.buf[slot]);
            normal += count as u64;
            if n + count == MAX_PAGES_PER_FRAME {
                self.end(at)?;
            } else {
                open = Some((at, n + count));
            }
            i = end;
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
        self.hand_over()?;
        self.inner.flush()?;
        Ok(())
    }

    /// Writes everything buffered to the transport (without flushing it).
    fn hand_over(&mut self) -> Result<(), StreamError> {
        if self.len > 0 {
            self.inner.write_all(&self.buf[..self.len])?;
            self.bytes += self.len as u64;
            self.len = 0;
        }
        Ok(())
    }
}
