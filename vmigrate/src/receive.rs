//! The destination side, and snapshots to and from files (a snapshot is a migration to a file).
//!
//! The destination writes pages only inside the agreed layout, restores state only after
//! `Complete`, and starts the guest only after the source's `Commit`. Any error before that
//! sends `Abort` (best effort) and returns, with the VM never started: the caller drops it.

use std::time::Instant;

use serde::Serialize;
use vcore::{GuestMemory, Vm, VmSnapshot};
use vm_memory::{Bytes, GuestAddress};

use crate::error::expect_frame;
use crate::precopy::{MigrationError, hello_for, host_cpu_features};
use crate::stream::{
    APPLIED_VERSION, COMPRESSION_VERSION, FrameReader, FrameWriter, Hello, Kind, Layout, MAX_PAGES_PER_FRAME,
    Message, PAGE, PROTOCOL_VERSIONS, StreamError, page_crc, vmm_wrote,
};
use crate::streams::{check_streams, receive_stream};
use crate::transport::Transport;

/// What the destination received.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ReceiveStats {
    /// Bytes read (frames, headers included).
    pub bytes: u64,
    /// Pages received with contents.
    pub normal_pages: u64,
    /// Pages received as zero runs.
    pub zero_pages: u64,
    /// Pre-copy iterations seen.
    pub iterations: u32,
    /// Device sections received.
    pub devices: usize,
    /// Time from `Commit` to the guest running (destination side of the downtime).
    pub start_us: u64,
    /// Data streams that carried the pages (0: the main stream carried them).
    pub data_streams: usize,
    /// Pages that arrived torn (sent live while the guest wrote them) and arrived again later.
    pub torn_pages: u64,
}

impl ReceiveStats {
    fn add_pages(&mut self, o: &ReceiveStats) {
        self.bytes += o.bytes;
        self.normal_pages += o.normal_pages;
        self.zero_pages += o.zero_pages;
        self.torn_pages += o.torn_pages;
    }
}

/// Pages that arrived torn (a `LivePages` page whose checksum failed) and have not arrived
/// intact since: each must arrive intact before the stream ends (the source sends a page
/// written while it was sent again, because it is dirty; nothing sends a page damaged on the
/// way again).
#[derive(Debug, Default)]
pub(crate) struct Torn(std::collections::BTreeSet<u64>);

impl Torn {
    fn mark(&mut self, gpa: u64, pages: u64) {
        self.0.extend((0..pages).map(|i| gpa + i * PAGE as u64));
    }

    fn clear(&mut self, gpa: u64, pages: u64) {
        if self.0.is_empty() {
            return;
        }
        let end = gpa.saturating_add(pages.saturating_mul(PAGE as u64));
        let intact: Vec<u64> = self.0.range(gpa..end).copied().collect();
        for p in intact {
            self.0.remove(&p);
        }
    }

    /// Counts a page of a live frame, `intact` or torn, and keeps the set up to date.
    fn arrived(&mut self, stats: &mut ReceiveStats, at: u64, intact: bool) {
        if intact {
            stats.normal_pages += 1;
            self.clear(at, 1);
        } else {
            stats.torn_pages += 1;
            self.mark(at, 1);
        }
    }

    /// An error if some page is still torn.
    pub(crate) fn check(&self) -> Result<(), StreamError> {
        match self.0.first() {
            None => Ok(()),
            Some(&first) => Err(StreamError::Torn { pages: self.0.len() as u64, first }),
        }
    }
}

/// What the receiver knows of a destination VM that never ran.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fresh {
    /// The VM never ran: it holds only what the VMM wrote into it, and the VMM's writes are
    /// tracked per page ([`vmm_wrote`]), so every other page is known to be zero.
    pub never_ran: bool,
    /// Allocate each run of pages in one call before reading it in
    /// ([`FrameReader::set_populate`]): a VM that never ran and was not preallocated.
    pub populate: bool,
}

/// Device sections as they arrived: `(name, bytes)`.
type Sections = Vec<(String, Vec<u8>)>;

