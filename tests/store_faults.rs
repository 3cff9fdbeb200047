//! Bad input and faults: corrupt and missing blocks, bad manifests, a full
//! disk, and processes killed in the middle of a put or a gc.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use snapvm::store::{
    Backend, BackendError, ConvergentStore, Entry, FsBackend, ManifestError, ManifestKey,
    MemoryBackend, Namespace, ObjectName, Problem, PutOutcome, StoreConfig, StoreError,
};

const KEY: [u8; 32] = [0x11; 32];

/// A store of 4 KiB blocks in an `FsBackend` at `root`.
fn fs_store(root: &Path) -> ConvergentStore {
    let config = StoreConfig {
        block_size: 4096,
        ..StoreConfig::default()
    };
    ConvergentStore::new(
        &config,
        FsBackend::open(root).unwrap(),
        ManifestKey::from_bytes(KEY),
    )
    .unwrap()
}

fn mem_store(backend: &MemoryBackend) -> ConvergentStore {
    let config = StoreConfig {
        block_size: 4096,
        ..StoreConfig::default()
    };
    ConvergentStore::new(&config, backend.clone(), ManifestKey::from_bytes(KEY)).unwrap()
}

#[test]
fn corrupt_and_missing_blocks_are_typed_and_verified() {
    let backend = MemoryBackend::new();
    let store = mem_store(&backend);
    let put = store
        .put_bytes(&common::pseudo_random(5 * 4096, 1), b"")
        .unwrap();
    let m = store.manifest(&put.manifest).unwrap();
    let ids: Vec<_> = m
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Data { id, .. } => Some(*id),
            Entry::Zero { .. } => None,
        })
        .collect();

    // Flip one bit of block 1.
    let name = ObjectName::block(&ids[1]);
    let mut bytes = backend.get(&name, 1 << 20).unwrap().unwrap();
    bytes[100] ^= 1;
    backend.overwrite(&name, &bytes);
    match store.get_bytes(&put.manifest) {
        Err(StoreError::Corrupt { block }) => assert_eq!(block, ids[1]),
        other => panic!("expected Corrupt, got {other:?}"),
    }
    // Truncate block 2 (a valid prefix is still corrupt).
    let name2 = ObjectName::block(&ids[2]);
    let b2 = backend.get(&name2, 1 << 20).unwrap().unwrap();
    backend.overwrite(&name2, &b2[..b2.len() - 1]);
    // Remove block 3.
    backend.delete(&ObjectName::block(&ids[3])).unwrap();
    let mut r = store.reader(&put.manifest).unwrap();
    let mut sink = Vec::new();
    let err = r.read_to_end(&mut sink).unwrap_err();
    let inner = err.into_inner().unwrap().downcast::<StoreError>().unwrap();
    assert!(matches!(*inner, StoreError::Corrupt { block } if block == ids[1]));

    let report = store.verify().unwrap();
    assert!(!report.is_clean());
    let mut problems = report.problems.clone();
    problems.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(problems.len(), 3, "{problems:?}");
    assert!(problems.contains(&Problem::CorruptBlock { block: ids[1] }));
    assert!(problems.contains(&Problem::CorruptBlock { block: ids[2] }));
    assert!(problems.contains(&Problem::MissingBlock {
        block: ids[3],
        manifest: put.manifest
    }));

    // Repairing by putting the data again restores the missing block only;
    // corrupt objects must be deleted first (put-if-absent keeps them).
    backend.delete(&name).unwrap();
    backend.delete(&name2).unwrap();
    store
        .put_bytes(&common::pseudo_random(5 * 4096, 1), b"")
        .unwrap();
    assert!(store.verify().unwrap().is_clean());
    assert_eq!(
        store.get_bytes(&put.manifest).unwrap(),
        common::pseudo_random(5 * 4096, 1)
    );
}

