//! A Linux tap device opened with a virtio-net header in front of every
//! frame (`IFF_VNET_HDR`, 12-byte header as virtio 1.x defines it), so frames
//! pass between the tap and the guest's queues with no header translation.
//!
//! One of the few modules with `unsafe`: the tun ioctls and raw fd I/O.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;

/// Tap errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name cannot be an interface name.
    #[error(
        "tap name {0:?} is not a valid interface name (1 to 15 bytes, no '/', whitespace or NUL)"
    )]
    BadName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded, and are you root?)")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF failed.
    #[error(
        "cannot attach to tap {name}: {source} (it must be a tap, not a tun, and not held by another process)"
    )]
    Attach {
        /// The tap name.
        name: String,
        /// What the kernel said.
        source: io::Error,
    },
    /// Another tun ioctl failed.
    #[error("tap {name}: {what}: {source}")]
    Ioctl {
        /// The tap name.
        name: String,
        /// The ioctl.
        what: &'static str,
        /// What the kernel said.
        source: io::Error,
    },
}

/// Length of the virtio-net header every frame carries on the tap.
pub const VNET_HDR_LEN: usize = 12;

const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;

/// `struct ifreq` as TUNSETIFF reads it: the name and the flags.
#[repr(C)]
struct IfReq {
    name: [u8; 16],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open tap.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() < 16
        && name != "."
        && name != ".."
        && !name
            .bytes()
            .any(|b| b == b'/' || b == 0 || b.is_ascii_whitespace())
}

/// Whether network interface `name` exists in this network namespace.
pub fn exists(name: &str) -> bool {
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: if_nametoindex reads a NUL-terminated name.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

/// The tap a fleet host gives VM `id`: `fv` and the id's first ten hex
/// digits (a name within IFNAMSIZ).
pub fn name_for_vm(id: &crate::id::VmId) -> String {
    format!("fv{}", &id.to_string()[..10])
}

/// Makes a persistent tap `name` (unless it exists) and puts it, up, on
/// `bridge`: where a host's agent or receiver attaches a VM's card (the
/// VM's process opens the tap). Uses iproute2.
pub fn ensure_on_bridge(name: &str, bridge: &str) -> Result<(), String> {
    if !valid_name(name) || !valid_name(bridge) {
        return Err(format!("bad interface name {name:?} or bridge {bridge:?}"));
    }
    if !std::path::Path::new("/sys/class/net")
        .join(bridge)
        .join("bridge")
        .exists()
    {
        return Err(format!(
            "{bridge} is not a bridge in this network namespace"
        ));
    }
    let ip = |args: &[&str]| -> Result<(), String> {
        let out = std::process::Command::new("ip")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .map_err(|e| format!("cannot run ip: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    };
    if !exists(name) {
        ip(&["tuntap", "add", "dev", name, "mode", "tap"])?;
    }
    if self::bridge(name).as_deref() != Some(bridge) {
        ip(&["link", "set", name, "master", bridge])?;
    }
    ip(&["link", "set", name, "up"])
}

/// The bridge interface `name` is a port of, if any.
pub fn bridge(name: &str) -> Option<String> {
    if !valid_name(name) {
        return None;
    }
    let link = std::fs::read_link(format!("/sys/class/net/{name}/master")).ok()?;
    link.file_name()?.to_str().map(str::to_string)
}

impl Tap {
    /// Opens (or creates) tap `name`, non-blocking, with 12-byte virtio-net
    /// headers and no offloads.
    pub fn open(name: &str) -> Result<Tap, Error> {
        if !valid_name(name) {
            return Err(Error::BadName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(Error::OpenTun)?;
        let mut req = IfReq {
            name: [0; 16],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads a `struct ifreq` (40 bytes, which `IfReq`
        // is) from the pointer and writes the chosen name back into it; the
        // fd is an open /dev/net/tun.
        let r = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) };
        if r < 0 {
            return Err(Error::Attach {
                name: name.to_string(),
                source: io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let hdr_len = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer.
        tap.check("TUNSETVNETHDRSZ", unsafe {
            libc::ioctl(tap.file.as_raw_fd(), TUNSETVNETHDRSZ, &hdr_len)
        })?;
        tap.set_offload(0)?;
        Ok(tap)
    }

    fn check(&self, what: &'static str, r: libc::c_int) -> Result<(), Error> {
        if r < 0 {
            Err(Error::Ioctl {
                name: self.name.clone(),
                what,
                source: io::Error::last_os_error(),
            })
        } else {
            Ok(())
        }
    }

    /// Tells the kernel which offloads (TUN_F_*) the guest accepts on receive.
    pub fn set_offload(&self, flags: libc::c_uint) -> Result<(), Error> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        let r =
            unsafe { libc::ioctl(self.file.as_raw_fd(), TUNSETOFFLOAD, flags as libc::c_ulong) };
        self.check("TUNSETOFFLOAD", r)
    }

    /// Another handle on the same tap (for writing from another thread).
    pub fn try_clone(&self) -> io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included) into `buf`; `Ok(None)` when none is
    /// waiting.
    pub fn read_frame(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        // SAFETY: `buf` is a valid, writable buffer of `buf.len()` bytes.
        let n = unsafe { libc::read(self.file.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock => Ok(None),
                io::ErrorKind::Interrupted => self.read_frame(buf),
                _ => Err(e),
            };
        }
        Ok(Some(n as usize))
    }

    /// Writes one frame (header included).
    pub fn write_frame(&self, frame: &[u8]) -> io::Result<usize> {
        loop {
            // SAFETY: `frame` is a valid buffer of `frame.len()` bytes.
            let n =
                unsafe { libc::write(self.file.as_raw_fd(), frame.as_ptr().cast(), frame.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_the_kernel_sees_them() {
        for bad in ["", "a/b", "sixteen-chars-xx", "a b", ".."] {
            assert!(matches!(Tap::open(bad), Err(Error::BadName(_))), "{bad:?}");
        }
        assert!(valid_name("tap0"));
    }
}
