//! The contract between Ferry's guest runtime and Ferry's VMM.
//!
//! Everything both sides must agree on lives here and nowhere else: where the
//! VMM puts its boot structures in guest-physical memory, which I/O ports are
//! hypercalls, and the layout of the clock page through which the guest reads
//! time. The crate is `no_std`, has no dependencies and is versioned by
//! [`ABI_VERSION`]; a change to any layout below bumps it.
//!
//! Hypercalls follow uhyve's interface v2 (crate `uhyve-interface`) so that one
//! image runs under stock uhyve and under Ferry: the guest writes to a port and
//! passes its argument in `rdi` (a value, or the guest-physical address of a
//! parameter block).
//!
//! ```
//! use ferry_abi::ClockPage;
//! let page = ClockPage::new(1_000, 0, 2_000_000, 0);
//! // 2 GHz: 2,000 ticks after the base are one microsecond.
//! assert_eq!(page.ns_at(3_000), 1_000);
//! ```
#![no_std]
#![deny(missing_docs)]
#![deny(unsafe_code)]

/// Version of this contract. The VMM writes it into the device tree
/// (`/ferry,vmm` `abi-version`) and into the [`BootHints`]; the runtime
/// refuses a VMM with another one. Version 2: the VMM's boot page tables
/// map everything with the user bit (a guest in PVM native mode needs it;
/// see the runtime's `arch::pvm`). Version 3: the boot hints.
pub const ABI_VERSION: u32 = 3;

pub mod offload;

/// What Ferry's VMM tells the runtime before the runtime has read anything
/// else (the device tree, the boot info): the first instructions of a
/// guest on PVM run emulated (~1 us each) until it switches to native mode,
/// so the switch comes first, on the VMM's word, instead of after parsing
/// the device tree (~3,400 emulated instructions for `hello`, most of its
/// boot). They sit in the second half of the boot info's page
/// ([`layout::BOOT_HINTS_OFFSET`]), which any loader maps. Another loader
/// (uhyve) writes none: `magic` does not match and the runtime finds out
/// the slow way.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BootHints {
    /// [`BootHints::MAGIC`].
    pub magic: u64,
    /// [`ABI_VERSION`].
    pub abi_version: u32,
    /// [`BootHints::PVM_NATIVE`] and friends.
    pub flags: u32,
}

impl BootHints {
    /// "FERRYHNT", little-endian.
    pub const MAGIC: u64 = u64::from_le_bytes(*b"FERRYHNT");
    /// The host's KVM is PVM and the guest is to run natively (its
    /// mappings have the user bit): write PVM's control MSR at once.
    pub const PVM_NATIVE: u32 = 1;
    /// The clock page ([`ClockPage`]) is at [`layout::CLOCK_PAGE_ADDR`]
    /// (always, from Ferry's VMM; a Hermit kernel patched for Ferry reads
    /// time there).
    pub const CLOCK_PAGE: u32 = 2;
    /// The boot page tables map all RAM at its own address and stay valid:
    /// a guest may use physical memory without mapping it (a Hermit
    /// kernel patched for Ferry allocates device buffers so).
    pub const IDENTITY_MAPPED: u32 = 4;
    /// The network card raises its interrupt as an edge (irqfd) and never
    /// for a configuration change: its ISR needs no read (a Hermit kernel
    /// patched for Ferry skips it; each read is an exit to the VMM).
    pub const EDGE_INTERRUPTS: u32 = 8;

    /// Whether these are hints from a Ferry VMM of this ABI.
    pub fn valid(&self) -> bool {
        self.magic == Self::MAGIC && self.abi_version == ABI_VERSION
    }
}

