//! Snapshots: the whole VM in one file, and the format of that file.
//!
//! ```text
//! offset 0        header (128 bytes)
//!                   magic "FERRYSNP" | format version u32 | flags u32
//!                   state_len u64 | memory_offset u64 | memory_len u64
//!                   state digest u64 | memory digest u64
//!                   MAC [32] | reserved [32] | header digest u64
//! 128             VmState, archived with rkyv (validated with bytecheck)
//! memory_offset   guest memory, region after region, page aligned; pages
//!                 of zeros are holes (a sparse file), so they cost nothing
//! ```
//!
//! Digests are XXH3-64: they catch damage, not tampering. A snapshot
//! written with a host key (flag bit 0) also carries an HMAC-SHA256 of the
//! state, the memory and the header's fields before the MAC; restoring
//! with the key refuses a file whose MAC does not verify, and copies the
//! memory it verified instead of mapping the file.
//!
//! Files are the caller's: `write` fills a file it is given (the `ferry
//! snapshot` command creates it, mode 0600, never following a symlink or
//! replacing a file, and renames it into place), and restore refuses a file
//! that another user owns or that group or others may write (its pages,
//! mapped copy-on-write, would otherwise change under the guest).
//!
//! Everything is checked before anything is used:
//! the magic and version, every length against the file's size and against
//! fixed bounds, each digest, the archive's structure, and then the state's
//! meaning (memory layout, sizes of KVM structures) by whoever restores it.
//! The memory region is laid out so that restore can map the file
//! copy-on-write as guest memory instead of reading it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::Path;

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::clock::ClockState;
use crate::devices::console::ConsoleState;
use crate::devices::virtio::net::NetState;
use crate::id::VmId;
use crate::kvm::{CpuFeatures, IrqchipState, VcpuState};

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"FERRYSNP";
/// This format's version (4: the image's kernel kind; 3: a 128-byte
/// header with an optional MAC, the guest's CPU features; 2 added the VM's
/// identity and generation).
pub const FORMAT_VERSION: u32 = 4;
/// Header length.
pub const HEADER_LEN: u64 = 128;
/// Header flag: the file carries a MAC.
pub const FLAG_SIGNED: u32 = 1;
/// Where the MAC is in the header, and how long.
const MAC_AT: usize = 56;
const MAC_LEN: usize = 32;
/// Where the header's own digest is.
const HEADER_DIGEST_AT: usize = 120;
/// Largest archived state accepted (the state is small; memory is apart).
pub const MAX_STATE_LEN: u64 = 256 << 20;
const PAGE: u64 = 4096;

/// Who a VM is: its identity (random, made when it first booted) and its
/// generation (0 at boot, one more at each arrival elsewhere: a
/// migration's commit, a restore).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize,
)]
pub struct Identity {
    /// The identity.
    pub id: [u8; 16],
    /// The generation.
    pub generation: u64,
}

impl Identity {
    /// The identity as a [`VmId`].
    pub fn vm(&self) -> VmId {
        VmId(self.id)
    }
}

/// The network card's configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct NetConfigState {
    /// The card's MAC address.
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub ip: [u8; 4],
    /// Its prefix length.
    pub prefix: u8,
    /// The default gateway.
    pub gateway: Option<[u8; 4]>,
}

/// The VM's configuration, as the snapshot carries it.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct ConfigState {
    /// Guest memory in bytes.
    pub memory: u64,
    /// vCPUs.
    pub cpus: u32,
    /// The image it booted from (informational).
    pub image: String,
    /// Which kernel the image carries ([`crate::boot::elf::Kind`]: 0 Ferry's
    /// runtime, 1 RustyHermit; informational).
    pub kernel: u8,
    /// The network card, if it has one.
    pub net: Option<NetConfigState>,
}

