//! The operator's path: `ferry-cluster`, which `just run-app`,
//! `live-migrate`, `status`, `stop`, `snapshot` and `restore` run, on a
//! cluster of the test's own. VMs it starts belong to no terminal; it
//! finds the service wherever it runs; it refuses a second VM on the
//! service's address, naming the one there.

use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_tests::cluster::VIP;
use ferry_tests::{Need, image, needs, root};

/// A cluster named for the test, run through `ferry-cluster`; brought
/// down when dropped.
struct Fc {
    prefix: String,
    dir: PathBuf,
}

impl Fc {
    fn new(test: &str, more: &[Need]) -> Option<Fc> {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let mut all = vec![Need::Kvm, Need::Root, Need::Program("ip")];
        all.extend_from_slice(more);
        if !needs(test, &all) {
            return None;
        }
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("fo{}{n}", std::process::id() % 100_000);
        let dir = ferry_tests::cluster::log_dir(test);
        Some(Fc { prefix, dir })
    }

    fn bin() -> PathBuf {
        root().join("target/release/ferry-cluster")
    }

    /// `ferry-cluster --prefix P ARGS`.
    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new(Fc::bin());
        c.arg("--prefix").arg(&self.prefix).args(args);
        c
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        assert!(
            out.status.success(),
            "ferry-cluster {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn fails(&self, args: &[&str]) -> String {
        let out: Output = self.cmd(args).stdin(Stdio::null()).output().unwrap();
        assert!(!out.status.success(), "ferry-cluster {args:?} succeeded");
        String::from_utf8_lossy(&out.stderr).into_owned()
    }

    /// Where the service runs, from `status --json`: (host, state,
    /// generation) of each VM that answers.
    fn vms(&self) -> Vec<(String, String, u64)> {
        let v: serde_json::Value = serde_json::from_str(&self.ok(&["status", "--json"])).unwrap();
        v["vms"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["host"].as_str().unwrap().to_string(),
                    m["status"]["state"].as_str().unwrap().to_string(),
                    m["status"]["generation"].as_u64().unwrap(),
                )
            })
            .collect()
    }

    fn redis(&self, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &format!("{}-client", self.prefix)])
            .args(["redis-cli", "-h", VIP])
            .args(args)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs `line` in a shell inside a pseudo-terminal (`script`), in a
    /// session of its own, as an operator's terminal would; returns the
    /// process holding the terminal and the file that logs it.
    fn terminal(&self, name: &str, line: &str) -> (std::process::Child, PathBuf) {
        let log = self.dir.join(format!("{name}.typescript"));
        let _ = std::fs::remove_file(&log);
        let child = Command::new("setsid")
            .args(["script", "-qfec", line])
            .arg(&log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        (child, log)
    }
}

impl Drop for Fc {
    fn drop(&mut self) {
        let _ = self.cmd(&["down"]).stdin(Stdio::null()).output();
    }
}

