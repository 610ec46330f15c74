//! Checksum offload, done natively in the VMM as a NIC would: TCP and UDP
//! checksums of IPv4 frames received from the tap are verified here, so the
//! guest (whose every instruction is emulated on PVM) need not touch its
//! payload bytes; see `docs/pvm-emulation.md`.

/// virtio-net header flag: the checksum from `csum_start` still has to be
/// computed (the packet carries only the pseudo-header sum).
pub const NEEDS_CSUM: u8 = 1;
/// virtio-net header flag: the checksum has been verified.
pub const DATA_VALID: u8 = 2;

const ETH_HDR: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;

/// Ones' complement sum of `data` (big-endian 16-bit words) added to `sum`.
fn sum16(mut sum: u64, data: &[u8]) -> u64 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u64::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u64::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u64) -> u16 {
    while sum >> 16 != 0 {
        sum = (sum & 0xFFFF) + (sum >> 16);
    }
    sum as u16
}

/// What verification found for one frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// A TCP or UDP checksum that is right (or UDP's "no checksum").
    Valid,
    /// A TCP or UDP checksum that is wrong.
    Invalid,
    /// Not IPv4 TCP/UDP, a fragment, or malformed: left to the guest.
    NotChecked,
}

/// Verifies the TCP or UDP checksum of an Ethernet frame (no header).
pub fn verify(frame: &[u8]) -> Verdict {
    if frame.len() < ETH_HDR + 20 || u16::from_be_bytes([frame[12], frame[13]]) != ETHERTYPE_IPV4 {
        return Verdict::NotChecked;
    }
    let ip = &frame[ETH_HDR..];
    let ihl = usize::from(ip[0] & 0x0F) * 4;
    let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
    if ip[0] >> 4 != 4 || ihl < 20 || total < ihl || total > ip.len() {
        return Verdict::NotChecked;
    }
    // Fragments: only the reassembled datagram has a checksum to check.
    if u16::from_be_bytes([ip[6], ip[7]]) & 0x3FFF != 0 {
        return Verdict::NotChecked;
    }
    let proto = ip[9];
    let l4 = &ip[ihl..total];
    let min = match proto {
        PROTO_TCP => 20,
        PROTO_UDP => 8,
        _ => return Verdict::NotChecked,
    };
    if l4.len() < min {
        return Verdict::NotChecked;
    }
    if proto == PROTO_UDP && l4[6] == 0 && l4[7] == 0 {
        return Verdict::Valid;
    }
    let mut sum = sum16(0, &ip[12..20]);
    sum += u64::from(proto) + l4.len() as u64;
    sum = sum16(sum, l4);
    if fold(sum) == 0xFFFF {
        Verdict::Valid
    } else {
        Verdict::Invalid
    }
}

/// Completes a NEEDS_CSUM frame in place: the ones' complement of the sum
/// from `start` to the end goes at `start + offset`. False if the range is
/// outside the frame.
pub fn complete(frame: &mut [u8], start: usize, offset: usize) -> bool {
    let at = start.saturating_add(offset);
    if start >= frame.len() || at.saturating_add(2) > frame.len() {
        return false;
    }
    let c = !fold(sum16(0, &frame[start..]));
    frame[at..at + 2].copy_from_slice(&c.to_be_bytes());
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An Ethernet + IPv4 + TCP frame with a correct checksum.
    fn tcp_frame(payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14 + 20 + 20];
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        let total = (40 + payload.len()) as u16;
        f[14] = 0x45;
        f[16..18].copy_from_slice(&total.to_be_bytes());
        f[22] = 64;
        f[23] = PROTO_TCP;
        f[26..30].copy_from_slice(&[10, 0, 0, 1]);
        f[30..34].copy_from_slice(&[10, 0, 0, 2]);
        f[34..36].copy_from_slice(&1234u16.to_be_bytes());
        f[36..38].copy_from_slice(&7u16.to_be_bytes());
        f[46] = 5 << 4;
        f.extend_from_slice(payload);
        // Pseudo-header sum in the field, then complete, as a guest with
        // NEEDS_CSUM and a device would.
        let mut sum = sum16(0, &f[26..34]);
        sum += u64::from(PROTO_TCP) + 20 + payload.len() as u64;
        let partial = fold(sum);
        f[50..52].copy_from_slice(&partial.to_be_bytes());
        assert!(complete(&mut f, 34, 16));
        f
    }

    #[test]
    fn completed_checksums_verify_and_corruption_is_caught() {
        for payload in [&b""[..], b"a", b"hello, ferry", &[0xFF; 1460]] {
            let mut f = tcp_frame(payload);
            assert_eq!(verify(&f), Verdict::Valid, "{} bytes", payload.len());
            let last = f.len() - 1;
            f[last] ^= 0x40;
            assert_eq!(verify(&f), Verdict::Invalid);
        }
    }

    #[test]
    fn odd_frames_are_left_alone() {
        assert_eq!(verify(&[0; 10]), Verdict::NotChecked);
        let mut f = tcp_frame(b"x");
        f[12] = 0x86; // IPv6 ethertype
        assert_eq!(verify(&f), Verdict::NotChecked);
        let mut f = tcp_frame(b"x");
        f[16..18].copy_from_slice(&9999u16.to_be_bytes()); // total length past the frame
        assert_eq!(verify(&f), Verdict::NotChecked);
        let mut f = tcp_frame(b"xy");
        assert!(!complete(&mut f, 200, 16));
        assert!(!complete(&mut f, 34, 1000));
    }
}
