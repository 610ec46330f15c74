//! Virtio 1.x devices over PCI ("modern" transport only).
//!
//! The transport is laid out in one 32-bit memory BAR:
//!
//! | BAR offset | structure | reached by |
//! |---|---|---|
//! | `0x0000` | common configuration | MMIO exit to the vCPU thread |
//! | `0x1000` | ISR status | MMIO exit (a read clears it) |
//! | `0x2000` | device configuration | MMIO exit |
//! | `0x3000` | queue notify, 4 bytes per queue | ioeventfd: no exit to user space |
//!
//! Each structure is announced by a vendor-specific PCI capability, as the
//! spec requires. The device interrupts through INTx#, which Ferry wires to
//! an IOAPIC pin with an irqfd; guests program that pin edge-triggered.
//! Queue processing happens on the device's own thread (see [`net`]).

pub mod net;

/// Feature bit: the device conforms to virtio 1.x.
pub const F_VERSION_1: u64 = 1 << 32;
/// Feature bit: used/available event indices for notification suppression.
pub const F_EVENT_IDX: u64 = 1 << 29;

/// Device status bits (virtio 1.x 2.1).
pub mod status {
    /// The guest has noticed the device.
    pub const ACKNOWLEDGE: u8 = 1;
    /// The guest knows how to drive it.
    pub const DRIVER: u8 = 2;
    /// The driver is set up and ready.
    pub const DRIVER_OK: u8 = 4;
    /// Feature negotiation is complete.
    pub const FEATURES_OK: u8 = 8;
    /// The device hit an error it cannot recover from without a reset.
    pub const NEEDS_RESET: u8 = 0x40;
    /// The guest gave up on the device.
    pub const FAILED: u8 = 0x80;
}

/// PCI vendor ID of virtio devices.
pub const PCI_VENDOR: u16 = 0x1AF4;
/// PCI device ID of a modern virtio device of type `t`.
pub const fn pci_device_id(t: u16) -> u16 {
    0x1040 + t
}

/// BAR layout (see the module doc).
pub mod bar {
    /// Size of the BAR.
    pub const SIZE: u32 = 0x4000;
    /// Common configuration.
    pub const COMMON: u64 = 0x0000;
    /// ISR status.
    pub const ISR: u64 = 0x1000;
    /// Device configuration.
    pub const DEVICE: u64 = 0x2000;
    /// Queue notifications.
    pub const NOTIFY: u64 = 0x3000;
    /// Bytes between two queues' notify addresses.
    pub const NOTIFY_MULTIPLIER: u32 = 4;
    /// Length of the common configuration structure.
    pub const COMMON_LEN: u32 = 0x40;
}

/// PCI capability types of the virtio structures.
mod cap {
    pub const COMMON: u8 = 1;
    pub const NOTIFY: u8 = 2;
    pub const ISR: u8 = 3;
    pub const DEVICE: u8 = 4;
    pub const VENDOR_ID: u8 = 0x09;
}

/// Adds the four virtio capabilities for structures in BAR 0, with a
/// device configuration of `device_len` bytes.
pub fn add_capabilities(config: &mut super::pci::ConfigSpace, device_len: u32) {
    let body = |cfg_type: u8, offset: u64, length: u32, extra: &[u8]| {
        let mut b = vec![0u8; 14];
        b[0] = (16 + extra.len()) as u8; // cap_len
        b[1] = cfg_type;
        b[2] = 0; // bar
        b[6..10].copy_from_slice(&(offset as u32).to_le_bytes());
        b[10..14].copy_from_slice(&length.to_le_bytes());
        b.extend_from_slice(extra);
        b
    };
    config.add_capability(
        0x40,
        cap::VENDOR_ID,
        &body(cap::COMMON, bar::COMMON, bar::COMMON_LEN, &[]),
    );
    config.add_capability(
        0x50,
        cap::VENDOR_ID,
        &body(
            cap::NOTIFY,
            bar::NOTIFY,
            0x1000,
            &bar::NOTIFY_MULTIPLIER.to_le_bytes(),
        ),
    );
    config.add_capability(0x64, cap::VENDOR_ID, &body(cap::ISR, bar::ISR, 4, &[]));
    config.add_capability(
        0x74,
        cap::VENDOR_ID,
        &body(cap::DEVICE, bar::DEVICE, device_len, &[]),
    );
}

