//! [`TraceCache`]: trace entries keyed by tenant, code, runtime and kind;
//! bounded by bytes with LRU eviction; in memory or persistent in a
//! directory (one checksummed, versioned file per entry).
//!
//! # Entry file format (version 1)
//!
//! ```text
//! offset  size  field
//!      0     8  magic "SNVTRACE"
//!      8     4  format version, u32 LE (1)
//!     12     4  key length K, u32 LE (<= MAX_KEY_LEN)
//!     16     8  value length V, u64 LE
//!     24     K  the encoded key (see `TraceKey::encode`)
//!   24+K     V  the value
//! 24+K+V    32  SHA-256 of bytes 0 .. 24+K+V
//! ```
//!
//! The file is named `<hex SHA-256 of the encoded key>.trace`. A file whose
//! magic, version, lengths, checksum, or name (the hash of the key it
//! carries) do not match is dropped with a warning and deleted.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};

use sha2::{Digest, Sha256};

use std::os::unix::fs::OpenOptionsExt;

use crate::sys::fs::{open_untrusted, UntrustedError, UntrustedFile};

use crate::vm::SnapshotId;

const MAGIC: &[u8; 8] = b"SNVTRACE";
/// Version of the entry file format and of the key encoding.
const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 24;
const DIGEST_LEN: usize = 32;
/// Longest encoded key accepted (tenant, runtime and function names).
pub const MAX_KEY_LEN: usize = 4096;
const SUFFIX: &str = ".trace";
const TEMP_SUFFIX: &str = ".tmp";

/// The code a trace was recorded against: a hash of the guest image and of
/// the snapshot the environment started from. A trace is only ever offered
/// to environments with the same `CodeId`.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct CodeId(pub [u8; 32]);

impl CodeId {
    /// The code identity of an environment running the guest image whose
    /// SHA-256 is `image_digest` (see
    /// [`GuestProgram::digest`](crate::GuestProgram::digest)) and which
    /// started from `snapshot`. A VM booted from its program rather than
    /// restored uses [`CodeId::booted`].
    pub fn of(image_digest: &[u8; 32], snapshot: SnapshotId) -> Self {
        Self::hash(image_digest, Some(snapshot))
    }

    /// The code identity of an environment booted from the guest image
    /// whose SHA-256 is `image_digest`, not restored from a snapshot.
    pub fn booted(image_digest: &[u8; 32]) -> Self {
        Self::hash(image_digest, None)
    }

    fn hash(image_digest: &[u8; 32], snapshot: Option<SnapshotId>) -> Self {
        let mut h = Sha256::new();
        h.update(b"snapvm code id v1\0");
        h.update(image_digest);
        match snapshot {
            Some(id) => {
                h.update([1]);
                h.update(id.0);
            }
            None => h.update([0]),
        }
        Self(h.finalize().into())
    }
}

impl fmt::Display for CodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for CodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CodeId({self})")
    }
}

/// What a trace entry holds.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TraceKind {
    /// The pages a restored VM touched (host side).
    WorkingSet,
    /// A blob the guest exported while running `function` (guest side; see
    /// `snapvm_guest::trace`).
    Profile {
        /// The guest function that exported it.
        function: String,
    },
}

/// Identifies a trace entry. Two environments share an entry only if every
/// field is equal: the same tenant, the same code, the same runtime version
/// and the same kind.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct TraceKey {
    /// Whose environments the trace comes from and may go to.
    pub tenant: String,
    /// The guest image and snapshot.
    pub code: CodeId,
    /// The runtime version (for example the host application's version,
    /// or an engine version the guest reports): bump it to invalidate
    /// every entry recorded by an older runtime.
    pub runtime: String,
    /// What the entry holds.
    pub kind: TraceKind,
}

impl TraceKey {
    /// The canonical encoding stored in entry files and hashed to name
    /// them: `tenant`, `code`, `runtime` and `kind`, each string prefixed
    /// with its length (u32 LE).
    fn encode(&self) -> Vec<u8> {
        fn put_str(out: &mut Vec<u8>, s: &str) {
            out.extend_from_slice(&(s.len() as u32).to_le_bytes());
            out.extend_from_slice(s.as_bytes());
        }
        let mut out = Vec::with_capacity(64 + self.tenant.len() + self.runtime.len());
        put_str(&mut out, &self.tenant);
        out.extend_from_slice(&self.code.0);
        put_str(&mut out, &self.runtime);
        match &self.kind {
            TraceKind::WorkingSet => out.push(0),
            TraceKind::Profile { function } => {
                out.push(1);
                put_str(&mut out, function);
            }
        }
        out
    }

