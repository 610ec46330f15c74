//! virtio-net over PCI, backed by a tap.
//!
//! Two halves:
//! - [`VirtioNet`], on the vCPU thread: the PCI function, the transport
//!   registers (feature negotiation, queue setup, status), the MAC in the
//!   device configuration. On DRIVER_OK it checks the guest's queues and
//!   hands them to the worker.
//! - the worker thread ([`worker`]): waits in epoll on the tap and on the
//!   queues' ioeventfds, moves frames between them, and interrupts the guest
//!   through an irqfd only when the guest's `used_event` asks for it
//!   (VIRTIO_F_EVENT_IDX), once per batch.
//!
//! The guest cannot make the device touch memory outside guest RAM: every
//! ring and buffer access goes through vm-memory's bounds checks (in
//! `virtio-queue`), descriptor chains are bounded by the queue size, and a
//! queue set up badly (size not a power of two, rings outside RAM) is refused
//! at DRIVER_OK with DEVICE_NEEDS_RESET and a line on stderr naming the fault.

pub mod announce;
pub mod csum;
pub mod guard;
pub mod tap;
mod worker;

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EFD_NONBLOCK, EventFd};

use super::{F_EVENT_IDX, F_VERSION_1, bar, common, status};
use crate::devices::pci::{ConfigSpace, PciFunction, reg};
use crate::memory::GuestRam;
use tap::Tap;

/// virtio device type of a network card.
pub const DEVICE_TYPE: u16 = 1;
/// Largest queue size offered.
pub const QUEUE_MAX: u16 = 256;
/// Feature bit: the device takes frames with a partial checksum (NEEDS_CSUM).
pub const F_CSUM: u64 = 1 << 0;
/// Feature bit: the driver takes frames with a partial or verified checksum.
pub const F_GUEST_CSUM: u64 = 1 << 1;
/// Feature bit: the device has a MAC address in its configuration.
pub const F_MAC: u64 = 1 << 5;
/// Feature bit: the device takes TCP/IPv4 frames larger than the MTU and
/// cuts them into segments (TSO; the tap's kernel side does the cutting).
pub const F_HOST_TSO4: u64 = 1 << 11;
/// Feature bit: the device configuration has a link status.
pub const F_STATUS: u64 = 1 << 16;
/// What the device offers.
pub const DEVICE_FEATURES: u64 =
    F_VERSION_1 | F_EVENT_IDX | F_MAC | F_STATUS | F_CSUM | F_GUEST_CSUM | F_HOST_TSO4;
/// Queue indices.
const RX: usize = 0;
const TX: usize = 1;
/// Device configuration: mac[6], status u16, max_virtqueue_pairs u16.
const DEVICE_CONFIG_LEN: u32 = 24;
/// Link status "up".
const LINK_UP: u16 = 1;

