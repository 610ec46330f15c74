//! `just fleet-demo`: a fleet of three hosts in namespaces (a 3-member
//! etcd, an agent on each host), three streaming VMs with verifying
//! clients; drains one host, then consolidates; prints a report and writes
//! `target/fleet-demo/report.json`. Meanwhile a watcher asks every host's
//! VM sockets every 50 ms whether any VM runs in two places.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use ferry_tests::cluster::{self, Cluster, FLEET_HOSTS};
use serde_json::{Value, json};

#[derive(Parser, Debug)]
#[command(about = "A fleet of three hosts: drain one, consolidate, with every stream verified")]
struct Args {
    /// Seconds each client streams (the drain and the consolidation run
    /// inside them).
    #[arg(long, default_value_t = 24)]
    seconds: u32,
    /// Where the report and the logs go.
    #[arg(long, default_value = "target/fleet-demo")]
    out: PathBuf,
    /// The namespaces' prefix.
    #[arg(long, default_value = "fdemo")]
    prefix: String,
    /// A fault on the way (the chaos tests): `kill-agent` (hostA's agent
    /// SIGKILLed while its VMs drain, started again after), `kill-leader`
    /// (etcd's leader SIGKILLed during the drain), `restart-agents` (every
    /// agent SIGKILLed and started again between drain and
    /// consolidation), `partition` (hostB cut off from the backplane, so
    /// from etcd and migrations, before the consolidation; healed after).
    #[arg(long, value_parser = ["none", "kill-agent", "kill-leader", "restart-agents", "partition"], default_value = "none")]
    chaos: String,
}

/// One fleet command (`ferry fleet ARGS --json` on `node`): its answer,
/// its outcomes for the report, and an error if it failed.
fn step(
    c: &Cluster,
    action: &str,
    node: &str,
    args: &[&str],
) -> (Value, Vec<Value>, Option<String>) {
    println!(
        "fleet-demo: ferry fleet {} (at {:.3} s)",
        args.join(" "),
        ferry_tests::monotonic_s()
    );
    let mut all = args.to_vec();
    all.push("--json");
    let (v, err) = match c.fleet(node, &all) {
        Ok(t) => (serde_json::from_str(&t).unwrap_or(Value::Null), None),
        Err(e) => (Value::Null, Some(format!("{action}: {e:#}"))),
    };
    let mut moves = Vec::new();
    for o in v["outcomes"].as_array().into_iter().flatten() {
        println!(
            "fleet-demo:   {} {} -> {}{}",
            o["name"].as_str().unwrap_or("?"),
            o["from"].as_str().unwrap_or("?"),
            o["runs_on"].as_str().unwrap_or("?"),
            o["error"]
                .as_str()
                .map(|e| format!(" FAILED: {e}"))
                .unwrap_or_default()
        );
        moves.push(json!({"action": action, "outcome": o}));
    }
    (v, moves, err)
}

fn kill(pid: u32) {
    // SAFETY: kill(2) on a PID this program started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
}

/// Which VM runs where, by the sockets that answer `running`.
fn running(dir: &Path, ids: &[String]) -> HashMap<String, Vec<&'static str>> {
    let mut at: HashMap<String, Vec<&'static str>> = HashMap::new();
    for id in ids {
        for h in FLEET_HOSTS {
            let sock = Cluster::agent_socket(dir, h, id);
            if cluster::ferry_ctl(&["status", "--json", "--api"], &sock)
                .is_ok_and(|s| s.contains("\"state\":\"running\""))
            {
                at.entry(id.clone()).or_default().push(h);
            }
        }
    }
    at
}

