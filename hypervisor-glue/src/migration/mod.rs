//! Live migration: the VM moves from a source host to a destination host
//! while it runs, over one TCP stream.
//!
//! ```text
//!  source (ferry migrate -> the VM's API)          destination (ferry receive)
//!    | -- Hello {version, nonce_s} -------------------> |
//!    | <------------- Challenge {version, nonce_d, proof_d} | proof_d = HMAC(key, "dst" nonce_s nonce_d)
//!    | -- Auth {proof_s} -----------------------------> | proof_s = HMAC(key, "src" nonce_d nonce_s)
//!    | <-------------------------------------- AuthOk   | (a bad proof gets Error and a close)
//!    | -- Config {memory, vCPUs, MAC, IP} ------------> | maps memory, creates the VM, opens the tap
//!    | <--------------------------------------- Ready   |
//!    | -- Pages (round 0: every non-zero page) -------> |
//!    | -- Pages (round k: pages dirtied meanwhile) ---> |  KVM dirty log OR the VMM's own bitmap
//!    |    ... until the rest fits the downtime budget   |
//!    | -- StartCapture -------------------------------> | starts capturing tap frames
//!    | <------------------------------------ CaptureOn  |
//!    |  [pause: vCPU out of KVM_RUN, devices stopped]   |
//!    | -- Pages (the last dirty pages) ---------------> |
//!    | -- State {VmState} ----------------------------> | validates, loads vCPU/irqchip/devices
//!    | <-------------------------------------- StateOk  |
//!    | -- Commit -------------------------------------> | resumes the VM, re-injects captured frames
//!    | <----------------------------- Committed {info}  |
//!  source ends its VM                                   runs it on
//! ```
//!
//! Until Commit is sent, any failure (a closed connection, a refused key,
//! another version, a destination without memory or tap) makes the source
//! resume its VM, and the destination discards what it received. After
//! Commit the source never runs the VM again: it never runs in two places.
//!
//! Framing: every message is `type u32 | length u64 | payload`, lengths
//! bounded by [`MAX_MESSAGE`].

pub mod dest;
pub mod source;

use std::io::{Read, Write};

use hmac::{KeyInit, Mac};

/// The protocol version spoken here.
pub const PROTOCOL_VERSION: u32 = 1;
/// Largest message accepted.
pub const MAX_MESSAGE: u64 = 64 << 20;
/// Pages per Pages message.
pub const PAGES_PER_MESSAGE: usize = 256;
const PAGE: usize = 4096;

/// Message types.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Msg {
    /// Source's greeting.
    Hello = 1,
    /// Destination's greeting and proof of the key.
    Challenge = 2,
    /// Source's proof of the key.
    Auth = 3,
    /// Authenticated.
    AuthOk = 4,
    /// The VM's configuration (JSON).
    Config = 5,
    /// Destination ready for memory.
    Ready = 6,
    /// Memory pages.
    Pages = 7,
    /// Start capturing frames.
    StartCapture = 8,
    /// Capturing.
    CaptureOn = 9,
    /// The VM's state (a snapshot's archived VmState).
    State = 10,
    /// State loaded.
    StateOk = 11,
    /// Run it there.
    Commit = 12,
    /// Running there (JSON: counters).
    Committed = 13,
    /// A failure, with its reason (UTF-8).
    Error = 14,
}

impl Msg {
    fn from_u32(v: u32) -> Option<Msg> {
        use Msg::*;
        [
            Hello,
            Challenge,
            Auth,
            AuthOk,
            Config,
            Ready,
            Pages,
            StartCapture,
            CaptureOn,
            State,
            StateOk,
            Commit,
            Committed,
            Error,
        ]
        .into_iter()
        .find(|m| *m as u32 == v)
    }
}

/// Migration errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The connection failed.
    #[error("migration connection: {0}")]
    Io(#[from] std::io::Error),
    /// The peer broke the protocol.
    #[error("migration protocol: {0}")]
    Protocol(String),
    /// The peer reported a failure.
    #[error("the other side failed: {0}")]
    Peer(String),
    /// Keys differ, or the peer has none.
    #[error("authentication failed: the other side does not hold the same key")]
    Auth,
    /// Another protocol version.
    #[error(
        "the other side speaks migration protocol version {0}; this Ferry speaks {PROTOCOL_VERSION}"
    )]
    Version(u32),
    /// A local step failed.
    #[error("{0}")]
    Local(String),
}

/// Writes one message.
pub fn send(w: &mut impl Write, t: Msg, payload: &[u8]) -> Result<(), Error> {
    let mut h = [0u8; 12];
    h[..4].copy_from_slice(&(t as u32).to_le_bytes());
    h[4..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
    w.write_all(&h)?;
    w.write_all(payload)?;
    Ok(())
}

/// Reads one message; an Error message becomes [`Error::Peer`].
pub fn recv(r: &mut impl Read) -> Result<(Msg, Vec<u8>), Error> {
    let mut h = [0u8; 12];
    r.read_exact(&mut h)?;
    let t = u32::from_le_bytes(h[..4].try_into().expect("4"));
    let len = u64::from_le_bytes(h[4..].try_into().expect("8"));
    let t = Msg::from_u32(t).ok_or_else(|| Error::Protocol(format!("unknown message type {t}")))?;
    if len > MAX_MESSAGE {
        return Err(Error::Protocol(format!(
            "{t:?} message of {len} bytes (at most {MAX_MESSAGE})"
        )));
    }
    let mut payload = vec![0u8; len as usize];
    r.read_exact(&mut payload)?;
    if t == Msg::Error {
        return Err(Error::Peer(String::from_utf8_lossy(&payload).into_owned()));
    }
    Ok((t, payload))
}

/// Reads a message that must be of type `want`.
pub fn expect(r: &mut impl Read, want: Msg) -> Result<Vec<u8>, Error> {
    let (t, p) = recv(r)?;
    if t != want {
        return Err(Error::Protocol(format!("expected {want:?}, got {t:?}")));
    }
    Ok(p)
}

/// A pre-shared key (32 zero bytes when none is given on either side).
#[derive(Clone)]
pub struct Key(Vec<u8>);

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Key(..)")
    }
}

