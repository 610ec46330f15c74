//! The Hermit kernel: hermit-kernel 0.11.0 from crates.io, Ferry's patch
//! series (`images/hermit/patches/`), built with the pinned nightly and
//! post-processed into `target/hermit/lib/libhermit.a`.
//!
//! The build is skipped when a stamp over every input (the crates'
//! checksums, the patches, the features, the compiler, this recipe) says
//! the library is up to date.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use sha2::{Digest, Sha256};
use xshell::{Shell, cmd};

use crate::archive;
use crate::toolchain::{self, Toolchain};

/// A crate from crates.io, pinned by its checksum.
struct Crate {
    name: &'static str,
    version: &'static str,
    sha256: &'static str,
    /// Its patches: a directory under `images/hermit/patches/`.
    patches: &'static str,
}

impl Crate {
    fn dir_name(&self) -> String {
        format!("{}-{}", self.name, self.version)
    }
}

const KERNEL: Crate = Crate {
    name: "hermit-kernel",
    version: "0.11.0",
    sha256: "e5a914a929e843e539267f5f8d1b6b53add9587db6caa5547b7bff16edba8e03",
    patches: "kernel",
};

/// The `interrupts` crate that the kernel's locks use to mask interrupts:
/// patched so that, in PVM native mode, it masks them the PVM way.
const INTERRUPTS: Crate = Crate {
    name: "interrupts",
    version: "0.1.5",
    sha256: "c1ccb0bdc9cefc5772ebc23d9bd94aabf408ab6753735f1936ac6ed7e714c8c6",
    patches: "interrupts",
};

/// Which kernel to build.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Flavour {
    /// Ferry's: the whole patch series, native on PVM, Ferry's clock.
    Ferry,
    /// Upstream's code: only the patch that lets today's nightly compile
    /// it (no change in behaviour). On a PVM host it cannot boot (its
    /// XGETBV stops PVM's emulator); on hardware KVM it should.
    Stock,
}

impl Flavour {
    /// The kernel's features: PCI (virtio-net), TCP and UDP; for Ferry's,
    /// `pvm` (native mode on PVM hosts, from the patches), `ferry-clock`
    /// (time from Ferry's clock page), `ferry-dma` (device memory without
    /// mappings) and `ferry-net` (no ISR reads). No DHCP: Ferry gives the
    /// address; `fsgsbase` (thread pointers without MSR writes).
    fn features(self) -> &'static str {
        match self {
            Flavour::Ferry => "pci,tcp,udp,fsgsbase,pvm,ferry-clock,ferry-dma,ferry-net",
            Flavour::Stock => "pci,tcp,udp",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Flavour::Ferry => "ferry",
            Flavour::Stock => "stock",
        }
    }

    /// Whether patch file `name` of crate `c` is part of this flavour.
    fn takes(self, c: &Crate, name: &str) -> bool {
        self == Flavour::Ferry || (c.patches == "kernel" && name.starts_with("0001-"))
    }
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}
/// Hermit builds its kernel without `noalias` on `&mut` (its own tool
/// sets this); the upstream code's warnings are not ours to read on every
/// build (`ferry-images kernel --warnings` shows them).
const RUSTFLAGS: &str = "-Zmutable-noalias=no";
/// The kernel's log level, fixed when it is compiled: warnings and errors
/// reach the console, its boot chatter does not. `FERRY_HERMIT_LOG=debug`
/// (or off, error, info, trace) builds another.
fn log_level() -> String {
    std::env::var("FERRY_HERMIT_LOG").unwrap_or_else(|_| "warn".into())
}
/// Bumped whenever this recipe changes in a way the stamp cannot see.
const RECIPE: u32 = 1;

