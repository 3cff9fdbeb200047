//! ConvergentStore: block-level convergent encryption, deduplication,
//! salt-controlled redundancy, and pluggable backends.
//!
//! A data set is cut into fixed-size blocks ([`block`]). Each block is
//! encrypted with AES-256-GCM under a key derived from its own plaintext and
//! a salt, so identical blocks under the same salt give
//! identical ciphertexts and are stored once; the block's id is the SHA-256
//! of its ciphertext, so anyone can check a block without its key. All-zero
//! blocks are not stored. A [`Manifest`] lists the blocks in order with
//! their keys and is sealed under the owner's [`ManifestKey`]. The salt is
//! picked per put from a [`Redundancy`] set by a [`SaltSelector`], bounding
//! how many ciphertexts a plaintext can have fleet-wide.
//!
//! ```
//! use snapvm::store::{ConvergentStore, ManifestKey, MemoryBackend, StoreConfig};
//!
//! let key = ManifestKey::generate()?;
//! let store = ConvergentStore::new(&StoreConfig::default(), MemoryBackend::new(), key)?;
//! let put = store.put(&b"hello, store"[..], b"greeting")?;
//! assert_eq!(store.get_bytes(&put.manifest)?, b"hello, store");
//! assert!(store.verify()?.is_clean());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! The formats are specified in `docs/store-format.md`; the user guide,
//! including the garbage-collection protocol, is `docs/store.md`.

pub mod backend;
pub mod block;
mod crypto;
mod error;
mod gc;
mod ids;
pub mod manifest;
mod marker;
mod redundancy;
pub mod sizing;
mod stream;

use std::fmt;
use std::io::{Read, Write};
use std::sync::Arc;
use std::time::Duration;

pub use backend::{
    Backend, Durability, FsBackend, Listing, MemoryBackend, Namespace, ObjectName, Op, PutOutcome,
};
#[cfg(feature = "s3")]
pub use backend::{S3Backend, S3Config};
pub use block::{DEFAULT_BLOCK_SIZE, MAX_BLOCK_SIZE};
pub use error::{BackendError, ConfigError, StoreError};
pub use gc::{GcReport, Problem, SweepWait, VerifyReport};
pub use ids::{BlockId, BlockKey, ManifestId, ManifestKey, ParseIdError, Salt};
pub use manifest::{Entry, Manifest, ManifestError};
pub use marker::CLOCK_SKEW_ALLOWANCE;
pub use redundancy::{
    PerLocation, PerTenant, PerTimeWindow, PutInfo, Random, Redundancy, SaltSelector,
};
pub use stream::ManifestReader;

/// A callback told while a put waits for a sweep ([`StoreConfig::on_wait`]).
pub type OnWait = Arc<dyn Fn(&SweepWait) + Send + Sync>;

/// Settings of a [`ConvergentStore`], checked by [`ConvergentStore::new`].
#[derive(Clone)]
pub struct StoreConfig {
    /// Block size in bytes, 1..=16 MiB. Default [`DEFAULT_BLOCK_SIZE`].
    /// Puts with different block sizes deduplicate only by coincidence.
    pub block_size: usize,
    /// The salt set. Default: **one salt** (`Redundancy::copies(1)`) under
    /// the all-zero secret — plain convergent encryption: maximal
    /// deduplication, and anyone who can guess a block's plaintext can
    /// confirm it is stored. Use [`Redundancy::copies`] with a secret to
    /// bound that (see `docs/store.md`, "Redundancy and salts").
    pub redundancy: Redundancy,
    /// Picks the salt of each put. Default: always salt 0.
    pub salt_selector: Arc<dyn SaltSelector>,
    /// Threads that encrypt and store blocks during a put (and fetch and
    /// decrypt during [`ConvergentStore::get`]). 1 runs everything on the
    /// caller's thread. Default: the available parallelism, at most 2.
    pub ingest_threads: usize,
    /// Blocks in flight per thread; memory use of a put or get is about
    /// `(ingest_threads * (queue_blocks + 2)) * block_size`. Default 8.
    pub queue_blocks: usize,
    /// How long a write lease or sweep marker counts as live without being
    /// renewed (see the garbage-collection protocol in `docs/store.md`).
    /// Also the longest a put waits for a running sweep before it fails
    /// with [`StoreError::SweepInProgress`]. A marker left by a process of
    /// this host that has exited stops counting at once; one dated more
    /// than [`CLOCK_SKEW_ALLOWANCE`] in the future, by a writer that is not
    /// a running process of this host, is treated as expired. Default 15
    /// minutes.
    pub lease_ttl: Duration,
    /// Told while a put waits for a garbage-collection sweep to finish (a
    /// few times a second, and once when it is over), for a progress
    /// display. The wait is also logged. Default: none.
    pub on_wait: Option<OnWait>,
    /// The largest sealed manifest accepted, in bytes (4096 to 4 GiB); also bounds user
    /// metadata. Default 256 MiB (about 3.7 million blocks). Every manifest
    /// read (get, list, gc, verify) is refused before its bytes are read
    /// when the object is longer. Blocks are read with a bound of their
    /// manifest entry's length plus the 16-byte tag (verify: 16 MiB + 16).
    pub max_manifest_len: usize,
}

