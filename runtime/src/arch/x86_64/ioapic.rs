//! The IOAPIC, to route one device interrupt pin to [`DEVICE_VECTOR`] on
//! the boot CPU, and the legacy 8259 PICs, masked so they never deliver.

use super::cpu::outb;
use super::idt::DEVICE_VECTOR;

/// Where PCs (and Ferry, QEMU, uhyve) put the IOAPIC.
const IOAPIC_BASE: usize = 0xFEC0_0000;
const IOREGSEL: usize = IOAPIC_BASE;
const IOWIN: usize = IOAPIC_BASE + 0x10;
const IOAPICVER: u32 = 1;

fn write(reg: u32, value: u32) {
    // SAFETY: the IOAPIC's two registers are at their architectural
    // addresses in the identity-mapped MMIO hole; volatile 32-bit accesses
    // are how the IOAPIC is programmed.
    unsafe {
        core::ptr::write_volatile(IOREGSEL as *mut u32, reg);
        core::ptr::write_volatile(IOWIN as *mut u32, value);
    }
}

fn read(reg: u32) -> u32 {
    // SAFETY: as for `write`.
    unsafe {
        core::ptr::write_volatile(IOREGSEL as *mut u32, reg);
        core::ptr::read_volatile(IOWIN as *const u32)
    }
}

/// Masks every line of both 8259 PICs.
pub fn mask_pic() {
    outb(0x21, 0xFF);
    outb(0xA1, 0xFF);
}

/// Routes IOAPIC pin `pin` to [`DEVICE_VECTOR`], edge-triggered, active
/// high, fixed delivery to APIC ID 0. Returns false if the pin does not exist.
pub fn route(pin: u8) -> bool {
    let pins = ((read(IOAPICVER) >> 16) & 0xFF) + 1;
    if u32::from(pin) >= pins {
        return false;
    }
    let reg = 0x10 + 2 * u32::from(pin);
    write(reg + 1, 0); // destination: APIC ID 0
    write(reg, u32::from(DEVICE_VECTOR)); // unmasked, edge, high, fixed, physical
    true
}
