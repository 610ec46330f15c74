//! Thread priorities. A migration's bulk copying (the pre-copy rounds on
//! the source, receiving them on the destination) competes for CPU with
//! the vCPU it moves; on a small host (2 cores: vCPU, sender, receiver) the
//! scheduler would otherwise take the vCPU off its core for milliseconds,
//! which clients see as gaps before the migration even stops the VM.
//! Three things keep the bulk copy off the vCPU's core:
//! - [`Background`]: the copying threads are `SCHED_IDLE`; they take the
//!   CPU the running VM leaves (and longer, which the downtime budget
//!   accounts for, as it measures bandwidth per round);
//! - [`Quick`]: the source's vCPU has a short time slice meanwhile, so
//!   that it takes its core back as soon as it wakes;
//! - [`Autogroup`]: the destination's whole process (a session, so a
//!   scheduling group, of its own) is at nice 19 until the pause.
//!
//! The stop-and-copy, when the VM waits for the copying, runs [`Urgent`]:
//! ahead of everything else on the host, so that the pause is as short as
//! the work; and [`prefault_code`] has mapped the code it runs before it
//! starts.
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

/// The nice value of background work where it cannot be `SCHED_IDLE`.
const NICE: libc::c_int = 19;

/// The nice value of the stop-and-copy where it cannot be real-time.
const URGENT_NICE: libc::c_int = -15;

/// While alive, the calling thread runs in the background: `SCHED_IDLE`
/// if it may come back from it (CAP_SYS_NICE), else at nice 19. Dropping
/// it restores the thread (without CAP_SYS_NICE a nice 19 thread stays
/// there: slower but correct).
///
/// Not just nice 19: the kernel's EEVDF scheduler (Linux 6.6 on) lets a
/// running task finish its slice (about 1-3 ms) before a woken one of any
/// weight takes the core, so a nice 19 copier held the VM's vCPU off a
/// core for 1-4 ms at a time, over 100 times a second of a 1 GiB round 0
/// (`perf sched` on a 2-core host). `SCHED_IDLE` weighs less still, and a
/// woken normal task of the same group takes the core from it; but an
/// idle copier that waited for a core is still owed time, and the other
/// process groups are not its group: hence [`Quick`] and [`Autogroup`].
#[derive(Debug)]
pub struct Background {
    tid: libc::pid_t,
    /// Whether this made the thread `SCHED_IDLE` (it was normal before).
    idle: bool,
    _nice: Option<Nice>,
}

/// While alive, the thread runs real-time (`SCHED_FIFO`, priority 1),
/// and at nice -15 should that be refused (both need CAP_SYS_NICE;
/// without it nothing changes); dropping it restores both.
#[derive(Debug)]
pub struct Urgent {
    tid: libc::pid_t,
    /// Whether this made the thread real-time (it was normal before).
    fifo: bool,
    _nice: Nice,
}

/// The real-time priority of the stop-and-copy: the lowest, ahead of
/// every normal thread and behind the kernel's own real-time threads.
const URGENT_RT_PRIORITY: libc::c_int = 1;

/// Sets thread `tid`'s policy to `policy` (priority `prio`) if it is
/// `SCHED_OTHER` now; whether it did.
fn leave_normal(tid: libc::pid_t, policy: libc::c_int, prio: libc::c_int) -> bool {
    let param = libc::sched_param {
        sched_priority: prio,
    };
    // SAFETY: sched_getscheduler/sched_setscheduler on a thread id of this
    // process (a stale one fails, harmlessly) with a valid sched_param. A
    // thread already under another policy (the VMM run under `chrt`) is
    // left as it is.
    unsafe {
        libc::sched_getscheduler(tid) == libc::SCHED_OTHER
            && libc::sched_setscheduler(tid, policy, &param) == 0
    }
}

/// Puts thread `tid` back to `SCHED_OTHER`.
fn back_to_normal(tid: libc::pid_t) {
    let param = libc::sched_param { sched_priority: 0 };
    // SAFETY: as in `leave_normal`.
    unsafe { libc::sched_setscheduler(tid, libc::SCHED_OTHER, &param) };
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
        let nice = Nice::set(tid, URGENT_NICE);
        let fifo = leave_normal(
            tid,
            libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
            URGENT_RT_PRIORITY,
        );
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
            // Its nice value is restored after this (field order).
            back_to_normal(self.tid);
        }
    }
}

