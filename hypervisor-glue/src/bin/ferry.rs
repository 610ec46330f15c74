//! `ferry`: run Ferry unikernel images on KVM.
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use ferry::devices::console::Console;
use ferry::net::NetSettings;
use ferry::vm::{Vm, VmConfig};

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
        /// Arguments for the application, after `--` (e.g. `-- exit=3`).
        #[arg(last = true)]
        args: Vec<String>,
    },
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

fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Run {
            image,
            memory,
            cpus,
            net,
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
            let mut vm = Vm::create(&config, console).context("cannot start the VM")?;
            match vm.run() {
                Ok(status) => Ok(status),
                Err(ferry::vm::Error::Signalled(sig)) => {
                    eprintln!("ferry: stopped by signal {sig}; the guest was ended");
                    Ok(128 + sig)
                }
                Err(e) => Err(anyhow::Error::new(e).context("the VM stopped")),
            }
        }
    }
}
