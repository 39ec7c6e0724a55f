//! Linux boot: ELF vmlinux or bzImage via `linux-loader`, zero page, e820, command line, initramfs.
//!
//! The kernel enters at its 64-bit entry point (ELF `e_entry`, or bzImage load address + 0x200)
//! in long mode at CPL 0, with RSI pointing at the zero page, as the Linux x86 boot protocol
//! describes for 64-bit entry. Only vCPU 0 runs; the others wait for INIT/SIPI from the kernel.
//! The end-to-end boot of a real kernel is exercised by the devices work (it needs guest assets,
//! and on software KVM CPL-0 code is emulated too slowly for a full boot).

use std::fs::File;
use std::path::PathBuf;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{KernelLoader, KernelLoaderResult, bzimage::BzImage, elf::Elf, load_cmdline};
use vm_memory::{Address, GuestAddress, GuestMemoryBackend};

use super::{BootError, BootInfo, BootPayload, Cpl, EntryPoint};
use crate::config::MMIO_HOLE_START;
use crate::memory::GuestMemory;

/// Zero page (`boot_params`) address.
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Command line address.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line, including the NUL.
pub const CMDLINE_MAX: usize = 4096;
/// Where kernels may start loading.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the EBDA: low RAM in e820 ends here.
pub const EBDA_START: u64 = 0x9_fc00;
/// Top of the kernel boot stack.
pub const BOOT_STACK: u64 = 0x8ff0;

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// The bzImage 64-bit entry point is this far past the protected-mode kernel's load address.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// A Linux kernel to boot.
#[derive(Debug, Clone)]
pub struct LinuxBoot {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Optional initramfs (cpio, possibly compressed).
    pub initramfs: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
}

fn open(path: &PathBuf) -> Result<File, BootError> {
    File::open(path).map_err(|source| BootError::Open { path: path.clone(), source })
}

/// Loads the kernel as ELF, then as bzImage; returns the load result and the 64-bit entry.
fn load_kernel(mem: &GuestMemory, path: &PathBuf) -> Result<(KernelLoaderResult, u64), BootError> {
    let mut file = open(path)?;
    let elf_err = match Elf::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => return Ok((r, r.kernel_load.raw_value())),
        Err(e) => e,
    };
    let mut file = open(path)?;
    match BzImage::load(mem, None, &mut file, Some(GuestAddress(HIMEM_START))) {
        Ok(r) => Ok((r, r.kernel_load.raw_value() + BZIMAGE_64BIT_ENTRY_OFFSET)),
        Err(bz_err) => Err(BootError::NotAKernel {
            path: path.clone(),
            reason: format!("as ELF: {elf_err}; as bzImage: {bz_err}"),
        }),
    }
}

