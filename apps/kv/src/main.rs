//! `kv`: an in-memory key-value store speaking enough RESP2 for `redis-cli`
//! and `redis-benchmark`: PING, ECHO, GET, SET, DEL, EXISTS, INCR, DBSIZE
//! (and inline commands). Anything else gets a Redis-style error.
//!
//! Arguments: `port=N` (default 6379).
#![no_std]
#![no_main]

extern crate alloc;

mod resp;
mod store;

use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use ferry_runtime::net::{self, BufferSizes, NetError, TcpListener, TcpStream};
use ferry_runtime::{Env, println};
use resp::{Parsed, Reply};
use store::Db;

ferry_runtime::main!(main);

type Store = Rc<RefCell<Db>>;

fn main(env: &Env) -> i32 {
    let port = match env.arg("port").map(str::parse::<u16>) {
        None => 6379,
        Some(Ok(p)) if p != 0 => p,
        Some(_) => {
            println!("kv: port must be 1 to 65535");
            return 2;
        }
    };
    net::run(env, async move {
        let sizes = BufferSizes {
            rx: 16 * 1024,
            tx: 32 * 1024,
            backlog: 2,
        };
        let mut listener = TcpListener::bind(port, sizes)?;
        println!("kv: listening on port {port}");
        let store: Store = Rc::default();
        loop {
            let conn = listener.accept().await;
            net::spawn(serve(conn, store.clone()));
        }
        #[allow(unreachable_code)]
        Ok::<i32, NetError>(0)
    })
}

async fn serve(mut conn: TcpStream, store: Store) {
    let mut input: Vec<u8> = Vec::new();
    let mut out: Vec<u8> = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        input.extend_from_slice(&buf[..n]);
        let mut used = 0;
        let mut close = false;
        loop {
            match resp::parse(&input[used..]) {
                Parsed::Incomplete => break,
                Parsed::Invalid(msg) => {
                    Reply::Error(msg).encode(&mut out);
                    close = true;
                    break;
                }
                Parsed::Command(args, len) => {
                    used += len;
                    if !args.is_empty() {
                        store::execute(&args, &mut store.borrow_mut()).encode(&mut out);
                    }
                }
            }
        }
        input.drain(..used);
        if input.len() > resp::MAX_REQUEST {
            Reply::Error("ERR Protocol error: request too large".into()).encode(&mut out);
            close = true;
        }
        if !out.is_empty() {
            if conn.write_all(&out).await.is_err() {
                return;
            }
            out.clear();
        }
        if close {
            return;
        }
    }
}
