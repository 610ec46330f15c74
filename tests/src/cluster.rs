//! The single-IP-address cluster, built in network namespaces (iproute2
//! and nftables only), after `shared/reference/nlb-topology.sh`:
//!
//! ```text
//!  {p}-client --- {p}-router (br0: learning off, flooding) ---+--- {p}-hostA (brv: e0 + tap0)
//!  10.77.1.2      10.77.1.1 / 10.77.0.1                        +--- {p}-hostB (brv: e0 + tap0)
//!                                                             +--- {p}-hostC (fleets only)
//!  backplane (bp0 in {p}-router, no address there): hostA m0 10.77.2.1, hostB m0 10.77.2.2,
//!  hostC m0 10.77.2.3; migrations and etcd (a member per host of a fleet) use it
//! ```
//!
//! The router floods every frame for the service MAC to both hosts; each
//! host bridges its uplink (not learning) and a tap for the VM, which owns
//! the service IP [`VIP`] and MAC [`SERVICE_MAC`]. A host that does not run the VM drops
//! those frames: its kernel owns neither address, so it sends nothing
//! back. A separate link joins the hosts for migration traffic. Addresses
//! exist only inside these namespaces.
//!
//! [`Cluster`] tears everything down when dropped (processes first, by
//! PID), unless told to [`Cluster::keep`] it (for `just cluster-up`).

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

/// The service IP (the VM's).
pub const VIP: &str = "10.77.0.10";
/// The service IP with its prefix.
pub const VIP_CIDR: &str = "10.77.0.10/24";
/// The service MAC (the VM's).
pub const SERVICE_MAC: &str = "02:bf:0a:4d:00:0a";
/// The VM's gateway: the router.
pub const GATEWAY: &str = "10.77.0.1";
/// The client's address.
pub const CLIENT_IP: &str = "10.77.1.2";
/// The tap each host gives its VM.
pub const TAP: &str = "tap0";
/// The hosts of the two-host cluster.
pub const HOSTS: [&str; 2] = ["hostA", "hostB"];
/// The hosts of a fleet ([`Cluster::up_fleet`]): one more.
pub const FLEET_HOSTS: [&str; 3] = ["hostA", "hostB", "hostC"];
/// Each host's address on the backplane (migrations, etcd).
pub const MIGRATION_IPS: [&str; 3] = ["10.77.2.1", "10.77.2.2", "10.77.2.3"];
/// The port of each host's etcd member for clients (peers: one more).
pub const ETCD_PORT: u16 = 2379;

/// Every namespace a cluster may have, for clean-up.
const NODES: [&str; 5] = ["client", "router", "hostA", "hostB", "hostC"];

/// The `ferry run` options that make a VM the cluster's service on a
/// host: memory, its tap, the service MAC and IP, the router as gateway.
pub fn service_args(memory: &str) -> Vec<String> {
    [
        "--memory",
        memory,
        "--tap",
        TAP,
        "--mac",
        SERVICE_MAC,
        "--ip",
        VIP_CIDR,
        "--gateway",
        GATEWAY,
    ]
    .map(String::from)
    .to_vec()
}

/// A cluster of namespaces named `{prefix}-client`, `{prefix}-router`,
/// `{prefix}-hostA`, `{prefix}-hostB`.
#[derive(Debug)]
pub struct Cluster {
    prefix: String,
    hosts: usize,
    keep: bool,
    procs: Vec<Child>,
    key: PathBuf,
}

/// Where the migration key of cluster `prefix` lives.
fn key_path(prefix: &str) -> PathBuf {
    crate::root()
        .join("target/cluster-keys")
        .join(format!("{prefix}.key"))
}

