//! A VM: guest memory, the KVM machine, the boot vCPU, the console and the
//! guest clock, created from an image and run to its end.

use std::path::PathBuf;

use crate::boot::{self, BootParams};
use crate::clock::GuestClock;
use crate::control::{self, After, Control, Job, Request};
use crate::devices::IoBus;
use crate::devices::console::Console;
use crate::devices::virtio::net::{self, NetConfig, VirtioNet};
use crate::kvm::{self, Machine};
use crate::memory::{self, GuestRam};
use crate::net::NetSettings;
use crate::snapshot::{ConfigState, Snapshot, VmState};
use crate::vcpu::{self, Stop, Vcpu};
use std::sync::Arc;
use std::time::{Duration, Instant};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

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
    /// Settings for the guest runtime (`key=value`, e.g. `net.stats=1`),
    /// beside the network settings the VMM derives from `net`.
    pub guest_args: Vec<String>,
    /// The network card, if any.
    pub net: Option<NetSettings>,
}

/// How a VM ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest exited with this status.
    Exited(i32),
    /// A control request stopped it (after a final snapshot, say).
    Stopped,
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
    /// A runtime setting that is not `key=value` (or is one the VMM sets).
    #[error(
        "guest setting {0:?} refused: it must be KEY=VALUE without spaces, and not net.ip or net.gw (those come from --ip and --gateway)"
    )]
    BadGuestArg(String),
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
    /// A snapshot file.
    #[error(transparent)]
    Snapshot(#[from] crate::snapshot::Error),
    /// A snapshot that is well-formed but cannot be this VM.
    #[error("snapshot: {0}")]
    BadSnapshot(String),
    /// Saving or restoring KVM state.
    #[error(transparent)]
    KvmState(#[from] kvm::StateError),
    /// Restoring the network card.
    #[error(transparent)]
    NetRestore(#[from] crate::devices::virtio::net::RestoreError),
}

/// Called once a VM runs.
type OnRunning = Box<dyn FnOnce(&Vm) + Send>;

/// A created VM, ready to run.
pub struct Vm {
    // Field order is drop order: the vCPU and VM fds close before the
    // memory they map is unmapped.
    vcpu: Vcpu,
    bus: IoBus,
    machine: Arc<Machine>,
    /// Called once the VM runs (after its first resume).
    on_running: Option<OnRunning>,
    clock: GuestClock,
    /// The stopped clock while paused.
    paused: Option<crate::clock::ClockState>,
    /// What a snapshot records of the configuration.
    saved_config: ConfigState,
    /// The VM has migrated away: it must never run here again.
    gone: bool,
    tsc_khz: u32,
    mem: GuestRam,
}

/// Checks that a received or saved memory layout is the one `config` gives.
fn check_layout(config: &ConfigState, regions: &[(u64, u64)]) -> Result<(), Error> {
    let expected = memory::ram_ranges(config.memory);
    if regions != expected.as_slice() || config.cpus != 1 {
        return Err(Error::BadSnapshot(format!(
            "memory layout {regions:x?} / {} vCPUs is not what {} bytes of memory and 1 vCPU give",
            config.cpus, config.memory
        )));
    }
    Ok(())
}

/// A VM being brought in (from a snapshot file or a migration): memory,
/// the KVM VM and vCPU, and the network card on this host's tap, before
/// the state is loaded.
pub struct Incoming {
    mem: GuestRam,
    machine: Machine,
    fd: kvm_ioctls::VcpuFd,
    tsc_khz: u32,
    net: Option<VirtioNet>,
    config: ConfigState,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("config", &self.config)
            .finish()
    }
}

impl Incoming {
    /// Creates the VM around `mem` and opens the card's tap (paused).
    pub fn new(config: &ConfigState, mem: GuestRam, tap: Option<&str>) -> Result<Incoming, Error> {
        let machine = kvm::create_machine(&mem)?;
        let fd = kvm::create_vcpu(&machine, 0)?;
        let tsc_khz = kvm::tsc_khz(&fd)?;
        let net = match &config.net {
            Some((mac, _, _)) => {
                let tap = tap.ok_or_else(|| {
                    Error::BadSnapshot("the VM has a network card: give --tap".into())
                })?;
                let mac: crate::net::Mac = mac.parse().map_err(Error::BadSnapshot)?;
                let cfg = NetConfig {
                    tap: tap.to_string(),
                    mac: mac.0,
                    bar_addr: NET_BAR_ADDR,
                    gsi: NET_GSI,
                };
                let mut dev = VirtioNet::new(&cfg, &machine.vm, &mem)?;
                dev.pause(false);
                Some(dev)
            }
            None => None,
        };
        Ok(Incoming {
            mem,
            machine,
            fd,
            tsc_khz,
            net,
            config: config.clone(),
        })
    }

    /// Guest memory, to fill.
    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// From now on the card keeps the frames that arrive for the VM.
    pub fn start_capture(&mut self) {
        if let Some(net) = self.net.as_mut() {
            net.pause(true);
        }
    }

    /// Loads `state` and gives the VM, paused: [`Vm::run`] resumes it.
    pub fn finish(mut self, st: &VmState, console: Console) -> Result<Vm, Error> {
        check_layout(&st.config, &st.memory)?;
        if st.config != self.config {
            return Err(Error::BadSnapshot(
                "the state's configuration is not the one announced".into(),
            ));
        }
        match (&st.net, self.net.as_mut()) {
            (Some(ns), Some(dev)) => dev.apply_state(&self.mem, ns)?,
            (None, None) => {}
            _ => {
                return Err(Error::BadSnapshot(
                    "network card state and configuration disagree".into(),
                ));
            }
        }
        kvm::restore_irqchip(&self.machine.vm, &st.irqchip)?;
        kvm::restore_vcpu(&self.fd, &st.vcpu)?;
        Ok(Vm {
            vcpu: Vcpu::new(self.fd),
            bus: IoBus::new(Console::restore_into(console, &st.console), self.net),
            machine: Arc::new(self.machine),
            on_running: None,
            clock: GuestClock::resume(&st.clock, self.tsc_khz),
            paused: Some(st.clock),
            gone: false,
            saved_config: st.config.clone(),
            tsc_khz: self.tsc_khz,
            mem: self.mem,
        })
    }
}

/// Checks settings for the guest runtime: `key=value` words, no spaces,
/// and none of the network settings the VMM sets from its own options.
pub fn check_guest_args(args: &[String]) -> Result<(), Error> {
    for a in args {
        let key = a.split_once('=').map(|(k, _)| k).unwrap_or("");
        if key.is_empty()
            || a.starts_with('-')
            || a.chars().any(char::is_whitespace)
            || key == "net.ip"
            || key == "net.gw"
        {
            return Err(Error::BadGuestArg(a.clone()));
        }
    }
    Ok(())
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

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.saved_config)
            .field("paused", &self.paused.is_some())
            .finish()
    }
}

