//! Saved state: vCPU and VM state as serde data, a checksummed snapshot encoding, and the
//! [`Snapshot`] trait that devices in other crates implement.
//!
//! Save order follows KVM's constraints: `mp_state` first (reading it can flush pending events
//! into other registers), `IA32_TSC` before `IA32_TSC_DEADLINE`; restore sets CPUID first and
//! vCPU events last.

use kvm_bindings::{
    CpuId, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, Xsave, kvm_clock_data,
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_pit_state2,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use kvm_ioctls::{Cap, VcpuFd, VmFd};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::config::VmConfig;
use crate::cpu::{self, CpuError};

/// Current snapshot format: major must match, minor may be older.
pub const SNAPSHOT_VERSION: (u16, u16) = (1, 0);
/// Largest snapshot payload accepted when decoding.
pub const MAX_SNAPSHOT_BYTES: u64 = 64 << 20;
/// The envelope of VM snapshots.
pub const VM_SNAPSHOT: Envelope =
    Envelope { magic: *b"VINFRAVM", version: SNAPSHOT_VERSION, max_payload: MAX_SNAPSHOT_BYTES };

/// A versioned, checksummed container for one saved structure: magic (8 bytes), major and
/// minor version (u16 each), payload length (u64), CRC32C of the payload (u32), then the
/// `postcard` payload. VM snapshots and device state use it, each with its own magic and
/// version.
///
/// Versioning rule: a reader accepts its own major version and any minor version up to its
/// own. Adding or changing a field of a saved structure changes its postcard layout, so it
/// bumps the version; a reader that still accepts the old layout decodes it into the old
/// structure and converts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope {
    /// Identifies what the bytes hold.
    pub magic: [u8; 8],
    /// (major, minor) written, and the newest readable.
    pub version: (u16, u16),
    /// Largest payload accepted when decoding.
    pub max_payload: u64,
}

const HEADER_LEN: usize = 8 + 2 + 2 + 8 + 4;

/// State that a component saves and restores (devices implement it for their queues and config).
pub trait Snapshot: Sized {
    /// The saved form.
    type State: Serialize + DeserializeOwned;
    /// What restoring needs besides the state (memory, event fds, backends).
    type Args;
    /// Captures the current state.
    fn save(&self) -> Self::State;
    /// Rebuilds the component from `state`.
    fn restore(args: Self::Args, state: &Self::State) -> Result<Self, StateError>;
}

/// The devices of a VM as a migration or a snapshot sees them: opaque named state sections.
/// Defined here so that device crates implement it and migration crates consume it without
/// knowing each other (`vdevices::DeviceSet` implements it for virtio transports and COM1).
///
/// Devices run on their own threads and write guest memory (DMA) whatever the vCPUs do, so
/// pausing the vCPUs is not enough: a device that completed a request after the last memory
/// pass would leave its used-ring entry behind while its saved state counts it. A migration
/// therefore pauses the devices right after the vCPUs, before that pass.
pub trait DeviceSections {
    /// The vCPUs are paused and the last memory pass is about to start: stop the devices' own
    /// work so that they write nothing more into guest memory (their last writes then travel
    /// with that pass), and return their state as `(name, bytes)` sections.
    fn pause_and_save(&mut self) -> Result<Vec<(String, Vec<u8>)>, String>;
    /// The migration failed before the point of no return and the source VM runs again: so
    /// must its devices (called only after [`DeviceSections::pause_and_save`]).
    fn resume(&mut self);
}

