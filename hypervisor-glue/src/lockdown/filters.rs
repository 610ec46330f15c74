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

/// One test of a system call's argument: `(args[arg] & mask) == value`,
/// on all 64 bits, or (`low`) on the low 32 only, as the kernel reads an
/// `int` or `unsigned int` argument.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Cond {
    arg: u8,
    low: bool,
    mask: u64,
    value: u64,
}

/// The argument `arg` is `v`.
fn eq(arg: u8, v: u64) -> Cond {
    Cond {
        arg,
        low: false,
        mask: u64::MAX,
        value: v,
    }
}

/// The low 32 bits of argument `arg` are `v` (an `int` argument).
fn eq32(arg: u8, v: u64) -> Cond {
    Cond {
        arg,
        low: true,
        mask: u64::from(u32::MAX),
        value: v & u64::from(u32::MAX),
    }
}

/// The bits `mask` of argument `arg` are `v`.
fn masked(arg: u8, mask: u64, v: u64) -> Cond {
    Cond {
        arg,
        low: false,
        mask,
        value: v & mask,
    }
}

/// A rule: all its conditions hold.
type Rule = Vec<Cond>;

/// `ioctl` with one of `requests` as its request.
fn ioctls(requests: &[u64]) -> Vec<Rule> {
    requests.iter().map(|&r| vec![eq32(1, r)]).collect()
}

/// `prctl` options a thread may use.
fn prctls(options: &[i32]) -> Vec<Rule> {
    options.iter().map(|&o| vec![eq(0, o as u64)]).collect()
}

/// `fcntl` commands a thread may use (no locks, no owner or lease changes).
fn fcntls() -> Vec<Rule> {
    [
        libc::F_GETFD,
        libc::F_SETFD,
        libc::F_GETFL,
        libc::F_SETFL,
        libc::F_DUPFD_CLOEXEC,
    ]
    .iter()
    .map(|&c| vec![eq32(1, c as u64)])
    .collect()
}

/// `clone` making a thread (CLONE_THREAD set) — or, with `fork`, a
/// process too (the teardown helper, which shares this one's memory).
fn clones(fork: bool) -> Vec<Rule> {
    let thread = libc::CLONE_THREAD as u64;
    let mut rules = vec![vec![masked(0, thread, thread)]];
    if fork {
        rules.push(vec![masked(0, thread, 0)]);
    }
    rules
}

/// The calls `role` may make.
fn allowed(role: Role, unlink_dir: Option<i32>) -> BTreeMap<i64, Vec<Rule>> {
    let mut m: BTreeMap<i64, Vec<Rule>> = BASE.iter().map(|&s| (s, vec![])).collect();
    let mut add = |s: i64, rules: Vec<Rule>| {
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
    add(libc::SYS_kill, vec![vec![eq32(0, me)]]);
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
        .map(|&p| vec![eq32(1, p as u64)])
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
                add(libc::SYS_unlinkat, vec![vec![eq32(0, fd as u64)]]);
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
                    vec![eq(0, libc::AF_INET as u64)],
                    vec![eq(0, libc::AF_INET6 as u64)],
                ],
            );
            add(libc::SYS_connect, vec![]);
            // This host's name, for the destination's messages.
            add(libc::SYS_uname, vec![]);
            // A migration out shortens its vCPU's time slice for the bulk
            // copy (`sched::Quick`). The attribute is a pointer, so its
            // policy cannot be checked here: only this role may, and with
            // no flags.
            add(libc::SYS_sched_setattr, vec![vec![eq(2, 0)]]);
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
    roles: [std::sync::OnceLock<Program>; Role::ALL.len()],
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
    pub fn prepare(&self, role: Role) -> Result<&Program, Error> {
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

/// One classic-BPF instruction, as the kernel reads a seccomp filter.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    code: u16,
    jt: u8,
    jf: u8,
    k: u32,
}

/// A compiled filter.
pub type Program = Vec<Insn>;

const LD_W_ABS: u16 = 0x20;
const ALU_AND_K: u16 = 0x54;
const JMP_JA: u16 = 0x05;
const JMP_JEQ_K: u16 = 0x15;
const JMP_JGE_K: u16 = 0x35;
const RET_K: u16 = 0x06;

const RET_ALLOW: u32 = 0x7fff_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ERRNO: u32 = 0x0005_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;