/// Errors creating the device.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The tap.
    #[error(transparent)]
    Tap(#[from] tap::Error),
    /// An eventfd.
    #[error("virtio-net: eventfd: {0}")]
    EventFd(#[source] std::io::Error),
    /// Registering an ioeventfd or irqfd with KVM.
    #[error("virtio-net: {what}: {source}")]
    Kvm {
        /// Which registration.
        what: &'static str,
        /// The ioctl error.
        source: kvm_ioctls::Error,
    },
    /// Starting the worker thread.
    #[error("virtio-net: cannot start the device thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Where and how the device is placed.
#[derive(Clone, Debug)]
pub struct NetConfig {
    /// The tap to attach to.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address (the only source address it may send
    /// from).
    pub ip: [u8; 4],
    /// Guest-physical address of the BAR.
    pub bar_addr: u32,
    /// The IOAPIC pin (GSI) of the device's INTx#.
    pub gsi: u32,
}

/// Counters the device keeps (read by `ferry status`, benchmarks and tests).
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames delivered to the guest.
    pub rx_frames: AtomicU64,
    /// Frames sent by the guest.
    pub tx_frames: AtomicU64,
    /// Frames sent by the guest that the device cut into segments (TSO).
    pub tx_gso_frames: AtomicU64,
    /// Frames dropped: too large for the guest's buffer, malformed, a bad
    /// checksum, or the device was not running.
    pub dropped: AtomicU64,
    /// Interrupts raised.
    pub interrupts: AtomicU64,
    /// Frames captured while the VM was not running yet.
    pub captured: AtomicU64,
    /// Captured frames dropped as duplicates of one already captured.
    pub duplicates: AtomicU64,
    /// Frames the guest sent that were refused: from another MAC or
    /// address, not IPv4 or ARP, or with offload fields that do not match
    /// their headers.
    pub tx_refused: AtomicU64,
}

/// Most bytes of frames waiting in the backlog (held for a receive
/// buffer, or captured while the VM does not run).
pub const MAX_BACKLOG_BYTES: usize = 64 << 20;

/// What the worker works on, under one lock.
#[derive(Debug, Default)]
struct Active {
    /// The queues while the driver is running (DRIVER_OK), else `None`.
    queues: Option<[Queue; 2]>,
    /// Frames (with their virtio-net header) waiting for receive buffers,
    /// oldest first.
    backlog: std::collections::VecDeque<Vec<u8>>,
    /// While a migration's destination may be capturing: digests of the
    /// frames read from the tap here, so that it can drop its copies.
    recorded: Option<Vec<u64>>,
    /// Digests of the frames captured since the device last delivered
    /// (duplicates are kept once).
    seen: std::collections::HashSet<u64>,
    /// The features in force on the tap: the driver's, once the worker
    /// has set the tap's offloads for them (frames both ways are formatted
    /// by these).
    tap_features: u64,
    /// At a migration's destination, once the state is loaded: digests of
    /// frames the source read (its [`NetState::overlap`]) not yet matched
    /// by a captured copy, with their counts. Every frame captured until
    /// the VM runs is checked against it, so none reaches the guest twice.
    overlap: std::collections::HashMap<u64, usize>,
    /// A frame for the tap once the VM runs again (see
    /// [`VirtioNet::resume`]), with its virtio-net header.
    announce: Option<Vec<u8>>,
    /// The worker's raised priority until its first pass after a resume
    /// (see [`VirtioNet::resume`]); the worker drops it.
    resumed: Option<crate::sched::Urgent>,
}

/// State shared by the vCPU thread and the worker.
#[derive(Debug, Default)]
struct Shared {
    active: Mutex<Active>,
    /// The VM is paused: the worker touches neither memory nor queues.
    paused: AtomicBool,
    /// While paused, read the tap into the backlog (a VM about to run here).
    capture: AtomicBool,
    /// Discard what the tap holds before the next step: frames that
    /// queued while nobody read them (see [`VirtioNet::pause`] and
    /// [`VirtioNet::discard_waiting`]).
    flush: AtomicBool,
    /// ISR status: bit 0 = queue interrupt. A read by the guest clears it.
    isr: AtomicU8,
    /// The features the driver accepted (valid while `queues` is `Some`).
    features: AtomicU64,
    /// Set to end the worker.
    stop: AtomicBool,
    stats: Stats,
    /// The worker's kernel thread id (0 until it starts).
    worker_tid: AtomicI32,
}

/// One queue's registers as the guest sets them up.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueConfig {
    /// Size (entries).
    pub size: u16,
    /// Enabled.
    pub ready: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub driver: u64,
    /// Used ring.
    pub device: u64,
}

impl QueueConfig {
    fn reset() -> Self {
        QueueConfig {
            size: QUEUE_MAX,
            ..Default::default()
        }
    }
}

/// The vCPU-thread half of the device.
#[derive(Debug)]
pub struct VirtioNet {
    pci: ConfigSpace,
    mac: [u8; 6],
    bar_addr: u64,
    device_feature_select: u32,
    driver_feature_select: u32,
    driver_features: u64,
    status: u8,
    queue_select: u16,
    queues: [QueueConfig; 2],
    mem: GuestRam,
    shared: Arc<Shared>,
    wake: EventFd,
    worker: Option<std::thread::JoinHandle<()>>,
    /// The tap, for frames the VMM sends on the guest's behalf, and for
    /// the capture pass of [`VirtioNet::pause`].
    tap: Tap,
    /// A frame's room, for that pass.
    buf: Vec<u8>,
}

