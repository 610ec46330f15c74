//! A PCI bus reached through configuration mechanism #1 (ports 0xCF8 and
//! 0xCFC-0xCFF), as on a PC: the guest writes a function and register
//! address to 0xCF8 and then reads or writes the register through 0xCFC.
//!
//! Bus 0 only, no bridges. Each function has a 256-byte configuration space
//! ([`ConfigSpace`]) in which only the command register, BAR sizing and the
//! interrupt line are writable; everything else reads as the device set it.
//! BARs are placed by the VMM and do not move: a write of another address to
//! a BAR is ignored, as if firmware had locked it.

/// The configuration address port.
pub const CONFIG_ADDRESS: u16 = 0xCF8;
/// The first configuration data port (0xCFC-0xCFF).
pub const CONFIG_DATA: u16 = 0xCFC;

/// The standard header registers Ferry's functions use.
pub mod reg {
    /// Vendor ID (16 bits).
    pub const VENDOR_ID: usize = 0x00;
    /// Device ID (16 bits).
    pub const DEVICE_ID: usize = 0x02;
    /// Command (16 bits).
    pub const COMMAND: usize = 0x04;
    /// Status (16 bits).
    pub const STATUS: usize = 0x06;
    /// Revision ID (8 bits).
    pub const REVISION: usize = 0x08;
    /// Programming interface, subclass, class (3 bytes).
    pub const CLASS: usize = 0x09;
    /// Header type (8 bits).
    pub const HEADER_TYPE: usize = 0x0E;
    /// BAR 0 (32 bits).
    pub const BAR0: usize = 0x10;
    /// Subsystem vendor ID (16 bits).
    pub const SUBSYSTEM_VENDOR_ID: usize = 0x2C;
    /// Subsystem ID (16 bits).
    pub const SUBSYSTEM_ID: usize = 0x2E;
    /// Capabilities pointer (8 bits).
    pub const CAPABILITIES: usize = 0x34;
    /// Interrupt line (8 bits).
    pub const INTERRUPT_LINE: usize = 0x3C;
    /// Interrupt pin (8 bits; 1 = INTA#).
    pub const INTERRUPT_PIN: usize = 0x3D;
}

/// Status register bit: the function has a capabilities list.
pub const STATUS_CAPABILITIES: u16 = 1 << 4;
/// Command bits a guest may set: I/O space, memory space, bus master,
/// INTx disable.
const COMMAND_WRITABLE: u16 = 0x0001 | 0x0002 | 0x0004 | 0x0400;

/// One function's configuration space.
#[derive(Clone, Debug)]
pub struct ConfigSpace {
    bytes: [u8; 256],
    /// For each BAR dword in use (a 64-bit BAR uses two), by index: what
    /// it reads while being sized (its size mask and type bits) and which
    /// of its bits are address bits.
    bar_masks: [Option<(u32, u32)>; 6],
    /// Whether the guest is sizing a BAR (wrote all ones to it).
    sizing: [bool; 6],
}

impl ConfigSpace {
    /// An empty type-0 header for `vendor:device`.
    pub fn new(vendor: u16, device: u16) -> Self {
        let mut c = ConfigSpace {
            bytes: [0; 256],
            bar_masks: [None; 6],
            sizing: [false; 6],
        };
        c.set16(reg::VENDOR_ID, vendor);
        c.set16(reg::DEVICE_ID, device);
        c
    }

    /// Sets an 8-bit register.
    pub fn set8(&mut self, off: usize, v: u8) {
        self.bytes[off] = v;
    }

    /// Sets a 16-bit register.
    pub fn set16(&mut self, off: usize, v: u16) {
        self.bytes[off..off + 2].copy_from_slice(&v.to_le_bytes());
    }

    /// Sets a 32-bit register.
    pub fn set32(&mut self, off: usize, v: u32) {
        self.bytes[off..off + 4].copy_from_slice(&v.to_le_bytes());
    }

    /// Reads a 16-bit register.
    pub fn get16(&self, off: usize) -> u16 {
        u16::from_le_bytes([self.bytes[off], self.bytes[off + 1]])
    }

