//! Transports: TCP, Unix socket, in-process channel, and files (a snapshot is a migration to a
//! file). All are plain `Read + Write`; the frame writer hands them large buffers, so there is
//! no per-page system call.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::mpsc::{Receiver, RecvTimeoutError, SyncSender, sync_channel};
use std::time::Duration;

use vcore::GuestMemory;
use vm_memory::{Bytes, GuestAddress, ReadVolatile};

/// Default time a read may wait before the peer counts as dead.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// A byte stream that can deliver bytes straight into guest memory.
pub trait PageSource: Read {
    /// Reads exactly `len` bytes into guest memory at `gpa` (already checked against the layout).
    /// The default goes through a small bounce buffer; sockets and files read in place.
    fn read_into_guest(&mut self, mem: &GuestMemory, gpa: u64, len: usize) -> io::Result<()> {
        let mut buf = [0u8; 64 * 1024];
        let mut done = 0;
        while done < len {
            let n = (len - done).min(buf.len());
            self.read_exact(&mut buf[..n])?;
            mem.write_slice(&buf[..n], GuestAddress(gpa + done as u64)).map_err(io::Error::other)?;
            done += n;
        }
        Ok(())
    }
}

/// Reads with `read(2)` straight into guest memory.
fn read_fd_into_guest<F: ReadVolatile>(
    src: &mut F,
    mem: &GuestMemory,
    gpa: u64,
    len: usize,
) -> io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = mem.read_volatile_from(GuestAddress(gpa + done as u64), src, len - done).map_err(
            |e| match e {
                vm_memory::GuestMemoryError::IOError(e) => e,
                other => io::Error::other(other),
            },
        )?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        done += n;
    }
    Ok(())
}

impl PageSource for TcpStream {
    fn read_into_guest(&mut self, mem: &GuestMemory, gpa: u64, len: usize) -> io::Result<()> {
        read_fd_into_guest(self, mem, gpa, len)
    }
}

impl PageSource for UnixStream {
    fn read_into_guest(&mut self, mem: &GuestMemory, gpa: u64, len: usize) -> io::Result<()> {
        read_fd_into_guest(self, mem, gpa, len)
    }
}

impl PageSource for std::fs::File {
    fn read_into_guest(&mut self, mem: &GuestMemory, gpa: u64, len: usize) -> io::Result<()> {
        read_fd_into_guest(self, mem, gpa, len)
    }
}

impl PageSource for &[u8] {}
impl PageSource for ChannelTransport {}

impl<T: PageSource + ?Sized> PageSource for &mut T {
    fn read_into_guest(&mut self, mem: &GuestMemory, gpa: u64, len: usize) -> io::Result<()> {
        (**self).read_into_guest(mem, gpa, len)
    }
}

impl<T: PageSource + ?Sized> PageSource for Box<T> {
    fn read_into_guest(&mut self, mem: &GuestMemory, gpa: u64, len: usize) -> io::Result<()> {
        (**self).read_into_guest(mem, gpa, len)
    }
}

/// A byte stream to the migration peer.
pub trait Transport: PageSource + Write + Send {
    /// Closes both directions, waking a peer blocked on us.
    fn close(&mut self) {}
}

impl Transport for TcpStream {
    fn close(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Transport for UnixStream {
    fn close(&mut self) {
        let _ = self.shutdown(std::net::Shutdown::Both);
    }
}

impl Transport for std::fs::File {}

impl<T: Transport + ?Sized> Transport for Box<T> {
    fn close(&mut self) {
        (**self).close()
    }
}

fn tune_tcp(s: &TcpStream, timeout: Duration) -> io::Result<()> {
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))
}

/// Connects to a destination listening at `addr`.
pub fn tcp_connect(addr: impl ToSocketAddrs, timeout: Duration) -> io::Result<TcpStream> {
    let addr: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let s = TcpStream::connect_timeout(&addr, timeout)?;
    tune_tcp(&s, timeout)?;
    Ok(s)
}

/// Accepts one source on `listener`.
pub fn tcp_accept(listener: &TcpListener, timeout: Duration) -> io::Result<TcpStream> {
    let (s, _) = listener.accept()?;
    tune_tcp(&s, timeout)?;
    Ok(s)
}

/// Connects the main stream and then `data` data streams, one after the other, to a destination
/// listening at `addr` (see [`crate::Source::run_streams`]).
pub fn tcp_connect_streams(
    addr: impl ToSocketAddrs,
    data: usize,
    timeout: Duration,
) -> io::Result<(TcpStream, Vec<TcpStream>)> {
    let addr: SocketAddr = addr
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "no address"))?;
    let main = tcp_connect(addr, timeout)?;
    let streams = (0..data).map(|_| tcp_connect(addr, timeout)).collect::<io::Result<_>>()?;
    Ok((main, streams))
}

/// Accepts a source's main stream and its `data` data streams, in the order
/// [`tcp_connect_streams`] makes them (each connection is accepted only after the one before it
/// was established, and a listener queues connections in that order).
pub fn tcp_accept_streams(
    listener: &TcpListener,
    data: usize,
    timeout: Duration,
) -> io::Result<(TcpStream, Vec<TcpStream>)> {
    let main = tcp_accept(listener, timeout)?;
    let streams = (0..data).map(|_| tcp_accept(listener, timeout)).collect::<io::Result<_>>()?;
    Ok((main, streams))
}

/// Connects to a Unix socket.
pub fn unix_connect(path: impl AsRef<Path>, timeout: Duration) -> io::Result<UnixStream> {
    let s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    Ok(s)
}

/// One end of an in-process transport.
#[derive(Debug)]
pub struct ChannelTransport {
    tx: Option<SyncSender<Vec<u8>>>,
    rx: Receiver<Vec<u8>>,
    chunk: Vec<u8>,
    pos: usize,
    timeout: Duration,
}

/// Two connected in-process transport ends (bounded: at most `depth` buffers in flight each way).
pub fn channel_pair(depth: usize, timeout: Duration) -> (ChannelTransport, ChannelTransport) {
    let (atx, brx) = sync_channel(depth);
    let (btx, arx) = sync_channel(depth);
    let end = |tx, rx| ChannelTransport { tx: Some(tx), rx, chunk: Vec::new(), pos: 0, timeout };
    (end(atx, arx), end(btx, brx))
}

impl Read for ChannelTransport {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.chunk.len() {
            match self.rx.recv_timeout(self.timeout) {
                Ok(c) => {
                    self.chunk = c;
                    self.pos = 0;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(0),
                Err(RecvTimeoutError::Timeout) => return Err(io::ErrorKind::TimedOut.into()),
            }
        }
        let n = buf.len().min(self.chunk.len() - self.pos);
        buf[..n].copy_from_slice(&self.chunk[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

impl Write for ChannelTransport {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let tx = self.tx.as_ref().ok_or(io::ErrorKind::BrokenPipe)?;
        tx.send(buf.to_vec()).map_err(|_| io::Error::from(io::ErrorKind::BrokenPipe))?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for ChannelTransport {
    fn close(&mut self) {
        self.tx = None;
    }
}
