//! `virtio_rng`: a built-in CPL-3 guest that drives a virtio-rng device by itself.
//!
//! vCPU 0 prints a line to COM1 (`0x3f8`), brings the device at [`VirtioRng::mmio_base`] up through its virtio-mmio registers
//! (reset, `VIRTIO_F_VERSION_1`, one queue of 8 entries at [`DESC_ADDR`], `DRIVER_OK`), then
//! `iterations` times: posts one device-writable descriptor of `buf_len` bytes at [`BUF_ADDR`],
//! publishes it in the available ring, reads the TSC, writes `QueueNotify` (an ioeventfd in KVM,
//! or an MMIO exit to the transport), polls the used ring until the device has answered, reads
//! the TSC again, then prints `done` to COM1. It records the cycles of each round trip (total, min, max) and the first random
//! bytes in its result area, and writes the number of completed requests to
//! [`vcore::guest::EXIT_PORT`] (`0xdead` if the device refused the features). Interrupts stay
//! disabled (CPL 3, IF 0): the guest polls; the device still raises its irqfd.

use serde::{Deserialize, Serialize};
use vcore::BootError;
use vcore::boot::BootInfo;
use vcore::guest::{BuiltinGuest, CONFIG_ADDR};
use vm_memory::{Bytes, GuestAddress};

/// Descriptor table of the guest's queue (the available ring follows at +0x1000, the used ring
/// at +0x2000).
pub const DESC_ADDR: u64 = 0x20_0000;
/// The guest's receive buffer.
pub const BUF_ADDR: u64 = 0x20_3000;
/// Largest buffer the guest may ask for.
pub const MAX_BUF_LEN: u32 = 0x1_0000;
/// Where the guest writes its results (in its config page).
pub const RESULT_ADDR: u64 = CONFIG_ADDR + 0x100;
/// Exit code of a guest whose device refused `FEATURES_OK`.
pub const FAIL_CODE: u32 = 0xdead;

#[rustfmt::skip]
core::arch::global_asm!(
    ".pushsection .rodata.vinfra_guest_virtio_rng,\"a\"",
    ".balign 16",
    ".globl vinfra_guest_virtio_rng_start",
    ".hidden vinfra_guest_virtio_rng_start",
    "vinfra_guest_virtio_rng_start:",
    // Entry at CPL 3, IOPL 3, IF 0; RDI = vCPU index. Other vCPUs just spin.
    "    test rdi, rdi",
    "    jnz .Lvr_ap",
    "    lea rsi, [rip + .Lvr_hello]",
    "    call .Lvr_print",
    "    mov rbx, qword ptr [0x6008]",          // MMIO base of the device
    "    mov r12, qword ptr [0x6000]",          // iterations
    // Reset, ACKNOWLEDGE, DRIVER.
    "    mov dword ptr [rbx + 0x70], 0",
    "    mov dword ptr [rbx + 0x70], 1",
    "    mov dword ptr [rbx + 0x70], 3",
    // Driver features: VERSION_1 (bit 32) only.
    "    mov dword ptr [rbx + 0x24], 1",
    "    mov dword ptr [rbx + 0x20], 1",
    "    mov dword ptr [rbx + 0x24], 0",
    "    mov dword ptr [rbx + 0x20], 0",
    "    mov dword ptr [rbx + 0x70], 0xb",      // FEATURES_OK
    "    mov eax, dword ptr [rbx + 0x70]",
    "    test eax, 8",
    "    jz .Lvr_fail",
    // Queue 0: 8 entries, rings at 0x200000/0x201000/0x202000.
    "    mov dword ptr [rbx + 0x30], 0",
    "    mov dword ptr [rbx + 0x38], 8",
    "    mov dword ptr [rbx + 0x80], 0x200000",
    "    mov dword ptr [rbx + 0x84], 0",
    "    mov dword ptr [rbx + 0x90], 0x201000",
    "    mov dword ptr [rbx + 0x94], 0",
    "    mov dword ptr [rbx + 0xa0], 0x202000",
    "    mov dword ptr [rbx + 0xa4], 0",
    "    mov dword ptr [rbx + 0x44], 1",        // QueueReady
    "    mov dword ptr [rbx + 0x70], 0xf",      // DRIVER_OK
    // Descriptor 0: the buffer, device-writable.
    "    mov qword ptr [0x200000], 0x203000",
    "    mov eax, dword ptr [0x6010]",          // buffer length
    "    mov dword ptr [0x200008], eax",
    "    mov word ptr [0x20000c], 2",           // VIRTQ_DESC_F_WRITE
    "    mov word ptr [0x20000e], 0",
    "    xor r13d, r13d",                       // avail index
    "    xor r14d, r14d",                       // total cycles
    "    mov r15, -1",                          // min cycles
    "    xor ebp, ebp",                         // max cycles
    ".Lvr_loop:",
    "    cmp r13, r12",
    "    jae .Lvr_done",
    "    mov eax, r13d",
    "    and eax, 7",
    "    mov word ptr [rax*2 + 0x201004], 0",   // avail.ring[idx % 8] = head 0
    "    inc r13d",
    "    mov word ptr [0x201002], r13w",        // avail.idx (x86 keeps the store order)
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov rsi, rax",
    "    mov dword ptr [rbx + 0x50], 0",        // QueueNotify: queue 0
    ".Lvr_poll:",
    "    pause",
    "    movzx eax, word ptr [0x202002]",       // used.idx
    "    cmp ax, r13w",
    "    jne .Lvr_poll",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    sub rax, rsi",
    "    add r14, rax",
    "    cmp rax, r15",
    "    cmovb r15, rax",
    "    cmp rax, rbp",
    "    cmova rbp, rax",
    "    mov qword ptr [0x6100], r13",          // progress: requests completed
    "    jmp .Lvr_loop",
    ".Lvr_done:",
    "    mov qword ptr [0x6108], r14",
    "    mov qword ptr [0x6110], r15",
    "    mov qword ptr [0x6118], rbp",
    "    mov rax, qword ptr [0x203000]",        // first random bytes
    "    mov qword ptr [0x6120], rax",
    "    mov eax, dword ptr [0x202008]",        // used.ring[0].len
    "    mov dword ptr [0x6128], eax",
    "    lea rsi, [rip + .Lvr_bye]",
    "    call .Lvr_print",
    "    mov eax, r13d",
    "    mov dx, 0xf4",                         // EXIT_PORT: done, code = requests
    "    out dx, eax",
    ".Lvr_idle:",
    "    pause",
    "    jmp .Lvr_idle",
    ".Lvr_fail:",
    "    mov eax, 0xdead",
    "    mov dx, 0xf4",
    "    out dx, eax",
    "    jmp .Lvr_idle",
    ".Lvr_ap:",
    "    pause",
    "    jmp .Lvr_ap",
    // Prints the NUL-terminated string at RSI to COM1 (0x3f8); clobbers RAX, RDX, RSI.
    ".Lvr_print:",
    "    mov dx, 0x3f8",
    ".Lvr_print_loop:",
    "    lodsb",
    "    test al, al",
    "    jz .Lvr_print_end",
    "    out dx, al",
    "    jmp .Lvr_print_loop",
    ".Lvr_print_end:",
    "    ret",
    ".Lvr_hello:",
    "    .asciz \"virtio_rng guest: driving virtio-rng over virtio-mmio\\n\"",
    ".Lvr_bye:",
    "    .asciz \"virtio_rng guest: done\\n\"",
    ".globl vinfra_guest_virtio_rng_end",
    ".hidden vinfra_guest_virtio_rng_end",
    "vinfra_guest_virtio_rng_end:",
    ".popsection",
);

