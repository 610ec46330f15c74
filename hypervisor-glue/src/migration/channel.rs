//! The migration channel: a TCP connection on which both sides have proved
//! they hold the same key, and on which nothing can be read, changed,
//! reordered, replayed or injected.
//!
//! ```text
//!  initiator (source)                                   responder (receiver)
//!    | -- preamble "FRYM" | version u16 | mode u8 | 0 -----> |  both read the other's
//!    | <----------------------------------------- preamble   |  8 bytes, exactly
//!    | -- Noise NNpsk0 message 1: e, psk (48 bytes) -------> |  prologue = both preambles
//!    | <--------------------- message 2: e, ee (48 bytes)    |  (a wrong key: nothing back)
//!    | == record: len u32 | AES-256-GCM(message) | tag ====> |  keys: the handshake's split,
//!    | <================================================ ... |  nonce: a counter per direction
//! ```
//!
//! Mode 1 is `Noise_NNpsk0_25519_AESGCM_SHA256` (the handshake by `snow`)
//! and then records sealed by `ring`'s AES-256-GCM under the two keys the
//! handshake splits into, with the nonce laid out as Noise's AESGCM does
//! (four zero bytes, the counter big-endian) and the record's length
//! header as associated data: Noise's transport phase, with records of up
//! to [`MAX_RECORD`] bytes instead of 64 KiB. Mode 0 (`--insecure`) has the
//! same framing in plain text and no handshake. A side refuses a peer of
//! another mode or version, naming it.
//!
//! Before authentication everything is bounded: the preamble and the
//! handshake messages are read at their exact sizes within
//! [`HANDSHAKE_TIMEOUT`], and the first record (the peer's first message)
//! at most [`MAX_FIRST_RECORD`] bytes, until the owner calls
//! [`Channel::authenticated`].

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};

use super::key::{Credentials, wipe};
use super::wire::{Message, PageWriter, WireError};

/// The protocol version spoken here.
pub const PROTOCOL_VERSION: u16 = 6;
const MAGIC: [u8; 4] = *b"FRYM";
const PREAMBLE_LEN: usize = 8;
const NOISE_PATTERN: &str = "Noise_NNpsk0_25519_AESGCM_SHA256";
/// Both NNpsk0 handshake messages with empty payloads: an ephemeral key
/// and an AEAD tag.
const HANDSHAKE_LEN: usize = 48;
const TAG_LEN: usize = 16;
/// Time allowed for the preamble, the handshake and the first record.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest first record (before the owner vouches for the peer).
pub const MAX_FIRST_RECORD: usize = 64 << 10;
/// Largest record.
pub const MAX_RECORD: usize = 128 << 20;
/// How long one read or write may block when no deadline is set.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How far past its deadline a read or write may end: a socket timeout
/// is set again only once the time left has shrunk by more than this.
const TIMEOUT_SLACK: Duration = Duration::from_micros(200);
/// The read-ahead buffer's size.
const READ_AHEAD: usize = 64 << 10;

/// The channel's modes.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain text, no authentication (`--insecure`).
    Insecure = 0,
    /// Noise NNpsk0 and AES-256-GCM records.
    Noise = 1,
}

impl Mode {
    fn of(c: &Credentials) -> Mode {
        match c {
            Credentials::Key(_) => Mode::Noise,
            Credentials::Insecure => Mode::Insecure,
        }
    }
}

