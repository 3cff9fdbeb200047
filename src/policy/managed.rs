//! [`ManagedVm`]: a VM with a ready snapshot and a restore policy.

use std::time::Instant;

use super::{Decision, InvokeStats, Outcome, RestorePolicy, SuccessCriteria, Transaction};
use super::{TxError, TxOutcome};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::vm::{VmError, VmState};
use crate::VmInstance;

/// A VM that applies a [`RestorePolicy`] after every call, resetting to its
/// ready snapshot when the policy (or a poisoning error) says so.
///
/// The VM must track dirty pages against the ready snapshot: build it with
/// `VmConfig::dirty_tracking(true)` and restore it from (or take) that
/// snapshot, as in the module example.
#[derive(Debug)]
pub struct ManagedVm<P, D = ()> {
    pub(super) vm: VmInstance<D>,
    pub(super) ledger: Ledger<P>,
}

/// What a managed VM keeps beside the VM itself: the snapshot resets return
/// to, the policy and its counts. Shared with [`super::PollingVm`].
#[derive(Debug)]
pub(super) struct Ledger<P> {
    pub(super) ready: Snapshot,
    pub(super) policy: P,
    since_reset: u64,
    ready_heap: u64,
    pub(super) resets: u64,
    /// A reset was decided but did not succeed: the next call resets first.
    pub(super) needs_reset: bool,
}

impl<P: RestorePolicy> Ledger<P> {
    fn new(ready: Snapshot, policy: P) -> Self {
        let ready_heap = ready.inner.guest.heap_used;
        Self {
            ready,
            policy,
            since_reset: 0,
            ready_heap,
            resets: 0,
            needs_reset: false,
        }
    }

    /// Counts a finished call and asks the policy about it (`stats` without
    /// the counts this ledger keeps). True when the VM is to be reset now:
    /// the policy says so, the call poisoned the VM, or `force`.
    pub(super) fn judge(&mut self, mut stats: InvokeStats<'_>, force: bool) -> bool {
        self.since_reset += 1;
        stats.invocations_since_reset = self.since_reset;
        stats.heap_growth = stats.heap_used.saturating_sub(self.ready_heap);
        let reset = force
            || stats.outcome == Outcome::Poisoned
            || self.policy.decide(&stats) == Decision::Reset;
        self.needs_reset |= reset;
        reset
    }

    /// Rewinds `vm` to the ready snapshot and starts counting again.
    pub(super) fn reset<D>(&mut self, vm: &mut VmInstance<D>) -> Result<(), SnapshotError> {
        vm.reset_to(&self.ready, self.policy.keeps_preserved())?;
        self.needs_reset = false;
        self.since_reset = 0;
        self.resets += 1;
        Ok(())
    }
}

impl<P: RestorePolicy, D> ManagedVm<P, D> {
    /// Manages `vm`, which must track dirty pages against `ready`.
    pub fn new(mut vm: VmInstance<D>, ready: Snapshot, policy: P) -> Result<Self, SnapshotError> {
        if vm.tracking_base() != Some(ready.id()) {
            // Bring the VM to the ready state and start tracking from there.
            if !vm.tracks_written_pages() {
                return Err(SnapshotError::NotTracking { base: ready.id() });
            }
            vm.restore_in_place(&ready)?;
        }
        Ok(Self {
            vm,
            ledger: Ledger::new(ready, policy),
        })
    }

