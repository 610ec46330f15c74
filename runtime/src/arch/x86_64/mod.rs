//! x86_64: boot entry, CPU instructions, interrupts and the APIC timer.
//! The only place in the runtime with `unsafe` and inline assembly.

pub mod apic;
pub mod cpu;
pub mod entry;
pub mod idt;
pub mod ioapic;
pub mod pvm;
