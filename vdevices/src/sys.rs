//! Every `unsafe` operation of vdevices, each behind a small safe function.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, RawFd};

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
