//! Garbage collection, verification, and the lease protocol that keeps
//! them safe next to concurrent puts.
//!
//! # Protocol
//!
//! Two kinds of marker objects, each a random 32-byte name holding a magic
//! and a creation time (`docs/store-format.md`):
//!
//! - a **write lease** (`leases/`), held by every put from before its first
//!   block until after its manifest is stored;
//! - a **sweep marker** (`sweeps/`), held by every `gc` while it deletes.
//!
//! A put first writes its lease, *then* lists sweep markers and waits while
//! a live one exists. A gc first writes its marker, *then* lists leases and
//! defers (deletes its marker, deletes nothing) while a live one exists.
//! With a backend that has read-after-write and list-after-write
//! consistency, one of the two always sees the other: either the put's lease
//! was listed by the gc (which defers), or the gc's marker was listed by the
//! put (which waits until the sweep is over). So a sweep never runs while a
//! put is between "block deduplicated against" and "manifest stored", and a
//! block a live manifest references is never deleted.
//!
//! Markers are live for `lease_ttl` after their creation time; holders
//! renew them (write a new one, delete the old) every `lease_ttl / 3`. A
//! marker left by a killed process stops counting after `lease_ttl` and is
//! removed by the next gc. A marker that was not renewed before it expired
//! has *lapsed*: someone may have taken its holder for dead. A put whose
//! lease lapsed refuses to commit ([`StoreError::LeaseExpired`]); a gc whose
//! marker lapsed stops deleting ([`GcReport::interrupted`]). Clocks of
//! processes sharing a backend must agree to within
//! [`CLOCK_SKEW_ALLOWANCE`](super::CLOCK_SKEW_ALLOWANCE).
//!
//! Markers record their writer's process, host and a random writer id
//! (`marker.rs`): one whose writer ran on this host and has exited counts
//! as expired at once; one dated beyond the clock-skew allowance in the
//! future, whose writer is not a running process of this host, is treated
//! as expired (with a warning) rather than waited for until that date; one
//! that cannot be interpreted makes a put or gc refuse with
//! [`StoreError::UnreadableMarker`]. A put waits for a sweep at most
//! `lease_ttl` ([`StoreError::SweepInProgress`]), logging while it waits
//! and telling [`StoreConfig::on_wait`](super::StoreConfig::on_wait).

use std::collections::HashMap;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use super::block::MAX_BLOCK_SIZE;
use super::crypto::{self, TAG_LEN};
use super::ids::{BlockId, ManifestId};
use super::manifest::{self, Manifest, ManifestError, SealedHeader};
use super::marker;
use super::{ConvergentStore, Namespace, ObjectName, Op, StoreError};

/// Magic of a write lease object.
pub const LEASE_MAGIC: [u8; 8] = *b"SNAPVMLS";
/// Magic of a sweep marker object.
pub const SWEEP_MAGIC: [u8; 8] = *b"SNAPVMSW";

/// What [`ConvergentStore::gc`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct GcReport {
    /// The sweep did not run because puts were in flight (their number);
    /// nothing was deleted. Call `gc` again later.
    pub deferred: Option<usize>,
    /// Manifests found (all owners).
    pub manifests: u64,
    /// Blocks found.
    pub blocks: u64,
    /// Unreferenced blocks deleted.
    pub deleted_blocks: u64,
    /// Expired leases and sweep markers of dead processes removed.
    pub expired_markers: u64,
    /// Leftovers of interrupted writes removed (e.g. temporary files).
    pub incomplete_removed: u64,
    /// Manifests whose bytes do not hash to their id, whose clear header
    /// does not parse, or that cannot be read as an object (too large, not
    /// a regular file). Their true reference tables are unknown, so when
    /// this is not empty the sweep deletes **no block at all** (every block
    /// might be one the real manifest needs); expired markers and leftover
    /// temporary files are still removed. Restore or delete these manifests
    /// ([`ConvergentStore::verify`](super::ConvergentStore::verify) names
    /// them too), then run gc again.
    pub unverified_manifests: Vec<ManifestId>,
    /// The sweep stopped early because its marker lapsed (the process
    /// stalled for longer than the lease TTL); run gc again.
    pub interrupted: bool,
}

