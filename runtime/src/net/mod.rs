//! Networking for services: the card, smoltcp, and a small async API.
//!
//! A service is a handful of `async` functions over [`TcpListener`] and
//! [`TcpStream`], started with [`run`]:
//!
//! ```ignore
//! fn main(env: &Env) -> i32 {
//!     net::run(env, async {
//!         let mut listener = TcpListener::bind(7, Default::default())?;
//!         loop {
//!             let mut conn = listener.accept().await;
//!             net::spawn(async move {
//!                 let mut buf = [0u8; 4096];
//!                 while let Ok(n @ 1..) = conn.read(&mut buf).await {
//!                     if conn.write_all(&buf[..n]).await.is_err() { break }
//!                 }
//!             });
//!         }
//!     })
//! }
//! ```
//!
//! The executor is a poll loop, one turn at a time: read the clock once
//! (`rdtsc` traps), let smoltcp process frames, poll every task, publish
//! what was sent. When a turn does nothing, the vCPU halts until the card
//! interrupts or smoltcp's next timer is due; interrupts are asked for only
//! then, so a busy guest takes none.
//!
//! Everything here - sockets, buffers, the card's rings - lives in guest
//! memory, so a snapshot of the VM carries every connection with it.

mod device;
mod stack;
mod tcp;
mod udp;

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};
use core::future::Future;
use core::pin::Pin;
use core::task::{Context, Poll, Waker};

pub use smoltcp::wire::{IpEndpoint, Ipv4Address};
pub use stack::{Config, NetError};
pub use tcp::{BufferSizes, TcpListener, TcpStream};
pub use udp::UdpSocket;

use crate::Env;
use crate::time::Instant;

/// A value only the one vCPU touches, outside interrupt handlers.
struct Local<T>(RefCell<T>);

// SAFETY: the runtime runs on one vCPU, and interrupt handlers never touch
// these values (they only set atomic flags), so there is no concurrent
// access; RefCell catches re-entrant borrows.
unsafe impl<T> Sync for Local<T> {}

type Task = Pin<Box<dyn Future<Output = ()>>>;

static TASKS: Local<Vec<Task>> = Local(RefCell::new(Vec::new()));
static SPAWNED: Local<Vec<Task>> = Local(RefCell::new(Vec::new()));
/// Whether a task did something this turn (read, wrote, accepted, woke).
static PROGRESS: Local<Cell<bool>> = Local(RefCell::new(Cell::new(false)));
/// The earliest time a task asked to be polled again ([`sleep_until`]).
static TIMER: Local<Cell<Option<u64>>> = Local(RefCell::new(Cell::new(None)));
/// Guest time at the start of this turn.
static NOW: Local<Cell<u64>> = Local(RefCell::new(Cell::new(0)));

pub(crate) fn progress() {
    PROGRESS.0.borrow().set(true);
}

/// Guest time at the start of the current turn (no `rdtsc`).
pub fn now() -> Instant {
    Instant::from_nanos(NOW.0.borrow().get())
}

/// Starts a task; it runs alongside the others until it finishes.
pub fn spawn(task: impl Future<Output = ()> + 'static) {
    SPAWNED.0.borrow_mut().push(Box::pin(task));
}

/// Completes once guest time reaches `deadline`.
pub async fn sleep_until(deadline: Instant) {
    core::future::poll_fn(|_| {
        if now() >= deadline {
            progress();
            return Poll::Ready(());
        }
        let t = TIMER.0.borrow();
        let d = deadline.as_nanos();
        t.set(Some(t.get().map_or(d, |x| x.min(d))));
        Poll::Pending
    })
    .await
}

/// Completes after `d`.
pub async fn sleep(d: core::time::Duration) {
    sleep_until(now().saturating_add(d)).await
}

/// Yields to the other tasks once.
pub async fn yield_now() {
    let mut yielded = false;
    core::future::poll_fn(|_| {
        if yielded {
            return Poll::Ready(());
        }
        yielded = true;
        progress();
        Poll::Pending
    })
    .await
}

/// Brings the network up from the runtime arguments (`net.ip=ADDR/PREFIX`,
/// `net.gw=ADDR`, as the VMM passes them), then runs `main` and every task
/// it spawns until `main` returns its exit status. Prints one line and
/// returns 1 if the network cannot come up.
pub fn run<F>(env: &Env, main: F) -> i32
where
    F: Future<Output = Result<i32, NetError>>,
{
    let config = match Config::from_args(env.runtime_args()) {
        Ok(c) => c,
        Err(e) => {
            crate::println!("net: {e}");
            return 1;
        }
    };
    if let Err(e) = stack::init(&config) {
        crate::println!("net: {e}");
        return 1;
    }
    match block_on(main) {
        Ok(code) => code,
        Err(e) => {
            crate::println!("net: {e}");
            1
        }
    }
}

/// The network settings in use.
pub fn config() -> Option<Config> {
    stack::config()
}

fn block_on<T>(main: impl Future<Output = T>) -> T {
    let mut main = core::pin::pin!(main);
    let mut cx = Context::from_waker(Waker::noop());
    loop {
        let now = crate::time::now();
        NOW.0.borrow().set(now.as_nanos());
        let changed = stack::poll(now);
        PROGRESS.0.borrow().set(false);
        TIMER.0.borrow().set(None);
        if let Poll::Ready(v) = main.as_mut().poll(&mut cx) {
            stack::poll(now);
            return v;
        }
        let mut tasks = core::mem::take(&mut *TASKS.0.borrow_mut());
        tasks.retain_mut(|t| t.as_mut().poll(&mut cx).is_pending());
        tasks.append(&mut SPAWNED.0.borrow_mut());
        *TASKS.0.borrow_mut() = tasks;
        if PROGRESS.0.borrow().get() || changed {
            continue;
        }
        let timer = TIMER.0.borrow().get().map(Instant::from_nanos);
        stack::idle(now, timer);
    }
}
