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

/// The commit of toolchain `tc`, if it is installed.
fn commit(sh: &Shell, tc: &str) -> Option<String> {
    let tc = format!("+{tc}");
    let out = cmd!(sh, "rustc {tc} -vV")
        .env("RUSTUP_AUTO_INSTALL", "0")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .quiet()
        .ignore_stderr()
        .read()
        .ok()?;
    out.lines()
        .find_map(|l| l.strip_prefix("commit-hash: "))
        .map(str::to_owned)
}

/// The name of an installed toolchain that is the pinned nightly (the
/// dated channel, or a `nightly` that happens to be it), with its
/// components; installs what is missing when `install`.
pub fn ensure(sh: &Shell, install: bool) -> Result<String> {
    let found = [CHANNEL, "nightly"]
        .into_iter()
        .find(|tc| commit(sh, tc).as_deref() == Some(COMMIT));
    let tc = match found {
        Some(tc) => tc.to_owned(),
        None if install => {
            eprintln!(
                "ferry-images: installing {CHANNEL} (the nightly that builds Hermit images; once)"
            );
            cmd!(
                sh,
                "rustup toolchain install {CHANNEL} --profile minimal --component rust-src,llvm-tools"
            )
            .run()
            .with_context(|| format!("cannot install {CHANNEL}"))?;
            CHANNEL.to_owned()
        }
        None => bail!("the pinned nightly {CHANNEL} is not installed (just setup installs it)"),
    };
    let installed = cmd!(sh, "rustup component list --installed --toolchain {tc}")
        .quiet()
        .read()
        .with_context(|| format!("cannot list {tc}'s components"))?;
    let missing: Vec<&str> = COMPONENTS
        .into_iter()
        .filter(|c| !installed.lines().any(|l| l.starts_with(c)))
        .collect();
    if !missing.is_empty() {
        if !install {
            bail!("{tc} lacks {} (just setup adds them)", missing.join(", "));
        }
        let list = missing.join(", ");
        eprintln!("ferry-images: adding {list} to {tc}");
        cmd!(sh, "rustup component add {missing...} --toolchain {tc}")
            .run()
            .with_context(|| format!("cannot add {list} to {tc}"))?;
    }
    Ok(tc)
}

/// Where the toolchain's LLVM tools (llvm-nm, llvm-objcopy) are.
pub fn llvm_bin(sh: &Shell, tc: &str) -> Result<std::path::PathBuf> {
    let plus = format!("+{tc}");
    let sysroot = cmd!(sh, "rustc {plus} --print sysroot")
        .env_remove("RUSTC")
        .env_remove("RUSTUP_TOOLCHAIN")
        .quiet()
        .read()
        .context("rustc --print sysroot")?;
    let bin = std::path::Path::new(sysroot.trim()).join("lib/rustlib/x86_64-unknown-linux-gnu/bin");
    if !bin.join("llvm-objcopy").is_file() {
        bail!(
            "{}: no llvm-objcopy (rustup component add llvm-tools --toolchain {tc})",
            bin.display()
        );
    }
    Ok(bin)
}
