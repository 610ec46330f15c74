//! `ferry`: run Ferry unikernel images on KVM, and move them between hosts.
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry::api::{self, Api, MigrateRequest, Request};
use ferry::control::{After, Mailbox};
use ferry::devices::console::Console;
use ferry::migration::key::{self, Credentials, Psk};
use ferry::migration::receiver::{self, Receiver, Settings};
use ferry::migration::wire::VmId;
use ferry::net::NetSettings;
use ferry::vm::{Vm, VmConfig};
use serde_json::Value;

/// Exit status for Ferry's own failures (bad options, bad image, guest
/// misbehaviour, KVM errors), as `docker run` uses it.
const FERRY_ERROR: u8 = 125;

#[derive(Parser, Debug)]
#[command(
    name = "ferry",
    version,
    about = "Run unikernel network services on KVM and move them between hosts",
    after_help = "Exit status: `ferry run` exits with the guest's status (low 8 bits). Ferry's own errors \
                  (bad options or image, guest misbehaviour, KVM failures) print one line starting with \
                  `ferry: error:` and exit with 125."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// The credentials of a migration: a key file, or --insecure.
#[derive(clap::Args, Debug)]
#[group(required = true, multiple = false)]
struct CredArgs {
    /// The pre-shared key file (64 hex digits, mode 0600; `ferry keygen`
    /// makes one). Both hosts must hold the same key.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,
    /// No key: the channel is neither authenticated nor encrypted (for
    /// measuring what the crypto costs). Both sides must say so.
    #[arg(long)]
    insecure: bool,
}

impl CredArgs {
    fn credentials(&self, what: &str) -> anyhow::Result<Credentials> {
        match (&self.key, self.insecure) {
            (Some(k), false) => Ok(Credentials::Key(Psk::from_file(k)?)),
            (None, true) => {
                eprintln!(
                    "ferry: WARNING: --insecure: {what} is neither authenticated nor encrypted; \
                     anyone on the network can read guest memory from it, alter it, or push a VM"
                );
                Ok(Credentials::Insecure)
            }
            _ => anyhow::bail!("give --key FILE or --insecure"),
        }
    }
}

/// Least privilege for a VM process (see docs/hardening.md).
#[derive(clap::Args, Debug, Clone)]
struct Hardening {
    /// Seccomp filters, one per thread, by what it does: a system call
    /// outside them ends the VMM with a line naming it. `off` is for
    /// debugging only.
    #[arg(long, value_enum, default_value = "on")]
    seccomp: OnOff,
    /// Once set up, confine the VMM: chroot into DIR (root's, writable by
    /// nobody else) and run as --uid/--gid with no capabilities. The VM's
    /// files all come in as descriptors, so DIR may be empty.
    #[arg(long, value_name = "DIR", requires_all = ["uid", "gid"])]
    jail: Option<PathBuf>,
    /// The user a jailed VMM runs as (not 0).
    #[arg(long, requires = "jail")]
    uid: Option<u32>,
    /// The group a jailed VMM runs as (not 0).
    #[arg(long, requires = "jail")]
    gid: Option<u32>,
    /// Members of this group (name or number) may use the control socket
    /// too: it is made mode 0660 and owned by the group.
    #[arg(long, value_name = "GROUP")]
    api_group: Option<String>,
}

/// On or off.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum OnOff {
    /// On.
    On,
    /// Off.
    Off,
}

impl Hardening {
    fn policy(&self) -> ferry::lockdown::Policy {
        ferry::lockdown::Policy {
            seccomp: self.seccomp == OnOff::On,
            jail: self.jail.clone().map(|dir| ferry::lockdown::Jail {
                dir,
                uid: self.uid.unwrap_or(0),
                gid: self.gid.unwrap_or(0),
            }),
        }
    }

    /// Applies the policy's first half (handlers, checks): first thing.
    fn configure(&self) -> anyhow::Result<()> {
        ferry::lockdown::configure(self.policy())?;
        Ok(())
    }

    /// The group id of --api-group.
    fn api_gid(&self) -> anyhow::Result<Option<u32>> {
        let Some(g) = &self.api_group else {
            return Ok(None);
        };
        if let Ok(n) = g.parse::<u32>() {
            return Ok(Some(n));
        }
        let name = std::ffi::CString::new(g.as_str()).context("--api-group")?;
        // SAFETY: getgrnam reads the group database; the result is used at
        // once, on this thread, before anything else calls it.
        let gr = unsafe { libc::getgrnam(name.as_ptr()) };
        if gr.is_null() {
            anyhow::bail!("--api-group {g}: no such group");
        }
        // SAFETY: non-null, so it points at a valid group entry.
        Ok(Some(unsafe { (*gr).gr_gid }))
    }