    /// Decodes [`TraceKey::encode`]'s output; `None` if malformed.
    fn decode(mut b: &[u8]) -> Option<Self> {
        fn take<'a>(b: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
            if b.len() < n {
                return None;
            }
            let (head, tail) = b.split_at(n);
            *b = tail;
            Some(head)
        }
        fn take_str(b: &mut &[u8]) -> Option<String> {
            let len = u32::from_le_bytes(take(b, 4)?.try_into().ok()?) as usize;
            String::from_utf8(take(b, len)?.to_vec()).ok()
        }
        let tenant = take_str(&mut b)?;
        let code = CodeId(take(&mut b, 32)?.try_into().ok()?);
        let runtime = take_str(&mut b)?;
        let kind = match take(&mut b, 1)?[0] {
            0 => TraceKind::WorkingSet,
            1 => TraceKind::Profile {
                function: take_str(&mut b)?,
            },
            _ => return None,
        };
        b.is_empty().then_some(Self {
            tenant,
            code,
            runtime,
            kind,
        })
    }
}

/// Hash of an encoded key: names entry files and indexes the cache.
type KeyHash = [u8; 32];

fn key_hash(encoded: &[u8]) -> KeyHash {
    Sha256::digest(encoded).into()
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// What a [`TraceCache`] operation can fail with. Reading never fails
/// (a bad entry is dropped and reads as missing); writing can.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TraceError {
    /// The entry is larger than the cache's byte bound.
    #[error("trace entry of {size} bytes exceeds the cache's limit of {max} bytes")]
    TooLarge {
        /// Bytes the entry needs (key, value and framing).
        size: u64,
        /// The cache's bound.
        max: u64,
    },
    /// The key's tenant, runtime or function name is too long.
    #[error("trace key of {len} bytes exceeds {max} bytes")]
    KeyTooLarge {
        /// Encoded key length.
        len: usize,
        /// The limit ([`MAX_KEY_LEN`]).
        max: usize,
    },
    /// Creating or listing the cache directory failed.
    #[error("opening the trace cache directory {path} failed")]
    Open {
        /// The directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
    /// Writing an entry file failed.
    #[error("writing trace entry {path} failed")]
    Write {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: io::Error,
    },
}

/// One entry the cache holds.
struct Entry {
    key: TraceKey,
    /// Bytes the entry counts against the bound (its file size).
    size: u64,
    /// LRU position: a key of `Inner::order`.
    tick: u64,
    /// The value, for an in-memory cache; a persistent cache reads (and
    /// verifies) the file on every `get`.
    value: Option<Vec<u8>>,
}

struct Inner {
    entries: HashMap<KeyHash, Entry>,
    /// Least recently used first.
    order: BTreeMap<u64, KeyHash>,
    next_tick: u64,
    used: u64,
}

/// A bounded, optionally persistent cache of traces carried from one
/// short-lived environment to the next (see the [module docs](super)).
///
/// Entries are keyed by [`TraceKey`]; the cache holds at most `max_bytes`
/// (each entry counts its key, value and framing) and evicts the least
/// recently used entries to make room. A persistent cache keeps one file
/// per entry in a directory, written atomically (temporary file, `fsync`,
/// rename), so it survives process restarts; every file is versioned and
/// checksummed and carries its full key, so a corrupt, truncated, renamed,
/// stale (older format) or foreign file is dropped with a `log` warning and
/// deleted, never returned.
///
/// `TraceCache` is `Send + Sync`; share it with an `Arc`.
///
/// ```
/// use snapvm::trace::{CodeId, TraceCache, TraceKey, TraceKind};
///
/// let cache = TraceCache::in_memory(1 << 20);
/// let key = TraceKey {
///     tenant: "acme".into(),
///     code: CodeId::booted(&[7; 32]),
///     runtime: "1.0".into(),
///     kind: TraceKind::Profile { function: "scan".into() },
/// };
/// cache.put(&key, b"compiled form")?;
/// assert_eq!(cache.get(&key).as_deref(), Some(&b"compiled form"[..]));
/// let other_tenant = TraceKey { tenant: "globex".into(), ..key };
/// assert_eq!(cache.get(&other_tenant), None);
/// # Ok::<(), snapvm::trace::TraceError>(())
/// ```
pub struct TraceCache {
    dir: Option<PathBuf>,
    max_bytes: u64,
    inner: Mutex<Inner>,
}

impl fmt::Debug for TraceCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let inner = self.lock();
        f.debug_struct("TraceCache")
            .field("dir", &self.dir)
            .field("max_bytes", &self.max_bytes)
            .field("entries", &inner.entries.len())
            .field("used_bytes", &inner.used)
            .finish()
    }
}

