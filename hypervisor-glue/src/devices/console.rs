//! The console: uhyve's serial hypercalls (write one byte, write a buffer).
//!
//! The guest passes the guest-physical address of a `{len, buf}` block in
//! `rdi`; both the block and the buffer are read through bounds-checked
//! guest-memory accesses, and `len` is capped at
//! [`ferry_abi::SERIAL_WRITE_MAX`].
//!
//! The output reaches an operator's terminal or log, so the guest does not
//! get to drive it: control characters (but newline and tab) are written
//! as `\xNN`, a line the guest starts with `ferry:` gets a `[guest] `
//! prefix (it cannot pass for Ferry's own messages), and past
//! [`RATE`] bytes a second (after a [`BURST`]) output is dropped, counted,
//! and said once a second.

use std::io::Write;

use ferry_abi::SERIAL_WRITE_MAX;

use crate::memory::{self, GuestRam};

/// What the guest did wrong.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The parameter block is not in guest memory.
    #[error("console write: parameter block at {0:#x} is outside guest memory")]
    ParamsOutside(u64),
    /// The buffer is not in guest memory.
    #[error("console write: buffer {addr:#x}+{len:#x} is outside guest memory")]
    BufferOutside {
        /// Buffer address.
        addr: u64,
        /// Buffer length.
        len: u64,
    },
    /// The buffer is longer than allowed.
    #[error("console write of {0} bytes; at most {SERIAL_WRITE_MAX} per call")]
    TooLong(u64),
}

/// Saved console state (the console keeps none that the guest can see).
#[derive(
    Clone, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct ConsoleState {
    /// Bytes the guest has written so far.
    pub bytes_written: u64,
}

/// Guest output passed per second, bytes (after [`BURST`]).
pub const RATE: u64 = 256 << 10;
/// Guest output passed at once before [`RATE`] applies, bytes.
pub const BURST: u64 = 1 << 20;
/// What a guest line may not start with.
const OURS: &[u8] = b"ferry:";

/// The console device.
pub struct Console {
    out: Box<dyn Write + Send>,
    bytes_written: u64,
    lost: u64,
    /// Dropped by the rate limit.
    dropped: u64,
    /// Output the rate allows now, bytes.
    allowance: f64,
    refilled: std::time::Instant,
    /// Dropped since the last notice, and when that was.
    unsaid: u64,
    said: std::time::Instant,
    /// The start of the current line while it could still be `ferry:`.
    head: Vec<u8>,
    at_line_start: bool,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("bytes_written", &self.bytes_written)
            .finish()
    }
}

impl Console {
    /// A console writing to `out`.
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        Console::with(out, 0)
    }

    /// Handles the write-buffer hypercall with parameter block at `params`.
    pub fn write_buffer(&mut self, mem: &GuestRam, params: u64) -> Result<(), Error> {
        let mut block = [0u8; 16];
        memory::read(mem, params, &mut block).map_err(|_| Error::ParamsOutside(params))?;
        let len = u64::from_le_bytes(block[..8].try_into().expect("8 bytes"));
        let addr = u64::from_le_bytes(block[8..].try_into().expect("8 bytes"));
        if len > SERIAL_WRITE_MAX {
            return Err(Error::TooLong(len));
        }
        let mut buf = vec![0u8; len as usize];
        memory::read(mem, addr, &mut buf).map_err(|_| Error::BufferOutside { addr, len })?;
        self.emit(&buf)
    }

    /// Writes guest bytes already read from its memory (at most
    /// [`SERIAL_WRITE_MAX`]).
    pub fn write_bytes(&mut self, bytes: &[u8]) -> Result<(), Error> {
        if bytes.len() as u64 > SERIAL_WRITE_MAX {
            return Err(Error::TooLong(bytes.len() as u64));
        }
        self.emit(bytes)
    }

    /// Handles the write-byte hypercall.
    pub fn write_byte(&mut self, byte: u8) -> Result<(), Error> {
        self.emit(&[byte])
    }

    fn with(out: Box<dyn Write + Send>, bytes_written: u64) -> Self {
        let now = std::time::Instant::now();
        Console {
            out,
            bytes_written,
            lost: 0,
            dropped: 0,
            allowance: BURST as f64,
            refilled: now,
            unsaid: 0,
            said: now,
            head: Vec::new(),
            at_line_start: true,
        }
    }

    /// Writes guest output, made safe for a terminal and within the rate.
    /// An output that fails (a terminal that was closed, a full disk) loses
    /// the bytes, which are counted: it never ends the VM.
    fn emit(&mut self, bytes: &[u8]) -> Result<(), Error> {
        self.bytes_written += bytes.len() as u64;
        let now = std::time::Instant::now();
        let add = now.duration_since(self.refilled).as_secs_f64() * RATE as f64;
        self.allowance = (self.allowance + add).min(BURST as f64);
        self.refilled = now;
        let len = bytes.len() as f64;
        if len > self.allowance {
            self.dropped += bytes.len() as u64;
            self.unsaid += bytes.len() as u64;
            if now.duration_since(self.said) >= std::time::Duration::from_secs(1) {
                let note = format!(
                    "\n[ferry: {} bytes of guest output dropped: more than {} KiB/s]\n",
                    self.unsaid,
                    RATE >> 10
                );
                self.put(note.as_bytes());
                self.unsaid = 0;
                self.said = now;
            }
            return Ok(());
        }
        self.allowance -= len;
        let safe = self.clean(bytes);
        self.put(&safe);
        Ok(())
    }

    /// `bytes` with control characters escaped and `ferry:` at a line's
    /// start prefixed; a line start still undecided waits in `head`.
    fn clean(&mut self, bytes: &[u8]) -> Vec<u8> {
        let mut out = Vec::with_capacity(bytes.len() + 8);
        for &b in bytes {
            if self.at_line_start {
                self.head.push(b);
                let decided = b == b'\n' || !OURS.starts_with(&self.head) || self.head == OURS;
                if !decided {
                    continue;
                }
                if self.head == OURS {
                    out.extend_from_slice(b"[guest] ");
                }
                self.at_line_start = false;
                for c in std::mem::take(&mut self.head) {
                    self.escape_into(c, &mut out);
                }
                continue;
            }
            self.escape_into(b, &mut out);
        }
        out
    }

    fn escape_into(&mut self, b: u8, out: &mut Vec<u8>) {
        match b {
            b'\n' => {
                out.push(b);
                self.at_line_start = true;
            }
            b'\t' => out.push(b),
            0..=0x1F | 0x7F => out.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => out.push(b),
        }
    }

    fn put(&mut self, bytes: &[u8]) {
        if self
            .out
            .write_all(bytes)
            .and_then(|()| self.out.flush())
            .is_err()
        {
            self.lost += bytes.len() as u64;
        }
    }

    /// Guest output bytes dropped for going over the rate.
    pub fn dropped_bytes(&self) -> u64 {
        self.dropped
    }

    /// Guest output bytes that the host output did not take.
    pub fn lost_bytes(&self) -> u64 {
        self.lost
    }

    /// Takes the console's output back (to give it to a restored console).
    pub fn into_output(self) -> Box<dyn Write + Send> {
        self.out
    }
}

