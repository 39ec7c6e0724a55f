//! `pio_loop`: vCPU 0 writes its loop counter to [`super::PIO_LOOP_PORT`] forever, one port I/O
//! exit per iteration; the round trip of a PIO exit is measured against it.

use super::BuiltinGuest;

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
    ap_ticker_asm!(".Lpio_ap"),
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
}
