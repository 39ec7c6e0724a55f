//! Storage vMotion to another host: a disk mirror writing through TCP to `serve_image` in
//! another thread, over loopback. Writes are pipelined within a window of unacknowledged frames;
//! stand-in image hosts check the window, wrong acknowledgements and hosts that fail midway.

use std::fs::File;
use std::io::{ErrorKind, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::thread::JoinHandle;
use std::time::Duration;

use proptest::prelude::*;
use vmigrate::storage::image_size;
use vmigrate::stream::{FrameReader, FrameWriter, Message, StreamError};
use vmigrate::transport::{DEFAULT_PEER_TIMEOUT, tcp_accept, tcp_connect};
use vmigrate::{DiskMirror, MirrorTarget, RemoteImage, StorageError, serve_image};

fn path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("vmigrate-remote-{}-{name}", std::process::id()))
}

fn image(name: &str, len: usize) -> PathBuf {
    let p = path(name);
    std::fs::write(&p, (0..len).map(|i| (i * 13 + i / 4093) as u8).collect::<Vec<u8>>()).unwrap();
    p
}

/// Serves one session into `dst` on a loopback port; returns the port's address and the
/// server's outcome.
fn server(dst: PathBuf) -> (String, JoinHandle<Result<vmigrate::storage::RemoteStats, StorageError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t =
        std::thread::spawn(move || serve_image(tcp_accept(&listener, DEFAULT_PEER_TIMEOUT).unwrap(), &dst));
    (addr, t)
}

#[test]
fn a_disk_mirrors_to_another_host_while_the_guest_writes() {
    let src = image("src", (4 << 20) + 777);
    let dst = path("dst");
    let (addr, srv) = server(dst.clone());
    let size = image_size(&src).unwrap();
    let target =
        RemoteImage::connect(tcp_connect(&addr, DEFAULT_PEER_TIMEOUT).unwrap(), size, &addr).unwrap();
    let m = DiskMirror::to_target(&src, Box::new(target), 64 << 10).unwrap();
    let observer = m.observer();
    // A "guest" writes to the source while the mirror copies, reporting each write.
    let writer = {
        let src = src.clone();
        std::thread::spawn(move || {
            let f = File::options().write(true).open(&src).unwrap();
            for i in 0..200u64 {
                let at = (i * 92_821) % (size - 4096);
                f.write_all_at(&[i as u8; 4096], at).unwrap();
                observer(at, 4096);
            }
        })
    };
    let stats = m.run(4, |_, _| {}).unwrap();
    writer.join().unwrap();
    assert!(m.is_ready());
    m.check().unwrap();
    m.sync().unwrap();
    assert!(stats.blocks_copied >= 65, "every block copied at least once: {stats:?}");
    drop(m);
    let served = srv.join().unwrap().unwrap();
    assert_eq!((served.size, served.syncs), (size, 1));
    assert_eq!(
        std::fs::read(&src).unwrap(),
        std::fs::read(&dst).unwrap(),
        "the remote image equals the source"
    );
    let _ = std::fs::remove_file(src);
    let _ = std::fs::remove_file(dst);
}

#[test]
fn the_image_host_refuses_writes_out_of_bounds_and_corrupt_frames() {
    // Out of bounds: the host aborts, the mirror gets an error.
    let dst = path("oob");
    let (addr, srv) = server(dst.clone());
    let target =
        RemoteImage::connect(tcp_connect(&addr, DEFAULT_PEER_TIMEOUT).unwrap(), 8192, &addr).unwrap();
    let err = target.write_at(&[1; 4096], 8192).unwrap_err();
    assert!(err.to_string().contains("outside"), "{err}");
    assert!(matches!(srv.join().unwrap(), Err(StorageError::Remote(r)) if r.contains("outside")));

    // A flipped byte in a write frame: the checksum refuses it; nothing of it is written.
    let dst = path("corrupt");
    let (addr, srv) = server(dst.clone());
    let mut conn = tcp_connect(&addr, DEFAULT_PEER_TIMEOUT).unwrap();
    let mut frames = Vec::new();
    let mut w = FrameWriter::new(&mut frames, 0);
    w.message(&Message::DiskHello { size: 8192 }).unwrap();
    w.message(&Message::DiskWrite { offset: 0, data: &[7; 4096] }).unwrap();
    drop(w);
    let last = frames.len() - 100;
    frames[last] ^= 0x20;
    conn.write_all(&frames).unwrap();
    drop(conn);
    let res = srv.join().unwrap();
    assert!(matches!(res, Err(StorageError::Remote(ref r)) if r.contains("checksum")), "{res:?}");
    assert!(std::fs::read(&dst).unwrap().iter().all(|&b| b == 0), "the corrupt write never landed");
    let _ = std::fs::remove_file(path("oob"));
    let _ = std::fs::remove_file(dst);
}

