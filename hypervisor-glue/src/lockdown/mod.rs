//! Least privilege for a VM process, applied once it has opened what it
//! needs (`/dev/kvm`, the VM, the tap, the control socket):
//!
//! 1. **Jail** (optional, `--jail DIR --uid N --gid N`): `chroot(DIR)` and
//!    become that user and group (no supplementary groups). Every thread
//!    shares the root and, through glibc, the new ids.
//! 2. **Capabilities**: every thread empties its bounding, ambient,
//!    inheritable, permitted and effective sets, keeping only
//!    `CAP_SYS_NICE` when it stays uid 0 (the destination raises its
//!    priority for the stop-and-copy; see [`crate::sched`]). The bounding
//!    and ambient sets go at [`configure`], before any thread starts (every
//!    thread inherits them; they only limit what an `execve`, which a VM
//!    process never makes, could gain); the others at the lockdown.
//! 3. **Seccomp** (on unless `--seccomp off`): `NoNewPrivs`, then a filter
//!    per thread, by what the thread does ([`Role`]): the vCPU may make the
//!    KVM ioctls a VM needs and no others, the net worker only moves frames,
//!    the control threads may open sockets but not files, and so on
//!    (`filters.rs`). A system call outside a thread's filter ends the VMM
//!    with one line naming the thread and the call.
//!
//! Threads start at different times; some before the lockdown (the signal
//! thread, the net worker, the control socket's), some after (control
//! connections). Each calls [`enter`] first thing: after the lockdown it
//! takes its filter at once; before, it registers, and [`lock`] later
//! reaches it with a signal whose handler drops its capabilities and
//! installs its filter (capabilities, like filters, belong to a thread),
//! while the locking thread does its own. [`lock`] returns only when every
//! registered thread has done so.

mod filters;
mod names;

use std::cell::Cell;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

pub use filters::Programs;

/// What a thread does, which decides its filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    /// The vCPU (the main thread): KVM_RUN and the VM's state, the console,
    /// snapshots into a passed file, the destination's channel.
    Vcpu = 1,
    /// The network card's worker: frames between the tap and the guest.
    Net = 2,
    /// The control socket and its connections, migrations out.
    Api = 3,
    /// The signal thread (SIGINT/SIGTERM/SIGHUP).
    Signals = 4,
    /// A destination session's line to its receiver.
    Session = 5,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 5] = [
        Role::Vcpu,
        Role::Net,
        Role::Api,
        Role::Signals,
        Role::Session,
    ];

    fn from_u8(v: u8) -> Option<Role> {
        Some(match v {
            1 => Role::Vcpu,
            2 => Role::Net,
            3 => Role::Api,
            4 => Role::Signals,
            5 => Role::Session,
            _ => return None,
        })
    }

    /// The role's name, as the violation line gives it.
    pub fn name(self) -> &'static str {
        match self {
            Role::Vcpu => "vcpu",
            Role::Net => "net worker",
            Role::Api => "control",
            Role::Signals => "signals",
            Role::Session => "session",
        }
    }
}

/// Where to confine the VMM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Jail {
    /// The new root directory.
    pub dir: PathBuf,
    /// The user to become.
    pub uid: u32,
    /// The group to become.
    pub gid: u32,
}

/// What [`lock`] does.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Install the seccomp filters.
    pub seccomp: bool,
    /// Confine the process.
    pub jail: Option<Jail>,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            seccomp: true,
            jail: None,
        }
    }
}

/// Why the lockdown failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A step of the lockdown failed.
    #[error("cannot lock the VMM down: {what}: {source}")]
    Step {
        /// The step.
        what: String,
        /// The system's error.
        source: std::io::Error,
    },
    /// The jail is not usable.
    #[error("--jail {0}")]
    Jail(String),
    /// A filter did not compile.
    #[error("cannot build the seccomp filter of the {role} thread: {why}")]
    Filter {
        /// The thread's role.
        role: &'static str,
        /// Why.
        why: String,
    },
    /// [`lock`] without [`configure`] first (which installs the handlers
    /// and drops the bounding sets).
    #[error("internal: the lockdown was not configured before the VM's threads started")]
    NotConfigured,
    /// A thread the VMM started did not get to its first step in time.
    #[error("a thread of the VMM did not start within 5 s; the VMM stops")]
    NotStarted,
    /// A thread did not take its filter.
    #[error("the {0} thread did not lock down (its filter or capabilities); the VMM stops")]
    Thread(&'static str),
}