impl VirtioNet {
    /// Opens the tap, registers the notify ioeventfds and the irqfd with
    /// KVM, and starts the worker thread.
    pub fn new(config: &NetConfig, vm: &VmFd, mem: &GuestRam) -> Result<Self, Error> {
        let tap = Tap::open(&config.tap)?;
        let own_tap = tap.try_clone().map_err(Error::EventFd)?;
        let efd = || EventFd::new(EFD_NONBLOCK).map_err(Error::EventFd);
        let (rx_kick, tx_kick, irq, wake) = (efd()?, efd()?, efd()?, efd()?);
        let bar_addr = u64::from(config.bar_addr);
        for (q, fd) in [(RX, &rx_kick), (TX, &tx_kick)] {
            let addr = bar_addr + bar::NOTIFY + q as u64 * u64::from(bar::NOTIFY_MULTIPLIER);
            vm.register_ioevent(fd, &IoEventAddress::Mmio(addr), NoDatamatch)
                .map_err(|source| Error::Kvm {
                    what: "KVM_IOEVENTFD",
                    source,
                })?;
        }
        vm.register_irqfd(&irq, config.gsi)
            .map_err(|source| Error::Kvm {
                what: "KVM_IRQFD",
                source,
            })?;

        let mut pci = ConfigSpace::new(super::PCI_VENDOR, super::pci_device_id(DEVICE_TYPE));
        pci.set8(reg::REVISION, 1);
        pci.set8(reg::CLASS + 2, 0x02); // network controller
        pci.set16(reg::SUBSYSTEM_VENDOR_ID, super::PCI_VENDOR);
        pci.set16(reg::SUBSYSTEM_ID, 0x40);
        pci.set_memory_bar64(0, u64::from(config.bar_addr), u64::from(bar::SIZE));
        pci.set8(reg::INTERRUPT_LINE, config.gsi as u8);
        pci.set8(reg::INTERRUPT_PIN, 1);
        super::add_capabilities(&mut pci, DEVICE_CONFIG_LEN);

        let shared = Arc::new(Shared::default());
        let w = worker::Worker::new(
            tap,
            guard::Identity {
                mac: config.mac,
                ip: config.ip,
            },
            mem.clone(),
            shared.clone(),
            irq,
            rx_kick,
            tx_kick,
            wake.try_clone().map_err(Error::EventFd)?,
        )
        .map_err(Error::EventFd)?;
        let worker =
            crate::lockdown::spawn(crate::lockdown::Role::Net, "ferry-net", move || w.run())
                .map_err(Error::Thread)?;
        Ok(VirtioNet {
            pci,
            mac: config.mac,
            bar_addr,
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: [QueueConfig::reset(); 2],
            mem: mem.clone(),
            shared,
            wake,
            worker: Some(worker),
            tap: own_tap,
            buf: vec![0; worker::MAX_FRAME],
        })
    }

    /// The device's counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Whether `addr` falls in the device's BAR; if so, its offset.
    pub fn bar_offset(&self, addr: u64) -> Option<u64> {
        (addr >= self.bar_addr && addr < self.bar_addr + u64::from(bar::SIZE))
            .then(|| addr - self.bar_addr)
    }

    fn selected(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(usize::from(self.queue_select))
    }

    /// An MMIO read at `off` in the BAR.
    pub fn mmio_read(&mut self, off: u64, data: &mut [u8]) {
        data.fill(0);
        match off {
            o if o < bar::ISR => self.common_read(o, data),
            o if o < bar::ISR + 4 => {
                // Reading the ISR clears it (and, on real INTx#, deasserts
                // the line; irqfd delivers edges, so there is nothing more).
                let isr = self.shared.isr.swap(0, Ordering::AcqRel);
                if o == bar::ISR {
                    data[0] = isr;
                }
            }
            o if (bar::DEVICE..bar::DEVICE + u64::from(DEVICE_CONFIG_LEN)).contains(&o) => {
                // The whole virtio_net_config (virtio 1.2, 5.1.4): mac,
                // status, max_virtqueue_pairs, mtu, speed (unknown), duplex
                // (unknown), and no RSS. Drivers that map the structure
                // (RustyHermit's) need all of it. `mtu` means nothing
                // without VIRTIO_NET_F_MTU, which Ferry does not offer,
                // but RustyHermit 0.11 sizes its buffers from it all the
                // same (receive: that many bytes; send: less than that),
                // so it says the largest Ethernet frame, 1518 bytes.
                let mut cfg = [0u8; DEVICE_CONFIG_LEN as usize];
                cfg[..6].copy_from_slice(&self.mac);
                cfg[6..8].copy_from_slice(&LINK_UP.to_le_bytes());
                cfg[8..10].copy_from_slice(&1u16.to_le_bytes());
                cfg[10..12].copy_from_slice(&1518u16.to_le_bytes());
                cfg[12..16].copy_from_slice(&u32::MAX.to_le_bytes());
                cfg[16] = 0xFF;
                let start = (o - bar::DEVICE) as usize;
                for (k, d) in data.iter_mut().enumerate() {
                    *d = cfg.get(start + k).copied().unwrap_or(0);
                }
            }
            _ => {}
        }
    }

