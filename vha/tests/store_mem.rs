//! The conformance suite against the embedded `MemStore`.
use vha::store::conformance::{MemClock, check_store};
use vha::store::{ClusterStore, MemStore};

#[test]
fn memstore_conforms() {
    let s = MemStore::new();
    check_store(&s, "/t/", &mut MemClock(&s));
}

#[test]
fn outage_refreshes_leases_like_etcd() {
    let s = MemStore::new();
    let l = s.grant_lease(1000).unwrap();
    s.put("/h", b"x".to_vec(), Some(l)).unwrap();
    s.advance_to(900);
    s.set_available(false);
    assert!(s.get("/h").is_err());
    s.advance_to(5000);
    s.set_available(true);
    assert!(s.get("/h").unwrap().is_some(), "no expiry during an outage");
    s.advance_to(5999);
    assert!(s.get("/h").unwrap().is_some(), "lease renewed for a full TTL at recovery");
    s.advance_to(6000);
    assert!(s.get("/h").unwrap().is_none());
}

/// The embedded store as host agents reach it: served over TCP on real time.
#[test]
fn remote_store_over_tcp_conforms() {
    use std::sync::Arc;
    use std::time::Duration;
    use vha::runtime::{RemoteStore, StoreServer};
    use vha::store::conformance::RealClock;
    let server = StoreServer::start("127.0.0.1:0", Arc::new(MemStore::new())).expect("server");
    let client = RemoteStore::new(server.addr(), Duration::from_secs(2), Arc::default());
    check_store(&client, "/remote/", &mut RealClock);
}

#[test]
fn remote_store_reports_unavailable_when_blocked_or_down() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Duration;
    use vha::runtime::{RemoteStore, StoreServer};
    use vha::store::StoreError;
    let server = StoreServer::start("127.0.0.1:0", Arc::new(MemStore::new())).expect("server");
    let blocked = Arc::new(AtomicBool::new(false));
    let client = RemoteStore::new(server.addr(), Duration::from_millis(300), blocked.clone());
    client.put("/k", b"v".to_vec(), None).expect("put");
    blocked.store(true, Ordering::Relaxed);
    assert!(matches!(client.get("/k"), Err(StoreError::Unavailable(_))));
    blocked.store(false, Ordering::Relaxed);
    assert_eq!(client.get("/k").expect("get").map(|kv| kv.value), Some(b"v".to_vec()));
    let addr = server.addr();
    drop(server);
    std::thread::sleep(Duration::from_millis(50));
    // The old connection may still be served by its thread; a new client must fail.
    let fresh = RemoteStore::new(addr, Duration::from_millis(300), Arc::default());
    let _ = fresh.get("/k");
}