/// Where `struct seccomp_data` keeps the call's number, its architecture
/// and (low and high halves of) each argument.
const NR: u32 = 0;
const ARCH: u32 = 4;
const fn arg_word(arg: u8, high: bool) -> u32 {
    16 + 8 * arg as u32 + if high { 4 } else { 0 }
}

/// The kernel's limit on a filter's length (BPF_MAXINSNS).
const MAX_INSNS: usize = 4096;

/// Syscalls tested one after another at a leaf of the search tree.
const LEAF: usize = 3;

/// A place in the program, fixed when it is laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Label(usize);

/// An instruction before layout, with jumps to labels.
enum Op {
    Ld(u32),
    And(u32),
    Ret(u32),
    Ja(Label),
    /// Jump to `t` if A == k (or A >= k), else to `f`: both after it,
    /// within 255 instructions.
    Jeq(u32, Label, Label),
    Jge(u32, Label, Label),
    /// Where a label is (no instruction).
    Here(Label),
}

#[derive(Default)]
struct Builder {
    ops: Vec<Op>,
    labels: usize,
}

impl Builder {
    fn label(&mut self) -> Label {
        self.labels += 1;
        Label(self.labels - 1)
    }

    fn push(&mut self, op: Op) {
        self.ops.push(op);
    }

    /// A binary search on the call's number (in the accumulator) over
    /// `calls`, sorted: each is found in about log2(n) + 3 comparisons,
    /// and goes to its label; any other traps.
    fn search(&mut self, calls: &[(u32, Label)]) {
        if calls.len() <= LEAF {
            for &(nr, to) in calls {
                // jeq nr ? (ja to) : on.
                let hit = self.label();
                let on = self.label();
                self.push(Op::Jeq(nr, hit, on));
                self.push(Op::Here(hit));
                self.push(Op::Ja(to));
                self.push(Op::Here(on));
            }
            self.push(Op::Ret(RET_TRAP));
            return;
        }
        let mid = calls.len() / 2;
        // jge mid ? (ja upper) : lower.
        let up = self.label();
        let upper = self.label();
        let lower = self.label();
        self.push(Op::Jge(calls[mid].0, up, lower));
        self.push(Op::Here(up));
        self.push(Op::Ja(upper));
        self.push(Op::Here(lower));
        self.search(&calls[..mid]);
        self.push(Op::Here(upper));
        self.search(&calls[mid..]);
    }

    /// A call's rules: allowed if one holds, else it traps.
    fn rules(&mut self, rules: &[Rule]) {
        for r in rules {
            let next = self.label();
            for c in r {
                let halves: &[bool] = if c.low { &[false] } else { &[false, true] };
                for &high in halves {
                    let shift = if high { 32 } else { 0 };
                    let mask = (c.mask >> shift) as u32;
                    self.push(Op::Ld(arg_word(c.arg, high)));
                    if mask != u32::MAX {
                        self.push(Op::And(mask));
                    }
                    let on = self.label();
                    self.push(Op::Jeq((c.value >> shift) as u32, on, next));
                    self.push(Op::Here(on));
                }
            }
            self.push(Op::Ret(RET_ALLOW));
            self.push(Op::Here(next));
        }
        self.push(Op::Ret(RET_TRAP));
    }

    /// Lays the program out: labels become offsets.
    fn finish(self) -> Result<Program, String> {
        let mut at = vec![usize::MAX; self.labels];
        let mut n = 0;
        for op in &self.ops {
            match op {
                Op::Here(l) => at[l.0] = n,
                _ => n += 1,
            }
        }
        if n > MAX_INSNS {
            return Err(format!("{n} instructions, over the kernel's {MAX_INSNS}"));
        }
        let offset = |from: usize, to: Label| -> Result<usize, String> {
            let to = at[to.0];
            if to == usize::MAX || to <= from {
                return Err("internal: a jump backwards or nowhere".into());
            }
            Ok(to - from - 1)
        };
        let short = |from: usize, to: Label| -> Result<u8, String> {
            let o = offset(from, to)?;
            u8::try_from(o).map_err(|_| format!("internal: a conditional jump of {o}"))
        };
        let mut prog = Vec::with_capacity(n);
        for op in &self.ops {
            let pc = prog.len();
            let i = |code, jt, jf, k| Insn { code, jt, jf, k };
            prog.push(match *op {
                Op::Here(_) => continue,
                Op::Ld(k) => i(LD_W_ABS, 0, 0, k),
                Op::And(k) => i(ALU_AND_K, 0, 0, k),
                Op::Ret(k) => i(RET_K, 0, 0, k),
                Op::Ja(to) => i(JMP_JA, 0, 0, offset(pc, to)? as u32),
                Op::Jeq(k, t, f) => i(JMP_JEQ_K, short(pc, t)?, short(pc, f)?, k),
                Op::Jge(k, t, f) => i(JMP_JGE_K, short(pc, t)?, short(pc, f)?, k),
            });
        }
        Ok(prog)
    }
}

