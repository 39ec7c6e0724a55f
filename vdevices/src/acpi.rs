//! ACPI tables so a stock kernel finds the virtio-mmio devices: RSDP, XSDT, FADT (hardware-reduced),
//! MADT (local APICs, IOAPIC) and a DSDT with one `LNRO0005` device per virtio-mmio transport
//! (its register window and interrupt) plus COM1. The Debian kernel has
//! `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES` off, so this is how it discovers virtio-mmio (as on
//! Firecracker). [`LinuxAcpiBoot`] loads a kernel with vcore's loader and adds the tables.

use acpi_tables::madt::{EnabledStatus, IoApic, LocalInterruptController, MADT, ProcessorLocalApic};
use acpi_tables::{Aml, aml, fadt, rsdp::Rsdp, sdt::Sdt, xsdt::XSDT};
use serde::{Deserialize, Serialize};
use vcore::boot::linux::{LinuxBoot, ZERO_PAGE_ADDR};
use vcore::boot::{BootInfo, BootPayload, EntryPoint};
use vcore::{BootError, GuestMemory};
use vm_memory::{Bytes, GuestAddress};

/// Where the RSDP goes (the BIOS area Linux scans; also passed in the zero page).
pub const RSDP_ADDR: u64 = 0x000e_0000;
/// Where the other tables start.
pub const TABLES_ADDR: u64 = 0x000e_1000;
/// End of the area the tables may use.
pub const TABLES_END: u64 = 0x0010_0000;
/// The IOAPIC's MMIO address.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// The local APIC's MMIO address.
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
/// Offset of `acpi_rsdp_addr` in the zero page.
const ZERO_PAGE_RSDP: u64 = 0x070;
const OEM_ID: [u8; 6] = *b"VINFRA";
const OEM_TABLE: [u8; 8] = *b"VINFRAVM";

/// One virtio-mmio device as the guest discovers it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioMmioDevice {
    /// Register window base (4 KiB window).
    pub base: u64,
    /// GSI of its interrupt (edge-triggered, active high: an irqfd).
    pub gsi: u32,
}

/// What the tables describe.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AcpiConfig {
    /// vCPUs (one local APIC each).
    pub vcpus: u8,
    /// virtio-mmio devices.
    pub virtio: Vec<VirtioMmioDevice>,
    /// Describe COM1 (0x3f8, IRQ 4).
    #[serde(default)]
    pub com1: bool,
}

/// Errors of building or placing the tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// A device window is not a 4 KiB window below 4 GiB.
    #[error("virtio-mmio window {0:#x} must be 4 KiB aligned and below 4 GiB")]
    BadWindow(u64),
    /// No vCPU.
    #[error("ACPI tables need at least one vCPU")]
    NoVcpu,
    /// The tables do not fit their area.
    #[error("ACPI tables of {0} bytes do not fit")]
    TooBig(usize),
    /// Writing guest memory failed.
    #[error("writing ACPI tables")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

/// The built tables and where each goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AcpiTables {
    /// `(guest address, bytes)` of the RSDP, XSDT, FADT, MADT and DSDT, in that order.
    pub tables: Vec<(u64, Vec<u8>)>,
}

fn aml_bytes(a: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    a.to_aml_bytes(&mut v);
    v
}

