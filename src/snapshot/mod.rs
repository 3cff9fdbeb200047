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

mod cpu;
mod error;
mod file;
mod image;
mod pool;
mod stored;

use std::fmt;
use std::sync::Arc;

pub use error::SnapshotError;
#[doc(hidden)]
pub use file::fuzz_load;
pub use pool::ShellPool;

use crate::vm::machine::Machine;
use crate::vm::memory::GuestRam;
use crate::vm::{Generation, VmConfig, VmError, VmInstance, VmState};
use cpu::CpuState;
use image::MemoryImage;

/// Identifies a snapshot; diffs name their base by it.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    fn random() -> Result<Self, SnapshotError> {
        let mut id = [0u8; 16];
        getrandom::fill(&mut id).map_err(|e| VmError::Entropy(e.into()))?;
        Ok(Self(id))
    }
}

impl fmt::Display for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl fmt::Debug for SnapshotId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SnapshotId({self})")
    }
}

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

/// The host's view of a ready guest.
#[derive(Clone, Debug)]
pub(crate) struct GuestState {
    pub(crate) functions: Vec<(String, u64)>,
    pub(crate) input_buf: u64,
    pub(crate) input_cap: u64,
    pub(crate) heap_used: u64,
    pub(crate) invocations: u64,
    pub(crate) preserved: Vec<(u64, u64)>,
    pub(crate) resets_cpu: bool,
}

pub(crate) struct Inner {
    pub(crate) id: SnapshotId,
    pub(crate) base: Option<Snapshot>,
    pub(crate) program_digest: [u8; 32],
    pub(crate) generation: Generation,
    pub(crate) cpu: CpuState,
    pub(crate) guest: GuestState,
    pub(crate) memory: MemoryImage,
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
        for s in self.chain().into_iter().rev() {
            if let Some(found) = s.inner.memory.page(page)? {
                return Ok(found);
            }
        }
        Ok(None)
    }

    /// Checks that a VM built from `config` can take this snapshot's state.
    fn check_restorable(&self, config: &VmConfig) -> Result<(), SnapshotError> {
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
        let (ram, rest) = match strategy {
            RestoreStrategy::Eager => (GuestRam::new(size).map_err(map_err)?, &chain[..]),
            RestoreStrategy::Lazy => {
                let root = &chain[0].inner.memory;
                root.verify_all()?;
                (
                    GuestRam::with_backing(size, root.backing()).map_err(map_err)?,
                    &chain[1..],
                )
            }
        };
        rest.iter().try_for_each(|s| s.inner.memory.apply(&ram))?;
        Ok(ram)
    }

    /// Turns `machine` (memory already holding the snapshot) into a ready VM.
    fn finish_restore(
        &self,
        mut machine: Machine,
        config: &VmConfig,
    ) -> Result<VmInstance, SnapshotError> {
        let current = machine.cpuid.take();
        self.inner
            .cpu
            .apply(&mut machine.vcpu, current.as_deref())?;
        machine.cpuid = Some(self.inner.cpu.cpuid.clone());
        let mut vm = VmInstance::from_machine(machine, config);
        self.install_guest_state(&mut vm)?;
        if config.dirty_tracking_enabled() {
            vm.machine.take_dirty_log()?;
            vm.clear_dirty();
            vm.base = Some(self.id());
        }
        Ok(vm)
    }

    fn install_guest_state(&self, vm: &mut VmInstance) -> Result<(), SnapshotError> {
        let guest = &self.inner.guest;
        // The snapshot is input: the buffer the host will write every
        // request into must be memory the guest could write itself.
        crate::vm::check_user_range(vm.memory_size(), guest.input_buf, guest.input_cap).map_err(
            |_| SnapshotError::Malformed {
                section: "guest state",
                reason: "input buffer outside the guest's user memory",
            },
        )?;
        // The same program can export its functions in another order or
        // under other names in another snapshot: compare the whole table
        // (cheap: a lookup per function), never just its size.
        let same_table = vm.functions.len() == guest.functions.len()
            && guest
                .functions
                .iter()
                .all(|(name, index)| vm.functions.get(name) == Some(index));
        if !same_table {
            let table: std::collections::HashMap<String, u64> =
                guest.functions.iter().cloned().collect();
            if table.len() != guest.functions.len() {
                return Err(SnapshotError::Malformed {
                    section: "guest state",
                    reason: "a function name appears twice",
                });
            }
            vm.functions = table;
        }
        vm.input_buf = guest.input_buf;
        vm.input_cap = guest.input_cap;
        vm.stats.heap_used = guest.heap_used;
        vm.stats.invocations = guest.invocations;
        vm.program_digest = self.inner.program_digest;
        if vm.preserved != guest.preserved {
            // The snapshot is input: its preserved regions must fit this
            // VM's limits, as they would have to when the guest asked.
            let total: u64 = guest.preserved.iter().map(|&(_, len)| len).sum();
            let outside = guest.preserved.iter().any(|&(addr, len)| {
                addr < crate::abi::USER_BASE
                    || len == 0
                    || addr.saturating_add(len) > vm.memory_size()
            });
            if outside
                || total > vm.max_preserved
                || guest.preserved.len() > crate::vm::MAX_PRESERVED_REGIONS
            {
                return Err(SnapshotError::Malformed {
                    section: "guest state",
                    reason: "preserved regions exceed this VM's limits",
                });
            }
            vm.preserved = guest.preserved.clone();
        }
        vm.guest_resets_cpu = guest.resets_cpu;
        // Fresh entropy and a new generation before any guest instruction.
        vm.new_generation()?;
        Ok(())
    }
}