    fn common_read(&mut self, off: u64, data: &mut [u8]) {
        let features = match self.device_feature_select {
            0 => DEVICE_FEATURES & 0xFFFF_FFFF,
            1 => DEVICE_FEATURES >> 32,
            _ => 0,
        };
        let q = self
            .queues
            .get(usize::from(self.queue_select))
            .copied()
            .unwrap_or_default();
        let (size, notify_off) = if usize::from(self.queue_select) < self.queues.len() {
            (q.size, self.queue_select)
        } else {
            (0, 0)
        };
        let driver_features = match self.driver_feature_select {
            0 => self.driver_features & 0xFFFF_FFFF,
            1 => self.driver_features >> 32,
            _ => 0,
        };
        use common::*;
        let regs = [
            (
                DEVICE_FEATURE_SELECT,
                4,
                u64::from(self.device_feature_select),
            ),
            (DEVICE_FEATURE, 4, features),
            (
                DRIVER_FEATURE_SELECT,
                4,
                u64::from(self.driver_feature_select),
            ),
            (DRIVER_FEATURE, 4, driver_features),
            (CONFIG_MSIX_VECTOR, 2, u64::from(NO_VECTOR)),
            (NUM_QUEUES, 2, self.queues.len() as u64),
            (DEVICE_STATUS, 1, u64::from(self.status)),
            (CONFIG_GENERATION, 1, 0),
            (QUEUE_SELECT, 2, u64::from(self.queue_select)),
            (QUEUE_SIZE, 2, u64::from(size)),
            (QUEUE_MSIX_VECTOR, 2, u64::from(NO_VECTOR)),
            (QUEUE_ENABLE, 2, u64::from(q.ready)),
            (QUEUE_NOTIFY_OFF, 2, u64::from(notify_off)),
            (QUEUE_DESC, 8, q.desc),
            (QUEUE_DRIVER, 8, q.driver),
            (QUEUE_DEVICE, 8, q.device),
        ];
        super::read_registers(&regs, off, data);
    }

