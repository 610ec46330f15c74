//! The source side: runs in the VM's process, on the control socket's
//! thread, while the vCPU runs; every step that changes the VM goes to the
//! vCPU thread as a typed command ([`crate::control`]), where the VM's
//! lifecycle accepts or refuses it.
//!
//! Before Commit is sent, any failure (connection, refusal, a bad record,
//! the stop-and-copy's deadline) aborts: the VM runs on here. After it, the
//! VM stays paused until the destination's answer says where it runs; if
//! the answer does not come, the move is in doubt and the source asks the
//! receiver over new connections ([`Source::resolve`], and a thread that
//! keeps asking) until it knows.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kvm_bindings::kvm_userspace_memory_region;
use serde_json::{Value, json};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::channel::Channel;
use super::failpoint::{self, Action};
use super::key::Credentials;
use super::wire::{Message, Open, Outcome, PAGE, Resolve, SessionId};
use super::{Error, expect};
use crate::api::{MigrateRequest, Migrator};
use crate::control::{Command, Mailbox, Reply, SourceContext};
use crate::lifecycle::Event;

/// KVM_MEM_LOG_DIRTY_PAGES.
const LOG_DIRTY: u32 = 1;
/// Most pre-copy rounds before stopping anyway.
const MAX_ROUNDS: u32 = 30;
/// The share of the downtime budget the last pages may take (at the rate
/// the last round measured); pausing, the state and the commit take the
/// rest.
const LAST_PAGES_SHARE: f64 = 0.25;
/// How long the destination waits for Commit once it is READY, beyond
/// the stop-and-copy's deadline.
const COMMIT_WAIT_SLACK: Duration = Duration::from_secs(2);
/// How long the source waits for Committed after sending Commit.
const CONFIRM_WAIT: Duration = Duration::from_secs(2);
/// How long `ferry migrate` keeps asking about a move in doubt before it
/// returns (the VM process keeps asking).
const RESOLVE_WAIT: Duration = Duration::from_secs(10);
/// Before the first resolve query: long enough for the destination to
/// have seen what the source saw (a cut connection), short because the VM
/// waits paused (Commit goes out before the destination says its state
/// loaded, so a destination that dies loading it is learnt of this way).
const RESOLVE_FIRST: Duration = Duration::from_millis(50);
/// Between two resolve queries.
const RESOLVE_EVERY: Duration = Duration::from_millis(500);
/// How often progress is reported during a round.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// Parameters of a migration.
#[derive(Clone, Debug)]
pub struct Params {
    /// The destination's `ferry receive --listen` address.
    pub to: String,
    /// The credentials.
    pub creds: Credentials,
    /// How long the VM may be stopped, by plan.
    pub downtime: Duration,
    /// How far past `downtime` the stop-and-copy may go before the source
    /// gives up and resumes.
    pub margin: Duration,
}

/// A move whose end is in doubt: what asking about it takes.
#[derive(Clone, Debug)]
struct Doubt {
    to: String,
    creds: Credentials,
    query: Resolve,
    ctx: SourceContext,
}

/// The migrations of one VM. One per VM process; it is the control
/// socket's [`Migrator`].
#[derive(Debug)]
pub struct Source {
    mailbox: Arc<Mailbox>,
    doubt: Mutex<Option<Doubt>>,
}

/// How a move settled.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Settled {
    /// It runs at the destination; this copy ends.
    Gone(u64),
    /// The destination aborted the session; the VM runs on here.
    Resumed(String),
    /// It died at the destination; it runs nowhere (an operator may resume
    /// this copy).
    Lost(String),
    /// Nobody knows yet.
    Open(String),
}

fn set_dirty_logging(ctx: &SourceContext, on: bool) -> Result<(), Error> {
    for (slot, r) in ctx.mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if on { LOG_DIRTY } else { 0 },
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: the same live mapping of `mem` that is registered already;
        // only the flags change. `mem` outlives the VM (the Vm owns both).
        unsafe { ctx.machine.vm.set_user_memory_region(region) }.map_err(|e| {
            Error::Local(format!("KVM_SET_USER_MEMORY_REGION (dirty logging): {e}"))
        })?;
    }
    Ok(())
}

