//! Failpoints: named steps (mostly of the migration protocol) at which a side dies,
//! stalls, or cuts its connection, for the fault-matrix tests.
//!
//! Compiled in only with the `failpoints` feature (the tests' build of
//! `ferry`); otherwise [`hit`] is an empty inline function. With it,
//! `FERRY_FAILPOINTS=name=action[,name=action...]` arms them, where action
//! is `exit` (the process is killed on the spot, as by a crash), `stall:MS`
//! (the step waits MS milliseconds, then goes on) or `cut` (the caller
//! drops its connection without a word and goes on as if the message had
//! been sent: a lost message), `fail` (the step fails as on bad input,
//! and the caller handles the error as it would any other) or `open` (the
//! thread tries to open /etc/hostname, as a compromised VMM might: the
//! seccomp filters must stop it). Each hit prints `ferry: failpoint NAME: ACTION` on stderr first.
//! Besides the protocol's steps: `vm-run` (the vCPU thread, before the
//! guest first runs) and `api-request` (a control connection's thread).

use std::time::Duration;

/// What an armed failpoint does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Killed on the spot.
    Exit,
    /// Waits, then goes on.
    Stall(Duration),
    /// The caller cuts its connection.
    Cut,
    /// The step fails (the caller reports an error and goes on as for any
    /// other failure of that step).
    Fail,
    /// The thread opens a file it has no business with.
    Open,
}

/// Parses `FERRY_FAILPOINTS`.
pub fn parse(spec: &str) -> Result<Vec<(String, Action)>, String> {
    spec.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (name, action) = item
                .split_once('=')
                .ok_or_else(|| format!("failpoint {item:?}: want NAME=ACTION"))?;
            let action = match action.trim() {
                "exit" => Action::Exit,
                "cut" => Action::Cut,
                "fail" => Action::Fail,
                "open" => Action::Open,
                a => match a.strip_prefix("stall:").map(str::parse::<u64>) {
                    Some(Ok(ms)) => Action::Stall(Duration::from_millis(ms)),
                    _ => return Err(format!("failpoint {name}: unknown action {a:?}")),
                },
            };
            Ok((name.trim().to_string(), action))
        })
        .collect()
}

/// Whether failpoints are compiled in.
pub const ENABLED: bool = cfg!(feature = "failpoints");

/// Runs failpoint `name`: `Some(Action::Cut)` if the caller must cut its
/// connection, `Some(Action::Fail)` if the step must fail; an `exit` never
/// returns, a `stall` returns `None` late.
#[cfg(feature = "failpoints")]
pub fn hit(name: &str) -> Option<Action> {
    static ARMED: std::sync::OnceLock<Vec<(String, Action)>> = std::sync::OnceLock::new();
    let armed = ARMED.get_or_init(|| {
        std::env::var("FERRY_FAILPOINTS")
            .ok()
            .map(|s| parse(&s).unwrap_or_else(|e| panic!("FERRY_FAILPOINTS: {e}")))
            .unwrap_or_default()
    });
    let (_, action) = armed.iter().find(|(n, _)| n == name)?;
    eprintln!("ferry: failpoint {name}: {action:?}");
    match *action {
        Action::Exit => {
            // SAFETY: kill(2) on this very process: a crash, on purpose.
            unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            unreachable!("killed")
        }
        Action::Stall(d) => {
            std::thread::sleep(d);
            None
        }
        Action::Cut => Some(Action::Cut),
        Action::Fail => Some(Action::Fail),
        Action::Open => {
            match std::fs::File::open("/etc/hostname") {
                Ok(_) => eprintln!("ferry: failpoint {name}: opened /etc/hostname"),
                Err(e) => eprintln!("ferry: failpoint {name}: cannot open /etc/hostname: {e}"),
            }
            None
        }
    }
}

/// Runs failpoint `name` (compiled out: nothing).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub fn hit(_name: &str) -> Option<Action> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse("a=exit, b=stall:250,c=cut,d=open,e=fail").unwrap(),
            vec![
                ("a".into(), Action::Exit),
                ("b".into(), Action::Stall(Duration::from_millis(250))),
                ("c".into(), Action::Cut),
                ("d".into(), Action::Open),
                ("e".into(), Action::Fail)
            ]
        );
        assert!(parse("").unwrap().is_empty());
        assert!(parse("a").is_err());
        assert!(parse("a=boom").is_err());
        assert!(parse("a=stall:x").is_err());
    }
}
