//! [`Snapshot`]: a VM captured in its ready state (or any point between
//! calls), restored far faster than booting.
//!
//! ```no_run
//! use snapvm::{GuestProgram, Snapshot, VmConfig, VmInstance};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let config = VmConfig::new(GuestProgram::from_file("guest.elf")?);
//! let mut template = VmInstance::new(&config)?;   // boots and runs init
//! let ready = template.snapshot()?;               // the ready state
//! ready.save("ready.snap")?;                      // optional: to disk
//!
//! // Every request gets a fresh copy, with its own entropy and generation.
//! let mut vm = VmInstance::restore(&config, &ready)?;
//! let out = vm.invoke("handle", b"request")?;
//! # Ok(()) }
//! ```
//!
//! # What a snapshot holds
//! All vCPU state the guest can observe (general, segment, control and
//! debug registers, x87/SSE/AVX state and XCR0, the MSRs a guest can use,
//! pending events, the CPUID it sees), its memory (every non-zero page), and
//! the host's view of the guest (exported functions, input buffer).
//!
//! # Full and diff snapshots
//! A full snapshot stores every non-zero page. With
//! [`VmConfig::dirty_tracking`](crate::VmConfig::dirty_tracking), a VM
//! tracks the pages written after a snapshot was taken from it (or after it
//! was restored from one), and [`VmInstance::snapshot_diff`] stores only
//! those; restoring a diff restores its base first. Use diffs for frequent
//! checkpoints of a VM that changes little; use full snapshots as the
//! template many VMs restore from.
//!
//! # Uniqueness
//! Every restore gives the guest a new [`Generation`] and 256 bits of fresh
//! entropy before any guest instruction runs. `snapvm-guest` reseeds its
//! generator and runs the guest's restore hooks before the next call. What
//! the guest derived from randomness *before* the snapshot (and did not
//! regenerate in a hook) is, by construction, shared by every copy.

mod error;
mod file;
mod image;
mod ondemand;
mod pool;
mod stored;
mod working_set;

use std::fmt;
use std::sync::Arc;

pub use error::SnapshotError;
#[cfg(feature = "fuzzing")]
pub(crate) use file::fuzz_load;
pub use ondemand::OnDemandConfig;
pub use pool::{PoolStats, ShellPool};
pub use working_set::WorkingSet;

use crate::sys::memory::{GuestRam, Stopped};
use crate::vm::cpu::CpuState;
use crate::vm::machine::Machine;
use crate::vm::persist::{Backing, MemorySource};
use crate::vm::{Generation, VmConfig, VmError};
use crate::VmInstance;
use image::MemoryImage;

pub(crate) use crate::vm::persist::GuestState;
pub use crate::vm::persist::SnapshotId;

/// How a restored VM gets its memory.
///
/// `cargo bench --bench report` measures both (`restore.cold_eager_us`,
/// `restore.cold_lazy_us`, `density.kib_per_vm_eager`,
/// `density.kib_per_vm_lazy`); `docs/snapshots.md` lists the numbers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub enum RestoreStrategy {
    /// Copy the snapshot's non-zero pages into fresh anonymous memory backed
    /// by transparent huge pages. Each VM owns its memory, and a guest that
    /// touches much memory later takes few page faults; but the copy
    /// allocates (and the kernel zeroes) a 2 MiB page for every block that
    /// holds data, and each VM keeps those pages.
    Eager,
    /// Map the snapshot image privately (copy-on-write): nothing is copied
    /// up front, all VMs share the image's page cache, and only the pages a
    /// VM writes become its own. Every page is faulted in 4 KiB at a time on
    /// first touch. The default: on the hosts snapvm is measured on it
    /// restores faster and packs about 100× more idle VMs per GiB.
    #[default]
    Lazy,
}

pub(crate) struct Inner {
    pub(crate) id: SnapshotId,
    pub(crate) base: Option<Snapshot>,
    pub(crate) program_digest: [u8; 32],
    pub(crate) generation: Generation,
    pub(crate) cpu: CpuState,
    pub(crate) guest: GuestState,
    pub(crate) memory: MemoryImage,
    /// The TCP connections the VM's network device tracked when it was
    /// captured (none after `terminate_connections`): a restored VM gets
    /// a reset for each, from the peer, before it runs guest code.
    /// Snapshot files carry them in an optional section (see
    /// `docs/snapshot-format.md`).
    pub(crate) connections: Vec<crate::net::Connection>,
}

