//! `dirtier`: writes guest pages in a chosen pattern and rate; the guest of every migration test.
//!
//! vCPU 0 reads its [`DirtierConfig`] from the config page and loops forever: pick a page of the
//! working set (sequential, random or hot/cold), stamp it, publish progress. Write number `w`
//! (0-based) stores the generation `w / ws_pages + 1` at offset 0 of the page and the sequence
//! number `w + 1` at offset 8, then publishes `pages_written = w + 1` and
//! `generations = (w + 1) / ws_pages`. Random choices use xorshift64 from the seed, so the host
//! can replay the exact sequence ([`DirtierConfig::expected`]) and check every page's content.
//! With a rate set, the guest paces itself against `rdtsc`; when its next write is at least
//! 500 µs away it idles until then through [`super::IDLE_PORT`] instead of spinning, so a slow
//! or idle dirtier leaves the host CPU free. Other vCPUs count in their tick slot.
//!
//! Config page ([`super::CONFIG_ADDR`]), little-endian `u64`s:
//!
//! | offset | field |
//! |---|---|
//! | `0x00` | magic `"VINFRADT"` |
//! | `0x08` | working-set start (guest-physical, page aligned) |
//! | `0x10` | working-set size in pages |
//! | `0x18` | pattern: 0 sequential, 1 random, 2 hot/cold |
//! | `0x20` | target pages per second, 0 = flat out |
//! | `0x28` | TSC frequency in Hz (the host fills it in) |
//! | `0x30` | hot/cold: pages in the hot set (at the start of the working set) |
//! | `0x38` | hot/cold: percent of writes that go to the hot set |
//! | `0x40` | xorshift64 seed (0 = default) |
//! | `0x100` | progress: generations completed (guest writes) |
//! | `0x108` | progress: pages written (guest writes) |
//! | `0x110` | progress: 1 once the guest started (guest writes) |

use serde::{Deserialize, Serialize};
use vm_memory::{Bytes, GuestAddress};

use super::{BuiltinGuest, CONFIG_ADDR};
use crate::boot::{BootError, BootInfo};
use crate::config::{MMIO_HOLE_END, MMIO_HOLE_START, PAGE_SIZE};
use crate::memory::GuestMemory;