impl Vm {
    /// Reads the image, maps memory, creates the VM and loads the image.
    pub fn create(config: &VmConfig, console: Console) -> Result<Vm, Error> {
        if config.cpus != 1 {
            return Err(Error::Cpus(config.cpus));
        }
        let trace = Trace::new();
        let mut runtime_args = config
            .net
            .as_ref()
            .map(NetSettings::runtime_args)
            .unwrap_or_default();
        check_guest_args(&config.guest_args)?;
        runtime_args.extend(config.guest_args.iter().cloned());
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
        let saved_config = ConfigState {
            memory: config.memory,
            cpus: config.cpus,
            image: config.image.display().to_string(),
            net: config.net.as_ref().map(|n| {
                (
                    n.mac.to_string(),
                    n.ip.to_string(),
                    n.gateway.map(|g| g.to_string()),
                )
            }),
        };
        Ok(Vm {
            vcpu: Vcpu::new(fd),
            bus: IoBus::new(console, net),
            machine: Arc::new(machine),
            on_running: None,
            clock,
            paused: None,
            gone: false,
            saved_config,
            tsc_khz,
            mem,
        })
    }

    /// Resumes a VM from a snapshot file, on tap `tap` if it has a network
    /// card. The card captures frames for the VM from the moment its tap is
    /// open and delivers them when the VM runs. The VM is left paused:
    /// [`Vm::run`] runs it.
    ///
    /// With `verify_memory` false the memory image's digest is not checked
    /// (header and state always are): restore then costs the same at any
    /// memory size, since memory is mapped, not read.
    pub fn restore(
        path: &std::path::Path,
        tap: Option<&str>,
        console: Console,
        verify_memory: bool,
    ) -> Result<Vm, Error> {
        let trace = Trace::new();
        let snap = Snapshot::open(path)?;
        trace.mark("read and check state");
        let st = &snap.state;
        check_layout(&st.config, &st.memory)?;
        let mem = memory::map_file(&snap.file, snap.header.memory_offset, &st.memory)?;
        trace.mark("map memory");
        let mut incoming = Incoming::new(&st.config, mem, tap)?;
        incoming.start_capture();
        trace.mark("VM, vCPU, card (capturing)");
        if verify_memory {
            // SAFETY: nothing runs in this VM yet and the card is paused.
            snap.verify_memory(&unsafe { memory::region_slices(&incoming.mem) })?;
            trace.mark("verify memory");
        }
        let vm = incoming.finish(st, console)?;
        trace.mark("state loaded");
        Ok(vm)
    }