/// The e820 map: low RAM below the EBDA, then every RAM range from 1 MiB up.
pub fn e820_map(mem: &GuestMemory) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry { addr: 0, size: EBDA_START, r#type: E820_RAM }];
    for r in mem.iter() {
        use vm_memory::GuestMemoryRegion;
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push(boot_e820_entry { addr: start, size: end - start, r#type: E820_RAM });
        }
    }
    map
}

impl BootPayload for LinuxBoot {
    fn load(&self, mem: &GuestMemory, info: &BootInfo) -> Result<EntryPoint, BootError> {
        let (kernel, entry) = load_kernel(mem, &self.kernel)?;
        let cmdline = Cmdline::try_from(&self.cmdline, CMDLINE_MAX)
            .map_err(|e| BootError::BootParams(format!("command line: {e}")))?;
        load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cmdline)
            .map_err(|e| BootError::BootParams(format!("writing the command line: {e}")))?;

        let mut params = boot_params::default();
        if let Some(hdr) = kernel.setup_header {
            params.hdr = hdr;
        } else {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
        params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
        params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
        params.hdr.cmdline_size = (self.cmdline.len() + 1) as u32;

        if let Some(path) = &self.initramfs {
            let data =
                std::fs::read(path).map_err(|source| BootError::Open { path: path.clone(), source })?;
            let low_top = info.mem_top.min(MMIO_HOLE_START);
            let size = data.len() as u64;
            let addr = low_top.checked_sub(size).map(|a| a & !0xfff);
            let kernel_end = kernel.kernel_load.raw_value() + kernel.kernel_end;
            let Some(addr) = addr.filter(|&a| a >= kernel_end.max(HIMEM_START)) else {
                return Err(BootError::InitramfsTooBig { size, limit: low_top });
            };
            super::write(mem, "initramfs", addr, &data)?;
            params.hdr.ramdisk_image = addr as u32;
            params.hdr.ramdisk_size = size as u32;
        }

        let map = e820_map(mem);
        if map.len() > params.e820_table.len() {
            return Err(BootError::BootParams(format!("{} e820 entries", map.len())));
        }
        params.e820_table[..map.len()].copy_from_slice(&map);
        params.e820_entries = map.len() as u8;
        LinuxBootConfigurator::write_bootparams::<GuestMemory>(
            &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_ADDR)),
            mem,
        )
        .map_err(|e| BootError::BootParams(format!("writing the zero page: {e}")))?;

        super::write_long_mode_tables(mem, Cpl::Kernel, info.mem_top)?;
        Ok(EntryPoint {
            rip: entry,
            cpl: Cpl::Kernel,
            rsi: ZERO_PAGE_ADDR,
            stack_top: BOOT_STACK,
            stack_stride: 0,
            all_vcpus_run: false,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RamRange;
    use crate::memory::create_guest_memory;
    use std::io::Write;
    use vm_memory::Bytes;

    /// A minimal x86-64 ELF executable: one PT_LOAD segment of `code` at `paddr`.
    fn tiny_elf(paddr: u64, code: &[u8]) -> Vec<u8> {
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        f.extend_from_slice(&0x3eu16.to_le_bytes()); // EM_X86_64
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&paddr.to_le_bytes()); // e_entry
        f.extend_from_slice(&64u64.to_le_bytes()); // e_phoff
        f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes()); // ehsize, phentsize, phnum, shentsize, shnum, shstrndx
        }
        let off = 64 + 56u64;
        f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
        f.extend_from_slice(&5u32.to_le_bytes()); // R+X
        for v in [off, paddr, paddr, code.len() as u64, code.len() as u64, 0x1000] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(code);
        f
    }

    fn temp_file(name: &str, bytes: &[u8]) -> PathBuf {
        let p = std::env::temp_dir().join(format!("vcore-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        p
    }

    #[test]
    fn elf_kernel_loads_with_zero_page_and_initramfs() {
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size: 64 << 20 }]).unwrap();
        let kernel = temp_file("kernel.elf", &tiny_elf(0x20_0000, &[0x90, 0x90, 0xf4]));
        let initrd = temp_file("initrd", &[7u8; 5000]);
        let boot = LinuxBoot {
            kernel: kernel.clone(),
            initramfs: Some(initrd.clone()),
            cmdline: "console=ttyS0".into(),
        };
        let info = BootInfo { mem_top: 64 << 20, tsc_hz: 0, vcpus: 1 };
        let entry = boot.load(&mem, &info).unwrap();
        assert_eq!(entry.rip, 0x20_0000);
        assert_eq!(entry.rsi, ZERO_PAGE_ADDR);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x20_0002)).unwrap(), 0xf4);
        let params: boot_params = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR)).unwrap();
        assert_eq!({ params.hdr.cmd_line_ptr }, CMDLINE_ADDR as u32);
        assert_eq!({ params.hdr.ramdisk_size }, 5000);
        let rd = { params.hdr.ramdisk_image } as u64;
        assert_eq!(mem.read_obj::<u8>(GuestAddress(rd + 4999)).unwrap(), 7);
        assert_eq!(params.e820_entries, 2);
        let mut cmd = [0u8; 14];
        mem.read_slice(&mut cmd, GuestAddress(CMDLINE_ADDR)).unwrap();
        assert_eq!(&cmd, b"console=ttyS0\0");
        let _ = std::fs::remove_file(kernel);
        let _ = std::fs::remove_file(initrd);
    }

    #[test]
    fn not_a_kernel_is_a_typed_error() {
        let mem = create_guest_memory(&[RamRange { guest_addr: 0, size: 16 << 20 }]).unwrap();
        let junk = temp_file("junk", b"this is not a kernel, just some text that is long enough to read");
        let boot = LinuxBoot { kernel: junk.clone(), initramfs: None, cmdline: String::new() };
        let info = BootInfo { mem_top: 16 << 20, tsc_hz: 0, vcpus: 1 };
        assert!(matches!(boot.load(&mem, &info), Err(BootError::NotAKernel { .. })));
        let missing =
            LinuxBoot { kernel: "/nonexistent/vmlinux".into(), initramfs: None, cmdline: String::new() };
        assert!(matches!(missing.load(&mem, &info), Err(BootError::Open { .. })));
        let _ = std::fs::remove_file(junk);
    }
}
