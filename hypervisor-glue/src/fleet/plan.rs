//! Drain, balance and consolidate, as plans of moves in waves.

use std::collections::BTreeSet;

/// A host as the scheduler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Host {
    /// Its name.
    pub name: String,
    /// Memory it gives VMs, bytes.
    pub memory: u64,
    /// Cores it gives VMs.
    pub cores: f64,
    /// Whether new VMs may go there (false: draining, fenced, down).
    pub schedulable: bool,
}

/// A VM as the scheduler sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Vm {
    /// Its identity.
    pub id: String,
    /// Its memory, bytes.
    pub memory: u64,
    /// Cores it keeps busy (measured).
    pub load: f64,
    /// The host it runs on (an index into [`Fleet::hosts`]).
    pub host: usize,
}

/// Hosts and the VMs on them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fleet {
    /// The hosts.
    pub hosts: Vec<Host>,
    /// The VMs.
    pub vms: Vec<Vm>,
}

/// How plans are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Policy {
    /// A move may fill a host's cores up to this fraction with load.
    pub max_load: f64,
    /// Moves one host takes part in at once (as source or destination).
    pub per_host: usize,
    /// Most moves `balance` plans.
    pub max_moves: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            max_load: 0.8,
            per_host: 2,
            max_moves: 1000,
        }
    }
}

/// One move.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Move {
    /// The VM (an index into [`Fleet::vms`]).
    pub vm: usize,
    /// From host.
    pub from: usize,
    /// To host.
    pub to: usize,
}

/// A plan: moves in waves, and the hosts it leaves empty.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    /// Moves that run at once; waves run one after another.
    pub waves: Vec<Vec<Move>>,
    /// Hosts the plan leaves with no VM (drain: the drained one;
    /// consolidate: the ones freed), by index.
    pub emptied: Vec<usize>,
}

impl Plan {
    /// Every move, wave after wave.
    pub fn moves(&self) -> impl Iterator<Item = &Move> {
        self.waves.iter().flatten()
    }

    /// How many moves.
    pub fn len(&self) -> usize {
        self.waves.iter().map(Vec::len).sum()
    }

    /// Whether it moves nothing.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Why no plan.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    /// A host index out of range.
    #[error("no host {0}")]
    NoHost(usize),
    /// A VM that fits nowhere else.
    #[error("VM {vm} ({memory} bytes) fits on no other schedulable host")]
    NoRoom {
        /// The VM's identity.
        vm: String,
        /// Its memory.
        memory: u64,
    },
    /// A VM on a host that does not exist.
    #[error("VM {vm} is on host {host}, which does not exist")]
    BadVm {
        /// The VM's identity.
        vm: String,
        /// Its host index.
        host: usize,
    },
}

/// Memory and load in use on each host.
#[derive(Clone, Debug)]
struct Usage {
    memory: Vec<u64>,
    load: Vec<f64>,
    vms: Vec<Vec<usize>>,
}

impl Usage {
    fn of(f: &Fleet) -> Result<Usage, PlanError> {
        let n = f.hosts.len();
        let mut u = Usage {
            memory: vec![0; n],
            load: vec![0.0; n],
            vms: vec![Vec::new(); n],
        };
        for (i, vm) in f.vms.iter().enumerate() {
            if vm.host >= n {
                return Err(PlanError::BadVm {
                    vm: vm.id.clone(),
                    host: vm.host,
                });
            }
            u.memory[vm.host] += vm.memory;
            u.load[vm.host] += vm.load;
            u.vms[vm.host].push(i);
        }
        Ok(u)
    }

    fn free(&self, f: &Fleet, h: usize) -> u64 {
        f.hosts[h].memory.saturating_sub(self.memory[h])
    }

    fn take(&mut self, vm: &Vm, from: usize, to: usize, i: usize) {
        self.memory[from] -= vm.memory;
        self.load[from] -= vm.load;
        self.vms[from].retain(|&v| v != i);
        self.memory[to] += vm.memory;
        self.load[to] += vm.load;
        self.vms[to].push(i);
    }
}

/// Whether `vm` may go to host `h` under `p`.
fn fits(f: &Fleet, u: &Usage, p: &Policy, vm: &Vm, h: usize) -> bool {
    let host = &f.hosts[h];
    host.schedulable
        && u.memory[h] + vm.memory <= host.memory
        && u.load[h] + vm.load <= host.cores * p.max_load
}

