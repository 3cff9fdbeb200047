//! [`ManagedVm`]: a VM with a ready snapshot and a restore policy.

use std::time::Instant;

use super::{Decision, InvokeStats, Outcome, RestorePolicy};
use crate::snapshot::{Snapshot, SnapshotError};
use crate::vm::{VmError, VmInstance, VmState};

/// A VM that applies a [`RestorePolicy`] after every call, resetting to its
/// ready snapshot when the policy (or a poisoning error) says so.
///
/// The VM must track dirty pages against the ready snapshot: build it with
/// `VmConfig::dirty_tracking(true)` and restore it from (or take) that
/// snapshot, as in the module example.
#[derive(Debug)]
pub struct ManagedVm<P> {
    vm: VmInstance,
    ready: Snapshot,
    policy: P,
    since_reset: u64,
    ready_heap: u64,
    resets: u64,
}

impl<P: RestorePolicy> ManagedVm<P> {
    /// Manages `vm`, which must track dirty pages against `ready`.
    pub fn new(mut vm: VmInstance, ready: Snapshot, policy: P) -> Result<Self, SnapshotError> {
        if !vm.dirty_tracking || vm.base != Some(ready.id()) {
            // Bring the VM to the ready state and start tracking from there.
            if !vm.dirty_tracking {
                return Err(SnapshotError::NotTracking { base: ready.id() });
            }
            vm.restore_in_place(&ready)?;
        }
        let ready_heap = ready.inner.guest.heap_used;
        Ok(Self {
            vm,
            ready,
            policy,
            since_reset: 0,
            ready_heap,
            resets: 0,
        })
    }

    /// Calls `name` with `input`, then applies the policy. The call's own
    /// error is returned as is (after the VM was reset if it was poisoned).
    pub fn invoke(&mut self, name: &str, input: &[u8]) -> Result<Vec<u8>, crate::Error> {
        let mut out = Vec::new();
        self.invoke_with(name, input, |vm, name, input| {
            out = vm.invoke(name, input)?;
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
        self.invoke_with(name, input, |vm, name, input| {
            len = vm.invoke_into(name, input, output)?;
            Ok(())
        })?;
        Ok(len)
    }

    fn invoke_with(
        &mut self,
        name: &str,
        input: &[u8],
        call: impl FnOnce(&mut VmInstance, &str, &[u8]) -> Result<(), VmError>,
    ) -> Result<(), crate::Error> {
        let start = Instant::now();
        let result = call(&mut self.vm, name, input);
        let elapsed = start.elapsed();
        self.since_reset += 1;
        let outcome = match (&result, self.vm.state()) {
            (Ok(()), _) => Outcome::Success,
            (Err(_), VmState::Poisoned) => Outcome::Poisoned,
            (Err(_), _) => Outcome::Failed,
        };
        let pages_dirtied = self.vm.collect_dirty()?;
        let stats = self.vm.stats();
        let invoke_stats = InvokeStats {
            function: name,
            outcome,
            elapsed,
            pages_dirtied,
            dirty_pages_since_reset: self.vm.dirty_since_base(),
            invocations_since_reset: self.since_reset,
            heap_used: stats.heap_used,
            heap_growth: stats.heap_used.saturating_sub(self.ready_heap),
            guest_garbage: stats.guest_garbage,
        };
        if outcome == Outcome::Poisoned || self.policy.decide(&invoke_stats) == Decision::Reset {
            self.reset()?;
        }
        result.map_err(crate::Error::from)
    }

    /// Resets the VM to its ready snapshot now.
    pub fn reset(&mut self) -> Result<(), SnapshotError> {
        self.vm.restore_in_place(&self.ready)?;
        self.since_reset = 0;
        self.resets += 1;
        Ok(())
    }

    /// Resets performed so far.
    pub fn resets(&self) -> u64 {
        self.resets
    }

    /// The managed VM.
    pub fn vm(&self) -> &VmInstance {
        &self.vm
    }

    /// The ready snapshot resets return to.
    pub fn ready(&self) -> &Snapshot {
        &self.ready
    }

    /// Gives back the VM.
    pub fn into_inner(self) -> VmInstance {
        self.vm
    }
}
