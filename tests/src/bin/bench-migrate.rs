//! `bench-migrate`: the TCPmig paper's Fig. 5 and Fig. 6, extended. For
//! each image size (stream's `ballast`, every page touched) and load (the
//! paper's 120 MB/s, and full speed), with capture on and off: stream to a
//! verifying client, live-migrate hostA -> hostB in the middle, and record
//! the largest gap between arrivals around the migration (the paper's
//! migration delay), the VMM-measured downtime, the client's throughput in
//! 100 ms windows, its TCP counters, and (the paper's Fig. 6) its TCP
//! windows over time from TCP_INFO: the stream's advertised windows and the
//! cwnd of an echoed upstream conversation the client keeps at 1 MB/s.
//! Repeats each point and reports medians. Writes
//! `target/bench/migrate.json` and `docs/bench-migrate.md`.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use ferry_tests::cluster::{self, Cluster};
use ferry_tests::gaps::{self, median};
use ferry_tests::qmp::Qmp;
use ferry_tests::{image, root};
use serde_json::{Value, json};

#[derive(Parser)]
#[command(about = "Migration delay and client throughput against image size, load and capture")]
struct Args {
    /// Image sizes in MiB.
    #[arg(long, value_delimiter = ',', default_value = "4,10,20,50,256,1024")]
    sizes: Vec<u64>,
    /// Loads: the stream app's rate (`120M`, `full`, or any rate it takes).
    #[arg(long, value_delimiter = ',', default_value = "120M,full")]
    loads: Vec<String>,
    /// Capture settings to measure: `on` (the destination captures the
    /// VM's frames during the pause, as users run it; the aims' measure),
    /// `off`.
    #[arg(long, value_delimiter = ',', default_value = "on,off", value_parser = ["on", "off"])]
    captures: Vec<String>,
    /// Also measure each point's first load over `--insecure`, interleaved
    /// (what the channel's crypto costs).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    crypto: bool,
    /// Runs per point (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Seconds of streaming per run, at least (the migration is in the
    /// middle; large images stream longer, to measure the stream before it).
    #[arg(long, default_value_t = 6.0)]
    seconds: f64,
    /// Also measure QEMU's own live migration of the same image.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    qemu: bool,
    /// Measure only QEMU (keeps an earlier target/bench/migrate.json).
    #[arg(long)]
    only_qemu: bool,
    /// Write the JSON and the report into this directory instead of
    /// target/bench and docs/ (for comparisons, e.g. `just bench-overflow`;
    /// `$FERRY_BIN` picks the VMM).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
    /// Settings for the migrated VM's runtime (`ferry run --guest-arg`),
    /// e.g. `net.stats=1`: its event-loop counters, and each halt over
    /// 3 ms, in the VM logs under target/test-logs/bench-migrate.
    #[arg(long, value_delimiter = ',')]
    guest_args: Vec<String>,
    /// The stream app migrated: `stream` (Ferry's runtime) or
    /// `hermit-stream` (std Rust on RustyHermit).
    #[arg(long, default_value = "stream")]
    app: String,
}

/// When to migrate (s after the client starts) and how long the client
/// streams: at least `seconds` in all, the migration at least half-way,
/// and before it room for three windows as long as the migration's (which
/// `gaps::around` compares it with), the migration taking about
/// `ms_per_mib` per MiB of image.
fn timing(size_mib: u64, ms_per_mib: f64, seconds: f64) -> (f64, f64) {
    let total = size_mib as f64 * ms_per_mib / 1e3;
    let at = (seconds / 2.0).max(0.5 + 3.0 * (total + 0.7));
    (at, seconds.max(at + total + 1.5))
}

/// QEMU's `downtime-limit` in these runs: Ferry's default budget.
const QEMU_DOWNTIME_LIMIT_MS: u64 = 1;
/// QEMU's `max-bandwidth`, bytes/s: as good as unlimited.
const QEMU_MAX_BANDWIDTH: u64 = 100_000_000_000;

/// The stream app's echo port in these runs, and the rate the client
/// sends to it (bytes/s).
const ECHO_PORT: u16 = 5002;
const ECHO_RATE: u64 = 1_000_000;

/// The stream's client for one run: every gap listed, 100 ms windows,
/// TCP_INFO every 10 ms, and (with `echo`) the upstream conversation.
fn measuring_client(c: &Cluster, seconds: f64, echo: bool) -> Result<std::process::Child> {
    let mut cmd = c.stream_client();
    if echo {
        cmd.args([
            "--echo",
            &format!("{}:{ECHO_PORT}", cluster::VIP),
            "--echo-rate",
            &ECHO_RATE.to_string(),
        ]);
    }
    Ok(cmd
        .args(["--seconds", &seconds.to_string(), "--windows-ms", "100"])
        .args(["--tcp-info-ms", "10"])
        .args(gaps::CLIENT_ARGS)
        .stdout(std::process::Stdio::piped())
        .spawn()?)
}

