//! The store's error types.

use std::io;
use std::path::PathBuf;

use super::backend::{ObjectName, Op};
use super::ids::{BlockId, ManifestId};
use super::manifest::ManifestError;

/// Everything a store operation can fail with.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// The [`StoreConfig`](super::StoreConfig) was rejected.
    #[error("invalid store configuration")]
    Config(#[from] ConfigError),
    /// A block's stored bytes do not hash to its id, or do not decrypt under
    /// the key its manifest records.
    #[error("block {block} is corrupt")]
    Corrupt {
        /// The block.
        block: BlockId,
    },
    /// A manifest references a block the backend does not hold.
    #[error("block {block} is missing")]
    Missing {
        /// The block.
        block: BlockId,
    },
    /// No manifest with this id is stored.
    #[error("manifest {manifest} not found")]
    ManifestMissing {
        /// The manifest.
        manifest: ManifestId,
    },
    /// A stored manifest could not be opened: wrong key, truncated, tampered
    /// or malformed (the source says which).
    #[error("manifest {manifest} cannot be opened")]
    Manifest {
        /// The manifest.
        manifest: ManifestId,
        /// What is wrong with it.
        #[source]
        source: ManifestError,
    },
    /// The manifest belongs to another owner: it is sealed under another
    /// [`ManifestKey`](super::ManifestKey), so this store may not delete it.
    /// Nothing was deleted.
    #[error("manifest {manifest} belongs to another owner; only its owner's key can delete it")]
    NotOwner {
        /// The manifest.
        manifest: ManifestId,
    },
    /// Reading the caller's input failed.
    #[error("reading the input at offset {offset} failed")]
    Input {
        /// Bytes of input consumed before the failure.
        offset: u64,
        /// The reader's error.
        #[source]
        source: io::Error,
    },
    /// Writing to the caller's output failed.
    #[error("writing the output at offset {offset} failed")]
    Output {
        /// Bytes written before the failure.
        offset: u64,
        /// The writer's error.
        #[source]
        source: io::Error,
    },
    /// The backend failed. A full disk ends up here (see
    /// [`StoreError::is_storage_full`]); the store itself stays consistent.
    #[error("backend {op} of {object} failed")]
    Backend {
        /// The operation.
        op: Op,
        /// The object it was applied to.
        object: ObjectName,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// Opening a file-system store failed.
    #[error("opening the store at {path} failed")]
    Open {
        /// The store's root.
        path: PathBuf,
        /// Why.
        #[source]
        source: BackendError,
    },
    /// A put held its write lease for longer than the lease TTL without
    /// renewing it (the process stalled), so a concurrent garbage collection
    /// may have removed blocks it deduplicated against. Nothing was
    /// committed; repeat the put.
    #[error("the put's write lease expired before it finished; repeat the put")]
    LeaseExpired,
    /// An object among the write leases or sweep markers is not a marker
    /// this version of snapvm can interpret: written by a newer version, or
    /// damaged. Whether a put or a sweep is running cannot be told, so `gc`
    /// refuses to sweep and a put refuses to start; nothing was changed.
    /// Upgrade snapvm on this host; or, once no process of another version
    /// uses the store, delete the named object.
    #[error(
        "{marker} is not a lease or sweep marker this snapvm can read ({reason}): written by a \
         newer snapvm, or damaged; upgrade snapvm here, or delete the object once no process of \
         another version uses the store"
    )]
    UnreadableMarker {
        /// The object.
        marker: ObjectName,
        /// What is wrong with it.
        reason: String,
    },
    /// A put waited [`StoreConfig::lease_ttl`](super::StoreConfig) for a
    /// garbage-collection sweep to finish and gave up. Nothing was written;
    /// repeat the put (the sweep may be long, or its process stalled on
    /// another host).
    #[error(
        "waited {waited:?} for the sweep holding {marker} ({holder}) to finish; repeat the put"
    )]
    SweepInProgress {
        /// The sweep marker still live when the put gave up.
        marker: ObjectName,
        /// Who wrote it, as recorded in it (`pid P on HOST (writer ID)`).
        holder: String,
        /// How long the put waited.
        waited: std::time::Duration,
    },
    /// Listing a namespace of the backend failed.
    #[error("backend list of {namespace} failed")]
    List {
        /// The namespace listed (`blocks`, `manifests`, …).
        namespace: &'static str,
        /// The backend's error.
        #[source]
        source: BackendError,
    },
    /// The user metadata is larger than the configured limit.
    #[error("metadata is {len} bytes, above the limit of {limit}")]
    MetadataTooLarge {
        /// Its length.
        len: usize,
        /// The limit ([`StoreConfig::max_manifest_len`](super::StoreConfig)).
        limit: usize,
    },
    /// The data set needs a manifest larger than the configured limit.
    #[error("the manifest would be {len} bytes, above the limit of {limit}")]
    ManifestTooLarge {
        /// Its length.
        len: usize,
        /// The limit.
        limit: usize,
    },
    /// The operating system gave no randomness (for a manifest key, a
    /// manifest nonce or a lease name).
    #[error("the operating system's random generator failed")]
    Random(#[source] io::Error),
    /// An ingest worker thread panicked (a bug, or a panicking backend).
    #[error("an ingest worker thread panicked")]
    WorkerPanicked,
    /// A block was not fetched before its deadline (restoring a snapshot
    /// straight from the store).
    #[error("block {block} did not arrive within {after:?}")]
    FetchTimeout {
        /// The block.
        block: BlockId,
        /// The deadline it missed.
        after: std::time::Duration,
    },
}

