//! Booting a Hermit-ABI image: load the ELF, write the boot structures the
//! Hermit entry ABI expects (GDT, identity page tables, device tree, boot
//! info) at the addresses in [`ferry_abi::layout`], and say where the vCPU
//! starts.
//!
//! The guest enters in 64-bit long mode with all RAM (and the MMIO hole
//! below 4 GiB) identity-mapped with 2 MiB pages, `rdi` = boot info,
//! `rsi` = CPU id 0: the same state uhyve gives, so the same image boots on
//! both.

pub mod elf;

use std::num::{NonZeroU32, NonZeroU64};
use std::time::SystemTime;

use ferry_abi::layout::{
    BOOT_INFO_ADDR, BOOT_STACK_TOP, CLOCK_PAGE_ADDR, FDT_ADDR, FDT_MAX_SIZE, GDT_ADDR,
    PAGE_TABLES_END, PD_ADDR, PML4_ADDR,
};
use hermit_entry::boot_info::{
    BootInfo, HardwareInfo, LoadInfo, PlatformInfo, RawBootInfo, TlsInfo,
};

use crate::memory::{self, GuestRam};

/// Bytes the guest must have after its image (heap and slack).
pub const MIN_FREE_AFTER_IMAGE: u64 = 1 << 20;

/// Boot errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The image was refused.
    #[error(transparent)]
    Image(#[from] elf::Error),
    /// The command line is too long for the device tree.
    #[error("the guest command line is {0} bytes; at most {max} fit", max = MAX_CMDLINE)]
    CmdlineTooLong(usize),
    /// Building the device tree failed.
    #[error("building the device tree: {0}")]
    Fdt(String),
    /// Writing boot structures into guest memory failed.
    #[error("writing boot structures: {0}")]
    Memory(#[from] memory::Error),
}

/// Longest command line passed to the guest.
pub const MAX_CMDLINE: usize = 8 * 1024;

/// Selectors of the boot GDT.
pub const CODE_SELECTOR: u16 = 0x08;
/// Data segment selector.
pub const DATA_SELECTOR: u16 = 0x10;

/// How the boot vCPU starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootCpu {
    /// Entry point.
    pub rip: u64,
    /// Initial stack pointer.
    pub rsp: u64,
    /// First argument: the boot info address.
    pub rdi: u64,
    /// Page-table root.
    pub cr3: u64,
    /// GDT base and limit.
    pub gdt: (u64, u16),
}

/// What the guest is told at boot.
#[derive(Clone, Debug)]
pub struct BootParams<'a> {
    /// The command line (`[runtime args] -- [app args]`).
    pub cmdline: &'a str,
    /// TSC rate of this host in kHz.
    pub tsc_khz: u32,
    /// Number of vCPUs.
    pub cpus: u32,
    /// Tell the guest to switch to PVM native mode first thing (the host is
    /// PVM and the guest was not told `pvm.native=0`).
    pub pvm_native: bool,
    /// The VM has PCI devices (a Hermit kernel scans PCI only then).
    pub has_pci: bool,
}

/// Loads `image` and writes every boot structure; returns the boot vCPU state.
pub fn setup(
    mem: &GuestRam,
    image: &[u8],
    params: &BootParams<'_>,
) -> Result<(BootCpu, elf::LoadedImage), Error> {
    let img = elf::Image::parse(image)?;
    let loaded = img.load(mem, MIN_FREE_AFTER_IMAGE)?;
    write_gdt(mem)?;
    write_page_tables(mem)?;
    write_fdt(mem, params)?;
    write_boot_info(mem, &loaded, params)?;
    write_boot_hints(mem, params)?;
    let cpu = BootCpu {
        rip: loaded.entry,
        rsp: BOOT_STACK_TOP,
        rdi: BOOT_INFO_ADDR,
        cr3: PML4_ADDR,
        gdt: (GDT_ADDR, 3 * 8 - 1),
    };
    Ok((cpu, loaded))
}