/// Errors of saving, encoding, decoding and restoring state.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The bytes do not start with the expected magic.
    #[error("not vinfra state of this kind (expected magic {expected:?})")]
    BadMagic {
        /// The magic expected, as text.
        expected: String,
    },
    /// The state was written by an incompatible version.
    #[error("state version {found_major}.{found_minor} is not readable by {readable_major}.{readable_minor}")]
    Version {
        /// Major version found.
        found_major: u16,
        /// Minor version found.
        found_minor: u16,
        /// Major version this build reads.
        readable_major: u16,
        /// Newest minor version this build reads.
        readable_minor: u16,
    },
    /// The declared length is larger than allowed or than the input.
    #[error("state payload of {declared} bytes: {available} available, at most {max} allowed")]
    Length {
        /// Length in the header.
        declared: u64,
        /// Bytes present.
        available: u64,
        /// Largest payload accepted.
        max: u64,
    },
    /// The payload checksum does not match: the state is corrupt.
    #[error("state checksum mismatch: header says {expected:#010x}, payload has {found:#010x}")]
    Checksum {
        /// Checksum in the header.
        expected: u32,
        /// Checksum of the payload.
        found: u32,
    },
    /// The payload does not decode.
    #[error("decoding snapshot payload")]
    Decode(#[source] postcard::Error),
    /// The state does not fit the VM it is restored into.
    #[error("saved {what} is {saved}, this VM has {here}")]
    Mismatch {
        /// What differs.
        what: &'static str,
        /// Saved value.
        saved: String,
        /// Value of this VM.
        here: String,
    },
    /// A KVM state ioctl failed.
    #[error("{op} failed{}", vcpu.map(|v| format!(" on vCPU {v}")).unwrap_or_default())]
    Kvm {
        /// The operation.
        op: &'static str,
        /// The vCPU, for vCPU state.
        vcpu: Option<u8>,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// Reading or writing MSRs failed.
    #[error(transparent)]
    Cpu(#[from] CpuError),
    /// A device could not be restored.
    #[error("restoring device {device}: {reason}")]
    Device {
        /// The device.
        device: String,
        /// Why.
        reason: String,
    },
}

fn kvm_err(op: &'static str, vcpu: Option<u8>) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { op, vcpu, source }
}

/// The x87/SSE state of `KVM_GET_FPU`, as serde data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct FpuState {
    /// x87 registers.
    pub fpr: [[u8; 16]; 8],
    /// Control word.
    pub fcw: u16,
    /// Status word.
    pub fsw: u16,
    /// Abridged tag word.
    pub ftwx: u8,
    /// Last opcode.
    pub last_opcode: u16,
    /// Last instruction pointer.
    pub last_ip: u64,
    /// Last data pointer.
    pub last_dp: u64,
    /// XMM registers.
    pub xmm: [[u8; 16]; 16],
    /// SSE control/status.
    pub mxcsr: u32,
}

impl From<&kvm_fpu> for FpuState {
    fn from(f: &kvm_fpu) -> Self {
        FpuState {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
        }
    }
}

impl From<&FpuState> for kvm_fpu {
    fn from(f: &FpuState) -> Self {
        kvm_fpu {
            fpr: f.fpr,
            fcw: f.fcw,
            fsw: f.fsw,
            ftwx: f.ftwx,
            last_opcode: f.last_opcode,
            last_ip: f.last_ip,
            last_dp: f.last_dp,
            xmm: f.xmm,
            mxcsr: f.mxcsr,
            ..Default::default()
        }
    }
}

/// Everything KVM holds about one vCPU.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index.
    pub id: u8,
    /// `KVM_GET_MP_STATE`.
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// x87/SSE state.
    pub fpu: FpuState,
    /// XSAVE area in 32-bit words (4 KiB, more with `KVM_CAP_XSAVE2`).
    pub xsave: Vec<u32>,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// Local APIC.
    pub lapic: kvm_lapic_state,
    /// Every saveable MSR of `KVM_GET_MSR_INDEX_LIST`: index and value, in restore order.
    pub msrs: Vec<(u32, u64)>,
    /// Pending exceptions, interrupts, NMIs.
    pub vcpu_events: kvm_vcpu_events,
    /// CPUID as set on the vCPU.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// TSC frequency in kHz (0 if the host does not report it).
    pub tsc_khz: u32,
}

/// VM-wide KVM state: interrupt controllers, PIT, kvmclock.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmState {
    /// Master 8259 PIC.
    pub pic_master: kvm_irqchip,
    /// Slave 8259 PIC.
    pub pic_slave: kvm_irqchip,
    /// IOAPIC.
    pub ioapic: kvm_irqchip,
    /// PIT (`KVM_GET_PIT2`).
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
}

/// A whole VM's CPU and platform state (memory and devices travel separately).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VmSnapshot {
    /// The configuration the VM was built with.
    pub config: VmConfig,
    /// VM-wide state.
    pub vm: VmState,
    /// One entry per vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
}

