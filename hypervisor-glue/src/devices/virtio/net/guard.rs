//! What a guest may send onto the host's network: frames from its own MAC,
//! IPv4 from its own address and ARP about itself only, with offload
//! fields (checksum start and offset, TSO header length and segment size)
//! that agree with the headers they describe. Anything else is dropped
//! before it reaches the tap, and counted (`ferry status`: refused).
//!
//! One request is mended rather than refused: a partial checksum on a
//! frame that has no TCP or UDP checksum to complete (ARP, ICMP). Such a
//! frame already carries whatever checksums it has; RustyHermit 0.11 asks
//! for one on every frame it sends, and completing it would overwrite
//! bytes of the frame. The request is dropped and the frame goes out as
//! it is.
#![deny(unsafe_code)]

use ferry_abi::offload::{GSO_TCPV4, MIN_GSO_SIZE};

use super::tap::VNET_HDR_LEN;

const ETH_HLEN: usize = 14;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_ARP: u16 = 0x0806;
const PROTO_TCP: u8 = 6;
const PROTO_UDP: u8 = 17;
/// virtio-net header flag: the checksum is partial.
const NEEDS_CSUM: u8 = 1;

/// Why a frame the guest sent is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// Another source MAC, or IPv4/ARP from another address.
    Spoofed,
    /// Not IPv4 or ARP.
    Protocol,
    /// Headers cut short, or offload fields that do not match them.
    Malformed,
}

/// The guest's own addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    /// The card's MAC.
    pub mac: [u8; 6],
    /// The guest's IPv4 address.
    pub ip: [u8; 4],
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Checks a frame the guest sent: `buf` is the virtio-net header and the
/// frame. `Ok` to send it (perhaps with a needless checksum request
/// dropped from its header, see the module doc).
pub fn check_tx(buf: &mut [u8], me: &Identity) -> Result<(), Refusal> {
    if buf.len() < VNET_HDR_LEN + ETH_HLEN {
        return Err(Refusal::Malformed);
    }
    let (hdr, frame) = buf.split_at_mut(VNET_HDR_LEN);
    if frame[6..12] != me.mac {
        return Err(Refusal::Spoofed);
    }
    match be16(frame, 12) {
        ETHERTYPE_ARP => {
            // Ethernet/IPv4 ARP, sender = us.
            if frame.len() < ETH_HLEN + 28 {
                return Err(Refusal::Malformed);
            }
            let a = &frame[ETH_HLEN..];
            if be16(a, 0) != 1 || be16(a, 2) != ETHERTYPE_IPV4 || a[4] != 6 || a[5] != 4 {
                return Err(Refusal::Malformed);
            }
            if a[8..14] != me.mac || a[14..18] != me.ip {
                return Err(Refusal::Spoofed);
            }
            if hdr[1] != 0 {
                return Err(Refusal::Malformed);
            }
            drop_checksum_request(hdr);
            Ok(())
        }
        ETHERTYPE_IPV4 => {
            if frame.len() < ETH_HLEN + 20 {
                return Err(Refusal::Malformed);
            }
            let ip = &frame[ETH_HLEN..];
            let ihl = usize::from(ip[0] & 0x0F) * 4;
            if ip[0] >> 4 != 4 || ihl < 20 || ETH_HLEN + ihl > frame.len() {
                return Err(Refusal::Malformed);
            }
            if ip[12..16] != me.ip {
                return Err(Refusal::Spoofed);
            }
            let proto = ip[9];
            let l4 = ETH_HLEN + ihl;
            if hdr[0] & NEEDS_CSUM != 0 {
                // The partial checksum must be the TCP or UDP one, where
                // the headers put it.
                let start = usize::from(u16::from_le_bytes([hdr[6], hdr[7]]));
                let offset = usize::from(u16::from_le_bytes([hdr[8], hdr[9]]));
                match proto {
                    PROTO_TCP | PROTO_UDP => {
                        let want = if proto == PROTO_TCP { 16 } else { 6 };
                        if start != l4 || offset != want || l4 + offset + 2 > frame.len() {
                            return Err(Refusal::Malformed);
                        }
                    }
                    // No TCP/UDP checksum to complete: drop the request
                    // (a GSO frame is refused below anyway).
                    _ if hdr[1] == 0 => drop_checksum_request(hdr),
                    _ => return Err(Refusal::Malformed),
                }
            }
            match hdr[1] {
                0 => Ok(()),
                GSO_TCPV4 => {
                    // A TCP super-frame: its header length is exactly the
                    // Ethernet, IPv4 and TCP headers, and it has payload.
                    if proto != PROTO_TCP || hdr[0] & NEEDS_CSUM == 0 || frame.len() < l4 + 20 {
                        return Err(Refusal::Malformed);
                    }
                    let doff = usize::from(frame[l4 + 12] >> 4) * 4;
                    let hdr_len = usize::from(u16::from_le_bytes([hdr[2], hdr[3]]));
                    let gso_size = usize::from(u16::from_le_bytes([hdr[4], hdr[5]]));
                    if doff < 20
                        || hdr_len != l4 + doff
                        || hdr_len >= frame.len()
                        || gso_size < usize::from(MIN_GSO_SIZE)
                        || gso_size > 65_535 - hdr_len
                    {
                        return Err(Refusal::Malformed);
                    }
                    Ok(())
                }
                _ => Err(Refusal::Malformed),
            }
        }
        _ => Err(Refusal::Protocol),
    }
}

