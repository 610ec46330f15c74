//! `hermit-probe`: a std program on RustyHermit for Ferry's tests.
//!
//! With no arguments it checks, and says on stdout, that threads run, that
//! floating-point state survives task switches (three threads compute
//! chains that must match a single-threaded run bit for bit), that sleep
//! and `Instant` agree, and that `SystemTime` is today; then it exits with
//! status 0, or 1 after a line naming what failed.
//!
//! `serve=PORT`: answers on TCP port PORT, a thread per connection, for
//! tests of time across a snapshot or a move: a line `time` gets
//! `mono_ns=N unix_ns=N clock_ns=N` (an `Instant` since the program
//! started, `SystemTime`, and the kernel's raw CLOCK_MONOTONIC, which on
//! Ferry is its guest time), `sleep MS` gets `slept_ns=N` after sleeping.
//! `spin=N`: N rounds of a busy loop, and the time they took.
//! `exit`: exit at once after the first line (for boot timings).

use ferry_hermit as _;

use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A floating-point chain whose result depends on every step.
fn chain(seed: f64, rounds: u32, yield_every: u32) -> f64 {
    let mut x = seed;
    for i in 0..rounds {
        x = x * 1.000_000_1 + f64::from(i % 7) / 3.0 - x / 7.0;
        if yield_every != 0 && i % yield_every == 0 {
            thread::yield_now();
        }
    }
    x
}

/// One self-check: `Err` says what went wrong.
type Check = fn() -> Result<(), String>;

fn floating_point_across_switches() -> Result<(), String> {
    const ROUNDS: u32 = 400_000;
    let seeds = [1.5f64, -2.25, 1e6];
    let expected: Vec<f64> = seeds.iter().map(|&s| chain(s, ROUNDS, 0)).collect();
    let handles: Vec<_> = seeds
        .iter()
        .map(|&s| thread::spawn(move || chain(s, ROUNDS, 1000)))
        .collect();
    // The main thread keeps its own FP state busy meanwhile.
    let mine = chain(0.5, ROUNDS, 1000);
    if mine.to_bits() != chain(0.5, ROUNDS, 0).to_bits() {
        return Err("the main thread's floating-point chain changed".into());
    }
    for (i, h) in handles.into_iter().enumerate() {
        let got = h.join().map_err(|_| format!("thread {i} panicked"))?;
        if got.to_bits() != expected[i].to_bits() {
            return Err(format!(
                "thread {i}: {got:e}, expected {:e}: floating-point state leaked between tasks",
                expected[i]
            ));
        }
    }
    Ok(())
}

fn sleep_and_instant() -> Result<(), String> {
    let t = Instant::now();
    thread::sleep(Duration::from_millis(100));
    let e = t.elapsed();
    if e < Duration::from_millis(100) || e > Duration::from_secs(5) {
        return Err(format!("slept 100 ms, Instant says {e:?}"));
    }
    Ok(())
}

fn wall_clock() -> Result<(), String> {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_err(|e| format!("SystemTime before 1970: {e}"))?;
    // 2024-01-01 .. 2100-01-01
    if !(1_704_067_200..4_102_444_800).contains(&now.as_secs()) {
        return Err(format!("SystemTime says {} s since 1970", now.as_secs()));
    }
    Ok(())
}

/// The kernel's CLOCK_MONOTONIC in ns (what `Instant` is made of).
#[cfg(target_os = "hermit")]
fn monotonic_ns() -> u128 {
    let mut ts = hermit_abi::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec for the kernel to fill.
    let r = unsafe { hermit_abi::clock_gettime(hermit_abi::CLOCK_MONOTONIC, &mut ts) };
    if r != 0 {
        return 0;
    }
    ts.tv_sec as u128 * 1_000_000_000 + ts.tv_nsec as u128
}

#[cfg(not(target_os = "hermit"))]
fn monotonic_ns() -> u128 {
    0
}

fn answer(line: &str, start: Instant) -> String {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["time"] => {
            let unix = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0);
            format!(
                "mono_ns={} unix_ns={unix} clock_ns={}",
                start.elapsed().as_nanos(),
                monotonic_ns()
            )
        }
        ["sleep", ms] => match ms.parse::<u64>() {
            Ok(ms) if ms <= 60_000 => {
                let t = Instant::now();
                thread::sleep(Duration::from_millis(ms));
                format!("slept_ns={}", t.elapsed().as_nanos())
            }
            _ => "error: sleep MS, at most 60000".into(),
        },
        _ => format!("error: unknown request {line:?} (time, sleep MS)"),
    }
}

fn serve(port: u16) -> ! {
    use std::io::{BufRead, BufReader, Write};
    let start = Instant::now();
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap_or_else(|e| {
        println!("hermit-probe: cannot listen on port {port}: {e}");
        std::process::exit(1)
    });
    println!("hermit-probe: listening on port {port}");
    for conn in listener.incoming().flatten() {
        thread::spawn(move || {
            let Ok(mut out) = conn.try_clone() else {
                return;
            };
            for line in BufReader::new(conn).lines() {
                let Ok(line) = line else { return };
                if writeln!(out, "{}", answer(&line, start)).is_err() {
                    return;
                }
            }
        });
    }
    std::process::exit(1)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    println!("hermit-probe: std on RustyHermit, args {:?}", &args[1..]);
    for a in &args[1..] {
        if a == "exit" {
            std::process::exit(0);
        }
        if let Some(p) = a.strip_prefix("serve=") {
            serve(p.parse().unwrap_or(7));
        }
        if let Some(n) = a.strip_prefix("spin=") {
            let n: u64 = n.parse().unwrap_or(1_000_000);
            let t = Instant::now();
            let mut x = 0u64;
            for i in 0..n {
                x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(i));
            }
            println!("hermit-probe: spin {n} in {:?} ({x})", t.elapsed());
        }
    }
    let checks: [(&str, Check); 3] = [
        (
            "floating point across task switches",
            floating_point_across_switches,
        ),
        ("sleep and Instant", sleep_and_instant),
        ("wall clock", wall_clock),
    ];
    let mut failed = false;
    for (name, check) in checks {
        match check() {
            Ok(()) => println!("hermit-probe: ok: {name}"),
            Err(e) => {
                println!("hermit-probe: FAILED: {name}: {e}");
                failed = true;
            }
        }
    }
    std::process::exit(i32::from(failed));
}
