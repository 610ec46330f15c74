//! `ferry agent`: one per host. It registers the host in etcd under a
//! lease, keeps a receiver for incoming migrations (`ferry receive
//! --bridge --api-dir`: a tap and a control socket per VM), and acts on the
//! records that name it:
//!
//! - a VM it owns that runs nowhere here is started (`ferry run --id`), at
//!   the next generation, so that a copy that might survive elsewhere is
//!   fenced by the record;
//! - a VM it owns whose record says `moving` to another host is migrated
//!   there (`ferry migrate`); the record then names the new owner at the
//!   next generation, or goes back to `running` here if the move failed;
//! - a VM that arrived here (its generation is past the record's) is
//!   recorded as this host's, whoever moved it.
//!
//! It never starts a VM that another host owns: a host whose lease expired
//! keeps its VMs in the records (fenced) until an operator says otherwise.
//! VMs run in processes of their own (in sessions of their own): an agent
//! that is killed and started again finds them by their control sockets
//! and registers the host again.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::store::{HostRecord, Registration, Store, StoreError, VmRecord, VmState};
use crate::id::VmId;

/// How an agent runs.
#[derive(Clone, Debug)]
pub struct Config {
    /// The host's name.
    pub name: String,
    /// The etcd members.
    pub etcd: Vec<String>,
    /// Where the receiver listens (`IP:PORT`), as other hosts reach it.
    pub listen: String,
    /// The migration key.
    pub key: PathBuf,
    /// The bridge VMs' taps go on.
    pub bridge: String,
    /// The agent's directory: control sockets (`vms/ID.sock`), logs.
    pub dir: PathBuf,
    /// Memory the host gives VMs, bytes.
    pub memory: u64,
    /// Cores it gives VMs.
    pub cores: f64,
    /// The lease's TTL.
    pub ttl: Duration,
    /// How often it looks at the records.
    pub tick: Duration,
}

/// What the agent knows of a VM running here (from its control socket).
#[derive(Clone, Debug)]
struct Local {
    generation: u64,
    state: String,
    pid: u32,
}

/// A migration this agent runs.
struct Moving {
    child: Child,
    to: String,
    generation: u64,
}

/// The agent.
pub struct Agent {
    cfg: Config,
    store: Store,
    reg: Option<Registration>,
    receiver: Option<Child>,
    moving: HashMap<String, Moving>,
    started: HashMap<String, Instant>,
    cpu: HashMap<u32, (u64, Instant)>,
    load: f64,
    /// The load last written to the host's record, and when.
    reported: (f64, Instant),
    /// Claims on VMs arriving here with no VM here, since when.
    orphans: HashMap<String, Instant>,
}

fn say(m: &str) {
    eprintln!("ferry: agent: {m}");
}

/// The `ferry` binary the agent starts VMs and receivers with: the file
/// it was started from, as it is now (an upgrade that replaced it gives
/// the new version, which talks to the agent over the control socket's
/// JSON and etcd, as any `ferry` does).
fn exe() -> std::io::Result<PathBuf> {
    let p = std::env::current_exe()?;
    Ok(
        match p.to_str().and_then(|s| s.strip_suffix(" (deleted)")) {
            Some(path) => PathBuf::from(path),
            None => p,
        },
    )
}

/// Starts `cmd` in a session of its own (no terminal's signals reach it;
/// it outlives its starter), stdin from /dev/null, output appended to
/// `log`.
pub fn detached(mut cmd: Command, log: &Path) -> std::io::Result<Child> {
    use std::os::unix::process::CommandExt;
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)?;
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out);
    // SAFETY: setsid is async-signal-safe and touches only the child.
    unsafe {
        cmd.pre_exec(|| {
            libc::setsid();
            Ok(())
        })
    };
    cmd.spawn()
}

/// CPU ticks (utime + stime) of process `pid`.
fn cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = s.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

