//! Which machine booted us and what it told us: the Hermit boot info and
//! device tree (Ferry's VMM, uhyve) or the PVH start info (QEMU). Console
//! output and exit go through the platform's own devices.

use core::sync::atomic::{AtomicU8, Ordering};

use ferry_abi::{ClockPage, SerialWriteBuffer, ports};
use hermit_entry::boot_info::{BootInfo, PlatformInfo, RawBootInfo};

use crate::arch::{apic, cpu, idt, pvm};
use crate::fdt::Fdt;
use crate::{args, heap, time};

/// The machine the runtime booted on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Platform {
    /// Ferry's VMM: Hermit entry, device tree with a `/ferry,vmm` node and a clock page.
    Ferry = 1,
    /// Stock uhyve (or another Hermit loader): Hermit entry and device tree.
    Uhyve = 2,
    /// QEMU's PVH direct boot: 16550 console, isa-debug-exit.
    Pvh = 3,
}

impl Platform {
    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Platform::Ferry => "ferry",
            Platform::Uhyve => "uhyve",
            Platform::Pvh => "qemu-pvh",
        }
    }
}

static PLATFORM: AtomicU8 = AtomicU8::new(0);
static CPU_MODE: AtomicU8 = AtomicU8::new(0);

/// How the vCPU executes the guest, as found at boot (see [`pvm`]).
pub fn cpu_mode() -> pvm::Mode {
    match CPU_MODE.load(Ordering::Relaxed) {
        1 => pvm::Mode::Native,
        2 => pvm::Mode::EmulatedByChoice,
        _ => pvm::Mode::NotPvm,
    }
}

/// Enters PVM native mode unless the runtime arguments (the words of
/// `cmdline` before `--`) say `pvm.native=0`. Runs before the heap exists.
fn enter_native_mode(cmdline: &str, user_mapped: bool) {
    let off = cmdline
        .split_ascii_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == "pvm.native=0");
    let mode = pvm::enter_native(!off, user_mapped);
    CPU_MODE.store(
        match mode {
            pvm::Mode::Native => 1,
            pvm::Mode::EmulatedByChoice => 2,
            pvm::Mode::NotPvm => 3,
        },
        Ordering::Relaxed,
    );
}

/// The platform, once boot has found out (before that: [`Platform::Pvh`]'s
/// console is never assumed; output goes through the Hermit hypercalls).
pub fn current() -> Platform {
    match PLATFORM.load(Ordering::Relaxed) {
        3 => Platform::Pvh,
        2 => Platform::Uhyve,
        _ => Platform::Ferry,
    }
}

const COM1: u16 = 0x3F8;
const ISA_DEBUG_EXIT: u16 = 0xF4;

/// Writes bytes to the console of the current platform.
pub fn console_write(bytes: &[u8]) {
    if bytes.is_empty() {
        return;
    }
    match current() {
        Platform::Pvh => bytes.iter().for_each(|&b| cpu::outb(COM1, b)),
        Platform::Ferry | Platform::Uhyve => {
            // Memory is identity-mapped, so virtual addresses are physical.
            let params = SerialWriteBuffer {
                len: bytes.len() as u64,
                buf: bytes.as_ptr() as u64,
            };
            cpu::hypercall(ports::SERIAL_WRITE_BUFFER, &params as *const _ as u64);
        }
    }
}

/// Ends the VM with `status`.
pub fn exit(status: i32) -> ! {
    match current() {
        // QEMU's isa-debug-exit makes the process exit with (value << 1) | 1.
        Platform::Pvh => cpu::outl(ISA_DEBUG_EXIT, status as u32),
        Platform::Ferry | Platform::Uhyve => cpu::hypercall(ports::EXIT, status as u32 as u64),
    }
    cpu::halt_forever()
}

/// Memory the heap may use: `[start, end)`, physical (= virtual).
struct Ram {
    start: u64,
    end: u64,
}

const PAGE: u64 = 4096;

fn image_end() -> u64 {
    unsafe extern "C" {
        static __image_end: u8;
    }
    core::ptr::addr_of!(__image_end) as u64
}

