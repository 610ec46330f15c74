//! Links the kernel into a Hermit application. `ferry-images` builds the
//! kernel (hermit-kernel 0.11.0 with Ferry's patches) and says where it is
//! in `FERRY_HERMIT_LIB_DIR`; for any other target this does nothing, so
//! the workspace still checks and tests on the host.

fn main() {
    println!("cargo::rerun-if-env-changed=FERRY_HERMIT_LIB_DIR");
    if std::env::var("CARGO_CFG_TARGET_OS").as_deref() != Ok("hermit") {
        return;
    }
    let Some(dir) = std::env::var_os("FERRY_HERMIT_LIB_DIR") else {
        panic!(
            "FERRY_HERMIT_LIB_DIR is not set: build Hermit apps with `images/build APP` (ferry-images), which builds the kernel and sets it"
        );
    };
    let dir = std::path::PathBuf::from(dir);
    let lib = dir.join("libhermit.a");
    assert!(
        lib.is_file(),
        "{}: no kernel there (ferry-images kernel builds it)",
        lib.display()
    );
    println!("cargo::rerun-if-changed={}", lib.display());
    println!("cargo::rustc-link-search=native={}", dir.display());
    println!("cargo::rustc-link-lib=static=hermit");
}
