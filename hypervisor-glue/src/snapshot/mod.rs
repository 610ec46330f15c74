//! Snapshots: the whole VM in one file, and the format of that file.
//!
//! ```text
//! offset 0        header (64 bytes)
//!                   magic "FERRYSNP" | format version u32 | flags u32
//!                   state_len u64 | memory_offset u64 | memory_len u64
//!                   state digest u64 | memory digest u64 | header digest u64
//! 64              VmState, archived with rkyv (validated with bytecheck)
//! memory_offset   guest memory, region after region, page aligned; pages
//!                 of zeros are holes (a sparse file), so they cost nothing
//! ```
//!
//! Digests are XXH3-64. Everything is checked before anything is used:
//! the magic and version, every length against the file's size and against
//! fixed bounds, each digest, the archive's structure, and then the state's
//! meaning (memory layout, sizes of KVM structures) by whoever restores it.
//! The memory region is laid out so that restore can map the file
//! copy-on-write as guest memory instead of reading it.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;

use xxhash_rust::xxh3::{Xxh3, xxh3_64};

use crate::clock::ClockState;
use crate::devices::console::ConsoleState;
use crate::devices::virtio::net::NetState;
use crate::id::VmId;
use crate::kvm::{IrqchipState, VcpuState};

/// The file's first bytes.
pub const MAGIC: [u8; 8] = *b"FERRYSNP";
/// This format's version (2: the VM's identity and generation, typed
/// network configuration).
pub const FORMAT_VERSION: u32 = 2;
/// Header length.
pub const HEADER_LEN: u64 = 64;
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
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN as usize] {
        let mut h = [0u8; HEADER_LEN as usize];
        h[..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[16..24].copy_from_slice(&self.state_len.to_le_bytes());
        h[24..32].copy_from_slice(&self.memory_offset.to_le_bytes());
        h[32..40].copy_from_slice(&self.memory_len.to_le_bytes());
        h[40..48].copy_from_slice(&self.state_digest.to_le_bytes());
        h[48..56].copy_from_slice(&self.memory_digest.to_le_bytes());
        let d = xxh3_64(&h[..56]);
        h[56..64].copy_from_slice(&d.to_le_bytes());
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
        if xxh3_64(&h[..56]) != u64_at(56) {
            return Err(Error::Header(path.into()));
        }
        let hd = Header {
            state_len: u64_at(16),
            memory_offset: u64_at(24),
            memory_len: u64_at(32),
            state_digest: u64_at(40),
            memory_digest: u64_at(48),
        };
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

/// Writes a snapshot: `state`, then memory as given by `regions`, each a
/// slice of guest memory (read while the VM is paused).
pub fn write(path: &Path, state: &VmState, regions: &[&[u8]]) -> Result<u64, Error> {
    let bytes = encode_state(state)?;
    let memory_offset = (HEADER_LEN + bytes.len() as u64).next_multiple_of(PAGE);
    let memory_len: u64 = regions.iter().map(|r| r.len() as u64).sum();
    let tmp = path.with_extension("partial");
    let file = File::create(&tmp).map_err(io_err(&tmp))?;
    file.write_all_at(&bytes, HEADER_LEN)
        .map_err(io_err(&tmp))?;
    let mut digest = Xxh3::new();
    let mut at = memory_offset;
    const ZERO: [u8; PAGE as usize] = [0; PAGE as usize];
    for r in regions {
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
                        .map_err(io_err(&tmp))?;
                    run = None;
                }
                _ => {}
            }
        }
        if let Some(start) = run {
            let off = start * PAGE as usize;
            file.write_all_at(&r[off..], at + off as u64)
                .map_err(io_err(&tmp))?;
        }
        at += r.len() as u64;
    }
    file.set_len(memory_offset + memory_len)
        .map_err(io_err(&tmp))?;
    let header = Header {
        state_len: bytes.len() as u64,
        memory_offset,
        memory_len,
        state_digest: xxh3_64(&bytes),
        memory_digest: digest.digest(),
    };
    file.write_all_at(&header.encode(), 0)
        .map_err(io_err(&tmp))?;
    file.sync_all().map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))?;
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
    /// The path, for messages.
    pub path: String,
}

impl Snapshot {
    /// Opens and checks everything but the memory digest.
    pub fn open(path: &Path) -> Result<Snapshot, Error> {
        let name = path.display().to_string();
        let mut file = File::open(path).map_err(io_err(path))?;
        let size = file.metadata().map_err(io_err(path))?.len();
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
            path: name,
        })
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
                net: None,
            },
            memory: vec![(0, 8 << 20)],
            vcpu: VcpuState {
                regs: vec![1; 144],
                msrs: vec![(0x10, 5)],
                ..Default::default()
            },
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

    fn write_sample(dir: &Path) -> (std::path::PathBuf, Vec<u8>) {
        let mut mem = vec![0u8; 8 << 20];
        mem[4096 * 3] = 7;
        mem[(8 << 20) - 1] = 9;
        let p = dir.join("s.snap");
        write(&p, &state(), &[&mem]).unwrap();
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
        let s = Snapshot::open(&p).unwrap();
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
            std::fs::write(&q, bytes).unwrap();
            Snapshot::open(&q).map(|s| {
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
        let off = Snapshot::open(&p).unwrap().header.memory_offset as usize;
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

    #[test]
    fn garbage_state_with_a_right_digest_does_not_validate() {
        let garbage = vec![0xABu8; 200];
        assert!(matches!(
            decode_state("x", &garbage),
            Err(Error::State { .. })
        ));
    }
}
