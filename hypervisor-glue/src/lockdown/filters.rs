//! The seccomp filter of each thread role: the system calls it may make
//! (and, for `ioctl`, `clone` and a few more, with which arguments).
//! Anything else traps (SIGSYS), and the VMM ends with a line naming it.
//!
//! The lists come from what the threads do (read with `strace -f` over the
//! whole test suite and the demo: boot, I/O, snapshot, restore, migration
//! out and in, failures and resolve) and nothing more. They allow no
//! `execve`, no `open` of a path (files come in as descriptors), no new
//! sockets except the control threads' (migrations out), no `ptrace`,
//! `mount`, `bpf`, `kexec`, module or key syscalls, and on the vCPU only
//! the KVM ioctls a running VM needs (none that makes a VM or a device).

use std::collections::BTreeMap;

use kvm_bindings::*;
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op,
    SeccompCondition as Cond, SeccompFilter, SeccompRule, TargetArch,
};

use super::{Error, Role};

const KVMIO: u64 = 0xAE;

const fn io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
const fn ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iow(nr: u64, size: usize) -> u64 {
    (1 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
const fn iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (KVMIO << 8) | nr
}
use std::mem::size_of as sz;

const KVM_GET_DIRTY_LOG: u64 = iow(0x42, sz::<kvm_dirty_log>());
const KVM_SET_USER_MEMORY_REGION: u64 = iow(0x46, sz::<kvm_userspace_memory_region>());

/// The KVM ioctls of a running VM: run, and save or restore its state
/// (snapshots, migrations in and out), dirty logging, interrupts.
const KVM_VCPU_IOCTLS: &[u64] = &[
    io(0x80),                           // KVM_RUN
    ior(0x81, sz::<kvm_regs>()),        // KVM_GET_REGS
    iow(0x82, sz::<kvm_regs>()),        // KVM_SET_REGS
    ior(0x83, sz::<kvm_sregs>()),       // KVM_GET_SREGS
    iow(0x84, sz::<kvm_sregs>()),       // KVM_SET_SREGS
    iowr(0x88, sz::<kvm_msrs>()),       // KVM_GET_MSRS
    iow(0x89, sz::<kvm_msrs>()),        // KVM_SET_MSRS
    ior(0x8c, sz::<kvm_fpu>()),         // KVM_GET_FPU
    iow(0x8d, sz::<kvm_fpu>()),         // KVM_SET_FPU
    ior(0x8e, sz::<kvm_lapic_state>()), // KVM_GET_LAPIC
    iow(0x8f, sz::<kvm_lapic_state>()), // KVM_SET_LAPIC
    iow(0x90, sz::<kvm_cpuid2>()),      // KVM_SET_CPUID2
    iowr(0x91, sz::<kvm_cpuid2>()),     // KVM_GET_CPUID2
    ior(0x98, sz::<kvm_mp_state>()),    // KVM_GET_MP_STATE
    iow(0x99, sz::<kvm_mp_state>()),    // KVM_SET_MP_STATE
    ior(0x9f, sz::<kvm_vcpu_events>()), // KVM_GET_VCPU_EVENTS
    iow(0xa0, sz::<kvm_vcpu_events>()), // KVM_SET_VCPU_EVENTS
    ior(0xa1, sz::<kvm_debugregs>()),   // KVM_GET_DEBUGREGS
    iow(0xa2, sz::<kvm_debugregs>()),   // KVM_SET_DEBUGREGS
    ior(0xa4, sz::<kvm_xsave>()),       // KVM_GET_XSAVE
    ior(0xcf, sz::<kvm_xsave>()),       // KVM_GET_XSAVE2
    iow(0xa5, sz::<kvm_xsave>()),       // KVM_SET_XSAVE
    ior(0xa6, sz::<kvm_xcrs>()),        // KVM_GET_XCRS
    iow(0xa7, sz::<kvm_xcrs>()),        // KVM_SET_XCRS
    io(0xa3),                           // KVM_GET_TSC_KHZ
    io(0xad),                           // KVM_KVMCLOCK_CTRL
    io(0xce),                           // KVM_GET_STATS_FD (ferry status)
    KVM_GET_DIRTY_LOG,
    KVM_SET_USER_MEMORY_REGION,
    iowr(0x62, sz::<kvm_irqchip>()),   // KVM_GET_IRQCHIP
    ior(0x63, sz::<kvm_irqchip>()),    // KVM_SET_IRQCHIP
    iow(0x7b, sz::<kvm_clock_data>()), // KVM_SET_CLOCK
    ior(0x7c, sz::<kvm_clock_data>()), // KVM_GET_CLOCK
    ior(0x9f, sz::<kvm_pit_state2>()), // KVM_GET_PIT2
    iow(0xa0, sz::<kvm_pit_state2>()), // KVM_SET_PIT2
    iow(0x61, sz::<kvm_irq_level>()),  // KVM_IRQ_LINE
    iowr(0x67, sz::<kvm_irq_level>()), // KVM_IRQ_LINE_STATUS
    iowr(0x02, sz::<kvm_msr_list>()),  // KVM_GET_MSR_INDEX_LIST
    iowr(0x05, sz::<kvm_cpuid2>()),    // KVM_GET_SUPPORTED_CPUID
];

/// The tap's offloads follow the guest's feature negotiation.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// Sockets made non-blocking or close-on-exec.
const FIONBIO: u64 = 0x5421;
const FIOCLEX: u64 = 0x5451;

/// Calls every thread may make: memory, futexes, signals, time, reading
/// and writing descriptors it has, ending.
const BASE: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_close,
    libc::SYS_fstat,
    libc::SYS_statx,
    libc::SYS_newfstatat,
    libc::SYS_lseek,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_madvise,
    libc::SYS_mremap,
    libc::SYS_brk,
    libc::SYS_futex,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_getpid,
    libc::SYS_gettid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getpriority,
    libc::SYS_setpriority,
    libc::SYS_sched_getscheduler,
    libc::SYS_capget,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettimeofday,
    libc::SYS_getrandom,
    libc::SYS_restart_syscall,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_rseq,
    libc::SYS_set_robust_list,
    libc::SYS_dup,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

fn cond(arg: u8, op: Op, v: u64) -> Cond {
    Cond::new(arg, Len::Qword, op, v).expect("a valid condition")
}

fn rule(conds: Vec<Cond>) -> SeccompRule {
    SeccompRule::new(conds).expect("a non-empty rule")
}

/// `ioctl` with one of `requests` as its request.
fn ioctls(requests: &[u64]) -> Vec<SeccompRule> {
    requests
        .iter()
        .map(|&r| rule(vec![Cond::new(1, Len::Dword, Op::Eq, r).expect("valid")]))
        .collect()
}

/// `prctl` options a thread may use.
fn prctls(options: &[i32]) -> Vec<SeccompRule> {
    options
        .iter()
        .map(|&o| rule(vec![cond(0, Op::Eq, o as u64)]))
        .collect()
}

/// `fcntl` commands a thread may use (no locks, no owner or lease changes).
fn fcntls() -> Vec<SeccompRule> {
    [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ]
    .iter()
    .map(|&c| {
        rule(vec![
            Cond::new(1, Len::Dword, Op::Eq, c as u64).expect("valid"),
        ])
    })
    .collect()
}

/// `clone` making a thread (CLONE_THREAD set) — or, with `fork`, a
/// process too (the teardown helper, which shares this one's memory).
fn clones(fork: bool) -> Vec<SeccompRule> {
    let thread = libc::CLONE_THREAD as u64;
    let mut rules = vec![rule(vec![cond(0, Op::MaskedEq(thread), thread)])];
    if fork {
        rules.push(rule(vec![cond(0, Op::MaskedEq(thread), 0)]));
    }
    rules
}

/// The calls `role` may make.
fn allowed(role: Role, unlink_dir: Option<i32>) -> BTreeMap<i64, Vec<SeccompRule>> {
    let mut m: BTreeMap<i64, Vec<SeccompRule>> = BASE.iter().map(|&s| (s, vec![])).collect();
    let mut add = |s: i64, rules: Vec<SeccompRule>| {
        m.insert(s, rules);
    };
    add(libc::SYS_fcntl, fcntls());
    // The kick: a vCPU is signalled out of KVM_RUN; panics raise SIGABRT.
    add(libc::SYS_tgkill, vec![]);
    add(libc::SYS_rt_sigaction, vec![]);
    add(
        libc::SYS_prctl,
        prctls(&[
            libc::PR_SET_NAME,
            libc::PR_GET_NAME,
            libc::PR_SET_PDEATHSIG,
            libc::PR_SET_NO_NEW_PRIVS,
        ]),
    );
    // Signals to this process only (a failpoint's kill -9 of itself).
    // SAFETY: getpid has no preconditions.
    let me = unsafe { libc::getpid() } as u64;
    add(
        libc::SYS_kill,
        vec![rule(vec![
            Cond::new(0, Len::Dword, Op::Eq, me).expect("valid"),
        ])],
    );
    // The stop-and-copy runs real-time (`sched::Urgent`), the bulk copy
    // idle (`sched::Background`), and back: no other policy, and no
    // real-time priority inherited by a new thread.
    add(
        libc::SYS_sched_setscheduler,
        [
            libc::SCHED_OTHER,
            libc::SCHED_FIFO | libc::SCHED_RESET_ON_FORK,
            libc::SCHED_IDLE,
        ]
        .iter()
        .map(|&p| {
            rule(vec![
                Cond::new(1, Len::Dword, Op::Eq, p as u64).expect("valid"),
            ])
        })
        .collect(),
    );
    // Only ever adds restrictions: a thread started after the lockdown
    // takes its role's filter on top of the one it inherited.
    add(libc::SYS_seccomp, vec![]);
    match role {
        Role::Vcpu => {
            let mut reqs = KVM_VCPU_IOCTLS.to_vec();
            reqs.extend([TUNSETOFFLOAD, FIONBIO, FIOCLEX]);
            add(libc::SYS_ioctl, ioctls(&reqs));
            // The teardown helper (a process that only waits).
            add(libc::SYS_clone, clones(true));
            add(libc::SYS_pause, vec![]);
            add(libc::SYS_getppid, vec![]);
            add(libc::SYS_wait4, vec![]);
            add(libc::SYS_eventfd2, vec![]);
            add(libc::SYS_ftruncate, vec![]);
            add(libc::SYS_fallocate, vec![]);
            add(libc::SYS_msync, vec![]);
            // The control socket's name, removed at the end (only there).
            if let Some(fd) = unlink_dir {
                add(
                    libc::SYS_unlinkat,
                    vec![rule(vec![
                        Cond::new(0, Len::Dword, Op::Eq, fd as u64).expect("valid"),
                    ])],
                );
            }
        }
        Role::Net => {
            add(libc::SYS_ioctl, ioctls(&[FIONBIO, TUNSETOFFLOAD]));
        }
        Role::Api => {
            add(
                libc::SYS_ioctl,
                ioctls(&[
                    FIONBIO,
                    FIOCLEX,
                    KVM_GET_DIRTY_LOG,
                    KVM_SET_USER_MEMORY_REGION,
                ]),
            );
            add(libc::SYS_accept4, vec![]);
            add(libc::SYS_accept, vec![]);
            // Migrations out: a TCP connection to the destination.
            add(
                libc::SYS_socket,
                vec![
                    rule(vec![cond(0, Op::Eq, libc::AF_INET as u64)]),
                    rule(vec![cond(0, Op::Eq, libc::AF_INET6 as u64)]),
                ],
            );
            add(libc::SYS_connect, vec![]);
            // This host's name, for the destination's messages.
            add(libc::SYS_uname, vec![]);
            // A migration out shortens its vCPU's time slice for the bulk
            // copy (`sched::Quick`). The attribute is a pointer, so its
            // policy cannot be checked here: only this role may, and with
            // no flags.
            add(
                libc::SYS_sched_setattr,
                vec![rule(vec![cond(2, Op::Eq, 0)])],
            );
            add(libc::SYS_clone, clones(false));
        }
        Role::Signals => {
            add(libc::SYS_rt_sigtimedwait, vec![]);
        }
        Role::Session => {}
    }
    m
}

/// The roles' filters, each compiled when first needed: the lockdown
/// prepares those of the threads it reaches with a signal (whose handler
/// allocates nothing), and a thread that starts later compiles its own.
/// Compiling all five costs ~0.15 ms here, on a boot's way.
pub struct Programs {
    unlink_dir: Option<i32>,
    roles: [std::sync::OnceLock<BpfProgram>; Role::ALL.len()],
}

impl Programs {
    /// No filter compiled yet. `unlink_dir`: the descriptor of the
    /// directory of the control socket, which the vCPU thread removes at
    /// the end.
    pub fn new(unlink_dir: Option<i32>) -> Programs {
        Programs {
            unlink_dir,
            roles: Default::default(),
        }
    }

    fn slot(role: Role) -> usize {
        Role::ALL
            .iter()
            .position(|&r| r == role)
            .expect("every role is in ALL")
    }

    /// Compiles `role`'s filter unless it is.
    pub fn prepare(&self, role: Role) -> Result<&BpfProgram, Error> {
        let slot = &self.roles[Self::slot(role)];
        if let Some(p) = slot.get() {
            return Ok(p);
        }
        let p = compile(role, self.unlink_dir)?;
        Ok(slot.get_or_init(|| p))
    }

    /// Sets NoNewPrivs and installs `role`'s filter on this thread, which
    /// must have been prepared. Only system calls: safe in a signal
    /// handler.
    pub fn apply(&self, role: Role) -> std::io::Result<()> {
        let Some(prog) = self.roles[Self::slot(role)].get() else {
            return Err(std::io::Error::other("the role's filter was not compiled"));
        };
        apply(prog)
    }
}

/// Compiles `role`'s filter (see [`Programs::new`] for `unlink_dir`). It starts
/// by failing `clone3` with ENOSYS: glibc then makes its threads with
/// `clone`, whose flags a filter can see (`clone3` passes them in memory).
fn compile(role: Role, unlink_dir: Option<i32>) -> Result<BpfProgram, Error> {
    let mut prog = SeccompFilter::new(
        allowed(role, unlink_dir),
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .and_then(BpfProgram::try_from)
    .map_err(|e| Error::Filter {
        role: role.name(),
        why: e.to_string(),
    })?;
    // Three instructions before seccompiler's (whose jumps are relative,
    // and whose first looks at the architecture again): load the call's
    // number; if it is clone3's, return ENOSYS, else go on. An x32 call's
    // number has bit 30 set and never matches.
    const LD_W_ABS: u16 = 0x20;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
    let op = |code, jt, jf, k| seccompiler::sock_filter { code, jt, jf, k };
    prog.splice(
        0..0,
        [
            op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
            op(JEQ_K, 0, 1, libc::SYS_clone3 as u32),
            op(RET_K, 0, 0, SECCOMP_RET_ERRNO | libc::ENOSYS as u32),
        ],
    );
    Ok(prog)
}

/// Sets NoNewPrivs and installs `prog` on this thread. Only system calls.
fn apply(prog: &BpfProgram) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    install(prog)
}

fn install(p: &BpfProgram) -> std::io::Result<()> {
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const seccompiler::sock_filter,
    }
    let prog = SockFprog {
        len: p.len() as u16,
        filter: p.as_ptr(),
    };
    // SAFETY: SECCOMP_SET_MODE_FILTER (1) with no flags reads the program
    // `prog` points at, which lives for the call; NoNewPrivs is set.
    let r = unsafe { libc::syscall(libc::SYS_seccomp, 1, 0, &prog as *const SockFprog) };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_role_compiles_and_none_may_exec_or_open() {
        let p = Programs::new(Some(3));
        for role in Role::ALL {
            p.prepare(role).unwrap();
        }
        for role in Role::ALL {
            let a = allowed(role, None);
            for banned in [
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_ptrace,
                libc::SYS_mount,
                libc::SYS_bpf,
                libc::SYS_init_module,
                libc::SYS_setuid,
                libc::SYS_chroot,
            ] {
                assert!(!a.contains_key(&banned), "{role:?} may call {banned}");
            }
        }
        assert!(!allowed(Role::Net, None).contains_key(&libc::SYS_socket));
        assert!(!allowed(Role::Vcpu, None).contains_key(&libc::SYS_unlinkat));
        // Each starts by failing clone3 with ENOSYS, then seccompiler's.
        for prog in p.roles.iter().map(|r| r.get().unwrap()) {
            assert_eq!(prog[0].code, 0x20);
            assert_eq!(prog[1].k, libc::SYS_clone3 as u32);
            assert_eq!(prog[2].k, 0x0005_0000 | libc::ENOSYS as u32);
        }
        // KVM_RUN: the well-known number.
        assert_eq!(KVM_VCPU_IOCTLS[0], 0xae80);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
    }
}