/// Everything about a paused VM except its memory.
#[derive(Clone, Debug, PartialEq, Eq, rkyv::Archive, rkyv::Serialize, rkyv::Deserialize)]
pub struct VmState {
    /// Who the VM is.
    pub identity: Identity,
    /// Configuration.
    pub config: ConfigState,
    /// Guest RAM regions: (guest-physical start, length).
    pub memory: Vec<(u64, u64)>,
    /// The vCPU.
    pub vcpu: VcpuState,
    /// The CPU features the guest booted with (a host that lacks one of
    /// them cannot take it).
    pub cpu: CpuFeatures,
    /// The in-kernel interrupt controllers.
    pub irqchip: IrqchipState,
    /// The guest clock, stopped.
    pub clock: ClockState,
    /// The console.
    pub console: ConsoleState,
    /// The network card.
    pub net: Option<NetState>,
}

/// What is wrong with a snapshot file, or what failed writing one.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// I/O on the file.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Not a snapshot.
    #[error("{0}: not a Ferry snapshot (bad magic)")]
    Magic(String),
    /// Another format version.
    #[error("{path}: snapshot format version {found}; this Ferry reads version {FORMAT_VERSION}")]
    Version {
        /// The file.
        path: String,
        /// Its version.
        found: u32,
    },
    /// The header is damaged.
    #[error("{0}: the snapshot header is corrupted (digest mismatch)")]
    Header(String),
    /// A length is out of bounds or disagrees with the file.
    #[error("{path}: {what}")]
    Layout {
        /// The file.
        path: String,
        /// What is wrong.
        what: String,
    },
    /// The file is shorter than its header says.
    #[error("{path}: truncated: the file is {size} bytes, its header needs {needed}")]
    Truncated {
        /// The file.
        path: String,
        /// Its size.
        size: u64,
        /// What the header needs.
        needed: u64,
    },
    /// A digest does not match.
    #[error("{path}: the {part} is corrupted (digest mismatch)")]
    Digest {
        /// The file.
        path: String,
        /// Which part.
        part: &'static str,
    },
    /// The archived state does not validate.
    #[error("{path}: the VM state does not validate: {why}")]
    State {
        /// The file.
        path: String,
        /// rkyv's complaint.
        why: String,
    },
    /// Serializing the state failed.
    #[error("cannot serialize the VM state: {0}")]
    Serialize(String),
    /// The MAC does not verify (or there is none).
    #[error("{path}: {why}")]
    Mac {
        /// The file.
        path: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Others could change the file under a guest that maps it.
    #[error(
        "{path}: {why}; a guest restored from it maps its pages, so whoever may write the file could change the guest's memory. Make it yours and mode 0600 (chmod go-w), or restore with --key to copy what the MAC verified"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Who else may write it.
        why: String,
    },
}

