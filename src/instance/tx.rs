//! Transactions inside a call, the VM half: the `TxBegin`/`TxEnd`
//! hypercalls, served through the core's extension hooks; the checkpoint
//! taken at `TxBegin` (a core [`Checkpoint`]) while a
//! [`Transaction`](crate::policy::Transaction) runner drives the call; and the
//! deferred host calls buffered during an attempt.

use crate::abi::{self, Hypercall};
use crate::vm::{CallContext, Checkpoint, MemorySource, TxFault, VmError};
use crate::VmInstance;

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
enum Phase {
    /// No transaction began in this call.
    #[default]
    None,
    /// Between `TxBegin` and `TxEnd`.
    Open,
    /// After `TxEnd`.
    Ended,
}

/// The transaction state of a VM's current call.
#[derive(Default)]
pub(crate) struct TxCall {
    /// A transaction runner drives this call: take a checkpoint at
    /// `TxBegin`, buffer deferred host calls.
    armed: bool,
    phase: Phase,
    end: Option<TxEnd>,
    attempt: u64,
    checkpoint: Option<Box<Checkpoint>>,
    /// Deferred host calls recorded during the attempt (name, input).
    deferred: Vec<(String, Vec<u8>)>,
    /// Input bytes buffered in `deferred`.
    deferred_bytes: u64,
}

impl std::fmt::Debug for TxCall {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TxCall")
            .field("armed", &self.armed)
            .field("phase", &self.phase)
            .field("end", &self.end)
            .field("attempt", &self.attempt)
            .field("checkpointed", &self.checkpoint.is_some())
            .field("deferred", &self.deferred.len())
            .finish()
    }
}

impl TxCall {
    /// Forgets the previous call's transaction (at the start of a call and
    /// before a reset).
    pub(crate) fn new_call(&mut self) {
        self.phase = Phase::None;
        self.end = None;
        self.attempt = 0;
        self.checkpoint = None;
        self.deferred.clear();
        self.deferred_bytes = 0;
    }

    /// At the end of a call: a transaction left open fails it.
    pub(crate) fn call_end(&self) -> Result<(), VmError> {
        match self.phase {
            Phase::Open => Err(VmError::Transaction(TxFault::NotEnded)),
            Phase::None | Phase::Ended => Ok(()),
        }
    }

    /// Deferred host calls are being buffered: an attempt is in progress.
    pub(crate) fn recording(&self) -> bool {
        self.armed && self.checkpoint.is_some()
    }

    /// Serves the transaction hypercalls; `None` for any other.
    pub(crate) fn hypercall(
        &mut self,
        nr: Hypercall,
        cx: &mut CallContext<'_>,
    ) -> Option<Result<(), VmError>> {
        match nr {
            Hypercall::TxBegin => Some(self.begin(cx)),
            Hypercall::TxEnd => Some(self.end(cx)),
            _ => None,
        }
    }

    /// `TxBegin`: opens the call's transaction and, under a runner, asks
    /// the core for a checkpoint.
    fn begin(&mut self, cx: &mut CallContext<'_>) -> Result<(), VmError> {
        match self.phase {
            Phase::Open => return Err(VmError::Transaction(TxFault::Nested)),
            Phase::Ended => return Err(VmError::Transaction(TxFault::SecondTransaction)),
            Phase::None => {}
        }
        self.phase = Phase::Open;
        self.attempt = 1;
        cx.ret(&[1])?;
        if self.armed {
            cx.request_checkpoint();
        }
        Ok(())
    }

    /// The checkpoint the core took for `TxBegin`.
    pub(crate) fn checkpoint_taken(&mut self, checkpoint: Checkpoint) {
        self.checkpoint = Some(Box::new(checkpoint));
    }

