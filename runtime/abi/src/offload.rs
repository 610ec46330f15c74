//! What Ferry's virtio-net card offloads from the guest's TCP stack, as
//! the guest driver does it and the VMM checks it. Every guest instruction
//! is emulated on PVM (docs/pvm-emulation.md) and smoltcp spends about a
//! thousand of them on each segment it sends or takes in, whatever its
//! size, so the driver makes fewer, larger segments:
//!
//! - TCP segmentation offload: smoltcp has no notion of TSO (it never sends
//!   more than the MSS its peer announced). So the driver keeps the MSS
//!   from each received SYN in an [`MssTable`] (for the virtio-net header's
//!   `gso_size`) and shows smoltcp a larger one; on the way out, the MSS
//!   smoltcp announces (derived from its large MTU) is clamped to the
//!   link's, and the device cuts the large frames.
//! - ACK coalescing: of two pure ACKs of one connection waiting in the
//!   receive ring, the older is dropped when the newer says all it says
//!   ([`supersedes`]), as a NIC's receive offload would merge them.
//!
//! Frames here are Ethernet frames without the virtio-net header; only
//! IPv4 TCP is touched.

/// virtio-net header `flags`: the device completes the checksum.
pub const NEEDS_CSUM: u8 = 1;
/// virtio-net header `gso_type`: TCP over IPv4.
pub const GSO_TCPV4: u8 = 1;
/// The smallest `gso_size` either side uses or accepts (Linux's
/// TCP_MIN_MSS).
pub const MIN_GSO_SIZE: u16 = 88;
/// RFC 9293's MSS for a peer that announced none, and the driver's for a
/// connection it has no entry for.
pub const DEFAULT_MSS: u16 = 536;

const TCP_SYN: u8 = 0x02;

/// Where the TCP header of an IPv4 TCP frame starts and how long it is
/// (data offset, options included); `None` for anything else or a header
/// that does not fit the frame.
pub fn tcp_header(frame: &[u8]) -> Option<(usize, usize)> {
    if frame.len() < 54 || frame[12..14] != [0x08, 0x00] || frame[23] != 6 {
        return None;
    }
    let l4 = 14 + usize::from(frame[14] & 0x0F) * 4;
    let doff = usize::from(frame.get(l4 + 12)? >> 4) * 4;
    (doff >= 20 && l4 + doff <= frame.len()).then_some((l4, doff))
}

/// The offset in `frame` of the 2-byte value of the MSS option in the TCP
/// header at `l4` (`doff` bytes long), if it has a well-formed one.
pub fn mss_option(frame: &[u8], l4: usize, doff: usize) -> Option<usize> {
    let end = l4 + doff;
    let mut i = l4 + 20;
    while i < end {
        match frame[i] {
            0 => return None,
            1 => i += 1,
            kind => {
                let len = usize::from(*frame.get(i + 1)?);
                if len < 2 || i + len > end {
                    return None;
                }
                if kind == 2 && len == 4 {
                    return Some(i + 2);
                }
                i += len;
            }
        }
    }
    None
}

/// RFC 1624 incremental update of a ones' complement checksum for one
/// 16-bit word changing from `old` to `new`.
pub fn checksum_update(sum: u16, old: u16, new: u16) -> u16 {
    let mut s = u32::from(!sum) + u32::from(!old) + u32::from(new);
    while s >> 16 != 0 {
        s = (s & 0xFFFF) + (s >> 16);
    }
    !(s as u16)
}

/// The MSS each TCP peer announced: a direct-mapped table keyed by (peer
/// address, peer port, local port). A connection whose entry another one
/// overwrote is cut at [`DEFAULT_MSS`]: slower, never too large.
#[derive(Debug)]
pub struct MssTable {
    slots: [(u64, u16); 64],
    shown: u16,
    link_mss: u16,
}

impl MssTable {
    /// A table that shows the stack `shown` as every peer's MSS, for a
    /// link whose peers take at most `link_mss`.
    pub fn new(shown: u16, link_mss: u16) -> Self {
        MssTable {
            slots: [(0, 0); 64],
            shown,
            link_mss,
        }
    }

    fn key(peer: &[u8], peer_port: &[u8], local_port: &[u8]) -> u64 {
        (u64::from(u32::from_be_bytes([peer[0], peer[1], peer[2], peer[3]])) << 32)
            | (u64::from(u16::from_be_bytes([peer_port[0], peer_port[1]])) << 16)
            | u64::from(u16::from_be_bytes([local_port[0], local_port[1]]))
    }

