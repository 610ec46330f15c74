//! The migration fault matrix: a fault at each step of the protocol, on
//! real processes, taps and namespaces, with a verifying client streaming
//! from the VM (and echoing upstream) the whole time. Faults come from
//! failpoints (`ferry-failpoints`, the `failpoints` build: a side is killed,
//! stalls, or cuts its connection at a named step), nftables partitions of
//! the migration link (drops: no RST arrives), relays that change or
//! replay the stream, and peers without credentials.
//!
//! Each case asserts where the VM runs afterwards (exactly one place; or
//! nowhere, where its only holder died, and `ferry status` says so), that
//! the client's stream goes on wherever it runs (every byte verified, no
//! reset), and that the commands said what happened. The table of cases is
//! `docs/fault-matrix.md`.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::cluster::{self, Cluster, VIP, ferry_ctl};
use ferry_tests::{ferry_failpoints_bin, image};
use serde_json::Value;

/// The destination's migration-link address and port.
const DEST: &str = "10.77.2.2:7000";

struct Case {
    c: Cluster,
    dir: PathBuf,
    a: PathBuf,
    b: PathBuf,
    client: Option<Child>,
    stop: PathBuf,
}

/// Where the VM runs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Where {
    Source,
    Destination,
    Nowhere,
}

fn status(api: &Path) -> Option<Value> {
    let text = ferry_ctl(&["status", "--json", "--api"], api).ok()?;
    serde_json::from_str(&text).ok()
}

fn log_has(log: &Path, needle: &str) -> bool {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
}

