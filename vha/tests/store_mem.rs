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
    assert!(
        s.get("/h").unwrap().is_some(),
        "lease renewed for a full TTL at recovery"
    );
    s.advance_to(6000);
    assert!(s.get("/h").unwrap().is_none());
}