impl Agent {
    /// Connects to etcd and registers the host (waiting out the lease of a
    /// previous agent of this host, if it has not expired yet).
    pub fn start(cfg: Config) -> Result<Agent, StoreError> {
        super::store::check_name("host", &cfg.name)?;
        std::fs::create_dir_all(cfg.dir.join("vms"))
            .map_err(|e| StoreError::Invalid(format!("{}: {e}", cfg.dir.display())))?;
        // etcd may not answer yet (a host booting with it): wait for it.
        let store = loop {
            match Store::connect(&cfg.etcd, Duration::from_secs(3)) {
                Ok(s) => break s,
                Err(StoreError::Etcd { why, .. }) => {
                    say(&format!("etcd does not answer yet ({why}); trying again"));
                    if crate::stop::requested().is_some() {
                        return Err(StoreError::Invalid("stopped".into()));
                    }
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => return Err(e),
            }
        };
        let mut a = Agent {
            cfg,
            store,
            reg: None,
            receiver: None,
            moving: HashMap::new(),
            started: HashMap::new(),
            cpu: HashMap::new(),
            load: 0.0,
            reported: (0.0, Instant::now()),
            orphans: HashMap::new(),
        };
        a.register()?;
        Ok(a)
    }

    fn record(&self) -> HostRecord {
        HostRecord {
            name: self.cfg.name.clone(),
            migrate: self.cfg.listen.clone(),
            memory: self.cfg.memory,
            cores: self.cfg.cores,
            load: self.load,
            agent_pid: std::process::id(),
        }
    }

    fn register(&mut self) -> Result<(), StoreError> {
        let t = Instant::now();
        loop {
            match self.store.register(&self.record(), self.cfg.ttl) {
                Ok(r) => {
                    say(&format!(
                        "{} registered (lease {:x}, TTL {} s)",
                        self.cfg.name,
                        r.lease(),
                        self.cfg.ttl.as_secs()
                    ));
                    self.reg = Some(r);
                    return Ok(());
                }
                Err(StoreError::Exists(_)) if t.elapsed() < self.cfg.ttl * 3 => {
                    if t.elapsed() < self.cfg.tick {
                        say(
                            "an earlier registration of this host holds; waiting for its lease to expire",
                        );
                    }
                    std::thread::sleep(self.cfg.tick);
                }
                Err(e) => return Err(e),
            }
        }
    }

    fn api(&self, id: &str) -> PathBuf {
        self.cfg.dir.join("vms").join(format!("{id}.sock"))
    }

    /// The receiver: started unless one of this agent's runs (a previous
    /// agent's is found by its pid file and kept).
    fn ensure_receiver(&mut self) {
        if let Some(c) = self.receiver.as_mut() {
            match c.try_wait() {
                Ok(None) => return,
                Ok(Some(s)) => say(&format!("the receiver ended ({s}); starting it again")),
                Err(_) => {}
            }
            self.receiver = None;
        }
        let pidfile = self.cfg.dir.join("receiver.pid");
        if let Some(pid) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|p| p.trim().parse::<u32>().ok())
            && let Ok(c) = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            && c.contains("receive")
            && c.contains(&self.cfg.listen)
        {
            if c.contains("--fleet-etcd") {
                // A previous agent's receiver still serves.
                return;
            }
            // An older agent's, which does not claim arriving VMs in the
            // records: replaced (the VMs it received run on).
            say(&format!(
                "the receiver (pid {pid}) does not take fleet moves' claims; replacing it"
            ));
            // SAFETY: kill(2) on the pid the pid file names, checked above
            // to be this host's receiver.
            unsafe { libc::kill(pid as i32, libc::SIGTERM) };
            std::thread::sleep(Duration::from_millis(300));
        }
        let Ok(ferry) = exe() else { return };
        let mut cmd = Command::new(ferry);
        cmd.arg("receive")
            .args(["--listen", &self.cfg.listen, "--name", &self.cfg.name])
            .arg("--key")
            .arg(&self.cfg.key)
            .args(["--bridge", &self.cfg.bridge])
            .arg("--api-dir")
            .arg(self.cfg.dir.join("vms"))
            .arg("--fleet-etcd")
            .arg(self.cfg.etcd.join(","));
        match detached(cmd, &self.cfg.dir.join("receiver.log")) {
            Ok(c) => {
                let _ = std::fs::write(&pidfile, c.id().to_string());
                say(&format!("receiver on {} (pid {})", self.cfg.listen, c.id()));
                self.receiver = Some(c);
            }
            Err(e) => say(&format!("cannot start the receiver: {e}")),
        }
    }