/// Writes a page message into `mem`, checking every address against `layout` first.
/// `known_zero(gpa)`, if given, says a page is certainly zero already (it is then not touched).
/// Returns `(normal pages, zero pages)` written; other messages write nothing. Torn pages of a
/// `LivePages` frame are not written and make it an error (after the intact ones are written):
/// a receiver that waits for them to arrive again handles `LivePages` itself.
pub fn apply_memory(
    mem: &GuestMemory,
    layout: &Layout,
    msg: &Message<'_>,
    known_zero: Option<&dyn Fn(u64) -> bool>,
) -> Result<(u64, u64), StreamError> {
    static ZERO: [u8; PAGE] = [0; PAGE];
    let io = |e: vm_memory::GuestMemoryError| StreamError::Io(std::io::Error::other(e.to_string()));
    match *msg {
        Message::Pages { gpa, data } => {
            layout.check(gpa, data.len() as u64)?;
            mem.write_slice(data, GuestAddress(gpa)).map_err(io)?;
            Ok(((data.len() / PAGE) as u64, 0))
        }
        Message::LivePages { gpa, sums, data } => {
            let mut bad = (0u64, u64::MAX);
            apply_live(mem, layout, gpa, sums, data, |at, intact| {
                if !intact {
                    bad = (bad.0 + 1, bad.1.min(at));
                }
            })?;
            match bad {
                (0, _) => Ok(((data.len() / PAGE) as u64, 0)),
                (pages, first) => Err(StreamError::Torn { pages, first }),
            }
        }
        Message::CompressedPages { gpa, count, data } => {
            let len = count as usize * PAGE;
            layout.check(gpa, len as u64)?;
            let mut pages = vec![0u8; len];
            match lz4_flex::block::decompress_into(data, &mut pages) {
                Ok(n) if n == len => {}
                Ok(n) => {
                    return Err(StreamError::Malformed {
                        kind: Kind::CompressedPages,
                        reason: format!("{n} bytes decompressed, {count} pages expected"),
                    });
                }
                Err(e) => {
                    return Err(StreamError::Malformed {
                        kind: Kind::CompressedPages,
                        reason: e.to_string(),
                    });
                }
            }
            mem.write_slice(&pages, GuestAddress(gpa)).map_err(io)?;
            Ok((u64::from(count), 0))
        }
        Message::ZeroPages { gpa, count } => {
            let len =
                count.checked_mul(PAGE as u64).ok_or(StreamError::OutOfLayout { gpa, len: u64::MAX })?;
            layout.check(gpa, len)?;
            // Pages the VMM never wrote are still zero in a VM that never ran (fresh anonymous
            // memory): skip them without reading, which would fault each one in. Others are
            // checked and zeroed only if needed.
            let mut page = [0u8; PAGE];
            for i in 0..count {
                let addr = GuestAddress(gpa + i * PAGE as u64);
                if !known_zero.is_some_and(|k| k(addr.0)) {
                    mem.read_slice(&mut page, addr).map_err(io)?;
                    if !crate::stream::is_zero(&page) {
                        mem.write_slice(&ZERO[..PAGE], addr).map_err(io)?;
                    }
                }
            }
            Ok((0, count))
        }
        _ => Ok((0, 0)),
    }
}

/// Checks a source's handshake against this VM; returns the reason it is refused, if any.
pub fn check_hello(vm: &Vm, hello: &Hello) -> Result<u16, String> {
    let low = hello.min_version.max(PROTOCOL_VERSIONS.0);
    let high = hello.max_version.min(PROTOCOL_VERSIONS.1);
    if low > high {
        return Err(format!(
            "protocol versions {}..={} and {}..={} do not overlap",
            hello.min_version, hello.max_version, PROTOCOL_VERSIONS.0, PROTOCOL_VERSIONS.1
        ));
    }
    if hello.vcpus != u16::from(vm.vcpu_count()) {
        return Err(format!("source has {} vCPUs, destination {}", hello.vcpus, vm.vcpu_count()));
    }
    let mine = Layout::of(vm);
    if hello.layout != mine {
        return Err(format!(
            "memory layouts differ: source {:x?}, destination {:x?}",
            hello.layout, mine.regions
        ));
    }
    let cpu = host_cpu_features(vm);
    if hello.cpu.vendor != cpu.vendor {
        return Err("CPU vendors differ".into());
    }
    let missing = hello.cpu.missing_from(&cpu);
    if !missing.is_empty() {
        return Err(format!("destination lacks CPU features (register, bits): {missing:x?}"));
    }
    Ok(high)
}

/// Device sections restored by the caller before the guest starts.
pub type DeviceRestorer<'a> = dyn FnMut(&[(String, Vec<u8>)]) -> Result<(), String> + 'a;

