//! Mirroring a disk to another host: Storage vMotion without shared storage.
//!
//! The mirror's writes travel over one connection in the migration stream's frames
//! (checksummed, bounded): `DiskHello { size }`, then `DiskWrite { offset, data }` frames, each
//! answered by a `DiskAck(bytes)` (the far side's count of bytes written so far) once the bytes
//! are in the image on the far side, then `Complete`, answered after an `fsync`. The far side
//! applies frames in the order they arrive and acknowledges them in that order.
//!
//! Writes are pipelined: [`MirrorTarget::write_behind`] sends a frame and returns while up to
//! [`REMOTE_WINDOW_FRAMES`] frames and [`REMOTE_WINDOW_BYTES`] bytes are unacknowledged (the
//! bulk copy streams instead of waiting a round trip per block), and
//! [`MirrorTarget::write_at`] returns only once its write, and so every earlier one, is
//! acknowledged: a guest write the observer mirrors synchronously completes only once it is on
//! the other host (QEMU's `write-blocking`). [`serve_image`] is the far side: it writes into a
//! local file and refuses anything out of bounds or corrupt.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use super::{FileTarget, MirrorTarget, StorageError, io_err};
use crate::stream::{FrameReader, FrameWriter, MAX_DISK_WRITE, Message, StreamError};

/// Most `DiskWrite` frames a [`RemoteImage`] keeps unacknowledged by default (see
/// [`RemoteImage::with_window`]).
pub const REMOTE_WINDOW_FRAMES: usize = 32;
/// Most bytes of `DiskWrite` frames a [`RemoteImage`] keeps unacknowledged by default (one frame
/// larger than this still goes out, alone).
pub const REMOTE_WINDOW_BYTES: usize = 8 << 20;
/// Most frames [`RemoteImage::with_window`] accepts: the far side's acks for a full window must
/// fit in the socket buffers unread (see the note on `Session`'s methods).
const MAX_WINDOW_FRAMES: usize = 64;

/// An image on another host, written through [`serve_image`] there.
///
/// One connection carries every write in order. Writes through
/// [`MirrorTarget::write_behind`] are pipelined within a window of unacknowledged frames;
/// every acknowledgement is checked against the byte count it must carry. The first failure
/// (a refusal from the far side, a wrong acknowledgement, a broken connection) ends the session:
/// that call and every later one report it.
#[derive(Debug)]
pub struct RemoteImage<T: Read + Write + Send + std::fmt::Debug> {
    session: Mutex<Session<T>>,
    size: u64,
    peer: String,
    window_frames: usize,
    window_bytes: u64,
}

/// The connection and what is in flight on it.
#[derive(Debug)]
struct Session<T: Write> {
    /// Frames go out through this, one `write_all` each (no buffering: a frame counted as in
    /// flight is on the wire). Dropped, closing the connection, when the session ends: that
    /// also ends the far side's wait for us to go away after an `Abort` ([`serve_image`]).
    out: Option<FrameWriter<T>>,
    /// For each request not yet acknowledged, oldest first: the byte count its `DiskAck` must
    /// carry (bytes sent up to and including it).
    due: VecDeque<u64>,
    /// Bytes sent in `DiskWrite` frames.
    sent: u64,
    /// Bytes acknowledged.
    acked: u64,
    /// Why the session ended, reported by every call from then on.
    broken: Option<Broken>,
}

/// Why a session ended (kept to be reported again).
#[derive(Debug, Clone)]
enum Broken {
    /// The far side sent `Abort` with this reason.
    Refused(String),
    /// A `DiskAck` carried `acked` bytes where `expected` were due.
    AckMismatch { expected: u64, acked: u64 },
    /// The far side sent something else than the protocol allows, or closed mid-session.
    Protocol(String),
    /// Sending or receiving failed.
    Transport(ErrorKind, String),
}

impl Broken {
    /// The connection is gone (never seen: a session whose connection is closed has ended).
    fn closed() -> Broken {
        Broken::Protocol("the session has ended".into())
    }