#[test]
fn putting_the_data_again_heals_truncated_and_corrupt_block_files() {
    let dir = tempfile::tempdir().unwrap();
    let backend = FsBackend::open(dir.path()).unwrap();
    let store = ConvergentStore::new(
        &StoreConfig {
            block_size: 4096,
            ..StoreConfig::default()
        },
        backend,
        ManifestKey::from_bytes(KEY),
    )
    .unwrap();
    let data = common::pseudo_random(4 * 4096, 7);
    let put = store.put_bytes(&data, b"").unwrap();
    let ids: Vec<_> = store
        .manifest(&put.manifest)
        .unwrap()
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Data { id, .. } => Some(*id),
            Entry::Zero { .. } => None,
        })
        .collect();
    let fs = FsBackend::open(dir.path()).unwrap();
    // Block 0 cut short, block 1 with one bit flipped (same length).
    let p0 = fs.path_of(&ObjectName::block(&ids[0]));
    let b0 = std::fs::read(&p0).unwrap();
    std::fs::write(&p0, &b0[..b0.len() / 2]).unwrap();
    let p1 = fs.path_of(&ObjectName::block(&ids[1]));
    let mut b1 = std::fs::read(&p1).unwrap();
    b1[10] ^= 4;
    std::fs::write(&p1, &b1).unwrap();
    assert!(matches!(
        store.get_bytes(&put.manifest),
        Err(StoreError::Corrupt { .. })
    ));
    assert_eq!(store.verify().unwrap().problems.len(), 2);

    let again = store.put_bytes(&data, b"").unwrap();
    assert_eq!(again.new_blocks, 2, "the two damaged blocks are rewritten");
    assert_eq!(store.get_bytes(&put.manifest).unwrap(), data);
    let report = store.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(std::fs::read(&p0).unwrap(), b0);
}

fn data_ids(
    store: &ConvergentStore,
    id: &snapvm::store::ManifestId,
) -> Vec<snapvm::store::BlockId> {
    store
        .manifest(id)
        .unwrap()
        .entries
        .iter()
        .filter_map(|e| match e {
            Entry::Data { id, .. } => Some(*id),
            Entry::Zero { .. } => None,
        })
        .collect()
}

#[test]
fn symlinked_shard_directories_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = fs_store(&root);
    let data = common::pseudo_random(4096, 8);
    let put = store.put_bytes(&data, b"").unwrap();
    let block = data_ids(&store, &put.manifest)[0];
    let name = ObjectName::block(&block);
    let path = FsBackend::open(&root).unwrap().path_of(&name);
    let shard = path.parent().unwrap().to_path_buf();

    // Move the real shard out of the store and link to it: the file behind
    // the link has the right name and the right bytes.
    let outside = dir.path().join("outside");
    std::fs::rename(&shard, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &shard).unwrap();
    let outside_file = outside.join(path.file_name().unwrap());
    assert!(outside_file.exists());

    let backend = store.backend();
    assert!(matches!(
        backend.get(&name, 1 << 20),
        Err(BackendError::Symlink { .. })
    ));
    assert!(matches!(
        store.get_bytes(&put.manifest),
        Err(StoreError::Backend {
            source: BackendError::Symlink { .. },
            ..
        })
    ));
    assert!(backend.delete(&name).is_err());
    assert!(matches!(
        backend.put_if_absent(&name, b"x"),
        Err(BackendError::Symlink { .. })
    ));
    assert!(store.gc().is_err(), "gc must not sweep through a symlink");
    assert!(
        outside_file.exists(),
        "a file outside the store was removed"
    );
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 1);
}