impl StoreError {
    /// Whether the failure is a full disk or exhausted quota in the backend.
    pub fn is_storage_full(&self) -> bool {
        match self {
            StoreError::Backend { source, .. } | StoreError::List { source, .. } => {
                source.is_storage_full()
            }
            _ => false,
        }
    }
}

/// Fills `buf` from the operating system's generator; `getrandom`'s error
/// stays out of the public API ([`StoreError::Random`] carries an
/// [`io::Error`]).
pub(super) fn fill_random(buf: &mut [u8]) -> Result<(), StoreError> {
    getrandom::fill(buf).map_err(|e| StoreError::Random(io::Error::from(e)))
}

/// A rejected [`StoreConfig`](super::StoreConfig).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The block size is 0 or above [`MAX_BLOCK_SIZE`](super::MAX_BLOCK_SIZE).
    #[error("block size {0} is outside 1..=16 MiB")]
    BlockSize(usize),
    /// Ingest threads must be 1 or more.
    #[error("ingest_threads must be at least 1")]
    IngestThreads,
    /// The queue depth must be at least 1.
    #[error("queue_blocks must be at least 1")]
    QueueBlocks,
    /// The lease time-to-live must be non-zero.
    #[error("lease_ttl must be non-zero")]
    LeaseTtl,
    /// The manifest size limit is outside 4096 bytes..=4 GiB.
    #[error("max_manifest_len {0} is outside 4096..=4294967295")]
    MaxManifestLen(usize),
}

/// A failure inside a [`Backend`](super::Backend).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BackendError {
    /// An I/O error from the file system or the network.
    #[error(transparent)]
    Io(#[from] io::Error),
    /// A path inside an [`FsBackend`](super::FsBackend) store is a symbolic
    /// link; the store never follows them.
    #[error("{path} is a symbolic link")]
    Symlink {
        /// The offending path.
        path: PathBuf,
    },
    /// A path inside an `FsBackend` store that must be a directory is not.
    #[error("{path} is not a directory")]
    NotADirectory {
        /// The offending path.
        path: PathBuf,
    },
    /// A path inside an `FsBackend` store that must be a regular file (an
    /// object) is a directory, a device, a FIFO or a socket.
    #[error("{path} is not a regular file")]
    NotAFile {
        /// The offending path.
        path: PathBuf,
    },
    /// The object is larger than the reader's limit (an untrusted backend is
    /// never read without a bound).
    #[error("object is {len} bytes, above the limit of {limit}")]
    TooLarge {
        /// The object's length.
        len: u64,
        /// The limit.
        limit: u64,
    },
    /// The S3 client failed.
    #[cfg(feature = "s3")]
    #[error(transparent)]
    S3(#[from] object_store::Error),
}

impl BackendError {
    /// Whether this is a full disk (`ENOSPC`), an exceeded quota (`EDQUOT`),
    /// or a file too large for the file system (`EFBIG`).
    pub fn is_storage_full(&self) -> bool {
        match self {
            BackendError::Io(e) => {
                e.kind() == io::ErrorKind::StorageFull
                    || e.kind() == io::ErrorKind::QuotaExceeded
                    || e.kind() == io::ErrorKind::FileTooLarge
            }
            _ => false,
        }
    }
}

impl StoreError {
    /// What kind of failure this is (see [`ErrorKind`](crate::ErrorKind)): missing, corrupt
    /// or unopenable data is [`crate::ErrorKind::Invalid`], a put over a limit
    /// [`crate::ErrorKind::BadRequest`], I/O and backend failures
    /// [`crate::ErrorKind::Host`].
    pub fn kind(&self) -> crate::ErrorKind {
        use StoreError as E;
        match self {
            E::Config(_)
            | E::Corrupt { .. }
            | E::Missing { .. }
            | E::ManifestMissing { .. }
            | E::Manifest { .. }
            | E::UnreadableMarker { .. } => crate::ErrorKind::Invalid,
            E::MetadataTooLarge { .. } | E::ManifestTooLarge { .. } | E::NotOwner { .. } => {
                crate::ErrorKind::BadRequest
            }
            E::Input { .. }
            | E::Output { .. }
            | E::Backend { .. }
            | E::Open { .. }
            | E::LeaseExpired
            | E::SweepInProgress { .. }
            | E::List { .. }
            | E::Random(_)
            | E::WorkerPanicked
            | E::FetchTimeout { .. } => crate::ErrorKind::Host,
        }
    }
}
