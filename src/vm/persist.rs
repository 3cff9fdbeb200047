//! The one seam between a VM and what saves and restores it.
//!
//! Shaped like Firecracker's `Persist`: [`VmInstance::save_guest`](crate::vm::Vm::save_guest) only
//! copies data out and cannot fail; restoring is a constructor
//! ([`VmInstance::from_saved`](crate::vm::Vm::from_saved)) that takes the saved state plus the live
//! resources it cannot serialize (the KVM objects, guest memory already
//! filled), or an in-place rewind ([`VmInstance::rewind`](crate::vm::Vm::rewind)) that takes the
//! saved state plus a [`MemorySource`] for the pages. The `snapshot` module
//! stores [`GuestState`], [`CpuState`] and a memory image and goes through
//! these functions only: it never touches a VM's fields, and `vm` does not
//! depend on `snapshot`.
//!
//! Saved state is untrusted input (a snapshot file can be tampered with and
//! rehashed): everything that aims a later host access — the input buffer,
//! the preserved regions, the function table — is validated here, with the
//! same rules the hypercalls enforce.

use std::any::Any;
use std::collections::HashMap;
use std::fmt;

use super::cpu::{CpuState, Registers};
use super::machine::Machine;
use super::TableId;
use super::{check_user_range, Extension, Generation, Vm, VmConfig, VmError, VmState};
use crate::abi::{PAGE_SIZE, USER_BASE};
use crate::sys::memory::{GuestRam, Stopped};

/// Identifies a snapshot; diffs name their base by it, and a VM tracks the
/// pages written since the snapshot with this id.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct SnapshotId(pub [u8; 16]);

impl SnapshotId {
    pub(crate) fn random() -> Result<Self, VmError> {
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

/// The host's view of a ready guest: what a snapshot stores besides memory
/// and vCPU registers.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct GuestState {
    /// Exported functions and their indices, sorted by index.
    pub(crate) functions: Vec<(String, u64)>,
    /// The identity of `functions` (see [`TableId`]): a VM that installs
    /// them takes it over. Not saved in snapshot files.
    pub(crate) function_table: TableId,
    pub(crate) input_buf: u64,
    pub(crate) input_cap: u64,
    pub(crate) heap_used: u64,
    pub(crate) invocations: u64,
    pub(crate) preserved: Vec<(u64, u64)>,
    pub(crate) resets_cpu: bool,
}

/// Where an in-place rewind takes guest memory from.
pub(crate) trait MemorySource {
    /// The error reading the source gives.
    type Error: From<VmError>;
    /// The id dirty tracking refers to.
    fn id(&self) -> SnapshotId;
    /// Guest page `page`: `Some(bytes)` for stored data, `None` for zeros.
    fn page(&self, page: u64) -> Result<Option<&[u8]>, Self::Error>;
    /// Fills all of `ram` after it was discarded (when it reads as the
    /// image `backing` maps, or as zeros without one).
    fn refill(&self, ram: &mut Stopped<'_>, backing: Option<&Backing>) -> Result<(), Self::Error>;
}

/// What a lazily restored VM's memory maps: kept alive as long as the VM,
/// opaque to `vm` (the `snapshot` module puts its `Snapshot` here).
pub(crate) type Backing = dyn Any + Send + Sync;

impl<X: Extension, D> Vm<X, D> {
    /// Copies the guest state out. Cannot fail.
    pub(crate) fn save_guest(&self) -> GuestState {
        let mut functions: Vec<(String, u64)> = self
            .functions
            .iter()
            .map(|(n, i)| (n.clone(), *i))
            .collect();
        functions.sort_by_key(|(_, index)| *index);
        GuestState {
            functions,
            function_table: self.function_table,
            input_buf: self.input_buf,
            input_cap: self.input_cap,
            heap_used: self.stats.heap_used,
            invocations: self.stats.invocations,
            preserved: self.preserved.clone(),
            resets_cpu: self.guest_resets_cpu,
        }
    }

    /// Reads the vCPU state. Unlike [`Self::save_guest`] this asks KVM
    /// (one ioctl per register class), which can fail. The VM must be
    /// ready: a poisoned VM's vCPU may be anywhere.
    pub(crate) fn save_cpu(&mut self) -> Result<CpuState, VmError> {
        if self.state != VmState::Ready {
            return Err(VmError::Poisoned {
                cause: self.poison_cause.to_string(),
            });
        }
        // RIP must be past the hypercall the vCPU stopped at.
        self.complete_pending_exit()?;
        CpuState::capture(self.machine.vcpu())
    }

    /// Guest memory (bounds-checked `vm-memory` accessors).
    pub(crate) fn ram(&self) -> &GuestRam {
        self.machine.ram()
    }

    /// Guest memory with the vCPU stopped, for capturing it: plain copies
    /// and slices, sound because `&mut self` keeps the vCPU out of
    /// `KVM_RUN` (and every other access out) while the token lives.
    pub(crate) fn stopped(&mut self) -> Stopped<'_> {
        self.machine.stopped()
    }

