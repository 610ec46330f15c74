//! `ferry-images`: builds Ferry's guest images.
//!
//! Two kinds of service live under `apps/` (and test guests under
//! `tests/guests/`):
//!
//! - **Ferry runtime** services (the default): `no_std` Rust on Ferry's own
//!   runtime, built for `x86_64-unknown-none` with the `guest` profile.
//! - **Hermit** services (`[package.metadata.ferry] kernel = "hermit"` in
//!   the app's `Cargo.toml`): ordinary std Rust for
//!   `x86_64-unknown-hermit`, linked with RustyHermit's kernel. The kernel
//!   is hermit-kernel 0.11.0 from crates.io with Ferry's patch series
//!   (`images/hermit/`), built once with a pinned nightly and reused until
//!   its inputs change.
//!
//! Every image ends up as `images/out/NAME`, whose path is printed.

mod app;
mod archive;
mod hermit;
mod toolchain;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use xshell::Shell;

use app::Kind;

/// Builds Ferry's guest images into images/out/.
#[derive(Parser)]
#[command(name = "ferry-images", version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build the images of APPs (crates under apps/ or tests/guests/) into
    /// images/out/, printing each image's path. A Hermit app builds the
    /// kernel first if it is not built yet.
    Build {
        /// The apps, by directory name (`ferry-images list` shows them).
        #[arg(required = true)]
        apps: Vec<String>,
        /// For Hermit apps: link Ferry's kernel, or the stock one (only
        /// patched to compile; it cannot boot on a PVM host), whose image
        /// is images/out/APP.stock.
        #[arg(long, value_enum, default_value = "ferry")]
        kernel: hermit::Flavour,
    },
    /// List the apps and which kernel each runs on.
    List {
        /// Only apps of this kind.
        #[arg(long, value_enum)]
        kind: Option<Kind>,
        /// Print package names only, one per line (for scripts).
        #[arg(long)]
        names: bool,
    },
    /// Fetch, patch and build the Hermit kernel (libhermit.a) unless it is
    /// up to date; print the directory that holds it.
    Kernel {
        /// Which kernel.
        #[arg(long, value_enum, default_value = "ferry")]
        flavour: hermit::Flavour,
        /// Rebuild even if nothing changed.
        #[arg(long)]
        force: bool,
        /// Show the compiler's warnings (hidden by default: most are the
        /// upstream kernel's).
        #[arg(long)]
        warnings: bool,
    },
    /// Make sure the pinned nightly with rust-src and llvm-tools is
    /// installed (installing what is missing); print its name.
    Toolchain,
}

fn root() -> PathBuf {
    // images/builder -> the workspace.
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("the builder lives two levels under the workspace")
        .to_path_buf()
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ferry-images: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<()> {
    let root = root();
    let sh = Shell::new().context("cannot start a shell")?;
    sh.change_dir(&root);
    match cli.command {
        Command::Build { apps, kernel } => {
            let apps = apps
                .iter()
                .map(|a| app::find(&root, a))
                .collect::<Result<Vec<_>>>()?;
            // The toolchain and the kernel, once for all the Hermit apps.
            let hermit = if apps.iter().any(|a| a.kind == Kind::Hermit) {
                let tc = toolchain::ensure(&sh)?;
                let lib = hermit::kernel(&sh, &root, &tc, kernel, false, false)?;
                Some((tc, lib))
            } else {
                None
            };
            for a in &apps {
                let image = match (a.kind, &hermit) {
                    (Kind::Hermit, Some((tc, lib))) => {
                        let name = match kernel {
                            hermit::Flavour::Ferry => a.name.clone(),
                            hermit::Flavour::Stock => format!("{}.stock", a.name),
                        };
                        app::build_hermit(&sh, &root, a, tc, lib, &name)?
                    }
                    _ => app::build_ferry(&sh, &root, a)?,
                };
                println!("{}", image.display());
            }
        }
        Command::List { kind, names } => {
            for a in app::all(&root)? {
                if kind.is_some_and(|k| k != a.kind) {
                    continue;
                }
                if names {
                    println!("{}", a.package);
                } else {
                    println!("{:<16} {:<7} {}", a.name, a.kind.name(), a.dir.display());
                }
            }
        }
        Command::Kernel {
            flavour,
            force,
            warnings,
        } => {
            let tc = toolchain::ensure(&sh)?;
            let lib = hermit::kernel(&sh, &root, &tc, flavour, force || warnings, warnings)?;
            println!("{}", lib.display());
        }
        Command::Toolchain => println!("{}", toolchain::ensure(&sh)?.name),
    }
    Ok(())
}
