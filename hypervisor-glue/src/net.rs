//! A VM's network settings as the command line gives them, validated, and
//! how they reach the guest (runtime words on its command line; the MAC
//! through the virtio-net device configuration).

use std::net::Ipv4Addr;
use std::str::FromStr;

use crate::snapshot::NetConfigState;

/// The network card of a VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetSettings {
    /// Host tap the card is backed by.
    pub tap: String,
    /// The guest's MAC address.
    pub mac: Mac,
    /// The guest's IPv4 address and prefix length.
    pub ip: Ipv4Cidr,
    /// Default gateway, if any.
    pub gateway: Option<Ipv4Addr>,
}

impl NetSettings {
    /// Checks that the settings make sense together.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(gw) = self.gateway {
            if !self.ip.contains(gw) {
                return Err(format!(
                    "gateway {gw} is not in the guest's subnet {}",
                    self.ip.network()
                ));
            }
            if gw == self.ip.addr {
                return Err(format!("gateway {gw} is the guest's own address"));
            }
        }
        Ok(())
    }

    /// The settings as a saved state carries them (without the tap, which
    /// is this host's).
    pub fn saved(&self) -> NetConfigState {
        NetConfigState {
            mac: self.mac.0,
            ip: self.ip.addr.octets(),
            prefix: self.ip.prefix,
            gateway: self.gateway.map(|g| g.octets()),
        }
    }

    /// Settings from a saved state (a snapshot's or a migration's, so
    /// checked as any outside input) on this host's `tap`.
    pub fn from_saved(tap: &str, s: &NetConfigState) -> Result<NetSettings, String> {
        let mac: Mac = Mac(s.mac).to_string().parse()?;
        let ip: Ipv4Cidr = format!("{}/{}", Ipv4Addr::from(s.ip), s.prefix).parse()?;
        let n = NetSettings {
            tap: tap.to_string(),
            mac,
            ip,
            gateway: s.gateway.map(Ipv4Addr::from),
        };
        n.validate()?;
        Ok(n)
    }

    /// A RustyHermit kernel's command-line words for these settings.
    pub fn hermit_args(&self) -> Vec<String> {
        let mask = Ipv4Addr::from(
            u32::MAX
                .checked_shl(32 - u32::from(self.ip.prefix))
                .unwrap_or(0),
        );
        let mut v = vec![
            "-ip".into(),
            self.ip.addr.to_string(),
            "-mask".into(),
            mask.to_string(),
        ];
        if let Some(gw) = self.gateway {
            v.extend(["-gateway".into(), gw.to_string()]);
        }
        v
    }

    /// The runtime's command-line words for these settings.
    pub fn runtime_args(&self) -> Vec<String> {
        let mut v = vec![format!("net.ip={}", self.ip)];
        if let Some(gw) = self.gateway {
            v.push(format!("net.gw={gw}"));
        }
        v
    }
}

/// A MAC address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mac(pub [u8; 6]);

impl FromStr for Mac {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("{s:?} is not a MAC address (six hex bytes like 02:bf:0a:4d:00:0a)");
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut mac = [0u8; 6];
        for (m, p) in mac.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(bad());
            }
            *m = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if mac[0] & 1 == 1 {
            return Err(format!(
                "{s} is a multicast MAC address; a card needs a unicast one"
            ));
        }
        if mac == [0; 6] {
            return Err("00:00:00:00:00:00 is not a usable MAC address".into());
        }
        Ok(Mac(mac))
    }
}

impl std::fmt::Display for Mac {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// An IPv4 address with a prefix length.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ipv4Cidr {
    /// The address.
    pub addr: Ipv4Addr,
    /// Prefix length, 1 to 32.
    pub prefix: u8,
}

impl Ipv4Cidr {
    fn mask(&self) -> u32 {
        u32::MAX << (32 - u32::from(self.prefix))
    }
    /// The network address.
    pub fn network(&self) -> Ipv4Cidr {
        Ipv4Cidr {
            addr: Ipv4Addr::from(u32::from(self.addr) & self.mask()),
            prefix: self.prefix,
        }
    }
    /// Whether `a` is in the subnet.
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        u32::from(a) & self.mask() == u32::from(self.addr) & self.mask()
    }
}

impl FromStr for Ipv4Cidr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (a, p) = s
            .split_once('/')
            .ok_or_else(|| format!("{s:?} needs a prefix length, like 10.77.0.10/24"))?;
        let addr: Ipv4Addr = a
            .parse()
            .map_err(|_| format!("{a:?} is not an IPv4 address"))?;
        let prefix: u8 = p
            .parse()
            .ok()
            .filter(|p| (1..=32).contains(p))
            .ok_or_else(|| format!("prefix length {p:?} must be 1 to 32"))?;
        if addr.is_unspecified() || addr.is_broadcast() || addr.is_multicast() || addr.is_loopback()
        {
            return Err(format!("{addr} cannot be a guest's address"));
        }
        Ok(Ipv4Cidr { addr, prefix })
    }
}

impl std::fmt::Display for Ipv4Cidr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_bad_ones_are_named() {
        assert_eq!(
            "02:bf:0a:4d:00:0a".parse::<Mac>().unwrap().0,
            [2, 0xbf, 10, 0x4d, 0, 10]
        );
        assert_eq!(
            Mac([2, 0xbf, 10, 0x4d, 0, 10]).to_string(),
            "02:bf:0a:4d:00:0a"
        );
        for bad in [
            "",
            "02:bf:0a:4d:00",
            "02:bf:0a:4d:00:0g",
            "01:00:5e:00:00:01",
            "00:00:00:00:00:00",
            "2:bf:a:4d:0:a",
        ] {
            assert!(bad.parse::<Mac>().is_err(), "{bad}");
        }
    }

    #[test]
    fn cidrs_parse_and_gateways_are_checked() {
        let c: Ipv4Cidr = "10.77.0.10/24".parse().unwrap();
        assert_eq!(c.network().to_string(), "10.77.0.0/24");
        for bad in [
            "10.77.0.10",
            "10.77.0.10/0",
            "10.77.0.10/33",
            "0.0.0.0/8",
            "x/24",
            "224.0.0.1/4",
        ] {
            assert!(bad.parse::<Ipv4Cidr>().is_err(), "{bad}");
        }
        let mut n = NetSettings {
            tap: "tap0".into(),
            mac: "02:00:00:00:00:01".parse().unwrap(),
            ip: c,
            gateway: Some("10.77.0.1".parse().unwrap()),
        };
        assert!(n.validate().is_ok());
        assert_eq!(
            n.runtime_args(),
            ["net.ip=10.77.0.10/24", "net.gw=10.77.0.1"]
        );
        n.gateway = Some("10.78.0.1".parse().unwrap());
        assert!(
            n.validate()
                .unwrap_err()
                .contains("not in the guest's subnet")
        );
    }
}