    /// The generation of this VM lifetime.
    pub(crate) fn saved_generation(&self) -> Generation {
        self.generation
    }

    /// SHA-256 of the guest program this VM runs.
    pub(crate) fn program_digest(&self) -> &[u8; 32] {
        &self.program_digest
    }

    /// Whether this VM tracks the pages written (its config asked for it).
    pub(crate) fn tracks_written_pages(&self) -> bool {
        self.dirty_tracking
    }

    /// The snapshot this VM's written pages are tracked against.
    pub(crate) fn tracking_base(&self) -> Option<SnapshotId> {
        self.base.filter(|_| self.dirty_tracking)
    }

    /// Starts tracking written pages against snapshot `id` (just captured
    /// from this VM, or just restored into it). A no-op without tracking.
    pub(crate) fn track_from(&mut self, id: SnapshotId) -> Result<(), VmError> {
        if self.dirty_tracking {
            self.machine.set_dirty_log(true)?;
            self.machine.take_dirty_log()?;
            self.clear_dirty();
            self.base = Some(id);
        }
        Ok(())
    }

    /// The pages written since snapshot `base` (for a diff), after which
    /// tracking continues against `next`.
    pub(crate) fn take_written_pages(&mut self) -> Result<Vec<u64>, VmError> {
        let pages = self.pending_dirty_pages()?;
        self.commit_dirty(&[])?;
        Ok(pages)
    }

    /// Keeps `backing` alive as long as this VM (the image its memory maps).
    pub(crate) fn set_backing(&mut self, backing: Box<Backing>) {
        self.backing = Some(backing);
    }

    /// The snapshot this VM was last restored from (or rewound to).
    pub(crate) fn restored_from(&self) -> Option<SnapshotId> {
        self.origin
    }

    /// What [`Self::set_backing`] gave this VM.
    pub(crate) fn backing(&self) -> Option<&Backing> {
        self.backing.as_deref()
    }

    /// The restore constructor: a ready VM around `machine`, whose memory
    /// already holds the saved image, with the saved vCPU and guest state.
    pub(crate) fn from_saved(
        mut machine: Machine,
        config: &VmConfig<D>,
        cpu: &CpuState,
        guest: &GuestState,
        tracked: SnapshotId,
    ) -> Result<Self, VmError>
    where
        D: Default,
    {
        let current = machine.cpuid.take();
        cpu.apply(machine.vcpu(), current.as_deref())?;
        machine.cpuid = Some(cpu.cpuid.clone());
        let mut vm = Self::from_machine(machine, config)?;
        vm.install_guest(guest)?;
        vm.track_from(tracked)?;
        vm.origin = Some(tracked);
        Ok(vm)
    }

    /// Rewinds this VM in place to saved state: memory from `source` (only
    /// the pages written since, when they are tracked against it), the vCPU
    /// to `cpu`, the guest to `guest`, keeping the preserved regions'
    /// bytes when `keep_preserved` (otherwise they are rewound like all
    /// memory).
    ///
    /// Failure-atomic: the VM is poisoned from the start until everything
    /// finished; written pages are forgotten only after all of them were
    /// rewound.
    pub(crate) fn rewind<S: MemorySource>(
        &mut self,
        source: &S,
        cpu: &CpuState,
        guest: &GuestState,
        keep_preserved: bool,
    ) -> Result<(), S::Error> {
        // Bytes the guest asked to keep, read before memory is rewound.
        let preserved = match keep_preserved {
            true => self.read_preserved()?,
            false => Vec::new(),
        };
        let was_ready = self.state == VmState::Ready;
        self.begin_replace("a restore did not finish");
        // A vCPU stopped in the middle of an instruction would finish it on
        // the next run, after the registers below were rewound.
        self.complete_pending_exit()?;
        if self.dirty_tracking && self.base == Some(source.id()) {
            self.rewind_written_pages(source)?;
        } else {
            // Memory is replaced wholesale: until that finished, nothing is
            // tracked against any snapshot.
            self.base = None;
            let mut ram = self.machine.stopped();
            ram.discard_all().map_err(|source| VmError::MapMemory {
                size: ram.size(),
                source,
            })?;
            source.refill(&mut ram, self.backing.as_deref())?;
            self.clear_dirty();
        }
        // A ready VM's vCPU is where a call left it: at CPL3, with only the
        // state CPL3 code can change (see `docs/architecture.md`). A
        // poisoned one may be anywhere: everything is restored.
        let registers = match (was_ready, guest.resets_cpu) {
            (true, true) => Registers::NoVector,
            (true, false) => Registers::UserMode,
            _ => Registers::All,
        };
        let (vcpu, current) = self.machine.vcpu_and_cpuid();
        cpu.apply_registers(vcpu, current, registers, Machine::sync_regs_supported())?;
        if self.machine.cpuid.as_deref() != Some(cpu.cpuid.as_slice()) {
            self.machine.cpuid = Some(cpu.cpuid.clone());
        }
        self.install_guest(guest)?;
        // Nothing of a call's host-side state outlives the rewind (a
        // transaction the guest left open, a pending host result).
        self.ext.before_reset();
        self.pending_host_result = None;
        self.write_preserved(preserved)?;
        if self.base != Some(source.id()) {
            self.track_from(source.id())?;
        }
        self.origin = Some(source.id());
        self.clear_poison();
        Ok(())
    }

