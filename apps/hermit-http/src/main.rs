//! `hermit-http`: an HTTP/1.1 server built the way std Rust services are,
//! on a crate from crates.io (tiny_http: std::net and threads), running on
//! RustyHermit under Ferry. `GET /` is a small HTML page; `GET
//! /stream?bytes=N` is an N-byte body of the verifiable stream
//! (`ferry_abi::stream`; default 1 MiB, at most 1 GiB), which clients can
//! check byte for byte. Other paths get 404, other methods 405.
//!
//! (axum and hyper on tokio were the first choice; they do not build for
//! Hermit today: tokio's `net` needs socket2, which has no Hermit support.)
//!
//! Arguments: `port=N` (default 80).

use ferry_hermit as _;

use std::io::Read;

use ferry_abi::stream;
use tiny_http::{Header, Method, Response, Server, StatusCode};

const DEFAULT_BODY: u64 = 1 << 20;
const MAX_BODY: u64 = 1 << 30;
const PAGE: &str = "<!doctype html>\n<html><head><title>Ferry</title></head>\n<body><h1>Served by tiny_http on RustyHermit, on Ferry</h1>\n<p>Try <a href=\"/stream?bytes=1048576\">/stream?bytes=N</a> for a large verifiable body.</p></body></html>\n";

/// The verifiable stream's bytes `[at, end)` as a reader.
struct Body {
    at: u64,
    end: u64,
}

impl Read for Body {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = (self.end - self.at).min(buf.len() as u64) as usize;
        stream::fill(&mut buf[..n], self.at);
        self.at += n as u64;
        Ok(n)
    }
}

/// `bytes=N` from the query, if it is there and sane.
fn requested(url: &str) -> Result<u64, String> {
    let Some((_, q)) = url.split_once('?') else {
        return Ok(DEFAULT_BODY);
    };
    for pair in q.split('&') {
        if let Some(v) = pair.strip_prefix("bytes=") {
            return match v.parse::<u64>() {
                Ok(n) if n <= MAX_BODY => Ok(n),
                _ => Err(format!("bytes must be 0 to {MAX_BODY}\n")),
            };
        }
    }
    Ok(DEFAULT_BODY)
}

fn header(k: &str, v: &str) -> Header {
    Header::from_bytes(k.as_bytes(), v.as_bytes()).expect("a valid header")
}

fn handle(req: tiny_http::Request) {
    let path = req.url().split('?').next().unwrap_or("").to_string();
    let get = matches!(req.method(), Method::Get | Method::Head);
    let r = match (get, path.as_str()) {
        (true, "/") => req
            .respond(Response::from_string(PAGE).with_header(header("Content-Type", "text/html"))),
        (true, "/stream") => match requested(req.url()) {
            Ok(n) => {
                let body = Body { at: 0, end: n };
                req.respond(Response::new(
                    StatusCode(200),
                    vec![header("Content-Type", "application/octet-stream")],
                    body,
                    Some(n as usize),
                    None,
                ))
            }
            Err(e) => req.respond(Response::from_string(e).with_status_code(400)),
        },
        (false, "/" | "/stream") => {
            req.respond(Response::from_string("method not allowed\n").with_status_code(405))
        }
        _ => req.respond(Response::from_string("not found\n").with_status_code(404)),
    };
    if let Err(e) = r {
        eprintln!("hermit-http: {path}: {e}");
    }
}

fn main() {
    let mut port = 80u16;
    for a in std::env::args().skip(1) {
        match a.strip_prefix("port=").map(str::parse::<u16>) {
            Some(Ok(p)) if p != 0 => port = p,
            _ => {
                eprintln!("hermit-http: unknown argument {a:?} (port=N, 1 to 65535)");
                std::process::exit(2);
            }
        }
    }
    let server = match Server::http(("0.0.0.0", port)) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("hermit-http: cannot listen on port {port}: {e}");
            std::process::exit(1);
        }
    };
    println!("hermit-http: listening on port {port} (tiny_http)");
    for req in server.incoming_requests() {
        std::thread::spawn(move || handle(req));
    }
}
