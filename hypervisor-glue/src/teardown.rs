//! Ending a VM without making the caller wait for the kernel.
//!
//! Closing a KVM VM's fd on this host (PVM) sleeps 7-10 ms in the kernel
//! (measured with strace: `close` of the VM fd), more than a small VM's
//! whole boot, and unmapping guest memory that KVM maps costs more. [`defer`]
//! hands the last references to the VM's kernel objects and guest memory
//! to a helper process: this process can exit at once, and the helper,
//! which the kernel kills when its parent dies, does the slow closing
//! afterwards. Whoever waits for `ferry` gets the guest's status without
//! waiting for the teardown.
//!
//! The helper shares this process's memory (`CLONE_VM`) rather than
//! copying it as `fork` would: a fork write-protects every guest page
//! that is mapped, which KVM must follow in its own page tables (~0.3 ms
//! for a small VM here), only for the copy to be thrown away. Sharing, it
//! runs on a stack of its own, with every signal blocked, and makes raw
//! system calls only: it touches no memory but that stack, not even
//! `errno`, which it would share with this process's main thread.

/// The helper's stack: it calls no function that needs more than a page.
const STACK: usize = 16 << 10;

/// Starts a helper that holds this process's KVM fds and memory until
/// this process has ended, then ends itself (releasing them); whether it
/// started. Call last, when nothing is left to do but exit, after closing
/// what others may want at once (taps, sockets); then leave the VM's
/// memory and fds alone (let them go with the process). If it did not
/// start, the teardown happens in this process, as usual.
pub fn defer() -> bool {
    // SAFETY: a new private anonymous mapping, used only as the helper's
    // stack (and left for the process's exit to unmap).
    let stack = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            STACK,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_STACK,
            -1,
            0,
        )
    };
    if stack == libc::MAP_FAILED {
        return false;
    }
    // SAFETY: getpid has no preconditions.
    let parent = unsafe { libc::getpid() } as usize;
    // SAFETY: sigset_t is plain data, filled by sigfillset; the mask is
    // this thread's own and restored below. The helper starts with every
    // signal blocked: it never runs a handler of this process's (on
    // shared memory); SIGKILL, which cannot be blocked, ends it.
    let (mut all, mut old) = unsafe {
        (
            std::mem::zeroed::<libc::sigset_t>(),
            std::mem::zeroed::<libc::sigset_t>(),
        )
    };
    // SAFETY: as above.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: the helper runs `helper` on the top of its own stack (which
    // nothing else uses), with its own copy of the fd table, sharing this
    // memory; `helper` makes only raw system calls (see there).
    let pid = unsafe {
        libc::clone(
            helper,
            stack.cast::<u8>().add(STACK).cast(),
            libc::CLONE_VM | libc::SIGCHLD,
            parent as *mut libc::c_void,
        )
    };
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if pid <= 0 {
        // SAFETY: the mapping made above, which nothing used.
        unsafe { libc::munmap(stack, STACK) };
        return false;
    }
    true
}

/// The helper: lets go of the standard streams (a caller reading our
/// output must see it end when the parent ends), asks for SIGKILL when the
/// parent dies, and waits for it.
extern "C" fn helper(parent: *mut libc::c_void) -> libc::c_int {
    // SAFETY: system calls on this process's own fds and state, made
    // without libc (no errno, no thread-local state).
    unsafe {
        for fd in 0..3 {
            raw(libc::SYS_close, fd, 0);
        }
        raw(
            libc::SYS_prctl,
            libc::PR_SET_PDEATHSIG as usize,
            libc::SIGKILL as usize,
        );
        if raw(libc::SYS_getppid, 0, 0) != parent as usize {
            raw(libc::SYS_exit, 0, 0);
        }
        loop {
            // Every signal is blocked: only SIGKILL ends this.
            raw(libc::SYS_pause, 0, 0);
        }
    }
}

/// A system call with up to two arguments, without libc (whose wrappers
/// write `errno`). Returns the kernel's raw result.
///
/// # Safety
/// The call's own: the caller vouches for what it does.
unsafe fn raw(nr: libc::c_long, a: usize, b: usize) -> usize {
    let r: usize;
    // SAFETY: the `syscall` instruction with the x86_64 Linux convention:
    // number in rax, arguments in rdi and rsi, result in rax; the kernel
    // clobbers rcx and r11 and nothing else, and no stack is used.
    unsafe {
        std::arch::asm!(
            "syscall",
            inlateout("rax") nr as usize => r,
            in("rdi") a,
            in("rsi") b,
            lateout("rcx") _,
            lateout("r11") _,
            options(nostack),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The helper waits while the thread that started it lives, and is
    /// killed when it ends.
    #[test]
    fn the_helper_lives_as_long_as_the_thread_that_started_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        let starter = std::thread::spawn(move || {
            assert!(defer());
            // SAFETY: gettid has no preconditions.
            let tid = unsafe { libc::gettid() };
            let kids = std::fs::read_to_string(format!("/proc/self/task/{tid}/children")).unwrap();
            let pid: i32 = kids.split_whitespace().next().unwrap().parse().unwrap();
            tx.send(pid).unwrap();
            // Still there after a while: it waits.
            std::thread::sleep(std::time::Duration::from_millis(50));
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
            assert!(stat.contains(") S "), "{stat}");
        });
        let pid = rx.recv().unwrap();
        starter.join().unwrap();
        // It ends (SIGKILL from the kernel) within a few seconds at most.
        let mut status = 0;
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let r = loop {
            // SAFETY: looks at our own child; `status` is a valid out pointer.
            let r = unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) };
            if r != 0 || std::time::Instant::now() > until {
                break r;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(r, pid, "the helper still waits after its starter ended");
        assert!(libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGKILL);
    }
}
