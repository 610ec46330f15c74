//! The destination side, in the arriving VM's own process: the receiver
//! ([`super::receiver`]) admitted the session and started this process
//! with the connection (fd 3) and a socket pair to itself (fd 4), over
//! which it hands over the channel's keys and the source's Open, and later
//! asks resolve questions.
//!
//! ```text
//!  ADMITTED -> RECEIVING -> CAPTURING -> READY --Commit / resolve--> COMMITTED -> RUNNING
//!         any failure, EOF, a bad record, commit_wait --> ABORTED (discard, exit)
//! ```
//!
//! Every step that can fail on this host (memory, the KVM VM, the tap, the
//! control socket, loading the state) happens before READY. The source
//! sends Commit right behind Done, without waiting to hear that the state
//! loaded, so a Commit read here always follows every page; a state that
//! fails to load aborts the session, and the source, waiting for
//! Committed, reads the Abort and resumes. The session is READY once the
//! state is loaded and Done is read (the VM is whole here): only then may
//! a resolve question,
//! which carries the source's Commit, run it. READY is left once, under
//! the [`Phase`] lock: to COMMITTED when Commit is read or a resolve query
//! carries it, to ABORTED when the connection breaks or `commit_wait`
//! passes. The receiver hears "committed" before the VM runs its first
//! instruction, so that if this process dies the receiver knows the VM may
//! have run.

use std::io::Write as _;
use std::net::TcpStream;
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Error;
use super::channel::{Channel, SessionKeys};
use super::failpoint::{self, Action};
use super::wire::{Committed, Message, Open, Outcome, Reader, WireError, Writer};
use crate::api::Api;
use crate::control::{Mailbox, Status};
use crate::devices::console::Console;
use crate::memory;
use crate::snapshot::Identity;
use crate::vm::{End, Incoming, Vm};

/// The fd of the connection to the source in the VM's process.
pub const STREAM_FD: i32 = 3;
/// The fd of the socket pair to the receiver.
pub const IPC_FD: i32 = 4;

/// What the receiver hands to the VM's process.
#[derive(Debug)]
pub struct Handoff {
    /// The channel's keys and counters.
    pub keys: SessionKeys,
    /// The source's Open.
    pub open: Open,
    /// The tap for the card.
    pub tap: Option<String>,
    /// The control socket to bind.
    pub api: Option<PathBuf>,
    /// Capture frames while the VM moves.
    pub capture: bool,
    /// This receiver's name (for messages).
    pub host: String,
}

/// Where a session stands, as the VM's process tells its receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Set up; receiving memory and the state.
    Admitted,
    /// Committed: the VM is about to run (or runs).
    Committed,
    /// The VM runs.
    Running,
    /// The session ended without a commit.
    Aborted(String),
}

/// IPC message tags (receiver <-> VM process).
const TAG_HANDOFF: u8 = 1;
const TAG_RESOLVE: u8 = 2;
const TAG_STEP: u8 = 3;
const TAG_ANSWER: u8 = 4;

impl Handoff {
    /// Encodes the handoff message.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let mut w = Writer(&mut out);
        w.u8(TAG_HANDOFF);
        for k in [&self.keys.send, &self.keys.recv] {
            w.option(k.as_ref(), |w, (key, n)| {
                w.raw(key);
                w.u64(*n);
            });
        }
        let mut open = Vec::new();
        Message::Open(self.open.clone()).encode(&mut open);
        w.bytes(&open);
        w.option(self.tap.as_ref(), |w, t| w.string(t));
        w.option(self.api.as_ref(), |w, a| w.string(&a.display().to_string()));
        w.u8(self.capture as u8);
        w.string(&self.host);
        out
    }

    /// Decodes a handoff message.
    pub fn decode(b: &[u8]) -> Result<Handoff, WireError> {
        let mut r = Reader::new(b);
        if r.u8("tag")? != TAG_HANDOFF {
            return Err(WireError::Invalid("not a handoff".into()));
        }
        let key = |r: &mut Reader| {
            r.option("key", |r| {
                let k: [u8; 32] = r.take(32, "key")?.try_into().expect("32");
                Ok((k, r.u64("counter")?))
            })
        };
        let send = key(&mut r)?;
        let recv = key(&mut r)?;
        let open = match Message::decode(r.bytes("open", 64 << 10)?)? {
            Message::Open(o) => o,
            _ => return Err(WireError::Invalid("the handoff carries no Open".into())),
        };
        let h = Handoff {
            keys: SessionKeys { send, recv },
            open,
            tap: r.option("tap", |r| r.string("tap"))?,
            api: r.option("api", |r| r.string("api").map(PathBuf::from))?,
            capture: r.u8("capture")? != 0,
            host: r.string("host")?,
        };
        r.finish()?;
        Ok(h)
    }
}

