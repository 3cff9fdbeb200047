//! Restoring straight from a store, on demand, and working-set traces: the
//! memory a VM sees is the snapshot's byte for byte, a bad block poisons the
//! VM with an error naming it (never a hang, never wrong data), concurrent
//! VMs fetch each block once, and a trace is applied only to its snapshot.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use snapvm::abi::{ABI_PAGE_ADDR, PAGE_SIZE};
use snapvm::policy::{ManagedVm, Never, PollConfig, PollingVm};
use snapvm::snapshot::OnDemandConfig;
use snapvm::snapshot::WorkingSet;
use snapvm::store::{
    Backend, BackendError, BlockId, ConvergentStore, Entry, FsBackend, ManifestId, ManifestKey,
    Namespace, ObjectName, PutOutcome, StoreConfig, StoreError,
};
use snapvm::trace::TraceCache;
use snapvm::{Snapshot, SnapshotError, VmConfig, VmError, VmInstance};

const OWNER: [u8; 32] = [9; 32];
const MEMORY: u64 = 64 << 20;
const REGION_MIB: u16 = 8;

fn config() -> VmConfig {
    // Unoptimized test builds decrypt blocks slowly: the calls that fetch
    // the whole region get time (the deadlines tested are the store's).
    common::config("testguest")
        .memory_size(MEMORY)
        .timeout(Some(Duration::from_secs(120)))
}

/// A real FsBackend that counts the gets of each block and can delay them.
struct Counting {
    inner: FsBackend,
    gets: Mutex<HashMap<ObjectName, u32>>,
    delay: Mutex<Option<Duration>>,
    /// Delays only the first get of each block (a replica that hangs,
    /// while the others answer).
    first_get_delay: Mutex<Option<Duration>>,
}

impl Counting {
    fn new(dir: &std::path::Path) -> Arc<Self> {
        Arc::new(Self {
            inner: FsBackend::open(dir).unwrap(),
            gets: Mutex::new(HashMap::new()),
            delay: Mutex::new(None),
            first_get_delay: Mutex::new(None),
        })
    }
}

