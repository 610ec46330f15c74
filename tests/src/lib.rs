//! Ferry's test harness: finds the `ferry` binary and the images, runs
//! guests under Ferry's VMM, stock uhyve and QEMU/KVM with a time limit, and
//! measures them. Integration tests live in `tests/tests/` by capability
//! (`boot.rs`, `faults.rs`); benchmarks in `src/bin/`.
//!
//! Tests say what they need of the machine with [`needs`] (KVM, root, a
//! program). A test whose needs are not met fails with the reason, unless
//! the person running it set `FERRY_ALLOW_SKIP=1`: then it prints one
//! `SKIPPED` line straight to the terminal (past the harness's output
//! capture) and to `target/test-skips.log`, which `just test` shows at the
//! end. A test that could not run never reports a silent `ok`.
#![deny(missing_docs)]

pub mod cluster;
pub mod gaps;
pub mod qmp;
pub mod schedstat;
pub mod tcpinfo;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// CLOCK_MONOTONIC now, in seconds: the clock `Instant` reads and `perf
/// record -k mono` stamps with, so that a client's gap can be found in a
/// system-wide trace of the same run.
pub fn monotonic_s() -> f64 {
    let mut t = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec, which `t` is.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut t) };
    t.tv_sec as f64 + t.tv_nsec as f64 / 1e9
}

/// The workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `ferry` binary (`$FERRY_BIN`, else `target/release/ferry`, which
/// `just test` builds).
pub fn ferry_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("FERRY_BIN") {
        return p.into();
    }
    let p = root().join("target/release/ferry");
    assert!(
        p.exists(),
        "{} is missing: run `just build` (or `just test`, which builds it)",
        p.display()
    );
    p
}

/// `ferry` built with the migration protocol's failpoints
/// (`target/release/ferry-failpoints`, which `just test` builds).
pub fn ferry_failpoints_bin() -> PathBuf {
    let p = root().join("target/release/ferry-failpoints");
    assert!(
        p.exists(),
        "{} is missing: run `just build-failpoints` (or `just test`, which builds it)",
        p.display()
    );
    p
}

/// A built image, `images/out/NAME`.
pub fn image(name: &str) -> PathBuf {
    let p = root().join("images/out").join(name);
    assert!(
        p.exists(),
        "{} is missing: run `just build-image {name}` (`just test` builds the images it needs)",
        p.display()
    );
    p
}

/// Whether this host's KVM is PVM (the software hypervisor of Ferry's
/// development machines), where the runtime switches to native mode.
pub fn host_is_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}

/// The CPU mode the runtime should report on this host when left to
/// itself: `native` on PVM, else `not pvm`.
pub fn expected_cpu_mode() -> &'static str {
    if host_is_pvm() { "native" } else { "not pvm" }
}

/// Something an integration test needs of the machine.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Need {
    /// `/dev/kvm`, readable and writable.
    Kvm,
    /// Root (network namespaces, taps, nftables).
    Root,
    /// A KVM that is PVM (the software hypervisor of Ferry's machines).
    Pvm,
    /// A program on PATH.
    Program(&'static str),
}

impl Need {
    /// Why the need is not met here, or `None` if it is.
    pub fn missing(self) -> Option<String> {
        match self {
            Need::Kvm => std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/kvm")
                .err()
                .map(|e| format!("/dev/kvm is not usable here ({e})")),
            // SAFETY: geteuid has no preconditions.
            Need::Root => (unsafe { libc::geteuid() } != 0)
                .then(|| "it needs root (network namespaces, taps)".to_string()),
            Need::Pvm => (!host_is_pvm())
                .then(|| "this host's KVM is not PVM (kvm_pvm is not loaded)".to_string()),
            Need::Program(p) => (!have(p)).then(|| format!("{p} is not installed (`just setup`)")),
        }
    }
}

/// Whether skipping tests whose needs are not met was asked for
/// (`FERRY_ALLOW_SKIP=1`).
pub fn skipping_allowed() -> bool {
    std::env::var_os("FERRY_ALLOW_SKIP").is_some_and(|v| v == "1")
}

/// Checks what `test` needs. All there: `true`. Something missing: the
/// test fails here naming it, or, with `FERRY_ALLOW_SKIP=1`, one SKIPPED
/// line goes to the terminal and to `target/test-skips.log`, and this
/// returns `false` (the test then returns without asserting anything).
pub fn needs(test: &str, needs: &[Need]) -> bool {
    let missing: Vec<String> = needs.iter().filter_map(|n| n.missing()).collect();
    if missing.is_empty() {
        return true;
    }
    let why = missing.join("; ");
    if !skipping_allowed() {
        panic!(
            "{test} cannot run: {why}. It fails rather than pass untested; set FERRY_ALLOW_SKIP=1 to skip such tests instead"
        );
    }
    let line = format!("SKIPPED {test}: {why}");
    // Straight to the terminal: the test harness captures eprintln!.
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "!!! {line} !!!");
    let log = root().join("target/test-skips.log");
    if let Ok(mut f) = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
    {
        let _ = writeln!(f, "{line}");
    }
    false
}

