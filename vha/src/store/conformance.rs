//! The conformance suite every [`ClusterStore`] backend must pass (feature `test-utils`).
//!
//! Run it with a fresh key prefix per run, so a shared backend such as etcd can be reused:
//! `check_store(&store, "/test/run-42/", &mut clock)`.

use super::{ClusterStore, Compare, LeaseId, StoreError, Txn, TxnOp, WatchEvent, WatchId};

/// How the suite lets time pass: virtual for [`super::MemStore`], a real sleep for etcd.
pub trait StoreClock {
    /// Lets `ms` milliseconds pass.
    fn sleep_ms(&mut self, ms: u64);
}

/// Real time: sleeps the calling thread.
#[derive(Debug, Default)]
pub struct RealClock;

impl StoreClock for RealClock {
    fn sleep_ms(&mut self, ms: u64) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
    }
}

/// Virtual time for a [`super::MemStore`].
#[derive(Debug)]
pub struct MemClock<'a>(pub &'a super::MemStore);

impl StoreClock for MemClock<'_> {
    fn sleep_ms(&mut self, ms: u64) {
        let now = self.0.now_ms();
        self.0.advance_to(now + ms);
    }
}

fn drain_until<S: ClusterStore>(
    s: &S,
    w: WatchId,
    want: usize,
    clock: &mut dyn StoreClock,
) -> Vec<WatchEvent> {
    let mut got = Vec::new();
    for _ in 0..300 {
        got.extend(s.poll_watch(w).expect("poll_watch"));
        if got.len() >= want {
            break;
        }
        clock.sleep_ms(10);
    }
    got
}

/// Runs every check against `s`. Panics with a description of the first broken rule.
pub fn check_store<S: ClusterStore>(s: &S, prefix: &str, clock: &mut dyn StoreClock) {
    check_kv(s, prefix);
    check_txn(s, prefix);
    check_leases(s, prefix, clock);
    check_watch(s, prefix, clock);
}

/// Plain keys: revisions, versions, prefix reads, deletes.
pub fn check_kv<S: ClusterStore>(s: &S, p: &str) {
    let k = format!("{p}kv/a");
    assert_eq!(s.get(&k).unwrap(), None, "fresh key must be absent");
    let r1 = s.put(&k, b"1".to_vec(), None).unwrap();
    assert!(r1 > 0, "put returns a positive revision");
    let kv = s.get(&k).unwrap().expect("key after put");
    assert_eq!(kv.value, b"1");
    assert_eq!(kv.create_revision, r1);
    assert_eq!(kv.mod_revision, r1);
    assert_eq!(kv.version, 1);
    assert_eq!(kv.lease, None);
    let r2 = s.put(&k, b"2".to_vec(), None).unwrap();
    assert!(r2 > r1, "revisions increase");
    let kv = s.get(&k).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.mod_revision, kv.version), (r1, r2, 2));
    assert!(s.revision().unwrap() >= r2);

    s.put(&format!("{p}kv/b"), b"b".to_vec(), None).unwrap();
    s.put(&format!("{p}kx"), b"x".to_vec(), None).unwrap();
    let (kvs, rev) = s.get_prefix(&format!("{p}kv/")).unwrap();
    let keys: Vec<_> = kvs.iter().map(|kv| kv.key.clone()).collect();
    assert_eq!(keys, vec![format!("{p}kv/a"), format!("{p}kv/b")], "prefix read is sorted, exact");
    assert!(rev >= r2);

    let (r3, existed) = s.delete(&k).unwrap();
    assert!(existed && r3 > r2);
    assert_eq!(s.get(&k).unwrap(), None);
    let (_, existed) = s.delete(&k).unwrap();
    assert!(!existed, "deleting an absent key reports it");
    let r4 = s.put(&k, b"3".to_vec(), None).unwrap();
    let kv = s.get(&k).unwrap().unwrap();
    assert_eq!((kv.create_revision, kv.version), (r4, 1), "re-created key starts over");
    assert!(matches!(s.put("", vec![], None), Err(StoreError::Invalid(_))), "empty key rejected");
}