/// Most threads that may register before the lockdown.
const SLOTS: usize = 32;

struct Registry {
    locked: bool,
}

static POLICY: OnceLock<Policy> = OnceLock::new();
static REGISTRY: Mutex<Registry> = Mutex::new(Registry { locked: false });
static LOCKED: AtomicBool = AtomicBool::new(false);
static PROGRAMS: OnceLock<Programs> = OnceLock::new();
/// Registered threads: tid (0 = free), role, outcome (0 pending, 1 done,
/// 2 failed). Read by the signal handler, hence atomics.
static TIDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
static ROLES: [AtomicU8; SLOTS] = [const { AtomicU8::new(0) }; SLOTS];
static DONE: [AtomicU8; SLOTS] = [const { AtomicU8::new(0) }; SLOTS];
/// How many threads took a filter (for `ferry status`).
static FILTERED: AtomicI32 = AtomicI32::new(0);
/// Threads [`spawn`] started that have not called [`enter`] yet: [`lock`]
/// waits for them (a thread starts in ~1 ms here; its creator goes on
/// meanwhile).
static STARTING: AtomicU32 = AtomicU32::new(0);

thread_local! {
    /// This thread's role (0: none yet), for the violation line.
    static MY_ROLE: Cell<u8> = const { Cell::new(0) };
    /// Frees this thread's registry slot when it ends.
    static SLOT: SlotGuard = const { SlotGuard(Cell::new(usize::MAX)) };
}

struct SlotGuard(Cell<usize>);

impl Drop for SlotGuard {
    fn drop(&mut self) {
        let i = self.0.get();
        if i < SLOTS {
            TIDS[i].store(0, Ordering::Release);
        }
    }
}

/// The lockdown signal (a real-time one glibc leaves to programs).
fn lock_signal() -> libc::c_int {
    libc::SIGRTMIN() + 6
}

fn gettid() -> i32 {
    // SAFETY: gettid has no preconditions.
    unsafe { libc::gettid() }
}

fn os(what: &str) -> impl FnOnce(std::io::Error) -> Error + '_ {
    move |source| Error::Step {
        what: what.to_string(),
        source,
    }
}

/// Sets the policy and installs the handlers (SIGSYS, the lockdown
/// signal). Call once, first thing in a VM process, before any thread.
pub fn configure(policy: Policy) -> Result<(), Error> {
    if let Some(j) = &policy.jail {
        check_jail(j)?;
    }
    let keep_nice = policy.jail.is_none();
    let _ = POLICY.set(policy);
    // No thread runs yet: the threads to come inherit this.
    drop_bounding(keep_nice);
    // SAFETY: installing handlers for SIGSYS and the lockdown signal; both
    // handlers only make async-signal-safe calls and touch atomics and
    // this thread's constant-initialised thread-locals.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_sigsys as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(libc::SIGSYS, &sa, std::ptr::null_mut()) != 0 {
            return Err(os("SIGSYS handler")(std::io::Error::last_os_error()));
        }
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_lock_signal as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO | libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(lock_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(os("lockdown signal handler")(
                std::io::Error::last_os_error(),
            ));
        }
    }
    Ok(())
}

fn policy() -> &'static Policy {
    POLICY.get_or_init(Policy::default)
}

/// Whether this process runs under seccomp filters (after [`lock`]).
pub fn filtered_threads() -> i32 {
    FILTERED.load(Ordering::Acquire)
}

/// What the lockdown did, in words, for `ferry status`.
pub fn describe() -> String {
    if !LOCKED.load(Ordering::Acquire) {
        return "not locked down".into();
    }
    let p = policy();
    let mut s = if p.seccomp {
        format!("seccomp on ({} threads)", filtered_threads())
    } else {
        "seccomp off".into()
    };
    match &p.jail {
        Some(j) => s.push_str(&format!(
            ", jailed in {} as uid {} gid {}, no capabilities",
            j.dir.display(),
            j.uid,
            j.gid
        )),
        None => s.push_str(", capabilities dropped but CAP_SYS_NICE"),
    }
    s
}

