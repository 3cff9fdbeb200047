//! The trace cache on its own: eviction by size, persistence across
//! process restarts, and entries that are corrupt, stale, renamed or
//! foreign are dropped (with a warning), never returned.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use snapvm::snapshot::SnapshotId;
use snapvm::trace::{CodeId, TraceCache, TraceError, TraceKey, TraceKind};

fn key(tenant: &str, function: &str) -> TraceKey {
    TraceKey {
        tenant: tenant.into(),
        code: CodeId::of(&[3; 32], SnapshotId([9; 16])),
        runtime: "test 1".into(),
        kind: TraceKind::Profile {
            function: function.into(),
        },
    }
}

fn entry_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "trace"))
        .collect();
    files.sort();
    files
}

/// The one entry file of a cache holding only `key`.
fn only_file(dir: &Path) -> PathBuf {
    let files = entry_files(dir);
    assert_eq!(files.len(), 1, "{files:?}");
    files.into_iter().next().unwrap()
}

#[test]
fn every_key_field_separates_entries() {
    let cache = TraceCache::in_memory(1 << 20);
    let base = key("a", "f");
    cache.put(&base, b"base").unwrap();
    let others = [
        TraceKey {
            tenant: "b".into(),
            ..base.clone()
        },
        TraceKey {
            code: CodeId::of(&[3; 32], SnapshotId([8; 16])),
            ..base.clone()
        },
        TraceKey {
            code: CodeId::booted(&[3; 32]),
            ..base.clone()
        },
        TraceKey {
            runtime: "test 2".into(),
            ..base.clone()
        },
        TraceKey {
            kind: TraceKind::WorkingSet,
            ..base.clone()
        },
        key("a", "g"),
    ];
    for other in &others {
        assert_eq!(cache.get(other), None, "{other:?}");
    }
    for (i, other) in others.iter().enumerate() {
        cache.put(other, &[i as u8]).unwrap();
    }
    assert_eq!(cache.get(&base).as_deref(), Some(&b"base"[..]));
    for (i, other) in others.iter().enumerate() {
        assert_eq!(cache.get(other), Some(vec![i as u8]));
    }
}

#[test]
fn the_newest_put_wins() {
    let cache = TraceCache::in_memory(1 << 20);
    cache.put(&key("a", "f"), b"old").unwrap();
    cache.put(&key("a", "f"), b"new!").unwrap();
    assert_eq!(cache.get(&key("a", "f")).as_deref(), Some(&b"new!"[..]));
    assert_eq!(cache.len(), 1);
}

#[test]
fn eviction_keeps_the_cache_within_its_bytes_least_recently_used_first() {
    for persistent in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let make = |max| match persistent {
            true => TraceCache::open(dir.path(), max).unwrap(),
            false => TraceCache::in_memory(max),
        };
        let probe = make(1 << 20);
        probe.put(&key("t", "0"), &[0; 1000]).unwrap();
        let one = probe.used_bytes();
        probe.remove(&key("t", "0"));
        drop(probe);

        let cache = make(one * 3);
        for i in 0..3 {
            cache.put(&key("t", &i.to_string()), &[i; 1000]).unwrap();
        }
        // Touch 0: 1 is now the least recently used.
        assert!(cache.get(&key("t", "0")).is_some());
        cache.put(&key("t", "3"), &[3; 1000]).unwrap();
        assert_eq!(cache.get(&key("t", "1")), None, "persistent: {persistent}");
        for i in [0, 2, 3] {
            assert_eq!(cache.get(&key("t", &i.to_string())), Some(vec![i; 1000]));
        }
        assert!(cache.used_bytes() <= one * 3);
        if persistent {
            assert_eq!(
                entry_files(dir.path()).len(),
                3,
                "evicted files are deleted"
            );
        }
        // An entry larger than the whole cache is refused, not stored.
        let err = cache.put(&key("t", "big"), &vec![0; one as usize * 3]);
        assert!(matches!(err, Err(TraceError::TooLarge { .. })), "{err:?}");
        assert_eq!(err.unwrap_err().kind(), snapvm::ErrorKind::BadRequest);
        assert_eq!(cache.len(), 3);
    }
}

#[test]
fn reopening_with_a_smaller_bound_evicts_the_oldest() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
    for i in 0..4u8 {
        cache.put(&key("t", &i.to_string()), &[i; 4000]).unwrap();
        // Modification times order the entries on reopen.
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let one = cache.used_bytes() / 4;
    drop(cache);
    let cache = TraceCache::open(dir.path(), one * 2).unwrap();
    assert_eq!(cache.len(), 2);
    assert_eq!(cache.get(&key("t", "0")), None);
    assert_eq!(cache.get(&key("t", "1")), None);
    assert_eq!(cache.get(&key("t", "3")), Some(vec![3; 4000]));
    assert_eq!(entry_files(dir.path()).len(), 2);
}

/// Environment variable naming the directory the child process writes to.
const CHILD_DIR: &str = "SNAPVM_TRACE_CACHE_CHILD_DIR";

