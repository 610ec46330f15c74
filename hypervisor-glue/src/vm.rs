//! A VM: guest memory, the KVM machine, the boot vCPU, the console and the
//! guest clock, created from an image and run to its end.

use std::path::PathBuf;

use crate::boot::{self, BootParams};
use crate::clock::GuestClock;
use crate::devices::IoBus;
use crate::devices::console::Console;
use crate::devices::virtio::net::{self, NetConfig, VirtioNet};
use crate::kvm::{self, Machine};
use crate::memory::{self, GuestRam};
use crate::net::NetSettings;
use crate::vcpu::{self, Stop, Vcpu};

/// Largest image file read.
pub const MAX_IMAGE_FILE: u64 = 1 << 30;

/// What to run and how.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The image file.
    pub image: PathBuf,
    /// Guest memory in bytes.
    pub memory: u64,
    /// Number of vCPUs (1 for now).
    pub cpus: u32,
    /// The application's arguments.
    pub app_args: Vec<String>,
    /// The network card, if any.
    pub net: Option<NetSettings>,
}

/// Guest-physical address of the virtio-net BAR (in the MMIO hole).
pub const NET_BAR_ADDR: u32 = 0xE000_0000;
/// IOAPIC pin of the virtio-net interrupt.
pub const NET_GSI: u32 = 11;