/// Called first thing by every thread of a VM process.
pub fn enter(role: Role) {
    MY_ROLE.with(|r| r.set(role as u8));
    let reg = REGISTRY.lock().expect("lockdown registry");
    if reg.locked {
        drop(reg);
        if let Err(e) = apply_here(role) {
            fatal(&format!("ferry: error: {e}\n"));
        }
        return;
    }
    let me = gettid();
    for t in &TIDS {
        if t.load(Ordering::Acquire) == me {
            t.store(0, Ordering::Release);
        }
    }
    for i in 0..SLOTS {
        if TIDS[i].load(Ordering::Acquire) == 0 {
            ROLES[i].store(role as u8, Ordering::Release);
            DONE[i].store(0, Ordering::Release);
            TIDS[i].store(me, Ordering::Release);
            SLOT.with(|s| s.0.set(i));
            return;
        }
    }
    drop(reg);
    fatal("ferry: error: too many threads before the lockdown\n");
}

/// Locks the process down (see the module), after [`configure`] (which
/// dropped the bounding sets): the jail; then every registered thread and
/// this one empty their capability sets and take their filters, this one
/// as `role`. Returns once all are done.
pub fn lock(role: Role, unlink_dir: Option<i32>) -> Result<(), Error> {
    let p = POLICY.get().ok_or(Error::NotConfigured)?.clone();
    if p.seccomp {
        quiet_libc();
        let _ = PROGRAMS.set(Programs::new(unlink_dir));
    }
    // Every thread started so far registers before the lock is taken: it
    // then takes its capabilities' loss and filter with the others.
    wait_for(|| Ok(STARTING.load(Ordering::Acquire) == 0)).map_err(|()| Error::NotStarted)?;
    MY_ROLE.with(|r| r.set(role as u8));
    let others = {
        let mut reg = REGISTRY.lock().expect("lockdown registry");
        reg.locked = true;
        LOCKED.store(true, Ordering::Release);
        let me = gettid();
        (0..SLOTS)
            .filter(|&i| {
                let tid = TIDS[i].load(Ordering::Acquire);
                tid != 0 && tid != me
            })
            .collect::<Vec<_>>()
    };
    // The filters the signal's handler installs, and this thread's.
    if let Some(programs) = PROGRAMS.get() {
        let roles = others
            .iter()
            .filter_map(|&i| Role::from_u8(ROLES[i].load(Ordering::Acquire)));
        for r in roles.chain([role]) {
            programs.prepare(r)?;
        }
        crate::trace::Trace::new().mark("lockdown: filters compiled");
    }
    // (The bounding and ambient sets went at `configure`.)
    if let Some(j) = &p.jail {
        jail(j)?;
    }
    // The capability sets, then the filters: in the other threads while
    // this one does its own (installing a filter costs ~0.3 ms here).
    let waiting = start_phase(PHASE_FILTER, &others);
    let mine = drop_capabilities(p.jail.is_none())
        .map_err(os("dropping this thread's capabilities"))
        .and_then(|()| apply_here(role));
    let theirs = wait_phase(PHASE_FILTER, &waiting);
    mine.and(theirs)?;
    crate::trace::Trace::new().mark("lockdown: filters on");
    Ok(())
}

const PHASE_FILTER: u8 = 2;
const FAILED: u8 = 255;
/// The phase the lockdown signal's handler runs.
static PHASE: AtomicU8 = AtomicU8::new(0);

/// Bumped (with a futex wake) by each thread that ends a phase or has
/// registered, so that the locking thread sleeps until then rather than
/// polling: the lockdown is on every VM's way to its first instruction.
static PROGRESS: AtomicU32 = AtomicU32::new(0);

/// Wakes the thread waiting in [`wait_for`]. Async-signal-safe.
fn made_progress() {
    PROGRESS.fetch_add(1, Ordering::AcqRel);
    // SAFETY: FUTEX_WAKE on a static atomic, no other memory involved.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            PROGRESS.as_ptr(),
            libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
            i32::MAX,
        );
    }
}

/// Signals the threads in `slots` to run `phase`; the slots signalled.
fn start_phase(phase: u8, slots: &[usize]) -> Vec<usize> {
    PHASE.store(phase, Ordering::Release);
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() };
    let mut waiting = Vec::new();
    for &i in slots {
        let tid = TIDS[i].load(Ordering::Acquire);
        if tid == 0 {
            continue;
        }
        // SAFETY: signals a thread of this process; the handler is
        // installed (configure).
        let r = unsafe { libc::syscall(libc::SYS_tgkill, pid, tid, lock_signal()) };
        if r == 0 {
            waiting.push(i);
        }
    }
    waiting
}

