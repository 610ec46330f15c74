//! The migration protocol's messages and their one encoding.
//!
//! A message is a tag byte and its fields, little-endian, in order.
//! Variable-length fields carry a `u32` length, and each is bounded on its
//! own (a string by [`MAX_STRING`], the state by [`MAX_STATE`], ...);
//! decoding checks every length against what is left of the record and
//! refuses trailing bytes, so a message decodes whole or not at all.
//!
//! Pages travel as a [`Message::Pages`] whose body is `count u32` and then
//! `count` pairs of `gpa u64 | page[4096]`; [`PageWriter`] builds one
//! straight from guest memory into the record buffer, and the receiver
//! reads the pages where they lie in its own record buffer.
//!
//! The VM's state (`State`) is the snapshot format's archived `VmState`
//! (rkyv), validated by the snapshot module: a migration and a snapshot
//! carry the same bytes.

use crate::snapshot::{ConfigState, NetConfigState};

/// A guest page.
pub const PAGE: usize = 4096;
/// Most pages in one [`Message::Pages`].
pub const PAGES_PER_MESSAGE: u32 = 256;
/// Longest string field (reasons, names, the image path).
pub const MAX_STRING: usize = 4096;
/// Largest archived VM state (a full receive backlog is 64 MiB).
pub const MAX_STATE: usize = 96 << 20;

/// Why a message did not decode.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// The record ended inside a field.
    #[error("message cut short in {0}")]
    Short(&'static str),
    /// A length over its bound.
    #[error("{what} of {len} bytes (at most {max})")]
    TooLong {
        /// Which field.
        what: &'static str,
        /// Its length.
        len: usize,
        /// The bound.
        max: usize,
    },
    /// A tag or enum value that does not exist.
    #[error("unknown {what} {value}")]
    Unknown {
        /// Which enum.
        what: &'static str,
        /// The value found.
        value: u8,
    },
    /// Bytes after the message's last field.
    #[error("{0} bytes after the end of the message")]
    Trailing(usize),
    /// A field whose value makes no sense.
    #[error("{0}")]
    Invalid(String),
}

/// Reads fields off a record, bounds-checked.
#[derive(Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Reader { buf }
    }

    /// The next `n` bytes.
    pub fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.buf.len() < n {
            return Err(WireError::Short(what));
        }
        let (a, b) = self.buf.split_at(n);
        self.buf = b;
        Ok(a)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        Ok(self.take(N, what)?.try_into().expect("N bytes"))
    }

    /// A `u8`.
    pub fn u8(&mut self, what: &'static str) -> Result<u8, WireError> {
        Ok(self.array::<1>(what)?[0])
    }

    /// A `u32`.
    pub fn u32(&mut self, what: &'static str) -> Result<u32, WireError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    /// A `u64`.
    pub fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length-prefixed byte string of at most `max` bytes.
    pub fn bytes(&mut self, what: &'static str, max: usize) -> Result<&'a [u8], WireError> {
        let len = self.u32(what)? as usize;
        if len > max {
            return Err(WireError::TooLong { what, len, max });
        }
        self.take(len, what)
    }

    /// A length-prefixed UTF-8 string of at most [`MAX_STRING`] bytes.
    pub fn string(&mut self, what: &'static str) -> Result<String, WireError> {
        let b = self.bytes(what, MAX_STRING)?;
        String::from_utf8(b.to_vec())
            .map_err(|_| WireError::Invalid(format!("{what} is not UTF-8")))
    }

    /// An optional value: a presence byte (0 or 1), then the value.
    pub fn option<T>(
        &mut self,
        what: &'static str,
        f: impl FnOnce(&mut Self) -> Result<T, WireError>,
    ) -> Result<Option<T>, WireError> {
        match self.u8(what)? {
            0 => Ok(None),
            1 => f(self).map(Some),
            value => Err(WireError::Unknown { what, value }),
        }
    }

    /// Fails unless everything was read.
    pub fn finish(self) -> Result<(), WireError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(WireError::Trailing(self.buf.len()))
        }
    }
}

/// Appends fields to a record.
#[derive(Debug)]
pub struct Writer<'a>(pub &'a mut Vec<u8>);

