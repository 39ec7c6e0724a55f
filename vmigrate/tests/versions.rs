//! Protocol versions across builds: a source of this build against a destination that speaks at
//! most version 4, which never answers `IterationEnd` (protocol 5 added `IterationApplied`).

mod common;

use std::time::Duration;

use common::{dest_vm, source_vm};
use vcore::guest::{DirtierConfig, Pattern};
use vcore::{RunState, VmConfig};
use vmigrate::stream::{FrameReader, FrameWriter, Message};
use vmigrate::transport::channel_pair;
use vmigrate::{ConvergencePolicy, Source};

/// Plays a destination of protocol version 4 on `t`: accepts the handshake at version 4, reads
/// (and checks) every frame up to `Complete` without answering iterations, then `Ready`,
/// `Commit`, `Started`. Returns the number of `IterationEnd` frames it read.
fn version_4_destination(mut t: vmigrate::transport::ChannelTransport) -> u32 {
    let hello = match FrameReader::new(&mut t).read_frame().unwrap() {
        Message::Hello(h) => h,
        other => panic!("expected Hello, got {other:?}"),
    };
    assert!(hello.max_version >= 5, "this build speaks version 5");
    assert!(hello.min_version <= 4, "and still version 4");
    FrameWriter::new(&mut t, 0).message(&Message::HelloAck(4)).unwrap();
    let mut iterations = 0;
    let mut r = FrameReader::new(&mut t);
    loop {
        match r.read_frame().unwrap() {
            Message::IterationEnd(n) => {
                assert_eq!(n, iterations, "iterations in order");
                iterations += 1;
            }
            Message::IterationApplied(_) => panic!("IterationApplied from a source"),
            Message::Complete => break,
            _ => {}
        }
    }
    drop(r);
    FrameWriter::new(&mut t, 0).message(&Message::Ready).unwrap();
    assert!(matches!(FrameReader::new(&mut t).read_frame().unwrap(), Message::Commit));
    FrameWriter::new(&mut t, 0).message(&Message::Started).unwrap();
    iterations
}

#[test]
fn a_version_4_destination_is_not_waited_for() {
    require_kvm!();
    let cfg = VmConfig { mem_mib: 64, ..Default::default() };
    let d = DirtierConfig {
        ws_pages: 2048,
        pattern: Pattern::Random,
        pages_per_sec: 5_000,
        ..Default::default()
    };
    let src = source_vm(&cfg, d);
    let _dst = dest_vm(&cfg); // the layout the source announces is its own; nothing runs here
    // A source waiting for `IterationApplied` would hit the wire's 5 s timeout instead.
    let (a, b) = channel_pair(2, Duration::from_secs(5));
    let (res, iterations) = std::thread::scope(|s| {
        let fake = s.spawn(|| version_4_destination(b));
        let res = Source::new(&src, ConvergencePolicy::default()).run(a);
        (res, fake.join().unwrap())
    });
    let stats = res.expect("migration to a version 4 destination");
    assert!(iterations >= 1, "the source ended at least one iteration");
    assert_eq!(stats.iterations.len() as u32, iterations);
    assert_eq!(src.run_state(), RunState::Stopped, "after Started the source is shut down");
}
