//! Shared helpers for vdevices' harness tests.
#![allow(dead_code)]

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use vdevices::testing::{Driver, guest_memory};
use vdevices::{EventLoop, MmioTransport, VirtioDevice};

/// A device behind a transport, served by an event loop, driven by the harness.
pub struct Rig {
    pub events: EventLoop,
    pub driver: Driver,
}

pub fn rig(device: Box<dyn VirtioDevice>) -> Rig {
    let mem = guest_memory(16);
    let transport = MmioTransport::new(mem.clone(), device).unwrap();
    let events = EventLoop::start().unwrap();
    events.add(Arc::new(transport.clone())).unwrap();
    let driver = Driver::new(mem, transport).unwrap();
    Rig { events, driver }
}

/// Waits until the event loop has served the notification the transport gives itself at
/// `DRIVER_OK` (for buffers posted before it). Requests posted after this are served by the
/// test's own notification only, all together: tests that count merged requests need that, or
/// a busy host can let that first serve take the first request alone. (`stats` takes the
/// transport's lock, which a serve holds throughout, so a count of one means it is over.)
pub fn settle(r: &Rig) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while r.driver.transport().stats().notifications == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
}

/// A temporary file with `len` bytes of a recognizable pattern.
pub fn temp_image(name: &str, len: usize) -> PathBuf {
    let p = std::env::temp_dir().join(format!("vdevices-{}-{name}", std::process::id()));
    let data: Vec<u8> = (0..len).map(|i| (i / 512) as u8 ^ (i as u8)).collect();
    std::fs::File::create(&p).unwrap().write_all(&data).unwrap();
    p
}

/// A writer whose bytes a test can read.
#[derive(Clone, Default)]
pub struct Sink(pub Arc<Mutex<Vec<u8>>>);

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Sink {
    pub fn bytes(&self) -> Vec<u8> {
        self.0.lock().unwrap().clone()
    }
}

/// A virtio-blk request header.
pub fn blk_hdr(kind: u32, sector: u64) -> Vec<u8> {
    let mut h = kind.to_le_bytes().to_vec();
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&sector.to_le_bytes());
    h
}
