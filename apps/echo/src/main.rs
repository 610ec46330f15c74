//! `echo`: sends back every byte it receives, on any number of connections.
//!
//! Arguments: `port=N` (default 7).
#![no_std]
#![no_main]

use ferry_runtime::net::{self, BufferSizes, NetError, TcpListener, TcpStream};
use ferry_runtime::{Env, println};

ferry_runtime::main!(main);

fn main(env: &Env) -> i32 {
    let port = match env.arg("port").map(str::parse::<u16>) {
        None => 7,
        Some(Ok(p)) if p != 0 => p,
        Some(_) => {
            println!("echo: port must be 1 to 65535");
            return 2;
        }
    };
    net::run(env, async move {
        let mut listener = TcpListener::bind(port, BufferSizes::default())?;
        println!("echo: listening on port {port}");
        loop {
            let conn = listener.accept().await;
            net::spawn(serve(conn));
        }
        #[allow(unreachable_code)]
        Ok::<i32, NetError>(0)
    })
}

async fn serve(mut conn: TcpStream) {
    let mut buf = [0u8; 4096];
    loop {
        match conn.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if conn.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }
    }
}
