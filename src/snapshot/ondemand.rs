//! Restore straight from a [`ConvergentStore`], on demand: a VM starts
//! before its snapshot has arrived.
//!
//! [`Snapshot::open_from_store`] reads only the snapshot's state (the tail
//! of its data set). Its memory image is a sparse memfd that acts as the
//! process-wide cache of the snapshot's blocks: every VM restored from the
//! handle maps it privately (copy-on-write, as a lazy restore maps a
//! file), and its mapping is registered with a userfaultfd. A fault on a
//! page whose block has not arrived wakes the VM's handler thread, which
//! asks the fetch workers for the block (the block id and AES-GCM tag are
//! checked, then it is decrypted and written into the memfd, once, for all
//! VMs) and then wakes the faulting access; pages of all-zero blocks get
//! the zero page. With a working-set trace, the traced blocks are queued
//! first and fetched in parallel while the guest starts; a block a fault
//! needs jumps the queue.
//!
//! # Failing safely
//! A block that fails verification, is missing, or does not arrive within
//! [`OnDemandConfig::fetch_deadline`] poisons the VM: the handler records a
//! [`SnapshotError::Store`] naming the block, kicks the vCPU (a `KVM_RUN`
//! waiting on the fault returns `EINTR` without the guest seeing the page),
//! and only then resolves the faulting access with a zero page so that no
//! thread waits forever. The VM checks the failure before and after every
//! entry into the guest, before serving any exit and before handing out
//! any output, so nothing computed from the stand-in page leaves the VM:
//! the call returns [`VmError::MemoryUnavailable`] and the VM stays
//! poisoned.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::file::load_on_demand;
use super::image::memfd;
use super::{Snapshot, SnapshotError};
use crate::abi::PAGE_SIZE;
use crate::store::{BlockId, BlockKey, ConvergentStore, Entry, ManifestId, StoreError};
use crate::sys::memory::GuestRam;
use crate::sys::uffd::Userfault;
use crate::vm::machine::Machine;
use crate::vm::userfault::MemoryFault;
use crate::vm::{VmConfig, VmError};
use crate::VmInstance;

/// Settings of an on-demand snapshot handle ([`Snapshot::open_from_store`]).
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct OnDemandConfig {
    /// How long a faulting access waits for its block before the VM is
    /// poisoned with [`StoreError::FetchTimeout`]. Default 10 s.
    pub fetch_deadline: Duration,
    /// Threads fetching blocks (for faults and working-set prefetch), shared
    /// by every VM restored from the handle. Default 4.
    pub fetch_threads: usize,
    /// When a faulting access has waited this long for its block, a second
    /// fetch of the block starts on its own thread (a *hedged* request:
    /// the store may answer it from another replica), and the first answer
    /// wins. `None` (the default) adapts it: the 95th percentile of the
    /// handle's recent fetch times, at least 5 ms (100 ms until 16 fetches
    /// have been timed), and at most a quarter of [`Self::fetch_deadline`].
    /// At most two fetches of a block run at once.
    /// `Some(Duration::MAX)` never hedges.
    pub hedge_after: Option<Duration>,
    /// Most blocks fetched ahead of a VM that faults on consecutive blocks
    /// (a sequential scan): the window starts at 2 blocks and doubles with
    /// every fault that stays in sequence, up to this. Faults out of
    /// sequence fetch nothing ahead. Default 16 (1 MiB of 64 KiB blocks);
    /// 0 turns read-ahead off.
    pub readahead_blocks: usize,
}

impl Default for OnDemandConfig {
    fn default() -> Self {
        Self {
            fetch_deadline: Duration::from_secs(10),
            fetch_threads: 4,
            hedge_after: None,
            readahead_blocks: 16,
        }
    }
}

/// The hedge delay before enough fetches were timed to adapt it.
const HEDGE_INITIAL: Duration = Duration::from_millis(100);
/// The shortest adaptive hedge delay.
const HEDGE_FLOOR: Duration = Duration::from_millis(5);
/// Fetch times kept for the adaptive hedge delay.
const LATENCY_SAMPLES: usize = 64;
/// Fetch times needed before the hedge delay adapts.
const LATENCY_MIN_SAMPLES: usize = 16;
/// The first read-ahead window of a sequential scan, in blocks.
const READAHEAD_START: usize = 2;

