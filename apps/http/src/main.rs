//! `http`: a small HTTP/1.1 server. `GET /` is a small HTML page;
//! `GET /stream?bytes=N` is an N-byte body of the verifiable stream
//! (`ferry_abi::stream`), default 1 MiB, at most 1 GiB. Keep-alive is
//! honoured; other paths get 404, other methods 405, garbage 400.
//!
//! Arguments: `port=N` (default 80).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::vec::Vec;

use ferry_abi::stream;
use ferry_runtime::net::{self, BufferSizes, NetError, TcpListener, TcpStream};
use ferry_runtime::{Env, println};

ferry_runtime::main!(main);

const MAX_HEAD: usize = 16 * 1024;
const DEFAULT_BODY: u64 = 1 << 20;
const MAX_BODY: u64 = 1 << 30;
const PAGE: &str = "<!doctype html>\n<html><head><title>Ferry</title></head>\n<body><h1>Served by a Ferry unikernel</h1>\n<p>Try <a href=\"/stream?bytes=1048576\">/stream?bytes=N</a> for a large verifiable body.</p></body></html>\n";

fn main(env: &Env) -> i32 {
    let port = match env.arg("port").map(str::parse::<u16>) {
        None => 80,
        Some(Ok(p)) if p != 0 => p,
        Some(_) => {
            println!("http: port must be 1 to 65535");
            return 2;
        }
    };
    net::run(env, async move {
        let sizes = BufferSizes {
            rx: 16 * 1024,
            tx: 128 * 1024,
            backlog: 2,
        };
        let mut listener = TcpListener::bind(port, sizes)?;
        println!("http: listening on port {port}");
        loop {
            let conn = listener.accept().await;
            net::spawn(serve(conn));
        }
        #[allow(unreachable_code)]
        Ok::<i32, NetError>(0)
    })
}

struct Request {
    method: Vec<u8>,
    path: Vec<u8>,
    keep_alive: bool,
}

/// Parses a request head (up to the blank line).
fn parse(head: &[u8]) -> Option<Request> {
    let text = core::str::from_utf8(head).ok()?;
    let mut lines = text.split("\r\n");
    let mut first = lines.next()?.split(' ');
    let (method, path, version) = (first.next()?, first.next()?, first.next()?);
    if !version.starts_with("HTTP/1.") || first.next().is_some() {
        return None;
    }
    let mut keep_alive = version == "HTTP/1.1";
    for l in lines {
        let Some((k, v)) = l.split_once(':') else {
            continue;
        };
        if k.trim().eq_ignore_ascii_case("connection") {
            let v = v.trim();
            if v.eq_ignore_ascii_case("close") {
                keep_alive = false;
            } else if v.eq_ignore_ascii_case("keep-alive") {
                keep_alive = true;
            }
        }
    }
    Some(Request {
        method: method.as_bytes().to_vec(),
        path: path.as_bytes().to_vec(),
        keep_alive,
    })
}

fn query_bytes(path: &str) -> Result<u64, ()> {
    let Some((_, q)) = path.split_once('?') else {
        return Ok(DEFAULT_BODY);
    };
    match q.split('&').find_map(|kv| kv.strip_prefix("bytes=")) {
        None => Ok(DEFAULT_BODY),
        Some(n) => n.parse::<u64>().ok().filter(|n| *n <= MAX_BODY).ok_or(()),
    }
}

async fn respond(
    conn: &mut TcpStream,
    status: &str,
    ctype: &str,
    len: u64,
    keep: bool,
) -> Result<(), NetError> {
    let head = alloc::format!(
        "HTTP/1.1 {status}\r\nServer: ferry-http\r\nContent-Type: {ctype}\r\nContent-Length: {len}\r\nConnection: {}\r\n\r\n",
        if keep { "keep-alive" } else { "close" }
    );
    conn.write_all(head.as_bytes()).await
}

async fn serve(mut conn: TcpStream) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 2048];
    loop {
        let end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p;
            }
            if buf.len() > MAX_HEAD {
                let _ = respond(
                    &mut conn,
                    "431 Request Header Fields Too Large",
                    "text/plain",
                    0,
                    false,
                )
                .await;
                return;
            }
            match conn.read(&mut chunk).await {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let req = parse(&buf[..end]);
        buf.drain(..end + 4);
        let Some(req) = req else {
            let _ = respond(&mut conn, "400 Bad Request", "text/plain", 0, false).await;
            return;
        };
        let keep = req.keep_alive;
        let path = core::str::from_utf8(&req.path).unwrap_or("");
        let route = path.split('?').next().unwrap_or("");
        let ok = match (req.method.as_slice(), route) {
            (b"GET" | b"HEAD", "/") => {
                let r = respond(
                    &mut conn,
                    "200 OK",
                    "text/html; charset=utf-8",
                    PAGE.len() as u64,
                    keep,
                )
                .await;
                if r.is_ok() && req.method == b"GET" {
                    conn.write_all(PAGE.as_bytes()).await
                } else {
                    r
                }
            }
            (b"GET" | b"HEAD", "/stream") => match query_bytes(path) {
                Ok(n) => {
                    let r = respond(&mut conn, "200 OK", "application/octet-stream", n, keep).await;
                    if r.is_ok() && req.method == b"GET" {
                        send_stream(&mut conn, n).await
                    } else {
                        r
                    }
                }
                Err(()) => respond(&mut conn, "400 Bad Request", "text/plain", 0, false)
                    .await
                    .and(Err(NetError::Closed)),
            },
            (b"GET" | b"HEAD", _) => {
                respond(&mut conn, "404 Not Found", "text/plain", 0, keep).await
            }
            _ => respond(&mut conn, "405 Method Not Allowed", "text/plain", 0, keep).await,
        };
        if ok.is_err() || !keep {
            return;
        }
    }
}

/// Writes `n` bytes of the stream straight into the socket's send buffer.
async fn send_stream(conn: &mut TcpStream, n: u64) -> Result<(), NetError> {
    let mut sent = 0u64;
    while sent < n {
        let left = n - sent;
        let wrote = conn
            .write_with(1, |space| {
                // A bounded chunk per turn keeps the vCPU transmitting.
                let k = (space.len() as u64).min(left).min(16 * 1024) as usize;
                stream::fill(&mut space[..k], sent);
                k
            })
            .await?;
        sent += wrote as u64;
        net::yield_now().await;
    }
    Ok(())
}
