//! Serves a [`MemStore`] over TCP on loopback, on real time.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use super::RuntimeError;
use super::wire::{Request, serve};
use crate::store::{MemStore, StoreError};

/// A running store server: a listener thread, a thread per client and a clock thread that
/// advances the store's time (lease expiry) every 10 ms. Stops when dropped.
#[derive(Debug)]
pub struct StoreServer {
    addr: SocketAddr,
    store: Arc<MemStore>,
    stop: Arc<AtomicBool>,
}

impl StoreServer {
    /// Binds `addr` (use port 0 for any free port) and starts serving `store`.
    pub fn start(addr: &str, store: Arc<MemStore>) -> Result<Self, RuntimeError> {
        let listener = TcpListener::bind(addr)
            .map_err(|source| RuntimeError::Io { what: format!("binding store server {addr}"), source })?;
        let local = listener
            .local_addr()
            .map_err(|source| RuntimeError::Io { what: "store server address".into(), source })?;
        let stop = Arc::new(AtomicBool::new(false));
        let (s, st) = (store.clone(), stop.clone());
        thread::spawn(move || {
            let t0 = Instant::now();
            while !st.load(Ordering::Relaxed) {
                s.advance_to(t0.elapsed().as_millis() as u64);
                thread::sleep(Duration::from_millis(10));
            }
        });
        let (s, st) = (store.clone(), stop.clone());
        thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                let s = s.clone();
                thread::spawn(move || handle(conn, &s));
            }
        });
        Ok(Self { addr: local, store, stop })
    }

    /// The address clients connect to.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The served store.
    pub fn store(&self) -> &Arc<MemStore> {
        &self.store
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_millis(100));
    }
}

fn handle(conn: TcpStream, store: &MemStore) {
    let _ = conn.set_nodelay(true);
    let Ok(mut w) = conn.try_clone() else { return };
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    loop {
        line.clear();
        match r.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        let resp = match serde_json::from_str::<Request>(&line) {
            Ok(req) => serve(store, req),
            Err(e) => Err(StoreError::Invalid(format!("bad request: {e}"))),
        };
        let Ok(mut out) = serde_json::to_vec(&resp) else {
            return;
        };
        out.push(b'\n');
        if w.write_all(&out).is_err() {
            return;
        }
    }
}