impl super::Persist for Console {
    type State = ConsoleState;
    type Args<'a> = Box<dyn Write + Send>;
    type Error = std::convert::Infallible;

    fn save(&self) -> ConsoleState {
        ConsoleState {
            bytes_written: self.bytes_written,
        }
    }

    fn restore(out: Box<dyn Write + Send>, state: &ConsoleState) -> Result<Self, Self::Error> {
        Ok(Console::with(out, state.bytes_written))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;
    use crate::devices::Persist;

    /// A console output that keeps what it is given.
    #[derive(Clone, Default)]
    pub(crate) struct Sink(pub(crate) Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn setup() -> (GuestRam, Sink, Console) {
        let mem = memory::create(memory::MIN_MEMORY).unwrap();
        let sink = Sink::default();
        let console = Console::new(Box::new(sink.clone()));
        (mem, sink, console)
    }

    fn params(mem: &GuestRam, at: u64, len: u64, buf: u64) {
        memory::write_u64(mem, at, len).unwrap();
        memory::write_u64(mem, at + 8, buf).unwrap();
    }

    #[test]
    fn writes_a_buffer() {
        let (mem, sink, mut c) = setup();
        memory::write(&mem, 0x2000, b"hi there").unwrap();
        params(&mem, 0x1000, 8, 0x2000);
        c.write_buffer(&mem, 0x1000).unwrap();
        assert_eq!(&*sink.0.lock().unwrap(), b"hi there");
        assert_eq!(c.save().bytes_written, 8);
    }

    #[test]
    fn rejects_bad_guest_input() {
        let (mem, sink, mut c) = setup();
        assert_eq!(
            c.write_buffer(&mem, 1 << 40),
            Err(Error::ParamsOutside(1 << 40))
        );
        params(&mem, 0x1000, 16, memory::MIN_MEMORY - 8);
        assert!(matches!(
            c.write_buffer(&mem, 0x1000),
            Err(Error::BufferOutside { .. })
        ));
        params(&mem, 0x1000, SERIAL_WRITE_MAX + 1, 0x2000);
        assert_eq!(
            c.write_buffer(&mem, 0x1000),
            Err(Error::TooLong(SERIAL_WRITE_MAX + 1))
        );
        params(&mem, 0x1000, u64::MAX, u64::MAX);
        assert!(c.write_buffer(&mem, 0x1000).is_err());
        assert!(sink.0.lock().unwrap().is_empty());
    }

    /// Control characters are escaped, a guest line cannot pass for
    /// Ferry's, and a flood is cut at the rate and said.
    #[test]
    fn guest_output_is_made_safe_and_bounded() {
        let sink = Sink::default();
        let mut c = Console::new(Box::new(sink.clone()));
        c.emit(b"ok\x1b[31mred\x07\n").unwrap();
        c.emit(b"fer").unwrap();
        c.emit(b"ry: error: forged\n").unwrap();
        c.emit(b"ferryman\n").unwrap();
        let text = String::from_utf8(sink.0.lock().unwrap().clone()).unwrap();
        assert_eq!(
            text,
            "ok\\x1b[31mred\\x07\n[guest] ferry: error: forged\nferryman\n"
        );
        let flood = vec![b'a'; (BURST + RATE) as usize];
        c.emit(&flood).unwrap();
        assert!(c.dropped_bytes() >= BURST, "{}", c.dropped_bytes());
        assert!(c.save().bytes_written >= flood.len() as u64);
    }

    /// An output that fails (a closed terminal) loses the guest's bytes,
    /// counted, and never ends the VM.
    #[test]
    fn a_broken_output_loses_bytes_but_not_the_vm() {
        struct Broken;
        impl Write for Broken {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::Error::from_raw_os_error(libc::EIO))
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut c = Console::new(Box::new(Broken));
        c.write_byte(b'x').unwrap();
        c.write_byte(b'y').unwrap();
        assert_eq!(c.lost_bytes(), 2);
        let restored = Console::restore(Box::new(Sink::default()), &c.save()).unwrap();
        assert_eq!(restored.save().bytes_written, 2);
    }
}
