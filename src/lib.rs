//! vinfra: composable virtualization crates, from one KVM host up to a cluster.
//!
//! This umbrella crate re-exports the five vinfra crates and owns the reference binaries in
//! `examples/` and the criterion benchmarks in `benches/`.
//!
//! - [`vcore`]: one VM on one host: KVM CPU and memory virtualization, buses, boot, state.
//! - [`vdevices`]: virtio devices, legacy serial, device state.
//! - [`vmigrate`]: live migration of a running VM (vMotion) and its disk.
//! - [`vsched`]: cluster resource scheduling (DRS).
//! - [`vha`]: high availability: failure detection, fencing, restart.
#![deny(missing_docs, missing_debug_implementations)]

pub use vcore;
pub use vdevices;
pub use vha;
pub use vmigrate;
pub use vsched;

/// The README's code blocks, compiled and run as doc tests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
