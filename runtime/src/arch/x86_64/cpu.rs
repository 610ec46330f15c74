//! Single instructions: port I/O, MSRs, TSC, CPUID, HLT, interrupt flag.

use core::arch::asm;

/// Writes a byte to an I/O port.
#[inline]
pub fn outb(port: u16, value: u8) {
    // SAFETY: port I/O has no memory effects visible to Rust; the ports the
    // runtime writes are the VMM's console/exit devices.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") value, options(nomem, nostack, preserves_flags))
    }
}

/// Writes a 32-bit value to an I/O port.
#[inline]
pub fn outl(port: u16, value: u32) {
    // SAFETY: as for `outb`.
    unsafe {
        asm!("out dx, eax", in("dx") port, in("eax") value, options(nomem, nostack, preserves_flags))
    }
}

/// Reads a byte from an I/O port.
#[inline]
pub fn inb(port: u16) -> u8 {
    let value: u8;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in al, dx", in("dx") port, out("al") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// Reads a 32-bit value from an I/O port.
#[inline]
pub fn inl(port: u16) -> u32 {
    let value: u32;
    // SAFETY: as for `outb`.
    unsafe {
        asm!("in eax, dx", in("dx") port, out("eax") value, options(nomem, nostack, preserves_flags))
    }
    value
}

/// A uhyve-v2-style hypercall: writes to `port` with the argument in `rdi`.
/// `arg` may be the guest-physical address of a parameter block, which the
/// VMM reads (and may write) during the call.
#[inline]
pub fn hypercall(port: u16, arg: u64) {
    // SAFETY: the VMM reads guest memory named by `arg` while the vCPU is
    // stopped in the `out`; the compiler must not keep that memory in
    // registers across it, hence no `nomem`.
    unsafe {
        asm!("out dx, al", in("dx") port, in("al") 0u8, in("rdi") arg, options(nostack, preserves_flags))
    }
}

/// Reads the time-stamp counter. It traps on PVM (~1.5 us): read once per turn.
#[inline]
pub fn rdtsc() -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: rdtsc only reads the counter.
    unsafe { asm!("rdtsc", out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags)) }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Reads a model-specific register.
///
/// # Safety
/// `msr` must exist on this CPU (else #GP).
#[inline]
pub unsafe fn rdmsr(msr: u32) -> u64 {
    let (lo, hi): (u32, u32);
    // SAFETY: the caller guarantees the MSR exists.
    unsafe {
        asm!("rdmsr", in("ecx") msr, out("eax") lo, out("edx") hi, options(nomem, nostack, preserves_flags))
    }
    (u64::from(hi) << 32) | u64::from(lo)
}

/// Writes a model-specific register.
///
/// # Safety
/// `msr` must exist and accept `value`; the write's effect on the machine is
/// the caller's to reason about.
#[inline]
pub unsafe fn wrmsr(msr: u32, value: u64) {
    // SAFETY: the caller guarantees the write is valid.
    unsafe {
        asm!("wrmsr", in("ecx") msr, in("eax") value as u32, in("edx") (value >> 32) as u32,
             options(nostack, preserves_flags))
    }
}

/// CPUID leaf `leaf`, sub-leaf `sub`: `[eax, ebx, ecx, edx]`.
#[inline]
pub fn cpuid(leaf: u32, sub: u32) -> [u32; 4] {
    // `core::arch::x86_64::__cpuid_count` exists on this target and is safe.
    let r = core::arch::x86_64::__cpuid_count(leaf, sub);
    [r.eax, r.ebx, r.ecx, r.edx]
}

/// Enables interrupts and halts until the next one, atomically: the STI
/// shadow covers the HLT (in PVM native mode: see [`super::pvm`]), so a
/// wake-up that is already pending is not lost. Interrupts are masked
/// again when it returns.
#[inline]
pub fn enable_interrupts_and_halt() {
    if super::pvm::native() {
        super::pvm::enable_interrupts_and_halt();
    } else {
        // SAFETY: the IDT is installed before interrupts are ever enabled.
        unsafe { asm!("sti", "hlt", "cli", options(nomem, nostack)) }
    }
}

/// Disables interrupts.
#[inline]
pub fn disable_interrupts() {
    if super::pvm::native() {
        super::pvm::disable_interrupts();
    } else {
        // SAFETY: masking interrupts is always sound.
        unsafe { asm!("cli", options(nomem, nostack)) }
    }
}

/// Halts forever with interrupts off: the end of the line.
pub fn halt_forever() -> ! {
    disable_interrupts();
    loop {
        // SAFETY: halting with interrupts masked only stops this vCPU.
        unsafe { asm!("cli", "hlt", options(nomem, nostack)) }
    }
}

/// Reads CR2 (the faulting address of the last page fault).
pub fn cr2() -> u64 {
    let v: u64;
    // SAFETY: reading CR2 has no side effects.
    unsafe { asm!("mov {}, cr2", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Reads CR3 (the page-table root).
pub fn cr3() -> u64 {
    let v: u64;
    // SAFETY: reading CR3 has no side effects.
    unsafe { asm!("mov {}, cr3", out(reg) v, options(nomem, nostack, preserves_flags)) }
    v
}

/// Loads CR3.
///
/// # Safety
/// `v` must be the root of page tables that map everything the runtime
/// uses, as the current ones do.
pub unsafe fn write_cr3(v: u64) {
    // SAFETY: the caller guarantees the tables are valid.
    unsafe { asm!("mov cr3, {}", in(reg) v, options(nostack, preserves_flags)) }
}