/// Common configuration register offsets (virtio 1.x 4.1.4.3).
pub mod common {
    /// Selects which 32 feature bits `DEVICE_FEATURE` shows.
    pub const DEVICE_FEATURE_SELECT: u64 = 0x00;
    /// The device's feature bits (read-only).
    pub const DEVICE_FEATURE: u64 = 0x04;
    /// Selects which 32 feature bits `DRIVER_FEATURE` sets.
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// The driver's feature bits.
    pub const DRIVER_FEATURE: u64 = 0x0C;
    /// MSI-X vector for configuration changes (no MSI-X: reads `NO_VECTOR`).
    pub const CONFIG_MSIX_VECTOR: u64 = 0x10;
    /// Number of queues (read-only).
    pub const NUM_QUEUES: u64 = 0x12;
    /// Device status.
    pub const DEVICE_STATUS: u64 = 0x14;
    /// Configuration generation (read-only).
    pub const CONFIG_GENERATION: u64 = 0x15;
    /// Selects the queue the registers below refer to.
    pub const QUEUE_SELECT: u64 = 0x16;
    /// Queue size.
    pub const QUEUE_SIZE: u64 = 0x18;
    /// MSI-X vector of the queue (no MSI-X: reads `NO_VECTOR`).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1A;
    /// Queue enable.
    pub const QUEUE_ENABLE: u64 = 0x1C;
    /// Queue notify offset (read-only).
    pub const QUEUE_NOTIFY_OFF: u64 = 0x1E;
    /// Descriptor table address.
    pub const QUEUE_DESC: u64 = 0x20;
    /// Driver (available) ring address.
    pub const QUEUE_DRIVER: u64 = 0x28;
    /// Device (used) ring address.
    pub const QUEUE_DEVICE: u64 = 0x30;
    /// "No MSI-X vector".
    pub const NO_VECTOR: u16 = 0xFFFF;
}

/// Merges a write of `data` at byte `off` into a register that spans
/// `[start, start + width)` and holds `old`; returns the new value.
pub fn merge_write(old: u64, start: u64, width: u64, off: u64, data: &[u8]) -> u64 {
    let mut bytes = old.to_le_bytes();
    for (k, &b) in data.iter().enumerate() {
        let at = off + k as u64;
        if at >= start && at < start + width {
            bytes[(at - start) as usize] = b;
        }
    }
    u64::from_le_bytes(bytes)
}

/// Reads `data.len()` bytes at `off` from a register file given as
/// (start, width, value) entries; bytes no entry covers read as zero.
pub fn read_registers(regs: &[(u64, u64, u64)], off: u64, data: &mut [u8]) {
    for (k, d) in data.iter_mut().enumerate() {
        let at = off + k as u64;
        *d = regs
            .iter()
            .find(|(s, w, _)| at >= *s && at < s + w)
            .map(|(s, _, v)| v.to_le_bytes()[(at - s) as usize])
            .unwrap_or(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_register_writes_merge() {
        // A 64-bit queue address written as two 32-bit halves.
        let v = merge_write(0, 0x20, 8, 0x20, &0x1000u32.to_le_bytes());
        let v = merge_write(v, 0x20, 8, 0x24, &1u32.to_le_bytes());
        assert_eq!(v, 0x1_0000_1000);
        // Bytes outside the register are not its business.
        assert_eq!(merge_write(7, 0x10, 2, 0x12, &[9, 9]), 7);
    }

    #[test]
    fn register_file_reads_any_width() {
        let regs = [(0x12, 2, 2), (0x14, 1, 0xF), (0x15, 1, 3)];
        let mut d = [0u8; 4];
        read_registers(&regs, 0x12, &mut d);
        assert_eq!(d, [2, 0, 0xF, 3]);
        let mut d = [0xAAu8; 2];
        read_registers(&regs, 0x30, &mut d);
        assert_eq!(d, [0, 0]);
    }
}