/// [`needs`] with just KVM.
pub fn kvm_or_skip(test: &str) -> bool {
    needs(test, &[Need::Kvm])
}

/// What a finished process did.
#[derive(Debug)]
pub struct Finished {
    /// Exit status (None if killed by a signal).
    pub status: Option<i32>,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
    /// User + system CPU time the process used.
    pub cpu: Duration,
    /// Wall time from spawn to exit.
    pub wall: Duration,
}

/// Runs `cmd` to its end, killing it after `limit`; collects its output and
/// its own CPU time (wait4 rusage).
pub fn run(cmd: &mut Command, limit: Duration) -> Finished {
    let start = Instant::now();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let watchdog = {
        let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = done.clone();
        std::thread::spawn(move || {
            let deadline = Instant::now() + limit;
            while Instant::now() < deadline {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            // SAFETY: kill(2) on our own child's pid, which is not reaped
            // until wait4 below returns.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        });
        done
    };
    let mut wstatus = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: waits for our own child; the pointers are to live locals.
    let r = unsafe { libc::wait4(pid, &mut wstatus, 0, &mut usage) };
    assert_eq!(r, pid, "wait4 failed: {}", std::io::Error::last_os_error());
    watchdog.store(true, std::sync::atomic::Ordering::Relaxed);
    std::mem::forget(child); // reaped by wait4 above
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    Finished {
        status: libc::WIFEXITED(wstatus).then(|| libc::WEXITSTATUS(wstatus)),
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        cpu: tv(usage.ru_utime) + tv(usage.ru_stime),
        wall: start.elapsed(),
    }
}

/// `ferry run IMAGE [EXTRA...] -- ARGS...`.
pub fn ferry_run(image: &Path, extra: &[&str], args: &[&str]) -> Command {
    let mut c = Command::new(ferry_bin());
    c.arg("run").arg(image).args(extra).arg("--").args(args);
    c
}

/// `uhyve IMAGE -- -- ARGS...` (uhyve's own `--`, then the app separator).
pub fn uhyve_run(image: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("uhyve");
    c.arg(image).arg("--").arg("--").args(args);
    c
}

/// QEMU's CPU model for every Ferry run of QEMU: the host's CPU without
/// `arch-capabilities`. This KVM refuses the value QEMU 7.2 writes to
/// MSR 0x10a (IA32_ARCH_CAPABILITIES) on AMD hosts, and QEMU then aborts
/// with "failed to set MSR 0x10a"; without the feature it boots on AMD
/// and Intel alike. The justfile's QEMU lines use the same model.
pub const QEMU_CPU: &str = "host,-arch-capabilities";

/// QEMU/KVM with a microvm machine of `memory` and no default devices:
/// add the console, devices and `-kernel`.
pub fn qemu_microvm(memory: &str) -> Command {
    let mut c = Command::new("qemu-system-x86_64");
    c.args([
        "-enable-kvm",
        "-M",
        "microvm",
        "-cpu",
        QEMU_CPU,
        "-m",
        memory,
        "-nodefaults",
        "-no-user-config",
    ]);
    c
}

/// QEMU/KVM booting the image directly (PVH) on a microvm machine.
/// The guest's status `s` comes back as QEMU's `(s << 1) | 1`: see [`qemu_status`].
pub fn qemu_run(image: &Path, args: &[&str]) -> Command {
    let mut c = qemu_microvm("64M");
    c.args([
        "-nographic",
        "-serial",
        "stdio",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x04",
    ])
    .arg("-kernel")
    .arg(image)
    .arg("-append")
    .arg(format!("-- {}", args.join(" ")));
    c
}

/// The guest's exit status from QEMU's isa-debug-exit status.
pub fn qemu_status(qemu: Option<i32>) -> Option<i32> {
    qemu.filter(|s| s & 1 == 1).map(|s| s >> 1)
}

/// Whether a program is on PATH.
pub fn have(program: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {program}"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// The `ferry: kvm stats:` line a `ferry run` with `FERRY_STATS=1` prints
/// as it ends.
pub fn kvm_stats(out: &Finished) -> String {
    out.stderr
        .lines()
        .find(|l| l.starts_with("ferry: kvm stats:"))
        .unwrap_or_else(|| panic!("no stats line: {}", out.stderr))
        .to_string()
}

/// The integer after `key=` in `text` (e.g. `guest_time_us=123`).
pub fn field(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("{key}="))? + key.len() + 1;
    text[at..]
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// The unsigned number after `"key":` in a flat JSON text.
pub fn json_u64(text: &str, key: &str) -> Option<u64> {
    let at = text.find(&format!("\"{key}\":"))? + key.len() + 3;
    text[at..]
        .trim_start()
        .split(|c: char| !c.is_ascii_digit())
        .next()?
        .parse()
        .ok()
}

/// How a guest's code ran, from its console log: the `cpu` word of the
/// runtime's `net: up` line ("native", "not pvm", ...).
pub fn guest_cpu_mode(log: &Path) -> Option<String> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.starts_with("net: up"))?;
    Some(line.split_once(" cpu ")?.1.trim().to_string())
}
