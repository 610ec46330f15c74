//! `stream-native`: the `stream` app's verifiable byte stream sent by a
//! native Linux process, the baseline `bench-net` measures against.
use std::io::{Read, Write};
use std::net::TcpListener;

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0.0.0.0:5001".into());
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("stream-native: cannot listen on {addr}: {e}");
        std::process::exit(1)
    });
    println!("stream-native: listening on {addr}");
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut drain = conn.try_clone().expect("clone");
            std::thread::spawn(move || {
                let mut b = [0u8; 4096];
                while matches!(drain.read(&mut b), Ok(n) if n > 0) {}
            });
            let mut conn = conn;
            let mut buf = vec![0u8; 256 * 1024];
            let mut off = 0u64;
            loop {
                ferry_abi::stream::fill(&mut buf, off);
                if conn.write_all(&buf).is_err() {
                    return;
                }
                off += buf.len() as u64;
            }
        });
    }
}
