//! vdevices: what the guest sees on one host.
//!
//! virtio devices over `virtio-queue` carried by a virtio-mmio transport (a `vcore` bus device),
//! with backends driven by `event-manager`; legacy 16550 serial and i8042; device state through
//! `vcore`'s `Snapshot` trait. Filled in by the "Hypervisor floor complete" issue.
#![deny(missing_docs, missing_debug_implementations)]