/// A block file replaced by a FIFO (no writer) or by a symlink to
/// `/dev/zero` is refused at once with a typed error, never waited on or
/// read without bound; `verify` reports both and carries on.
#[test]
fn a_fifo_or_a_link_to_dev_zero_in_place_of_a_block_is_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = std::sync::Arc::new(
        ConvergentStore::new(
            &StoreConfig {
                block_size: 4096,
                ..StoreConfig::default()
            },
            FsBackend::open(&root).unwrap(),
            ManifestKey::from_bytes(KEY),
        )
        .unwrap(),
    );
    let data = common::pseudo_random(2 * 4096, 11);
    let put = store.put_bytes(&data, b"").unwrap();
    let ids = data_ids(&store, &put.manifest);
    let fs = FsBackend::open(&root).unwrap();
    let p0 = fs.path_of(&ObjectName::block(&ids[0]));
    std::fs::remove_file(&p0).unwrap();
    let made = Command::new("mkfifo").arg(&p0).status().unwrap();
    assert!(made.success());
    let p1 = fs.path_of(&ObjectName::block(&ids[1]));
    std::fs::remove_file(&p1).unwrap();
    std::os::unix::fs::symlink("/dev/zero", &p1).unwrap();

    let (tx, rx) = std::sync::mpsc::channel();
    let s = store.clone();
    let (n0, n1) = (ObjectName::block(&ids[0]), ObjectName::block(&ids[1]));
    std::thread::spawn(move || {
        let b = s.backend();
        let _ = tx.send((
            b.get(&n0, 1 << 20),
            b.get(&n1, 1 << 20),
            b.put_if_absent(&n0, b"x"),
            s.verify(),
        ));
    });
    let (get0, get1, put0, report) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("reading a FIFO or /dev/zero block blocked");
    assert!(
        matches!(get0, Err(BackendError::NotAFile { .. })),
        "{get0:?}"
    );
    assert!(
        matches!(get1, Err(BackendError::Symlink { .. })),
        "{get1:?}"
    );
    assert!(
        matches!(put0, Err(BackendError::NotAFile { .. })),
        "{put0:?}"
    );
    let mut problems = report.unwrap().problems;
    problems.sort_by_key(|p| format!("{p:?}"));
    let mut want = vec![
        Problem::NotAFile { object: n0 },
        Problem::NotAFile { object: n1 },
    ];
    want.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(problems, want);
}