    /// Calls `name` with `input`, then applies the policy. The call's own
    /// error is returned as is (after the VM was reset if it was poisoned).
    ///
    /// A VM left poisoned (by a reset that failed after an earlier call) is
    /// reset before the call runs; if that reset fails again, its error is
    /// returned and no guest code runs. A reset that fails *after* a call
    /// does not hide the call's result: the result is returned, the reset
    /// error is logged, and the VM stays poisoned until the next call's
    /// reset succeeds — no request ever runs on a VM whose reset was due
    /// but did not happen.
    pub fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        let mut out = Vec::new();
        self.invoke_via(name, input, |vm, name, input| {
            out = vm.invoke(name, input)?;
            Ok(())
        })?;
        Ok(out)
    }

    /// Like [`VmInstance::invoke_with`] (with call data for the host
    /// functions the call makes), then applies the policy.
    pub fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call_data: &mut (dyn std::any::Any + Send),
    ) -> Result<Vec<u8>, crate::Error> {
        let mut out = Vec::new();
        self.invoke_via(name, input, |vm, name, input| {
            out = vm.invoke_with(name, input, call_data)?;
            Ok(())
        })?;
        Ok(out)
    }

    /// Like [`VmInstance::call`] (a typed call, the `serde` feature), then
    /// applies the policy. An input that does not encode fails before
    /// anything runs and counts as no call.
    #[cfg(feature = "serde")]
    pub fn call<In, Out>(&mut self, name: &str, input: &In) -> Result<Out, crate::Error>
    where
        In: serde::Serialize + ?Sized,
        Out: serde::de::DeserializeOwned,
    {
        crate::vm::typed_call(input, |bytes| self.invoke(name, bytes))
    }

    /// Like [`VmInstance::invoke_cancellable`], then applies the policy (a
    /// cancelled call poisons the VM, so it is reset).
    pub fn invoke_cancellable(
        &mut self,
        name: &str,
        input: &[u8],
        cancel: &crate::CancelToken,
    ) -> Result<Vec<u8>, crate::Error> {
        let mut out = Vec::new();
        self.invoke_via(name, input, |vm, name, input| {
            out = vm.invoke_cancellable(name, input, cancel)?;
            Ok(())
        })?;
        Ok(out)
    }

    /// Like [`VmInstance::invoke_into`], then applies the policy.
    pub fn invoke_into(
        &mut self,
        name: &str,
        input: &[u8],
        output: &mut [u8],
    ) -> Result<usize, crate::Error> {
        let mut len = 0;
        self.invoke_via(name, input, |vm, name, input| {
            len = vm.invoke_into(name, input, output)?;
            Ok(())
        })?;
        Ok(len)
    }

    /// Runs `name` as a transaction (see [`Transaction`]): attempts are
    /// judged and retried by rewinding the VM to the transaction's start;
    /// then the policy is applied once, to the transaction's final result
    /// (a rewind is not a reset: it counts in neither [`Self::resets`] nor
    /// the calls since the last reset, which count the transaction once).
    ///
    /// Preserved regions take part in the rewind like any memory — a
    /// failed attempt's writes to them are undone — and survive the reset
    /// that may follow, with the successful attempt's contents.
    pub fn invoke_tx<C: SuccessCriteria>(
        &mut self,
        tx: &Transaction<C>,
        name: &str,
        input: &[u8],
    ) -> Result<TxOutcome, TxError> {
        let mut done = None;
        let ready = self.ledger.ready.clone();
        self.run_call(name, input, TxError::Reset, |vm, name, input| {
            done = Some(tx.invoke(vm, &ready, name, input)?);
            Ok(())
        })?;
        Ok(done.expect("set by a successful call"))
    }

    fn invoke_via(
        &mut self,
        name: &str,
        input: &[u8],
        call: impl FnOnce(&mut VmInstance<D>, &str, &[u8]) -> Result<(), VmError>,
    ) -> Result<(), crate::Error> {
        self.run_call(name, input, crate::Error::from, |vm, name, input| {
            call(vm, name, input).map_err(crate::Error::from)
        })
    }

    fn run_call<E>(
        &mut self,
        name: &str,
        input: &[u8],
        reset_error: impl FnOnce(SnapshotError) -> E,
        call: impl FnOnce(&mut VmInstance<D>, &str, &[u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        if self.ledger.needs_reset || self.vm.state() == VmState::Poisoned {
            self.reset().map_err(reset_error)?;
        }
        // Pages first written in this call: a transaction reads the dirty
        // log during the call too, so count from the tracker's total.
        let dirty_before = self.vm.dirty_since_base();
        let start = Instant::now();
        let result = call(&mut self.vm, name, input);
        let elapsed = start.elapsed();
        let outcome = match (&result, self.vm.state()) {
            (Ok(()), _) => Outcome::Success,
            (Err(_), VmState::Poisoned) => Outcome::Poisoned,
            (Err(_), _) => Outcome::Failed,
        };
        // Without the dirty log the policy cannot judge: reset. A policy
        // that never reads the counts is spared the ioctl (the reset reads
        // the log itself).
        let collected = if self.ledger.policy.reads_dirty_pages() {
            self.vm.collect_dirty().map(drop)
        } else {
            Ok(())
        };
        let (pages_dirtied, log_failed) = match collected {
            Ok(()) => (
                self.vm.dirty_since_base().saturating_sub(dirty_before),
                false,
            ),
            Err(e) => {
                log::warn!(target: "snapvm::policy", "reading the dirty log failed: {e}");
                (0, true)
            }
        };
        let stats = self.vm.stats();
        let invoke_stats = InvokeStats {
            function: name,
            outcome,
            elapsed,
            pages_dirtied,
            dirty_pages_since_reset: self.vm.dirty_since_base(),
            invocations_since_reset: 0,
            heap_used: stats.heap_used,
            heap_growth: 0,
            guest_garbage: stats.guest_garbage,
        };
        if self.ledger.judge(invoke_stats, log_failed) {
            if let Err(e) = self.reset() {
                // The VM is poisoned (restores are failure-atomic): the next
                // call resets it first. The call's own result stands.
                log::warn!(
                    target: "snapvm::policy",
                    "reset after a call to {name:?} failed, retried before the next call: {e}"
                );
            }
        }
        result
    }

    /// Resets the VM to its ready snapshot now.
    pub fn reset(&mut self) -> Result<(), SnapshotError> {
        self.ledger.reset(&mut self.vm)
    }

    /// Resets performed so far.
    pub fn resets(&self) -> u64 {
        self.ledger.resets
    }

    /// The managed VM.
    pub fn vm(&self) -> &VmInstance<D> {
        &self.vm
    }

    /// The VM's host data (see [`VmInstance::data_mut`]): resets keep it.
    pub fn data_mut(&mut self) -> &mut D {
        self.vm.data_mut()
    }

    /// The ready snapshot resets return to.
    pub fn ready(&self) -> &Snapshot {
        &self.ledger.ready
    }

    /// Gives back the VM.
    pub fn into_inner(self) -> VmInstance<D> {
        self.vm
    }

    /// Like [`Self::invoke`], for a function resolved earlier (see
    /// [`crate::vm::Func`]).
    pub(crate) fn invoke_resolved(
        &mut self,
        func: &crate::vm::Func,
        input: &[u8],
    ) -> Result<Vec<u8>, crate::Error> {
        let mut out = Vec::new();
        self.invoke_via(func.name(), input, |vm, _, input| {
            out = vm.invoke_resolved(func, input, None)?;
            Ok(())
        })?;
        Ok(out)
    }
}