/// Compare-and-swap transactions.
pub fn check_txn<S: ClusterStore>(s: &S, p: &str) {
    let k = format!("{p}txn/owner");
    let create = |v: &[u8]| {
        Txn::new()
            .when(Compare::absent(&k))
            .and_then(TxnOp::Put { key: k.clone(), value: v.to_vec(), lease: None })
            .or_else(TxnOp::Get { key: k.clone() })
    };
    let r = s.txn(create(b"a")).unwrap();
    assert!(r.succeeded, "create-if-absent succeeds on an absent key");
    let token = r.revision;
    assert_eq!(s.get(&k).unwrap().unwrap().mod_revision, token, "txn revision is the key's");
    let r = s.txn(create(b"b")).unwrap();
    assert!(!r.succeeded, "second create-if-absent fails");
    assert_eq!(r.gets.len(), 1);
    assert_eq!(r.gets[0].as_ref().unwrap().value, b"a", "failure branch reads the winner");

    let cas = |rev, v: &[u8]| {
        Txn::new().when(Compare::mod_rev(&k, rev)).and_then(TxnOp::Put {
            key: k.clone(),
            value: v.to_vec(),
            lease: None,
        })
    };
    let r = s.txn(cas(token, b"c")).unwrap();
    assert!(r.succeeded, "CAS with the current token succeeds");
    assert!(r.revision > token);
    let r2 = s.txn(cas(token, b"d")).unwrap();
    assert!(!r2.succeeded, "CAS with a stale fencing token fails");
    assert_eq!(s.get(&k).unwrap().unwrap().value, b"c");

    // Value compare, multi-op success branch: all writes share one revision.
    let k2 = format!("{p}txn/other");
    let r3 = s
        .txn(
            Txn::new()
                .when(Compare::Value { key: k.clone(), value: b"c".to_vec() })
                .and_then(TxnOp::Put { key: k2.clone(), value: b"o".to_vec(), lease: None })
                .and_then(TxnOp::Delete { key: k.clone() })
                .and_then(TxnOp::Get { key: k2.clone() }),
        )
        .unwrap();
    assert!(r3.succeeded);
    assert_eq!(r3.gets[0].as_ref().unwrap().mod_revision, r3.revision, "one revision per txn");
    assert_eq!(s.get(&k).unwrap(), None);
    let r4 = s.txn(Txn::new().when(Compare::Value { key: k.clone(), value: b"c".to_vec() })).unwrap();
    assert!(!r4.succeeded, "value compare on an absent key fails");
    assert_eq!(r4.revision, s.revision().unwrap(), "a read-only txn does not bump the revision");
}

