//! Phase timings on stderr when `FERRY_TRACE=1` (for boot-time and
//! downtime work). Times are from [`start`] (the process's start, when
//! the CLI calls it first), so phases of different functions line up.
//!
//! A write to stderr costs 10-20 us here, as much as some of the steps a
//! migration's pause is made of: while a [`Hold`] is alive (the pause, on
//! either side), marks are kept in memory and printed when the last one
//! ends, so that tracing does not move what it measures.

use std::sync::{Mutex, OnceLock};
use std::time::Instant;

/// Marks kept while held: how many [`Hold`]s are alive, and the lines.
static HELD: Mutex<(usize, Vec<String>)> = Mutex::new((0, Vec::new()));

static START: OnceLock<Instant> = OnceLock::new();

/// Whether `FERRY_TRACE=1` (read once: marks sit on the pause's path).
static ON: OnceLock<bool> = OnceLock::new();

/// Fixes the origin of `FERRY_TRACE` times (call first thing in `main`).
pub fn start() {
    START.get_or_init(Instant::now);
}

/// A tracer: marks print when `FERRY_TRACE=1`, else cost one branch.
#[derive(Clone, Copy, Debug)]
pub struct Trace(Option<Instant>);

impl Trace {
    /// A tracer (enabled by `FERRY_TRACE=1`).
    pub fn new() -> Self {
        let on = *ON.get_or_init(|| std::env::var_os("FERRY_TRACE").is_some_and(|v| v == "1"));
        Trace(on.then(|| *START.get_or_init(Instant::now)))
    }

    /// Prints `phase` with the time since the process started.
    pub fn mark(&self, phase: &str) {
        if let Some(t) = self.0 {
            // The wall clock too (seconds within the minute), to line up
            // the traces of two processes (a migration's ends).
            let wall = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| (d.as_micros() % 60_000_000) as f64 / 1e6);
            let line = format!(
                "ferry: trace: {:>8.3} ms  (wall :{wall:09.6})  {phase}",
                t.elapsed().as_secs_f64() * 1e3
            );
            let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
            if held.0 > 0 {
                held.1.push(line);
            } else {
                drop(held);
                eprintln!("{line}");
            }
        }
    }

    /// Keeps marks in memory until the returned guard (and any other
    /// alive) is dropped; nothing when tracing is off.
    pub fn hold(&self) -> Hold {
        if self.0.is_some() {
            HELD.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        }
        Hold(self.0.is_some())
    }
}

/// See [`Trace::hold`]: the kept marks print when the last one drops.
#[derive(Debug)]
#[must_use = "marks print when the hold is dropped"]
pub struct Hold(bool);

impl Drop for Hold {
    fn drop(&mut self) {
        if !self.0 {
            return;
        }
        let lines = {
            let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
            held.0 -= 1;
            if held.0 > 0 {
                return;
            }
            std::mem::take(&mut held.1)
        };
        for l in lines {
            eprintln!("{l}");
        }
    }
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}
