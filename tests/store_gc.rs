//! Garbage collection: what it removes, what it never removes, and how it
//! coordinates with puts running at the same time.

use std::io::Read;
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use snapvm::store::{
    Backend, ConvergentStore, ManifestKey, MemoryBackend, Namespace, ObjectName, StoreConfig,
    StoreError,
};

fn store(backend: &MemoryBackend, key: u8) -> ConvergentStore {
    let config = StoreConfig {
        block_size: 1024,
        ..StoreConfig::default()
    };
    ConvergentStore::new(&config, backend.clone(), ManifestKey::from_bytes([key; 32])).unwrap()
}

fn blocks(seed: u8, n: usize) -> Vec<u8> {
    (0..n * 1024)
        .map(|i| ((i / 1024) as u8).wrapping_mul(31) ^ seed ^ (i as u8 | 1))
        .collect()
}

#[test]
fn gc_removes_only_unreferenced_blocks() {
    let backend = MemoryBackend::new();
    let a = store(&backend, 1);
    let b = store(&backend, 2); // another owner: gc must respect its manifests too
    let shared = blocks(1, 4);
    let mut only_a = shared.clone();
    only_a.extend(blocks(2, 3));
    let pa = a.put_bytes(&only_a, b"").unwrap();
    let pb = b.put_bytes(&shared, b"").unwrap();
    assert_eq!(backend.count(Namespace::Blocks), 7);

    let nothing = a.gc().unwrap();
    assert_eq!(
        (nothing.deleted_blocks, nothing.manifests, nothing.blocks),
        (0, 2, 7)
    );

    a.delete(&pa.manifest).unwrap();
    let report = b.gc().unwrap();
    assert_eq!(report.deleted_blocks, 3);
    assert_eq!(backend.count(Namespace::Blocks), 4);
    assert_eq!(b.get_bytes(&pb.manifest).unwrap(), shared);
    assert!(a.verify().unwrap().is_clean());
    // No marker is left behind.
    assert_eq!(
        backend.count(Namespace::Leases) + backend.count(Namespace::Sweeps),
        0
    );
}

/// A reader that hands out `first` bytes, then blocks until told to go on.
struct Gate {
    data: Vec<u8>,
    pos: usize,
    first: usize,
    go: Option<mpsc::Receiver<()>>,
    reached: Option<mpsc::Sender<()>>,
}