/// Runs only as the child of `entries_survive_a_process_restart` (a
/// separate process): writes entries and exits.
#[test]
#[ignore = "run by entries_survive_a_process_restart in a child process"]
fn child_writes_entries() {
    let dir = std::env::var_os(CHILD_DIR).expect("started by the parent test");
    let cache = TraceCache::open(dir, 1 << 20).unwrap();
    cache.put(&key("a", "f"), b"from another process").unwrap();
    cache.put(&key("b", "f"), b"tenant b").unwrap();
}

#[test]
fn entries_survive_a_process_restart() {
    let dir = tempfile::tempdir().unwrap();
    let status = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "child_writes_entries",
            "--ignored",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir.path())
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap();
    assert!(status.success());
    let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(cache.len(), 2);
    assert_eq!(
        cache.get(&key("a", "f")).as_deref(),
        Some(&b"from another process"[..])
    );
    assert_eq!(cache.get(&key("b", "f")).as_deref(), Some(&b"tenant b"[..]));
    assert_eq!(cache.get(&key("c", "f")), None);
}

#[test]
fn a_corrupt_file_is_dropped_on_open_and_on_get() {
    for flip_at_open in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
        cache.put(&key("a", "f"), &[7; 5000]).unwrap();
        let file = only_file(dir.path());
        let corrupt = |at: usize| {
            let mut bytes = std::fs::read(&file).unwrap();
            bytes[at] ^= 1;
            std::fs::write(&file, bytes).unwrap();
        };
        if flip_at_open {
            drop(cache);
            corrupt(100);
            let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
            assert!(cache.is_empty());
            assert_eq!(cache.get(&key("a", "f")), None);
        } else {
            corrupt(4000);
            assert_eq!(cache.get(&key("a", "f")), None);
            assert!(cache.is_empty());
            assert_eq!(cache.used_bytes(), 0);
        }
        assert!(!file.exists(), "the corrupt file was deleted");
    }
}

#[test]
fn truncated_stale_renamed_and_foreign_files_are_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
    cache.put(&key("a", "f"), b"tenant a's profile").unwrap();
    let a_file = only_file(dir.path());
    let a_bytes = std::fs::read(&a_file).unwrap();
    cache.put(&key("b", "f"), b"tenant b's profile").unwrap();
    let b_file = entry_files(dir.path())
        .into_iter()
        .find(|p| *p != a_file)
        .unwrap();
    drop(cache);

    // Renamed: tenant a's entry placed under tenant b's name. It carries
    // its own key, which does not hash to the name: dropped, never
    // offered to tenant b.
    std::fs::copy(&a_file, &b_file).unwrap();
    // Stale: a future format version in an otherwise valid file.
    let stale_key = key("c", "f");
    let stale = {
        let c = TraceCache::open(dir.path().join("c"), 1 << 20).unwrap();
        c.put(&stale_key, b"v2").unwrap();
        let f = only_file(&dir.path().join("c"));
        let mut bytes = std::fs::read(&f).unwrap();
        bytes[8] = 2;
        let name = f.file_name().unwrap().to_owned();
        (name, bytes)
    };
    std::fs::write(dir.path().join(&stale.0), &stale.1).unwrap();
    // Truncated, and junk with an entry's name.
    let truncated = dir.path().join(format!("{}.trace", "ab".repeat(32)));
    std::fs::write(&truncated, &a_bytes[..a_bytes.len() / 2]).unwrap();
    let junk = dir.path().join("not-a-hash.trace");
    std::fs::write(&junk, b"junk").unwrap();
    // A temporary file left by an interrupted write.
    let tmp = dir.path().join("leftover.123-0.tmp");
    std::fs::write(&tmp, b"half").unwrap();
    // Unrelated files are left alone.
    let unrelated = dir.path().join("README");
    std::fs::write(&unrelated, b"keep me").unwrap();

    let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(cache.len(), 1, "only tenant a's own entry is valid");
    assert_eq!(
        cache.get(&key("a", "f")).as_deref(),
        Some(&b"tenant a's profile"[..])
    );
    assert_eq!(cache.get(&key("b", "f")), None);
    assert_eq!(cache.get(&stale_key), None);
    for gone in [&b_file, &truncated, &junk, &tmp] {
        assert!(!gone.exists(), "{} was not deleted", gone.display());
    }
    assert!(unrelated.exists());
}

#[test]
fn a_file_swapped_after_open_is_not_returned_for_another_key() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
    cache.put(&key("a", "f"), b"tenant a").unwrap();
    let a_file = only_file(dir.path());
    cache.put(&key("b", "f"), b"tenant b").unwrap();
    let b_file = entry_files(dir.path())
        .into_iter()
        .find(|p| *p != a_file)
        .unwrap();
    std::fs::copy(&a_file, &b_file).unwrap();
    assert_eq!(cache.get(&key("b", "f")), None);
    assert_eq!(cache.get(&key("a", "f")).as_deref(), Some(&b"tenant a"[..]));
}

