//! [`ReadyPool`]: ready VMs of one snapshot, shared by worker threads.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::ThreadId;

use super::{ManagedVm, RestorePolicy};
use crate::snapshot::{PoolStats, ShellPool, Snapshot, SnapshotError};
use crate::vm::{VmConfig, VmState};

/// Builds the restore policy of each VM a [`ReadyPool`] creates.
type PolicyFactory<P> = Arc<dyn Fn() -> P + Send + Sync>;

/// Ready VMs of one snapshot, handed out as [`ManagedVm`]s to any number
/// of worker threads: the piece an executor scales across cores with.
///
/// [`ReadyPool::get`] lends a VM that is ready to take a call; when the
/// returned [`PooledVm`] is dropped the VM goes back to the pool if it is
/// still ready (its policy already reset it if it had to), and is torn
/// down on a background thread otherwise. A `get` that finds no idle VM
/// restores a new one into a warm shell of the pool's [`ShellPool`], whose
/// thread refills shells in the background, so neither VM creation nor
/// teardown is on a request's path once the pool is warm.
///
/// A thread gets back the VM it gave back last when that one is idle (or
/// else the VM idle longest), so each worker thread keeps using its own
/// VM: its caches stay warm and its vCPU stays on one thread. The pool
/// holds at most `capacity` idle VMs and tears down the
/// rest. Every VM starts from the ready snapshot: a VM never carries state
/// from one pool user to the next except what its policy keeps between
/// calls.
///
/// `ReadyPool` is `Send + Sync`: share it behind an [`Arc`] or a reference.
///
/// ```no_run
/// use snapvm::policy::{Always, ReadyPool};
/// use snapvm::{GuestProgram, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?).dirty_tracking(true);
/// let ready = VmInstance::new(&config)?.snapshot()?;
/// // Two workers: two VMs restored up front, two shells kept warm.
/// let pool = ReadyPool::new(&config, ready, 2, || Always)?;
/// std::thread::scope(|s| {
///     for _ in 0..2 {
///         s.spawn(|| {
///             let mut vm = pool.get().expect("a ready VM");
///             vm.invoke("handle", b"request")
///         });
///     }
/// });
/// # Ok(()) }
/// ```
pub struct ReadyPool<P, D = ()> {
    config: VmConfig<D>,
    ready: Snapshot,
    shells: ShellPool<D>,
    policy: PolicyFactory<P>,
    /// Idle VMs, each with the thread that gave it back.
    idle: Mutex<Vec<(ThreadId, ManagedVm<P, D>)>>,
    capacity: usize,
    created: AtomicU64,
    discarded: AtomicU64,
    resets: AtomicU64,
    lent: AtomicU64,
}

/// Counters of a [`ReadyPool`], for monitoring.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ReadyPoolStats {
    /// Ready VMs waiting in the pool right now.
    pub idle: usize,
    /// VMs lent out right now.
    pub in_use: u64,
    /// VMs restored from the snapshot so far.
    pub created: u64,
    /// VMs torn down because they were not ready when given back (a reset
    /// that failed) or the pool already held `capacity` idle VMs.
    pub discarded: u64,
    /// Resets to the ready snapshot done by VMs given back so far.
    pub resets: u64,
    /// The warm shells behind new VMs.
    pub shells: PoolStats,
}

impl<P, D> std::fmt::Debug for ReadyPool<P, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyPool")
            .field("snapshot", &self.ready.id())
            .field("capacity", &self.capacity)
            .field("shells", &self.shells)
            .finish_non_exhaustive()
    }
}

