//! `ferry`: run Ferry unikernel images on KVM.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry::control::{self, After, Control, Request};
use ferry::devices::console::Console;
use ferry::net::NetSettings;
use ferry::vm::{End, Vm, VmConfig};
use std::sync::Arc;

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
        /// Answer control requests (status, pause, resume, snapshot, stop) on
        /// this Unix socket; see `ferry status --help`.
        #[arg(long)]
        api: Option<PathBuf>,
        /// A setting for the guest runtime, KEY=VALUE (repeatable):
        /// `net.stats=1` prints event-loop counters every 2 s, `net.tso=0`
        /// turns TCP segmentation offload off.
        #[arg(long = "guest-arg", value_name = "KEY=VALUE")]
        guest_args: Vec<String>,
        /// Arguments for the application, after `--` (e.g. `-- exit=3`).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Resume a VM from a snapshot file and run it until the guest exits.
    ///
    /// Guest time goes on from the snapshot by the real time that passed.
    /// With a network card, the card's tap is opened first and frames for
    /// the VM are captured while it is being restored, then delivered in
    /// order (each distinct frame once); the VM then announces its MAC.
    Restore {
        /// The snapshot file (from `ferry snapshot`).
        file: PathBuf,
        /// The tap for the VM's network card on this host.
        #[arg(long)]
        tap: Option<String>,
        /// Answer control requests on this Unix socket.
        #[arg(long)]
        api: Option<PathBuf>,
        /// Do not check the memory image's digest (the header and the VM
        /// state are always checked): restore time then does not grow with
        /// memory size. For files you trust, e.g. written here a moment ago.
        #[arg(long)]
        no_verify_memory: bool,
    },
    /// Show a running VM's state (running or paused, guest time, network counters).
    Status {
        /// The VM's control socket (its `--api`).
        #[arg(long)]
        api: PathBuf,
    },
    /// Pause a running VM: the vCPU and its devices stop, and so does guest time.
    Pause {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
    },
    /// Resume a paused VM; guest time goes on by the real time that passed.
    Resume {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
    },
    /// Write a snapshot of a running or paused VM.
    ///
    /// The VM is paused while its state and memory are written (zero pages
    /// are holes in the file), then resumed, left paused, or stopped.
    Snapshot {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
        /// The snapshot file to write (replaced if it exists).
        #[arg(long)]
        out: PathBuf,
        /// What the VM does afterwards.
        #[arg(long, value_enum, default_value = "resume")]
        then: Then,
    },
    /// Live-migrate a running VM to another host's `ferry receive`.
    ///
    /// Memory is copied while the VM runs (pre-copy with dirty logging),
    /// until what is left fits the downtime budget; then the destination
    /// starts capturing the VM's frames, the VM pauses, the last pages and
    /// its state go over, and on commit it runs there. Any failure before
    /// commit leaves it running here. Prints progress, then a report.
    Migrate {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
        /// The destination's listening address, e.g. 10.77.2.2:7000.
        #[arg(long)]
        to: String,
        /// File holding the pre-shared key (16 to 4096 bytes); the
        /// destination must hold the same one. Without it, neither may.
        #[arg(long)]
        key: Option<PathBuf>,
        /// Downtime budget in milliseconds: pre-copy goes on until the
        /// remaining dirty memory can be sent in this time (at the rate
        /// pre-copy measured). The pause costs about 1 ms more: the
        /// vCPU's state, the destination loading it, the commit.
        #[arg(long, default_value_t = 1)]
        downtime_ms: u64,
        /// Print the report as JSON only.
        #[arg(long)]
        json: bool,
    },
    /// Wait for a VM to migrate here, then run it (as `ferry run` would).
    Receive {
        /// Address to listen on, e.g. 10.77.2.2:7000.
        #[arg(long)]
        listen: String,
        /// The tap for the VM's network card on this host.
        #[arg(long)]
        tap: Option<String>,
        /// File holding the pre-shared key (as on the source).
        #[arg(long)]
        key: Option<PathBuf>,
        /// Answer control requests on this Unix socket once the VM runs.
        #[arg(long)]
        api: Option<PathBuf>,
        /// Do not capture frames while the VM moves (for measurements of
        /// what capture saves).
        #[arg(long)]
        no_capture: bool,
    },
    /// Stop a VM (its process exits; nothing is saved).
    Stop {
        /// The VM's control socket.
        #[arg(long)]
        api: PathBuf,
    },
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
    ferry::vm::trace_start();
    let cli = Cli::parse();
    match run(cli) {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("ferry: error: {}", one_line(&e));
            ExitCode::from(FERRY_ERROR)
        }
    }
}

fn request(api: &std::path::Path, req: Request) -> anyhow::Result<i32> {
    let answer = control::call(api, &req).map_err(anyhow::Error::msg)?;
    if answer["ok"] != true {
        anyhow::bail!("{}", answer["error"].as_str().unwrap_or("the VM refused"));
    }
    println!("{answer}");
    Ok(0)
}

