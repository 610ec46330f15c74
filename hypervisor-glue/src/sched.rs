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

/// While alive, the calling thread runs at nice -15 (needs CAP_SYS_NICE;
/// without it nothing changes); dropping it restores the priority.
#[derive(Debug)]
pub struct Urgent {
    _restores_on_drop: Background,
}

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
        Urgent {
            _restores_on_drop: Background::at(tid, URGENT_NICE),
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