impl TraceCache {
    /// A cache held in memory only, bounded by `max_bytes`.
    pub fn in_memory(max_bytes: u64) -> TraceCache {
        TraceCache {
            dir: None,
            max_bytes,
            inner: Mutex::new(Inner {
                entries: HashMap::new(),
                order: BTreeMap::new(),
                next_tick: 0,
                used: 0,
            }),
        }
    }

    /// Opens (creating it if needed) a persistent cache in `dir`, bounded
    /// by `max_bytes`. Every entry file is read and verified; bad files and
    /// leftover temporary files are deleted (with a warning), and if the
    /// entries exceed `max_bytes` the oldest (by modification time) are
    /// evicted.
    pub fn open(dir: impl AsRef<Path>, max_bytes: u64) -> Result<TraceCache, TraceError> {
        let dir = dir.as_ref().to_path_buf();
        let open_err = |source| TraceError::Open {
            path: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(open_err)?;
        let mut found = Vec::new();
        for dirent in fs::read_dir(&dir).map_err(open_err)? {
            let dirent = dirent.map_err(open_err)?;
            let path = dirent.path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else {
                continue;
            };
            if name.ends_with(TEMP_SUFFIX) {
                // An interrupted write: never renamed into place.
                let _ = fs::remove_file(&path);
                continue;
            }
            let Some(stem) = name.strip_suffix(SUFFIX) else {
                continue;
            };
            let Some(expected) = parse_hex32(stem) else {
                drop_file(&path, "its name is not a key hash");
                continue;
            };
            let Some((key, size)) = read_entry(&path, max_bytes).map(|(k, v)| {
                let size = entry_size(k.encode().len(), v.len());
                (k, size)
            }) else {
                continue;
            };
            if key_hash(&key.encode()) != expected {
                drop_file(&path, "it carries another key (renamed or foreign)");
                continue;
            }
            let mtime = dirent
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH);
            found.push((mtime, expected, key, size));
        }
        found.sort_by_key(|(mtime, ..)| *mtime);
        let cache = TraceCache::in_memory(max_bytes);
        let cache = TraceCache {
            dir: Some(dir),
            ..cache
        };
        {
            let mut inner = cache.lock();
            for (_, hash, key, size) in found {
                cache.insert(&mut inner, hash, key, size, None);
            }
        }
        Ok(cache)
    }

    /// The directory of a persistent cache.
    pub fn dir(&self) -> Option<&Path> {
        self.dir.as_deref()
    }

    /// The cache's byte bound.
    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    /// Bytes the entries currently use (keys, values and framing).
    pub fn used_bytes(&self) -> u64 {
        self.lock().used
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.lock().entries.len()
    }