#[test]
fn overlong_keys_are_refused() {
    let cache = TraceCache::in_memory(1 << 20);
    let long = key(&"x".repeat(snapvm::trace::MAX_KEY_LEN), "f");
    let err = cache.put(&long, b"v").unwrap_err();
    assert!(matches!(err, TraceError::KeyTooLarge { .. }), "{err:?}");
}

#[test]
fn the_cache_is_shared_between_threads() {
    let dir = tempfile::tempdir().unwrap();
    let cache = Arc::new(TraceCache::open(dir.path(), 1 << 20).unwrap());
    let threads: Vec<_> = (0..8)
        .map(|t| {
            let cache = Arc::clone(&cache);
            std::thread::spawn(move || {
                for i in 0..20u8 {
                    let k = key(&format!("t{t}"), &(i % 4).to_string());
                    cache.put(&k, &[i; 100]).unwrap();
                    let got = cache.get(&k).expect("own entry");
                    assert_eq!(got.len(), 100);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    assert_eq!(cache.len(), 32);
    drop(cache);
    let reopened = TraceCache::open(dir.path(), 1 << 20).unwrap();
    assert_eq!(reopened.len(), 32);
    assert!(std::fs::read_dir(dir.path()).unwrap().all(|e| !e
        .unwrap()
        .path()
        .to_string_lossy()
        .ends_with(".tmp")));
}

#[test]
fn two_caches_on_one_directory_see_each_others_entries() {
    let dir = tempfile::tempdir().unwrap();
    let one = TraceCache::open(dir.path(), 1 << 20).unwrap();
    let two = TraceCache::open(dir.path(), 1 << 20).unwrap();
    one.put(&key("a", "f"), b"written by one").unwrap();
    assert_eq!(
        two.get(&key("a", "f")).as_deref(),
        Some(&b"written by one"[..])
    );
    assert_eq!(two.len(), 1);
    assert_eq!(two.get(&key("a", "g")), None);
}

/// Runs `f` on another thread and waits at most 10 s for it: a cache in a
/// shared directory must never block on what another process put there.
fn within_bound<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(std::time::Duration::from_secs(10))
        .unwrap_or_else(|_| panic!("{what} blocked"))
}

fn mkfifo(path: &Path) {
    let made = std::process::Command::new("mkfifo")
        .arg(path)
        .status()
        .unwrap();
    assert!(made.success());
}

#[test]
fn a_fifo_device_or_symlink_in_place_of_an_entry_is_dropped_without_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let cache = TraceCache::open(dir.path(), 1 << 20).unwrap();
    cache.put(&key("a", "f"), &[1; 100]).unwrap();
    let fifo = only_file(dir.path());
    cache.put(&key("b", "f"), &[2; 100]).unwrap();
    drop(cache);

    // An entry replaced by a FIFO with no writer: open and get skip it.
    std::fs::remove_file(&fifo).unwrap();
    mkfifo(&fifo);
    let path = dir.path().to_path_buf();
    let cache = within_bound("TraceCache::open over a FIFO", move || {
        TraceCache::open(path, 1 << 20).unwrap()
    });
    assert_eq!(cache.len(), 1);
    assert!(!fifo.exists(), "the FIFO was dropped");
    let cache = Arc::new(cache);
    mkfifo(&fifo);
    let c = cache.clone();
    assert_eq!(
        within_bound("TraceCache::get over a FIFO", move || c.get(&key("a", "f"))),
        None
    );
    assert!(!fifo.exists());
    assert_eq!(cache.get(&key("b", "f")), Some(vec![2; 100]));

    // A symlink to /dev/zero (and one to a valid entry elsewhere) is never
    // followed: refused at once, not read until memory runs out.
    let elsewhere = tempfile::tempdir().unwrap();
    let other = TraceCache::open(elsewhere.path(), 1 << 20).unwrap();
    other.put(&key("a", "f"), &[3; 100]).unwrap();
    let valid = only_file(elsewhere.path());
    for target in [Path::new("/dev/zero"), valid.as_path()] {
        std::os::unix::fs::symlink(target, &fifo).unwrap();
        let c = cache.clone();
        let started = std::time::Instant::now();
        assert_eq!(
            within_bound("TraceCache::get over a symlink", move || c
                .get(&key("a", "f"))),
            None,
            "{}",
            target.display()
        );
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        assert!(
            std::fs::symlink_metadata(&fifo).is_err(),
            "the link was dropped"
        );
        std::os::unix::fs::symlink(target, &fifo).unwrap();
        let path = dir.path().to_path_buf();
        let reopened = within_bound("TraceCache::open over a symlink", move || {
            TraceCache::open(path, 1 << 20).unwrap()
        });
        assert_eq!(reopened.get(&key("a", "f")), None);
        assert_eq!(reopened.len(), 1);
    }
    assert_eq!(
        std::fs::read(&valid).unwrap().len(),
        std::fs::metadata(&valid).unwrap().len() as usize
    );
    assert_eq!(other.get(&key("a", "f")), Some(vec![3; 100]));
}
