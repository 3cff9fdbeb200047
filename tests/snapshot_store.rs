//! Snapshots in a ConvergentStore: round trips through separate store
//! handles, diffs, deduplication across snapshots of one runtime, loads
//! that fetch only the stored blocks, and data sets that are not snapshots.

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use snapvm::snapshot::RestoreStrategy;
use snapvm::store::ManifestKey;
use snapvm::store::{
    Backend, BackendError, ConvergentStore, Entry, FsBackend, Namespace, ObjectName, PutOutcome,
    StoreConfig,
};
use snapvm::{Snapshot, SnapshotError, VmConfig, VmInstance};

const OWNER: [u8; 32] = [5; 32];

fn config() -> VmConfig {
    common::config("testguest")
}

fn open(dir: &std::path::Path) -> ConvergentStore {
    ConvergentStore::open_dir(dir, ManifestKey::from_bytes(OWNER)).unwrap()
}

fn counter(vm: &mut VmInstance) -> u64 {
    u64::from_le_bytes(vm.invoke("counter", b"").unwrap().try_into().unwrap())
}

/// Bytes of all files under `dir`.
fn stored_bytes(dir: &std::path::Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            stored_bytes(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

#[test]
fn a_snapshot_round_trips_through_the_store() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let config = config();
    let mut vm = VmInstance::new(&config).unwrap();
    counter(&mut vm);
    let snapshot = vm.snapshot().unwrap();
    let id = snapshot.save_to_store(&open(dir.path())).unwrap();

    // Another handle (as another machine would open it).
    let loaded = Snapshot::load_from_store(&open(dir.path()), &id).unwrap();
    assert_eq!(loaded.id(), snapshot.id());
    assert_eq!(loaded.stored_bytes(), snapshot.stored_bytes());
    for strategy in [
        snapvm::snapshot::RestoreStrategy::Eager,
        snapvm::snapshot::RestoreStrategy::Lazy,
    ] {
        let mut copy = VmInstance::restore_with(&config, &loaded, strategy).unwrap();
        assert_eq!(counter(&mut copy), 2);
    }
}

#[test]
fn diffs_round_trip_through_the_store() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let config = config().dirty_tracking(true);
    let mut vm = VmInstance::new(&config).unwrap();
    let base = vm.snapshot().unwrap();
    counter(&mut vm);
    let diff = vm.snapshot_diff(&base).unwrap();
    let (base_id, diff_id) = (
        base.save_to_store(&store).unwrap(),
        diff.save_to_store(&store).unwrap(),
    );

    let base = Snapshot::load_from_store(&store, &base_id).unwrap();
    assert!(matches!(
        Snapshot::load_from_store(&store, &diff_id),
        Err(SnapshotError::BaseRequired { .. })
    ));
    let diff = Snapshot::load_diff_from_store(&store, &diff_id, &base).unwrap();
    let mut copy = VmInstance::restore(&config, &diff).unwrap();
    assert_eq!(counter(&mut copy), 2);
}

/// Ten snapshots of one runtime (the `runtime` guest: 8 MiB of state built
/// at init), each with different function state.
pub fn ten_runtime_snapshots() -> Vec<Snapshot> {
    let config = common::config("runtime").memory_size(32 << 20);
    (0..10u32)
        .map(|i| {
            let mut vm = VmInstance::new(&config).unwrap();
            for k in 0..=i {
                let value = vec![b'a' + (k % 26) as u8; 100 * (i as usize + 1)];
                let mut input = format!("key{k}=").into_bytes();
                input.extend_from_slice(&value);
                vm.invoke("set", &input).unwrap();
            }
            vm.snapshot().unwrap()
        })
        .collect()
}

#[test]
fn ten_snapshots_of_one_runtime_share_nearly_all_blocks() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut logical = 0;
    for snapshot in ten_runtime_snapshots() {
        // Logical bytes: what the snapshots hold (their non-zero pages).
        logical += snapshot.stored_bytes();
        snapshot.save_to_store(&store).unwrap();
    }
    let stored = stored_bytes(dir.path());
    let ratio = logical as f64 / stored as f64;
    assert!(
        ratio >= 5.0,
        "dedup ratio {ratio:.2}: {logical} logical bytes, {stored} stored"
    );
}

#[test]
fn a_data_set_that_is_not_a_snapshot_is_rejected() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let put = store
        .put_bytes(b"just some bytes", b"not a snapshot")
        .unwrap();
    assert!(matches!(
        Snapshot::load_from_store(&store, &put.manifest),
        Err(SnapshotError::Malformed { .. })
    ));
    // Snapshot metadata with a body that is too short for it.
    let mut metadata = b"snapvm.snapshot.1".to_vec();
    metadata.extend_from_slice(&(2u64 << 20).to_le_bytes());
    let fake = store.put_bytes(&[0u8; 4096], &metadata).unwrap();
    assert!(matches!(
        Snapshot::load_from_store(&store, &fake.manifest),
        Err(SnapshotError::Malformed { .. })
    ));
    // Another owner cannot open the manifest.
    let mut vm = VmInstance::new(&config()).unwrap();
    let id = vm.snapshot().unwrap().save_to_store(&store).unwrap();
    let stranger = ConvergentStore::open_dir(dir.path(), ManifestKey::from_bytes([6; 32])).unwrap();
    assert!(matches!(
        Snapshot::load_from_store(&stranger, &id),
        Err(SnapshotError::Store { .. })
    ));
}

