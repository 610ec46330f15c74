//! The VMM's confinement, checked from outside on real KVM: every thread of
//! a running VM under seccomp with NoNewPrivs and reduced capabilities, a
//! filtered system call ending the VMM with one line naming it, and a VM
//! jailed in an empty directory as nobody that runs, snapshots and
//! migrates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_tests::cluster::{self, Cluster, ferry_ctl};
use ferry_tests::{Need, image};

/// CAP_SYS_NICE: all a VMM that stays root keeps.
const NICE: u64 = 1 << 23;

fn setup(test: &str) -> Option<(Cluster, PathBuf)> {
    let c = cluster::for_test_with(test, "fh", &[Need::Program("redis-cli")])?;
    let dir = cluster::log_dir(test);
    for e in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    Some((c, dir))
}

/// Each thread of `pid`: (name, Seccomp, NoNewPrivs, CapEff, CapBnd, Uid).
fn threads(pid: u64) -> Vec<(String, u64, u64, u64, u64, String)> {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        let status = std::fs::read_to_string(t.path().join("status")).unwrap_or_default();
        let field = |k: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let hex = |k: &str| u64::from_str_radix(&field(k), 16).unwrap_or(u64::MAX);
        out.push((
            comm.trim().to_string(),
            field("Seccomp:").parse().unwrap_or(0),
            field("NoNewPrivs:").parse().unwrap_or(0),
            hex("CapEff:"),
            hex("CapBnd:"),
            field("Uid:"),
        ));
    }
    out
}

fn status(api: &Path) -> serde_json::Value {
    serde_json::from_str(&ferry_ctl(&["status", "--json", "--api"], api).unwrap()).unwrap()
}

fn start(c: &mut Cluster, dir: &Path, host: &str, extra: &[&str]) -> PathBuf {
    let api = dir.join(format!("{host}.sock"));
    let mut args = vec!["--api", api.to_str().unwrap()];
    args.extend_from_slice(extra);
    c.start_vm_with(
        host,
        &image("kv"),
        "64M",
        &args,
        &[],
        &dir.join(format!("{host}.log")),
        "listening",
    )
    .unwrap_or_else(|e| panic!("starting kv: {e:#}"));
    api
}

#[test]
fn every_thread_of_a_running_vm_is_confined() {
    let Some((mut c, dir)) = setup("every_thread_of_a_running_vm_is_confined") else {
        return;
    };
    let api = start(&mut c, &dir, "hostA", &[]);
    let v = status(&api);
    let pid = v["pid"].as_u64().unwrap();
    let ts = threads(pid);
    let names: Vec<&str> = ts.iter().map(|t| t.0.as_str()).collect();
    for want in ["ferry", "ferry-signals", "ferry-net", "ferry-api"] {
        assert!(names.contains(&want), "no {want} thread: {names:?}");
    }
    for (name, seccomp, nnp, eff, bnd, _) in &ts {
        assert_eq!(*seccomp, 2, "{name}: not in seccomp filter mode");
        assert_eq!(*nnp, 1, "{name}: NoNewPrivs not set");
        assert_eq!(eff & !NICE, 0, "{name}: effective capabilities {eff:#x}");
        assert_eq!(bnd & !NICE, 0, "{name}: bounding set {bnd:#x}");
    }
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&api).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let conf = v["lockdown"].as_str().unwrap();
    assert!(conf.contains("seccomp on"), "{conf}");
    // The VM still does its work: a client's request through it.
    let out = c
        .command("client", "redis-cli")
        .args(["-h", cluster::VIP, "-p", "6379", "PING"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("PONG"),
        "{out:?}"
    );
}

/// A run of hello under the failpoints build, with `failpoints` armed.
fn hello_with(failpoints: &str, extra: &[&str], api: Option<&Path>) -> ferry_tests::Finished {
    let mut cmd = std::process::Command::new(ferry_tests::ferry_failpoints_bin());
    cmd.env("FERRY_FAILPOINTS", failpoints)
        .arg("run")
        .arg(image("hello"))
        .args(extra);
    if let Some(a) = api {
        cmd.arg("--api").arg(a);
    }
    cmd.args(["--", "sleep-ms=1500"]);
    ferry_tests::run(&mut cmd, Duration::from_secs(60))
}