/// Groups moves into waves in which no host takes part in more than
/// `per_host` moves; a VM's moves keep their order.
fn waves(moves: Vec<Move>, hosts: usize, per_host: usize) -> Vec<Vec<Move>> {
    let per_host = per_host.max(1);
    let mut waves: Vec<Vec<Move>> = Vec::new();
    let mut busy: Vec<Vec<usize>> = Vec::new();
    let mut last_wave_of_vm = std::collections::HashMap::new();
    for m in moves {
        let earliest = last_wave_of_vm.get(&m.vm).map_or(0, |w| w + 1);
        let mut w = earliest;
        loop {
            if w == waves.len() {
                waves.push(Vec::new());
                busy.push(vec![0; hosts]);
            }
            if busy[w][m.from] < per_host && busy[w][m.to] < per_host {
                break;
            }
            w += 1;
        }
        busy[w][m.from] += 1;
        busy[w][m.to] += 1;
        last_wave_of_vm.insert(m.vm, w);
        waves[w].push(m);
    }
    waves
}

/// Every VM off `host` onto other schedulable hosts (the least loaded that
/// fits each, largest VMs first); the host is then empty. Fails, moving
/// nothing, if any VM fits nowhere.
pub fn drain(f: &Fleet, host: usize, p: &Policy) -> Result<Plan, PlanError> {
    if host >= f.hosts.len() {
        return Err(PlanError::NoHost(host));
    }
    let mut u = Usage::of(f)?;
    let mut on: Vec<usize> = u.vms[host].clone();
    on.sort_by(|a, b| f.vms[*b].memory.cmp(&f.vms[*a].memory));
    let mut moves = Vec::new();
    for i in on {
        let vm = &f.vms[i];
        let to = (0..f.hosts.len())
            .filter(|&h| h != host && fits(f, &u, p, vm, h))
            .min_by(|&a, &b| {
                let ra = u.load[a] / f.hosts[a].cores.max(1e-9);
                let rb = u.load[b] / f.hosts[b].cores.max(1e-9);
                ra.total_cmp(&rb)
            })
            .ok_or_else(|| PlanError::NoRoom {
                vm: vm.id.clone(),
                memory: vm.memory,
            })?;
        u.take(vm, host, to, i);
        moves.push(Move {
            vm: i,
            from: host,
            to,
        });
    }
    Ok(Plan {
        waves: waves(moves, f.hosts.len(), p.per_host),
        emptied: vec![host],
    })
}

/// Evens out load: moves a VM from the most loaded host (load over
/// cores) to the least loaded host it fits on, the VM whose move leaves
/// the two closest, while that narrows their difference; at most
/// `max_moves`.
pub fn balance(f: &Fleet, p: &Policy) -> Result<Plan, PlanError> {
    let mut u = Usage::of(f)?;
    let ratio = |u: &Usage, h: usize| u.load[h] / f.hosts[h].cores.max(1e-9);
    let mut moves = Vec::new();
    let mut live: Vec<usize> = (0..f.hosts.len())
        .filter(|&h| f.hosts[h].schedulable)
        .collect();
    if live.len() < 2 {
        return Ok(Plan::default());
    }
    'moves: while moves.len() < p.max_moves {
        live.sort_by(|&a, &b| ratio(&u, a).total_cmp(&ratio(&u, b)));
        let hi = *live.last().expect("two hosts");
        // The least loaded host that one of hi's VMs fits on and where
        // the move narrows the gap.
        for &lo in &live[..live.len() - 1] {
            let gap = ratio(&u, hi) - ratio(&u, lo);
            if gap <= 1e-9 {
                break 'moves;
            }
            let best = u.vms[hi]
                .iter()
                .copied()
                .filter(|&i| fits(f, &u, p, &f.vms[i], lo))
                .map(|i| {
                    let vm = &f.vms[i];
                    let a = (u.load[hi] - vm.load) / f.hosts[hi].cores.max(1e-9);
                    let b = (u.load[lo] + vm.load) / f.hosts[lo].cores.max(1e-9);
                    (i, (a - b).abs())
                })
                .min_by(|x, y| x.1.total_cmp(&y.1));
            if let Some((i, after)) = best
                && after + 1e-9 < gap
            {
                let vm = &f.vms[i];
                u.take(vm, hi, lo, i);
                moves.push(Move {
                    vm: i,
                    from: hi,
                    to: lo,
                });
                continue 'moves;
            }
        }
        break;
    }
    Ok(Plan {
        waves: waves(moves, f.hosts.len(), p.per_host),
        emptied: Vec::new(),
    })
}

