//! Turns the kernel's static library into one an app can link with: what
//! hermit's own build tool does after `cargo build`, which the crates.io
//! package lacks.
//!
//! The library holds the kernel *and* its own copies of `core`, `alloc`
//! and `compiler_builtins`; the app brings its own `std` with theirs. So
//! every global symbol is renamed with a `hermit` prefix except the
//! kernel's interface: its entry point (`_start`), what the image's layout
//! names (`__bss_start`), and the system calls std calls (`sys_*`,
//! `runtime_entry`). Every ELF member is then marked OS/ABI
//! "standalone" (0xff), as hermit's tool does for its kernels.

use std::collections::BTreeSet;
use std::path::Path;

use anyhow::{Context, Result, bail, ensure};
use xshell::{Shell, cmd};

/// Symbols that keep their names besides `sys_*`.
const INTERFACE: [&str; 4] = ["_start", "__bss_start", "mcount", "runtime_entry"];
/// ELF's `EI_OSABI` byte and the value for a standalone image.
const EI_OSABI: usize = 7;
const OSABI_STANDALONE: u8 = 0xff;

/// Renames `lib`'s symbols (see the module doc) with the tools in `llvm`.
pub fn rename_symbols(sh: &Shell, llvm: &Path, lib: &Path) -> Result<usize> {
    let nm = llvm.join("llvm-nm");
    let objcopy = llvm.join("llvm-objcopy");
    // Defined symbols, "name type" per line.
    let defined = cmd!(
        sh,
        "{nm} --defined-only --format=just-symbols --extern-only {lib}"
    )
    .quiet()
    .ignore_stderr()
    .read()
    .context("llvm-nm")?;
    let keep: BTreeSet<&str> = defined
        .lines()
        .map(str::trim)
        .filter(|s| s.starts_with("sys_") || INTERFACE.contains(s))
        .collect();
    ensure!(
        keep.contains("_start") && keep.iter().any(|s| s.starts_with("sys_")),
        "{}: no _start or no sys_* symbols: not a Hermit kernel",
        lib.display()
    );
    let all = cmd!(sh, "{nm} --export-symbols {lib}")
        .quiet()
        .ignore_stderr()
        .read()
        .context("llvm-nm --export-symbols")?;
    let mut map = String::new();
    let mut n = 0;
    for s in all.lines().map(str::trim).collect::<BTreeSet<_>>() {
        if s.is_empty() || keep.contains(s) {
            continue;
        }
        // Mangled Rust names get the prefix as a path segment, so that they
        // still demangle: _ZN6hermit... ; others a plain prefix.
        let new = match s.strip_prefix("_ZN") {
            Some(rest) => format!("_ZN6hermit{rest}"),
            None => format!("hermit_{s}"),
        };
        map.push_str(&format!("{s} {new}\n"));
        n += 1;
    }
    let map_file = lib.with_extension("redefine");
    std::fs::write(&map_file, map).context("the rename list")?;
    cmd!(sh, "{objcopy} --redefine-syms={map_file} {lib}")
        .quiet()
        .run()
        .context("llvm-objcopy --redefine-syms")?;
    Ok(n)
}

/// Sets OS/ABI "standalone" in every ELF member of the archive at `lib`;
/// returns how many members it changed.
pub fn mark_standalone(lib: &Path) -> Result<usize> {
    let mut bytes = std::fs::read(lib).with_context(|| format!("{}", lib.display()))?;
    let n = mark_members(&mut bytes).with_context(|| format!("{}", lib.display()))?;
    std::fs::write(lib, &bytes).with_context(|| format!("{}", lib.display()))?;
    Ok(n)
}

fn mark_members(b: &mut [u8]) -> Result<usize> {
    const MAGIC: &[u8] = b"!<arch>\n";
    const HEADER: usize = 60;
    ensure!(b.starts_with(MAGIC), "not an ar archive");
    let mut at = MAGIC.len();
    let mut n = 0;
    while at < b.len() {
        let Some(h) = b.get(at..at + HEADER) else {
            bail!("a member header is cut short at byte {at}");
        };
        ensure!(&h[58..60] == b"`\n", "a bad member header at byte {at}");
        let size: usize = std::str::from_utf8(&h[48..58])
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .with_context(|| format!("a bad member size at byte {at}"))?;
        let data = at + HEADER;
        let end = data
            .checked_add(size)
            .filter(|&e| e <= b.len())
            .with_context(|| format!("a member at byte {at} runs past the end"))?;
        if b[data..end].starts_with(b"\x7fELF") && size > EI_OSABI {
            b[data + EI_OSABI] = OSABI_STANDALONE;
            n += 1;
        }
        at = end + (size & 1);
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(name: &str, data: &[u8]) -> Vec<u8> {
        let mut h = format!(
            "{name:<16}{:<12}{:<6}{:<6}{:<8}{:<10}`\n",
            0,
            0,
            0,
            644,
            data.len()
        )
        .into_bytes();
        h.extend_from_slice(data);
        if data.len() % 2 == 1 {
            h.push(b'\n');
        }
        h
    }

    #[test]
    fn every_elf_member_is_marked_and_nothing_else_changes() {
        let mut a = b"!<arch>\n".to_vec();
        a.extend(member("/", b"symtab"));
        a.extend(member("a.o/", b"\x7fELF\x02\x01\x01\x00rest"));
        a.extend(member("b.txt/", b"hello"));
        a.extend(member("c.o/", b"\x7fELF\x02\x01\x01\x00odd"));
        let before = a.clone();
        assert_eq!(mark_members(&mut a).unwrap(), 2);
        let changed: Vec<usize> = (0..a.len()).filter(|&i| a[i] != before[i]).collect();
        assert_eq!(changed.len(), 2);
        assert!(changed.iter().all(|&i| a[i] == OSABI_STANDALONE));
    }

    #[test]
    fn a_damaged_archive_is_refused() {
        assert!(mark_members(&mut b"not an archive".to_vec()).is_err());
        let mut a = b"!<arch>\n".to_vec();
        a.extend(member("a.o/", b"\x7fELF\x02\x01\x01\x00rest"));
        a.truncate(a.len() - 3);
        assert!(mark_members(&mut a).is_err());
    }
}