/// Guest-physical layout of the boot structures Ferry's VMM writes.
///
/// Everything below [`layout::KERNEL_ADDR`] belongs to the VMM's boot
/// structures; the image is loaded at `KERNEL_ADDR` and the guest owns all
/// memory after its image.
pub mod layout {
    /// Global descriptor table (3 entries: null, code, data).
    pub const GDT_ADDR: u64 = 0x0;
    /// Flattened device tree: `/chosen/bootargs`, memory, `/ferry,vmm`.
    pub const FDT_ADDR: u64 = 0x1000;
    /// Largest device tree the VMM writes.
    pub const FDT_MAX_SIZE: u64 = 0x4000;
    /// Hermit `RawBootInfo`.
    pub const BOOT_INFO_ADDR: u64 = 0x5000;
    /// The clock page ([`crate::ClockPage`]), one 4 KiB page.
    pub const CLOCK_PAGE_ADDR: u64 = 0x6000;
    /// The boot hints ([`crate::BootHints`]): in the second half of the
    /// boot info's page, which every loader maps (the runtime reads the
    /// boot info there), so the runtime may look before it knows which
    /// loader it has.
    pub const BOOT_HINTS_ADDR: u64 = BOOT_INFO_ADDR + BOOT_HINTS_OFFSET;
    /// Where the boot hints are in the boot info's page.
    pub const BOOT_HINTS_OFFSET: u64 = 0x800;
    /// Top-level page table (PML4); the PDPT follows at +0x1000.
    pub const PML4_ADDR: u64 = 0x10000;
    /// Page directories (2 MiB pages) start here, one per GiB of memory.
    pub const PD_ADDR: u64 = 0x12000;
    /// End of the page-table area.
    pub const PAGE_TABLES_END: u64 = 0x38000;
    /// Initial stack top (the runtime switches to its own stack at once).
    pub const BOOT_STACK_TOP: u64 = 0x40000;
    /// Where the image's first loadable segment goes (1 MiB, as under QEMU PVH).
    pub const KERNEL_ADDR: u64 = 0x10_0000;
    /// Start of the hole below 4 GiB kept free of RAM for device MMIO and the
    /// local APIC; memory above it continues at 4 GiB.
    pub const MMIO_HOLE_START: u64 = 0xC000_0000;
    /// End of the MMIO hole.
    pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;

    // The regions must not overlap: checked when the crate compiles.
    const _: () = {
        assert!(GDT_ADDR + 0x1000 <= FDT_ADDR);
        assert!(FDT_ADDR + FDT_MAX_SIZE <= BOOT_INFO_ADDR);
        assert!(BOOT_INFO_ADDR + 0x1000 <= CLOCK_PAGE_ADDR);
        assert!(CLOCK_PAGE_ADDR + 0x1000 <= PML4_ADDR);
        assert!(PD_ADDR < PAGE_TABLES_END && PAGE_TABLES_END < BOOT_STACK_TOP);
        assert!(BOOT_STACK_TOP <= KERNEL_ADDR);
        assert!(core::mem::size_of::<crate::ClockPage>() <= 0x1000);
        assert!(core::mem::size_of::<crate::BootHints>() <= 0x1000 - BOOT_HINTS_OFFSET as usize);
    };
}

/// I/O ports the guest uses as hypercalls (uhyve interface v2 numbering).
pub mod ports {
    /// Exit the VM; `rdi` holds the exit status (an `i32`).
    pub const EXIT: u16 = 0x1010;
    /// Write one byte to the console; the byte is the low byte of `rdi`.
    pub const SERIAL_WRITE_BYTE: u16 = 0x1020;
    /// Write a buffer to the console; `rdi` holds the guest-physical address
    /// of a [`crate::SerialWriteBuffer`].
    pub const SERIAL_WRITE_BUFFER: u16 = 0x1030;
}

/// Parameter block of the serial-write-buffer hypercall (uhyve v2 layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SerialWriteBuffer {
    /// Length of the buffer in bytes.
    pub len: u64,
    /// Guest-physical address of the buffer.
    pub buf: u64,
}

/// Largest buffer one serial-write hypercall may pass; the VMM rejects more.
pub const SERIAL_WRITE_MAX: u64 = 64 * 1024;