/// Channel errors.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// The connection failed.
    #[error("{0}")]
    Io(#[from] std::io::Error),
    /// A read or write did not finish in time.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// The other side closed the connection.
    #[error("the other side closed the connection {0}")]
    Closed(&'static str),
    /// The peer does not speak this protocol at all.
    #[error("the other side is not a Ferry migration endpoint")]
    NotFerry,
    /// Another protocol version.
    #[error(
        "the other side speaks migration protocol version {theirs}; this Ferry speaks {PROTOCOL_VERSION}"
    )]
    Version {
        /// The peer's version.
        theirs: u16,
    },
    /// One side is `--insecure`, the other is not.
    #[error("{0}")]
    Mode(String),
    /// The handshake failed: the keys differ.
    #[error("authentication failed: the other side does not hold the same key")]
    Auth,
    /// A record that does not open: altered, cut, replayed or injected.
    #[error(
        "a record from the other side failed authentication (altered, reordered, replayed or injected in transit): the connection is dropped"
    )]
    Record,
    /// A record over the size allowed now.
    #[error("a record of {len} bytes from the other side (at most {max} allowed here)")]
    TooLong {
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A record that is not a message.
    #[error("bad message from the other side: {0}")]
    Message(#[from] WireError),
    /// The record counter would wrap (2^64 records).
    #[error("record counter exhausted")]
    Exhausted,
}

/// One direction's AEAD state. The raw key is kept (wiped on drop) so the
/// channel can be handed to another process.
struct Cipher {
    key: LessSafeKey,
    raw: [u8; 32],
    counter: u64,
}

impl Drop for Cipher {
    fn drop(&mut self) {
        wipe(&mut self.raw);
    }
}

impl Cipher {
    fn new(raw: [u8; 32], counter: u64) -> Cipher {
        let key = LessSafeKey::new(UnboundKey::new(&AES_256_GCM, &raw).expect("a 32-byte key"));
        Cipher { key, raw, counter }
    }

    fn nonce(&mut self) -> Result<Nonce, ChannelError> {
        let n = self.counter;
        self.counter = n.checked_add(1).ok_or(ChannelError::Exhausted)?;
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_be_bytes());
        Ok(Nonce::assume_unique_for_key(b))
    }
}

/// A channel's state apart from its socket, to hand it to another process
/// (the receiver passes an admitted session to the VM's own process).
#[derive(Clone, PartialEq, Eq)]
pub struct SessionKeys {
    /// Key and next counter for sending (None: plain text).
    pub send: Option<([u8; 32], u64)>,
    /// Key and next counter for receiving.
    pub recv: Option<([u8; 32], u64)>,
}

impl std::fmt::Debug for SessionKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SessionKeys(..)")
    }
}

impl Drop for SessionKeys {
    fn drop(&mut self) {
        for (k, _) in self.send.iter_mut().chain(self.recv.iter_mut()) {
            wipe(k);
        }
    }
}

/// An established channel.
pub struct Channel {
    stream: TcpStream,
    send: Option<Cipher>,
    recv: Option<Cipher>,
    wbuf: Vec<u8>,
    rbuf: Vec<u8>,
    /// Bytes read ahead from the socket, `inbuf[inpos..inend]` not yet
    /// taken: a record's header, its body and often the records after it
    /// come in one read.
    inbuf: Box<[u8]>,
    inpos: usize,
    inend: usize,
    /// The socket's timeouts as last set (each set is a system call).
    read_timeout: Option<Duration>,
    write_timeout: Option<Duration>,
    max_record: usize,
    deadline: Option<Instant>,
    peer: SocketAddr,
}

impl std::fmt::Debug for Channel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Channel")
            .field("peer", &self.peer)
            .field("sealed", &self.send.is_some())
            .finish()
    }
}

fn preamble(mode: Mode) -> [u8; PREAMBLE_LEN] {
    let mut p = [0u8; PREAMBLE_LEN];
    p[..4].copy_from_slice(&MAGIC);
    p[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    p[6] = mode as u8;
    p
}

fn check_preamble(ours: Mode, p: &[u8; PREAMBLE_LEN]) -> Result<(), ChannelError> {
    if p[..4] != MAGIC {
        return Err(ChannelError::NotFerry);
    }
    let theirs = u16::from_le_bytes([p[4], p[5]]);
    if theirs != PROTOCOL_VERSION {
        return Err(ChannelError::Version { theirs });
    }
    match (ours, p[6]) {
        (Mode::Noise, 1) | (Mode::Insecure, 0) => Ok(()),
        (Mode::Noise, 0) => Err(ChannelError::Mode(
            "the other side runs --insecure (no authentication); this side requires a key".into(),
        )),
        (Mode::Insecure, 1) => Err(ChannelError::Mode(
            "the other side requires a key; this side runs --insecure".into(),
        )),
        (_, m) => Err(ChannelError::Mode(format!(
            "the other side asks for channel mode {m}"
        ))),
    }
}

fn noise<'a>(prologue: &'a [u8], creds: &Credentials) -> snow::Builder<'a> {
    let Credentials::Key(_) = creds else {
        unreachable!("noise only with a key")
    };
    snow::Builder::new(NOISE_PATTERN.parse().expect("a valid Noise pattern"))
        .prologue(prologue)
        .expect("a prologue")
}

