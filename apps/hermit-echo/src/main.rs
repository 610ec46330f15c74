//! `hermit-echo`: sends back every byte it receives, on any number of
//! connections, in ordinary std Rust: `std::net::TcpListener`, a thread per
//! connection. It runs on RustyHermit (`[package.metadata.ferry] kernel =
//! "hermit"`), which Ferry boots, snapshots and moves like its own images.
//!
//! Arguments: `port=N` (default 7).

use ferry_hermit as _;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;

fn serve(mut conn: TcpStream) {
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

fn main() {
    let mut port = 7u16;
    for a in std::env::args().skip(1) {
        match a.strip_prefix("port=").map(str::parse::<u16>) {
            Some(Ok(p)) if p != 0 => port = p,
            _ => {
                eprintln!("hermit-echo: unknown argument {a:?} (port=N, 1 to 65535)");
                std::process::exit(2);
            }
        }
    }
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("hermit-echo: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hermit-echo: listening on port {port}");
    for conn in listener.incoming() {
        match conn {
            Ok(c) => {
                thread::spawn(move || serve(c));
            }
            Err(e) => eprintln!("hermit-echo: accept: {e}"),
        }
    }
}
