//! `ferry-cluster`: the single-IP-address cluster in network namespaces
//! (`ferry-client`, `ferry-router`, `ferry-hostA`, `ferry-hostB`) and the
//! service running in it, for `just cluster-up`, `run-app`,
//! `live-migrate`, `snapshot`, `restore`, `stop` and `status`.
//!
//! Every VM it starts runs detached: a session of its own (no terminal
//! owns it), stdin from /dev/null, its console appended to
//! `target/cluster/PREFIX/HOST.log`. Each host runs a receiver (`ferry
//! receive`, detached too) for VMs moving there; a VM that arrives answers
//! on that host's control socket, `/run/ferry/PREFIX/HOST.sock`. Where the
//! VM runs is found by asking those sockets, so every command finds it
//! wherever it went, however it got there (started, moved, restored).
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use ferry_tests::cluster::{
    self, Cluster, FLEET_HOSTS, HOSTS, MIGRATION_IPS, SERVICE_MAC, TAP, VIP,
};
use serde_json::Value;

#[derive(Parser, Debug)]
#[command(
    about = "Build and use Ferry's namespace cluster: run a service, move it, snapshot, restore, stop (needs root)"
)]
struct Cli {
    /// The cluster's name: its namespaces are PREFIX-client, -router,
    /// -hostA, -hostB.
    #[arg(long, global = true, default_value = "ferry")]
    prefix: String,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build the cluster and start a receiver on each host (no-op for
    /// what is up already); prints the service IP.
    Up {
        /// A fleet's cluster: a third host (hostC) and a three-member etcd
        /// cluster, a member on each host's backplane address.
        #[arg(long)]
        fleet: bool,
    },
    /// End every process in the cluster's namespaces, then remove them.
    Down,
    /// Where the service runs (host, app, state, generation, uptime,
    /// control socket), and the receivers.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run an app image as the service on a host, detached; prints how to
    /// reach it, its control socket and its console log.
    Run {
        /// The image, e.g. images/out/kv.
        image: PathBuf,
        /// Which host runs it.
        #[arg(long, default_value = "hostA", value_parser = ["hostA", "hostB"])]
        host: String,
        /// Guest memory, e.g. 64M or 1G.
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
    /// Live-migrate the service to the other host (wherever it runs now).
    Migrate {
        /// Downtime budget in milliseconds.
        #[arg(long, default_value_t = 1)]
        downtime_ms: u64,
    },
    /// Write a snapshot of the service (wherever it runs), signed with the
    /// cluster's key.
    Snapshot {
        /// The snapshot file.
        file: PathBuf,
        /// What the service does afterwards.
        #[arg(long, default_value = "resume", value_parser = ["resume", "pause", "stop"])]
        then: String,
    },
    /// Restore a snapshot as the service on a host, detached (its
    /// signature is checked with the cluster's key).
    Restore {
        /// The snapshot file.
        file: PathBuf,
        /// Which host runs it.
        #[arg(long, default_value = "hostA", value_parser = ["hostA", "hostB"])]
        host: String,
    },
    /// Stop the service, wherever it runs.
    Stop,
    /// Remove what earlier test runs left behind (their namespaces, with
    /// whatever still runs in them), e.g. after a test run was killed.
    CleanTests,
}

struct Ctx {
    prefix: String,
}

impl Ctx {
    fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }
    fn run_dir(&self) -> PathBuf {
        Path::new("/run/ferry").join(&self.prefix)
    }
    fn api(&self, host: &str) -> PathBuf {
        self.run_dir().join(format!("{host}.sock"))
    }
    fn log(&self, host: &str) -> PathBuf {
        ferry_tests::root()
            .join("target/cluster")
            .join(&self.prefix)
            .join(format!("{host}.log"))
    }
    fn receiver_pidfile(&self, host: &str) -> PathBuf {
        self.run_dir().join(format!("receiver-{host}.pid"))
    }

    /// The status of the VM behind `host`'s control socket, if one answers.
    fn vm(&self, host: &str) -> Option<Value> {
        let p = self.api(host);
        let text = cluster::ferry_ctl(&["status", "--json", "--api"], &p).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// The hosts whose control sockets answer: (host, status).
    fn vms(&self) -> Vec<(&'static str, Value)> {
        HOSTS
            .iter()
            .filter_map(|h| self.vm(h).map(|v| (*h, v)))
            .collect()
    }

    /// The host where the service runs (or is paused, or arriving).
    fn where_vm(&self) -> Result<(&'static str, Value)> {
        let vms = self.vms();
        let running: Vec<_> = vms
            .iter()
            .filter(|(_, v)| v["state"] != "gone")
            .cloned()
            .collect();
        match running.as_slice() {
            [] => bail!("no VM runs in the cluster: start one with `just run-app APP`"),
            [one] => Ok(one.clone()),
            many => {
                // A moved VM's source may still answer, paused, while the
                // move settles: the one that runs is the service.
                if let Some(r) = many.iter().find(|(_, v)| v["state"] == "running") {
                    return Ok(r.clone());
                }
                Ok(many[0].clone())
            }
        }
    }

    /// Refuses when a VM holds the service's address anywhere.
    fn refuse_if_taken(&self) -> Result<()> {
        if let Some((host, v)) = self.vms().into_iter().next() {
            bail!(
                "{host} already runs VM {} ({}) with the service address {VIP} ({SERVICE_MAC}), {}; stop it first with `just stop`",
                short(&v["id"]),
                app(&v),
                v["detail"].as_str().unwrap_or("?")
            );
        }
        Ok(())
    }

    fn up(&self, fleet: bool) -> Result<()> {
        if Cluster::exists(&self.prefix) {
            if fleet && Cluster::attach(&self.prefix)?.hosts().len() < FLEET_HOSTS.len() {
                bail!(
                    "the cluster {}-* is up without a fleet's third host: `just cluster-down` first",
                    self.prefix
                );
            }
            println!("cluster: up");
        } else {
            let c = if fleet {
                Cluster::up_fleet(&self.prefix)?
            } else {
                Cluster::up(&self.prefix)?
            };
            println!(
                "cluster: up (namespaces {p}-client, {p}-router, {})",
                c.hosts()
                    .iter()
                    .map(|h| format!("{}-{h}", self.prefix))
                    .collect::<Vec<_>>()
                    .join(", "),
                p = self.prefix
            );
            c.keep();
        }
        for h in HOSTS {
            self.ensure_receiver(h)?;
        }
        if fleet {
            self.ensure_etcd()?;
        }
        println!(
            "cluster: service IP {VIP}; clients run in {}, e.g. `ip netns exec {} curl http://{VIP}/`",
            self.ns("client"),
            self.ns("client")
        );
        Ok(())
    }

    fn receiver_alive(&self, host: &str) -> bool {
        std::fs::read_to_string(self.receiver_pidfile(host))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(|pid| {
                // SAFETY: signal 0 only checks that the process exists.
                let exists = unsafe { libc::kill(pid, 0) } == 0;
                exists
                    && std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                        .is_ok_and(|c| c.contains("receive"))
            })
    }

    /// Starts `host`'s receiver, detached, unless it runs.
    fn ensure_receiver(&self, host: &str) -> Result<()> {
        if self.receiver_alive(host) {
            return Ok(());
        }
        let c = Cluster::attach(&self.prefix)?;
        let i = HOSTS.iter().position(|h| *h == host).expect("a host");
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)])
            .arg(ferry_tests::ferry_bin())
            .args([
                "receive",
                "--listen",
                &format!("{}:7000", MIGRATION_IPS[i]),
                "--tap",
                TAP,
                "--name",
                host,
                "--key",
            ])
            .arg(c.key())
            .arg("--api")
            .arg(self.api(host));
        let from = std::fs::metadata(self.log(host)).map_or(0, |m| m.len() as usize);
        let pid = self.detached(cmd, host)?;
        std::fs::write(self.receiver_pidfile(host), pid.to_string())?;
        let t = Instant::now();
        loop {
            let text = std::fs::read(self.log(host)).unwrap_or_default();
            if String::from_utf8_lossy(&text[from.min(text.len())..]).contains("waiting for VMs") {
                return Ok(());
            }
            if t.elapsed() > Duration::from_secs(10) {
                bail!(
                    "the receiver on {host} did not start; the end of {}:\n{}",
                    self.log(host).display(),
                    tail(&self.log(host), 8)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn etcd_pidfile(&self, host: &str) -> PathBuf {
        self.run_dir().join(format!("etcd-{host}.pid"))
    }

    fn etcd_alive(&self, host: &str) -> bool {
        std::fs::read_to_string(self.etcd_pidfile(host))
            .ok()
            .and_then(|p| p.trim().parse::<i32>().ok())
            .is_some_and(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| c.starts_with("etcd"))
            })
    }

    /// Starts the fleet's etcd members (detached, a member per host),
    /// unless they run, and waits for a leader.
    fn ensure_etcd(&self) -> Result<()> {
        let c = Cluster::attach(&self.prefix)?;
        let alive: Vec<bool> = FLEET_HOSTS.iter().map(|h| self.etcd_alive(h)).collect();
        if alive.iter().any(|a| *a) && !alive.iter().all(|a| *a) {
            bail!(
                "some of the fleet's etcd members run and some do not ({}); `just cluster-down` and `just cluster-up` start them anew",
                FLEET_HOSTS
                    .iter()
                    .zip(&alive)
                    .map(|(h, a)| format!("{h}: {}", if *a { "up" } else { "down" }))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        if !alive[0] {
            for h in FLEET_HOSTS {
                let pid = self.detached(c.etcd_command(h)?, &format!("etcd-{h}"))?;
                std::fs::write(self.etcd_pidfile(h), pid.to_string())?;
            }
        }
        let eps = c.etcd_endpoints();
        let (_, leader) = c.in_ns("hostA", || {
            cluster::wait_for_etcd(&eps, Duration::from_secs(30))
        })??;
        println!(
            "cluster: etcd members on {} (leader {leader}); `just fleet ls` shows the fleet",
            eps.join(", ")
        );
        Ok(())
    }

    /// Starts `cmd` in a session of its own (no terminal owns it), stdin
    /// from /dev/null, output appended to `host`'s log; returns its PID.
    fn detached(&self, cmd: Command, host: &str) -> Result<u32> {
        let log = self.log(host);
        std::fs::create_dir_all(log.parent().expect("a directory"))?;
        std::fs::create_dir_all(self.run_dir())?;
        let what = format!("{cmd:?}");
        let child = ferry::fleet::agent::detached(cmd, &log)
            .with_context(|| format!("starting {what} (log {})", log.display()))?;
        Ok(child.id())
    }

    /// Waits until `host`'s control socket answers (the VM `pid` runs).
    fn wait_vm(&self, host: &str, pid: u32, what: &str) -> Result<Value> {
        let t = Instant::now();
        loop {
            if let Some(v) = self.vm(host) {
                return Ok(v);
            }
            // SAFETY: signal 0 only checks that the process exists.
            let alive = unsafe { libc::kill(pid as i32, 0) } == 0
                && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
                    s.rsplit(')')
                        .next()
                        .is_some_and(|r| r.trim_start().starts_with('Z'))
                });
            if !alive || t.elapsed() > Duration::from_secs(60) {
                bail!(
                    "{what} did not come up; the end of {}:\n{}",
                    self.log(host).display(),
                    tail(&self.log(host), 8)
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn run(
        &self,
        image: &Path,
        host: &str,
        memory: &str,
        guest_args: &[String],
        args: &[String],
    ) -> Result<()> {
        if !image.is_file() {
            bail!(
                "{} does not exist (build it with `just build-image APP`)",
                image.display()
            );
        }
        self.up(false)?;
        self.refuse_if_taken()?;
        let api = self.api(host);
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)])
            .arg(ferry_tests::ferry_bin())
            .arg("run")
            .arg(image)
            .arg("--api")
            .arg(&api)
            .args(cluster::service_args(memory))
            .args(guest_args.iter().flat_map(|a| ["--guest-arg", a]))
            .arg("--")
            .args(args);
        let pid = self.detached(cmd, host)?;
        let v = self.wait_vm(host, pid, "the VM")?;
        let app = image.file_name().and_then(|n| n.to_str()).unwrap_or("app");
        println!(
            "run-app: {app} runs on {host} as {VIP} ({SERVICE_MAC}), VM {} (pid {pid}), detached: closing this terminal does not stop it",
            short(&v["id"])
        );
        println!(
            "run-app:   reach it:       {}",
            hint(app, &self.ns("client"))
        );
        println!(
            "run-app:   status:         just status   (or: ferry status --api {})",
            api.display()
        );
        println!(
            "run-app:   console:        {} (`tail -f` it)",
            self.log(host).display()
        );
        println!("run-app:   move it:        just live-migrate");
        println!("run-app:   stop it:        just stop");
        Ok(())
    }

    fn migrate(&self, downtime_ms: u64) -> Result<()> {
        let (from, v) = self.where_vm()?;
        if v["state"] != "running" {
            bail!(
                "the VM on {from} is not running: {}",
                v["detail"].as_str().unwrap_or("?")
            );
        }
        let to = if from == "hostA" { "hostB" } else { "hostA" };
        self.ensure_receiver(to)?;
        let i = HOSTS.iter().position(|h| *h == to).expect("a host");
        let key = Cluster::attach(&self.prefix)?.key().to_path_buf();
        println!("live-migrate: {from} -> {to}");
        let st = Command::new(ferry_tests::ferry_bin())
            .args([
                "migrate",
                "--to",
                &format!("{}:7000", MIGRATION_IPS[i]),
                "--downtime-ms",
                &downtime_ms.to_string(),
                "--key",
            ])
            .arg(&key)
            .arg("--api")
            .arg(self.api(from))
            .status()?;
        if !st.success() {
            let now = self
                .vms()
                .iter()
                .map(|(h, v)| format!("{h}: {}", v["detail"].as_str().unwrap_or("?")))
                .collect::<Vec<_>>()
                .join("; ");
            bail!("the migration did not complete; now {now}");
        }
        println!(
            "live-migrate: the VM runs on {to} now (control socket {}, console {})",
            self.api(to).display(),
            self.log(to).display()
        );
        Ok(())
    }

    fn stop(&self) -> Result<()> {
        let (host, v) = self.where_vm()?;
        cluster::ferry_ctl(&["stop", "--api"], &self.api(host))?;
        println!(
            "stop: stopped {} (VM {}) on {host}",
            app(&v),
            short(&v["id"])
        );
        Ok(())
    }

    fn snapshot(&self, file: &Path, then: &str) -> Result<()> {
        let (host, _) = self.where_vm()?;
        let file = std::path::absolute(file)?;
        let key = Cluster::attach(&self.prefix)?.key().to_path_buf();
        let st = Command::new(ferry_tests::ferry_bin())
            .args(["snapshot", "--then", then, "--out"])
            .arg(&file)
            .arg("--key")
            .arg(&key)
            .arg("--api")
            .arg(self.api(host))
            .status()?;
        if !st.success() {
            bail!("the snapshot failed");
        }
        println!("snapshot: the VM on {host} is in {}", file.display());
        Ok(())
    }

    fn restore(&self, file: &Path, host: &str) -> Result<()> {
        if !file.is_file() {
            bail!("{} does not exist", file.display());
        }
        self.up(false)?;
        self.refuse_if_taken()?;
        let file = std::path::absolute(file)?;
        let key = Cluster::attach(&self.prefix)?.key().to_path_buf();
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns(host)])
            .arg(ferry_tests::ferry_bin())
            .arg("restore")
            .arg(&file)
            .arg("--key")
            .arg(&key)
            .args(["--tap", TAP, "--api"])
            .arg(self.api(host));
        let pid = self.detached(cmd, host)?;
        let v = self.wait_vm(host, pid, "the restored VM")?;
        println!(
            "restore: VM {} ({}) runs on {host} at generation {}, detached (control socket {}, console {})",
            short(&v["id"]),
            app(&v),
            v["generation"],
            self.api(host).display(),
            self.log(host).display()
        );
        Ok(())
    }