    /// Calls `f` once the VM runs (used to confirm a migration).
    pub fn on_running(&mut self, f: OnRunning) {
        self.on_running = Some(f);
    }

    /// The card's counters as JSON (empty object without a card).
    pub fn net_counters(&self) -> serde_json::Value {
        match &self.bus.net {
            Some(net) => {
                let st = net.stats();
                let g =
                    |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
                serde_json::json!({
                    "rx_frames": g(&st.rx_frames), "tx_frames": g(&st.tx_frames), "tx_gso_frames": g(&st.tx_gso_frames), "dropped": g(&st.dropped),
                    "interrupts": g(&st.interrupts), "captured": g(&st.captured), "duplicates": g(&st.duplicates),
                })
            }
            None => serde_json::json!({}),
        }
    }

    /// Drops the frames queued in the card's tap while nothing read it
    /// (a migration's destination that was told not to capture).
    pub fn discard_waiting_frames(&mut self) {
        if let Some(net) = self.bus.net.as_mut() {
            net.discard_waiting();
        }
    }

    /// What a migration source needs of this VM.
    pub fn migration_context(&self) -> crate::migration::source::Context {
        crate::migration::source::Context {
            machine: self.machine.clone(),
            mem: self.mem.clone(),
            config: self.saved_config.clone(),
        }
    }

    /// Stops the guest clock and the devices (the vCPU is already out of
    /// KVM_RUN: only the vCPU thread calls this).
    fn pause(&mut self) {
        if self.paused.is_none() {
            self.paused = Some(self.clock.save());
            if let Some(net) = self.bus.net.as_mut() {
                // A migration's source keeps reading its tap while paused,
                // so what arrived before the destination captured goes
                // with the VM.
                let capture = net.recording();
                net.pause(capture);
            }
        }
    }

    /// Restarts the clock (guest time goes on by the real time that passed)
    /// and the devices.
    fn resume(&mut self) -> Result<(), Error> {
        if let Some(state) = self.paused.take() {
            self.clock = GuestClock::resume(&state, self.tsc_khz);
            self.clock.publish(&self.mem)?;
            let announcement = self.announcement();
            if let Some(net) = self.bus.net.as_mut() {
                net.resume();
                if let Some(frame) = announcement {
                    let _ = net.announce(&frame);
                }
            }
        }
        Ok(())
    }