/// The receiver's resolve question.
pub fn encode_resolve() -> Vec<u8> {
    vec![TAG_RESOLVE]
}

/// A step report, encoded.
pub fn encode_step(s: &Step) -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = Writer(&mut out);
    w.u8(TAG_STEP);
    let (code, reason) = match s {
        Step::Admitted => (1, ""),
        // 2 was Ready (said on the pause's path; it told nothing a resolve
        // answer needs).
        Step::Committed => (3, ""),
        Step::Running => (4, ""),
        Step::Aborted(r) => (5, r.as_str()),
    };
    w.u8(code);
    w.string(reason);
    out
}

/// What the VM process says to its receiver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Report {
    /// A step.
    Step(Step),
    /// The answer to a resolve question.
    Answer(Outcome),
}

/// Decodes a report from the VM process.
pub fn decode_report(b: &[u8]) -> Result<Report, WireError> {
    let mut r = Reader::new(b);
    let rep = match r.u8("tag")? {
        TAG_STEP => {
            let code = r.u8("step")?;
            let reason = r.string("reason")?;
            Report::Step(match code {
                1 => Step::Admitted,
                3 => Step::Committed,
                4 => Step::Running,
                5 => Step::Aborted(reason),
                value => {
                    return Err(WireError::Unknown {
                        what: "step",
                        value,
                    });
                }
            })
        }
        TAG_ANSWER => match Message::decode(r.take(b.len() - 1, "answer")?)? {
            Message::Outcome(o) => Report::Answer(o),
            _ => return Err(WireError::Invalid("an answer without an outcome".into())),
        },
        value => {
            return Err(WireError::Unknown {
                what: "report",
                value,
            });
        }
    };
    r.finish()?;
    Ok(rep)
}

fn encode_answer(o: &Outcome) -> Vec<u8> {
    let mut out = vec![TAG_ANSWER];
    Message::Outcome(o.clone()).encode(&mut out);
    out
}

/// The session's phase, shared by the thread that reads the connection,
/// the one that answers the receiver, and the main thread.
#[derive(Clone, Debug, PartialEq, Eq)]
enum PhaseState {
    Receiving,
    Ready,
    Committed,
    Aborted(String),
}

/// [`PhaseState`] under its lock: each transition is one call, and
/// READY is left exactly once.
#[derive(Debug)]
struct Phase {
    state: Mutex<PhaseState>,
}

impl Phase {
    fn new() -> Phase {
        Phase {
            state: Mutex::new(PhaseState::Receiving),
        }
    }

    fn set(&self, f: impl FnOnce(&PhaseState) -> Option<PhaseState>) -> PhaseState {
        let mut s = self.state.lock().expect("phase");
        if let Some(next) = f(&s) {
            *s = next;
        }
        s.clone()
    }

    /// RECEIVING -> READY (the state loaded, every page in); false if it
    /// was aborted meanwhile.
    fn ready(&self) -> bool {
        self.set(|s| (*s == PhaseState::Receiving).then_some(PhaseState::Ready))
            == PhaseState::Ready
    }

    /// READY -> COMMITTED.
    fn commit(&self) -> PhaseState {
        self.set(|s| (*s == PhaseState::Ready).then_some(PhaseState::Committed))
    }

    /// RECEIVING or READY -> ABORTED.
    fn abort(&self, why: &str) -> PhaseState {
        self.set(|s| {
            matches!(s, PhaseState::Receiving | PhaseState::Ready)
                .then(|| PhaseState::Aborted(why.to_string()))
        })
    }

    /// A resolve question: a session that is READY commits (the question
    /// carries the source's Commit, and the VM is whole here); one still
    /// receiving is aborted (Done or the state never came, so it cannot
    /// run here).
    fn resolve(&self) -> PhaseState {
        self.set(|s| match s {
            PhaseState::Ready => Some(PhaseState::Committed),
            PhaseState::Receiving => Some(PhaseState::Aborted(
                "a resolve question came before the state was loaded".into(),
            )),
            _ => None,
        })
    }
}

/// The VM process's link to its receiver.
struct Ipc(UnixDatagram);

impl Ipc {
    fn step(&self, s: &Step) {
        // The receiver may be gone (restarted): the VM goes on regardless.
        let _ = self.0.send(&encode_step(s));
    }
}

