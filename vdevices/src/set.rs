//! A VM's devices as one set of named state sections, for migrations and snapshots: the
//! [`vcore::DeviceSections`] of virtio-mmio transports (with their devices) and 16550 UARTs,
//! and the pieces to rebuild them from those sections on the other side.

use vcore::{DeviceSections, GuestMemory, Snapshot, StateError};

use crate::legacy::{LegacySerial, SerialSnapshot};
use crate::virtio::balloon::Balloon;
use crate::virtio::block::Block;
use crate::virtio::mmio::{DEVICE_STATE, TransportArgs};
use crate::virtio::rng::Rng;
use crate::{DeviceState, MmioTransport, TransportState, VirtioDevice};

/// Named devices of one VM. Each section is named as its device was added.
#[derive(Debug, Default, Clone)]
pub struct DeviceSet {
    virtio: Vec<(String, MmioTransport)>,
    serial: Vec<(String, LegacySerial)>,
}

impl DeviceSet {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a virtio-mmio transport (its state section carries the device's).
    pub fn virtio(mut self, name: impl Into<String>, transport: MmioTransport) -> Self {
        self.virtio.push((name.into(), transport));
        self
    }

    /// Adds a 16550 UART. It has no thread of its own (it moves only when a vCPU touches it),
    /// so a paused VM is enough to keep it still.
    pub fn serial(mut self, name: impl Into<String>, serial: LegacySerial) -> Self {
        self.serial.push((name.into(), serial));
        self
    }
}

impl DeviceSections for DeviceSet {
    fn pause_and_save(&mut self) -> Result<Vec<(String, Vec<u8>)>, String> {
        // Every device stops before any is saved.
        for (_, t) in &self.virtio {
            t.pause();
        }
        let virtio = self.virtio.iter().map(|(n, t)| (n.clone(), t.save().to_bytes()));
        let serial = self.serial.iter().map(|(n, s)| (n.clone(), s.save().to_bytes()));
        Ok(virtio.chain(serial).collect())
    }

    fn resume(&mut self) {
        for (_, t) in &self.virtio {
            t.resume();
        }
    }
}

/// The section called `name`.
pub fn section<'a>(sections: &'a [(String, Vec<u8>)], name: &str) -> Result<&'a [u8], StateError> {
    sections.iter().find(|(n, _)| n == name).map(|(_, b)| b.as_slice()).ok_or_else(|| StateError::Device {
        device: name.to_string(),
        reason: "no such section in the saved state".into(),
    })
}

/// Rebuilds a device that needs nothing from the host besides its state: block (reopening the
/// image at its saved path), rng and balloon. Net and console need their tap or I/O; build those
/// with their own `restore`.
pub fn restore_device(state: &DeviceState) -> Result<Box<dyn VirtioDevice>, StateError> {
    Ok(match state {
        DeviceState::Block(b) => Box::new(Block::restore((), b)?),
        DeviceState::Rng(r) => Box::new(Rng::restore((), r)?),
        DeviceState::Balloon(b) => Box::new(Balloon::restore((), b)?),
        DeviceState::Net(_) | DeviceState::Console(_) => {
            return Err(StateError::Device {
                device: "virtio".into(),
                reason: "net and console need their host backend: restore them with it".into(),
            });
        }
    })
}

impl MmioTransport {
    /// Rebuilds a transport over `mem` from a section made by [`DeviceSet`] (or
    /// [`TransportState::to_bytes`]), its device built by `make` from the saved device state
    /// ([`restore_device`] for those that need no host backend). Attach it to the VM and add it
    /// to an event loop as usual.
    pub fn from_section(
        mem: GuestMemory,
        bytes: &[u8],
        make: impl FnOnce(&DeviceState) -> Result<Box<dyn VirtioDevice>, StateError>,
    ) -> Result<Self, StateError> {
        let state = TransportState::from_bytes(bytes)?;
        let device = make(&state.device)?;
        MmioTransport::restore(TransportArgs { mem, device }, &state)
    }
}

impl SerialSnapshot {
    /// Encodes the UART's state as a section ([`DEVICE_STATE`] envelope).
    pub fn to_bytes(&self) -> Vec<u8> {
        DEVICE_STATE.encode(self)
    }

    /// Decodes a section made by [`SerialSnapshot::to_bytes`].
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        DEVICE_STATE.decode(bytes)
    }
}