/// The smallest 100 ms window that overlaps `range` (s), relative to the
/// median window of the run.
fn worst_window(windows: &[f64], steady: f64, range: std::ops::Range<f64>) -> f64 {
    windows
        .iter()
        .enumerate()
        .filter(|(i, _)| {
            let t = *i as f64 / 10.0;
            t + 0.1 > range.start && t < range.end
        })
        .map(|(_, w)| w / steady)
        .fold(f64::INFINITY, f64::min)
}

/// Fig. 6: what the client's TCP_INFO samples say about a migration at
/// `at` s lasting `total` s: the echo sender's cwnd (median before, the
/// lowest from the migration to 1 s after it), the lowest window each side
/// advertised on the stream then against before, the echo's retransmissions
/// over the run, and the samples from 0.5 s before to 1.5 s after (for the
/// plot).
fn windows_around(cv: &Value, at: f64, total: f64) -> Value {
    let samples: Vec<&Value> = cv["tcp_info"]
        .as_array()
        .map(|v| v.iter().collect())
        .unwrap_or_default();
    let t = |v: &Value| v["t"].as_f64().unwrap_or(-1.0);
    let during = |v: &&Value| t(v) >= at && t(v) <= at + total + 1.0;
    let before = |v: &&Value| t(v) >= 0.5 && t(v) < at;
    let series = |k: &str, pick: &dyn Fn(&&Value) -> bool| -> Vec<f64> {
        samples
            .iter()
            .filter(|v| pick(v))
            .filter_map(|v| v[k].as_f64())
            .collect()
    };
    let min = |v: Vec<f64>| v.into_iter().fold(f64::NAN, f64::min);
    let retrans = |pick: &dyn Fn(&&Value) -> bool| {
        let r = series("echo_retrans", pick);
        r.last().copied().unwrap_or(0.0) - r.first().copied().unwrap_or(0.0)
    };
    json!({
        "echo_cwnd_before": median(&mut series("echo_cwnd", &before)),
        "echo_cwnd_min_at_migration": min(series("echo_cwnd", &during)),
        // An app-limited sender's cwnd swings on its own: its lowest in the
        // same stream before the migration is the baseline.
        "echo_cwnd_min_before": min(series("echo_cwnd", &before)),
        "echo_retrans_at_migration": retrans(&during),
        "rcv_wnd_before": median(&mut series("rcv_wnd", &before)),
        "rcv_wnd_min_at_migration": min(series("rcv_wnd", &during)),
        "snd_wnd_before": median(&mut series("snd_wnd", &before)),
        "snd_wnd_min_at_migration": min(series("snd_wnd", &during)),
        "samples": samples
            .iter()
            .filter(|v| t(v) >= at - 0.5 && t(v) <= at + total + 1.5)
            .cloned()
            .cloned()
            .collect::<Vec<Value>>(),
    })
}

