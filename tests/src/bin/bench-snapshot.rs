//! `bench-snapshot`: snapshot time, file size and restore-to-running time
//! against guest memory size. The guest (`hello`) holds a ballast of half
//! its memory with every page touched, so the snapshot has real pages to
//! write; the rest is zeros (holes in the file). Restore-to-running is
//! process start to the VM running again (`FERRY_TRACE`'s "running"),
//! memory digest included. Medians of N runs; `target/bench/snapshot.json`.
use std::os::unix::fs::MetadataExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_tests::cluster::ferry_ctl;
use ferry_tests::qmp::Qmp;
use ferry_tests::{ferry_bin, image, root};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Snapshot and restore times against guest memory size")]
struct Args {
    /// Guest memory sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "64,256,1024")]
    sizes: Vec<u64>,
    /// Runs per size.
    #[arg(long, default_value_t = 3)]
    runs: usize,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn wait_socket(p: &std::path::Path) -> Result<()> {
    let t = Instant::now();
    while !(p.exists() && ferry_ctl(&["status", "--json", "--api"], p).is_ok()) {
        if t.elapsed() > Duration::from_secs(120) {
            bail!("{} never answered", p.display());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// Restores `snap` (with `extra` options) with `FERRY_TRACE=1`, stops it
/// once it answers, and returns its trace.
fn restore_trace(snap: &std::path::Path, api: &std::path::Path, extra: &[&str]) -> Result<String> {
    let _ = std::fs::remove_file(api);
    let r = Command::new(ferry_bin())
        .arg("restore")
        .arg(snap)
        .args(extra)
        .arg("--api")
        .arg(api)
        .env("FERRY_TRACE", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()?;
    wait_socket(api)?;
    ferry_ctl(&["stop", "--api"], api)?;
    Ok(String::from_utf8_lossy(&r.wait_with_output()?.stderr).into_owned())
}

/// The time of `phase` in a `FERRY_TRACE` output, in ms.
fn phase_ms(trace: &str, phase: &str) -> Option<f64> {
    trace
        .lines()
        .find(|l| l.ends_with(phase))?
        .split_whitespace()
        .nth(2)?
        .parse()
        .ok()
}

fn one(size: u64, dir: &std::path::Path) -> Result<Value> {
    let api = dir.join("s.sock");
    let snap = dir.join("s.snap");
    let _ = std::fs::remove_file(&api);
    let mut vm = Command::new(ferry_bin())
        .arg("run")
        .arg(image("hello"))
        .args(["--memory", &format!("{size}M"), "--api"])
        .arg(&api)
        .args([
            "--",
            &format!("ballast-mib={}", size / 2),
            "sleep-ms=600000",
        ])
        .stdout(std::fs::File::create(dir.join("s.log"))?)
        .spawn()?;
    // Touching the ballast takes the emulated guest a while.
    ferry_tests::cluster::wait_for_line(
        &dir.join("s.log"),
        "ballast of",
        Duration::from_secs(300),
        vm.id(),
    )?;
    wait_socket(&api)?;
    let t = Instant::now();
    let out = ferry_ctl(
        &[
            "snapshot",
            "--json",
            "--then",
            "stop",
            "--out",
            snap.to_str().expect("utf-8"),
            "--api",
        ],
        &api,
    )?;
    let snapshot_ms = t.elapsed().as_secs_f64() * 1e3;
    vm.wait()?;
    let sv: Value = serde_json::from_str(&out)?;
    let meta = std::fs::metadata(&snap)?;
    let trace = restore_trace(&snap, &api, &[])?;
    let running = phase_ms(&trace, "running")
        .with_context(|| format!("no 'running' in the trace: {trace}"))?;
    // Again, trusting the memory image (no digest over all of it).
    let trusted = restore_trace(&snap, &api, &["--no-verify-memory"])?;
    let running_trusted = phase_ms(&trusted, "running")
        .with_context(|| format!("no 'running' in the trace: {trusted}"))?;
    let at = |phase: &str| phase_ms(&trace, phase);
    Ok(json!({
        "memory_mib": size,
        "snapshot_ms": snapshot_ms,
        "paused_us": sv["paused_us"], "write_us": sv["write_us"],
        "file_bytes": meta.len(), "file_allocated_bytes": meta.blocks() * 512,
        "restore_to_running_ms": running,
        "restore_trusted_to_running_ms": running_trusted,
        "restore_verify_memory_ms": at("verify memory").zip(at("VM, vCPU, card (capturing)")).map(|(a, b)| a - b),
    }))
}

/// QEMU (microvm, PVH) saving the same guest to a file with its own
/// migration to `exec:cat`, and loading it with `-incoming`.
fn qemu_one(size: u64, dir: &std::path::Path) -> Result<Value> {
    let mon = dir.join("q.qmp");
    let file = dir.join("q.state");
    let _ = std::fs::remove_file(&mon);
    let base = || {
        let mut c = ferry_tests::qemu_microvm(&format!("{size}M"));
        c.args([
            "-display",
            "none",
            "-serial",
            &format!("file:{}", dir.join("q.log").display()),
        ])
        .arg("-qmp")
        .arg(format!("unix:{},server,nowait", mon.display()))
        .arg("-kernel")
        .arg(image("hello"))
        .args([
            "-append",
            &format!("-- ballast-mib={} sleep-ms=600000", size / 2),
        ]);
        c
    };
    let mut q = base().stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let t = Instant::now();
    while !mon.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    ferry_tests::cluster::wait_for_line(
        &dir.join("q.log"),
        "ballast of",
        Duration::from_secs(300),
        q.id(),
    )?;
    let mut qmp = Qmp::connect(&mon)?;
    qmp.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"exec:cat > {}"}}}}"#,
        file.display()
    ))?;
    let save_ms = match qmp.wait_migration(Duration::from_secs(120)) {
        Ok(st) => st["total-time"].as_f64().unwrap_or(f64::NAN),
        Err(e) => {
            let _ = q.kill();
            bail!("QEMU migration to file: {e:#}");
        }
    };
    let _ = qmp.cmd(r#"{"execute":"quit"}"#);
    let _ = q.wait();
    let bytes = std::fs::metadata(&file)?.len();
    let _ = std::fs::remove_file(&mon);
    let mut c = base();
    c.arg("-incoming")
        .arg(format!("exec:cat {}", file.display()));
    let t = Instant::now();
    let mut q = c.stdout(Stdio::null()).stderr(Stdio::null()).spawn()?;
    let mut qmp = Qmp::connect(&mon)?;
    let restore_ms = loop {
        let st = qmp.cmd(r#"{"execute":"query-status"}"#)?;
        if st["status"] == "running" {
            break t.elapsed().as_secs_f64() * 1e3;
        }
        if t.elapsed() > Duration::from_secs(120) {
            let _ = q.kill();
            bail!("QEMU never ran after -incoming");
        }
        std::thread::sleep(Duration::from_millis(1));
    };
    let _ = qmp.cmd(r#"{"execute":"quit"}"#);
    let _ = q.wait();
    let _ = std::fs::remove_file(&file);
    Ok(
        json!({"memory_mib": size, "qemu_save_ms": save_ms, "qemu_file_bytes": bytes, "qemu_restore_to_running_ms": restore_ms}),
    )
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = root().join("target/bench/snapshot");
    std::fs::create_dir_all(&dir)?;
    let mut rows = Vec::new();
    println!(
        "| guest memory | touched | Ferry snapshot | file size / on disk | Ferry restore to running | of which memory digest | ... with --no-verify-memory | QEMU save | QEMU file | QEMU restore to running |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|");
    for &size in &a.sizes {
        let mut runs = Vec::new();
        for _ in 0..a.runs {
            runs.push(one(size, &dir)?);
        }
        let mut qruns = Vec::new();
        for _ in 0..a.runs {
            match qemu_one(size, &dir) {
                Ok(q) => qruns.push(q),
                Err(e) => eprintln!("bench-snapshot: QEMU {size} MiB: {e:#}"),
            }
        }
        let m = |k: &str| median(runs.iter().filter_map(|r| r[k].as_f64()).collect());
        let qm = |k: &str| median(qruns.iter().filter_map(|r| r[k].as_f64()).collect());
        println!(
            "| {size} MiB | {} MiB | {:.1} ms | {:.0} / {:.0} MiB | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} MiB | {:.1} ms |",
            size / 2,
            m("snapshot_ms"),
            m("file_bytes") / 1048576.0,
            m("file_allocated_bytes") / 1048576.0,
            m("restore_to_running_ms"),
            m("restore_verify_memory_ms"),
            m("restore_trusted_to_running_ms"),
            qm("qemu_save_ms"),
            qm("qemu_file_bytes") / 1048576.0,
            qm("qemu_restore_to_running_ms"),
        );
        rows.push(json!({"memory_mib": size, "runs": runs, "qemu": qruns}));
    }
    let _ = std::fs::remove_file(dir.join("s.snap"));
    std::fs::write(
        root().join("target/bench/snapshot.json"),
        serde_json::to_string_pretty(&rows)? + "\n",
    )?;
    println!(
        "\nsnapshot = `ferry snapshot --then stop` wall time; restore to running = process start to resumed (FERRY_TRACE), memory digest included; medians of {} runs",
        a.runs
    );
    Ok(())
}