    /// A gratuitous ARP for the guest's address from its MAC, so that the
    /// bridges of the host it now runs on learn where the MAC lives (as
    /// QEMU announces a migrated guest).
    fn announcement(&self) -> Option<Vec<u8>> {
        let (mac, ip, _) = self.saved_config.net.as_ref()?;
        let mac: crate::net::Mac = mac.parse().ok()?;
        let ip: crate::net::Ipv4Cidr = ip.parse().ok()?;
        let mut f = vec![0u8; 60];
        f[..6].fill(0xFF);
        f[6..12].copy_from_slice(&mac.0);
        f[12..14].copy_from_slice(&[0x08, 0x06]);
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&mac.0);
        f[28..32].copy_from_slice(&ip.addr.octets());
        f[38..42].copy_from_slice(&ip.addr.octets());
        Some(f)
    }

    /// The whole VM's state; it must be paused.
    pub fn save(&self) -> Result<VmState, Error> {
        let clock = self
            .paused
            .ok_or_else(|| Error::BadSnapshot("save() of a running VM".into()))?;
        Ok(VmState {
            config: self.saved_config.clone(),
            memory: self
                .mem
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect(),
            vcpu: kvm::save_vcpu(&self.machine.kvm, self.vcpu.fd())?,
            irqchip: kvm::save_irqchip(&self.machine.vm)?,
            clock,
            console: self.bus.console.save(),
            net: self.bus.net.as_ref().map(VirtioNet::save),
        })
    }

    /// Writes a snapshot of the paused VM to `path`; returns its size.
    pub fn snapshot(&self, path: &std::path::Path) -> Result<u64, Error> {
        let state = self.save()?;
        // SAFETY: the VM is paused (save() checked): the vCPU is out of
        // KVM_RUN on this thread and the card's worker is paused.
        let regions = unsafe { memory::region_slices(&self.mem) };
        Ok(crate::snapshot::write(path, &state, &regions)?)
    }

    fn status(&self) -> serde_json::Value {
        let guest_ns = match &self.paused {
            Some(c) => c.guest_ns,
            None => self.clock.now_ns(),
        };
        let mut v = serde_json::json!({
            "ok": true,
            "state": if self.paused.is_some() { "paused" } else { "running" },
            "guest_time_ns": guest_ns,
            "memory": self.saved_config.memory,
            "image": self.saved_config.image,
            "cpu_mode": kvm::cpu_mode(self.vcpu.fd()).name(),
        });
        // The vCPU's KVM counters that say how it runs: exits, emulated
        // instructions, halts, injected interrupts.
        let stats = kvm::vcpu_stats(self.vcpu.fd());
        let mut counters = serde_json::Map::new();
        for (k, val) in stats {
            if ["exits", "insn_emulation", "halt_exits", "irq_injections"].contains(&k.as_str()) {
                counters.insert(k, val.into());
            }
        }
        v["kvm"] = counters.into();
        if self.bus.net.is_some() {
            v["net"] = self.net_counters();
        }
        v
    }

    /// Serves control requests until the VM should run on (`None`) or end
    /// (`Some`). While paused, it waits here for the next request.
    fn serve_control(&mut self, control: &Control) -> Result<Option<End>, Error> {
        loop {
            let wait = if self.paused.is_some() {
                Duration::from_millis(50)
            } else {
                Duration::ZERO
            };
            let Some(job) = control.take(wait) else {
                if self.paused.is_none() {
                    return Ok(None);
                }
                if let Some(sig) = crate::stop::requested() {
                    return Err(Error::Signalled(sig));
                }
                continue;
            };
            let (req, reply) = match job {
                Job::Api(req, reply) => (req, reply),
                Job::Save(reply) => {
                    let _ = reply.send(self.save().map_err(|e| e.to_string()));
                    continue;
                }
                Job::Record(on, reply) => {
                    if let Some(net) = self.bus.net.as_mut() {
                        if on {
                            net.start_recording();
                        } else {
                            net.stop_recording();
                        }
                    }
                    let _ = reply.send(());
                    continue;
                }
                Job::Gone(reply) => {
                    self.pause();
                    self.gone = true;
                    let _ = reply.send(());
                    continue;
                }
            };
            let (answer, end) = match req {
                Request::Status => (self.status(), None),
                Request::Pause => {
                    let t = Instant::now();
                    self.pause();
                    (
                        serde_json::json!({"ok": true, "pause_us": t.elapsed().as_micros() as u64}),
                        None,
                    )
                }
                Request::Resume if self.gone => {
                    (control::error("the VM has moved to another host"), None)
                }
                Request::Snapshot { .. } if self.gone => {
                    (control::error("the VM has moved to another host"), None)
                }
                Request::Migrate { .. } => {
                    (control::error("migrate is served by the API thread"), None)
                }
                Request::Resume => match self.resume() {
                    Ok(()) => (serde_json::json!({"ok": true}), None),
                    Err(e) => (control::error(e), None),
                },
                Request::Snapshot { path, then } => {
                    let was_paused = self.paused.is_some();
                    let t = Instant::now();
                    self.pause();
                    let pause_us = t.elapsed().as_micros() as u64;
                    let t = Instant::now();
                    match self.snapshot(&path) {
                        Ok(bytes) => {
                            let write_us = t.elapsed().as_micros() as u64;
                            let end = match then {
                                After::Stop => Some(End::Stopped),
                                After::Pause => None,
                                After::Resume => {
                                    if !was_paused {
                                        self.resume()?;
                                    }
                                    None
                                }
                            };
                            (
                                serde_json::json!({"ok": true, "bytes": bytes, "pause_us": pause_us, "write_us": write_us}),
                                end,
                            )
                        }
                        Err(e) => {
                            // A failed snapshot leaves the VM as it was.
                            if !was_paused {
                                self.resume()?;
                            }
                            (control::error(e), None)
                        }
                    }
                }
                Request::Stop => (serde_json::json!({"ok": true}), Some(End::Stopped)),
            };
            let _ = reply.send(answer);
            if let Some(end) = end {
                return Ok(Some(end));
            }
        }
    }

    /// Runs the guest to its end, answering `control` requests on the way
    /// (a restored VM starts paused and is resumed here first). With
    /// `FERRY_STATS=1`, prints the vCPU's non-zero KVM counters afterwards.
    pub fn run(&mut self, control: Option<&Control>) -> Result<End, Error> {
        if let Some(c) = control {
            c.set_context(self.migration_context());
        }
        self.resume()?;
        Trace::new().mark("running");
        if let Some(f) = self.on_running.take() {
            f(self);
        }
        let r = loop {
            match self.vcpu.run(&self.mem, &mut self.bus, control) {
                Ok(Stop::Control) => {
                    match self.serve_control(control.expect("a control request needs control")) {
                        Ok(None) => continue,
                        Ok(Some(end)) => break Ok(end),
                        Err(e) => break Err(e),
                    }
                }
                Ok(Stop::Exited(status)) => break Ok(End::Exited(status)),
                Ok(Stop::Signalled(sig)) => break Err(Error::Signalled(sig)),
                Err(e) => break Err(e.into()),
            }
        };
        if std::env::var_os("FERRY_STATS").is_some_and(|v| v == "1") {
            let stats = kvm::vcpu_stats(self.vcpu.fd());
            let line: Vec<String> = stats
                .iter()
                .filter(|(_, v)| *v != 0)
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            eprintln!(
                "ferry: kvm stats: cpu_mode={} {}",
                kvm::cpu_mode(self.vcpu.fd()).name(),
                line.join(" ")
            );
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
        r
    }

    /// Guest time now, in ns since boot.
    pub fn guest_time_ns(&self) -> u64 {
        self.clock.now_ns()
    }
}

/// Phase timings on stderr when `FERRY_TRACE=1` (for boot-time work).
/// Times are from [`trace_start`] (the process's start, when the CLI calls
/// it first), so phases of different functions line up.
struct Trace(Option<std::time::Instant>);

static TRACE_START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();

/// Fixes the origin of `FERRY_TRACE` times (call first thing in `main`).
pub fn trace_start() {
    TRACE_START.get_or_init(std::time::Instant::now);
}

impl Trace {
    fn new() -> Self {
        Trace(
            std::env::var_os("FERRY_TRACE")
                .is_some_and(|v| v == "1")
                .then(|| *TRACE_START.get_or_init(std::time::Instant::now)),
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

    #[test]
    fn guest_settings_are_key_value_words_the_vmm_does_not_own() {
        assert!(check_guest_args(&["net.stats=1".into(), "net.tso=0".into()]).is_ok());
        for bad in [
            "net.stats",
            "=1",
            "a=b c",
            "--",
            "-x=1",
            "net.ip=1.2.3.4/24",
            "net.gw=1.1.1.1",
        ] {
            assert!(
                matches!(check_guest_args(&[bad.into()]), Err(Error::BadGuestArg(_))),
                "{bad}"
            );
        }
    }
}
