//! Interrupt descriptor table: the 32 CPU exceptions (fatal: reported on the
//! console with the faulting state, then exit), the local APIC timer (wakes
//! the idle loop), device interrupts (also just a wake-up, with a flag) and
//! the spurious vector.

use core::arch::{asm, global_asm};
use core::ptr::addr_of;

/// Vector of the local APIC timer.
pub const TIMER_VECTOR: u8 = 0x40;
/// Vector of device interrupts (the network card, through the IOAPIC).
pub const DEVICE_VECTOR: u8 = 0x41;
/// Spurious-interrupt vector (the APIC's SVR).
pub const SPURIOUS_VECTOR: u8 = 0xFF;

/// Set by the device interrupt handler; the idle loop takes it.
pub static DEVICE_INTERRUPT: core::sync::atomic::AtomicBool =
    core::sync::atomic::AtomicBool::new(false);

/// Exit status when the guest dies of a CPU exception.
pub const EXCEPTION_EXIT_STATUS: i32 = 102;

/// What the common stub saved: general registers, vector, error code, and
/// the CPU's interrupt frame.
#[repr(C)]
#[derive(Debug)]
pub struct TrapFrame {
    r15: u64,
    r14: u64,
    r13: u64,
    r12: u64,
    r11: u64,
    r10: u64,
    r9: u64,
    pub(super) r8: u64,
    rbp: u64,
    rdi: u64,
    rsi: u64,
    rdx: u64,
    rcx: u64,
    rbx: u64,
    rax: u64,
    vector: u64,
    error_code: u64,
    pub(super) rip: u64,
    cs: u64,
    rflags: u64,
    rsp: u64,
    ss: u64,
}

macro_rules! stubs {
    ($($n:literal $kind:ident),* $(,)?) => {
        global_asm!(
            ".section .text.isr, \"ax\"",
            $( concat!(".global ferry_isr_", stringify!($n)),
               concat!("ferry_isr_", stringify!($n), ":"),
               stubs!(@push $kind),
               concat!("push ", stringify!($n)),
               "jmp ferry_isr_common", )*
            "ferry_isr_common:",
            "push rax", "push rbx", "push rcx", "push rdx", "push rsi", "push rdi", "push rbp",
            "push r8", "push r9", "push r10", "push r11", "push r12", "push r13", "push r14", "push r15",
            "mov rdi, rsp",
            "cld",
            "call {dispatch}",
            "pop r15", "pop r14", "pop r13", "pop r12", "pop r11", "pop r10", "pop r9", "pop r8",
            "pop rbp", "pop rdi", "pop rsi", "pop rdx", "pop rcx", "pop rbx", "pop rax",
            "add rsp, 16",
            "iretq",
            ".section .data.rel.ro.isr_table, \"aw\"",
            ".balign 8",
            ".global ferry_isr_table",
            "ferry_isr_table:",
            $( concat!(".quad ferry_isr_", stringify!($n)), )*
            dispatch = sym dispatch,
        );
        const VECTORS: &[u8] = &[$($n),*];
    };
    (@push err) => { "" };
    (@push noerr) => { "push 0" };
}

stubs!(
    0 noerr, 1 noerr, 2 noerr, 3 noerr, 4 noerr, 5 noerr, 6 noerr, 7 noerr,
    8 err, 9 noerr, 10 err, 11 err, 12 err, 13 err, 14 err, 15 noerr,
    16 noerr, 17 err, 18 noerr, 19 noerr, 20 noerr, 21 err, 22 noerr, 23 noerr,
    24 noerr, 25 noerr, 26 noerr, 27 noerr, 28 noerr, 29 err, 30 err, 31 noerr,
    64 noerr, 65 noerr, 255 noerr,
);

unsafe extern "C" {
    static ferry_isr_table: [u64; 35];
}

#[repr(C, packed)]
struct Idtr {
    limit: u16,
    base: u64,
}

#[derive(Clone, Copy)]
#[repr(C)]
struct Gate {
    offset_lo: u16,
    selector: u16,
    ist: u8,
    flags: u8,
    offset_mid: u16,
    offset_hi: u32,
    reserved: u32,
}