impl VmInstance {
    /// Captures this VM. It must be ready (not poisoned); it stays ready and
    /// unchanged.
    pub fn snapshot(&mut self) -> Result<Snapshot, SnapshotError> {
        let memory = MemoryImage::capture_full(&self.machine.ram)?;
        self.capture(memory, None)
    }

    /// Captures only the pages written since `base` was taken from (or
    /// restored into) this VM, plus the complete vCPU and guest state.
    /// Needs [`VmConfig::dirty_tracking`]. The next diff is taken against
    /// the snapshot this call returns.
    pub fn snapshot_diff(&mut self, base: &Snapshot) -> Result<Snapshot, SnapshotError> {
        if self.base != Some(base.id()) || !self.dirty_tracking {
            return Err(SnapshotError::NotTracking { base: base.id() });
        }
        if self.state != VmState::Ready {
            return Err(SnapshotError::NotReady);
        }
        let pages = self.dirty_pages()?;
        let memory = MemoryImage::capture_pages(&self.machine.ram, pages.into_iter())?;
        self.capture(memory, Some(base.clone()))
    }

    /// The pages written since the dirty log was last taken (guest writes
    /// from KVM's log, host writes recorded by the VM, and the ABI page).
    fn dirty_pages(&mut self) -> Result<Vec<u64>, SnapshotError> {
        let pages = self.pending_dirty_pages()?;
        self.commit_dirty(&[])?;
        Ok(pages)
    }

    fn capture(
        &mut self,
        memory: MemoryImage,
        base: Option<Snapshot>,
    ) -> Result<Snapshot, SnapshotError> {
        if self.state != VmState::Ready {
            return Err(SnapshotError::NotReady);
        }
        let cpu = CpuState::capture(&mut self.machine.vcpu)?;
        let mut functions: Vec<(String, u64)> = self
            .functions
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        functions.sort_by_key(|(_, index)| *index);
        let inner = Inner {
            id: SnapshotId::random()?,
            base,
            program_digest: self.program_digest,
            generation: self.generation,
            cpu,
            guest: GuestState {
                functions,
                input_buf: self.input_buf,
                input_cap: self.input_cap,
                heap_used: self.stats.heap_used,
                invocations: self.stats.invocations,
                preserved: self.preserved.clone(),
                resets_cpu: self.guest_resets_cpu,
            },
            memory,
        };
        if self.dirty_tracking {
            // Start tracking against the new snapshot.
            self.machine.set_dirty_log(true)?;
            self.machine.take_dirty_log()?;
            self.clear_dirty();
            self.base = Some(inner.id);
        }
        Ok(Snapshot {
            inner: Arc::new(inner),
        })
    }