/// A validated snapshot header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    /// Archived state length.
    pub state_len: u64,
    /// Where memory starts in the file.
    pub memory_offset: u64,
    /// Memory image length.
    pub memory_len: u64,
    /// Digest of the state bytes.
    pub state_digest: u64,
    /// Digest of the memory image.
    pub memory_digest: u64,
    /// Header flags ([`FLAG_SIGNED`]).
    pub flags: u32,
    /// The MAC (zero unless signed).
    pub mac: [u8; MAC_LEN],
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[..MAC_AT].copy_from_slice(&self.fields());
        h[MAC_AT..MAC_AT + MAC_LEN].copy_from_slice(&self.mac);
        let d = xxh3_64(&h[..HEADER_DIGEST_AT]);
        h[HEADER_DIGEST_AT..].copy_from_slice(&d.to_le_bytes());
        h
    }

    /// The header's bytes before the MAC (which the MAC covers).
    fn fields(&self) -> [u8; MAC_AT] {
        let mut h = [0u8; MAC_AT];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.flags.to_le_bytes());
        h[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.memory_offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.memory_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.state_digest.to_le_bytes());
        h[48..56].copy_from_slice(&self.memory_digest.to_le_bytes());
        h
    }

    /// Parses and checks a header against the file size.
    pub fn decode(path: &str, h: &[u8], file_size: u64) -> Result<Header, Error> {
        if h.len() < HEADER_LEN as usize || h[..8] != MAGIC {
            return Err(Error::Magic(path.into()));
        }
        let u32_at = |i: usize| u32::from_le_bytes(h[i..i + 4].try_into().expect("4"));
        let u64_at = |i: usize| u64::from_le_bytes(h[i..i + 8].try_into().expect("8"));
        let version = u32_at(8);
        if version != FORMAT_VERSION {
            return Err(Error::Version {
                path: path.into(),
                found: version,
            });
        }
        if xxh3_64(&h[..HEADER_DIGEST_AT]) != u64_at(HEADER_DIGEST_AT) {
            return Err(Error::Header(path.into()));
        }
        let hd = Header {
            state_len: u64_at(16),
            memory_offset: u64_at(24),
            memory_len: u64_at(32),
            state_digest: u64_at(40),
            memory_digest: u64_at(48),
            flags: u32_at(12),
            mac: h[MAC_AT..MAC_AT + MAC_LEN].try_into().expect("32 bytes"),
        };
        if hd.flags & !FLAG_SIGNED != 0 {
            return Err(Error::Layout {
                path: path.into(),
                what: format!("unknown header flags {:#x}", hd.flags),
            });
        }
        let layout = |what: String| Error::Layout {
            path: path.into(),
            what,
        };
        if hd.state_len == 0 || hd.state_len > MAX_STATE_LEN {
            return Err(layout(format!(
                "state length {} is out of bounds (1 to {MAX_STATE_LEN})",
                hd.state_len
            )));
        }
        if !hd.memory_offset.is_multiple_of(PAGE) || hd.memory_offset < HEADER_LEN + hd.state_len {
            return Err(layout(format!(
                "memory offset {:#x} is misplaced",
                hd.memory_offset
            )));
        }
        if !hd.memory_len.is_multiple_of(PAGE) || hd.memory_len > crate::memory::MAX_MEMORY {
            return Err(layout(format!(
                "memory length {:#x} is out of bounds",
                hd.memory_len
            )));
        }
        let needed = hd.memory_offset + hd.memory_len;
        if file_size < needed {
            return Err(Error::Truncated {
                path: path.into(),
                size: file_size,
                needed,
            });
        }
        Ok(hd)
    }
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Serializes `state`.
pub fn encode_state(state: &VmState) -> Result<Vec<u8>, Error> {
    rkyv::to_bytes::<rkyv::rancor::Error>(state)
        .map(|v| v.to_vec())
        .map_err(|e| Error::Serialize(e.to_string()))
}

/// Encodes and decodes a state shaped like a VM's (a networked VM's
/// register blocks, MSRs, interrupt controllers, card with its capture
/// digests), so that a migration's pause, which does each once, finds
/// the code and the allocator warm: the first encode in a process took
/// 22-52 us here, a warm one about 10 (see also
/// [`crate::sched::prefault_code`]). Whether the state came back whole.
pub fn warm_up() -> bool {
    let state = shaped_like_a_vm();
    let rest = state.vcpu.rest();
    encode_state(&state)
        .and_then(|bytes| decode_state("the warm-up state", &bytes))
        .is_ok_and(|back| back == state)
        && encode_rest(&rest)
            .and_then(|bytes| decode_rest("the warm-up state", &bytes))
            .is_ok_and(|back| back == rest)
}

/// A state shaped like a networked VM's (for [`warm_up`] and tests).
pub fn shaped_like_a_vm() -> VmState {
    use crate::devices::virtio::net::{QueuePosition, QueueState};
    let queue = QueueState {
        size: 256,
        ready: true,
        desc: 1 << 20,
        driver: 2 << 20,
        device: 3 << 20,
    };
    VmState {
        identity: Identity {
            id: [0; 16],
            generation: 0,
        },
        config: ConfigState {
            memory: 64 << 20,
            cpus: 1,
            image: "warm-up".into(),
            kernel: 0,
            net: Some(NetConfigState {
                mac: [2, 0, 0, 0, 0, 1],
                ip: [10, 0, 0, 1],
                prefix: 24,
                gateway: None,
            }),
        },
        memory: vec![(0, 64 << 20)],
        vcpu: VcpuState {
            regs: vec![0; 144],
            sregs: vec![0; 312],
            xsave: vec![0; 4096],
            xcrs: vec![0; 392],
            lapic: vec![0; 1024],
            events: vec![0; 64],
            mp_state: vec![0; 4],
            debugregs: vec![0; 128],
            msrs: (0..64).map(|i| (i, 0)).collect(),
        },
        cpu: CpuFeatures::default(),
        irqchip: IrqchipState {
            chips: vec![vec![0; 520]; 3],
        },
        clock: ClockState {
            guest_ns: 0,
            realtime_ns: 0,
            generation: 0,
            unix_ns_at_zero: 0,
        },
        console: ConsoleState::default(),
        net: Some(NetState {
            mac: [2, 0, 0, 0, 0, 1],
            pci_config: vec![0; 256],
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            queue_select: 0,
            queues: vec![queue; 2],
            positions: vec![
                QueuePosition {
                    next_avail: 0,
                    next_used: 0
                };
                2
            ],
            isr: 0,
            backlog: vec![vec![0; 1514]],
            overlap: vec![0; 256],
        }),
    }
}