/// `verify` reports a symlinked shard directory (and the referenced blocks
/// behind it) and checks everything else, instead of failing.
#[test]
fn verify_reports_a_symlinked_shard_directory_and_carries_on() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = fs_store(&root);
    let data = common::pseudo_random(16 * 4096, 10);
    let put = store.put_bytes(&data, b"").unwrap();
    let ids = data_ids(&store, &put.manifest);
    let fs = FsBackend::open(&root).unwrap();
    let path = fs.path_of(&ObjectName::block(&ids[0]));
    let shard = path.parent().unwrap().to_path_buf();
    let behind: Vec<_> = ids
        .iter()
        .filter(|id| fs.path_of(&ObjectName::block(id)).parent() == Some(&shard))
        .copied()
        .collect();
    // Another block, elsewhere, is corrupt: verify must still find it.
    let other = *ids
        .iter()
        .find(|id| fs.path_of(&ObjectName::block(id)).parent() != Some(&shard))
        .expect("16 random blocks share one shard");
    let other_path = fs.path_of(&ObjectName::block(&other));
    let mut bytes = std::fs::read(&other_path).unwrap();
    bytes[0] ^= 1;
    std::fs::write(&other_path, &bytes).unwrap();

    let outside = dir.path().join("outside");
    std::fs::rename(&shard, &outside).unwrap();
    std::os::unix::fs::symlink(&outside, &shard).unwrap();
    // A symlinked shard of the manifests namespace too.
    let mshard = root.join("manifests/00");
    let moutside = dir.path().join("moutside");
    std::fs::create_dir(&moutside).unwrap();
    std::os::unix::fs::symlink(&moutside, &mshard).unwrap();

    let report = store.verify().expect("verify carries on");
    let mut want = vec![
        Problem::NotADirectory {
            namespace: Namespace::Blocks,
            path: shard.clone(),
        },
        Problem::NotADirectory {
            namespace: Namespace::Manifests,
            path: mshard.clone(),
        },
        Problem::CorruptBlock { block: other },
    ];
    want.extend(behind.iter().map(|id| Problem::NotAFile {
        object: ObjectName::block(id),
    }));
    let mut problems = report.problems.clone();
    problems.sort_by_key(|p| format!("{p:?}"));
    want.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(problems, want);
    assert_eq!(report.manifests, 1);
    assert_eq!(report.blocks as usize, ids.len() - behind.len());
    // Nothing behind the links was touched.
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), behind.len());
    assert_eq!(std::fs::read_dir(&moutside).unwrap().count(), 0);

    // Moving the shard back and healing the corrupt block makes it clean.
    std::fs::remove_file(&shard).unwrap();
    std::fs::rename(&outside, &shard).unwrap();
    std::fs::remove_file(&mshard).unwrap();
    std::fs::remove_file(&other_path).unwrap();
    store.put_bytes(&data, b"").unwrap();
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn verify_reports_a_directory_or_symlink_in_place_of_a_block() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = fs_store(&root);
    let data = common::pseudo_random(3 * 4096, 9);
    let put = store.put_bytes(&data, b"").unwrap();
    let ids = data_ids(&store, &put.manifest);
    let fs = FsBackend::open(&root).unwrap();
    let target = dir.path().join("target");
    std::fs::write(&target, b"outside").unwrap();
    // Block 0 becomes a directory, block 1 a symlink to a file outside.
    let p0 = fs.path_of(&ObjectName::block(&ids[0]));
    std::fs::remove_file(&p0).unwrap();
    std::fs::create_dir(&p0).unwrap();
    let p1 = fs.path_of(&ObjectName::block(&ids[1]));
    std::fs::remove_file(&p1).unwrap();
    std::os::unix::fs::symlink(&target, &p1).unwrap();

    let report = store.verify().unwrap();
    let mut problems = report.problems.clone();
    problems.sort_by_key(|p| format!("{p:?}"));
    let mut want = vec![
        Problem::NotAFile {
            object: ObjectName::block(&ids[0]),
        },
        Problem::NotAFile {
            object: ObjectName::block(&ids[1]),
        },
    ];
    want.sort_by_key(|p| format!("{p:?}"));
    assert_eq!(problems, want);
    // Blocks are fetched in parallel: either failure may come first.
    assert!(matches!(
        store.get_bytes(&put.manifest),
        Err(StoreError::Backend {
            source: BackendError::NotAFile { .. } | BackendError::Symlink { .. },
            ..
        })
    ));
    assert_eq!(std::fs::read(&target).unwrap(), b"outside");

    // Putting the data again refuses both (typed) until they are removed by
    // hand; the symlink's target is never touched.
    assert!(matches!(
        store.put_bytes(&data, b""),
        Err(StoreError::Backend {
            source: BackendError::NotAFile { .. } | BackendError::Symlink { .. },
            ..
        })
    ));
    std::fs::remove_dir(&p0).unwrap();
    assert!(matches!(
        store.put_bytes(&data, b""),
        Err(StoreError::Backend {
            source: BackendError::Symlink { .. },
            ..
        })
    ));
    std::fs::remove_file(&p1).unwrap();
    store.put_bytes(&data, b"").unwrap();
    assert_eq!(store.get_bytes(&put.manifest).unwrap(), data);
    assert!(store.verify().unwrap().is_clean());
    assert_eq!(std::fs::read(&target).unwrap(), b"outside");
}