/// A connection to `serve_image` on a fresh loopback port, and the server's outcome.
fn remote(
    dst: PathBuf,
    size: u64,
) -> (RemoteImage<TcpStream>, JoinHandle<Result<vmigrate::storage::RemoteStats, StorageError>>) {
    let (addr, srv) = server(dst);
    let target =
        RemoteImage::connect(tcp_connect(&addr, DEFAULT_PEER_TIMEOUT).unwrap(), size, &addr).unwrap();
    (target, srv)
}

/// The `StorageError` a `MirrorTarget` method's I/O error carries.
fn storage_error(e: std::io::Error) -> StorageError {
    e.downcast::<StorageError>().unwrap_or_else(|e| panic!("no StorageError in {e:?}"))
}

/// The far side of a session, played by the test: frames in, acks and aborts out.
struct FakeHost {
    frames: FrameReader<TcpStream>,
    out: TcpStream,
    /// Bytes of `DiskWrite` frames received.
    bytes: u64,
}

impl FakeHost {
    /// Reads the next frame: `Some(bytes)` for a `DiskWrite`, `None` for `Complete`.
    fn next(&mut self) -> Result<Option<u64>, StreamError> {
        match self.frames.read_frame()? {
            Message::DiskWrite { data, .. } => {
                self.bytes += data.len() as u64;
                Ok(Some(data.len() as u64))
            }
            Message::Complete => Ok(None),
            other => panic!("{other:?} from the mirror"),
        }
    }

    fn send(&mut self, m: &Message<'_>) {
        let mut frame = Vec::new();
        FrameWriter::new(&mut frame, 0).message(m).unwrap();
        self.out.write_all(&frame).unwrap();
    }

    fn ack(&mut self, n: u64) {
        self.send(&Message::DiskAck(n));
    }

    /// Refuses with `reason`, then, like `serve_image`, drops whatever the mirror still sends
    /// until it closes the connection.
    fn abort(mut self, reason: &str) {
        self.send(&Message::Abort(reason.into()));
        let _ = std::io::copy(self.frames.get_mut(), &mut std::io::sink());
    }

    /// Acks every frame with the right count until the mirror closes the connection.
    fn serve_rest(&mut self) {
        while self.next().is_ok() {
            self.ack(self.bytes);
        }
    }
}

/// Runs `host` as the image host on a fresh loopback port, after the `DiskHello` handshake; the
/// mirror's end comes back with a window of `frames` frames and `bytes` bytes.
fn fake_host<R: Send + 'static>(
    size: u64,
    frames: usize,
    bytes: usize,
    host: impl FnOnce(FakeHost) -> R + Send + 'static,
) -> (RemoteImage<TcpStream>, JoinHandle<R>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let t = std::thread::spawn(move || {
        let conn = tcp_accept(&listener, DEFAULT_PEER_TIMEOUT).unwrap();
        let out = conn.try_clone().unwrap();
        let mut h = FakeHost { frames: FrameReader::new(conn), out, bytes: 0 };
        assert!(matches!(h.frames.read_frame().unwrap(), Message::DiskHello { size: s } if s == size));
        h.ack(0);
        host(h)
    });
    let target = RemoteImage::connect(tcp_connect(&addr, DEFAULT_PEER_TIMEOUT).unwrap(), size, &addr)
        .unwrap()
        .with_window(frames, bytes);
    (target, t)
}