    /// An MMIO write at `off` in the BAR.
    pub fn mmio_write(&mut self, off: u64, data: &[u8]) {
        if off >= bar::ISR {
            if off >= bar::NOTIFY {
                // A notify the ioeventfd did not catch: kick the worker.
                self.wake.write(1).ok();
            }
            return;
        }
        use common::*;
        let merge =
            |old: u64, start: u64, width: u64| super::merge_write(old, start, width, off, data);
        let live = self.status & status::DRIVER_OK != 0;
        match off {
            o if o < DEVICE_FEATURE => {
                self.device_feature_select = merge(
                    u64::from(self.device_feature_select),
                    DEVICE_FEATURE_SELECT,
                    4,
                ) as u32
            }
            o if (DRIVER_FEATURE_SELECT..DRIVER_FEATURE).contains(&o) => {
                self.driver_feature_select = merge(
                    u64::from(self.driver_feature_select),
                    DRIVER_FEATURE_SELECT,
                    4,
                ) as u32
            }
            o if (DRIVER_FEATURE..CONFIG_MSIX_VECTOR).contains(&o) => {
                if self.status & status::FEATURES_OK != 0 {
                    return;
                }
                let shift = match self.driver_feature_select {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                let cur = (self.driver_features >> shift) & 0xFFFF_FFFF;
                let new = merge(cur, DRIVER_FEATURE, 4);
                self.driver_features =
                    (self.driver_features & !(0xFFFF_FFFF << shift)) | (new << shift);
            }
            DEVICE_STATUS => self.write_status(data[0]),
            o if (QUEUE_SELECT..QUEUE_SIZE).contains(&o) => {
                self.queue_select = merge(u64::from(self.queue_select), QUEUE_SELECT, 2) as u16
            }
            _ if live => {}
            o if (QUEUE_SIZE..QUEUE_MSIX_VECTOR).contains(&o) => {
                if let Some(q) = self.selected() {
                    q.size = merge(u64::from(q.size), QUEUE_SIZE, 2) as u16;
                }
            }
            o if (QUEUE_ENABLE..QUEUE_NOTIFY_OFF).contains(&o) => {
                if let Some(q) = self.selected() {
                    q.ready = merge(u64::from(q.ready), QUEUE_ENABLE, 2) & 1 == 1;
                }
            }
            o if (QUEUE_DESC..QUEUE_DRIVER).contains(&o) => {
                if let Some(q) = self.selected() {
                    q.desc = merge(q.desc, QUEUE_DESC, 8);
                }
            }
            o if (QUEUE_DRIVER..QUEUE_DEVICE).contains(&o) => {
                if let Some(q) = self.selected() {
                    q.driver = merge(q.driver, QUEUE_DRIVER, 8);
                }
            }
            o if (QUEUE_DEVICE..QUEUE_DEVICE + 8).contains(&o) => {
                if let Some(q) = self.selected() {
                    q.device = merge(q.device, QUEUE_DEVICE, 8);
                }
            }
            _ => {}
        }
    }

    fn write_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        let mut new = new;
        if new & status::FEATURES_OK != 0 && self.status & status::FEATURES_OK == 0 {
            let unknown = self.driver_features & !DEVICE_FEATURES;
            if unknown != 0 || self.driver_features & F_VERSION_1 == 0 {
                // Refused: FEATURES_OK does not stick, as the spec says.
                new &= !status::FEATURES_OK;
            }
        }
        if new & status::DRIVER_OK != 0 && self.status & status::DRIVER_OK == 0 {
            match self.activate() {
                Ok(()) => {}
                Err(why) => {
                    eprintln!(
                        "ferry: virtio-net: the guest's queue setup is unusable: {why}; device needs reset"
                    );
                    new = (new & !status::DRIVER_OK) | status::NEEDS_RESET;
                }
            }
        }
        self.status = new;
    }

    /// Builds the live queues from the registers and hands them to the worker.
    fn activate(&mut self) -> Result<(), String> {
        if self.status & status::FEATURES_OK == 0 {
            return Err("DRIVER_OK without FEATURES_OK".into());
        }
        let event_idx = self.driver_features & F_EVENT_IDX != 0;
        let mut built = Vec::with_capacity(2);
        for (i, c) in self.queues.iter().enumerate() {
            built.push(build_queue(i, c, event_idx, &self.mem)?);
        }
        let queues: [Queue; 2] = built.try_into().map_err(|_| "two queues".to_string())?;
        let mut guard = self.shared.active.lock().expect("net state lock");
        self.shared
            .features
            .store(self.driver_features, Ordering::Release);
        guard.queues = Some(queues);
        drop(guard);
        self.wake.write(1).ok();
        Ok(())
    }

    fn reset(&mut self) {
        let mut guard = self.shared.active.lock().expect("net state lock");
        guard.queues = None;
        guard.backlog.clear();
        drop(guard);
        self.shared.isr.store(0, Ordering::Release);
        self.status = 0;
        self.driver_features = 0;
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.queue_select = 0;
        self.queues = [QueueConfig::reset(); 2];
    }
}

fn build_queue(
    i: usize,
    c: &QueueConfig,
    event_idx: bool,
    mem: &GuestRam,
) -> Result<Queue, String> {
    let name = if i == RX { "receive" } else { "transmit" };
    if !c.ready {
        return Err(format!("{name} queue not enabled"));
    }
    let mut q = Queue::new(QUEUE_MAX).map_err(|e| format!("{name} queue: {e}"))?;
    q.try_set_size(c.size).map_err(|_| {
        format!(
            "{name} queue size {} (must be a power of two up to {QUEUE_MAX})",
            c.size
        )
    })?;
    q.try_set_desc_table_address(GuestAddress(c.desc))
        .and_then(|()| q.try_set_avail_ring_address(GuestAddress(c.driver)))
        .and_then(|()| q.try_set_used_ring_address(GuestAddress(c.device)))
        .map_err(|_| format!("{name} queue: misaligned ring address"))?;
    q.set_event_idx(event_idx);
    q.set_ready(true);
    if !q.is_valid(mem) {
        return Err(format!(
            "{name} queue rings (desc {:#x}, avail {:#x}, used {:#x}, size {}) are not inside guest memory",
            c.desc, c.driver, c.device, c.size
        ));
    }
    Ok(q)
}