fn io_kind(e: std::io::Error, what: &'static str) -> ChannelError {
    match e.kind() {
        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut => {
            ChannelError::Timeout(what)
        }
        std::io::ErrorKind::UnexpectedEof => ChannelError::Closed(what),
        _ => ChannelError::Io(e),
    }
}

impl Channel {
    /// Connects to `to` and runs the handshake as the initiator.
    pub fn connect(to: &str, creds: &Credentials) -> Result<Channel, ChannelError> {
        let addrs: Vec<SocketAddr> = to
            .to_socket_addrs()
            .map_err(|e| std::io::Error::new(e.kind(), format!("{to}: {e}")))?
            .collect();
        let addr = addrs
            .first()
            .ok_or_else(|| std::io::Error::other(format!("{to}: no address")))?;
        let stream = TcpStream::connect_timeout(addr, HANDSHAKE_TIMEOUT)
            .map_err(|e| std::io::Error::new(e.kind(), format!("cannot connect to {to}: {e}")))?;
        Channel::handshake(stream, creds, true)
    }

    /// Runs the handshake on an accepted connection, as the responder.
    pub fn accept(stream: TcpStream, creds: &Credentials) -> Result<Channel, ChannelError> {
        Channel::handshake(stream, creds, false)
    }

    fn handshake(
        stream: TcpStream,
        creds: &Credentials,
        initiator: bool,
    ) -> Result<Channel, ChannelError> {
        stream.set_nodelay(true).ok();
        let peer = stream.peer_addr()?;
        let mut ch = Channel {
            stream,
            send: None,
            recv: None,
            wbuf: Vec::new(),
            rbuf: Vec::new(),
            inbuf: vec![0; READ_AHEAD].into_boxed_slice(),
            inpos: 0,
            inend: 0,
            read_timeout: None,
            write_timeout: None,
            max_record: MAX_FIRST_RECORD,
            deadline: Some(Instant::now() + HANDSHAKE_TIMEOUT),
            peer,
        };
        let mode = Mode::of(creds);
        let ours = preamble(mode);
        let mut theirs = [0u8; PREAMBLE_LEN];
        if initiator {
            ch.write_raw(&ours, "sending the preamble")?;
            ch.read_raw(&mut theirs, "during the preamble")?;
        } else {
            ch.read_raw(&mut theirs, "during the preamble")?;
            if theirs[..4] != MAGIC {
                return Err(ChannelError::NotFerry);
            }
            ch.write_raw(&ours, "sending the preamble")?;
        }
        check_preamble(mode, &theirs)?;
        let Credentials::Key(psk) = creds else {
            ch.deadline = Some(Instant::now() + HANDSHAKE_TIMEOUT);
            return Ok(ch);
        };
        let mut prologue = Vec::with_capacity(2 * PREAMBLE_LEN);
        if initiator {
            prologue.extend_from_slice(&ours);
            prologue.extend_from_slice(&theirs);
        } else {
            prologue.extend_from_slice(&theirs);
            prologue.extend_from_slice(&ours);
        }
        let builder = noise(&prologue, creds)
            .psk(0, psk.bytes())
            .expect("a 32-byte PSK");
        let mut msg = [0u8; HANDSHAKE_LEN];
        let mut payload = [0u8; HANDSHAKE_LEN];
        let (k_send, k_recv) = if initiator {
            let mut hs = builder.build_initiator().expect("initiator state");
            let n = hs.write_message(&[], &mut msg).expect("message 1");
            debug_assert_eq!(n, HANDSHAKE_LEN);
            ch.write_raw(&msg, "sending the handshake")?;
            match ch.read_raw(&mut msg, "during the handshake") {
                Ok(()) => {}
                // A responder that cannot read message 1 (another key)
                // hangs up without a word.
                Err(ChannelError::Closed(_)) | Err(ChannelError::Io(_)) => {
                    return Err(ChannelError::Auth);
                }
                Err(e) => return Err(e),
            }
            hs.read_message(&msg, &mut payload)
                .map_err(|_| ChannelError::Auth)?;
            let (i2r, r2i) = hs.dangerously_get_raw_split();
            (i2r, r2i)
        } else {
            let mut hs = builder.build_responder().expect("responder state");
            ch.read_raw(&mut msg, "during the handshake")?;
            hs.read_message(&msg, &mut payload)
                .map_err(|_| ChannelError::Auth)?;
            let n = hs.write_message(&[], &mut msg).expect("message 2");
            debug_assert_eq!(n, HANDSHAKE_LEN);
            ch.write_raw(&msg, "sending the handshake")?;
            let (i2r, r2i) = hs.dangerously_get_raw_split();
            (r2i, i2r)
        };
        ch.send = Some(Cipher::new(k_send, 0));
        ch.recv = Some(Cipher::new(k_recv, 0));
        Ok(ch)
    }