    /// Whether the cache holds no entry.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The value stored under `key`, marking it most recently used. `None`
    /// if there is none, or if its file turned out corrupt, stale or
    /// foreign (then it is deleted, with a warning).
    pub fn get(&self, key: &TraceKey) -> Option<Vec<u8>> {
        let encoded = key.encode();
        let hash = key_hash(&encoded);
        let mut inner = self.lock();
        if !inner.entries.contains_key(&hash) {
            // Another process sharing the directory may have written it.
            let dir = self.dir.as_ref()?;
            let (found, value) = read_entry(&entry_path(dir, &hash), self.max_bytes)?;
            if found != *key {
                drop_file(
                    &entry_path(dir, &hash),
                    "it carries another key (renamed or foreign)",
                );
                return None;
            }
            let size = entry_size(encoded.len(), value.len());
            self.insert(&mut inner, hash, found, size, None);
            // `insert` may have evicted it right away (a full cache).
            return inner.entries.contains_key(&hash).then_some(value);
        }
        let entry = inner.entries.get(&hash)?;
        if entry.key != *key {
            // A SHA-256 collision; treat as missing.
            return None;
        }
        let value = match (&entry.value, &self.dir) {
            (Some(v), _) => Some(v.clone()),
            (None, Some(dir)) => {
                let path = entry_path(dir, &hash);
                match read_entry(&path, self.max_bytes) {
                    Some((k, v)) if k == *key => Some(v),
                    Some(_) => {
                        drop_file(&path, "it carries another key (renamed or foreign)");
                        None
                    }
                    None => None,
                }
            }
            (None, None) => None,
        };
        match value {
            Some(v) => {
                let tick = inner.next_tick;
                inner.next_tick += 1;
                let entry = inner.entries.get_mut(&hash).expect("entry exists");
                let old = std::mem::replace(&mut entry.tick, tick);
                inner.order.remove(&old);
                inner.order.insert(tick, hash);
                Some(v)
            }
            None => {
                Self::forget_entry(&mut inner, &hash);
                None
            }
        }
    }

    /// Stores `value` under `key`, replacing any older value and evicting
    /// least recently used entries until the cache fits its bound. A
    /// persistent cache writes the entry file atomically and `fsync`s it
    /// before returning.
    pub fn put(&self, key: &TraceKey, value: &[u8]) -> Result<(), TraceError> {
        let encoded = key.encode();
        if encoded.len() > MAX_KEY_LEN {
            return Err(TraceError::KeyTooLarge {
                len: encoded.len(),
                max: MAX_KEY_LEN,
            });
        }
        let size = entry_size(encoded.len(), value.len());
        if size > self.max_bytes {
            return Err(TraceError::TooLarge {
                size,
                max: self.max_bytes,
            });
        }
        let hash = key_hash(&encoded);
        let mut inner = self.lock();
        let stored = match &self.dir {
            Some(dir) => {
                write_entry(dir, &hash, &encoded, value)?;
                None
            }
            None => Some(value.to_vec()),
        };
        Self::forget_entry(&mut inner, &hash);
        self.insert(&mut inner, hash, key.clone(), size, stored);
        Ok(())
    }