/// Runs a session handed over by the receiver (fds [`STREAM_FD`] and
/// [`IPC_FD`]) and, if it commits, the VM, to its end. Returns the
/// process's exit status.
/// `api_gid`: the group that may use the arriving VM's control socket too.
pub fn run_session(api_gid: Option<u32>) -> Result<i32, Error> {
    // Started as /proc/self/exe, this process would be "exe" to ps, top
    // and pgrep: it is the VM's, a ferry like the source's.
    // SAFETY: PR_SET_NAME reads a NUL-terminated string (cut at 16 bytes).
    unsafe { libc::prctl(libc::PR_SET_NAME, c"ferry".as_ptr()) };
    crate::stop::install().map_err(|e| Error::Local(format!("signal handling: {e}")))?;
    // SAFETY: the receiver started this process with these two fds open
    // for it and nothing else owns them.
    let (stream, ipc) = unsafe {
        (
            TcpStream::from_raw_fd(STREAM_FD),
            UnixDatagram::from_raw_fd(IPC_FD),
        )
    };
    let mut buf = vec![0u8; 128 << 10];
    let n = ipc
        .recv(&mut buf)
        .map_err(|e| Error::Local(format!("reading the handoff: {e}")))?;
    let h = Handoff::decode(&buf[..n]).map_err(|e| Error::Local(format!("handoff: {e}")))?;
    // Until the VM pauses at the source, this process is background work
    // for the whole host: its group, not just its receiving thread (see
    // `sched::Autogroup`; the receiver lowered it as it started this
    // process, where it could). Its own group: the receiver started it in
    // a session of its own.
    // SAFETY: getsid and getpid have no preconditions.
    let own_session = unsafe { libc::getsid(0) == libc::getpid() };
    let group = own_session.then(crate::sched::Autogroup::open).flatten();
    if let Some(g) = &group
        && g.nice() != Some(crate::sched::GROUP_NICE)
    {
        let _ = g.set(crate::sched::GROUP_NICE);
    }
    let ipc = Arc::new(Ipc(ipc));
    // A second handle on the connection, to wake a reader blocked on it;
    // dropped once the session is decided, so that the connection closes
    // when the channel does.
    let wake = Arc::new(Mutex::new(Some(
        stream
            .try_clone()
            .map_err(|e| Error::Local(format!("the connection: {e}")))?,
    )));
    let shut = |how| {
        if let Some(s) = wake.lock().expect("wake").as_ref() {
            let _ = s.shutdown(how);
        }
    };
    let mut ch = Channel::from_parts(stream, &h.keys)
        .map_err(|e| Error::Local(format!("the connection: {e}")))?;
    let phase = Arc::new(Phase::new());
    let say = |m: &str| eprintln!("ferry: receive: {m}");

    // The receiver's questions, answered from the phase.
    {
        let (phase, ipc) = (phase.clone(), ipc.clone());
        let generation = h.open.generation;
        let wake = wake.clone();
        crate::lockdown::spawn(
            crate::lockdown::Role::Session,
            "ferry-session-ipc",
            move || {
                let mut b = [0u8; 64];
                while let Ok(n) = ipc.0.recv(&mut b) {
                    if n == 0 || b[0] != TAG_RESOLVE {
                        break;
                    }
                    let answer = match phase.resolve() {
                        PhaseState::Committed => {
                            // Wake the main thread, blocked reading Commit
                            // (the write side stays, for Committed).
                            if let Some(s) = wake.lock().expect("wake").as_ref() {
                                let _ = s.shutdown(std::net::Shutdown::Read);
                            }
                            Outcome::Running { generation }
                        }
                        PhaseState::Aborted(reason) => {
                            // Wake a reader blocked on the connection.
                            if let Some(s) = wake.lock().expect("wake").as_ref() {
                                let _ = s.shutdown(std::net::Shutdown::Both);
                            }
                            Outcome::Aborted { reason }
                        }
                        other => Outcome::Aborted {
                            reason: format!("internal: {other:?}"),
                        },
                    };
                    let _ = ipc.0.send(&encode_answer(&answer));
                }
            },
        )
        .map_err(|e| Error::Local(format!("a thread: {e}")))?;
    }

    let open = h.open.clone();
    let mailbox = Mailbox::new();
    let base = Status {
        state: "arriving".into(),
        id: open.vm.to_string(),
        generation: open.generation,
        image: open.config.image.clone(),
        kernel: if open.config.kernel == 1 {
            "hermit"
        } else {
            "ferry"
        }
        .into(),
        memory: open.config.memory,
        pid: std::process::id(),
        ..Status::default()
    };
    let arriving = |detail: String| Status {
        detail,
        ..base.clone()
    };
    mailbox.set_arriving(Some(arriving(format!(
        "arriving from {}: receiving memory",
        open.source
    ))));
    let setup = (|| -> Result<(Incoming, Option<crate::api::ApiHandle>), String> {
        let mem = memory::create(open.config.memory)
            .map_err(|e| format!("cannot give the VM its memory here: {e}"))?;
        memory::prefer_huge_pages(&mem);
        let identity = Identity {
            id: open.vm.0,
            generation: open.generation,
        };
        let cpu = crate::kvm::CpuFeatures { words: open.cpu };
        let incoming = Incoming::new(&open.config, identity, Some(cpu), mem, h.tap.as_deref())
            .map_err(|e| format!("cannot set the VM up here: {e}"))?;
        let api = match &h.api {
            Some(p) => Some(
                Api::bind(p, api_gid)
                    .and_then(|a| {
                        a.serve(mailbox.clone(), super::source::Source::new(mailbox.clone()))
                    })
                    .map_err(|e| format!("cannot serve the control socket {}: {e}", p.display()))?,
            ),
            None => None,
        };
        Ok((incoming, api))
    })();
    // Everything this process opens is open: least privilege from here.
    let setup = setup.and_then(|(incoming, api)| {
        crate::lockdown::lock(
            crate::lockdown::Role::Vcpu,
            api.as_ref().map(|a| a.dir_fd()),
        )
        .map_err(|e| e.to_string())?;
        Ok((incoming, api))
    });
    let (incoming, api) = match setup {
        Ok(x) => x,
        Err(reason) => {
            ipc.step(&Step::Aborted(reason.clone()));
            let _ = ch.send(&Message::Refused {
                reason: reason.clone(),
            });
            say(&format!("refused the VM from {}: {reason}", ch.peer()));
            return Ok(1);
        }
    };
    ipc.step(&Step::Admitted);
    ch.send(&Message::Admitted {
        host: h.host.clone(),
    })?;
    cut_at(&ch, "dst-admitted");
    say(&format!(
        "receiving VM {} (generation {}, {} MiB) from {} ({})",
        open.vm,
        open.generation,
        open.config.memory >> 20,
        open.source,
        ch.peer()
    ));
    // The pause runs code this process has not run yet (decoding and
    // loading the state, resuming): warm it now, while the pages come.
    super::warm_up_the_pause();
    let console = Console::new(Box::new(std::io::stdout()));
    // FERRY_TRACE's marks print once the VM runs (or the session ends):
    // the pause's steps are shorter than a write to stderr.
    let held = crate::trace::Trace::new().hold();
    let received = receive(
        &mut ch,
        incoming,
        &h,
        group.as_ref(),
        &phase,
        &|d| mailbox.set_arriving(Some(arriving(d))),
        console,
    );
    let (mut vm, urgent) = match received {
        Ok(x) => x,
        Err(e) => {
            let why = e.to_string();
            phase.abort(&why);
            ipc.step(&Step::Aborted(why.clone()));
            let _ = ch.send(&Message::Abort {
                reason: why.clone(),
            });
            say(&format!(
                "the session from {} failed: {why}; the VM is discarded",
                open.source
            ));
            drop(api);
            return Ok(1);
        }
    };
    mailbox.set_arriving(Some(arriving(format!(
        "arrived from {}: loaded, waiting for its Commit",
        open.source
    ))));

    // READY (the state loaded, every page in): the source's Commit
    // (normally already here, right behind Done), a resolve question, or
    // the deadline.
    let until = Instant::now() + Duration::from_millis(u64::from(open.commit_wait_ms));
    ch.set_deadline(Some(until));
    // This thread reads Commit; a resolve question that decides first
    // (on the IPC thread) ends the connection's read side to wake it.
    let decided = match ch.recv() {
        Ok(Message::Commit {
            session,
            generation,
        }) if session == open.session && generation == open.generation => phase.commit(),
        Ok(m) => phase.abort(&format!("the source sent {} instead of Commit", m.name())),
        Err(e) => phase.abort(&format!("no Commit: {e}")),
    };
    let committed_at = Instant::now();
    crate::trace::Trace::new().mark("destination: commit received");
    if let PhaseState::Aborted(why) = decided {
        ipc.step(&Step::Aborted(why.clone()));
        // The session is decided: the source, if it still listens, resumes
        // at once on this.
        let _ = ch.send(&Message::Abort {
            reason: why.clone(),
        });
        shut(std::net::Shutdown::Both);
        say(&format!("aborted: {why}; the VM is discarded"));
        return Ok(1);
    }
    // COMMITTED: the receiver hears it before the first instruction runs.
    ipc.step(&Step::Committed);
    failpoint::hit("dst-committed");
    if !h.capture {
        // What queued in the tap meanwhile is not the VM's.
        vm.discard_waiting_frames();
    }
    wake.lock().expect("wake").take();
    let ch = Some(ch);
    let generation = open.generation;
    let ipc2 = ipc.clone();
    let vm_name = open.vm;
    vm.on_running(Box::new(move |vm| {
        // The receiver first, then the source: Committed is the last thing
        // before the guest runs again (but for this thread's priority),
        // so the source's downtime, which ends when Committed reaches it,
        // is never shorter than the real one.
        let ran = || {
            ipc2.step(&Step::Running);
            say(&format!(
                "VM {vm_name} runs here at generation {generation}"
            ));
            let _ = std::io::stderr().flush();
        };
        let Some(mut ch) = ch else { return ran() };
        if failpoint::hit("dst-running") == Some(Action::Cut) {
            ch.shutdown();
            return ran();
        }
        ran();
        let (captured, duplicates) = vm.capture_counts();
        let commit_to_running_us = committed_at.elapsed().as_micros() as u64;
        let _ = ch.send(&Message::Committed(Committed {
            generation,
            commit_to_running_us,
            captured,
            duplicates,
        }));
        // The vCPU runs on this thread, at its normal priority, once it
        // has started again (urgent until then: the VM waits for all this).
        drop(urgent);
        drop(held);
    }));
    let end = vm.run(&mailbox);
    drop(api);
    vm.end();
    Ok(exit_status(end))
}