#[rustfmt::skip]
core::arch::global_asm!(
    ".pushsection .rodata.vinfra_guest_dirtier,\"a\"",
    ".balign 16",
    ".globl vinfra_guest_dirtier_start",
    ".hidden vinfra_guest_dirtier_start",
    "vinfra_guest_dirtier_start:",
    // Entry at CPL 3, IOPL 3, IF 0; RDI = vCPU index, RSP = this vCPU's stack.
    "    test rdi, rdi",
    "    jnz .Ldirt_ap",
    "    mov ebp, 0x6000",                  // config page
    "    mov r8, [rbp + 0x08]",             // working-set start
    "    mov r9, [rbp + 0x10]",             // working-set pages (n)
    "    mov r10, [rbp + 0x18]",            // pattern
    "    mov r11, [rbp + 0x20]",            // pages per second
    "    mov r12, [rbp + 0x28]",            // TSC Hz
    "    mov r14, [rbp + 0x40]",            // xorshift state
    "    test r14, r14",
    "    jnz .Ldirt_seeded",
    "    movabs r14, 0x9e3779b97f4a7c15",
    ".Ldirt_seeded:",
    "    mov r13, [rbp + 0x108]",           // w: writes done (resumes a published count)
    "    mov rbx, r13",                     // writes at start, for pacing
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r15, rax",                     // TSC at start
    "    mov qword ptr [rbp + 0x110], 1",   // running
    ".Ldirt_loop:",
    "    test r11, r11",
    "    jz .Ldirt_pick",
    ".Ldirt_pace:",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    sub rax, r15",                     // TSC ticks since start
    "    mov rsi, rax",
    "    mul r11",                          // RDX:RAX = ticks * pages per second
    "    div r12",                          // RAX = writes allowed by now
    "    mov rcx, r13",
    "    sub rcx, rbx",                     // writes done since start
    "    cmp rcx, rax",
    "    jb .Ldirt_pick",
    // Not yet. The next write is due at tick (done + 1) * Hz / rate; if that is at least
    // IDLE_MIN_US away, idle until then (IDLE_PORT), else spin.
    "    lea rax, [rcx + 1]",
    "    mul r12",
    "    div r11",                          // RAX = tick the next write is due
    "    sub rax, rsi",
    "    jbe .Ldirt_spin",
    "    mov ecx, 1000000",
    "    mul rcx",
    "    div r12",                          // RAX = microseconds until then
    "    cmp rax, 500",                     // IDLE_MIN_US
    "    jb .Ldirt_spin",
    "    mov ecx, 100000",
    "    cmp rax, rcx",
    "    cmova rax, rcx",                   // at most 100 ms at a time
    "    mov dx, 0xf5",                     // IDLE_PORT
    "    out dx, eax",
    "    jmp .Ldirt_pace",
    ".Ldirt_spin:",
    "    pause",
    "    jmp .Ldirt_pace",
    ".Ldirt_pick:",
    "    cmp r10, 1",
    "    jae .Ldirt_random",
    "    mov rax, r13",
    "    xor edx, edx",
    "    div r9",
    "    mov rcx, rdx",                     // sequential: w mod n
    "    jmp .Ldirt_stamp",
    ".Ldirt_random:",
    "    mov rax, r14",                     // xorshift64: x ^= x << 13; x ^= x >> 7; x ^= x << 17
    "    shl rax, 13",
    "    xor r14, rax",
    "    mov rax, r14",
    "    shr rax, 7",
    "    xor r14, rax",
    "    mov rax, r14",
    "    shl rax, 17",
    "    xor r14, rax",
    "    cmp r10, 1",
    "    jne .Ldirt_hotcold",
    "    mov rax, r14",
    "    xor edx, edx",
    "    div r9",
    "    mov rcx, rdx",                     // random: x mod n
    "    jmp .Ldirt_stamp",
    ".Ldirt_hotcold:",
    "    mov rax, r14",
    "    shr rax, 32",
    "    xor edx, edx",
    "    mov ecx, 100",
    "    div rcx",                          // RDX = (x >> 32) mod 100
    "    cmp rdx, [rbp + 0x38]",
    "    jae .Ldirt_cold",
    "    mov rax, r14",
    "    xor edx, edx",
    "    div qword ptr [rbp + 0x30]",
    "    mov rcx, rdx",                     // hot: x mod h
    "    jmp .Ldirt_stamp",
    ".Ldirt_cold:",
    "    mov rcx, r9",
    "    sub rcx, [rbp + 0x30]",
    "    mov rax, r14",
    "    xor edx, edx",
    "    div rcx",
    "    mov rcx, rdx",
    "    add rcx, [rbp + 0x30]",            // cold: h + x mod (n - h)
    ".Ldirt_stamp:",
    "    shl rcx, 12",
    "    add rcx, r8",                      // page address
    "    mov rax, r13",
    "    xor edx, edx",
    "    div r9",
    "    lea rsi, [rax + 1]",
    "    mov [rcx], rsi",                   // generation w / n + 1
    "    lea rax, [r13 + 1]",
    "    mov [rcx + 8], rax",               // sequence number w + 1
    "    inc r13",
    "    mov [rbp + 0x108], r13",           // pages written
    "    mov rax, r13",
    "    xor edx, edx",
    "    div r9",
    "    mov [rbp + 0x100], rax",           // generations completed
    "    jmp .Ldirt_loop",
    ap_ticker_asm!(".Ldirt_ap"),
    ".globl vinfra_guest_dirtier_end",
    ".hidden vinfra_guest_dirtier_end",
    "vinfra_guest_dirtier_end:",
    ".popsection",
);

const MAGIC: u64 = u64::from_le_bytes(*b"VINFRADT");
// The assembly above writes to port 0xf5.
const _: () = assert!(super::IDLE_PORT == 0xf5);
const DEFAULT_SEED: u64 = 0x9e37_79b9_7f4a_7c15;
/// Lowest working-set address: above the code at 1 MiB.
pub const MIN_WS_START: u64 = 0x20_0000;

/// Which pages the dirtier writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Pattern {
    /// Page 0, 1, 2, ... of the working set, round and round.
    Sequential,
    /// Uniformly random pages.
    Random,
    /// `hot_percent` % of writes to the first `hot_pages` pages, the rest to the others.
    HotCold {
        /// Pages in the hot set.
        hot_pages: u64,
        /// Percent of writes that go to the hot set.
        hot_percent: u8,
    },
}

/// Parameters of the `dirtier` guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirtierConfig {
    /// Guest-physical start of the working set (page aligned, at least [`MIN_WS_START`]).
    pub ws_start: u64,
    /// Working-set size in pages.
    pub ws_pages: u64,
    /// Access pattern.
    pub pattern: Pattern,
    /// Target pages written per second; 0 = as fast as possible.
    pub pages_per_sec: u64,
    /// xorshift64 seed (0 picks a fixed default).
    #[serde(default)]
    pub seed: u64,
}

