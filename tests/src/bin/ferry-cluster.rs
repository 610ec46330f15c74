//! `ferry-cluster`: the single-IP-address cluster in network namespaces
//! (`ferry-client`, `ferry-router`, `ferry-hostA`, `ferry-hostB`), for
//! `just cluster-up`, `just cluster-down` and `just run-app`.
use std::os::unix::process::CommandExt;
use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ferry_tests::cluster::{self, Cluster, SERVICE_MAC, TAP, VIP};

const PREFIX: &str = "ferry";

#[derive(Parser, Debug)]
#[command(about = "Build, inspect and use Ferry's namespace cluster (needs root)")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the cluster (no-op if it is up); prints the service IP.
    Up,
    /// End every process in the cluster's namespaces, then remove them.
    Down,
    /// Say whether the cluster is up and what runs in it.
    Status,
    /// Remove what earlier test runs left behind (their namespaces, with
    /// whatever still runs in them), e.g. after a test run was killed.
    CleanTests,
    /// Live-migrate the VM that `run` started to the other host (and back
    /// when run again); the destination keeps running it in the background.
    Migrate {
        /// Downtime budget in milliseconds.
        #[arg(long, default_value_t = 1)]
        downtime_ms: u64,
    },
    /// Run an app image as the service on a host, in the foreground
    /// (Ctrl-C stops it); brings the cluster up first if needed.
    Run {
        /// The image, e.g. images/out/kv.
        image: std::path::PathBuf,
        /// Which host runs it.
        #[arg(long, default_value = "hostA", value_parser = ["hostA", "hostB"])]
        host: String,
        /// Guest memory.
        #[arg(long, default_value = "64M")]
        memory: String,
        /// A setting for the guest runtime (`ferry run --guest-arg`), e.g.
        /// net.stats=1; repeatable.
        #[arg(long = "guest-arg", value_name = "KEY=VALUE")]
        guest_args: Vec<String>,
        /// The app's arguments, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
}

