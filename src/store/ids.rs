//! Newtypes for the store's content addresses, keys and salts.
//!
//! Every one of them is 32 bytes. Ids print as 64 lowercase hex digits (the
//! form used in object names); keys never print their bytes.

use std::fmt;
use std::str::FromStr;

/// Length in bytes of every id, key and salt in the store.
pub const HASH_LEN: usize = 32;

/// Writes `bytes` as lowercase hex.
fn write_hex(f: &mut fmt::Formatter<'_>, bytes: &[u8; HASH_LEN]) -> fmt::Result {
    for b in bytes {
        write!(f, "{b:02x}")?;
    }
    Ok(())
}

/// Parses exactly 64 hex digits (either case).
fn parse_hex(s: &str) -> Result<[u8; HASH_LEN], ParseIdError> {
    let s = s.as_bytes();
    if s.len() != HASH_LEN * 2 {
        return Err(ParseIdError { len: s.len() });
    }
    let mut out = [0u8; HASH_LEN];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let hi = hex_val(pair[0]).ok_or(ParseIdError { len: s.len() })?;
        let lo = hex_val(pair[1]).ok_or(ParseIdError { len: s.len() })?;
        out[i] = (hi << 4) | lo;
    }
    Ok(out)
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A string that is not 64 hex digits was given where an id was expected.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("expected 64 hex digits, got {len} characters or a non-hex digit")]
pub struct ParseIdError {
    /// Length of the rejected string, in bytes.
    pub len: usize,
}

macro_rules! public_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name([u8; HASH_LEN]);

        impl $name {
            /// Wraps raw bytes.
            pub const fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
                Self(bytes)
            }

            /// The raw bytes.
            pub const fn as_bytes(&self) -> &[u8; HASH_LEN] {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write_hex(f, &self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!(stringify!($name), "("))?;
                write_hex(f, &self.0)?;
                write!(f, ")")
            }
        }

        impl FromStr for $name {
            type Err = ParseIdError;
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                parse_hex(s).map(Self)
            }
        }
    };
}

public_id! {
    /// Content address of a stored block: SHA-256 of the block's stored bytes
    /// (ciphertext and tag). Anyone can check a block against its id without
    /// its key.
    BlockId
}

public_id! {
    /// Content address of a stored manifest: SHA-256 of the sealed manifest
    /// object.
    ManifestId
}

macro_rules! secret {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name([u8; HASH_LEN]);

        impl $name {
            /// Wraps raw key bytes.
            pub const fn from_bytes(bytes: [u8; HASH_LEN]) -> Self {
                Self(bytes)
            }

            /// The raw key bytes.
            pub const fn as_bytes(&self) -> &[u8; HASH_LEN] {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(..)"))
            }
        }
    };
}

secret! {
    /// The AES-256-GCM key of one block, derived from the block's salt and
    /// plaintext. It is recorded only inside sealed manifests.
    BlockKey
}

secret! {
    /// An owner's key for sealing manifests (AES-256-GCM). Whoever holds it
    /// can read every data set the owner stored; without it the store holds
    /// only opaque ciphertext.
    ManifestKey
}

impl ManifestKey {
    /// A fresh random key from the operating system's generator.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut k = [0u8; HASH_LEN];
        getrandom::fill(&mut k)?;
        Ok(Self(k))
    }
}

secret! {
    /// The salt mixed into a block key. Blocks with the same plaintext and the
    /// same salt get the same ciphertext (and are stored once); a different
    /// salt gives an unrelated ciphertext. See [`Redundancy`](super::Redundancy).
    Salt
}

impl Salt {
    /// The all-zero salt: plain convergent encryption, deduplicating with
    /// every other user of the zero salt.
    pub const ZERO: Salt = Salt([0; HASH_LEN]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let mut b = [0u8; 32];
        for (i, x) in b.iter_mut().enumerate() {
            *x = (i * 7) as u8;
        }
        let id = BlockId::from_bytes(b);
        let s = id.to_string();
        assert_eq!(s.len(), 64);
        assert_eq!(s.parse::<BlockId>().unwrap(), id);
        assert_eq!(s.to_uppercase().parse::<BlockId>().unwrap(), id);
        assert!("zz".repeat(32).parse::<BlockId>().is_err());
        assert!("ab".parse::<ManifestId>().is_err());
        // Multi-byte UTF-8 of the right byte length must not panic.
        assert!("é".repeat(32).parse::<ManifestId>().is_err());
    }

    #[test]
    fn secrets_do_not_print() {
        let k = BlockKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{k:?}"), "BlockKey(..)");
    }
}