/// A captured VM: vCPU state, memory and guest state. Cheap to clone;
/// restore it any number of times, from any thread.
#[derive(Clone)]
pub struct Snapshot {
    pub(crate) inner: Arc<Inner>,
}

impl fmt::Debug for Snapshot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Snapshot")
            .field("id", &self.inner.id)
            .field("base", &self.base_id())
            .field("memory_size", &self.memory_size())
            .field("stored_bytes", &self.stored_bytes())
            .finish()
    }
}

impl Snapshot {
    /// This snapshot's id.
    pub fn id(&self) -> SnapshotId {
        self.inner.id
    }

    /// For a diff snapshot, the id of its base.
    pub fn base_id(&self) -> Option<SnapshotId> {
        self.inner.base.as_ref().map(Snapshot::id)
    }

    /// Whether this is a diff snapshot.
    pub fn is_diff(&self) -> bool {
        self.inner.base.is_some()
    }

    /// Guest memory size in bytes.
    pub fn memory_size(&self) -> u64 {
        self.inner.memory.size()
    }

    /// Bytes of page data this snapshot stores (not counting its base).
    pub fn stored_bytes(&self) -> u64 {
        self.inner.memory.stored_bytes()
    }

    /// The generation of the VM at the moment it was captured.
    pub fn generation(&self) -> Generation {
        self.inner.generation
    }

    /// The chain from the full snapshot at the root to `self`.
    fn chain(&self) -> Vec<&Snapshot> {
        let mut chain = vec![self];
        while let Some(base) = &chain[chain.len() - 1].inner.base {
            chain.push(base);
        }
        chain.reverse();
        chain
    }

    /// The contents of guest page `page` in this snapshot (through its
    /// chain): `Some(bytes)` for a stored page, `None` for a zero page.
    fn page(&self, page: u64) -> Result<Option<&[u8]>, SnapshotError> {
        // Newest first, walking the bases (no allocation: resets call this
        // for every page they rewind).
        let mut next = Some(self);
        while let Some(s) = next {
            if let Some(found) = s.inner.memory.page(page)? {
                return Ok(found);
            }
            next = s.inner.base.as_ref();
        }
        Ok(None)
    }

    /// Checks that a VM built from `config` can take this snapshot's state.
    fn check_restorable<D>(&self, config: &VmConfig<D>) -> Result<(), SnapshotError> {
        config.validate()?;
        let (snapshot, limit) = (self.memory_size(), config.total_memory());
        if snapshot > limit {
            return Err(SnapshotError::MemoryTooLarge { snapshot, limit });
        }
        if snapshot != limit {
            return Err(SnapshotError::MemorySizeMismatch {
                snapshot,
                config: limit,
            });
        }
        if config.program().digest() != &self.inner.program_digest {
            return Err(SnapshotError::ProgramMismatch);
        }
        self.inner
            .cpu
            .check_compatible(Machine::effective_cpuid()?)?;
        self.chain()
            .iter()
            .try_for_each(|s| s.inner.memory.check_unchanged())
    }

    /// Builds guest memory holding this snapshot's contents.
    fn build_ram(&self, strategy: RestoreStrategy) -> Result<GuestRam, SnapshotError> {
        let chain = self.chain();
        let size = self.memory_size();
        let map_err = |source| VmError::MapMemory { size, source };
        let (mut ram, rest) = match strategy {
            RestoreStrategy::Eager => (GuestRam::new(size).map_err(map_err)?, &chain[..]),
            RestoreStrategy::Lazy => {
                let root = &chain[0].inner.memory;
                root.verify_all()?;
                // Mapped without a fault handler, an on-demand image must
                // be complete first.
                root.ensure_all()?;
                (
                    GuestRam::with_backing(size, root.backing()).map_err(map_err)?,
                    &chain[1..],
                )
            }
        };
        let mut stopped = ram.stopped();
        rest.iter()
            .try_for_each(|s| s.inner.memory.apply(&mut stopped))?;
        Ok(ram)
    }

