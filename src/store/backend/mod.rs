//! Where stored objects live: the [`Backend`] trait and its implementations.
//!
//! A backend is a flat map from [`ObjectName`] to immutable bytes. It knows
//! nothing about blocks, keys or manifests. Every object is written once and
//! never modified; the store only ever creates, reads, lists and deletes.

mod fs;
mod memory;
#[cfg(feature = "s3")]
mod s3;

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use fs::{Durability, FsBackend};
pub use memory::MemoryBackend;
#[cfg(feature = "s3")]
pub use s3::{S3Backend, S3Config};

use super::error::BackendError;
use super::ids::{BlockId, ManifestId, HASH_LEN};

/// The kinds of object a store holds, each in its own namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Namespace {
    /// Encrypted blocks, named by [`BlockId`].
    Blocks,
    /// Sealed manifests, named by [`ManifestId`].
    Manifests,
    /// Write leases of puts in progress (see the GC protocol in `docs/store.md`).
    Leases,
    /// Markers of garbage-collection sweeps in progress.
    Sweeps,
}

impl Namespace {
    /// Every namespace.
    pub const ALL: [Namespace; 4] = [
        Namespace::Blocks,
        Namespace::Manifests,
        Namespace::Leases,
        Namespace::Sweeps,
    ];

    /// The namespace's directory or key prefix: `blocks`, `manifests`,
    /// `leases` or `sweeps`.
    pub const fn as_str(self) -> &'static str {
        match self {
            Namespace::Blocks => "blocks",
            Namespace::Manifests => "manifests",
            Namespace::Leases => "leases",
            Namespace::Sweeps => "sweeps",
        }
    }
}

impl fmt::Display for Namespace {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The name of one object: a namespace and a 32-byte id. Displays as
/// `namespace/<64 hex digits>`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectName {
    /// The namespace.
    pub namespace: Namespace,
    /// The id within the namespace.
    pub id: [u8; HASH_LEN],
}

impl ObjectName {
    /// The object holding block `id`.
    pub const fn block(id: &BlockId) -> Self {
        Self {
            namespace: Namespace::Blocks,
            id: *id.as_bytes(),
        }
    }

    /// The object holding manifest `id`.
    pub const fn manifest(id: &ManifestId) -> Self {
        Self {
            namespace: Namespace::Manifests,
            id: *id.as_bytes(),
        }
    }

    /// The id as 64 lowercase hex digits.
    pub fn hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut s = String::with_capacity(2 * HASH_LEN);
        for b in self.id {
            s.push(DIGITS[(b >> 4) as usize] as char);
            s.push(DIGITS[(b & 15) as usize] as char);
        }
        s
    }

    /// Parses a 64-hex-digit object id (as found in a listing); `None` for
    /// anything else, which listings skip.
    pub fn parse(namespace: Namespace, hex: &str) -> Option<Self> {
        hex.parse::<BlockId>()
            .ok()
            .filter(|_| hex.bytes().all(|c| !c.is_ascii_uppercase()))
            .map(|id| Self {
                namespace,
                id: *id.as_bytes(),
            })
    }
}

impl fmt::Display for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, BlockId::from_bytes(self.id))
    }
}

impl fmt::Debug for ObjectName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A backend operation, for error context.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Op {
    /// [`Backend::put_if_absent`].
    Put,
    /// [`Backend::get`].
    Get,
    /// [`Backend::has`].
    Has,
    /// [`Backend::delete`].
    Delete,
    /// [`Backend::remove_incomplete`].
    Cleanup,
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Has => "has",
            Op::Delete => "delete",
            Op::Cleanup => "cleanup",
        })
    }
}

/// What [`Backend::put_if_absent`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutOutcome {
    /// The object was written.
    Stored,
    /// An object of that name already existed (with these bytes, for
    /// backends that check); nothing was written (`S3Backend`: it was
    /// written again, see [`Backend::put_if_absent`]).
    AlreadyPresent,
}

/// What [`Backend::list_skipping`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct Listing {
    /// Every object listed, in no particular order.
    pub objects: Vec<ObjectName>,
    /// Parts of the namespace left out because listing them would follow a
    /// link (or they are not directories): their paths, never entered.
    pub skipped: Vec<PathBuf>,
}

impl Listing {
    /// A listing of `objects` that left out `skipped` (for backends
    /// implementing [`Backend::list_skipping`] themselves).
    pub fn new(objects: Vec<ObjectName>, skipped: Vec<PathBuf>) -> Self {
        Self { objects, skipped }
    }
}