#[test]
fn a_filtered_system_call_ends_the_vmm_with_one_line() {
    if !ferry_tests::needs(
        "a_filtered_system_call_ends_the_vmm_with_one_line",
        &[Need::Kvm],
    ) {
        return;
    }
    // The vCPU thread tries to open a file before the guest runs.
    let out = hello_with("vm-run=open", &[], None);
    assert_eq!(out.status, Some(125), "{}", out.stderr);
    let lines: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("seccomp"))
        .collect();
    assert_eq!(lines.len(), 1, "{}", out.stderr);
    assert!(
        lines[0].starts_with("ferry: error: seccomp: the vcpu thread made system call openat (257"),
        "{}",
        lines[0]
    );
    assert!(
        !out.stderr.contains("opened /etc/hostname"),
        "{}",
        out.stderr
    );
    // Without the filters the same open succeeds, and the VM runs on.
    let out = hello_with("vm-run=open", &["--seccomp", "off"], None);
    assert_eq!(out.status, Some(0), "{}", out.stderr);
    assert!(
        out.stderr.contains("opened /etc/hostname"),
        "{}",
        out.stderr
    );
    // A control connection's thread has its own filter.
    let dir = cluster::log_dir("a_filtered_system_call_ends_the_vmm");
    let api = dir.join("h.sock");
    let _ = std::fs::remove_file(&api);
    let a2 = api.clone();
    let asker = std::thread::spawn(move || {
        for _ in 0..200 {
            if a2.exists() {
                let _ = ferry_ctl(&["status", "--api"], &a2);
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let out = hello_with("api-request=open", &[], Some(&api));
    asker.join().unwrap();
    assert_eq!(out.status, Some(125), "{}", out.stderr);
    assert!(
        out.stderr
            .contains("ferry: error: seccomp: the control thread made system call openat"),
        "{}",
        out.stderr
    );
}

/// An empty root-owned directory for a jail.
fn jail_dir(name: &str) -> PathBuf {
    let d = ferry_tests::root().join("target/jails").join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o755)).unwrap();
    d
}

#[test]
fn a_jailed_vm_runs_snapshots_and_migrates() {
    let Some((mut c, dir)) = setup("a_jailed_vm_runs_snapshots_and_migrates") else {
        return;
    };
    let jail = jail_dir("jailed-vm");
    let j = jail.to_str().unwrap();
    let nobody = ["--jail", j, "--uid", "65534", "--gid", "65534"];
    let api = start(&mut c, &dir, "hostA", &nobody);
    let v = status(&api);
    let pid = v["pid"].as_u64().unwrap();
    assert!(v["lockdown"].as_str().unwrap().contains("jailed in"), "{v}");
    for (name, seccomp, _, eff, bnd, uid) in threads(pid) {
        assert_eq!(seccomp, 2, "{name}");
        assert_eq!((eff, bnd), (0, 0), "{name}: capabilities left");
        assert!(
            uid.split_whitespace().all(|u| u == "65534"),
            "{name}: uid {uid}"
        );
    }
    let root = std::fs::read_link(format!("/proc/{pid}/root")).unwrap();
    assert_eq!(root, jail);
    // It serves.
    let set = c
        .command("client", "redis-cli")
        .args(["-h", cluster::VIP, "-p", "6379", "SET", "jailed", "yes"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&set.stdout).contains("OK"),
        "{set:?}"
    );
    // It snapshots, to a path outside its jail (the file comes as an fd).
    let snap = dir.join("jailed.snap");
    let out = ferry_ctl(
        &[
            "snapshot",
            "--json",
            "--out",
            snap.to_str().unwrap(),
            "--api",
        ],
        &api,
    )
    .unwrap();
    assert!(out.contains("\"ok\":true"), "{out}");
    assert!(std::fs::metadata(&snap).unwrap().len() > 1 << 20);
    // It migrates, to a receiver whose VMs are jailed too.
    let b_api = dir.join("hostB.sock");
    let rx_jail = jail_dir("jailed-rx");
    let rx = c
        .start_receiver(
            "hostB",
            7000,
            &b_api,
            &[
                "--jail",
                rx_jail.to_str().unwrap(),
                "--uid",
                "65534",
                "--gid",
                "65534",
            ],
            &dir.join("rx.log"),
        )
        .unwrap();
    let report = c.migrate(&api, "hostB", 7000, &[]).unwrap();
    assert!(report.contains("\"ok\":true"), "{report}");
    let v = status(&b_api);
    assert!(v["lockdown"].as_str().unwrap().contains("jailed in"), "{v}");
    // To ps, top and pgrep the VM's process there is a ferry (its
    // receiver starts it as /proc/self/exe, which would name it "exe").
    let pid = v["pid"].as_u64().unwrap();
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap();
    assert_eq!(comm.trim(), "ferry");
    // It received in the background (its scheduling group at nice 19),
    // and runs the VM in the foreground again, jailed as it is.
    let group = std::fs::read_to_string(format!("/proc/{pid}/autogroup")).unwrap();
    assert!(group.trim_end().ends_with(" nice 0"), "{group}");
    let get = c
        .command("client", "redis-cli")
        .args(["-h", cluster::VIP, "-p", "6379", "GET", "jailed"])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&get.stdout).contains("yes"),
        "{get:?}"
    );
    ferry_ctl(&["stop", "--api"], &b_api).unwrap();
    c.stop(rx, Duration::from_secs(5));
}

