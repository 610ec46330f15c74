//! Thread priorities. A migration's bulk copying (the pre-copy rounds on
//! the source, receiving them on the destination) competes for CPU with
//! the vCPU it moves; on a small host (2 cores: vCPU, sender, receiver) the
//! scheduler would otherwise take the vCPU off its core for milliseconds,
//! which clients see as gaps before the migration even stops the VM.
//! [`Background`] runs the copying at the lowest priority instead: it then
//! takes the CPU the running VM leaves (and longer, which the downtime
//! budget accounts for, as it measures bandwidth per round). The
//! stop-and-copy, when the VM waits for the copying, runs [`Urgent`]:
//! ahead of everything else on the host, so that the pause is as short as
//! the work.
//!
//! Urgent is real-time (`SCHED_FIFO` at the lowest real-time priority),
//! not just a low nice value: a nice -15 thread still waits for a
//! woken nice-0 one (the client's load, the receiver) now and then, and
//! each of the pause's half-dozen hand-offs between threads and processes
//! paid for it. Measured on a 2-core host, 4 and 256 MB under a 120 MB/s
//! stream, interleaved runs: downtime p50 0.87/0.95 ms at nice -15,
//! 0.53/0.48 ms real-time, p99 3.4/1.7 against 0.76/0.56 ms. A
//! real-time thread here never spins: it blocks on sockets, futexes and
//! KVM, and gives the core back within the stop-and-copy. Threads it
//! starts fall back to normal (`SCHED_RESET_ON_FORK`), and the kernel's
//! real-time throttling bounds it regardless.

/// The nice value of background work.
const NICE: libc::c_int = 19;

/// The nice value of the stop-and-copy.
const URGENT_NICE: libc::c_int = -15;

/// While alive, the calling thread runs at nice 19; dropping it restores
/// the thread's priority (which needs CAP_SYS_NICE; without it the thread
/// stays in the background, slower but correct).
#[derive(Debug)]
pub struct Background {
    tid: libc::id_t,
    old: Option<libc::c_int>,
}

/// While alive, the thread runs real-time (`SCHED_FIFO`, priority 1),
/// and at nice -15 should that be refused (both need CAP_SYS_NICE;
/// without it nothing changes); dropping it restores both.
#[derive(Debug)]
pub struct Urgent {
    tid: libc::pid_t,
    /// Whether this made the thread real-time (it was normal before).
    fifo: bool,
    _nice: Background,
}

/// The real-time priority of the stop-and-copy: the lowest, ahead of
/// every normal thread and behind the kernel's own real-time threads.
const URGENT_RT_PRIORITY: libc::c_int = 1;

impl Urgent {
    /// Moves the calling thread ahead.
    pub fn enter() -> Urgent {
        // SAFETY: gettid has no preconditions.
        Urgent::thread(unsafe { libc::gettid() })
    }

    /// Moves thread `tid` of this process ahead (a migration's source
    /// does this to the vCPU thread it is about to stop: it must leave
    /// KVM_RUN and save the state at once, not wait for a core).
    pub fn thread(tid: libc::pid_t) -> Urgent {
        let nice = Background::at(tid, URGENT_NICE);
        let param = libc::sched_param {
            sched_priority: URGENT_RT_PRIORITY,
        };
        // SAFETY: sched_getscheduler/sched_setscheduler on a thread id of
        // this process (a stale one fails, harmlessly) with a valid
        // sched_param. A thread already real-time (the VMM run under
        // `chrt`) is left as it is.
        let fifo = unsafe {
            libc::sched_getscheduler(tid) == libc::SCHED_OTHER
                && libc::sched_setscheduler(
                    tid,
                    libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
                    &param,
                ) == 0
        };
        Urgent {
            tid,
            fifo,
            _nice: nice,
        }
    }

    /// Whether the thread runs real-time now.
    pub fn is_realtime(&self) -> bool {
        self.fifo
    }
}

impl Drop for Urgent {
    fn drop(&mut self) {
        if self.fifo {
            let param = libc::sched_param { sched_priority: 0 };
            // SAFETY: as in `thread`, on the same thread id. Its nice
            // value is restored after this (field order).
            unsafe { libc::sched_setscheduler(self.tid, libc::SCHED_OTHER, &param) };
        }
    }
}

impl Background {
    /// Moves the calling thread to the background.
    pub fn enter() -> Background {
        // SAFETY: gettid has no preconditions.
        Background::at(unsafe { libc::gettid() }, NICE)
    }

    fn at(tid: libc::pid_t, nice: libc::c_int) -> Background {
        let tid = tid as libc::id_t;
        // SAFETY: getpriority/setpriority on a thread id (of this process;
        // a stale one fails, harmlessly); errno is cleared first because
        // -1 is a valid priority.
        let old = unsafe {
            *libc::__errno_location() = 0;
            let p = libc::getpriority(libc::PRIO_PROCESS, tid);
            let ok = *libc::__errno_location() == 0
                && libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0;
            ok.then_some(p)
        };
        Background { tid, old }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if let Some(p) = self.old {
            // SAFETY: as in `at`, on the same thread id.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, p) };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nice() -> libc::c_int {
        // SAFETY: as above.
        unsafe { libc::getpriority(libc::PRIO_PROCESS, libc::gettid() as libc::id_t) }
    }

    fn policy() -> libc::c_int {
        // SAFETY: as above.
        unsafe { libc::sched_getscheduler(0) }
    }

    #[test]
    fn urgent_is_real_time_as_root_and_restores_the_thread() {
        std::thread::spawn(|| {
            let before = (policy(), nice());
            {
                let u = Urgent::enter();
                // SAFETY: geteuid has no preconditions.
                if unsafe { libc::geteuid() } == 0 {
                    assert!(u.is_realtime());
                    assert_eq!(policy(), libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK);
                    // A thread it starts runs normally.
                    let child = std::thread::spawn(|| (policy(), nice())).join().unwrap();
                    assert_eq!(child, (libc::SCHED_OTHER, 0));
                } else {
                    assert!(!u.is_realtime());
                }
            }
            assert_eq!((policy(), nice()), before);
        })
        .join()
        .unwrap();
    }

    #[test]
    fn background_lowers_and_restores_this_threads_priority() {
        std::thread::spawn(|| {
            let before = nice();
            {
                let _bg = Background::enter();
                assert_eq!(nice(), NICE);
            }
            // Restoring needs CAP_SYS_NICE (CI runs as root).
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                assert_eq!(nice(), before);
            }
        })
        .join()
        .unwrap();
    }
}