/// Runs a created or restored VM to its end: the guest's exit status, or 0
/// when a control request stopped it, or 128+signal.
fn drive(mut vm: Vm, api: Option<PathBuf>) -> anyhow::Result<i32> {
    let control = Arc::new(Control::default());
    if let Some(api) = &api {
        control::serve(api, control.clone())
            .with_context(|| format!("cannot serve the control socket {}", api.display()))?;
    }
    let r = vm.run(api.as_ref().map(|_| &*control));
    control.close();
    if let Some(api) = &api {
        let _ = std::fs::remove_file(api);
    }
    match r {
        Ok(End::Exited(status)) => Ok(status),
        Ok(End::Stopped) => Ok(0),
        Err(ferry::vm::Error::Signalled(sig)) => {
            eprintln!("ferry: stopped by signal {sig}; the guest was ended");
            Ok(128 + sig)
        }
        Err(e) => Err(anyhow::Error::new(e).context("the VM stopped")),
    }
}

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Status { api } => request(&api, Request::Status),
        Command::Pause { api } => request(&api, Request::Pause),
        Command::Resume { api } => request(&api, Request::Resume),
        Command::Stop { api } => request(&api, Request::Stop),
        Command::Snapshot { api, out, then } => {
            let out = std::path::absolute(&out).context("the snapshot path")?;
            let then = match then {
                Then::Resume => After::Resume,
                Then::Pause => After::Pause,
                Then::Stop => After::Stop,
            };
            request(&api, Request::Snapshot { path: out, then })
        }
        Command::Migrate {
            api,
            to,
            key,
            downtime_ms,
            json,
        } => {
            let key = match key {
                Some(k) => Some(std::path::absolute(&k).context("the key path")?),
                None => None,
            };
            let req = Request::Migrate {
                to: to.clone(),
                key,
                downtime_ms,
            };
            let mut progress = |p: &serde_json::Value| {
                if !json {
                    eprint!(
                        "\rferry: migrate: {:<9} round {:>3}  {:>10.1} MiB sent {}",
                        p["phase"].as_str().unwrap_or(""),
                        p["round"].as_u64().unwrap_or(0),
                        p["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                        p["dirty_pages"]
                            .as_u64()
                            .map(|d| format!("({d} pages dirty)"))
                            .unwrap_or_default()
                    );
                }
            };
            let answer = control::call_with_progress(&api, &req, &mut progress)
                .map_err(anyhow::Error::msg)?;
            if !json {
                eprintln!();
            }
            if answer["ok"] != true {
                anyhow::bail!(
                    "{}",
                    answer["error"].as_str().unwrap_or("the migration failed")
                );
            }
            if json {
                println!("{answer}");
            } else {
                println!(
                    "ferry: migrated to {to}: {} pre-copy rounds, {:.1} MiB sent, downtime {:.2} ms (VMM-measured: pause to the destination running), total {:.1} ms",
                    answer["rounds"],
                    answer["bytes"].as_u64().unwrap_or(0) as f64 / (1 << 20) as f64,
                    answer["downtime_ms"].as_f64().unwrap_or(0.0),
                    answer["total_ms"].as_f64().unwrap_or(0.0),
                );
            }
            Ok(0)
        }
        Command::Receive {
            listen,
            tap,
            key,
            api,
            no_capture,
        } => {
            ferry::stop::install().context("cannot install signal handling")?;
            let key = match key {
                Some(k) => ferry::migration::Key::from_file(&k).map_err(anyhow::Error::msg)?,
                None => ferry::migration::Key::none(),
            };
            let listener = std::net::TcpListener::bind(&listen)
                .with_context(|| format!("cannot listen on {listen}"))?;
            eprintln!("ferry: receive: waiting for a VM on {listen}");
            let arrived = ferry::migration::dest::receive(
                &listener,
                tap.as_deref(),
                &key,
                !no_capture,
                || Console::new(Box::new(std::io::stdout())),
                &|m| eprintln!("ferry: receive: {m}"),
            )
            .context("the migration failed")?;
            let mut vm = arrived.vm;
            let conn = arrived.conn;
            let committed_at = arrived.committed_at;
            vm.on_running(Box::new(move |vm| {
                let to_running = committed_at.elapsed().as_secs_f64() * 1e3;
                ferry::migration::dest::confirm(
                    &conn,
                    &serde_json::json!({"net": vm.net_counters(), "commit_to_running_ms": to_running}),
                );
            }));
            drive(vm, api)
        }
        Command::Restore {
            file,
            tap,
            api,
            no_verify_memory,
        } => {
            ferry::stop::install().context("cannot install signal handling")?;
            let console = Console::new(Box::new(std::io::stdout()));
            let vm = Vm::restore(&file, tap.as_deref(), console, !no_verify_memory)
                .context("cannot restore the VM")?;
            drive(vm, api)
        }
        Command::Run {
            image,
            memory,
            cpus,
            net,
            api,
            guest_args,
            args,
        } => {
            let config = VmConfig {
                image,
                memory,
                cpus,
                app_args: args,
                guest_args,
                net: net.settings()?,
            };
            ferry::stop::install().context("cannot install signal handling")?;
            let console = Console::new(Box::new(std::io::stdout()));
            let vm = Vm::create(&config, console).context("cannot start the VM")?;
            drive(vm, api)
        }
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
        for sub in cli.get_subcommands() {
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
