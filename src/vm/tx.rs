//! Transactions inside a call: the `TxBegin`/`TxEnd` hypercalls, the
//! checkpoint taken at `TxBegin` and the rewind back to it.
//!
//! The checkpoint is cheap because the VM already tracks the pages written
//! since its base snapshot (the dirty log of `ManagedVm` resets):
//!
//! - at `TxBegin` the host copies only the pages written since the base
//!   (`S0`: the request's input, the stack, what the function wrote before
//!   `begin`, the pages recent calls keep writing);
//! - to rewind, every page KVM's log reports written since the tracker's
//!   last commit, plus the host's writes since `begin`, is copied back:
//!   from that copy if it is in `S0`, otherwise from the base snapshot,
//!   where it still holds the base's bytes (it was not written since the
//!   base, before `begin`). The rewound pages stay in the tracker's set, so
//!   the next reset to the base rewinds them as usual.
//!
//! Nothing is write-protected during a transaction: protecting `S0` at
//! `begin` would make each attempt fault on the pages it writes again (a
//! page fault costs more than copying a 4 KiB page back), so a rewind
//! copies all of `S0` (small after a reset) plus what the attempts wrote.
//!
//! The vCPU state is a [`UserCpu`]: registers, segment state, flags and
//! vector state (what CPL3 code can change) and the pending events.

use super::abi_page::{bad, check_user_range, read_str, ARGS, RET};
use super::cpu::UserCpu;
use super::error::{TxFault, VmError};
use super::machine::Machine;
use super::persist::MemorySource;
use super::{CallData, HostCaller, VmInstance, VmState};
use crate::abi::{self, ABI_PAGE_ADDR, PAGE_SIZE};

/// Most deferred host calls buffered in one attempt.
pub const MAX_DEFERRED_CALLS: usize = 1024;

/// How the guest ended its transaction (`tx::commit` / `tx::abort`).
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum TxEnd {
    /// `tx::commit`.
    Committed,
    /// `tx::abort(reason)`, with the reason (truncated to the VM's message
    /// limit, invalid UTF-8 replaced).
    Aborted(String),
}

/// Where the call is in the transaction protocol.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) enum Phase {
    /// No transaction began in this call.
    #[default]
    None,
    /// Between `TxBegin` and `TxEnd`.
    Open,
    /// After `TxEnd`.
    Ended,
}

/// The state at `TxBegin`.
struct Checkpoint {
    cpu: UserCpu,
    /// Pages written since the base snapshot when the transaction began
    /// (sorted), and their bytes, one page after the other.
    pages: Vec<u64>,
    data: Vec<u8>,
    /// The tracker's host-write mark at `TxBegin`.
    host_mark: usize,
    preserved: Vec<(u64, u64)>,
}

/// A deferred host call recorded during an attempt.
pub(crate) struct Deferred {
    name: String,
    input: Vec<u8>,
}

/// The transaction state of the current call.
#[derive(Default)]
pub(super) struct TxCall {
    /// A transaction runner drives this call: take a checkpoint at
    /// `TxBegin`, buffer deferred host calls.
    armed: bool,
    pub(super) phase: Phase,
    end: Option<TxEnd>,
    attempt: u64,
    checkpoint: Option<Box<Checkpoint>>,
    deferred: Vec<Deferred>,
    /// Input bytes buffered in `deferred`.
    deferred_bytes: u64,
}

impl TxCall {
    /// Deferred host calls are being buffered: an attempt is in progress.
    pub(super) fn recording(&self) -> bool {
        self.armed && self.checkpoint.is_some()
    }

    /// Forgets the previous call's transaction (at the start of a call).
    pub(super) fn new_call(&mut self) {
        self.phase = Phase::None;
        self.end = None;
        self.attempt = 0;
        self.checkpoint = None;
        self.deferred.clear();
        self.deferred_bytes = 0;
    }
}

