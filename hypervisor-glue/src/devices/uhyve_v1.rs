//! uhyve's hypercall interface version 1, which RustyHermit kernels of the
//! 0.11 line speak (Ferry's own runtime speaks version 2, see
//! [`ferry_abi::ports`]).
//!
//! A version-1 hypercall is a 32-bit `out` to its port whose value is the
//! guest-physical address of a packed parameter block. Ferry serves the
//! console (a byte, a buffer, `write` to fd 1 or 2) and exit. It has no
//! host file system to offer: `open` and `unlink` answer "no such file",
//! the other file calls "bad descriptor", and the first such call is said
//! once on Ferry's stderr. Every address is checked against guest memory;
//! a `write` buffer is a guest-*virtual* address, translated through the
//! guest's page tables.

use crate::devices::console::{self, Console};
use crate::memory::{self, GuestRam};

/// The version-1 ports.
pub mod ports {
    /// `write(fd, buf, len)`: `{fd: i32, buf: GVA, len: usize}`.
    pub const FILE_WRITE: u16 = 0x400;
    /// `open(name, flags, mode)`: `{name: GPA, flags: i32, mode: i32, ret: i32}`.
    pub const FILE_OPEN: u16 = 0x440;
    /// `close(fd)`: `{fd: i32, ret: i32}`.
    pub const FILE_CLOSE: u16 = 0x480;
    /// `read(fd, buf, len)`: `{fd: i32, buf: GVA, len: usize, ret: isize}`.
    pub const FILE_READ: u16 = 0x500;
    /// `exit(status)`: `{arg: i32}`.
    pub const EXIT: u16 = 0x540;
    /// `lseek(fd, offset, whence)`: `{fd: i32, offset: isize, whence: i32}`;
    /// the result comes back in `offset`.
    pub const FILE_LSEEK: u16 = 0x580;
    /// One console byte: the value's low byte.
    pub const UART: u16 = 0x800;
    /// `unlink(name)`: `{name: GPA, ret: i32}`.
    pub const FILE_UNLINK: u16 = 0x840;
    /// A console buffer: `{buf: GPA, len: usize}`.
    pub const SERIAL_WRITE_BUFFER: u16 = 0x880;
}

const ENOENT: i32 = 2;
const EBADF: i32 = 9;
/// Longest `write` to the console served in one call.
const MAX_WRITE: u64 = ferry_abi::SERIAL_WRITE_MAX;

/// What a handled hypercall asks of the vCPU loop.
#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Carry on.
    Handled,
    /// The guest exits with this status.
    Exit(i32),
}

/// A bad hypercall.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The parameter block is not in guest memory.
    #[error(
        "uhyve v1 hypercall on port {port:#x}: parameter block at {addr:#x} is outside guest memory"
    )]
    Params {
        /// The port.
        port: u16,
        /// The block's address.
        addr: u64,
    },
    /// A `write` buffer that does not translate to guest memory.
    #[error("uhyve v1 write: buffer {addr:#x}+{len:#x} is not mapped to guest memory")]
    Buffer {
        /// Guest-virtual address.
        addr: u64,
        /// Length.
        len: u64,
    },
    /// Console trouble (too long).
    #[error(transparent)]
    Console(#[from] console::Error),
}

/// Whether `port` is a version-1 hypercall.
pub fn owns(port: u16) -> bool {
    use ports::*;
    matches!(
        port,
        FILE_WRITE
            | FILE_OPEN
            | FILE_CLOSE
            | FILE_READ
            | EXIT
            | FILE_LSEEK
            | UART
            | FILE_UNLINK
            | SERIAL_WRITE_BUFFER
    )
}

fn read_block<const N: usize>(mem: &GuestRam, port: u16, addr: u64) -> Result<[u8; N], Error> {
    let mut b = [0u8; N];
    memory::read(mem, addr, &mut b).map_err(|_| Error::Params { port, addr })?;
    Ok(b)
}

