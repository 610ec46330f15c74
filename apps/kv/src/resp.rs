//! RESP2 framing: parsing requests (arrays of bulk strings, or inline
//! commands) and encoding replies. Every length is bounded.

use alloc::string::String;
use alloc::vec::Vec;

/// Largest request (all of a pipelined batch not yet parsed) kept.
pub const MAX_REQUEST: usize = 1 << 20;
/// Most arguments in one command.
const MAX_ARGS: usize = 1024;
/// Largest bulk string.
const MAX_BULK: usize = 512 * 1024;

/// A parse result.
pub enum Parsed<'a> {
    /// A command and the bytes it took.
    Command(Vec<&'a [u8]>, usize),
    /// More bytes are needed.
    Incomplete,
    /// A protocol error (the connection is closed after the reply).
    Invalid(String),
}

fn line(buf: &[u8]) -> Option<(&[u8], usize)> {
    let end = buf.windows(2).position(|w| w == b"\r\n")?;
    Some((&buf[..end], end + 2))
}

fn number(s: &[u8]) -> Option<i64> {
    core::str::from_utf8(s).ok()?.parse().ok()
}

/// Parses one request at the start of `buf`.
pub fn parse(buf: &[u8]) -> Parsed<'_> {
    if buf.is_empty() {
        return Parsed::Incomplete;
    }
    if buf[0] != b'*' {
        // Inline command: words up to CRLF (or LF).
        let Some(end) = buf.iter().position(|&b| b == b'\n') else {
            return if buf.len() > 64 * 1024 {
                Parsed::Invalid("ERR Protocol error: too big inline request".into())
            } else {
                Parsed::Incomplete
            };
        };
        let text = &buf[..end];
        let text = text.strip_suffix(b"\r").unwrap_or(text);
        let words = text
            .split(|&b| b == b' ')
            .filter(|w| !w.is_empty())
            .collect();
        return Parsed::Command(words, end + 1);
    }
    let Some((head, mut at)) = line(buf) else {
        return Parsed::Incomplete;
    };
    let Some(n) = number(&head[1..]).filter(|n| (0..=MAX_ARGS as i64).contains(n)) else {
        return Parsed::Invalid("ERR Protocol error: invalid multibulk length".into());
    };
    let mut args = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let Some((h, used)) = line(&buf[at..]) else {
            return Parsed::Incomplete;
        };
        if h.first() != Some(&b'$') {
            return Parsed::Invalid("ERR Protocol error: expected '$'".into());
        }
        let Some(len) = number(&h[1..]).filter(|l| (0..=MAX_BULK as i64).contains(l)) else {
            return Parsed::Invalid("ERR Protocol error: invalid bulk length".into());
        };
        let len = len as usize;
        at += used;
        if buf.len() < at + len + 2 {
            return Parsed::Incomplete;
        }
        if &buf[at + len..at + len + 2] != b"\r\n" {
            return Parsed::Invalid("ERR Protocol error: bulk string not terminated".into());
        }
        args.push(&buf[at..at + len]);
        at += len + 2;
    }
    Parsed::Command(args, at)
}

/// A reply.
pub enum Reply {
    /// `+OK`.
    Simple(&'static str),
    /// `-ERR ...`.
    Error(String),
    /// `:n`.
    Integer(i64),
    /// `$len data`, or `$-1` for none.
    Bulk(Option<Vec<u8>>),
}

impl Reply {
    /// Appends the reply's encoding to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        use core::fmt::Write;
        let mut s = String::new();
        match self {
            Reply::Simple(m) => {
                let _ = write!(s, "+{m}\r\n");
            }
            Reply::Error(m) => {
                let _ = write!(s, "-{m}\r\n");
            }
            Reply::Integer(n) => {
                let _ = write!(s, ":{n}\r\n");
            }
            Reply::Bulk(None) => s.push_str("$-1\r\n"),
            Reply::Bulk(Some(v)) => {
                let _ = write!(s, "${}\r\n", v.len());
                out.extend_from_slice(s.as_bytes());
                out.extend_from_slice(v);
                out.extend_from_slice(b"\r\n");
                return;
            }
        }
        out.extend_from_slice(s.as_bytes());
    }
}

/// A command word as text for error messages (at most 64 characters).
pub fn printable(b: &[u8]) -> String {
    b.iter()
        .take(64)
        .map(|&c| if c.is_ascii_graphic() { c as char } else { '?' })
        .collect()
}
