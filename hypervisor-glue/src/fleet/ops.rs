//! The operator's fleet commands on the records: place a new VM, ask for
//! a move and wait for the agents to carry it out.

use std::time::{Duration, Instant};

use super::store::{Store, StoreError, View, VmNet, VmRecord, VmState};

/// Memory the VMs a host owns take, bytes.
pub fn memory_used(v: &View, host: &str) -> u64 {
    v.vms
        .iter()
        .filter(|vm| vm.owner == host)
        .map(|vm| vm.memory)
        .sum()
}

/// Why `host` cannot take a VM of `memory` bytes now, if it cannot.
pub fn refuse(v: &View, host: &str, memory: u64) -> Option<String> {
    let Some(h) = v.hosts.iter().find(|h| h.name == host) else {
        return Some(format!("{host} has no live agent"));
    };
    if v.cordoned.iter().any(|c| c == host) {
        return Some(format!(
            "{host} is cordoned (`ferry fleet uncordon {host}`)"
        ));
    }
    let free = h.memory.saturating_sub(memory_used(v, host));
    if free < memory {
        return Some(format!(
            "{host} has {} MiB free for VMs; the VM needs {} MiB",
            free >> 20,
            memory >> 20
        ));
    }
    None
}

/// Where a new VM of `memory` bytes goes: `host` if given (and able), else
/// the live, schedulable host with the most memory free.
pub fn place(v: &View, memory: u64, host: Option<&str>) -> Result<String, StoreError> {
    if let Some(h) = host {
        return match refuse(v, h, memory) {
            None => Ok(h.to_string()),
            Some(why) => Err(StoreError::Invalid(why)),
        };
    }
    v.hosts
        .iter()
        .filter(|h| refuse(v, &h.name, memory).is_none())
        .max_by_key(|h| h.memory.saturating_sub(memory_used(v, &h.name)))
        .map(|h| h.name.clone())
        .ok_or_else(|| {
            StoreError::Invalid(format!(
                "no live, schedulable host has {} MiB free: {}",
                memory >> 20,
                v.hosts
                    .iter()
                    .filter_map(|h| refuse(v, &h.name, memory))
                    .collect::<Vec<_>>()
                    .join("; ")
            ))
        })
}

/// The VM named `key` (its id, or its unique name).
pub fn find<'a>(v: &'a View, key: &str) -> Result<&'a VmRecord, StoreError> {
    if let Some(vm) = v.vms.iter().find(|vm| vm.id == key) {
        return Ok(vm);
    }
    let named: Vec<&VmRecord> = v.vms.iter().filter(|vm| vm.name == key).collect();
    match named.as_slice() {
        [one] => Ok(one),
        [] => Err(StoreError::Missing(format!("VM {key}"))),
        _ => Err(StoreError::Invalid(format!(
            "{} VMs are named {key}: give the id",
            named.len()
        ))),
    }
}

/// What `ferry fleet run` asks for.
#[derive(Clone, Debug)]
pub struct NewVm {
    /// A name for operators.
    pub name: String,
    /// The image (a path every host has).
    pub image: String,
    /// Memory, bytes.
    pub memory: u64,
    /// Guest arguments.
    pub args: Vec<String>,
    /// Its card.
    pub net: Option<VmNet>,
    /// Where (default: placed).
    pub host: Option<String>,
}

