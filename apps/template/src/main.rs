//! `template`: a Ferry service to start from; `just new-app NAME` copies it.
//!
//! It greets each TCP connection with how long the service
//! has run and the wall-clock time, then answers every line it receives
//! with the line in capitals. Its state (the connections, their buffers,
//! the start time) lives in guest memory, so it moves with the VM.
//!
//! Arguments (after `--` on `ferry run`, or `just run-app template ARGS`):
//! `port=N` (default 7000), `greeting=WORD` (default `hello`).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::{String, ToString};
use alloc::vec::Vec;

use ferry_runtime::net::{self, BufferSizes, NetError, TcpListener, TcpStream};
use ferry_runtime::{Env, println, time};

// The runtime boots, sets up memory, time and the console, then calls
// `main` with the arguments.
ferry_runtime::main!(main);

fn main(env: &Env) -> i32 {
    // `key=value` arguments.
    let port = match env.arg("port").map(str::parse::<u16>) {
        None => 7000,
        Some(Ok(p)) if p != 0 => p,
        Some(_) => {
            println!("template: port must be 1 to 65535");
            return 2;
        }
    };
    let greeting = env.arg("greeting").unwrap_or("hello").to_string();
    let started = time::now();
    // The network: `run` brings the card up (the address comes from
    // `ferry run --ip`) and drives the async tasks until `main`'s future
    // returns; its value is the exit status.
    net::run(env, async move {
        let mut listener = TcpListener::bind(port, BufferSizes::default())?;
        println!("template: listening on port {port}");
        loop {
            let conn = listener.accept().await;
            // One task per connection.
            net::spawn(serve(conn, greeting.clone(), started));
        }
        #[allow(unreachable_code)]
        Ok::<i32, NetError>(0)
    })
}

async fn serve(mut conn: TcpStream, greeting: String, started: time::Instant) {
    let up = time::now().duration_since(started);
    let unix_s = time::unix_time_ns().map_or(0, |ns| ns / 1_000_000_000);
    let hello = format!(
        "{greeting}! this service has run {} ms; unix time {unix_s}\n",
        up.as_millis()
    );
    if conn.write_all(hello.as_bytes()).await.is_err() {
        return;
    }
    let mut line = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        let n = match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        for &b in &buf[..n] {
            line.push(b.to_ascii_uppercase());
            if b == b'\n' {
                if conn.write_all(&line).await.is_err() {
                    return;
                }
                line.clear();
            }
        }
    }
}