    fn from_stream(e: StreamError, doing: &str) -> Broken {
        match e {
            StreamError::Closed => Broken::Protocol(format!("closed the connection while {doing}")),
            StreamError::Io(e) => Broken::Transport(e.kind(), format!("{doing}: {e}")),
            other => Broken::Protocol(format!("{doing}: {other}")),
        }
    }

    fn error(&self, peer: &str) -> StorageError {
        let peer = peer.to_string();
        match self {
            Broken::Refused(reason) => StorageError::Refused { peer, reason: reason.clone() },
            &Broken::AckMismatch { expected, acked } => StorageError::AckMismatch { peer, expected, acked },
            Broken::Protocol(what) => StorageError::Remote(format!("{peer}: {what}")),
            Broken::Transport(kind, msg) => StorageError::Io {
                what: "talking to the image host at",
                path: peer,
                source: std::io::Error::new(*kind, msg.clone()),
            },
        }
    }

    /// The error as the [`MirrorTarget`] methods return it: a [`StorageError`] inside an I/O
    /// error (which `DiskMirror` unwraps again).
    fn io(&self, peer: &str) -> std::io::Error {
        let kind = match self {
            Broken::Transport(kind, _) => *kind,
            Broken::Refused(_) => ErrorKind::Other,
            Broken::AckMismatch { .. } | Broken::Protocol(_) => ErrorKind::InvalidData,
        };
        std::io::Error::new(kind, self.error(peer))
    }
}

// Why the window cannot deadlock on one connection without a reader thread: the far side
// reads a frame, applies it, then writes one `DiskAck` (24 bytes) before reading the next. It
// can only block writing an ack if the acks we have not read yet fill the socket buffers, but
// there are never more unread acks than requests in flight, at most `window_frames` (32 by
// default, 64 at most: 1.5 KiB, and even at the kernel's ~1 KiB of accounting per tiny segment
// within a default receive buffer of 128 KiB). So the far side always gets back to reading,
// our sends (however large) always drain, and when the window is full we block reading acks it
// is bound to send.
impl<T: Read + Write> Session<T> {
    /// Sends `m` (`bytes` long in the image), expecting an ack for it later.
    fn send(&mut self, m: &Message<'_>, bytes: u64) -> Result<(), Broken> {
        let out = self.out.as_mut().ok_or_else(Broken::closed)?;
        if let Err(e) = out.message(m).and_then(|()| out.flush()) {
            let sent = Broken::from_stream(e, "sending");
            // If the far side went away after an `Abort`, its reason is waiting to be read (past
            // the acks before it); report that rather than the broken pipe.
            if let Broken::Transport(
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted,
                _,
            ) = sent
            {
                while !self.due.is_empty() {
                    match self.read_ack() {
                        Ok(()) => {}
                        Err(refused @ Broken::Refused(_)) => return Err(refused),
                        Err(_) => break,
                    }
                }
            }
            return Err(sent);
        }
        self.sent += bytes;
        self.due.push_back(self.sent);
        Ok(())
    }

    /// Reads the oldest outstanding acknowledgement and checks its byte count.
    fn read_ack(&mut self) -> Result<(), Broken> {
        let Some(&expected) = self.due.front() else {
            return Err(Broken::Protocol("reading an acknowledgement with none due".into()));
        };
        let out = self.out.as_mut().ok_or_else(Broken::closed)?;
        match FrameReader::new(out.get_mut()).read_frame() {
            Ok(Message::DiskAck(acked)) if acked == expected => {
                self.due.pop_front();
                self.acked = acked;
                Ok(())
            }
            Ok(Message::DiskAck(acked)) => Err(Broken::AckMismatch { expected, acked }),
            Ok(Message::Abort(reason)) => Err(Broken::Refused(reason)),
            Ok(other) => Err(Broken::Protocol(format!("sent {other:?} instead of DiskAck"))),
            Err(e) => {
                Err(Broken::from_stream(e, &format!("waiting for the acknowledgement of {expected} bytes")))
            }
        }
    }

