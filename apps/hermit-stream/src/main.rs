//! `hermit-stream`: the `stream` app's protocol in ordinary std Rust, on
//! RustyHermit. Every client that connects gets the verifiable byte
//! stream (`ferry_abi::stream`) as fast as TCP takes it, or at a given
//! rate; whatever the client sends is read and dropped. `stream-client`
//! checks every byte.
//!
//! Arguments, as the `stream` app's: `port=N` (default 5001),
//! `rate=BYTES_PER_SECOND` (`120M`, `10K`, ...; default: full speed),
//! `bytes=N` (stop after N bytes and close), `echo=PORT` (also echo TCP on
//! PORT), `ballast=SIZE` (hold SIZE bytes of touched memory, what a
//! migration has to move).

use ferry_hermit as _;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use ferry_abi::stream::{self, parse_amount};

/// Most bytes written per call.
const CHUNK: u64 = 64 * 1024;
/// At a set rate, the stream goes out in quanta of this much time's worth.
const QUANTUM: Duration = Duration::from_millis(1);

#[derive(Clone, Copy)]
struct Settings {
    port: u16,
    rate: Option<u64>,
    limit: Option<u64>,
    echo: Option<u16>,
    ballast: u64,
}

fn settings() -> Result<Settings, String> {
    let mut s = Settings {
        port: 5001,
        rate: None,
        limit: None,
        echo: None,
        ballast: 0,
    };
    for a in std::env::args().skip(1) {
        let (k, v) = a.split_once('=').ok_or(format!("{a:?} is not KEY=VALUE"))?;
        match k {
            "port" => {
                s.port = v
                    .parse()
                    .ok()
                    .filter(|&p| p != 0)
                    .ok_or("port must be 1 to 65535")?
            }
            "rate" => {
                s.rate = Some(
                    parse_amount(v)
                        .filter(|&r| r > 0)
                        .ok_or("rate wants bytes per second, like 120M")?,
                )
            }
            "bytes" => s.limit = Some(parse_amount(v).ok_or("bytes wants a size, like 1G")?),
            "echo" => {
                s.echo = Some(
                    v.parse()
                        .ok()
                        .filter(|&p| p != 0)
                        .ok_or("echo wants a port")?,
                )
            }
            "ballast" => s.ballast = parse_amount(v).ok_or("ballast wants a size, like 256M")?,
            _ => return Err(format!("unknown argument {a:?}")),
        }
    }
    if s.echo == Some(s.port) {
        return Err("echo wants a port other than the stream's".into());
    }
    Ok(s)
}

/// Reads and drops what the client sends, until it closes.
fn drain(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    while matches!(conn.read(&mut buf), Ok(n) if n > 0) {}
}

fn echo(mut conn: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
}

fn serve(mut conn: TcpStream, s: Settings) {
    if let Ok(reader) = conn.try_clone() {
        thread::spawn(move || drain(reader));
    }
    let _ = conn.set_nodelay(true);
    let start = Instant::now();
    let mut buf = vec![0u8; CHUNK as usize];
    let mut sent = 0u64;
    loop {
        let mut n = CHUNK;
        if let Some(limit) = s.limit {
            n = n.min(limit - sent);
            if n == 0 {
                return;
            }
        }
        if let Some(rate) = s.rate {
            // What is due by now, in whole quanta.
            let due = (start.elapsed().as_nanos() * u128::from(rate) / 1_000_000_000) as u64;
            if due <= sent {
                thread::sleep(QUANTUM);
                continue;
            }
            n = n.min(due - sent);
        }
        stream::fill(&mut buf[..n as usize], sent);
        if conn.write_all(&buf[..n as usize]).is_err() {
            return;
        }
        sent += n;
    }
}

fn main() {
    let s = match settings() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hermit-stream: {e}");
            std::process::exit(2);
        }
    };
    // One word per page makes every page non-zero: a migration must move
    // all of it.
    let mut ballast = vec![0u8; s.ballast as usize];
    for (i, page) in ballast.chunks_mut(4096).enumerate() {
        page[0] = (i as u8) | 1;
    }
    if s.ballast > 0 {
        println!("hermit-stream: ballast of {} bytes", s.ballast);
    }
    if let Some(p) = s.echo {
        match TcpListener::bind(("0.0.0.0", p)) {
            Ok(l) => {
                thread::spawn(move || {
                    for c in l.incoming().flatten() {
                        thread::spawn(move || echo(c));
                    }
                });
            }
            Err(e) => {
                eprintln!("hermit-stream: cannot listen on port {p}: {e}");
                std::process::exit(1);
            }
        }
    }
    let listener = match TcpListener::bind(("0.0.0.0", s.port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hermit-stream: cannot listen on port {}: {e}", s.port);
            std::process::exit(1);
        }
    };
    println!(
        "hermit-stream: listening on port {}, rate {}, {}",
        s.port,
        s.rate.map_or("full speed".into(), |r| format!("{r} B/s")),
        s.limit.map_or("no limit".into(), |n| format!("{n} bytes"))
    );
    for conn in listener.incoming().flatten() {
        thread::spawn(move || serve(conn, s));
    }
    drop(ballast);
}