    fn slot(key: u64) -> usize {
        ((key ^ (key >> 16) ^ (key >> 37)) & 63) as usize
    }

    /// The MSS the peer of this outgoing frame's connection announced.
    fn peer_mss(&self, frame: &[u8], l4: usize) -> u16 {
        let key = Self::key(&frame[30..34], &frame[l4 + 2..l4 + 4], &frame[l4..l4 + 2]);
        match self.slots[Self::slot(key)] {
            (k, mss) if k == key => mss,
            _ => DEFAULT_MSS,
        }
    }

    /// A received frame, before the stack sees it: if it is a SYN with an
    /// MSS option, remembers the peer's MSS and shows the stack `shown`
    /// instead (the TCP checksum updated to match).
    pub fn note_syn(&mut self, frame: &mut [u8]) {
        let Some((l4, doff)) = tcp_header(frame) else {
            return;
        };
        if frame[l4 + 13] & TCP_SYN == 0 {
            return;
        }
        let Some(at) = mss_option(frame, l4, doff) else {
            return;
        };
        let mss = u16::from_be_bytes([frame[at], frame[at + 1]]);
        let key = Self::key(&frame[26..30], &frame[l4..l4 + 2], &frame[l4 + 2..l4 + 4]);
        self.slots[Self::slot(key)] = (key, mss.clamp(MIN_GSO_SIZE, self.link_mss));
        frame[at..at + 2].copy_from_slice(&self.shown.to_be_bytes());
        let c = l4 + 16;
        let sum = checksum_update(
            u16::from_be_bytes([frame[c], frame[c + 1]]),
            mss,
            self.shown,
        );
        frame[c..c + 2].copy_from_slice(&sum.to_be_bytes());
    }

    /// A frame on its way out, its checksum left to the device (so the
    /// options may change without updating it): a SYN's MSS is clamped to
    /// the link's; a frame longer than `link_frame` becomes a GSO frame
    /// (`hdr`, the virtio-net header, gets gso_type, hdr_len and gso_size)
    /// cut at its peer's MSS less the TCP options. False for a frame
    /// longer than `link_frame` that is not TCP: nothing can cut it.
    pub fn prepare_tx(&self, hdr: &mut [u8], frame: &mut [u8], link_frame: usize) -> bool {
        let Some((l4, doff)) = tcp_header(frame) else {
            return frame.len() <= link_frame;
        };
        if frame[l4 + 13] & TCP_SYN != 0
            && let Some(at) = mss_option(frame, l4, doff)
        {
            let mss = u16::from_be_bytes([frame[at], frame[at + 1]]);
            frame[at..at + 2].copy_from_slice(&mss.min(self.link_mss).to_be_bytes());
        }
        if frame.len() <= link_frame {
            return true;
        }
        let options = (doff - 20) as u16;
        let seg = self
            .peer_mss(frame, l4)
            .saturating_sub(options)
            .max(MIN_GSO_SIZE);
        hdr[1] = GSO_TCPV4;
        hdr[2..4].copy_from_slice(&((l4 + doff) as u16).to_le_bytes());
        hdr[4..6].copy_from_slice(&seg.to_le_bytes());
        true
    }
}

const TCP_ACK: u8 = 0x10;

/// A pure ACK (no payload, only the ACK flag, no options but NOPs and
/// timestamps: a SACK block is information an ACK after it may not
/// repeat): its connection and what it acknowledges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PureAck {
    /// Source and destination address and port, as in the frame.
    flow: [u8; 12],
    ack: u32,
    window: u16,
}

/// The frame as a pure ACK, if it is one.
pub fn pure_ack(frame: &[u8]) -> Option<PureAck> {
    let (l4, doff) = tcp_header(frame)?;
    if frame[l4 + 13] != TCP_ACK {
        return None;
    }
    let total = usize::from(u16::from_be_bytes([frame[16], frame[17]]));
    if 14 + total != l4 + doff {
        return None;
    }
    let mut i = l4 + 20;
    while i < l4 + doff {
        match frame[i] {
            0 => break,
            1 => i += 1,
            8 if frame.get(i + 1) == Some(&10) => i += 10,
            _ => return None,
        }
    }
    let mut flow = [0u8; 12];
    flow[..8].copy_from_slice(&frame[26..34]);
    flow[8..].copy_from_slice(&frame[l4..l4 + 4]);
    Some(PureAck {
        flow,
        ack: u32::from_be_bytes([frame[l4 + 8], frame[l4 + 9], frame[l4 + 10], frame[l4 + 11]]),
        window: u16::from_be_bytes([frame[l4 + 14], frame[l4 + 15]]),
    })
}