/// A queue's saved position (with [`QueueConfig`] it rebuilds the queue).
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct QueuePosition {
    /// Next available-ring entry the device will read.
    pub next_avail: u16,
    /// Next used-ring entry the device will write.
    pub next_used: u16,
}

/// A queue's registers as the driver set them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct QueueState {
    /// Size (entries).
    pub size: u16,
    /// Enabled.
    pub ready: bool,
    /// Descriptor table.
    pub desc: u64,
    /// Available ring.
    pub driver: u64,
    /// Used ring.
    pub device: u64,
}

impl From<QueueConfig> for QueueState {
    fn from(q: QueueConfig) -> Self {
        QueueState {
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        }
    }
}

impl From<QueueState> for QueueConfig {
    fn from(q: QueueState) -> Self {
        QueueConfig {
            size: q.size,
            ready: q.ready,
            desc: q.desc,
            driver: q.driver,
            device: q.device,
        }
    }
}

/// The device's saved state: everything the guest can observe, and the
/// frames waiting for it. Plain data, apart from the live device.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NetState {
    /// The MAC address.
    pub mac: [u8; 6],
    /// The PCI configuration space (command register, interrupt line).
    pub pci_config: Vec<u8>,
    /// Feature selectors and the driver's features.
    pub device_feature_select: u32,
    /// Driver feature selector.
    pub driver_feature_select: u32,
    /// Features the driver accepted.
    pub driver_features: u64,
    /// Device status.
    pub status: u8,
    /// Selected queue.
    pub queue_select: u16,
    /// Queue registers, RX then TX.
    pub queues: Vec<QueueState>,
    /// Live queue positions while the driver runs (empty otherwise).
    pub positions: Vec<QueuePosition>,
    /// ISR status.
    pub isr: u8,
    /// Frames waiting for receive buffers (with their virtio-net header).
    pub backlog: Vec<Vec<u8>>,
    /// Digests (XXH3 of the frame after its header) of the frames this
    /// card read while the destination of a migration was capturing: the
    /// destination drops its captured copies of them.
    pub overlap: Vec<u64>,
}

/// Errors restoring the device.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// Creating the device.
    #[error(transparent)]
    Create(#[from] Error),
    /// The saved state is inconsistent.
    #[error("saved virtio-net state: {0}")]
    Bad(String),
}

impl VirtioNet {
    /// Stops the worker from touching guest memory or the queues; returns
    /// once it is out of its current batch. With `capture`, the tap goes
    /// on being read into the backlog (for a VM about to run here, or a
    /// migration's source, which must carry what arrived before the
    /// destination captured): this thread makes the first pass itself,
    /// so every frame the tap held is in the backlog when it returns, and
    /// the worker makes the later ones. (No hand-off to the worker and
    /// back: this is on a migration's pause.) A device that was paused
    /// without capturing first discards what queued in its tap meanwhile
    /// (frames of a time it did not claim; a source VM got them).
    pub fn pause(&mut self, capture: bool) {
        // The worker processes a batch under this lock and checks `paused`
        // after taking it: once we hold it, no batch is running, and the
        // next sees the new flags (and a tap already emptied here).
        let mut guard = self.shared.active.lock().expect("net state lock");
        let was_paused = self.shared.paused.load(Ordering::Acquire);
        let was_capturing = self.shared.capture.load(Ordering::Acquire);
        self.shared.capture.store(capture, Ordering::Release);
        self.shared.paused.store(true, Ordering::Release);
        if capture {
            let stats = &self.shared.stats;
            if was_paused && !was_capturing {
                worker::discard_tap(&self.tap, &mut self.buf, stats);
            }
            worker::capture(&self.tap, &mut self.buf, &mut guard, stats);
        }
        drop(guard);
        // The worker looks at the tap on its own timer while capturing.
        self.wake.write(1).ok();
    }