/// Runs failpoint `name`; a `cut` drops the connection there.
fn cut_at(ch: &Channel, name: &str) {
    if failpoint::hit(name) == Some(Action::Cut) {
        ch.shutdown();
    }
}

/// The process's exit status for how the VM ended (as `ferry run`).
pub fn exit_status(end: Result<End, crate::vm::Error>) -> i32 {
    match end {
        Ok(End::Exited(status)) => status,
        Ok(End::Stopped) => 0,
        Ok(End::Moved { to, generation }) => {
            eprintln!("ferry: the VM moved to {to} (generation {generation}); it runs there now");
            0
        }
        Err(crate::vm::Error::Signalled(sig)) => {
            eprintln!("ferry: stopped by signal {sig}; the guest was ended");
            128 + sig
        }
        Err(e) => {
            eprintln!("ferry: error: the VM stopped: {e}");
            125
        }
    }
}

/// Where a destination is in receiving a VM: the order the source must
/// keep. Anything else ends the session as a protocol error.
///
/// ```text
/// Copying --StartCapture--> Capturing --Pausing--> Stopping --State--> Loading --VcpuRest--> Loaded --Done--> (finished)
///    Pages: in any of the five;  Sync: while Capturing;  Abort: anywhere (the source gave up)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Receiving {
    /// Pre-copy rounds; the VM runs at the source.
    Copying,
    /// Frames for the VM are captured; the last pre-copy rounds come,
    /// the VM still running at the source.
    Capturing,
    /// The VM stops at the source: its state, the last pages and the
    /// rest of its vCPU's state come.
    Stopping,
    /// The state is loaded but the rest of the vCPU's, which comes after
    /// (the source reads it while this loads the rest).
    Loading,
    /// The state is loaded (the VM is here, paused); the last pages, then
    /// Done, come.
    Loaded,
}

