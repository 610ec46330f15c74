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

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(status) => ExitCode::from(status as u8),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
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
        Command::Restore { file, tap, api } => {
            ferry::stop::install().context("cannot install signal handling")?;
            let console = Console::new(Box::new(std::io::stdout()));
            let vm =
                Vm::restore(&file, tap.as_deref(), console).context("cannot restore the VM")?;
            drive(vm, api)
        }
        Command::Run {
            image,
            memory,
            cpus,
            net,
            api,
            args,
        } => {
            let config = VmConfig {
                image,
                memory,
                cpus,
                app_args: args,
                net: net.settings()?,
            };
            ferry::stop::install().context("cannot install signal handling")?;
            let console = Console::new(Box::new(std::io::stdout()));
            let vm = Vm::create(&config, console).context("cannot start the VM")?;
            drive(vm, api)
        }
    }
}
