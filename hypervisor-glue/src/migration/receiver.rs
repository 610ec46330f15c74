//! `ferry receive`: a host's receiver of migrating VMs.
//!
//! It listens, and serves each connection on a thread of its own (at most
//! [`MAX_HANDSHAKES`] at once, each bounded by the channel's handshake
//! deadline, so an idle or hostile peer blocks nobody). An authenticated
//! peer's first message says what it wants:
//!
//! - `Open`: a migration. Admission checks it (memory, `--expect`, the
//!   VM's identity against what runs here); a refusal says why, to both
//!   sides. An admitted session goes on in a new process, the VM's own
//!   ([`super::dest`]), in a session of its own: no terminal owns it, and
//!   the receiver can end without ending it. The receiver keeps each
//!   session's last step, as the VM's process reports it.
//! - `Resolve`: a source whose Commit went unanswered asks what became of
//!   a session. A session still READY is committed by the question (the
//!   VM's process decides, under its lock); otherwise the answer comes
//!   from the session's record: `Running`, `Aborted` (it never ran here),
//!   `Died` (it committed and its process has ended since) or `Unknown`.
//!
//! The receiver keeps listening after a session fails or ends. With
//! `--once` it takes one VM and ends with it (its exit status is the VM's),
//! forwarding SIGINT/SIGTERM to it: the foreground form.

use std::collections::HashMap;
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use super::channel::{Channel, SessionKeys};
use super::dest::{self, Handoff, Report, Step};
use super::key::Credentials;
use super::wire::{Message, Open, Outcome, Resolve, SessionId, VmId};
use crate::fleet::store::{Fence, Store};

/// Connections in their handshake at once; more are closed at once.
pub const MAX_HANDSHAKES: usize = 64;
/// Connections from one address in their handshake at once: idle or
/// hostile peers on one host cannot fill the receiver's slots.
pub const MAX_HANDSHAKES_PER_PEER: usize = 4;
/// Sessions remembered (the oldest ended ones are forgotten first).
const MAX_RECORDS: usize = 1024;
/// How long admission tries to claim a fleet VM's generation while etcd
/// does not answer (an election takes a second or two).
const CLAIM_WAIT: Duration = Duration::from_secs(3);
/// What admission keeps back of the host's available memory.
pub const MEMORY_MARGIN: u64 = 256 << 20;

/// Which tap an arriving VM's card gets.
#[derive(Clone, Debug)]
pub enum TapFor {
    /// This one for every VM (`None`: no card).
    Fixed(Option<String>),
    /// One of its own, made on this bridge.
    PerVm {
        /// The bridge.
        bridge: String,
    },
}

/// Which control socket an arriving VM answers on.
#[derive(Clone, Debug)]
pub enum ApiFor {
    /// This one (`None`: none).
    Fixed(Option<PathBuf>),
    /// `ID.sock` in this directory.
    PerVm(PathBuf),
}

/// How the receiver runs.
#[derive(Clone, Debug)]
pub struct Settings {
    /// Where to listen (`ADDR:PORT`).
    pub listen: String,
    /// This receiver's name in messages (default: the listen address).
    pub name: String,
    /// The credentials.
    pub creds: Credentials,
    /// The tap for arriving VMs' cards.
    pub tap: TapFor,
    /// The control socket for an arriving VM.
    pub api: ApiFor,
    /// Largest VM admitted, bytes (None: what this host can give now).
    pub max_memory: Option<u64>,
    /// Admit only this VM.
    pub expect: Option<VmId>,
    /// Take one VM and end with it.
    pub once: bool,
    /// Capture frames while VMs move.
    pub capture: bool,
    /// Arguments for each arriving VM's process (its lockdown policy).
    pub session_args: Vec<String>,
    /// The fleet's records (an agent's receiver): a VM is admitted only if
    /// its record moves it here, and admission claims the new generation
    /// for this host (`name`) in it; the claim is settled when the session
    /// ends (the VM runs here, or the record goes back to its source).
    pub fleet: Option<Arc<Store>>,
}