impl Background {
    /// Moves the calling thread to the background.
    pub fn enter() -> Background {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        // (`SCHED_RESET_ON_FORK` does not reset `SCHED_IDLE`: a thread
        // started from here would stay idle. None is.)
        let idle = crate::lockdown::holds(crate::lockdown::CAP_SYS_NICE)
            && leave_normal(tid, libc::SCHED_IDLE, 0);
        Background {
            tid,
            idle,
            _nice: (!idle).then(|| Nice::set(tid, NICE)),
        }
    }

    /// Whether the thread runs `SCHED_IDLE` now.
    pub fn is_idle(&self) -> bool {
        self.idle
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        if self.idle {
            back_to_normal(self.tid);
        }
    }
}

/// A thread's nice value, set while alive (if it could be).
#[derive(Debug)]
struct Nice {
    tid: libc::id_t,
    old: Option<libc::c_int>,
}

/// Thread `tid`'s nice value (None for a stale thread id).
fn nice_of(tid: libc::pid_t) -> Option<libc::c_int> {
    // SAFETY: getpriority on a thread id (of this process; a stale one
    // fails, harmlessly); errno is cleared first because -1 is a valid
    // priority.
    unsafe {
        *libc::__errno_location() = 0;
        let p = libc::getpriority(libc::PRIO_PROCESS, tid as libc::id_t);
        (*libc::__errno_location() == 0).then_some(p)
    }
}

impl Nice {
    fn set(tid: libc::pid_t, nice: libc::c_int) -> Nice {
        let tid = tid as libc::id_t;
        let old = nice_of(tid as libc::pid_t).filter(|_| {
            // SAFETY: setpriority on a thread id, as in `nice_of`.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, tid, nice) == 0 }
        });
        Nice { tid, old }
    }
}

impl Drop for Nice {
    fn drop(&mut self) {
        if let Some(p) = self.old {
            // SAFETY: as in `set`, on the same thread id.
            unsafe { libc::setpriority(libc::PRIO_PROCESS, self.tid, p) };
        }
    }
}

/// The nice value of a migration destination's process group while it
/// receives the pre-copy rounds.
pub const GROUP_NICE: libc::c_int = 19;

/// This process's autogroup (see sched(7)): the group the scheduler
/// shares the CPU between first, before the threads inside it. Every
/// session has one, so a migration's destination, in a session of its own,
/// competes with every other process group on the host at equal weight,
/// whatever its threads' policies: `SCHED_IDLE` or nice 19 inside it
/// change only how it shares its own part. Lowering the group's nice
/// value makes its whole process background work for the host. Measured
/// on a 2-core host (the destination beside the source, a 1 GiB VM under
/// a 120 MB/s stream, 8 interleaved runs each): the client's added gap
/// p50 / p99 3.1 / 6.2 ms with the copiers idle and the vCPU [`Quick`],
/// 1.0 / 4.9 ms with the destination's group at nice 19 too (2.9 / 16.1
/// ms with neither, copiers at nice 19).
///
/// The kernel takes at most one change of any autogroup's nice value per
/// 100 ms from a process without CAP_SYS_ADMIN (EAGAIN otherwise):
/// [`Autogroup::restore`] waits that out.
#[derive(Debug)]
pub struct Autogroup {
    file: std::fs::File,
    /// When the group's nice value last changed, as far as this process
    /// knows (its start for a change made before it: `open` is called
    /// early).
    changed: std::cell::Cell<std::time::Instant>,
}

/// How often the kernel takes a change of an autogroup's nice value from
/// a process without CAP_SYS_ADMIN (any group's: one limit for the host).
const GROUP_CHANGE_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

/// Where a process's autogroup is.
const AUTOGROUP: &std::ffi::CStr = c"/proc/self/autogroup";

impl Autogroup {
    /// Opens this process's autogroup (to be done before the lockdown: it
    /// opens no path after). None where the kernel has no autogroups, and
    /// for a process in the host's root group (one whose session began
    /// outside any autogroup, as a service manager's children may be: the
    /// file then reads empty and the kernel refuses a nice value for it).
    pub fn open() -> Option<Autogroup> {
        let g = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(AUTOGROUP.to_str().ok()?)
            .ok()
            .map(|file| Autogroup {
                file,
                changed: std::cell::Cell::new(std::time::Instant::now()),
            })?;
        g.nice().is_some().then_some(g)
    }

