//! Live migration: the VM moves from a source host to a destination host
//! while it runs, over one authenticated, encrypted TCP connection, and
//! runs in exactly one place whatever fails.
//!
//! Layers: [`channel`] (preamble, Noise NNpsk0 handshake, AES-256-GCM
//! records), [`wire`] (the typed messages, one encoding), [`key`] (the
//! pre-shared key and its file), then the protocol: [`source`] (in the
//! VM's process, on its control socket's thread), [`receiver`] (the
//! destination host's `ferry receive`: handshakes, admission, resolve
//! queries) and [`dest`] (the arriving VM's own process, started by the
//! receiver). [`failpoint`]s let the tests break any step.
//!
//! ```text
//!  source VM process                                   receiver -> the VM's process
//!    | -- Open {session, VM id, generation N+1, ------> |  admission (memory, --expect,
//!    |          config, commit_wait} ----------------   |  identity); starts the VM process:
//!    | <------------------------------ Admitted / Refused  memory, tap, control socket
//!    | -- Pages (round 0, then the dirty rounds) -----> |
//!    | -- StartCapture -------------------------------> |  captures the VM's frames
//!    | <-------------------------------------- CaptureOn|
//!    | -- Pages (dirty rounds), each + Sync {round} --> |
//!    | <-------------------------- Synced {round}       |  (the pause waits for the last round's)
//!    |  [pause]  deadline: budget + margin              |
//!    | -- Pausing ------------------------------------> |  background until now: real-time
//!    | -- Pages (the last) ---------------------------> |  (read while the state is saved)
//!    | -- State, Done --------------------------------> |  loads vCPU, clock, devices; READY
//!    | -- Commit {session, N+1} ------------------------> |  COMMITTED (told to the receiver
//!    |  COMMITTING: never resumes on its own            |  first), resumes, re-injects;
//!    |                                                  |  a state that failed to load: Abort
//!    | <------------------------------ Committed {N+1}   |  RUNNING at generation N+1
//!    |  GONE: the process ends                          |
//! ```
//!
//! The destination decides, the source learns. The destination's VM
//! process leaves READY once, under a lock: to COMMITTED (Commit read, or a
//! resolve query that carries it) or to ABORTED (EOF, a bad record,
//! `commit_wait` passed). The source resumes on its own only before it
//! sends Commit; after that, only when the destination answers that the
//! session was aborted (or an operator resumes it: `ferry resolve`).
//!
//! ```text
//!  source (vm::lifecycle)                      destination (dest)
//!  RUNNING -> MIGRATING -> STOPPED             ADMITTED -> RECEIVING -> CAPTURING -> READY
//!     ^          |fail        |fail/deadline      any failure -> ABORTED      |Commit/resolve
//!     +----------+------------+                                               v
//!  STOPPED --Commit--> COMMITTING --Committed--> GONE                  COMMITTED -> RUNNING
//!                        |no answer
//!                        v
//!                     IN_DOUBT --resolve: Running--> GONE
//!                              --resolve: Aborted--> RUNNING (resumed here)
//!                              --resolve: Died-----> LOST (operator)
//! ```
//!
//! `docs/design.md` says why each step is where it is;
//! `docs/fault-matrix.md` lists each fault and its outcome.

/// Maps this program's code and runs the state's encoding and decoding
/// once ([`crate::sched::prefault_code`], [`crate::snapshot::warm_up`]),
/// so that a migration's pause, on either side, finds them warm. Once per
/// process: a source that retries a move pays it once.
pub(crate) fn warm_up_the_pause() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        crate::sched::prefault_code();
        crate::snapshot::warm_up();
    });
}

pub mod channel;
pub mod dest;
pub use crate::failpoint;
pub mod key;
pub mod receiver;
pub mod source;
pub mod wire;

use channel::{Channel, ChannelError};
use wire::Message;

/// Migration errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The channel failed (connection, authentication, a bad record).
    #[error("{0}")]
    Channel(#[from] ChannelError),
    /// The destination did not admit the VM.
    #[error("the destination refused the VM: {0}")]
    Refused(String),
    /// The other side gave up, and said why.
    #[error("the other side gave up: {0}")]
    Peer(String),
    /// The other side broke the protocol.
    #[error("migration protocol: {0}")]
    Protocol(String),
    /// The VM's lifecycle refused the step.
    #[error("{0}")]
    Vm(String),
    /// The stop-and-copy ran past its deadline.
    #[error(
        "the stop-and-copy did not finish within its deadline ({0} ms: the downtime budget plus the margin)"
    )]
    Deadline(u64),
    /// A local step failed.
    #[error("{0}")]
    Local(String),
    /// The one who asked for the migration cancelled it.
    #[error("cancelled by the operator")]
    Cancelled,
}

/// Receives a message that must be `want` (an `Abort` becomes
/// [`Error::Peer`]); returns it.
fn expect<'a>(ch: &'a mut Channel, want: &'static str) -> Result<Message<'a>, Error> {
    match ch.recv()? {
        Message::Abort { reason } => Err(Error::Peer(reason)),
        m if m.name() == want => Ok(m),
        m => Err(Error::Protocol(format!(
            "expected {want}, got {}",
            m.name()
        ))),
    }
}

/// This host's name (for messages to the other side).
pub fn host_name() -> String {
    let mut b = [0u8; 256];
    // SAFETY: gethostname writes at most `b.len()` bytes into `b`.
    let r = unsafe { libc::gethostname(b.as_mut_ptr().cast(), b.len()) };
    if r != 0 {
        return "unknown".into();
    }
    let end = b.iter().position(|&c| c == 0).unwrap_or(b.len());
    String::from_utf8_lossy(&b[..end]).into_owned()
}