fn wait_log(log: &Path, needle: &str, limit: Duration) {
    let t = Instant::now();
    while !log_has(log, needle) {
        assert!(
            t.elapsed() < limit,
            "no {needle:?} in {} after {limit:?}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

impl Case {
    /// A cluster with the stream app on hostA (failpoints `src` armed in
    /// its process), a verifying client with an echo upstream, and a
    /// receiver on hostB (failpoints `dst`, extra options `recv`).
    fn start(test: &str, src: &str, dst: &str, recv: &[&str]) -> Option<Case> {
        let mut c = cluster::for_test_with(test, "fx", &[ferry_tests::Need::Program("nft")])?;
        let dir = cluster::log_dir(test);
        for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let _ = std::fs::remove_file(e.path());
        }
        let a = dir.join("a.sock");
        let b = dir.join("b.sock");
        let stop = dir.join("stop-client");
        let mut cmd = c.command("hostA", ferry_failpoints_bin());
        cmd.arg("run")
            .arg(image("stream"))
            .args(cluster::service_args("64M"))
            .arg("--api")
            .arg(&a)
            .args(["--", "rate=2M", "echo=7"])
            .env("FERRY_FAILPOINTS", src);
        let log = dir.join("vm-a.log");
        let pid = c.spawn(cmd, &log).expect("starting the VM");
        cluster::wait_for_line(&log, "listening", Duration::from_secs(60), pid)
            .expect("the VM starts");
        let out = std::fs::File::create(dir.join("client.json")).unwrap();
        let client = c
            .stream_client()
            .args([
                "--echo",
                &format!("{VIP}:7"),
                "--echo-rate",
                "200000",
                "--windows-ms",
                "250",
                "--idle-timeout",
                "120",
                "--stop-file",
            ])
            .arg(&stop)
            .stdout(out)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut cmd = c.receiver_command_of(&ferry_failpoints_bin(), "hostB", 7000, recv);
        cmd.arg("--api").arg(&b).env("FERRY_FAILPOINTS", dst);
        let rlog = dir.join("receiver-b.log");
        let receiver = c.spawn(cmd, &rlog).unwrap();
        cluster::wait_for_line(&rlog, "waiting for VMs", Duration::from_secs(10), receiver)
            .unwrap();
        // Let the stream and the echo run before the fault.
        std::thread::sleep(Duration::from_millis(800));
        Some(Case {
            c,
            dir,
            a,
            b,
            client: Some(client),
            stop,
        })
    }

    fn receiver_log(&self) -> PathBuf {
        self.dir.join("receiver-b.log")
    }

    fn source_log(&self) -> PathBuf {
        self.dir.join("vm-a.log")
    }

    /// `ferry migrate` to hostB with the cluster's key (plus `extra`):
    /// the report or the error.
    fn migrate(&self, extra: &[&str]) -> Result<String, String> {
        self.c.migrate(&self.a, "hostB", 7000, extra)
    }

    /// Drops everything on hostB's migration link, both ways.
    fn partition(&self) {
        for rule in [
            "add table inet fxpart",
            "add chain inet fxpart in { type filter hook input priority -10 ; }",
            "add chain inet fxpart out { type filter hook output priority -10 ; }",
            "add rule inet fxpart in iifname m0 drop",
            "add rule inet fxpart out oifname m0 drop",
        ] {
            let args: Vec<&str> = rule.split(' ').collect();
            self.c.exec("hostB", "nft", &args).expect("nft");
        }
    }

    fn heal(&self) {
        let _ = self
            .c
            .exec("hostB", "nft", &["delete", "table", "inet", "fxpart"]);
    }

    /// Waits until the VM runs at `at` and nowhere else; panics with both
    /// sides' status otherwise.
    fn assert_runs(&self, at: Where, within: Duration) {
        let t = Instant::now();
        loop {
            let (sa, sb) = (status(&self.a), status(&self.b));
            let running = |s: &Option<Value>| s.as_ref().is_some_and(|v| v["state"] == "running");
            let (ra, rb) = (running(&sa), running(&sb));
            assert!(
                !(ra && rb),
                "the VM runs in two places:\nA: {sa:?}\nB: {sb:?}"
            );
            let ok = match at {
                Where::Source => ra && !rb,
                Where::Destination => rb && sa.is_none(),
                Where::Nowhere => !ra && !rb,
            };
            if ok {
                if at == Where::Destination {
                    assert_eq!(sb.unwrap()["generation"], 1);
                }
                if at == Where::Source {
                    assert_eq!(sa.unwrap()["generation"], 0);
                }
                return;
            }
            assert!(
                t.elapsed() < within,
                "the VM does not run at {at:?} only after {within:?}:\nA: {sa:?}\nB: {sb:?}\nreceiver: {}",
                std::fs::read_to_string(self.receiver_log()).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the client after the stream ran on for a while, and checks it:
    /// every byte verified, no reset, and (`flowing`) bytes arriving at the
    /// end, where the VM now runs.
    fn finish_client(&mut self, flowing: bool) -> Value {
        std::thread::sleep(Duration::from_millis(1500));
        let before = self.c.client_tcp_counters().unwrap();
        std::fs::write(&self.stop, b"").unwrap();
        let client = self.client.take().unwrap();
        let out = client.wait_with_output().unwrap();
        assert!(out.status.code().is_some());
        let text = std::fs::read_to_string(self.dir.join("client.json")).unwrap();
        let v: Value = serde_json::from_str(text.trim())
            .unwrap_or_else(|e| panic!("client output ({e}): {text}"));
        let windows: Vec<u64> = v["windows"]
            .as_array()
            .unwrap()
            .iter()
            .map(|w| w.as_u64().unwrap())
            .collect();
        let tail: u64 = windows.iter().rev().skip(1).take(4).sum();
        if flowing {
            assert!(v["error"].is_null(), "the client saw an error: {v}");
            assert!(tail > 0, "the stream stopped: windows {windows:?}");
            assert!(v["echo_bytes_verified"].as_u64().unwrap() > 0, "{v}");
        } else {
            assert_eq!(tail, 0, "bytes arrived from a VM that should run nowhere");
        }
        assert!(v["bytes_verified"].as_u64().unwrap() > 100_000, "{v}");
        let d = self.c.client_tcp_counters().unwrap();
        assert_eq!(
            d.estab_resets, 0,
            "the client's connections were reset: {d:?}"
        );
        let _ = before;
        v
    }
}

impl Drop for Case {
    fn drop(&mut self) {
        self.heal();
        let _ = std::fs::write(&self.stop, b"");
        if let Some(mut c) = self.client.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A fault before Commit: the migration fails, saying the VM runs on at
/// the source, which it does; the destination discarded its copy.
fn before_commit(test: &str, src: &str, dst: &str, recv: &[&str], extra: &[&str], says: &str) {
    let Some(mut k) = Case::start(test, src, dst, recv) else {
        return;
    };
    let err = k.migrate(extra).unwrap_err();
    assert!(err.contains(says), "{test}: {err}");
    assert!(err.contains("runs on here"), "{test}: {err}");
    k.assert_runs(Where::Source, Duration::from_secs(5));
    k.finish_client(true);
}

#[test]
fn connect_partitioned() {
    let Some(mut k) = Case::start("fm_connect_partitioned", "", "", &[]) else {
        return;
    };
    k.partition();
    let err = k.migrate(&[]).unwrap_err();
    assert!(
        err.contains("cannot connect") && err.contains("runs on here"),
        "{err}"
    );
    k.heal();
    k.assert_runs(Where::Source, Duration::from_secs(5));
    k.finish_client(true);
}

/// The receiver holds another key: the handshake fails, and the receiver
/// sends nothing back.
#[test]
fn auth_another_key() {
    let other = std::env::temp_dir().join(format!("ferry-fm-other-{}.key", std::process::id()));
    let _ = std::fs::remove_file(&other);
    let out = Command::new(ferry_tests::ferry_bin())
        .args(["keygen", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(out.status.success());
    before_commit(
        "fm_auth_another_key",
        "",
        "",
        &["--key", other.to_str().unwrap()],
        &[],
        "authentication failed",
    );
    let _ = std::fs::remove_file(&other);
}

#[test]
fn config_refused_by_admission() {
    before_commit(
        "fm_config_refused",
        "",
        "",
        &["--max-memory", "16M"],
        &[],
        "at most 16 MiB",
    );
}

#[test]
fn precopy_destination_dies() {
    before_commit(
        "fm_precopy_destination_dies",
        "",
        "dst-precopy=exit",
        &[],
        &[],
        "migration failed",
    );
}

#[test]
fn capture_on_destination_dies() {
    before_commit(
        "fm_capture_destination_dies",
        "",
        "dst-capture-on=exit",
        &[],
        &[],
        "migration failed",
    );
}

#[test]
fn just_after_the_pause_the_link_is_cut() {
    before_commit(
        "fm_after_pause_cut",
        "src-paused=cut",
        "",
        &[],
        &[],
        "migration failed",
    );
}

#[test]
fn mid_state_the_link_is_cut() {
    before_commit(
        "fm_mid_state_cut",
        "src-mid-state=cut",
        "",
        &[],
        &[],
        "middle of the state",
    );
}

/// The source dies while paused, before Commit: its only holder is gone,
/// so the VM runs nowhere, and the destination, which never got Commit,
/// discarded its copy.
#[test]
fn source_dies_while_paused() {
    let Some(mut k) = Case::start("fm_source_dies_paused", "src-paused=exit", "", &[]) else {
        return;
    };
    let err = k.migrate(&[]).unwrap_err();
    assert!(
        err.contains("closed the control connection") || err.contains("cannot reach"),
        "{err}"
    );
    k.assert_runs(Where::Nowhere, Duration::from_secs(10));
    wait_log(&k.receiver_log(), "process exited", Duration::from_secs(15));
    assert!(log_has(&k.receiver_log(), "discarded"));
    k.finish_client(false);
}

/// The destination dies once it is READY (the state loaded, every page
/// in): the source's Commit, sent right behind Done, finds nobody; asking
/// the receiver, it learns the session never committed, and resumes.
#[test]
fn destination_dies_after_ready() {
    let Some(mut k) = Case::start("fm_dest_dies_after_ready", "", "dst-ready=exit", &[]) else {
        return;
    };
    let err = k.migrate(&[]).unwrap_err();
    assert!(
        err.contains("runs on here") && err.contains("aborted at the destination"),
        "{err}"
    );
    k.assert_runs(Where::Source, Duration::from_secs(5));
    k.finish_client(true);
}

/// The state fails to load at the destination after the source sent
/// Commit (it does not wait to hear that the state loaded): the
/// destination aborts and says so, and the source, waiting for Committed,
/// reads the Abort and resumes.
#[test]
fn the_state_fails_to_load_after_commit() {
    let Some(mut k) = Case::start("fm_state_fails_to_load", "", "dst-state=fail", &[]) else {
        return;
    };
    let err = k.migrate(&[]).unwrap_err();
    assert!(
        err.contains("aborted at the destination") && err.contains("did not load"),
        "{err}"
    );
    assert!(err.contains("runs on here"), "{err}");
    k.assert_runs(Where::Source, Duration::from_secs(5));
    wait_log(&k.receiver_log(), "discarded", Duration::from_secs(15));
    k.finish_client(true);
}

/// Commit is lost (the source cuts the link instead of sending it): the
/// destination never commits, and says so when asked.
#[test]
fn commit_lost() {
    let Some(mut k) = Case::start("fm_commit_lost", "src-before-commit=cut", "", &[]) else {
        return;
    };
    let err = k.migrate(&[]).unwrap_err();
    assert!(err.contains("aborted at the destination"), "{err}");
    k.assert_runs(Where::Source, Duration::from_secs(5));
    assert!(log_has(&k.receiver_log(), "aborted"));
    k.finish_client(true);
}

/// Committed is lost (the destination cuts the link instead of sending
/// it): the VM runs there; the source learns it by asking, and ends.
#[test]
fn committed_lost() {
    let Some(mut k) = Case::start("fm_committed_lost", "", "dst-running=cut", &[]) else {
        return;
    };
    let report = k.migrate(&[]).unwrap();
    assert!(report.contains("resolve query"), "{report}");
    k.assert_runs(Where::Destination, Duration::from_secs(10));
    // The source ends once its answer is in (it may still be writing).
    wait_log(&k.source_log(), "moved to", Duration::from_secs(10));
    k.finish_client(true);
}

/// The destination dies after Commit, before the VM runs: the VM runs
/// nowhere, and the source says so (lost). An operator resumes the copy
/// paused at the source; the client's stream goes on from there.
#[test]
fn destination_dies_after_commit() {
    let Some(mut k) = Case::start("fm_dest_dies_after_commit", "", "dst-committed=exit", &[])
    else {
        return;
    };
    let err = k.migrate(&[]).unwrap_err();
    assert!(
        err.contains("died there") && err.contains("runs nowhere"),
        "{err}"
    );
    k.assert_runs(Where::Nowhere, Duration::from_secs(5));
    let s = status(&k.a).expect("the source answers");
    assert_eq!(s["state"], "lost", "{s}");
    assert!(
        s["detail"].as_str().unwrap().contains("runs nowhere"),
        "{s}"
    );
    // A new migration of the lost copy is refused.
    let err = k.migrate(&[]).unwrap_err();
    assert!(err.contains("lost"), "{err}");
    let out = ferry_ctl(&["resolve", "--resume-here", "--api"], &k.a).unwrap();
    assert!(out.contains("resumed here"), "{out}");
    k.assert_runs(Where::Source, Duration::from_secs(5));
    k.finish_client(true);
}

/// The source dies right after sending Commit: the destination runs the
/// VM.
#[test]
fn source_dies_after_commit() {
    let Some(mut k) = Case::start(
        "fm_source_dies_after_commit",
        "src-after-commit=exit",
        "",
        &[],
    ) else {
        return;
    };
    let _ = k.migrate(&[]).unwrap_err();
    k.assert_runs(Where::Destination, Duration::from_secs(10));
    k.finish_client(true);
}

/// The migration link is partitioned during the stop-and-copy: the
/// source's deadline passes, it resumes; the destination never got
/// Commit and discards its copy once the link heals.
#[test]
fn partition_during_stop_and_copy() {
    let Some(mut k) = Case::start(
        "fm_partition_stop_and_copy",
        "src-capture-on=stall:1500",
        "",
        &[],
    ) else {
        return;
    };
    let log = k.source_log();
    let c = std::thread::scope(|s| {
        let m = s.spawn(|| k.migrate(&[]));
        wait_log(&log, "failpoint src-capture-on", Duration::from_secs(30));
        k.partition();
        m.join().unwrap()
    });
    let err = c.unwrap_err();
    assert!(
        err.contains("deadline") || err.contains("timed out"),
        "{err}"
    );
    assert!(err.contains("runs on here"), "{err}");
    k.assert_runs(Where::Source, Duration::from_secs(5));
    k.heal();
    wait_log(&k.receiver_log(), "discarded", Duration::from_secs(90));
    k.assert_runs(Where::Source, Duration::from_secs(1));
    k.finish_client(true);
}

/// The end is ambiguous (Committed never arrives and the receiver cannot
/// be asked: the link is partitioned): the source stays paused, in doubt,
/// and refuses to be migrated again; once the link heals it learns that
/// the VM runs at the destination, and ends.
#[test]
fn a_retry_after_an_ambiguous_end_is_refused() {
    let Some(mut k) = Case::start(
        "fm_retry_after_ambiguous_end",
        "",
        "dst-running=stall:1500",
        &[],
    ) else {
        return;
    };
    let rlog = k.receiver_log();
    let r = std::thread::scope(|s| {
        let m = s.spawn(|| k.migrate(&[]));
        wait_log(&rlog, "failpoint dst-running", Duration::from_secs(30));
        k.partition();
        m.join().unwrap()
    });
    let err = r.unwrap_err();
    assert!(err.contains("in doubt"), "{err}");
    let s = status(&k.a).expect("the source answers");
    assert_eq!(s["state"], "in-doubt", "{s}");
    assert!(s["detail"].as_str().unwrap().contains("unknown"), "{s}");
    // One copy: it runs at the destination; the source holds it paused.
    let b = status(&k.b).expect("the destination answers");
    assert_eq!(
        (b["state"].as_str(), b["generation"].as_u64()),
        (Some("running"), Some(1))
    );
    // Retries are refused, naming why.
    let again = k.migrate(&[]).unwrap_err();
    assert!(
        again.contains("in doubt") || again.contains("unknown"),
        "{again}"
    );
    let resume = ferry_ctl(&["resume", "--api"], &k.a)
        .unwrap_err()
        .to_string();
    assert!(resume.contains("unknown"), "{resume}");
    k.heal();
    k.assert_runs(Where::Destination, Duration::from_secs(15));
    k.finish_client(true);
}

/// A relay between the hosts flips one bit in the middle of the pre-copy:
/// the destination's record does not open, the migration fails, the VM
/// runs on at the source.
#[test]
fn a_flipped_bit_fails_the_migration() {
    let Some(mut k) = Case::start("fm_flipped_bit", "", "", &[]) else {
        return;
    };
    let relay = Relay::start(&k, 7999, Tamper::FlipAt(600 << 10));
    let err = k.c.migrate(&k.a, "hostB", 7999, &[]).unwrap_err();
    assert!(err.contains("runs on here"), "{err}");
    relay.finish();
    wait_log(
        &k.receiver_log(),
        "failed authentication",
        Duration::from_secs(10),
    );
    k.assert_runs(Where::Source, Duration::from_secs(5));
    k.finish_client(true);
}

/// A whole session recorded on the wire and replayed to another receiver
/// holding the same key: turned away at its first record; no VM starts.
#[test]
fn a_replayed_session_is_turned_away() {
    let Some(mut k) = Case::start("fm_replayed_session", "", "", &[]) else {
        return;
    };
    let relay = Relay::start(&k, 7999, Tamper::Record);
    let report = k.c.migrate(&k.a, "hostB", 7999, &[]).unwrap();
    assert!(report.contains("\"ok\":true"), "{report}");
    let recorded = relay.finish();
    // The whole session: every page the VM had written, its state.
    assert!(
        recorded.len() > 200_000,
        "{} bytes recorded",
        recorded.len()
    );
    k.assert_runs(Where::Destination, Duration::from_secs(10));
    // A second receiver, on hostA, with the same key, gets the replay.
    let a2 = k.dir.join("a2.sock");
    let mut cmd =
        k.c.receiver_command("hostA", 7001, &["--api", a2.to_str().unwrap()]);
    cmd.stdin(Stdio::null());
    let log = k.dir.join("receiver-a.log");
    let pid = k.c.spawn(cmd, &log).unwrap();
    cluster::wait_for_line(&log, "waiting for VMs", Duration::from_secs(10), pid).unwrap();
    let replay = k.c.in_ns("hostB", || {
        let mut s = std::net::TcpStream::connect("10.77.2.1:7001").unwrap();
        let _ = s.write_all(&recorded);
        let _ = s.shutdown(std::net::Shutdown::Write);
        let mut back = Vec::new();
        let _ = s.read_to_end(&mut back);
        back.len()
    });
    let back = replay.unwrap();
    wait_log(&log, "turned away", Duration::from_secs(10));
    assert!(log_has(&log, "failed authentication"), "{back} bytes back");
    assert!(!log_has(&log, "admitted"));
    assert!(status(&a2).is_none());
    k.assert_runs(Where::Destination, Duration::from_secs(1));
    k.finish_client(true);
}

/// Peers without credentials: an `--insecure` source and a stranger
/// writing garbage are turned away; the VM runs on at the source.
#[test]
fn peers_without_credentials_are_turned_away() {
    let Some(mut k) = Case::start("fm_no_credentials", "", "", &[]) else {
        return;
    };
    let err = k.migrate(&["--insecure"]).unwrap_err();
    assert!(
        err.contains("requires a key") && err.contains("runs on here"),
        "{err}"
    );
    k.c.in_ns("hostA", || {
        let mut s = std::net::TcpStream::connect(DEST).unwrap();
        let _ = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
        let mut b = Vec::new();
        let _ = s.read_to_end(&mut b);
        assert!(b.is_empty(), "a stranger got {} bytes", b.len());
    })
    .unwrap();
    wait_log(
        &k.receiver_log(),
        "not a Ferry migration endpoint",
        Duration::from_secs(10),
    );
    k.assert_runs(Where::Source, Duration::from_secs(5));
    k.finish_client(true);
}

/// What a relay does to the source's bytes.
#[derive(Clone, Copy)]
enum Tamper {
    /// Flips the lowest bit of byte N (counted from the first byte).
    FlipAt(usize),
    /// Passes everything and keeps a copy of the source's bytes.
    Record,
}

/// A TCP relay in hostB's namespace from 10.77.2.2:`port` to the receiver.
struct Relay {
    thread: std::thread::JoinHandle<Vec<u8>>,
}

impl Relay {
    fn start(k: &Case, port: u16, tamper: Tamper) -> Relay {
        let listener =
            k.c.in_ns("hostB", move || {
                std::net::TcpListener::bind(("10.77.2.2", port)).unwrap()
            })
            .unwrap();
        let ns = k.c.ns("hostB");
        let thread = std::thread::spawn(move || {
            let (up, _) = listener.accept().unwrap();
            let path = Path::new("/run/netns").join(&ns);
            let f = std::fs::File::open(path).unwrap();
            use std::os::fd::AsRawFd;
            // SAFETY: setns on an open namespace fd changes only this
            // thread's network namespace.
            assert_eq!(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
            let down = std::net::TcpStream::connect(DEST).unwrap();
            let (mut up_r, mut down_w) = (up.try_clone().unwrap(), down.try_clone().unwrap());
            let (mut down_r, mut up_w) = (down, up);
            let back = std::thread::spawn(move || {
                let _ = std::io::copy(&mut down_r, &mut up_w);
                let _ = up_w.shutdown(std::net::Shutdown::Both);
            });
            let mut seen = 0usize;
            let mut kept = Vec::new();
            let mut buf = vec![0u8; 64 << 10];
            loop {
                let n = match up_r.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                match tamper {
                    Tamper::FlipAt(at) if (seen..seen + n).contains(&at) => buf[at - seen] ^= 1,
                    Tamper::Record => kept.extend_from_slice(&buf[..n]),
                    _ => {}
                }
                seen += n;
                if down_w.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
            let _ = down_w.shutdown(std::net::Shutdown::Write);
            let _ = back.join();
            kept
        });
        Relay { thread }
    }

    fn finish(self) -> Vec<u8> {
        self.thread.join().unwrap()
    }
}