    /// Lowers the calling process's group to [`GROUP_NICE`], best effort.
    /// Only system calls on a static path: for a child between fork and
    /// exec (async-signal-safe), just after it started its own session.
    pub fn lower_in_child() {
        const _: () = assert!(GROUP_NICE == 19, "the bytes written below");
        // SAFETY: open/write/close on a static NUL-terminated path and a
        // static buffer; the descriptor is this function's own.
        unsafe {
            let fd = libc::open(AUTOGROUP.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC);
            if fd >= 0 {
                libc::write(fd, b"19".as_ptr().cast(), 2);
                libc::close(fd);
            }
        }
    }

    /// The group's nice value now.
    pub fn nice(&self) -> Option<libc::c_int> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 64];
        let n = self.file.read_at(&mut b, 0).ok()?;
        // "/autogroup-12 nice 19"
        let text = std::str::from_utf8(&b[..n]).ok()?;
        text.split_whitespace().last()?.parse().ok()
    }

    /// Sets the group's nice value.
    pub fn set(&self, nice: libc::c_int) -> std::io::Result<()> {
        use std::io::Write;
        (&self.file).write_all(nice.to_string().as_bytes())?;
        self.changed.set(std::time::Instant::now());
        Ok(())
    }

    /// Whether a change now would be too soon after this process's last
    /// one for the kernel to take it at once (without CAP_SYS_ADMIN; with
    /// it, or once another process changed a group since, this may be
    /// wrong either way: [`Autogroup::set`] then says EAGAIN).
    pub fn recently_changed(&self) -> bool {
        // A margin over the kernel's 100 ms: it counts in jiffies.
        self.changed.get().elapsed() < GROUP_CHANGE_EVERY + GROUP_CHANGE_EVERY / 5
    }

    /// Sets the group's nice value back to 0, retrying for up to `within`
    /// while the kernel's rate limit refuses it; whether it was set.
    pub fn restore(&self, within: std::time::Duration) -> bool {
        let until = std::time::Instant::now() + within;
        loop {
            match self.set(0) {
                Ok(()) => return true,
                Err(e)
                    if e.kind() == std::io::ErrorKind::WouldBlock
                        && std::time::Instant::now() < until =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                Err(_) => return false,
            }
        }
    }
}

/// The time slice of a thread that must take a core soon after it wakes.
const QUICK_SLICE_NS: u64 = 100_000;

/// While alive, thread `tid` (of this process) takes a core soon after it
/// wakes: its time slice is short ([`QUICK_SLICE_NS`], where the kernel
/// knows custom slices: Linux 6.12 on; older kernels ignore it). Dropping
/// it gives the thread the kernel's default slice back.
///
/// For the source's vCPU during the bulk pre-copy. The kernel's EEVDF
/// scheduler lets the thread it picked run out its slice (or a tick)
/// before a woken one of any weight or policy takes the core, and a
/// background copier that waited for a core is owed up to that much: on a
/// 2-core host the vCPU waited 1-4 ms at a time, over 100 ms per second
/// of the copy, even against `SCHED_IDLE` copiers (`perf sched`). A thread
/// with a shorter slice than the running one takes the core when it wakes
/// (the kernel's PREEMPT_SHORT): the waits fell to about 40 ms per
/// second. Its share of the CPU does not change.
#[derive(Debug)]
pub struct Quick {
    tid: libc::pid_t,
    set: bool,
}

impl Quick {
    /// Shortens thread `tid`'s slice.
    pub fn thread(tid: libc::pid_t) -> Quick {
        Quick {
            tid,
            set: set_slice(tid, QUICK_SLICE_NS),
        }
    }

    /// Whether the kernel took the short slice.
    pub fn is_set(&self) -> bool {
        self.set
    }
}

impl Drop for Quick {
    fn drop(&mut self) {
        if self.set {
            set_slice(self.tid, 0);
        }
    }
}

