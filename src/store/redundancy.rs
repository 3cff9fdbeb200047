//! Salt-controlled redundancy: how many ciphertexts one plaintext may have.
//!
//! A [`Redundancy`] is a set of `n` salts derived from a secret. Each put
//! picks one of them with a [`SaltSelector`]; every block of that put is
//! encrypted under the chosen salt. So a given plaintext block exists in at
//! most `n` encrypted forms across every store handle sharing the secret:
//! deduplication works within each salt, and losing (or leaking) one
//! ciphertext affects only the puts that chose that salt.
//!
//! Whoever knows a salt and a plaintext can compute the block id and confirm
//! that the block is stored. Keep the secret from the parties that must not
//! confirm each other's data: give them different salt indices and never
//! hand them the secret (for instance, the executor holds the secret and
//! assigns tenants with [`PerTenant`]).

use std::collections::hash_map::RandomState;
use std::fmt;
use std::hash::BuildHasher;
use std::num::NonZeroU32;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::crypto::{self, derive_salt};
use super::ids::{Salt, HASH_LEN};

/// A set of `copies` salts derived from a secret; see the module docs.
#[derive(Clone, PartialEq, Eq)]
pub struct Redundancy {
    secret: [u8; HASH_LEN],
    copies: NonZeroU32,
}

impl fmt::Debug for Redundancy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Redundancy")
            .field("copies", &self.copies)
            .finish_non_exhaustive()
    }
}

impl Default for Redundancy {
    /// One copy under the all-zero secret: plain convergent encryption.
    fn default() -> Self {
        Self::copies(1)
    }
}

impl Redundancy {
    /// `n` salts (at most `n` ciphertexts per plaintext) under the all-zero
    /// secret. A value of 0 is treated as 1. Set a secret with
    /// [`Redundancy::with_secret`] unless anyone may confirm content.
    pub fn copies(n: u32) -> Self {
        Self {
            secret: [0; HASH_LEN],
            copies: NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN),
        }
    }

    /// The same number of salts, derived from `secret`.
    pub fn with_secret(mut self, secret: [u8; HASH_LEN]) -> Self {
        self.secret = secret;
        self
    }

    /// Number of salts in the set.
    pub fn count(&self) -> u32 {
        self.copies.get()
    }

    /// Salt number `index % count`.
    pub fn salt(&self, index: u32) -> Salt {
        derive_salt(&self.secret, index % self.copies)
    }
}

/// What a [`SaltSelector`] may base its choice on.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct PutInfo<'a> {
    /// When the put started.
    pub time: SystemTime,
    /// The user metadata given to the put.
    pub metadata: &'a [u8],
}

impl<'a> PutInfo<'a> {
    /// Information for a put starting now.
    pub fn now(metadata: &'a [u8]) -> Self {
        Self {
            time: SystemTime::now(),
            metadata,
        }
    }
}

/// Chooses which salt of a [`Redundancy`] set a put uses.
///
/// `select` returns an index; the store takes it modulo `copies`, so any
/// return value is valid and the number of distinct salts — hence of
/// ciphertexts per plaintext — never exceeds `copies`. Returning the same
/// index for two puts lets them deduplicate against each other; different
/// indices keep their blocks apart. A closure
/// `Fn(&PutInfo, u32) -> u32` is a selector.
pub trait SaltSelector: Send + Sync {
    /// The salt index for one put, given the number of salts.
    fn select(&self, put: &PutInfo<'_>, copies: u32) -> u32;
}

impl<F> SaltSelector for F
where
    F: Fn(&PutInfo<'_>, u32) -> u32 + Send + Sync,
{
    fn select(&self, put: &PutInfo<'_>, copies: u32) -> u32 {
        self(put, copies)
    }
}

fn hash_index(domain: &[u8], name: &[u8], copies: u32) -> u32 {
    let mut buf = Vec::with_capacity(domain.len() + name.len());
    buf.extend_from_slice(domain);
    buf.extend_from_slice(name);
    let d = crypto::sha256(&buf);
    let v = u64::from_le_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]]);
    (v % u64::from(copies.max(1))) as u32
}

/// One salt per tenant: `SHA-256("snapvm-store-v1 tenant\0" || tenant)`
/// modulo `copies`. Tenants mapped to different indices never share a
/// ciphertext. With more tenants than copies, some tenants share a salt;
/// use [`PerTenant::with_index`] to assign indices explicitly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerTenant {
    index: Option<u32>,
    tenant: Vec<u8>,
}