    /// Drops the frames waiting in the tap, unread, before the worker next
    /// delivers: a migration's destination that does not capture uses it,
    /// so the VM gets only frames that arrived once it runs here.
    pub fn discard_waiting(&mut self) {
        // Nothing the tap gives from now on can be a frame the source
        // read (it is paused): no check against its digests, and no
        // capture pass for them when the VM resumes (one would count the
        // frames of a late first pass as captured).
        self.shared
            .active
            .lock()
            .expect("net state lock")
            .overlap
            .clear();
        self.shared.flush.store(true, Ordering::Release);
        self.wake.write(1).ok();
    }

    /// Lets the worker run again (delivering any backlog first). A card
    /// that was capturing at a migration's destination still holds the
    /// source's digests: the worker's first pass checks the frames left
    /// in the tap against them before the guest gets any, then drops
    /// them. Nothing here waits for the worker: this is on the pause's
    /// critical path.
    ///
    /// `announce`, a frame (the VM's gratuitous ARP after it moved), goes
    /// to the tap as if the guest had sent it, from the worker: the tap's
    /// write runs the host's bridge inline, which the pause need not wait
    /// for.
    ///
    /// The worker is raised to the caller's priority until that first
    /// pass: else, woken onto the core of a vCPU thread that is real-time
    /// for the stop-and-copy, it could wait there a scheduler tick or two
    /// (0.5-1.9 ms measured) while captured frames wait for it.
    pub fn resume(&mut self, announce: Option<&[u8]>) {
        // Raised before the lock is taken (its system calls need none).
        let tid = self.shared.worker_tid.load(Ordering::Acquire);
        let raised = (tid != 0).then(|| crate::sched::Urgent::thread(tid));
        {
            let mut active = self.shared.active.lock().expect("net state lock");
            if let Some(frame) = announce {
                let mut f = vec![0u8; tap::VNET_HDR_LEN];
                f.extend_from_slice(frame);
                active.announce = Some(f);
            }
            active.resumed = raised;
        }
        self.shared.capture.store(false, Ordering::Release);
        self.shared.paused.store(false, Ordering::Release);
        self.wake.write(1).ok();
    }

    /// Starts recording the digests of frames read from the tap (before a
    /// migration's destination starts capturing; see [`NetState::overlap`]).
    pub fn start_recording(&mut self) {
        debug_assert!(!self.recording());
        self.shared.active.lock().expect("net state lock").recorded = Some(Vec::new());
    }

    /// Whether frame digests are being recorded (a migration is under way).
    pub fn recording(&self) -> bool {
        self.shared
            .active
            .lock()
            .expect("net state lock")
            .recorded
            .is_some()
    }

    /// Stops recording (a migration that failed).
    pub fn stop_recording(&mut self) {
        self.shared.active.lock().expect("net state lock").recorded = None;
    }