impl Read for Gate {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.pos >= self.first {
            if let Some(tx) = self.reached.take() {
                tx.send(()).unwrap();
            }
            if let Some(rx) = self.go.take() {
                rx.recv().unwrap();
            }
        }
        let end = if self.pos < self.first {
            self.first
        } else {
            self.data.len()
        };
        let n = buf.len().min(end - self.pos);
        buf[..n].copy_from_slice(&self.data[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

#[test]
fn gc_defers_while_a_put_is_in_flight() {
    let backend = MemoryBackend::new();
    let s = Arc::new(store(&backend, 1));
    // Garbage the in-flight put will deduplicate against: an earlier data
    // set whose manifest was deleted.
    let data = blocks(7, 16);
    let old = s.put_bytes(&data, b"").unwrap();
    s.delete(&old.manifest).unwrap();

    let (go_tx, go_rx) = mpsc::channel();
    let (reached_tx, reached_rx) = mpsc::channel();
    let gate = Gate {
        data: data.clone(),
        pos: 0,
        first: 8 * 1024,
        go: Some(go_rx),
        reached: Some(reached_tx),
    };
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || s.put(gate, b"").unwrap())
    };
    reached_rx.recv().unwrap();
    // The put has deduplicated its first blocks against the garbage; a
    // sweep now would delete them under it.
    let report = s.gc().unwrap();
    assert_eq!(report.deferred, Some(1));
    assert_eq!(report.deleted_blocks, 0);
    assert_eq!(backend.count(Namespace::Blocks), 16);
    go_tx.send(()).unwrap();
    let put = writer.join().unwrap();
    assert_eq!(s.gc().unwrap().deleted_blocks, 0);
    assert_eq!(s.get_bytes(&put.manifest).unwrap(), data);
}

/// A backend that reports every listing of one namespace.
struct ListSpy(MemoryBackend, Namespace, mpsc::Sender<()>);

impl Backend for ListSpy {
    fn put_if_absent(
        &self,
        n: &ObjectName,
        b: &[u8],
    ) -> Result<snapvm::store::PutOutcome, snapvm::store::BackendError> {
        self.0.put_if_absent(n, b)
    }
    fn get(&self, n: &ObjectName, l: u64) -> Result<Option<Vec<u8>>, snapvm::store::BackendError> {
        self.0.get(n, l)
    }
    fn has(&self, n: &ObjectName) -> Result<bool, snapvm::store::BackendError> {
        self.0.has(n)
    }
    fn delete(&self, n: &ObjectName) -> Result<(), snapvm::store::BackendError> {
        self.0.delete(n)
    }
    fn list(&self, ns: Namespace) -> Result<Vec<ObjectName>, snapvm::store::BackendError> {
        let out = self.0.list(ns);
        if ns == self.1 {
            let _ = self.2.send(());
        }
        out
    }
}

#[test]
fn a_put_waits_for_a_live_sweep() {
    let backend = MemoryBackend::new();
    let s = store(&backend, 1);
    // A sweep marker as another process's gc writes it (docs/store-format.md).
    let mut marker = b"SNAPVMSW".to_vec();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    marker.extend_from_slice(&now.to_le_bytes());
    let name = ObjectName {
        namespace: Namespace::Sweeps,
        id: [9; 32],
    };
    backend.put_if_absent(&name, &marker).unwrap();

    // The put lists sweep markers once, sees the live one, and lists again
    // after a pause: by the second listing it has provably been held back
    // (deterministic: no sleep, no timing assumption).
    let (listed_tx, listed_rx) = mpsc::channel();
    let spy = ListSpy(backend.clone(), Namespace::Sweeps, listed_tx);
    let s =
        Arc::new(ConvergentStore::new(s.config(), spy, ManifestKey::from_bytes([1; 32])).unwrap());
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || s.put_bytes(&blocks(3, 4), b"").unwrap())
    };
    for _ in 0..2 {
        listed_rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the put lists sweep markers");
    }
    // The marker is still there, so the put cannot have gone ahead.
    assert!(!writer.is_finished(), "put went ahead during a live sweep");
    assert_eq!(backend.count(Namespace::Blocks), 0);
    assert_eq!(
        backend.count(Namespace::Leases),
        1,
        "the waiting put holds its lease"
    );
    backend.delete(&name).unwrap();
    let put = writer.join().unwrap();
    assert_eq!(s.get_bytes(&put.manifest).unwrap(), blocks(3, 4));

    // An expired marker (a killed gc) does not hold puts back.
    let old = now - 3600 * 1000;
    let mut stale = b"SNAPVMSW".to_vec();
    stale.extend_from_slice(&old.to_le_bytes());
    backend.put_if_absent(&name, &stale).unwrap();
    s.put_bytes(&blocks(4, 4), b"").unwrap();
    let report = s.gc().unwrap();
    assert_eq!(report.expired_markers, 1);
    assert_eq!(backend.count(Namespace::Sweeps), 0);
}

#[test]
fn concurrent_puts_deletes_and_gcs_never_lose_a_live_block() {
    let backend = MemoryBackend::new();
    let s = Arc::new(store(&backend, 1));
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let collector = {
        let (s, stop) = (s.clone(), stop.clone());
        std::thread::spawn(move || {
            let (mut swept, mut deferred) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match s.gc().unwrap().deferred {
                    None => swept += 1,
                    Some(_) => deferred += 1,
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            (swept, deferred)
        })
    };
    let writers: Vec<_> = (0..3u8)
        .map(|w| {
            let s = s.clone();
            std::thread::spawn(move || {
                let mut live = Vec::new();
                for round in 0..40u8 {
                    // Overlapping data: every put shares blocks with earlier,
                    // possibly deleted, puts.
                    let data = blocks(round % 5, 6 + (w as usize));
                    let put = s.put_bytes(&data, b"").unwrap();
                    if round % 3 == 0 {
                        s.delete(&put.manifest).unwrap();
                    } else {
                        live.push((put.manifest, data));
                    }
                }
                live
            })
        })
        .collect();
    let live: Vec<_> = writers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut swept, _deferred) = collector.join().unwrap();
    // On a loaded machine the writers may keep the collector deferred the
    // whole time; once they are done, a sweep must go through.
    if swept == 0 {
        assert_eq!(
            s.gc().unwrap().deferred,
            None,
            "gc deferred with no put in flight"
        );
        swept += 1;
    }
    assert!(swept > 0);
    for (id, data) in &live {
        assert_eq!(&s.get_bytes(id).unwrap(), data);
    }
    let report = s.verify().unwrap();
    assert!(report.is_clean(), "{report:?}");
}

