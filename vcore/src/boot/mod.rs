//! Booting: 64-bit long-mode entry from builder-set state, and Linux kernel loading.
//!
//! Fixed low-memory layout used by every payload (guest-physical addresses):
//!
//! | address | what |
//! |---|---|
//! | `0x0500` | GDT: null, kernel code (0x08), kernel data (0x10), user code (0x18), user data (0x20), TSS (0x28) |
//! | `0x1000` | 64-bit TSS with an all-open I/O permission bitmap (`0x1000..0x306a`) |
//! | `0x6000` | built-in guest config page ([`crate::guest`]) |
//! | `0x7000` | Linux zero page (`boot_params`) |
//! | `0x8000..0x9000` | boot stack (top `0x9000`); built-in guests' vCPU stacks are `0x4000..0x6000` |
//! | `0x9000` | PML4; `0xA000` PDPT; `0xB000..` page directories (2 MiB pages) |
//! | `0x20000` | Linux command line |
//! | `0x100000` | built-in guest code; Linux kernels load at their own address (≥ 1 MiB) |
//!
//! The identity map covers the first 4 GiB (so MMIO in the 32-bit hole is reachable) and RAM
//! above it up to 16 GiB. For CPL-3 payloads every page is a user page and RFLAGS.IOPL is 3, so guest code can
//! use port I/O without entering the kernel; it then runs natively even on software KVM.

pub mod linux;

use kvm_bindings::{kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use crate::memory::GuestMemory;

/// GDT address.
pub const GDT_ADDR: u64 = 0x500;
/// TSS address.
pub const TSS_ADDR: u64 = 0x1000;
/// TSS size: 104 bytes, an I/O permission bitmap for all 65536 ports, and its terminating byte.
pub const TSS_LEN: u64 = 104 + 8192 + 1;
/// Top of the boot stack.
pub const BOOT_STACK_TOP: u64 = 0x9000;
/// PML4 address.
pub const PML4_ADDR: u64 = 0x9000;
/// PDPT address.
pub const PDPT_ADDR: u64 = 0xA000;
/// First page directory.
pub const PD_ADDR: u64 = 0xB000;
/// Identity-mapped span always covered, including the 32-bit MMIO hole.
pub const MIN_IDENTITY_MAP: u64 = 4 << 30;
/// Largest identity-mapped span: 16 page directories end at `0x1B000`, below the command line.
pub const MAX_IDENTITY_MAP: u64 = 16 << 30;

/// Kernel code selector.
pub const KERNEL_CS: u16 = 0x08;
/// Kernel data selector.
pub const KERNEL_DS: u16 = 0x10;
/// User code selector (RPL 3).
pub const USER_CS: u16 = 0x18 | 3;
/// User data selector (RPL 3).
pub const USER_DS: u16 = 0x20 | 3;
/// TSS selector.
pub const TSS_SEL: u16 = 0x28;

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const RFLAGS_RESERVED: u64 = 1 << 1;
const RFLAGS_IOPL3: u64 = 3 << 12;

/// Privilege level the payload runs at.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Cpl {
    /// Kernel mode (Linux).
    Kernel,
    /// User mode with IOPL 3 (the built-in guests).
    User,
}

/// How the vCPUs start: where, at which privilege level, with which registers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryPoint {
    /// First instruction.
    pub rip: u64,
    /// Privilege level.
    pub cpl: Cpl,
    /// Value of RSI (Linux: the zero page).
    pub rsi: u64,
    /// Stack top of vCPU 0; vCPU `n` gets `stack_top - n * stack_stride`.
    pub stack_top: u64,
    /// Distance between vCPU stacks.
    pub stack_stride: u64,
    /// Whether vCPUs other than 0 start running too (built-in guests) or wait for INIT/SIPI (Linux).
    pub all_vcpus_run: bool,
}

/// What a payload learns about the VM it is loaded into.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BootInfo {
    /// One past the highest guest RAM address.
    pub mem_top: u64,
    /// Guest TSC frequency in Hz, 0 if the host does not report it.
    pub tsc_hz: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
}

