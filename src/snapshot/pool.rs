//! [`ShellPool`]: VMs created and warmed up ahead of time, so that
//! `KVM_CREATE_VM`, memory setup and a VM's one-time first-run costs are not
//! on the request path.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::image::BLOCK_SIZE;
use super::{Snapshot, SnapshotError, SnapshotId};
use crate::abi::{
    PAGE_SIZE, PORT_HYPERCALL, STACK_TOP, SYSTEM_AREA_END, SYSTEM_AREA_START, USER_BASE,
};
use crate::sys::memory::GuestRam;
use crate::vm::machine::Machine;
use crate::vm::{VmConfig, VmError};
use crate::VmInstance;

/// `out 0xF0, eax; jmp $-2`: the warm-up program a new shell runs once.
const WARM_UP: &[u8] = &[0xE7, 0xF0, 0xEB, 0xFC];

struct Shared {
    memory_size: u64,
    dirty_tracking: bool,
    capacity: usize,
    /// 2 MiB blocks to allocate in every new shell (where the snapshot the
    /// pool was made for stores data).
    prefault: Vec<u64>,
    shells: Mutex<Pooled>,
    wake: Condvar,
    stop: AtomicBool,
    restores: AtomicU64,
    dry: AtomicU64,
    recycled: AtomicU64,
    /// When the pool last warned that it ran dry (warnings are at most one
    /// per [`DRY_WARNING_INTERVAL`]).
    last_dry_warning: Mutex<Option<Instant>>,
}

/// What the background thread works on.
#[derive(Default)]
struct Pooled {
    shells: Vec<Machine>,
    /// VMs handed back, to be torn down off the request path (of any
    /// host-data type: only their drop runs here).
    retired: Vec<Box<dyn Send>>,
}

/// Shortest time between two "pool ran dry" warnings.
const DRY_WARNING_INTERVAL: Duration = Duration::from_secs(10);

/// Counters of a [`ShellPool`], for monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Shells ready right now.
    pub available: usize,
    /// Shells the pool keeps ready.
    pub capacity: usize,
    /// Restores served.
    pub restores: u64,
    /// Restores that found no ready shell and built a VM on the request
    /// path (each also logs a warning, at most one per 10 s).
    pub dry_restores: u64,
    /// VMs handed back with [`ShellPool::recycle`].
    pub recycled: u64,
}

/// Creates a shell: a VM whose vCPU ran a two-instruction program once (so
/// KVM's one-time costs of a VM's first run are paid here), with its
/// memory zeroed again and the blocks in `prefault` allocated.
fn new_shell(memory_size: u64, dirty_tracking: bool, prefault: &[u64]) -> Result<Machine, VmError> {
    let mut machine = Machine::new(memory_size, USER_BASE, STACK_TOP - 8)?;
    let setup = |_| VmError::InvalidConfig {
        field: "memory_size",
        reason: "too small for a VM shell".into(),
    };
    machine.ram().write(USER_BASE, WARM_UP).map_err(setup)?;
    loop {
        match crate::vm::io_exit(machine.vcpu().run())? {
            Some((PORT_HYPERCALL, _, _)) => break,
            Some((port, _, _)) => {
                return Err(VmError::UnexpectedExit {
                    exit: format!("warm-up wrote to port {port:#x}"),
                })
            }
            None => continue,
        }
    }
    // Back to all-zero memory: the system structures and the program page
    // are the only bytes the warm-up wrote (the CPU only set accessed bits
    // in the page tables, which lie in the system area).
    let mut stopped = machine.stopped();
    stopped
        .zero(SYSTEM_AREA_START, SYSTEM_AREA_END - SYSTEM_AREA_START)
        .map_err(setup)?;
    stopped.zero(USER_BASE, PAGE_SIZE).map_err(setup)?;
    for &block in prefault {
        machine.ram().populate(block * BLOCK_SIZE, BLOCK_SIZE);
    }
    if dirty_tracking {
        machine.set_dirty_log(true)?;
    }
    Ok(machine)
}

/// A pool of warm VM shells for one memory size, refilled by a background
/// thread. A shell is a VM and vCPU that have run once (paying KVM's
/// one-time costs of a first run), with zeroed memory whose host pages are
/// already allocated where the pool's snapshot stores data. Restoring into
/// one skips VM creation, memory allocation and those first-run costs.
///
/// Hand VMs back with [`ShellPool::recycle`]: tearing a VM down costs more
/// than restoring one (about a millisecond on PVM hosts), and the pool does
/// it on its own thread. A restore that finds the pool empty builds a VM on
/// the request path; [`ShellPool::stats`] counts those and the pool logs a
/// warning, so a pool too small for its load is visible.
///
/// Dropping the pool stops and joins its thread and frees every shell and
/// every VM handed back.
///
/// ```no_run
/// use snapvm::snapshot::ShellPool;
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
/// let ready = VmInstance::new(&config)?.snapshot()?;
/// let pool = ShellPool::for_snapshot(&config, &ready, 8)?;
/// let mut vm = pool.restore(&ready)?;
/// let out = vm.invoke("handle", b"request")?;
/// pool.recycle(vm); // torn down on the pool's thread, not this one
/// # Ok(()) }
/// ```
pub struct ShellPool<D = ()> {
    shared: Arc<Shared>,
    /// The config the pool was made for: [`Self::restore`] uses it.
    config: VmConfig<D>,
    /// Per snapshot: whether its page tables are the ones warm shells were
    /// built with (only then is a warm shell used for it).
    layout_ok: Mutex<HashMap<SnapshotId, bool>>,
    refill: Option<JoinHandle<()>>,
}

