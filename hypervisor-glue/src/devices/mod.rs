//! Devices the guest reaches through I/O exits.
//!
//! Each device keeps its live resources (output streams, fds) apart from its
//! saved state, through one pattern, [`Persist`]: `save()` returns a plain
//! state struct and `restore()` builds the device from one plus the live
//! resources it needs; there is no default, so no device can forget it.
//!
//! [`IoBus`] routes the exits the vCPU loop does not handle itself (the
//! hypercalls) to the device that owns the port or address.

pub mod console;
pub mod pci;
pub mod uhyve_v1;
pub mod virtio;

use console::Console;
use pci::{PciBus, PciFunction};
use virtio::net::VirtioNet;

/// How every device (and the guest clock) is saved and restored.
pub trait Persist: Sized {
    /// The saved state: plain data, never the live device.
    type State;
    /// The live resources restoring needs besides the state (an output
    /// stream, an open tap, guest memory).
    type Args<'a>;
    /// Why a state does not restore.
    type Error;
    /// The device's state now (its VM paused).
    fn save(&self) -> Self::State;
    /// The device, from `state` and the live resources in `args`.
    fn restore(args: Self::Args<'_>, state: &Self::State) -> Result<Self, Self::Error>;
}

/// PCI slot of the virtio-net function (bus 0, function 0).
pub const NET_SLOT: u8 = 1;

/// The devices of one VM.
#[derive(Debug)]
pub struct IoBus {
    /// The console (hypercalls).
    pub console: Console,
    /// PCI configuration mechanism.
    pub pci: PciBus,
    /// The network card, if the VM has one.
    pub net: Option<VirtioNet>,
}

impl IoBus {
    /// A bus with a console and, optionally, a network card.
    pub fn new(console: Console, net: Option<VirtioNet>) -> Self {
        IoBus {
            console,
            pci: PciBus::default(),
            net,
        }
    }

    /// A port read; `false` if no device owns the port.
    pub fn pio_read(&mut self, port: u16, data: &mut [u8]) -> bool {
        if !PciBus::owns_port(port) {
            return false;
        }
        let net = self.net.as_ref();
        self.pci.pio_read(port, data, |slot| {
            net.filter(|_| slot == NET_SLOT)
                .map(|n| n as &dyn PciFunction)
        });
        true
    }

    /// A port write; `false` if no device owns the port.
    pub fn pio_write(&mut self, port: u16, data: &[u8]) -> bool {
        if !PciBus::owns_port(port) {
            return false;
        }
        let net = self.net.as_mut();
        self.pci.pio_write(port, data, |slot| {
            net.filter(|_| slot == NET_SLOT)
                .map(|n| n as &mut dyn PciFunction)
        });
        true
    }

    /// An MMIO read; `false` if no device owns the address.
    pub fn mmio_read(&mut self, addr: u64, data: &mut [u8]) -> bool {
        match self.net.as_mut() {
            Some(net) => match net.bar_offset(addr) {
                Some(off) => {
                    net.mmio_read(off, data);
                    true
                }
                None => false,
            },
            None => false,
        }
    }

    /// An MMIO write; `false` if no device owns the address.
    pub fn mmio_write(&mut self, addr: u64, data: &[u8]) -> bool {
        match self.net.as_mut() {
            Some(net) => match net.bar_offset(addr) {
                Some(off) => {
                    net.mmio_write(off, data);
                    true
                }
                None => false,
            },
            None => false,
        }
    }
}