    /// Builds a new VM from `snapshot` with the default
    /// [`RestoreStrategy`]. The config supplies the limits and host
    /// functions; its program and memory size must match the snapshot's.
    pub fn restore(config: &VmConfig, snapshot: &Snapshot) -> Result<VmInstance, SnapshotError> {
        Self::restore_with(config, snapshot, RestoreStrategy::default())
    }

    /// Builds a new VM from `snapshot` with the given memory strategy.
    pub fn restore_with(
        config: &VmConfig,
        snapshot: &Snapshot,
        strategy: RestoreStrategy,
    ) -> Result<VmInstance, SnapshotError> {
        snapshot.check_restorable(config)?;
        let ram = snapshot.build_ram(strategy)?;
        let machine = Machine::create(ram, config.dirty_tracking_enabled())?;
        let mut vm = snapshot.finish_restore(machine, config)?;
        if strategy == RestoreStrategy::Lazy {
            vm.backing = Some(snapshot.chain()[0].clone());
        }
        Ok(vm)
    }

    /// Rewinds this VM to `snapshot` in place, keeping its KVM objects. A
    /// poisoned VM becomes ready again.
    ///
    /// Failure-atomic: the VM is poisoned from the moment the rewind starts
    /// until it finished, so a restore that fails (a corrupt memory block,
    /// a KVM error) leaves a VM that refuses calls, never one that claims
    /// to be ready with half-rewound memory. Pages written since the last
    /// reset are forgotten only after all of them were rewound, so a
    /// retried restore rewinds them all.
    pub fn restore_in_place(&mut self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        if snapshot.memory_size() != self.memory_size() {
            return Err(SnapshotError::MemorySizeMismatch {
                snapshot: snapshot.memory_size(),
                config: self.memory_size(),
            });
        }
        if snapshot.inner.program_digest != self.program_digest {
            return Err(SnapshotError::ProgramMismatch);
        }
        // The same check a fresh restore makes (cached per snapshot).
        snapshot
            .inner
            .cpu
            .check_compatible(Machine::effective_cpuid()?)?;
        let chain = snapshot.chain();
        chain
            .iter()
            .try_for_each(|s| s.inner.memory.check_unchanged())?;
        // Bytes the guest asked to keep, read before memory is rewound.
        let preserved = self.read_preserved()?;
        let was_ready = self.state == VmState::Ready;
        self.begin_replace("a restore");
        self.rewind(snapshot, &chain, was_ready)?;
        self.write_preserved(preserved)?;
        if self.dirty_tracking && self.base != Some(snapshot.id()) {
            self.machine.set_dirty_log(true)?;
            self.machine.take_dirty_log()?;
            self.clear_dirty();
            self.base = Some(snapshot.id());
        }
        self.clear_poison();
        Ok(())
    }

    /// The body of [`Self::restore_in_place`]: memory, vCPU and guest state.
    fn rewind(
        &mut self,
        snapshot: &Snapshot,
        chain: &[&Snapshot],
        was_ready: bool,
    ) -> Result<(), SnapshotError> {
        // A vCPU stopped in the middle of an instruction would finish it on
        // the next run, after the registers below were rewound.
        self.complete_pending_exit()?;
        if self.dirty_tracking && self.base == Some(snapshot.id()) {
            self.reset_dirty_pages(snapshot)?;
        } else {
            // Memory is discarded wholesale: until this finished, nothing
            // is tracked against any snapshot.
            self.base = None;
            self.reset_all_pages(chain)?;
        }
        // A ready VM's vCPU is where a call left it: at CPL3, with only the
        // state CPL3 code can change. A poisoned one may be anywhere.
        let registers = match (was_ready, snapshot.inner.guest.resets_cpu) {
            (true, true) => cpu::Registers::NoVector,
            (true, false) => cpu::Registers::UserMode,
            _ => cpu::Registers::All,
        };
        let current = self.machine.cpuid.as_deref();
        snapshot.inner.cpu.apply_registers(
            &mut self.machine.vcpu,
            current,
            registers,
            Machine::sync_regs_supported(),
        )?;
        self.machine.cpuid = Some(snapshot.inner.cpu.cpuid.clone());
        snapshot.install_guest_state(self)
    }