impl Default for DirtierConfig {
    fn default() -> Self {
        DirtierConfig {
            ws_start: MIN_WS_START,
            ws_pages: 4096,
            pattern: Pattern::Sequential,
            pages_per_sec: 0,
            seed: 0,
        }
    }
}

/// Progress the dirtier publishes in its config page.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct DirtierProgress {
    /// Completed passes over `ws_pages` writes.
    pub generations: u64,
    /// Pages written since boot.
    pub pages_written: u64,
    /// Whether the guest has started.
    pub started: bool,
}

/// A page whose content is not what the replayed write sequence says.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "page {index} (gpa {gpa:#x}) holds generation {found_gen} seq {found_seq}, expected generation {generation} seq {seq}"
)]
pub struct PageMismatch {
    /// Index in the working set.
    pub index: u64,
    /// Guest-physical address.
    pub gpa: u64,
    /// Expected generation.
    pub generation: u64,
    /// Expected sequence number.
    pub seq: u64,
    /// Found generation.
    pub found_gen: u64,
    /// Found sequence number.
    pub found_seq: u64,
}

impl DirtierConfig {
    /// Checks the parameters against guest memory ending at `mem_top`.
    pub fn validate(&self, mem_top: u64, tsc_hz: u64) -> Result<(), BootError> {
        let bad = |m: String| Err(BootError::Invalid(m));
        let end = self.ws_pages.checked_mul(PAGE_SIZE).and_then(|b| b.checked_add(self.ws_start));
        let Some(end) = end else { return bad(format!("working set of {} pages overflows", self.ws_pages)) };
        if self.ws_pages == 0 || !self.ws_start.is_multiple_of(PAGE_SIZE) || self.ws_start < MIN_WS_START {
            return bad(format!(
                "working set {:#x}+{} pages: needs pages, page alignment and a start >= {MIN_WS_START:#x}",
                self.ws_start, self.ws_pages
            ));
        }
        let crosses_hole = self.ws_start < MMIO_HOLE_END && end > MMIO_HOLE_START;
        if end > mem_top.min(crate::boot::MAX_IDENTITY_MAP) || crosses_hole {
            return bad(format!("working set {:#x}..{end:#x} is not inside mapped RAM", self.ws_start));
        }
        if let Pattern::HotCold { hot_pages, hot_percent } = self.pattern
            && (hot_pages == 0 || hot_pages >= self.ws_pages || hot_percent > 100)
        {
            return bad(format!("hot set of {hot_pages} pages at {hot_percent}% in {} pages", self.ws_pages));
        }
        if self.pages_per_sec > 0 && tsc_hz == 0 {
            return bad("a page rate needs the TSC frequency, which this host does not report".into());
        }
        Ok(())
    }

    fn page_bytes(&self, tsc_hz: u64) -> Vec<u8> {
        let (pattern, hot_pages, hot_percent) = match self.pattern {
            Pattern::Sequential => (0, 0, 0),
            Pattern::Random => (1, 0, 0),
            Pattern::HotCold { hot_pages, hot_percent } => (2, hot_pages, u64::from(hot_percent)),
        };
        let words = [
            MAGIC,
            self.ws_start,
            self.ws_pages,
            pattern,
            self.pages_per_sec,
            tsc_hz,
            hot_pages,
            hot_percent,
            self.seed,
        ];
        words.iter().flat_map(|w| w.to_le_bytes()).collect()
    }

