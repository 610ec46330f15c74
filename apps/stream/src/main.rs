//! `stream`: the TCPmig paper's traffic source. Every client that connects
//! gets the verifiable byte stream (`ferry_abi::stream`) as fast as TCP
//! takes it, or at a given rate; whatever the client sends is read and
//! dropped (so a client can keep upstream traffic flowing too).
//!
//! Arguments: `port=N` (default 5001), `rate=BYTES_PER_SECOND` (`120M`,
//! `10K`, ...; default: full speed), `bytes=N` (stop after N bytes and
//! close; default: never), `echo=PORT` (also echo TCP on PORT, so that a
//! client can keep verified traffic flowing towards the service),
//! `ballast=SIZE` (hold SIZE bytes of touched memory, like a process image
//! of that size: what a migration has to move).
#![no_std]
#![no_main]

extern crate alloc;

use core::time::Duration;

use ferry_abi::stream::{self, parse_amount};
use ferry_runtime::net::{self, BufferSizes, NetError, TcpListener, TcpStream};
use ferry_runtime::{Env, println};

ferry_runtime::main!(main);

/// Most bytes written into the send buffer per event-loop turn.
const CHUNK: u64 = 64 * 1024;

/// At a set rate, the stream is written in quanta of this much time's
/// worth of bytes: a timer wake-up costs ~150 us on PVM, so trickling the
/// few bytes due every microsecond would keep the vCPU busy writing tiny
/// segments; half a millisecond of rate keeps gaps at the client small.
const QUANTUM: Duration = Duration::from_micros(500);

/// Fewest bytes worth a write at a set rate: one full segment.
const MIN_QUANTUM: u64 = 1448;

fn main(env: &Env) -> i32 {
    let port = match env.arg("port").map(str::parse::<u16>) {
        None => 5001,
        Some(Ok(p)) if p != 0 => p,
        Some(_) => {
            println!("stream: port must be 1 to 65535");
            return 2;
        }
    };
    let rate = match env.arg("rate").map(parse_amount) {
        None => None,
        Some(Some(r)) if r > 0 => Some(r),
        Some(_) => {
            println!("stream: rate wants bytes per second, like 120M");
            return 2;
        }
    };
    let limit = match env.arg("bytes").map(parse_amount) {
        None => None,
        Some(Some(n)) => Some(n),
        Some(None) => {
            println!("stream: bytes wants a size, like 1G");
            return 2;
        }
    };
    let echo_port = match env.arg("echo").map(str::parse::<u16>) {
        None => None,
        Some(Ok(p)) if p != 0 && p != port => Some(p),
        Some(_) => {
            println!("stream: echo wants a port other than the stream's");
            return 2;
        }
    };
    let ballast = match env.arg("ballast").map(parse_amount) {
        None => alloc::vec::Vec::new(),
        Some(Some(n)) => {
            // One word per page makes every page non-zero: migrations must
            // move all of it. (Touching every byte would take minutes on an
            // emulated guest.)
            let mut v = alloc::vec![0u8; n as usize];
            for (i, page) in v.chunks_mut(4096).enumerate() {
                page[0] = (i as u8) | 1;
            }
            println!("stream: ballast of {n} bytes");
            v
        }
        Some(None) => {
            println!("stream: ballast wants a size, like 256M");
            return 2;
        }
    };
    net::run(env, async move {
        let _ballast = &ballast;
        let sizes = BufferSizes {
            rx: 64 * 1024,
            // A native guest sends faster than it wakes for ACKs (~150 us
            // an interrupt): 1 MiB in flight keeps the link busy meanwhile.
            tx: 1024 * 1024,
            backlog: 2,
        };
        if let Some(p) = echo_port {
            let mut echo = TcpListener::bind(
                p,
                BufferSizes {
                    rx: 32 * 1024,
                    tx: 32 * 1024,
                    backlog: 2,
                },
            )?;
            net::spawn(async move {
                loop {
                    let conn = echo.accept().await;
                    net::spawn(echo_serve(conn));
                }
            });
        }
        let mut listener = TcpListener::bind(port, sizes)?;
        println!(
            "stream: listening on port {port}, rate {}, {}",
            rate.map_or_else(
                || alloc::string::String::from("full speed"),
                |r| alloc::format!("{r} B/s")
            ),
            limit.map_or_else(
                || alloc::string::String::from("no limit"),
                |n| alloc::format!("{n} bytes")
            )
        );
        loop {
            let conn = listener.accept().await;
            net::spawn(serve(conn, rate, limit));
        }
        #[allow(unreachable_code)]
        Ok::<i32, NetError>(0)
    })
}

async fn serve(mut conn: TcpStream, rate: Option<u64>, limit: Option<u64>) {
    let start = net::now();
    let mut sent = 0u64;
    let quantum = rate.map_or(0, |r| {
        (u128::from(r) * QUANTUM.as_nanos() / 1_000_000_000)
            .clamp(u128::from(MIN_QUANTUM), u128::from(CHUNK)) as u64
    });
    let mut sink = [0u8; 2048];
    loop {
        // Drain upstream bytes (counted nowhere: the client verifies its
        // own echo path separately).
        while let Ok(Some(_)) = try_read(&mut conn, &mut sink).await {}
        let mut allowed = limit.map_or(u64::MAX, |l| l - sent);
        if let Some(r) = rate {
            let elapsed = net::now().duration_since(start);
            let due = (elapsed.as_nanos() * u128::from(r) / 1_000_000_000) as u64;
            let want = quantum.min(allowed);
            if due < sent + want {
                // Ahead of the rate: sleep until the next quantum is due.
                let at_ns = u128::from(sent + want) * 1_000_000_000 / u128::from(r);
                let wait = at_ns.saturating_sub(elapsed.as_nanos());
                net::sleep(Duration::from_nanos(wait.max(1) as u64)).await;
                continue;
            }
            allowed = allowed.min(due - sent);
        }
        if allowed == 0 {
            break;
        }
        // At most CHUNK per turn, so that the stack sends while the buffer
        // fills (and an emulated vCPU is not busy filling for tens of ms).
        let wrote = conn
            .write_with(1, |space| {
                let k = (space.len() as u64).min(allowed).min(CHUNK) as usize;
                stream::fill(&mut space[..k], sent);
                k
            })
            .await;
        match wrote {
            Ok(n) => sent += n as u64,
            Err(_) => return,
        }
        // Let the stack transmit before the next chunk.
        net::yield_now().await;
    }
    conn.shutdown();
    // Wait for the client to close so the last bytes are delivered.
    while let Ok(n) = conn.read(&mut sink).await {
        if n == 0 {
            break;
        }
    }
}

async fn echo_serve(mut conn: TcpStream) {
    let mut buf = [0u8; 2048];
    while let Ok(n @ 1..) = conn.read(&mut buf).await {
        if conn.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
}

/// Reads what is there without waiting; Ok(None) if nothing is.
async fn try_read(conn: &mut TcpStream, buf: &mut [u8]) -> Result<Option<usize>, NetError> {
    if conn.recv_ready() {
        conn.read(buf).await.map(|n| (n > 0).then_some(n))
    } else {
        Ok(None)
    }
}