impl Writer<'_> {
    /// A `u8`.
    pub fn u8(&mut self, v: u8) {
        self.0.push(v);
    }
    /// A `u32`.
    pub fn u32(&mut self, v: u32) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// A `u64`.
    pub fn u64(&mut self, v: u64) {
        self.0.extend_from_slice(&v.to_le_bytes());
    }
    /// Raw bytes, no length.
    pub fn raw(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    /// A length-prefixed byte string.
    pub fn bytes(&mut self, b: &[u8]) {
        self.u32(u32::try_from(b.len()).expect("fields are far below 4 GiB"));
        self.raw(b);
    }
    /// A string, cut to [`MAX_STRING`] bytes (at a character boundary).
    pub fn string(&mut self, s: &str) {
        let mut end = s.len().min(MAX_STRING);
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        self.bytes(&s.as_bytes()[..end]);
    }
    /// An optional value.
    pub fn option<T>(&mut self, v: Option<&T>, f: impl FnOnce(&mut Self, &T)) {
        match v {
            None => self.u8(0),
            Some(v) => {
                self.u8(1);
                f(self, v);
            }
        }
    }
}

pub use crate::id::{SessionId, VmId, random_bytes};

/// What a source asks for: a migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Open {
    /// This attempt's name.
    pub session: SessionId,
    /// The VM.
    pub vm: VmId,
    /// The generation it will run at over there (its current one + 1).
    pub generation: u64,
    /// What the destination must build.
    pub config: ConfigState,
    /// The CPU features the guest booted with (CPUID feature words; a
    /// destination that lacks one refuses the VM).
    pub cpu: [u32; 7],
    /// How long the destination waits for Commit once READY, in ms.
    pub commit_wait_ms: u32,
    /// The source host's name (for messages).
    pub source: String,
}

/// A resolve query: "session S, generation G: run it or tell me".
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resolve {
    /// The session.
    pub session: SessionId,
    /// The VM.
    pub vm: VmId,
    /// The generation the source committed.
    pub generation: u64,
}

/// What became of a session, as the destination knows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Committed: the VM runs here at this generation.
    Running {
        /// Its generation.
        generation: u64,
    },
    /// The session ended without a commit: the VM never ran here and
    /// never will.
    Aborted {
        /// Why.
        reason: String,
    },
    /// The session committed and the VM's process has ended since: the VM
    /// runs nowhere.
    Died {
        /// What is known of the end.
        reason: String,
    },
    /// No record of the session (the receiver was restarted).
    Unknown,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Outcome::Running { generation } => {
                write!(f, "running there at generation {generation}")
            }
            Outcome::Aborted { reason } => {
                write!(f, "aborted there ({reason}); it never ran there")
            }
            Outcome::Died { reason } => write!(f, "it ran there and died ({reason})"),
            Outcome::Unknown => f.write_str("the receiver there has no record of the session"),
        }
    }
}

/// The destination's confirmation that the VM runs there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Committed {
    /// The generation it runs at.
    pub generation: u64,
    /// From reading Commit to the vCPU running, in µs.
    pub commit_to_running_us: u64,
    /// Frames the destination captured while the VM was in flight.
    pub captured: u64,
    /// Captured frames dropped as ones the source had read.
    pub duplicates: u64,
}

/// A batch of pages as received: `count` pairs of gpa and page.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Pages<'a> {
    count: u32,
    body: &'a [u8],
}

impl std::fmt::Debug for Pages<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Pages({})", self.count)
    }
}

impl<'a> Pages<'a> {
    /// How many pages.
    pub fn len(&self) -> usize {
        self.count as usize
    }
    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }
    /// The pages: (guest-physical address, its 4096 bytes).
    pub fn iter(&self) -> impl Iterator<Item = (u64, &'a [u8])> + 'a {
        self.body.chunks_exact(8 + PAGE).map(|c| {
            (
                u64::from_le_bytes(c[..8].try_into().expect("8 bytes")),
                &c[8..],
            )
        })
    }
}