/// Device-tree names the VMM uses for Ferry-specific information.
pub mod fdt {
    /// Node present only under Ferry's VMM.
    pub const VMM_NODE: &str = "ferry,vmm";
    /// Absolute path of [`VMM_NODE`].
    pub const VMM_NODE_PATH: &str = "/ferry,vmm";
    /// `u32` property of [`VMM_NODE`]: [`crate::ABI_VERSION`].
    pub const ABI_VERSION_PROP: &str = "abi-version";
    /// `u64` property of [`VMM_NODE`]: guest-physical address of the clock page.
    pub const CLOCK_PAGE_PROP: &str = "clock-page";
}

/// The clock page: the VMM's statement of what time it is in the guest.
///
/// The guest's `rdtsc` is the host's TSC, which Ferry cannot move (see
/// `shared/reference/pvm-facts.md`) and which is another counter altogether on
/// another host. So guest time is `ns_base + (tsc - tsc_base) * mult >> 32`,
/// with the page rewritten by the VMM whenever the relation changes (resume
/// after pause, restore, migration). `generation` works as a seqlock: odd
/// while the VMM writes, bumped to the next even value when done; a reader
/// retries if it saw an odd value or the value changed under it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClockPage {
    /// Seqlock generation: odd while being written.
    pub generation: u32,
    /// Reserved, zero.
    pub flags: u32,
    /// Host TSC value at which guest time was `ns_base`.
    pub tsc_base: u64,
    /// Guest monotonic time in ns at `tsc_base`.
    pub ns_base: u64,
    /// TSC rate in kHz (informational; `mult` is what the guest uses).
    pub tsc_khz: u64,
    /// `ns = ticks * mult >> 32`: `(10^6 << 32) / tsc_khz`.
    pub mult: u64,
    /// Unix time in ns at guest monotonic time 0 (for wall-clock time).
    pub unix_ns_at_zero: u64,
}

impl ClockPage {
    /// A page stating that guest time was `ns_base` when the TSC read
    /// `tsc_base`, with the TSC running at `tsc_khz`.
    ///
    /// `tsc_khz` must not be zero (the VMM checks it before calling).
    pub const fn new(tsc_base: u64, ns_base: u64, tsc_khz: u64, unix_ns_at_zero: u64) -> Self {
        ClockPage {
            generation: 0,
            flags: 0,
            tsc_base,
            ns_base,
            tsc_khz,
            mult: mult_for_khz(tsc_khz),
            unix_ns_at_zero,
        }
    }

    /// Guest monotonic time in ns at TSC value `tsc`. A TSC value before the
    /// base counts as the base: time never goes backwards.
    pub const fn ns_at(&self, tsc: u64) -> u64 {
        let ticks = tsc.saturating_sub(self.tsc_base);
        self.ns_base.saturating_add(ticks_to_ns(ticks, self.mult))
    }
}

/// The `mult` for a TSC rate: `(10^6 << 32) / tsc_khz`, saturating.
pub const fn mult_for_khz(tsc_khz: u64) -> u64 {
    if tsc_khz == 0 {
        return 0;
    }
    let m = (1_000_000u128 << 32) / tsc_khz as u128;
    if m > u64::MAX as u128 {
        u64::MAX
    } else {
        m as u64
    }
}

/// Converts TSC ticks to ns with a `mult` from [`mult_for_khz`].
pub const fn ticks_to_ns(ticks: u64, mult: u64) -> u64 {
    let ns = (ticks as u128 * mult as u128) >> 32;
    if ns > u64::MAX as u128 {
        u64::MAX
    } else {
        ns as u64
    }
}

/// Converts ns to TSC ticks at `tsc_khz` (for arming timers), saturating.
pub const fn ns_to_ticks(ns: u64, tsc_khz: u64) -> u64 {
    let t = ns as u128 * tsc_khz as u128 / 1_000_000;
    if t > u64::MAX as u128 {
        u64::MAX
    } else {
        t as u64
    }
}