/// MemoryBackend whose manifest reads take a while (a slow bucket).
struct SlowManifests(MemoryBackend, Duration);

impl Backend for SlowManifests {
    fn put_if_absent(
        &self,
        n: &ObjectName,
        b: &[u8],
    ) -> Result<snapvm::store::PutOutcome, snapvm::store::BackendError> {
        self.0.put_if_absent(n, b)
    }
    fn get(&self, n: &ObjectName, l: u64) -> Result<Option<Vec<u8>>, snapvm::store::BackendError> {
        if n.namespace == Namespace::Manifests {
            std::thread::sleep(self.1);
        }
        self.0.get(n, l)
    }
    fn has(&self, n: &ObjectName) -> Result<bool, snapvm::store::BackendError> {
        self.0.has(n)
    }
    fn delete(&self, n: &ObjectName) -> Result<(), snapvm::store::BackendError> {
        self.0.delete(n)
    }
    fn list(&self, ns: Namespace) -> Result<Vec<ObjectName>, snapvm::store::BackendError> {
        self.0.list(ns)
    }
}

#[test]
fn a_sweep_whose_marker_lapsed_deletes_nothing() {
    let backend = MemoryBackend::new();
    let config = StoreConfig {
        block_size: 1024,
        lease_ttl: Duration::from_millis(60),
        ..StoreConfig::default()
    };
    let key = ManifestKey::from_bytes([1; 32]);
    let fast = ConvergentStore::new(&config, backend.clone(), key.clone()).unwrap();
    let garbage = fast.put_bytes(&blocks(1, 4), b"").unwrap();
    fast.delete(&garbage.manifest).unwrap();
    fast.put_bytes(&blocks(2, 4), b"").unwrap();

    // Reading the one manifest takes longer than the TTL: the sweep marker
    // lapses mid-scan, so a put could have started unseen. Nothing may go.
    let slow = ConvergentStore::new(
        &config,
        SlowManifests(backend.clone(), Duration::from_millis(150)),
        key,
    )
    .unwrap();
    let report = slow.gc().unwrap();
    assert!(report.interrupted);
    assert_eq!(report.deleted_blocks, 0);
    assert_eq!(backend.count(Namespace::Blocks), 8);
    // A healthy sweep then finishes the job.
    let report = fast.gc().unwrap();
    assert_eq!((report.interrupted, report.deleted_blocks), (false, 4));
}

#[test]
fn a_put_whose_lease_lapsed_refuses_to_commit_and_can_be_repeated() {
    /// Yields one block, then stalls past the TTL, then the rest.
    struct Stall(Vec<u8>, usize);
    impl Read for Stall {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            if self.1 == 1024 {
                std::thread::sleep(Duration::from_millis(200));
            }
            let n = buf.len().min(self.0.len() - self.1).min(1024);
            buf[..n].copy_from_slice(&self.0[self.1..self.1 + n]);
            self.1 += n;
            Ok(n)
        }
    }
    let backend = MemoryBackend::new();
    let config = StoreConfig {
        block_size: 1024,
        ingest_threads: 1,
        lease_ttl: Duration::from_millis(60),
        ..StoreConfig::default()
    };
    let s =
        ConvergentStore::new(&config, backend.clone(), ManifestKey::from_bytes([1; 32])).unwrap();
    let data = blocks(5, 4);
    let err = s.put(Stall(data.clone(), 0), b"").unwrap_err();
    assert!(
        matches!(err, snapvm::store::StoreError::LeaseExpired),
        "{err:?}"
    );
    assert_eq!(backend.count(Namespace::Manifests), 0);
    assert_eq!(backend.count(Namespace::Leases), 0);
    let put = s.put_bytes(&data, b"").unwrap();
    assert_eq!(s.get_bytes(&put.manifest).unwrap(), data);
}

