//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC), as `virtio-drivers`'
//! [`ConfigurationAccess`], and the HAL it needs (identity mapping).

use core::ptr::NonNull;

use virtio_drivers::transport::pci::bus::{ConfigurationAccess, DeviceFunction};
use virtio_drivers::{BufferDirection, Hal, PhysAddr};

use crate::arch::cpu::{inl, outl};

const CONFIG_ADDRESS: u16 = 0xCF8;
const CONFIG_DATA: u16 = 0xCFC;

/// Configuration space through I/O ports. Single vCPU, and the runtime is
/// not re-entered from interrupts, so address/data pairs cannot interleave.
#[derive(Debug, Default)]
pub struct PortCam;

fn address(f: DeviceFunction, register: u8) -> u32 {
    0x8000_0000
        | u32::from(f.bus) << 16
        | u32::from(f.device) << 11
        | u32::from(f.function) << 8
        | u32::from(register & 0xFC)
}

impl ConfigurationAccess for PortCam {
    fn read_word(&self, f: DeviceFunction, register: u8) -> u32 {
        outl(CONFIG_ADDRESS, address(f, register));
        inl(CONFIG_DATA)
    }

    fn write_word(&mut self, f: DeviceFunction, register: u8, data: u32) {
        outl(CONFIG_ADDRESS, address(f, register));
        outl(CONFIG_DATA, data);
    }

    unsafe fn unsafe_clone(&self) -> Self {
        PortCam
    }
}

/// The runtime's HAL for `virtio-drivers`: guest memory is identity-mapped
/// (virtual = physical), including the MMIO hole.
#[derive(Debug)]
pub struct IdentityHal;

// SAFETY: dma_alloc returns zeroed, page-aligned memory that stays
// allocated until dma_dealloc, with phys == virt (identity mapping); share
// gives the buffer's own address, which the device may use until unshare.
unsafe impl Hal for IdentityHal {
    fn dma_alloc(pages: usize, _direction: BufferDirection) -> (PhysAddr, NonNull<u8>) {
        let layout = core::alloc::Layout::from_size_align(pages * 4096, 4096).expect("layout");
        // SAFETY: the layout has a non-zero size (pages >= 1 by the trait's use).
        let p = unsafe { alloc::alloc::alloc_zeroed(layout) };
        let p = NonNull::new(p).unwrap_or_else(|| alloc::alloc::handle_alloc_error(layout));
        (p.as_ptr() as PhysAddr, p)
    }

    unsafe fn dma_dealloc(_paddr: PhysAddr, vaddr: NonNull<u8>, pages: usize) -> i32 {
        let layout = core::alloc::Layout::from_size_align(pages * 4096, 4096).expect("layout");
        // SAFETY: the caller passes back what dma_alloc returned, same size.
        unsafe { alloc::alloc::dealloc(vaddr.as_ptr(), layout) };
        0
    }

    unsafe fn mmio_phys_to_virt(paddr: PhysAddr, _size: usize) -> NonNull<u8> {
        NonNull::new(paddr as *mut u8).expect("MMIO at address 0")
    }

    unsafe fn share(buffer: NonNull<[u8]>, _direction: BufferDirection) -> PhysAddr {
        buffer.as_ptr() as *mut u8 as PhysAddr
    }

    unsafe fn unshare(_paddr: PhysAddr, _buffer: NonNull<[u8]>, _direction: BufferDirection) {}
}
