//! The device thread: frames between the tap and the guest's queues.
//!
//! It sleeps in epoll on four fds: the tap (edge-triggered), the receive
//! and transmit queues' ioeventfds (the guest's notifications), and a wake
//! fd the vCPU thread uses after (re)configuring, pausing or resuming the
//! device, or to stop it.
//!
//! Frames wait in the *backlog* (a FIFO in [`Shared`]) when the guest has
//! no receive buffer posted: a frame is never dropped for that reason, and
//! the tap queues the rest. While the device is paused nothing is touched;
//! while it is *capturing* (a restored or incoming VM that does not run
//! yet) frames read from the tap go to the backlog, each distinct frame
//! once, and are delivered in order when the VM runs.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;
use std::sync::atomic::Ordering;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::csum::{self, DATA_VALID, NEEDS_CSUM, Verdict};
use super::tap::{Tap, VNET_HDR_LEN};
use super::{Active, F_CSUM, F_GUEST_CSUM, F_HOST_TSO4, MAX_BACKLOG_BYTES, RX, Shared, Stats, TX};
use crate::memory::GuestRam;
use ferry_abi::offload::{GSO_TCPV4, MIN_GSO_SIZE};

/// Largest frame accepted from either side: a 12-byte header and a
/// 64 KiB packet (the guest's TSO super-frames; received frames are
/// ~1.5 KiB, as the tap never hands over GSO frames).
pub(super) const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;

/// Smallest frame: the header and an Ethernet header.
const MIN_FRAME: usize = VNET_HDR_LEN + 14;

const TAP: u64 = 0;
const RX_KICK: u64 = 1;
const TX_KICK: u64 = 2;
const WAKE: u64 = 3;

pub(super) struct Worker {
    tap: Tap,
    /// What the guest may send as.
    me: super::guard::Identity,
    mem: GuestRam,
    shared: Arc<Shared>,
    irq: EventFd,
    rx_kick: EventFd,
    tx_kick: EventFd,
    wake: EventFd,
    epoll: Epoll,
    buf: Vec<u8>,
}

/// Tap offload flag: the guest takes partially checksummed frames.
const TUN_F_CSUM: libc::c_uint = 0x01;

