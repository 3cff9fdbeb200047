//! Checkpoints inside a call: the VM's state at one point of a running
//! call, and the rewind back to it. The core offers them to its
//! extensions (transactions take one at `TxBegin`; see
//! `policy::Transaction`).
//!
//! A checkpoint is cheap because the VM already tracks the pages written
//! since its base snapshot (the dirty log of `ManagedVm` resets):
//!
//! - at the checkpoint the host copies only the pages written since the
//!   base (`S0`: the request's input, the stack, what the function wrote
//!   before, the pages recent calls keep writing);
//! - to rewind, every page KVM's log reports written since the tracker's
//!   last commit, plus the host's writes since the checkpoint, is copied
//!   back: from that copy if it is in `S0`, otherwise from the base
//!   snapshot, where it still holds the base's bytes (it was not written
//!   since the base, before the checkpoint). The rewound pages stay in the
//!   tracker's set, so the next reset to the base rewinds them as usual.
//!
//! Nothing is write-protected after a checkpoint: protecting `S0` would
//! make each attempt fault on the pages it writes again (a page fault costs
//! more than copying a 4 KiB page back), so a rewind copies all of `S0`
//! (small after a reset) plus what the attempts wrote.
//!
//! The vCPU state is a [`UserCpu`]: registers, segment state, flags and
//! vector state (what CPL3 code can change) and the pending events.

use super::abi_page::RET;
use super::cpu::UserCpu;
use super::error::VmError;
use super::machine::Machine;
use super::persist::MemorySource;
use super::{CallData, Extension, HostCaller, Vm, VmState};
use crate::abi::{ABI_PAGE_ADDR, PAGE_SIZE};

/// The VM's state at one point of a running call, taken by the core for
/// an extension (transactions take one at `TxBegin`). Opaque.
pub struct Checkpoint {
    cpu: UserCpu,
    /// Pages written since the base snapshot at the checkpoint (sorted),
    /// and their bytes, one page after the other.
    pages: Vec<u64>,
    data: Vec<u8>,
    /// The tracker's host-write mark at the checkpoint.
    host_mark: usize,
    preserved: Vec<(u64, u64)>,
    /// The snapshot the VM tracked against.
    base: super::SnapshotId,
}

impl<X: Extension, D> Vm<X, D> {
    /// Whether this VM can take a checkpoint: it tracks its written pages
    /// against a base snapshot.
    pub(crate) fn can_checkpoint(&self) -> bool {
        self.dirty_tracking && self.base.is_some()
    }

    /// Takes a checkpoint of the running call (in a hypercall the vCPU is
    /// stopped at). Fails if the VM [cannot](Self::can_checkpoint).
    pub(crate) fn checkpoint(&mut self) -> Result<Checkpoint, VmError> {
        let Some(base) = self.base.filter(|_| self.dirty_tracking) else {
            return Err(VmError::InvalidGuestState {
                reason: "a checkpoint needs dirty tracking against a base snapshot",
            });
        };
        let log = self.machine.peek_dirty_log()?;
        self.dirty.absorb(&log);
        let pages = self.dirty.pending(ABI_PAGE_ADDR / PAGE_SIZE, PAGE_SIZE);
        let mut data = vec![0u8; pages.len() * PAGE_SIZE as usize];
        for (page, bytes) in pages.iter().zip(data.chunks_exact_mut(PAGE_SIZE as usize)) {
            self.machine
                .ram()
                .read(page * PAGE_SIZE, bytes)
                .map_err(|e| VmError::MemoryOutOfRange {
                    addr: e.addr,
                    len: e.len,
                })?;
        }
        // RIP past the hypercall, or a rewind would issue it again.
        self.complete_pending_exit()?;
        let cpu = UserCpu::capture(self.machine.vcpu(), !self.guest_resets_cpu)?;
        Ok(Checkpoint {
            cpu,
            pages,
            data,
            host_mark: self.dirty.host_mark(),
            preserved: self.preserved.clone(),
            base,
        })
    }