const ABSENT: u8 = 0;
const QUEUED: u8 = 1;
const FETCHING: u8 = 2;
const PRESENT: u8 = 3;
const FAILED: u8 = 4;

/// One distinct stored block of the memory image.
struct Block {
    id: BlockId,
    key: BlockKey,
    len: u32,
    /// Offsets in the memory image where it occurs.
    offsets: Vec<u64>,
}

struct State {
    status: Vec<u8>,
    /// Fetches of each block running now (two while a hedge runs).
    inflight: Vec<u8>,
    errors: HashMap<u32, Arc<SnapshotError>>,
    queue: VecDeque<u32>,
    stop: bool,
    /// How long the latest successful fetches took (the newest last).
    latencies: VecDeque<Duration>,
    /// Fetch workers that have not yet seen `stop`.
    live: usize,
}

/// How long dropping the last user of an on-demand snapshot's cache waits
/// for fetch workers that are inside a fetch (see [`StoreMemory`]'s `Drop`).
const DROP_WAIT: Duration = Duration::from_millis(100);

struct Shared {
    store: Arc<ConvergentStore>,
    cache: File,
    size: u64,
    block_size: u64,
    blocks: Vec<Block>,
    /// For each block-sized slot of memory, its distinct block (or
    /// `u32::MAX` for an all-zero one).
    slots: Vec<u32>,
    state: Mutex<State>,
    /// Signalled when a block changes status or work is queued.
    changed: Condvar,
    deadline: Duration,
    /// A fixed hedge delay (see [`OnDemandConfig::hedge_after`]).
    hedge_after: Option<Duration>,
    fetches: AtomicU64,
    hedges: AtomicU64,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is a table of bytes and a queue: never half-updated.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn worker(&self) {
        loop {
            let block = {
                let mut st = self.lock();
                loop {
                    if st.stop {
                        st.live -= 1;
                        self.changed.notify_all();
                        return;
                    }
                    match st.queue.pop_front() {
                        Some(b) if st.status[b as usize] == QUEUED => {
                            st.status[b as usize] = FETCHING;
                            st.inflight[b as usize] += 1;
                            break b;
                        }
                        Some(_) => continue,
                        None => st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
                    }
                }
            };
            self.fetch_and_record(block);
        }
    }

    /// Fetches `block` (counted in `inflight` by the caller) and records
    /// the outcome: the first success makes it present; a failure fails it
    /// only when no other fetch of it (a hedge) is still running.
    fn fetch_and_record(&self, block: u32) {
        let started = Instant::now();
        let result = self.fetch(block);
        let took = started.elapsed();
        let i = block as usize;
        let mut st = self.lock();
        st.inflight[i] -= 1;
        match result {
            // Only the first answer is timed: a hedged request that lost
            // says how slow the stuck replica is, not the store.
            Ok(()) if st.status[i] != PRESENT => {
                st.status[i] = PRESENT;
                if st.latencies.len() == LATENCY_SAMPLES {
                    st.latencies.pop_front();
                }
                st.latencies.push_back(took);
            }
            Ok(()) => {}
            Err(e) => {
                if st.status[i] != PRESENT {
                    st.errors.insert(block, Arc::new(e));
                    if st.inflight[i] == 0 {
                        st.status[i] = FAILED;
                    }
                }
            }
        }
        self.changed.notify_all();
    }

    /// How long a waiting access lets a fetch run before hedging it.
    fn hedge_delay(&self, st: &State) -> Duration {
        if let Some(d) = self.hedge_after {
            return d;
        }
        let adaptive = if st.latencies.len() < LATENCY_MIN_SAMPLES {
            HEDGE_INITIAL
        } else {
            let mut sorted: Vec<Duration> = st.latencies.iter().copied().collect();
            sorted.sort_unstable();
            sorted[sorted.len() * 95 / 100].max(HEDGE_FLOOR)
        };
        // Two hedges fit in the deadline with time to spare.
        adaptive.min(self.deadline / 4)
    }

