//! A VM being brought in, from a snapshot file or a migration: memory,
//! the KVM VM and vCPU, and the network card on this host's tap, set up
//! before the state arrives (every step that can fail on this host), then
//! the state loaded into them.

use std::sync::Arc;

use crate::clock::GuestClock;
use crate::devices::console::Console;
use crate::devices::virtio::net::{NetRestore, VirtioNet};
use crate::devices::{IoBus, Persist};
use crate::kvm::{self, Machine};
use crate::memory::{self, GuestRam};
use crate::net::NetSettings;
use crate::snapshot::{ConfigState, Identity, VmState};
use crate::vcpu::Vcpu;

use super::{Error, Vm, card};
use crate::lifecycle::Lifecycle;

/// Checks that a received or saved memory layout is the one `config` gives.
pub fn check_layout(config: &ConfigState, regions: &[(u64, u64)]) -> Result<(), Error> {
    let expected = memory::ram_ranges(config.memory);
    if regions != expected.as_slice() || config.cpus != 1 {
        return Err(Error::BadState(format!(
            "memory layout {regions:x?} / {} vCPUs is not what {} bytes of memory and 1 vCPU give",
            config.cpus, config.memory
        )));
    }
    if config.kernel > 1 {
        return Err(Error::BadState(format!(
            "kernel kind {} (0 is Ferry's runtime, 1 RustyHermit)",
            config.kernel
        )));
    }
    Ok(())
}

/// Refuses a guest that booted with CPU features `host` lacks, naming
/// them.
pub fn check_cpu(guest: &kvm::CpuFeatures, host: &kvm::CpuFeatures) -> Result<(), Error> {
    let missing = guest.missing_on(host);
    if missing.is_empty() {
        Ok(())
    } else {
        Err(Error::BadState(format!(
            "this host lacks CPU features the guest booted with and may use: {}",
            missing.join(", ")
        )))
    }
}

/// A VM being brought in, before its state is loaded.
pub struct Incoming {
    /// This host's CPU features.
    host: kvm::CpuFeatures,
    mem: GuestRam,
    machine: Machine,
    fd: kvm_ioctls::VcpuFd,
    /// The vCPU's state as created (what need not be set again).
    fresh: kvm::VcpuState,
    tsc_khz: u32,
    net: Option<VirtioNet>,
    tap: Option<String>,
    config: ConfigState,
    identity: Identity,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("config", &self.config)
            .finish()
    }
}