fn pids(ns: &str) -> Vec<i32> {
    std::process::Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

const NODES: [&str; 4] = ["client", "router", "hostA", "hostB"];

fn up() -> Result<()> {
    if Cluster::exists(PREFIX) {
        println!("cluster: already up");
    } else {
        Cluster::up(PREFIX)?.keep();
        println!("cluster: up (namespaces ferry-client, ferry-router, ferry-hostA, ferry-hostB)");
    }
    println!(
        "cluster: service IP {VIP}; clients run in ferry-client, e.g. `ip netns exec ferry-client curl http://{VIP}/`"
    );
    Ok(())
}

fn down() -> Result<()> {
    for n in NODES {
        for pid in pids(&format!("{PREFIX}-{n}")) {
            // SAFETY: kill(2) on a PID the kernel just listed in our namespace.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    for n in NODES {
        for pid in pids(&format!("{PREFIX}-{n}")) {
            // SAFETY: as above; whatever did not end on SIGTERM.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
    cluster::remove(PREFIX);
    println!("cluster: down");
    Ok(())
}

/// The control socket of the VM on `host` (`run` and `migrate` use it).
fn api_path(host: &str) -> std::path::PathBuf {
    std::path::Path::new("/run/ferry").join(format!("{host}.sock"))
}

/// Moves the cluster's VM to the other host.
fn migrate(downtime_ms: u64) -> Result<()> {
    let alive = |h: &str| {
        let p = api_path(h);
        p.exists() && ferry_tests::cluster::ferry_ctl(&["status", "--json", "--api"], &p).is_ok()
    };
    let (from, to, to_ip) = if alive("hostA") {
        ("hostA", "hostB", cluster::MIGRATION_IPS[1])
    } else if alive("hostB") {
        ("hostB", "hostA", cluster::MIGRATION_IPS[0])
    } else {
        bail!("no VM runs in the cluster: start one with `just run-app APP`");
    };
    let to_api = api_path(to);
    let _ = std::fs::remove_file(&to_api);
    let key = Cluster::attach(PREFIX)?.key().to_path_buf();
    let log = ferry_tests::root().join(format!("target/cluster/{to}.log"));
    std::fs::create_dir_all(log.parent().expect("dir"))?;
    let out = std::fs::File::create(&log)?;
    let mut receiver = std::process::Command::new("ip")
        .args(["netns", "exec", &format!("{PREFIX}-{to}")])
        .arg(ferry_tests::ferry_bin())
        .args([
            "receive",
            "--once",
            "--name",
            to,
            "--listen",
            &format!("{to_ip}:7000"),
            "--tap",
            TAP,
            "--key",
        ])
        .arg(&key)
        .arg("--api")
        .arg(&to_api)
        .stdin(std::process::Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out)
        .spawn()
        .context("starting ferry receive")?;
    cluster::wait_for_line(
        &log,
        "waiting for VMs",
        std::time::Duration::from_secs(10),
        receiver.id(),
    )?;
    println!(
        "live-migrate: {from} -> {to} (the VM's console continues in {})",
        log.display()
    );
    let st = std::process::Command::new(ferry_tests::ferry_bin())
        .args([
            "migrate",
            "--to",
            &format!("{to_ip}:7000"),
            "--downtime-ms",
            &downtime_ms.to_string(),
            "--key",
        ])
        .arg(&key)
        .arg("--api")
        .arg(api_path(from))
        .status()?;
    if !st.success() {
        let _ = receiver.kill();
        bail!("the migration failed; the VM runs on {from}");
    }
    Ok(())
}

fn hint(app: &str) -> String {
    match app {
        "kv" => format!("ip netns exec ferry-client redis-cli -h {VIP} -p 6379"),
        "http" => format!("ip netns exec ferry-client curl http://{VIP}/"),
        "echo" => format!(
            "ip netns exec ferry-client python3 -c \"import socket; s=socket.create_connection(('{VIP}',7)); s.sendall(b'hi'); print(s.recv(9))\""
        ),
        "stream" => format!(
            "ip netns exec ferry-client target/release/stream-client {VIP}:5001 --seconds 10"
        ),
        _ => format!("ip netns exec ferry-client <client> {VIP}"),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let r = match cli.command {
        Cmd::Up => up(),
        Cmd::Down => down(),
        Cmd::CleanTests => {
            let names = std::fs::read_dir("/run/netns")
                .map(|d| {
                    d.flatten()
                        .filter_map(|e| e.file_name().into_string().ok())
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default();
            let mut prefixes: Vec<String> = names
                .iter()
                .filter_map(|n| n.rsplit_once('-').map(|(p, _)| p.to_string()))
                .filter(|p| {
                    ["ft", "fs", "fm", "fx"]
                        .iter()
                        .any(|t| p.starts_with(t) && p[2..].bytes().all(|b| b.is_ascii_digit()))
                })
                .collect();
            prefixes.sort();
            prefixes.dedup();
            for p in &prefixes {
                cluster::end_namespace_processes(p);
                cluster::remove(p);
            }
            if !prefixes.is_empty() {
                println!(
                    "cluster: removed {} clusters left by earlier test runs",
                    prefixes.len()
                );
            }
            Ok(())
        }
        Cmd::Migrate { downtime_ms } => migrate(downtime_ms),
        Cmd::Status => {
            if Cluster::exists(PREFIX) {
                println!("cluster: up, service IP {VIP}");
                for n in NODES {
                    let p = pids(&format!("{PREFIX}-{n}"));
                    if !p.is_empty() {
                        println!("cluster: {PREFIX}-{n} runs PIDs {p:?}");
                    }
                }
            } else {
                println!("cluster: down");
            }
            Ok(())
        }
        Cmd::Run {
            image,
            host,
            memory,
            guest_args,
            args,
        } => (|| -> Result<()> {
            if !image.exists() {
                bail!(
                    "{} does not exist (build it with `just build-image APP`)",
                    image.display()
                );
            }
            up()?;
            let ns = format!("{PREFIX}-{host}");
            if !pids(&ns).is_empty() {
                bail!(
                    "{ns} already runs a process (PIDs {:?}); stop it or run `just cluster-down`",
                    pids(&ns)
                );
            }
            let app = image.file_name().and_then(|n| n.to_str()).unwrap_or("app");
            println!(
                "run-app: {app} on {ns} as {VIP} ({SERVICE_MAC}); reach it from the client namespace:"
            );
            println!("run-app:   {}", hint(app));
            println!("run-app: Ctrl-C stops it.");
            let api = api_path(&host);
            let _ = std::fs::create_dir_all(api.parent().expect("dir"));
            let err = std::process::Command::new("ip")
                .args(["netns", "exec", &ns])
                .arg(ferry_tests::ferry_bin())
                .arg("run")
                .arg(&image)
                .arg("--api")
                .arg(&api)
                .args(cluster::service_args(&memory))
                .args(guest_args.iter().flat_map(|a| ["--guest-arg", a]))
                .arg("--")
                .args(&args)
                .exec();
            Err(err).context("cannot start ferry")
        })(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-cluster: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
