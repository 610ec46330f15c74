//! The VM's control path: typed [`Command`]s from other threads (the
//! control socket's, a migration's) to the vCPU thread, which alone
//! touches the VM's state, and only while the vCPU is out of KVM_RUN.
//!
//! A caller puts a command in the [`Mailbox`] and waits for its [`Reply`];
//! the mailbox kicks the vCPU out of KVM_RUN ([`crate::kick::Kick`]: never
//! lost, never repeated) or wakes the vCPU thread where it waits while the
//! VM is paused. JSON exists only at the socket (`crate::api`).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, mpsc};
use std::time::Duration;

use serde::Serialize;

use crate::kick::Kick;
use crate::kvm::Machine;
use crate::lifecycle::Event;
use crate::memory::GuestRam;
use crate::snapshot::{ConfigState, Identity, VmState};

/// What to do after a snapshot.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    /// Run on.
    #[default]
    Resume,
    /// Stay paused.
    Pause,
    /// End the VM (the snapshot is now the VM).
    Stop,
}

/// A request to the vCPU thread.
#[derive(Debug)]
pub enum Command {
    /// How the VM is.
    Status,
    /// Stop the vCPU and the devices; guest time stops with them.
    Pause,
    /// Run again; guest time goes on by the real time that passed.
    Resume,
    /// Write a snapshot (pausing if running) into `file`, signed with
    /// `key` if given, then do `then`.
    Snapshot {
        /// The file to write (the caller made it; the VMM never opens a
        /// path it is given).
        file: std::fs::File,
        /// What after.
        then: After,
        /// The host key to sign it with.
        key: Option<crate::migration::key::Psk>,
    },
    /// End the VM.
    Stop,
    /// A step of the VM's lifecycle (a migration's; see
    /// [`crate::lifecycle`]). `Begin` answers with the
    /// [`SourceContext`]; `Stop` answers twice (see [`Mailbox::request`]):
    /// [`Reply::Paused`] as soon as guest memory stops changing, with the
    /// state but the vCPU's rest, then [`Reply::Rest`].
    Lifecycle(Event),
    /// Start (true) or stop recording the frames the card reads (the
    /// capture overlap a migration's destination drops).
    Record(bool),
}

/// The vCPU thread's answer.
#[derive(Debug)]
pub enum Reply {
    /// Done.
    Done,
    /// The status.
    Status(Box<Status>),
    /// A snapshot was written.
    Snapshot(SnapshotReport),
    /// A migration may start: what it needs.
    Migration(Box<SourceContext>),
    /// The VM is stopped, and nothing writes its memory any more (the
    /// first of `Lifecycle(Stop)`'s two answers: the source sends the
    /// state and collects the last dirty pages while the rest of the
    /// vCPU's is read).
    Paused {
        /// When KVM_RUN returned for the stop: the guest's last
        /// instruction here (a migration's downtime starts there).
        left_guest: std::time::Instant,
        /// The VM's state, its vCPU's rest left empty.
        state: Box<VmState>,
    },
    /// The rest of the vCPU's state (`Lifecycle(Stop)`'s second answer).
    Rest(Box<crate::kvm::VcpuRest>),
    /// Refused, and why.
    Refused(String),
}

/// What a snapshot cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct SnapshotReport {
    /// Bytes of the file.
    pub bytes: u64,
    /// How long the guest stood still for it, in µs (from the pause to the
    /// resume; to the end of the write if it stays paused or stops).
    pub paused_us: u64,
    /// Of which writing the file, in µs.
    pub write_us: u64,
}

/// What a migration's source needs of the running VM: the KVM VM (its
/// dirty log), guest memory, who the VM is and how it is configured.
#[derive(Clone, Debug)]
pub struct SourceContext {
    /// The KVM VM.
    pub machine: Arc<Machine>,
    /// Guest memory.
    pub mem: GuestRam,
    /// The VM's configuration.
    pub config: ConfigState,
    /// The VM's identity and current generation.
    pub identity: Identity,
    /// The CPU features the guest booted with.
    pub cpu: crate::kvm::CpuFeatures,
}

/// A VM's status, as `ferry status` shows it.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct Status {
    /// The lifecycle state's short name (`running`, `paused`, `in-doubt`,
    /// `arriving`, ...).
    pub state: String,
    /// The state in a sentence.
    pub detail: String,
    /// The VM's identity (32 hex digits).
    pub id: String,
    /// Its generation (arrivals since its first boot).
    pub generation: u64,
    /// The image it booted from.
    pub image: String,
    /// The kernel it carries: "ferry" (Ferry's runtime) or "hermit"
    /// (RustyHermit, a std application).
    pub kernel: String,
    /// Guest memory, bytes.
    pub memory: u64,
    /// The VM process's ID.
    pub pid: u32,
    /// Seconds since the VM started running in this process.
    pub uptime_s: f64,
    /// Guest time, ns since the guest booted.
    pub guest_time_ns: u64,
    /// `pvm-native`, `pvm-emulated` or `hardware`.
    pub cpu_mode: String,
    /// The vCPU's KVM counters: exits, emulated instructions, halts,
    /// injected interrupts.
    pub kvm: KvmCounters,
    /// The network card.
    pub net: Option<NetStatus>,
    /// Guest console bytes the host output did not take (a closed
    /// terminal).
    pub console_lost_bytes: u64,
    /// Guest console bytes dropped for going over the console's rate.
    pub console_dropped_bytes: u64,
    /// The VMM's confinement: seccomp, capabilities, jail.
    pub lockdown: String,
}