impl VmInstance {
    /// `TxBegin`: opens the call's transaction and, under a runner,
    /// checkpoints the VM.
    pub(super) fn hypercall_tx_begin(&mut self) -> Result<(), VmError> {
        match self.tx.phase {
            Phase::Open => return Err(VmError::Transaction(TxFault::Nested)),
            Phase::Ended => return Err(VmError::Transaction(TxFault::SecondTransaction)),
            Phase::None => {}
        }
        self.tx.phase = Phase::Open;
        self.tx.attempt = 1;
        self.write_words(RET, &[1])?;
        if self.tx.armed && self.dirty_tracking && self.base.is_some() {
            let checkpoint = self.checkpoint()?;
            self.tx.checkpoint = Some(Box::new(checkpoint));
        }
        Ok(())
    }

    fn checkpoint(&mut self) -> Result<Checkpoint, VmError> {
        let log = self.machine.peek_dirty_log()?;
        self.dirty.absorb(&log);
        let pages = self.dirty.pending(ABI_PAGE_ADDR / PAGE_SIZE, PAGE_SIZE);
        let mut data = vec![0u8; pages.len() * PAGE_SIZE as usize];
        for (page, bytes) in pages.iter().zip(data.chunks_exact_mut(PAGE_SIZE as usize)) {
            self.machine
                .ram
                .read(page * PAGE_SIZE, bytes)
                .map_err(|e| VmError::MemoryOutOfRange {
                    addr: e.addr,
                    len: e.len,
                })?;
        }
        // RIP past the `TxBegin` hypercall, or a rewind would issue it again.
        self.complete_pending_exit()?;
        let cpu = UserCpu::capture(&mut self.machine.vcpu, !self.guest_resets_cpu)?;
        Ok(Checkpoint {
            cpu,
            pages,
            data,
            host_mark: self.dirty.host_mark(),
            preserved: self.preserved.clone(),
        })
    }

    /// `TxEnd`: closes the transaction with the guest's outcome.
    pub(super) fn hypercall_tx_end(&mut self) -> Result<(), VmError> {
        if self.tx.phase != Phase::Open {
            return Err(VmError::Transaction(TxFault::EndWithoutBegin));
        }
        let [outcome, ptr, len] = self.read_words::<3>(ARGS)?;
        let end = match outcome {
            abi::TX_COMMIT => TxEnd::Committed,
            abi::TX_ABORT => {
                check_user_range(self.memory_size(), ptr, len).map_err(|e| bad("TxEnd", e))?;
                let len = len.min(self.limits.message);
                let reason = read_str(&self.machine.ram, ptr, len, len, true)
                    .map_err(|e| bad("TxEnd", e))?;
                TxEnd::Aborted(reason)
            }
            other => return Err(VmError::Transaction(TxFault::BadOutcome(other))),
        };
        self.tx.phase = Phase::Ended;
        self.tx.end = Some(end);
        Ok(())
    }

    /// Records a call to deferred host function `name` during an attempt;
    /// returns the status and result the guest gets now.
    pub(super) fn defer_host_call(&mut self, name: String, input: Vec<u8>) -> (u64, Vec<u8>) {
        let bytes = self.tx.deferred_bytes.saturating_add(input.len() as u64);
        if self.tx.deferred.len() >= MAX_DEFERRED_CALLS || bytes > self.limits.host_call_input {
            let message = format!(
                "the deferred host calls of one transaction attempt exceed {MAX_DEFERRED_CALLS} \
                 calls or {} input bytes",
                self.limits.host_call_input
            );
            return (abi::HOST_CALL_FAILED, message.into_bytes());
        }
        self.tx.deferred_bytes = bytes;
        self.tx.deferred.push(Deferred { name, input });
        (abi::HOST_CALL_OK, Vec::new())
    }

    /// Lets the next call's `TxBegin` checkpoint the VM (on) or not (off;
    /// this also drops any checkpoint and buffered deferred calls).
    pub(crate) fn tx_arm(&mut self, on: bool) {
        self.tx.armed = on;
        if !on {
            self.tx.new_call();
        }
    }

