//! Owners sharing one backend: each deletes only its own data sets, and
//! shared blocks go only when no owner's manifest references them.

use snapvm::store::{
    Backend, ConvergentStore, FsBackend, ManifestKey, MemoryBackend, Namespace, ObjectName,
    StoreConfig, StoreError,
};
use snapvm::ErrorKind;

fn config() -> StoreConfig {
    StoreConfig {
        block_size: 1024,
        ..StoreConfig::default()
    }
}

fn data(seed: u8, blocks: usize) -> Vec<u8> {
    (0..blocks * 1024)
        .map(|i| ((i / 1024) as u8).wrapping_mul(37) ^ seed ^ (i as u8 | 1))
        .collect()
}

fn owners_cannot_delete_each_other(backend: impl Backend + Clone + 'static) {
    let a =
        ConvergentStore::new(&config(), backend.clone(), ManifestKey::from_bytes([1; 32])).unwrap();
    let b =
        ConvergentStore::new(&config(), backend.clone(), ManifestKey::from_bytes([2; 32])).unwrap();
    let shared = data(1, 4);
    let mut a_data = shared.clone();
    a_data.extend(data(2, 3));
    let pa = a.put_bytes(&a_data, b"a's image").unwrap();
    let pb = b.put_bytes(&shared, b"b's image").unwrap();

    // B cannot remove A's data set: typed error, nothing deleted.
    let err = b.delete(&pa.manifest).unwrap_err();
    assert!(
        matches!(err, StoreError::NotOwner { manifest } if manifest == pa.manifest),
        "{err:?}"
    );
    assert_eq!(err.kind(), ErrorKind::BadRequest);
    assert!(backend.has(&ObjectName::manifest(&pa.manifest)).unwrap());
    // Not after a gc either: A's data set is intact and restorable.
    assert_eq!(b.gc().unwrap().deleted_blocks, 0);
    assert_eq!(a.get_bytes(&pa.manifest).unwrap(), a_data);
    assert!(a.verify().unwrap().is_clean());

    // A removes its own; the blocks B shares stay, the rest go with gc.
    a.delete(&pa.manifest).unwrap();
    a.delete(&pa.manifest).unwrap(); // already gone: not an error
    assert_eq!(a.gc().unwrap().deleted_blocks, 3);
    assert_eq!(b.get_bytes(&pb.manifest).unwrap(), shared);
    assert!(b.verify().unwrap().is_clean());
    // And A cannot remove B's.
    assert!(matches!(
        a.delete(&pb.manifest),
        Err(StoreError::NotOwner { .. })
    ));
    assert_eq!(b.list().unwrap().len(), 1);
}

#[test]
fn another_owner_cannot_delete_a_data_set_in_memory() {
    owners_cannot_delete_each_other(MemoryBackend::new());
}

#[test]
fn another_owner_cannot_delete_a_data_set_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    owners_cannot_delete_each_other(std::sync::Arc::new(FsBackend::open(dir.path()).unwrap()));
}

/// An owner can remove its own damaged manifest (so that gc can run again),
/// but not another owner's, damaged or not; an object that is no manifest
/// at all is no one's and anyone may remove it.
#[test]
fn damaged_manifests_are_removed_by_their_owner_only() {
    let backend = MemoryBackend::new();
    let a =
        ConvergentStore::new(&config(), backend.clone(), ManifestKey::from_bytes([1; 32])).unwrap();
    let b =
        ConvergentStore::new(&config(), backend.clone(), ManifestKey::from_bytes([2; 32])).unwrap();
    let pa = a.put_bytes(&data(3, 2), b"").unwrap();
    let name = ObjectName::manifest(&pa.manifest);
    let mut bytes = backend.get(&name, 1 << 20).unwrap().unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1; // the body: the clear header still names A's key
    backend.delete(&name).unwrap();
    backend.put_if_absent(&name, &bytes).unwrap();
    assert_eq!(a.gc().unwrap().unverified_manifests, vec![pa.manifest]);

    assert!(matches!(
        b.delete(&pa.manifest),
        Err(StoreError::NotOwner { .. })
    ));
    a.delete(&pa.manifest).unwrap();
    assert!(!backend.has(&name).unwrap());
    let gc = a.gc().unwrap();
    assert!(gc.unverified_manifests.is_empty());
    assert_eq!(gc.deleted_blocks, 2);

    // Junk under a manifest name: no owner, removable by anyone.
    let junk = ObjectName {
        namespace: Namespace::Manifests,
        id: [0x5a; 32],
    };
    backend.put_if_absent(&junk, b"not a manifest").unwrap();
    b.delete(&snapvm::store::ManifestId::from_bytes(junk.id))
        .unwrap();
    assert!(!backend.has(&junk).unwrap());
}
