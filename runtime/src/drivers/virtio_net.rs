//! The virtio-net driver: finds the card on PCI, negotiates VERSION_1, MAC
//! and EVENT_IDX (and, where offered, checksum and TCP segmentation
//! offload), sets up one receive and one transmit queue with preallocated
//! buffers, and routes the card's interrupt pin through the IOAPIC.
//!
//! Frames carry the 12-byte virtio-net header.
//!
//! TCP segmentation offload (VIRTIO_NET_F_HOST_TSO4): on PVM every guest
//! instruction is emulated (docs/pvm-emulation.md), and building one TCP
//! segment costs smoltcp about a thousand of them whatever its size, so the
//! driver lets smoltcp build segments of up to [`TSO_PAYLOAD`] bytes and
//! the device cuts them to the peer's MSS, as a NIC with TSO does (how the
//! MSS reaches the device: `ferry_abi::offload`). The link stays a 1500-byte
//! Ethernet.

use alloc::vec::Vec;

use virtio_drivers::transport::pci::PciTransport;
use virtio_drivers::transport::pci::bus::{
    BarInfo, Command, ConfigurationAccess, DeviceFunction, MemoryBarType, PciRoot,
};
use virtio_drivers::transport::{DeviceStatus, DeviceType, Transport};
use virtio_drivers::{BufferDirection, Hal};

use ferry_abi::offload::{MssTable, NEEDS_CSUM, pure_ack, supersedes};

use super::pci::{IdentityHal, PortCam};
use super::virtq::SplitQueue;
use crate::arch::ioapic;

/// The virtio-net header length with VIRTIO_F_VERSION_1.
pub const HDR_LEN: usize = 12;
/// Size of each receive buffer (and transmit buffer without TSO): the
/// header and a full Ethernet frame fit.
pub const BUF_SIZE: usize = 2048;
/// The link's MTU: what the peers' stacks see.
const LINK_MTU: usize = 1500;
/// Largest Ethernet frame (no VLAN tag, no FCS) on the link.
pub const MAX_FRAME: usize = 14 + LINK_MTU;
/// The MSS a TCP peer on the link can take at most (IPv4, no options).
const LINK_MSS: u16 = (LINK_MTU - 40) as u16;
/// With TSO: the most TCP payload smoltcp puts in one frame (an IPv4
/// packet of at most 64 KiB with room for TCP options).
pub const TSO_PAYLOAD: usize = 62 * 1024;
/// With TSO: the largest frame smoltcp builds (Ethernet, IPv4 and TCP
/// headers, options and payload within [`TSO_PAYLOAD`] + 20).
pub const TSO_FRAME: usize = 14 + 20 + 20 + TSO_PAYLOAD;
/// With TSO: transmit buffers (each takes a whole super-frame).
const TSO_BUFFERS: u16 = 48;
/// Queue entries (the device may offer fewer).
const QUEUE_SIZE: u16 = 256;

const F_CSUM: u64 = 1 << 0;
const F_GUEST_CSUM: u64 = 1 << 1;
const F_MAC: u64 = 1 << 5;
const F_HOST_TSO4: u64 = 1 << 11;
const F_EVENT_IDX: u64 = 1 << 29;
const F_VERSION_1: u64 = 1 << 32;

const RX: u16 = 0;
const TX: u16 = 1;

/// Why the card could not be brought up.
#[derive(Debug)]
pub enum Error {
    /// No virtio-net function on PCI bus 0.
    NoDevice,
    /// The transport refused (bad capabilities, BAR unassigned).
    Transport(virtio_drivers::transport::pci::VirtioPciError),
    /// The device lacks a feature the driver needs.
    MissingFeature(&'static str),
    /// The device did not accept the features.
    FeaturesRefused,
    /// Reading the device configuration failed.
    Config,
    /// The device's queues are too small.
    QueueTooSmall(u32),
    /// The interrupt pin has no IOAPIC input.
    NoInterruptRoute(u8),
    /// The BARs cannot be read or placed.
    Bars,
}

impl core::fmt::Display for Error {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Error::NoDevice => write!(
                f,
                "no virtio-net card on PCI bus 0 (did the VMM get --tap?)"
            ),
            Error::Transport(e) => write!(f, "virtio PCI transport: {e}"),
            Error::MissingFeature(what) => write!(f, "the card lacks {what}"),
            Error::FeaturesRefused => write!(f, "the card refused the negotiated features"),
            Error::Config => write!(f, "cannot read the card's configuration"),
            Error::QueueTooSmall(n) => write!(f, "the card's queues hold only {n} entries"),
            Error::NoInterruptRoute(p) => write!(f, "interrupt line {p} has no IOAPIC input"),
            Error::Bars => write!(f, "cannot read or place the card's BARs"),
        }
    }
}

