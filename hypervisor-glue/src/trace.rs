//! Phase timings on stderr when `FERRY_TRACE=1` (for boot-time and
//! downtime work). Times are from [`start`] (the process's start, when
//! the CLI calls it first), so phases of different functions line up.

use std::sync::OnceLock;
use std::time::Instant;

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
            eprintln!(
                "ferry: trace: {:>8.3} ms  (wall :{wall:09.6})  {phase}",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}

impl Default for Trace {
    fn default() -> Self {
        Trace::new()
    }
}
