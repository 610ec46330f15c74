//! Ferry's RustyHermit kernel, linked into a std application.
//!
//! A Hermit application is ordinary std Rust built for
//! `x86_64-unknown-hermit`; std calls the kernel's `sys_*` functions, which
//! this crate brings in (its build script links `libhermit.a`). Depend on
//! it and name it once:
//!
//! ```ignore
//! use ferry_hermit as _;
//! ```
//!
//! `images/build APP` builds such an app (its `Cargo.toml` says
//! `[package.metadata.ferry] kernel = "hermit"`), kernel included, into
//! `images/out/APP`, which `ferry run` boots.

#![no_std]