/// Builds the kernel unless it is up to date; returns the directory that
/// holds `libhermit.a`.
pub fn kernel(
    sh: &Shell,
    root: &Path,
    tc: &Toolchain,
    flavour: Flavour,
    force: bool,
    warnings: bool,
) -> Result<PathBuf> {
    let work = root.join("target/hermit");
    let lib_dir = match flavour {
        Flavour::Ferry => work.join("lib"),
        Flavour::Stock => work.join("stock/lib"),
    };
    let lib = lib_dir.join("libhermit.a");
    let stamp_file = lib_dir.join("stamp");
    let patches = root.join("images/hermit/patches");
    let stamp = stamp(root, &patches, tc, flavour)?;
    if !force
        && lib.is_file()
        && std::fs::read_to_string(&stamp_file).ok().as_deref() == Some(&stamp)
    {
        eprintln!(
            "ferry-images: the Hermit kernel is up to date ({})",
            lib.display()
        );
        return Ok(lib_dir);
    }
    let started = std::time::Instant::now();
    let src = match flavour {
        Flavour::Ferry => work.join("src"),
        Flavour::Stock => work.join("stock/src"),
    };
    if src.exists() {
        std::fs::remove_dir_all(&src).with_context(|| format!("{}", src.display()))?;
    }
    std::fs::create_dir_all(&src)?;
    for c in [&KERNEL, &INTERRUPTS] {
        let file = fetch(sh, &work.join("downloads"), c)?;
        cmd!(sh, "tar -xzf {file} -C {src}")
            .quiet()
            .run()
            .with_context(|| format!("cannot unpack {}", file.display()))?;
        apply_patches(
            sh,
            &src.join(c.dir_name()),
            &patches.join(c.patches),
            c,
            flavour,
        )?;
    }
    if flavour == Flavour::Ferry {
        copy_ferry_abi(root, &src.join("ferry-abi"))?;
    }
    let kdir = src.join(KERNEL.dir_name());
    // The crate pins its own (older) nightly; Ferry builds with its pinned one.
    let _ = std::fs::remove_file(kdir.join("rust-toolchain.toml"));
    eprintln!(
        "ferry-images: building the Hermit kernel {} ({}, {}) with {} (a minute or two, once)",
        KERNEL.version,
        flavour.name(),
        flavour.features(),
        tc.name
    );
    let plus = format!("+{}", tc.name);
    let target_dir = work.join("build");
    let features = flavour.features();
    let manifest = kdir.join("Cargo.toml");
    cmd!(
        sh,
        "cargo {plus} build --quiet --release --manifest-path {manifest} --target x86_64-unknown-none -Zbuild-std=core,alloc -Zbuild-std-features=compiler-builtins-mem --no-default-features --features {features} --target-dir {target_dir}"
    )
    .env(
        "CARGO_ENCODED_RUSTFLAGS",
        if warnings {
            RUSTFLAGS.to_string()
        } else {
            format!("{RUSTFLAGS}\x1f-Awarnings")
        },
    )
    .env("HERMIT_LOG_LEVEL_FILTER", log_level())
    .env_remove("RUSTFLAGS")
    .env_remove("RUSTC")
    .env_remove("RUSTUP_TOOLCHAIN")
    .quiet()
    .run()
    .context("building the Hermit kernel")?;
    let built = target_dir.join("x86_64-unknown-none/release/libhermit.a");
    std::fs::create_dir_all(&lib_dir)?;
    let tmp = lib_dir.join("libhermit.a.tmp");
    std::fs::copy(&built, &tmp).with_context(|| format!("{}", built.display()))?;
    let llvm = toolchain::llvm_bin(sh, tc)?;
    let renamed = archive::rename_symbols(sh, &llvm, &tmp)?;
    let marked = archive::mark_standalone(&tmp)?;
    std::fs::rename(&tmp, &lib)?;
    std::fs::write(&stamp_file, &stamp)?;
    eprintln!(
        "ferry-images: Hermit kernel built in {:.0} s: {} ({renamed} symbols renamed, {marked} objects marked)",
        started.elapsed().as_secs_f64(),
        lib.display()
    );
    Ok(lib_dir)
}

