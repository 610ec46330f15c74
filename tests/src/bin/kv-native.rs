//! `kv-native`: the `kv` app's store and RESP framing (the same source
//! files) served by a native Linux process with std threads, as the
//! baseline `bench-net` measures the unikernel against.
extern crate alloc;

#[path = "../../../apps/kv/src/resp.rs"]
#[allow(dead_code, missing_docs)]
mod resp;
#[path = "../../../apps/kv/src/store.rs"]
#[allow(dead_code, missing_docs)]
mod store;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

use resp::{Parsed, Reply};

fn serve(mut conn: TcpStream, db: Arc<Mutex<store::Db>>) {
    let mut input = Vec::new();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match conn.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        input.extend_from_slice(&buf[..n]);
        let mut used = 0;
        loop {
            match resp::parse(&input[used..]) {
                Parsed::Incomplete => break,
                Parsed::Invalid(m) => {
                    Reply::Error(m).encode(&mut out);
                    let _ = conn.write_all(&out);
                    return;
                }
                Parsed::Command(args, len) => {
                    used += len;
                    if !args.is_empty() {
                        store::execute(&args, &mut db.lock().expect("db")).encode(&mut out);
                    }
                }
            }
        }
        input.drain(..used);
        if conn.write_all(&out).is_err() {
            return;
        }
        out.clear();
    }
}

fn main() {
    let addr = std::env::args()
        .nth(1)
        .unwrap_or_else(|| "0.0.0.0:6379".into());
    let listener = TcpListener::bind(&addr).unwrap_or_else(|e| {
        eprintln!("kv-native: cannot listen on {addr}: {e}");
        std::process::exit(1)
    });
    println!("kv-native: listening on {addr}");
    let db = Arc::new(Mutex::new(store::Db::new()));
    for conn in listener.incoming().flatten() {
        let db = db.clone();
        std::thread::spawn(move || serve(conn, db));
    }
}
