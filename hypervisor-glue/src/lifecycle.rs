//! A VM's lifecycle on its host, as a state machine: what it may do next
//! (resume, snapshot, migrate) follows from where it is, and every refusal
//! says why. Pure: the vCPU thread holds one [`Lifecycle`] and applies
//! [`Event`]s to it; the side effects (pausing the vCPU, resuming it,
//! ending the process) follow from the transition's result.
//!
//! ```text
//!  RUNNING <--pause/resume--> PAUSED
//!  RUNNING --begin--> MIGRATING --abort--> RUNNING
//!  MIGRATING --stop--> STOPPED --abort--> RUNNING
//!  STOPPED --commit sent--> COMMITTING --running there--> GONE
//!  COMMITTING --no answer--> IN_DOUBT --running there--> GONE
//!                                      --aborted there--> RUNNING
//!                                      --died there--> LOST
//!  IN_DOUBT, LOST --operator: resume here--> RUNNING
//! ```
//!
//! From COMMITTING on, the VM resumes here only when the destination said
//! the session was aborted, or when an operator resumes it (which
//! `migration::source` allows only when the destination does not run it,
//! or the operator confirmed that host is down).

use crate::id::SessionId;

/// Where a VM is in its life on this host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Running.
    Running,
    /// Paused by a request; resumes on one.
    Paused,
    /// Running while its memory is copied to `to`.
    Migrating {
        /// The destination.
        to: String,
        /// The attempt.
        session: SessionId,
    },
    /// Paused for the stop-and-copy to `to`.
    Stopped {
        /// The destination.
        to: String,
        /// The attempt.
        session: SessionId,
    },
    /// Paused: Commit went to `to`, its answer has not come.
    Committing {
        /// The destination.
        to: String,
        /// The attempt.
        session: SessionId,
        /// The generation it runs at there.
        generation: u64,
    },
    /// Paused: Commit went to `to` and nobody knows yet whether it runs
    /// there; the source keeps asking.
    InDoubt {
        /// The destination.
        to: String,
        /// The attempt.
        session: SessionId,
        /// The generation it would run at there.
        generation: u64,
        /// The last answer, or why there was none.
        last: String,
    },
    /// Paused: it committed to `to` and died there; it runs nowhere. An
    /// operator may resume this copy.
    Lost {
        /// The destination.
        to: String,
        /// The attempt.
        session: SessionId,
        /// The generation it ran at there.
        generation: u64,
        /// What the destination said.
        reason: String,
    },
    /// Runs at `to` now, at `generation`; it never runs here again.
    Gone {
        /// Where it went.
        to: String,
        /// Its generation there.
        generation: u64,
    },
}

/// What happens to the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A pause request.
    Pause,
    /// A resume request.
    Resume,
    /// A migration to `to` starts.
    Begin {
        /// The destination.
        to: String,
        /// The attempt.
        session: SessionId,
    },
    /// The stop-and-copy starts: the VM pauses.
    Stop,
    /// The migration failed before Commit went out.
    Abort,
    /// Commit went out.
    CommitSent {
        /// The generation it runs at there.
        generation: u64,
    },
    /// No answer to Commit, or an answer that does not settle it.
    NoAnswer {
        /// Why.
        why: String,
    },
    /// The destination says it runs the VM.
    RunningThere,
    /// The destination says the session was aborted there.
    AbortedThere,
    /// The destination says the VM died there after the commit.
    DiedThere {
        /// What it said.
        reason: String,
    },
    /// An operator resumes this copy (checked by the caller).
    ResumeHere,
}

/// What the caller does after a transition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Effect {
    /// Nothing beyond the new state.
    None,
    /// Pause the vCPU and devices.
    Pause,
    /// Resume the vCPU and devices.
    Resume,
    /// The VM is gone from this host: end it here.
    End,
}

impl Lifecycle {
    /// Whether the vCPU runs in this state.
    pub fn runs(&self) -> bool {
        matches!(self, Lifecycle::Running | Lifecycle::Migrating { .. })
    }

