//! Fuzzes the snapshot decoder: the header (against any file size) and the
//! archived VM state. Neither may panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let size = data.len() as u64;
    let _ = ferry::snapshot::Header::decode("fuzz", data, size);
    let _ = ferry::snapshot::Header::decode("fuzz", data, u64::MAX);
    if let Ok(state) = ferry::snapshot::decode_state("fuzz", data) {
        // Whatever validated must serialize again.
        let _ = ferry::snapshot::encode_state(&state);
    }
});