/// Every message of the protocol.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Message<'a> {
    /// Source: migrate this VM here.
    Open(Open),
    /// Destination: admitted; the VM's process is set up (`host` names the
    /// destination for messages).
    Admitted {
        /// The destination host's name.
        host: String,
    },
    /// Destination: not admitted, and why.
    Refused {
        /// Why.
        reason: String,
    },
    /// Source: memory.
    Pages(Pages<'a>),
    /// Source: start capturing the VM's frames.
    StartCapture,
    /// Destination: capturing.
    CaptureOn,
    /// Source: the VM stops now; the stop-and-copy follows (the last pages,
    /// the state, Done and Commit). The destination takes its CPU from here
    /// on, not before: until then it is background work for its host.
    Pausing,
    /// Source: the paused VM's state (archived `VmState`) but the rest of
    /// its vCPU's (left empty), which follows in [`Message::VcpuRest`]:
    /// the destination loads this while the source reads that.
    State(&'a [u8]),
    /// Source: the rest of the vCPU's state (archived `VcpuRest`).
    VcpuRest(&'a [u8]),
    /// Source: run it there.
    Commit {
        /// The session.
        session: SessionId,
        /// The generation it runs at there.
        generation: u64,
    },
    /// Destination: it runs here.
    Committed(Committed),
    /// Source: what became of a session? (Carries the Commit: a session
    /// still READY commits.)
    Resolve(Resolve),
    /// Destination: the answer to [`Message::Resolve`].
    Outcome(Outcome),
    /// Either side: giving up, and why.
    Abort {
        /// Why.
        reason: String,
    },
    /// Source: the last pages of the stop-and-copy are all sent.
    Done,
    /// Source: say [`Message::Synced`] once everything before this is
    /// taken (sent after each pre-copy round that follows capture: the
    /// source pauses the VM only once the destination has caught up, so
    /// the state does not queue behind a round's pages in the pause).
    Sync {
        /// The round it follows.
        round: u32,
    },
    /// Destination: everything before [`Message::Sync`] `round` is in.
    Synced {
        /// The round.
        round: u32,
    },
}

/// Message tags.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tag {
    Open = 1,
    Admitted = 2,
    Refused = 3,
    Pages = 4,
    StartCapture = 5,
    CaptureOn = 6,
    State = 7,
    // 8 was Ready (protocol 3: the source waited for it before Commit).
    Commit = 9,
    Committed = 10,
    Resolve = 11,
    Outcome = 12,
    Abort = 13,
    Done = 14,
    Sync = 15,
    Synced = 16,
    Pausing = 17,
    VcpuRest = 18,
}

impl Tag {
    const ALL: [Tag; 17] = [
        Tag::Open,
        Tag::Admitted,
        Tag::Refused,
        Tag::Pages,
        Tag::StartCapture,
        Tag::CaptureOn,
        Tag::State,
        Tag::Commit,
        Tag::Committed,
        Tag::Resolve,
        Tag::Outcome,
        Tag::Abort,
        Tag::Done,
        Tag::Sync,
        Tag::Synced,
        Tag::Pausing,
        Tag::VcpuRest,
    ];
}

fn put_config(w: &mut Writer, c: &ConfigState) {
    w.u64(c.memory);
    w.u32(c.cpus);
    w.string(&c.image);
    w.u8(c.kernel);
    w.option(c.net.as_ref(), |w, n| {
        w.raw(&n.mac);
        w.raw(&n.ip);
        w.u8(n.prefix);
        w.option(n.gateway.as_ref(), |w, g| w.raw(g));
    });
}

fn get_config(r: &mut Reader) -> Result<ConfigState, WireError> {
    Ok(ConfigState {
        memory: r.u64("memory size")?,
        cpus: r.u32("vCPU count")?,
        image: r.string("image")?,
        kernel: match r.u8("kernel kind")? {
            k @ (0 | 1) => k,
            k => return Err(WireError::Invalid(format!("kernel kind {k}"))),
        },
        net: r.option("network card", |r| {
            let mac = r.array("MAC")?;
            let ip = r.array("IP address")?;
            let prefix = r.u8("prefix length")?;
            if prefix > 32 {
                return Err(WireError::Invalid(format!("prefix length {prefix}")));
            }
            let gateway = r.option("gateway", |r| r.array("gateway"))?;
            Ok(NetConfigState {
                mac,
                ip,
                prefix,
                gateway,
            })
        })?,
    })
}

fn put_outcome(w: &mut Writer, o: &Outcome) {
    match o {
        Outcome::Running { generation } => {
            w.u8(1);
            w.u64(*generation);
        }
        Outcome::Aborted { reason } => {
            w.u8(2);
            w.string(reason);
        }
        Outcome::Died { reason } => {
            w.u8(3);
            w.string(reason);
        }
        Outcome::Unknown => w.u8(4),
    }
}

fn get_outcome(r: &mut Reader) -> Result<Outcome, WireError> {
    Ok(match r.u8("outcome")? {
        1 => Outcome::Running {
            generation: r.u64("generation")?,
        },
        2 => Outcome::Aborted {
            reason: r.string("reason")?,
        },
        3 => Outcome::Died {
            reason: r.string("reason")?,
        },
        4 => Outcome::Unknown,
        value => {
            return Err(WireError::Unknown {
                what: "outcome",
                value,
            });
        }
    })
}

impl<'a> Message<'a> {
    /// Appends the encoded message to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        let mut w = Writer(out);
        match self {
            Message::Open(o) => {
                w.u8(Tag::Open as u8);
                w.raw(&o.session.0);
                w.raw(&o.vm.0);
                w.u64(o.generation);
                put_config(&mut w, &o.config);
                for x in o.cpu {
                    w.u32(x);
                }
                w.u32(o.commit_wait_ms);
                w.string(&o.source);
            }
            Message::Admitted { host } => {
                w.u8(Tag::Admitted as u8);
                w.string(host);
            }
            Message::Refused { reason } => {
                w.u8(Tag::Refused as u8);
                w.string(reason);
            }
            Message::Pages(p) => {
                w.u8(Tag::Pages as u8);
                w.u32(p.count);
                w.raw(p.body);
            }
            Message::StartCapture => w.u8(Tag::StartCapture as u8),
            Message::CaptureOn => w.u8(Tag::CaptureOn as u8),
            Message::Pausing => w.u8(Tag::Pausing as u8),
            Message::State(s) => {
                w.u8(Tag::State as u8);
                w.bytes(s);
            }
            Message::VcpuRest(s) => {
                w.u8(Tag::VcpuRest as u8);
                w.bytes(s);
            }
            Message::Sync { round } => {
                w.u8(Tag::Sync as u8);
                w.u32(*round);
            }
            Message::Synced { round } => {
                w.u8(Tag::Synced as u8);
                w.u32(*round);
            }
            Message::Commit {
                session,
                generation,
            } => {
                w.u8(Tag::Commit as u8);
                w.raw(&session.0);
                w.u64(*generation);
            }
            Message::Committed(c) => {
                w.u8(Tag::Committed as u8);
                w.u64(c.generation);
                w.u64(c.commit_to_running_us);
                w.u64(c.captured);
                w.u64(c.duplicates);
            }
            Message::Resolve(q) => {
                w.u8(Tag::Resolve as u8);
                w.raw(&q.session.0);
                w.raw(&q.vm.0);
                w.u64(q.generation);
            }
            Message::Outcome(o) => {
                w.u8(Tag::Outcome as u8);
                put_outcome(&mut w, o);
            }
            Message::Abort { reason } => {
                w.u8(Tag::Abort as u8);
                w.string(reason);
            }
            Message::Done => w.u8(Tag::Done as u8),
        }
    }

    /// Decodes one whole message.
    pub fn decode(buf: &'a [u8]) -> Result<Message<'a>, WireError> {
        let mut r = Reader::new(buf);
        let tag = r.u8("message tag")?;
        let tag = Tag::ALL
            .into_iter()
            .find(|t| *t as u8 == tag)
            .ok_or(WireError::Unknown {
                what: "message tag",
                value: tag,
            })?;
        let m = match tag {
            Tag::Open => Message::Open(Open {
                session: SessionId(r.array("session")?),
                vm: VmId(r.array("VM identity")?),
                generation: r.u64("generation")?,
                config: get_config(&mut r)?,
                cpu: {
                    let mut c = [0u32; 7];
                    for x in c.iter_mut() {
                        *x = r.u32("CPU features")?;
                    }
                    c
                },
                commit_wait_ms: r.u32("commit wait")?,
                source: r.string("source host")?,
            }),
            Tag::Admitted => Message::Admitted {
                host: r.string("host")?,
            },
            Tag::Refused => Message::Refused {
                reason: r.string("reason")?,
            },
            Tag::Pages => {
                let count = r.u32("page count")?;
                if count > PAGES_PER_MESSAGE {
                    return Err(WireError::TooLong {
                        what: "page batch",
                        len: count as usize,
                        max: PAGES_PER_MESSAGE as usize,
                    });
                }
                let body = r.take(count as usize * (8 + PAGE), "pages")?;
                let pages = Pages { count, body };
                if let Some((gpa, _)) = pages.iter().find(|(g, _)| g % PAGE as u64 != 0) {
                    return Err(WireError::Invalid(format!(
                        "page address {gpa:#x} is not page-aligned"
                    )));
                }
                Message::Pages(pages)
            }
            Tag::StartCapture => Message::StartCapture,
            Tag::CaptureOn => Message::CaptureOn,
            Tag::Pausing => Message::Pausing,
            Tag::State => Message::State(r.bytes("VM state", MAX_STATE)?),
            Tag::VcpuRest => Message::VcpuRest(r.bytes("vCPU state", MAX_STATE)?),
            Tag::Commit => Message::Commit {
                session: SessionId(r.array("session")?),
                generation: r.u64("generation")?,
            },
            Tag::Committed => Message::Committed(Committed {
                generation: r.u64("generation")?,
                commit_to_running_us: r.u64("commit to running")?,
                captured: r.u64("captured")?,
                duplicates: r.u64("duplicates")?,
            }),
            Tag::Resolve => Message::Resolve(Resolve {
                session: SessionId(r.array("session")?),
                vm: VmId(r.array("VM identity")?),
                generation: r.u64("generation")?,
            }),
            Tag::Outcome => Message::Outcome(get_outcome(&mut r)?),
            Tag::Abort => Message::Abort {
                reason: r.string("reason")?,
            },
            Tag::Done => Message::Done,
            Tag::Sync => Message::Sync {
                round: r.u32("round")?,
            },
            Tag::Synced => Message::Synced {
                round: r.u32("round")?,
            },
        };
        r.finish()?;
        Ok(m)
    }

    /// The message's name, for errors ("expected CaptureOn, got Pages").
    pub fn name(&self) -> &'static str {
        match self {
            Message::Open(_) => "Open",
            Message::Admitted { .. } => "Admitted",
            Message::Refused { .. } => "Refused",
            Message::Pages(_) => "Pages",
            Message::StartCapture => "StartCapture",
            Message::CaptureOn => "CaptureOn",
            Message::Pausing => "Pausing",
            Message::State(_) => "State",
            Message::VcpuRest(_) => "VcpuRest",
            Message::Commit { .. } => "Commit",
            Message::Committed(_) => "Committed",
            Message::Resolve(_) => "Resolve",
            Message::Outcome(_) => "Outcome",
            Message::Abort { .. } => "Abort",
            Message::Done => "Done",
            Message::Sync { .. } => "Sync",
            Message::Synced { .. } => "Synced",
        }
    }
}

