//! The global allocator: a linked-list heap over the RAM after the image.

use linked_list_allocator::LockedHeap;

#[global_allocator]
static HEAP: LockedHeap = LockedHeap::empty();

/// Gives the heap `[start, end)`. Called once at boot.
pub(crate) fn init(start: u64, end: u64) {
    let size = end.saturating_sub(start) as usize;
    if size < 64 * 1024 {
        crate::console::write_fmt(format_args!(
            "ferry-runtime: only {size} bytes of RAM after the image; give the VM more memory\n"
        ));
        crate::platform::exit(104);
    }
    // SAFETY: the platform code hands over RAM after the image that nothing
    // else uses, identity-mapped; called once, before any allocation.
    unsafe { HEAP.lock().init(start as *mut u8, size) }
}

/// Bytes of heap in use and free.
pub fn usage() -> (usize, usize) {
    let heap = HEAP.lock();
    (heap.used(), heap.free())
}
