//! Native execution on a PVM host.
//!
//! The KVM of Ferry's development machines is PVM (a software hypervisor,
//! no VMX/SVM). It emulates a stock guest's supervisor code instruction by
//! instruction (~1 us each) until the guest itself writes the control MSR
//! [`MSR_PVM_CONTROL`] with the address of a page it hands over, the PVCS
//! (bit 0 clear). From the next instruction on, the guest's ring 0 runs
//! natively (on hardware ring 3): about a thousand times faster. What
//! changes for the guest in that mode:
//!
//! - STI and CLI are emulated and do not enable interrupts. Byte 0 of the
//!   PVCS is the virtual interrupt flag; the hypervisor sets byte 1 when an
//!   interrupt waits for it. Interrupts arrive through the guest's own IDT.
//! - A store to byte 0 is invisible to the hypervisor until the next trap,
//!   so the idle path is `byte 0 = 1; hlt` (HLT traps), and an interrupt
//!   taken between the two resumes after the HLT (`fixup_halt`), so a
//!   wake-up that arrives just before the HLT is never slept through.
//! - Exits cost ~36 us, in-kernel traps ~17 us, an interrupt ~150 us: the
//!   drivers batch and suppress notifications accordingly.
//!
//! Detection reads the read-only signature MSR [`MSR_PVM_SIGNATURE`] with a
//! #GP-safe RDMSR ([`try_rdmsr`]), so hosts without PVM (stock KVM, QEMU
//! TCG) stay on the ordinary path. The runtime argument `pvm.native=0`
//! keeps the guest emulated on purpose.
//!
//! The control MSR and the PVCS travel with snapshots and migrations: the
//! VMM saves the MSR (it is not in KVM's MSR list), and the PVCS is guest
//! memory.

use core::arch::global_asm;
use core::sync::atomic::{AtomicBool, Ordering};

use super::idt::TrapFrame;

/// The control MSR: bits 12+ the PVCS address, bits 0-4 flags.
pub const MSR_PVM_CONTROL: u32 = 0x4b56_4d10;
/// Read-only, "PVM" in ASCII on a PVM host.
pub const MSR_PVM_SIGNATURE: u32 = 0x4b56_4d11;
/// The value of [`MSR_PVM_SIGNATURE`].
pub const PVM_SIGNATURE: u64 = 0x004d_5650;

/// The page the hypervisor shares with the guest in native mode; nothing
/// else may live in it.
#[repr(C, align(4096))]
struct Pvcs([u8; 4096]);

static mut PVCS: Pvcs = Pvcs([0; 4096]);

static NATIVE: AtomicBool = AtomicBool::new(false);

/// What [`enter_native`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Supervisor code runs natively (PVM host, PVCS registered).
    Native,
    /// A PVM host, left emulated because the runtime was told so.
    EmulatedByChoice,
    /// No PVM control MSR here (stock KVM, another hypervisor).
    NotPvm,
}

impl Mode {
    /// A short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Native => "native",
            Mode::EmulatedByChoice => "emulated (pvm.native=0)",
            Mode::NotPvm => "not pvm",
        }
    }
}

/// Whether the guest runs in PVM native mode.
#[inline]
pub fn native() -> bool {
    NATIVE.load(Ordering::Relaxed)
}

fn pvcs_addr() -> u64 {
    core::ptr::addr_of!(PVCS) as u64
}

/// Switches to native mode if this is a PVM host and `wanted`. Call once
/// at boot with interrupts off, after the IDT is installed (the detection
/// may take a #GP). `user_mapped`: the loader's page tables already have
/// the user bit everywhere (else [`make_mappings_user`] first).
pub fn enter_native(wanted: bool, user_mapped: bool) -> Mode {
    if try_rdmsr(MSR_PVM_SIGNATURE) != Some(PVM_SIGNATURE) {
        return Mode::NotPvm;
    }
    if !wanted {
        return Mode::EmulatedByChoice;
    }
    if !user_mapped {
        make_mappings_user();
    }
    // SAFETY: a PVM host (its signature MSR answered). The PVCS is a
    // page-aligned, zeroed page of the image used for nothing else; memory is
    // identity-mapped, so its address is its guest-physical address. Flag
    // bits stay clear (bit 0 alone would switch without a PVCS and make every
    // exception a triple fault).
    unsafe { super::cpu::wrmsr(MSR_PVM_CONTROL, pvcs_addr()) };
    NATIVE.store(true, Ordering::Relaxed);
    Mode::Native
}

/// Switches to native mode on Ferry's VMM's word ([`ferry_abi::BootHints`]):
/// the host is PVM and the boot mappings have the user bit, so neither the
/// detection (which needs the IDT, for its #GP) nor the table walk is
/// needed. The first thing the runtime does, with interrupts off: every
/// instruction before it is emulated.
pub fn enter_native_hinted() -> Mode {
    // SAFETY: the VMM vouched for a PVM host and user-bit mappings (as in
    // `enter_native`); the PVCS is the same zeroed page of the image.
    unsafe { super::cpu::wrmsr(MSR_PVM_CONTROL, pvcs_addr()) };
    NATIVE.store(true, Ordering::Relaxed);
    Mode::Native
}