    /// Starts another fetch of `block` on its own thread, unless two run
    /// already (it may be the first, if no worker has taken the block yet:
    /// all of them may be stuck on a slow replica). The thread owns a
    /// reference to the cache, so it may outlive the handle by one fetch.
    fn hedge(self: &Arc<Self>, st: &mut State, block: u32) {
        let i = block as usize;
        if st.inflight[i] >= 2 {
            return;
        }
        st.status[i] = FETCHING;
        st.inflight[i] += 1;
        let shared = Arc::clone(self);
        let spawned = std::thread::Builder::new()
            .name("snapvm-hedge".into())
            .spawn(move || shared.fetch_and_record(block));
        match spawned {
            Ok(_) => {
                self.hedges.fetch_add(1, Ordering::Relaxed);
            }
            // No thread: the fetches already running must do.
            Err(_) => {
                st.inflight[i] -= 1;
                if st.inflight[i] == 0 {
                    st.status[i] = QUEUED;
                    st.queue.push_front(block);
                }
            }
        }
    }

    fn fetch(&self, block: u32) -> Result<(), SnapshotError> {
        let b = &self.blocks[block as usize];
        self.fetches.fetch_add(1, Ordering::Relaxed);
        let plain = self
            .store
            .fetch_block(&b.id, &b.key, b.len)
            .map_err(|source| SnapshotError::Store {
                block: Some(b.id),
                source: Box::new(source),
            })?;
        for &at in &b.offsets {
            let n = (self.size - at).min(plain.len() as u64) as usize;
            self.cache
                .write_all_at(&plain[..n], at)
                .map_err(SnapshotError::io("writing a fetched block", None))?;
        }
        Ok(())
    }

    /// The distinct block holding guest page `page`, if it stores data.
    fn block_of(&self, page: u64) -> Option<u32> {
        let slot = (page * PAGE_SIZE / self.block_size) as usize;
        self.slots.get(slot).copied().filter(|&b| b != u32::MAX)
    }

    /// Queues `blocks` (those not yet asked for) behind earlier requests.
    fn queue(&self, blocks: impl Iterator<Item = u32>) {
        let mut st = self.lock();
        for b in blocks {
            if st.status[b as usize] == ABSENT {
                st.status[b as usize] = QUEUED;
                st.queue.push_back(b);
            }
        }
        self.changed.notify_all();
    }

