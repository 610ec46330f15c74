//! Names: a VM's identity and a migration attempt's, random and
//! printed as hex.

/// A migration attempt's random name: resolve queries name it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SessionId(pub [u8; 16]);

/// A VM's identity (random, made when it first boots).
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct VmId(pub [u8; 16]);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0[..6]))
    }
}
impl std::fmt::Debug for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SessionId({})", hex(&self.0))
    }
}
impl std::fmt::Display for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&hex(&self.0))
    }
}
impl std::fmt::Debug for VmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VmId({})", hex(&self.0))
    }
}

impl std::str::FromStr for VmId {
    type Err = String;
    /// 32 hex digits.
    fn from_str(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.len() != 32 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(format!("{s:?} is not a VM identity (32 hex digits)"));
        }
        let mut id = [0u8; 16];
        for (i, b) in id.iter_mut().enumerate() {
            *b = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).expect("hex digits");
        }
        Ok(VmId(id))
    }
}

impl SessionId {
    /// A fresh random session name.
    pub fn random() -> SessionId {
        SessionId(random_bytes())
    }
}

impl VmId {
    /// A fresh random identity.
    pub fn random() -> VmId {
        VmId(random_bytes())
    }
}

/// Random bytes from the OS.
pub fn random_bytes<const N: usize>() -> [u8; N] {
    let mut b = [0u8; N];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the OS random generator");
    b
}