    /// Turns `machine` (memory already holding the snapshot) into a ready VM.
    fn finish_restore<D: Default>(
        &self,
        machine: Machine,
        config: &VmConfig<D>,
    ) -> Result<VmInstance<D>, SnapshotError> {
        let mut vm = VmInstance::from_saved(
            machine,
            config,
            &self.inner.cpu,
            &self.inner.guest,
            self.id(),
        )?;
        vm.queue_guest_resets(&self.inner.connections);
        Ok(vm)
    }
}

impl<D> VmInstance<D> {
    /// Captures this VM. It must be ready (not poisoned); it stays ready and
    /// unchanged.
    pub fn snapshot(&mut self) -> Result<Snapshot, SnapshotError> {
        if self.state() != crate::vm::VmState::Ready {
            return Err(SnapshotError::NotReady);
        }
        // Capture reads the pages the mapping holds: an on-demand image
        // must hold all of its pages first.
        if let Some(b) = self
            .backing()
            .and_then(|b| b.downcast_ref::<ondemand::OnDemandBacking>())
        {
            b.snapshot.inner.memory.ensure_all()?;
        }
        let memory = MemoryImage::capture_full(&self.stopped())?;
        self.check_memory()?;
        self.capture(memory, None)
    }

    /// Captures only the pages written since `base` was taken from (or
    /// restored into) this VM, plus the complete vCPU and guest state.
    /// Needs [`VmConfig::dirty_tracking`]. The next diff is taken against
    /// the snapshot this call returns.
    pub fn snapshot_diff(&mut self, base: &Snapshot) -> Result<Snapshot, SnapshotError> {
        if self.tracking_base() != Some(base.id()) {
            return Err(SnapshotError::NotTracking { base: base.id() });
        }
        if self.state() != crate::vm::VmState::Ready {
            return Err(SnapshotError::NotReady);
        }
        let pages = self.take_written_pages()?;
        let memory = MemoryImage::capture_pages(&self.stopped(), pages.into_iter())?;
        self.capture(memory, Some(base.clone()))
    }

    fn capture(
        &mut self,
        memory: MemoryImage,
        base: Option<Snapshot>,
    ) -> Result<Snapshot, SnapshotError> {
        let inner = Inner {
            id: SnapshotId::random()?,
            base,
            program_digest: *self.program_digest(),
            generation: self.saved_generation(),
            cpu: self.save_cpu()?,
            guest: self.save_guest(),
            memory,
            connections: self
                .connections()
                .map(|t| t.connections().copied().collect())
                .unwrap_or_default(),
        };
        // Start tracking against the new snapshot.
        self.track_from(inner.id)?;
        Ok(Snapshot {
            inner: Arc::new(inner),
        })
    }

    /// Builds a new VM from `snapshot` with the default
    /// [`RestoreStrategy`]. The config supplies the limits and host
    /// functions; its program and memory size must match the snapshot's.
    pub fn restore(config: &VmConfig<D>, snapshot: &Snapshot) -> Result<Self, SnapshotError>
    where
        D: Default,
    {
        Self::restore_with(config, snapshot, RestoreStrategy::default())
    }

    /// Builds a new VM from `snapshot` with the given memory strategy.
    pub fn restore_with(
        config: &VmConfig<D>,
        snapshot: &Snapshot,
        strategy: RestoreStrategy,
    ) -> Result<Self, SnapshotError>
    where
        D: Default,
    {
        snapshot.check_restorable(config)?;
        if let Some(memory) = snapshot.chain()[0].inner.memory.on_demand() {
            // Memory arrives on demand, whatever the strategy.
            return ondemand::restore(config, snapshot, memory);
        }
        let ram = snapshot.build_ram(strategy)?;
        let machine = Machine::create(ram, config.dirty_tracking_enabled())?;
        let mut vm = snapshot.finish_restore(machine, config)?;
        if strategy == RestoreStrategy::Lazy {
            vm.set_backing(Box::new(snapshot.chain()[0].clone()));
        }
        Ok(vm)
    }

