//! Manifests: the recipe to rebuild one data set, sealed under its owner's key.
//!
//! A sealed manifest has two layers (byte layouts in `docs/store-format.md`):
//!
//! - a clear header: magic, version, the owner's key id, the nonce, and the
//!   sorted set of block ids the manifest references. Garbage collection and
//!   `verify` read only this layer, so they run without any owner's key. The
//!   header is authenticated (it is the AES-GCM associated data).
//! - an encrypted body: block size, total length, user metadata, and the
//!   ordered entries (zero run, or reference + block key + length).
//!
//! Parsing treats its input as hostile: every length is checked against the
//! bytes actually present before anything is allocated, and every failure is
//! a [`ManifestError`], never a panic.

use super::block::MAX_BLOCK_SIZE;
use super::crypto::{self, NONCE_LEN, TAG_LEN};
use super::ids::{BlockId, BlockKey, ManifestKey, HASH_LEN};

/// First bytes of every sealed manifest.
pub const MANIFEST_MAGIC: [u8; 8] = *b"SNAPVMMF";
/// The manifest format version this crate writes and reads.
pub const MANIFEST_VERSION: u16 = 1;
/// Length of the fixed part of the clear header (before the reference table).
pub const HEADER_LEN: usize = 44;
/// Bytes of one entry in the body: kind, length, reference index, key.
const DATA_ENTRY_LEN: usize = 1 + 4 + 4 + HASH_LEN;
const ZERO_ENTRY_LEN: usize = 1 + 4;
const ENTRY_ZERO: u8 = 0;
const ENTRY_DATA: u8 = 1;

/// One block-sized piece of a data set, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    /// `len` zero bytes; nothing is stored.
    Zero {
        /// Length in bytes.
        len: u32,
    },
    /// A stored block.
    Data {
        /// The block's content address.
        id: BlockId,
        /// The key that decrypts it.
        key: BlockKey,
        /// Its plaintext length.
        len: u32,
    },
}

impl Entry {
    /// Plaintext length of the entry.
    pub fn len(&self) -> u32 {
        match self {
            Entry::Zero { len } | Entry::Data { len, .. } => *len,
        }
    }

    /// Whether the entry is zero bytes long (never true in a valid manifest).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The opened form of a manifest: everything needed to rebuild a data set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    /// The block size the data set was cut with.
    pub block_size: u32,
    /// Total length of the data set in bytes.
    pub total_len: u64,
    /// Opaque user metadata, stored encrypted with the manifest.
    pub metadata: Vec<u8>,
    /// The blocks, in order. Every entry but the last is `block_size` long.
    pub entries: Vec<Entry>,
}

/// Why a sealed manifest could not be opened.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ManifestError {
    /// The object ends before a length it declares: cut short.
    #[error("truncated: {needed} bytes needed, {len} present")]
    Truncated {
        /// Bytes the declared layout needs (at least).
        needed: u64,
        /// Bytes present.
        len: u64,
    },
    /// The object does not start with [`MANIFEST_MAGIC`]: not a manifest.
    #[error("not a snapvm manifest (bad magic)")]
    BadMagic,
    /// A format version this crate does not read.
    #[error("unsupported manifest version {version}")]
    UnsupportedVersion {
        /// The version found.
        version: u16,
    },
    /// Flag bits this crate does not know are set.
    #[error("unknown manifest flags {flags:#06x}")]
    UnknownFlags {
        /// The flags found.
        flags: u16,
    },
    /// The manifest was sealed under a different owner's key.
    #[error("sealed under a different manifest key")]
    WrongKey,
    /// Bytes follow the sealed body.
    #[error("{extra} unexpected bytes after the sealed body")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// Authentication failed under the right key: the bytes were altered.
    #[error("authentication failed: the manifest was altered")]
    Tampered,
    /// The manifest authenticated but its contents break the format's rules
    /// (a writer bug or a foreign writer).
    #[error("malformed manifest body: {0}")]
    Malformed(#[from] Malformed),
}