impl Key {
    /// No key: both sides must have none.
    pub fn none() -> Key {
        Key(vec![0; 32])
    }

    /// Reads a key file (at least 16 bytes, at most 4 KiB).
    pub fn from_file(path: &std::path::Path) -> Result<Key, String> {
        let k = std::fs::read(path)
            .map_err(|e| format!("cannot read the key {}: {e}", path.display()))?;
        if !(16..=4096).contains(&k.len()) {
            return Err(format!(
                "the key {} must be 16 to 4096 bytes long (it is {})",
                path.display(),
                k.len()
            ));
        }
        Ok(Key(k))
    }

    fn proof(&self, label: &[u8], a: &[u8], b: &[u8]) -> [u8; 32] {
        let mut m =
            hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.0).expect("HMAC takes any key length");
        m.update(label);
        m.update(a);
        m.update(b);
        m.finalize().into_bytes().into()
    }
}

fn nonce() -> [u8; 32] {
    let mut n = [0u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut n))
        .expect("/dev/urandom");
    n
}

/// Constant-time comparison.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Pages message: `count u32 | gpa u64 * count | data`.
pub fn encode_pages(pages: &[(u64, &[u8])]) -> Vec<u8> {
    let mut v = Vec::with_capacity(4 + pages.len() * (8 + PAGE));
    v.extend_from_slice(&(pages.len() as u32).to_le_bytes());
    for (gpa, _) in pages {
        v.extend_from_slice(&gpa.to_le_bytes());
    }
    for (_, data) in pages {
        v.extend_from_slice(data);
    }
    v
}

/// Parses a Pages message: (gpa, page data) pairs.
pub fn decode_pages(p: &[u8]) -> Result<Vec<(u64, &[u8])>, Error> {
    let bad = |m: &str| Error::Protocol(format!("Pages: {m}"));
    if p.len() < 4 {
        return Err(bad("too short"));
    }
    let n = u32::from_le_bytes(p[..4].try_into().expect("4")) as usize;
    if n > PAGES_PER_MESSAGE || p.len() != 4 + n * (8 + PAGE) {
        return Err(bad("length does not match the page count"));
    }
    let data = &p[4 + 8 * n..];
    (0..n)
        .map(|i| {
            let gpa = u64::from_le_bytes(p[4 + 8 * i..12 + 8 * i].try_into().expect("8"));
            if gpa % PAGE as u64 != 0 {
                return Err(bad("unaligned page address"));
            }
            Ok((gpa, &data[i * PAGE..(i + 1) * PAGE]))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn framing_round_trips_and_bounds_lengths() {
        let mut buf = Vec::new();
        send(&mut buf, Msg::Ready, b"").unwrap();
        send(&mut buf, Msg::Error, b"no tap").unwrap();
        let mut r = &buf[..];
        assert_eq!(recv(&mut r).unwrap(), (Msg::Ready, vec![]));
        assert!(matches!(recv(&mut r), Err(Error::Peer(m)) if m == "no tap"));
        let mut huge = vec![];
        huge.extend_from_slice(&(Msg::Pages as u32).to_le_bytes());
        huge.extend_from_slice(&(MAX_MESSAGE + 1).to_le_bytes());
        assert!(matches!(recv(&mut &huge[..]), Err(Error::Protocol(_))));
        let mut unknown = [0u8; 12];
        unknown[0] = 99;
        assert!(matches!(recv(&mut &unknown[..]), Err(Error::Protocol(_))));
    }

    #[test]
    fn pages_round_trip_and_bad_ones_are_refused() {
        let a = [1u8; PAGE];
        let b = [2u8; PAGE];
        let enc = encode_pages(&[(0x1000, &a), (0x5000, &b)]);
        let dec = decode_pages(&enc).unwrap();
        assert_eq!(dec, vec![(0x1000, &a[..]), (0x5000, &b[..])]);
        assert!(decode_pages(&enc[..enc.len() - 1]).is_err());
        let mut unaligned = enc.clone();
        unaligned[4] = 1;
        assert!(decode_pages(&unaligned).is_err());
    }

    #[test]
    fn proofs_depend_on_the_key_and_direction() {
        let (k1, k2) = (Key(vec![7; 32]), Key(vec![8; 32]));
        let (n1, n2) = ([1u8; 32], [2u8; 32]);
        assert!(same(
            &k1.proof(b"dst", &n1, &n2),
            &k1.proof(b"dst", &n1, &n2)
        ));
        assert!(!same(
            &k1.proof(b"dst", &n1, &n2),
            &k2.proof(b"dst", &n1, &n2)
        ));
        assert!(!same(
            &k1.proof(b"dst", &n1, &n2),
            &k1.proof(b"src", &n1, &n2)
        ));
    }
}
