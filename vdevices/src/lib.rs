//! vdevices: what the guest sees on one host.
//!
//! virtio devices (block, console, rng, ...) carried by a virtio-mmio transport that sits on a
//! `vcore` MMIO bus; queue notifications arrive through ioeventfds and are served by
//! `event-manager` subscribers on an [`EventLoop`] thread, off the vCPU threads; interrupts go
//! out through irqfds. Every device and the transport implement `vcore`'s [`vcore::Snapshot`],
//! so a device-bearing VM can be saved, restored and migrated. The `testing` module (feature
//! `test-utils`) is a virtio driver that plays the guest through the real transport registers and
//! real split queues in guest memory, so every device is tested with real backends even where
//! no Linux guest can run.
#![deny(missing_docs, missing_debug_implementations)]

pub mod acpi;
pub mod event;
pub mod guest;
pub mod legacy;
pub mod machine;
pub mod set;
mod sys;
#[cfg(feature = "test-utils")]
pub mod testing;
pub mod virtio;

pub use event::{EventLoop, EventLoopError};
pub use set::DeviceSet;
pub use virtio::mmio::{MmioTransport, TransportError, TransportState};
pub use virtio::{DeviceError, DeviceState, VirtioDevice};
