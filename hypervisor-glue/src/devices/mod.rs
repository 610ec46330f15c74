//! Devices the guest reaches through I/O exits.
//!
//! Each device keeps its live resources (output streams, fds) apart from its
//! saved state: `save()` returns a plain state struct and `restore()` builds
//! the device from one plus live resources; no device has a default no-op.

pub mod console;