/// A put waiting for a garbage-collection sweep to finish, as told to
/// [`StoreConfig::on_wait`](super::StoreConfig::on_wait) (each time the put
/// looks again, a few times a second, and once when the wait is over).
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct SweepWait {
    /// The sweep marker waited for.
    pub marker: ObjectName,
    /// Who wrote it, as recorded in it: `pid P on HOST (writer ID)`, or
    /// `an unknown process` for the oldest marker format.
    pub holder: String,
    /// The marker's age by this host's clock.
    pub marker_age: Duration,
    /// How long the put has waited so far.
    pub waited: Duration,
    /// The longest it waits ([`StoreConfig::lease_ttl`](super::StoreConfig::lease_ttl))
    /// before failing with [`StoreError::SweepInProgress`].
    pub limit: Duration,
    /// The sweep is over and the put goes ahead.
    pub over: bool,
}

/// One problem found by [`ConvergentStore::verify`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Problem {
    /// A block whose bytes do not hash to its id.
    CorruptBlock {
        /// The block.
        block: BlockId,
    },
    /// A block a manifest references that is not stored.
    MissingBlock {
        /// The block.
        block: BlockId,
        /// A manifest that references it.
        manifest: ManifestId,
    },
    /// An object that is not a regular file: a symbolic link, a directory,
    /// a device (file-system backend). It is neither read nor followed; a
    /// symlink or a file in its place can be removed by hand, or by `gc` if
    /// no manifest references the name.
    NotAFile {
        /// The object.
        object: ObjectName,
    },
    /// A directory of the store's layout that is a symbolic link or not a
    /// directory ([`FsBackend`](super::FsBackend): a namespace or shard
    /// directory). It is neither followed nor listed, so objects behind it
    /// are not checked; each block a manifest references behind it is
    /// reported as [`Problem::NotAFile`]. Move its contents back into a
    /// real directory of that name (or remove it if it holds nothing of
    /// the store's).
    NotADirectory {
        /// The namespace it belongs to.
        namespace: Namespace,
        /// Its path.
        path: std::path::PathBuf,
    },
    /// A manifest whose bytes do not hash to its id, whose clear header does
    /// not parse, or (for the owner's manifests) that does not open.
    CorruptManifest {
        /// The manifest.
        manifest: ManifestId,
        /// Why, when the format said so (`None`: hash mismatch).
        error: Option<ManifestError>,
    },
}

/// What [`ConvergentStore::verify`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct VerifyReport {
    /// Manifests checked.
    pub manifests: u64,
    /// Blocks checked (every stored block is read and hashed).
    pub blocks: u64,
    /// Bytes of blocks read.
    pub block_bytes: u64,
    /// Stored blocks no manifest references: garbage for the next gc, not
    /// a problem (a put in flight or interrupted leaves some).
    pub unreferenced_blocks: u64,
    /// Every problem found, in no particular order.
    pub problems: Vec<Problem>,
}

impl VerifyReport {
    /// Whether no problem was found.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn random_name(namespace: Namespace) -> Result<ObjectName, StoreError> {
    let mut id = [0u8; 32];
    super::error::fill_random(&mut id)?;
    Ok(ObjectName { namespace, id })
}

/// A held marker (write lease or sweep marker), renewed as its holder works.
pub(super) struct Marker<'a> {
    store: &'a ConvergentStore,
    name: ObjectName,
    magic: [u8; 8],
    written: Instant,
    /// Whether a predecessor of this marker expired before it was renewed:
    /// then there was a moment when others considered the holder dead.
    lapsed: bool,
    released: bool,
}

impl<'a> Marker<'a> {
    fn write(
        store: &'a ConvergentStore,
        namespace: Namespace,
        magic: [u8; 8],
    ) -> Result<Self, StoreError> {
        let name = random_name(namespace)?;
        // Taken before the write, so our view of the age is never younger
        // than the timestamp others read.
        let written = Instant::now();
        store
            .backend
            .put_if_absent(
                &name,
                &marker::encode(magic, now_millis(), store.config.lease_ttl),
            )
            .map_err(|source| StoreError::Backend {
                op: Op::Put,
                object: name,
                source,
            })?;
        Ok(Self {
            store,
            name,
            magic,
            written,
            lapsed: false,
            released: false,
        })
    }

    /// Writes a fresh marker and drops the old one once a third of the TTL
    /// has passed.
    fn renew_if_due(&mut self) -> Result<(), StoreError> {
        if self.written.elapsed() < self.store.config.lease_ttl / 3 {
            return Ok(());
        }
        let lapsed = self.lapsed || self.written.elapsed() >= self.store.config.lease_ttl;
        let mut fresh = Self::write(self.store, self.name.namespace, self.magic)?;
        fresh.lapsed = lapsed;
        let old = std::mem::replace(self, fresh);
        drop(old);
        Ok(())
    }

