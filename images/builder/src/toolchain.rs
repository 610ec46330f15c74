//! The pinned nightly that builds Hermit images (std from source needs
//! `-Zbuild-std` and rust-src; the kernel's post-processing needs
//! llvm-tools).

use anyhow::{Context, Result, bail};
use xshell::{Shell, cmd};

/// The pinned nightly: its dist channel and the compiler commit it ships.
pub const CHANNEL: &str = "nightly-2026-05-20";
/// `rustc -vV`'s commit-hash of [`CHANNEL`].
pub const COMMIT: &str = "e50aa6fba4e63ab34c72bf9acfd2c307c1155d1a";
const COMPONENTS: [&str; 2] = ["rust-src", "llvm-tools"];

/// An installed toolchain that is the pinned nightly.
#[derive(Clone, Debug)]
pub struct Toolchain {
    /// Its rustup name (`+NAME`).
    pub name: String,
    /// What its `rustc -vV` says (part of the kernel's stamp).
    pub version: String,
}

/// `rustc +tc ARGS`'s output, with nothing from the environment choosing
/// another compiler.
fn rustc(sh: &Shell, tc: &str, args: &[&str]) -> xshell::Result<String> {
    let plus = format!("+{tc}");
    cmd!(sh, "rustc {plus} {args...}")
        .env("RUSTUP_AUTO_INSTALL", "0")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .quiet()
        .ignore_stderr()
        .read()
}

/// `rustc -vV` of toolchain `tc` if it is installed and is the pinned one.
fn pinned(sh: &Shell, tc: &str) -> Option<String> {
    let out = rustc(sh, tc, &["-vV"]).ok()?;
    out.lines()
        .any(|l| l.strip_prefix("commit-hash: ") == Some(COMMIT))
        .then_some(out)
}

/// The installed toolchain that is the pinned nightly (the dated channel,
/// or a `nightly` that happens to be it), with its components; installs
/// what is missing.
pub fn ensure(sh: &Shell) -> Result<Toolchain> {
    let found = [CHANNEL, "nightly"]
        .into_iter()
        .find_map(|tc| pinned(sh, tc).map(|v| (tc, v)));
    let (name, version) = match found {
        Some((tc, v)) => (tc.to_owned(), v),
        None => {
            eprintln!(
                "ferry-images: installing {CHANNEL} (the nightly that builds Hermit images; once)"
            );
            cmd!(
                sh,
                "rustup toolchain install {CHANNEL} --profile minimal --component rust-src,llvm-tools"
            )
            .run()
            .with_context(|| format!("cannot install {CHANNEL}"))?;
            let v = pinned(sh, CHANNEL)
                .with_context(|| format!("{CHANNEL} is installed but is not commit {COMMIT}"))?;
            (CHANNEL.to_owned(), v)
        }
    };
    let installed = cmd!(sh, "rustup component list --installed --toolchain {name}")
        .quiet()
        .read()
        .with_context(|| format!("cannot list {name}'s components"))?;
    let missing: Vec<&str> = COMPONENTS
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if !missing.is_empty() {
        let list = missing.join(", ");
        eprintln!("ferry-images: adding {list} to {name}");
        cmd!(sh, "rustup component add {missing...} --toolchain {name}")
            .run()
            .with_context(|| format!("cannot add {list} to {name}"))?;
    }
    Ok(Toolchain { name, version })
}

/// Where the toolchain's LLVM tools (llvm-nm, llvm-objcopy) are.
pub fn llvm_bin(sh: &Shell, tc: &Toolchain) -> Result<std::path::PathBuf> {
    let sysroot = rustc(sh, &tc.name, &["--print", "sysroot"]).context("rustc --print sysroot")?;
    let bin = std::path::Path::new(sysroot.trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin");
    if !bin.join("llvm-objcopy").is_file() {
        bail!(
            "{}: no llvm-objcopy (rustup component add llvm-tools --toolchain {})",
            bin.display(),
            tc.name
        );
    }
    Ok(bin)
}