/// The DSDT's AML body (without the table header).
pub fn dsdt_aml(cfg: &AcpiConfig) -> Result<Vec<u8>, AcpiError> {
    let mut body = Vec::new();
    for (i, d) in cfg.virtio.iter().enumerate() {
        let base =
            u32::try_from(d.base).ok().filter(|b| b % 0x1000 == 0).ok_or(AcpiError::BadWindow(d.base))?;
        let hid = aml::Name::new("_HID".into(), &"LNRO0005");
        let uid = aml::Name::new("_UID".into(), &(i as u32));
        let mem = aml::Memory32Fixed::new(true, base, 0x1000);
        let irq = aml::Interrupt::new(true, true, false, false, d.gsi);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&mem, &irq]));
        let name = format!("V{i:03X}");
        let dev = aml::Device::new(name.as_str().into(), vec![&hid, &uid, &crs]);
        body.extend(aml_bytes(&dev));
    }
    if cfg.com1 {
        let hid = aml::Name::new("_HID".into(), &aml::EISAName::new("PNP0501"));
        let uid = aml::Name::new("_UID".into(), &aml::ZERO);
        let io = aml::IO::new(0x3f8, 0x3f8, 1, 8);
        let irq = aml::Interrupt::new(true, true, false, false, 4);
        let crs = aml::Name::new("_CRS".into(), &aml::ResourceTemplate::new(vec![&io, &irq]));
        body.extend(aml_bytes(&aml::Device::new("COM1".into(), vec![&hid, &uid, &crs])));
    }
    Ok(aml_bytes(&aml::Scope::new("\\_SB_".into(), vec![&RawAml(body)])))
}

struct RawAml(Vec<u8>);

impl Aml for RawAml {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

/// Builds every table for `cfg`, laid out from [`TABLES_ADDR`].
pub fn build(cfg: &AcpiConfig) -> Result<AcpiTables, AcpiError> {
    if cfg.vcpus == 0 {
        return Err(AcpiError::NoVcpu);
    }
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, OEM_TABLE, 1);
    dsdt.append_slice(&dsdt_aml(cfg)?);
    let dsdt = dsdt.as_slice().to_vec();

    let mut madt = MADT::new(OEM_ID, OEM_TABLE, 1, LocalInterruptController::Address(LAPIC_ADDR));
    for id in 0..cfg.vcpus {
        madt.add_structure(ProcessorLocalApic::new(id, id, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(0, IOAPIC_ADDR, 0));
    let madt = aml_bytes(&madt);

    let align = |a: u64| (a + 15) & !15;
    let dsdt_addr = TABLES_ADDR;
    let madt_addr = align(dsdt_addr + dsdt.len() as u64);
    let fadt_addr = align(madt_addr + madt.len() as u64);
    let fadt = fadt::FADTBuilder::new(OEM_ID, OEM_TABLE, 1)
        .flag(fadt::Flags::HwReducedAcpi)
        .flag(fadt::Flags::PwrButton)
        .flag(fadt::Flags::SlpButton)
        .dsdt_64(dsdt_addr)
        .finalize();
    let fadt = aml_bytes(&fadt);
    let xsdt_addr = align(fadt_addr + fadt.len() as u64);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE, 1);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    let xsdt = aml_bytes(&xsdt);
    let end = xsdt_addr + xsdt.len() as u64;
    if end > TABLES_END {
        return Err(AcpiError::TooBig((end - TABLES_ADDR) as usize));
    }
    let rsdp = aml_bytes(&Rsdp::new(OEM_ID, xsdt_addr));
    Ok(AcpiTables {
        tables: vec![
            (RSDP_ADDR, rsdp),
            (xsdt_addr, xsdt),
            (fadt_addr, fadt),
            (madt_addr, madt),
            (dsdt_addr, dsdt),
        ],
    })
}

/// Writes the tables of `cfg` into `mem`; returns the RSDP address.
pub fn write(mem: &GuestMemory, cfg: &AcpiConfig) -> Result<u64, AcpiError> {
    for (addr, bytes) in build(cfg)?.tables {
        mem.write_slice(&bytes, GuestAddress(addr))?;
    }
    Ok(RSDP_ADDR)
}

/// A Linux kernel booted by vcore's loader, with ACPI tables describing the devices (the RSDP
/// address also goes into the zero page's `acpi_rsdp_addr`).
#[derive(Debug, Clone)]
pub struct LinuxAcpiBoot {
    /// Kernel, initramfs, command line.
    pub linux: LinuxBoot,
    /// What the tables describe (`vcpus` is taken from the VM).
    pub acpi: AcpiConfig,
}

impl BootPayload for LinuxAcpiBoot {
    fn load(&self, mem: &GuestMemory, info: &BootInfo) -> Result<EntryPoint, BootError> {
        let entry = self.linux.load(mem, info)?;
        let cfg = AcpiConfig { vcpus: info.vcpus, ..self.acpi.clone() };
        let rsdp = write(mem, &cfg).map_err(|e| BootError::BootParams(format!("ACPI: {e}")))?;
        mem.write_obj(rsdp, GuestAddress(ZERO_PAGE_ADDR + ZERO_PAGE_RSDP)).map_err(|source| {
            BootError::GuestWrite { what: "acpi_rsdp_addr", addr: ZERO_PAGE_ADDR + ZERO_PAGE_RSDP, source }
        })?;
        Ok(entry)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, &x| a.wrapping_add(x))
    }