    /// Loads `state` into this (paused) device. Frames it captured so far
    /// stay, after the saved backlog (which is older).
    fn load_state(&mut self, mem: &GuestRam, state: &NetState) -> Result<(), RestoreError> {
        let bad = |m: &str| RestoreError::Bad(m.to_string());
        if state.queues.len() != 2 || !(state.positions.is_empty() || state.positions.len() == 2) {
            return Err(bad("wrong number of queues"));
        }
        if state.pci_config.len() != 256 {
            return Err(bad("PCI configuration space is not 256 bytes"));
        }
        let backlog_bytes: usize = state.backlog.iter().map(Vec::len).sum();
        if backlog_bytes > MAX_BACKLOG_BYTES
            || state.backlog.iter().any(|f| f.len() > worker::MAX_FRAME)
        {
            return Err(bad("backlog too large"));
        }
        if state.driver_features & !DEVICE_FEATURES != 0 {
            return Err(bad("driver features this device does not offer"));
        }
        if state.mac != self.mac {
            return Err(bad("the saved MAC is not this card's"));
        }
        let mut queues = None;
        if !state.positions.is_empty() {
            if state.status & status::DRIVER_OK == 0 {
                return Err(bad("live queues without DRIVER_OK"));
            }
            let event_idx = state.driver_features & F_EVENT_IDX != 0;
            let mut built = Vec::with_capacity(2);
            for (i, (&qs, p)) in state.queues.iter().zip(&state.positions).enumerate() {
                let c = QueueConfig::from(qs);
                let mut q = build_queue(i, &c, event_idx, mem).map_err(RestoreError::Bad)?;
                q.set_next_avail(p.next_avail);
                q.set_next_used(p.next_used);
                built.push(q);
            }
            queues = Some(built.try_into().map_err(|_| bad("two queues"))?);
        }
        self.pci.restore_writable(&state.pci_config);
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.queue_select = state.queue_select;
        for (q, &qs) in self.queues.iter_mut().zip(&state.queues) {
            *q = QueueConfig::from(qs);
        }
        if state.overlap.len() > 1 << 20 {
            return Err(bad("overlap list too long"));
        }
        let mut active = self.shared.active.lock().expect("net state lock");
        active.queues = queues;
        let captured = std::mem::take(&mut active.backlog);
        active.backlog = state.backlog.iter().cloned().collect();
        // Captured frames the source read too (it was still running when
        // they arrived) are already in the guest or in its backlog; so are
        // any still waiting in this tap, which later capture passes check
        // against what is left of the list.
        active.overlap.clear();
        // Sized once (this runs in the pause; growing rehashes).
        active.overlap.reserve(state.overlap.len());
        for h in &state.overlap {
            *active.overlap.entry(*h).or_default() += 1;
        }
        let mut dropped = 0u64;
        for f in captured {
            let h = xxhash_rust::xxh3::xxh3_64(&f[tap::VNET_HDR_LEN.min(f.len())..]);
            if take_overlap(&mut active.overlap, h) {
                dropped += 1;
            } else {
                active.backlog.push_back(f);
            }
        }
        self.shared
            .stats
            .duplicates
            .fetch_add(dropped, Ordering::Relaxed);
        drop(active);
        self.shared.isr.store(state.isr, Ordering::Release);
        self.shared
            .features
            .store(state.driver_features, Ordering::Release);
        self.wake.write(1).ok();
        Ok(())
    }
}

/// Whether `digest` is one of the source's frames still unmatched (and
/// matches it off).
fn take_overlap(overlap: &mut std::collections::HashMap<u64, usize>, digest: u64) -> bool {
    match overlap.get_mut(&digest) {
        Some(n) if *n > 0 => {
            *n -= 1;
            true
        }
        _ => false,
    }
}

/// What restoring the card needs besides its state: the card itself,
/// already on this host's tap (paused and capturing since before the state
/// arrived, see [`VirtioNet::pause`]), and guest memory.
#[derive(Debug)]
pub struct NetRestore<'a> {
    /// The card, created for the VM being brought in.
    pub card: VirtioNet,
    /// Guest memory.
    pub mem: &'a GuestRam,
}

impl crate::devices::Persist for VirtioNet {
    type State = NetState;
    type Args<'a> = NetRestore<'a>;
    type Error = RestoreError;

    /// The saved state. The device must be paused.
    fn save(&self) -> NetState {
        let active = self.shared.active.lock().expect("net state lock");
        NetState {
            mac: self.mac,
            pci_config: self.pci.bytes().to_vec(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            queue_select: self.queue_select,
            queues: self.queues.iter().map(|q| QueueState::from(*q)).collect(),
            positions: active
                .queues
                .iter()
                .flatten()
                .map(|q| QueuePosition {
                    next_avail: q.next_avail(),
                    next_used: q.next_used(),
                })
                .collect(),
            isr: self.shared.isr.load(Ordering::Acquire),
            backlog: active.backlog.iter().cloned().collect(),
            overlap: active.recorded.clone().unwrap_or_default(),
        }
    }

    fn restore(args: NetRestore<'_>, state: &NetState) -> Result<Self, RestoreError> {
        let NetRestore { mut card, mem } = args;
        card.load_state(mem, state)?;
        Ok(card)
    }
}

impl PciFunction for VirtioNet {
    fn config(&self) -> &ConfigSpace {
        &self.pci
    }
    fn config_mut(&mut self) -> &mut ConfigSpace {
        &mut self.pci
    }
}

impl Drop for VirtioNet {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.wake.write(1).ok();
        if let Some(w) = self.worker.take() {
            w.join().ok();
        }
    }
}