    /// One line for `ferry status` and for refusals.
    pub fn describe(&self) -> String {
        match self {
            Lifecycle::Running => "running".into(),
            Lifecycle::Paused => "paused".into(),
            Lifecycle::Migrating { to, session } => {
                format!("running, being copied to {to} (migration {session})")
            }
            Lifecycle::Stopped { to, session } => {
                format!("paused: moving to {to} (migration {session}, stop-and-copy)")
            }
            Lifecycle::Committing { to, generation, .. } => {
                format!(
                    "paused: committed to {to} at generation {generation}, waiting for its answer"
                )
            }
            Lifecycle::InDoubt {
                to,
                generation,
                last,
                ..
            } => format!(
                "paused: outcome of the move to {to} (generation {generation}) unknown; asking it again ({last}); `ferry resolve` acts on it"
            ),
            Lifecycle::Lost {
                to,
                generation,
                reason,
                ..
            } => format!(
                "lost: it moved to {to} at generation {generation} and died there ({reason}); it runs nowhere. `ferry resolve --resume-here` resumes this copy"
            ),
            Lifecycle::Gone { to, generation } => {
                format!("gone: it runs at {to} now, at generation {generation}")
            }
        }
    }

    /// The short state name (`running`, `paused`, `in-doubt`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            Lifecycle::Running => "running",
            Lifecycle::Paused => "paused",
            Lifecycle::Migrating { .. } => "migrating",
            Lifecycle::Stopped { .. } => "stopped-for-move",
            Lifecycle::Committing { .. } => "committing",
            Lifecycle::InDoubt { .. } => "in-doubt",
            Lifecycle::Lost { .. } => "lost",
            Lifecycle::Gone { .. } => "gone",
        }
    }

    /// Whether a snapshot may be taken (a copy of a VM that may run
    /// elsewhere would be a second copy).
    pub fn may_snapshot(&self) -> Result<(), String> {
        match self {
            Lifecycle::Running | Lifecycle::Paused => Ok(()),
            other => Err(format!("no snapshot now: the VM is {}", other.describe())),
        }
    }

    /// Applies `event`; returns what to do, or why the event is refused
    /// (the state is then unchanged).
    pub fn apply(&mut self, event: Event) -> Result<Effect, String> {
        use Lifecycle as L;
        let refuse = |s: &L, what: &str| Err(format!("cannot {what}: the VM is {}", s.describe()));
        let (next, effect) = match (&*self, event) {
            (L::Running, Event::Pause) => (L::Paused, Effect::Pause),
            (L::Paused, Event::Pause) => (L::Paused, Effect::None),
            (L::Paused, Event::Resume) => (L::Running, Effect::Resume),
            (L::Running, Event::Resume) => (L::Running, Effect::None),
            (L::Running, Event::Begin { to, session }) => {
                (L::Migrating { to, session }, Effect::None)
            }
            (L::Migrating { to, session }, Event::Stop) => (
                L::Stopped {
                    to: to.clone(),
                    session: *session,
                },
                Effect::Pause,
            ),
            (L::Migrating { .. }, Event::Abort) => (L::Running, Effect::None),
            (L::Stopped { .. }, Event::Abort) => (L::Running, Effect::Resume),
            (L::Stopped { to, session }, Event::CommitSent { generation }) => (
                L::Committing {
                    to: to.clone(),
                    session: *session,
                    generation,
                },
                Effect::None,
            ),
            (
                L::Committing {
                    to,
                    session,
                    generation,
                }
                | L::InDoubt {
                    to,
                    session,
                    generation,
                    ..
                },
                ev,
            ) => {
                let (to, session, generation) = (to.clone(), *session, *generation);
                match ev {
                    Event::RunningThere => (L::Gone { to, generation }, Effect::End),
                    Event::AbortedThere => (L::Running, Effect::Resume),
                    Event::NoAnswer { why } => (
                        L::InDoubt {
                            to,
                            session,
                            generation,
                            last: why,
                        },
                        Effect::None,
                    ),
                    Event::DiedThere { reason } => (
                        L::Lost {
                            to,
                            session,
                            generation,
                            reason,
                        },
                        Effect::None,
                    ),
                    Event::ResumeHere if matches!(self, L::InDoubt { .. }) => {
                        (L::Running, Effect::Resume)
                    }
                    ev => return refuse(self, &describe_event(&ev)),
                }
            }
            (L::Lost { .. }, Event::ResumeHere) => (L::Running, Effect::Resume),
            (L::Lost { to, generation, .. }, Event::RunningThere) => (
                L::Gone {
                    to: to.clone(),
                    generation: *generation,
                },
                Effect::End,
            ),
            (_, ev) => return refuse(self, &describe_event(&ev)),
        };
        *self = next;
        Ok(effect)
    }
}

