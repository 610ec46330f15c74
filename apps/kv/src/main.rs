//! `kv`: an in-memory key-value store speaking enough RESP2 for `redis-cli`
//! and `redis-benchmark`: PING, ECHO, GET, SET, DEL, EXISTS, INCR, DBSIZE
//! (and inline commands). Anything else gets a Redis-style error.
//!
//! Arguments: `port=N` (default 6379).
#![no_std]
#![no_main]

extern crate alloc;

mod resp;

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::vec::Vec;
use core::cell::RefCell;

use ferry_runtime::net::{self, BufferSizes, NetError, TcpListener, TcpStream};
use ferry_runtime::{Env, println};
use resp::{Parsed, Reply};

ferry_runtime::main!(main);

type Store = Rc<RefCell<BTreeMap<Vec<u8>, Vec<u8>>>>;

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
                        execute(&args, &store).encode(&mut out);
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

fn execute(args: &[&[u8]], store: &Store) -> Reply {
    let name = args[0].to_ascii_uppercase();
    let argc = args.len() - 1;
    let arity = |ok: bool| {
        if ok {
            None
        } else {
            Some(Reply::Error(alloc::format!(
                "ERR wrong number of arguments for '{}' command",
                core::str::from_utf8(&name)
                    .unwrap_or("?")
                    .to_ascii_lowercase()
            )))
        }
    };
    let mut db = store.borrow_mut();
    match name.as_slice() {
        b"PING" => arity(argc <= 1).unwrap_or_else(|| match args.get(1) {
            Some(m) => Reply::Bulk(Some(m.to_vec())),
            None => Reply::Simple("PONG"),
        }),
        b"ECHO" => arity(argc == 1).unwrap_or_else(|| Reply::Bulk(Some(args[1].to_vec()))),
        b"GET" => arity(argc == 1).unwrap_or_else(|| Reply::Bulk(db.get(args[1]).cloned())),
        b"SET" => {
            if argc == 2 {
                db.insert(args[1].to_vec(), args[2].to_vec());
                Reply::Simple("OK")
            } else if argc > 2 {
                Reply::Error("ERR syntax error (SET options are not supported)".into())
            } else {
                arity(false).expect("arity error")
            }
        }
        b"DEL" => arity(argc >= 1).unwrap_or_else(|| {
            Reply::Integer(
                args[1..]
                    .iter()
                    .filter(|k| db.remove(**k).is_some())
                    .count() as i64,
            )
        }),
        b"EXISTS" => arity(argc >= 1).unwrap_or_else(|| {
            Reply::Integer(args[1..].iter().filter(|k| db.contains_key(**k)).count() as i64)
        }),
        b"INCR" => arity(argc == 1).unwrap_or_else(|| {
            let cur = match db.get(args[1]) {
                None => Some(0i64),
                Some(v) => core::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok()),
            };
            match cur.and_then(|c| c.checked_add(1)) {
                Some(n) => {
                    db.insert(args[1].to_vec(), alloc::format!("{n}").into_bytes());
                    Reply::Integer(n)
                }
                None => Reply::Error("ERR value is not an integer or out of range".into()),
            }
        }),
        b"DBSIZE" => arity(argc == 0).unwrap_or(Reply::Integer(db.len() as i64)),
        _ => {
            let mut msg = alloc::format!(
                "ERR unknown command '{}', with args beginning with:",
                resp::printable(args[0])
            );
            for a in args[1..].iter().take(3) {
                msg.push_str(&alloc::format!(" '{}'", resp::printable(a)));
            }
            Reply::Error(msg)
        }
    }
}