    /// Rewinds this VM to `snapshot` in place, keeping its KVM objects. A
    /// poisoned VM becomes ready again.
    ///
    /// With a network device, the TCP connections the VM opened since the
    /// snapshot end first: each peer gets a reset that appears to come from
    /// the guest. The tracker then holds the snapshot's connections, and the
    /// guest gets a reset for each of those before it runs guest code, as
    /// after [`VmInstance::restore`].
    ///
    /// Failure-atomic: the VM is poisoned from the moment the rewind starts
    /// until it finished, so a restore that fails (a corrupt memory block,
    /// a KVM error) leaves a VM that refuses calls, never one that claims
    /// to be ready with half-rewound memory. Pages written since the last
    /// reset are forgotten only after all of them were rewound, so a
    /// retried restore rewinds them all.
    pub fn restore_in_place(&mut self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        self.reset_to(snapshot, true)
    }

    /// [`Self::restore_in_place`], keeping the guest's preserved regions
    /// only with `keep_preserved` (a policy reset under `Always` does not).
    pub(crate) fn reset_to(
        &mut self,
        snapshot: &Snapshot,
        keep_preserved: bool,
    ) -> Result<(), SnapshotError> {
        if snapshot.memory_size() != self.memory_size() {
            return Err(SnapshotError::MemorySizeMismatch {
                snapshot: snapshot.memory_size(),
                config: self.memory_size(),
            });
        }
        if &snapshot.inner.program_digest != self.program_digest() {
            return Err(SnapshotError::ProgramMismatch);
        }
        // The same check a fresh restore makes (cached per snapshot).
        snapshot
            .inner
            .cpu
            .check_compatible(Machine::effective_cpuid()?)?;
        snapshot
            .chain()
            .iter()
            .try_for_each(|s| s.inner.memory.check_unchanged())?;
        // The peers of connections opened since the snapshot get their
        // reset now; the rewound guest gets one for each connection the
        // snapshot had open (see `docs/networking.md`).
        self.reset_connections_to(&snapshot.inner.connections);
        self.rewind(
            snapshot,
            &snapshot.inner.cpu,
            &snapshot.inner.guest,
            keep_preserved,
        )
    }
}

/// A snapshot chain is what an in-place rewind reads memory from.
impl MemorySource for Snapshot {
    type Error = SnapshotError;

    fn id(&self) -> SnapshotId {
        self.inner.id
    }

    fn page(&self, page: u64) -> Result<Option<&[u8]>, SnapshotError> {
        Snapshot::page(self, page)
    }

    fn refill(
        &self,
        ram: &mut Stopped<'_>,
        backing: Option<&Backing>,
    ) -> Result<(), SnapshotError> {
        let chain = self.chain();
        // A file-backed VM reads its backing image again after the discard.
        // If that image is the chain's root, it already holds the root's
        // pages; otherwise clear what it stores first.
        let mut skip = 0;
        let backing = backing.and_then(|b| {
            b.downcast_ref::<Snapshot>().or_else(|| {
                b.downcast_ref::<ondemand::OnDemandBacking>()
                    .map(|o| &o.snapshot)
            })
        });
        if let Some(backing) = backing {
            if backing.id() == chain[0].id() {
                skip = 1;
            } else {
                backing.inner.memory.zero_data_pages(ram)?;
            }
        }
        chain[skip..]
            .iter()
            .try_for_each(|s| s.inner.memory.apply(ram))
    }
}

/// Guest pages `vm` touched since it was restored: in fault order for a VM
/// restored on demand, in address order otherwise (the pages its memory
/// mapping holds).
pub(crate) fn touched_pages<D>(vm: &VmInstance<D>) -> Result<Vec<u64>, SnapshotError> {
    let present = vm
        .ram()
        .present_pages()
        .map_err(SnapshotError::io("reading /proc/self/pagemap", None))?;
    let Some(mut order) = ondemand::fault_order(vm) else {
        return Ok(present);
    };
    // The handler sees the first touch of each block; the other pages of a
    // block that had arrived were mapped without it: add them after.
    let mut seen = std::collections::HashSet::with_capacity(order.len());
    seen.extend(order.iter().copied());
    order.extend(present.into_iter().filter(|p| !seen.contains(p)));
    Ok(order)
}

/// Brings `pages` of `snapshot`'s memory in ahead of a restore (see
/// [`WorkingSet::prefetch`]).
pub(crate) fn prefetch_pages(snapshot: &Snapshot, pages: impl Iterator<Item = u64>) {
    let root = &snapshot.chain()[0].inner.memory;
    match root.on_demand() {
        Some(memory) => {
            memory.prefetch(pages);
        }
        None => root.prefetch(pages),
    }
}
