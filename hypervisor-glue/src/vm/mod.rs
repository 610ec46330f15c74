//! A VM: guest memory, the KVM machine, the boot vCPU, its devices and the
//! guest clock, created from an image (or brought in from a snapshot or a
//! migration, [`incoming`]) and run to its end, serving the typed commands
//! of its [`Mailbox`] on the vCPU thread on the way. Where it is in its
//! life on this host (running, paused, being moved, gone) is its
//! [`crate::lifecycle::Lifecycle`].

pub mod incoming;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::elf::Kind;
use crate::boot::{self, BootParams};
use crate::clock::{ClockState, GuestClock};
use crate::control::{
    After, Command, KvmCounters, Mailbox, NetStatus, Reply, Responder, SnapshotReport,
    SourceContext, Status,
};
use crate::devices::console::Console;
use crate::devices::virtio::net::{self, NetConfig, VirtioNet};
use crate::devices::{IoBus, Persist};
use crate::kvm::{self, Machine};
use crate::lifecycle::{Effect, Event, Lifecycle};
use crate::memory::{self, GuestRam};
use crate::net::NetSettings;
use crate::snapshot::{ConfigState, Identity, Snapshot, VmState};
use crate::trace::Trace;
use crate::vcpu::{self, Stop, Vcpu};
pub use incoming::Incoming;

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
    /// The VM's identity (`None`: a new random one). Given by a fleet's
    /// agent, which starts the VM its record names.
    pub id: Option<crate::id::VmId>,
    /// The generation it boots at (0 unless an agent restarts a VM from
    /// its image: its record's next generation).
    pub generation: u64,
}

/// How a VM ended here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum End {
    /// The guest exited with this status.
    Exited(i32),
    /// A control request stopped it (after a final snapshot, say).
    Stopped,
    /// It moved to another host, where it runs at `generation`.
    Moved {
        /// Where.
        to: String,
        /// Its generation there.
        generation: u64,
    },
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
    /// A snapshot or migrated state that is well-formed but cannot be this VM.
    #[error("{0}")]
    BadState(String),
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
    /// The stopped clock while the vCPU does not run.
    paused: Option<ClockState>,
    lifecycle: Lifecycle,
    identity: Identity,
    /// The CPU features the guest booted with.
    cpu: kvm::CpuFeatures,
    /// What a snapshot records of the configuration.
    config: ConfigState,
    /// The tap of the card on this host.
    tap: Option<String>,
    tsc_khz: u32,
    /// When the VM started running in this process.
    started: Option<Instant>,
    mem: GuestRam,
}

impl std::fmt::Debug for Vm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vm")
            .field("config", &self.config)
            .field("lifecycle", &self.lifecycle)
            .finish()
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

/// The command line of a RustyHermit image: its name (std's first
/// argument), the network settings as Hermit reads them (`-ip`, `-mask`,
/// `-gateway`), guest settings as environment variables (`env=KEY=VALUE`),
/// then the application's arguments after `--`.
pub fn hermit_cmdline(config: &VmConfig) -> Result<String, Error> {
    let name = config
        .image
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| {
            !n.is_empty()
                && !n
                    .chars()
                    .any(|c| c.is_whitespace() || c == '\'' || c == '"' || c == '\\')
        })
        .unwrap_or_else(|| "app".into());
    let mut words = vec![name];
    if let Some(n) = &config.net {
        words.extend(n.hermit_args());
    }
    words.extend(config.guest_args.iter().map(|a| format!("env={a}")));
    cmdline(&words, &config.app_args)
}

/// The card on `tap` for a VM with these network settings.
fn card(
    settings: &NetSettings,
    machine: &Machine,
    mem: &GuestRam,
) -> Result<VirtioNet, net::Error> {
    VirtioNet::new(
        &NetConfig {
            tap: settings.tap.clone(),
            mac: settings.mac.0,
            ip: settings.ip.addr.octets(),
            bar_addr: NET_BAR_ADDR,
            gsi: NET_GSI,
        },
        &machine.vm,
        mem,
    )
}