impl<P: RestorePolicy, D: Default + Send + 'static> ReadyPool<P, D> {
    /// Creates a pool for `ready` that keeps up to `capacity` idle VMs (one
    /// per worker thread is the usual choice), restores `capacity` of them
    /// now, and keeps `capacity` warm shells for new ones. `config` must
    /// enable dirty tracking (see [`ManagedVm`]); `policy` builds each
    /// VM's restore policy.
    pub fn new(
        config: &VmConfig<D>,
        ready: Snapshot,
        capacity: usize,
        policy: impl Fn() -> P + Send + Sync + 'static,
    ) -> Result<Self, SnapshotError> {
        let capacity = capacity.max(1);
        let shells = ShellPool::for_snapshot(config, &ready, capacity)?;
        let pool = Self {
            config: config.clone(),
            ready,
            shells,
            policy: Arc::new(policy),
            idle: Mutex::new(Vec::with_capacity(capacity)),
            capacity,
            created: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            resets: AtomicU64::new(0),
            lent: AtomicU64::new(0),
        };
        let warm = (0..capacity)
            .map(|_| pool.restore())
            .collect::<Result<Vec<_>, _>>()?;
        let here = std::thread::current().id();
        *pool.lock_idle() = warm.into_iter().map(|vm| (here, vm)).collect();
        Ok(pool)
    }

    /// Lends a ready VM: an idle one, or one restored now from the
    /// snapshot. The VM returns to the pool when the [`PooledVm`] drops.
    pub fn get(&self) -> Result<PooledVm<'_, P, D>, SnapshotError> {
        let here = std::thread::current().id();
        let idle = {
            let mut idle = self.lock_idle();
            match idle.iter().rposition(|(thread, _)| *thread == here) {
                Some(mine) => Some(idle.remove(mine).1),
                // The one idle longest: likely no other worker's own VM.
                None if idle.is_empty() => None,
                None => Some(idle.remove(0).1),
            }
        };
        let vm = match idle {
            Some(vm) => vm,
            None => self.restore()?,
        };
        self.lent.fetch_add(1, Ordering::Relaxed);
        Ok(PooledVm {
            pool: self,
            resets_at_start: vm.resets(),
            vm: Some(vm),
        })
    }

    /// The pool's counters.
    pub fn stats(&self) -> ReadyPoolStats {
        ReadyPoolStats {
            idle: self.lock_idle().len(),
            in_use: self.lent.load(Ordering::Relaxed),
            created: self.created.load(Ordering::Relaxed),
            discarded: self.discarded.load(Ordering::Relaxed),
            resets: self.resets.load(Ordering::Relaxed),
            shells: self.shells.stats(),
        }
    }

    /// The ready snapshot every VM starts from.
    pub fn ready(&self) -> &Snapshot {
        &self.ready
    }

    fn restore(&self) -> Result<ManagedVm<P, D>, SnapshotError> {
        let vm = self.shells.restore_with(&self.config, &self.ready)?;
        let managed = ManagedVm::new(vm, self.ready.clone(), (self.policy)())?;
        self.created.fetch_add(1, Ordering::Relaxed);
        Ok(managed)
    }

    fn lock_idle(&self) -> std::sync::MutexGuard<'_, Vec<(ThreadId, ManagedVm<P, D>)>> {
        // A panic while holding the lock cannot leave the list inconsistent
        // (push and pop only): keep using it.
        self.idle.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn give_back(&self, mut vm: ManagedVm<P, D>, resets: u64) {
        // The host data was the last borrower's (its tenant, its request):
        // the next one starts from the default, as with a new VM.
        vm.vm.set_data(D::default());
        self.lent.fetch_sub(1, Ordering::Relaxed);
        self.resets.fetch_add(resets, Ordering::Relaxed);
        if vm.vm().state() == VmState::Ready {
            let mut idle = self.lock_idle();
            if idle.len() < self.capacity {
                idle.push((std::thread::current().id(), vm));
                return;
            }
        }
        self.discarded.fetch_add(1, Ordering::Relaxed);
        self.shells.recycle(vm.into_inner());
    }
}

/// A VM lent by a [`ReadyPool`]: use it as the [`ManagedVm`] it derefs
/// to; dropping it gives it back.
pub struct PooledVm<'a, P: RestorePolicy, D: Default + Send + 'static = ()> {
    pool: &'a ReadyPool<P, D>,
    vm: Option<ManagedVm<P, D>>,
    resets_at_start: u64,
}

impl<P: RestorePolicy, D: Default + Send + 'static> std::fmt::Debug for PooledVm<'_, P, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledVm")
            .field("vm", &self.vm.as_ref().map(ManagedVm::vm))
            .finish_non_exhaustive()
    }
}

impl<P: RestorePolicy, D: Default + Send + 'static> PooledVm<'_, P, D> {
    /// Resets this VM did since it was lent (its policy's, and those after
    /// errors that poisoned it).
    pub fn resets(&self) -> u64 {
        self.vm
            .as_ref()
            .map_or(0, |vm| vm.resets() - self.resets_at_start)
    }
}

impl<P: RestorePolicy, D: Default + Send + 'static> std::ops::Deref for PooledVm<'_, P, D> {
    type Target = ManagedVm<P, D>;

    fn deref(&self) -> &ManagedVm<P, D> {
        self.vm.as_ref().expect("present until dropped")
    }
}

impl<P: RestorePolicy, D: Default + Send + 'static> std::ops::DerefMut for PooledVm<'_, P, D> {
    fn deref_mut(&mut self) -> &mut ManagedVm<P, D> {
        self.vm.as_mut().expect("present until dropped")
    }
}

impl<P: RestorePolicy, D: Default + Send + 'static> Drop for PooledVm<'_, P, D> {
    fn drop(&mut self) {
        let resets = self.resets();
        if let Some(vm) = self.vm.take() {
            self.pool.give_back(vm, resets);
        }
    }
}
