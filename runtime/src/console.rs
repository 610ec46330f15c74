//! Console output: `print!` / `println!`, one VMM exit per call for short
//! lines (text is gathered in a stack buffer and written in chunks).

use core::fmt::{self, Write};

struct Chunked {
    buf: [u8; 512],
    len: usize,
}

impl Chunked {
    fn flush(&mut self) {
        crate::platform::console_write(&self.buf[..self.len]);
        self.len = 0;
    }
}

impl Write for Chunked {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for chunk in s.as_bytes().chunks(self.buf.len()) {
            if self.len + chunk.len() > self.buf.len() {
                self.flush();
            }
            self.buf[self.len..self.len + chunk.len()].copy_from_slice(chunk);
            self.len += chunk.len();
        }
        Ok(())
    }
}

/// Writes formatted text to the console. Used by the macros; never touches
/// the heap, so fatal paths (panic, CPU exception) use it too.
pub fn write_fmt(args: fmt::Arguments<'_>) {
    let mut w = Chunked {
        buf: [0; 512],
        len: 0,
    };
    let _ = w.write_fmt(args);
    w.flush();
}

/// Prints to the console.
#[macro_export]
macro_rules! print {
    ($($arg:tt)*) => { $crate::console::write_fmt(format_args!($($arg)*)) };
}

/// Prints a line to the console.
#[macro_export]
macro_rules! println {
    () => { $crate::console::write_fmt(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::console::write_fmt(format_args!("{}\n", format_args!($($arg)*))) };
}