fn describe_event(e: &Event) -> String {
    match e {
        Event::Pause => "pause".into(),
        Event::Resume => "resume".into(),
        Event::Begin { to, .. } => format!("start a migration to {to}"),
        Event::Stop => "stop it for copying".into(),
        Event::Abort => "abort a migration".into(),
        Event::CommitSent { .. } => "commit a migration".into(),
        Event::NoAnswer { .. } => "wait for an answer".into(),
        Event::RunningThere => "record that it runs elsewhere".into(),
        Event::AbortedThere => "record an aborted move".into(),
        Event::DiedThere { .. } => "record a death elsewhere".into(),
        Event::ResumeHere => "resume it here".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: SessionId = SessionId([1; 16]);

    fn begin() -> Event {
        Event::Begin {
            to: "b:7000".into(),
            session: S,
        }
    }

    #[test]
    fn a_move_that_commits_ends_here() {
        let mut l = Lifecycle::Running;
        assert_eq!(l.apply(begin()), Ok(Effect::None));
        assert!(l.runs());
        assert_eq!(l.apply(Event::Stop), Ok(Effect::Pause));
        assert_eq!(
            l.apply(Event::CommitSent { generation: 3 }),
            Ok(Effect::None)
        );
        assert_eq!(l.apply(Event::RunningThere), Ok(Effect::End));
        assert_eq!(
            l,
            Lifecycle::Gone {
                to: "b:7000".into(),
                generation: 3
            }
        );
        // A gone VM refuses everything, naming where it went.
        for ev in [
            Event::Resume,
            Event::Pause,
            begin(),
            Event::ResumeHere,
            Event::Abort,
        ] {
            let e = l.clone().apply(ev).unwrap_err();
            assert!(e.contains("b:7000") && e.contains("generation 3"), "{e}");
        }
        assert!(l.may_snapshot().is_err());
    }

    #[test]
    fn before_commit_any_failure_resumes_here() {
        let mut l = Lifecycle::Running;
        l.apply(begin()).unwrap();
        assert_eq!(l.apply(Event::Abort), Ok(Effect::None));
        assert_eq!(l, Lifecycle::Running);
        l.apply(begin()).unwrap();
        l.apply(Event::Stop).unwrap();
        assert_eq!(l.apply(Event::Abort), Ok(Effect::Resume));
        assert_eq!(l, Lifecycle::Running);
    }

    #[test]
    fn after_commit_only_the_destination_or_an_operator_resumes_it() {
        let mut l = Lifecycle::Running;
        l.apply(begin()).unwrap();
        l.apply(Event::Stop).unwrap();
        l.apply(Event::CommitSent { generation: 2 }).unwrap();
        // Neither an abort, a resume nor a new migration.
        for ev in [Event::Abort, Event::Resume, begin(), Event::ResumeHere] {
            assert!(l.clone().apply(ev).is_err());
        }
        assert_eq!(
            l.apply(Event::NoAnswer {
                why: "connection cut".into()
            }),
            Ok(Effect::None)
        );
        assert_eq!(l.name(), "in-doubt");
        assert!(l.describe().contains("unknown"));
        for ev in [Event::Abort, Event::Resume, begin()] {
            assert!(l.clone().apply(ev).is_err());
        }
        assert!(l.may_snapshot().is_err());
        // The destination aborted: it resumes here.
        let mut aborted = l.clone();
        assert_eq!(aborted.apply(Event::AbortedThere), Ok(Effect::Resume));
        assert_eq!(aborted, Lifecycle::Running);
        // It died there: lost, until an operator resumes this copy.
        let mut lost = l.clone();
        lost.apply(Event::DiedThere {
            reason: "killed".into(),
        })
        .unwrap();
        assert_eq!(lost.name(), "lost");
        assert!(lost.clone().apply(Event::Resume).is_err());
        assert_eq!(lost.apply(Event::ResumeHere), Ok(Effect::Resume));
        // An operator may resume a VM in doubt (the caller checks first).
        assert_eq!(l.clone().apply(Event::ResumeHere), Ok(Effect::Resume));
    }

    #[test]
    fn pause_and_resume_only_where_they_mean_something() {
        let mut l = Lifecycle::Running;
        assert_eq!(l.apply(Event::Pause), Ok(Effect::Pause));
        assert!(
            l.clone().apply(begin()).is_err(),
            "a paused VM does not migrate"
        );
        assert_eq!(l.apply(Event::Resume), Ok(Effect::Resume));
        l.apply(begin()).unwrap();
        assert!(l.clone().apply(Event::Pause).is_err());
        assert!(l.clone().apply(begin()).is_err(), "one migration at a time");
    }
}
