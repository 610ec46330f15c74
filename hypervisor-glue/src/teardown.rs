//! Ending a VM without making the caller wait for the kernel.
//!
//! Closing a KVM VM's fd on this host (PVM) sleeps 7-10 ms in the kernel
//! (measured with strace: `close` of the VM fd), more than a small VM's
//! whole boot. [`defer`] hands the last references to the VM's kernel
//! objects and guest memory to a helper process: this process can exit at
//! once, and the helper, which the kernel kills when its parent dies, does
//! the slow closing afterwards. Whoever waits for `ferry` gets the guest's
//! status without waiting for the teardown.

/// Forks a helper that holds this process's KVM fds and memory mappings
/// until this process has ended, then ends itself (releasing them). Call
/// last, when nothing is left to do but exit, after closing what others
/// may want at once (taps, sockets). Best effort: if the fork fails, the
/// teardown happens in this process, as usual.
pub fn defer() {
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() };
    // SAFETY: fork in a process with other threads: the child runs only
    // async-signal-safe calls (close, prctl, getppid, pause, _exit) and
    // touches no memory the other threads may have left inconsistent.
    let pid = unsafe { libc::fork() };
    if pid != 0 {
        return;
    }
    // SAFETY: as above; in the child: let go of the standard streams (a
    // caller reading our output must see it end when the parent ends), ask
    // for SIGKILL when the parent dies, and wait for it.
    unsafe {
        libc::close(0);
        libc::close(1);
        libc::close(2);
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        if libc::getppid() != parent {
            libc::_exit(0);
        }
        loop {
            libc::pause();
        }
    }
}
