//! Running a vCPU and handling its exits.
//!
//! KVM_RUN returns on every exit to user space; this module turns each into
//! one of: carry on (a hypercall handled), the guest's orderly end
//! ([`Stop::Exited`]), or a [`GuestFault`] naming what the guest did.
//! Hypercall arguments come from `rdi` through KVM's synced registers, so a
//! hypercall costs one exit and no extra ioctl.
//!
//! Another thread gets the vCPU out of KVM_RUN with a [`Kick`]
//! ([`crate::kick`]): never lost, never repeated.

use std::time::Instant;

use kvm_ioctls::{SyncReg, VcpuExit, VcpuFd};

pub use crate::kick::Kick;

use crate::devices::IoBus;
use crate::devices::{console, uhyve_v1};
use crate::memory::GuestRam;

/// Why the vCPU stopped in good order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// The guest asked to exit with this status.
    Exited(i32),
    /// A signal (SIGINT, SIGTERM) asked Ferry to stop the VM.
    Signalled(i32),
    /// A request is pending: someone called [`Kick::request`].
    Request,
}

/// Something the guest did that ends it.
#[derive(Debug, thiserror::Error)]
pub enum GuestFault {
    /// `out` to a port no device owns.
    #[error("guest wrote {value:#x} to I/O port {port:#x}, which no device owns (rip {rip:#x})")]
    UnknownPortWrite {
        /// Port.
        port: u16,
        /// Value written.
        value: u32,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// `in` from a port no device owns.
    #[error("guest read I/O port {port:#x}, which no device owns (rip {rip:#x})")]
    UnknownPortRead {
        /// Port.
        port: u16,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// Access to a guest-physical address that is neither RAM nor a device.
    #[error("guest {} guest-physical address {addr:#x}, which is neither RAM nor a device (rip {rip:#x})", if *.write { "wrote to" } else { "read from" })]
    Mmio {
        /// Address.
        addr: u64,
        /// Write or read.
        write: bool,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// A uhyve v1 hypercall (a Hermit kernel's) with bad arguments.
    #[error("guest hypercall at rip {rip:#x}: {source}")]
    UhyveV1 {
        /// Guest instruction pointer.
        rip: u64,
        /// What was wrong.
        source: crate::devices::uhyve_v1::Error,
    },
    /// A hypercall with bad arguments.
    #[error("guest hypercall at rip {rip:#x}: {source}")]
    Console {
        /// Guest instruction pointer.
        rip: u64,
        /// What was wrong.
        source: console::Error,
    },
    /// KVM_EXIT_SHUTDOWN: a triple fault.
    #[error("guest triple-faulted (an exception with no usable handler); last rip {rip:#x}")]
    TripleFault {
        /// Guest instruction pointer.
        rip: u64,
    },
    /// KVM could not emulate an instruction.
    #[error(
        "KVM internal error (suberror {suberror}) at rip {rip:#x}: most likely an instruction this KVM cannot emulate; on PVM, guest code must be soft-float (no SSE, x87, XGETBV)"
    )]
    Internal {
        /// KVM's suberror code.
        suberror: u32,
        /// Guest instruction pointer.
        rip: u64,
    },
    /// KVM could not enter the guest.
    #[error("KVM could not enter the guest (hardware entry failure reason {0:#x})")]
    FailEntry(u64),
    /// The guest asked for a reset or power-off through a system event.
    #[error("guest raised system event {0} (reset or crash)")]
    SystemEvent(u32),
    /// An exit kind Ferry does not handle.
    #[error("unexpected KVM exit {0} (rip {1:#x})")]
    Unexpected(String, u64),
}

/// vCPU errors: the host side failed, or the guest misbehaved.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// KVM_RUN itself failed.
    #[error("KVM_RUN: {0}")]
    Run(#[source] kvm_ioctls::Error),
    /// The kick signal's handler could not be installed.
    #[error("cannot install the vCPU kick handler: {0}")]
    KickHandler(#[source] std::io::Error),
    /// The guest misbehaved.
    #[error(transparent)]
    Guest(#[from] GuestFault),
}

/// A vCPU with the devices it reaches by I/O.
#[derive(Debug)]
pub struct Vcpu {
    fd: VcpuFd,
    /// Whether the missing host file system was reported (uhyve v1).
    files_said: bool,
    /// When KVM_RUN last returned: since then no guest instruction ran
    /// (a migration's downtime starts here, not at the request to stop).
    left_guest: Instant,
}

enum Exit {
    Handled,
    Out(u16, u32),
    In(u16),
    Mmio(u64, bool),
    Hlt,
    Intr,
    Shutdown,
    Internal,
    FailEntry(u64),
    SystemEvent(u32),
    Other(String),
}

impl Vcpu {
    /// Wraps a vCPU ready to run.
    pub fn new(fd: VcpuFd) -> Self {
        Vcpu {
            fd,
            files_said: false,
            left_guest: Instant::now(),
        }
    }

    /// When the guest last stopped running (KVM_RUN returned).
    pub fn left_guest(&self) -> Instant {
        self.left_guest
    }

    /// The vCPU fd.
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    fn rip(&self) -> u64 {
        self.fd.get_regs().map(|r| r.rip).unwrap_or(0)
    }

    /// Readies a stopped vCPU for a save and returns its registers and
    /// events, for one ioctl instead of three: a KVM_RUN with
    /// `immediate_exit` set, which enters no guest code (the run loop has
    /// completed any unfinished instruction already; this would complete
    /// one too, as KVM asks before a save) and makes KVM copy them into
    /// `kvm_run` on its way out (KVM_CAP_SYNC_REGS). `None` (the caller
    /// asks with ioctls) if this KVM refuses that, or the run did not
    /// come straight back.
    pub fn settle(&mut self) -> Option<crate::kvm::Synced> {
        for r in [SyncReg::SystemRegister, SyncReg::VcpuEvents] {
            self.fd.set_sync_valid_reg(r);
        }
        self.fd.set_sync_valid_reg(SyncReg::Register);
        self.fd.set_kvm_immediate_exit(1);
        let settled = matches!(self.fd.run(), Err(e) if e.errno() == libc::EINTR);
        self.fd.set_kvm_immediate_exit(0);
        for r in [SyncReg::SystemRegister, SyncReg::VcpuEvents] {
            self.fd.clear_sync_valid_reg(r);
        }
        settled.then(|| {
            let s = self.fd.sync_regs();
            crate::kvm::Synced {
                regs: s.regs,
                sregs: s.sregs,
                events: s.events,
            }
        })
    }

    /// Runs until the guest exits or faults, a signal asks Ferry to stop,
    /// or `kick` has a request pending.
    pub fn run(&mut self, mem: &GuestRam, bus: &mut IoBus, kick: &Kick) -> Result<Stop, Error> {
        let ptr: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        let armed = kick.arm(ptr).map_err(Error::KickHandler)?;
        let r = self.run_loop(mem, bus, kick);
        drop(armed);
        self.fd.set_kvm_immediate_exit(0);
        r
    }

    fn run_loop(&mut self, mem: &GuestRam, bus: &mut IoBus, kick: &Kick) -> Result<Stop, Error> {
        // Whether the last exit's instruction (an `out`, an `in`, an MMIO
        // access, all served here) is unfinished: KVM completes it (moves
        // rip past it, stores what `in` read) only on the next KVM_RUN.
        let mut unfinished = false;
        loop {
            if let Some(sig) = crate::stop::requested() {
                return Ok(Stop::Signalled(sig));
            }
            if kick.pending() {
                if !unfinished {
                    return Ok(Stop::Request);
                }
                // A request may look at the vCPU's state (save it, move
                // it): a KVM_RUN with immediate_exit set first completes
                // the instruction and returns at once, running nothing
                // more. Else a state saved now would carry rip at the
                // `out`, and the VM restored from it would do it twice.
                self.fd.set_kvm_immediate_exit(1);
            }
            self.fd.set_sync_valid_reg(SyncReg::Register);
            // A KVM_RUN with immediate_exit set (by the kick, or above)
            // runs no guest code: the guest last ran before it.
            let enters = self.fd.get_kvm_run().immediate_exit == 0;
            let result = self.fd.run();
            if enters {
                self.left_guest = Instant::now();
            }
            let exit = match result {
                Ok(VcpuExit::IoOut(port, data)) => {
                    if bus.pio_write(port, data) {
                        Exit::Handled
                    } else {
                        let mut v = [0u8; 4];
                        let n = data.len().min(4);
                        v[..n].copy_from_slice(&data[..n]);
                        Exit::Out(port, u32::from_le_bytes(v))
                    }
                }
                Ok(VcpuExit::IoIn(port, data)) => {
                    if bus.pio_read(port, data) {
                        Exit::Handled
                    } else {
                        data.fill(0xFF);
                        Exit::In(port)
                    }
                }
                Ok(VcpuExit::MmioWrite(addr, data)) => {
                    if bus.mmio_write(addr, data) {
                        Exit::Handled
                    } else {
                        Exit::Mmio(addr, true)
                    }
                }
                Ok(VcpuExit::MmioRead(addr, data)) => {
                    if bus.mmio_read(addr, data) {
                        Exit::Handled
                    } else {
                        data.fill(0xFF);
                        Exit::Mmio(addr, false)
                    }
                }
                Ok(VcpuExit::Hlt) => Exit::Hlt,
                Ok(VcpuExit::Intr) => Exit::Intr,
                Ok(VcpuExit::Shutdown) => Exit::Shutdown,
                Ok(VcpuExit::InternalError) => Exit::Internal,
                Ok(VcpuExit::FailEntry(reason, _)) => Exit::FailEntry(reason),
                Ok(VcpuExit::SystemEvent(kind, _)) => Exit::SystemEvent(kind),
                Ok(other) => Exit::Other(format!("{other:?}")),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Intr,
                Err(e) => return Err(Error::Run(e)),
            };
            if matches!(exit, Exit::Intr) {
                // A kick set it; the next KVM_RUN must enter the guest.
                self.fd.set_kvm_immediate_exit(0);
            }
            unfinished = matches!(exit, Exit::Handled | Exit::Out(..));
            if let Some(sig) = crate::stop::requested() {
                return Ok(Stop::Signalled(sig));
            }
            match exit {
                Exit::Handled => {}
                Exit::Out(port, value) => {
                    let rdi = self.fd.sync_regs().regs.rdi;
                    match port {
                        ferry_abi::ports::EXIT => return Ok(Stop::Exited(rdi as u32 as i32)),
                        ferry_abi::ports::SERIAL_WRITE_BUFFER => bus
                            .console
                            .write_buffer(mem, rdi)
                            .map_err(|source| GuestFault::Console {
                                rip: self.rip(),
                                source,
                            })?,
                        ferry_abi::ports::SERIAL_WRITE_BYTE => bus
                            .console
                            .write_byte(rdi as u8)
                            .map_err(|source| GuestFault::Console {
                                rip: self.rip(),
                                source,
                            })?,
                        port if uhyve_v1::owns(port) => {
                            let fd = &self.fd;
                            let outcome = uhyve_v1::handle(
                                port,
                                value,
                                mem,
                                &mut bus.console,
                                || fd.get_sregs().ok().map(|s| s.cr3),
                                &mut self.files_said,
                            )
                            .map_err(|source| GuestFault::UhyveV1 {
                                rip: self.rip(),
                                source,
                            })?;
                            if let uhyve_v1::Outcome::Exit(status) = outcome {
                                return Ok(Stop::Exited(status));
                            }
                        }
                        port => {
                            return Err(GuestFault::UnknownPortWrite {
                                port,
                                value,
                                rip: self.rip(),
                            }
                            .into());
                        }
                    }
                }
                Exit::In(port) => {
                    return Err(GuestFault::UnknownPortRead {
                        port,
                        rip: self.rip(),
                    }
                    .into());
                }
                Exit::Mmio(addr, write) => {
                    return Err(GuestFault::Mmio {
                        addr,
                        write,
                        rip: self.rip(),
                    }
                    .into());
                }
                Exit::Hlt | Exit::Intr => {}
                Exit::Shutdown => return Err(GuestFault::TripleFault { rip: self.rip() }.into()),
                Exit::Internal => {
                    // SAFETY: after KVM_EXIT_INTERNAL_ERROR the `internal`
                    // member of the kvm_run exit union is the valid one.
                    let suberror =
                        unsafe { self.fd.get_kvm_run().__bindgen_anon_1.internal.suberror };
                    return Err(GuestFault::Internal {
                        suberror,
                        rip: self.rip(),
                    }
                    .into());
                }
                Exit::FailEntry(reason) => return Err(GuestFault::FailEntry(reason).into()),
                Exit::SystemEvent(kind) => return Err(GuestFault::SystemEvent(kind).into()),
                Exit::Other(what) => return Err(GuestFault::Unexpected(what, self.rip()).into()),
            }
        }
    }
}