    fn status(&self, json: bool) -> Result<()> {
        let up = Cluster::exists(&self.prefix);
        let vms = self.vms();
        if json {
            let v = serde_json::json!({
                "up": up,
                "receivers": HOSTS.iter().map(|h| (h.to_string(), Value::Bool(self.receiver_alive(h)))).collect::<serde_json::Map<_, _>>(),
                "vms": vms.iter().map(|(h, v)| serde_json::json!({"host": h, "socket": self.api(h), "status": v})).collect::<Vec<_>>(),
            });
            println!("{v}");
            return Ok(());
        }
        if !up {
            println!("cluster: down");
            return Ok(());
        }
        println!("cluster: up, service IP {VIP} ({SERVICE_MAC})");
        for h in HOSTS {
            print!(
                "  {h}: receiver {}",
                if self.receiver_alive(h) {
                    "listening"
                } else {
                    "not running"
                }
            );
            match vms.iter().find(|(vh, _)| *vh == h) {
                Some((_, v)) => println!(
                    "; {} (VM {} generation {}): {}, up {:.0} s; socket {}",
                    app(v),
                    short(&v["id"]),
                    v["generation"],
                    v["detail"].as_str().unwrap_or("?"),
                    v["uptime_s"].as_f64().unwrap_or(0.0),
                    self.api(h).display()
                ),
                None => println!("; no VM"),
            }
        }
        Ok(())
    }