/// Ferry's guest/host contract (`runtime/abi`), which the kernel's
/// `ferry-net` feature uses (its TCP offload helpers), as a crate of its
/// own next to the kernel: the workspace's manifest cannot be used outside
/// the workspace.
fn copy_ferry_abi(root: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to.join("src"))?;
    for f in abi_sources(root)? {
        std::fs::copy(&f, to.join("src").join(file_name(&f)))
            .with_context(|| format!("{}", f.display()))?;
    }
    std::fs::write(
        to.join("Cargo.toml"),
        "[package]\nname = \"ferry-abi\"\nversion = \"0.1.0\"\nedition = \"2024\"\npublish = false\n\n[lib]\npath = \"src/lib.rs\"\n",
    )
    .with_context(|| format!("{}", to.display()))?;
    Ok(())
}

/// The source files of `runtime/abi`, sorted.
fn abi_sources(root: &Path) -> Result<Vec<PathBuf>> {
    let dir = root.join("runtime/abi/src");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .collect();
    files.sort();
    Ok(files)
}

/// The crate's `.crate` file, downloaded from crates.io once and checked
/// against its pinned checksum.
fn fetch(sh: &Shell, dir: &Path, c: &Crate) -> Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let file = dir.join(format!("{}.crate", c.dir_name()));
    if file.is_file() && sha256_file(&file)? == c.sha256 {
        return Ok(file);
    }
    let url = format!(
        "https://static.crates.io/crates/{}/{}.crate",
        c.name,
        c.dir_name()
    );
    eprintln!("ferry-images: fetching {url}");
    let part = file.with_extension("part");
    cmd!(
        sh,
        "curl --fail --silent --show-error --location --retry 3 -o {part} {url}"
    )
    .quiet()
    .run()
    .with_context(|| format!("cannot download {url}"))?;
    let got = sha256_file(&part)?;
    if got != c.sha256 {
        let _ = std::fs::remove_file(&part);
        bail!("{url}: SHA-256 {got}, expected {}: refusing it", c.sha256);
    }
    std::fs::rename(&part, &file)?;
    Ok(file)
}

/// The patch files of a directory, in order (`NNNN-*.patch`).
fn patch_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("{}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "patch"))
        .collect();
    files.sort();
    Ok(files)
}

fn apply_patches(sh: &Shell, src: &Path, dir: &Path, c: &Crate, flavour: Flavour) -> Result<()> {
    for p in patch_files(dir)? {
        if !flavour.takes(c, &file_name(&p)) {
            continue;
        }
        cmd!(sh, "patch --quiet --batch --forward -p1 -d {src} -i {p}")
            .quiet()
            .run()
            .with_context(|| format!("{} does not apply", p.display()))?;
    }
    Ok(())
}

fn sha256_file(p: &Path) -> Result<String> {
    let b = std::fs::read(p).with_context(|| format!("{}", p.display()))?;
    Ok(hex(&Sha256::digest(&b)))
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A digest of everything the library depends on.
fn stamp(root: &Path, patches: &Path, tc: &Toolchain, flavour: Flavour) -> Result<String> {
    let mut h = Sha256::new();
    h.update(format!(
        "recipe {RECIPE}\nflavour {}\nfeatures {}\nrustflags {RUSTFLAGS}\nlog {}\n",
        flavour.name(),
        flavour.features(),
        log_level()
    ));
    h.update(&tc.version);
    if flavour == Flavour::Ferry {
        for f in abi_sources(root)? {
            h.update(file_name(&f));
            h.update(std::fs::read(&f)?);
        }
    }
    for c in [&KERNEL, &INTERRUPTS] {
        h.update(format!("{} {}\n", c.dir_name(), c.sha256));
        let files = patch_files(&patches.join(c.patches))?;
        for p in files {
            let name = file_name(&p);
            if !flavour.takes(c, &name) {
                continue;
            }
            h.update(&name);
            h.update(std::fs::read(&p)?);
        }
    }
    Ok(hex(&h.finalize()))
}
