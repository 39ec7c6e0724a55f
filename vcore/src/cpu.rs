//! CPU model: CPUID per vCPU, boot MSRs, and the list of MSRs that migrate.

use std::sync::OnceLock;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES, Msrs, kvm_msr_entry};
use kvm_ioctls::{Kvm, VcpuFd};

/// `IA32_SYSENTER_CS`.
pub const MSR_IA32_SYSENTER_CS: u32 = 0x174;
/// `IA32_SYSENTER_ESP`.
pub const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
/// `IA32_SYSENTER_EIP`.
pub const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
/// `IA32_TSC`.
pub const MSR_IA32_TSC: u32 = 0x10;
/// `IA32_MISC_ENABLE`.
pub const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
/// `IA32_MTRR_DEF_TYPE`.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// `IA32_TSC_DEADLINE`: must be restored after `IA32_TSC`.
pub const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// `STAR`.
pub const MSR_STAR: u32 = 0xc000_0081;
/// `LSTAR`.
pub const MSR_LSTAR: u32 = 0xc000_0082;
/// `CSTAR`.
pub const MSR_CSTAR: u32 = 0xc000_0083;
/// `SFMASK`.
pub const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
/// `KERNEL_GS_BASE`.
pub const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// Errors of CPU model setup.
#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("reading the host's supported CPUID")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
    /// `KVM_SET_CPUID2` failed.
    #[error("setting CPUID of vCPU {vcpu}")]
    SetCpuid {
        /// The vCPU.
        vcpu: u8,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` failed outright.
    #[error("setting MSRs of vCPU {vcpu}")]
    SetMsrs {
        /// The vCPU.
        vcpu: u8,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// `KVM_SET_MSRS` stopped before the end of the list: this host refuses `msr`.
    #[error("vCPU {vcpu}: the host refused MSR {msr:#x} (set {set} of {total} MSRs)")]
    MsrRefused {
        /// The vCPU.
        vcpu: u8,
        /// The first MSR KVM did not take.
        msr: u32,
        /// How many MSRs were set before it.
        set: usize,
        /// How many were asked.
        total: usize,
    },
    /// `KVM_GET_MSRS` failed.
    #[error("reading MSRs of vCPU {vcpu}")]
    GetMsrs {
        /// The vCPU.
        vcpu: u8,
        /// KVM's error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An MSR list could not be built (more entries than KVM's limit).
    #[error("building an MSR list of {len} entries")]
    MsrList {
        /// Entries asked for.
        len: usize,
    },
}

/// The host's supported CPUID, patched for vCPU `vcpu` of `vcpus`: APIC ids, hypervisor bit.
pub fn vcpu_cpuid(supported: &CpuId, vcpu: u8) -> CpuId {
    let mut cpuid = supported.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x00ff_ffff) | (u32::from(vcpu) << 24);
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            // Extended topology: EDX holds the x2APIC id.
            0xb | 0x1f => e.edx = u32::from(vcpu),
            _ => {}
        }
    }
    cpuid
}

/// Reads `KVM_GET_SUPPORTED_CPUID`.
pub fn supported_cpuid(kvm: &Kvm) -> Result<CpuId, CpuError> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(CpuError::SupportedCpuid)
}

/// The MSR values a 64-bit guest starts with (zeroed syscall MSRs, TSC 0, fast strings, WB MTRR).
pub fn boot_msrs() -> Vec<(u32, u64)> {
    vec![
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_IA32_MISC_ENABLE, 1),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
}

fn msr_list(entries: &[(u32, u64)]) -> Result<Msrs, CpuError> {
    let raw: Vec<kvm_msr_entry> =
        entries.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
    Msrs::from_entries(&raw).map_err(|_| CpuError::MsrList { len: entries.len() })
}

/// Sets `entries` with `KVM_SET_MSRS`, checking the count KVM reports and naming a refused MSR.
pub fn set_msrs_checked(fd: &VcpuFd, vcpu: u8, entries: &[(u32, u64)]) -> Result<(), CpuError> {
    for chunk in entries.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let msrs = msr_list(chunk)?;
        let set = fd.set_msrs(&msrs).map_err(|source| CpuError::SetMsrs { vcpu, source })?;
        if set < chunk.len() {
            return Err(CpuError::MsrRefused { vcpu, msr: chunk[set].0, set, total: chunk.len() });
        }
    }
    Ok(())
}

/// Reads the MSRs `indices` with `KVM_GET_MSRS`; every one must be readable.
pub fn get_msrs(fd: &VcpuFd, vcpu: u8, indices: &[u32]) -> Result<Vec<(u32, u64)>, CpuError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(kvm_bindings::KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<(u32, u64)> = chunk.iter().map(|&i| (i, 0)).collect();
        let mut msrs = msr_list(&entries)?;
        let got = fd.get_msrs(&mut msrs).map_err(|source| CpuError::GetMsrs { vcpu, source })?;
        if got < chunk.len() {
            return Err(CpuError::MsrRefused { vcpu, msr: chunk[got], set: got, total: chunk.len() });
        }
        out.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

static SAVEABLE: OnceLock<Vec<u32>> = OnceLock::new();

/// Every MSR of `KVM_GET_MSR_INDEX_LIST` this host lets us read, in restore order (`IA32_TSC`
/// before `IA32_TSC_DEADLINE`). Probed once per process on `fd` and cached.
pub fn saveable_msrs(kvm: &Kvm, fd: &VcpuFd) -> &'static [u32] {
    SAVEABLE.get_or_init(|| {
        let Ok(list) = kvm.get_msr_index_list() else { return Vec::new() };
        let mut candidates: Vec<u32> = list.as_slice().to_vec();
        let mut ok = Vec::with_capacity(candidates.len());
        // KVM_GET_MSRS stops at the first MSR it cannot read: keep the prefix, drop that one, go on.
        while !candidates.is_empty() {
            let take = candidates.len().min(kvm_bindings::KVM_MAX_MSR_ENTRIES);
            let entries: Vec<(u32, u64)> = candidates[..take].iter().map(|&i| (i, 0)).collect();
            let Ok(mut msrs) = msr_list(&entries) else { break };
            let got = fd.get_msrs(&mut msrs).unwrap_or(0).min(take);
            ok.extend_from_slice(&candidates[..got]);
            candidates.drain(..(got + 1).min(candidates.len()));
        }
        if let Some(pos) = ok.iter().position(|&m| m == MSR_IA32_TSC_DEADLINE) {
            let m = ok.remove(pos);
            ok.push(m);
        }
        ok
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_carries_the_apic_id() {
        let entries = [
            kvm_cpuid_entry2 { function: 1, ebx: 0xff00_1234, ..Default::default() },
            kvm_cpuid_entry2 { function: 0xb, edx: 9, ..Default::default() },
        ];
        let base = CpuId::from_entries(&entries).unwrap();
        let c = vcpu_cpuid(&base, 3);
        assert_eq!(c.as_slice()[0].ebx, 0x0300_1234);
        assert_ne!(c.as_slice()[0].ecx & (1 << 31), 0);
        assert_eq!(c.as_slice()[1].edx, 3);
    }
}