/// What receiving does to the VM being built (a trait so the order can be
/// checked, and fuzzed, without KVM).
pub trait Arrival {
    /// Writes a run of pages into guest memory.
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), String>;
    /// The VM stops at the source next: capture its frames from now on.
    fn start_capture(&mut self) -> Result<(), Error>;
    /// Decodes and loads the VM's state but the rest of its vCPU's.
    fn load(&mut self, state: &[u8]) -> Result<(), Error>;
    /// Decodes and loads the rest of the vCPU's state (the VM is then
    /// here, paused).
    fn load_rest(&mut self, rest: &[u8]) -> Result<(), Error>;
}

/// What follows a message.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Wait for the next one.
    Wait,
    /// Say that capture is on, then wait.
    CaptureOn,
    /// Say that everything up to this round's Sync is in, then wait.
    Synced(u32),
    /// The VM stops at the source: the stop-and-copy is under way, and
    /// its time is downtime.
    Stopping,
    /// Everything arrived: the VM waits for Commit.
    Finished,
}

impl Receiving {
    /// Takes one message from the source.
    pub fn on(&mut self, msg: Message<'_>, vm: &mut dyn Arrival) -> Result<Next, Error> {
        match (*self, msg) {
            (_, Message::Pages(pages)) => {
                for (gpa, data) in pages.iter() {
                    vm.write(gpa, data)
                        .map_err(|e| Error::Protocol(format!("page outside guest memory: {e}")))?;
                }
                Ok(Next::Wait)
            }
            (Receiving::Copying, Message::StartCapture) => {
                vm.start_capture()?;
                *self = Receiving::Capturing;
                Ok(Next::CaptureOn)
            }
            (Receiving::Capturing, Message::Sync { round }) => Ok(Next::Synced(round)),
            (Receiving::Capturing, Message::Pausing) => {
                *self = Receiving::Stopping;
                Ok(Next::Stopping)
            }
            (Receiving::Stopping, Message::State(bytes)) => {
                crate::trace::Trace::new().mark("destination: state received");
                vm.load(bytes)?;
                crate::trace::Trace::new().mark("destination: state loaded");
                *self = Receiving::Loading;
                Ok(Next::Wait)
            }
            (Receiving::Loading, Message::VcpuRest(bytes)) => {
                crate::trace::Trace::new().mark("destination: vCPU rest received");
                vm.load_rest(bytes)?;
                crate::trace::Trace::new().mark("destination: vCPU rest loaded");
                *self = Receiving::Loaded;
                Ok(Next::Wait)
            }
            (Receiving::Loaded, Message::Done) => {
                crate::trace::Trace::new().mark("destination: last pages in");
                Ok(Next::Finished)
            }
            (_, Message::Abort { reason }) => Err(Error::Peer(reason)),
            (at, m) => Err(Error::Protocol(format!(
                "unexpected {} while {}",
                m.name(),
                match at {
                    Receiving::Copying => "copying memory",
                    Receiving::Capturing => "receiving the last pre-copy rounds",
                    Receiving::Stopping => "waiting for the VM's state",
                    Receiving::Loading => "waiting for the rest of the vCPU's state",
                    Receiving::Loaded => "receiving the last pages",
                }
            ))),
        }
    }
}