    /// How the guest ended the last attempt's transaction, if it did.
    pub(crate) fn tx_end(&self) -> Option<&TxEnd> {
        self.tx.end.as_ref()
    }

    /// Whether the current call took a checkpoint it can be rewound to.
    pub(crate) fn tx_checkpointed(&self) -> bool {
        self.tx.checkpoint.is_some()
    }

    /// Rewinds the VM to the call's checkpoint: memory, vCPU, preserved
    /// regions; drops the attempt's deferred calls and tells the guest the
    /// next attempt number. `base` must be the snapshot the VM tracks
    /// against. The VM stays marked poisoned until [`Self::tx_resume`]
    /// finished the next attempt.
    pub(crate) fn tx_rewind<S: MemorySource>(&mut self, base: &S) -> Result<(), S::Error> {
        if self.tx.checkpoint.is_none() || self.base != Some(base.id()) || !self.dirty_tracking {
            return Err(VmError::InvalidGuestState {
                reason: "no transaction checkpoint to rewind to",
            }
            .into());
        }
        // Stopped anywhere (a timeout, a fault): everything is restored.
        let anywhere = self.state == VmState::Poisoned;
        self.begin_replace("a transaction rewind did not finish");
        self.complete_pending_exit()?;
        self.rewind_attempt_pages(base)?;
        let checkpoint = self.tx.checkpoint.as_ref().expect("checked above");
        checkpoint.cpu.apply(
            &mut self.machine.vcpu,
            anywhere,
            Machine::sync_regs_supported(),
        )?;
        self.preserved.clone_from(&checkpoint.preserved);
        self.tx.attempt += 1;
        self.tx.phase = Phase::Open;
        self.tx.end = None;
        self.tx.deferred.clear();
        self.tx.deferred_bytes = 0;
        self.pending_host_result = None;
        self.write_words(RET, &[self.tx.attempt])?;
        Ok(())
    }

    fn rewind_attempt_pages<S: MemorySource>(&mut self, base: &S) -> Result<(), S::Error> {
        let log = self.machine.peek_dirty_log()?;
        self.dirty.absorb(&log);
        let checkpoint = self.tx.checkpoint.as_ref().expect("checked by the caller");
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
        let ram = &self.machine.ram;
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

    /// Runs the rewound call on to its end (the next attempt) and returns
    /// its output, as `invoke` does.
    pub(crate) fn tx_resume(&mut self, call_data: CallData<'_>) -> Result<Vec<u8>, VmError> {
        self.log_used = 0;
        let result = self.finish_call(call_data);
        let (ptr, len) = self.finish(result)?;
        let mut out = vec![0; len as usize];
        self.read_output(ptr, &mut out)?;
        Ok(out)
    }

    /// Runs the deferred host calls the successful attempt recorded, in
    /// order, and returns how many ran and the failures (function name,
    /// message). A host function that panics counts as a failure.
    pub(crate) fn tx_deliver(
        &mut self,
        mut call_data: CallData<'_>,
    ) -> (usize, Vec<(String, String)>) {
        let calls = std::mem::take(&mut self.tx.deferred);
        self.tx.deferred_bytes = 0;
        let count = calls.len();
        let mut failures = Vec::new();
        let function =
            super::hypercall::current_function_name(&self.functions, self.current_function);
        for call in calls {
            let Some(f) = self.host_functions.get(&call.name).cloned() else {
                continue;
            };
            let mut caller = HostCaller {
                function,
                generation: self.generation,
                deadline: None,
                data: self.data.as_deref_mut(),
                call_data: call_data.as_deref_mut(),
            };
            let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                f(&mut caller, &call.input)
            }));
            match outcome {
                Ok(Ok(_)) => {}
                Ok(Err(e)) => failures.push((call.name, e.to_string())),
                Err(_) => failures.push((call.name, "the host function panicked".into())),
            }
        }
        (count - failures.len(), failures)
    }
}