#[test]
fn a_jail_that_others_may_write_or_root_as_the_user_are_refused() {
    if !ferry_tests::needs(
        "a_jail_that_others_may_write_or_root_as_the_user_are_refused",
        &[Need::Kvm],
    ) {
        return;
    }
    let open = jail_dir("world-writable");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o777)).unwrap();
    let run = |args: &[&str]| {
        ferry_tests::run(
            std::process::Command::new(ferry_tests::ferry_bin())
                .arg("run")
                .arg(image("hello"))
                .args(args),
            Duration::from_secs(30),
        )
    };
    let out = run(&[
        "--jail",
        open.to_str().unwrap(),
        "--uid",
        "65534",
        "--gid",
        "65534",
    ]);
    assert_eq!(out.status, Some(125), "{}", out.stderr);
    assert!(
        out.stderr.contains("writable by nobody else"),
        "{}",
        out.stderr
    );
    let ok = jail_dir("as-root");
    let out = run(&["--jail", ok.to_str().unwrap(), "--uid", "0", "--gid", "0"]);
    assert_eq!(out.status, Some(125), "{}", out.stderr);
    assert!(out.stderr.contains("must not be 0"), "{}", out.stderr);
    let out = run(&["--uid", "65534"]);
    assert_eq!(out.status, Some(125), "{}", out.stderr);
}

/// `ferry status` as another user: `uid`, primary group `gid`, no others.
fn status_as(uid: u32, gid: u32, api: &Path) -> ferry_tests::Finished {
    ferry_tests::run(
        std::process::Command::new("setpriv")
            .args([
                &format!("--reuid={uid}"),
                &format!("--regid={gid}"),
                "--clear-groups",
            ])
            .arg(ferry_tests::ferry_bin())
            .args(["status", "--json", "--api"])
            .arg(api),
        Duration::from_secs(30),
    )
}

#[test]
fn the_control_socket_is_the_owners_and_its_groups_only() {
    if !ferry_tests::needs(
        "the_control_socket_is_the_owners_and_its_groups_only",
        &[Need::Kvm, Need::Root, Need::Program("setpriv")],
    ) {
        return;
    }
    let dir = cluster::log_dir("the_control_socket_is_the_owners");
    // The socket's directory must let others reach the socket at all.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let run = |api: &Path, extra: &[&str]| {
        let _ = std::fs::remove_file(api);
        let child = std::process::Command::new(ferry_tests::ferry_bin())
            .arg("run")
            .arg(image("hello"))
            .arg("--api")
            .arg(api)
            .args(extra)
            .args(["--", "sleep-ms=3000"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..500 {
            if ferry_ctl(&["status", "--api"], api).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        child
    };
    // Without --api-group: mode 0600, another user cannot even connect.
    let private = dir.join("private.sock");
    let mut vm = run(&private, &[]);
    assert_eq!(
        std::fs::metadata(&private).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let out = status_as(65534, 65534, &private);
    assert_ne!(out.status, Some(0), "{}", out.stdout);
    assert!(out.stderr.contains("Permission denied"), "{}", out.stderr);
    ferry_ctl(&["stop", "--api"], &private).unwrap();
    vm.wait().unwrap();
    // With --api-group nogroup: 0660 and the group's; its members get in,
    // others do not.
    let shared = dir.join("shared.sock");
    let mut vm = run(&shared, &["--api-group", "65534"]);
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(&shared).unwrap();
    assert_eq!((meta.mode() & 0o777, meta.gid()), (0o660, 65534));
    let member = status_as(65533, 65534, &shared);
    assert_eq!(member.status, Some(0), "{}", member.stderr);
    assert!(member.stdout.contains("\"state\""), "{}", member.stdout);
    let stranger = status_as(65533, 65533, &shared);
    assert_ne!(stranger.status, Some(0), "{}", stranger.stdout);
    ferry_ctl(&["stop", "--api"], &shared).unwrap();
    vm.wait().unwrap();
}
