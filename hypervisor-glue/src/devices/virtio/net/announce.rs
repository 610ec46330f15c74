//! The frame a VM's card sends when the VM arrives on a host: a
//! gratuitous ARP for the guest's address from its MAC, so that the
//! bridges of the host it now runs on learn where the MAC lives (as QEMU
//! announces a migrated guest).

/// A gratuitous ARP request (60 bytes, padded): who has `ip`? tell `ip`,
/// from `mac`, to everyone.
pub fn gratuitous_arp(mac: [u8; 6], ip: [u8; 4]) -> Vec<u8> {
    let mut f = vec![0u8; 60];
    f[..6].fill(0xFF); // broadcast
    f[6..12].copy_from_slice(&mac);
    f[12..14].copy_from_slice(&[0x08, 0x06]); // ARP
    // Ethernet, IPv4, hardware length 6, protocol length 4, request.
    f[14..22].copy_from_slice(&[0, 1, 8, 0, 6, 4, 0, 1]);
    f[22..28].copy_from_slice(&mac); // sender MAC
    f[28..32].copy_from_slice(&ip); // sender IP
    f[38..42].copy_from_slice(&ip); // target IP (target MAC stays zero)
    f
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_announcement_is_an_arp_request_for_our_own_address() {
        let f = gratuitous_arp([2, 0xbf, 10, 77, 0, 10], [10, 77, 0, 10]);
        assert_eq!(f.len(), 60);
        assert_eq!(&f[..6], &[0xFF; 6]);
        assert_eq!(&f[12..14], &[8, 6]);
        assert_eq!(f[21], 1, "an ARP request");
        assert_eq!(&f[28..32], &f[38..42], "sender and target IP agree");
        assert_eq!(&f[32..38], &[0; 6]);
    }
}
