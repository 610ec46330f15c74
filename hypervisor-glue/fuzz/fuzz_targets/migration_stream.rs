//! Fuzzes what a migration's destination decodes from the other side: the
//! protocol's messages (every one that decodes must encode back to itself)
//! and the receiver/VM-process messages. Nothing may panic or allocate
//! past its bounds.
#![no_main]

use ferry::migration::dest;
use ferry::migration::wire::Message;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(m) = Message::decode(data) {
        let mut again = Vec::new();
        m.encode(&mut again);
        assert_eq!(Message::decode(&again).expect("re-encoded"), m);
    }
    let _ = dest::decode_report(data);
    let _ = dest::Handoff::decode(data);
});