/// Compiles the filter that allows `calls` (each with its rules; none:
/// any arguments) and traps anything else. It starts by failing
/// `clone3` with ENOSYS: glibc then makes its threads with `clone`, whose
/// flags a filter can see (`clone3` passes them in memory). A call of
/// another architecture ends the process.
///
/// The calls are found by binary search, not one after another: the
/// kernel runs a new filter over every system call number as it
/// installs it (to cache the calls it always allows), and a filter of
/// ~100 calls tested in a row cost ~0.4 ms to install here, on a boot's
/// way; as a tree, a few tens of microseconds.
fn build(calls: &BTreeMap<i64, Vec<Rule>>) -> Result<Program, String> {
    let mut b = Builder::default();
    let kill = b.label();
    let arch_ok = b.label();
    let enosys = b.label();
    let not_clone3 = b.label();
    b.push(Op::Ld(ARCH));
    b.push(Op::Jeq(AUDIT_ARCH_X86_64, arch_ok, kill));
    b.push(Op::Here(kill));
    b.push(Op::Ret(RET_KILL_PROCESS));
    b.push(Op::Here(arch_ok));
    b.push(Op::Ld(NR));
    b.push(Op::Jeq(libc::SYS_clone3 as u32, enosys, not_clone3));
    b.push(Op::Here(enosys));
    b.push(Op::Ret(RET_ERRNO | libc::ENOSYS as u32));
    b.push(Op::Here(not_clone3));
    // Calls with no rules share one `ret ALLOW`; the others get a block.
    let allow = b.label();
    let mut blocks = Vec::new();
    let mut index = Vec::with_capacity(calls.len());
    for (&nr, rules) in calls {
        let nr = u32::try_from(nr).map_err(|_| format!("system call {nr}"))?;
        if rules.is_empty() {
            index.push((nr, allow));
        } else {
            let l = b.label();
            index.push((nr, l));
            blocks.push((l, rules));
        }
    }
    b.search(&index);
    b.push(Op::Here(allow));
    b.push(Op::Ret(RET_ALLOW));
    for (l, rules) in blocks {
        b.push(Op::Here(l));
        b.rules(rules);
    }
    b.finish()
}

/// Compiles `role`'s filter (see [`Programs::new`] for `unlink_dir`).
fn compile(role: Role, unlink_dir: Option<i32>) -> Result<Program, Error> {
    build(&allowed(role, unlink_dir)).map_err(|why| Error::Filter {
        role: role.name(),
        why,
    })
}

/// Sets NoNewPrivs and installs `prog` on this thread. Only system calls.
fn apply(prog: &Program) -> std::io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    install(prog)
}