    /// The VMs whose control sockets answer here.
    fn locals(&mut self) -> HashMap<String, Local> {
        let mut out = HashMap::new();
        let Ok(dir) = std::fs::read_dir(self.cfg.dir.join("vms")) else {
            return out;
        };
        for e in dir.flatten() {
            let p = e.path();
            if p.extension().is_none_or(|x| x != "sock") {
                continue;
            }
            let Ok(v) = crate::api::call(&p, &crate::api::Request::Status) else {
                continue;
            };
            let s = &v;
            let (Some(id), Some(generation)) = (s["id"].as_str(), s["generation"].as_u64()) else {
                continue;
            };
            out.insert(
                id.to_string(),
                Local {
                    generation,
                    state: s["state"].as_str().unwrap_or("?").to_string(),
                    pid: s["pid"].as_u64().unwrap_or(0) as u32,
                },
            );
        }
        out
    }

    /// Whether a `ferry run` of VM `id` runs on this host already (its
    /// socket may not answer yet).
    fn process_of(id: &str) -> bool {
        let Ok(d) = std::fs::read_dir("/proc") else {
            return false;
        };
        let needle = format!("--id\0{id}\0");
        d.flatten().any(|e| {
            std::fs::read(e.path().join("cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains(&needle))
        })
    }

    /// Whether a start of VM `id` is under way here: started in the last
    /// 30 s, or its process exists (its socket may not answer yet).
    fn starting(&self, id: &str) -> bool {
        self.started
            .get(id)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(30))
            || Self::process_of(id)
    }

    /// Starts VM `r` here (its record already at the generation it runs at).
    fn start_vm(&mut self, r: &VmRecord) {
        let Ok(id) = r.id.parse::<VmId>() else {
            say(&format!("VM record {} has no valid id; left alone", r.id));
            return;
        };
        let Ok(ferry) = exe() else { return };
        let mut cmd = Command::new(ferry);
        cmd.arg("run")
            .arg(&r.image)
            .args(["--memory", &r.memory.to_string(), "--id", &r.id])
            .args(["--generation", &r.generation.to_string()])
            .arg("--api")
            .arg(self.api(&r.id));
        if let Some(n) = &r.net {
            let tap = crate::devices::virtio::net::tap::name_for_vm(&id);
            if let Err(e) =
                crate::devices::virtio::net::tap::ensure_on_bridge(&tap, &self.cfg.bridge)
            {
                say(&format!("VM {}: {e}", r.id));
                return;
            }
            cmd.args(["--tap", &tap, "--mac", &n.mac, "--ip", &n.ip]);
            if let Some(g) = &n.gateway {
                cmd.args(["--gateway", g]);
            }
        }
        cmd.arg("--").args(&r.args);
        let log = self.cfg.dir.join(format!("{}.log", r.id));
        match detached(cmd, &log) {
            Ok(c) => {
                say(&format!(
                    "started VM {} ({}, {}) at generation {}: pid {}, console {}",
                    r.id,
                    r.name,
                    r.image,
                    r.generation,
                    c.id(),
                    log.display()
                ));
                self.started.insert(r.id.clone(), Instant::now());
            }
            Err(e) => say(&format!("cannot start VM {}: {e}", r.id)),
        }
    }

    /// Starts moving VM `r` (owned here) to host `to`.
    fn move_vm(&mut self, r: &VmRecord, to: &str, hosts: &[HostRecord]) {
        if self.moving.contains_key(&r.id) {
            return;
        }
        let Some(dest) = hosts.iter().find(|h| h.name == to) else {
            // The destination is not alive: the move is off.
            say(&format!(
                "VM {}: {to} has no live agent; the move is off",
                r.id
            ));
            let _ = self
                .store
                .advance(&r.id, &self.cfg.name, r.generation, |x| {
                    x.state = VmState::Running;
                });
            return;
        };
        let Ok(ferry) = exe() else { return };
        let mut cmd = Command::new(ferry);
        cmd.arg("migrate")
            .arg("--api")
            .arg(self.api(&r.id))
            .args(["--to", &dest.migrate])
            .arg("--key")
            .arg(&self.cfg.key)
            .arg("--json");
        let log = self.cfg.dir.join(format!("{}.migrate.log", r.id));
        match detached(cmd, &log) {
            Ok(child) => {
                say(&format!("moving VM {} to {to} ({})", r.id, dest.migrate));
                self.moving.insert(
                    r.id.clone(),
                    Moving {
                        child,
                        to: to.to_string(),
                        generation: r.generation,
                    },
                );
            }
            Err(e) => say(&format!("cannot start the move of VM {}: {e}", r.id)),
        }
    }

    /// Records the ends of this agent's migrations.
    fn reap_moves(&mut self) {
        let done: Vec<(String, bool)> = self
            .moving
            .iter_mut()
            .filter_map(|(id, m)| match m.child.try_wait() {
                Ok(Some(s)) => Some((id.clone(), s.success())),
                _ => None,
            })
            .collect();
        for (id, ok) in done {
            let m = self.moving.remove(&id).expect("a move");
            let me = self.cfg.name.clone();
            let r = if ok {
                say(&format!("VM {id} moved to {}", m.to));
                // The move's report (`ferry migrate --json`) gives its pause.
                let report: serde_json::Value =
                    std::fs::read_to_string(self.cfg.dir.join(format!("{id}.migrate.log")))
                        .ok()
                        .and_then(|t| t.lines().rev().find_map(|l| serde_json::from_str(l).ok()))
                        .unwrap_or_default();
                let last = super::store::LastMove {
                    from: me.clone(),
                    to: m.to.clone(),
                    downtime_ms: report["downtime_ms"].as_f64(),
                    total_ms: report["total_ms"].as_f64(),
                    at: std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map_or(0, |d| d.as_secs()),
                };
                // The destination's agent may have recorded the arrival:
                // the move's numbers go in either way.
                let first = self.store.advance(&id, &me, m.generation, |x| {
                    x.owner = m.to.clone();
                    x.generation = m.generation + 1;
                    x.state = VmState::Running;
                    x.last_move = Some(last.clone());
                });
                if matches!(first, Err(StoreError::Fenced { .. })) {
                    // The destination claimed the generation when it
                    // admitted the move; it confirmed the commit, so the
                    // claim is settled here too if its receiver has not.
                    let _ = self.store.advance(&id, &m.to, m.generation + 1, |x| {
                        x.last_move = Some(last.clone());
                        if matches!(x.state, VmState::Arriving { .. }) {
                            x.state = VmState::Running;
                        }
                    });
                }
                first
            } else {
                say(&format!(
                    "the move of VM {id} to {} failed; it runs on here",
                    m.to
                ));
                self.store.advance(&id, &me, m.generation, |x| {
                    x.state = VmState::Running;
                })
            };
            match r {
                Ok(_) => {}
                // The destination's agent recorded the arrival first.
                Err(StoreError::Fenced { .. }) => {}
                Err(e) => say(&format!("VM {id}: recording the move's end: {e}")),
            }
        }
    }

    /// Settles a move in doubt by the record (the destination's claim
    /// has been settled: the claim itself, still standing, is handled
    /// before this): the record gives the VM to another host at a later
    /// generation (it runs there: this copy ends), or keeps it here, made
    /// final by writing it back to `running` (no destination can then
    /// claim it), and this copy resumes.
    fn settle_doubt(&mut self, r: &VmRecord, l: &Local) {
        let me = &self.cfg.name;
        let api = self.api(&r.id);
        if r.owner != *me && r.generation > l.generation {
            say(&format!(
                "VM {}: its move is in doubt here, and the record gives generation {} to {}: this copy ends",
                r.id, r.generation, r.owner
            ));
            let _ = crate::api::call(&api, &crate::api::Request::Stop);
            return;
        }
        if r.owner != *me || r.generation != l.generation {
            return;
        }
        if matches!(r.state, VmState::Moving { .. }) {
            match self.store.advance(&r.id, me, r.generation, |x| {
                x.state = VmState::Running;
            }) {
                Ok(_) => {}
                Err(StoreError::Fenced { .. }) => return, // the destination won: next turn
                Err(e) => {
                    say(&format!("VM {}: settling its move in doubt: {e}", r.id));
                    return;
                }
            }
        }
        let v = crate::api::call(
            &api,
            &crate::api::Request::Resolve {
                resume_here: true,
                destination_down: true,
            },
        );
        say(&format!(
            "VM {}: its move was in doubt; the record keeps it here at generation {}: {}",
            r.id,
            r.generation,
            match &v {
                Ok(v) => v["detail"]
                    .as_str()
                    .or(v["error"].as_str())
                    .unwrap_or("?")
                    .to_string(),
                Err(e) => e.to_string(),
            }
        ));
    }

    /// A record claimed by a move's destination, seen from either end:
    /// - at the destination, a VM that runs here at the claimed generation
    ///   settles it (`running`), in case the receiver could not;
    /// - at the source, a VM that runs on here (the move failed before its
    ///   commit, or was aborted there: not in doubt) takes it back;
    /// - at the destination, a claim with no VM here at all for a while
    ///   (its receiver died with the session) goes back to the source.
    fn settle_claim(
        &mut self,
        r: &VmRecord,
        from: &str,
        here: Option<&Local>,
        orphans: &mut HashMap<String, Instant>,
    ) {
        let me = self.cfg.name.as_str();
        let settle = |ran: bool, what: &str| match self.store.settle_arrival(
            &r.id,
            &r.owner,
            r.generation,
            ran,
        ) {
            Ok(true) => say(&format!("VM {}: {what}", r.id)),
            Ok(false) => {}
            Err(e) => say(&format!("VM {}: settling its move's claim: {e}", r.id)),
        };
        if r.owner == me {
            match here {
                Some(l) if l.state == "running" && l.generation == r.generation => settle(
                    true,
                    &format!("arrived here at generation {}", r.generation),
                ),
                Some(_) => {}
                None if self.starting(&r.id) => {}
                None => {
                    let since = self
                        .orphans
                        .get(&r.id)
                        .copied()
                        .unwrap_or_else(Instant::now);
                    orphans.insert(r.id.clone(), since);
                    if since.elapsed() > Duration::from_secs(5) {
                        settle(
                            false,
                            &format!(
                                "its move here left no VM; the record gives it back to {from}"
                            ),
                        );
                    }
                }
            }
        } else if from == me
            && !self.moving.contains_key(&r.id)
            && here.is_some_and(|l| l.state == "running" && l.generation + 1 == r.generation)
        {
            settle(
                false,
                &format!("its move to {} failed; it runs on here", r.owner),
            );
        }
    }

    /// CPU the VMs here used since the last turn, in cores.
    fn measure(&mut self, locals: &HashMap<String, Local>) {
        let hz = 100.0; // USER_HZ on Linux.
        let mut load = 0.0;
        let mut seen = HashMap::new();
        for l in locals.values() {
            let Some(t) = cpu_ticks(l.pid) else { continue };
            let now = Instant::now();
            if let Some((t0, at)) = self.cpu.get(&l.pid) {
                let secs = now.duration_since(*at).as_secs_f64();
                if secs > 0.0 {
                    load += t.saturating_sub(*t0) as f64 / hz / secs;
                }
            }
            seen.insert(l.pid, (t, now));
        }
        self.cpu = seen;
        self.load = load;
    }

    /// One look at the records, acting on what names this host.
    pub fn turn(&mut self) -> Result<(), StoreError> {
        self.ensure_receiver();
        self.reap_moves();
        let locals = self.locals();
        self.measure(&locals);
        // The record is rewritten when the load moved, or every few
        // seconds (which also finds an expired lease): each write is an
        // fsync on every etcd member.
        let due = (self.load - self.reported.0).abs() > 0.1
            || self.reported.1.elapsed() > Duration::from_secs(3);
        if let Some(reg) = self.reg.as_ref().filter(|_| due) {
            match self.store.update_host(&self.record(), reg) {
                Ok(()) => self.reported = (self.load, Instant::now()),
                Err(StoreError::Missing(_)) => {
                    say("this host's lease expired (cut off from etcd?); registering again");
                    self.reg = None;
                }
                Err(e) => say(&format!("reporting the load: {e}")),
            }
        }
        if self.reg.is_none() {
            self.register()?;
        }
        let view = self.store.view()?;
        let me = self.cfg.name.clone();
        let mut orphans = HashMap::new();
        for r in &view.vms {
            let here = locals.get(&r.id);
            if let VmState::Arriving { from } = &r.state {
                self.settle_claim(r, from, here, &mut orphans);
                continue;
            }
            // An arrival: the VM runs here past the record's generation.
            if let Some(l) = here
                && l.state == "running"
                && (r.owner != me || l.generation > r.generation)
                && l.generation > r.generation
            {
                let (owner, g) = (r.owner.clone(), l.generation);
                match self.store.advance(&r.id, &owner, r.generation, |x| {
                    x.owner = me.clone();
                    x.generation = g;
                    x.state = VmState::Running;
                }) {
                    Ok(_) => say(&format!("VM {} arrived here at generation {g}", r.id)),
                    Err(StoreError::Fenced { .. }) => {}
                    Err(e) => say(&format!("VM {}: recording its arrival: {e}", r.id)),
                }
                continue;
            }
            // A move of this host's whose end is in doubt (Commit went out,
            // no answer came, the destination cannot be asked): the record
            // decides, since a fleet move's destination holds its claim on
            // the record from admission until the move has ended there.
            if let Some(l) = here
                && l.state == "in-doubt"
                && !self.moving.contains_key(&r.id)
            {
                self.settle_doubt(r, l);
                continue;
            }
            // A stale copy: the record gives the VM to another host at a
            // later generation (an operator confirmed this host down and
            // it came back). Only settled states: a move's own ends are
            // the migration protocol's.
            if let Some(l) = here
                && r.owner != me
                && r.generation > l.generation
                && (l.state == "running" || l.state == "paused")
            {
                say(&format!(
                    "VM {} runs here at generation {}, but its record gives generation {} to {}: stopping this stale copy",
                    r.id, l.generation, r.generation, r.owner
                ));
                let _ = crate::api::call(&self.api(&r.id), &crate::api::Request::Stop);
                continue;
            }
            if r.owner != me {
                continue;
            }
            match &r.state {
                VmState::Running => {
                    let runs = here.is_some_and(|l| l.state != "gone");
                    // A start under way is left to finish: raising the
                    // generation again would leave the record ahead of the
                    // VM it names.
                    if !runs && !self.moving.contains_key(&r.id) && !self.starting(&r.id) {
                        // Fence any copy elsewhere first: the record's
                        // next generation is this start's.
                        let next = r.generation + 1;
                        match self.store.advance(&r.id, &me, r.generation, |x| {
                            x.generation = next;
                        }) {
                            Ok(rec) => self.start_vm(&rec),
                            Err(e) => say(&format!("VM {}: {e}", r.id)),
                        }
                    }
                }
                VmState::Moving { to } => {
                    if here.is_some_and(|l| l.state == "running") {
                        let to = to.clone();
                        self.move_vm(r, &to, &view.hosts);
                    }
                }
                VmState::Fenced | VmState::Lost | VmState::Arriving { .. } => {}
            }
        }
        self.orphans = orphans;
        Ok(())
    }

    /// Turns until the process is told to stop.
    pub fn run(mut self) -> Result<(), StoreError> {
        loop {
            if let Err(e) = self.turn() {
                say(&format!("{e}; trying again"));
            }
            if crate::stop::requested().is_some() {
                say("stopping (the VMs and the receiver run on)");
                return Ok(());
            }
            std::thread::sleep(self.cfg.tick);
        }
    }
}
