//! A validating loader for Hermit-ABI images (ELF64, x86_64, `ET_DYN` or
//! `ET_EXEC`, with the Hermit entry-version note).
//!
//! The image is untrusted input: every offset, size and count is checked
//! against the file and against guest memory before use, and anything the
//! loader does not understand is an error naming it. Relocatable images are
//! loaded at [`ferry_abi::layout::KERNEL_ADDR`] and their
//! `R_X86_64_RELATIVE` relocations applied.

use std::ops::Range;

use crate::memory::{self, GuestRam};

const EI_CLASS: usize = 4;
const EI_DATA: usize = 5;
const ELFCLASS64: u8 = 2;
const ELFDATA2LSB: u8 = 1;
const ET_EXEC: u16 = 2;
const ET_DYN: u16 = 3;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_DYNAMIC: u32 = 2;
const PT_INTERP: u32 = 3;
const PT_NOTE: u32 = 4;
const PT_TLS: u32 = 7;
const DT_NULL: u64 = 0;
const DT_NEEDED: u64 = 1;
const DT_RELA: u64 = 7;
const DT_RELASZ: u64 = 8;
const DT_RELAENT: u64 = 9;
const DT_REL: u64 = 17;
const R_X86_64_NONE: u32 = 0;
const R_X86_64_RELATIVE: u32 = 8;
const NT_HERMIT_ENTRY_VERSION: u32 = 0x5a00;
/// The Hermit entry ABI version this loader implements.
pub const HERMIT_ENTRY_VERSION: u8 = 4;
/// Note type of the `FERRY` note that Ferry runtime images carry.
const NT_FERRY: u32 = 1;
/// Xen's PVH entry note (QEMU's way in), which Ferry runtime images carry.
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;

const EHDR_SIZE: usize = 64;
const PHDR_SIZE: usize = 56;
const MAX_PHDRS: usize = 64;
const MAX_RELOCATIONS: usize = 1 << 20;
const MAX_NOTE_BYTES: usize = 64 * 1024;
/// Highest address an image may reach (guest RAM below the MMIO hole is
/// less): bounds every sum of addresses and sizes that follows.
const MAX_IMAGE_END: u64 = 1 << 32;

/// What is wrong with an image.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// Not an ELF file at all.
    #[error("not an ELF file (no \\x7fELF magic)")]
    NotElf,
    /// ELF, but not one this loader can run.
    #[error("unsupported ELF: {0}")]
    Unsupported(String),
    /// A header field points outside the file or is inconsistent.
    #[error("malformed ELF: {0}")]
    Malformed(String),
    /// No Hermit entry-version note.
    #[error(
        "the ELF has no Hermit entry-version note: it is not a Hermit/Ferry unikernel image (build it with ferry-runtime)"
    )]
    NoHermitNote,
    /// A Hermit note of another version.
    #[error(
        "the image speaks Hermit entry version {found}, this VMM version {HERMIT_ENTRY_VERSION}"
    )]
    HermitVersion {
        /// The version in the image.
        found: u8,
    },
    /// The image does not fit the guest memory.
    #[error("the image needs at least {needed} bytes of guest memory ({} MiB) but the VM has {have} ({} MiB); pass a larger --memory", needed.div_ceil(1 << 20), have >> 20)]
    TooLarge {
        /// Bytes needed.
        needed: u64,
        /// Bytes the VM has.
        have: u64,
    },
    /// Writing the image into guest memory failed.
    #[error("loading the image: {0}")]
    Memory(String),
}

impl From<memory::Error> for Error {
    fn from(e: memory::Error) -> Self {
        Error::Memory(e.to_string())
    }
}

/// Which kernel an image carries: both boot through the Hermit entry, but
/// they read their settings differently.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Ferry's runtime (its images carry a `FERRY` note).
    Ferry,
    /// A RustyHermit kernel with a std application (no `FERRY` note).
    Hermit,
}

impl Kind {
    /// How `ferry run` names it.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ferry => "Ferry runtime",
            Kind::Hermit => "RustyHermit",
        }
    }
}