#[test]
fn wrong_key_truncated_and_tampered_manifests_are_typed() {
    let backend = MemoryBackend::new();
    let store = mem_store(&backend);
    let put = store
        .put_bytes(&common::pseudo_random(3 * 4096, 2), b"meta")
        .unwrap();
    let name = ObjectName::manifest(&put.manifest);
    let sealed = backend.get(&name, 1 << 20).unwrap().unwrap();

    let other = ConvergentStore::new(
        &StoreConfig::default(),
        backend.clone(),
        ManifestKey::from_bytes([0x22; 32]),
    )
    .unwrap();
    assert!(matches!(
        other.get_bytes(&put.manifest),
        Err(StoreError::Manifest {
            source: ManifestError::WrongKey,
            ..
        })
    ));
    // The other owner's verify checks the blocks but cannot open the manifest:
    // that is not a problem.
    assert!(other.verify().unwrap().is_clean());
    assert!(other.list().unwrap().is_empty());

    backend.overwrite(&name, &sealed[..sealed.len() - 10]);
    assert!(matches!(
        store.manifest(&put.manifest),
        Err(StoreError::Manifest {
            source: ManifestError::Truncated { .. },
            ..
        })
    ));
    let mut tampered = sealed.clone();
    let last = tampered.len() - 30;
    tampered[last] ^= 0x80;
    backend.overwrite(&name, &tampered);
    assert!(matches!(
        store.manifest(&put.manifest),
        Err(StoreError::Manifest {
            source: ManifestError::Tampered,
            ..
        })
    ));
    let report = store.verify().unwrap();
    assert!(
        matches!(report.problems[..], [Problem::CorruptManifest { manifest, .. }] if manifest == put.manifest)
    );

    // A valid manifest under a name that is not its hash.
    backend.overwrite(&name, &sealed);
    let moved = snapvm::store::ManifestId::from_bytes([0xee; 32]);
    backend.overwrite(&ObjectName::manifest(&moved), &sealed);
    assert!(matches!(
        store.manifest(&moved),
        Err(StoreError::Manifest {
            source: ManifestError::Tampered,
            ..
        })
    ));
    backend.delete(&ObjectName::manifest(&moved)).unwrap();
    assert!(matches!(
        store.manifest(&moved),
        Err(StoreError::ManifestMissing { .. })
    ));
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn oversized_objects_are_refused_before_reading() {
    let backend = MemoryBackend::new();
    let config = StoreConfig {
        max_manifest_len: 8192,
        ..StoreConfig::default()
    };
    let store =
        ConvergentStore::new(&config, backend.clone(), ManifestKey::from_bytes(KEY)).unwrap();
    let huge = snapvm::store::ManifestId::from_bytes([1; 32]);
    backend.overwrite(&ObjectName::manifest(&huge), &vec![0u8; 100_000]);
    assert!(matches!(
        store.manifest(&huge),
        Err(StoreError::Backend {
            source: BackendError::TooLarge {
                len: 100_000,
                limit: 8192
            },
            ..
        })
    ));
    assert!(matches!(
        store.put_bytes(b"x", &[0u8; 8000]),
        Err(StoreError::MetadataTooLarge { len: 8000, .. })
    ));
    // 600 blocks of 1 byte need a manifest above 8 KiB.
    let small = StoreConfig {
        block_size: 1,
        max_manifest_len: 8192,
        ..StoreConfig::default()
    };
    let store =
        ConvergentStore::new(&small, MemoryBackend::new(), ManifestKey::from_bytes(KEY)).unwrap();
    assert!(matches!(
        store.put_bytes(&common::pseudo_random(600, 3), b""),
        Err(StoreError::ManifestTooLarge { .. })
    ));
    // An endless input stops as soon as its manifest cannot fit, on one
    // thread or several: the entry list never grows past the limit.
    for threads in [1, 2] {
        let config = StoreConfig {
            block_size: 1024,
            ingest_threads: threads,
            max_manifest_len: 8192,
            ..StoreConfig::default()
        };
        let store =
            ConvergentStore::new(&config, MemoryBackend::new(), ManifestKey::from_bytes(KEY))
                .unwrap();
        assert!(matches!(
            store.put(std::io::repeat(1), b""),
            Err(StoreError::ManifestTooLarge { limit: 8192, .. })
        ));
    }
}

#[test]
fn invalid_config_is_rejected() {
    for (config, what) in [
        (
            StoreConfig {
                block_size: 0,
                ..StoreConfig::default()
            },
            "block size 0",
        ),
        (
            StoreConfig {
                block_size: (16 << 20) + 1,
                ..StoreConfig::default()
            },
            "block size",
        ),
        (
            StoreConfig {
                ingest_threads: 0,
                ..StoreConfig::default()
            },
            "threads",
        ),
        (
            StoreConfig {
                lease_ttl: Duration::ZERO,
                ..StoreConfig::default()
            },
            "ttl",
        ),
    ] {
        let r = ConvergentStore::new(&config, MemoryBackend::new(), ManifestKey::from_bytes(KEY));
        assert!(matches!(r, Err(StoreError::Config(_))), "{what}");
    }
}

/// Mounts a tmpfs of `size` at `dir`; `None` if this process may not mount.
fn mount_tmpfs(dir: &Path, size: &str) -> Option<TmpfsGuard> {
    let ok = Command::new("mount")
        .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
        .arg(dir)
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok.then(|| TmpfsGuard(dir.to_path_buf()))
}

struct TmpfsGuard(PathBuf);

impl Drop for TmpfsGuard {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn full_disk_is_an_error_not_a_corrupt_store() {
    let dir = tempfile::tempdir().unwrap();
    let Some(_mount) = mount_tmpfs(dir.path(), "2m") else {
        let _ = writeln!(
            std::io::stderr(),
            "SKIP full_disk_is_an_error_not_a_corrupt_store: cannot mount a tmpfs here (needs root)"
        );
        return;
    };
    let config = StoreConfig {
        block_size: 64 * 1024,
        lease_ttl: Duration::from_secs(30),
        ..StoreConfig::default()
    };
    let store = ConvergentStore::new(
        &config,
        FsBackend::open(dir.path().join("store")).unwrap(),
        ManifestKey::from_bytes(KEY),
    )
    .unwrap();
    let err = store
        .put_bytes(&common::pseudo_random(4 << 20, 4), b"")
        .unwrap_err();
    assert!(err.is_storage_full(), "{err:?}");
    // No temp file left behind, nothing corrupt, no manifest committed.
    assert_eq!(
        std::fs::read_dir(dir.path().join("store/tmp"))
            .unwrap()
            .count(),
        0
    );
    let report = store.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.manifests, 0);
    assert!(report.unreferenced_blocks > 0);
    // gc frees the orphaned blocks; then the store works again.
    let gc = store.gc().unwrap();
    assert_eq!(gc.deleted_blocks, report.unreferenced_blocks);
    let put = store
        .put_bytes(&common::pseudo_random(1 << 20, 5), b"")
        .unwrap();
    assert_eq!(
        store.get_bytes(&put.manifest).unwrap(),
        common::pseudo_random(1 << 20, 5)
    );
    assert!(store.verify().unwrap().is_clean());
}

// ---- SIGKILL in the middle of put and gc -------------------------------------
//
// The parent test re-executes this test binary, running only `child_main`
// with SNAPVM_STORE_CHILD set; the child works on a shared FsBackend store
// until the parent kills it with SIGKILL.

const CHILD_ENV: &str = "SNAPVM_STORE_CHILD";
const TTL: Duration = Duration::from_secs(2);

fn fs_config() -> StoreConfig {
    StoreConfig {
        block_size: 16 * 1024,
        lease_ttl: TTL,
        ..StoreConfig::default()
    }
}

/// A backend that is the real FsBackend, slowed down so the parent can kill
/// the child between two operations with high probability.
struct Slow(FsBackend);

impl Backend for Slow {
    fn put_if_absent(&self, n: &ObjectName, b: &[u8]) -> Result<PutOutcome, BackendError> {
        std::thread::sleep(Duration::from_micros(300));
        self.0.put_if_absent(n, b)
    }
    fn get(&self, n: &ObjectName, l: u64) -> Result<Option<Vec<u8>>, BackendError> {
        self.0.get(n, l)
    }
    fn has(&self, n: &ObjectName) -> Result<bool, BackendError> {
        self.0.has(n)
    }
    fn delete(&self, n: &ObjectName) -> Result<(), BackendError> {
        std::thread::sleep(Duration::from_micros(300));
        self.0.delete(n)
    }
    fn list(&self, ns: Namespace) -> Result<Vec<ObjectName>, BackendError> {
        self.0.list(ns)
    }
}

/// The body of the kill tests' child process; a no-op unless the parent
/// set `CHILD_ENV`.
#[test]
fn child_main() {
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (what, dir) = spec.split_once(':').unwrap();
    let store = ConvergentStore::new(
        &fs_config(),
        Slow(FsBackend::open(dir).unwrap()),
        ManifestKey::from_bytes(KEY),
    )
    .unwrap();
    match what {
        "put" => {
            store
                .put_bytes(&common::pseudo_random(32 << 20, 9), b"killed")
                .unwrap();
        }
        "gc" => {
            store.gc().unwrap();
        }
        _ => unreachable!(),
    }
    // Reaching here means the parent was too slow; it checks for this file.
    std::fs::write(Path::new(dir).join("child-finished"), b"").unwrap();
}

/// A scratch directory on tmpfs when there is one (fsync is cheap there, so
/// the kill tests spend their time in the store, not in the disk).
fn scratch() -> tempfile::TempDir {
    tempfile::tempdir_in("/dev/shm")
        .or_else(|_| tempfile::tempdir())
        .unwrap()
}

fn spawn_child(what: &str, dir: &Path) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "child_main", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, format!("{what}:{}", dir.display()))
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