/// Pages dirtied since the last call, by KVM (the vCPU) or by the VMM
/// (device writes): guest-physical addresses, ascending.
fn collect_dirty(ctx: &SourceContext) -> Result<Vec<u64>, Error> {
    let mut out = Vec::new();
    for (slot, r) in ctx.mem.iter().enumerate() {
        let kvm = ctx
            .machine
            .vm
            .get_dirty_log(slot as u32, r.len() as usize)
            .map_err(|e| Error::Local(format!("KVM_GET_DIRTY_LOG: {e}")))?;
        let bitmap: &vm_memory::bitmap::AtomicBitmap = std::ops::Deref::deref(r).bitmap();
        let vmm = bitmap.get_and_reset();
        for (w, (&k, &v)) in kvm
            .iter()
            .zip(vmm.iter().chain(std::iter::repeat(&0)))
            .enumerate()
        {
            let mut bits = k | v;
            while bits != 0 {
                let b = bits.trailing_zeros() as usize;
                bits &= bits - 1;
                let page = w * 64 + b;
                if page < r.len() as usize / PAGE {
                    out.push(r.start_addr().0 + (page * PAGE) as u64);
                }
            }
        }
    }
    Ok(out)
}

fn all_pages(mem: &crate::memory::GuestRam) -> impl Iterator<Item = u64> + '_ {
    mem.iter().flat_map(|r| {
        let start = r.start_addr().0;
        (0..r.len() / PAGE as u64).map(move |i| start + i * PAGE as u64)
    })
}

/// Reads the destination's answers to [`Message::Sync`] up to the one for
/// `round` (the earlier ones are past).
fn wait_synced(ch: &mut Channel, round: u32) -> Result<(), Error> {
    loop {
        match ch.recv()? {
            Message::Synced { round: r } if r == round => return Ok(()),
            Message::Synced { round: r } if r < round => {}
            Message::Abort { reason } => return Err(Error::Peer(reason)),
            Message::Synced { round: r } => {
                return Err(Error::Protocol(format!(
                    "Synced for round {r} while round {round} is the last sent"
                )));
            }
            m => {
                return Err(Error::Protocol(format!(
                    "expected Synced for round {round}, got {}",
                    m.name()
                )));
            }
        }
    }
}

/// Sends pages read from guest memory now, in batches; with `skip_zero`,
/// pages of zeros stay behind (the destination's memory starts zeroed).
/// `tick` sees the pages done so far and the bytes sent, and answers false
/// to stop (the migration was cancelled). Returns the bytes of pages sent.
fn send_pages(
    ch: &mut Channel,
    ctx: &SourceContext,
    gpas: &mut dyn Iterator<Item = u64>,
    skip_zero: bool,
    tick: &mut dyn FnMut(u64, u64) -> bool,
) -> Result<u64, Error> {
    let mut sent = 0u64;
    let mut done = 0u64;
    let mut gpas = gpas.peekable();
    while gpas.peek().is_some() {
        sent += ch.send_pages(|w| -> Result<(), Error> {
            while !w.full() {
                let Some(gpa) = gpas.next() else { break };
                done += 1;
                w.push(gpa, |page| {
                    ctx.mem
                        .read_slice(page, GuestAddress(gpa))
                        .map_err(|e| Error::Local(format!("reading guest page {gpa:#x}: {e}")))?;
                    Ok::<bool, Error>(!(skip_zero && super::wire::is_zero_page(page)))
                })?;
            }
            Ok(())
        })? as u64;
        if !tick(done, sent) {
            return Err(Error::Cancelled);
        }
    }
    Ok(sent)
}

/// Runs failpoint `name`; a `cut` drops the connection there (the next
/// step then fails as on a cut link).
fn cut_at(ch: &Channel, name: &str) {
    if failpoint::hit(name) == Some(Action::Cut) {
        ch.shutdown();
    }
}

/// What a committed migration did, for the report.
#[derive(Debug, Default)]
struct Stats {
    rounds: Vec<Value>,
    bytes: u64,
    last_pages: usize,
    phases: serde_json::Map<String, Value>,
}

impl Source {
    /// The migrations of the VM behind `mailbox`.
    pub fn new(mailbox: Arc<Mailbox>) -> Arc<Source> {
        Arc::new(Source {
            mailbox,
            doubt: Mutex::new(None),
        })
    }

    fn call(&self, cmd: Command) -> Result<Reply, Error> {
        match self.mailbox.call(cmd) {
            Some(Reply::Refused(e)) => Err(Error::Vm(e)),
            Some(r) => Ok(r),
            None => Err(Error::Vm("the VM has ended".into())),
        }
    }

