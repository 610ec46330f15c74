//! The apps and how each kind is built.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};
use serde::Deserialize;
use xshell::{Shell, cmd};

/// Which kernel an app runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Kind {
    /// Ferry's own `no_std` runtime.
    Ferry,
    /// RustyHermit: std Rust.
    Hermit,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Ferry => "ferry",
            Kind::Hermit => "hermit",
        }
    }
}

/// An app crate.
#[derive(Debug)]
pub struct App {
    /// Its directory's name (what `build` takes).
    pub name: String,
    /// Its package's name (what cargo builds, and the binary's name).
    pub package: String,
    pub dir: PathBuf,
    pub kind: Kind,
}

#[derive(Deserialize)]
struct Manifest {
    package: Package,
}

#[derive(Deserialize)]
struct Package {
    name: String,
    #[serde(default)]
    metadata: Option<Metadata>,
}

#[derive(Deserialize)]
struct Metadata {
    #[serde(default)]
    ferry: Option<FerryMeta>,
}

#[derive(Deserialize)]
struct FerryMeta {
    #[serde(default)]
    kernel: Option<String>,
}

/// Where apps live, relative to the workspace.
const PLACES: [&str; 2] = ["apps", "tests/guests"];

fn load(dir: &Path) -> Result<App> {
    let path = dir.join("Cargo.toml");
    let text = std::fs::read_to_string(&path).with_context(|| format!("{}", path.display()))?;
    let m: Manifest = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
    let kernel = m
        .package
        .metadata
        .and_then(|m| m.ferry)
        .and_then(|f| f.kernel);
    let kind = match kernel.as_deref() {
        None | Some("ferry") => Kind::Ferry,
        Some("hermit") => Kind::Hermit,
        Some(other) => bail!(
            "{}: [package.metadata.ferry] kernel = {other:?}: it must be \"ferry\" or \"hermit\"",
            path.display()
        ),
    };
    Ok(App {
        name: dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
        package: m.package.name,
        dir: dir.to_path_buf(),
        kind,
    })
}

/// Every app, sorted by place then name.
pub fn all(root: &Path) -> Result<Vec<App>> {
    let mut apps = Vec::new();
    for place in PLACES {
        let mut dirs: Vec<PathBuf> = std::fs::read_dir(root.join(place))
            .with_context(|| format!("{place}/"))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|d| d.join("Cargo.toml").is_file())
            .collect();
        dirs.sort();
        for d in dirs {
            apps.push(load(&d)?);
        }
    }
    Ok(apps)
}

/// The app in `apps/NAME` or `tests/guests/NAME`.
pub fn find(root: &Path, name: &str) -> Result<App> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if valid {
        for place in PLACES {
            let dir = root.join(place).join(name);
            if dir.join("Cargo.toml").is_file() {
                return load(&dir);
            }
        }
    }
    let known: Vec<String> = all(root)?.into_iter().map(|a| a.name).collect();
    bail!("no app named {name:?} (apps: {})", known.join(" "))
}

/// Copies a built binary to `images/out/NAME` (through a temporary name,
/// so a reader never sees half an image).
fn install(root: &Path, built: &Path, name: &str) -> Result<PathBuf> {
    let out = root.join("images/out");
    std::fs::create_dir_all(&out).context("images/out")?;
    let tmp = out.join(format!(".{name}.tmp"));
    let image = out.join(name);
    std::fs::copy(built, &tmp)
        .with_context(|| format!("cannot copy {} to {}", built.display(), tmp.display()))?;
    std::fs::rename(&tmp, &image).with_context(|| format!("{}", image.display()))?;
    Ok(image)
}

/// A Ferry runtime app: `no_std`, `x86_64-unknown-none`, profile `guest`.
pub fn build_ferry(sh: &Shell, root: &Path, app: &App) -> Result<PathBuf> {
    let p = &app.package;
    cmd!(
        sh,
        "cargo build --quiet --profile guest --target x86_64-unknown-none -p {p}"
    )
    .quiet()
    .run()
    .with_context(|| format!("building {}", app.name))?;
    install(
        root,
        &root.join("target/x86_64-unknown-none/guest").join(p),
        &app.name,
    )
}

/// A Hermit app: std for `x86_64-unknown-hermit` (std built from source
/// with the pinned nightly), linked with the kernel in `lib`.
pub fn build_hermit(
    sh: &Shell,
    root: &Path,
    app: &App,
    toolchain: &crate::toolchain::Toolchain,
    lib: &Path,
    image: &str,
) -> Result<PathBuf> {
    let p = &app.package;
    let tc = format!("+{}", toolchain.name);
    eprintln!(
        "ferry-images: building {} (std for x86_64-unknown-hermit)",
        app.name
    );
    cmd!(
        sh,
        "cargo {tc} build --quiet -Zbuild-std=std,panic_abort -Zbuild-std-features=compiler-builtins-mem --target x86_64-unknown-hermit --profile hermit -p {p}"
    )
    .env("FERRY_HERMIT_LIB_DIR", lib)
    .env_remove("RUSTC")
    .env_remove("RUSTUP_TOOLCHAIN")
    .env_remove("RUSTFLAGS")
    .env_remove("CARGO_ENCODED_RUSTFLAGS")
    .quiet()
    .run()
    .with_context(|| format!("building {}", app.name))?;
    install(
        root,
        &root.join("target/x86_64-unknown-hermit/hermit").join(p),
        image,
    )
}