/// Packs VMs onto as few hosts as fit them: empties hosts, least used
/// first, by moving each of their VMs to the fullest host that still fits
/// it (best fit, largest VMs first); a host whose VMs do not all fit
/// elsewhere keeps them. Reports the hosts freed (the paper's energy
/// motive: they can be switched off).
pub fn consolidate(f: &Fleet, p: &Policy) -> Result<Plan, PlanError> {
    let mut u = Usage::of(f)?;
    let n = f.hosts.len();
    // Candidate destinations by free memory: (free, host).
    let mut by_free: BTreeSet<(u64, usize)> = (0..n)
        .filter(|&h| f.hosts[h].schedulable)
        .map(|h| (u.free(f, h), h))
        .collect();
    let mut order: Vec<usize> = (0..n).filter(|&h| !u.vms[h].is_empty()).collect();
    order.sort_by_key(|&h| (u.memory[h], h));
    let mut emptied = Vec::new();
    let mut closed = vec![false; n];
    // A host that took VMs stays: emptying it later would move them twice.
    let mut kept = vec![false; n];
    let mut moves = Vec::new();
    for h in order {
        if closed[h] || kept[h] {
            continue;
        }
        // Try to place every VM of h elsewhere; undo if one does not fit.
        by_free.remove(&(u.free(f, h), h));
        let mut vms = u.vms[h].clone();
        vms.sort_by(|a, b| f.vms[*b].memory.cmp(&f.vms[*a].memory));
        let mut done: Vec<(usize, usize)> = Vec::new();
        let mut all = true;
        for i in vms {
            let vm = &f.vms[i];
            let to = by_free
                .range((vm.memory, 0)..)
                .map(|&(_, t)| t)
                .find(|&t| !closed[t] && fits(f, &u, p, vm, t));
            match to {
                Some(t) => {
                    by_free.remove(&(u.free(f, t), t));
                    u.take(vm, h, t, i);
                    by_free.insert((u.free(f, t), t));
                    done.push((i, t));
                }
                None => {
                    all = false;
                    break;
                }
            }
        }
        if all {
            closed[h] = true;
            for &(_, t) in &done {
                kept[t] = true;
            }
            emptied.push(h);
            moves.extend(done.into_iter().map(|(i, t)| Move {
                vm: i,
                from: h,
                to: t,
            }));
        } else {
            for (i, t) in done.into_iter().rev() {
                by_free.remove(&(u.free(f, t), t));
                u.take(&f.vms[i], t, h, i);
                by_free.insert((u.free(f, t), t));
            }
            if f.hosts[h].schedulable {
                by_free.insert((u.free(f, h), h));
            }
        }
    }
    emptied.sort_unstable();
    Ok(Plan {
        waves: waves(moves, n, p.per_host),
        emptied,
    })
}

/// Where every VM runs after `plan` (host index per VM).
pub fn apply(f: &Fleet, plan: &Plan) -> Vec<usize> {
    let mut at: Vec<usize> = f.vms.iter().map(|v| v.host).collect();
    for m in plan.moves() {
        at[m.vm] = m.to;
    }
    at
}

/// A deterministic fleet of `hosts` hosts (64-256 GiB, 16-64 cores)
/// and `vms` VMs (256 MiB to 4 GiB, 0-0.8 cores of load) spread over
/// them: at 50 VMs a host, about 60% of memory and half the cores in
/// use. For tests and `fleet-sim`: fleets larger than any machine here.
pub fn simulated(hosts: usize, vms: usize, seed: u64) -> Fleet {
    let mut x = seed | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut f = Fleet::default();
    for h in 0..hosts {
        let gib = [64, 128, 192, 256][(next() % 4) as usize];
        let cores = [16.0, 32.0, 48.0, 64.0][(next() % 4) as usize];
        f.hosts.push(Host {
            name: format!("h{h}"),
            memory: gib * GIB,
            cores,
            schedulable: true,
        });
    }
    let mut used = vec![0u64; hosts];
    let mut h = 0;
    for v in 0..vms {
        let memory = (1 + next() % 16) * (GIB / 4);
        let load = (next() % 80) as f64 / 100.0;
        let mut tries = 0;
        while used[h] + memory > f.hosts[h].memory && tries < hosts {
            h = (h + 1) % hosts;
            tries += 1;
        }
        used[h] += memory;
        f.vms.push(Vm {
            id: format!("v{v}"),
            memory,
            load,
            host: h,
        });
        h = (h + 1 + (next() % 3) as usize) % hosts;
    }
    f
}