#[test]
fn a_bulk_copy_with_many_writes_in_flight_ends_with_the_images_equal() {
    // 4 KiB blocks: over a thousand writes, up to the window's 32 in flight; then a window of
    // 3 frames or 10,000 bytes (two blocks), then no pipelining at all.
    for (i, window) in [None, Some((3, 10_000)), Some((1, 1))].into_iter().enumerate() {
        let src = image(&format!("bulk-src-{i}"), (4 << 20) + 1000);
        let dst = path(&format!("bulk-dst-{i}"));
        let size = image_size(&src).unwrap();
        let (mut target, srv) = remote(dst.clone(), size);
        if let Some((frames, bytes)) = window {
            target = target.with_window(frames, bytes);
        }
        let m = DiskMirror::to_target(&src, Box::new(target), 4096).unwrap();
        let stats = m.run(2, |_, _| {}).unwrap();
        assert!(m.is_ready());
        assert_eq!(stats.blocks_copied, 1025, "{window:?}");
        // Ready means on the far side already: no sync needed to compare.
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap(), "{window:?}");
        drop(m);
        let served = srv.join().unwrap().unwrap();
        assert_eq!((served.writes, served.bytes, served.syncs), (1025, size, 0));
        let _ = std::fs::remove_file(src);
        let _ = std::fs::remove_file(dst);
    }
}

#[test]
fn the_window_bounds_the_writes_in_flight() {
    // (window frames, window bytes, write length, writes in flight when the window is full)
    for (frames, bytes, len, in_flight) in [(4, 1 << 20, 4096, 4), (100, 10_000, 4096, 2), (5, 100, 4096, 1)]
    {
        let (target, host) = fake_host(1 << 20, frames, bytes, move |mut h| {
            // Withhold every ack: exactly `in_flight` writes arrive, then nothing.
            for _ in 0..in_flight {
                assert_eq!(h.next().unwrap(), Some(len));
            }
            h.frames.get_mut().set_read_timeout(Some(Duration::from_millis(200))).unwrap();
            match h.next() {
                Err(StreamError::Io(e))
                    if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                other => panic!("a write beyond the window of {frames} frames, {bytes} bytes: {other:?}"),
            }
            h.frames.get_mut().set_read_timeout(Some(DEFAULT_PEER_TIMEOUT)).unwrap();
            // One ack makes room for one more write.
            h.ack(len);
            assert_eq!(h.next().unwrap(), Some(len));
            let mut acked = len;
            while acked < h.bytes {
                acked += len;
                h.ack(acked);
            }
            h.serve_rest();
            h.bytes
        });
        for i in 0..10u64 {
            target.write_behind(&vec![i as u8; len as usize], i * len).unwrap();
        }
        target.settle().unwrap();
        target.sync().unwrap();
        drop(target);
        assert_eq!(host.join().unwrap(), 10 * len);
    }
}

#[test]
fn a_wrong_acknowledgement_is_an_error_and_stays_one() {
    let (target, host) = fake_host(1 << 20, 32, 8 << 20, |mut h| {
        h.next().unwrap();
        h.next().unwrap();
        // The first write is acknowledged twice, the second never.
        h.ack(4096);
        h.ack(4096);
        h.serve_rest();
    });
    target.write_behind(&[1; 4096], 0).unwrap();
    target.write_behind(&[2; 4096], 4096).unwrap();
    let e = storage_error(target.settle().unwrap_err());
    assert!(matches!(e, StorageError::AckMismatch { expected: 8192, acked: 4096, .. }), "{e}");
    for e in [target.settle(), target.write_at(&[3; 512], 0), target.sync()] {
        assert!(matches!(storage_error(e.unwrap_err()), StorageError::AckMismatch { .. }));
    }
    drop(target);
    host.join().unwrap();
}