/// Waits (at most 5 s) for the threads in `waiting` to end `phase`.
fn wait_phase(phase: u8, waiting: &[usize]) -> Result<(), Error> {
    for &i in waiting {
        let role = || Role::from_u8(ROLES[i].load(Ordering::Acquire));
        wait_for(|| {
            let done = DONE[i].load(Ordering::Acquire);
            if done == FAILED {
                return Err(());
            }
            Ok(done == phase || TIDS[i].load(Ordering::Acquire) == 0)
        })
        .map_err(|()| Error::Thread(role().map_or("?", Role::name)))?;
    }
    Ok(())
}

/// Sleeps until `done` says so (Ok(true)), failing when it fails or after
/// 5 s. Threads bump [`PROGRESS`] when what it looks at changes.
fn wait_for(mut done: impl FnMut() -> Result<bool, ()>) -> Result<(), ()> {
    let until = Instant::now() + Duration::from_secs(5);
    loop {
        // Read before the check: a thread that changes things after it
        // has bumped the count, and the wait returns at once.
        let seen = PROGRESS.load(Ordering::Acquire);
        if done()? {
            return Ok(());
        }
        if Instant::now() > until {
            return Err(());
        }
        let tick = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: FUTEX_WAIT on a static atomic with a local timeout; it
        // returns when the count is no longer `seen`, on a wake, or after
        // the tick (then the loop looks again).
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                PROGRESS.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                seen,
                &tick as *const libc::timespec,
            );
        }
    }
}

/// Spawns a thread that takes `role` first thing. It returns at once: a
/// [`lock`] waits until the thread has registered, so it cannot miss it.
pub fn spawn<T: Send + 'static>(
    role: Role,
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    STARTING.fetch_add(1, Ordering::AcqRel);
    std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            enter(role);
            STARTING.fetch_sub(1, Ordering::AcqRel);
            made_progress();
            f()
        })
        .inspect_err(|_| {
            STARTING.fetch_sub(1, Ordering::AcqRel);
        })
}

/// Installs `role`'s filters on this thread (and sets NoNewPrivs).
fn apply_here(role: Role) -> Result<(), Error> {
    let Some(programs) = PROGRAMS.get() else {
        return Ok(());
    };
    programs.prepare(role)?;
    programs
        .apply(role)
        .map_err(os("installing the seccomp filter"))?;
    FILTERED.fetch_add(1, Ordering::AcqRel);
    Ok(())
}

extern "C" fn on_lock_signal(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let me = gettid();
    let Some(i) = (0..SLOTS).find(|&i| TIDS[i].load(Ordering::Acquire) == me) else {
        return;
    };
    let keep_nice = POLICY.get().is_none_or(|p| p.jail.is_none());
    let phase = PHASE.load(Ordering::Acquire);
    let ok = match phase {
        PHASE_FILTER => {
            let role = Role::from_u8(ROLES[i].load(Ordering::Acquire));
            role.is_some()
                && drop_capabilities(keep_nice).is_ok()
                && match (PROGRAMS.get(), role) {
                    (Some(p), Some(r)) => {
                        let ok = p.apply(r).is_ok();
                        if ok {
                            FILTERED.fetch_add(1, Ordering::AcqRel);
                        }
                        ok
                    }
                    _ => true,
                }
        }
        _ => false,
    };
    DONE[i].store(if ok { phase } else { FAILED }, Ordering::Release);
    made_progress();
}

/// Empties this thread's bounding and ambient sets (but CAP_SYS_NICE if
/// asked). Only system calls (async-signal-safe).
fn drop_bounding(keep_nice: bool) {
    // SAFETY: prctl with plain integer arguments.
    unsafe {
        for cap in 0..64u32 {
            if keep_nice && cap == CAP_SYS_NICE {
                continue;
            }
            // EINVAL past the last capability this kernel knows (they are
            // numbered from 0 without holes): none is left.
            if libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) != 0
                && std::io::Error::last_os_error().raw_os_error() == Some(libc::EINVAL)
            {
                break;
            }
        }
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        );
    }
}

