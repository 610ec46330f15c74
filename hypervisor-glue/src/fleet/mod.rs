//! The fleet's scheduler: which VM moves to which host, decided by a pure
//! function of hosts, VMs and loads (no I/O, no clock), so that it can be
//! tested on fleets far larger than any machine here (`plan` has the
//! functions, `tests` simulated fleets of 1,000 hosts and 50,000 VMs;
//! `tests/src/bin/fleet-sim.rs` times them).
//!
//! Memory is the hard limit: a VM goes only where its memory fits. Load
//! (cores a VM keeps busy) is the soft one: a host is not filled past
//! [`Policy::max_load`] of its cores by a move. Plans come in waves: the
//! moves of one wave run at once, and no host takes part in more than
//! [`Policy::per_host`] of them (each host has one migration link).
//!
//! [`store`] keeps the fleet's records in etcd (hosts under leases, VMs
//! with owner and generation, changed only by transactions that fence
//! stale writers); [`show`] renders them for `ferry fleet ls`.

pub mod agent;
pub mod ops;
pub mod plan;
pub mod show;
pub mod store;

pub use plan::{Fleet, Host, Move, Plan, PlanError, Policy, Vm};