/// The image's thread-local storage template (its PT_TLS segment), which a
/// Hermit kernel copies for every thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tls {
    /// Guest address of the template.
    pub start: u64,
    /// Bytes of initialised data.
    pub filesz: u64,
    /// Bytes in all (the rest is zero).
    pub memsz: u64,
    /// Alignment.
    pub align: u64,
}

/// Where the image landed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadedImage {
    /// Guest-physical (= virtual) entry point.
    pub entry: u64,
    /// Guest-physical range the image occupies (including .bss).
    pub range: Range<u64>,
    /// Which kernel it is.
    pub kind: Kind,
    /// Its TLS template, if it has one.
    pub tls: Option<Tls>,
}

#[derive(Clone, Copy, Debug)]
struct Phdr {
    p_type: u32,
    offset: u64,
    vaddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn malformed(msg: impl Into<String>) -> Error {
    Error::Malformed(msg.into())
}

/// The bytes `[off, off + len)` of the file, or an error naming `what`.
fn file_range<'a>(file: &'a [u8], off: u64, len: u64, what: &str) -> Result<&'a [u8], Error> {
    let end = off
        .checked_add(len)
        .ok_or_else(|| malformed(format!("{what}: offset overflows")))?;
    if end > file.len() as u64 {
        return Err(malformed(format!(
            "{what} lies beyond the end of the file ({off:#x}+{len:#x} > {:#x})",
            file.len()
        )));
    }
    Ok(&file[off as usize..end as usize])
}

/// A parsed, checked image, ready to load.
#[derive(Debug)]
pub struct Image<'a> {
    file: &'a [u8],
    relocatable: bool,
    entry: u64,
    loads: Vec<Phdr>,
    dynamic: Option<Phdr>,
    tls: Option<Phdr>,
    kind: Kind,
    /// Lowest and highest virtual address of the loadable segments.
    span: Range<u64>,
}

impl<'a> Image<'a> {
    /// Parses and checks an image file.
    pub fn parse(file: &'a [u8]) -> Result<Self, Error> {
        if file.len() < 4 || &file[..4] != b"\x7fELF" {
            return Err(Error::NotElf);
        }
        if file.len() < EHDR_SIZE {
            return Err(malformed("file shorter than the ELF header"));
        }
        if file[EI_CLASS] != ELFCLASS64 {
            return Err(Error::Unsupported("not a 64-bit ELF".into()));
        }
        if file[EI_DATA] != ELFDATA2LSB {
            return Err(Error::Unsupported("not little-endian".into()));
        }
        let e_type = u16_at(file, 16);
        let machine = u16_at(file, 18);
        if machine != EM_X86_64 {
            return Err(Error::Unsupported(format!(
                "machine {machine}, not x86_64 (62)"
            )));
        }
        let relocatable = match e_type {
            ET_DYN => true,
            ET_EXEC => false,
            t => {
                return Err(Error::Unsupported(format!(
                    "ELF type {t}: need an executable (ET_EXEC) or static-pie (ET_DYN)"
                )));
            }
        };
        let entry = u64_at(file, 24);
        let phoff = u64_at(file, 32);
        let phentsize = usize::from(u16_at(file, 54));
        let phnum = usize::from(u16_at(file, 56));
        if phentsize != PHDR_SIZE {
            return Err(malformed(format!(
                "program header size {phentsize}, expected {PHDR_SIZE}"
            )));
        }
        if phnum == 0 || phnum > MAX_PHDRS {
            return Err(malformed(format!(
                "{phnum} program headers (1 to {MAX_PHDRS} allowed)"
            )));
        }
        let table = file_range(
            file,
            phoff,
            (phnum * PHDR_SIZE) as u64,
            "program header table",
        )?;
        let phdrs: Vec<Phdr> = table
            .chunks_exact(PHDR_SIZE)
            .map(|p| Phdr {
                p_type: u32_at(p, 0),
                offset: u64_at(p, 8),
                vaddr: u64_at(p, 16),
                filesz: u64_at(p, 32),
                memsz: u64_at(p, 40),
                align: u64_at(p, 48),
            })
            .collect();

        if phdrs.iter().any(|p| p.p_type == PT_INTERP) {
            return Err(Error::Unsupported(
                "dynamically linked (has PT_INTERP)".into(),
            ));
        }
        let kind = check_notes(file, &phdrs)?;

        let loads: Vec<Phdr> = phdrs
            .iter()
            .copied()
            .filter(|p| p.p_type == PT_LOAD && p.memsz > 0)
            .collect();
        if loads.is_empty() {
            return Err(malformed("no loadable segment"));
        }
        for (i, p) in loads.iter().enumerate() {
            if p.filesz > p.memsz {
                return Err(malformed(format!(
                    "segment {i}: file size {:#x} exceeds memory size {:#x}",
                    p.filesz, p.memsz
                )));
            }
            file_range(file, p.offset, p.filesz, &format!("segment {i}"))?;
            match p.vaddr.checked_add(p.memsz) {
                Some(end) if end <= MAX_IMAGE_END => {}
                _ => {
                    return Err(malformed(format!(
                        "segment {i}: {:#x} bytes at {:#x} reach past {MAX_IMAGE_END:#x}",
                        p.memsz, p.vaddr
                    )));
                }
            }
        }
        let start = loads.iter().map(|p| p.vaddr).min().expect("non-empty");
        let end = loads
            .iter()
            .map(|p| p.vaddr + p.memsz)
            .max()
            .expect("non-empty");
        if relocatable && start != 0 {
            return Err(malformed(format!(
                "relocatable image whose first segment is at {start:#x}, not 0"
            )));
        }
        if !loads
            .iter()
            .any(|p| (p.vaddr..p.vaddr + p.memsz).contains(&entry))
        {
            return Err(malformed(format!(
                "entry point {entry:#x} is in no loadable segment"
            )));
        }
        let dynamic = phdrs.iter().copied().find(|p| p.p_type == PT_DYNAMIC);
        let tls = phdrs.iter().copied().find(|p| p.p_type == PT_TLS);
        if let Some(t) = tls {
            let inside = t.filesz <= t.memsz
                && t.align <= 4096
                && t.vaddr.checked_add(t.memsz).is_some_and(|e| e <= end)
                && t.vaddr >= start;
            if !inside {
                return Err(malformed(format!(
                    "the TLS segment ({:#x} bytes at {:#x}, align {:#x}) is not inside the image",
                    t.memsz, t.vaddr, t.align
                )));
            }
        }
        Ok(Image {
            file,
            relocatable,
            entry,
            loads,
            dynamic,
            tls,
            kind,
            span: start..end,
        })
    }