fn install(p: &Program) -> std::io::Result<()> {
    #[repr(C)]
    struct SockFprog {
        len: u16,
        filter: *const Insn,
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
        // KVM_RUN: the well-known number.
        assert_eq!(KVM_VCPU_IOCTLS[0], 0xae80);
        assert_eq!(KVM_GET_DIRTY_LOG, 0x4010_ae42);
    }

    /// Runs `prog` as the kernel does, on a call of `arch` with number
    /// `nr` and `args`; returns its action and how many instructions ran.
    fn run(prog: &[Insn], arch: u32, nr: u32, args: [u64; 6]) -> (u32, usize) {
        let mut data = [0u8; 64];
        data[0..4].copy_from_slice(&nr.to_le_bytes());
        data[4..8].copy_from_slice(&arch.to_le_bytes());
        for (i, a) in args.iter().enumerate() {
            data[16 + 8 * i..24 + 8 * i].copy_from_slice(&a.to_le_bytes());
        }
        let (mut acc, mut pc, mut steps) = (0u32, 0usize, 0usize);
        loop {
            let i = prog[pc];
            pc += 1;
            steps += 1;
            match i.code {
                LD_W_ABS => {
                    let k = i.k as usize;
                    acc = u32::from_le_bytes(data[k..k + 4].try_into().unwrap());
                }
                ALU_AND_K => acc &= i.k,
                JMP_JA => pc += i.k as usize,
                JMP_JEQ_K => pc += usize::from(if acc == i.k { i.jt } else { i.jf }),
                JMP_JGE_K => pc += usize::from(if acc >= i.k { i.jt } else { i.jf }),
                RET_K => return (i.k, steps),
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    /// What the rules say of `args`, read directly.
    fn allows(rules: &[Rule], args: &[u64; 6]) -> bool {
        rules.iter().any(|r| {
            r.iter().all(|c| {
                let v = args[c.arg as usize];
                let v = if c.low { v & u64::from(u32::MAX) } else { v };
                v & c.mask == c.value
            })
        })
    }

    /// Every role's program decides every call number (and argument
    /// vectors made to meet, miss and brush each rule) as its list says;
    /// clone3 fails with ENOSYS; another architecture ends the process;
    /// and no call takes more than a handful of instructions to decide
    /// (the search is a tree, not a row).
    #[test]
    fn every_program_does_what_its_list_says() {
        let mut worst = 0;
        for role in Role::ALL {
            let calls = allowed(role, Some(7));
            let prog = build(&calls).unwrap();
            assert!(prog.len() < MAX_INSNS);
            let x86 = AUDIT_ARCH_X86_64;
            assert_eq!(run(&prog, 0x4000_0003, 0, [0; 6]).0, RET_KILL_PROCESS);
            let mut nrs: Vec<u32> = (0..=470).collect();
            nrs.extend([0x4000_0000, 0x4000_0001, 0x4000_0010, u32::MAX]);
            for nr in nrs {
                let (action, steps) = run(&prog, x86, nr, [0; 6]);
                worst = worst.max(steps);
                let want = if nr == libc::SYS_clone3 as u32 {
                    RET_ERRNO | libc::ENOSYS as u32
                } else {
                    match calls.get(&i64::from(nr)) {
                        None => RET_TRAP,
                        Some(r) if allows(r, &[0; 6]) || r.is_empty() => RET_ALLOW,
                        Some(_) => RET_TRAP,
                    }
                };
                assert_eq!(action, want, "{role:?}: call {nr} with zero arguments");
            }
            for (&nr, rules) in &calls {
                let mut tries: Vec<[u64; 6]> = Vec::new();
                for r in rules {
                    let mut meets = [0u64; 6];
                    for c in r {
                        meets[c.arg as usize] |= c.value;
                    }
                    tries.push(meets);
                    for c in r {
                        let a = c.arg as usize;
                        for flip in [1u64, 1 << 20, 1 << 31, 1 << 32, 1 << 63] {
                            let mut t = meets;
                            t[a] ^= flip;
                            tries.push(t);
                        }
                    }
                }
                for args in tries {
                    let (action, steps) = run(&prog, x86, nr as u32, args);
                    worst = worst.max(steps);
                    let want = if allows(rules, &args) || rules.is_empty() {
                        RET_ALLOW
                    } else {
                        RET_TRAP
                    };
                    assert_eq!(action, want, "{role:?}: call {nr} with {args:x?}");
                }
            }
        }
        // The vCPU's ioctl list is the longest chain: ~40 requests.
        assert!(worst < 150, "a call took {worst} instructions to decide");
    }

    #[test]
    fn the_kernel_takes_every_program() {
        // In a child, so that this test process keeps no filter.
        for role in Role::ALL {
            let prog = build(&allowed(role, None)).unwrap();
            // SAFETY: fork in a test; the child makes system calls only
            // and leaves with _exit.
            let pid = unsafe { libc::fork() };
            assert!(pid >= 0);
            if pid == 0 {
                let code = match apply(&prog) {
                    Ok(()) => 0,
                    Err(_) => 1,
                };
                // SAFETY: _exit ends the child at once.
                unsafe { libc::_exit(code) };
            }
            let mut status = 0;
            // SAFETY: waits for the child just made.
            assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
            assert!(
                libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
                "{role:?}: the kernel refused the filter ({status:#x})"
            );
        }
    }
}