/// A buffer pool: `count` buffers of `size` bytes, buffer `i` at
/// `base + i * size`.
#[derive(Debug)]
struct Buffers {
    base: *mut u8,
    count: u16,
    size: usize,
}

impl Buffers {
    fn new(count: u16, size: usize) -> Self {
        let pages = (usize::from(count) * size).div_ceil(4096);
        let (_, base) = IdentityHal::dma_alloc(pages, BufferDirection::Both);
        Buffers {
            base: base.as_ptr(),
            count,
            size,
        }
    }

    fn addr(&self, id: u16) -> u64 {
        self.base as u64 + u64::from(id) * self.size as u64
    }

    /// Buffer `id`, `len` bytes.
    fn get(&mut self, id: u16, len: usize) -> &mut [u8] {
        assert!(id < self.count && len <= self.size);
        // SAFETY: buffer `id` lies inside the allocation; the caller only
        // asks for buffers the device does not own at the moment.
        unsafe { core::slice::from_raw_parts_mut(self.base.add(usize::from(id) * self.size), len) }
    }
}

/// The receive side: every buffer the device does not hold is being read.
#[derive(Debug)]
pub struct RxHalf {
    q: SplitQueue,
    bufs: Buffers,
    /// A frame taken from the ring to look at, to be handed out next.
    stash: Option<(u16, usize)>,
    /// Pure ACKs dropped because a newer one said all they said.
    pub coalesced: u64,
}

impl RxHalf {
    /// The next received frame: (buffer id, frame length). Of pure ACKs
    /// of one connection that wait in a row, only the newest is handed out
    /// (`ferry_abi::offload::supersedes`).
    pub fn next_frame(&mut self) -> Option<(u16, usize)> {
        let mut cur = match self.stash.take() {
            Some(f) => f,
            None => self.pop_frame()?,
        };
        while let Some(older) = pure_ack(self.frame(cur.0, cur.1)) {
            let Some(next) = self.pop_frame() else {
                break;
            };
            match pure_ack(self.frame(next.0, next.1)) {
                Some(newer) if supersedes(&newer, &older) => {
                    self.recycle(cur.0);
                    self.coalesced += 1;
                    cur = next;
                }
                _ => {
                    self.stash = Some(next);
                    break;
                }
            }
        }
        Some(cur)
    }

    /// The next frame in the used ring.
    fn pop_frame(&mut self) -> Option<(u16, usize)> {
        loop {
            let (id, len) = self.q.pop_used()?;
            let len = len as usize;
            if len > HDR_LEN && len <= BUF_SIZE {
                return Some((id, len - HDR_LEN));
            }
            // A zero or bogus length (the frame did not fit): give it back.
            self.recycle(id);
        }
    }

    /// The frame in buffer `id`.
    pub fn frame(&mut self, id: u16, len: usize) -> &mut [u8] {
        &mut self.bufs.get(id, HDR_LEN + len)[HDR_LEN..]
    }

    /// Returns buffer `id` to the device.
    pub fn recycle(&mut self, id: u16) {
        let addr = self.bufs.addr(id);
        self.q.push(id, addr, BUF_SIZE as u32, true);
    }
}

/// The transmit side: buffers free to fill, and those the device holds.
#[derive(Debug)]
pub struct TxHalf {
    q: SplitQueue,
    bufs: Buffers,
    free: Vec<u16>,
    /// TCP/UDP checksums are left to the device (VIRTIO_NET_F_CSUM), and
    /// received ones are checked by it (VIRTIO_NET_F_GUEST_CSUM).
    offload: bool,
    /// With TSO negotiated: the peers' MSS.
    tso: Option<MssTable>,
}

impl TxHalf {
    /// Takes back the buffers the device has sent.
    pub fn reap(&mut self) {
        while let Some((id, _)) = self.q.pop_used() {
            self.free.push(id);
        }
    }

    /// Whether a buffer is free (after [`reap`](Self::reap)).
    pub fn can_send(&self) -> bool {
        !self.free.is_empty()
    }