impl Default for StoreConfig {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self {
            block_size: DEFAULT_BLOCK_SIZE,
            redundancy: Redundancy::default(),
            salt_selector: Arc::new(|_: &PutInfo<'_>, _: u32| 0u32),
            ingest_threads: cores.min(2),
            queue_blocks: 8,
            lease_ttl: Duration::from_secs(15 * 60),
            on_wait: None,
            max_manifest_len: 256 << 20,
        }
    }
}

impl fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StoreConfig")
            .field("block_size", &self.block_size)
            .field("redundancy", &self.redundancy)
            .field("ingest_threads", &self.ingest_threads)
            .field("queue_blocks", &self.queue_blocks)
            .field("lease_ttl", &self.lease_ttl)
            .field("max_manifest_len", &self.max_manifest_len)
            .finish_non_exhaustive()
    }
}

impl StoreConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.block_size == 0 || self.block_size > MAX_BLOCK_SIZE {
            return Err(ConfigError::BlockSize(self.block_size));
        }
        if self.ingest_threads == 0 {
            return Err(ConfigError::IngestThreads);
        }
        if self.queue_blocks == 0 {
            return Err(ConfigError::QueueBlocks);
        }
        if self.lease_ttl.is_zero() {
            return Err(ConfigError::LeaseTtl);
        }
        if self.max_manifest_len < 4096 || self.max_manifest_len > u32::MAX as usize {
            return Err(ConfigError::MaxManifestLen(self.max_manifest_len));
        }
        Ok(())
    }
}

/// What a put did.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct PutReport {
    /// The new manifest's id: pass it to [`ConvergentStore::get`].
    pub manifest: ManifestId,
    /// Length of the data set.
    pub len: u64,
    /// Blocks in the data set, zero blocks included.
    pub blocks: u64,
    /// All-zero blocks (not stored).
    pub zero_blocks: u64,
    /// Blocks written by this put (the rest were already stored).
    pub new_blocks: u64,
    /// Bytes written by this put, manifest included.
    pub new_bytes: u64,
}

/// One of the owner's manifests, as listed by [`ConvergentStore::list`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ManifestInfo {
    /// Its id.
    pub id: ManifestId,
    /// Length of the data set.
    pub len: u64,
    /// Number of distinct stored blocks it references.
    pub blocks: usize,
    /// The user metadata.
    pub metadata: Vec<u8>,
}

/// A content-addressed, convergently encrypted block store over a
/// [`Backend`]. Cheap to share between threads (`&self` everywhere); several
/// handles, in one process or many, may share one backend.
pub struct ConvergentStore {
    backend: Arc<dyn Backend>,
    key: ManifestKey,
    config: StoreConfig,
}

