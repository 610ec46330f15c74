//! Test guest: does one bad thing, named by its first argument, so the tests
//! can check that a VMM reports it clearly and never reads or writes outside
//! guest memory.
//!
//! - `unknown-port`: writes to an I/O port no device owns.
//! - `hypercall-outside-memory`: a console write whose buffer lies beyond RAM.
//! - `hypercall-huge`: a console write longer than the VMM allows.
//! - `params-outside-memory`: a console write whose parameter block lies beyond RAM.
//! - `mmio`: writes to an unmapped guest-physical address.
//! - `triple-fault`: clears the IDT and faults.
//! - `exception`: an invalid opcode (the runtime reports it and exits 102).
//! - `panic`: a Rust panic (the runtime reports it and exits 101).
#![no_std]
#![no_main]

use ferry_abi::{SerialWriteBuffer, ports};
use ferry_runtime::arch::{cpu, idt};
use ferry_runtime::{Env, println};

ferry_runtime::main!(main);

/// Far beyond any memory size the tests give (1 TiB).
const BEYOND_RAM: u64 = 1 << 40;

fn main(env: &Env) -> i32 {
    let what = env.positional().first().copied().unwrap_or("");
    println!("misbehave: {what}");
    match what {
        "unknown-port" => cpu::outb(0x0666, 1),
        "hypercall-outside-memory" => {
            let p = SerialWriteBuffer {
                len: 16,
                buf: BEYOND_RAM,
            };
            cpu::hypercall(ports::SERIAL_WRITE_BUFFER, &p as *const _ as u64);
        }
        "hypercall-huge" => {
            let p = SerialWriteBuffer {
                len: 1 << 30,
                buf: 0x10_0000,
            };
            cpu::hypercall(ports::SERIAL_WRITE_BUFFER, &p as *const _ as u64);
        }
        "params-outside-memory" => cpu::hypercall(ports::SERIAL_WRITE_BUFFER, BEYOND_RAM),
        "mmio" => {
            let p = 0xD000_0000u64 as *mut u32;
            // SAFETY: deliberately touching an address no RAM backs: the
            // point of this test guest. Identity mapping covers it.
            unsafe { core::ptr::write_volatile(p, 0xdead_beef) };
        }
        "triple-fault" => {
            idt::clear_for_test();
            // SAFETY: deliberately faulting with no IDT (the test's point).
            unsafe { core::arch::asm!("ud2") };
        }
        "exception" => {
            // SAFETY: deliberately an invalid opcode (the test's point).
            unsafe { core::arch::asm!("ud2") };
        }
        "panic" => panic!("misbehave was asked to panic"),
        other => {
            println!("misbehave: unknown case {other:?}");
            return 2;
        }
    }
    println!("misbehave: still running after {what}");
    3
}