    /// Places a 32-bit non-prefetchable memory BAR of `size` bytes (a power
    /// of two, at least 4 KiB) at `addr`.
    pub fn set_memory_bar(&mut self, index: usize, addr: u32, size: u32) {
        assert!(size.is_power_of_two() && size >= 4096 && addr.is_multiple_of(size));
        self.bar_masks[index] = Some((!(size - 1), !(size - 1)));
        self.set32(reg::BAR0 + 4 * index, addr);
    }

    /// Places a 64-bit prefetchable memory BAR of `size` bytes (a power of
    /// two, at least 4 KiB) at `addr`, in BARs `index` and `index + 1`.
    /// (Guest drivers such as RustyHermit's map only 64-bit prefetchable
    /// BARs; Ferry's runtime takes either.)
    pub fn set_memory_bar64(&mut self, index: usize, addr: u64, size: u64) {
        assert!(size.is_power_of_two() && size >= 4096 && addr.is_multiple_of(size));
        const TYPE_64: u32 = 0b100;
        const PREFETCHABLE: u32 = 0b1000;
        let flags = TYPE_64 | PREFETCHABLE;
        let mask = !(size - 1);
        let low = mask as u32 & 0xFFFF_FFF0;
        self.bar_masks[index] = Some((low | flags, low));
        self.bar_masks[index + 1] = Some(((mask >> 32) as u32, (mask >> 32) as u32));
        self.set32(reg::BAR0 + 4 * index, addr as u32 | flags);
        self.set32(reg::BAR0 + 4 * (index + 1), (addr >> 32) as u32);
    }

    /// Adds a capability at `off` (after any added before) with `body` after
    /// its ID and next-pointer bytes.
    pub fn add_capability(&mut self, off: usize, id: u8, body: &[u8]) {
        assert!(off >= 0x40 && off + 2 + body.len() <= 256 && off.is_multiple_of(4));
        // Link it at the end of the list.
        let mut link = reg::CAPABILITIES;
        while self.bytes[link] != 0 {
            link = self.bytes[link] as usize + 1;
        }
        self.bytes[link] = off as u8;
        self.bytes[off] = id;
        self.bytes[off + 1] = 0;
        self.bytes[off + 2..off + 2 + body.len()].copy_from_slice(body);
        let status = self.get16(reg::STATUS) | STATUS_CAPABILITIES;
        self.set16(reg::STATUS, status);
    }

    /// Reads the aligned dword at `off`.
    pub fn read_dword(&self, off: usize) -> u32 {
        let off = off & 0xFC;
        if let Some(i) = bar_index(off)
            && self.sizing[i]
            && let Some((readback, _)) = self.bar_masks[i]
        {
            return readback;
        }
        u32::from_le_bytes(self.bytes[off..off + 4].try_into().expect("4 bytes"))
    }

    /// Writes `data` (1, 2 or 4 bytes) at `off`; read-only bits stay.
    pub fn write(&mut self, off: usize, data: &[u8]) {
        let dword = off & 0xFC;
        if let Some(i) = bar_index(dword) {
            // Sizing: ones in every address bit (all ones, or 0xFFFFFFF0
            // as some drivers write). Anything else ends sizing; the
            // address itself stays where the VMM put it.
            self.sizing[i] = match (self.bar_masks[i], <[u8; 4]>::try_from(data)) {
                (Some((_, addr_bits)), Ok(v)) => u32::from_le_bytes(v) & addr_bits == addr_bits,
                _ => false,
            };
            return;
        }
        for (k, &b) in data.iter().enumerate() {
            let at = off + k;
            match at {
                a if a == reg::COMMAND || a == reg::COMMAND + 1 => {
                    let mut cmd = self.get16(reg::COMMAND).to_le_bytes();
                    cmd[a - reg::COMMAND] = b;
                    let cmd = u16::from_le_bytes(cmd) & COMMAND_WRITABLE;
                    self.set16(reg::COMMAND, cmd);
                }
                a if a == reg::INTERRUPT_LINE => self.bytes[a] = b,
                _ => {}
            }
        }
    }

    /// The raw 256 bytes (for saving).
    pub fn bytes(&self) -> &[u8; 256] {
        &self.bytes
    }

    /// Takes the guest-writable registers (command, interrupt line) from
    /// saved bytes; everything else stays as the device set it.
    pub fn restore_writable(&mut self, saved: &[u8]) {
        if saved.len() != 256 {
            return;
        }
        let cmd = u16::from_le_bytes([saved[reg::COMMAND], saved[reg::COMMAND + 1]]);
        self.set16(reg::COMMAND, cmd & COMMAND_WRITABLE);
        self.bytes[reg::INTERRUPT_LINE] = saved[reg::INTERRUPT_LINE];
    }
}