/// Clears a partial-checksum request from a virtio-net header.
fn drop_checksum_request(hdr: &mut [u8]) {
    hdr[0] &= !NEEDS_CSUM;
    hdr[6..10].fill(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: Identity = Identity {
        mac: [2, 0xbf, 10, 77, 0, 10],
        ip: [10, 77, 0, 10],
    };

    /// A TCP/IPv4 frame from `mac`/`ip` with a virtio-net header.
    fn tcp(mac: [u8; 6], ip: [u8; 4], len: usize) -> Vec<u8> {
        let mut b = vec![0u8; VNET_HDR_LEN + len];
        let f = &mut b[VNET_HDR_LEN..];
        f[6..12].copy_from_slice(&mac);
        f[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        f[14] = 0x45;
        f[23] = PROTO_TCP;
        f[26..30].copy_from_slice(&ip);
        f[14 + 20 + 12] = 5 << 4; // TCP data offset: 20 bytes
        b
    }

    fn offload(b: &mut [u8], start: u16, offset: u16, gso: u8, hdr_len: u16, size: u16) {
        b[0] = NEEDS_CSUM;
        b[1] = gso;
        b[2..4].copy_from_slice(&hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&size.to_le_bytes());
        b[6..8].copy_from_slice(&start.to_le_bytes());
        b[8..10].copy_from_slice(&offset.to_le_bytes());
    }

    #[test]
    fn own_frames_pass_and_spoofed_ones_do_not() {
        assert_eq!(check_tx(&mut tcp(ME.mac, ME.ip, 60), &ME), Ok(()));
        assert_eq!(
            check_tx(&mut tcp([2, 0, 0, 0, 0, 1], ME.ip, 60), &ME),
            Err(Refusal::Spoofed)
        );
        assert_eq!(
            check_tx(&mut tcp(ME.mac, [10, 77, 0, 99], 60), &ME),
            Err(Refusal::Spoofed)
        );
        let mut ipv6 = tcp(ME.mac, ME.ip, 60);
        ipv6[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&[0x86, 0xDD]);
        assert_eq!(check_tx(&mut ipv6, &ME), Err(Refusal::Protocol));
        assert_eq!(check_tx(&mut [0u8; 20], &ME), Err(Refusal::Malformed));
    }

    #[test]
    fn arp_only_about_ourselves() {
        let mut b = vec![0u8; VNET_HDR_LEN + 60];
        let f = &mut b[VNET_HDR_LEN..];
        f[6..12].copy_from_slice(&ME.mac);
        f[12..14].copy_from_slice(&ETHERTYPE_ARP.to_be_bytes());
        f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
        f[22..28].copy_from_slice(&ME.mac);
        f[28..32].copy_from_slice(&ME.ip);
        assert_eq!(check_tx(&mut b, &ME), Ok(()));
        // A partial-checksum request on ARP (RustyHermit sends one on every
        // frame) is dropped, not the frame; ARP as a GSO frame is refused.
        b[0] = NEEDS_CSUM;
        b[6..8].copy_from_slice(&14u16.to_le_bytes());
        assert_eq!(check_tx(&mut b, &ME), Ok(()));
        assert_eq!(b[..VNET_HDR_LEN], [0; VNET_HDR_LEN]);
        b[1] = GSO_TCPV4;
        assert_eq!(check_tx(&mut b, &ME), Err(Refusal::Malformed));
        b[1] = 0;
        b[VNET_HDR_LEN + 31] = 99; // another sender address
        assert_eq!(check_tx(&mut b, &ME), Err(Refusal::Spoofed));
    }

    #[test]
    fn offload_fields_must_match_the_headers() {
        let mut b = tcp(ME.mac, ME.ip, 9000);
        offload(&mut b, 34, 16, GSO_TCPV4, 54, 1448);
        assert_eq!(check_tx(&mut b, &ME), Ok(()));
        for (start, offset, hdr_len, size) in [
            (30, 16, 54, 1448),  // checksum start not at the TCP header
            (34, 6, 54, 1448),   // the UDP offset on TCP
            (34, 16, 66, 1448),  // header length beyond the headers
            (34, 16, 54, 8),     // segments too small
            (34, 16, 54, 65500), // segments too large for one IP packet
        ] {
            let mut b = tcp(ME.mac, ME.ip, 9000);
            offload(&mut b, start, offset, GSO_TCPV4, hdr_len, size);
            assert_eq!(
                check_tx(&mut b, &ME),
                Err(Refusal::Malformed),
                "{start} {offset} {hdr_len} {size}"
            );
        }
        // A partial checksum on a plain frame is fine where it belongs.
        let mut b = tcp(ME.mac, ME.ip, 100);
        offload(&mut b, 34, 16, 0, 0, 0);
        assert_eq!(check_tx(&mut b, &ME), Ok(()));
        // On ICMP (no TCP/UDP checksum) the request is dropped.
        let mut b = tcp(ME.mac, ME.ip, 100);
        b[VNET_HDR_LEN + 23] = 1;
        offload(&mut b, 34, 0, 0, 0, 0);
        assert_eq!(check_tx(&mut b, &ME), Ok(()));
        assert_eq!(b[0] & NEEDS_CSUM, 0);
    }
}
