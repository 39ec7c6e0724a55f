//! The conformance suite against a real etcd (feature `etcd`).
//!
//! Endpoints come from `VINFRA_ETCD_ENDPOINTS` (comma-separated, default
//! `http://127.0.0.1:2379`); `.ci/etcd.sh` starts one. Without a reachable etcd the test prints
//! one `SKIP:` line and passes, unless `VINFRA_REQUIRE_ETCD=1`.
#![cfg(feature = "etcd")]

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use vha::store::EtcdStore;
use vha::store::conformance::{RealClock, check_store};

fn etcd_or_skip() -> Option<EtcdStore> {
    let eps = std::env::var("VINFRA_ETCD_ENDPOINTS").unwrap_or_else(|_| "http://127.0.0.1:2379".to_string());
    let eps: Vec<String> = eps.split(',').map(|s| s.trim().to_string()).collect();
    match EtcdStore::connect(&eps, Duration::from_secs(2)) {
        Ok(s) => Some(s),
        Err(e) => {
            if std::env::var("VINFRA_REQUIRE_ETCD").as_deref() == Ok("1") {
                panic!("VINFRA_REQUIRE_ETCD=1 but etcd at {eps:?} is unreachable: {e}");
            }
            eprintln!("SKIP: no etcd at {eps:?} ({e}); run .ci/etcd.sh and set VINFRA_ETCD_ENDPOINTS");
            None
        }
    }
}

fn unique_prefix() -> String {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("/vha-test/{}-{t}/", std::process::id())
}

#[test]
fn etcd_conforms() {
    let Some(s) = etcd_or_skip() else { return };
    check_store(&s, &unique_prefix(), &mut RealClock);
}
