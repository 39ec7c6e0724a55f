//! Encoding frames into large buffers.

use std::io::{IoSlice, Write};

use super::{
    HEADER_LEN, Kind, MAGIC, MAX_PAGES_PER_FRAME, Message, PAGE, StreamError, frame_crc, live_head,
    malformed, page_crc,
};

/// Shortest stretch of data pages sent as a [`Kind::LivePages`] frame in live mode; shorter ones
/// are copied. A call of [`FrameWriter::guest_pages`] that sent live pages hands everything to
/// the transport before it returns (the pages must not be read after the call), so this also
/// bounds how small such a write can get: 256 KiB, enough to amortize the system call, where
/// scattered dirty pages are copied and leave in 1 MiB writes as before.
pub const LIVE_MIN_PAGES: usize = 64;

/// Shortest range [`FrameWriter::guest_range`] looks up in the host's page tables before
/// reading it: the lookup is a system call, worth it once it can spare a run of page faults.
pub const HOLE_CHECK_PAGES: usize = 16;

/// A piece of what the writer hands to the transport next.
#[derive(Debug, Clone, Copy)]
enum Part {
    /// The buffer's bytes from where the previous part ended up to `end`.
    Buf { end: usize },
    /// `len` bytes of guest memory at host address `addr`. Only between a
    /// [`FrameWriter::guest_pages`] call's start and its end, which hands everything over.
    Guest { addr: usize, len: usize },
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
    /// LZ4-compress page frames when that saves at least an eighth ([`FrameWriter::set_compress`]).
    compress: bool,
    /// Compression output, reused.
    scratch: Vec<u8>,
    /// Pages sent in `CompressedPages` frames so far.
    pub compressed_pages: u64,
    /// Send long stretches of data pages as `LivePages`, without a copy ([`FrameWriter::set_live`]).
    live: bool,
    /// Pages sent in `LivePages` frames so far.
    pub live_pages: u64,
    /// What to hand over when guest memory is part of it; empty otherwise.
    parts: Vec<Part>,
    /// Where the buffer's bytes not yet in `parts` start.
    part_from: usize,
    /// Guest bytes in `parts`.
    guest_bytes: usize,
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
            live: false,
            live_pages: 0,
            parts: Vec::new(),
            part_from: 0,
            guest_bytes: 0,
        }
    }

    /// Sends each stretch of at least [`LIVE_MIN_PAGES`] data pages as a `LivePages` frame
    /// (protocol version 4): the transport reads the pages straight out of guest memory (one
    /// vectored write per [`FrameWriter::guest_pages`] call, not one per page), and only a
    /// checksum pass reads them here, instead of a copy into the send buffer and a checksum pass
    /// over the copy. The guest may write such a page while it is sent; the receiver then finds
    /// it torn and waits for it again (it is dirty, so a later pass sends it). Ignored while
    /// compressing, which needs the copy anyway.
    pub fn set_live(&mut self, on: bool) {
        self.live = on;
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
        // One pass over the whole payload: far faster than page-sized CRC calls.
        self.seal(at, self.len - at - HEADER_LEN, 0);
        self.flush_if_full()
    }

    /// Fills in the header of the frame begun at `at`: its payload is what the buffer holds from
    /// there on plus `outside` bytes the transport gets from elsewhere (live pages), and the
    /// header checksum covers the first `covered` bytes of it.
    fn seal(&mut self, at: usize, covered: usize, outside: usize) {
        let len = (self.len - at - HEADER_LEN + outside) as u32;
        self.buf[at + 8..at + 12].copy_from_slice(&len.to_le_bytes());
        let crc = frame_crc(&self.buf[at + HEADER_LEN..at + HEADER_LEN + covered], &self.buf[at..at + 12]);
        self.buf[at + 12..at + 16].copy_from_slice(&crc.to_le_bytes());
    }

    /// Hands everything to the transport once `flush_at` bytes are waiting.
    fn flush_if_full(&mut self) -> Result<(), StreamError> {
        if self.len + self.guest_bytes >= self.flush_at {
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
            Message::IterationApplied(n) => self.frame(Kind::IterationApplied, &n.to_le_bytes()),
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
            Message::LivePages { gpa, sums, data } => {
                let at = self.begin(Kind::LivePages);
                self.put(&gpa.to_le_bytes());
                self.put(sums);
                self.put(data);
                self.seal(at, 8 + sums.len(), 0);
                self.flush_if_full()
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
    /// In private anonymous memory (as `vcore` allocates it), a range of at least
    /// [`HOLE_CHECK_PAGES`] pages is first looked up in the host's page tables
    /// (`/proc/self/pagemap`): pages the host never allocated are sent as zero pages without
    /// being read, so the encoder neither faults them in nor makes the guest's first write to
    /// them copy a shared zero page.
    pub fn guest_range(
        &mut self,
        mem: &vcore::GuestMemory,
        gpa: u64,
        len: usize,
    ) -> Result<(u64, u64), StreamError> {
        use vm_memory::{GuestMemoryBackend as _, GuestMemoryRegion as _};
        let io = |e: String| StreamError::Io(std::io::Error::other(e));
        let region = mem
            .find_region(vm_memory::GuestAddress(gpa))
            .ok_or_else(|| io(format!("no guest memory at {gpa:#x}")))?;
        let run = region
            .get_slice(vm_memory::MemoryRegionAddress(gpa - region.start_addr().0), len)
            .map_err(|e| io(e.to_string()))?;
        self.encode(gpa, &run, crate::pagemap::region_is_anonymous(region))
    }

    /// Encodes the pages of `run`, guest memory starting at guest address `gpa` (whole pages;
    /// a tail shorter than a page is ignored): consecutive data pages become `Pages` frames (or
    /// in live mode, [`FrameWriter::set_live`], long stretches become `LivePages` frames), zero
    /// pages become `ZeroPages` runs. Returns `(normal, zero)` pages. Live pages are handed to
    /// the transport before this returns.
    ///
    /// Each page is checked for zeros where it lies (a zero page costs one read pass and is
    /// never copied), and each stretch of consecutive data pages is copied once, in one piece,
    /// straight into the send buffer (or, live, checksummed where it lies). The guest may keep
    /// running: a page that changes after it was checked or copied is dirty again and sent
    /// again, and a `Pages` frame's checksum always covers the bytes copied. Any byte slice
    /// works as a run too: `VolatileSlice::from(&mut bytes[..])`.
    pub fn guest_pages<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        gpa: u64,
        run: &vm_memory::VolatileSlice<'_, B>,
    ) -> Result<(u64, u64), StreamError> {
        self.encode(gpa, run, false)
    }

    /// [`FrameWriter::guest_pages`], told whether `run` is private anonymous memory.
    fn encode<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        gpa: u64,
        run: &vm_memory::VolatileSlice<'_, B>,
        anonymous: bool,
    ) -> Result<(u64, u64), StreamError> {
        let pages = run.len() / PAGE;
        let holes = (anonymous && pages >= HOLE_CHECK_PAGES)
            .then(|| crate::pagemap::holes(run.ptr_guard().as_ptr() as usize, pages))
            .flatten()
            .unwrap_or_default();
        let res = self.encode_pages(gpa, run, &holes);
        if !self.parts.is_empty() {
            // The guest parts must not outlive `run`'s borrow: send them now, or forget them
            // (and the stream with them) after an error.
            if res.is_ok() {
                self.hand_over()?;
            } else {
                self.parts.clear();
                (self.len, self.part_from, self.guest_bytes) = (0, 0, 0);
            }
        }
        res
    }

    /// Encodes `run`; a page set in `holes` (empty if unknown) is zero without a look.
    fn encode_pages<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        gpa: u64,
        run: &vm_memory::VolatileSlice<'_, B>,
        holes: &crate::dirty::DirtyBitmap,
    ) -> Result<(u64, u64), StreamError> {
        let io = |e: vm_memory::VolatileMemoryError| StreamError::Io(std::io::Error::other(e.to_string()));
        let pages = run.len() / PAGE;
        let zero_at = |i: usize| {
            if holes.is_set(i as u64) {
                return Ok(true);
            }
            run.subslice(i * PAGE, PAGE).map(|p| crate::sys::guest_page_is_zero(&p))
        };
        let live = self.live && !self.compress;
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
            if let Some((z, c)) = zero_run.take() {
                self.message(&Message::ZeroPages { gpa: z, count: c })?;
            }
            // The stretch of data pages from `i`, up to a frame's worth.
            let (n, limit) = match open {
                Some((_, n)) => (n, if live { MAX_PAGES_PER_FRAME } else { MAX_PAGES_PER_FRAME - n }),
                None => (0, MAX_PAGES_PER_FRAME),
            };
            let mut end = i + 1;
            while end < pages && end - i < limit {
                if zero_at(end).map_err(io)? {
                    known_zero = true;
                    break;
                }
                end += 1;
            }
            if live && end - i >= LIVE_MIN_PAGES {
                if let Some((at, n)) = open.take() {
                    self.close_pages(at, n)?;
                }
                self.live_frame(addr, &run.subslice(i * PAGE, (end - i) * PAGE).map_err(io)?)?;
                normal += (end - i) as u64;
                i = end;
                continue;
            }
            if end - i > MAX_PAGES_PER_FRAME - n {
                // Longer than what the open frame takes: the rest is looked at again.
                end = i + (MAX_PAGES_PER_FRAME - n);
                known_zero = false;
            }
            let (at, n) = match open.take() {
                Some(frame) => frame,
                None => {
                    let at = self.begin(Kind::Pages);
                    self.put(&addr.to_le_bytes());
                    (at, 0)
                }
            };
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

    /// Adds a `LivePages` frame for `data`, guest pages at `gpa`: the header, the address and
    /// the page checksums go into the buffer, the pages themselves stay where they are until
    /// [`FrameWriter::hand_over`].
    fn live_frame<B: vm_memory::bitmap::BitmapSlice>(
        &mut self,
        gpa: u64,
        data: &vm_memory::VolatileSlice<'_, B>,
    ) -> Result<(), StreamError> {
        let guard = data.ptr_guard();
        let (addr, len) = (guard.as_ptr() as usize, data.len());
        // SAFETY: vm-memory maps `len` bytes at `addr` while `data` is borrowed (for a plain
        // mmap, as guest memory is, the guard is a no-op). The guest may write these bytes
        // concurrently, from a vCPU outside this program; the checksum then covers some mix of
        // old and new bytes, which the frame format allows for (the pages arrive torn and are
        // sent again). Nothing here relies on the bytes staying the same.
        let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
        let at = self.begin(Kind::LivePages);
        self.put(&gpa.to_le_bytes());
        for page in bytes.chunks_exact(PAGE) {
            self.put(&page_crc(page).to_le_bytes());
        }
        self.seal(at, live_head(len / PAGE), len);
        self.parts.push(Part::Buf { end: self.len });
        self.part_from = self.len;
        self.parts.push(Part::Guest { addr, len });
        self.guest_bytes += len;
        self.live_pages += (len / PAGE) as u64;
        self.flush_if_full()
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

    /// Writes everything buffered (and the guest memory of live frames) to the transport,
    /// without flushing it.
    fn hand_over(&mut self) -> Result<(), StreamError> {
        if self.parts.is_empty() {
            if self.len > 0 {
                self.inner.write_all(&self.buf[..self.len])?;
                self.bytes += self.len as u64;
                self.len = 0;
            }
            return Ok(());
        }
        if self.len > self.part_from {
            self.parts.push(Part::Buf { end: self.len });
        }
        let mut from = 0;
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(self.parts.len());
        for &p in &self.parts {
            slices.push(match p {
                Part::Buf { end } => {
                    let s = IoSlice::new(&self.buf[from..end]);
                    from = end;
                    s
                }
                Part::Guest { addr, len } => {
                    // SAFETY: a guest part only exists during the `guest_pages` call that added
                    // it, whose `run` keeps the mapping of `len` bytes at `addr` alive (see
                    // `live_frame`); only the kernel reads the bytes, which the guest may be
                    // writing meanwhile (the receiver then finds those pages torn).
                    let bytes = unsafe { std::slice::from_raw_parts(addr as *const u8, len) };
                    IoSlice::new(bytes)
                }
            });
        }
        let total = self.len + self.guest_bytes;
        let mut left = &mut slices[..];
        while !left.is_empty() {
            match self.inner.write_vectored(left) {
                Ok(0) => return Err(StreamError::Io(std::io::ErrorKind::WriteZero.into())),
                Ok(n) => IoSlice::advance_slices(&mut left, n),
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        self.bytes += total as u64;
        self.parts.clear();
        (self.len, self.part_from, self.guest_bytes) = (0, 0, 0);
        Ok(())
    }
}