    /// Fills a free buffer with a `len`-byte frame through `f` and queues it.
    /// `None` if no buffer is free or `len` is too large.
    pub fn send<R>(&mut self, len: usize, f: impl FnOnce(&mut [u8]) -> R) -> Option<R> {
        if len > self.max_frame() {
            return None;
        }
        let id = self.free.pop()?;
        let offload = self.offload;
        let buf = self.bufs.get(id, HDR_LEN + len);
        buf[..HDR_LEN].fill(0);
        let r = f(&mut buf[HDR_LEN..]);
        if offload {
            let (hdr, frame) = buf.split_at_mut(HDR_LEN);
            if let Some(tso) = &self.tso
                && !tso.prepare_tx(hdr, frame, MAX_FRAME)
            {
                // Too large and not TCP: nothing can cut it down.
                self.free.push(id);
                return Some(r);
            }
            partial_checksum(hdr, frame);
        }
        let addr = self.bufs.addr(id);
        self.q.push(id, addr, (HDR_LEN + len) as u32, false);
        Some(r)
    }

    /// Whether checksums are offloaded to the device.
    pub fn offload(&self) -> bool {
        self.offload
    }

    /// Whether the card cuts large TCP frames (TSO negotiated).
    pub fn tso(&self) -> bool {
        self.tso.is_some()
    }

    /// The largest frame [`send`](Self::send) takes.
    pub fn max_frame(&self) -> usize {
        if self.tso() { TSO_FRAME } else { MAX_FRAME }
    }

    /// Looks at a received frame before the stack does: with TSO, a SYN's
    /// MSS is noted and shown to smoltcp as [`TSO_PAYLOAD`].
    pub fn inspect_rx(&mut self, frame: &mut [u8]) {
        if let Some(tso) = &mut self.tso {
            tso.note_syn(frame);
        }
    }

    /// Publishes the queued frames; whether the device wants a kick.
    pub fn publish_needs_kick(&mut self) -> bool {
        self.q.publish();
        self.q.kick_needed()
    }
}

/// For an IPv4 TCP or UDP frame whose checksum field is zero (smoltcp with
/// transmit checksums off): puts the pseudo-header sum there and asks the
/// device to finish the checksum (NEEDS_CSUM, csum_start, csum_offset), as
/// a NIC with checksum offload would.
fn partial_checksum(hdr: &mut [u8], frame: &mut [u8]) {
    if frame.len() < 34 || frame[12..14] != [0x08, 0x00] {
        return;
    }
    let ihl = usize::from(frame[14] & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    let l4 = 14 + ihl;
    let csum_offset = match frame[23] {
        6 => 16,
        17 => 6,
        _ => return,
    };
    if ihl < 20 || total < ihl || 14 + total > frame.len() || l4 + csum_offset + 2 > frame.len() {
        return;
    }
    let word = |i: usize| u32::from(u16::from_be_bytes([frame[i], frame[i + 1]]));
    let mut sum = word(26) + word(28) + word(30) + word(32);
    sum += u32::from(frame[23]) + (total - ihl) as u32;
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    hdr[0] = NEEDS_CSUM;
    hdr[6..8].copy_from_slice(&(l4 as u16).to_le_bytes());
    hdr[8..10].copy_from_slice(&(csum_offset as u16).to_le_bytes());
    frame[l4 + csum_offset..l4 + csum_offset + 2].copy_from_slice(&(sum as u16).to_be_bytes());
}

/// The IOAPIC input of `df`'s INTx#. On a PC with a PIIX3/PIIX4 ISA
/// bridge (QEMU's `pc` machine), the bridge's PIRQ router decides where
/// PCI interrupts go, and lightweight firmware (qboot) may leave it off:
/// the driver routes the device's PIRQ to the interrupt line itself, as a
/// BIOS would. Ferry's VMM has no bridge; its line is the IOAPIC pin.
fn route_intx(root: &mut PciRoot<PortCam>, df: DeviceFunction) -> u8 {
    let reg = PortCam.read_word(df, 0x3C);
    let mut line = (reg & 0xFF) as u8;
    let pin = ((reg >> 8) & 0xFF) as u8;
    if line == 0 || line >= 16 {
        line = 11;
        PortCam.write_word(df, 0x3C, (reg & !0xFF) | u32::from(line));
    }
    let bridge = root
        .enumerate_bus(0)
        .find(|(_, info)| info.vendor_id == 0x8086 && matches!(info.device_id, 0x7000 | 0x7110));
    if let (Some((isa, _)), 1..=4) = (bridge, pin) {
        // PIIX: slot s, pin p (1 = INTA#) use PIRQ[(s - 1 + p - 1) mod 4];
        // PIRQRC[A..D] are the bytes at 0x60..0x63.
        let pirq = (u32::from(df.device) + u32::from(pin) + 2) % 4;
        let mut rc = PortCam.read_word(isa, 0x60);
        rc = (rc & !(0xFF << (8 * pirq))) | (u32::from(line) << (8 * pirq));
        PortCam.write_word(isa, 0x60, rc);
    }
    line
}

/// Where the driver places memory BARs that firmware left unassigned
/// (QEMU's qboot assigns 32-bit BARs only): inside the PCI hole below
/// 4 GiB on a PC, above Ferry's own BAR.
const BAR_WINDOW: (u64, u64) = (0xE100_0000, 0xFE00_0000);

/// Gives every unassigned memory BAR of `df` an address in [`BAR_WINDOW`].
fn assign_bars(root: &mut PciRoot<PortCam>, df: DeviceFunction) -> Result<(), Error> {
    let mut next = BAR_WINDOW.0;
    let bars = root.bars(df).map_err(|_| Error::Bars)?;
    for (i, bar) in bars.iter().enumerate() {
        let Some(BarInfo::Memory {
            address,
            size,
            address_type,
            ..
        }) = bar
        else {
            continue;
        };
        if *address != 0 || *size == 0 {
            continue;
        }
        let at = next.next_multiple_of((*size).max(4096));
        if at + size > BAR_WINDOW.1 {
            return Err(Error::Bars);
        }
        match address_type {
            MemoryBarType::Width64 => root.set_bar_64(df, i as u8, at),
            _ => root.set_bar_32(df, i as u8, at as u32),
        }
        next = at + size;
    }
    Ok(())
}

/// The card.
pub struct NetCard {
    transport: PciTransport,
    mac: [u8; 6],
    /// Receive side.
    pub rx: RxHalf,
    /// Transmit side.
    pub tx: TxHalf,
    irq_line: u8,
}

impl core::fmt::Debug for NetCard {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NetCard")
            .field("mac", &self.mac)
            .field("irq_line", &self.irq_line)
            .finish()
    }
}

