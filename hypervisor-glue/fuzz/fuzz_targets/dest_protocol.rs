//! Fuzzes the destination's protocol state machine with a scripted stream:
//! the input is a sequence of frames (2-byte length, then a message as the
//! channel would deliver it), fed in order to a destination receiving into
//! a flat guest. It may refuse, never panic; it finishes only after the
//! capture started, the state loaded and the rest of the vCPU's state
//! loaded, each exactly once, in that order.
#![no_main]

use ferry::migration::Error;
use ferry::migration::dest::{Arrival, Next, Receiving};
use ferry::migration::wire::Message;
use libfuzzer_sys::fuzz_target;

struct Flat {
    mem: Vec<u8>,
    captures: usize,
    loads: usize,
    rests: usize,
}

impl Arrival for Flat {
    fn write(&mut self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let start = usize::try_from(gpa).map_err(|_| "far")?;
        let end = start.checked_add(data.len()).ok_or("wraps")?;
        self.mem
            .get_mut(start..end)
            .ok_or("outside")?
            .copy_from_slice(data);
        Ok(())
    }
    fn start_capture(&mut self) -> Result<(), Error> {
        assert_eq!((self.captures, self.loads), (0, 0), "capture twice or after the state");
        self.captures += 1;
        Ok(())
    }
    fn load(&mut self, _: &[u8]) -> Result<(), Error> {
        assert_eq!((self.captures, self.loads), (1, 0), "state before capture, or twice");
        self.loads += 1;
        Ok(())
    }
    fn load_rest(&mut self, _: &[u8]) -> Result<(), Error> {
        assert_eq!((self.loads, self.rests), (1, 0), "vCPU rest before the state, or twice");
        self.rests += 1;
        Ok(())
    }
}

fuzz_target!(|data: &[u8]| {
    let mut vm = Flat {
        mem: vec![0; 1 << 16],
        captures: 0,
        loads: 0,
        rests: 0,
    };
    let mut at = Receiving::Copying;
    let mut rest = data;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (frame, tail) = rest[2..].split_at(n);
        rest = tail;
        let Ok(msg) = Message::decode(frame) else {
            return;
        };
        match at.on(msg, &mut vm) {
            Err(_) => return,
            Ok(Next::Finished) => {
                assert_eq!((vm.captures, vm.loads, vm.rests), (1, 1, 1));
                return;
            }
            Ok(Next::CaptureOn) => assert_eq!(at, Receiving::Capturing),
            // A Sync is answered only between capture and the state.
            Ok(Next::Synced(_)) => assert_eq!(at, Receiving::Capturing),
            // Pausing comes once, after capture and before the state.
            Ok(Next::Stopping) => {
                assert_eq!(at, Receiving::Stopping);
                assert_eq!((vm.captures, vm.loads), (1, 0));
            }
            // The state loads once, then the vCPU's rest once; only the
            // last pages and Done follow them.
            Ok(Next::Wait) if at == Receiving::Loaded => assert_eq!((vm.loads, vm.rests), (1, 1)),
            Ok(Next::Wait) if at == Receiving::Loading => assert_eq!((vm.loads, vm.rests), (1, 0)),
            Ok(Next::Wait) => assert_eq!((vm.loads, vm.rests), (0, 0)),
        }
    }
});