    fn cfg() -> AcpiConfig {
        AcpiConfig {
            vcpus: 2,
            virtio: vec![
                VirtioMmioDevice { base: 0xd000_0000, gsi: 5 },
                VirtioMmioDevice { base: 0xd000_1000, gsi: 6 },
                VirtioMmioDevice { base: 0xd000_2000, gsi: 7 },
            ],
            com1: true,
        }
    }

    #[test]
    fn checksums_and_links() {
        let t = build(&cfg()).unwrap().tables;
        let (rsdp_addr, rsdp) = &t[0];
        assert_eq!(*rsdp_addr, RSDP_ADDR);
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
        assert_eq!(sum(&rsdp[..36]), 0, "RSDP extended checksum");
        let xsdt_addr = u64::from_le_bytes(rsdp[24..32].try_into().unwrap());
        let by_addr = |a: u64| t.iter().find(|(x, _)| *x == a).map(|(_, b)| b.clone()).unwrap();
        let xsdt = by_addr(xsdt_addr);
        assert_eq!(&xsdt[..4], b"XSDT");
        for (_, table) in &t[1..] {
            let len = u32::from_le_bytes(table[4..8].try_into().unwrap()) as usize;
            assert_eq!(len, table.len(), "{}", String::from_utf8_lossy(&table[..4]));
            assert_eq!(sum(table), 0, "{} checksum", String::from_utf8_lossy(&table[..4]));
        }
        let entries: Vec<u64> =
            xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        let sigs: Vec<Vec<u8>> = entries.iter().map(|&a| by_addr(a)[..4].to_vec()).collect();
        assert_eq!(sigs, vec![b"FACP".to_vec(), b"APIC".to_vec()]);
        let fadt = by_addr(entries[0]);
        let x_dsdt = u64::from_le_bytes(fadt[140..148].try_into().unwrap());
        assert_eq!(&by_addr(x_dsdt)[..4], b"DSDT");
        let flags = u32::from_le_bytes(fadt[112..116].try_into().unwrap());
        assert!(flags & (1 << 20) != 0, "hardware-reduced ACPI");
        // MADT: two enabled local APICs and one IOAPIC.
        let madt = by_addr(entries[1]);
        let mut i = 44;
        let (mut lapics, mut ioapics) = (0, 0);
        while i < madt.len() {
            match madt[i] {
                0 => {
                    assert_eq!(madt[i + 4] & 1, 1);
                    lapics += 1
                }
                1 => {
                    assert_eq!(u32::from_le_bytes(madt[i + 4..i + 8].try_into().unwrap()), IOAPIC_ADDR);
                    ioapics += 1
                }
                _ => {}
            }
            i += madt[i + 1] as usize;
        }
        assert_eq!((lapics, ioapics), (2, 1));
    }