/// A rule of the manifest format that a body breaks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum Malformed {
    /// The reference table is not strictly ascending (sorted, no duplicates).
    #[error("reference table not strictly ascending")]
    RefsNotSorted,
    /// The block size is 0 or above 16 MiB.
    #[error("block size {0} out of range")]
    BlockSize(u32),
    /// The body ends early.
    #[error("body truncated")]
    BodyTruncated,
    /// The entry count does not match the total length and block size.
    #[error("entry count {count} does not match total length {total_len}")]
    EntryCount {
        /// Declared entry count.
        count: u64,
        /// Declared total length.
        total_len: u64,
    },
    /// An entry kind byte other than 0 (zero) or 1 (data).
    #[error("entry {index}: unknown kind {kind}")]
    EntryKind {
        /// Entry index.
        index: u64,
        /// The kind byte.
        kind: u8,
    },
    /// An entry length that fixed-size chunking cannot produce.
    #[error("entry {index}: bad length {len}")]
    EntryLength {
        /// Entry index.
        index: u64,
        /// The length found.
        len: u32,
    },
    /// A reference index beyond the reference table.
    #[error("entry {index}: reference {reference} out of range")]
    RefIndex {
        /// Entry index.
        index: u64,
        /// The reference index.
        reference: u32,
    },
    /// A reference-table id that no entry uses.
    #[error("reference table lists a block no entry uses")]
    UnusedRef,
    /// Bytes after the last entry.
    #[error("trailing bytes after the entries")]
    TrailingBytes,
}

/// The clear layer of a sealed manifest, readable without any key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SealedHeader {
    /// The owner's key id ([`key_id`]).
    pub key_id: [u8; 8],
    /// The AES-GCM nonce of the body.
    pub nonce: [u8; NONCE_LEN],
    /// Every block the manifest references, ascending, without duplicates.
    pub refs: Vec<BlockId>,
    /// Offset of the encrypted body.
    pub body_offset: usize,
}

/// The 8-byte public id of a manifest key, as written in sealed manifests.
pub fn key_id(key: &ManifestKey) -> [u8; 8] {
    crypto::manifest_key_id(key)
}

/// A little-endian reader over untrusted bytes that never panics.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn array<const N: usize>(&mut self) -> Option<[u8; N]> {
        self.take(N).and_then(|s| s.try_into().ok())
    }
    fn u8(&mut self) -> Option<u8> {
        self.array::<1>().map(|a| a[0])
    }
    fn u16(&mut self) -> Option<u16> {
        self.array().map(u16::from_le_bytes)
    }
    fn u32(&mut self) -> Option<u32> {
        self.array().map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.array().map(u64::from_le_bytes)
    }
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
}

impl SealedHeader {
    /// Parses the clear layer of a sealed manifest.
    pub fn parse(bytes: &[u8]) -> Result<Self, ManifestError> {
        let len = bytes.len() as u64;
        let truncated = |needed: u64| ManifestError::Truncated { needed, len };
        let mut c = Cursor { buf: bytes, pos: 0 };
        let magic: [u8; 8] = c.array().ok_or(truncated(HEADER_LEN as u64))?;
        if magic != MANIFEST_MAGIC {
            return Err(ManifestError::BadMagic);
        }
        let version = c.u16().ok_or(truncated(HEADER_LEN as u64))?;
        if version != MANIFEST_VERSION {
            return Err(ManifestError::UnsupportedVersion { version });
        }
        let flags = c.u16().ok_or(truncated(HEADER_LEN as u64))?;
        if flags != 0 {
            return Err(ManifestError::UnknownFlags { flags });
        }
        let key_id: [u8; 8] = c.array().ok_or(truncated(HEADER_LEN as u64))?;
        let nonce: [u8; NONCE_LEN] = c.array().ok_or(truncated(HEADER_LEN as u64))?;
        let ref_count = c.u32().ok_or(truncated(HEADER_LEN as u64))?;
        let body_len = c.u64().ok_or(truncated(HEADER_LEN as u64))?;
        // Check the declared layout against the bytes present before
        // allocating anything sized by it.
        let needed =
            (HEADER_LEN as u64 + u64::from(ref_count) * HASH_LEN as u64).saturating_add(body_len);
        if needed > len {
            return Err(truncated(needed));
        }
        if body_len < TAG_LEN as u64 {
            return Err(ManifestError::Tampered);
        }
        if needed < len {
            return Err(ManifestError::TrailingBytes {
                extra: len - needed,
            });
        }
        let mut refs = Vec::with_capacity(ref_count as usize);
        for _ in 0..ref_count {
            let id: [u8; HASH_LEN] = c.array().ok_or(truncated(needed))?;
            let id = BlockId::from_bytes(id);
            if refs.last().is_some_and(|prev| *prev >= id) {
                return Err(Malformed::RefsNotSorted.into());
            }
            refs.push(id);
        }
        Ok(Self {
            key_id,
            nonce,
            refs,
            body_offset: c.pos,
        })
    }
}

