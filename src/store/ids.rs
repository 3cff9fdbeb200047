//! Newtypes for the store's content addresses, keys and salts.
//!
//! Every one of them is 32 bytes. Ids print as 64 lowercase hex digits (the
//! form used in object names) and parse back from that form. Secrets never
//! show their bytes in `Debug` output; only [`ManifestKey`] has a `Display`
//! (the key in hex, to hand it to another process) and a `FromStr`.

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
        return Err(ParseIdError::Length { len: s.len() });
    }
    let mut out = [0u8; HASH_LEN];
    for (i, pair) in s.chunks_exact(2).enumerate() {
        let digit = |j: usize| hex_val(pair[j]).ok_or(ParseIdError::NotHex { index: 2 * i + j });
        out[i] = (digit(0)? << 4) | digit(1)?;
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

/// A string that is not 64 hex digits was given where an id or a
/// [`ManifestKey`] was expected (`str::parse`). The error never holds any
/// of the rejected text, so it is safe to log even when the text was meant
/// to be a key.
///
/// ```
/// use snapvm::store::{ManifestId, ParseIdError};
///
/// assert_eq!("ab".parse::<ManifestId>(), Err(ParseIdError::Length { len: 2 }));
/// let bad = format!("{}g{}", "0".repeat(10), "0".repeat(53));
/// assert_eq!(bad.parse::<ManifestId>(), Err(ParseIdError::NotHex { index: 10 }));
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseIdError {
    /// The string is not 64 bytes long.
    #[error("expected 64 hex digits, got {len} bytes")]
    Length {
        /// Length of the rejected string, in bytes.
        len: usize,
    },
    /// The string is 64 bytes long, but a byte is not a hex digit (`0-9`,
    /// `a-f`, `A-F`).
    #[error("expected 64 hex digits, byte {index} is not a hex digit")]
    NotHex {
        /// Offset of the first such byte.
        index: usize,
    },
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
    ///
    /// It prints (`Display`) as 64 lowercase hex digits and parses back
    /// (`FromStr`, either case), so an id passes between processes as text.
    /// An id reveals nothing about the data set; opening the manifest needs
    /// the owner's [`ManifestKey`].
    ///
    /// ```
    /// use snapvm::store::{ConvergentStore, ManifestId, ManifestKey, MemoryBackend, StoreConfig};
    ///
    /// let store = ConvergentStore::new(
    ///     &StoreConfig::default(),
    ///     MemoryBackend::new(),
    ///     ManifestKey::generate()?,
    /// )?;
    /// let id = store.put_bytes(b"some data", b"")?.manifest;
    /// let text = id.to_string(); // e.g. in a message to another process
    /// let back: ManifestId = text.parse()?;
    /// assert_eq!(store.get_bytes(&back)?, b"some data");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
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
    ///
    /// # Printing and parsing
    /// **`Display` reveals the key**: it prints the key's 64 hex digits, so
    /// that a key can be handed to another process (an environment variable,
    /// a secrets manager) and read back with `FromStr` (`str::parse`, either
    /// case; anything but 64 hex digits is a [`ParseIdError`], which holds
    /// none of the text). Treat that text like the key itself. `Debug` never
    /// shows the key: it prints `ManifestKey(..)`, so a key inside a logged
    /// structure stays hidden.
    ///
    /// ```
    /// use snapvm::store::ManifestKey;
    ///
    /// let key = ManifestKey::generate()?;
    /// let secret_text = key.to_string(); // the key itself: keep it secret
    /// let back: ManifestKey = secret_text.parse()?;
    /// assert_eq!(back, key);
    /// assert_eq!(format!("{key:?}"), "ManifestKey(..)");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ManifestKey
}

impl ManifestKey {
    /// A fresh random key from the operating system's generator; fails
    /// with [`StoreError::Random`](super::StoreError::Random) when it gives
    /// none.
    pub fn generate() -> Result<Self, super::StoreError> {
        let mut k = [0u8; HASH_LEN];
        super::error::fill_random(&mut k)?;
        Ok(Self(k))
    }
}

/// The key as 64 lowercase hex digits: this **reveals the key** (see
/// [`ManifestKey`]); `Debug` does not.
impl fmt::Display for ManifestKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_hex(f, &self.0)
    }
}