    /// Whether others have considered the marker live without a break since
    /// it was first written.
    fn is_fresh(&self) -> bool {
        !self.lapsed && self.written.elapsed() < self.store.config.lease_ttl
    }

    fn release(&mut self) {
        if !self.released {
            self.released = true;
            // Best effort: a marker left behind expires after the TTL.
            let _ = self.store.backend.delete(&self.name);
        }
    }
}

impl Drop for Marker<'_> {
    fn drop(&mut self) {
        self.release();
    }
}

/// The write lease a put holds; see the module docs.
pub(super) struct WriteLease<'a>(Marker<'a>);

impl<'a> WriteLease<'a> {
    /// Writes a lease, then waits until no live sweep marker exists. If the
    /// lease lapsed while waiting (nothing was deduplicated yet, so no harm
    /// done), starts over with a new one.
    ///
    /// The wait is bounded by `lease_ttl` ([`StoreError::SweepInProgress`]
    /// after that), logged (a warning when it starts, then every
    /// [`WAIT_REPORT_EVERY`]) and told to `StoreConfig::on_wait`. A sweep
    /// marker whose holder ran on this host and has exited does not count,
    /// nor does one dated beyond the clock-skew allowance in the future
    /// (logged); one that cannot be interpreted fails the put at once
    /// ([`StoreError::UnreadableMarker`]).
    pub(super) fn acquire(store: &'a ConvergentStore) -> Result<Self, StoreError> {
        let start = Instant::now();
        let mut reported: Option<Instant> = None;
        let mut last: Option<SweepWait> = None;
        let mut warned_future = false;
        loop {
            let mut lease = WriteLease(Marker::write(store, Namespace::Leases, LEASE_MAGIC)?);
            let mut pause = Duration::from_millis(10);
            loop {
                let scan = live_markers(store, Namespace::Sweeps, SWEEP_MAGIC, None)?;
                if let Some((marker, why)) = scan.unreadable.first() {
                    return Err(unreadable(marker, why));
                }
                if !warned_future {
                    warn_future("put", &scan);
                    warned_future = !scan.future.is_empty();
                }
                let Some((marker, info)) = scan.live.first() else {
                    break;
                };
                let waited = start.elapsed();
                let holder = info
                    .holder
                    .as_ref()
                    .map_or_else(|| "an unknown process".to_owned(), |h| h.to_string());
                if waited >= store.config.lease_ttl {
                    return Err(StoreError::SweepInProgress {
                        marker: *marker,
                        holder,
                        waited,
                    });
                }
                let wait = SweepWait {
                    marker: *marker,
                    holder,
                    marker_age: Duration::from_millis(now_millis().saturating_sub(info.created)),
                    waited,
                    limit: store.config.lease_ttl,
                    over: false,
                };
                if reported.is_none_or(|t| t.elapsed() >= WAIT_REPORT_EVERY) {
                    log::warn!(
                        "put: waiting for the garbage-collection sweep {} of {} (marker {:.0?} \
                         old) to finish; waited {:.0?} of at most {:.0?}",
                        wait.marker,
                        wait.holder,
                        wait.marker_age,
                        wait.waited,
                        wait.limit,
                    );
                    reported = Some(Instant::now());
                }
                if let Some(on_wait) = &store.config.on_wait {
                    on_wait(&wait);
                }
                last = Some(wait);
                std::thread::sleep(pause);
                pause = (pause * 2).min(Duration::from_millis(250));
                lease.renew_if_due()?;
            }
            if reported.is_some() {
                log::warn!(
                    "put: the sweep is over, going ahead after {:.1?}",
                    start.elapsed()
                );
            }
            if lease.0.is_fresh() {
                if let (Some(mut wait), Some(on_wait)) = (last, &store.config.on_wait) {
                    wait.waited = start.elapsed();
                    wait.over = true;
                    on_wait(&wait);
                }
                return Ok(lease);
            }
        }
    }

    pub(super) fn renew_if_due(&mut self) -> Result<(), StoreError> {
        self.0.renew_if_due()
    }