    /// `TxEnd`: closes the transaction with the guest's outcome.
    fn end(&mut self, cx: &mut CallContext<'_>) -> Result<(), VmError> {
        if self.phase != Phase::Open {
            return Err(VmError::Transaction(TxFault::EndWithoutBegin));
        }
        let [outcome, ptr, len] = cx.args::<3>()?;
        let end = match outcome {
            abi::TX_COMMIT => TxEnd::Committed,
            abi::TX_ABORT => TxEnd::Aborted(cx.read_text(ptr, len, cx.message_limit())?),
            other => return Err(VmError::Transaction(TxFault::BadOutcome(other))),
        };
        self.phase = Phase::Ended;
        self.end = Some(end);
        Ok(())
    }

    /// Records a call to deferred host function `name` during an attempt;
    /// returns the status and result the guest gets now.
    pub(crate) fn defer(&mut self, name: String, input: Vec<u8>, limit: u64) -> (u64, Vec<u8>) {
        let bytes = self.deferred_bytes.saturating_add(input.len() as u64);
        if self.deferred.len() >= MAX_DEFERRED_CALLS || bytes > limit {
            let message = format!(
                "the deferred host calls of one transaction attempt exceed {MAX_DEFERRED_CALLS} \
                 calls or {limit} input bytes"
            );
            return (abi::HOST_CALL_FAILED, message.into_bytes());
        }
        self.deferred_bytes = bytes;
        self.deferred.push((name, input));
        (abi::HOST_CALL_OK, Vec::new())
    }
}

impl<D> VmInstance<D> {
    fn tx(&mut self) -> &mut TxCall {
        &mut self.ext_mut().tx
    }

    /// Lets the next call's `TxBegin` checkpoint the VM (on) or not (off;
    /// this also drops any checkpoint and buffered deferred calls).
    pub(crate) fn tx_arm(&mut self, on: bool) {
        let tx = self.tx();
        tx.armed = on;
        if !on {
            tx.new_call();
        }
    }

    /// How the guest ended the last attempt's transaction, if it did.
    pub(crate) fn tx_end(&self) -> Option<&TxEnd> {
        self.ext().tx.end.as_ref()
    }

    /// Whether the current call took a checkpoint it can be rewound to.
    pub(crate) fn tx_checkpointed(&self) -> bool {
        self.ext().tx.checkpoint.is_some()
    }

    /// Rewinds the VM to the call's checkpoint, drops the attempt's
    /// deferred calls and tells the guest the next attempt number. `base`
    /// must be the snapshot the VM tracks against. The VM stays marked
    /// poisoned until [`Self::tx_resume`] finished the next attempt.
    pub(crate) fn tx_rewind<S: MemorySource>(&mut self, base: &S) -> Result<(), S::Error> {
        let Some(checkpoint) = self.tx().checkpoint.take() else {
            return Err(VmError::InvalidGuestState {
                reason: "no transaction checkpoint to rewind to",
            }
            .into());
        };
        let attempt = self.ext().tx.attempt + 1;
        let result = self.rewind_to_checkpoint(&checkpoint, base, &[attempt]);
        let tx = self.tx();
        tx.checkpoint = Some(checkpoint);
        result?;
        tx.attempt = attempt;
        tx.phase = Phase::Open;
        tx.end = None;
        tx.deferred.clear();
        tx.deferred_bytes = 0;
        Ok(())
    }

    /// Runs the rewound call on to its end (the next attempt) and returns
    /// its output, as `invoke` does.
    pub(crate) fn tx_resume(
        &mut self,
        call_data: crate::vm::CallData<'_>,
    ) -> Result<Vec<u8>, VmError> {
        self.resume_call(call_data)
    }

    /// Runs the deferred host calls the successful attempt recorded, in
    /// order, and returns how many ran and the failures (function name,
    /// message). A host function that panics counts as a failure.
    pub(crate) fn tx_deliver(
        &mut self,
        call_data: crate::vm::CallData<'_>,
    ) -> (usize, Vec<(String, String)>) {
        let tx = self.tx();
        let calls = std::mem::take(&mut tx.deferred);
        tx.deferred_bytes = 0;
        self.run_host_calls(calls, call_data)
    }
}