/// A look at the restored VM before it starts.
pub type Inspector<'a> = dyn FnMut(&Vm) + 'a;

/// The destination side of a live migration, or the reader of a snapshot file.
pub struct Destination<'a> {
    vm: &'a Vm,
    devices: Option<Box<DeviceRestorer<'a>>>,
    on_restored: Option<Box<Inspector<'a>>>,
}

impl std::fmt::Debug for Destination<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Destination").field("vm", &self.vm).finish_non_exhaustive()
    }
}

impl<'a> Destination<'a> {
    /// Receives into `vm`, which must be built with the source's configuration and not started.
    pub fn new(vm: &'a Vm) -> Self {
        Destination { vm, devices: None, on_restored: None }
    }

    /// Called with the VM once memory and state are restored, before `Ready` (the guest has not
    /// run yet): a place to verify or record what arrived.
    pub fn on_restored(mut self, f: impl FnMut(&Vm) + 'a) -> Self {
        self.on_restored = Some(Box::new(f));
        self
    }

    /// Restores device sections (before `Ready`); an error aborts the migration.
    pub fn devices(mut self, f: impl FnMut(&[(String, Vec<u8>)]) -> Result<(), String> + 'a) -> Self {
        self.devices = Some(Box::new(f));
        self
    }

    /// Runs a live migration over `transport`; on success the guest runs on `vm`.
    pub fn run<T: Transport>(self, transport: T) -> Result<ReceiveStats, MigrationError> {
        self.run_streams(transport, Vec::<T>::new())
    }

    /// Runs a live migration whose pages arrive on the `data` streams (as many as the source
    /// sends, in the order it made them: see [`Source::run_streams`](crate::Source::run_streams)).
    pub fn run_streams<T: Transport, D: Transport>(
        mut self,
        mut transport: T,
        data: Vec<D>,
    ) -> Result<ReceiveStats, MigrationError> {
        let result = self.session(&mut transport, data, true);
        if let Err(e) = &result {
            let mut w = FrameWriter::new(&mut transport, 0);
            let _ = w.message(&Message::Abort(e.to_string()));
            transport.close();
        }
        result
    }

    /// Reads a snapshot (written by [`save_snapshot`]) into `vm`; the caller starts it.
    pub fn restore_file(mut self, file: &mut std::fs::File) -> Result<ReceiveStats, MigrationError> {
        self.session(file, Vec::<std::fs::File>::new(), false)
    }

    fn session<T: Transport, D: Transport>(
        &mut self,
        transport: &mut T,
        data: Vec<D>,
        live: bool,
    ) -> Result<ReceiveStats, MigrationError> {
        let vm = self.vm;
        let mut stats = ReceiveStats::default();
        let mut r = FrameReader::new(&mut *transport);
        let hello = expect_frame(&mut r, "Hello", |m| match m {
            Message::Hello(h) => Ok(h),
            m => Err(m),
        })?;
        let version = check_hello(vm, &hello).map_err(MigrationError::Incompatible)?;
        stats.bytes = r.bytes;
        drop(r);
        if live {
            FrameWriter::new(&mut *transport, 0).message(&Message::HelloAck(version))?;
        }
        check_streams(data.len(), version, "source")?;
        stats.data_streams = data.len();
        let never_ran = vm.run_state() == vcore::RunState::Created;
        let mem = vm.memory();
        let kz = Fresh { never_ran, populate: never_ran && !vm.config().prealloc };
        let (state, sections) = if data.is_empty() {
            // A live source without data streams waits for each iteration to be applied.
            let ack = live && version >= APPLIED_VERSION;
            let main = Main { version, fresh: kz, data_streams: false, ack };
            receive_main(transport, vm.memory(), &hello.layout, main, &mut stats)?
        } else {
            let layout = &hello.layout;
            let count = data.len();
            std::thread::scope(|s| {
                let streams: Vec<_> = data
                    .into_iter()
                    .enumerate()
                    .map(|(i, t)| s.spawn(move || receive_stream(mem, layout, kz, t, i, count)))
                    .collect();
                let main = Main { version, fresh: kz, data_streams: true, ack: false };
                let main = receive_main(transport, mem, layout, main, &mut stats);
                let mut errors = Vec::new();
                for h in streams {
                    match h.join().expect("a receiving thread panicked") {
                        Ok(st) => stats.add_pages(&st),
                        Err(e) => errors.push(e),
                    }
                }
                // One failure ends every stream: report the cause (a corrupt frame, say), not
                // the closed streams and the source's abort that followed from it.
                let (causes, echoes): (Vec<_>, Vec<_>) = errors.into_iter().partition(|e| !is_echo(e));
                if let Err(e) = &main
                    && !is_echo(e)
                {
                    return main;
                }
                if let Some(cause) = causes.into_iter().next() {
                    return Err(cause);
                }
                let main = main?;
                match echoes.into_iter().next() {
                    Some(e) => Err(e),
                    None => Ok(main),
                }
            })?
        };
        let state = state.ok_or(MigrationError::Protocol { expected: "CpuState", got: "Complete".into() })?;
        let snap = VmSnapshot::from_bytes(&state).map_err(vcore::VmError::from)?;
        vm.restore_state(&snap)?;
        stats.devices = sections.len();
        if let Some(f) = self.devices.as_mut() {
            f(&sections).map_err(|e| MigrationError::Incompatible(format!("device restore: {e}")))?;
        }
        if let Some(f) = self.on_restored.as_mut() {
            f(vm);
        }
        if !live {
            return Ok(stats);
        }
        FrameWriter::new(&mut *transport, 0).message(&Message::Ready)?;
        expect_frame(&mut FrameReader::new(&mut *transport), "Commit", |m| match m {
            Message::Commit => Ok(()),
            m => Err(m),
        })?;
        let t = Instant::now();
        vm.start()?;
        stats.start_us = t.elapsed().as_micros() as u64;
        // The guest runs now; if this reply is lost the source reports CommitUncertain.
        let _ = FrameWriter::new(&mut *transport, 0).message(&Message::Started);
        Ok(stats)
    }
}