    /// Fails with [`StoreError::LeaseExpired`] if the lease may have been
    /// considered dead by a concurrent gc.
    pub(super) fn check_fresh(&self) -> Result<(), StoreError> {
        if self.0.is_fresh() {
            Ok(())
        } else {
            Err(StoreError::LeaseExpired)
        }
    }

    pub(super) fn release(mut self) {
        self.0.release();
    }
}

/// How often a put waiting for a sweep logs that it still waits.
pub(super) const WAIT_REPORT_EVERY: Duration = Duration::from_secs(30);

struct MarkerScan {
    /// Live markers (name, contents).
    live: Vec<(ObjectName, marker::MarkerInfo)>,
    /// Expired, or left by a process of this host that exited.
    expired: Vec<ObjectName>,
    /// Dated beyond the clock-skew allowance in the future by a writer that
    /// is not a running process of this host: treated as expired.
    future: Vec<(ObjectName, Duration, Option<marker::Holder>)>,
    /// Not interpretable.
    unreadable: Vec<(ObjectName, marker::Unreadable)>,
}

fn unreadable(marker: &ObjectName, why: &marker::Unreadable) -> StoreError {
    StoreError::UnreadableMarker {
        marker: *marker,
        reason: why.to_string(),
    }
}

/// Logs the future-dated markers of a scan, which are treated as expired.
fn warn_future(who: &str, scan: &MarkerScan) {
    for (name, ahead, holder) in &scan.future {
        let holder = holder
            .as_ref()
            .map_or_else(|| "an unknown process".to_owned(), |h| h.to_string());
        log::warn!(
            "{who}: {name} of {holder} is dated {ahead:.0?} in the future, beyond the clock-skew \
             allowance of {:?}; treating it as expired (check that host's clock)",
            super::CLOCK_SKEW_ALLOWANCE,
        );
    }
}

/// Lists markers of one kind and judges each (see [`marker::judge`]).
/// `mine` is skipped.
fn live_markers(
    store: &ConvergentStore,
    namespace: Namespace,
    magic: [u8; 8],
    mine: Option<&ObjectName>,
) -> Result<MarkerScan, StoreError> {
    let names = store
        .backend
        .list(namespace)
        .map_err(|source| StoreError::List {
            namespace: namespace.as_str(),
            source,
        })?;
    let now = now_millis();
    let mut scan = MarkerScan {
        live: Vec::new(),
        expired: Vec::new(),
        future: Vec::new(),
        unreadable: Vec::new(),
    };
    for name in names {
        if Some(&name) == mine {
            continue;
        }
        let info = match store.backend.get(&name, marker::MARKER_READ_LIMIT) {
            Ok(Some(b)) => marker::decode(&b, magic),
            Ok(None) => continue, // released meanwhile
            Err(super::BackendError::TooLarge { len, .. }) => Err(marker::Unreadable::Length(len)),
            Err(super::BackendError::NotAFile { .. } | super::BackendError::Symlink { .. }) => {
                Err(marker::Unreadable::NotAFile)
            }
            Err(source) => {
                return Err(StoreError::Backend {
                    op: Op::Get,
                    object: name,
                    source,
                })
            }
        };
        match marker::judge(info.as_ref().map_err(|e| *e), now, store.config.lease_ttl) {
            marker::Verdict::Live => {
                if let Ok(info) = info {
                    scan.live.push((name, info));
                }
            }
            marker::Verdict::Expired => scan.expired.push(name),
            marker::Verdict::Future(ahead) => {
                scan.future
                    .push((name, ahead, info.ok().and_then(|i| i.holder)));
            }
            marker::Verdict::Unreadable(why) => scan.unreadable.push((name, why)),
        }
    }
    Ok(scan)
}

fn list(store: &ConvergentStore, namespace: Namespace) -> Result<Vec<ObjectName>, StoreError> {
    store
        .backend
        .list(namespace)
        .map_err(|source| StoreError::List {
            namespace: namespace.as_str(),
            source,
        })
}

/// Lists `namespace` for `verify`: parts that cannot be listed without
/// following a link become [`Problem::NotADirectory`] instead of an error.
fn list_skipping(
    store: &ConvergentStore,
    namespace: Namespace,
    report: &mut VerifyReport,
) -> Result<Vec<ObjectName>, StoreError> {
    let listing = store
        .backend
        .list_skipping(namespace)
        .map_err(|source| StoreError::List {
            namespace: namespace.as_str(),
            source,
        })?;
    report.problems.extend(
        listing
            .skipped
            .into_iter()
            .map(|path| Problem::NotADirectory { namespace, path }),
    );
    Ok(listing.objects)
}