/// An [`FsBackend`] that records every block it is asked for.
struct BlockGets {
    inner: FsBackend,
    gets: Mutex<Vec<ObjectName>>,
    manifest_gets: AtomicU64,
}

impl BlockGets {
    fn take(&self) -> Vec<ObjectName> {
        std::mem::take(&mut *self.gets.lock().unwrap())
    }
}

impl Backend for BlockGets {
    fn put_if_absent(&self, n: &ObjectName, b: &[u8]) -> Result<PutOutcome, BackendError> {
        self.inner.put_if_absent(n, b)
    }
    fn get(&self, n: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError> {
        match n.namespace {
            Namespace::Blocks => self.gets.lock().unwrap().push(*n),
            Namespace::Manifests => {
                self.manifest_gets.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
        self.inner.get(n, limit)
    }
    fn has(&self, n: &ObjectName) -> Result<bool, BackendError> {
        self.inner.has(n)
    }
    fn delete(&self, n: &ObjectName) -> Result<(), BackendError> {
        self.inner.delete(n)
    }
    fn list(&self, ns: Namespace) -> Result<Vec<ObjectName>, BackendError> {
        self.inner.list(ns)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.inner.flush()
    }
}

#[test]
fn a_large_vm_with_little_data_loads_only_its_stored_blocks() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let backend = Arc::new(BlockGets {
        inner: FsBackend::open(dir.path()).unwrap(),
        gets: Mutex::new(Vec::new()),
        manifest_gets: AtomicU64::new(0),
    });
    let store = ConvergentStore::new(
        &StoreConfig::default(),
        Arc::clone(&backend),
        ManifestKey::from_bytes(OWNER),
    )
    .unwrap();
    let config = config().memory_size(256 << 20);
    let mut vm = VmInstance::new(&config).unwrap();
    counter(&mut vm);
    let snapshot = vm.snapshot().unwrap();
    let id = snapshot.save_to_store(&store).unwrap();
    let manifest = store.manifest(&id).unwrap();
    let mut stored: Vec<ObjectName> = manifest
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Data { id, .. } => Some(ObjectName::block(id)),
            Entry::Zero { .. } => None,
        })
        .collect();
    assert!(
        stored.len() * 32 < manifest.entries.len(),
        "{} of {} blocks stored: not a sparse snapshot",
        stored.len(),
        manifest.entries.len()
    );

    backend.take();
    backend.manifest_gets.store(0, Ordering::Relaxed);
    let loaded = Snapshot::load_from_store(&store, &id).unwrap();
    // One manifest read, and each stored block (memory, then the header
    // and state after it) fetched once; no other block.
    assert_eq!(backend.manifest_gets.load(Ordering::Relaxed), 1);
    let mut fetched = backend.take();
    fetched.sort();
    stored.sort();
    assert_eq!(fetched, stored);

    assert_eq!(loaded.id(), snapshot.id());
    assert_eq!(loaded.memory_size(), 256 << 20);
    assert_eq!(loaded.stored_bytes(), snapshot.stored_bytes());
    // The loaded snapshot is the captured one, byte for byte.
    let files = tempfile::tempdir().unwrap();
    let (a, b) = (files.path().join("a"), files.path().join("b"));
    snapshot.save(&a).unwrap();
    loaded.save(&b).unwrap();
    assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
    for strategy in [RestoreStrategy::Eager, RestoreStrategy::Lazy] {
        let mut copy = VmInstance::restore_with(&config, &loaded, strategy).unwrap();
        assert_eq!(counter(&mut copy), 2);
        assert_eq!(counter(&mut copy), 3);
    }
}

/// Bytes in the regular files under `dir`.
fn bytes_under(dir: &std::path::Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                bytes_under(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// A 64 MiB guest that touched little memory puts only the pages it
/// stores into the store, and a load brings back exactly those: what a
/// load reads follows the stored bytes, not the guest's memory size (the
/// time it takes is in `cargo bench --bench report`).
#[test]
fn the_store_holds_and_loads_only_the_stored_bytes() {
    require_kvm!();
    let dir = tempfile::tempdir().unwrap();
    let store = open(&dir.path().join("store"));
    let config = config().memory_size(64 << 20);
    let mut vm = VmInstance::new(&config).unwrap();
    counter(&mut vm);
    let snapshot = vm.snapshot().unwrap();
    let stored = snapshot.stored_bytes();
    assert!(stored < 8 << 20, "{stored} bytes stored for a 64 MiB guest");
    let id = snapshot.save_to_store(&store).unwrap();
    let on_disk = bytes_under(&dir.path().join("store"));
    assert!(
        on_disk <= 4 * stored + (1 << 20),
        "{on_disk} bytes in the store for {stored} stored bytes"
    );
    let loaded = Snapshot::load_from_store(&store, &id).unwrap();
    assert_eq!(loaded.stored_bytes(), stored);
    assert_eq!(loaded.memory_size(), 64 << 20);
    let mut copy = VmInstance::restore(&config, &loaded).unwrap();
    assert_eq!(counter(&mut copy), 2);
}