/// Sets thread `tid`'s time slice to `ns` nanoseconds (0: the kernel's
/// default), keeping its policy and nice value; whether the kernel took it.
fn set_slice(tid: libc::pid_t, ns: u64) -> bool {
    /// `struct sched_attr` (its first version, 56 bytes).
    #[repr(C)]
    #[derive(Default)]
    struct SchedAttr {
        size: u32,
        policy: u32,
        flags: u64,
        nice: i32,
        priority: u32,
        runtime: u64,
        deadline: u64,
        period: u64,
        util_min: u32,
        util_max: u32,
    }
    // SAFETY: sched_getscheduler on a thread id of this process (a stale
    // one fails).
    let policy = unsafe { libc::sched_getscheduler(tid) };
    let Some(nice) = nice_of(tid).filter(|_| policy >= 0) else {
        return false;
    };
    let policy = policy & !libc::SCHED_RESET_ON_FORK;
    // Only a fair-class thread has a slice (a real-time one keeps its own).
    if policy != libc::SCHED_OTHER && policy != libc::SCHED_IDLE && policy != libc::SCHED_BATCH {
        return false;
    }
    let mut a = SchedAttr {
        size: std::mem::size_of::<SchedAttr>() as u32,
        policy: policy as u32,
        nice,
        runtime: ns,
        ..SchedAttr::default()
    };
    // SAFETY: sched_setattr with a fully initialised attribute of the size
    // it states, on a thread id of this process (a stale one fails).
    unsafe { libc::syscall(libc::SYS_sched_setattr, tid, &mut a, 0) == 0 }
}

/// MADV_POPULATE_READ (Linux 5.14), which libc may not name.
const MADV_POPULATE_READ: libc::c_int = 22;