impl Backend for Counting {
    fn put_if_absent(&self, n: &ObjectName, b: &[u8]) -> Result<PutOutcome, BackendError> {
        self.inner.put_if_absent(n, b)
    }
    fn get(&self, n: &ObjectName, limit: u64) -> Result<Option<Vec<u8>>, BackendError> {
        if n.namespace == Namespace::Blocks {
            let first = {
                let mut gets = self.gets.lock().unwrap();
                let count = gets.entry(*n).or_default();
                *count += 1;
                *count == 1
            };
            let stall = *self.first_get_delay.lock().unwrap();
            if let Some(d) = stall.filter(|_| first) {
                std::thread::sleep(d);
            }
            let delay = *self.delay.lock().unwrap();
            if let Some(d) = delay {
                std::thread::sleep(d);
            }
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

struct Fixture {
    _dir: tempfile::TempDir,
    backend: Arc<Counting>,
    store: Arc<ConvergentStore>,
    original: VmInstance,
    snapshot: Snapshot,
    id: ManifestId,
}

/// A VM holding a 24 MiB region of pseudo-random data, its snapshot, and
/// that snapshot saved into an FsBackend store.
fn fixture() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    let backend = Counting::new(dir.path());
    let store = Arc::new(
        ConvergentStore::new(
            &StoreConfig::default(),
            Arc::clone(&backend),
            ManifestKey::from_bytes(OWNER),
        )
        .unwrap(),
    );
    let mut original = VmInstance::new(&config()).unwrap();
    let [lo, hi] = REGION_MIB.to_le_bytes();
    original.invoke("fill_region", &[lo, hi, 7]).unwrap();
    let snapshot = original.snapshot().unwrap();
    let id = snapshot.save_to_store(&store).unwrap();
    backend.gets.lock().unwrap().clear();
    Fixture {
        _dir: dir,
        backend,
        store,
        original,
        snapshot,
        id,
    }
}

fn touch_all() -> Vec<u8> {
    let pages = u32::from(REGION_MIB) * 256;
    [pages.to_le_bytes(), 1u32.to_le_bytes()].concat()
}

/// SHA-like digest of every page (FNV-1a per page is enough to compare).
fn page_digests(vm: &VmInstance) -> Vec<u64> {
    let mut page = vec![0u8; PAGE_SIZE as usize];
    (0..MEMORY / PAGE_SIZE)
        .map(|p| {
            if p * PAGE_SIZE == ABI_PAGE_ADDR {
                return 0; // generation and entropy differ per restore
            }
            vm.read_memory(p * PAGE_SIZE, &mut page).unwrap();
            page.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
        })
        .collect()
}

fn open_on_demand(f: &Fixture, deadline: Duration) -> Snapshot {
    let mut cfg = OnDemandConfig::default();
    cfg.fetch_deadline = deadline;
    Snapshot::open_from_store(&f.store, &f.id, &cfg).unwrap()
}

fn data_blocks(f: &Fixture) -> Vec<(u64, BlockId)> {
    let manifest = f.store.manifest(&f.id).unwrap();
    let mut offset = 0;
    let mut out = Vec::new();
    for e in &manifest.entries {
        if let Entry::Data { id, .. } = e {
            if offset < MEMORY {
                out.push((offset, *id));
            }
        }
        offset += u64::from(e.len());
    }
    out
}

/// The block the store error inside `e` names.
fn failed_block(e: &VmError) -> Option<(BlockId, &StoreError)> {
    let VmError::MemoryUnavailable { source, .. } = e else {
        return None;
    };
    match source.downcast_ref::<SnapshotError>()? {
        SnapshotError::Store {
            block: Some(b),
            source,
        } => Some((*b, &**source)),
        _ => None,
    }
}

#[test]
fn on_demand_memory_equals_the_snapshot_byte_for_byte() {
    require_kvm!();
    let f = fixture();
    let expected = page_digests(&f.original);
    let on_demand = open_on_demand(&f, Duration::from_secs(10));
    assert_eq!(on_demand.id(), f.snapshot.id());
    assert_eq!(on_demand.blocks_fetched(), Some(0));

    // The guest touches its whole region through KVM: same answer as a
    // VM restored from the snapshot itself.
    let mut vm = VmInstance::restore(&config(), &on_demand).unwrap();
    let mut reference = VmInstance::restore(&config(), &f.snapshot).unwrap();
    assert_eq!(
        vm.invoke("touch_region", &touch_all()).unwrap(),
        reference.invoke("touch_region", &touch_all()).unwrap()
    );
    assert!(on_demand.blocks_fetched().unwrap() > 0);

    // Another VM of the same handle: every page, read by the host, equals
    // the original VM's page.
    let fresh = VmInstance::restore(&config(), &on_demand).unwrap();
    let got = page_digests(&fresh);
    let differing: Vec<usize> = (0..got.len()).filter(|&p| got[p] != expected[p]).collect();
    assert!(differing.is_empty(), "pages differ: {differing:?}");

    // An in-place rewind and a new snapshot of an on-demand VM keep it too.
    vm.restore_in_place(&on_demand).unwrap();
    assert_eq!(
        vm.invoke("touch_region", &touch_all()).unwrap(),
        reference.invoke("touch_region", &touch_all()).unwrap()
    );
}

#[test]
fn a_corrupt_block_poisons_the_vm_with_an_error_naming_it() {
    require_kvm!();
    let f = fixture();
    // A block in the middle of the region's data.
    let blocks = data_blocks(&f);
    let (_, victim) = blocks[blocks.len() * 3 / 4];
    let path = f.backend.inner.path_of(&ObjectName::block(&victim));
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[100] ^= 1;
    std::fs::write(&path, &bytes).unwrap();

    let on_demand = open_on_demand(&f, Duration::from_secs(5));
    let mut vm = VmInstance::restore(&config(), &on_demand).unwrap();
    let err = vm.invoke("touch_region", &touch_all()).unwrap_err();
    let (block, source) = failed_block(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(block, victim);
    assert!(matches!(source, StoreError::Corrupt { block } if *block == victim));
    assert!(err.poisons());
    // Poisoned for good: no call runs on the stand-in page.
    assert!(vm.invoke("counter", b"").is_err());
}

#[test]
fn a_deleted_block_poisons_the_vm_and_a_slow_one_hits_the_deadline() {
    require_kvm!();
    let f = fixture();
    let blocks = data_blocks(&f);
    let (_, deleted) = blocks[blocks.len() / 2];
    f.backend.delete(&ObjectName::block(&deleted)).unwrap();
    let on_demand = open_on_demand(&f, Duration::from_secs(5));
    let mut vm = VmInstance::restore(&config(), &on_demand).unwrap();
    let err = vm.invoke("touch_region", &touch_all()).unwrap_err();
    let (block, source) = failed_block(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(block, deleted);
    assert!(matches!(source, StoreError::Missing { .. }));

    // Blocks that take longer than the deadline: the call fails with a
    // timeout naming the first block it waited for, soon after the
    // deadline, not when the block comes.
    let f = fixture();
    let blocks = data_blocks(&f);
    let deadline = Duration::from_millis(300);
    let on_demand = open_on_demand(&f, deadline);
    let mut vm = VmInstance::restore(&config(), &on_demand).unwrap();
    *f.backend.delay.lock().unwrap() = Some(Duration::from_secs(4));
    let started = Instant::now();
    let err = vm.invoke("touch_region", &touch_all()).unwrap_err();
    let took = started.elapsed();
    let (block, source) = failed_block(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert!(blocks.iter().any(|&(_, b)| b == block));
    assert!(matches!(source, StoreError::FetchTimeout { block: b, .. } if *b == block));
    assert!(took < Duration::from_secs(3), "took {took:?}");
    assert!(vm.invoke("counter", b"").is_err());
}

/// Dropping an on-demand snapshot handle never waits for the backend: with
/// fetches stuck in a slow backend (as in S3 client retries after the
/// cluster's nodes died), the last drop returns at once and the fetch
/// threads finish on their own.
#[test]
fn dropping_an_on_demand_handle_does_not_wait_for_fetches_in_flight() {
    require_kvm!();
    let f = fixture();
    let on_demand = open_on_demand(&f, Duration::from_millis(300));
    let mut vm = VmInstance::restore(&config(), &on_demand).unwrap();
    *f.backend.delay.lock().unwrap() = Some(Duration::from_secs(4));
    let started = Instant::now();
    assert!(vm.invoke("touch_region", &touch_all()).is_err());
    drop(vm);
    drop(on_demand);
    let took = started.elapsed();
    assert!(took < Duration::from_secs(2), "the drop took {took:?}");
}

/// Polling mode reads a result from guest memory while the guest runs on
/// its own vCPU thread, so the result reader itself must refuse a stand-in
/// page: here the guest publishes as its output a page that nobody touched
/// since the restore and whose block is gone from the store. The host's
/// read is the fault; the call fails with the error naming the block (never
/// `Ok` with the zero page standing in for it), and the VM stays poisoned.
#[test]
fn a_polled_result_on_a_page_that_cannot_be_fetched_fails() {
    require_kvm!();
    let f = fixture();
    let blocks = data_blocks(&f);
    // In the middle of the region's data: no call below touches it.
    let (offset, deleted) = blocks[blocks.len() * 3 / 4];
    f.backend.delete(&ObjectName::block(&deleted)).unwrap();
    let on_demand = open_on_demand(&f, Duration::from_secs(5));
    let config = config().dirty_tracking(true);
    let vm = VmInstance::restore(&config, &on_demand).unwrap();
    let managed = ManagedVm::new(vm, on_demand.clone(), Never).unwrap();
    let mut vm = PollingVm::new(
        managed,
        PollConfig::new().window(Duration::from_millis(500)),
    )
    .expect("polling");
    assert_eq!(vm.invoke("echo", b"hot").unwrap(), b"hot");
    assert_eq!(vm.invoke("counter", b"").unwrap(), 1u64.to_le_bytes());

    let page = PAGE_SIZE;
    let input = [offset.to_le_bytes(), page.to_le_bytes()].concat();
    let vm_error = |e: snapvm::Error| match e {
        snapvm::Error::Vm(e) => e,
        other => panic!("expected a VM error, got {other:?}"),
    };
    let err = match vm.invoke("poll_output_at", &input) {
        Ok(out) => panic!(
            "a stand-in page left the VM as a result ({} bytes, all zero: {})",
            out.len(),
            out.iter().all(|&b| b == 0)
        ),
        Err(e) => vm_error(e),
    };
    let (block, source) = failed_block(&err).unwrap_or_else(|| panic!("{err:?}"));
    assert_eq!(block, deleted);
    assert!(matches!(source, StoreError::Missing { .. }), "{source:?}");
    assert!(err.poisons());
    // Poisoned for good (the memory cannot be had): every later call fails
    // with the same error, whatever it touches.
    for function in ["counter", "poll_output_at"] {
        let input: &[u8] = if function == "counter" { b"" } else { &input };
        let err = vm_error(vm.invoke(function, input).unwrap_err());
        let (block, _) = failed_block(&err).unwrap_or_else(|| panic!("{function}: {err:?}"));
        assert_eq!(block, deleted, "{function}");
    }
}

#[test]
fn eight_concurrent_vms_fetch_each_block_once() {
    require_kvm!();
    let f = fixture();
    // No hedged requests: a loaded machine could make a fetch slow enough
    // to be asked for twice, which is what hedging is for, not this test.
    let mut cfg = OnDemandConfig::default();
    cfg.fetch_deadline = Duration::from_secs(30);
    cfg.hedge_after = Some(Duration::MAX);
    let on_demand = Snapshot::open_from_store(&f.store, &f.id, &cfg).unwrap();
    let expected = VmInstance::restore(&config(), &f.snapshot)
        .unwrap()
        .invoke("touch_region", &touch_all())
        .unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let snap = on_demand.clone();
                s.spawn(move || {
                    let mut vm = VmInstance::restore(&config(), &snap).unwrap();
                    vm.invoke("touch_region", &touch_all()).unwrap()
                })
            })
            .collect();
        for h in handles {
            assert_eq!(h.join().unwrap(), expected);
        }
    });
    let gets = f.backend.gets.lock().unwrap();
    let memory: std::collections::HashSet<ObjectName> = data_blocks(&f)
        .into_iter()
        .map(|(_, b)| ObjectName::block(&b))
        .collect();
    let memory_gets: Vec<u32> = gets
        .iter()
        .filter(|(n, _)| memory.contains(n))
        .map(|(_, &count)| count)
        .collect();
    assert!(!memory_gets.is_empty());
    assert!(memory_gets.iter().all(|&n| n == 1), "{memory_gets:?}");
    assert_eq!(on_demand.blocks_fetched(), Some(memory_gets.len() as u64));
}

#[test]
fn a_working_set_is_applied_only_to_its_snapshot() {
    require_kvm!();
    let f = fixture();
    let cache = TraceCache::in_memory(1 << 20);
    let key = WorkingSet::key("tenant", "v1", &f.snapshot);
    let mut trace = WorkingSet::new(&f.snapshot);
    let mut vm = VmInstance::restore(&config(), &f.snapshot).unwrap();
    let small = [64u32.to_le_bytes(), 1u32.to_le_bytes()].concat();
    vm.invoke("touch_region", &small).unwrap();
    assert!(trace.record(&vm).unwrap());
    assert!(trace.page_count() >= 64, "{}", trace.page_count());
    trace.save(&cache, &key).unwrap();

    // Another snapshot of the same program: another key, and the trace
    // itself refuses it.
    let mut other_vm = VmInstance::new(&config()).unwrap();
    let other = other_vm.snapshot().unwrap();
    assert_ne!(WorkingSet::key("tenant", "v1", &other), key);
    assert!(WorkingSet::load(&cache, &key, &other).is_none());
    assert!(!trace.prefetch(&other));
    // A VM of another snapshot adds nothing to it.
    let before = trace.clone();
    assert!(!trace.record(&other_vm).unwrap());
    assert_eq!(trace, before);

    // Its own snapshot: loaded, applied; on demand, the traced blocks are
    // fetched before any VM exists.
    let loaded = WorkingSet::load(&cache, &key, &f.snapshot).unwrap();
    assert_eq!(loaded, trace);
    assert!(loaded.prefetch(&f.snapshot));
    let on_demand = open_on_demand(&f, Duration::from_secs(10));
    assert!(loaded.prefetch(&on_demand));
    let until = Instant::now() + Duration::from_secs(10);
    while on_demand.blocks_fetched() == Some(0) && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(on_demand.blocks_fetched().unwrap() > 0);
}

#[test]
fn prefetching_a_working_set_never_changes_guest_memory() {
    require_kvm!();
    let f = fixture();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.snap");
    f.snapshot.save(&path).unwrap();
    let loaded = Snapshot::load(&path).unwrap();

    let mut trace = WorkingSet::new(&loaded);
    let mut vm = VmInstance::restore(&config(), &loaded).unwrap();
    vm.invoke("touch_region", &touch_all()).unwrap();
    trace.record(&vm).unwrap();
    let plain = page_digests(&VmInstance::restore(&config(), &loaded).unwrap());
    assert!(trace.prefetch(&loaded));
    let prefetched = page_digests(&VmInstance::restore(&config(), &loaded).unwrap());
    assert_eq!(plain, prefetched);

    // On demand, with the trace recorded from a VM restored on demand (in
    // fault order), prefetched while the guest starts.
    let on_demand = open_on_demand(&f, Duration::from_secs(10));
    let mut first = VmInstance::restore(&config(), &on_demand).unwrap();
    first.invoke("touch_region", &touch_all()).unwrap();
    let mut od_trace = WorkingSet::new(&on_demand);
    od_trace.record(&first).unwrap();
    assert!(od_trace.page_count() >= u64::from(REGION_MIB) * 256);
    let fresh = open_on_demand(&f, Duration::from_secs(10));
    assert!(od_trace.prefetch(&fresh));
    let vm = VmInstance::restore(&config(), &fresh).unwrap();
    assert_eq!(page_digests(&vm), plain);
}

/// A replica that hangs (here: the first request for every block stalls
/// far past the fetch deadline) does not fail on-demand VMs: a fetch that
/// takes longer than the hedge delay is asked for again, and the first
/// answer wins. The guest reads what a VM restored from the snapshot
/// itself reads.
#[test]
fn a_fetch_stuck_on_a_slow_replica_is_hedged() {
    require_kvm!();
    let f = fixture();
    *f.backend.first_get_delay.lock().unwrap() = Some(Duration::from_secs(4));
    let on_demand = open_on_demand(&f, Duration::from_secs(2));
    let mut vm = VmInstance::restore(&config(), &on_demand).unwrap();
    let mut reference = VmInstance::restore(&config(), &f.snapshot).unwrap();
    assert_eq!(
        vm.invoke("touch_region", &touch_all())
            .expect("every block arrives through a hedged fetch"),
        reference.invoke("touch_region", &touch_all()).unwrap()
    );
    assert!(on_demand.blocks_hedged().unwrap() > 0);
}

/// A VM that reads its memory in sequence gets the blocks ahead of its
/// faults fetched for it (by the fetch threads, in parallel), up to the
/// read-ahead window; with read-ahead off it fetches only what it touches.
#[test]
fn a_sequential_scan_fetches_ahead_of_its_faults() {
    require_kvm!();
    let f = fixture();
    // The first half of the region, page by page, in one run.
    let half = u32::from(REGION_MIB) * 128;
    let scan = [half.to_le_bytes(), half.to_le_bytes()].concat();
    let fetched = |readahead: usize| {
        let mut cfg = OnDemandConfig::default();
        cfg.readahead_blocks = readahead;
        let on_demand = Snapshot::open_from_store(&f.store, &f.id, &cfg).unwrap();
        let mut vm = VmInstance::restore(&config(), &on_demand).unwrap();
        let mut reference = VmInstance::restore(&config(), &f.snapshot).unwrap();
        assert_eq!(
            vm.invoke("touch_region", &scan).unwrap(),
            reference.invoke("touch_region", &scan).unwrap()
        );
        on_demand
    };
    let without = fetched(0).blocks_fetched().unwrap();
    let with = fetched(16);
    // The read-ahead queued at the last faults may still be starting.
    let until = Instant::now() + Duration::from_secs(10);
    while with.blocks_fetched().unwrap() < without + 8 && Instant::now() < until {
        std::thread::sleep(Duration::from_millis(10));
    }
    let ahead = with.blocks_fetched().unwrap();
    assert!(
        ahead >= without + 8,
        "{ahead} blocks fetched with read-ahead, {without} without"
    );
}