    /// Sends `data` at `offset` in frames of at most [`MAX_DISK_WRITE`] bytes, first reading
    /// acks until each fits in the window (an empty window takes any frame).
    fn write(&mut self, data: &[u8], offset: u64, frames: usize, bytes: u64) -> Result<(), Broken> {
        let mut at = offset;
        for chunk in data.chunks(MAX_DISK_WRITE) {
            let len = chunk.len() as u64;
            while !self.due.is_empty() && (self.due.len() >= frames || self.sent - self.acked + len > bytes) {
                self.read_ack()?;
            }
            self.send(&Message::DiskWrite { offset: at, data: chunk }, len)?;
            at += len;
        }
        Ok(())
    }

    /// Reads acks until none is due.
    fn settle(&mut self) -> Result<(), Broken> {
        while !self.due.is_empty() {
            self.read_ack()?;
        }
        Ok(())
    }

    /// Runs `f` unless the session already ended; the first error ends it (and closes the
    /// connection).
    fn run(&mut self, f: impl FnOnce(&mut Self) -> Result<(), Broken>) -> Result<(), Broken> {
        if let Some(b) = &self.broken {
            return Err(b.clone());
        }
        f(self).inspect_err(|b| {
            self.broken = Some(b.clone());
            self.out = None;
        })
    }
}

impl<T: Read + Write + Send + std::fmt::Debug> RemoteImage<T> {
    /// Opens a session over `conn` for an image of `size` bytes (the source's size); the far
    /// side creates it. `peer` names it in errors. The window is [`REMOTE_WINDOW_FRAMES`] frames
    /// and [`REMOTE_WINDOW_BYTES`] bytes.
    pub fn connect(conn: T, size: u64, peer: &str) -> Result<Self, StorageError> {
        let mut s = Session {
            out: Some(FrameWriter::new(conn, 0)),
            due: VecDeque::new(),
            sent: 0,
            acked: 0,
            broken: None,
        };
        s.run(|s| {
            s.send(&Message::DiskHello { size }, 0)?;
            s.settle()
        })
        .map_err(|b| b.error(peer))?;
        Ok(RemoteImage {
            session: Mutex::new(s),
            size,
            peer: peer.to_string(),
            window_frames: REMOTE_WINDOW_FRAMES,
            window_bytes: REMOTE_WINDOW_BYTES as u64,
        })
    }

    /// Sets the window of unacknowledged writes: at most `frames` frames (1 to 64) and `bytes`
    /// bytes (at least 1; a single frame larger than `bytes` still goes out, alone). `(1, 1)`
    /// makes every write wait for the previous one's acknowledgement.
    pub fn with_window(mut self, frames: usize, bytes: usize) -> Self {
        self.window_frames = frames.clamp(1, MAX_WINDOW_FRAMES);
        self.window_bytes = bytes.max(1) as u64;
        self
    }

    fn with_session(&self, f: impl FnOnce(&mut Session<T>) -> Result<(), Broken>) -> std::io::Result<()> {
        let mut s = self.session.lock().unwrap_or_else(PoisonError::into_inner);
        s.run(f).map_err(|b| b.io(&self.peer))
    }
}

impl<T: Read + Write + Send + std::fmt::Debug> MirrorTarget for RemoteImage<T> {
    /// Sends the write and returns once it and every earlier one is acknowledged.
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let (frames, bytes) = (self.window_frames, self.window_bytes);
        self.with_session(|s| {
            s.write(data, offset, frames, bytes)?;
            s.settle()
        })
    }
    /// Sends the write; waits only for acknowledgements that make room in the window.
    fn write_behind(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        let (frames, bytes) = (self.window_frames, self.window_bytes);
        self.with_session(|s| s.write(data, offset, frames, bytes))
    }
    fn settle(&self) -> std::io::Result<()> {
        self.with_session(Session::settle)
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
    /// Settles, then has the far side `fsync` the image.
    fn sync(&self) -> std::io::Result<()> {
        self.with_session(|s| {
            s.settle()?;
            s.send(&Message::Complete, 0)?;
            s.settle()
        })
    }
    fn describe(&self) -> String {
        format!("remote image at {}", self.peer)
    }
}