/// The vCPU's KVM counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct KvmCounters {
    /// Exits to KVM.
    pub exits: u64,
    /// Instructions KVM emulated.
    pub insn_emulation: u64,
    /// HLT exits.
    pub halt_exits: u64,
    /// Interrupts injected.
    pub irq_injections: u64,
}

/// The network card's settings and counters.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct NetStatus {
    /// The tap on this host.
    pub tap: String,
    /// The MAC address.
    pub mac: String,
    /// The address with its prefix.
    pub ip: String,
    /// The gateway.
    pub gateway: Option<String>,
    /// Frames delivered to the guest.
    pub rx_frames: u64,
    /// Frames the guest sent.
    pub tx_frames: u64,
    /// Of those, TSO super-frames the card cut into segments.
    pub tx_gso_frames: u64,
    /// Frames dropped (too large, malformed, bad checksum).
    pub dropped: u64,
    /// Interrupts raised.
    pub interrupts: u64,
    /// Frames captured while the VM arrived here.
    pub captured: u64,
    /// Captured frames dropped as ones the source had already read.
    pub duplicates: u64,
    /// Frames the guest sent that were refused (another source MAC or
    /// address, not IPv4/ARP, offload fields not matching the headers).
    pub tx_refused: u64,
}

struct Job {
    cmd: Command,
    reply: mpsc::Sender<Reply>,
}

/// The queue between the threads that ask and the vCPU thread.
#[derive(Default)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Job>>,
    cv: Condvar,
    kick: Kick,
    closed: AtomicBool,
    /// While the VM is being brought in (a migration's destination, before
    /// its commit): what `status` says. Other commands are refused.
    arriving: Mutex<Option<Status>>,
}

impl std::fmt::Debug for Mailbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mailbox")
            .field("closed", &self.closed.load(Ordering::Relaxed))
            .finish()
    }
}

impl Mailbox {
    /// An empty mailbox.
    pub fn new() -> Arc<Mailbox> {
        Arc::new(Mailbox::default())
    }

    /// The kick of the vCPU this mailbox serves.
    pub fn kick(&self) -> &Kick {
        &self.kick
    }

    /// Sends `cmd` to the vCPU thread and waits for its answer; `None` if
    /// the VM ended first.
    pub fn call(&self, cmd: Command) -> Option<Reply> {
        self.request(cmd)?.next()
    }

    /// Sends `cmd` to the vCPU thread; its answers come through the
    /// returned [`Answers`] (one, but two for a migration's
    /// `Lifecycle(Stop)`). `None` if the VM has ended.
    pub fn request(&self, cmd: Command) -> Option<Answers> {
        if let Some(status) = self.arriving.lock().expect("mailbox").as_ref() {
            let (tx, rx) = mpsc::channel();
            let _ = tx.send(match cmd {
                Command::Status => Reply::Status(Box::new(status.clone())),
                _ => Reply::Refused(format!(
                    "the VM has not arrived here yet ({})",
                    status.detail
                )),
            });
            return Some(Answers(rx));
        }
        self.enqueue(cmd).map(Answers)
    }

    /// Queues `cmd` for the vCPU thread and kicks it; where its answer
    /// comes, or `None` if the VM has ended.
    fn enqueue(&self, cmd: Command) -> Option<mpsc::Receiver<Reply>> {
        let (tx, rx) = mpsc::channel();
        {
            let mut q = self.queue.lock().expect("mailbox");
            if self.closed.load(Ordering::Acquire) {
                return None;
            }
            q.push_back(Job { cmd, reply: tx });
            // Under the lock, as `next` clears the mark under it once the
            // queue is empty: a kick marked after the vCPU thread took
            // the job would stay pending, and stop the vCPU once for
            // nothing.
            self.kick.request();
        }
        self.cv.notify_all();
        Some(rx)
    }

    /// Sends `cmd` to the vCPU thread without waiting for it to be served
    /// (its answer is dropped); commands are served in order, so a later
    /// [`Mailbox::call`] from the same thread finds it applied. False if
    /// the VM has ended. (A migration's source tells the lifecycle of its
    /// Commit this way: waiting for a parked vCPU thread to wake and
    /// answer cost the pause up to 2 ms on a busy host.)
    pub fn post(&self, cmd: Command) -> bool {
        if self.arriving.lock().expect("mailbox").is_some() {
            return false;
        }
        self.enqueue(cmd).is_some()
    }

