//! How fast the migration channel moves pages between two threads over
//! loopback TCP: the source's loop (guest memory into sealed page records)
//! and the destination's (open, write into guest memory), with the key and
//! with `--insecure`. No KVM needed.
//!
//! `cargo run --release -p ferry --example channel_throughput [MIB [RUNS]]`

use std::net::TcpListener;
use std::time::Instant;

use ferry::memory;
use ferry::migration::channel::Channel;
use ferry::migration::key::{Credentials, Psk};
use ferry::migration::wire::{Message, PAGE};
use vm_memory::{Bytes, GuestAddress};

fn run(mib: u64, creds: Credentials) -> f64 {
    let size = mib << 20;
    let src = memory::create(size).unwrap();
    let dst = memory::create(size).unwrap();
    memory::prefer_huge_pages(&dst);
    // Memory a KVM VM maps, as a destination's is.
    let _vm =
        (std::env::var_os("KVM").is_some()).then(|| ferry::kvm::create_machine(&dst).unwrap());
    let _vs =
        (std::env::var_os("KVM").is_some()).then(|| ferry::kvm::create_machine(&src).unwrap());
    for p in 0..size / PAGE as u64 {
        src.write_obj(p | 1, GuestAddress(p * PAGE as u64)).unwrap();
    }
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let c2 = creds.clone();
    let t = std::thread::spawn(move || {
        let mut ch = Channel::accept(l.accept().unwrap().0, &c2).unwrap();
        ch.authenticated();
        let mut pages = 0u64;
        loop {
            match ch.recv().unwrap() {
                Message::Pages(p) => {
                    for (gpa, data) in p.iter() {
                        memory::write(&dst, gpa, data).unwrap();
                        pages += 1;
                    }
                }
                Message::Done => return pages,
                m => panic!("{}", m.name()),
            }
        }
    });
    let mut ch = Channel::connect(&addr, &creds).unwrap();
    ch.authenticated();
    let t0 = Instant::now();
    let mut gpas = (0..size / PAGE as u64).map(|p| p * PAGE as u64).peekable();
    while gpas.peek().is_some() {
        ch.send_pages(|w| -> Result<(), ferry::migration::channel::ChannelError> {
            while !w.full() {
                let Some(gpa) = gpas.next() else { break };
                w.push(gpa, |page| {
                    src.read_slice(page, GuestAddress(gpa)).unwrap();
                    Ok::<bool, ferry::migration::channel::ChannelError>(
                        !ferry::migration::wire::is_zero_page(page),
                    )
                })?;
            }
            Ok(())
        })
        .unwrap();
    }
    ch.send(&Message::Done).unwrap();
    let pages = t.join().unwrap();
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(pages, size / PAGE as u64);
    size as f64 / secs / 1e9
}

fn main() {
    let mib: u64 = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(1024);
    let key = Credentials::Key(Psk::from_hex(&"ab".repeat(32)).unwrap());
    let runs: usize = std::env::args()
        .nth(2)
        .and_then(|a| a.parse().ok())
        .unwrap_or(5);
    let (mut sealed, mut plain) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        sealed.push(run(mib, key.clone()));
        plain.push(run(mib, Credentials::Insecure));
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (s, p) = (median(&mut sealed), median(&mut plain));
    println!(
        "{mib} MiB over loopback, {runs} runs each, interleaved: sealed {s:.2} GB/s, insecure {p:.2} GB/s (median), ratio {:.2}",
        s / p
    );
}
