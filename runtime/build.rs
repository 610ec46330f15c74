//! Puts the guest linker script where every image that links the runtime
//! finds it: apps pass `-Tferry-guest.ld` (set for the guest target in
//! `.cargo/config.toml`), and the link search path set here propagates to them.
use std::{env, fs, path::PathBuf};

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    fs::copy("ferry-guest.ld", out.join("ferry-guest.ld")).expect("copy linker script");
    println!("cargo:rustc-link-search={}", out.display());
    println!("cargo:rerun-if-changed=ferry-guest.ld");
}