    /// Removes the entry under `key`, if any.
    pub fn remove(&self, key: &TraceKey) {
        let hash = key_hash(&key.encode());
        let mut inner = self.lock();
        Self::forget_entry(&mut inner, &hash);
        if let Some(dir) = &self.dir {
            let _ = fs::remove_file(entry_path(dir, &hash));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // The state stays consistent at every unlock point, so a panic
        // elsewhere while holding the lock leaves nothing half-done.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds an entry (its hash not present) and evicts until within bound.
    fn insert(
        &self,
        inner: &mut Inner,
        hash: KeyHash,
        key: TraceKey,
        size: u64,
        value: Option<Vec<u8>>,
    ) {
        let tick = inner.next_tick;
        inner.next_tick += 1;
        inner.order.insert(tick, hash);
        inner.used += size;
        inner.entries.insert(
            hash,
            Entry {
                key,
                size,
                tick,
                value,
            },
        );
        while inner.used > self.max_bytes {
            let Some((_, victim)) = inner.order.pop_first() else {
                break;
            };
            if let Some(e) = inner.entries.remove(&victim) {
                inner.used -= e.size;
                log::debug!(target: "snapvm::trace", "evicting trace entry {}", hex(&victim));
            }
            if let Some(dir) = &self.dir {
                let _ = fs::remove_file(entry_path(dir, &victim));
            }
        }
    }

    /// Drops an entry from the index (its file is handled by the caller).
    fn forget_entry(inner: &mut Inner, hash: &KeyHash) {
        if let Some(e) = inner.entries.remove(hash) {
            inner.order.remove(&e.tick);
            inner.used -= e.size;
        }
    }
}

/// Parses the bytes of an entry file exactly as [`TraceCache::open`] and
/// [`TraceCache::get`] do: the key and value, or `None` for a file they
/// drop. For the `trace_entry` fuzz target (`snapvm::fuzzing::trace_entry`).
#[cfg(feature = "fuzzing")]
pub(crate) fn parse_entry_file(bytes: &[u8]) -> Option<(TraceKey, Vec<u8>)> {
    decode_entry(bytes).ok()
}

/// The bytes of the entry file for `key` and `value`. For the
/// `trace_entry` fuzz target (`snapvm::fuzzing::trace_entry`).
#[cfg(feature = "fuzzing")]
pub(crate) fn encode_entry_file(key: &TraceKey, value: &[u8]) -> Vec<u8> {
    encode_entry(&key.encode(), value)
}

/// Bytes an entry counts against the bound: its whole file.
fn entry_size(key_len: usize, value_len: usize) -> u64 {
    (HEADER_LEN + key_len + DIGEST_LEN) as u64 + value_len as u64
}

fn entry_path(dir: &Path, hash: &KeyHash) -> PathBuf {
    dir.join(format!("{}{SUFFIX}", hex(hash)))
}

fn parse_hex32(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

fn drop_file(path: &Path, why: &str) {
    log::warn!(
        target: "snapvm::trace",
        "dropping trace entry {}: {why}",
        path.display()
    );
    let _ = fs::remove_file(path);
}

/// Encodes an entry file (see the module docs).
fn encode_entry(encoded_key: &[u8], value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(entry_size(encoded_key.len(), value.len()) as usize);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(encoded_key.len() as u32).to_le_bytes());
    out.extend_from_slice(&(value.len() as u64).to_le_bytes());
    out.extend_from_slice(encoded_key);
    out.extend_from_slice(value);
    let digest = Sha256::digest(&out);
    out.extend_from_slice(&digest);
    out
}

/// Why an entry file's bytes were rejected.
fn decode_entry(bytes: &[u8]) -> Result<(TraceKey, Vec<u8>), &'static str> {
    if bytes.len() < HEADER_LEN + DIGEST_LEN {
        return Err("it is truncated");
    }
    if &bytes[..8] != MAGIC {
        return Err("it is not a trace entry");
    }
    let version = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err("it has another format version (stale)");
    }
    let key_len = u32::from_le_bytes(bytes[12..16].try_into().expect("4 bytes")) as u64;
    let value_len = u64::from_le_bytes(bytes[16..24].try_into().expect("8 bytes"));
    let expected = (HEADER_LEN + DIGEST_LEN) as u64;
    if key_len > MAX_KEY_LEN as u64
        || expected
            .checked_add(key_len)
            .and_then(|n| n.checked_add(value_len))
            != Some(bytes.len() as u64)
    {
        return Err("its lengths do not match its size");
    }
    let body_end = bytes.len() - DIGEST_LEN;
    let digest: [u8; 32] = Sha256::digest(&bytes[..body_end]).into();
    if digest[..] != bytes[body_end..] {
        return Err("its checksum does not match (corrupt)");
    }
    let key_end = HEADER_LEN + key_len as usize;
    let key = TraceKey::decode(&bytes[HEADER_LEN..key_end]).ok_or("its key is malformed")?;
    Ok((key, bytes[key_end..body_end].to_vec()))
}

/// Reads and verifies the entry at `path`; a bad file is deleted with a
/// warning. `None` also for a missing file or one over `max_bytes`.
///
/// The directory may be shared with other processes, so the file is opened
/// without following a link or waiting on a FIFO, must be a regular file,
/// and is read only up to `max_bytes` ([`open_untrusted`]): a FIFO, a
/// device or a symlink in place of an entry is dropped, never read.
fn read_entry(path: &Path, max_bytes: u64) -> Option<(TraceKey, Vec<u8>)> {
    let bytes = match open_untrusted(path, max_bytes).and_then(UntrustedFile::read_all) {
        Ok(b) => b,
        Err(UntrustedError::Open(e)) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(UntrustedError::TooLarge { .. }) => {
            drop_file(path, "it is larger than the cache's bound");
            return None;
        }
        Err(UntrustedError::Symlink) => {
            drop_file(path, "it is a symbolic link");
            return None;
        }
        Err(UntrustedError::NotAFile) => {
            drop_file(path, "it is not a regular file");
            return None;
        }
        Err(UntrustedError::Open(e) | UntrustedError::Stat(e) | UntrustedError::Read(e)) => {
            log::warn!(target: "snapvm::trace", "reading trace entry {} failed: {e}", path.display());
            return None;
        }
    };
    match decode_entry(&bytes) {
        Ok(entry) => Some(entry),
        Err(why) => {
            drop_file(path, why);
            None
        }
    }
}