impl<D> std::fmt::Debug for ShellPool<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellPool")
            .field("memory_size", &self.shared.memory_size)
            .field("capacity", &self.shared.capacity)
            .field("available", &self.available())
            .finish()
    }
}

impl<D> ShellPool<D> {
    /// Creates a pool of up to `capacity` shells sized for `config`, fills
    /// it, and starts the background refill thread.
    pub fn new(config: &VmConfig<D>, capacity: usize) -> Result<Self, SnapshotError> {
        Self::build(config, capacity, Vec::new())
    }

    /// Like [`Self::new`], with shells prepared for `snapshot`: the host
    /// memory of the 2 MiB blocks where it stores data is allocated ahead of
    /// time, so restoring it copies into memory that is already there.
    pub fn for_snapshot(
        config: &VmConfig<D>,
        snapshot: &Snapshot,
        capacity: usize,
    ) -> Result<Self, SnapshotError> {
        let mut blocks: Vec<u64> = snapshot
            .chain()
            .iter()
            .flat_map(|s| s.inner.memory.extents.iter())
            .filter(|e| !e.zero)
            .flat_map(|e| e.addr() / BLOCK_SIZE..=(e.addr() + e.len() - 1) / BLOCK_SIZE)
            .collect();
        blocks.sort_unstable();
        blocks.dedup();
        Self::build(config, capacity, blocks)
    }

