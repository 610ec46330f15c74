//! `bench-net`: guest-to-client streaming throughput and `redis-benchmark`
//! request rate against `kv`, on the namespace cluster, for the same work
//! done three ways: the unikernel on Ferry's VMM, a native Linux process
//! in hostA's namespace (`stream-native`, `kv-native`, which share the
//! apps' code), and the same unikernel image under QEMU/KVM with
//! virtio-net-pci on the same tap. Prints a table with ratios to native,
//! and for Ferry the vCPU's exits and interrupts per MB streamed and per
//! redis request (from `ferry status`), and writes `target/bench/net.json`.
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_tests::cluster::{self, Cluster, GATEWAY, SERVICE_MAC, VIP, VIP_CIDR, ferry_ctl};
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
    /// Measure Ferry only (not the native process nor QEMU).
    #[arg(long)]
    ferry_only: bool,
    /// Write net.json into this directory instead of target/bench (for
    /// comparisons, e.g. `just bench-overflow`; `$FERRY_BIN` picks the VMM).
    #[arg(long)]
    out: Option<std::path::PathBuf>,
}

#[derive(Clone, Copy, PartialEq)]
enum Target {
    Ferry,
    /// Ferry's VMM with the std apps on RustyHermit (`hermit-stream`; there
    /// is no Hermit kv, so no redis numbers).
    Hermit,
    Native,
    Qemu,
}

impl Target {
    fn name(self) -> &'static str {
        match self {
            Target::Ferry => "ferry",
            Target::Hermit => "ferry, hermit",
            Target::Native => "native",
            Target::Qemu => "qemu",
        }
    }

    /// The apps measured on this target.
    fn apps(self) -> &'static [&'static str] {
        match self {
            Target::Hermit => &["stream"],
            _ => &["stream", "kv"],
        }
    }

    /// A VM under Ferry's VMM (with a control socket and counters).
    fn ferry_vm(self) -> bool {
        matches!(self, Target::Ferry | Target::Hermit)
    }
}