fn count_files(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|shards| {
            shards
                .flatten()
                .map(|s| std::fs::read_dir(s.path()).map_or(0, |f| f.count()))
                .sum()
        })
        .unwrap_or(0)
}

fn wait_until(mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "child made no progress"
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn sigkill_during_put_leaves_a_clean_store_and_the_put_repeats() {
    let dir = scratch();
    let root = dir.path().join("store");
    let store = ConvergentStore::new(
        &fs_config(),
        FsBackend::open(&root).unwrap(),
        ManifestKey::from_bytes(KEY),
    )
    .unwrap();
    let existing = store
        .put_bytes(&common::pseudo_random(100_000, 1), b"existing")
        .unwrap();

    let mut child = spawn_child("put", &root);
    wait_until(|| count_files(&root.join("blocks")) > 200);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        !root.join("child-finished").exists(),
        "child finished before the kill"
    );

    let report = store.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(report.manifests, 1);
    assert!(report.unreferenced_blocks > 0);
    // The dead put's lease is still there until it expires; repeating the
    // put does not need to wait for it.
    let again = store
        .put_bytes(&common::pseudo_random(32 << 20, 9), b"killed")
        .unwrap();
    assert!(
        again.new_blocks < again.blocks,
        "blocks stored before the kill are reused"
    );
    assert_eq!(
        store.get_bytes(&again.manifest).unwrap(),
        common::pseudo_random(32 << 20, 9)
    );
    assert_eq!(
        store.get_bytes(&existing.manifest).unwrap(),
        common::pseudo_random(100_000, 1)
    );

    // The dead put's lease names this host and a process that has exited:
    // it does not hold back gc, with no wait for its TTL.
    let gc = store.gc().unwrap();
    assert_eq!(gc.deferred, None);
    assert!(gc.expired_markers >= 1);
    assert!(store.verify().unwrap().is_clean());
}

