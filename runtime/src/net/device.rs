//! smoltcp's view of the card: tokens over the driver's preallocated
//! buffers, no copies besides smoltcp's own into and out of them.

use smoltcp::phy::{self, Checksum, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::transport::Transport;
use virtio_drivers::transport::pci::PciTransport;

use crate::drivers::virtio_net::{NetCard, RxHalf, TxHalf};

/// A received frame.
pub struct RxToken<'a> {
    rx: &'a mut RxHalf,
    id: u16,
    len: usize,
}

/// Room for one frame to send.
pub struct TxToken<'a> {
    tx: &'a mut TxHalf,
    transport: &'a mut PciTransport,
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(self.rx.frame(self.id, self.len));
        self.rx.recycle(self.id);
        r
    }
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        self.tx.reap();
        let mut f = Some(f);
        if let Some(r) = self.tx.send(len, |buf| (f.take().expect("once"))(buf)) {
            // Published at once, so the device sends this frame while
            // smoltcp builds the next (each takes ~1 ms of emulated guest
            // instructions); a kick only where EVENT_IDX asks for one.
            if self.tx.publish_needs_kick() {
                self.transport.notify(1);
            }
            return r;
        }
        // No buffer free (only possible for a reply token handed out with a
        // received frame): the frame is built and dropped, as a full NIC
        // queue would; TCP retransmits.
        let mut scratch = alloc::vec![0u8; len.min(self.tx.max_frame())];
        (f.take().expect("once"))(&mut scratch)
    }
}

impl phy::Device for NetCard {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(&mut self, _: Instant) -> Option<(RxToken<'_>, TxToken<'_>)> {
        let (rx, tx, transport) = self.split();
        let (id, len) = rx.next_frame()?;
        tx.inspect_rx(rx.frame(id, len));
        Some((RxToken { rx, id, len }, TxToken { tx, transport }))
    }

    fn transmit(&mut self, _: Instant) -> Option<TxToken<'_>> {
        let (_, tx, transport) = self.split();
        tx.reap();
        tx.can_send().then_some(TxToken { tx, transport })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = self.tx.max_frame();
        if self.tx.offload() {
            // The device fills in and checks TCP/UDP checksums: the guest,
            // whose every instruction is emulated on PVM, never sums a
            // payload (docs/pvm-emulation.md).
            caps.checksum.tcp = Checksum::None;
            caps.checksum.udp = Checksum::None;
        }
        caps
    }
}
