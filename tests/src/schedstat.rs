//! How long a process's threads waited for a CPU: `/proc/PID/task/TID/
//! schedstat` (time on a CPU, time waiting on a run queue, in ns), sampled
//! on a thread of its own, so that a gap the client sees can be set
//! against what the guest's vCPU thread was doing then.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// One sample of one thread: seconds since the sampler's zero, ns on a
/// CPU, ns waiting for one.
#[derive(Clone, Copy, Debug)]
struct Sample {
    at: f64,
    cpu: u64,
    wait: u64,
}

/// Samples by thread.
#[derive(Debug, Default)]
pub struct Samples {
    threads: HashMap<u32, Vec<Sample>>,
}

/// A sampler running on its own thread.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    handle: JoinHandle<Samples>,
}

fn read(pid: u32) -> Vec<(u32, u64, u64)> {
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    dir.flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let s = std::fs::read_to_string(e.path().join("schedstat")).ok()?;
            let mut f = s.split_whitespace().map(|x| x.parse::<u64>().ok());
            Some((tid, f.next()??, f.next()??))
        })
        .collect()
}

/// Samples process `pid`'s threads every `every`, times from `zero`, until
/// [`Sampler::finish`] (or the process ends).
pub fn start(pid: u32, zero: Instant, every: Duration) -> Sampler {
    let stop = Arc::new(AtomicBool::new(false));
    let s = stop.clone();
    let handle = std::thread::spawn(move || {
        let mut out = Samples::default();
        while !s.load(Ordering::Relaxed) {
            let now = read(pid);
            if now.is_empty() {
                break;
            }
            let at = zero.elapsed().as_secs_f64();
            for (tid, cpu, wait) in now {
                out.threads
                    .entry(tid)
                    .or_default()
                    .push(Sample { at, cpu, wait });
            }
            std::thread::sleep(every);
        }
        out
    });
    Sampler { stop, handle }
}

impl Sampler {
    /// Stops sampling; what was sampled.
    pub fn finish(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        self.handle.join().unwrap_or_default()
    }
}

impl Samples {
    /// The thread that spent the most time on a CPU (a streaming guest's
    /// vCPU thread).
    pub fn busiest(&self) -> Option<u32> {
        self.threads
            .iter()
            .map(|(tid, s)| {
                let used = match (s.first(), s.last()) {
                    (Some(a), Some(b)) => b.cpu.saturating_sub(a.cpu),
                    _ => 0,
                };
                (used, *tid)
            })
            .max()
            .map(|(_, tid)| tid)
    }

    /// Milliseconds thread `tid` waited for a CPU from `a` to `b` seconds
    /// (between the samples nearest outside that span); None if the span
    /// is not covered.
    pub fn waited(&self, tid: u32, a: f64, b: f64) -> Option<f64> {
        let s = self.threads.get(&tid)?;
        let first = s.iter().rev().find(|x| x.at <= a)?;
        let last = s.iter().find(|x| x.at >= b)?;
        Some(last.wait.saturating_sub(first.wait) as f64 / 1e6)
    }

    /// The median of [`Samples::waited`] over windows of `len` seconds from
    /// `from` to `to` (what the thread waits with no migration).
    pub fn waited_typically(&self, tid: u32, from: f64, to: f64, len: f64) -> Option<f64> {
        let mut v = Vec::new();
        let mut t = from;
        while len > 0.0 && t + len <= to {
            if let Some(w) = self.waited(tid, t, t + len) {
                v.push(w);
            }
            t += len;
        }
        if v.is_empty() {
            return None;
        }
        Some(crate::gaps::median(&mut v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn waits_are_read_between_samples_and_the_busiest_thread_found() {
        let mut s = Samples::default();
        for i in 0..10u64 {
            let at = i as f64 * 0.01;
            s.threads.entry(1).or_default().push(Sample {
                at,
                cpu: i * 9_000_000,
                wait: i * 1_000_000,
            });
            s.threads.entry(2).or_default().push(Sample {
                at,
                cpu: i * 100,
                wait: 0,
            });
        }
        assert_eq!(s.busiest(), Some(1));
        // From the sample at 0.02 s to the one at 0.05 s: 3 ms.
        assert_eq!(s.waited(1, 0.025, 0.045), Some(3.0));
        assert_eq!(s.waited(1, 0.0, 0.2), None, "past the last sample");
        assert_eq!(s.waited_typically(1, 0.0, 0.09, 0.02), Some(2.0));
        // This process's own threads can be read.
        let me = start(std::process::id(), Instant::now(), Duration::from_millis(1));
        std::thread::sleep(Duration::from_millis(20));
        assert!(!me.finish().threads.is_empty());
    }
}