fn delete(store: &ConvergentStore, name: &ObjectName) -> Result<(), StoreError> {
    store
        .backend
        .delete(name)
        .map_err(|source| StoreError::Backend {
            op: Op::Delete,
            object: *name,
            source,
        })
}

pub(super) fn gc(
    store: &ConvergentStore,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<GcReport, StoreError> {
    let mut report = GcReport::default();
    let mut marker = Marker::write(store, Namespace::Sweeps, SWEEP_MAGIC)?;
    let leases = live_markers(store, Namespace::Leases, LEASE_MAGIC, None)?;
    let sweeps = live_markers(store, Namespace::Sweeps, SWEEP_MAGIC, Some(&marker.name))?;
    if let Some((name, why)) = leases.unreadable.first().or(sweeps.unreadable.first()) {
        marker.release();
        let err = unreadable(name, why);
        log::warn!("gc: not sweeping: {err}");
        return Err(err);
    }
    if !leases.live.is_empty() {
        marker.release();
        report.deferred = Some(leases.live.len());
        return Ok(report);
    }
    warn_future("gc", &leases);
    for name in leases
        .expired
        .iter()
        .chain(leases.future.iter().map(|(name, _, _)| name))
    {
        delete(store, name)?;
        report.expired_markers += 1;
    }

    // Everything any manifest references, read from the clear headers: no
    // owner's key is needed, and every owner's manifests count.
    let mut referenced = std::collections::HashSet::new();
    for name in list(store, Namespace::Manifests)? {
        marker.renew_if_due()?;
        let id = ManifestId::from_bytes(name.id);
        report.manifests += 1;
        // Only a manifest that hashes to its name says what its owner
        // stored: a flipped bit in its reference table, or another valid
        // manifest copied over it, would name the wrong blocks. Any
        // manifest we cannot verify makes every block potentially live.
        let bytes = match store.fetch_manifest(&id) {
            Ok(b) => b,
            Err(StoreError::ManifestMissing { .. }) => {
                report.manifests -= 1;
                continue;
            }
            Err(StoreError::Backend {
                source:
                    super::BackendError::TooLarge { .. }
                    | super::BackendError::Symlink { .. }
                    | super::BackendError::NotAFile { .. },
                ..
            }) => {
                report.unverified_manifests.push(id);
                continue;
            }
            Err(e) => return Err(e),
        };
        if crypto::sha256(&bytes) != *id.as_bytes() {
            report.unverified_manifests.push(id);
            continue;
        }
        match SealedHeader::parse(&bytes) {
            Ok(header) => referenced.extend(header.refs),
            Err(_) => report.unverified_manifests.push(id),
        }
    }
    if !report.unverified_manifests.is_empty() {
        log::warn!(
            "gc: {} manifest(s) fail their own check (first: {}); deleting no block until they are restored or deleted",
            report.unverified_manifests.len(),
            report.unverified_manifests[0],
        );
    }

    let blocks = list(store, Namespace::Blocks)?;
    report.blocks = blocks.len() as u64;
    for (i, name) in blocks.iter().enumerate() {
        if i % 256 == 0 {
            progress(i as u64, report.blocks);
        }
        marker.renew_if_due()?;
        if !report.unverified_manifests.is_empty()
            || referenced.contains(&BlockId::from_bytes(name.id))
        {
            continue;
        }
        if !marker.is_fresh() {
            // The marker lapsed (this process stalled past the TTL): puts may
            // have started meanwhile. Stop deleting.
            report.interrupted = true;
            break;
        }
        match store.backend.delete(name) {
            Ok(()) => report.deleted_blocks += 1,
            // A directory where a block should be: not ours to remove
            // recursively; `verify` reports it.
            Err(super::BackendError::NotAFile { path }) => {
                log::warn!(
                    "gc: {} is not a regular file; left in place",
                    path.display()
                );
            }
            Err(source) => {
                return Err(StoreError::Backend {
                    op: Op::Delete,
                    object: *name,
                    source,
                })
            }
        }
    }
    progress(report.blocks, report.blocks);

    let mine = marker.name;
    let sweeps = live_markers(store, Namespace::Sweeps, SWEEP_MAGIC, Some(&mine))?;
    warn_future("gc", &sweeps);
    for name in sweeps
        .expired
        .iter()
        .chain(sweeps.future.iter().map(|(name, _, _)| name))
    {
        delete(store, name)?;
        report.expired_markers += 1;
    }
    report.incomplete_removed = store
        .backend
        .remove_incomplete(store.config.lease_ttl)
        .map_err(|source| StoreError::Backend {
            op: Op::Cleanup,
            object: mine,
            source,
        })?;
    marker.release();
    Ok(report)
}

pub(super) fn verify(
    store: &ConvergentStore,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<VerifyReport, StoreError> {
    let mut report = VerifyReport::default();
    let mine = manifest::key_id(&store.key);
    // Block -> one manifest referencing it.
    let mut referenced: HashMap<BlockId, ManifestId> = HashMap::new();
    let manifests = list_skipping(store, Namespace::Manifests, &mut report)?;
    let blocks = list_skipping(store, Namespace::Blocks, &mut report)?;
    let total = (manifests.len() + blocks.len()) as u64;
    let mut done = 0u64;
    for name in manifests {
        let id = ManifestId::from_bytes(name.id);
        done += 1;
        progress(done, total);
        let bytes = match store
            .backend
            .get(&name, store.config.max_manifest_len as u64)
        {
            Ok(Some(b)) => b,
            Ok(None) => continue,
            Err(super::BackendError::TooLarge { .. }) => {
                report.problems.push(Problem::CorruptManifest {
                    manifest: id,
                    error: None,
                });
                continue;
            }
            Err(super::BackendError::Symlink { .. } | super::BackendError::NotAFile { .. }) => {
                report.problems.push(Problem::NotAFile { object: name });
                continue;
            }
            Err(source) => {
                return Err(StoreError::Backend {
                    op: Op::Get,
                    object: name,
                    source,
                })
            }
        };
        report.manifests += 1;
        let header = match SealedHeader::parse(&bytes) {
            Ok(h) => h,
            Err(e) => {
                report.problems.push(Problem::CorruptManifest {
                    manifest: id,
                    error: Some(e),
                });
                continue;
            }
        };
        if crypto::sha256(&bytes) != *id.as_bytes() {
            report.problems.push(Problem::CorruptManifest {
                manifest: id,
                error: None,
            });
        } else if header.key_id == mine {
            if let Err(e) = Manifest::open(&bytes, &store.key) {
                report.problems.push(Problem::CorruptManifest {
                    manifest: id,
                    error: Some(e),
                });
            }
        }
        for r in header.refs {
            referenced.entry(r).or_insert(id);
        }
    }
    for name in blocks {
        done += 1;
        progress(done, total);
        let id = BlockId::from_bytes(name.id);
        let limit = (MAX_BLOCK_SIZE + TAG_LEN) as u64;
        match store.backend.get(&name, limit) {
            Ok(Some(bytes)) => {
                report.blocks += 1;
                report.block_bytes += bytes.len() as u64;
                if crypto::sha256(&bytes) != name.id {
                    report.problems.push(Problem::CorruptBlock { block: id });
                }
            }
            Ok(None) => continue, // deleted meanwhile; checked below if referenced
            Err(super::BackendError::TooLarge { .. }) => {
                report.blocks += 1;
                report.problems.push(Problem::CorruptBlock { block: id });
            }
            Err(super::BackendError::Symlink { .. } | super::BackendError::NotAFile { .. }) => {
                report.problems.push(Problem::NotAFile { object: name });
            }
            Err(source) => {
                return Err(StoreError::Backend {
                    op: Op::Get,
                    object: name,
                    source,
                })
            }
        }
        if referenced.remove(&id).is_none() {
            report.unreferenced_blocks += 1;
        }
    }
    // Whatever is left was referenced but never listed.
    for (block, manifest) in referenced {
        let name = ObjectName::block(&block);
        let present = match store.backend.has(&name) {
            Ok(present) => present,
            // Behind a symlinked or replaced shard directory (reported
            // above): neither followed nor read.
            Err(
                super::BackendError::Symlink { .. }
                | super::BackendError::NotAFile { .. }
                | super::BackendError::NotADirectory { .. },
            ) => {
                report.problems.push(Problem::NotAFile { object: name });
                continue;
            }
            Err(source) => {
                return Err(StoreError::Backend {
                    op: Op::Has,
                    object: name,
                    source,
                })
            }
        };
        if !present {
            report
                .problems
                .push(Problem::MissingBlock { block, manifest });
        }
    }
    Ok(report)
}