fn xsave_extra_words(vm: &VmFd) -> usize {
    let size = usize::try_from(vm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
    size.saturating_sub(std::mem::size_of::<kvm_xsave>()).div_ceil(4)
}

/// Reads the state of vCPU `id`; the vCPU must not be running.
pub(crate) fn save_vcpu(
    vm: &VmFd,
    fd: &VcpuFd,
    id: u8,
    msr_indices: &[u32],
) -> Result<VcpuState, StateError> {
    let v = Some(id);
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE", v))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS", v))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS", v))?;
    let fpu = FpuState::from(&fd.get_fpu().map_err(kvm_err("KVM_GET_FPU", v))?);
    let extra = xsave_extra_words(vm);
    let xsave = if extra > 0 {
        let mut x = Xsave::new(extra).map_err(|_| StateError::Mismatch {
            what: "XSAVE size",
            saved: extra.to_string(),
            here: "unallocatable".into(),
        })?;
        crate::sys::get_xsave_extended(fd, &mut x).map_err(kvm_err("KVM_GET_XSAVE2", v))?;
        let mut words = x.as_fam_struct_ref().xsave.region.to_vec();
        words.extend_from_slice(x.as_slice());
        words
    } else {
        fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE", v))?.region.to_vec()
    };
    let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS", v))?;
    let debugregs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS", v))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC", v))?;
    let msrs = cpu::get_msrs(fd, id, msr_indices)?;
    let vcpu_events = fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS", v))?;
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("KVM_GET_CPUID2", v))?
        .as_slice()
        .to_vec();
    let tsc_khz = fd.get_tsc_khz().unwrap_or(0);
    Ok(VcpuState {
        id,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        cpuid,
        tsc_khz,
    })
}

/// Writes `s` into vCPU `fd`, which must not be running.
pub(crate) fn restore_vcpu(vm: &VmFd, fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let v = Some(s.id);
    let cpuid = CpuId::from_entries(&s.cpuid).map_err(|_| StateError::Mismatch {
        what: "CPUID entry count",
        saved: s.cpuid.len().to_string(),
        here: kvm_bindings::KVM_MAX_CPUID_ENTRIES.to_string(),
    })?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2", v))?;
    if s.tsc_khz != 0 && fd.get_tsc_khz().ok() != Some(s.tsc_khz) {
        fd.set_tsc_khz(s.tsc_khz).map_err(kvm_err("KVM_SET_TSC_KHZ", v))?;
    }
    fd.set_mp_state(s.mp_state).map_err(kvm_err("KVM_SET_MP_STATE", v))?;
    fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS", v))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS", v))?;
    fd.set_fpu(&kvm_fpu::from(&s.fpu)).map_err(kvm_err("KVM_SET_FPU", v))?;
    restore_xsave(vm, fd, s)?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS", v))?;
    fd.set_debug_regs(&s.debugregs).map_err(kvm_err("KVM_SET_DEBUGREGS", v))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC", v))?;
    cpu::set_msrs_checked(fd, s.id, &s.msrs)?;
    fd.set_vcpu_events(&s.vcpu_events).map_err(kvm_err("KVM_SET_VCPU_EVENTS", v))?;
    Ok(())
}

fn restore_xsave(vm: &VmFd, fd: &VcpuFd, s: &VcpuState) -> Result<(), StateError> {
    let v = Some(s.id);
    let extra = xsave_extra_words(vm);
    let legacy = std::mem::size_of::<kvm_xsave>() / 4;
    let here = legacy + extra;
    if s.xsave.len() != here && s.xsave.len() != legacy {
        return Err(StateError::Mismatch {
            what: "XSAVE area (32-bit words)",
            saved: s.xsave.len().to_string(),
            here: here.to_string(),
        });
    }
    if extra > 0 {
        let x =
            crate::sys::xsave_from_words(&s.xsave[..legacy], &s.xsave[legacy..], extra).ok_or_else(|| {
                StateError::Mismatch {
                    what: "XSAVE size",
                    saved: s.xsave.len().to_string(),
                    here: here.to_string(),
                }
            })?;
        crate::sys::set_xsave_extended(fd, &x).map_err(kvm_err("KVM_SET_XSAVE", v))
    } else {
        let mut x = kvm_xsave::default();
        x.region.copy_from_slice(&s.xsave[..legacy]);
        crate::sys::set_xsave_legacy(fd, &x).map_err(kvm_err("KVM_SET_XSAVE", v))
    }
}