/// Parses a key printed by its `Display`: exactly 64 hex digits, either case.
impl FromStr for ManifestKey {
    type Err = ParseIdError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex(s).map(Self)
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
        assert_eq!(
            "zz".repeat(32).parse::<BlockId>(),
            Err(ParseIdError::NotHex { index: 0 })
        );
        assert_eq!(
            "ab".parse::<ManifestId>(),
            Err(ParseIdError::Length { len: 2 })
        );
        // Multi-byte UTF-8 of the right byte length must not panic.
        assert_eq!(
            "é".repeat(32).parse::<ManifestId>(),
            Err(ParseIdError::NotHex { index: 0 })
        );
    }

    /// The digits of `bytes`, by a route independent of `write_hex`.
    fn oracle_hex(bytes: &[u8; HASH_LEN]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    fn sample_bytes(seed: u8) -> [u8; HASH_LEN] {
        std::array::from_fn(|i| (i as u8).wrapping_mul(37).wrapping_add(seed))
    }

    #[test]
    fn manifest_ids_and_keys_round_trip_as_hex() {
        for seed in [0, 1, 0x5a, 0xff] {
            let bytes = sample_bytes(seed);
            let id = ManifestId::from_bytes(bytes);
            let key = ManifestKey::from_bytes(bytes);
            assert_eq!(id.to_string(), oracle_hex(&bytes));
            assert_eq!(key.to_string(), oracle_hex(&bytes));
            assert_eq!(id.to_string().parse::<ManifestId>(), Ok(id));
            assert_eq!(key.to_string().parse::<ManifestKey>(), Ok(key.clone()));
            // Either case parses; printing is always lowercase.
            let upper = key.to_string().to_uppercase();
            assert_eq!(upper.parse::<ManifestKey>(), Ok(key.clone()));
            assert_eq!(upper.parse::<ManifestId>(), Ok(id));
        }
        assert_eq!(
            ManifestKey::from_bytes([0; HASH_LEN]).to_string(),
            "0".repeat(64)
        );
    }

    #[test]
    fn bad_hex_is_a_typed_error() {
        let good = oracle_hex(&sample_bytes(3));
        for len in [0, 1, 2, 31, 32, 62, 63, 65, 66, 128] {
            let s: String = good.chars().cycle().take(len).collect();
            let err = ParseIdError::Length { len };
            assert_eq!(s.parse::<ManifestKey>(), Err(err));
            assert_eq!(s.parse::<ManifestId>(), Err(err));
        }
        for (index, bad) in [
            (0, 'g'),
            (1, 'G'),
            (17, ' '),
            (62, '-'),
            (63, 'x'),
            (40, '\0'),
        ] {
            let mut s = good.clone().into_bytes();
            s[index] = bad as u8;
            let s = String::from_utf8(s).unwrap();
            let err = ParseIdError::NotHex { index };
            assert_eq!(s.parse::<ManifestKey>(), Err(err));
            assert_eq!(s.parse::<ManifestId>(), Err(err));
        }
        // A prefix and surrounding white space are not accepted.
        assert!(format!("0x{}", &good[2..]).parse::<ManifestKey>().is_err());
        assert!(format!(" {good}").parse::<ManifestKey>().is_err());
        assert!(format!("{good}\n").parse::<ManifestId>().is_err());
        // Multi-byte UTF-8: the index is a byte offset, and nothing panics.
        let s = format!("{}é{}", &good[..10], &good[12..]);
        assert_eq!(
            s.parse::<ManifestKey>(),
            Err(ParseIdError::NotHex { index: 10 })
        );
    }

    #[test]
    fn secrets_do_not_print() {
        let k = BlockKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{k:?}"), "BlockKey(..)");
        let key = ManifestKey::from_bytes([0xab; 32]);
        assert_eq!(format!("{key:?}"), "ManifestKey(..)");
        assert_eq!(format!("{key:#?}"), "ManifestKey(..)");
        assert_eq!(format!("{:?}", Some(&key)), "Some(ManifestKey(..))");
        // A rejected key's error shows no digit of it.
        let text = "ab".repeat(31) + "zz";
        let err = text.parse::<ManifestKey>().unwrap_err();
        assert!(!err.to_string().contains("ab") && !format!("{err:?}").contains("ab"));
    }
}