#[derive(Debug)]
struct Record {
    vm: VmId,
    generation: u64,
    source: String,
    step: Step,
    pid: u32,
    /// How the VM's process ended, once it has.
    ended: Option<String>,
    ipc: Arc<UnixDatagram>,
    /// Resolve questions waiting for the VM process's answer.
    waiting: Vec<mpsc::Sender<Outcome>>,
    order: u64,
    /// This host claimed the VM's new generation in the fleet's record,
    /// and has not settled the claim yet.
    claimed: bool,
}

/// The receiver.
#[derive(Debug)]
pub struct Receiver {
    s: Settings,
    sessions: Mutex<HashMap<SessionId, Record>>,
    handshakes: AtomicUsize,
    per_peer: Mutex<HashMap<std::net::IpAddr, usize>>,
    counter: AtomicUsize,
    /// With `--once`: the session that took the VM.
    taken: Mutex<Option<SessionId>>,
}

/// What this host can give a VM now: MemAvailable, or the cgroup's
/// remaining limit if lower, less [`MEMORY_MARGIN`].
pub fn available_memory() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let avail = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|kb| kb * 1024)
        .unwrap_or(0);
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::").map(str::to_string))
        })
        .and_then(|path| {
            let dir = PathBuf::from("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
            let max: u64 = max.trim().parse().ok()?; // "max": no limit
            let cur: u64 = std::fs::read_to_string(dir.join("memory.current"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(max.saturating_sub(cur))
        });
    cgroup
        .map_or(avail, |c| c.min(avail))
        .saturating_sub(MEMORY_MARGIN)
}

fn say(m: &str) {
    eprintln!("ferry: receive: {m}");
}

impl Receiver {
    /// A receiver with these settings.
    pub fn new(s: Settings) -> Arc<Receiver> {
        Arc::new(Receiver {
            s,
            sessions: Mutex::new(HashMap::new()),
            handshakes: AtomicUsize::new(0),
            per_peer: Mutex::new(HashMap::new()),
            counter: AtomicUsize::new(0),
            taken: Mutex::new(None),
        })
    }

    /// Listens and serves until the process ends (with `--once`: until the
    /// VM it took ends, whose status it returns).
    pub fn serve(self: &Arc<Self>, listener: TcpListener) -> std::io::Result<i32> {
        say(&format!(
            "waiting for VMs on {} ({})",
            self.s.listen,
            match self.s.creds {
                Credentials::Key(_) => "authenticated and encrypted",
                Credentials::Insecure => "INSECURE: no authentication, no encryption",
            }
        ));
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    say(&format!("accept: {e}"));
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            let Ok(peer) = conn.peer_addr() else {
                continue;
            };
            if let Err(why) = self.enter_handshake(peer.ip()) {
                say(&format!("turned away {peer}: {why}"));
                continue;
            }
            let me = self.clone();
            let spawned = std::thread::Builder::new()
                .name("ferry-receive-conn".into())
                .spawn(move || {
                    me.connection(conn);
                });
            if let Err(e) = spawned {
                self.leave_handshake(peer.ip());
                say(&format!("cannot start a thread: {e}"));
            }
        }
        Ok(0)
    }

    /// Takes a handshake slot for a connection from `ip`, or says why not.
    fn enter_handshake(&self, ip: std::net::IpAddr) -> Result<(), String> {
        let mut per = self.per_peer.lock().expect("peers");
        let n = per.entry(ip).or_default();
        if *n >= MAX_HANDSHAKES_PER_PEER {
            return Err(format!(
                "{MAX_HANDSHAKES_PER_PEER} connections from {ip} are in their handshake already"
            ));
        }
        if self.handshakes.load(Ordering::Acquire) >= MAX_HANDSHAKES {
            return Err(format!(
                "{MAX_HANDSHAKES} connections are in their handshake already"
            ));
        }
        *n += 1;
        self.handshakes.fetch_add(1, Ordering::AcqRel);
        Ok(())
    }

    fn leave_handshake(&self, ip: std::net::IpAddr) {
        let mut per = self.per_peer.lock().expect("peers");
        if let Some(n) = per.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&ip);
            }
        }
        self.handshakes.fetch_sub(1, Ordering::AcqRel);
    }

    fn connection(self: &Arc<Self>, conn: TcpStream) {
        let ip = conn
            .peer_addr()
            .map(|a| a.ip())
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        let peer = conn
            .peer_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| "?".into());
        let ch = Channel::accept(conn, &self.s.creds);
        let mut ch = match ch {
            Ok(ch) => ch,
            Err(e) => {
                self.leave_handshake(ip);
                say(&format!("turned away {peer}: {e}"));
                return;
            }
        };
        let first = match ch.recv() {
            Ok(Message::Open(o)) => Ok(Ok(o)),
            Ok(Message::Resolve(q)) => Ok(Err(q)),
            Ok(m) => Err(format!("expected Open or Resolve, got {}", m.name())),
            Err(e) => Err(e.to_string()),
        };
        // The first record decrypted: the peer holds the key and this is
        // no replay.
        ch.authenticated();
        self.leave_handshake(ip);
        match first {
            Err(e) => {
                say(&format!("turned away {peer}: {e}"));
                let _ = ch.send(&Message::Abort { reason: e });
            }
            Ok(Ok(open)) => {
                let record = self.admit(&open).and_then(|()| {
                    self.admit_in_fleet(&open)
                        .inspect_err(|_| self.forget_taken(open.session))
                });
                let record = match record {
                    Ok(r) => r,
                    Err(reason) => {
                        say(&format!(
                            "refused VM {} (generation {}) from {peer}: {reason}",
                            open.vm, open.generation
                        ));
                        let _ = ch.send(&Message::Refused { reason });
                        return;
                    }
                };
                if let Err(e) = self.start(ch, open.clone(), record) {
                    say(&format!("cannot start the VM's process: {e}"));
                    self.forget_taken(open.session);
                    if record {
                        self.settle_claim(open.vm, open.generation, false);
                    }
                }
            }
            Ok(Err(q)) => {
                let outcome = self.resolve(&q);
                say(&format!(
                    "{peer} asked about session {} (VM {} generation {}): {outcome}",
                    q.session, q.vm, q.generation
                ));
                let _ = ch.send(&Message::Outcome(outcome));
            }
        }
    }

    /// Admission: why `o` may not come here, if it may not.
    fn admit(&self, o: &Open) -> Result<(), String> {
        if let Some(want) = self.s.expect
            && want != o.vm
        {
            return Err(format!("this receiver expects VM {want}, not {}", o.vm));
        }
        if o.config.cpus != 1 {
            return Err(format!(
                "{} vCPUs; this Ferry runs exactly 1",
                o.config.cpus
            ));
        }
        let max = self.s.max_memory.unwrap_or_else(available_memory);
        if o.config.memory > max {
            return Err(format!(
                "the VM needs {} MiB; this host admits at most {} MiB ({})",
                o.config.memory >> 20,
                max >> 20,
                if self.s.max_memory.is_some() {
                    "--max-memory"
                } else {
                    "what it has available, less a margin; --max-memory sets it"
                }
            ));
        }
        let sessions = self.sessions.lock().expect("sessions");
        for (sid, r) in sessions.iter() {
            if r.vm != o.vm || r.ended.is_some() {
                continue;
            }
            match &r.step {
                Step::Aborted(_) => {}
                Step::Committed | Step::Running if r.generation >= o.generation => {
                    return Err(format!(
                        "VM {} runs here already, at generation {}",
                        o.vm, r.generation
                    ));
                }
                _ if *sid != o.session => {
                    return Err(format!(
                        "a migration of VM {} to this host is under way already (session {sid})",
                        o.vm
                    ));
                }
                _ => {}
            }
        }
        drop(sessions);
        if self.s.once {
            let mut taken = self.taken.lock().expect("taken");
            if let Some(t) = *taken {
                let busy = self
                    .sessions
                    .lock()
                    .expect("sessions")
                    .get(&t)
                    .is_some_and(|r| !matches!(r.step, Step::Aborted(_)) && r.ended.is_none());
                if busy {
                    return Err("this receiver (--once) has taken its VM already".into());
                }
            }
            *taken = Some(o.session);
        }
        Ok(())
    }

    /// Admission in a fleet: the VM's record must move it here from the
    /// generation before the one it arrives at, and this host claims the
    /// new generation in it (one transaction: no other host, and no
    /// operator's confirm-down, can give that generation elsewhere while
    /// the VM moves). Whether a claim was made.
    fn admit_in_fleet(&self, o: &Open) -> Result<bool, String> {
        let Some(store) = &self.s.fleet else {
            return Ok(false);
        };
        let id = o.vm.to_string();
        let t = std::time::Instant::now();
        let mut after_unknown = false;
        loop {
            match store.claim_arrival(&id, &self.s.name, o.generation, after_unknown) {
                Ok(Fence::Won) => {
                    say(&format!(
                        "VM {id}: claimed generation {} in the fleet's record ({} us)",
                        o.generation,
                        t.elapsed().as_micros()
                    ));
                    return Ok(true);
                }
                Ok(Fence::Refused(why)) => return Err(why),
                // etcd between leaders: a claim a moment later still serves
                // (the source waits for the answer to its Open).
                Err(e) if t.elapsed() < CLAIM_WAIT => {
                    say(&format!(
                        "VM {id}: claiming its generation: {e}; trying again"
                    ));
                    after_unknown = true;
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => {
                    // A claim that was applied unanswered is the source's
                    // agent's to take back (its VM runs on there).
                    return Err(format!(
                        "this host takes only the fleet's moves, and VM {id}'s record cannot be claimed: {e}"
                    ));
                }
            }
        }
    }

    /// Settles this host's claim on a session's VM: it runs here (the
    /// record names this host as its owner, `running`), or it never will
    /// (the record goes back to the source, at the generation it runs at
    /// there). Retried while etcd does not answer, for a while; what is
    /// left then, the agents settle.
    fn settle_claim(&self, vm: VmId, generation: u64, ran: bool) {
        let Some(store) = self.s.fleet.clone() else {
            return;
        };
        let name = self.s.name.clone();
        let _ = std::thread::Builder::new()
            .name("ferry-claim".into())
            .spawn(move || {
                let id = vm.to_string();
                for _ in 0..100 {
                    match store.settle_arrival(&id, &name, generation, ran) {
                        Ok(true) => {
                            say(&format!(
                                "VM {id}: {}",
                                if ran {
                                    format!("the fleet's record names this host at generation {generation}")
                                } else {
                                    "it did not arrive; the fleet's record gives it back to its source".into()
                                }
                            ));
                            return;
                        }
                        Ok(false) => return,
                        Err(e) => {
                            say(&format!("VM {id}: recording the move's end: {e}; trying again"));
                            std::thread::sleep(Duration::from_millis(300));
                        }
                    }
                }
            });
    }

    fn forget_taken(&self, session: SessionId) {
        let mut taken = self.taken.lock().expect("taken");
        if *taken == Some(session) {
            *taken = None;
        }
    }

    /// Starts the VM's process for an admitted session.
    fn start(self: &Arc<Self>, ch: Channel, open: Open, claimed: bool) -> std::io::Result<()> {
        let tap = match &self.s.tap {
            TapFor::Fixed(t) => t.clone(),
            TapFor::PerVm { bridge } => {
                let name = crate::devices::virtio::net::tap::name_for_vm(&open.vm);
                crate::devices::virtio::net::tap::ensure_on_bridge(&name, bridge)
                    .map_err(std::io::Error::other)?;
                Some(name)
            }
        };
        let api = match &self.s.api {
            ApiFor::Fixed(a) => a.clone(),
            ApiFor::PerVm(dir) => Some(dir.join(format!("{}.sock", open.vm))),
        };
        let (stream, keys) = ch.export().map_err(std::io::Error::other)?;
        let (ours, theirs) = seqpacket_pair()?;
        let handoff = Handoff {
            keys: SessionKeys {
                send: keys.send,
                recv: keys.recv,
            },
            open: open.clone(),
            tap,
            api,
            capture: self.s.capture,
            host: self.s.name.clone(),
        };
        let stream_fd: OwnedFd = stream.into();
        // This very binary, even if an upgrade has replaced (or removed) the
        // file since the receiver started: the session speaks the
        // receiver's own hand-off and report encodings, which another
        // version need not. (`current_exe` would name the file as it is
        // now: "... (deleted)", which cannot be started.)
        let mut cmd = std::process::Command::new("/proc/self/exe");
        if let Ok(name) = std::env::current_exe() {
            cmd.arg0(name);
        }
        cmd.arg("__session")
            .args(&self.s.session_args)
            .stdin(std::process::Stdio::null());
        let (sfd, ifd) = (stream_fd.as_raw_fd(), theirs.as_raw_fd());
        // SAFETY: between fork and exec the closure calls only
        // async-signal-safe functions (setsid, the group's open/write/close,
        // dup2, fcntl) on fds this process owns and keeps open until the
        // spawn returns.
        unsafe {
            cmd.pre_exec(move || {
                libc::setsid();
                // Its start and its pre-copy are background work for this
                // host (see `sched::Autogroup`): lowered here, the exec and
                // the VM's setup are too, and with this receiver's
                // privileges the kernel's rate limit does not apply.
                crate::sched::Autogroup::lower_in_child();
                for (from, to) in [(sfd, dest::STREAM_FD), (ifd, dest::IPC_FD)] {
                    if from == to {
                        libc::fcntl(to, libc::F_SETFD, 0);
                    } else if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            })
        };
        let mut child = cmd.spawn()?;
        drop(stream_fd);
        drop(theirs);
        let ipc = Arc::new(ours);
        ipc.send(&handoff.encode())?;
        let pid = child.id();
        let order = self.counter.fetch_add(1, Ordering::AcqRel) as u64;
        {
            let mut sessions = self.sessions.lock().expect("sessions");
            if sessions.len() >= MAX_RECORDS {
                let oldest = sessions
                    .iter()
                    .filter(|(_, r)| r.ended.is_some())
                    .min_by_key(|(_, r)| r.order)
                    .map(|(k, _)| *k);
                if let Some(k) = oldest {
                    sessions.remove(&k);
                }
            }
            sessions.insert(
                open.session,
                Record {
                    vm: open.vm,
                    generation: open.generation,
                    source: open.source.clone(),
                    step: Step::Admitted,
                    pid,
                    ended: None,
                    ipc: ipc.clone(),
                    waiting: Vec::new(),
                    order,
                    claimed,
                },
            );
        }
        say(&format!(
            "admitted VM {} (generation {}) from {}: its process is {pid}",
            open.vm, open.generation, open.source
        ));
        let me = self.clone();
        std::thread::Builder::new()
            .name("ferry-receive-vm".into())
            .spawn(move || me.watch(open.session, ipc, &mut child))?;
        Ok(())
    }

    /// Follows a VM process's reports until it ends.
    fn watch(
        self: &Arc<Self>,
        session: SessionId,
        ipc: Arc<UnixDatagram>,
        child: &mut std::process::Child,
    ) {
        let mut buf = [0u8; 8192];
        loop {
            let n = match ipc.recv(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            let Ok(report) = dest::decode_report(&buf[..n]) else {
                continue;
            };
            let mut sessions = self.sessions.lock().expect("sessions");
            let Some(r) = sessions.get_mut(&session) else {
                continue;
            };
            match report {
                Report::Step(Step::Running) if r.claimed => {
                    r.step = Step::Running;
                    r.claimed = false;
                    let (vm, generation) = (r.vm, r.generation);
                    drop(sessions);
                    // The record names this host as the VM's owner now.
                    self.settle_claim(vm, generation, true);
                }
                Report::Step(s) => r.step = s,
                Report::Answer(o) => {
                    for w in r.waiting.drain(..) {
                        let _ = w.send(o.clone());
                    }
                }
            }
        }
        let status = child.wait();
        let ended = match &status {
            Ok(s) => match (s.code(), std::os::unix::process::ExitStatusExt::signal(s)) {
                (Some(c), _) => format!("its process exited with status {c}"),
                (None, Some(sig)) => format!("its process was killed by signal {sig}"),
                _ => "its process ended".into(),
            },
            Err(e) => format!("its process could not be waited for: {e}"),
        };
        let (ran, claimed, vm, generation) = {
            let mut sessions = self.sessions.lock().expect("sessions");
            match sessions.get_mut(&session) {
                Some(r) => {
                    r.waiting.clear();
                    r.ended = Some(ended.clone());
                    say(&format!("VM {} (session {session}): {ended}", r.vm));
                    let claimed = std::mem::take(&mut r.claimed);
                    let ran = matches!(r.step, Step::Committed | Step::Running);
                    (ran, claimed, r.vm, r.generation)
                }
                None => (false, false, VmId([0; 16]), 0),
            }
        };
        if claimed {
            // Never ran here: the claim goes back to the source. (One that
            // committed and died before it ran is left to the agents: the
            // source is in doubt, and the record must not say it ran here.)
            if !ran {
                self.settle_claim(vm, generation, false);
            }
        }
        if self.s.once {
            if ran {
                let code = status
                    .ok()
                    .and_then(|s| {
                        s.code().or_else(|| {
                            std::os::unix::process::ExitStatusExt::signal(&s).map(|g| 128 + g)
                        })
                    })
                    .unwrap_or(125);
                std::process::exit(code);
            }
            self.forget_taken(session);
        }
    }

    /// Answers a resolve question (see the module doc).
    fn resolve(&self, q: &Resolve) -> Outcome {
        let rx = {
            let mut sessions = self.sessions.lock().expect("sessions");
            let Some(r) = sessions.get_mut(&q.session) else {
                return Outcome::Unknown;
            };
            if r.vm != q.vm || r.generation != q.generation {
                return Outcome::Unknown;
            }
            if let Some(ended) = &r.ended {
                return ended_outcome(&r.step, ended);
            }
            let (tx, rx) = mpsc::channel();
            r.waiting.push(tx);
            if r.ipc.send(&dest::encode_resolve()).is_err() {
                r.waiting.pop();
                None
            } else {
                Some(rx)
            }
        };
        let answer = rx.and_then(|rx| rx.recv_timeout(Duration::from_secs(5)).ok());
        match answer {
            Some(o) => o,
            None => {
                // The VM process ended (or does not answer): its record
                // decides once it has ended.
                for _ in 0..50 {
                    {
                        let sessions = self.sessions.lock().expect("sessions");
                        if let Some(r) = sessions.get(&q.session)
                            && let Some(ended) = &r.ended
                        {
                            return ended_outcome(&r.step, ended);
                        }
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
                let pid = self
                    .sessions
                    .lock()
                    .expect("sessions")
                    .get(&q.session)
                    .map_or(0, |r| r.pid);
                // Neither answered nor ended: say nothing that could be
                // wrong. The source asks again.
                say(&format!(
                    "the VM's process {pid} does not answer a resolve question; answering Unknown"
                ));
                Outcome::Unknown
            }
        }
    }
}

/// A session's outcome once its VM process has ended.
fn ended_outcome(step: &Step, ended: &str) -> Outcome {
    match step {
        Step::Committed | Step::Running => Outcome::Died {
            reason: ended.to_string(),
        },
        Step::Aborted(why) => Outcome::Aborted {
            reason: why.clone(),
        },
        _ => Outcome::Aborted {
            reason: format!("{ended} before the commit"),
        },
    }
}

/// A connected pair of SOCK_SEQPACKET Unix sockets (close-on-exec).
fn seqpacket_pair() -> std::io::Result<(UnixDatagram, UnixDatagram)> {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into `fds`.
    let r = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: both fds were just created and are owned by nothing else;
    // send/recv on a SOCK_SEQPACKET socket keep message boundaries, which
    // is what UnixDatagram's methods use.
    Ok(unsafe {
        (
            UnixDatagram::from_raw_fd(fds[0]),
            UnixDatagram::from_raw_fd(fds[1]),
        )
    })
}

/// Takes the receiver's signals on a thread. SIGHUP (a closed terminal)
/// changes nothing. SIGINT and SIGTERM: with `--once` they go on to the
/// VM's process (which then ends, and the receiver with it); otherwise
/// the receiver ends at once and the VMs it received run on.
pub fn install_signals(once: bool, receiver: Arc<Receiver>) -> std::io::Result<()> {
    // SAFETY: plain sigset manipulation on a local set; pthread_sigmask
    // changes only this thread's mask (and the threads it starts).
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    std::thread::Builder::new()
        .name("ferry-receive-signals".into())
        .spawn(move || {
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` is valid and `sig` a valid out pointer.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                if sig == libc::SIGHUP {
                    say("SIGHUP (a closed terminal?) ignored: the receiver and its VMs run on");
                    continue;
                }
                let taken = *receiver.taken.lock().expect("taken");
                let pid = taken.and_then(|t| {
                    receiver
                        .sessions
                        .lock()
                        .expect("sessions")
                        .get(&t)
                        .filter(|r| r.ended.is_none())
                        .map(|r| r.pid)
                });
                match (once, pid) {
                    (true, Some(pid)) => {
                        // SAFETY: kill(2) on the VM process this receiver
                        // started (not yet reaped: its watcher waits).
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    }
                    _ => {
                        say(&format!("stopped by signal {sig}; VMs it received run on"));
                        std::process::exit(128 + sig);
                    }
                }
            }
        })?;
    Ok(())
}

impl Receiver {
    /// A line per session.
    pub fn describe(&self) -> Vec<String> {
        self.sessions
            .lock()
            .expect("sessions")
            .iter()
            .map(|(s, r)| {
                format!(
                    "session {s}: VM {} generation {} from {}: {:?}{}",
                    r.vm,
                    r.generation,
                    r.source,
                    r.step,
                    r.ended
                        .as_deref()
                        .map(|e| format!(", {e}"))
                        .unwrap_or_default()
                )
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ended_session_is_died_only_if_it_committed() {
        assert!(matches!(
            ended_outcome(&Step::Running, "killed by signal 9"),
            Outcome::Died { .. }
        ));
        assert!(matches!(
            ended_outcome(&Step::Committed, "killed"),
            Outcome::Died { .. }
        ));
        assert!(matches!(
            ended_outcome(&Step::Admitted, "killed"),
            Outcome::Aborted { .. }
        ));
        assert!(matches!(
            ended_outcome(&Step::Aborted("cut".into()), "exited"),
            Outcome::Aborted { reason } if reason == "cut"
        ));
    }

    #[test]
    fn available_memory_is_positive_and_below_the_total() {
        let a = available_memory();
        assert!(a > 0);
        let total: u64 = std::fs::read_to_string("/proc/meminfo")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap()
            * 1024;
        assert!(a < total);
    }
}