    fn event(&self, e: Event) -> Result<(), Error> {
        self.call(Command::Lifecycle(e)).map(|_| ())
    }

    /// Moves the VM to `p.to`. `progress` gets a JSON object now and then.
    /// The report on success; on failure, the error says where the VM runs.
    pub fn run(
        self: &Arc<Self>,
        p: &Params,
        progress: &mut dyn FnMut(Value) -> bool,
    ) -> Result<Value, String> {
        let t0 = Instant::now();
        let session = SessionId::random();
        let ctx = match self.call(Command::Lifecycle(Event::Begin {
            to: p.to.clone(),
            session,
        })) {
            Ok(Reply::Migration(c)) => *c,
            Ok(_) => return Err("internal: Begin answered without a context".into()),
            Err(e) => return Err(format!("no migration: {e}")),
        };
        // The pause runs code this process has not run yet (saving and
        // encoding the state): warm it now, not in the pause.
        super::warm_up_the_pause();
        let mut stats = Stats::default();
        let mut ch = None;
        match self.attempt(&ctx, session, p, progress, &mut stats, &mut ch, t0) {
            Ok(Step::Committed(dest)) => {
                let report = report(
                    &stats,
                    t0,
                    &p.to,
                    dest,
                    ch.as_ref().is_some_and(Channel::sealed),
                );
                // The report goes out before the VM ends here.
                let _ = self.event(Event::RunningThere);
                Ok(report)
            }
            Ok(Step::Doubt(why)) => {
                let generation = ctx.identity.generation + 1;
                let _ = self.event(Event::NoAnswer { why: why.clone() });
                let doubt = Doubt {
                    to: p.to.clone(),
                    creds: p.creds.clone(),
                    query: Resolve {
                        session,
                        vm: ctx.identity.vm(),
                        generation,
                    },
                    ctx,
                };
                *self.doubt.lock().expect("doubt") = Some(doubt);
                progress(json!({"phase": "in-doubt", "why": why}));
                let t = Instant::now();
                let mut settled = Settled::Open(why);
                let mut wait = RESOLVE_FIRST;
                while t.elapsed() < RESOLVE_WAIT {
                    std::thread::sleep(wait);
                    wait = RESOLVE_EVERY;
                    settled = self.ask_and_settle();
                    if !matches!(settled, Settled::Open(_)) {
                        break;
                    }
                }
                match settled {
                    Settled::Gone(g) => {
                        let mut r = report(&stats, t0, &p.to, None, true);
                        r["destination"]["generation"] = json!(g);
                        r["confirmed_by"] = json!("resolve query (Committed was lost)");
                        Ok(r)
                    }
                    Settled::Resumed(why) => Err(format!(
                        "the move to {} was aborted at the destination ({why}); the VM runs on here",
                        p.to
                    )),
                    Settled::Lost(why) => Err(format!(
                        "the VM committed to {} and died there ({why}); it runs nowhere. `ferry resolve --resume-here` resumes the paused copy here",
                        p.to
                    )),
                    Settled::Open(why) => {
                        self.keep_asking();
                        Err(format!(
                            "the move to {} is in doubt ({why}): Commit was sent and no answer came. The VM stays paused here and keeps asking {}; `ferry status` shows what it learns, `ferry resolve` acts",
                            p.to, p.to
                        ))
                    }
                }
            }
            Ok(Step::AbortedThere(why)) => {
                let _ = set_dirty_logging(&ctx, false);
                match self.event(Event::AbortedThere) {
                    Ok(()) => Err(format!(
                        "the move to {} was aborted at the destination ({why}); the VM runs on here",
                        p.to
                    )),
                    Err(a) => Err(format!(
                        "the move to {} was aborted at the destination ({why}), and the VM did not resume: {a}",
                        p.to
                    )),
                }
            }
            Err(e) => {
                if let Some(c) = ch.as_mut() {
                    let _ = c.send(&Message::Abort {
                        reason: e.to_string(),
                    });
                    c.shutdown();
                }
                let _ = set_dirty_logging(&ctx, false);
                match self.event(Event::Abort) {
                    Ok(()) => Err(format!("migration failed, the VM runs on here: {e}")),
                    Err(a) => Err(format!(
                        "migration failed ({e}), and the VM did not resume: {a}"
                    )),
                }
            }
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attempt(
        &self,
        ctx: &SourceContext,
        session: SessionId,
        p: &Params,
        progress: &mut dyn FnMut(Value) -> bool,
        stats: &mut Stats,
        slot: &mut Option<Channel>,
        t0: Instant,
    ) -> Result<Step, Error> {
        let deadline_budget = p.downtime + p.margin;
        let generation = ctx.identity.generation + 1;
        let ch = slot.insert(Channel::connect(&p.to, &p.creds)?);
        cut_at(ch, "src-connected");
        ch.send(&Message::Open(Open {
            session,
            vm: ctx.identity.vm(),
            generation,
            config: ctx.config.clone(),
            cpu: ctx.cpu.words,
            commit_wait_ms: (deadline_budget + COMMIT_WAIT_SLACK).as_millis() as u32,
            source: super::host_name(),
        }))?;
        ch.authenticated();
        let host = match ch.recv()? {
            Message::Admitted { host } => host,
            Message::Refused { reason } | Message::Abort { reason } => {
                return Err(Error::Refused(reason));
            }
            m => {
                return Err(Error::Protocol(format!(
                    "expected Admitted, got {}",
                    m.name()
                )));
            }
        };
        progress(
            json!({"phase": "connected", "destination": host, "sealed": ch.sealed(), "ms": ms(t0.elapsed())}),
        );
        cut_at(ch, "src-admitted");

        // Every pre-copy round in the background: the running VM keeps its
        // core. The later rounds too, small as they are: at the normal
        // priority, the copier held the core the vCPU woke on while the
        // other core idled (the kernel's idle balancing skips a core that
        // idles in short bursts), and the client saw nothing for 2 ms
        // (`perf sched`, 2-core host, 4 MB under a 120 MB/s stream). A
        // round the copier is slow with is measured as such, and the rounds
        // go on until the rest fits the budget at that rate.
        set_dirty_logging(ctx, true)?;
        let _ = collect_dirty(ctx)?; // start from a clean log
        let background = crate::sched::Background::enter();
        // And the vCPU takes its core back at once when it wakes.
        let quick = self
            .mailbox
            .kick()
            .vcpu_tid()
            .map(crate::sched::Quick::thread);
        let total_pages = all_pages(&ctx.mem).count() as u64;
        let memory_bytes = total_pages * PAGE as u64;
        let t = Instant::now();
        let mut last_tick = Instant::now();
        // Progress: pages looked at of the round's pages, bytes sent in
        // all, the round's rate (bytes sent per second) and its ETA (at the
        // rate pages are looked at).
        let mut cancelled = false;
        let mut tick = |round: u32, done: u64, of: u64, sent: u64, started: Instant| {
            if last_tick.elapsed() >= PROGRESS_EVERY || done == of {
                last_tick = Instant::now();
                let secs = started.elapsed().as_secs_f64().max(1e-6);
                let eta = (of - done) as f64 * secs / done.max(1) as f64;
                cancelled |= !progress(json!({"phase": "precopy", "round": round,
                    "pages_done": done, "pages": of, "sent_bytes": sent,
                    "memory_bytes": memory_bytes,
                    "rate_bytes_per_s": (sent as f64 / secs) as u64, "eta_s": eta}));
            }
            !cancelled
        };
        let b = send_pages(ch, ctx, &mut all_pages(&ctx.mem), true, &mut |d, s| {
            tick(0, d, total_pages, s, t)
        })?;
        stats.bytes += b;
        // The rate pages go out at (round 0 skips zero pages, so its time
        // over the bytes it sent, not over all it looked at).
        let mut bandwidth = (b as f64 / t.elapsed().as_secs_f64().max(1e-6)).max(1.0);
        stats
            .rounds
            .push(json!({"round": 0, "bytes": b, "ms": ms(t.elapsed())}));
        cut_at(ch, "src-precopy");

        // Capture at the destination from now on: the last rounds are
        // short, and the pause follows the decision that ends them at once
        // (no round trip between them for the VM to dirty pages in). Frames
        // the card reads from now on are recorded, so the destination can
        // drop its copies of them.
        self.call(Command::Record(true))?;
        ch.send(&Message::StartCapture)?;
        expect(ch, "CaptureOn")?;
        cut_at(ch, "src-capture-on");
        let mut pending: Vec<u64> = Vec::new();
        let mut last = u64::MAX;
        let mut stalls = 0;
        // Whether the destination has taken every round sent (CaptureOn
        // said so for what came before it).
        let mut synced = true;
        loop {
            pending.extend(collect_dirty(ctx)?);
            pending.sort_unstable();
            pending.dedup();
            let dirty_bytes = pending.len() as u64 * PAGE as u64;
            // The last pages may take a quarter of the budget: the rest is
            // the pause itself, the state and the commit.
            let budget = bandwidth * p.downtime.as_secs_f64() * LAST_PAGES_SHARE;
            let round = stats.rounds.len() as u32;
            if (dirty_bytes as f64) <= budget || round >= MAX_ROUNDS || stalls >= 3 {
                if synced {
                    break;
                }
                // A round's pages are written to the socket faster than
                // the destination takes them in: were the VM paused now,
                // its state would queue behind them, in the downtime.
                // Wait for the destination while the VM runs, then take
                // what it dirtied meanwhile too.
                let t = Instant::now();
                wait_synced(ch, round - 1)?;
                synced = true;
                if let Some(r) = stats.rounds.last_mut() {
                    r["synced_after_ms"] = json!(ms(t.elapsed()));
                }
                continue;
            }
            stalls = if pending.len() as u64 >= last {
                stalls + 1
            } else {
                0
            };
            last = pending.len() as u64;
            let t = Instant::now();
            let n = pending.len() as u64;
            let sent_before = stats.bytes;
            let b = send_pages(ch, ctx, &mut pending.drain(..), false, &mut |d, s| {
                tick(round, d, n, sent_before + s, t)
            })?;
            ch.send(&Message::Sync { round })?;
            synced = false;
            stats.bytes += b;
            bandwidth = (b as f64 / t.elapsed().as_secs_f64().max(1e-6)).max(1.0);
            stats
                .rounds
                .push(json!({"round": round, "pages": n, "bytes": b, "ms": ms(t.elapsed())}));
        }

        // Stop and copy at full priority (the VM waits for it), within the
        // deadline.
        drop(background);
        drop(quick);
        let _urgent = crate::sched::Urgent::enter();
        let _vcpu_urgent = self
            .mailbox
            .kick()
            .vcpu_tid()
            .map(crate::sched::Urgent::thread);
        // The pause: the vCPU thread stops the VM and says so as soon as
        // guest memory stops changing; the last dirty pages go while it
        // reads the rest of the state, which it answers with next.
        let paused_at = Instant::now();
        let trace = crate::trace::Trace::new();
        let _held = trace.hold();
        trace.mark("source: stop asked");
        let answers = self
            .mailbox
            .request(Command::Lifecycle(Event::Stop))
            .ok_or_else(|| Error::Vm("the VM has ended".into()))?;
        // The destination, background work until now, takes its CPU for
        // the stop-and-copy; told while the vCPU leaves the guest.
        ch.send(&Message::Pausing)?;
        let answer = || match answers.next() {
            Some(Reply::Refused(e)) => Err(Error::Vm(e)),
            Some(r) => Ok(r),
            None => Err(Error::Vm("the VM has ended".into())),
        };
        let Reply::Paused { left_guest, state } = answer()? else {
            return Err(Error::Local("internal: Stop answered out of order".into()));
        };
        let deadline = paused_at + deadline_budget;
        ch.set_deadline(Some(deadline));
        // The guest ran until the vCPU left it: the request's way there
        // (the kick) is its own phase, outside the downtime.
        stats.phases.insert(
            "kick".into(),
            json!(ms(left_guest.saturating_duration_since(paused_at))),
        );
        let mut mark = |name: &str, since: &mut Instant| {
            trace.mark(name);
            stats.phases.insert(name.into(), json!(ms(since.elapsed())));
            *since = Instant::now();
        };
        let mut since = left_guest;
        mark("pause", &mut since);
        cut_at(ch, "src-paused");
        // The state first (all but the rest of the vCPU's, which the vCPU
        // thread reads meanwhile): the destination loads it while the
        // last pages and that rest come.
        let enc = crate::snapshot::encode_state(&state).map_err(|e| Error::Local(e.to_string()))?;
        if failpoint::hit("src-mid-state") == Some(Action::Cut) {
            ch.send_cut(&Message::State(&enc));
            return Err(Error::Local(
                "failpoint: the connection was cut in the middle of the state".into(),
            ));
        }
        ch.send(&Message::State(&enc))?;
        stats.bytes += enc.len() as u64;
        mark("state_send", &mut since);
        pending.extend(collect_dirty(ctx)?);
        pending.sort_unstable();
        pending.dedup();
        stats.last_pages = pending.len();
        stats.bytes += send_pages(ch, ctx, &mut pending.into_iter(), false, &mut |_, _| true)?;
        mark("last_pages", &mut since);
        let Reply::Rest(rest) = answer()? else {
            return Err(Error::Local(
                "internal: Stop answered without the vCPU's state".into(),
            ));
        };
        // What of the vCPU's save the state and the last pages did not
        // hide.
        mark("save", &mut since);
        let enc = crate::snapshot::encode_rest(&rest).map_err(|e| Error::Local(e.to_string()))?;
        ch.send(&Message::VcpuRest(&enc))?;
        stats.bytes += enc.len() as u64;
        ch.send(&Message::Done)?;
        mark("rest_send", &mut since);
        if Instant::now() > deadline {
            return Err(Error::Deadline(deadline_budget.as_millis() as u64));
        }

        // The point of no return: from here the VM resumes here only if the
        // destination says the session was aborted. Commit follows Done at
        // once, while the destination still loads the state: it runs the
        // VM only if all of it loaded, and says Abort otherwise (see
        // `docs/design.md`, "Commit behind Done"). Nothing but this thread
        // can resume a VM stopped for a move, so the lifecycle learns of
        // the commit while Commit travels.
        if failpoint::hit("src-before-commit") == Some(Action::Cut) {
            ch.shutdown();
            let _ = self.event(Event::CommitSent { generation });
            return Ok(Step::Doubt("failpoint: Commit lost".into()));
        }
        let sent = ch.send(&Message::Commit {
            session,
            generation,
        });
        // Posted, not awaited: this thread's next call to the lifecycle
        // finds it applied, and nothing else resumes a VM stopped for a
        // move meanwhile.
        self.mailbox
            .post(Command::Lifecycle(Event::CommitSent { generation }));
        if let Err(e) = sent {
            return Ok(Step::Doubt(format!("sending Commit failed: {e}")));
        }
        failpoint::hit("src-after-commit");
        ch.set_deadline(Some(Instant::now() + CONFIRM_WAIT));
        match ch.recv() {
            Ok(Message::Committed(c)) if c.generation == generation => {
                mark("commit_to_running", &mut since);
                // From the guest's last instruction here to Committed
                // back, which the destination sends as the last thing
                // before its vCPU enters the guest: the downtime, and the
                // way back of one message more.
                stats
                    .phases
                    .insert("downtime".into(), json!(ms(left_guest.elapsed())));
                Ok(Step::Committed(Some((host, c))))
            }
            // The destination decided against it (its fencing step found
            // the fleet's record gives the VM elsewhere): its word is final.
            Ok(Message::Abort { reason }) => Ok(Step::AbortedThere(reason)),
            Ok(m) => Ok(Step::Doubt(format!("answered {} to Commit", m.name()))),
            Err(e) => Ok(Step::Doubt(format!("no Committed: {e}"))),
        }
    }

    /// One resolve query, and what it settles.
    fn ask_and_settle(&self) -> Settled {
        let Some(d) = self.doubt.lock().expect("doubt").clone() else {
            return Settled::Open("no migration in doubt".into());
        };
        match ask(&d) {
            Ok(outcome) => self.settle(&d, outcome),
            Err(e) => {
                let why = format!("{} does not answer: {e}", d.to);
                let _ = self.event(Event::NoAnswer { why: why.clone() });
                Settled::Open(why)
            }
        }
    }

    /// Applies the destination's answer to the VM here.
    fn settle(&self, d: &Doubt, outcome: Outcome) -> Settled {
        let settled = match &outcome {
            Outcome::Running { generation } if *generation == d.query.generation => {
                let _ = self.event(Event::RunningThere);
                Settled::Gone(*generation)
            }
            Outcome::Running { generation } => {
                let why = format!(
                    "{} runs the VM at generation {generation}, not {}",
                    d.to, d.query.generation
                );
                let _ = self.event(Event::NoAnswer { why: why.clone() });
                return Settled::Open(why);
            }
            Outcome::Aborted { reason } => {
                let _ = set_dirty_logging(&d.ctx, false);
                match self.event(Event::AbortedThere) {
                    Ok(()) => Settled::Resumed(reason.clone()),
                    Err(e) => Settled::Open(e.to_string()),
                }
            }
            Outcome::Died { reason } => {
                let _ = self.event(Event::DiedThere {
                    reason: reason.clone(),
                });
                return Settled::Lost(reason.clone());
            }
            Outcome::Unknown => {
                let why = format!(
                    "{} has no record of the session (its receiver restarted?)",
                    d.to
                );
                let _ = self.event(Event::NoAnswer { why: why.clone() });
                return Settled::Open(why);
            }
        };
        *self.doubt.lock().expect("doubt") = None;
        settled
    }

    /// Asks about the move in doubt every half second, on a thread, until
    /// it settles (the VM process then ends here, or runs on).
    fn keep_asking(self: &Arc<Self>) {
        let me = self.clone();
        let _ = std::thread::Builder::new()
            .name("ferry-resolve".into())
            .spawn(move || {
                crate::lockdown::enter(crate::lockdown::Role::Api);
                loop {
                    std::thread::sleep(RESOLVE_EVERY);
                    if me.doubt.lock().expect("doubt").is_none() || me.mailbox.closed() {
                        return;
                    }
                    match me.ask_and_settle() {
                        Settled::Open(_) => {}
                        Settled::Lost(_) => {
                            // Nothing more to learn; an operator decides.
                            return;
                        }
                        _ => return,
                    }
                }
            });
    }

    /// `ferry resolve`: asks about the move in doubt now and acts on the
    /// answer; with `resume_here`, resumes this copy when that cannot make
    /// two (the destination aborted, or the VM died there), or when the
    /// destination cannot answer and `destination_down` confirms it is
    /// down.
    pub fn resolve(&self, resume_here: bool, destination_down: bool) -> Value {
        let Some(d) = self.doubt.lock().expect("doubt").clone() else {
            return crate::api::error("no migration of this VM is in doubt");
        };
        let answer = ask(&d);
        let said = match &answer {
            Ok(o) => o.to_string(),
            Err(e) => format!("no answer: {e}"),
        };
        let settled = match answer {
            Ok(o) => self.settle(&d, o),
            Err(e) => {
                let why = format!("{} does not answer: {e}", d.to);
                let _ = self.event(Event::NoAnswer { why: why.clone() });
                Settled::Open(why)
            }
        };
        let resume = |this: &Self, note: &str| -> Value {
            let _ = set_dirty_logging(&d.ctx, false);
            match this.event(Event::ResumeHere) {
                Ok(()) => {
                    *this.doubt.lock().expect("doubt") = None;
                    json!({"ok": true, "outcome": "resumed-here", "detail": note, "destination_said": said})
                }
                Err(e) => crate::api::error(e),
            }
        };
        match settled {
            Settled::Gone(g) => {
                if resume_here {
                    crate::api::error(format!(
                        "not resumed: the VM runs at {} (generation {g}); resuming here would make two copies. This copy ends",
                        d.to
                    ))
                } else {
                    json!({"ok": true, "outcome": "gone", "detail": format!("the VM runs at {} at generation {g}; this copy ends", d.to)})
                }
            }
            Settled::Resumed(why) => {
                json!({"ok": true, "outcome": "resumed", "detail": format!("{} aborted the move ({why}); the VM runs on here", d.to)})
            }
            Settled::Lost(why) if resume_here => resume(
                self,
                &format!(
                    "resumed here: the VM had committed to {} and died there ({why}); clients may have seen data from that copy",
                    d.to
                ),
            ),
            Settled::Lost(why) => {
                json!({"ok": true, "outcome": "lost", "detail": format!("the VM died at {} after the commit ({why}); it runs nowhere. `ferry resolve --resume-here` resumes the copy paused here", d.to)})
            }
            Settled::Open(why) if resume_here && destination_down => resume(
                self,
                &format!(
                    "resumed here on the operator's word that {} is down ({why})",
                    d.to
                ),
            ),
            Settled::Open(why) => crate::api::error(format!(
                "still in doubt: {why}. The VM stays paused. If {} is down, or does not run VM {} (`ferry status` there), run `ferry resolve --resume-here --destination-down`",
                d.to, d.query.vm
            )),
        }
    }
}

/// How an attempt ended, when it got past the point of no return.
enum Step {
    /// Committed; the destination's confirmation (host and counters).
    Committed(Option<(String, super::wire::Committed)>),
    /// Commit went out (or may have) and no answer came.
    Doubt(String),
    /// Commit went out and the destination aborted the session (why).
    AbortedThere(String),
}

fn ms(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

fn report(
    stats: &Stats,
    t0: Instant,
    to: &str,
    dest: Option<(String, super::wire::Committed)>,
    sealed: bool,
) -> Value {
    let (host, c) = dest.unwrap_or_default();
    let downtime = stats.phases.get("downtime").cloned().unwrap_or(Value::Null);
    let mut phases = stats.phases.clone();
    phases.remove("downtime");
    json!({
        "ok": true,
        "to": to,
        "sealed": sealed,
        "rounds": stats.rounds.len(),
        "precopy": stats.rounds,
        "last_pages": stats.last_pages,
        "bytes": stats.bytes,
        "downtime_ms": downtime,
        "pause_phases_ms": phases,
        "total_ms": ms(t0.elapsed()),
        "destination": {
            "host": host,
            "generation": c.generation,
            "commit_to_running_ms": c.commit_to_running_us as f64 / 1e3,
            "captured": c.captured,
            "duplicates": c.duplicates,
        },
    })
}

/// Asks the receiver at `d.to` what became of the session.
fn ask(d: &Doubt) -> Result<Outcome, Error> {
    let mut ch = Channel::connect(&d.to, &d.creds)?;
    ch.send(&Message::Resolve(d.query))?;
    ch.authenticated();
    ch.set_deadline(Some(Instant::now() + Duration::from_secs(10)));
    match ch.recv()? {
        Message::Outcome(o) => Ok(o),
        Message::Abort { reason } | Message::Refused { reason } => Err(Error::Peer(reason)),
        m => Err(Error::Protocol(format!(
            "expected Outcome, got {}",
            m.name()
        ))),
    }
}

/// Longest destination address accepted (`host:port`).
const MAX_ADDRESS: usize = 255;

impl Params {
    /// Checks a migration request from the control socket and makes its
    /// parameters.
    pub fn from_request(req: &MigrateRequest) -> Result<Params, String> {
        let creds = match (&req.key, req.insecure) {
            (Some(_), true) => return Err("give a key or insecure, not both".into()),
            (None, false) => return Err("a key is required (or insecure)".into()),
            (None, true) => Credentials::Insecure,
            (Some(k), false) => super::key::Psk::from_hex(k)
                .map(Credentials::Key)
                .ok_or("the key is not 64 hex digits")?,
        };
        if !(1..=60_000).contains(&req.downtime_ms) || req.margin_ms > 600_000 {
            return Err("downtime_ms must be 1 to 60000 and margin_ms at most 600000".into());
        }
        if req.to.is_empty()
            || req.to.len() > MAX_ADDRESS
            || req.to.chars().any(|c| c.is_control() || c.is_whitespace())
        {
            return Err(format!(
                "the destination must be host:port (at most {MAX_ADDRESS} characters, no spaces)"
            ));
        }
        // Names are resolved by the CLI: a VMM under its filters cannot
        // open /etc/hosts or resolv.conf (nor can a jailed one see them).
        let to: std::net::SocketAddr = req.to.parse().map_err(|_| {
            format!(
                "the destination {:?} is not an IP address and port; `ferry migrate` resolves names before it asks the VMM",
                req.to
            )
        })?;
        Ok(Params {
            to: to.to_string(),
            creds,
            downtime: Duration::from_millis(req.downtime_ms),
            margin: Duration::from_millis(req.margin_ms),
        })
    }
}

impl Migrator for Source {
    fn migrate(
        self: Arc<Self>,
        req: &MigrateRequest,
        progress: &mut dyn FnMut(Value) -> bool,
    ) -> Value {
        let params = match Params::from_request(req) {
            Ok(p) => p,
            Err(e) => return crate::api::error(e),
        };
        match self.run(&params, progress) {
            Ok(v) => v,
            Err(e) => crate::api::error(e),
        }
    }

    fn resolve(self: Arc<Self>, resume_here: bool, destination_down: bool) -> Value {
        Source::resolve(&self, resume_here, destination_down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(to: &str) -> MigrateRequest {
        MigrateRequest {
            to: to.into(),
            key: None,
            insecure: true,
            downtime_ms: 1,
            margin_ms: 500,
        }
    }

    #[test]
    fn the_destination_is_an_address_not_a_name() {
        assert_eq!(
            Params::from_request(&req("10.0.0.2:7000")).unwrap().to,
            "10.0.0.2:7000"
        );
        assert_eq!(
            Params::from_request(&req("[::1]:7000")).unwrap().to,
            "[::1]:7000"
        );
        let e = Params::from_request(&req("hostb:7000")).err().unwrap();
        assert!(e.contains("not an IP address"), "{e}");
        assert!(Params::from_request(&req("10.0.0.2")).is_err());
    }
}