    /// The arguments that hand this policy to a `ferry __session`.
    fn as_args(&self) -> Vec<String> {
        let mut a = vec![
            "--seccomp".into(),
            match self.seccomp {
                OnOff::On => "on".into(),
                OnOff::Off => "off".into(),
            },
        ];
        if let (Some(d), Some(u), Some(g)) = (&self.jail, self.uid, self.gid) {
            a.extend([
                "--jail".into(),
                d.display().to_string(),
                "--uid".into(),
                u.to_string(),
                "--gid".into(),
                g.to_string(),
            ]);
        }
        if let Some(g) = &self.api_group {
            a.extend(["--api-group".into(), g.clone()]);
        }
        a
    }
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot an image and run it until the guest exits.
    ///
    /// The guest's console goes to standard output; the guest's exit status
    /// becomes ferry's.
    Run {
        /// The unikernel image (an ELF built with ferry-runtime, e.g. images/out/hello).
        image: PathBuf,
        /// Guest memory: a size like 64M or 1G (4 MiB to 32 GiB, a multiple of 4 KiB).
        #[arg(long, short = 'm', default_value = "64M", value_parser = parse_size)]
        memory: u64,
        /// Number of vCPUs (only 1 is supported for now).
        #[arg(long, default_value_t = 1)]
        cpus: u32,
        #[command(flatten)]
        net: NetArgs,
        /// Answer control requests (status, pause, resume, snapshot,
        /// migrate, stop) on this Unix socket (mode 0600); see `ferry status --help`.
        #[arg(long)]
        api: Option<PathBuf>,
        /// A setting for the guest runtime, KEY=VALUE (repeatable):
        /// `net.stats=1` prints event-loop counters every 2 s, `net.tso=0`
        /// turns TCP segmentation offload off.
        #[arg(long = "guest-arg", value_name = "KEY=VALUE")]
        guest_args: Vec<String>,
        /// The VM's identity, 32 hex digits (default: a new random one).
        /// Only for a VM that runs nowhere else: a fleet's agent gives the
        /// one its record names.
        #[arg(long, value_name = "VM-ID")]
        id: Option<VmId>,
        /// The generation it boots at (with --id: its record's).
        #[arg(long, requires = "id", default_value_t = 0)]
        generation: u64,
        #[command(flatten)]
        hardening: Hardening,
        /// Arguments for the application, after `--` (e.g. `-- exit=3`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Resume a VM from a snapshot file and run it until the guest exits.
    ///
    /// Guest time goes on from the snapshot by the real time that passed.
    /// With a network card, the card's tap is opened first and frames for
    /// the VM are captured while it is being restored, then delivered in
    /// order (each distinct frame once); the VM then announces its MAC. The
    /// restored VM keeps its identity, at the next generation.
    Restore {
        /// The snapshot file (from `ferry snapshot`).
        file: PathBuf,
        /// The tap for the VM's network card on this host (in this network namespace).
        #[arg(long)]
        tap: Option<String>,
        /// Answer control requests on this Unix socket.
        #[arg(long)]
        api: Option<PathBuf>,
        /// Do not check the memory image's digest (the header and the VM
        /// state are always checked): restore time then does not grow with
        /// memory size. For files you trust, e.g. written here a moment ago.
        #[arg(long, conflicts_with = "key")]
        no_verify_memory: bool,
        /// Check the snapshot's signature with this key (the one it was
        /// written with: `ferry snapshot --key`). A signed snapshot may come
        /// from anywhere; an unsigned one must be yours and not writable by
        /// others.
        #[arg(long)]
        key: Option<PathBuf>,
        #[command(flatten)]
        hardening: Hardening,
    },
    /// Show a running VM's state: running, paused or being moved (and
    /// where), its identity and generation, uptime, network and counters.
    Status {
        /// The VM's control socket (its `--api`).
        #[arg(long)]
        api: PathBuf,
        /// Print the status as one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Pause a running VM: the vCPU and its devices stop, and so does guest time.
    Pause {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resume a paused VM; guest time goes on by the real time that passed.
    Resume {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Write a snapshot of a running or paused VM.
    ///
    /// The VM is paused while its state and memory are written (zero pages
    /// are holes in the file), then resumed, left paused, or stopped. The
    /// file is written under a temporary name (mode 0600) and renamed into
    /// place only when complete: a failed snapshot leaves no file, and an
    /// existing one is replaced only by a whole one.
    Snapshot {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
        /// The snapshot file to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
        /// Sign the snapshot with this key (a `ferry keygen` file), so that
        /// `ferry restore --key` can tell it was not changed.
        #[arg(long)]
        key: Option<PathBuf>,
        /// What the VM does afterwards.
        #[arg(long, value_enum, default_value = "resume")]
        then: Then,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Live-migrate a running VM to another host's `ferry receive`.
    ///
    /// Memory is copied while the VM runs (pre-copy with dirty logging),
    /// until what is left fits the downtime budget; then the destination
    /// starts capturing the VM's frames, the VM pauses, the last pages and
    /// its state go over, and on commit it runs there. The channel is
    /// authenticated with the pre-shared key and every message is
    /// encrypted. Any failure before commit leaves the VM running here; if
    /// the commit's answer is lost, the VM stays paused here until the
    /// destination says where it runs (see `ferry resolve`).
    Migrate {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
        /// The destination's listening address, e.g. 10.77.2.2:7000 (reached from this network namespace).
        #[arg(long)]
        to: String,
        #[command(flatten)]
        creds: CredArgs,
        /// Downtime budget in milliseconds: pre-copy goes on until the
        /// remaining dirty memory can be sent in this time (at the rate
        /// pre-copy measured).
        #[arg(long, default_value_t = 1)]
        downtime_ms: u64,
        /// How far past the budget the pause may run before the migration
        /// gives up and the VM resumes here, in milliseconds.
        #[arg(long, default_value_t = api::DEFAULT_MARGIN_MS)]
        margin_ms: u64,
        /// Print the report as JSON only (and no progress).
        #[arg(long)]
        json: bool,
    },
    /// Receive migrating VMs on this host and run each in a process of its own.
    ///
    /// Listens until stopped; each arriving VM runs in its own process, in
    /// a session of its own (no terminal owns it), and goes on when the
    /// receiver ends. Admission refuses (and says why) a VM larger than
    /// --max-memory, another than --expect, or one that runs here already.
    Receive {
        /// Address to listen on, e.g. 10.77.2.2:7000.
        #[arg(long)]
        listen: String,
        #[command(flatten)]
        creds: CredArgs,
        /// The tap for arriving VMs' network cards on this host.
        #[arg(long, conflicts_with = "bridge")]
        tap: Option<String>,
        /// Give each arriving VM a tap of its own (`fv` and its id's first
        /// ten hex digits), made on this bridge: a host that runs many VMs.
        #[arg(long)]
        bridge: Option<String>,
        /// The control socket of an arriving VM (bound before it is ready).
        #[arg(long, conflicts_with = "api_dir")]
        api: Option<PathBuf>,
        /// Give each arriving VM a control socket ID.sock in this directory.
        #[arg(long)]
        api_dir: Option<PathBuf>,
        /// This host's name in messages to sources (default: the listen address).
        #[arg(long)]
        name: Option<String>,
        /// Admit VMs of at most this much memory, e.g. 8G (default: what this
        /// host has available, or its cgroup allows, less 256 MiB).
        #[arg(long, value_parser = parse_size)]
        max_memory: Option<u64>,
        /// Admit only the VM with this identity (32 hex digits, from `ferry status`).
        #[arg(long, value_name = "VM-ID")]
        expect: Option<VmId>,
        /// Take one VM and end with it (with its exit status); Ctrl-C stops it.
        #[arg(long)]
        once: bool,
        /// Do not capture frames while the VM moves (for measurements of
        /// what capture saves).
        #[arg(long)]
        no_capture: bool,
        /// A fleet host's receiver (`ferry agent` starts it so): admit only
        /// VMs whose record in this etcd cluster (IP:PORT of its members,
        /// comma-separated) moves them to --name, claiming the new
        /// generation in the record as each is admitted (then `running`
        /// here once it runs, or back to its source if it never does).
        #[arg(long, value_delimiter = ',', requires = "name")]
        fleet_etcd: Vec<String>,
        /// Arriving VMs run with these (each in its own process).
        #[command(flatten)]
        hardening: Hardening,
    },
    /// Settle a migration whose end is in doubt (Commit sent, no answer).
    ///
    /// Asks the destination what became of the move and acts on it: the
    /// VM ends here if it runs there, resumes here if the destination
    /// aborted. With --resume-here, resumes this copy also when the VM died
    /// there, and (with --destination-down) when the destination cannot
    /// answer; never when it runs there.
    Resolve {
        /// The control socket of the VM whose move is in doubt.
        #[arg(long)]
        api: PathBuf,
        /// Resume the VM here if that cannot make a second copy.
        #[arg(long)]
        resume_here: bool,
        /// The destination host is down (you checked): lets --resume-here
        /// act when it cannot be asked.
        #[arg(long, requires = "resume_here")]
        destination_down: bool,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Make a new pre-shared key for migrations (mode 0600; never overwrites).
    Keygen {
        /// Where to write it; copy it to every host that migrates with this one.
        #[arg(long)]
        out: PathBuf,
    },
    /// Stop a VM (its process exits; nothing is saved).
    Stop {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
        /// Print the answer as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A host's agent: registers the host in the fleet's etcd, receives
    /// migrations, and starts and moves the VMs the records give it.
    ///
    /// VMs run in processes of their own, each with a tap on --bridge and a
    /// control socket in DIR/vms; they outlive the agent, and an agent
    /// started again finds them.
    Agent {
        /// This host's name in the fleet.
        #[arg(long)]
        name: String,
        /// The etcd cluster: IP:PORT of its members, comma-separated.
        #[arg(long, env = "FERRY_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// Where this host receives migrations (IP:PORT other hosts reach).
        #[arg(long)]
        listen: String,
        /// The fleet's migration key (`ferry keygen`; every host holds it).
        #[arg(long, value_name = "FILE")]
        key: PathBuf,
        /// The bridge the VMs' taps go on (their service network).
        #[arg(long)]
        bridge: String,
        /// The agent's directory (control sockets, logs).
        #[arg(long, value_name = "DIR")]
        dir: Option<PathBuf>,
        /// Memory this host gives VMs, e.g. 8G (default: what it has
        /// available now, less a margin).
        #[arg(long, value_parser = parse_size)]
        memory: Option<u64>,
        /// Cores this host gives VMs (default: its CPUs).
        #[arg(long)]
        cores: Option<f64>,
        /// The host's lease, in seconds: it is taken for dead this long
        /// after its agent stops renewing it.
        #[arg(long, default_value_t = 3)]
        ttl_s: u64,
    },
    /// The fleet: hosts and VMs as recorded in etcd.
    Fleet {
        /// The etcd cluster: IP:PORT of its members, comma-separated.
        #[arg(long, env = "FERRY_ETCD", value_delimiter = ',', required = true)]
        etcd: Vec<String>,
        /// Give up on etcd after this long, per call (an election after
        /// etcd's leader is lost takes a second or more).
        #[arg(long, default_value = "10000")]
        timeout_ms: u64,
        #[command(subcommand)]
        action: FleetAction,
    },
    /// (internal) the process of a VM arriving by migration.
    #[command(name = "__session", hide = true)]
    Session {
        #[command(flatten)]
        hardening: Hardening,
    },
}

/// What `ferry fleet` does.
#[derive(Subcommand, Debug)]
enum FleetAction {
    /// Hosts (alive, schedulable, memory, load) and VMs (owner, generation, state).
    Ls {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Take no new VMs on HOST (its VMs stay; `drain` moves them).
    Cordon {
        /// The host's name.
        host: String,
    },
    /// Let HOST take new VMs again.
    Uncordon {
        /// The host's name.
        host: String,
    },
    /// Start a VM in the fleet: on --host, or on the live, schedulable
    /// host with the most memory free; waits until its agent starts it.
    Run {
        /// The image (a path that every host has).
        image: PathBuf,
        /// A name for it (unique in the fleet).
        #[arg(long)]
        name: String,
        /// Guest memory, e.g. 64M.
        #[arg(long, short = 'm', default_value = "64M", value_parser = parse_size)]
        memory: u64,
        /// Its MAC (unique in the fleet); with --ip, it gets a network card.
        #[arg(long, requires = "ip")]
        mac: Option<ferry::net::Mac>,
        /// Its IPv4 address with prefix, the service address it keeps wherever it runs.
        #[arg(long, requires = "mac")]
        ip: Option<ferry::net::Ipv4Cidr>,
        /// Its default gateway.
        #[arg(long, requires = "ip")]
        gateway: Option<std::net::Ipv4Addr>,
        /// The host to start it on.
        #[arg(long)]
        host: Option<String>,
        /// Say where it would go and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the VM's record as JSON.
        #[arg(long)]
        json: bool,
        /// Arguments for the application, after `--`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Move every VM off HOST, live, a bounded number at a time (HOST is
    /// cordoned first); it ends empty and unschedulable.
    Drain {
        /// The host to empty.
        host: String,
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Spread the load: moves from the most loaded hosts to the least.
    Balance {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Pack the VMs onto the fewest hosts; reports the hosts freed.
    Consolidate {
        #[command(flatten)]
        plan: PlanArgs,
    },
    /// Say that HOST is down (its lease expired and you checked that its
    /// VMs are dead): each VM it owned starts elsewhere from its image, at
    /// the next generation. If HOST comes back, its agent stops them there.
    ConfirmDown {
        /// The host that is down.
        host: String,
        /// Print the VMs' new records as JSON.
        #[arg(long)]
        json: bool,
    },
    /// A live view: hosts, VMs, moves in flight and the last moves' pauses,
    /// refreshed every second (Ctrl-C ends it).
    Top {
        /// Refresh every this many milliseconds.
        #[arg(long, default_value_t = 1000)]
        every_ms: u64,
        /// Print one view and end (for scripts and tests).
        #[arg(long)]
        once: bool,
    },
    /// Move a VM (its id or name) to HOST, live; waits until it runs there.
    Move {
        /// The VM: its id or its name.
        vm: String,
        /// The host it goes to.
        host: String,
        /// Give up waiting after this many seconds (the move may still end).
        #[arg(long, default_value_t = 120)]
        wait_s: u64,
        /// Check that the move may happen and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print the VM's record as JSON.
        #[arg(long)]
        json: bool,
    },
}

/// How `ferry fleet drain|balance|consolidate` run.
#[derive(clap::Args, Debug)]
struct PlanArgs {
    /// Print the plan (moves in waves) and change nothing.
    #[arg(long)]
    dry_run: bool,
    /// Moves one host takes part in at once.
    #[arg(long, default_value_t = 2)]
    per_host: usize,
    /// Give up waiting for one wave after this many seconds.
    #[arg(long, default_value_t = 120)]
    wait_s: u64,
    /// Print the plan and the outcome as JSON.
    #[arg(long)]
    json: bool,
}

/// Plans `action` on the fleet and carries it out (or only prints it).
fn fleet_plan(
    store: &ferry::fleet::store::Store,
    action: ferry::fleet::ops::Action,
    a: PlanArgs,
) -> anyhow::Result<i32> {
    use ferry::fleet::ops::{self, Action};
    if a.per_host == 0 {
        anyhow::bail!("--per-host must be at least 1");
    }
    if let (Action::Drain(h), false) = (&action, a.dry_run) {
        store.cordon(h, true)?;
        eprintln!("ferry: fleet: {h} cordoned (no new VMs)");
    }
    let policy = ferry::fleet::Policy {
        per_host: a.per_host,
        ..Default::default()
    };
    let view = store.view()?;
    let plan = ops::plan(&view, &action, &policy)?;
    let moves: usize = plan.waves.iter().map(Vec::len).sum();
    if !a.json {
        println!(
            "plan: {moves} moves in {} waves (at most {} per host at once){}",
            plan.waves.len(),
            a.per_host,
            if plan.emptied.is_empty() {
                String::new()
            } else {
                format!("; empties {}", plan.emptied.join(", "))
            }
        );
        for (i, w) in plan.waves.iter().enumerate() {
            for m in w {
                println!(
                    "  wave {}: {} ({}) {} -> {}",
                    i + 1,
                    m.name,
                    &m.id[..8.min(m.id.len())],
                    m.from,
                    m.to
                );
            }
        }
    }
    if a.dry_run {
        if a.json {
            print_json(&serde_json::json!({"dry_run": true, "plan": plan}));
        }
        return Ok(0);
    }
    let t = std::time::Instant::now();
    let json = a.json;
    let outcomes = ops::execute(
        store,
        &plan,
        std::time::Duration::from_secs(a.wait_s),
        &mut |o| {
            if !json {
                match &o.error {
                    None => println!(
                        "  [{:5.1} s] {} runs on {} (generation {})",
                        t.elapsed().as_secs_f64(),
                        o.planned.name,
                        o.runs_on,
                        o.generation
                    ),
                    Some(e) => println!(
                        "  [{:5.1} s] {} did not move: {e}",
                        t.elapsed().as_secs_f64(),
                        o.planned.name
                    ),
                }
            }
        },
    )?;
    let failed = outcomes.iter().filter(|o| o.error.is_some()).count();
    let after = store.view()?;
    let empty: Vec<String> = plan
        .emptied
        .iter()
        .filter(|h| !after.vms.iter().any(|v| &v.owner == *h))
        .cloned()
        .collect();
    if a.json {
        print_json(&serde_json::json!({
            "plan": plan,
            "outcomes": outcomes,
            "moved": outcomes.len() - failed,
            "failed": failed,
            "emptied": empty,
            "seconds": t.elapsed().as_secs_f64(),
        }));
    } else {
        println!(
            "{} moved, {failed} failed in {:.1} s{}",
            outcomes.len() - failed,
            t.elapsed().as_secs_f64(),
            if empty.is_empty() {
                String::new()
            } else {
                format!("; empty now: {}", empty.join(", "))
            }
        );
    }
    Ok(if failed == 0 { 0 } else { 1 })
}

/// What a VM does after its snapshot.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Then {
    /// Run on.
    Resume,
    /// Stay paused.
    Pause,
    /// Stop: the snapshot is now the VM (cold migration).
    Stop,
}

/// The network card (all optional; `--tap` adds the card).
#[derive(clap::Args, Debug)]
struct NetArgs {
    /// Give the guest a virtio-net card backed by this tap (created if missing;
    /// it must not be open in another process). Needs --mac and --ip.
    #[arg(long, requires_all = ["mac", "ip"])]
    tap: Option<String>,
    /// The card's MAC address, e.g. 02:bf:0a:4d:00:0a (unicast).
    #[arg(long, requires = "tap")]
    mac: Option<ferry::net::Mac>,
    /// The guest's IPv4 address with prefix length, e.g. 10.77.0.10/24.
    #[arg(long, requires = "tap")]
    ip: Option<ferry::net::Ipv4Cidr>,
    /// The guest's default gateway, inside its subnet, e.g. 10.77.0.1.
    #[arg(long, requires = "tap")]
    gateway: Option<std::net::Ipv4Addr>,
}

impl NetArgs {
    fn settings(self) -> anyhow::Result<Option<NetSettings>> {
        let (Some(tap), Some(mac), Some(ip)) = (self.tap, self.mac, self.ip) else {
            return Ok(None);
        };
        let s = NetSettings {
            tap,
            mac,
            ip,
            gateway: self.gateway,
        };
        s.validate().map_err(anyhow::Error::msg)?;
        Ok(Some(s))
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    ferry::size::parse(s)
}

/// The error and its causes on one line, leaving out a cause whose text
/// the message already carries (many errors here name their source).
fn one_line(e: &anyhow::Error) -> String {
    let mut msg = String::new();
    for cause in e.chain() {
        let c = cause.to_string();
        if msg.contains(&c) {
            continue;
        }
        if !msg.is_empty() {
            msg.push_str(": ");
        }
        msg.push_str(&c);
    }
    msg
}

fn main() -> ExitCode {
    ferry::trace::start();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) if !e.use_stderr() => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(FERRY_ERROR);
        }
    };
    match run(cli) {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&e));
            ExitCode::from(FERRY_ERROR)
        }
    }
}

/// Sends `req` and fails with the VM's error if it refused.
fn ask(api: &Path, req: &Request) -> anyhow::Result<Value> {
    let answer = api::call(api, req).map_err(anyhow::Error::msg)?;
    if answer["ok"] != true {
        anyhow::bail!("{}", answer["error"].as_str().unwrap_or("the VM refused"));
    }
    Ok(answer)
}

/// Has the VM write a snapshot into a new private file next to `out`,
/// then makes it durable and renames it into place. Nothing is left
/// behind on failure, and an existing `out` is only ever replaced whole.
fn write_snapshot(api: &Path, out: &Path, then: After, key: Option<&Psk>) -> anyhow::Result<Value> {
    use std::os::unix::fs::OpenOptionsExt;
    let dir = out.parent().context("the snapshot path has no directory")?;
    let name = out
        .file_name()
        .context("the snapshot path has no file name")?
        .to_string_lossy();
    if out.is_dir() {
        anyhow::bail!("{} is a directory", out.display());
    }
    let tag: [u8; 6] = ferry::id::random_bytes();
    let tmp = dir.join(format!(
        ".{name}.{}.partial",
        tag.iter().map(|b| format!("{b:02x}")).collect::<String>()
    ));
    let file = std::fs::OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)
        .with_context(|| format!("cannot create a file in {}", dir.display()))?;
    let result = (|| {
        let answer = api::call_with_file(
            api,
            &Request::Snapshot {
                then,
                key: key.map(Psk::to_hex),
            },
            &file,
        )
        .map_err(anyhow::Error::msg)?;
        if answer["ok"] != true {
            anyhow::bail!("{}", answer["error"].as_str().unwrap_or("the VM refused"));
        }
        file.sync_all()
            .with_context(|| format!("cannot flush {}", tmp.display()))?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("cannot move the snapshot to {}", out.display()))?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(answer)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The destination as an IP address and port: names are resolved here, in
/// the CLI, because the VMM's filters (and a jail) leave it no resolver.
fn resolve_destination(to: &str) -> anyhow::Result<String> {
    use std::net::ToSocketAddrs;
    if let Ok(a) = to.parse::<std::net::SocketAddr>() {
        return Ok(a.to_string());
    }
    let mut addrs = to
        .to_socket_addrs()
        .with_context(|| format!("--to {to}: cannot resolve it (give HOST:PORT or IP:PORT)"))?;
    let a = addrs
        .next()
        .with_context(|| format!("--to {to}: the name has no address"))?;
    Ok(a.to_string())
}

fn print_json(v: &Value) {
    println!("{v}");
}

/// `ferry status` in words.
fn print_status(v: &Value) {
    let s = |k: &str| v[k].as_str().unwrap_or("?").to_string();
    let n = |k: &str| v[k].as_u64().unwrap_or(0);
    println!("state:      {}", s("detail"));
    println!(
        "VM:         {} generation {} (pid {})",
        s("id"),
        n("generation"),
        n("pid")
    );
    println!(
        "image:      {} ({}), {} MiB of memory",
        s("image"),
        if s("kernel") == "hermit" {
            "RustyHermit"
        } else {
            "Ferry runtime"
        },
        n("memory") >> 20
    );
    println!(
        "uptime:     {:.1} s here; guest time {:.3} s",
        v["uptime_s"].as_f64().unwrap_or(0.0),
        n("guest_time_ns") as f64 / 1e9
    );
    println!(
        "vCPU:       {} ({} exits, {} emulated instructions, {} halts, {} interrupts injected)",
        s("cpu_mode"),
        v["kvm"]["exits"],
        v["kvm"]["insn_emulation"],
        v["kvm"]["halt_exits"],
        v["kvm"]["irq_injections"]
    );
    match v["net"].as_object() {
        Some(net) => {
            let g = |k: &str| net.get(k).cloned().unwrap_or(Value::Null);
            println!(
                "network:    {} {} on tap {}{}",
                g("ip").as_str().unwrap_or("?"),
                g("mac").as_str().unwrap_or("?"),
                g("tap").as_str().unwrap_or("?"),
                g("gateway")
                    .as_str()
                    .map(|gw| format!(", gateway {gw}"))
                    .unwrap_or_default()
            );
            println!(
                "            frames in {} / out {} ({} TSO super-frames), {} dropped, {} interrupts",
                g("rx_frames"),
                g("tx_frames"),
                g("tx_gso_frames"),
                g("dropped"),
                g("interrupts")
            );
            println!(
                "            captured on arrival {} ({} dropped as ones the source had read)",
                g("captured"),
                g("duplicates")
            );
            println!(
                "            refused from the guest {} (another source MAC or address, not IPv4/ARP, bad offload fields)",
                g("tx_refused")
            );
        }
        None => println!("network:    none"),
    }
    println!("confined:   {}", s("lockdown"));
    if n("console_lost_bytes") > 0 {
        println!(
            "console:    {} bytes of guest output lost (the output was closed)",
            n("console_lost_bytes")
        );
    }
    if n("console_dropped_bytes") > 0 {
        println!(
            "console:    {} bytes of guest output dropped (more than the console's rate)",
            n("console_dropped_bytes")
        );
    }
}

/// Runs a created or restored VM to its end: the guest's exit status, or 0
/// when a control request stopped it (or it moved away), or 128+signal.
fn drive(mut vm: Vm, api: Option<PathBuf>, api_gid: Option<u32>) -> anyhow::Result<i32> {
    let mailbox = Mailbox::new();
    let handle = match &api {
        Some(path) => Some(
            Api::bind(path, api_gid)
                .and_then(|a| {
                    a.serve(
                        mailbox.clone(),
                        ferry::migration::source::Source::new(mailbox.clone()),
                    )
                })
                .with_context(|| format!("cannot serve the control socket {}", path.display()))?,
        ),
        None => None,
    };
    // Everything is open: from here on, least privilege.
    ferry::lockdown::lock(
        ferry::lockdown::Role::Vcpu,
        handle.as_ref().map(|h| h.dir_fd()),
    )?;
    let end = vm.run(&mailbox);
    drop(handle);
    vm.end();
    match end {
        Err(e) if !matches!(e, ferry::vm::Error::Signalled(_)) => {
            Err(anyhow::Error::new(e).context("the VM stopped"))
        }
        end => Ok(ferry::migration::dest::exit_status(end)),
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    let simple = |api: &Path, req: Request, json: bool, done: &str| -> anyhow::Result<i32> {
        let v = ask(api, &req)?;
        if json {
            print_json(&v);
        } else {
            println!("{done}");
        }
        Ok(0)
    };
    match cli.command {
        Command::Status { api, json } => {
            let v = ask(&api, &Request::Status)?;
            if json {
                print_json(&v);
            } else {
                print_status(&v);
            }
            Ok(0)
        }
        Command::Pause { api, json } => simple(&api, Request::Pause, json, "paused"),
        Command::Resume { api, json } => simple(&api, Request::Resume, json, "running"),
        Command::Stop { api, json } => simple(&api, Request::Stop, json, "stopped"),
        Command::Snapshot {
            api,
            out,
            key,
            then,
            json,
        } => {
            let out = std::path::absolute(&out).context("the snapshot path")?;
            let key = match key {
                Some(k) => Some(Psk::from_file(&k)?),
                None => None,
            };
            let then = match then {
                Then::Resume => After::Resume,
                Then::Pause => After::Pause,
                Then::Stop => After::Stop,
            };
            let v = write_snapshot(&api, &out, then, key.as_ref())?;
            if json {
                print_json(&v);
            } else {
                println!(
                    "wrote {} ({:.1} MiB); the guest stood still {:.2} ms (writing {:.2} ms); it is now {}",
                    out.display(),
                    v["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                    v["paused_us"].as_u64().unwrap_or(0) as f64 / 1e3,
                    v["write_us"].as_u64().unwrap_or(0) as f64 / 1e3,
                    match then {
                        After::Resume => "running",
                        After::Pause => "paused",
                        After::Stop => "stopped",
                    }
                );
            }
            Ok(0)
        }
        Command::Fleet {
            etcd,
            timeout_ms,
            action,
        } => {
            use ferry::fleet::{show, store::Store};
            let store = Store::connect(&etcd, std::time::Duration::from_millis(timeout_ms))?;
            match action {
                FleetAction::Ls { json } => {
                    let v = store.view()?;
                    if json {
                        print_json(&show::to_json(&v));
                    } else {
                        print!("{}", show::to_text(&v));
                    }
                }
                FleetAction::Cordon { host } => {
                    store.cordon(&host, true)?;
                    println!("{host}: cordoned (no new VMs)");
                }
                FleetAction::Uncordon { host } => {
                    store.cordon(&host, false)?;
                    println!("{host}: schedulable");
                }
                FleetAction::Run {
                    image,
                    name,
                    memory,
                    mac,
                    ip,
                    gateway,
                    host,
                    dry_run,
                    json,
                    args,
                } => {
                    if dry_run {
                        let to = ferry::fleet::ops::place(&store.view()?, memory, host.as_deref())?;
                        println!("{name} ({} MiB) would start on {to}", memory >> 20);
                        return Ok(0);
                    }
                    let image = std::fs::canonicalize(&image)
                        .with_context(|| format!("the image {}", image.display()))?;
                    let new = ferry::fleet::ops::NewVm {
                        name,
                        image: image.display().to_string(),
                        memory,
                        args,
                        net: match (mac, ip) {
                            (Some(m), Some(i)) => Some(ferry::fleet::store::VmNet {
                                mac: m.to_string(),
                                ip: i.to_string(),
                                gateway: gateway.map(|g| g.to_string()),
                            }),
                            _ => None,
                        },
                        host,
                    };
                    let r =
                        ferry::fleet::ops::run(&store, &new, std::time::Duration::from_secs(30))?;
                    if json {
                        print_json(&serde_json::to_value(&r)?);
                    } else {
                        println!(
                            "VM {} ({}) runs on {} at generation {}",
                            r.id, r.name, r.owner, r.generation
                        );
                    }
                }
                FleetAction::ConfirmDown { host, json } => {
                    let moved = ferry::fleet::ops::confirm_down(&store, &host)?;
                    if json {
                        print_json(&serde_json::to_value(&moved)?);
                    } else {
                        for r in &moved {
                            println!(
                                "VM {} ({}) starts on {} at generation {} from its image",
                                r.id, r.name, r.owner, r.generation
                            );
                        }
                        println!(
                            "{host}: down, cordoned; {} VMs placed elsewhere",
                            moved.len()
                        );
                    }
                }
                FleetAction::Top { every_ms, once } => {
                    ferry::stop::install().context("cannot install signal handling")?;
                    loop {
                        let v = store.view()?;
                        let text = ferry::fleet::show::to_top(&v);
                        if once {
                            print!("{text}");
                            break;
                        }
                        // Clear the screen, home the cursor.
                        print!("\x1b[2J\x1b[H{text}");
                        let _ = std::io::Write::flush(&mut std::io::stdout());
                        std::thread::sleep(std::time::Duration::from_millis(every_ms.max(100)));
                        if ferry::stop::requested().is_some() {
                            break;
                        }
                    }
                }
                FleetAction::Drain { host, plan } => {
                    return fleet_plan(&store, ferry::fleet::ops::Action::Drain(host), plan);
                }
                FleetAction::Balance { plan } => {
                    return fleet_plan(&store, ferry::fleet::ops::Action::Balance, plan);
                }
                FleetAction::Consolidate { plan } => {
                    return fleet_plan(&store, ferry::fleet::ops::Action::Consolidate, plan);
                }
                FleetAction::Move {
                    vm,
                    host,
                    wait_s,
                    dry_run,
                    json,
                } => {
                    if dry_run {
                        let r = ferry::fleet::ops::check_move(&store.view()?, &vm, &host)?;
                        println!(
                            "{} ({}) would move live from {} to {host}, to generation {}",
                            r.name,
                            r.id,
                            r.owner,
                            r.generation + 1
                        );
                        return Ok(0);
                    }
                    eprintln!("ferry: fleet: moving {vm} to {host}");
                    let t = std::time::Instant::now();
                    let r = ferry::fleet::ops::move_to(
                        &store,
                        &vm,
                        &host,
                        std::time::Duration::from_secs(wait_s),
                    )?;
                    if json {
                        print_json(&serde_json::to_value(&r)?);
                    } else {
                        println!(
                            "VM {} ({}) runs on {} at generation {} ({:.1} s)",
                            r.id,
                            r.name,
                            r.owner,
                            r.generation,
                            t.elapsed().as_secs_f64()
                        );
                    }
                }
            }
            Ok(0)
        }
        Command::Agent {
            name,
            etcd,
            listen,
            key,
            bridge,
            dir,
            memory,
            cores,
            ttl_s,
        } => {
            ferry::stop::install().context("cannot install signal handling")?;
            // The key is checked now (mode, format), not at the first move.
            Psk::from_file(&key)?;
            let total = ferry::migration::receiver::available_memory();
            let cfg = ferry::fleet::agent::Config {
                dir: dir.unwrap_or_else(|| PathBuf::from(format!("/run/ferry/agent-{name}"))),
                name,
                etcd,
                listen,
                key,
                bridge,
                memory: memory.unwrap_or(total),
                cores: cores.unwrap_or_else(|| {
                    std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64)
                }),
                ttl: std::time::Duration::from_secs(ttl_s.clamp(1, 60)),
                tick: std::time::Duration::from_millis(300),
            };
            ferry::fleet::agent::Agent::start(cfg)?.run()?;
            Ok(0)
        }
        Command::Keygen { out } => {
            key::generate(&out)?;
            eprintln!(
                "ferry: wrote a new key to {} (mode 0600); copy it to the other hosts and pass it with --key",
                out.display()
            );
            Ok(0)
        }
        Command::Resolve {
            api,
            resume_here,
            destination_down,
            json,
        } => {
            let v = ask(
                &api,
                &Request::Resolve {
                    resume_here,
                    destination_down,
                },
            )?;
            if json {
                print_json(&v);
            } else {
                println!("{}", v["detail"].as_str().unwrap_or("settled"));
            }
            Ok(0)
        }
        Command::Migrate {
            api,
            to,
            creds,
            downtime_ms,
            margin_ms,
            json,
        } => {
            let creds = creds.credentials("the migration channel")?;
            let to = resolve_destination(&to)?;
            let req = Request::Migrate(MigrateRequest {
                to: to.clone(),
                key: match &creds {
                    Credentials::Key(k) => Some(k.to_hex()),
                    Credentials::Insecure => None,
                },
                insecure: creds == Credentials::Insecure,
                downtime_ms,
                margin_ms,
            });
            let cancel = Cancel::install().context("cannot install signal handling")?;
            let mut bar = Progress::new(json);
            let mut progress = |p: &Value| bar.show(p);
            let answer = api::call_cancellable(&api, &req, &mut progress, &mut |c| cancel.watch(c))
                .map_err(anyhow::Error::msg)?;
            bar.done();
            if answer["ok"] != true {
                let e = answer["error"].as_str().unwrap_or("the migration failed");
                if cancel.requested() {
                    eprintln!("ferry: migrate: cancelled; {e}");
                    return Ok(130);
                }
                anyhow::bail!("{e}");
            }
            if cancel.requested() {
                eprintln!("ferry: migrate: the cancel came too late: the VM had already moved");
            }
            if json {
                print_json(&answer);
            } else {
                println!(
                    "ferry: migrated to {} ({}) at generation {}: {} pre-copy rounds, {:.1} MiB sent{}, downtime {:.2} ms (VMM: pause to running there), total {:.1} ms",
                    to,
                    answer["destination"]["host"].as_str().unwrap_or("?"),
                    answer["destination"]["generation"],
                    answer["rounds"],
                    answer["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                    if answer["sealed"] == true {
                        ", encrypted"
                    } else {
                        " IN PLAIN TEXT"
                    },
                    answer["downtime_ms"].as_f64().unwrap_or(0.0),
                    answer["total_ms"].as_f64().unwrap_or(0.0),
                );
            }
            Ok(0)
        }
        Command::Receive {
            listen,
            creds,
            tap,
            bridge,
            api,
            api_dir,
            name,
            max_memory,
            expect,
            once,
            no_capture,
            fleet_etcd,
            hardening,
        } => {
            let creds = creds.credentials("the migration channel")?;
            let fleet = if fleet_etcd.is_empty() {
                None
            } else {
                Some(std::sync::Arc::new(
                    ferry::fleet::store::Store::connect(
                        &fleet_etcd,
                        std::time::Duration::from_secs(3),
                    )
                    .context("cannot reach the fleet's etcd (--fleet-etcd)")?,
                ))
            };
            // Checked here, applied by each arriving VM's process.
            if let Some(j) = &hardening.jail {
                ferry::lockdown::check_jail(&ferry::lockdown::Jail {
                    dir: j.clone(),
                    uid: hardening.uid.unwrap_or(0),
                    gid: hardening.gid.unwrap_or(0),
                })?;
            }
            hardening.api_gid()?;
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            let r = Receiver::new(Settings {
                name: name.unwrap_or_else(|| listen.clone()),
                listen,
                creds,
                tap: match bridge {
                    Some(b) => receiver::TapFor::PerVm { bridge: b },
                    None => receiver::TapFor::Fixed(tap),
                },
                api: match api_dir {
                    Some(d) => receiver::ApiFor::PerVm(d),
                    None => receiver::ApiFor::Fixed(api),
                },
                max_memory,
                expect,
                once,
                capture: !no_capture,
                session_args: hardening.as_args(),
                fleet,
            });
            receiver::install_signals(once, r.clone()).context("cannot install signal handling")?;
            Ok(r.serve(listener)?)
        }
        Command::Session { hardening } => {
            hardening.configure()?;
            let api_gid = hardening.api_gid()?;
            ferry::migration::dest::run_session(api_gid).map_err(anyhow::Error::new)
        }
        Command::Restore {
            file,
            tap,
            api,
            no_verify_memory,
            key,
            hardening,
        } => {
            hardening.configure()?;
            let api_gid = hardening.api_gid()?;
            let key = match key {
                Some(k) => Some(Psk::from_file(&k)?),
                None => None,
            };
            ferry::stop::install().context("cannot install signal handling")?;
            let console = Console::new(Box::new(std::io::stdout()));
            let vm = Vm::restore(
                &file,
                tap.as_deref(),
                console,
                !no_verify_memory,
                key.as_ref(),
            )
            .context("cannot restore the VM")?;
            drop(key);
            let id = vm.identity();
            eprintln!(
                "ferry: restored VM {} (generation {}) from {}{}{}",
                id.vm(),
                id.generation,
                file.display(),
                tap.as_deref()
                    .map(|t| format!(" on tap {t}"))
                    .unwrap_or_default(),
                api.as_deref()
                    .map(|a| format!("; control socket {}", a.display()))
                    .unwrap_or_default()
            );
            drive(vm, api, api_gid)
        }
        Command::Run {
            image,
            memory,
            cpus,
            net,
            api,
            guest_args,
            id,
            generation,
            hardening,
            args,
        } => {
            hardening.configure()?;
            let api_gid = hardening.api_gid()?;
            let config = VmConfig {
                image,
                memory,
                cpus,
                app_args: args,
                guest_args,
                net: net.settings()?,
                id,
                generation,
            };
            ferry::stop::install().context("cannot install signal handling")?;
            let console = Console::new(Box::new(std::io::stdout()));
            let vm = Vm::create(&config, console).context("cannot start the VM")?;
            drive(vm, api, api_gid)
        }
    }
}

/// Ctrl-C during `ferry migrate`: the first one asks the VM to cancel (the
/// request's connection is half-closed; a migration still copying stops,
/// and the VM runs on); a second one ends this command at once.
struct Cancel {
    conn: Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>>,
    asked: Arc<std::sync::atomic::AtomicBool>,
}

impl Cancel {
    fn install() -> std::io::Result<Cancel> {
        let conn: Arc<std::sync::Mutex<Option<std::os::unix::net::UnixStream>>> = Arc::default();
        let asked = Arc::new(std::sync::atomic::AtomicBool::new(false));
        // SAFETY: plain sigset manipulation on a local set; pthread_sigmask
        // changes only this thread's mask (and the threads it starts).
        let set = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            set
        };
        let (c, a) = (conn.clone(), asked.clone());
        std::thread::Builder::new()
            .name("ferry-cancel".into())
            .spawn(move || {
                loop {
                    let mut sig = 0;
                    // SAFETY: `set` is valid and `sig` a valid out pointer.
                    if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                        return;
                    }
                    if a.swap(true, std::sync::atomic::Ordering::SeqCst) {
                        eprintln!("\nferry: migrate: interrupted again; not waiting for the VM's answer");
                        std::process::exit(130);
                    }
                    eprintln!(
                        "\nferry: migrate: cancelling (a move still copying memory stops and the VM runs on here; Ctrl-C again to stop waiting)"
                    );
                    if let Some(s) = c.lock().expect("cancel").as_ref() {
                        let _ = s.shutdown(std::net::Shutdown::Write);
                    }
                }
            })?;
        Ok(Cancel { conn, asked })
    }

    fn watch(&self, c: std::os::unix::net::UnixStream) {
        *self.conn.lock().expect("cancel") = Some(c);
    }

    fn requested(&self) -> bool {
        self.asked.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Migration progress: a bar on a terminal, whole lines otherwise (logs),
/// nothing with `--json`.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    lines: bool,
    round: Option<u64>,
}

impl Progress {
    fn new(json: bool) -> Progress {
        use std::io::IsTerminal;
        let tty = !json && std::io::stderr().is_terminal();
        let bar = tty.then(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "ferry: migrate: {msg} [{bar:30}] {percent:>3}% ETA {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b
        });
        Progress {
            bar,
            lines: !json && !tty,
            round: None,
        }
    }

    fn show(&mut self, p: &Value) {
        match (&self.bar, p["phase"].as_str()) {
            (Some(b), Some("precopy")) => {
                let round = p["round"].as_u64();
                if round != self.round {
                    self.round = round;
                    b.reset_eta();
                }
                b.set_length(p["pages"].as_u64().unwrap_or(0));
                b.set_position(p["pages_done"].as_u64().unwrap_or(0));
                b.set_message(format!(
                    "round {}, {:.1} MiB sent, {:.0} MiB/s",
                    p["round"],
                    p["sent_bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                    p["rate_bytes_per_s"].as_f64().unwrap_or(0.0) / (1 << 20) as f64
                ));
            }
            (Some(b), _) => b.println(format!("ferry: migrate: {}", progress_line(p))),
            (None, _) if self.lines => eprintln!("ferry: migrate: {}", progress_line(p)),
            _ => {}
        }
    }

    fn done(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

/// One line of migration progress (plain: logs get whole lines).
fn progress_line(p: &Value) -> String {
    let mib = |v: &Value| v.as_u64().unwrap_or(0) as f64 / (1 << 20) as f64;
    match p["phase"].as_str().unwrap_or("") {
        "connected" => format!(
            "connected to {} ({})",
            p["destination"].as_str().unwrap_or("?"),
            if p["sealed"] == true {
                "authenticated, encrypted"
            } else {
                "INSECURE"
            }
        ),
        "precopy" => {
            let done = p["pages_done"].as_u64().unwrap_or(0);
            let of = p["pages"].as_u64().unwrap_or(0).max(1);
            format!(
                "round {:>2}: {:>5.1}% of {} pages looked at, {:.1} MiB sent, {:.0} MiB/s, ETA {:.1} s",
                p["round"],
                done as f64 * 100.0 / of as f64,
                of,
                mib(&p["sent_bytes"]),
                p["rate_bytes_per_s"].as_f64().unwrap_or(0.0) / (1 << 20) as f64,
                p["eta_s"].as_f64().unwrap_or(0.0)
            )
        }
        "in-doubt" => format!(
            "the commit's answer is missing ({}); asking the destination",
            p["why"].as_str().unwrap_or("?")
        ),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    /// Every subcommand says what it does, and every option and argument
    /// of every subcommand has a description of its own.
    #[test]
    fn every_subcommand_and_option_is_described() {
        let cli = Cli::command();
        cli.clone().debug_assert();
        for sub in cli.get_subcommands().filter(|s| !s.is_hide_set()) {
            let name = sub.get_name();
            assert!(
                sub.get_about().is_some_and(|a| a.to_string().len() > 10),
                "ferry {name} has no description"
            );
            for arg in sub.get_arguments().filter(|a| !a.is_hide_set()) {
                let help = arg
                    .get_long_help()
                    .or(arg.get_help())
                    .map(|h| h.to_string())
                    .unwrap_or_default();
                assert!(
                    help.split_whitespace().count() >= 3,
                    "ferry {name}: {} has no description",
                    arg.get_id()
                );
            }
        }
    }
}