/// Leases: TTL, keep-alive, revoke, expiry deletes attached keys.
pub fn check_leases<S: ClusterStore>(s: &S, p: &str, clock: &mut dyn StoreClock) {
    assert!(matches!(s.grant_lease(0), Err(StoreError::Invalid(_))), "zero TTL rejected");
    let ttl = 1000;
    let l = s.grant_lease(ttl).unwrap();
    assert!(s.lease_alive(l).unwrap());
    let k = format!("{p}lease/host");
    s.put(&k, b"up".to_vec(), Some(l)).unwrap();
    assert_eq!(s.get(&k).unwrap().unwrap().lease, Some(l));

    // Keep-alive holds the key past several TTLs.
    for _ in 0..6 {
        clock.sleep_ms(ttl / 2);
        let granted = s.keep_alive(l).unwrap();
        assert!(granted >= ttl, "keep-alive grants at least the TTL");
    }
    assert!(s.get(&k).unwrap().is_some(), "kept-alive lease keeps its key");

    // Expiry: without keep-alive the key disappears after the TTL (etcd may round up a second).
    let mut waited = 0;
    while s.get(&k).unwrap().is_some() && waited < ttl * 6 {
        clock.sleep_ms(100);
        waited += 100;
    }
    assert!(s.get(&k).unwrap().is_none(), "expired lease deletes its keys");
    assert!(waited >= ttl / 2, "key lived for about its TTL (gone after {waited} ms)");
    assert!(!s.lease_alive(l).unwrap());
    assert!(
        matches!(s.keep_alive(l), Err(StoreError::LeaseNotFound(_))),
        "expired lease is gone: {:?}",
        s.keep_alive(l)
    );
    assert!(
        matches!(s.put(&k, vec![], Some(l)), Err(StoreError::LeaseNotFound(_))),
        "put with a dead lease fails"
    );

    // Revoke deletes keys immediately; a txn put with a live lease attaches it.
    let l2 = s.grant_lease(5000).unwrap();
    let r = s
        .txn(Txn::new().when(Compare::absent(&k)).and_then(TxnOp::Put {
            key: k.clone(),
            value: b"again".to_vec(),
            lease: Some(l2),
        }))
        .unwrap();
    assert!(r.succeeded);
    assert_eq!(s.get(&k).unwrap().unwrap().lease, Some(l2));
    s.revoke_lease(l2).unwrap();
    assert!(s.get(&k).unwrap().is_none(), "revoke deletes attached keys");
    assert!(matches!(s.keep_alive(l2), Err(StoreError::LeaseNotFound(_))));
    assert!(matches!(s.revoke_lease(LeaseId(l2.0 ^ 0x5a5a_0000)), Err(StoreError::LeaseNotFound(_))));
}

/// Watches: ordered puts and deletes, lease expiry shows up as deletes, replay from a revision.
pub fn check_watch<S: ClusterStore>(s: &S, p: &str, clock: &mut dyn StoreClock) {
    let base = format!("{p}watch/");
    let w = s.watch(&base, 0).unwrap();
    let r1 = s.put(&format!("{base}a"), b"1".to_vec(), None).unwrap();
    s.put(&format!("{p}unwatched"), b"x".to_vec(), None).unwrap();
    let r2 = s.put(&format!("{base}a"), b"2".to_vec(), None).unwrap();
    let (r3, _) = s.delete(&format!("{base}a")).unwrap();
    let evs = drain_until(s, w, 3, clock);
    assert_eq!(evs.len(), 3, "exactly the watched changes: {evs:?}");
    assert!(matches!(&evs[0], WatchEvent::Put(kv) if kv.mod_revision == r1 && kv.value == b"1"));
    assert!(matches!(&evs[1], WatchEvent::Put(kv) if kv.mod_revision == r2 && kv.version == 2));
    assert!(
        matches!(&evs[2], WatchEvent::Delete { key, mod_revision } if *mod_revision == r3 && key.ends_with("watch/a"))
    );

    let l = s.grant_lease(1000).unwrap();
    s.put(&format!("{base}leased"), b"l".to_vec(), Some(l)).unwrap();
    let mut evs = drain_until(s, w, 1, clock);
    let mut waited = 0;
    while !evs.iter().any(|e| matches!(e, WatchEvent::Delete { .. })) && waited < 6000 {
        clock.sleep_ms(100);
        waited += 100;
        evs.extend(s.poll_watch(w).unwrap());
    }
    assert!(
        evs.iter().any(|e| matches!(e, WatchEvent::Delete { key, .. } if key.ends_with("leased"))),
        "lease expiry is observed as a delete: {evs:?}"
    );
    s.cancel_watch(w).unwrap();
    assert!(s.poll_watch(w).is_err(), "a cancelled watch is gone");

    // A watch from an old revision replays history.
    let w2 = s.watch(&base, r1).unwrap();
    let evs = drain_until(s, w2, 3, clock);
    assert!(evs.len() >= 3, "replay from revision {r1}: {evs:?}");
    assert_eq!(evs[0].revision(), r1);
    assert!(evs.windows(2).all(|p| p[0].revision() <= p[1].revision()), "in revision order");
    s.cancel_watch(w2).unwrap();
}
