//! A small flattened-device-tree reader: finds a property by node path in
//! one pass over the structure block. Bounds-checked throughout; a malformed
//! tree reads as "no such property".
#![deny(unsafe_code)]

const MAGIC: u32 = 0xd00d_feed;
const BEGIN_NODE: u32 = 1;
const END_NODE: u32 = 2;
const PROP: u32 = 3;
const NOP: u32 = 4;
const END: u32 = 9;
const MAX_DEPTH: usize = 16;

/// A device tree in memory.
#[derive(Clone, Copy, Debug)]
pub struct Fdt<'a> {
    structs: &'a [u8],
    strings: &'a [u8],
}

fn be32(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_be_bytes(
        b.get(at..at.checked_add(4)?)?.try_into().ok()?,
    ))
}

fn c_str(b: &[u8], at: usize) -> Option<&[u8]> {
    let rest = b.get(at..)?;
    let len = rest.iter().position(|&c| c == 0)?;
    Some(&rest[..len])
}

impl<'a> Fdt<'a> {
    /// Checks the header of the tree in `blob`.
    pub fn new(blob: &'a [u8]) -> Option<Self> {
        if be32(blob, 0)? != MAGIC {
            return None;
        }
        let total = be32(blob, 4)? as usize;
        let blob = blob.get(..total)?;
        let off_struct = be32(blob, 8)? as usize;
        let off_strings = be32(blob, 12)? as usize;
        let size_strings = be32(blob, 32)? as usize;
        let size_struct = be32(blob, 36)? as usize;
        Some(Fdt {
            structs: blob.get(off_struct..off_struct.checked_add(size_struct)?)?,
            strings: blob.get(off_strings..off_strings.checked_add(size_strings)?)?,
        })
    }

    /// The total size the header of the tree at `blob` claims (to bound the
    /// slice before [`Fdt::new`]).
    pub fn total_size(header: &[u8]) -> Option<usize> {
        (be32(header, 0)? == MAGIC).then(|| be32(header, 4).map(|n| n as usize))?
    }

    /// The value of property `name` of the node at `path` (`"/chosen"`,
    /// `"/"` for the root). Unit addresses must be spelled out (`memory@0`).
    pub fn property(&self, path: &str, name: &str) -> Option<&'a [u8]> {
        let want: heapless_path::Path<'_> = heapless_path::Path::parse(path)?;
        let mut stack: [&[u8]; MAX_DEPTH] = [&[]; MAX_DEPTH];
        let mut depth = 0usize; // number of open nodes, root included
        let mut at = 0usize;
        loop {
            let token = be32(self.structs, at)?;
            at += 4;
            match token {
                BEGIN_NODE => {
                    let node = c_str(self.structs, at)?;
                    at = (at + node.len() + 1).next_multiple_of(4);
                    if depth >= MAX_DEPTH {
                        return None;
                    }
                    stack[depth] = node;
                    depth += 1;
                }
                END_NODE => depth = depth.checked_sub(1)?,
                PROP => {
                    let len = be32(self.structs, at)? as usize;
                    let nameoff = be32(self.structs, at + 4)? as usize;
                    let value = self.structs.get(at + 8..(at + 8).checked_add(len)?)?;
                    at = (at + 8 + len).next_multiple_of(4);
                    // stack[0] is the root (empty name); compare the rest.
                    if depth >= 1
                        && want.matches(&stack[1..depth])
                        && c_str(self.strings, nameoff)? == name.as_bytes()
                    {
                        return Some(value);
                    }
                }
                NOP => {}
                END => return None,
                _ => return None,
            }
        }
    }

    /// A property as a string (without its NUL).
    pub fn str_property(&self, path: &str, name: &str) -> Option<&'a str> {
        let v = self.property(path, name)?;
        core::str::from_utf8(v.strip_suffix(&[0]).unwrap_or(v)).ok()
    }

    /// A property as a big-endian u32 or u64 (by its length).
    pub fn int_property(&self, path: &str, name: &str) -> Option<u64> {
        let v = self.property(path, name)?;
        match v.len() {
            4 => Some(u64::from(u32::from_be_bytes(v.try_into().ok()?))),
            8 => Some(u64::from_be_bytes(v.try_into().ok()?)),
            _ => None,
        }
    }
}

mod heapless_path {
    /// A node path split into at most 16 components, without allocating.
    pub struct Path<'a> {
        parts: [&'a str; super::MAX_DEPTH],
        len: usize,
    }

    impl<'a> Path<'a> {
        pub fn parse(path: &'a str) -> Option<Self> {
            let mut parts = [""; super::MAX_DEPTH];
            let mut len = 0;
            for p in path.strip_prefix('/')?.split('/').filter(|p| !p.is_empty()) {
                *parts.get_mut(len)? = p;
                len += 1;
            }
            Some(Path { parts, len })
        }

        pub fn matches(&self, nodes: &[&[u8]]) -> bool {
            nodes.len() == self.len
                && nodes
                    .iter()
                    .zip(&self.parts)
                    .all(|(n, p)| *n == p.as_bytes())
        }
    }
}
