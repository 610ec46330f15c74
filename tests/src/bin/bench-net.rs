//! `bench-net`: guest-to-client streaming throughput and `redis-benchmark`
//! request rate against `kv`, on the namespace cluster, for the same work
//! done three ways: the unikernel on Ferry's VMM, a native Linux process
//! in hostA's namespace (`stream-native`, `kv-native`, which share the
//! apps' code), and the same unikernel image under QEMU/KVM with
//! virtio-net-pci on the same tap. Prints a table with ratios to native
//! and writes `target/bench/net.json`.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_tests::cluster::{self, Cluster, GATEWAY, SERVICE_MAC, VIP, VIP_CIDR};
use ferry_tests::{image, json_u64, root};

#[derive(Parser)]
#[command(about = "Streaming throughput and redis-benchmark rate: Ferry vs native Linux vs QEMU")]
struct Args {
    /// Seconds of streaming per run.
    #[arg(long, default_value_t = 8.0)]
    seconds: f64,
    /// redis-benchmark requests per test (SET and GET).
    #[arg(long, default_value_t = 1000)]
    requests: u32,
    /// redis-benchmark parallel connections.
    #[arg(long, default_value_t = 10)]
    clients: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Ferry,
    Native,
    Qemu,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ferry => "ferry",
            Target::Native => "native",
            Target::Qemu => "qemu",
        }
    }
}

/// Starts the server for `app` ("stream" or "kv") as `target` on hostA.
fn start(c: &mut Cluster, target: Target, app: &str, log: &Path) -> Result<u32> {
    let (ready, cmd) = match target {
        Target::Ferry => {
            let mut cmd = c.command("hostA", ferry_tests::ferry_bin());
            cmd.arg("run")
                .arg(image(app))
                .args(cluster::service_args("64M"));
            ("listening", cmd)
        }
        Target::Native => {
            let bin = root().join(format!("target/release/{app}-native"));
            let port = if app == "kv" { "6379" } else { "5001" };
            let mut cmd = c.command("hostA", bin);
            cmd.arg(format!("0.0.0.0:{port}"));
            ("listening", cmd)
        }
        Target::Qemu => ("listening", c.qemu_service("hostA", &image(app), "64M", "")),
    };
    let pid = c.spawn(cmd, log)?;
    cluster::wait_for_line(log, ready, Duration::from_secs(30), pid)?;
    Ok(pid)
}

/// Gives hostA itself the service address (for the native runs) or takes it away.
fn host_owns_vip(c: &Cluster, on: bool) -> Result<()> {
    let ns = c.ns("hostA");
    let ip = |args: &[&str]| -> Result<()> {
        let st = Command::new("ip").args(["-n", &ns]).args(args).status()?;
        if !st.success() {
            bail!("ip {args:?} failed");
        }
        Ok(())
    };
    if on {
        ip(&["link", "set", "brv", "address", SERVICE_MAC])?;
        ip(&["addr", "add", VIP_CIDR, "dev", "brv"])?;
        ip(&["route", "add", "default", "via", GATEWAY])?;
    } else {
        ip(&["addr", "del", VIP_CIDR, "dev", "brv"])?;
        ip(&["link", "set", "brv", "address", "02:00:00:00:01:02"])?;
    }
    Ok(())
}

fn stream_rate(c: &Cluster, seconds: f64) -> Result<f64> {
    let out = c
        .stream_client()
        .args(["--seconds", &seconds.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("\"error\":null") {
        bail!("stream-client: {text}");
    }
    Ok(json_u64(&text, "bytes_per_second").context("no rate")? as f64)
}

fn redis_rates(c: &Cluster, requests: u32, clients: u32) -> Result<(f64, f64)> {
    let out = c
        .command("client", "timeout")
        .args([
            "300",
            "redis-benchmark",
            "-h",
            VIP,
            "-n",
            &requests.to_string(),
            "-c",
            &clients.to_string(),
            "-t",
            "set,get",
            "--csv",
        ])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let rate = |name: &str| -> Option<f64> {
        text.lines()
            .find(|l| l.starts_with(&format!("\"{name}\"")))?
            .split(',')
            .nth(1)?
            .trim_matches('"')
            .parse()
            .ok()
    };
    match (rate("SET"), rate("GET")) {
        (Some(s), Some(g)) => Ok((s, g)),
        _ => bail!("redis-benchmark gave no rates: {text}"),
    }
}

struct Row {
    target: Target,
    stream: Option<f64>,
    set: Option<f64>,
    get: Option<f64>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut c = Cluster::up("fbench").context("building the cluster (root needed)")?;
    let logs = cluster::log_dir("bench-net");
    let mut rows = Vec::new();
    for target in [Target::Ferry, Target::Native, Target::Qemu] {
        if target == Target::Native {
            host_owns_vip(&c, true)?;
        }
        let mut row = Row {
            target,
            stream: None,
            set: None,
            get: None,
        };
        for app in ["stream", "kv"] {
            let log = logs.join(format!("{}-{app}.log", target.name()));
            let pid = match start(&mut c, target, app, &log) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("bench-net: {} {app}: {e:#}", target.name());
                    continue;
                }
            };
            let r = if app == "stream" {
                stream_rate(&c, a.seconds).map(|r| row.stream = Some(r))
            } else {
                redis_rates(&c, a.requests, a.clients).map(|(s, g)| {
                    row.set = Some(s);
                    row.get = Some(g);
                })
            };
            if let Err(e) = r {
                eprintln!("bench-net: {} {app}: {e:#}", target.name());
            }
            c.stop(pid, Duration::from_secs(3));
        }
        if target == Target::Native {
            host_owns_vip(&c, false)?;
        }
        eprintln!("bench-net: {} done", target.name());
        rows.push(row);
    }
    let native = rows.iter().find(|r| r.target == Target::Native);
    let ratio = |v: Option<f64>, n: Option<f64>| match (v, n) {
        (Some(v), Some(n)) if n > 0.0 => format!("{:.4}x", v / n),
        _ => "-".into(),
    };
    let fmt = |v: Option<f64>, div: f64, unit: &str| {
        v.map_or("failed".into(), |v| format!("{:.2} {unit}", v / div))
    };
    println!(
        "\n| target | stream (guest -> client) | vs native | redis SET | vs native | redis GET | vs native |"
    );
    println!("|---|---|---|---|---|---|---|");
    for r in &rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.target.name(),
            fmt(r.stream, 1e6, "MB/s"),
            ratio(r.stream, native.and_then(|n| n.stream)),
            fmt(r.set, 1.0, "req/s"),
            ratio(r.set, native.and_then(|n| n.set)),
            fmt(r.get, 1.0, "req/s"),
            ratio(r.get, native.and_then(|n| n.get)),
        );
    }
    println!(
        "\n{} s of streaming per run; redis-benchmark -n {} -c {} -t set,get. The unikernel's guest code is emulated instruction by instruction on this KVM (docs/pvm-emulation.md).",
        a.seconds, a.requests, a.clients
    );
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            let n = |v: Option<f64>| v.map_or("null".into(), |v| format!("{v:.1}"));
            format!(
                "{{\"target\":\"{}\",\"stream_bytes_per_second\":{},\"redis_set_rps\":{},\"redis_get_rps\":{}}}",
                r.target.name(),
                n(r.stream),
                n(r.set),
                n(r.get)
            )
        })
        .collect();
    let dir = root().join("target/bench");
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("net.json"), format!("[{}]\n", json.join(",")))?;
    Ok(())
}
