//! Migration credentials: a pre-shared key both ends hold, in a file only
//! its owner may read.
//!
//! The file holds 32 random bytes as 64 hex digits and a newline, so that
//! it can be copied to the other host as text. [`Psk::from_file`] refuses a
//! file that group or others may read or write, one owned by another user
//! (root's files are accepted), and anything but 64 hex digits.
//! [`generate`] writes a new one with mode 0600, never over an existing
//! file or through a symlink.

use std::io::Write;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// Bytes of key.
pub const KEY_LEN: usize = 32;

/// A pre-shared key. Its bytes never appear in `Debug` output and are
/// wiped when it is dropped.
#[derive(Clone, PartialEq, Eq)]
pub struct Psk([u8; KEY_LEN]);

impl std::fmt::Debug for Psk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Psk(..)")
    }
}

impl Drop for Psk {
    fn drop(&mut self) {
        wipe(&mut self.0);
    }
}

/// Overwrites `b` with zeros in a way the compiler keeps.
pub fn wipe(b: &mut [u8]) {
    for x in b.iter_mut() {
        // SAFETY: `x` is a valid, aligned, exclusive reference.
        unsafe { std::ptr::write_volatile(x, 0) };
    }
    std::sync::atomic::compiler_fence(std::sync::atomic::Ordering::SeqCst);
}

/// What is wrong with a key file.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// It cannot be read.
    #[error("cannot read the key {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// Others may read it.
    #[error(
        "the key {path} may be read or written by group or others (mode {mode:04o}): run `chmod 600 {path}`"
    )]
    Exposed {
        /// The file.
        path: String,
        /// Its permission bits.
        mode: u32,
    },
    /// Another user owns it.
    #[error("the key {path} belongs to uid {owner}, not to this user (uid {me}) or root")]
    Owner {
        /// The file.
        path: String,
        /// Its owner.
        owner: u32,
        /// This process's effective uid.
        me: u32,
    },
    /// Not a key.
    #[error("the key {path} is not 64 hex digits (make one with `ferry keygen --out FILE`)")]
    Format {
        /// The file.
        path: String,
    },
    /// A new key file could not be written.
    #[error("cannot write the key {path}: {source}")]
    Write {
        /// The file.
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
}

impl Psk {
    /// The key's bytes.
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }

    /// A key from its 64 hex digits (surrounding whitespace allowed).
    pub fn from_hex(text: &str) -> Option<Psk> {
        let t = text.trim();
        if t.len() != 2 * KEY_LEN || !t.bytes().all(|b| b.is_ascii_hexdigit()) {
            return None;
        }
        let mut k = [0u8; KEY_LEN];
        for (i, b) in k.iter_mut().enumerate() {
            *b = u8::from_str_radix(&t[2 * i..2 * i + 2], 16).ok()?;
        }
        Some(Psk(k))
    }

    /// The key as 64 hex digits.
    pub fn to_hex(&self) -> String {
        self.0.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads and checks a key file (see the module doc).
    pub fn from_file(path: &Path) -> Result<Psk, KeyError> {
        let name = path.display().to_string();
        let read_err = |source| KeyError::Read {
            path: name.clone(),
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)
            .map_err(read_err)?;
        let meta = file.metadata().map_err(read_err)?;
        if !meta.is_file() {
            return Err(read_err(std::io::Error::other("not a regular file")));
        }
        let mode = meta.mode() & 0o7777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Exposed { path: name, mode });
        }
        // SAFETY: geteuid has no preconditions.
        let me = unsafe { libc::geteuid() };
        if meta.uid() != me && meta.uid() != 0 {
            return Err(KeyError::Owner {
                path: name,
                owner: meta.uid(),
                me,
            });
        }
        let mut text = String::new();
        use std::io::Read;
        (&file)
            .take(256)
            .read_to_string(&mut text)
            .map_err(|_| KeyError::Format { path: name.clone() })?;
        let key = Psk::from_hex(&text).ok_or(KeyError::Format { path: name })?;
        let mut t = text.into_bytes();
        wipe(&mut t);
        Ok(key)
    }
}

/// Writes a new random key to `path` (mode 0600; fails if `path` exists).
pub fn generate(path: &Path) -> Result<Psk, KeyError> {
    let key = Psk(super::wire::random_bytes());
    let err = |source| KeyError::Write {
        path: path.display().to_string(),
        source,
    };
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(err)?;
    let mut text = key.to_hex().into_bytes();
    text.push(b'\n');
    let r = f.write_all(&text).and_then(|()| f.sync_all());
    wipe(&mut text);
    r.map_err(err)?;
    Ok(key)
}

/// What a side of a migration authenticates with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Credentials {
    /// The pre-shared key: Noise handshake, sealed records.
    Key(Psk),
    /// No authentication, no encryption (`--insecure`).
    Insecure,
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn dir(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("ferry-key-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn a_generated_key_reads_back_and_is_private() {
        let d = dir("gen");
        let p = d.join("k");
        let k = generate(&p).unwrap();
        assert_eq!(Psk::from_file(&p).unwrap(), k);
        assert_eq!(
            std::fs::metadata(&p).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // Never over an existing file.
        assert!(matches!(generate(&p), Err(KeyError::Write { .. })));
        assert_ne!(generate(&d.join("k2")).unwrap(), k);
        assert_eq!(format!("{k:?}"), "Psk(..)");
        std::fs::remove_dir_all(d).ok();
    }

    #[test]
    fn exposed_foreign_or_malformed_keys_are_refused() {
        let d = dir("bad");
        let p = d.join("k");
        generate(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o640)).unwrap();
        let e = Psk::from_file(&p).unwrap_err();
        assert!(matches!(e, KeyError::Exposed { mode: 0o640, .. }), "{e}");
        assert!(e.to_string().contains("chmod 600"));
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        for bad in ["", "abc", &"g".repeat(64), &"a".repeat(63), &"a".repeat(65)] {
            let q = d.join("bad");
            let _ = std::fs::remove_file(&q);
            std::fs::write(&q, bad).unwrap();
            std::fs::set_permissions(&q, std::fs::Permissions::from_mode(0o600)).unwrap();
            assert!(
                matches!(Psk::from_file(&q), Err(KeyError::Format { .. })),
                "{bad:?}"
            );
        }
        // A symlink to a key is not followed.
        let link = d.join("link");
        std::os::unix::fs::symlink(&p, &link).unwrap();
        assert!(matches!(Psk::from_file(&link), Err(KeyError::Read { .. })));
        assert!(matches!(
            Psk::from_file(&d.join("missing")),
            Err(KeyError::Read { .. })
        ));
        std::fs::remove_dir_all(d).ok();
    }
}