pub(crate) const CAP_SYS_NICE: u32 = 23;

/// `cap_user_header_t`, version 3.
#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

impl CapHeader {
    fn this_thread() -> CapHeader {
        CapHeader {
            version: 0x2008_0522, // _LINUX_CAPABILITY_VERSION_3
            pid: 0,
        }
    }
}

/// `cap_user_data_t`: version 3 takes two of them (capabilities 0-31,
/// 32-63).
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Whether the calling thread holds capability `cap` (below 32) now.
pub(crate) fn holds(cap: u32) -> bool {
    let mut header = CapHeader::this_thread();
    let mut data = [CapData::default(); 2];
    // SAFETY: capget with a local header and room for the two words of
    // version 3.
    let ok = unsafe { libc::syscall(libc::SYS_capget, &mut header, data.as_mut_ptr()) } == 0;
    ok && data[0].effective & (1 << cap) != 0
}

/// Empties this thread's effective, permitted and inheritable sets (but
/// CAP_SYS_NICE if asked).
/// Only system calls (async-signal-safe).
fn drop_capabilities(keep_nice: bool) -> std::io::Result<()> {
    let header = CapHeader::this_thread();
    let nice = if keep_nice { 1u32 << CAP_SYS_NICE } else { 0 };
    let data = [
        CapData {
            effective: nice,
            permitted: nice,
            inheritable: 0,
        },
        CapData::default(),
    ];
    // SAFETY: capset with a local, fully initialised header and data.
    if unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Checks that a jail can be used: a root-owned directory writable by
/// nobody else, and a user and group that are not root.
pub fn check_jail(j: &Jail) -> Result<(), Error> {
    use std::os::unix::fs::MetadataExt;
    let meta =
        std::fs::metadata(&j.dir).map_err(|e| Error::Jail(format!("{}: {e}", j.dir.display())))?;
    if !meta.is_dir() {
        return Err(Error::Jail(format!(
            "{} is not a directory",
            j.dir.display()
        )));
    }
    if meta.uid() != 0 || meta.mode() & 0o022 != 0 {
        return Err(Error::Jail(format!(
            "{} must belong to root and be writable by nobody else (it is uid {}, mode {:04o})",
            j.dir.display(),
            meta.uid(),
            meta.mode() & 0o7777
        )));
    }
    if j.uid == 0 || j.gid == 0 {
        return Err(Error::Jail(
            "--uid and --gid must not be 0 (root could leave the jail)".into(),
        ));
    }
    Ok(())
}

/// Keeps glibc's allocator from opening files once the filters hold: the
/// first time a thread's arena would give memory back (`shrink_heap`), it
/// reads /proc/sys/vm/overcommit_memory, and the filters end the VMM for
/// that open (seen: a destination's session killed as it discarded a VM
/// after a partition). With the trim threshold at its largest, no arena
/// heap (at most 64 MiB) is ever shrunk; freed memory stays in the arena
/// for reuse, and large blocks still go back to the kernel (they are
/// mmapped, and munmapped when freed).
fn quiet_libc() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // SAFETY: mallopt changes the allocator's parameters, process
        // wide; it is thread-safe and takes plain integers.
        unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, libc::c_int::MAX) };
    });
}

/// chroot into the jail and become its user; every thread follows.
fn jail(j: &Jail) -> Result<(), Error> {
    use std::os::unix::ffi::OsStrExt;
    let dir = std::ffi::CString::new(j.dir.as_os_str().as_bytes())
        .map_err(|_| Error::Jail("the path holds a NUL byte".into()))?;
    let check = |r: libc::c_int, what: &str| {
        if r == 0 {
            Ok(())
        } else {
            Err(os(what)(std::io::Error::last_os_error()))
        }
    };
    // SAFETY: plain system calls on a NUL-terminated path and integers.
    // chroot and chdir act on the filesystem state all threads share;
    // glibc's setgroups/setresgid/setresuid change every thread's ids.
    unsafe {
        check(libc::chroot(dir.as_ptr()), "chroot")?;
        check(libc::chdir(c"/".as_ptr()), "chdir /")?;
        check(libc::setgroups(0, std::ptr::null()), "setgroups")?;
        check(libc::setresgid(j.gid, j.gid, j.gid), "setresgid")?;
        check(libc::setresuid(j.uid, j.uid, j.uid), "setresuid")?;
    }
    Ok(())
}