const EMPTY_GATE: Gate = Gate {
    offset_lo: 0,
    selector: 0,
    ist: 0,
    flags: 0,
    offset_mid: 0,
    offset_hi: 0,
    reserved: 0,
};

static mut IDT: [Gate; 256] = [EMPTY_GATE; 256];

/// The code selector the loader runs the runtime with. Read it before the
/// switch to PVM native mode: after it, CS is the host's ring-3 selector,
/// not the guest's.
pub fn code_selector() -> u16 {
    let cs: u16;
    // SAFETY: reading CS has no side effects.
    unsafe { asm!("mov {0:x}, cs", out(reg) cs, options(nomem, nostack, preserves_flags)) };
    cs
}

/// Installs the IDT, its gates on code selector `cs` (see
/// [`code_selector`]). Call once, with interrupts off, before anything can
/// fault.
pub fn init(cs: u16) {
    // SAFETY: single vCPU, interrupts off, called once at boot: nothing else
    // touches IDT; the table of stub addresses is relocated (RELATIVE) data.
    unsafe {
        let idt = &mut *core::ptr::addr_of_mut!(IDT);
        for (i, &vector) in VECTORS.iter().enumerate() {
            let handler = ferry_isr_table[i];
            idt[usize::from(vector)] = Gate {
                offset_lo: handler as u16,
                selector: cs,
                ist: 0,
                flags: 0x8E, // present, DPL 0, 64-bit interrupt gate
                offset_mid: (handler >> 16) as u16,
                offset_hi: (handler >> 32) as u32,
                reserved: 0,
            };
        }
        let idtr = Idtr {
            limit: (core::mem::size_of::<[Gate; 256]>() - 1) as u16,
            base: addr_of!(IDT) as u64,
        };
        asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags));
    }
}

/// Loads an empty IDT: the next exception triple-faults. Only for testing
/// how the VMM reports a guest that dies that way.
pub fn clear_for_test() {
    let idtr = Idtr { limit: 0, base: 0 };
    // SAFETY: loading an empty IDT is exactly what the caller asks for.
    unsafe { asm!("lidt [{}]", in(reg) &idtr, options(readonly, nostack, preserves_flags)) };
}

const EXCEPTION_NAMES: [&str; 32] = [
    "#DE divide error",
    "#DB debug",
    "NMI",
    "#BP breakpoint",
    "#OF overflow",
    "#BR bound range",
    "#UD invalid opcode",
    "#NM device not available",
    "#DF double fault",
    "coprocessor overrun",
    "#TS invalid TSS",
    "#NP segment not present",
    "#SS stack fault",
    "#GP general protection",
    "#PF page fault",
    "reserved",
    "#MF x87 error",
    "#AC alignment check",
    "#MC machine check",
    "#XM SIMD error",
    "#VE virtualization",
    "#CP control protection",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "reserved",
    "#HV hypervisor injection",
    "#VC VMM communication",
    "#SX security",
    "reserved",
];

extern "C" fn dispatch(frame: &mut TrapFrame) {
    if frame.vector >= 32 && super::pvm::native() {
        super::pvm::fixup_halt(frame);
    }
    if frame.vector == 13 && super::pvm::fixup_gp(frame) {
        return;
    }
    match frame.vector {
        v if v == u64::from(TIMER_VECTOR) => super::apic::end_of_interrupt(),
        v if v == u64::from(DEVICE_VECTOR) => {
            DEVICE_INTERRUPT.store(true, core::sync::atomic::Ordering::Release);
            super::apic::end_of_interrupt();
        }
        v if v == u64::from(SPURIOUS_VECTOR) => {}
        v if v < 32 => {
            let cr2 = if v == 14 { super::cpu::cr2() } else { 0 };
            crate::console::write_fmt(format_args!(
                "ferry-runtime: fatal CPU exception {} (vector {}), error code {:#x}, rip {:#x}, rsp {:#x}, cr2 {:#x}\n",
                EXCEPTION_NAMES[v as usize], v, frame.error_code, frame.rip, frame.rsp, cr2
            ));
            crate::platform::exit(EXCEPTION_EXIT_STATUS);
        }
        _ => super::apic::end_of_interrupt(),
    }
}