/// Virtio's `vring_need_event` (VIRTIO_F_EVENT_IDX): whether an index that
/// moved from `old` to `new` passed `event`, i.e. whether the other side
/// asked to be notified. All arithmetic wraps at 2^16.
///
/// ```
/// use ferry_abi::virtio_need_event;
/// assert!(virtio_need_event(5, 6, 5)); // the other side waits for entry 5
/// assert!(!virtio_need_event(6, 6, 5)); // ... for entry 6: not yet
/// assert!(virtio_need_event(0xFFFF, 1, 0xFFFE)); // across the wrap
/// assert!(!virtio_need_event(3, 1, 0xFFFE));
/// ```
pub const fn virtio_need_event(event: u16, new: u16, old: u16) -> bool {
    new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
}

/// The verifiable byte stream that the `stream` app sends and the `http`
/// app serves as its large body, and that the test clients check.
///
/// The stream is made of [`BLOCK`]-byte blocks: block `n` is `n` as a
/// little-endian u64 followed by [`PATTERN`]. A lost, duplicated or
/// reordered byte range shows up as a wrong block number or a pattern
/// mismatch. Filling costs one copy per block, which matters to a guest
/// whose instructions are emulated.
///
/// ```
/// use ferry_abi::stream;
/// let mut buf = vec![0u8; 10_000];
/// stream::fill(&mut buf, 5);
/// assert_eq!(stream::check(&buf, 5), Ok(()));
/// buf[4200] ^= 1;
/// assert_eq!(stream::check(&buf, 5), Err(4200));
/// ```
pub mod stream {
    /// Parses the stream apps' sizes and rates (`rate=120M`, `bytes=1G`,
    /// `ballast=256M`): a number with an optional decimal suffix K, M or G
    /// (either case). `None` for anything else or a value past u64.
    ///
    /// ```
    /// use ferry_abi::stream::parse_amount;
    /// assert_eq!(parse_amount("120M"), Some(120_000_000));
    /// assert_eq!(parse_amount("64k"), Some(64_000));
    /// assert_eq!(parse_amount("7"), Some(7));
    /// assert_eq!(parse_amount("M"), None);
    /// assert_eq!(parse_amount("99999999999G"), None);
    /// ```
    pub fn parse_amount(s: &str) -> Option<u64> {
        let (num, mult) = match s.as_bytes().last()? {
            b'K' | b'k' => (&s[..s.len() - 1], 1_000),
            b'M' | b'm' => (&s[..s.len() - 1], 1_000_000),
            b'G' | b'g' => (&s[..s.len() - 1], 1_000_000_000),
            _ => (s, 1),
        };
        num.parse::<u64>().ok()?.checked_mul(mult)
    }

    /// Bytes per block.
    pub const BLOCK: usize = 4096;
    const HEAD: usize = 8;

    const fn pattern() -> [u8; BLOCK - HEAD] {
        let mut p = [0u8; BLOCK - HEAD];
        let mut i = 0;
        while i < p.len() {
            p[i] = ((i * 131 + 7) ^ (i >> 7)) as u8;
            i += 1;
        }
        p
    }

    /// The bytes after every block number.
    pub static PATTERN: [u8; BLOCK - HEAD] = pattern();

    /// The stream's byte at `offset`.
    pub fn byte_at(offset: u64) -> u8 {
        let block = offset / BLOCK as u64;
        let within = (offset % BLOCK as u64) as usize;
        if within < HEAD {
            block.to_le_bytes()[within]
        } else {
            PATTERN[within - HEAD]
        }
    }