/// Writes an entry file atomically: temporary file, `fsync`, rename,
/// `fsync` of the directory.
fn write_entry(
    dir: &Path,
    hash: &KeyHash,
    encoded_key: &[u8],
    value: &[u8],
) -> Result<(), TraceError> {
    let path = entry_path(dir, hash);
    // A unique temporary name, so concurrent writers (threads or
    // processes sharing the directory) never share one.
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let tmp = dir.join(format!(
        "{}.{}-{n}{TEMP_SUFFIX}",
        hex(hash),
        std::process::id()
    ));
    let write = || -> io::Result<()> {
        // A new file of our own (never a link or an existing file another
        // process placed under this name).
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)?;
        f.write_all(&encode_entry(encoded_key, value))?;
        f.sync_all()?;
        fs::rename(&tmp, &path)?;
        fs::File::open(dir)?.sync_all()
    };
    write().map_err(|source| {
        let _ = fs::remove_file(&tmp);
        TraceError::Write {
            path: path.clone(),
            source,
        }
    })
}

impl TraceError {
    /// What kind of failure this is (see [`ErrorKind`](crate::ErrorKind)): an entry or key
    /// over a limit is [`crate::ErrorKind::BadRequest`], I/O failures
    /// [`crate::ErrorKind::Host`].
    pub fn kind(&self) -> crate::ErrorKind {
        use TraceError as E;
        match self {
            E::TooLarge { .. } | E::KeyTooLarge { .. } => crate::ErrorKind::BadRequest,
            E::Open { .. } | E::Write { .. } => crate::ErrorKind::Host,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, function: &str) -> TraceKey {
        TraceKey {
            tenant: tenant.into(),
            code: CodeId::booted(&[1; 32]),
            runtime: "r1".into(),
            kind: TraceKind::Profile {
                function: function.into(),
            },
        }
    }

    #[test]
    fn key_encoding_round_trips() {
        for k in [
            key("a", "f"),
            key("", ""),
            TraceKey {
                kind: TraceKind::WorkingSet,
                ..key("t", "x")
            },
        ] {
            assert_eq!(TraceKey::decode(&k.encode()), Some(k));
        }
        let enc = key("tenant", "fn").encode();
        for cut in 0..enc.len() {
            assert_eq!(TraceKey::decode(&enc[..cut]), None);
        }
    }

    #[test]
    fn entry_decoding_rejects_every_single_bit_flip() {
        let k = key("t", "f");
        let file = encode_entry(&k.encode(), b"value bytes");
        assert_eq!(decode_entry(&file).unwrap(), (k, b"value bytes".to_vec()));
        for i in 0..file.len() {
            let mut bad = file.clone();
            bad[i] ^= 0x10;
            assert!(decode_entry(&bad).is_err(), "flip at {i} accepted");
        }
        for cut in 0..file.len() {
            assert!(decode_entry(&file[..cut]).is_err());
        }
    }

    #[test]
    fn code_ids_differ_by_image_and_snapshot() {
        let a = CodeId::booted(&[1; 32]);
        assert_ne!(a, CodeId::booted(&[2; 32]));
        assert_ne!(a, CodeId::of(&[1; 32], SnapshotId([0; 16])));
        assert_ne!(
            CodeId::of(&[1; 32], SnapshotId([0; 16])),
            CodeId::of(&[1; 32], SnapshotId([1; 16]))
        );
    }

    #[test]
    fn lru_evicts_least_recently_used() {
        let one = entry_size(key("t", "a").encode().len(), 100);
        let cache = TraceCache::in_memory(one * 2);
        cache.put(&key("t", "a"), &[0; 100]).unwrap();
        cache.put(&key("t", "b"), &[0; 100]).unwrap();
        assert!(cache.get(&key("t", "a")).is_some());
        cache.put(&key("t", "c"), &[0; 100]).unwrap();
        assert!(cache.get(&key("t", "b")).is_none());
        assert!(cache.get(&key("t", "a")).is_some());
        assert!(cache.get(&key("t", "c")).is_some());
        assert_eq!(cache.used_bytes(), one * 2);
    }
}