impl fmt::Debug for ConvergentStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConvergentStore")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl ConvergentStore {
    /// A store over `backend`, sealing manifests under `key`.
    pub fn new(
        config: &StoreConfig,
        backend: impl Backend + 'static,
        key: ManifestKey,
    ) -> Result<Self, StoreError> {
        config.validate()?;
        Ok(Self {
            backend: Arc::new(backend),
            key,
            config: config.clone(),
        })
    }

    /// A store with default settings over an [`FsBackend`] rooted at `path`.
    pub fn open_dir(
        path: impl AsRef<std::path::Path>,
        key: ManifestKey,
    ) -> Result<Self, StoreError> {
        let path = path.as_ref();
        let backend = FsBackend::open(path).map_err(|source| StoreError::Open {
            path: path.to_path_buf(),
            source,
        })?;
        Self::new(&StoreConfig::default(), backend, key)
    }

    /// The settings.
    pub fn config(&self) -> &StoreConfig {
        &self.config
    }

    /// The backend.
    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Stores everything `input` yields as one data set, with `metadata`
    /// kept (encrypted) in its manifest. Memory stays bounded whatever the
    /// input's length; with `ingest_threads > 1` encryption runs on that many
    /// threads.
    ///
    /// An interrupted put (error, crash, SIGKILL) leaves the store
    /// consistent; repeating it stores only what is missing.
    pub fn put(&self, input: impl Read, metadata: &[u8]) -> Result<PutReport, StoreError> {
        stream::put(self, input, metadata)
    }

    /// [`ConvergentStore::put`] for bytes already in memory.
    pub fn put_bytes(&self, data: &[u8], metadata: &[u8]) -> Result<PutReport, StoreError> {
        stream::put(self, data, metadata)
    }

    /// Reads and opens a manifest.
    pub fn manifest(&self, id: &ManifestId) -> Result<Manifest, StoreError> {
        let bytes = self.fetch_manifest(id)?;
        let m = Manifest::open(&bytes, &self.key).map_err(|source| StoreError::Manifest {
            manifest: *id,
            source,
        })?;
        // A valid manifest stored under a name that is not its hash was
        // moved or substituted.
        if crypto::sha256(&bytes) != *id.as_bytes() {
            return Err(StoreError::Manifest {
                manifest: *id,
                source: ManifestError::Tampered,
            });
        }
        Ok(m)
    }

    fn fetch_manifest(&self, id: &ManifestId) -> Result<Vec<u8>, StoreError> {
        let name = ObjectName::manifest(id);
        self.backend
            .get(&name, self.config.max_manifest_len as u64)
            .map_err(|source| StoreError::Backend {
                op: Op::Get,
                object: name,
                source,
            })?
            .ok_or(StoreError::ManifestMissing { manifest: *id })
    }

    /// Fetches one block of a manifest: checks its id (SHA-256 of the
    /// ciphertext) and AES-GCM tag, and decrypts it.
    pub(crate) fn fetch_block(
        &self,
        id: &BlockId,
        key: &BlockKey,
        len: u32,
    ) -> Result<Vec<u8>, StoreError> {
        stream::fetch_block(self, id, key, len)
    }

    /// Writes the data set `id` to `output`, in order; returns its length.
    pub fn get(&self, id: &ManifestId, output: impl Write) -> Result<u64, StoreError> {
        let manifest = self.manifest(id)?;
        stream::get(self, &manifest, output)
    }

    /// The data set `id` as one vector.
    pub fn get_bytes(&self, id: &ManifestId) -> Result<Vec<u8>, StoreError> {
        let manifest = self.manifest(id)?;
        // Never trust the declared length for a reservation: grow as read.
        let mut out = Vec::new();
        stream::get(self, &manifest, &mut out)?;
        Ok(out)
    }

    /// A [`Read`] + [`Seek`](std::io::Seek) view of data set `id`, fetching
    /// one block at a time.
    pub fn reader(&self, id: &ManifestId) -> Result<ManifestReader<'_>, StoreError> {
        Ok(ManifestReader::new(self, self.manifest(id)?))
    }

    /// The owner's manifests (those sealed under this store's key), sorted
    /// by id. Manifests of other owners sharing the backend are skipped.
    pub fn list(&self) -> Result<Vec<ManifestInfo>, StoreError> {
        let mut names =
            self.backend
                .list(Namespace::Manifests)
                .map_err(|source| StoreError::List {
                    namespace: "manifests",
                    source,
                })?;
        names.sort();
        let mine = manifest::key_id(&self.key);
        let mut out = Vec::new();
        for name in names {
            let id = ManifestId::from_bytes(name.id);
            let bytes = match self.fetch_manifest(&id) {
                Ok(b) => b,
                // Deleted between list and get.
                Err(StoreError::ManifestMissing { .. }) => continue,
                Err(e) => return Err(e),
            };
            match manifest::SealedHeader::parse(&bytes) {
                Ok(h) if h.key_id == mine => {}
                _ => continue,
            }
            let m = Manifest::open(&bytes, &self.key).map_err(|source| StoreError::Manifest {
                manifest: id,
                source,
            })?;
            out.push(ManifestInfo {
                id,
                len: m.total_len,
                blocks: m.refs().len(),
                metadata: m.metadata,
            });
        }
        Ok(out)
    }

    /// Deletes one of the owner's data sets: its manifest. Its blocks that no
    /// other manifest (of any owner) references become garbage, removed by
    /// the next [`ConvergentStore::gc`]. Deleting a missing manifest is not
    /// an error.
    ///
    /// Only the owner may delete: the manifest is read first, and one sealed
    /// under another owner's key is refused with [`StoreError::NotOwner`]
    /// (so is one that carries this owner's key id but does not open under
    /// this key although its bytes are intact). A manifest whose bytes are
    /// damaged, so that they no longer hash to its id, is removed when its
    /// clear header names this owner's key, or when no header can be read at
    /// all: it is no one's data set any more, and while it exists `gc`
    /// deletes no block. See "Owners and trust" in `docs/store.md`.
    pub fn delete(&self, id: &ManifestId) -> Result<(), StoreError> {
        let name = ObjectName::manifest(id);
        let bytes = match self.fetch_manifest(id) {
            Ok(bytes) => Some(bytes),
            Err(StoreError::ManifestMissing { .. }) => return Ok(()),
            // Not an object a manifest can be (fs backend): no one's.
            Err(StoreError::Backend {
                source: BackendError::Symlink { .. } | BackendError::NotAFile { .. },
                ..
            }) => None,
            Err(e) => return Err(e),
        };
        if let Some(bytes) = bytes {
            self.check_owner(id, &bytes)?;
        }
        self.backend
            .delete(&name)
            .map_err(|source| StoreError::Backend {
                op: Op::Delete,
                object: name,
                source,
            })
    }

    /// Whether this owner may delete manifest `id` whose bytes are `bytes`.
    fn check_owner(&self, id: &ManifestId, bytes: &[u8]) -> Result<(), StoreError> {
        let Ok(header) = manifest::SealedHeader::parse(bytes) else {
            log::warn!("delete: {id} is not a readable manifest; removing it");
            return Ok(());
        };
        let intact = crypto::sha256(bytes) == *id.as_bytes();
        let mine = header.key_id == manifest::key_id(&self.key);
        match (intact, mine) {
            (_, false) => Err(StoreError::NotOwner { manifest: *id }),
            (true, true) => match Manifest::open(bytes, &self.key) {
                Ok(_) => Ok(()),
                // Intact bytes that do not open under this key: another
                // owner's key with the same 8-byte id.
                Err(_) => Err(StoreError::NotOwner { manifest: *id }),
            },
            (false, true) => {
                log::warn!("delete: manifest {id} is damaged (its bytes do not hash to its id); removing it");
                Ok(())
            }
        }
    }

    /// Removes every block no manifest references (of any owner), following
    /// the protocol in `docs/store.md` so that a put running concurrently in
    /// any process never loses a block. If a put is in flight the sweep is
    /// deferred ([`GcReport::deferred`]); call again later. If any
    /// manifest fails its own check (its bytes do not hash to its id), no
    /// block is deleted ([`GcReport::unverified_manifests`]).
    pub fn gc(&self) -> Result<GcReport, StoreError> {
        gc::gc(self, &mut |_, _| {})
    }

    /// [`ConvergentStore::gc`] reporting progress as `(blocks examined,
    /// blocks in the store)`.
    pub fn gc_with_progress(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<GcReport, StoreError> {
        gc::gc(self, progress)
    }

    /// Reads every block and manifest and reports each corrupt or missing
    /// one. Needs no key for blocks; the owner's manifests are also opened.
    pub fn verify(&self) -> Result<VerifyReport, StoreError> {
        gc::verify(self, &mut |_, _| {})
    }

    /// [`ConvergentStore::verify`] reporting progress as `(objects checked,
    /// objects in the store)`.
    pub fn verify_with_progress(
        &self,
        progress: &mut dyn FnMut(u64, u64),
    ) -> Result<VerifyReport, StoreError> {
        gc::verify(self, progress)
    }
}