/// Two data sets of one owner; returns the store, their manifests and data.
fn two_data_sets(
    backend: &MemoryBackend,
) -> (ConvergentStore, [(snapvm::store::ManifestId, Vec<u8>); 2]) {
    let s = store(backend, 1);
    let d1 = blocks(11, 5);
    let d2 = blocks(12, 5);
    let p1 = s.put_bytes(&d1, b"one").unwrap();
    let p2 = s.put_bytes(&d2, b"two").unwrap();
    (s, [(p1.manifest, d1), (p2.manifest, d2)])
}

fn read_object(backend: &MemoryBackend, name: &ObjectName) -> Vec<u8> {
    backend.get(name, 1 << 20).unwrap().unwrap()
}

#[test]
fn gc_keeps_every_block_when_a_reference_table_was_altered() {
    let backend = MemoryBackend::new();
    let (s, [(m1, d1), (m2, d2)]) = two_data_sets(&backend);
    let name = ObjectName::manifest(&m1);
    let original = read_object(&backend, &name);
    // Flip the lowest bit of the first reference: the table stays sorted,
    // so the clear header still parses, but it names a block that does not
    // exist instead of one the manifest needs.
    let mut altered = original.clone();
    altered[44 + 31] ^= 1;
    snapvm::store::manifest::SealedHeader::parse(&altered).unwrap();
    backend.overwrite(&name, &altered);
    assert!(!s.verify().unwrap().is_clean());

    let report = s.gc().unwrap();
    assert_eq!(report.unverified_manifests, vec![m1]);
    assert_eq!(report.deleted_blocks, 0);
    assert_eq!(backend.count(Namespace::Blocks), 10);

    backend.overwrite(&name, &original);
    assert_eq!(s.get_bytes(&m1).unwrap(), d1);
    assert_eq!(s.get_bytes(&m2).unwrap(), d2);
    assert!(s.verify().unwrap().is_clean());
    let report = s.gc().unwrap();
    assert!(report.unverified_manifests.is_empty());
    assert_eq!(report.deleted_blocks, 0);
}

#[test]
fn gc_keeps_every_block_when_another_manifest_was_copied_over_one() {
    let backend = MemoryBackend::new();
    let (s, [(m1, d1), (m2, d2)]) = two_data_sets(&backend);
    let name = ObjectName::manifest(&m1);
    let original = read_object(&backend, &name);
    // A valid manifest of the same owner under the wrong name.
    backend.overwrite(&name, &read_object(&backend, &ObjectName::manifest(&m2)));

    let report = s.gc().unwrap();
    assert_eq!(report.unverified_manifests, vec![m1]);
    assert_eq!(report.deleted_blocks, 0);
    assert_eq!(backend.count(Namespace::Blocks), 10);

    backend.overwrite(&name, &original);
    assert_eq!(s.get_bytes(&m1).unwrap(), d1);
    assert_eq!(s.get_bytes(&m2).unwrap(), d2);
    assert!(s.verify().unwrap().is_clean());
}