#[test]
fn sigkill_during_gc_leaves_a_clean_store() {
    let dir = scratch();
    let root = dir.path().join("store");
    let store = ConvergentStore::new(
        &fs_config(),
        FsBackend::open(&root).unwrap(),
        ManifestKey::from_bytes(KEY),
    )
    .unwrap();
    let keep = store
        .put_bytes(&common::pseudo_random(2 << 20, 1), b"keep")
        .unwrap();
    let drop_me = store
        .put_bytes(&common::pseudo_random(16 << 20, 2), b"drop")
        .unwrap();
    store.delete(&drop_me.manifest).unwrap();
    let before = count_files(&root.join("blocks"));

    let mut child = spawn_child("gc", &root);
    wait_until(|| count_files(&root.join("blocks")) < before - 100);
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        !root.join("child-finished").exists(),
        "child finished before the kill"
    );
    assert!(
        count_files(&root.join("blocks")) > 128,
        "gc was interrupted half-way"
    );

    let report = store.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
    assert_eq!(
        store.get_bytes(&keep.manifest).unwrap(),
        common::pseudo_random(2 << 20, 1)
    );
    // The dead gc's sweep marker names this host and a process that has
    // exited: a put goes ahead without waiting for its TTL; the next gc
    // finishes the job.
    let start = Instant::now();
    let again = store
        .put_bytes(&common::pseudo_random(16 << 20, 2), b"drop")
        .unwrap();
    assert!(
        start.elapsed() < TTL + Duration::from_secs(30),
        "put waited too long"
    );
    store.delete(&again.manifest).unwrap();
    let gc = store.gc().unwrap();
    assert!(gc.deleted_blocks > 0);
    assert_eq!(count_files(&root.join("blocks")), 128);
    assert!(store.verify().unwrap().is_clean());
}