#[test]
fn an_abort_in_the_middle_of_the_window_fails_settle_and_every_later_call() {
    let dst = path("abort-window");
    let (target, srv) = remote(dst.clone(), 1 << 20);
    let mut first_error = None;
    // Ten writes, one out of bounds, ten more: all within the window, so the calls may well
    // return before the image host has even read them.
    for i in 0..21u64 {
        let at = if i == 10 { 1 << 20 } else { i * 4096 };
        if let Err(e) = target.write_behind(&[i as u8 + 1; 4096], at) {
            first_error.get_or_insert(e);
        }
    }
    let e = storage_error(first_error.unwrap_or_else(|| target.settle().unwrap_err()));
    assert!(matches!(&e, StorageError::Refused { reason, .. } if reason.contains("outside")), "{e}");
    for e in
        [target.settle(), target.write_at(&[1; 512], 0), target.write_behind(&[1; 512], 0), target.sync()]
    {
        let e = storage_error(e.unwrap_err());
        assert!(matches!(&e, StorageError::Refused { reason, .. } if reason.contains("outside")), "{e}");
    }
    assert!(matches!(srv.join().unwrap(), Err(StorageError::Remote(r)) if r.contains("outside")));
    // The writes before the refused one landed, none after it.
    let img = std::fs::read(&dst).unwrap();
    for i in 0..20usize {
        let expect = if i < 10 { i as u8 + 1 } else { 0 };
        assert!(img[i * 4096..(i + 1) * 4096].iter().all(|&b| b == expect), "block {i}");
    }
    drop(target);
    let _ = std::fs::remove_file(dst);
}

#[test]
fn writes_after_the_image_host_went_away_report_its_reason() {
    // The refusal is read behind the broken connection: the writes fail to send (or fill the
    // window), and the error is still the host's reason.
    let (target, host) = fake_host(1 << 20, 1000, 1 << 30, |mut h| {
        h.next().unwrap();
        h.ack(4096);
        h.next().unwrap();
        h.send(&Message::Abort("disk full".into()));
    });
    target.write_behind(&[1; 4096], 0).unwrap();
    target.write_behind(&[2; 4096], 4096).unwrap();
    host.join().unwrap();
    let mut result = Ok(());
    for i in 0..1000u64 {
        result = target.write_behind(&[3; 4096], i * 4096 % (1 << 20));
        if result.is_err() {
            break;
        }
    }
    let e = storage_error(result.err().unwrap_or_else(|| target.settle().unwrap_err()));
    assert!(matches!(&e, StorageError::Refused { reason, .. } if reason == "disk full"), "{e}");
}

#[test]
fn a_mirror_whose_image_host_fails_midway_reports_it_and_leaves_the_source_alone() {
    // The host applies 50 writes, then either refuses the next one or just goes away.
    for (i, abort) in [true, false].into_iter().enumerate() {
        let src = image(&format!("midway-src-{i}"), 4 << 20);
        let before = std::fs::read(&src).unwrap();
        let (target, host) = fake_host(4 << 20, 32, 8 << 20, move |mut h| {
            for _ in 0..50 {
                h.next().unwrap();
                h.ack(h.bytes);
            }
            h.next().unwrap();
            if abort {
                h.abort("disk full");
            }
        });
        let m = DiskMirror::to_target(&src, Box::new(target), 4096).unwrap();
        let err = m.run(2, |_, _| {}).unwrap_err();
        if abort {
            assert!(matches!(&err, StorageError::Refused { reason, .. } if reason == "disk full"), "{err:?}");
        } else {
            assert!(
                matches!(&err, StorageError::Remote(_) | StorageError::Io { .. }),
                "a host that went away: {err}"
            );
        }
        assert!(!m.is_ready());
        assert!(m.sync().is_err(), "the session stays broken");
        host.join().unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), before, "the source image is untouched");
        let _ = std::fs::remove_file(src);
    }
}