/// The boot hints Ferry's VMM left in the boot info's page, if it is
/// Ferry's VMM of this ABI.
fn boot_hints(raw: &RawBootInfo) -> Option<ferry_abi::BootHints> {
    let page = raw as *const RawBootInfo as u64 & !0xFFF;
    let at = page + ferry_abi::layout::BOOT_HINTS_OFFSET;
    // SAFETY: `at` is in the page that holds the boot info, which the
    // loader mapped (we are reading the boot info through it) and which
    // the boot info does not reach into (Ferry's VMM checks; another
    // loader's bytes there fail the magic); the hints are a plain `repr(C)`
    // struct of integers, valid for any bits.
    let h = unsafe { core::ptr::read_volatile(at as *const ferry_abi::BootHints) };
    h.valid().then_some(h)
}

/// Hermit entry (Ferry's VMM, uhyve). Called from `_start` on the boot stack.
pub extern "C" fn hermit_main(raw: &'static RawBootInfo, _cpu_id: u32) -> ! {
    // On PVM everything before the switch to native mode is emulated: on
    // Ferry's word, switch before anything else (but after reading the
    // code selector, which the switch hides).
    let cs = idt::code_selector();
    if boot_hints(raw).is_some_and(|h| h.flags & ferry_abi::BootHints::PVM_NATIVE != 0) {
        pvm::enter_native_hinted();
        CPU_MODE.store(1, Ordering::Relaxed);
    }
    idt::init(cs);
    let info = BootInfo::from(*raw);
    let fdt = info
        .hardware_info
        .device_tree
        .and_then(|a| device_tree(a.get()));
    let bootargs = fdt
        .and_then(|f| f.str_property("/chosen", "bootargs"))
        .unwrap_or("");
    let abi = fdt.and_then(|f| {
        f.int_property(
            ferry_abi::fdt::VMM_NODE_PATH,
            ferry_abi::fdt::ABI_VERSION_PROP,
        )
    });
    let is_ferry = abi.is_some();
    // Ferry's VMM maps everything with the user bit; uhyve does not (and a
    // VMM of another ABI is refused below, after the tables are mended).
    if CPU_MODE.load(Ordering::Relaxed) == 0 {
        enter_native_mode(bootargs, abi == Some(u64::from(ferry_abi::ABI_VERSION)));
    }
    PLATFORM.store(
        if is_ferry {
            Platform::Ferry
        } else {
            Platform::Uhyve
        } as u8,
        Ordering::Relaxed,
    );

    let phys = info.hardware_info.phys_addr_range;
    let ram = Ram {
        start: align_up(
            image_end().max(info.load_info.kernel_image_addr_range.end),
            PAGE,
        ),
        end: phys
            .end
            .min(ferry_abi::layout::MMIO_HOLE_START.max(phys.start)),
    };
    heap::init(ram.start, ram.end);

    // Time: Ferry's clock page, else the loader's TSC rate.
    let vmm = |prop| fdt.and_then(|f| f.int_property(ferry_abi::fdt::VMM_NODE_PATH, prop));
    if is_ferry {
        let version = vmm(ferry_abi::fdt::ABI_VERSION_PROP);
        if version != Some(u64::from(ferry_abi::ABI_VERSION)) {
            crate::console::write_fmt(format_args!(
                "ferry-runtime: VMM speaks ABI version {version:?}, this image needs {}\n",
                ferry_abi::ABI_VERSION
            ));
            exit(103);
        }
    }
    match vmm(ferry_abi::fdt::CLOCK_PAGE_PROP) {
        Some(page) => time::init_clock_page(page as *const ClockPage),
        None => {
            let (khz, boot_ns) = match info.platform_info {
                PlatformInfo::Uhyve {
                    cpu_freq,
                    boot_time,
                    ..
                } => (
                    cpu_freq.map(|f| u64::from(f.get())),
                    Some(boot_time.unix_timestamp_nanos()),
                ),
                _ => (None, None),
            };
            let khz = khz
                .or_else(|| {
                    fdt.and_then(|f| f.int_property("/hermit,tsc", "khz"))
                        .filter(|&k| k != 0)
                })
                .unwrap_or_else(time::calibrate_tsc_khz);
            let unix = boot_ns.and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
            time::init_fixed(khz, unix);
        }
    }

    let args = args::parse(bootargs);
    apic::init();
    crate::run_app(args)
}