fn bar_index(off: usize) -> Option<usize> {
    (reg::BAR0..reg::BAR0 + 24)
        .contains(&off)
        .then(|| (off - reg::BAR0) / 4)
}

/// A function's configuration space as the bus sees it.
pub trait PciFunction {
    /// The configuration space.
    fn config(&self) -> &ConfigSpace;
    /// Applies a configuration write.
    fn config_write(&mut self, off: usize, data: &[u8]) {
        self.config_mut().write(off, data);
    }
    /// The configuration space, writable.
    fn config_mut(&mut self) -> &mut ConfigSpace;
}

/// The decoded address latched in 0xCF8.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConfigAddress(pub u32);

impl ConfigAddress {
    fn enabled(self) -> bool {
        self.0 & 0x8000_0000 != 0
    }
    fn bus(self) -> u8 {
        (self.0 >> 16) as u8
    }
    fn device(self) -> u8 {
        ((self.0 >> 11) & 0x1F) as u8
    }
    fn function(self) -> u8 {
        ((self.0 >> 8) & 0x7) as u8
    }
    fn register(self) -> usize {
        (self.0 & 0xFC) as usize
    }
}

/// Bus 0: configuration mechanism #1 over the functions at their slots.
#[derive(Debug, Default)]
pub struct PciBus {
    address: ConfigAddress,
}

impl PciBus {
    /// Whether `port` belongs to the configuration mechanism.
    pub fn owns_port(port: u16) -> bool {
        (CONFIG_ADDRESS..CONFIG_ADDRESS + 4).contains(&port)
            || (CONFIG_DATA..CONFIG_DATA + 4).contains(&port)
    }

    /// Which (slot, register) the latched address selects, if any function
    /// could be there.
    fn target(&self) -> Option<(u8, usize)> {
        let a = self.address;
        (a.enabled() && a.bus() == 0 && a.function() == 0).then(|| (a.device(), a.register()))
    }

