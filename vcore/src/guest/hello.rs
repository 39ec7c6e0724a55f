//! `hello`: prints a line to the console port, pokes an MMIO device, reports done.
//!
//! vCPU 0 writes [`super::HELLO_MESSAGE`] byte by byte to [`super::CONSOLE_PORT`], writes the
//! 8 bytes `"vinfra!!"` to [`super::MMIO_PROBE_ADDR`], reads a 32-bit value back from
//! `MMIO_PROBE_ADDR + 8`, writes that value to [`super::EXIT_PORT`] (done), then idles.
//! Other vCPUs count in their tick slot of the config page (see [`super::tick_addr`]).

use super::BuiltinGuest;

#[rustfmt::skip]
core::arch::global_asm!(
    ".pushsection .rodata.vinfra_guest_hello,\"a\"",
    ".balign 16",
    ".globl vinfra_guest_hello_start",
    ".hidden vinfra_guest_hello_start",
    "vinfra_guest_hello_start:",
    // Entry at CPL 3, IOPL 3, IF 0; RDI = vCPU index, RSP = this vCPU's stack.
    "    test rdi, rdi",
    "    jnz .Lhello_ap",
    "    lea rsi, [rip + .Lhello_msg]",
    "    mov dx, 0x3f8",                    // CONSOLE_PORT
    ".Lhello_print:",
    "    lodsb",                            // AL = [RSI++]
    "    test al, al",                      // NUL ends the message
    "    jz .Lhello_mmio",
    "    out dx, al",                       // one PIO exit per byte
    "    jmp .Lhello_print",
    ".Lhello_mmio:",
    "    movabs rax, 0x21216172666e6976",   // "vinfra!!" little endian
    "    mov ebx, 0xd0000000",              // MMIO_PROBE_ADDR, in the 32-bit hole
    "    mov qword ptr [rbx], rax",         // MMIO write exit
    "    mov eax, dword ptr [rbx + 8]",     // MMIO read exit: the device answers
    "    mov dx, 0xf4",                     // EXIT_PORT
    "    out dx, eax",                      // done, with the device's answer as the code
    ".Lhello_idle:",
    "    pause",
    "    jmp .Lhello_idle",
    ap_ticker_asm!(".Lhello_ap"),
    ".Lhello_msg:",
    "    .asciz \"Hello from the vinfra guest at CPL 3\\n\"",
    ".globl vinfra_guest_hello_end",
    ".hidden vinfra_guest_hello_end",
    "vinfra_guest_hello_end:",
    ".popsection",
);

/// The `hello` guest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Hello;

impl BuiltinGuest for Hello {
    fn name(&self) -> &'static str {
        "hello"
    }
    fn code(&self) -> &'static [u8] {
        crate::sys::hello_code()
    }
}