/// Medians over `runs` of their [`windows_around`] measures; each
/// window's lowest value at the migration as a fraction of before.
fn tcp_summary(runs: &[Value]) -> Value {
    let med = |f: &dyn Fn(&Value) -> Option<f64>| {
        median(&mut runs.iter().filter_map(|r| f(&r["tcp"])).collect::<Vec<_>>())
    };
    let ratio = |min: &'static str, before: &'static str| {
        move |t: &Value| {
            let (m, b) = (t[min].as_f64()?, t[before].as_f64()?);
            (b > 0.0).then(|| m / b)
        }
    };
    json!({
        "echo_cwnd_before": med(&|t| t["echo_cwnd_before"].as_f64()),
        "echo_cwnd_min_at_migration": med(&|t| t["echo_cwnd_min_at_migration"].as_f64()),
        "echo_cwnd_min_before": med(&|t| t["echo_cwnd_min_before"].as_f64()),
        "echo_retrans_at_migration": runs.iter().filter_map(|r| r["tcp"]["echo_retrans_at_migration"].as_f64()).sum::<f64>(),
        "rcv_wnd_min_ratio": med(&ratio("rcv_wnd_min_at_migration", "rcv_wnd_before")),
        "snd_wnd_min_ratio": med(&ratio("snd_wnd_min_at_migration", "snd_wnd_before")),
    })
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    c: &mut Cluster,
    app: &str,
    size: u64,
    rate: &str,
    capture: bool,
    secure: bool,
    seconds: f64,
    n: u32,
    guest_args: &[String],
) -> Result<Value> {
    let dir = cluster::log_dir("bench-migrate");
    let api_a = dir.join(format!("a{n}.sock"));
    let api_b = dir.join(format!("b{n}.sock"));
    let _ = std::fs::remove_file(&api_a);
    let _ = std::fs::remove_file(&api_b);
    let memory = format!("{}M", size + 64);
    let ballast = format!("ballast={size}M");
    let rate_arg = format!("rate={rate}");
    let echo_arg = format!("echo={ECHO_PORT}");
    let mut args = vec![ballast.as_str(), echo_arg.as_str()];
    if rate != "full" {
        args.push(&rate_arg);
    }
    let mut ferry_args = vec!["--api", api_a.to_str().expect("utf-8")];
    for g in guest_args {
        ferry_args.extend(["--guest-arg", g]);
    }
    let a = c.start_vm_with(
        "hostA",
        &image(app),
        &memory,
        &ferry_args,
        &args,
        &dir.join(format!("a{n}.log")),
        "listening",
    )?;
    let port = 7000 + (n % 1000) as u16;
    let mut extra: Vec<&str> = if capture {
        vec![]
    } else {
        vec!["--no-capture"]
    };
    let channel: &[&str] = if secure { &[] } else { &["--insecure"] };
    extra.extend_from_slice(channel);
    let b = c.start_receiver(
        "hostB",
        port,
        &api_b,
        &extra,
        &dir.join(format!("b{n}.log")),
    )?;
    let (planned, client_seconds) = timing(size, 2.5, seconds);
    let before = c.client_tcp_counters()?;
    let client = measuring_client(c, client_seconds, true)?;
    let t0 = Instant::now();
    // How long the source's vCPU thread waits for a CPU, over time.
    let sampler = ferry_tests::schedstat::start(a, t0, Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs_f64(planned));
    let at = t0.elapsed().as_secs_f64();
    let at_monotonic_s = ferry_tests::monotonic_s();
    let report = c
        .migrate(&api_a, "hostB", port, channel)
        .map_err(anyhow::Error::msg)?;
    let sched = sampler.finish();
    let out = client.wait_with_output()?;
    let d = c.client_tcp_counters()?.since(&before);
    c.stop(a, Duration::from_secs(2));
    c.stop(b, Duration::from_secs(2));
    let text = String::from_utf8_lossy(&out.stdout);
    let cv: Value = serde_json::from_str(text.trim()).with_context(|| format!("client: {text}"))?;
    let rv: Value = serde_json::from_str(&report)?;
    let total_s = rv["total_ms"].as_f64().unwrap_or(0.0) / 1e3;
    let g = gaps::around(&cv, at, total_s);
    // The source vCPU's wait for a CPU during the largest gap (if the
    // source still ran then), and in windows of that length before.
    let (gap_from, gap_to) = (at + (g.gap_at_ms - g.gap_ms) / 1e3, at + g.gap_at_ms / 1e3);
    let vcpu = sched.busiest();
    let vcpu_wait_in_gap = vcpu.and_then(|t| sched.waited(t, gap_from, gap_to));
    let vcpu_wait_own = vcpu.and_then(|t| sched.waited_typically(t, 0.3, at - 0.2, g.gap_ms / 1e3));
    // Throughput: 100 ms windows; steady state is the median window.
    let windows: Vec<f64> = cv["windows"]
        .as_array()
        .map(|w| w.iter().filter_map(Value::as_f64).collect())
        .unwrap_or_default();
    let mut steady = windows.clone();
    let steady = median(&mut steady);
    // Round 0 sends every touched page: its rate is the pre-copy's.
    let r0 = &rv["precopy"][0];
    let precopy_bytes_per_s =
        r0["bytes"].as_f64().unwrap_or(0.0) / (r0["ms"].as_f64().unwrap_or(f64::NAN) / 1e3);
    Ok(json!({
        "size_mib": size, "rate": rate, "capture": capture, "secure": secure,
        "precopy_bytes_per_s": precopy_bytes_per_s,
        "migration_gap_ms": g.gap_ms,
        "gap_at_ms": g.gap_at_ms,
        // Where the gap ended and the migration began on CLOCK_MONOTONIC
        // (what `perf record -k mono` stamps), to find them in a trace.
        "gap_end_monotonic_s": cv["start_monotonic_s"].as_f64().map(|s| s + at + g.gap_at_ms / 1e3),
        "migration_at_monotonic_s": at_monotonic_s,
        "own_gap_ms": g.own_gap_ms,
        "added_ms": g.added_ms(),
        "added_without_migration_ms": gaps::added_without_migration(&cv, at, total_s),
        "vcpu_wait_in_gap_ms": vcpu_wait_in_gap,
        "vcpu_wait_own_ms": vcpu_wait_own,
        "max_gap_ms": cv["max_gap_ms"],
        // The worst window around the migration, and the worst of the
        // same stream before it (leaving out its first 300 ms).
        "worst_window_at_migration": worst_window(&windows, steady, at - 0.2..at + total_s + 0.5),
        "worst_window_before": worst_window(&windows, steady, 0.3..at - 0.2),
        "precopy": rv["precopy"], "downtime_ms": rv["downtime_ms"], "last_pages": rv["last_pages"], "pause_phases_ms": rv["pause_phases_ms"], "commit_to_running_ms": rv["destination"]["commit_to_running_ms"], "total_ms": rv["total_ms"], "rounds": rv["rounds"], "bytes": rv["bytes"],
        "captured": rv["destination"]["captured"],
        "client_bytes_per_second": cv["bytes_per_second"],
        "steady_window_bytes": steady,
        "windows": windows, "migration_at_s": at,
        "retransmits": d.retrans_segs, "dup_segments": d.dup_segs_received, "resets": d.estab_resets,
        "echo_bytes_verified": cv["echo_bytes_verified"],
        "tcp": windows_around(&cv, at, total_s),
        "error": cv["error"],
    }))
}