    /// Guest-physical address of the image's lowest byte once loaded.
    fn base(&self) -> u64 {
        if self.relocatable {
            ferry_abi::layout::KERNEL_ADDR
        } else {
            0
        }
    }

    /// Which kernel the image carries.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The guest-physical range the image will occupy.
    pub fn load_range(&self) -> Range<u64> {
        self.base() + self.span.start..self.base() + self.span.end
    }

    /// Copies the segments into guest memory, zeroes .bss, applies relocations.
    /// The image and `min_free_after` bytes after it must fit in the RAM
    /// below the MMIO hole.
    pub fn load(&self, mem: &GuestRam, min_free_after: u64) -> Result<LoadedImage, Error> {
        let range = self.load_range();
        let ram_low_end = memory::ram_ranges(memory::ram_end(mem))[0].1;
        let needed = range.end.saturating_add(min_free_after);
        if range.start < ferry_abi::layout::KERNEL_ADDR || needed > ram_low_end {
            return Err(Error::TooLarge {
                needed,
                have: memory::ram_end(mem),
            });
        }
        let base = self.base();
        for p in &self.loads {
            let data = &self.file[p.offset as usize..(p.offset + p.filesz) as usize];
            memory::write(mem, base + p.vaddr, data)?;
            // Fresh guest memory is zero, but be explicit: .bss must be.
            const ZEROS: [u8; 4096] = [0; 4096];
            let (mut at, end) = (base + p.vaddr + p.filesz, base + p.vaddr + p.memsz);
            while at < end {
                let n = (end - at).min(ZEROS.len() as u64);
                memory::write(mem, at, &ZEROS[..n as usize])?;
                at += n;
            }
        }
        if self.relocatable {
            self.relocate(mem, base)?;
        }
        Ok(LoadedImage {
            entry: base + self.entry,
            range,
            kind: self.kind,
            tls: self.tls.map(|t| Tls {
                start: base + t.vaddr,
                filesz: t.filesz,
                memsz: t.memsz,
                align: t.align.max(1),
            }),
        })
    }

