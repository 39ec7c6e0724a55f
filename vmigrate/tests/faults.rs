//! Faults at every phase: the source keeps running with its memory intact; nothing starts on
//! the destination. Also: convergence with and without auto-converge.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Fault, Faulty, assert_source_alive, dest_vm, source_vm};
use vcore::guest::{DirtierConfig, Pattern};
use vcore::{RunState, Vm, VmConfig};
use vmigrate::transport::{ChannelTransport, channel_pair};
use vmigrate::{ConvergencePolicy, Destination, MigrationError, MigrationHandle, Source};

fn cfg() -> VmConfig {
    VmConfig { mem_mib: 64, ..Default::default() }
}

fn dirtier() -> DirtierConfig {
    DirtierConfig { ws_pages: 2048, pattern: Pattern::Random, pages_per_sec: 20_000, ..Default::default() }
}

/// Runs a destination on `dst` in a thread while `send` drives the source over the other end of
/// an in-process wire; returns both outcomes.
fn over_channel<R>(
    dst: &Vm,
    send: impl FnOnce(ChannelTransport) -> R,
) -> (R, Result<vmigrate::ReceiveStats, MigrationError>) {
    let (a, b) = channel_pair(2, Duration::from_secs(5));
    std::thread::scope(|s| {
        let recv = s.spawn(|| Destination::new(dst).run(b));
        let res = send(a);
        (res, recv.join().unwrap())
    })
}

/// Migrates through a faulty wire; returns the source's error and the destination's outcome.
fn migrate_with(
    fault: Option<Fault>,
    dst_cfg: VmConfig,
    policy: ConvergencePolicy,
    handle: MigrationHandle,
) -> (Result<vmigrate::MigrationStats, MigrationError>, Result<(), MigrationError>, RunState) {
    let d = dirtier();
    let src = source_vm(&cfg(), d);
    let dst = dest_vm(&dst_cfg);
    let (src_res, dst_res) = over_channel(&dst, |a| match fault {
        Some(fault) => Source::new(&src, policy).handle(handle).run(Faulty::new(a, fault)),
        None => Source::new(&src, policy).handle(handle).run(a),
    });
    let dst_res = dst_res.map(|_| ());
    let dst_state = dst.run_state();
    if src_res.is_err() && !matches!(src_res, Err(MigrationError::CommitUncertain(_))) {
        assert_source_alive(&src, &d);
    }
    (src_res, dst_res, dst_state)
}

#[test]
fn destination_dies_mid_stream() {
    require_kvm!();
    let (src, dst, state) =
        migrate_with(Some(Fault::CutAfter(2 << 20)), cfg(), Default::default(), Default::default());
    assert!(matches!(src, Err(MigrationError::Stream(_))), "{src:?}");
    assert!(dst.is_err());
    assert_eq!(state, RunState::Created, "nothing starts on the destination");
}

#[test]
fn a_flipped_byte_is_detected() {
    require_kvm!();
    let (src, dst, state) =
        migrate_with(Some(Fault::FlipAt(1 << 20)), cfg(), Default::default(), Default::default());
    let dst_err = dst.unwrap_err();
    // Depending on where the flip lands: the checksum, or a header field checked before it.
    use vmigrate::StreamError as E;
    assert!(
        matches!(
            dst_err,
            MigrationError::Stream(
                E::Checksum { .. } | E::UnknownKind(_) | E::BadMagic(_) | E::BadFlags(_) | E::TooLong { .. }
            )
        ),
        "destination detects the corruption: {dst_err:?}"
    );
    assert!(src.is_err(), "source fails too: {src:?}");
    assert_eq!(state, RunState::Created);
}

#[test]
fn cancel_from_another_thread() {
    require_kvm!();
    let handle = MigrationHandle::new();
    let h = handle.clone();
    let policy = ConvergencePolicy { bandwidth_limit_bps: Some(32 << 20), ..Default::default() };
    let canceller = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        h.cancel();
    });
    let (src, dst, state) = migrate_with(None, cfg(), policy, handle);
    canceller.join().unwrap();
    assert!(matches!(src, Err(MigrationError::Cancelled)), "{src:?}");
    assert!(matches!(dst, Err(MigrationError::PeerAborted(_))), "{dst:?}");
    assert_eq!(state, RunState::Created);
}