impl PerTenant {
    /// The salt chosen by hashing the tenant's name.
    pub fn new(tenant: impl AsRef<[u8]>) -> Self {
        Self {
            index: None,
            tenant: tenant.as_ref().to_vec(),
        }
    }

    /// An explicitly assigned salt index (for example from a tenant table).
    pub fn with_index(index: u32) -> Self {
        Self {
            index: Some(index),
            tenant: Vec::new(),
        }
    }
}

impl SaltSelector for PerTenant {
    fn select(&self, _: &PutInfo<'_>, copies: u32) -> u32 {
        self.index
            .unwrap_or_else(|| hash_index(b"snapvm-store-v1 tenant\0", &self.tenant, copies))
    }
}

/// One salt per location (zone, host, rack): `SHA-256("snapvm-store-v1
/// location\0" || location)` modulo `copies`. Blocks then deduplicate within
/// a location, and a location's loss or leak touches only its own copies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PerLocation {
    location: Vec<u8>,
}

impl PerLocation {
    /// The salt chosen by hashing the location's name.
    pub fn new(location: impl AsRef<[u8]>) -> Self {
        Self {
            location: location.as_ref().to_vec(),
        }
    }
}

impl SaltSelector for PerLocation {
    fn select(&self, _: &PutInfo<'_>, copies: u32) -> u32 {
        hash_index(b"snapvm-store-v1 location\0", &self.location, copies)
    }
}

/// The salt rotates with time: index = (seconds since the Unix epoch /
/// window) modulo `copies`. Data written in one window deduplicates with
/// that window; after `copies` windows a salt comes round again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PerTimeWindow {
    window: Duration,
}

impl PerTimeWindow {
    /// Windows of `window` (at least one second).
    pub fn new(window: Duration) -> Self {
        Self {
            window: window.max(Duration::from_secs(1)),
        }
    }
}

impl SaltSelector for PerTimeWindow {
    fn select(&self, put: &PutInfo<'_>, copies: u32) -> u32 {
        let secs = put
            .time
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        ((secs / self.window.as_secs()) % u64::from(copies.max(1))) as u32
    }
}

/// A uniformly random salt per put: spreads copies evenly, deduplicates
/// across puts only by chance (1 in `copies`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Random;

impl SaltSelector for Random {
    fn select(&self, _: &PutInfo<'_>, copies: u32) -> u32 {
        let mut b = [0u8; 4];
        let v = match getrandom::fill(&mut b) {
            Ok(()) => u32::from_le_bytes(b),
            // Without OS randomness, the std hasher's per-process random keys
            // still spread puts (uniformity, not secrecy, is all we need).
            Err(_) => RandomState::new().hash_one(SystemTime::now()) as u32,
        };
        v % copies.max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn salts_are_bounded_and_distinct() {
        let r = Redundancy::copies(3).with_secret([7; 32]);
        let salts: Vec<Salt> = (0..10).map(|i| r.salt(i)).collect();
        let mut distinct = salts.clone();
        distinct.sort_by_key(|s| *s.as_bytes());
        distinct.dedup();
        assert_eq!(distinct.len(), 3);
        assert_eq!(salts[0], salts[3]);
        assert_ne!(
            r.salt(0),
            Redundancy::copies(3).salt(0),
            "secret changes salts"
        );
        assert_eq!(Redundancy::copies(0).count(), 1);
    }

    #[test]
    fn selectors() {
        let put = PutInfo::now(b"");
        assert_eq!(PerTenant::new("a").select(&put, 1), 0);
        assert!(PerTenant::new("acme").select(&put, 5) < 5);
        assert_eq!(
            PerTenant::new("acme").select(&put, 5),
            PerTenant::new("acme").select(&put, 5)
        );
        assert_eq!(PerTenant::with_index(4).select(&put, 5), 4);
        assert!(PerLocation::new("zone-a").select(&put, 4) < 4);
        let at = |secs| PutInfo {
            time: UNIX_EPOCH + Duration::from_secs(secs),
            metadata: b"",
        };
        let w = PerTimeWindow::new(Duration::from_secs(10));
        assert_eq!(w.select(&at(5), 3), 0);
        assert_eq!(w.select(&at(15), 3), 1);
        assert_eq!(w.select(&at(35), 3), 0);
        assert!((0..50).all(|_| Random.select(&put, 3) < 3));
        let closure = |_: &PutInfo<'_>, _: u32| 2u32;
        assert_eq!(closure.select(&put, 3), 2);
    }
}