    /// File offset of virtual address `vaddr` (inside a loadable segment's file part).
    fn vaddr_to_offset(&self, vaddr: u64, len: u64) -> Result<u64, Error> {
        self.loads
            .iter()
            .find(|p| vaddr >= p.vaddr && vaddr.saturating_add(len) <= p.vaddr + p.filesz)
            .map(|p| p.offset + (vaddr - p.vaddr))
            .ok_or_else(|| {
                malformed(format!(
                    "dynamic table points at {vaddr:#x}+{len:#x}, outside the file-backed segments"
                ))
            })
    }

    fn relocate(&self, mem: &GuestRam, base: u64) -> Result<(), Error> {
        let Some(dynamic) = self.dynamic else {
            return Ok(());
        };
        let table = file_range(self.file, dynamic.offset, dynamic.filesz, "dynamic section")?;
        let (mut rela, mut relasz, mut relaent) = (None, 0u64, 24u64);
        for entry in table.chunks_exact(16) {
            let (tag, val) = (u64_at(entry, 0), u64_at(entry, 8));
            match tag {
                DT_NULL => break,
                DT_NEEDED => {
                    return Err(Error::Unsupported(
                        "links shared libraries (DT_NEEDED)".into(),
                    ));
                }
                DT_REL => {
                    return Err(Error::Unsupported(
                        "REL relocations (only RELA is supported)".into(),
                    ));
                }
                DT_RELA => rela = Some(val),
                DT_RELASZ => relasz = val,
                DT_RELAENT => relaent = val,
                _ => {}
            }
        }
        let Some(rela) = rela else { return Ok(()) };
        if relaent != 24 {
            return Err(malformed(format!(
                "relocation entry size {relaent}, expected 24"
            )));
        }
        if relasz % 24 != 0 || relasz / 24 > MAX_RELOCATIONS as u64 {
            return Err(malformed(format!("relocation table of {relasz} bytes")));
        }
        let off = self.vaddr_to_offset(rela, relasz)?;
        let relocs = file_range(self.file, off, relasz, "relocation table")?;
        for r in relocs.chunks_exact(24) {
            let (offset, info, addend) = (u64_at(r, 0), u64_at(r, 8), u64_at(r, 16));
            match info as u32 {
                R_X86_64_NONE => {}
                R_X86_64_RELATIVE => {
                    if offset < self.span.start || offset.saturating_add(8) > self.span.end {
                        return Err(malformed(format!(
                            "relocation at {offset:#x} lies outside the image"
                        )));
                    }
                    memory::write_u64(mem, base + offset, base.wrapping_add(addend))?;
                }
                t => {
                    return Err(Error::Unsupported(format!(
                        "relocation type {t} (only R_X86_64_RELATIVE)"
                    )));
                }
            }
        }
        Ok(())
    }
}

