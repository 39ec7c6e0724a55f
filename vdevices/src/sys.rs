//! Every `unsafe` operation of vdevices, each behind a small safe function.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use vcore::GuestMemory;
use vm_memory::bitmap::{Bitmap, MS};
use vm_memory::{GuestAddress, GuestMemoryBackend, VolatileSlice};

fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 { Err(io::Error::last_os_error()) } else { Ok(rc) }
}

/// Sets `O_NONBLOCK` on `fd`.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    // SAFETY: F_GETFL only reads the file status flags of `fd`; an invalid fd yields EBADF.
    let flags = check(unsafe { libc::fcntl(fd, libc::F_GETFL) })?;
    // SAFETY: F_SETFL only changes the status flags of `fd`.
    check(unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// Deallocates `[offset, offset + len)` of `file`, keeping its size: the range reads as zeros.
pub(crate) fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    let (Ok(off), Ok(l)) = (i64::try_from(offset), i64::try_from(len)) else {
        return Err(io::ErrorKind::InvalidInput.into());
    };
    let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
    // SAFETY: fallocate works on the open file descriptor only; no memory is passed.
    check(unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) })?;
    Ok(())
}

/// Most `iovec`s one `preadv`/`pwritev` call takes (Linux `UIO_MAXIOV`).
pub(crate) const IOV_MAX: usize = 1024;

/// A host view of part of guest memory.
type GuestSlice<'a> = VolatileSlice<'a, MS<'a, GuestMemory>>;

/// The host slices of the guest buffers `segs` (guest address, length), in order; a buffer that
/// spans two memory regions gives two slices. `InvalidInput` if any byte of any buffer lies
/// outside guest memory.
fn guest_slices<'a>(
    mem: &'a GuestMemory,
    segs: impl IntoIterator<Item = (u64, u32)>,
    hint: usize,
) -> io::Result<Vec<GuestSlice<'a>>> {
    let outside = || io::Error::new(io::ErrorKind::InvalidInput, "buffer outside guest memory");
    let mut out = Vec::with_capacity(hint);
    for (addr, len) in segs {
        let mut got = 0usize;
        for s in mem.get_slices(GuestAddress(addr), len as usize) {
            let s = s.map_err(|_| outside())?;
            got += s.len();
            out.push(s);
        }
        if got != len as usize {
            return Err(outside());
        }
    }
    Ok(out)
}

/// One `preadv` (`write == false`) or `pwritev` over `iov` at `offset`, repeated over short
/// transfers (and `EINTR`) until every byte moved, the call returns 0 (end of file), or it fails.
/// Returns the bytes moved. `iov` is consumed: its entries are advanced past the moved bytes.
///
/// # Safety
///
/// Every entry of `iov` must describe memory that stays mapped for the whole call and that may be
/// written (`write == false`) or read (`write == true`) by the kernel.
unsafe fn vectored_at(file: &File, mut offset: u64, iov: &mut [libc::iovec], write: bool) -> io::Result<u64> {
    let mut done = 0u64;
    let mut first = 0usize;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let count = (iov.len() - first).min(IOV_MAX) as libc::c_int;
        let off = libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let ptr = iov[first..].as_ptr();
        let n = if write {
            // SAFETY: `ptr` points at `count` live iovecs of `iov`; the caller guarantees that each
            // describes mapped memory the kernel may read.
            unsafe { libc::pwritev(file.as_raw_fd(), ptr, count, off) }
        } else {
            // SAFETY: as above; the caller guarantees the memory may be written.
            unsafe { libc::preadv(file.as_raw_fd(), ptr, count, off) }
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            break;
        }
        let mut n = n as usize;
        done += n as u64;
        offset += n as u64;
        while n > 0 && first < iov.len() {
            let v = &mut iov[first];
            let k = v.iov_len.min(n);
            v.iov_base = v.iov_base.cast::<u8>().wrapping_add(k).cast();
            v.iov_len -= k;
            n -= k;
            if v.iov_len == 0 {
                first += 1;
            }
        }
    }
    Ok(done)
}