/// A backend that keeps a copy of every lease and sweep marker written.
struct MarkerSpy(MemoryBackend, Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

impl Backend for MarkerSpy {
    fn put_if_absent(
        &self,
        n: &ObjectName,
        b: &[u8],
    ) -> Result<snapvm::store::PutOutcome, snapvm::store::BackendError> {
        if matches!(n.namespace, Namespace::Leases | Namespace::Sweeps) {
            self.1.lock().unwrap().push(b.to_vec());
        }
        self.0.put_if_absent(n, b)
    }
    fn get(&self, n: &ObjectName, l: u64) -> Result<Option<Vec<u8>>, snapvm::store::BackendError> {
        self.0.get(n, l)
    }
    fn has(&self, n: &ObjectName) -> Result<bool, snapvm::store::BackendError> {
        self.0.has(n)
    }
    fn delete(&self, n: &ObjectName) -> Result<(), snapvm::store::BackendError> {
        self.0.delete(n)
    }
    fn list(&self, ns: Namespace) -> Result<Vec<ObjectName>, snapvm::store::BackendError> {
        self.0.list(ns)
    }
}

/// A marker as this process writes it (captured from a real gc), with its
/// magic, creation time and process id replaced.
fn real_marker(magic: &[u8; 8], created_ms: u64, pid: u32) -> Vec<u8> {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = ConvergentStore::new(
        &StoreConfig::default(),
        MarkerSpy(MemoryBackend::new(), seen.clone()),
        ManifestKey::from_bytes([1; 32]),
    )
    .unwrap();
    s.gc().unwrap();
    let mut m = seen.lock().unwrap()[0].clone();
    assert_eq!(m.len(), 136, "docs/store-format.md");
    m[..8].copy_from_slice(magic);
    m[8..16].copy_from_slice(&created_ms.to_le_bytes());
    m[24..28].copy_from_slice(&pid.to_le_bytes());
    m
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// The id of a process that has exited (and been reaped).
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

/// Runs `f` on a thread; its result, or a panic if it takes over a minute
/// (a put or gc that waits for an expiry of an hour).
fn within_a_minute<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("did not finish within a minute")
}

fn hour_store(backend: &MemoryBackend) -> ConvergentStore {
    let config = StoreConfig {
        block_size: 1024,
        lease_ttl: Duration::from_secs(3600),
        ..StoreConfig::default()
    };
    ConvergentStore::new(&config, backend.clone(), ManifestKey::from_bytes([1; 32])).unwrap()
}

#[test]
fn markers_of_exited_processes_on_this_host_are_taken_over_at_once() {
    let backend = MemoryBackend::new();
    let s = Arc::new(hour_store(&backend));
    let pid = dead_pid();
    // A fresh sweep marker of a gc that was killed: with an hour's TTL, a
    // put would otherwise wait an hour.
    let sweep = ObjectName {
        namespace: Namespace::Sweeps,
        id: [7; 32],
    };
    backend
        .put_if_absent(&sweep, &real_marker(b"SNAPVMSW", now_ms(), pid))
        .unwrap();
    let put = {
        let s = s.clone();
        within_a_minute(move || s.put_bytes(&blocks(5, 3), b""))
    }
    .unwrap();
    assert_eq!(s.get_bytes(&put.manifest).unwrap(), blocks(5, 3));

    // A fresh lease of a put that was killed: gc does not defer.
    let lease = ObjectName {
        namespace: Namespace::Leases,
        id: [8; 32],
    };
    backend
        .put_if_absent(&lease, &real_marker(b"SNAPVMLS", now_ms(), pid))
        .unwrap();
    let report = s.gc().unwrap();
    assert_eq!(report.deferred, None);
    assert_eq!(report.expired_markers, 2);
    assert_eq!(
        backend.count(Namespace::Leases) + backend.count(Namespace::Sweeps),
        0
    );

    // The same markers from a live process (this one) still count.
    backend
        .put_if_absent(
            &lease,
            &real_marker(b"SNAPVMLS", now_ms(), std::process::id()),
        )
        .unwrap();
    assert_eq!(s.gc().unwrap().deferred, Some(1));
}

/// `marker` as if written on another host (another host instance id).
fn from_another_host(mut marker: Vec<u8>) -> Vec<u8> {
    marker[40] ^= 1;
    marker
}

#[test]
fn future_dated_markers_expire_beyond_the_skew_allowance() {
    let backend = MemoryBackend::new();
    let s = Arc::new(hour_store(&backend));
    let data = s.put_bytes(&blocks(6, 3), b"").unwrap();
    let day_ahead = now_ms() + 24 * 3600 * 1000;
    let me = std::process::id();

    // A sweep marker a day ahead from another host: its date is not
    // trusted, so the put goes ahead at once instead of waiting a day.
    let sweep = ObjectName {
        namespace: Namespace::Sweeps,
        id: [7; 32],
    };
    backend
        .put_if_absent(
            &sweep,
            &from_another_host(real_marker(b"SNAPVMSW", day_ahead, me)),
        )
        .unwrap();
    let put = {
        let s = s.clone();
        within_a_minute(move || s.put_bytes(&blocks(7, 3), b""))
    }
    .unwrap();
    assert_eq!(s.get_bytes(&put.manifest).unwrap(), blocks(7, 3));
    // The oldest 16-byte form (no writer recorded) is judged the same way.
    backend.overwrite(&sweep, &real_marker(b"SNAPVMSW", day_ahead, me)[..16]);
    s.put_bytes(&blocks(8, 3), b"").unwrap();

    // A lease a day ahead from another host: gc does not defer a day; it
    // removes the lease (and the future sweep marker) and sweeps.
    let lease = ObjectName {
        namespace: Namespace::Leases,
        id: [8; 32],
    };
    backend
        .put_if_absent(
            &lease,
            &from_another_host(real_marker(b"SNAPVMLS", day_ahead, me)),
        )
        .unwrap();
    s.delete(&data.manifest).unwrap();
    let report = {
        let s = s.clone();
        within_a_minute(move || s.gc())
    }
    .unwrap();
    assert_eq!(report.deferred, None);
    assert_eq!(report.deleted_blocks, 3);
    assert_eq!(report.expired_markers, 2);
    assert_eq!(
        backend.count(Namespace::Leases) + backend.count(Namespace::Sweeps),
        0
    );
    assert!(s.verify().unwrap().is_clean());

    // Within the clock-skew allowance a marker from another host is live.
    backend
        .put_if_absent(
            &lease,
            &from_another_host(real_marker(b"SNAPVMLS", now_ms() + 10_000, me)),
        )
        .unwrap();
    assert_eq!(s.gc().unwrap().deferred, Some(1));
    // Far ahead but written by a running process of this host (this one):
    // respected, since that process is really there.
    backend.overwrite(&lease, &real_marker(b"SNAPVMLS", day_ahead, me));
    assert_eq!(s.gc().unwrap().deferred, Some(1));
    // Far ahead, this host, a process that has exited: expired at once.
    backend.overwrite(&lease, &real_marker(b"SNAPVMLS", day_ahead, dead_pid()));
    let report = s.gc().unwrap();
    assert_eq!((report.deferred, report.expired_markers), (None, 1));
}

#[test]
fn past_dated_markers_expire_after_their_ttl_whoever_wrote_them() {
    let backend = MemoryBackend::new();
    let s = hour_store(&backend);
    let two_hours_ago = now_ms() - 2 * 3600 * 1000;
    let lease = ObjectName {
        namespace: Namespace::Leases,
        id: [8; 32],
    };
    // A live process (this one) that stopped renewing, another host's
    // process, a dead process: all past the TTL, all expired.
    for marker in [
        real_marker(b"SNAPVMLS", two_hours_ago, std::process::id()),
        from_another_host(real_marker(b"SNAPVMLS", two_hours_ago, 1)),
        real_marker(b"SNAPVMLS", two_hours_ago, dead_pid()),
    ] {
        backend.put_if_absent(&lease, &marker).unwrap();
        let report = s.gc().unwrap();
        assert_eq!((report.deferred, report.expired_markers), (None, 1));
    }
    // Another host's fresh lease counts until its TTL: gc defers.
    backend
        .put_if_absent(
            &lease,
            &from_another_host(real_marker(b"SNAPVMLS", now_ms() - 60_000, 1)),
        )
        .unwrap();
    assert_eq!(s.gc().unwrap().deferred, Some(1));
}

#[test]
fn a_put_waiting_for_a_live_sweep_reports_it_and_gives_up_in_bounded_time() {
    let backend = MemoryBackend::new();
    let waits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let config = StoreConfig {
        block_size: 1024,
        lease_ttl: Duration::from_secs(2),
        on_wait: Some({
            let waits = waits.clone();
            Arc::new(move |w: &snapvm::store::SweepWait| waits.lock().unwrap().push(w.clone()))
        }),
        ..StoreConfig::default()
    };
    let s =
        ConvergentStore::new(&config, backend.clone(), ManifestKey::from_bytes([1; 32])).unwrap();
    // A sweep marker of a live process of this host (this one), dated far
    // in the future: respected, but the put waits at most its lease TTL.
    let sweep = ObjectName {
        namespace: Namespace::Sweeps,
        id: [7; 32],
    };
    let me = std::process::id();
    backend
        .put_if_absent(
            &sweep,
            &real_marker(b"SNAPVMSW", now_ms() + 3600 * 1000, me),
        )
        .unwrap();
    let err = s.put_bytes(&blocks(9, 2), b"").unwrap_err();
    let StoreError::SweepInProgress {
        marker,
        holder,
        waited,
    } = &err
    else {
        panic!("expected SweepInProgress, got {err:?}");
    };
    assert_eq!(*marker, sweep);
    assert!(holder.starts_with(&format!("pid {me} on ")), "{holder}");
    assert!(*waited >= Duration::from_secs(2));
    assert!(err.to_string().contains(&format!("pid {me}")), "{err}");
    assert_eq!(backend.count(Namespace::Blocks), 0);
    assert_eq!(backend.count(Namespace::Leases), 0, "the lease is released");
    {
        let waits = waits.lock().unwrap();
        assert!(!waits.is_empty());
        assert!(waits.iter().all(|w| w.marker == sweep && !w.over));
        assert!(waits.iter().all(|w| w.limit == Duration::from_secs(2)));
        assert_eq!(&waits[0].holder, holder);
    }

    // When the sweep ends while the put waits, the put says so and goes on.
    waits.lock().unwrap().clear();
    let s = Arc::new(s);
    let writer = {
        let s = s.clone();
        std::thread::spawn(move || s.put_bytes(&blocks(9, 2), b""))
    };
    while waits.lock().unwrap().is_empty() {
        std::thread::sleep(Duration::from_millis(5));
    }
    backend.delete(&sweep).unwrap();
    let put = writer.join().unwrap().unwrap();
    assert_eq!(s.get_bytes(&put.manifest).unwrap(), blocks(9, 2));
    assert!(waits.lock().unwrap().last().unwrap().over);
}

#[test]
fn markers_that_cannot_be_interpreted_make_gc_and_put_refuse_with_advice() {
    let backend = MemoryBackend::new();
    let s = hour_store(&backend);
    let data = s.put_bytes(&blocks(10, 3), b"").unwrap();
    s.delete(&data.manifest).unwrap();
    // A marker of a newer format (another length), and one of an unknown
    // kind, in each namespace.
    let mut newer = real_marker(b"SNAPVMLS", now_ms(), std::process::id());
    newer.extend_from_slice(&[0; 8]);
    let lease = ObjectName {
        namespace: Namespace::Leases,
        id: [8; 32],
    };
    let sweep = ObjectName {
        namespace: Namespace::Sweeps,
        id: [7; 32],
    };
    for (name, bytes) in [
        (lease, newer.clone()),
        (lease, b"SNAPVMXX and then some bytes".to_vec()),
        (sweep, newer.clone()),
        (sweep, vec![0; 300]),
    ] {
        backend.put_if_absent(&name, &bytes).unwrap();
        let err = s.gc().unwrap_err();
        assert!(
            matches!(&err, StoreError::UnreadableMarker { marker, .. } if *marker == name),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("upgrade snapvm") && msg.contains("delete the object"),
            "{msg}"
        );
        // Nothing was swept and no marker was removed.
        assert_eq!(backend.count(Namespace::Blocks), 3);
        assert!(backend.has(&name).unwrap());
        if name.namespace == Namespace::Sweeps {
            assert!(matches!(
                s.put_bytes(&blocks(11, 1), b""),
                Err(StoreError::UnreadableMarker { .. })
            ));
            assert_eq!(backend.count(Namespace::Leases), 0);
        }
        backend.delete(&name).unwrap();
    }
    assert_eq!(s.gc().unwrap().deleted_blocks, 3);
}
