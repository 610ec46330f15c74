//! What `ferry fleet ls` prints: hosts (live or not, cordoned, load,
//! memory in use), VMs (owner, generation, state), as a table or JSON.

use serde_json::{Value, json};

use super::store::{View, VmState};

/// A VM state as `ferry fleet ls` says it.
pub fn state_name(s: &VmState) -> String {
    match s {
        VmState::Running => "running".into(),
        VmState::Moving { to } => format!("moving to {to}"),
        VmState::Arriving { from } => format!("arriving from {from}"),
        VmState::Fenced => "fenced (its host's lease expired)".into(),
        VmState::Lost => "lost".into(),
    }
}

/// Hosts that own VMs or are cordoned but hold no lease: named, so that
/// operators see a host that went away with its VMs.
fn silent_owners(v: &View) -> Vec<String> {
    let mut out: Vec<String> = v
        .vms
        .iter()
        .map(|vm| vm.owner.clone())
        .chain(v.cordoned.iter().cloned())
        .filter(|o| !v.hosts.iter().any(|h| &h.name == o))
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The view as JSON (`ferry fleet ls --json`).
pub fn to_json(v: &View) -> Value {
    let used = |host: &str| -> u64 {
        v.vms
            .iter()
            .filter(|vm| vm.owner == host)
            .map(|vm| vm.memory)
            .sum()
    };
    json!({
        "revision": v.revision,
        "hosts": v.hosts.iter().map(|h| json!({
            "name": h.name,
            "alive": true,
            "schedulable": !v.cordoned.contains(&h.name),
            "migrate": h.migrate,
            "memory": h.memory,
            "memory_used": used(&h.name),
            "cores": h.cores,
            "load": h.load,
            "agent_pid": h.agent_pid,
        })).chain(silent_owners(v).into_iter().map(|name| json!({
            "name": name,
            "alive": false,
            "schedulable": false,
            "memory_used": used(&name),
        }))).collect::<Vec<_>>(),
        "vms": v.vms.iter().map(|vm| json!({
            "id": vm.id,
            "name": vm.name,
            "image": vm.image,
            "memory": vm.memory,
            "owner": vm.owner,
            "generation": vm.generation,
            "state": state_name(&vm.state),
        })).collect::<Vec<_>>(),
    })
}

/// The view as tables for people.
pub fn to_text(v: &View) -> String {
    let mut s = String::new();
    let mib = |b: u64| b >> 20;
    s.push_str(&format!(
        "{:<12} {:<6} {:<13} {:<22} {:>14} {:>11}\n",
        "HOST", "ALIVE", "SCHEDULABLE", "MIGRATE", "MEMORY MiB", "LOAD/CORES"
    ));
    for h in &v.hosts {
        let used: u64 = v
            .vms
            .iter()
            .filter(|vm| vm.owner == h.name)
            .map(|vm| vm.memory)
            .sum();
        s.push_str(&format!(
            "{:<12} {:<6} {:<13} {:<22} {:>14} {:>11}\n",
            h.name,
            "yes",
            if v.cordoned.contains(&h.name) {
                "no (cordoned)"
            } else {
                "yes"
            },
            h.migrate,
            format!("{}/{}", mib(used), mib(h.memory)),
            format!("{:.2}/{:.0}", h.load, h.cores),
        ));
    }
    for name in silent_owners(v) {
        s.push_str(&format!(
            "{name:<12} {:<6} {:<13} (no live agent: its VMs stay fenced there)\n",
            "NO",
            if v.cordoned.contains(&name) {
                "no (cordoned)"
            } else {
                "no"
            }
        ));
    }
    s.push('\n');
    s.push_str(&format!(
        "{:<34} {:<14} {:<14} {:<10} {:>5} STATE\n",
        "VM", "NAME", "IMAGE", "OWNER", "GEN"
    ));
    for vm in &v.vms {
        s.push_str(&format!(
            "{:<34} {:<14} {:<14} {:<10} {:>5} {}\n",
            vm.id,
            vm.name,
            vm.image,
            vm.owner,
            vm.generation,
            state_name(&vm.state)
        ));
    }
    if v.vms.is_empty() {
        s.push_str("(no VMs)\n");
    }
    s
}

/// `ferry fleet top`: the tables of [`to_text`] under a header, the moves
/// in flight, and the last moves with their pauses.
pub fn to_top(v: &View) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let mut s = format!(
        "ferry fleet top (etcd revision {}): {} live hosts, {} VMs\n\n",
        v.revision,
        v.hosts.len(),
        v.vms.len()
    );
    s.push_str(&to_text(v));
    let moving: Vec<_> = v
        .vms
        .iter()
        .filter_map(|vm| match &vm.state {
            VmState::Moving { to } => Some(format!("  {} {} -> {to}", vm.name, vm.owner)),
            VmState::Arriving { from } => Some(format!(
                "  {} {from} -> {} (claimed: generation {})",
                vm.name, vm.owner, vm.generation
            )),
            _ => None,
        })
        .collect();
    s.push_str(&format!("\nmoves in flight: {}\n", moving.len()));
    for m in moving {
        s.push_str(&m);
        s.push('\n');
    }
    let mut last: Vec<_> = v
        .vms
        .iter()
        .filter_map(|vm| vm.last_move.as_ref().map(|m| (vm, m)))
        .collect();
    last.sort_by_key(|(_, m)| std::cmp::Reverse(m.at));
    s.push_str("\nlast moves (pause = VMM downtime):\n");
    for (vm, m) in last.iter().take(10) {
        s.push_str(&format!(
            "  {:<14} {} -> {}  pause {}, move {}, {} s ago\n",
            vm.name,
            m.from,
            m.to,
            m.downtime_ms.map_or("?".into(), |d| format!("{d:.2} ms")),
            m.total_ms.map_or("?".into(), |t| format!("{t:.0} ms")),
            now.saturating_sub(m.at)
        ));
    }
    if last.is_empty() {
        s.push_str("  (none yet)\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::super::store::{HostRecord, VmRecord};
    use super::*;

    #[test]
    fn a_host_that_went_away_with_its_vms_is_shown_not_alive() {
        let v = View {
            hosts: vec![HostRecord {
                name: "h1".into(),
                migrate: "10.77.2.1:7000".into(),
                memory: 1 << 30,
                cores: 2.0,
                load: 0.5,
                agent_pid: 7,
            }],
            cordoned: vec!["h1".into()],
            vms: vec![VmRecord {
                id: "ab".into(),
                name: "web".into(),
                image: "stream".into(),
                memory: 64 << 20,
                args: vec![],
                net: None,
                last_move: None,
                owner: "h2".into(),
                generation: 4,
                state: VmState::Fenced,
            }],
            revision: 9,
        };
        let j = to_json(&v);
        assert_eq!(j["hosts"][0]["schedulable"], false);
        assert_eq!(j["hosts"][1]["name"], "h2");
        assert_eq!(j["hosts"][1]["alive"], false);
        assert_eq!(j["hosts"][1]["memory_used"], 64 << 20);
        assert_eq!(j["vms"][0]["generation"], 4);
        let t = to_text(&v);
        assert!(t.contains("no (cordoned)"), "{t}");
        assert!(t.contains("h2") && t.contains("no live agent"), "{t}");
    }
}