impl Incoming {
    /// Creates the VM around `mem` and opens the card on `tap` (paused).
    /// `identity` is who the VM will be here (its generation is the new
    /// one); `cpu`, when known already, the CPU features it booted with
    /// (checked against this host's before anything else).
    pub fn new(
        config: &ConfigState,
        identity: Identity,
        cpu: Option<kvm::CpuFeatures>,
        mem: GuestRam,
        tap: Option<&str>,
    ) -> Result<Incoming, Error> {
        let machine = kvm::create_machine(&mem)?;
        let host = kvm::host_cpu_features(&machine.kvm)?;
        if let Some(cpu) = cpu {
            check_cpu(&cpu, &host)?;
        }
        let fd = kvm::create_vcpu(&machine, 0)?;
        let tsc_khz = kvm::tsc_khz(&fd)?;
        let fresh = kvm::save_vcpu(&machine.kvm, &fd, None)?;
        let net = match &config.net {
            Some(saved) => {
                let tap = tap.ok_or_else(|| {
                    Error::BadState("the VM has a network card: give --tap".into())
                })?;
                // A VM brought in joins a network that exists: a tap this
                // process would create would be attached to nothing (the
                // command run in the wrong network namespace, say).
                if !crate::devices::virtio::net::tap::exists(tap) {
                    return Err(Error::BadState(format!(
                        "tap {tap} does not exist in this network namespace: create it on the VM's bridge, or run this inside the host's namespace (`ip netns exec NS ...`)"
                    )));
                }
                let settings = NetSettings::from_saved(tap, saved)
                    .map_err(|e| Error::BadState(format!("the VM's network settings: {e}")))?;
                let mut dev = card(&settings, &machine, &mem)?;
                dev.pause(false);
                Some(dev)
            }
            None => None,
        };
        Ok(Incoming {
            host,
            mem,
            machine,
            fd,
            fresh,
            tsc_khz,
            net,
            tap: tap.map(str::to_string),
            config: config.clone(),
            identity,
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

    /// Loads `st` and gives the VM, paused: [`Vm::run`] resumes it. The
    /// state must be the VM announced (identity, configuration) at the
    /// generation before this one.
    pub fn finish(self, st: &VmState, console: Console) -> Result<Vm, Error> {
        self.load(st, console)?.finish(st.vcpu.rest())
    }

    /// Loads `st` but the rest of its vCPU's state (which a migration
    /// sends after it: [`Loading::finish`] takes it): the checks, the
    /// card, the interrupt controllers, the vCPU's segment registers and
    /// registers. The state must be the VM announced (identity,
    /// configuration) at the generation before this one.
    pub fn load(mut self, st: &VmState, console: Console) -> Result<Loading, Error> {
        check_layout(&st.config, &st.memory)?;
        check_cpu(&st.cpu, &self.host)?;
        if st.config != self.config {
            return Err(Error::BadState(
                "the state's configuration is not the one announced".into(),
            ));
        }
        if st.identity.id != self.identity.id
            || st.identity.generation.checked_add(1) != Some(self.identity.generation)
        {
            return Err(Error::BadState(format!(
                "the state is of VM {} generation {}, not the one announced ({} generation {})",
                st.identity.vm(),
                st.identity.generation,
                self.identity.vm(),
                self.identity.generation.wrapping_sub(1)
            )));
        }
        let net = match (&st.net, self.net.take()) {
            (Some(ns), Some(card)) => Some(VirtioNet::restore(
                NetRestore {
                    card,
                    mem: &self.mem,
                },
                ns,
            )?),
            (None, None) => None,
            _ => {
                return Err(Error::BadState(
                    "network card state and configuration disagree".into(),
                ));
            }
        };
        kvm::restore_irqchip(&self.machine.vm, &st.irqchip)?;
        kvm::restore_vcpu_front(&self.fd, &st.vcpu, Some(&self.fresh))?;
        let console = Console::restore(console.into_output(), &st.console).expect("infallible");
        Ok(Loading {
            bus: IoBus::new(console, net),
            vcpu: st.vcpu.front(),
            clock: st.clock,
            cpu: st.cpu,
            incoming: self,
        })
    }
}

/// A VM brought in whose state is loaded but for the rest of its vCPU's
/// ([`Incoming::load`]).
pub struct Loading {
    /// What was set up (its card now in `bus`; its configuration the
    /// state's, as checked).
    incoming: Incoming,
    bus: IoBus,
    /// The vCPU's state loaded so far (its events are set last, with the
    /// rest).
    vcpu: kvm::VcpuState,
    clock: crate::clock::ClockState,
    cpu: kvm::CpuFeatures,
}

impl std::fmt::Debug for Loading {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loading")
            .field("config", &self.incoming.config)
            .finish()
    }
}

impl Loading {
    /// Guest memory, to fill.
    pub fn memory(&self) -> &GuestRam {
        &self.incoming.mem
    }

    /// Loads the rest of the vCPU's state and gives the VM, paused:
    /// [`Vm::run`] resumes it.
    pub fn finish(self, rest: kvm::VcpuRest) -> Result<Vm, Error> {
        let inc = self.incoming;
        let vcpu = self.vcpu.with_rest(rest);
        kvm::restore_vcpu_rest(&inc.machine.kvm, &inc.fd, &vcpu, Some(&inc.fresh))?;
        Ok(Vm {
            vcpu: Vcpu::new(inc.fd),
            bus: self.bus,
            machine: Arc::new(inc.machine),
            on_running: None,
            clock: GuestClock::restore(inc.tsc_khz, &self.clock).expect("infallible"),
            paused: Some(self.clock),
            lifecycle: Lifecycle::Running,
            identity: inc.identity,
            cpu: self.cpu,
            config: inc.config,
            tap: inc.tap,
            tsc_khz: inc.tsc_khz,
            started: None,
            mem: inc.mem,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_host_without_the_guests_features_refuses_it_by_name() {
        let mut host = kvm::CpuFeatures::default();
        host.words[2] = 1 << 5; // avx2
        let mut guest = host;
        assert!(check_cpu(&guest, &host).is_ok());
        guest.words[2] |= 1 << 16; // avx512f
        guest.words[3] |= 1 << 9; // vaes
        guest.words[4] |= 1 << 3; // a bit not checked
        let e = check_cpu(&guest, &host).unwrap_err().to_string();
        assert!(e.contains("avx512f, vaes"), "{e}");
        // Fewer features than the host: fine.
        assert!(check_cpu(&kvm::CpuFeatures::default(), &host).is_ok());
    }
}