impl NetCard {
    /// Finds and starts the first virtio-net card on PCI bus 0.
    /// Finds and starts the card; `tso`: use segmentation offload if the
    /// card offers it.
    pub fn probe(tso: bool) -> Result<NetCard, Error> {
        let mut root = PciRoot::new(PortCam);
        let mut found = None;
        for (df, info) in root.enumerate_bus(0) {
            if virtio_drivers::transport::pci::virtio_device_type(&info)
                == Some(DeviceType::Network)
            {
                found = Some(df);
                break;
            }
        }
        let df = found.ok_or(Error::NoDevice)?;
        let irq_line = route_intx(&mut root, df);
        assign_bars(&mut root, df)?;
        let (_, cmd) = root.get_status_command(df);
        root.set_command(df, cmd | Command::MEMORY_SPACE | Command::BUS_MASTER);
        let transport =
            PciTransport::new::<IdentityHal, _>(&mut root, df).map_err(Error::Transport)?;
        NetCard::start(transport, irq_line, tso)
    }

    fn start(mut t: PciTransport, irq_line: u8, tso: bool) -> Result<NetCard, Error> {
        t.set_status(DeviceStatus::empty());
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER);
        let offered = t.read_device_features();
        if offered & F_VERSION_1 == 0 {
            return Err(Error::MissingFeature(
                "VIRTIO_F_VERSION_1 (legacy devices are not supported)",
            ));
        }
        if offered & F_MAC == 0 {
            return Err(Error::MissingFeature("a MAC address (VIRTIO_NET_F_MAC)"));
        }
        let mut wanted = F_VERSION_1 | F_MAC | (offered & (F_EVENT_IDX | F_CSUM | F_GUEST_CSUM));
        if wanted & (F_CSUM | F_GUEST_CSUM) == F_CSUM | F_GUEST_CSUM && tso {
            wanted |= offered & F_HOST_TSO4;
        }
        t.write_driver_features(wanted);
        t.set_status(DeviceStatus::ACKNOWLEDGE | DeviceStatus::DRIVER | DeviceStatus::FEATURES_OK);
        if !t.get_status().contains(DeviceStatus::FEATURES_OK) {
            return Err(Error::FeaturesRefused);
        }
        let mac: [u8; 6] = t.read_config_space(0).map_err(|_| Error::Config)?;

