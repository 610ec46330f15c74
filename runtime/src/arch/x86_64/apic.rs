//! The local APIC in x2APIC mode, used for one thing: a one-shot
//! TSC-deadline timer that wakes the vCPU from HLT (tickless idle).
//!
//! Needs CPUID x2APIC and TSC-deadline support (Ferry's VMM and uhyve
//! provide both; QEMU with `-cpu host`). Without them the runtime has no
//! wake-up timer and `sleep` polls with `pause` instead.

use core::sync::atomic::{AtomicBool, Ordering};

use super::cpu::{cpuid, rdmsr, wrmsr};
use super::idt::{SPURIOUS_VECTOR, TIMER_VECTOR};

const IA32_APIC_BASE: u32 = 0x1B;
const IA32_TSC_DEADLINE: u32 = 0x6E0;
const X2APIC_EOI: u32 = 0x80B;
const X2APIC_SVR: u32 = 0x80F;
const X2APIC_LVT_TIMER: u32 = 0x832;
const APIC_BASE_ENABLE: u64 = 1 << 11;
const APIC_BASE_X2APIC: u64 = 1 << 10;
const DEFAULT_APIC_BASE: u64 = 0xFEE0_0000;
const LVT_TSC_DEADLINE_MODE: u64 = 0b10 << 17;

static TIMER_READY: AtomicBool = AtomicBool::new(false);

/// Enables x2APIC and the TSC-deadline timer if the CPU has both; returns
/// whether the timer is usable.
pub fn init() -> bool {
    let [_, _, ecx, _] = cpuid(1, 0);
    let x2apic = ecx & (1 << 21) != 0;
    let deadline = ecx & (1 << 24) != 0;
    if !(x2apic && deadline) {
        return false;
    }
    // SAFETY: CPUID says x2APIC and TSC-deadline exist. The base MSR goes
    // disabled/xAPIC -> xAPIC -> x2APIC (a direct jump from disabled is #GP).
    unsafe {
        let mut base = rdmsr(IA32_APIC_BASE);
        if base & !0xFFF == 0 {
            base |= DEFAULT_APIC_BASE;
        }
        if base & APIC_BASE_ENABLE == 0 {
            base |= APIC_BASE_ENABLE;
            wrmsr(IA32_APIC_BASE, base & !APIC_BASE_X2APIC);
        }
        wrmsr(IA32_APIC_BASE, base | APIC_BASE_X2APIC);
        wrmsr(X2APIC_SVR, 0x100 | u64::from(SPURIOUS_VECTOR));
        wrmsr(
            X2APIC_LVT_TIMER,
            LVT_TSC_DEADLINE_MODE | u64::from(TIMER_VECTOR),
        );
    }
    TIMER_READY.store(true, Ordering::Relaxed);
    true
}

/// Whether a wake-up timer is armed-able.
pub fn timer_ready() -> bool {
    TIMER_READY.load(Ordering::Relaxed)
}

/// Arms the one-shot timer to fire when the TSC reaches `tsc` (0 disarms).
pub fn arm_deadline(tsc: u64) {
    if timer_ready() {
        // SAFETY: x2APIC with TSC-deadline mode is set up (checked above).
        unsafe { wrmsr(IA32_TSC_DEADLINE, tsc) }
    }
}

/// Signals end of interrupt.
pub fn end_of_interrupt() {
    if timer_ready() {
        // SAFETY: x2APIC is enabled; writing 0 to EOI is the protocol.
        unsafe { wrmsr(X2APIC_EOI, 0) }
    }
}