/// Writes the pages of a `LivePages` frame whose checksums match into `mem` (after checking the
/// range against `layout`), and tells `page(address, intact)` about every page.
fn apply_live(
    mem: &GuestMemory,
    layout: &Layout,
    gpa: u64,
    sums: &[u8],
    data: &[u8],
    mut page: impl FnMut(u64, bool),
) -> Result<(), StreamError> {
    layout.check(gpa, data.len() as u64)?;
    for (i, (bytes, sum)) in data.chunks_exact(PAGE).zip(sums.chunks_exact(4)).enumerate() {
        let at = gpa + (i * PAGE) as u64;
        let intact = page_crc(bytes).to_le_bytes() == sum;
        if intact {
            mem.write_slice(bytes, GuestAddress(at))
                .map_err(|e| StreamError::Io(std::io::Error::other(e.to_string())))?;
        }
        page(at, intact);
    }
    Ok(())
}

/// Writes (or, when [`FrameReader::read_frame_into`] already wrote it, counts) a page message
/// into `mem` and `stats`, and keeps `torn` up to date (zero pages of a VM that never ran are
/// left alone where the VMM never wrote); returns false, touching nothing, for any other message.
pub(crate) fn take_pages(
    mem: &GuestMemory,
    layout: &Layout,
    msg: &Message<'_>,
    fresh: Fresh,
    stats: &mut ReceiveStats,
    torn: &mut Torn,
) -> Result<bool, StreamError> {
    match *msg {
        Message::PagesWritten { gpa, pages, torn: mask } if mask == [0; MAX_PAGES_PER_FRAME / 64] => {
            stats.normal_pages += pages;
            torn.clear(gpa, pages);
        }
        Message::PagesWritten { gpa, pages, torn: mask } => {
            for i in 0..pages.min(MAX_PAGES_PER_FRAME as u64) {
                let intact = mask[(i / 64) as usize] & (1 << (i % 64)) == 0;
                torn.arrived(stats, gpa + i * PAGE as u64, intact);
            }
        }
        Message::LivePages { gpa, sums, data } => {
            apply_live(mem, layout, gpa, sums, data, |at, intact| torn.arrived(stats, at, intact))?;
        }
        Message::Pages { gpa, .. }
        | Message::ZeroPages { gpa, .. }
        | Message::CompressedPages { gpa, .. } => {
            let unwritten = |gpa: u64| !vmm_wrote(mem, gpa);
            let kz = fresh.never_ran.then_some(&unwritten as &dyn Fn(u64) -> bool);
            let (n, z) = apply_memory(mem, layout, msg, kz)?;
            stats.normal_pages += n;
            stats.zero_pages += z;
            torn.clear(gpa, n + z);
        }
        _ => return Ok(false),
    }
    Ok(true)
}