/// A paused VM whose vCPU has settled ([`Vm::settle`]): what the rest of
/// its save needs.
struct Settled {
    /// The guest clock it paused at.
    clock: ClockState,
    /// The registers KVM handed back as the vCPU settled.
    synced: Option<kvm::Synced>,
}

impl Vm {
    /// Reads the image, maps memory, creates the VM and loads the image.
    /// The VM gets a new identity, at generation 0.
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
        let ferry_cmdline = cmdline(&runtime_args, &config.app_args)?;
        let image = read_image(&config.image)?;
        let kind = boot::elf::Image::parse(&image)
            .map(|i| i.kind())
            .map_err(|e| Error::Boot {
                path: config.image.clone(),
                source: e.into(),
            })?;
        let cmdline = match kind {
            Kind::Ferry => ferry_cmdline,
            Kind::Hermit => {
                eprintln!(
                    "ferry: {} is a RustyHermit image (std Rust on hermit-kernel): settings go to it as Hermit's arguments and environment",
                    config.image.display()
                );
                hermit_cmdline(config)?
            }
        };
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
        // On PVM the guest switches to native mode first thing, on our
        // word, unless it was told not to.
        let pvm_native = kvm::cpu_mode(&fd) != kvm::CpuMode::Hardware
            && !config.guest_args.iter().any(|a| a == "pvm.native=0");
        let params = BootParams {
            cmdline: &cmdline,
            tsc_khz,
            cpus: config.cpus,
            pvm_native,
            has_pci: config.net.is_some(),
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
        let cpu = kvm::host_cpu_features(&machine.kvm)?;
        trace.mark("registers, clock");
        let net = match &config.net {
            Some(n) => {
                let existed = net::tap::exists(&n.tap);
                let dev = card(n, &machine, &mem)?;
                trace.mark("virtio-net");
                if !existed && net::tap::bridge(&n.tap).is_none() {
                    eprintln!(
                        "ferry: WARNING: tap {} did not exist in this network namespace: Ferry created it, on no bridge, so the VM is unreachable until you bridge or route it (did you mean to run this in another namespace, `ip netns exec NS ...`?)",
                        n.tap
                    );
                }
                if kind == Kind::Hermit {
                    kvm::route_ioapic_pin(&machine.vm, NET_GSI, 0x20 + NET_GSI as u8)?;
                }
                Some(dev)
            }
            None => None,
        };
        Ok(Vm {
            vcpu: Vcpu::new(fd),
            bus: IoBus::new(console, net),
            machine: Arc::new(machine),
            on_running: None,
            clock,
            // Not running yet: `run` starts it.
            paused: None,
            lifecycle: Lifecycle::Running,
            identity: Identity {
                id: config.id.unwrap_or_else(crate::id::VmId::random).0,
                generation: config.generation,
            },
            cpu,
            config: ConfigState {
                memory: config.memory,
                cpus: config.cpus,
                image: config.image.display().to_string(),
                kernel: match kind {
                    Kind::Ferry => 0,
                    Kind::Hermit => 1,
                },
                net: config.net.as_ref().map(NetSettings::saved),
            },
            tap: config.net.as_ref().map(|n| n.tap.clone()),
            tsc_khz,
            started: None,
            mem,
        })
    }

