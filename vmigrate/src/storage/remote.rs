//! Mirroring a disk to another host: Storage vMotion without shared storage.
//!
//! The mirror's writes travel over a connection in the migration stream's frames (checksummed,
//! bounded): `DiskHello { size }`, then `DiskWrite { offset, data }` frames, each answered by a
//! `DiskAck` once the bytes are in the image on the far side, then `Complete`, answered after
//! an `fsync`. Every write waits for its acknowledgement, so a guest write the observer mirrors
//! synchronously completes only once it is on the other host (QEMU's `write-blocking`).
//! [`serve_image`] is the far side: it writes into a local file and refuses anything out of
//! bounds or corrupt.

use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Mutex, PoisonError};

use serde::Serialize;

use super::{FileTarget, MirrorTarget, StorageError, io_err};
use crate::stream::{FrameReader, FrameWriter, Message, StreamError};

/// An image on another host, written through [`serve_image`] there.
#[derive(Debug)]
pub struct RemoteImage<T: Read + Write + Send + std::fmt::Debug> {
    conn: Mutex<T>,
    size: u64,
    peer: String,
}

/// Turns a stream error or a refusal into an I/O error for the mirror.
fn stream_to_io(e: StreamError) -> std::io::Error {
    match e {
        StreamError::Io(e) => e,
        other => std::io::Error::other(other.to_string()),
    }
}

impl<T: Read + Write + Send + std::fmt::Debug> RemoteImage<T> {
    /// Opens a session over `conn` for an image of `size` bytes (the source's size); the far
    /// side creates it. `peer` names it in errors.
    pub fn connect(mut conn: T, size: u64, peer: &str) -> Result<Self, StorageError> {
        FrameWriter::new(&mut conn, 0)
            .message(&Message::DiskHello { size })
            .and_then(|_| expect_ack(&mut conn))
            .map_err(|e| StorageError::Remote(format!("{peer}: {e}")))?;
        Ok(RemoteImage { conn: Mutex::new(conn), size, peer: peer.to_string() })
    }

    fn request(&self, m: &Message<'_>) -> std::io::Result<u64> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        FrameWriter::new(&mut *conn, 0).message(m).map_err(stream_to_io)?;
        expect_ack(&mut *conn).map_err(stream_to_io)
    }
}

/// Reads the far side's answer: `DiskAck(bytes)`, or its refusal.
fn expect_ack(conn: &mut impl Read) -> Result<u64, StreamError> {
    match FrameReader::new(conn).read_frame()? {
        Message::DiskAck(n) => Ok(n),
        Message::Abort(reason) => Err(StreamError::Io(std::io::Error::other(format!("refused: {reason}")))),
        other => Err(StreamError::Io(std::io::Error::other(format!("{other:?} instead of DiskAck")))),
    }
}

impl<T: Read + Write + Send + std::fmt::Debug> MirrorTarget for RemoteImage<T> {
    fn write_at(&self, data: &[u8], offset: u64) -> std::io::Result<()> {
        for (i, chunk) in data.chunks(crate::stream::MAX_DISK_WRITE).enumerate() {
            let at = offset + (i * crate::stream::MAX_DISK_WRITE) as u64;
            self.request(&Message::DiskWrite { offset: at, data: chunk })?;
        }
        Ok(())
    }
    fn size(&self) -> std::io::Result<u64> {
        Ok(self.size)
    }
    fn sync(&self) -> std::io::Result<()> {
        self.request(&Message::Complete).map(|_| ())
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
/// mirror announces, applies its writes, acknowledges each, and returns when the mirror closes
/// the connection. A write outside the image or a corrupt frame ends the session with an
/// `Abort` to the mirror and an error here; the image is then incomplete.
pub fn serve_image<T: Read + Write>(mut conn: T, path: &Path) -> Result<RemoteStats, StorageError> {
    let mut stats = RemoteStats::default();
    let result = serve(&mut conn, path, &mut stats);
    if let Err(e) = &result {
        let _ = FrameWriter::new(&mut conn, 0).message(&Message::Abort(e.to_string()));
    }
    result.map(|()| stats)
}

fn serve<T: Read + Write>(conn: &mut T, path: &Path, stats: &mut RemoteStats) -> Result<(), StorageError> {
    let p = path.display().to_string();
    let remote = |e: StreamError| StorageError::Remote(e.to_string());
    let size = match FrameReader::new(&mut *conn).read_frame().map_err(remote)? {
        Message::DiskHello { size } => size,
        other => return Err(StorageError::Remote(format!("{other:?} instead of DiskHello"))),
    };
    let image = FileTarget::create(path, size)?;
    stats.size = size;
    FrameWriter::new(&mut *conn, 0).message(&Message::DiskAck(0)).map_err(remote)?;
    loop {
        let mut r = FrameReader::new(&mut *conn);
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
        drop(r);
        FrameWriter::new(&mut *conn, 0).message(&Message::DiskAck(stats.bytes)).map_err(remote)?;
    }
}