    /// The peer vouched for by its first message: records up to
    /// [`MAX_RECORD`] from now on, and no handshake deadline.
    pub fn authenticated(&mut self) {
        self.max_record = MAX_RECORD;
        self.deadline = None;
    }

    /// The peer's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    /// Whether records are sealed (false: `--insecure`).
    pub fn sealed(&self) -> bool {
        self.send.is_some()
    }

    /// Every read and write from now must be done by `deadline` (`None`:
    /// each may block [`IDLE_TIMEOUT`]).
    pub fn set_deadline(&mut self, deadline: Option<Instant>) {
        self.deadline = deadline;
    }

    fn timeout(&self, what: &'static str) -> Result<Duration, ChannelError> {
        match self.deadline {
            None => Ok(IDLE_TIMEOUT),
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    Err(ChannelError::Timeout(what))
                } else {
                    Ok(left)
                }
            }
        }
    }

    /// Whether a socket timeout last set to `prev` will do for `t`: the
    /// same, or longer by at most [`TIMEOUT_SLACK`] (a read or write may
    /// then end that much past the deadline).
    fn timeout_holds(prev: Option<Duration>, t: Duration) -> bool {
        prev.is_some_and(|p| p >= t && p - t <= TIMEOUT_SLACK)
    }

    fn write_raw(&mut self, b: &[u8], what: &'static str) -> Result<(), ChannelError> {
        let t = self.timeout(what)?;
        if !Self::timeout_holds(self.write_timeout, t) {
            self.stream.set_write_timeout(Some(t))?;
            self.write_timeout = Some(t);
        }
        self.stream.write_all(b).map_err(|e| io_kind(e, what))
    }

    fn read_raw(&mut self, b: &mut [u8], what: &'static str) -> Result<(), ChannelError> {
        let ahead = self.inend - self.inpos;
        let mut done = b.len().min(ahead);
        b[..done].copy_from_slice(&self.inbuf[self.inpos..self.inpos + done]);
        self.inpos += done;
        while done < b.len() {
            let t = self.timeout(what)?;
            if !Self::timeout_holds(self.read_timeout, t) {
                self.stream.set_read_timeout(Some(t))?;
                self.read_timeout = Some(t);
            }
            let want = b.len() - done;
            // A large rest straight into place; a small one with what
            // follows it, into the read-ahead buffer.
            let direct = want >= self.inbuf.len();
            let r = if direct {
                self.stream.read(&mut b[done..])
            } else {
                self.stream.read(&mut self.inbuf)
            };
            match r {
                Ok(0) => return Err(io_kind(std::io::ErrorKind::UnexpectedEof.into(), what)),
                Ok(n) if direct => done += n,
                Ok(n) => {
                    let k = n.min(want);
                    b[done..done + k].copy_from_slice(&self.inbuf[..k]);
                    (self.inpos, self.inend) = (k, n);
                    done += k;
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io_kind(e, what)),
            }
        }
        Ok(())
    }

    /// Sends one message.
    pub fn send(&mut self, m: &Message) -> Result<(), ChannelError> {
        self.send_with(|buf| {
            m.encode(buf);
            Ok(())
        })
    }

    /// Sends a page batch that `fill` builds in place (see [`PageWriter`]);
    /// returns the bytes of pages sent.
    pub fn send_pages<E: From<ChannelError>>(
        &mut self,
        fill: impl FnOnce(&mut PageWriter) -> Result<(), E>,
    ) -> Result<usize, E> {
        let mut buf = std::mem::take(&mut self.wbuf);
        let mut w = PageWriter::new(&mut buf, 4);
        let r = fill(&mut w).map(|()| (w.len() as usize * super::wire::PAGE, w.end()));
        let r = r.and_then(|(bytes, end)| {
            self.seal_and_write(&mut buf, end)
                .map(|()| bytes)
                .map_err(E::from)
        });
        self.wbuf = buf;
        r
    }

    /// Sends the message `fill` appends to the buffer it is given.
    fn send_with<E: From<ChannelError>>(
        &mut self,
        fill: impl FnOnce(&mut Vec<u8>) -> Result<(), E>,
    ) -> Result<(), E> {
        let mut buf = std::mem::take(&mut self.wbuf);
        buf.clear();
        buf.extend_from_slice(&[0; 4]);
        let r = fill(&mut buf).and_then(|()| {
            let end = buf.len();
            self.seal_and_write(&mut buf, end).map_err(E::from)
        });
        self.wbuf = buf;
        r
    }

    /// Seals the message in `buf[4..end]` in place (after its length
    /// header, with its tag after it) and writes the record.
    fn seal_and_write(&mut self, buf: &mut Vec<u8>, end: usize) -> Result<(), ChannelError> {
        let tag = if self.send.is_some() { TAG_LEN } else { 0 };
        let len = end - 4 + tag;
        if len > MAX_RECORD {
            return Err(ChannelError::TooLong {
                len,
                max: MAX_RECORD,
            });
        }
        let header = (len as u32).to_le_bytes();
        buf[..4].copy_from_slice(&header);
        if let Some(c) = self.send.as_mut() {
            let nonce = c.nonce()?;
            let t = c
                .key
                .seal_in_place_separate_tag(nonce, Aad::from(header), &mut buf[4..end])
                .map_err(|_| ChannelError::Record)?;
            if buf.len() < end + TAG_LEN {
                buf.resize(end + TAG_LEN, 0);
            }
            buf[end..end + TAG_LEN].copy_from_slice(t.as_ref());
        }
        self.write_raw(&buf[..end + tag], "sending")
    }

    /// Receives one message (it borrows the channel's buffer).
    pub fn recv(&mut self) -> Result<Message<'_>, ChannelError> {
        let mut header = [0u8; 4];
        self.read_raw(&mut header, "waiting for the other side")?;
        let len = u32::from_le_bytes(header) as usize;
        let tag = if self.recv.is_some() { TAG_LEN } else { 0 };
        if len > self.max_record || len < tag + 1 {
            return Err(ChannelError::TooLong {
                len,
                max: self.max_record,
            });
        }
        let mut buf = std::mem::take(&mut self.rbuf);
        buf.resize(len, 0);
        let r = self.read_raw(&mut buf, "in the middle of a record");
        self.rbuf = buf;
        r?;
        let plain = match self.recv.as_mut() {
            Some(c) => {
                let nonce = c.nonce()?;
                c.key
                    .open_in_place(nonce, Aad::from(header), &mut self.rbuf)
                    .map_err(|_| ChannelError::Record)?
            }
            None => &mut self.rbuf[..],
        };
        Ok(Message::decode(plain)?)
    }

    /// Splits the channel into its socket and its keys, to hand it on.
    /// The protocol hands a channel on between the source's Open and the
    /// destination's answer, when the source sends nothing: bytes already
    /// read past Open are the peer breaking the protocol, refused here
    /// (they could not be handed on with the socket).
    pub fn export(mut self) -> Result<(TcpStream, SessionKeys), ChannelError> {
        if self.inpos < self.inend {
            return Err(ChannelError::Message(WireError::Invalid(format!(
                "{} bytes sent before the answer to Open",
                self.inend - self.inpos
            ))));
        }
        let keys = SessionKeys {
            send: self.send.take().map(|c| (c.raw, c.counter)),
            recv: self.recv.take().map(|c| (c.raw, c.counter)),
        };
        Ok((self.stream, keys))
    }

    /// A channel from a socket and keys handed on by [`Channel::export`]
    /// (already authenticated).
    pub fn from_parts(stream: TcpStream, keys: &SessionKeys) -> std::io::Result<Channel> {
        let peer = stream.peer_addr()?;
        stream.set_nodelay(true).ok();
        Ok(Channel {
            stream,
            send: keys.send.map(|(k, n)| Cipher::new(k, n)),
            recv: keys.recv.map(|(k, n)| Cipher::new(k, n)),
            wbuf: Vec::new(),
            rbuf: Vec::new(),
            inbuf: vec![0; READ_AHEAD].into_boxed_slice(),
            inpos: 0,
            inend: 0,
            read_timeout: None,
            write_timeout: None,
            max_record: MAX_RECORD,
            deadline: None,
            peer,
        })
    }

    /// Sends the first half of `m`'s record, then cuts the connection: a
    /// side dying in the middle of a message (the fault-matrix tests'
    /// `src-mid-state` failpoint).
    pub fn send_cut(&mut self, m: &Message) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        let mut rec = ((buf.len() + TAG_LEN) as u32).to_le_bytes().to_vec();
        rec.extend_from_slice(&buf[..buf.len() / 2]);
        let _ = self.write_raw(&rec, "sending");
        self.shutdown();
    }

    /// Ends the connection at once, both ways (the peer sees EOF).
    pub fn shutdown(&self) {
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::migration::key::Psk;
    use crate::migration::wire::Outcome;
    use std::net::TcpListener;

    fn key(b: u8) -> Credentials {
        Credentials::Key(Psk::from_hex(&format!("{b:02x}").repeat(32)).unwrap())
    }

    /// A listener on loopback whose first connection is handed to `f` on
    /// a thread; returns its address and the thread.
    fn serve<T: Send + 'static>(
        f: impl FnOnce(TcpStream) -> T + Send + 'static,
    ) -> (String, std::thread::JoinHandle<T>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let t = std::thread::spawn(move || f(l.accept().unwrap().0));
        (addr, t)
    }

    #[test]
    fn same_key_talks_both_ways() {
        let (addr, t) = serve(|s| {
            let mut ch = Channel::accept(s, &key(1)).unwrap();
            let m = ch.recv().unwrap();
            assert_eq!(m, Message::CaptureOn);
            ch.authenticated();
            ch.send(&Message::Outcome(Outcome::Unknown)).unwrap();
            let m = ch.recv().unwrap();
            assert!(matches!(m, Message::State(s) if s.len() == 1 << 20));
        });
        let mut ch = Channel::connect(&addr, &key(1)).unwrap();
        assert!(ch.sealed());
        ch.send(&Message::CaptureOn).unwrap();
        assert_eq!(ch.recv().unwrap(), Message::Outcome(Outcome::Unknown));
        ch.send(&Message::State(&vec![3u8; 1 << 20])).unwrap();
        t.join().unwrap();
    }

    /// Records of every size, sent back to back, come out whole and in
    /// order through the read-ahead buffer (small ones several to a
    /// read, large ones straight into place, some straddling both).
    #[test]
    fn records_read_ahead_come_whole_and_in_order() {
        let sizes: Vec<usize> = (0..60)
            .map(|i| [1, 17, 4000, READ_AHEAD - 9, READ_AHEAD + 3, 300_000][i % 6] + i)
            .collect();
        let expect = sizes.clone();
        let (addr, t) = serve(move |s| {
            let mut ch = Channel::accept(s, &key(1)).unwrap();
            ch.authenticated();
            for (i, &n) in expect.iter().enumerate() {
                match ch.recv().unwrap() {
                    Message::State(b) => {
                        assert_eq!(b.len(), n, "record {i}");
                        assert!(b.iter().all(|&x| x == i as u8), "record {i}");
                    }
                    m => panic!("record {i}: {m:?}"),
                }
                assert_eq!(ch.recv().unwrap(), Message::Sync { round: i as u32 });
            }
        });
        let mut ch = Channel::connect(&addr, &key(1)).unwrap();
        for (i, &n) in sizes.iter().enumerate() {
            ch.send(&Message::State(&vec![i as u8; n])).unwrap();
            ch.send(&Message::Sync { round: i as u32 }).unwrap();
        }
        t.join().unwrap();
    }

    #[test]
    fn another_key_fails_and_the_responder_says_nothing() {
        let (addr, t) = serve(|s| Channel::accept(s, &key(1)).map(|_| ()));
        let e = Channel::connect(&addr, &key(2)).unwrap_err();
        assert!(matches!(e, ChannelError::Auth), "{e}");
        assert!(matches!(t.join().unwrap(), Err(ChannelError::Auth)));
    }

    #[test]
    fn insecure_and_keyed_sides_refuse_each_other_by_name() {
        let (addr, t) = serve(|s| Channel::accept(s, &key(1)).map(|_| ()));
        let e = Channel::connect(&addr, &Credentials::Insecure).unwrap_err();
        assert!(e.to_string().contains("requires a key"), "{e}");
        let e = t.join().unwrap().unwrap_err();
        assert!(e.to_string().contains("runs --insecure"), "{e}");
        // Both insecure: plain records.
        let (addr, t) = serve(|s| {
            let mut ch = Channel::accept(s, &Credentials::Insecure).unwrap();
            assert!(!ch.sealed());
            ch.recv().map(|m| m.name()).unwrap()
        });
        let mut ch = Channel::connect(&addr, &Credentials::Insecure).unwrap();
        ch.send(&Message::CaptureOn).unwrap();
        assert_eq!(t.join().unwrap(), "CaptureOn");
    }

    #[test]
    fn other_versions_and_strangers_are_named() {
        let (addr, t) = serve(|s| Channel::accept(s, &key(1)).map(|_| ()));
        let mut s = TcpStream::connect(&addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
        assert!(matches!(t.join().unwrap(), Err(ChannelError::NotFerry)));
        let (addr, t) = serve(|mut s| {
            let mut p = preamble(Mode::Noise);
            p[4] = 9;
            s.write_all(&p).unwrap();
            let mut b = [0u8; 8];
            let _ = s.read_exact(&mut b);
        });
        let e = Channel::connect(&addr, &key(1)).unwrap_err();
        assert!(e.to_string().contains("version 9"), "{e}");
        t.join().unwrap();
    }

    #[test]
    fn a_silent_peer_times_out_in_the_handshake() {
        let (addr, t) = serve(|s| {
            let t = Instant::now();
            let r = Channel::accept(s, &key(1)).map(|_| ());
            (r, t.elapsed())
        });
        let _idle = TcpStream::connect(&addr).unwrap();
        let (r, took) = t.join().unwrap();
        assert!(matches!(r, Err(ChannelError::Timeout(_))), "{r:?}");
        assert!(took >= HANDSHAKE_TIMEOUT - Duration::from_millis(100));
    }

    #[test]
    fn first_records_are_capped_until_the_peer_is_vouched_for() {
        let (addr, t) = serve(|s| {
            let mut ch = Channel::accept(s, &key(1)).unwrap();
            ch.recv().map(|m| m.name())
        });
        let mut ch = Channel::connect(&addr, &key(1)).unwrap();
        ch.send(&Message::State(&vec![0u8; MAX_FIRST_RECORD]))
            .unwrap();
        assert!(matches!(
            t.join().unwrap(),
            Err(ChannelError::TooLong { .. })
        ));
    }

    /// A relay that changes one byte of the stream: the record does not
    /// open. One that replays a record, or drops one: neither does the
    /// next (the counter moved on).
    #[test]
    fn altered_replayed_and_dropped_records_do_not_open() {
        for attack in ["flip", "replay", "drop"] {
            let (addr, t) = serve(move |s| {
                let mut ch = Channel::accept(s, &key(1)).unwrap();
                ch.authenticated();
                let first = ch.recv().map(|m| m.name().to_string());
                let second = ch.recv().map(|m| m.name().to_string());
                (first, second)
            });
            // Relay: forward the handshake, then tamper with records.
            let relay = TcpListener::bind("127.0.0.1:0").unwrap();
            let raddr = relay.local_addr().unwrap().to_string();
            let rt = std::thread::spawn(move || {
                let (mut c, _) = relay.accept().unwrap();
                let mut d = TcpStream::connect(&addr).unwrap();
                let mut hs = [0u8; PREAMBLE_LEN + HANDSHAKE_LEN];
                c.read_exact(&mut hs[..PREAMBLE_LEN]).unwrap();
                d.write_all(&hs[..PREAMBLE_LEN]).unwrap();
                let mut back = [0u8; PREAMBLE_LEN + HANDSHAKE_LEN];
                d.read_exact(&mut back[..PREAMBLE_LEN]).unwrap();
                c.write_all(&back[..PREAMBLE_LEN]).unwrap();
                c.read_exact(&mut hs[PREAMBLE_LEN..]).unwrap();
                d.write_all(&hs[PREAMBLE_LEN..]).unwrap();
                d.read_exact(&mut back[PREAMBLE_LEN..]).unwrap();
                c.write_all(&back[PREAMBLE_LEN..]).unwrap();
                // Two records of one byte (tag) + 16: 4 + 17 each.
                let mut r1 = [0u8; 21];
                let mut r2 = [0u8; 21];
                c.read_exact(&mut r1).unwrap();
                c.read_exact(&mut r2).unwrap();
                match attack {
                    "flip" => {
                        r1[10] ^= 1;
                        d.write_all(&r1).unwrap();
                        d.write_all(&r2).unwrap();
                    }
                    "replay" => {
                        d.write_all(&r1).unwrap();
                        d.write_all(&r1).unwrap();
                    }
                    _ => d.write_all(&r2).unwrap(),
                }
                let _ = d.shutdown(std::net::Shutdown::Write);
            });
            let mut ch = Channel::connect(&raddr, &key(1)).unwrap();
            ch.send(&Message::CaptureOn).unwrap();
            ch.send(&Message::CaptureOn).unwrap();
            rt.join().unwrap();
            let (first, second) = t.join().unwrap();
            match attack {
                "flip" | "drop" => assert!(
                    matches!(first, Err(ChannelError::Record)),
                    "{attack}: {first:?}"
                ),
                _ => {
                    assert_eq!(first.unwrap(), "CaptureOn");
                    assert!(
                        matches!(second, Err(ChannelError::Record)),
                        "{attack}: {second:?}"
                    );
                }
            }
        }
    }

    #[test]
    fn an_exported_channel_goes_on_in_other_hands() {
        let (addr, t) = serve(|s| {
            let mut ch = Channel::accept(s, &key(1)).unwrap();
            assert_eq!(ch.recv().unwrap(), Message::CaptureOn);
            let (stream, keys) = ch.export().unwrap();
            let mut ch = Channel::from_parts(stream, &keys).unwrap();
            ch.send(&Message::CaptureOn).unwrap();
            ch.recv().map(|m| m.name())
        });
        let mut ch = Channel::connect(&addr, &key(1)).unwrap();
        ch.send(&Message::CaptureOn).unwrap();
        assert_eq!(ch.recv().unwrap(), Message::CaptureOn);
        ch.send(&Message::StartCapture).unwrap();
        assert_eq!(t.join().unwrap().unwrap(), "StartCapture");
    }

    /// A peer that sends on before it is answered (bytes read ahead past
    /// the message that decides the hand-off) is refused, by name, rather
    /// than handed on with bytes the new owner would never see.
    #[test]
    fn a_channel_with_bytes_read_ahead_is_not_handed_on() {
        let (addr, t) = serve(|s| {
            let mut ch = Channel::accept(s, &key(1)).unwrap();
            ch.authenticated();
            // Both records are in the socket by now: one read takes both.
            std::thread::sleep(Duration::from_millis(200));
            assert_eq!(ch.recv().unwrap(), Message::CaptureOn);
            ch.export().map(|_| ()).unwrap_err().to_string()
        });
        let mut ch = Channel::connect(&addr, &key(1)).unwrap();
        ch.send(&Message::CaptureOn).unwrap();
        ch.send(&Message::StartCapture).unwrap();
        let e = t.join().unwrap();
        assert!(e.contains("bytes sent before the answer to Open"), "{e}");
    }

    #[test]
    fn a_deadline_bounds_every_read() {
        let (addr, t) = serve(|s| {
            let ch = Channel::accept(s, &key(1)).unwrap();
            std::thread::sleep(Duration::from_millis(600));
            drop(ch);
        });
        let mut ch = Channel::connect(&addr, &key(1)).unwrap();
        ch.set_deadline(Some(Instant::now() + Duration::from_millis(100)));
        let t0 = Instant::now();
        assert!(matches!(ch.recv(), Err(ChannelError::Timeout(_))));
        assert!(t0.elapsed() < Duration::from_millis(500));
        t.join().unwrap();
    }
}