/// The `virtio_rng` guest's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VirtioRng {
    /// Requests to make.
    pub iterations: u64,
    /// Guest-physical base of the virtio-mmio rng device (in the 32-bit MMIO hole).
    pub mmio_base: u64,
    /// Bytes per request (1..=`MAX_BUF_LEN`).
    pub buf_len: u32,
}

impl Default for VirtioRng {
    fn default() -> Self {
        VirtioRng { iterations: 1000, mmio_base: 0xd100_0000, buf_len: 64 }
    }
}

/// What the `virtio_rng` guest measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioRngResult {
    /// Requests completed.
    pub completed: u64,
    /// TSC cycles from notify to seeing the used ring move, summed.
    pub total_cycles: u64,
    /// Fastest round trip in TSC cycles.
    pub min_cycles: u64,
    /// Slowest round trip in TSC cycles.
    pub max_cycles: u64,
    /// First 8 bytes of the last buffer.
    pub first_bytes: u64,
    /// Length the device reported for used-ring entry 0.
    pub used_len: u32,
}

impl VirtioRng {
    /// Reads the results the guest wrote into `mem`.
    pub fn read_result(mem: &vcore::GuestMemory) -> Result<VirtioRngResult, vm_memory::GuestMemoryError> {
        let r = |off: u64| mem.read_obj::<u64>(GuestAddress(RESULT_ADDR + off));
        Ok(VirtioRngResult {
            completed: r(0)?,
            total_cycles: r(8)?,
            min_cycles: r(0x10)?,
            max_cycles: r(0x18)?,
            first_bytes: r(0x20)?,
            used_len: mem.read_obj(GuestAddress(RESULT_ADDR + 0x28))?,
        })
    }
}

impl BuiltinGuest for VirtioRng {
    fn name(&self) -> &'static str {
        "virtio_rng"
    }
    fn code(&self) -> &'static [u8] {
        crate::sys::virtio_rng_code()
    }
    fn config_page(&self, info: &BootInfo) -> Result<Vec<u8>, BootError> {
        if self.buf_len == 0 || self.buf_len > MAX_BUF_LEN {
            return Err(BootError::Invalid(format!("buf_len {} not in 1..={MAX_BUF_LEN}", self.buf_len)));
        }
        if info.mem_top < BUF_ADDR + u64::from(MAX_BUF_LEN) {
            return Err(BootError::Invalid("virtio_rng needs at least 4 MiB of memory".into()));
        }
        if !(vcore::config::MMIO_HOLE_START..vcore::config::MMIO_HOLE_END - 0x1000).contains(&self.mmio_base)
            || !self.mmio_base.is_multiple_of(0x1000)
        {
            return Err(BootError::Invalid(format!(
                "mmio_base {:#x} is not a page in the MMIO hole",
                self.mmio_base
            )));
        }
        let mut page = Vec::with_capacity(24);
        page.extend_from_slice(&self.iterations.to_le_bytes());
        page.extend_from_slice(&self.mmio_base.to_le_bytes());
        page.extend_from_slice(&u64::from(self.buf_len).to_le_bytes());
        Ok(page)
    }
}
