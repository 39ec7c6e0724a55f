//! Storage vMotion to another host: a disk mirror writing through TCP to `serve_image` in
//! another thread, over loopback.

use std::fs::File;
use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use vmigrate::storage::image_size;
use vmigrate::stream::{FrameWriter, Message};
use vmigrate::transport::{DEFAULT_PEER_TIMEOUT, tcp_accept, tcp_connect};
use vmigrate::{DiskMirror, RemoteImage, StorageError, serve_image};

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
fn server(
    dst: PathBuf,
) -> (String, std::thread::JoinHandle<Result<vmigrate::storage::RemoteStats, StorageError>>) {
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
    use vmigrate::MirrorTarget;
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
    let res = srv.join().unwrap();
    assert!(matches!(res, Err(StorageError::Remote(ref r)) if r.contains("checksum")), "{res:?}");
    assert!(std::fs::read(&dst).unwrap().iter().all(|&b| b == 0), "the corrupt write never landed");
    let _ = std::fs::remove_file(path("oob"));
    let _ = std::fs::remove_file(dst);
}