/// Builds a [`Message::Pages`] in place, from byte `start` of a buffer
/// that is reused from record to record: the tag and count first, then
/// each page copied straight from guest memory into its slot. The buffer
/// only grows (so a page's slot is not zeroed before it is filled);
/// [`PageWriter::end`] says where the message ends.
#[derive(Debug)]
pub struct PageWriter<'b> {
    out: &'b mut Vec<u8>,
    count_at: usize,
    at: usize,
    count: u32,
}

impl<'b> PageWriter<'b> {
    /// Starts a batch at byte `start` of `out` (whatever lies beyond it is
    /// overwritten).
    pub fn new(out: &'b mut Vec<u8>, start: usize) -> Self {
        if out.len() < start + 5 {
            out.resize(start + 5, 0);
        }
        out[start] = Tag::Pages as u8;
        out[start + 1..start + 5].copy_from_slice(&0u32.to_le_bytes());
        PageWriter {
            out,
            count_at: start + 1,
            at: start + 5,
            count: 0,
        }
    }

    /// Whether the batch is full.
    pub fn full(&self) -> bool {
        self.count == PAGES_PER_MESSAGE
    }

    /// Pages in the batch.
    pub fn len(&self) -> u32 {
        self.count
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Where the message ends in the buffer.
    pub fn end(&self) -> usize {
        self.at
    }

    /// Adds page `gpa`: `fill` writes its 4096 bytes and returns whether to
    /// keep it (false drops it again: a zero page in round 0, say).
    pub fn push<E>(
        &mut self,
        gpa: u64,
        fill: impl FnOnce(&mut [u8]) -> Result<bool, E>,
    ) -> Result<(), E> {
        debug_assert!(!self.full());
        let at = self.at;
        if self.out.len() < at + 8 + PAGE {
            self.out.resize(at + 8 + PAGE, 0);
        }
        self.out[at..at + 8].copy_from_slice(&gpa.to_le_bytes());
        if fill(&mut self.out[at + 8..at + 8 + PAGE])? {
            self.count += 1;
            self.at += 8 + PAGE;
            self.out[self.count_at..self.count_at + 4].copy_from_slice(&self.count.to_le_bytes());
        }
        Ok(())
    }
}

/// Whether a page is all zeros.
pub fn is_zero_page(page: &[u8]) -> bool {
    static ZERO: [u8; PAGE] = [0; PAGE];
    page == &ZERO[..page.len().min(PAGE)]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config() -> ConfigState {
        ConfigState {
            memory: 64 << 20,
            cpus: 1,
            image: "images/out/stream".into(),
            kernel: 0,
            net: Some(NetConfigState {
                mac: [2, 0xbf, 10, 77, 0, 10],
                ip: [10, 77, 0, 10],
                prefix: 24,
                gateway: Some([10, 77, 0, 1]),
            }),
        }
    }

    fn round_trip(m: Message) {
        let mut buf = Vec::new();
        m.encode(&mut buf);
        assert_eq!(Message::decode(&buf).unwrap(), m);
        // Every cut is refused, and so are trailing bytes.
        for cut in 0..buf.len() {
            assert!(
                Message::decode(&buf[..cut]).is_err(),
                "{} cut at {cut}",
                m.name()
            );
        }
        buf.push(0);
        assert!(matches!(Message::decode(&buf), Err(WireError::Trailing(1))));
    }

    #[test]
    fn every_message_round_trips_and_cut_ones_are_refused() {
        let session = SessionId([7; 16]);
        let vm = VmId([9; 16]);
        let page = vec![5u8; PAGE];
        // A reused buffer: longer than the message, full of old bytes.
        let mut pages = vec![0xEE; 3 * (8 + PAGE) + 100];
        let mut w = PageWriter::new(&mut pages, 0);
        w.push::<()>(0x1000, |p| {
            p.copy_from_slice(&page);
            Ok(true)
        })
        .unwrap();
        w.push::<()>(0x2000, |_| Ok(false)).unwrap();
        w.push::<()>(0x3000, |p| {
            p[0] = 1;
            Ok(true)
        })
        .unwrap();
        assert_eq!(w.len(), 2);
        let end = w.end();
        assert_eq!(end, 5 + 2 * (8 + PAGE));
        let Message::Pages(p) = Message::decode(&pages[..end]).unwrap() else {
            panic!("not pages")
        };
        let got: Vec<_> = p.iter().map(|(g, d)| (g, d.to_vec())).collect();
        assert_eq!(got[0], (0x1000, page.clone()));
        assert_eq!(got[1].0, 0x3000);
        assert_eq!(got[1].1[0], 1);
        for m in [
            Message::Open(Open {
                session,
                vm,
                generation: 3,
                config: config(),
                cpu: [1, 2, 3, 4, 5, 6, 7],
                commit_wait_ms: 2000,
                source: "hostA".into(),
            }),
            Message::Open(Open {
                session,
                vm,
                generation: 1,
                config: ConfigState {
                    net: None,
                    ..config()
                },
                cpu: [0; 7],
                commit_wait_ms: 1,
                source: String::new(),
            }),
            Message::Admitted { host: "b".into() },
            Message::Refused {
                reason: "no".into(),
            },
            Message::Pages(p),
            Message::StartCapture,
            Message::CaptureOn,
            Message::Pausing,
            Message::State(&[1, 2, 3]),
            Message::VcpuRest(&[4, 5]),
            Message::Sync { round: 3 },
            Message::Synced { round: u32::MAX },
            Message::Commit {
                session,
                generation: 4,
            },
            Message::Committed(Committed {
                generation: 4,
                commit_to_running_us: 300,
                captured: 2,
                duplicates: 1,
            }),
            Message::Resolve(Resolve {
                session,
                vm,
                generation: 4,
            }),
            Message::Outcome(Outcome::Running { generation: 4 }),
            Message::Outcome(Outcome::Aborted {
                reason: "cut".into(),
            }),
            Message::Outcome(Outcome::Died {
                reason: "killed".into(),
            }),
            Message::Outcome(Outcome::Unknown),
            Message::Abort { reason: "x".into() },
        ] {
            round_trip(m);
        }
    }

    #[test]
    fn bad_values_are_refused_by_name() {
        assert!(matches!(
            Message::decode(&[99]),
            Err(WireError::Unknown { value: 99, .. })
        ));
        assert!(Message::decode(&[]).is_err());
        // A page batch over the bound, and an unaligned page.
        let mut b = vec![Tag::Pages as u8];
        b.extend_from_slice(&(PAGES_PER_MESSAGE + 1).to_le_bytes());
        assert!(matches!(
            Message::decode(&b),
            Err(WireError::TooLong { .. })
        ));
        let mut b = vec![Tag::Pages as u8];
        b.extend_from_slice(&1u32.to_le_bytes());
        b.extend_from_slice(&0x1001u64.to_le_bytes());
        b.extend_from_slice(&[0; PAGE]);
        assert!(matches!(Message::decode(&b), Err(WireError::Invalid(_))));
        // A string longer than its bound.
        let mut b = vec![Tag::Abort as u8];
        b.extend_from_slice(&(MAX_STRING as u32 + 1).to_le_bytes());
        b.extend_from_slice(&vec![b'a'; MAX_STRING + 1]);
        assert!(matches!(
            Message::decode(&b),
            Err(WireError::TooLong { .. })
        ));
        // A presence byte that is neither 0 nor 1.
        let mut b = Vec::new();
        Message::Open(Open {
            session: SessionId([0; 16]),
            vm: VmId([0; 16]),
            generation: 1,
            config: ConfigState {
                net: None,
                ..config()
            },
            cpu: [0; 7],
            commit_wait_ms: 1,
            source: String::new(),
        })
        .encode(&mut b);
        let kernel = 1 + 16 + 16 + 8 + 8 + 4 + 4 + "images/out/stream".len();
        let presence = kernel + 1;
        let mut bad = b.clone();
        bad[presence] = 2;
        assert!(matches!(
            Message::decode(&bad),
            Err(WireError::Unknown { value: 2, .. })
        ));
        // A kernel kind that is neither Ferry's runtime nor RustyHermit.
        b[kernel] = 2;
        assert!(matches!(Message::decode(&b), Err(WireError::Invalid(_))));
    }

    #[test]
    fn zero_pages_are_told_apart() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero_page(&p));
        p[PAGE - 1] = 1;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn vm_ids_print_and_parse_as_hex() {
        let id = VmId([0xab; 16]);
        let s = id.to_string();
        assert_eq!(s.len(), 32);
        assert_eq!(s.parse::<VmId>().unwrap(), id);
        assert!("xyz".parse::<VmId>().is_err());
        assert_ne!(VmId::random(), VmId::random());
    }
}