    fn build(
        config: &VmConfig<D>,
        capacity: usize,
        prefault: Vec<u64>,
    ) -> Result<Self, SnapshotError> {
        config.validate()?;
        let capacity = capacity.max(1);
        let (memory_size, dirty_tracking) =
            (config.total_memory(), config.dirty_tracking_enabled());
        let shells = (0..capacity)
            .map(|_| new_shell(memory_size, dirty_tracking, &prefault))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            memory_size,
            dirty_tracking,
            capacity,
            prefault,
            shells: Mutex::new(Pooled {
                shells,
                retired: Vec::new(),
            }),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
            restores: AtomicU64::new(0),
            dry: AtomicU64::new(0),
            recycled: AtomicU64::new(0),
            last_dry_warning: Mutex::new(None),
        });
        let worker = Arc::clone(&shared);
        let refill = std::thread::Builder::new()
            .name("snapvm-shell-pool".into())
            .spawn(move || refill(&worker))
            .map_err(SnapshotError::io("starting the shell pool thread", None))?;
        Ok(Self {
            shared,
            config: config.clone(),
            layout_ok: Mutex::new(HashMap::new()),
            refill: Some(refill),
        })
    }

    /// Shells ready right now.
    pub fn available(&self) -> usize {
        self.shared
            .shells
            .lock()
            .map(|s| s.shells.len())
            .unwrap_or(0)
    }

    /// The pool's counters.
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            available: self.available(),
            capacity: self.shared.capacity,
            restores: self.shared.restores.load(Ordering::Relaxed),
            dry_restores: self.shared.dry.load(Ordering::Relaxed),
            recycled: self.shared.recycled.load(Ordering::Relaxed),
        }
    }

    /// Hands `vm` back: the pool's thread tears it down, off the caller's
    /// path. (Its memory held another request's data, so it is never reused
    /// as a shell.)
    pub fn recycle(&self, vm: VmInstance<D>)
    where
        D: Send + 'static,
    {
        self.shared.recycled.fetch_add(1, Ordering::Relaxed);
        match self.shared.shells.lock() {
            Ok(mut pooled) => pooled.retired.push(Box::new(vm)),
            // The pool's thread is gone: tear it down here.
            Err(_) => drop(vm),
        }
        self.shared.wake.notify_one();
    }

    /// Restores `snapshot` into a pooled shell (or a new VM if the pool is
    /// empty) with the config the pool was made for. Same checks and result
    /// as [`VmInstance::restore`].
    pub fn restore(&self, snapshot: &Snapshot) -> Result<VmInstance<D>, SnapshotError>
    where
        D: Default,
    {
        self.restore_with(&self.config, snapshot)
    }

    /// Like [`Self::restore`] with another config (other host functions or
    /// limits), which must have the pool's memory size and dirty tracking.
    pub fn restore_with(
        &self,
        config: &VmConfig<D>,
        snapshot: &Snapshot,
    ) -> Result<VmInstance<D>, SnapshotError>
    where
        D: Default,
    {
        if config.total_memory() != self.shared.memory_size
            || config.dirty_tracking_enabled() != self.shared.dirty_tracking
        {
            return Err(VmError::InvalidConfig {
                field: "memory_size",
                reason: "the config does not match the pool's memory size and dirty tracking"
                    .into(),
            }
            .into());
        }
        snapshot.check_restorable(config)?;
        self.shared.restores.fetch_add(1, Ordering::Relaxed);
        let layout_ok = self.layout_matches(snapshot)?;
        let shell = if layout_ok {
            let shell = self
                .shared
                .shells
                .lock()
                .ok()
                .and_then(|mut s| s.shells.pop());
            self.shared.wake.notify_one();
            shell
        } else {
            None
        };
        let mut machine = match shell {
            Some(machine) => machine,
            None => {
                if layout_ok {
                    self.ran_dry();
                }
                let size = self.shared.memory_size;
                let ram =
                    GuestRam::new(size).map_err(|source| VmError::MapMemory { size, source })?;
                Machine::create(ram, self.shared.dirty_tracking)?
            }
        };
        let mut stopped = machine.stopped();
        snapshot
            .chain()
            .iter()
            .try_for_each(|s| s.inner.memory.apply(&mut stopped))?;
        snapshot.finish_restore(machine, config)
    }

    fn ran_dry(&self) {
        let dry = self.shared.dry.fetch_add(1, Ordering::Relaxed) + 1;
        let Ok(mut last) = self.shared.last_dry_warning.lock() else {
            return;
        };
        if last.is_none_or(|at| at.elapsed() >= DRY_WARNING_INTERVAL) {
            *last = Some(Instant::now());
            log::warn!(
                target: "snapvm::pool",
                "shell pool ran dry ({dry} restores so far built a VM on the request path; \
                 capacity {}): consider a larger pool",
                self.shared.capacity
            );
        }
    }

    /// Whether `snapshot`'s page tables translate exactly like the ones a
    /// warm shell's vCPU already walked. KVM keeps what it derived from the
    /// page tables during the warm-up; a snapshot from a build with another
    /// memory layout gets a fresh VM instead.
    fn layout_matches(&self, snapshot: &Snapshot) -> Result<bool, SnapshotError> {
        if let Some(&known) = self
            .layout_ok
            .lock()
            .ok()
            .and_then(|m| m.get(&snapshot.id()).copied())
            .as_ref()
        {
            return Ok(known);
        }
        let reference =
            GuestRam::new(self.shared.memory_size).map_err(|source| VmError::MapMemory {
                size: self.shared.memory_size,
                source,
            })?;
        crate::vm::write_system_area(&reference)?;
        let mut expected = vec![0u8; PAGE_SIZE as usize];
        let mut same = true;
        for page in crate::vm::page_table_pages(self.shared.memory_size) {
            reference
                .read(page * PAGE_SIZE, &mut expected)
                .map_err(|_| VmError::MemoryOutOfRange {
                    addr: page * PAGE_SIZE,
                    len: PAGE_SIZE,
                })?;
            let actual = snapshot.page(page)?.unwrap_or(&[0; PAGE_SIZE as usize]);
            // Compare translations, ignoring the accessed and dirty bits the
            // CPU sets in page-table entries.
            const AD: u64 = (1 << 5) | (1 << 6);
            same &= expected
                .chunks_exact(8)
                .zip(actual.chunks_exact(8))
                .all(|(e, a)| {
                    let e = u64::from_le_bytes(e.try_into().expect("8 bytes"));
                    let a = u64::from_le_bytes(a.try_into().expect("8 bytes"));
                    e & !AD == a & !AD
                });
        }
        if let Ok(mut known) = self.layout_ok.lock() {
            known.insert(snapshot.id(), same);
        }
        Ok(same)
    }
}

fn refill(shared: &Shared) {
    let Ok(mut shells) = shared.shells.lock() else {
        return;
    };
    while !shared.stop.load(Ordering::Acquire) {
        if !shells.retired.is_empty() {
            let retired = std::mem::take(&mut shells.retired);
            drop(shells);
            drop(retired);
            shells = match shared.shells.lock() {
                Ok(guard) => guard,
                Err(_) => return,
            };
            continue;
        }
        if shells.shells.len() >= shared.capacity {
            shells = match shared.wake.wait(shells) {
                Ok(guard) => guard,
                Err(_) => return,
            };
            continue;
        }
        drop(shells);
        let shell = new_shell(shared.memory_size, shared.dirty_tracking, &shared.prefault);
        shells = match shared.shells.lock() {
            Ok(guard) => guard,
            Err(_) => return,
        };
        match shell {
            Ok(machine) => shells.shells.push(machine),
            // Out of resources: stop refilling until the next restore.
            Err(_) => {
                shells = match shared.wake.wait(shells) {
                    Ok(guard) => guard,
                    Err(_) => return,
                };
            }
        }
    }
}

impl<D> Drop for ShellPool<D> {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(handle) = self.refill.take() {
            let _ = handle.join();
        }
    }
}
