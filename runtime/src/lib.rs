//! Ferry's guest runtime: a `no_std` unikernel runtime for
//! `x86_64-unknown-none` (soft-float: the PVM KVM here cannot emulate SSE,
//! x87 or XGETBV in guest ring 0).
//!
//! One image boots three ways ([`platform`]): through the Hermit entry ABI
//! under Ferry's VMM or stock uhyve, and through the PVH entry under
//! `qemu-system-x86_64 -kernel`. The runtime then installs an IDT
//! ([`arch`]), a heap over the RAM after the image ([`heap`]), guest time
//! from the TSC through the VMM's clock page ([`time`]), a tickless idle
//! (HLT plus a one-shot TSC-deadline timer), and calls the application.
//!
//! Layers, bottom up: `arch` (the only `unsafe` besides the platform's boot
//! parsing) -> `platform` (what booted us; console and exit) -> `heap`,
//! `time`, `args`, `console` -> the app API ([`Env`], [`main!`]).
//!
//! An application is a `no_std` binary:
//!
//! ```ignore
//! #![no_std]
//! #![no_main]
//! use ferry_runtime::{println, Env};
//!
//! ferry_runtime::main!(main);
//!
//! fn main(env: &Env) -> i32 {
//!     println!("hello, {:?}", env.args());
//!     0
//! }
//! ```
#![no_std]
#![deny(missing_docs)]

extern crate alloc;

pub mod arch {
    //! Architecture support (x86_64 only).
    #[path = "x86_64/mod.rs"]
    mod x86_64;
    pub use x86_64::*;
}
pub mod args;
pub mod console;
pub mod drivers;
pub mod fdt;
pub mod heap;
pub mod net;
pub mod platform;
pub mod time;

use alloc::string::String;
use alloc::vec::Vec;

pub use platform::Platform;

/// Exit status after a panic (as Rust's std uses).
pub const PANIC_EXIT_STATUS: i32 = 101;

/// What the application gets: its arguments and the platform it runs on.
#[derive(Debug)]
pub struct Env {
    args: args::Args,
    platform: Platform,
}

impl Env {
    /// The application's arguments (the words after `--`).
    pub fn args(&self) -> &[String] {
        &self.args.app
    }

    /// The runtime's arguments (the words before `--`).
    pub fn runtime_args(&self) -> &[String] {
        &self.args.runtime
    }

    /// The value of the first application argument `key=value`.
    pub fn arg(&self, key: &str) -> Option<&str> {
        self.args
            .app
            .iter()
            .find_map(|a| a.strip_prefix(key)?.strip_prefix('='))
    }

    /// Application arguments that are not `key=value` pairs.
    pub fn positional(&self) -> Vec<&str> {
        self.args
            .app
            .iter()
            .filter(|a| !a.contains('='))
            .map(String::as_str)
            .collect()
    }

    /// The platform the runtime booted on.
    pub fn platform(&self) -> Platform {
        self.platform
    }

    /// How the vCPU runs the guest's code: natively on a PVM host, or
    /// instruction by instruction (see [`arch::pvm`]).
    pub fn cpu_mode(&self) -> arch::pvm::Mode {
        platform::cpu_mode()
    }
}

/// Ends the VM with `status` (the VMM exits with it).
pub fn exit(status: i32) -> ! {
    platform::exit(status)
}

/// Declares the application's entry point: `fn(&Env) -> i32`, whose return
/// value is the VM's exit status.
#[macro_export]
macro_rules! main {
    ($f:path) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub fn __ferry_app_main(env: &$crate::Env) -> i32 {
            $f(env)
        }
    };
}

unsafe extern "Rust" {
    fn __ferry_app_main(env: &Env) -> i32;
}

fn run_app(args: args::Args) -> ! {
    let env = Env {
        args,
        platform: platform::current(),
    };
    // SAFETY: every image defines `__ferry_app_main` through `main!`, with
    // exactly this signature.
    let status = unsafe { __ferry_app_main(&env) };
    exit(status)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    console::write_fmt(format_args!("ferry-runtime: panic: {info}\n"));
    exit(PANIC_EXIT_STATUS)
}