fn le_u64(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

fn le_i32(b: &[u8], at: usize) -> i32 {
    i32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}

fn answer(mem: &GuestRam, port: u16, addr: u64, value: &[u8]) -> Result<(), Error> {
    memory::write(mem, addr, value).map_err(|_| Error::Params { port, addr })
}

/// Serves the hypercall `value` written to `port` (one [`owns`]).
/// `cr3` gives the guest's page-table root when a buffer needs
/// translating; `said` remembers whether the missing file system was
/// reported already.
pub fn handle(
    port: u16,
    value: u32,
    mem: &GuestRam,
    console: &mut Console,
    cr3: impl FnOnce() -> Option<u64>,
    said: &mut bool,
) -> Result<Outcome, Error> {
    let at = u64::from(value);
    let mut no_files = |what: &str| {
        if !*said {
            *said = true;
            eprintln!(
                "ferry: the guest called {what} on uhyve's host file system, which Ferry does not offer; it gets an error (this is said once)"
            );
        }
    };
    match port {
        ports::UART => console.write_byte(value as u8)?,
        ports::SERIAL_WRITE_BUFFER => {
            let b: [u8; 16] = read_block(mem, port, at)?;
            let (buf, len) = (le_u64(&b, 0), le_u64(&b, 8));
            if len > MAX_WRITE {
                return Err(console::Error::TooLong(len).into());
            }
            let mut data = vec![0u8; len as usize];
            memory::read(mem, buf, &mut data)
                .map_err(|_| console::Error::BufferOutside { addr: buf, len })?;
            console.write_bytes(&data)?;
        }
        ports::FILE_WRITE => {
            let b: [u8; 20] = read_block(mem, port, at)?;
            let (fd, buf, len) = (le_i32(&b, 0), le_u64(&b, 4), le_u64(&b, 12));
            if fd == 1 || fd == 2 {
                if len > MAX_WRITE {
                    return Err(console::Error::TooLong(len).into());
                }
                let root = cr3().ok_or(Error::Buffer { addr: buf, len })?;
                let data =
                    read_virtual(mem, root, buf, len).ok_or(Error::Buffer { addr: buf, len })?;
                console.write_bytes(&data)?;
            } else {
                no_files("write");
            }
        }
        ports::EXIT => {
            let b: [u8; 4] = read_block(mem, port, at)?;
            return Ok(Outcome::Exit(le_i32(&b, 0)));
        }
        ports::FILE_OPEN => {
            no_files("open");
            answer(mem, port, at + 16, &(-ENOENT).to_le_bytes())?;
        }
        ports::FILE_UNLINK => {
            no_files("unlink");
            answer(mem, port, at + 8, &(-ENOENT).to_le_bytes())?;
        }
        ports::FILE_CLOSE => answer(mem, port, at + 4, &(-EBADF).to_le_bytes())?,
        ports::FILE_READ => {
            no_files("read");
            answer(mem, port, at + 20, &i64::from(-EBADF).to_le_bytes())?;
        }
        ports::FILE_LSEEK => {
            no_files("lseek");
            answer(mem, port, at + 4, &i64::from(-EBADF).to_le_bytes())?;
        }
        _ => unreachable!("handle() is called only for ports that owns() accepts"),
    }
    Ok(Outcome::Handled)
}

/// Translates guest-virtual `va` through the 4-level page tables at `cr3`.
pub fn translate(mem: &GuestRam, cr3: u64, va: u64) -> Option<u64> {
    const ADDR: u64 = 0x000f_ffff_ffff_f000;
    const PRESENT: u64 = 1;
    const HUGE: u64 = 1 << 7;
    let mut table = cr3 & ADDR;
    for level in (1..=4u32).rev() {
        let shift = 12 + 9 * (level - 1);
        let entry = memory::read_u64(mem, table + ((va >> shift) & 0x1ff) * 8).ok()?;
        if entry & PRESENT == 0 {
            return None;
        }
        if level == 1 || (level <= 3 && entry & HUGE != 0) {
            let size = 1u64 << shift;
            return Some((entry & ADDR & !(size - 1)) | (va & (size - 1)));
        }
        table = entry & ADDR;
    }
    None
}

/// Reads `len` bytes at guest-virtual `va`, page by page.
fn read_virtual(mem: &GuestRam, cr3: u64, va: u64, len: u64) -> Option<Vec<u8>> {
    let mut out = vec![0u8; len as usize];
    let mut done = 0u64;
    while done < len {
        let v = va.checked_add(done)?;
        let chunk = (4096 - (v & 0xfff)).min(len - done);
        let pa = translate(mem, cr3, v)?;
        memory::read(mem, pa, &mut out[done as usize..(done + chunk) as usize]).ok()?;
        done += chunk;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guest memory with 4-level tables at 0x10000 mapping virtual
    /// 0x4000_0000 (a 4 KiB page) to physical 0x20000 and virtual
    /// 0x8000_0000 (a 2 MiB page) to physical 0x200000.
    fn mapped() -> (GuestRam, u64) {
        let mem = memory::create(8 << 20).unwrap();
        let (pml4, pdpt, pd, pt) = (0x10000u64, 0x11000u64, 0x12000u64, 0x13000u64);
        memory::write_u64(&mem, pml4, pdpt | 3).unwrap();
        memory::write_u64(&mem, pdpt + 8, pd | 3).unwrap(); // 1 GiB
        memory::write_u64(&mem, pdpt + 2 * 8, 0x14000 | 3).unwrap(); // 2 GiB
        memory::write_u64(&mem, pd, pt | 3).unwrap();
        memory::write_u64(&mem, pt, 0x20000 | 3).unwrap();
        memory::write_u64(&mem, 0x14000, 0x200000 | 3 | (1 << 7)).unwrap();
        (mem, pml4)
    }

    #[test]
    fn addresses_translate_through_small_and_huge_pages() {
        let (mem, cr3) = mapped();
        assert_eq!(translate(&mem, cr3, 0x4000_0123), Some(0x20123));
        assert_eq!(translate(&mem, cr3, 0x8001_2345), Some(0x212345));
        assert_eq!(translate(&mem, cr3, 0x4000_1000), None);
        assert_eq!(translate(&mem, cr3, 0xc000_0000), None);
        // Tables outside memory translate to nothing.
        assert_eq!(translate(&mem, 0xffff_f000, 0x4000_0000), None);
    }

    #[test]
    fn console_writes_exit_and_files_are_served_and_bad_blocks_refused() {
        let (mem, cr3) = mapped();
        let sink = console::tests::Sink::default();
        let mut console = Console::new(Box::new(sink.clone()));
        let mut said = false;
        // write(1, "hi\n") through virtual 0x4000_0010.
        memory::write(&mem, 0x20010, b"hi\n").unwrap();
        let mut p = Vec::new();
        p.extend(1i32.to_le_bytes());
        p.extend(0x4000_0010u64.to_le_bytes());
        p.extend(3u64.to_le_bytes());
        memory::write(&mem, 0x30000, &p).unwrap();
        let write = |console: &mut Console, said: &mut bool| {
            handle(
                ports::FILE_WRITE,
                0x30000,
                &mem,
                console,
                || Some(cr3),
                said,
            )
        };
        assert_eq!(write(&mut console, &mut said), Ok(Outcome::Handled));
        // A buffer in no mapping is refused.
        memory::write(&mem, 0x30004, &0x4000_5000u64.to_le_bytes()).unwrap();
        assert!(matches!(
            write(&mut console, &mut said),
            Err(Error::Buffer { .. })
        ));
        // exit(7)
        memory::write(&mem, 0x30100, &7i32.to_le_bytes()).unwrap();
        let r = handle(ports::EXIT, 0x30100, &mem, &mut console, || None, &mut said);
        assert_eq!(r, Ok(Outcome::Exit(7)));
        // open() answers ENOENT in its ret field.
        let r = handle(
            ports::FILE_OPEN,
            0x30200,
            &mem,
            &mut console,
            || None,
            &mut said,
        );
        assert_eq!(r, Ok(Outcome::Handled));
        let mut ret = [0u8; 4];
        memory::read(&mem, 0x30210, &mut ret).unwrap();
        assert_eq!(i32::from_le_bytes(ret), -ENOENT);
        assert!(said);
        // A block outside memory is refused.
        let r = handle(
            ports::EXIT,
            0xffff_fff0,
            &mem,
            &mut console,
            || None,
            &mut said,
        );
        assert!(matches!(r, Err(Error::Params { .. })));
        assert_eq!(&sink.0.lock().unwrap()[..], b"hi\n");
    }
}