    /// Rewinds the VM to `checkpoint`: memory, vCPU, preserved regions,
    /// and writes `ret` as the result of the hypercall the checkpoint was
    /// taken in. `base` must be the snapshot the VM tracks against. The VM
    /// stays marked poisoned until [`Self::resume_call`] finished the call.
    pub(crate) fn rewind_to_checkpoint<S: MemorySource>(
        &mut self,
        checkpoint: &Checkpoint,
        base: &S,
        ret: &[u64],
    ) -> Result<(), S::Error> {
        if checkpoint.base != base.id() || self.base != Some(base.id()) || !self.dirty_tracking {
            return Err(VmError::InvalidGuestState {
                reason: "the checkpoint was not taken against this base snapshot",
            }
            .into());
        }
        // Stopped anywhere (a timeout, a fault): everything is restored.
        let anywhere = self.state == VmState::Poisoned;
        self.begin_replace("a rewind to a checkpoint did not finish");
        self.complete_pending_exit()?;
        self.rewind_checkpoint_pages(checkpoint, base)?;
        checkpoint.cpu.apply(
            self.machine.vcpu(),
            anywhere,
            Machine::sync_regs_supported(),
        )?;
        self.preserved.clone_from(&checkpoint.preserved);
        self.pending_host_result = None;
        self.write_words(RET, ret)?;
        Ok(())
    }

    fn rewind_checkpoint_pages<S: MemorySource>(
        &mut self,
        checkpoint: &Checkpoint,
        base: &S,
    ) -> Result<(), S::Error> {
        let log = self.machine.peek_dirty_log()?;
        self.dirty.absorb(&log);
        let mut pages = vec![ABI_PAGE_ADDR / PAGE_SIZE];
        for (i, &word) in log.iter().enumerate() {
            let mut bits = word;
            while bits != 0 {
                pages.push(i as u64 * 64 + u64::from(bits.trailing_zeros()));
                bits &= bits - 1;
            }
        }
        for &(addr, len) in self.dirty.host_since(checkpoint.host_mark) {
            let last = addr.saturating_add(len - 1) / PAGE_SIZE;
            pages.extend(addr / PAGE_SIZE..=last);
        }
        pages.sort_unstable();
        pages.dedup();
        let mut ram = self.machine.stopped();
        let zero = [0u8; PAGE_SIZE as usize];
        let size = PAGE_SIZE as usize;
        for page in pages {
            let bytes = match checkpoint.pages.binary_search(&page) {
                Ok(i) => &checkpoint.data[i * size..(i + 1) * size],
                Err(_) => base.page(page)?.unwrap_or(&zero),
            };
            let addr = page * PAGE_SIZE;
            ram.copy_in(addr, bytes)
                .map_err(|_| VmError::MemoryOutOfRange {
                    addr,
                    len: PAGE_SIZE,
                })?;
        }
        Ok(())
    }

    /// Runs a call rewound to a checkpoint on to its end and returns its
    /// output, as `invoke` does (the same end-of-call bookkeeping).
    pub(crate) fn resume_call(&mut self, call_data: CallData<'_>) -> Result<Vec<u8>, VmError> {
        self.log_used = 0;
        let result = self.finish_call(call_data);
        let (ptr, len) = self.finish(result)?;
        let mut out = vec![0; len as usize];
        self.read_output(ptr, &mut out)?;
        Ok(out)
    }

    /// Runs host functions now, outside any guest call (calls an extension
    /// held back), in order; returns how many ran and the failures
    /// (function name, message). A host function that panics counts as a
    /// failure; an unknown name is skipped.
    pub(crate) fn run_host_calls(
        &mut self,
        calls: Vec<(String, Vec<u8>)>,
        mut call_data: CallData<'_>,
    ) -> (usize, Vec<(String, String)>) {
        let count = calls.len();
        let mut failures = Vec::new();
        let function =
            super::hypercall::current_function_name(&self.functions, self.current_function);
        for (name, input) in calls {
            let Some(f) = self.host_functions.get(&name).cloned() else {
                continue;
            };
            let mut caller = HostCaller {
                function,
                generation: self.generation,
                deadline: None,
                data: &mut self.data,
                call_data: call_data.as_deref_mut(),
            };
            let outcome =
                std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&mut caller, &input)));
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failures.push((name, e.to_string())),
                Err(_) => failures.push((name, "the host function panicked".into())),
            }
        }
        (count - failures.len(), failures)
    }
}