/// The real [`Arrival`]: the VM being set up, being loaded, then loaded.
struct Building {
    incoming: Option<Incoming>,
    loading: Option<crate::vm::incoming::Loading>,
    loaded: Option<Vm>,
    console: Option<Console>,
    capture: bool,
}

impl Arrival for Building {
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let mem = match (&self.incoming, &self.loading, &self.loaded) {
            (Some(i), _, _) => i.memory(),
            (None, Some(l), _) => l.memory(),
            (None, None, Some(vm)) => vm.memory(),
            (None, None, None) => return Err("no VM".into()),
        };
        memory::write(mem, gpa, data).map_err(|e| e.to_string())
    }

    fn start_capture(&mut self) -> Result<(), Error> {
        if self.capture
            && let Some(i) = self.incoming.as_mut()
        {
            i.start_capture();
        }
        Ok(())
    }

    fn load(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if failpoint::hit("dst-state") == Some(Action::Fail) {
            return Err(Error::Local(
                "failpoint: the VM's state did not load".into(),
            ));
        }
        let state = crate::snapshot::decode_state("the migration stream", bytes)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        // The state needs no page contents: it loads while the last pages
        // are still coming.
        let incoming = self.incoming.take().ok_or(Error::Local("no VM".into()))?;
        let console = self
            .console
            .take()
            .ok_or(Error::Local("no console".into()))?;
        let loading = incoming
            .load(&state, console)
            .map_err(|e| Error::Local(format!("cannot load the VM's state: {e}")))?;
        self.loading = Some(loading);
        Ok(())
    }

    fn load_rest(&mut self, bytes: &[u8]) -> Result<(), Error> {
        let rest = crate::snapshot::decode_rest("the migration stream", bytes)
            .map_err(|e| Error::Protocol(e.to_string()))?;
        let loading = self.loading.take().ok_or(Error::Local("no VM".into()))?;
        let vm = loading
            .finish(rest)
            .map_err(|e| Error::Local(format!("cannot load the VM's state: {e}")))?;
        self.loaded = Some(vm);
        Ok(())
    }
}

/// How long the destination waits for the kernel to take its group's nice
/// value back (it takes one change per 100 ms from an unprivileged
/// process).
const GROUP_RESTORE_WITHIN: Duration = Duration::from_millis(250);