/// Validates and deserializes archived state bytes.
pub fn decode_state(path: &str, bytes: &[u8]) -> Result<VmState, Error> {
    // rkyv needs the archive aligned; a Vec<u8> from a file may not be.
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<VmState, rkyv::rancor::Error>(&aligned).map_err(|e| Error::State {
        path: path.into(),
        why: e.to_string(),
    })
}

/// Encodes the rest of a vCPU's state (a migration's second state
/// message).
pub fn encode_rest(rest: &crate::kvm::VcpuRest) -> Result<Vec<u8>, Error> {
    rkyv::to_bytes::<rkyv::rancor::Error>(rest)
        .map(|v| v.to_vec())
        .map_err(|e| Error::Serialize(e.to_string()))
}

/// Decodes (and validates) what [`encode_rest`] made.
pub fn decode_rest(path: &str, bytes: &[u8]) -> Result<crate::kvm::VcpuRest, Error> {
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
    aligned.extend_from_slice(bytes);
    rkyv::from_bytes::<crate::kvm::VcpuRest, rkyv::rancor::Error>(&aligned).map_err(|e| {
        Error::State {
            path: path.into(),
            why: e.to_string(),
        }
    })
}

/// Writes a snapshot into `file` (created by the caller, empty): `state`,
/// then memory as given by `regions`, each a slice of guest memory (read
/// while the VM is paused); signed with `key` if there is one. Returns the
/// file's size.
pub fn write(
    file: &File,
    state: &VmState,
    regions: &[&[u8]],
    key: Option<&crate::migration::key::Psk>,
) -> Result<u64, Error> {
    let name = "the snapshot file";
    let ioe = |source| Error::Io {
        path: name.into(),
        source,
    };
    let bytes = encode_state(state)?;
    let memory_offset = (HEADER_LEN + bytes.len() as u64).next_multiple_of(PAGE);
    let memory_len: u64 = regions.iter().map(|r| r.len() as u64).sum();
    file.set_len(0).map_err(ioe)?;
    file.write_all_at(&bytes, HEADER_LEN).map_err(ioe)?;
    let mut mac = key.map(|k| {
        ring::hmac::Context::with_key(&ring::hmac::Key::new(ring::hmac::HMAC_SHA256, k.bytes()))
    });
    if let Some(m) = mac.as_mut() {
        m.update(&bytes);
    }
    let mut digest = Xxh3::new();
    let mut at = memory_offset;
    const ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
    for r in regions {
        if let Some(m) = mac.as_mut() {
            m.update(r);
        }
        // Runs of non-zero pages are written; zero pages stay holes.
        let mut run: Option<usize> = None;
        for (i, page) in r.chunks(PAGE as usize).enumerate() {
            digest.update(page);
            let zero = page == &ZERO[..page.len()];
            match (zero, run) {
                (false, None) => run = Some(i),
                (true, Some(start)) => {
                    let off = start * PAGE as usize;
                    file.write_all_at(&r[off..i * PAGE as usize], at + off as u64)
                        .map_err(ioe)?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            let off = start * PAGE as usize;
            file.write_all_at(&r[off..], at + off as u64).map_err(ioe)?;
        }
        at += r.len() as u64;
    }
    file.set_len(memory_offset + memory_len).map_err(ioe)?;
    let mut header = Header {
        state_len: bytes.len() as u64,
        memory_offset,
        memory_len,
        state_digest: xxh3_64(&bytes),
        memory_digest: digest.digest(),
        flags: if key.is_some() { FLAG_SIGNED } else { 0 },
        mac: [0; MAC_LEN],
    };
    if let Some(mut m) = mac {
        m.update(&header.fields());
        header.mac.copy_from_slice(m.sign().as_ref());
    }
    // Written last: a file cut short has no valid header. Flushing to
    // disk is the caller's (`ferry snapshot`, once the VM runs again).
    file.write_all_at(&header.encode(), 0).map_err(ioe)?;
    Ok(memory_offset + memory_len)
}

/// A snapshot file whose header and state have been checked; the memory
/// digest is checked by [`Snapshot::verify_memory`] once it is mapped.
#[derive(Debug)]
pub struct Snapshot {
    /// The open file.
    pub file: File,
    /// Its header.
    pub header: Header,
    /// The VM state.
    pub state: VmState,
    /// The state as read (and decoded): what a MAC check covers.
    state_bytes: Vec<u8>,
    /// The path, for messages.
    pub path: String,
}

impl Snapshot {
    /// Opens and checks everything but the memory digest (and the MAC).
    /// Unless the caller will verify a MAC (`signed`), the file must be
    /// ours or root's and not writable by group or others: its pages will
    /// be mapped.
    pub fn open(path: &Path, signed: bool) -> Result<Snapshot, Error> {
        let name = path.display().to_string();
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .open(path)
            .map_err(io_err(path))?;
        let meta = file.metadata().map_err(io_err(path))?;
        if !meta.is_file() {
            return Err(io_err(path)(std::io::Error::other("not a regular file")));
        }
        if !signed {
            // SAFETY: geteuid has no preconditions.
            let me = unsafe { libc::geteuid() };
            if meta.uid() != me && meta.uid() != 0 {
                return Err(Error::Exposed {
                    path: name,
                    why: format!("it belongs to uid {}", meta.uid()),
                });
            }
            if meta.mode() & 0o022 != 0 {
                return Err(Error::Exposed {
                    path: name,
                    why: format!(
                        "group or others may write it (mode {:04o})",
                        meta.mode() & 0o7777
                    ),
                });
            }
        }
        let size = meta.len();
        let mut h = [0u8; HEADER_LEN as usize];
        let got = read_up_to(&mut file, &mut h).map_err(io_err(path))?;
        if got < h.len() {
            if got >= 8 && h[..8] == MAGIC {
                return Err(Error::Truncated {
                    path: name,
                    size,
                    needed: HEADER_LEN,
                });
            }
            return Err(Error::Magic(name));
        }
        let header = Header::decode(&name, &h, size)?;
        let mut bytes = vec![0u8; header.state_len as usize];
        file.read_exact_at(&mut bytes, HEADER_LEN)
            .map_err(io_err(path))?;
        if xxh3_64(&bytes) != header.state_digest {
            return Err(Error::Digest {
                path: name,
                part: "VM state",
            });
        }
        let state = decode_state(&name, &bytes)?;
        let state_bytes = bytes;
        let regions: u64 = state.memory.iter().map(|(_, l)| *l).sum();
        if regions != header.memory_len || state.memory.len() > 2 {
            return Err(Error::Layout {
                path: name,
                what: format!(
                    "memory regions of {regions} bytes in all, but {} bytes of memory",
                    header.memory_len
                ),
            });
        }
        Ok(Snapshot {
            file,
            header,
            state,
            state_bytes,
            path: name,
        })
    }

    /// Reads the memory image into `regions` (fresh guest memory, in file
    /// order) and checks the MAC under `key` over the state, the memory and
    /// the header, and the memory digest: what is checked is what the
    /// guest gets.
    pub fn load_verified(
        &self,
        key: &crate::migration::key::Psk,
        regions: &mut [&mut [u8]],
    ) -> Result<(), Error> {
        if self.header.flags & FLAG_SIGNED == 0 {
            return Err(Error::Mac {
                path: self.path.clone(),
                why: "the snapshot is not signed, and a key was given to check it",
            });
        }
        let ioe = |source| Error::Io {
            path: self.path.clone(),
            source,
        };
        let mut mac = ring::hmac::Context::with_key(&ring::hmac::Key::new(
            ring::hmac::HMAC_SHA256,
            key.bytes(),
        ));
        mac.update(&self.state_bytes);
        let mut digest = Xxh3::new();
        let mut at = self.header.memory_offset;
        for r in regions.iter_mut() {
            for chunk in r.chunks_mut(1 << 20) {
                self.file.read_exact_at(chunk, at).map_err(ioe)?;
                mac.update(chunk);
                digest.update(chunk);
                at += chunk.len() as u64;
            }
        }
        mac.update(&self.header.fields());
        let got = mac.sign();
        // Compared in constant time: every byte, whatever differs first.
        let diff = got
            .as_ref()
            .iter()
            .zip(&self.header.mac)
            .fold(0u8, |d, (a, b)| d | (a ^ b));
        if got.as_ref().len() != MAC_LEN || std::hint::black_box(diff) != 0 {
            return Err(Error::Mac {
                path: self.path.clone(),
                why: "its MAC does not verify: written with another key, or changed since",
            });
        }
        if digest.digest() != self.header.memory_digest {
            return Err(Error::Digest {
                path: self.path.clone(),
                part: "memory image",
            });
        }
        Ok(())
    }

    /// Checks the memory digest over the memory as mapped (`regions`, in
    /// file order).
    pub fn verify_memory(&self, regions: &[&[u8]]) -> Result<(), Error> {
        let mut d = Xxh3::new();
        for r in regions {
            d.update(r);
        }
        if d.digest() != self.header.memory_digest {
            return Err(Error::Digest {
                path: self.path.clone(),
                part: "memory image",
            });
        }
        Ok(())
    }
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::OpenOptionsExt;

    fn state() -> VmState {
        VmState {
            identity: Identity {
                id: [3; 16],
                generation: 5,
            },
            config: ConfigState {
                memory: 8 << 20,
                cpus: 1,
                image: "x".into(),
                kernel: 0,
                net: None,
            },
            memory: vec![(0, 8 << 20)],
            vcpu: VcpuState {
                regs: vec![1; 144],
                msrs: vec![(0x10, 5)],
                ..Default::default()
            },
            cpu: CpuFeatures { words: [1; 7] },
            irqchip: IrqchipState {
                chips: vec![vec![0; 520]; 3],
            },
            clock: ClockState {
                guest_ns: 1,
                realtime_ns: 2,
                generation: 4,
                unix_ns_at_zero: 0,
            },
            console: ConsoleState { bytes_written: 9 },
            net: None,
        }
    }

    #[test]
    fn the_warm_up_state_round_trips() {
        assert!(warm_up());
    }

    /// A new private file, as `ferry snapshot` makes one.
    fn create(p: &Path) -> File {
        let _ = std::fs::remove_file(p);
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(p)
            .unwrap()
    }

    fn write_sample(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut mem = vec![0u8; 8 << 20];
        mem[4096 * 3] = 7;
        mem[(8 << 20) - 1] = 9;
        let p = dir.join("s.snap");
        write(&create(&p), &state(), &[&mem], None).unwrap();
        (p, mem)
    }

    fn tmpdir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-snap-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_written_snapshot_reads_back_and_zero_pages_are_holes() {
        let d = tmpdir("roundtrip");
        let (p, mem) = write_sample(&d);
        let s = Snapshot::open(&p, false).unwrap();
        assert_eq!(s.state, state());
        let mut back = vec![0u8; mem.len()];
        s.file
            .read_exact_at(&mut back, s.header.memory_offset)
            .unwrap();
        assert_eq!(back, mem);
        s.verify_memory(&[&back]).unwrap();
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&p).unwrap().blocks() * 512;
        assert!(
            blocks < 1 << 20,
            "8 MiB of mostly zeros took {blocks} bytes on disk"
        );
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn bad_files_are_refused_with_the_reason() {
        let d = tmpdir("bad");
        let (p, mem) = write_sample(&d);
        let good = std::fs::read(&p).unwrap();
        let try_bytes = |bytes: &[u8]| {
            let q = d.join("bad.snap");
            create(&q).write_all_at(bytes, 0).unwrap();
            Snapshot::open(&q, false).map(|s| {
                let mut back = vec![0u8; mem.len()];
                s.file
                    .read_exact_at(&mut back, s.header.memory_offset)
                    .unwrap();
                s.verify_memory(&[&back])
            })
        };
        assert!(matches!(try_bytes(b"hello"), Err(Error::Magic(_))));
        assert!(matches!(try_bytes(&[]), Err(Error::Magic(_))));
        let mut v = good.clone();
        // A snapshot of format 1 (before identities): refused by name.
        v[8] = 1;
        assert!(matches!(
            try_bytes(&v),
            Err(Error::Version { found: 1, .. })
        ));
        // Truncated anywhere: header, state, memory.
        for cut in [30, 100, good.len() - 1] {
            let r = try_bytes(&good[..cut]);
            assert!(
                matches!(r, Err(Error::Truncated { .. })),
                "cut at {cut}: {r:?}"
            );
        }
        // A flipped byte in each part.
        let mut v = good.clone();
        v[20] ^= 1;
        assert!(matches!(try_bytes(&v), Err(Error::Header(_))));
        let mut v = good.clone();
        v[HEADER_LEN as usize + 10] ^= 1;
        assert!(matches!(
            try_bytes(&v),
            Err(Error::Digest {
                part: "VM state",
                ..
            })
        ));
        let off = Snapshot::open(&p, false).unwrap().header.memory_offset as usize;
        let mut v = good.clone();
        v[off + 4096 * 3] ^= 0x10;
        assert!(matches!(
            try_bytes(&v),
            Ok(Err(Error::Digest {
                part: "memory image",
                ..
            }))
        ));
        let mut v = good.clone();
        v[off + 4096 * 5] = 1; // a hole that became data
        assert!(matches!(try_bytes(&v), Ok(Err(Error::Digest { .. }))));
        std::fs::remove_dir_all(d).ok();
    }

    /// A signed snapshot verifies with its key only; one that others may
    /// write is refused unless a MAC is checked.
    #[test]
    fn signed_snapshots_verify_with_their_key_and_exposed_files_are_refused() {
        use crate::migration::key::Psk;
        use std::os::unix::fs::PermissionsExt;
        let d = tmpdir("signed");
        let mut mem = vec![0u8; 8 << 20];
        mem[4096 * 5] = 3;
        let key = Psk::from_hex(&"ab".repeat(32)).unwrap();
        let other = Psk::from_hex(&"cd".repeat(32)).unwrap();
        let p = d.join("signed.snap");
        write(&create(&p), &state(), &[&mem], Some(&key)).unwrap();
        let s = Snapshot::open(&p, true).unwrap();
        let mut back = vec![0u8; mem.len()];
        s.load_verified(&key, &mut [&mut back[..]]).unwrap();
        assert_eq!(back, mem);
        assert!(matches!(
            s.load_verified(&other, &mut [&mut back[..]]),
            Err(Error::Mac { .. })
        ));
        // One byte of memory changed: the MAC catches it.
        let off = s.header.memory_offset;
        std::fs::OpenOptions::new()
            .write(true)
            .open(&p)
            .unwrap()
            .write_all_at(&[9], off + 4096 * 5)
            .unwrap();
        let s = Snapshot::open(&p, true).unwrap();
        assert!(matches!(
            s.load_verified(&key, &mut [&mut back[..]]),
            Err(Error::Mac { .. })
        ));
        // An unsigned snapshot and a key: refused.
        let (u, _) = write_sample(&d);
        let s = Snapshot::open(&u, true).unwrap();
        assert!(matches!(
            s.load_verified(&key, &mut [&mut back[..]]),
            Err(Error::Mac { .. })
        ));
        // Group-writable: refused for mapping.
        std::fs::set_permissions(&u, std::fs::Permissions::from_mode(0o620)).unwrap();
        assert!(matches!(
            Snapshot::open(&u, false),
            Err(Error::Exposed { .. })
        ));
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn garbage_state_with_a_right_digest_does_not_validate() {
        let garbage = vec![0xABu8; 200];
        assert!(matches!(
            decode_state("x", &garbage),
            Err(Error::State { .. })
        ));
    }
}