fn wait_for(log: &PathBuf, needle: &str, limit: Duration) {
    let t = Instant::now();
    while !std::fs::read_to_string(log)
        .unwrap_or_default()
        .contains(needle)
    {
        assert!(
            t.elapsed() < limit,
            "no {needle:?} in {}:\n{}",
            log.display(),
            std::fs::read_to_string(log).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Closes the terminal (the `script` process holding it dies; the shell in
/// it gets SIGHUP).
fn close_terminal(mut t: std::process::Child) {
    // SAFETY: kill(2) on our own child, not yet reaped.
    unsafe { libc::kill(t.id() as i32, libc::SIGKILL) };
    let _ = t.wait();
}

/// The service started from one terminal and moved from another; both
/// terminals are closed; the VM serves on, with its data, on the host it
/// moved to, and `stop` ends it there.
#[test]
fn a_moved_vm_outlives_the_terminals_that_started_and_moved_it() {
    let Some(fc) = Fc::new(
        "a_moved_vm_outlives_the_terminals",
        &[Need::Program("script"), Need::Program("redis-cli")],
    ) else {
        return;
    };
    let fcb = Fc::bin();
    let kv = image("kv");
    let (t1, log1) = fc.terminal(
        "run",
        &format!(
            "{} --prefix {} run {}; echo STAR\"\"TED; sleep 600",
            fcb.display(),
            fc.prefix,
            kv.display()
        ),
    );
    wait_for(&log1, "STARTED", Duration::from_secs(60));
    assert!(
        std::fs::read_to_string(&log1)
            .unwrap()
            .contains("closing this terminal does not stop it")
    );
    close_terminal(t1);
    assert_eq!(fc.redis(&["set", "survivor", "yes"]), "OK");
    let (t2, log2) = fc.terminal(
        "migrate",
        &format!(
            "{} --prefix {} migrate; echo MOV\"\"ED; sleep 600",
            fcb.display(),
            fc.prefix
        ),
    );
    wait_for(&log2, "MOVED", Duration::from_secs(60));
    assert!(
        std::fs::read_to_string(&log2)
            .unwrap()
            .contains("runs on hostB now")
    );
    close_terminal(t2);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(fc.vms(), vec![("hostB".into(), "running".into(), 1)]);
    assert_eq!(fc.redis(&["get", "survivor"]), "yes");
    let out = fc.ok(&["stop"]);
    assert!(out.contains("on hostB"), "{out}");
    assert!(fc.vms().is_empty());
}

/// `ferry run` on a tap that does not exist creates it, on no bridge, and
/// says loudly that the VM cannot be reached (here in the client's
/// namespace, which has no bridge for it).
#[test]
fn a_tap_created_on_no_bridge_is_flagged() {
    let Some(fc) = Fc::new("a_tap_created_on_no_bridge", &[]) else {
        return;
    };
    fc.ok(&["up"]);
    let out = Command::new("ip")
        .args(["netns", "exec", &format!("{}-client", fc.prefix)])
        .arg(ferry_tests::ferry_bin())
        .arg("run")
        .arg(image("hello"))
        .args([
            "--tap",
            "fonew0",
            "--mac",
            "02:00:00:00:00:99",
            "--ip",
            "10.99.0.2/24",
        ])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{err}");
    assert!(
        err.contains("WARNING: tap fonew0 did not exist") && err.contains("on no bridge"),
        "{err}"
    );
}

/// One VM holds the service's address: a second one is refused, naming
/// the first and where it runs, before and after it moved, and a restore
/// too.
#[test]
fn a_second_vm_on_the_service_address_is_refused() {
    let Some(fc) = Fc::new("a_second_vm_on_the_service_address", &[]) else {
        return;
    };
    let echo = image("echo");
    let http = image("http");
    fc.ok(&["run", echo.to_str().unwrap()]);
    for host in ["hostA", "hostB"] {
        let err = fc.fails(&["run", http.to_str().unwrap(), "--host", host]);
        assert!(
            err.contains("hostA already runs VM") && err.contains("(echo)"),
            "{err}"
        );
    }
    fc.ok(&["migrate"]);
    let err = fc.fails(&["run", http.to_str().unwrap()]);
    assert!(err.contains("hostB already runs VM"), "{err}");
    let snap = fc.dir.join("echo.snap");
    let _ = std::fs::remove_file(&snap);
    fc.ok(&["snapshot", snap.to_str().unwrap()]);
    let err = fc.fails(&["restore", snap.to_str().unwrap()]);
    assert!(err.contains("hostB already runs VM"), "{err}");
    assert_eq!(fc.vms(), vec![("hostB".into(), "running".into(), 1)]);
}

/// Snapshot and restore, one command each: the service stops into a file
/// and comes back on the other host with its data, one generation on.
#[test]
fn snapshot_and_restore_are_one_command_each() {
    let Some(fc) = Fc::new(
        "snapshot_and_restore_one_command",
        &[Need::Program("redis-cli")],
    ) else {
        return;
    };
    let kv = image("kv");
    fc.ok(&["run", kv.to_str().unwrap()]);
    assert_eq!(fc.redis(&["set", "k", "kept"]), "OK");
    let snap = fc.dir.join("kv.snap");
    let _ = std::fs::remove_file(&snap);
    let out = fc.ok(&["snapshot", snap.to_str().unwrap(), "--then", "stop"]);
    assert!(out.contains("is in"), "{out}");
    let t = Instant::now();
    while !fc.vms().is_empty() {
        assert!(t.elapsed() < Duration::from_secs(10), "{:?}", fc.vms());
        std::thread::sleep(Duration::from_millis(50));
    }
    // `ferry restore` outside the hosts' namespaces: no tap there; refused.
    let out = Command::new(ferry_tests::ferry_bin())
        .args(["restore"])
        .arg(&snap)
        .args(["--tap", "fonotap0"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(125), "{err}");
    assert!(
        err.contains("does not exist in this network namespace"),
        "{err}"
    );
    let out = fc.ok(&["restore", snap.to_str().unwrap(), "--host", "hostB"]);
    assert!(out.contains("runs on hostB at generation 1"), "{out}");
    assert_eq!(fc.redis(&["get", "k"]), "kept");
    assert_eq!(fc.vms(), vec![("hostB".into(), "running".into(), 1)]);
}

/// Removes a test's app from apps/ (and its image), and puts Cargo.lock
/// back as it was, when dropped.
struct TempApp {
    dir: PathBuf,
    image: PathBuf,
    lock: Vec<u8>,
}

impl Drop for TempApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.image);
        let _ = std::fs::write(root().join("Cargo.lock"), &self.lock);
    }
}

/// `images/new-app PREFIXPID KIND` then `images/build` on it, both
/// asserted to succeed: the app's cleanup (its directory, its image and
/// the workspace lock restored when dropped), its name and its image.
fn new_app(prefix: &str, kind: &str) -> (TempApp, String, PathBuf) {
    let name = format!("{prefix}{}", std::process::id());
    let cleanup = TempApp {
        dir: root().join("apps").join(&name),
        image: root().join("images/out").join(&name),
        lock: std::fs::read(root().join("Cargo.lock")).unwrap(),
    };
    let mut image = PathBuf::new();
    for (tool, args) in [
        ("images/new-app", vec![name.as_str(), kind]),
        ("images/build", vec![name.as_str()]),
    ] {
        let out = Command::new(root().join(tool))
            .args(&args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{tool} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        image = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    }
    (cleanup, name, image)
}

/// A newcomer's path: `just new-app NAME` (images/new-app) makes a service
/// from the template, it builds without editing the workspace, boots on
/// Ferry in the cluster and serves a real client.
#[test]
fn a_new_app_from_the_template_builds_and_serves() {
    let mut all = vec![
        Need::Kvm,
        Need::Root,
        Need::Program("ip"),
        Need::Program("cargo"),
    ];
    all.push(Need::Program("rustup"));
    if !needs("a_new_app_from_the_template", &all) {
        return;
    }
    let (_cleanup, name, image) = new_app("tpl", "ferry");
    let Some(mut c) = ferry_tests::cluster::for_test("a_new_app_from_the_template", "ft") else {
        return;
    };
    let log = ferry_tests::cluster::log_dir("a_new_app_from_the_template").join("vm.log");
    c.start_vm("hostA", &image, "64M", &["greeting=hi"], &log, "listening")
        .unwrap();
    let (hello, loud) = c
        .in_ns("client", || {
            use std::io::{BufRead, BufReader, Write};
            let s = std::net::TcpStream::connect((VIP, 7000)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let mut r = BufReader::new(s.try_clone().unwrap());
            let mut hello = String::new();
            r.read_line(&mut hello).unwrap();
            (&s).write_all(b"make me loud\n").unwrap();
            let mut loud = String::new();
            r.read_line(&mut loud).unwrap();
            (hello, loud)
        })
        .unwrap();
    assert!(hello.starts_with("hi! this service has run"), "{hello:?}");
    assert_eq!(loud, "MAKE ME LOUD\n");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains(&format!("{name}: listening on port 7000"))
    );
}

/// `just new-app NAME hermit` makes a std Rust service (from
/// apps/hermit-echo) that builds with nothing else edited and serves.
#[test]
fn a_new_std_app_from_the_hermit_template_builds_and_serves() {
    if !needs(
        "a_new_std_app_from_the_hermit_template",
        &[
            Need::Kvm,
            Need::Root,
            Need::Program("ip"),
            Need::Program("cargo"),
            Need::Program("rustup"),
        ],
    ) {
        return;
    }
    let (_cleanup, name, image) = new_app("htpl", "hermit");
    let Some(mut c) =
        ferry_tests::cluster::for_test("a_new_std_app_from_the_hermit_template", "fh")
    else {
        return;
    };
    let log =
        ferry_tests::cluster::log_dir("a_new_std_app_from_the_hermit_template").join("vm.log");
    c.start_vm("hostA", &image, "64M", &[], &log, "listening")
        .unwrap();
    let echoed = c
        .in_ns("client", || {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect((VIP, 7)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            s.write_all(b"std on hermit").unwrap();
            let mut got = [0u8; 13];
            s.read_exact(&mut got).unwrap();
            got
        })
        .unwrap();
    assert_eq!(&echoed, b"std on hermit");
    assert!(
        std::fs::read_to_string(&log)
            .unwrap()
            .contains(&format!("{name}: listening on port 7"))
    );
}
