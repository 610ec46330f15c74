//! Snapshot and restore on real KVM, taps and namespaces: a VM is
//! snapshotted on hostA while clients hold connections, restored on hostB,
//! and the same connections carry on.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ferry_tests::cluster::{self, Cluster, VIP, ferry_ctl};
use ferry_tests::{image, json_u64, kvm_or_skip};

fn cluster(test: &str) -> Option<(Cluster, PathBuf)> {
    cluster_with(test, &[])
}

/// [`cluster`] for a test that also runs `programs` (clients).
fn cluster_with(test: &str, programs: &[&'static str]) -> Option<(Cluster, PathBuf)> {
    let more: Vec<ferry_tests::Need> = programs
        .iter()
        .map(|p| ferry_tests::Need::Program(p))
        .collect();
    let c = cluster::for_test_with(test, "fs", &more)?;
    let dir = cluster::log_dir(test);
    for f in ["a.sock", "b.sock", "a2.sock", "vm.snap"] {
        let _ = std::fs::remove_file(dir.join(f));
    }
    Some((c, dir))
}

/// Starts `app` on hostA with a control socket.
fn start(c: &mut Cluster, dir: &Path, app: &str, args: &[&str]) -> PathBuf {
    let api = dir.join("a.sock");
    let api_s = api.to_str().unwrap().to_string();
    c.start_vm_with(
        "hostA",
        &image(app),
        "64M",
        &["--api", &api_s],
        args,
        &dir.join("a.log"),
        "listening",
    )
    .unwrap_or_else(|e| panic!("starting {app}: {e:#}"));
    api
}

/// Snapshots the VM behind `api` (stopping it) and restores it on hostB.
/// Returns the new control socket.
fn move_to_b(c: &mut Cluster, dir: &Path, api: &Path) -> PathBuf {
    let snap = dir.join("vm.snap");
    let out = ferry_ctl(
        &[
            "snapshot",
            "--json",
            "--out",
            snap.to_str().unwrap(),
            "--then",
            "stop",
            "--api",
        ],
        api,
    )
    .expect("snapshot");
    assert!(out.contains("\"ok\":true"), "{out}");
    let b = dir.join("b.sock");
    c.restore_vm("hostB", &snap, &b, &dir.join("b.log"))
        .expect("restore on hostB");
    b
}

fn connect(port: u16) -> TcpStream {
    let s = TcpStream::connect_timeout(
        &format!("{VIP}:{port}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s
}

fn round_trip(s: &mut TcpStream, msg: &[u8]) {
    s.write_all(msg).unwrap();
    let mut got = vec![0u8; msg.len()];
    s.read_exact(&mut got).unwrap();
    assert_eq!(got, msg);
}

/// Opens a connection from the client namespace (the socket stays there,
/// whichever thread uses it).
fn client_connect(c: &Cluster, port: u16) -> TcpStream {
    c.in_ns("client", || connect(port)).unwrap()
}

#[test]
fn echo_conversation_moves_to_the_other_host_and_time_runs_on() {
    let Some((mut c, dir)) = cluster("echo_conversation_moves_to_the_other_host") else {
        return;
    };
    let api = start(&mut c, &dir, "echo", &[]);
    let before = c.client_tcp_counters().unwrap();
    let mut conn = client_connect(&c, 7);
    for i in 0..5 {
        round_trip(&mut conn, format!("before {i};").as_bytes());
    }
    let t0 = json_u64(
        &ferry_ctl(&["status", "--json", "--api"], &api).unwrap(),
        "guest_time_ns",
    )
    .unwrap();
    let wall = Instant::now();
    let b = move_to_b(&mut c, &dir, &api);
    std::thread::sleep(Duration::from_millis(200));
    for i in 0..5 {
        round_trip(&mut conn, format!("after {i};").as_bytes());
    }
    let t1 = json_u64(
        &ferry_ctl(&["status", "--json", "--api"], &b).unwrap(),
        "guest_time_ns",
    )
    .unwrap();
    let real = wall.elapsed().as_nanos() as u64;
    // Guest time went on by the real time that passed (within 50 ms, the
    // status calls' own latency), never backwards.
    assert!(t1 >= t0, "guest time went backwards: {t0} -> {t1}");
    assert!(
        t1 - t0 + 50_000_000 >= real && t1 - t0 <= real + 50_000_000,
        "guest time moved {} ns in {real} ns",
        t1 - t0
    );
    let d = c.client_tcp_counters().unwrap().since(&before);
    assert_eq!((d.estab_resets, d.out_rsts), (0, 0), "{d:?}");
    // The old host's VM is gone, the new one answers new connections too.
    let mut fresh = client_connect(&c, 7);
    round_trip(&mut fresh, b"fresh connection");
}

/// Asks hermit-probe's server one line; returns its answer's `key=N`.
fn ask_probe(conn: &mut TcpStream, line: &str, key: &str) -> u64 {
    conn.write_all(format!("{line}\n").as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut b = [0u8; 1];
    while b[0] != b'\n' {
        conn.read_exact(&mut b).unwrap();
        answer.push(b[0]);
    }
    let answer = String::from_utf8_lossy(&answer).to_string();
    ferry_tests::field(&answer, key).unwrap_or_else(|| panic!("{line}: {answer}"))
}

fn unix_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// A std program on RustyHermit reads Ferry's clock page: its `Instant`
/// runs on by the real time that passed while it was saved, restored on
/// the other host and live-migrated back, its `SystemTime` stays the
/// host's, and sleeping (a timer) and its open connection work after each.
#[test]
fn hermit_time_runs_on_across_snapshot_restore_and_migration() {
    let Some((mut c, dir)) = cluster("hermit_time_runs_on") else {
        return;
    };
    let api = start(&mut c, &dir, "hermit-probe", &["serve=7"]);
    let mut conn = client_connect(&c, 7);
    // The kernel's clock is Ferry's guest time (the clock page), not the
    // host's TSC, which counts from the host's boot.
    let same_clock = |conn: &mut TcpStream, api: &Path, what: &str| {
        let clock = ask_probe(conn, "time", "clock_ns");
        let guest = json_u64(
            &ferry_ctl(&["status", "--json", "--api"], api).unwrap(),
            "guest_time_ns",
        )
        .unwrap();
        assert!(
            clock.abs_diff(guest) < 1_000_000_000,
            "{what}: the guest's CLOCK_MONOTONIC is {clock} ns, Ferry's guest time {guest} ns"
        );
    };
    same_clock(&mut conn, &api, "at boot");
    let check = |conn: &mut TcpStream, mono0: u64, wall: Instant, what: &str| {
        let mono = ask_probe(conn, "time", "mono_ns");
        let real = wall.elapsed().as_nanos() as u64;
        // Instant went on by the real time (less the round trips' own
        // latency), never backwards and never by more.
        assert!(
            mono >= mono0,
            "{what}: Instant went backwards: {mono0} -> {mono}"
        );
        let moved = mono - mono0;
        assert!(
            moved + 100_000_000 >= real && moved <= real + 100_000_000,
            "{what}: the guest's Instant moved {moved} ns in {real} ns"
        );
        let unix = ask_probe(conn, "time", "unix_ns");
        assert!(
            unix.abs_diff(unix_ns()) < 1_000_000_000,
            "{what}: the guest's SystemTime is {unix}, the host's {}",
            unix_ns()
        );
        let slept = ask_probe(conn, "sleep 200", "slept_ns");
        assert!(
            (200_000_000..2_000_000_000).contains(&slept),
            "{what}: slept 200 ms, Instant says {slept} ns"
        );
    };
    let mono0 = ask_probe(&mut conn, "time", "mono_ns");
    let wall = Instant::now();
    let b = move_to_b(&mut c, &dir, &api);
    std::thread::sleep(Duration::from_millis(500));
    check(&mut conn, mono0, wall, "after the restore");
    same_clock(&mut conn, &b, "after the restore");

    let mono1 = ask_probe(&mut conn, "time", "mono_ns");
    let wall = Instant::now();
    let back = dir.join("a2.sock");
    c.start_receiver("hostA", 7100, &back, &[], &dir.join("recv.log"))
        .expect("receiver on hostA");
    let report = c.migrate(&b, "hostA", 7100, &[]).expect("migration back");
    assert!(report.contains("\"ok\":true"), "{report}");
    check(&mut conn, mono1, wall, "after the migration");
    same_clock(&mut conn, &back, "after the migration");
}

fn resp(conn: &mut TcpStream, args: &[&str]) -> String {
    let mut req = format!("*{}\r\n", args.len());
    for a in args {
        req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
    }
    conn.write_all(req.as_bytes()).unwrap();
    let mut buf = [0u8; 512];
    let n = conn.read(&mut buf).unwrap();
    String::from_utf8_lossy(&buf[..n]).to_string()
}

#[test]
fn kv_data_and_connection_survive_a_move() {
    let Some((mut c, dir)) = cluster_with("kv_data_and_connection_survive_a_move", &["redis-cli"])
    else {
        return;
    };
    let api = start(&mut c, &dir, "kv", &[]);
    let mut conn = client_connect(&c, 6379);
    for i in 0..20 {
        assert_eq!(
            resp(
                &mut conn,
                &["SET", &format!("key{i}"), &format!("value{i}")]
            ),
            "+OK\r\n"
        );
    }
    assert_eq!(resp(&mut conn, &["INCR", "n"]), ":1\r\n");
    let b = move_to_b(&mut c, &dir, &api);
    // Same connection, same data.
    assert_eq!(resp(&mut conn, &["GET", "key7"]), "$6\r\nvalue7\r\n");
    assert_eq!(resp(&mut conn, &["INCR", "n"]), ":2\r\n");
    assert_eq!(resp(&mut conn, &["DBSIZE"]), ":21\r\n");
    // And through redis-cli on a new connection.
    let out = c
        .command("client", "redis-cli")
        .args(["-h", VIP, "get", "key19"])
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "value19");
    let status = ferry_ctl(&["status", "--json", "--api"], &b).unwrap();
    assert!(status.contains("\"state\":\"running\""), "{status}");
}

#[test]
fn a_stream_in_progress_is_verified_across_the_move() {
    let Some((mut c, dir)) = cluster("a_stream_in_progress_is_verified_across_the_move") else {
        return;
    };
    let api = start(&mut c, &dir, "stream", &["rate=400K"]);
    let before = c.client_tcp_counters().unwrap();
    let client = c
        .stream_client()
        .args(["--seconds", "6", "--upstream", "20000"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    cluster::assert_runs_native(&api, Duration::from_secs(1), 20_000, "before the snapshot");
    let b = move_to_b(&mut c, &dir, &api);
    // The restored guest runs natively too (PVM's control MSR came back).
    let emulated = cluster::assert_runs_native(&b, Duration::from_secs(1), 20_000, "restored");
    eprintln!("restored guest: {emulated} instructions emulated in 1 s under load");
    let out = client.wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains("\"error\":null"),
        "{text}"
    );
    let verified = json_u64(&text, "bytes_verified").unwrap();
    assert!(
        verified > 1_000_000,
        "only {verified} bytes verified: {text}"
    );
    let d = c.client_tcp_counters().unwrap().since(&before);
    assert_eq!(d.estab_resets, 0, "{d:?}");
    eprintln!("stream across a cold move: {text}; client counters {d:?}");
}

#[test]
fn snapshots_of_a_paused_vm_are_identical() {
    let Some((mut c, dir)) = cluster("snapshots_of_a_paused_vm_are_identical") else {
        return;
    };
    let api = start(&mut c, &dir, "kv", &[]);
    ferry_ctl(&["pause", "--api"], &api).unwrap();
    let (s1, s2) = (dir.join("one.snap"), dir.join("two.snap"));
    for s in [&s1, &s2] {
        let out = ferry_ctl(
            &[
                "snapshot",
                "--json",
                "--then",
                "pause",
                "--out",
                s.to_str().unwrap(),
                "--api",
            ],
            &api,
        )
        .unwrap();
        assert!(out.contains("\"ok\":true"), "{out}");
    }
    assert!(
        std::fs::read(&s1).unwrap() == std::fs::read(&s2).unwrap(),
        "two snapshots of one paused VM differ"
    );
    ferry_ctl(&["resume", "--api"], &api).unwrap();
    assert!(
        ferry_ctl(&["status", "--json", "--api"], &api)
            .unwrap()
            .contains("running")
    );
    let _ = std::fs::remove_file(&s2);
}

#[test]
fn bad_snapshot_files_are_refused_clearly() {
    if !kvm_or_skip("bad_snapshot_files_are_refused_clearly") {
        return;
    }
    let dir = cluster::log_dir("bad_snapshot_files");
    // A real snapshot to damage: hello, asleep, via its control socket.
    let api = dir.join("h.sock");
    let _ = std::fs::remove_file(&api);
    let mut vm = std::process::Command::new(ferry_tests::ferry_bin())
        .args(["run"])
        .arg(image("hello"))
        .arg("--api")
        .arg(&api)
        .args(["--", "sleep-ms=2000"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !api.exists() && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(10));
    }
    let good = dir.join("good.snap");
    let signed = dir.join("signed.snap");
    let key = dir.join("snap.key");
    let other_key = dir.join("other.key");
    for k in [&key, &other_key] {
        let _ = std::fs::remove_file(k);
        let st = std::process::Command::new(ferry_tests::ferry_bin())
            .args(["keygen", "--out"])
            .arg(k)
            .output()
            .unwrap();
        assert!(st.status.success(), "{st:?}");
    }
    let snap = |out: &Path, then: &str, key: Option<&Path>| {
        let mut args = vec![
            "snapshot",
            "--json",
            "--then",
            then,
            "--out",
            out.to_str().unwrap(),
        ];
        if let Some(k) = key {
            args.extend(["--key", k.to_str().unwrap()]);
        }
        args.push("--api");
        ferry_ctl(&args, &api).unwrap()
    };
    snap(&good, "pause", None);
    // A snapshot into a directory that does not exist fails and says so.
    let e = ferry_ctl(
        &[
            "snapshot",
            "--out",
            dir.join("no/such/dir.snap").to_str().unwrap(),
            "--api",
        ],
        &api,
    );
    assert!(
        e.unwrap_err()
            .to_string()
            .contains("cannot create a file in")
    );
    snap(&signed, "stop", Some(&key));
    vm.wait().unwrap();
    // One that fails (the VM is gone) leaves nothing behind either.
    assert!(
        ferry_ctl(
            &[
                "snapshot",
                "--out",
                dir.join("late.snap").to_str().unwrap(),
                "--api"
            ],
            &api
        )
        .is_err()
    );
    assert!(!dir.join("late.snap").exists());
    // Nothing but the two snapshots was left in the directory (no
    // half-written temporaries), and they are private.
    let leftovers: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&good).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let bytes = std::fs::read(&good).unwrap();
    let restore_with = |data: &[u8], name: &str, mode: u32, key: Option<&Path>| -> (i32, String) {
        let p = dir.join(name);
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut cmd = std::process::Command::new(ferry_tests::ferry_bin());
        cmd.arg("restore").arg(&p);
        if let Some(k) = key {
            cmd.arg("--key").arg(k);
        }
        let out = cmd.stdout(std::process::Stdio::null()).output().unwrap();
        (
            out.status.code().unwrap_or(-1),
            String::from_utf8_lossy(&out.stderr).to_string(),
        )
    };
    let restore = |data: &[u8], name: &str| restore_with(data, name, 0o600, None);
    // A state that sets an MSR this host's KVM does not list, or that
    // needs CPU features this host lacks: refused, by name.
    let forged = |edit: &dyn Fn(&mut ferry::snapshot::VmState)| -> Vec<u8> {
        let s = ferry::snapshot::Snapshot::open(&good, false).unwrap();
        let mut state = s.state.clone();
        edit(&mut state);
        let mem = &bytes[s.header.memory_offset as usize..];
        let p = dir.join("forged.tmp");
        let f = std::fs::File::create(&p).unwrap();
        ferry::snapshot::write(&f, &state, &[mem], None).unwrap();
        std::fs::read(&p).unwrap()
    };
    let msr = forged(&|st| st.vcpu.msrs.push((0xdead_0001, 0)));
    let (code, err) = restore(&msr, "unlisted-msr");
    assert_eq!(code, 125, "{err}");
    assert!(
        err.contains("MSR 0xdead0001, which this host's KVM does not list"),
        "{err}"
    );
    let cpu = forged(&|st| st.cpu.words = [u32::MAX; 7]);
    let (code, err) = restore(&cpu, "cpu-features");
    assert_eq!(code, 125, "{err}");
    assert!(err.contains("lacks"), "{err}");
    // Signed snapshots: checked with their key, and then from anyone.
    let sbytes = std::fs::read(&signed).unwrap();
    let mut s_flipped = sbytes.clone();
    let at = sbytes.len() - 4096 * 3 + 5;
    s_flipped[at] ^= 0x20;
    for (data, name, mode, k, want) in [
        (
            &bytes[..],
            "exposed",
            0o666,
            None,
            "group or others may write it",
        ),
        (
            &bytes[..],
            "unsigned-with-key",
            0o600,
            Some(&key),
            "not signed",
        ),
        (
            &sbytes[..],
            "other-key",
            0o600,
            Some(&other_key),
            "MAC does not verify",
        ),
        (
            &s_flipped[..],
            "signed-flipped",
            0o644,
            Some(&key),
            "MAC does not verify",
        ),
    ] {
        let (code, err) = restore_with(data, name, mode, k.map(|k| k.as_path()));
        assert_eq!(code, 125, "{name}: {err}");
        assert!(err.contains(want), "{name}: {err}");
    }
    // The signed one, writable by others, restores with its key (the
    // guest's memory is what the MAC covered) and runs to its end.
    let (code, err) = restore_with(&sbytes, "signed-ok", 0o666, Some(&key));
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("restored VM"), "{err}");
    let mut other_version = bytes.clone();
    other_version[8] = 9;
    let mut flipped_state = bytes.clone();
    flipped_state[200] ^= 1;
    let mut flipped_memory = bytes.clone();
    let at = bytes.len() - 4096 * 3 + 5;
    flipped_memory[at] ^= 0x20;
    for (data, name, want) in [
        (
            &b"definitely not a snapshot"[..],
            "garbage",
            "not a Ferry snapshot",
        ),
        (&bytes[..40], "truncated-header", "truncated"),
        (&bytes[..bytes.len() / 2], "truncated-memory", "truncated"),
        (&other_version[..], "version", "format version 9"),
        (&flipped_state[..], "flipped-state", "VM state is corrupted"),
        (
            &flipped_memory[..],
            "flipped-memory",
            "memory image is corrupted",
        ),
    ] {
        let (code, err) = restore(data, name);
        assert_eq!(code, 125, "{name}: {err}");
        assert!(
            err.contains(want) && err.starts_with("ferry: error:"),
            "{name}: {err}"
        );
    }
}

/// Snapshots taken while the guest makes hypercalls as fast as it can (a
/// console line each) lose none and repeat none. On hardware KVM an `out`
/// is finished (rip moved past it) only by the next KVM_RUN, so a state
/// saved between the two would make the restored VM do it again; the
/// vCPU loop completes it first. (PVM's KVM does port output in its
/// emulator and moves rip before it exits, so here this checks the rest:
/// the console's output and state across the cycles.) Ten
/// snapshot-and-restore cycles of `hello lines=...`; the lines the eleven
/// processes printed, put end to end, count up from 0 with none missing
/// and none twice.
#[test]
fn a_snapshot_never_repeats_the_guests_last_hypercall() {
    const TEST: &str = "a_snapshot_never_repeats_the_guests_last_hypercall";
    if !kvm_or_skip(TEST) {
        return;
    }
    let dir = cluster::log_dir(TEST);
    let (api, snap) = (dir.join("vm.sock"), dir.join("vm.snap"));
    let _ = std::fs::remove_file(&api);
    let out = |k: usize| dir.join(format!("out{k}.txt"));
    let spawn = |k: usize, args: &[&str]| {
        std::process::Command::new(ferry_tests::ferry_bin())
            .args(args)
            .stdout(std::fs::File::create(out(k)).unwrap())
            .stderr(std::fs::File::create(dir.join(format!("err{k}.txt"))).unwrap())
            .spawn()
            .unwrap()
    };
    // Waits until process k has printed a few lines past its first.
    let printing = |k: usize| {
        let t = Instant::now();
        loop {
            let text = std::fs::read_to_string(out(k)).unwrap_or_default();
            if text.matches("hello: line ").count() >= 50 {
                return;
            }
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "process {k} printed no lines: {text}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    let api_s = api.to_str().unwrap().to_string();
    let snap_s = snap.to_str().unwrap().to_string();
    let mut vm = spawn(
        0,
        &[
            "run",
            image("hello").to_str().unwrap(),
            "--api",
            &api_s,
            "--",
            "lines=100000000",
        ],
    );
    const CYCLES: usize = 10;
    for k in 1..=CYCLES {
        printing(k - 1);
        ferry_ctl(
            &["snapshot", "--out", &snap_s, "--then", "stop", "--api"],
            &api,
        )
        .unwrap();
        assert!(vm.wait().unwrap().success(), "process {} failed", k - 1);
        vm = spawn(k, &["restore", &snap_s, "--api", &api_s]);
    }
    printing(CYCLES);
    ferry_ctl(&["stop", "--api"], &api).unwrap();
    let _ = vm.wait();
    let mut next = 0u64;
    for k in 0..=CYCLES {
        let text = std::fs::read_to_string(out(k)).unwrap();
        for line in text.lines().filter(|l| l.starts_with("hello: line ")) {
            let i: u64 = line["hello: line ".len()..].parse().unwrap();
            assert_eq!(
                i,
                next,
                "process {k} printed line {i} where {next} was due (see {})",
                out(k).display()
            );
            next += 1;
        }
    }
    assert!(next > 50 * (CYCLES as u64 + 1), "only {next} lines");
    let _ = std::fs::remove_file(&snap);
}