impl Manifest {
    /// The distinct blocks the manifest references, ascending.
    pub fn refs(&self) -> Vec<BlockId> {
        let mut refs: Vec<BlockId> = self
            .entries
            .iter()
            .filter_map(|e| match e {
                Entry::Data { id, .. } => Some(*id),
                Entry::Zero { .. } => None,
            })
            .collect();
        refs.sort_unstable();
        refs.dedup();
        refs
    }

    /// Length of the sealed form, without building it.
    pub fn sealed_len(&self) -> usize {
        let refs = self.refs().len();
        HEADER_LEN + refs * HASH_LEN + self.body_len() + TAG_LEN
    }

    fn body_len(&self) -> usize {
        let entries: usize = self
            .entries
            .iter()
            .map(|e| match e {
                Entry::Zero { .. } => ZERO_ENTRY_LEN,
                Entry::Data { .. } => DATA_ENTRY_LEN,
            })
            .sum();
        4 + 8 + 4 + self.metadata.len() + 8 + entries
    }

    /// The plaintext body, given the manifest's sorted reference table.
    /// Returns `None` if an entry's id is not in `refs` or the metadata is
    /// longer than `u32::MAX` (callers build `refs` with [`Manifest::refs`]
    /// and bound metadata first).
    pub fn encode_body(&self, refs: &[BlockId]) -> Option<Vec<u8>> {
        let meta_len = u32::try_from(self.metadata.len()).ok()?;
        let mut out = Vec::with_capacity(self.body_len());
        out.extend_from_slice(&self.block_size.to_le_bytes());
        out.extend_from_slice(&self.total_len.to_le_bytes());
        out.extend_from_slice(&meta_len.to_le_bytes());
        out.extend_from_slice(&self.metadata);
        out.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            match e {
                Entry::Zero { len } => {
                    out.push(ENTRY_ZERO);
                    out.extend_from_slice(&len.to_le_bytes());
                }
                Entry::Data { id, key, len } => {
                    let index = u32::try_from(refs.binary_search(id).ok()?).ok()?;
                    out.push(ENTRY_DATA);
                    out.extend_from_slice(&len.to_le_bytes());
                    out.extend_from_slice(&index.to_le_bytes());
                    out.extend_from_slice(key.as_bytes());
                }
            }
        }
        Some(out)
    }

    /// Parses and validates a plaintext body against its reference table.
    /// This is the second parsing stage of [`Manifest::open`], exposed for
    /// fuzzing and for independent tools.
    pub fn decode_body(body: &[u8], refs: &[BlockId]) -> Result<Manifest, ManifestError> {
        let mut c = Cursor { buf: body, pos: 0 };
        let short = || ManifestError::Malformed(Malformed::BodyTruncated);
        let block_size = c.u32().ok_or_else(short)?;
        if block_size == 0 || block_size as usize > MAX_BLOCK_SIZE {
            return Err(Malformed::BlockSize(block_size).into());
        }
        let total_len = c.u64().ok_or_else(short)?;
        let meta_len = c.u32().ok_or_else(short)?;
        let metadata = c.take(meta_len as usize).ok_or_else(short)?.to_vec();
        let count = c.u64().ok_or_else(short)?;
        let expected = total_len.div_ceil(u64::from(block_size));
        if count != expected {
            return Err(Malformed::EntryCount { count, total_len }.into());
        }
        // Every entry takes at least ZERO_ENTRY_LEN bytes: bound the
        // allocation by what is actually present.
        if count > (c.remaining() / ZERO_ENTRY_LEN) as u64 {
            return Err(short());
        }
        let mut used = vec![false; refs.len()];
        let mut entries = Vec::with_capacity(count as usize);
        for index in 0..count {
            let kind = c.u8().ok_or_else(short)?;
            let len = c.u32().ok_or_else(short)?;
            let want = if index + 1 == count {
                // count == ceil(total / bs) >= 1 here, so this cannot underflow.
                total_len - (count - 1) * u64::from(block_size)
            } else {
                u64::from(block_size)
            };
            if u64::from(len) != want {
                return Err(Malformed::EntryLength { index, len }.into());
            }
            match kind {
                ENTRY_ZERO => entries.push(Entry::Zero { len }),
                ENTRY_DATA => {
                    let reference = c.u32().ok_or_else(short)?;
                    let key: [u8; HASH_LEN] = c.array().ok_or_else(short)?;
                    let Some(id) = refs.get(reference as usize) else {
                        return Err(Malformed::RefIndex { index, reference }.into());
                    };
                    used[reference as usize] = true;
                    entries.push(Entry::Data {
                        id: *id,
                        key: BlockKey::from_bytes(key),
                        len,
                    });
                }
                kind => return Err(Malformed::EntryKind { index, kind }.into()),
            }
        }
        if c.remaining() != 0 {
            return Err(Malformed::TrailingBytes.into());
        }
        if used.iter().any(|u| !u) {
            return Err(Malformed::UnusedRef.into());
        }
        Ok(Manifest {
            block_size,
            total_len,
            metadata,
            entries,
        })
    }

    /// Seals the manifest under `key` with a fresh random nonce; fails with
    /// [`StoreError::Random`](super::StoreError::Random) when the operating
    /// system gives no randomness.
    ///
    /// # Panics
    /// If the metadata is longer than `u32::MAX` bytes (the store rejects
    /// such metadata with [`StoreError::MetadataTooLarge`](super::StoreError)
    /// long before).
    pub fn seal(&self, key: &ManifestKey) -> Result<Vec<u8>, super::StoreError> {
        let refs = self.refs();
        let mut body = self
            .encode_body(&refs)
            .expect("refs come from the entries and metadata is bounded by the store");
        let mut out = Vec::with_capacity(HEADER_LEN + refs.len() * HASH_LEN + body.len() + TAG_LEN);
        out.extend_from_slice(&MANIFEST_MAGIC);
        out.extend_from_slice(&MANIFEST_VERSION.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&key_id(key));
        let nonce_at = out.len();
        out.extend_from_slice(&[0; NONCE_LEN]);
        out.extend_from_slice(&(refs.len() as u32).to_le_bytes());
        out.extend_from_slice(&((body.len() + TAG_LEN) as u64).to_le_bytes());
        for r in &refs {
            out.extend_from_slice(r.as_bytes());
        }
        // The nonce is part of the associated data; draw it first.
        let mut nonce = [0u8; NONCE_LEN];
        super::error::fill_random(&mut nonce)?;
        out[nonce_at..nonce_at + NONCE_LEN].copy_from_slice(&nonce);
        crypto::seal_manifest_body_with_nonce(key, &nonce, &out, &mut body);
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Opens a sealed manifest with the owner's key.
    pub fn open(sealed: &[u8], key: &ManifestKey) -> Result<Manifest, ManifestError> {
        let header = SealedHeader::parse(sealed)?;
        if header.key_id != key_id(key) {
            return Err(ManifestError::WrongKey);
        }
        let (aad, ct) = sealed.split_at(header.body_offset);
        let mut body = ct.to_vec();
        if !crypto::open_manifest_body(key, &header.nonce, aad, &mut body) {
            return Err(ManifestError::Tampered);
        }
        Self::decode_body(&body, &header.refs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        let id = |b: u8| BlockId::from_bytes([b; 32]);
        let key = |b: u8| BlockKey::from_bytes([b; 32]);
        Manifest {
            block_size: 4,
            total_len: 14,
            metadata: b"meta".to_vec(),
            entries: vec![
                Entry::Data {
                    id: id(9),
                    key: key(1),
                    len: 4,
                },
                Entry::Zero { len: 4 },
                Entry::Data {
                    id: id(3),
                    key: key(2),
                    len: 4,
                },
                Entry::Data {
                    id: id(9),
                    key: key(1),
                    len: 2,
                },
            ],
        }
    }

    #[test]
    fn seal_open_round_trip() {
        let key = ManifestKey::from_bytes([5; 32]);
        let m = sample();
        let sealed = m.seal(&key).unwrap();
        assert_eq!(sealed.len(), m.sealed_len());
        let h = SealedHeader::parse(&sealed).unwrap();
        assert_eq!(
            h.refs,
            vec![BlockId::from_bytes([3; 32]), BlockId::from_bytes([9; 32])]
        );
        assert_eq!(Manifest::open(&sealed, &key).unwrap(), m);
        // Random nonce: sealing twice differs.
        assert_ne!(m.seal(&key).unwrap(), sealed);
    }

    #[test]
    fn typed_failures() {
        let key = ManifestKey::from_bytes([5; 32]);
        let sealed = sample().seal(&key).unwrap();
        let other = ManifestKey::from_bytes([6; 32]);
        assert_eq!(
            Manifest::open(&sealed, &other),
            Err(ManifestError::WrongKey)
        );
        for cut in [
            0,
            7,
            20,
            35,
            36,
            43,
            60,
            HEADER_LEN + 64 + 15,
            sealed.len() - 1,
        ] {
            assert!(
                matches!(
                    Manifest::open(&sealed[..cut], &key),
                    Err(ManifestError::Truncated { .. })
                ),
                "cut {cut}"
            );
        }
        let mut long = sealed.clone();
        long.push(0);
        assert_eq!(
            Manifest::open(&long, &key),
            Err(ManifestError::TrailingBytes { extra: 1 })
        );
        for pos in [24, HEADER_LEN + 3, sealed.len() - 1, sealed.len() - 20] {
            let mut t = sealed.clone();
            t[pos] ^= 0x40;
            assert_eq!(
                Manifest::open(&t, &key),
                Err(ManifestError::Tampered),
                "pos {pos}"
            );
        }
        let mut t = sealed.clone();
        t[0] = b'X';
        assert_eq!(Manifest::open(&t, &key), Err(ManifestError::BadMagic));
        let mut t = sealed.clone();
        t[8] = 2;
        assert_eq!(
            Manifest::open(&t, &key),
            Err(ManifestError::UnsupportedVersion { version: 2 })
        );
    }

    #[test]
    fn huge_ref_count_does_not_allocate() {
        let mut b = Vec::new();
        b.extend_from_slice(&MANIFEST_MAGIC);
        b.extend_from_slice(&1u16.to_le_bytes());
        b.extend_from_slice(&0u16.to_le_bytes());
        b.extend_from_slice(&[0; 8 + 12]);
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            SealedHeader::parse(&b),
            Err(ManifestError::Truncated { .. })
        ));
    }

    #[test]
    fn body_rules() {
        let refs = [BlockId::from_bytes([1; 32])];
        let m = Manifest {
            block_size: 8,
            total_len: 8,
            metadata: vec![],
            entries: vec![Entry::Data {
                id: refs[0],
                key: BlockKey::from_bytes([0; 32]),
                len: 8,
            }],
        };
        let body = m.encode_body(&refs).unwrap();
        assert_eq!(Manifest::decode_body(&body, &refs).unwrap(), m);
        // Unused reference.
        let two = [refs[0], BlockId::from_bytes([2; 32])];
        assert_eq!(
            Manifest::decode_body(&body, &two),
            Err(Malformed::UnusedRef.into())
        );
        // Reference out of range.
        assert!(matches!(
            Manifest::decode_body(&body, &[]),
            Err(ManifestError::Malformed(Malformed::RefIndex { .. }))
        ));
        // Trailing byte.
        let mut t = body.clone();
        t.push(0);
        assert_eq!(
            Manifest::decode_body(&t, &refs),
            Err(Malformed::TrailingBytes.into())
        );
        // Huge entry count with no bytes behind it.
        let mut t = body[..16].to_vec();
        t[4..12].copy_from_slice(&(u64::MAX - 7).to_le_bytes());
        t.extend_from_slice(&(u64::MAX / 8).to_le_bytes());
        assert_eq!(
            Manifest::decode_body(&t, &refs),
            Err(Malformed::BodyTruncated.into())
        );
        // Empty data set: zero entries.
        let empty = Manifest {
            block_size: 8,
            total_len: 0,
            metadata: vec![1],
            entries: vec![],
        };
        let body = empty.encode_body(&[]).unwrap();
        assert_eq!(Manifest::decode_body(&body, &[]).unwrap(), empty);
    }
}