/// Object storage for a [`ConvergentStore`](super::ConvergentStore).
///
/// Requirements on an implementation:
/// - `put_if_absent` is atomic: a reader (in any process) sees the whole
///   object or none of it, also after a crash at any point. Objects are
///   durable in the backend's sense once `flush` returns (a backend may make
///   each durable sooner); the store flushes before it writes a manifest
///   and after.
/// - After `put_if_absent` or `delete` returns, `get`, `has` and `list` in
///   any process observe it (read-after-write and list-after-write
///   consistency). The garbage-collection protocol relies on this.
/// - Names are content addresses (or random, for leases): writing an
///   existing name again may overwrite it with identical bytes.
pub trait Backend: Send + Sync {
    /// Stores `bytes` under `name` unless an object of that name exists.
    ///
    /// The store counts a block as stored only when this returns `Ok`, so
    /// `Ok` must mean that the object is durable and readable by every
    /// reader of the backend — for a replicated backend, written at its
    /// write quorum by this call or by one known to have completed. A
    /// backend that cannot tell an object held by too few replicas from a
    /// complete one must write it again.
    ///
    /// [`FsBackend`] and [`MemoryBackend`] compare an existing object with
    /// `bytes` (length first, then contents) and replace it if it differs,
    /// so putting the same data again heals a truncated or damaged object;
    /// there an existing object is exact proof. `S3Backend` always writes
    /// (a HEAD answers "present" when one replica holds the object), and
    /// reports [`PutOutcome::AlreadyPresent`] when a HEAD found it first.
    fn put_if_absent(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError>;

    /// Stores several objects, each as [`Backend::put_if_absent`] does,
    /// and returns one result per object, in the order given. Every object
    /// is attempted, also after one failed; an `Ok` means the same as
    /// there. The store hands each ingest thread's blocks over in batches
    /// of up to [`StoreConfig::queue_blocks`](super::StoreConfig::queue_blocks),
    /// so a backend with a long round trip can keep them all in flight at
    /// once (`S3Backend` issues them concurrently). The default puts them
    /// one after the other.
    fn put_many(&self, objects: &[(ObjectName, &[u8])]) -> Vec<Result<PutOutcome, BackendError>> {
        objects
            .iter()
            .map(|(name, bytes)| self.put_if_absent(name, bytes))
            .collect()
    }

    /// Reads an object; `Ok(None)` if it does not exist. An object longer
    /// than `limit` bytes is an error ([`BackendError::TooLarge`]), checked
    /// before its bytes are read.
    fn get(&self, name: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError>;

    /// Whether an object exists.
    fn has(&self, name: &ObjectName) -> Result<bool, BackendError>;

    /// Deletes an object; deleting a missing object is not an error.
    fn delete(&self, name: &ObjectName) -> Result<(), BackendError>;

    /// Every object in `namespace`, in no particular order. Entries whose
    /// names are not 64 lowercase hex digits are skipped.
    fn list(&self, namespace: Namespace) -> Result<Vec<ObjectName>, BackendError>;

    /// Like [`Backend::list`], but a part of the namespace that cannot be
    /// listed without following a link is left out and named in
    /// [`Listing::skipped`] instead of failing the whole listing
    /// ([`FsBackend`]: a namespace or shard directory that is a symbolic
    /// link or not a directory). [`ConvergentStore::verify`](super::ConvergentStore::verify)
    /// uses it to report such a directory and carry on; `gc` uses
    /// [`Backend::list`], which fails, because objects it cannot see might
    /// be manifests. The default lists with [`Backend::list`] and skips
    /// nothing.
    fn list_skipping(&self, namespace: Namespace) -> Result<Listing, BackendError> {
        Ok(Listing {
            objects: self.list(namespace)?,
            skipped: Vec::new(),
        })
    }

    /// Makes every object stored so far durable. The default does nothing,
    /// for backends whose `put_if_absent` is durable when it returns.
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    /// Removes leftovers of writes interrupted more than `older_than` ago
    /// (for example temporary files of a killed process). Returns how many
    /// were removed. Backends whose writes leave nothing behind keep the
    /// default, which does nothing.
    fn remove_incomplete(&self, older_than: Duration) -> Result<u64, BackendError> {
        let _ = older_than;
        Ok(0)
    }
}

macro_rules! forward_backend {
    ($($ty:ty),*) => {$(
        impl<B: Backend + ?Sized> Backend for $ty {
            fn put_if_absent(&self, name: &ObjectName, bytes: &[u8]) -> Result<PutOutcome, BackendError> {
                (**self).put_if_absent(name, bytes)
            }
            fn put_many(&self, objects: &[(ObjectName, &[u8])]) -> Vec<Result<PutOutcome, BackendError>> {
                (**self).put_many(objects)
            }
            fn get(&self, name: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError> {
                (**self).get(name, limit)
            }
            fn has(&self, name: &ObjectName) -> Result<bool, BackendError> {
                (**self).has(name)
            }
            fn delete(&self, name: &ObjectName) -> Result<(), BackendError> {
                (**self).delete(name)
            }
            fn list(&self, namespace: Namespace) -> Result<Vec<ObjectName>, BackendError> {
                (**self).list(namespace)
            }
            fn list_skipping(&self, namespace: Namespace) -> Result<Listing, BackendError> {
                (**self).list_skipping(namespace)
            }
            fn remove_incomplete(&self, older_than: Duration) -> Result<u64, BackendError> {
                (**self).remove_incomplete(older_than)
            }
            fn flush(&self) -> Result<(), BackendError> {
                (**self).flush()
            }
        }
    )*};
}

forward_backend!(Arc<B>, Box<B>, &B);
