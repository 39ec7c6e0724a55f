//! `pio_loop`: vCPU 0 writes its loop counter to [`super::PIO_LOOP_PORT`] forever, one port I/O
//! exit per iteration; the round trip of a PIO exit is measured against it.

use super::BuiltinGuest;
use crate::boot::{BootError, BootInfo};

#[rustfmt::skip]
core::arch::global_asm!(
    ".pushsection .rodata.vinfra_guest_pio_loop,\"a\"",
    ".balign 16",
    ".globl vinfra_guest_pio_loop_start",
    ".hidden vinfra_guest_pio_loop_start",
    "vinfra_guest_pio_loop_start:",
    // Entry at CPL 3, IOPL 3, IF 0; RDI = vCPU index.
    "    test rdi, rdi",
    "    jnz .Lpio_ap",
    "    xor eax, eax",
    "    mov dx, 0x80",                     // PIO_LOOP_PORT
    ".Lpio_loop:",
    "    inc eax",
    "    out dx, eax",                      // one exit per iteration
    "    jmp .Lpio_loop",
    ".Lpio_ap:",
    "    lea rbx, [rdi*8 + 0x6200]",        // TICKS + 8 * vCPU
    ".Lpio_tick:",
    "    inc qword ptr [rbx]",
    "    pause",
    "    jmp .Lpio_tick",
    ".globl vinfra_guest_pio_loop_end",
    ".hidden vinfra_guest_pio_loop_end",
    "vinfra_guest_pio_loop_end:",
    ".popsection",
);

/// The `pio_loop` guest.
#[derive(Debug, Clone, Copy, Default)]
pub struct PioLoop;

impl BuiltinGuest for PioLoop {
    fn name(&self) -> &'static str {
        "pio_loop"
    }
    fn code(&self) -> &'static [u8] {
        crate::sys::pio_loop_code()
    }
    fn config_page(&self, _info: &BootInfo) -> Result<Vec<u8>, BootError> {
        Ok(Vec::new())
    }
}
