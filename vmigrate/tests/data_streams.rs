//! Faults on data streams: a corrupt or dead data stream, or streams that do not match, fail
//! the whole migration; the source keeps running with its memory intact, and nothing starts on
//! the destination.

mod common;

use std::time::Duration;

use common::{Fault, Faulty, assert_source_alive, dest_vm, source_vm};
use vcore::guest::{DirtierConfig, Pattern};
use vcore::{RunState, VmConfig};
use vmigrate::transport::channel_pair;
use vmigrate::{ConvergencePolicy, Destination, MigrationError, Source, StreamError};

const STREAMS: usize = 3;

/// Migrates a 64 MiB dirtier with `STREAMS` data streams over in-process channels; `fault`
/// hits what the source writes to data stream 1, and the destination takes only
/// `dst_streams` of the data streams. Returns both outcomes and the destination's state.
fn migrate(
    fault: Option<Fault>,
    dst_streams: usize,
) -> (Result<vmigrate::MigrationStats, MigrationError>, Result<(), MigrationError>, RunState) {
    let cfg = VmConfig { mem_mib: 64, ..Default::default() };
    let d = DirtierConfig {
        ws_pages: 2048,
        pattern: Pattern::Random,
        pages_per_sec: 20_000,
        ..Default::default()
    };
    let src = source_vm(&cfg, d);
    let dst = dest_vm(&cfg);
    let timeout = Duration::from_secs(5);
    let (a, b) = channel_pair(2, timeout);
    let (mut data_a, mut data_b) = (Vec::new(), Vec::new());
    for i in 0..STREAMS {
        let (x, y) = channel_pair(2, timeout);
        let f = if i == 1 { fault } else { None };
        data_a.push(Faulty::new(x, f.unwrap_or(Fault::CutAfter(u64::MAX))));
        data_b.push(y);
    }
    // A stream the destination does not take is closed.
    data_b.truncate(dst_streams);
    let (src_res, dst_res) = std::thread::scope(|s| {
        let recv = s.spawn(|| Destination::new(&dst).run_streams(b, data_b));
        let res = Source::new(&src, ConvergencePolicy::default()).run_streams(a, data_a);
        (res, recv.join().unwrap())
    });
    if src_res.is_err() {
        assert_source_alive(&src, &d);
    }
    (src_res, dst_res.map(|_| ()), dst.run_state())
}

#[test]
fn a_flipped_byte_in_a_data_stream_is_detected() {
    require_kvm!();
    let (src, dst, state) = migrate(Some(Fault::FlipAt(1 << 20)), STREAMS);
    let dst_err = dst.unwrap_err();
    // Depending on where the flip lands: the checksum, or a header field checked before it.
    assert!(
        matches!(
            dst_err,
            MigrationError::Stream(
                StreamError::Checksum { .. }
                    | StreamError::UnknownKind(_)
                    | StreamError::BadMagic(_)
                    | StreamError::BadFlags(_)
                    | StreamError::TooLong { .. }
            )
        ),
        "the destination names the corruption, not the abort that followed: {dst_err:?}"
    );
    assert!(src.is_err(), "the source fails too: {src:?}");
    assert_eq!(state, RunState::Created, "nothing starts on the destination");
}

#[test]
fn a_data_stream_cut_mid_stream_fails_the_migration() {
    require_kvm!();
    let (src, dst, state) = migrate(Some(Fault::CutAfter(1 << 20)), STREAMS);
    assert!(matches!(src, Err(MigrationError::Stream(_))), "{src:?}");
    assert!(dst.is_err());
    assert_eq!(state, RunState::Created);
}

#[test]
fn the_stream_counts_must_agree() {
    require_kvm!();
    let (src, dst, state) = migrate(None, STREAMS - 1);
    assert!(
        matches!(dst, Err(MigrationError::Incompatible(ref r)) if r.contains("3 data streams")),
        "{dst:?}"
    );
    assert!(src.is_err(), "{src:?}");
    assert_eq!(state, RunState::Created);
}

#[test]
fn all_data_streams_healthy_migrate() {
    require_kvm!();
    let (src, dst, state) = migrate(None, STREAMS);
    assert_eq!(src.expect("migration").data_streams, STREAMS);
    dst.expect("destination");
    assert_eq!(state, RunState::Running);
}
