//! [`ShellPool`]: VMs created ahead of time, so that `KVM_CREATE_VM` and
//! memory setup are not on the request path.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use super::{RestoreStrategy, Snapshot, SnapshotError};
use crate::vm::machine::Machine;
use crate::vm::memory::GuestRam;
use crate::vm::{VmConfig, VmError, VmInstance};

struct Shared {
    memory_size: u64,
    dirty_tracking: bool,
    capacity: usize,
    shells: Mutex<Vec<Machine>>,
    wake: Condvar,
    stop: AtomicBool,
}

fn new_shell(memory_size: u64, dirty_tracking: bool) -> Result<Machine, VmError> {
    let ram = GuestRam::new(memory_size).map_err(|source| VmError::MapMemory {
        size: memory_size,
        source,
    })?;
    Machine::create(ram, dirty_tracking)
}

/// A pool of empty VM shells (a VM, its vCPU and zeroed memory) for one
/// memory size, refilled by a background thread. Restoring into a shell
/// skips VM creation.
///
/// Dropping the pool stops and joins its thread and frees every shell.
///
/// ```no_run
/// use snapvm::{GuestProgram, ShellPool, VmConfig, VmInstance};
///
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
/// let ready = VmInstance::new(&config)?.snapshot()?;
/// let pool = ShellPool::new(&config, 8)?;
/// let mut vm = pool.restore(&config, &ready)?;
/// # Ok(()) }
/// ```
pub struct ShellPool {
    shared: Arc<Shared>,
    refill: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShellPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShellPool")
            .field("memory_size", &self.shared.memory_size)
            .field("capacity", &self.shared.capacity)
            .field("available", &self.available())
            .finish()
    }
}

impl ShellPool {
    /// Creates a pool of up to `capacity` shells sized for `config`, fills
    /// it, and starts the background refill thread.
    pub fn new(config: &VmConfig, capacity: usize) -> Result<Self, SnapshotError> {
        config.validate()?;
        let capacity = capacity.max(1);
        let (memory_size, dirty_tracking) =
            (config.memory_size_bytes(), config.dirty_tracking_enabled());
        let shells = (0..capacity)
            .map(|_| new_shell(memory_size, dirty_tracking))
            .collect::<Result<Vec<_>, _>>()?;
        let shared = Arc::new(Shared {
            memory_size,
            dirty_tracking,
            capacity,
            shells: Mutex::new(shells),
            wake: Condvar::new(),
            stop: AtomicBool::new(false),
        });
        let worker = Arc::clone(&shared);
        let refill = std::thread::Builder::new()
            .name("snapvm-shell-pool".into())
            .spawn(move || refill(&worker))
            .map_err(SnapshotError::io("starting the shell pool thread", None))?;
        Ok(Self {
            shared,
            refill: Some(refill),
        })
    }

    /// Shells ready right now.
    pub fn available(&self) -> usize {
        self.shared.shells.lock().map(|s| s.len()).unwrap_or(0)
    }

    /// Restores `snapshot` into a pooled shell (or a new one if the pool is
    /// empty). Same checks and result as [`VmInstance::restore`].
    pub fn restore(
        &self,
        config: &VmConfig,
        snapshot: &Snapshot,
    ) -> Result<VmInstance, SnapshotError> {
        if config.memory_size_bytes() != self.shared.memory_size
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
        let shell = self.shared.shells.lock().ok().and_then(|mut s| s.pop());
        self.shared.wake.notify_one();
        let machine = match shell {
            Some(machine) => machine,
            None => new_shell(self.shared.memory_size, self.shared.dirty_tracking)?,
        };
        snapshot
            .chain()
            .iter()
            .try_for_each(|s| s.inner.memory.apply(&machine.ram))?;
        let _ = RestoreStrategy::Eager;
        snapshot.finish_restore(machine, config)
    }
}

fn refill(shared: &Shared) {
    let mut shells = match shared.shells.lock() {
        Ok(guard) => guard,
        Err(_) => return,
    };
    while !shared.stop.load(Ordering::Acquire) {
        if shells.len() >= shared.capacity {
            shells = match shared.wake.wait(shells) {
                Ok(guard) => guard,
                Err(_) => return,
            };
            continue;
        }
        drop(shells);
        let shell = new_shell(shared.memory_size, shared.dirty_tracking);
        shells = match shared.shells.lock() {
            Ok(guard) => guard,
            Err(_) => return,
        };
        match shell {
            Ok(machine) => shells.push(machine),
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

impl Drop for ShellPool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        self.shared.wake.notify_all();
        if let Some(handle) = self.refill.take() {
            let _ = handle.join();
        }
    }
}
