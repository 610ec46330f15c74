//! Stopping a running VM from outside: SIGINT/SIGTERM (Ctrl-C, `kill`).
//!
//! [`install`] blocks those signals in the calling thread (so in every
//! thread it starts later) and starts a thread that waits for them. When
//! one arrives it records it and kicks the vCPU thread out of KVM_RUN with
//! a real-time signal, repeating until the vCPU loop notices (a kick that
//! lands between two KVM_RUN calls is not lost). The vCPU loop calls
//! [`requested`] after every exit. If nothing notices within a second
//! (no VM runs yet), the process ends with status 128 + the signal.

use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::time::Duration;

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

static REQUESTED: AtomicI32 = AtomicI32::new(0);
static SEEN: AtomicBool = AtomicBool::new(false);
/// The vCPU thread (`pthread_t`), once [`install`] ran; 0 before.
static VCPU_THREAD: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Interrupts the vCPU thread's KVM_RUN (if it is in one) so that it looks
/// at pending requests. Harmless at any other time.
pub fn kick_vcpu() {
    let t = VCPU_THREAD.load(Ordering::Acquire);
    if t != 0 {
        // SAFETY: `t` is the pthread_t of the process's vCPU (main) thread,
        // which lives until the process exits; the kick signal has a no-op
        // handler, so it only interrupts a blocking call.
        unsafe { libc::pthread_kill(t as libc::pthread_t, SIGRTMIN()) };
    }
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

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
    let kick = SIGRTMIN();
    register_signal_handler(kick, on_kick)
        .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
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
    // SAFETY: pthread_self has no preconditions.
    let vcpu_thread = unsafe { libc::pthread_self() };
    VCPU_THREAD.store(vcpu_thread as u64, Ordering::Release);
    std::thread::Builder::new()
        .name("ferry-signals".into())
        .spawn(move || {
            let mut sig: libc::c_int = 0;
            // SAFETY: `set` is a valid signal set and `sig` a valid out pointer.
            if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                return;
            }
            REQUESTED.store(sig, Ordering::Release);
            // No vCPU loop to notice within a second (a `ferry receive`
            // still waiting for its VM, say): end the process directly.
            for _ in 0..200 {
                if SEEN.load(Ordering::Acquire) {
                    return;
                }
                kick_vcpu();
                std::thread::sleep(Duration::from_millis(5));
            }
            eprintln!("ferry: stopped by signal {sig}");
            std::process::exit(128 + sig);
        })?;
    Ok(())
}