/// Records a new VM on a host and waits (up to `wait`) until that host's
/// agent has taken it (started it at generation 1).
pub fn run(store: &Store, new: &NewVm, wait: Duration) -> Result<VmRecord, StoreError> {
    let v = store.view()?;
    let clash = |vm: &&VmRecord| {
        let (Some(n), Some(o)) = (&new.net, &vm.net) else {
            return false;
        };
        o.mac == n.mac || o.ip == n.ip
    };
    if let Some(other) = v.vms.iter().find(clash) {
        return Err(StoreError::Invalid(format!(
            "VM {} ({}) has that MAC or address already",
            other.id, other.name
        )));
    }
    if v.vms.iter().any(|vm| vm.name == new.name) {
        return Err(StoreError::Exists(format!("a VM named {}", new.name)));
    }
    let host = place(&v, new.memory, new.host.as_deref())?;
    let rec = VmRecord {
        id: crate::id::VmId::random().to_string(),
        name: new.name.clone(),
        image: new.image.clone(),
        memory: new.memory,
        args: new.args.clone(),
        net: new.net.clone(),
        last_move: None,
        owner: host,
        generation: 0,
        state: VmState::Running,
    };
    store.create_vm(&rec)?;
    wait_for(store, &rec.id, wait, "its host's agent to start it", |r| {
        (r.generation >= 1).then(|| Ok(r.clone()))
    })
}

/// Asks for VM `key` to move to `host` and waits (up to `wait`) for the
/// agents: the record then names `host` at the next generation, or the
/// VM is back to running where it was (the move failed).
pub fn move_to(
    store: &Store,
    key: &str,
    host: &str,
    wait: Duration,
) -> Result<VmRecord, StoreError> {
    let vm = check_move(&store.view()?, key, host)?;
    let from = vm.owner.clone();
    let asked = store.advance(&vm.id, &from, vm.generation, |r| {
        r.state = VmState::Moving {
            to: host.to_string(),
        };
    })?;
    wait_for(store, &vm.id, wait, "the move to end", |r| {
        if r.owner == host && r.generation > asked.generation && r.state == VmState::Running {
            Some(Ok(r.clone()))
        } else if r.owner == from && r.state == VmState::Running {
            Some(Err(StoreError::Invalid(format!(
                "the move of VM {} to {host} failed; it runs on at {from} (its agent's log says why)",
                r.name
            ))))
        } else {
            None
        }
    })
}