/// What [`serve_image`] received.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct RemoteStats {
    /// Image size.
    pub size: u64,
    /// `DiskWrite` frames applied.
    pub writes: u64,
    /// Bytes written.
    pub bytes: u64,
    /// `Complete` requests (each an `fsync`).
    pub syncs: u64,
}

/// Serves one disk mirror session on `conn`: creates the image at `path` with the size the
/// mirror announces, applies its writes in order, acknowledges each with the bytes written so
/// far, and returns when the mirror closes the connection. A write outside the image or a
/// corrupt frame ends the session with an `Abort` to the mirror and an error here, returned
/// once the mirror has closed the connection (a [`RemoteImage`] does when it reads the
/// `Abort`) or it fails; the image is then incomplete.
pub fn serve_image<T: Read + Write>(mut conn: T, path: &Path) -> Result<RemoteStats, StorageError> {
    let mut stats = RemoteStats::default();
    let result = serve(&mut conn, path, &mut stats);
    if let Err(e) = &result {
        let _ = FrameWriter::new(&mut conn, 0).message(&Message::Abort(e.to_string()));
        // The mirror may have more writes in flight. Closing with them unread would reset the
        // connection, and a reset can take the `Abort` (and acks before it) away from the
        // mirror before it reads them: it would see a broken connection, not our reason. So
        // the writes are read and dropped until the mirror, having read the `Abort`, closes.
        let _ = std::io::copy(&mut conn, &mut std::io::sink());
    }
    result.map(|()| stats)
}

fn serve<T: Read + Write>(conn: &mut T, path: &Path, stats: &mut RemoteStats) -> Result<(), StorageError> {
    let p = path.display().to_string();
    let remote = |e: StreamError| StorageError::Remote(e.to_string());
    // One reader for the session (its buffer is reused from frame to frame) and one encoder
    // for the acks, handed to the connection one by one.
    let mut r = FrameReader::new(conn);
    let mut acks = FrameWriter::new(Vec::new(), 0);
    let mut ack = |r: &mut FrameReader<&mut T>, n: u64| -> Result<(), StorageError> {
        acks.message(&Message::DiskAck(n)).map_err(remote)?;
        let frame = acks.get_mut();
        let sent = r.get_mut().write_all(frame).and_then(|()| r.get_mut().flush());
        frame.clear();
        sent.map_err(|e| remote(StreamError::Io(e)))
    };
    let size = match r.read_frame().map_err(remote)? {
        Message::DiskHello { size } => size,
        other => return Err(StorageError::Remote(format!("{other:?} instead of DiskHello"))),
    };
    let image = FileTarget::create(path, size)?;
    stats.size = size;
    ack(&mut r, 0)?;
    loop {
        let msg = match r.read_frame() {
            Ok(m) => m,
            Err(StreamError::Closed) => return Ok(()),
            Err(e) => return Err(remote(e)),
        };
        match msg {
            Message::DiskWrite { offset, data } => {
                let end = offset.checked_add(data.len() as u64).filter(|&e| e <= size);
                if end.is_none() {
                    return Err(StorageError::Remote(format!(
                        "write of {} bytes at {offset} outside the {size}-byte image",
                        data.len()
                    )));
                }
                image.write_at(data, offset).map_err(io_err("writing", &p))?;
                stats.writes += 1;
                stats.bytes += data.len() as u64;
            }
            Message::Complete => {
                image.sync().map_err(io_err("syncing", &p))?;
                stats.syncs += 1;
            }
            other => return Err(StorageError::Remote(format!("{other:?} in a disk mirror session"))),
        }
        ack(&mut r, stats.bytes)?;
    }
}
