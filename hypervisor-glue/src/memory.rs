//! Guest memory: anonymous host mappings registered with KVM, with a dirty
//! bitmap of the pages the VMM itself writes (vm-memory's `AtomicBitmap`),
//! which live migration adds to KVM's own dirty log.
//!
//! RAM is laid out below the MMIO hole (`[0, 3 GiB)`) and, for larger
//! guests, continues at 4 GiB. Every access from the VMM goes through
//! vm-memory's bounds-checked `Bytes` interface: the VMM never reads or
//! writes outside guest memory, whatever address the guest hands it.

use ferry_abi::layout::{MMIO_HOLE_END, MMIO_HOLE_START};
use vm_memory::bitmap::{AtomicBitmap, Bitmap};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryError, GuestMemoryRegion};

/// Guest RAM.
pub type GuestRam = vm_memory::GuestMemoryMmap<AtomicBitmap>;

/// Smallest guest memory accepted.
pub const MIN_MEMORY: u64 = 4 << 20;
/// Largest guest memory accepted (bounded by the boot page tables).
pub const MAX_MEMORY: u64 = 32 << 30;

/// Memory errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The size is out of range or not page-aligned.
    #[error("memory size {size} bytes is not usable: it must be a multiple of 4 KiB between {} MiB and {} GiB", MIN_MEMORY >> 20, MAX_MEMORY >> 30)]
    BadSize {
        /// The size asked for.
        size: u64,
    },
    /// The host could not map the memory.
    #[error("cannot map {size} bytes of guest memory: {source}")]
    Map {
        /// The size asked for.
        size: u64,
        /// What vm-memory said.
        source: vm_memory::mmap::FromRangesError,
    },
    /// A snapshot's memory could not be mapped.
    #[error("cannot map {size} bytes of snapshot memory: {why}")]
    MapFile {
        /// Bytes of memory.
        size: u64,
        /// What failed.
        why: String,
    },
    /// A guest-physical range is not RAM.
    #[error("guest-physical range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfRange {
        /// Start of the range.
        addr: u64,
        /// Its length.
        len: u64,
    },
}

/// The guest-physical RAM ranges for `size` bytes: `(start, len)`.
pub fn ram_ranges(size: u64) -> Vec<(u64, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(0, size)]
    } else {
        vec![
            (0, MMIO_HOLE_START),
            (MMIO_HOLE_END, size - MMIO_HOLE_START),
        ]
    }
}

/// Maps `size` bytes of zeroed guest RAM.
pub fn create(size: u64) -> Result<GuestRam, Error> {
    if !(MIN_MEMORY..=MAX_MEMORY).contains(&size) || !size.is_multiple_of(4096) {
        return Err(Error::BadSize { size });
    }
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(size)
        .into_iter()
        .map(|(a, l)| (GuestAddress(a), l as usize))
        .collect();
    GuestRam::from_ranges(&ranges).map_err(|source| Error::Map { size, source })
}

/// Asks the kernel to back `mem` with 2 MiB pages where it can: for a
/// migration's destination, which writes all of it (a fault per 4 KiB page
/// costs more than the copying). Not for a VM that boots: it touches a
/// few pages, and zeroing a 2 MiB page for each costs its boot time.
pub fn prefer_huge_pages(mem: &GuestRam) {
    for r in mem.iter() {
        // SAFETY: advice on a mapping this process owns, of exactly its
        // length; it changes how the kernel backs it, never its contents.
        unsafe { libc::madvise(r.as_ptr().cast(), r.len() as usize, libc::MADV_HUGEPAGE) };
    }
}

/// Maps guest RAM from a snapshot file, copy-on-write: `ranges` are the
/// RAM regions and the memory image starts at `offset` in `file`, region
/// after region. Pages the guest writes become private to this process; the
/// file is never modified.
pub fn map_file(
    file: &std::fs::File,
    offset: u64,
    ranges: &[(u64, u64)],
) -> Result<GuestRam, Error> {
    use vm_memory::bitmap::AtomicBitmap;
    use vm_memory::mmap::{GuestRegionMmap, MmapRegionBuilder};
    let size: u64 = ranges.iter().map(|r| r.1).sum();
    let mut regions = Vec::with_capacity(ranges.len());
    let mut at = offset;
    for &(start, len) in ranges {
        let map_err = |e: vm_memory::mmap::MmapRegionError| Error::MapFile {
            size,
            why: e.to_string(),
        };
        let f = file.try_clone().map_err(|e| Error::MapFile {
            size,
            why: e.to_string(),
        })?;
        let bitmap = AtomicBitmap::new(
            len as usize,
            std::num::NonZeroUsize::new(4096).expect("page"),
        );
        let region = MmapRegionBuilder::new_with_bitmap(len as usize, bitmap)
            .with_file_offset(vm_memory::FileOffset::new(f, at))
            .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
            .with_mmap_flags(libc::MAP_PRIVATE | libc::MAP_NORESERVE)
            .build()
            .map_err(map_err)?;
        let r = GuestRegionMmap::new(region, GuestAddress(start)).ok_or(Error::MapFile {
            size,
            why: format!("region at {start:#x} overflows"),
        })?;
        regions.push(r);
        at += len;
    }
    GuestRam::from_regions(regions).map_err(|e| Error::MapFile {
        size,
        why: e.to_string(),
    })
}