/// The device tree the loader put at `addr`, if it is one.
fn device_tree(addr: u64) -> Option<Fdt<'static>> {
    const MAX: usize = 1 << 20;
    // SAFETY: the loader put a device tree (at least its 40-byte header) at
    // `addr` in identity-mapped RAM; it stays there for the VM's life.
    let header = unsafe { core::slice::from_raw_parts(addr as *const u8, 40) };
    let total = Fdt::total_size(header)?.min(MAX);
    // SAFETY: as above; the header says the tree is `total` bytes long.
    Fdt::new(unsafe { core::slice::from_raw_parts(addr as *const u8, total) })
}

/// `struct hvm_start_info` (Xen PVH ABI), the part we read.
#[repr(C)]
#[derive(Clone, Copy)]
struct HvmStartInfo {
    magic: u32,
    version: u32,
    flags: u32,
    nr_modules: u32,
    modlist_paddr: u64,
    cmdline_paddr: u64,
    rsdp_paddr: u64,
    memmap_paddr: u64,
    memmap_entries: u32,
    reserved: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct HvmMemmapEntry {
    addr: u64,
    size: u64,
    kind: u32,
    reserved: u32,
}

const HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const PVH_MAPPED_END: u64 = 4 << 30;

/// PVH entry (QEMU). Called from the 32-bit stub after relocation.
pub extern "C" fn pvh_main(start_info: u64) -> ! {
    PLATFORM.store(Platform::Pvh as u8, Ordering::Relaxed);
    idt::init(idt::code_selector());
    // SAFETY: QEMU passes the physical address of its start info in ebx;
    // the first 4 GiB are identity-mapped.
    let si = unsafe { core::ptr::read(start_info as *const HvmStartInfo) };
    if si.magic != HVM_START_MAGIC {
        crate::console::write_fmt(format_args!(
            "ferry-runtime: bad PVH start info magic {:#x}\n",
            si.magic
        ));
        exit(103);
    }
    let kernel_end = align_up(image_end(), PAGE);
    let mut ram = Ram {
        start: kernel_end,
        end: kernel_end,
    };
    if si.version >= 1 && si.memmap_paddr != 0 {
        for i in 0..si.memmap_entries.min(128) as u64 {
            // SAFETY: the table has `memmap_entries` entries at `memmap_paddr`.
            let e = unsafe {
                core::ptr::read(
                    (si.memmap_paddr + i * core::mem::size_of::<HvmMemmapEntry>() as u64)
                        as *const HvmMemmapEntry,
                )
            };
            let end = e.addr.saturating_add(e.size).min(PVH_MAPPED_END);
            if e.kind == E820_RAM && e.addr <= kernel_end && end > kernel_end {
                ram.end = end;
            }
        }
    }
    heap::init(ram.start, ram.end);
    let cmdline = if si.cmdline_paddr == 0 {
        ""
    } else {
        // SAFETY: QEMU's command line is a NUL-terminated string in low memory.
        unsafe { c_str(si.cmdline_paddr as *const u8, 4096) }
    };
    enter_native_mode(cmdline, true);
    time::init_fixed(time::calibrate_tsc_khz(), 0);
    let args = args::parse(cmdline);
    apic::init();
    crate::run_app(args)
}

/// # Safety
/// `p` must point to readable memory up to a NUL or `max` bytes.
unsafe fn c_str(p: *const u8, max: usize) -> &'static str {
    let mut len = 0;
    // SAFETY: the caller guarantees readability up to NUL or `max`.
    while len < max && unsafe { *p.add(len) } != 0 {
        len += 1;
    }
    // SAFETY: as above, `len` bytes are readable.
    let bytes = unsafe { core::slice::from_raw_parts(p, len) };
    core::str::from_utf8(bytes).unwrap_or("")
}

const fn align_up(v: u64, a: u64) -> u64 {
    (v + a - 1) & !(a - 1)
}
