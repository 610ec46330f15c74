//! `fleet-sim`: the fleet scheduler (`ferry::fleet`) on simulated fleets
//! far larger than this machine: time per decision (median of the runs),
//! moves, waves, the most moves a host takes part in at once, and for
//! consolidation the hosts freed.

use std::time::{Duration, Instant};

use clap::Parser;
use ferry::fleet::plan::{self, Fleet, Plan, Policy};

#[derive(Parser)]
#[command(
    about = "The fleet scheduler on simulated fleets: time per decision, moves, waves, hosts freed"
)]
struct Args {
    /// Hosts in the simulated fleet.
    #[arg(long, default_value_t = 1000)]
    hosts: usize,
    /// VMs in the simulated fleet.
    #[arg(long, default_value_t = 50_000)]
    vms: usize,
    /// Runs per decision (the median is reported).
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Moves a host takes part in at once.
    #[arg(long, default_value_t = 2)]
    per_host: usize,
}

fn most_per_host(f: &Fleet, p: &Plan) -> usize {
    p.waves
        .iter()
        .map(|w| {
            let mut busy = vec![0usize; f.hosts.len()];
            for m in w {
                busy[m.from] += 1;
                busy[m.to] += 1;
            }
            busy.into_iter().max().unwrap_or(0)
        })
        .max()
        .unwrap_or(0)
}

fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    if a.runs == 0 || a.hosts < 2 {
        anyhow::bail!("--runs must be at least 1 and --hosts at least 2");
    }
    let f = plan::simulated(a.hosts, a.vms, 7);
    let p = Policy {
        per_host: a.per_host,
        ..Policy::default()
    };
    let used: u64 = f.vms.iter().map(|v| v.memory).sum();
    let have: u64 = f.hosts.iter().map(|h| h.memory).sum();
    println!(
        "fleet-sim: {} hosts, {} VMs, memory {:.0}% used; at most {} moves per host at once; median of {} runs",
        a.hosts,
        a.vms,
        100.0 * used as f64 / have as f64,
        a.per_host,
        a.runs
    );
    println!(
        "\n| decision | time (median) | moves | waves | most moves per host at once | hosts emptied |"
    );
    println!("|---|---|---|---|---|---|");
    type Decide = Box<dyn Fn(&Fleet, &Policy) -> Result<Plan, plan::PlanError>>;
    let decisions: [(&str, Decide); 3] = [
        ("drain one host", Box::new(|f, p| plan::drain(f, 17, p))),
        ("balance", Box::new(plan::balance)),
        ("consolidate", Box::new(plan::consolidate)),
    ];
    for (name, decide) in decisions {
        let mut times: Vec<Duration> = Vec::new();
        let mut last = None;
        for _ in 0..a.runs {
            let t = Instant::now();
            let plan = decide(&f, &p)?;
            times.push(t.elapsed());
            last = Some(plan);
        }
        times.sort();
        let plan = last.expect("one run");
        println!(
            "| {name} | {:.2} ms | {} | {} | {} | {} |",
            times[times.len() / 2].as_secs_f64() * 1e3,
            plan.len(),
            plan.waves.len(),
            most_per_host(&f, &plan),
            plan.emptied.len()
        );
    }
    Ok(())
}