    fn down(&self) -> Result<()> {
        cluster::end_namespace_processes(&self.prefix);
        cluster::remove(&self.prefix);
        let _ = std::fs::remove_dir_all(self.run_dir());
        println!("cluster: down");
        Ok(())
    }
}

fn short(id: &Value) -> String {
    id.as_str().unwrap_or("?").chars().take(8).collect()
}

fn app(v: &Value) -> String {
    Path::new(v["image"].as_str().unwrap_or("?"))
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("?")
        .to_string()
}

fn tail(p: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn hint(app: &str, client: &str) -> String {
    match app {
        "kv" => format!("ip netns exec {client} redis-cli -h {VIP} -p 6379"),
        "http" => format!("ip netns exec {client} curl http://{VIP}/"),
        "echo" => format!(
            "ip netns exec {client} python3 -c \"import socket; s=socket.create_connection(('{VIP}',7)); s.sendall(b'hi'); print(s.recv(9))\""
        ),
        "stream" => {
            format!("ip netns exec {client} target/release/stream-client {VIP}:5001 --seconds 10")
        }
        _ => format!("ip netns exec {client} <client> {VIP}"),
    }
}

fn clean_tests() -> Result<()> {
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
            ["ft", "fs", "fm", "fx", "fo", "fl", "fc", "fa", "fd"]
                .iter()
                .any(|t| p.starts_with(t) && p[2..].bytes().all(|b| b.is_ascii_digit()))
        })
        .collect();
    prefixes.sort();
    prefixes.dedup();
    for p in &prefixes {
        cluster::end_namespace_processes(p);
        cluster::remove(p);
        let _ = std::fs::remove_dir_all(Path::new("/run/ferry").join(p));
    }
    if !prefixes.is_empty() {
        println!(
            "cluster: removed {} clusters left by earlier test runs",
            prefixes.len()
        );
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let ctx = Ctx {
        prefix: cli.prefix.clone(),
    };
    let r = match cli.command {
        Cmd::Up { fleet } => ctx.up(fleet),
        Cmd::Down => ctx.down(),
        Cmd::Status { json } => ctx.status(json),
        Cmd::Run {
            image,
            host,
            memory,
            guest_args,
            args,
        } => ctx.run(&image, &host, &memory, &guest_args, &args),
        Cmd::Migrate { downtime_ms } => ctx.migrate(downtime_ms),
        Cmd::Snapshot { file, then } => ctx.snapshot(&file, &then),
        Cmd::Restore { file, host } => ctx.restore(&file, &host),
        Cmd::Stop => ctx.stop(),
        Cmd::CleanTests => clean_tests(),
    };
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-cluster: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