/// Checks the Hermit entry-version note and tells a Ferry runtime image
/// (which also carries a `FERRY` note) from a Hermit one.
fn check_notes(file: &[u8], phdrs: &[Phdr]) -> Result<Kind, Error> {
    let mut found = None;
    let mut ferry = false;
    for p in phdrs.iter().filter(|p| p.p_type == PT_NOTE) {
        let len = p.filesz.min(MAX_NOTE_BYTES as u64);
        let notes = file_range(file, p.offset, len, "note segment")?;
        let align = if p.align == 8 { 8 } else { 4 };
        let mut at = 0usize;
        while at + 12 <= notes.len() {
            let namesz = u32_at(notes, at) as usize;
            let descsz = u32_at(notes, at + 4) as usize;
            let ty = u32_at(notes, at + 8);
            let name_at = at + 12;
            let desc_at = name_at
                .checked_add(namesz.next_multiple_of(align))
                .ok_or_else(|| malformed("note size"))?;
            let next = desc_at
                .checked_add(descsz.next_multiple_of(align))
                .ok_or_else(|| malformed("note size"))?;
            if next > notes.len() || name_at + namesz > notes.len() {
                return Err(malformed("a note runs past the end of its segment"));
            }
            let name = &notes[name_at..name_at + namesz];
            if ty == NT_HERMIT_ENTRY_VERSION && name == b"HERMIT\0" && descsz >= 1 {
                found = Some(notes[desc_at]);
            }
            // Ferry's note; images built before it existed are told by
            // their PVH entry note (Xen's), which Hermit kernels lack.
            if (ty == NT_FERRY && name == b"FERRY\0")
                || (ty == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0")
            {
                ferry = true;
            }
            at = next;
        }
    }
    match found {
        None => Err(Error::NoHermitNote),
        Some(HERMIT_ENTRY_VERSION) if ferry => Ok(Kind::Ferry),
        Some(HERMIT_ENTRY_VERSION) => Ok(Kind::Hermit),
        Some(v) => Err(Error::HermitVersion { found: v }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid relocatable image: one segment, a Hermit note, one
    /// RELATIVE relocation.
    fn image() -> Vec<u8> {
        let mut f = vec![0u8; 0x400];
        f[..4].copy_from_slice(b"\x7fELF");
        f[EI_CLASS] = ELFCLASS64;
        f[EI_DATA] = ELFDATA2LSB;
        f[16..18].copy_from_slice(&ET_DYN.to_le_bytes());
        f[18..20].copy_from_slice(&EM_X86_64.to_le_bytes());
        f[24..32].copy_from_slice(&0x10u64.to_le_bytes()); // entry
        f[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
        f[54..56].copy_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
        f[56..58].copy_from_slice(&3u16.to_le_bytes());
        let ph = |f: &mut Vec<u8>, i: usize, t: u32, off: u64, va: u64, fsz: u64, msz: u64| {
            let o = 64 + i * PHDR_SIZE;
            f[o..o + 4].copy_from_slice(&t.to_le_bytes());
            f[o + 8..o + 16].copy_from_slice(&off.to_le_bytes());
            f[o + 16..o + 24].copy_from_slice(&va.to_le_bytes());
            f[o + 32..o + 40].copy_from_slice(&fsz.to_le_bytes());
            f[o + 40..o + 48].copy_from_slice(&msz.to_le_bytes());
            f[o + 48..o + 56].copy_from_slice(&4u64.to_le_bytes());
        };
        // segment: file 0x200..0x400 at vaddr 0, 0x1000 in memory
        ph(&mut f, 0, PT_LOAD, 0x200, 0, 0x200, 0x1000);
        ph(&mut f, 1, PT_NOTE, 0x100, 0, 24, 24);
        ph(&mut f, 2, PT_DYNAMIC, 0x140, 0, 48, 48);
        // note: namesz 7, descsz 1, type 0x5a00, "HERMIT\0\0", desc 4
        f[0x100..0x104].copy_from_slice(&7u32.to_le_bytes());
        f[0x104..0x108].copy_from_slice(&1u32.to_le_bytes());
        f[0x108..0x10c].copy_from_slice(&NT_HERMIT_ENTRY_VERSION.to_le_bytes());
        f[0x10c..0x114].copy_from_slice(b"HERMIT\0\0");
        f[0x114] = HERMIT_ENTRY_VERSION;
        // dynamic: RELA at vaddr 0x100 (file 0x300), 24 bytes
        let dynv = [(DT_RELA, 0x100u64), (DT_RELASZ, 24), (DT_NULL, 0)];
        for (i, (t, v)) in dynv.iter().enumerate() {
            f[0x140 + i * 16..0x148 + i * 16].copy_from_slice(&t.to_le_bytes());
            f[0x148 + i * 16..0x150 + i * 16].copy_from_slice(&v.to_le_bytes());
        }
        // rela: at offset 0x8, RELATIVE, addend 0x40
        f[0x300..0x308].copy_from_slice(&8u64.to_le_bytes());
        f[0x308..0x310].copy_from_slice(&u64::from(R_X86_64_RELATIVE).to_le_bytes());
        f[0x310..0x318].copy_from_slice(&0x40u64.to_le_bytes());
        f
    }

    fn mem() -> GuestRam {
        memory::create(memory::MIN_MEMORY).unwrap()
    }

    #[test]
    fn loads_and_relocates() {
        let f = image();
        let img = Image::parse(&f).unwrap();
        let m = mem();
        let loaded = img.load(&m, 0).unwrap();
        let base = ferry_abi::layout::KERNEL_ADDR;
        assert_eq!(loaded.entry, base + 0x10);
        assert_eq!(loaded.range, base..base + 0x1000);
        assert_eq!(memory::read_u64(&m, base + 8).unwrap(), base + 0x40);
    }

    #[test]
    fn rejects_non_elf_and_truncated_files() {
        assert_eq!(Image::parse(b"").unwrap_err(), Error::NotElf);
        assert_eq!(
            Image::parse(b"#!/bin/sh\necho hi\n").unwrap_err(),
            Error::NotElf
        );
        let f = image();
        assert!(matches!(Image::parse(&f[..40]), Err(Error::Malformed(_))));
        assert!(matches!(
            Image::parse(&f[..0x300]),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn rejects_missing_or_wrong_hermit_note() {
        let mut f = image();
        f[0x10c] = b'X';
        assert_eq!(Image::parse(&f).unwrap_err(), Error::NoHermitNote);
        let mut f = image();
        f[0x114] = 3;
        assert_eq!(
            Image::parse(&f).unwrap_err(),
            Error::HermitVersion { found: 3 }
        );
    }

    /// A segment whose end wraps or lies beyond any guest RAM is refused,
    /// not a panic or a huge allocation.
    #[test]
    fn rejects_segments_reaching_past_the_address_space() {
        for (vaddr, memsz) in [
            (0u64, u64::MAX - 0x10),
            (0x1000, u64::MAX - 0x1000),
            (0, MAX_IMAGE_END + 1),
            (u64::MAX - 0x800, 0x1000),
        ] {
            let mut f = image();
            f[64 + 16..64 + 24].copy_from_slice(&vaddr.to_le_bytes());
            f[64 + 40..64 + 48].copy_from_slice(&memsz.to_le_bytes());
            let e = Image::parse(&f).unwrap_err();
            assert!(
                matches!(e, Error::Malformed(ref m) if m.contains("reach past")),
                "{vaddr:#x}+{memsz:#x}: {e:?}"
            );
        }
    }

    #[test]
    fn rejects_hostile_headers() {
        let mut f = image();
        f[56..58].copy_from_slice(&1000u16.to_le_bytes());
        assert!(matches!(Image::parse(&f), Err(Error::Malformed(_))));
        let mut f = image();
        f[18] = 3; // i386
        assert!(matches!(Image::parse(&f), Err(Error::Unsupported(_))));
        let mut f = image();
        // segment file size beyond the file
        f[64 + 32..64 + 40].copy_from_slice(&0x10_0000u64.to_le_bytes());
        f[64 + 40..64 + 48].copy_from_slice(&0x10_0000u64.to_le_bytes());
        assert!(matches!(Image::parse(&f), Err(Error::Malformed(_))));
        let mut f = image();
        f[24..32].copy_from_slice(&0x5000u64.to_le_bytes()); // entry outside
        assert!(matches!(Image::parse(&f), Err(Error::Malformed(_))));
    }

    #[test]
    fn rejects_relocations_outside_the_image() {
        let mut f = image();
        f[0x300..0x308].copy_from_slice(&0xFFFF_FFF0u64.to_le_bytes());
        let img = Image::parse(&f).unwrap();
        assert!(matches!(img.load(&mem(), 0), Err(Error::Malformed(_))));
        let mut f = image();
        f[0x308..0x310].copy_from_slice(&1u64.to_le_bytes()); // R_X86_64_64
        let img = Image::parse(&f).unwrap();
        assert!(matches!(img.load(&mem(), 0), Err(Error::Unsupported(_))));
    }

    #[test]
    fn rejects_images_larger_than_memory() {
        let mut f = image();
        f[64 + 40..64 + 48].copy_from_slice(&(64u64 << 20).to_le_bytes()); // 64 MiB .bss
        let img = Image::parse(&f).unwrap();
        assert!(matches!(img.load(&mem(), 0), Err(Error::TooLarge { .. })));
    }
}