    /// The sequence of page indices the guest writes, in order.
    pub fn page_sequence(&self) -> impl Iterator<Item = u64> + '_ {
        let mut x = if self.seed == 0 { DEFAULT_SEED } else { self.seed };
        let n = self.ws_pages;
        (0u64..).map(move |w| {
            if self.pattern == Pattern::Sequential {
                return w % n;
            }
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            match self.pattern {
                Pattern::HotCold { hot_pages: h, hot_percent: p } if (x >> 32) % 100 < u64::from(p) => x % h,
                Pattern::HotCold { hot_pages: h, .. } => h + x % (n - h),
                _ => x % n,
            }
        })
    }

    /// What every page holds after `writes` writes: `(generation, sequence)`, `(0, 0)` if unwritten.
    pub fn expected(&self, writes: u64) -> Vec<(u64, u64)> {
        self.replay(writes).0
    }

    /// The pages after `writes` writes, and the page index write number `writes` will go to.
    fn replay(&self, writes: u64) -> (Vec<(u64, u64)>, u64) {
        let mut pages = vec![(0, 0); self.ws_pages as usize];
        let mut seq = self.page_sequence();
        for (w, idx) in seq.by_ref().take(writes as usize).enumerate() {
            let w = w as u64;
            pages[idx as usize] = (w / self.ws_pages + 1, w + 1);
        }
        (pages, seq.next().unwrap_or(0))
    }

    /// Checks every page of the working set against the replayed sequence of
    /// `progress.pages_written` writes. The page of the next write may already hold it (the guest
    /// stamps before it publishes), field by field.
    pub fn check_memory(&self, mem: &GuestMemory, progress: &DirtierProgress) -> Result<(), PageMismatch> {
        let p = progress.pages_written;
        let (expected, next) = self.replay(p);
        let next_stamp = (p / self.ws_pages + 1, p + 1);
        for (index, &(g, s)) in expected.iter().enumerate() {
            let index = index as u64;
            let gpa = self.ws_start + index * PAGE_SIZE;
            let found_gen: u64 = mem.read_obj(GuestAddress(gpa)).unwrap_or(u64::MAX);
            let found_seq: u64 = mem.read_obj(GuestAddress(gpa + 8)).unwrap_or(u64::MAX);
            let ok = if index == next {
                (found_gen == g || found_gen == next_stamp.0) && (found_seq == s || found_seq == next_stamp.1)
            } else {
                found_gen == g && found_seq == s
            };
            if !ok {
                return Err(PageMismatch { index, gpa, generation: g, seq: s, found_gen, found_seq });
            }
        }
        Ok(())
    }
}

/// Reads the dirtier's published progress from guest memory.
pub fn read_progress(mem: &GuestMemory) -> DirtierProgress {
    let word = |off: u64| mem.read_obj::<u64>(GuestAddress(CONFIG_ADDR + off)).unwrap_or(0);
    DirtierProgress { generations: word(0x100), pages_written: word(0x108), started: word(0x110) == 1 }
}

/// The `dirtier` guest with its parameters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Dirtier(pub DirtierConfig);

impl BuiltinGuest for Dirtier {
    fn name(&self) -> &'static str {
        "dirtier"
    }
    fn code(&self) -> &'static [u8] {
        crate::sys::dirtier_code()
    }
    fn config_page(&self, info: &BootInfo) -> Result<Vec<u8>, BootError> {
        self.0.validate(info.mem_top, info.tsc_hz)?;
        Ok(self.0.page_bytes(info.tsc_hz))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn sequential_replay() {
        let c = DirtierConfig { ws_pages: 4, ..Default::default() };
        assert_eq!(c.expected(6), vec![(2, 5), (2, 6), (1, 3), (1, 4)]);
    }

    #[test]
    fn bad_parameters_are_refused() {
        let top = 64 << 20;
        let c = DirtierConfig { ws_pages: 0, ..Default::default() };
        assert!(c.validate(top, 1).is_err());
        let c = DirtierConfig { ws_start: 0x1000, ..Default::default() };
        assert!(c.validate(top, 1).is_err());
        let c = DirtierConfig { ws_pages: 1 << 20, ..Default::default() };
        assert!(c.validate(top, 1).is_err());
        let c = DirtierConfig {
            pattern: Pattern::HotCold { hot_pages: 4096, hot_percent: 90 },
            ..Default::default()
        };
        assert!(c.validate(top, 1).is_err());
        let c = DirtierConfig { pages_per_sec: 10, ..Default::default() };
        assert!(c.validate(top, 0).is_err());
        assert!(DirtierConfig::default().validate(top, 0).is_ok());
    }

    proptest! {
        #[test]
        fn hot_cold_stays_in_its_sets(seed in any::<u64>(), hot in 1u64..100, pct in 0u8..=100) {
            let c = DirtierConfig {
                ws_pages: 100 + hot,
                pattern: Pattern::HotCold { hot_pages: hot, hot_percent: pct },
                seed,
                ..Default::default()
            };
            for idx in c.page_sequence().take(500) {
                prop_assert!(idx < c.ws_pages);
            }
            if pct == 0 { prop_assert!(c.page_sequence().take(200).all(|i| i >= hot)); }
            if pct == 100 { prop_assert!(c.page_sequence().take(200).all(|i| i < hot)); }
        }

        #[test]
        fn expected_stamps_are_consistent(pages in 1u64..64, writes in 0u64..500, seed in any::<u64>()) {
            let c = DirtierConfig { ws_pages: pages, pattern: Pattern::Random, seed, ..Default::default() };
            let e = c.expected(writes);
            let max_seq = e.iter().map(|p| p.1).max().unwrap_or(0);
            prop_assert_eq!(max_seq, writes);
            for (g, s) in e { if s > 0 { prop_assert_eq!(g, (s - 1) / pages + 1); } }
        }
    }
}
