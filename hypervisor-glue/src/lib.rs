//! Ferry's VMM: runs a Ferry (Hermit-ABI) unikernel image on KVM.
//!
//! Layers, bottom up:
//! - [`memory`]: guest RAM (bounds-checked access, VMM-side dirty bitmap);
//! - [`kvm`]: the only module that sets up KVM (VM, memory slots, vCPU state);
//! - [`boot`]: the validating ELF loader and the Hermit boot structures;
//! - [`clock`]: the clock page through which guest time survives pauses and moves;
//! - [`net`]: a VM's network settings, validated;
//! - [`devices`]: what the guest reaches by I/O (the console, PCI, virtio-net on a tap);
//! - [`lockdown`]: least privilege once set up: a jail, capabilities
//!   dropped, a seccomp filter per thread;
//! - [`vcpu`]: the run loop, turning KVM exits into hypercalls or clear
//!   guest faults; [`kick`] gets it out of KVM_RUN;
//!   [`stop`]: SIGINT/SIGTERM/SIGHUP;
//! - [`control`]: typed commands to the vCPU thread and its answers;
//! - [`lifecycle`]: where a VM is in its life on a host, as a pure state
//!   machine; [`id`]: VM and session identities;
//! - [`vm`]: all of it, created from a [`vm::VmConfig`] (or brought in from
//!   a snapshot or a migration) and run to the end;
//! - [`snapshot`]: the VM's saved state and the snapshot file format;
//! - [`api`]: the control socket (JSON at the edge, typed inside);
//! - [`migration`]: live migration over an authenticated, encrypted
//!   channel, source and destination, its bulk copying kept behind running
//!   vCPUs by [`sched`]; [`trace`] times phases.
//!
//! The `ferry` binary (`src/bin/ferry.rs`) is the command line on top.
//!
//! ```no_run
//! use ferry::{devices::console::Console, vm::{Vm, VmConfig}};
//! let config = VmConfig { image: "images/out/hello".into(), memory: 64 << 20, cpus: 1, app_args: vec![], guest_args: vec![], net: None, id: None, generation: 0 };
//! let mut vm = Vm::create(&config, Console::new(Box::new(std::io::stdout()))).unwrap();
//! let end = vm.run(&ferry::control::Mailbox::new()).unwrap();
//! # let _ = end;
//! ```
//!
//! Linux/KVM on x86_64 only.
#![deny(missing_docs)]

pub mod api;
pub mod boot;
pub mod clock;
pub mod control;
pub mod devices;
pub mod failpoint;
pub mod fleet;
pub mod id;
pub mod kick;
pub mod kvm;
pub mod lifecycle;
pub mod lockdown;
pub mod memory;
pub mod migration;
pub mod net;
pub mod sched;
pub mod size;
pub mod snapshot;
pub mod stop;
pub mod teardown;
pub mod trace;
pub mod vcpu;
pub mod vm;