/// Reads `file` from `offset` straight into the guest buffers `segs` (guest address, length; at
/// most `hint` of them expected) with `preadv`: no bounce buffer, one system call per
/// [`IOV_MAX`] buffers unless the kernel returns short. Returns the bytes read: fewer than the
/// buffers hold only at end of file.
///
/// Every buffer is checked to lie inside guest memory before anything is read (`InvalidInput`
/// otherwise), and all of them are marked dirty in guest memory's bitmap afterwards, even after an
/// error (the kernel may have written part of them).
pub(crate) fn read_to_guest(
    file: &File,
    offset: u64,
    mem: &GuestMemory,
    segs: impl IntoIterator<Item = (u64, u32)>,
    hint: usize,
) -> io::Result<u64> {
    guest_vectored(file, offset, mem, segs, hint, false)
}

/// Writes the guest buffers `segs` (guest address, length; at most `hint` of them expected) to
/// `file` at `offset` with `pwritev`, straight from guest memory. Returns the bytes written
/// (fewer than the buffers hold only if the kernel stopped accepting bytes). Every buffer is
/// checked to lie inside guest memory before anything is written (`InvalidInput` otherwise).
pub(crate) fn write_from_guest(
    file: &File,
    offset: u64,
    mem: &GuestMemory,
    segs: impl IntoIterator<Item = (u64, u32)>,
    hint: usize,
) -> io::Result<u64> {
    guest_vectored(file, offset, mem, segs, hint, true)
}

/// `preadv` into (`write` false) or `pwritev` from (`write` true) the guest buffers `segs`, all
/// checked against guest memory first; buffers a read may have filled are marked dirty.
fn guest_vectored(
    file: &File,
    offset: u64,
    mem: &GuestMemory,
    segs: impl IntoIterator<Item = (u64, u32)>,
    hint: usize,
    write: bool,
) -> io::Result<u64> {
    let slices = guest_slices(mem, segs, hint)?;
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iov: Vec<libc::iovec> =
        guards.iter().map(|g| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: g.len() }).collect();
    // SAFETY: each iovec is one `VolatileSlice` of guest memory (a writable anonymous mapping that
    // lives as long as `mem`, which is borrowed for this whole function), of exactly the slice's
    // length, and `guards` keeps any per-access mapping alive until after the call.
    let res = unsafe { vectored_at(file, offset, &mut iov, write) };
    if !write {
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
    drop(guards);
    res
}

/// Starts loading the cache line at host address `addr` into the cache. A hint: it never
/// faults and changes nothing, whatever the address.
pub(crate) fn prefetch(addr: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: SSE is part of every x86_64 CPU; a prefetch never dereferences its pointer
        // (no fault, no effect on memory), so any address is fine.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(addr as *const i8) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = addr;
}

/// `len` bytes of guest memory at `addr` without the VMM's dirty bitmap: writes through it are
/// not marked (the caller marks them; see `virtio::ctx`). `None` outside guest memory.
pub(crate) fn unmarked(mem: &GuestMemory, addr: u64, len: usize) -> Option<VolatileSlice<'_, ()>> {
    let s = mem.get_slice(GuestAddress(addr), len).ok()?;
    // SAFETY: `s` is `len` bytes inside one region of `mem`, checked by `get_slice`. The memory
    // is a plain mmap (`GuestMemoryMmap`): it stays mapped as long as `mem`, which the returned
    // slice borrows, and the pointer guard holds nothing that must outlive this call. The new
    // slice covers the same bytes and differs only in having no bitmap.
    Some(unsafe { VolatileSlice::new(s.ptr_guard_mut().as_ptr(), len) })
}