    #[test]
    fn dsdt_lists_every_device_with_window_and_interrupt() {
        let c = cfg();
        let t = build(&c).unwrap().tables;
        let dsdt = &t[4].1;
        let body = &dsdt[36..];
        let find = |needle: &[u8], from: usize| {
            body[from..].windows(needle.len()).position(|w| w == needle).map(|p| p + from)
        };
        let mut at = 0;
        for (i, d) in c.virtio.iter().enumerate() {
            let name = format!("V{i:03X}");
            at = find(name.as_bytes(), at).unwrap_or_else(|| panic!("device {name}"));
            let hid = find(b"LNRO0005\0", at).unwrap();
            // Memory32Fixed(ReadWrite, base, 0x1000), then Interrupt(Consumer, Edge, High, Excl) {gsi}.
            let mut mem = vec![0x86, 0x09, 0x00, 0x01];
            mem.extend_from_slice(&(d.base as u32).to_le_bytes());
            mem.extend_from_slice(&0x1000u32.to_le_bytes());
            let m = find(&mem, hid).unwrap();
            let mut irq = vec![0x89, 0x06, 0x00, 0x03, 0x01];
            irq.extend_from_slice(&d.gsi.to_le_bytes());
            assert_eq!(find(&irq, m), Some(m + mem.len()), "interrupt of {name}");
            at = m;
        }
        assert!(find(b"COM1", 0).is_some());
        let count = body.windows(9).filter(|w| w == b"LNRO0005\0").count();
        assert_eq!(count, 3);
    }

    #[test]
    fn bad_configs_are_typed_errors() {
        let mut c = cfg();
        c.virtio[0].base = 0xd000_0800;
        assert!(matches!(build(&c), Err(AcpiError::BadWindow(_))));
        c.virtio[0].base = 0x1_0000_0000;
        assert!(matches!(build(&c), Err(AcpiError::BadWindow(_))));
        assert!(matches!(build(&AcpiConfig::default()), Err(AcpiError::NoVcpu)));
        let many = AcpiConfig {
            vcpus: 1,
            virtio: (0..4000).map(|i| VirtioMmioDevice { base: 0xd000_0000 + i * 0x1000, gsi: 5 }).collect(),
            com1: false,
        };
        assert!(matches!(build(&many), Err(AcpiError::TooBig(_))));
    }

    #[test]
    fn linux_payload_sets_the_rsdp_in_the_zero_page() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let kernel = std::env::temp_dir().join(format!("vdevices-acpi-{}.elf", std::process::id()));
        std::fs::write(&kernel, tiny_elf(0x20_0000)).unwrap();
        let boot = LinuxAcpiBoot {
            linux: LinuxBoot { kernel: kernel.clone(), initramfs: None, cmdline: "console=ttyS0".into() },
            acpi: cfg(),
        };
        let info = BootInfo { mem_top: 64 << 20, tsc_hz: 0, vcpus: 3 };
        boot.load(&mem, &info).unwrap();
        let rsdp: u64 = mem.read_obj(GuestAddress(ZERO_PAGE_ADDR + ZERO_PAGE_RSDP)).unwrap();
        assert_eq!(rsdp, RSDP_ADDR);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(RSDP_ADDR)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
        let _ = std::fs::remove_file(kernel);
    }

    /// A minimal x86-64 ELF executable with one PT_LOAD segment at `paddr`.
    fn tiny_elf(paddr: u64) -> Vec<u8> {
        let code = [0x90u8, 0x90, 0xf4];
        let mut f = Vec::new();
        f.extend_from_slice(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0");
        f.extend_from_slice(&2u16.to_le_bytes());
        f.extend_from_slice(&0x3eu16.to_le_bytes());
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&paddr.to_le_bytes());
        f.extend_from_slice(&64u64.to_le_bytes());
        f.extend_from_slice(&0u64.to_le_bytes());
        f.extend_from_slice(&0u32.to_le_bytes());
        for v in [64u16, 56, 1, 64, 0, 0] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        let off = 64 + 56u64;
        f.extend_from_slice(&1u32.to_le_bytes());
        f.extend_from_slice(&5u32.to_le_bytes());
        for v in [off, paddr, paddr, code.len() as u64, code.len() as u64, 0x1000] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        f.extend_from_slice(&code);
        f
    }
}