    /// For the vCPU thread: the next command, waiting up to `wait` for
    /// one. Answer it through the [`Responder`].
    pub fn next(&self, wait: Duration) -> Option<(Command, Responder)> {
        let mut q = self.queue.lock().expect("mailbox");
        if q.is_empty() && !wait.is_zero() {
            q = self.cv.wait_timeout(q, wait).expect("mailbox").0;
        }
        let job = q.pop_front();
        if q.is_empty() {
            self.kick.clear();
        }
        job.map(|j| (j.cmd, Responder(j.reply)))
    }

    /// While the VM is arriving: `status` answers `s`, everything else is
    /// refused. `None` once the vCPU thread serves the mailbox.
    pub fn set_arriving(&self, s: Option<Status>) {
        *self.arriving.lock().expect("mailbox") = s;
    }

    /// The VM has ended: waiting and later callers get `None`.
    pub fn close(&self) {
        let mut q = self.queue.lock().expect("mailbox");
        self.closed.store(true, Ordering::Release);
        q.clear();
    }

    /// Whether the VM has ended.
    pub fn closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

/// Where the vCPU thread's answer goes.
#[derive(Debug)]
pub struct Responder(mpsc::Sender<Reply>);

impl Responder {
    /// Answers (the caller may have gone; that is fine).
    pub fn send(self, r: Reply) {
        let _ = self.0.send(r);
    }

    /// An answer before the last one ([`Reply::Paused`]).
    pub fn early(&self, r: Reply) {
        let _ = self.0.send(r);
    }
}

/// The answers to one [`Mailbox::request`], in order.
#[derive(Debug)]
pub struct Answers(mpsc::Receiver<Reply>);

impl Answers {
    /// The next answer; `None` if the VM ended before giving it.
    pub fn next(&self) -> Option<Reply> {
        self.0.recv().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_post_is_served_before_a_later_call() {
        let m = Mailbox::new();
        let m2 = m.clone();
        let vcpu = std::thread::spawn(move || {
            let mut seen = Vec::new();
            while seen.len() < 2 {
                if let Some((cmd, r)) = m2.next(Duration::from_millis(50)) {
                    seen.push(matches!(cmd, Command::Pause));
                    r.send(Reply::Done);
                }
            }
            seen
        });
        assert!(m.post(Command::Pause));
        assert!(matches!(m.call(Command::Resume), Some(Reply::Done)));
        assert_eq!(vcpu.join().unwrap(), [true, false]);
        m.close();
        assert!(!m.post(Command::Pause), "an ended VM takes no posts");
    }

    #[test]
    fn a_call_waits_for_the_vcpu_threads_answer_and_kicks_it() {
        let m = Mailbox::new();
        let m2 = m.clone();
        let vcpu = std::thread::spawn(move || {
            loop {
                if let Some((cmd, r)) = m2.next(Duration::from_millis(50)) {
                    assert!(matches!(cmd, Command::Pause));
                    r.send(Reply::Done);
                    return;
                }
            }
        });
        assert!(matches!(m.call(Command::Pause), Some(Reply::Done)));
        vcpu.join().unwrap();
        assert!(!m.kick().pending(), "served: nothing pending");
        m.close();
        assert!(m.call(Command::Status).is_none());
    }

    /// A migration's Stop is answered twice, in order: the pause, then the
    /// state; an answer never given reads as the VM's end.
    #[test]
    fn a_request_takes_every_answer_in_order() {
        let m = Mailbox::new();
        let m2 = m.clone();
        let vcpu = std::thread::spawn(move || {
            loop {
                if let Some((_, r)) = m2.next(Duration::from_millis(50)) {
                    r.early(Reply::Paused {
                        left_guest: std::time::Instant::now(),
                        state: Box::new(crate::snapshot::shaped_like_a_vm()),
                    });
                    r.send(Reply::Refused("no state".into()));
                    return;
                }
            }
        });
        let answers = m.request(Command::Lifecycle(Event::Stop)).unwrap();
        assert!(matches!(answers.next(), Some(Reply::Paused { .. })));
        assert!(matches!(answers.next(), Some(Reply::Refused(e)) if e == "no state"));
        assert!(answers.next().is_none(), "no third answer");
        vcpu.join().unwrap();
    }

    #[test]
    fn an_arriving_vm_answers_status_and_refuses_the_rest() {
        let m = Mailbox::new();
        m.set_arriving(Some(Status {
            state: "arriving".into(),
            detail: "receiving memory from hostA".into(),
            ..Status::default()
        }));
        assert!(matches!(m.call(Command::Status), Some(Reply::Status(s)) if s.state == "arriving"));
        assert!(
            matches!(m.call(Command::Resume), Some(Reply::Refused(r)) if r.contains("not arrived"))
        );
    }
}