fn wait_for<T>(
    store: &Store,
    id: &str,
    wait: Duration,
    what: &str,
    mut done: impl FnMut(&VmRecord) -> Option<Result<T, StoreError>>,
) -> Result<T, StoreError> {
    let t = Instant::now();
    loop {
        let r = store.vm(id)?.record;
        if let Some(out) = done(&r) {
            return out;
        }
        if t.elapsed() > wait {
            return Err(StoreError::Invalid(format!(
                "VM {id}: gave up waiting for {what} after {} s (its record: owner {}, generation {}, {:?})",
                wait.as_secs(),
                r.owner,
                r.generation,
                r.state
            )));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The VM `key` as it is now, if it may move to `host` (else why not):
/// what `ferry fleet move --dry-run` checks.
pub fn check_move(v: &View, key: &str, host: &str) -> Result<VmRecord, StoreError> {
    let vm = find(v, key)?.clone();
    if vm.owner == host {
        return Err(StoreError::Invalid(format!(
            "VM {} runs on {host} already",
            vm.name
        )));
    }
    if vm.state != VmState::Running {
        return Err(StoreError::Invalid(format!(
            "VM {} is not running on {} (its record says {:?})",
            vm.name, vm.owner, vm.state
        )));
    }
    if let Some(why) = refuse(v, host, vm.memory) {
        return Err(StoreError::Invalid(why));
    }
    Ok(vm)
}

/// A fleet-wide change the operator asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Every VM off this host (cordoned first), a bounded number at a time.
    Drain(String),
    /// Spread the load.
    Balance,
    /// Pack VMs onto the fewest hosts.
    Consolidate,
}

/// A plan on the records: moves in waves, by VM and host names.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NamedPlan {
    /// Waves of (VM id, VM name, from, to).
    pub waves: Vec<Vec<NamedMove>>,
    /// Hosts the plan leaves with no VM.
    pub emptied: Vec<String>,
}

/// One move of a [`NamedPlan`].
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct NamedMove {
    /// The VM's id.
    pub id: String,
    /// Its name.
    pub name: String,
    /// From host.
    pub from: String,
    /// To host.
    pub to: String,
}

/// The scheduler's view of the records: live hosts (schedulable unless
/// cordoned), hosts that own VMs without a lease (never schedulable), and
/// VMs with an equal share of their host's measured load.
pub fn to_fleet(v: &View) -> (super::Fleet, Vec<String>) {
    let mut names: Vec<String> = v.hosts.iter().map(|h| h.name.clone()).collect();
    let mut hosts: Vec<super::Host> = v
        .hosts
        .iter()
        .map(|h| super::Host {
            name: h.name.clone(),
            memory: h.memory.max(memory_used(v, &h.name)),
            cores: h.cores,
            schedulable: !v.cordoned.contains(&h.name),
        })
        .collect();
    for vm in &v.vms {
        if !names.contains(&vm.owner) {
            names.push(vm.owner.clone());
            hosts.push(super::Host {
                name: vm.owner.clone(),
                memory: memory_used(v, &vm.owner),
                cores: 0.0,
                schedulable: false,
            });
        }
    }
    let load_of = |vm: &VmRecord| {
        let n = v.vms.iter().filter(|o| o.owner == vm.owner).count().max(1);
        v.hosts
            .iter()
            .find(|h| h.name == vm.owner)
            .map_or(0.0, |h| h.load / n as f64)
    };
    let vms = v
        .vms
        .iter()
        .map(|vm| super::Vm {
            id: vm.id.clone(),
            memory: vm.memory,
            load: load_of(vm),
            host: names.iter().position(|n| *n == vm.owner).expect("a host"),
        })
        .collect();
    (super::Fleet { hosts, vms }, names)
}

/// The plan for `action` on the records in `v`. Only running VMs on live
/// hosts move (a VM of a host without a lease stays fenced there).
pub fn plan(v: &View, action: &Action, policy: &super::Policy) -> Result<NamedPlan, StoreError> {
    let (fleet, names) = to_fleet(v);
    let bad = |e: super::PlanError| StoreError::Invalid(format!("no plan: {e}"));
    let p = match action {
        Action::Drain(h) => {
            let i = names
                .iter()
                .position(|n| n == h)
                .ok_or_else(|| StoreError::Missing(format!("host {h}")))?;
            if !v.hosts.iter().any(|x| &x.name == h) {
                return Err(StoreError::Invalid(format!(
                    "{h} has no live agent: its VMs are fenced there and cannot be moved live"
                )));
            }
            super::plan::drain(&fleet, i, policy).map_err(bad)?
        }
        Action::Balance => super::plan::balance(&fleet, policy).map_err(bad)?,
        Action::Consolidate => super::plan::consolidate(&fleet, policy).map_err(bad)?,
    };
    let live = |h: usize| v.hosts.iter().any(|x| x.name == names[h]);
    Ok(NamedPlan {
        waves: p
            .waves
            .iter()
            .map(|w| {
                w.iter()
                    .filter(|m| live(m.from) && v.vms[m.vm].state == VmState::Running)
                    .map(|m| NamedMove {
                        id: v.vms[m.vm].id.clone(),
                        name: v.vms[m.vm].name.clone(),
                        from: names[m.from].clone(),
                        to: names[m.to].clone(),
                    })
                    .collect::<Vec<_>>()
            })
            .filter(|w| !w.is_empty())
            .collect(),
        emptied: p.emptied.iter().map(|&h| names[h].clone()).collect(),
    })
}

/// How one move of a plan ended.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Outcome {
    /// The move.
    #[serde(flatten)]
    pub planned: NamedMove,
    /// Where the VM runs now.
    pub runs_on: String,
    /// Its generation now.
    pub generation: u64,
    /// Why it did not move, if it did not.
    pub error: Option<String>,
}

