//! Faults: bad input to `ferry run` and misbehaving guests end with one
//! clear `ferry: error:` line and status 125, never a panic.

use std::path::PathBuf;
use std::time::Duration;

use ferry_tests::*;

const LIMIT: Duration = Duration::from_secs(60);

fn assert_ferry_error(out: &Finished, expect: &str) {
    assert_eq!(
        out.status,
        Some(125),
        "stdout: {}\nstderr: {}",
        out.stdout,
        out.stderr
    );
    let errors: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.starts_with("ferry: error:"))
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "want one error line, got stderr: {}",
        out.stderr
    );
    assert!(
        errors[0].contains(expect),
        "error line {:?} lacks {expect:?}",
        errors[0]
    );
    assert!(
        !out.stderr.contains("panicked"),
        "ferry panicked: {}",
        out.stderr
    );
}

fn scratch(name: &str, bytes: &[u8]) -> PathBuf {
    let dir = root().join("target/test-scratch");
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

fn ferry(args: &[&str]) -> Finished {
    run(std::process::Command::new(ferry_bin()).args(args), LIMIT)
}

#[test]
fn rejects_files_that_are_not_images() {
    let text = scratch("not-an-elf", b"#!/bin/sh\necho hello\n");
    assert_ferry_error(&ferry(&["run", text.to_str().unwrap()]), "not an ELF file");
    assert_ferry_error(
        &ferry(&["run", "/nonexistent/image"]),
        "cannot read image /nonexistent/image",
    );
    assert_ferry_error(&ferry(&["run", "/tmp"]), "not a regular file");
    // A real ELF, but a Linux program.
    let out = ferry(&["run", "/bin/true"]);
    assert_ferry_error(&out, "unsupported ELF");
}

#[test]
fn rejects_an_elf_without_the_hermit_note() {
    let mut bytes = std::fs::read(image("hello")).unwrap();
    let at = bytes
        .windows(7)
        .position(|w| w == b"HERMIT\0")
        .expect("hello has the note");
    bytes[at..at + 6].copy_from_slice(b"NOTHER");
    let p = scratch("no-hermit-note", &bytes);
    assert_ferry_error(
        &ferry(&["run", p.to_str().unwrap()]),
        "no Hermit entry-version note",
    );
}

/// Where an ELF file's last PT_LOAD program header is.
fn last_load(b: &[u8]) -> usize {
    let phoff = u64::from_le_bytes(b[32..40].try_into().unwrap()) as usize;
    let phnum = u16::from_le_bytes([b[56], b[57]]) as usize;
    (0..phnum)
        .rev()
        .map(|i| phoff + i * 56)
        .find(|&o| b[o..o + 4] == [1, 0, 0, 0])
        .unwrap()
}

/// The hello image with its last loadable segment grown to `memsz` bytes.
fn hello_with_bss(memsz: u64) -> PathBuf {
    let mut b = std::fs::read(image("hello")).unwrap();
    let at = last_load(&b);
    b[at + 40..at + 48].copy_from_slice(&memsz.to_le_bytes());
    scratch("huge-bss", &b)
}

#[test]
fn rejects_an_image_larger_than_memory() {
    if !kvm_or_skip("rejects_an_image_larger_than_memory") {
        return;
    }
    let p = hello_with_bss(100 << 20);
    let out = ferry(&["run", "--memory", "64M", p.to_str().unwrap()]);
    assert_ferry_error(&out, "pass a larger --memory");
}

/// A last segment whose size wraps the address space (memsz near 2^64
/// minus its address) is a clear error, exit 125, not a panic (101).
#[test]
fn rejects_a_segment_that_wraps_the_address_space() {
    let b = std::fs::read(image("hello")).unwrap();
    let last_load = last_load(&b);
    let vaddr = u64::from_le_bytes(b[last_load + 16..last_load + 24].try_into().unwrap());
    for memsz in [u64::MAX - vaddr, u64::MAX - vaddr + 1, u64::MAX] {
        let mut c = b.clone();
        c[last_load + 40..last_load + 48].copy_from_slice(&memsz.to_le_bytes());
        let p = scratch("wrapping-segment", &c);
        let out = ferry(&["run", p.to_str().unwrap()]);
        assert_ferry_error(&out, "reach past");
    }
}

#[test]
fn rejects_bad_memory_sizes_and_cpu_counts() {
    let img = image("hello");
    let img = img.to_str().unwrap();
    assert_ferry_error(
        &ferry(&["run", "--memory", "0", img]),
        "memory size 0 bytes is not usable",
    );
    assert_ferry_error(&ferry(&["run", "--memory", "1T", img]), "is not usable");
    assert_ferry_error(
        &ferry(&["run", "--memory", "6000", img]),
        "multiple of 4 KiB",
    );
    assert_ferry_error(&ferry(&["run", "--cpus", "4", img]), "runs exactly 1");
    // clap rejects unparsable sizes itself, with a usage hint, and the
    // documented status of Ferry's own errors.
    let out = ferry(&["run", "--memory", "lots", img]);
    assert_eq!(out.status, Some(125), "{}", out.stderr);
    assert!(out.stderr.contains("not a size"), "{}", out.stderr);
    let out = ferry(&["run", img, "--", "has space"]);
    assert_ferry_error(&out, "contains whitespace");
}

/// `ferry --help` lists the subcommands; each one's `--help` describes it
/// and gives every option (and positional argument) a description of its
/// own. (The unit test in `ferry.rs` checks the same on clap's model.)
#[test]
fn help_describes_every_option() {
    let top = ferry(&["--help"]);
    assert_eq!(top.status, Some(0));
    let subcommands: Vec<String> = top
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .filter(|c| c != "help")
        .collect();
    for want in ["run", "migrate", "receive", "snapshot", "restore", "status"] {
        assert!(
            subcommands.iter().any(|c| c == want),
            "ferry --help does not list {want}: {}",
            top.stdout
        );
    }
    for sub in &subcommands {
        let out = ferry(&[sub, "--help"]);
        assert_eq!(out.status, Some(0), "ferry {sub} --help: {}", out.stderr);
        let text = &out.stdout;
        let first = text.lines().next().unwrap_or("");
        assert!(
            first.split_whitespace().count() >= 3,
            "ferry {sub} --help has no description: {text}"
        );
        // Options and arguments: `  -x, --name <V>` or `  <IMAGE>` lines,
        // each followed by its description (clap's long help puts it on
        // the next lines, indented further).
        let lines: Vec<&str> = text.lines().collect();
        let mut described = 0;
        for (i, l) in lines.iter().enumerate() {
            let t = l.trim_start();
            let is_item = l.len() - t.len() == 2
                && (t.starts_with('-') || t.starts_with('<') || t.starts_with('['));
            if !is_item || t.starts_with("-h, --help") || t.starts_with("-V, --version") {
                continue;
            }
            let indent = l.len() - t.len();
            let description: String = lines[i + 1..]
                .iter()
                .take_while(|n| {
                    let nt = n.trim_start();
                    !nt.is_empty() && n.len() - nt.len() > indent
                })
                .map(|n| n.trim())
                .collect::<Vec<_>>()
                .join(" ");
            assert!(
                description.split_whitespace().count() >= 3,
                "ferry {sub} --help: {t:?} has no description:\n{text}"
            );
            described += 1;
        }
        assert!(
            described > 0 || !text.contains("Options:\n  -"),
            "ferry {sub} --help: no options found:\n{text}"
        );
    }
}

fn misbehave(case: &str) -> Finished {
    run(&mut ferry_run(&image("misbehave"), &[], &[case]), LIMIT)
}

#[test]
fn guest_misbehaviour_is_reported_by_name() {
    if !kvm_or_skip("guest_misbehaviour_is_reported_by_name") {
        return;
    }
    for (case, expect) in [
        ("unknown-port", "I/O port 0x666, which no device owns"),
        ("hypercall-outside-memory", "is outside guest memory"),
        (
            "params-outside-memory",
            "parameter block at 0x10000000000 is outside guest memory",
        ),
        ("hypercall-huge", "console write of 1073741824 bytes"),
        (
            "mmio",
            "guest-physical address 0xd0000000, which is neither RAM nor a device",
        ),
        ("triple-fault", "triple-faulted"),
    ] {
        let out = misbehave(case);
        assert!(
            out.stdout.contains(&format!("misbehave: {case}")),
            "{case}: guest did not start: {}",
            out.stdout
        );
        assert!(
            !out.stdout.contains("still running"),
            "{case}: guest went on: {}",
            out.stdout
        );
        assert_ferry_error(&out, expect);
    }
}