    /// Resumes a VM from a snapshot file, on tap `tap` if it has a network
    /// card. The card captures frames for the VM from the moment its tap is
    /// open and delivers them when the VM runs. The VM is left paused, at
    /// the next generation: [`Vm::run`] runs it.
    ///
    /// With `verify_memory` false the memory image's digest is not checked
    /// (header and state always are): restore then costs the same at any
    /// memory size, since memory is mapped, not read. With `key`, the
    /// snapshot's MAC must verify, and the memory is read (copied) rather
    /// than mapped: what was checked is what the guest gets.
    pub fn restore(
        path: &std::path::Path,
        tap: Option<&str>,
        console: Console,
        verify_memory: bool,
        key: Option<&crate::migration::key::Psk>,
    ) -> Result<Vm, Error> {
        let trace = Trace::new();
        let snap = Snapshot::open(path, key.is_some())?;
        trace.mark("read and check state");
        let st = &snap.state;
        incoming::check_layout(&st.config, &st.memory)?;
        let mem = match key {
            None => memory::map_file(&snap.file, snap.header.memory_offset, &st.memory)?,
            Some(k) => {
                let mem = memory::create(st.config.memory)?;
                // SAFETY: the memory was just made; nothing else uses it.
                snap.load_verified(k, &mut unsafe { memory::region_slices_mut(&mem) })?;
                trace.mark("read and verify memory (MAC)");
                mem
            }
        };
        trace.mark("map memory");
        let identity = Identity {
            generation: st.identity.generation.saturating_add(1),
            ..st.identity
        };
        let mut incoming = Incoming::new(&st.config, identity, Some(st.cpu), mem, tap)?;
        incoming.start_capture();
        trace.mark("VM, vCPU, card (capturing)");
        if verify_memory && key.is_none() {
            // SAFETY: nothing runs in this VM yet and the card is paused.
            snap.verify_memory(&unsafe { memory::region_slices(incoming.memory()) })?;
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

    /// Who the VM is.
    pub fn identity(&self) -> Identity {
        self.identity
    }

    /// The card's counters, as `status` gives them.
    pub fn net_status(&self) -> Option<NetStatus> {
        let net = self.bus.net.as_ref()?;
        let st = net.stats();
        let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        let cfg = self.config.net.as_ref()?;
        let settings = NetSettings::from_saved(self.tap.as_deref().unwrap_or(""), cfg).ok()?;
        Some(NetStatus {
            tap: settings.tap,
            mac: settings.mac.to_string(),
            ip: settings.ip.to_string(),
            gateway: settings.gateway.map(|g| g.to_string()),
            rx_frames: g(&st.rx_frames),
            tx_frames: g(&st.tx_frames),
            tx_gso_frames: g(&st.tx_gso_frames),
            dropped: g(&st.dropped),
            interrupts: g(&st.interrupts),
            captured: g(&st.captured),
            duplicates: g(&st.duplicates),
            tx_refused: g(&st.tx_refused),
        })
    }

    /// Frames the card captured for a migration, and how many of them it
    /// dropped as duplicates of what the source read: (0, 0) without a
    /// card. (Read on the pause's path: no strings, unlike
    /// [`Vm::net_status`].)
    pub fn capture_counts(&self) -> (u64, u64) {
        self.bus.net.as_ref().map_or((0, 0), |net| {
            let st = net.stats();
            let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
            (g(&st.captured), g(&st.duplicates))
        })
    }

    /// Drops the frames queued in the card's tap while nothing read it
    /// (a migration's destination that was told not to capture).
    pub fn discard_waiting_frames(&mut self) {
        if let Some(net) = self.bus.net.as_mut() {
            net.discard_waiting();
        }
    }

    /// Stops the guest clock and the devices (the vCPU is already out of
    /// KVM_RUN: only the vCPU thread calls this).
    fn pause_devices(&mut self) {
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
    /// and the devices, and announces the VM's MAC.
    fn resume_devices(&mut self) -> Result<(), Error> {
        if let Some(state) = self.paused.take() {
            self.clock = GuestClock::restore(self.tsc_khz, &state).expect("infallible");
            self.clock.publish(&self.mem)?;
            let announcement = self
                .config
                .net
                .map(|n| net::announce::gratuitous_arp(n.mac, n.ip));
            if let Some(net) = self.bus.net.as_mut() {
                net.resume(announcement.as_ref().map(|f| &f[..]));
            }
        }
        Ok(())
    }

    /// The whole VM's state; it must be paused.
    pub fn save(&mut self) -> Result<VmState, Error> {
        let settled = self.settle()?;
        self.save_settled(&settled)
    }

    /// Completes what the vCPU left unfinished (see
    /// [`Vcpu::settle`](crate::vcpu::Vcpu::settle): an
    /// `in` may still write a register, a string `ins` guest memory);
    /// after it, nothing changes the paused VM's memory. It must be
    /// paused.
    fn settle(&mut self) -> Result<Settled, Error> {
        let clock = self
            .paused
            .ok_or_else(|| Error::BadState("save() of a running VM".into()))?;
        Ok(Settled {
            clock,
            synced: self.vcpu.settle(),
        })
    }

    /// The whole VM's state, once [`Vm::settle`]d.
    fn save_settled(&mut self, settled: &Settled) -> Result<VmState, Error> {
        let mut state = self.save_front(settled)?;
        let rest = kvm::save_vcpu_rest(&self.machine.kvm, self.vcpu.fd())?;
        state.vcpu = state.vcpu.with_rest(rest);
        Ok(state)
    }

    /// The VM's state but the rest of its vCPU's (no vCPU ioctl when it
    /// settled with its registers handed back), once [`Vm::settle`]d.
    fn save_front(&mut self, settled: &Settled) -> Result<VmState, Error> {
        Ok(VmState {
            identity: self.identity,
            config: self.config.clone(),
            memory: self
                .mem
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect(),
            vcpu: kvm::save_vcpu_front(self.vcpu.fd(), settled.synced.as_ref())?,
            cpu: self.cpu,
            irqchip: kvm::save_irqchip(&self.machine.vm)?,
            clock: settled.clock,
            console: self.bus.console.save(),
            net: self.bus.net.as_ref().map(Persist::save),
        })
    }

    /// Writes a snapshot of the paused VM into `file`, signed with `key`
    /// if given; returns its size.
    pub fn snapshot(
        &mut self,
        file: &std::fs::File,
        key: Option<&crate::migration::key::Psk>,
    ) -> Result<u64, Error> {
        let state = self.save()?;
        // SAFETY: the VM is paused (save() checked): the vCPU is out of
        // KVM_RUN on this thread and the card's worker is paused.
        let regions = unsafe { memory::region_slices(&self.mem) };
        Ok(crate::snapshot::write(file, &state, &regions, key)?)
    }

    fn status(&self) -> Status {
        let guest_time_ns = match &self.paused {
            Some(c) => c.guest_ns,
            None => self.clock.now_ns(),
        };
        let mut kvm = KvmCounters::default();
        for (k, v) in kvm::vcpu_stats(self.vcpu.fd()) {
            match k.as_str() {
                "exits" => kvm.exits = v,
                "insn_emulation" => kvm.insn_emulation = v,
                "halt_exits" => kvm.halt_exits = v,
                "irq_injections" => kvm.irq_injections = v,
                _ => {}
            }
        }
        Status {
            state: self.lifecycle.name().into(),
            detail: self.lifecycle.describe(),
            id: self.identity.vm().to_string(),
            generation: self.identity.generation,
            image: self.config.image.clone(),
            kernel: if self.config.kernel == 1 {
                "hermit"
            } else {
                "ferry"
            }
            .into(),
            memory: self.config.memory,
            pid: std::process::id(),
            uptime_s: self
                .started
                .map_or(0.0, |t| (t.elapsed().as_secs_f64() * 1e3).round() / 1e3),
            guest_time_ns,
            cpu_mode: kvm::cpu_mode(self.vcpu.fd()).name().into(),
            kvm,
            net: self.net_status(),
            console_lost_bytes: self.bus.console.lost_bytes(),
            console_dropped_bytes: self.bus.console.dropped_bytes(),
            lockdown: crate::lockdown::describe(),
        }
    }

    /// Applies a lifecycle event and its effect on the vCPU and devices.
    fn transition(&mut self, event: Event) -> Result<Option<End>, String> {
        let effect = self.lifecycle.apply(event)?;
        if self.lifecycle == Lifecycle::Running {
            // No move is under way (any more): the card records nothing.
            if let Some(net) = self.bus.net.as_mut() {
                net.stop_recording();
            }
        }
        match effect {
            Effect::None => Ok(None),
            Effect::Pause => {
                self.pause_devices();
                Ok(None)
            }
            Effect::Resume => self
                .resume_devices()
                .map(|()| None)
                .map_err(|e| format!("cannot resume the VM: {e}")),
            Effect::End => match &self.lifecycle {
                Lifecycle::Gone { to, generation } => Ok(Some(End::Moved {
                    to: to.clone(),
                    generation: *generation,
                })),
                other => unreachable!("End from {other:?}"),
            },
        }
    }

    /// Serves one command; `Some(end)` when the VM ends here. `reply`
    /// takes any answer before the last (which is returned).
    fn handle(&mut self, cmd: Command, reply: &Responder) -> (Reply, Option<End>) {
        let refused = |e: String| (Reply::Refused(e), None);
        match cmd {
            Command::Status => (Reply::Status(Box::new(self.status())), None),
            Command::Pause => match self.transition(Event::Pause) {
                Ok(end) => (Reply::Done, end),
                Err(e) => refused(e),
            },
            Command::Resume => match self.transition(Event::Resume) {
                Ok(end) => (Reply::Done, end),
                Err(e) => refused(e),
            },
            Command::Stop => (Reply::Done, Some(End::Stopped)),
            Command::Snapshot { file, then, key } => {
                if let Err(e) = self.lifecycle.may_snapshot() {
                    return refused(e);
                }
                let t = Instant::now();
                let was_running = self.lifecycle == Lifecycle::Running;
                if was_running {
                    let _ = self.transition(Event::Pause);
                }
                let w = Instant::now();
                let written = self.snapshot(&file, key.as_ref());
                let write_us = w.elapsed().as_micros() as u64;
                let mut end = None;
                let back = |vm: &mut Vm| {
                    if was_running {
                        let _ = vm.transition(Event::Resume);
                    }
                };
                match written {
                    Ok(bytes) => {
                        match then {
                            After::Stop => end = Some(End::Stopped),
                            After::Pause => {}
                            After::Resume => back(self),
                        }
                        let paused_us = if was_running {
                            t.elapsed().as_micros() as u64
                        } else {
                            0
                        };
                        (
                            Reply::Snapshot(SnapshotReport {
                                bytes,
                                paused_us,
                                write_us,
                            }),
                            end,
                        )
                    }
                    Err(e) => {
                        // A failed snapshot leaves the VM as it was.
                        back(self);
                        refused(format!("snapshot failed: {e}"))
                    }
                }
            }
            Command::Lifecycle(event) => {
                let begin = matches!(event, Event::Begin { .. });
                let stop = matches!(event, Event::Stop);
                if stop {
                    Trace::new().mark("vcpu: stop taken");
                }
                let applied = self.transition(event);
                if stop {
                    Trace::new().mark("vcpu: devices paused");
                }
                match applied {
                    // Paused for a migration's copy: once guest memory is
                    // settled, the source gets the state but the vCPU's
                    // rest, sends it and collects the last dirty pages
                    // while this thread reads that rest (an ioctl a part,
                    // ~15 us each here) and the destination loads the
                    // first.
                    Ok(end) if stop => match self.settle().and_then(|s| self.save_front(&s)) {
                        Ok(state) => {
                            reply.early(Reply::Paused {
                                left_guest: self.vcpu.left_guest(),
                                state: Box::new(state),
                            });
                            match kvm::save_vcpu_rest(&self.machine.kvm, self.vcpu.fd()) {
                                Ok(r) => (Reply::Rest(Box::new(r)), end),
                                Err(e) => refused(format!("cannot save the VM's state: {e}")),
                            }
                        }
                        Err(e) => refused(format!("cannot save the VM's state: {e}")),
                    },
                    Ok(end) if begin => (
                        Reply::Migration(Box::new(SourceContext {
                            machine: self.machine.clone(),
                            mem: self.mem.clone(),
                            config: self.config.clone(),
                            identity: self.identity,
                            cpu: self.cpu,
                        })),
                        end,
                    ),
                    Ok(end) => (Reply::Done, end),
                    Err(e) => refused(e),
                }
            }
            Command::Record(on) => {
                if let Some(net) = self.bus.net.as_mut() {
                    if on {
                        net.start_recording();
                    } else {
                        net.stop_recording();
                    }
                }
                (Reply::Done, None)
            }
        }
    }

    /// Serves commands until the vCPU should run again (`None`) or the VM
    /// ends (`Some`). While the vCPU may not run, it waits here.
    fn serve(&mut self, mailbox: &Mailbox) -> Result<Option<End>, Error> {
        loop {
            let wait = if self.lifecycle.runs() {
                Duration::ZERO
            } else {
                Duration::from_millis(50)
            };
            match mailbox.next(wait) {
                Some((cmd, reply)) => {
                    let (answer, end) = self.handle(cmd, &reply);
                    reply.send(answer);
                    if end.is_some() {
                        return Ok(end);
                    }
                }
                None if self.lifecycle.runs() => return Ok(None),
                None => {
                    if let Some(sig) = crate::stop::requested() {
                        return Err(Error::Signalled(sig));
                    }
                }
            }
        }
    }

    /// Runs the guest to its end here, serving `mailbox` on the way (a VM
    /// brought in starts paused and is resumed first). With
    /// `FERRY_STATS=1`, prints the vCPU's non-zero KVM counters afterwards.
    pub fn run(&mut self, mailbox: &Mailbox) -> Result<End, Error> {
        crate::stop::watch(mailbox.kick());
        crate::failpoint::hit("vm-run");
        self.resume_devices()?;
        self.started = Some(Instant::now());
        Trace::new().mark("running");
        mailbox.set_arriving(None);
        if let Some(f) = self.on_running.take() {
            f(self);
        }
        let r = loop {
            if self.lifecycle.runs() {
                match self.vcpu.run(&self.mem, &mut self.bus, mailbox.kick()) {
                    Ok(Stop::Request) => {}
                    Ok(Stop::Exited(status)) => break Ok(End::Exited(status)),
                    Ok(Stop::Signalled(sig)) => break Err(Error::Signalled(sig)),
                    Err(e) => break Err(e.into()),
                }
            }
            match self.serve(mailbox) {
                Ok(None) => {}
                Ok(Some(end)) => break Ok(end),
                Err(e) => break Err(e),
            }
        };
        mailbox.close();
        if std::env::var_os("FERRY_STATS").is_some_and(|v| v == "1") {
            self.print_stats();
        }
        r
    }

    fn print_stats(&self) {
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
        if let Some(n) = self.net_status() {
            eprintln!(
                "ferry: net stats: rx_frames={} tx_frames={} dropped={} interrupts={}",
                n.rx_frames, n.tx_frames, n.dropped, n.interrupts
            );
        }
    }

    /// Releases the VM at the end of the process: the devices (the card's
    /// tap, the console's last output) at once, the KVM VM and guest
    /// memory after the process has exited (see [`crate::teardown`]).
    pub fn end(self) {
        let Vm {
            vcpu,
            bus,
            machine,
            mem,
            ..
        } = self;
        drop(bus);
        if crate::teardown::defer() {
            // The helper holds them; closing and unmapping them here
            // would only do its slow work in this process.
            std::mem::forget((vcpu, machine, mem));
        }
    }

    /// Guest memory (a migration's destination writes the last pages
    /// into it after loading the state).
    pub fn memory(&self) -> &GuestRam {
        &self.mem
    }

    /// Guest time now, in ns since boot.
    pub fn guest_time_ns(&self) -> u64 {
        self.clock.now_ns()
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