/// Receives memory, capture and the state, and loads the VM (paused).
/// `status` gets what `ferry status` should say on the way.
fn receive(
    ch: &mut Channel,
    incoming: Incoming,
    h: &Handoff,
    mut group: Option<&crate::sched::Autogroup>,
    phase: &Phase,
    status: &dyn Fn(String),
    console: Console,
) -> Result<(Vm, Option<crate::sched::Urgent>), Error> {
    let foreground = |g: &crate::sched::Autogroup| {
        if g.nice() != Some(0) && !g.restore(GROUP_RESTORE_WITHIN) {
            eprintln!(
                "ferry: receive: warning: this process's scheduling group stays at nice {}: the VM runs here at low priority",
                crate::sched::GROUP_NICE
            );
        }
    };
    // Pre-copy rounds arrive while the VM still runs on the source (maybe
    // on this machine's other core): receive them in the background, all
    // of them, until the source says the VM stops (Pausing). Measured on a
    // 2-core host with both ends on it (4 MB under a 120 MB/s stream),
    // a destination that went real-time at StartCapture instead took the
    // core from the source's vCPU at every batch of the last rounds: the
    // client saw nothing for 3 ms before the pause (`perf sched`).
    let mut background = Some(crate::sched::Background::enter());
    let mut urgent = None;
    let mut first_pages = true;
    let mut vm = Building {
        incoming: Some(incoming),
        loading: None,
        loaded: None,
        console: Some(console),
        capture: h.capture,
    };
    let mut at = Receiving::Copying;
    loop {
        if let PhaseState::Aborted(why) = phase.state.lock().expect("phase").clone() {
            return Err(Error::Local(why));
        }
        let msg = ch.recv()?;
        let pages = matches!(msg, Message::Pages(_));
        match at.on(msg, &mut vm)? {
            Next::Wait => {}
            Next::CaptureOn => {
                // The group's nice value must go back at the pause, in one
                // system call. The kernel may refuse that for up to 100 ms
                // after the last change (`sched::Autogroup`): if it would,
                // it goes back now, while the VM still runs at the source
                // (a small VM's pre-copy can be that short).
                if group.is_some_and(|g| g.recently_changed())
                    && let Some(g) = group.take()
                {
                    foreground(g);
                }
                ch.send(&Message::CaptureOn)?;
                cut_at(ch, "dst-capture-on");
                status(format!(
                    "arriving from {}: capturing, the VM pauses there",
                    h.open.source
                ));
            }
            Next::Synced(round) => ch.send(&Message::Synced { round })?,
            Next::Stopping => {
                // The VM stops at the source: the rest is downtime, and the
                // VM runs here after it. Ahead of everything on the host
                // from here (a real-time thread is outside the groups), and
                // the group back to normal for the VM that runs here next.
                drop(background.take());
                urgent = Some(crate::sched::Urgent::enter());
                if group.is_some_and(|g| g.set(0).is_ok()) {
                    group = None;
                }
            }
            Next::Finished => {
                // A group the kernel did not take back at Pausing (another
                // process changed one within 100 ms): waited for here, in
                // the pause, rather than leaving the VM at low priority.
                if let Some(g) = group.take() {
                    foreground(g);
                }
                // READY: the VM is whole here. Still urgent: it waits for
                // Commit and resume.
                if !phase.ready() {
                    return Err(Error::Local(
                        "the session was aborted before it was ready".into(),
                    ));
                }
                cut_at(ch, "dst-ready");
                let loaded = vm.loaded.take().ok_or(Error::Local("no VM".into()))?;
                return Ok((loaded, urgent.take()));
            }
        }
        if pages && first_pages {
            first_pages = false;
            cut_at(ch, "dst-precopy");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::ConfigState;

    #[test]
    fn handoffs_and_reports_round_trip() {
        let h = Handoff {
            keys: SessionKeys {
                send: Some(([1; 32], 3)),
                recv: None,
            },
            open: Open {
                session: super::super::wire::SessionId([2; 16]),
                vm: super::super::wire::VmId([3; 16]),
                generation: 7,
                config: ConfigState {
                    memory: 64 << 20,
                    cpus: 1,
                    image: "x".into(),
                    kernel: 1,
                    net: None,
                },
                cpu: [9; 7],
                commit_wait_ms: 2500,
                source: "a".into(),
            },
            tap: Some("tap0".into()),
            api: Some("/run/x.sock".into()),
            capture: true,
            host: "hostB".into(),
        };
        let back = Handoff::decode(&h.encode()).unwrap();
        assert_eq!(back.keys, h.keys);
        assert_eq!(back.open, h.open);
        assert_eq!((back.tap, back.api, back.capture), (h.tap, h.api, true));
        for s in [
            Step::Admitted,
            Step::Committed,
            Step::Running,
            Step::Aborted("x".into()),
        ] {
            assert_eq!(decode_report(&encode_step(&s)).unwrap(), Report::Step(s));
        }
        let o = Outcome::Died {
            reason: "killed".into(),
        };
        assert_eq!(
            decode_report(&encode_answer(&o)).unwrap(),
            Report::Answer(o)
        );
    }

    /// READY is left once: whichever of Commit, a resolve question, an
    /// abort comes first decides, and the others change nothing.
    /// A VM in a flat buffer: what the order checks need.
    struct Flat {
        mem: Vec<u8>,
        loads: usize,
        captures: usize,
    }

    impl Arrival for Flat {
        fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
            let end = (gpa as usize).checked_add(data.len()).ok_or("wraps")?;
            self.mem
                .get_mut(gpa as usize..end)
                .ok_or_else(|| format!("{gpa:#x} is outside"))?
                .copy_from_slice(data);
            Ok(())
        }
        fn start_capture(&mut self) -> Result<(), Error> {
            self.captures += 1;
            Ok(())
        }
        fn load(&mut self, _: &[u8]) -> Result<(), Error> {
            self.loads += 1;
            Ok(())
        }
        fn load_rest(&mut self, _: &[u8]) -> Result<(), Error> {
            self.loads += 1;
            Ok(())
        }
    }

    #[test]
    fn the_source_must_keep_the_order() {
        let flat = || Flat {
            mem: vec![0; 8192],
            loads: 0,
            captures: 0,
        };
        let mut vm = flat();
        let mut at = Receiving::Copying;
        assert_eq!(
            at.on(Message::StartCapture, &mut vm).unwrap(),
            Next::CaptureOn
        );
        assert_eq!(
            at.on(Message::Sync { round: 2 }, &mut vm).unwrap(),
            Next::Synced(2)
        );
        assert_eq!(at.on(Message::Pausing, &mut vm).unwrap(), Next::Stopping);
        assert_eq!(at, Receiving::Stopping);
        assert_eq!(at.on(Message::State(b"s"), &mut vm).unwrap(), Next::Wait);
        assert_eq!(at, Receiving::Loading);
        assert_eq!(at.on(Message::VcpuRest(b"r"), &mut vm).unwrap(), Next::Wait);
        assert_eq!(at, Receiving::Loaded);
        assert_eq!(at.on(Message::Done, &mut vm).unwrap(), Next::Finished);
        assert_eq!((vm.captures, vm.loads), (1, 2));
        // Out of order: refused, and nothing is loaded twice.
        for script in [
            &[Message::State(b"s")][..],
            &[Message::Done],
            &[Message::StartCapture, Message::Done],
            &[Message::StartCapture, Message::StartCapture],
            // The state comes only once the source said the VM stops.
            &[Message::StartCapture, Message::State(b"s")],
            &[Message::Pausing],
            &[Message::StartCapture, Message::Pausing, Message::Pausing],
            &[
                Message::StartCapture,
                Message::Pausing,
                Message::State(b"s"),
                Message::State(b"s"),
            ],
            // The rest of the vCPU's state after the state, once, and
            // Done only after both.
            &[
                Message::StartCapture,
                Message::Pausing,
                Message::VcpuRest(b"r"),
            ],
            &[
                Message::StartCapture,
                Message::Pausing,
                Message::State(b"s"),
                Message::Done,
            ],
            &[
                Message::StartCapture,
                Message::Pausing,
                Message::State(b"s"),
                Message::VcpuRest(b"r"),
                Message::VcpuRest(b"r"),
            ],
            &[Message::CaptureOn],
            &[Message::Sync { round: 1 }],
            &[
                Message::StartCapture,
                Message::Pausing,
                Message::Sync { round: 1 },
            ],
            &[Message::Commit {
                session: crate::id::SessionId([0; 16]),
                generation: 1,
            }],
        ] {
            let (mut vm, mut at) = (flat(), Receiving::Copying);
            let mut failed = false;
            for m in script.iter().cloned() {
                if let Err(e) = at.on(m, &mut vm) {
                    assert!(matches!(e, Error::Protocol(_)), "{e}");
                    failed = true;
                    break;
                }
            }
            assert!(failed, "{script:?} was accepted");
            assert!(vm.loads <= 2 && vm.captures <= 1);
        }
        let mut at = Receiving::Capturing;
        assert!(matches!(
            at.on(Message::Abort { reason: "x".into() }, &mut flat()),
            Err(Error::Peer(_))
        ));
    }

    #[test]
    fn ready_is_left_exactly_once() {
        let p = Phase::new();
        assert_eq!(p.commit(), PhaseState::Receiving, "no commit before Ready");
        assert!(p.ready());
        assert_eq!(p.commit(), PhaseState::Committed);
        assert_eq!(p.abort("late"), PhaseState::Committed);
        assert_eq!(p.resolve(), PhaseState::Committed);

        let p = Phase::new();
        assert!(p.ready());
        assert!(matches!(p.abort("cut"), PhaseState::Aborted(_)));
        assert!(matches!(p.commit(), PhaseState::Aborted(_)));
        assert!(matches!(p.resolve(), PhaseState::Aborted(_)));

        let p = Phase::new();
        assert!(p.ready());
        assert_eq!(
            p.resolve(),
            PhaseState::Committed,
            "a resolve carries the Commit"
        );

        let p = Phase::new();
        assert!(matches!(p.resolve(), PhaseState::Aborted(_)));
        assert!(!p.ready(), "aborted sessions never become Ready");
    }
}