/// Every RAM region as a byte slice, in address order.
///
/// # Safety
///
/// Nothing may write guest memory while the slices live: the vCPU is
/// stopped and the devices are paused.
pub unsafe fn region_slices(mem: &GuestRam) -> Vec<&[u8]> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region maps `len` bytes at `as_ptr()` for as long as
            // `mem` lives; the caller guarantees there are no writers.
            unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) }
        })
        .collect()
}

/// Guest memory as mutable byte slices, region after region.
///
/// # Safety
///
/// Nothing else may read or write guest memory while the slices live (no
/// vCPU runs, no device works on it).
// Guest memory is a shared mapping, written through `&GuestRam` everywhere
// (vm-memory's model); the safety contract stands in for `&mut`.
#[allow(clippy::mut_from_ref)]
pub unsafe fn region_slices_mut(mem: &GuestRam) -> Vec<&mut [u8]> {
    mem.iter()
        .map(|r| {
            // SAFETY: the region maps `len` bytes at `as_ptr()` for as long
            // as `mem` lives; the caller guarantees nobody else touches them.
            unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) }
        })
        .collect()
}

/// The end of the last RAM range (one past the highest RAM address).
pub fn ram_end(mem: &GuestRam) -> u64 {
    mem.iter()
        .map(|r| r.start_addr().0 + r.len())
        .max()
        .unwrap_or(0)
}

fn range_err(addr: u64, len: usize) -> impl FnOnce(GuestMemoryError) -> Error {
    move |_| Error::OutOfRange {
        addr,
        len: len as u64,
    }
}

/// Copies `buf` into guest memory at `addr`.
pub fn write(mem: &GuestRam, addr: u64, buf: &[u8]) -> Result<(), Error> {
    mem.write_slice(buf, GuestAddress(addr))
        .map_err(range_err(addr, buf.len()))
}

/// Copies guest memory at `addr` into `buf`.
pub fn read(mem: &GuestRam, addr: u64, buf: &mut [u8]) -> Result<(), Error> {
    mem.read_slice(buf, GuestAddress(addr))
        .map_err(range_err(addr, buf.len()))
}

/// Reads a little-endian u64.
pub fn read_u64(mem: &GuestRam, addr: u64) -> Result<u64, Error> {
    let mut b = [0u8; 8];
    read(mem, addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Writes a little-endian u64.
pub fn write_u64(mem: &GuestRam, addr: u64, v: u64) -> Result<(), Error> {
    write(mem, addr, &v.to_le_bytes())
}

/// Writes a plain `repr(C)` value (no pointers the VMM relies on) at `addr`.
///
/// Padding bytes keep whatever the guest memory held; they are never read
/// back by the VMM.
pub fn write_value<T: Copy>(mem: &GuestRam, addr: u64, value: T) -> Result<(), Error> {
    let len = std::mem::size_of::<T>();
    let slice = mem
        .get_slice(GuestAddress(addr), len)
        .map_err(range_err(addr, len))?;
    let guard = slice.ptr_guard_mut();
    // SAFETY: `get_slice` checked that `len` bytes at `addr` are mapped guest
    // memory, which stays mapped while `mem` lives; the write is unaligned-
    // safe and `T: Copy` has no drop glue.
    unsafe { std::ptr::write_unaligned(guard.as_ptr().cast::<T>(), value) };
    slice.bitmap().mark_dirty(0, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_are_bounded() {
        assert!(matches!(create(0), Err(Error::BadSize { .. })));
        assert!(matches!(
            create(MIN_MEMORY - 4096),
            Err(Error::BadSize { .. })
        ));
        assert!(matches!(
            create(MAX_MEMORY + 4096),
            Err(Error::BadSize { .. })
        ));
        assert!(matches!(create(MIN_MEMORY + 1), Err(Error::BadSize { .. })));
        assert!(create(MIN_MEMORY).is_ok());
    }

    #[test]
    fn large_memory_skips_the_mmio_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(0, 1 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }

    #[test]
    fn accesses_outside_ram_fail() {
        let mem = create(MIN_MEMORY).unwrap();
        assert!(write(&mem, MIN_MEMORY - 4, &[0; 8]).is_err());
        assert!(read_u64(&mem, u64::MAX - 3).is_err());
        write_u64(&mem, 8, 0x1122).unwrap();
        assert_eq!(read_u64(&mem, 8).unwrap(), 0x1122);
        assert_eq!(ram_end(&mem), MIN_MEMORY);
    }
}
