//! Boot: the same hello image on Ferry's VMM, stock uhyve and QEMU/KVM.

use std::time::Duration;

use ferry_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

fn check_hello(out: &Finished, platform: &str) {
    let line = out
        .stdout
        .lines()
        .find(|l| l.starts_with("hello from"))
        .unwrap_or_else(|| {
            panic!(
                "no hello line on {platform}\nstdout: {}\nstderr: {}",
                out.stdout, out.stderr
            )
        });
    let mode = expected_cpu_mode();
    assert!(
        line.contains(&format!("on {platform} ({mode}):")),
        "want {platform} in cpu mode {mode}: {line}"
    );
    assert!(
        line.contains(r#"args=["alpha", "beta", "exit=7"]"#),
        "{line}"
    );
    assert!(
        field(line, "tsc_khz").unwrap_or(0) > 100_000,
        "implausible TSC rate: {line}"
    );
}

#[test]
fn ferry_boots_hello_passes_args_and_exit_status() {
    if !kvm_or_skip("ferry_boots_hello") {
        return;
    }
    let out = run(
        &mut ferry_run(&image("hello"), &[], &["alpha", "beta", "exit=7"]),
        LIMIT,
    );
    check_hello(&out, "ferry");
    assert_eq!(out.status, Some(7), "stderr: {}", out.stderr);
    assert!(out.stderr.is_empty(), "unexpected stderr: {}", out.stderr);
}

#[test]
fn ferry_exit_status_zero_and_other_memory_sizes() {
    if !kvm_or_skip("ferry_exit_status_zero") {
        return;
    }
    for mem in ["8M", "64M", "1G", "4G"] {
        let out = run(
            &mut ferry_run(&image("hello"), &["--memory", mem], &["size"]),
            LIMIT,
        );
        assert_eq!(out.status, Some(0), "--memory {mem}: {}", out.stderr);
        assert!(
            out.stdout.contains("args=[\"size\"]"),
            "--memory {mem}: {}",
            out.stdout
        );
    }
}

/// Tickless idle: a sleeping guest advances guest time by the sleep and
/// HLTs instead of spinning, so the VMM process uses little CPU meanwhile.
#[test]
fn ferry_guest_sleeps_in_hlt_and_time_advances() {
    if !kvm_or_skip("ferry_guest_sleeps_in_hlt") {
        return;
    }
    let out = run(
        &mut ferry_run(&image("hello"), &[], &["sleep-ms=1000"]),
        LIMIT,
    );
    assert_eq!(out.status, Some(0), "{}", out.stderr);
    let slept = field(&out.stdout, "slept_us").expect("slept line");
    assert!(slept >= 1_000_000, "guest slept {slept} us, asked for 1 s");
    assert!(
        out.wall >= Duration::from_secs(1),
        "the guest's second took {:?} of host time",
        out.wall
    );
    // A spinning guest would burn ~1 s of CPU here; HLT costs a few ms.
    assert!(
        out.cpu < Duration::from_millis(400),
        "VMM used {:?} of CPU during a 1 s guest sleep",
        out.cpu
    );
}

/// On PVM the runtime switches itself to native mode: a busy guest then
/// emulates almost nothing, and `pvm.native=0` keeps it emulated (so the
/// counter below would catch a runtime that never switched).
#[test]
fn ferry_runs_the_guest_natively_on_pvm() {
    if !needs(
        "ferry_runs_the_guest_natively_on_pvm",
        &[Need::Kvm, Need::Pvm],
    ) {
        return;
    }
    let stats = |extra: &[&str], spin: &str| {
        let mut cmd = ferry_run(&image("hello"), extra, &[spin]);
        cmd.env("FERRY_STATS", "1");
        let out = run(&mut cmd, LIMIT);
        assert_eq!(out.status, Some(0), "{}", out.stderr);
        let line = kvm_stats(&out);
        (out.stdout, line)
    };
    let (stdout, line) = stats(&[], "spin=2000000");
    assert!(stdout.contains("on ferry (native)"), "{stdout}");
    assert!(line.contains("cpu_mode=pvm-native"), "{line}");
    // Boot before the switch and the exits emulate a few thousand
    // instructions; two million rounds of the loop emulated would be ~10^7.
    let emulated = field(&line, "insn_emulation").unwrap_or(0);
    assert!(
        emulated < 20_000,
        "native guest emulated {emulated}: {line}"
    );

    let (stdout, line) = stats(&["--guest-arg", "pvm.native=0"], "spin=20000");
    assert!(
        stdout.contains("on ferry (emulated (pvm.native=0))"),
        "{stdout}"
    );
    assert!(line.contains("cpu_mode=pvm-emulated"), "{line}");
    let emulated = field(&line, "insn_emulation").unwrap_or(0);
    assert!(
        emulated > 100_000,
        "emulated guest emulated only {emulated}: {line}"
    );
}

#[test]
fn uhyve_boots_the_same_image() {
    if !needs(
        "uhyve_boots_the_same_image",
        &[Need::Kvm, Need::Program("uhyve")],
    ) {
        return;
    }
    let out = run(
        &mut uhyve_run(&image("hello"), &["alpha", "beta", "exit=7"]),
        LIMIT,
    );
    check_hello(&out, "uhyve");
    assert_eq!(out.status, Some(7), "stderr: {}", out.stderr);
    let out = run(&mut uhyve_run(&image("hello"), &["sleep-ms=200"]), LIMIT);
    assert!(
        field(&out.stdout, "slept_us").unwrap_or(0) >= 200_000,
        "{}",
        out.stdout
    );
}

#[test]
fn qemu_boots_the_same_image() {
    if !needs(
        "qemu_boots_the_same_image",
        &[Need::Kvm, Need::Program("qemu-system-x86_64")],
    ) {
        return;
    }
    let out = run(
        &mut qemu_run(&image("hello"), &["alpha", "beta", "exit=7"]),
        LIMIT,
    );
    check_hello(&out, "qemu-pvh");
    assert_eq!(
        qemu_status(out.status),
        Some(7),
        "QEMU status {:?}, stderr: {}",
        out.status,
        out.stderr
    );
    let out = run(&mut qemu_run(&image("hello"), &["sleep-ms=200"]), LIMIT);
    assert!(
        field(&out.stdout, "slept_us").unwrap_or(0) >= 200_000,
        "{}",
        out.stdout
    );
}

/// Guest panics and CPU exceptions are reported by the runtime itself, on
/// every platform alike.
#[test]
fn runtime_reports_panics_and_exceptions() {
    if !needs(
        "runtime_reports_panics_and_exceptions",
        &[
            Need::Kvm,
            Need::Program("uhyve"),
            Need::Program("qemu-system-x86_64"),
        ],
    ) {
        return;
    }
    let img = image("misbehave");
    let out = run(&mut ferry_run(&img, &[], &["panic"]), LIMIT);
    assert_eq!(out.status, Some(101));
    assert!(
        out.stdout.contains("panic: ") && out.stdout.contains("misbehave was asked to panic"),
        "{}",
        out.stdout
    );
    let out = run(&mut ferry_run(&img, &[], &["exception"]), LIMIT);
    assert_eq!(out.status, Some(102));
    assert!(out.stdout.contains("#UD invalid opcode"), "{}", out.stdout);
    let out = run(&mut uhyve_run(&img, &["exception"]), LIMIT);
    assert_eq!(out.status, Some(102));
    let out = run(&mut qemu_run(&img, &["panic"]), LIMIT);
    assert_eq!(qemu_status(out.status), Some(101));
}

/// A std program on RustyHermit (hermit-kernel 0.11 with Ferry's patch
/// series, `images/hermit/`) boots on Ferry's VMM natively, runs threads,
/// keeps each thread's floating-point state across task switches (eager
/// FXSAVE), sleeps and tells the time; without Ferry's boot hint
/// (`pvm.native=0`) the kernel finds PVM itself and still goes native.
#[test]
fn hermit_std_program_runs_natively_and_checks_itself() {
    if !needs(
        "hermit_std_program_runs_natively_and_checks_itself",
        &[Need::Kvm, Need::Pvm],
    ) {
        return;
    }
    let probe = |extra: &[&str]| {
        let mut cmd = ferry_run(&image("hermit-probe"), extra, &["spin=10000000"]);
        cmd.env("FERRY_STATS", "1");
        let out = run(&mut cmd, LIMIT);
        assert_eq!(out.status, Some(0), "{}\n{}", out.stdout, out.stderr);
        for check in [
            "ok: floating point across task switches",
            "ok: sleep and Instant",
            "ok: wall clock",
            "spin 10000000 in",
        ] {
            assert!(out.stdout.contains(check), "no {check:?}: {}", out.stdout);
        }
        assert!(
            out.stderr.contains("is a RustyHermit image"),
            "ferry run does not say what it runs: {}",
            out.stderr
        );
        let line = kvm_stats(&out);
        assert!(line.contains("cpu_mode=pvm-native"), "{line}");
        field(&line, "insn_emulation").unwrap_or(u64::MAX)
    };
    // Ten million rounds of the loop, emulated, would be ~5 * 10^7
    // instructions; natively the count is the boot's few privileged ones.
    let hinted = probe(&[]);
    assert!(hinted < 200_000, "emulated {hinted} instructions");
    // Found by the kernel: the boot until then is emulated.
    let found = probe(&["--guest-arg", "pvm.native=0"]);
    assert!(found < 3_000_000, "emulated {found} instructions");
}

/// The stock hermit-kernel 0.11 (only patched to compile with today's
/// nightly), with the same std program: Ferry's VMM gives it everything a
/// Hermit kernel reads, but on a PVM host the kernel's XGETBV stops PVM's
/// instruction emulator before it can print anything, and Ferry says so
/// in one line (exit 125). On hardware KVM it boots and checks itself.
#[test]
fn a_stock_hermit_kernel_boots_where_the_cpu_lets_it() {
    if !needs(
        "a_stock_hermit_kernel_boots_where_the_cpu_lets_it",
        &[Need::Kvm],
    ) {
        return;
    }
    let out = run(
        &mut ferry_run(&image("hermit-probe.stock"), &[], &[]),
        LIMIT,
    );
    if host_is_pvm() {
        assert_eq!(out.status, Some(125), "{}\n{}", out.stdout, out.stderr);
        assert!(
            out.stderr.contains("KVM internal error")
                && out.stderr.contains("XGETBV")
                && out.stderr.contains("is a RustyHermit image"),
            "{}",
            out.stderr
        );
    } else {
        assert_eq!(out.status, Some(0), "{}\n{}", out.stdout, out.stderr);
        assert!(
            out.stdout
                .contains("ok: floating point across task switches")
        );
    }
}
