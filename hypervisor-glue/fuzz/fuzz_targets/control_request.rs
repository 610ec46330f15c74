//! Fuzzes the control socket's requests: any line either parses into a
//! request that serializes back to itself, or is refused; what parses is
//! checked (a migration's parameters, a snapshot's key) without panicking.
#![no_main]

use ferry::api::{self, Request};
use ferry::migration::source::Params;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(req) = api::parse(line) else {
        return;
    };
    let again = serde_json::to_string(&req).expect("requests serialize");
    assert_eq!(api::parse(&again).expect("re-parses"), req);
    match &req {
        Request::Migrate(m) => {
            let _ = Params::from_request(m);
        }
        Request::Resolve { .. } => {}
        _ => {
            // No file came with it: a snapshot is refused, the rest pass.
            let cmd = api::into_command(req.clone(), Vec::new());
            assert_eq!(cmd.is_err(), matches!(req, Request::Snapshot { .. }));
        }
    }
});
