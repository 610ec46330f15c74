//! `udpcount`: counts numbered UDP datagrams, to show which of them
//! arrived. Each datagram starts with its sequence number (u64, little
//! endian); the service keeps one bit per number, so it knows how many
//! distinct datagrams came, how many came twice, and the highest number.
//! A TCP connection to the report port gets one line and is closed:
//! `received=N distinct=N duplicates=N highest=N beyond=N`.
//!
//! Arguments: `port=N` (datagrams, default 9000), `report=N` (TCP, default
//! 9001), `max=N` (highest sequence number tracked, default 4194303;
//! higher ones are counted in `beyond`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;
use core::cell::RefCell;

use ferry_runtime::net::{self, BufferSizes, NetError, TcpListener, UdpSocket};
use ferry_runtime::{Env, println};

ferry_runtime::main!(main);

#[derive(Default)]
struct Counts {
    seen: Vec<u64>,
    received: u64,
    distinct: u64,
    duplicates: u64,
    highest: u64,
    beyond: u64,
}

impl Counts {
    fn record(&mut self, seq: u64) {
        self.received += 1;
        self.highest = self.highest.max(seq);
        let (word, bit) = ((seq / 64) as usize, seq % 64);
        match self.seen.get_mut(word) {
            Some(w) if *w & (1 << bit) != 0 => self.duplicates += 1,
            Some(w) => {
                *w |= 1 << bit;
                self.distinct += 1;
            }
            None => self.beyond += 1,
        }
    }
}

/// The counters, shared by the receiving task and the report server (one
/// vCPU, tasks never run at once).
struct Shared(RefCell<Counts>);

fn parse_port(env: &Env, key: &str, default: u16) -> Option<u16> {
    match env.arg(key).map(str::parse::<u16>) {
        None => Some(default),
        Some(Ok(p)) if p != 0 => Some(p),
        Some(_) => None,
    }
}

fn main(env: &Env) -> i32 {
    let (Some(port), Some(report)) = (
        parse_port(env, "port", 9000),
        parse_port(env, "report", 9001),
    ) else {
        println!("udpcount: port and report must be 1 to 65535");
        return 2;
    };
    let max = match env.arg("max").map(str::parse::<u64>) {
        None => 4_194_303,
        Some(Ok(m)) if m < (1 << 32) => m,
        Some(_) => {
            println!("udpcount: max must be below 2^32");
            return 2;
        }
    };
    let counts: &'static Shared =
        alloc::boxed::Box::leak(alloc::boxed::Box::new(Shared(RefCell::new(Counts {
            seen: alloc::vec![0; (max / 64 + 1) as usize],
            ..Counts::default()
        }))));
    net::run(env, async move {
        // Room for a burst: frames captured during a migration arrive at once.
        let mut sock = UdpSocket::bind(port, 1024, 256)?;
        let mut listener = TcpListener::bind(report, BufferSizes::default())?;
        println!("udpcount: listening for datagrams on port {port}, report on port {report}");
        net::spawn(async move {
            loop {
                let mut conn = listener.accept().await;
                let line = {
                    let c = counts.0.borrow();
                    alloc::format!(
                        "received={} distinct={} duplicates={} highest={} beyond={}\n",
                        c.received,
                        c.distinct,
                        c.duplicates,
                        c.highest,
                        c.beyond
                    )
                };
                let _ = conn.write_all(line.as_bytes()).await;
                conn.shutdown();
            }
        });
        let mut buf = [0u8; 256];
        loop {
            let (n, _) = sock.recv_from(&mut buf).await;
            if n >= 8 {
                let seq = u64::from_le_bytes(buf[..8].try_into().expect("8 bytes"));
                counts.0.borrow_mut().record(seq);
            }
        }
        #[allow(unreachable_code)]
        Ok::<i32, NetError>(0)
    })
}