        let max = t.max_queue_size(RX).min(t.max_queue_size(TX));
        if max < 16 {
            return Err(Error::QueueTooSmall(max));
        }
        let size = QUEUE_SIZE.min(1 << (31 - max.leading_zeros()).min(15));
        let rxq = SplitQueue::new(size);
        let txq = SplitQueue::new(size);
        for (idx, q) in [(RX, &rxq), (TX, &txq)] {
            let (d, a, u) = q.addresses();
            t.queue_set(idx, u32::from(size), d as _, a as _, u as _);
        }
        let mut rx = RxHalf {
            q: rxq,
            bufs: Buffers::new(size, BUF_SIZE),
            stash: None,
            coalesced: 0,
        };
        let offload = wanted & (F_CSUM | F_GUEST_CSUM) == F_CSUM | F_GUEST_CSUM;
        let tso = wanted & F_HOST_TSO4 != 0;
        let (tx_count, tx_size) = if tso {
            (
                TSO_BUFFERS.min(size),
                (HDR_LEN + TSO_FRAME).next_multiple_of(64),
            )
        } else {
            (size, BUF_SIZE)
        };
        let tx = TxHalf {
            q: txq,
            bufs: Buffers::new(tx_count, tx_size),
            free: (0..tx_count).rev().collect(),
            offload,
            tso: tso.then(|| MssTable::new(TSO_PAYLOAD as u16, LINK_MSS)),
        };
        for id in 0..size {
            rx.recycle(id);
        }
        rx.q.publish();
        rx.q.suppress_interrupts();
        tx.q.suppress_interrupts();
        t.finish_init();

        ioapic::mask_pic();
        if !ioapic::route(irq_line) {
            return Err(Error::NoInterruptRoute(irq_line));
        }
        // The pin is edge-triggered: a level INTx# (QEMU) raised before the
        // route existed would never give an edge. Reading the ISR lowers it.
        let _ = t.ack_interrupt();
        let mut card = NetCard {
            transport: t,
            mac,
            rx,
            tx,
            irq_line,
        };
        card.flush();
        Ok(card)
    }

    /// The two queues and the transport, borrowed apart.
    pub fn split(&mut self) -> (&mut RxHalf, &mut TxHalf, &mut PciTransport) {
        (&mut self.rx, &mut self.tx, &mut self.transport)
    }

    /// Sends one frame outside smoltcp (the gratuitous ARP); false if the
    /// transmit queue is full.
    pub fn send_raw(&mut self, frame: &[u8]) -> bool {
        self.tx.reap();
        let sent = self
            .tx
            .send(frame.len(), |b| b.copy_from_slice(frame))
            .is_some();
        self.flush();
        sent
    }

    /// The IOAPIC input of the card's interrupt.
    pub fn irq_line(&self) -> u8 {
        self.irq_line
    }

    /// The card's MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// Publishes what both queues hold and notifies the device where it
    /// asked to be.
    pub fn flush(&mut self) {
        self.rx.q.publish();
        if self.rx.q.kick_needed() {
            self.transport.notify(RX);
        }
        self.tx.q.publish();
        if self.tx.q.kick_needed() {
            self.transport.notify(TX);
        }
    }

    /// Before halting: asks for an interrupt on the next received frame
    /// if `rx` (else received frames wait for the halt's timer), and on the
    /// next sent one if the transmit queue is full. Returns false if there
    /// is work already (then do not halt).
    pub fn arm(&mut self, rx: bool) -> bool {
        // A frame set aside by ACK coalescing is work too.
        let pending = self.rx.stash.is_some() || (rx && self.rx.q.want_interrupt());
        let tx_pending = !self.tx.can_send() && self.tx.q.want_interrupt();
        !(pending || tx_pending)
    }

    /// After a wake-up: acknowledges the interrupt and goes back to
    /// polling without interrupts.
    pub fn disarm(&mut self, interrupted: bool) {
        // Reading the ISR deasserts a level-triggered INTx# (QEMU). Ferry
        // delivers edges through an irqfd, and the read would be one more
        // exit (~36 us on PVM) per interrupt.
        if interrupted && crate::platform::current() != crate::Platform::Ferry {
            let _ = self.transport.ack_interrupt();
        }
        self.rx.q.suppress_interrupts();
        self.tx.q.suppress_interrupts();
    }
}