// The hints share the boot info's page: the boot info must end before them.
const _: () = assert!(
    std::mem::size_of::<hermit_entry::boot_info::RawBootInfo>() as u64
        <= ferry_abi::layout::BOOT_HINTS_OFFSET
);

fn write_boot_hints(mem: &GuestRam, params: &BootParams<'_>) -> Result<(), Error> {
    let hints = ferry_abi::BootHints {
        magic: ferry_abi::BootHints::MAGIC,
        abi_version: ferry_abi::ABI_VERSION,
        flags: ferry_abi::BootHints::CLOCK_PAGE
            | ferry_abi::BootHints::IDENTITY_MAPPED
            | ferry_abi::BootHints::EDGE_INTERRUPTS
            | if params.pvm_native {
                ferry_abi::BootHints::PVM_NATIVE
            } else {
                0
            },
    };
    memory::write_value(mem, ferry_abi::layout::BOOT_HINTS_ADDR, hints)?;
    Ok(())
}

/// Null, 64-bit code (ring 0), data.
pub const GDT: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];

fn write_gdt(mem: &GuestRam) -> Result<(), Error> {
    for (i, e) in GDT.iter().enumerate() {
        memory::write_u64(mem, GDT_ADDR + 8 * i as u64, *e)?;
    }
    Ok(())
}

/// Present, writable and user (U/S=1). The user bit matters on PVM: a
/// guest in native mode runs its ring 0 on hardware ring 3, and a
/// supervisor-only page faults there forever.
const PRESENT_WRITABLE: u64 = 0b111;
const HUGE: u64 = 1 << 7;
const GIB: u64 = 1 << 30;

/// Identity-maps `[0, max(4 GiB, end of RAM))` with 2 MiB pages: RAM and
/// the MMIO hole below 4 GiB.
fn write_page_tables(mem: &GuestRam) -> Result<(), Error> {
    let pdpt = PML4_ADDR + 0x1000;
    let gibs = memory::ram_end(mem).max(4 * GIB).div_ceil(GIB);
    debug_assert!(
        PD_ADDR + gibs * 0x1000 <= PAGE_TABLES_END,
        "memory::MAX_MEMORY keeps this in bounds"
    );
    memory::write_u64(mem, PML4_ADDR, pdpt | PRESENT_WRITABLE)?;
    let mut pd_bytes = vec![0u8; 0x1000];
    for g in 0..gibs {
        let pd = PD_ADDR + g * 0x1000;
        memory::write_u64(mem, pdpt + 8 * g, pd | PRESENT_WRITABLE)?;
        for (i, e) in pd_bytes.chunks_exact_mut(8).enumerate() {
            let phys = g * GIB + ((i as u64) << 21);
            e.copy_from_slice(&(phys | PRESENT_WRITABLE | HUGE).to_le_bytes());
        }
        memory::write(mem, pd, &pd_bytes)?;
    }
    Ok(())
}

fn write_fdt(mem: &GuestRam, params: &BootParams<'_>) -> Result<(), Error> {
    if params.cmdline.len() > MAX_CMDLINE {
        return Err(Error::CmdlineTooLong(params.cmdline.len()));
    }
    let fdt = build_fdt(mem, params).map_err(|e| Error::Fdt(e.to_string()))?;
    if fdt.len() as u64 > FDT_MAX_SIZE {
        return Err(Error::Fdt(format!(
            "{} bytes, more than the {FDT_MAX_SIZE} reserved",
            fdt.len()
        )));
    }
    memory::write(mem, FDT_ADDR, &fdt)?;
    Ok(())
}

