//! Stopping a running VM from outside: SIGINT/SIGTERM/SIGHUP (Ctrl-C,
//! `kill`, a closed terminal).
//!
//! [`install`] blocks those signals in the calling thread (so in every
//! thread it starts later) and starts a thread that waits for them. When
//! one arrives it records it and kicks the VM's vCPU (see
//! [`crate::kick::Kick`]; [`watch`] says which), whose loop calls
//! [`requested`] after every exit. If no vCPU loop notices within a second
//! (no VM runs yet), the process ends with status 128 + the signal.
//!
//! A process that must outlive its terminal (a VM the cluster tooling
//! started in the background) runs in a session of its own and never gets
//! the terminal's SIGHUP; see `ferry run --detach`.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use crate::kick::Kick;

static REQUESTED: AtomicI32 = AtomicI32::new(0);
static SEEN: AtomicBool = AtomicBool::new(false);
static WATCHED: OnceLock<Mutex<Option<Kick>>> = OnceLock::new();

fn watched() -> &'static Mutex<Option<Kick>> {
    WATCHED.get_or_init(|| Mutex::new(None))
}

/// From now on a stop signal kicks this vCPU.
pub fn watch(kick: &Kick) {
    *watched().lock().expect("stop lock") = Some(kick.clone());
    if REQUESTED.load(Ordering::Acquire) != 0 {
        kick.request();
    }
}

/// The signal that asked the VM to stop, if one did.
pub fn requested() -> Option<i32> {
    match REQUESTED.load(Ordering::Acquire) {
        0 => None,
        s => {
            SEEN.store(true, Ordering::Release);
            Some(s)
        }
    }
}

/// Installs the stop path for the calling thread, which must be the one
/// that runs the vCPU, before it starts any other thread.
pub fn install() -> std::io::Result<()> {
    // SAFETY: plain sigset manipulation on a local set; pthread_sigmask
    // changes only this thread's mask.
    let set = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    };
    crate::lockdown::spawn(crate::lockdown::Role::Signals, "ferry-signals", move || {
        let mut sig: libc::c_int = 0;
        // SAFETY: `set` is a valid signal set and `sig` a valid out pointer.
        if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
            return;
        }
        REQUESTED.store(sig, Ordering::Release);
        if let Some(k) = watched().lock().expect("stop lock").as_ref() {
            k.request();
        }
        // No vCPU loop to notice within a second (a `ferry receive`
        // still waiting for its VM, say): end the process directly.
        for _ in 0..100 {
            std::thread::sleep(Duration::from_millis(10));
            if SEEN.load(Ordering::Acquire) {
                return;
            }
        }
        eprintln!("ferry: stopped by signal {sig}");
        std::process::exit(128 + sig);
    })?;
    Ok(())
}
