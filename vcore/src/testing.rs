//! Helpers for tests that need `/dev/kvm`: skip loudly where it is missing, fail in CI.

/// Environment variable that turns a missing `/dev/kvm` into a test failure.
pub const REQUIRE_KVM_ENV: &str = "VINFRA_REQUIRE_KVM";

/// Whether KVM tests may run here. Without `/dev/kvm` it prints one `SKIP` line naming `test`
/// and returns false, unless `VINFRA_REQUIRE_KVM=1`, where it panics so the test fails.
pub fn kvm_available(test: &str) -> bool {
    // Open and ask for the API version: a path that opens but is not KVM counts as missing.
    let probe = kvm_ioctls::Kvm::new().and_then(|k| {
        if k.get_api_version() == 12 { Ok(()) } else { Err(kvm_ioctls::Error::new(libc::ENOTTY)) }
    });
    match probe {
        Ok(()) => true,
        Err(e) => {
            if std::env::var(REQUIRE_KVM_ENV).is_ok_and(|v| v == "1") {
                panic!("{test}: /dev/kvm is required ({REQUIRE_KVM_ENV}=1) but unusable: {e}");
            }
            eprintln!("SKIP {test}: no usable /dev/kvm ({e})");
            false
        }
    }
}

/// Polls `f` every 2 ms until it holds or `timeout` passes; returns its last answer.
pub fn wait_until(timeout: std::time::Duration, mut f: impl FnMut() -> bool) -> bool {
    let start = std::time::Instant::now();
    while start.elapsed() < timeout {
        if f() {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    f()
}