/// VM errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image file could not be read.
    #[error("cannot read image {path}: {source}")]
    ReadImage {
        /// The path.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The image file is absurdly large.
    #[error("image {path} is {size} bytes; images over {MAX_IMAGE_FILE} bytes are refused")]
    ImageFileTooLarge {
        /// The path.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// More vCPUs than supported.
    #[error("{0} vCPUs asked for; this version of Ferry runs exactly 1")]
    Cpus(u32),
    /// An argument the guest command line cannot carry.
    #[error(
        "guest argument {0:?} is empty or contains whitespace, which the guest command line cannot carry"
    )]
    BadArg(String),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] memory::Error),
    /// KVM setup.
    #[error(transparent)]
    Kvm(#[from] kvm::Error),
    /// Loading the image or writing boot structures.
    #[error("{path}: {source}")]
    Boot {
        /// The image path.
        path: PathBuf,
        /// What failed.
        source: boot::Error,
    },
    /// Running the vCPU.
    #[error(transparent)]
    Vcpu(#[from] vcpu::Error),
    /// The network card.
    #[error(transparent)]
    Net(#[from] net::Error),
    /// Stopped by a signal.
    #[error("stopped by signal {0}")]
    Signalled(i32),
}

/// A created VM, ready to run.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: the vCPU and VM fds close before the
    // memory they map is unmapped.
    vcpu: Vcpu,
    bus: IoBus,
    _machine: Machine,
    clock: GuestClock,
    mem: GuestRam,
}

/// Builds the guest command line: the runtime's words, then `--` and the
/// application's arguments.
pub fn cmdline(runtime_args: &[String], app_args: &[String]) -> Result<String, Error> {
    if let Some(bad) = app_args
        .iter()
        .find(|a| a.is_empty() || a.chars().any(char::is_whitespace))
    {
        return Err(Error::BadArg(bad.clone()));
    }
    let mut words = runtime_args.to_vec();
    if !app_args.is_empty() {
        words.push("--".into());
        words.extend(app_args.iter().cloned());
    }
    Ok(words.join(" "))
}

impl Vm {
    /// Reads the image, maps memory, creates the VM and loads the image.
    pub fn create(config: &VmConfig, console: Console) -> Result<Vm, Error> {
        if config.cpus != 1 {
            return Err(Error::Cpus(config.cpus));
        }
        let trace = Trace::new();
        let runtime_args = config
            .net
            .as_ref()
            .map(NetSettings::runtime_args)
            .unwrap_or_default();
        let cmdline = cmdline(&runtime_args, &config.app_args)?;
        let image = read_image(&config.image)?;
        trace.mark("read image");
        let mem = memory::create(config.memory)?;
        trace.mark("map memory");
        let machine = kvm::create_machine(&mem)?;
        trace.mark("create VM");
        // The vCPU exists before the boot structures because they carry its
        // TSC rate; its registers are set once the entry point is known.
        let fd = kvm::create_vcpu(&machine, 0)?;
        let tsc_khz = kvm::tsc_khz(&fd)?;
        trace.mark("create vCPU");
        let params = BootParams {
            cmdline: &cmdline,
            tsc_khz,
            cpus: config.cpus,
        };
        let (boot_cpu, _image) =
            boot::setup(&mem, &image, &params).map_err(|source| Error::Boot {
                path: config.image.clone(),
                source,
            })?;
        trace.mark("load image");
        kvm::set_boot_registers(&fd, &boot_cpu)?;
        let clock = GuestClock::start(tsc_khz);
        clock.publish(&mem)?;
        trace.mark("registers, clock");
        let net = match &config.net {
            Some(n) => {
                let dev = VirtioNet::new(
                    &NetConfig {
                        tap: n.tap.clone(),
                        mac: n.mac.0,
                        bar_addr: NET_BAR_ADDR,
                        gsi: NET_GSI,
                    },
                    &machine.vm,
                    &mem,
                )?;
                trace.mark("virtio-net");
                Some(dev)
            }
            None => None,
        };
        Ok(Vm {
            vcpu: Vcpu::new(fd),
            bus: IoBus::new(console, net),
            _machine: machine,
            clock,
            mem,
        })
    }

    /// Runs the guest to its end; returns its exit status. With
    /// `FERRY_STATS=1`, prints the vCPU's non-zero KVM counters afterwards.
    pub fn run(&mut self) -> Result<i32, Error> {
        let r = self.vcpu.run(&self.mem, &mut self.bus);
        if std::env::var_os("FERRY_STATS").is_some_and(|v| v == "1") {
            let stats = kvm::vcpu_stats(self.vcpu.fd());
            let line: Vec<String> = stats
                .iter()
                .filter(|(_, v)| *v != 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            eprintln!("ferry: kvm stats: {}", line.join(" "));
            if let Some(net) = &self.bus.net {
                let st = net.stats();
                let get =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                eprintln!(
                    "ferry: net stats: rx_frames={} tx_frames={} dropped={} interrupts={}",
                    get(&st.rx_frames),
                    get(&st.tx_frames),
                    get(&st.dropped),
                    get(&st.interrupts)
                );
            }
        }
        match r? {
            Stop::Exited(status) => Ok(status),
            Stop::Signalled(sig) => Err(Error::Signalled(sig)),
        }
    }

    /// Guest time now, in ns since boot.
    pub fn guest_time_ns(&self) -> u64 {
        self.clock.now_ns()
    }
}

/// Phase timings on stderr when `FERRY_TRACE=1` (for boot-time work).
struct Trace(Option<std::time::Instant>);

impl Trace {
    fn new() -> Self {
        Trace(
            std::env::var_os("FERRY_TRACE")
                .is_some_and(|v| v == "1")
                .then(std::time::Instant::now),
        )
    }
    fn mark(&self, phase: &str) {
        if let Some(t) = self.0 {
            eprintln!(
                "ferry: trace: {:>8.3} ms  {phase}",
                t.elapsed().as_secs_f64() * 1e3
            );
        }
    }
}

fn read_image(path: &std::path::Path) -> Result<Vec<u8>, Error> {
    let err = |source| Error::ReadImage {
        path: path.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(err)?;
    if !meta.is_file() {
        return Err(err(std::io::Error::other("not a regular file")));
    }
    if meta.len() > MAX_IMAGE_FILE {
        return Err(Error::ImageFileTooLarge {
            path: path.to_path_buf(),
            size: meta.len(),
        });
    }
    std::fs::read(path).map_err(err)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmdline_carries_app_args_after_separator() {
        assert_eq!(cmdline(&[], &[]).unwrap(), "");
        assert_eq!(
            cmdline(&[], &["a".into(), "exit=3".into()]).unwrap(),
            "-- a exit=3"
        );
        assert_eq!(
            cmdline(&["net.ip=10.0.0.2/24".into()], &["a".into()]).unwrap(),
            "net.ip=10.0.0.2/24 -- a"
        );
        assert!(matches!(
            cmdline(&[], &["a b".into()]),
            Err(Error::BadArg(_))
        ));
        assert!(matches!(cmdline(&[], &["".into()]), Err(Error::BadArg(_))));
    }
}
