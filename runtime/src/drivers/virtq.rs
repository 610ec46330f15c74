//! A split virtqueue (virtio 1.x 2.7) driven with VIRTIO_F_EVENT_IDX.
//!
//! Every chain is one descriptor, and the caller owns descriptor ids
//! (buffer `i` always travels in descriptor `i`), so there is no free list
//! here. The caller batches: [`SplitQueue::push`] fills ring slots,
//! [`SplitQueue::publish`] makes them visible, [`SplitQueue::kick_needed`]
//! says whether the device asked to be told (its `avail_event`).
//! Interrupts: [`SplitQueue::suppress_interrupts`] while the guest is busy,
//! [`SplitQueue::want_interrupt`] right before it halts.
//!
//! The rings live in one zeroed, page-aligned allocation that the device
//! reads and writes concurrently; all accesses are volatile, with fences
//! where the virtio memory model needs them.

use core::sync::atomic::{Ordering, fence};

use virtio_drivers::{BufferDirection, Hal};

use super::pci::IdentityHal;

const DESC_F_WRITE: u16 = 2;

/// One descriptor (16 bytes).
#[repr(C)]
struct Desc {
    addr: u64,
    len: u32,
    flags: u16,
    next: u16,
}

pub use ferry_abi::virtio_need_event as need_event;

/// A split virtqueue of `size` entries.
#[derive(Debug)]
pub struct SplitQueue {
    size: u16,
    base: *mut u8,
    pages: usize,
    avail_off: usize,
    used_off: usize,
    /// Next available-ring slot to fill (not yet published).
    avail_idx: u16,
    /// `avail.idx` as last published.
    published: u16,
    /// `avail.idx` when the device was last considered for a kick.
    kicked: u16,
    /// Next used-ring entry to consume.
    last_used: u16,
}

// SAFETY: the queue's memory belongs to it alone (and the device); the
// runtime is single-threaded, and Send only lets the queue live in a static.
unsafe impl Send for SplitQueue {}

impl SplitQueue {
    /// Allocates the rings for `size` entries (a power of two).
    pub fn new(size: u16) -> Self {
        assert!(size.is_power_of_two());
        let n = usize::from(size);
        let avail_off = 16 * n;
        let used_off = (avail_off + 6 + 2 * n).next_multiple_of(4096);
        let total = used_off + 6 + 8 * n;
        let pages = total.div_ceil(4096);
        let (_, base) = IdentityHal::dma_alloc(pages, BufferDirection::Both);
        SplitQueue {
            size,
            base: base.as_ptr(),
            pages,
            avail_off,
            used_off,
            avail_idx: 0,
            published: 0,
            kicked: 0,
            last_used: 0,
        }
    }

    /// Entries.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Guest-physical addresses of the descriptor table, the available
    /// (driver) ring and the used (device) ring.
    pub fn addresses(&self) -> (u64, u64, u64) {
        let b = self.base as u64;
        (b, b + self.avail_off as u64, b + self.used_off as u64)
    }

    fn at<T>(&self, off: usize) -> *mut T {
        debug_assert!(off + size_of::<T>() <= self.pages * 4096);
        // SAFETY: every offset used below is inside the allocation (the
        // layout computed in `new`), and aligned for T by construction.
        unsafe { self.base.add(off).cast() }
    }

    fn ring_slot(&self, idx: u16) -> usize {
        usize::from(idx & (self.size - 1))
    }

    /// Puts buffer `id` (`len` bytes at `addr`; written by the device if
    /// `device_writes`) in the next available slot. Not visible until
    /// [`publish`](Self::publish).
    pub fn push(&mut self, id: u16, addr: u64, len: u32, device_writes: bool) {
        assert!(id < self.size);
        let desc = Desc {
            addr,
            len,
            flags: if device_writes { DESC_F_WRITE } else { 0 },
            next: 0,
        };
        let slot = self.ring_slot(self.avail_idx);
        // SAFETY: descriptor `id` and ring slot `slot` are inside the rings;
        // the device does not read either until the index is published.
        unsafe {
            self.at::<Desc>(16 * usize::from(id)).write_volatile(desc);
            self.at::<u16>(self.avail_off + 4 + 2 * slot)
                .write_volatile(id);
        }
        self.avail_idx = self.avail_idx.wrapping_add(1);
    }

    /// Makes every pushed slot visible to the device.
    pub fn publish(&mut self) {
        if self.avail_idx == self.published {
            return;
        }
        fence(Ordering::Release);
        // SAFETY: avail.idx is inside the ring; the device reads it.
        unsafe {
            self.at::<u16>(self.avail_off + 2)
                .write_volatile(self.avail_idx)
        };
        self.published = self.avail_idx;
    }

    /// Whether the device asked to be notified of what was published since
    /// the last call (its `avail_event` lies in between).
    pub fn kick_needed(&mut self) -> bool {
        if self.published == self.kicked {
            return false;
        }
        // The index store must be visible before the event is read.
        fence(Ordering::SeqCst);
        let n = usize::from(self.size);
        // SAFETY: used.avail_event is the u16 after the used ring.
        let event = unsafe { self.at::<u16>(self.used_off + 4 + 8 * n).read_volatile() };
        let need = need_event(event, self.published, self.kicked);
        self.kicked = self.published;
        need
    }

    fn used_idx(&self) -> u16 {
        // SAFETY: used.idx is inside the ring; the device writes it.
        let idx = unsafe { self.at::<u16>(self.used_off + 2).read_volatile() };
        fence(Ordering::Acquire);
        idx
    }

    /// Whether the device has returned a buffer not yet taken.
    pub fn has_used(&self) -> bool {
        self.used_idx() != self.last_used
    }

    /// Takes the next buffer the device returned: its id and the length it
    /// wrote. An id out of range (a broken device) is skipped.
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        loop {
            if self.used_idx() == self.last_used {
                return None;
            }
            let slot = self.ring_slot(self.last_used);
            // SAFETY: the used element is inside the ring and was written
            // before used.idx (read above with acquire ordering).
            let (id, len) = unsafe {
                (
                    self.at::<u32>(self.used_off + 4 + 8 * slot).read_volatile(),
                    self.at::<u32>(self.used_off + 8 + 8 * slot).read_volatile(),
                )
            };
            self.last_used = self.last_used.wrapping_add(1);
            if id < u32::from(self.size) {
                return Some((id as u16, len));
            }
        }
    }

    fn set_used_event(&self, v: u16) {
        let n = usize::from(self.size);
        // SAFETY: avail.used_event is the u16 after the available ring.
        unsafe { self.at::<u16>(self.avail_off + 4 + 2 * n).write_volatile(v) };
    }

    /// No interrupts for buffers the device returns from now on (until
    /// [`want_interrupt`](Self::want_interrupt)).
    pub fn suppress_interrupts(&self) {
        // The device interrupts when its used index passes used_event; at
        // most `size` buffers are outstanding, so this one is never passed.
        self.set_used_event(self.last_used.wrapping_add(0x8000));
    }

    /// An interrupt for the next buffer the device returns. Returns whether
    /// one is already waiting (then no interrupt will come for it).
    pub fn want_interrupt(&self) -> bool {
        self.set_used_event(self.last_used);
        fence(Ordering::SeqCst);
        self.has_used()
    }
}