/// Whether `e` follows from a failure elsewhere: a stream the peer closed or reset, or the
/// peer's abort.
fn is_echo(e: &MigrationError) -> bool {
    matches!(
        e,
        MigrationError::PeerAborted(_) | MigrationError::Stream(StreamError::Closed | StreamError::Io(_))
    )
}

/// How the main stream is received.
#[derive(Debug, Clone, Copy)]
struct Main {
    /// The protocol version agreed on.
    version: u16,
    fresh: Fresh,
    /// Data streams carry the pages; the main stream must not.
    data_streams: bool,
    /// Answer each `IterationEnd` with `IterationApplied` (protocol version 5, live).
    ack: bool,
}

/// Reads the main stream from after the handshake to `Complete`: pages (unless `data_streams`:
/// then pages belong on the data streams), iteration marks, the vCPU/VM state and the device
/// sections. Returns the state and the sections.
fn receive_main<T: Transport>(
    transport: &mut T,
    mem: &GuestMemory,
    layout: &Layout,
    Main { version, fresh, data_streams, ack }: Main,
    stats: &mut ReceiveStats,
) -> Result<(Option<Vec<u8>>, Sections), MigrationError> {
    let mut r = FrameReader::new(&mut *transport);
    r.set_populate(fresh.populate);
    let (mut state, mut sections) = (None, Vec::new());
    let mut torn = Torn::default();
    loop {
        // Page contents go straight from the transport into guest memory (this VM is not
        // running, and is discarded if receiving fails).
        let msg = r.read_frame_into(mem, layout)?;
        match msg {
            Message::PagesWritten { .. }
            | Message::LivePages { .. }
            | Message::Pages { .. }
            | Message::ZeroPages { .. }
            | Message::CompressedPages { .. }
                if data_streams =>
            {
                // The same page might then arrive on two streams, in no defined order.
                return Err(MigrationError::Protocol {
                    expected: "no pages on the main stream when data streams carry them",
                    got: "pages".into(),
                });
            }
            Message::CompressedPages { .. } if version < COMPRESSION_VERSION => {
                return Err(MigrationError::Protocol {
                    expected: "no compressed pages in protocol version 1",
                    got: "CompressedPages".into(),
                });
            }
            Message::IterationEnd(n) => {
                stats.iterations += 1;
                // Every frame before it is in guest memory: frames are applied as they are read.
                if ack {
                    FrameWriter::new(r.get_mut(), 0).message(&Message::IterationApplied(n))?;
                }
            }
            Message::CpuState(b) => state = Some(b.to_vec()),
            Message::Device { name, data } => sections.push((name, data.to_vec())),
            Message::Complete => break,
            Message::Abort(reason) => return Err(MigrationError::PeerAborted(reason)),
            other => {
                if !take_pages(mem, layout, &other, fresh, stats, &mut torn)? {
                    return Err(MigrationError::Protocol {
                        expected: "pages or state",
                        got: format!("{other:?}"),
                    });
                }
            }
        }
    }
    torn.check()?;
    stats.bytes += r.bytes;
    Ok((state, sections))
}

/// Saves `vm` to `file`: the handshake, every page, vCPU/VM state and the device sections, then
/// `Complete`. The VM is paused by this call if it runs, then `devices` (as a migration does,
/// before memory is read: see [`vcore::DeviceSections`]); both stay paused.
pub fn save_snapshot(
    vm: &Vm,
    file: &mut std::fs::File,
    devices: Option<&mut dyn vcore::DeviceSections>,
) -> Result<u64, MigrationError> {
    if vm.run_state() == vcore::RunState::Running {
        vm.pause()?;
    }
    let devices = match devices {
        Some(d) => d.pause_and_save().map_err(MigrationError::Devices)?,
        None => Vec::new(),
    };
    let mut w = FrameWriter::new(file, crate::stream::SEND_BUFFER);
    w.message(&Message::Hello(hello_for(vm)))?;
    for s in vm.slots() {
        w.guest_range(vm.memory(), s.guest_addr, s.size as usize)?;
    }
    w.message(&Message::CpuState(&vm.save_state()?.to_bytes()))?;
    for (name, data) in &devices {
        w.message(&Message::Device { name: name.clone(), data })?;
    }
    w.message(&Message::Complete)?;
    w.flush()?;
    w.get_mut().sync_all().map_err(StreamError::Io)?;
    Ok(w.bytes)
}