    /// A port read. `find` maps a slot to its function.
    pub fn pio_read<'a>(
        &self,
        port: u16,
        data: &mut [u8],
        find: impl FnOnce(u8) -> Option<&'a dyn PciFunction>,
    ) {
        if port == CONFIG_ADDRESS && data.len() == 4 {
            data.copy_from_slice(&self.address.0.to_le_bytes());
            return;
        }
        data.fill(0xFF);
        if port < CONFIG_DATA {
            return;
        }
        let Some((slot, register)) = self.target() else {
            return;
        };
        if let Some(f) = find(slot) {
            let dword = f.config().read_dword(register).to_le_bytes();
            let start = usize::from(port - CONFIG_DATA);
            for (k, d) in data.iter_mut().enumerate() {
                if let Some(&b) = dword.get(start + k) {
                    *d = b;
                }
            }
        }
    }

    /// A port write. `find` maps a slot to its function.
    pub fn pio_write<'a>(
        &mut self,
        port: u16,
        data: &[u8],
        find: impl FnOnce(u8) -> Option<&'a mut dyn PciFunction>,
    ) {
        if port == CONFIG_ADDRESS {
            if data.len() == 4 {
                self.address = ConfigAddress(u32::from_le_bytes(data.try_into().expect("4")));
            }
            return;
        }
        if port < CONFIG_DATA {
            return;
        }
        let Some((slot, register)) = self.target() else {
            return;
        };
        let start = usize::from(port - CONFIG_DATA);
        if start + data.len() > 4 {
            return;
        }
        if let Some(f) = find(slot) {
            f.config_write(register + start, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct F(ConfigSpace);
    impl PciFunction for F {
        fn config(&self) -> &ConfigSpace {
            &self.0
        }
        fn config_mut(&mut self) -> &mut ConfigSpace {
            &mut self.0
        }
    }

    fn read(bus: &PciBus, f: &F, slot: u8, port: u16, len: usize) -> Vec<u8> {
        let mut d = vec![0; len];
        bus.pio_read(port, &mut d, |s| {
            (s == slot).then_some(f as &dyn PciFunction)
        });
        d
    }

    #[test]
    fn a_64_bit_bar_sizes_in_two_dwords_and_keeps_its_place() {
        let mut c = ConfigSpace::new(0x1AF4, 0x1041);
        c.set_memory_bar64(0, 0xE000_0000, 0x4000);
        // Type 64-bit (0b100) and prefetchable (0b1000) in the low dword.
        assert_eq!(c.read_dword(reg::BAR0), 0xE000_000C);
        assert_eq!(c.read_dword(reg::BAR0 + 4), 0);
        // Sized the way RustyHermit's PCI code does it (0xFFFFFFF0 low).
        c.write(reg::BAR0, &0xFFFF_FFF0u32.to_le_bytes());
        c.write(reg::BAR0 + 4, &[0xFF; 4]);
        assert_eq!(c.read_dword(reg::BAR0), 0xFFFF_C00C);
        assert_eq!(c.read_dword(reg::BAR0 + 4), 0xFFFF_FFFF);
        c.write(reg::BAR0, &0x1000_0000u32.to_le_bytes());
        c.write(reg::BAR0 + 4, &1u32.to_le_bytes());
        assert_eq!(c.read_dword(reg::BAR0), 0xE000_000C);
        assert_eq!(c.read_dword(reg::BAR0 + 4), 0);
        // Unused BARs size as nothing.
        c.write(reg::BAR0 + 8, &[0xFF; 4]);
        assert_eq!(c.read_dword(reg::BAR0 + 8), 0);
    }

    #[test]
    fn config_mechanism_reads_registers_and_sizes_bars() {
        let mut c = ConfigSpace::new(0x1AF4, 0x1041);
        c.set_memory_bar(0, 0xE000_0000, 0x4000);
        c.add_capability(0x40, 0x09, &[16, 1, 0, 0]);
        let mut f = F(c);
        let mut bus = PciBus::default();
        let addr = |dev: u32, reg: u32| (0x8000_0000u32 | dev << 11 | reg).to_le_bytes();

        bus.pio_write(CONFIG_ADDRESS, &addr(1, 0), |_| None);
        assert_eq!(read(&bus, &f, 1, CONFIG_DATA, 4), [0xF4, 0x1A, 0x41, 0x10]);
        assert_eq!(read(&bus, &f, 1, CONFIG_DATA + 2, 2), [0x41, 0x10]);
        // An empty slot reads as all ones.
        assert_eq!(read(&bus, &f, 2, CONFIG_DATA, 4), [0xFF; 4]);
        // Status says there is a capability list, at 0x40.
        bus.pio_write(CONFIG_ADDRESS, &addr(1, 0x34), |_| None);
        assert_eq!(read(&bus, &f, 1, CONFIG_DATA, 1), [0x40]);
        bus.pio_write(CONFIG_ADDRESS, &addr(1, 0x04), |_| None);
        assert_eq!(
            read(&bus, &f, 1, CONFIG_DATA + 2, 2),
            STATUS_CAPABILITIES.to_le_bytes()
        );

        // BAR sizing, then the address comes back unchanged.
        bus.pio_write(CONFIG_ADDRESS, &addr(1, 0x10), |_| None);
        bus.pio_write(CONFIG_DATA, &[0xFF; 4], |_| Some(&mut f));
        assert_eq!(
            read(&bus, &f, 1, CONFIG_DATA, 4),
            0xFFFF_C000u32.to_le_bytes()
        );
        bus.pio_write(CONFIG_DATA, &0x1234_0000u32.to_le_bytes(), |_| Some(&mut f));
        assert_eq!(
            read(&bus, &f, 1, CONFIG_DATA, 4),
            0xE000_0000u32.to_le_bytes()
        );

        // The vendor ID is read-only; the command register keeps only its
        // writable bits.
        bus.pio_write(CONFIG_ADDRESS, &addr(1, 0), |_| None);
        bus.pio_write(CONFIG_DATA, &[0; 4], |_| Some(&mut f));
        assert_eq!(read(&bus, &f, 1, CONFIG_DATA, 2), [0xF4, 0x1A]);
        bus.pio_write(CONFIG_ADDRESS, &addr(1, 4), |_| None);
        bus.pio_write(CONFIG_DATA, &[0xFF, 0xFF], |_| Some(&mut f));
        assert_eq!(f.0.get16(reg::COMMAND), COMMAND_WRITABLE);
    }
}