/// Carries out `plan` wave by wave (each wave's moves at once, the next
/// when they have ended); `progress` hears of each move's end. A move
/// that fails leaves its VM where it ran and the plan goes on.
pub fn execute(
    store: &Store,
    plan: &NamedPlan,
    wait: Duration,
    progress: &mut dyn FnMut(&Outcome),
) -> Result<Vec<Outcome>, StoreError> {
    let mut out = Vec::new();
    for wave in &plan.waves {
        let mut asked = Vec::new();
        for m in wave {
            let cur = store.vm(&m.id)?.record;
            let r = if cur.owner != m.from || cur.state != VmState::Running {
                Err(StoreError::Invalid(format!(
                    "VM {} changed since the plan (on {}, {:?})",
                    m.name, cur.owner, cur.state
                )))
            } else {
                store.advance(&m.id, &m.from, cur.generation, |r| {
                    r.state = VmState::Moving { to: m.to.clone() };
                })
            };
            match r {
                Ok(rec) => asked.push((m, rec.generation)),
                Err(e) => {
                    let o = Outcome {
                        planned: m.clone(),
                        runs_on: cur.owner,
                        generation: cur.generation,
                        error: Some(e.to_string()),
                    };
                    progress(&o);
                    out.push(o);
                }
            }
        }
        let t = Instant::now();
        while !asked.is_empty() {
            let mut left = Vec::new();
            for (m, g) in asked {
                let r = store.vm(&m.id)?.record;
                let done = if r.owner == m.to && r.generation > g && r.state == VmState::Running {
                    Some(None)
                } else if r.owner == m.from && r.state == VmState::Running {
                    Some(Some(format!(
                        "the move to {} failed; it runs on at {}",
                        m.to, m.from
                    )))
                } else if t.elapsed() > wait {
                    Some(Some(format!(
                        "gave up waiting after {} s (owner {}, {:?})",
                        wait.as_secs(),
                        r.owner,
                        r.state
                    )))
                } else {
                    None
                };
                match done {
                    Some(error) => {
                        let o = Outcome {
                            planned: m.clone(),
                            runs_on: r.owner,
                            generation: r.generation,
                            error,
                        };
                        progress(&o);
                        out.push(o);
                    }
                    None => left.push((m, g)),
                }
            }
            asked = left;
            if !asked.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(out)
}

/// An operator's word that `host` is down (powered off, or its VMs
/// otherwise dead): each VM it owned is given to another host at the next
/// generation, whose agent starts it from its image (its memory is lost
/// with the host). Refused while the host holds a lease. If the host comes
/// back, its agent stops the copies the records no longer give it.
pub fn confirm_down(store: &Store, host: &str) -> Result<Vec<VmRecord>, StoreError> {
    let v = store.view()?;
    if v.hosts.iter().any(|h| h.name == host) {
        return Err(StoreError::Invalid(format!(
            "{host} has a live agent (its lease holds): it is not down; `ferry fleet drain {host}` moves its VMs live"
        )));
    }
    store.cordon(host, true)?;
    let mut placed: View = v.clone();
    let mut out = Vec::new();
    for vm in v.vms.iter().filter(|vm| vm.owner == host) {
        // A move to the host that was under way: the VM runs (or waits,
        // paused) at its source, which gets it back.
        if let VmState::Arriving { from } = &vm.state
            && v.hosts.iter().any(|h| &h.name == from)
        {
            let rec = store.advance(&vm.id, host, vm.generation, |r| {
                r.owner = from.clone();
                r.generation = vm.generation - 1;
                r.state = VmState::Running;
            })?;
            out.push(rec);
            continue;
        }
        let to = place(&placed, vm.memory, None)?;
        let rec = store.advance(&vm.id, host, vm.generation, |r| {
            r.owner = to.clone();
            r.generation = vm.generation + 1;
            r.state = VmState::Running;
        })?;
        if let Some(p) = placed.vms.iter_mut().find(|p| p.id == vm.id) {
            p.owner = to;
        }
        out.push(rec);
    }
    Ok(out)
}