    /// Rewinds only the pages written since the VM was last at `source`:
    /// the cost follows what the guest touched, not the memory size.
    fn rewind_written_pages<S: MemorySource>(&mut self, source: &S) -> Result<(), S::Error> {
        let pages = self.pending_dirty_pages()?;
        // Hot pages stay writable, so KVM reports them whether or not the
        // call wrote them. They are copied back unconditionally, except in
        // the resets that check them: then one found unchanged is protected
        // again — except the stack and ABI page below the program area,
        // which every call writes (often with the same bytes).
        let check = self.dirty.checks_hot();
        let mut demote = Vec::new();
        // The pages of the last `pending_dirty_pages` that stay writable
        // (hot), sorted.
        let hot = self.dirty.hot();
        let mut ram = self.machine.stopped();
        let outside = |addr: u64| VmError::MemoryOutOfRange {
            addr,
            len: PAGE_SIZE,
        };
        let zero = [0u8; PAGE_SIZE as usize];
        for page in pages {
            let addr = page * PAGE_SIZE;
            let wanted = source.page(page)?.unwrap_or(&zero);
            if check
                && addr >= USER_BASE
                && hot.binary_search(&page).is_ok()
                && ram.equals(addr, wanted).map_err(|_| outside(addr))?
            {
                demote.push(page);
                continue;
            }
            ram.copy_in(addr, wanted).map_err(|_| outside(addr))?;
        }
        self.commit_dirty(&demote)?;
        Ok(())
    }

    /// Installs saved guest state, validated as untrusted input, and gives
    /// the guest a new generation and fresh entropy before it runs again.
    fn install_guest(&mut self, guest: &GuestState) -> Result<(), VmError> {
        let invalid = |reason| VmError::InvalidGuestState { reason };
        // The buffer the host writes every request into must be memory
        // the guest could write itself.
        check_user_range(self.memory_size(), guest.input_buf, guest.input_cap)
            .map_err(|_| invalid("input buffer outside the guest's user memory"))?;
        // The same program can export its functions in another order or
        // under other names in another snapshot: compare the whole table
        // (a lookup per function), never just its size. A reset to the
        // snapshot last installed carries the very table installed then:
        // one comparison of the lists, no lookups.
        let cached =
            !self.installed_functions.is_empty() && self.installed_functions == guest.functions;
        if !cached {
            let same_table = self.functions.len() == guest.functions.len()
                && guest
                    .functions
                    .iter()
                    .all(|(name, index)| self.functions.get(name) == Some(index));
            if !same_table {
                let table: HashMap<String, u64> = guest.functions.iter().cloned().collect();
                if table.len() != guest.functions.len() {
                    return Err(invalid("a function name appears twice"));
                }
                self.functions = table;
            }
            self.installed_functions.clone_from(&guest.functions);
        }
        // The table now equals the one `guest` names.
        self.function_table = guest.function_table;
        if self.preserved != guest.preserved {
            // Preserved regions must fit this VM's limits, as they would
            // have to when the guest asked (`Preserve`).
            let total = guest
                .preserved
                .iter()
                .fold(0u64, |sum, &(_, len)| sum.saturating_add(len));
            let outside = guest.preserved.iter().any(|&(addr, len)| {
                addr < USER_BASE || len == 0 || addr.saturating_add(len) > self.heap_end
            });
            if outside
                || total > self.max_preserved
                || guest.preserved.len() > super::MAX_PRESERVED_REGIONS
            {
                return Err(invalid("preserved regions exceed this VM's limits"));
            }
            self.preserved = guest.preserved.clone();
        }
        self.input_buf = guest.input_buf;
        self.input_cap = guest.input_cap;
        self.stats.heap_used = guest.heap_used;
        self.stats.invocations = guest.invocations;
        self.guest_resets_cpu = guest.resets_cpu;
        self.new_generation()
    }

    fn read_preserved(&self) -> Result<Vec<(u64, Vec<u8>)>, VmError> {
        self.preserved
            .iter()
            .map(|&(addr, len)| {
                let bytes = self.machine.ram().read_vec(addr, len).map_err(|e| {
                    VmError::MemoryOutOfRange {
                        addr: e.addr,
                        len: e.len,
                    }
                })?;
                Ok((addr, bytes))
            })
            .collect()
    }

    fn write_preserved(&mut self, preserved: Vec<(u64, Vec<u8>)>) -> Result<(), VmError> {
        for (addr, bytes) in preserved {
            self.machine
                .ram()
                .write(addr, &bytes)
                .map_err(|e| VmError::MemoryOutOfRange {
                    addr: e.addr,
                    len: e.len,
                })?;
            self.note_host_write(addr, bytes.len() as u64);
        }
        Ok(())
    }
}
