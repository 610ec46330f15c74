//! Fuzzes the ELF loader: parsing any bytes, and loading what parses into
//! a small guest. Nothing may panic, overflow or allocate past its bounds;
//! what loads lies inside guest memory.
#![no_main]

use std::sync::OnceLock;

use ferry::boot::elf::Image;
use ferry::memory::{self, GuestRam};
use libfuzzer_sys::fuzz_target;

fn guest() -> &'static GuestRam {
    static MEM: OnceLock<GuestRam> = OnceLock::new();
    MEM.get_or_init(|| memory::create(memory::MIN_MEMORY).expect("guest memory"))
}

fuzz_target!(|data: &[u8]| {
    let Ok(image) = Image::parse(data) else {
        return;
    };
    let range = image.load_range();
    assert!(range.start <= range.end);
    if let Ok(loaded) = image.load(guest(), 0) {
        assert!(loaded.range.end <= memory::ram_end(guest()));
        assert!(loaded.range.contains(&loaded.entry));
    }
});