const GIB: u64 = 1 << 30;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    fn host(name: &str, gib: u64, cores: f64) -> Host {
        Host {
            name: name.into(),
            memory: gib * GIB,
            cores,
            schedulable: true,
        }
    }

    fn vm(id: &str, gib: u64, load: f64, host: usize) -> Vm {
        Vm {
            id: id.into(),
            memory: gib * GIB,
            load,
            host,
        }
    }

    /// What every plan must keep: memory never over a host's, nothing
    /// onto an unschedulable host, waves within the per-host bound, no
    /// VM moved twice in one wave.
    pub(crate) fn check(f: &Fleet, plan: &Plan, p: &Policy) {
        let at = apply(f, plan);
        let mut mem = vec![0u64; f.hosts.len()];
        for (i, v) in f.vms.iter().enumerate() {
            mem[at[i]] += v.memory;
        }
        for (h, host) in f.hosts.iter().enumerate() {
            let before: u64 = f.vms.iter().filter(|v| v.host == h).map(|v| v.memory).sum();
            assert!(
                mem[h] <= host.memory.max(before),
                "host {h} over its memory: {} > {}",
                mem[h],
                host.memory
            );
        }
        for w in &plan.waves {
            let mut busy = vec![0usize; f.hosts.len()];
            let mut seen = std::collections::HashSet::new();
            for m in w {
                assert!(
                    f.hosts[m.to].schedulable,
                    "move onto unschedulable {}",
                    m.to
                );
                assert_ne!(m.from, m.to);
                busy[m.from] += 1;
                busy[m.to] += 1;
                assert!(seen.insert(m.vm), "VM {} moved twice in a wave", m.vm);
            }
            assert!(
                busy.iter().all(|&b| b <= p.per_host),
                "a wave over the bound"
            );
        }
        for &h in &plan.emptied {
            assert!(at.iter().all(|&a| a != h), "host {h} not empty");
        }
    }

    #[test]
    fn a_drained_host_ends_empty_and_nothing_overflows() {
        let mut f = Fleet {
            hosts: vec![host("a", 16, 8.0), host("b", 16, 8.0), host("c", 8, 8.0)],
            vms: vec![vm("1", 4, 1.0, 0), vm("2", 6, 1.0, 0), vm("3", 2, 1.0, 1)],
        };
        let p = Policy::default();
        let plan = drain(&f, 0, &p).unwrap();
        check(&f, &plan, &p);
        assert_eq!(plan.len(), 2);
        assert_eq!(plan.emptied, vec![0]);
        // No room anywhere: refused by name, nothing planned.
        f.hosts[1].schedulable = false;
        f.hosts[2].memory = 4 * GIB;
        assert_eq!(
            drain(&f, 0, &p),
            Err(PlanError::NoRoom {
                vm: "2".into(),
                memory: 6 * GIB
            })
        );
        assert_eq!(drain(&f, 9, &p), Err(PlanError::NoHost(9)));
    }

    #[test]
    fn balance_narrows_the_spread_and_consolidate_frees_hosts() {
        let f = Fleet {
            hosts: (0..4).map(|i| host(&format!("h{i}"), 64, 16.0)).collect(),
            vms: (0..8).map(|i| vm(&i.to_string(), 4, 1.5, 0)).collect(),
        };
        let p = Policy::default();
        let plan = balance(&f, &p).unwrap();
        check(&f, &plan, &p);
        let at = apply(&f, &plan);
        let load = |h: usize| at.iter().filter(|&&a| a == h).count();
        assert!((0..4).all(|h| load(h) == 2), "{at:?}");

        // Eight small VMs over four hosts fit on one.
        let spread = Fleet {
            hosts: f.hosts.clone(),
            vms: (0..8).map(|i| vm(&i.to_string(), 4, 0.5, i % 4)).collect(),
        };
        let plan = consolidate(&spread, &p).unwrap();
        check(&spread, &plan, &p);
        assert_eq!(plan.emptied.len(), 3, "{plan:?}");
    }

    #[test]
    fn waves_keep_the_per_host_bound() {
        let moves: Vec<Move> = (0..10)
            .map(|i| Move {
                vm: i,
                from: 0,
                to: 1 + i % 2,
            })
            .collect();
        let w = waves(moves, 3, 2);
        assert_eq!(w.len(), 5);
        assert!(w.iter().all(|w| w.len() == 2));
    }

    /// 1,000 hosts and 50,000 VMs: every plan keeps the invariants, a
    /// drain empties its host, consolidation frees hosts and never
    /// overfills one.
    #[test]
    fn plans_for_a_fleet_of_a_thousand_hosts_keep_the_invariants() {
        let f = simulated(1000, 50_000, 7);
        let p = Policy::default();
        let d = drain(&f, 17, &p).unwrap();
        check(&f, &d, &p);
        assert!(!d.is_empty());
        let b = balance(&f, &p).unwrap();
        check(&f, &b, &p);
        // The most loaded host is less loaded afterwards.
        let worst = |at: &[usize]| {
            let mut load = vec![0.0; f.hosts.len()];
            for (i, v) in f.vms.iter().enumerate() {
                load[at[i]] += v.load;
            }
            (0..f.hosts.len())
                .map(|h| load[h] / f.hosts[h].cores)
                .fold(0.0f64, f64::max)
        };
        let before: Vec<usize> = f.vms.iter().map(|v| v.host).collect();
        assert!(
            worst(&apply(&f, &b)) < worst(&before),
            "balance did not help"
        );
        let c = consolidate(&f, &p).unwrap();
        check(&f, &c, &p);
        assert!(!c.emptied.is_empty(), "consolidation freed no host");
    }
}
