//! Getting a vCPU out of KVM_RUN from another thread, without losing the
//! request: a [`Kick`] marks a request pending and signals the vCPU
//! thread, whose signal handler sets `immediate_exit` in the vCPU's
//! `kvm_run`. A kick that lands while the vCPU runs interrupts KVM_RUN; one
//! that lands between the run loop's check of [`Kick::pending`] and the
//! next KVM_RUN makes that KVM_RUN return at once. None is lost, and none
//! needs repeating.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use vmm_sys_util::signal::{SIGRTMIN, register_signal_handler};

thread_local! {
    /// The running vCPU's `kvm_run.immediate_exit`, for the kick handler.
    /// Const-initialized and without a destructor, so reading it in a
    /// signal handler touches no lazy initialization.
    static IMMEDIATE_EXIT: Cell<*mut u8> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let p = IMMEDIATE_EXIT.with(Cell::get);
    if !p.is_null() {
        // SAFETY: `p` points into the vCPU's kvm_run mapping, registered by
        // `Kick::arm` on this very thread and cleared (when `Armed` drops)
        // before that mapping can go away; a byte store is
        // async-signal-safe.
        unsafe { std::ptr::write_volatile(p, 1) };
    }
}

/// The signal a kick sends.
fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the kick handler (once per process).
fn install_kick_handler() -> std::io::Result<()> {
    static DONE: std::sync::OnceLock<Result<(), i32>> = std::sync::OnceLock::new();
    DONE.get_or_init(|| register_signal_handler(kick_signal(), on_kick).map_err(|e| e.errno()))
        .map_err(std::io::Error::from_raw_os_error)
}

/// Gets a vCPU thread out of KVM_RUN to look at a request (see the module
/// doc). Cheap to clone; every clone kicks the same vCPU.
#[derive(Clone, Debug, Default)]
pub struct Kick {
    inner: Arc<KickInner>,
}

#[derive(Debug, Default)]
struct KickInner {
    pending: AtomicBool,
    /// The vCPU thread while it is in [`Vcpu::run`].
    thread: Mutex<Option<libc::pthread_t>>,
    /// Its kernel thread id (0 before it first ran).
    tid: AtomicI32,
}

impl Kick {
    /// A kick for a vCPU that does not run yet.
    pub fn new() -> Kick {
        Kick::default()
    }

    /// Marks a request pending and gets the vCPU out of KVM_RUN.
    pub fn request(&self) {
        self.inner.pending.store(true, Ordering::SeqCst);
        let thread = self.inner.thread.lock().expect("kick lock");
        if let Some(t) = *thread {
            // SAFETY: `t` is the vCPU thread, which is between `arm` and the
            // drop of its `Armed` (which clears this under the same lock);
            // the kick signal's handler only sets `immediate_exit`.
            unsafe { libc::pthread_kill(t, kick_signal()) };
        }
    }

    /// Whether a request is pending.
    pub fn pending(&self) -> bool {
        self.inner.pending.load(Ordering::SeqCst)
    }

    /// The kernel thread id of the vCPU thread, once it has run.
    pub fn vcpu_tid(&self) -> Option<libc::pid_t> {
        let t = self.inner.tid.load(Ordering::Acquire);
        (t != 0).then_some(t)
    }

    /// Clears the pending mark (the requests are being served).
    pub fn clear(&self) {
        self.inner.pending.store(false, Ordering::SeqCst);
    }

    fn bind(&self, t: Option<libc::pthread_t>) {
        *self.inner.thread.lock().expect("kick lock") = t;
    }

    /// For the vCPU thread, while it runs the vCPU whose
    /// `kvm_run.immediate_exit` is at `immediate_exit`: from now until the
    /// returned guard drops, kicks reach it.
    pub fn arm(&self, immediate_exit: *mut u8) -> std::io::Result<Armed<'_>> {
        install_kick_handler()?;
        IMMEDIATE_EXIT.with(|c| c.set(immediate_exit));
        // SAFETY: pthread_self and gettid have no preconditions.
        self.bind(Some(unsafe { libc::pthread_self() }));
        // SAFETY: as above.
        self.inner
            .tid
            .store(unsafe { libc::gettid() }, Ordering::Release);
        Ok(Armed(self))
    }
}

/// While alive, kicks reach the vCPU thread that armed it.
#[derive(Debug)]
pub struct Armed<'a>(&'a Kick);

impl Drop for Armed<'_> {
    fn drop(&mut self) {
        self.0.bind(None);
        IMMEDIATE_EXIT.with(|c| c.set(std::ptr::null_mut()));
    }
}