/// A put hands the backend batches of blocks; one block of a batch that
/// cannot be written (a file in place of its shard directory) fails the
/// put with that block's typed error and no manifest, on one thread and on
/// two, and the same put succeeds once the directory is back.
#[test]
fn one_failed_block_of_a_batch_fails_the_put_and_writes_no_manifest() {
    let data = common::pseudo_random(2 << 20, 31);
    for threads in [1, 2] {
        let config = StoreConfig {
            block_size: 64 * 1024,
            ingest_threads: threads,
            queue_blocks: 8,
            ..StoreConfig::default()
        };
        // The blocks this put writes (convergent: the same in any store).
        let memory = MemoryBackend::new();
        ConvergentStore::new(&config, memory.clone(), ManifestKey::from_bytes(KEY))
            .unwrap()
            .put_bytes(&data, b"")
            .unwrap();
        let blocks = memory.list(Namespace::Blocks).unwrap();
        assert_eq!(blocks.len(), 32);
        let victim = blocks[blocks.len() / 2];

        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        let backend = FsBackend::open(&root).unwrap();
        let shard = backend.path_of(&victim).parent().unwrap().to_path_buf();
        std::fs::write(&shard, b"not a directory").unwrap();
        let store = ConvergentStore::new(&config, backend, ManifestKey::from_bytes(KEY)).unwrap();
        match store.put_bytes(&data, b"") {
            Err(StoreError::Backend {
                op: snapvm::store::Op::Put,
                object,
                source: BackendError::NotADirectory { path },
            }) => {
                assert_eq!(object.namespace, Namespace::Blocks);
                assert_eq!(object.id[0], victim.id[0], "threads {threads}");
                assert_eq!(path, shard);
            }
            other => panic!("threads {threads}: {other:?}"),
        }
        let backend = store.backend();
        assert!(backend.list(Namespace::Manifests).unwrap().is_empty());
        std::fs::remove_file(&shard).unwrap();
        let put = store.put_bytes(&data, b"").unwrap();
        assert!(store.get_bytes(&put.manifest).unwrap() == data);
        assert!(store.verify().unwrap().is_clean());
    }
}