/// Starts the server for `app` ("stream" or "kv") as `target` on hostA.
/// A Ferry VM gets a control socket at `api`.
fn start(c: &mut Cluster, target: Target, app: &str, log: &Path, api: &Path) -> Result<u32> {
    let (ready, cmd) = match target {
        Target::Ferry | Target::Hermit => {
            let img = if target == Target::Hermit {
                image(&format!("hermit-{app}"))
            } else {
                image(app)
            };
            let mut cmd = c.command("hostA", ferry_tests::ferry_bin());
            cmd.arg("run")
                .arg(img)
                .args(cluster::service_args("64M"))
                .arg("--api")
                .arg(api);
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

/// A Ferry VM's vCPU exits, interrupts injected into it, and interrupts
/// its network card raised, so far.
#[derive(Clone, Copy, Default)]
struct Counters {
    exits: u64,
    injections: u64,
    card_interrupts: u64,
}

impl Counters {
    fn read(api: &Path) -> Result<Counters> {
        let text = ferry_ctl(&["status", "--json", "--api"], api)?;
        let v: serde_json::Value = serde_json::from_str(&text).context("status is not JSON")?;
        let get = |a: &str, b: &str| {
            v[a][b]
                .as_u64()
                .with_context(|| format!("no {a}.{b} in {text}"))
        };
        Ok(Counters {
            exits: get("kvm", "exits")?,
            injections: get("kvm", "irq_injections")?,
            card_interrupts: get("net", "interrupts")?,
        })
    }

    fn since(self, before: Counters) -> Counters {
        Counters {
            exits: self.exits.saturating_sub(before.exits),
            injections: self.injections.saturating_sub(before.injections),
            card_interrupts: self.card_interrupts.saturating_sub(before.card_interrupts),
        }
    }
}

/// The stream's rate (bytes per second) and the bytes it verified.
fn stream_rate(c: &Cluster, seconds: f64) -> Result<(f64, u64)> {
    let out = c
        .stream_client()
        .args(["--seconds", &seconds.to_string()])
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() || !text.contains("\"error\":null") {
        bail!("stream-client: {text}");
    }
    Ok((
        json_u64(&text, "bytes_per_second").context("no rate")? as f64,
        json_u64(&text, "bytes_verified").context("no byte count")?,
    ))
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
    /// How the guest's code ran (its `net: up` line), or "linux process".
    mode: String,
    stream: Option<f64>,
    set: Option<f64>,
    get: Option<f64>,
    /// Ferry only: counters per MB streamed, and per redis request.
    per_mb: Option<Counters>,
    per_mb_bytes: u64,
    per_request: Option<(Counters, u64)>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    let mut c = Cluster::up("fbench").context("building the cluster (root needed)")?;
    let logs = cluster::log_dir("bench-net");
    let mut rows = Vec::new();
    let targets: &[Target] = if a.ferry_only {
        &[Target::Ferry]
    } else {
        &[Target::Ferry, Target::Hermit, Target::Native, Target::Qemu]
    };
    for &target in targets {
        if target == Target::Native {
            host_owns_vip(&c, true)?;
        }
        let mut row = Row {
            target,
            mode: if target == Target::Native {
                "linux process".into()
            } else {
                "?".into()
            },
            stream: None,
            set: None,
            get: None,
            per_mb: None,
            per_mb_bytes: 0,
            per_request: None,
        };
        for &app in target.apps() {
            let log = logs.join(format!("{}-{app}.log", target.name()));
            let api = logs.join(format!("{}-{app}.sock", target.name()));
            let pid = match start(&mut c, target, app, &log, &api) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("bench-net: {} {app}: {e:#}", target.name());
                    continue;
                }
            };
            if target == Target::Hermit {
                row.mode = ferry_ctl(&["status", "--json", "--api"], &api)
                    .ok()
                    .and_then(|t| {
                        let v: serde_json::Value = serde_json::from_str(&t).ok()?;
                        Some(format!("RustyHermit, {}", v["cpu_mode"].as_str()?))
                    })
                    .unwrap_or_else(|| "?".into());
            } else if target != Target::Native {
                row.mode = ferry_tests::guest_cpu_mode(&log).unwrap_or_else(|| "?".into());
            }
            let before = target
                .ferry_vm()
                .then(|| Counters::read(&api))
                .transpose()?;
            let r = if app == "stream" {
                stream_rate(&c, a.seconds).map(|(r, bytes)| {
                    row.stream = Some(r);
                    row.per_mb_bytes = bytes;
                })
            } else {
                redis_rates(&c, a.requests, a.clients).map(|(s, g)| {
                    row.set = Some(s);
                    row.get = Some(g);
                })
            };
            if let Some(before) = before {
                let used = Counters::read(&api)?.since(before);
                if app == "stream" {
                    row.per_mb = Some(used);
                } else {
                    row.per_request = Some((used, 2 * u64::from(a.requests)));
                }
            }
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
        "\n| target | guest code | stream (guest -> client) | vs native | redis SET | vs native | redis GET | vs native |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &rows {
        let kv = r.target.apps().contains(&"kv");
        let redis = |v: Option<f64>| if kv { fmt(v, 1.0, "req/s") } else { "-".into() };
        println!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |",
            r.target.name(),
            r.mode,
            fmt(r.stream, 1e6, "MB/s"),
            ratio(r.stream, native.and_then(|n| n.stream)),
            redis(r.set),
            ratio(r.set, native.and_then(|n| n.set)),
            redis(r.get),
            ratio(r.get, native.and_then(|n| n.get)),
        );
    }
    println!(
        "\n{} s of streaming per run; redis-benchmark -n {} -c {} -t set,get. Guest code: what the runtime reported at boot (on PVM it enters native mode under any VMM of this KVM; docs/pvm-emulation.md is the fallback); for RustyHermit, what `ferry status` says (std apps: `hermit-stream`; there is no Hermit kv).",
        a.seconds, a.requests, a.clients
    );
    println!("\n| Ferry vCPU | exits | interrupts injected | card interrupts |");
    println!("|---|---|---|---|");
    for r in rows.iter().filter(|r| r.target.ferry_vm()) {
        if let Some(u) = r.per_mb {
            let mb = (r.per_mb_bytes as f64 / 1e6).max(1e-9);
            println!(
                "| {}: per MB streamed ({:.0} MB) | {:.1} | {:.1} | {:.1} |",
                r.target.name(),
                mb,
                u.exits as f64 / mb,
                u.injections as f64 / mb,
                u.card_interrupts as f64 / mb
            );
        }
        if let Some((u, n)) = r.per_request {
            let n = n.max(1) as f64;
            println!(
                "| {}: per redis request ({n:.0}) | {:.2} | {:.2} | {:.2} |",
                r.target.name(),
                u.exits as f64 / n,
                u.injections as f64 / n,
                u.card_interrupts as f64 / n
            );
        }
    }
    let json: Vec<String> = rows
        .iter()
        .map(|r| {
            let n = |v: Option<f64>| v.map_or("null".into(), |v| format!("{v:.1}"));
            let per_mb = r.per_mb.map_or("null".into(), |u| {
                let mb = (r.per_mb_bytes as f64 / 1e6).max(1e-9);
                format!(
                    "{{\"exits\":{:.2},\"injections\":{:.2},\"card_interrupts\":{:.2}}}",
                    u.exits as f64 / mb,
                    u.injections as f64 / mb,
                    u.card_interrupts as f64 / mb
                )
            });
            format!(
                "{{\"target\":\"{}\",\"guest_code\":{:?},\"stream_bytes_per_second\":{},\"redis_set_rps\":{},\"redis_get_rps\":{},\"per_mb\":{per_mb}}}",
                r.target.name(),
                r.mode,
                n(r.stream),
                n(r.set),
                n(r.get)
            )
        })
        .collect();
    let dir = a.out.clone().unwrap_or_else(|| root().join("target/bench"));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("net.json"), format!("[{}]\n", json.join(",")))?;
    Ok(())
}