    /// Rewinds only the pages written since the VM was last at `snapshot`:
    /// the cost follows what the guest touched, not the memory size.
    fn reset_dirty_pages(&mut self, snapshot: &Snapshot) -> Result<(), SnapshotError> {
        let pages = self.pending_dirty_pages()?;
        let hot = self.hot_pages().to_vec();
        let mut demote = Vec::new();
        let ram = &self.machine.ram;
        let outside = || SnapshotError::Malformed {
            section: "memory",
            reason: "dirty page outside guest memory",
        };
        let zero = [0u8; crate::abi::PAGE_SIZE as usize];
        let mut current = [0u8; crate::abi::PAGE_SIZE as usize];
        for page in pages {
            let addr = page * crate::abi::PAGE_SIZE;
            let wanted = snapshot.page(page)?.unwrap_or(&zero);
            // A hot page stays writable, so KVM reports it whether or not
            // the call wrote it: one found unchanged is protected again —
            // except the stack and ABI page below the program area, which
            // every call writes (often with the same bytes).
            if addr >= crate::abi::USER_BASE && hot.binary_search(&page).is_ok() {
                ram.read(addr, &mut current).map_err(|_| outside())?;
                if current[..] == wanted[..] {
                    demote.push(page);
                    continue;
                }
            }
            ram.copy_in(addr, wanted).map_err(|_| outside())?;
        }
        self.commit_dirty(&demote)?;
        Ok(())
    }

    /// Rewinds all of memory to the snapshot chain.
    fn reset_all_pages(&mut self, chain: &[&Snapshot]) -> Result<(), SnapshotError> {
        let ram = &self.machine.ram;
        ram.discard_all().map_err(|source| VmError::MapMemory {
            size: ram.size(),
            source,
        })?;
        // A file-backed VM reads its backing image again after the discard.
        // If that image is the chain's root, it already holds the root's
        // pages; otherwise clear what it stores first.
        let mut skip = 0;
        if let Some(backing) = &self.backing {
            if backing.id() == chain[0].id() {
                skip = 1;
            } else {
                backing.inner.memory.zero_data_pages(ram)?;
            }
        }
        chain[skip..]
            .iter()
            .try_for_each(|s| s.inner.memory.apply(ram))?;
        self.clear_dirty();
        Ok(())
    }

    fn read_preserved(&self) -> Result<Vec<(u64, Vec<u8>)>, SnapshotError> {
        self.preserved
            .iter()
            .map(|&(addr, len)| {
                let bytes =
                    self.machine
                        .ram
                        .read_vec(addr, len)
                        .map_err(|_| SnapshotError::Malformed {
                            section: "guest state",
                            reason: "preserved region outside guest memory",
                        })?;
                Ok((addr, bytes))
            })
            .collect()
    }

    fn write_preserved(&mut self, preserved: Vec<(u64, Vec<u8>)>) -> Result<(), SnapshotError> {
        for (addr, bytes) in preserved {
            self.machine
                .ram
                .write(addr, &bytes)
                .map_err(|_| SnapshotError::Malformed {
                    section: "guest state",
                    reason: "preserved region outside guest memory",
                })?;
            self.note_host_write(addr, bytes.len() as u64);
        }
        Ok(())
    }
}
