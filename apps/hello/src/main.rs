//! `hello`: prints its arguments and the guest time, optionally sleeps
//! (tickless: HLT until a one-shot timer), and exits with a chosen status.
//!
//! Arguments: `exit=N` (status, default 0), `sleep-ms=N` (sleep before exit),
//! `spin=N` (time N rounds of integer arithmetic, a CPU-speed probe),
//! `ballast-mib=N` (hold N MiB with every page touched),
//! `lines=N` (print `hello: line I` for I from 0 to N-1, as fast as the
//! console takes them: a line is one hypercall, so a snapshot or a move
//! stops the VM at one sooner or later; tests check none is lost or
//! printed twice),
//! any other words are echoed.
#![no_std]
#![no_main]

extern crate alloc;

use core::time::Duration;

use ferry_runtime::{Env, println, time};

ferry_runtime::main!(main);

fn main(env: &Env) -> i32 {
    let t = time::now().since_boot();
    println!(
        "hello from ferry-runtime on {} ({}): args={:?} guest_time_us={} tsc_khz={}",
        env.platform().name(),
        env.cpu_mode().name(),
        env.args(),
        t.as_micros(),
        time::tsc_khz()
    );
    // ballast-mib=N: hold N MiB of memory with every page touched (for
    // snapshot benchmarks).
    let ballast_mib = env
        .arg("ballast-mib")
        .and_then(|n| n.parse::<usize>().ok())
        .unwrap_or(0);
    let mut ballast = alloc::vec![0u8; ballast_mib << 20];
    for (i, page) in ballast.chunks_mut(4096).enumerate() {
        page[0] = (i as u8) | 1;
    }
    if ballast_mib > 0 {
        println!("hello: ballast of {ballast_mib} MiB");
    }
    if let Some(ms) = env.arg("sleep-ms") {
        let Ok(ms) = ms.parse::<u64>() else {
            println!("hello: sleep-ms wants a whole number of milliseconds, got {ms:?}");
            return 2;
        };
        let start = time::now();
        time::sleep(Duration::from_millis(ms));
        let slept = time::now().duration_since(start);
        println!(
            "hello: slept_us={} guest_time_us={}",
            slept.as_micros(),
            time::now().since_boot().as_micros()
        );
    }
    if let Some(n) = env.arg("spin").and_then(|n| n.parse::<u64>().ok()) {
        // A CPU-speed probe: n rounds of integer arithmetic.
        let start = time::now();
        let mut x = 0u64;
        for i in 0..n {
            x = core::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
        }
        println!(
            "hello: spin={n} took_us={} ({x:#x})",
            time::now().duration_since(start).as_micros()
        );
    }
    if let Some(n) = env.arg("lines") {
        let Ok(n) = n.parse::<u64>() else {
            println!("hello: lines wants a whole number, got {n:?}");
            return 2;
        };
        for i in 0..n {
            println!("hello: line {i}");
        }
    }
    core::hint::black_box(&ballast);
    match env.arg("exit").map(str::parse::<i32>) {
        None => 0,
        Some(Ok(code)) => code,
        Some(Err(_)) => {
            println!("hello: exit wants an integer status");
            2
        }
    }
}