/// Whether pure ACK `newer`, received after `older`, makes `older` moot:
/// same connection, and it acknowledges more, or as much with another
/// window (a window update). Two equal ACKs are both kept: that is a
/// duplicate ACK, which the sender counts towards fast retransmit.
pub fn supersedes(newer: &PureAck, older: &PureAck) -> bool {
    newer.flow == older.flow
        && ((newer.ack.wrapping_sub(older.ack) as i32) > 0
            || (newer.ack == older.ack && newer.window != older.window))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame from 10.0.0.2:4000 to 10.0.0.1:80
    /// with `options` and `payload`, its TCP checksum correct.
    fn frame(flags: u8, options: &[u8], payload_len: usize) -> [u8; 2048] {
        let mut f = [0u8; 2048];
        f[12..14].copy_from_slice(&[0x08, 0x00]);
        let doff = 20 + options.len();
        let total = 20 + doff + payload_len;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&(total as u16).to_be_bytes());
        f[23] = 6;
        f[26..30].copy_from_slice(&[10, 0, 0, 2]);
        f[30..34].copy_from_slice(&[10, 0, 0, 1]);
        f[34..36].copy_from_slice(&4000u16.to_be_bytes());
        f[36..38].copy_from_slice(&80u16.to_be_bytes());
        f[46] = ((doff / 4) as u8) << 4;
        f[47] = flags;
        f[54..54 + options.len()].copy_from_slice(options);
        for (i, b) in f[34 + doff..34 + doff + payload_len].iter_mut().enumerate() {
            *b = i as u8;
        }
        let c = tcp_sum(&f[..14 + total]);
        f[50..52].copy_from_slice(&c.to_be_bytes());
        f
    }

    /// The TCP checksum of `f` computed afresh (checksum field counted as
    /// zero).
    fn tcp_sum(f: &[u8]) -> u16 {
        let l4 = &f[34..];
        let mut sum: u32 = 6 + l4.len() as u32;
        for w in f[26..34].chunks(2) {
            sum += u32::from(u16::from_be_bytes([w[0], w[1]]));
        }
        for (i, w) in l4.chunks(2).enumerate() {
            if i == 8 {
                continue;
            }
            let hi = w[0];
            let lo = w.get(1).copied().unwrap_or(0);
            sum += u32::from(u16::from_be_bytes([hi, lo]));
        }
        while sum >> 16 != 0 {
            sum = (sum & 0xFFFF) + (sum >> 16);
        }
        !(sum as u16)
    }

    const MSS_1200: [u8; 8] = [1, 1, 2, 4, 0x04, 0xB0, 1, 0];

    #[test]
    fn a_syn_shows_the_large_mss_with_a_correct_checksum() {
        let mut t = MssTable::new(16384, 1460);
        let mut f = frame(TCP_SYN, &MSS_1200, 0);
        let len = 14 + 20 + 20 + MSS_1200.len();
        t.note_syn(&mut f[..len]);
        assert_eq!(u16::from_be_bytes([f[58], f[59]]), 16384);
        assert_eq!(u16::from_be_bytes([f[50], f[51]]), tcp_sum(&f[..len]));
    }

    #[test]
    fn a_large_frame_is_cut_at_the_peers_mss_less_options() {
        let mut t = MssTable::new(16384, 1460);
        let mut syn = frame(TCP_SYN, &MSS_1200, 0);
        t.note_syn(&mut syn[..62]);
        // Our reply direction: from 10.0.0.1:80 to 10.0.0.2:4000, with
        // 12 bytes of timestamp options.
        let mut out = frame(0x18, &[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2], 1900);
        out[26..30].copy_from_slice(&[10, 0, 0, 1]);
        out[30..34].copy_from_slice(&[10, 0, 0, 2]);
        out[34..36].copy_from_slice(&80u16.to_be_bytes());
        out[36..38].copy_from_slice(&4000u16.to_be_bytes());
        let len = 14 + 20 + 32 + 1900;
        let mut hdr = [0u8; 12];
        assert!(t.prepare_tx(&mut hdr, &mut out[..len], 1514));
        assert_eq!(hdr[1], GSO_TCPV4);
        assert_eq!(u16::from_le_bytes([hdr[2], hdr[3]]), 14 + 20 + 32);
        assert_eq!(u16::from_le_bytes([hdr[4], hdr[5]]), 1200 - 12);
        // Another connection: no entry, the default MSS.
        out[36..38].copy_from_slice(&4001u16.to_be_bytes());
        let mut hdr = [0u8; 12];
        assert!(t.prepare_tx(&mut hdr, &mut out[..len], 1514));
        assert_eq!(u16::from_le_bytes([hdr[4], hdr[5]]), DEFAULT_MSS - 12);
    }

    #[test]
    fn small_frames_pass_and_outgoing_syns_are_clamped() {
        let t = MssTable::new(16384, 1460);
        let mut f = frame(0x10, &[], 100);
        let mut hdr = [0u8; 12];
        assert!(t.prepare_tx(&mut hdr, &mut f[..154], 1514));
        assert_eq!(hdr, [0; 12]);
        let mut syn = frame(TCP_SYN | 0x10, &[2, 4, 0x40, 0x00], 0);
        assert!(t.prepare_tx(&mut hdr, &mut syn[..58], 1514));
        assert_eq!(u16::from_be_bytes([syn[56], syn[57]]), 1460);
        assert_eq!(hdr, [0; 12]);
    }

    #[test]
    fn odd_frames_are_left_alone() {
        let mut t = MssTable::new(16384, 1460);
        // Not IPv4.
        let mut f = frame(TCP_SYN, &MSS_1200, 0);
        f[12] = 0x86;
        let before = f;
        t.note_syn(&mut f[..62]);
        assert_eq!(f, before);
        // Options running past the header, a zero-length option.
        for opts in [[2, 9, 0, 0, 0, 0, 0, 0], [7, 0, 2, 4, 1, 1, 1, 1]] {
            let mut f = frame(TCP_SYN, &opts, 0);
            let before = f;
            t.note_syn(&mut f[..62]);
            assert_eq!(f, before);
        }
        // A data offset past the frame.
        let mut f = frame(TCP_SYN, &MSS_1200, 0);
        f[46] = 0xF0;
        assert_eq!(tcp_header(&f[..62]), None);
        // Too large and not TCP: refused.
        let mut udp = frame(0, &[], 1600);
        udp[23] = 17;
        let mut hdr = [0u8; 12];
        assert!(!t.prepare_tx(&mut hdr, &mut udp[..1654], 1514));
    }

    /// A pure ACK from 10.0.0.2:4000 acknowledging `ack` with `window`.
    fn ack(ack: u32, window: u16, options: &[u8]) -> [u8; 2048] {
        let mut f = frame(TCP_ACK, options, 0);
        f[42..46].copy_from_slice(&ack.to_be_bytes());
        f[48..50].copy_from_slice(&window.to_be_bytes());
        f
    }

    #[test]
    fn newer_acks_supersede_older_ones_but_duplicates_stay() {
        let a = |n, w| pure_ack(&ack(n, w, &[])[..54]).unwrap();
        assert!(supersedes(&a(2000, 100), &a(1000, 100)));
        assert!(supersedes(&a(1000, 200), &a(1000, 100)), "window update");
        assert!(!supersedes(&a(1000, 100), &a(1000, 100)), "duplicate ACK");
        assert!(!supersedes(&a(1000, 100), &a(2000, 100)), "older");
        assert!(supersedes(&a(5, 100), &a(u32::MAX - 5, 100)), "wraps");
        let mut other = ack(3000, 100, &[]);
        other[34..36].copy_from_slice(&4001u16.to_be_bytes());
        assert!(!supersedes(&pure_ack(&other[..54]).unwrap(), &a(1000, 100)));
    }

    #[test]
    fn only_pure_acks_qualify() {
        let ts = [1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        assert!(pure_ack(&ack(1, 1, &ts)[..66]).is_some());
        // A SACK block, data, another flag.
        let sack = [1, 1, 5, 10, 0, 0, 0, 1, 0, 0, 0, 2];
        assert!(pure_ack(&ack(1, 1, &sack)[..66]).is_none());
        assert!(pure_ack(&frame(TCP_ACK, &[], 10)[..64]).is_none());
        assert!(pure_ack(&frame(TCP_ACK | 0x08, &[], 0)[..54]).is_none());
        assert!(pure_ack(&frame(TCP_ACK | 0x01, &[], 0)[..54]).is_none());
    }
}