#[test]
fn destination_refuses_the_handshake() {
    require_kvm!();
    let other = VmConfig { mem_mib: 32, ..Default::default() };
    let (src, dst, state) = migrate_with(None, other, Default::default(), Default::default());
    assert!(matches!(src, Err(MigrationError::PeerAborted(ref r)) if r.contains("layout")), "{src:?}");
    assert!(matches!(dst, Err(MigrationError::Incompatible(_))), "{dst:?}");
    assert_eq!(state, RunState::Created);
}

#[test]
fn connection_lost_at_commit_is_reported_as_uncertain() {
    require_kvm!();
    let d = dirtier();
    let src = source_vm(&cfg(), d);
    let dst = dest_vm(&cfg());
    let (res, _) = over_channel(&dst, |a| {
        Source::new(&src, ConvergencePolicy::default()).run(Faulty::new(a, Fault::DropAfterCommit))
    });
    assert!(matches!(res, Err(MigrationError::CommitUncertain(_))), "{res:?}");
    assert_eq!(src.run_state(), RunState::Paused, "the source is never resumed after Commit");
    assert_eq!(dst.run_state(), RunState::Running, "the destination got Commit and runs the guest");
}

fn flat_out_over_a_slow_link(
    auto_converge: bool,
) -> (Result<vmigrate::MigrationStats, MigrationError>, RunState) {
    let d = DirtierConfig { ws_pages: 4096, pattern: Pattern::Random, ..Default::default() };
    let src = source_vm(&cfg(), d);
    let dst = dest_vm(&cfg());
    let policy = ConvergencePolicy {
        bandwidth_limit_bps: Some(64 << 20),
        downtime_limit_ms: 30,
        max_iterations: 12,
        stall_iterations: 100, // let the iteration cap speak
        auto_converge,
        ..Default::default()
    };
    let (res, _) = over_channel(&dst, |a| Source::new(&src, policy).run(a));
    if res.is_err() {
        assert_source_alive(&src, &d);
    }
    (res, dst.run_state())
}

#[test]
fn a_dirty_rate_beyond_the_link_needs_auto_converge() {
    require_kvm!();
    let (without, state) = flat_out_over_a_slow_link(false);
    assert!(matches!(without, Err(MigrationError::NotConverging { iterations: 12, .. })), "{without:?}");
    assert_eq!(state, RunState::Created);
    let (with, state) = flat_out_over_a_slow_link(true);
    let stats = with.expect("auto-converge makes it converge");
    assert!(stats.max_throttle_percent >= 20, "throttled: {}", stats.max_throttle_percent);
    assert_eq!(state, RunState::Running);
    eprintln!(
        "auto-converge: {} iterations, max throttle {}%, downtime {:?}",
        stats.iterations.len(),
        stats.max_throttle_percent,
        stats.downtime
    );
}

#[test]
fn a_stall_can_force_the_switchover() {
    require_kvm!();
    let d = DirtierConfig { ws_pages: 4096, pattern: Pattern::Random, ..Default::default() };
    let src = source_vm(&cfg(), d);
    let dst = dest_vm(&cfg());
    let policy = ConvergencePolicy {
        bandwidth_limit_bps: Some(64 << 20),
        downtime_limit_ms: 1,
        auto_converge: false,
        stall_iterations: 2,
        on_stall: vmigrate::Strategy::SwitchOver,
        ..Default::default()
    };
    let forced = Arc::new(Mutex::new(None));
    let f = forced.clone();
    let (res, _) = over_channel(&dst, |a| {
        Source::new(&src, policy)
            .progress(move |p| {
                if let vmigrate::Progress::ForcingSwitchover { expected_downtime, .. } = p {
                    *f.lock().unwrap() = Some(*expected_downtime);
                }
            })
            .run(a)
    });
    let stats = res.expect("switched over");
    assert!(
        stats.forced_switchover,
        "{:#?}",
        stats.iterations.iter().map(|i| (i.dirty_pages, i.expected_downtime)).collect::<Vec<_>>()
    );
    let expected = forced.lock().unwrap().expect("the expected downtime was reported before switching");
    eprintln!("forced switch-over: expected {expected:?}, actual {:?}", stats.downtime);
    assert_eq!(dst.run_state(), RunState::Running);
}