/// Sets the user bit in every present entry of the page tables the
/// loader built (CR3) and flushes the TLB; returns how many entries it
/// changed. Native mode runs ring 0 on hardware ring 3, where a
/// supervisor-only page faults forever. Ferry's VMM and the PVH stub build
/// their tables with the bit set; other loaders (uhyve) do not. Runs
/// emulated, a few ms for a few tables: only where needed.
pub fn make_mappings_user() -> usize {
    const ADDR: u64 = 0x000F_FFFF_FFFF_F000;
    fn walk(table: u64, level: u8) -> usize {
        let mut changed = 0;
        for i in 0..512u64 {
            let slot = (table + i * 8) as *mut u64;
            // SAFETY: `table` is a page-table page of the running tables;
            // the loader identity-maps guest memory, page tables included.
            let e = unsafe { core::ptr::read_volatile(slot) };
            if e & 1 == 0 {
                continue;
            }
            if e & USER == 0 {
                // SAFETY: as above; setting U/S in a present entry only
                // widens who may access the page.
                unsafe { core::ptr::write_volatile(slot, e | USER) };
                changed += 1;
            }
            let leaf = level == 1 || (level < 4 && e & HUGE != 0);
            if !leaf {
                changed += walk(e & ADDR, level - 1);
            }
        }
        changed
    }
    const USER: u64 = 1 << 2;
    const HUGE: u64 = 1 << 7;
    let cr3 = super::cpu::cr3();
    let changed = walk(cr3 & ADDR, 4);
    if changed > 0 {
        // SAFETY: reloading the same CR3 only flushes the TLB.
        unsafe { super::cpu::write_cr3(cr3) };
    }
    changed
}

/// Sets the virtual interrupt flag (PVCS byte 0).
#[inline]
fn set_virtual_if(on: bool) {
    // SAFETY: byte 0 of the PVCS is the guest's to write (the hypervisor
    // reads it at its next trap); volatile, as the hypervisor shares it.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!(PVCS.0[0]), u8::from(on)) }
}

/// Masks interrupts in native mode (the virtual interrupt flag).
#[inline]
pub fn disable_interrupts() {
    set_virtual_if(false);
}

global_asm!(
    ".section .text.pvm, \"ax\"",
    // fn ferry_pvm_halt(pvcs: *mut u8): virtual IF on, HLT, virtual IF off.
    ".global ferry_pvm_halt",
    "ferry_pvm_halt:",
    "mov byte ptr [rdi], 1",
    ".global ferry_pvm_hlt_insn",
    "ferry_pvm_hlt_insn:",
    "hlt",
    ".global ferry_pvm_hlt_done",
    "ferry_pvm_hlt_done:",
    "mov byte ptr [rdi], 0",
    "ret",
    // fn ferry_try_rdmsr(msr: u32, out: *mut u64) -> u64: 0, or 1 after a #GP.
    ".global ferry_try_rdmsr",
    "ferry_try_rdmsr:",
    "mov ecx, edi",
    "xor r8d, r8d",
    ".global ferry_try_rdmsr_insn",
    "ferry_try_rdmsr_insn:",
    "rdmsr",
    ".global ferry_try_rdmsr_resume",
    "ferry_try_rdmsr_resume:",
    "shl rdx, 32",
    "or rax, rdx",
    "mov [rsi], rax",
    "mov rax, r8",
    "ret",
);

unsafe extern "C" {
    fn ferry_pvm_halt(pvcs: *mut u8);
    fn ferry_try_rdmsr(msr: u32, out: *mut u64) -> u64;
    static ferry_pvm_hlt_insn: u8;
    static ferry_pvm_hlt_done: u8;
    static ferry_try_rdmsr_insn: u8;
    static ferry_try_rdmsr_resume: u8;
}

/// Enables interrupts and halts until one arrives, then masks them again.
/// In native mode an interrupt taken before the HLT skips it.
pub fn enable_interrupts_and_halt() {
    // SAFETY: the IDT is installed before anything halts; the routine
    // writes PVCS byte 0 only.
    unsafe { ferry_pvm_halt(core::ptr::addr_of_mut!(PVCS.0[0])) }
}

/// Reads `msr`, or `None` if the CPU refuses it with #GP.
pub fn try_rdmsr(msr: u32) -> Option<u64> {
    let mut value = 0u64;
    // SAFETY: the routine's RDMSR either succeeds or faults with #GP, which
    // [`fixup_gp`] turns into a return of 1; it writes only `value`.
    let faulted = unsafe { ferry_try_rdmsr(msr, &mut value) };
    (faulted == 0).then_some(value)
}

fn addr(sym: &u8) -> u64 {
    sym as *const u8 as u64
}

/// Called for every #GP: if it is the probe's RDMSR, resumes after it with
/// the fault reported. Returns whether it handled the fault.
pub(super) fn fixup_gp(frame: &mut TrapFrame) -> bool {
    // SAFETY: only the symbols' addresses are taken.
    let (insn, resume) = unsafe { (addr(&ferry_try_rdmsr_insn), addr(&ferry_try_rdmsr_resume)) };
    if frame.rip != insn {
        return false;
    }
    frame.rip = resume;
    frame.r8 = 1;
    true
}

/// Called for every interrupt: one taken just before the idle HLT resumes
/// after it, so the guest does not sleep through the wake-up it just had.
pub(super) fn fixup_halt(frame: &mut TrapFrame) {
    // SAFETY: only the symbols' addresses are taken.
    let (insn, done) = unsafe { (addr(&ferry_pvm_hlt_insn), addr(&ferry_pvm_hlt_done)) };
    if frame.rip == insn {
        frame.rip = done;
    }
}

/// Whether the hypervisor says an interrupt is waiting for the virtual
/// interrupt flag (PVCS byte 1).
pub fn interrupt_pending() -> bool {
    // SAFETY: a byte of the PVCS, read volatile (the hypervisor writes it).
    unsafe { core::ptr::read_volatile(core::ptr::addr_of!(PVCS.0[1])) != 0 }
}