/// Machine code of the built-in `virtio_rng` guest (see `guest`).
pub(crate) fn virtio_rng_code() -> &'static [u8] {
    unsafe extern "C" {
        static vinfra_guest_virtio_rng_start: u8;
        static vinfra_guest_virtio_rng_end: u8;
    }
    let start = &raw const vinfra_guest_virtio_rng_start;
    let end = &raw const vinfra_guest_virtio_rng_end;
    let len = end as usize - start as usize;
    // SAFETY: both symbols are labels of the one `global_asm!` block in `guest.rs`, in a read-only
    // section, with the end label after the start label; the bytes between them are initialized
    // machine code that is never written.
    unsafe { std::slice::from_raw_parts(start, len) }
}

/// Gives `len` bytes of anonymous memory at `addr` back to the kernel (`MADV_DONTNEED`): they
/// read as zeros afterwards.
pub(crate) fn discard(addr: *mut u8, len: usize) -> io::Result<()> {
    // SAFETY: the caller passes a range inside a guest memory mapping (checked with
    // `check_range` and obtained from `get_slice`); MADV_DONTNEED on private anonymous memory only
    // replaces its contents with zeros, which every reader of guest memory must expect anyway.
    check(unsafe { libc::madvise(addr.cast(), len, libc::MADV_DONTNEED) })?;
    Ok(())
}

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` with the name and the flags member of its union (40 bytes, like the kernel's).
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, format!("bad interface name {name:?}")));
    }
    let mut r = IfReq { name: [0; libc::IFNAMSIZ], flags: 0, _pad: [0; 22] };
    r.name[..b.len()].copy_from_slice(b);
    Ok(r)
}

/// Opens (creating if needed) the tap `name` with a 12-byte virtio-net header on each frame,
/// non-blocking. Returns the tap and its kernel name.
pub(crate) fn open_tap(name: &str) -> io::Result<(File, String)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")?;
    let mut req = ifreq(name)?;
    req.flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR;
    // SAFETY: TUNSETIFF reads and writes one `struct ifreq`; `req` is a live, correctly laid out
    // 40-byte ifreq.
    check(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req) })?;
    let hdr: libc::c_int = 12;
    // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
    check(unsafe { libc::ioctl(file.as_raw_fd(), TUNSETVNETHDRSZ as _, &hdr) })?;
    let len = req.name.iter().position(|&c| c == 0).unwrap_or(req.name.len());
    Ok((file, String::from_utf8_lossy(&req.name[..len]).into_owned()))
}

/// Sets the tap's offloads (`TUN_F_*`): what the kernel may hand us without finishing it.
pub(crate) fn set_tap_offload(tap: &File, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
    check(unsafe { libc::ioctl(tap.as_raw_fd(), TUNSETOFFLOAD as _, flags as libc::c_ulong) })?;
    Ok(())
}

/// Moves the calling thread into the network namespace at `path` (e.g. `/run/netns/NAME`).
#[cfg(feature = "test-utils")]
pub(crate) fn enter_netns(path: &std::path::Path) -> io::Result<()> {
    let ns = File::open(path)?;
    // SAFETY: setns only changes the calling thread's namespace to the one `ns` refers to.
    check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
    Ok(())
}

/// A raw `AF_PACKET` socket bound to interface `name` (every protocol), in the caller's netns;
/// with `vnet_hdr`, frames it sends and receives carry a 10-byte virtio-net header.
#[cfg(feature = "test-utils")]
pub(crate) fn packet_socket(name: &str, vnet_hdr: bool) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let proto = (libc::ETH_P_ALL as u16).to_be();
    // SAFETY: plain socket creation; the returned fd is owned below.
    let fd =
        check(unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, proto.into()) })?;
    // SAFETY: `fd` is a fresh socket nobody else owns.
    let sock = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let cname = std::ffi::CString::new(name).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: `cname` is a NUL-terminated string that outlives the call.
    let index = unsafe { libc::if_nametoindex(cname.as_ptr()) };
    if index == 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    if vnet_hdr {
        let one: libc::c_int = 1;
        let len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: PACKET_VNET_HDR reads one int from the live `one`.
        check(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_VNET_HDR,
                (&raw const one).cast(),
                len,
            )
        })?;
    }
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_protocol = proto;
    addr.sll_ifindex = index as i32;
    let len = std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t;
    // SAFETY: `addr` is a live sockaddr_ll of `len` bytes.
    check(unsafe { libc::bind(sock.as_raw_fd(), (&raw const addr).cast(), len) })?;
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryRegion};

    fn file(name: &str, data: &[u8]) -> (std::path::PathBuf, File) {
        let p = std::env::temp_dir().join(format!("vdevices-sys-{}-{name}", std::process::id()));
        std::fs::write(&p, data).unwrap();
        let f = std::fs::OpenOptions::new().read(true).write(true).open(&p).unwrap();
        (p, f)
    }

    /// Two adjacent regions of 64 KiB: a buffer may span both.
    fn mem() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000), (GuestAddress(0x10000), 0x10000)]).unwrap()
    }

    #[test]
    fn reads_scatter_into_guest_memory_and_mark_it_dirty() {
        let data: Vec<u8> = (0..20000u32).map(|i| (i * 7 + i / 256) as u8).collect();
        let (p, f) = file("read", &data);
        let mem = mem();
        // Three buffers, the second across the region boundary.
        let segs = [(0x1000u64, 100u32), (0xff00, 0x200), (0x14000, 1000)];
        assert_eq!(read_to_guest(&f, 50, &mem, segs, 3).unwrap(), 1612);
        let mut got = vec![0u8; 1612];
        let mut at = 0;
        for (a, l) in segs {
            mem.read_slice(&mut got[at..at + l as usize], GuestAddress(a)).unwrap();
            at += l as usize;
        }
        assert_eq!(got, data[50..1662]);
        let dirty = |a: u64| {
            let r = mem.find_region(GuestAddress(a)).unwrap();
            r.bitmap().dirty_at((a - r.start_addr().0) as usize)
        };
        assert!(dirty(0x1000) && dirty(0xff00) && dirty(0x10000) && dirty(0x14000));
        assert!(!dirty(0x3000) && !dirty(0x12000));
        // End of file: short.
        assert_eq!(read_to_guest(&f, 19900, &mem, segs, 3).unwrap(), 100);
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn buffers_outside_memory_are_refused_untouched() {
        let (p, f) = file("outside", &[0x11; 8192]);
        let mem = mem();
        let before = std::fs::read(&p).unwrap();
        for segs in [[(0x100u64, 16u32), (0x1_fff0, 0x20)], [(0x100, 16), (u64::MAX - 4, 8)]] {
            let e = read_to_guest(&f, 0, &mem, segs, 2).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
            let e = write_from_guest(&f, 0, &mem, segs, 2).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        }
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x100)).unwrap(), 0, "nothing read before the check");
        assert_eq!(std::fs::read(&p).unwrap(), before, "nothing written");
        let _ = std::fs::remove_file(p);
    }

    #[test]
    fn more_than_iov_max_buffers_round_trip() {
        let (p, f) = file("many", &[0; 40000]);
        let mem = mem();
        let n = IOV_MAX * 2 + 5;
        let segs: Vec<(u64, u32)> = (0..n as u64).map(|i| (0x20 * i, 16)).collect();
        for (i, &(a, _)) in segs.iter().enumerate() {
            mem.write_slice(&[i as u8; 16], GuestAddress(a)).unwrap();
        }
        assert_eq!(write_from_guest(&f, 100, &mem, segs.iter().copied(), n).unwrap(), 16 * n as u64);
        let file = std::fs::read(&p).unwrap();
        for i in 0..n {
            assert_eq!(file[100 + 16 * i..116 + 16 * i], [i as u8; 16]);
        }
        let back: Vec<(u64, u32)> = (0..n as u64).map(|i| (0x10000 + 0x10 * i, 16)).collect();
        assert_eq!(read_to_guest(&f, 100, &mem, back.iter().copied(), n).unwrap(), 16 * n as u64);
        let mut got = vec![0u8; 16 * n];
        mem.read_slice(&mut got, GuestAddress(0x10000)).unwrap();
        assert_eq!(got, file[100..100 + 16 * n]);
        let _ = std::fs::remove_file(p);
    }
}
