//! Every `unsafe` operation of vdevices, each behind a small safe function.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

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