impl Worker {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        tap: Tap,
        me: super::guard::Identity,
        mem: GuestRam,
        shared: Arc<Shared>,
        irq: EventFd,
        rx_kick: EventFd,
        tx_kick: EventFd,
        wake: EventFd,
    ) -> std::io::Result<Self> {
        let epoll = Epoll::new()?;
        let add = |fd: i32, token: u64, set: EventSet| {
            epoll.ctl(ControlOperation::Add, fd, EpollEvent::new(set, token))
        };
        add(
            tap.as_fd().as_raw_fd(),
            TAP,
            EventSet::IN | EventSet::EDGE_TRIGGERED,
        )?;
        add(rx_kick.as_raw_fd(), RX_KICK, EventSet::IN)?;
        add(tx_kick.as_raw_fd(), TX_KICK, EventSet::IN)?;
        add(wake.as_raw_fd(), WAKE, EventSet::IN)?;
        Ok(Worker {
            tap,
            me,
            mem,
            shared,
            irq,
            rx_kick,
            tx_kick,
            wake,
            epoll,
            buf: vec![0; MAX_FRAME],
        })
    }

    pub(super) fn run(mut self) {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        self.shared.worker_tid.store(tid, Ordering::Release);
        let mut events = vec![EpollEvent::default(); 8];
        loop {
            // While capturing, look at the tap every millisecond too: a
            // capture must not depend on a wakeup alone.
            let capturing = self.shared.paused.load(Ordering::Acquire)
                && self.shared.capture.load(Ordering::Acquire);
            let n = match self.epoll.wait(if capturing { 1 } else { -1 }, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    eprintln!("ferry: virtio-net: epoll: {e}; the device stops");
                    return;
                }
            };
            let (mut rx, mut tx) = (false, false);
            for ev in &events[..n] {
                match ev.data() {
                    TAP => rx = true,
                    RX_KICK => {
                        self.rx_kick.read().ok();
                        rx = true;
                    }
                    TX_KICK => {
                        self.tx_kick.read().ok();
                        tx = true;
                    }
                    _ => {
                        self.wake.read().ok();
                        (rx, tx) = (true, true);
                    }
                }
            }
            if self.shared.stop.load(Ordering::Acquire) {
                return;
            }
            let shared = self.shared.clone();
            let mut guard = shared.active.lock().expect("net state lock");
            let features = shared.features.load(Ordering::Acquire);
            if features != guard.tap_features {
                guard.tap_features = features;
                let offload = if features & F_GUEST_CSUM != 0 {
                    TUN_F_CSUM
                } else {
                    0
                };
                if let Err(e) = self.tap.set_offload(offload) {
                    eprintln!("ferry: virtio-net: {e}");
                }
            }
            if shared.flush.swap(false, Ordering::AcqRel) {
                discard_tap(&self.tap, &mut self.buf, &shared.stats);
            }
            if shared.paused.load(Ordering::Acquire) {
                if shared.capture.load(Ordering::Acquire) {
                    capture(&self.tap, &mut self.buf, &mut guard, &shared.stats);
                }
                continue;
            }
            let active = &mut *guard;
            if let Some(frame) = active.announce.take()
                && let Err(e) = self.tap.write_frame(&frame)
            {
                eprintln!("ferry: virtio-net: announcing the VM's address: {e}");
            }
            // Back to normal once this pass, the first after a resume, is
            // done (the guard restores the worker's priority on drop).
            let _resumed = active.resumed.take();
            let features = active.tap_features;
            if !active.overlap.is_empty() {
                // The first pass after a migration's destination resumed:
                // frames still waiting in the tap are checked against the
                // source's (one last capture pass) before the guest gets
                // any; the list goes with it.
                capture(&self.tap, &mut self.buf, active, &shared.stats);
                active.overlap = Default::default();
            }
            match active.queues.as_mut() {
                Some(queues) => {
                    let mut notify = false;
                    if tx {
                        notify |= self.transmit(&mut queues[TX], features);
                    }
                    if rx {
                        if !active.seen.is_empty() {
                            // A capture window is over; its duplicate
                            // filter goes with it.
                            active.seen = Default::default();
                        }
                        notify |= self.receive(
                            &mut queues[RX],
                            &mut active.backlog,
                            &mut active.recorded,
                            features,
                        );
                    }
                    drop(guard);
                    if notify {
                        self.interrupt();
                    }
                }
                None => {
                    // No driver: the frames go nowhere, as on a real NIC.
                    active.backlog.clear();
                    drop(guard);
                    discard_tap(&self.tap, &mut self.buf, &shared.stats);
                }
            }
        }
    }

    fn interrupt(&self) {
        self.shared.isr.fetch_or(1, Ordering::AcqRel);
        self.shared.stats.interrupts.fetch_add(1, Ordering::Relaxed);
        self.irq.write(1).ok();
    }

    /// Delivers the backlog, then tap frames, into posted receive buffers;
    /// whether the guest wants an interrupt.
    fn receive(
        &mut self,
        q: &mut Queue,
        backlog: &mut std::collections::VecDeque<Vec<u8>>,
        recorded: &mut Option<Vec<u64>>,
        features: u64,
    ) -> bool {
        let mem = &self.mem;
        let stats = &self.shared.stats;
        let mut delivered = false;
        loop {
            let len = match backlog.pop_front() {
                Some(f) => {
                    self.buf[..f.len()].copy_from_slice(&f);
                    f.len()
                }
                None => match self.tap.read_frame(&mut self.buf) {
                    Ok(Some(len)) => {
                        if len < MIN_FRAME || !fix_rx_header(&mut self.buf, len, features) {
                            stats.dropped.fetch_add(1, Ordering::Relaxed);
                            continue;
                        }
                        if let Some(r) = recorded.as_mut() {
                            r.push(xxhash_rust::xxh3::xxh3_64(&self.buf[VNET_HDR_LEN..len]));
                        }
                        len
                    }
                    Ok(None) => break,
                    Err(e) => {
                        eprintln!("ferry: virtio-net: reading tap {}: {e}", self.tap.name());
                        break;
                    }
                },
            };
            let chain = q.pop_descriptor_chain(mem);
            if chain.is_some() && !delivered {
                // While the guest has posted buffers, it need not tell us
                // about more (a driver without EVENT_IDX would otherwise
                // trap once per buffer it posts); when they run out, the
                // branch below asks again.
                let _ = q.disable_notification(mem);
            }
            let Some(chain) = chain else {
                // No buffer: the frame waits at the head of the backlog.
                backlog.push_front(self.buf[..len].to_vec());
                // Ask the guest to notify us when it posts buffers; if it
                // already has, carry on.
                match q.enable_notification(mem) {
                    Ok(true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let used = match chain.writer(mem) {
                Ok(mut w) if w.available_bytes() >= len => match w.write_all(&self.buf[..len]) {
                    Ok(()) => len as u32,
                    Err(_) => 0,
                },
                _ => 0,
            };
            if used == 0 {
                stats.dropped.fetch_add(1, Ordering::Relaxed);
            } else {
                stats.rx_frames.fetch_add(1, Ordering::Relaxed);
            }
            if q.add_used(mem, head, used).is_err() {
                break;
            }
            delivered = true;
        }
        delivered && q.needs_notification(mem).unwrap_or(true)
    }

    /// Sends every frame the guest queued; whether the guest wants an
    /// interrupt.
    fn transmit(&mut self, q: &mut Queue, features: u64) -> bool {
        let mem = &self.mem;
        let stats = &self.shared.stats;
        let mut completed = false;
        loop {
            // No notifications while we are at it (for a driver without
            // EVENT_IDX: one trap per frame otherwise); asked for again
            // once the ring is empty.
            let _ = q.disable_notification(mem);
            while let Some(chain) = q.pop_descriptor_chain(mem) {
                let head = chain.head_index();
                let frame = chain.reader(mem).ok().and_then(|mut r| {
                    let n = r.available_bytes();
                    if !(MIN_FRAME..=MAX_FRAME).contains(&n) {
                        return None;
                    }
                    r.read_exact(&mut self.buf[..n]).ok().map(|()| n)
                });
                let refused = frame
                    .is_some_and(|n| super::guard::check_tx(&mut self.buf[..n], &self.me).is_err());
                if refused {
                    stats.tx_refused.fetch_add(1, Ordering::Relaxed);
                }
                match frame {
                    Some(n) if !refused && fix_tx_header(&mut self.buf, n, features) => {
                        match self.tap.write_frame(&self.buf[..n]) {
                            Ok(_) => {
                                stats.tx_frames.fetch_add(1, Ordering::Relaxed);
                                if self.buf[1] != 0 {
                                    stats.tx_gso_frames.fetch_add(1, Ordering::Relaxed);
                                }
                            }
                            Err(_) => {
                                stats.dropped.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    _ if refused => {}
                    _ => {
                        stats.dropped.fetch_add(1, Ordering::Relaxed);
                    }
                }
                if q.add_used(mem, head, 0).is_err() {
                    return true;
                }
                completed = true;
            }
            match q.enable_notification(mem) {
                Ok(true) => continue,
                _ => break,
            }
        }
        completed && q.needs_notification(mem).unwrap_or(true)
    }
}

/// Makes the header of the received frame in `buf` what the guest
/// negotiated; false if the frame must be dropped (a bad checksum, or a
/// partial checksum pointing outside the frame).
fn fix_rx_header(buf: &mut [u8], len: usize, features: u64) -> bool {
    let flags = buf[0];
    let start = usize::from(u16::from_le_bytes([buf[6], buf[7]]));
    let offset = usize::from(u16::from_le_bytes([buf[8], buf[9]]));
    // No GSO is negotiated, so the GSO fields are cleared whatever the
    // tap says; num_buffers is 1 (no MRG_RXBUF).
    buf[..VNET_HDR_LEN].fill(0);
    buf[10..12].copy_from_slice(&1u16.to_le_bytes());
    if features & F_GUEST_CSUM == 0 {
        // The tap's offloads are off: the kernel completed every
        // checksum before handing the frame over.
        return true;
    }
    let frame = &mut buf[VNET_HDR_LEN..len];
    let valid = if flags & NEEDS_CSUM != 0 {
        // A partial checksum from a sender on this host: complete it
        // (natively, cheap), so guest memory holds a correct frame.
        csum::complete(frame, start, offset)
    } else if flags & DATA_VALID != 0 {
        true
    } else {
        match csum::verify(frame) {
            Verdict::Valid => true,
            Verdict::Invalid => return false,
            Verdict::NotChecked => return true,
        }
    };
    if valid {
        buf[0] = DATA_VALID;
    }
    valid
}

/// Checks the header of a frame the guest sent (in `buf`); false if it
/// asks for something not negotiated or points outside the frame.
fn fix_tx_header(buf: &mut [u8], n: usize, features: u64) -> bool {
    let hdr = &mut buf[..VNET_HDR_LEN];
    let flags = hdr[0];
    let gso_type = hdr[1];
    if features & F_CSUM == 0 || flags & NEEDS_CSUM == 0 {
        hdr.fill(0);
        return true;
    }
    let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
    let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
    let frame_len = n - VNET_HDR_LEN;
    if start >= frame_len || start + offset + 2 > frame_len {
        return false;
    }
    match gso_type {
        0 => hdr[2..6].iter_mut().for_each(|b| *b = 0),
        GSO_TCPV4 if features & F_HOST_TSO4 != 0 => {
            // A TCP super-frame: the tap's kernel side cuts it into
            // segments of gso_size bytes after hdr_len bytes of headers
            // (and checks those further); it must at least lie inside
            // the frame and leave payload to cut.
            let hdr_len = usize::from(u16::from_le_bytes([hdr[2], hdr[3]]));
            let gso_size = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
            if hdr_len <= start || hdr_len >= frame_len || gso_size < usize::from(MIN_GSO_SIZE) {
                return false;
            }
        }
        _ => return false,
    }
    // Passed to the kernel as is: it completes the checksum where one
    // is needed (for traffic between local namespaces, never).
    hdr[0] = NEEDS_CSUM;
    hdr[10..12].iter_mut().for_each(|b| *b = 0);
    true
}

/// Reads and drops every frame waiting in `tap`.
pub(super) fn discard_tap(tap: &Tap, buf: &mut [u8], stats: &Stats) {
    while let Ok(Some(_)) = tap.read_frame(buf) {
        stats.dropped.fetch_add(1, Ordering::Relaxed);
    }
}

/// A capture pass: reads every waiting tap frame into the backlog, each
/// distinct frame once, up to [`MAX_BACKLOG_BYTES`] (recording its digest
/// while a migration's destination may capture it too, and dropping the
/// ones a migration's source already read). The worker makes it, or the
/// thread that pauses the device (either under the `active` lock).
pub(super) fn capture(tap: &Tap, buf: &mut [u8], active: &mut Active, stats: &Stats) {
    let mut bytes: usize = active.backlog.iter().map(Vec::len).sum();
    while let Ok(Some(len)) = tap.read_frame(buf) {
        if len < MIN_FRAME
            || bytes + len > MAX_BACKLOG_BYTES
            || !fix_rx_header(buf, len, active.tap_features)
        {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        let frame = &buf[..len];
        let digest = xxhash_rust::xxh3::xxh3_64(&frame[VNET_HDR_LEN..]);
        if !active.seen.insert(digest) || super::take_overlap(&mut active.overlap, digest) {
            stats.duplicates.fetch_add(1, Ordering::Relaxed);
            continue;
        }
        if let Some(r) = active.recorded.as_mut() {
            r.push(digest);
        }
        stats.captured.fetch_add(1, Ordering::Relaxed);
        bytes += len;
        active.backlog.push_back(frame.to_vec());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A header + frame buffer of `len` frame bytes with a TCP partial
    /// checksum at 34 + 16 and the given GSO fields.
    fn tx(len: usize, gso_type: u8, hdr_len: u16, gso_size: u16) -> Vec<u8> {
        let mut b = vec![0u8; VNET_HDR_LEN + len];
        b[0] = NEEDS_CSUM;
        b[1] = gso_type;
        b[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&34u16.to_le_bytes());
        b[8..10].copy_from_slice(&16u16.to_le_bytes());
        b
    }

    #[test]
    fn gso_frames_pass_only_when_tso_was_negotiated_and_sane() {
        let tso = F_CSUM | F_HOST_TSO4;
        let n = VNET_HDR_LEN + 9000;
        let mut b = tx(9000, GSO_TCPV4, 66, 1448);
        assert!(fix_tx_header(&mut b, n, tso));
        assert_eq!(&b[1..6], &[GSO_TCPV4, 66, 0, 0xA8, 0x05]);
        // Not negotiated, another GSO type, headers outside the frame or
        // before the checksum start, a segment size below the minimum.
        assert!(!fix_tx_header(
            &mut tx(9000, GSO_TCPV4, 66, 1448),
            n,
            F_CSUM
        ));
        assert!(!fix_tx_header(&mut tx(9000, 3, 66, 1448), n, tso));
        assert!(!fix_tx_header(&mut tx(9000, GSO_TCPV4, 9000, 1448), n, tso));
        assert!(!fix_tx_header(&mut tx(9000, GSO_TCPV4, 20, 1448), n, tso));
        assert!(!fix_tx_header(&mut tx(9000, GSO_TCPV4, 66, 10), n, tso));
        // A plain frame has its GSO fields cleared.
        let mut b = tx(1000, 0, 66, 1448);
        assert!(fix_tx_header(&mut b, VNET_HDR_LEN + 1000, tso));
        assert_eq!(&b[1..6], &[0; 5]);
    }
}
