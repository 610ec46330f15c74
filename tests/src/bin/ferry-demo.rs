//! `ferry-demo`: the README's main job. Builds the namespace cluster,
//! starts `stream` on hostA sending (up to 120 MB/s, the paper's rate) to a
//! verifying client, with a second, echoed conversation flowing upstream;
//! live-migrates the service hostA -> hostB -> hostA while both flow; then
//! prints the client-side report and writes `target/demo/report.json`.
use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_tests::cluster::{Cluster, VIP};
use ferry_tests::gaps;
use ferry_tests::{image, json_u64, root};

#[derive(Parser)]
#[command(about = "Stream to a client, live-migrate the service twice, report what the client saw")]
struct Args {
    /// Seconds the client runs.
    #[arg(long, default_value_t = 12.0)]
    seconds: f64,
    /// Sending rate of the stream app (the paper's 120 MB/s by default;
    /// the emulated guest here sends what it can, see docs/pvm-emulation.md).
    #[arg(long, default_value = "120M")]
    rate: String,
    /// Downtime budget per migration, ms.
    #[arg(long, default_value_t = 1)]
    downtime_ms: u64,
    /// The stream app: `stream` (Ferry's runtime) or `hermit-stream` (std
    /// Rust on RustyHermit), from images/out/.
    #[arg(long, default_value = "stream")]
    app: String,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let dir = root().join("target/demo");
    std::fs::create_dir_all(&dir)?;
    for e in std::fs::read_dir(&dir)?.flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    println!("demo: building the cluster (namespaces fdemo-client, -router, -hostA, -hostB)");
    let mut c = Cluster::up("fdemo").context("building the cluster (root needed)")?;
    let api_a = dir.join("hostA.sock");
    let rate_arg = format!("rate={}", a.rate);
    c.start_vm_with(
        "hostA",
        &image(&a.app),
        "64M",
        &["--api", api_a.to_str().expect("utf-8")],
        &[&rate_arg, "echo=7"],
        &dir.join("hostA.log"),
        "listening",
    )?;
    println!(
        "demo: {} runs on hostA as {VIP} ({rate_arg}, echo on port 7)",
        a.app
    );
    let before = c.client_tcp_counters()?;
    let client_out = dir.join("client.json");
    let mut client = c
        .stream_client()
        .args([
            "--seconds",
            &a.seconds.to_string(),
            "--echo",
            &format!("{VIP}:7"),
            "--echo-rate",
            "1000000",
        ])
        .args(gaps::CLIENT_ARGS)
        .stdout(std::fs::File::create(&client_out)?)
        .stderr(Stdio::inherit())
        .spawn()?;
    let t0 = Instant::now();
    let mut migrations = Vec::new();
    let mut errors = Vec::new();
    let mut api = api_a;
    let plan = [
        ("hostA", "hostB", a.seconds / 3.0),
        ("hostB", "hostA", 2.0 * a.seconds / 3.0),
    ];
    for (n, (from, to, at)) in plan.into_iter().enumerate() {
        let wait = at - t0.elapsed().as_secs_f64();
        if wait > 0.0 {
            std::thread::sleep(Duration::from_secs_f64(wait));
        }
        let to_api: PathBuf = dir.join(format!("{to}-{n}.sock"));
        let port = 7000 + n as u16;
        c.start_receiver(to, port, &to_api, &[], &dir.join(format!("{to}-{n}.log")))?;
        let started = t0.elapsed().as_secs_f64();
        print!("demo: live-migrating {from} -> {to} at {started:.1} s ... ");
        match c.migrate(
            &api,
            to,
            port,
            &["--downtime-ms", &a.downtime_ms.to_string()],
        ) {
            Ok(report) => {
                let v: serde_json::Value = serde_json::from_str(&report)?;
                println!(
                    "done: {} rounds, {:.2} MiB {}, downtime {:.2} ms (VMM), total {:.1} ms",
                    v["rounds"],
                    v["bytes"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                    if v["sealed"] == true {
                        "authenticated and encrypted"
                    } else {
                        "IN PLAIN TEXT"
                    },
                    v["downtime_ms"].as_f64().unwrap_or(0.0),
                    v["total_ms"].as_f64().unwrap_or(0.0)
                );
                migrations.push((from, to, started, v));
                api = to_api;
            }
            Err(e) => {
                println!("FAILED: {e}");
                errors.push(format!("migration {from} -> {to}: {e}"));
                break;
            }
        }
    }
    // Counters just before the client hangs up (closing a socket with
    // unread data, as it does, resets it: that is not the service's doing).
    let until_end = a.seconds - 0.4 - t0.elapsed().as_secs_f64();
    if until_end > 0.0 {
        std::thread::sleep(Duration::from_secs_f64(until_end));
    }
    let d = c.client_tcp_counters()?.since(&before);
    let status = client.wait()?;
    let text = std::fs::read_to_string(&client_out)?;
    let cv: serde_json::Value =
        serde_json::from_str(text.trim()).with_context(|| format!("client output: {text}"))?;
    if !status.success() {
        errors.push(format!(
            "client: {}",
            cv["error"].as_str().unwrap_or("failed")
        ));
    }
    // The paper's migration delay: the largest gap between arrivals at the
    // client around each migration, beside the gap the same stream shows
    // with no migration (the guest's own bursts).
    let mut per_migration = Vec::new();
    for (from, to, at, v) in &migrations {
        let g = gaps::around(&cv, *at, v["total_ms"].as_f64().unwrap_or(0.0) / 1e3);
        per_migration.push(serde_json::json!({
            "from": from, "to": to, "at_s": at,
            "client_max_gap_ms": g.gap_ms,
            "own_gap_ms": g.own_gap_ms,
            "added_ms": g.added_ms(),
            "vmm_downtime_ms": v["downtime_ms"], "total_ms": v["total_ms"],
            "pause_phases_ms": v["pause_phases_ms"], "encrypted": v["sealed"],
            "rounds": v["rounds"], "bytes": v["bytes"],
            "captured_frames": v["destination"]["captured"],
        }));
    }
    let bytes_verified = json_u64(&text, "bytes_verified").unwrap_or(0);
    let echo_verified = json_u64(&text, "echo_bytes_verified").unwrap_or(0);
    let report = serde_json::json!({
        "max_gap_ms": cv["max_gap_ms"],
        "retransmits": d.retrans_segs,
        "dup_segments_received": d.dup_segs_received,
        "resets": d.estab_resets + d.out_rsts,
        "bytes_verified": bytes_verified,
        "echo_bytes_verified": echo_verified,
        "stream_bytes_per_second": cv["bytes_per_second"],
        "migrations": per_migration,
        "errors": errors,
    });
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    println!("\n== client-side report ({} s of streaming)", a.seconds);
    for m in &per_migration {
        let gap = m["client_max_gap_ms"].as_f64().unwrap_or(0.0);
        let own = m["own_gap_ms"].as_f64().unwrap_or(f64::NAN);
        let added = m["added_ms"].as_f64().unwrap_or(f64::NAN);
        println!(
            "  {} -> {} at {:.1} s: largest gap between arrivals {} (the stream's own, no migration: {}; added {}); VMM-measured downtime {:.2} ms; {} frames captured",
            m["from"].as_str().unwrap_or(""),
            m["to"].as_str().unwrap_or(""),
            m["at_s"].as_f64().unwrap_or(0.0),
            gaps::show(gap),
            gaps::show(own),
            if gap < 1.0 {
                "nothing measurable".to_string()
            } else {
                format!("{added:.1} ms")
            },
            m["vmm_downtime_ms"].as_f64().unwrap_or(0.0),
            m["captured_frames"]
        );
    }
    println!(
        "  largest gap over the whole run: {}",
        gaps::show(cv["max_gap_ms"].as_f64().unwrap_or(0.0))
    );
    println!(
        "  stream: {bytes_verified} bytes verified ({:.2} MB/s); echo: {echo_verified} bytes verified",
        cv["bytes_per_second"].as_f64().unwrap_or(0.0) / 1e6
    );
    println!(
        "  client TCP counters: {} segments retransmitted, {} duplicate segments received, {} resets",
        d.retrans_segs,
        d.dup_segs_received,
        d.estab_resets + d.out_rsts
    );
    println!(
        "  errors: {}",
        if errors.is_empty() {
            "none".to_string()
        } else {
            errors.join("; ")
        }
    );
    println!("  report: {}", dir.join("report.json").display());
    drop(c);
    if !errors.is_empty() {
        bail!("the demo saw errors");
    }
    Ok(())
}