/// Something that can be loaded into guest memory and started: a built-in guest or a kernel.
pub trait BootPayload: std::fmt::Debug + Send + Sync {
    /// Writes the payload into `mem` and says how the vCPUs start.
    fn load(&self, mem: &GuestMemory, info: &BootInfo) -> Result<EntryPoint, BootError>;
}

/// Errors of loading a payload.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// Writing boot structures or code into guest memory failed (memory too small?).
    #[error("writing {what} at {addr:#x} into guest memory")]
    GuestWrite {
        /// What was being written.
        what: &'static str,
        /// Where.
        addr: u64,
        /// vm-memory's error.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The kernel file could not be opened or read.
    #[error("opening kernel or initramfs {path}")]
    Open {
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The file is neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a Linux kernel (neither ELF nor bzImage): {reason}")]
    NotAKernel {
        /// The file.
        path: std::path::PathBuf,
        /// What the loaders said.
        reason: String,
    },
    /// A boot structure (command line, boot params, e820) could not be built.
    #[error("building Linux boot parameters: {0}")]
    BootParams(String),
    /// The initramfs does not fit in low memory.
    #[error("initramfs of {size} bytes does not fit below {limit:#x}")]
    InitramfsTooBig {
        /// Its size.
        size: u64,
        /// The highest usable address.
        limit: u64,
    },
    /// Payload parameters are invalid.
    #[error("invalid payload parameters: {0}")]
    Invalid(String),
}

pub(crate) fn write(mem: &GuestMemory, what: &'static str, addr: u64, bytes: &[u8]) -> Result<(), BootError> {
    mem.write_slice(bytes, GuestAddress(addr)).map_err(|source| BootError::GuestWrite { what, addr, source })
}

/// 8-byte GDT descriptor from flags (access byte | flags nibble << 12), base and limit.
const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | ((limit as u64 & 0x000f_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The GDT: code/data for CPL 0 and 3, and a 16-byte 64-bit TSS descriptor.
pub fn gdt() -> [u64; 7] {
    let tss_low = gdt_entry(0x0089, TSS_ADDR as u32, (TSS_LEN - 1) as u32);
    [
        0,
        gdt_entry(0xa09b, 0, 0xfffff), // kernel code: L, P, DPL 0, exec/read, accessed
        gdt_entry(0xc093, 0, 0xfffff), // kernel data: D/B, G, P, DPL 0, read/write
        gdt_entry(0xa0fb, 0, 0xfffff), // user code: DPL 3
        gdt_entry(0xc0f3, 0, 0xfffff), // user data: DPL 3
        tss_low,
        TSS_ADDR >> 32, // upper half of the 16-byte TSS descriptor
    ]
}

fn segment(selector: u16, code: bool, cpl: u8) -> kvm_segment {
    kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_: if code { 0xb } else { 0x3 },
        present: 1,
        dpl: cpl,
        db: u8::from(!code),
        s: 1,
        l: u8::from(code),
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Writes GDT, TSS and identity page tables covering `max(4 GiB, mem_top)` (at most 16 GiB).
pub fn write_long_mode_tables(mem: &GuestMemory, cpl: Cpl, mem_top: u64) -> Result<(), BootError> {
    let gdt: Vec<u8> = gdt().iter().flat_map(|e| e.to_le_bytes()).collect();
    write(mem, "GDT", GDT_ADDR, &gdt)?;
    // IOPL 3 already allows every port at CPL 3 on hardware; the all-zero I/O bitmap allows them
    // too where the bitmap is consulted anyway (kvm-pvm faults on port I/O without one).
    let mut tss = vec![0u8; TSS_LEN as usize];
    tss[4..12].copy_from_slice(&BOOT_STACK_TOP.to_le_bytes()); // RSP0
    tss[102..104].copy_from_slice(&104u16.to_le_bytes()); // I/O map base
    tss[TSS_LEN as usize - 1] = 0xff; // bitmap terminator
    write(mem, "TSS", TSS_ADDR, &tss)?;
    let user = if cpl == Cpl::User { 4 } else { 0 };
    let span = mem_top.clamp(MIN_IDENTITY_MAP, MAX_IDENTITY_MAP);
    let pds = span.div_ceil(1 << 30);
    write(mem, "PML4", PML4_ADDR, &(PDPT_ADDR | 3 | user).to_le_bytes())?;
    let pdpt: Vec<u8> = (0..pds).flat_map(|i| ((PD_ADDR + i * 0x1000) | 3 | user).to_le_bytes()).collect();
    write(mem, "PDPT", PDPT_ADDR, &pdpt)?;
    let pd: Vec<u8> = (0..pds * 512).flat_map(|i| ((i << 21) | 0x83 | user).to_le_bytes()).collect();
    write(mem, "page directories", PD_ADDR, &pd)
}

/// Special registers for 64-bit mode at `cpl`, starting from the vCPU's current `sregs`.
pub fn long_mode_sregs(mut sregs: kvm_sregs, cpl: Cpl) -> kvm_sregs {
    let (cs, ds, dpl) = match cpl {
        Cpl::Kernel => (KERNEL_CS, KERNEL_DS, 0),
        Cpl::User => (USER_CS, USER_DS, 3),
    };
    sregs.cs = segment(cs, true, dpl);
    let data = segment(ds, false, dpl);
    (sregs.ds, sregs.es, sregs.fs, sregs.gs, sregs.ss) = (data, data, data, data, data);
    sregs.tr = kvm_segment {
        base: TSS_ADDR,
        limit: (TSS_LEN - 1) as u32,
        selector: TSS_SEL,
        type_: 0xb, // busy 64-bit TSS
        present: 1,
        ..Default::default()
    };
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt().len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0; // no IDT: an exception is a triple fault, reported as an event
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = PML4_ADDR;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA;
    sregs
}

/// General registers of vCPU `vcpu` at `entry`: RIP, stack, RSI, RDI = vCPU index, RFLAGS.
pub fn entry_regs(entry: &EntryPoint, vcpu: u8) -> kvm_regs {
    let rsp = entry.stack_top - u64::from(vcpu) * entry.stack_stride;
    kvm_regs {
        rip: entry.rip,
        rsp,
        rbp: rsp,
        rsi: entry.rsi,
        rdi: u64::from(vcpu),
        rflags: RFLAGS_RESERVED | if entry.cpl == Cpl::User { RFLAGS_IOPL3 } else { 0 },
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RamRange;
    use crate::memory::create_guest_memory;

    #[test]
    fn gdt_descriptors_match_known_encodings() {
        let g = gdt();
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        assert_eq!(g[2], 0x00cf_9300_0000_ffff);
        assert_eq!(g[3], 0x00af_fb00_0000_ffff);
        assert_eq!(g[4], 0x00cf_f300_0000_ffff);
    }

    #[test]
    fn page_tables_map_identity_with_user_bit() {
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size: 8 << 20 }]).unwrap();
        write_long_mode_tables(&mem, Cpl::User, 8 << 20).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(PML4_ADDR)).unwrap();
        assert_eq!(pml4, PDPT_ADDR | 7);
        let pdpt3: u64 = mem.read_obj(GuestAddress(PDPT_ADDR + 3 * 8)).unwrap();
        assert_eq!(pdpt3, (PD_ADDR + 0x3000) | 7);
        // The PD entry for 0xD000_0000 (in the MMIO hole) maps it to itself.
        let idx = 0xD000_0000u64 >> 21;
        let pde: u64 = mem.read_obj(GuestAddress(PD_ADDR + idx * 8)).unwrap();
        assert_eq!(pde & !0xfff, 0xD000_0000);
        let sregs = long_mode_sregs(kvm_sregs::default(), Cpl::User);
        assert_eq!(sregs.cs.selector & 3, 3);
        assert_eq!(sregs.ss.dpl, 3);
        let e = EntryPoint {
            rip: 0x100000,
            cpl: Cpl::User,
            rsi: 0,
            stack_top: 0x6000,
            stack_stride: 0x400,
            all_vcpus_run: true,
        };
        let r = entry_regs(&e, 2);
        assert_eq!((r.rsp, r.rdi, r.rflags), (0x5800, 2, 0x3002));
    }
}