fn get_chip(vm: &VmFd, chip_id: u32) -> Result<kvm_irqchip, StateError> {
    let mut chip = kvm_irqchip { chip_id, ..Default::default() };
    vm.get_irqchip(&mut chip).map_err(kvm_err("KVM_GET_IRQCHIP", None))?;
    Ok(chip)
}

/// Reads the VM-wide state; no vCPU may be running.
pub(crate) fn save_vm(vm: &VmFd) -> Result<VmState, StateError> {
    Ok(VmState {
        pic_master: get_chip(vm, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: get_chip(vm, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: get_chip(vm, KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2", None))?,
        clock: vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK", None))?,
    })
}

/// Writes the VM-wide state; no vCPU may be running.
pub(crate) fn restore_vm(vm: &VmFd, s: &VmState) -> Result<(), StateError> {
    for (chip, id) in [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ] {
        if chip.chip_id != id {
            return Err(StateError::Mismatch {
                what: "irqchip id",
                saved: chip.chip_id.to_string(),
                here: id.to_string(),
            });
        }
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP", None))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm_err("KVM_SET_PIT2", None))?;
    // Restore the clock value itself: no realtime or host-TSC adjustment flags.
    let clock = kvm_clock_data { clock: s.clock.clock, ..Default::default() };
    vm.set_clock(&clock).map_err(kvm_err("KVM_SET_CLOCK", None))?;
    Ok(())
}

/// CRC32C (CRC-32/ISCSI) of `bytes`.
fn crc32c(bytes: &[u8]) -> u32 {
    crc_fast::checksum(crc_fast::CrcAlgorithm::Crc32Iscsi, bytes) as u32
}

impl Envelope {
    /// Encodes `value` in this envelope.
    pub fn encode<T: Serialize>(&self, value: &T) -> Vec<u8> {
        let payload = postcard::to_stdvec(value).unwrap_or_default();
        let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
        out.extend_from_slice(&self.magic);
        out.extend_from_slice(&self.version.0.to_le_bytes());
        out.extend_from_slice(&self.version.1.to_le_bytes());
        out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32c(&payload).to_le_bytes());
        out.extend_from_slice(&payload);
        out
    }

    /// Checks magic, version, length and checksum of `bytes`; returns the found version and
    /// the payload. Never trusts the input.
    pub fn open<'b>(&self, bytes: &'b [u8]) -> Result<((u16, u16), &'b [u8]), StateError> {
        if bytes.len() < HEADER_LEN || bytes[..8] != self.magic {
            return Err(StateError::BadMagic { expected: String::from_utf8_lossy(&self.magic).into_owned() });
        }
        let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]);
        let (major, minor) = (u16_at(8), u16_at(10));
        if major != self.version.0 || minor > self.version.1 {
            return Err(StateError::Version {
                found_major: major,
                found_minor: minor,
                readable_major: self.version.0,
                readable_minor: self.version.1,
            });
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&bytes[12..20]);
        let declared = u64::from_le_bytes(len);
        let payload = &bytes[HEADER_LEN..];
        if declared > self.max_payload || declared != payload.len() as u64 {
            return Err(StateError::Length {
                declared,
                available: payload.len() as u64,
                max: self.max_payload,
            });
        }
        let expected = u32::from_le_bytes([bytes[20], bytes[21], bytes[22], bytes[23]]);
        let found = crc32c(payload);
        if expected != found {
            return Err(StateError::Checksum { expected, found });
        }
        Ok(((major, minor), payload))
    }

    /// Decodes bytes made by [`Envelope::encode`] of the current version.
    pub fn decode<T: DeserializeOwned>(&self, bytes: &[u8]) -> Result<T, StateError> {
        let (_, payload) = self.open(bytes)?;
        Self::decode_payload(payload)
    }

    /// Decodes a payload that [`Envelope::open`] returned, as the structure of the version it
    /// found (an older minor version has structures of its own).
    pub fn decode_payload<T: DeserializeOwned>(payload: &[u8]) -> Result<T, StateError> {
        postcard::from_bytes(payload).map_err(StateError::Decode)
    }
}

impl VmSnapshot {
    /// Encodes the snapshot in [`VM_SNAPSHOT`]'s envelope.
    pub fn to_bytes(&self) -> Vec<u8> {
        VM_SNAPSHOT.encode(self)
    }

    /// Decodes and verifies bytes made by [`VmSnapshot::to_bytes`]; never trusts the input.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, StateError> {
        VM_SNAPSHOT.decode(bytes)
    }
}
