//! Fuzzes the migration stream's framing and page messages as the
//! destination reads them. Nothing may panic or allocate past the bounds.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut r = data;
    for _ in 0..16 {
        match ferry::migration::recv(&mut r) {
            Ok((_, payload)) => {
                let _ = ferry::migration::decode_pages(&payload);
            }
            Err(_) => break,
        }
    }
    let _ = ferry::migration::decode_pages(data);
});