/// Makes the cluster's migration key (`ferry keygen`) unless it exists.
fn ensure_key(prefix: &str) -> Result<PathBuf> {
    let key = key_path(prefix);
    if key.exists() {
        return Ok(key);
    }
    let dir = key.parent().expect("a directory");
    std::fs::create_dir_all(dir)?;
    let out = Command::new(crate::ferry_bin())
        .args(["keygen", "--out"])
        .arg(&key)
        .output()
        .context("running ferry keygen")?;
    if !out.status.success() {
        bail!(
            "ferry keygen: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(key)
}

fn sh(cmd: &mut Command) -> Result<()> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn ip(args: &[&str]) -> Result<()> {
    sh(Command::new("ip").args(args))
}

impl Cluster {
    /// The namespace of `node` ("client", "router", "hostA", "hostB").
    pub fn ns(&self, node: &str) -> String {
        format!("{}-{node}", self.prefix)
    }

    /// Whether the cluster with this prefix exists (its client namespace does).
    pub fn exists(prefix: &str) -> bool {
        Path::new("/run/netns")
            .join(format!("{prefix}-client"))
            .exists()
    }

    /// Builds the cluster; any leftover with the same prefix is removed first.
    pub fn up(prefix: &str) -> Result<Cluster> {
        Cluster::up_with(prefix, HOSTS.len())
    }

    /// Builds a fleet's cluster: three hosts ([`FLEET_HOSTS`]).
    pub fn up_fleet(prefix: &str) -> Result<Cluster> {
        Cluster::up_with(prefix, FLEET_HOSTS.len())
    }

    fn up_with(prefix: &str, hosts: usize) -> Result<Cluster> {
        if prefix.is_empty()
            || prefix.len() > 12
            || !prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        {
            bail!("cluster prefix {prefix:?} must be 1-12 letters, digits or '-'");
        }
        remove(prefix);
        let _ = std::fs::remove_file(key_path(prefix));
        let c = Cluster {
            prefix: prefix.to_string(),
            hosts,
            keep: false,
            procs: Vec::new(),
            key: ensure_key(prefix)?,
        };
        c.build()
            .with_context(|| format!("building the cluster {prefix}-*"))?;
        Ok(c)
    }

    fn build(&self) -> Result<()> {
        let (cli, rtr) = (self.ns("client"), self.ns("router"));
        let hosts = &FLEET_HOSTS[..self.hosts];
        for n in ["client", "router"].iter().chain(hosts) {
            let ns = self.ns(n);
            ip(&["netns", "add", &ns])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
            self.exec(
                n,
                "sysctl",
                &[
                    "-qw",
                    "net.ipv6.conf.all.disable_ipv6=1",
                    "net.ipv6.conf.default.disable_ipv6=1",
                ],
            )?;
        }
        ip(&[
            "link", "add", "c0", "netns", &cli, "type", "veth", "peer", "name", "r-c0", "netns",
            &rtr,
        ])?;
        ip(&[
            "-n",
            &cli,
            "addr",
            "add",
            &format!("{CLIENT_IP}/24"),
            "dev",
            "c0",
        ])?;
        ip(&["-n", &cli, "link", "set", "c0", "up"])?;
        ip(&["-n", &cli, "route", "add", "default", "via", "10.77.1.1"])?;
        ip(&["-n", &rtr, "addr", "add", "10.77.1.1/24", "dev", "r-c0"])?;
        ip(&["-n", &rtr, "link", "set", "r-c0", "up"])?;
        self.exec("router", "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
        ip(&[
            "-n",
            &rtr,
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "ageing_time",
            "0",
            "mcast_snooping",
            "0",
            "stp_state",
            "0",
        ])?;
        ip(&[
            "-n",
            &rtr,
            "addr",
            "add",
            &format!("{GATEWAY}/24"),
            "dev",
            "br0",
        ])?;
        ip(&["-n", &rtr, "link", "set", "br0", "up"])?;
        // The router knows the service by its MAC: NLB's unicast mode.
        ip(&[
            "-n",
            &rtr,
            "neigh",
            "replace",
            VIP,
            "lladdr",
            SERVICE_MAC,
            "dev",
            "br0",
            "nud",
            "permanent",
        ])?;
        for (i, h) in hosts.iter().enumerate() {
            let hn = self.ns(h);
            let port = format!("r-h{}", i + 1);
            ip(&[
                "link", "add", "e0", "netns", &hn, "type", "veth", "peer", "name", &port, "netns",
                &rtr,
            ])?;
            ip(&["-n", &rtr, "link", "set", &port, "master", "br0"])?;
            flooding_port(&rtr, &port)?;
            ip(&["-n", &rtr, "link", "set", &port, "up"])?;
            ip(&[
                "-n",
                &hn,
                "link",
                "set",
                "e0",
                "address",
                &format!("02:00:00:00:0{}:01", i + 1),
                "up",
            ])?;
            ip(&["-n", &hn, "tuntap", "add", "dev", TAP, "mode", "tap"])?;
            ip(&[
                "-n",
                &hn,
                "link",
                "add",
                "brv",
                "type",
                "bridge",
                "stp_state",
                "0",
                "mcast_snooping",
                "0",
            ])?;
            ip(&[
                "-n",
                &hn,
                "link",
                "set",
                "brv",
                "address",
                &format!("02:00:00:00:0{}:02", i + 1),
            ])?;
            ip(&["-n", &hn, "link", "set", "e0", "master", "brv"])?;
            // The uplink never learns the service MAC: frames the VM sends
            // from another host (its ARP, its broadcasts) flood back here,
            // and a learned entry would make this bridge drop every frame
            // for the VM at its uplink, so a migration's destination would
            // capture nothing.
            flooding_port(&hn, "e0")?;
            ip(&["-n", &hn, "link", "set", TAP, "master", "brv"])?;
            ip(&["-n", &hn, "link", "set", TAP, "up"])?;
            ip(&["-n", &hn, "link", "set", "brv", "up"])?;
        }
        // The backplane for migrations and etcd: a bridge of its own in
        // the router's namespace, with no address there (nothing routes
        // between it and the service network).
        ip(&[
            "-n",
            &rtr,
            "link",
            "add",
            "bp0",
            "type",
            "bridge",
            "stp_state",
            "0",
        ])?;
        ip(&["-n", &rtr, "link", "set", "bp0", "up"])?;
        for (i, h) in hosts.iter().enumerate() {
            let (hn, port) = (self.ns(h), format!("r-m{}", i + 1));
            ip(&[
                "link", "add", "m0", "netns", &hn, "type", "veth", "peer", "name", &port, "netns",
                &rtr,
            ])?;
            ip(&["-n", &rtr, "link", "set", &port, "master", "bp0"])?;
            ip(&["-n", &rtr, "link", "set", &port, "up"])?;
            let a = MIGRATION_IPS[i];
            ip(&["-n", &hn, "addr", "add", &format!("{a}/24"), "dev", "m0"])?;
            ip(&["-n", &hn, "link", "set", "m0", "up"])?;
        }
        Ok(())
    }

    /// Leaves the cluster in place when dropped (processes are still ended).
    pub fn keep(mut self) {
        self.keep = true;
        self.end_processes();
    }

    /// Attaches to an existing cluster without owning it.
    pub fn attach(prefix: &str) -> Result<Cluster> {
        if !Self::exists(prefix) {
            bail!("no cluster {prefix}-*: run `just cluster-up` first");
        }
        Ok(Cluster {
            prefix: prefix.to_string(),
            hosts: if Path::new("/run/netns")
                .join(format!("{prefix}-hostC"))
                .exists()
            {
                FLEET_HOSTS.len()
            } else {
                HOSTS.len()
            },
            keep: true,
            procs: Vec::new(),
            key: ensure_key(prefix)?,
        })
    }

    /// The cluster's migration key file (every host holds it).
    pub fn key(&self) -> &Path {
        &self.key
    }

    /// A command that runs `program` inside node `node`'s namespace.
    pub fn command(&self, node: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns(node)]).arg(program);
        c
    }

    /// QEMU/KVM running `image` as the service on `host`: a `pc` machine
    /// with qboot, `memory` of RAM, virtio-net-pci on the host's tap with
    /// the service MAC, the console on stdout, the service address on the
    /// command line and `app_args` after `--`.
    pub fn qemu_service(&self, host: &str, image: &Path, memory: &str, app_args: &str) -> Command {
        let mut c = self.command(host, "qemu-system-x86_64");
        c.args([
            "-enable-kvm",
            "-M",
            "pc",
            "-bios",
            "/usr/share/qemu/qboot.rom",
            "-cpu",
            crate::QEMU_CPU,
            "-m",
            memory,
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-serial",
            "stdio",
            "-netdev",
            &format!("tap,id=n0,ifname={TAP},script=no,downscript=no"),
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={SERVICE_MAC},disable-legacy=on"),
            "-append",
            &format!("net.ip={VIP_CIDR} net.gw={GATEWAY} -- {app_args}"),
        ])
        .arg("-kernel")
        .arg(image);
        c
    }

    /// `stream-client` in the client namespace, reading the stream app on
    /// the service address (its port 5001) with `--json` output; add the
    /// rest of its options.
    pub fn stream_client(&self) -> Command {
        let mut c = self.command("client", crate::root().join("target/release/stream-client"));
        c.arg(format!("{VIP}:5001")).arg("--json");
        c
    }

    /// Runs `program args` in `node` to completion; fails on a non-zero exit.
    pub fn exec(&self, node: &str, program: &str, args: &[&str]) -> Result<()> {
        sh(self.command(node, program).args(args))
    }

    /// Starts `cmd` (built with [`Cluster::command`]) in the background with
    /// its output in `log`; the cluster ends it by PID when dropped.
    pub fn spawn(&mut self, mut cmd: Command, log: &Path) -> Result<u32> {
        let out = File::create(log).with_context(|| format!("creating {}", log.display()))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .with_context(|| format!("starting {cmd:?}"))?;
        let pid = child.id();
        self.procs.push(child);
        Ok(pid)
    }

    /// Starts `image` on `host` as the service (tap, MAC, IP, gateway),
    /// with `app_args`, its console in `log`; waits until the console shows
    /// `ready` (e.g. "listening"). Returns the PID.
    pub fn start_vm(
        &mut self,
        host: &str,
        image: &Path,
        memory: &str,
        app_args: &[&str],
        log: &Path,
        ready: &str,
    ) -> Result<u32> {
        self.start_vm_with(host, image, memory, &[], app_args, log, ready)
    }

    /// [`Cluster::start_vm`] with extra `ferry run` options (e.g. `--api`).
    #[allow(clippy::too_many_arguments)]
    pub fn start_vm_with(
        &mut self,
        host: &str,
        image: &Path,
        memory: &str,
        ferry_args: &[&str],
        app_args: &[&str],
        log: &Path,
        ready: &str,
    ) -> Result<u32> {
        let mut cmd = self.command(host, crate::ferry_bin());
        cmd.arg("run")
            .arg(image)
            .args(service_args(memory))
            .args(ferry_args)
            .arg("--")
            .args(app_args);
        let pid = self.spawn(cmd, log)?;
        // Long: a guest with a large ballast touches it first (minutes at
        // 1 GB on an emulated vCPU); a VM that dies fails this at once.
        wait_for_line(log, ready, Duration::from_secs(600), pid)?;
        Ok(pid)
    }

    /// Restores `snapshot` on `host` (its tap) with control socket `api`;
    /// returns once the VM answers on it.
    pub fn restore_vm(
        &mut self,
        host: &str,
        snapshot: &Path,
        api: &Path,
        log: &Path,
    ) -> Result<u32> {
        let mut cmd = self.command(host, crate::ferry_bin());
        cmd.arg("restore")
            .arg(snapshot)
            .args(["--tap", TAP, "--api"])
            .arg(api);
        let pid = self.spawn(cmd, log)?;
        let t = Instant::now();
        loop {
            if api.exists() && ferry_ctl(&["status", "--json", "--api"], api).is_ok() {
                return Ok(pid);
            }
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(pid as i32, 0) } != 0 || is_zombie(pid) {
                bail!(
                    "ferry restore ended early: {}",
                    std::fs::read_to_string(log).unwrap_or_default()
                );
            }
            if t.elapsed() > Duration::from_secs(30) {
                bail!("the restored VM does not answer on {}", api.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Starts `ferry receive --once` on `host`, listening on its
    /// migration-link address and port `port` with the cluster's key, with
    /// control socket `api` for the VM it receives, and extra options;
    /// returns its PID once it listens.
    pub fn start_receiver(
        &mut self,
        host: &str,
        port: u16,
        api: &Path,
        extra: &[&str],
        log: &Path,
    ) -> Result<u32> {
        self.start_receiver_of(&crate::ferry_bin(), host, port, api, extra, log)
    }

    /// [`Cluster::start_receiver`] with another `ferry` binary.
    pub fn start_receiver_of(
        &mut self,
        ferry: &Path,
        host: &str,
        port: u16,
        api: &Path,
        extra: &[&str],
        log: &Path,
    ) -> Result<u32> {
        let mut cmd = self.receiver_command_of(ferry, host, port, extra);
        cmd.arg("--once").arg("--api").arg(api);
        let pid = self.spawn(cmd, log)?;
        wait_for_line(log, "waiting for VMs", Duration::from_secs(10), pid)?;
        Ok(pid)
    }

    /// Service `i` of a fleet (0, 1, ...): its address with prefix and its
    /// MAC; the router knows it ([`Cluster::add_service`]).
    pub fn fleet_service(i: u8) -> (String, String) {
        (
            format!("10.77.0.{}/24", 20 + u32::from(i)),
            format!("02:bf:0a:4d:01:{:02x}", i),
        )
    }

    /// Tells the router where fleet service `i` is (its MAC, flooded to
    /// every host, as for the cluster's own service).
    pub fn add_service(&self, i: u8) -> Result<()> {
        let (cidr, mac) = Cluster::fleet_service(i);
        let addr = cidr.split('/').next().expect("an address");
        let rtr = self.ns("router");
        ip(&[
            "-n",
            &rtr,
            "neigh",
            "replace",
            addr,
            "lladdr",
            &mac,
            "dev",
            "br0",
            "nud",
            "permanent",
        ])
    }

    /// The hosts of this cluster.
    pub fn hosts(&self) -> &'static [&'static str] {
        &FLEET_HOSTS[..self.hosts]
    }

    /// The etcd client endpoints of a fleet's members (`IP:PORT`).
    pub fn etcd_endpoints(&self) -> Vec<String> {
        MIGRATION_IPS[..self.hosts]
            .iter()
            .map(|ip| format!("{ip}:{ETCD_PORT}"))
            .collect()
    }

    /// Where member `host` of the fleet's etcd keeps its data.
    pub fn etcd_dir(&self, host: &str) -> PathBuf {
        crate::root()
            .join("target/cluster")
            .join(&self.prefix)
            .join(format!("etcd-{host}"))
    }

    /// Debian's `etcd` as member `host` of the fleet's cluster (one per
    /// host, on the backplane; heartbeats of 100 ms, elections after 1 s),
    /// its data directory made anew.
    pub fn etcd_command(&self, host: &str) -> Result<Command> {
        if self.hosts < 3 {
            bail!("etcd needs the fleet's three hosts (`Cluster::up_fleet`)");
        }
        let i = FLEET_HOSTS
            .iter()
            .position(|h| *h == host)
            .with_context(|| format!("no host {host}"))?;
        let dir = self.etcd_dir(host);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.parent().expect("a parent"))?;
        let ip = MIGRATION_IPS[i];
        let peers: Vec<String> = FLEET_HOSTS
            .iter()
            .zip(MIGRATION_IPS)
            .map(|(h, a)| format!("{h}=http://{a}:{}", ETCD_PORT + 1))
            .collect();
        let mut c = self.command(host, "etcd");
        c.arg("--name")
            .arg(host)
            .arg("--data-dir")
            .arg(&dir)
            .arg(format!("--listen-client-urls=http://{ip}:{ETCD_PORT}"))
            .arg(format!("--advertise-client-urls=http://{ip}:{ETCD_PORT}"))
            .arg(format!("--listen-peer-urls=http://{ip}:{}", ETCD_PORT + 1))
            .arg(format!(
                "--initial-advertise-peer-urls=http://{ip}:{}",
                ETCD_PORT + 1
            ))
            .arg(format!("--initial-cluster={}", peers.join(",")))
            .arg("--initial-cluster-state=new")
            .arg(format!("--initial-cluster-token={}", self.prefix))
            .args(["--heartbeat-interval=100", "--election-timeout=1000"]);
        Ok(c)
    }

    /// Starts the fleet's etcd cluster, a member on each host (ended with
    /// the cluster), and waits until it has a leader. Returns the
    /// members' PIDs by host.
    pub fn start_etcd(&mut self, logs: &Path) -> Result<Vec<(&'static str, u32)>> {
        let mut pids = Vec::new();
        for h in self.hosts() {
            let cmd = self.etcd_command(h)?;
            pids.push((*h, self.spawn(cmd, &logs.join(format!("etcd-{h}.log")))?));
        }
        let eps = self.etcd_endpoints();
        // The backplane exists only in the hosts' namespaces.
        self.in_ns("hostA", || wait_for_etcd(&eps, Duration::from_secs(30)))??;
        Ok(pids)
    }

    /// Starts `ferry agent` on fleet host `i` (its directory under `dir`,
    /// its log `dir/agent-HOST.log`, or `-2`, `-3`... for a restart), and
    /// waits until it has registered. Returns its PID.
    pub fn start_agent(&mut self, dir: &Path, i: usize) -> Result<u32> {
        let (cmd, log) = self.agent_command(dir, i);
        let pid = self.spawn(cmd, &log)?;
        wait_for_line(&log, "registered", Duration::from_secs(20), pid)?;
        Ok(pid)
    }

    /// [`Cluster::start_agent`] from a shared cluster (a chaos test's
    /// restart while another thread uses it): the agent is not this
    /// cluster's child, and is ended with the namespaces' processes.
    pub fn start_agent_detached(&self, dir: &Path, i: usize) -> Result<u32> {
        let (cmd, log) = self.agent_command(dir, i);
        let pid = ferry::fleet::agent::detached(cmd, &log)?.id();
        wait_for_line(&log, "registered", Duration::from_secs(20), pid)?;
        Ok(pid)
    }

    /// [`Cluster::start_agent`] with another `ferry` (the failpoints
    /// build) and more environment (`FERRY_FAILPOINTS`): what the agent
    /// starts (its receiver, VMs) runs with both.
    pub fn start_agent_with(
        &mut self,
        dir: &Path,
        i: usize,
        ferry: &Path,
        env: &[(&str, &str)],
    ) -> Result<u32> {
        let (mut cmd, log) = self.agent_command_of(dir, i, ferry);
        cmd.envs(env.iter().copied());
        let pid = self.spawn(cmd, &log)?;
        wait_for_line(&log, "registered", Duration::from_secs(20), pid)?;
        Ok(pid)
    }

    fn agent_command(&self, dir: &Path, i: usize) -> (Command, PathBuf) {
        self.agent_command_of(dir, i, &crate::ferry_bin())
    }

    fn agent_command_of(&self, dir: &Path, i: usize, ferry: &Path) -> (Command, PathBuf) {
        let h = FLEET_HOSTS[i];
        let eps = self.etcd_endpoints().join(",");
        let mut cmd = self.command(h, ferry);
        cmd.args(["agent", "--name", h, "--etcd", &eps, "--bridge", "brv"])
            .args(["--listen", &format!("{}:7100", MIGRATION_IPS[i])])
            .arg("--key")
            .arg(&self.key)
            .arg("--dir")
            .arg(dir.join(h))
            .args(["--memory", "1G", "--cores", "2", "--ttl-s", "2"]);
        let mut log = dir.join(format!("agent-{h}.log"));
        for n in 2.. {
            if !log.exists() {
                break;
            }
            log = dir.join(format!("agent-{h}-{n}.log"));
        }
        (cmd, log)
    }

    /// The control socket an agent on `host` (directory under `dir`) gives
    /// VM `id`.
    pub fn agent_socket(dir: &Path, host: &str, id: &str) -> PathBuf {
        dir.join(host).join("vms").join(format!("{id}.sock"))
    }

    /// `ferry fleet ARGS` on `node` against the fleet's etcd: its output,
    /// or an error with what it said.
    pub fn fleet(&self, node: &str, args: &[&str]) -> Result<String> {
        let out = self
            .command(node, crate::ferry_bin())
            .arg("fleet")
            .arg("--etcd")
            .arg(self.etcd_endpoints().join(","))
            .args(args)
            .output()?;
        if !out.status.success() {
            bail!(
                "ferry fleet {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// `ferry fleet run --json IMAGE` as fleet service `i` (named `s{i}`,
    /// 64 MiB, its address and MAC, the router as gateway) on `host`,
    /// with `args` for the guest: the record, as JSON text.
    pub fn fleet_run_service(
        &self,
        i: u8,
        image: &Path,
        host: &str,
        args: &[&str],
    ) -> Result<String> {
        let (cidr, mac) = Cluster::fleet_service(i);
        let name = format!("s{i}");
        let mut a = vec![
            "run",
            "--json",
            image.to_str().context("a UTF-8 image path")?,
            "--name",
            &name,
            "--memory",
            "64M",
            "--mac",
            &mac,
            "--ip",
            &cidr,
            "--gateway",
            GATEWAY,
            "--host",
            host,
            "--",
        ];
        a.extend_from_slice(args);
        self.fleet("hostA", &a)
    }

    /// `ferry receive` on `host`'s migration-link address and `port`, with
    /// the host's tap, its name and the cluster's key (unless `extra` says
    /// `--insecure` or `--key`); add the rest.
    pub fn receiver_command(&self, host: &str, port: u16, extra: &[&str]) -> Command {
        self.receiver_command_of(&crate::ferry_bin(), host, port, extra)
    }

    /// [`Cluster::receiver_command`] with another `ferry` binary (the
    /// failpoints build, say).
    pub fn receiver_command_of(
        &self,
        ferry: &Path,
        host: &str,
        port: u16,
        extra: &[&str],
    ) -> Command {
        let i = HOSTS.iter().position(|h| *h == host).expect("a host");
        let mut cmd = self.command(host, ferry);
        cmd.arg("receive")
            .args([
                "--listen",
                &format!("{}:{port}", MIGRATION_IPS[i]),
                "--tap",
                TAP,
                "--name",
                host,
            ])
            .args(extra);
        if !extra.iter().any(|a| *a == "--insecure" || *a == "--key") {
            cmd.arg("--key").arg(&self.key);
        }
        cmd
    }

    /// `ferry migrate --json` from the VM behind `api` to `host`:`port`
    /// with the cluster's key (unless `extra` gives credentials); the JSON
    /// report, or the error line.
    pub fn migrate(
        &self,
        api: &Path,
        host: &str,
        port: u16,
        extra: &[&str],
    ) -> std::result::Result<String, String> {
        let i = HOSTS.iter().position(|h| *h == host).expect("host");
        let mut cmd = Command::new(crate::ferry_bin());
        cmd.args([
            "migrate",
            "--json",
            "--to",
            &format!("{}:{port}", MIGRATION_IPS[i]),
            "--api",
        ])
        .arg(api)
        .args(extra);
        if !extra.iter().any(|a| *a == "--insecure" || *a == "--key") {
            cmd.arg("--key").arg(&self.key);
        }
        let out = cmd.output().map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// Ends a process this cluster started (SIGTERM, then SIGKILL after
    /// `grace`); returns its exit status if it exited.
    pub fn stop(&mut self, pid: u32, grace: Duration) -> Option<std::process::ExitStatus> {
        let i = self.procs.iter().position(|c| c.id() == pid)?;
        let mut child = self.procs.swap_remove(i);
        end_child(&mut child, grace)
    }

    /// Runs `f` on a thread that has joined `node`'s network namespace, so
    /// that plain `std::net` sockets in `f` live there.
    pub fn in_ns<T: Send>(&self, node: &str, f: impl FnOnce() -> T + Send) -> Result<T> {
        let path = Path::new("/run/netns").join(self.ns(node));
        let file = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
        std::thread::scope(|s| {
            s.spawn(|| {
                use std::os::fd::AsRawFd;
                // SAFETY: setns on an open namespace fd changes only this
                // thread's network namespace.
                if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    return Err(anyhow::anyhow!(
                        "setns into {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    ));
                }
                Ok(f())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the thread in {} panicked", path.display()))?
        })
    }

    /// Packets sent so far by interface `dev` in `node`.
    pub fn tx_packets(&self, node: &str, dev: &str) -> Result<u64> {
        let out = self
            .command(node, "cat")
            .arg(format!("/sys/class/net/{dev}/statistics/tx_packets"))
            .output()?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .context("reading tx_packets")
    }

    /// The client namespace's TCP counters now.
    pub fn client_tcp_counters(&self) -> Result<TcpCounters> {
        let read = |f: &str| -> Result<String> {
            let out = self.command("client", "cat").arg(f).output()?;
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        TcpCounters::parse(&read("/proc/net/snmp")?, &read("/proc/net/netstat")?)
    }

    /// Ends what this cluster started, then whatever else runs in its
    /// namespaces (the VM processes receivers start are not our children).
    fn end_processes(&mut self) {
        for mut c in self.procs.drain(..) {
            end_child(&mut c, Duration::from_secs(3));
        }
        if !self.keep {
            end_namespace_processes(&self.prefix);
        }
    }
}

fn end_child(child: &mut Child, grace: Duration) -> Option<std::process::ExitStatus> {
    if let Ok(Some(s)) = child.try_wait() {
        return Some(s);
    }
    // SAFETY: kill(2) on the PID of a child we have not yet reaped.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let t = Instant::now();
    while t.elapsed() < grace {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().ok();
    child.wait().ok()
}

/// Makes bridge port `dev` in namespace `ns` learn no address and flood
/// frames for unknown ones.
fn flooding_port(ns: &str, dev: &str) -> Result<()> {
    ip(&[
        "-n",
        ns,
        "link",
        "set",
        dev,
        "type",
        "bridge_slave",
        "learning",
        "off",
        "flood",
        "on",
    ])
}

/// Runs `ferry ARGS API` (a control command) and returns its JSON answer.
pub fn ferry_ctl(args: &[&str], api: &Path) -> Result<String> {
    let out = Command::new(crate::ferry_bin())
        .args(args)
        .arg(api)
        .output()?;
    if !out.status.success() {
        bail!(
            "ferry {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

/// Checks, while the VM behind `api` is under load, that its guest runs
/// natively: `ferry status` says `pvm-native` and the vCPU emulates fewer
/// than `max_emulated` instructions over `window` (an emulated guest under
/// load emulates millions a second). On a host that is not PVM, checks
/// that the status says `hardware`. Returns the emulated count.
pub fn assert_runs_native(api: &Path, window: Duration, max_emulated: u64, what: &str) -> u64 {
    let status = |api: &Path| -> serde_json::Value {
        let text = ferry_ctl(&["status", "--json", "--api"], api).expect("ferry status");
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("status is not JSON ({e}): {text}"))
    };
    let first = status(api);
    if !crate::host_is_pvm() {
        assert_eq!(first["cpu_mode"], "hardware", "{what}: {first}");
        return 0;
    }
    assert_eq!(first["cpu_mode"], "pvm-native", "{what}: {first}");
    std::thread::sleep(window);
    let second = status(api);
    let count = |v: &serde_json::Value| v["kvm"]["insn_emulation"].as_u64().unwrap_or(u64::MAX);
    let emulated = count(&second).saturating_sub(count(&first));
    assert!(
        emulated < max_emulated,
        "{what}: {emulated} instructions emulated in {window:?} ({first} -> {second})"
    );
    assert!(
        second["kvm"]["exits"].as_u64() > first["kvm"]["exits"].as_u64(),
        "{what}: the vCPU did not run in {window:?}: {second}"
    );
    emulated
}

/// A cluster of its own for one integration test (unique namespace names
/// from `tag`, the process ID and a counter), or `None` when the machine
/// lacks KVM, root or iproute2 and skipping was asked for (see
/// [`crate::needs`]; without `FERRY_ALLOW_SKIP=1` the test fails instead).
pub fn for_test(test: &str, tag: &str) -> Option<Cluster> {
    for_test_with(test, tag, &[])
}

/// [`for_test`] with more needs (programs the test runs).
pub fn for_test_with(test: &str, tag: &str, more: &[crate::Need]) -> Option<Cluster> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    use crate::Need;
    let mut all = vec![Need::Kvm, Need::Root, Need::Program("ip")];
    all.extend_from_slice(more);
    if !crate::needs(test, &all) {
        return None;
    }
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = format!("{tag}{}{n}", std::process::id() % 100_000);
    Some(Cluster::up(&prefix).expect("building the cluster"))
}

/// PIDs of the processes in network namespace `ns`.
pub fn namespace_pids(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Ends (SIGTERM, then SIGKILL) every process in the namespaces of the
/// cluster `prefix`.
pub fn end_namespace_processes(prefix: &str) {
    let all = || {
        NODES
            .iter()
            .flat_map(|n| namespace_pids(&format!("{prefix}-{n}")))
            .collect::<Vec<_>>()
    };
    let pids = all();
    if pids.is_empty() {
        return;
    }
    for pid in &pids {
        // SAFETY: kill(2) on a PID the kernel just listed in our namespace.
        unsafe { libc::kill(*pid, libc::SIGTERM) };
    }
    let t = Instant::now();
    while t.elapsed() < Duration::from_secs(3) && !all().is_empty() {
        std::thread::sleep(Duration::from_millis(20));
    }
    for pid in all() {
        // SAFETY: as above; whatever did not end on SIGTERM.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
}

/// Removes every namespace of the cluster `prefix` (best effort).
pub fn remove(prefix: &str) {
    for n in NODES {
        let _ = Command::new("ip")
            .args(["netns", "del", &format!("{prefix}-{n}")])
            .stderr(Stdio::null())
            .status();
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.end_processes();
        if !self.keep {
            remove(&self.prefix);
            for h in self.hosts() {
                let _ = std::fs::remove_dir_all(self.etcd_dir(h));
            }
        }
    }
}

/// Waits until the etcd cluster at `endpoints` has a leader (call it in a
/// namespace that reaches the backplane).
pub fn wait_for_etcd(endpoints: &[String], limit: Duration) -> Result<(u64, String)> {
    let t = Instant::now();
    loop {
        let r = ferry::fleet::store::Store::connect(endpoints, Duration::from_secs(2))
            .and_then(|s| s.leader());
        match r {
            Ok((id, name)) if id != 0 => return Ok((id, name)),
            Ok(_) if t.elapsed() < limit => {}
            Err(_) if t.elapsed() < limit => {}
            Ok(_) => bail!(
                "etcd at {} has no leader after {limit:?}",
                endpoints.join(",")
            ),
            Err(e) => bail!("etcd did not come up within {limit:?}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until `log` has a line containing `needle`; fails early if the
/// process `pid` has exited, or after `limit`.
pub fn wait_for_line(log: &Path, needle: &str, limit: Duration, pid: u32) -> Result<()> {
    let t = Instant::now();
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains(needle) {
            return Ok(());
        }
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid as i32, 0) } == 0 && !is_zombie(pid);
        if !alive {
            bail!("process {pid} ended before printing {needle:?}; its output:\n{text}");
        }
        if t.elapsed() > limit {
            bail!("no {needle:?} from process {pid} after {limit:?}; its output:\n{text}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn is_zombie(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit(')')
                .next()
                .is_some_and(|r| r.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

/// TCP counters of a namespace (from /proc/net/snmp and /proc/net/netstat).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TcpCounters {
    /// Segments retransmitted (Tcp: RetransSegs).
    pub retrans_segs: u64,
    /// Resets sent (Tcp: OutRsts).
    pub out_rsts: u64,
    /// Connections reset by the peer (TcpExt: TCPAbortOnData etc. are not
    /// counted; this is Tcp: EstabResets).
    pub estab_resets: u64,
    /// Duplicate segments received (TcpExt: TCPDSACKRecv + DelayedACKLost
    /// would be proxies; this is TcpExt: TCPDSACKOldSent, DSACKs we sent
    /// for old duplicates).
    pub dup_segs_received: u64,
    /// Segments received in all.
    pub in_segs: u64,
}

fn table(text: &str, prefix: &str) -> Vec<(String, u64)> {
    let mut lines = text.lines().filter(|l| l.starts_with(prefix));
    let (Some(names), Some(values)) = (lines.next(), lines.next()) else {
        return Vec::new();
    };
    names
        .split_whitespace()
        .skip(1)
        .zip(values.split_whitespace().skip(1))
        .filter_map(|(n, v)| Some((n.to_string(), v.parse().ok()?)))
        .collect()
}

impl TcpCounters {
    /// Parses /proc/net/snmp and /proc/net/netstat.
    pub fn parse(snmp: &str, netstat: &str) -> Result<TcpCounters> {
        let tcp = table(snmp, "Tcp:");
        let ext = table(netstat, "TcpExt:");
        let get = |t: &[(String, u64)], k: &str| t.iter().find(|(n, _)| n == k).map(|(_, v)| *v);
        Ok(TcpCounters {
            retrans_segs: get(&tcp, "RetransSegs").context("no Tcp RetransSegs")?,
            out_rsts: get(&tcp, "OutRsts").context("no Tcp OutRsts")?,
            estab_resets: get(&tcp, "EstabResets").context("no Tcp EstabResets")?,
            in_segs: get(&tcp, "InSegs").context("no Tcp InSegs")?,
            dup_segs_received: get(&ext, "TCPDSACKOldSent").unwrap_or(0)
                + get(&ext, "TCPDSACKOfoSent").unwrap_or(0),
        })
    }

    /// Counters from `earlier` to `self`.
    pub fn since(&self, earlier: &TcpCounters) -> TcpCounters {
        TcpCounters {
            retrans_segs: self.retrans_segs.saturating_sub(earlier.retrans_segs),
            out_rsts: self.out_rsts.saturating_sub(earlier.out_rsts),
            estab_resets: self.estab_resets.saturating_sub(earlier.estab_resets),
            dup_segs_received: self
                .dup_segs_received
                .saturating_sub(earlier.dup_segs_received),
            in_segs: self.in_segs.saturating_sub(earlier.in_segs),
        }
    }
}

/// A scratch directory for one test's logs: `target/test-logs/NAME`.
pub fn log_dir(name: &str) -> PathBuf {
    let d = crate::root().join("target/test-logs").join(name);
    std::fs::create_dir_all(&d).expect("creating the log directory");
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_parse_from_proc_tables() {
        let snmp = "Ip: Forwarding\nIp: 1\nTcp: RtoAlgorithm InSegs OutSegs RetransSegs OutRsts EstabResets\nTcp: 1 100 90 3 2 1\n";
        let netstat = "TcpExt: SyncookiesSent TCPDSACKOldSent TCPDSACKOfoSent\nTcpExt: 0 4 1\n";
        let c = TcpCounters::parse(snmp, netstat).unwrap();
        assert_eq!(
            c,
            TcpCounters {
                retrans_segs: 3,
                out_rsts: 2,
                estab_resets: 1,
                dup_segs_received: 5,
                in_segs: 100
            }
        );
        let later = TcpCounters {
            retrans_segs: 5,
            ..c
        };
        assert_eq!(later.since(&c).retrans_segs, 2);
        assert!(TcpCounters::parse("", "").is_err());
    }
}