#[test]
fn a_guest_write_the_image_host_refuses_is_reported_with_its_reason() {
    let src = image("refused-guest-src", 1 << 20);
    // The host takes the bulk copy (16 blocks), then refuses the first mirrored guest write.
    let (target, host) = fake_host(1 << 20, 32, 8 << 20, |mut h| {
        while h.bytes < 1 << 20 {
            h.next().unwrap();
            h.ack(h.bytes);
        }
        h.next().unwrap();
        h.abort("disk full");
    });
    let m = DiskMirror::to_target(&src, Box::new(target), 64 << 10).unwrap();
    m.run(2, |_, _| {}).unwrap();
    assert!(m.is_ready());
    (m.observer())(8192, 4096);
    match m.check() {
        Err(StorageError::Mirror { offset: 8192, len: 4096, source }) => {
            assert!(source.to_string().contains("disk full"), "{source}")
        }
        other => panic!("{other:?}"),
    }
    host.join().unwrap();
    let _ = std::fs::remove_file(src);
}

#[test]
fn a_write_larger_than_a_frame_goes_in_several_and_lands_whole() {
    let size = (17 << 20) + 5;
    let dst = path("large");
    let (target, srv) = remote(dst.clone(), size);
    let data: Vec<u8> = (0..size as usize - 3).map(|i| (i * 31 + i / 65_521) as u8).collect();
    target.write_behind(&data, 3).unwrap();
    target.settle().unwrap();
    assert_eq!(&std::fs::read(&dst).unwrap()[3..], &data[..]);
    target.write_at(&data[..(16 << 20) + 1], 0).unwrap();
    assert_eq!(&std::fs::read(&dst).unwrap()[..(16 << 20) + 1], &data[..(16 << 20) + 1]);
    drop(target);
    let served = srv.join().unwrap().unwrap();
    assert_eq!(served.writes, 4, "16 MiB, then the rest, twice");
    let _ = std::fs::remove_file(dst);
}

/// One step of the property test.
#[derive(Debug, Clone)]
enum Op {
    /// `write_behind` of `len` bytes of `fill` at `offset`.
    Behind {
        offset: u64,
        len: usize,
        fill: u8,
    },
    /// `write_at`, likewise.
    At {
        offset: u64,
        len: usize,
        fill: u8,
    },
    Settle,
}

const PROP_SIZE: u64 = (64 << 10) + 100;

fn op_strategy() -> impl Strategy<Value = Op> {
    let write = (0..PROP_SIZE, 1usize..20_000, any::<u8>())
        .prop_map(|(offset, len, fill)| (offset, len.min((PROP_SIZE - offset) as usize), fill));
    prop_oneof![
        6 => write.clone().prop_map(|(offset, len, fill)| Op::Behind { offset, len, fill }),
        2 => write.prop_map(|(offset, len, fill)| Op::At { offset, len, fill }),
        1 => Just(Op::Settle),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Any mix of pipelined and synchronous writes leaves the far image equal to a local model,
    /// and whenever `write_at` or `settle` returns, the far image already equals it.
    #[test]
    fn pipelined_and_synchronous_writes_land_like_a_local_model(
        ops in proptest::collection::vec(op_strategy(), 1..60),
        frames in 1usize..40,
        bytes in prop_oneof![Just(1usize), 1usize..100_000, Just(8 << 20)],
    ) {
        let dst = path("prop");
        let (target, srv) = remote(dst.clone(), PROP_SIZE);
        let target = target.with_window(frames, bytes);
        let mut model = vec![0u8; PROP_SIZE as usize];
        for op in &ops {
            match *op {
                Op::Behind { offset, len, fill } | Op::At { offset, len, fill } => {
                    let data = vec![fill; len];
                    if matches!(op, Op::At { .. }) {
                        target.write_at(&data, offset).unwrap();
                    } else {
                        target.write_behind(&data, offset).unwrap();
                    }
                    model[offset as usize..offset as usize + len].copy_from_slice(&data);
                }
                Op::Settle => target.settle().unwrap(),
            }
            if !matches!(op, Op::Behind { .. }) {
                prop_assert!(std::fs::read(&dst).unwrap() == model, "after {op:?}");
            }
        }
        target.sync().unwrap();
        drop(target);
        let served = srv.join().unwrap().unwrap();
        prop_assert_eq!(served.syncs, 1);
        prop_assert!(std::fs::read(&dst).unwrap() == model);
        let _ = std::fs::remove_file(dst);
    }
}
