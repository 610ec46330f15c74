//! The store and its commands, apart from the network: the guest app and
//! the native baseline of `bench-net` (`kv-native`) share this file.

use alloc::collections::BTreeMap;
use alloc::vec::Vec;

use crate::resp::{Reply, printable};

/// The data: keys to values.
pub type Db = BTreeMap<Vec<u8>, Vec<u8>>;

/// Runs one command (`args[0]` is its name) against `db`.
pub fn execute(args: &[&[u8]], db: &mut Db) -> Reply {
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
                printable(args[0])
            );
            for a in args[1..].iter().take(3) {
                msg.push_str(&alloc::format!(" '{}'", printable(a)));
            }
            Reply::Error(msg)
        }
    }
}