fn build_fdt(mem: &GuestRam, params: &BootParams<'_>) -> Result<Vec<u8>, vm_fdt::Error> {
    let mut w = vm_fdt::FdtWriter::new()?;
    let root = w.begin_node("")?;
    w.property_string_list(
        "compatible",
        vec!["ferry,vmm".into(), "hermit,uhyve".into()],
    )?;
    w.property_u32("#address-cells", 2)?;
    w.property_u32("#size-cells", 2)?;

    let chosen = w.begin_node("chosen")?;
    w.property_string("bootargs", params.cmdline)?;
    w.end_node(chosen)?;

    let reg: Vec<u64> = memory::ram_ranges(memory::ram_end(mem))
        .into_iter()
        .flat_map(|(a, l)| [a, l])
        .collect();
    let memory_node = w.begin_node("memory@0")?;
    w.property_string("device_type", "memory")?;
    w.property_array_u64("reg", &reg)?;
    w.end_node(memory_node)?;

    let cpus = w.begin_node("cpus")?;
    w.property_u32("#address-cells", 1)?;
    w.property_u32("#size-cells", 0)?;
    for id in 0..params.cpus {
        let cpu = w.begin_node(&format!("cpu@{id}"))?;
        w.property_string("device_type", "cpu")?;
        w.property_u32("reg", id)?;
        w.end_node(cpu)?;
    }
    w.end_node(cpus)?;

    let tsc = w.begin_node("hermit,tsc")?;
    w.property_u32("khz", params.tsc_khz)?;
    w.end_node(tsc)?;

    let vmm = w.begin_node(ferry_abi::fdt::VMM_NODE)?;
    w.property_u32(ferry_abi::fdt::ABI_VERSION_PROP, ferry_abi::ABI_VERSION)?;
    w.property_u64(ferry_abi::fdt::CLOCK_PAGE_PROP, CLOCK_PAGE_ADDR)?;
    w.end_node(vmm)?;

    w.end_node(root)?;
    w.finish()
}

fn write_boot_info(
    mem: &GuestRam,
    loaded: &elf::LoadedImage,
    params: &BootParams<'_>,
) -> Result<(), Error> {
    let info = BootInfo {
        hardware_info: HardwareInfo {
            phys_addr_range: 0..memory::ram_end(mem),
            // The console is a hypercall, but a Hermit kernel insists on a
            // serial port to build its console on.
            serial_port_base: std::num::NonZeroU16::new(0x3f8),
            device_tree: NonZeroU64::new(FDT_ADDR),
        },
        load_info: LoadInfo {
            kernel_image_addr_range: loaded.range.clone(),
            tls_info: loaded.tls.map(|t| TlsInfo {
                start: t.start,
                filesz: t.filesz,
                memsz: t.memsz,
                align: t.align,
            }),
        },
        platform_info: PlatformInfo::Uhyve {
            has_pci: params.has_pci,
            num_cpus: NonZeroU64::new(u64::from(params.cpus.max(1))).expect("at least 1"),
            cpu_freq: NonZeroU32::new(params.tsc_khz),
            boot_time: boot_time(),
        },
    };
    memory::write_value(mem, BOOT_INFO_ADDR, RawBootInfo::from(info))?;
    Ok(())
}

fn boot_time() -> time::OffsetDateTime {
    let ns = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_nanos() as i128)
        .unwrap_or(0);
    time::OffsetDateTime::from_unix_timestamp_nanos(ns).unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_tables_identity_map_ram_and_hole() {
        let mem = memory::create(64 << 20).unwrap();
        write_page_tables(&mem).unwrap();
        let pdpt = memory::read_u64(&mem, PML4_ADDR).unwrap() & !0xFFF;
        // 3 GiB + 2 MiB lies in PD 3, entry 1
        let pd3 = memory::read_u64(&mem, pdpt + 3 * 8).unwrap() & !0xFFF;
        let e = memory::read_u64(&mem, pd3 + 8).unwrap();
        assert_eq!(e & !0xFFF, 3 * GIB + (2 << 20));
        assert_eq!(e & (HUGE | PRESENT_WRITABLE), HUGE | PRESENT_WRITABLE);
    }

    #[test]
    fn overlong_command_lines_are_refused() {
        let mem = memory::create(64 << 20).unwrap();
        let long = "x".repeat(MAX_CMDLINE + 1);
        let p = BootParams {
            cmdline: &long,
            tsc_khz: 1,
            cpus: 1,
            pvm_native: false,
            has_pci: false,
        };
        assert!(matches!(write_fdt(&mem, &p), Err(Error::CmdlineTooLong(_))));
    }
}