fn main() -> ExitCode {
    match run(Args::parse()) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("fleet-demo: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(a: Args) -> Result<bool> {
    let root = ferry_tests::root();
    let out = root.join(&a.out);
    std::fs::create_dir_all(&out)?;
    let dir = out.join("run");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    println!("fleet-demo: building 3 hosts in namespaces {}-*", a.prefix);
    let mut c = Cluster::up_fleet(&a.prefix).context("building the cluster (root needed)")?;
    let members = c.start_etcd(&out).context("starting etcd")?;
    println!(
        "fleet-demo: etcd members on {}",
        c.etcd_endpoints().join(", ")
    );
    let mut agents = Vec::new();
    for i in 0..3 {
        agents.push(c.start_agent(&dir, i)?);
    }
    println!("fleet-demo: an agent on each of {}", FLEET_HOSTS.join(", "));
    let image = root.join("images/out/stream");
    if !image.exists() {
        bail!("{} is missing: `images/build stream`", image.display());
    }
    let mut vms: Vec<(String, String)> = Vec::new(); // (name, id)
    for (i, host) in [(0u8, "hostA"), (1, "hostA"), (2, "hostB")] {
        c.add_service(i)?;
        let (cidr, _) = Cluster::fleet_service(i);
        let name = format!("s{i}");
        // Some touched memory, so that a move takes long enough to be
        // caught in the middle (the chaos runs).
        let text = c.fleet_run_service(i, &image, host, &["rate=300K", "ballast=24M"])?;
        let v: Value = serde_json::from_str(&text)?;
        let id = v["id"].as_str().context("an id")?.to_string();
        let sock = Cluster::agent_socket(&dir, host, &id);
        let t = Instant::now();
        while cluster::ferry_ctl(&["status", "--json", "--api"], &sock).is_err() {
            if t.elapsed() > Duration::from_secs(30) {
                let log = dir.join(format!("agent-{host}.log"));
                let said = std::fs::read_to_string(&log).unwrap_or_default();
                let tail: Vec<&str> = said.lines().rev().take(20).collect();
                bail!(
                    "{name} did not come up on {host}; the end of {}:\n{}",
                    log.display(),
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("fleet-demo: {name} ({}) runs on {host}, {cidr}", &id[..8]);
        vms.push((name, id));
    }
    std::thread::sleep(Duration::from_secs(1));

    // The watcher: no VM may run in two places at any moment.
    let stop = Arc::new(AtomicBool::new(false));
    let ids: Vec<String> = vms.iter().map(|(_, id)| id.clone()).collect();
    let watcher = {
        let (stop, dir, ids) = (stop.clone(), dir.clone(), ids.clone());
        std::thread::spawn(move || {
            let mut seen = Vec::new();
            while !stop.load(Ordering::Relaxed) {
                for (id, hosts) in running(&dir, &ids) {
                    if hosts.len() > 1 {
                        seen.push(format!("{id} on {}", hosts.join(" and ")));
                    }
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            seen
        })
    };
    let before = c.client_tcp_counters()?;
    let clients: Vec<_> = (0..3u8)
        .map(|i| {
            let (cidr, _) = Cluster::fleet_service(i);
            let addr = cidr.split('/').next().expect("an address").to_string();
            c.command("client", root.join("target/release/stream-client"))
                .arg(format!("{addr}:5001"))
                .args(["--json", "--seconds", &a.seconds.to_string()])
                .args(["--upstream", "20000"])
                .stdout(Stdio::piped())
                .spawn()
        })
        .collect::<std::io::Result<_>>()?;
    println!(
        "fleet-demo: 3 verifying clients stream for {} s (each sends 20 kB/s upstream)",
        a.seconds
    );
    std::thread::sleep(Duration::from_secs(3));

    let mut errors: Vec<String> = Vec::new();
    let mut moves: Vec<Value> = Vec::new();
    let mut faults: Vec<String> = Vec::new();
    let chaos = a.chaos.as_str();
    // The drain, with a fault injected while it runs.
    let (drain, m, e) = std::thread::scope(|s| -> Result<_> {
        let d = s.spawn(|| step(&c, "drain", "hostC", &["drain", "hostA"]));
        match chaos {
            "kill-agent" => {
                // Once a move off hostA is under way.
                let t = Instant::now();
                let under_way = || {
                    ids.iter().any(|id| {
                        cluster::ferry_ctl(
                            &["status", "--json", "--api"],
                            &Cluster::agent_socket(&dir, "hostA", id),
                        )
                        .is_ok_and(|s| s.contains("\"state\":\"migrating\""))
                    })
                };
                let mut caught = false;
                while t.elapsed() < Duration::from_secs(20) {
                    if under_way() {
                        caught = true;
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
                kill(agents[0]);
                faults.push(format!(
                    "hostA's agent SIGKILLed {} ms into the drain, {}",
                    t.elapsed().as_millis(),
                    if caught {
                        "with a move under way"
                    } else {
                        "no move seen under way"
                    }
                ));
                std::thread::sleep(Duration::from_millis(500));
                let pid = c.start_agent_detached(&dir, 0)?;
                faults.push(format!("hostA's agent started again (pid {pid})"));
            }
            "kill-leader" => {
                std::thread::sleep(Duration::from_millis(100));
                let eps = c.etcd_endpoints();
                let (_, leader) = c.in_ns("hostC", || {
                    ferry::fleet::store::Store::connect(&eps, Duration::from_secs(5))
                        .and_then(|st| st.leader())
                })??;
                let pid = members
                    .iter()
                    .find(|(h, _)| *h == leader)
                    .context("the leader's member")?
                    .1;
                kill(pid);
                faults.push(format!(
                    "etcd's leader ({leader}) SIGKILLed 100 ms into the drain"
                ));
            }
            _ => {}
        }
        Ok(d.join().expect("the drain's thread"))
    })?;
    moves.extend(m);
    errors.extend(e);
    std::thread::sleep(Duration::from_secs(1));
    match chaos {
        "restart-agents" => {
            for (i, pid) in agents.clone().into_iter().enumerate() {
                kill(pid);
                agents[i] = c.start_agent(&dir, i)?;
            }
            faults.push("every agent SIGKILLed and started again".into());
        }
        "partition" => {
            c.exec("hostB", "ip", &["link", "set", "m0", "down"])?;
            faults.push(format!(
                "hostB cut off from the backplane (etcd, migrations) at {:.3} s",
                ferry_tests::monotonic_s()
            ));
            let t = Instant::now();
            // Its lease expires: it is no longer live, its VMs fenced there.
            while c.fleet("hostA", &["ls", "--json"]).is_ok_and(|t| {
                serde_json::from_str::<Value>(&t).is_ok_and(|v| {
                    v["hosts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|h| h["name"] == "hostB" && h["alive"] == true)
                })
            }) {
                if t.elapsed() > Duration::from_secs(30) {
                    bail!("hostB's lease did not expire while it was cut off");
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        _ => {}
    }
    let (consolidate, m, e) = step(&c, "consolidate", "hostA", &["consolidate"]);
    moves.extend(m);
    errors.extend(e);
    if chaos == "partition" {
        c.exec("hostB", "ip", &["link", "set", "m0", "up"])?;
        faults.push(format!(
            "hostB's backplane healed at {:.3} s",
            ferry_tests::monotonic_s()
        ));
    }
    for o in moves.iter().map(|m| &m["outcome"]) {
        if let Some(e) = o["error"].as_str() {
            errors.push(format!("{}: {e}", o["name"].as_str().unwrap_or("?")));
        }
    }

    let mut report_vms = Vec::new();
    for ((name, id), client) in vms.iter().zip(clients) {
        let o = client.wait_with_output()?;
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        let v: Value = serde_json::from_str(text.trim()).unwrap_or(Value::Null);
        let error = v["error"].as_str().map(str::to_string);
        if let Some(e) = &error {
            errors.push(format!("{name}: stream: {e}"));
        } else if !o.status.success() || v.is_null() {
            errors.push(format!("{name}: the client failed: {text}"));
        }
        report_vms.push(json!({
            "name": name,
            "id": id,
            "bytes_verified": v["bytes_verified"],
            "retransmits": v["retransmits"],
            "resets": u64::from(error.as_deref().is_some_and(|e| e.contains("reset"))),
            "max_gap_ms": v["max_gap_ms"],
            // The largest gaps, at CLOCK_MONOTONIC seconds (as the faults').
            "gaps_at_monotonic_s": v["gaps"].as_array().into_iter().flatten().filter_map(|g| {
                Some(json!([v["start_monotonic_s"].as_f64()? + g["at_s"].as_f64()?, g["gap_ms"]]))
            }).collect::<Vec<_>>(),
        }));
    }
    stop.store(true, Ordering::Relaxed);
    let two_copies = watcher.join().unwrap_or_default();
    // None lost: each VM answers `running` on exactly one host.
    let now = running(&dir, &ids);
    let lost: Vec<String> = vms
        .iter()
        .filter(|(_, id)| now.get(id).is_none_or(Vec::is_empty))
        .map(|(name, _)| name.clone())
        .collect();
    let counters = c.client_tcp_counters()?.since(&before);
    let view: Value = serde_json::from_str(&c.fleet("hostA", &["ls", "--json"])?)?;
    let drained = drain["emptied"]
        .as_array()
        .is_some_and(|e| e.iter().any(|h| h == "hostA"));
    let report = json!({
        "vms": report_vms,
        "moves": moves,
        "drained": if drained { Value::from("hostA") } else { Value::Null },
        "hosts_freed": consolidate["emptied"].clone(),
        "two_copies_seen": !two_copies.is_empty(),
        "lost": lost,
        "chaos": chaos,
        "faults": faults,
        "two_copies": two_copies,
        "client_counters": {"retrans_segs": counters.retrans_segs, "estab_resets": counters.estab_resets},
        "fleet": view,
        "errors": errors,
    });
    std::fs::write(
        out.join("report.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!("\n| VM | bytes verified | retransmits | resets | largest gap |");
    println!("|---|---|---|---|---|");
    for v in report["vms"].as_array().into_iter().flatten() {
        println!(
            "| {} | {} | {} | {} | {:.1} ms |",
            v["name"].as_str().unwrap_or("?"),
            v["bytes_verified"],
            v["retransmits"],
            v["resets"],
            v["max_gap_ms"].as_f64().unwrap_or(f64::NAN)
        );
    }
    println!(
        "\ndrained: {}; hosts freed by consolidation: {}; moves: {}; a VM in two places: {}; client TCP: {} retransmitted segments, {} resets",
        report["drained"],
        report["hosts_freed"],
        moves.len(),
        report["two_copies_seen"],
        counters.retrans_segs,
        counters.estab_resets
    );
    for f in &faults {
        println!("fault: {f}");
    }
    for e in &errors {
        println!("ERROR: {e}");
    }
    println!("report: {}", out.join("report.json").display());
    drop(c);
    Ok(errors.is_empty()
        && !report["two_copies_seen"].as_bool().unwrap_or(true)
        && report["lost"].as_array().is_some_and(Vec::is_empty)
        && drained)
}