/// Maps every page of this program's own code and read-only data now, so
/// that code first run in a migration's pause (saving and encoding the
/// state on the source, decoding and loading it on the destination) takes
/// no page faults there. The kernel maps an executable's pages lazily, on
/// first use: each first use costs a minor fault, and the pause runs a few
/// dozen functions for the first time in the process (measured: the first
/// encode of a VM's state took 59 us, the next ones 1.3 us). About 5 MB,
/// from the page cache; an older kernel (EINVAL) just skips it. Returns
/// the bytes mapped.
pub fn prefault_code() -> usize {
    unsafe extern "C" fn each(
        info: *mut libc::dl_phdr_info,
        _size: libc::size_t,
        mapped: *mut libc::c_void,
    ) -> libc::c_int {
        // SAFETY: dl_iterate_phdr passes a valid dl_phdr_info whose
        // dlpi_phdr points at dlpi_phnum program headers, for the duration
        // of this call.
        let info = unsafe { &*info };
        let headers = if info.dlpi_phdr.is_null() {
            &[][..]
        } else {
            // SAFETY: as above.
            unsafe { std::slice::from_raw_parts(info.dlpi_phdr, usize::from(info.dlpi_phnum)) }
        };
        let page = 4096u64;
        for h in headers
            .iter()
            .filter(|h| h.p_type == libc::PT_LOAD && h.p_flags & libc::PF_W == 0)
        {
            let start = (info.dlpi_addr + h.p_vaddr) & !(page - 1);
            let end = (info.dlpi_addr + h.p_vaddr + h.p_memsz).next_multiple_of(page);
            // SAFETY: advice on a read-only segment this program has
            // mapped; populating reads it in, changing nothing.
            let r = unsafe {
                libc::madvise(
                    start as *mut libc::c_void,
                    (end - start) as usize,
                    MADV_POPULATE_READ,
                )
            };
            if r == 0 {
                // SAFETY: `mapped` is the `usize` prefault_code passed.
                unsafe { *mapped.cast::<usize>() += (end - start) as usize };
            }
        }
        // The first object is the program itself: stop after it.
        1
    }
    let mut mapped = 0usize;
    // SAFETY: dl_iterate_phdr calls `each` with valid arguments, one object
    // at a time, under its own lock; `mapped` outlives the call.
    unsafe { libc::dl_iterate_phdr(Some(each), (&raw mut mapped).cast()) };
    mapped
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The program's code and read-only data are mapped (the test binary's
    /// own: megabytes of it).
    #[test]
    fn prefaulting_maps_the_programs_code() {
        let n = prefault_code();
        assert!(
            n > 1 << 20,
            "only {n} bytes mapped (MADV_POPULATE_READ needs Linux 5.14)"
        );
    }

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
    fn a_group_opened_now_counts_as_recently_changed() {
        // The change that matters came just before `open` (the receiver's,
        // between fork and exec): for the kernel's 100 ms, it is recent.
        let own_session = || {
            // SAFETY: getsid and getpid have no preconditions.
            unsafe { libc::getsid(0) == libc::getpid() }
        };
        if !own_session() && Autogroup::open().is_none() {
            // This test runs in the host's root group (started outside
            // any session of its own): run it again where the destination
            // runs, in a session (and so an autogroup) of its own.
            return in_a_session_of_its_own(
                "sched::tests::a_group_opened_now_counts_as_recently_changed",
            );
        }
        let Some(g) = Autogroup::open() else {
            return skip(
                "a_group_opened_now_counts_as_recently_changed",
                "this kernel has no autogroups (/proc/self/autogroup)",
            );
        };
        assert!(g.nice().is_some());
        assert!(g.recently_changed());
        std::thread::sleep(GROUP_CHANGE_EVERY + GROUP_CHANGE_EVERY / 4);
        assert!(!g.recently_changed());
    }

    /// A test that cannot run here: it fails, unless `FERRY_ALLOW_SKIP=1`,
    /// and then says SKIPPED straight to the terminal (past the harness's
    /// capture of `eprintln!`).
    fn skip(test: &str, why: &str) {
        use std::io::Write;
        assert!(
            std::env::var_os("FERRY_ALLOW_SKIP").is_some_and(|v| v == "1"),
            "{test} cannot run: {why}; FERRY_ALLOW_SKIP=1 skips it"
        );
        let _ = writeln!(std::io::stderr(), "!!! SKIPPED {test}: {why} !!!");
    }

    /// Runs the test `name` of this binary again in a new session, and
    /// asserts that it ran and passed there.
    fn in_a_session_of_its_own(name: &str) {
        use std::os::unix::process::CommandExt;
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([name, "--exact", "--nocapture", "--test-threads=1"]);
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            })
        };
        let out = cmd.output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && text.contains("1 passed"),
            "in a session of its own: {out:?}"
        );
    }

    #[test]
    fn background_lowers_and_restores_this_threads_priority() {
        std::thread::spawn(|| {
            let before = (policy(), nice());
            // SAFETY: geteuid has no preconditions.
            let root = unsafe { libc::geteuid() } == 0;
            {
                let bg = Background::enter();
                if root {
                    assert!(bg.is_idle());
                    assert_eq!(policy(), libc::SCHED_IDLE);
                } else {
                    assert!(!bg.is_idle());
                    assert_eq!(nice(), NICE);
                }
            }
            // Restoring needs CAP_SYS_NICE (CI runs as root).
            if root {
                assert_eq!((policy(), nice()), before);
            }
        })
        .join()
        .unwrap();
    }

    /// The kernel's (major, minor) version.
    fn kernel() -> (u32, u32) {
        let r = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let mut v = r.trim().split(['.', '-']).map(|p| p.parse().unwrap_or(0));
        (v.next().unwrap_or(0), v.next().unwrap_or(0))
    }

    /// Thread `tid`'s time slice as the kernel reports it (`sched_runtime`).
    fn slice_of(tid: libc::pid_t) -> u64 {
        let mut a = [0u64; 7]; // struct sched_attr, first version: 56 bytes
        // SAFETY: sched_getattr into a buffer of the size it is told.
        let r = unsafe { libc::syscall(libc::SYS_sched_getattr, tid, a.as_mut_ptr(), 56, 0) };
        assert_eq!(r, 0, "sched_getattr: {}", std::io::Error::last_os_error());
        a[3] // size, policy | flags | nice, priority | runtime
    }

    #[test]
    fn quick_shortens_a_threads_slice_and_gives_it_back() {
        // Custom slices came with Linux 6.12; before it the kernel takes
        // the attribute and ignores its runtime.
        if kernel() < (6, 12) {
            return skip(
                "quick_shortens_a_threads_slice_and_gives_it_back",
                &format!("Linux {:?} has no custom time slices (6.12 on)", kernel()),
            );
        }
        std::thread::spawn(|| {
            // SAFETY: gettid has no preconditions.
            let me = unsafe { libc::gettid() };
            let before = (policy(), nice(), slice_of(me));
            {
                let q = Quick::thread(me);
                assert!(q.is_set());
                assert_eq!(slice_of(me), QUICK_SLICE_NS);
                assert_eq!((policy(), nice()), (before.0, before.1));
            }
            assert_eq!((policy(), nice(), slice_of(me)), before);
            // An idle thread stays idle.
            // SAFETY: geteuid has no preconditions.
            if unsafe { libc::geteuid() } == 0 {
                let _bg = Background::enter();
                let q = Quick::thread(me);
                assert!(q.is_set());
                assert_eq!(policy(), libc::SCHED_IDLE);
            }
        })
        .join()
        .unwrap();
    }
}