/// Writes `line` to stderr and ends the process at once (status 125).
fn fatal(line: &str) -> ! {
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, line.as_ptr().cast(), line.len());
        libc::_exit(125);
    }
}

/// SIGSYS from a filter: one line naming the thread and the call, then
/// the process ends. No allocation: the line is built on the stack.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // The SIGSYS fields of siginfo: the call's number at byte 24.
    // SAFETY: the kernel passes a full siginfo for SA_SIGINFO handlers.
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    let role = Role::from_u8(MY_ROLE.with(|r| r.get())).map_or("unregistered", Role::name);
    let mut buf = Line::new();
    buf.push("ferry: error: seccomp: the ");
    buf.push(role);
    buf.push(" thread made system call ");
    buf.push(names::name(nr).unwrap_or("?"));
    buf.push(" (");
    buf.number(nr as i64);
    // The first three arguments, as the call left them in registers.
    // SAFETY: for SA_SIGINFO handlers the third argument is the
    // interrupted context, a valid ucontext_t.
    let gregs = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    buf.push(", arguments ");
    for (i, r) in [libc::REG_RDI, libc::REG_RSI, libc::REG_RDX]
        .iter()
        .enumerate()
    {
        if i > 0 {
            buf.push(" ");
        }
        buf.hex(gregs[*r as usize] as u64);
    }
    buf.push(")");
    // A file it tried to open: name it (the call's path is this process's
    // own memory, valid when the call was made).
    let path = match nr as libc::c_long {
        libc::SYS_openat => gregs[libc::REG_RSI as usize],
        libc::SYS_open => gregs[libc::REG_RDI as usize],
        _ => 0,
    };
    if path != 0 {
        buf.push(" of ");
        for i in 0..96 {
            // SAFETY: the path the interrupted call passed, a NUL-terminated
            // string in this process's memory; read byte by byte up to the
            // NUL or 96 bytes.
            let c = unsafe { (path as *const u8).add(i).read() };
            if c == 0 {
                break;
            }
            let c = [if c.is_ascii_graphic() { c } else { b'?' }];
            buf.push(std::str::from_utf8(&c).unwrap_or("?"));
        }
    }
    buf.push(", which its filter does not allow; the VMM stops (--seccomp off to debug)\n");
    // SAFETY: write and _exit are async-signal-safe.
    unsafe {
        libc::write(2, buf.b.as_ptr().cast(), buf.n);
        libc::_exit(125);
    }
}

/// A line on the stack.
struct Line {
    b: [u8; 256],
    n: usize,
}

impl Line {
    fn new() -> Line {
        Line { b: [0; 256], n: 0 }
    }

    fn push(&mut self, s: &str) {
        for &c in s.as_bytes() {
            if self.n < self.b.len() {
                self.b[self.n] = c;
                self.n += 1;
            }
        }
    }

    fn hex(&mut self, v: u64) {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        self.push("0x");
        let mut started = false;
        for shift in (0..16).rev() {
            let d = (v >> (shift * 4)) & 0xf;
            if d != 0 || started || shift == 0 {
                started = true;
                let c = [DIGITS[d as usize]];
                self.push(std::str::from_utf8(&c).unwrap_or("?"));
            }
        }
    }

    fn number(&mut self, v: i64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        let mut u = v.unsigned_abs();
        loop {
            i -= 1;
            digits[i] = b'0' + (u % 10) as u8;
            u /= 10;
            if u == 0 {
                break;
            }
        }
        if v < 0 {
            self.push("-");
        }
        for &d in &digits[i..] {
            self.push(std::str::from_utf8(&[d]).unwrap_or("?"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn violation_lines_are_built_without_allocating() {
        let mut l = Line::new();
        l.push("call ");
        l.number(257);
        l.push(" ");
        l.number(-3);
        l.push(" ");
        l.hex(0xae80);
        l.push(" ");
        l.hex(0);
        assert_eq!(
            std::str::from_utf8(&l.b[..l.n]).unwrap(),
            "call 257 -3 0xae80 0x0"
        );
        assert_eq!(names::name(257), Some("openat"));
        assert_eq!(names::name(59), Some("execve"));
        assert_eq!(names::name(-1), None);
        assert_eq!(names::name(100_000), None);
    }
}