/// The value of KVM statistic `name` in a QMP `query-stats` answer (the
/// first vCPU that has it).
fn find_stat(v: &Value, name: &str) -> Option<u64> {
    v["return"].as_array()?.iter().find_map(|provider| {
        provider["stats"]
            .as_array()?
            .iter()
            .find(|s| s["name"] == name)?["value"]
            .as_u64()
    })
}

/// QEMU's own live migration of the same image, same topology, same load:
/// QEMU (pc, qboot, virtio-net-pci on the tap) on hostA, `-incoming` on
/// hostB, `migrate tcp:` over the migration link.
fn qemu_run(c: &mut Cluster, size: u64, rate: &str, seconds: f64, n: u32) -> Result<Value> {
    let dir = cluster::log_dir("bench-migrate");
    let (qa, qb) = (
        dir.join(format!("qa{n}.qmp")),
        dir.join(format!("qb{n}.qmp")),
    );
    let _ = std::fs::remove_file(&qa);
    let _ = std::fs::remove_file(&qb);
    let app_args = if rate == "full" {
        format!("ballast={size}M echo={ECHO_PORT}")
    } else {
        format!("ballast={size}M echo={ECHO_PORT} rate={rate}")
    };
    let qemu = |c: &Cluster, host: &str, qmp: &std::path::Path, incoming: Option<String>| {
        let mut cmd = c.qemu_service(
            host,
            &image("stream"),
            &format!("{}M", size + 64),
            &app_args,
        );
        cmd.arg("-qmp")
            .arg(format!("unix:{},server,nowait", qmp.display()));
        if let Some(i) = incoming {
            cmd.args(["-incoming", &i]);
        }
        cmd
    };
    let ca = qemu(c, "hostA", &qa, None);
    let pa = c.spawn(ca, &dir.join(format!("qa{n}.log")))?;
    cluster::wait_for_line(
        &dir.join(format!("qa{n}.log")),
        "listening",
        Duration::from_secs(300),
        pa,
    )?;
    let port = 7500 + (n % 400) as u16;
    let cb = qemu(
        c,
        "hostB",
        &qb,
        Some(format!("tcp:{}:{port}", cluster::MIGRATION_IPS[1])),
    );
    let pb = c.spawn(cb, &dir.join(format!("qb{n}.log")))?;
    let mut qmp_a = Qmp::connect(&qa)?;
    let mut qmp_b = Qmp::connect(&qb)?;
    let (planned, client_seconds) = timing(size, 8.0, seconds);
    let before = c.client_tcp_counters()?;
    let client = measuring_client(c, client_seconds, true)?;
    let t0 = Instant::now();
    std::thread::sleep(Duration::from_secs_f64(planned));
    let at = t0.elapsed().as_secs_f64();
    // A fair peer: QEMU's downtime limit set to Ferry's budget and its
    // bandwidth unlimited (its defaults are 300 ms and 128 MiB/s).
    qmp_a.cmd(&format!(
        r#"{{"execute":"migrate-set-parameters","arguments":{{"downtime-limit":{QEMU_DOWNTIME_LIMIT_MS},"max-bandwidth":{QEMU_MAX_BANDWIDTH}}}}}"#
    ))?;
    qmp_a.cmd(&format!(
        r#"{{"execute":"migrate","arguments":{{"uri":"tcp:{}:{port}"}}}}"#,
        cluster::MIGRATION_IPS[1]
    ))?;
    let st = qmp_a.wait_migration(Duration::from_secs(120))?;
    // How the guest runs after QEMU's move: instructions emulated over
    // half a second, from KVM's vCPU stats (QMP query-stats).
    let mut emulated = || -> Option<u64> {
        let v = qmp_b
            .cmd(r#"{"execute":"query-stats","arguments":{"target":"vcpu"}}"#)
            .ok()?;
        find_stat(&v, "insn_emulation")
    };
    let e0 = emulated();
    std::thread::sleep(Duration::from_millis(500));
    let after_move = match (e0, emulated()) {
        (Some(a), Some(b)) if b.saturating_sub(a) > 100_000 => "emulated",
        (Some(_), Some(_)) => "native",
        _ => "unknown",
    };
    let out = client.wait_with_output()?;
    let d = c.client_tcp_counters()?.since(&before);
    let _ = qmp_a.cmd(r#"{"execute":"quit"}"#);
    c.stop(pa, Duration::from_secs(2));
    c.stop(pb, Duration::from_secs(2));
    let text = String::from_utf8_lossy(&out.stdout);
    let cv: Value = serde_json::from_str(text.trim()).with_context(|| format!("client: {text}"))?;
    let g = gaps::around(&cv, at, st["total-time"].as_f64().unwrap_or(0.0) / 1e3);
    Ok(json!({
        "size_mib": size, "rate": rate, "vmm": "qemu", "guest_after_move": after_move,
        "migration_gap_ms": g.gap_ms, "gap_at_ms": g.gap_at_ms, "own_gap_ms": g.own_gap_ms,
        "added_ms": g.added_ms(),
        "downtime_ms": st["downtime"], "total_ms": st["total-time"],
        "retransmits": d.retrans_segs, "resets": d.estab_resets,
        "tcp": windows_around(&cv, at, st["total-time"].as_f64().unwrap_or(0.0) / 1e3),
        "error": cv["error"],
    }))
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut c = Cluster::up("fmbench").context("building the cluster (root needed)")?;
    let mut results = Vec::new();
    let mut insecure: Vec<Value> = Vec::new();
    let mut n = 0u32;
    for &size in a.sizes.iter().filter(|_| !a.only_qemu) {
        for rate in a.loads.iter().map(String::as_str) {
            for capture in a.captures.iter().map(|c| c == "on") {
                let run = |c: &mut Cluster, secure: bool, n: u32| {
                    let app = &a.app;
                    one_run(
                        c,
                        app,
                        size,
                        rate,
                        capture,
                        secure,
                        a.seconds,
                        n,
                        &a.guest_args,
                    )
                };
                let mut runs = Vec::new();
                for _ in 0..a.runs {
                    n += 1;
                    match run(&mut c, true, n) {
                        Ok(r) => runs.push(r),
                        Err(e) => {
                            eprintln!("bench-migrate: {size} MiB {rate} capture={capture}: {e:#}")
                        }
                    }
                    // What the crypto costs: the same run over an
                    // --insecure channel, interleaved (120M, capture on).
                    if a.crypto && rate == a.loads[0] && capture {
                        n += 1;
                        match run(&mut c, false, n) {
                            Ok(r) => insecure.push(r),
                            Err(e) => eprintln!("bench-migrate: {size} MiB insecure: {e:#}"),
                        }
                    }
                }
                let med = |k: &str| {
                    median(
                        &mut runs
                            .iter()
                            .filter_map(|r| r[k].as_f64())
                            .collect::<Vec<_>>(),
                    )
                };
                let max = |k: &str| {
                    runs.iter()
                        .filter_map(|r| r[k].as_f64())
                        .fold(f64::NEG_INFINITY, f64::max)
                };
                let row = json!({
                    "size_mib": size, "rate": rate, "capture": capture, "runs": runs.len(),
                    "migration_gap_ms_median": med("migration_gap_ms"),
                    "migration_gap_ms_max": max("migration_gap_ms"),
                    "own_gap_ms_median": med("own_gap_ms"),
                    "added_ms_median": med("added_ms"),
                    "added_ms_max": max("added_ms"),
                    "gap_at_ms_median": med("gap_at_ms"),
                    "vcpu_wait_in_gap_ms_median": med("vcpu_wait_in_gap_ms"),
                    "vcpu_wait_own_ms_median": med("vcpu_wait_own_ms"),
                    "downtime_ms_median": med("downtime_ms"),
                    "total_ms_median": med("total_ms"),
                    "retransmits": runs.iter().filter_map(|r| r["retransmits"].as_u64()).sum::<u64>(),
                    "resets": runs.iter().filter_map(|r| r["resets"].as_u64()).sum::<u64>(),
                    "errors": runs.iter().filter(|r| !r["error"].is_null()).count(),
                    "tcp": tcp_summary(&runs),
                    "client_bytes_per_second_median": med("client_bytes_per_second"),
                    "worst_window_at_migration_median": med("worst_window_at_migration"),
                    "worst_window_before_median": med("worst_window_before"),
                    "detail": runs,
                });
                eprintln!(
                    "bench-migrate: {size:>5} MiB {rate:>4} capture={capture:<5} gap {:.1} ms (own {:.1}, added {:.1}), downtime {:.2} ms, total {:.0} ms; the source vCPU waited for a CPU {:.1} ms in the gap ({:.1} in such a window before)",
                    row["migration_gap_ms_median"].as_f64().unwrap_or(f64::NAN),
                    row["own_gap_ms_median"].as_f64().unwrap_or(f64::NAN),
                    row["added_ms_median"].as_f64().unwrap_or(f64::NAN),
                    row["downtime_ms_median"].as_f64().unwrap_or(f64::NAN),
                    row["total_ms_median"].as_f64().unwrap_or(f64::NAN),
                    row["vcpu_wait_in_gap_ms_median"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                    row["vcpu_wait_own_ms_median"].as_f64().unwrap_or(f64::NAN)
                );
                results.push(row);
            }
        }
    }
    // QEMU's own live migration of the same image, same load (120M).
    let mut qemu_rows = Vec::new();
    if a.qemu {
        for &size in &a.sizes {
            let mut runs = Vec::new();
            for _ in 0..a.runs {
                n += 1;
                match qemu_run(&mut c, size, "120M", a.seconds, n) {
                    Ok(r) => runs.push(r),
                    Err(e) => eprintln!("bench-migrate: QEMU {size} MiB: {e:#}"),
                }
            }
            let med = |k: &str| {
                median(
                    &mut runs
                        .iter()
                        .filter_map(|r| r[k].as_f64())
                        .collect::<Vec<_>>(),
                )
            };
            let row = json!({
                "size_mib": size, "runs": runs.len(),
                "migration_gap_ms_median": med("migration_gap_ms"),
                "own_gap_ms_median": med("own_gap_ms"),
                "added_ms_median": med("added_ms"),
                "downtime_ms_median": med("downtime_ms"),
                "total_ms_median": med("total_ms"),
                "retransmits": runs.iter().filter_map(|r| r["retransmits"].as_u64()).sum::<u64>(),
                "resets": runs.iter().filter_map(|r| r["resets"].as_u64()).sum::<u64>(),
                "errors": runs.iter().filter(|r| !r["error"].is_null()).count(),
                "tcp": tcp_summary(&runs),
                "guest_after_move": runs.first().map_or(Value::Null, |r| r["guest_after_move"].clone()),
                "detail": runs,
            });
            eprintln!(
                "bench-migrate: QEMU {size:>5} MiB gap {:.1} ms, downtime {:.2} ms, total {:.0} ms",
                row["migration_gap_ms_median"].as_f64().unwrap_or(f64::NAN),
                row["downtime_ms_median"].as_f64().unwrap_or(f64::NAN),
                row["total_ms_median"].as_f64().unwrap_or(f64::NAN)
            );
            qemu_rows.push(row);
        }
    }
    let dir = a.out.clone().unwrap_or_else(|| root().join("target/bench"));
    std::fs::create_dir_all(&dir)?;
    if a.only_qemu {
        let old = std::fs::read_to_string(dir.join("migrate.json"))
            .context("--only-qemu needs an earlier target/bench/migrate.json")?;
        results = serde_json::from_str(&old)?;
    } else {
        std::fs::write(
            dir.join("migrate.json"),
            serde_json::to_string_pretty(&results)? + "\n",
        )?;
    }
    std::fs::write(
        dir.join("migrate-qemu.json"),
        serde_json::to_string_pretty(&qemu_rows)? + "\n",
    )?;
    if !insecure.is_empty() {
        std::fs::write(
            dir.join("migrate-insecure.json"),
            serde_json::to_string_pretty(&insecure)? + "\n",
        )?;
    }
    let md = report(&results, &qemu_rows) + &crypto_report(&results, &insecure);
    let md_path = match &a.out {
        Some(d) => d.join("bench-migrate.md"),
        None => root().join("docs/bench-migrate.md"),
    };
    std::fs::write(md_path, &md)?;
    print!("{md}");
    drop(c);
    Ok(())
}

/// The crypto's cost: the same runs (120M, capture on) over the secure
/// channel and over `--insecure`, interleaved, per size.
fn crypto_report(results: &[Value], insecure: &[Value]) -> String {
    if insecure.is_empty() {
        return String::new();
    }
    let mut md = String::from(
        "\nWhat the channel's crypto costs (Noise NNpsk0 handshake, AES-256-GCM records; `--insecure`: the same protocol in plain text, no authentication), the same runs interleaved (the first load, capture on): pre-copy rate = round 0's bytes (every touched page) over its time; the downtime's p50 / p99 are nearest ranks over the runs.\n\n| image | runs (secure / insecure) | pre-copy, secure | pre-copy, insecure | ratio | downtime p50 / p99, secure | downtime p50 / p99, insecure | p50 added by the crypto |\n|---|---|---|---|---|---|---|---|\n",
    );
    let mut sizes: Vec<u64> = insecure
        .iter()
        .filter_map(|r| r["size_mib"].as_u64())
        .collect();
    sizes.dedup();
    for size in sizes {
        let secure: Vec<&Value> = results
            .iter()
            .filter(|r| {
                r["size_mib"].as_u64() == Some(size)
                    && r["rate"] == insecure[0]["rate"]
                    && r["capture"] == true
            })
            .flat_map(|r| r["detail"].as_array().into_iter().flatten())
            .collect();
        let plain: Vec<&Value> = insecure
            .iter()
            .filter(|r| r["size_mib"].as_u64() == Some(size))
            .collect();
        let pick = |runs: &[&Value], k: &str| -> Vec<f64> {
            runs.iter().filter_map(|r| r[k].as_f64()).collect()
        };
        let (mut rs, mut ri) = (
            pick(&secure, "precopy_bytes_per_s"),
            pick(&plain, "precopy_bytes_per_s"),
        );
        let (mut ds, mut di) = (pick(&secure, "downtime_ms"), pick(&plain, "downtime_ms"));
        let (rs50, ri50) = (quantile(&mut rs, 0.5), quantile(&mut ri, 0.5));
        let (ds50, di50) = (quantile(&mut ds, 0.5), quantile(&mut di, 0.5));
        md.push_str(&format!(
            "| {size} MB | {} / {} | {:.2} GB/s | {:.2} GB/s | {:.2}x | {:.2} / {:.2} ms | {:.2} / {:.2} ms | {:+.2} ms |\n",
            secure.len(),
            plain.len(),
            rs50 / 1e9,
            ri50 / 1e9,
            rs50 / ri50,
            ds50,
            quantile(&mut ds, 0.99),
            di50,
            quantile(&mut di, 0.99),
            ds50 - di50,
        ));
    }
    md
}

/// p-quantile (0..=1) of `v` (nearest rank).
fn quantile(v: &mut [f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() as f64 * p).ceil() as usize).clamp(1, v.len()) - 1]
}

/// `docs/bench-migrate.md`.
fn report(results: &[Value], qemu_rows: &[Value]) -> String {
    let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
    let mut md = String::from(
        "# Live migration under streaming load\n\nMeasured by `just bench-migrate` on the namespace cluster of one machine (see the README for which: 2 cores, KVM = PVM). The guest runs natively (the runtime enters PVM native mode at boot, under Ferry and under QEMU alike; `cpu` in its `net: up` line). Image size = guest memory the stream app holds with every page touched (`stream ballast=SIZE`). Load: the stream at 120 MB/s (the paper's rate) or as fast as it goes, to a client that verifies every byte and keeps an echoed conversation upstream at 1 MB/s (every byte checked on return).\n\nPer run: *gap* = the largest gap between arrivals at the client from 200 ms before the migration to 500 ms after it (the paper's migration delay); *own gap* = the same stream before the migration, cut into windows of that length: the median of their largest gaps (what the client sees with no migration); *added* = gap - own gap (what the migration costs the client); *downtime* = VMM-measured, source pause to destination running; *worst window* = the smallest 100 ms throughput window around the migration, and before it, against the run's median window; *retrans / resets / errors* = the client's TCP retransmissions and resets (kernel counters) and runs whose stream or echo failed verification, summed over the runs. Medians of the runs unless marked.\n\n| image | load | capture | gap (median / max) | own gap | added (median / max) | VMM downtime | total | client MB/s | retrans / resets / errors | worst window: at migration / before |\n|---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        md.push_str(&format!(
            "| {} MB | {} | {} | {:.1} / {:.1} ms | {:.1} ms | {:.1} / {:.1} ms | {:.2} ms | {:.0} ms | {:.1} | {} / {} / {} | {:.2} / {:.2} |\n",
            r["size_mib"],
            r["rate"].as_str().unwrap_or(""),
            if r["capture"] == true { "on" } else { "off" },
            f(&r["migration_gap_ms_median"]),
            f(&r["migration_gap_ms_max"]),
            f(&r["own_gap_ms_median"]),
            f(&r["added_ms_median"]),
            f(&r["added_ms_max"]),
            f(&r["downtime_ms_median"]),
            f(&r["total_ms_median"]),
            f(&r["client_bytes_per_second_median"]) / 1e6,
            r["retransmits"],
            r["resets"],
            r["errors"],
            f(&r["worst_window_at_migration_median"]),
            f(&r["worst_window_before_median"]),
        ));
    }
    // The issue's aims, over every run with capture on (Ferry's normal
    // mode), per size: median and p99 of the delay.
    md.push_str("\nAgainst the aims (every run with capture on, both loads; p99 is the nearest rank, so the largest value for fewer than 100 runs). *Same measure, no migration*: *added* computed for each window of the same runs before their migration (its largest gap less the median of them): what the client's largest gap varies by with nothing moving, the floor an added gap is read against on this host.\n\n| image | runs | gap p50 / p99 | added p50 / p99 | same measure, no migration: p50 / p99 (windows) | VMM downtime p50 / p99 |\n|---|---|---|---|---|---|\n");
    let mut sizes: Vec<u64> = results
        .iter()
        .filter_map(|r| r["size_mib"].as_u64())
        .collect();
    sizes.dedup();
    for size in sizes {
        let pick = |k: &str| -> Vec<f64> {
            results
                .iter()
                .filter(|r| r["size_mib"].as_u64() == Some(size) && r["capture"] == true)
                .flat_map(|r| r["detail"].as_array().cloned().unwrap_or_default())
                .filter_map(|d| d[k].as_f64())
                .collect()
        };
        let (mut g, mut a, mut d) = (
            pick("migration_gap_ms"),
            pick("added_ms"),
            pick("downtime_ms"),
        );
        let mut null: Vec<f64> = results
            .iter()
            .filter(|r| r["size_mib"].as_u64() == Some(size) && r["capture"] == true)
            .flat_map(|r| r["detail"].as_array().cloned().unwrap_or_default())
            .flat_map(|d| {
                d["added_without_migration_ms"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
            })
            .filter_map(|v| v.as_f64())
            .collect();
        md.push_str(&format!(
            "| {size} MB | {} | {:.1} / {:.1} ms | {:.1} / {:.1} ms | {:.1} / {:.1} ms ({}) | {:.2} / {:.2} ms |\n",
            g.len(),
            quantile(&mut g, 0.5),
            quantile(&mut g, 0.99),
            quantile(&mut a, 0.5),
            quantile(&mut a, 0.99),
            quantile(&mut null, 0.5),
            quantile(&mut null, 0.99),
            null.len(),
            quantile(&mut d, 0.5),
            quantile(&mut d, 0.99),
        ));
    }
    // Fig. 6: the windows.
    md.push_str("\nThe client's TCP windows around the migration (the paper's Fig. 6; TCP_INFO every 10 ms, from the migration's start to 1 s after its end): the upstream sender's cwnd in segments (median and lowest before the migration / lowest from its start to 1 s after; medians of the runs; an app-limited sender's cwnd swings on its own, so the lowest before is the baseline), its retransmissions then, and the lowest window each side advertised on the stream as a fraction of before (client's `rcv_wnd` / service's `snd_wnd`). A migration that cost the client a timeout would show cwnd falling to 1 and retransmissions.\n\n| image | load | capture | echo cwnd: before (median / lowest) / lowest at migration | echo retransmissions | stream windows, lowest / before: client / service |\n|---|---|---|---|---|---|\n");
    for r in results {
        let t = &r["tcp"];
        md.push_str(&format!(
            "| {} MB | {} | {} | {:.0} / {:.0} / {:.0} | {} | {:.2} / {:.2} |\n",
            r["size_mib"],
            r["rate"].as_str().unwrap_or(""),
            if r["capture"] == true { "on" } else { "off" },
            f(&t["echo_cwnd_before"]),
            f(&t["echo_cwnd_min_before"]),
            f(&t["echo_cwnd_min_at_migration"]),
            f(&t["echo_retrans_at_migration"]),
            f(&t["rcv_wnd_min_ratio"]),
            f(&t["snd_wnd_min_ratio"]),
        ));
    }
    if !qemu_rows.is_empty() {
        md.push_str(&format!("\nQEMU's own live migration (`migrate tcp:`, with `downtime-limit` {QEMU_DOWNTIME_LIMIT_MS} ms as Ferry's budget and `max-bandwidth` {} GB/s, i.e. unlimited; QEMU's defaults are 300 ms and 128 MiB/s), same image, topology and load (120M), no capture.", QEMU_MAX_BANDWIDTH / 1_000_000_000));
        md.push_str(" The guest runs native under QEMU too; QEMU does not save PVM's control MSR (it is not in KVM's MSR index list), and *guest after move* says how the migrated guest ran (KVM's `insn_emulation` over 0.5 s, via QMP `query-stats`):\n\n| image | gap (median) | own gap | added | QEMU-reported downtime | total | retrans / resets / errors | echo cwnd: before / lowest | guest after move |\n|---|---|---|---|---|---|---|---|---|\n");
        for r in qemu_rows {
            md.push_str(&format!(
                "| {} MB | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {:.0} ms | {} / {} / {} | {:.0} / {:.0} | {} |\n",
                r["size_mib"],
                f(&r["migration_gap_ms_median"]),
                f(&r["own_gap_ms_median"]),
                f(&r["added_ms_median"]),
                f(&r["downtime_ms_median"]),
                f(&r["total_ms_median"]),
                r["retransmits"],
                r["resets"],
                r["errors"],
                f(&r["tcp"]["echo_cwnd_before"]),
                f(&r["tcp"]["echo_cwnd_min_at_migration"]),
                r["guest_after_move"].as_str().unwrap_or("?"),
            ));
        }
    }
    md.push_str("\nPlots: `docs/bench-migrate-delay.png` (gap and downtime against size), `docs/bench-migrate-throughput.png` (client throughput over time around the migration, largest size), `docs/bench-migrate-window.png` (the client's windows and cwnd over time around the migration, per size).\n");
    md
}