    /// Waits until `block` is in the cache (asking for it first, ahead of
    /// queued prefetches), at most the deadline; hedges the fetch when it
    /// takes longer than the hedge delay.
    fn ensure(self: &Arc<Self>, block: u32) -> Result<(), Arc<SnapshotError>> {
        let mut st = self.lock();
        let i = block as usize;
        match st.status[i] {
            PRESENT => return Ok(()),
            ABSENT | QUEUED => {
                st.status[i] = QUEUED;
                st.queue.push_front(block);
                self.changed.notify_all();
            }
            _ => {}
        }
        let started = Instant::now();
        // `None` when they lie past the end of time (`Duration::MAX`).
        let until = started.checked_add(self.deadline);
        let mut hedge_at = started.checked_add(self.hedge_delay(&st));
        loop {
            match st.status[i] {
                PRESENT => return Ok(()),
                FAILED => return Err(Arc::clone(&st.errors[&block])),
                _ => {}
            }
            let now = Instant::now();
            if hedge_at.is_some_and(|at| now >= at) {
                // At most two fetches of a block run at once; while two
                // run, the next hedge waits another delay (the one that
                // was a worker's may have been taken by a stuck replica).
                self.hedge(&mut st, block);
                hedge_at = now.checked_add(self.hedge_delay(&st));
                continue;
            }
            if until.is_some_and(|until| now >= until) {
                let id = self.blocks[i].id;
                return Err(Arc::new(SnapshotError::Store {
                    block: Some(id),
                    source: Box::new(StoreError::FetchTimeout {
                        block: id,
                        after: self.deadline,
                    }),
                }));
            }
            st = match [hedge_at, until].into_iter().flatten().min() {
                Some(wake) => {
                    self.changed
                        .wait_timeout(st, wake - now)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.changed.wait(st).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// The block cache of one on-demand snapshot handle and its fetch workers.
/// Shared (through the snapshot and every VM restored from it); the
/// workers stop when the last user is gone.
pub(crate) struct StoreMemory {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// The largest read-ahead window of the VMs' fault handlers.
    readahead: usize,
}

/// Stops the fetch workers. Idle ones exit at once and are joined; one
/// inside a fetch (a backend call that may retry for long against a dead
/// server: `S3Config::retry_timeout`) is waited for at most [`DROP_WAIT`],
/// then left to finish on its own: it holds its own reference to the
/// shared state (the store handle and the cache memfd), writes nothing
/// anyone reads any more, exits as soon as its backend call returns, and
/// frees the cache then. So dropping never blocks on the network.
impl Drop for StoreMemory {
    fn drop(&mut self) {
        let until = Instant::now() + DROP_WAIT;
        let mut st = self.shared.lock();
        st.stop = true;
        self.shared.changed.notify_all();
        while st.live > 0 {
            let now = Instant::now();
            if now >= until {
                break;
            }
            st = self
                .shared
                .changed
                .wait_timeout(st, until - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let all_stopped = st.live == 0;
        drop(st);
        for w in self.workers.drain(..) {
            if all_stopped || w.is_finished() {
                let _ = w.join();
            }
            // Otherwise detached: it exits when its fetch returns.
        }
    }
}

impl StoreMemory {
    /// Makes sure every stored page in `[addr, addr + len)` is in the
    /// cache (the memfd reads as the snapshot there).
    pub(crate) fn ensure_range(&self, addr: u64, len: u64) -> Result<(), SnapshotError> {
        if len == 0 {
            return Ok(());
        }
        let bs = self.shared.block_size;
        let (first, last) = (addr / bs, (addr + len - 1) / bs);
        let blocks: Vec<u32> = (first..=last)
            .filter_map(|s| self.shared.slots.get(s as usize).copied())
            .filter(|&b| b != u32::MAX)
            .collect();
        self.shared.queue(blocks.iter().copied());
        for b in blocks {
            self.shared
                .ensure(b)
                .map_err(|e| unwrap_shared(addr / PAGE_SIZE, e))?;
        }
        Ok(())
    }

    /// Queues the blocks holding `pages` (in this order) for fetching by
    /// the workers, behind what is already queued; returns how many
    /// blocks were newly queued.
    pub(crate) fn prefetch(&self, pages: impl Iterator<Item = u64>) -> usize {
        let mut seen = vec![false; self.shared.blocks.len()];
        let mut order = Vec::new();
        for page in pages {
            if let Some(b) = self.shared.block_of(page) {
                if !std::mem::replace(&mut seen[b as usize], true) {
                    order.push(b);
                }
            }
        }
        let before = self.shared.lock().queue.len();
        self.shared.queue(order.into_iter());
        self.shared.lock().queue.len().saturating_sub(before)
    }

    /// Block fetches started so far (each distinct block once, unless a
    /// fetch failed or was hedged).
    pub(crate) fn fetches(&self) -> u64 {
        self.shared.fetches.load(Ordering::Relaxed)
    }

    /// Hedged fetches started so far.
    pub(crate) fn hedges(&self) -> u64 {
        self.shared.hedges.load(Ordering::Relaxed)
    }

    /// Queues the blocks of the `count` slots after `slot` for fetching
    /// (read-ahead; those already asked for are skipped).
    fn read_ahead(&self, slot: u64, count: usize) {
        let shared = &self.shared;
        let ahead = (slot + 1..)
            .take(count)
            .filter_map(|s| shared.slots.get(s as usize).copied())
            .filter(|&b| b != u32::MAX);
        shared.queue(ahead);
    }
}

/// A shared error as an owned one, for calls that return `SnapshotError`
/// (`page`: the first page of the range that was needed).
fn unwrap_shared(page: u64, e: Arc<SnapshotError>) -> SnapshotError {
    SnapshotError::Vm(VmError::MemoryUnavailable { page, source: e })
}

/// The per-VM fault handler: a thread serving the VM's userfaultfd, stopped
/// and joined when the VM is dropped.
pub(crate) struct FaultHandler {
    /// Written to stop the thread (it polls the other end).
    stop: UnixStream,
    thread: Option<JoinHandle<()>>,
    order: Arc<Mutex<Vec<u64>>>,
}

impl Drop for FaultHandler {
    fn drop(&mut self) {
        let _ = (&self.stop).write(&[1]);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl FaultHandler {
    fn start(
        ram: &GuestRam,
        memory: Arc<StoreMemory>,
        fault: Arc<MemoryFault>,
    ) -> Result<Self, SnapshotError> {
        let readahead = memory.readahead;
        let io = |step| SnapshotError::io(step, None);
        let uffd = Userfault::new().map_err(io("opening a userfaultfd"))?;
        uffd.register(ram)
            .map_err(io("registering guest memory with userfaultfd"))?;
        let (stop, stopped) = UnixStream::pair().map_err(io("socketpair"))?;
        let order = Arc::new(Mutex::new(Vec::new()));
        let serve = Serve {
            uffd,
            memory,
            fault,
            base: ram.host_addr(),
            size: ram.size(),
            order: Arc::clone(&order),
            seen: vec![0u64; (ram.size() / PAGE_SIZE).div_ceil(64) as usize],
            last_slot: None,
            window: 0,
            readahead,
        };
        let thread = std::thread::Builder::new()
            .name("snapvm-uffd".into())
            .spawn(move || serve.run(&stopped))
            .map_err(io("starting the fault handler"))?;
        Ok(Self {
            stop,
            thread: Some(thread),
            order,
        })
    }

    /// Guest pages in the order this VM first faulted on them.
    pub(crate) fn fault_order(&self) -> Vec<u64> {
        self.order.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

struct Serve {
    uffd: Userfault,
    memory: Arc<StoreMemory>,
    fault: Arc<MemoryFault>,
    base: u64,
    size: u64,
    order: Arc<Mutex<Vec<u64>>>,
    seen: Vec<u64>,
    /// The block-sized slot of the last fault on a new slot.
    last_slot: Option<u64>,
    /// The read-ahead window, in blocks (0 out of sequence).
    window: usize,
    /// The largest read-ahead window.
    readahead: usize,
}

impl Serve {
    fn run(mut self, stop: &UnixStream) {
        let mut faults = [0u64; 16];
        loop {
            let Ok([_, stopped]) =
                crate::sys::poll::poll_readable([self.uffd.as_fd(), stop.as_fd()], -1)
            else {
                continue; // EINTR
            };
            if stopped {
                return;
            }
            let n = match self.uffd.read_faults(&mut faults) {
                Ok(n) => n,
                Err(_) => return,
            };
            for &addr in &faults[..n] {
                self.serve(addr);
            }
        }
    }

    /// Read-ahead: a fault on the slot after the last one (or within the
    /// window fetched ahead of it) grows the window and queues the slots
    /// ahead; a fault anywhere else closes the window.
    fn follow(&mut self, slot: u64) {
        if self.readahead == 0 || self.last_slot == Some(slot) {
            return;
        }
        let in_sequence = self
            .last_slot
            .is_some_and(|last| slot > last && slot <= last + self.window.max(1) as u64);
        self.window = if in_sequence {
            (self.window * 2).clamp(READAHEAD_START, self.readahead)
        } else {
            0
        };
        self.last_slot = Some(slot);
        if self.window > 0 {
            self.memory.read_ahead(slot, self.window);
        }
    }

    fn serve(&mut self, addr: u64) {
        let Some(offset) = addr.checked_sub(self.base).filter(|&o| o < self.size) else {
            return;
        };
        let page = offset / PAGE_SIZE;
        let page_addr = self.base + page * PAGE_SIZE;
        let (word, bit) = ((page / 64) as usize, page % 64);
        if self.seen[word] & (1 << bit) == 0 {
            self.seen[word] |= 1 << bit;
            self.order
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push(page);
        }
        let block = if self.fault.failed() {
            None
        } else {
            self.memory.shared.block_of(page)
        };
        if block.is_some() {
            self.follow(page * PAGE_SIZE / self.memory.shared.block_size);
        }
        let shared = &self.memory.shared;
        let Some(block) = block else {
            // An all-zero block, or memory that failed: the zero page.
            let _ = self.uffd.zero(page_addr, PAGE_SIZE);
            return;
        };
        match shared.ensure(block) {
            Ok(()) => {
                let _ = self.uffd.wake(page_addr, PAGE_SIZE);
            }
            Err(e) => {
                // Poison first (and kick the vCPU), then release the access.
                self.fault.fail(page, e);
                let _ = self.uffd.zero(page_addr, PAGE_SIZE);
            }
        }
    }
}

/// What an on-demand VM keeps alive: the snapshot whose memfd it maps and
/// its fault handler (dropped, and joined, with the VM).
pub(crate) struct OnDemandBacking {
    pub(crate) snapshot: Snapshot,
    pub(crate) handler: FaultHandler,
}

impl Snapshot {
    /// Opens a full snapshot saved with [`Snapshot::save_to_store`] for
    /// restoring **on demand**: only the snapshot's state is read now;
    /// memory arrives block by block as VMs restored from this handle touch
    /// it (see `docs/trace.md`, "On-demand restore"). Restore from the
    /// returned handle as usual ([`VmInstance::restore`]); every VM restored
    /// from it (and its clones) shares one block cache, so each block is
    /// fetched at most once per handle. Prefetch a recorded working set
    /// with [`WorkingSet::prefetch`](super::WorkingSet::prefetch).
    ///
    /// Dropping the handle (with the last VM restored from it) does not
    /// wait for fetches in flight for more than about 100 ms: a fetch
    /// thread still inside a backend call finishes on its own and then
    /// frees the block cache (see `docs/trace.md`, "Dropping a handle").
    ///
    /// Needs a store block size that is a multiple of 4 KiB (the default
    /// 64 KiB is), and userfaultfd (Linux; the process needs the right to
    /// handle kernel faults: root, `CAP_SYS_PTRACE`, or access to
    /// `/dev/userfaultfd`).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use snapvm::snapshot::OnDemandConfig;
    /// use snapvm::store::{ConvergentStore, ManifestId, ManifestKey};
    /// use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};
    ///
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// # let (key, id): (ManifestKey, ManifestId) = unimplemented!();
    /// let store = Arc::new(ConvergentStore::open_dir("/var/lib/snaps", key)?);
    /// let snapshot = Snapshot::open_from_store(&store, &id, &OnDemandConfig::default())?;
    /// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
    /// let mut vm = VmInstance::restore(&config, &snapshot)?; // starts at once
    /// vm.invoke("handle", b"request")?; // fetches what it touches
    /// # Ok(()) }
    /// ```
    pub fn open_from_store(
        store: &Arc<ConvergentStore>,
        id: &ManifestId,
        config: &OnDemandConfig,
    ) -> Result<Snapshot, SnapshotError> {
        let malformed = |reason| SnapshotError::Malformed {
            section: "store data set",
            reason,
        };
        if config.fetch_threads == 0 || config.fetch_deadline.is_zero() {
            return Err(malformed(
                "on-demand settings: no fetch threads or no deadline",
            ));
        }
        let mut reader = store.reader(id)?;
        let manifest = reader.manifest().clone();
        let size = super::stored::memory_size_of(&manifest.metadata)?;
        let block_size = u64::from(manifest.block_size);
        if block_size == 0 || block_size % PAGE_SIZE != 0 {
            return Err(malformed("on-demand restore needs blocks of whole pages"));
        }
        let head = super::stored::read_head_and_state(&mut reader, size)?;
        let io = |step| SnapshotError::io(step, None);
        // The memory image's blocks: every entry must have the manifest's
        // block size except the last, so slot n starts at n × block size.
        let mut blocks: Vec<Block> = Vec::new();
        let mut by_id: HashMap<BlockId, u32> = HashMap::new();
        let mut slots = Vec::new();
        let mut offset = 0u64;
        for entry in &manifest.entries {
            if offset >= size {
                break;
            }
            if u64::from(entry.len()) != block_size && offset + u64::from(entry.len()) < size {
                return Err(malformed(
                    "a memory block is not of the manifest's block size",
                ));
            }
            match entry {
                Entry::Zero { .. } => slots.push(u32::MAX),
                Entry::Data { id, key, len } => {
                    let next = blocks.len() as u32;
                    let b = *by_id.entry(*id).or_insert(next);
                    if b == next {
                        blocks.push(Block {
                            id: *id,
                            key: key.clone(),
                            len: *len,
                            offsets: Vec::new(),
                        });
                    }
                    blocks[b as usize].offsets.push(offset);
                    slots.push(b);
                }
            }
            offset += u64::from(entry.len());
        }
        let cache = memfd(size)?;
        let shared = Arc::new(Shared {
            store: Arc::clone(store),
            cache: cache
                .try_clone()
                .map_err(io("duplicating the block cache"))?,
            size,
            block_size,
            state: Mutex::new(State {
                status: vec![ABSENT; blocks.len()],
                inflight: vec![0; blocks.len()],
                errors: HashMap::new(),
                queue: VecDeque::new(),
                stop: false,
                latencies: VecDeque::with_capacity(LATENCY_SAMPLES),
                live: 0,
            }),
            blocks,
            slots,
            changed: Condvar::new(),
            deadline: config.fetch_deadline,
            hedge_after: config.hedge_after,
            fetches: AtomicU64::new(0),
            hedges: AtomicU64::new(0),
        });
        let mut memory = StoreMemory {
            shared: Arc::clone(&shared),
            workers: Vec::new(),
            readahead: config.readahead_blocks,
        };
        for _ in 0..config.fetch_threads {
            let s = Arc::clone(&shared);
            // Counted before it runs, so a drop never misses it.
            shared.lock().live += 1;
            let w = std::thread::Builder::new()
                .name("snapvm-fetch".into())
                .spawn(move || s.worker())
                .map_err(|e| {
                    shared.lock().live -= 1;
                    io("starting a fetch thread")(e)
                })?;
            memory.workers.push(w);
        }
        load_on_demand(&head, cache, size, Arc::new(memory))
    }

    /// For a handle from [`Snapshot::open_from_store`], the number of
    /// blocks fetched from the store so far; `None` for other snapshots.
    pub fn blocks_fetched(&self) -> Option<u64> {
        self.chain()[0]
            .inner
            .memory
            .on_demand()
            .map(|m| m.fetches())
    }

    /// For a handle from [`Snapshot::open_from_store`], the hedged block
    /// fetches started so far (see [`OnDemandConfig::hedge_after`]);
    /// `None` for other snapshots.
    pub fn blocks_hedged(&self) -> Option<u64> {
        self.chain()[0].inner.memory.on_demand().map(|m| m.hedges())
    }
}

/// Restores `snapshot`, whose root is an on-demand image: guest memory is
/// a private mapping of the block cache, served by a fault handler.
pub(crate) fn restore<D: Default>(
    config: &VmConfig<D>,
    snapshot: &Snapshot,
    memory: &Arc<StoreMemory>,
) -> Result<VmInstance<D>, SnapshotError> {
    let chain = snapshot.chain();
    let root = &chain[0].inner.memory;
    let size = snapshot.memory_size();
    let mut ram = GuestRam::with_backing(size, root.backing())
        .map_err(|source| VmError::MapMemory { size, source })?;
    let fault = Arc::new(MemoryFault::default());
    let handler = FaultHandler::start(&ram, Arc::clone(memory), Arc::clone(&fault))?;
    let built = (|| {
        let mut stopped = ram.stopped();
        chain[1..]
            .iter()
            .try_for_each(|s| s.inner.memory.apply(&mut stopped))?;
        let machine = Machine::create(ram, config.dirty_tracking_enabled())?;
        snapshot.finish_restore(machine, config)
    })();
    // A failure while the state was written is the store's, not the VM's.
    fault.check()?;
    let mut vm = built?;
    vm.set_memory_fault(fault);
    vm.set_backing(Box::new(OnDemandBacking {
        snapshot: chain[0].clone(),
        handler,
    }));
    Ok(vm)
}

/// Guest pages `vm` faulted on since it was restored, in fault order, when
/// it was restored on demand.
pub(crate) fn fault_order<D>(vm: &VmInstance<D>) -> Option<Vec<u64>> {
    vm.backing()
        .and_then(|b| b.downcast_ref::<OnDemandBacking>())
        .map(|b| b.handler.fault_order())
}