    /// Fills `buf` with the stream from byte `offset` on.
    pub fn fill(buf: &mut [u8], offset: u64) {
        let mut at = 0;
        while at < buf.len() {
            let off = offset + at as u64;
            let within = (off % BLOCK as u64) as usize;
            let n = (BLOCK - within).min(buf.len() - at);
            let mut block = [0u8; HEAD];
            block.copy_from_slice(&(off / BLOCK as u64).to_le_bytes());
            let dst = &mut buf[at..at + n];
            if within < HEAD {
                let h = (HEAD - within).min(n);
                dst[..h].copy_from_slice(&block[within..within + h]);
                dst[h..].copy_from_slice(&PATTERN[..n - h]);
            } else {
                dst.copy_from_slice(&PATTERN[within - HEAD..within - HEAD + n]);
            }
            at += n;
        }
    }

    /// Checks that `buf` is the stream from byte `offset` on; on a
    /// mismatch, the index in `buf` of the first wrong byte.
    pub fn check(buf: &[u8], offset: u64) -> Result<(), usize> {
        let mut at = 0;
        while at < buf.len() {
            let off = offset + at as u64;
            let within = (off % BLOCK as u64) as usize;
            let n = (BLOCK - within).min(buf.len() - at);
            let src = &buf[at..at + n];
            let block = (off / BLOCK as u64).to_le_bytes();
            let mut k = 0;
            while k < n {
                let w = within + k;
                if w >= HEAD {
                    // The rest of the block is pattern: compare it whole.
                    let want = &PATTERN[w - HEAD..w - HEAD + (n - k)];
                    if let Some(p) = src[k..].iter().zip(want).position(|(a, b)| a != b) {
                        return Err(at + k + p);
                    }
                    break;
                }
                if src[k] != block[w] {
                    return Err(at + k);
                }
                k += 1;
            }
            at += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_fill_and_check_agree_at_any_offset() {
        let mut buf = [0u8; 3 * stream::BLOCK + 17];
        for offset in [0u64, 1, 7, 8, 9, 4095, 4096, 123_456_789] {
            stream::fill(&mut buf, offset);
            assert_eq!(stream::check(&buf, offset), Ok(()), "offset {offset}");
            for (i, b) in buf.iter().enumerate().step_by(97) {
                assert_eq!(*b, stream::byte_at(offset + i as u64));
            }
            // The same bytes are wrong a block later.
            assert!(stream::check(&buf, offset + stream::BLOCK as u64).is_err());
        }
        stream::fill(&mut buf, 0);
        buf[5] ^= 0x80; // inside a block number
        assert_eq!(stream::check(&buf, 0), Err(5));
    }

    #[test]
    fn time_is_exact_for_round_rates() {
        for khz in [1_000_000u64, 2_000_000, 2_300_000, 3_000_000] {
            let p = ClockPage::new(5, 7, khz, 0);
            // one second of ticks is one second of ns (within 1 ns of rounding)
            let ns = p.ns_at(5 + khz * 1000) - 7;
            assert!(ns.abs_diff(1_000_000_000) <= 1, "{khz} kHz: {ns}");
        }
    }

    #[test]
    fn time_never_goes_before_base() {
        let p = ClockPage::new(1_000_000, 42, 2_000_000, 0);
        assert_eq!(p.ns_at(0), 42);
        assert_eq!(p.ns_at(1_000_000), 42);
    }

    #[test]
    fn slow_and_fast_tsc_rates_work() {
        // a 500 MHz counter (mult above 2^32) and a 5 GHz one
        let slow = ClockPage::new(0, 0, 500_000, 0);
        assert_eq!(slow.ns_at(500), 1_000);
        let fast = ClockPage::new(0, 0, 5_000_000, 0);
        // within 1 ns per second of rounding
        assert!(fast.ns_at(5_000_000_000).abs_diff(1_000_000_000) <= 1);
    }

    #[test]
    fn conversions_saturate() {
        assert_eq!(ticks_to_ns(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(ns_to_ticks(u64::MAX, u64::MAX), u64::MAX);
        assert_eq!(mult_for_khz(0), 0);
        assert_eq!(ns_to_ticks(1_000, 2_000_000), 2_000);
    }
}
